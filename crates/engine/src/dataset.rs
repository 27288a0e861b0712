//! Encrypted datasets on storage: verified opening and atomic writing.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path as StorePath};
use ppml_format::manifest::{MANIFEST_FILE_NAME, Manifest, PartEntry, UnverifiedManifest};
use ppml_format::{
    DataKey, EncryptingWriter, FileCipher, FormatError, Header, KeyReference, SegmentLayout,
    UnverifiedHeader,
};
use ppml_kms::{KeyManagementService, PrimaryKeyId};

use crate::{EngineError, Result, dataset_aad};

static DURABLE_WRITES: AtomicBool = AtomicBool::new(true);

/// Whether outputs are fsynced before they are renamed into place (default true). Turning it
/// off trades crash durability for speed; integrity is unaffected, since a dataset cut short by
/// a crash fails verification loudly.
pub fn set_durable_writes(durable: bool) {
    DURABLE_WRITES.store(durable, Ordering::Relaxed);
}

/// Syncs `file` (a file or a directory) to disk when durable writes are on.
pub fn sync(file: &File) -> std::io::Result<()> {
    if DURABLE_WRITES.load(Ordering::Relaxed) {
        file.sync_all()
    } else {
        Ok(())
    }
}

/// Media type of CSV datasets whose parts each start with a header line.
pub const CSV_WITH_HEADER: &str = "text/csv; header=present";
/// File-name suffix of encrypted part files.
pub const PART_SUFFIX: &str = ".ppml";
const HEADER_PROBE_LEN: u64 = 4096;

/// One verified part: its location, keys and segment layout.
#[derive(Clone)]
pub struct VerifiedPart {
    /// Location in the object store.
    pub location: StorePath,
    /// The manifest entry.
    pub entry: PartEntry,
    /// The part's keys (its header was verified with the data key).
    pub cipher: Arc<FileCipher>,
    /// Where its segments are.
    pub layout: SegmentLayout,
}

/// A dataset whose manifest, file list and part headers were all verified.
pub struct VerifiedDataset {
    /// How the dataset is named to the user (for messages).
    pub display: String,
    /// Where the dataset lives in its object store.
    pub root: StorePath,
    /// The verified manifest.
    pub manifest: Manifest,
    /// The parts, in manifest order.
    pub parts: Vec<VerifiedPart>,
    /// SHA-256 of the manifest file's bytes: with the dataset id, pins this exact version.
    pub manifest_sha256: [u8; 32],
}

impl std::fmt::Debug for VerifiedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedDataset")
            .field("display", &self.display)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl VerifiedDataset {
    /// True when the parts are CSV with a header line each.
    pub fn csv_has_header(&self) -> bool {
        self.manifest.media_type().contains("header=present")
    }
}

/// Opens the dataset under `root` in `store`: reads and authenticates the manifest with the
/// data key released by `kms`, checks that the directory holds exactly the listed parts with
/// the recorded sizes, and verifies every part's header. No plaintext is read yet.
pub async fn open_dataset(
    store: &dyn ObjectStore,
    root: &StorePath,
    display: &str,
    kms: &dyn KeyManagementService,
) -> Result<VerifiedDataset> {
    let manifest_path = root.clone().join(MANIFEST_FILE_NAME);
    let manifest_bytes = match store.get(&manifest_path).await {
        Ok(result) => result.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(EngineError::NotADataset(display.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    let manifest_display = format!("{display}/{MANIFEST_FILE_NAME}");
    let unverified = UnverifiedManifest::from_json(&manifest_bytes)
        .map_err(|e| EngineError::format(&manifest_display, e))?;
    let data_key = kms
        .unwrap_data_key(unverified.key(), &dataset_aad(unverified.dataset_id()))
        .await
        .map_err(|source| EngineError::Kms {
            dataset: display.to_string(),
            source,
        })?;
    let manifest = unverified
        .verify(&data_key)
        .map_err(|e| EngineError::format(&manifest_display, e))?;

    let listed: BTreeMap<String, u64> = store
        .list(Some(root))
        .map_ok(|meta| {
            let name = meta
                .location
                .prefix_match(root)
                .map(|parts| {
                    parts
                        .map(|p| p.as_ref().to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            (name, meta.size)
        })
        .try_collect()
        .await?;
    let expected: HashSet<&str> = manifest.parts().iter().map(|p| p.name.as_str()).collect();
    if let Some(extra) = listed
        .keys()
        .find(|name| name.as_str() != MANIFEST_FILE_NAME && !expected.contains(name.as_str()))
    {
        return Err(EngineError::UnexpectedFile {
            dataset: display.to_string(),
            name: extra.clone(),
        });
    }

    let mut parts = Vec::with_capacity(manifest.parts().len());
    for entry in manifest.parts() {
        let path_display = format!("{display}/{}", entry.name);
        let Some(&size) = listed.get(&entry.name) else {
            return Err(EngineError::MissingPart {
                dataset: display.to_string(),
                name: entry.name.clone(),
            });
        };
        if size != entry.ciphertext_len {
            return Err(EngineError::PartMismatch {
                path: path_display,
                what: "size",
            });
        }
        let location = root.clone().join(entry.name.as_str());
        let header = read_header(store, &location, size)
            .await
            .map_err(|e| match e {
                EngineError::Format { source, .. } => EngineError::format(&path_display, source),
                other => other,
            })?;
        if header.sha256() != entry.header_sha256 {
            return Err(EngineError::PartMismatch {
                path: path_display,
                what: "header",
            });
        }
        let header_len = header.len() as u64;
        let (header, cipher) = header
            .verify(&data_key)
            .map_err(|e| EngineError::format(&path_display, e))?;
        if header.dataset_id() != manifest.dataset_id() || header.key() != manifest.key() {
            return Err(EngineError::PartMismatch {
                path: path_display,
                what: "dataset id or key reference",
            });
        }
        let layout = SegmentLayout::new(header_len, header.segment_size(), size)
            .map_err(|e| EngineError::format(&path_display, e))?;
        if layout.plaintext_len() != entry.plaintext_len {
            return Err(EngineError::PartMismatch {
                path: path_display,
                what: "plaintext length",
            });
        }
        parts.push(VerifiedPart {
            location,
            entry: entry.clone(),
            cipher: Arc::new(cipher),
            layout,
        });
    }
    let manifest_sha256 = ring::digest::digest(&ring::digest::SHA256, &manifest_bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes");
    Ok(VerifiedDataset {
        display: display.to_string(),
        root: root.clone(),
        manifest,
        parts,
        manifest_sha256,
    })
}

async fn read_header(
    store: &dyn ObjectStore,
    location: &StorePath,
    size: u64,
) -> Result<UnverifiedHeader> {
    let probe = store
        .get_range(location, 0..HEADER_PROBE_LEN.min(size))
        .await?;
    let bad = |e: FormatError| EngineError::Format {
        path: location.to_string(),
        source: e,
    };
    let len = UnverifiedHeader::declared_len(&probe).map_err(bad)? as u64;
    if len > size {
        return Err(bad(FormatError::MalformedHeader(
            "file ends inside the header",
        )));
    }
    if len <= probe.len() as u64 {
        return UnverifiedHeader::parse(&probe).map_err(bad);
    }
    let full = store.get_range(location, 0..len).await?;
    UnverifiedHeader::parse(&full).map_err(bad)
}

/// Writes a new dataset into a hidden temporary sibling of its destination and moves it into
/// place only on [`DatasetWriter::commit`]. Dropped without commit, it deletes what it wrote.
pub struct DatasetWriter {
    destination: PathBuf,
    temp_dir: Option<PathBuf>,
    overwrite: bool,
    dataset_id: [u8; 16],
    data_key: Arc<DataKey>,
    key: KeyReference,
    media_type: String,
    segment_size: u32,
}

impl std::fmt::Debug for DatasetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetWriter")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// Options of a dataset write.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Media type recorded in the manifest.
    pub media_type: String,
    /// Plaintext bytes per segment.
    pub segment_size: u32,
    /// Replace an existing destination (only once the new dataset is complete).
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            media_type: CSV_WITH_HEADER.to_string(),
            segment_size: ppml_format::DEFAULT_SEGMENT_SIZE,
            overwrite: false,
        }
    }
}

/// Name of the `index`-th part file.
pub fn part_name(index: usize, extension: &str) -> String {
    format!("part-{index:05}.{extension}{PART_SUFFIX}")
}

/// A temporary sibling path of `destination` (same directory, so a rename is atomic).
pub fn temp_sibling(destination: &Path) -> PathBuf {
    let name = destination
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let mut random = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    destination.with_file_name(format!(".{name}.ppml-tmp-{}", crate::hex_lower(&random)))
}

impl DatasetWriter {
    /// Prepares a dataset at `destination` encrypted under a fresh data key from `kms`.
    pub async fn create(
        kms: &dyn KeyManagementService,
        primary: &PrimaryKeyId,
        destination: &Path,
        options: WriteOptions,
    ) -> Result<Self> {
        if destination.exists() && !options.overwrite {
            return Err(EngineError::OutputExists(destination.to_path_buf()));
        }
        let mut dataset_id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut dataset_id)
            .map_err(|_| EngineError::format(destination.display(), FormatError::Random))?;
        let (data_key, key) = kms
            .generate_data_key(primary, &dataset_aad(&dataset_id))
            .await
            .map_err(|source| EngineError::Kms {
                dataset: destination.display().to_string(),
                source,
            })?;
        let temp_dir = temp_sibling(destination);
        fs::create_dir_all(&temp_dir).map_err(|e| EngineError::io(&temp_dir, e))?;
        Ok(DatasetWriter {
            destination: destination.to_path_buf(),
            temp_dir: Some(temp_dir),
            overwrite: options.overwrite,
            dataset_id,
            data_key: Arc::new(data_key),
            key,
            media_type: options.media_type,
            segment_size: options.segment_size,
        })
    }

    /// Opens a new part file `name` for writing. Parts may be written concurrently.
    pub fn part(&self, name: &str) -> Result<PartWriter> {
        ppml_format::manifest::validate_part_name(name)
            .map_err(|e| EngineError::format(self.destination.display(), e))?;
        let dir = self.temp_dir.as_ref().expect("not committed");
        let path = dir.join(name);
        let file = File::create_new(&path).map_err(|e| EngineError::io(&path, e))?;
        let header = Header::new(self.key.clone(), self.dataset_id, self.segment_size)
            .map_err(|e| EngineError::format(path.display(), e))?;
        let writer = EncryptingWriter::new(file, &header, &self.data_key)
            .map_err(|e| EngineError::format(path.display(), e))?;
        Ok(PartWriter {
            name: name.to_string(),
            path,
            writer,
        })
    }

    /// Writes the manifest for `parts` (in that order), syncs, and moves the dataset into
    /// place. Returns the manifest.
    pub fn commit(mut self, parts: Vec<PartEntry>) -> Result<Manifest> {
        let temp_dir = self.temp_dir.clone().expect("not committed");
        let manifest = Manifest::new(
            self.dataset_id,
            self.media_type.clone(),
            self.key.clone(),
            parts,
        )
        .map_err(|e| EngineError::format(self.destination.display(), e))?;
        let manifest_path = temp_dir.join(MANIFEST_FILE_NAME);
        let mut file =
            File::create_new(&manifest_path).map_err(|e| EngineError::io(&manifest_path, e))?;
        file.write_all(&manifest.to_json(&self.data_key))
            .and_then(|_| sync(&file))
            .map_err(|e| EngineError::io(&manifest_path, e))?;
        File::open(&temp_dir)
            .and_then(|d| sync(&d))
            .map_err(|e| EngineError::io(&temp_dir, e))?;
        replace_path(&temp_dir, &self.destination, self.overwrite)?;
        self.temp_dir = None;
        Ok(manifest)
    }
}

/// Moves `from` to `to`; with `overwrite`, an existing `to` is replaced only after `from` is
/// complete (the old content is moved aside, then removed).
pub fn replace_path(from: &Path, to: &Path, overwrite: bool) -> Result<()> {
    let mut aside = None;
    if to.exists() {
        if !overwrite {
            return Err(EngineError::OutputExists(to.to_path_buf()));
        }
        let old = temp_sibling(to);
        fs::rename(to, &old).map_err(|e| EngineError::io(to, e))?;
        aside = Some(old);
    }
    fs::rename(from, to).map_err(|e| EngineError::io(to, e))?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|d| sync(&d));
    }
    if let Some(old) = aside {
        let _ = if old.is_dir() {
            fs::remove_dir_all(&old)
        } else {
            fs::remove_file(&old)
        };
    }
    Ok(())
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if let Some(dir) = self.temp_dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Encrypts one part file. Call [`PartWriter::finish`]; a dropped writer leaves a part that
/// would be rejected (and is deleted with its uncommitted dataset).
pub struct PartWriter {
    name: String,
    path: PathBuf,
    writer: EncryptingWriter<File>,
}

impl Write for PartWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl PartWriter {
    /// Seals the final segment, syncs the file and returns its manifest entry.
    pub fn finish(self) -> Result<PartEntry> {
        let (file, finished) = self
            .writer
            .finish()
            .map_err(|e| EngineError::format(self.path.display(), e))?;
        sync(&file).map_err(|e| EngineError::io(&self.path, e))?;
        Ok(PartEntry {
            name: self.name,
            ciphertext_len: finished.ciphertext_len,
            plaintext_len: finished.plaintext_len,
            header_sha256: finished.header_sha256,
        })
    }
}
