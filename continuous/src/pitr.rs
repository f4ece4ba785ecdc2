//! Point-in-time restore: the newest base dump whose snapshot is at or before the target
//! time (restored by the caller through the verified restore path), then every transaction
//! that snapshot does not see, committed at or before the target time, in commit order, each
//! in its own transaction, then the sequences.
//!
//! Everything is checked before the target is touched: a time the change stream does not
//! reach, a time before the oldest base, a gap between the base and the segments.

use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use dr_core::keys::Identities;
use dr_core::manifest::Manifest;
use dr_core::pg::{Connection, PgClient, PgError};
use dr_core::pipeline::decode::{self, Expected};
use dr_core::pipeline::Progress;
use dr_core::repo::Repository;
use dr_core::storage::StorageError;
use jiff::Timestamp;
use serde::Serialize;
use tokio_util::io::SyncIoBridge;

use crate::capture::{lsn_text, manifest_keys, parse_lsn, segment_dir, SegmentManifest};
use crate::decode::{DecodeError, Frame, Frames, Message, Replayer};

/// Statements go to the target in batches of about this many bytes or transactions: one
/// round trip per transaction would make the replay as slow as the network's latency.
const BATCH_BYTES: usize = 1024 * 1024;
const BATCH_TRANSACTIONS: u64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    #[error("database `{database}` has no change segments: continuous capture has not stored anything yet (is the agent running with [databases.continuous]?)")]
    NoSegments { database: String },
    #[error("changes of `{database}` are stored up to {covered_until}; {to} is later. Choose a time at or before it, or --to-time latest")]
    NotCovered {
        database: String,
        to: Timestamp,
        covered_until: Timestamp,
    },
    #[error("no backup of `{database}` can serve {to}: {why}")]
    NoBase {
        database: String,
        to: Timestamp,
        why: String,
    },
    #[error("the change segments of `{database}` do not connect to backup {base}: {why}. Choose a time after a later backup (see `dr list`)")]
    Gap {
        database: String,
        base: String,
        why: String,
    },
    #[error("a schema change of `{database}` was captured between {from} and {until}; logical decoding does not carry it, so changes after it cannot be replayed onto backup {base}, taken before it. Reachable: any time up to {from}{after}")]
    SchemaChange {
        database: String,
        base: String,
        from: Timestamp,
        until: Timestamp,
        /// ", or from T (the backup taken after it)" when that backup exists.
        after: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("change segment {segment}: {source}")]
    Segment {
        segment: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("replaying the transactions committed from {first} to {last} failed: {message}. The target holds the base plus the transactions before the failing one, each whole")]
    Apply {
        first: String,
        last: String,
        message: String,
    },
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// What a point-in-time restore will use, decided before anything is changed.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub database: String,
    pub to: Timestamp,
    pub base_id: String,
    pub base_snapshot_at: Timestamp,
    #[serde(skip)]
    pub base: Manifest,
    /// In commit order; the last one covers `to`.
    pub segments: Vec<SegmentManifest>,
}

/// `--to-time`: a moment, or the newest covered one.
#[derive(Debug, Clone, Copy)]
pub enum ToTime {
    Latest,
    At(Timestamp),
}

/// Every committed segment of a database, in stream order.
pub async fn list_segments(
    repo: &Repository,
    database: &str,
) -> Result<Vec<SegmentManifest>, StorageError> {
    crate::retention::read_manifests(repo, manifest_keys(repo, database).await?).await
}

/// The index of the first segment a base whose snapshot followed `from` (its
/// `wal_lsn_before`) needs: the last one ending at or before it, since a commit in flight
/// when the snapshot was taken can sit there. Segments before it hold only transactions the
/// base already sees.
pub(crate) fn first_segment_for(segments: &[SegmentManifest], from: u64) -> usize {
    segments
        .iter()
        .rposition(|s| parse_lsn(&s.end_lsn).unwrap_or(0) <= from)
        .unwrap_or(0)
}

/// Chooses the base and the segments for `to`, or says why no restore can reach it.
pub fn plan(
    database: &str,
    backups: &[Manifest],
    segments: Vec<SegmentManifest>,
    to: ToTime,
) -> Result<Plan, PitrError> {
    let covered_until = segments
        .iter()
        .map(|s| s.covered_until)
        .max()
        .ok_or_else(|| PitrError::NoSegments {
            database: database.to_string(),
        })?;
    let to = match to {
        ToTime::Latest => covered_until,
        ToTime::At(t) if t > covered_until => {
            return Err(PitrError::NotCovered {
                database: database.to_string(),
                to: t,
                covered_until,
            })
        }
        ToTime::At(t) => t,
    };
    let bases: Vec<&Manifest> = backups
        .iter()
        .filter(|m| m.database == database && m.continuous_base.is_some())
        .collect();
    let base = bases
        .iter()
        .filter(|m| m.continuous_base.as_ref().is_some_and(|b| b.snapshot_taken_at <= to))
        .max_by_key(|m| m.continuous_base.as_ref().map(|b| b.snapshot_taken_at))
        .ok_or_else(|| PitrError::NoBase {
            database: database.to_string(),
            to,
            why: match bases
                .iter()
                .filter_map(|m| m.continuous_base.as_ref().map(|b| b.snapshot_taken_at))
                .min()
            {
                Some(oldest) => format!(
                    "the oldest backup taken with continuous capture has its snapshot at {oldest}; choose a time after it"
                ),
                None => "no backup was taken since continuous capture was set up (run `dr backup`; its snapshot becomes the first base)".to_string(),
            },
        })?;
    let info = base.continuous_base.as_ref().expect("filtered above");
    let from = parse_lsn(&info.wal_lsn_before).unwrap_or(0);

    // From the first segment the base needs up to the first covering `to`.
    let first = first_segment_for(&segments, from);
    let last = segments
        .iter()
        .position(|s| s.covered_until >= to)
        .expect("covered_until >= to for the newest");
    let chosen: Vec<SegmentManifest> = segments[first..=last.max(first)].to_vec();
    let gap = |why: String| PitrError::Gap {
        database: database.to_string(),
        base: base.id.to_string(),
        why,
    };
    let start = parse_lsn(&chosen[0].start_lsn).unwrap_or(u64::MAX);
    if start > from {
        return Err(gap(format!(
            "the oldest stored changes start at LSN {}, after the base's snapshot at {} (the slot was set up again, or segments were deleted)",
            chosen[0].start_lsn, info.wal_lsn_before
        )));
    }
    let mut reached = 0u64;
    for s in &chosen {
        let (start, end) = (
            parse_lsn(&s.start_lsn).unwrap_or(u64::MAX),
            parse_lsn(&s.end_lsn).unwrap_or(0),
        );
        if reached != 0 && start > reached {
            return Err(gap(format!(
                "no stored segment holds the changes between LSN {} and {}",
                lsn_text(reached),
                s.start_lsn
            )));
        }
        reached = reached.max(end);
    }
    if let Some((from, until)) =
        schema_change_after(&segments, info.snapshot_taken_at).filter(|(from, _)| to > *from)
    {
        let after = bases
            .iter()
            .filter_map(|m| m.continuous_base.as_ref().map(|b| b.snapshot_taken_at))
            .filter(|t| *t >= until)
            .min()
            .map(|t| format!(", or from {t} (the backup taken after it)"))
            .unwrap_or_else(|| {
                ", or after the next backup (the agent takes one when it sees a schema change)"
                    .into()
            });
        return Err(PitrError::SchemaChange {
            database: database.to_string(),
            base: base.id.to_string(),
            from,
            until,
            after,
        });
    }
    Ok(Plan {
        database: database.to_string(),
        to,
        base_id: base.id.to_string(),
        base_snapshot_at: info.snapshot_taken_at,
        base: (*base).clone(),
        segments: chosen,
    })
}

/// A span of time any moment of which `dr restore --to-time` can reach.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Window {
    pub from: Timestamp,
    pub to: Timestamp,
}

/// The restorable windows: from each base's snapshot to the last covered time its segments
/// reach without a gap, merged where they overlap.
pub fn windows(database: &str, backups: &[Manifest], segments: &[SegmentManifest]) -> Vec<Window> {
    let lsn = |s: &str| parse_lsn(s).unwrap_or(0);
    let mut out: Vec<Window> = Vec::new();
    let mut bases: Vec<_> = backups
        .iter()
        .filter(|m| m.database == database)
        .filter_map(|m| m.continuous_base.as_ref())
        .collect();
    bases.sort_by_key(|b| b.snapshot_taken_at);
    for b in bases {
        let from = lsn(&b.wal_lsn_before);
        let first = segments
            .iter()
            .rposition(|s| lsn(&s.end_lsn) <= from)
            .unwrap_or(0);
        if segments.get(first).is_none_or(|s| lsn(&s.start_lsn) > from) {
            continue;
        }
        let (mut reached, mut until) = (0u64, None);
        for s in &segments[first..] {
            if reached != 0 && lsn(&s.start_lsn) > reached {
                break;
            }
            reached = reached.max(lsn(&s.end_lsn));
            until = until.max(Some(s.covered_until));
        }
        // Changes after a schema change do not replay onto this base.
        let until = match schema_change_after(segments, b.snapshot_taken_at) {
            Some((from, _)) => until.map(|u| u.min(from)),
            None => until,
        };
        let Some(to) = until.filter(|t| *t >= b.snapshot_taken_at) else {
            continue;
        };
        match out.last_mut() {
            Some(w) if b.snapshot_taken_at <= w.to => w.to = w.to.max(to),
            _ => out.push(Window {
                from: b.snapshot_taken_at,
                to,
            }),
        }
    }
    out
}

/// The first schema change a base taken at `snapshot_at` may not hold, as the span it
/// committed in: from the previous segment's covered time to the changed segment's.
fn schema_change_after(
    segments: &[SegmentManifest],
    snapshot_at: Timestamp,
) -> Option<(Timestamp, Timestamp)> {
    segments.windows(2).find_map(|pair| {
        let (before, changed) = (&pair[0], &pair[1]);
        (changed.schema_changed && changed.covered_until > snapshot_at)
            .then_some((before.covered_until, changed.covered_until))
    })
}

/// The base snapshot: which transaction ids it sees.
struct Visibility {
    xmin: u64,
    xmax: u64,
    running: Vec<u64>,
}

impl Visibility {
    fn parse(text: &str) -> Option<Visibility> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = parts
            .next()?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().ok())
            .collect::<Option<Vec<u64>>>()?;
        Some(Visibility {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether the base already holds the transaction with this (32-bit) id: its 64-bit
    /// id is the one nearest the snapshot's xmax.
    fn sees(&self, xid: u32) -> bool {
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax.saturating_add(1 << 31) && full >= 1 << 32 {
            full -= 1 << 32;
        } else if full + (1 << 31) < self.xmax {
            full += 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }
}

/// What the replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    /// Transactions replayed onto the base.
    pub transactions: u64,
    /// Transactions in the segments the base already holds.
    pub already_in_base: u64,
    /// Transactions stored twice (a segment read again after a crash), replayed once.
    pub duplicates: u64,
    /// The recovery point reached: the last replayed commit.
    pub reached_commit_at: Option<Timestamp>,
    pub reached_lsn: Option<String>,
    pub sequences_set: u64,
    pub seconds: f64,
}

/// Replays the plan's changes onto `target`, which holds the restored base.
pub async fn apply(
    repo: &Repository,
    identities: Arc<Identities>,
    plan: &Plan,
    target: &Connection,
    staging_dir: &Path,
) -> Result<Applied, PitrError> {
    let clock = std::time::Instant::now();
    let info = plan.base.continuous_base.as_ref().expect("a base");
    let visibility = Visibility::parse(&info.snapshot).ok_or_else(|| PitrError::Gap {
        database: plan.database.clone(),
        base: plan.base_id.clone(),
        why: format!("its recorded snapshot `{}` cannot be read", info.snapshot),
    })?;
    let client = target.connect("dr point-in-time restore").await?;
    // A crash of the target mid-replay means replaying again anyway: no commit needs to
    // wait for its WAL flush.
    client
        .execute(
            "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; SET synchronous_commit = off",
        )
        .await?;
    // As a subscriber does: the target's triggers and rules already ran on the source.
    if let Err(e) = client
        .execute("SET session_replication_role = replica")
        .await
    {
        tracing::warn!(error = %e, "cannot set session_replication_role = replica; the target's triggers fire while changes are replayed");
    }

    let mut state = Replay {
        replayer: Replayer::default(),
        applied: Applied::default(),
        last_commit_lsn: 0,
        current: None,
        batch: String::new(),
        pending: Vec::new(),
        stopped: false,
        sequences: None,
    };
    for segment in &plan.segments {
        let file = fetch_segment(repo, identities.clone(), segment, staging_dir).await?;
        let seg_err = |source: Box<dyn std::error::Error + Send + Sync>| PitrError::Segment {
            segment: segment.id.clone(),
            source,
        };
        let mut frames = Frames::new(BufReader::new(file));
        loop {
            let frame = frames.next_frame().map_err(|e| seg_err(Box::new(e)))?;
            let Some(frame) = frame else { break };
            match frame {
                Frame::Message { data, .. } => {
                    let message = crate::decode::parse(&data).map_err(|e| seg_err(Box::new(e)))?;
                    state
                        .message(&client, &visibility, plan.to, message)
                        .await
                        .map_err(|e| match e {
                            Step::Decode(e) => seg_err(Box::new(e)),
                            Step::Apply(e) => e,
                        })?;
                }
                Frame::Sequences(values) => state.sequences = Some(values),
            }
        }
        if segment.covered_until >= plan.to {
            break;
        }
    }
    state.flush(&client).await.map_err(|e| match e {
        Step::Apply(e) => e,
        Step::Decode(e) => PitrError::Segment {
            segment: "?".into(),
            source: Box::new(e),
        },
    })?;
    if let Some(values) = state.sequences.take() {
        state.applied.sequences_set = set_sequences(&client, &values).await;
    }
    state.applied.seconds = clock.elapsed().as_secs_f64();
    Ok(state.applied)
}

enum Step {
    Decode(DecodeError),
    Apply(PitrError),
}

/// The transaction being replayed.
struct Current {
    commit_lsn: u64,
    commit_at: Option<Timestamp>,
    /// Replayed (else skipped: in the base, or a duplicate).
    replay: bool,
}

struct Replay {
    replayer: Replayer,
    applied: Applied,
    last_commit_lsn: u64,
    current: Option<Current>,
    batch: String,
    /// Transactions whose COMMIT is in `batch`, not yet sent: (commit LSN, commit time).
    pending: Vec<(u64, Option<Timestamp>)>,
    /// A commit after the target time was met: nothing more is replayed.
    stopped: bool,
    /// The values stored with the last segment read.
    sequences: Option<Vec<(String, Option<i64>)>>,
}

impl Replay {
    async fn message(
        &mut self,
        client: &PgClient,
        visibility: &Visibility,
        to: Timestamp,
        message: Message,
    ) -> Result<(), Step> {
        if self.stopped {
            return Ok(());
        }
        match &message {
            Message::Begin {
                final_lsn,
                xid,
                commit_at,
            } => {
                if commit_at.is_some_and(|t| t > to) {
                    self.stopped = true;
                    return Ok(());
                }
                let in_base = visibility.sees(*xid);
                // Commit order is LSN order: one already replayed was stored twice.
                let duplicate = !in_base && *final_lsn <= self.last_commit_lsn;
                if in_base {
                    self.applied.already_in_base += 1;
                } else if duplicate {
                    self.applied.duplicates += 1;
                } else {
                    self.batch.push_str("BEGIN;\n");
                }
                self.current = Some(Current {
                    commit_lsn: *final_lsn,
                    commit_at: *commit_at,
                    replay: !in_base && !duplicate,
                });
                Ok(())
            }
            Message::Commit { commit_lsn, .. } => {
                let Some(current) = self.current.take() else {
                    return Ok(());
                };
                if !current.replay {
                    return Ok(());
                }
                self.batch.push_str("COMMIT;\n");
                self.last_commit_lsn = *commit_lsn;
                self.pending.push((*commit_lsn, current.commit_at));
                if self.batch.len() >= BATCH_BYTES
                    || self.pending.len() as u64 >= BATCH_TRANSACTIONS
                {
                    self.flush(client).await?;
                }
                Ok(())
            }
            _ => {
                let sql = self.replayer.sql(&message).map_err(Step::Decode)?;
                let replaying = self.current.as_ref().is_some_and(|c| c.replay);
                if let (Some(sql), true) = (sql, replaying) {
                    self.batch.push_str(&sql);
                    self.batch.push_str(";\n");
                    if self.batch.len() >= BATCH_BYTES {
                        // Inside a large transaction: it stays open on the target.
                        self.flush(client).await?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Sends the statements batched so far; the transactions committed in them count as
    /// replayed once the server has run them all.
    async fn flush(&mut self, client: &PgClient) -> Result<(), Step> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let sql = std::mem::take(&mut self.batch);
        let pending = std::mem::take(&mut self.pending);
        if let Err(e) = client.execute(&sql).await {
            let _ = client.execute("ROLLBACK").await;
            let open = self.current.as_ref().map(|c| (c.commit_lsn, c.commit_at));
            let span: Vec<_> = pending.iter().copied().chain(open).collect();
            let describe = |t: Option<&(u64, Option<Timestamp>)>| {
                t.map(|(lsn, at)| {
                    format!(
                        "{} (LSN {})",
                        at.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                        lsn_text(*lsn)
                    )
                })
                .unwrap_or_else(|| "?".into())
            };
            return Err(Step::Apply(PitrError::Apply {
                first: describe(span.first()),
                last: describe(span.last()),
                message: match e {
                    PgError::Query { message, .. } => message,
                    other => other.to_string(),
                },
            }));
        }
        if let Some((lsn, at)) = pending.last() {
            self.applied.transactions += pending.len() as u64;
            self.applied.reached_commit_at = *at;
            self.applied.reached_lsn = Some(lsn_text(*lsn));
        }
        Ok(())
    }
}

/// Sets every sequence to at least its stored value (sampled after the target time, so
/// never below what the replayed rows used). Missing sequences are skipped with a warning.
async fn set_sequences(client: &PgClient, values: &[(String, Option<i64>)]) -> u64 {
    let mut set = 0;
    for (name, value) in values {
        let Some(value) = value else { continue };
        match client
            .query(
                "SELECT setval($1::text::regclass, $2, true)",
                &[name, value],
            )
            .await
        {
            Ok(_) => set += 1,
            Err(e) => {
                tracing::warn!(error = %e, "a sequence could not be set (it may not exist in the base)")
            }
        }
    }
    set
}

/// Downloads, verifies and decodes one segment into an anonymous temporary file.
async fn fetch_segment(
    repo: &Repository,
    identities: Arc<Identities>,
    segment: &SegmentManifest,
    staging_dir: &Path,
) -> Result<std::fs::File, PitrError> {
    let key = format!(
        "{}/{}",
        segment_dir(repo, &segment.database, &segment.id),
        segment.object.name
    );
    let reader = repo.storage().open_read(&key).await?;
    let expected = Expected {
        stored_bytes: segment.object.stored_bytes,
        sha256: segment.object.sha256.clone(),
        recipients: segment.recipients.clone(),
    };
    let staging = staging_dir.to_path_buf();
    let id = segment.id.clone();
    tokio::task::spawn_blocking(move || {
        let mut file = tempfile::tempfile_in(&staging)?;
        decode::decode(
            SyncIoBridge::new(reader),
            &identities,
            &expected,
            &mut file,
            &Progress::default(),
        )
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
        file.seek(SeekFrom::Start(0))?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(file)
    })
    .await
    .expect("decode thread panicked")
    .map_err(|source| PitrError::Segment {
        segment: id,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_sees_finished_transactions_only() {
        let v = Visibility::parse("100:110:102,105").unwrap();
        assert!(v.sees(99));
        assert!(v.sees(101));
        assert!(!v.sees(102));
        assert!(!v.sees(105));
        assert!(!v.sees(110));
        assert!(!v.sees(4000));
        // After a wraparound the 32-bit id maps into the snapshot's epoch.
        let v = Visibility::parse("8589934590:8589934600:").unwrap();
        assert!(v.sees(0xFFFF_FFF0)); // epoch 1, just before xmin
        assert!(!v.sees(20)); // epoch 2, after xmax
        assert!(Visibility::parse("nonsense").is_none());
    }
}
