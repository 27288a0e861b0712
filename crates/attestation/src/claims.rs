//! The normalised claims document: what a verified piece of evidence says about the runtime
//! that produced it, in the same shape for every TEE (`docs/attestation.md`).

use serde::{Deserialize, Serialize};

/// The kind of trusted execution environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tee {
    /// Intel SGX enclave (DCAP quote v3).
    Sgx,
    /// Intel TDX trust domain (DCAP quote v4).
    Tdx,
    /// ppml's simulated TEE, for development: accepted only by policies that allow it.
    Sim,
}

impl std::fmt::Display for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tee::Sgx => "sgx",
            Tee::Tdx => "tdx",
            Tee::Sim => "sim",
        })
    }
}

impl std::str::FromStr for Tee {
    type Err = String;
    /// The name [`Tee`]'s `Display` writes: `sgx`, `tdx` or `sim`.
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "sgx" => Ok(Tee::Sgx),
            "tdx" => Ok(Tee::Tdx),
            "sim" => Ok(Tee::Sim),
            other => Err(format!("unknown TEE {other:?} (sgx, tdx or sim)")),
        }
    }
}

/// Measurements, as lowercase hex. Fields that a TEE does not have are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurements {
    /// SGX MRENCLAVE (32 bytes); for `sim`, the SHA-256 of the executable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mrenclave: Option<String>,
    /// SGX MRSIGNER (32 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mrsigner: Option<String>,
    /// SGX ISVPRODID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isvprodid: Option<u16>,
    /// SGX ISVSVN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isvsvn: Option<u16>,
    /// TDX MRTD (48 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mrtd: Option<String>,
    /// TDX RTMR0..3 (48 bytes each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtmr: Option<[String; 4]>,
}

/// What verified evidence says. Produced only by verifiers; policies judge it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Which TEE produced the evidence.
    pub tee: Tee,
    /// The runtime's measurements.
    pub measurements: Measurements,
    /// Whether the TEE runs in debug mode (its memory is then readable by the host).
    pub debug: bool,
    /// TCB status from the collateral, e.g. `UpToDate`, `SWHardeningNeeded`; `Simulated` for
    /// `sim`.
    pub tcb_status: String,
    /// Intel security advisories that apply to the platform's TCB level.
    pub advisory_ids: Vec<String>,
    /// The 64 bytes of report data bound into the evidence, hex.
    pub report_data: String,
}

impl Claims {
    /// The report data as bytes.
    pub fn report_data_bytes(&self) -> Option<[u8; 64]> {
        hex::decode(&self.report_data).ok()?.try_into().ok()
    }
}
