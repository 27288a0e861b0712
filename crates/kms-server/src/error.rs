/// Every way a request can fail, with its eHSM code and message in one place
/// ([`ApiError::code`], [`ApiError::message`]); `docs/kms-api.md` §6 lists the same table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// A request-envelope check failed (signature, timestamp, replay, missing fields).
    #[error(transparent)]
    Request(#[from] ppml_kms::ehsm::RequestError),
    /// A payload field has the wrong type or range.
    #[error("param type error")]
    PayloadType,
    /// Unknown key id, or another app's key.
    #[error("keyid not found")]
    KeyNotFound,
    /// The key is disabled.
    #[error("key is disabled")]
    KeyDisabled,
    /// The key releases data keys only to attested runtimes (`ReleaseDataKey`).
    #[error("key is released only to attested runtimes (use ReleaseDataKey)")]
    AttestationRequired,
    /// `ReleaseDataKey` on a key that is not marked for attested release (`Decrypt` serves it).
    #[error("key is not marked for attested release (use Decrypt)")]
    NotMarkedForRelease,
    /// Unknown attestation policy id, or another app's.
    #[error("policyId not found")]
    PolicyNotFound,
    /// The attestation evidence was refused (verification, binding, challenge or policy).
    #[error("attestation failed: {0}")]
    AttestationFailed(String),
    /// `ReleaseDataKey` with a token past its expiry: the runtime must attest again.
    #[error("attestation token expired (attest again)")]
    TokenExpired,
    /// A base64 field does not decode.
    #[error("base64 decode error")]
    Base64,
    /// Wrong key, wrong aad or modified ciphertext.
    #[error("decrypt failed")]
    DecryptFailed,
    /// The body is over the limit.
    #[error("payload too large")]
    TooLarge,
    /// The action is not one of the protocol's.
    #[error("unknown action")]
    UnknownAction,
    /// A server fault; details are logged, not returned.
    #[error("Server internal error, please contact the administrator.")]
    Internal(String),
    /// [`Store::open`](crate::Store::open): the store was created under another root key.
    #[error("the root key does not match this store (wrong root key file, env var or passphrase)")]
    RootKeyMismatch,
}

impl ApiError {
    /// The eHSM `code` of the response body.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Internal(_) | ApiError::RootKeyMismatch => 500,
            _ => 400,
        }
    }

    /// The eHSM `message` of the response body.
    pub fn message(&self) -> String {
        match self {
            // Never tell a client about the server's keys.
            ApiError::RootKeyMismatch => ApiError::Internal(String::new()).to_string(),
            _ => self.to_string(),
        }
    }

    /// A short, fixed name of the error (the `outcome` label of the request metrics).
    pub fn kind(&self) -> &'static str {
        use ppml_kms::ehsm::RequestError as R;
        match self {
            ApiError::Request(R::MissingParameters) => "missing_parameters",
            ApiError::Request(R::ParamType) => "param_type",
            ApiError::Request(R::TimestampLength) => "timestamp_length",
            ApiError::Request(R::Timestamp) => "timestamp",
            ApiError::Request(R::Replay) => "replay",
            ApiError::Request(R::Sign) => "sign",
            ApiError::Request(_) => "request",
            ApiError::PayloadType => "payload_type",
            ApiError::KeyNotFound => "key_not_found",
            ApiError::KeyDisabled => "key_disabled",
            ApiError::PolicyNotFound => "policy_not_found",
            ApiError::AttestationRequired => "attestation_required",
            ApiError::NotMarkedForRelease => "not_marked_for_release",
            ApiError::AttestationFailed(_) => "attestation_failed",
            ApiError::TokenExpired => "token_expired",
            ApiError::Base64 => "base64",
            ApiError::DecryptFailed => "decrypt_failed",
            ApiError::TooLarge => "too_large",
            ApiError::UnknownAction => "unknown_action",
            ApiError::Internal(_) => "internal",
            ApiError::RootKeyMismatch => "root_key_mismatch",
        }
    }
}
