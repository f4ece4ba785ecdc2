//! Applying a backup's globals (roles) to the target server, skipping every statement that
//! would change a role that already exists (attributes, password, settings, memberships,
//! grants), so a restore never alters an existing role.

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
    /// Statements left out because they would change an existing role (`ALTER ROLE`,
    /// `GRANT ... TO` it, comments).
    pub skipped_statements: u64,
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

/// Removes every statement that would change a role in `existing`: its `CREATE ROLE`,
/// `ALTER ROLE` (attributes, password, settings), `COMMENT`/`SECURITY LABEL ON ROLE`, and any
/// `GRANT`/`REVOKE` whose grantee it is (memberships and privileges). Granting an existing
/// role to a role this restore creates is kept: that changes only the new role.
fn filter(sql: &str, existing: &BTreeSet<String>) -> (String, GlobalsReport) {
    let mut report = GlobalsReport::default();
    let mut out = String::with_capacity(sql.len());
    for stmt in statements(sql) {
        match touched_roles(stmt) {
            Touch::Creates(name) if existing.contains(&name) => {
                report.skipped_existing.push(name);
                continue;
            }
            Touch::Creates(name) => report.created.push(name),
            Touch::Alters(names) if names.iter().any(|n| existing.contains(n)) => {
                report.skipped_statements += 1;
                continue;
            }
            Touch::AllRoles => {
                report.skipped_statements += 1;
                continue;
            }
            Touch::Alters(_) | Touch::Nothing => {}
        }
        out.push_str(stmt);
    }
    (out, report)
}

/// Splits a psql script into statements, each with its leading whitespace and comments and
/// its `;`. Quotes and `--` comments are honoured, so a role comment or password holding a
/// `;` or a newline never splits (and a crafted one never injects) a statement. A psql
/// meta-command (`\restrict ...`) ends at its line's end.
fn statements(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut at_start = true;
    while i < bytes.len() {
        let c = bytes[i];
        if at_start && c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            i = sql[i..].find('\n').map_or(bytes.len(), |n| i + n + 1);
            continue;
        }
        if at_start && c == b'\\' {
            let end = sql[i..].find('\n').map_or(bytes.len(), |n| i + n + 1);
            out.push(&sql[start..end]);
            start = end;
            i = end;
            continue;
        }
        at_start = false;
        match c {
            b'\'' | b'"' => {
                // A doubled quote inside is just two adjacent quoted runs.
                i = sql[i + 1..]
                    .find(c as char)
                    .map_or(bytes.len(), |n| i + 1 + n + 1);
            }
            b';' => {
                i += 1;
                out.push(&sql[start..i]);
                start = i;
                at_start = true;
            }
            _ => i += 1,
        }
    }
    if start < sql.len() {
        out.push(&sql[start..]);
    }
    out
}

/// What one statement does to roles.
#[derive(Debug, PartialEq, Eq)]
enum Touch {
    Creates(String),
    Alters(Vec<String>),
    /// `ALTER ROLE ALL ...`: every role, existing ones included.
    AllRoles,
    Nothing,
}

fn touched_roles(stmt: &str) -> Touch {
    let tokens = tokens(stmt);
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => w.to_ascii_uppercase(),
        _ => String::new(),
    };
    let name_at = |i: usize| tokens.get(i).and_then(Token::name);
    match (word(0).as_str(), word(1).as_str()) {
        ("CREATE", "ROLE" | "USER" | "GROUP") => name_at(2).map_or(Touch::Nothing, Touch::Creates),
        ("ALTER", "ROLE" | "USER" | "GROUP") => match tokens.get(2) {
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("all") => Touch::AllRoles,
            _ => Touch::Alters(name_at(2).into_iter().collect()),
        },
        ("DROP", "ROLE" | "USER" | "GROUP") => Touch::Alters(
            tokens[2..]
                .iter()
                .filter_map(Token::name)
                .filter(|n| n != "if" && n != "exists")
                .collect(),
        ),
        ("COMMENT", "ON") if word(2) == "ROLE" => Touch::Alters(name_at(3).into_iter().collect()),
        ("SECURITY", "LABEL") => {
            let on = (2..tokens.len()).find(|&i| word(i) == "ON" && word(i + 1) == "ROLE");
            Touch::Alters(on.and_then(|i| name_at(i + 2)).into_iter().collect())
        }
        ("GRANT", _) | ("REVOKE", _) => {
            let to = if word(0) == "GRANT" { "TO" } else { "FROM" };
            let Some(from) = (1..tokens.len()).find(|&i| word(i) == to) else {
                return Touch::Nothing;
            };
            let mut grantees = Vec::new();
            for t in &tokens[from + 1..] {
                match t {
                    Token::Word(w)
                        if ["GRANTED", "WITH", "CASCADE", "RESTRICT"]
                            .iter()
                            .any(|k| w.eq_ignore_ascii_case(k)) =>
                    {
                        break
                    }
                    Token::Punct(',') => {}
                    Token::Punct(_) => break,
                    t => grantees.extend(t.name()),
                }
            }
            Touch::Alters(grantees)
        }
        _ => Touch::Nothing,
    }
}

#[derive(Debug)]
enum Token {
    /// A bare word, as written (PostgreSQL folds it to lower case as a name).
    Word(String),
    Quoted(String),
    Literal,
    Punct(char),
}

impl Token {
    /// The role name this token spells, if it is an identifier.
    fn name(&self) -> Option<String> {
        match self {
            Token::Word(w) => Some(w.to_lowercase()),
            Token::Quoted(q) => Some(q.clone()),
            _ => None,
        }
    }
}

/// Words, quoted identifiers, literals and punctuation of one statement, comments skipped.
fn tokens(stmt: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                let mut text = String::new();
                while let Some(c2) = chars.next() {
                    if c2 == c {
                        if chars.peek() == Some(&c) {
                            chars.next();
                            text.push(c);
                            continue;
                        }
                        break;
                    }
                    text.push(c2);
                }
                out.push(if c == '"' {
                    Token::Quoted(text)
                } else {
                    Token::Literal
                });
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' || n == '$' {
                        word.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(word));
            }
            c => out.push(Token::Punct(c)),
        }
    }
    out
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
        assert!(!script.contains("postgres"), "{script}");
        assert!(script.contains("ALTER ROLE app_owner WITH LOGIN;"));
        assert!(script.contains("GRANT app_owner"));
        assert_eq!(report.created, vec!["app_owner", "Odd \"Name"]);
        assert_eq!(report.skipped_existing, vec!["postgres"]);
    }

    #[test]
    fn nothing_that_changes_an_existing_role_is_kept() {
        let sql = r#"\restrict abc
SET standard_conforming_strings = on;
--
-- Roles
--

CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:a;b';
CREATE ROLE newbie;
ALTER ROLE newbie WITH LOGIN;
COMMENT ON ROLE app IS 'multi
line; DROP ROLE x;';
SECURITY LABEL FOR dummy ON ROLE "app" IS 'x';
ALTER ROLE app SET search_path TO 'a', public;
ALTER ROLE app IN DATABASE db SET work_mem TO '1MB';
ALTER ROLE ALL SET log_statement TO 'all';

--
-- Role memberships
--

GRANT admins TO app GRANTED BY postgres;
GRANT admins TO newbie WITH INHERIT TRUE GRANTED BY postgres;
GRANT newbie TO app;
GRANT SET ON PARAMETER work_mem TO app;
REVOKE admins FROM "APP";
GRANT ALL ON TABLESPACE ts TO newbie, App;
\unrestrict abc
"#;
        let existing = BTreeSet::from(["app".to_string(), "admins".to_string()]);
        let (script, report) = filter(sql, &existing);
        let kept: Vec<&str> = statements(&script)
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(
            kept,
            vec![
                "\\restrict abc",
                "SET standard_conforming_strings = on;",
                "CREATE ROLE newbie;",
                "ALTER ROLE newbie WITH LOGIN;",
                "GRANT admins TO newbie WITH INHERIT TRUE GRANTED BY postgres;",
                "REVOKE admins FROM \"APP\";",
                "\\unrestrict abc",
            ],
            "{script}"
        );
        assert_eq!(report.created, vec!["newbie"]);
        assert_eq!(report.skipped_existing, vec!["app"]);
        assert_eq!(report.skipped_statements, 10);
    }
}
