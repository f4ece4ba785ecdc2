//! A held snapshot: one `psql` session in a repeatable-read transaction that exports its
//! snapshot for `pg_dump --snapshot` and counts every table's rows in that same snapshot.
//! The counts let a drill prove a restore is complete, table by table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use crate::pg::{quote_ident, Connection, PgError, PgTools};
use crate::pipeline::child::ChildError;

pub struct SnapshotSession {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    conn: Connection,
    /// The exported snapshot id for `pg_dump --snapshot`.
    pub id: String,
}

fn io_err(e: std::io::Error) -> PgError {
    PgError::Child(ChildError::Spawn {
        program: "psql".into(),
        source: e,
    })
}

impl SnapshotSession {
    pub fn open(conn: &Connection, tools: &PgTools) -> Result<Self, PgError> {
        let mut child = conn
            .psql(tools)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err)?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut session = SnapshotSession {
            child,
            stdin,
            stdout,
            conn: conn.clone(),
            id: String::new(),
        };
        let id = session.ask(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\nSELECT pg_export_snapshot();\n",
            1,
        )?;
        session.id = id.into_iter().next().unwrap_or_default();
        Ok(session)
    }

    /// Sends `sql` and reads `lines` result lines; on failure reports psql's stderr.
    fn ask(&mut self, sql: &str, lines: usize) -> Result<Vec<String>, PgError> {
        let sent = self
            .stdin
            .write_all(sql.as_bytes())
            .and_then(|_| self.stdin.flush());
        let mut out = Vec::with_capacity(lines);
        if sent.is_ok() {
            for _ in 0..lines {
                let mut line = String::new();
                match self.stdout.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => out.push(line.trim_end().to_string()),
                }
            }
        }
        if out.len() == lines {
            return Ok(out);
        }
        let _ = self.child.kill();
        let output = std::mem::replace(&mut self.child, dummy_child()).wait_with_output();
        let stderr = output
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .unwrap_or_default();
        Err(PgError::Connect {
            database: self.conn.url.dbname().to_string(),
            url: self.conn.url.to_string(),
            message: self.conn.clean_stderr(&stderr),
        })
    }

    /// Exact row counts of every user table, in the exported snapshot.
    pub fn row_counts(&mut self) -> Result<BTreeMap<String, u64>, PgError> {
        let tables = self.ask_all(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname !~ '^pg_toast' ORDER BY 1;\n",
        )?;
        let mut sql = String::new();
        for t in &tables {
            let (schema, name) = t.split_once('.').unwrap_or(("public", t));
            sql.push_str(&format!(
                "SELECT count(*) FROM ONLY {}.{};\n",
                quote_ident(schema),
                quote_ident(name)
            ));
        }
        let counts = self.ask(&sql, tables.len())?;
        Ok(tables
            .into_iter()
            .zip(counts)
            .map(|(t, c)| (t, c.parse().unwrap_or(0)))
            .collect())
    }

    /// Reads a result of unknown length, ended by a marker line.
    fn ask_all(&mut self, sql: &str) -> Result<Vec<String>, PgError> {
        const END: &str = "__dr_end__";
        let mut out = Vec::new();
        self.stdin
            .write_all(format!("{sql}SELECT '{END}';\n").as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(io_err)?;
        loop {
            let line = self.ask("", 1)?.remove(0);
            if line == END {
                return Ok(out);
            }
            out.push(line);
        }
    }

    /// Ends the transaction, releasing the snapshot.
    pub fn close(mut self) -> Result<(), PgError> {
        let _ = self.stdin.write_all(b"COMMIT;\n");
        drop(self.stdin);
        let status = self.child.wait().map_err(io_err)?;
        if !status.success() {
            tracing::warn!("the snapshot session ended with {status}");
        }
        Ok(())
    }
}

/// Placeholder swapped in when the real child is consumed for its output.
fn dummy_child() -> Child {
    std::process::Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn true")
}
