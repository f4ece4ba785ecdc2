//! For tests (feature `testing`): a store that refuses one operation, the way a real one
//! does when the credentials lack a permission or the server lacks an API, and passes every
//! other call to the store it wraps.

use async_trait::async_trait;
use bytes::Bytes;

use super::{LockMode, ObjectInfo, PendingUpload, Storage, StorageError, Upload};

/// The operation a [`Refusing`] store refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `delete` fails with AccessDenied (an IAM policy without s3:DeleteObject).
    Delete,
    /// `pending_uploads` is not implemented (s3s-fs has no ListMultipartUploads).
    PendingUploads,
}

#[derive(Debug)]
pub struct Refusing<S> {
    pub inner: S,
    pub refused: Refused,
}

#[async_trait]
impl<S: Storage> Storage for Refusing<S> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn part_size(&self) -> usize {
        self.inner.part_size()
    }
    fn parts_grow(&self) -> bool {
        self.inner.parts_grow()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        self.inner.put_if_absent(key, data).await
    }
    fn atomic_create(&self) -> bool {
        self.inner.atomic_create()
    }
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.inner.get(key).await
    }
    async fn open_read(
        &self,
        key: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError> {
        self.inner.open_read(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list_page(prefix, after, max).await
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        if self.refused == Refused::Delete {
            return Err(StorageError::Failed {
                op: "delete",
                key: key.to_string(),
                location: self.location(),
                message: "AccessDenied: not authorized to perform s3:DeleteObject".into(),
            });
        }
        self.inner.delete(key).await
    }
    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        if self.refused == Refused::PendingUploads {
            return Err(StorageError::Unsupported {
                op: "list uploads under",
                key: prefix.to_string(),
                location: self.location(),
                message: "NotImplemented".into(),
            });
        }
        self.inner.pending_uploads(prefix).await
    }
    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StorageError> {
        self.inner.abort_pending(upload).await
    }
    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        self.inner.start_upload(key).await
    }
    async fn retain(
        &self,
        key: &str,
        mode: LockMode,
        until: jiff::Timestamp,
    ) -> Result<(), StorageError> {
        self.inner.retain(key, mode, until).await
    }
    async fn lock_enabled(&self) -> Result<bool, StorageError> {
        self.inner.lock_enabled().await
    }
}
