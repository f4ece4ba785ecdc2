//! `s3://` repositories through aws-sdk-s3: AWS S3 and S3-compatible stores (custom endpoint,
//! region, path-style addressing). Credentials come from the standard AWS chain (environment,
//! profile, web identity / IRSA, instance metadata).
//!
//! Large objects go up as multipart uploads of fixed-size parts with a bounded number in
//! flight; every failure aborts the upload, and a completed upload is checked with a HEAD
//! (a 200 reply to CompleteMultipartUpload can carry an error body on some stores).

use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::task::JoinSet;

use super::{ObjectInfo, Storage, StorageError, Upload};

#[derive(Debug, Clone)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub part_size: usize,
    pub max_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    prefix: String,
    opts: S3Options,
}

impl S3Storage {
    pub async fn connect(
        bucket: String,
        prefix: String,
        opts: S3Options,
    ) -> Result<Self, StorageError> {
        let region = RegionProviderChain::first_try(opts.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new("us-east-1"));
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(opts.path_style)
            // Since SDK 1.69 a CRC32 goes on every write by default; some S3-compatible
            // stores reject it, and we check our own sha256 anyway.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    // An idle socket times out; a long, moving transfer does not.
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(endpoint) = &opts.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        Ok(S3Storage {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix,
            opts,
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn error<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        s3_error(
            op,
            key,
            &self.location(),
            self.opts.endpoint.as_deref(),
            &self.bucket,
            e,
        )
    }
}

fn s3_error<E, R>(
    op: &'static str,
    key: &str,
    location: &str,
    endpoint: Option<&str>,
    bucket: &str,
    e: SdkError<E, R>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = e.code().map(str::to_string);
    let message = match code.as_deref() {
        Some("NoSuchKey") | Some("NotFound") => {
            return StorageError::NotFound {
                key: key.to_string(),
                location: location.to_string(),
            }
        }
        Some("NotImplemented") => {
            return StorageError::Unsupported {
                op,
                key: key.to_string(),
                location: location.to_string(),
                message: e.message().unwrap_or("NotImplemented").to_string(),
            }
        }
        Some("NoSuchBucket") => format!("bucket `{bucket}` does not exist; create it or fix [storage] url"),
        Some("AccessDenied") | Some("Forbidden") => format!(
            "access denied: check the credentials (AWS_ACCESS_KEY_ID, profile or role) and that the policy allows {op} on bucket `{bucket}`"
        ),
        Some("InvalidAccessKeyId") | Some("SignatureDoesNotMatch") => {
            "the storage rejected the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)".to_string()
        }
        Some("RequestTimeTooSkewed") => {
            "this host's clock differs too much from the storage server's (RequestTimeTooSkewed); fix the time sync (NTP)".to_string()
        }
        _ => match &e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
                "cannot reach the storage{}: {}",
                endpoint.map(|ep| format!(" at {ep}")).unwrap_or_default(),
                cause_chain(&e)
            ),
            _ => match (code.as_deref(), e.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_string(),
                _ => cause_chain(&e),
            },
        },
    };
    StorageError::Failed {
        op,
        key: key.to_string(),
        location: location.to_string(),
        message,
    }
}

/// The innermost causes of an SDK error, one clause each, without the SDK's debug dump.
fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    // The outer layers are generic ("dispatch failure", "io error"); the last ones say what.
    let keep = parts.len().saturating_sub(2);
    parts[keep..].join(": ")
}

#[async_trait]
impl Storage for S3Storage {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn part_size(&self) -> usize {
        self.opts.part_size
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.code(),
                    Some("PreconditionFailed") | Some("ConditionalRequestConflict")
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(false),
            Err(e) => Err(self.error("put", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("get", key, e))?;
        let body = out.body.collect().await.map_err(|e| StorageError::Failed {
            op: "get",
            key: key.to_string(),
            location: self.location(),
            message: e.to_string(),
        })?;
        Ok(body.into_bytes())
    }

    async fn open_read(
        &self,
        key: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("get", key, e))?;
        Ok(Box::new(out.body.into_async_read()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let full = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("list", prefix, e))?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                if key.len() < strip {
                    continue;
                }
                out.push(ObjectInfo {
                    key: key[strip..].to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    modified: obj
                        .last_modified()
                        .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok()),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("delete", key, e))?;
        Ok(())
    }

    async fn pending_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<super::PendingUpload>, StorageError> {
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.error("list uploads under", prefix, e))?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                if key.len() < strip {
                    continue;
                }
                out.push(super::PendingUpload {
                    key: key[strip..].to_string(),
                    upload_id: id.to_string(),
                    initiated: u
                        .initiated()
                        .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn abort_pending(&self, upload: &super::PendingUpload) -> Result<(), StorageError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(&upload.key))
            .upload_id(&upload.upload_id)
            .send()
            .await
            .map_err(|e| self.error("abort upload of", &upload.key, e))?;
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("start upload of", key, e))?;
        let upload_id =
            out.upload_id()
                .map(str::to_string)
                .ok_or_else(|| StorageError::Failed {
                    op: "start upload of",
                    key: key.to_string(),
                    location: self.location(),
                    message: "the store returned no upload id".into(),
                })?;
        Ok(Box::new(S3Upload {
            storage: self.clone(),
            key: key.to_string(),
            upload_id,
            next_part: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            written: 0,
        }))
    }
}

struct S3Upload {
    storage: S3Storage,
    key: String,
    upload_id: String,
    next_part: i32,
    in_flight: JoinSet<Result<CompletedPart, StorageError>>,
    done: Vec<CompletedPart>,
    written: u64,
}

impl S3Upload {
    async fn reap_one(&mut self) -> Result<(), StorageError> {
        if let Some(joined) = self.in_flight.join_next().await {
            let part = joined.map_err(|e| StorageError::Failed {
                op: "upload part of",
                key: self.key.clone(),
                location: self.storage.location(),
                message: format!("upload task failed: {e}"),
            })??;
            self.done.push(part);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<u64, StorageError> {
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        if self.done.is_empty() {
            // S3 needs at least one part, even for an empty object.
            self.put_part_now(Bytes::new()).await?;
            while !self.in_flight.is_empty() {
                self.reap_one().await?;
            }
        }
        self.done.sort_by_key(|p| p.part_number());
        let s = &self.storage;
        s.client
            .complete_multipart_upload()
            .bucket(&s.bucket)
            .key(s.full_key(&self.key))
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(self.done.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s.error("complete upload of", &self.key, e))?;
        let head = s
            .client
            .head_object()
            .bucket(&s.bucket)
            .key(s.full_key(&self.key))
            .send()
            .await
            .map_err(|e| s.error("check uploaded", &self.key, e))?;
        let size = head.content_length().unwrap_or(-1);
        if size != self.written as i64 {
            return Err(StorageError::Failed {
                op: "check uploaded",
                key: self.key.clone(),
                location: s.location(),
                message: format!(
                    "the stored object has {size} bytes but {} were uploaded",
                    self.written
                ),
            });
        }
        Ok(self.written)
    }

    async fn put_part_now(&mut self, data: Bytes) -> Result<(), StorageError> {
        let s = self.storage.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        let number = self.next_part;
        self.next_part += 1;
        self.written += data.len() as u64;
        self.in_flight.spawn(async move {
            let out = s
                .client
                .upload_part()
                .bucket(&s.bucket)
                .key(s.full_key(&key))
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| s.error("upload part of", &key, e))?;
            Ok(CompletedPart::builder()
                .set_e_tag(out.e_tag().map(str::to_string))
                .part_number(number)
                .build())
        });
        Ok(())
    }

    async fn abort_now(&mut self) -> Result<(), StorageError> {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        self.storage
            .abort_pending(&super::PendingUpload {
                key: self.key.clone(),
                upload_id: self.upload_id.clone(),
                initiated: None,
            })
            .await
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn put_part(&mut self, data: Bytes) -> Result<(), StorageError> {
        while self.in_flight.len() >= self.storage.opts.max_in_flight {
            self.reap_one().await?;
        }
        self.put_part_now(data).await
    }

    async fn complete(mut self: Box<Self>) -> Result<u64, StorageError> {
        match self.finish().await {
            Ok(n) => Ok(n),
            Err(e) => {
                if let Err(abort) = self.abort_now().await {
                    tracing::warn!(key = %self.key, error = %abort, "could not abort the upload");
                }
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.abort_now().await
    }
}
