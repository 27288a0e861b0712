//! BigDL PPML's attestation environment, honoured by every ppml runtime (driver and
//! executors) so that BigDL's deployments keep their settings (`docs/migrating-from-bigdl.md`
//! §4).
//!
//! | variable | meaning in BigDL | in ppml |
//! |---|---|---|
//! | `ATTESTATION` | `true` attests before the job | attest (`--tee`) |
//! | `ATTESTATION_URL` | `host:port` of the attestation service | the KMS server `https://host:port` |
//! | `APP_ID`, `API_KEY` (older: `ATTESTATION_ID`, `ATTESTATION_KEY`) | the app's credentials | `--appid`, `--apikey` |
//! | `ATTESTATION_POLICYID` | the policy that judges the quote | `--attestation-policy` |
//! | `ATTESTATION_TYPE` | `EHSMAttestationService` (default) or `BigDLRemoteAttestationService` | both are ppml's KMS server; any other value is refused |
//! | `QUOTE_TYPE` | `gramine` (default) or `TDX` (`occlum` is refused) | the TEE: `gramine` is SGX, `TDX` is TDX |
//! | `ATTESTATION_DEBUG` | `true`: a failed attestation continues | `--attestation-debug` |
//! | `PCCS_URL` | the PCCS of the quote verifier | not read by runtimes: the KMS server verifies quotes (`ppml kms serve --pccs-url`) |
//!
//! ppml's own settings (flags, `PPML_*` variables, the configuration file) come first: a BigDL
//! variable fills only what they leave unset. While `ATTESTATION=true`, the outcome is also
//! printed on standard output as BigDL prints it, and a failed attestation exits with 1.

use crate::Tee;
use crate::error::{Error, Result};

/// The values of BigDL's attestation variables, when `ATTESTATION=true`.
#[derive(Clone, PartialEq, Eq)]
pub struct BigDlAttestationEnv {
    /// The TEE from `QUOTE_TYPE`.
    pub tee: Tee,
    /// The KMS server from `ATTESTATION_URL`.
    pub kms_url: Option<String>,
    /// `APP_ID` (or `ATTESTATION_ID`).
    pub appid: Option<String>,
    /// `API_KEY` (or `ATTESTATION_KEY`).
    pub apikey: Option<String>,
    /// `ATTESTATION_POLICYID`.
    pub policy_id: Option<String>,
    /// `ATTESTATION_DEBUG`.
    pub debug: bool,
}

impl std::fmt::Debug for BigDlAttestationEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigDlAttestationEnv")
            .field("tee", &self.tee)
            .field("kms_url", &self.kms_url)
            .field("appid", &self.appid)
            .field("apikey", &self.apikey.as_ref().map(|_| "<redacted>"))
            .field("policy_id", &self.policy_id)
            .field("debug", &self.debug)
            .finish()
    }
}

/// BigDL's message on standard output when attestation succeeded.
pub const SUCCESS_LINE: &str = "Attestation Success!";
/// BigDL's message on standard output when attestation failed and the job stops.
pub const FAILURE_LINE: &str = "Attestation Fail! Application killed!";
/// BigDL's message on standard output when attestation failed in debug mode.
pub const DEBUG_FAILURE_LINE: &str = "ERROR:Attestation Fail! In debug mode, continue.";

fn invalid(variable: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        what: variable.to_string(),
        reason: reason.into(),
    }
}

fn is_true(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("true")
}

impl BigDlAttestationEnv {
    /// The variables of this process's environment; `None` unless `ATTESTATION=true`.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The variables `lookup` gives (empty values count as unset); `None` unless
    /// `ATTESTATION=true`.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if !var("ATTESTATION").is_some_and(|v| is_true(&v)) {
            return Ok(None);
        }
        match var("ATTESTATION_TYPE").as_deref().map(str::trim) {
            None | Some("EHSMAttestationService" | "BigDLRemoteAttestationService") => {}
            Some(other) => {
                return Err(invalid(
                    "ATTESTATION_TYPE",
                    format!(
                        "{other:?}: ppml runtimes attest to ppml's KMS server, which stands in \
                         for EHSMAttestationService and BigDLRemoteAttestationService; other \
                         attestation services are not supported"
                    ),
                ));
            }
        }
        let tee = match var("QUOTE_TYPE").as_deref().map(str::trim) {
            None => Tee::Sgx,
            Some(t) if t.eq_ignore_ascii_case("gramine") => Tee::Sgx,
            Some(t) if t.eq_ignore_ascii_case("tdx") => Tee::Tdx,
            Some(t) if t.eq_ignore_ascii_case("occlum") => {
                return Err(invalid(
                    "QUOTE_TYPE",
                    "occlum: ppml's SGX runtimes run in Gramine (QUOTE_TYPE=gramine)",
                ));
            }
            Some(other) => {
                return Err(invalid(
                    "QUOTE_TYPE",
                    format!("{other:?} is not gramine or TDX"),
                ));
            }
        };
        let kms_url = match var("ATTESTATION_URL") {
            None => None,
            Some(url) if url.contains("://") => Some(url.trim().to_string()),
            // BigDL gives `host:port` and speaks HTTPS to it.
            Some(host_port) => Some(format!("https://{}", host_port.trim())),
        };
        Ok(Some(BigDlAttestationEnv {
            tee,
            kms_url,
            appid: var("APP_ID").or_else(|| var("ATTESTATION_ID")),
            apikey: var("API_KEY").or_else(|| var("ATTESTATION_KEY")),
            policy_id: var("ATTESTATION_POLICYID"),
            debug: var("ATTESTATION_DEBUG").is_some_and(|v| is_true(&v)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<BigDlAttestationEnv>> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BigDlAttestationEnv::from_vars(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn only_attestation_true_turns_it_on() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(
            env(&[("ATTESTATION", "false"), ("APP_ID", "a")]).unwrap(),
            None
        );
        let on = env(&[
            ("ATTESTATION", "TRUE"),
            ("ATTESTATION_URL", "kms.example:9000"),
            ("ATTESTATION_ID", "app"),
            ("ATTESTATION_KEY", "key"),
            ("ATTESTATION_POLICYID", "p-1"),
            ("ATTESTATION_DEBUG", "true"),
            ("QUOTE_TYPE", "TDX"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(on.tee, Tee::Tdx);
        assert_eq!(on.kms_url.as_deref(), Some("https://kms.example:9000"));
        assert_eq!(
            (on.appid.as_deref(), on.apikey.as_deref()),
            (Some("app"), Some("key"))
        );
        assert_eq!(on.policy_id.as_deref(), Some("p-1"));
        assert!(on.debug);
        assert!(!format!("{on:?}").contains("key\""));
        // The current names win over the older ones; gramine is SGX, the default.
        let on = env(&[
            ("ATTESTATION", "true"),
            ("APP_ID", "new"),
            ("ATTESTATION_ID", "old"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((on.tee, on.appid.as_deref()), (Tee::Sgx, Some("new")));
    }

    #[test]
    fn what_has_no_meaning_is_refused() {
        for (name, value) in [
            ("ATTESTATION_TYPE", "AzureAttestationService"),
            ("ATTESTATION_TYPE", "DummyAttestationService"),
            ("QUOTE_TYPE", "occlum"),
            ("QUOTE_TYPE", "sev"),
        ] {
            let err = env(&[("ATTESTATION", "true"), (name, value)]).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }
}
