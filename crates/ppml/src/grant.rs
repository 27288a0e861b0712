//! Job grants, the data owner's side: the owner's signed authorization of one job
//! (`docs/threat-model.md` §5). A KMS server releases the data keys of keys marked for
//! attested release only under a grant that names their use, and runtimes refuse an
//! application, output or overwrite their grant does not name.
//!
//! [`describe`] makes the grant of an application ([`AppSpec`]) or of a decryption: the
//! application, its inputs (dataset id, key and manifest digest, read from the datasets'
//! manifests), its output and output key. The owner signs it with [`SignedGrant::sign`] (or
//! [`crate::Settings::sign_grant`] does both) and hands the file to whoever runs the job
//! ([`write_grant`], [`read_grant`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ppml_engine::DatasetLocation;
use ppml_engine::app::AppSpec;
use ppml_engine::dataset::read_dataset_identity;
pub use ppml_kms::grant::{
    GrantError, GrantedApp, GrantedInput, GrantedOutput, JobGrant, SignedGrant,
};
use ppml_kms::{KmsError, PrimaryKeyId};

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

/// What a grant is for.
#[derive(Clone, Copy, Debug)]
pub enum GrantedJob<'a> {
    /// An application, writing its output (if it has one) under `output_key`.
    App {
        /// The application.
        spec: &'a AppSpec,
        /// The key the output is written under.
        output_key: Option<&'a PrimaryKeyId>,
    },
    /// Decrypting a dataset: its plaintext leaves the runtime (the owner's own use).
    Decrypt(&'a DatasetLocation),
}

/// The grant of `job` for `appid`: the datasets it reads named by id and key (and pinned to
/// their current manifests unless `options.pin_versions` is off), read from their manifests
/// at their locations now.
pub async fn describe(
    job: GrantedJob<'_>,
    appid: &str,
    options: &GrantOptions,
) -> Result<JobGrant> {
    let (application, locations, output) = match job {
        GrantedJob::App { spec, output_key } => {
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
            (application, spec.inputs(), output)
        }
        GrantedJob::Decrypt(location) => (GrantedApp::Decrypt, vec![location], None),
    };
    let mut inputs: Vec<GrantedInput> = Vec::new();
    for location in locations {
        let identity = read_dataset_identity(location).await?;
        let dataset_id = hex::encode(identity.dataset_id);
        if inputs.iter().any(|i| i.dataset_id == dataset_id) {
            continue;
        }
        inputs.push(GrantedInput {
            dataset_id,
            key_id: identity.key_id,
            manifest_sha256: options
                .pin_versions
                .then(|| hex::encode(identity.manifest_sha256)),
        });
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(JobGrant {
        version: 1,
        appid: appid.to_string(),
        job_id: JobGrant::new_job_id().map_err(KmsError::from)?,
        application,
        inputs,
        output,
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
