//! Writing `dr` configuration files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::garage::Garage;

/// Where a test's `dr` repository lives; renders the config's `[storage]` table.
#[derive(Clone, Debug)]
pub enum Storage {
    /// A `file://` repository rooted at this absolute path.
    File(PathBuf),
    /// An S3 repository: `s3://bucket/prefix` on a custom endpoint, path-style.
    S3 {
        bucket: String,
        prefix: String,
        endpoint: String,
        region: String,
    },
}

impl Storage {
    /// An S3 repository in `garage`'s test bucket under `prefix`.
    pub fn garage(garage: &Garage, prefix: &str) -> Storage {
        Storage::S3 {
            bucket: garage.bucket().to_string(),
            prefix: prefix.to_string(),
            endpoint: garage.endpoint(),
            region: Garage::REGION.to_string(),
        }
    }

    /// The repository URL as written in the config.
    pub fn url(&self) -> String {
        match self {
            Storage::File(root) => format!("file://{}", root.display()),
            Storage::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }

    /// The `[storage]` table.
    pub fn toml(&self) -> String {
        let mut out = format!("[storage]\nurl = {}\n", toml_str(&self.url()));
        if let Storage::S3 {
            endpoint, region, ..
        } = self
        {
            out += &format!(
                "endpoint = {}\nregion = {}\npath_style = true\n",
                toml_str(endpoint),
                toml_str(region)
            );
        }
        out
    }
}

/// Writes `dir/dr.toml` (mode 0600, as it may name secrets) with `environment = "test"`,
/// the `[storage]` table for `storage`, then `extra` verbatim (typically
/// [`encryption_toml`] and [`database_toml`] output, or deliberately broken TOML).
pub fn write_config(dir: &Path, storage: &Storage, extra: &str) -> PathBuf {
    let text = format!("environment = \"test\"\n\n{}\n{extra}", storage.toml());
    let path = dir.join("dr.toml");
    fs::write(&path, text).expect("write dr config");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod dr config");
    path
}

/// An `[encryption]` table with these recipients and, optionally, an identity file.
pub fn encryption_toml(recipients: &[&str], identity_file: Option<&Path>) -> String {
    let list: Vec<String> = recipients.iter().map(|r| toml_str(r)).collect();
    let mut out = format!("[encryption]\nrecipients = [{}]\n", list.join(", "));
    if let Some(identity) = identity_file {
        out += &format!(
            "identity_file = {}\n",
            toml_str(&identity.display().to_string())
        );
    }
    out + "\n"
}

/// A `[[databases]]` entry with a daily schedule, optionally reading the password from
/// `password_file`.
pub fn database_toml(name: &str, url: &str, password_file: Option<&Path>) -> String {
    let mut out = format!(
        "[[databases]]\nname = {}\nurl = {}\nrpo = \"26h\"\nrto = \"1h\"\n",
        toml_str(name),
        toml_str(url)
    );
    if let Some(file) = password_file {
        out += &format!(
            "password_file = {}\n",
            toml_str(&file.display().to_string())
        );
    }
    out + "  [[databases.schedules]]\n  class = \"daily\"\n  cron = \"0 3 * * *\"\n  keep = \"30d\"\n\n"
}

/// A TOML basic string with everything escaped that needs to be.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
