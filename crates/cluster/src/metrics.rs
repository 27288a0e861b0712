//! Prometheus metrics of the scheduler and the executors (docs/cluster.md §10).
//!
//! Every process keeps its metrics in a `prometheus-client` registry of its own (no global
//! registry, so several schedulers and executors can run in one test process) and serves them
//! with [`serve`]: `GET /metrics` in the Prometheus text format (0.0.4) and `GET /healthz`.
//!
//! - [`ExecutorMetrics`] (`ppml_executor_*`): tasks by outcome, encrypted shuffle rows and
//!   bytes written, shuffle rows read and ciphertext bytes fetched from other executors,
//!   plaintext bytes decrypted from input datasets ([`CountingStore`]), key releases by kind
//!   and outcome ([`CountingKms`]) and attestations by outcome.
//! - [`SchedulerMetrics`] (`ppml_scheduler_*`): Ballista's [`SchedulerMetricsCollector`]
//!   (jobs by state, job planning and execution times) plus pending tasks, running jobs and
//!   alive executors, read from the scheduler state at every scrape ([`SchedulerSource`]).
//!
//! **Counts only.** Every metric is a count, a size or a duration, and every label value is a
//! fixed word (an outcome, a state, a kind, a source): never a row value, a key (plain or
//! wrapped), a path, a job id or an executor id. Row and byte counts are what the scheduler
//! already sees for every task (docs/cluster.md §1). That is why the metrics server speaks
//! plain HTTP and binds to a configurable address, loopback by default: it carries nothing
//! that the cluster's mutual TLS protects.

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ballista_core::JobId;
use ballista_core::serde::protobuf::executor_status;
use ballista_scheduler::metrics::SchedulerMetricsCollector;
use ballista_scheduler::state::SchedulerState;
use bytes::Bytes;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion_proto::logical_plan::AsLogicalPlan;
use datafusion_proto::physical_plan::AsExecutionPlan;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use ppml_format::{DataKey, KeyReference};
use ppml_kms::{KeyManagementService, KmsError, PrimaryKeyId};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The metric families an executor exposes, as they appear in `/metrics`.
pub const EXECUTOR_METRICS: &[&str] = &[
    "ppml_executor_tasks_total",
    "ppml_executor_shuffle_rows_written_total",
    "ppml_executor_shuffle_bytes_written_total",
    "ppml_executor_shuffle_rows_read_total",
    "ppml_executor_shuffle_bytes_fetched_total",
    "ppml_executor_input_bytes_decrypted_total",
    "ppml_executor_key_releases_total",
    "ppml_executor_attestations_total",
];

/// The metric families the scheduler exposes, as they appear in `/metrics` (histograms as
/// their base name: the series are `<name>_bucket`, `<name>_sum` and `<name>_count`).
pub const SCHEDULER_METRICS: &[&str] = &[
    "ppml_scheduler_jobs_total",
    "ppml_scheduler_pending_tasks",
    "ppml_scheduler_running_jobs",
    "ppml_scheduler_executors",
    "ppml_scheduler_job_planning_time_seconds",
    "ppml_scheduler_job_exec_time_seconds",
];

/// The histograms among [`SCHEDULER_METRICS`].
pub const HISTOGRAMS: &[&str] = &[
    "ppml_scheduler_job_planning_time_seconds",
    "ppml_scheduler_job_exec_time_seconds",
];

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Outcome label of a task, key release or attestation that succeeded.
pub const OK: &str = "ok";
/// Outcome label of a key release or attestation the KMS refused.
pub const REFUSED: &str = "refused";
/// Outcome label of a key release that failed for another reason (KMS unreachable, …).
pub const ERROR: &str = "error";

/// Which key an executor released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A job's shuffle key (`crate::job::JobKeys`).
    Shuffle,
    /// An input dataset's data key (the decrypting store opening a dataset).
    Dataset,
}

impl KeyKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Shuffle => "shuffle",
            KeyKind::Dataset => "dataset",
        }
    }
}

/// Where a shuffle reader got a file from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShuffleOrigin {
    /// This executor's work dir.
    Local,
    /// Another executor, through the Flight fetch action.
    Remote,
}

impl ShuffleOrigin {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShuffleOrigin::Local => "local",
            ShuffleOrigin::Remote => "remote",
        }
    }
}

/// Renders metrics for [`serve`].
#[async_trait]
pub trait MetricsSource: Send + Sync + 'static {
    /// The metrics in the Prometheus text format (0.0.4).
    async fn render(&self) -> Result<String, fmt::Error>;
}

fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// An executor's metrics (`ppml_executor_*`).
pub struct ExecutorMetrics {
    registry: Registry,
    tasks: Family<Labels<1>, Counter>,
    shuffle_rows_written: Counter,
    shuffle_bytes_written: Counter,
    shuffle_rows_read: Family<Labels<1>, Counter>,
    shuffle_bytes_fetched: Counter,
    input_bytes_decrypted: Counter,
    key_releases: Family<Labels<2>, Counter>,
    attestations: Family<Labels<1>, Counter>,
}

impl fmt::Debug for ExecutorMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorMetrics").finish_non_exhaustive()
    }
}

impl Default for ExecutorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ExecutorMetrics {
    /// Metrics at zero, every label combination present (so that `rate()` starts at once).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tasks = Family::<Labels<1>, Counter>::default();
        let shuffle_rows_written = Counter::default();
        let shuffle_bytes_written = Counter::default();
        let shuffle_rows_read = Family::<Labels<1>, Counter>::default();
        let shuffle_bytes_fetched = Counter::default();
        let input_bytes_decrypted = Counter::default();
        let key_releases = Family::<Labels<2>, Counter>::default();
        let attestations = Family::<Labels<1>, Counter>::default();
        registry.register(
            "ppml_executor_tasks",
            "Tasks (stage partitions) run by this executor, by outcome (succeeded, failed)",
            tasks.clone(),
        );
        registry.register(
            "ppml_executor_shuffle_rows_written",
            "Rows written to encrypted shuffle files",
            shuffle_rows_written.clone(),
        );
        registry.register(
            "ppml_executor_shuffle_bytes_written",
            "Bytes of encrypted shuffle files written (ciphertext file sizes)",
            shuffle_bytes_written.clone(),
        );
        registry.register(
            "ppml_executor_shuffle_rows_read",
            "Rows decrypted from shuffle files, by source (local work dir or remote executor)",
            shuffle_rows_read.clone(),
        );
        registry.register(
            "ppml_executor_shuffle_bytes_fetched",
            "Bytes of encrypted shuffle files fetched from other executors (ciphertext)",
            shuffle_bytes_fetched.clone(),
        );
        registry.register(
            "ppml_executor_input_bytes_decrypted",
            "Plaintext bytes decrypted from input datasets (ppml://fs)",
            input_bytes_decrypted.clone(),
        );
        registry.register(
            "ppml_executor_key_releases",
            "Data keys released by the KMS, by kind (shuffle, dataset) and outcome (ok, refused, \
             error)",
            key_releases.clone(),
        );
        registry.register(
            "ppml_executor_attestations",
            "Attestations of this executor to the KMS, by outcome (ok; refused: a re-attestation \
             refused during a key release)",
            attestations.clone(),
        );
        for outcome in ["succeeded", "failed"] {
            let _ = tasks.get_or_create(&[("outcome", outcome)]);
        }
        for origin in [ShuffleOrigin::Local, ShuffleOrigin::Remote] {
            let _ = shuffle_rows_read.get_or_create(&[("source", origin.as_str())]);
        }
        for kind in [KeyKind::Shuffle, KeyKind::Dataset] {
            for outcome in [OK, REFUSED, ERROR] {
                let _ =
                    key_releases.get_or_create(&[("kind", kind.as_str()), ("outcome", outcome)]);
            }
        }
        for outcome in [OK, REFUSED] {
            let _ = attestations.get_or_create(&[("outcome", outcome)]);
        }
        ExecutorMetrics {
            registry,
            tasks,
            shuffle_rows_written,
            shuffle_bytes_written,
            shuffle_rows_read,
            shuffle_bytes_fetched,
            input_bytes_decrypted,
            key_releases,
            attestations,
        }
    }

    /// Counts a finished task.
    pub fn task_finished(&self, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.tasks.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Counts one encrypted shuffle file written: its rows and its size on disk.
    pub fn shuffle_file_written(&self, rows: u64, ciphertext_bytes: u64) {
        self.shuffle_rows_written.inc_by(rows);
        self.shuffle_bytes_written.inc_by(ciphertext_bytes);
    }

    /// Counts the rows of `stream` (decrypted shuffle batches from `origin`) as they pass.
    pub fn count_shuffle_rows(
        &self,
        origin: ShuffleOrigin,
        stream: SendableRecordBatchStream,
    ) -> SendableRecordBatchStream {
        let counter = self
            .shuffle_rows_read
            .get_or_create(&[("source", origin.as_str())])
            .clone();
        let schema = stream.schema();
        Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.inspect_ok(move |batch| {
                counter.inc_by(batch.num_rows() as u64);
            }),
        ))
    }

    /// Counts the bytes read from `source` (a shuffle file arriving from another executor).
    pub fn count_fetched_bytes(&self, source: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        Box::new(CountingRead {
            inner: source,
            counter: self.shuffle_bytes_fetched.clone(),
        })
    }

    /// Counts a key release.
    pub fn key_release(&self, kind: KeyKind, outcome: &'static str) {
        self.key_releases
            .get_or_create(&[("kind", kind.as_str()), ("outcome", outcome)])
            .inc();
    }

    /// Counts an attestation ([`OK`] or [`REFUSED`]).
    pub fn attestation(&self, outcome: &'static str) {
        self.attestations
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// The counter of plaintext bytes decrypted from input datasets (for [`CountingStore`]).
    pub fn input_bytes_counter(&self) -> Counter {
        self.input_bytes_decrypted.clone()
    }

    /// The metrics in the Prometheus text format (0.0.4).
    pub fn render(&self) -> Result<String, fmt::Error> {
        encode(&self.registry)
    }
}

#[async_trait]
impl MetricsSource for ExecutorMetrics {
    async fn render(&self) -> Result<String, fmt::Error> {
        ExecutorMetrics::render(self)
    }
}

struct CountingRead {
    inner: Box<dyn Read + Send>,
    counter: Counter,
}

impl Read for CountingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.inc_by(n as u64);
        Ok(n)
    }
}

/// The outcome label of a KMS answer.
fn kms_outcome<T>(result: &Result<T, KmsError>) -> &'static str {
    match result {
        Ok(_) => OK,
        Err(e) if e.is_access_denied() => REFUSED,
        Err(_) => ERROR,
    }
}

/// A [`KeyManagementService`] that counts the data keys its inner KMS releases
/// (`unwrap_data_key`) in [`ExecutorMetrics`], as keys of one [`KeyKind`]. A release refused
/// because a re-attestation failed also counts as a refused attestation.
pub struct CountingKms {
    inner: Arc<dyn KeyManagementService>,
    kind: KeyKind,
    metrics: Arc<ExecutorMetrics>,
}

impl CountingKms {
    /// Counts the releases of `inner` as `kind` keys.
    pub fn new(
        inner: Arc<dyn KeyManagementService>,
        kind: KeyKind,
        metrics: Arc<ExecutorMetrics>,
    ) -> Self {
        CountingKms {
            inner,
            kind,
            metrics,
        }
    }
}

impl fmt::Debug for CountingKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingKms")
            .field("inner", &self.inner)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyManagementService for CountingKms {
    fn kms_id(&self) -> &str {
        self.inner.kms_id()
    }

    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
        self.inner.create_primary_key().await
    }

    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError> {
        self.inner.generate_data_key(primary, aad).await
    }

    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        let result = self.inner.unwrap_data_key(key, aad).await;
        self.metrics.key_release(self.kind, kms_outcome(&result));
        if let Err(KmsError::Attestation(_)) = &result {
            self.metrics.attestation(REFUSED);
        }
        result
    }

    async fn unwrap_foreign_key(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
        let result = self.inner.unwrap_foreign_key(key_id, ciphertext, aad).await;
        self.metrics.key_release(self.kind, kms_outcome(&result));
        result
    }

    fn under_grant(
        self: Arc<Self>,
        grant: &ppml_kms::grant::SignedGrant,
    ) -> Result<Arc<dyn KeyManagementService>, KmsError> {
        Ok(Arc::new(CountingKms {
            inner: self.inner.clone().under_grant(grant)?,
            kind: self.kind,
            metrics: self.metrics.clone(),
        }))
    }

    fn check_version(
        &self,
        dataset_id: &[u8; 16],
        manifest_sha256: &[u8; 32],
    ) -> Result<(), KmsError> {
        self.inner.check_version(dataset_id, manifest_sha256)
    }

    async fn receipt_attestation(&self) -> Result<Option<ppml_kms::ReceiptAttestation>, KmsError> {
        self.inner.receipt_attestation().await
    }

    fn sign_receipt(&self, message: &[u8]) -> Option<Vec<u8>> {
        self.inner.sign_receipt(message)
    }

    fn job_grant(&self) -> Option<ppml_kms::GrantRecord> {
        self.inner.job_grant()
    }
}

/// An [`ObjectStore`] that counts the bytes its inner store returns from reads: wrapped around
/// the executor's decrypting `ppml://fs` store, the plaintext bytes decrypted from input
/// datasets. Everything else is passed through unchanged.
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    bytes: Counter,
}

impl CountingStore {
    /// Counts the bytes read from `inner` in `bytes`.
    pub fn new(inner: Arc<dyn ObjectStore>, bytes: Counter) -> Self {
        CountingStore { inner, bytes }
    }
}

impl fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let mut result = self.inner.get_opts(location, options).await?;
        let counter = self.bytes.clone();
        result.payload = match result.payload {
            GetResultPayload::Stream(stream) => GetResultPayload::Stream(
                stream
                    .inspect_ok(move |bytes| {
                        counter.inc_by(bytes.len() as u64);
                    })
                    .boxed(),
            ),
            // A file handed out as is (not the decrypting store's case): its bytes are read
            // by the caller, unseen by this store.
            other => other,
        };
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let parts = self.inner.get_ranges(location, ranges).await?;
        self.bytes
            .inc_by(parts.iter().map(|b| b.len() as u64).sum::<u64>());
        Ok(parts)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// The scheduler's metrics (`ppml_scheduler_*`): Ballista reports job events through
/// [`SchedulerMetricsCollector`]; the gauges are read from the scheduler state at every scrape
/// ([`SchedulerMetrics::refresh`]).
pub struct SchedulerMetrics {
    registry: Registry,
    jobs: Family<Labels<1>, Counter>,
    pending_tasks: Gauge,
    running_jobs: Gauge,
    executors: Gauge,
    planning_time: Histogram,
    exec_time: Histogram,
}

impl fmt::Debug for SchedulerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchedulerMetrics").finish_non_exhaustive()
    }
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Job states counted in `ppml_scheduler_jobs_total`.
const JOB_STATES: [&str; 4] = ["submitted", "completed", "failed", "cancelled"];

impl SchedulerMetrics {
    /// Metrics at zero, every job state present.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let jobs = Family::<Labels<1>, Counter>::default();
        let pending_tasks = Gauge::default();
        let running_jobs = Gauge::default();
        let executors = Gauge::default();
        let planning_time = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let exec_time = Histogram::new([
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
        ]);
        registry.register(
            "ppml_scheduler_jobs",
            "Jobs by state: submitted (planned and ready to run), completed, failed, cancelled",
            jobs.clone(),
        );
        registry.register(
            "ppml_scheduler_pending_tasks",
            "Tasks of running jobs that are ready to run but not yet given to an executor",
            pending_tasks.clone(),
        );
        registry.register(
            "ppml_scheduler_running_jobs",
            "Jobs running now",
            running_jobs.clone(),
        );
        registry.register(
            "ppml_scheduler_executors",
            "Executors alive (polled within the executor timeout)",
            executors.clone(),
        );
        registry.register_with_unit(
            "ppml_scheduler_job_planning_time",
            "Time from a job's arrival to its submission (planning into stages)",
            Unit::Seconds,
            planning_time.clone(),
        );
        registry.register_with_unit(
            "ppml_scheduler_job_exec_time",
            "Time from a job's arrival to its successful completion",
            Unit::Seconds,
            exec_time.clone(),
        );
        for state in JOB_STATES {
            let _ = jobs.get_or_create(&[("state", state)]);
        }
        SchedulerMetrics {
            registry,
            jobs,
            pending_tasks,
            running_jobs,
            executors,
            planning_time,
            exec_time,
        }
    }

    fn job(&self, state: &'static str) {
        self.jobs.get_or_create(&[("state", state)]).inc();
    }

    /// Reads the gauges from the scheduler state: running jobs, their pending tasks and the
    /// executors alive.
    pub async fn refresh<T: 'static + AsLogicalPlan, U: 'static + AsExecutionPlan>(
        &self,
        state: &SchedulerState<T, U>,
    ) {
        let running = state.task_manager.get_running_job_cache();
        let mut pending = 0usize;
        for job_id in running.keys() {
            pending += state
                .task_manager
                .get_available_task_count(job_id)
                .await
                .unwrap_or(0);
        }
        self.running_jobs.set(gauge_value(running.len()));
        self.pending_tasks.set(gauge_value(pending));

        let timeout = state.config.executor_timeout_seconds;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let executors = state
            .executor_manager
            .get_executors_state()
            .await
            .unwrap_or_default();
        let alive = executors
            .iter()
            .filter(|(metadata, ..)| {
                state
                    .executor_manager
                    .get_executor_hearbeat(&metadata.id)
                    .is_some_and(|heartbeat| {
                        // Pull-staged executors' polls record no status; an explicit one must
                        // be Active.
                        let active = matches!(
                            heartbeat.status.as_ref().and_then(|s| s.status.as_ref()),
                            None | Some(executor_status::Status::Active(_))
                        );
                        active && heartbeat.timestamp + timeout > now
                    })
            })
            .count();
        self.executors.set(gauge_value(alive));
    }

    /// The metrics in the Prometheus text format (0.0.4), gauges as last refreshed.
    pub fn render(&self) -> Result<String, fmt::Error> {
        encode(&self.registry)
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn seconds_between(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

impl SchedulerMetricsCollector for SchedulerMetrics {
    fn record_submitted(&self, _job_id: &JobId, queued_at: u64, submitted_at: u64) {
        self.job("submitted");
        self.planning_time
            .observe(seconds_between(queued_at, submitted_at));
    }

    fn record_completed(&self, _job_id: &JobId, queued_at: u64, completed_at: u64) {
        self.job("completed");
        self.exec_time
            .observe(seconds_between(queued_at, completed_at));
    }

    fn record_failed(&self, _job_id: &JobId, _queued_at: u64, _failed_at: u64) {
        self.job("failed");
    }

    fn record_cancelled(&self, _job_id: &JobId) {
        self.job("cancelled");
    }

    // Ballista 55 does not call this (the gauge is read from the state at every scrape
    // instead); kept correct should a later version start to.
    fn set_pending_tasks_queue_size(&self, value: u64) {
        self.pending_tasks
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    fn gather_metrics(&self) -> ballista_core::error::Result<Option<(Vec<u8>, String)>> {
        let text = self
            .render()
            .map_err(|e| ballista_core::error::BallistaError::Internal(e.to_string()))?;
        Ok(Some((
            text.into_bytes(),
            prometheus_text::CONTENT_TYPE.to_string(),
        )))
    }
}

/// The scheduler's [`MetricsSource`]: refreshes the gauges from the state, then renders.
pub struct SchedulerSource<T: 'static + AsLogicalPlan, U: 'static + AsExecutionPlan> {
    metrics: Arc<SchedulerMetrics>,
    state: Arc<SchedulerState<T, U>>,
}

impl<T: 'static + AsLogicalPlan, U: 'static + AsExecutionPlan> SchedulerSource<T, U> {
    /// Metrics of the scheduler whose state is `state`.
    pub fn new(metrics: Arc<SchedulerMetrics>, state: Arc<SchedulerState<T, U>>) -> Self {
        SchedulerSource { metrics, state }
    }
}

#[async_trait]
impl<T: 'static + AsLogicalPlan, U: 'static + AsExecutionPlan> MetricsSource
    for SchedulerSource<T, U>
{
    async fn render(&self) -> Result<String, fmt::Error> {
        self.metrics.refresh(&self.state).await;
        self.metrics.render()
    }
}

/// Serves `GET /metrics` (from `source`) and `GET /healthz` on `listener`, in plain HTTP (see
/// the module documentation for why), until the returned future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn MetricsSource>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(handle_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(source);
    axum::serve(listener, app).await
}

async fn handle_metrics(State(source): State<Arc<dyn MetricsSource>>) -> Response {
    match source.render().await {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Binds a metrics listener for `addr` (`HOST:PORT`; port 0 picks a free port).
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Spawns [`serve`] on `listener`; the server stops when the returned guard is dropped.
pub fn spawn_server(
    listener: tokio::net::TcpListener,
    source: Arc<dyn MetricsSource>,
) -> ServerGuard {
    let address = listener.local_addr().ok();
    let task = tokio::spawn(async move {
        if let Err(e) = serve(listener, source).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    if let Some(address) = address {
        tracing::info!(%address, "metrics server listening (plain HTTP: counts only)");
    }
    ServerGuard(task)
}

/// Stops a metrics server started by [`spawn_server`] when dropped.
#[derive(Debug)]
pub struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use ppml_kms::LocalKms;

    /// Metric families (`# TYPE` lines) of a rendering.
    fn families(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The value of the series `name{labels}` (labels as rendered, e.g. `outcome="ok"`).
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn executor_metrics_render_every_family_after_increments() {
        let metrics = ExecutorMetrics::new();
        let rendered = metrics.render().unwrap();
        assert_eq!(families(&rendered), EXECUTOR_METRICS, "{rendered}");
        assert_eq!(
            value(&rendered, r#"ppml_executor_tasks_total{outcome="failed"}"#),
            0.0
        );

        metrics.task_finished(true);
        metrics.task_finished(true);
        metrics.task_finished(false);
        metrics.shuffle_file_written(10, 1234);
        metrics.shuffle_file_written(5, 100);
        metrics.key_release(KeyKind::Shuffle, OK);
        metrics.key_release(KeyKind::Dataset, REFUSED);
        metrics.attestation(OK);
        metrics.input_bytes_counter().inc_by(77);
        let mut fetched = metrics.count_fetched_bytes(Box::new(std::io::Cursor::new(vec![0; 300])));
        std::io::copy(&mut fetched, &mut std::io::sink()).unwrap();

        let rendered = metrics.render().unwrap();
        assert_eq!(families(&rendered), EXECUTOR_METRICS, "{rendered}");
        for (series, expected) in [
            (r#"ppml_executor_tasks_total{outcome="succeeded"}"#, 2.0),
            (r#"ppml_executor_tasks_total{outcome="failed"}"#, 1.0),
            ("ppml_executor_shuffle_rows_written_total", 15.0),
            ("ppml_executor_shuffle_bytes_written_total", 1334.0),
            ("ppml_executor_shuffle_bytes_fetched_total", 300.0),
            ("ppml_executor_input_bytes_decrypted_total", 77.0),
            (
                r#"ppml_executor_key_releases_total{kind="shuffle",outcome="ok"}"#,
                1.0,
            ),
            (
                r#"ppml_executor_key_releases_total{kind="dataset",outcome="refused"}"#,
                1.0,
            ),
            (
                r#"ppml_executor_key_releases_total{kind="dataset",outcome="ok"}"#,
                0.0,
            ),
            (r#"ppml_executor_attestations_total{outcome="ok"}"#, 1.0),
        ] {
            assert_eq!(value(&rendered, series), expected, "{series}");
        }
    }

    #[tokio::test]
    async fn shuffle_rows_are_counted_by_source() {
        let metrics = ExecutorMetrics::new();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
        )
        .unwrap();
        let stream: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(vec![Ok(batch.clone()), Ok(batch)]),
        ));
        let counted = metrics.count_shuffle_rows(ShuffleOrigin::Remote, stream);
        let batches: Vec<RecordBatch> = counted.try_collect().await.unwrap();
        assert_eq!(batches.len(), 2);
        let rendered = metrics.render().unwrap();
        assert_eq!(
            value(
                &rendered,
                r#"ppml_executor_shuffle_rows_read_total{source="remote"}"#
            ),
            6.0
        );
        assert_eq!(
            value(
                &rendered,
                r#"ppml_executor_shuffle_rows_read_total{source="local"}"#
            ),
            0.0
        );
    }

    #[tokio::test]
    async fn key_releases_are_counted_by_outcome() {
        let dir = tempfile::tempdir().unwrap();
        LocalKms::init(dir.path()).unwrap();
        let creds = LocalKms::enroll(dir.path()).unwrap();
        let kms = Arc::new(LocalKms::open(dir.path(), &creds).unwrap());
        let primary = kms.create_primary_key().await.unwrap();
        let (_, wrapped) = kms.generate_data_key(&primary, b"aad").await.unwrap();
        let metrics = Arc::new(ExecutorMetrics::new());
        let counting = CountingKms::new(kms, KeyKind::Dataset, metrics.clone());
        counting.unwrap_data_key(&wrapped, b"aad").await.unwrap();
        counting
            .unwrap_data_key(&wrapped, b"other")
            .await
            .unwrap_err();
        let rendered = metrics.render().unwrap();
        assert_eq!(
            value(
                &rendered,
                r#"ppml_executor_key_releases_total{kind="dataset",outcome="ok"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &rendered,
                r#"ppml_executor_key_releases_total{kind="dataset",outcome="refused"}"#
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn the_counting_store_counts_bytes_read() {
        use object_store::ObjectStoreExt;
        let inner = Arc::new(object_store::memory::InMemory::new());
        let location = Path::from("f");
        inner
            .put(&location, PutPayload::from(vec![7u8; 1000]))
            .await
            .unwrap();
        let metrics = ExecutorMetrics::new();
        let store = CountingStore::new(inner, metrics.input_bytes_counter());
        let whole = store.get(&location).await.unwrap().bytes().await.unwrap();
        assert_eq!(whole.len(), 1000);
        let range = store.get_range(&location, 100..300).await.unwrap();
        assert_eq!(range.len(), 200);
        let ranges = store.get_ranges(&location, &[0..10, 20..30]).await.unwrap();
        assert_eq!(ranges.iter().map(|b| b.len()).sum::<usize>(), 20);
        // Metadata only: nothing read.
        store.head(&location).await.unwrap();
        let rendered = metrics.render().unwrap();
        assert_eq!(
            value(&rendered, "ppml_executor_input_bytes_decrypted_total"),
            1220.0
        );
    }

    #[test]
    fn scheduler_metrics_render_every_family_after_job_events() {
        let metrics = SchedulerMetrics::new();
        let rendered = metrics.render().unwrap();
        assert_eq!(families(&rendered), SCHEDULER_METRICS, "{rendered}");
        let job = JobId::from("job-1");
        metrics.record_submitted(&job, 1_000, 1_050);
        metrics.record_completed(&job, 1_000, 3_500);
        metrics.record_failed(&job, 1_000, 2_000);
        metrics.record_cancelled(&job);
        metrics.set_pending_tasks_queue_size(4);
        let (text, content_type) = metrics.gather_metrics().unwrap().unwrap();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        let rendered = String::from_utf8(text).unwrap();
        assert_eq!(families(&rendered), SCHEDULER_METRICS, "{rendered}");
        for (series, expected) in [
            (r#"ppml_scheduler_jobs_total{state="submitted"}"#, 1.0),
            (r#"ppml_scheduler_jobs_total{state="completed"}"#, 1.0),
            (r#"ppml_scheduler_jobs_total{state="failed"}"#, 1.0),
            (r#"ppml_scheduler_jobs_total{state="cancelled"}"#, 1.0),
            ("ppml_scheduler_pending_tasks", 4.0),
            ("ppml_scheduler_job_exec_time_seconds_sum", 2.5),
            ("ppml_scheduler_job_exec_time_seconds_count", 1.0),
            ("ppml_scheduler_job_planning_time_seconds_sum", 0.05),
        ] {
            assert_eq!(value(&rendered, series), expected, "{series}");
        }
        assert!(!rendered.contains("job-1"), "{rendered}");
    }

    #[tokio::test]
    async fn the_server_serves_metrics_and_health() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(ExecutorMetrics::new());
        metrics.task_finished(true);
        let _server = spawn_server(listener, metrics);
        for (path, needle) in [
            (
                "/metrics",
                "ppml_executor_tasks_total{outcome=\"succeeded\"} 1",
            ),
            ("/healthz", "ok"),
        ] {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            assert!(response.contains(needle), "{response}");
        }
    }
}
