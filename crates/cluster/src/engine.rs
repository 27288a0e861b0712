//! The executor's execution engine: every stage reads and writes encrypted shuffle files.
//!
//! Ballista hands each task a stage plan whose root is a shuffle writer and whose leaves are
//! scans or shuffle readers. [`PpmlExecutionEngine`] (docs/cluster.md §6.3) runs instead the
//! stage as the job's driver planned and signed it, restricted to the task's partitions
//! ([`crate::stages`]), checked against what an executor may run, with every
//! `ShuffleReaderExec` replaced by a [`PpmlShuffleReaderExec`] and the root writer by
//! [`PpmlQueryStage`], which writes one encrypted file per output partition. The job's shuffle
//! key is released from the KMS on the job's first task on this executor (see [`crate::job`]).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::JobId;
use ballista_core::execution_plans::sort_shuffle::SortShuffleWriterExec;
use ballista_core::execution_plans::{
    RangeShuffleReaderExec, RangeShuffleWriterExec, ShuffleReaderExec, ShuffleWriterExec,
    create_shuffle_path,
};
use ballista_core::serde::protobuf::ShuffleWritePartition;
use ballista_core::serde::scheduler::PartitionLocation;
use ballista_executor::execution_engine::{ExecutionEngine, QueryStageExecutor};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use datafusion::prelude::SessionConfig;
use futures::{StreamExt, TryStreamExt};
use ppml_kms::KeyManagementService;
use ppml_kms::grant::GrantRouter;

use crate::ClusterError;
use crate::driver::{DriverContext, DriverSpec, JobDriver, PpmlDriverExec};
use crate::flight::{EndpointCustomizer, FetchRequest, fetch_shuffle_file};
use crate::job::{JobKeys, JobSettings};
use crate::jobs::{DriverLog, JobsClient};
use crate::metrics::{ExecutorMetrics, ShuffleOrigin};
use crate::shuffle::{
    ExecutorAttestations, MapPartitions, MapPartitionsCheck, ShuffleFileId, ShuffleKey,
    read_shuffle_file_collecting, read_shuffle_stream_collecting, write_shuffle_file_attested,
};
use crate::stages::{Feeding, SignedStages, task_plan};

/// ppml's [`ExecutionEngine`]: encrypted shuffle, plan checks, keys from the KMS.
pub struct PpmlExecutionEngine {
    keys: Arc<JobKeys>,
    customizer: EndpointCustomizer,
    metrics: Option<Arc<ExecutorMetrics>>,
    drivers: Option<Arc<DriverHost>>,
    grants: Option<Arc<GrantRouter>>,
}

/// What an executor needs to run the driver tasks of cluster-mode jobs.
pub struct DriverHost {
    /// Runs the applications.
    pub driver: Arc<dyn JobDriver>,
    /// The scheduler, `host:port`.
    pub master: String,
    /// The executor's attested KMS client.
    pub kms: Arc<dyn KeyManagementService>,
    /// TLS of outgoing channels.
    pub customizer: EndpointCustomizer,
}

impl fmt::Debug for DriverHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverHost")
            .field("driver", &self.driver)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PpmlExecutionEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PpmlExecutionEngine")
            .finish_non_exhaustive()
    }
}

impl PpmlExecutionEngine {
    /// An engine releasing job keys through `keys` and fetching remote shuffle files with
    /// channels made by `customizer` (TLS).
    pub fn new(keys: Arc<JobKeys>, customizer: EndpointCustomizer) -> Self {
        PpmlExecutionEngine {
            keys,
            customizer,
            metrics: None,
            drivers: None,
            grants: None,
        }
    }

    /// Offers the job grant each task carries (`ppml.grant`) to `grants`, the router the
    /// executor's key requests go through.
    pub fn with_grants(mut self, grants: Arc<GrantRouter>) -> Self {
        self.grants = Some(grants);
        self
    }

    /// Runs the driver tasks of cluster-mode jobs with `host` (without it, they are refused).
    pub fn with_drivers(mut self, host: DriverHost) -> Self {
        self.drivers = Some(Arc::new(host));
        self
    }

    /// Counts tasks and shuffle rows and bytes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ExecutorMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

/// What an executor runs besides DataFusion's query operators
/// ([`ppml_engine::plan_check::QUERY_OPERATORS`]): Ballista's stage boundaries. Not the range
/// shuffles only Ballista's adaptive planner creates. User-defined functions cannot reach an
/// executor: the plan codec resolves functions in the executor's registry, which holds only
/// DataFusion's built-ins.
pub const SHUFFLE_OPERATORS: &[&str] = &[
    "ShuffleReaderExec",
    "ShuffleWriterExec",
    "SortShuffleWriterExec",
];

/// Refuses stage plans an executor must not run: operators that are neither query operators
/// nor in [`SHUFFLE_OPERATORS`], and scans of anything but ppml's decrypting store.
pub fn check_stage_plan(plan: &Arc<dyn ExecutionPlan>) -> Result<(), ClusterError> {
    ppml_engine::plan_check::check_operators(plan, SHUFFLE_OPERATORS).map_err(|e| match e {
        ppml_engine::EngineError::RefusedPlan(reason) => ClusterError::RefusedPlan(reason),
        other => ClusterError::RefusedPlan(other.to_string()),
    })?;
    let mut refused = None;
    plan.apply(|node| {
        let name = node.name();
        if node.is::<RangeShuffleReaderExec>() || node.is::<RangeShuffleWriterExec>() {
            refused = Some(format!("operator {name} is not allowed on a ppml executor"));
            return Ok(TreeNodeRecursion::Stop);
        }
        if let Some(scan) = node.downcast_ref::<DataSourceExec>()
            && let Some(files) = scan.data_source().downcast_ref::<FileScanConfig>()
        {
            let url = files.object_store_url.as_str();
            if !url.starts_with("ppml://") {
                refused = Some(format!(
                    "scan of {url}: executors read only ppml datasets (ppml:// URLs)"
                ));
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| ClusterError::RefusedPlan(e.to_string()))?;
    match refused {
        Some(reason) => Err(ClusterError::RefusedPlan(reason)),
        None => Ok(()),
    }
}

impl ExecutionEngine for PpmlExecutionEngine {
    fn create_query_stage_exec(
        &self,
        job_id: JobId,
        stage_id: usize,
        _task_id: usize,
        // Derived again from the signed stage and the task's partitions, not taken from the
        // scheduler (`stages::TaskPlan::output_partitions`).
        _global_output_partition_ids: Vec<usize>,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> Result<Arc<dyn QueryStageExecutor>> {
        let stage = self.create_stage(job_id, stage_id, plan, work_dir, config);
        // A task whose plan is refused (or whose settings are missing) fails here, before it
        // runs: count it with the tasks that fail while running.
        if stage.is_err()
            && let Some(metrics) = &self.metrics
        {
            metrics.task_finished(false);
        }
        stage
    }
}

impl PpmlExecutionEngine {
    fn create_stage(
        &self,
        job_id: JobId,
        stage_id: usize,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> Result<Arc<dyn QueryStageExecutor>> {
        if let Some(writer) = plan.downcast_ref::<ShuffleWriterExec>()
            && let Some(driver) = writer.children()[0].downcast_ref::<PpmlDriverExec>()
        {
            let Some(host) = &self.drivers else {
                return Err(ClusterError::RefusedPlan(
                    "this executor does not run cluster-mode drivers".into(),
                )
                .into());
            };
            return Ok(Arc::new(DriverStage {
                job_id,
                spec: driver.spec().clone(),
                host: host.clone(),
                metrics: self.metrics.clone(),
            }));
        }
        let settings = JobSettings::from_config(config)?;
        if settings.stages.is_none() {
            return Err(ClusterError::StagePlan(
                "the task carries no ppml.stages: its job's stages were not signed by a ppml \
                 driver"
                    .into(),
            )
            .into());
        }
        // The scheduler's plan is checked here for an early, clear refusal; the task runs the
        // signed stage (`PpmlQueryStage::run`).
        check_stage_plan(&plan)?;
        if !plan.is::<ShuffleWriterExec>() && !plan.is::<SortShuffleWriterExec>() {
            return Err(ClusterError::RefusedPlan(format!(
                "stage root {} is not a shuffle writer",
                plan.name()
            ))
            .into());
        }
        if let (Some(grant), Some(router)) = (&settings.grant, &self.grants) {
            router
                .offer(grant)
                .map_err(|e| ClusterError::JobSettings(format!("ppml.grant: {e}")))?;
        }
        Ok(Arc::new(PpmlQueryStage {
            job_id,
            stage_id,
            work_dir: PathBuf::from(work_dir),
            settings,
            keys: self.keys.clone(),
            received: plan,
            customizer: self.customizer.clone(),
            metrics: self.metrics.clone(),
        }))
    }
}

/// The writer of a task's output: its child's partitions and where each goes.
fn stage_output(
    plan: &Arc<dyn ExecutionPlan>,
    output_partitions: Vec<usize>,
) -> Result<StageOutput> {
    if plan.is::<ShuffleWriterExec>() {
        let child = plan.children()[0].clone();
        let partitions = child.output_partitioning().partition_count();
        if output_partitions.len() != partitions {
            return Err(ClusterError::StagePlan(format!(
                "the task's {partitions} partitions map to {} output partitions",
                output_partitions.len()
            ))
            .into());
        }
        Ok(StageOutput {
            child,
            partition_ids: output_partitions,
        })
    } else if let Some(writer) = plan.downcast_ref::<SortShuffleWriterExec>() {
        // Hash shuffle: all K buckets of this task's rows, one file each. DataFusion hashes
        // with a fixed seed, so every task and executor agrees on the buckets.
        let partitioning = writer.shuffle_output_partitioning().clone();
        let Partitioning::Hash(_, buckets) = partitioning else {
            return Err(ClusterError::RefusedPlan(format!(
                "sort shuffle with {partitioning} partitioning"
            ))
            .into());
        };
        let child: Arc<dyn ExecutionPlan> = Arc::new(RepartitionExec::try_new(
            plan.children()[0].clone(),
            partitioning,
        )?);
        Ok(StageOutput {
            child,
            partition_ids: (0..buckets).collect(),
        })
    } else {
        Err(ClusterError::RefusedPlan(format!(
            "stage root {} is not a shuffle writer",
            plan.name()
        ))
        .into())
    }
}

#[derive(Debug)]
struct StageOutput {
    /// Produces the stage's output partitions.
    child: Arc<dyn ExecutionPlan>,
    /// The global id of each of the child's output partitions.
    partition_ids: Vec<usize>,
}

/// Runs one task of a stage: writes each output partition to an encrypted shuffle file.
///
/// It reports row, batch and byte counts to the scheduler, as Ballista's writers do, but no
/// column statistics or operator metrics: those could carry values.
pub struct PpmlQueryStage {
    job_id: JobId,
    stage_id: usize,
    work_dir: PathBuf,
    settings: JobSettings,
    keys: Arc<JobKeys>,
    /// The scheduler's plan of the task: only its partitions and input lists are used.
    received: Arc<dyn ExecutionPlan>,
    customizer: EndpointCustomizer,
    metrics: Option<Arc<ExecutorMetrics>>,
}

impl fmt::Debug for PpmlQueryStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PpmlQueryStage")
            .field("job_id", &self.job_id.as_str())
            .field("stage_id", &self.stage_id)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for PpmlQueryStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PpmlQueryStage: job {} stage {}",
            self.job_id.as_str(),
            self.stage_id,
        )
    }
}

#[async_trait::async_trait]
impl QueryStageExecutor for PpmlQueryStage {
    async fn execute_query_stage(
        &self,
        task_id: usize,
        context: Arc<TaskContext>,
    ) -> Result<Vec<ShuffleWritePartition>> {
        let result = self.run(task_id, context).await;
        if let Some(metrics) = &self.metrics {
            metrics.task_finished(result.is_ok());
        }
        // The error leaves the executor (scheduler, submitter): no data in it.
        result.map_err(crate::redact::task_error)
    }

    fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
        Vec::new()
    }
}

impl PpmlQueryStage {
    /// The plan the task runs: the signed stage, restricted to the task's partitions, its
    /// readers replaced by ppml's (docs/cluster.md §6.6).
    fn plan(
        &self,
        key: &Arc<ShuffleKey>,
        context: &TaskContext,
        seen: &Arc<ExecutorAttestations>,
    ) -> Result<(StageOutput, MapPartitions)> {
        let text = self.settings.stages.as_deref().unwrap_or_default();
        let stages = SignedStages::verify(text, &self.settings.job_id, key)?;
        let signed = stages.stage(self.stage_id, context)?;
        let mut task = task_plan(self.stage_id, &signed, &self.received)?;
        check_stage_plan(&task.plan)?;
        // The wire form of a Parquet scan does not carry its decryption.
        task.plan = ppml_engine::pme::with_pme_factory(
            task.plan,
            context
                .runtime_env()
                .parquet_encryption_factory(ppml_engine::pme::FACTORY_ID)?,
        )?;
        let map_partitions = task.map_partitions();
        let output_partitions = task.output_partitions(&signed);
        let mut feedings: HashMap<usize, Arc<Feeding>> = HashMap::new();
        for reader in &task.readers {
            // The scheduler's lists of input files, checked once per task.
            check_partition_files(reader.stage_id, reader.broadcast, &reader.partition)?;
            if let std::collections::hash_map::Entry::Vacant(entry) =
                feedings.entry(reader.stage_id)
            {
                let producer = stages.stage(reader.stage_id, context)?;
                entry.insert(Arc::new(Feeding::of(reader.stage_id, &producer)?));
            }
        }
        // Leaves are visited left to right, the order `task.readers` is in.
        let mut inputs = task.readers.into_iter();
        let plan = task
            .plan
            .transform_up(|node| {
                let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() else {
                    return Ok(Transformed::no(node));
                };
                let input = inputs.next().ok_or_else(|| {
                    DataFusionError::Internal("fewer reader inputs than readers".into())
                })?;
                let reader = PpmlShuffleReaderExec {
                    stage_id: reader.stage_id,
                    job_id: self.job_id.as_str().to_string(),
                    partition: input.partition,
                    partition_ids: input.partition_ids,
                    broadcast: reader.broadcast,
                    properties: reader.properties().clone(),
                    work_dir: self.work_dir.clone(),
                    key: key.clone(),
                    feeding: feedings[&reader.stage_id].clone(),
                    customizer: self.customizer.clone(),
                    metrics: self.metrics.clone(),
                    seen: seen.clone(),
                };
                Ok(Transformed::yes(Arc::new(reader) as Arc<dyn ExecutionPlan>))
            })?
            .data;
        Ok((stage_output(&plan, output_partitions)?, map_partitions))
    }

    /// Runs the task: one encrypted shuffle file per output partition.
    async fn run(
        &self,
        task_id: usize,
        context: Arc<TaskContext>,
    ) -> Result<Vec<ShuffleWritePartition>> {
        let key = self.keys.get(&self.settings).await?;
        // Every file this task writes names this executor's attestation and those of the
        // files it read, so that the driver learns every executor of the job.
        let seen = Arc::new(ExecutorAttestations::default());
        let own = self
            .keys
            .kms()
            .receipt_attestation()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
            .map(|attestation| attestation.token);
        let (output, map_partitions) = self.plan(&key, &context, &seen)?;
        let mut writes = tokio::task::JoinSet::new();
        for (local, &global) in output.partition_ids.iter().enumerate() {
            let id = ShuffleFileId {
                job_id: self.job_id.as_str().to_string(),
                stage_id: self.stage_id as u32,
                partition_id: global as u32,
                file_id: task_id as u64,
            };
            let path = create_shuffle_path(
                &self.work_dir,
                &self.job_id,
                self.stage_id,
                global,
                Some(task_id as u64),
                false,
            )?;
            let stream = output.child.execute(local, context.clone())?;
            let key = key.clone();
            let metrics = self.metrics.clone();
            let map_partitions = map_partitions.clone();
            let attestations: crate::shuffle::AttestationsAtEnd = {
                let (seen, own) = (seen.clone(), own.clone());
                Box::new(move || own.into_iter().chain(seen.tokens()).collect())
            };
            writes.spawn(async move {
                let stats = write_shuffle_file_attested(
                    stream,
                    &path,
                    &id,
                    &key,
                    &map_partitions,
                    attestations,
                )
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
                if let Some(metrics) = metrics {
                    metrics.shuffle_file_written(stats.num_rows, stats.num_bytes);
                }
                Ok::<_, DataFusionError>(ShuffleWritePartition {
                    partition_id: global as u64,
                    num_batches: stats.num_batches,
                    num_rows: stats.num_rows,
                    num_bytes: stats.num_bytes,
                    file_id: Some(task_id as u64),
                    is_sort_shuffle: false,
                })
            });
        }
        let mut written = Vec::with_capacity(writes.len());
        while let Some(joined) = writes.join_next().await {
            match joined {
                Ok(Ok(partition)) => written.push(partition),
                Ok(Err(e)) => {
                    writes.abort_all();
                    return Err(e);
                }
                Err(e) => {
                    writes.abort_all();
                    return Err(DataFusionError::External(Box::new(e)));
                }
            }
        }
        written.sort_by_key(|p| p.partition_id);
        Ok(written)
    }
}

/// The one task of a cluster-mode job: runs the application with the executor's
/// [`JobDriver`]. It writes no shuffle file (nobody reads the driver job's output) and reports
/// one empty partition.
struct DriverStage {
    job_id: JobId,
    spec: DriverSpec,
    host: Arc<DriverHost>,
    metrics: Option<Arc<ExecutorMetrics>>,
}

impl fmt::Debug for DriverStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverStage")
            .field("job_id", &self.job_id.as_str())
            .field("summary", &self.spec.summary)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DriverStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DriverStage: job {}: {}",
            self.job_id.as_str(),
            self.spec.summary
        )
    }
}

#[async_trait::async_trait]
impl QueryStageExecutor for DriverStage {
    async fn execute_query_stage(
        &self,
        task_id: usize,
        _context: Arc<TaskContext>,
    ) -> Result<Vec<ShuffleWritePartition>> {
        let jobs = match crate::client::scheduler_channel(&self.host.master, &self.host.customizer)
            .await
        {
            Ok(channel) => Some(JobsClient::new(channel)),
            Err(e) => {
                tracing::warn!("job log unavailable: {e}");
                None
            }
        };
        let log = DriverLog::new(self.job_id.as_str(), jobs);
        log.line(format!("driver started: {}", self.spec.summary))
            .await;
        let context = DriverContext {
            master: self.host.master.clone(),
            kms: self.host.kms.clone(),
            customizer: self.host.customizer.clone(),
            log: log.clone(),
        };
        let result = self.host.driver.run(&self.spec, context).await;
        if let Some(metrics) = &self.metrics {
            metrics.task_finished(result.is_ok());
        }
        match result {
            Ok(()) => {
                log.line("driver finished").await;
                Ok(vec![ShuffleWritePartition {
                    partition_id: 0,
                    num_batches: 0,
                    num_rows: 0,
                    num_bytes: 0,
                    file_id: Some(task_id as u64),
                    is_sort_shuffle: false,
                }])
            }
            Err(error) => {
                // The job log and the scheduler are outside the TEE: no data in the message.
                let message = crate::redact::driver_error_text(&error);
                log.line(format!("driver failed: {message}")).await;
                // An execution error (not an I/O error): Ballista fails the job instead of
                // running the driver again.
                Err(DataFusionError::Execution(message))
            }
        }
    }

    fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
        Vec::new()
    }
}

/// Reads a shuffle stage's output: local files directly, other executors' files through
/// ppml's Flight action, always decrypting with the job key and checking each file's place in
/// the job (docs/cluster.md §6.4). Same partition semantics as Ballista's `ShuffleReaderExec`.
pub struct PpmlShuffleReaderExec {
    stage_id: usize,
    job_id: String,
    partition: Vec<Vec<PartitionLocation>>,
    /// The producing stage's output partition each list holds (all of them, in the one list,
    /// for a broadcast).
    partition_ids: Vec<usize>,
    broadcast: bool,
    properties: Arc<PlanProperties>,
    work_dir: PathBuf,
    key: Arc<ShuffleKey>,
    /// Which of the producing stage's map partitions each list must cover.
    feeding: Arc<Feeding>,
    customizer: EndpointCustomizer,
    metrics: Option<Arc<ExecutorMetrics>>,
    /// The attestations of the files this task read (for the trailers of the files it writes).
    seen: Arc<ExecutorAttestations>,
}

impl fmt::Debug for PpmlShuffleReaderExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PpmlShuffleReaderExec")
            .field("stage_id", &self.stage_id)
            .field("job_id", &self.job_id)
            .field("partitions", &self.partition.len())
            .field("broadcast", &self.broadcast)
            .finish_non_exhaustive()
    }
}

impl DisplayAs for PpmlShuffleReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "PpmlShuffleReaderExec: stage {}, partitioning {}",
            self.stage_id,
            self.properties.output_partitioning()
        )
    }
}

impl ExecutionPlan for PpmlShuffleReaderExec {
    fn name(&self) -> &str {
        "PpmlShuffleReaderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "PpmlShuffleReaderExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let index = if self.broadcast { 0 } else { partition };
        let locations = self.partition.get(index).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "shuffle reader of stage {} has no partition {index}",
                self.stage_id
            ))
        })?;
        let key = self.key.clone();
        let outputs = if self.broadcast {
            self.partition_ids.clone()
        } else {
            vec![self.partition_ids.get(index).copied().ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "shuffle reader of stage {} has no partition id {index}",
                    self.stage_id
                ))
            })?]
        };
        // Each file's map partitions are checked as it opens; the cover of the stage after
        // the last one.
        let coverage = self.feeding.coverage(outputs);
        let checks = coverage.clone();
        let schema = self.schema();
        let work_dir = self.work_dir.clone();
        let job_id = self.job_id.clone();
        let customizer = self.customizer.clone();
        let metrics = self.metrics.clone();
        let seen = self.seen.clone();
        let files = futures::stream::iter(locations)
            .then(move |location| {
                let check = checks.file_check(location.partition_id.partition_id);
                let source = ShuffleSource {
                    job_id: job_id.clone(),
                    location,
                    metrics: metrics.clone(),
                };
                source.open(
                    Some(work_dir.clone()),
                    key.clone(),
                    schema.clone(),
                    customizer.clone(),
                    check,
                    Some(seen.clone()),
                )
            })
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            coverage.ending(files),
        )))
    }
}

/// Refuses shuffle reader inputs (lists from the scheduler, outside the TEE) that read a file
/// twice, a file of another stage than `stage_id`, or (unless the reader is a broadcast,
/// which reads every partition) mix partitions: each of the reader's partitions reads files
/// of one partition of the stage, and no two of them the same one. A task's reader holds a
/// slice of the stage's partitions, so the check is on the lists as a whole, not on their
/// positions. Each file's header already binds it to the place its location names
/// ([`ShuffleFileId`]); this keeps a file's rows from being read twice, or another stage's or
/// partition's rows from being read in place of the right ones.
pub(crate) fn check_partition_files(
    stage_id: usize,
    broadcast: bool,
    partitions: &[Vec<PartitionLocation>],
) -> std::result::Result<(), ClusterError> {
    let refused = |reason: String| Err(ClusterError::ShuffleFiles(reason));
    let mut files = std::collections::HashSet::new();
    let mut readers_of = std::collections::HashMap::new();
    for (index, locations) in partitions.iter().enumerate() {
        for location in locations {
            let place = &location.partition_id;
            if place.stage_id != stage_id {
                return refused(format!(
                    "a file of stage {} in the input of stage {stage_id}",
                    place.stage_id
                ));
            }
            if !files.insert((place.partition_id, location.file_id)) {
                return refused(format!(
                    "stage {stage_id} partition {} file {:?} listed twice",
                    place.partition_id, location.file_id
                ));
            }
            if broadcast {
                continue;
            }
            match readers_of.insert(place.partition_id, index) {
                Some(other) if other != index => {
                    return refused(format!(
                        "stage {stage_id} partition {} read by two partitions of the reader",
                        place.partition_id
                    ));
                }
                _ => {}
            }
        }
        if !broadcast
            && let Some(first) = locations.first()
            && locations
                .iter()
                .any(|l| l.partition_id.partition_id != first.partition_id.partition_id)
        {
            return refused(format!(
                "one partition of the reader of stage {stage_id} reads several of its partitions"
            ));
        }
    }
    Ok(())
}

/// One shuffle file a reader needs.
pub(crate) struct ShuffleSource {
    pub(crate) job_id: String,
    pub(crate) location: PartitionLocation,
    /// Counts rows read and bytes fetched (executors; None at the driver).
    pub(crate) metrics: Option<Arc<ExecutorMetrics>>,
}

impl ShuffleSource {
    /// The file's place in the job, which its header must match.
    pub(crate) fn file_id(&self) -> Result<ShuffleFileId> {
        let file_id = self.location.file_id.ok_or_else(|| {
            DataFusionError::Internal("a ppml shuffle location always has a file id".into())
        })?;
        if self.location.partition_id.job_id.as_str() != self.job_id {
            return Err(DataFusionError::Internal(format!(
                "shuffle location of job {} in job {}",
                self.location.partition_id.job_id.as_str(),
                self.job_id
            )));
        }
        Ok(ShuffleFileId {
            job_id: self.job_id.clone(),
            stage_id: self.location.partition_id.stage_id as u32,
            partition_id: self.location.partition_id.partition_id as u32,
            file_id,
        })
    }

    /// Opens the file: from `work_dir` when this process wrote it, else from its executor.
    pub(crate) async fn open(
        self,
        work_dir: Option<PathBuf>,
        key: Arc<ShuffleKey>,
        schema: datafusion::arrow::datatypes::SchemaRef,
        customizer: EndpointCustomizer,
        check: MapPartitionsCheck,
        seen: Option<Arc<ExecutorAttestations>>,
    ) -> Result<SendableRecordBatchStream> {
        let id = self.file_id()?;
        if let Some(work_dir) = work_dir {
            let path = self.location.path(work_dir.to_string_lossy().as_ref())?;
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                let stream = read_shuffle_file_collecting(&path, id, key, schema, check, seen)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                return Ok(match &self.metrics {
                    Some(metrics) => metrics.count_shuffle_rows(ShuffleOrigin::Local, stream),
                    None => stream,
                });
            }
        }
        let executor = &self.location.executor_meta;
        let request = FetchRequest {
            job_id: id.job_id.clone(),
            stage_id: id.stage_id,
            partition_id: id.partition_id,
            file_id: id.file_id,
        };
        // Reported as Ballista's FetchFailed, so the scheduler recomputes the map output that
        // was on a lost executor instead of failing the job.
        let source = fetch_shuffle_file(&executor.host, executor.port, &request, &customizer)
            .await
            .map_err(|e| {
                DataFusionError::External(Box::new(
                    ballista_core::error::BallistaError::FetchFailed(
                        executor.id.clone(),
                        self.location.partition_id.stage_id,
                        self.location.partition_id.partition_id,
                        e.to_string(),
                    ),
                ))
            })?;
        let display = format!(
            "{}:{} job {} stage {} partition {} file {}",
            executor.host, executor.port, id.job_id, id.stage_id, id.partition_id, id.file_id
        );
        Ok(match &self.metrics {
            Some(metrics) => {
                let source = metrics.count_fetched_bytes(source);
                let stream =
                    read_shuffle_stream_collecting(source, display, id, key, schema, check, seen);
                metrics.count_shuffle_rows(ShuffleOrigin::Remote, stream)
            }
            None => read_shuffle_stream_collecting(source, display, id, key, schema, check, seen),
        })
    }
}

#[cfg(test)]
mod tests {
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::prelude::{CsvReadOptions, SessionContext};

    use super::*;

    async fn plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn queries_pass_and_other_plans_are_refused() {
        let ctx = SessionContext::new();
        for sql in [
            "SELECT 1 + 1",
            "SELECT column1, count(*) FROM (VALUES (1), (2), (2)) GROUP BY column1 ORDER BY 2",
            "SELECT * FROM (VALUES (1)) a JOIN (VALUES (1)) b ON a.column1 = b.column1",
            "SELECT column1, rank() OVER (ORDER BY column1) FROM (VALUES (1), (2)) \
             ORDER BY column1 DESC LIMIT 1",
        ] {
            check_stage_plan(&plan(&ctx, sql).await).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let explain = check_stage_plan(&plan(&ctx, "EXPLAIN SELECT 1").await).unwrap_err();
        assert!(
            explain.to_string().contains("operator ExplainExec"),
            "{explain}"
        );

        // A scan of a plain file, not through ppml's store.
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("t.csv");
        std::fs::write(&csv, "a\n1\n").unwrap();
        ctx.register_csv("t", csv.to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        let scan = check_stage_plan(&plan(&ctx, "SELECT a FROM t").await).unwrap_err();
        assert!(scan.to_string().contains("file://"), "{scan}");

        // A driver node anywhere but as the whole stage of a driver job.
        let app = ppml_engine::app::AppSpec::Sql(ppml_engine::app::SqlSpec {
            sql: "SELECT 1".into(),
            tables: Default::default(),
            output: Some("/out".parse().unwrap()),
            input_partitions: None,
            output_partitions: None,
            output_format: Default::default(),
            overwrite: false,
            plaintext: false,
        });
        let driver: Arc<dyn ExecutionPlan> =
            Arc::new(PpmlDriverExec::new(DriverSpec::new(&app).unwrap()));
        let wrapped: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(driver));
        let refused = check_stage_plan(&wrapped).unwrap_err();
        assert!(refused.to_string().contains("PpmlDriverExec"), "{refused}");
    }
}
