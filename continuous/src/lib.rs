//! Continuous protection through logical decoding: a database's committed changes, captured
//! from a logical replication slot into the repository between dumps.
//!
//! So far: the prerequisites, and setting up and tearing down the `FOR ALL TABLES`
//! publication and the `pgoutput` slot without ever making the source's writes fail
//! ([`setup`]); the health of a slot that is set up (WAL it retains, tables that lost their
//! replica identity); and capture into change segments, confirmed to the slot only once
//! committed ([`capture`]); reading them back ([`decode`]) and replaying them onto a
//! restored base up to a point in time ([`pitr`]).
//!
//! dr reads the slot through the SQL interface (`pg_logical_slot_peek_binary_changes`, then
//! `pg_replication_slot_advance` once a segment is committed), on the same `tokio-postgres`
//! sessions as every other query: TLS, passwords and poolers work as for dumps, and no
//! walsender (`max_wal_senders`) is needed. See the README's design notes.

pub mod capture;
pub mod decode;
pub mod pitr;
pub mod retention;
pub mod setup;

pub use capture::{capture_segment, latest_segment, CaptureError, SegmentManifest};
pub use setup::{health, setup, teardown, Health, SetupReport, TeardownReport};
