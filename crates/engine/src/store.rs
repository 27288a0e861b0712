//! An object store that serves the plaintext of verified ppml part files.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use ppml_format::{FileCipher, SegmentLayout};
use ppml_kms::KeyManagementService;

use crate::EngineError;
use crate::dataset::{PartBody, VerifiedDataset};
use crate::pme::PmePart;

const STORE_NAME: &str = "ppml";
/// Segments fetched and decrypted per request to the inner store (1 MiB at the default size).
const SEGMENTS_PER_FETCH: u64 = 16;
/// Size of the plaintext pieces handed to the reader.
const YIELD_CHUNK: usize = 16 * 1024;

/// URL of the decrypting store over the local (or a shared) file system, as registered with
/// DataFusion. Table URLs are `ppml://fs/<pin>/<absolute dataset path>/`.
pub const LOCAL_STORE_URL: &str = "ppml://fs";

/// Identifies one exact version of a dataset: its id and the SHA-256 of its manifest. Written as
/// the first path segment `v1.<dataset id hex>.<manifest SHA-256 hex>` of every location in a
/// [`DecryptingStore`], so a plan names the dataset the planner verified, and a process that
/// opens it later (an executor) refuses a dataset that was replaced in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DatasetPin {
    /// The manifest's dataset id.
    pub dataset_id: [u8; 16],
    /// SHA-256 of the manifest file.
    pub manifest_sha256: [u8; 32],
}

impl DatasetPin {
    /// The pin of a verified dataset.
    pub fn of(dataset: &VerifiedDataset) -> Self {
        DatasetPin {
            dataset_id: *dataset.manifest.dataset_id(),
            manifest_sha256: dataset.manifest_sha256,
        }
    }

    /// The path segment naming this pin.
    pub fn segment(&self) -> String {
        format!(
            "v1.{}.{}",
            crate::hex_lower(&self.dataset_id),
            crate::hex_lower(&self.manifest_sha256)
        )
    }

    /// Parses a path segment written by [`DatasetPin::segment`].
    pub fn parse(segment: &str) -> Option<Self> {
        let rest = segment.strip_prefix("v1.")?;
        let (id, digest) = rest.split_once('.')?;
        let mut pin = DatasetPin {
            dataset_id: [0; 16],
            manifest_sha256: [0; 32],
        };
        decode_hex(id, &mut pin.dataset_id)?;
        decode_hex(digest, &mut pin.manifest_sha256)?;
        Some(pin)
    }
}

fn decode_hex(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

#[derive(Clone)]
struct RegisteredPart {
    /// Where the ciphertext is in the inner store.
    location: Path,
    body: PartBody,
    /// The size readers see ([`crate::dataset::VerifiedPart::readable_len`]).
    len: u64,
    display: String,
}

/// A read-only [`ObjectStore`] over an inner store of encrypted files.
///
/// Only parts of datasets registered with [`DecryptingStore::register`] are visible, under
/// pinned locations `<pin>/<location in the inner store>` (see [`DatasetPin`]); each is listed
/// with its plaintext size and read as plaintext. A store made [`DecryptingStore::with_opener`]
/// also opens a pinned dataset on first access (as an executor does for the datasets named in
/// a plan it received), refusing it if it is not the pinned version. A byte range is served by fetching
/// just the segments that cover it, authenticating each before any of its bytes are returned.
/// Writes are refused: outputs are written through [`crate::dataset::DatasetWriter`].
pub struct DecryptingStore {
    inner: Arc<dyn ObjectStore>,
    /// Set when `inner` is the local file system: ciphertext is then read directly (see
    /// [`read_local_range`]).
    local: Option<Arc<LocalFileSystem>>,
    parts: RwLock<BTreeMap<Path, RegisteredPart>>,
    registered_at: DateTime<Utc>,
    /// Releases data keys for datasets opened on first access.
    opener: Option<Arc<dyn KeyManagementService>>,
    /// Serialises first-access opening, so concurrent readers open a dataset once.
    opening: tokio::sync::Mutex<()>,
    /// Prepended to the inner location of a dataset opened on first access, in messages:
    /// empty for the file system (whose locations are absolute paths), `s3://bucket` for S3.
    display_base: String,
}

impl fmt::Debug for DecryptingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The inner store's Display (`AmazonS3(bucket)`), not its Debug, which would include
        // client configuration such as access key ids.
        f.debug_struct("DecryptingStore")
            .field("inner", &format_args!("{}", self.inner))
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DecryptingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DecryptingStore({})", self.inner)
    }
}

/// The ppml error inside an error of a [`DecryptingStore`] (a part that fails to authenticate,
/// a dataset that changed), so that messages and exit codes are those of the dataset code;
/// other store errors are wrapped as they are.
pub fn engine_error(error: object_store::Error) -> EngineError {
    match error {
        object_store::Error::Generic { store, source } if store == STORE_NAME => {
            match source.downcast::<EngineError>() {
                Ok(engine) => *engine,
                Err(source) => {
                    EngineError::ObjectStore(object_store::Error::Generic { store, source })
                }
            }
        }
        other => EngineError::ObjectStore(other),
    }
}

fn generic(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE_NAME,
        source: source.into(),
    }
}

impl DecryptingStore {
    /// A store decrypting files held in `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        DecryptingStore {
            inner,
            local: None,
            parts: RwLock::new(BTreeMap::new()),
            registered_at: Utc::now(),
            opener: None,
            opening: tokio::sync::Mutex::new(()),
            display_base: String::new(),
        }
    }

    /// Names datasets opened on first access `<base>/<location>` in messages (for example
    /// `s3://bucket`).
    pub fn with_display_base(mut self, base: impl Into<String>) -> Self {
        self.display_base = base.into();
        self
    }

    /// A store decrypting files of the local file system.
    pub fn local(inner: Arc<LocalFileSystem>) -> Self {
        DecryptingStore {
            local: Some(Arc::clone(&inner)),
            ..Self::new(inner)
        }
    }

    /// The store holding the ciphertext.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Lets this store open pinned datasets on first access, with data keys released by `kms`.
    pub fn with_opener(mut self, kms: Arc<dyn KeyManagementService>) -> Self {
        self.opener = Some(kms);
        self
    }

    /// Makes the parts of a verified dataset readable through this store, and returns the
    /// pinned location of the dataset's root (table URLs are this store's URL plus it).
    pub fn register(&self, dataset: &VerifiedDataset) -> Path {
        let pinned_root = Path::from(DatasetPin::of(dataset).segment());
        let pinned_root = dataset
            .root
            .parts()
            .fold(pinned_root, |path, part| path.join(part));
        let mut parts = self.parts.write().expect("parts lock");
        for part in &dataset.parts {
            parts.insert(
                pinned_root.clone().join(part.entry.name.as_str()),
                RegisteredPart {
                    location: part.location.clone(),
                    body: part.body.clone(),
                    len: part.readable_len(),
                    display: format!("{}/{}", dataset.display, part.entry.name),
                },
            );
        }
        pinned_root
    }

    /// The registered part at `location`, opening its pinned dataset first if this store has
    /// an opener and the dataset was not registered yet.
    async fn part_or_open(&self, location: &Path) -> object_store::Result<RegisteredPart> {
        if let Ok(part) = self.part(location) {
            return Ok(part);
        }
        let (Some(kms), Some(pin)) = (
            self.opener.as_ref(),
            location
                .parts()
                .next()
                .and_then(|first| DatasetPin::parse(first.as_ref())),
        ) else {
            return self.part(location);
        };
        let segments: Vec<_> = location.parts().skip(1).collect();
        let Some((_, root)) = segments.split_last() else {
            return self.part(location);
        };
        let root: Path = root.iter().cloned().collect();
        let _opening = self.opening.lock().await;
        if let Ok(part) = self.part(location) {
            return Ok(part);
        }
        let display = format!("{}/{root}", self.display_base);
        let dataset =
            crate::dataset::open_dataset(self.inner.as_ref(), &root, &display, kms.as_ref())
                .await
                .map_err(generic)?;
        if DatasetPin::of(&dataset) != pin {
            return Err(generic(EngineError::DatasetChanged(display)));
        }
        self.register(&dataset);
        self.part(location)
    }

    fn part(&self, location: &Path) -> object_store::Result<RegisteredPart> {
        self.parts
            .read()
            .expect("parts lock")
            .get(location)
            .cloned()
            .ok_or_else(|| object_store::Error::NotFound {
                path: location.to_string(),
                source: "not a part of a verified ppml dataset".into(),
            })
    }

    /// The PME part at `location` (opening its dataset first if this store has an opener),
    /// for the Parquet reader's decryption ([`crate::pme::PmeFactory`]); `None` for a part
    /// this store decrypts itself.
    pub async fn pme_part(&self, location: &Path) -> object_store::Result<Option<PmePart>> {
        match self.part_or_open(location).await?.body {
            PartBody::Pme(part) => Ok(Some(part)),
            PartBody::Sealed { .. } => Ok(None),
        }
    }

    fn meta(&self, location: &Path, part: &RegisteredPart) -> ObjectMeta {
        ObjectMeta {
            location: location.clone(),
            last_modified: self.registered_at,
            size: part.len,
            e_tag: None,
            version: None,
        }
    }

    /// Streams `range` of a PME part as stored (its reader authenticates and decrypts it).
    fn stored_range(
        &self,
        part: RegisteredPart,
        range: Range<u64>,
    ) -> BoxStream<'static, object_store::Result<Bytes>> {
        let inner = self.inner.clone();
        let local = self.local.clone();
        stream::once(async move {
            let fetched = match local {
                Some(local) => {
                    let path = local.path_to_filesystem(&part.location)?;
                    let range = range.clone();
                    tokio::task::spawn_blocking(move || read_local_range(&path, range))
                        .await
                        .map_err(generic)?
                        .map_err(generic)?
                }
                None => inner.get_range(&part.location, range.clone()).await?,
            };
            if fetched.len() as u64 != range.end - range.start {
                return Err(generic(EngineError::format(
                    &part.display,
                    ppml_format::FormatError::BadLength(
                        "the file changed after it was verified".into(),
                    ),
                )));
            }
            Ok(fetched)
        })
        .boxed()
    }

    /// Streams the plaintext of `range` of a registered part, decrypting as it goes.
    fn decrypt_range(
        &self,
        part: RegisteredPart,
        cipher: Arc<FileCipher>,
        layout: SegmentLayout,
        range: Range<u64>,
    ) -> BoxStream<'static, object_store::Result<Bytes>> {
        let segments = layout.segments_covering(range.clone());
        let inner = self.inner.clone();
        let local = self.local.clone();
        let starts = (segments.start..segments.end).step_by(SEGMENTS_PER_FETCH as usize);
        stream::iter(starts)
            .map(move |first| {
                let inner = inner.clone();
                let local = local.clone();
                let part = part.clone();
                let cipher = cipher.clone();
                let location = part.location.clone();
                let range = range.clone();
                async move {
                    let batch = first..(first + SEGMENTS_PER_FETCH).min(segments.end);
                    let ciphertext_range = layout.ciphertext_range_of(batch.clone());
                    let fetched = match local {
                        Some(local) => {
                            let path = local.path_to_filesystem(&location)?;
                            let range = ciphertext_range.clone();
                            tokio::task::spawn_blocking(move || read_local_range(&path, range))
                                .await
                                .map_err(generic)?
                                .map_err(generic)?
                        }
                        None => inner.get_range(&location, ciphertext_range.clone()).await?,
                    };
                    if fetched.len() as u64 != ciphertext_range.end - ciphertext_range.start {
                        return Err(generic(EngineError::format(
                            &part.display,
                            ppml_format::FormatError::BadLength(
                                "the file changed after it was verified".into(),
                            ),
                        )));
                    }
                    let pieces =
                        decrypt_batch(&part.display, &cipher, &layout, batch, fetched, &range)?;
                    Ok(stream::iter(pieces))
                }
            })
            // One fetch in flight while the reader parses the previous one.
            .buffered(2)
            .try_flatten()
            .boxed()
    }
}

/// Reads `range` of a local file into a fresh buffer. Hand-rolled because object_store's
/// `LocalFileSystem` zero-fills every buffer before reading into it, which is 2.2 % of the
/// instructions of the encrypted SimpleQuery (BENCHMARKS.md, issue 6 profile); `read_to_end`
/// into reserved capacity reads without that.
fn read_local_range(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Bytes> {
    use std::io::{Read as _, Seek as _};
    let len = range.end - range.start;
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(range.start))?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

/// Authenticates and decrypts, in place, consecutive segments `batch` held in `ciphertext`,
/// and returns the plaintext that falls inside `wanted` as pieces of at most [`YIELD_CHUNK`]
/// bytes (slices of the one buffer: no copy). Small pieces matter: DataFusion's CSV
/// deserializer takes in one chunk per record batch it emits, so large chunks would pile up in
/// its queue.
fn decrypt_batch(
    display: &str,
    cipher: &FileCipher,
    layout: &SegmentLayout,
    batch: Range<u64>,
    ciphertext: Bytes,
    wanted: &Range<u64>,
) -> object_store::Result<Vec<object_store::Result<Bytes>>> {
    let mut buf = match ciphertext.try_into_mut() {
        Ok(owned) => owned,
        Err(shared) => BytesMut::from(&shared[..]),
    };
    let base = layout.ciphertext_range(batch.start).start;
    let mut plaintexts = Vec::with_capacity((batch.end - batch.start) as usize);
    for index in batch {
        let range = layout.ciphertext_range(index);
        let (start, end) = ((range.start - base) as usize, (range.end - base) as usize);
        let len = cipher
            .open(index, layout.is_last(index), &mut buf[start..end])
            .map_err(|e| generic(EngineError::format(display, e)))?
            .len();
        // Plaintext offsets of this segment, clipped to the wanted range.
        let offset = layout.plaintext_offset(index);
        let from = wanted.start.max(offset);
        let to = wanted.end.min(offset + len as u64);
        if from < to {
            plaintexts.push(start + (from - offset) as usize..start + (to - offset) as usize);
        }
    }
    let buf = buf.freeze();
    let mut pieces = Vec::new();
    for range in plaintexts {
        for at in range.clone().step_by(YIELD_CHUNK) {
            pieces.push(Ok(buf.slice(at..(at + YIELD_CHUNK).min(range.end))));
        }
    }
    Ok(pieces)
}

fn read_only() -> object_store::Error {
    object_store::Error::NotSupported {
        source: "the ppml decrypting store is read-only; outputs are written as new datasets"
            .into(),
    }
}

#[async_trait]
impl ObjectStore for DecryptingStore {
    async fn put_opts(
        &self,
        _location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(read_only())
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(read_only())
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let part = self.part_or_open(location).await?;
        let meta = self.meta(location, &part);
        let len = part.len;
        let range = match &options.range {
            Some(range) => range.as_range(len).map_err(generic)?,
            None => 0..len,
        };
        let payload = if options.head || range.is_empty() {
            stream::empty().boxed()
        } else {
            match part.body.clone() {
                PartBody::Sealed { cipher, layout } => {
                    self.decrypt_range(part, cipher, layout, range.clone())
                }
                PartBody::Pme(_) => self.stored_range(part, range.clone()),
            }
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(payload),
            meta,
            range,
            attributes: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations.map(|_| Err(read_only())).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let parts = self.parts.read().expect("parts lock");
        let metas: Vec<_> = parts
            .iter()
            .filter(|(path, _)| prefix.is_none_or(|p| path.prefix_matches(p)))
            .map(|(path, part)| Ok(self.meta(path, part)))
            .collect();
        stream::iter(metas).boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let parts = self.parts.read().expect("parts lock");
        let root = prefix.cloned().unwrap_or_default();
        let mut objects = Vec::new();
        let mut common_prefixes = std::collections::BTreeSet::new();
        for (path, part) in parts.iter() {
            let Some(mut rest) = path.prefix_match(&root) else {
                continue;
            };
            let Some(first) = rest.next() else { continue };
            if rest.next().is_some() {
                common_prefixes.insert(root.clone().join(first));
            } else {
                objects.push(self.meta(path, part));
            }
        }
        Ok(ListResult {
            common_prefixes: common_prefixes.into_iter().collect(),
            objects,
        })
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(read_only())
    }
}
