//! `dr-drills`: restore drills that prove backups restore and measure RTO.
//!
//! - [`ephemeral`]: a throwaway local cluster, removed afterwards.
//! - [`run`]: one drill: pick a backup, restore it through `dr_restore` into a scratch
//!   database it creates, check it, time it, clean up, report.
//! - [`report`]: drill reports in the repository, history, and the RTO trend as SVG.
//!
//! A drill only ever writes to or drops a database it created itself.

pub mod ephemeral;
pub mod report;
pub mod run;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("scratch target: {0}")]
    Scratch(String),
    #[error("the drill target is the backed-up server itself (same system_identifier {0}); use a scratch server, or set allow_same_server = true (drills still touch only databases they create)")]
    SameServer(String),
    #[error("database `{0}` already exists on the scratch server; a drill only restores into a database it creates, so it will not touch it")]
    Exists(String),
    #[error("database `{0}` has no [databases.drill] section in the config")]
    NotConfigured(String),
    #[error(transparent)]
    Restore(#[from] dr_restore::RestoreError),
    #[error(transparent)]
    Pg(#[from] dr_core::pg::PgError),
    #[error(transparent)]
    Storage(#[from] dr_core::storage::StorageError),
    #[error(transparent)]
    Replay(#[from] dr_continuous::pitr::PitrError),
}
