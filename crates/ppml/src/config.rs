//! Settings shared by every ppml program: the `PPML_*` environment variables over a TOML file
//! over the defaults in `$PPML_HOME`; and the KMS they describe.
//!
//! The `ppml` command reads its flags and environment variables with clap and hands them to
//! [`Settings::resolve`]; a program of its own calls [`Settings::from_env`] for the same
//! result without flags. The TOML file is `--config`/`PPML_CONFIG`, then
//! `$PPML_HOME/config.toml`; the first that sets a value wins.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ppml_kms::grant::SignedGrant;
use ppml_kms::owner::OwnerKey;
use ppml_kms::{AppCredentials, KeyManagementService, KmsError, LocalKms, PrimaryKeyId};
use ppml_kms_client::{AttestedKms, RemoteKms, RemoteKmsConfig, TlsTrust};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::grant::{GrantOptions, GrantedJob};

/// The TOML configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[kms]`: KMS credentials and keys.
    #[serde(default)]
    pub kms: KmsSection,
    /// `[server]`: `ppml kms serve` settings.
    #[serde(default)]
    pub server: ServerSection,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            what: format!("reading configuration file {}", path.display()),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::Config {
            what: format!("parsing configuration file {}", path.display()),
            reason: e.to_string(),
        })
    }
}

/// `[kms]` of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    /// Application id at the KMS.
    pub appid: Option<String>,
    /// The application's api key.
    pub apikey: Option<String>,
    /// Primary key under which new data keys are wrapped.
    pub primary_key: Option<String>,
    /// Primary key for query results (default: `primary_key`).
    pub output_key: Option<String>,
    /// URL of a KMS server; absent means the embedded KMS.
    pub url: Option<String>,
    /// SHA-256 fingerprint of the server's certificate.
    pub fingerprint: Option<String>,
    /// The server's protocol dialect: `auto`, `ppml`, `ehsm` or `ehsm-0.3`.
    pub flavor: Option<String>,
    /// CA certificate (PEM) of the server.
    pub ca_cert: Option<PathBuf>,
    /// The client's policy for the KMS itself (JSON): verify the KMS's quote before
    /// trusting it.
    pub kms_policy: Option<PathBuf>,
    /// Collateral JSON for the KMS platform's SGX or TDX quotes.
    pub kms_collateral: Option<PathBuf>,
    /// The data owner's key (PKCS#8), for the actions only the owner may ask.
    pub owner_key: Option<PathBuf>,
}

/// `[server]` of the configuration file: the options of `ppml kms serve`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// `HOST:PORT` to listen on.
    pub listen: Option<String>,
    /// The server's data directory.
    pub data_dir: Option<PathBuf>,
    /// Root key file.
    pub root_key_file: Option<PathBuf>,
    /// Passphrase file (Argon2id root key).
    pub passphrase_file: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Extra names of the self-signed certificate.
    #[serde(default)]
    pub tls_san: Vec<String>,
    /// Serve plain HTTP.
    #[serde(default)]
    pub insecure_http: bool,
    /// Serve BigDL-RAS's unsigned `/registerPolicy` and `/verifyQuote`.
    #[serde(default)]
    pub bigdl_ras: bool,
    /// Accept simulated-TEE evidence from the platforms each policy names.
    #[serde(default)]
    pub allow_simulation: bool,
    /// Collateral JSON for SGX quotes.
    pub sgx_collateral: Option<PathBuf>,
    /// Collateral JSON for TDX quotes.
    pub tdx_collateral: Option<PathBuf>,
    /// PCCS URL.
    pub pccs_url: Option<String>,
    /// PEM CA of the PCCS.
    pub pccs_ca_cert: Option<PathBuf>,
    /// Refetch cached collateral after this many seconds.
    pub collateral_refresh: Option<u64>,
    /// Lifetime of attestation tokens in seconds.
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
            bigdl_ras: self.bigdl_ras || lower.bigdl_ras,
            allow_simulation: self.allow_simulation || lower.allow_simulation,
            sgx_collateral: self.sgx_collateral.or(lower.sgx_collateral),
            tdx_collateral: self.tdx_collateral.or(lower.tdx_collateral),
            pccs_url: self.pccs_url.or(lower.pccs_url),
            pccs_ca_cert: self.pccs_ca_cert.or(lower.pccs_ca_cert),
            collateral_refresh: self.collateral_refresh.or(lower.collateral_refresh),
            attestation_token_ttl: self.attestation_token_ttl.or(lower.attestation_token_ttl),
        }
    }
}

/// What a program was given directly (flags, environment variables); [`Settings::resolve`]
/// fills in the rest from the configuration files.
#[derive(Debug, Default, Clone)]
pub struct GivenSettings {
    /// `PPML_HOME` [default: `~/.ppml`].
    pub home: Option<PathBuf>,
    /// `PPML_CONFIG`.
    pub config: Option<PathBuf>,
    /// `PPML_APPID`.
    pub appid: Option<String>,
    /// `PPML_APIKEY`.
    pub apikey: Option<String>,
    /// `PPML_PRIMARY_KEY`.
    pub primary_key: Option<String>,
    /// `PPML_OUTPUT_KEY`.
    pub output_key: Option<String>,
    /// `PPML_KMS_URL`.
    pub kms_url: Option<String>,
    /// `PPML_KMS_FINGERPRINT`.
    pub kms_fingerprint: Option<String>,
    /// `PPML_KMS_FLAVOR`.
    pub kms_flavor: Option<String>,
    /// `PPML_KMS_CA_CERT`.
    pub kms_ca_cert: Option<PathBuf>,
    /// `PPML_KMS_POLICY`.
    pub kms_policy: Option<PathBuf>,
    /// `PPML_KMS_COLLATERAL`.
    pub kms_collateral: Option<PathBuf>,
    /// `PPML_OWNER_KEY`.
    pub owner_key: Option<PathBuf>,
    /// `PPML_GRANT`.
    pub grant: Option<PathBuf>,
}

impl GivenSettings {
    /// The `PPML_*` environment variables the `ppml` command reads for these settings.
    pub fn from_env() -> Self {
        let text = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let path = |name: &str| text(name).map(PathBuf::from);
        GivenSettings {
            home: path("PPML_HOME"),
            config: path("PPML_CONFIG"),
            appid: text("PPML_APPID"),
            apikey: text("PPML_APIKEY"),
            primary_key: text("PPML_PRIMARY_KEY"),
            output_key: text("PPML_OUTPUT_KEY"),
            kms_url: text("PPML_KMS_URL"),
            kms_fingerprint: text("PPML_KMS_FINGERPRINT"),
            kms_flavor: text("PPML_KMS_FLAVOR"),
            kms_ca_cert: path("PPML_KMS_CA_CERT"),
            kms_policy: path("PPML_KMS_POLICY"),
            kms_collateral: path("PPML_KMS_COLLATERAL"),
            owner_key: path("PPML_OWNER_KEY"),
            grant: path("PPML_GRANT"),
        }
    }
}

/// Resolved KMS settings.
#[derive(Clone)]
pub struct Settings {
    /// `$PPML_HOME`: the embedded KMS and the default configuration file.
    pub home: PathBuf,
    /// Application id at the KMS.
    pub appid: Option<String>,
    /// The application's api key.
    pub apikey: Option<String>,
    /// Primary key for new data (and the inputs of queries).
    pub primary_key: Option<String>,
    /// Primary key for query results (default: the primary key).
    pub output_key: Option<String>,
    /// URL of a KMS server; `None` is the embedded KMS.
    pub kms_url: Option<String>,
    /// Pinned fingerprint of the KMS server's certificate.
    pub kms_fingerprint: Option<String>,
    /// The KMS server's protocol dialect (`auto`, `ppml`, `ehsm`, `ehsm-0.3`) [default: auto].
    pub kms_flavor: Option<String>,
    /// CA certificate of the KMS server.
    pub kms_ca_cert: Option<PathBuf>,
    /// The client's policy for the KMS (`docs/attestation.md` §8): when set, a KMS whose
    /// quote it does not accept is refused before any credential is sent.
    pub kms_policy: Option<PathBuf>,
    /// Collateral for the KMS platform's SGX or TDX quotes.
    pub kms_collateral: Option<PathBuf>,
    /// The data owner's key file [default: `$PPML_HOME/owner.pk8`, used when it exists].
    pub owner_key: Option<PathBuf>,
    /// The data owner's signed grant of the job to run ([`crate::grant`]) [default: one
    /// signed at start with the owner key, when this machine holds it].
    pub grant: Option<PathBuf>,
    /// `[server]` of the configuration files.
    pub server: ServerSection,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("home", &self.home)
            .field("appid", &self.appid)
            .field("apikey", &self.apikey.as_ref().map(|_| "<redacted>"))
            .field("primary_key", &self.primary_key)
            .field("output_key", &self.output_key)
            .field("kms_url", &self.kms_url)
            .finish_non_exhaustive()
    }
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".ppml")
}

impl Settings {
    /// The settings of the environment (as [`GivenSettings::from_env`]) and configuration
    /// files, as the `ppml` command resolves them without flags.
    pub fn from_env() -> Result<Self> {
        Settings::resolve(GivenSettings::from_env())
    }

    /// `given` over the configuration files (`given.config`, then `$PPML_HOME/config.toml`).
    pub fn resolve(given: GivenSettings) -> Result<Self> {
        let home = given.home.clone().unwrap_or_else(default_home);
        let mut settings = Settings {
            appid: given.appid,
            apikey: given.apikey,
            primary_key: given.primary_key,
            output_key: given.output_key,
            kms_url: given.kms_url,
            kms_fingerprint: given.kms_fingerprint,
            kms_flavor: given.kms_flavor,
            kms_ca_cert: given.kms_ca_cert,
            kms_policy: given.kms_policy,
            kms_collateral: given.kms_collateral,
            owner_key: given.owner_key,
            grant: given.grant,
            server: ServerSection::default(),
            home,
        };
        let mut files = Vec::new();
        if let Some(path) = &given.config {
            files.push(ConfigFile::read(path)?);
        }
        let home_config = settings.home.join("config.toml");
        if home_config.is_file() {
            files.push(ConfigFile::read(&home_config)?);
        }
        let mut server_sections = Vec::new();
        for file in files {
            settings.appid = settings.appid.or(file.kms.appid);
            settings.apikey = settings.apikey.or(file.kms.apikey);
            settings.primary_key = settings.primary_key.or(file.kms.primary_key);
            settings.output_key = settings.output_key.or(file.kms.output_key);
            settings.kms_url = settings.kms_url.or(file.kms.url);
            settings.kms_fingerprint = settings.kms_fingerprint.or(file.kms.fingerprint);
            settings.kms_flavor = settings.kms_flavor.or(file.kms.flavor);
            settings.kms_ca_cert = settings.kms_ca_cert.or(file.kms.ca_cert);
            settings.kms_policy = settings.kms_policy.or(file.kms.kms_policy);
            settings.kms_collateral = settings.kms_collateral.or(file.kms.kms_collateral);
            settings.owner_key = settings.owner_key.or(file.kms.owner_key);
            server_sections.push(file.server);
        }
        for section in server_sections.into_iter().rev() {
            settings.server = section.over(std::mem::take(&mut settings.server));
        }
        Ok(settings)
    }

    /// How to reach the configured KMS server, if one is configured.
    pub fn remote_config(&self) -> Result<Option<RemoteKmsConfig>> {
        let Some(url) = &self.kms_url else {
            return Ok(None);
        };
        let mut config = RemoteKmsConfig::new(url.clone());
        if let Some(flavor) = &self.kms_flavor {
            config.flavor = flavor.parse().map_err(|reason| Error::Config {
                what: "the KMS flavor".into(),
                reason,
            })?;
        }
        config.trust = match (&self.kms_fingerprint, &self.kms_ca_cert) {
            (Some(_), Some(_)) => {
                return Err(Error::Config {
                    what: "KMS TLS trust".into(),
                    reason: "give either a KMS certificate fingerprint or a CA certificate, \
                             not both"
                        .into(),
                });
            }
            (Some(pin), None) => TlsTrust::parse_fingerprint(pin)?,
            (None, Some(path)) => TlsTrust::CaFile(path.clone()),
            // A KMS in a TEE makes its certificate at each start; its quote vouches for it.
            (None, None) if self.kms_policy.is_some() => TlsTrust::Attested,
            (None, None) => TlsTrust::SystemRoots,
        };
        if let Some(path) = &self.kms_policy {
            let config_error = |reason: String| Error::Config {
                what: format!("the KMS policy {}", path.display()),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
            let policy: ppml_attestation::Policy =
                serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
            policy.check().map_err(|e| config_error(e.to_string()))?;
            let collateral = match &self.kms_collateral {
                None => None,
                Some(file) => Some(ppml_attestation::dcap::Collateral::from_file(file).map_err(
                    |e| Error::Config {
                        what: format!("the KMS collateral {}", file.display()),
                        reason: e.to_string(),
                    },
                )?),
            };
            config.kms_policy = Some(ppml_kms_client::KmsPolicy { policy, collateral });
        }
        Ok(Some(config))
    }

    /// The app's credentials; an error naming where to set them when they are missing.
    pub fn credentials(&self) -> Result<AppCredentials> {
        let (Some(appid), Some(apikey)) = (&self.appid, &self.apikey) else {
            return Err(Error::Config {
                what: "no KMS app credentials".into(),
                reason: format!(
                    "set PPML_APPID and PPML_APIKEY (or --appid/--apikey, or [kms] \
                     appid/apikey in {})",
                    self.home.join("config.toml").display()
                ),
            });
        };
        Ok(AppCredentials::new(appid.clone(), apikey.clone()))
    }

    /// Connects to the configured KMS server without credentials (for `Enroll`).
    pub async fn connect_remote_anonymous(&self) -> Result<Option<RemoteKms>> {
        let Some(config) = self.remote_config()? else {
            return Ok(None);
        };
        Ok(Some(RemoteKms::connect(&config, None).await?))
    }

    /// The attestation key of the configured KMS server (what its attestation tokens, and
    /// so job receipts, verify with); `None` when no server is configured.
    pub async fn kms_attestation_key(&self) -> Result<Option<[u8; 32]>> {
        match self.connect_remote_anonymous().await? {
            Some(remote) => Ok(Some(remote.attestation_key().await?)),
            None => Ok(None),
        }
    }

    /// Where the data owner's key is: the configured file, else `$PPML_HOME/owner.pk8`.
    pub fn owner_key_path(&self) -> PathBuf {
        self.owner_key
            .clone()
            .unwrap_or_else(|| self.home.join("owner.pk8"))
    }

    /// The data owner's key, if this machine holds one: the configured file (which must
    /// exist), else `$PPML_HOME/owner.pk8` when it exists.
    pub fn load_owner_key(&self) -> Result<Option<Arc<OwnerKey>>> {
        let path = self.owner_key_path();
        if self.owner_key.is_none() && !path.exists() {
            return Ok(None);
        }
        OwnerKey::load(&path)
            .map(|key| Some(Arc::new(key)))
            .map_err(|source| Error::Kms {
                context: format!("reading the owner key {}", path.display()),
                source,
            })
    }

    /// Enrolls a new app at the configured KMS server, owned by this machine's owner key
    /// ([`Settings::owner_key_path`], made there if missing): only that key can then mark the
    /// app's keys for attested release or disable, rotate or delete them. Returns the
    /// credentials (for runtimes) and the owner key's path (for the owner only).
    pub async fn enroll_owned(&self) -> Result<(AppCredentials, PathBuf)> {
        let remote = self
            .connect_remote_anonymous()
            .await?
            .ok_or_else(|| Error::Config {
                what: "no KMS server".into(),
                reason: "owner keys are kept by a KMS server: set --kms-url or PPML_KMS_URL".into(),
            })?;
        let path = self.owner_key_path();
        let kms_error = |context: String| move |source| Error::Kms { context, source };
        let owner = OwnerKey::load_or_create(&path)
            .map_err(kms_error(format!("the owner key {}", path.display())))?;
        let creds = remote
            .enroll_owned(&owner)
            .await
            .map_err(kms_error("enrolling at the KMS".into()))?;
        Ok((creds, path))
    }

    /// The key results are written under: the output key, else the primary key.
    pub fn output_primary_key(&self) -> Option<PrimaryKeyId> {
        self.output_key
            .clone()
            .or_else(|| self.primary_key.clone())
            .map(PrimaryKeyId)
    }

    /// The grant `job` runs under: the file of [`Settings::grant`]; else, with a KMS server,
    /// one signed now ([`Settings::sign_grant`]) when this machine holds the owner key; else
    /// none, and the KMS then releases no data key of a key marked for attested release in an
    /// app with an owner key.
    pub async fn job_grant(
        &self,
        job: GrantedJob<'_>,
        options: &GrantOptions,
    ) -> Result<Option<SignedGrant>> {
        if let Some(path) = &self.grant {
            return crate::grant::read_grant(path).map(Some);
        }
        if self.kms_url.is_none() {
            return Ok(None);
        }
        match self.load_owner_key()? {
            Some(owner) => self.sign_grant_with(&owner, job, options).await.map(Some),
            None => Ok(None),
        }
    }

    /// The grant of `job` ([`crate::grant::describe`]), signed with the owner key, which must
    /// be on this machine.
    pub async fn sign_grant(
        &self,
        job: GrantedJob<'_>,
        options: &GrantOptions,
    ) -> Result<SignedGrant> {
        let owner = self.load_owner_key()?.ok_or_else(|| Error::Config {
            what: format!("no owner key at {}", self.owner_key_path().display()),
            reason: "grants are signed with the owner key: make it with `ppml kms enroll`, or \
                     give --owner-key (PPML_OWNER_KEY)"
                .into(),
        })?;
        self.sign_grant_with(&owner, job, options).await
    }

    async fn sign_grant_with(
        &self,
        owner: &OwnerKey,
        job: GrantedJob<'_>,
        options: &GrantOptions,
    ) -> Result<SignedGrant> {
        let appid = self.credentials()?.appid;
        let grant = crate::grant::describe(job, &appid, options).await?;
        let signed = SignedGrant::sign(&grant, owner).map_err(KmsError::from)?;
        tracing::info!(job = %grant.job_id, "signed a job grant with the owner key");
        Ok(signed)
    }

    /// Directory of the embedded KMS.
    pub fn kms_dir(&self) -> PathBuf {
        self.home.join("kms")
    }

    /// Opens the KMS for the configured app: the KMS server when a URL is configured,
    /// otherwise the embedded KMS, created with a default app and key on first use (which
    /// records them in `$PPML_HOME/config.toml`, mode 0600, and says so once on stderr).
    pub async fn open_kms(&mut self) -> Result<OpenKms> {
        let primary = self.primary_key.clone().map(PrimaryKeyId);
        let output = self.output_key.clone().map(PrimaryKeyId);
        if let Some(config) = self.remote_config()? {
            let creds = self.credentials()?;
            let mut remote = RemoteKms::connect(&config, Some(creds))
                .await
                .map_err(|source| Error::Kms {
                    context: format!("connecting to the KMS at {}", config.url),
                    source,
                })?;
            if let Some(owner) = self.load_owner_key()? {
                remote = remote.with_owner_key(owner);
            }
            tracing::info!(url = %config.url, kms_id = %remote.kms_id(), "using the KMS server");
            return Ok(OpenKms {
                backend: KmsBackend::Remote(Arc::new(remote)),
                primary,
                output,
            });
        }
        let dir = self.kms_dir();
        if self.appid.is_none() && self.apikey.is_none() && !LocalKms::exists(&dir) {
            self.bootstrap().await?;
        }
        let creds = self.credentials()?;
        let local = LocalKms::open(&dir, &creds).map_err(|source| Error::Kms {
            context: format!("opening the embedded KMS in {}", dir.display()),
            source,
        })?;
        Ok(OpenKms {
            backend: KmsBackend::Embedded(Arc::new(local)),
            primary: self.primary_key.clone().map(PrimaryKeyId),
            output,
        })
    }

    /// The configured KMS server, with the app's credentials; an error without a KMS URL.
    pub async fn open_remote(&mut self) -> Result<Arc<RemoteKms>> {
        if self.kms_url.is_none() {
            return Err(Error::Config {
                what: "no KMS server".into(),
                reason: "attestation policies live at a KMS server: set --kms-url or \
                         PPML_KMS_URL"
                    .into(),
            });
        }
        match self.open_kms().await?.backend {
            KmsBackend::Remote(remote) => Ok(remote),
            _ => unreachable!("a KMS URL opens the KMS server"),
        }
    }

    /// Creates the embedded KMS with a default app and primary key, and records them in
    /// `$PPML_HOME/config.toml` (mode 0600). Said once, on stderr.
    async fn bootstrap(&mut self) -> Result<()> {
        let dir = self.kms_dir();
        let kms_error = |context: String| move |source| Error::Kms { context, source };
        LocalKms::init(&dir)
            .map_err(kms_error(format!("creating the KMS in {}", dir.display())))?;
        let creds =
            LocalKms::enroll(&dir).map_err(kms_error("enrolling the default app".into()))?;
        let kms = LocalKms::open(&dir, &creds)
            .map_err(kms_error(format!("opening the KMS in {}", dir.display())))?;
        let primary = kms
            .create_primary_key()
            .await
            .map_err(kms_error("creating the default primary key".into()))?;
        let config = format!(
            "# Written by ppml on first use: the default app of the embedded KMS.\n\
             [kms]\nappid = \"{}\"\napikey = \"{}\"\nprimary_key = \"{}\"\n",
            creds.appid, *creds.apikey, primary
        );
        let path = self.home.join("config.toml");
        ppml_kms::write_private_file_atomic(&path, config.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        eprintln!(
            "ppml: created an embedded KMS in {} with app {} and primary key {} \
             (credentials in {})",
            dir.display(),
            creds.appid,
            primary,
            path.display()
        );
        self.appid = Some(creds.appid.clone());
        self.apikey = Some(creds.apikey.to_string());
        self.primary_key = self.primary_key.take().or(Some(primary.0));
        Ok(())
    }
}

/// The concrete KMS client behind an [`OpenKms`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum KmsBackend {
    /// The embedded, file-backed KMS in `$PPML_HOME/kms`.
    Embedded(Arc<LocalKms>),
    /// A KMS server, unattested.
    Remote(Arc<RemoteKms>),
    /// A KMS server, as an attested runtime.
    Attested(Arc<AttestedKms>),
}

impl KmsBackend {
    /// The client as the key interface the engine uses.
    pub fn kms(&self) -> Arc<dyn KeyManagementService> {
        match self {
            KmsBackend::Embedded(local) => local.clone(),
            KmsBackend::Remote(remote) => remote.clone(),
            KmsBackend::Attested(attested) => attested.clone(),
        }
    }

    /// The KMS server connection (also of an attested client), for its admin actions.
    pub fn remote(&self) -> Option<&RemoteKms> {
        match self {
            KmsBackend::Embedded(_) => None,
            KmsBackend::Remote(remote) => Some(remote),
            KmsBackend::Attested(attested) => Some(attested.remote()),
        }
    }
}

/// An opened KMS and the keys to use.
#[derive(Clone, Debug)]
pub struct OpenKms {
    /// The client.
    pub backend: KmsBackend,
    /// The primary key for new data and query inputs.
    pub primary: Option<PrimaryKeyId>,
    /// The primary key for query results, when it differs from `primary`.
    pub output: Option<PrimaryKeyId>,
}

impl OpenKms {
    /// The client as the key interface the engine uses.
    pub fn kms(&self) -> Arc<dyn KeyManagementService> {
        self.backend.kms()
    }

    /// The primary key; an error naming where to set it when none is configured.
    pub fn primary(&self) -> Result<&PrimaryKeyId> {
        self.primary.as_ref().ok_or_else(|| Error::Config {
            what: "no primary key configured".into(),
            reason: "set PPML_PRIMARY_KEY, --primary-key, or [kms] primary_key (create one \
                     with `ppml kms create-key`)"
                .into(),
        })
    }

    /// This KMS acting under the data owner's job grant: an attested client's key requests
    /// carry it ([`AttestedKms::with_grant`]); other clients read only keys that need no grant
    /// and are returned unchanged.
    pub fn under_grant(self, grant: &SignedGrant) -> Result<OpenKms> {
        match &self.backend {
            KmsBackend::Attested(attested) => Ok(OpenKms {
                backend: KmsBackend::Attested(Arc::new(attested.with_grant(grant)?)),
                ..self
            }),
            _ => Ok(self),
        }
    }

    /// The primary key query results are written under: the output key if one is configured
    /// (typically the data owner's, not released to runtimes), else the primary key.
    pub fn output_primary(&self) -> Result<&PrimaryKeyId> {
        match &self.output {
            Some(output) => Ok(output),
            None => self.primary(),
        }
    }
}
