//! Cluster mode from the submitting side (docs/cluster.md §4): submit a [`DriverSpec`], then
//! follow the job's state and the driver's log.
//!
//! The submitting process holds no key and opens no dataset: it describes the application,
//! submits it as a [`PpmlDriverExec`] plan and reads the job log, which holds phases, job ids
//! and errors, never row values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::physical_plan::ExecutionPlan;

use crate::ClusterError;
use crate::client::{
    JobSetting, JobState as Status, SchedulerChannel, job_status, scheduler_channel,
    scheduler_client, submit_plan,
};
use crate::driver::{DriverSpec, PpmlDriverExec};
use crate::flight::EndpointCustomizer;
use crate::jobs::JobsClient;

/// How often a follower asks for the job's state and new lines: often in the first seconds
/// (short jobs are common, and a request costs well under a millisecond), then less often.
const FAST_FOLLOW_INTERVAL: Duration = Duration::from_millis(10);
const FAST_FOLLOWING: Duration = Duration::from_secs(3);
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// The state of a job, as the scheduler knows it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for an executor.
    Queued,
    /// Running.
    Running,
    /// Finished successfully, after this long.
    Succeeded {
        /// From start to end.
        duration: Duration,
    },
    /// Failed; the message is redacted (no values).
    Failed {
        /// The scheduler's description.
        error: String,
    },
    /// The scheduler does not know the job.
    Unknown,
}

impl JobState {
    /// Queued or running.
    pub fn is_pending(&self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// A job's state and name.
#[derive(Clone, Debug, PartialEq)]
pub struct JobStatus {
    /// The state.
    pub state: JobState,
    /// The job's name (empty if none).
    pub name: String,
}

/// A connection to the scheduler at `master` for submitting and following cluster-mode jobs.
#[derive(Clone)]
pub struct JobClient {
    master: String,
    channel: SchedulerChannel,
}

impl std::fmt::Debug for JobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobClient")
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

impl JobClient {
    /// Connects to the scheduler at `master` (`host:port`) through `customizer` (TLS).
    pub async fn connect(
        master: impl Into<String>,
        customizer: &EndpointCustomizer,
    ) -> Result<Self, ClusterError> {
        let master = master.into();
        let channel = scheduler_channel(&master, customizer).await?;
        Ok(JobClient { master, channel })
    }

    /// Submits a cluster-mode job running `spec` under the job name `name` (default: `ppml:
    /// SUMMARY`); returns its job id.
    pub async fn submit(
        &self,
        spec: DriverSpec,
        name: Option<&str>,
    ) -> Result<String, ClusterError> {
        let name = name
            .map(str::to_string)
            .unwrap_or_else(|| format!("ppml: {}", spec.summary));
        let plan: Arc<dyn ExecutionPlan> = Arc::new(PpmlDriverExec::new(spec));
        let settings = crate::process::cluster_session_config()
            .options()
            .entries()
            .into_iter()
            .map(|entry| {
                let value = if entry.key == "ballista.job.name" {
                    Some(name.clone())
                } else {
                    entry.value
                };
                JobSetting {
                    key: entry.key,
                    value,
                }
            })
            .collect();
        let mut scheduler = scheduler_client(self.channel.clone());
        let session: [u8; 16] = rand::random();
        submit_plan(
            &mut scheduler,
            &self.master,
            &plan,
            settings,
            hex::encode(session),
        )
        .await
    }

    /// The job's state and name.
    pub async fn status(&self, job_id: &str) -> Result<JobStatus, ClusterError> {
        let mut scheduler = scheduler_client(self.channel.clone());
        let status = job_status(&mut scheduler, &self.master, job_id).await?;
        let name = status
            .as_ref()
            .map(|s| s.job_name.clone())
            .unwrap_or_default();
        let state = match status.and_then(|s| s.status) {
            Some(Status::Queued(_)) => JobState::Queued,
            Some(Status::Running(_)) => JobState::Running,
            Some(Status::Successful(done)) => JobState::Succeeded {
                duration: Duration::from_millis(done.ended_at.saturating_sub(done.started_at)),
            },
            Some(Status::Failed(failed)) => JobState::Failed {
                error: failed.error,
            },
            None => JobState::Unknown,
        };
        Ok(JobStatus { state, name })
    }

    /// The job log's lines from line `from` on, and the number of the line after them.
    pub async fn log_lines(
        &self,
        job_id: &str,
        from: u64,
    ) -> Result<(Vec<String>, u64), ClusterError> {
        let read = JobsClient::new(self.channel.clone())
            .read(job_id, from)
            .await
            .map_err(|status| ClusterError::Scheduler {
                addr: self.master.clone(),
                message: format!("reading the job log: {}", status.message()),
            })?;
        let next = read.first + read.lines.len() as u64;
        Ok((read.lines, next))
    }

    /// Hands every line of the job's log to `on_line` (all of it, then new lines as they
    /// come) until the job is no longer pending; returns its final state. With `follow`
    /// false, hands over the lines once and returns the current state.
    pub async fn follow(
        &self,
        job_id: &str,
        follow: bool,
        mut on_line: impl FnMut(&str),
    ) -> Result<JobState, ClusterError> {
        let mut next = 0;
        let started = Instant::now();
        loop {
            // The state first: lines appended before the job ended are then all read below.
            let state = self.status(job_id).await?.state;
            let (lines, after) = self.log_lines(job_id, next).await?;
            next = after;
            for line in &lines {
                on_line(line);
            }
            if !state.is_pending() || !follow {
                return Ok(state);
            }
            tokio::time::sleep(if started.elapsed() < FAST_FOLLOWING {
                FAST_FOLLOW_INTERVAL
            } else {
                FOLLOW_INTERVAL
            })
            .await;
        }
    }
}
