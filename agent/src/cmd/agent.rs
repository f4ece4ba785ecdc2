//! `dr agent`: run the daemon.

use std::path::Path;
use std::process::ExitCode;

/// Run the long-running agent: scheduled backups, retention, RPO, metrics.
///
/// Backs up each configured database on its schedules ([agent] timezone), prunes after
/// each good backup, tracks RPO, serves /healthz and /metrics on [agent] listen, and
/// notifies [[notify]] webhooks. SIGTERM aborts jobs in flight cleanly and exits; SIGHUP
/// reloads the config (an invalid one is rejected and the running one kept). Under systemd
/// it reports readiness (Type=notify), pings the watchdog and keeps STATUS= current.
#[derive(clap::Args)]
pub struct Args {}

impl Args {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        crate::daemon::run(config_path.to_path_buf()).await
    }
}
