//! `s3://` repositories through aws-sdk-s3: AWS S3 and S3-compatible stores (custom endpoint,
//! region, path-style addressing). Credentials come from the standard AWS chain (environment,
//! profile, web identity / IRSA, ECS, instance metadata).
//!
//! - Uploads: multipart, parts growing with the object (see `pipeline::parts`), a bounded
//!   number in flight, `Content-MD5` on every part and put so the store rejects a body
//!   corrupted in transit; every failure aborts the upload, and a completed upload is checked
//!   with a HEAD (a 200 reply to CompleteMultipartUpload can carry an error body).
//! - Timeouts are idle timeouts, not deadlines: a request fails after `idle_timeout` without
//!   progress (no request body sent, no response), however long a moving transfer takes.
//! - Downloads resume after a broken connection with `Range: bytes=N-`, checking that the
//!   object's ETag and size did not change; the reader sees one contiguous stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextMut, BeforeTransmitInterceptorContextRef,
    FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::{
    ConfigBag, Intercept, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    RuntimeComponents, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{ObjectInfo, Storage, StorageError, Upload};
use crate::pipeline::parts::MAX_PARTS;
use crate::redact::redact_urls;

/// Consecutive failed attempts a download resumes from before it gives up.
const DOWNLOAD_RETRIES: u32 = 5;

#[derive(Debug, Clone)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub part_size: usize,
    pub max_in_flight: usize,
    /// A request without progress for this long fails ("stopped responding").
    pub idle_timeout: Duration,
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
            // stores reject it. Content-MD5, which every store checks, is sent instead.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            // The SDK's read timeout is a deadline for the whole request up to the response
            // headers (an UploadPart answers only after its body), and its stalled-stream
            // protection does not cover the wait for an answer: our idle watchdog covers
            // both (see `watch`).
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .interceptor(ActivityInterceptor)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
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

    /// How much of a listed key is the repository's prefix (and its `/`).
    fn prefix_len(&self) -> usize {
        if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        }
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

    /// The endpoint as named in messages, without any userinfo.
    fn endpoint_name(&self) -> String {
        match &self.opts.endpoint {
            Some(endpoint) => redact_endpoint(endpoint),
            None => "(AWS)".to_string(),
        }
    }

    fn stalled(&self, op: &'static str, key: &str) -> StorageError {
        StorageError::Failed {
            op,
            key: key.to_string(),
            location: self.location(),
            message: stalled_message(&self.endpoint_name(), self.opts.idle_timeout),
        }
    }

    /// Runs one SDK request under the idle watchdog: it fails once `idle_timeout` passes
    /// without the request making progress (a body chunk sent, an attempt started). Backoff
    /// between retries does not count.
    async fn watch<T, E, R>(
        &self,
        op: &'static str,
        key: &str,
        request: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, StorageError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let activity = Activity::new();
        let request = ACTIVITY.scope(activity.clone(), request);
        tokio::select! {
            out = request => out.map_err(|e| self.error(op, key, e)),
            () = activity.stalled(self.opts.idle_timeout) => Err(self.stalled(op, key)),
        }
    }
}

fn stalled_message(endpoint: &str, idle: Duration) -> String {
    format!(
        "the S3 endpoint {endpoint} stopped responding: no progress for {} s ([storage] idle_timeout_secs); check the network path to it and the store's health",
        idle.as_secs()
    )
}

/// `scheme://host:port/path` of an endpoint, without `user:password@`.
fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string().trim_end_matches('/').to_string()
        }
        Err(_) => redact_urls(endpoint),
    }
}

/// Where the default AWS chain looks, for the "no credentials" message.
const CREDENTIAL_SOURCES: &str = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment; \
the profile in AWS_PROFILE (else `default`) in ~/.aws/credentials and ~/.aws/config (or \
AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE), including SSO and credential_process; web \
identity (AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, as on EKS/IRSA); ECS container \
credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI); EC2 instance metadata (IMDS)";

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
        Some("BadDigest") | Some("InvalidDigest") | Some("XAmzContentSHA256Mismatch") => format!(
            "the store rejected the data as corrupted in transit ({}); nothing was committed, check the network path (proxies, NICs) and retry",
            code.as_deref().unwrap_or_default()
        ),
        _ => match credentials_problem(&e) {
            Some(problem) => problem,
            None => match &e {
                SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
                    "cannot reach the storage{}: {}",
                    endpoint
                        .map(|ep| format!(" at {}", redact_endpoint(ep)))
                        .unwrap_or_default(),
                    cause_chain(&e)
                ),
                _ => match (code.as_deref(), e.message()) {
                    (Some(code), Some(msg)) => format!("{code}: {msg}"),
                    (Some(code), None) => code.to_string(),
                    _ => cause_chain(&e),
                },
            },
        },
    };
    StorageError::Failed {
        op,
        key: key.to_string(),
        location: location.to_string(),
        // Store and SDK texts may quote the endpoint URL.
        message: redact_urls(&message),
    }
}

/// "No AWS credentials found", with where they were looked for, instead of the chain's
/// last provider's error (an instance-metadata connection dump).
fn credentials_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(ce) = err.downcast_ref::<CredentialsError>() {
            return Some(match ce {
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::ProviderTimedOut(_) => {
                    format!("no AWS credentials found; looked in: {CREDENTIAL_SOURCES}")
                }
                // The chain reports its last source's refusal (e.g. instance metadata
                // answering 403 off EC2): every source came up empty.
                CredentialsError::ProviderError(_) => format!(
                    "no AWS credentials found (the last source tried said: {}); looked in: {CREDENTIAL_SOURCES}",
                    cause_chain(ce)
                ),
                other => format!(
                    "cannot load AWS credentials: {}; the sources are: {CREDENTIAL_SOURCES}",
                    cause_chain(other)
                ),
            });
        }
        cur = err.source();
    }
    None
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
    redact_urls(&parts[keep..].join(": "))
}

/// base64 of the MD5 of `data`, for `Content-MD5`.
fn content_md5(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    aws_smithy_types::base64::encode(Md5::digest(data))
}

tokio::task_local! {
    /// The activity of the request being sent on this task, for [`ActivityInterceptor`].
    static ACTIVITY: Activity;
}

/// When the request last made progress, shared by the watchdog and the request's body.
#[derive(Debug, Clone)]
struct Activity(Arc<Mutex<ActivityState>>);

#[derive(Debug)]
struct ActivityState {
    last: Instant,
    /// Between attempts the SDK sleeps (backoff); that is not a stall.
    backing_off: bool,
}

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(Mutex::new(ActivityState {
            last: Instant::now(),
            backing_off: false,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        let mut s = self.state();
        s.last = Instant::now();
        s.backing_off = false;
    }

    fn pause(&self) {
        self.state().backing_off = true;
    }

    /// Returns once `idle` has passed without progress.
    async fn stalled(&self, idle: Duration) {
        loop {
            let (last, backing_off) = {
                let s = self.state();
                (s.last, s.backing_off)
            };
            if backing_off {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Reports each attempt and each body chunk sent to the request's [`Activity`].
#[derive(Debug)]
struct ActivityInterceptor;

impl ActivityInterceptor {
    fn current() -> Option<Activity> {
        ACTIVITY.try_with(Activity::clone).ok()
    }
}

impl Intercept for ActivityInterceptor {
    fn name(&self) -> &'static str {
        "dr-idle-watchdog"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(activity) = Self::current() {
            activity.touch();
        }
        Ok(())
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(activity) = Self::current() else {
            return Ok(());
        };
        let body = std::mem::replace(context.request_mut().body_mut(), SdkBody::taken());
        // After signing, so the signed payload hash still covers the in-memory bytes.
        let body = body.map_preserve_contents(move |inner| {
            SdkBody::from_body_1_x(ProgressBody {
                inner,
                rest: Bytes::new(),
                activity: activity.clone(),
            })
        });
        *context.request_mut().body_mut() = body;
        Ok(())
    }

    fn read_after_attempt(
        &self,
        _context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(activity) = Self::current() {
            activity.pause();
        }
        Ok(())
    }
}

/// A request body handed to the connection in small frames, each one counted as progress
/// (one 16 MiB frame would show no progress until the whole part was written).
struct ProgressBody {
    inner: SdkBody,
    rest: Bytes,
    activity: Activity,
}

const PROGRESS_FRAME: usize = 64 * 1024;

impl http_body::Body for ProgressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.activity.touch();
        let n = this.rest.len().min(PROGRESS_FRAME);
        Poll::Ready(Some(Ok(http_body::Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = http_body::Body::size_hint(&self.inner);
        let rest = self.rest.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
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
        let md5 = content_md5(&data);
        self.watch(
            "put",
            key,
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .content_md5(md5)
                .body(ByteStream::from(data))
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let md5 = content_md5(&data);
        let activity = Activity::new();
        let request = ACTIVITY.scope(
            activity.clone(),
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .if_none_match("*")
                .content_md5(md5)
                .body(ByteStream::from(data))
                .send(),
        );
        let sent = tokio::select! {
            out = request => out,
            () = activity.stalled(self.opts.idle_timeout) => return Err(self.stalled("put", key)),
        };
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
        use tokio::io::AsyncReadExt;
        let mut reader = self.open_read(key).await?;
        let mut out = Vec::new();
        reader
            .read_to_end(&mut out)
            .await
            .map_err(|e| StorageError::Failed {
                op: "get",
                key: key.to_string(),
                location: self.location(),
                message: e.to_string(),
            })?;
        Ok(Bytes::from(out))
    }

    async fn open_read(
        &self,
        key: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError> {
        let out = self
            .watch(
                "get",
                key,
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .send(),
            )
            .await?;
        let size = out.content_length().and_then(|n| u64::try_from(n).ok());
        let (tx, rx) = mpsc::channel(4);
        let download = Download {
            storage: self.clone(),
            key: key.to_string(),
            etag: out.e_tag().map(str::to_string),
            size,
            offset: 0,
            tx,
        };
        let task = tokio::spawn(download.run(out.body));
        Ok(Box::new(ChannelReader {
            rx,
            buf: Bytes::new(),
            task,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let full = self.full_key(prefix);
        let strip = self.prefix_len();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .watch(
                    "list",
                    prefix,
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&full)
                        .set_continuation_token(token.clone())
                        .send(),
                )
                .await?;
            out.extend(page.contents().iter().filter_map(|o| object_info(o, strip)));
            token = page.next_continuation_token().map(str::to_string);
            if page.is_truncated() != Some(true) || token.is_none() {
                break;
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectInfo>, StorageError> {
        let full = self.full_key(prefix);
        let strip = self.prefix_len();
        let mut out: Vec<ObjectInfo> = Vec::new();
        // S3 lists in UTF-8 byte order, which is `str`'s order: StartAfter pages exactly.
        let mut after = after.map(|a| self.full_key(a));
        while out.len() < max {
            let page = self
                .watch(
                    "list",
                    prefix,
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&full)
                        .set_start_after(after.clone())
                        .max_keys(i32::try_from(max - out.len()).unwrap_or(1000).min(1000))
                        .send(),
                )
                .await?;
            let before = out.len();
            out.extend(page.contents().iter().filter_map(|o| object_info(o, strip)));
            let last = page
                .contents()
                .last()
                .and_then(|o| o.key())
                .map(str::to_string);
            if page.is_truncated() != Some(true) || last.is_none() || out.len() == before {
                break;
            }
            after = last;
        }
        out.truncate(max);
        Ok(out)
    }

    async fn retain(
        &self,
        key: &str,
        mode: super::LockMode,
        until: jiff::Timestamp,
    ) -> Result<(), StorageError> {
        use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};
        let mode = match mode {
            super::LockMode::Governance => ObjectLockRetentionMode::Governance,
            super::LockMode::Compliance => ObjectLockRetentionMode::Compliance,
        };
        let retention = ObjectLockRetention::builder()
            .mode(mode)
            .retain_until_date(aws_smithy_types::DateTime::from_secs(until.as_second()))
            .build();
        self.watch(
            "lock",
            key,
            self.client
                .put_object_retention()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .retention(retention)
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn lock_enabled(&self) -> Result<bool, StorageError> {
        use aws_sdk_s3::types::ObjectLockEnabled;
        let out = self
            .watch(
                "read the Object Lock configuration of",
                "",
                self.client
                    .get_object_lock_configuration()
                    .bucket(&self.bucket)
                    .send(),
            )
            .await;
        match out {
            Ok(o) => Ok(o
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                == Some(&ObjectLockEnabled::Enabled)),
            // AWS answers ObjectLockConfigurationNotFoundError for a bucket without it.
            Err(
                StorageError::Failed { message, .. } | StorageError::NotFound { key: message, .. },
            ) if message.contains("ObjectLockConfigurationNotFound") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.watch(
            "delete",
            key,
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn pending_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<super::PendingUpload>, StorageError> {
        let strip = self.prefix_len();
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .watch(
                    "list uploads under",
                    prefix,
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .prefix(self.full_key(prefix))
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send(),
                )
                .await?;
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
        self.watch(
            "abort upload of",
            &upload.key,
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(&upload.key))
                .upload_id(&upload.upload_id)
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        let out = self
            .watch(
                "start upload of",
                key,
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .send(),
            )
            .await?;
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

/// The rest of a download, resumed after each broken connection, fed to a [`ChannelReader`].
struct Download {
    storage: S3Storage,
    key: String,
    etag: Option<String>,
    /// The object's size from the first response.
    size: Option<u64>,
    offset: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

/// Why one response body stopped before the end.
enum Interrupted {
    /// The reader was dropped: nothing more to do.
    ReaderGone,
    Failed(String),
}

impl Download {
    async fn run(mut self, first: ByteStream) {
        let mut body = Some(first);
        let mut failures = 0u32;
        let mut cause = String::new();
        loop {
            if let Some(b) = body.take() {
                let before = self.offset;
                match self.pump(b).await {
                    Ok(()) => match self.size {
                        Some(size) if self.offset < size => {
                            cause =
                                format!("the connection closed at byte {} of {size}", self.offset)
                        }
                        _ => return,
                    },
                    Err(Interrupted::ReaderGone) => return,
                    Err(Interrupted::Failed(why)) => cause = why,
                }
                // Bounded retries without progress; a long read may be interrupted often.
                if self.offset > before {
                    failures = 0;
                }
            }
            failures += 1;
            if failures > DOWNLOAD_RETRIES {
                let _ = self
                    .tx
                    .send(Err(io::Error::other(format!(
                        "reading {} from {} failed at byte {}{} after {DOWNLOAD_RETRIES} attempts to resume: {cause}",
                        self.key,
                        self.storage.location(),
                        self.offset,
                        self.size.map(|s| format!(" of {s}")).unwrap_or_default(),
                    ))))
                    .await;
                return;
            }
            tracing::warn!(
                key = %self.key,
                offset = self.offset,
                attempt = failures,
                error = %cause,
                "download interrupted; resuming where it stopped"
            );
            tokio::time::sleep(Duration::from_secs(1 << (failures - 1).min(3))).await;
            match self.resume().await {
                Ok(b) => body = Some(b),
                Err(Resume::Retry(why)) => cause = why,
                Err(Resume::Fatal(message)) => {
                    let _ = self.tx.send(Err(io::Error::other(message))).await;
                    return;
                }
            }
        }
    }

    /// Copies one response body to the reader, failing after the idle timeout without data.
    async fn pump(&mut self, mut body: ByteStream) -> Result<(), Interrupted> {
        let idle = self.storage.opts.idle_timeout;
        loop {
            match tokio::time::timeout(idle, body.next()).await {
                Err(_) => {
                    return Err(Interrupted::Failed(stalled_message(
                        &self.storage.endpoint_name(),
                        idle,
                    )))
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(Interrupted::Failed(cause_chain(&e))),
                Ok(Some(Ok(chunk))) => {
                    self.offset += chunk.len() as u64;
                    if self.tx.send(Ok(chunk)).await.is_err() {
                        return Err(Interrupted::ReaderGone);
                    }
                }
            }
        }
    }

    /// Asks for the bytes from the current offset on, of the same object version.
    async fn resume(&self) -> Result<ByteStream, Resume> {
        let s = &self.storage;
        let out = s
            .watch(
                "get",
                &self.key,
                s.client
                    .get_object()
                    .bucket(&s.bucket)
                    .key(s.full_key(&self.key))
                    .range(format!("bytes={}-", self.offset))
                    .set_if_match(self.etag.clone())
                    .send(),
            )
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if e.is_not_found() => {
                return Err(Resume::Fatal(format!(
                    "{} was deleted while it was being read",
                    self.key
                )))
            }
            Err(e) if e.to_string().contains("PreconditionFailed") => {
                return Err(Resume::Fatal(self.changed()))
            }
            Err(e) => return Err(Resume::Retry(e.to_string())),
        };
        let total = out
            .content_range()
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok());
        let start = out
            .content_range()
            .and_then(|r| r.strip_prefix("bytes "))
            .and_then(|r| r.split_once('-'))
            .and_then(|(start, _)| start.parse::<u64>().ok());
        if (self.etag.is_some() && out.e_tag() != self.etag.as_deref())
            || (self.size.is_some() && total != self.size)
        {
            return Err(Resume::Fatal(self.changed()));
        }
        if start != Some(self.offset) {
            return Err(Resume::Fatal(format!(
                "the store did not honour `Range: bytes={}-` when resuming {} (Content-Range: {:?})",
                self.offset,
                self.key,
                out.content_range()
            )));
        }
        Ok(out.body)
    }

    fn changed(&self) -> String {
        format!(
            "{} changed in {} while it was being read (its ETag or size differs); read it again",
            self.key,
            self.storage.location()
        )
    }
}

enum Resume {
    Retry(String),
    Fatal(String),
}

/// The reader side of a [`Download`].
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    buf: Bytes,
    task: tokio::task::JoinHandle<()>,
}

impl tokio::io::AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                let chunk = self.buf.split_to(n);
                out.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => self.buf = chunk,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl Drop for ChannelReader {
    fn drop(&mut self) {
        self.task.abort();
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
        s.watch(
            "complete upload of",
            &self.key,
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
                .send(),
        )
        .await?;
        let head = s
            .watch(
                "check uploaded",
                &self.key,
                s.client
                    .head_object()
                    .bucket(&s.bucket)
                    .key(s.full_key(&self.key))
                    .send(),
            )
            .await?;
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
        if self.next_part as usize > MAX_PARTS {
            return Err(StorageError::Failed {
                op: "upload part of",
                key: self.key.clone(),
                location: self.storage.location(),
                message: format!(
                    "the object needs more than S3's {MAX_PARTS} parts ({} bytes so far); raise [storage] part_size_mib",
                    self.written
                ),
            });
        }
        let s = self.storage.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        let number = self.next_part;
        self.next_part += 1;
        self.written += data.len() as u64;
        self.in_flight.spawn(async move {
            let hashed = data.clone();
            let md5 = tokio::task::spawn_blocking(move || content_md5(&hashed))
                .await
                .map_err(|e| StorageError::Failed {
                    op: "upload part of",
                    key: key.clone(),
                    location: s.location(),
                    message: format!("hashing the part failed: {e}"),
                })?;
            let out = s
                .watch(
                    "upload part of",
                    &key,
                    s.client
                        .upload_part()
                        .bucket(&s.bucket)
                        .key(s.full_key(&key))
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_md5(md5)
                        .body(ByteStream::from(data))
                        .send(),
                )
                .await?;
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

/// A listed object, its key relative to the repository's prefix.
fn object_info(obj: &aws_sdk_s3::types::Object, strip: usize) -> Option<ObjectInfo> {
    let key = obj.key()?;
    Some(ObjectInfo {
        key: key.get(strip..)?.to_string(),
        size: obj.size().unwrap_or(0).max(0) as u64,
        modified: obj
            .last_modified()
            .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_md5_is_base64_of_the_digest() {
        // RFC 1321's test vector for "abc": 900150983cd24fb0d6963f7d28e17f72.
        assert_eq!(content_md5(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
    }

    #[test]
    fn endpoint_userinfo_never_reaches_a_message() {
        let shown = redact_endpoint("http://AKIAKEY:topsecret@127.0.0.1:3900");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("AKIAKEY"), "{shown}");
        assert!(shown.contains("127.0.0.1:3900"), "{shown}");
        let msg = stalled_message(&shown, Duration::from_secs(7));
        assert!(msg.contains("stopped responding"), "{msg}");
        assert!(msg.contains("7 s"), "{msg}");
    }

    #[tokio::test]
    async fn activity_stalls_only_after_idle_without_progress() {
        let activity = Activity::new();
        let idle = Duration::from_millis(300);
        let toucher = {
            let activity = activity.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    activity.touch();
                }
            })
        };
        let started = std::time::Instant::now();
        activity.stalled(idle).await;
        // Ten touches 100 ms apart keep it alive for a second, then 300 ms of silence.
        assert!(
            started.elapsed() >= Duration::from_millis(1200),
            "{:?}",
            started.elapsed()
        );
        toucher.await.unwrap();
    }
}
