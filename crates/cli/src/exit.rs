//! Exit codes that scripts can trust, derived from the error chain.

use std::process::ExitCode;

use ppml_engine::EngineError;
use ppml_format::FormatError;
use ppml_kms::KmsError;

use crate::csv_split::CsvError;

/// Success.
pub const OK: u8 = 0;
/// Any failure not covered below (I/O, internal).
pub const FAILURE: u8 = 1;
/// Bad input data: tampered, truncated, not a ppml file, or malformed CSV.
pub const BAD_INPUT: u8 = 3;
/// Key access denied: wrong credentials, wrong or unknown key.
pub const ACCESS_DENIED: u8 = 4;
/// `ppml status` / `ppml logs -f`: the job is queued or running.
pub const JOB_PENDING: u8 = 5;
/// `ppml status` / `ppml logs -f`: the scheduler does not know the job.
pub const JOB_UNKNOWN: u8 = 6;

/// The exit code for an error, from the most specific cause in its chain.
pub fn code_for(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<KmsError>() {
            return ExitCode::from(if e.is_access_denied() {
                ACCESS_DENIED
            } else {
                FAILURE
            });
        }
        if let Some(e) = cause.downcast_ref::<FormatError>() {
            return ExitCode::from(if e.is_bad_input() { BAD_INPUT } else { FAILURE });
        }
        if cause
            .downcast_ref::<ppml_attestation::PolicyViolation>()
            .is_some()
        {
            return ExitCode::from(ACCESS_DENIED);
        }
        if cause
            .downcast_ref::<ppml_attestation::dcap::DcapError>()
            .is_some()
        {
            return ExitCode::from(BAD_INPUT);
        }
        if let Some(e) = cause.downcast_ref::<ppml_kms_server::audit::AuditError>() {
            use ppml_kms_server::audit::AuditError as A;
            if matches!(
                e,
                A::Corrupt { .. } | A::BadSeq { .. } | A::BrokenChain { .. } | A::BadMac { .. }
            ) {
                return ExitCode::from(BAD_INPUT);
            }
        }
        if cause.downcast_ref::<CsvError>().is_some() {
            return ExitCode::from(BAD_INPUT);
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            match e {
                EngineError::NotADataset(_)
                | EngineError::MissingPart { .. }
                | EngineError::UnexpectedFile { .. }
                | EngineError::PartMismatch { .. }
                | EngineError::DatasetChanged(_) => return ExitCode::from(BAD_INPUT),
                _ => continue,
            }
        }
        if let Some(datafusion::arrow::error::ArrowError::CsvError(_))
        | Some(datafusion::arrow::error::ArrowError::ParseError(_)) =
            cause.downcast_ref::<datafusion::arrow::error::ArrowError>()
        {
            return ExitCode::from(BAD_INPUT);
        }
    }
    ExitCode::from(FAILURE)
}
