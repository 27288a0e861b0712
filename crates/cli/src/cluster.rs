//! `ppml submit`, `ppml scheduler` and `ppml executor` (docs/cluster.md).

use anyhow::{Context, Result, bail};
use ppml_cluster::tls::{self, ClusterTls};

use ppml_cluster::app::{ClusterPlacement, Placement};
use ppml_cluster::driver::AppDriver;
use ppml_engine::app::AppSpec;

use crate::cli::{
    ClusterCertsArgs, ClusterTlsArgs, ExecutorArgs, SchedulerArgs, SubmitArgs, SubmitMode,
};
use crate::query;
use crate::settings::Settings;

/// Runs `app`, the application of `ppml submit`, where `--mode` says; returns the exit code.
pub async fn submit(args: &SubmitArgs, app: &AppSpec, settings: &mut Settings) -> Result<u8> {
    let driver_memory = args
        .driver_memory
        .as_deref()
        .map(|size| parse_size(size).with_context(|| format!("--driver-memory {size:?}")))
        .transpose()?;
    if args.executor_memory.is_some() {
        crate::usage_bail!(
            "--executor-memory: ppml executors are long-running; set their memory where they \
             start (`ppml executor --memory SIZE`, `ppml cluster up --executor-memory SIZE`)"
        );
    }
    let placement = match args.mode() {
        SubmitMode::Local => {
            if settings.tee.is_some() {
                crate::usage_bail!(
                    "--mode local runs without a TEE; use --mode local-tee with --tee"
                );
            }
            Placement::Local {
                partitions: args.driver_cores,
                memory: driver_memory,
            }
        }
        SubmitMode::LocalTee => {
            if settings.tee.is_none() {
                crate::usage_bail!(
                    "--mode local-tee needs --tee (sim, sgx or tdx) and a KMS server"
                );
            }
            Placement::Local {
                partitions: args.driver_cores,
                memory: driver_memory,
            }
        }
        SubmitMode::Cluster => {
            if args.driver_cores.is_some() {
                crate::usage_bail!(
                    "--driver-cores: in cluster mode the driver is one task on an executor; \
                     set the job's parallelism with --num-executors and --executor-cores"
                );
            }
            let tls = cluster_tls(&args.tls, tls::DRIVER, "submit")?;
            let conf = parse_conf(&args.conf)?;
            return crate::cluster_job::submit(
                args,
                app,
                settings,
                conf,
                driver_memory,
                tls.as_ref().and_then(tls::client_customizer),
            )
            .await;
        }
        SubmitMode::Client => {
            let master = args
                .master
                .clone()
                .context("--mode client needs --master HOST:PORT (the scheduler)")?;
            if app.is_plaintext() {
                crate::usage_bail!(
                    "--plaintext runs only in local mode: executors read only ppml datasets"
                );
            }
            let tls = cluster_tls(&args.tls, tls::DRIVER, "submit")?;
            let mut conf = parse_conf(&args.conf)?;
            if let Some(name) = &args.name {
                conf.push(("ballista.job.name".into(), name.clone()));
            }
            let target_partitions = match (args.num_executors, args.executor_cores) {
                (Some(executors), Some(cores)) => Some(executors * cores),
                (Some(executors), None) => Some(executors * 2),
                (None, Some(cores)) => Some(cores),
                (None, None) => None,
            };
            Placement::Cluster(Box::new(ClusterPlacement {
                master,
                target_partitions,
                conf,
                customizer: tls.as_ref().and_then(tls::client_customizer),
                driver_memory,
                log: None,
            }))
        }
    };
    if args.detach {
        crate::usage_bail!("--detach applies to --mode cluster only");
    }
    query::run(app, settings, placement).await?;
    Ok(crate::exit::OK)
}

/// `ppml status JOB`.
pub async fn job_status(args: &crate::cli::JobArgs) -> Result<u8> {
    let tls = cluster_tls(&args.tls, tls::DRIVER, "status")?;
    crate::cluster_job::status(args, tls.as_ref().and_then(tls::client_customizer)).await
}

/// `ppml logs JOB`.
pub async fn job_logs(args: &crate::cli::LogsArgs) -> Result<u8> {
    let tls = cluster_tls(&args.job.tls, tls::DRIVER, "logs")?;
    crate::cluster_job::logs(args, tls.as_ref().and_then(tls::client_customizer)).await
}

/// Parses a memory size as Spark writes them: a number of bytes, or with a `k`, `m`, `g` or
/// `t` suffix (binary multiples, case-insensitive, optional trailing `b`).
pub fn parse_size(text: &str) -> Result<usize> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        Some('t') => (&lower[..lower.len() - 1], 40),
        _ => (lower, 0),
    };
    let number: usize = digits
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a size such as 512m or 4g"))?;
    let bytes = number
        .checked_mul(1usize << shift)
        .with_context(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        crate::usage_bail!("a memory size must be more than 0");
    }
    Ok(bytes)
}

/// Parses `--conf KEY=VALUE` settings; `ppml.*` is reserved for the driver.
fn parse_conf(conf: &[String]) -> Result<Vec<(String, String)>> {
    conf.iter()
        .map(|entry| {
            let (key, value) = entry
                .split_once('=')
                .with_context(|| format!("--conf {entry:?}: expected KEY=VALUE"))?;
            if !(key.starts_with("datafusion.") || key.starts_with("ballista.")) {
                crate::usage_bail!(
                    "--conf {key}: only datafusion.* and ballista.* settings can be set"
                );
            }
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

/// The TLS material of `role` from `--cluster-tls`, or `None` with `--insecure-cleartext`
/// (after a loud warning). With neither, a usage error (exit 2).
fn cluster_tls(args: &ClusterTlsArgs, role: &str, command: &str) -> Result<Option<ClusterTls>> {
    match (&args.cluster_tls, args.insecure_cleartext) {
        (Some(dir), false) => {
            let loaded = ClusterTls::load(dir, role).with_context(|| {
                format!(
                    "--cluster-tls {}: loading the {role} certificate (create the directory \
                     with `ppml cluster certs --out DIR`)",
                    dir.display()
                )
            })?;
            if role != tls::DRIVER {
                loaded
                    .verify_server()
                    .with_context(|| format!("--cluster-tls {}", dir.display()))?;
            }
            Ok(Some(loaded))
        }
        (None, true) => {
            tracing::warn!(
                role,
                "--insecure-cleartext: cluster channels are NOT encrypted or authenticated"
            );
            eprintln!(
                "ppml: WARNING: --insecure-cleartext: the cluster channels of this {role} are \
                 neither encrypted nor authenticated (plans, wrapped keys, shuffle files); \
                 for development only, use --cluster-tls DIR otherwise"
            );
            Ok(None)
        }
        // clap refuses both together.
        (Some(_), true) => {
            crate::usage_bail!("--cluster-tls and --insecure-cleartext exclude each other")
        }
        (None, false) => usage_error(
            command,
            format!(
                "`ppml {command}{}` needs --cluster-tls DIR (mutual TLS; create DIR with \
                 `ppml cluster certs --out DIR`) or, for development only, --insecure-cleartext",
                if command == "submit" {
                    " --mode client|cluster"
                } else {
                    ""
                }
            ),
        ),
    }
}

/// Prints `message` as clap does for a usage error, with the usage of `ppml <command>`, and
/// exits 2.
fn usage_error(command: &str, message: String) -> ! {
    use clap::CommandFactory;
    let mut cli = crate::cli::Cli::command();
    cli.build();
    match cli.find_subcommand_mut(command) {
        Some(sub) => sub
            .error(clap::error::ErrorKind::MissingRequiredArgument, message)
            .exit(),
        None => cli
            .error(clap::error::ErrorKind::MissingRequiredArgument, message)
            .exit(),
    }
}

/// `ppml cluster certs`: the CA and the role certificates.
pub fn certs(args: &ClusterCertsArgs, quiet: bool) -> Result<()> {
    let written = tls::generate_cluster_certs(&args.out, &tls::ROLES, &args.hosts, args.force)?;
    for file in &written {
        println!("{}", file.display());
    }
    if quiet {
        return Ok(());
    }
    eprintln!(
        "cluster CA and certificates for {} in {} (the CA key was not kept); pass \
         --cluster-tls {} to `ppml scheduler`, `ppml executor` and `ppml submit --mode client`",
        tls::ROLES.join(", "),
        args.out.display(),
        args.out.display()
    );
    Ok(())
}

/// Binds the metrics server of `--metrics-addr` and says where it is. Plain HTTP: the metrics
/// are counts only, never values or keys (docs/cluster.md §10).
async fn metrics_listener(
    addr: Option<&str>,
    role: &str,
) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = ppml_cluster::metrics::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr {addr}: binding the {role}'s metrics server"))?;
    eprintln!(
        "ppml {role}: metrics on http://{}/metrics",
        listener.local_addr()?
    );
    Ok(Some(listener))
}

/// Runs the scheduler until Ctrl-C.
pub async fn scheduler(args: &SchedulerArgs) -> Result<()> {
    let mtls = cluster_tls(&args.tls, tls::SCHEDULER, "scheduler")?;
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .with_context(|| format!("binding the scheduler to {}", args.bind))?;
    let address = listener.local_addr()?;
    let metrics = metrics_listener(args.metrics_addr.as_deref(), "scheduler").await?;
    if mtls.is_some() {
        eprintln!("ppml scheduler: mutual TLS, clients need a certificate of the cluster CA");
    }
    eprintln!("ppml scheduler listening on {address}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    ppml_cluster::process::run_scheduler(
        listener,
        ppml_cluster::process::SchedulerOptions {
            executor_timeout_seconds: Some(args.executor_timeout),
            tls: mtls.as_ref().map(tls::server_tls),
            customizer: mtls.as_ref().and_then(tls::client_customizer),
            metrics_listener: metrics,
        },
        shutdown,
    )
    .await?;
    Ok(())
}

/// Attests (with --tee), then runs an executor until it is stopped.
pub async fn executor(args: &ExecutorArgs, settings: &mut Settings) -> Result<()> {
    let memory = args
        .memory
        .as_deref()
        .map(|size| parse_size(size).with_context(|| format!("--memory {size:?}")))
        .transpose()?;
    let (scheduler_host, scheduler_port) = args
        .master
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
        .with_context(|| format!("--master {:?}: expected HOST:PORT", args.master))?;
    let mtls = cluster_tls(&args.tls, tls::EXECUTOR, "executor")?;
    let metrics = metrics_listener(args.metrics_addr.as_deref(), "executor").await?;
    // Attestation happens here, before the executor exists: a refused executor exits without
    // ever registering with the scheduler, so it is never given a task.
    let kms = settings.open_kms_for_runtime().await?;
    if settings.tee.is_none() {
        tracing::warn!("executor started without --tee: it is not attested (development only)");
        eprintln!(
            "WARNING: this executor is not attested (no --tee): it can read only keys that are \
             not marked for attested release. Use --tee in production."
        );
    }
    // Reaching this point with --tee means the attestation succeeded, except with
    // --attestation-debug, which continues after a refusal: then nothing is counted.
    let attested = settings.tee.is_some() && !settings.attestation_debug;
    let external_host = args.external_host.clone().unwrap_or(args.bind_host.clone());
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| settings.home.join(format!("executor-{}", args.flight_port)));
    let executor_id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("ppml-{external_host}-{}", args.flight_port));
    eprintln!(
        "ppml executor {executor_id}: scheduler {}, shuffle service {external_host}:{}, work dir {}",
        args.master,
        args.flight_port,
        work_dir.display()
    );
    ppml_cluster::process::run_executor_monitored(
        ppml_cluster::process::ExecutorOptions {
            executor_id,
            scheduler_host,
            scheduler_port,
            bind_host: args.bind_host.clone(),
            external_host,
            flight_port: args.flight_port,
            work_dir,
            vcores: args.cores.unwrap_or(0),
            memory_pool_size: memory.map(|bytes| bytes as u64),
            kms: kms.kms(),
            customizer: mtls.as_ref().and_then(tls::client_customizer),
            driver: Some(std::sync::Arc::new(AppDriver {
                input_key: kms.primary.clone(),
                output_key: kms.output.clone(),
                durability: settings.durability,
            })),
            flight_tls: mtls.as_ref().map(tls::server_tls),
        },
        ppml_cluster::process::ExecutorMonitoring {
            metrics_listener: metrics,
            attested,
        },
    )
    .await?;
    Ok(())
}

fn cluster_dir(dir: &crate::cli::ClusterDirArgs, settings: &Settings) -> std::path::PathBuf {
    dir.dir
        .clone()
        .unwrap_or_else(|| settings.home.join("cluster"))
}

/// The command's KMS, TEE and attestation options, as the environment of the cluster's
/// processes (so secrets such as the api key never appear in their command lines).
fn forwarded_env(global: &crate::cli::GlobalArgs, settings: &Settings) -> Vec<(String, String)> {
    let mut env = vec![("PPML_HOME".to_string(), settings.home.display().to_string())];
    let mut put = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            env.push((name.to_string(), value));
        }
    };
    put(
        "PPML_CONFIG",
        global.config.as_ref().map(|p| p.display().to_string()),
    );
    put("PPML_APPID", global.appid.clone());
    put("PPML_APIKEY", global.apikey.clone());
    put("PPML_PRIMARY_KEY", global.primary_key.clone());
    put("PPML_KMS_URL", global.kms_url.clone());
    put("PPML_KMS_FINGERPRINT", global.kms_fingerprint.clone());
    put(
        "PPML_KMS_CA_CERT",
        global.kms_ca_cert.as_ref().map(|p| p.display().to_string()),
    );
    put(
        "PPML_KMS_POLICY",
        global.kms_policy.as_ref().map(|p| p.display().to_string()),
    );
    put(
        "PPML_KMS_COLLATERAL",
        global
            .kms_collateral
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    put(
        "PPML_TEE",
        global.tee.and_then(|tee| {
            clap::ValueEnum::to_possible_value(&tee).map(|v| v.get_name().to_string())
        }),
    );
    put("PPML_ATTESTATION_POLICY", global.attestation_policy.clone());
    put(
        "PPML_SIM_PLATFORM_KEY",
        global
            .sim_platform_key
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    env
}

/// `ppml cluster up`.
pub fn up(
    args: &crate::cli::ClusterUpArgs,
    global: &crate::cli::GlobalArgs,
    settings: &Settings,
) -> Result<()> {
    if args.executors == 0 || args.executor_cores == 0 {
        crate::usage_bail!("--executors and --executor-cores must be at least 1");
    }
    if let Some(size) = &args.executor_memory {
        parse_size(size).with_context(|| format!("--executor-memory {size:?}"))?;
    }
    let dir = cluster_dir(&args.dir, settings);
    let state = ppml_cluster::local::up(&ppml_cluster::local::UpOptions {
        executable: std::env::current_exe().context("locating the ppml executable")?,
        dir: dir.clone(),
        executors: args.executors,
        executor_cores: args.executor_cores,
        port: args.port,
        executor_memory: args.executor_memory.clone(),
        insecure_cleartext: args.insecure_cleartext,
        env: forwarded_env(global, settings),
    })?;
    println!("master = \"{}\"", state.master);
    if let Some(tls) = &state.tls_dir {
        println!("cluster_tls = \"{}\"", tls.display());
    }
    if !settings.quiet {
        eprintln!(
            "started a scheduler and {} executor(s); logs in {}\nmetrics (Prometheus, plain HTTP): {}\nsubmit with: ppml submit --mode client --master {} {} …\nstop with: ppml cluster down{}",
            args.executors,
            dir.display(),
            state
                .processes
                .iter()
                .filter_map(|p| p.metrics.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
            state.master,
            match &state.tls_dir {
                Some(tls) => format!("--cluster-tls {}", tls.display()),
                None => "--insecure-cleartext".to_string(),
            },
            match &args.dir.dir {
                Some(d) => format!(" --dir {}", d.display()),
                None => String::new(),
            }
        );
    }
    Ok(())
}

/// `ppml cluster down`.
pub fn down(args: &crate::cli::ClusterDirArgs, settings: &Settings) -> Result<()> {
    let dir = cluster_dir(args, settings);
    let stopped = ppml_cluster::local::down(&dir)?;
    if !settings.quiet {
        eprintln!(
            "stopped {stopped} process(es) of the cluster in {}",
            dir.display()
        );
    }
    Ok(())
}

/// `ppml cluster status`: one line per process; exit 1 if any is not running.
pub fn status(args: &crate::cli::ClusterDirArgs, settings: &Settings) -> Result<()> {
    let dir = cluster_dir(args, settings);
    let Some((state, alive)) = ppml_cluster::local::status(&dir)? else {
        bail!("no cluster recorded in {}", dir.display());
    };
    println!("master {}", state.master);
    for (process, alive) in state.processes.iter().zip(&alive) {
        println!(
            "{:<12} pid {:<8} {:<8} log {}{}",
            process.name,
            process.pid,
            if *alive { "running" } else { "stopped" },
            process.log.display(),
            match &process.metrics {
                Some(url) => format!(" metrics {url}"),
                None => String::new(),
            }
        );
    }
    if alive.iter().all(|a| *a) {
        Ok(())
    } else {
        bail!("some processes of the cluster are not running")
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_as_spark_writes_them() {
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("64kb").unwrap(), 64 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        for bad in ["", "m", "-1g", "1.5g", "0", "99999999999999999999t"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
