//! Drill reports: one JSON object per drill at `<env>/<db>/drills/<drill-id>.json`.
//!
//! Reports name checks by number, never by their SQL, and give row-count mismatches as a
//! count: the repository holds nothing that describes the database's content.

use bytes::Bytes;
use dr_core::repo::Repository;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

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
    pub stages: Stages,
    pub checks: Vec<Check>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stages {
    pub prepare: f64,
    pub fetch: f64,
    pub decrypt_decompress: f64,
    pub restore: f64,
    pub checks: f64,
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
            stages: Stages::default(),
            checks: vec![],
            error: None,
        }
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
