//! What the backup, restore and agent test beds share: a temporary directory, a running
//! cluster, age keys and a repository (`file://` in the directory, or S3 on its own Garage).

use std::path::Path;

use tempfile::TempDir;

use crate::config::Storage;
use crate::dr::Dr;
use crate::garage::Garage;
use crate::pg::PgCluster;
use crate::repo::Repo;
use crate::tools::{keygen, Keypair};

/// A temporary directory, a cluster (not yet seeded), keys in the directory and a repository.
pub struct BedBase {
    pub tmp: TempDir,
    pub cluster: PgCluster,
    pub keys: Keypair,
    pub storage: Storage,
    pub garage: Option<Garage>,
}

impl BedBase {
    /// A `file://` repository at `<dir>/repo`; the directory's name starts with `tmp_prefix`.
    pub fn file(tmp_prefix: &str) -> BedBase {
        BedBase::new(tmp_prefix, None, |tmp| Storage::File(tmp.join("repo")))
    }

    /// An S3 repository on a fresh Garage under `prefix`.
    pub fn s3(tmp_prefix: &str, prefix: &str) -> BedBase {
        let garage = Garage::start();
        let storage = Storage::garage(&garage, prefix);
        BedBase::new(tmp_prefix, Some(garage), |_| storage)
    }

    fn new(
        tmp_prefix: &str,
        garage: Option<Garage>,
        storage: impl FnOnce(&Path) -> Storage,
    ) -> BedBase {
        let tmp = tempfile::Builder::new()
            .prefix(tmp_prefix)
            .tempdir()
            .expect("create test dir");
        let cluster = PgCluster::start();
        let keys = keygen(tmp.path());
        let storage = storage(tmp.path());
        BedBase {
            tmp,
            cluster,
            keys,
            storage,
            garage,
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `dr --config <config>` with the storage credentials (if any) in its environment.
    pub fn dr(&self, config: &Path) -> Dr {
        let dr = Dr::new(config);
        match &self.garage {
            Some(garage) => dr.envs(garage.env()),
            None => dr,
        }
    }

    /// The repository, seen from outside `dr`.
    pub fn repo(&self) -> Repo {
        match (&self.storage, &self.garage) {
            (Storage::File(root), _) => Repo::file(root),
            (Storage::S3 { prefix, .. }, Some(garage)) => Repo::garage(garage, prefix),
            (Storage::S3 { .. }, None) => unreachable!("S3 storage always has a Garage"),
        }
    }
}
