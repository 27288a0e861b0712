//! `ppml simple-query` and `ppml query`: the application as an [`AppSpec`], run where the
//! placement says ([`ppml_cluster::app::run_app`]), its report printed.

use anyhow::{Context, Result, bail};
use datafusion::arrow::util::pretty::pretty_format_batches;
use ppml_cluster::app::{AppKeys, Placement, run_app};
use ppml_engine::app::{AppReport, AppSpec, SimpleQuerySpec, SqlSpec};
use ppml_engine::simple_query::SimpleQueryReport;

use crate::cli::{QueryArgs, SimpleQueryArgs, SubmitApp};
use crate::settings::Settings;

/// The application of `ppml simple-query`.
pub fn simple_query_spec(args: &SimpleQueryArgs) -> AppSpec {
    AppSpec::SimpleQuery(SimpleQuerySpec {
        input: args.input.clone(),
        output: args.output.clone(),
        input_partitions: args.input_partitions,
        output_partitions: args.output_partitions,
        overwrite: args.overwrite,
        plaintext: args.plaintext,
        no_preview: args.no_preview,
    })
}

/// The application of `ppml query` (the SQL read from `--sql-file` if given).
pub fn query_spec(args: &QueryArgs) -> Result<AppSpec> {
    let sql = match (&args.sql, &args.sql_file) {
        (Some(sql), None) => sql.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("--sql-file {}", file.display()))?,
        _ => crate::usage_bail!("give the query with --sql or --sql-file"),
    };
    let mut tables = std::collections::BTreeMap::new();
    for spec in &args.tables {
        let (name, location) =
            SqlSpec::parse_table(spec).with_context(|| format!("--table {spec:?}"))?;
        if tables.insert(name.clone(), location).is_some() {
            crate::usage_bail!("--table {name}: given twice");
        }
    }
    Ok(AppSpec::Sql(SqlSpec {
        sql,
        tables,
        output: args.output.clone(),
        input_partitions: args.input_partitions,
        output_partitions: args.output_partitions,
        output_format: args.output_format,
        overwrite: args.overwrite,
        plaintext: args.plaintext,
    }))
}

/// The application of `ppml submit … simple-query|query`.
pub fn submit_app_spec(app: &SubmitApp) -> Result<AppSpec> {
    match app {
        SubmitApp::SimpleQuery(args) => Ok(simple_query_spec(args)),
        SubmitApp::Query(args) => query_spec(args),
    }
}

/// Runs `spec` where `placement` says, attesting first with `--tee`; prints its report.
pub async fn run(
    spec: &AppSpec,
    settings: &mut Settings,
    placement: Placement,
) -> Result<AppReport> {
    // In a TEE, stdout and stderr go to the host: rows leave the runtime only encrypted.
    let in_tee = settings.tee.is_some();
    if let (true, AppSpec::Sql(sql)) = (in_tee, spec)
        && sql.output.is_none()
    {
        crate::usage_bail!(
            "with --tee the result leaves the runtime only encrypted: give --output (the \
             result rows would otherwise be printed to the host)"
        );
    }
    let mut reveal_counts = !in_tee;
    let keys = if spec.is_plaintext() {
        None
    } else {
        let kms = settings.open_kms_for_runtime().await?;
        let output = kms.output_primary()?.clone();
        // An attested runtime runs under the owner's grant of this job (a file, or one the
        // owner key on this machine signs now); without one, the KMS releases it no key of an
        // owner's marked keys.
        let grant = match kms.backend {
            ppml::KmsBackend::Attested(_) => {
                let job = ppml::grant::GrantedJob::App {
                    spec,
                    output_key: Some(&output),
                };
                settings.job_grant(job, &settings.grant_options).await?
            }
            _ => None,
        };
        if let Some(grant) = &grant {
            reveal_counts |= grant
                .unverified()
                .map_err(ppml::KmsError::from)?
                .reveal_counts;
        }
        let input = match &placement {
            Placement::Cluster(_) => Some(kms.primary()?.clone()),
            Placement::Local { .. } => kms.primary.clone(),
        };
        Some(AppKeys {
            kms: kms.kms(),
            output,
            input,
            grant,
        })
    };
    let report = run_app(spec, keys.as_ref(), &placement, settings.durability).await?;
    match (&report, spec) {
        (AppReport::SimpleQuery(report), AppSpec::SimpleQuery(spec)) => {
            // The preview prints rows; under --tee it would print them to the host.
            print_report(report, !spec.no_preview && !in_tee, reveal_counts)
        }
        (AppReport::Sql(report), AppSpec::Sql(spec)) => match (&report.written, &spec.output) {
            (Some(_), Some(out)) if !spec.plaintext && !reveal_counts => {
                eprintln!("wrote {out}")
            }
            (Some(written), Some(out)) if !spec.plaintext => eprintln!(
                "wrote {} rows in {} part(s) to {out}",
                written.rows, written.parts
            ),
            (Some(_), _) => {}
            (None, _) => println!("{}", pretty_format_batches(&report.batches)?),
        },
        _ => bail!("the application reported another application's result"),
    }
    Ok(report)
}

/// Prints SimpleQuery's count, preview, output and phase timings, as the original does; the
/// counts only when `counts` (in a TEE, when the owner's grant allows them).
pub fn print_report(report: &SimpleQueryReport, preview: bool, counts: bool) {
    if counts {
        println!("count(name): {}", report.count);
    }
    if preview {
        println!("{}", report.preview);
    }
    if counts {
        println!(
            "wrote {} rows in {} part(s)",
            report.output.rows, report.output.parts
        );
    } else {
        println!("wrote {} part(s)", report.output.parts);
    }
    for (phase, duration) in &report.timings {
        println!("{phase} time: {:.3} s", duration.as_secs_f64());
    }
}
