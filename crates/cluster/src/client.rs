//! The driver side: submit a physical plan to the scheduler and read its encrypted result.
//!
//! [`ClusterRunner`] is a [`PlanRunner`]: a [`ppml_engine::PpmlSession`] plans as usual (its
//! scans read `ppml://` datasets the driver verified) and the runner runs each plan on the
//! cluster (docs/cluster.md §2, §4): it creates the job's shuffle key, submits the plan with
//! the `ppml.*` settings, waits for the job, then fetches the final stage's files (ciphertext)
//! from the executors and decrypts them here.

use std::sync::Arc;
use std::time::Duration;

use ballista_core::serde::protobuf::execute_query_params::Query;
use ballista_core::serde::protobuf::execute_query_result::Result as QueryResult;
use ballista_core::serde::protobuf::job_status::Status;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_core::serde::protobuf::{
    ExecuteQueryParams, GetJobStatusParams, JobStatus, KeyValuePair,
};
use ballista_core::serde::scheduler::PartitionLocation;
use ballista_core::version::insert_version_header;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use ppml_engine::PlanRunner;
use ppml_engine::receipt::ExecutorAttestations;
use ppml_kms::error_chain;
use ppml_kms::grant::SignedGrant;
use ppml_kms::{KeyManagementService, PrimaryKeyId};
use rand::Rng as _;
use tonic::transport::{Channel, Endpoint};

use crate::ClusterError;
use crate::driver::encode_plan;
use crate::engine::ShuffleSource;
use crate::flight::EndpointCustomizer;
use crate::job::new_job_key;
use crate::jobs::DriverLog;
use crate::stages::{Feeding, SignedStages, plan_stages};

/// How often the driver asks the scheduler about a running job: often at first (a status
/// request on a cluster network costs well under a millisecond, and short jobs are common:
/// SimpleQuery runs three), then less often.
const FAST_POLL_INTERVAL: Duration = Duration::from_millis(5);
const FAST_POLLING: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs plans on a ppml cluster, as the job's driver.
pub struct ClusterRunner {
    scheduler: String,
    kms: Arc<dyn KeyManagementService>,
    shuffle_primary: PrimaryKeyId,
    customizer: EndpointCustomizer,
    log: Option<DriverLog>,
    grant: Option<(SignedGrant, String)>,
}

impl std::fmt::Debug for ClusterRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRunner")
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl ClusterRunner {
    /// A runner submitting to the scheduler at `scheduler` (`host:port`), creating each job's
    /// shuffle key under `shuffle_primary` with `kms`.
    pub fn new(
        scheduler: impl Into<String>,
        kms: Arc<dyn KeyManagementService>,
        shuffle_primary: PrimaryKeyId,
        customizer: EndpointCustomizer,
    ) -> Self {
        ClusterRunner {
            scheduler: scheduler.into(),
            kms,
            shuffle_primary,
            customizer,
            log: None,
            grant: None,
        }
    }

    /// Runs every job under the data owner's `grant`: the jobs' settings carry it to the
    /// executors (which send it with their key requests) and each job's id, to which its
    /// shuffle key is bound, is the grant's job id followed by `-` and a random part.
    pub fn with_grant(mut self, grant: &SignedGrant) -> Result<Self, ClusterError> {
        // A grant's job id is 32 hex digits (`JobGrant::from_json`): with `-` and 32 more, a
        // valid `ppml.job_id`.
        let job_id = grant
            .unverified()
            .map_err(|e| ClusterError::JobSettings(format!("ppml.grant: {e}")))?
            .job_id;
        self.grant = Some((grant.clone(), job_id));
        Ok(self)
    }

    /// Also records each job's submission and end in `log` (a cluster-mode driver's).
    pub fn with_log(mut self, log: DriverLog) -> Self {
        self.log = Some(log);
        self
    }

    async fn connect(&self) -> Result<SchedulerGrpcClient<Channel>, ClusterError> {
        Ok(scheduler_client(
            scheduler_channel(&self.scheduler, &self.customizer).await?,
        ))
    }

    /// Submits `plan` and waits for it; returns Ballista's job id and the final stage's files.
    async fn run_job(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        settings: Vec<KeyValuePair>,
        session_id: String,
    ) -> Result<(String, Vec<PartitionLocation>), ClusterError> {
        let mut scheduler = self.connect().await?;
        let job_id =
            submit_plan(&mut scheduler, &self.scheduler, plan, settings, session_id).await?;
        tracing::info!(job = %job_id, "job submitted");
        if let Some(log) = &self.log {
            log.line(format!("job {job_id} submitted")).await;
        }
        let submitted_at = std::time::Instant::now();
        loop {
            let status = job_status(&mut scheduler, &self.scheduler, &job_id)
                .await?
                .and_then(|s| s.status);
            match status {
                Some(Status::Successful(done)) => {
                    let locations = done
                        .partition_location
                        .into_iter()
                        .map(|l| l.try_into())
                        .collect::<Result<Vec<PartitionLocation>, _>>()?;
                    tracing::info!(job = %job_id, files = locations.len(), "job finished");
                    if let Some(log) = &self.log {
                        log.line(format!("job {job_id} finished")).await;
                    }
                    return Ok((job_id, locations));
                }
                Some(Status::Failed(failed)) => {
                    return Err(ClusterError::JobFailed {
                        job_id,
                        message: failed.error,
                    });
                }
                _ if submitted_at.elapsed() < FAST_POLLING => {
                    tokio::time::sleep(FAST_POLL_INTERVAL).await
                }
                _ => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }
}

fn scheduler_error(addr: &str, message: String) -> ClusterError {
    ClusterError::Scheduler {
        addr: addr.to_string(),
        message,
    }
}

/// Opens a channel to the scheduler at `addr` (`host:port`): TLS through `customizer`, or
/// cleartext without one.
pub async fn scheduler_channel(
    addr: &str,
    customizer: &EndpointCustomizer,
) -> Result<Channel, ClusterError> {
    let error = |message: String| scheduler_error(addr, message);
    let endpoint = match customizer {
        Some(customize) => customize(
            Endpoint::from_shared(format!("https://{addr}")).map_err(|e| error(e.to_string()))?,
        )
        .map_err(|e| error(e.to_string()))?,
        None => {
            Endpoint::from_shared(format!("http://{addr}")).map_err(|e| error(e.to_string()))?
        }
    };
    endpoint
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| error(format!("cannot connect: {}", error_chain(&e))))
}

/// Ballista's scheduler client on `channel`, with ppml's message size limits.
pub fn scheduler_client(channel: Channel) -> SchedulerGrpcClient<Channel> {
    SchedulerGrpcClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Submits a physical plan (encoded with [`encode_plan`]); returns Ballista's job id.
pub async fn submit_plan(
    scheduler: &mut SchedulerGrpcClient<Channel>,
    addr: &str,
    plan: &Arc<dyn ExecutionPlan>,
    settings: Vec<KeyValuePair>,
    session_id: String,
) -> Result<String, ClusterError> {
    let error = |message: String| scheduler_error(addr, message);
    let encoded = encode_plan(plan)?;
    let mut request = tonic::Request::new(ExecuteQueryParams {
        query: Some(Query::PhysicalPlan(encoded)),
        settings,
        session_id,
        operation_id: random_id(),
    });
    insert_version_header(request.metadata_mut());
    let submitted = scheduler
        .execute_query(request)
        .await
        .map_err(|status| error(format!("submission refused: {}", status.message())))?
        .into_inner();
    match submitted.result {
        Some(QueryResult::Success(success)) => Ok(success.job_id),
        Some(QueryResult::Failure(failure)) => {
            Err(error(format!("submission failed: {failure:?}")))
        }
        None => Err(error("empty answer to the submission".into())),
    }
}

/// The scheduler's status of `job_id`; None if it does not know the job.
pub async fn job_status(
    scheduler: &mut SchedulerGrpcClient<Channel>,
    addr: &str,
    job_id: &str,
) -> Result<Option<JobStatus>, ClusterError> {
    Ok(scheduler
        .get_job_status(GetJobStatusParams {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|status| scheduler_error(addr, format!("job status: {}", status.message())))?
        .into_inner()
        .status)
}

/// The states of a Ballista job, and the settings a submission carries, for the callers of
/// [`submit_plan`] and [`job_status`].
pub use ballista_core::serde::protobuf::{
    KeyValuePair as JobSetting, job_status::Status as JobState,
};
/// A channel to the scheduler.
pub use tonic::transport::Channel as SchedulerChannel;

pub(crate) fn random_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

#[async_trait::async_trait]
impl PlanRunner for ClusterRunner {
    async fn execute(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: &SessionContext,
    ) -> ppml_engine::Result<Vec<SendableRecordBatchStream>> {
        Ok(self.execute_attested(plan, ctx).await?.0)
    }

    /// Runs the plan as a Ballista job; the result files' attestation trailers name the
    /// executors that computed them (and the files those were computed from).
    async fn execute_attested(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        ctx: &SessionContext,
    ) -> ppml_engine::Result<(
        Vec<SendableRecordBatchStream>,
        Option<Arc<ExecutorAttestations>>,
    )> {
        let job_id = match &self.grant {
            Some((_, granted)) => format!("{granted}-{}", random_id()),
            None => random_id(),
        };
        let (mut job, key) = new_job_key(self.kms.as_ref(), &self.shuffle_primary, &job_id)
            .await
            .map_err(datafusion::error::DataFusionError::from)?;
        job.grant = self.grant.as_ref().map(|(grant, _)| grant.clone());
        // The driver cuts its plan into stages as the scheduler will, and signs them: executors
        // run only these (docs/cluster.md §6.6).
        let stages = plan_stages(&plan, ctx.copied_config().options(), &ctx.task_ctx())
            .map_err(datafusion::error::DataFusionError::from)?;
        let signed =
            SignedStages::from_stages(&stages).map_err(datafusion::error::DataFusionError::from)?;
        job.stages = Some(signed.sign(&job_id, &key));
        let mut config = crate::job::with_job_settings(ctx.copied_config());
        job.apply(&mut config)
            .map_err(datafusion::error::DataFusionError::from)?;
        let settings = config
            .options()
            .entries()
            .into_iter()
            .map(|entry| KeyValuePair {
                key: entry.key,
                value: entry.value,
            })
            .collect();
        let (ballista_job, locations) = self
            .run_job(&plan, settings, ctx.session_id())
            .await
            .map_err(datafusion::error::DataFusionError::from)?;

        // The final stage, as the driver planned it: its partitions, and which partitions of
        // its input each result file must have been computed from.
        let last = stages.last().expect("plan_stages makes at least one stage");
        let final_stage: Arc<dyn ExecutionPlan> = last.clone();
        let feeding = Arc::new(
            Feeding::of(last.stage_id(), &final_stage)
                .map_err(datafusion::error::DataFusionError::from)?,
        );
        let files = result_files(last.input_partition_count(), locations)
            .map_err(datafusion::error::DataFusionError::from)?;
        let schema = plan.schema();
        let seen = Arc::new(ExecutorAttestations::default());
        let streams = files
            .into_iter()
            .map(|location| {
                let output = location.partition_id.partition_id;
                let coverage = feeding.coverage(vec![output]);
                let check = coverage.file_check(output);
                let source = ShuffleSource {
                    job_id: ballista_job.clone(),
                    location,
                    metrics: None,
                };
                let file = source.open(
                    None,
                    key.clone(),
                    schema.clone(),
                    self.customizer.clone(),
                    check,
                    Some(seen.clone()),
                );
                Box::pin(RecordBatchStreamAdapter::new(
                    schema.clone(),
                    coverage.ending(futures::stream::once(file).try_flatten()),
                )) as SendableRecordBatchStream
            })
            .collect();
        Ok((streams, Some(seen)))
    }
}

/// The final stage's files in partition order, checked against the plan: the driver expects
/// exactly one file for each of the final stage's `partitions` output partitions, all of one
/// stage (each task of the final stage writes one file per partition it owns, empty or not).
/// The list comes from the scheduler, outside the TEE: a partition missing or listed twice,
/// or a file of another stage, would make a result with rows missing or counted twice that
/// every file's own check accepts, so it is refused.
pub(crate) fn result_files(
    partitions: usize,
    locations: Vec<PartitionLocation>,
) -> Result<Vec<PartitionLocation>, ClusterError> {
    let refused = |reason: String| Err(ClusterError::ShuffleFiles(reason));
    let stage = locations.first().map(|l| l.partition_id.stage_id);
    let mut by_partition: Vec<Option<PartitionLocation>> = vec![None; partitions];
    for location in locations {
        let place = &location.partition_id;
        if Some(place.stage_id) != stage {
            return refused(format!(
                "result files of stages {} and {}",
                stage.unwrap_or_default(),
                place.stage_id
            ));
        }
        let partition = place.partition_id;
        match by_partition.get_mut(partition) {
            None => {
                return refused(format!(
                    "a result file of partition {partition}; the final stage has {partitions}"
                ));
            }
            Some(Some(_)) => return refused(format!("result partition {partition} listed twice")),
            Some(slot) => *slot = Some(location),
        }
    }
    by_partition
        .into_iter()
        .enumerate()
        .map(|(partition, file)| {
            file.ok_or_else(|| {
                ClusterError::ShuffleFiles(format!(
                    "result partition {partition} of {partitions} is missing"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ballista_core::serde::scheduler::{
        ExecutorMetadata, ExecutorOperatingSystemSpecification, ExecutorSpecification, PartitionId,
        PartitionStats,
    };

    use super::*;

    fn file(stage: usize, partition: usize, file_id: u64) -> PartitionLocation {
        PartitionLocation {
            map_partition_id: partition,
            partition_id: PartitionId::new(&"job".into(), stage, partition),
            executor_meta: ExecutorMetadata {
                id: "e".into(),
                host: "localhost".into(),
                port: 1,
                grpc_port: 2,
                specification: ExecutorSpecification::default(),
                os_info: ExecutorOperatingSystemSpecification::default(),
            },
            partition_stats: PartitionStats::default(),
            file_id: Some(file_id),
            is_sort_shuffle: false,
        }
    }

    fn refusal(result: Result<Vec<PartitionLocation>, ClusterError>) -> String {
        match result {
            Err(ClusterError::ShuffleFiles(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Attack 10, the scheduler alters the list of result files: drops a partition, lists
    /// one twice, adds a partition the final stage does not have, or mixes in a file of
    /// another stage. The driver refuses each before reading a row.
    #[test]
    fn attack_missing_or_duplicated_result_partitions_are_refused() {
        let files = vec![file(3, 1, 11), file(3, 0, 10), file(3, 2, 12)];
        let ordered = result_files(3, files.clone()).unwrap();
        let order: Vec<usize> = ordered
            .iter()
            .map(|f| f.partition_id.partition_id)
            .collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(result_files(0, Vec::new()).unwrap().len(), 0);

        let dropped = files[..2].to_vec();
        assert!(refusal(result_files(3, dropped)).contains("partition 2 of 3 is missing"));
        let mut twice = files.clone();
        twice.push(files[0].clone());
        assert!(refusal(result_files(3, twice)).contains("listed twice"));
        let mut retried = files.clone();
        retried.push(file(3, 1, 99));
        assert!(refusal(result_files(3, retried)).contains("partition 1 listed twice"));
        let mut extra = files.clone();
        extra.push(file(3, 3, 13));
        assert!(refusal(result_files(3, extra)).contains("the final stage has 3"));
        let mut other_stage = files[..2].to_vec();
        other_stage.push(file(2, 2, 12));
        assert!(refusal(result_files(3, other_stage)).contains("stages 3 and 2"));
    }

    /// The same for an executor's shuffle reader: a file listed twice, one of another stage,
    /// a partition of the reader that reads several of the stage's partitions, or two that
    /// read the same one, is refused. The reader may hold any slice of the stage's partitions.
    #[test]
    fn attack_altered_shuffle_inputs_are_refused() {
        use crate::engine::check_partition_files;
        let refusal = |result: Result<(), ClusterError>| match result {
            Err(ClusterError::ShuffleFiles(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        };
        let reader = vec![
            vec![file(2, 4, 1), file(2, 4, 2)],
            vec![file(2, 6, 1), file(2, 6, 2)],
        ];
        check_partition_files(2, false, &reader).unwrap();

        let mut twice = reader.clone();
        twice[1].push(file(2, 6, 2));
        assert!(refusal(check_partition_files(2, false, &twice)).contains("listed twice"));
        assert!(
            refusal(check_partition_files(1, false, &reader))
                .contains("stage 2 in the input of stage 1")
        );
        let mut mixed = reader.clone();
        mixed[0][1] = file(2, 5, 2);
        assert!(refusal(check_partition_files(2, false, &mixed)).contains("reads several"));
        let mut shared = reader.clone();
        shared[1] = vec![file(2, 4, 3)];
        assert!(refusal(check_partition_files(2, false, &shared)).contains("read by two"));
        // A broadcast reader reads every partition of its stage, once.
        let broadcast = vec![vec![file(2, 0, 1), file(2, 1, 1)]];
        check_partition_files(2, true, &broadcast).unwrap();
        let mut twice = broadcast.clone();
        twice[0].push(file(2, 1, 1));
        assert!(refusal(check_partition_files(2, true, &twice)).contains("listed twice"));
    }
}
