//! `file://` repositories: a local directory (the embedded default, and handy for NFS).
//!
//! Objects appear atomically: they are written to a temporary sibling, synced, and renamed.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectInfo, Storage, StorageError, Upload};

/// Parts handed to a file upload; small, since a local write needs no batching.
const FILE_PART_SIZE: usize = 1024 * 1024;
/// Parts are written to the file this much at a time. A 1 MiB write puts 1 MiB folios in the
/// page cache, and on a VM whose balloon reports free memory to the host (Firecracker and
/// others) each such folio is faulted back in from the host: a 1 GiB tree's backup cost
/// 1.4 CPU-s more that way (bench/RESULTS.md). 64 KiB writes cost nothing measurable.
const WRITE_SIZE: usize = 64 * 1024;

/// Marks files that are not objects yet (in-progress uploads and puts).
pub const PARTIAL_MARKER: &str = ".partial-";

#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    pub fn new(root: PathBuf) -> Self {
        FileStorage { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn failed(&self, op: &'static str, key: &str, path: &Path, e: std::io::Error) -> StorageError {
        if e.kind() == ErrorKind::NotFound && op == "read" {
            return StorageError::NotFound {
                key: key.to_string(),
                location: self.location(),
            };
        }
        StorageError::Failed {
            op,
            key: key.to_string(),
            location: self.location(),
            message: format!("{}: {e}", path.display()),
        }
    }

    /// Creates the key's missing directories and makes each new entry durable: a synced
    /// object is lost in a crash if the directory holding it was never synced into its parent.
    async fn create_parent(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let Some(parent) = path.parent().map(Path::to_path_buf) else {
            return Ok(());
        };
        let dir = parent.clone();
        tokio::task::spawn_blocking(move || {
            for new in create_dirs(&dir)? {
                if let Some(up) = new.parent() {
                    sync_dir_blocking(up);
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| self.failed("create directory for", key, &parent, e))
    }
}

/// Creates `dir` and its missing ancestors, like `create_dir_all`, and returns the
/// directories this call created, outermost first (one created concurrently is not ours).
fn create_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        match std::fs::metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                missing.push(d);
                cur = d.parent().filter(|p| !p.as_os_str().is_empty());
            }
            Err(e) => return Err(e),
        }
    }
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => created.push(d.to_path_buf()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Best effort, like [`sync_dir`]: some filesystems refuse to sync a directory.
fn sync_dir_blocking(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{PARTIAL_MARKER}{:08x}", rand::random::<u32>()));
    path.with_file_name(name)
}

async fn sync_dir(dir: Option<&Path>) {
    // Makes the rename durable; best effort because some filesystems refuse it.
    if let Some(dir) = dir {
        if let Ok(f) = tokio::fs::File::open(dir).await {
            let _ = f.sync_all().await;
        }
    }
}

#[async_trait]
impl Storage for FileStorage {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn part_size(&self) -> usize {
        FILE_PART_SIZE
    }

    fn parts_grow(&self) -> bool {
        false
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let path = self.path(key);
        self.create_parent(key, &path).await?;
        let tmp = partial_path(&path);
        let write = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(&data).await?;
            f.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.failed("write", key, &path, e));
        }
        sync_dir(path.parent()).await;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let path = self.path(key);
        self.create_parent(key, &path).await?;
        let tmp = partial_path(&path);
        let write = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(&data).await?;
            f.sync_all().await?;
            // link(2) fails if the name exists: an atomic create-if-absent on local disks.
            tokio::fs::hard_link(&tmp, &path).await
        };
        let result = write.await;
        let _ = tokio::fs::remove_file(&tmp).await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.failed("write", key, &path, e)),
        }
    }

    fn atomic_create(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path(key);
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| self.failed("read", key, &path, e))
    }

    async fn open_read(
        &self,
        key: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, StorageError> {
        let path = self.path(key);
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.failed("read", key, &path, e))?;
        Ok(Box::new(tokio::io::BufReader::with_capacity(256 * 1024, f)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        // Walk from the deepest directory the prefix names, then filter by the full prefix.
        let start_key = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let mut out = Vec::new();
        let mut stack = vec![self.path(start_key)];
        while let Some(dir) = stack.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.failed("list", prefix, &dir, e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| self.failed("list", prefix, &dir, e))?
            {
                let meta = entry
                    .metadata()
                    .await
                    .map_err(|e| self.failed("list", prefix, &entry.path(), e))?;
                let path = entry.path();
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                if key.starts_with(prefix) {
                    out.push(ObjectInfo {
                        key,
                        size: meta.len(),
                        modified: meta
                            .modified()
                            .ok()
                            .and_then(|t| jiff::Timestamp::try_from(t).ok()),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.failed("delete", key, &path, e)),
        }
        // Tidy empty directories left behind, never above the root.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root
                || !d.starts_with(&self.root)
                || tokio::fs::remove_dir(&d).await.is_err()
            {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        let path = self.path(key);
        self.create_parent(key, &path).await?;
        let tmp = partial_path(&path);
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| self.failed("create", key, &tmp, e))?
            .into_std()
            .await;
        Ok(Box::new(FileUpload {
            storage: self.clone(),
            key: key.to_string(),
            file: Arc::new(file),
            tmp,
            path,
            written: 0,
        }))
    }
}

struct FileUpload {
    storage: FileStorage,
    key: String,
    /// Written on a blocking thread straight from the part: tokio's File would copy each
    /// part into a buffer of its own first.
    file: Arc<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    written: u64,
}

#[async_trait]
impl Upload for FileUpload {
    async fn put_part(&mut self, data: Bytes) -> Result<(), StorageError> {
        let file = self.file.clone();
        let len = data.len() as u64;
        blocking(move || {
            data.chunks(WRITE_SIZE)
                .try_for_each(|piece| (&*file).write_all(piece))
        })
        .await
        .map_err(|e| self.storage.failed("write", &self.key, &self.tmp, e))?;
        self.written += len;
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> Result<u64, StorageError> {
        let done = async {
            let file = self.file.clone();
            blocking(move || file.sync_all()).await?;
            tokio::fs::rename(&self.tmp, &self.path).await
        };
        if let Err(e) = done.await {
            let _ = tokio::fs::remove_file(&self.tmp).await;
            return Err(self.storage.failed("complete", &self.key, &self.path, e));
        }
        sync_dir(self.path.parent()).await;
        Ok(self.written)
    }

    async fn abort(self: Box<Self>) -> Result<(), StorageError> {
        drop(self.file);
        match tokio::fs::remove_file(&self.tmp).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.storage.failed("abort", &self.key, &self.tmp, e)),
        }
    }
}

async fn blocking(
    op: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::task::spawn_blocking(op)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upload_is_invisible_until_complete_and_gone_after_abort() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().to_path_buf());
        let mut up = s.start_upload("env/db/backups/1/data").await.unwrap();
        up.put_part(Bytes::from_static(b"hello ")).await.unwrap();
        assert!(s
            .get("env/db/backups/1/data")
            .await
            .unwrap_err()
            .is_not_found());
        up.put_part(Bytes::from_static(b"world")).await.unwrap();
        assert_eq!(up.complete().await.unwrap(), 11);
        assert_eq!(
            &s.get("env/db/backups/1/data").await.unwrap()[..],
            b"hello world"
        );

        let mut up = s.start_upload("env/db/backups/2/data").await.unwrap();
        up.put_part(Bytes::from_static(b"partial")).await.unwrap();
        up.abort().await.unwrap();
        let keys: Vec<_> = s
            .list("env/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["env/db/backups/1/data"]);
    }

    #[test]
    fn create_dirs_returns_only_the_directories_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("env")).unwrap();
        let created = create_dirs(&root.join("env/db/backups/1")).unwrap();
        assert_eq!(
            created,
            vec![
                root.join("env/db"),
                root.join("env/db/backups"),
                root.join("env/db/backups/1")
            ]
        );
        assert!(root.join("env/db/backups/1").is_dir());
        assert!(create_dirs(&root.join("env/db/backups/1"))
            .unwrap()
            .is_empty());
        assert_eq!(
            create_dirs(&root.join("env/db/backups/2")).unwrap(),
            vec![root.join("env/db/backups/2")]
        );
        std::fs::write(root.join("file"), b"x").unwrap();
        assert!(create_dirs(&root.join("file/sub")).is_err());
    }

    #[tokio::test]
    async fn list_filters_by_prefix_and_delete_tidies_directories() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().to_path_buf());
        for k in ["a/x/1", "a/x/2", "a/y/1", "b/1"] {
            s.put(k, Bytes::from_static(b"1")).await.unwrap();
        }
        let keys: Vec<_> = s
            .list("a/x")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/x/1", "a/x/2"]);
        s.delete("a/y/1").await.unwrap();
        s.delete("a/y/1").await.unwrap();
        assert!(!dir.path().join("a/y").exists());
        assert!(dir.path().join("a/x").exists());
    }
}
