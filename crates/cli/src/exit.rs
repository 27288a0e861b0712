//! Exit codes that scripts can trust, derived from the error chain.

use std::process::ExitCode;

/// Success.
pub const OK: u8 = 0;
/// Any failure not covered below (I/O, internal).
pub const FAILURE: u8 = 1;
/// Usage error: flags or arguments that do not go together (clap's own errors exit 2 too).
pub const USAGE: u8 = 2;
/// Bad input data: tampered, truncated, not a ppml file, or malformed CSV.
pub const BAD_INPUT: u8 = 3;
/// Key access denied: wrong credentials, wrong or unknown key.
pub const ACCESS_DENIED: u8 = 4;
/// `ppml status` / `ppml logs -f`: the job is queued or running.
pub const JOB_PENDING: u8 = 5;
/// `ppml status` / `ppml logs -f`: the scheduler does not know the job.
pub const JOB_UNKNOWN: u8 = 6;

/// A usage error found after parsing (flags that exclude or need each other, values out of
/// range): exit code 2, like the errors clap finds itself.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Returns early with a [`UsageError`] made like `anyhow::bail!`'s message.
#[macro_export]
macro_rules! usage_bail {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::exit::UsageError(format!($($arg)*))))
    };
}

/// A runtime attested under BigDL's attestation variables failed: it exits with 1, as BigDL's
/// runtimes do (docs/migrating-from-bigdl.md §4).
#[derive(Debug)]
pub struct BigDlAttestationFailed;

impl std::fmt::Display for BigDlAttestationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ppml::bigdl_env::FAILURE_LINE)
    }
}

/// The exit code for an error, from the most specific cause in its chain
/// ([`ppml::classify`]); an edited audit log is bad input too.
pub fn code_for(err: &anyhow::Error) -> ExitCode {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        return ExitCode::from(USAGE);
    }
    if err.is::<BigDlAttestationFailed>() {
        return ExitCode::from(FAILURE);
    }
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
