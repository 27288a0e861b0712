//! The facade's error, and the classes every ppml error falls into.

use std::error::Error as StdError;

use ppml_cluster::ClusterError;
use ppml_engine::EngineError;
use ppml_format::FormatError;
use ppml_kms::KmsError;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a ppml operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings are missing something or contradict each other.
    #[error("{what}: {reason}")]
    Config {
        /// What is being configured.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The KMS refused or failed.
    #[error("{context}: {source}")]
    Kms {
        /// What was being done.
        context: String,
        /// The KMS error.
        source: KmsError,
    },
    /// The runtime's attestation failed: no evidence, or the KMS refused it. There is no
    /// fallback to an unattested runtime.
    #[error("attestation failed: {source}")]
    Attestation {
        /// The KMS client's error.
        source: KmsError,
    },
    /// Reading, querying or writing a dataset failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Running on the cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// DataFusion failed.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// Arrow failed (formatting or converting record batches).
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// A job receipt does not verify.
    #[error(transparent)]
    Receipt(#[from] crate::receipt::VerifyError),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        classify(self)
    }

    /// The kind of this error (one step finer than its class).
    pub fn kind(&self) -> ErrorKind {
        kind(self)
    }
}

impl From<KmsError> for Error {
    fn from(source: KmsError) -> Self {
        Error::Kms {
            context: "KMS".into(),
            source,
        }
    }
}

/// What kind of failure an error is; `ppml`'s exit codes follow it. [`ErrorKind`] splits it
/// further, for APIs with a type per kind (the Python package's exceptions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Bad input data: a tampered, truncated or reordered file, a dataset whose parts were
    /// removed, added or swapped, not a ppml file, malformed CSV, a quote that does not
    /// verify.
    BadInput,
    /// Access denied: wrong credentials, an unknown, foreign or disabled key, a wrapped key
    /// that does not unwrap, a key released only to attested runtimes, an attestation policy
    /// refusing the evidence.
    AccessDenied,
    /// Anything else: I/O, configuration, the cluster, an internal error.
    Failure,
}

/// What kind of failure an error is, one step finer than its [`ErrorClass`]: each kind
/// belongs to one class ([`ErrorKind::class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Data that fails its authentication: a modified, truncated, extended or reordered
    /// file, a dataset whose parts were removed, added, swapped or changed, an edited
    /// manifest, a Parquet file whose modules do not verify. ([`ErrorClass::BadInput`])
    TamperedData,
    /// Input that is not what it should be, with nothing to say it was tampered with: not a
    /// ppml file, an unknown format version, a malformed header, manifest or key material,
    /// malformed CSV, a quote that does not verify. ([`ErrorClass::BadInput`])
    InvalidInput,
    /// Attestation failed: this runtime's evidence could not be made or the KMS's policy
    /// refused it, or the KMS's own evidence did not satisfy this side's policy.
    /// ([`ErrorClass::AccessDenied`])
    AttestationFailed,
    /// Any other refusal: wrong credentials, an unknown, foreign or disabled key, a wrapped
    /// key that does not unwrap, a key released only to attested runtimes, a job the owner
    /// did not grant. ([`ErrorClass::AccessDenied`])
    AccessDenied,
    /// Anything else: I/O, configuration, the cluster, an internal error.
    /// ([`ErrorClass::Failure`])
    Failure,
}

impl ErrorKind {
    /// The class this kind belongs to.
    pub fn class(self) -> ErrorClass {
        match self {
            ErrorKind::TamperedData | ErrorKind::InvalidInput => ErrorClass::BadInput,
            ErrorKind::AttestationFailed | ErrorKind::AccessDenied => ErrorClass::AccessDenied,
            ErrorKind::Failure => ErrorClass::Failure,
        }
    }
}

/// The class of `error`: the class of its [`kind`].
pub fn classify(error: &(dyn StdError + 'static)) -> ErrorClass {
    kind(error).class()
}

/// The kind of `error`, from the most specific cause in its chain of sources (wrapper
/// variants that forward their source are looked through).
pub fn kind(error: &(dyn StdError + 'static)) -> ErrorKind {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(kind) = kind_of(error) {
            return kind;
        }
        current = error.source();
    }
    ErrorKind::Failure
}

/// The kind of `error` itself, if it decides one.
fn kind_of(error: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    if let Some(error) = error.downcast_ref::<Error>() {
        return match error {
            Error::Kms { source, .. } => kind_of(source),
            // A refusal met while attesting is the attestation's failure; anything else
            // (the KMS unreachable, say) keeps its own kind.
            Error::Attestation { source } => kind_of(source).map(|kind| match kind.class() {
                ErrorClass::AccessDenied => ErrorKind::AttestationFailed,
                _ => kind,
            }),
            Error::Engine(e) => kind_of(e),
            Error::Cluster(e) => kind_of(e),
            Error::DataFusion(e) => kind_of(e),
            Error::Arrow(e) => kind_of(e),
            Error::Receipt(e) => Some(e.kind()),
            Error::Config { .. } | Error::Io { .. } => None,
        };
    }
    if let Some(e) = error.downcast_ref::<KmsError>() {
        return Some(match e {
            KmsError::Attestation(_) | KmsError::UntrustedKms(_) => ErrorKind::AttestationFailed,
            e if e.is_access_denied() => ErrorKind::AccessDenied,
            _ => ErrorKind::Failure,
        });
    }
    if let Some(e) = error.downcast_ref::<FormatError>() {
        return Some(format_error_kind(e));
    }
    if error
        .downcast_ref::<ppml_attestation::PolicyViolation>()
        .is_some()
    {
        return Some(ErrorKind::AttestationFailed);
    }
    if error
        .downcast_ref::<ppml_attestation::dcap::DcapError>()
        .is_some()
        || error
            .downcast_ref::<ppml_engine::csv_split::CsvError>()
            .is_some()
    {
        return Some(ErrorKind::InvalidInput);
    }
    if let Some(e) = error.downcast_ref::<EngineError>() {
        return match e {
            EngineError::MissingPart { .. }
            | EngineError::UnexpectedFile { .. }
            | EngineError::PartMismatch { .. }
            | EngineError::DatasetChanged(_)
            | EngineError::ParquetAuthentication(_) => Some(ErrorKind::TamperedData),
            EngineError::NotADataset(_)
            | EngineError::WrongMediaType { .. }
            | EngineError::Csv(_) => Some(ErrorKind::InvalidInput),
            EngineError::NotGranted(_) | EngineError::ColumnAccessDenied { .. } => {
                Some(ErrorKind::AccessDenied)
            }
            EngineError::DataFusion(e) => kind_of(e),
            EngineError::Arrow(e) => kind_of(e),
            _ => None,
        };
    }
    if let Some(ClusterError::App(e)) = error.downcast_ref::<ClusterError>() {
        return kind_of(e);
    }
    if let Some(e) = error.downcast_ref::<datafusion::error::DataFusionError>() {
        use datafusion::error::DataFusionError as D;
        return match e {
            D::ArrowError(e, _) => kind_of(e.as_ref()),
            D::External(e) => kind_of(e.as_ref()),
            D::Context(_, e) => kind_of(e.as_ref()),
            D::Shared(e) => kind_of(e.as_ref()),
            _ => None,
        };
    }
    if let Some(
        datafusion::arrow::error::ArrowError::CsvError(_)
        | datafusion::arrow::error::ArrowError::ParseError(_),
    ) = error.downcast_ref::<datafusion::arrow::error::ArrowError>()
    {
        return Some(ErrorKind::InvalidInput);
    }
    None
}

/// Which format errors are failed authentication (tampering, or a key that is not the
/// data's) and which are input that is merely not a valid file.
fn format_error_kind(error: &FormatError) -> ErrorKind {
    match error {
        FormatError::HeaderAuthentication
        | FormatError::SegmentAuthentication { .. }
        | FormatError::Truncated { .. }
        | FormatError::BadLength(_)
        | FormatError::ManifestAuthentication
        | FormatError::BigDlAuthentication
        | FormatError::BigDlDecryption => ErrorKind::TamperedData,
        e if e.is_bad_input() => ErrorKind::InvalidInput,
        _ => ErrorKind::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_chain_through_forwarding_wrappers() {
        let denied = Error::Engine(EngineError::Kms {
            dataset: "d".into(),
            source: KmsError::AttestationRequired,
        });
        assert_eq!(denied.class(), ErrorClass::AccessDenied);
        let csv = Error::Cluster(ClusterError::App(EngineError::Csv(
            ppml_engine::csv_split::CsvError::FieldCount {
                path: "a.csv".into(),
                line: 3,
                expected: 2,
                found: 3,
            },
        )));
        assert_eq!(csv.class(), ErrorClass::BadInput);
        let tampered = EngineError::Format {
            path: "p".into(),
            source: FormatError::SegmentAuthentication { segment: 0 },
        };
        assert_eq!(classify(&tampered), ErrorClass::BadInput);
        assert_eq!(kind(&tampered), ErrorKind::TamperedData);
        assert_eq!(csv.kind(), ErrorKind::InvalidInput);
        assert_eq!(denied.kind(), ErrorKind::AccessDenied);
        let missing = Error::Engine(EngineError::MissingPart {
            dataset: "d".into(),
            name: "part-00001.csv.enc".into(),
        });
        assert_eq!(missing.kind(), ErrorKind::TamperedData);
        let foreign = EngineError::Format {
            path: "p".into(),
            source: FormatError::NotPpml,
        };
        assert_eq!(kind(&foreign), ErrorKind::InvalidInput);
        // Refused evidence is an attestation failure; an unreachable KMS while attesting is
        // not (it is not the evidence's fault).
        let refused = Error::Attestation {
            source: KmsError::Attestation("policy p: measurement not allowed".into()),
        };
        assert_eq!(refused.kind(), ErrorKind::AttestationFailed);
        assert_eq!(refused.class(), ErrorClass::AccessDenied);
        let gated = Error::Attestation {
            source: KmsError::AttestationRequired,
        };
        assert_eq!(gated.kind(), ErrorKind::AttestationFailed);
        let unreachable = Error::Attestation {
            source: KmsError::Protocol("connection reset".into()),
        };
        assert_eq!(unreachable.kind(), ErrorKind::Failure);
        // A refused column key, as arrow-rs's reader reports it from deep in a query.
        let column = EngineError::from(datafusion::error::DataFusionError::External(Box::new(
            EngineError::ColumnAccessDenied {
                columns: vec!["name".into()],
                reason: "grant refused".into(),
            },
        )));
        assert!(matches!(column, EngineError::ColumnAccessDenied { .. }));
        assert_eq!(Error::Engine(column).class(), ErrorClass::AccessDenied);
        let config = Error::Config {
            what: "x".into(),
            reason: "y".into(),
        };
        assert_eq!(config.class(), ErrorClass::Failure);
    }
}
