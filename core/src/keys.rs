//! age keys: recipients (public, on every backup host) and identities (private, only where
//! restores and drills run). Both are read from the same files the stock `age` CLI uses.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: `{value}` is not an age X25519 recipient (it should start with `age1`; `dr keygen` prints one)")]
    BadRecipient { origin: String, value: String },
    #[error("identity file {path} holds no usable age identity: {reason}")]
    BadIdentity { path: PathBuf, reason: String },
    #[error(
        "{what} file {path} is readable by every user (mode {mode:o}); run `chmod 600 {path}`"
    )]
    WorldReadable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("cannot write identity file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The public keys backups are encrypted to.
#[derive(Debug, Clone, Default)]
pub struct Recipients(Vec<age::x25519::Recipient>);

impl Recipients {
    /// Parses each non-blank, non-`#` entry; `origin` names where they came from in errors.
    pub fn parse_all<'a>(
        entries: impl Iterator<Item = &'a str>,
        origin: &str,
    ) -> Result<Self, KeyError> {
        entries
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                age::x25519::Recipient::from_str(l).map_err(|_| KeyError::BadRecipient {
                    origin: origin.to_string(),
                    value: l.chars().take(80).collect(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Recipients)
    }

    /// Reads a recipients file in the `age -R` format.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            what: "recipients",
            path: path.to_owned(),
            source,
        })?;
        Self::parse_all(text.lines(), &format!("recipients file {}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &age::x25519::Recipient> {
        self.0.iter()
    }

    /// The recipients as strings, as recorded in manifests.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

/// Private keys that can decrypt backups.
pub struct Identities(Vec<Box<dyn age::Identity + Send + Sync>>);

impl Identities {
    /// Loads an `age` identity file, refusing one every user on the host can read.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        check_not_world_readable(path, "identity")?;
        let file = age::IdentityFile::from_file(path.display().to_string()).map_err(|source| {
            KeyError::Read {
                what: "identity",
                path: path.to_owned(),
                source,
            }
        })?;
        let ids = file.into_identities().map_err(|e| KeyError::BadIdentity {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if ids.is_empty() {
            return Err(KeyError::BadIdentity {
                path: path.to_owned(),
                reason: "the file is empty".into(),
            });
        }
        Ok(Identities(ids))
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.0.iter().map(|i| i.as_ref() as &dyn age::Identity)
    }
}

/// Fails when `path` is readable by all users: secrets must be at most group-readable.
pub fn check_not_world_readable(path: &Path, what: &'static str) -> Result<(), KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(KeyError::WorldReadable {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A new identity, as the text of an `age-keygen` file, and its recipient.
pub struct GeneratedKey {
    pub file_text: String,
    pub recipient: String,
}

pub fn generate() -> GeneratedKey {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    let file_text = format!(
        "# created: {created} by dr\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    GeneratedKey {
        file_text,
        recipient,
    }
}

/// Writes a fresh identity to `path` with mode 0600, refusing to overwrite an existing file.
pub fn write_new_identity(path: &Path, key: &GeneratedKey) -> Result<(), KeyError> {
    let werr = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(key.file_text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.txt");
        let key = generate();
        write_new_identity(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        Identities::from_file(&path).unwrap();
        let r =
            Recipients::parse_all([key.recipient.as_str(), "# c", ""].into_iter(), "t").unwrap();
        assert_eq!(r.len(), 1);
        assert!(
            write_new_identity(&path, &key).is_err(),
            "must not overwrite"
        );
    }

    #[test]
    fn world_readable_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.txt");
        write_new_identity(&path, &generate()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identities::from_file(&path).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
