//! A DataFusion session whose local file store decrypts verified ppml datasets.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::WriterBuilder;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::catalog::TableProvider;
use datafusion::common::config::TableParquetOptions;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::encryption::encrypt::FileEncryptionProperties;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, execute_stream_partitioned,
};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use ppml_format::pme::PME_MEDIA_TYPE;
use ppml_format::receipt::InputRecord;
use ppml_kms::{KeyManagementService, PrimaryKeyId};

use crate::dataset::{
    DatasetWriter, Durability, PART_SUFFIX, VerifiedDataset, WriteOptions, open_dataset, part_name,
    pme_part_name,
};
use crate::files::MediaKind;
use crate::location::DatasetLocation;
use crate::output::AtomicDir;
use crate::s3::S3Stores;
use crate::store::{DatasetPin, LOCAL_STORE_URL};
use crate::{DecryptingStore, EngineError, Result};

/// Where and how query results are written.
pub enum OutputTarget<'a> {
    /// A new encrypted dataset under a fresh data key from `kms`.
    Encrypted {
        /// The KMS that generates and wraps the data key.
        kms: &'a dyn KeyManagementService,
        /// The primary key to wrap it under.
        primary: &'a PrimaryKeyId,
        /// Destination: a directory or an `s3://` prefix.
        dir: DatasetLocation,
        /// Write options.
        options: WriteOptions,
    },
    /// A directory of plaintext CSV parts (benchmarks and plaintext comparisons only).
    Plaintext {
        /// Destination directory.
        dir: &'a Path,
        /// Replace an existing destination.
        overwrite: bool,
        /// Sync the parts and directory before it appears.
        durability: Durability,
    },
}

/// The formats query results are written in.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OutputFormat {
    /// CSV with a header line in every part.
    #[default]
    Csv,
    /// Newline-delimited JSON, one object per row.
    Json,
    /// Apache Parquet.
    Parquet,
}

impl OutputFormat {
    /// The media kind a manifest records for this format.
    pub fn media_kind(self) -> MediaKind {
        match self {
            OutputFormat::Csv => MediaKind::Csv { header: true },
            OutputFormat::Json => MediaKind::Json,
            OutputFormat::Parquet => MediaKind::Parquet,
        }
    }

    /// The extension of part files of this format.
    pub fn extension(self) -> &'static str {
        self.media_kind().extension()
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "csv" => Ok(OutputFormat::Csv),
            "json" | "ndjson" | "jsonl" => Ok(OutputFormat::Json),
            "parquet" => Ok(OutputFormat::Parquet),
            other => Err(format!("unknown format {other:?} (csv, json or parquet)")),
        }
    }
}

/// What a write produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Rows written (header lines excluded).
    pub rows: u64,
    /// Part files written.
    pub parts: usize,
    /// Plaintext bytes written.
    pub plaintext_bytes: u64,
}

/// Runs physical plans planned by a [`PpmlSession`]: in this process ([`LocalRunner`]), or on
/// a cluster (`ppml-cluster`).
#[async_trait::async_trait]
pub trait PlanRunner: Send + Sync {
    /// Starts `plan` and returns one stream per output partition.
    async fn execute(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: &SessionContext,
    ) -> Result<Vec<SendableRecordBatchStream>>;

    /// [`PlanRunner::execute`], with where the attestations of the executors that computed
    /// the result will be once the streams are read (`None` in this process).
    async fn execute_attested(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: &SessionContext,
    ) -> Result<(
        Vec<SendableRecordBatchStream>,
        Option<Arc<crate::receipt::ExecutorAttestations>>,
    )> {
        Ok((self.execute(plan, ctx).await?, None))
    }
}

/// Runs plans in this process, with the session's own task context, if they hold only the
/// operators a ppml runtime runs ([`crate::plan_check`]).
#[derive(Debug, Default)]
pub struct LocalRunner;

#[async_trait::async_trait]
impl PlanRunner for LocalRunner {
    async fn execute(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: &SessionContext,
    ) -> Result<Vec<SendableRecordBatchStream>> {
        crate::plan_check::check_operators(&plan, &[])?;
        Ok(execute_stream_partitioned(plan, ctx.task_ctx())?)
    }
}

/// A DataFusion session for ppml.
///
/// In an encrypted session the `ppml://fs` object store (and `ppml://s3-<bucket>` for each S3
/// bucket) is a [`DecryptingStore`]: only parts of datasets registered through
/// [`PpmlSession::register_dataset`] (and therefore verified) can be read, and they are read as
/// plaintext without a plaintext copy ever touching disk.
/// Plans run through the session's [`PlanRunner`].
pub struct PpmlSession {
    ctx: SessionContext,
    decrypting: Option<(Arc<DecryptingStore>, Arc<dyn KeyManagementService>)>,
    /// The decrypting stores of S3 buckets (encrypted sessions), created on first use.
    s3: Arc<S3Stores>,
    runner: Arc<dyn PlanRunner>,
    /// The datasets this session opened, by pin: what job receipts list as inputs.
    opened: Arc<Mutex<HashMap<DatasetPin, InputRecord>>>,
    /// The private directory of the encrypted spill files (encrypted sessions); removed on drop.
    _spill_dir: Option<crate::spill::SpillDirGuard>,
}

impl std::fmt::Debug for PpmlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PpmlSession")
            .field("encrypted", &self.decrypting.is_some())
            .finish()
    }
}

fn config(target_partitions: Option<usize>) -> SessionConfig {
    let mut config = SessionConfig::new();
    if let Some(n) = target_partitions.filter(|n| *n > 0) {
        config = config.with_target_partitions(n);
    }
    config
}

impl PpmlSession {
    /// A session reading encrypted datasets with keys released by `kms`.
    ///
    /// Operators that spill under memory pressure write [`crate::spill::EncryptedSpill`] files
    /// in a fresh private directory removed with the session (with DataFusion's default,
    /// unbounded memory pool nothing spills until a memory limit is set).
    pub fn encrypted(kms: Arc<dyn KeyManagementService>, target_partitions: Option<usize>) -> Self {
        let (runtime, spill_dir) = crate::spill::encrypted_spill_runtime();
        let s3 = Arc::new(S3Stores::new());
        let runtime =
            datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(&runtime)
                .with_object_store_registry(s3.registry(runtime.object_store_registry.clone()))
                .build_arc()
                .expect("a runtime with an existing disk manager builds");
        let store = Arc::new(DecryptingStore::local(Arc::new(LocalFileSystem::new())));
        let pme = s3.pme_factory();
        pme.add_store(LOCAL_STORE_URL, &store);
        runtime.register_parquet_encryption_factory(crate::pme::FACTORY_ID, pme);
        let ctx = SessionContext::new_with_config_rt(config(target_partitions), runtime);
        let store_url = url::Url::parse(LOCAL_STORE_URL).expect("valid URL");
        ctx.register_object_store(&store_url, store.clone());
        PpmlSession {
            ctx,
            decrypting: Some((store, kms)),
            s3,
            runner: Arc::new(LocalRunner),
            opened: Arc::default(),
            _spill_dir: spill_dir,
        }
    }

    /// A session reading encrypted datasets like [`PpmlSession::encrypted`], with a DataFusion
    /// configuration of the caller's (a cluster driver adds its planner settings).
    pub fn encrypted_with_config(
        kms: Arc<dyn KeyManagementService>,
        config: SessionConfig,
    ) -> Self {
        let mut session = Self::encrypted(kms, None);
        let store = session.decrypting.as_ref().expect("encrypted").0.clone();
        // Same runtime, hence the same encrypted spill.
        session.ctx = SessionContext::new_with_config_rt(config, session.ctx.runtime_env());
        let store_url = url::Url::parse(LOCAL_STORE_URL).expect("valid URL");
        session.ctx.register_object_store(&store_url, store);
        session
    }

    /// Bounds the memory this session's operators may hold to `bytes`; beyond it they spill
    /// (encrypted, in an encrypted session) or fail. The object stores and the disk manager
    /// are kept.
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(
            &self.ctx.runtime_env(),
        )
        .with_memory_limit(bytes, 1.0)
        .build_arc()
        .expect("a runtime with an existing disk manager builds");
        self.ctx = SessionContext::new_with_state(
            datafusion::execution::SessionStateBuilder::new_from_existing(self.ctx.state())
                .with_runtime_env(runtime)
                .build(),
        );
        self
    }

    /// The datasets `plan` reads, as job receipts list them (`docs/receipts.md`).
    pub fn inputs_of(&self, plan: &Arc<dyn ExecutionPlan>) -> Vec<InputRecord> {
        crate::receipt::inputs_of(plan, &self.opened.lock().expect("opened datasets lock"))
    }

    /// Runs this session's plans with `runner` instead of in this process.
    pub fn with_runner(mut self, runner: Arc<dyn PlanRunner>) -> Self {
        self.runner = runner;
        self
    }

    /// Plans a SQL query. Only queries are accepted: DDL (`CREATE EXTERNAL TABLE`), DML
    /// (`COPY … TO`, `INSERT`) and statements (`SET`) are refused, because they could write
    /// rows in plaintext or switch spilling back to DataFusion's plaintext temporary files.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        let options = datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(self.ctx.sql_with_options(sql, options).await?)
    }

    /// Plans `df` and runs it with the session's runner, as one stream of its rows: the
    /// plan's output partitions are read concurrently and their batches interleaved (a plan
    /// whose rows are ordered has one output partition).
    pub async fn stream(&self, df: DataFrame) -> Result<SendableRecordBatchStream> {
        let plan = df.create_physical_plan().await?;
        let schema = plan.schema();
        let streams = self.runner.execute(plan, &self.ctx).await?;
        Ok(Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                schema,
                futures::stream::select_all(streams),
            ),
        ))
    }

    /// Plans `df` and runs it with the session's runner, collecting every batch.
    pub async fn collect(&self, df: DataFrame) -> Result<Vec<RecordBatch>> {
        let plan = df.create_physical_plan().await?;
        let mut batches = Vec::new();
        for mut stream in self.runner.execute(plan, &self.ctx).await? {
            while let Some(batch) = stream.next().await {
                batches.push(batch?);
            }
        }
        Ok(batches)
    }

    /// A session over plaintext files, for comparisons and benchmarks.
    pub fn plaintext(target_partitions: Option<usize>) -> Self {
        PpmlSession {
            ctx: SessionContext::new_with_config(config(target_partitions)),
            decrypting: None,
            s3: Arc::new(S3Stores::new()),
            runner: Arc::new(LocalRunner),
            opened: Arc::default(),
            _spill_dir: None,
        }
    }

    /// The DataFusion context, to run SQL or build DataFrames.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers the dataset at `location` as table `name`. In an encrypted session it must
    /// be a ppml dataset (a directory or an `s3://` prefix) of CSV, NDJSON or Parquet parts,
    /// which is verified first and read as its manifest's media type says; in a plaintext
    /// session, a local file or directory read as its extension says (see
    /// [`PpmlSession::plaintext_table`]). With `schema` None, the schema is inferred from the
    /// data.
    pub async fn register_dataset(
        &self,
        name: &str,
        location: impl Into<DatasetLocation>,
        schema: Option<SchemaRef>,
    ) -> Result<Option<VerifiedDataset>> {
        let (table, dataset) = self.dataset_table(location, schema).await?;
        self.ctx.register_table(name, table)?;
        Ok(dataset)
    }

    /// The dataset at `location` as a table (see [`PpmlSession::register_dataset`]), and the
    /// verified dataset behind it in an encrypted session.
    pub async fn dataset_table(
        &self,
        location: impl Into<DatasetLocation>,
        schema: Option<SchemaRef>,
    ) -> Result<(Arc<dyn TableProvider>, Option<VerifiedDataset>)> {
        let location = location.into();
        let display = location.to_string();
        let (url, dataset) = match (&self.decrypting, &location) {
            (None, DatasetLocation::S3 { .. }) => {
                return Err(EngineError::InvalidLocation {
                    location: display,
                    reason: "plaintext tables are local files".into(),
                });
            }
            (None, DatasetLocation::Local(path)) => {
                return Ok((self.plaintext_table(path, schema).await?, None));
            }
            (Some((store, kms)), DatasetLocation::Local(path)) => {
                let absolute = std::path::absolute(path).map_err(|e| EngineError::io(path, e))?;
                if !absolute.is_dir() {
                    return Err(EngineError::NotADataset(display));
                }
                let mut text = absolute.to_string_lossy().into_owned();
                if !text.ends_with('/') {
                    text.push('/');
                }
                let local = ListingTableUrl::parse(&text)?;
                let dataset = open_dataset(
                    store.inner().as_ref(),
                    local.prefix(),
                    &display,
                    kms.as_ref(),
                )
                .await?;
                let pinned_root = store.register(&dataset);
                let url = ListingTableUrl::parse(format!("{LOCAL_STORE_URL}/{pinned_root}/"))?;
                (url, dataset)
            }
            (Some((_, kms)), DatasetLocation::S3 { bucket, prefix }) => {
                let store = self.s3.decrypting(bucket)?;
                let dataset =
                    open_dataset(store.inner().as_ref(), prefix, &display, kms.as_ref()).await?;
                let pinned_root = store.register(&dataset);
                let url = ListingTableUrl::parse(format!(
                    "{}/{pinned_root}/",
                    crate::s3::store_url(bucket)
                ))?;
                (url, dataset)
            }
        };
        let kind = queryable_kind(&dataset)?;
        self.opened.lock().expect("opened datasets lock").insert(
            DatasetPin::of(&dataset),
            crate::receipt::input_record(&location, &dataset)?,
        );
        let table = if dataset.is_pme() {
            let mut options = TableParquetOptions::default();
            options.crypto.factory_id = Some(crate::pme::FACTORY_ID.to_string());
            options.crypto.factory_options =
                crate::pme::PmeFactory::table_options(url.object_store().as_str());
            let format = ParquetFormat::default().with_options(options);
            let table = self
                .listing_table_of(url, Arc::new(format), "", schema)
                .await?;
            match dataset.refused_columns() {
                (refused, _) if refused.is_empty() => table,
                (refused, reason) => {
                    Arc::new(crate::pme::RefusedColumnsTable::new(table, refused, reason))
                }
            }
        } else {
            self.listing_table(url, kind, PART_SUFFIX, schema).await?
        };
        Ok((table, Some(dataset)))
    }

    /// A local plaintext file or directory as a table, in any session: plaintext in,
    /// encrypted out is a choice the caller makes explicitly. Its format is that of its
    /// (first) file's extension: `.parquet`; `.json`, `.jsonl` or `.ndjson` (newline-delimited
    /// JSON); anything else is CSV with a header line. Such a table is read in this process
    /// only (cluster executors read only ppml datasets).
    pub async fn plaintext_table(
        &self,
        path: &Path,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        self.plaintext_table_as(path, None, schema).await
    }

    /// [`PpmlSession::plaintext_table`], read as `kind` whatever the files' extensions say
    /// (with `None`, as they say). [`MediaKind::Binary`] is refused.
    pub async fn plaintext_table_as(
        &self,
        path: &Path,
        kind: Option<MediaKind>,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        if kind == Some(MediaKind::Binary) {
            return Err(EngineError::InvalidLocation {
                location: path.display().to_string(),
                reason: "a plaintext table is CSV, NDJSON or Parquet".into(),
            });
        }
        let absolute = std::path::absolute(path).map_err(|e| EngineError::io(path, e))?;
        if !absolute.exists() {
            return Err(EngineError::InvalidLocation {
                location: path.display().to_string(),
                reason: "no such file or directory".into(),
            });
        }
        let (detected, extension) = if absolute.is_dir() {
            let first = crate::files::input_files(&absolute)?.remove(0);
            let kind = plaintext_kind(&first);
            let extension = match first.extension() {
                Some(e) => format!(".{}", e.to_string_lossy()),
                None => String::new(),
            };
            (kind, extension)
        } else {
            (plaintext_kind(&absolute), String::new())
        };
        let kind = kind.unwrap_or(detected);
        let mut text = absolute.to_string_lossy().into_owned();
        if absolute.is_dir() && !text.ends_with('/') {
            text.push('/');
        }
        self.listing_table(ListingTableUrl::parse(&text)?, kind, &extension, schema)
            .await
    }

    /// The Parquet file or directory `path`, whose files `import` decrypts (Parquet files
    /// that another tool encrypted with PME, their keys released by the KMS), as a table: for
    /// an import that re-encrypts them as a ppml dataset. Read in this process only.
    pub async fn encrypted_parquet_import(
        &self,
        path: &Path,
        import: Arc<crate::pme::ImportFactory>,
    ) -> Result<Arc<dyn TableProvider>> {
        let absolute = std::path::absolute(path).map_err(|e| EngineError::io(path, e))?;
        self.ctx
            .runtime_env()
            .register_parquet_encryption_factory(crate::pme::ImportFactory::ID, import);
        let mut options = TableParquetOptions::default();
        options.crypto.factory_id = Some(crate::pme::ImportFactory::ID.to_string());
        let mut text = absolute.to_string_lossy().into_owned();
        let extension = if absolute.is_dir() {
            if !text.ends_with('/') {
                text.push('/');
            }
            ".parquet"
        } else {
            ""
        };
        let format = ParquetFormat::default().with_options(options);
        self.listing_table_of(
            ListingTableUrl::parse(&text)?,
            Arc::new(format),
            extension,
            None,
        )
        .await
    }

    async fn listing_table(
        &self,
        url: ListingTableUrl,
        kind: MediaKind,
        extension: &str,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        let format: Arc<dyn FileFormat> = match kind {
            MediaKind::Csv { header } => Arc::new(CsvFormat::default().with_has_header(header)),
            MediaKind::Json => Arc::new(JsonFormat::default()),
            MediaKind::Parquet => Arc::new(ParquetFormat::default()),
            MediaKind::Binary => unreachable!("binary datasets are refused before"),
        };
        self.listing_table_of(url, format, extension, schema).await
    }

    async fn listing_table_of(
        &self,
        url: ListingTableUrl,
        format: Arc<dyn FileFormat>,
        extension: &str,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        let options = ListingOptions::new(format).with_file_extension(extension);
        let schema = match schema {
            Some(schema) => schema,
            None => options.infer_schema(&self.ctx.state(), &url).await?,
        };
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }

    /// Runs `df` and writes its rows as CSV (with a header line per part) to `target` (see
    /// [`PpmlSession::write`]).
    pub async fn write_csv(
        &self,
        df: DataFrame,
        target: OutputTarget<'_>,
        partitions: Option<usize>,
    ) -> Result<WriteSummary> {
        self.write(df, target, partitions, OutputFormat::Csv).await
    }

    /// Runs `df` and writes all its rows as `format` into one plaintext writer `out` (CSV
    /// with a single header line), streaming. Returns the rows written.
    pub async fn write_one(
        &self,
        df: DataFrame,
        out: &mut (dyn Write + Send),
        format: OutputFormat,
    ) -> Result<u64> {
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let plan = df.create_physical_plan().await?;
        let plan: Arc<dyn ExecutionPlan> = match plan.output_partitioning().partition_count() {
            1 => plan,
            _ => Arc::new(CoalescePartitionsExec::new(plan)),
        };
        let mut streams = self.runner.execute(plan, &self.ctx).await?;
        let stream = match streams.len() {
            1 => streams.remove(0),
            n => {
                return Err(EngineError::DataFusion(DataFusionError::Internal(format!(
                    "a coalesced plan ran as {n} streams"
                ))));
            }
        };
        let (_, rows) = write_partition(stream, Unbuffered(out), schema, format, None).await?;
        Ok(rows)
    }

    /// Runs `df` and writes its rows as `format` to `target`, one part per output partition
    /// (`partitions` repartitions round-robin first). Parts are written in parallel; nothing
    /// appears at the destination unless every part succeeded.
    pub async fn write(
        &self,
        df: DataFrame,
        target: OutputTarget<'_>,
        partitions: Option<usize>,
        format: OutputFormat,
    ) -> Result<WriteSummary> {
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let plan = df.create_physical_plan().await?;
        let mut target = target;
        if let OutputTarget::Encrypted { options, .. } = &mut target
            && let Some(job) = &mut options.job
            && job.inputs.is_empty()
        {
            job.inputs = self.inputs_of(&plan);
        }
        // Repartition the physical plan: a logical repartition may be optimised away.
        let plan: Arc<dyn ExecutionPlan> = match partitions.filter(|n| *n > 0) {
            Some(n) if n == plan.output_partitioning().partition_count() => plan,
            Some(1) => Arc::new(CoalescePartitionsExec::new(plan)),
            Some(n) => Arc::new(RepartitionExec::try_new(
                plan,
                Partitioning::RoundRobinBatch(n),
            )?),
            None => plan,
        };
        let (streams, executors) = self.runner.execute_attested(plan, &self.ctx).await?;
        if let OutputTarget::Encrypted { options, .. } = &mut target
            && let Some(job) = &mut options.job
        {
            job.executors = executors;
        }
        write_streams(streams, schema, target, format).await
    }
}

/// Writes rows that are already streams (of `schema`) as `format` to `target`, one part per
/// stream, in parallel; nothing appears at the destination unless every part succeeded. For
/// rows an application holds (an Arrow stream it made): they are not a plan, so no runner
/// and no operator check are involved. [`split_round_robin`] makes more parts of one stream.
pub async fn write_streams(
    streams: Vec<SendableRecordBatchStream>,
    schema: SchemaRef,
    target: OutputTarget<'_>,
    format: OutputFormat,
) -> Result<WriteSummary> {
    match target {
        OutputTarget::Encrypted {
            kms,
            primary,
            dir,
            options,
        } => {
            let pme = format == OutputFormat::Parquet;
            let media_type = match format {
                OutputFormat::Parquet => PME_MEDIA_TYPE,
                other => other.media_kind().media_type(),
            };
            let options = WriteOptions {
                media_type: media_type.to_string(),
                ..options
            };
            let parquet_options = options.parquet.clone();
            let writer = DatasetWriter::create(kms, primary, dir, options).await?;
            let written = async {
                let pme_keys = match pme {
                    true => Some(writer.pme_keys(kms, &parquet_options).await?),
                    false => None,
                };
                let mut sinks = Vec::with_capacity(streams.len());
                for i in 0..streams.len() {
                    sinks.push(match &pme_keys {
                        Some(keys) => {
                            let name = pme_part_name(i);
                            let encryption = keys.encryption_properties(&schema, &name)?;
                            (writer.pme_part(&name).await?, Some(encryption))
                        }
                        None => (writer.part(&part_name(i, format.extension())).await?, None),
                    });
                }
                let results = write_all(streams, sinks, schema, format).await?;
                let mut summary = WriteSummary::default();
                let mut entries = Vec::with_capacity(results.len());
                for (part, rows) in results {
                    let entry = part.finish().await?;
                    summary.rows += rows;
                    summary.parts += 1;
                    summary.plaintext_bytes += entry.plaintext_len;
                    entries.push(entry);
                }
                let column_keys = pme_keys
                    .map(|k| k.column_keys().to_vec())
                    .unwrap_or_default();
                Ok::<_, EngineError>((summary, entries, column_keys))
            }
            .await;
            match written {
                Ok((summary, entries, column_keys)) => {
                    writer
                        .commit_job_output(entries, column_keys, kms, summary.rows)
                        .await?;
                    Ok(summary)
                }
                Err(e) => {
                    writer.abort().await;
                    Err(e)
                }
            }
        }
        OutputTarget::Plaintext {
            dir,
            overwrite,
            durability,
        } => {
            let mut atomic = AtomicDir::create(dir, overwrite, durability)?;
            let sinks = (0..streams.len())
                .map(|i| {
                    atomic
                        .create_file(&format!("part-{i:05}.{}", format.extension()))
                        .map(|f| {
                            (
                                CountingWriter::new(BufWriter::with_capacity(1 << 20, f)),
                                None,
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let results = write_all(streams, sinks, schema, format).await?;
            let mut summary = WriteSummary::default();
            for (mut sink, rows) in results {
                // Same durability as the encrypted path, which syncs every part.
                sink.flush()
                    .and_then(|_| durability.sync(sink.inner.get_ref()))
                    .map_err(|e| EngineError::io(dir, e))?;
                summary.rows += rows;
                summary.parts += 1;
                summary.plaintext_bytes += sink.written;
            }
            atomic.commit()?;
            Ok(summary)
        }
    }
}

/// Splits `stream` into `parts` streams that take its batches in turn (round-robin), for
/// [`write_streams`]: each batch is read once and held by one part at a time, at most one
/// batch ahead per part.
pub fn split_round_robin(
    mut stream: SendableRecordBatchStream,
    parts: usize,
) -> Vec<SendableRecordBatchStream> {
    if parts <= 1 {
        return vec![stream];
    }
    let schema = stream.schema();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..parts)
        .map(|_| tokio::sync::mpsc::channel::<datafusion::error::Result<RecordBatch>>(1))
        .unzip();
    tokio::spawn(async move {
        let mut next = 0;
        while let Some(batch) = stream.next().await {
            let failed = batch.is_err();
            if senders[next].send(batch).await.is_err() || failed {
                break;
            }
            next = (next + 1) % senders.len();
        }
    });
    receivers
        .into_iter()
        .map(|receiver| {
            let batches = futures::stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|batch| (batch, receiver))
            });
            Box::pin(
                datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                    schema.clone(),
                    batches,
                ),
            ) as SendableRecordBatchStream
        })
        .collect()
}

/// The format of a dataset's parts, or an error if the query engine cannot read them.
fn queryable_kind(dataset: &VerifiedDataset) -> Result<MediaKind> {
    match MediaKind::from_media_type(dataset.manifest.media_type()) {
        MediaKind::Binary => Err(EngineError::UnsupportedMediaType {
            dataset: dataset.display.clone(),
            media_type: dataset.manifest.media_type().to_string(),
        }),
        kind => Ok(kind),
    }
}

/// The format of a plaintext input file, from its extension (CSV unless it says otherwise).
fn plaintext_kind(path: &Path) -> MediaKind {
    match MediaKind::of_path(path) {
        MediaKind::Binary => MediaKind::Csv { header: true },
        kind => kind,
    }
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W> CountingWriter<W> {
    fn new(inner: W) -> Self {
        CountingWriter { inner, written: 0 }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A sink of a part's plaintext CSV.
#[async_trait::async_trait]
trait CsvSink: Write + Send {
    /// Waits until the sink can take more (the uploads of an S3 part caught up).
    async fn ready(&mut self) -> Result<()> {
        Ok(())
    }

    /// A Parquet writer is about to write the footer.
    fn start_footer(&mut self) {}
}

#[async_trait::async_trait]
impl CsvSink for crate::dataset::PartWriter {
    async fn ready(&mut self) -> Result<()> {
        crate::dataset::PartWriter::ready(self).await
    }

    fn start_footer(&mut self) {
        crate::dataset::PartWriter::start_footer(self)
    }
}

impl<W: Write + Send> CsvSink for CountingWriter<W> {}

/// A caller's writer as a sink.
struct Unbuffered<'a>(&'a mut (dyn Write + Send));

impl Write for Unbuffered<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl CsvSink for Unbuffered<'_> {}

/// Drains every stream into its sink concurrently; on the first error the other writers are
/// cancelled (and dropped) and the error returned.
async fn write_all<W: CsvSink + 'static>(
    streams: Vec<SendableRecordBatchStream>,
    sinks: Vec<(W, Option<Arc<FileEncryptionProperties>>)>,
    schema: SchemaRef,
    format: OutputFormat,
) -> Result<Vec<(W, u64)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (stream, sink)) in streams.into_iter().zip(sinks).enumerate() {
        let schema = schema.clone();
        tasks.spawn(async move {
            let (sink, encryption) = sink;
            (
                index,
                write_partition(stream, sink, schema, format, encryption).await,
            )
        });
    }
    let mut results: Vec<Option<(W, u64)>> = (0..tasks.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.map_err(|e| {
            EngineError::DataFusion(datafusion::error::DataFusionError::External(Box::new(e)))
        })?;
        match result {
            Ok(done) => results[index] = Some(done),
            Err(e) => {
                tasks.shutdown().await;
                return Err(e);
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every task joined"))
        .collect())
}

async fn write_partition<W: CsvSink>(
    mut stream: SendableRecordBatchStream,
    sink: W,
    schema: SchemaRef,
    format: OutputFormat,
    encryption: Option<Arc<FileEncryptionProperties>>,
) -> Result<(W, u64)> {
    let mut rows = 0u64;
    match format {
        OutputFormat::Csv => {
            let mut sink = sink;
            let mut wrote_header = false;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                // One CSV writer per batch (it flushes at the end of each), so that the sink
                // can apply back-pressure between batches.
                WriterBuilder::new()
                    .with_header(!wrote_header)
                    .build(&mut sink)
                    .write(&batch)?;
                sink.ready().await?;
                rows += batch.num_rows() as u64;
                wrote_header = true;
            }
            if !wrote_header {
                WriterBuilder::new()
                    .with_header(true)
                    .build(&mut sink)
                    .write(&RecordBatch::new_empty(schema))?;
            }
            Ok((sink, rows))
        }
        OutputFormat::Json => {
            let mut sink = sink;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                let mut writer = LineDelimitedWriter::new(&mut sink);
                writer.write(&batch)?;
                writer.finish()?;
                sink.ready().await?;
                rows += batch.num_rows() as u64;
            }
            Ok((sink, rows))
        }
        OutputFormat::Parquet => {
            // Row groups are bounded (`max_row_group_size` rows), so a part never holds more
            // than one row group of plaintext in memory.
            let parquet = |e| EngineError::from(DataFusionError::ParquetError(Box::new(e)));
            let mut properties = WriterProperties::builder();
            if let Some(encryption) = encryption {
                properties = properties.with_file_encryption_properties(encryption);
            }
            let mut writer =
                ArrowWriter::try_new(sink, schema, Some(properties.build())).map_err(parquet)?;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                writer.write(&batch).map_err(parquet)?;
                writer.inner_mut().ready().await?;
                rows += batch.num_rows() as u64;
            }
            // Everything after the last row group is the footer region (and page indexes).
            writer.flush().map_err(parquet)?;
            writer
                .sync()
                .map_err(|e| parquet(datafusion::parquet::errors::ParquetError::from(e)))?;
            writer.inner_mut().start_footer();
            Ok((writer.into_inner().map_err(parquet)?, rows))
        }
    }
}
