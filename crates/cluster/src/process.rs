//! Running ppml's builds of the Ballista scheduler and executor (docs/cluster.md §3).
//!
//! Both embed the Ballista crates. The executor is Ballista's executor process with ppml's
//! execution engine (encrypted shuffle), Flight service, decrypting object store and job
//! settings; it uses pull-staged scheduling, so it runs no gRPC server of its own. The caller
//! attests *before* starting it and hands in the attested KMS client, so an executor that did
//! not attest never registers. The scheduler is Ballista's, with the `ppml.*` settings
//! registered so that they reach every task; it holds no key.
//!
//! With TLS (`crate::tls`), the scheduler's gRPC service and the executor's Flight service
//! require a client certificate of the cluster CA, and every outgoing channel goes through the
//! TLS endpoint customizer (`https://`, cluster CA, this process's certificate).
//!
//! The scheduler also serves ppml's job log (`crate::jobs`), and executors given a
//! [`crate::driver::JobDriver`] run the driver tasks of cluster-mode jobs. All three
//! processes encode plans with [`PpmlPhysicalCodec`].
//!
//! Both keep Prometheus metrics (`crate::metrics`) and, given a metrics listener, serve them
//! at `/metrics` (with `/healthz`) in plain HTTP: counts only, never values or keys.

use ppml_kms::grant::GrantRouter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use ballista_core::serde::{
    BallistaCodec, BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec,
};
use ballista_core::{ConfigProducer, RuntimeProducer};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use object_store::local::LocalFileSystem;
use ppml_engine::spill::EncryptedSpill;
use ppml_engine::{DecryptingStore, LOCAL_STORE_URL};
use ppml_kms::KeyManagementService;

use crate::ClusterError;
use crate::driver::PpmlPhysicalCodec;
use crate::engine::{DriverHost, PpmlExecutionEngine};
use crate::flight::{EndpointCustomizer, ServerTls, flight_server_provider};
use crate::job::{JobKeys, with_job_settings};
use crate::jobs::JobsService;
use crate::metrics::{
    CountingKms, CountingStore, ExecutorMetrics, KeyKind, MetricsSource, SchedulerMetrics,
    SchedulerSource, spawn_server,
};

/// The session configuration every ppml cluster process starts from.
pub fn cluster_session_config() -> SessionConfig {
    with_job_settings(SessionConfig::new_with_ballista())
}

fn config_producer() -> ConfigProducer {
    Arc::new(cluster_session_config)
}

/// How to run an executor.
pub struct ExecutorOptions {
    /// This executor's id (unique in the cluster).
    pub executor_id: String,
    /// The scheduler's host.
    pub scheduler_host: String,
    /// The scheduler's port.
    pub scheduler_port: u16,
    /// Address the Flight service binds to.
    pub bind_host: String,
    /// Host name other executors and drivers use to reach this one.
    pub external_host: String,
    /// Port of the Flight service.
    pub flight_port: u16,
    /// Directory for shuffle files (created 0700 if missing).
    pub work_dir: PathBuf,
    /// Tasks run at once.
    pub vcores: usize,
    /// Memory the executor's tasks may hold together, in bytes, split evenly between its
    /// vcores (beyond it operators spill, encrypted); None = Ballista's default (a fraction
    /// of the host's or cgroup's memory).
    pub memory_pool_size: Option<u64>,
    /// The attested KMS client: releases dataset and shuffle keys.
    pub kms: Arc<dyn KeyManagementService>,
    /// Applied to every outgoing channel (TLS); None = cleartext, for tests only.
    pub customizer: EndpointCustomizer,
    /// Runs the driver tasks of cluster-mode jobs; None = this executor refuses them.
    pub driver: Option<Arc<dyn crate::driver::JobDriver>>,
    /// TLS of the Flight service; None = cleartext, for tests only.
    pub flight_tls: ServerTls,
}

impl std::fmt::Debug for ExecutorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorOptions")
            .field("executor_id", &self.executor_id)
            .field(
                "scheduler",
                &format!("{}:{}", self.scheduler_host, self.scheduler_port),
            )
            .field(
                "flight",
                &format!("{}:{}", self.external_host, self.flight_port),
            )
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

/// An executor's monitoring (docs/cluster.md §10): where it serves its metrics, and what to
/// record of what happened before it started.
///
/// Kept apart from [`ExecutorOptions`] so that code building those (the in-process tests) is
/// unaffected; [`run_executor`] runs without a metrics server.
#[derive(Debug, Default)]
pub struct ExecutorMonitoring {
    /// Serves `/metrics` and `/healthz` on this listener (plain HTTP; counts only); None =
    /// no metrics server (the metrics are still kept).
    pub metrics_listener: Option<tokio::net::TcpListener>,
    /// The executor attested to the KMS before it was started (counted as a successful
    /// attestation).
    pub attested: bool,
}

/// Runs an executor until it is stopped (Ctrl-C, SIGTERM or the scheduler), without a metrics
/// server.
pub async fn run_executor(options: ExecutorOptions) -> Result<(), ClusterError> {
    run_executor_monitored(options, ExecutorMonitoring::default()).await
}

/// Runs an executor until it is stopped, with the monitoring of `monitoring`.
pub async fn run_executor_monitored(
    options: ExecutorOptions,
    monitoring: ExecutorMonitoring,
) -> Result<(), ClusterError> {
    create_private_dir(&options.work_dir)?;
    let work_dir = options.work_dir.to_string_lossy().into_owned();
    let metrics = Arc::new(ExecutorMetrics::new());
    if monitoring.attested {
        metrics.attestation(crate::metrics::OK);
    }
    // Key requests of tasks go out under the job grant the task carries (the KMS releases keys
    // of marked keys only under one). Releases are counted by kind: dataset keys by the store,
    // shuffle keys by `JobKeys`.
    let grants = Arc::new(GrantRouter::new(options.kms.clone()));
    let dataset_kms = Arc::new(CountingKms::new(
        grants.clone(),
        KeyKind::Dataset,
        metrics.clone(),
    ));
    let shuffle_kms = Arc::new(CountingKms::new(
        grants.clone(),
        KeyKind::Shuffle,
        metrics.clone(),
    ));
    // The decrypting store inside a counting one: the bytes it returns are the plaintext
    // decrypted from input datasets (for Parquet parts with modular encryption, the stored
    // bytes the Parquet reader decrypts).
    let decrypting = Arc::new(
        DecryptingStore::local(Arc::new(LocalFileSystem::new())).with_opener(dataset_kms.clone()),
    );
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(CountingStore::new(
        decrypting.clone(),
        metrics.input_bytes_counter(),
    ));
    let s3_input_bytes = metrics.input_bytes_counter();
    let s3_stores = Arc::new(
        ppml_engine::s3::S3Stores::with_opener(dataset_kms).with_decorator(move |store| {
            Arc::new(CountingStore::new(store, s3_input_bytes.clone()))
        }),
    );
    let pme = s3_stores.pme_factory();
    pme.add_store(LOCAL_STORE_URL, &decrypting);
    let store_url = url::Url::parse(LOCAL_STORE_URL).expect("valid URL");
    // Operator spills are encrypted under a key that never leaves this process. They go next
    // to the work dir, not in it: Ballista's job-data cleanup empties the work dir.
    let spill = Arc::new(
        EncryptedSpill::new(options.work_dir.with_extension("spill"))
            .map_err(|e| ClusterError::Setup(format!("spill directory: {e}")))?,
    );
    let runtime_producer: RuntimeProducer = Arc::new(move |_config: &SessionConfig| {
        let mut runtime = RuntimeEnvBuilder::new()
            .with_disk_manager_builder(spill.clone().disk_manager_builder())
            .build()?;
        runtime.register_object_store(&store_url, store.clone());
        s3_stores.install(&mut runtime);
        runtime.register_parquet_encryption_factory(ppml_engine::pme::FACTORY_ID, pme.clone());
        Ok(Arc::new(runtime))
    });
    let keys = Arc::new(JobKeys::new(shuffle_kms));
    let mut engine = PpmlExecutionEngine::new(keys, options.customizer.clone())
        .with_metrics(metrics.clone())
        .with_grants(grants);
    if let Some(driver) = options.driver {
        engine = engine.with_drivers(DriverHost {
            driver,
            master: format!("{}:{}", options.scheduler_host, options.scheduler_port),
            kms: options.kms.clone(),
            customizer: options.customizer.clone(),
        });
    }
    let endpoint_override = endpoint_override(&options.customizer);
    let config = ExecutorProcessConfig {
        executor_id: options.executor_id,
        bind_host: options.bind_host,
        external_host: Some(options.external_host),
        port: options.flight_port,
        scheduler_host: options.scheduler_host,
        scheduler_port: options.scheduler_port,
        scheduler_connect_timeout_seconds: 30,
        vcores: options.vcores,
        memory_pool_size: options.memory_pool_size,
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
        work_dir: Some(work_dir),
        job_data_ttl_seconds: 24 * 3600,
        job_data_clean_up_interval_seconds: 600,
        executor_heartbeat_interval_seconds: 10,
        override_execution_engine: Some(Arc::new(engine)),
        override_physical_codec: Some(PpmlPhysicalCodec::shared()),
        override_runtime_producer: Some(runtime_producer),
        override_config_producer: Some(config_producer()),
        override_arrow_flight_service: Some(flight_server_provider(options.flight_tls)),
        override_create_grpc_client_endpoint: endpoint_override,
        ..ExecutorProcessConfig::default()
    };
    let _metrics_server = monitoring
        .metrics_listener
        .map(|listener| spawn_server(listener, metrics as Arc<dyn MetricsSource>));
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}

/// Ballista's form of an [`EndpointCustomizer`]. Ballista dials `http://` URLs; ppml's TLS
/// customizer (`crate::tls::client_customizer`) re-targets them at `https://`.
fn endpoint_override(
    customizer: &EndpointCustomizer,
) -> Option<ballista_core::extension::EndpointOverrideFn> {
    customizer.clone().map(|customize| {
        Arc::new(move |endpoint: tonic::transport::Endpoint| {
            customize(endpoint).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        }) as ballista_core::extension::EndpointOverrideFn
    })
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ClusterError::Setup(format!("{}: {e}", dir.display())))
}

/// How to run a scheduler.
#[derive(Default)]
pub struct SchedulerOptions {
    /// Seconds without a poll after which an executor is considered lost.
    pub executor_timeout_seconds: Option<u64>,
    /// TLS of the gRPC service; None = cleartext, for tests only.
    pub tls: ServerTls,
    /// Applied to the scheduler's own outgoing channels (Ballista's calls to executors, which
    /// pull-staged executors do not serve); None = cleartext, for tests only.
    pub customizer: EndpointCustomizer,
    /// Serves `/metrics` and `/healthz` on this listener (plain HTTP; counts only); None = no
    /// metrics server.
    pub metrics_listener: Option<tokio::net::TcpListener>,
}

impl std::fmt::Debug for SchedulerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerOptions")
            .field("executor_timeout_seconds", &self.executor_timeout_seconds)
            .field("tls", &self.tls.is_some())
            .field("customizer", &self.customizer.is_some())
            .field(
                "metrics",
                &self
                    .metrics_listener
                    .as_ref()
                    .and_then(|l| l.local_addr().ok()),
            )
            .finish()
    }
}

/// The scheduler's sessions: Ballista's, with every `ppml://` store an empty decrypting
/// store. Decoding a Parquet scan needs its object store, but the scheduler never reads data:
/// it holds no dataset and no key, so every read is refused.
fn scheduler_session(
    config: SessionConfig,
) -> datafusion::common::Result<datafusion::execution::SessionState> {
    let state = ballista_core::utils::default_session_builder(config)?;
    let registry = Arc::new(NoDataStores {
        inner: state.runtime_env().object_store_registry.clone(),
        empty: Arc::new(DecryptingStore::new(Arc::new(
            object_store::memory::InMemory::new(),
        ))),
    });
    let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
        .with_object_store_registry(registry)
        .build_arc()?;
    Ok(
        datafusion::execution::SessionStateBuilder::new_from_existing(state)
            .with_runtime_env(runtime)
            .build(),
    )
}

/// Resolves every `ppml://` URL to one empty store, everything else through `inner`.
#[derive(Debug)]
struct NoDataStores {
    inner: Arc<dyn datafusion::execution::object_store::ObjectStoreRegistry>,
    empty: Arc<dyn object_store::ObjectStore>,
}

impl datafusion::execution::object_store::ObjectStoreRegistry for NoDataStores {
    fn register_store(
        &self,
        url: &url::Url,
        store: Arc<dyn object_store::ObjectStore>,
    ) -> Option<Arc<dyn object_store::ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(
        &self,
        url: &url::Url,
    ) -> datafusion::common::Result<Arc<dyn object_store::ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(
        &self,
        url: &url::Url,
    ) -> datafusion::common::Result<Arc<dyn object_store::ObjectStore>> {
        match url.scheme() {
            "ppml" => Ok(self.empty.clone()),
            _ => self.inner.get_store(url),
        }
    }
}

/// Runs a scheduler on `listener` until `shutdown` completes.
pub async fn run_scheduler(
    listener: tokio::net::TcpListener,
    options: SchedulerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    let address: SocketAddr = listener
        .local_addr()
        .map_err(|e| ClusterError::Setup(format!("scheduler listener: {e}")))?;
    let mut config = SchedulerConfig {
        bind_host: address.ip().to_string(),
        bind_port: address.port(),
        external_host: address.ip().to_string(),
        scheduling_policy: TaskSchedulingPolicy::PullStaged,
        override_config_producer: Some(config_producer()),
        override_create_grpc_client_endpoint: endpoint_override(&options.customizer),
        override_physical_codec: Some(PpmlPhysicalCodec::shared()),
        override_session_builder: Some(Arc::new(scheduler_session)),
        ..SchedulerConfig::default()
    };
    if let Some(timeout) = options.executor_timeout_seconds {
        config.executor_timeout_seconds = timeout;
        config.expire_dead_executor_interval_seconds = timeout.clamp(1, 15);
    }
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config).await?;
    // As Ballista's `scheduler_process::create_scheduler`, but with ppml's metrics collector.
    let codec: BallistaCodec<LogicalPlanNode, PhysicalPlanNode> = BallistaCodec::new(
        config
            .override_logical_codec
            .clone()
            .unwrap_or_else(|| Arc::new(BallistaLogicalExtensionCodec::default())),
        config
            .override_physical_codec
            .clone()
            .unwrap_or_else(|| Arc::new(BallistaPhysicalExtensionCodec::default())),
    );
    let metrics = Arc::new(SchedulerMetrics::new());
    let mut scheduler = SchedulerServer::new(
        config.scheduler_endpoint(),
        cluster,
        codec,
        config.clone(),
        metrics.clone(),
    );
    scheduler.init().await?;
    let _metrics_server = options.metrics_listener.map(|listener| {
        let source = SchedulerSource::new(metrics, scheduler.state.clone());
        spawn_server(listener, Arc::new(source) as Arc<dyn MetricsSource>)
    });
    let service = SchedulerGrpcServer::new(scheduler)
        .max_decoding_message_size(config.grpc_server_max_decoding_message_size as usize)
        .max_encoding_message_size(config.grpc_server_max_encoding_message_size as usize);
    let mut server = tonic::transport::Server::builder();
    let use_tls = options.tls.is_some();
    if let Some(tls) = options.tls {
        server = server
            .tls_config(tls)
            .map_err(|e| ClusterError::Setup(format!("scheduler TLS: {e}")))?;
    }
    tracing::info!(%address, tls = use_tls, "scheduler listening");
    server
        .add_service(service)
        .add_service(JobsService::new())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
        .map_err(|e| ClusterError::Setup(format!("scheduler server: {e}")))
}
