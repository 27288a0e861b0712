//! Encrypted spill files: what DataFusion writes to disk under memory pressure (sort runs,
//! aggregation and join state, repartition overflow) never reaches the disk in plaintext.
//!
//! DataFusion 55 routes every spill through its `DiskManager`, which can delegate to a custom
//! [`TempFileFactory`]. [`EncryptedSpill`] is such a factory: each spill file is an ordinary
//! ppml file (header + AES-256-GCM segments of [`DEFAULT_SEGMENT_SIZE`]) under a random data
//! key that is drawn when the factory is created and exists only in this process's memory
//! (zeroed on drop; its key reference names no KMS and wraps nothing). Every file gets a fresh
//! random dataset id that the reader checks, so a file cannot be swapped for another spill
//! file of the same process either. Files are named `ppml-spill-<random hex>.ppml`, created
//! with mode 0600 (`create_new`) in a directory created with mode 0700, and deleted once the
//! [`SpillFile`] and every reader and writer of it are dropped.
//!
//! # How DataFusion uses a spill file, and what this backend does about it
//!
//! - A file is written once, through the single writer of [`SpillFile::open_writer`], then
//!   [`SpillWriter::finish`]ed. A second `open_writer` is refused.
//! - A finished file may be read several times, sequentially or concurrently (joins and
//!   replayed inputs re-read their spill): every [`SpillFile::read_stream`] opens its own file
//!   handle and decrypts independently.
//! - RepartitionExec's spill pool reads a file *while it is being written*: after each batch
//!   the writer flushes and the reader may read everything written so far. The ppml format
//!   only seals whole segments (only the last may be short), so on `flush` the writer
//!   publishes the plaintext of its not-yet-sealed last segment (at most one segment) to the
//!   readers *in memory*; the bytes on disk are always sealed segments. A reader that has
//!   consumed everything published waits (asynchronously) for the next flush or the finish; if
//!   the writer is dropped without `finish`, readers fail.
//! - Reads decrypt one segment (64 KiB) per step on tokio's blocking pool and hold no thread
//!   between steps (like `tokio::fs`, which DataFusion's own backend uses: holding a blocking
//!   thread per open spill file could exhaust the pool when a merge opens many files). A file
//!   is never held in memory as a whole.
//! - Any modification, reordering, truncation or extension of a spill file makes its reader
//!   fail with an error naming the file; the segment layout expected is known from the writer,
//!   not taken from the disk.
//!
//! # Quota and accounting
//!
//! The trait contract leaves quota enforcement to custom backends: DataFusion's `DiskManager`
//! does not count custom files (its `used_disk_space()` and `spilling_progress()` stay at 0).
//! [`EncryptedSpill`] therefore keeps its own account of the ciphertext bytes on disk and
//! refuses writes beyond [`EncryptedSpill::max_bytes`] (DataFusion's default of 100 GiB unless
//! set), with DataFusion's error message. See [`EncryptedSpill::used_bytes`] and
//! [`EncryptedSpill::active_files`]. The limit is the factory's: changing the disk manager's
//! `max_temp_directory_size` later does not reach it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use datafusion::common::human_readable_size;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::disk_manager::{
    DEFAULT_MAX_TEMP_DIRECTORY_SIZE, DiskManagerBuilder, DiskManagerMode,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SpillFile, SpillWriter, TempFileFactory};
use futures::Stream;
use ppml_format::{
    DEFAULT_SEGMENT_SIZE, DataKey, EncryptingWriter, FileCipher, FormatError, Header, KeyReference,
    TAG_LEN, UnverifiedHeader,
};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::EngineError;

/// Plaintext bytes per segment of a spill file.
const SEGMENT: usize = DEFAULT_SEGMENT_SIZE as usize;
/// Bytes on disk of a full (non-final) segment.
const SEGMENT_ON_DISK: u64 = (SEGMENT + TAG_LEN) as u64;
/// KMS id written in spill-file headers: the key never leaves the process.
const SPILL_KMS: &str = "process:spill";
/// Key id written in spill-file headers.
const SPILL_KEY_ID: &str = "ephemeral";
/// Stands in for the wrapped key, which does not exist (the header requires non-empty bytes).
const NOT_WRAPPED: &[u8] = b"not wrapped: the spill key never leaves the process";

/// Spill files encrypted under a random key that exists only in this process's memory.
///
/// Use it as DataFusion's disk manager with [`EncryptedSpill::disk_manager_builder`]:
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use datafusion::execution::runtime_env::RuntimeEnvBuilder;
/// use datafusion::prelude::{SessionConfig, SessionContext};
/// use ppml_engine::spill::EncryptedSpill;
///
/// let spill = Arc::new(EncryptedSpill::new("/var/tmp/my-private-spill-dir")?);
/// let runtime = RuntimeEnvBuilder::new()
///     .with_memory_limit(512 << 20, 1.0)
///     .with_disk_manager_builder(spill.disk_manager_builder())
///     .build_arc()?;
/// let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
/// # Ok(()) }
/// ```
pub struct EncryptedSpill {
    dir: PathBuf,
    key: Arc<SpillKey>,
    usage: Arc<Usage>,
}

/// The process-local data key and the header's stand-in key reference.
struct SpillKey {
    /// Zeroed on drop ([`DataKey`] is `ZeroizeOnDrop`).
    key: DataKey,
    key_ref: KeyReference,
}

/// Disk accounting shared by the factory and its files.
struct Usage {
    used: AtomicU64,
    max: AtomicU64,
    active: AtomicUsize,
    created: AtomicU64,
}

impl Usage {
    /// Books `len` more bytes on disk, or fails like DataFusion's own disk manager.
    fn reserve(&self, len: u64) -> io::Result<()> {
        let total = self.used.fetch_add(len, Ordering::Relaxed) + len;
        let limit = self.max.load(Ordering::Relaxed);
        if total > limit {
            self.used.fetch_sub(len, Ordering::Relaxed);
            return Err(io::Error::other(format!(
                "The used disk space during the spilling process has exceeded the allowable \
                 limit of {} (encrypted spill)",
                human_readable_size(limit.try_into().unwrap_or(usize::MAX))
            )));
        }
        Ok(())
    }

    fn release(&self, len: u64) {
        if len > 0 {
            self.used.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for EncryptedSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedSpill")
            .field("dir", &self.dir)
            .field("used_bytes", &self.used_bytes())
            .field("active_files", &self.active_files())
            .finish_non_exhaustive()
    }
}

impl EncryptedSpill {
    /// Spill files go to `dir` (created 0700 if missing); the key is drawn fresh.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, EngineError> {
        let dir = dir.into();
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(EngineError::io(
                    &dir,
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        "spill path is not a directory",
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                private_dir_builder(true)
                    .create(&dir)
                    .map_err(|e| EngineError::io(&dir, e))?;
            }
            Err(e) => return Err(EngineError::io(&dir, e)),
        }
        let key = DataKey::generate().map_err(|e| EngineError::format("spill key", e))?;
        Ok(EncryptedSpill {
            dir,
            key: Arc::new(SpillKey {
                key,
                key_ref: KeyReference::new(SPILL_KMS, SPILL_KEY_ID, NOT_WRAPPED.to_vec()),
            }),
            usage: Arc::new(Usage {
                used: AtomicU64::new(0),
                max: AtomicU64::new(DEFAULT_MAX_TEMP_DIRECTORY_SIZE),
                active: AtomicUsize::new(0),
                created: AtomicU64::new(0),
            }),
        })
    }

    /// A DiskManagerBuilder (or whatever RuntimeEnvBuilder needs) that uses this factory.
    ///
    /// Pass it to `RuntimeEnvBuilder::with_disk_manager_builder`. Its
    /// `max_temp_directory_size` is set to [`EncryptedSpill::max_bytes`] for reporting; the
    /// limit enforced is this factory's.
    pub fn disk_manager_builder(self: Arc<Self>) -> DiskManagerBuilder {
        let max = self.max_bytes();
        DiskManagerBuilder::default()
            .with_temp_file_factory(self)
            .with_max_temp_directory_size(max)
    }

    /// The directory spill files are written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Ciphertext bytes currently on disk in this factory's spill files.
    pub fn used_bytes(&self) -> u64 {
        self.usage.used.load(Ordering::Relaxed)
    }

    /// Spill files that exist now (created and not yet deleted).
    pub fn active_files(&self) -> usize {
        self.usage.active.load(Ordering::Relaxed)
    }

    /// Spill files created since this factory was made.
    pub fn files_created(&self) -> u64 {
        self.usage.created.load(Ordering::Relaxed)
    }

    /// The most ciphertext bytes the spill files may hold together; writes beyond it fail.
    pub fn max_bytes(&self) -> u64 {
        self.usage.max.load(Ordering::Relaxed)
    }

    /// Sets [`EncryptedSpill::max_bytes`]; takes effect for the next write.
    pub fn set_max_bytes(&self, max: u64) {
        self.usage.max.store(max, Ordering::Relaxed);
    }

    /// Creates a new, empty spill file (mode 0600, never an existing path).
    fn create_file(&self) -> io::Result<(PathBuf, File, [u8; 16])> {
        let mut dataset_id = [0u8; 16];
        fill_random(&mut dataset_id)?;
        let mut attempts = 0;
        loop {
            let mut name = [0u8; 16];
            fill_random(&mut name)?;
            let path = self
                .dir
                .join(format!("ppml-spill-{}.ppml", crate::hex_lower(&name)));
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(&path) {
                Ok(file) => return Ok((path, file, dataset_id)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl TempFileFactory for EncryptedSpill {
    fn create_temp_file(&self, description: &str) -> DfResult<Arc<dyn SpillFile>> {
        let (path, file, dataset_id) = self.create_file().map_err(|e| {
            DataFusionError::IoError(e).context(format!(
                "creating an encrypted spill file in {} for {description}",
                self.dir.display()
            ))
        })?;
        self.usage.active.fetch_add(1, Ordering::Relaxed);
        self.usage.created.fetch_add(1, Ordering::Relaxed);
        let (changed, _) = watch::channel(());
        Ok(Arc::new(EncryptedSpillFile {
            shared: Arc::new(FileShared {
                path,
                dataset_id,
                key: Arc::clone(&self.key),
                usage: Arc::clone(&self.usage),
                disk_bytes: AtomicU64::new(0),
                unopened: Mutex::new(Some(file)),
                progress: Mutex::new(Progress {
                    state: State::Created,
                    sealed: 0,
                    tail: Bytes::new(),
                    plain_len: 0,
                }),
                changed,
            }),
        }))
    }
}

/// State of one spill file shared by its handle, its writer and its readers. The file is
/// deleted when the last of them is dropped.
struct FileShared {
    path: PathBuf,
    dataset_id: [u8; 16],
    key: Arc<SpillKey>,
    usage: Arc<Usage>,
    /// Ciphertext bytes written to the file.
    disk_bytes: AtomicU64,
    /// The file as created, until the writer takes it.
    unopened: Mutex<Option<File>>,
    /// What readers may read.
    progress: Mutex<Progress>,
    /// Bumped whenever `progress` changes, to wake waiting readers.
    changed: watch::Sender<()>,
}

/// What the writer has published to readers.
#[derive(Clone)]
struct Progress {
    state: State,
    /// Full segments sealed on disk (while writing), or, once finished, the index of the final
    /// segment (all before it are full).
    sealed: u64,
    /// While writing: the plaintext after the sealed segments, published by the last flush.
    tail: Bytes,
    /// Plaintext bytes readable: `sealed * SEGMENT + tail.len()` while writing, the total once
    /// finished.
    plain_len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No writer yet.
    Created,
    Writing,
    Finished,
    /// The writer was dropped or failed before `finish`.
    Abandoned,
}

impl FileShared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, update: impl FnOnce(&mut Progress)) {
        update(&mut self.progress());
        self.changed.send_replace(());
    }

    fn describe(&self) -> String {
        format!("encrypted spill file {}", self.path.display())
    }
}

impl Drop for FileShared {
    fn drop(&mut self) {
        // Best effort: a session's spill directory may already be gone with everything in it.
        let _ = fs::remove_file(&self.path);
        self.usage.release(self.disk_bytes.load(Ordering::Relaxed));
        self.usage.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One spill file, as handed to DataFusion.
struct EncryptedSpillFile {
    shared: Arc<FileShared>,
}

impl std::fmt::Debug for EncryptedSpillFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedSpillFile")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl SpillFile for EncryptedSpillFile {
    /// The ciphertext file (DataFusion uses the path for debug output only).
    fn path(&self) -> Option<&Path> {
        Some(&self.shared.path)
    }

    /// Ciphertext bytes on disk, header and tags included.
    fn size(&self) -> Option<u64> {
        Some(self.shared.disk_bytes.load(Ordering::Relaxed))
    }

    fn read_stream(&self) -> DfResult<Pin<Box<dyn Stream<Item = DfResult<Bytes>> + Send>>> {
        let reader = SpillReader {
            shared: Arc::clone(&self.shared),
            open: None,
            next_segment: 0,
            delivered: 0,
        };
        let changes = self.shared.changed.subscribe();
        Ok(Box::pin(futures::stream::try_unfold(
            (reader, changes),
            |(mut reader, mut changes)| async move {
                loop {
                    // Mark the current version seen *before* looking at the progress, so that a
                    // publication racing with this step wakes the wait below.
                    changes.borrow_and_update();
                    let (back, step) = run_blocking(move || {
                        let step = reader.step();
                        (reader, step)
                    })
                    .await?;
                    reader = back;
                    match step? {
                        Step::Chunk(chunk) => return Ok(Some((chunk, (reader, changes)))),
                        Step::End => return Ok(None),
                        Step::Wait => {
                            // The sender lives in `shared`, which the reader keeps alive.
                            let _ = changes.changed().await;
                        }
                    }
                }
            },
        )))
    }

    fn open_writer(&self) -> DfResult<Box<dyn SpillWriter>> {
        let shared = &self.shared;
        let file = shared
            .unopened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                DataFusionError::Execution(format!(
                    "{}: a writer was already opened (a spill file is written once)",
                    shared.describe()
                ))
            })?;
        let result = Header::new(
            shared.key.key_ref.clone(),
            shared.dataset_id,
            DEFAULT_SEGMENT_SIZE,
        )
        .and_then(|header| {
            EncryptingWriter::new(
                DiskFile {
                    file,
                    shared: Arc::clone(shared),
                },
                &header,
                &shared.key.key,
            )
        });
        let inner = match result {
            Ok(inner) => inner,
            Err(e) => {
                shared.publish(|p| p.state = State::Abandoned);
                return Err(format_error(shared, e));
            }
        };
        shared.publish(|p| p.state = State::Writing);
        Ok(Box::new(EncryptedSpillWriter {
            header_len: shared.disk_bytes.load(Ordering::Relaxed),
            shared: Arc::clone(shared),
            inner: Some(inner),
            tail: Vec::with_capacity(SEGMENT),
            plain_len: 0,
            failed: false,
        }))
    }
}

/// The spill file on disk, counting (and budgeting) the ciphertext written to it.
struct DiskFile {
    file: File,
    shared: Arc<FileShared>,
}

impl Write for DiskFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        self.shared.usage.reserve(len)?;
        match self.file.write(buf) {
            Ok(n) => {
                self.shared.usage.release(len - n as u64);
                self.shared
                    .disk_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.shared.usage.release(len);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Encrypts what DataFusion writes into one spill file.
struct EncryptedSpillWriter {
    shared: Arc<FileShared>,
    /// None once finished.
    inner: Option<EncryptingWriter<DiskFile>>,
    header_len: u64,
    /// The plaintext of the segment not sealed yet: a mirror of the `EncryptingWriter`'s
    /// buffer (which seals a full segment only when the next byte arrives), published to
    /// concurrent readers on flush.
    tail: Vec<u8>,
    plain_len: u64,
    /// A write failed: the file is unusable.
    failed: bool,
}

impl EncryptedSpillWriter {
    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(format!(
                "{}: an earlier write failed",
                self.shared.describe()
            )));
        }
        if self.inner.is_none() {
            return Err(io::Error::other(format!(
                "{}: already finished",
                self.shared.describe()
            )));
        }
        Ok(())
    }

    /// Makes everything written so far readable by concurrent readers.
    fn publish_progress(&mut self) -> io::Result<()> {
        let on_disk = self.shared.disk_bytes.load(Ordering::Relaxed) - self.header_len;
        let sealed = on_disk / SEGMENT_ON_DISK;
        if !on_disk.is_multiple_of(SEGMENT_ON_DISK)
            || sealed * SEGMENT as u64 + self.tail.len() as u64 != self.plain_len
        {
            self.failed = true;
            return Err(io::Error::other(format!(
                "{}: segment accounting mismatch (internal error)",
                self.shared.describe()
            )));
        }
        let tail = Bytes::copy_from_slice(&self.tail);
        let plain_len = self.plain_len;
        self.shared.publish(|p| {
            p.sealed = sealed;
            p.tail = tail;
            p.plain_len = plain_len;
        });
        Ok(())
    }
}

impl Write for EncryptedSpillWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check_usable()?;
        if data.is_empty() {
            return Ok(0);
        }
        let inner = self.inner.as_mut().expect("checked usable");
        if let Err(e) = inner.write_all(data) {
            self.failed = true;
            return Err(e);
        }
        let mut rest = data;
        while !rest.is_empty() {
            if self.tail.len() == SEGMENT {
                self.tail.clear();
            }
            let take = (SEGMENT - self.tail.len()).min(rest.len());
            self.tail.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        self.plain_len += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check_usable()?;
        self.inner.as_mut().expect("checked usable").flush()?;
        self.publish_progress()
    }
}

impl SpillWriter for EncryptedSpillWriter {
    fn finish(&mut self) -> DfResult<()> {
        self.check_usable()?;
        let inner = self.inner.take().expect("checked usable");
        let shared = Arc::clone(&self.shared);
        let (file, finished) = match inner.finish() {
            Ok(done) => done,
            Err(e) => {
                self.failed = true;
                shared.publish(|p| p.state = State::Abandoned);
                return Err(format_error(&shared, e));
            }
        };
        drop(file);
        let plain_len = self.plain_len;
        let final_index = plain_len.saturating_sub(1) / SEGMENT as u64;
        let final_plain = plain_len - final_index * SEGMENT as u64;
        let expected =
            self.header_len + final_index * SEGMENT_ON_DISK + final_plain + TAG_LEN as u64;
        if finished.plaintext_len != plain_len
            || finished.ciphertext_len != expected
            || shared.disk_bytes.load(Ordering::Relaxed) != expected
        {
            self.failed = true;
            shared.publish(|p| p.state = State::Abandoned);
            return Err(DataFusionError::Internal(format!(
                "{}: segment accounting mismatch",
                shared.describe()
            )));
        }
        self.tail = Vec::new();
        shared.publish(|p| {
            p.state = State::Finished;
            p.sealed = final_index;
            p.tail = Bytes::new();
            p.plain_len = plain_len;
        });
        Ok(())
    }
}

impl Drop for EncryptedSpillWriter {
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.shared.publish(|p| p.state = State::Abandoned);
        }
    }
}

/// What one blocking read step produced.
enum Step {
    Chunk(Bytes),
    /// Everything published was read; the writer is still writing.
    Wait,
    End,
}

/// Reads one spill file sequentially, a segment per step.
struct SpillReader {
    shared: Arc<FileShared>,
    /// The file, positioned after its header, and its verified keys; opened on first use.
    open: Option<(File, FileCipher)>,
    next_segment: u64,
    /// Plaintext bytes handed out so far.
    delivered: u64,
}

impl SpillReader {
    /// Runs on a blocking thread: reads and authenticates at most one segment.
    fn step(&mut self) -> DfResult<Step> {
        loop {
            let progress = self.shared.progress().clone();
            match progress.state {
                State::Created => return Ok(Step::Wait),
                State::Abandoned => {
                    return Err(DataFusionError::Execution(format!(
                        "{}: its writer stopped before finishing the file",
                        self.shared.describe()
                    )));
                }
                State::Writing | State::Finished => {}
            }
            let finished = progress.state == State::Finished;
            let index = self.next_segment;
            if index < progress.sealed || (finished && index == progress.sealed) {
                let last = finished && index == progress.sealed;
                let start = index * SEGMENT as u64;
                let plain = if last {
                    (progress.plain_len - start) as usize
                } else {
                    SEGMENT
                };
                let chunk = self.read_segment(index, last, plain)?;
                self.next_segment += 1;
                // Part of this segment may have been handed out from a published tail.
                let skip = (self.delivered - start) as usize;
                self.delivered = start + chunk.len() as u64;
                if skip < chunk.len() {
                    return Ok(Step::Chunk(chunk.slice(skip..)));
                }
                continue;
            }
            if finished {
                return Ok(Step::End);
            }
            if self.delivered < progress.plain_len {
                let from = (self.delivered - progress.sealed * SEGMENT as u64) as usize;
                self.delivered = progress.plain_len;
                return Ok(Step::Chunk(progress.tail.slice(from..)));
            }
            return Ok(Step::Wait);
        }
    }

    fn read_segment(&mut self, index: u64, last: bool, plain: usize) -> DfResult<Bytes> {
        let shared = Arc::clone(&self.shared);
        if self.open.is_none() {
            self.open = Some(open_verified(&shared)?);
        }
        let (file, cipher) = self.open.as_mut().expect("opened above");
        let mut buf = vec![0u8; plain + TAG_LEN];
        if let Err(e) = file.read_exact(&mut buf) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                format_error(
                    &shared,
                    FormatError::BadLength(format!("the file ends inside segment {index}")),
                )
            } else {
                io_error(&shared, e)
            });
        }
        if last {
            let mut extra = [0u8; 1];
            match file.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(format_error(
                        &shared,
                        FormatError::BadLength("bytes follow the final segment".into()),
                    ));
                }
                Err(e) => return Err(io_error(&shared, e)),
            }
        }
        let len = cipher
            .open(index, last, &mut buf)
            .map_err(|e| format_error(&shared, e))?
            .len();
        buf.truncate(len);
        Ok(Bytes::from(buf))
    }
}

/// Opens a spill file and checks its header: our key, its own dataset id, our segment size.
fn open_verified(shared: &FileShared) -> DfResult<(File, FileCipher)> {
    let mut file = File::open(&shared.path).map_err(|e| io_error(shared, e))?;
    let unverified = UnverifiedHeader::read_from(&mut file).map_err(|e| format_error(shared, e))?;
    let (header, cipher) = unverified
        .verify(&shared.key.key)
        .map_err(|e| format_error(shared, e))?;
    if header.dataset_id() != &shared.dataset_id || header.segment_size() != DEFAULT_SEGMENT_SIZE {
        return Err(format_error(
            shared,
            FormatError::MalformedHeader("the header belongs to another spill file"),
        ));
    }
    Ok((file, cipher))
}

fn format_error(shared: &FileShared, e: FormatError) -> DataFusionError {
    match e {
        FormatError::Io(e) => io_error(shared, e),
        e => DataFusionError::External(Box::new(e)).context(format!(
            "{}: damaged, truncated or replaced",
            shared.describe()
        )),
    }
}

fn io_error(shared: &FileShared, e: io::Error) -> DataFusionError {
    DataFusionError::IoError(e).context(shared.describe())
}

/// Runs `f` on tokio's blocking pool (inline when there is no tokio runtime).
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> DfResult<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e))),
        Err(_) => Ok(f()),
    }
}

fn fill_random(out: &mut [u8]) -> io::Result<()> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| io::Error::other("the system random number generator failed"))
}

fn private_dir_builder(recursive: bool) -> fs::DirBuilder {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(recursive);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
}

/// A session's private spill directory; removed, with anything left in it, on drop.
pub(crate) struct SpillDirGuard(PathBuf);

impl Drop for SpillDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A runtime whose disk manager is an [`EncryptedSpill`] in a fresh private directory
/// `<temp dir>/ppml-spill-<pid>-<random>`, and the guard that removes the directory.
///
/// Should the directory or key not be available, spilling is disabled instead (queries that
/// exceed a memory limit then fail rather than spill in plaintext).
pub(crate) fn encrypted_spill_runtime() -> (Arc<RuntimeEnv>, Option<SpillDirGuard>) {
    let created = (|| -> Result<_, EngineError> {
        let mut random = [0u8; 8];
        let dir = std::env::temp_dir();
        fill_random(&mut random).map_err(|e| EngineError::io(&dir, e))?;
        let dir = dir.join(format!(
            "ppml-spill-{}-{}",
            std::process::id(),
            crate::hex_lower(&random)
        ));
        // Not recursive: fails if the path exists, so nobody else's directory (or symlink) is
        // adopted.
        private_dir_builder(false)
            .create(&dir)
            .map_err(|e| EngineError::io(&dir, e))?;
        let guard = SpillDirGuard(dir.clone());
        let spill = Arc::new(EncryptedSpill::new(dir)?);
        Ok((spill, guard))
    })();
    let (builder, guard) = match created {
        Ok((spill, guard)) => (spill.disk_manager_builder(), Some(guard)),
        Err(e) => {
            tracing::warn!("encrypted spilling unavailable, spilling disabled: {e}");
            (
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
                None,
            )
        }
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_disk_manager_builder(builder)
        .build_arc()
        .expect("a runtime with a custom or disabled disk manager builds");
    (runtime, guard)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use datafusion::arrow::array::{Array, AsArray, RecordBatch};
    use datafusion::arrow::datatypes::Int64Type;
    use datafusion::physical_plan::{ExecutionPlan, execute_stream};
    use datafusion::prelude::{SessionConfig, SessionContext};
    use futures::{StreamExt, TryStreamExt};

    use super::*;

    const MARKER: &[u8] = b"marker-";

    fn spill_in(dir: &Path) -> Arc<EncryptedSpill> {
        Arc::new(EncryptedSpill::new(dir.join("spill")).unwrap())
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(len + 32);
        let mut i = 0u64;
        while data.len() < len {
            data.extend_from_slice(format!("marker-{i:08} ").as_bytes());
            i += 1;
        }
        data.truncate(len);
        data
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    async fn read_all(file: &dyn SpillFile) -> DfResult<Vec<u8>> {
        let chunks: Vec<Bytes> = file.read_stream()?.try_collect().await?;
        assert!(chunks.iter().all(|c| c.len() <= SEGMENT));
        Ok(chunks.concat())
    }

    fn write_file(spill: &EncryptedSpill, data: &[u8]) -> Arc<dyn SpillFile> {
        let file = spill.create_temp_file("test").unwrap();
        let mut writer = file.open_writer().unwrap();
        // Uneven writes, as Arrow's IPC writer does.
        for piece in data.chunks(10_007) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap();
        drop(writer);
        file
    }

    #[tokio::test]
    async fn round_trip_encrypted_and_deleted_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(spill.dir()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let data = sample(300 * 1024);
        let file = write_file(&spill, &data);
        let path = file.path().unwrap().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("ppml-spill-") && name.ends_with(".ppml"),
            "{name}"
        );
        assert_eq!(path.parent().unwrap(), spill.dir());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let on_disk = fs::read(&path).unwrap();
        assert_eq!(file.size(), Some(on_disk.len() as u64));
        assert!(on_disk.len() > data.len());
        assert!(on_disk.starts_with(&ppml_format::MAGIC));
        assert!(!contains(&on_disk, MARKER), "plaintext on disk");
        assert_eq!(spill.used_bytes(), on_disk.len() as u64);
        assert_eq!(spill.active_files(), 1);

        // Read twice, concurrently: each stream decrypts independently.
        let (a, b) = tokio::join!(read_all(file.as_ref()), read_all(file.as_ref()));
        assert!(a.unwrap() == data);
        assert!(b.unwrap() == data);

        drop(file);
        assert!(!path.exists(), "spill file left behind");
        assert_eq!(spill.used_bytes(), 0);
        assert_eq!(spill.active_files(), 0);
    }

    #[tokio::test]
    async fn empty_and_segment_sized_files() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        for len in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT] {
            let data = sample(len);
            let file = write_file(&spill, &data);
            assert!(
                read_all(file.as_ref()).await.unwrap() == data,
                "length {len}"
            );
        }
    }

    #[tokio::test]
    async fn tampering_and_truncation_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        let data = sample(300 * 1024);
        let file = write_file(&spill, &data);
        let path = file.path().unwrap().to_path_buf();
        let original = fs::read(&path).unwrap();

        let header_len = UnverifiedHeader::parse(&original).unwrap().len();
        for at in [10, header_len + 5, original.len() / 2, original.len() - 1] {
            let mut bytes = original.clone();
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let err = read_all(file.as_ref()).await.unwrap_err().to_string();
            assert!(err.contains("encrypted spill file"), "byte {at}: {err}");
        }
        for len in [
            original.len() - 1,
            header_len + SEGMENT_ON_DISK as usize,
            20,
        ] {
            fs::write(&path, &original[..len]).unwrap();
            assert!(read_all(file.as_ref()).await.is_err(), "truncated to {len}");
        }
        let mut longer = original.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        assert!(read_all(file.as_ref()).await.is_err(), "extended");

        // Another spill file of the same process (same key) is not accepted in its place.
        let other = write_file(&spill, &data);
        fs::copy(other.path().unwrap(), &path).unwrap();
        let err = read_all(file.as_ref()).await.unwrap_err().to_string();
        assert!(err.contains("another spill file"), "{err}");

        fs::write(&path, &original).unwrap();
        assert!(read_all(file.as_ref()).await.unwrap() == data);
    }

    #[tokio::test]
    async fn reads_while_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        let data = sample(3 * SEGMENT + 1234);
        let file = spill.create_temp_file("test").unwrap();
        let mut writer = file.open_writer().unwrap();
        let mut stream = file.read_stream().unwrap();
        let mut read = Vec::new();

        // Nothing written yet: the reader waits.
        let waited = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(waited.is_err());

        let cuts = [
            100,
            SEGMENT - 5,
            SEGMENT,
            SEGMENT + 7,
            2 * SEGMENT + 3,
            data.len(),
        ];
        let mut written = 0;
        for cut in cuts {
            writer.write_all(&data[written..cut]).unwrap();
            writer.flush().unwrap();
            written = cut;
            while read.len() < written {
                let chunk = stream.next().await.unwrap().unwrap();
                read.extend_from_slice(&chunk);
            }
            assert_eq!(read.len(), written);
            let waited = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
            assert!(waited.is_err(), "read past the flushed data");
        }
        writer.finish().unwrap();
        assert!(stream.next().await.is_none());
        assert!(read == data);

        // A writer dropped before finish makes readers fail.
        let file = spill.create_temp_file("test").unwrap();
        let mut writer = file.open_writer().unwrap();
        writer.write_all(&data).unwrap();
        drop(writer);
        let err = read_all(file.as_ref()).await.unwrap_err().to_string();
        assert!(err.contains("stopped before finishing"), "{err}");
        assert!(file.open_writer().is_err(), "second writer");
    }

    #[tokio::test]
    async fn quota_is_enforced() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        spill.set_max_bytes(100 * 1024);
        let file = spill.create_temp_file("test").unwrap();
        let mut writer = file.open_writer().unwrap();
        let err = writer.write_all(&sample(300 * 1024)).unwrap_err();
        assert!(
            err.to_string().contains("exceeded the allowable limit"),
            "{err}"
        );
        assert!(spill.used_bytes() <= 100 * 1024);
        drop(writer);
        drop(file);
        assert_eq!(spill.used_bytes(), 0);
    }

    /// Spill counts per operator of an executed plan, e.g. `SortExec=10`.
    fn spills_by_operator(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<(String, usize)>) {
        if let Some(n) = plan.metrics().and_then(|m| m.spill_count()) {
            out.push((plan.name().to_owned(), n));
        }
        for child in plan.children() {
            spills_by_operator(child, out);
        }
    }

    /// Scans every file in `dir`: none may hold the marker; returns how many there were.
    fn scan_for_plaintext(dir: &Path) -> usize {
        let mut files = 0;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            // A file may be deleted between listing and reading.
            let Ok(bytes) = fs::read(&path) else { continue };
            assert!(!contains(&bytes, MARKER), "plaintext in {}", path.display());
            assert!(bytes.is_empty() || bytes.starts_with(&ppml_format::MAGIC));
            files += 1;
        }
        files
    }

    fn strings(array: &dyn Array) -> Vec<String> {
        use datafusion::arrow::datatypes::DataType;
        let owned = |s: Option<&str>| s.expect("no nulls").to_owned();
        match array.data_type() {
            DataType::Utf8View => array.as_string_view().iter().map(owned).collect(),
            DataType::LargeUtf8 => array.as_string::<i64>().iter().map(owned).collect(),
            _ => array.as_string::<i32>().iter().map(owned).collect(),
        }
    }

    /// What one query run under memory pressure with an encrypted spill produced.
    struct SpillingRun {
        batches: Vec<RecordBatch>,
        spill: Arc<EncryptedSpill>,
        spills: Vec<(String, usize)>,
        files_while_running: usize,
        _tmp: tempfile::TempDir,
    }

    /// Runs `sql` with a `memory_mb` pool and the encrypted spill; scans the spill directory
    /// for plaintext once the first output batch exists (all inputs consumed, spill files
    /// being merged) and again at the end, when it must be empty.
    async fn run_spilling(sql: &str, partitions: usize, memory_mb: usize) -> SpillingRun {
        let tmp = tempfile::tempdir().unwrap();
        let spill = spill_in(tmp.path());
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(memory_mb * 1024 * 1024, 1.0)
            .with_disk_manager_builder(Arc::clone(&spill).disk_manager_builder())
            .build_arc()
            .unwrap();
        let config = SessionConfig::new()
            .with_target_partitions(partitions)
            .with_batch_size(4096)
            .with_sort_spill_reservation_bytes(256 * 1024);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut stream = execute_stream(Arc::clone(&plan), ctx.task_ctx()).unwrap();
        let first = stream.next().await.unwrap().unwrap();
        let files_while_running = scan_for_plaintext(spill.dir());
        let mut batches = vec![first];
        while let Some(batch) = stream.next().await {
            batches.push(batch.unwrap());
        }
        drop(stream);
        let mut spills = Vec::new();
        spills_by_operator(&plan, &mut spills);
        // DataFusion does not account custom backends.
        assert_eq!(ctx.runtime_env().disk_manager.used_disk_space(), 0);
        drop(plan);
        // Operator tasks release their files as they wind down.
        for _ in 0..100 {
            if spill.active_files() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(spill.active_files(), 0);
        assert_eq!(spill.used_bytes(), 0);
        assert_eq!(
            scan_for_plaintext(spill.dir()),
            0,
            "spill files left behind"
        );
        eprintln!(
            "spills {spills:?}; {} encrypted files, {files_while_running} on disk while running",
            spill.files_created()
        );
        SpillingRun {
            batches,
            spill,
            spills,
            files_while_running,
            _tmp: tmp,
        }
    }

    fn spill_count(run: &SpillingRun, operator: &str) -> usize {
        run.spills
            .iter()
            .filter(|(name, _)| name == operator)
            .map(|(_, n)| n)
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sort_under_memory_pressure_spills_encrypted() {
        let rows = 300_000i64;
        let run = run_spilling(
            &format!(
                "SELECT v, 'marker-' || v AS s FROM generate_series(1, {rows}) t(v) \
                 ORDER BY s DESC"
            ),
            1,
            2,
        )
        .await;
        assert!(spill_count(&run, "SortExec") > 0, "the sort did not spill");
        assert!(run.spill.files_created() > 0);
        assert!(
            run.files_while_running > 0,
            "no spill file on disk while merging"
        );

        let mut expected: Vec<String> = (1..=rows).map(|v| format!("marker-{v}")).collect();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        let mut got = Vec::with_capacity(expected.len());
        for batch in &run.batches {
            let v = batch.column(0).as_primitive::<Int64Type>();
            assert_eq!(v.null_count(), 0);
            for (i, s) in strings(batch.column(1)).into_iter().enumerate() {
                assert_eq!(s, format!("marker-{}", v.value(i)));
                got.push(s);
            }
        }
        assert_eq!(got.len(), rows as usize);
        assert_eq!(got.first().map(String::as_str), Some("marker-99999"));
        assert_eq!(got.last().map(String::as_str), Some("marker-1"));
        assert!(got == expected, "wrong order");
    }

    /// A two-partition aggregation: the partial and final aggregates spill, and so may the
    /// repartition between them (its spill pool reads files while they are written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aggregation_under_memory_pressure_spills_encrypted() {
        let groups = 150_000i64;
        let run = run_spilling(
            &format!(
                "SELECT s, count(*) AS n FROM \
                 (SELECT 'marker-' || (v % {groups}) AS s FROM generate_series(1, {}) t(v)) \
                 GROUP BY s",
                2 * groups
            ),
            2,
            8,
        )
        .await;
        assert!(
            spill_count(&run, "AggregateExec") > 0,
            "the aggregation did not spill"
        );
        let mut seen = vec![false; groups as usize];
        for batch in &run.batches {
            let n = batch.column(1).as_primitive::<Int64Type>();
            for (i, s) in strings(batch.column(0)).into_iter().enumerate() {
                let v: usize = s.strip_prefix("marker-").unwrap().parse().unwrap();
                assert!(!seen[v], "group {s} twice");
                seen[v] = true;
                assert_eq!(n.value(i), 2, "group {s}");
            }
        }
        assert!(seen.iter().all(|s| *s), "groups missing");
    }

    /// An encrypted `PpmlSession` spills through an `EncryptedSpill` in a private directory
    /// that goes away with the session (and with `encrypted_with_config`).
    #[tokio::test]
    async fn encrypted_session_uses_a_private_encrypted_spill() {
        use ppml_kms::LocalKms;
        let tmp = tempfile::tempdir().unwrap();
        let kms_dir = tmp.path().join("kms");
        LocalKms::init(&kms_dir).unwrap();
        let creds = LocalKms::enroll(&kms_dir).unwrap();
        let kms = Arc::new(LocalKms::open(&kms_dir, &creds).unwrap());
        for with_config in [false, true] {
            let session = if with_config {
                crate::PpmlSession::encrypted_with_config(kms.clone(), SessionConfig::new())
            } else {
                crate::PpmlSession::encrypted(kms.clone(), Some(2))
            };
            let disk = Arc::clone(&session.context().runtime_env().disk_manager);
            let file = disk.create_tmp_file("session test").unwrap();
            let path = file.path().unwrap().to_path_buf();
            let dir = path.parent().unwrap().to_path_buf();
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.starts_with(&format!("ppml-spill-{}-", std::process::id())),
                "{name}"
            );
            assert_eq!(dir.parent().unwrap(), std::env::temp_dir());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(&dir).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o700);
            }
            let mut writer = file.open_writer().unwrap();
            writer.write_all(b"marker-secret").unwrap();
            writer.finish().unwrap();
            drop(writer);
            assert!(!contains(&fs::read(&path).unwrap(), MARKER));
            assert!(read_all(file.as_ref()).await.unwrap() == b"marker-secret");
            drop(session);
            assert!(!dir.exists(), "spill directory outlived the session");
            // A file still held elsewhere keeps working off its open state and is then gone.
            drop(file);
        }
        // The plaintext session keeps DataFusion's default disk manager.
        let plain = crate::PpmlSession::plaintext(None);
        let file = plain
            .context()
            .runtime_env()
            .disk_manager
            .create_tmp_file("plain")
            .unwrap();
        let parent = file.path().unwrap().parent().unwrap().file_name().unwrap();
        assert!(
            !parent.to_string_lossy().starts_with("ppml-spill-"),
            "{parent:?}"
        );
        assert!(!file.path().unwrap().to_string_lossy().ends_with(".ppml"));
    }
}
