//! The `ppml` command. See `ppml --help`.

mod attest;
mod bigdl_submit;
mod cli;
mod cluster;
mod cluster_job;
mod crypt;
mod exit;
mod generate;
mod import;
mod job_file;
mod kms_bench;
mod kms_serve;
mod kms_utils;
mod progress;
mod query;
mod quickstart;
mod receipt;
mod settings;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use ppml_kms::LocalKms;
use tracing_subscriber::EnvFilter;

use crate::cli::{AuditCommand, Cli, Command, Generate, KmsCommand};
use ppml::KmsBackend;

use crate::settings::Settings;

/// Fills what ppml's own flags and variables leave unset from BigDL's attestation variables,
/// for the commands that run as a runtime (docs/migrating-from-bigdl.md §4).
fn apply_bigdl_env(cli: &mut Cli) -> Result<()> {
    if !matches!(
        cli.command,
        Command::SimpleQuery(_) | Command::Query(_) | Command::Submit(_) | Command::Executor(_)
    ) {
        return Ok(());
    }
    let Some(bigdl) = ppml::bigdl_env::BigDlAttestationEnv::from_env()? else {
        return Ok(());
    };
    let global = &mut cli.global;
    global.bigdl_attestation = true;
    global.tee = global.tee.or(Some(match bigdl.tee {
        ppml::Tee::Tdx => cli::TeeKind::Tdx,
        ppml::Tee::Sim => cli::TeeKind::Sim,
        ppml::Tee::Sgx => cli::TeeKind::Sgx,
    }));
    global.attestation_policy = global.attestation_policy.take().or(bigdl.policy_id);
    global.attestation_debug |= bigdl.debug;
    global.kms_url = global.kms_url.take().or(bigdl.kms_url);
    global.appid = global.appid.take().or(bigdl.appid);
    global.apikey = global.apikey.take().or(bigdl.apikey);
    Ok(())
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(e) = apply_bigdl_env(&mut cli) {
        eprintln!("ppml: error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    if let Err(e) = init_logging(cli.global.verbose, cli.global.log_file.as_deref()) {
        let file = cli
            .global
            .log_file
            .as_ref()
            .map(|p| p.display().to_string());
        eprintln!("ppml: error: --log-file {}: {e}", file.unwrap_or_default());
        return ExitCode::from(exit::FAILURE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ppml: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let in_tee = cli.global.tee.is_some();
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::from(exit::OK);
            }
            if in_tee {
                // stderr goes to the host: errors that can quote row values (Arrow's and
                // DataFusion's) are reduced to their kind, as an executor's are.
                let error: &(dyn std::error::Error + 'static) = err.as_ref();
                eprintln!(
                    "ppml: error: {}",
                    ppml_cluster::redact::driver_error_text(error)
                );
                return exit::code_for(&err);
            }
            eprintln!("ppml: error: {err}");
            // Wrapped library errors often repeat their source's text; print each cause once.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                    shown = text;
                }
            }
            exit::code_for(&err)
        }
    }
}

fn init_logging(verbose: u8, log_file: Option<&std::path::Path>) -> std::io::Result<()> {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs the command; returns its exit code (errors are mapped by `exit::code_for`).
async fn run(cli: Cli) -> Result<u8> {
    let mut settings = Settings::resolve(&cli.global)?;
    match &cli.command {
        Command::Generate(Generate::People(args)) => {
            generate::run(args, settings.quiet, settings.durability)?;
        }
        Command::Encrypt(args) => {
            let summary = crypt::encrypt(args, &mut settings).await?;
            if !settings.quiet {
                eprintln!(
                    "encrypted {} bytes into {} part(s) in {}",
                    summary.plaintext_bytes, summary.parts, args.out
                );
            }
        }
        Command::KmsUtils(args) => kms_utils::run(args, &mut settings).await?,
        Command::BigdlSubmit(args) => {
            let args = args.as_ref();
            let verbose = cli.global.verbose > 0;
            return tokio::task::block_in_place(|| {
                bigdl_submit::run(args, verbose, settings.quiet)
            });
        }
        Command::Import(cli::ImportCommand::Bigdl(args)) => {
            let summary = import::bigdl(args, &mut settings).await?;
            if !settings.quiet {
                eprintln!(
                    "imported BigDL {} dataset: {} part(s), {} bytes, every part's MAC {}, into {}",
                    summary.variant,
                    summary.parts,
                    summary.plaintext_bytes,
                    if summary.variant.is_authenticated() {
                        "verified"
                    } else {
                        "ABSENT (not verified)"
                    },
                    args.out
                );
            }
        }
        Command::Decrypt(args) => {
            let amount = crypt::decrypt(args, &mut settings).await?;
            if !settings.quiet {
                let unit = if args.to.is_some() { "rows" } else { "bytes" };
                eprintln!("decrypted {amount} {unit} from {}", args.input);
            }
        }
        Command::SimpleQuery(args) => {
            let spec = query::simple_query_spec(args);
            query::run(&spec, &mut settings, ppml_cluster::app::Placement::LOCAL).await?;
        }
        Command::Query(args) => {
            let spec = query::query_spec(args)?;
            query::run(&spec, &mut settings, ppml_cluster::app::Placement::LOCAL).await?;
        }
        Command::Quickstart(args) => quickstart::run(args, &mut settings).await?,
        Command::Submit(args) => {
            let (args, app) = job_file::merge(args.as_ref().clone())?;
            return cluster::submit(&args, &app, &mut settings).await;
        }
        Command::Scheduler(args) => cluster::scheduler(args).await?,
        Command::Executor(args) => cluster::executor(args, &mut settings).await?,
        Command::Cluster(crate::cli::ClusterCommand::Certs(args)) => {
            cluster::certs(args, settings.quiet)?
        }
        Command::Cluster(crate::cli::ClusterCommand::Up(args)) => {
            cluster::up(args, &cli.global, &settings)?
        }
        Command::Cluster(crate::cli::ClusterCommand::Down(args)) => cluster::down(args, &settings)?,
        Command::Cluster(crate::cli::ClusterCommand::Status(args)) => {
            cluster::status(args, &settings)?
        }
        Command::Status(args) => return cluster::job_status(args).await,
        Command::Logs(args) => return cluster::job_logs(args).await,
        Command::Grant(args) => grant(args, &settings).await?,
        Command::Receipt(crate::cli::ReceiptCommand::Show(args)) => receipt::show(args).await?,
        Command::Receipt(crate::cli::ReceiptCommand::Verify(args)) => {
            receipt::verify(args, &mut settings).await?
        }
        Command::Attest(crate::cli::AttestCommand::Verify(args)) => {
            attest::verify(args, &settings).await?
        }
        Command::Attest(crate::cli::AttestCommand::Measure) => attest::measure()?,
        Command::Attest(crate::cli::AttestCommand::Quote(args)) => attest::quote(args, &settings)?,
        Command::Attest(crate::cli::AttestCommand::SimPlatform) => attest::sim_platform(&settings)?,
        Command::Attest(crate::cli::AttestCommand::Policy(command)) => {
            attest::policy(command, &mut settings).await?
        }
        Command::Attest(crate::cli::AttestCommand::Serve(args)) => {
            kms_serve::run(args, &settings).await?
        }
        Command::Kms(command) => kms_command(command, &mut settings).await?,
    }
    Ok(exit::OK)
}

async fn kms_command(command: &KmsCommand, settings: &mut Settings) -> Result<()> {
    let dir = settings.kms_dir();
    match command {
        KmsCommand::Init(args) if args.server => kms_serve::init_server(args, settings)?,
        KmsCommand::Init(_) => {
            if settings.kms_url.is_some() {
                crate::usage_bail!(
                    "`ppml kms init` creates the embedded KMS; a KMS server initialises itself \
                     on first start (`ppml kms serve`)"
                );
            }
            LocalKms::init(&dir)?;
            println!("embedded KMS ready in {}", dir.display());
        }
        KmsCommand::Enroll(args) => {
            let remote = settings.connect_remote_anonymous().await?;
            let creds = match remote {
                Some(remote) if args.no_owner_key || !remote.is_ppml_server() => {
                    eprintln!(
                        "enrolling without an owner key: the api key alone controls this app, \
                         and its keys cannot be marked for attested release"
                    );
                    remote.enroll().await?
                }
                Some(_) => {
                    let (creds, owner_key) = settings.enroll_owned().await?;
                    eprintln!(
                        "owner key: {} (it alone can mark, disable, rotate or delete this \
                         app's keys: keep it on the data owner's machine, never where jobs run)",
                        owner_key.display()
                    );
                    creds
                }
                None => {
                    LocalKms::init(&dir)?;
                    LocalKms::enroll(&dir)?
                }
            };
            println!("appid = \"{}\"", creds.appid);
            println!("apikey = \"{}\"", *creds.apikey);
            eprintln!("keep the api key secret: it is shown only now");
        }
        KmsCommand::CreateKey => {
            let kms = settings.open_kms().await?;
            let id = kms.kms().create_primary_key().await?;
            println!("{id}");
        }
        KmsCommand::ListKeys => {
            let kms = settings.open_kms().await?;
            match &kms.backend {
                KmsBackend::Embedded(local) => {
                    for id in local.list_keys()? {
                        println!("{id}");
                    }
                }
                _ => {
                    let remote = kms.backend.remote().expect("a KMS server");
                    for key in remote.list_keys().await? {
                        println!(
                            "{}\t{}\t{}",
                            key.keyid,
                            key.keyspec,
                            if key.enabled { "enabled" } else { "disabled" }
                        );
                    }
                }
            }
        }
        KmsCommand::ReleasePolicy(args) => {
            let kms = settings.open_kms().await?;
            let keyid = match &args.keyid {
                Some(id) => id.clone(),
                None => kms.primary()?.0.clone(),
            };
            let Some(remote) = kms.backend.remote() else {
                crate::usage_bail!("attested key release needs a KMS server (--kms-url)");
            };
            let policy_id = match (&args.policy_id, &args.policy) {
                (Some(id), _) => id.clone(),
                (None, Some(path)) => remote.upload_policy(&attest::read_policy(path)?).await?,
                (None, None) => crate::usage_bail!("--policy or --policy-id is needed"),
            };
            remote
                .set_release_policy(&ppml_kms::PrimaryKeyId(keyid.clone()), &policy_id)
                .await?;
            println!("{policy_id}");
            eprintln!("{keyid}: data keys are now released only to runtimes this policy accepts");
        }
        KmsCommand::Rotate(arg) | KmsCommand::Disable(arg) | KmsCommand::Enable(arg) => {
            let kms = settings.open_kms().await?;
            let keyid = match &arg.keyid {
                Some(id) => ppml_kms::PrimaryKeyId(id.clone()),
                None => kms.primary()?.clone(),
            };
            let Some(remote) = kms.backend.remote() else {
                anyhow::bail!(
                    "the embedded KMS keeps one version per key and cannot disable keys; \
                     use a KMS server (--kms-url) for key rotation and lifecycle"
                );
            };
            match command {
                KmsCommand::Rotate(_) => {
                    let version = remote.rotate_key(&keyid).await?;
                    println!("{keyid}: now at version {version}");
                }
                KmsCommand::Disable(_) => {
                    remote.set_enabled(&keyid, false).await?;
                    println!("{keyid}: disabled");
                }
                _ => {
                    remote.set_enabled(&keyid, true).await?;
                    println!("{keyid}: enabled");
                }
            }
        }
        KmsCommand::Serve(args) => kms_serve::run(args, settings).await?,
        KmsCommand::Unseal(args) => kms_serve::unseal(args, settings).await?,
        KmsCommand::Bench(args) => kms_bench::run(args, settings).await?,
        KmsCommand::Audit(AuditCommand::Verify(args)) => kms_serve::audit_verify(args, settings)?,
        KmsCommand::Audit(AuditCommand::Show(args)) => kms_serve::audit_show(args, settings)?,
    }
    Ok(())
}

/// `ppml grant`: describes the job, signs it with the owner key, writes the file.
async fn grant(args: &crate::cli::GrantArgs, settings: &Settings) -> Result<()> {
    let spec = query::submit_app_spec(&args.app)?.with_absolute_paths()?;
    let options = ppml::grant::GrantOptions {
        lifetime: std::time::Duration::from_secs(args.lifetime),
        pin_versions: !args.no_pin,
        ..settings.grant_options.clone()
    };
    let output_key = settings.output_primary_key();
    let job = ppml::grant::GrantedJob::App {
        spec: &spec,
        output_key: output_key.as_ref(),
    };
    let signed = settings.sign_grant(job, &options).await?;
    let grant = signed.unverified().map_err(ppml::KmsError::from)?;
    ppml::grant::write_grant(&args.out, &signed)?;
    if !settings.quiet {
        eprintln!(
            "granted job {} ({}; {} input(s), counts {}) until unix time {}: {}",
            grant.job_id,
            spec.summary(),
            grant.inputs.len(),
            if grant.reveal_counts {
                "revealed"
            } else {
                "withheld"
            },
            grant.not_after,
            args.out.display()
        );
    }
    Ok(())
}
