//! One file per subcommand, each parsing and applying itself.

pub mod agent;
pub mod backup;
pub mod config;
pub mod continuous;
pub mod copy;
pub mod demo;
pub mod drill;
pub mod health;
pub mod keygen;
pub mod list;
pub mod notify;
pub mod prune;
pub mod restore;
pub mod status;
pub mod verify;

use std::path::Path;

use anyhow::Context;
use dr_core::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use dr_core::repo::Repository;

/// Loads the config, with a hint when the default path simply does not exist.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    match Config::load(path) {
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let hint = if path == Path::new(DEFAULT_CONFIG_PATH) {
                " (pass --config FILE or set DR_CONFIG)"
            } else {
                ""
            };
            anyhow::bail!("config file {} does not exist{hint}", path.display())
        }
        other => Ok(other?),
    }
}

pub async fn open_repo(config: &Config) -> anyhow::Result<Repository> {
    open_repository(config, None).await
}

/// The repository `name` (`--repository`): `primary` ([storage], the default) or a copy's.
pub async fn open_repository(config: &Config, name: Option<&str>) -> anyhow::Result<Repository> {
    let name = name.unwrap_or(dr_core::config::PRIMARY);
    let Some(storage) = config.repository(name) else {
        let known: Vec<&str> = std::iter::once(dr_core::config::PRIMARY)
            .chain(config.copies.iter().map(|c| c.name.as_str()))
            .collect();
        anyhow::bail!(
            "no repository named `{name}`: the config has {}",
            known.join(", ")
        );
    };
    let opened = dr_core::storage::open(storage)
        .await
        .with_context(|| format!("cannot open the repository {}", storage.url))?;
    Ok(Repository::new(opened, config.environment.as_str()).with_lock(config.object_lock(name)))
}

/// Cancels `token` on the first SIGINT or SIGTERM, saying `what` happens next.
pub fn cancel_on_signal(token: tokio_util::sync::CancellationToken, what: &'static str) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("signal received: {what}");
        token.cancel();
    });
}

/// `a, b, c`, or `none`: the configured names an error lists.
pub fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = names.collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}
