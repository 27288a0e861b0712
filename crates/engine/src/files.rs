//! Files in, datasets out, and back: what `ppml encrypt` and `ppml decrypt` do, for any
//! program.
//!
//! [`encrypt_paths`] turns a file, or a directory of files of one [`MediaKind`], into an
//! encrypted dataset; a CSV file is checked row by row (every row has as many fields as the
//! first) and can be split into parts on row boundaries, each starting with the header;
//! CSV, NDJSON and Parquet inputs can also be converted to another of these formats.
//! [`decrypt_dataset`] verifies a dataset and writes its plaintext to one file (CSV parts
//! concatenated under a single header), a directory of part files, or a stream.
//!
//! Both stream: memory does not grow with the data. Outputs appear only when complete; a
//! failure leaves no partial output and no plaintext behind.

use std::fs::{self, File};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use ppml_format::DecryptingReader;
use ppml_format::manifest::PartEntry;
use ppml_kms::{KeyManagementService, PrimaryKeyId};

use crate::csv_split::CsvScanner;
use crate::dataset::{
    DatasetWriter, Durability, PART_SUFFIX, PartBody, PartWriter, VerifiedDataset, VerifiedPart,
    WriteOptions, open_dataset, part_name,
};
use crate::output::{AtomicDir, AtomicFile};
use crate::{
    DatasetLocation, DecryptingStore, EngineError, OutputFormat, OutputTarget, PpmlSession, Result,
};

const CHUNK: usize = 1 << 18;

/// What kind of data a dataset holds, as its manifest's media type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MediaKind {
    /// CSV; with `header`, every part starts with the header line.
    Csv {
        /// Whether each part starts with a header line.
        header: bool,
    },
    /// Newline-delimited JSON.
    Json,
    /// Apache Parquet.
    Parquet,
    /// Anything else, kept as bytes.
    Binary,
}

impl std::fmt::Display for MediaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MediaKind::Csv { header: true } => "CSV",
            MediaKind::Csv { header: false } => "CSV without header",
            MediaKind::Json => "NDJSON",
            MediaKind::Parquet => "Parquet",
            MediaKind::Binary => "bytes",
        })
    }
}

impl MediaKind {
    /// The kind of a file, from its extension (`.csv`; `.json`, `.jsonl`, `.ndjson`;
    /// `.parquet`; anything else is binary). CSV files are taken to have a header.
    pub fn of_path(path: &Path) -> MediaKind {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("csv") => MediaKind::Csv { header: true },
            Some("json" | "jsonl" | "ndjson") => MediaKind::Json,
            Some("parquet") => MediaKind::Parquet,
            _ => MediaKind::Binary,
        }
    }

    /// The kind recorded as `media_type` in a manifest.
    pub fn from_media_type(media_type: &str) -> MediaKind {
        let essence = media_type.split(';').next().unwrap_or("").trim();
        match essence {
            "text/csv" => MediaKind::Csv {
                header: !media_type.contains("header=absent"),
            },
            "application/x-ndjson" => MediaKind::Json,
            "application/vnd.apache.parquet" => MediaKind::Parquet,
            _ => MediaKind::Binary,
        }
    }

    /// The media type a manifest records for this kind.
    pub fn media_type(self) -> &'static str {
        match self {
            MediaKind::Csv { header: true } => crate::dataset::CSV_WITH_HEADER,
            MediaKind::Csv { header: false } => "text/csv; header=absent",
            MediaKind::Json => "application/x-ndjson",
            MediaKind::Parquet => "application/vnd.apache.parquet",
            MediaKind::Binary => "application/octet-stream",
        }
    }

    /// The extension of part files of this kind (before `.ppml`).
    pub fn extension(self) -> &'static str {
        match self {
            MediaKind::Csv { .. } => "csv",
            MediaKind::Json => "json",
            MediaKind::Parquet => "parquet",
            MediaKind::Binary => "bin",
        }
    }

    fn same_file_kind(self, other: MediaKind) -> bool {
        self.extension() == other.extension()
    }
}

/// Observes a long operation's bytes (a command-line tool draws a progress bar).
pub trait Progress: Send + Sync {
    /// The operation will process `bytes` bytes in all.
    fn start(&self, _bytes: u64) {}
    /// `bytes` more bytes were processed.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

/// How [`encrypt_paths`] encrypts.
#[derive(Clone, Debug)]
pub struct EncryptOptions {
    /// Split a single CSV file into this many parts of about equal size, on row boundaries
    /// (at least 1).
    pub partitions: usize,
    /// CSV inputs start with a header line.
    pub has_header: bool,
    /// Check that every CSV row has as many fields as the first, before anything is
    /// committed; off, rows are still split on row boundaries and a bad row is reported when
    /// a query reads it.
    pub check_rows: bool,
    /// Plaintext bytes per encrypted segment.
    pub segment_size: u32,
    /// Replace an existing output (only once the new one is complete).
    pub overwrite: bool,
    /// Sync the output before it appears.
    pub durability: Durability,
    /// Convert the input to this format (CSV, NDJSON or Parquet input; the schema is
    /// inferred) instead of encrypting its files as they are. `None`, or the input's own
    /// format, keeps the files' bytes.
    pub to: Option<OutputFormat>,
    /// How Parquet output is encrypted (with `to` Parquet): keys of their own for some
    /// columns, plaintext footer.
    pub parquet: crate::pme::PmeOptions,
}

impl Default for EncryptOptions {
    fn default() -> Self {
        EncryptOptions {
            partitions: 1,
            has_header: true,
            check_rows: true,
            segment_size: ppml_format::DEFAULT_SEGMENT_SIZE,
            overwrite: false,
            durability: Durability::default(),
            to: None,
            parquet: Default::default(),
        }
    }
}

/// What [`encrypt_paths`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncryptSummary {
    /// Part files.
    pub parts: usize,
    /// Plaintext bytes encrypted.
    pub plaintext_bytes: u64,
}

fn invalid(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The files [`encrypt_paths`] reads for `input`: the file itself, or the files of the
/// directory in name order (names starting with `.` or `_` skipped).
pub fn input_files(input: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(input).map_err(|e| EngineError::io(input, e))?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(input).map_err(|e| EngineError::io(input, e))? {
        let entry = entry.map_err(|e| EngineError::io(input, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(['.', '_']) {
            continue;
        }
        if entry
            .file_type()
            .map_err(|e| EngineError::io(entry.path(), e))?
            .is_file()
        {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(invalid(input, "the directory holds no files to encrypt"));
    }
    Ok(files)
}

/// Encrypts the file or directory `input` into a new dataset at `destination` (a directory
/// or an `s3://` prefix) under a fresh data key that `kms` generates and wraps under
/// `primary`. One part per file; a single CSV file is split into `options.partitions` parts.
/// All files must be of one [`MediaKind`]. On failure nothing stays behind (in S3: the parts
/// already uploaded are deleted).
pub async fn encrypt_paths(
    kms: &dyn KeyManagementService,
    primary: &PrimaryKeyId,
    input: &Path,
    destination: impl Into<DatasetLocation>,
    options: &EncryptOptions,
    progress: &dyn Progress,
) -> Result<EncryptSummary> {
    let files = input_files(input)?;
    let kind = match MediaKind::of_path(&files[0]) {
        MediaKind::Csv { .. } => MediaKind::Csv {
            header: options.has_header,
        },
        other => other,
    };
    if let Some(other) = files
        .iter()
        .find(|f| !MediaKind::of_path(f).same_file_kind(kind))
    {
        return Err(invalid(
            input,
            format!(
                "all files of a dataset must be of one kind ({} is not {})",
                other.display(),
                kind.extension()
            ),
        ));
    }
    if options.partitions == 0 {
        return Err(invalid(
            input,
            "the number of partitions must be at least 1",
        ));
    }
    if !options.parquet.column_keys.is_empty() && options.to != Some(OutputFormat::Parquet) {
        return Err(invalid(
            input,
            "column keys are for Parquet output (--to parquet)",
        ));
    }
    // Parquet is always re-encoded when asked for: its parts are then encrypted with PME.
    if let Some(to) = options.to
        && (!to.media_kind().same_file_kind(kind) || to == OutputFormat::Parquet)
    {
        return convert_paths(
            kms,
            primary,
            input,
            &files,
            kind,
            to,
            destination,
            options,
            progress,
        )
        .await;
    }
    let is_csv = matches!(kind, MediaKind::Csv { .. });
    if options.partitions > 1 && (files.len() > 1 || !is_csv) {
        return Err(invalid(
            input,
            "only a single CSV file is split into partitions; a directory is encrypted one \
             part per file",
        ));
    }
    let writer = DatasetWriter::create(
        kms,
        primary,
        destination,
        WriteOptions {
            media_type: kind.media_type().to_string(),
            segment_size: options.segment_size,
            overwrite: options.overwrite,
            durability: options.durability,
            parquet: Default::default(),
            job: None,
        },
    )
    .await?;
    progress.start(total_size(&files));
    let entries = match encrypt_files(&files, kind, options, &writer, progress).await {
        Ok(entries) => entries,
        Err(e) => {
            writer.abort().await;
            return Err(e);
        }
    };
    let summary = EncryptSummary {
        parts: entries.len(),
        plaintext_bytes: entries.iter().map(|e| e.plaintext_len).sum(),
    };
    writer.commit(entries).await?;
    Ok(summary)
}

/// Decrypts the dataset at `location` and writes its rows converted to `to` (CSV with one
/// header, NDJSON or Parquet): to a directory (one file per partition of the scan), one file,
/// or a stream. The rows are read by an encrypted session, so every format and every column
/// the KMS releases can be converted; outputs appear only when complete. Returns the rows
/// written.
pub async fn decrypt_converted(
    kms: Arc<dyn KeyManagementService>,
    location: &DatasetLocation,
    output: DecryptOutput<'_>,
    to: OutputFormat,
    options: &DecryptOptions,
) -> Result<u64> {
    let session = PpmlSession::encrypted(kms, None);
    let (table, _) = session.dataset_table(location.clone(), None).await?;
    let df = session.context().read_table(table)?;
    match output {
        DecryptOutput::Dir(dir) => {
            let target = OutputTarget::Plaintext {
                dir,
                overwrite: options.overwrite,
                durability: options.durability,
            };
            Ok(session.write(df, target, None, to).await?.rows)
        }
        DecryptOutput::Stream(out) => {
            let rows = session.write_one(df, &mut *out, to).await?;
            out.flush().map_err(|e| EngineError::io("-", e))?;
            Ok(rows)
        }
        DecryptOutput::File(path) if is_stream_device(path) => {
            let mut device = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| EngineError::io(path, e))?;
            session.write_one(df, &mut device, to).await
        }
        DecryptOutput::File(path) => {
            let mut file = AtomicFile::create(path, options.overwrite, options.durability)?;
            let rows = session.write_one(df, &mut file, to).await?;
            file.commit()?;
            Ok(rows)
        }
    }
}

/// Writes the rows of PME part `part` as a plaintext Parquet file to `out`, streaming row
/// group by row group: every module is authenticated by the Parquet reader as it decrypts.
async fn decrypt_pme_part<W: Write + Send + ?Sized>(
    store: Arc<dyn ObjectStore>,
    part: &VerifiedPart,
    pme: &crate::pme::PmePart,
    out: &mut W,
    out_name: &Path,
) -> Result<()> {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
    use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;

    let parquet = |e: datafusion::parquet::errors::ParquetError| {
        EngineError::from(datafusion::error::DataFusionError::ParquetError(Box::new(
            e,
        )))
    };
    let reader = StoredParquet {
        store,
        location: part.location.clone(),
        size: part.entry.ciphertext_len,
    };
    let options =
        ArrowReaderOptions::new().with_file_decryption_properties(pme.decryption_properties()?);
    let builder = ParquetRecordBatchStreamBuilder::new_with_options(reader, options)
        .await
        .map_err(parquet)?;
    let mut writer =
        ArrowWriter::try_new(&mut *out, builder.schema().clone(), None).map_err(parquet)?;
    let mut batches = builder.build().map_err(parquet)?;
    while let Some(batch) = batches.next().await {
        writer.write(&batch.map_err(parquet)?).map_err(parquet)?;
    }
    writer.close().map_err(parquet)?;
    out.flush().map_err(|e| EngineError::io(out_name, e))
}

/// A Parquet file in an object store, read by range for arrow-rs's async reader.
struct StoredParquet {
    store: Arc<dyn ObjectStore>,
    location: StorePath,
    size: u64,
}

impl datafusion::parquet::arrow::async_reader::AsyncFileReader for StoredParquet {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, datafusion::parquet::errors::Result<bytes::Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.location, range)
                .await
                .map_err(|e| datafusion::parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<
        'a,
        datafusion::parquet::errors::Result<
            Arc<datafusion::parquet::file::metadata::ParquetMetaData>,
        >,
    > {
        Box::pin(async move {
            let decryption = options.and_then(|o| o.file_decryption_properties().cloned());
            let size = self.size;
            let metadata = datafusion::parquet::file::metadata::ParquetMetaDataReader::new()
                .with_decryption_properties(decryption)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        })
    }
}

/// Encrypts `input` (of `kind`) converted to `to`: the plaintext is read by a plaintext
/// DataFusion session in this process and written by the encrypted dataset writer, one part
/// per partition, so no plaintext copy of the converted data touches disk.
#[allow(clippy::too_many_arguments)]
async fn convert_paths(
    kms: &dyn KeyManagementService,
    primary: &PrimaryKeyId,
    input: &Path,
    files: &[PathBuf],
    kind: MediaKind,
    to: OutputFormat,
    destination: impl Into<DatasetLocation>,
    options: &EncryptOptions,
    progress: &dyn Progress,
) -> Result<EncryptSummary> {
    if matches!(kind, MediaKind::Binary) {
        return Err(invalid(
            input,
            "only CSV, NDJSON and Parquet files can be converted to another format",
        ));
    }
    if matches!(kind, MediaKind::Csv { header: false }) {
        return Err(invalid(
            input,
            "a CSV file without a header line cannot be converted (its columns have no names)",
        ));
    }
    let total: u64 = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.start(total);
    let session = PpmlSession::plaintext(None);
    let table = match kind {
        // Parquet files another tool encrypted with PME: their keys come from `kms`.
        MediaKind::Parquet => {
            let mut import = crate::pme::ImportFactory::default();
            for file in files {
                let absolute = std::path::absolute(file).map_err(|e| EngineError::io(file, e))?;
                if let Some(properties) =
                    crate::pme::foreign_file_decryption(kms, &absolute).await?
                {
                    import.add(&absolute, properties)?;
                }
            }
            if import.is_empty() {
                session.plaintext_table(input, None).await?
            } else {
                session
                    .encrypted_parquet_import(input, Arc::new(import))
                    .await?
            }
        }
        _ => session.plaintext_table(input, None).await?,
    };
    let df = session.context().read_table(table)?;
    let target = OutputTarget::Encrypted {
        kms,
        primary,
        dir: destination.into(),
        options: WriteOptions {
            media_type: to.media_kind().media_type().to_string(),
            segment_size: options.segment_size,
            overwrite: options.overwrite,
            durability: options.durability,
            parquet: options.parquet.clone(),
            job: None,
        },
    };
    let written = session
        .write(df, target, Some(options.partitions), to)
        .await?;
    progress.advance(total);
    Ok(EncryptSummary {
        parts: written.parts,
        plaintext_bytes: written.plaintext_bytes,
    })
}

async fn encrypt_files(
    files: &[PathBuf],
    kind: MediaKind,
    options: &EncryptOptions,
    writer: &DatasetWriter,
    progress: &dyn Progress,
) -> Result<Vec<PartEntry>> {
    let mut entries = Vec::new();
    for file in files {
        let input = File::open(file).map_err(|e| EngineError::io(file, e))?;
        let size = input
            .metadata()
            .map_err(|e| EngineError::io(file, e))?
            .len();
        let first = entries.len();
        let new = if let MediaKind::Csv { header } = kind {
            let csv = CsvInput {
                file: input,
                path: file,
                size,
                has_header: header,
                check_rows: options.check_rows,
            };
            encrypt_csv(csv, options.partitions, first, writer, progress).await?
        } else {
            let mut part = writer.part(&part_name(first, kind.extension())).await?;
            part.reserve(size)?;
            copy_with_progress(input, file, &mut part, progress).await?;
            vec![part.finish().await?]
        };
        entries.extend(new);
    }
    Ok(entries)
}

/// The total size of `files` (for a progress bar; unreadable files count 0).
pub(crate) fn total_size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

pub(crate) async fn copy_with_progress(
    mut input: impl Read,
    path: &Path,
    out: &mut PartWriter,
    progress: &dyn Progress,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EngineError::io(path, e)),
        };
        out.write_all(&buf[..n])
            .map_err(|e| EngineError::io(out.name(), e))?;
        out.ready().await?;
        progress.advance(n as u64);
    }
}

/// One CSV file to encrypt.
struct CsvInput<'a> {
    file: File,
    path: &'a Path,
    size: u64,
    has_header: bool,
    check_rows: bool,
}

/// Encrypts one CSV file, checking every row's field count (unless `check_rows` is off), into
/// `partitions` parts of about equal size split on row boundaries; every part starts with the
/// header line.
async fn encrypt_csv(
    mut csv: CsvInput<'_>,
    partitions: usize,
    first_index: usize,
    writer: &DatasetWriter,
    progress: &dyn Progress,
) -> Result<Vec<PartEntry>> {
    let size = csv.size;
    let write_error = |e| EngineError::io(csv.path, e);
    let target = size.div_ceil(partitions as u64).max(1);
    let mut scanner =
        CsvScanner::new(csv.path.display().to_string(), csv.has_header).check_rows(csv.check_rows);
    let mut entries = Vec::new();
    let mut current = writer.part(&part_name(first_index, "csv")).await?;
    // A part holds at least `target` bytes, the last one what remains.
    current.reserve(if partitions == 1 { size } else { target })?;
    let mut consumed = 0u64;
    let mut bytes_in_part = 0u64;
    // A part ended exactly at the end of a chunk: start the next one only if more data comes,
    // so that no part is left with a header alone.
    let mut switch_pending = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match csv.file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EngineError::io(csv.path, e)),
        };
        let chunk = &buf[..n];
        let mut from = 0;
        while from < n {
            if switch_pending {
                switch_pending = false;
                let next = writer
                    .part(&part_name(first_index + entries.len() + 1, "csv"))
                    .await?;
                entries.push(std::mem::replace(&mut current, next).finish().await?);
                let remaining = size.saturating_sub(consumed);
                let header = scanner.header().unwrap_or_default();
                let last = entries.len() + 1 == partitions;
                current.reserve(header.len() as u64 + if last { remaining } else { target })?;
                current.write_all(header).map_err(write_error)?;
                bytes_in_part = 0;
            }
            // The row end at which this part reaches its share, if another part may follow.
            let min_end = if entries.len() + 1 < partitions {
                usize::try_from(target.saturating_sub(bytes_in_part)).unwrap_or(usize::MAX)
            } else {
                usize::MAX
            };
            let end = match scanner.scan_until(&chunk[from..], min_end)? {
                Some(end) => {
                    switch_pending = true;
                    from + end
                }
                None => n,
            };
            current.write_all(&chunk[from..end]).map_err(write_error)?;
            bytes_in_part += (end - from) as u64;
            consumed += (end - from) as u64;
            from = end;
        }
        current.ready().await?;
        progress.advance(n as u64);
    }
    scanner.finish()?;
    entries.push(current.finish().await?);
    Ok(entries)
}

/// Where the ciphertext of a verified dataset's parts is read from.
enum PartSource {
    /// Files of this directory, decrypted sequentially.
    Dir(PathBuf),
    /// Parts registered under `root` in a decrypting store (S3), fetched and decrypted in
    /// bounded ranges; the dataset's URL for messages.
    Store(Arc<DecryptingStore>, StorePath, String),
}

/// Opens and verifies the dataset at `location` with keys from `kms`: its manifest's MAC,
/// its file list and every part's header. No row is read.
pub async fn verify_dataset(
    location: &DatasetLocation,
    kms: &dyn KeyManagementService,
) -> Result<VerifiedDataset> {
    Ok(open_input(location, kms).await?.0)
}

/// Opens and verifies the dataset at `location` with keys from `kms`.
async fn open_input(
    location: &DatasetLocation,
    kms: &dyn KeyManagementService,
) -> Result<(VerifiedDataset, PartSource)> {
    match location {
        DatasetLocation::Local(dir) => Ok((
            open_local_dataset(dir, kms).await?,
            PartSource::Dir(dir.clone()),
        )),
        DatasetLocation::S3 { bucket, prefix } => {
            let store = Arc::new(
                DecryptingStore::new(crate::s3::s3_object_store(bucket)?)
                    .with_display_base(format!("s3://{bucket}")),
            );
            let dataset =
                open_dataset(store.inner().as_ref(), prefix, &location.to_string(), kms).await?;
            let root = store.register(&dataset);
            Ok((
                dataset,
                PartSource::Store(store, root, location.to_string()),
            ))
        }
    }
}

/// Opens and verifies the dataset in the directory `dir` with keys from `kms`.
pub async fn open_local_dataset(
    dir: &Path,
    kms: &dyn KeyManagementService,
) -> Result<VerifiedDataset> {
    if !dir.is_dir() {
        if dir.exists() {
            return Err(EngineError::NotADataset(dir.display().to_string()));
        }
        return Err(EngineError::InvalidLocation {
            location: dir.display().to_string(),
            reason: "no such dataset directory".into(),
        });
    }
    let absolute = std::path::absolute(dir).map_err(|e| EngineError::io(dir, e))?;
    let root =
        StorePath::from_absolute_path(&absolute).map_err(|e| EngineError::InvalidLocation {
            location: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    open_dataset(
        &LocalFileSystem::new(),
        &root,
        &dir.display().to_string(),
        kms,
    )
    .await
}

/// Verified plaintext of one part on its way to the output, optionally without its first line
/// (the header of a part after the first when concatenating CSV).
struct PlainOut<'a, W: Write + ?Sized> {
    out: &'a mut W,
    skipping: bool,
    total: u64,
    progress: &'a dyn Progress,
}

impl<W: Write + ?Sized> PlainOut<'_, W> {
    fn push(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let n = data.len();
        self.total += n as u64;
        if self.skipping {
            match memchr::memchr(b'\n', data) {
                Some(nl) => {
                    data = &data[nl + 1..];
                    self.skipping = false;
                }
                None => data = &[],
            }
        }
        self.out.write_all(data)?;
        self.progress.advance(n as u64);
        Ok(())
    }
}

/// Decrypts one verified part into `out` (named `out_name` in errors), optionally dropping
/// its first line.
async fn decrypt_part<W: Write + Send + ?Sized>(
    source: &PartSource,
    part: &VerifiedPart,
    out: &mut W,
    out_name: &Path,
    skip_first_line: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let (cipher, layout) = match &part.body {
        PartBody::Sealed { cipher, layout } => (cipher, layout),
        PartBody::Pme(pme) => {
            let store: Arc<dyn ObjectStore> = match source {
                PartSource::Dir(_) => Arc::new(LocalFileSystem::new()),
                PartSource::Store(store, ..) => store.inner().clone(),
            };
            decrypt_pme_part(store, part, pme, out, out_name).await?;
            progress.advance(part.entry.ciphertext_len);
            return Ok(());
        }
    };
    let mut plain = PlainOut {
        out,
        skipping: skip_first_line,
        total: 0,
        progress,
    };
    let write_error = |e| EngineError::io(out_name, e);
    let display = match source {
        PartSource::Dir(dir) => {
            let path = dir.join(&part.entry.name);
            let display = path.display().to_string();
            let mut file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            file.seek(SeekFrom::Start(layout.header_len()))
                .map_err(|e| EngineError::io(&path, e))?;
            let mut reader = DecryptingReader::from_verified(file, cipher.clone());
            loop {
                // Each decrypted segment is written straight from the reader's buffer.
                let buf = match reader.fill_buf() {
                    Ok([]) => break,
                    Ok(buf) => buf,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(EngineError::Format {
                            path: display,
                            source: ppml_format::FormatError::from_io(e),
                        });
                    }
                };
                let n = buf.len();
                plain.push(buf).map_err(write_error)?;
                reader.consume(n);
            }
            display
        }
        PartSource::Store(store, root, dataset) => {
            // Segments are authenticated before the store returns any of their bytes.
            let location = root.clone().join(part.entry.name.as_str());
            let mut stream = store
                .get(&location)
                .await
                .map_err(crate::store::engine_error)?
                .into_stream();
            while let Some(chunk) = stream.next().await {
                plain
                    .push(&chunk.map_err(crate::store::engine_error)?)
                    .map_err(write_error)?;
            }
            format!("{dataset}/{}", part.entry.name)
        }
    };
    if plain.total != part.entry.plaintext_len {
        return Err(EngineError::PartMismatch {
            path: display,
            what: "plaintext length",
        });
    }
    Ok(())
}

/// A character device or FIFO: an output that is a stream, not a file to replace.
fn is_stream_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| {
        let t = m.file_type();
        t.is_char_device() || t.is_fifo()
    })
}

/// Where [`decrypt_dataset`] writes the plaintext.
pub enum DecryptOutput<'a> {
    /// One file: the parts concatenated, CSV under a single header. A file appears only when
    /// complete; a character device or named pipe (`/dev/null`, a terminal) is written into
    /// as a stream.
    File(&'a Path),
    /// A new directory with one plaintext file per part (named after the part, without
    /// `.ppml`), appearing only when complete.
    Dir(&'a Path),
    /// A stream (standard output): the parts concatenated as for [`DecryptOutput::File`].
    /// Plaintext is streamed as it is verified, so a failure can leave a prefix written.
    Stream(&'a mut (dyn Write + Send)),
}

/// How [`decrypt_dataset`] writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecryptOptions {
    /// Replace an existing output file or directory (only once the new one is complete).
    pub overwrite: bool,
    /// Sync the output before it appears.
    pub durability: Durability,
}

/// Verifies the dataset at `location` with keys from `kms` and writes its plaintext to
/// `output`. Returns the plaintext bytes of the dataset.
pub async fn decrypt_dataset(
    kms: &dyn KeyManagementService,
    location: &DatasetLocation,
    output: DecryptOutput<'_>,
    options: &DecryptOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    let (dataset, source) = open_input(location, kms).await?;
    if MediaKind::from_media_type(dataset.manifest.media_type()) == MediaKind::Parquet
        && dataset.parts.len() > 1
        && !matches!(output, DecryptOutput::Dir(_))
    {
        // Parquet files cannot be concatenated: each ends with its own footer.
        return Err(EngineError::InvalidInput {
            path: dataset.display.clone(),
            reason: format!(
                "a Parquet dataset of {} parts cannot be written as one file; decrypt it to a \
                 directory (one file per part)",
                dataset.parts.len()
            ),
        });
    }
    let total = dataset.manifest.plaintext_len();
    let skip_headers = dataset.csv_has_header();
    progress.start(total);
    let whole = Concatenation {
        dataset: &dataset,
        source: &source,
        skip_headers,
        progress,
    };
    match output {
        DecryptOutput::Dir(out_dir) => {
            let mut atomic = AtomicDir::create(out_dir, options.overwrite, options.durability)?;
            for part in &dataset.parts {
                let name = part
                    .entry
                    .name
                    .strip_suffix(PART_SUFFIX)
                    .unwrap_or(&part.entry.name);
                let path = out_dir.join(name);
                let io = |e| EngineError::io(&path, e);
                let mut file = atomic.create_file(name)?;
                // A PME part's plaintext size is known only once it is rewritten.
                if let PartBody::Sealed { .. } = part.body {
                    crate::dataset::preallocate(&file, part.entry.plaintext_len).map_err(io)?;
                }
                decrypt_part(&source, part, &mut file, &path, false, progress).await?;
                options.durability.sync(&file).map_err(io)?;
            }
            atomic.commit()?;
        }
        DecryptOutput::Stream(out) => whole.write_to(out, Path::new("-")).await?,
        DecryptOutput::File(path) if is_stream_device(path) => {
            // /dev/null, a named pipe, a terminal: write straight into it. (A temporary
            // sibling renamed over it would replace the device node itself.)
            let device = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| EngineError::io(path, e))?;
            let mut device = std::io::BufWriter::with_capacity(CHUNK, device);
            whole.write_to(&mut device, path).await?;
        }
        DecryptOutput::File(path) => {
            let mut file = AtomicFile::create(path, options.overwrite, options.durability)?;
            if !dataset.is_pme() {
                file.preallocate(total)?;
            }
            whole.write_to(&mut file, path).await?;
            file.commit()?;
        }
    }
    Ok(total)
}

/// The parts of a dataset written one after the other, CSV headers after the first dropped.
struct Concatenation<'a> {
    dataset: &'a VerifiedDataset,
    source: &'a PartSource,
    skip_headers: bool,
    progress: &'a dyn Progress,
}

impl Concatenation<'_> {
    async fn write_to(&self, out: &mut (dyn Write + Send), name: &Path) -> Result<()> {
        for (i, part) in self.dataset.parts.iter().enumerate() {
            let skip = self.skip_headers && i > 0;
            decrypt_part(self.source, part, out, name, skip, self.progress).await?;
        }
        out.flush().map_err(|e| EngineError::io(name, e))
    }
}
