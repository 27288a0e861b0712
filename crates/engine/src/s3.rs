//! Datasets in S3-compatible object stores (docs/storage.md).
//!
//! Clients are configured by the standard AWS environment variables, read by
//! [`AmazonS3Builder::from_env`]: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) for a store other
//! than AWS, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint, and the others `object_store`
//! documents. Credentials are never logged.
//!
//! Query engines read S3 datasets through a [`DecryptingStore`] per bucket, registered with
//! DataFusion as `ppml://s3-<bucket>`; [`S3Stores`] creates them on first use, so executors
//! need no list of buckets in advance ([`S3Stores::install`]).

use crate::pme::PmeFactory;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::runtime_env::RuntimeEnv;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use ppml_kms::KeyManagementService;
use url::Url;

use crate::location::S3_SCHEME;
use crate::{DecryptingStore, EngineError, Result};

/// Scheme and host prefix of the decrypting stores over S3 buckets: `ppml://s3-<bucket>`.
pub const S3_STORE_URL_PREFIX: &str = "ppml://s3-";

/// The S3 client for `bucket`, configured from the `AWS_*` environment variables.
pub fn s3_object_store(bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    #[cfg(test)]
    let builder = test_support::configure(builder, bucket);
    // Only where, never who: no credentials in the log.
    tracing::debug!(
        bucket,
        endpoint = ?builder.get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint),
        region = ?builder.get_config_value(&object_store::aws::AmazonS3ConfigKey::Region),
        "S3 client"
    );
    let store = builder.build().map_err(|source| EngineError::S3Config {
        bucket: bucket.to_string(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// The URL under which DataFusion finds the decrypting store of `bucket`.
pub fn store_url(bucket: &str) -> Url {
    Url::parse(&format!("{S3_STORE_URL_PREFIX}{bucket}")).expect("bucket names are valid hosts")
}

/// Turns a store created by [`S3Stores`] into the one registered with DataFusion (the cluster
/// counts the bytes it returns).
pub type StoreDecorator = Arc<dyn Fn(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync>;

/// A bucket's decrypting store, and the store registered with DataFusion (decorated).
type StoreEntry = (Arc<DecryptingStore>, Arc<dyn ObjectStore>);

/// The decrypting stores of the S3 buckets a process reads, one per bucket, created on first
/// use and shared by every runtime they are installed in (so each dataset is opened and
/// verified once per process).
#[derive(Default)]
pub struct S3Stores {
    opener: Option<Arc<dyn KeyManagementService>>,
    decorator: Option<StoreDecorator>,
    stores: Mutex<HashMap<String, StoreEntry>>,
    /// Decrypts the PME parts of these stores (and of any other store added to it).
    pme: Arc<PmeFactory>,
}

impl std::fmt::Debug for S3Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let buckets: Vec<_> = self
            .stores
            .lock()
            .expect("stores lock")
            .keys()
            .cloned()
            .collect();
        f.debug_struct("S3Stores")
            .field("buckets", &buckets)
            .finish_non_exhaustive()
    }
}

impl S3Stores {
    /// Stores that serve only datasets registered with them (a planning session's).
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores that also open pinned datasets on first access, with data keys released by
    /// `kms` (an executor's; see [`DecryptingStore::with_opener`]).
    pub fn with_opener(kms: Arc<dyn KeyManagementService>) -> Self {
        S3Stores {
            opener: Some(kms),
            ..Self::default()
        }
    }

    /// Registers `decorate(store)` with DataFusion instead of each decrypting store.
    pub fn with_decorator(
        mut self,
        decorate: impl Fn(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync + 'static,
    ) -> Self {
        self.decorator = Some(Arc::new(decorate));
        self
    }

    fn entry(&self, bucket: &str) -> Result<StoreEntry> {
        let mut stores = self.stores.lock().expect("stores lock");
        if let Some(entry) = stores.get(bucket) {
            return Ok(entry.clone());
        }
        let mut store = DecryptingStore::new(s3_object_store(bucket)?)
            .with_display_base(format!("{S3_SCHEME}{bucket}"));
        if let Some(kms) = &self.opener {
            store = store.with_opener(kms.clone());
        }
        let store = Arc::new(store);
        self.pme.add_store(store_url(bucket).as_str(), &store);
        let registered = match &self.decorator {
            Some(decorate) => decorate(store.clone()),
            None => store.clone() as Arc<dyn ObjectStore>,
        };
        stores.insert(bucket.to_string(), (store.clone(), registered.clone()));
        Ok((store, registered))
    }

    /// The factory that decrypts the PME parts of these stores' datasets; add a process's
    /// other decrypting stores to it and register it with DataFusion's runtime under
    /// [`crate::pme::FACTORY_ID`].
    pub fn pme_factory(&self) -> Arc<PmeFactory> {
        self.pme.clone()
    }

    /// The decrypting store of `bucket`.
    pub fn decrypting(&self, bucket: &str) -> Result<Arc<DecryptingStore>> {
        Ok(self.entry(bucket)?.0)
    }

    /// An object store registry that resolves `ppml://s3-<bucket>` URLs to these stores and
    /// everything else through `inner`.
    pub fn registry(
        self: &Arc<Self>,
        inner: Arc<dyn ObjectStoreRegistry>,
    ) -> Arc<dyn ObjectStoreRegistry> {
        Arc::new(PpmlStoreRegistry {
            inner,
            s3: self.clone(),
        })
    }

    /// Makes `runtime` resolve `ppml://s3-<bucket>` URLs to these stores (keeping the stores
    /// already registered with it).
    pub fn install(self: &Arc<Self>, runtime: &mut RuntimeEnv) {
        runtime.object_store_registry = self.registry(runtime.object_store_registry.clone());
    }
}

/// DataFusion's registry, plus the decrypting stores of S3 buckets on demand.
#[derive(Debug)]
struct PpmlStoreRegistry {
    inner: Arc<dyn ObjectStoreRegistry>,
    s3: Arc<S3Stores>,
}

impl ObjectStoreRegistry for PpmlStoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        let bucket = (url.scheme() == "ppml")
            .then(|| url.host_str())
            .flatten()
            .and_then(|host| host.strip_prefix("s3-"));
        let Some(bucket) = bucket else {
            return self.inner.get_store(url);
        };
        let (_, store) = self
            .s3
            .entry(bucket)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(store)
    }
}

/// Test endpoints per bucket: tests run in parallel threads of one process and cannot set
/// environment variables (`unsafe` in Rust 2024).
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

    static ENDPOINTS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

    /// Makes clients of `bucket` talk to the S3 server at `endpoint` (plain HTTP).
    pub(crate) fn use_endpoint(bucket: &str, endpoint: &str) {
        ENDPOINTS
            .lock()
            .unwrap()
            .insert(bucket.to_string(), endpoint.to_string());
    }

    pub(super) fn configure(builder: AmazonS3Builder, bucket: &str) -> AmazonS3Builder {
        let Some(endpoint) = ENDPOINTS.lock().unwrap().get(bucket).cloned() else {
            return builder;
        };
        builder
            .with_config(AmazonS3ConfigKey::Endpoint, endpoint)
            .with_config(AmazonS3ConfigKey::AccessKeyId, "testing")
            .with_config(AmazonS3ConfigKey::SecretAccessKey, "testing")
            .with_config(AmazonS3ConfigKey::Region, "us-east-1")
            .with_allow_http(true)
    }
}
