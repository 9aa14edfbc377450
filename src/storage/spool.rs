//! A client stream's items between their arrival and their write: encoded at once as
//! binary COPY rows, kept in a small buffer in memory, then appended to a spill file of
//! the stream's own. A stream holds no database connection while it spools; it takes
//! one to write (`service::streams`).
//!
//! The server's spool ([`Spooler`]) is a directory of its own inside the configured one,
//! locked (`flock`) while the server lives; a server starting cleans every directory
//! whose lock nobody holds (a crashed or killed server's), so spill files never outlive
//! their server. Memory and disk are each bounded server-wide ([`SpoolSettings`]): a
//! stream that finds the memory budget spent spills at once; one that finds the disk
//! budget spent fails with RESOURCE_EXHAUSTED and RetryInfo, nothing stored.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{copy::CopyEncoder, items::FeedTable, streams::FeedCopy};
use crate::domain::Participation;
use crate::error::Error;

/// Bytes of rows a spooling stream keeps in memory before it appends them to its file.
const MEMORY_CHUNK: usize = 8 * 1024;
/// Bytes of rows a stream being written sends to the database (and spills) at once.
const WRITE_CHUNK: usize = 256 * 1024;
/// Bytes of a spill file read (in one blocking call) and sent at once.
const READ_CHUNK: u64 = 1 << 20;
/// Arriving this fast makes a stream a bulk upload, written as it arrives: this many
/// bytes within [`BULK_WINDOW`]. A live feed sends a few hundred bytes a second.
const BULK_BYTES: u64 = 512 * 1024;
const BULK_WINDOW: Duration = Duration::from_secs(1);
/// How long a stream whose spool is full is told to wait before retrying.
const SPOOL_RETRY: Duration = Duration::from_secs(5);
/// The name of the spool directory of each server (`instance-<uuid>`) and of its lock
/// file beside it (`instance-<uuid>.lock`).
const INSTANCE: &str = "instance-";
const LOCK: &str = ".lock";

/// Where streams spool, and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    /// The directory this server's spool directory goes into (created when missing).
    pub dir: PathBuf,
    /// Bytes all streams together may keep in memory; past it, streams spill at once.
    pub memory_bytes: u64,
    /// Bytes all streams' spill files together may hold.
    pub disk_bytes: u64,
    /// Bytes one stream may spool (memory and disk).
    pub max_stream_bytes: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            dir: std::env::temp_dir().join("krisp-ingest-spool"),
            memory_bytes: 512 << 20,
            disk_bytes: 8 << 30,
            max_stream_bytes: 2 << 30,
        }
    }
}

/// The server's spool: its directory, its lock, and the budgets.
#[derive(Debug)]
pub struct Spooler {
    dir: PathBuf,
    lock: PathBuf,
    _locked: File,
    memory: Budget,
    disk: Budget,
    max_stream_bytes: u64,
}

impl Spooler {
    /// Creates this server's spool directory under `settings.dir`, after removing those
    /// of servers that are gone.
    pub fn open(settings: &SpoolSettings) -> anyhow::Result<Self> {
        let parent = &settings.dir;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the spool directory {}", parent.display()))?;
        let removed = clean(parent)?;
        if removed > 0 {
            tracing::info!(removed, dir = %parent.display(), "removed the spools of servers that are gone");
        }
        let name = format!("{INSTANCE}{}", Uuid::now_v7());
        // The lock first, then the directory: a directory without a locked file beside
        // it is always a dead server's.
        let lock = parent.join(format!("{name}{LOCK}"));
        let locked = File::create(&lock)
            .with_context(|| format!("cannot create the spool lock {}", lock.display()))?;
        locked
            .try_lock()
            .with_context(|| format!("cannot lock {}", lock.display()))?;
        let dir = parent.join(name);
        std::fs::create_dir(&dir)
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        Ok(Self {
            dir,
            lock,
            _locked: locked,
            memory: Budget::new(settings.memory_bytes, "memory"),
            disk: Budget::new(settings.disk_bytes, "disk"),
            max_stream_bytes: settings.max_stream_bytes,
        })
    }

    /// This server's spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An empty spool for one stream.
    pub fn spool(self: &Arc<Self>) -> Spool {
        Spool {
            spooler: Arc::clone(self),
            rows: CopyEncoder::rows(0),
            in_memory: 0,
            file: None,
            on_disk: 0,
            digest: Sha256::new(),
            window: (Instant::now(), 0),
            keep: true,
        }
    }
}

impl Drop for Spooler {
    fn drop(&mut self) {
        // Every spool holds the spooler: none is left when it goes.
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Removes the spool directories in `parent` whose server is gone (its lock is free or
/// missing); returns how many.
fn clean(parent: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let entries = std::fs::read_dir(parent)
        .with_context(|| format!("cannot read the spool directory {}", parent.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(INSTANCE) || name.ends_with(LOCK) {
            continue;
        }
        let lock = parent.join(format!("{name}{LOCK}"));
        let gone = match File::open(&lock) {
            Ok(file) => file.try_lock().is_ok(),
            Err(error) => error.kind() == std::io::ErrorKind::NotFound,
        };
        if gone {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the dead spool {}", path.display()))?;
            let _ = std::fs::remove_file(&lock);
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bytes the streams together may hold in one medium, shown as `krisp_spool_bytes`.
#[derive(Debug)]
struct Budget {
    limit: u64,
    used: AtomicU64,
    medium: &'static str,
}

impl Budget {
    fn new(limit: u64, medium: &'static str) -> Self {
        metrics::gauge!(crate::metrics::SPOOL_BUDGET_BYTES, "medium" => medium).set(limit as f64);
        metrics::gauge!(crate::metrics::SPOOL_BYTES, "medium" => medium).set(0.0);
        Self {
            limit,
            used: AtomicU64::new(0),
            medium,
        }
    }

    /// Takes `bytes` if they fit.
    fn take(&self, bytes: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            });
        if let Ok(before) = taken {
            self.show(before + bytes);
        }
        taken.is_ok()
    }

    fn give(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.show(before - bytes);
    }

    fn show(&self, used: u64) {
        metrics::gauge!(crate::metrics::SPOOL_BYTES, "medium" => self.medium).set(used as f64);
    }
}

/// One stream's spooled items: rows in its spill file, then rows in memory. The rows in
/// the file are exactly those a write in progress has sent to the database; the rows in
/// memory, none of them.
pub struct Spool {
    spooler: Arc<Spooler>,
    /// Rows not in the file, without the COPY header.
    rows: CopyEncoder,
    /// Bytes of `rows` taken from the memory budget (all of them, or none of a batch the
    /// budget could not take: those are spilled at once).
    in_memory: u64,
    file: Option<PathBuf>,
    /// Bytes in the file (taken from the disk budget).
    on_disk: u64,
    /// SHA-256 over each item's own COPY columns, in order: two streams carry the same
    /// items exactly when their digests are equal.
    digest: Sha256,
    /// When the current window began, and the bytes spooled in it.
    window: (Instant, u64),
    /// `false`: only the digest is kept (the stream is a replay).
    keep: bool,
}

impl Spool {
    /// Encodes one item as its row.
    pub fn push<T: FeedTable>(
        &mut self,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &T,
    ) -> Result<(), Error> {
        let before = self.rows.len();
        self.rows
            .row(4 + T::ITEM_COLUMNS)
            .uuid(id)
            .uuid(participation.user_id)
            .uuid(participation.id)
            .uuid(stream_id);
        let start = self.rows.len();
        item.encode_columns(&mut self.rows)?;
        self.digest.update(self.rows.since(start));
        if !self.keep {
            self.rows.clear();
            return Ok(());
        }
        let added = (self.rows.len() - before) as u64;
        if self.on_disk + self.rows.len() as u64 > self.spooler.max_stream_bytes {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "the stream carries more than the server's limit of {} bytes, so nothing \
                     was stored: split it into several streams",
                    self.spooler.max_stream_bytes
                ),
                retry_after: None,
            });
        }
        let (began, bytes) = &mut self.window;
        if began.elapsed() > BULK_WINDOW {
            *began = Instant::now();
            *bytes = 0;
        }
        *bytes += added;
        Ok(())
    }

    /// Whether the stream sends as fast as a bulk upload.
    pub fn is_bulk(&self) -> bool {
        self.window.1 >= BULK_BYTES
    }

    /// From now on, keeps only the digest (a replay's items are compared, not stored).
    pub fn discard(&mut self) {
        self.keep = false;
        self.release_memory();
        self.rows = CopyEncoder::rows(0);
    }

    /// The digest of the items pushed so far.
    pub fn digest(&self) -> Vec<u8> {
        self.digest.clone().finalize().to_vec()
    }

    /// Takes the memory of the rows pushed since the last call from the budget (once per
    /// batch, not per item), then appends the rows in memory to the file when they are
    /// enough or the budget is spent; with `copy`, a write in progress, also sends them.
    pub async fn spill_if_due(&mut self, copy: Option<&mut FeedCopy<'_>>) -> Result<(), Error> {
        let chunk = if copy.is_some() {
            WRITE_CHUNK
        } else {
            MEMORY_CHUNK
        };
        let pushed = (self.rows.len() as u64).saturating_sub(self.in_memory);
        if pushed > 0 && self.spooler.memory.take(pushed) {
            self.in_memory += pushed;
        }
        let unbudgeted = self.in_memory < self.rows.len() as u64;
        if self.rows.len() >= chunk || (unbudgeted && !self.rows.is_empty()) {
            self.spill(copy).await?;
        }
        Ok(())
    }

    /// Sends what the file holds to `copy`, then the rows in memory: spilled on the way
    /// when `more` items may follow (so that the file again holds what was sent), left
    /// in memory otherwise ([`Spool::send_rest`] sends them).
    pub async fn send_spooled(&mut self, copy: &mut FeedCopy<'_>, more: bool) -> Result<(), Error> {
        if let Some(path) = &self.file {
            let mut offset = 0;
            while offset < self.on_disk {
                let len = (self.on_disk - offset).min(READ_CHUNK);
                let path = path.clone();
                let chunk = tokio::task::spawn_blocking(move || read_at(&path, offset, len))
                    .await
                    .map_err(Error::internal)?
                    .map_err(spool_failed)?;
                copy.send(&chunk).await?;
                offset += len;
            }
        }
        if more && !self.rows.is_empty() {
            self.spill(Some(copy)).await?;
        }
        Ok(())
    }

    /// Sends the rows in memory (the last ones of a stream) to `copy`.
    pub async fn send_rest(&mut self, copy: &mut FeedCopy<'_>) -> Result<(), Error> {
        let rows = self.rows.take();
        self.release_memory();
        copy.send(&rows).await
    }

    /// Appends the rows in memory to the file (and sends them to `copy`).
    async fn spill(&mut self, copy: Option<&mut FeedCopy<'_>>) -> Result<(), Error> {
        let rows = self.rows.take();
        self.release_memory();
        if let Some(copy) = copy {
            copy.send(&rows).await?;
        }
        let bytes = rows.len() as u64;
        if !self.spooler.disk.take(bytes) {
            return Err(Error::ResourceExhausted {
                message: "the server's spool for open streams is full, so nothing was \
                          stored: retry after the delay in RetryInfo"
                    .to_owned(),
                retry_after: Some(SPOOL_RETRY),
            });
        }
        // Counted before the write, so that a failed write is given back on drop.
        self.on_disk += bytes;
        let path = self
            .file
            .get_or_insert_with(|| self.spooler.dir.join(format!("{}.rows", Uuid::now_v7())))
            .clone();
        let appended = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(&rows)
        })
        .await
        .map_err(Error::internal)?;
        appended.map_err(spool_failed)
    }

    fn release_memory(&mut self) {
        self.spooler
            .memory
            .give(std::mem::take(&mut self.in_memory));
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.release_memory();
        if let Some(path) = self.file.take()
            && let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %path.display(), "cannot remove a spill file");
        }
        self.spooler.disk.give(self.on_disk);
    }
}

/// `len` bytes of the file at `path` from `offset`.
fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut chunk = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
    file.read_exact(&mut chunk)?;
    Ok(chunk)
}

/// A spill file that cannot be written or read: the server's disk, not the client.
fn spool_failed(error: std::io::Error) -> Error {
    Error::internal(anyhow::anyhow!("the stream's spill file failed: {error}"))
}
