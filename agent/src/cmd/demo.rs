//! `dr demo`: the whole loop on a laptop in under a minute, with nothing to set up.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use dr_core::config::Config;
use dr_core::pg::{ConnUrl, Connection};
use dr_drills::ephemeral::EphemeralCluster;
use indicatif::HumanBytes;

/// Try dr end to end: a throwaway PostgreSQL with sample data, a file:// repository and a
/// fresh age key in a temporary directory; one backup, one restore drill, then `dr status`.
///
/// Everything is removed afterwards unless --keep is given (the directory is printed).
/// Needs PostgreSQL server binaries (Debian: postgresql-15); as root the throwaway servers
/// run as the `postgres` user.
#[derive(clap::Args)]
pub struct Args {
    /// Keep the directory (config, key, repository, cluster data) and print where it is.
    #[arg(long)]
    keep: bool,

    /// Unprivileged user for the throwaway clusters when running as root.
    #[arg(long, default_value = "postgres")]
    run_as: String,
}

const SEED: &str = "
create table customers (id bigint primary key, name text not null, email text, created timestamptz default now());
insert into customers select g, 'customer ' || g, 'c' || g || '@example.com' from generate_series(1, 50000) g;
create table orders (id bigserial primary key, customer bigint references customers, total numeric(12,2), items jsonb);
insert into orders (customer, total, items)
  select 1 + g % 50000, (g % 997) * 1.25, jsonb_build_object('sku', 'SKU-' || g % 300, 'qty', g % 7)
  from generate_series(1, 200000) g;
create index on orders (customer);
";

impl Args {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let clock = Instant::now();
        let step = |what: &str| eprintln!("==> [{:>4.1} s] {what}", clock.elapsed().as_secs_f64());

        step("starting a throwaway PostgreSQL with sample data");
        let run_as = self.run_as.clone();
        let source = tokio::task::spawn_blocking(move || EphemeralCluster::start(15, &run_as))
            .await
            .expect("start panicked")
            .context(
                "dr demo needs PostgreSQL server binaries (Debian: apt-get install postgresql-15)",
            )?;
        let admin = Connection::new(
            &ConnUrl::try_from(source.url("postgres")).map_err(anyhow::Error::msg)?,
            None,
        )?;
        let shop = admin.for_database("shop");
        admin
            .connect("dr demo")
            .await?
            .execute("create database shop")
            .await?;
        shop.connect("dr demo").await?.execute(SEED).await?;

        let dir = tempfile::Builder::new().prefix("dr-demo-").tempdir()?;
        let work = dir.path().to_path_buf();
        step("making an age key and a file:// repository");
        let key = dr_core::keys::generate();
        let identity = work.join("identity.txt");
        dr_core::keys::write_new_identity(&identity, &key)?;
        let config_path = work.join("agent.toml");
        std::fs::write(
            &config_path,
            format!(
                r#"environment = "demo"

[storage]
url = "file://{repo}"

[encryption]
recipients = ["{recipient}"]
identity_file = "{identity}"

[[databases]]
name = "shop"
url = "{url}"
rpo = "26h"
rto = "10m"

  [[databases.schedules]]
  class = "daily"
  cron = "0 3 * * *"
  keep = "30d"

  [databases.drill]
  target = "ephemeral"
  run_as = "{run_as}"
  checks = ["select count(*) = 50000 from customers", "select sum(total) > 0 from orders"]
"#,
                repo = work.join("repo").display(),
                recipient = key.recipient,
                identity = identity.display(),
                url = source.url("shop"),
                run_as = self.run_as,
            ),
        )?;
        let config = Config::load(&config_path)?;
        let repo = super::open_repo(&config).await?;
        let db = &config.databases[0];

        step("dr backup: pg_dump | zstd | age -> file:// repository");
        let manifest = dr_core::backup::run(
            &repo,
            &config,
            db,
            vec!["daily".into()],
            &Default::default(),
        )
        .await?;
        let (raw, stored) = manifest.database_bytes();
        eprintln!(
            "    backup {}: {} dumped, {} stored",
            manifest.id,
            HumanBytes(raw),
            HumanBytes(stored)
        );

        step("dr drill: restore into a second throwaway cluster, check, time it");
        let identities = Arc::new(dr_core::keys::Identities::from_file(&identity)?);
        let report =
            dr_drills::run::run(&repo, &config, db, identities, Default::default()).await?;
        super::drill::print_report(&report);

        step("dr status");
        super::status::Args::for_demo().run(&config_path).await?;

        drop(source);
        if self.keep {
            let kept = dir.keep();
            eprintln!(
                "\nKept everything in {} (try: DR_CONFIG={}/agent.toml dr list). The sample database's cluster was stopped.",
                kept.display(),
                kept.display()
            );
        } else {
            eprintln!("\nCleaned up. Run `dr demo --keep` to keep the repository, key and config.");
        }
        step("done");
        Ok(if report.passed && !report.rto_breached {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}
