//! Drill reports: one JSON object per drill at `<env>/<db>/drills/<drill-id>.json`.
//!
//! Reports name checks by number, never by their SQL, give row-count mismatches as a count,
//! and describe a failure by category, counts and exit codes ([`failure_summary`]), never by
//! an error's text: the repository holds nothing that describes the database's content.
//! Details go to the local log only.

use bytes::Bytes;
use dr_core::pipeline::child::ChildError;
use dr_core::pipeline::decode::DecodeError;
use dr_core::repo::Repository;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::DrillError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillReport {
    pub format: u32,
    pub id: String,
    pub environment: String,
    pub database: String,
    pub backup_id: Option<String>,
    pub backup_started_at: Option<Timestamp>,
    /// `ephemeral` or `server`.
    pub target: String,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub passed: bool,
    /// Wall time from the drill's start to all checks passing (or to the failure).
    pub rto_seconds: f64,
    pub rto_objective_seconds: Option<f64>,
    pub rto_breached: bool,
    /// False when the scratch cluster ran without durability (`durability = "off"`): the
    /// restore was faster than one into a real server would be.
    #[serde(default = "representative")]
    pub rto_representative: bool,
    pub stages: Stages,
    pub checks: Vec<Check>,
    /// Why the drill failed, as [`failure_summary`] words it: a category, counts and exit
    /// codes only.
    pub error: Option<String>,
    /// Continuous capture: the moment the drill restored to (the newest stored change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<Timestamp>,
    /// How old that moment was when the drill started: the RPO an incident would have had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved_rpo_seconds: Option<f64>,
}

fn representative() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stages {
    pub prepare: f64,
    pub fetch: f64,
    pub decrypt_decompress: f64,
    pub restore: f64,
    /// Continuous capture: replaying the changes after the backup, up to the latest.
    #[serde(default)]
    pub replay: f64,
    pub checks: f64,
    /// A split backup: the restore's pre-data, data (archives side by side) and post-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_sections: Option<RestoreSections>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreSections {
    pub pre_data: f64,
    pub data: f64,
    pub post_data: f64,
    /// How many data archives were streamed side by side.
    pub data_archives: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

pub fn report_key(repo: &Repository, database: &str, id: &str) -> String {
    format!("{}/{database}/drills/{id}.json", repo.environment())
}

pub async fn store(
    repo: &Repository,
    r: &DrillReport,
) -> Result<(), dr_core::storage::StorageError> {
    let mut body = serde_json::to_vec_pretty(r).expect("report serializes");
    body.push(b'\n');
    repo.storage()
        .put(&report_key(repo, &r.database, &r.id), Bytes::from(body))
        .await
}

/// Every drill of `database` (or of every database), oldest first.
pub async fn history(
    repo: &Repository,
    database: Option<&str>,
) -> Result<Vec<DrillReport>, dr_core::storage::StorageError> {
    let prefix = match database {
        Some(db) => format!("{}/{db}/drills/", repo.environment()),
        None => format!("{}/", repo.environment()),
    };
    let mut out = Vec::new();
    for o in repo.storage().list(&prefix).await? {
        let parts: Vec<&str> = o.key.split('/').collect();
        if parts.len() != 4 || parts[2] != "drills" || !o.key.ends_with(".json") {
            continue;
        }
        let body = repo.storage().get(&o.key).await?;
        match serde_json::from_slice::<DrillReport>(&body) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(key = %o.key, error = %e, "skipping an unreadable drill report")
            }
        }
    }
    out.sort_by_key(|r| r.started_at);
    Ok(out)
}

/// The RTO of each drill against the objective, as a self-contained SVG line chart.
pub fn plot_svg(reports: &[DrillReport], title: &str) -> String {
    const W: f64 = 720.0;
    const H: f64 = 320.0;
    const L: f64 = 60.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let objective = reports
        .iter()
        .filter_map(|r| r.rto_objective_seconds)
        .fold(0.0, f64::max);
    let max_rto = reports.iter().map(|r| r.rto_seconds).fold(0.0, f64::max);
    let y_max = (objective.max(max_rto) * 1.15).max(1.0);
    let n = reports.len().max(2) as f64;
    let x = |i: usize| L + (W - L - R) * i as f64 / (n - 1.0);
    let y = |v: f64| T + (H - T - B) * (1.0 - v / y_max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{L}" y="22" font-size="15">{}</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="12" y="{}" transform="rotate(-90 12 {})">RTO (s)</text>
"#,
        escape(title),
        H - B,
        W - R,
        H - B,
        H - B,
        (H - T - B) / 2.0 + T,
        (H - T - B) / 2.0 + T
    );
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text><line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#eee\"/>\n",
            L - 6.0,
            y(v) + 4.0,
            v,
            y(v),
            W - R,
            y(v)
        ));
    }
    if objective > 0.0 {
        svg.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#d33\" stroke-dasharray=\"6 4\"/><text x=\"{2}\" y=\"{3}\" fill=\"#d33\" text-anchor=\"end\">objective {objective:.0} s</text>\n",
            y(objective),
            W - R,
            W - R - 4.0,
            y(objective) - 6.0
        ));
    }
    let points: Vec<String> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(r.rto_seconds)))
        .collect();
    if points.len() > 1 {
        svg.push_str(&format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#2a6\" stroke-width=\"2\"/>\n",
            points.join(" ")
        ));
    }
    for (i, r) in reports.iter().enumerate() {
        let color = if r.passed && !r.rto_breached {
            "#2a6"
        } else {
            "#d33"
        };
        svg.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{} {:.1} s{}</title></circle>\n",
            x(i),
            y(r.rto_seconds),
            r.started_at.strftime("%Y-%m-%d %H:%M"),
            r.rto_seconds,
            if r.passed { "" } else { " FAILED" }
        ));
    }
    if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
        svg.push_str(&format!(
            "<text x=\"{L}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            H - B + 18.0,
            first.started_at.strftime("%Y-%m-%d"),
            W - R,
            H - B + 18.0,
            last.started_at.strftime("%Y-%m-%d")
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// What a report says about a failed drill: a category, with counts and exit codes where
/// known, and never an error's text. That text can carry table names, row values or SQL
/// (pg_restore's `COPY failed for table "…": … Failing row contains (…)`), which must not
/// reach the repository (invariant 4); the full error goes to the local log only.
pub fn failure_summary(e: &DrillError) -> String {
    use dr_restore::RestoreError as R;
    match e {
        DrillError::Scratch(_) => "the scratch target could not be prepared (see the log)".into(),
        DrillError::SameServer(_) => {
            "refused: the drill target is the backed-up server itself (same system_identifier)"
                .into()
        }
        DrillError::Exists(_) => {
            "refused: the drill's database already exists on the scratch server".into()
        }
        DrillError::NotConfigured(_) => "the database has no [databases.drill] section".into(),
        DrillError::Pg(_) | DrillError::Restore(R::Pg(_)) => {
            "a connection to or query on PostgreSQL failed (see the log)".into()
        }
        DrillError::Storage(_) | DrillError::Restore(R::Storage(_)) => {
            "reading the repository failed (see the log)".into()
        }
        DrillError::Restore(R::Select(dr_restore::select::SelectError::NoBackups { .. })) => {
            "no backup to drill".into()
        }
        DrillError::Restore(R::NoIdentity | R::Keys(_)) => {
            "no usable identity (private key) to decrypt the backup".into()
        }
        DrillError::Restore(R::Missing { .. } | R::NoObject { .. }) => {
            "an object of the backup is missing from the repository".into()
        }
        DrillError::Restore(R::Decode { source, .. }) => decode_summary(source).into(),
        DrillError::Restore(R::NoSpace {
            needed, available, ..
        }) => {
            format!("not enough staging space: {available} bytes free, the archive needs {needed}")
        }
        DrillError::Restore(R::Child(c)) => child_summary(c),
        DrillError::Restore(R::Cancelled) => "cancelled".into(),
        DrillError::Restore(_) => "the restore failed (see the log)".into(),
        DrillError::Replay(_) => {
            "replaying the captured changes onto the backup failed (see the log)".into()
        }
    }
}

fn decode_summary(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::WrongKey { .. } => {
            "the identity cannot decrypt the backup (it was encrypted to other recipients)"
        }
        DecodeError::BadHeader(_) | DecodeError::Corrupt { .. } => {
            "the backup is corrupted or truncated: decrypting or decompressing it failed"
        }
        DecodeError::HashMismatch { .. } => {
            "the backup is corrupted: its sha256 differs from the manifest's"
        }
        DecodeError::SizeMismatch { .. } => {
            "the backup is corrupted or truncated: its size differs from the manifest's"
        }
        DecodeError::Fetch { .. } => "reading the backup from the repository failed",
        DecodeError::Write(_) => "writing the staged archive failed",
    }
}

/// `pg_restore failed (exit code 1; errors ignored on restore: 3)`: the tool, how it ended, and the
/// number of errors it counted; none of its messages.
fn child_summary(e: &ChildError) -> String {
    const KNOWN: &[&str] = &["pg_restore", "pg_restore --list", "psql", "pg_dumpall"];
    let tool = |p: &str| {
        KNOWN
            .iter()
            .find(|k| **k == p)
            .copied()
            .unwrap_or("a PostgreSQL tool")
    };
    match e {
        ChildError::Spawn { program, .. } => format!("{} could not be started", tool(program)),
        ChildError::Failed {
            program,
            status,
            stderr,
        } => {
            let mut s = format!("{} failed ({}", tool(program), status_words(status));
            if let Some(n) = errors_ignored(stderr) {
                s += &format!("; errors ignored on restore: {n}");
            }
            s + ")"
        }
    }
}

/// `exit code N` or `killed by signal N (NAME)`, re-made from its numbers.
fn status_words(status: &str) -> String {
    let number = |rest: &str| {
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse::<i32>().ok())
    };
    if let Some(code) = status.strip_prefix("exit code ").and_then(number) {
        format!("exit code {code}")
    } else if let Some(sig) = status.strip_prefix("killed by signal ").and_then(number) {
        format!("killed by signal {sig}")
    } else {
        "unknown status".into()
    }
}

/// The count in pg_restore's `errors ignored on restore: N`.
fn errors_ignored(stderr: &str) -> Option<u64> {
    let (_, rest) = stderr.split_once("errors ignored on restore: ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rto: f64, passed: bool) -> DrillReport {
        let t: Timestamp = "2026-11-22T05:00:00Z".parse().unwrap();
        DrillReport {
            format: 1,
            id: "x".into(),
            environment: "e".into(),
            database: "app".into(),
            backup_id: None,
            backup_started_at: None,
            target: "ephemeral".into(),
            started_at: t,
            finished_at: t,
            passed,
            rto_seconds: rto,
            rto_objective_seconds: Some(60.0),
            rto_breached: rto > 60.0,
            rto_representative: true,
            stages: Stages::default(),
            checks: vec![],
            error: None,
            recovery_point: None,
            achieved_rpo_seconds: None,
        }
    }

    #[test]
    fn failures_are_summarised_without_their_text() {
        let stderr =
            "pg_restore: error: COPY failed for table \"patient_records\": ERROR:  new row \
                      violates check constraint DETAIL:  Failing row contains (1, ZEBRA-4471). \
                      | pg_restore: warning: errors ignored on restore: 3";
        let e = DrillError::Restore(dr_restore::RestoreError::Child(ChildError::Failed {
            program: "pg_restore".into(),
            status: "exit code 1".into(),
            stderr: stderr.into(),
        }));
        assert!(
            e.to_string().contains("patient_records"),
            "the test needs the leak"
        );
        assert_eq!(
            failure_summary(&e),
            "pg_restore failed (exit code 1; errors ignored on restore: 3)"
        );
        let e = DrillError::Restore(dr_restore::RestoreError::Child(ChildError::Failed {
            program: "patient_records".into(),
            status: "exit code 2: patient_records".into(),
            stderr: String::new(),
        }));
        assert_eq!(
            failure_summary(&e),
            "a PostgreSQL tool failed (exit code 2)"
        );
        let e = DrillError::Restore(dr_restore::RestoreError::Decode {
            backup: "b".into(),
            object: "data".into(),
            source: DecodeError::Corrupt {
                what: "age",
                offset: 7,
                detail: "x".into(),
            },
        });
        assert!(failure_summary(&e).contains("corrupt"));
        let e = DrillError::Scratch("initdb failed: patient_records".into());
        assert!(!failure_summary(&e).contains("patient_records"));
    }

    #[test]
    fn reports_without_the_representative_flag_read_as_representative() {
        let mut json = serde_json::to_value(report(1.0, true)).unwrap();
        json.as_object_mut().unwrap().remove("rto_representative");
        let r: DrillReport = serde_json::from_value(json).unwrap();
        assert!(r.rto_representative);
    }

    #[test]
    fn plot_has_one_point_per_drill_and_the_objective() {
        let svg = plot_svg(
            &[report(20.0, true), report(75.0, true), report(30.0, false)],
            "app <rto>",
        );
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("objective 60 s"));
        assert!(svg.contains("app &lt;rto&gt;"));
        assert_eq!(
            svg.matches("#d33\"><title>").count(),
            2,
            "breach and failure are red"
        );
    }
}
