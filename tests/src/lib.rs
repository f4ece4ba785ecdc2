//! The real-component test bed for `dr`.
//!
//! Integration tests run the built `dr` binary against real PostgreSQL clusters
//! ([`PgCluster`]) and a real S3 server ([`Garage`]); nothing at this level is mocked.
//! Every fixture lives in its own temporary directory on its own free ports, so tests run
//! in parallel without sharing state, and every fixture cleans up after itself on drop.

mod agent;
mod base;
mod browser;
mod config;
mod dr;
mod garage;
mod pg;
mod pgbin;
mod proxy;
mod repo;
mod s3;
mod seaweed;
mod seed;
mod tools;
mod util;

pub use agent::{http_get, metric_value, Agent, TableLock, WebhookReceiver, WebhookRequest};
pub use base::BedBase;
pub use browser::Browser;
pub use config::{database_toml, encryption_toml, write_config, Storage};
pub use dr::{dr_binary, wait_with_timeout, Dr, DrOutput};
pub use garage::{garage_binary, Garage};
pub use pg::{pg_bindir, PgCluster};
pub use pgbin::postgresql_binaries;
pub use proxy::{Direction, Fault, FaultProxy, ThrottledProxy};
pub use repo::{BackupEntry, Repo};
pub use s3::S3;
pub use seaweed::{seaweed_binary, Seaweed, REGION as SEAWEED_REGION};
pub use seed::{create_seeded, seed, seed_incompressible, table_hashes, SEED_BIG_ROWS, SEED_ROLE};
pub use tools::{
    decrypt_to_bytes, keygen, sha256_hex, stock_restore, tool_dir, write_script, write_secret_file,
    Keypair,
};
pub use util::{
    dir_entries, free_port, poll_every, processes, random_hex, runs_program, test_cache_dir,
    wait_until,
};
