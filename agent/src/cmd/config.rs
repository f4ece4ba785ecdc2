//! `dr config check`: validate the configuration and show what it will do.

use std::path::Path;
use std::process::ExitCode;

use dr_core::config::Config;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate the config file and print each database's next scheduled runs.
    Check {
        /// How many upcoming runs to show per schedule.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

impl Command {
    pub fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let Command::Check { runs } = self;
        let config = super::load_config(config_path)?;
        print_summary(&config, config_path, runs);
        Ok(ExitCode::SUCCESS)
    }
}

fn print_summary(config: &Config, path: &Path, runs: usize) {
    let tz = &config.agent.timezone;
    let now = jiff::Timestamp::now().to_zoned(tz.0.clone());
    println!("{}: OK", path.display());
    println!("environment: {}", config.environment);
    println!("storage:     {}", config.storage.url);
    let recipients = config.recipients().map(|r| r.len()).unwrap_or(0);
    if recipients == 0 {
        println!("encryption:  NO RECIPIENTS: backups will be refused until [encryption] recipients is set");
    } else {
        println!("encryption:  age, {recipients} recipient(s)");
    }
    if let Some(id) = &config.encryption.identity_file {
        let state = match dr_core::keys::Identities::from_file(id) {
            Ok(_) => "readable".to_string(),
            Err(e) => format!("PROBLEM: {e}"),
        };
        println!("identity:    {} ({state})", id.display());
    }
    println!("schedules in time zone {}", tz.name());
    for db in &config.databases {
        let objective = |d: &Option<dr_core::config::Duration>| {
            d.as_ref().map_or("-".to_string(), |d| d.to_string())
        };
        println!(
            "\ndatabase {} ({}), rpo {}, rto {}",
            db.name,
            db.url,
            objective(&db.rpo),
            objective(&db.rto)
        );
        if db.schedules.is_empty() {
            println!("  no schedules: only `dr backup` by hand");
        }
        for s in &db.schedules {
            let next: Vec<String> = s
                .cron
                .next_runs(&now, runs)
                .iter()
                .map(|z| z.strftime("%Y-%m-%d %H:%M %Z").to_string())
                .collect();
            println!(
                "  {:<10} cron `{}`, keep {}; next: {}",
                s.class.as_str(),
                s.cron.as_str(),
                s.keep,
                next.join(", ")
            );
        }
    }
}
