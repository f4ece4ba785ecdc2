//! The read-only status page at `/`: what `dr status` shows, as one HTML page that refreshes
//! itself, with the drill RTO chart of `dr drill history --plot` inline. No JavaScript and
//! no external assets. Everything on it comes from the repository's plaintext manifests
//! and drill reports (never a URL, a credential or an error's text), so anyone who may
//! scrape `/metrics` may see it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dr_core::config::Config;
use dr_core::repo::Repository;
use dr_drills::report::DrillReport;
use jiff::Timestamp;

use crate::cmd::status::{gather, human_duration, Row};

/// The browser reloads the page this often.
const REFRESH_SECONDS: u64 = 30;
/// Renders are shared for this long, so a dashboard wall of browsers costs one listing.
const CACHE_FOR: Duration = Duration::from_secs(5);
/// Amber once the newest recovery point is this far into its objective.
const AT_RISK_FRACTION: f64 = 0.8;

/// The agent's current configuration and repository (replaced on SIGHUP), and the last render.
#[derive(Default)]
pub struct Page {
    source: RwLock<Option<(Arc<Config>, Repository)>>,
    cache: tokio::sync::Mutex<Option<(Instant, Arc<String>)>>,
}

/// What `/` answers.
pub enum Answer {
    Html(Arc<String>),
    /// `[agent] status_page = false`.
    Off,
    /// The agent has not opened its repository yet.
    Starting,
}

impl Page {
    /// The configuration to render from (at start and after every reload).
    pub fn set_source(&self, config: Arc<Config>, repo: Repository) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = Some((config, repo));
        if let Ok(mut cache) = self.cache.try_lock() {
            *cache = None;
        }
    }

    pub async fn answer(&self) -> Answer {
        let source = self
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((config, repo)) = source else {
            return Answer::Starting;
        };
        if !config.agent.status_page {
            return Answer::Off;
        }
        let mut cache = self.cache.lock().await;
        if let Some((at, html)) = cache.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return Answer::Html(html.clone());
            }
        }
        let now = Timestamp::now();
        let rows = gather(&config, &repo, now).await;
        let drills = dr_drills::report::history(&repo, None).await;
        let html = Arc::new(match (rows, drills) {
            (Ok(rows), Ok(drills)) => render(&config, &rows, &drills, now),
            (Err(e), _) => {
                tracing::warn!(error = %format!("{e:#}"), "status page: cannot read the repository");
                unreadable(&config, now)
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "status page: cannot read the drill reports");
                unreadable(&config, now)
            }
        });
        *cache = Some((Instant::now(), html.clone()));
        Answer::Html(html)
    }
}

/// How a row looks: its CSS class and the word a person reads.
fn rpo_look(r: &Row) -> (&'static str, &'static str) {
    match (r.rpo_status, r.rpo_seconds, r.rpo_objective_seconds) {
        ("breach", ..) => ("breach", "RPO BREACH"),
        ("no_backup", _, Some(_)) => ("breach", "NO BACKUP"),
        ("no_backup", _, None) => ("unknown", "no backup"),
        ("ok", Some(rpo), Some(objective)) if rpo as f64 > objective as f64 * AT_RISK_FRACTION => {
            ("warn", "AT RISK")
        }
        ("ok", ..) => ("ok", "OK"),
        _ => ("unknown", "no objective"),
    }
}

fn render(config: &Config, rows: &[Row], drills: &[DrillReport], now: Timestamp) -> String {
    let tz = config.agent.timezone.0.clone();
    let when = |t: Timestamp| {
        t.to_zoned(tz.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    };
    let env = config.environment.as_str();
    let breaching = rows.iter().filter(|r| rpo_look(r).0 == "breach").count();
    let at_risk = rows.iter().filter(|r| rpo_look(r).0 == "warn").count();
    let failed_drills = rows
        .iter()
        .filter(|r| {
            r.last_drill
                .as_ref()
                .is_some_and(|d| !d.passed || d.rto_breached)
        })
        .count();

    let mut out = head(env);
    let mut problems = Vec::new();
    if breaching > 0 {
        problems.push(format!("{breaching} breaching the RPO objective"));
    }
    if failed_drills > 0 {
        problems.push(format!(
            "{failed_drills} whose last drill failed or was over its RTO"
        ));
    }
    let (banner, summary) = if !problems.is_empty() {
        ("breach", problems.join(", "))
    } else if at_risk > 0 {
        ("warn", format!("{at_risk} close to the RPO objective"))
    } else {
        (
            "ok",
            "every recovery point within its objective".to_string(),
        )
    };
    let _ = writeln!(
        out,
        "<header class=\"{banner}\"><h1>dr · {}</h1><p id=\"summary\">{} protected: {}</p>\
         <p class=\"small\">As of {}; this page refreshes every {REFRESH_SECONDS} s.</p></header>",
        esc(env),
        rows.len(),
        esc(&summary),
        esc(&when(now)),
    );

    out.push_str(
        "<table id=\"status\"><thead><tr><th>Name</th><th>Last backup</th><th>RPO / objective</th>\
         <th>Status</th><th>Next run</th><th>Last drill (RTO / objective)</th><th>Copies</th></tr></thead><tbody>\n",
    );
    for r in rows {
        let (class, word) = rpo_look(r);
        let last = match (&r.last_backup_id, r.last_backup_at) {
            (Some(id), Some(at)) => {
                let mut s = format!(
                    "{}<br><span class=\"small\">{}</span>",
                    esc(&when(at)),
                    esc(id)
                );
                if let Some(c) = r.changes_covered_until {
                    let _ = write!(
                        s,
                        "<br><span class=\"small\">+ changes to {}</span>",
                        esc(&when(c))
                    );
                }
                s
            }
            _ => "none yet".to_string(),
        };
        let rpo = format!(
            "{} / {}",
            r.rpo_seconds.map_or_else(|| "–".into(), human_duration),
            r.rpo_objective_seconds
                .map_or_else(|| "none".into(), human_duration)
        );
        let drill = match &r.last_drill {
            None => "<span class=\"unknown\">no drill yet</span>".to_string(),
            Some(d) => {
                let (c, verdict) = match (d.passed, d.rto_breached) {
                    (false, _) => ("bad", "FAILED"),
                    (true, true) => ("bad", "RTO BREACH"),
                    (true, false) => ("good", "passed"),
                };
                format!(
                    "<span class=\"{c}\">{verdict}</span> {}<br>RTO <b class=\"rto\">{:.1} s</b> / {}",
                    esc(&when(d.at)),
                    d.rto_seconds,
                    d.rto_objective_seconds
                        .map_or_else(|| "none".into(), |o| human_duration(o.round() as i64))
                )
            }
        };
        let copies = if r.copies.is_empty() {
            "–".to_string()
        } else {
            r.copies
                .iter()
                .map(|c| {
                    let c_class = match c.rpo_status {
                        "ok" => "good",
                        "no_objective" => "unknown",
                        _ => "bad",
                    };
                    format!(
                        "{}: <span class=\"{c_class}\">{}</span> {}",
                        esc(&c.repository),
                        esc(&c.rpo_status.replace('_', " ")),
                        c.rpo_seconds.map(human_duration).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let _ = writeln!(
            out,
            "<tr class=\"{class}\" data-name=\"{name}\"><td><b>{name}</b><br><span class=\"small\">{kind}</span></td>\
             <td>{last}</td><td>{rpo}</td><td class=\"status\">{word}</td><td>{next}</td><td>{drill}</td><td>{copies}</td></tr>",
            name = esc(&r.database),
            kind = r.kind,
            next = esc(r.next_runs.first().map_or("–", String::as_str)),
        );
    }
    out.push_str("</tbody></table>\n");

    let mut by_name: BTreeMap<&str, Vec<DrillReport>> = BTreeMap::new();
    for d in drills {
        by_name
            .entry(d.database.as_str())
            .or_default()
            .push(d.clone());
    }
    if !by_name.is_empty() {
        out.push_str("<h2>Restore drills: RTO against objective</h2>\n");
    }
    for (name, reports) in &by_name {
        let _ = writeln!(
            out,
            "<figure class=\"chart\" data-name=\"{}\">{}<figcaption>{} drill{} of {}; green passed within the objective, red failed or over it.</figcaption></figure>",
            esc(name),
            dr_drills::report::plot_svg(reports, &format!("{env}/{name}: drill RTO")),
            reports.len(),
            if reports.len() == 1 { "" } else { "s" },
            esc(name),
        );
    }
    out.push_str("</body></html>\n");
    out
}

fn unreadable(config: &Config, now: Timestamp) -> String {
    let mut out = head(config.environment.as_str());
    let _ = writeln!(
        out,
        "<header class=\"breach\"><h1>dr · {}</h1><p id=\"summary\">The repository cannot be read right now; \
         see the agent's log (journalctl -u dr-agent) and run <code>dr status</code>.</p>\
         <p class=\"small\">As of {}; this page refreshes every {REFRESH_SECONDS} s.</p></header></body></html>",
        esc(config.environment.as_str()),
        now.strftime("%Y-%m-%d %H:%M:%S UTC"),
    );
    out
}

fn head(env: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dr · {}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }}
header {{ margin: 0 -1.5em 1em; padding: .6em 1.5em; border-bottom: 4px solid; }}
header.ok {{ border-color: #2a6; }} header.warn {{ border-color: #e90; }} header.breach {{ border-color: #d33; }}
h1 {{ margin: .2em 0; font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; vertical-align: top; padding: .45em .6em; border-bottom: 1px solid #ddd; }}
th {{ background: #f4f4f4; font-weight: 600; }}
tr.ok td.status {{ background: #d9f2e3; color: #135; }}
tr.warn {{ background: #fff4dc; }} tr.warn td.status {{ background: #ffd98a; }}
tr.breach {{ background: #fde2e2; }} tr.breach td.status {{ background: #d33; color: white; font-weight: 700; }}
tr.unknown td.status {{ color: #666; }}
.good {{ color: #17803d; font-weight: 600; }} .bad {{ color: #c01f1f; font-weight: 700; }} .unknown {{ color: #666; }}
.small {{ font-size: .85em; color: #555; }}
figure.chart {{ margin: 1em 0; }} figure.chart svg {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
</style></head><body>
"#,
        esc(env)
    )
}

/// HTML-escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &'static str, rpo: Option<i64>, objective: Option<i64>) -> Row {
        Row {
            kind: "database",
            environment: "prod".into(),
            database: "app".into(),
            last_backup_id: None,
            last_backup_at: None,
            changes_covered_until: None,
            restorable_windows: Vec::new(),
            rpo_seconds: rpo,
            rpo_objective_seconds: objective,
            rpo_status: status,
            next_runs: Vec::new(),
            last_drill: None,
            copies: Vec::new(),
        }
    }

    #[test]
    fn colours_follow_the_objective() {
        assert_eq!(rpo_look(&row("ok", Some(100), Some(1000))).0, "ok");
        assert_eq!(rpo_look(&row("ok", Some(900), Some(1000))).0, "warn");
        assert_eq!(rpo_look(&row("breach", Some(1001), Some(1000))).0, "breach");
        assert_eq!(rpo_look(&row("no_backup", None, Some(1000))).0, "breach");
        assert_eq!(rpo_look(&row("no_backup", None, None)).0, "unknown");
        assert_eq!(rpo_look(&row("no_objective", Some(5), None)).0, "unknown");
    }

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
