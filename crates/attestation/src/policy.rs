//! Policies: which verified [`Claims`] an app accepts (`docs/attestation.md`).
//!
//! The defaults are strict: only the `UpToDate` TCB status, no advisories, no debug TEEs, no
//! simulation, and at least one allowed measurement must be listed. A policy widens them
//! explicitly, field by field.

use serde::{Deserialize, Serialize};

use crate::claims::{Claims, Tee};

/// One acceptable identity of a runtime. Every field that is set must match; unset fields
/// are not checked. Hex is compared case-insensitively.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedMeasurement {
    /// TEE this entry is for.
    pub tee: Option<Tee>,
    /// SGX MRENCLAVE, or the executable's SHA-256 for `sim`.
    pub mrenclave: Option<String>,
    /// SGX MRSIGNER.
    pub mrsigner: Option<String>,
    /// SGX ISVPRODID.
    pub isvprodid: Option<u16>,
    /// Minimum SGX ISVSVN.
    pub min_isvsvn: Option<u16>,
    /// TDX MRTD.
    pub mrtd: Option<String>,
    /// TDX RTMR0..3; `None` entries are not checked.
    pub rtmr: Option<[Option<String>; 4]>,
}

/// An app's attestation policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Runtimes that may receive keys; the claims must match at least one entry.
    pub allowed: Vec<AllowedMeasurement>,
    /// TCB statuses accepted [default: `["UpToDate"]`].
    #[serde(default = "default_statuses")]
    pub accepted_tcb_statuses: Vec<String>,
    /// Advisory ids tolerated; any other advisory on the platform is a refusal.
    #[serde(default)]
    pub accepted_advisories: Vec<String>,
    /// Accept debug enclaves / TDs (their memory is readable by the host) [default: false].
    #[serde(default)]
    pub allow_debug: bool,
    /// Accept ppml's simulated TEE (development only; logged loudly) [default: false].
    #[serde(default)]
    pub allow_simulation: bool,
    /// The simulation platforms whose simulated evidence this policy accepts: their public
    /// keys (raw Ed25519, 64 hex digits, as `ppml attest sim-platform` prints them). A policy
    /// that allows simulation names at least one; the KMS verifies simulated quotes with these
    /// keys only, so trusting one host's development platform is each owner's own choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sim_platforms: Vec<String>,
    /// Only in a client's policy for a KMS (`--kms-policy`, `docs/attestation.md` §9): the
    /// root key ids (64 hex digits, as `ppml kms unseal` prints them) the KMS may hold. Empty:
    /// any root key. A key's release policy has none (the KMS refuses one that names any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kms_root_ids: Vec<String>,
}

fn default_statuses() -> Vec<String> {
    vec!["UpToDate".to_string()]
}

impl Policy {
    /// The strict policy for these runtimes.
    pub fn strict(allowed: Vec<AllowedMeasurement>) -> Self {
        Policy {
            allowed,
            accepted_tcb_statuses: default_statuses(),
            accepted_advisories: Vec::new(),
            allow_debug: false,
            allow_simulation: false,
            sim_platforms: Vec::new(),
            kms_root_ids: Vec::new(),
        }
    }

    /// Checks what serde cannot: a policy allows some runtime, and one that allows simulation
    /// names its simulation platforms as 32-byte hex keys.
    pub fn check(&self) -> Result<(), InvalidPolicy> {
        if self.allowed.is_empty() {
            return Err(InvalidPolicy(
                "the policy allows no runtime (\"allowed\" is empty)".into(),
            ));
        }
        if self.allow_simulation && self.sim_platforms.is_empty() {
            return Err(InvalidPolicy(
                "a policy that allows simulation names the simulation platforms it trusts \
                 (\"sim_platforms\": public keys from `ppml attest sim-platform`)"
                    .into(),
            ));
        }
        self.sim_platform_keys()?;
        self.kms_root_id_values().map(drop)
    }

    /// The root key ids of [`Self::kms_root_ids`].
    pub fn kms_root_id_values(&self) -> Result<Vec<[u8; 32]>, InvalidPolicy> {
        self.kms_root_ids
            .iter()
            .map(|text| {
                parse_hex32(text).ok_or_else(|| {
                    InvalidPolicy(format!(
                        "kms_root_ids: {text:?} is not a root id (64 hex digits)"
                    ))
                })
            })
            .collect()
    }

    /// The public keys of [`Self::sim_platforms`].
    pub fn sim_platform_keys(&self) -> Result<Vec<[u8; 32]>, InvalidPolicy> {
        self.sim_platforms
            .iter()
            .map(|text| parse_sim_platform(text))
            .collect()
    }

    /// Judges `claims`; `Ok` means the runtime may receive keys under this policy.
    pub fn evaluate(&self, claims: &Claims) -> Result<(), PolicyViolation> {
        if claims.tee == Tee::Sim {
            if !self.allow_simulation {
                return Err(PolicyViolation::SimulationNotAllowed);
            }
        } else if !self
            .accepted_tcb_statuses
            .iter()
            .any(|s| s == &claims.tcb_status)
        {
            return Err(PolicyViolation::TcbStatus(claims.tcb_status.clone()));
        }
        let unaccepted: Vec<String> = claims
            .advisory_ids
            .iter()
            .filter(|a| !self.accepted_advisories.contains(a))
            .cloned()
            .collect();
        if !unaccepted.is_empty() {
            return Err(PolicyViolation::Advisories(unaccepted));
        }
        if claims.debug && !self.allow_debug {
            return Err(PolicyViolation::Debug);
        }
        if self.allowed.is_empty() {
            return Err(PolicyViolation::NoAllowedMeasurements);
        }
        if !self.allowed.iter().any(|m| m.matches(claims)) {
            return Err(PolicyViolation::Measurement(describe(claims)));
        }
        if claims.tee == Tee::Sim {
            tracing::warn!(
                measurement = claims.measurements.mrenclave.as_deref().unwrap_or(""),
                "SIMULATED TEE ACCEPTED: the policy allows simulation; this runtime has no \
                 hardware protection (development only)"
            );
        }
        Ok(())
    }
}

fn hex_eq(expected: &Option<String>, actual: &Option<String>) -> bool {
    match (expected, actual) {
        (None, _) => true,
        (Some(e), Some(a)) => e.eq_ignore_ascii_case(a),
        (Some(_), None) => false,
    }
}

impl AllowedMeasurement {
    /// Whether `claims` satisfy every field set here.
    pub fn matches(&self, claims: &Claims) -> bool {
        let m = &claims.measurements;
        let rtmr_ok = match (&self.rtmr, &m.rtmr) {
            (None, _) => true,
            (Some(expected), Some(actual)) => expected
                .iter()
                .zip(actual)
                .all(|(e, a)| hex_eq(e, &Some(a.clone()))),
            (Some(_), None) => false,
        };
        self.tee.is_none_or(|t| t == claims.tee)
            && hex_eq(&self.mrenclave, &m.mrenclave)
            && hex_eq(&self.mrsigner, &m.mrsigner)
            && hex_eq(&self.mrtd, &m.mrtd)
            && self.isvprodid.is_none_or(|p| m.isvprodid == Some(p))
            && self
                .min_isvsvn
                .is_none_or(|min| m.isvsvn.is_some_and(|svn| svn >= min))
            && rtmr_ok
    }
}

fn describe(claims: &Claims) -> String {
    let m = &claims.measurements;
    let mut parts = vec![format!("tee {}", claims.tee)];
    for (name, value) in [
        ("mrenclave", &m.mrenclave),
        ("mrsigner", &m.mrsigner),
        ("mrtd", &m.mrtd),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name} {v}"));
        }
    }
    parts.join(", ")
}

/// A simulation platform public key as policies name it: 64 hex digits (32 bytes).
pub fn parse_sim_platform(text: &str) -> Result<[u8; 32], InvalidPolicy> {
    parse_hex32(text).ok_or_else(|| {
        InvalidPolicy(format!(
            "simulation platform {text:?} is not a 32-byte public key in hex"
        ))
    })
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// Why a runtime description cannot make a policy ([`Policy::for_runtime`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPolicy(pub String);

fn checked_hex(
    name: &str,
    value: &Option<String>,
    bytes: usize,
) -> Result<Option<String>, InvalidPolicy> {
    let Some(text) = value else {
        return Ok(None);
    };
    let decoded =
        hex::decode(text).map_err(|_| InvalidPolicy(format!("--{name} {text:?} is not hex")))?;
    if decoded.len() != bytes {
        return Err(InvalidPolicy(format!(
            "--{name} must be {bytes} bytes ({} hex digits), got {}",
            bytes * 2,
            decoded.len()
        )));
    }
    Ok(Some(text.to_ascii_lowercase()))
}

impl Policy {
    /// The strict policy that allows exactly the runtime `runtime` describes, after checking
    /// it: its measurements are hex of the right length, it names its TEE's identity
    /// (MRENCLAVE or MRSIGNER for SGX, MRTD for TDX, the executable's digest for `sim`) and
    /// no other TEE's. A `sim` policy allows simulation on the platforms `sim_platforms`
    /// (public keys), and needs at least one.
    pub fn for_runtime(
        runtime: &AllowedMeasurement,
        sim_platforms: &[[u8; 32]],
    ) -> Result<Policy, InvalidPolicy> {
        let tee = runtime
            .tee
            .ok_or_else(|| InvalidPolicy("a runtime policy names its TEE".into()))?;
        let entry = AllowedMeasurement {
            tee: Some(tee),
            mrenclave: checked_hex("mrenclave", &runtime.mrenclave, 32)?,
            mrsigner: checked_hex("mrsigner", &runtime.mrsigner, 32)?,
            mrtd: checked_hex("mrtd", &runtime.mrtd, 48)?,
            ..runtime.clone()
        };
        let identifies = match tee {
            Tee::Sgx => entry.mrenclave.is_some() || entry.mrsigner.is_some(),
            Tee::Tdx => entry.mrtd.is_some(),
            Tee::Sim => entry.mrenclave.is_some(),
        };
        if !identifies {
            return Err(InvalidPolicy(
                match tee {
                    Tee::Sgx => "an SGX policy needs --mrenclave or --mrsigner",
                    Tee::Tdx => "a TDX policy needs --mrtd",
                    Tee::Sim => "a simulation policy needs --mrenclave or --this-binary",
                }
                .into(),
            ));
        }
        let wrong_tee = match tee {
            Tee::Sgx => entry.mrtd.is_some(),
            Tee::Tdx => entry.mrenclave.is_some() || entry.mrsigner.is_some(),
            Tee::Sim => entry.mrtd.is_some() || entry.mrsigner.is_some(),
        };
        if wrong_tee {
            return Err(InvalidPolicy(format!(
                "measurements of another TEE than --tee {tee}"
            )));
        }
        let mut policy = Policy::strict(vec![entry]);
        if tee == Tee::Sim {
            policy.allow_simulation = true;
            policy.sim_platforms = sim_platforms.iter().map(hex::encode).collect();
        }
        policy.check()?;
        Ok(policy)
    }
}

/// Why a policy refused claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyViolation {
    /// The evidence comes from the simulated TEE and the policy does not allow simulation.
    #[error("simulated TEE evidence, and the policy does not allow simulation")]
    SimulationNotAllowed,
    /// The platform's TCB status is not accepted.
    #[error("TCB status {0} is not accepted by the policy")]
    TcbStatus(String),
    /// Advisories apply to the platform that the policy does not accept.
    #[error("the platform is affected by advisories the policy does not accept: {0:?}")]
    Advisories(Vec<String>),
    /// A debug enclave or TD.
    #[error("debug TEE, and the policy does not allow debug")]
    Debug,
    /// The policy lists no runtime at all.
    #[error("the policy allows no measurement")]
    NoAllowedMeasurements,
    /// The runtime is not one the policy allows.
    #[error("measurement not allowed by the policy ({0})")]
    Measurement(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Measurements;

    fn sgx_claims() -> Claims {
        Claims {
            tee: Tee::Sgx,
            measurements: Measurements {
                mrenclave: Some("33d8".repeat(16)),
                mrsigner: Some("815f".repeat(16)),
                isvprodid: Some(0),
                isvsvn: Some(2),
                ..Measurements::default()
            },
            debug: false,
            tcb_status: "UpToDate".into(),
            advisory_ids: vec![],
            report_data: "00".repeat(64),
        }
    }

    fn allow_enclave() -> AllowedMeasurement {
        AllowedMeasurement {
            tee: Some(Tee::Sgx),
            mrenclave: Some("33D8".repeat(16)),
            ..AllowedMeasurement::default()
        }
    }

    #[test]
    fn strict_policy_accepts_only_matching_up_to_date_release_runtimes() {
        let policy = Policy::strict(vec![allow_enclave()]);
        assert_eq!(policy.evaluate(&sgx_claims()), Ok(()));

        let mut c = sgx_claims();
        c.tcb_status = "SWHardeningNeeded".into();
        assert_eq!(
            policy.evaluate(&c),
            Err(PolicyViolation::TcbStatus("SWHardeningNeeded".into()))
        );
        let mut c = sgx_claims();
        c.debug = true;
        assert_eq!(policy.evaluate(&c), Err(PolicyViolation::Debug));
        let mut c = sgx_claims();
        c.advisory_ids = vec!["INTEL-SA-00615".into()];
        assert!(matches!(
            policy.evaluate(&c),
            Err(PolicyViolation::Advisories(_))
        ));
        let mut c = sgx_claims();
        c.measurements.mrenclave = Some("00".repeat(32));
        assert!(matches!(
            policy.evaluate(&c),
            Err(PolicyViolation::Measurement(_))
        ));
        let mut c = sgx_claims();
        c.tee = Tee::Sim;
        assert_eq!(
            policy.evaluate(&c),
            Err(PolicyViolation::SimulationNotAllowed)
        );
        assert_eq!(
            Policy::strict(vec![]).evaluate(&sgx_claims()),
            Err(PolicyViolation::NoAllowedMeasurements)
        );
    }

    #[test]
    fn widening_is_explicit_per_field() {
        let mut policy = Policy::strict(vec![allow_enclave()]);
        policy
            .accepted_tcb_statuses
            .push("ConfigurationAndSWHardeningNeeded".into());
        policy.accepted_advisories = vec!["INTEL-SA-00289".into(), "INTEL-SA-00615".into()];
        let mut c = sgx_claims();
        c.tcb_status = "ConfigurationAndSWHardeningNeeded".into();
        c.advisory_ids = vec!["INTEL-SA-00289".into(), "INTEL-SA-00615".into()];
        assert_eq!(policy.evaluate(&c), Ok(()));
        c.advisory_ids.push("INTEL-SA-00999".into());
        assert_eq!(
            policy.evaluate(&c),
            Err(PolicyViolation::Advisories(vec!["INTEL-SA-00999".into()]))
        );
        policy.allow_debug = true;
        let mut c = sgx_claims();
        c.debug = true;
        assert_eq!(policy.evaluate(&c), Ok(()));
    }

    #[test]
    fn measurement_fields_all_have_to_match() {
        let entry = AllowedMeasurement {
            tee: Some(Tee::Sgx),
            mrsigner: Some("815f".repeat(16)),
            isvprodid: Some(0),
            min_isvsvn: Some(2),
            ..AllowedMeasurement::default()
        };
        assert!(entry.matches(&sgx_claims()));
        let mut c = sgx_claims();
        c.measurements.isvsvn = Some(1);
        assert!(!entry.matches(&c), "an older ISVSVN must not match");
        let mut c = sgx_claims();
        c.measurements.isvprodid = Some(1);
        assert!(!entry.matches(&c));
        let tdx_entry = AllowedMeasurement {
            mrtd: Some("ab".repeat(48)),
            ..AllowedMeasurement::default()
        };
        assert!(!tdx_entry.matches(&sgx_claims()), "SGX claims have no MRTD");
    }

    #[test]
    fn policies_parse_from_json_with_strict_defaults() {
        let policy: Policy = serde_json::from_str(
            r#"{"allowed": [{"tee": "sgx", "mrenclave": "33d8"}], "allow_debug": false}"#,
        )
        .unwrap();
        assert_eq!(policy.accepted_tcb_statuses, ["UpToDate"]);
        assert!(!policy.allow_simulation);
        assert!(
            serde_json::from_str::<Policy>(r#"{"allowed": [], "allow_everything": true}"#).is_err()
        );
    }

    #[test]
    fn a_policy_that_allows_simulation_names_its_platforms() {
        let sim = AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some("ab".repeat(32)),
            ..AllowedMeasurement::default()
        };
        let refused = Policy::for_runtime(&sim, &[]).unwrap_err();
        assert!(refused.0.contains("sim_platforms"), "{refused}");
        let policy = Policy::for_runtime(&sim, &[[7u8; 32]]).unwrap();
        assert!(policy.allow_simulation);
        assert_eq!(policy.sim_platforms, ["07".repeat(32)]);
        assert_eq!(policy.sim_platform_keys().unwrap(), [[7u8; 32]]);

        let mut open = policy.clone();
        open.sim_platforms.clear();
        assert!(open.check().is_err());
        open.sim_platforms = vec!["07".repeat(31)];
        assert!(open.check().unwrap_err().0.contains("32-byte"));
        // A DCAP policy serializes as before: no empty list.
        let sgx = Policy::strict(vec![allow_enclave()]);
        assert!(
            !serde_json::to_string(&sgx)
                .unwrap()
                .contains("sim_platforms")
        );
        assert_eq!(sgx.check(), Ok(()));
    }
}
