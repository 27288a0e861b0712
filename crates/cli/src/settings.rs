//! Configuration: flags and environment variables (through clap) over a TOML file over the
//! defaults in $PPML_HOME; and opening the KMS they describe.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ppml_kms::{
    AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId, RemoteKms, RemoteKmsConfig,
    TlsTrust,
};
use serde::Deserialize;

use crate::cli::GlobalArgs;

/// The TOML configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// KMS credentials and the default primary key.
    #[serde(default)]
    pub kms: KmsSection,
    /// `ppml kms serve` settings.
    #[serde(default)]
    pub server: crate::kms_serve::ServerSection,
}

/// `[kms]` of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    pub appid: Option<String>,
    pub apikey: Option<String>,
    pub primary_key: Option<String>,
    /// Primary key for query results (default: `primary_key`).
    pub output_key: Option<String>,
    /// URL of a KMS server; absent means the embedded KMS.
    pub url: Option<String>,
    /// SHA-256 fingerprint of the server's certificate.
    pub fingerprint: Option<String>,
    /// CA certificate (PEM) of the server.
    pub ca_cert: Option<PathBuf>,
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    pub home: PathBuf,
    pub appid: Option<String>,
    pub apikey: Option<String>,
    pub primary_key: Option<String>,
    pub output_key: Option<String>,
    pub kms_url: Option<String>,
    pub kms_fingerprint: Option<String>,
    pub kms_ca_cert: Option<PathBuf>,
    pub server: crate::kms_serve::ServerSection,
    pub tee: Option<crate::cli::TeeKind>,
    pub attestation_policy: Option<String>,
    pub attestation_debug: bool,
    pub sim_platform_key: Option<PathBuf>,
    pub quiet: bool,
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".ppml")
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing configuration file {}", path.display()))
}

impl Settings {
    pub fn resolve(global: &GlobalArgs) -> Result<Self> {
        let home = global.home.clone().unwrap_or_else(default_home);
        let mut settings = Settings {
            appid: global.appid.clone(),
            apikey: global.apikey.clone(),
            primary_key: global.primary_key.clone(),
            output_key: global.output_key.clone(),
            kms_url: global.kms_url.clone(),
            kms_fingerprint: global.kms_fingerprint.clone(),
            kms_ca_cert: global.kms_ca_cert.clone(),
            server: Default::default(),
            tee: global.tee,
            attestation_policy: global.attestation_policy.clone(),
            attestation_debug: global.attestation_debug,
            sim_platform_key: global.sim_platform_key.clone(),
            quiet: global.quiet,
            home,
        };
        let mut files = Vec::new();
        if let Some(path) = &global.config {
            files.push(read_config(path)?);
        }
        let home_config = settings.home.join("config.toml");
        if home_config.is_file() {
            files.push(read_config(&home_config)?);
        }
        // The first file that sets a value wins: --config before $PPML_HOME/config.toml.
        let mut server_sections = Vec::new();
        for file in files {
            settings.appid = settings.appid.or(file.kms.appid);
            settings.apikey = settings.apikey.or(file.kms.apikey);
            settings.primary_key = settings.primary_key.or(file.kms.primary_key);
            settings.output_key = settings.output_key.or(file.kms.output_key);
            settings.kms_url = settings.kms_url.or(file.kms.url);
            settings.kms_fingerprint = settings.kms_fingerprint.or(file.kms.fingerprint);
            settings.kms_ca_cert = settings.kms_ca_cert.or(file.kms.ca_cert);
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
        config.trust = match (&self.kms_fingerprint, &self.kms_ca_cert) {
            (Some(_), Some(_)) => {
                bail!("give either a KMS certificate fingerprint or a CA certificate, not both")
            }
            (Some(pin), None) => TlsTrust::parse_fingerprint(pin)?,
            (None, Some(path)) => TlsTrust::CaFile(path.clone()),
            (None, None) => TlsTrust::SystemRoots,
        };
        Ok(Some(config))
    }

    fn credentials(&self) -> Result<AppCredentials> {
        let (Some(appid), Some(apikey)) = (&self.appid, &self.apikey) else {
            bail!(
                "no KMS app credentials: set PPML_APPID and PPML_APIKEY (or --appid/--apikey, \
                 or [kms] appid/apikey in {})",
                self.home.join("config.toml").display()
            );
        };
        Ok(AppCredentials::new(appid.clone(), apikey.clone()))
    }

    /// Connects to the configured KMS server without credentials (for Enroll).
    pub async fn connect_remote_anonymous(&self) -> Result<Option<RemoteKms>> {
        let Some(config) = self.remote_config()? else {
            return Ok(None);
        };
        Ok(Some(RemoteKms::connect(&config, None).await?))
    }

    /// Directory of the embedded KMS.
    pub fn kms_dir(&self) -> PathBuf {
        self.home.join("kms")
    }

    /// Opens the KMS for a process that will read data: like [`Settings::open_kms`], then,
    /// with `--tee`, attests to the KMS server before anything is read (docs/attestation.md
    /// §6). A failure ends the process (`Attestation Fail! Application killed!`) unless
    /// `--attestation-debug` is given.
    pub async fn open_kms_for_runtime(&mut self) -> Result<OpenKms> {
        let Some(tee) = self.tee else {
            return self.open_kms().await;
        };
        let mut opened = self.open_kms().await?;
        let result = self.attest(tee, &mut opened).await;
        match result {
            Ok(()) => {
                tracing::info!("Attestation Success!");
                eprintln!("Attestation Success!");
            }
            Err(e) if self.attestation_debug => {
                tracing::error!(error = %e, "Attestation Fail! In debug mode, continue.");
                eprintln!("ERROR: Attestation Fail! In debug mode, continue. ({e:#})");
            }
            Err(e) => {
                tracing::error!(error = %e, "Attestation Fail! Application killed!");
                eprintln!("Attestation Fail! Application killed!");
                return Err(e);
            }
        }
        Ok(opened)
    }

    async fn attest(&self, tee: crate::cli::TeeKind, opened: &mut OpenKms) -> Result<()> {
        use crate::cli::TeeKind;
        use ppml_attestation::EvidenceProvider;
        let KmsBackend::Remote(remote) = &opened.backend else {
            bail!("--tee needs a KMS server (--kms-url): the embedded KMS cannot verify evidence");
        };
        let policy = self
            .attestation_policy
            .as_deref()
            .context("--tee needs --attestation-policy (PPML_ATTESTATION_POLICY)")?;
        let provider: Arc<dyn EvidenceProvider> = match tee {
            TeeKind::Sim => {
                let path = self
                    .sim_platform_key
                    .clone()
                    .unwrap_or_else(|| self.home.join("sim-platform.pk8"));
                tracing::warn!("SIMULATED TEE: no hardware protection; for development only");
                Arc::new(ppml_attestation::sim::SimTee::new(
                    ppml_attestation::sim::SimPlatform::load_or_create(&path).with_context(
                        || format!("loading the simulation platform key {}", path.display()),
                    )?,
                ))
            }
            TeeKind::Sgx => Arc::new(ppml_attestation::evidence::GramineSgx::default()),
            TeeKind::Tdx => Arc::new(ppml_attestation::evidence::ConfigfsTdx::default()),
        };
        let mut remote = (**remote).clone();
        remote.attest(provider, policy).await?;
        let remote = Arc::new(remote);
        opened.kms = remote.clone();
        opened.backend = KmsBackend::Remote(remote);
        Ok(())
    }

    /// The configured KMS server, with the app's credentials; an error without --kms-url.
    pub async fn open_remote(&mut self) -> Result<Arc<RemoteKms>> {
        if self.kms_url.is_none() {
            bail!("attestation policies live at a KMS server: set --kms-url or PPML_KMS_URL");
        }
        match self.open_kms().await?.backend {
            KmsBackend::Remote(remote) => Ok(remote),
            KmsBackend::Local(_) => bail!("a KMS URL is configured but the embedded KMS opened"),
        }
    }

    /// Opens the KMS for the configured app: the KMS server when a URL is configured,
    /// otherwise the embedded KMS, created with a default app and key on first use.
    pub async fn open_kms(&mut self) -> Result<OpenKms> {
        let primary = self.primary_key.clone().map(PrimaryKeyId);
        if let Some(config) = self.remote_config()? {
            let creds = self.credentials()?;
            let remote = RemoteKms::connect(&config, Some(creds))
                .await
                .with_context(|| format!("connecting to the KMS at {}", config.url))?;
            tracing::info!(url = %config.url, kms_id = %remote.kms_id(), "using the KMS server");
            let remote = Arc::new(remote);
            return Ok(OpenKms {
                kms: remote.clone(),
                backend: KmsBackend::Remote(remote),
                primary,
                output: self.output_key.clone().map(PrimaryKeyId),
            });
        }
        let dir = self.kms_dir();
        if self.appid.is_none() && self.apikey.is_none() && !LocalKms::exists(&dir) {
            self.bootstrap().await?;
        }
        let creds = self.credentials()?;
        let local = Arc::new(
            LocalKms::open(&dir, &creds)
                .with_context(|| format!("opening the embedded KMS in {}", dir.display()))?,
        );
        Ok(OpenKms {
            kms: local.clone(),
            backend: KmsBackend::Local(local),
            primary: self.primary_key.clone().map(PrimaryKeyId),
            output: self.output_key.clone().map(PrimaryKeyId),
        })
    }

    /// Creates the embedded KMS with a default app and primary key, and records them in
    /// $PPML_HOME/config.toml (mode 0600). Said once, on stderr.
    async fn bootstrap(&mut self) -> Result<()> {
        let dir = self.kms_dir();
        LocalKms::init(&dir).with_context(|| format!("creating the KMS in {}", dir.display()))?;
        let creds = LocalKms::enroll(&dir)?;
        let kms = LocalKms::open(&dir, &creds)?;
        let primary = kms.create_primary_key().await?;
        let config = format!(
            "# Written by ppml on first use: the default app of the embedded KMS.\n\
             [kms]\nappid = \"{}\"\napikey = \"{}\"\nprimary_key = \"{}\"\n",
            creds.appid, *creds.apikey, primary
        );
        let path = self.home.join("config.toml");
        ppml_kms::write_private_file_atomic(&path, config.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
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

/// The concrete KMS behind [`OpenKms`], for the admin commands the trait does not cover.
#[derive(Clone)]
pub enum KmsBackend {
    Local(Arc<LocalKms>),
    Remote(Arc<RemoteKms>),
}

/// An opened KMS and the primary key to use for new data.
pub struct OpenKms {
    pub kms: Arc<dyn KeyManagementService>,
    pub backend: KmsBackend,
    pub primary: Option<PrimaryKeyId>,
    /// The primary key for query results, when it differs from `primary`.
    pub output: Option<PrimaryKeyId>,
}

impl OpenKms {
    /// The primary key query results are written under: the output key if one is
    /// configured (typically the data owner's, not released to runtimes), else the primary.
    pub fn output_primary(&self) -> Result<&PrimaryKeyId> {
        match &self.output {
            Some(output) => Ok(output),
            None => self.primary(),
        }
    }

    pub fn primary(&self) -> Result<&PrimaryKeyId> {
        self.primary.as_ref().context(
            "no primary key configured: set PPML_PRIMARY_KEY, --primary-key, or [kms] \
             primary_key (create one with `ppml kms create-key`)",
        )
    }

    pub fn dyn_kms(&self) -> Arc<dyn KeyManagementService> {
        self.kms.clone()
    }
}
