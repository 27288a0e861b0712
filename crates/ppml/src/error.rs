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
}

impl From<KmsError> for Error {
    fn from(source: KmsError) -> Self {
        Error::Kms {
            context: "KMS".into(),
            source,
        }
    }
}

/// What kind of failure an error is; `ppml`'s exit codes and the Python exceptions follow it.
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

/// The class of `error`, from the most specific cause in its chain of sources (wrapper
/// variants that forward their source are looked through).
pub fn classify(error: &(dyn StdError + 'static)) -> ErrorClass {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(class) = class_of(error) {
            return class;
        }
        current = error.source();
    }
    ErrorClass::Failure
}

/// The class of `error` itself, if it decides one.
fn class_of(error: &(dyn StdError + 'static)) -> Option<ErrorClass> {
    if let Some(error) = error.downcast_ref::<Error>() {
        return match error {
            Error::Kms { source, .. } | Error::Attestation { source } => class_of(source),
            Error::Engine(e) => class_of(e),
            Error::Cluster(e) => class_of(e),
            Error::DataFusion(e) => class_of(e),
            Error::Arrow(e) => class_of(e),
            Error::Config { .. } | Error::Io { .. } => None,
        };
    }
    if let Some(e) = error.downcast_ref::<KmsError>() {
        return Some(if e.is_access_denied() {
            ErrorClass::AccessDenied
        } else {
            ErrorClass::Failure
        });
    }
    if let Some(e) = error.downcast_ref::<FormatError>() {
        return Some(if e.is_bad_input() {
            ErrorClass::BadInput
        } else {
            ErrorClass::Failure
        });
    }
    if error
        .downcast_ref::<ppml_attestation::PolicyViolation>()
        .is_some()
    {
        return Some(ErrorClass::AccessDenied);
    }
    if error
        .downcast_ref::<ppml_attestation::dcap::DcapError>()
        .is_some()
        || error
            .downcast_ref::<ppml_engine::csv_split::CsvError>()
            .is_some()
    {
        return Some(ErrorClass::BadInput);
    }
    if let Some(e) = error.downcast_ref::<EngineError>() {
        return match e {
            EngineError::NotADataset(_)
            | EngineError::MissingPart { .. }
            | EngineError::UnexpectedFile { .. }
            | EngineError::PartMismatch { .. }
            | EngineError::DatasetChanged(_)
            | EngineError::ParquetAuthentication(_)
            | EngineError::Csv(_) => Some(ErrorClass::BadInput),
            EngineError::NotGranted(_) | EngineError::ColumnAccessDenied { .. } => {
                Some(ErrorClass::AccessDenied)
            }
            EngineError::DataFusion(e) => class_of(e),
            EngineError::Arrow(e) => class_of(e),
            _ => None,
        };
    }
    if let Some(ClusterError::App(e)) = error.downcast_ref::<ClusterError>() {
        return class_of(e);
    }
    if let Some(e) = error.downcast_ref::<datafusion::error::DataFusionError>() {
        use datafusion::error::DataFusionError as D;
        return match e {
            D::ArrowError(e, _) => class_of(e.as_ref()),
            D::External(e) => class_of(e.as_ref()),
            D::Context(_, e) => class_of(e.as_ref()),
            D::Shared(e) => class_of(e.as_ref()),
            _ => None,
        };
    }
    if let Some(
        datafusion::arrow::error::ArrowError::CsvError(_)
        | datafusion::arrow::error::ArrowError::ParseError(_),
    ) = error.downcast_ref::<datafusion::arrow::error::ArrowError>()
    {
        return Some(ErrorClass::BadInput);
    }
    None
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
