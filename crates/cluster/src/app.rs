//! Running an [`AppSpec`] where a [`Placement`] says: in this process, or with this process as
//! the driver of a cluster's executors. The cluster-mode driver on an executor
//! ([`crate::driver::AppDriver`]) runs the same code with the executor's attested KMS client.

use std::sync::Arc;

use ppml_engine::app::{AppReport, AppSpec, Sink};
use ppml_engine::dataset::Durability;
use ppml_engine::{EngineError, PpmlSession};
use ppml_kms::grant::SignedGrant;
use ppml_kms::{KeyManagementService, PrimaryKeyId};

use crate::flight::EndpointCustomizer;
use crate::jobs::DriverLog;
use crate::{ClusterError, ClusterRunner};

/// Where the plans of an application run.
#[derive(Debug)]
pub enum Placement {
    /// In this process.
    Local {
        /// Parallelism, unless the application sets one.
        partitions: Option<usize>,
        /// Memory limit of the query engine, in bytes (operators spill, encrypted, beyond it).
        memory: Option<usize>,
    },
    /// On the executors of a ppml cluster; this process is the driver.
    Cluster(Box<ClusterPlacement>),
}

impl Placement {
    /// In this process, with DataFusion's defaults.
    pub const LOCAL: Placement = Placement::Local {
        partitions: None,
        memory: None,
    };
}

/// A cluster to run on, and the job's settings.
pub struct ClusterPlacement {
    /// The scheduler, `host:port`.
    pub master: String,
    /// Partitions the plan is cut into [default: the session's].
    pub target_partitions: Option<usize>,
    /// `datafusion.*` / `ballista.*` settings.
    pub conf: Vec<(String, String)>,
    /// TLS of the driver's channels; `None` = cleartext (development only).
    pub customizer: EndpointCustomizer,
    /// Memory limit of the driver's query engine, in bytes.
    pub driver_memory: Option<usize>,
    /// A cluster-mode driver's job log, which records the jobs it runs.
    pub log: Option<DriverLog>,
}

impl std::fmt::Debug for ClusterPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPlacement")
            .field("master", &self.master)
            .field("target_partitions", &self.target_partitions)
            .field("tls", &self.customizer.is_some())
            .finish_non_exhaustive()
    }
}

/// The keys of an encrypted application.
#[derive(Clone)]
pub struct AppKeys {
    /// The KMS (attested, for a runtime in a TEE).
    pub kms: Arc<dyn KeyManagementService>,
    /// The input key: each cluster job's shuffle key is wrapped under it, so it is released
    /// only to the runtimes the inputs are. Needed on a cluster.
    pub input: Option<PrimaryKeyId>,
    /// The key the output is written under (typically the data owner's).
    pub output: PrimaryKeyId,
    /// The data owner's grant of the job, if it runs under one: [`run_app`] refuses an
    /// application or output the grant does not name, and every key request of the job (in
    /// this process and, on a cluster, in its tasks) carries the grant.
    pub grant: Option<SignedGrant>,
}

impl std::fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKeys")
            .field("input", &self.input)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

fn memory_limited(session: PpmlSession, memory: Option<usize>) -> PpmlSession {
    match memory {
        Some(bytes) => session.with_memory_limit(bytes),
        None => session,
    }
}

/// An encrypted session with keys from `kms` whose plans run where `placement` says;
/// `partitions` (the application's) wins over the placement's. On a cluster, each job's
/// shuffle key is wrapped under `shuffle_key`, and its tasks carry `grant`, the data owner's
/// grant of the job (which `kms` must be acting under, [`KeyManagementService::under_grant`]).
pub fn encrypted_session(
    kms: Arc<dyn KeyManagementService>,
    shuffle_key: Option<&PrimaryKeyId>,
    partitions: Option<usize>,
    placement: &Placement,
    grant: Option<&SignedGrant>,
) -> Result<PpmlSession, ClusterError> {
    match placement {
        Placement::Local {
            partitions: default,
            memory,
        } => Ok(memory_limited(
            PpmlSession::encrypted(kms, partitions.or(*default)),
            *memory,
        )),
        Placement::Cluster(cluster) => {
            let shuffle_key = shuffle_key.ok_or_else(|| {
                ClusterError::Setup(
                    "a cluster job needs its input key (the primary key its shuffle keys are \
                     wrapped under)"
                        .into(),
                )
            })?;
            let mut config = crate::process::cluster_session_config();
            if let Some(n) = partitions.or(cluster.target_partitions).filter(|n| *n > 0) {
                config = config.with_target_partitions(n);
            }
            for (key, value) in &cluster.conf {
                config
                    .options_mut()
                    .set(key, value)
                    .map_err(|e| ClusterError::Setup(format!("setting {key}={value}: {e}")))?;
            }
            let mut runner = ClusterRunner::new(
                cluster.master.clone(),
                kms.clone(),
                shuffle_key.clone(),
                cluster.customizer.clone(),
            );
            if let Some(log) = &cluster.log {
                runner = runner.with_log(log.clone());
            }
            if let Some(grant) = grant {
                runner = runner.with_grant(grant)?;
            }
            Ok(memory_limited(
                PpmlSession::encrypted_with_config(kms, config),
                cluster.driver_memory,
            )
            .with_runner(Arc::new(runner)))
        }
    }
}

/// Runs `spec` where `placement` says, with `keys` (`None` for a plaintext spec, which runs
/// only in this process), writing with `durability`.
pub async fn run_app(
    spec: &AppSpec,
    keys: Option<&AppKeys>,
    placement: &Placement,
    durability: Durability,
) -> Result<AppReport, ClusterError> {
    let partitions = spec.input_partitions();
    match keys {
        Some(keys) => {
            let kms = match &keys.grant {
                Some(grant) => {
                    let not_granted =
                        |e: &dyn std::fmt::Display| EngineError::NotGranted(e.to_string());
                    let granted = grant.unverified().map_err(|e| not_granted(&e))?;
                    spec.check_grant(&granted, &keys.output)?;
                    keys.kms
                        .clone()
                        .under_grant(grant)
                        .map_err(|e| not_granted(&e))?
                }
                None => keys.kms.clone(),
            };
            let session = encrypted_session(
                kms.clone(),
                keys.input.as_ref(),
                partitions,
                placement,
                keys.grant.as_ref(),
            )?;
            let grant = match &keys.grant {
                Some(signed) => {
                    let granted = signed
                        .unverified()
                        .map_err(|e| EngineError::NotGranted(e.to_string()))?;
                    Some(ppml_kms::GrantRecord::new(&granted, signed.sha256_hex()))
                }
                None => None,
            };
            let sink = Sink::Encrypted {
                kms: kms.as_ref(),
                primary: &keys.output,
                durability,
                grant: grant.as_ref(),
            };
            Ok(spec.run(&session, sink).await?)
        }
        None => {
            let Placement::Local {
                partitions: default,
                memory,
            } = placement
            else {
                return Err(EngineError::InvalidInput {
                    path: spec.summary(),
                    reason: "plaintext applications run only in local mode: executors read \
                             only ppml datasets"
                        .into(),
                }
                .into());
            };
            let session = memory_limited(PpmlSession::plaintext(partitions.or(*default)), *memory);
            Ok(spec.run(&session, Sink::Plaintext { durability }).await?)
        }
    }
}
