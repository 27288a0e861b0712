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

use crate::EngineError;
use crate::dataset::VerifiedDataset;

const STORE_NAME: &str = "ppml";
/// Segments fetched and decrypted per request to the inner store (1 MiB at the default size).
const SEGMENTS_PER_FETCH: u64 = 16;
/// Size of the plaintext pieces handed to the reader.
const YIELD_CHUNK: usize = 16 * 1024;

#[derive(Clone)]
struct RegisteredPart {
    cipher: Arc<FileCipher>,
    layout: SegmentLayout,
    display: String,
}

/// A read-only [`ObjectStore`] over an inner store of encrypted files.
///
/// Only parts of datasets registered with [`DecryptingStore::register`] are visible; each is
/// listed with its plaintext size and read as plaintext. A byte range is served by fetching
/// just the segments that cover it, authenticating each before any of its bytes are returned.
/// Writes are refused: outputs are written through [`crate::dataset::DatasetWriter`].
pub struct DecryptingStore {
    inner: Arc<dyn ObjectStore>,
    /// Set when `inner` is the local file system: ciphertext is then read directly (see
    /// [`read_local_range`]).
    local: Option<Arc<LocalFileSystem>>,
    parts: RwLock<BTreeMap<Path, RegisteredPart>>,
    registered_at: DateTime<Utc>,
}

impl fmt::Debug for DecryptingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptingStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DecryptingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DecryptingStore({})", self.inner)
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
        }
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

    /// Makes the parts of a verified dataset readable through this store.
    pub fn register(&self, dataset: &VerifiedDataset) {
        let mut parts = self.parts.write().expect("parts lock");
        for part in &dataset.parts {
            parts.insert(
                part.location.clone(),
                RegisteredPart {
                    cipher: part.cipher.clone(),
                    layout: part.layout,
                    display: format!("{}/{}", dataset.display, part.entry.name),
                },
            );
        }
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

    fn meta(&self, location: &Path, part: &RegisteredPart) -> ObjectMeta {
        ObjectMeta {
            location: location.clone(),
            last_modified: self.registered_at,
            size: part.layout.plaintext_len(),
            e_tag: None,
            version: None,
        }
    }

    /// Streams the plaintext of `range` of a registered part, decrypting as it goes.
    fn decrypt_range(
        &self,
        location: Path,
        part: RegisteredPart,
        range: Range<u64>,
    ) -> BoxStream<'static, object_store::Result<Bytes>> {
        let segments = part.layout.segments_covering(range.clone());
        let inner = self.inner.clone();
        let local = self.local.clone();
        let starts = (segments.start..segments.end).step_by(SEGMENTS_PER_FETCH as usize);
        stream::iter(starts)
            .map(move |first| {
                let inner = inner.clone();
                let local = local.clone();
                let location = location.clone();
                let part = part.clone();
                let range = range.clone();
                async move {
                    let batch = first..(first + SEGMENTS_PER_FETCH).min(segments.end);
                    let ciphertext_range = part.layout.ciphertext_range_of(batch.clone());
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
                    let pieces = decrypt_batch(&part, batch, fetched, &range)?;
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
    part: &RegisteredPart,
    batch: Range<u64>,
    ciphertext: Bytes,
    wanted: &Range<u64>,
) -> object_store::Result<Vec<object_store::Result<Bytes>>> {
    let mut buf = match ciphertext.try_into_mut() {
        Ok(owned) => owned,
        Err(shared) => BytesMut::from(&shared[..]),
    };
    let base = part.layout.ciphertext_range(batch.start).start;
    let mut plaintexts = Vec::with_capacity((batch.end - batch.start) as usize);
    for index in batch {
        let range = part.layout.ciphertext_range(index);
        let (start, end) = ((range.start - base) as usize, (range.end - base) as usize);
        let len = part
            .cipher
            .open(index, part.layout.is_last(index), &mut buf[start..end])
            .map_err(|e| generic(EngineError::format(&part.display, e)))?
            .len();
        // Plaintext offsets of this segment, clipped to the wanted range.
        let offset = part.layout.plaintext_offset(index);
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
        let part = self.part(location)?;
        let meta = self.meta(location, &part);
        let len = part.layout.plaintext_len();
        let range = match &options.range {
            Some(range) => range.as_range(len).map_err(generic)?,
            None => 0..len,
        };
        let payload = if options.head || range.is_empty() {
            stream::empty().boxed()
        } else {
            self.decrypt_range(location.clone(), part, range.clone())
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
