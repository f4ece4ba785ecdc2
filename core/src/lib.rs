//! `dr-core`: everything the `dr` commands share.
//!
//! - [`config`]: the TOML configuration, parsed once into validated types.
//! - [`keys`]: age recipients (public) and identities (private).
//! - [`pg`]: connection URLs and secrets, client tool discovery, `psql`/`pg_dump` children.
//! - [`pipeline`]: the stages, child stdout → zstd → age → sha256 → upload.
//! - [`storage`]: the `Storage` trait, with `file://` and `s3://` backends.
//! - [`repo`] and [`manifest`]: the repository layout and the commit record of a backup.
//! - [`backup`]: one backup of one database, end to end.
//! - [`retention`]: which backups to keep, and pruning the rest.
//! - [`snapshot`]: a held snapshot for `pg_dump --snapshot` and exact row counts.
//! - [`split`]: a backup as a schema archive and K data archives from one snapshot.
//! - [`redact`]: keeping secrets out of logs and errors.

pub mod backup;
pub mod config;
pub mod keys;
pub mod manifest;
pub mod pg;
pub mod pgbin;
pub mod pipeline;
pub mod redact;
pub mod repo;
pub mod retention;
pub mod snapshot;
pub mod split;
pub mod storage;
