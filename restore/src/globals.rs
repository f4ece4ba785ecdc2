//! Applying a backup's globals (roles) to the target server, skipping roles that exist so
//! a restore never changes an existing role's attributes or password.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Stdio;

use dr_core::pg::{Connection, PgError, PgTools};
use dr_core::pipeline::child::ChildError;
use serde::Serialize;

use crate::target::Target;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GlobalsReport {
    pub created: Vec<String>,
    pub skipped_existing: Vec<String>,
    /// Errors psql reported for statements that still failed (e.g. a tablespace path).
    pub errors: Vec<String>,
}

/// The roles that exist on the target's server.
pub async fn existing_roles(target: &Target) -> Result<BTreeSet<String>, PgError> {
    let rows = target
        .admin_session()
        .await?
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Runs the `pg_dumpall --globals-only` script `sql` against the target's server with
/// `psql`, the stock tool for it, leaving the roles in `existing` unchanged.
pub fn apply(
    conn: &Connection,
    tools: &PgTools,
    sql: &str,
    existing: &BTreeSet<String>,
) -> Result<GlobalsReport, PgError> {
    let (script, mut report) = filter(sql, existing);

    let mut child = conn
        .command(&tools.bin("psql"))
        .args(["-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=0"])
        .arg("-d")
        .arg(conn.url.for_argv())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ChildError::Spawn {
            program: "psql".into(),
            source,
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|source| ChildError::Spawn {
            program: "psql".into(),
            source,
        })?;
    let out = child
        .wait_with_output()
        .map_err(|source| ChildError::Spawn {
            program: "psql".into(),
            source,
        })?;
    report.errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("ERROR"))
        .map(|l| conn.clean_stderr(l))
        .collect();
    Ok(report)
}

/// Drops `CREATE ROLE` / `ALTER ROLE` lines for roles in `existing`.
fn filter(sql: &str, existing: &BTreeSet<String>) -> (String, GlobalsReport) {
    let mut report = GlobalsReport::default();
    let mut out = String::with_capacity(sql.len());
    for line in sql.lines() {
        let role = line
            .strip_prefix("CREATE ROLE ")
            .map(|r| (true, r))
            .or_else(|| line.strip_prefix("ALTER ROLE ").map(|r| (false, r)));
        if let Some((create, rest)) = role {
            let name = role_name(rest);
            if existing.contains(&name) {
                if create {
                    report.skipped_existing.push(name);
                }
                continue;
            }
            if create {
                report.created.push(name);
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, report)
}

/// The role name at the start of `rest`: `"Weird Name" WITH ...` or `name;`.
fn role_name(rest: &str) -> String {
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                    continue;
                }
                break;
            }
            name.push(c);
        }
        return name;
    }
    rest.split(|c: char| c == ';' || c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_roles_are_skipped_and_new_ones_kept() {
        let sql = "SET x = 1;\nCREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER;\n\
                   CREATE ROLE app_owner;\nALTER ROLE app_owner WITH LOGIN;\n\
                   CREATE ROLE \"Odd \"\"Name\";\nGRANT app_owner TO \"Odd \"\"Name\";\n";
        let existing = BTreeSet::from(["postgres".to_string()]);
        let (script, report) = filter(sql, &existing);
        assert!(!script.contains("postgres"));
        assert!(script.contains("ALTER ROLE app_owner WITH LOGIN;"));
        assert!(script.contains("GRANT app_owner"));
        assert_eq!(report.created, vec!["app_owner", "Odd \"Name"]);
        assert_eq!(report.skipped_existing, vec!["postgres"]);
    }
}
