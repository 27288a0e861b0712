//! `ppml submit --mode cluster`, `ppml status` and `ppml logs` (docs/cluster.md §4), and the
//! executor's side of cluster mode: the [`JobDriver`] that runs a submitted application.
//!
//! The submitting process holds no key and opens no dataset: it describes the application
//! ([`ClusterJob`]), submits it as a [`PpmlDriverExec`] plan, and follows the driver's log. The
//! driver task, on an attested executor, runs the same code as `--mode client` with the
//! executor's KMS client, and writes the encrypted output to storage the executors share.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ppml_cluster::client::{
    JobSetting as KeyValuePair, JobState as Status, SchedulerChannel, job_status,
    scheduler_channel, scheduler_client, submit_plan,
};
use ppml_cluster::driver::{DriverContext, DriverSpec, JobDriver, PpmlDriverExec};
use ppml_cluster::flight::EndpointCustomizer;
use ppml_cluster::jobs::JobsClient;
use ppml_engine::DatasetLocation;
use ppml_kms::PrimaryKeyId;
use serde::{Deserialize, Serialize};

use crate::cli::{JobArgs, LogsArgs, QueryArgs, SimpleQueryArgs, SubmitApp, SubmitArgs};
use crate::exit;
use crate::query::{ClusterPlacement, Placement, parse_table, query_text};
use crate::settings::{KmsBackend, OpenKms, Settings};

/// How often `ppml logs -f` and a following `ppml submit` ask for the job's state and new
/// lines: often in the first seconds (short jobs are common, and a request costs well under
/// a millisecond), then less often.
const FAST_FOLLOW_INTERVAL: Duration = Duration::from_millis(10);
const FAST_FOLLOWING: Duration = Duration::from_secs(3);
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// What a cluster-mode job runs: the `app` of its [`DriverSpec`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterJob {
    /// The application.
    pub app: ClusterApp,
    /// The primary key of shuffle keys (the input key) [default: the executor's].
    pub primary_key: Option<String>,
    /// The primary key of the output [default: the executor's output key, else primary].
    pub output_primary_key: Option<String>,
    /// Partitions the plans are cut into [default: the driver session's].
    pub target_partitions: Option<usize>,
    /// `datafusion.*` / `ballista.*` settings.
    pub conf: Vec<(String, String)>,
    /// Memory limit of the driver's query engine, in bytes.
    pub driver_memory: Option<usize>,
}

/// The applications of cluster mode. Paths are absolute or URLs: they are opened on the
/// executors.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ClusterApp {
    /// SimpleQuery.
    SimpleQuery {
        input: String,
        output: String,
        input_partitions: Option<usize>,
        output_partitions: Option<usize>,
        overwrite: bool,
    },
    /// SQL over named tables, written as an encrypted dataset.
    Query {
        sql: String,
        /// `NAME=DIR` pairs.
        tables: Vec<String>,
        output: String,
        input_partitions: Option<usize>,
        output_partitions: Option<usize>,
        overwrite: bool,
    },
}

/// A dataset as executors must see it: URLs unchanged, file paths made absolute.
fn shared_location(location: &DatasetLocation) -> Result<String> {
    match location.as_local() {
        None => Ok(location.to_string()),
        Some(path) => Ok(std::path::absolute(path)
            .with_context(|| format!("{}: cannot make the path absolute", path.display()))?
            .to_string_lossy()
            .into_owned()),
    }
}

fn location(text: &str) -> Result<DatasetLocation> {
    DatasetLocation::parse(text).with_context(|| format!("the job's dataset {text:?}"))
}

impl ClusterApp {
    fn from_args(app: &SubmitApp) -> Result<Self> {
        match app {
            SubmitApp::SimpleQuery(args) => {
                if args.plaintext {
                    bail!("--plaintext runs only in local mode: executors read only ppml datasets");
                }
                Ok(ClusterApp::SimpleQuery {
                    input: shared_location(&args.input)?,
                    output: shared_location(&args.output)?,
                    input_partitions: args.input_partitions,
                    output_partitions: args.output_partitions,
                    overwrite: args.overwrite,
                })
            }
            SubmitApp::Query(args) => {
                if args.plaintext {
                    bail!("--plaintext runs only in local mode: executors read only ppml datasets");
                }
                let Some(output) = &args.output else {
                    bail!(
                        "--mode cluster writes the result as an encrypted dataset: give --output \
                         DIR (nothing is printed on the submitting machine)"
                    );
                };
                let tables = args
                    .tables
                    .iter()
                    .map(|spec| {
                        let (name, path) = parse_table(spec)?;
                        Ok(format!("{name}={}", shared_location(&path)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ClusterApp::Query {
                    sql: query_text(args)?,
                    tables,
                    output: shared_location(output)?,
                    input_partitions: args.input_partitions,
                    output_partitions: args.output_partitions,
                    overwrite: args.overwrite,
                })
            }
        }
    }

    /// One line for logs: the kind of application and where it writes, no values.
    fn summary(&self) -> String {
        match self {
            ClusterApp::SimpleQuery { input, output, .. } => {
                format!("SimpleQuery {input} -> {output}")
            }
            ClusterApp::Query { tables, output, .. } => {
                let names: Vec<&str> = tables
                    .iter()
                    .filter_map(|t| t.split_once('=').map(|(name, _)| name))
                    .collect();
                format!("SQL over {} -> {output}", names.join(", "))
            }
        }
    }
}

/// `ppml submit --mode cluster`: submits the driver job; prints its id; follows it unless
/// `--detach`. Returns the exit code.
pub async fn submit(
    args: &SubmitArgs,
    settings: &Settings,
    conf: Vec<(String, String)>,
    driver_memory: Option<usize>,
    customizer: EndpointCustomizer,
) -> Result<u8> {
    let master = args
        .master
        .clone()
        .context("--mode cluster needs --master HOST:PORT (the scheduler)")?;
    let app = ClusterApp::from_args(args.app()?)?;
    let summary = app.summary();
    let job = ClusterJob {
        app,
        primary_key: settings.primary_key.clone(),
        output_primary_key: settings.output_key.clone(),
        target_partitions: args
            .num_executors
            .zip(args.executor_cores)
            .map(|(n, c)| n * c),
        conf,
        driver_memory,
    };
    let spec = DriverSpec {
        app: serde_json::to_value(&job)?,
        summary: summary.clone(),
    };
    let plan: Arc<dyn datafusion::physical_plan::ExecutionPlan> =
        Arc::new(PpmlDriverExec::new(spec));
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("ppml: {summary}"));
    let settings_kv = ppml_cluster::process::cluster_session_config()
        .options()
        .entries()
        .into_iter()
        .map(|entry| {
            let value = if entry.key == "ballista.job.name" {
                Some(name.clone())
            } else {
                entry.value
            };
            KeyValuePair {
                key: entry.key,
                value,
            }
        })
        .collect();
    let channel = scheduler_channel(&master, &customizer).await?;
    let mut scheduler = scheduler_client(channel.clone());
    let session: [u8; 16] = rand::random();
    let job_id = submit_plan(
        &mut scheduler,
        &master,
        &plan,
        settings_kv,
        hex::encode(session),
    )
    .await?;
    println!("{job_id}");
    if args.detach {
        if !settings.quiet {
            eprintln!(
                "submitted job {job_id} ({summary}); follow it with `ppml logs {job_id} -f` or \
                 `ppml status {job_id}`, with the same --master and --cluster-tls"
            );
        }
        return Ok(exit::OK);
    }
    let code = follow(&master, channel, &job_id, true).await?;
    if code == exit::FAILURE {
        bail!("job {job_id} failed (see the lines above)");
    }
    Ok(code)
}

/// Prints the job's log lines from `from` on; returns the next line number.
async fn print_lines(jobs: &mut JobsClient, job_id: &str, from: u64) -> Result<u64> {
    let read = jobs
        .read(job_id, from)
        .await
        .map_err(|status| anyhow::anyhow!("reading the job log: {}", status.message()))?;
    let count = read.lines.len() as u64;
    for line in read.lines {
        println!("{line}");
    }
    Ok(read.first + count)
}

/// The exit code for a job's state (see `ppml status --help`).
fn state_code(status: Option<&Status>) -> u8 {
    match status {
        Some(Status::Successful(_)) => exit::OK,
        Some(Status::Failed(_)) => exit::FAILURE,
        Some(Status::Queued(_)) | Some(Status::Running(_)) => exit::JOB_PENDING,
        None => exit::JOB_UNKNOWN,
    }
}

/// Prints the job's log (all of it, then new lines) until the job ends; returns the exit code
/// of its final state. With `follow` false, prints the lines once.
async fn follow(master: &str, channel: SchedulerChannel, job_id: &str, follow: bool) -> Result<u8> {
    let mut scheduler = scheduler_client(channel.clone());
    let mut jobs = JobsClient::new(channel);
    let mut next = 0;
    let started = std::time::Instant::now();
    loop {
        // The state first: lines appended before the job ended are then all printed below.
        let state = job_status(&mut scheduler, master, job_id)
            .await?
            .and_then(|s| s.status);
        next = print_lines(&mut jobs, job_id, next).await?;
        let code = state_code(state.as_ref());
        if code != exit::JOB_PENDING || !follow {
            if let Some(Status::Failed(failed)) = &state {
                eprintln!("job {job_id} failed: {}", failed.error);
            }
            if code == exit::JOB_UNKNOWN {
                eprintln!("the scheduler at {master} does not know job {job_id}");
            }
            return Ok(code);
        }
        tokio::time::sleep(if started.elapsed() < FAST_FOLLOWING {
            FAST_FOLLOW_INTERVAL
        } else {
            FOLLOW_INTERVAL
        })
        .await;
    }
}

/// `ppml status JOB`: prints the job's state; the exit code says it to scripts.
pub async fn status(args: &JobArgs, customizer: EndpointCustomizer) -> Result<u8> {
    let channel = scheduler_channel(&args.master, &customizer).await?;
    let mut scheduler = scheduler_client(channel);
    let status = job_status(&mut scheduler, &args.master, &args.job).await?;
    let state = status.as_ref().and_then(|s| s.status.as_ref());
    let name = status
        .as_ref()
        .map(|s| s.job_name.clone())
        .unwrap_or_default();
    let (word, detail) = match state {
        Some(Status::Queued(_)) => ("queued", String::new()),
        Some(Status::Running(_)) => ("running", String::new()),
        Some(Status::Successful(done)) => (
            "succeeded",
            format!(
                " in {:.1} s",
                done.ended_at.saturating_sub(done.started_at) as f64 / 1000.0
            ),
        ),
        Some(Status::Failed(failed)) => ("failed", format!(": {}", failed.error)),
        None => ("unknown", " to the scheduler".to_string()),
    };
    println!(
        "{}\t{word}{detail}{}",
        args.job,
        if name.is_empty() {
            String::new()
        } else {
            format!("\t({name})")
        }
    );
    Ok(state_code(state))
}

/// `ppml logs JOB [-f]`.
pub async fn logs(args: &LogsArgs, customizer: EndpointCustomizer) -> Result<u8> {
    let channel = scheduler_channel(&args.job.master, &customizer).await?;
    let code = follow(&args.job.master, channel, &args.job.job, args.follow).await?;
    // Without -f the lines are the answer: the job's state does not make it fail.
    Ok(if args.follow { code } else { exit::OK })
}

/// The executor's driver for cluster-mode jobs: the same code as `--mode client`, with the
/// executor's attested KMS client.
#[derive(Clone)]
pub struct CliJobDriver {
    backend: KmsBackend,
    primary: Option<PrimaryKeyId>,
    output: Option<PrimaryKeyId>,
}

impl std::fmt::Debug for CliJobDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliJobDriver").finish_non_exhaustive()
    }
}

impl CliJobDriver {
    /// A driver with the executor's opened KMS (its keys are the defaults of jobs that name
    /// none).
    pub fn new(kms: &OpenKms) -> Self {
        CliJobDriver {
            backend: kms.backend.clone(),
            primary: kms.primary.clone(),
            output: kms.output.clone(),
        }
    }
}

#[async_trait::async_trait]
impl JobDriver for CliJobDriver {
    async fn run(&self, spec: &DriverSpec, context: DriverContext) -> Result<()> {
        let job: ClusterJob = serde_json::from_value(spec.app.clone())
            .context("the job's application description (submitted by another ppml version?)")?;
        let kms = OpenKms {
            kms: context.kms.clone(),
            backend: self.backend.clone(),
            primary: job
                .primary_key
                .map(PrimaryKeyId)
                .or_else(|| self.primary.clone()),
            output: job
                .output_primary_key
                .map(PrimaryKeyId)
                .or_else(|| self.output.clone()),
        };
        let log = context.log.clone();
        let placement = Placement::Cluster(Box::new(ClusterPlacement {
            master: context.master.clone(),
            target_partitions: job.target_partitions,
            conf: job.conf,
            customizer: context.customizer.clone(),
            driver_memory: job.driver_memory,
            log: Some(log.clone()),
        }));
        match job.app {
            ClusterApp::SimpleQuery {
                input,
                output,
                input_partitions,
                output_partitions,
                overwrite,
            } => {
                let args = SimpleQueryArgs {
                    input: location(&input)?,
                    output: location(&output)?,
                    input_partitions,
                    output_partitions,
                    overwrite,
                    plaintext: false,
                    no_preview: true,
                };
                let report = crate::query::run_simple_query(&args, Some(&kms), &placement).await?;
                for (phase, duration) in &report.timings {
                    log.line(format!("{phase} time: {:.3} s", duration.as_secs_f64()))
                        .await;
                }
                log.line(format!(
                    "wrote {} rows in {} part(s) to {output}",
                    report.output.rows, report.output.parts
                ))
                .await;
            }
            ClusterApp::Query {
                sql,
                tables,
                output,
                input_partitions,
                output_partitions,
                overwrite,
            } => {
                let args = QueryArgs {
                    sql: Some(sql),
                    sql_file: None,
                    tables,
                    output: Some(location(&output)?),
                    input_partitions,
                    output_partitions,
                    overwrite,
                    plaintext: false,
                };
                let rows = crate::query::run_query(&args, Some(&kms), &placement).await?;
                log.line(format!("wrote {rows} rows to {output}")).await;
            }
        }
        Ok(())
    }
}
