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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::owner::OwnerKey;
use crate::{DataKey, KeyManagementService, KeyReference, KmsError, PrimaryKeyId};

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
    /// Decryption of the inputs, in plaintext to whoever runs it (the owner's own use).
    Decrypt,
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

    /// The grant's content without checking its signature: for routing requests to the grant
    /// that covers them and for checks a runtime makes before the KMS has seen the grant (the
    /// KMS verifies the signature of every grant it is sent).
    pub fn unverified(&self) -> Result<JobGrant, GrantError> {
        let bytes = BASE64
            .decode(&self.grant)
            .map_err(|_| GrantError::Malformed("grant is not base64".into()))?;
        JobGrant::from_json(&bytes)
    }

    /// SHA-256 of the grant's bytes, lowercase hex: names the grant in audit entries.
    pub fn sha256_hex(&self) -> String {
        let bytes = BASE64.decode(&self.grant).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
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
        let grant = JobGrant::from_json(&bytes)?;
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
    /// Parses a grant's JSON bytes (version 1): ids and digests as the format says (job and
    /// dataset ids of 32, digests of 64 lowercase hex digits), so that a job id is safe in
    /// paths and settings wherever it travels.
    pub fn from_json(bytes: &[u8]) -> Result<JobGrant, GrantError> {
        let grant: JobGrant =
            serde_json::from_slice(bytes).map_err(|e| GrantError::Malformed(e.to_string()))?;
        if grant.version != 1 {
            return Err(GrantError::Malformed(format!(
                "version {} (this build reads 1)",
                grant.version
            )));
        }
        let hex = |what: &str, text: &str, digits: usize| {
            let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            if text.len() == digits && text.bytes().all(lower_hex) {
                Ok(())
            } else {
                Err(GrantError::Malformed(format!(
                    "{what} {text:?} is not {digits} lowercase hex digits"
                )))
            }
        };
        hex("job_id", &grant.job_id, 32)?;
        for input in &grant.inputs {
            hex("dataset_id", &input.dataset_id, 32)?;
            if let Some(digest) = &input.manifest_sha256 {
                hex("manifest_sha256", digest, 64)?;
            }
        }
        Ok(grant)
    }

    /// A new random job id: 32 lowercase hex digits.
    pub fn new_job_id() -> Result<String, GrantError> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| GrantError::Malformed("the system random generator failed".into()))?;
        Ok(hex::encode(bytes))
    }

    /// The granted input with this dataset id (lowercase hex).
    pub fn input(&self, dataset_id: &str) -> Option<&GrantedInput> {
        self.inputs.iter().find(|i| i.dataset_id == dataset_id)
    }

    /// Whether the grant lets a runtime read this version of a dataset: refused when the
    /// grant pins the dataset to another manifest digest (a rolled-back or replaced dataset).
    /// Datasets the grant does not name are the KMS's to refuse.
    pub fn allows_version(
        &self,
        dataset_id: &[u8; 16],
        manifest_sha256: &[u8; 32],
    ) -> Result<(), GrantError> {
        let id = hex::encode(dataset_id);
        match self.input(&id).and_then(|i| i.manifest_sha256.as_deref()) {
            Some(pinned) if pinned != hex::encode(manifest_sha256) => {
                Err(GrantError::NotGranted(format!(
                    "dataset {id} is granted at manifest sha256 {pinned}, and this one is {}",
                    hex::encode(manifest_sha256)
                )))
            }
            _ => Ok(()),
        }
    }

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
        // The shuffle key's job id is the grant's, optionally followed by `-` and more: one
        // application runs as several cluster jobs, each with a shuffle key of its own.
        let ours = job == self.job_id
            || job
                .strip_prefix(self.job_id.as_str())
                .is_some_and(|rest| rest.starts_with('-'));
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

impl From<GrantError> for crate::KmsError {
    fn from(e: GrantError) -> Self {
        match e {
            GrantError::NotGranted(reason) => crate::KmsError::GrantRefused(reason),
            other => crate::KmsError::GrantRefused(other.to_string()),
        }
    }
}

/// Most grants a [`GrantRouter`] keeps; the oldest is forgotten first.
pub const ROUTED_GRANTS: usize = 64;

/// A client of an executor that runs tasks of many jobs: each data-key request goes out under
/// the newest grant offered to it that covers the request (its dataset or its job's shuffle
/// key), or under none. The grants come from task settings, which the scheduler controls:
/// the router trusts none of them, it only picks which one a request carries, and the KMS
/// verifies the owner's signature of the grant it is sent.
pub struct GrantRouter {
    inner: Arc<dyn KeyManagementService>,
    grants: Mutex<VecDeque<RoutedGrant>>,
}

struct RoutedGrant {
    signed: SignedGrant,
    grant: JobGrant,
    client: Arc<dyn KeyManagementService>,
}

impl std::fmt::Debug for GrantRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantRouter")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl GrantRouter {
    /// Routes the requests of `inner`.
    pub fn new(inner: Arc<dyn KeyManagementService>) -> Self {
        GrantRouter {
            inner,
            grants: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds `signed` (or makes it the newest, when it is known) to the grants requests may go
    /// out under.
    pub fn offer(&self, signed: &SignedGrant) -> Result<(), KmsError> {
        let grant = signed.unverified()?;
        let mut grants = self.grants.lock().expect("grant router lock");
        if let Some(at) = grants.iter().position(|g| &g.signed == signed) {
            let known = grants.remove(at).expect("position is in range");
            grants.push_back(known);
            return Ok(());
        }
        let client = self.inner.clone().under_grant(signed)?;
        if grants.len() >= ROUTED_GRANTS {
            grants.pop_front();
        }
        grants.push_back(RoutedGrant {
            signed: signed.clone(),
            grant,
            client,
        });
        Ok(())
    }

    /// The client of the newest grant for which `covers` holds, else the inner client.
    fn route(&self, covers: impl Fn(&JobGrant) -> bool) -> Arc<dyn KeyManagementService> {
        let grants = self.grants.lock().expect("grant router lock");
        grants
            .iter()
            .rev()
            .find(|g| covers(&g.grant))
            .map(|g| g.client.clone())
            .unwrap_or_else(|| self.inner.clone())
    }
}

#[async_trait]
impl KeyManagementService for GrantRouter {
    fn kms_id(&self) -> &str {
        self.inner.kms_id()
    }

    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
        self.inner.create_primary_key().await
    }

    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError> {
        let aad_text = std::str::from_utf8(aad).unwrap_or("");
        self.route(|g| g.allows_generation(&primary.0, aad_text).is_ok())
            .generate_data_key(primary, aad)
            .await
    }

    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        let aad_text = std::str::from_utf8(aad).unwrap_or("");
        self.route(|g| g.allows_release(&key.key_id, aad_text).is_ok())
            .unwrap_data_key(key, aad)
            .await
    }

    async fn unwrap_foreign_key(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
        self.route(|g| g.allows_release(key_id, aad).is_ok())
            .unwrap_foreign_key(key_id, ciphertext, aad)
            .await
    }

    fn under_grant(
        self: Arc<Self>,
        grant: &SignedGrant,
    ) -> Result<Arc<dyn KeyManagementService>, KmsError> {
        self.inner.clone().under_grant(grant)
    }

    fn check_version(
        &self,
        dataset_id: &[u8; 16],
        manifest_sha256: &[u8; 32],
    ) -> Result<(), KmsError> {
        let id = hex::encode(dataset_id);
        self.route(|g| g.input(&id).is_some())
            .check_version(dataset_id, manifest_sha256)
    }

    async fn receipt_attestation(&self) -> Result<Option<crate::ReceiptAttestation>, KmsError> {
        self.inner.receipt_attestation().await
    }

    fn sign_receipt(&self, message: &[u8]) -> Option<Vec<u8>> {
        self.inner.sign_receipt(message)
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
            g.allows_release("K-in", &format!("{shuffle}-stage-2")),
            Ok(())
        );
        assert!(
            g.allows_release("K-in", &format!("{SHUFFLE_AAD_PREFIX}someone-else"))
                .is_err()
        );
        assert!(g.allows_release("K-in", &format!("{shuffle}x")).is_err());
        assert!(g.allows_release("K-in", &format!("{shuffle}/x")).is_err());
        assert!(g.allows_release("K-in", "free text").is_err());
        assert_eq!(g.allows_generation("K-out", &other_dataset), Ok(()));
        assert!(g.allows_generation("K-in", &other_dataset).is_err());
        assert_eq!(g.allows_generation("K-in", &shuffle), Ok(()));
    }

    #[test]
    fn ids_and_digests_must_follow_the_format() {
        let (owner, _) = OwnerKey::generate().unwrap();
        let mut bad_job = grant();
        bad_job.job_id = "../../etc".into();
        let mut bad_dataset = grant();
        bad_dataset.inputs[0].dataset_id = "AA".repeat(16);
        let mut bad_digest = grant();
        bad_digest.inputs[0].manifest_sha256 = Some("ab".into());
        for bad in [bad_job, bad_dataset, bad_digest] {
            let signed = SignedGrant::sign(&bad, &owner).unwrap();
            assert!(
                matches!(signed.unverified(), Err(GrantError::Malformed(_))),
                "{bad:?}"
            );
            assert!(matches!(
                signed.verify(&owner.public_key(), "app", 1_900_000_000),
                Err(GrantError::Malformed(_))
            ));
        }
    }

    /// A KMS whose answers name the grant it acts under.
    #[derive(Debug)]
    struct Tagged(String);

    #[async_trait]
    impl KeyManagementService for Tagged {
        fn kms_id(&self) -> &str {
            "tagged"
        }
        async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
            Err(KmsError::Protocol(self.0.clone()))
        }
        async fn generate_data_key(
            &self,
            _primary: &PrimaryKeyId,
            _aad: &[u8],
        ) -> Result<(DataKey, KeyReference), KmsError> {
            Err(KmsError::Protocol(self.0.clone()))
        }
        async fn unwrap_data_key(
            &self,
            _key: &KeyReference,
            _aad: &[u8],
        ) -> Result<DataKey, KmsError> {
            Err(KmsError::Protocol(self.0.clone()))
        }
        fn under_grant(
            self: Arc<Self>,
            grant: &SignedGrant,
        ) -> Result<Arc<dyn KeyManagementService>, KmsError> {
            Ok(Arc::new(Tagged(grant.unverified()?.job_id)))
        }
    }

    #[tokio::test]
    async fn the_router_sends_each_request_under_the_newest_grant_that_covers_it() {
        let (owner, _) = OwnerKey::generate().unwrap();
        let router = GrantRouter::new(Arc::new(Tagged("none".into())));
        let first = grant();
        let mut second = grant();
        second.job_id = "11".repeat(16);
        second.inputs[0].dataset_id = "bb".repeat(16);
        router
            .offer(&SignedGrant::sign(&first, &owner).unwrap())
            .unwrap();
        router
            .offer(&SignedGrant::sign(&second, &owner).unwrap())
            .unwrap();
        let answer = |result: Result<DataKey, KmsError>| match result {
            Err(KmsError::Protocol(tag)) => tag,
            other => panic!("{other:?}"),
        };
        let key = KeyReference::new("tagged", "K-in", Vec::new());
        let aad = |text: String| text.into_bytes();
        for (aad_text, expected) in [
            (
                format!("{DATASET_AAD_PREFIX}{}", "aa".repeat(16)),
                first.job_id.as_str(),
            ),
            (
                format!("{DATASET_AAD_PREFIX}{}", "bb".repeat(16)),
                second.job_id.as_str(),
            ),
            (
                format!("{SHUFFLE_AAD_PREFIX}{}-7", second.job_id),
                second.job_id.as_str(),
            ),
            (format!("{DATASET_AAD_PREFIX}{}", "cc".repeat(16)), "none"),
        ] {
            let tag = answer(router.unwrap_data_key(&key, &aad(aad_text.clone())).await);
            assert_eq!(tag, expected, "{aad_text}");
        }
        // Offering the first again makes it the newest; a dataset both grants name goes
        // under it.
        second.inputs.push(first.inputs[0].clone());
        router
            .offer(&SignedGrant::sign(&second, &owner).unwrap())
            .unwrap();
        let shared = aad(format!("{DATASET_AAD_PREFIX}{}", "aa".repeat(16)));
        assert_eq!(
            answer(router.unwrap_data_key(&key, &shared).await),
            second.job_id
        );
        router
            .offer(&SignedGrant::sign(&first, &owner).unwrap())
            .unwrap();
        assert_eq!(
            answer(router.unwrap_data_key(&key, &shared).await),
            first.job_id
        );
        // A malformed grant is not taken.
        let malformed = SignedGrant {
            grant: "not base64".into(),
            signature: String::new(),
        };
        assert!(router.offer(&malformed).is_err());
    }
}
