//! Storage backends: a small trait, implemented for a local directory (`file://`) and S3
//! (`s3://`, also MinIO, Garage, Ceph RGW, R2). Keys are relative to the repository root
//! (the directory, or the bucket prefix) and always use `/`.

pub mod file;
#[cfg(any(test, feature = "testing"))]
pub mod refusing;
pub mod s3;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

use crate::config::StorageConfig;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found in {location}")]
    NotFound { key: String, location: String },
    #[error("{op} {key} in {location} failed: {message}")]
    Failed {
        op: &'static str,
        key: String,
        location: String,
        message: String,
    },
    /// The store does not implement this operation (e.g. s3s-fs has no ListMultipartUploads).
    #[error("{op} {key} in {location}: the store does not support this ({message})")]
    Unsupported {
        op: &'static str,
        key: String,
        location: String,
        message: String,
    },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    /// Whether the store lacks the operation, so a caller may skip an optional step.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, StorageError::Unsupported { .. })
    }
}

/// S3 Object Lock retention modes: `governance` (a principal with
/// `s3:BypassGovernanceRetention` may still delete) or `compliance` (nobody can, not even the
/// account's root user, until the date).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Governance,
    Compliance,
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        })
    }
}

/// One object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: Option<jiff::Timestamp>,
}

#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Where this is, for messages: `file:///var/lib/dr/repo` or `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// The configured size of an upload's first parts; later parts grow
    /// (`pipeline::parts::part_size`) so any object fits in S3's 10,000 parts.
    fn part_size(&self) -> usize;

    /// Whether parts must grow to fit a limit on their number (S3's 10,000). A store
    /// without one keeps them at `part_size`, so memory does not grow with the object.
    fn parts_grow(&self) -> bool {
        true
    }

    /// Writes a small object whole (manifests, reports). Readers never see it half-written.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// Writes a small object only if `key` does not exist; `Ok(false)` when it did.
    /// Stores that ignore conditional writes (Garage) overwrite instead: callers that need
    /// exclusivity read the object back (see the agent's lock).
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError>;

    /// Whether `put_if_absent` is known to be atomic here. S3-compatible stores answer the
    /// same whether they honour `If-None-Match` or ignore it (Garage), so only the local
    /// disk can promise it.
    fn atomic_create(&self) -> bool {
        false
    }

    /// Reads a small object whole.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;

    /// Streams an object; memory stays bounded whatever its size.
    async fn open_read(
        &self,
        key: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError>;

    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    /// At most `max` objects under `prefix` whose keys sort after `after`, sorted by key:
    /// a page of a listing too long to hold at once (a bucket of a million uploads).
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut all = self.list(prefix).await?;
        all.retain(|o| after.is_none_or(|a| o.key.as_str() > a));
        all.truncate(max);
        Ok(all)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Multipart uploads started under `prefix` and never completed or aborted (a crash).
    /// Stores without multipart uploads have none: their leftovers are ordinary files.
    async fn pending_uploads(&self, _prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        Ok(Vec::new())
    }

    /// Aborts one upload found by `pending_uploads`.
    async fn abort_pending(&self, _upload: &PendingUpload) -> Result<(), StorageError> {
        Ok(())
    }

    /// Starts a streamed upload; nothing is visible under `key` until `complete`.
    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError>;

    /// Object Lock: `key` can be neither deleted nor overwritten before `until`.
    async fn retain(
        &self,
        key: &str,
        _mode: LockMode,
        _until: jiff::Timestamp,
    ) -> Result<(), StorageError> {
        Err(StorageError::Unsupported {
            op: "lock",
            key: key.to_string(),
            location: self.location(),
            message: "only S3 buckets with Object Lock enabled can lock objects".into(),
        })
    }

    /// Whether the bucket has Object Lock enabled.
    async fn lock_enabled(&self) -> Result<bool, StorageError> {
        Ok(false)
    }
}

#[async_trait]
pub trait Upload: Send {
    /// Adds the next part. May return before the part is stored, with a bounded number in flight.
    async fn put_part(&mut self, data: Bytes) -> Result<(), StorageError>;

    /// Waits for every part and makes the object visible; returns its size.
    async fn complete(self: Box<Self>) -> Result<u64, StorageError>;

    /// Discards everything uploaded so far.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// An upload left behind by a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<jiff::Timestamp>,
}

/// `file:///path` or `s3://bucket/prefix`, validated at config load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum StorageUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl TryFrom<String> for StorageUrl {
    type Error = String;
    /// Errors never repeat a password: the URL is redacted before it is quoted.
    fn try_from(text: String) -> Result<Self, String> {
        // Checked before any parsing, so no later message can quote any part of the secret
        // (`s3://key:se/cret@bucket` would otherwise name `key:se` as a bad bucket).
        if crate::redact::has_password(&text) {
            return Err(format!(
                "storage url `{}`: credentials do not belong in the URL; remove them and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use a profile or role)",
                crate::redact::redact_urls(&text)
            ));
        }
        let shown = crate::redact::redact_urls(&text);
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "storage url `{shown}` must name an absolute path, like file:///var/lib/dr/repo"
                ));
            }
            return Ok(StorageUrl::File(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.contains('@') {
                return Err(
                    "storage url: credentials do not belong in an s3:// URL (`s3://key:secret@bucket`); remove them and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use a profile or role)"
                        .to_string(),
                );
            }
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid_bucket {
                return Err(format!(
                    "storage url `{shown}`: `{bucket}` is not a valid bucket name (3 to 63 lowercase letters, digits, `-`, `.`)"
                ));
            }
            return Ok(StorageUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        Err(format!(
            "unsupported storage url `{shown}`: use file:///path or s3://bucket/prefix"
        ))
    }
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::File(p) => write!(f, "file://{}", p.display()),
            StorageUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StorageUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Opens the configured backend.
pub async fn open(config: &StorageConfig) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(match &config.url {
        StorageUrl::File(root) => Arc::new(file::FileStorage::new(root.clone())),
        StorageUrl::S3 { bucket, prefix } => Arc::new(
            s3::S3Storage::connect(
                bucket.clone(),
                prefix.clone(),
                s3::S3Options {
                    endpoint: config.endpoint.clone(),
                    region: config.region.clone(),
                    path_style: config.path_style,
                    part_size: config.part_size_mib * 1024 * 1024,
                    max_in_flight: config.max_in_flight,
                    idle_timeout: std::time::Duration::from_secs(config.idle_timeout_secs),
                },
            )
            .await?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls_parse_and_explain_mistakes() {
        assert_eq!(
            StorageUrl::try_from("s3://dr-backups/acme/".to_string()).unwrap(),
            StorageUrl::S3 {
                bucket: "dr-backups".into(),
                prefix: "acme".into()
            }
        );
        assert_eq!(
            StorageUrl::try_from("file:///var/lib/dr/repo".to_string()).unwrap(),
            StorageUrl::File("/var/lib/dr/repo".into())
        );
        let e = StorageUrl::try_from("file://relative".to_string()).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = StorageUrl::try_from("gs://b/p".to_string()).unwrap_err();
        assert!(e.contains("unsupported"), "{e}");
        let e = StorageUrl::try_from("s3://B_ad".to_string()).unwrap_err();
        assert!(e.contains("bucket name"), "{e}");
        let e = StorageUrl::try_from("s3://AKIA:wJal/rXy@bucket/p".to_string()).unwrap_err();
        assert!(e.contains("credentials") && !e.contains("wJal"), "{e}");
    }

    #[test]
    fn credentials_in_a_storage_url_are_refused_without_repeating_them() {
        for url in [
            "s3://AKIAEXAMPLE:wJalrXUtnFEMI@dr-backups/acme",
            "s3://AKIAEXAMPLE:wJalrXUtnFEMI@dr-backups",
            "file://AKIAEXAMPLE:wJalrXUtnFEMI@host/var/lib/dr",
            "gs://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/p",
        ] {
            let e = StorageUrl::try_from(url.to_string()).unwrap_err();
            assert!(!e.contains("wJalrXUtnFEMI"), "{url}: {e}");
        }
        let e = StorageUrl::try_from("s3://AKIAEXAMPLE:wJalrXUtnFEMI@dr-backups/acme".to_string())
            .unwrap_err();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    }
}
