//! Starting a KMS server: the one entry point of `ppml kms serve`, `ppml attest serve`, the
//! quickstart's in-process server and any program that embeds the KMS.
//!
//! [`ServerConfig`] says where the data directory is, where the root key comes from, how TLS is
//! set up and what the attestation service trusts. [`KmsServer::start`] opens the data
//! directory (creating it, mode 0700, with a new root key or passphrase salt on first start),
//! the store, the audit log and the attestation service, loads or creates the TLS identity and
//! binds the listener; [`KmsServer::run`] serves until shutdown. [`serve`] does both.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ppml_attestation::Tee;
use ppml_attestation::dcap::Collateral;
use ppml_attestation::pccs::{PccsClient, PccsOptions};
use ppml_attestation::service::AttestationService;
use zeroize::Zeroizing;

use crate::api::OwnEvidence;
use crate::audit::{AuditError, AuditHead, AuditLog};
use crate::sealed::SealedKms;
use crate::tls::{TlsError, TlsIdentity, serve_tls};
use crate::{ApiError, RootKey, ServerState, Store, router};

/// Address `ppml kms serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

/// Why a KMS server could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A file or directory of the server could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A secret file (root key, passphrase) is readable by others.
    #[error("{path} is readable by other users (mode {mode:o}); run chmod 600 on it")]
    InsecureFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The root key material is malformed, or could not be derived or generated.
    #[error("{source_name}: {reason}")]
    RootKey {
        /// Where it came from (an env var or a file).
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// No root key source is given and the key file does not exist.
    #[error(
        "no root key: {0} does not exist and neither PPML_KMS_ROOT_KEY nor a passphrase is set"
    )]
    NoRootKey(PathBuf),
    /// A KMS in a TEE was given a root key by the host (a file, an env var or a passphrase):
    /// it takes its root key only from an owner's `Unseal`.
    #[error(
        "a KMS in a TEE takes its root key only from its owner (`ppml kms unseal`), never from \
         the host: drop the root key file, passphrase and PPML_KMS_ROOT_KEY"
    )]
    HostRootKeyInTee,
    /// A KMS in a TEE was given a TLS key by the host: the host could then serve the
    /// certificate the KMS's quote binds, and read what clients send.
    #[error(
        "a KMS in a TEE makes its own TLS key at each start, bound to its quote; drop \
         --tls-cert and --tls-key"
    )]
    HostTlsKeyInTee,
    /// [`RootKeySource::Unseal`] outside a TEE: nothing could prove the KMS to an owner.
    #[error("only a KMS in a TEE (--tee) can be unsealed by attestation")]
    UnsealOutsideTee,
    /// The store could not be opened (a wrong root key among others).
    #[error("opening the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        source: ApiError,
    },
    /// The audit log could not be opened.
    #[error("opening the audit log in {dir}: {source}")]
    Audit {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: AuditError,
    },
    /// The TLS identity could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The attestation service could not be set up (keys, collateral, PCCS).
    #[error("attestation service: {0}")]
    Attestation(String),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// Where the root key comes from (`docs/kms-api.md` §8).
#[derive(Clone)]
pub enum RootKeySource {
    /// 64 hex characters (`PPML_KMS_ROOT_KEY`).
    Hex(Zeroizing<String>),
    /// A passphrase (`PPML_KMS_PASSPHRASE`): Argon2id with the salt in `DATA_DIR/root.salt`.
    Passphrase(Zeroizing<String>),
    /// A file holding the passphrase (mode 0600; a final newline is dropped).
    PassphraseFile(PathBuf),
    /// A key file of 64 hex characters (mode 0600), created at random on first start;
    /// `None` is [`default_root_key_file`], next to the data directory.
    KeyFile(Option<PathBuf>),
    /// None on the host: the KMS, in a TEE, starts sealed and an owner sends the root key
    /// to its attested unseal key (`docs/attestation.md` §9).
    Unseal,
}

impl std::fmt::Debug for RootKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootKeySource::Hex(_) => f.write_str("Hex(<redacted>)"),
            RootKeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            RootKeySource::PassphraseFile(path) => write!(f, "PassphraseFile({path:?})"),
            RootKeySource::KeyFile(path) => write!(f, "KeyFile({path:?})"),
            RootKeySource::Unseal => f.write_str("Unseal"),
        }
    }
}

impl Default for RootKeySource {
    fn default() -> Self {
        RootKeySource::KeyFile(None)
    }
}

impl RootKeySource {
    /// The source in the documented order of precedence: `PPML_KMS_ROOT_KEY`, then
    /// `PPML_KMS_PASSPHRASE`, then `passphrase_file`, then the key file `key_file` (default
    /// [`default_root_key_file`]).
    pub fn from_env_or(passphrase_file: Option<PathBuf>, key_file: Option<PathBuf>) -> Self {
        if let Ok(hex_key) = std::env::var("PPML_KMS_ROOT_KEY") {
            return RootKeySource::Hex(Zeroizing::new(hex_key));
        }
        if let Ok(passphrase) = std::env::var("PPML_KMS_PASSPHRASE") {
            return RootKeySource::Passphrase(Zeroizing::new(passphrase));
        }
        match passphrase_file {
            Some(file) => RootKeySource::PassphraseFile(file),
            None => RootKeySource::KeyFile(key_file),
        }
    }

    /// Loads the root key of the data directory `dir`. With `create`, a missing key file (or
    /// passphrase salt) is created; otherwise its absence is an error.
    pub fn load(&self, dir: &Path, create: bool) -> Result<RootKey, ServerError> {
        let passphrase = match self {
            RootKeySource::Hex(hex_key) => {
                return RootKey::from_hex(hex_key).map_err(|reason| ServerError::RootKey {
                    source_name: "PPML_KMS_ROOT_KEY".into(),
                    reason,
                });
            }
            RootKeySource::Passphrase(passphrase) => passphrase.clone(),
            RootKeySource::PassphraseFile(file) => {
                let text = read_private(file, "passphrase file")?;
                Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_string())
            }
            RootKeySource::KeyFile(path) => {
                let path = path.clone().unwrap_or_else(|| root_key_file_of(dir));
                return key_file(&path, dir, create);
            }
            RootKeySource::Unseal => return Err(ServerError::UnsealOutsideTee),
        };
        if passphrase.is_empty() {
            return Err(ServerError::RootKey {
                source_name: "the KMS passphrase".into(),
                reason: "it is empty".into(),
            });
        }
        let salt_path = dir.join("root.salt");
        let salt = if salt_path.exists() {
            let text = std::fs::read_to_string(&salt_path).map_err(|source| ServerError::Io {
                what: "reading",
                path: salt_path.clone(),
                source,
            })?;
            RootKey::salt_from_hex(text.trim()).map_err(|reason| ServerError::RootKey {
                source_name: salt_path.display().to_string(),
                reason,
            })?
        } else if create {
            create_dir(dir)?;
            let salt = RootKey::generate_salt().map_err(|reason| ServerError::RootKey {
                source_name: "the passphrase salt".into(),
                reason,
            })?;
            ppml_kms::write_private_file_atomic(
                &salt_path,
                format!("{}\n", hex::encode(salt)).as_bytes(),
            )
            .map_err(|source| ServerError::Io {
                what: "writing",
                path: salt_path.clone(),
                source,
            })?;
            salt
        } else {
            return Err(ServerError::Io {
                what: "reading",
                path: salt_path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        tracing::info!("deriving the root key from the passphrase (Argon2id)");
        RootKey::from_passphrase(passphrase.as_bytes(), &salt).map_err(|reason| {
            ServerError::RootKey {
                source_name: "deriving the root key".into(),
                reason,
            }
        })
    }
}

/// Where [`RootKeySource::KeyFile`]`(None)` keeps the root key: next to the data directory,
/// not in it (`DATA_DIR.root.key`, e.g. `/var/lib/ppml/kms.root.key` for `/var/lib/ppml/kms`),
/// so that a copy, backup or volume snapshot of the data directory (store and audit log) does
/// not carry the key that opens it.
pub fn default_root_key_file(data_dir: &Path) -> PathBuf {
    match data_dir.file_name() {
        Some(name) => {
            let mut name = name.to_os_string();
            name.push(".root.key");
            data_dir.with_file_name(name)
        }
        // `/` or a path ending in `..`: no sibling to name.
        None => data_dir.join("root.key"),
    }
}

/// The default key file of `dir`; a key file left inside the data directory by an older
/// setup is still used (with a warning) until it is moved.
fn root_key_file_of(dir: &Path) -> PathBuf {
    let outside = default_root_key_file(dir);
    let inside = dir.join("root.key");
    if !outside.exists() && inside.exists() {
        tracing::warn!(
            path = %inside.display(),
            move_to = %outside.display(),
            "the root key file is inside the data directory, where every copy of the store \
             carries it; move it out"
        );
        return inside;
    }
    outside
}

fn key_file(path: &Path, dir: &Path, create: bool) -> Result<RootKey, ServerError> {
    if !path.exists() {
        if !create {
            return Err(ServerError::NoRootKey(path.to_path_buf()));
        }
        create_dir(dir)?;
        let hex_key = new_root_key_file(path)?;
        tracing::warn!(path = %path.display(), "created a new root key");
        return RootKey::from_hex(&hex_key).map_err(|reason| ServerError::RootKey {
            source_name: path.display().to_string(),
            reason,
        });
    }
    let text = read_private(path, "root key file")?;
    RootKey::from_hex(&text).map_err(|reason| ServerError::RootKey {
        source_name: path.display().to_string(),
        reason,
    })
}

/// An owner's root key file for unsealing a KMS in a TEE (`ppml kms unseal`): 64 hex
/// characters, mode 0600, kept off the KMS's host. With `create`, a missing file is made
/// with a fresh random key. Returns the key and whether it was made.
pub fn owner_root_key_file(
    path: &Path,
    create: bool,
) -> Result<(Zeroizing<[u8; 32]>, bool), ServerError> {
    let invalid = |reason: String| ServerError::RootKey {
        source_name: path.display().to_string(),
        reason,
    };
    let created = !path.exists();
    let text = if created {
        if !create {
            return Err(invalid(
                "does not exist (--create makes a new root key, for a new KMS)".into(),
            ));
        }
        new_root_key_file(path)?
    } else {
        read_private(path, "root key file")?
    };
    Ok((RootKey::bytes_from_hex(&text).map_err(invalid)?, created))
}

/// Writes a fresh random root key to `path` (64 hex characters, mode 0600); returns it.
fn new_root_key_file(path: &Path) -> Result<Zeroizing<String>, ServerError> {
    let (_, hex_key) = RootKey::generate().map_err(|reason| ServerError::RootKey {
        source_name: "generating a root key".into(),
        reason,
    })?;
    ppml_kms::write_private_file_atomic(path, format!("{}\n", *hex_key).as_bytes()).map_err(
        |source| ServerError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source,
        },
    )?;
    Ok(hex_key)
}

fn read_private(path: &Path, what: &'static str) -> Result<Zeroizing<String>, ServerError> {
    let io = |source| ServerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ServerError::InsecureFile {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    Ok(Zeroizing::new(std::fs::read_to_string(path).map_err(io)?))
}

/// Creates `dir` (mode 0700) if it does not exist.
fn create_dir(dir: &Path) -> Result<(), ServerError> {
    if dir.exists() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServerError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })
}

/// How the server speaks TLS. In a TEE, [`TlsMode::SelfSigned`] is a certificate made in
/// memory at each start (never written) and [`TlsMode::Files`] is refused: the host must not
/// hold the key of the certificate the quote binds.
#[derive(Clone, Debug)]
pub enum TlsMode {
    /// A self-signed certificate kept in `DATA_DIR/tls`, created on first start for
    /// `localhost`, `127.0.0.1` and these further names.
    SelfSigned {
        /// Extra DNS names or IP addresses.
        extra_names: Vec<String>,
    },
    /// A certificate chain and its key, PEM.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// Plain HTTP: loopback or a trusted network only.
    InsecureHttp,
}

/// What the attestation service trusts and how it gets DCAP collateral.
#[derive(Clone, Debug, Default)]
pub struct AttestationSettings {
    /// Accept simulated-TEE evidence (development only). The server holds no simulation
    /// platform key: each policy that allows simulation names the platform public keys it
    /// trusts, and simulated quotes are verified with those.
    pub allow_simulation: bool,
    /// Collateral JSON for SGX quotes.
    pub sgx_collateral: Option<PathBuf>,
    /// Collateral JSON for TDX quotes.
    pub tdx_collateral: Option<PathBuf>,
    /// A PCCS to fetch collateral from (cached in `DATA_DIR/collateral-cache` unless the
    /// options say otherwise).
    pub pccs_url: Option<String>,
    /// Options of the PCCS client.
    pub pccs: PccsOptions,
    /// Lifetime of attestation tokens in seconds (default 300).
    pub token_ttl: Option<u64>,
}

/// Everything a KMS server needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `HOST:PORT` to listen on (port 0: any free port).
    pub listen: String,
    /// The store, audit log, salt or key file and self-signed certificate.
    pub data_dir: PathBuf,
    /// Where the root key comes from.
    pub root_key: RootKeySource,
    /// TLS.
    pub tls: TlsMode,
    /// The attestation service.
    pub attestation: AttestationSettings,
    /// Serve BigDL-RAS's unsigned `/registerPolicy` and `/verifyQuote` (off by default).
    pub bigdl_ras: bool,
    /// The TEE this server runs in, if any: it then answers `GenerateQuote` with its own
    /// evidence, so that clients can verify it (docs/attestation.md §8).
    pub own_tee: Option<OwnTee>,
}

/// The TEE a KMS server runs in.
#[derive(Clone, Debug)]
pub struct OwnTee {
    /// SGX (Gramine), TDX (configfs-tsm) or the simulated TEE (development only).
    pub tee: Tee,
    /// The simulation platform key of [`Tee::Sim`] (created if missing).
    pub sim_platform_key: PathBuf,
}

impl ServerConfig {
    /// A server of `data_dir` on [`DEFAULT_LISTEN`], with the root key in the key file
    /// [`default_root_key_file`] and a self-signed certificate.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.into(),
            data_dir: data_dir.into(),
            root_key: RootKeySource::default(),
            tls: TlsMode::SelfSigned {
                extra_names: Vec::new(),
            },
            attestation: AttestationSettings::default(),
            bigdl_ras: false,
            own_tee: None,
        }
    }
}

/// The store, audit log and attestation seed of a data directory.
struct DataDir {
    store: Store,
    audit: AuditLog,
    attestation_seed: Zeroizing<[u8; 32]>,
}

fn open_data_dir(dir: &Path, root_key: &RootKeySource) -> Result<DataDir, ServerError> {
    create_dir(dir)?;
    let root = root_key.load(dir, true)?;
    open_data_dir_with(dir, root)
}

fn open_data_dir_with(dir: &Path, root: RootKey) -> Result<DataDir, ServerError> {
    create_dir(dir)?;
    let audit_key = root.audit_mac_key();
    let attestation_seed = root.attestation_seed();
    let store = Store::open(dir, root).map_err(|source| ServerError::Store {
        dir: dir.to_path_buf(),
        source,
    })?;
    let audit = AuditLog::open(dir, &audit_key).map_err(|source| ServerError::Audit {
        dir: dir.to_path_buf(),
        source,
    })?;
    Ok(DataDir {
        store,
        audit,
        attestation_seed,
    })
}

fn tls_identity(config: &ServerConfig) -> Result<Option<TlsIdentity>, ServerError> {
    if config.own_tee.is_some() {
        // A key the host stored or handed over is a key the host can serve with.
        return match &config.tls {
            TlsMode::InsecureHttp => Ok(None),
            TlsMode::Files { .. } => Err(ServerError::HostTlsKeyInTee),
            TlsMode::SelfSigned { extra_names } => Ok(Some(TlsIdentity::ephemeral(extra_names)?)),
        };
    }
    Ok(match &config.tls {
        TlsMode::InsecureHttp => None,
        TlsMode::Files { cert, key } => Some(TlsIdentity::from_pem_files(cert, key)?),
        TlsMode::SelfSigned { extra_names } => Some(TlsIdentity::self_signed_in(
            &config.data_dir.join("tls"),
            extra_names,
        )?),
    })
}

fn attestation_service(
    config: &ServerConfig,
    store: &Store,
    seed: &[u8; 32],
) -> Result<AttestationService, ServerError> {
    let failed = |e: &dyn std::fmt::Display| ServerError::Attestation(e.to_string());
    let settings = &config.attestation;
    let mut service = AttestationService::new(store.kms_id(), seed).map_err(|e| failed(&e))?;
    if settings.allow_simulation {
        tracing::warn!(
            "accepting SIMULATED TEEs: runtimes on the simulation platforms a policy names can \
             attest under it (development only)"
        );
        service.accept_simulation();
    }
    for (tee, path) in [
        (Tee::Sgx, &settings.sgx_collateral),
        (Tee::Tdx, &settings.tdx_collateral),
    ] {
        if let Some(path) = path {
            service.set_collateral(tee, Collateral::from_file(path).map_err(|e| failed(&e))?);
        }
    }
    if let Some(ttl) = settings.token_ttl {
        service.set_token_ttl(ttl);
    }
    if let Some(url) = &settings.pccs_url {
        let mut options = settings.pccs.clone();
        if options.cache_dir.is_none() {
            options.cache_dir = Some(config.data_dir.join("collateral-cache"));
        }
        let client = PccsClient::new(url, &options).map_err(|e| failed(&e))?;
        tracing::info!(pccs = ?client, "DCAP collateral from the PCCS");
        service.set_pccs(client);
    }
    Ok(service)
}

/// The full KMS of `config`'s data directory opened with `root`: store, audit log,
/// attestation service and, in a TEE, `own` evidence for `GenerateQuote`.
pub(crate) fn serving_state(
    config: &ServerConfig,
    root: RootKey,
    own: Option<Arc<OwnEvidence>>,
) -> Result<ServerState, ServerError> {
    let data = open_data_dir_with(&config.data_dir, root)?;
    let attestation = attestation_service(config, &data.store, &data.attestation_seed)?;
    drop(data.attestation_seed);
    let mut state = ServerState::new(data.store)
        .with_audit(data.audit)
        .with_attestation(attestation);
    if config.bigdl_ras {
        state = state.with_bigdl_ras();
    }
    if let Some(own) = own {
        state = state.with_own(own);
    }
    Ok(state)
}

/// The evidence of the TEE `config` names, bound to the certificate of `tls`.
fn own_evidence(
    config: &ServerConfig,
    tls: Option<&TlsIdentity>,
) -> Result<Option<Arc<OwnEvidence>>, ServerError> {
    let Some(own) = &config.own_tee else {
        return Ok(None);
    };
    let provider = ppml_attestation::evidence::provider_for(own.tee, &own.sim_platform_key)
        .map_err(|e| {
            ServerError::Attestation(format!("the {} evidence of this KMS: {e}", own.tee))
        })?;
    if own.tee == Tee::Sim {
        tracing::warn!(
            "this KMS answers GenerateQuote from a SIMULATED TEE: no hardware protection \
             (development only)"
        );
    }
    Ok(Some(Arc::new(OwnEvidence::new(
        provider,
        tls.map(|identity| identity.cert_sha256),
    ))))
}

/// What [`init_data_dir`] made or found.
#[derive(Clone, Debug)]
pub struct InitializedDataDir {
    /// The store's KMS id (`ppml-kms:<hex>`).
    pub kms_id: String,
    /// The TLS certificate's fingerprint, unless the configuration serves plain HTTP.
    pub fingerprint: Option<String>,
}

/// Creates everything [`KmsServer::start`] would create on first start (data directory, root
/// key or salt, store, audit log, TLS certificate) without serving.
pub fn init_data_dir(config: &ServerConfig) -> Result<InitializedDataDir, ServerError> {
    let data = open_data_dir(&config.data_dir, &config.root_key)?;
    let identity = tls_identity(config)?;
    Ok(InitializedDataDir {
        kms_id: data.store.kms_id().to_string(),
        fingerprint: identity.map(|i| i.fingerprint),
    })
}

/// A KMS server that is bound and ready: [`KmsServer::run`] serves it.
pub struct KmsServer {
    serving: Serving,
    listener: tokio::net::TcpListener,
    tls: Option<TlsIdentity>,
    addr: SocketAddr,
}

/// What a started server serves.
enum Serving {
    /// The full KMS.
    Open(Arc<ServerState>),
    /// A KMS in a TEE waiting for its owner's root key.
    Sealed(Arc<SealedKms>),
}

impl std::fmt::Debug for KmsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsServer")
            .field("url", &self.url())
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

impl KmsServer {
    /// Opens the data directory, store, audit log and attestation service, loads or creates
    /// the TLS identity and binds the listen address. With [`RootKeySource::Unseal`] (in a
    /// TEE only) the server starts sealed: it opens nothing until an owner unseals it.
    pub async fn start(config: &ServerConfig) -> Result<Self, ServerError> {
        let sealed = matches!(config.root_key, RootKeySource::Unseal);
        match (&config.own_tee, sealed) {
            (Some(_), false) => return Err(ServerError::HostRootKeyInTee),
            (None, true) => return Err(ServerError::UnsealOutsideTee),
            (None, false) => tracing::warn!(
                "this KMS runs outside any TEE: its root key comes from this host, and whoever \
                 administers the host can read every key it keeps (run it with --tee to keep \
                 the host out)"
            ),
            (Some(_), true) => {}
        }
        let tls = tls_identity(config)?;
        let own = own_evidence(config, tls.as_ref())?;
        let serving = match own {
            Some(own) => {
                create_dir(&config.data_dir)?;
                tracing::warn!(
                    "the KMS is SEALED: it serves no key until its owner unseals it \
                     (ppml kms unseal)"
                );
                Serving::Sealed(Arc::new(SealedKms::new(config.clone(), own)))
            }
            None => {
                let root = config.root_key.load(&config.data_dir, true)?;
                Serving::Open(Arc::new(serving_state(config, root, None)?))
            }
        };
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        Ok(KmsServer {
            serving,
            listener,
            tls,
            addr,
        })
    }

    /// The bound address (the real port when the configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients use: `https://ADDR`, or `http://ADDR` for plain HTTP.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The TLS identity (its fingerprint is what clients pin), unless serving plain HTTP.
    pub fn tls(&self) -> Option<&TlsIdentity> {
        self.tls.as_ref()
    }

    /// The server's state (store, metrics, audit log); `None` while it is sealed.
    pub fn state(&self) -> Option<Arc<ServerState>> {
        match &self.serving {
            Serving::Open(state) => Some(Arc::clone(state)),
            Serving::Sealed(sealed) => sealed.state().cloned(),
        }
    }

    /// Whether the server waits for its owner's root key.
    pub fn is_sealed(&self) -> bool {
        self.state().is_none()
    }

    /// Serves until `shutdown` completes; returns the audit log's head at shutdown, which
    /// operators record outside the machine (it is what shows a truncated tail), or `None`
    /// if the server was never unsealed.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Option<AuditHead>, ServerError> {
        let app = match &self.serving {
            Serving::Open(state) => router(Arc::clone(state)),
            Serving::Sealed(sealed) => Arc::clone(sealed).router(),
        };
        let head = move |serving: Serving| {
            let state = match serving {
                Serving::Open(state) => Some(state),
                Serving::Sealed(sealed) => sealed.state().cloned(),
            };
            state.and_then(|state| state.audit().map(|audit| audit.head()))
        };
        match self.tls {
            None => {
                tracing::warn!(
                    "serving plain HTTP: requests and keys are not encrypted in transit"
                );
                use axum::serve::ListenerExt as _;
                let listener = self.listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(ServerError::Serve)?;
            }
            Some(identity) => serve_tls(self.listener, identity.config.clone(), app, shutdown)
                .await
                .map_err(ServerError::Serve)?,
        }
        Ok(head(self.serving))
    }
}

/// Starts a server with `config` and serves until `shutdown` completes ([`KmsServer::start`]
/// and [`KmsServer::run`]).
pub async fn serve(
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<AuditHead>, ServerError> {
    KmsServer::start(config).await?.run(shutdown).await
}

/// Loads the root key of an existing data directory (for checking the audit log's MACs).
pub fn load_root_key(data_dir: &Path, source: &RootKeySource) -> Result<RootKey, ServerError> {
    source.load(data_dir, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_key_file_is_kept_outside_the_data_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("kms");
        let config = ServerConfig::new(&data);
        let first = init_data_dir(&config).unwrap();
        let key = dir.path().join("kms.root.key");
        assert_eq!(default_root_key_file(&data), key);
        assert!(key.is_file());
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!data.join("root.key").exists());
        assert_eq!(first.kms_id, init_data_dir(&config).unwrap().kms_id);

        // A key file left inside the data directory still opens its store.
        std::fs::rename(&key, data.join("root.key")).unwrap();
        assert_eq!(first.kms_id, init_data_dir(&config).unwrap().kms_id);
        assert!(!key.exists(), "no second root key was made");
    }
}
