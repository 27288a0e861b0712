//! Key management for ppml.
//!
//! [`KeyManagementService`] is the one interface the rest of ppml uses to get keys: create a
//! primary key, generate a data key (returned in plaintext and wrapped under the primary key),
//! and unwrap a wrapped data key. Implementations decide where primary keys live and who may
//! use them; primary keys never leave the KMS.
//!
//! [`LocalKms`] is the embedded implementation: a directory holding a root key file (mode
//! 0600) and a store in which every primary key is sealed under the root key. It needs no
//! server and checks the app id and api key like a remote KMS would.
//!
//! [`protocol`] and [`ehsm`] are the wire contract of the eHSM-compatible KMS protocol, shared
//! by the KMS server (`ppml-kms-server`) and its client (`ppml-kms-client`, which implements the
//! same trait over the network).

pub mod ehsm;
mod error;
mod fs;
pub mod grant;
mod local;
pub mod owner;
pub mod protocol;
pub mod sealing;

use async_trait::async_trait;
pub use error::KmsError;
pub use fs::write_private_file_atomic;
pub use local::LocalKms;
pub use ppml_format::{DATA_KEY_LEN, DataKey, KeyReference};
use zeroize::Zeroizing;

/// Identifier of a primary key inside one KMS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PrimaryKeyId(pub String);

impl std::fmt::Display for PrimaryKeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An application's credentials: the app id and its api key (a secret, never printed).
#[derive(Clone)]
pub struct AppCredentials {
    /// Public identifier of the application.
    pub appid: String,
    /// The application's secret api key.
    pub apikey: Zeroizing<String>,
}

impl AppCredentials {
    /// Builds credentials from their two parts.
    pub fn new(appid: impl Into<String>, apikey: impl Into<String>) -> Self {
        AppCredentials {
            appid: appid.into(),
            apikey: Zeroizing::new(apikey.into()),
        }
    }
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("appid", &self.appid)
            .field("apikey", &"<redacted>")
            .finish()
    }
}

/// How an attested runtime stands behind the job receipts it signs (`docs/receipts.md`): the
/// attestation token the KMS issued to it, which vouches for the receipt key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptAttestation {
    /// The current attestation token (a JWT signed by the KMS's attestation key), whose
    /// `receipt_key` claim is [`ReceiptAttestation::public_key`].
    pub token: String,
    /// The receipt signing key (Ed25519), made in the runtime and never out of it.
    pub public_key: [u8; 32],
}

/// The data owner's job grant a client acts under, as a job receipt names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// The grant's job id.
    pub job_id: String,
    /// SHA-256 of the grant's bytes, lowercase hex (as the KMS's audit entries name it).
    pub sha256_hex: String,
    /// Whether the owner lets row counts leave the runtime.
    pub reveal_counts: bool,
}

impl GrantRecord {
    /// The record of `grant`, whose signed bytes have the SHA-256 `sha256_hex`
    /// ([`grant::SignedGrant::sha256_hex`]).
    pub fn new(grant: &grant::JobGrant, sha256_hex: String) -> Self {
        GrantRecord {
            job_id: grant.job_id.clone(),
            sha256_hex,
            reveal_counts: grant.reveal_counts,
        }
    }
}

/// A key management service, as seen by one authenticated application.
///
/// `aad` binds a wrapped data key to its use: unwrapping succeeds only with the same `aad`
/// that was given when the key was generated (ppml passes the dataset id).
#[async_trait]
pub trait KeyManagementService: Send + Sync + std::fmt::Debug {
    /// Stable identifier of this KMS, written into file headers (e.g. `local:3f9a…`).
    fn kms_id(&self) -> &str;

    /// Creates a new primary key owned by the calling application.
    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError>;

    /// Generates a fresh data key under `primary`: the plaintext key and its wrapped form.
    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError>;

    /// Unwraps a data key that this KMS wrapped, if the caller may use its primary key.
    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError>;

    /// Unwraps a key that another eHSM client wrapped (BigDL, migrating its datasets): eHSM
    /// `Decrypt` of `ciphertext` under `key_id` with `aad` sent exactly as that client sent it
    /// (BigDL sends `"test"`). Returns the plaintext bytes. The same release rules apply as to
    /// [`unwrap_data_key`](Self::unwrap_data_key); a KMS that holds no other clients' keys (the
    /// embedded one) refuses with [`KmsError::InvalidConfig`].
    async fn unwrap_foreign_key(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let _ = (key_id, ciphertext, aad);
        Err(KmsError::InvalidConfig(format!(
            "KMS {} holds no keys of other eHSM clients; use their KMS server (--kms-url)",
            self.kms_id()
        )))
    }

    /// This client acting under the data owner's job grant ([`grant`]): its data-key requests
    /// carry the grant, and its [`check_version`](Self::check_version) follows the grant's
    /// pins. A KMS server releases the data keys of keys marked for attested release only
    /// under a grant that names their use. Clients of services without grants (the embedded
    /// KMS, which has one user) return themselves.
    fn under_grant(
        self: std::sync::Arc<Self>,
        grant: &grant::SignedGrant,
    ) -> Result<std::sync::Arc<dyn KeyManagementService>, KmsError>;

    /// Whether a dataset's version (its manifest digest) may be read: a client under a grant
    /// that pins the dataset to another version refuses it ([`KmsError::GrantRefused`]).
    /// Called by readers after they verified a manifest.
    fn check_version(
        &self,
        dataset_id: &[u8; 16],
        manifest_sha256: &[u8; 32],
    ) -> Result<(), KmsError> {
        let _ = (dataset_id, manifest_sha256);
        Ok(())
    }

    /// The attestation this client signs job receipts under, renewed first if it is due;
    /// `None` for a client that is not an attested runtime (its receipts are unsigned).
    async fn receipt_attestation(&self) -> Result<Option<ReceiptAttestation>, KmsError> {
        Ok(None)
    }

    /// Signs `message` with the receipt key of
    /// [`receipt_attestation`](Self::receipt_attestation) (Ed25519, 64 bytes); `None` when
    /// there is none.
    fn sign_receipt(&self, message: &[u8]) -> Option<Vec<u8>> {
        let _ = message;
        None
    }

    /// The job grant this client acts under, if exactly one.
    fn job_grant(&self) -> Option<GrantRecord> {
        None
    }
}

/// Formats a certificate fingerprint as `ppml kms serve` prints it and clients pin it:
/// `sha256:` and the SHA-256 of the certificate's DER encoding in lowercase hex.
pub fn format_fingerprint(cert_der: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, cert_der))
    )
}

/// An error and its sources on one line (`error: cause: cause…`), skipping causes whose text
/// is already included: the reason behind a generic "transport error" then shows.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
