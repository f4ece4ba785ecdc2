//! `dr config check`: validate the configuration and show what it will do.

use std::path::Path;
use std::process::ExitCode;

use dr_core::config::{Config, DirectorySource, DrillTarget};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate the config file and the secret files it names (readable, not world-readable),
    /// and print each database's next scheduled runs. Exits 1 when anything needs fixing.
    Check {
        /// How many upcoming runs to show per schedule.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

impl Command {
    pub async fn run(self, config_path: &Path) -> anyhow::Result<ExitCode> {
        let Command::Check { runs } = self;
        let config = super::load_config(config_path)?;
        let mut problems = print_summary(&config, config_path, runs);
        problems.extend(object_lock_problems(&config).await);
        problems.extend(source_problems(&config).await);
        if problems.is_empty() {
            println!("\n{}: OK", config_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "error: {}: {} problem(s) to fix before backups can run:",
            config_path.display(),
            problems.len()
        );
        for p in &problems {
            eprintln!("  - {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// For each repository that sets `object_lock`: asks its bucket whether Object Lock is
/// enabled (the only check here that reaches the network, and only then).
async fn object_lock_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let names = std::iter::once(dr_core::config::PRIMARY)
        .chain(config.copies.iter().map(|c| c.name.as_str()));
    for name in names {
        let Some(storage) = config.repository(name) else {
            continue;
        };
        let Some(mode) = storage.object_lock else {
            continue;
        };
        let bucket = storage.url.to_string();
        let enabled = match dr_core::storage::open(storage).await {
            Ok(s) => s.lock_enabled().await,
            Err(e) => Err(e),
        };
        match enabled {
            Ok(true) => println!("repository {name} ({bucket}): Object Lock enabled, objects locked in {mode} mode"),
            Ok(false) => problems.push(format!(
                "repository {name} ({bucket}) sets object_lock = \"{mode}\" but the bucket does not have Object Lock enabled: \
                 create the bucket with it (aws s3api create-bucket --object-lock-enabled-for-bucket …) or enable it on a versioned bucket \
                 (aws s3api put-object-lock-configuration --object-lock-configuration ObjectLockEnabled=Enabled …); \
                 until then every backup would fail to lock"
            )),
            Err(e) => problems.push(format!(
                "repository {name} ({bucket}) sets object_lock = \"{mode}\" but its Object Lock configuration cannot be read ({e}); \
                 a store that does not implement Object Lock (Garage, for one) cannot make backups immutable"
            )),
        }
    }
    problems
}

/// For each directory read from S3: lists one key, as its backups will.
async fn source_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for dir in &config.directories {
        let DirectorySource::S3(source) = dir.source() else {
            continue;
        };
        // Lists a page and reads the first object in it (not a folder marker), as a backup.
        let readable = async {
            let store = dr_core::storage::open(source).await?;
            let page = store.list_page("", None, 100).await?;
            match page
                .iter()
                .find(|o| !o.key.is_empty() && !o.key.ends_with('/'))
            {
                Some(o) => store.open_read(&o.key).await.map(|_| true),
                None => Ok(false),
            }
        };
        match readable.await {
            Ok(true) => println!("directory {} ({}): listed and read", dir.name, source.url),
            Ok(false) => println!(
                "directory {} ({}): listed, but holds no objects yet",
                dir.name, source.url
            ),
            Err(e) => problems.push(format!(
                "directory {} reads {} but cannot ({e}); the agent needs s3:ListBucket on the bucket and s3:GetObject on the prefix",
                dir.name, source.url
            )),
        }
    }
    problems
}

/// Checks the secret files `config` names the way backups, restores and drills will read
/// them; returns what is wrong, each with its fix.
fn secret_file_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for db in &config.databases {
        if let Some(path) = &db.password_file {
            if let Err(e) = dr_core::pg::Connection::new(&db.url, Some(path)) {
                problems.push(format!("database {}: password_file: {e}", db.name));
            }
        }
        let Some(drill) = &db.drill else { continue };
        if let Some(path) = &drill.password_file {
            let checked = match &drill.target {
                DrillTarget::Server(url) => dr_core::pg::Connection::new(url, Some(path))
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                DrillTarget::Ephemeral => dr_core::keys::check_not_world_readable(path, "password")
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = checked {
                problems.push(format!("database {}: drill password_file: {e}", db.name));
            }
        }
    }
    if let Some(id) = &config.encryption.identity_file {
        if let Err(e) = dr_core::keys::Identities::from_file(id) {
            problems.push(format!("[encryption] identity_file: {e}"));
        }
    }
    problems
}

/// Prints what the config will do; returns the problems found in the secret files it names.
fn print_summary(config: &Config, path: &Path, runs: usize) -> Vec<String> {
    let tz = &config.agent.timezone;
    let now = jiff::Timestamp::now().to_zoned(tz.0.clone());
    let problems = secret_file_problems(config);
    println!("{}: parsed", path.display());
    println!("environment: {}", config.environment);
    println!("storage:     {}", config.storage.url);
    let recipients = config.recipients().map(|r| r.len()).unwrap_or(0);
    if recipients == 0 {
        println!("encryption:  NO RECIPIENTS: backups will be refused until [encryption] recipients is set");
    } else {
        println!("encryption:  age, {recipients} recipient(s)");
    }
    if let Some(id) = &config.encryption.identity_file {
        let bad = problems
            .iter()
            .any(|p| p.starts_with("[encryption] identity_file"));
        let state = if bad {
            "PROBLEM: see below"
        } else {
            "readable"
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
    problems
}
