//! A small blocking S3 client for tests, independent of `dr`'s own storage code, so the
//! tests can check what `dr` stored without trusting `dr` to read it back.

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use tokio::runtime::Runtime;

use crate::garage::Garage;

/// A blocking S3 client with its own single-threaded runtime.
pub struct S3 {
    client: Client,
    runtime: Runtime,
}

impl S3 {
    /// A path-style client for `endpoint` with static credentials.
    pub fn new(endpoint: &str, region: &str, access_key: &str, secret_key: &str) -> S3 {
        let credentials = Credentials::new(access_key, secret_key, None, None, "dr-tests");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .credentials_provider(credentials)
            // Only send or demand checksums where S3 requires them, so the test client
            // works against any S3 server regardless of which checksum headers it knows.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build tokio runtime for S3 client");
        S3 {
            client: Client::from_conf(config),
            runtime,
        }
    }

    /// A client for `garage` with the bed's access key.
    pub fn for_garage(garage: &Garage) -> S3 {
        S3::new(
            &garage.endpoint(),
            Garage::REGION,
            garage.access_key(),
            garage.secret_key(),
        )
    }

    /// Stores `body` at `bucket`/`key`.
    pub fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(ByteStream::from(body))
                    .send(),
            )
            .unwrap_or_else(|e| panic!("S3 put {bucket}/{key}: {}", describe(&e)));
    }

    /// Whether the server answers ListBuckets with these credentials.
    pub fn try_list_buckets(&self) -> Result<(), String> {
        self.runtime
            .block_on(self.client.list_buckets().send())
            .map(|_| ())
            .map_err(|e| describe(&e))
    }

    /// Creates `bucket` with Object Lock enabled (which turns on versioning).
    pub fn create_locked_bucket(&self, bucket: &str) {
        self.runtime
            .block_on(
                self.client
                    .create_bucket()
                    .bucket(bucket)
                    .object_lock_enabled_for_bucket(true)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("S3 create bucket {bucket}: {}", describe(&e)));
    }

    /// The Object Lock retention of `bucket`/`key`: (mode, retain-until in seconds).
    pub fn retention(&self, bucket: &str, key: &str) -> Option<(String, i64)> {
        let out = self
            .runtime
            .block_on(
                self.client
                    .get_object_retention()
                    .bucket(bucket)
                    .key(key)
                    .send(),
            )
            .ok()?;
        let r = out.retention()?;
        Some((
            r.mode()?.as_str().to_string(),
            r.retain_until_date()?.secs(),
        ))
    }

    /// Deletes every stored version of `bucket`/`key` (what an attacker with delete rights
    /// would do); the first refusal is returned.
    pub fn delete_all_versions(&self, bucket: &str, key: &str) -> Result<(), String> {
        self.runtime.block_on(async {
            let versions = self
                .client
                .list_object_versions()
                .bucket(bucket)
                .prefix(key)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            for v in versions.versions() {
                if v.key() != Some(key) {
                    continue;
                }
                self.client
                    .delete_object()
                    .bucket(bucket)
                    .key(key)
                    .set_version_id(v.version_id().map(str::to_string))
                    .send()
                    .await
                    .map_err(|e| describe(&e))?;
            }
            Ok(())
        })
    }

    /// The object at `bucket`/`key`.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.runtime.block_on(async {
            let object = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("S3 get {bucket}/{key}: {}", describe(&e)));
            object
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("S3 read body of {bucket}/{key}: {e}"))
                .to_vec()
        })
    }

    /// Every key under `prefix` in `bucket`, sorted. Panics on failure.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.try_list(bucket, prefix)
            .unwrap_or_else(|e| panic!("S3 list {bucket}/{prefix}: {e}"))
    }

    /// Every key under `prefix` in `bucket`, sorted, or the error.
    pub fn try_list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, String> {
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| describe(&e))?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(String::from)),
                );
            }
            keys.sort();
            Ok(keys)
        })
    }

    /// Keys of multipart uploads still in progress under `prefix` (a failed backup must
    /// abort its upload rather than leave parts behind).
    pub fn multipart_uploads(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(bucket)
                .prefix(prefix)
                .send()
                .await
                .unwrap_or_else(|e| panic!("S3 list multipart uploads {bucket}: {}", describe(&e)));
            out.uploads()
                .iter()
                .filter_map(|u| u.key().map(String::from))
                .collect()
        })
    }
}

/// The SDK's plain `Display` for errors is just "service error"; this names the cause.
fn describe<E: std::error::Error>(error: &E) -> String {
    DisplayErrorContext(error).to_string()
}
