//! `ppml submit --mode cluster`, `ppml status` and `ppml logs` (docs/cluster.md §4) over
//! [`ppml_cluster::submit::JobClient`]. The submitting process holds no key and opens no
//! dataset; the driver runs on an attested executor ([`ppml_cluster::driver::AppDriver`]).

use anyhow::{Result, bail};
use ppml_cluster::driver::DriverSpec;
use ppml_cluster::flight::EndpointCustomizer;
use ppml_cluster::submit::{JobClient, JobState};
use ppml_engine::app::AppSpec;

use crate::cli::{JobArgs, LogsArgs, SubmitArgs};
use crate::exit;
use crate::settings::Settings;

/// The exit code for a job's state (see `ppml status --help`).
fn state_code(state: &JobState) -> u8 {
    match state {
        JobState::Succeeded { .. } => exit::OK,
        JobState::Queued | JobState::Running => exit::JOB_PENDING,
        JobState::Unknown => exit::JOB_UNKNOWN,
        _ => exit::FAILURE,
    }
}

/// Prints the job's log until it ends (or once, without `follow`), then what its final state
/// says; returns the state's exit code.
async fn follow(client: &JobClient, master: &str, job_id: &str, follow: bool) -> Result<u8> {
    let state = client
        .follow(job_id, follow, |line| println!("{line}"))
        .await?;
    match &state {
        JobState::Failed { error } => eprintln!("job {job_id} failed: {error}"),
        JobState::Unknown => eprintln!("the scheduler at {master} does not know job {job_id}"),
        _ => {}
    }
    Ok(state_code(&state))
}

/// `ppml submit --mode cluster`: submits the driver job; prints its id; follows it unless
/// `--detach`. Returns the exit code.
pub async fn submit(
    args: &SubmitArgs,
    app: &AppSpec,
    settings: &Settings,
    conf: Vec<(String, String)>,
    driver_memory: Option<usize>,
    customizer: EndpointCustomizer,
) -> Result<u8> {
    let Some(master) = args.master.clone() else {
        crate::usage_bail!("--mode cluster needs --master HOST:PORT (the scheduler)");
    };
    if app.is_plaintext() {
        crate::usage_bail!(
            "--plaintext runs only in local mode: executors read only ppml datasets"
        );
    }
    if app.output().is_none() {
        crate::usage_bail!(
            "--mode cluster writes the result as an encrypted dataset: give --output DIR \
             (nothing is printed on the submitting machine)"
        );
    }
    let mut spec = DriverSpec::new(app)?;
    spec.input_key = settings.primary_key.clone();
    spec.output_key = settings.output_key.clone();
    // The job runs under the owner's grant: a file, or one the owner key here signs now.
    let output_key = settings.output_primary_key();
    let job = ppml::grant::GrantedJob::App {
        spec: &spec.app,
        output_key: output_key.as_ref(),
    };
    if let Some(grant) = settings.job_grant(job, &settings.grant_options).await? {
        let granted_output = grant
            .unverified()
            .map_err(ppml::KmsError::from)?
            .output
            .map(|o| o.key_id);
        spec.output_key = spec.output_key.or(granted_output);
        spec.grant = Some(grant);
    }
    spec.target_partitions = args
        .num_executors
        .zip(args.executor_cores)
        .map(|(n, c)| n * c);
    spec.conf = conf;
    spec.driver_memory = driver_memory;
    let summary = spec.summary.clone();
    let client = JobClient::connect(&master, &customizer).await?;
    let job_id = client.submit(spec, args.name.as_deref()).await?;
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
    let code = follow(&client, &master, &job_id, true).await?;
    if code == exit::FAILURE {
        bail!("job {job_id} failed (see the lines above)");
    }
    Ok(code)
}

/// `ppml status JOB`: prints the job's state; the exit code says it to scripts.
pub async fn status(args: &JobArgs, customizer: EndpointCustomizer) -> Result<u8> {
    let client = JobClient::connect(&args.master, &customizer).await?;
    let status = client.status(&args.job).await?;
    let (word, detail) = match &status.state {
        JobState::Queued => ("queued", String::new()),
        JobState::Running => ("running", String::new()),
        JobState::Succeeded { duration } => {
            ("succeeded", format!(" in {:.1} s", duration.as_secs_f64()))
        }
        JobState::Failed { error } => ("failed", format!(": {error}")),
        _ => ("unknown", " to the scheduler".to_string()),
    };
    let name = if status.name.is_empty() {
        String::new()
    } else {
        format!("\t({})", status.name)
    };
    println!("{}\t{word}{detail}{name}", args.job);
    Ok(state_code(&status.state))
}

/// `ppml logs JOB [-f]`.
pub async fn logs(args: &LogsArgs, customizer: EndpointCustomizer) -> Result<u8> {
    let client = JobClient::connect(&args.job.master, &customizer).await?;
    let code = follow(&client, &args.job.master, &args.job.job, args.follow).await?;
    // Without -f the lines are the answer: the job's state does not make it fail.
    Ok(if args.follow { code } else { exit::OK })
}
