//! Job grants, the data owner's side: the owner's signed authorization of one job
//! (`docs/threat-model.md` §5). A KMS server releases the data keys of keys marked for
//! attested release only under a grant that names their use, and runtimes refuse an
//! application, output or overwrite their grant does not name.
//!
//! [`grant_for_app`] describes an [`AppSpec`] as a grant: its application, its inputs (dataset
//! id, key and manifest digest, read from the datasets' manifests), its output and output key.
//! The owner signs it with [`SignedGrant::sign`] and hands the file to whoever runs the job
//! ([`write_grant`], [`read_grant`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ppml_engine::app::AppSpec;
use ppml_engine::dataset::read_dataset_identity;
use ppml_kms::PrimaryKeyId;
pub use ppml_kms::grant::{
    GrantError, GrantedApp, GrantedInput, GrantedOutput, JobGrant, SignedGrant,
};

use crate::{Error, Result};

/// What a grant allows beyond the application itself.
#[derive(Clone, Debug)]
pub struct GrantOptions {
    /// Row counts may leave the runtime (printed, logged) [default: no].
    pub reveal_counts: bool,
    /// How long the grant stays valid [default: one hour].
    pub lifetime: Duration,
    /// Pin each input to the version read now (its manifest's SHA-256), so that an older or
    /// replaced version is refused [default: yes].
    pub pin_versions: bool,
}

impl Default for GrantOptions {
    fn default() -> Self {
        GrantOptions {
            reveal_counts: false,
            lifetime: Duration::from_secs(3600),
            pin_versions: true,
        }
    }
}

/// The grant of a job running `spec` for `appid`, writing under `output_key`: the datasets
/// it reads are named by id and key (and pinned to their current manifests unless
/// `options.pin_versions` is off), read from their manifests at their locations now.
pub async fn grant_for_app(
    spec: &AppSpec,
    appid: &str,
    output_key: Option<&PrimaryKeyId>,
    options: &GrantOptions,
) -> Result<JobGrant> {
    let application = match spec {
        AppSpec::SimpleQuery(_) => GrantedApp::SimpleQuery,
        AppSpec::Sql(sql) => GrantedApp::Sql {
            sql: sql.sql.clone(),
        },
        _ => {
            return Err(Error::Config {
                what: spec.summary(),
                reason: "this build cannot describe that application in a grant".into(),
            });
        }
    };
    let mut inputs: Vec<GrantedInput> = Vec::new();
    for location in spec.inputs() {
        let identity = read_dataset_identity(location).await?;
        let dataset_id = hex::encode(&identity.dataset_id);
        if inputs.iter().any(|i| i.dataset_id == dataset_id) {
            continue;
        }
        inputs.push(GrantedInput {
            dataset_id,
            key_id: identity.key_id,
            manifest_sha256: options
                .pin_versions
                .then(|| hex::encode(&identity.manifest_sha256)),
        });
    }
    let output = match spec.output() {
        None => None,
        Some(location) => {
            let key = output_key.ok_or_else(|| Error::Config {
                what: "the grant's output key".into(),
                reason: "give the key the output is written under (--output-key, \
                         PPML_OUTPUT_KEY or [kms] output_key)"
                    .into(),
            })?;
            Some(GrantedOutput {
                location: location.absolute()?.to_string(),
                key_id: key.0.clone(),
                overwrite: spec.overwrite(),
            })
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(JobGrant {
        version: 1,
        appid: appid.to_string(),
        job_id: JobGrant::new_job_id().map_err(grant_error)?,
        application,
        inputs,
        output,
        reveal_counts: options.reveal_counts,
        not_after: now + options.lifetime.as_secs(),
    })
}

/// The grant of decrypting the dataset at `location` for `appid` (its plaintext leaves the
/// runtime: a grant for the owner's own use).
pub async fn grant_for_decrypt(
    location: &ppml_engine::DatasetLocation,
    appid: &str,
    options: &GrantOptions,
) -> Result<JobGrant> {
    let identity = read_dataset_identity(location).await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(JobGrant {
        version: 1,
        appid: appid.to_string(),
        job_id: JobGrant::new_job_id().map_err(grant_error)?,
        application: GrantedApp::Decrypt,
        inputs: vec![GrantedInput {
            dataset_id: hex::encode(identity.dataset_id),
            key_id: identity.key_id,
            manifest_sha256: options
                .pin_versions
                .then(|| hex::encode(identity.manifest_sha256)),
        }],
        output: None,
        reveal_counts: options.reveal_counts,
        not_after: now + options.lifetime.as_secs(),
    })
}

/// Reads a signed grant file (the JSON of [`SignedGrant`]).
pub fn read_grant(path: &Path) -> Result<SignedGrant> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("grant file {}", path.display()), e))?;
    SignedGrant::from_text(text.trim()).map_err(|e| Error::Config {
        what: format!("grant file {}", path.display()),
        reason: e.to_string(),
    })
}

/// Writes a signed grant file. A grant is not a secret (it names datasets and keys, and only
/// the owner key can make one), but it is the owner's word: it is written atomically.
pub fn write_grant(path: &Path, grant: &SignedGrant) -> Result<()> {
    let mut text = serde_json::to_string_pretty(grant).expect("two strings serialize");
    text.push('\n');
    let temp = path.with_extension("grant.tmp");
    std::fs::write(&temp, text)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| Error::io(format!("grant file {}", path.display()), e))
}

fn grant_error(e: GrantError) -> Error {
    Error::Kms {
        context: "job grant".into(),
        source: e.into(),
    }
}
