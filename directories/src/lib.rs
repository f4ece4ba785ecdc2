//! Directory backups: a tree of files (uploads, documents) stored like a database dump.
//!
//! The tree is streamed as a GNU-readable tar through the same zstd + age + sha256 + storage
//! pipeline as dumps (`data.tar.zst.age`), beside an encrypted listing
//! (`listing.jsonl.zst.age`: path, type, size, mtime, mode, sha256 of every entry), and the
//! manifest is written last. Memory stays bounded: the walk holds one directory's names at a
//! time and the pipeline fixed-size parts. A file that changes while it is read (its size or
//! mtime differ after the read, or it ends early) is stored as read, counted and named in the
//! manifest; an unreadable file fails the backup unless `skip_unreadable`.
//!
//! The tree may instead be an S3 prefix (`source`): its objects are regular files of the same
//! tar, listed a page at a time and fetched a few ahead, in key order.
//!
//! Stock tools restore it: `age -d -i key data.tar.zst.age | zstd -d | tar -x`.

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use dr_core::config::{Config, DirectoryConfig, DirectorySource};
use dr_core::keys::{Identities, Recipients};
use dr_core::manifest::BackupId;
use dr_core::pipeline::decode::{self, Expected};
use dr_core::pipeline::encode::EncodeOptions;
use dr_core::pipeline::{encrypt_chunks_to_storage, Control, PipelineError, Progress, Stored};
use dr_core::repo::Repository;
use dr_core::storage::{ObjectInfo, Storage, StorageError};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

pub const DATA_OBJECT: &str = "data.tar.zst.age";
pub const LISTING_OBJECT: &str = "listing.jsonl.zst.age";
const MANIFEST: &str = "manifest.json";
pub const KIND: &str = "directory";
const FORMAT: u32 = 1;
/// Chunks handed to the pipeline; a few in flight bound the memory of the producer side.
const CHUNK: usize = 1024 * 1024;
/// Paths named in the manifest per problem kind (the counts are exact).
const NAMED: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("directory `{name}`: {path} cannot be read: {source}")]
    Unreadable {
        name: String,
        path: String,
        source: io::Error,
    },
    #[error("directory `{name}`: the root {path} is not a directory")]
    NotADirectory { name: String, path: String },
    #[error("directory `{name}`: {source}")]
    Source { name: String, source: StorageError },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("directory `{name}` has no backup{which}")]
    NoBackup { name: String, which: String },
    #[error("{0} is not empty: restoring there could mix two trees; choose an empty or new directory, or pass --force to write over it")]
    NotEmpty(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the stored object {key} failed verification: {message}")]
    Verify { key: String, message: String },
    #[error("the restored tree differs from the backup's listing: {0}")]
    Mismatch(String),
}

/// One stored object of a directory backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirObject {
    pub name: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
}

/// The manifest of a directory backup: times, counts, sizes, hashes; never a path inside
/// the tree except those named as changed or skipped (which the operator must see).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirManifest {
    pub format: u32,
    /// Always `directory`: database readers skip these manifests.
    pub kind: String,
    pub id: String,
    pub environment: String,
    pub directory: String,
    pub classes: Vec<String>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub dr_version: String,
    pub objects: Vec<DirObject>,
    pub recipients: Vec<String>,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of file content read.
    pub bytes: u64,
    /// Files whose size or mtime changed while they were read: stored as read.
    pub changed_files: u64,
    pub changed: Vec<String>,
    /// Unreadable files skipped (`skip_unreadable`) and special files (sockets, devices).
    pub skipped_files: u64,
    pub skipped: Vec<String>,
}

/// One line of the listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub mtime: i64,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Default)]
struct Summary {
    files: u64,
    directories: u64,
    symlinks: u64,
    bytes: u64,
    changed_files: u64,
    changed: Vec<String>,
    skipped_files: u64,
    skipped: Vec<String>,
}

/// `Write` into the pipeline's channel in fixed chunks.
struct ChunkWriter {
    /// Always CHUNK bytes long (zeroed when allocated); `len` of them are filled.
    buf: Vec<u8>,
    len: usize,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChunkWriter {
            buf: vec![0; CHUNK],
            len: 0,
            tx,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let mut chunk = std::mem::replace(&mut self.buf, vec![0; CHUNK]);
        chunk.truncate(std::mem::take(&mut self.len));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        if self.len == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Where the tar goes. A file's contents are read straight into the outgoing chunk: going
/// through `io::copy`'s 8 KiB buffer cost a copy of every byte and eight times the reads.
trait Sink: Write {
    /// One read from `src` into the sink's buffer; the bytes read (0 at its end).
    fn fill_from(&mut self, src: &mut dyn Read) -> io::Result<usize>;
}

impl Sink for ChunkWriter {
    fn fill_from(&mut self, src: &mut dyn Read) -> io::Result<usize> {
        let n = src.read(&mut self.buf[self.len..])?;
        self.len += n;
        if self.len == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
}

/// Reads at most `limit` bytes, hashing them; pads with zeros to `limit` if the file ended
/// early (tar needs exactly the size in the header), noting that it did.
struct Exact<R> {
    inner: R,
    left: u64,
    hasher: Sha256,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        // The padding too: the listing describes what the archive holds, so a restore of
        // a file that shrank while it was read still verifies (it is named as changed).
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

impl<R> Exact<R> {
    fn digest(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

fn note(list: &mut Vec<String>, count: &mut u64, path: &str) {
    *count += 1;
    if list.len() < NAMED {
        list.push(path.to_string());
    }
}

fn mtime(meta: &fs::Metadata) -> i64 {
    meta.mtime()
}

fn tar_err(source: io::Error) -> DirError {
    DirError::Io {
        what: "writing the tar stream".into(),
        source,
    }
}

/// The tar and the listing being written, and the counts that go into the manifest.
struct TreeWriter<D: Sink, L: Write> {
    tar: tar::Builder<D>,
    listing: L,
    summary: Summary,
}

impl<D: Sink, L: Write> TreeWriter<D, L> {
    fn new(data: D, listing: L) -> Self {
        let mut tar = tar::Builder::new(data);
        tar.mode(tar::HeaderMode::Complete);
        tar.follow_symlinks(false);
        TreeWriter {
            tar,
            listing,
            summary: Summary::default(),
        }
    }

    fn line(&mut self, entry: &Entry) -> Result<(), DirError> {
        serde_json::to_writer(&mut self.listing, entry)
            .map_err(io::Error::from)
            .and_then(|()| self.listing.write_all(b"\n"))
            .map_err(|source| DirError::Io {
                what: "writing the listing".into(),
                source,
            })
    }

    fn directory(
        &mut self,
        rel: &Path,
        header: &mut tar::Header,
        mtime: i64,
        mode: u32,
    ) -> Result<(), DirError> {
        self.tar
            .append_data(header, rel, io::empty())
            .map_err(tar_err)?;
        self.line(&Entry {
            path: rel.display().to_string(),
            kind: "dir".into(),
            size: None,
            mtime,
            mode,
            sha256: None,
            target: None,
        })?;
        self.summary.directories += 1;
        Ok(())
    }

    fn symlink(
        &mut self,
        rel: &Path,
        header: &mut tar::Header,
        target: &Path,
        mtime: i64,
        mode: u32,
    ) -> Result<(), DirError> {
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        self.tar.append_link(header, rel, target).map_err(tar_err)?;
        self.line(&Entry {
            path: rel.display().to_string(),
            kind: "symlink".into(),
            size: None,
            mtime,
            mode,
            sha256: None,
            target: Some(target.display().to_string()),
        })?;
        self.summary.symlinks += 1;
        Ok(())
    }

    /// Appends `size` bytes of `reader` (padded if it ends early); the caller checks for
    /// a change and then calls [`TreeWriter::listed`].
    fn append<R: Read>(
        &mut self,
        rel: &Path,
        header: &mut tar::Header,
        reader: R,
        size: u64,
    ) -> io::Result<Exact<R>> {
        header.set_size(size);
        let mut exact = Exact {
            inner: reader,
            left: size,
            hasher: Sha256::new(),
            short: false,
        };
        // The tar crate writes the header (and any long-name entry before it); the
        // contents and their padding to a 512-byte block go to the sink directly.
        self.tar.append_data(header, rel, io::empty())?;
        let sink = self.tar.get_mut();
        while exact.left > 0 {
            // Exact pads a file that ended early, so each read makes progress.
            match sink.fill_from(&mut exact) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let pad = (512 - size % 512) % 512;
        sink.write_all(&[0; 512][..pad as usize])?;
        Ok(exact)
    }

    /// The listing line and counts of a file appended by [`TreeWriter::append`].
    fn listed(
        &mut self,
        rel: &Path,
        sha256: String,
        size: u64,
        mtime: i64,
        mode: u32,
        changed: bool,
    ) -> Result<(), DirError> {
        let shown = rel.display().to_string();
        if changed {
            note(
                &mut self.summary.changed,
                &mut self.summary.changed_files,
                &shown,
            );
        }
        self.line(&Entry {
            path: shown,
            kind: "file".into(),
            size: Some(size),
            mtime,
            mode,
            sha256: Some(sha256),
            target: None,
        })?;
        self.summary.files += 1;
        self.summary.bytes += size;
        Ok(())
    }

    fn skip(&mut self, shown: &str) {
        note(
            &mut self.summary.skipped,
            &mut self.summary.skipped_files,
            shown,
        );
    }

    fn finish(mut self) -> Result<Summary, DirError> {
        self.tar
            .into_inner()
            .and_then(|mut w| w.flush())
            .map_err(tar_err)?;
        self.listing.flush().map_err(|source| DirError::Io {
            what: "writing the listing".into(),
            source,
        })?;
        Ok(self.summary)
    }
}

/// Walks `root` depth first, names sorted, writing the tar to `data` and the listing to
/// `listing`.
fn produce(
    name: &str,
    root: &Path,
    skip_unreadable: bool,
    data: impl Sink,
    listing: impl Write,
) -> Result<Summary, DirError> {
    let io_err = |path: &Path, source: io::Error| DirError::Unreadable {
        name: name.to_string(),
        path: path.display().to_string(),
        source,
    };
    let meta = fs::metadata(root).map_err(|e| io_err(root, e))?;
    if !meta.is_dir() {
        return Err(DirError::NotADirectory {
            name: name.to_string(),
            path: root.display().to_string(),
        });
    }
    let mut w = TreeWriter::new(data, listing);
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let mut names: Vec<std::ffi::OsString> = match fs::read_dir(&abs) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| io_err(&abs, e))?,
            Err(e) if skip_unreadable && !rel.as_os_str().is_empty() => {
                w.skip(&rel.display().to_string());
                tracing::warn!(directory = %name, path = %abs.display(), error = %e, "unreadable directory skipped");
                continue;
            }
            Err(e) => return Err(io_err(&abs, e)),
        };
        names.sort();
        // Reversed onto the stack, so subdirectories come out in name order.
        let mut subdirs = Vec::new();
        for file_name in names {
            let rel_path = rel.join(&file_name);
            let path = root.join(&rel_path);
            let shown = rel_path.display().to_string();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Deleted since the directory was read: nothing to store.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path, e)),
            };
            let mode = meta.permissions().mode() & 0o7777;
            let kind = meta.file_type();
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            if kind.is_dir() {
                w.directory(&rel_path, &mut header, mtime(&meta), mode)?;
                subdirs.push(rel_path);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).map_err(|e| io_err(&path, e))?;
                w.symlink(&rel_path, &mut header, &target, mtime(&meta), mode)?;
            } else if kind.is_file() {
                let file = match fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) if skip_unreadable => {
                        tracing::warn!(directory = %name, path = %path.display(), error = %e, "unreadable file skipped");
                        w.skip(&shown);
                        continue;
                    }
                    Err(e) => return Err(io_err(&path, e)),
                };
                let size = meta.len();
                let exact = w
                    .append(&rel_path, &mut header, file, size)
                    .map_err(|e| io_err(&path, e))?;
                let after = fs::symlink_metadata(&path).ok();
                let changed = exact.short
                    || after.is_none_or(|a| a.len() != size || mtime(&a) != mtime(&meta));
                if changed {
                    tracing::warn!(directory = %name, path = %path.display(), "file changed while it was read; stored as read");
                }
                w.listed(&rel_path, exact.digest(), size, mtime(&meta), mode, changed)?;
            } else {
                // Sockets, FIFOs and devices are not content.
                w.skip(&shown);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    w.finish()
}

/// Objects of an S3 source at most this large are fetched whole, several at a time; larger
/// ones stream when their turn comes. The read-ahead is at most `2 × AHEAD × WHOLE` (the
/// fetches in flight and the channel to the tar writer).
const WHOLE: u64 = 256 * 1024;
const AHEAD: usize = 16;
/// Keys per listing request: the listing is never held whole.
const PAGE: usize = 1000;
/// The longest file name Linux takes (NAME_MAX): a longer key component cannot be restored.
const NAME_MAX: usize = 255;

/// One object of an S3 source, as the tar writer takes it.
struct Fetched {
    info: ObjectInfo,
    body: Body,
}

enum Body {
    /// A folder marker (a key ending in `/`): a directory.
    Folder,
    /// A small object, read ahead (at most `WHOLE + 1` bytes, whatever it has grown to).
    Whole(Vec<u8>),
    /// Opened by the writer when its turn comes.
    Stream,
    /// Deleted since it was listed: nothing to store.
    Gone,
    Failed(StorageError),
}

/// The listing ended: without it, a closed channel means the fetcher died, not the end.
enum Listed {
    Object(Fetched),
    End,
}

/// Reads at most `WHOLE + 1` bytes of `key`: enough to store it or to see that it grew.
async fn read_small(source: &dyn Storage, key: &str) -> Body {
    use tokio::io::AsyncReadExt;
    let mut reader = match source.open_read(key).await {
        Ok(r) => r.take(WHOLE + 1),
        Err(e) if e.is_not_found() => return Body::Gone,
        Err(e) => return Body::Failed(e),
    };
    let mut bytes = Vec::new();
    match reader.read_to_end(&mut bytes).await {
        Ok(_) => Body::Whole(bytes),
        Err(e) => Body::Failed(StorageError::Failed {
            op: "get",
            key: key.to_string(),
            location: source.location(),
            message: e.to_string(),
        }),
    }
}

/// Lists `source` page by page and fetches the small objects ahead, in key order.
async fn fetch_objects(source: Arc<dyn Storage>, tx: mpsc::Sender<Result<Listed, StorageError>>) {
    use futures_util::StreamExt;
    let mut after: Option<String> = None;
    loop {
        let page = match source.list_page("", after.as_deref(), PAGE).await {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        // Everything below relies on sorted pages that move forward (StartAfter honoured):
        // a store that repeats or shuffles them would loop or mix the tree up.
        let mut previous = after.clone();
        for info in &page {
            if previous.as_deref().is_some_and(|p| info.key.as_str() <= p) {
                let _ = tx
                    .send(Err(StorageError::Unsupported {
                        op: "list in key order",
                        key: info.key.clone(),
                        location: source.location(),
                        message: "the store listed keys out of order or ignored StartAfter (S3 Express directory buckets do); a directory source needs an ordered listing".into(),
                    }))
                    .await;
                return;
            }
            previous = Some(info.key.clone());
        }
        let Some(last) = page.last() else {
            let _ = tx.send(Ok(Listed::End)).await;
            return;
        };
        after = Some(last.key.clone());
        let mut fetched = futures_util::stream::iter(page)
            .map(|info| {
                let source = source.clone();
                async move {
                    let body = if info.key.ends_with('/') {
                        Body::Folder
                    } else if info.size > WHOLE {
                        Body::Stream
                    } else {
                        read_small(source.as_ref(), &info.key).await
                    };
                    Fetched { info, body }
                }
            })
            .buffered(AHEAD);
        while let Some(f) = fetched.next().await {
            if tx.send(Ok(Listed::Object(f))).await.is_err() {
                return;
            }
        }
    }
}

/// `key` as a relative path that unpacks inside the output: no empty, `.` or `..`
/// component, none longer than a file name may be, no NUL (a trailing `/` marks a folder).
fn safe_path(key: &str) -> Option<PathBuf> {
    let trimmed = key.strip_suffix('/').unwrap_or(key);
    let fine = !trimmed.is_empty()
        && !trimmed.contains('\0')
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= NAME_MAX);
    fine.then(|| PathBuf::from(trimmed))
}

/// Keys that are files and may have keys below them (`doc` then `doc/page`), which no
/// tree can hold; kept to the current path's ancestors, so memory follows depth, not count.
#[derive(Default)]
struct FileKeys(Vec<String>);

impl FileKeys {
    /// Whether `key` (in listing order) lies below a file already stored.
    fn below_a_file(&mut self, key: &str) -> bool {
        while let Some(top) = self.0.last() {
            let dir = format!("{top}/");
            if key.starts_with(&dir) {
                return true;
            }
            if key > dir.as_str() {
                // Keys sort after `top/` and outside it: none later can be inside it.
                self.0.pop();
            } else {
                // Between `top` and `top/` (`top-2`, `top.txt`): they start with `top`.
                return false;
            }
        }
        false
    }

    /// `key` was stored as a file.
    fn stored(&mut self, key: &str) {
        self.0.push(key.to_string());
    }
}

/// Writes the objects `rx` yields as a tar (regular files, mode 0644, mtime = last
/// modified) and the listing. An object deleted since it was listed is left out; one whose
/// size differs from the listing is stored as read and named as changed.
fn produce_objects(
    name: &str,
    source: &Arc<dyn Storage>,
    skip_unreadable: bool,
    mut rx: mpsc::Receiver<Result<Listed, StorageError>>,
    data: impl Sink,
    listing: impl Write,
) -> Result<Summary, DirError> {
    let handle = tokio::runtime::Handle::current();
    let at = source.location();
    let unreadable = |key: &str, source: io::Error| DirError::Unreadable {
        name: name.to_string(),
        path: format!("{at}/{key}"),
        source,
    };
    let from_source = |source: StorageError| DirError::Source {
        name: name.to_string(),
        source,
    };
    let mut w = TreeWriter::new(data, listing);
    let mut files = FileKeys::default();
    // Returns whether the object was skipped (else the backup fails).
    let failed = |w: &mut TreeWriter<_, _>, key: &str, e: StorageError| {
        if !skip_unreadable {
            return Err(from_source(e));
        }
        tracing::warn!(directory = %name, key, error = %e, "unreadable object skipped");
        w.skip(key);
        Ok(())
    };
    loop {
        let Fetched { info, body } = match rx.blocking_recv() {
            Some(Ok(Listed::Object(f))) => f,
            Some(Ok(Listed::End)) => break,
            Some(Err(e)) => return Err(from_source(e)),
            None => {
                return Err(DirError::Io {
                    what: format!("directory `{name}`: reading {at}"),
                    source: io::Error::other("the listing stopped before its end"),
                })
            }
        };
        let key = info.key.as_str();
        if key.is_empty() {
            // The prefix's own folder marker (`uploads/`): the tree's root.
            continue;
        }
        let mtime = info.modified.map_or(0, |t| t.as_second());
        let Some(rel) = safe_path(key) else {
            tracing::warn!(directory = %name, key, "object key is not a path a tree can hold; skipped");
            w.skip(key);
            continue;
        };
        if files.below_a_file(key) {
            tracing::warn!(directory = %name, key, "object lies below another object's key (a file cannot also be a folder); skipped");
            w.skip(key);
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mtime(mtime.max(0) as u64);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        let (sha256, changed) = match body {
            Body::Gone => continue,
            Body::Failed(e) => {
                failed(&mut w, key, e)?;
                continue;
            }
            Body::Folder => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                w.directory(&rel, &mut header, mtime, 0o755)?;
                continue;
            }
            Body::Whole(bytes) => {
                let changed = bytes.len() as u64 != info.size;
                let exact = w
                    .append(&rel, &mut header, io::Cursor::new(bytes), info.size)
                    .map_err(|e| unreadable(key, e))?;
                let short = exact.short;
                (exact.digest(), changed || short)
            }
            Body::Stream => {
                let reader = match handle.block_on(source.open_read(key)) {
                    Ok(r) => r,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        failed(&mut w, key, e)?;
                        continue;
                    }
                };
                let reader = SyncIoBridge::new_with_handle(reader, handle.clone());
                let mut exact = w
                    .append(&rel, &mut header, reader, info.size)
                    .map_err(|e| unreadable(key, e))?;
                // Replaced by a longer object since it was listed: the rest is not stored.
                let longer = exact
                    .inner
                    .read(&mut [0u8; 1])
                    .map_err(|e| unreadable(key, e))?
                    > 0;
                let short = exact.short;
                (exact.digest(), longer || short)
            }
        };
        if changed {
            tracing::warn!(directory = %name, key, "object changed while it was read; stored as read");
        }
        w.listed(&rel, sha256, info.size, mtime, 0o644, changed)?;
        files.stored(key);
    }
    w.finish()
}

/// Backs up `dir` into `repo`; the manifest is written last.
pub async fn backup(
    repo: &Repository,
    dir: &DirectoryConfig,
    recipients: &Recipients,
    encode: EncodeOptions,
    classes: Vec<String>,
    control: &Control,
) -> Result<DirManifest, DirError> {
    let started_at = Timestamp::now();
    let id = BackupId::new(started_at);
    let name = dir.name.as_str();
    let unit = repo.backup_dir(name, &id);
    let (data_tx, data_rx) = mpsc::channel(4);
    let (list_tx, list_rx) = mpsc::channel(4);
    type Walk = Box<dyn FnOnce(ChunkWriter, ChunkWriter) -> Result<Summary, DirError> + Send>;
    let skip_unreadable = dir.skip_unreadable;
    let owner = name.to_string();
    let (walk, fetcher): (Walk, _) = match dir.source() {
        DirectorySource::Path(root) => {
            let root = root.to_path_buf();
            let walk = move |data, listing| produce(&owner, &root, skip_unreadable, data, listing);
            (Box::new(walk), None)
        }
        DirectorySource::S3(config) => {
            let source = dr_core::storage::open(config).await?;
            let (tx, rx) = mpsc::channel(AHEAD);
            let fetcher = tokio::spawn(fetch_objects(source.clone(), tx));
            let walk = move |data, listing| {
                produce_objects(&owner, &source, skip_unreadable, rx, data, listing)
            };
            (Box::new(walk), Some(fetcher))
        }
    };
    let producer = {
        let (data_err, list_err) = (data_tx.clone(), list_tx.clone());
        tokio::task::spawn_blocking(move || {
            let result = walk(ChunkWriter::new(data_tx), ChunkWriter::new(list_tx));
            if let Err(e) = &result {
                // Fails both uploads: nothing partial is committed.
                let _ = data_err.blocking_send(Err(io::Error::other(e.to_string())));
                let _ = list_err.blocking_send(Err(io::Error::other(e.to_string())));
            }
            result
        })
    };
    let data_key = format!("{unit}/{DATA_OBJECT}");
    let list_key = format!("{unit}/{LISTING_OBJECT}");
    let listing_control = Control {
        cancel: control.cancel.clone(),
        progress: Arc::new(Progress::default()),
    };
    let (data, listing) = tokio::join!(
        encrypt_chunks_to_storage(
            data_rx,
            repo.storage(),
            &data_key,
            recipients,
            encode,
            control
        ),
        // The listing is small next to the tree: one zstd worker is plenty, and memory
        // is the data stream's to spend.
        encrypt_chunks_to_storage(
            list_rx,
            repo.storage(),
            &list_key,
            recipients,
            EncodeOptions {
                threads: 1,
                ..encode
            },
            &listing_control
        ),
    );
    let summary = producer.await.expect("directory walk panicked");
    if let Some(fetcher) = fetcher {
        if summary.is_err() {
            fetcher.abort();
        } else if let Err(e) = fetcher.await {
            // The walk saw the listing's end, so the fetcher has returned; a panic after
            // it still fails the backup rather than commit it.
            return Err(DirError::Io {
                what: format!("directory `{name}`: listing its source"),
                source: io::Error::other(e.to_string()),
            });
        }
    }
    let summary = summary?;
    let (data, listing): (Stored, Stored) = (data?, listing?);
    let object = |name: &str, s: Stored| DirObject {
        name: name.into(),
        raw_bytes: s.raw_bytes,
        stored_bytes: s.stored_bytes,
        sha256: s.sha256,
    };
    let manifest = DirManifest {
        format: FORMAT,
        kind: KIND.into(),
        id: id.to_string(),
        environment: repo.environment().to_string(),
        directory: name.to_string(),
        classes: classes.clone(),
        started_at,
        finished_at: Timestamp::now(),
        dr_version: env!("CARGO_PKG_VERSION").into(),
        objects: vec![object(DATA_OBJECT, data), object(LISTING_OBJECT, listing)],
        recipients: recipients.to_strings(),
        files: summary.files,
        directories: summary.directories,
        symlinks: summary.symlinks,
        bytes: summary.bytes,
        changed_files: summary.changed_files,
        changed: summary.changed,
        skipped_files: summary.skipped_files,
        skipped: summary.skipped,
    };
    let until = repo.locked_until(name, &classes, started_at);
    if let Some(until) = until {
        repo.lock_objects(&unit, &[DATA_OBJECT, LISTING_OBJECT], until)
            .await?;
    }
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    repo.storage()
        .put(&format!("{unit}/{MANIFEST}"), Bytes::from(json))
        .await?;
    if let Some(until) = until {
        repo.lock_objects(&unit, &[MANIFEST], until).await?;
    }
    Ok(manifest)
}

/// Every directory backup of `name`, oldest first.
pub async fn list(repo: &Repository, name: &str) -> Result<Vec<DirManifest>, StorageError> {
    let prefix = format!("{}/{name}/backups/", repo.environment());
    let mut out = Vec::new();
    for o in repo.storage().list(&prefix).await? {
        if !o.key.ends_with(&format!("/{MANIFEST}")) {
            continue;
        }
        let bytes = repo.storage().get(&o.key).await?;
        match serde_json::from_slice::<DirManifest>(&bytes) {
            Ok(m) if m.kind == KIND => out.push(m),
            _ => tracing::warn!(key = %o.key, "not a directory backup manifest; skipped"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct Restored {
    pub directory: String,
    pub backup_id: String,
    pub output: String,
    pub files: u64,
    pub bytes: u64,
    /// Every file's content, size and mode, every symlink's target, checked against the
    /// listing.
    pub verified: u64,
    pub seconds: f64,
}

/// Restores backup `id` (default: the newest) of directory `name` into `output`, then
/// checks the tree against the backup's listing. The archive is verified whole (sha256,
/// age, zstd) in `staging` before anything is written to `output`.
pub async fn restore(
    repo: &Repository,
    name: &str,
    id: Option<&str>,
    output: &Path,
    force: bool,
    identities: Arc<Identities>,
    staging: &Path,
) -> Result<Restored, DirError> {
    let began = std::time::Instant::now();
    let backups = list(repo, name).await?;
    let manifest = match id {
        Some(id) => backups.iter().find(|m| m.id == id),
        None => backups.last(),
    }
    .cloned()
    .ok_or_else(|| DirError::NoBackup {
        name: name.into(),
        which: id.map(|i| format!(" {i}")).unwrap_or_default(),
    })?;
    if output.exists() && !force {
        let empty = fs::read_dir(output)
            .map_err(|source| DirError::Io {
                what: format!("reading {}", output.display()),
                source,
            })?
            .next()
            .is_none();
        if !empty {
            return Err(DirError::NotEmpty(output.display().to_string()));
        }
    }
    let unit = format!("{}/{name}/backups/{}", repo.environment(), manifest.id);
    let data = fetch(
        repo,
        &unit,
        &manifest,
        DATA_OBJECT,
        identities.clone(),
        staging,
    )
    .await?;
    let listing = fetch(repo, &unit, &manifest, LISTING_OBJECT, identities, staging).await?;
    let out = output.to_path_buf();
    let (files, bytes, verified) = tokio::task::spawn_blocking(move || {
        fs::create_dir_all(&out).map_err(|source| DirError::Io {
            what: format!("creating {}", out.display()),
            source,
        })?;
        let mut archive = tar::Archive::new(io::BufReader::new(data));
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        // `unpack` refuses entries with `..` or absolute paths: nothing lands outside `out`.
        archive.unpack(&out).map_err(|source| DirError::Io {
            what: format!("unpacking into {}", out.display()),
            source,
        })?;
        verify_tree(&out, io::BufReader::new(listing))
    })
    .await
    .expect("unpack thread panicked")?;
    Ok(Restored {
        directory: name.into(),
        backup_id: manifest.id.clone(),
        output: output.display().to_string(),
        files,
        bytes,
        verified,
        seconds: began.elapsed().as_secs_f64(),
    })
}

/// Downloads and verifies one object into an anonymous file in `staging`.
async fn fetch(
    repo: &Repository,
    unit: &str,
    manifest: &DirManifest,
    object: &str,
    identities: Arc<Identities>,
    staging: &Path,
) -> Result<fs::File, DirError> {
    let entry = manifest
        .objects
        .iter()
        .find(|o| o.name == object)
        .ok_or_else(|| DirError::Verify {
            key: format!("{unit}/{object}"),
            message: "the manifest does not name it".into(),
        })?;
    let key = format!("{unit}/{object}");
    let reader = repo.storage().open_read(&key).await?;
    let expected = Expected {
        stored_bytes: entry.stored_bytes,
        sha256: entry.sha256.clone(),
        recipients: manifest.recipients.clone(),
    };
    let staging = staging.to_path_buf();
    let key2 = key.clone();
    tokio::task::spawn_blocking(move || {
        let mut file = tempfile::tempfile_in(&staging).map_err(|source| DirError::Io {
            what: format!("creating a staging file in {}", staging.display()),
            source,
        })?;
        decode::decode(
            SyncIoBridge::new(reader),
            &identities,
            &expected,
            &mut file,
            &Progress::default(),
        )
        .map_err(|e| DirError::Verify {
            key: key2.clone(),
            message: e.to_string(),
        })?;
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(0))
            .map_err(|source| DirError::Io {
                what: "rewinding the staging file".into(),
                source,
            })?;
        Ok(file)
    })
    .await
    .expect("decode thread panicked")
}

/// Checks the tree under `root` against the listing: every file's sha256, size and mode,
/// every symlink's target, every directory's presence. Returns (files, bytes, entries).
pub fn verify_tree(root: &Path, listing: impl BufRead) -> Result<(u64, u64, u64), DirError> {
    let (mut files, mut bytes, mut checked) = (0, 0, 0);
    for line in listing.lines() {
        let line = line.map_err(|source| DirError::Io {
            what: "reading the listing".into(),
            source,
        })?;
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| DirError::Mismatch(format!("unreadable listing line: {e}")))?;
        let path = root.join(&entry.path);
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| DirError::Mismatch(format!("{}: {e}", entry.path)))?;
        let mode = meta.permissions().mode() & 0o7777;
        match entry.kind.as_str() {
            "file" => {
                let mut hasher = Sha256::new();
                let mut f = fs::File::open(&path)
                    .map_err(|e| DirError::Mismatch(format!("{}: {e}", entry.path)))?;
                let n = io::copy(&mut f, &mut hasher)
                    .map_err(|e| DirError::Mismatch(format!("{}: {e}", entry.path)))?;
                let sha = hex::encode(hasher.finalize());
                if Some(n) != entry.size || Some(&sha) != entry.sha256.as_ref() {
                    return Err(DirError::Mismatch(format!(
                        "{}: content differs ({n} bytes, sha256 {sha})",
                        entry.path
                    )));
                }
                if mode != entry.mode {
                    return Err(DirError::Mismatch(format!(
                        "{}: mode {mode:o}, listed {:o}",
                        entry.path, entry.mode
                    )));
                }
                files += 1;
                bytes += n;
            }
            "symlink" => {
                let target = fs::read_link(&path)
                    .map_err(|e| DirError::Mismatch(format!("{}: {e}", entry.path)))?;
                if Some(target.display().to_string()) != entry.target {
                    return Err(DirError::Mismatch(format!(
                        "{}: points to {}",
                        entry.path,
                        target.display()
                    )));
                }
            }
            _ => {
                if !meta.is_dir() {
                    return Err(DirError::Mismatch(format!(
                        "{}: not a directory",
                        entry.path
                    )));
                }
            }
        }
        checked += 1;
    }
    Ok((files, bytes, checked))
}

/// One retention decision.
#[derive(Debug, Serialize)]
pub struct Decision {
    pub backup_id: String,
    pub keep: bool,
    pub reason: String,
}

/// Retention, by the rules databases follow: the newest backup of each class and the newest
/// of all are kept, and so are backups of a class without a schedule; otherwise a backup
/// goes once every one of its classes' `keep` has passed (and any Object Lock expired).
/// Manifest first, then the objects.
pub async fn prune(
    repo: &Repository,
    dir: &DirectoryConfig,
    now: Timestamp,
    dry_run: bool,
) -> Result<Vec<Decision>, StorageError> {
    prune_with(repo, dir, &Default::default(), now, dry_run).await
}

/// Like [`prune`], with `overrides` replacing some classes' `keep` (a copy's retention).
pub async fn prune_with(
    repo: &Repository,
    dir: &DirectoryConfig,
    overrides: &std::collections::BTreeMap<String, dr_core::config::Duration>,
    now: Timestamp,
    dry_run: bool,
) -> Result<Vec<Decision>, StorageError> {
    let name = dir.name.as_str();
    let backups = list(repo, name).await?;
    let mut decisions = plan_with(dir, overrides, &backups, now);
    for (d, m) in decisions.iter_mut().zip(&backups) {
        if d.keep {
            continue;
        }
        if let Some(until) = repo
            .locked_until(name, &m.classes, m.started_at)
            .filter(|u| *u > now)
        {
            d.keep = true;
            d.reason = format!("expired, but locked until {until} (object lock)");
        } else if !dry_run {
            let unit = format!("{}/{name}/backups/{}", repo.environment(), m.id);
            repo.storage().delete(&format!("{unit}/{MANIFEST}")).await?;
            for o in repo.storage().list(&format!("{unit}/")).await? {
                repo.storage().delete(&o.key).await?;
            }
        }
    }
    Ok(decisions)
}

/// The retention decision for each of `backups` (in their order), from their manifests
/// alone: Object Lock is not considered.
pub fn plan_with(
    dir: &DirectoryConfig,
    overrides: &std::collections::BTreeMap<String, dr_core::config::Duration>,
    backups: &[DirManifest],
    now: Timestamp,
) -> Vec<Decision> {
    let newest_overall = backups
        .iter()
        .max_by_key(|m| (m.started_at, &m.id))
        .map(|m| &m.id);
    let mut newest_of = std::collections::BTreeMap::new();
    for m in backups {
        for c in &m.classes {
            let newest = newest_of.entry(c.clone()).or_insert(m);
            if (m.started_at, &m.id) > (newest.started_at, &newest.id) {
                *newest = m;
            }
        }
    }
    let keep_of = |class: &str| {
        dir.schedules
            .iter()
            .find(|s| s.class.as_str() == class)
            .map(|s| overrides.get(class).unwrap_or(&s.keep))
    };
    backups
        .iter()
        .map(|m| {
            let decide = |keep: bool, reason: String| Decision {
                backup_id: m.id.clone(),
                keep,
                reason,
            };
            if newest_overall == Some(&m.id)
                || m.classes
                    .iter()
                    .any(|c| newest_of.get(c).map(|n| &n.id) == Some(&m.id))
            {
                decide(true, "newest backup (of its class)".into())
            } else if m.classes.is_empty() || m.classes.iter().any(|c| keep_of(c).is_none()) {
                decide(true, "a class without a schedule, so no `keep`".into())
            } else if let Some(c) = m
                .classes
                .iter()
                .find(|c| m.started_at > keep_of(c).expect("checked").before(now))
            {
                decide(true, format!("within {c} keep"))
            } else {
                decide(false, "older than every class's keep".into())
            }
        })
        .collect()
}

/// Objects of directory backups that never got a manifest (a failed or killed backup or
/// copy), old enough that nothing can still be writing them: the backup id is older than
/// `max_backup` plus an hour and the object was not written in the last hour, as for
/// databases. Deleted unless `dry_run`; returns their keys.
pub async fn prune_leftovers(
    repo: &Repository,
    name: &str,
    now: Timestamp,
    max_backup: std::time::Duration,
    dry_run: bool,
) -> Result<Vec<String>, StorageError> {
    let prefix = format!("{}/{name}/backups/", repo.environment());
    let keys = repo.storage().list(&prefix).await?;
    let committed: std::collections::BTreeSet<String> = keys
        .iter()
        .filter_map(|o| o.key.strip_suffix(&format!("/{MANIFEST}")))
        .filter_map(|unit| unit.rsplit('/').next())
        .map(str::to_string)
        .collect();
    let max_backup_seconds = i64::try_from(max_backup.as_secs()).unwrap_or(i64::MAX / 2);
    let leftovers = dr_core::retention::orphans(&keys, &committed, now, max_backup_seconds);
    if !dry_run {
        for key in &leftovers {
            repo.storage().delete(key).await?;
            tracing::info!(key, "removed an object no manifest refers to");
        }
    }
    Ok(leftovers)
}

/// The `[[directories]]` entry named `name`.
pub fn configured<'a>(config: &'a Config, name: &str) -> Option<&'a DirectoryConfig> {
    config.directories.iter().find(|d| d.name.as_str() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_ends_early_is_padded_and_noted() {
        let mut exact = Exact {
            inner: &b"abc"[..],
            left: 5,
            hasher: Sha256::new(),
            short: false,
        };
        let mut out = Vec::new();
        exact.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        assert!(exact.short);
        // The listing's digest is of what the archive holds, so the restore verifies.
        assert_eq!(exact.digest(), hex::encode(Sha256::digest(b"abc\0\0")));
    }

    #[test]
    fn only_keys_that_unpack_inside_the_output_are_paths() {
        assert_eq!(safe_path("a/b.txt"), Some(PathBuf::from("a/b.txt")));
        assert_eq!(safe_path("folder/"), Some(PathBuf::from("folder")));
        for bad in [
            "", "/", "/abs", "a//b", "a/../b", "..", "./a", "a/.", "nul\0",
        ] {
            assert_eq!(safe_path(bad), None, "{bad:?}");
        }
    }

    /// Runs `produce_objects` over `listed` (as the fetcher would send it) with `source`
    /// for the streamed objects; the archive's entries (path, contents) and the summary.
    async fn objects_as_produced(
        source: Arc<dyn Storage>,
        listed: Vec<Listed>,
        skip_unreadable: bool,
    ) -> Result<(Vec<(String, Vec<u8>)>, Summary), DirError> {
        let (tx, rx) = mpsc::channel(listed.len() + 1);
        for item in listed {
            tx.send(Ok(item)).await.unwrap();
        }
        drop(tx);
        let (data_tx, mut data_rx) = mpsc::channel(1024);
        let (list_tx, _list_rx) = mpsc::channel(1024);
        let summary = tokio::task::spawn_blocking(move || {
            produce_objects(
                "uploads",
                &source,
                skip_unreadable,
                rx,
                ChunkWriter::new(data_tx),
                ChunkWriter::new(list_tx),
            )
        })
        .await
        .unwrap()?;
        let mut tar = Vec::new();
        while let Some(chunk) = data_rx.recv().await {
            tar.extend_from_slice(&chunk.unwrap());
        }
        let mut archive = tar::Archive::new(&tar[..]);
        let entries = archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let mut body = Vec::new();
                e.read_to_end(&mut body).unwrap();
                (path, body)
            })
            .collect();
        Ok((entries, summary))
    }

    /// A store to stream objects from, empty (the temporary directory lives as long as it).
    fn empty_source() -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(dr_core::storage::file::FileStorage::new(dir.path().into()));
        (dir, source)
    }

    fn names(entries: &[(String, Vec<u8>)]) -> Vec<&str> {
        entries.iter().map(|(p, _)| p.as_str()).collect()
    }

    fn object(key: &str, size: u64, body: Body) -> Listed {
        let info = ObjectInfo {
            key: key.into(),
            size,
            modified: None,
        };
        Listed::Object(Fetched { info, body })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn objects_changed_or_deleted_after_the_listing_are_named_or_left_out() {
        let (_dir, source) = empty_source();
        // Streamed objects: one grew after the listing, one shrank, one is as listed.
        let big = WHOLE as usize + 4096;
        source
            .put("grown", vec![1u8; big + 10].into())
            .await
            .unwrap();
        source
            .put("shrunk", vec![2u8; big - 10].into())
            .await
            .unwrap();
        source.put("steady", vec![3u8; big].into()).await.unwrap();
        let listed = vec![
            object("a", 3, Body::Whole(b"abc".to_vec())),
            object("b-longer", 3, Body::Whole(b"abcd".to_vec())),
            object("c-shorter", 3, Body::Whole(b"ab".to_vec())),
            object("d-deleted", 3, Body::Gone),
            object("e-deleted-streamed", big as u64, Body::Stream),
            object("grown", big as u64, Body::Stream),
            object("shrunk", big as u64, Body::Stream),
            object("steady", big as u64, Body::Stream),
            Listed::End,
        ];
        let (entries, summary) = objects_as_produced(source, listed, false).await.unwrap();
        // Deleted objects are left out; the rest are stored at their listed size.
        assert_eq!(
            names(&entries),
            ["a", "b-longer", "c-shorter", "grown", "shrunk", "steady"]
        );
        assert_eq!(entries[1].1, b"abc");
        assert_eq!(entries[2].1, b"ab\0");
        assert_eq!(entries[3].1, vec![1u8; big]);
        assert_eq!(entries[4].1.len(), big);
        assert_eq!(entries[5].1, vec![3u8; big]);
        assert_eq!(summary.files, 6);
        assert_eq!(
            summary.changed,
            ["b-longer", "c-shorter", "grown", "shrunk"]
        );
        assert_eq!(summary.changed_files, 4);
        assert_eq!(summary.skipped_files, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_object_fails_the_backup_unless_skip_unreadable() {
        let (_dir, source) = empty_source();
        let denied = || StorageError::Failed {
            op: "get",
            key: "secret".into(),
            location: "s3://bucket/uploads".into(),
            message: "AccessDenied".into(),
        };
        let listed = || {
            vec![
                object("a", 1, Body::Whole(b"a".to_vec())),
                object("secret", 1, Body::Failed(denied())),
                object("z", 1, Body::Whole(b"z".to_vec())),
                Listed::End,
            ]
        };
        let err = objects_as_produced(source.clone(), listed(), false)
            .await
            .err()
            .expect("an unreadable object fails the backup");
        let shown = err.to_string();
        assert!(
            shown.contains("uploads") && shown.contains("AccessDenied"),
            "{shown}"
        );

        let (entries, summary) = objects_as_produced(source, listed(), true).await.unwrap();
        assert_eq!(names(&entries), ["a", "z"]);
        assert_eq!(summary.skipped, ["secret"]);
        assert_eq!(summary.skipped_files, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_that_stops_before_its_end_fails_the_backup() {
        let (_dir, source) = empty_source();
        // The fetcher died: no end marker, the channel just closes.
        let listed = vec![object("a", 1, Body::Whole(b"a".to_vec()))];
        let err = objects_as_produced(source, listed, false).await.err();
        assert!(
            err.is_some_and(|e| e.to_string().contains("before its end")),
            "a short listing must not commit a short tree"
        );
    }

    #[test]
    fn a_key_below_a_stored_file_is_found_in_listing_order() {
        let mut files = FileKeys::default();
        let mut below = Vec::new();
        // Sorted as S3 lists them: `-` and `.` sort before `/`.
        for key in [
            "doc", "doc-2", "doc-2/x", "doc.txt", "doc/", "doc/page", "docs/a", "e",
        ] {
            if files.below_a_file(key) {
                below.push(key);
            } else if !key.ends_with('/') {
                files.stored(key);
            }
        }
        assert_eq!(below, ["doc-2/x", "doc/", "doc/page"]);
        // Only the current path's ancestors are held.
        assert!(files.0.len() <= 2, "{:?}", files.0);
    }
}
