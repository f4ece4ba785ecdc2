//! Exact row counts of every user table: taken in a backup's exported snapshot, and again in
//! a drill's restored database, so a drill proves the restore complete table by table.
//!
//! Tables are keyed by the server's own quoting (`format('%I.%I', schema, table)`), which is
//! also a valid SQL name: nothing is split or quoted by hand. Counting runs in transactions of
//! [`BATCH`] tables so it holds few locks at a time, each transaction importing the same
//! snapshot when there is one.

use std::collections::BTreeMap;

use super::{quote_literal, PgClient, PgError};

/// Tables counted per transaction: bounds the locks held (and the lock table used) at once.
const BATCH: usize = 500;

/// Every table whose rows pg_dump dumps: ordinary tables and partitions outside the system
/// schemas (other sessions' temporary tables cannot be read, and are not dumped).
const TABLES: &str = "SELECT format('%I.%I', n.nspname, c.relname), n.nspname || '.' || c.relname \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' \
     ORDER BY 1";

/// Row counts keyed by quoted name; `plain` maps the unquoted `schema.table` form that
/// backups before this version recorded to the quoted one.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RowCounts {
    pub counts: BTreeMap<String, u64>,
    pub plain: BTreeMap<String, String>,
}

impl RowCounts {
    /// The count of a table recorded under `key`, quoted or (older backups) plain.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.counts.get(key).copied().or_else(|| {
            self.plain
                .get(key)
                .and_then(|quoted| self.counts.get(quoted))
                .copied()
        })
    }
}

/// Counts every table; with `snapshot`, as that exported snapshot saw them.
pub async fn count_rows(client: &PgClient, snapshot: Option<&str>) -> Result<RowCounts, PgError> {
    // Role settings must not cut counting short; a lock held by DDL waits a while, not forever.
    client
        .execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SET lock_timeout = '5min'",
        )
        .await?;
    let begin = match snapshot {
        Some(id) => format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(id)
        ),
        None => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY".to_string(),
    };
    client.execute(&begin).await?;
    let rows = client.query(TABLES, &[]).await?;
    let tables: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut out = RowCounts::default();
    for (i, (quoted, plain)) in tables.iter().enumerate() {
        if i > 0 && i % BATCH == 0 {
            client.execute("COMMIT").await?;
            client.execute(&begin).await?;
        }
        // `quoted` is the server's own quoting of the name: safe to splice.
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM ONLY {quoted}"), &[])
            .await?
            .get(0);
        out.counts.insert(quoted.clone(), n as u64);
        out.plain.insert(plain.clone(), quoted.clone());
    }
    client.execute("COMMIT").await?;
    Ok(out)
}
