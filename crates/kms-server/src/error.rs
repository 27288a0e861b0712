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
}

impl ApiError {
    /// The eHSM `code` of the response body.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Internal(_) => 500,
            _ => 400,
        }
    }

    /// The eHSM `message` of the response body.
    pub fn message(&self) -> String {
        self.to_string()
    }
}
