//! `dr notify test`: prove the webhooks are wired before an incident needs them.

use std::path::Path;
use std::process::ExitCode;

use dr_core::config::NotifyEvent;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Send a test event to every [[notify]] webhook and report each delivery.
    Test,
}

impl Command {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let config = super::load_config(config_path)?;
        if config.notify.is_empty() {
            anyhow::bail!(
                "{} configures no [[notify]] webhooks",
                config_path.display()
            );
        }
        let notifier = crate::daemon::notify::Notifier::new(config.notify.clone());
        let event = crate::daemon::notify::Event {
            event: NotifyEvent::Test,
            environment: config.environment.to_string(),
            database: None,
            message: "test notification from dr notify test".into(),
            at: jiff::Timestamp::now(),
            backup_id: None,
        };
        let mut failed = false;
        for (i, result) in notifier.send_and_wait(event).await {
            match result {
                Ok(()) => println!("webhook #{}: delivered", i + 1),
                Err(e) => {
                    failed = true;
                    println!("webhook #{}: FAILED {e}", i + 1);
                }
            }
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
