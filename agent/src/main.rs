//! `dr`: encrypted, verified PostgreSQL backups and restore drills.
//!
//! This crate owns the command line; each subcommand lives in `cmd/` and parses and applies
//! itself. The work itself is in the library crates (`dr-core`, `dr-restore`, `dr-drills`).

mod cmd;
mod daemon;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dr",
    version,
    about = "Encrypted, verified PostgreSQL backups and restore drills",
    long_about = "dr streams pg_dump through zstd and age encryption to S3 or a local directory, \
keeps daily and monthly backups by retention, tracks RPO, and proves backups restore.\n\n\
Start with `dr keygen`, write /etc/dr/agent.toml (see the README), then `dr config check` \
and `dr backup`. Incident responders: `dr list`, then `dr restore`.",
    propagate_version = true
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "DR_CONFIG", default_value = dr_core::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Log format on stderr: `auto` is human on a terminal and JSON otherwise.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "DR_LOG_FORMAT",
        default_value = "auto"
    )]
    log_format: logging::Format,

    /// More detail in logs (repeat for more); RUST_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Backup(cmd::backup::Args),
    List(cmd::list::Args),
    Restore(Box<cmd::restore::Args>),
    Verify(cmd::verify::Args),
    Prune(cmd::prune::Args),
    Copy(cmd::copy::Args),
    Agent(cmd::agent::Args),
    Drill(cmd::drill::Args),
    Demo(cmd::demo::Args),
    Health(cmd::health::Args),
    /// Webhook notifications.
    #[command(subcommand)]
    Notify(cmd::notify::Command),
    Status(cmd::status::Args),
    Keygen(cmd::keygen::Args),
    /// Validate the configuration and show the schedules it sets.
    #[command(subcommand)]
    Config(cmd::config::Command),
    /// Continuous capture through logical decoding: set up or tear down the source's side.
    #[command(subcommand)]
    Continuous(cmd::continuous::Command),
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Backup(args) => args.run(&cli.config).await,
            Command::List(args) => args.run(&cli.config).await,
            Command::Restore(args) => args.run(&cli.config).await,
            Command::Verify(args) => args.run(&cli.config).await,
            Command::Prune(args) => args.run(&cli.config).await,
            Command::Copy(args) => args.run(&cli.config).await,
            Command::Agent(args) => args.run(&cli.config).await,
            Command::Drill(args) => args.run(&cli.config).await,
            Command::Demo(args) => args.run().await,
            Command::Health(args) => args.run().await,
            Command::Notify(c) => c.run(&cli.config).await,
            Command::Status(args) => args.run(&cli.config).await,
            Command::Keygen(args) => args.run(),
            Command::Config(c) => c.run(&cli.config).await,
            Command::Continuous(c) => c.run(&cli.config).await,
        }
    });
    // Never wait on a stuck blocking task at exit (a child that ignores us, a hung read).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena and rarely returns their memory; with
/// tokio's blocking pool that made an idle agent grow by about 2 MiB per 100 backups. Two
/// arenas keep it flat (measured in bench/RESULTS.md, agent-scale).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// One line per cause, skipping causes whose text the previous lines already said.
fn print_error(e: &anyhow::Error) {
    let mut said = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = dr_core::redact::redact_urls(&cause.to_string());
        if said.contains(&text) {
            continue;
        }
        if i == 0 {
            eprintln!("error: {text}");
        } else {
            eprintln!("  caused by: {text}");
        }
        said.push_str(&text);
    }
}
