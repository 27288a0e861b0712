//! Importing BigDL PPML datasets into ppml datasets (`docs/migrating-from-bigdl.md` §1).
//!
//! A BigDL dataset's parts are decrypted as they are read ([`ppml_format::bigdl`]) and written
//! straight into a new ppml dataset under a fresh data key from ppml's KMS: no plaintext
//! reaches the disk, and the new dataset is committed only after every part's HMAC trailer
//! verified, so a damaged BigDL dataset leaves nothing behind.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ppml_format::FormatError;
use ppml_format::bigdl::{
    self, DataKeyString, PartHeader, PartReader, Variant, unwrap_with_plaintext_primary_key,
};
use ppml_format::manifest::PartEntry;
use ppml_kms::{KeyManagementService, KmsError, PrimaryKeyId};
use zeroize::Zeroizing;

use crate::dataset::{DatasetWriter, Durability, WriteOptions, part_name};
use crate::files::{MediaKind, Progress, copy_with_progress, total_size};
use crate::output::AtomicDir;
use crate::{DatasetLocation, EngineError, Result};

/// The key id or wrapped key a BigDL key file holds (`primaryKeyPath`, `dataKeyPath`, the
/// kms-utils key files): its first line, trimmed; empty for an empty file.
pub fn read_key_file(path: &Path) -> std::io::Result<Zeroizing<String>> {
    let text = Zeroizing::new(fs::read_to_string(path)?);
    Ok(Zeroizing::new(
        text.lines().next().unwrap_or("").trim().to_string(),
    ))
}

/// How the data keys of a BigDL dataset are unwrapped.
#[derive(Clone)]
pub enum BigDlKeys {
    /// By the BigDL user's eHSM-API KMS (an eHSM, or ppml's server standing in for one):
    /// `Decrypt` under `primary_key_id` (the first line of BigDL's primary key file) with
    /// BigDL's `aad` ([`bigdl::EHSM_AAD`]).
    Kms {
        /// The client of that KMS.
        kms: Arc<dyn KeyManagementService>,
        /// The primary key the data keys were wrapped under.
        primary_key_id: String,
    },
    /// BigDL's no-KMS mode (`primaryKeyPlainText`): the base64 primary key itself.
    PlaintextPrimaryKey(Arc<Zeroizing<String>>),
}

impl std::fmt::Debug for BigDlKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BigDlKeys::Kms {
                kms,
                primary_key_id,
            } => f
                .debug_struct("Kms")
                .field("kms", &kms.kms_id())
                .field("primary_key_id", primary_key_id)
                .finish(),
            BigDlKeys::PlaintextPrimaryKey(_) => f.write_str("PlaintextPrimaryKey(<redacted>)"),
        }
    }
}

impl BigDlKeys {
    async fn unwrap(&self, wrapped: &str) -> Result<DataKeyString> {
        match self {
            BigDlKeys::Kms {
                kms,
                primary_key_id,
            } => {
                let plaintext = kms
                    .unwrap_foreign_key(primary_key_id, wrapped, bigdl::EHSM_AAD)
                    .await
                    .map_err(|source| EngineError::Kms {
                        dataset: format!("BigDL data key under {primary_key_id}"),
                        source,
                    })?;
                Ok(DataKeyString::from_ehsm_plaintext(&plaintext))
            }
            BigDlKeys::PlaintextPrimaryKey(primary) => {
                unwrap_with_plaintext_primary_key(primary, wrapped).map_err(|e| EngineError::Kms {
                    dataset: "BigDL data key".into(),
                    source: match e {
                        FormatError::BigDlDecryption => KmsError::UnwrapFailed,
                        other => KmsError::InvalidConfig(other.to_string()),
                    },
                })
            }
        }
    }
}

/// Options of [`import_bigdl`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The BigDL writer; `None` detects `common` and 2.1/2.2 from the first part (2.2 is
    /// tried before 2.1). `nativeaescbc` cannot be detected.
    pub variant: Option<Variant>,
    /// The wrapped data key, when it is in no `.meta` file (2.1 and 2.2 kept it in the
    /// `dataKeyPath` file of the job).
    pub wrapped_data_key: Option<String>,
    /// Imports `nativeaescbc` parts, which carry no MAC and cannot be verified.
    pub allow_unauthenticated: bool,
    /// Whether every CSV part starts with a header line (Spark's `header=true`).
    pub has_header: bool,
    /// Segment size of the new dataset's parts.
    pub segment_size: u32,
    /// Replace an existing dataset at the destination.
    pub overwrite: bool,
    /// How durably the new dataset is written.
    pub durability: Durability,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            variant: None,
            wrapped_data_key: None,
            allow_unauthenticated: false,
            has_header: true,
            segment_size: ppml_format::DEFAULT_SEGMENT_SIZE,
            overwrite: false,
            durability: Durability::default(),
        }
    }
}

/// What [`import_bigdl`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The BigDL variant read.
    pub variant: Variant,
    /// Parts imported (one ppml part per BigDL part).
    pub parts: usize,
    /// Plaintext bytes imported.
    pub plaintext_bytes: u64,
}

fn invalid(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The part files of the BigDL dataset `input` (a directory, or one part file) and the
/// directory holding its `.meta`.
fn part_files(input: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    let meta = fs::metadata(input).map_err(|e| EngineError::io(input, e))?;
    if !meta.is_dir() {
        let dir = input.parent().unwrap_or(Path::new(".")).to_path_buf();
        return Ok((vec![input.to_path_buf()], dir));
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(input).map_err(|e| EngineError::io(input, e))? {
        let entry = entry.map_err(|e| EngineError::io(input, e))?;
        // Spark's `_SUCCESS`, checksum files and BigDL's `.meta` are not parts.
        if entry.file_name().to_string_lossy().starts_with(['.', '_']) {
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
        return Err(invalid(input, "the directory holds no BigDL part files"));
    }
    Ok((files, input.to_path_buf()))
}

/// The kind of a BigDL part from its name: `part-….csv.cbc` is CSV, `….json.cbc` NDJSON.
fn part_kind(path: &Path, has_header: bool) -> Result<MediaKind> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let inner = name.strip_suffix(".cbc").unwrap_or(&name);
    match MediaKind::of_path(Path::new(inner)) {
        MediaKind::Csv { .. } => Ok(MediaKind::Csv { header: has_header }),
        MediaKind::Json => Ok(MediaKind::Json),
        MediaKind::Parquet => Err(invalid(
            path,
            "BigDL's encrypted Parquet is Parquet Modular Encryption, not a BigDL file: import \
             it with `ppml encrypt --to parquet`",
        )),
        MediaKind::Binary => Err(invalid(
            path,
            "not a BigDL CSV or JSON part (its name should end in .csv.cbc or .json.cbc)",
        )),
    }
}

/// The part at `path` as `variant`, ready to decrypt under its data key.
async fn open_part(path: &Path, variant: Variant, keys: &KeyCache<'_>) -> Result<PartReader<File>> {
    let (file, header) = read_header(path, variant)?;
    let key = keys.get(variant, &header, path).await?;
    PartReader::new(file, variant, &header, &key)
        .map_err(|e| EngineError::format(path.display(), e))
}

fn read_header(path: &Path, variant: Variant) -> Result<(File, PartHeader)> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut header = vec![0u8; variant.header_len()];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(EngineError::io(path, e)),
        }
    }
    let parsed = bigdl::parse_header(variant, &header[..filled])
        .map_err(|e| EngineError::format(path.display(), e))?;
    Ok((file, parsed))
}

/// Finds the variant of `first` when it was not given: a 2.1/2.2 header does not say which,
/// so the part is read in full under 2.2's key and, if that fails, under 2.1's.
async fn detect_variant(first: &Path, keys: &KeyCache<'_>) -> Result<Variant> {
    let mut start = [0u8; 1];
    let mut file = File::open(first).map_err(|e| EngineError::io(first, e))?;
    let n = file
        .read(&mut start)
        .map_err(|e| EngineError::io(first, e))?;
    let variant = Variant::detect(&start[..n]).ok_or_else(|| {
        invalid(
            first,
            "neither a BigDL common part nor a 2.1/2.2 part; a nativeaescbc dataset must be \
             named (--variant nativeaescbc)",
        )
    })?;
    if variant != Variant::Legacy22 {
        return Ok(variant);
    }
    for candidate in [Variant::Legacy22, Variant::Legacy21] {
        let mut reader = open_part(first, candidate, keys).await?;
        if std::io::copy(&mut reader, &mut std::io::sink()).is_ok() {
            return Ok(candidate);
        }
    }
    Err(EngineError::format(
        first.display(),
        FormatError::BigDlAuthentication,
    ))
}

/// Unwraps each distinct wrapped key once.
struct KeyCache<'a> {
    keys: &'a BigDlKeys,
    /// The wrapped key of the dataset (`.meta`, or given); a common part's header has its own.
    dataset_key: Option<String>,
    unwrapped: tokio::sync::Mutex<Vec<(String, Arc<DataKeyString>)>>,
}

impl KeyCache<'_> {
    async fn get(
        &self,
        variant: Variant,
        header: &PartHeader,
        path: &Path,
    ) -> Result<Arc<DataKeyString>> {
        let wrapped = match (variant, &header.wrapped_data_key, &self.dataset_key) {
            (Variant::Common, Some(in_header), _) => in_header.clone(),
            (_, _, Some(dataset_key)) => dataset_key.clone(),
            _ => {
                return Err(invalid(
                    path,
                    format!(
                        "a BigDL {variant} part does not carry its data key, and there is no \
                         {} file: give the wrapped data key (BigDL's dataKeyPath file) with \
                         --data-key-path",
                        bigdl::META_FILE
                    ),
                ));
            }
        };
        let mut unwrapped = self.unwrapped.lock().await;
        if let Some((_, key)) = unwrapped.iter().find(|(w, _)| *w == wrapped) {
            return Ok(key.clone());
        }
        let key = Arc::new(self.keys.unwrap(&wrapped).await?);
        unwrapped.push((wrapped, key.clone()));
        Ok(key)
    }
}

/// The dataset's wrapped data key: given, or from its `.meta` (none for 2.1/2.2).
fn dataset_key(meta_dir: &Path, options: &ImportOptions) -> Result<Option<String>> {
    if let Some(given) = &options.wrapped_data_key {
        return Ok(Some(given.trim().to_string()));
    }
    let meta_path = meta_dir.join(bigdl::META_FILE);
    match fs::read(&meta_path) {
        Ok(bytes) => bigdl::parse_meta(&bytes)
            .map(Some)
            .map_err(|e| EngineError::format(meta_path.display(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(&meta_path, e)),
    }
}

/// The variant to read `input` as (given or detected from its first part); an
/// unauthenticated one only with [`ImportOptions::allow_unauthenticated`], and loudly.
async fn checked_variant(
    input: &Path,
    first: &Path,
    cache: &KeyCache<'_>,
    options: &ImportOptions,
) -> Result<Variant> {
    let variant = match options.variant {
        Some(variant) => variant,
        None => detect_variant(first, cache).await?,
    };
    if !variant.is_authenticated() {
        if !options.allow_unauthenticated {
            return Err(EngineError::format(
                input.display(),
                FormatError::Unverifiable(format!(
                    "BigDL {variant} parts carry no MAC, so tampering with them cannot be \
                     detected; read them anyway with --allow-unauthenticated"
                )),
            ));
        }
        tracing::warn!(
            input = %input.display(),
            "reading BigDL {variant} parts, which carry no MAC: their integrity is NOT verified"
        );
    }
    Ok(variant)
}

/// Imports the BigDL dataset `input` (a directory of part files with its `.meta`, or one part
/// file) into a new ppml dataset at `destination`, under a fresh data key that `kms` generates
/// under `primary`. Every part's HMAC trailer is verified; a part that fails, or an
/// unauthenticated `nativeaescbc` dataset without [`ImportOptions::allow_unauthenticated`],
/// fails the import and leaves nothing at the destination.
pub async fn import_bigdl(
    keys: &BigDlKeys,
    input: &Path,
    kms: &dyn KeyManagementService,
    primary: &PrimaryKeyId,
    destination: impl Into<DatasetLocation>,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImportSummary> {
    let (files, meta_dir) = part_files(input)?;
    let kind = part_kind(&files[0], options.has_header)?;
    for file in &files[1..] {
        if part_kind(file, options.has_header)? != kind {
            return Err(invalid(
                file,
                format!(
                    "all parts of a dataset must be of one kind ({})",
                    kind.extension()
                ),
            ));
        }
    }
    let cache = KeyCache {
        keys,
        dataset_key: dataset_key(&meta_dir, options)?,
        unwrapped: Default::default(),
    };
    let variant = checked_variant(input, &files[0], &cache, options).await?;

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
    let mut entries: Vec<PartEntry> = Vec::new();
    for (index, path) in files.iter().enumerate() {
        match import_part(path, variant, &cache, kind, index, &writer, progress).await {
            Ok(entry) => entries.push(entry),
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        }
    }
    let summary = ImportSummary {
        variant,
        parts: entries.len(),
        plaintext_bytes: entries.iter().map(|e| e.plaintext_len).sum(),
    };
    writer.commit(entries).await?;
    Ok(summary)
}

async fn import_part(
    path: &Path,
    variant: Variant,
    cache: &KeyCache<'_>,
    kind: MediaKind,
    index: usize,
    writer: &DatasetWriter,
    progress: &dyn Progress,
) -> Result<PartEntry> {
    let reader = open_part(path, variant, cache).await?;
    progress.advance(variant.header_len() as u64);
    let mut part = writer.part(&part_name(index, kind.extension())).await?;
    copy_with_progress(reader, path, &mut part, progress)
        .await
        .map_err(|e| match e {
            // The reader's errors come back as I/O errors of the input; the format error
            // inside says what is wrong with the BigDL part.
            EngineError::Io { path, source } => {
                EngineError::format(path.display(), FormatError::from_io(source))
            }
            other => other,
        })?;
    part.finish().await
}

/// Decrypts the BigDL dataset `input` into a new directory `out_dir` of plaintext files, one
/// per part (named as the part without `.cbc`), as BigDL's `Decrypt` does. The directory
/// appears only once every part's HMAC trailer verified; on failure nothing is left.
/// `options.variant`, `options.wrapped_data_key`, `options.allow_unauthenticated`,
/// `options.overwrite` and `options.durability` apply as for [`import_bigdl`]. Returns the
/// variant and the plaintext bytes written.
pub async fn decrypt_bigdl(
    keys: &BigDlKeys,
    input: &Path,
    out_dir: &Path,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImportSummary> {
    let (files, meta_dir) = part_files(input)?;
    let cache = KeyCache {
        keys,
        dataset_key: dataset_key(&meta_dir, options)?,
        unwrapped: Default::default(),
    };
    let variant = checked_variant(input, &files[0], &cache, options).await?;
    let mut atomic = AtomicDir::create(out_dir, options.overwrite, options.durability)?;
    progress.start(total_size(&files));
    let written = decrypt_parts(&files, variant, &cache, &mut atomic, options, progress).await?;
    atomic.commit()?;
    Ok(ImportSummary {
        variant,
        parts: files.len(),
        plaintext_bytes: written,
    })
}

async fn decrypt_parts(
    files: &[PathBuf],
    variant: Variant,
    cache: &KeyCache<'_>,
    atomic: &mut AtomicDir,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    use std::io::Write as _;
    let mut written = 0u64;
    for path in files {
        let mut reader = open_part(path, variant, cache).await?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let name = name.strip_suffix(".cbc").unwrap_or(&name);
        let out_path = atomic.destination().join(name);
        let mut out = atomic.create_file(name)?;
        let mut buf = vec![0u8; 1 << 18];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(EngineError::format(path.display(), FormatError::from_io(e)));
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| EngineError::io(&out_path, e))?;
            written += n as u64;
            progress.advance(n as u64);
        }
        options
            .durability
            .sync(&out)
            .map_err(|e| EngineError::io(&out_path, e))?;
    }
    Ok(written)
}
