//! A local development cluster of separate processes (`ppml cluster up|down|status`).
//!
//! [`up`] starts one scheduler and N executors on loopback, each a child process of its own
//! (in its own process group, so it outlives `up` and a Ctrl-C in the terminal), with its
//! output in `<dir>/<name>.log`, and records them in `<dir>/cluster.json`. The executors get
//! the KMS and attestation settings of the invoking command through the environment (they
//! attest exactly as `ppml executor` does). [`down`] stops them: SIGTERM, then SIGKILL after a
//! grace period.
//!
//! Ports: the scheduler listens on PORT and executor i's shuffle service on PORT+1+i; their
//! Prometheus metrics (plain HTTP, loopback, counts only) are on PORT+100 (scheduler) and
//! PORT+101+i (executor i), recorded in `cluster.json`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ClusterError;

type Result<T, E = ClusterError> = std::result::Result<T, E>;

fn failed(message: impl Into<String>) -> ClusterError {
    ClusterError::Setup(message.into())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |e| failed(format!("{}: {e}", path.display()))
}

/// What `up` started.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterState {
    /// The scheduler, `host:port`.
    pub master: String,
    /// The directory with the TLS material, when the cluster uses TLS.
    pub tls_dir: Option<PathBuf>,
    /// Every process, scheduler first.
    pub processes: Vec<ClusterProcess>,
}

/// One process of the cluster.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterProcess {
    /// `scheduler` or `executor-<i>`.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
    /// Its Prometheus metrics, `http://HOST:PORT/metrics` (absent in older state files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// Offset of the scheduler's metrics port from its port; executor i's is one more plus i.
pub const METRICS_PORT_OFFSET: u16 = 100;

const STATE_FILE: &str = "cluster.json";

/// How to start a local cluster.
#[derive(Debug)]
pub struct UpOptions {
    /// The `ppml` executable whose `scheduler` and `executor` commands are started.
    pub executable: PathBuf,
    /// Directory for logs, work dirs, certificates and the state file.
    pub dir: PathBuf,
    /// Executors to start.
    pub executors: usize,
    /// Cores per executor.
    pub executor_cores: usize,
    /// The scheduler's port; executors' shuffle services use the next ports.
    pub port: u16,
    /// Memory per executor (`ppml executor --memory`), checked by the caller.
    pub executor_memory: Option<String>,
    /// Use cleartext instead of TLS (development only).
    pub insecure_cleartext: bool,
    /// Environment for every process: the KMS, TEE and attestation settings.
    pub env: Vec<(String, String)>,
}

fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                // Field 3 is the state; Z is a zombie (exited, not yet reaped).
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
                    .is_some_and(|state| state != 'Z')
            })
            .unwrap_or(false)
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn read_state(dir: &Path) -> Result<Option<ClusterState>> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| failed(format!("{}: {e}", path.display())))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn spawn(
    exe: &Path,
    dir: &Path,
    name: &str,
    env: &[(String, String)],
    args: &[String],
) -> Result<ClusterProcess> {
    use std::os::unix::process::CommandExt;
    let log = dir.join(format!("{name}.log"));
    let out = File::create(&log).map_err(io(&log))?;
    let err = out.try_clone().map_err(io(&log))?;
    let child = Command::new(exe)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| failed(format!("starting the {name} ({}): {e}", exe.display())))?;
    Ok(ClusterProcess {
        name: name.to_string(),
        pid: child.id(),
        log,
        metrics: None,
    })
}

/// Waits until `log` contains `needle` while `pid` lives; errors with the log's tail if the
/// process exits first or `timeout` passes.
fn wait_for_log(process: &ClusterProcess, needle: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let text = fs::read_to_string(&process.log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if !is_alive(process.pid) || started.elapsed() > timeout {
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(failed(format!(
                "the {} {} (log {}):\n{}",
                process.name,
                if is_alive(process.pid) {
                    "did not start in time"
                } else {
                    "exited"
                },
                process.log.display(),
                tail.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the cluster; on any failure stops what it started.
pub fn up(options: &UpOptions) -> Result<ClusterState> {
    if let Some(state) = read_state(&options.dir)?
        && state.processes.iter().any(|p| is_alive(p.pid))
    {
        return Err(failed(format!(
            "a cluster is already running from {} (master {}); run `ppml cluster down` first",
            options.dir.display(),
            state.master
        )));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&options.dir)
            .map_err(io(&options.dir))?;
    }
    let tls_dir = (!options.insecure_cleartext).then(|| options.dir.join("tls"));
    if let Some(tls_dir) = &tls_dir
        && !tls_dir.join("ca.pem").exists()
    {
        crate::tls::generate_cluster_certs(tls_dir, &crate::tls::ROLES, &[], false)?;
    }
    let transport = |args: &mut Vec<String>| match &tls_dir {
        Some(dir) => {
            args.push("--cluster-tls".into());
            args.push(dir.display().to_string());
        }
        None => args.push("--insecure-cleartext".into()),
    };
    let last_port =
        usize::from(options.port) + usize::from(METRICS_PORT_OFFSET) + options.executors;
    if options.executors >= usize::from(METRICS_PORT_OFFSET) {
        return Err(failed(format!(
            "at most {} executors: their shuffle ports would reach the metrics ports",
            METRICS_PORT_OFFSET - 1
        )));
    }
    if last_port > usize::from(u16::MAX) {
        return Err(failed(format!(
            "--port {} leaves no room for {} executors and their metrics ports (up to PORT+{})",
            options.port,
            options.executors,
            usize::from(METRICS_PORT_OFFSET) + options.executors
        )));
    }
    let metrics_addr = |i: usize| {
        format!(
            "127.0.0.1:{}",
            usize::from(options.port) + usize::from(METRICS_PORT_OFFSET) + i
        )
    };
    let metrics_url = |addr: &str| format!("http://{addr}/metrics");
    let master = format!("127.0.0.1:{}", options.port);
    let mut state = ClusterState {
        master: master.clone(),
        tls_dir: tls_dir.clone(),
        processes: Vec::new(),
    };
    let result = (|| -> Result<()> {
        let scheduler_metrics = metrics_addr(0);
        let mut args = vec![
            "scheduler".to_string(),
            "--bind".into(),
            master.clone(),
            "--metrics-addr".into(),
            scheduler_metrics.clone(),
        ];
        transport(&mut args);
        let mut scheduler = spawn(
            &options.executable,
            &options.dir,
            "scheduler",
            &options.env,
            &args,
        )?;
        scheduler.metrics = Some(metrics_url(&scheduler_metrics));
        let started = wait_for_log(&scheduler, "listening on", Duration::from_secs(30));
        state.processes.push(scheduler);
        started?;
        for i in 0..options.executors {
            let name = format!("executor-{i}");
            let mut args = vec![
                "executor".to_string(),
                "--master".into(),
                master.clone(),
                "--flight-port".into(),
                (options.port as usize + 1 + i).to_string(),
                "--cores".into(),
                options.executor_cores.to_string(),
                "--id".into(),
                name.clone(),
                "--work-dir".into(),
                options.dir.join(&name).display().to_string(),
                "--metrics-addr".into(),
                metrics_addr(1 + i),
            ];
            if let Some(memory) = &options.executor_memory {
                args.push("--memory".into());
                args.push(memory.clone());
            }
            transport(&mut args);
            let mut executor = spawn(
                &options.executable,
                &options.dir,
                &name,
                &options.env,
                &args,
            )?;
            executor.metrics = Some(metrics_url(&metrics_addr(1 + i)));
            let started = wait_for_log(&executor, "ppml executor", Duration::from_secs(60));
            state.processes.push(executor);
            started?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        stop(&state.processes, Duration::from_secs(5));
        return Err(e);
    }
    let path = options.dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(&state).map_err(|e| failed(e.to_string()))?;
    fs::write(&path, json).map_err(io(&path))?;
    Ok(state)
}

/// Stops `processes` (last first): SIGTERM, then SIGKILL after `grace`.
fn stop(processes: &[ClusterProcess], grace: Duration) {
    for process in processes.iter().rev() {
        if is_alive(process.pid) {
            signal(process.pid, "TERM");
        }
    }
    let started = Instant::now();
    while processes.iter().any(|p| is_alive(p.pid)) && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(100));
    }
    for process in processes {
        if is_alive(process.pid) {
            signal(process.pid, "KILL");
        }
    }
}

/// Stops the cluster recorded in `dir`; returns how many processes were running.
pub fn down(dir: &Path) -> Result<usize> {
    let Some(state) = read_state(dir)? else {
        return Err(failed(format!(
            "no cluster recorded in {} (nothing to stop)",
            dir.display()
        )));
    };
    let running = state.processes.iter().filter(|p| is_alive(p.pid)).count();
    stop(&state.processes, Duration::from_secs(10));
    fs::remove_file(dir.join(STATE_FILE)).map_err(io(dir))?;
    Ok(running)
}

/// The recorded cluster and which of its processes run.
pub fn status(dir: &Path) -> Result<Option<(ClusterState, Vec<bool>)>> {
    Ok(read_state(dir)?.map(|state| {
        let alive = state.processes.iter().map(|p| is_alive(p.pid)).collect();
        (state, alive)
    }))
}
