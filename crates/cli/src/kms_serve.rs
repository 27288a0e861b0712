//! `ppml kms serve`: the eHSM-compatible KMS server; and `ppml kms audit verify`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ppml_kms_server::tls::{TlsIdentity, serve_tls};
use ppml_kms_server::{RootKey, ServerState, Store, router};
use serde::Deserialize;

use crate::cli::{AuditVerifyArgs, KmsServeArgs, PccsArgs, RootKeyArgs};
use crate::settings::Settings;

const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

/// `[server]` of the configuration file: the same options as the flags of `ppml kms serve`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub root_key_file: Option<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_san: Vec<String>,
    #[serde(default)]
    pub insecure_http: bool,
    pub sgx_collateral: Option<PathBuf>,
    pub tdx_collateral: Option<PathBuf>,
    pub pccs_url: Option<String>,
    pub pccs_ca_cert: Option<PathBuf>,
    pub collateral_refresh: Option<u64>,
    pub attestation_token_ttl: Option<u64>,
}

impl ServerSection {
    /// `self` where set, otherwise `lower`.
    pub fn over(self, lower: ServerSection) -> ServerSection {
        ServerSection {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            root_key_file: self.root_key_file.or(lower.root_key_file),
            passphrase_file: self.passphrase_file.or(lower.passphrase_file),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_san: if self.tls_san.is_empty() {
                lower.tls_san
            } else {
                self.tls_san
            },
            insecure_http: self.insecure_http || lower.insecure_http,
            sgx_collateral: self.sgx_collateral.or(lower.sgx_collateral),
            tdx_collateral: self.tdx_collateral.or(lower.tdx_collateral),
            pccs_url: self.pccs_url.or(lower.pccs_url),
            pccs_ca_cert: self.pccs_ca_cert.or(lower.pccs_ca_cert),
            collateral_refresh: self.collateral_refresh.or(lower.collateral_refresh),
            attestation_token_ttl: self.attestation_token_ttl.or(lower.attestation_token_ttl),
        }
    }
}

/// A PCCS client caching in `cache_dir`, if `args` name a PCCS.
pub fn pccs_client(
    args: &PccsArgs,
    cache_dir: &Path,
) -> Result<Option<ppml_attestation::pccs::PccsClient>> {
    let Some(url) = &args.pccs_url else {
        return Ok(None);
    };
    let options = ppml_attestation::pccs::PccsOptions {
        ca_cert: args.pccs_ca_cert.clone(),
        cache_dir: Some(cache_dir.to_path_buf()),
        refresh_secs: args.collateral_refresh,
    };
    Ok(Some(ppml_attestation::pccs::PccsClient::new(
        url, &options,
    )?))
}

fn data_dir(flag: &Option<PathBuf>, settings: &Settings) -> PathBuf {
    flag.clone()
        .or_else(|| settings.server.data_dir.clone())
        .unwrap_or_else(|| settings.home.join("kms-server"))
}

fn read_private(path: &Path, what: &str) -> Result<zeroize::Zeroizing<String>> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is readable by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} {}", path.display()))?,
    ))
}

/// The root key, from (first match) PPML_KMS_ROOT_KEY, a passphrase (PPML_KMS_PASSPHRASE or a
/// passphrase file), or the root key file. With `create`, a missing key file (or salt) is
/// created; otherwise its absence is an error.
fn root_key(args: &RootKeyArgs, settings: &Settings, dir: &Path, create: bool) -> Result<RootKey> {
    if let Ok(hex_key) = std::env::var("PPML_KMS_ROOT_KEY") {
        let hex_key = zeroize::Zeroizing::new(hex_key);
        return RootKey::from_hex(&hex_key).map_err(|e| anyhow::anyhow!("PPML_KMS_ROOT_KEY: {e}"));
    }
    let passphrase = match (
        std::env::var("PPML_KMS_PASSPHRASE").ok(),
        args.passphrase_file
            .clone()
            .or_else(|| settings.server.passphrase_file.clone()),
    ) {
        (Some(p), _) => Some(zeroize::Zeroizing::new(p)),
        (None, Some(file)) => {
            let text = read_private(&file, "passphrase file")?;
            Some(zeroize::Zeroizing::new(
                text.trim_end_matches(['\r', '\n']).to_string(),
            ))
        }
        (None, None) => None,
    };
    if let Some(passphrase) = passphrase {
        if passphrase.is_empty() {
            bail!("the KMS passphrase is empty");
        }
        let salt_path = dir.join("root.salt");
        let salt = if salt_path.exists() {
            let text = std::fs::read_to_string(&salt_path)
                .with_context(|| format!("reading {}", salt_path.display()))?;
            RootKey::salt_from_hex(text.trim())
                .map_err(|e| anyhow::anyhow!("{}: {e}", salt_path.display()))?
        } else if create {
            std::fs::create_dir_all(dir)?;
            let salt = RootKey::generate_salt().map_err(anyhow::Error::msg)?;
            ppml_kms::write_private_file_atomic(
                &salt_path,
                format!("{}\n", hex::encode(salt)).as_bytes(),
            )
            .with_context(|| format!("writing {}", salt_path.display()))?;
            salt
        } else {
            bail!("{} does not exist", salt_path.display());
        };
        tracing::info!("deriving the root key from the passphrase (Argon2id)");
        return RootKey::from_passphrase(passphrase.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("deriving the root key: {e}"));
    }
    let path = args
        .root_key_file
        .clone()
        .or_else(|| settings.server.root_key_file.clone())
        .unwrap_or_else(|| dir.join("root.key"));
    if !path.exists() {
        if !create {
            bail!(
                "no root key: {} does not exist and neither PPML_KMS_ROOT_KEY nor a passphrase \
                 is set",
                path.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let (key, hex_key) = RootKey::generate().map_err(anyhow::Error::msg)?;
        ppml_kms::write_private_file_atomic(&path, format!("{}\n", *hex_key).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ppml: created a new root key in {}", path.display());
        return Ok(key);
    }
    let text = read_private(&path, "root key file")?;
    RootKey::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Creates `dir` (mode 0700) if needed, then opens the root key, the store and the audit log.
pub(crate) fn open_server_state(
    root: &RootKeyArgs,
    settings: &Settings,
    dir: &Path,
) -> Result<(
    Store,
    ppml_kms_server::audit::AuditLog,
    zeroize::Zeroizing<[u8; 32]>,
)> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let root = root_key(root, settings, dir, true)?;
    let audit_key = root.audit_mac_key();
    let attestation_seed = root.attestation_seed();
    let store = Store::open(dir, root)
        .map_err(|e| anyhow::anyhow!("opening the store in {}: {e}", dir.display()))?;
    let audit = ppml_kms_server::audit::AuditLog::open(dir, &audit_key)
        .with_context(|| format!("opening the audit log in {}", dir.display()))?;
    Ok((store, audit, attestation_seed))
}

/// `ppml kms init --server`: everything `ppml kms serve` would create on first start.
pub fn init_server(args: &crate::cli::KmsInitArgs, settings: &Settings) -> Result<()> {
    let dir = data_dir(&args.data_dir, settings);
    let (store, _audit, _) = open_server_state(&args.root, settings, &dir)?;
    let sans = if args.tls_san.is_empty() {
        settings.server.tls_san.clone()
    } else {
        args.tls_san.clone()
    };
    let identity = TlsIdentity::self_signed_in(&dir.join("tls"), &sans)?;
    println!("KMS server data directory ready: {}", dir.display());
    println!("kms id: {}", store.kms_id());
    println!("certificate fingerprint: {}", identity.fingerprint);
    Ok(())
}

pub async fn run(args: &KmsServeArgs, settings: &Settings) -> Result<()> {
    let config = &settings.server;
    let dir = data_dir(&args.data_dir, settings);
    let listen = args
        .listen
        .clone()
        .or_else(|| config.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let insecure_http = args.insecure_http || config.insecure_http;
    let (store, audit, attestation_seed) = open_server_state(&args.root, settings, &dir)?;
    let mut attestation =
        ppml_attestation::service::AttestationService::new(store.kms_id(), &attestation_seed)?;
    drop(attestation_seed);
    for path in &args.trust_sim_platform {
        let platform = ppml_attestation::sim::SimPlatform::load_or_create(path)
            .with_context(|| format!("loading the simulation platform key {}", path.display()))?;
        tracing::warn!(
            path = %path.display(),
            "trusting a SIMULATION platform key: simulated TEEs can attest (policies must still allow simulation)"
        );
        attestation.trust_sim_platform(platform.public_key());
    }
    for (tee, path) in [
        (
            ppml_attestation::Tee::Sgx,
            args.sgx_collateral
                .as_ref()
                .or(config.sgx_collateral.as_ref()),
        ),
        (
            ppml_attestation::Tee::Tdx,
            args.tdx_collateral
                .as_ref()
                .or(config.tdx_collateral.as_ref()),
        ),
    ] {
        if let Some(path) = path {
            attestation.set_collateral(tee, ppml_attestation::dcap::Collateral::from_file(path)?);
        }
    }
    let pccs = PccsArgs {
        pccs_url: args
            .pccs
            .pccs_url
            .clone()
            .or_else(|| config.pccs_url.clone()),
        pccs_ca_cert: args
            .pccs
            .pccs_ca_cert
            .clone()
            .or_else(|| config.pccs_ca_cert.clone()),
        collateral_refresh: args.pccs.collateral_refresh.or(config.collateral_refresh),
    };
    if let Some(ttl) = args.attestation_token_ttl.or(config.attestation_token_ttl) {
        attestation.set_token_ttl(ttl);
    }
    if let Some(client) = pccs_client(&pccs, &dir.join("collateral-cache"))? {
        tracing::info!(pccs = ?client, "DCAP collateral from the PCCS");
        attestation.set_pccs(client);
    }

    let tls = if insecure_http {
        None
    } else {
        let cert = args.tls_cert.clone().or_else(|| config.tls_cert.clone());
        let key = args.tls_key.clone().or_else(|| config.tls_key.clone());
        Some(match (cert, key) {
            (Some(cert), Some(key)) => TlsIdentity::from_pem_files(&cert, &key)?,
            (None, None) => {
                let sans = if args.tls_san.is_empty() {
                    config.tls_san.clone()
                } else {
                    args.tls_san.clone()
                };
                TlsIdentity::self_signed_in(&dir.join("tls"), &sans)?
            }
            _ => bail!("--tls-cert and --tls-key go together"),
        })
    };

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(
        ServerState::new(store)
            .with_audit(audit)
            .with_attestation(attestation),
    );
    let app = router(state.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    use std::io::Write as _;
    match tls {
        None => {
            tracing::warn!(
                "serving plain HTTP (--insecure-http): requests and keys are not encrypted in transit"
            );
            // Scripts wait for this line (with the real port when --listen ends in :0).
            println!("ppml kms listening on http://{addr}");
            std::io::stdout().flush()?;
            use axum::serve::ListenerExt as _;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        Some(identity) => {
            if identity.generated {
                eprintln!(
                    "ppml: created a self-signed TLS certificate in {}",
                    identity.cert_path.display()
                );
            }
            println!("ppml kms listening on https://{addr}");
            println!("certificate fingerprint: {}", identity.fingerprint);
            println!(
                "clients: --kms-url https://{addr} --kms-fingerprint {} (or PPML_KMS_URL, PPML_KMS_FINGERPRINT)",
                identity.fingerprint
            );
            std::io::stdout().flush()?;
            serve_tls(listener, identity.config.clone(), app, shutdown).await?;
        }
    }
    if let Some(audit) = state.audit() {
        // Operators record this outside the machine: it is what shows a truncated tail.
        let head = audit.head();
        eprintln!(
            "ppml: audit log head at shutdown: seq {} hash {}",
            head.seq, head.hash
        );
    }
    Ok(())
}

pub fn audit_verify(args: &AuditVerifyArgs, settings: &Settings) -> Result<()> {
    let dir = data_dir(&args.data_dir, settings);
    let log = args.log.clone().unwrap_or_else(|| dir.join("audit.log"));
    let mac_key = if args.chain_only {
        None
    } else {
        let root = root_key(&args.root, settings, &dir, false)
            .context("the root key is needed to check the entries' MACs (or pass --chain-only)")?;
        Some(root.audit_mac_key())
    };
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
