//! Parquet datasets encrypted with Parquet Modular Encryption (`docs/file-format.md` §12).
//!
//! Each part is a standard PME Parquet file (`AES_GCM_V1`, every column encrypted) written by
//! arrow-rs: the footer and the columns without a key of their own are encrypted with the
//! dataset's data key, the columns of a [`ColumnKey`] with that key. The key metadata in the
//! file is Parquet key-tools material ([`KeyMaterial`]) so pyarrow and parquet-mr can read the
//! parts with a KMS client of ppml's KMS; ppml itself takes the keys from the verified manifest
//! and supplies the part's AAD prefix ([`ppml_format::pme::aad_prefix`]), so a file that was
//! renamed, moved from another dataset or altered fails authentication.
//!
//! A reader that the KMS refuses a column key still reads every other column; reading a
//! refused column fails with [`EngineError::ColumnAccessDenied`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::EncryptionFactoryOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::execution::parquet_encryption::EncryptionFactory;
use datafusion::parquet::arrow::ArrowSchemaConverter;
use datafusion::parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use datafusion::parquet::encryption::encrypt::FileEncryptionProperties;
use datafusion::parquet::errors::ParquetError;
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path as StorePath;
use ppml_format::manifest::ColumnKey;
use ppml_format::pme::{KeyMaterial, aad_prefix};
use ppml_format::{DataKey, KeyReference};
use ppml_kms::{KeyManagementService, PrimaryKeyId};
use zeroize::Zeroizing;

use crate::{DecryptingStore, EngineError, Result, dataset_aad};

/// The id under which [`PmeFactory`] is registered in a session's runtime.
pub const FACTORY_ID: &str = "ppml";
/// The factory option naming the object store of a table's files.
pub const STORE_OPTION: &str = "store";

/// A key the reader may or may not have been given.
enum Released {
    Key(Zeroizing<Vec<u8>>),
    /// The KMS's refusal, as its message (no key material in it).
    Refused(String),
}

/// The keys of one verified PME dataset, shared by its parts.
pub struct PmeKeys {
    /// Key metadata (as written in the files) → the key, or the KMS's refusal.
    by_metadata: HashMap<Vec<u8>, (Released, Vec<String>)>,
}

impl std::fmt::Debug for PmeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmeKeys")
            .field("keys", &self.by_metadata.len())
            .finish()
    }
}

impl PmeKeys {
    /// Unwraps the dataset's column keys with `kms` (the footer key, the dataset's data key,
    /// is already released); a refused column key is kept as refused, not an error.
    pub async fn release(
        kms: &dyn KeyManagementService,
        dataset_id: &[u8; 16],
        key: &KeyReference,
        data_key: &DataKey,
        column_keys: &[ColumnKey],
    ) -> Result<Self> {
        let aad = dataset_aad(dataset_id);
        let mut by_metadata = HashMap::new();
        for is_footer_key in [true, false] {
            by_metadata.insert(
                KeyMaterial::new(is_footer_key, key, &aad)
                    .to_bytes()
                    .map_err(|e| EngineError::format("key material", e))?,
                (
                    Released::Key(Zeroizing::new(data_key.expose_secret().to_vec())),
                    Vec::new(),
                ),
            );
        }
        for column_key in column_keys {
            let released = match kms.unwrap_data_key(&column_key.key, &aad).await {
                Ok(key) => Released::Key(Zeroizing::new(key.expose_secret().to_vec())),
                Err(e) => {
                    tracing::info!(
                        columns = ?column_key.columns,
                        key_id = %column_key.key.key_id,
                        "column key not released: {e}"
                    );
                    Released::Refused(e.to_string())
                }
            };
            by_metadata.insert(
                KeyMaterial::new(false, &column_key.key, &aad)
                    .to_bytes()
                    .map_err(|e| EngineError::format("key material", e))?,
                (released, column_key.columns.clone()),
            );
        }
        Ok(PmeKeys { by_metadata })
    }

    /// Why the KMS refused a column key (the first refusal's message), if it refused one.
    pub fn refusal(&self) -> Option<String> {
        self.by_metadata
            .values()
            .find_map(|(released, _)| match released {
                Released::Refused(reason) => Some(reason.clone()),
                Released::Key(_) => None,
            })
    }

    /// The columns whose key the KMS refused.
    pub fn refused_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = self
            .by_metadata
            .values()
            .filter(|(released, _)| matches!(released, Released::Refused(_)))
            .flat_map(|(_, columns)| columns.clone())
            .collect();
        columns.sort();
        columns
    }
}

/// Hands arrow-rs the key named by a module's key metadata, only if it is one of the
/// dataset's: a file whose key metadata names any other key is refused.
struct Retriever(Arc<PmeKeys>);

impl KeyRetriever for Retriever {
    fn retrieve_key(&self, key_metadata: &[u8]) -> datafusion::parquet::errors::Result<Vec<u8>> {
        match self.0.by_metadata.get(key_metadata) {
            Some((Released::Key(key), _)) => Ok(key.to_vec()),
            Some((Released::Refused(reason), columns)) => Err(ParquetError::External(Box::new(
                EngineError::ColumnAccessDenied {
                    columns: columns.clone(),
                    reason: reason.clone(),
                },
            ))),
            None => Err(ParquetError::General(
                "the part names a key that is not its dataset's (a foreign or altered file)".into(),
            )),
        }
    }
}

/// One verified PME part: its dataset's keys and its AAD prefix.
#[derive(Debug, Clone)]
pub struct PmePart {
    /// The dataset's keys.
    pub keys: Arc<PmeKeys>,
    /// The part's AAD prefix, from the manifest (the one stored in the file is ignored).
    pub aad_prefix: Vec<u8>,
}

impl PmePart {
    /// The part of dataset `dataset_id` named `name`.
    pub fn new(keys: Arc<PmeKeys>, dataset_id: &[u8; 16], name: &str) -> Self {
        PmePart {
            keys,
            aad_prefix: aad_prefix(dataset_id, name),
        }
    }

    /// What arrow-rs needs to read the part.
    pub fn decryption_properties(&self) -> Result<Arc<FileDecryptionProperties>> {
        FileDecryptionProperties::with_key_retriever(Arc::new(Retriever(self.keys.clone())))
            .with_aad_prefix(self.aad_prefix.clone())
            .build()
            .map_err(|e| EngineError::from(DataFusionError::ParquetError(Box::new(e))))
    }
}

/// Parses a `COLUMN=KEY_ID` column key (`ppml encrypt --column-key`): the Parquet column
/// path and the primary key of its own data key.
pub fn parse_column_key(spec: &str) -> Result<(String, PrimaryKeyId)> {
    match spec.split_once('=') {
        Some((column, key)) if !column.is_empty() && !key.is_empty() => {
            Ok((column.to_string(), PrimaryKeyId(key.to_string())))
        }
        _ => Err(EngineError::InvalidInput {
            path: spec.to_string(),
            reason: "expected COLUMN=KEY_ID".into(),
        }),
    }
}

/// How a PME part is written.
#[derive(Clone, Debug, Default)]
pub struct PmeOptions {
    /// Column (Parquet path, dot-separated) → the primary key of its own data key.
    pub column_keys: Vec<(String, PrimaryKeyId)>,
    /// Leave the footer in plaintext (signed with the footer key), for readers that must
    /// see the schema without keys. Column data and statistics stay encrypted.
    pub plaintext_footer: bool,
}

/// The keys a writer encrypts a new PME dataset's parts with.
pub struct PmeWriteKeys {
    footer_key: Zeroizing<Vec<u8>>,
    footer_metadata: Vec<u8>,
    dataset_column_metadata: Vec<u8>,
    /// Column → (key, key metadata).
    columns: HashMap<String, (Zeroizing<Vec<u8>>, Vec<u8>)>,
    column_keys: Vec<ColumnKey>,
    plaintext_footer: bool,
    dataset_id: [u8; 16],
}

impl std::fmt::Debug for PmeWriteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmeWriteKeys")
            .field("column_keys", &self.column_keys.len())
            .finish_non_exhaustive()
    }
}

impl PmeWriteKeys {
    /// Keys for dataset `dataset_id` (data key `data_key` wrapped as `key`): one new data key
    /// per primary key named in `options.column_keys`, generated by `kms` and bound to the
    /// dataset like its data key.
    pub async fn generate(
        kms: &dyn KeyManagementService,
        dataset_id: [u8; 16],
        key: &KeyReference,
        data_key: &DataKey,
        options: &PmeOptions,
    ) -> Result<Self> {
        let aad = dataset_aad(&dataset_id);
        let material = |footer: bool, key: &KeyReference| {
            KeyMaterial::new(footer, key, &aad)
                .to_bytes()
                .map_err(|e| EngineError::format("key material", e))
        };
        let mut seen = HashSet::new();
        let mut by_primary: Vec<(PrimaryKeyId, Vec<String>)> = Vec::new();
        for (column, primary) in &options.column_keys {
            if !seen.insert(column.as_str()) {
                return Err(EngineError::InvalidInput {
                    path: column.clone(),
                    reason: "a column is given two keys".into(),
                });
            }
            match by_primary.iter_mut().find(|(p, _)| p == primary) {
                Some((_, columns)) => columns.push(column.clone()),
                None => by_primary.push((primary.clone(), vec![column.clone()])),
            }
        }
        let mut columns = HashMap::new();
        let mut column_keys = Vec::new();
        for (primary, names) in by_primary {
            let (column_data_key, reference) = kms
                .generate_data_key(&primary, &aad)
                .await
                .map_err(|source| EngineError::Kms {
                    dataset: format!("column key {primary}"),
                    source,
                })?;
            let metadata = material(false, &reference)?;
            for name in &names {
                columns.insert(
                    name.clone(),
                    (
                        Zeroizing::new(column_data_key.expose_secret().to_vec()),
                        metadata.clone(),
                    ),
                );
            }
            column_keys.push(ColumnKey {
                columns: names,
                key: reference,
            });
        }
        Ok(PmeWriteKeys {
            footer_key: Zeroizing::new(data_key.expose_secret().to_vec()),
            footer_metadata: material(true, key)?,
            dataset_column_metadata: material(false, key)?,
            columns,
            column_keys,
            plaintext_footer: options.plaintext_footer,
            dataset_id,
        })
    }

    /// The column keys the manifest records.
    pub fn column_keys(&self) -> &[ColumnKey] {
        &self.column_keys
    }

    /// The encryption of part `part_name` with schema `schema`: every leaf column encrypted,
    /// with its own key or the dataset's. Fails if a column key names no column of `schema`.
    pub fn encryption_properties(
        &self,
        schema: &SchemaRef,
        part_name: &str,
    ) -> Result<Arc<FileEncryptionProperties>> {
        let parquet =
            |e: ParquetError| EngineError::from(DataFusionError::ParquetError(Box::new(e)));
        let descriptor = ArrowSchemaConverter::new()
            .convert(schema)
            .map_err(parquet)?;
        let paths: Vec<String> = descriptor
            .columns()
            .iter()
            .map(|c| c.path().string())
            .collect();
        if let Some(missing) = self.columns.keys().find(|c| !paths.iter().any(|p| p == *c)) {
            return Err(EngineError::InvalidInput {
                path: missing.clone(),
                reason: format!(
                    "--column-key names no column of the data (columns: {})",
                    paths.join(", ")
                ),
            });
        }
        // PME leaves columns without a key in plaintext once any column has one: list every
        // column, those without a key of their own under the dataset's key.
        let mut builder = FileEncryptionProperties::builder(self.footer_key.to_vec())
            .with_footer_key_metadata(self.footer_metadata.clone())
            .with_aad_prefix(aad_prefix(&self.dataset_id, part_name))
            .with_aad_prefix_storage(true)
            .with_plaintext_footer(self.plaintext_footer);
        if !self.columns.is_empty() {
            for path in &paths {
                let (key, metadata) = match self.columns.get(path) {
                    Some((key, metadata)) => (key.to_vec(), metadata.clone()),
                    None => (
                        self.footer_key.to_vec(),
                        self.dataset_column_metadata.clone(),
                    ),
                };
                builder = builder.with_column_key_and_metadata(path, key, metadata);
            }
        }
        builder.build().map_err(parquet)
    }
}

/// DataFusion's hook into ppml's PME parts: the decryption of a file is that of the verified
/// part at its location in one of the decrypting stores it knows (by URL, from the table's
/// [`STORE_OPTION`]). Files of any other location get no keys, so they fail to open.
#[derive(Debug, Default)]
pub struct PmeFactory {
    stores: RwLock<HashMap<String, Weak<DecryptingStore>>>,
}

impl PmeFactory {
    /// Lets tables of the store at `url` be decrypted.
    pub fn add_store(&self, url: &str, store: &Arc<DecryptingStore>) {
        self.stores
            .write()
            .expect("stores lock")
            .insert(url.trim_end_matches('/').to_string(), Arc::downgrade(store));
    }

    /// The factory options of a table whose files are in the store at `url`.
    pub fn table_options(url: &str) -> EncryptionFactoryOptions {
        let mut options = EncryptionFactoryOptions::default();
        options
            .options
            .insert(STORE_OPTION.into(), url.trim_end_matches('/').to_string());
        options
    }
}

#[async_trait]
impl EncryptionFactory for PmeFactory {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _file_path: &StorePath,
    ) -> datafusion::error::Result<Option<Arc<FileEncryptionProperties>>> {
        Err(DataFusionError::Plan(
            "ppml writes datasets through its dataset writer, not DataFusion's".into(),
        ))
    }

    async fn get_file_decryption_properties(
        &self,
        config: &EncryptionFactoryOptions,
        file_path: &StorePath,
    ) -> datafusion::error::Result<Option<Arc<FileDecryptionProperties>>> {
        let url = config
            .options
            .get(STORE_OPTION)
            .ok_or_else(|| DataFusionError::Plan("a ppml Parquet table names no store".into()))?;
        let store = self
            .stores
            .read()
            .expect("stores lock")
            .get(url.as_str())
            .and_then(Weak::upgrade)
            .ok_or_else(|| DataFusionError::Plan(format!("{url} is not a ppml store")))?;
        // A Parquet file sealed in a ppml file is decrypted by the store: no PME keys.
        let Some(part) = store
            .pme_part(file_path)
            .await
            .map_err(|e| DataFusionError::External(Box::new(crate::store::engine_error(e))))?
        else {
            return Ok(None);
        };
        Ok(Some(
            part.decryption_properties()
                .map_err(|e| DataFusionError::External(Box::new(e)))?,
        ))
    }
}

/// `plan` with every Parquet scan of a ppml store decrypted by `factory`: for plans decoded
/// from their wire form (by a cluster executor), which does not carry a scan's encryption
/// factory.
pub fn with_pme_factory(
    plan: Arc<dyn ExecutionPlan>,
    factory: Arc<dyn EncryptionFactory>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    Ok(plan
        .transform_up(|node| {
            let Some(scan) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(config) = scan.data_source().downcast_ref::<FileScanConfig>() else {
                return Ok(Transformed::no(node));
            };
            let url = config.object_store_url.as_str();
            let Some(parquet) = config.file_source().downcast_ref::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            if !url.starts_with("ppml://") {
                return Ok(Transformed::no(node));
            }
            let mut options = parquet.table_parquet_options().clone();
            options.crypto.factory_id = Some(FACTORY_ID.to_string());
            options.crypto.factory_options = PmeFactory::table_options(url);
            let source = parquet
                .clone()
                .with_table_parquet_options(options)
                .with_encryption_factory(factory.clone());
            let config = FileScanConfigBuilder::from(config.clone())
                .with_source(Arc::new(source))
                .build();
            Ok(Transformed::yes(
                DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
            ))
        })?
        .data)
}

/// A PME table with columns whose key the KMS refused: a scan that needs one of them fails
/// at planning with [`EngineError::ColumnAccessDenied`] (arrow-rs would otherwise read the
/// refused column's chunk with metadata it could not decrypt), every other scan runs.
#[derive(Debug)]
pub struct RefusedColumnsTable {
    inner: Arc<dyn datafusion::catalog::TableProvider>,
    /// Top-level fields holding a refused column.
    refused: HashSet<String>,
    /// The refused columns and the KMS's reason, for the message.
    columns: Vec<String>,
    reason: String,
}

impl RefusedColumnsTable {
    /// `inner`, whose columns `refused` (Parquet paths) cannot be read because the KMS
    /// refused their key for `reason`.
    pub fn new(
        inner: Arc<dyn datafusion::catalog::TableProvider>,
        refused: Vec<String>,
        reason: String,
    ) -> Self {
        RefusedColumnsTable {
            inner,
            refused: refused
                .iter()
                .map(|c| c.split('.').next().unwrap_or(c).to_string())
                .collect(),
            columns: refused,
            reason,
        }
    }

    fn denied(&self) -> DataFusionError {
        DataFusionError::External(Box::new(EngineError::ColumnAccessDenied {
            columns: self.columns.clone(),
            reason: self.reason.clone(),
        }))
    }
}

#[async_trait]
impl datafusion::catalog::TableProvider for RefusedColumnsTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.inner.table_type()
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::prelude::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let projected: Vec<&str> = match projection {
            Some(indices) => indices
                .iter()
                .map(|i| schema.field(*i).name().as_str())
                .collect(),
            None => schema.fields().iter().map(|f| f.name().as_str()).collect(),
        };
        let filtered = filters
            .iter()
            .flat_map(|f| f.column_refs())
            .map(|c| c.name.clone())
            .collect::<Vec<_>>();
        if projected
            .iter()
            .copied()
            .chain(filtered.iter().map(String::as_str))
            .any(|name| self.refused.contains(name))
        {
            return Err(self.denied());
        }
        self.inner.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::prelude::Expr],
    ) -> datafusion::error::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }
}

/// Records the key metadata arrow-rs asks for, serving the keys already released: how the
/// keys of a file written by another tool are found without parsing Parquet by hand (the
/// column keys' metadata is inside the encrypted footer).
struct Discovery {
    keys: HashMap<Vec<u8>, Zeroizing<Vec<u8>>>,
    wanted: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl KeyRetriever for Discovery {
    fn retrieve_key(&self, key_metadata: &[u8]) -> datafusion::parquet::errors::Result<Vec<u8>> {
        match self.keys.get(key_metadata) {
            Some(key) => Ok(key.to_vec()),
            None => {
                self.wanted
                    .lock()
                    .expect("wanted lock")
                    .push(key_metadata.to_vec());
                Err(ParquetError::General("key not released yet".into()))
            }
        }
    }
}

/// The decryption of the Parquet file at `path` written with modular encryption by another
/// tool (pyarrow, parquet-mr) whose key metadata is ppml key material (§12): every key it
/// names is unwrapped by `kms`, with the `aad` its material carries, before reading starts.
/// `None` for a Parquet file without modular encryption. The KMS releases only keys the
/// caller may use, so a file naming another app's keys fails here.
pub async fn foreign_file_decryption(
    kms: &dyn KeyManagementService,
    path: &std::path::Path,
) -> Result<Option<Arc<FileDecryptionProperties>>> {
    use datafusion::parquet::file::metadata::ParquetMetaDataReader;
    let parquet = |e: ParquetError| EngineError::from(DataFusionError::ParquetError(Box::new(e)));
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let encrypted = match ParquetMetaDataReader::new().parse_and_finish(&file) {
        Ok(metadata) => metadata
            .row_groups()
            .iter()
            .flat_map(|g| g.columns())
            .any(|c| c.crypto_metadata().is_some()),
        Err(_) => true,
    };
    if !encrypted {
        return Ok(None);
    }
    let mut keys: HashMap<Vec<u8>, Zeroizing<Vec<u8>>> = HashMap::new();
    // Round 1 finds the footer key, round 2 the column keys inside the footer it opens.
    for _ in 0..3 {
        let discovery = Arc::new(Discovery {
            keys: keys.clone(),
            wanted: Default::default(),
        });
        let properties = FileDecryptionProperties::with_key_retriever(discovery.clone())
            .build()
            .map_err(parquet)?;
        let parsed = ParquetMetaDataReader::new()
            .with_decryption_properties(Some(properties.clone()))
            .parse_and_finish(&file);
        let wanted = std::mem::take(&mut *discovery.wanted.lock().expect("wanted lock"));
        if wanted.is_empty() {
            parsed.map_err(parquet)?;
            return Ok(Some(properties));
        }
        for metadata in wanted {
            if keys.contains_key(&metadata) {
                continue;
            }
            let material = KeyMaterial::parse(&metadata)
                .map_err(|e| EngineError::format(path.display(), e))?;
            let (reference, aad) = material.key_reference(kms.kms_id());
            let key = kms
                .unwrap_data_key(&reference, aad)
                .await
                .map_err(|source| EngineError::Kms {
                    dataset: path.display().to_string(),
                    source,
                })?;
            keys.insert(metadata, Zeroizing::new(key.expose_secret().to_vec()));
        }
    }
    Err(EngineError::InvalidInput {
        path: path.display().to_string(),
        reason: "its Parquet key metadata keeps asking for new keys".into(),
    })
}

/// Decrypts the Parquet files of an import by their path in the local file system (see
/// [`foreign_file_decryption`]); registered in the importing session only.
#[derive(Debug, Default)]
pub struct ImportFactory {
    files: HashMap<String, Arc<FileDecryptionProperties>>,
}

impl ImportFactory {
    /// The id the importing session registers it under.
    pub const ID: &str = "ppml-import";

    /// Decrypts the file at `path` (absolute) with `properties`.
    pub fn add(
        &mut self,
        path: &std::path::Path,
        properties: Arc<FileDecryptionProperties>,
    ) -> Result<()> {
        let location =
            StorePath::from_absolute_path(path).map_err(|e| EngineError::InvalidLocation {
                location: path.display().to_string(),
                reason: e.to_string(),
            })?;
        self.files.insert(location.to_string(), properties);
        Ok(())
    }

    /// Whether any file is encrypted.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[async_trait]
impl EncryptionFactory for ImportFactory {
    async fn get_file_encryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        _schema: &SchemaRef,
        _file_path: &StorePath,
    ) -> datafusion::error::Result<Option<Arc<FileEncryptionProperties>>> {
        Err(DataFusionError::Plan(
            "an import reads, it does not write".into(),
        ))
    }

    async fn get_file_decryption_properties(
        &self,
        _config: &EncryptionFactoryOptions,
        file_path: &StorePath,
    ) -> datafusion::error::Result<Option<Arc<FileDecryptionProperties>>> {
        Ok(self.files.get(file_path.as_ref()).cloned())
    }
}
