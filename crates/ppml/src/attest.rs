//! Attesting this process to the KMS server: the evidence provider of each TEE, and the
//! switch from an unattested KMS client to an attested one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ppml_attestation::{EvidenceProvider, Tee};

use crate::config::{KmsBackend, OpenKms};
use crate::error::{Error, Result};

/// How this process attests (`docs/attestation.md` §6).
#[derive(Clone, Debug)]
pub struct AttestationConfig {
    /// The TEE it runs in: [`Tee::Sgx`] (Gramine's `/dev/attestation`), [`Tee::Tdx`]
    /// (configfs-tsm), or [`Tee::Sim`] (the simulated TEE, development only).
    pub tee: Tee,
    /// The attestation policy id at the KMS (from `ppml kms release-policy`).
    pub policy_id: String,
    /// The simulation platform key of [`Tee::Sim`] [default: `$PPML_HOME/sim-platform.pk8`].
    pub sim_platform_key: Option<PathBuf>,
}

impl AttestationConfig {
    /// Attestation in `tee` under the policy `policy_id`.
    pub fn new(tee: Tee, policy_id: impl Into<String>) -> Self {
        AttestationConfig {
            tee,
            policy_id: policy_id.into(),
            sim_platform_key: None,
        }
    }
}

/// The simulation platform key `path` [default: `home/sim-platform.pk8`], created if missing.
pub fn sim_platform(
    path: Option<&Path>,
    home: &Path,
) -> Result<ppml_attestation::sim::SimPlatform> {
    let path = sim_platform_path(path, home);
    ppml_attestation::sim::SimPlatform::load_or_create(&path).map_err(|e| Error::Config {
        what: format!("loading the simulation platform key {}", path.display()),
        reason: e.to_string(),
    })
}

/// The evidence provider of `tee`; `home` is `$PPML_HOME`, where the simulated TEE keeps its
/// platform key by default.
pub fn evidence_provider(
    config: &AttestationConfig,
    home: &Path,
) -> Result<Arc<dyn EvidenceProvider>> {
    if config.tee == Tee::Sim {
        tracing::warn!("SIMULATED TEE: no hardware protection; for development only");
    }
    let path = sim_platform_path(config.sim_platform_key.as_deref(), home);
    ppml_attestation::evidence::provider_for(config.tee, &path).map_err(|e| Error::Config {
        what: format!("loading the simulation platform key {}", path.display()),
        reason: e.to_string(),
    })
}

/// Adds `root_id` to the `kms_root_ids` of the KMS policy file `path` (`docs/attestation.md`
/// §9), so that clients using it trust the KMS only while it holds that root key. Returns
/// false when the policy already names it. The file is replaced atomically.
pub fn pin_kms_root_id(path: &Path, root_id: &[u8; 32]) -> Result<bool> {
    let failed = |reason: String| Error::Config {
        what: format!("the KMS policy {}", path.display()),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let mut policy: ppml_attestation::Policy =
        serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
    let id = hex::encode(root_id);
    if policy
        .kms_root_ids
        .iter()
        .any(|pinned| pinned.eq_ignore_ascii_case(&id))
    {
        return Ok(false);
    }
    policy.kms_root_ids.push(id);
    let mut json = serde_json::to_string_pretty(&policy).map_err(|e| failed(e.to_string()))?;
    json.push('\n');
    ppml_kms::write_private_file_atomic(path, json.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    Ok(true)
}

/// Where the owner keeps the KMS's audit head between unseals, by default: the root key file's
/// name followed by `.audit-head.json`, so that the two stay together off the KMS's host.
pub fn kms_audit_head_file(root_key_file: &Path) -> PathBuf {
    let mut path = root_key_file.as_os_str().to_os_string();
    path.push(".audit-head.json");
    path.into()
}

/// The audit head the owner kept at `path` from its last unseal (`docs/attestation.md` §9.1),
/// or None when there is no such file yet.
pub fn read_kms_audit_head(path: &Path) -> Result<Option<ppml_kms::protocol::AuditHead>> {
    let failed = |reason: String| Error::Config {
        what: format!("the KMS audit head file {}", path.display()),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| failed(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Keeps `head` at `path` for the next unseal (replaced atomically).
pub fn write_kms_audit_head(path: &Path, head: &ppml_kms::protocol::AuditHead) -> Result<()> {
    let mut json = serde_json::to_string_pretty(head).expect("an audit head serializes");
    json.push('\n');
    ppml_kms::write_private_file_atomic(path, json.as_bytes()).map_err(|e| Error::Config {
        what: format!("the KMS audit head file {}", path.display()),
        reason: e.to_string(),
    })
}

fn sim_platform_path(path: Option<&Path>, home: &Path) -> PathBuf {
    path.map_or_else(|| home.join("sim-platform.pk8"), Path::to_path_buf)
}

impl OpenKms {
    /// Attests this process to the KMS server with `config`: from then on data keys of keys
    /// marked for attested release are released to it (`ReleaseDataKey`, sealed to a runtime
    /// key). Refused evidence is [`Error::Attestation`]; the embedded KMS cannot verify
    /// evidence ([`Error::Config`]).
    pub async fn attest(self, config: &AttestationConfig, home: &Path) -> Result<OpenKms> {
        let remote = match &self.backend {
            KmsBackend::Remote(remote) => (**remote).clone(),
            KmsBackend::Attested(_) => return Ok(self),
            KmsBackend::Embedded(_) => {
                return Err(Error::Config {
                    what: "--tee".into(),
                    reason: "attestation needs a KMS server (--kms-url): the embedded KMS \
                             cannot verify evidence"
                        .into(),
                });
            }
        };
        let provider = evidence_provider(config, home)?;
        let attested = remote
            .attest(provider, &config.policy_id)
            .await
            .map_err(|source| Error::Attestation { source })?;
        Ok(OpenKms {
            backend: KmsBackend::Attested(Arc::new(attested)),
            ..self
        })
    }
}
