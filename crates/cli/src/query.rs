//! `ppml simple-query` and `ppml query`.

use anyhow::{Context, Result, bail};
use datafusion::arrow::util::pretty::pretty_format_batches;
use ppml_engine::dataset::WriteOptions;
use ppml_engine::simple_query::{self, SimpleQueryReport};
use ppml_engine::{DatasetLocation, OutputTarget, PpmlSession};

use crate::cli::{QueryArgs, SimpleQueryArgs};
use crate::settings::{OpenKms, Settings};

/// Where the plans of an encrypted query run.
#[derive(Debug)]
pub enum Placement {
    /// In this process.
    Local {
        /// Parallelism, unless the application sets one.
        partitions: Option<usize>,
        /// Memory limit of the query engine, in bytes.
        memory: Option<usize>,
    },
    /// On the executors of a ppml cluster; this process is the driver.
    Cluster(Box<ClusterPlacement>),
}

/// A cluster to run on, and the job's settings.
pub struct ClusterPlacement {
    /// The scheduler, `host:port`.
    pub master: String,
    /// Partitions the plan is cut into [default: the session's].
    pub target_partitions: Option<usize>,
    /// `datafusion.*` / `ballista.*` settings.
    pub conf: Vec<(String, String)>,
    /// TLS of the driver's channels; `None` = cleartext (`--insecure-cleartext`).
    pub customizer: ppml_cluster::flight::EndpointCustomizer,
    /// Memory limit of the driver's query engine, in bytes.
    pub driver_memory: Option<usize>,
    /// A cluster-mode driver's job log, which records the jobs it runs.
    pub log: Option<ppml_cluster::jobs::DriverLog>,
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

impl Placement {
    /// In this process, with DataFusion's defaults.
    pub const LOCAL: Placement = Placement::Local {
        partitions: None,
        memory: None,
    };
}

/// An encrypted session whose plans run where `placement` says.
fn encrypted_session(
    kms: &OpenKms,
    partitions: Option<usize>,
    placement: &Placement,
) -> Result<PpmlSession> {
    let limited = |session: PpmlSession, memory: Option<usize>| match memory {
        Some(bytes) => session.with_memory_limit(bytes),
        None => session,
    };
    match placement {
        Placement::Local {
            partitions: default,
            memory,
        } => Ok(limited(
            PpmlSession::encrypted(kms.dyn_kms(), partitions.or(*default)),
            *memory,
        )),
        Placement::Cluster(cluster) => {
            let mut config = ppml_cluster::process::cluster_session_config();
            if let Some(n) = partitions.or(cluster.target_partitions).filter(|n| *n > 0) {
                config = config.with_target_partitions(n);
            }
            for (key, value) in &cluster.conf {
                config
                    .options_mut()
                    .set(key, value)
                    .with_context(|| format!("--conf {key}={value}"))?;
            }
            // Each job's shuffle key is wrapped under the input key: it is released only to
            // attested executors, like the inputs.
            let mut runner = ppml_cluster::ClusterRunner::new(
                cluster.master.clone(),
                kms.dyn_kms(),
                kms.primary()?.clone(),
                cluster.customizer.clone(),
            );
            if let Some(log) = &cluster.log {
                runner = runner.with_log(log.clone());
            }
            Ok(limited(
                PpmlSession::encrypted_with_config(kms.dyn_kms(), config),
                cluster.driver_memory,
            )
            .with_runner(std::sync::Arc::new(runner)))
        }
    }
}

/// Runs SimpleQuery; prints the count, the preview and the phase timings.
pub async fn simple_query(
    args: &SimpleQueryArgs,
    settings: &mut Settings,
) -> Result<SimpleQueryReport> {
    simple_query_on(args, settings, &Placement::LOCAL).await
}

/// Runs SimpleQuery where `placement` says.
pub async fn simple_query_on(
    args: &SimpleQueryArgs,
    settings: &mut Settings,
    placement: &Placement,
) -> Result<SimpleQueryReport> {
    let kms = if args.plaintext {
        None
    } else {
        Some(settings.open_kms_for_runtime().await?)
    };
    let report = run_simple_query(args, kms.as_ref(), placement).await?;
    print_report(&report, !args.no_preview);
    Ok(report)
}

/// Runs SimpleQuery with `kms` (None = plaintext) where `placement` says; prints nothing.
pub async fn run_simple_query(
    args: &SimpleQueryArgs,
    kms: Option<&OpenKms>,
    placement: &Placement,
) -> Result<SimpleQueryReport> {
    let report = if let Some(kms) = kms {
        let primary = kms.output_primary()?.clone();
        let session = encrypted_session(kms, args.input_partitions, placement)?;
        simple_query::run(
            &session,
            &args.input,
            OutputTarget::Encrypted {
                kms: kms.kms.as_ref(),
                primary: &primary,
                dir: args.output.clone(),
                options: WriteOptions {
                    overwrite: args.overwrite,
                    ..WriteOptions::default()
                },
            },
            args.output_partitions,
            !args.no_preview,
        )
        .await?
    } else {
        let session = PpmlSession::plaintext(args.input_partitions);
        simple_query::run(
            &session,
            &args.input,
            OutputTarget::Plaintext {
                dir: local_only(&args.output, "--plaintext output")?,
                overwrite: args.overwrite,
            },
            args.output_partitions,
            !args.no_preview,
        )
        .await?
    };
    Ok(report)
}

pub fn print_report(report: &SimpleQueryReport, preview: bool) {
    println!("count(name): {}", report.count);
    if preview {
        println!("{}", report.preview);
    }
    println!(
        "wrote {} rows in {} part(s)",
        report.output.rows, report.output.parts
    );
    for (phase, duration) in &report.timings {
        println!("{phase} time: {:.3} s", duration.as_secs_f64());
    }
}

/// The path of a local `location`; plaintext outputs are never written to object stores.
fn local_only<'a>(location: &'a DatasetLocation, what: &str) -> Result<&'a std::path::Path> {
    location
        .as_local()
        .with_context(|| format!("{location}: a {what} is written to a local directory only"))
}

pub fn parse_table(spec: &str) -> Result<(String, DatasetLocation)> {
    let Some((name, location)) = spec.split_once('=') else {
        bail!("--table {spec:?}: expected NAME=DIR or NAME=s3://BUCKET/PREFIX");
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("--table {spec:?}: table names are letters, digits and _");
    }
    let location = DatasetLocation::parse(location).with_context(|| format!("--table {spec:?}"))?;
    Ok((name.to_string(), location))
}

/// Runs SQL over named tables; prints the result or writes it as a dataset.
pub async fn query(args: &QueryArgs, settings: &mut Settings) -> Result<u64> {
    query_on(args, settings, &Placement::LOCAL).await
}

/// Runs SQL where `placement` says.
pub async fn query_on(
    args: &QueryArgs,
    settings: &mut Settings,
    placement: &Placement,
) -> Result<u64> {
    let kms = if args.plaintext {
        None
    } else {
        Some(settings.open_kms_for_runtime().await?)
    };
    run_query(args, kms.as_ref(), placement).await
}

/// The SQL of `--sql` or `--sql-file`.
pub fn query_text(args: &QueryArgs) -> Result<String> {
    match (&args.sql, &args.sql_file) {
        (Some(sql), None) => Ok(sql.clone()),
        (None, Some(file)) => {
            std::fs::read_to_string(file).with_context(|| format!("--sql-file {}", file.display()))
        }
        _ => bail!("give the query with --sql or --sql-file"),
    }
}

/// Runs SQL with `kms` (None = plaintext) where `placement` says; prints the result unless
/// it is written as a dataset.
pub async fn run_query(
    args: &QueryArgs,
    kms: Option<&OpenKms>,
    placement: &Placement,
) -> Result<u64> {
    let tables = args
        .tables
        .iter()
        .map(|t| parse_table(t))
        .collect::<Result<Vec<_>>>()?;
    let sql = query_text(args)?;
    let session = match kms {
        Some(kms) => encrypted_session(kms, args.input_partitions, placement)?,
        None => PpmlSession::plaintext(args.input_partitions),
    };
    for (name, location) in &tables {
        session
            .register_csv(name, location, None)
            .await
            .with_context(|| format!("registering table {name}"))?;
    }
    let df = session.sql(&sql).await?;
    match (&args.output, kms) {
        (Some(out), Some(kms)) => {
            let summary = session
                .write_csv(
                    df,
                    OutputTarget::Encrypted {
                        kms: kms.kms.as_ref(),
                        primary: kms.output_primary()?,
                        dir: out.clone(),
                        options: WriteOptions {
                            overwrite: args.overwrite,
                            ..WriteOptions::default()
                        },
                    },
                    args.output_partitions,
                )
                .await?;
            eprintln!(
                "wrote {} rows in {} part(s) to {out}",
                summary.rows, summary.parts
            );
            Ok(summary.rows)
        }
        (Some(out), None) => {
            let summary = session
                .write_csv(
                    df,
                    OutputTarget::Plaintext {
                        dir: local_only(out, "--plaintext output")?,
                        overwrite: args.overwrite,
                    },
                    args.output_partitions,
                )
                .await?;
            Ok(summary.rows)
        }
        (None, _) => {
            let batches = session.collect(df).await?;
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            println!("{}", pretty_format_batches(&batches)?);
            Ok(rows)
        }
    }
}
