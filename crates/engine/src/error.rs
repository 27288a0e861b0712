use std::path::PathBuf;

use ppml_format::FormatError;
use ppml_kms::KmsError;

/// Why opening, querying or writing an encrypted dataset failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file of the dataset is damaged, forged, truncated or not a ppml file.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: FormatError,
    },
    /// The KMS refused or failed to release the data key.
    #[error("{dataset}: cannot obtain the data key: {source}")]
    Kms {
        /// The dataset whose key was requested.
        dataset: String,
        /// The KMS error.
        source: KmsError,
    },
    /// The directory has no manifest: it is not a ppml dataset.
    #[error("{0}: not a ppml encrypted dataset (no _manifest.ppml.json)")]
    NotADataset(String),
    /// A part listed in the manifest is missing.
    #[error("{dataset}: part {name:?} listed in the manifest is missing")]
    MissingPart {
        /// The dataset.
        dataset: String,
        /// The missing part.
        name: String,
    },
    /// A file is in the dataset directory but not in the manifest.
    #[error("{dataset}: file {name:?} is not part of the dataset (not in its manifest)")]
    UnexpectedFile {
        /// The dataset.
        dataset: String,
        /// The unexpected file.
        name: String,
    },
    /// A part's size or header differs from what the manifest recorded: the part was replaced,
    /// renamed, swapped with another dataset's, truncated or extended.
    #[error("{path}: part does not match the manifest ({what}): replaced, renamed or resized")]
    PartMismatch {
        /// The part file.
        path: String,
        /// Which recorded property differs.
        what: &'static str,
    },
    /// The dataset holds data the query engine cannot read (CSV, NDJSON and Parquet are
    /// queryable).
    #[error(
        "{dataset}: holds {media_type:?}; only CSV, NDJSON and Parquet datasets can be queried"
    )]
    UnsupportedMediaType {
        /// The dataset.
        dataset: String,
        /// Its media type.
        media_type: String,
    },
    /// A dataset read as one format holds another (`read_parquet` of a CSV dataset).
    #[error("{dataset}: holds {media_type:?}, not {expected}")]
    WrongMediaType {
        /// The dataset.
        dataset: String,
        /// The format it was read as.
        expected: String,
        /// Its media type.
        media_type: String,
    },
    /// A dataset pinned by a plan is not the one found at its path any more: it was replaced or
    /// rewritten after the query was planned.
    #[error("{0}: the dataset changed after the query was planned (id or manifest differs)")]
    DatasetChanged(String),
    /// The output already exists; ppml never overwrites silently.
    #[error("{0}: output already exists (remove it or pass --overwrite)")]
    OutputExists(String),
    /// An S3 output prefix holds objects but no dataset (for example the parts of a write that
    /// was killed before it could clean up); ppml never overwrites them silently.
    #[error(
        "{location}: holds objects but no ppml dataset (e.g. {example:?}), maybe left by an \
         interrupted write: remove them or pass --overwrite"
    )]
    PrefixNotEmpty {
        /// The output URL.
        location: String,
        /// One of the objects.
        example: String,
    },
    /// An input the caller gave cannot be processed as asked (an empty directory, files of
    /// different kinds, a split that does not apply).
    #[error("{path}: {reason}")]
    InvalidInput {
        /// The input.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A CSV file is not a table: a row with another number of fields than the first, or a
    /// quoted field that never ends.
    #[error(transparent)]
    Csv(#[from] crate::csv_split::CsvError),
    /// The data owner's job grant does not allow what the job was asked to do
    /// ([`crate::app::AppSpec::check_grant`]).
    #[error("the data owner's job grant does not allow this job: {0}")]
    NotGranted(String),
    /// The query plan holds an operator a ppml runtime does not run ([`crate::plan_check`]).
    #[error("refused plan: {0}")]
    RefusedPlan(String),
    /// A dataset location given by the user is not valid.
    #[error("{location}: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The S3 client could not be configured from the `AWS_*` environment variables.
    #[error("s3://{bucket}: cannot configure the S3 client from the AWS_* environment: {source}")]
    S3Config {
        /// The bucket.
        bucket: String,
        /// The configuration error.
        source: object_store::Error,
    },
    /// A request to the object store holding a dataset failed.
    #[error("{location}: {source}")]
    Storage {
        /// The object or prefix, as a URL.
        location: String,
        /// The object store error.
        source: object_store::Error,
    },
    /// An S3 dataset was committed (its new manifest is in place) but objects of the dataset
    /// it replaced could not be deleted; readers refuse it until they are gone.
    #[error(
        "{location}: the new dataset is committed, but {count} old object(s) could not be \
         deleted (first: {first:?}: {source}); readers refuse the dataset until they are \
         removed (delete them, or write it again with --overwrite)"
    )]
    StaleObjects {
        /// The dataset URL.
        location: String,
        /// How many objects are left.
        count: usize,
        /// The first of them.
        first: String,
        /// Why the first could not be deleted.
        source: Box<object_store::Error>,
    },
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The object store failed.
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    /// A column of a Parquet dataset is under a key of its own that the KMS did not release
    /// to this reader; its other columns stay readable.
    #[error("access denied to column(s) {}: the KMS did not release their key ({reason})", columns.join(", "))]
    ColumnAccessDenied {
        /// The columns under that key.
        columns: Vec<String>,
        /// The KMS's refusal.
        reason: String,
    },
    /// A module of a Parquet part (PME) did not decrypt: the part was modified after it was
    /// verified, or it is not the file the manifest names.
    #[error(
        "a Parquet part failed authentication: it was modified, or is not the file its \
         dataset's manifest names ({0})"
    )]
    ParquetAuthentication(datafusion::error::DataFusionError),
    /// DataFusion failed to plan or run the query.
    #[error(transparent)]
    DataFusion(datafusion::error::DataFusionError),
    /// Arrow failed to encode the output.
    #[error("encoding the output: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// The job receipt could not be made (`docs/receipts.md`); the output was not written.
    #[error("making the job receipt: {0}")]
    Receipt(String),
}

impl From<datafusion::error::DataFusionError> for EngineError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        // arrow-rs reports a PME module whose tag does not verify as ring's bare
        // `Unspecified`; name it. Where its Arrow reader flattened the error to text, the
        // text ends with that type's name: the one place ppml reads an error's message,
        // because no typed form of it survives.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(e) = cause {
            let flattened = matches!(
                e.downcast_ref::<datafusion::arrow::error::ArrowError>(),
                Some(datafusion::arrow::error::ArrowError::ParquetError(text))
                    if text.ends_with("ring::error::Unspecified")
            );
            if flattened || e.is::<ring::error::Unspecified>() {
                return EngineError::ParquetAuthentication(error);
            }
            if let Some(EngineError::ColumnAccessDenied { columns, reason }) =
                e.downcast_ref::<EngineError>()
            {
                return EngineError::ColumnAccessDenied {
                    columns: columns.clone(),
                    reason: reason.clone(),
                };
            }
            cause = e.source();
        }
        EngineError::DataFusion(error)
    }
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error met reading `path` (an I/O error stays one).
    pub fn format(path: impl std::fmt::Display, source: FormatError) -> Self {
        match source {
            FormatError::Io(e) => EngineError::Io {
                path: PathBuf::from(path.to_string()),
                source: e,
            },
            source => EngineError::Format {
                path: path.to_string(),
                source,
            },
        }
    }
}
