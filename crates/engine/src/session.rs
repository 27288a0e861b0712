//! A DataFusion session whose local file store decrypts verified ppml datasets.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::WriterBuilder;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, execute_stream_partitioned,
};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use ppml_kms::{KeyManagementService, PrimaryKeyId};

use crate::dataset::{
    DatasetWriter, Durability, PART_SUFFIX, VerifiedDataset, WriteOptions, open_dataset, part_name,
    replace_path, temp_sibling,
};
use crate::location::DatasetLocation;
use crate::s3::S3Stores;
use crate::store::LOCAL_STORE_URL;
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
/// [`PpmlSession::register_csv`] (and therefore verified) can be read, and they are read as
/// plaintext without a plaintext copy ever touching disk.
/// Plans run through the session's [`PlanRunner`].
pub struct PpmlSession {
    ctx: SessionContext,
    decrypting: Option<(Arc<DecryptingStore>, Arc<dyn KeyManagementService>)>,
    /// The decrypting stores of S3 buckets (encrypted sessions), created on first use.
    s3: Arc<S3Stores>,
    runner: Arc<dyn PlanRunner>,
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
        let ctx = SessionContext::new_with_config_rt(config(target_partitions), runtime);
        let store = Arc::new(DecryptingStore::local(Arc::new(LocalFileSystem::new())));
        let store_url = url::Url::parse(LOCAL_STORE_URL).expect("valid URL");
        ctx.register_object_store(&store_url, store.clone());
        PpmlSession {
            ctx,
            decrypting: Some((store, kms)),
            s3,
            runner: Arc::new(LocalRunner),
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
            _spill_dir: None,
        }
    }

    /// The DataFusion context, to run SQL or build DataFrames.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers the CSV data at `location` as table `name`. In an encrypted session it must
    /// be a ppml dataset (a directory or an `s3://` prefix), which is verified first; in a
    /// plaintext session, a local CSV file or directory. With `schema` None, the schema is
    /// inferred from the data.
    pub async fn register_csv(
        &self,
        name: &str,
        location: impl Into<DatasetLocation>,
        schema: Option<SchemaRef>,
    ) -> Result<Option<VerifiedDataset>> {
        let (table, dataset) = self.csv_table(location, schema).await?;
        self.ctx.register_table(name, table)?;
        Ok(dataset)
    }

    /// The CSV data at `location` as a table (see [`PpmlSession::register_csv`]), and the
    /// verified dataset behind it in an encrypted session.
    pub async fn csv_table(
        &self,
        location: impl Into<DatasetLocation>,
        schema: Option<SchemaRef>,
    ) -> Result<(Arc<dyn TableProvider>, Option<VerifiedDataset>)> {
        let location = location.into();
        let display = location.to_string();
        let (url, has_header, extension, dataset) = match (&self.decrypting, &location) {
            (None, DatasetLocation::S3 { .. }) => {
                return Err(EngineError::InvalidLocation {
                    location: display,
                    reason: "plaintext tables are local files".into(),
                });
            }
            (None, DatasetLocation::Local(path)) => {
                return Ok((self.plaintext_csv_table(path, schema).await?, None));
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
                only_csv(&dataset)?;
                let pinned_root = store.register(&dataset);
                let url = ListingTableUrl::parse(format!("{LOCAL_STORE_URL}/{pinned_root}/"))?;
                (url, dataset.csv_has_header(), PART_SUFFIX, Some(dataset))
            }
            (Some((_, kms)), DatasetLocation::S3 { bucket, prefix }) => {
                let store = self.s3.decrypting(bucket)?;
                let dataset =
                    open_dataset(store.inner().as_ref(), prefix, &display, kms.as_ref()).await?;
                only_csv(&dataset)?;
                let pinned_root = store.register(&dataset);
                let url = ListingTableUrl::parse(format!(
                    "{}/{pinned_root}/",
                    crate::s3::store_url(bucket)
                ))?;
                (url, dataset.csv_has_header(), PART_SUFFIX, Some(dataset))
            }
        };
        Ok((
            self.listing_table(url, has_header, extension, schema)
                .await?,
            dataset,
        ))
    }

    /// A local plaintext CSV file or directory (with a header line) as a table, in any
    /// session: plaintext in, encrypted out is a choice the caller makes explicitly. Such a
    /// table is read in this process only (cluster executors read only ppml datasets).
    pub async fn plaintext_csv_table(
        &self,
        path: &Path,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        let absolute = std::path::absolute(path).map_err(|e| EngineError::io(path, e))?;
        if !absolute.exists() {
            return Err(EngineError::InvalidLocation {
                location: path.display().to_string(),
                reason: "no such file or directory".into(),
            });
        }
        let mut text = absolute.to_string_lossy().into_owned();
        if absolute.is_dir() && !text.ends_with('/') {
            text.push('/');
        }
        self.listing_table(ListingTableUrl::parse(&text)?, true, "", schema)
            .await
    }

    async fn listing_table(
        &self,
        url: ListingTableUrl,
        has_header: bool,
        extension: &str,
        schema: Option<SchemaRef>,
    ) -> Result<Arc<dyn TableProvider>> {
        let format = CsvFormat::default().with_has_header(has_header);
        let options = ListingOptions::new(Arc::new(format)).with_file_extension(extension);
        let schema = match schema {
            Some(schema) => schema,
            None => options.infer_schema(&self.ctx.state(), &url).await?,
        };
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }

    /// Runs `df` and writes its rows as CSV (with a header line per part) to `target`, one
    /// part per output partition (`partitions` repartitions round-robin first). Parts are
    /// written in parallel; nothing appears at the destination unless every part succeeded.
    pub async fn write_csv(
        &self,
        df: DataFrame,
        target: OutputTarget<'_>,
        partitions: Option<usize>,
    ) -> Result<WriteSummary> {
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let plan = df.create_physical_plan().await?;
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
        let streams = self.runner.execute(plan, &self.ctx).await?;
        match target {
            OutputTarget::Encrypted {
                kms,
                primary,
                dir,
                options,
            } => {
                let writer = DatasetWriter::create(kms, primary, dir, options).await?;
                let written = async {
                    let mut sinks = Vec::with_capacity(streams.len());
                    for i in 0..streams.len() {
                        sinks.push(writer.part(&part_name(i, "csv")).await?);
                    }
                    let results = write_all(streams, sinks, schema).await?;
                    let mut summary = WriteSummary::default();
                    let mut entries = Vec::with_capacity(results.len());
                    for (part, rows) in results {
                        let entry = part.finish().await?;
                        summary.rows += rows;
                        summary.parts += 1;
                        summary.plaintext_bytes += entry.plaintext_len;
                        entries.push(entry);
                    }
                    Ok::<_, EngineError>((summary, entries))
                }
                .await;
                match written {
                    Ok((summary, entries)) => {
                        writer.commit(entries).await?;
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
                if dir.exists() && !overwrite {
                    return Err(EngineError::OutputExists(dir.display().to_string()));
                }
                let temp = TempDir::create(temp_sibling(dir))?;
                let sinks = (0..streams.len())
                    .map(|i| {
                        let path = temp.0.join(format!("part-{i:05}.csv"));
                        File::create_new(&path)
                            .map(|f| CountingWriter::new(BufWriter::with_capacity(1 << 20, f)))
                            .map_err(|e| EngineError::io(&path, e))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let results = write_all(streams, sinks, schema).await?;
                let mut summary = WriteSummary::default();
                for (mut sink, rows) in results {
                    // Same durability as the encrypted path, which syncs every part.
                    sink.flush()
                        .and_then(|_| durability.sync(sink.inner.get_ref()))
                        .map_err(|e| EngineError::io(&temp.0, e))?;
                    summary.rows += rows;
                    summary.parts += 1;
                    summary.plaintext_bytes += sink.written;
                }
                replace_path(&temp.0, dir, overwrite, durability)?;
                temp.keep();
                Ok(summary)
            }
        }
    }
}

/// Refuses a dataset the query engine cannot read (only CSV is queryable).
fn only_csv(dataset: &VerifiedDataset) -> Result<()> {
    if dataset.manifest.media_type().starts_with("text/csv") {
        return Ok(());
    }
    Err(EngineError::UnsupportedMediaType {
        dataset: dataset.display.clone(),
        media_type: dataset.manifest.media_type().to_string(),
    })
}

struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path).map_err(|e| EngineError::io(&path, e))?;
        Ok(TempDir(path))
    }
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
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
}

#[async_trait::async_trait]
impl CsvSink for crate::dataset::PartWriter {
    async fn ready(&mut self) -> Result<()> {
        crate::dataset::PartWriter::ready(self).await
    }
}

impl<W: Write + Send> CsvSink for CountingWriter<W> {}

/// Drains every stream into its sink concurrently; on the first error the other writers are
/// cancelled (and dropped) and the error returned.
async fn write_all<W: CsvSink + 'static>(
    streams: Vec<SendableRecordBatchStream>,
    sinks: Vec<W>,
    schema: SchemaRef,
) -> Result<Vec<(W, u64)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (stream, sink)) in streams.into_iter().zip(sinks).enumerate() {
        let schema = schema.clone();
        tasks.spawn(async move { (index, write_partition(stream, sink, schema).await) });
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
    mut sink: W,
    schema: SchemaRef,
) -> Result<(W, u64)> {
    let mut rows = 0u64;
    let mut wrote_header = false;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        // One CSV writer per batch (it flushes at the end of each), so that the sink can
        // apply back-pressure between batches.
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
