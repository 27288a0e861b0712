//! Per-job settings that travel with every task, and the per-job shuffle key.
//!
//! The driver puts two settings in the job's session configuration (docs/cluster.md §5, §6.2):
//! `ppml.job_id`, its own id for the job, and `ppml.shuffle_key`, the job's shuffle data key
//! *wrapped* by the KMS (base64url of a small JSON object). Ballista hands the settings to
//! every task; executors release the key from the KMS, once per job, and fail closed when it
//! is missing. The scheduler sees only the wrapped form.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use datafusion::config::{ConfigEntry, ConfigExtension, ExtensionOptions};
use datafusion::prelude::SessionConfig;
use ppml_format::KeyReference;
use ppml_kms::grant::SignedGrant;
use ppml_kms::{KeyManagementService, PrimaryKeyId};
use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::shuffle::ShuffleKey;

/// ppml's settings of one distributed job (`ppml.*`).
///
/// Written by hand rather than with DataFusion's `extensions_options!`, whose `entries()` drop
/// the `ppml.` prefix: Ballista forwards settings by their `entries()` keys, so unprefixed keys
/// would not be recognised by the scheduler and executors and the settings would be lost.
#[derive(Clone, Debug, Default)]
pub struct PpmlJobConfig {
    /// The driver's id for the job (random hex): binds the shuffle key to the job.
    pub job_id: String,
    /// The job's shuffle data key, wrapped by the KMS ([`encode_key_reference`]).
    pub shuffle_key: String,
    /// The data owner's grant of the job ([`SignedGrant::to_text`]), if it runs under one.
    pub grant: String,
    /// The job's stage plans, signed by its driver ([`crate::stages::SignedStages::sign`]).
    pub stages: String,
}

const JOB_ID: &str = "job_id";
const SHUFFLE_KEY: &str = "shuffle_key";
const GRANT: &str = "grant";
const STAGES: &str = "stages";

impl ExtensionOptions for PpmlJobConfig {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, value: &str) -> datafusion::error::Result<()> {
        match key {
            JOB_ID => self.job_id = value.to_string(),
            SHUFFLE_KEY => self.shuffle_key = value.to_string(),
            GRANT => self.grant = value.to_string(),
            STAGES => self.stages = value.to_string(),
            other => {
                return Err(datafusion::error::DataFusionError::Configuration(format!(
                    "unknown setting ppml.{other}"
                )));
            }
        }
        Ok(())
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        [
            (JOB_ID, &self.job_id, "the driver's id for the job"),
            (
                SHUFFLE_KEY,
                &self.shuffle_key,
                "the job's wrapped shuffle key",
            ),
            (GRANT, &self.grant, "the data owner's grant of the job"),
            (
                STAGES,
                &self.stages,
                "the job's stage plans, signed by its driver",
            ),
        ]
        .into_iter()
        .map(|(key, value, description)| ConfigEntry {
            key: format!("{}.{key}", Self::PREFIX),
            value: (!value.is_empty()).then(|| value.clone()),
            description,
        })
        .collect()
    }
}

impl ConfigExtension for PpmlJobConfig {
    const PREFIX: &'static str = "ppml";
}

/// Adds the (empty) `ppml` settings to `config`, so that `ppml.*` keys sent with a job are
/// kept rather than dropped. Every process of a cluster registers them.
pub fn with_job_settings(config: SessionConfig) -> SessionConfig {
    config.with_option_extension(PpmlJobConfig::default())
}

/// The KMS `aad` binding a shuffle key to its job.
pub fn shuffle_key_aad(job_id: &str) -> Vec<u8> {
    format!("ppml-shuffle:{job_id}").into_bytes()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyReferenceJson {
    kms: String,
    key_id: String,
    wrapped: String,
}

/// Encodes a wrapped key for a setting: base64url (no padding) of
/// `{"kms": …, "key_id": …, "wrapped": base64url}`.
pub fn encode_key_reference(reference: &KeyReference) -> String {
    let json = serde_json::to_vec(&KeyReferenceJson {
        kms: reference.kms.clone(),
        key_id: reference.key_id.clone(),
        wrapped: URL_SAFE_NO_PAD.encode(&reference.wrapped),
    })
    .expect("serialisable");
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes [`encode_key_reference`].
pub fn decode_key_reference(text: &str) -> Result<KeyReference, ClusterError> {
    let bad = |why: String| ClusterError::JobSettings(format!("ppml.shuffle_key: {why}"));
    let json = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| bad(e.to_string()))?;
    let parsed: KeyReferenceJson = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let wrapped = URL_SAFE_NO_PAD
        .decode(&parsed.wrapped)
        .map_err(|e| bad(e.to_string()))?;
    Ok(KeyReference::new(parsed.kms, parsed.key_id, wrapped))
}

/// The ppml settings of a task, validated.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// The driver's job id.
    pub job_id: String,
    /// The wrapped shuffle key.
    pub shuffle_key: KeyReference,
    /// The data owner's grant the job runs under (executors send it with their key requests).
    pub grant: Option<SignedGrant>,
    /// The job's signed stage plans (`ppml.stages`), verified once the shuffle key is
    /// released ([`crate::stages::SignedStages::verify`]).
    pub stages: Option<String>,
}

impl JobSettings {
    /// Reads the settings from a task's configuration; an executor refuses a task without them.
    pub fn from_config(config: &SessionConfig) -> Result<Self, ClusterError> {
        let settings = config
            .options()
            .extensions
            .get::<PpmlJobConfig>()
            .ok_or_else(|| {
                ClusterError::JobSettings("the ppml settings are not registered".into())
            })?;
        if settings.job_id.is_empty() || settings.shuffle_key.is_empty() {
            return Err(ClusterError::JobSettings(
                "the task has no ppml.job_id or ppml.shuffle_key (not submitted by a ppml driver)"
                    .into(),
            ));
        }
        if !valid_job_id(&settings.job_id) {
            return Err(ClusterError::JobSettings(format!(
                "ppml.job_id {:?} is not 1..=128 characters of [A-Za-z0-9_-]",
                settings.job_id
            )));
        }
        let grant = match settings.grant.as_str() {
            "" => None,
            text => Some(
                SignedGrant::from_text(text)
                    .map_err(|e| ClusterError::JobSettings(format!("ppml.grant: {e}")))?,
            ),
        };
        Ok(JobSettings {
            job_id: settings.job_id.clone(),
            shuffle_key: decode_key_reference(&settings.shuffle_key)?,
            grant,
            stages: (!settings.stages.is_empty()).then(|| settings.stages.clone()),
        })
    }

    /// Writes the settings into `config`.
    pub fn apply(&self, config: &mut SessionConfig) -> Result<(), ClusterError> {
        let options = config.options_mut();
        let grant = self.grant.as_ref().map(SignedGrant::to_text);
        for (key, value) in [
            ("ppml.job_id", self.job_id.clone()),
            ("ppml.shuffle_key", encode_key_reference(&self.shuffle_key)),
            ("ppml.grant", grant.unwrap_or_default()),
            ("ppml.stages", self.stages.clone().unwrap_or_default()),
        ] {
            options
                .set(key, &value)
                .map_err(|e| ClusterError::JobSettings(format!("{key}: {e}")))?;
        }
        Ok(())
    }
}

/// Longest job id accepted.
pub const MAX_JOB_ID_LEN: usize = 128;

/// True for identifiers that are safe as path components (they name a directory below an
/// executor's work dir): 1..=[`MAX_JOB_ID_LEN`] of `[A-Za-z0-9_-]`.
pub fn valid_job_id(id: &str) -> bool {
    (1..=MAX_JOB_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Creates the shuffle key of a new job under `primary` (driver side).
pub async fn new_job_key(
    kms: &dyn KeyManagementService,
    primary: &PrimaryKeyId,
    job_id: &str,
) -> Result<(JobSettings, Arc<ShuffleKey>), ClusterError> {
    let (key, reference) = kms
        .generate_data_key(primary, &shuffle_key_aad(job_id))
        .await
        .map_err(|source| ClusterError::ShuffleKey {
            job_id: job_id.to_string(),
            source,
        })?;
    let settings = JobSettings {
        job_id: job_id.to_string(),
        shuffle_key: reference.clone(),
        grant: None,
        stages: None,
    };
    Ok((settings, Arc::new(ShuffleKey::new(key, reference))))
}

/// Most jobs whose shuffle keys an executor keeps in memory.
const CACHED_JOB_KEYS: usize = 64;

/// Releases and caches shuffle keys, one KMS request per job and process.
pub struct JobKeys {
    kms: Arc<dyn KeyManagementService>,
    keys: Mutex<HashMap<String, Arc<ShuffleKey>>>,
    releasing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JobKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobKeys").finish_non_exhaustive()
    }
}

impl JobKeys {
    /// Keys released by `kms` (an attested client in a TEE).
    pub fn new(kms: Arc<dyn KeyManagementService>) -> Self {
        JobKeys {
            kms,
            keys: Mutex::new(HashMap::new()),
            releasing: tokio::sync::Mutex::new(()),
        }
    }

    /// The executor's KMS client (an attested runtime's, in a TEE).
    pub fn kms(&self) -> &Arc<dyn KeyManagementService> {
        &self.kms
    }

    /// The shuffle key of the job described by `settings`.
    pub async fn get(&self, settings: &JobSettings) -> Result<Arc<ShuffleKey>, ClusterError> {
        if let Some(key) = self.cached(settings) {
            return Ok(key);
        }
        let _releasing = self.releasing.lock().await;
        if let Some(key) = self.cached(settings) {
            return Ok(key);
        }
        let key = self
            .kms
            .unwrap_data_key(&settings.shuffle_key, &shuffle_key_aad(&settings.job_id))
            .await
            .map_err(|source| ClusterError::ShuffleKey {
                job_id: settings.job_id.clone(),
                source,
            })?;
        let key = Arc::new(ShuffleKey::new(key, settings.shuffle_key.clone()));
        let mut keys = self.keys.lock().expect("job keys lock");
        if keys.len() >= CACHED_JOB_KEYS {
            keys.clear();
        }
        keys.insert(settings.job_id.clone(), key.clone());
        tracing::info!(job = %settings.job_id, "shuffle key released");
        Ok(key)
    }

    fn cached(&self, settings: &JobSettings) -> Option<Arc<ShuffleKey>> {
        let keys = self.keys.lock().expect("job keys lock");
        keys.get(&settings.job_id)
            .filter(|key| key.reference() == &settings.shuffle_key)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_references_round_trip_through_settings() {
        let reference = KeyReference::new("local:abc", "primary-1", vec![1, 2, 3, 250]);
        let (owner, _) = ppml_kms::owner::OwnerKey::generate().unwrap();
        let grant = ppml_kms::grant::JobGrant {
            version: 1,
            appid: "app".into(),
            job_id: "0123456789abcdef0123456789abcdef".into(),
            application: ppml_kms::grant::GrantedApp::SimpleQuery,
            inputs: Vec::new(),
            output: None,
            reveal_counts: false,
            not_after: 2_000_000_000,
        };
        let grant = SignedGrant::sign(&grant, &owner).unwrap();
        let settings = JobSettings {
            job_id: "job-1".into(),
            shuffle_key: reference.clone(),
            grant: Some(grant.clone()),
            stages: Some("c3RhZ2Vz".into()),
        };
        let mut config = with_job_settings(SessionConfig::new());
        settings.apply(&mut config).unwrap();
        let read = JobSettings::from_config(&config).unwrap();
        assert_eq!(read.job_id, "job-1");
        assert_eq!(read.shuffle_key, reference);

        // As Ballista forwards them: by their entries, into a fresh configuration.
        let forwarded: Vec<(String, String)> = config
            .options()
            .entries()
            .into_iter()
            .filter_map(|e| Some((e.key, e.value?)))
            .collect();
        let mut received = with_job_settings(SessionConfig::new());
        for (key, value) in &forwarded {
            let _ = received.options_mut().set(key, value);
        }
        let read = JobSettings::from_config(&received).unwrap();
        assert_eq!(
            (
                read.job_id.as_str(),
                read.shuffle_key,
                read.grant,
                read.stages
            ),
            ("job-1", reference, Some(grant), Some("c3RhZ2Vz".into()))
        );
    }

    #[test]
    fn tasks_without_settings_or_with_bad_ones_are_refused() {
        let empty = with_job_settings(SessionConfig::new());
        assert!(JobSettings::from_config(&empty).is_err());
        assert!(JobSettings::from_config(&SessionConfig::new()).is_err());
        let mut bad = with_job_settings(SessionConfig::new());
        bad.options_mut().set("ppml.job_id", "../x").unwrap();
        bad.options_mut().set("ppml.shuffle_key", "e30").unwrap();
        let err = JobSettings::from_config(&bad).unwrap_err().to_string();
        assert!(err.contains("ppml.job_id"), "{err}");
        assert!(decode_key_reference("not base64!").is_err());
    }
}
