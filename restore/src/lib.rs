//! `dr-restore`: the restore engine shared by `dr restore`, `dr verify` and the drills.
//!
//! - [`select`]: which backup (by id, the latest, the newest before a time).
//! - [`fetch`]: stream an object from storage through the verified decode stage.
//! - [`target`]: the destination database: does it exist, is it empty, create and drop it.
//! - [`globals`]: apply a backup's roles, skipping those that exist.
//! - [`run`]: a whole restore, staged (verified first, then `pg_restore -j N`) or streamed.
//! - [`verify`]: check backups without restoring them.

pub mod fetch;
pub mod globals;
pub mod run;
pub mod select;
pub mod target;
pub mod verify;

use std::path::PathBuf;

use dr_core::keys::KeyError;
use dr_core::pg::PgError;
use dr_core::pipeline::child::ChildError;
use dr_core::pipeline::decode::DecodeError;
use dr_core::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Select(#[from] select::SelectError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no identity to decrypt with: set [encryption] identity_file in the config or pass --identity FILE")]
    NoIdentity,
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("backup {backup}: its {object} object is missing from {location}")]
    Missing {
        backup: String,
        object: String,
        location: String,
    },
    #[error("backup {backup}: object {object}: {source}")]
    Decode {
        backup: String,
        object: String,
        source: DecodeError,
    },
    #[error("backup {backup} has no {role} object in its manifest")]
    NoObject { backup: String, role: &'static str },
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("target database `{database}` already holds {tables} table(s) or other relations; restoring would mix two databases. Pick an empty or new database (--create), or pass --force to replace its objects")]
    TargetNotEmpty { database: String, tables: u64 },
    #[error("target database `{database}` does not exist; pass --create to create it")]
    TargetMissing { database: String },
    #[error("not confirmed; nothing was changed")]
    NotConfirmed,
    #[error("the staging directory {dir} has {available} bytes free but the archive needs {needed}; pass --staging-dir DIR on a larger disk, or --jobs 1 to stream without staging")]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("staging file in {dir}: {source}")]
    Staging {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pick another --output or remove it first")]
    OutputExists { path: PathBuf },
    #[error("needs pg_restore ≥ {major}: backup {backup} was written by pg_dump {archive}, and the newest pg_restore on this host is {newest} ({dir}); install postgresql-client-{major}, or put its bin directory first on PATH")]
    PgRestoreTooOld {
        backup: String,
        archive: String,
        major: u32,
        newest: String,
        dir: PathBuf,
    },
    #[error(transparent)]
    TargetOlderThanArchive(Box<TargetOlderThanArchive>),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error("cancelled")]
    Cancelled,
}

/// A target server older than the archive's pg_dump (boxed: it names many versions).
#[derive(Debug, thiserror::Error)]
#[error("backup {backup} was written by pg_dump {archive}, but the target database `{database}` is on PostgreSQL {server}, an older major: pg_restore {pg_restore} would emit what PostgreSQL {major} understands and fail half way. Restore into a PostgreSQL {major} or newer server (nothing was changed)")]
pub struct TargetOlderThanArchive {
    pub backup: String,
    pub archive: String,
    pub major: u32,
    pub pg_restore: String,
    pub database: String,
    pub server: String,
}

impl RestoreError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RestoreError::Cancelled)
    }

    /// No pg_restore on this host can read the archive: not a verdict on the backup.
    pub fn is_missing_tools(&self) -> bool {
        matches!(
            self,
            RestoreError::PgRestoreTooOld { .. } | RestoreError::Pg(PgError::NoTools { .. })
        )
    }
}
