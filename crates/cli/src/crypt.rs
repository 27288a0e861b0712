//! `ppml encrypt` and `ppml decrypt`.

use std::fs::{self, File};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::ProgressBar;
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use ppml_engine::dataset::{
    DatasetWriter, PART_SUFFIX, PartWriter, VerifiedDataset, VerifiedPart, WriteOptions,
    open_dataset, part_name, replace_path, temp_sibling,
};
use ppml_engine::{DatasetLocation, DecryptingStore};
use ppml_format::DecryptingReader;
use ppml_format::manifest::PartEntry;
use ppml_kms::KeyManagementService;

use crate::cli::{DecryptArgs, EncryptArgs};
use crate::csv_split::CsvScanner;
use crate::output::AtomicFile;
use crate::progress;
use crate::settings::Settings;

const CHUNK: usize = 1 << 18;

/// What kind of files a dataset holds, from the input's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Csv,
    Json,
    Parquet,
    Binary,
}

impl Kind {
    fn of(path: &Path) -> Kind {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("csv") => Kind::Csv,
            Some("json" | "jsonl" | "ndjson") => Kind::Json,
            Some("parquet") => Kind::Parquet,
            _ => Kind::Binary,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Kind::Csv => "csv",
            Kind::Json => "json",
            Kind::Parquet => "parquet",
            Kind::Binary => "bin",
        }
    }

    fn media_type(self, has_header: bool) -> &'static str {
        match self {
            Kind::Csv if has_header => ppml_engine::dataset::CSV_WITH_HEADER,
            Kind::Csv => "text/csv; header=absent",
            Kind::Json => "application/x-ndjson",
            Kind::Parquet => "application/vnd.apache.parquet",
            Kind::Binary => "application/octet-stream",
        }
    }
}

/// Summary of an encryption.
#[derive(Debug, Default)]
pub struct EncryptSummary {
    pub parts: usize,
    pub plaintext_bytes: u64,
}

fn input_files(input: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(input).with_context(|| format!("{}", input.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(['.', '_']) {
            continue;
        }
        if entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: the directory holds no files to encrypt",
            input.display()
        );
    }
    Ok(files)
}

pub async fn encrypt(args: &EncryptArgs, settings: &mut Settings) -> Result<EncryptSummary> {
    let files = input_files(&args.input)?;
    let kind = Kind::of(&files[0]);
    if let Some(other) = files.iter().find(|f| Kind::of(f) != kind) {
        bail!(
            "{}: all files of a dataset must be of one kind ({} is not {})",
            args.input.display(),
            other.display(),
            kind.extension()
        );
    }
    if args.partitions == 0 {
        bail!("--partitions must be at least 1");
    }
    if args.partitions > 1 && (files.len() > 1 || kind != Kind::Csv) {
        bail!("--partitions splits a single CSV file; a directory is encrypted one part per file");
    }
    let kms = settings.open_kms().await?;
    let has_header = !args.no_header;
    let writer = DatasetWriter::create(
        kms.kms.as_ref(),
        kms.primary()?,
        &args.out,
        WriteOptions {
            media_type: kind.media_type(has_header).to_string(),
            segment_size: args.segment_size,
            overwrite: args.overwrite,
        },
    )
    .await?;
    let total: u64 = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = progress::bytes(total, "encrypting", settings.quiet);
    let entries = match encrypt_files(
        &files,
        kind,
        has_header,
        !args.no_row_check,
        args.partitions,
        &writer,
        &bar,
    )
    .await
    {
        Ok(entries) => entries,
        Err(e) => {
            // Nothing of a failed encryption stays behind (in S3: the parts already uploaded).
            writer.abort().await;
            return Err(e);
        }
    };
    bar.finish_and_clear();
    let summary = EncryptSummary {
        parts: entries.len(),
        plaintext_bytes: entries.iter().map(|e| e.plaintext_len).sum(),
    };
    writer.commit(entries).await?;
    Ok(summary)
}

async fn encrypt_files(
    files: &[PathBuf],
    kind: Kind,
    has_header: bool,
    check_rows: bool,
    partitions: usize,
    writer: &DatasetWriter,
    bar: &ProgressBar,
) -> Result<Vec<PartEntry>> {
    let mut entries = Vec::new();
    for file in files {
        let display = file.display().to_string();
        let input = File::open(file).with_context(|| format!("opening {display}"))?;
        let size = input.metadata()?.len();
        let first = entries.len();
        let new = if kind == Kind::Csv {
            encrypt_csv(
                input, &display, size, has_header, check_rows, partitions, first, writer, bar,
            )
            .await?
        } else {
            let mut part = writer.part(&part_name(first, kind.extension())).await?;
            part.reserve(size)?;
            copy_with_progress(input, &mut part, bar)
                .await
                .with_context(|| format!("encrypting {display}"))?;
            vec![part.finish().await?]
        };
        entries.extend(new);
    }
    Ok(entries)
}

async fn copy_with_progress(
    mut input: impl Read,
    out: &mut PartWriter,
    bar: &ProgressBar,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n])?;
        out.ready().await?;
        bar.inc(n as u64);
    }
}

/// Encrypts one CSV file, checking every row's field count (unless `check_rows` is off), into
/// `partitions` parts of about equal size split on row boundaries; every part starts with the
/// header line.
#[allow(clippy::too_many_arguments)]
async fn encrypt_csv(
    mut input: File,
    display: &str,
    size: u64,
    has_header: bool,
    check_rows: bool,
    partitions: usize,
    first_index: usize,
    writer: &DatasetWriter,
    bar: &ProgressBar,
) -> Result<Vec<PartEntry>> {
    let target = size.div_ceil(partitions as u64).max(1);
    let mut scanner = CsvScanner::new(display, has_header).check_rows(check_rows);
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
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {display}")),
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
                current.write_all(header)?;
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
            current.write_all(&chunk[from..end])?;
            bytes_in_part += (end - from) as u64;
            consumed += (end - from) as u64;
            from = end;
        }
        current.ready().await?;
        bar.inc(n as u64);
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
                DecryptingStore::new(ppml_engine::s3::s3_object_store(bucket)?)
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

/// Opens and verifies the dataset at `dir` with keys from `kms`.
pub async fn open_local_dataset(
    dir: &Path,
    kms: &dyn KeyManagementService,
) -> Result<VerifiedDataset> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!(ppml_engine::EngineError::NotADataset(
                dir.display().to_string()
            ));
        }
        bail!("{}: no such dataset directory", dir.display());
    }
    let absolute = std::path::absolute(dir)?;
    let root =
        StorePath::from_absolute_path(&absolute).with_context(|| format!("{}", dir.display()))?;
    Ok(open_dataset(
        &LocalFileSystem::new(),
        &root,
        &dir.display().to_string(),
        kms,
    )
    .await?)
}

/// Verified plaintext of one part on its way to the output, optionally without its first line
/// (the header of a part after the first when concatenating CSV).
struct PlainOut<'a, W: Write> {
    out: &'a mut W,
    skipping: bool,
    total: u64,
    bar: &'a ProgressBar,
}

impl<W: Write> PlainOut<'_, W> {
    fn push(&mut self, mut data: &[u8]) -> Result<()> {
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
        self.bar.inc(n as u64);
        Ok(())
    }
}

/// Decrypts one verified part into `out`, optionally dropping its first line.
async fn decrypt_part(
    source: &PartSource,
    part: &VerifiedPart,
    out: &mut impl Write,
    skip_first_line: bool,
    bar: &ProgressBar,
) -> Result<()> {
    let mut plain = PlainOut {
        out,
        skipping: skip_first_line,
        total: 0,
        bar,
    };
    let display = match source {
        PartSource::Dir(dir) => {
            let path = dir.join(&part.entry.name);
            let display = path.display().to_string();
            let mut file = File::open(&path).with_context(|| format!("opening {display}"))?;
            file.seek(SeekFrom::Start(part.layout.header_len()))?;
            let mut reader = DecryptingReader::from_verified(file, part.cipher.clone());
            loop {
                // Each decrypted segment is written straight from the reader's buffer.
                let buf = match reader.fill_buf() {
                    Ok([]) => break,
                    Ok(buf) => buf,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(ppml_engine::EngineError::Format {
                            path: display,
                            source: ppml_format::FormatError::from_io(e),
                        }
                        .into());
                    }
                };
                let n = buf.len();
                plain.push(buf)?;
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
                .map_err(ppml_engine::store::engine_error)?
                .into_stream();
            while let Some(chunk) = stream.next().await {
                plain.push(&chunk.map_err(ppml_engine::store::engine_error)?)?;
            }
            format!("{dataset}/{}", part.entry.name)
        }
    };
    if plain.total != part.entry.plaintext_len {
        bail!(
            "{display}: decrypted {} bytes, the manifest records {}",
            plain.total,
            part.entry.plaintext_len
        );
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

pub async fn decrypt(args: &DecryptArgs, settings: &mut Settings) -> Result<u64> {
    let kms = settings.open_kms_for_runtime().await?;
    let (dataset, source) = open_input(&args.input, kms.kms.as_ref()).await?;
    let total = dataset.manifest.plaintext_len();
    let skip_headers = dataset.csv_has_header();
    if let Some(out_dir) = &args.out_dir {
        if out_dir.exists() && !args.overwrite {
            bail!(
                "{}: output already exists (remove it or pass --overwrite)",
                out_dir.display()
            );
        }
        let bar = progress::bytes(total, "decrypting", settings.quiet);
        let temp = temp_sibling(out_dir);
        fs::create_dir_all(&temp)?;
        let result = async {
            for part in &dataset.parts {
                let name = part
                    .entry
                    .name
                    .strip_suffix(PART_SUFFIX)
                    .unwrap_or(&part.entry.name);
                let mut file = File::create_new(temp.join(name))?;
                ppml_engine::dataset::preallocate(&file, part.entry.plaintext_len)?;
                decrypt_part(&source, part, &mut file, false, &bar).await?;
                ppml_engine::dataset::sync(&file)?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = result.and_then(|_| Ok(replace_path(&temp, out_dir, args.overwrite)?)) {
            let _ = fs::remove_dir_all(&temp);
            return Err(e);
        }
        bar.finish_and_clear();
        return Ok(total);
    }
    let out = args.out.as_ref().expect("clap requires --out or --out-dir");
    if out.as_os_str() == "-" {
        let bar = progress::bytes(total, "decrypting", true);
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        for (i, part) in dataset.parts.iter().enumerate() {
            decrypt_part(&source, part, &mut lock, skip_headers && i > 0, &bar).await?;
        }
        lock.flush()?;
        return Ok(total);
    }
    if is_stream_device(out) {
        // /dev/null, a named pipe, a terminal: write straight into it, as for stdout. (A
        // temporary sibling renamed over it would replace the device node itself.)
        let bar = progress::bytes(total, "decrypting", true);
        let mut device = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(out)
                .with_context(|| format!("opening {}", out.display()))?,
        );
        for (i, part) in dataset.parts.iter().enumerate() {
            decrypt_part(&source, part, &mut device, skip_headers && i > 0, &bar).await?;
        }
        device.flush()?;
        return Ok(total);
    }
    let bar = progress::bytes(total, "decrypting", settings.quiet);
    let mut file = AtomicFile::create(out, args.overwrite)?;
    file.preallocate(total)?;
    for (i, part) in dataset.parts.iter().enumerate() {
        decrypt_part(&source, part, &mut file, skip_headers && i > 0, &bar).await?;
    }
    file.commit()?;
    bar.finish_and_clear();
    Ok(total)
}
