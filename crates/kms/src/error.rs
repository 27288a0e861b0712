use std::path::PathBuf;

/// Why a KMS request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The app id is unknown or the api key does not match it.
    #[error("the KMS rejected the app credentials (unknown app id or wrong api key)")]
    Unauthorized,
    /// No primary key with this id is visible to the calling app.
    #[error("primary key {0:?} not found for this app")]
    KeyNotFound(String),
    /// The primary key exists but is disabled.
    #[error("primary key {0:?} is disabled")]
    KeyDisabled(String),
    /// The wrapped data key was not produced by this primary key (or with this binding), or
    /// it was modified.
    #[error(
        "the data key could not be unwrapped: wrong primary key, wrong dataset, or a modified wrapped key"
    )]
    UnwrapFailed,
    /// The data refers to a different KMS than the one configured.
    #[error("the data was encrypted with KMS {found:?}, but this KMS is {expected:?}")]
    WrongKms {
        /// This KMS's id.
        expected: String,
        /// The id found in the data.
        found: String,
    },
    /// The KMS directory does not exist or was never initialised.
    #[error("no KMS at {0}: run `ppml kms init` or use the default $PPML_HOME")]
    NotInitialized(PathBuf),
    /// Reading or writing the KMS files failed.
    #[error("KMS storage error at {path}: {source}")]
    Storage {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The KMS files exist but do not parse or fail their integrity checks.
    #[error("KMS store is corrupt: {0}")]
    CorruptStore(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The KMS client is configured wrongly (URL, TLS trust, aad).
    #[error("KMS configuration: {0}")]
    InvalidConfig(String),
    /// The KMS server could not be reached, or the connection failed (includes TLS
    /// certificate rejections).
    #[error("cannot reach the KMS at {url}: {detail}")]
    Transport {
        /// The endpoint.
        url: String,
        /// The error chain.
        detail: String,
    },
    /// The KMS server rejected the request for a reason not covered above.
    #[error("the KMS rejected the request: {message} (code {code})")]
    Rejected {
        /// eHSM response code.
        code: u16,
        /// eHSM response message.
        message: String,
    },
    /// The key is released only to attested runtimes, and this process did not attest.
    #[error(
        "the key is released only to attested runtimes: run with --tee and --attestation-policy"
    )]
    AttestationRequired,
    /// The attestation token expired before the request: attest again.
    #[error("the attestation token has expired")]
    TokenExpired,
    /// `ReleaseDataKey` was asked for a key that is not marked for attested release.
    #[error(
        "the data is under a key that is not marked for attested release, so an attested runtime does not read it (the owner marks keys with `ppml kms release-policy`)"
    )]
    NotMarkedForRelease,
    /// The action needs the data owner's signature (an owner key the app was enrolled with),
    /// and the request had none or a wrong one.
    #[error(
        "the KMS refused the request: it needs the data owner's key (--owner-key), which this machine does not hold or which is not the app's"
    )]
    OwnerSignatureRequired,
    /// The data owner's job grant does not allow the request (or none was given where one is
    /// needed); the reason says which rule.
    #[error("the data owner's job grant does not allow this: {0}")]
    GrantRefused(String),
    /// Attestation failed: evidence could not be collected, or the KMS refused it.
    #[error("attestation failed: {0}")]
    Attestation(String),
    /// The client's policy for the KMS refuses it: its quote is missing, does not verify, is
    /// not bound to this challenge and TLS connection, or shows a runtime the policy does not
    /// allow. Nothing secret was sent to it.
    #[error("the KMS is not trusted: {0}")]
    UntrustedKms(String),
    /// The KMS runs in a TEE and has no root key yet (`docs/attestation.md` §9).
    #[error("the KMS is sealed: its owner must unseal it with `ppml kms unseal`")]
    Sealed,
    /// Unsealing the KMS failed; nothing changed at the KMS.
    #[error("unsealing the KMS failed: {0}")]
    UnsealFailed(String),
    /// The KMS server's answer does not follow the protocol.
    #[error("the KMS answered outside the protocol: {0}")]
    Protocol(String),
}

impl KmsError {
    /// A storage error of `path`.
    pub fn storage(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KmsError::Storage {
            path: path.into(),
            source,
        }
    }

    /// True when the error means the caller may not have the key (credentials, key ownership,
    /// wrong key material), as opposed to the KMS failing.
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self,
            KmsError::Unauthorized
                | KmsError::KeyNotFound(_)
                | KmsError::KeyDisabled(_)
                | KmsError::UnwrapFailed
                | KmsError::WrongKms { .. }
                | KmsError::AttestationRequired
                | KmsError::OwnerSignatureRequired
                | KmsError::NotMarkedForRelease
                | KmsError::GrantRefused(_)
                | KmsError::Attestation(_)
                | KmsError::UntrustedKms(_)
                | KmsError::UnsealFailed(_)
        )
    }
}
