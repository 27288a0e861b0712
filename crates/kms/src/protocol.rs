//! The wire contract of the eHSM-compatible KMS protocol (`docs/kms-api.md` §5 and §6), defined
//! once for both ends: the KMS server answers with these values and the client reads them.
//!
//! An error answer is `{"code", "message", "result": {}, "kind"}`. `code` and `message` are
//! eHSM's; `kind` (a ppml extension that eHSM clients ignore) names the error with a stable
//! label, so that ppml's client classifies errors by [`ErrorKind`] and never by their text.
//! A server that sends no `kind` (eHSM itself) is read through [`ErrorKind::from_message`],
//! which compares the whole message with this table.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::KmsError;
use crate::ehsm::RequestError;

/// The last durable entry of a KMS's audit log: its `seq` (0 for an empty log) and the
/// lowercase hex SHA-256 of its line (64 zeros for an empty log). `Unseal` carries the head
/// the owner last saw to the KMS, which refuses a store whose log does not hold it, and
/// answers with its head after the unseal (`docs/attestation.md` §9.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// The entry's `seq`.
    pub seq: u64,
    /// Lowercase hex SHA-256 of the entry's line (without its newline).
    pub hash: String,
}

/// Every action of the protocol (`docs/kms-api.md` §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// `GET`, unsigned: registers an application.
    Enroll,
    /// `GET`, unsigned: the server's version and KMS id.
    GetVersion,
    /// `GET`, unsigned: a quote of the KMS's own TEE over a client's challenge and its TLS
    /// certificate, for clients that verify the KMS before trusting it.
    GenerateQuote,
    /// ppml, `POST`, unsigned: the owner's root key, sealed to the unseal key that a sealed
    /// KMS's quote binds (`docs/attestation.md` §9).
    Unseal,
    /// Creates a primary key.
    CreateKey,
    /// A data key in plaintext and wrapped.
    GenerateDataKey,
    /// A data key, wrapped only.
    GenerateDataKeyWithoutPlaintext,
    /// Encrypts a short plaintext under a primary key.
    Encrypt,
    /// Unwraps a ciphertext (refused for keys marked for attested release).
    Decrypt,
    /// The app's primary keys.
    ListKey,
    /// Deletes a primary key.
    DeleteKey,
    /// Enables a primary key.
    EnableKey,
    /// Disables a primary key.
    DisableKey,
    /// ppml: adds a version to a primary key.
    RotateKey,
    /// ppml: rewraps a ciphertext under the newest key version.
    ReEncrypt,
    /// Stores an attestation policy.
    UploadQuotePolicy,
    /// Reads a stored attestation policy.
    GetQuotePolicy,
    /// Verifies a quote against a policy.
    VerifyQuote,
    /// ppml: a fresh attestation challenge.
    AttestChallenge,
    /// ppml: evidence in, attestation token out.
    Attest,
    /// ppml: marks a key for attested release under a policy.
    SetKeyReleasePolicy,
    /// ppml: unwraps a data key for an attested runtime, sealed to its runtime key.
    ReleaseDataKey,
    /// ppml: a new data key for an attested runtime, wrapped and sealed to its runtime key.
    GenerateSealedDataKey,
}

/// Whether an action needs the data owner's signature (`docs/kms-api.md` §4.1), in an app
/// enrolled with an owner key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerAuthority {
    /// Never: the api key suffices.
    NotNeeded,
    /// Only an owner may: an app without an owner key cannot do it at all (marking a key for
    /// attested release, which would protect nothing if the api key could undo it).
    OwnerOnly,
    /// In apps with an owner key: the action changes a key's state or removes it. Apps
    /// enrolled without one keep eHSM's rules.
    Required,
    /// When the key is marked for attested release: the action would hand a plaintext data
    /// key of that key to the caller.
    ForMarkedKeys,
}

impl Action {
    /// Every action, in the order of `docs/kms-api.md` §5.
    pub const ALL: [Action; 23] = [
        Action::Enroll,
        Action::GetVersion,
        Action::GenerateQuote,
        Action::Unseal,
        Action::CreateKey,
        Action::GenerateDataKey,
        Action::GenerateDataKeyWithoutPlaintext,
        Action::Encrypt,
        Action::Decrypt,
        Action::ListKey,
        Action::DeleteKey,
        Action::EnableKey,
        Action::DisableKey,
        Action::RotateKey,
        Action::ReEncrypt,
        Action::UploadQuotePolicy,
        Action::GetQuotePolicy,
        Action::VerifyQuote,
        Action::AttestChallenge,
        Action::Attest,
        Action::SetKeyReleasePolicy,
        Action::ReleaseDataKey,
        Action::GenerateSealedDataKey,
    ];

    /// The name in `?Action=`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Enroll => "Enroll",
            Action::GetVersion => "GetVersion",
            Action::GenerateQuote => "GenerateQuote",
            Action::Unseal => "Unseal",
            Action::CreateKey => "CreateKey",
            Action::GenerateDataKey => "GenerateDataKey",
            Action::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            Action::Encrypt => "Encrypt",
            Action::Decrypt => "Decrypt",
            Action::ListKey => "ListKey",
            Action::DeleteKey => "DeleteKey",
            Action::EnableKey => "EnableKey",
            Action::DisableKey => "DisableKey",
            Action::RotateKey => "RotateKey",
            Action::ReEncrypt => "ReEncrypt",
            Action::UploadQuotePolicy => "UploadQuotePolicy",
            Action::GetQuotePolicy => "GetQuotePolicy",
            Action::VerifyQuote => "VerifyQuote",
            Action::AttestChallenge => "AttestChallenge",
            Action::Attest => "Attest",
            Action::SetKeyReleasePolicy => "SetKeyReleasePolicy",
            Action::ReleaseDataKey => "ReleaseDataKey",
            Action::GenerateSealedDataKey => "GenerateSealedDataKey",
        }
    }

    /// The action called `name`, if it is one of the protocol's.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// False for the unsigned actions (the `GET` ones and `Unseal`, whose sealed root key
    /// is its own proof), true for every signed `POST` one.
    pub fn is_signed(self) -> bool {
        !matches!(
            self,
            Action::Enroll | Action::GetVersion | Action::GenerateQuote | Action::Unseal
        )
    }

    /// The `message` of a successful answer, eHSM's for its actions: `success!` for the
    /// enclave's actions, its own texts for the quote policies, `successful` for the rest
    /// (and every ppml extension).
    pub fn success_message(self) -> &'static str {
        match self {
            Action::CreateKey
            | Action::Encrypt
            | Action::Decrypt
            | Action::GenerateDataKey
            | Action::GenerateDataKeyWithoutPlaintext
            | Action::GetVersion
            | Action::VerifyQuote
            | Action::GenerateQuote => "success!",
            Action::UploadQuotePolicy => "Upload quote policy success.",
            Action::GetQuotePolicy => "Query quote policy success.",
            _ => "successful",
        }
    }

    /// Whether the signed envelope must carry a `payload` (`docs/kms-api.md` §4 rule 1: the
    /// cryptographic actions and the attestation actions that name a policy or a key).
    pub fn needs_payload(self) -> bool {
        matches!(
            self,
            Action::VerifyQuote
                | Action::SetKeyReleasePolicy
                | Action::ReleaseDataKey
                | Action::UploadQuotePolicy
                | Action::GetQuotePolicy
                | Action::Attest
                | Action::CreateKey
                | Action::GenerateDataKey
                | Action::GenerateDataKeyWithoutPlaintext
                | Action::Encrypt
                | Action::Decrypt
                | Action::RotateKey
                | Action::ReEncrypt
                | Action::DeleteKey
                | Action::EnableKey
                | Action::DisableKey
                | Action::GenerateSealedDataKey
        )
    }

    /// Whether the signed body must name this action in its `action` field (`docs/kms-api.md`
    /// §4 rule 7). eHSM's clients do not send it, so eHSM's own actions that create or read
    /// accept a body without it; every action that changes or removes an existing key, and
    /// every ppml extension, does not.
    pub fn needs_signed_action(self) -> bool {
        !matches!(
            self,
            Action::Enroll
                | Action::GetVersion
                | Action::GenerateQuote
                | Action::Unseal
                | Action::CreateKey
                | Action::GenerateDataKey
                | Action::GenerateDataKeyWithoutPlaintext
                | Action::Encrypt
                | Action::Decrypt
                | Action::ListKey
                | Action::UploadQuotePolicy
                | Action::GetQuotePolicy
                | Action::VerifyQuote
        )
    }

    /// Whether the action needs the owner's signature in an app with an owner key.
    pub fn owner_authority(self) -> OwnerAuthority {
        match self {
            Action::SetKeyReleasePolicy => OwnerAuthority::OwnerOnly,
            Action::DeleteKey | Action::EnableKey | Action::DisableKey | Action::RotateKey => {
                OwnerAuthority::Required
            }
            Action::GenerateDataKey | Action::Encrypt => OwnerAuthority::ForMarkedKeys,
            _ => OwnerAuthority::NotNeeded,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every error answer of the protocol (`docs/kms-api.md` §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `appid`, `timestamp` or `sign` (or a needed `payload`) is missing.
    MissingParameters,
    /// An envelope field has the wrong JSON type.
    ParamType,
    /// The timestamp is not 13 characters.
    TimestampLength,
    /// The timestamp is not a number or is outside the ±10 minute window.
    Timestamp,
    /// The (timestamp, nonce) was already used by this app within 20 minutes.
    Replay,
    /// The signature does not match (unknown app id or wrong api key).
    Sign,
    /// A payload field has the wrong type or range.
    PayloadType,
    /// Unknown key id, or another app's key.
    KeyNotFound,
    /// The key is disabled.
    KeyDisabled,
    /// A base64 field does not decode.
    Base64,
    /// Wrong key, wrong aad or modified ciphertext.
    DecryptFailed,
    /// The body is over the limit.
    TooLarge,
    /// The action is not one of the protocol's.
    UnknownAction,
    /// `Decrypt` of a key released only to attested runtimes (`ReleaseDataKey` serves it).
    AttestationRequired,
    /// `ReleaseDataKey` of a key that is not marked for attested release.
    NotMarkedForRelease,
    /// Unknown attestation policy id, or another app's.
    PolicyNotFound,
    /// The attestation evidence or token was refused; the message carries the reason.
    AttestationFailed,
    /// `ReleaseDataKey` with a token past its expiry.
    TokenExpired,
    /// The signed body names another action than the one asked, or none where one is needed.
    ActionNotSigned,
    /// The action needs the data owner's signature, and the request has no valid one (or the
    /// app has no owner key).
    OwnerSignatureRequired,
    /// Too many requests of this kind (`Enroll`) in a short time: try again later.
    RateLimited,
    /// A data-key request of a key marked for attested release, in an app with an owner key,
    /// without a job grant of the owner's that allows it; the message carries the reason.
    GrantRefused,
    /// The KMS runs in a TEE and has no root key yet: its owner must unseal it.
    Sealed,
    /// `Unseal` of a KMS that is not sealed.
    NotSealed,
    /// `Unseal` failed; the message carries the reason (the sealed root key does not open
    /// with this KMS's unseal key, or the root key does not open the KMS's store).
    UnsealFailed,
    /// A server fault; the request was not applied.
    Internal,
}

/// Message prefix of [`ErrorKind::AttestationFailed`]; the reason follows.
const ATTESTATION_FAILED: &str = "attestation failed";
/// Message prefix of [`ErrorKind::GrantRefused`]; the reason follows.
const GRANT_REFUSED: &str = "job grant refused";
/// Message prefix of [`ErrorKind::UnsealFailed`]; the reason follows.
const UNSEAL_FAILED: &str = "unseal failed";

impl ErrorKind {
    /// Every error kind, in the order of `docs/kms-api.md` §6.
    pub const ALL: [ErrorKind; 26] = [
        ErrorKind::MissingParameters,
        ErrorKind::ParamType,
        ErrorKind::TimestampLength,
        ErrorKind::Timestamp,
        ErrorKind::Replay,
        ErrorKind::Sign,
        ErrorKind::PayloadType,
        ErrorKind::KeyNotFound,
        ErrorKind::KeyDisabled,
        ErrorKind::Base64,
        ErrorKind::DecryptFailed,
        ErrorKind::TooLarge,
        ErrorKind::UnknownAction,
        ErrorKind::AttestationRequired,
        ErrorKind::NotMarkedForRelease,
        ErrorKind::PolicyNotFound,
        ErrorKind::AttestationFailed,
        ErrorKind::TokenExpired,
        ErrorKind::ActionNotSigned,
        ErrorKind::OwnerSignatureRequired,
        ErrorKind::RateLimited,
        ErrorKind::GrantRefused,
        ErrorKind::Sealed,
        ErrorKind::NotSealed,
        ErrorKind::UnsealFailed,
        ErrorKind::Internal,
    ];

    /// The eHSM `code`: 500 for server faults, 404 for an unknown action, 400 for everything
    /// else the client caused.
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::Internal => 500,
            ErrorKind::UnknownAction => 404,
            _ => 400,
        }
    }

    /// The eHSM `message` (for [`ErrorKind::AttestationFailed`], the part before the reason).
    pub fn message(self) -> &'static str {
        match self {
            ErrorKind::MissingParameters => "Missing required parameters",
            ErrorKind::ParamType | ErrorKind::PayloadType => "param type error",
            ErrorKind::TimestampLength => "Timestamp length error",
            ErrorKind::Timestamp => "Timestamp error",
            ErrorKind::Replay => "Timestamp can't be repeated in 20 minutes",
            ErrorKind::Sign => "sign error",
            ErrorKind::KeyNotFound => "keyid error",
            ErrorKind::KeyDisabled => "keyid is disabled",
            ErrorKind::Base64 => "base64 decode error",
            ErrorKind::DecryptFailed => {
                "Decryption failed, Please confirm that your parameters are correct."
            }
            ErrorKind::TooLarge => "payload too large",
            ErrorKind::UnknownAction => "API Not Found",
            ErrorKind::AttestationRequired => {
                "key is released only to attested runtimes (use ReleaseDataKey)"
            }
            ErrorKind::NotMarkedForRelease => {
                "key is not marked for attested release (use Decrypt)"
            }
            ErrorKind::PolicyNotFound => "Invalid  policyId.",
            ErrorKind::AttestationFailed => ATTESTATION_FAILED,
            ErrorKind::TokenExpired => "attestation token expired (attest again)",
            ErrorKind::ActionNotSigned => "the signed request does not name this action",
            ErrorKind::OwnerSignatureRequired => {
                "this action needs the data owner's signature (owner_sign)"
            }
            ErrorKind::RateLimited => "too many requests, try again later",
            ErrorKind::GrantRefused => GRANT_REFUSED,
            ErrorKind::Sealed => "the KMS is sealed: its owner must unseal it (ppml kms unseal)",
            ErrorKind::NotSealed => "the KMS is not sealed",
            ErrorKind::UnsealFailed => UNSEAL_FAILED,
            ErrorKind::Internal => "Server exception.",
        }
    }

    /// The stable label in the answer's `kind` field and the `outcome` of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::MissingParameters => "missing_parameters",
            ErrorKind::ParamType => "param_type",
            ErrorKind::TimestampLength => "timestamp_length",
            ErrorKind::Timestamp => "timestamp",
            ErrorKind::Replay => "replay",
            ErrorKind::Sign => "sign",
            ErrorKind::PayloadType => "payload_type",
            ErrorKind::KeyNotFound => "key_not_found",
            ErrorKind::KeyDisabled => "key_disabled",
            ErrorKind::Base64 => "base64",
            ErrorKind::DecryptFailed => "decrypt_failed",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::UnknownAction => "unknown_action",
            ErrorKind::AttestationRequired => "attestation_required",
            ErrorKind::NotMarkedForRelease => "not_marked_for_release",
            ErrorKind::PolicyNotFound => "policy_not_found",
            ErrorKind::AttestationFailed => "attestation_failed",
            ErrorKind::TokenExpired => "token_expired",
            ErrorKind::ActionNotSigned => "action_not_signed",
            ErrorKind::OwnerSignatureRequired => "owner_signature_required",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::GrantRefused => "grant_refused",
            ErrorKind::Sealed => "sealed",
            ErrorKind::NotSealed => "not_sealed",
            ErrorKind::UnsealFailed => "unseal_failed",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind labelled `label`.
    pub fn from_label(label: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.label() == label)
    }

    /// The kind of an eHSM answer without a `kind` field, from its whole message (an
    /// attestation failure also by its prefix). `param type error` reads as
    /// [`ErrorKind::ParamType`]: eHSM does not tell envelope and payload apart.
    pub fn from_message(message: &str) -> Option<ErrorKind> {
        for kind in [
            ErrorKind::AttestationFailed,
            ErrorKind::GrantRefused,
            ErrorKind::UnsealFailed,
        ] {
            if message
                .strip_prefix(kind.message())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(": "))
            {
                return Some(kind);
            }
        }
        if let Some(kind) = ErrorKind::ALL.into_iter().find(|k| k.message() == message) {
            return Some(kind);
        }
        // eHSM-KMS's own texts (0.3 and 1.x), so that a real eHSM's refusals keep their
        // meaning (and ppml's exit codes theirs).
        const EHSM_MESSAGES: [(&str, ErrorKind); 2] = [
            ("appid error", ErrorKind::Sign),
            ("Invalid JSON", ErrorKind::ParamType),
        ];
        const EHSM_PREFIXES: [(&str, ErrorKind); 3] = [
            ("Missing required parameters", ErrorKind::MissingParameters),
            ("Parameter invalid", ErrorKind::PayloadType),
            ("Decryption failed", ErrorKind::DecryptFailed),
        ];
        EHSM_MESSAGES
            .into_iter()
            .find(|(text, _)| *text == message)
            .or_else(|| {
                EHSM_PREFIXES
                    .into_iter()
                    .find(|(prefix, _)| message.starts_with(prefix))
            })
            .map(|(_, kind)| kind)
    }

    /// Whether answers of this kind carry a reason after their message.
    pub fn has_detail(self) -> bool {
        matches!(
            self,
            ErrorKind::AttestationFailed | ErrorKind::GrantRefused | ErrorKind::UnsealFailed
        )
    }
}

impl From<&RequestError> for ErrorKind {
    fn from(e: &RequestError) -> Self {
        match e {
            RequestError::MissingParameters => ErrorKind::MissingParameters,
            RequestError::ParamType => ErrorKind::ParamType,
            RequestError::TimestampLength => ErrorKind::TimestampLength,
            RequestError::Timestamp => ErrorKind::Timestamp,
            RequestError::Replay => ErrorKind::Replay,
            RequestError::Sign => ErrorKind::Sign,
        }
    }
}

/// An error answer: its kind and, for kinds that [have one](ErrorKind::has_detail), the
/// reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorAnswer {
    /// What went wrong.
    pub kind: ErrorKind,
    /// The reason of an attestation failure or a refused grant (in the message after
    /// `attestation failed: ` or `job grant refused: `).
    pub detail: Option<String>,
}

impl ErrorAnswer {
    /// An answer of `kind` without detail.
    pub fn new(kind: ErrorKind) -> Self {
        ErrorAnswer { kind, detail: None }
    }

    /// The eHSM `message`.
    pub fn message(&self) -> String {
        match &self.detail {
            Some(detail) => format!("{}: {detail}", self.kind.message()),
            None => self.kind.message().to_string(),
        }
    }

    /// The response body.
    pub fn to_json(&self) -> Value {
        json!({
            "code": self.kind.code(),
            "message": self.message(),
            "result": {},
            "kind": self.kind.label(),
        })
    }

    /// Reads an error answer: by its `kind` when the server sent one, else by its message.
    /// `None` when neither names an error of this table.
    pub fn from_json(body: &Value) -> Option<Self> {
        let message = body.get("message").and_then(Value::as_str).unwrap_or("");
        let kind = match body.get("kind").and_then(Value::as_str) {
            Some(label) => ErrorKind::from_label(label)?,
            None => ErrorKind::from_message(message)?,
        };
        let detail = kind
            .has_detail()
            .then(|| {
                message
                    .strip_prefix(kind.message())
                    .map(|rest| rest.trim_start_matches(": ").to_string())
            })
            .flatten()
            .filter(|d| !d.is_empty());
        Some(ErrorAnswer { kind, detail })
    }
}

/// A response body turned into its `result`, or the [`KmsError`] it stands for.
pub fn read_answer(body: Value) -> Result<Map<String, Value>, KmsError> {
    let code = body.get("code").and_then(Value::as_u64).unwrap_or(0);
    if code == 200 {
        return match body.get("result") {
            Some(Value::Object(result)) => Ok(result.clone()),
            _ => Err(KmsError::Protocol(
                "response without a result object".into(),
            )),
        };
    }
    match ErrorAnswer::from_json(&body) {
        // A refusal without a meaning of its own keeps the server's whole text (eHSM's say
        // which parameter it refused).
        Some(answer) => Err(match KmsError::from(answer) {
            KmsError::Rejected { code, .. } => KmsError::Rejected {
                code,
                message: body
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            },
            other => other,
        }),
        None => Err(KmsError::Rejected {
            code: u16::try_from(code).unwrap_or(u16::MAX),
            message: body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }),
    }
}

impl From<ErrorAnswer> for KmsError {
    fn from(answer: ErrorAnswer) -> Self {
        match answer.kind {
            ErrorKind::Sign => KmsError::Unauthorized,
            ErrorKind::KeyNotFound => KmsError::KeyNotFound(String::new()),
            ErrorKind::KeyDisabled => KmsError::KeyDisabled(String::new()),
            ErrorKind::DecryptFailed => KmsError::UnwrapFailed,
            ErrorKind::AttestationRequired => KmsError::AttestationRequired,
            ErrorKind::NotMarkedForRelease => KmsError::NotMarkedForRelease,
            ErrorKind::TokenExpired => KmsError::TokenExpired,
            ErrorKind::OwnerSignatureRequired => KmsError::OwnerSignatureRequired,
            ErrorKind::GrantRefused => KmsError::GrantRefused(
                answer
                    .detail
                    .clone()
                    .unwrap_or_else(|| "refused by the KMS".into()),
            ),
            ErrorKind::AttestationFailed => KmsError::Attestation(
                answer
                    .detail
                    .clone()
                    .unwrap_or_else(|| "refused by the KMS".into()),
            ),
            ErrorKind::Sealed => KmsError::Sealed,
            ErrorKind::UnsealFailed => KmsError::UnsealFailed(
                answer
                    .detail
                    .clone()
                    .unwrap_or_else(|| "refused by the KMS".into()),
            ),
            kind => KmsError::Rejected {
                code: kind.code(),
                message: answer.message(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_round_trip() {
        for action in Action::ALL {
            assert_eq!(Action::from_name(action.name()), Some(action));
        }
        assert_eq!(Action::from_name("decrypt"), None);
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_label(kind.label()), Some(kind));
            let answer = ErrorAnswer::new(kind);
            assert_eq!(ErrorAnswer::from_json(&answer.to_json()), Some(answer));
        }
    }

    #[test]
    fn answers_without_a_kind_are_read_by_their_whole_message() {
        let read = |message: &str| {
            ErrorAnswer::from_json(&json!({"code": 400, "message": message, "result": {}}))
        };
        assert_eq!(read("keyid error").unwrap().kind, ErrorKind::KeyNotFound);
        assert_eq!(read("param type error").unwrap().kind, ErrorKind::ParamType);
        // A longer message that merely contains a known one is not that error.
        assert_eq!(read("keyid error in cache"), None);
        assert_eq!(read("sign error!"), None);
        let refused = read("attestation failed: MRENCLAVE not allowed").unwrap();
        assert_eq!(refused.kind, ErrorKind::AttestationFailed);
        assert_eq!(refused.detail.as_deref(), Some("MRENCLAVE not allowed"));
        assert_eq!(read("attestation failedness"), None);
        // A real eHSM's texts (bigdl-compat facts) keep their meaning.
        for (message, kind) in [
            ("keyid error", ErrorKind::KeyNotFound),
            ("appid error", ErrorKind::Sign),
            ("keyid is disabled", ErrorKind::KeyDisabled),
            (
                "Decryption failed, Please confirm that your parameters are correct.",
                ErrorKind::DecryptFailed,
            ),
            (
                "Parameter invalid, The aad not a vailed base64 string.",
                ErrorKind::PayloadType,
            ),
            (
                "Missing required parameters, The keyusage cannot be empty.",
                ErrorKind::MissingParameters,
            ),
            ("Invalid  policyId.", ErrorKind::PolicyNotFound),
            ("Server exception.", ErrorKind::Internal),
        ] {
            assert_eq!(read(message).map(|a| a.kind), Some(kind), "{message}");
        }
    }

    #[test]
    fn the_kind_wins_over_the_message() {
        let body = json!({"code": 400, "message": "param type error", "kind": "payload_type"});
        assert_eq!(
            ErrorAnswer::from_json(&body).unwrap().kind,
            ErrorKind::PayloadType
        );
        let unknown = json!({"code": 400, "message": "sign error", "kind": "new_in_v9"});
        assert_eq!(ErrorAnswer::from_json(&unknown), None);
    }

    #[test]
    fn answers_become_kms_errors() {
        let error = |body: Value| read_answer(body).unwrap_err();
        assert!(matches!(
            error(ErrorAnswer::new(ErrorKind::Sign).to_json()),
            KmsError::Unauthorized
        ));
        assert!(matches!(
            error(ErrorAnswer::new(ErrorKind::DecryptFailed).to_json()),
            KmsError::UnwrapFailed
        ));
        assert!(matches!(
            error(ErrorAnswer::new(ErrorKind::AttestationRequired).to_json()),
            KmsError::AttestationRequired
        ));
        let refused = ErrorAnswer {
            kind: ErrorKind::AttestationFailed,
            detail: Some("debug enclave".into()),
        };
        assert!(
            matches!(error(refused.to_json()), KmsError::Attestation(d) if d == "debug enclave")
        );
        assert!(matches!(
            error(json!({"code": 400, "message": "Timestamp error"})),
            KmsError::Rejected { code: 400, .. }
        ));
        assert!(matches!(
            error(json!({"code": 404, "message": "API Not Found"})),
            KmsError::Rejected { code: 404, .. }
        ));
        let ok = read_answer(json!({"code": 200, "message": "successful", "result": {"a": 1}}));
        assert_eq!(ok.unwrap().get("a"), Some(&json!(1)));
        assert!(matches!(
            read_answer(json!({"code": 200})),
            Err(KmsError::Protocol(_))
        ));
    }
}
