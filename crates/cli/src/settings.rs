//! Configuration: flags and environment variables (through clap) over a TOML file over the
//! defaults in $PPML_HOME; and opening the KMS they describe.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ppml_kms::{AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId};
use serde::Deserialize;

use crate::cli::GlobalArgs;

/// The TOML configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// KMS credentials and the default primary key.
    #[serde(default)]
    pub kms: KmsSection,
}

/// `[kms]` of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    pub appid: Option<String>,
    pub apikey: Option<String>,
    pub primary_key: Option<String>,
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    pub home: PathBuf,
    pub appid: Option<String>,
    pub apikey: Option<String>,
    pub primary_key: Option<String>,
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
        for file in files {
            settings.appid = settings.appid.or(file.kms.appid);
            settings.apikey = settings.apikey.or(file.kms.apikey);
            settings.primary_key = settings.primary_key.or(file.kms.primary_key);
        }
        Ok(settings)
    }

    /// Directory of the embedded KMS.
    pub fn kms_dir(&self) -> PathBuf {
        self.home.join("kms")
    }

    /// Opens the KMS for the configured app, creating the embedded default on first use.
    pub async fn open_kms(&mut self) -> Result<OpenKms> {
        let dir = self.kms_dir();
        if self.appid.is_none() && self.apikey.is_none() && !LocalKms::exists(&dir) {
            self.bootstrap().await?;
        }
        let (Some(appid), Some(apikey)) = (&self.appid, &self.apikey) else {
            bail!(
                "no KMS app credentials: set PPML_APPID and PPML_APIKEY (or --appid/--apikey, \
                 or [kms] appid/apikey in {})",
                self.home.join("config.toml").display()
            );
        };
        let kms = LocalKms::open(&dir, &AppCredentials::new(appid.clone(), apikey.clone()))
            .with_context(|| format!("opening the embedded KMS in {}", dir.display()))?;
        Ok(OpenKms {
            kms: Arc::new(kms),
            primary: self.primary_key.clone().map(PrimaryKeyId),
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

/// An opened KMS and the primary key to use for new data.
pub struct OpenKms {
    pub kms: Arc<LocalKms>,
    pub primary: Option<PrimaryKeyId>,
}

impl OpenKms {
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
