//! Change segments: what the slot has decoded since the last segment, stored through the
//! same zstd + age + sha256 pipeline as dumps, its manifest written last, and only then
//! confirmed to the slot.
//!
//! One segment is one read of the slot through the SQL interface:
//! `pg_logical_slot_peek_binary_changes(slot, upto, …)` returns the `pgoutput` messages of
//! every transaction committed before `upto` (the WAL position read at the start), in commit
//! order, without consuming them. Once the segment's manifest is stored,
//! `pg_replication_slot_advance` moves the slot to `upto`. A crash between the two re-reads
//! the same changes into the next segment: duplicates, never a gap (restore deduplicates by
//! LSN).
//!
//! The object's plaintext (no table name or value is ever outside it):
//!
//! ```text
//! "DRCHANGES1\n"
//! 'M' lsn:u64 len:u32 message      one pgoutput message, in the order the server sent it
//! 'S' len:u32 json                 every sequence's last_value: [["schema.seq", value], …]
//! 'E'                              the end: a segment without it is incomplete
//! ```

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use dr_core::config::DatabaseConfig;
use dr_core::keys::Recipients;
use dr_core::pg::{Connection, PgClient, PgError};
use dr_core::pipeline::encode::EncodeOptions;
use dr_core::pipeline::{self, Control, PipelineError};
use dr_core::repo::Repository;
use dr_core::storage::StorageError;
use futures_util::{pin_mut, TryStreamExt};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::decode::Message;

pub const MAGIC: &[u8] = b"DRCHANGES1\n";
pub const SEGMENT_FORMAT: u32 = 1;
pub const DATA_OBJECT: &str = "changes.zst.age";
pub const MANIFEST: &str = "manifest.json";

/// The shape of every table logical decoding publishes; OIDs make the digest unguessable.
const SCHEMA_DIGEST: &str = "SELECT md5(coalesce(string_agg(
        format('%s.%s.%s.%s', c.oid, a.attnum, a.attname, a.atttypid), ',' ORDER BY c.oid, a.attnum), ''))
     FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND c.oid >= 16384
       AND a.attnum > 0 AND NOT a.attisdropped";

/// Covered time stays this far behind the server's clock: a commit's timestamp is taken a
/// moment before its WAL record is inserted, so a commit stamped just before the flush
/// barrier may still land after it.
const COVER_MARGIN: &str = "1 second";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("replication slot {0} does not exist: run `dr continuous setup`")]
    NoSlot(String),
    #[error("storing the change segment failed: {0}")]
    Store(#[from] PipelineError),
    #[error("committing the change segment's manifest failed: {0}")]
    Commit(#[from] StorageError),
    #[error("the server sent a change row dr cannot read: {0}")]
    BadRow(String),
}

/// The commit point of a segment: stored last, plaintext, naming no table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentManifest {
    pub format: u32,
    pub kind: String,
    pub environment: String,
    pub database: String,
    pub id: String,
    pub slot: String,
    pub server_version: String,
    pub taken_at: Timestamp,
    /// The slot's confirmed position when the segment was read: changes start after it.
    pub start_lsn: String,
    /// Every transaction committed before this position is in this segment or an earlier
    /// one; the slot is advanced here once the manifest is stored.
    pub end_lsn: String,
    pub first_commit_at: Option<Timestamp>,
    pub last_commit_at: Option<Timestamp>,
    /// Every commit up to this time (the server's clock) is in this segment or an earlier
    /// one: the recovery point a restore from this segment can reach, also when idle.
    pub covered_until: Timestamp,
    pub transactions: u64,
    pub messages: u64,
    pub object: SegmentObject,
    /// The age recipients the object is encrypted to, named when a key does not match.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// A digest of every published table's shape (OIDs, column numbers, names and types),
    /// read with `end_lsn`: a hash, never the names.
    #[serde(default)]
    pub schema_digest: String,
    /// The digest differs from the previous segment's: a schema change committed between
    /// that segment's read and this one's. Changes after it cannot be replayed onto an older
    /// base, so the agent takes a new backup at once.
    #[serde(default)]
    pub schema_changed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentObject {
    pub name: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
}

/// Where one segment's objects live.
pub fn segment_dir(repo: &Repository, database: &str, id: &str) -> String {
    format!("{}/{database}/changes/{id}", repo.environment())
}

/// What capture needs besides the database: where to store, and how to encrypt.
pub struct Target<'a> {
    pub repo: &'a Repository,
    pub recipients: &'a Recipients,
    pub encode: EncodeOptions,
}

/// Reads everything the slot holds up to the current WAL position into one committed
/// segment, then advances the slot. Returns the segment's manifest.
pub async fn capture_segment(
    db: &DatabaseConfig,
    conn: &Connection,
    target: &Target<'_>,
    previous: Option<&SegmentManifest>,
) -> Result<SegmentManifest, CaptureError> {
    let (slot, publication) = db
        .continuous_names()
        .ok_or_else(|| CaptureError::NoSlot(format!("dr_{}", db.name)))?;
    let max_raw = db
        .continuous
        .as_ref()
        .map_or(64, |c| c.segment_max_mib)
        .saturating_mul(1024 * 1024);
    let client = conn.connect("dr continuous capture").await?;
    // pgoutput writes values with this session's output settings: fix them, so a restore
    // reads them back the same whatever the role's or server's defaults.
    client
        .execute(
            "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'",
        )
        .await?;
    let version = client.server_version().await?;
    // A flush barrier. Logical decoding reads only flushed WAL, and with asynchronous
    // commit a transaction is visible before its commit record is flushed. This session's
    // own (empty) commit, made synchronous, flushes every commit record written before it:
    // every transaction that committed before `covered` is then at or below the flush
    // position read next, which is what the slot is read up to and advanced to. (Reading
    // the write or insert position instead would advance the slot past changes the read
    // never returned.)
    let covered: std::time::SystemTime = client
        .query_one(
            &format!("SELECT clock_timestamp() - interval '{COVER_MARGIN}'"),
            &[],
        )
        .await?
        .get(0);
    client
        .execute("BEGIN READ WRITE; SET LOCAL synchronous_commit = local; SELECT pg_current_xact_id(); COMMIT")
        .await?;
    let rows = client
        .query(
            &format!(
                "SELECT confirmed_flush_lsn::text, pg_current_wal_flush_lsn()::text,
                        ({SCHEMA_DIGEST})
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot.as_str()],
        )
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| CaptureError::NoSlot(slot.to_string()))?;
    let start: String = row.get(0);
    let upto: String = row.get(1);
    let now_covered = covered;
    let schema_digest: String = row.get(2);
    // Compared with the previous segment's: a schema change committed between the two reads.
    let schema_changed = previous.is_some_and(|p| p.schema_digest != schema_digest);

    let taken_at = Timestamp::now();
    let id = format!(
        "{}-{}-{:04x}",
        taken_at.strftime("%Y%m%dT%H%M%SZ"),
        hex_lsn(parse_lsn(&start).unwrap_or(0)),
        rand::random::<u16>()
    );
    let dir = segment_dir(target.repo, db.name.as_str(), &id);
    let key = format!("{dir}/{DATA_OBJECT}");

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let control = Control::default();
    let store = pipeline::encrypt_chunks_to_storage(
        rx,
        target.repo.storage(),
        &key,
        target.recipients,
        target.encode,
        &control,
    );
    let produce = read_changes(
        &client,
        slot.as_str(),
        publication.as_str(),
        &upto,
        max_raw,
        tx,
    );
    let (stored, read) = tokio::join!(store, produce);
    let read = read?;
    let stored = stored?;

    let (end_lsn, covered_until) = match &read.truncated_at {
        // Stopped early at a commit: that commit is the recovery point.
        Some(end) => (end.clone(), read.last_commit_at.unwrap_or(taken_at)),
        None => (
            upto.clone(),
            Timestamp::try_from(now_covered).unwrap_or(taken_at),
        ),
    };
    let manifest = SegmentManifest {
        format: SEGMENT_FORMAT,
        kind: "changes".into(),
        environment: target.repo.environment().to_string(),
        database: db.name.to_string(),
        id: id.clone(),
        slot: slot.to_string(),
        server_version: version.text.clone(),
        taken_at,
        start_lsn: start,
        end_lsn: end_lsn.clone(),
        first_commit_at: read.first_commit_at,
        last_commit_at: read.last_commit_at,
        covered_until,
        transactions: read.transactions,
        messages: read.messages,
        object: SegmentObject {
            name: DATA_OBJECT.into(),
            raw_bytes: stored.raw_bytes,
            stored_bytes: stored.stored_bytes,
            sha256: stored.sha256,
        },
        recipients: target.recipients.to_strings(),
        schema_digest,
        schema_changed,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    // Object Lock: a segment lives as long as the bases it serves (the database's longest
    // keep); locked before its manifest commits it, like a backup.
    let until = target.repo.locked_until(db.name.as_str(), &[], taken_at);
    if let Some(until) = until {
        target
            .repo
            .lock_objects(&dir, &[DATA_OBJECT], until)
            .await?;
    }
    target
        .repo
        .storage()
        .put(&format!("{dir}/{MANIFEST}"), Bytes::from(json))
        .await?;
    if let Some(until) = until {
        target.repo.lock_objects(&dir, &[MANIFEST], until).await?;
    }
    // Durable: only now may the source forget these changes.
    client
        .query(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot.as_str(), &end_lsn],
        )
        .await?;
    tracing::info!(
        database = %db.name, segment = %id, transactions = read.transactions,
        start_lsn = %manifest.start_lsn, end_lsn = %end_lsn,
        raw_bytes = manifest.object.raw_bytes, "change segment committed"
    );
    Ok(manifest)
}

/// What one read of the slot held.
#[derive(Default)]
struct Read {
    messages: u64,
    transactions: u64,
    first_commit_at: Option<Timestamp>,
    last_commit_at: Option<Timestamp>,
    /// Set when the segment reached its size limit: the end LSN of the last commit kept.
    truncated_at: Option<String>,
}

/// Streams the slot's messages (then the sequences) into `tx` as frames. On failure the
/// error goes down `tx` too, so the object is aborted rather than completed.
async fn read_changes(
    client: &PgClient,
    slot: &str,
    publication: &str,
    upto: &str,
    max_raw: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
) -> Result<Read, CaptureError> {
    let result = read_changes_inner(client, slot, publication, upto, max_raw, &tx).await;
    if let Err(e) = &result {
        let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
    }
    result
}

async fn read_changes_inner(
    client: &PgClient,
    slot: &str,
    publication: &str,
    upto: &str,
    max_raw: u64,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> Result<Read, CaptureError> {
    let send = |b: Bytes| async move {
        tx.send(Ok(b))
            .await
            .map_err(|_| CaptureError::BadRow("the segment's upload stopped".into()))
    };
    send(Bytes::from_static(MAGIC)).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&slot, &upto, &publication];
    let mut read = Read::default();
    let mut frame = BytesMut::new();
    {
        // Scoped: a segment cut at its size limit drops the rest of the read here, before the
        // next query on this session (the connection keeps reading past a dropped stream,
        // but not past one that is merely left unread).
        let stream = client
            .inner()
            .query_raw(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(
                     $1, $2::text::pg_lsn, NULL,
                     'proto_version', '1', 'publication_names', $3)",
                params,
            )
            .await
            .map_err(pg_error)?;
        pin_mut!(stream);
        let mut raw = 0u64;
        while let Some(row) = stream.try_next().await.map_err(pg_error)? {
            let lsn: String = row.get(0);
            let data: &[u8] = row.get(1);
            let lsn =
                parse_lsn(&lsn).ok_or_else(|| CaptureError::BadRow(format!("LSN `{lsn}`")))?;
            frame.reserve(13 + data.len());
            frame.put_u8(b'M');
            frame.put_u64(lsn);
            frame.put_u32(data.len() as u32);
            frame.put_slice(data);
            raw += 13 + data.len() as u64;
            read.messages += 1;
            let mut commit_end = None;
            if matches!(data.first(), Some(b'B') | Some(b'C')) {
                match crate::decode::parse(data) {
                    Ok(Message::Begin { commit_at, .. }) => {
                        read.first_commit_at = read.first_commit_at.or(commit_at);
                    }
                    Ok(Message::Commit {
                        end_lsn, commit_at, ..
                    }) => {
                        read.transactions += 1;
                        read.last_commit_at = commit_at;
                        commit_end = Some(end_lsn);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(CaptureError::BadRow(e.to_string())),
                }
            }
            if frame.len() >= 256 * 1024 || commit_end.is_some() {
                send(frame.split().freeze()).await?;
            }
            if let Some(end) = commit_end {
                if raw >= max_raw {
                    read.truncated_at = Some(lsn_text(end));
                    break;
                }
            }
        }
    }
    if !frame.is_empty() {
        send(frame.split().freeze()).await?;
    }
    // Logical decoding does not carry sequences: their values go with every segment.
    let sequences = client
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), last_value
             FROM pg_sequences ORDER BY 1",
            &[],
        )
        .await?;
    let values: Vec<(String, Option<i64>)> =
        sequences.iter().map(|r| (r.get(0), r.get(1))).collect();
    let json = serde_json::to_vec(&values).expect("sequence values serialize");
    let mut tail = BytesMut::with_capacity(json.len() + 6);
    tail.put_u8(b'S');
    tail.put_u32(json.len() as u32);
    tail.put_slice(&json);
    tail.put_u8(b'E');
    send(tail.freeze()).await?;
    Ok(read)
}

fn pg_error(e: tokio_postgres::Error) -> CaptureError {
    CaptureError::Pg(PgError::Query {
        database: String::new(),
        message: dr_core::pg::client::describe(&e),
        sqlstate: e.code().map(|c| c.code().to_string()),
    })
}

/// `16/B374D848` → its 64-bit position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn hex_lsn(lsn: u64) -> String {
    format!("{lsn:016X}")
}

/// The keys of a database's segment manifests, in id (time) order.
pub(crate) async fn manifest_keys(
    repo: &Repository,
    database: &str,
) -> Result<Vec<String>, StorageError> {
    let prefix = format!("{}/{database}/changes/", repo.environment());
    let suffix = format!("/{MANIFEST}");
    let mut keys: Vec<String> = repo
        .storage()
        .list(&prefix)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(&suffix))
        .collect();
    keys.sort();
    Ok(keys)
}

/// One segment manifest; `None` (logged) when it does not parse.
pub(crate) async fn read_manifest(
    repo: &Repository,
    key: &str,
) -> Result<Option<SegmentManifest>, StorageError> {
    let bytes = repo.storage().get(key).await?;
    Ok(match serde_json::from_slice::<SegmentManifest>(&bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(key, error = %e, "unreadable change-segment manifest; skipped");
            None
        }
    })
}

/// The newest committed segment of a database, if any (manifests only; no key needed).
pub async fn latest_segment(
    repo: &Repository,
    database: &str,
) -> Result<Option<SegmentManifest>, StorageError> {
    for key in manifest_keys(repo, database).await?.iter().rev() {
        if let Some(m) = read_manifest(repo, key).await? {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_and_sort() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nonsense"), None);
        assert!(hex_lsn(0x1_0000_0000) > hex_lsn(0xFFFF_FFFF));
    }
}
