//! Encrypted shuffle files (`docs/cluster.md` §6.4).
//!
//! Every shuffle file an executor writes, and every final partition the driver fetches, is a
//! ppml format v1 file (`docs/file-format.md`) whose plaintext is an Arrow IPC *stream*:
//!
//! ```text
//! header    magic ‖ header length ‖ segment size ‖ fresh random salt
//!           ‖ dataset_id = ShuffleFileId::dataset_id(): the file's place in the job
//!           ‖ KeyReference of the per-job shuffle key (wrapped; no secret)
//!           ‖ MAC over all of the above
//! segments  AES-256-GCM, DEFAULT_SEGMENT_SIZE plaintext bytes each, the last one
//!           marked final, over the plaintext
//!             Arrow IPC schema message ‖ record batch messages ‖ end-of-stream marker
//! ```
//!
//! After the IPC stream's end-of-stream marker, still inside the encryption, comes the file's
//! *attestation trailer*: the attestation tokens of the executors that wrote the file and the
//! files it was computed from ([`write_shuffle_file_attested`]), so that the driver, reading
//! the final stage's files, learns every executor of the job and lists them in the job's
//! receipt (`docs/receipts.md`). The trailer is `"ppml-attestations/1" 0x00 ‖ u32 count ‖
//! (u32 len ‖ token)*`, big-endian, at most [`MAX_ATTESTATIONS`] tokens of at most
//! [`MAX_TOKEN_LEN`] bytes; a reader refuses a file without one. Only attested runtimes of
//! the job hold its shuffle key, so the host can neither add nor remove a token.
//!
//! The schema message's metadata names the file's *map partitions*
//! (`"ppml.map_partitions": "0-3,7"`, [`MapPartitions`]): the partitions of the writing stage
//! the task computed, whose rows the file holds. A reader hands them to a
//! [`MapPartitionsCheck`] before it releases any row, which is how the files of one
//! partition are checked to cover their stage (`crate::stages`).
//!
//! All files of a job are encrypted under one data key (the *job key*, a [`ShuffleKey`]); the
//! salt derives per-file keys from it, so one key safely encrypts any number of files.
//!
//! **Identity binding.** The header's `dataset_id` is
//! `SHA-256("ppml-shuffle/2" ‖ u32 len(job_id) ‖ job_id ‖ u32 stage ‖ u32 partition ‖ u64
//! file_id)[..16]` (big-endian integers, see [`ShuffleFileId::dataset_id`]). The header MAC
//! covers it, and a reader recomputes it from the location it *asked for* and refuses any other
//! value ([`ShuffleError::WrongFile`]). A host that stores or serves shuffle files therefore
//! cannot swap files between partitions or replay a file of another stage or task: it can only
//! withhold data, which fails the read. The lists of files the scheduler hands out are checked
//! as a whole: a reader refuses a file listed twice, one of another stage, or lists that mix
//! partitions, and the driver wants exactly one file per partition of the final stage. The format's authenticated end of
//! stream (the final-segment flag) turns any truncation into an error rather than a short
//! result, even one that ends on an Arrow IPC message boundary.
//!
//! **Writing** ([`write_shuffle_file`]) drains a DataFusion stream into a temporary sibling
//! (`.{name}.tmp-{random}`), renamed into place only once the file is complete; on any error
//! or cancellation the temporary file is removed. **Reading** ([`read_shuffle_stream`],
//! [`read_shuffle_file`]) verifies the header, decrypts segment by segment and decodes the IPC
//! stream with Arrow's validation on. In both directions the cryptography and the IPC coding
//! run on a blocking thread connected to the async side by a small bounded channel, so memory
//! stays bounded to a few segments and batches whatever the file size.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::job::{MAX_JOB_ID_LEN, valid_job_id};
pub use ppml_engine::receipt::ExecutorAttestations;

use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use ppml_format::{
    DEFAULT_SEGMENT_SIZE, DataKey, DecryptingReader, EncryptingWriter, FinishedFile, FormatError,
    Header, KeyReference, UnverifiedHeader,
};
use ring::digest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What begins a shuffle file's attestation trailer.
const ATTESTATIONS_MAGIC: &[u8] = b"ppml-attestations/1\0";
/// Most attestation tokens one shuffle file carries.
pub const MAX_ATTESTATIONS: usize = 1024;
/// Longest attestation token a shuffle file carries.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The tokens a file's attestation trailer carries, asked for when its rows are all written
/// (by then its task has read every file it was computed from).
pub type AttestationsAtEnd = Box<dyn FnOnce() -> Vec<String> + Send>;

/// Domain separation prefix of [`ShuffleFileId::dataset_id`].
const DATASET_ID_DOMAIN: &[u8] = b"ppml-shuffle/2";
/// Longest accepted job id.
/// Buffer between the encrypting writer and the file.
const WRITE_BUFFER: usize = 1 << 20;
/// Record batches in flight between the input stream and the encoding thread.
const WRITE_CHANNEL_CAPACITY: usize = 4;
/// Decoded record batches in flight between the decoding thread and the consumer.
const READ_CHANNEL_CAPACITY: usize = 2;

/// The per-job shuffle key: the plaintext data key (zeroized on drop, never printed) and its
/// [`KeyReference`] (the wrapped form, written into every file header).
pub struct ShuffleKey {
    key: DataKey,
    reference: KeyReference,
}

impl ShuffleKey {
    /// Pairs a released data key with the reference it was released from.
    pub fn new(key: DataKey, reference: KeyReference) -> Self {
        ShuffleKey { key, reference }
    }

    /// The wrapped key, as it appears in every shuffle file header of the job.
    pub fn reference(&self) -> &KeyReference {
        &self.reference
    }

    /// The plaintext data key.
    pub(crate) fn data_key(&self) -> &DataKey {
        &self.key
    }
}

impl fmt::Debug for ShuffleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShuffleKey")
            .field("key", &"<redacted>")
            .field("reference", &self.reference)
            .finish()
    }
}

/// Where a shuffle file belongs: job, stage, output partition and file id (Ballista's task id).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShuffleFileId {
    /// The job (a path component: see [`ShuffleFileId::validate`]).
    pub job_id: String,
    /// The stage that wrote the file.
    pub stage_id: u32,
    /// The output partition the file holds rows of.
    pub partition_id: u32,
    /// The task that wrote the file.
    pub file_id: u64,
}

impl ShuffleFileId {
    /// `SHA-256("ppml-shuffle/2" ‖ u32 len(job_id) ‖ job_id ‖ u32 stage ‖ u32 partition ‖
    /// u64 file_id)[..16]`, integers big-endian: the header `dataset_id` of this file, checked
    /// on every read.
    pub fn dataset_id(&self) -> [u8; 16] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(DATASET_ID_DOMAIN);
        ctx.update(&(self.job_id.len() as u32).to_be_bytes());
        ctx.update(self.job_id.as_bytes());
        ctx.update(&self.stage_id.to_be_bytes());
        ctx.update(&self.partition_id.to_be_bytes());
        ctx.update(&self.file_id.to_be_bytes());
        let digest = ctx.finish();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        id
    }

    /// Rejects job ids that are not 1 to 128 characters of `[A-Za-z0-9_-]` (job ids become
    /// path components).
    pub fn validate(&self) -> Result<(), ShuffleError> {
        let id = &self.job_id;
        if valid_job_id(id) {
            Ok(())
        } else {
            let mut shown: String = id.chars().take(MAX_JOB_ID_LEN).collect();
            if shown.len() < id.len() {
                shown.push('…');
            }
            Err(ShuffleError::InvalidJobId(shown))
        }
    }
}

impl fmt::Display for ShuffleFileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job {:?} stage {} partition {} file {}",
            self.job_id, self.stage_id, self.partition_id, self.file_id
        )
    }
}

/// The schema metadata key naming a shuffle file's [`MapPartitions`].
pub const MAP_PARTITIONS_METADATA: &str = "ppml.map_partitions";
/// Longest accepted `ppml.map_partitions` value.
const MAX_MAP_PARTITIONS_TEXT: usize = 1 << 16;

/// The partitions of the writing stage whose rows a shuffle file holds: the input partitions
/// of the task that wrote it. Sorted, without repeats; written as ranges (`0-3,7`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPartitions(Vec<u32>);

impl MapPartitions {
    /// The set of `partitions`.
    pub fn new(partitions: impl IntoIterator<Item = u32>) -> Self {
        let mut partitions: Vec<u32> = partitions.into_iter().collect();
        partitions.sort_unstable();
        partitions.dedup();
        MapPartitions(partitions)
    }

    /// The partitions, ascending.
    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }

    /// The metadata value: ascending ranges `a-b` or single partitions, comma-separated.
    pub fn to_text(&self) -> String {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for &p in &self.0 {
            match ranges.last_mut() {
                Some((_, end)) if end.checked_add(1) == Some(p) => *end = p,
                _ => ranges.push((p, p)),
            }
        }
        ranges
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses [`MapPartitions::to_text`]; only its canonical form is accepted (ascending,
    /// disjoint, non-adjacent ranges), so one set has one text.
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() || text.len() > MAX_MAP_PARTITIONS_TEXT {
            return None;
        }
        let number = |s: &str| -> Option<u32> {
            if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
                return None;
            }
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let mut partitions = Vec::new();
        let mut next_allowed: u64 = 0;
        for range in text.split(',') {
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a >= b {
                        return None;
                    }
                    (a, b)
                }
                None => {
                    let a = number(range)?;
                    (a, a)
                }
            };
            if u64::from(a) < next_allowed {
                return None;
            }
            // Bounded by the text's length: a range's size is not (one range can name four
            // billion partitions), so refuse more than a stage could have.
            if partitions.len() as u64 + u64::from(b - a) + 1 > MAX_MAP_PARTITIONS_TEXT as u64 {
                return None;
            }
            partitions.extend(a..=b);
            next_allowed = u64::from(b) + 2;
        }
        Some(MapPartitions(partitions))
    }
}

/// Checks a shuffle file's [`MapPartitions`] before any of its rows is released; its error
/// says why they are not the ones expected.
pub type MapPartitionsCheck = Box<dyn FnOnce(&MapPartitions) -> Result<(), String> + Send>;

/// A [`MapPartitionsCheck`] that accepts any map partitions (for tools and tests that read a
/// single file outside a job).
pub fn any_map_partitions() -> MapPartitionsCheck {
    Box::new(|_| Ok(()))
}

/// What [`write_shuffle_file`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShuffleFileStats {
    /// Rows written.
    pub num_rows: u64,
    /// Record batches written.
    pub num_batches: u64,
    /// Size of the encrypted file in bytes.
    pub num_bytes: u64,
}

/// Why writing or reading a shuffle file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShuffleError {
    /// A file-system operation failed.
    #[error("shuffle file I/O on {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is damaged, truncated, forged, not a ppml file, or its key is wrong.
    #[error("shuffle file {file}: {source}")]
    Format {
        /// The file.
        file: String,
        /// What is wrong with it.
        source: FormatError,
    },
    /// Arrow IPC encoding or decoding failed.
    #[error("shuffle file {file}: Arrow IPC: {source}")]
    Arrow {
        /// The file.
        file: String,
        /// The Arrow error.
        source: ArrowError,
    },
    /// The file is a valid shuffle file of this job's key, but of another job, stage,
    /// partition or task than the one requested.
    #[error(
        "shuffle file {file} belongs to another job, stage, partition or task \
         (its dataset id does not match the requested location)"
    )]
    WrongFile {
        /// The file.
        file: String,
    },
    /// The file is encrypted under another key than this job's shuffle key.
    #[error("shuffle file {file} is encrypted under another key than this job's shuffle key")]
    WrongKey {
        /// The file.
        file: String,
    },
    /// The file's Arrow schema differs from the schema the reader expects.
    #[error("shuffle file {file} has schema {found}, but {expected} was expected")]
    SchemaMismatch {
        /// The file.
        file: String,
        /// The expected fields.
        expected: String,
        /// The fields found in the file.
        found: String,
    },
    /// The file names no map partitions, or not the ones its reader expects.
    #[error("shuffle file {file}: {reason}")]
    MapPartitions {
        /// The file.
        file: String,
        /// What is wrong with its map partitions.
        reason: String,
    },
    /// A job id that is not 1 to 128 characters of `[A-Za-z0-9_-]`.
    #[error("invalid job id {0:?}: expected 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-'")]
    InvalidJobId(String),
    /// The stream being written to the file failed.
    #[error("shuffle file {file}: the input failed: {source}")]
    DataFusion {
        /// The file being written.
        file: String,
        /// The input's error.
        source: DataFusionError,
    },
    /// Writing stopped before the input ended (the write was cancelled).
    #[error("shuffle file {file}: writing was cancelled before the input ended")]
    Cancelled {
        /// The file being written.
        file: String,
    },
    /// The background thread encoding or decoding the file failed unexpectedly.
    #[error("shuffle file {file}: background task failed: {message}")]
    Task {
        /// The file.
        file: String,
        /// The task's failure.
        message: String,
    },
}

impl From<ShuffleError> for DataFusionError {
    fn from(err: ShuffleError) -> Self {
        DataFusionError::External(Box::new(err))
    }
}

/// Removes a temporary file when dropped, unless disarmed.
struct TempFileGuard(Option<PathBuf>);

impl TempFileGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFileGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the encoding thread receives.
enum WriteMessage {
    Batch(RecordBatch),
    /// The input ended: finish the file with these attestation tokens. A channel closed
    /// without it means cancellation.
    Finish(Vec<String>),
}

/// Drains `stream` into an encrypted shuffle file at `path`, creating its parent directories.
///
/// The file is written under a temporary name in the same directory and renamed into place
/// when complete (replacing any file at `path`); on any error, or when the returned future is
/// dropped, the temporary file is removed. IPC encoding and encryption run on a blocking thread
/// fed through a channel of a few batches, so a slow disk never makes this buffer a whole
/// partition. An empty stream still yields a valid file holding the schema. The schema's
/// metadata names `map_partitions`, the writing task's input partitions.
pub async fn write_shuffle_file(
    stream: SendableRecordBatchStream,
    path: &Path,
    id: &ShuffleFileId,
    key: &Arc<ShuffleKey>,
    map_partitions: &MapPartitions,
) -> Result<ShuffleFileStats, ShuffleError> {
    write_shuffle_file_attested(stream, path, id, key, map_partitions, Box::new(Vec::new)).await
}

/// [`write_shuffle_file`] with the attestation tokens `attestations` gives once the stream
/// has ended in the file's trailer (at most [`MAX_ATTESTATIONS`], the rest dropped).
pub async fn write_shuffle_file_attested(
    mut stream: SendableRecordBatchStream,
    path: &Path,
    id: &ShuffleFileId,
    key: &Arc<ShuffleKey>,
    map_partitions: &MapPartitions,
    attestations: AttestationsAtEnd,
) -> Result<ShuffleFileStats, ShuffleError> {
    id.validate()?;
    let display = path.display().to_string();
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShuffleError::Io { path, source }
    };
    let file_name = path.file_name().ok_or_else(|| ShuffleError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file"),
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(dir))?;
    let temp = dir.join(format!(
        ".{}.tmp-{:016x}",
        file_name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .await
        .map_err(io_error(&temp))?;
    let mut guard = TempFileGuard(Some(temp.clone()));
    let file = file.into_std().await;

    let header = Header::new(
        key.reference().clone(),
        id.dataset_id(),
        DEFAULT_SEGMENT_SIZE,
    )
    .map_err(|source| ShuffleError::Format {
        file: display.clone(),
        source,
    })?;
    let (sender, receiver) = mpsc::channel(WRITE_CHANNEL_CAPACITY);
    let encoder = tokio::task::spawn_blocking({
        let mut metadata = stream.schema().metadata().clone();
        metadata.insert(
            MAP_PARTITIONS_METADATA.to_string(),
            map_partitions.to_text(),
        );
        let schema = stream.schema().as_ref().clone().with_metadata(metadata);
        let key = Arc::clone(key);
        let display = display.clone();
        move || encode_file(file, &header, &key, &schema, receiver, &display)
    });

    let mut stats = ShuffleFileStats::default();
    let mut input_error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(batch) => {
                stats.num_rows += batch.num_rows() as u64;
                stats.num_batches += 1;
                if sender.send(WriteMessage::Batch(batch)).await.is_err() {
                    // The encoder stopped on an error, which joining it returns.
                    break;
                }
            }
            Err(source) => {
                input_error = Some(source);
                break;
            }
        }
    }
    if input_error.is_none() {
        let _ = sender.send(WriteMessage::Finish(attestations())).await;
    }
    drop(sender);
    let encoded = encoder.await;
    if let Some(source) = input_error {
        return Err(ShuffleError::DataFusion {
            file: display,
            source,
        });
    }
    let finished = encoded.map_err(|e| ShuffleError::Task {
        file: display.clone(),
        message: e.to_string(),
    })??;
    tokio::fs::rename(&temp, path)
        .await
        .map_err(io_error(path))?;
    guard.disarm();
    stats.num_bytes = finished.ciphertext_len;
    Ok(stats)
}

/// The encoding thread of [`write_shuffle_file`]: IPC-encodes and encrypts the batches it
/// receives into `file` until told to finish.
fn encode_file(
    file: File,
    header: &Header,
    key: &ShuffleKey,
    schema: &Schema,
    mut batches: mpsc::Receiver<WriteMessage>,
    display: &str,
) -> Result<FinishedFile, ShuffleError> {
    let format_error = |source| ShuffleError::Format {
        file: display.to_string(),
        source,
    };
    let arrow_error = |source| ShuffleError::Arrow {
        file: display.to_string(),
        source,
    };
    let buffered = BufWriter::with_capacity(WRITE_BUFFER, file);
    let encrypting =
        EncryptingWriter::new(buffered, header, key.data_key()).map_err(format_error)?;
    let mut ipc = StreamWriter::try_new(encrypting, schema).map_err(arrow_error)?;
    let attestations = loop {
        match batches.blocking_recv() {
            Some(WriteMessage::Batch(batch)) => ipc.write(&batch).map_err(arrow_error)?,
            Some(WriteMessage::Finish(attestations)) => break attestations,
            None => {
                return Err(ShuffleError::Cancelled {
                    file: display.to_string(),
                });
            }
        }
    };
    let mut encrypting = ipc.into_inner().map_err(arrow_error)?;
    std::io::Write::write_all(&mut encrypting, &encode_attestations(&attestations))
        .map_err(|e| format_error(FormatError::from_io(e)))?;
    let (buffered, finished) = encrypting.finish().map_err(format_error)?;
    buffered.into_inner().map_err(|e| ShuffleError::Io {
        path: PathBuf::from(display),
        source: e.into_error(),
    })?;
    Ok(finished)
}

/// The attestation trailer of `tokens`: the first [`MAX_ATTESTATIONS`] of those at most
/// [`MAX_TOKEN_LEN`] bytes long.
fn encode_attestations(tokens: &[String]) -> Vec<u8> {
    let kept: Vec<&String> = tokens
        .iter()
        .filter(|t| t.len() <= MAX_TOKEN_LEN)
        .take(MAX_ATTESTATIONS)
        .collect();
    let mut out = ATTESTATIONS_MAGIC.to_vec();
    out.extend_from_slice(&(kept.len() as u32).to_be_bytes());
    for token in kept {
        out.extend_from_slice(&(token.len() as u32).to_be_bytes());
        out.extend_from_slice(token.as_bytes());
    }
    out
}

/// Parses an attestation trailer, which must be all of `bytes`.
fn decode_attestations(bytes: &[u8]) -> Option<Vec<String>> {
    let mut rest = bytes.strip_prefix(ATTESTATIONS_MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
    if count > MAX_ATTESTATIONS {
        return None;
    }
    let mut tokens = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        if len > MAX_TOKEN_LEN {
            return None;
        }
        tokens.push(String::from_utf8(take(len)?.to_vec()).ok()?);
    }
    rest.is_empty().then_some(tokens)
}

/// Opens the shuffle file at `path` and streams its record batches (see
/// [`read_shuffle_stream`]).
pub fn read_shuffle_file(
    path: &Path,
    id: ShuffleFileId,
    key: Arc<ShuffleKey>,
    schema: SchemaRef,
    check: MapPartitionsCheck,
) -> Result<SendableRecordBatchStream, ShuffleError> {
    read_shuffle_file_collecting(path, id, key, schema, check, None)
}

/// [`read_shuffle_file`], adding the tokens of the file's attestation trailer to `seen` once
/// the file was read to its end.
pub fn read_shuffle_file_collecting(
    path: &Path,
    id: ShuffleFileId,
    key: Arc<ShuffleKey>,
    schema: SchemaRef,
    check: MapPartitionsCheck,
    seen: Option<Arc<ExecutorAttestations>>,
) -> Result<SendableRecordBatchStream, ShuffleError> {
    let file = File::open(path).map_err(|source| ShuffleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(read_shuffle_stream_collecting(
        Box::new(file),
        path.display().to_string(),
        id,
        key,
        schema,
        check,
        seen,
    ))
}

/// Streams the record batches of the encrypted shuffle file read from `source`: any blocking
/// reader positioned at the start of the file (a local file, or bytes arriving over the
/// network). `display` names the file in errors.
///
/// Before any batch is released, the header must name `key` and verify under it
/// ([`ShuffleError::WrongKey`], [`ShuffleError::Format`]), its dataset id must be
/// `id.dataset_id()` ([`ShuffleError::WrongFile`]), the file's schema must have the field
/// names and types of `schema` ([`ShuffleError::SchemaMismatch`]) and `check` must accept the
/// map partitions the file names ([`ShuffleError::MapPartitions`]). Each batch is released only
/// after the segments holding it authenticated, and the stream ends successfully only at the
/// file's authenticated end, so a truncated or modified file ends the stream with an error.
/// Errors are [`DataFusionError::External`] wrapping a [`ShuffleError`].
///
/// Decryption and decoding run on a blocking thread, started at the first poll, that stays
/// at most a couple of batches ahead of the consumer; dropping the stream stops it.
pub fn read_shuffle_stream(
    source: Box<dyn Read + Send>,
    display: String,
    id: ShuffleFileId,
    key: Arc<ShuffleKey>,
    schema: SchemaRef,
    check: MapPartitionsCheck,
) -> SendableRecordBatchStream {
    read_shuffle_stream_collecting(source, display, id, key, schema, check, None)
}

/// [`read_shuffle_stream`], adding the tokens of the file's attestation trailer to `seen`
/// before the stream ends.
pub fn read_shuffle_stream_collecting(
    source: Box<dyn Read + Send>,
    display: String,
    id: ShuffleFileId,
    key: Arc<ShuffleKey>,
    schema: SchemaRef,
    check: MapPartitionsCheck,
    seen: Option<Arc<ExecutorAttestations>>,
) -> SendableRecordBatchStream {
    let job = ReadJob {
        source,
        display,
        id,
        key,
        schema: Arc::clone(&schema),
        check,
        seen,
    };
    let batches = futures::stream::unfold(ReadState::Pending(Box::new(job)), next_batch);
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// Everything the decoding thread needs.
struct ReadJob {
    source: Box<dyn Read + Send>,
    display: String,
    id: ShuffleFileId,
    key: Arc<ShuffleKey>,
    schema: SchemaRef,
    check: MapPartitionsCheck,
    seen: Option<Arc<ExecutorAttestations>>,
}

enum ReadState {
    Pending(Box<ReadJob>),
    Running {
        batches: mpsc::Receiver<RecordBatch>,
        decoder: JoinHandle<Result<(), ShuffleError>>,
        display: String,
    },
    Done,
}

async fn next_batch(state: ReadState) -> Option<(Result<RecordBatch, DataFusionError>, ReadState)> {
    let (mut batches, decoder, display) = match state {
        ReadState::Pending(job) => {
            let (sender, batches) = mpsc::channel(READ_CHANNEL_CAPACITY);
            let display = job.display.clone();
            let decoder = tokio::task::spawn_blocking(move || decode_file(*job, sender));
            (batches, decoder, display)
        }
        ReadState::Running {
            batches,
            decoder,
            display,
        } => (batches, decoder, display),
        ReadState::Done => return None,
    };
    if let Some(batch) = batches.recv().await {
        let state = ReadState::Running {
            batches,
            decoder,
            display,
        };
        return Some((Ok(batch), state));
    }
    // The decoder is done: it either reached the authenticated end or failed.
    let error = match decoder.await {
        Ok(Ok(())) => return None,
        Ok(Err(e)) => e,
        Err(e) => ShuffleError::Task {
            file: display,
            message: e.to_string(),
        },
    };
    Some((Err(error.into()), ReadState::Done))
}

/// The decoding thread of [`read_shuffle_stream`]: verifies, decrypts and decodes the file,
/// sending its batches until the authenticated end (or until the consumer goes away).
fn decode_file(job: ReadJob, batches: mpsc::Sender<RecordBatch>) -> Result<(), ShuffleError> {
    let ReadJob {
        mut source,
        display,
        id,
        key,
        schema,
        check,
        seen,
    } = job;
    let format_error = |source| ShuffleError::Format {
        file: display.clone(),
        source,
    };
    let header = UnverifiedHeader::read_from(&mut source).map_err(format_error)?;
    if header.key() != key.reference() {
        return Err(ShuffleError::WrongKey {
            file: display.clone(),
        });
    }
    let (header, cipher) = header.verify(key.data_key()).map_err(format_error)?;
    if *header.dataset_id() != id.dataset_id() {
        return Err(ShuffleError::WrongFile {
            file: display.clone(),
        });
    }
    let decrypting = DecryptingReader::from_verified(source, Arc::new(cipher));
    let mut ipc = StreamReader::try_new(decrypting, None).map_err(|e| read_error(&display, e))?;
    let found = ipc.schema();
    if !same_fields(&found, &schema) {
        return Err(ShuffleError::SchemaMismatch {
            file: display.clone(),
            expected: describe_fields(&schema),
            found: describe_fields(&found),
        });
    }
    let map_error = |reason: String| ShuffleError::MapPartitions {
        file: display.clone(),
        reason,
    };
    let map_partitions = found
        .metadata()
        .get(MAP_PARTITIONS_METADATA)
        .ok_or_else(|| map_error("the file names no map partitions".into()))?;
    let map_partitions = MapPartitions::parse(map_partitions)
        .ok_or_else(|| map_error("its map partitions are malformed".into()))?;
    check(&map_partitions).map_err(map_error)?;
    for batch in &mut ipc {
        let batch = batch.map_err(|e| read_error(&display, e))?;
        // Re-labels the batch with the expected schema (which may differ in metadata) after
        // checking its columns against it.
        let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        let batch = RecordBatch::try_new_with_options(
            Arc::clone(&schema),
            batch.columns().to_vec(),
            &options,
        )
        .map_err(|e| read_error(&display, e))?;
        if batches.blocking_send(batch).is_err() {
            return Ok(()); // The consumer went away.
        }
    }
    // The IPC stream ended; the attestation trailer follows, up to the authenticated end.
    let mut trailer = Vec::new();
    let limit = (ATTESTATIONS_MAGIC.len() + 4 + MAX_ATTESTATIONS * (4 + MAX_TOKEN_LEN)) as u64;
    ipc.get_mut()
        .take(limit + 1)
        .read_to_end(&mut trailer)
        .map_err(|e| format_error(FormatError::from_io(e)))?;
    let tokens = decode_attestations(&trailer).ok_or_else(|| ShuffleError::Arrow {
        file: display.clone(),
        source: ArrowError::IpcError(
            "no valid attestation trailer after the end of the Arrow IPC stream".into(),
        ),
    })?;
    if let Some(seen) = seen {
        seen.extend(tokens);
    }
    Ok(())
}

/// Wraps an Arrow error of reading, recovering the format error of a damaged file.
fn read_error(display: &str, err: ArrowError) -> ShuffleError {
    match err {
        ArrowError::IoError(_, e) => ShuffleError::Format {
            file: display.to_string(),
            source: FormatError::from_io(e),
        },
        source => ShuffleError::Arrow {
            file: display.to_string(),
            source,
        },
    }
}

/// Same field names and types, in the same order (nullability and metadata are not compared).
fn same_fields(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields().iter())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

fn describe_fields(schema: &Schema) -> String {
    let fields: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{:?}: {}", f.name(), f.data_type()))
        .collect();
    format!("[{}]", fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field};
    use futures::TryStreamExt;
    use std::io::Cursor;

    const SECRET: &str = "very-secret-plaintext-value-4711";

    fn test_key() -> Arc<ShuffleKey> {
        key_with_reference(KeyReference::new("local:test", "shuffle-1", vec![0xAB; 60]))
    }

    fn key_with_reference(reference: KeyReference) -> Arc<ShuffleKey> {
        Arc::new(ShuffleKey::new(DataKey::generate().unwrap(), reference))
    }

    fn file_id() -> ShuffleFileId {
        ShuffleFileId {
            job_id: "job_0001-abc".into(),
            stage_id: 3,
            partition_id: 5,
            file_id: 42,
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("customer_name_column", DataType::Utf8, true),
        ]))
    }

    fn batch(start: i64, rows: usize) -> RecordBatch {
        let ids: Vec<i64> = (start..start + rows as i64).collect();
        let names: Vec<Option<String>> = ids
            .iter()
            .map(|i| match i % 7 {
                0 => None,
                1 => Some(SECRET.to_string()),
                _ => Some(format!("name-{i}")),
            })
            .collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap()
    }

    fn input(items: Vec<Result<RecordBatch, DataFusionError>>) -> SendableRecordBatchStream {
        Box::pin(RecordBatchStreamAdapter::new(
            schema(),
            futures::stream::iter(items),
        ))
    }

    /// Files in `dir`, temporary ones included.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn write(
        dir: &Path,
        batches: Vec<RecordBatch>,
        key: &Arc<ShuffleKey>,
    ) -> (PathBuf, ShuffleFileStats) {
        let path = dir.join("job/3/5/data-42.arrow");
        let stats = write_shuffle_file(
            input(batches.into_iter().map(Ok).collect()),
            &path,
            &file_id(),
            key,
            &MapPartitions::new([0, 1, 2, 7]),
        )
        .await
        .unwrap();
        (path, stats)
    }

    async fn read_bytes(
        bytes: Vec<u8>,
        id: ShuffleFileId,
        key: Arc<ShuffleKey>,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        read_shuffle_stream(
            Box::new(Cursor::new(bytes)),
            "test-file".into(),
            id,
            key,
            schema(),
            any_map_partitions(),
        )
        .try_collect()
        .await
    }

    fn shuffle_error(err: &DataFusionError) -> &ShuffleError {
        match err {
            DataFusionError::External(e) => e.downcast_ref::<ShuffleError>().unwrap(),
            other => panic!("not a shuffle error: {other}"),
        }
    }

    /// Three batches large enough to span many segments.
    fn large_batches() -> Vec<RecordBatch> {
        vec![batch(0, 20_000), batch(20_000, 20_000), batch(40_000, 5)]
    }

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let batches = large_batches();
        let (path, stats) = write(dir.path(), batches.clone(), &key).await;
        assert_eq!(stats.num_rows, 40_005);
        assert_eq!(stats.num_batches, 3);
        assert_eq!(stats.num_bytes, std::fs::metadata(&path).unwrap().len());
        assert!(stats.num_bytes > 2 * u64::from(DEFAULT_SEGMENT_SIZE));
        assert_eq!(listing(path.parent().unwrap()), vec!["data-42.arrow"]);

        let stream = read_shuffle_file(
            &path,
            file_id(),
            key.clone(),
            schema(),
            any_map_partitions(),
        )
        .unwrap();
        assert_eq!(stream.schema(), schema());
        let read: Vec<RecordBatch> = stream.try_collect().await.unwrap();
        assert_eq!(read, batches);

        // The same bytes arriving from any reader (e.g. the network).
        let read = read_bytes(std::fs::read(&path).unwrap(), file_id(), key)
            .await
            .unwrap();
        assert_eq!(read, batches);
    }

    /// The attestation trailer reaches the reader's collection when the file is read to its
    /// end; a missing or malformed trailer is refused.
    #[tokio::test]
    async fn attestation_trailers_reach_the_reader_and_are_required() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let path = dir.path().join("job/3/5/data-42.arrow");
        let tokens = vec!["token-b".to_string(), "token-a".to_string()];
        let given = tokens.clone();
        write_shuffle_file_attested(
            input(vec![Ok(batch(0, 10))]),
            &path,
            &file_id(),
            &key,
            &MapPartitions::new([0]),
            Box::new(move || given),
        )
        .await
        .unwrap();
        let seen = Arc::new(ExecutorAttestations::default());
        let mut stream = read_shuffle_file_collecting(
            &path,
            file_id(),
            key.clone(),
            schema(),
            any_map_partitions(),
            Some(seen.clone()),
        )
        .unwrap();
        stream.next().await.unwrap().unwrap();
        assert!(stream.next().await.is_none());
        assert_eq!(seen.tokens(), ["token-a", "token-b"]);

        // Trailers as a writer or an older version could leave them.
        let encoded = encode_attestations(&tokens);
        assert_eq!(decode_attestations(&encoded), Some(tokens.clone()));
        for bad in [
            Vec::new(),
            encoded[..encoded.len() - 1].to_vec(),
            [&encoded[..], b"x"].concat(),
            [ATTESTATIONS_MAGIC, &u32::MAX.to_be_bytes()[..]].concat(),
        ] {
            assert_eq!(decode_attestations(&bad), None, "{bad:?}");
        }
        let oversized = encode_attestations(&["x".repeat(MAX_TOKEN_LEN + 1)]);
        assert_eq!(decode_attestations(&oversized), Some(Vec::new()));
    }

    #[tokio::test]
    async fn empty_stream_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, stats) = write(dir.path(), vec![], &key).await;
        assert_eq!(stats.num_rows, 0);
        assert_eq!(stats.num_batches, 0);
        assert_eq!(stats.num_bytes, std::fs::metadata(&path).unwrap().len());
        let read: Vec<RecordBatch> =
            read_shuffle_file(&path, file_id(), key, schema(), any_map_partitions())
                .unwrap()
                .try_collect()
                .await
                .unwrap();
        assert!(read.is_empty());
    }

    #[tokio::test]
    async fn file_holds_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path(), vec![batch(0, 100)], &test_key()).await;
        let bytes = std::fs::read(&path).unwrap();
        for needle in [SECRET, "customer_name_column", "name-12"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} found in the file"
            );
        }
    }

    #[tokio::test]
    async fn another_location_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, _) = write(dir.path(), vec![batch(0, 10)], &key).await;
        let others = [
            ShuffleFileId {
                partition_id: 6,
                ..file_id()
            },
            ShuffleFileId {
                stage_id: 4,
                ..file_id()
            },
            ShuffleFileId {
                file_id: 43,
                ..file_id()
            },
            ShuffleFileId {
                job_id: "job_0002-abc".into(),
                ..file_id()
            },
        ];
        for other in others {
            let err = read_shuffle_file(&path, other, key.clone(), schema(), any_map_partitions())
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap_err();
            assert!(
                matches!(shuffle_error(&err), ShuffleError::WrongFile { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("data-42.arrow"), "{err}");
        }
    }

    #[tokio::test]
    async fn wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path(), vec![batch(0, 10)], &test_key()).await;
        let bytes = std::fs::read(&path).unwrap();

        // Another job's key.
        let other = key_with_reference(KeyReference::new("local:test", "shuffle-1", vec![1; 60]));
        let err = read_bytes(bytes.clone(), file_id(), other)
            .await
            .unwrap_err();
        assert!(
            matches!(shuffle_error(&err), ShuffleError::WrongKey { .. }),
            "{err}"
        );

        // The right reference but another key (the header MAC fails).
        let forged = key_with_reference(test_key().reference().clone());
        let err = read_bytes(bytes, file_id(), forged).await.unwrap_err();
        assert!(
            matches!(
                shuffle_error(&err),
                ShuffleError::Format {
                    source: FormatError::HeaderAuthentication,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, _) = write(dir.path(), large_batches(), &key).await;
        let bytes = std::fs::read(&path).unwrap();
        let header_len = UnverifiedHeader::read_from(&mut &bytes[..]).unwrap().len();
        let segment = DEFAULT_SEGMENT_SIZE as usize + ppml_format::TAG_LEN;
        let cuts = [
            bytes.len() - 1,
            bytes.len() / 2,
            header_len + segment, // after the first (non-final) segment
            header_len + 2 * segment,
            header_len,
            header_len / 2,
            0,
        ];
        for cut in cuts {
            let result = read_bytes(bytes[..cut].to_vec(), file_id(), key.clone()).await;
            let err = result.expect_err("a truncated file must fail");
            assert!(
                matches!(shuffle_error(&err), ShuffleError::Format { .. }),
                "cut at {cut}: {err}"
            );
        }
        // On disk too.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let result: Result<Vec<_>, _> =
            read_shuffle_file(&path, file_id(), key, schema(), any_map_partitions())
                .unwrap()
                .try_collect()
                .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn modification_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, _) = write(dir.path(), large_batches(), &key).await;
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        let err = read_bytes(bytes.clone(), file_id(), key.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                shuffle_error(&err),
                ShuffleError::Format {
                    source: FormatError::SegmentAuthentication { .. },
                    ..
                }
            ),
            "{err}"
        );
        // Trailing bytes are refused as well.
        bytes[middle] ^= 0x01;
        bytes.push(0);
        assert!(read_bytes(bytes, file_id(), key).await.is_err());
    }

    #[tokio::test]
    async fn schema_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, _) = write(dir.path(), vec![batch(0, 10)], &key).await;
        let other = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("customer_name_column", DataType::Int32, true),
        ]));
        let err = read_shuffle_file(&path, file_id(), key, other, any_map_partitions())
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err();
        assert!(
            matches!(shuffle_error(&err), ShuffleError::SchemaMismatch { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn failing_input_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-1.arrow");
        let stream = input(vec![
            Ok(batch(0, 10)),
            Err(DataFusionError::Execution("input broke".into())),
            Ok(batch(10, 10)),
        ]);
        let err = write_shuffle_file(
            stream,
            &path,
            &file_id(),
            &test_key(),
            &MapPartitions::new([0]),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ShuffleError::DataFusion { .. }), "{err}");
        assert!(err.to_string().contains("input broke"), "{err}");
        assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    }

    #[tokio::test]
    async fn cancelled_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-1.arrow");
        // One batch, then the input never ends.
        let batches =
            futures::stream::iter(vec![Ok(batch(0, 10))]).chain(futures::stream::pending());
        let stream: SendableRecordBatchStream =
            Box::pin(RecordBatchStreamAdapter::new(schema(), batches));
        let key = test_key();
        let id = file_id();
        let map_partitions = MapPartitions::new([0]);
        let write = write_shuffle_file(stream, &path, &id, &key, &map_partitions);
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(200), write).await;
        assert!(timed_out.is_err());
        assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    }

    #[tokio::test]
    async fn invalid_job_ids_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "", "a/b", "a.b", "ä", &"a".repeat(129)] {
            let id = ShuffleFileId {
                job_id: bad.to_string(),
                ..file_id()
            };
            assert!(
                matches!(id.validate(), Err(ShuffleError::InvalidJobId(_))),
                "{bad:?}"
            );
            let path = dir.path().join("x/data-1.arrow");
            let err = write_shuffle_file(
                input(vec![Ok(batch(0, 1))]),
                &path,
                &id,
                &test_key(),
                &MapPartitions::new([0]),
            )
            .await
            .unwrap_err();
            assert!(matches!(err, ShuffleError::InvalidJobId(_)), "{err}");
        }
        assert!(listing(dir.path()).is_empty());
        for good in ["a", "job_1-X", &"z".repeat(128)] {
            let id = ShuffleFileId {
                job_id: good.to_string(),
                ..file_id()
            };
            id.validate().unwrap();
        }
    }

    #[test]
    fn dataset_id_binds_every_field() {
        let base = file_id();
        let ids = [
            base.dataset_id(),
            ShuffleFileId {
                job_id: "job_0001-abd".into(),
                ..file_id()
            }
            .dataset_id(),
            ShuffleFileId {
                stage_id: 4,
                ..file_id()
            }
            .dataset_id(),
            ShuffleFileId {
                partition_id: 6,
                ..file_id()
            }
            .dataset_id(),
            ShuffleFileId {
                file_id: 43,
                ..file_id()
            }
            .dataset_id(),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // The definition, spelled out.
        let mut input = b"ppml-shuffle/2".to_vec();
        input.extend_from_slice(&12u32.to_be_bytes());
        input.extend_from_slice(b"job_0001-abc");
        input.extend_from_slice(&3u32.to_be_bytes());
        input.extend_from_slice(&5u32.to_be_bytes());
        input.extend_from_slice(&42u64.to_be_bytes());
        let digest = digest::digest(&digest::SHA256, &input);
        assert_eq!(&base.dataset_id()[..], &digest.as_ref()[..16]);
    }

    #[test]
    fn key_is_not_printed() {
        let data_key = DataKey::from_bytes([0x5A; 32]);
        let key = ShuffleKey::new(data_key, KeyReference::new("local:test", "k", vec![1]));
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"), "{shown}");
        assert!(
            !shown.contains("90, 90") && !shown.to_lowercase().contains("5a5a"),
            "{shown}"
        );
    }

    #[test]
    fn map_partitions_have_one_canonical_text() {
        let set = MapPartitions::new([7, 0, 1, 2, 3, 9, 3]);
        assert_eq!(set.as_slice(), &[0, 1, 2, 3, 7, 9]);
        assert_eq!(set.to_text(), "0-3,7,9");
        assert_eq!(MapPartitions::parse("0-3,7,9"), Some(set));
        assert_eq!(MapPartitions::parse("5").unwrap().as_slice(), &[5]);
        for bad in [
            "",
            "0-3,2",
            "3-1",
            "1-1",
            "0-1,2",
            "01",
            "a",
            "1,",
            ",1",
            "0-",
            "-",
            "1 ",
            "7,3",
            "0-4294967295",
        ] {
            assert_eq!(MapPartitions::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn readers_see_the_map_partitions_before_any_row() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let (path, _) = write(dir.path(), vec![batch(0, 10)], &key).await;
        let seen = Arc::new(std::sync::Mutex::new(None));
        let check: MapPartitionsCheck = Box::new({
            let seen = seen.clone();
            move |partitions: &MapPartitions| {
                *seen.lock().unwrap() = Some(partitions.clone());
                Ok(())
            }
        });
        let read: Vec<RecordBatch> =
            read_shuffle_file(&path, file_id(), key.clone(), schema(), check)
                .unwrap()
                .try_collect()
                .await
                .unwrap();
        assert_eq!(read.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
        assert_eq!(
            seen.lock().unwrap().as_ref().unwrap().as_slice(),
            &[0, 1, 2, 7]
        );
        let refuse: MapPartitionsCheck = Box::new(|_| Err("not the partitions expected".into()));
        let mut stream = read_shuffle_file(&path, file_id(), key, schema(), refuse).unwrap();
        let err = stream.next().await.unwrap().unwrap_err().to_string();
        assert!(err.contains("not the partitions expected"), "{err}");
        assert!(stream.next().await.is_none());
    }
}
