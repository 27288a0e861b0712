//! Exit codes that scripts can trust, derived from the error chain.

use std::process::ExitCode;

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

/// The exit code for an error, from the most specific cause in its chain
/// ([`ppml::classify`]); an edited audit log is bad input too.
pub fn code_for(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ppml_kms_server::audit::AuditError>() {
            use ppml_kms_server::audit::AuditError as A;
            if matches!(
                e,
                A::Corrupt { .. } | A::BadSeq { .. } | A::BrokenChain { .. } | A::BadMac { .. }
            ) {
                return ExitCode::from(BAD_INPUT);
            }
        }
    }
    ExitCode::from(match ppml::classify(err.as_ref()) {
        ppml::ErrorClass::BadInput => BAD_INPUT,
        ppml::ErrorClass::AccessDenied => ACCESS_DENIED,
        _ => FAILURE,
    })
}
