//! The command's settings: the KMS settings of [`ppml::Settings`] (flags and env vars through
//! clap, over the TOML files), and what only the command decides (TEE, quiet, durability).

use anyhow::Result;
use ppml::{AttestationConfig, GivenSettings, OpenKms};

use crate::cli::{GlobalArgs, TeeKind};

/// Resolved settings; derefs to the KMS settings.
#[derive(Debug)]
pub struct Settings {
    pub kms: ppml::Settings,
    pub tee: Option<TeeKind>,
    pub attestation_policy: Option<String>,
    pub attestation_debug: bool,
    /// BigDL's attestation variables are in use: outcomes also on stdout, failure exits 1.
    pub bigdl_attestation: bool,
    pub sim_platform_key: Option<std::path::PathBuf>,
    pub quiet: bool,
    /// Whether outputs are synced before they appear (`--no-sync` turns it off).
    pub durability: ppml::Durability,
    /// What grants signed at start allow.
    pub grant_options: ppml::grant::GrantOptions,
}

impl std::ops::Deref for Settings {
    type Target = ppml::Settings;
    fn deref(&self) -> &ppml::Settings {
        &self.kms
    }
}

impl std::ops::DerefMut for Settings {
    fn deref_mut(&mut self) -> &mut ppml::Settings {
        &mut self.kms
    }
}

impl TeeKind {
    pub fn tee(self) -> ppml::Tee {
        match self {
            TeeKind::Sim => ppml::Tee::Sim,
            TeeKind::Sgx => ppml::Tee::Sgx,
            TeeKind::Tdx => ppml::Tee::Tdx,
        }
    }
}

impl Settings {
    pub fn resolve(global: &GlobalArgs) -> Result<Self> {
        let kms = ppml::Settings::resolve(GivenSettings {
            home: global.home.clone(),
            config: global.config.clone(),
            appid: global.appid.clone(),
            apikey: global.apikey.clone(),
            primary_key: global.primary_key.clone(),
            output_key: global.output_key.clone(),
            kms_url: global.kms_url.clone(),
            kms_fingerprint: global.kms_fingerprint.clone(),
            kms_flavor: global.kms_flavor.clone(),
            kms_ca_cert: global.kms_ca_cert.clone(),
            kms_policy: global.kms_policy.clone(),
            kms_collateral: global.kms_collateral.clone(),
            owner_key: global.owner_key.clone(),
            grant: global.grant.clone(),
        })?;
        Ok(Settings {
            kms,
            tee: global.tee,
            attestation_policy: global.attestation_policy.clone(),
            attestation_debug: global.attestation_debug,
            bigdl_attestation: global.bigdl_attestation,
            sim_platform_key: global.sim_platform_key.clone(),
            quiet: global.quiet,
            grant_options: ppml::grant::GrantOptions {
                reveal_counts: global.reveal_counts,
                ..Default::default()
            },
            durability: if global.no_sync {
                ppml::Durability::NoSync
            } else {
                ppml::Durability::Durable
            },
        })
    }

    /// Opens the KMS for a process that will read data: with `--tee`, attests to the KMS
    /// server before anything is read (docs/attestation.md §6). A failure ends the process
    /// (`Attestation Fail! Application killed!`) unless `--attestation-debug` is given.
    pub async fn open_kms_for_runtime(&mut self) -> Result<OpenKms> {
        let opened = self.kms.open_kms().await?;
        let Some(tee) = self.tee else {
            return Ok(opened);
        };
        let result = match &self.attestation_policy {
            Some(policy) => {
                let config = AttestationConfig {
                    tee: tee.tee(),
                    policy_id: policy.clone(),
                    sim_platform_key: self.sim_platform_key.clone(),
                };
                opened.clone().attest(&config, &self.kms.home).await
            }
            None => Err(ppml::Error::Config {
                what: "--tee".into(),
                reason: "needs --attestation-policy (PPML_ATTESTATION_POLICY)".into(),
            }),
        };
        use ppml::bigdl_env::{DEBUG_FAILURE_LINE, FAILURE_LINE, SUCCESS_LINE};
        // BigDL's scripts read these lines on stdout.
        let bigdl_line = |line: &str| {
            if self.bigdl_attestation {
                println!("{line}");
            }
        };
        match result {
            Ok(attested) => {
                tracing::info!("{SUCCESS_LINE}");
                eprintln!("{SUCCESS_LINE}");
                bigdl_line(SUCCESS_LINE);
                Ok(attested)
            }
            Err(e) if self.attestation_debug => {
                tracing::error!(error = %e, "Attestation Fail! In debug mode, continue.");
                eprintln!("ERROR: Attestation Fail! In debug mode, continue. ({e:#})");
                bigdl_line(DEBUG_FAILURE_LINE);
                Ok(opened)
            }
            Err(e) => {
                tracing::error!(error = %e, "{FAILURE_LINE}");
                eprintln!("{FAILURE_LINE}");
                bigdl_line(FAILURE_LINE);
                let error = anyhow::Error::from(e);
                Err(if self.bigdl_attestation {
                    error.context(crate::exit::BigDlAttestationFailed)
                } else {
                    error
                })
            }
        }
    }
}
