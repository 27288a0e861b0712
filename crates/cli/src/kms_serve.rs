//! `ppml kms serve`: the eHSM-compatible KMS server; and `ppml kms audit verify`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ppml_kms_server::server::{
    AttestationSettings, KmsServer, RootKeySource, ServerConfig, TlsMode,
};

use crate::cli::{AuditShowArgs, AuditVerifyArgs, KmsServeArgs, PccsArgs, RootKeyArgs};
use crate::settings::Settings;

/// A PCCS client caching in `cache_dir`, if `args` name a PCCS.
pub fn pccs_client(
    args: &PccsArgs,
    cache_dir: &Path,
) -> Result<Option<ppml_attestation::pccs::PccsClient>> {
    let Some(url) = &args.pccs_url else {
        return Ok(None);
    };
    Ok(Some(ppml_attestation::pccs::PccsClient::new(
        url,
        &pccs_options(args, Some(cache_dir.to_path_buf())),
    )?))
}

fn pccs_options(
    args: &PccsArgs,
    cache_dir: Option<PathBuf>,
) -> ppml_attestation::pccs::PccsOptions {
    ppml_attestation::pccs::PccsOptions {
        ca_cert: args.pccs_ca_cert.clone(),
        cache_dir,
        refresh_secs: args.collateral_refresh,
    }
}

fn data_dir(flag: &Option<PathBuf>, settings: &Settings) -> PathBuf {
    flag.clone()
        .or_else(|| settings.server.data_dir.clone())
        .unwrap_or_else(|| settings.home.join("kms-server"))
}

/// Whether the flags, env vars or `[server]` table give the server a root key.
fn root_key_given(args: &RootKeyArgs, settings: &Settings) -> bool {
    args.root_key_file.is_some()
        || args.passphrase_file.is_some()
        || settings.server.root_key_file.is_some()
        || settings.server.passphrase_file.is_some()
        || std::env::var_os("PPML_KMS_ROOT_KEY").is_some()
        || std::env::var_os("PPML_KMS_PASSPHRASE").is_some()
}

/// The root key source of the flags, env vars and `[server]` table.
fn root_key(args: &RootKeyArgs, settings: &Settings) -> RootKeySource {
    RootKeySource::from_env_or(
        args.passphrase_file
            .clone()
            .or_else(|| settings.server.passphrase_file.clone()),
        args.root_key_file
            .clone()
            .or_else(|| settings.server.root_key_file.clone()),
    )
}

fn tls_san(flag: &[String], settings: &Settings) -> Vec<String> {
    if flag.is_empty() {
        settings.server.tls_san.clone()
    } else {
        flag.to_vec()
    }
}

/// `ppml kms init --server`: everything `ppml kms serve` would create on first start.
pub fn init_server(args: &crate::cli::KmsInitArgs, settings: &Settings) -> Result<()> {
    if settings.tee.is_some() {
        crate::usage_bail!(
            "a KMS in a TEE has no root key on its host to initialise: start it with `ppml kms \
             serve --tee ...` and make its store with the owner's first `ppml kms unseal --create`"
        );
    }
    let mut config = ServerConfig::new(data_dir(&args.data_dir, settings));
    config.root_key = root_key(&args.root, settings);
    config.tls = TlsMode::SelfSigned {
        extra_names: tls_san(&args.tls_san, settings),
    };
    let made = ppml_kms_server::server::init_data_dir(&config)?;
    println!(
        "KMS server data directory ready: {}",
        config.data_dir.display()
    );
    println!("kms id: {}", made.kms_id);
    if let Some(fingerprint) = made.fingerprint {
        println!("certificate fingerprint: {fingerprint}");
    }
    Ok(())
}

/// The server configuration of `ppml kms serve`: flags over env vars over `[server]`.
fn server_config(args: &KmsServeArgs, settings: &Settings) -> Result<ServerConfig> {
    let file = &settings.server;
    let mut config = ServerConfig::new(data_dir(&args.data_dir, settings));
    if let Some(listen) = args.listen.clone().or_else(|| file.listen.clone()) {
        config.listen = listen;
    }
    // In a TEE the root key comes only from the owner's unseal; one given by the host is
    // passed on so that the server refuses it by name.
    config.root_key = if settings.tee.is_some() && !root_key_given(&args.root, settings) {
        RootKeySource::Unseal
    } else {
        root_key(&args.root, settings)
    };
    config.bigdl_ras = args.enable_bigdl_ras || file.bigdl_ras;
    config.tls = if args.insecure_http || file.insecure_http {
        TlsMode::InsecureHttp
    } else {
        match (
            args.tls_cert.clone().or_else(|| file.tls_cert.clone()),
            args.tls_key.clone().or_else(|| file.tls_key.clone()),
        ) {
            (Some(cert), Some(key)) => TlsMode::Files { cert, key },
            (None, None) => TlsMode::SelfSigned {
                extra_names: tls_san(&args.tls_san, settings),
            },
            _ => crate::usage_bail!("--tls-cert and --tls-key go together"),
        }
    };
    let pccs = PccsArgs {
        pccs_url: args.pccs.pccs_url.clone().or_else(|| file.pccs_url.clone()),
        pccs_ca_cert: args
            .pccs
            .pccs_ca_cert
            .clone()
            .or_else(|| file.pccs_ca_cert.clone()),
        collateral_refresh: args.pccs.collateral_refresh.or(file.collateral_refresh),
    };
    config.own_tee = settings.tee.map(|tee| ppml_kms_server::OwnTee {
        tee: tee.tee(),
        sim_platform_key: settings
            .sim_platform_key
            .clone()
            .unwrap_or_else(|| settings.home.join("sim-platform.pk8")),
    });
    config.attestation = AttestationSettings {
        allow_simulation: args.allow_simulation || file.allow_simulation,
        sgx_collateral: args
            .sgx_collateral
            .clone()
            .or_else(|| file.sgx_collateral.clone()),
        tdx_collateral: args
            .tdx_collateral
            .clone()
            .or_else(|| file.tdx_collateral.clone()),
        pccs_url: pccs.pccs_url.clone(),
        pccs: pccs_options(&pccs, None),
        token_ttl: args.attestation_token_ttl.or(file.attestation_token_ttl),
    };
    Ok(config)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

pub async fn run(args: &KmsServeArgs, settings: &Settings) -> Result<()> {
    let server = KmsServer::start(&server_config(args, settings)?).await?;
    use std::io::Write as _;
    let url = server.url();
    // Scripts wait for these lines (with the real port when --listen ends in :0).
    match server.tls() {
        None => println!("ppml kms listening on {url}"),
        Some(identity) if server.is_sealed() => {
            // Made in memory for this start: clients trust it through the KMS's quote.
            println!("ppml kms listening on {url}");
            println!("certificate fingerprint: {}", identity.fingerprint);
            println!(
                "clients: --kms-url {url} --kms-policy KMS_POLICY (the certificate is new at \
                 each start and bound to the KMS's quote)"
            );
        }
        Some(identity) => {
            if identity.generated {
                eprintln!(
                    "ppml: created a self-signed TLS certificate in {}",
                    identity.cert_path.display()
                );
            }
            println!("ppml kms listening on {url}");
            println!("certificate fingerprint: {}", identity.fingerprint);
            println!(
                "clients: --kms-url {url} --kms-fingerprint {} (or PPML_KMS_URL, PPML_KMS_FINGERPRINT)",
                identity.fingerprint
            );
        }
    }
    if server.is_sealed() {
        println!(
            "the KMS is sealed: its owner unseals it with `ppml kms unseal --kms-url {url} \
             --kms-policy KMS_POLICY --root-key-file ROOT_KEY`"
        );
    }
    std::io::stdout().flush()?;
    // Operators record the head outside the machine: it is what shows a truncated tail.
    match server.run(shutdown_signal()).await? {
        Some(head) => eprintln!(
            "ppml: audit log head at shutdown: seq {} hash {}",
            head.seq, head.hash
        ),
        None => eprintln!("ppml: the KMS was never unsealed"),
    }
    Ok(())
}

/// `ppml kms unseal`: sends the owner's root key to the KMS that the KMS policy accepts.
pub async fn unseal(args: &crate::cli::UnsealArgs, settings: &Settings) -> Result<()> {
    let config = settings
        .remote_config()?
        .context("unsealing needs the KMS's URL (--kms-url or PPML_KMS_URL)")?;
    let policy_path = settings
        .kms_policy
        .clone()
        .context("unsealing needs a KMS policy (--kms-policy): the root key goes only to a KMS whose quote satisfies it")?;
    let (root_key, created) =
        ppml_kms_server::server::owner_root_key_file(&args.root_key_file, args.create)?;
    if created {
        eprintln!(
            "ppml: created a new root key in {}: it is the only way to unseal this KMS after a \
             restart; keep it safe and off the KMS's host",
            args.root_key_file.display()
        );
    }
    let head_file = args.audit_head_file();
    let last_head = ppml::read_kms_audit_head(&head_file)?;
    let outcome =
        ppml_kms_client::RemoteKms::unseal(&config, &root_key, last_head.as_ref()).await?;
    let root_id = hex::encode(outcome.root_id);
    if outcome.was_sealed {
        println!("unsealed KMS {}", outcome.kms_id);
        if let Some(head) = &outcome.audit_head {
            ppml::write_kms_audit_head(&head_file, head)?;
            println!(
                "audit head: entry {} (kept in {} for the next unseal)",
                head.seq,
                head_file.display()
            );
        }
    } else {
        println!("KMS {} already holds this root key", outcome.kms_id);
    }
    println!("root id: {root_id}");
    if args.pin {
        if ppml::pin_kms_root_id(&policy_path, &outcome.root_id)? {
            println!(
                "pinned: {} now names this root id (kms_root_ids)",
                policy_path.display()
            );
        }
    } else if !config.kms_policy.as_ref().is_some_and(|p| {
        p.policy
            .kms_root_id_values()
            .is_ok_and(|ids| ids.contains(&outcome.root_id))
    }) {
        println!(
            "clients trust any root key until the KMS policy pins this one: add it to \
             kms_root_ids in {} (or run again with --pin)",
            policy_path.display()
        );
    }
    Ok(())
}

/// The audit log `args` name and the key of its MACs (none with `--chain-only`).
fn audit_log_and_key(
    args: &AuditVerifyArgs,
    settings: &Settings,
) -> Result<(PathBuf, Option<zeroize::Zeroizing<[u8; 32]>>)> {
    let dir = data_dir(&args.data_dir, settings);
    let log = args.log.clone().unwrap_or_else(|| dir.join("audit.log"));
    let mac_key = if args.chain_only {
        None
    } else {
        let root = ppml_kms_server::server::load_root_key(&dir, &root_key(&args.root, settings))
            .context("the root key is needed to check the entries' MACs (or pass --chain-only)")?;
        Some(root.audit_mac_key())
    };
    Ok((log, mac_key))
}

/// `ppml kms audit show --job ID`: the entries of one job, from a log that verifies.
pub fn audit_show(args: &AuditShowArgs, settings: &Settings) -> Result<()> {
    let (log, mac_key) = audit_log_and_key(&args.log, settings)?;
    let (report, entries) =
        ppml_kms_server::audit::job_entries(&log, mac_key.as_deref(), &args.job)
            .with_context(|| format!("{}: the audit log does not verify", log.display()))?;
    println!("seq\ttime\tappid\taction\tkeyid\toutcome\truntime");
    for logged in &entries {
        let entry = &logged.entry;
        // The attested runtime's TEE, policy and measurement, from the token claims the
        // entry recorded.
        let runtime = entry
            .attestation
            .as_deref()
            .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
            .map(|claims| {
                let measurements = &claims["claims"]["measurements"];
                format!(
                    "{} policy={} measurement={}",
                    claims["claims"]["tee"].as_str().unwrap_or("?"),
                    claims["policy"].as_str().unwrap_or("?"),
                    measurements["mrenclave"]
                        .as_str()
                        .or(measurements["mrtd"].as_str())
                        .unwrap_or("?")
                )
            })
            .unwrap_or_else(|| "-".into());
        let time = chrono::DateTime::from_timestamp_millis(logged.time_ms as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        println!(
            "{}\t{time}\t{}\t{}\t{}\t{}\t{runtime}",
            logged.seq, entry.appid, entry.action, entry.keyid, entry.outcome
        );
    }
    if !settings.quiet {
        eprintln!(
            "{} entries of job {} among {} in {}, chain intact{}",
            entries.len(),
            args.job,
            report.entries,
            log.display(),
            if mac_key.is_some() {
                ", every MAC valid"
            } else {
                " (MACs not checked)"
            }
        );
    }
    Ok(())
}

pub fn audit_verify(args: &AuditVerifyArgs, settings: &Settings) -> Result<()> {
    let (log, mac_key) = audit_log_and_key(args, settings)?;
    let report = ppml_kms_server::audit::verify(&log, mac_key.as_deref())
        .with_context(|| format!("{}: the audit log does not verify", log.display()))?;
    println!(
        "{}: {} entries, chain intact{}",
        log.display(),
        report.entries,
        if mac_key.is_some() {
            ", every MAC valid"
        } else {
            " (MACs not checked)"
        }
    );
    println!("head: seq {} hash {}", report.entries, report.head_hash);
    Ok(())
}
