//! A held snapshot for `pg_dump --snapshot`, the exact row counts taken in it, and its
//! position in the change stream (for continuous capture's point-in-time restore).
//!
//! The exporting session does nothing but hold the snapshot: it opens a repeatable-read
//! transaction, exports its snapshot and waits, immune to role-level `lock_timeout`,
//! `statement_timeout` and `idle_in_transaction_session_timeout`. Counting runs on a second
//! session that imports the snapshot, so whatever happens to the counts (an error, a lock
//! wait, a cancel) cannot end the snapshot pg_dump depends on. Counting is best effort: a
//! failure is recorded in the backup, never a reason to fail it.

use std::collections::BTreeMap;

use crate::manifest::BaseSnapshot;
use crate::pg::counts::{count_rows, RowCounts};
use crate::pg::{Canceller, Connection, PgClient, PgError};

pub struct HeldSnapshot {
    client: PgClient,
    /// The exported snapshot id for `pg_dump --snapshot`.
    pub id: String,
    /// Where the snapshot sits in the change stream, when asked for (continuous capture).
    pub base: Option<BaseSnapshot>,
}

impl HeldSnapshot {
    /// Opens the snapshot; `with_base` also records its position in the change stream.
    pub async fn open(conn: &Connection, with_base: bool) -> Result<Self, PgError> {
        let client = conn.connect("dr snapshot").await?;
        // Before the snapshot exists: no transaction it misses can commit earlier than this.
        let wal_lsn_before: Option<String> = if with_base {
            Some(
                client
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await?
                    .get(0),
            )
        } else {
            None
        };
        client
            .execute(
                "SET statement_timeout = 0; SET lock_timeout = 0; \
                 SET idle_in_transaction_session_timeout = 0; \
                 BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            )
            .await?;
        let id: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await?
            .get(0);
        let base = match wal_lsn_before {
            Some(wal_lsn_before) => {
                // In a repeatable-read transaction this is the snapshot just exported.
                let row = client
                    .query_one("SELECT pg_current_snapshot()::text, clock_timestamp()", &[])
                    .await?;
                let taken: std::time::SystemTime = row.get(1);
                Some(BaseSnapshot {
                    snapshot: row.get(0),
                    wal_lsn_before,
                    snapshot_taken_at: jiff::Timestamp::try_from(taken)
                        .unwrap_or_else(|_| jiff::Timestamp::now()),
                })
            }
            None => None,
        };
        Ok(HeldSnapshot { client, id, base })
    }

    /// The tables this snapshot sees, with their sizes, for splitting the dump.
    pub async fn tables(&self) -> Result<Vec<crate::split::Table>, PgError> {
        crate::split::list_tables(&self.client).await
    }

    /// Starts counting rows in this snapshot on a session of its own.
    pub async fn start_counting(&self, conn: &Connection) -> Counting {
        let client = match conn.connect("dr row counts").await {
            Ok(c) => c,
            Err(e) => {
                return Counting {
                    canceller: None,
                    task: Some(tokio::spawn(
                        async move { Err(CountsUnavailable::from(&e)) },
                    )),
                }
            }
        };
        let canceller = client.canceller();
        let id = self.id.clone();
        let task = tokio::spawn(async move {
            count_rows(&client, Some(&id)).await.map_err(|e| {
                // The server's words (which may name a table) stay in the local log.
                tracing::warn!(error = %e, "could not count rows; drills of this backup will report row counts unavailable");
                CountsUnavailable::from(&e)
            })
        });
        Counting {
            canceller: Some(canceller),
            task: Some(task),
        }
    }

    /// Ends the transaction, releasing the snapshot. Only after pg_dump and counting are done.
    pub async fn close(self) {
        if let Err(e) = self.client.execute("COMMIT").await {
            tracing::debug!(error = %e, "the snapshot session ended with an error");
        }
    }
}

/// Why a backup has no row counts. Holds a category and a SQLSTATE only: the server's
/// message can name tables, and the reason is stored in the manifest (invariant 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountsUnavailable(pub String);

impl From<&PgError> for CountsUnavailable {
    fn from(e: &PgError) -> Self {
        CountsUnavailable(match e {
            PgError::Query {
                sqlstate: Some(code),
                ..
            } => format!("counting failed with SQLSTATE {code}"),
            PgError::Query { .. } => "the counting session failed".into(),
            PgError::Connect { .. } => "could not open a counting session".into(),
            _ => "counting failed".into(),
        })
    }
}

/// Row counting in progress. Dropped unfinished (a cancelled or timed-out backup), it stops
/// the task, which closes its session.
pub struct Counting {
    canceller: Option<Canceller>,
    task: Option<tokio::task::JoinHandle<Result<RowCounts, CountsUnavailable>>>,
}

impl Counting {
    pub async fn finish(mut self) -> Result<BTreeMap<String, u64>, CountsUnavailable> {
        match self.task.take().expect("not finished yet").await {
            Ok(Ok(counts)) => Ok(counts.counts),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CountsUnavailable("the counting task ended".into())),
        }
    }

    /// Stops at once: cancels the running count on the server and closes the session, so no
    /// transaction stays open on the source after a failed backup.
    pub async fn abort(mut self) {
        if let Some(c) = &self.canceller {
            c.cancel().await;
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
