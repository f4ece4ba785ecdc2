//! The agent's status page at `/`, loaded in a real headless Chromium: two databases, one
//! within its RPO objective and drilled, one breaching it. The assertions are about what a
//! person sees (computed colours, the text in each row, a visible chart), not the markup.
//!
//! With `DR_UPDATE_SCREENSHOT=1` the test also writes `docs/status-page.png`, the
//! screenshot in the README.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dr_tests::{
    encryption_toml, free_port, http_get, wait_until, write_config, Agent, BedBase, Browser, Dr,
};
use serde_json::Value;

const ENV: &str = "test";
/// A schedule that never fires during the test: the backups are taken by hand.
const NEVER: &str = "0 0 1 1 *";
/// Table names stay inside the encrypted archives: the page must not show them.
const SECRET_TABLE: &str = "payroll_confidential";

fn config_body(base: &BedBase, listen: u16, page: bool) -> String {
    let mut body = encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity));
    body += &format!(
        "[agent]\nlisten = \"127.0.0.1:{listen}\"\ntimezone = \"UTC\"\nstatus_page = {page}\n\n"
    );
    for (db, rpo) in [("app", "1h"), ("billing", "1s")] {
        body += &format!(
            "[[databases]]\nname = \"{db}\"\nurl = \"{}\"\nrpo = \"{rpo}\"\nrto = \"1h\"\n\
             [[databases.schedules]]\nclass = \"daily\"\ncron = \"{NEVER}\"\nkeep = \"30d\"\n\
             [databases.drill]\ntarget = \"ephemeral\"\nchecks = [\"select count(*) > 0 from {SECRET_TABLE}\"]\n\n",
            base.cluster.url(db)
        );
    }
    body
}

fn dr(base: &BedBase, config: &Path) -> Dr {
    base.dr(config)
        .env("PGPASSWORD", base.cluster.password())
        .env("TMPDIR", base.dir().join("tmp"))
}

/// What the browser shows: per row, its name, status text, the status cell's background
/// and the drill text; the summary line; the charts and whether they are on screen.
const LOOK: &str = r#"
const rows = [...document.querySelectorAll('#status tbody tr')].map(tr => {
  const status = tr.querySelector('td.status');
  return {
    name: tr.dataset.name,
    text: tr.innerText,
    status: status.innerText.trim(),
    status_bg: getComputedStyle(status).backgroundColor,
    row_bg: getComputedStyle(tr).backgroundColor,
    drill: tr.cells[5].innerText,
  };
});
const charts = [...document.querySelectorAll('figure.chart')].map(f => {
  const svg = f.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {
    name: f.dataset.name,
    width: box.width,
    height: box.height,
    points: f.querySelectorAll('svg circle').length,
    text: svg ? svg.textContent : '',
  };
});
return {
  title: document.title,
  summary: document.querySelector('#summary').innerText,
  header_border: getComputedStyle(document.querySelector('header')).borderBottomColor,
  scripts: document.scripts.length,
  refresh: (document.querySelector('meta[http-equiv=refresh]') || {}).content,
  rows, charts,
  external: [...document.querySelectorAll('[src],link[href]')].length,
};
"#;

fn row<'a>(look: &'a Value, name: &str) -> &'a Value {
    look["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("the page shows no row for {name}: {look:#}"))
}

#[test]
fn status_page_shows_a_breach_in_red_and_the_drill_rto_with_its_chart() {
    let base = BedBase::file("dr-page-");
    fs::create_dir(base.dir().join("tmp")).expect("create TMPDIR");
    for db in ["app", "billing"] {
        base.cluster.create_db(db);
        base.cluster.psql(
            db,
            &format!("CREATE TABLE {SECRET_TABLE} AS SELECT i AS id, md5(i::text) AS v FROM generate_series(1, 500) AS i"),
        );
    }
    let port = free_port();
    let config = write_config(base.dir(), &base.storage, &config_body(&base, port, true));
    for db in ["app", "billing"] {
        dr(&base, &config)
            .args(["backup", "--database", db])
            .run()
            .assert_one_backup_id();
    }
    let drill = dr(&base, &config)
        .args(["drill", "--database", "app", "--json"])
        .run();
    drill.assert_success();
    let reports: Value = serde_json::from_str(drill.stdout.trim())
        .unwrap_or_else(|e| panic!("dr drill --json is not JSON ({e}):\n{}", drill.stdout));
    let rto = reports[0]["rto_seconds"]
        .as_f64()
        .expect("the report has an RTO");
    // billing's objective is 1 s: by now its newest backup is older than that.
    std::thread::sleep(Duration::from_millis(1500));

    let agent = Agent::start(dr(&base, &config), port);
    let mut page = None;
    wait_until(Duration::from_secs(10), || {
        page = http_get(port, "/");
        page.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    let (code, html) = page.expect("the agent answers /");
    assert_eq!(code, 200, "{html}");
    assert!(
        !html.contains("<script"),
        "the page must work without JavaScript"
    );
    for secret in [
        SECRET_TABLE,
        base.cluster.password(),
        &format!(":{}/", base.cluster.port()),
        "AGE-SECRET-KEY",
    ] {
        assert!(
            !html.contains(secret),
            "the page shows {secret:?}, which no manifest holds in plaintext"
        );
    }

    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{port}/"));
    let look = browser.eval(LOOK);

    assert_eq!(look["scripts"], 0, "{look:#}");
    assert_eq!(look["external"], 0, "no CDN, no external assets: {look:#}");
    assert!(
        look["refresh"]
            .as_str()
            .is_some_and(|r| r.parse::<u32>().is_ok()),
        "the page refreshes itself: {look:#}"
    );
    assert!(
        look["title"].as_str().is_some_and(|t| t.contains(ENV)),
        "{look:#}"
    );

    let billing = row(&look, "billing");
    assert_eq!(billing["status"], "RPO BREACH", "{look:#}");
    assert_eq!(
        billing["status_bg"], "rgb(221, 51, 51)",
        "the breaching row's status is red: {look:#}"
    );
    assert_eq!(billing["row_bg"], "rgb(253, 226, 226)", "{look:#}");
    assert!(
        billing["drill"]
            .as_str()
            .is_some_and(|d| d.contains("no drill yet")),
        "{look:#}"
    );
    assert!(
        look["summary"]
            .as_str()
            .is_some_and(|s| s.contains("1 breaching")),
        "{look:#}"
    );
    assert_eq!(
        look["header_border"], "rgb(221, 51, 51)",
        "a breach turns the page's banner red: {look:#}"
    );

    let app = row(&look, "app");
    assert_eq!(app["status"], "OK", "{look:#}");
    assert_eq!(
        app["status_bg"], "rgb(217, 242, 227)",
        "the healthy row is green: {look:#}"
    );
    let drill_text = app["drill"].as_str().unwrap_or_default();
    assert!(
        drill_text.contains("passed") && drill_text.contains(&format!("RTO {rto:.1} s / 1h 0m")),
        "the app row shows its drill's RTO ({rto:.1} s) against the 1 h objective: {look:#}"
    );

    let charts = look["charts"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        charts.len(),
        1,
        "one chart (only app was drilled): {look:#}"
    );
    let chart = &charts[0];
    assert_eq!(chart["name"], "app", "{look:#}");
    assert!(
        chart["width"].as_f64().unwrap_or(0.0) > 300.0
            && chart["height"].as_f64().unwrap_or(0.0) > 100.0,
        "the chart is on screen: {look:#}"
    );
    assert_eq!(chart["points"], 1, "one point per drill: {look:#}");
    assert!(
        chart["text"]
            .as_str()
            .is_some_and(|t| t.contains("objective 3600 s")),
        "the chart draws the objective: {look:#}"
    );

    let shot = base.dir().join("status-page.png");
    browser.screenshot(&shot);
    let png = fs::read(&shot).expect("read the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    if std::env::var_os("DR_UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        fs::write(&docs, &png).expect("write docs/status-page.png");
    }
    drop(browser);

    // Switched off, `/` is gone and `/metrics` stays.
    write_config(base.dir(), &base.storage, &config_body(&base, port, false));
    agent.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            http_get(port, "/").is_some_and(|(code, _)| code == 404)
        }),
        "with status_page = false the agent still serves /:\n{}",
        agent.log()
    );
    let (code, body) = http_get(port, "/").expect("the agent answers");
    assert!(body.contains("status_page = false"), "{code} {body}");
    assert_eq!(http_get(port, "/metrics").map(|(c, _)| c), Some(200));
}
