//! Job grants: the data owner's signed authorization of one job (`docs/threat-model.md`).
//!
//! A grant names the application (SimpleQuery, or the exact SQL text), the input datasets it
//! may read (dataset id and primary key, optionally the manifest digest), the output (location,
//! primary key, whether it may overwrite), whether counts may leave the runtime, and when it
//! expires. The owner signs the grant's JSON bytes with the owner key; the KMS releases a data
//! key of a marked key under a grant only for a dataset the grant names, and runtimes refuse
//! work the grant does not name.
//!
//! On the wire a signed grant is `{"grant": base64(grant JSON bytes), "signature":
//! base64(Ed25519(owner key, GRANT_CONTEXT ‖ grant JSON bytes))}`: the signature covers the
//! bytes as sent, so no canonical form is needed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::owner::OwnerKey;

/// Domain separation of grant signatures from request signatures.
pub const GRANT_CONTEXT: &[u8] = b"ppml job grant v1\0";

/// The aad prefix of a job's shuffle key (`ppml-shuffle:<job id>`).
pub const SHUFFLE_AAD_PREFIX: &str = "ppml-shuffle:";

/// The aad prefix of a dataset's data keys (`ppml-dataset:<hex dataset id>`).
pub const DATASET_AAD_PREFIX: &str = "ppml-dataset:";

/// What the job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GrantedApp {
    /// ppml's SimpleQuery.
    SimpleQuery,
    /// Exactly this SQL text.
    Sql {
        /// The query.
        sql: String,
    },
}

/// An input the job may read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedInput {
    /// The dataset id, 32 lowercase hex digits.
    pub dataset_id: String,
    /// The primary key its data keys are wrapped under.
    pub key_id: String,
    /// The SHA-256 of its manifest, 64 lowercase hex digits: pins the version read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// Where the job writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedOutput {
    /// The output location.
    pub location: String,
    /// The primary key the output's data keys are wrapped under.
    pub key_id: String,
    /// Whether an existing dataset there may be replaced.
    #[serde(default)]
    pub overwrite: bool,
}

/// One job, as the owner allows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobGrant {
    /// Format version, 1.
    pub version: u32,
    /// The app the grant is for.
    pub appid: String,
    /// A unique id of the job (random, 32 hex digits); the job's shuffle key is bound to it.
    pub job_id: String,
    /// The application.
    pub application: GrantedApp,
    /// The datasets it may read.
    pub inputs: Vec<GrantedInput>,
    /// Where it writes, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<GrantedOutput>,
    /// Whether row counts may leave the runtime (printed or logged).
    #[serde(default)]
    pub reveal_counts: bool,
    /// Unix time in seconds after which the grant is void.
    pub not_after: u64,
}

/// Why a grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// Not the wire shape, or not base64.
    #[error("the job grant is malformed: {0}")]
    Malformed(String),
    /// The signature is not the app owner's.
    #[error("the job grant is not signed by the app's owner key")]
    Signature,
    /// Past `not_after`.
    #[error("the job grant has expired")]
    Expired,
    /// Issued to another app.
    #[error("the job grant is for another app")]
    OtherApp,
    /// The grant does not allow this use.
    #[error("the job grant does not allow this: {0}")]
    NotGranted(String),
}

/// A grant with its signature, as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedGrant {
    /// base64 of the grant's JSON bytes.
    pub grant: String,
    /// base64 of the owner's Ed25519 signature.
    pub signature: String,
}

impl SignedGrant {
    /// Signs `grant` with `owner`.
    pub fn sign(grant: &JobGrant, owner: &OwnerKey) -> Result<Self, GrantError> {
        let bytes = serde_json::to_vec(grant).map_err(|e| GrantError::Malformed(e.to_string()))?;
        let mut message = GRANT_CONTEXT.to_vec();
        message.extend_from_slice(&bytes);
        Ok(SignedGrant {
            grant: BASE64.encode(&bytes),
            signature: BASE64.encode(owner.sign_bytes(&message)),
        })
    }

    /// The compact JSON text (as carried in a KMS request's `grant` field).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("two strings serialize")
    }

    /// Parses the compact JSON text.
    pub fn from_text(text: &str) -> Result<Self, GrantError> {
        serde_json::from_str(text).map_err(|e| GrantError::Malformed(e.to_string()))
    }

    /// The grant, if `owner_public_key` signed it, it is for `appid` and it has not expired
    /// at `now_secs`.
    pub fn verify(
        &self,
        owner_public_key: &[u8; 32],
        appid: &str,
        now_secs: u64,
    ) -> Result<JobGrant, GrantError> {
        let bytes = BASE64
            .decode(&self.grant)
            .map_err(|_| GrantError::Malformed("grant is not base64".into()))?;
        let signature = BASE64
            .decode(&self.signature)
            .map_err(|_| GrantError::Malformed("signature is not base64".into()))?;
        let mut message = GRANT_CONTEXT.to_vec();
        message.extend_from_slice(&bytes);
        UnparsedPublicKey::new(&ED25519, owner_public_key)
            .verify(&message, &signature)
            .map_err(|_| GrantError::Signature)?;
        let grant: JobGrant =
            serde_json::from_slice(&bytes).map_err(|e| GrantError::Malformed(e.to_string()))?;
        if grant.version != 1 {
            return Err(GrantError::Malformed(format!(
                "version {} (this build reads 1)",
                grant.version
            )));
        }
        if grant.appid != appid {
            return Err(GrantError::OtherApp);
        }
        if now_secs > grant.not_after {
            return Err(GrantError::Expired);
        }
        Ok(grant)
    }
}

impl JobGrant {
    /// Whether the grant lets a runtime unwrap a data key of `key_id` bound to `aad`: a data
    /// key of an input dataset under that input's key, or the job's shuffle key under an
    /// input's key.
    pub fn allows_release(&self, key_id: &str, aad: &str) -> Result<(), GrantError> {
        if let Some(dataset) = aad.strip_prefix(DATASET_AAD_PREFIX) {
            return match self.inputs.iter().find(|i| i.dataset_id == dataset) {
                Some(input) if input.key_id == key_id => Ok(()),
                Some(_) => Err(GrantError::NotGranted(format!(
                    "dataset {dataset} is granted under another key than {key_id}"
                ))),
                None => Err(GrantError::NotGranted(format!(
                    "dataset {dataset} is not an input of job {}",
                    self.job_id
                ))),
            };
        }
        self.allows_shuffle_key(key_id, aad)
    }

    /// Whether the grant lets a runtime make a new data key of `key_id` bound to `aad`: for
    /// the granted output under the output key, or the job's shuffle key under an input's key.
    pub fn allows_generation(&self, key_id: &str, aad: &str) -> Result<(), GrantError> {
        if aad.starts_with(DATASET_AAD_PREFIX) {
            return match &self.output {
                Some(output) if output.key_id == key_id => Ok(()),
                _ => Err(GrantError::NotGranted(format!(
                    "job {} writes no output under key {key_id}",
                    self.job_id
                ))),
            };
        }
        self.allows_shuffle_key(key_id, aad)
    }

    fn allows_shuffle_key(&self, key_id: &str, aad: &str) -> Result<(), GrantError> {
        let job = aad.strip_prefix(SHUFFLE_AAD_PREFIX).ok_or_else(|| {
            GrantError::NotGranted(format!("a key bound to {aad:?} is not a job's"))
        })?;
        // The shuffle key's job id is the grant's, optionally followed by `/` and more (a
        // grant may cover several cluster jobs of one application).
        let ours = job == self.job_id
            || job
                .strip_prefix(self.job_id.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if !ours {
            return Err(GrantError::NotGranted(format!(
                "the shuffle key of job {job:?} is not job {}'s",
                self.job_id
            )));
        }
        if !self.inputs.iter().any(|i| i.key_id == key_id) {
            return Err(GrantError::NotGranted(format!(
                "job {} has no input under key {key_id}",
                self.job_id
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> JobGrant {
        JobGrant {
            version: 1,
            appid: "app".into(),
            job_id: "0123456789abcdef0123456789abcdef".into(),
            application: GrantedApp::Sql {
                sql: "SELECT count(*) FROM people".into(),
            },
            inputs: vec![GrantedInput {
                dataset_id: "aa".repeat(16),
                key_id: "K-in".into(),
                manifest_sha256: None,
            }],
            output: Some(GrantedOutput {
                location: "/out.enc".into(),
                key_id: "K-out".into(),
                overwrite: false,
            }),
            reveal_counts: false,
            not_after: 2_000_000_000,
        }
    }

    #[test]
    fn only_the_owners_unexpired_grant_for_this_app_verifies() {
        let (owner, _) = OwnerKey::generate().unwrap();
        let signed = SignedGrant::sign(&grant(), &owner).unwrap();
        let text = signed.to_text();
        let parsed = SignedGrant::from_text(&text).unwrap();
        assert_eq!(
            parsed.verify(&owner.public_key(), "app", 1_900_000_000),
            Ok(grant())
        );
        assert_eq!(
            parsed.verify(&owner.public_key(), "other", 1_900_000_000),
            Err(GrantError::OtherApp)
        );
        assert_eq!(
            parsed.verify(&owner.public_key(), "app", 2_000_000_001),
            Err(GrantError::Expired)
        );
        let (stranger, _) = OwnerKey::generate().unwrap();
        assert_eq!(
            parsed.verify(&stranger.public_key(), "app", 1_900_000_000),
            Err(GrantError::Signature)
        );
        // A grant edited after signing (more inputs, other SQL) does not verify.
        let mut widened = grant();
        widened.application = GrantedApp::Sql {
            sql: "SELECT * FROM people".into(),
        };
        let forged = SignedGrant {
            grant: BASE64.encode(serde_json::to_vec(&widened).unwrap()),
            signature: signed.signature.clone(),
        };
        assert_eq!(
            forged.verify(&owner.public_key(), "app", 1_900_000_000),
            Err(GrantError::Signature)
        );
    }

    #[test]
    fn releases_and_generations_follow_the_grant() {
        let g = grant();
        let dataset = format!("{DATASET_AAD_PREFIX}{}", "aa".repeat(16));
        let other_dataset = format!("{DATASET_AAD_PREFIX}{}", "bb".repeat(16));
        let shuffle = format!("{SHUFFLE_AAD_PREFIX}{}", g.job_id);
        assert_eq!(g.allows_release("K-in", &dataset), Ok(()));
        assert!(g.allows_release("K-out", &dataset).is_err());
        assert!(g.allows_release("K-in", &other_dataset).is_err());
        assert_eq!(g.allows_release("K-in", &shuffle), Ok(()));
        assert_eq!(
            g.allows_release("K-in", &format!("{shuffle}/stage-2")),
            Ok(())
        );
        assert!(
            g.allows_release("K-in", &format!("{SHUFFLE_AAD_PREFIX}someone-else"))
                .is_err()
        );
        assert!(g.allows_release("K-in", &format!("{shuffle}x")).is_err());
        assert!(g.allows_release("K-in", "free text").is_err());
        assert_eq!(g.allows_generation("K-out", &other_dataset), Ok(()));
        assert!(g.allows_generation("K-in", &other_dataset).is_err());
        assert_eq!(g.allows_generation("K-in", &shuffle), Ok(()));
    }
}
