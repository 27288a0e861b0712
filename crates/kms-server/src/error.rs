use ppml_kms::protocol::{ErrorAnswer, ErrorKind};

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
    #[error("keyid error")]
    KeyNotFound,
    /// The key is disabled.
    #[error("keyid is disabled")]
    KeyDisabled,
    /// The key releases data keys only to attested runtimes (`ReleaseDataKey`).
    #[error("key is released only to attested runtimes (use ReleaseDataKey)")]
    AttestationRequired,
    /// `ReleaseDataKey` on a key that is not marked for attested release (`Decrypt` serves it).
    #[error("key is not marked for attested release (use Decrypt)")]
    NotMarkedForRelease,
    /// Unknown attestation policy id, or another app's.
    #[error("Invalid  policyId.")]
    PolicyNotFound,
    /// The attestation evidence was refused (verification, binding, challenge or policy).
    #[error("attestation failed: {0}")]
    AttestationFailed(String),
    /// `ReleaseDataKey` with a token past its expiry: the runtime must attest again.
    #[error("attestation token expired (attest again)")]
    TokenExpired,
    /// The signed body names another action, or none where one is needed.
    #[error("the signed request does not name this action")]
    ActionNotSigned,
    /// The action needs the data owner's signature.
    #[error("this action needs the data owner's signature (owner_sign)")]
    OwnerSignatureRequired,
    /// Too many `Enroll` requests in a short time.
    #[error("too many requests, try again later")]
    RateLimited,
    /// The data owner's job grant is missing, not the owner's, or does not allow the request.
    #[error("job grant refused: {0}")]
    GrantRefused(String),
    /// A base64 field does not decode.
    #[error("base64 decode error")]
    Base64,
    /// Wrong key, wrong aad or modified ciphertext.
    #[error("Decryption failed, Please confirm that your parameters are correct.")]
    DecryptFailed,
    /// The body is over the limit.
    #[error("payload too large")]
    TooLarge,
    /// The action is not one of the protocol's.
    #[error("API Not Found")]
    UnknownAction,
    /// A server fault; details are logged, not returned.
    #[error("Server exception.")]
    Internal(String),
    /// The KMS runs in a TEE and has no root key yet.
    #[error("the KMS is sealed: its owner must unseal it (ppml kms unseal)")]
    Sealed,
    /// `Unseal` of a KMS that is not sealed.
    #[error("the KMS is not sealed")]
    NotSealed,
    /// `Unseal` failed: why, for the owner who sent the root key.
    #[error("unseal failed: {0}")]
    UnsealFailed(String),
    /// [`Store::open`](crate::Store::open): the store was created under another root key.
    #[error("the root key does not match this store (wrong root key file, env var or passphrase)")]
    RootKeyMismatch,
}

impl From<ppml_kms::grant::GrantError> for ApiError {
    fn from(e: ppml_kms::grant::GrantError) -> Self {
        match e {
            ppml_kms::grant::GrantError::NotGranted(reason) => ApiError::GrantRefused(reason),
            other => ApiError::GrantRefused(other.to_string()),
        }
    }
}

impl ApiError {
    /// The error of the shared wire contract this one is answered as.
    pub fn wire_kind(&self) -> ErrorKind {
        match self {
            ApiError::Request(e) => ErrorKind::from(e),
            ApiError::PayloadType => ErrorKind::PayloadType,
            ApiError::KeyNotFound => ErrorKind::KeyNotFound,
            ApiError::KeyDisabled => ErrorKind::KeyDisabled,
            ApiError::AttestationRequired => ErrorKind::AttestationRequired,
            ApiError::NotMarkedForRelease => ErrorKind::NotMarkedForRelease,
            ApiError::PolicyNotFound => ErrorKind::PolicyNotFound,
            ApiError::AttestationFailed(_) => ErrorKind::AttestationFailed,
            ApiError::TokenExpired => ErrorKind::TokenExpired,
            ApiError::ActionNotSigned => ErrorKind::ActionNotSigned,
            ApiError::OwnerSignatureRequired => ErrorKind::OwnerSignatureRequired,
            ApiError::RateLimited => ErrorKind::RateLimited,
            ApiError::GrantRefused(_) => ErrorKind::GrantRefused,
            ApiError::Base64 => ErrorKind::Base64,
            ApiError::DecryptFailed => ErrorKind::DecryptFailed,
            ApiError::TooLarge => ErrorKind::TooLarge,
            ApiError::UnknownAction => ErrorKind::UnknownAction,
            ApiError::Sealed => ErrorKind::Sealed,
            ApiError::NotSealed => ErrorKind::NotSealed,
            ApiError::UnsealFailed(_) => ErrorKind::UnsealFailed,
            // Never tell a client about the server's keys.
            ApiError::Internal(_) | ApiError::RootKeyMismatch => ErrorKind::Internal,
        }
    }

    /// The answer sent to the client (no server detail except the reason of an attestation,
    /// grant or unseal refusal).
    pub fn answer(&self) -> ErrorAnswer {
        ErrorAnswer {
            kind: self.wire_kind(),
            detail: match self {
                ApiError::AttestationFailed(reason)
                | ApiError::GrantRefused(reason)
                | ApiError::UnsealFailed(reason) => Some(reason.clone()),
                _ => None,
            },
        }
    }

    /// The eHSM `code` of the response body.
    pub fn code(&self) -> u16 {
        self.wire_kind().code()
    }

    /// The eHSM `message` of the response body.
    pub fn message(&self) -> String {
        self.answer().message()
    }

    /// A short, fixed name of the error (the `outcome` label of the request metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::RootKeyMismatch => "root_key_mismatch",
            other => other.wire_kind().label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error's own text is the message the shared contract gives its kind.
    #[test]
    fn messages_follow_the_wire_contract() {
        use ppml_kms::ehsm::RequestError as R;
        for error in [
            ApiError::Request(R::MissingParameters),
            ApiError::Request(R::ParamType),
            ApiError::Request(R::TimestampLength),
            ApiError::Request(R::Timestamp),
            ApiError::Request(R::Replay),
            ApiError::Request(R::Sign),
            ApiError::PayloadType,
            ApiError::KeyNotFound,
            ApiError::KeyDisabled,
            ApiError::AttestationRequired,
            ApiError::NotMarkedForRelease,
            ApiError::PolicyNotFound,
            ApiError::AttestationFailed("debug enclave".into()),
            ApiError::TokenExpired,
            ApiError::ActionNotSigned,
            ApiError::OwnerSignatureRequired,
            ApiError::RateLimited,
            ApiError::GrantRefused("dataset 00 is not an input of job 11".into()),
            ApiError::Base64,
            ApiError::DecryptFailed,
            ApiError::TooLarge,
            ApiError::UnknownAction,
            ApiError::Sealed,
            ApiError::NotSealed,
            ApiError::UnsealFailed("the root key does not open this KMS's store".into()),
            ApiError::Internal("disk".into()),
        ] {
            assert_eq!(error.to_string(), error.message(), "{error:?}");
            assert_eq!(
                ErrorAnswer::from_json(&error.answer().to_json()),
                Some(error.answer())
            );
        }
        assert_eq!(
            ApiError::RootKeyMismatch.message(),
            ErrorKind::Internal.message()
        );
    }
}
