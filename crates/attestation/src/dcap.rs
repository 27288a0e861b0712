//! SGX (quote v3) and TDX (quote v4) DCAP quote verification, in pure Rust with
//! [dcap-qvl](https://github.com/Phala-Network/dcap-qvl): the quote's signature chain up to
//! Intel's root CA, the QE report, the collateral (TCB info, QE identity, CRLs) and the TCB
//! level matching. The result is reduced to [`Claims`]; judging them is the policy's job
//! ([`crate::policy`]), so debug enclaves and every TCB status get through here.

use std::path::Path;

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::quote::Report;
use dcap_qvl::verify::QuoteVerifier;
use serde::{Deserialize, Serialize};

use crate::claims::{Claims, Measurements, Tee};

/// Why a quote did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DcapError {
    /// The collateral file cannot be read or parsed.
    #[error("collateral {path}: {reason}")]
    Collateral {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// dcap-qvl rejected the quote: bad signature or certificate chain, revoked, expired or
    /// not yet valid collateral, unparseable quote.
    #[error("the quote does not verify: {0}")]
    Verification(String),
    /// The quote verified but is of a kind ppml does not handle.
    #[error("unsupported quote: {0}")]
    Unsupported(String),
}

/// Collateral as JSON, the byte fields hex encoded (the format of dcap-qvl's samples and of
/// `ppml attest collateral`): `pck_crl_issuer_chain`, `root_ca_crl`, `pck_crl`,
/// `tcb_info_issuer_chain`, `tcb_info`, `tcb_info_signature`, `qe_identity_issuer_chain`,
/// `qe_identity`, `qe_identity_signature`, and optionally `pck_certificate_chain`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CollateralJson {
    pck_crl_issuer_chain: String,
    root_ca_crl: String,
    pck_crl: String,
    tcb_info_issuer_chain: String,
    tcb_info: String,
    tcb_info_signature: String,
    qe_identity_issuer_chain: String,
    qe_identity: String,
    qe_identity_signature: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pck_certificate_chain: Option<String>,
}

/// Verification collateral for one platform (offline form).
#[derive(Clone, Debug)]
pub struct Collateral(QuoteCollateralV3);

impl Collateral {
    /// Parses collateral JSON (see `CollateralJson` for the fields).
    pub fn from_json(text: &str, origin: &str) -> Result<Self, DcapError> {
        let fail = |reason: String| DcapError::Collateral {
            path: origin.to_string(),
            reason,
        };
        let json: CollateralJson =
            serde_json::from_str(text).map_err(|e| fail(format!("not collateral JSON: {e}")))?;
        let bytes = |name: &str, value: &str| {
            hex::decode(value).map_err(|e| fail(format!("{name} is not hex: {e}")))
        };
        Ok(Collateral(QuoteCollateralV3 {
            root_ca_crl: bytes("root_ca_crl", &json.root_ca_crl)?,
            pck_crl: bytes("pck_crl", &json.pck_crl)?,
            tcb_info_signature: bytes("tcb_info_signature", &json.tcb_info_signature)?,
            qe_identity_signature: bytes("qe_identity_signature", &json.qe_identity_signature)?,
            pck_crl_issuer_chain: json.pck_crl_issuer_chain,
            tcb_info_issuer_chain: json.tcb_info_issuer_chain,
            tcb_info: json.tcb_info,
            qe_identity_issuer_chain: json.qe_identity_issuer_chain,
            qe_identity: json.qe_identity,
            pck_certificate_chain: json.pck_certificate_chain,
        }))
    }

    /// Wraps collateral obtained elsewhere (e.g. fetched from a PCCS).
    pub fn from_parts(collateral: QuoteCollateralV3) -> Self {
        Collateral(collateral)
    }

    /// The earliest `nextUpdate` of the TCB info and QE identity, in Unix seconds: after it
    /// the collateral no longer verifies and must be replaced.
    pub fn next_update(&self) -> Option<u64> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct NextUpdate {
            next_update: String,
        }
        let parse = |json: &str| -> Option<u64> {
            let doc: NextUpdate = serde_json::from_str(json).ok()?;
            let when = chrono::DateTime::parse_from_rfc3339(&doc.next_update).ok()?;
            u64::try_from(when.timestamp()).ok()
        };
        Some(parse(&self.0.tcb_info)?.min(parse(&self.0.qe_identity)?))
    }

    /// The collateral as JSON, in the format [`Collateral::from_json`] reads.
    pub fn to_json(&self) -> String {
        let c = &self.0;
        let json = CollateralJson {
            pck_crl_issuer_chain: c.pck_crl_issuer_chain.clone(),
            root_ca_crl: hex::encode(&c.root_ca_crl),
            pck_crl: hex::encode(&c.pck_crl),
            tcb_info_issuer_chain: c.tcb_info_issuer_chain.clone(),
            tcb_info: c.tcb_info.clone(),
            tcb_info_signature: hex::encode(&c.tcb_info_signature),
            qe_identity_issuer_chain: c.qe_identity_issuer_chain.clone(),
            qe_identity: c.qe_identity.clone(),
            qe_identity_signature: hex::encode(&c.qe_identity_signature),
            pck_certificate_chain: c.pck_certificate_chain.clone(),
        };
        serde_json::to_string_pretty(&json).expect("collateral JSON")
    }

    /// Reads collateral JSON from a file.
    pub fn from_file(path: &Path) -> Result<Self, DcapError> {
        let text = std::fs::read_to_string(path).map_err(|e| DcapError::Collateral {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text, &path.display().to_string())
    }
}

/// SGX ATTRIBUTES.FLAGS bit 1: the enclave is a debug enclave.
const SGX_FLAGS_DEBUG: u8 = 0x02;
/// TDX TD_ATTRIBUTES bit 0: the TD is a debug TD.
const TDX_ATTRIBUTES_DEBUG: u8 = 0x01;

/// Verifies `quote` against `collateral` as of `now_unix` (seconds) with Intel's production
/// root CA, and returns its claims. Any TCB status and debug mode are reported, not refused.
pub fn verify_quote(
    quote: &[u8],
    collateral: &Collateral,
    now_unix: u64,
) -> Result<Claims, DcapError> {
    let report = QuoteVerifier::new_prod()
        .allow_debug(true)
        .verify(quote, &collateral.0, now_unix)
        .map_err(|e| DcapError::Verification(format!("{e:#}")))?;
    let (tee, measurements, debug, report_data) = match &report.report {
        Report::SgxEnclave(enclave) => (
            Tee::Sgx,
            Measurements {
                mrenclave: Some(hex::encode(enclave.mr_enclave)),
                mrsigner: Some(hex::encode(enclave.mr_signer)),
                isvprodid: Some(enclave.isv_prod_id),
                isvsvn: Some(enclave.isv_svn),
                ..Measurements::default()
            },
            enclave.attributes[0] & SGX_FLAGS_DEBUG != 0,
            enclave.report_data,
        ),
        other => {
            let td = other
                .as_td10()
                .ok_or_else(|| DcapError::Unsupported("neither SGX nor TDX".into()))?;
            (
                Tee::Tdx,
                Measurements {
                    mrtd: Some(hex::encode(td.mr_td)),
                    rtmr: Some([
                        hex::encode(td.rt_mr0),
                        hex::encode(td.rt_mr1),
                        hex::encode(td.rt_mr2),
                        hex::encode(td.rt_mr3),
                    ]),
                    ..Measurements::default()
                },
                td.td_attributes[0] & TDX_ATTRIBUTES_DEBUG != 0,
                td.report_data,
            )
        }
    };
    Ok(Claims {
        tee,
        measurements,
        debug,
        tcb_status: report.status,
        advisory_ids: report.advisory_ids,
        report_data: hex::encode(report_data),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// 2025-07-01T00:00:00Z, inside both fixtures' collateral validity windows.
    const FIXTURE_TIME: u64 = 1_751_328_000;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("testdata")
        .join(name)
    }

    fn load(tee: &str) -> (Vec<u8>, Collateral) {
        let quote = std::fs::read(fixture(&format!("{tee}_quote"))).unwrap();
        let collateral =
            Collateral::from_file(&fixture(&format!("{tee}_quote_collateral.json"))).unwrap();
        (quote, collateral)
    }

    #[test]
    fn sgx_fixture_verifies_to_the_expected_claims() {
        let (quote, collateral) = load("sgx");
        let claims = verify_quote(&quote, &collateral, FIXTURE_TIME).unwrap();
        assert_eq!(claims.tee, Tee::Sgx);
        assert_eq!(
            claims.measurements.mrenclave.as_deref(),
            Some("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
        );
        assert_eq!(
            claims.measurements.mrsigner.as_deref(),
            Some("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
        );
        assert_eq!(claims.measurements.isvprodid, Some(0));
        assert_eq!(claims.measurements.isvsvn, Some(0));
        assert!(!claims.debug);
        assert_eq!(claims.tcb_status, "ConfigurationAndSWHardeningNeeded");
        let mut advisories = claims.advisory_ids.clone();
        advisories.sort();
        assert_eq!(advisories, ["INTEL-SA-00289", "INTEL-SA-00615"]);
        let mut expected = [0u8; 64];
        expected[..13].copy_from_slice(b"Hello, world!");
        assert_eq!(claims.report_data_bytes(), Some(expected));
    }

    #[test]
    fn tdx_fixture_verifies_to_the_expected_claims() {
        let (quote, collateral) = load("tdx");
        let claims = verify_quote(&quote, &collateral, FIXTURE_TIME).unwrap();
        assert_eq!(claims.tee, Tee::Tdx);
        assert_eq!(
            claims.measurements.mrtd.as_deref(),
            Some(
                "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
            )
        );
        assert!(claims.measurements.rtmr.is_some());
        assert!(claims.measurements.mrenclave.is_none());
        assert_eq!(claims.tcb_status, "UpToDate");
        assert!(claims.advisory_ids.is_empty());
    }

    #[test]
    fn flipped_bytes_and_wrong_times_are_rejected() {
        for tee in ["sgx", "tdx"] {
            let (quote, collateral) = load(tee);
            // Header, report body (measurements, report data), signature, QE report and the
            // PCK certificate chain. (Zero padding after the certification data, as the TDX
            // fixture has, is outside every signed or parsed structure.)
            for at in [8, 100, 200, 400, 500, 600, 640, 700, 1000, quote.len() / 2] {
                let mut bad = quote.clone();
                bad[at] ^= 0x01;
                assert!(
                    verify_quote(&bad, &collateral, FIXTURE_TIME).is_err(),
                    "{tee}: flipped byte {at} was accepted"
                );
            }
            for cut in [0, 47, 600, quote.len() / 2] {
                assert!(
                    verify_quote(&quote[..cut], &collateral, FIXTURE_TIME).is_err(),
                    "{tee}: truncated at {cut} was accepted"
                );
            }
            // Before and after the collateral's validity window.
            for when in [1_700_000_000, 1_760_000_000] {
                let err = verify_quote(&quote, &collateral, when).unwrap_err();
                assert!(matches!(err, DcapError::Verification(_)), "{tee}: {err}");
            }
        }
    }

    #[test]
    fn a_quote_does_not_verify_with_the_other_platforms_collateral() {
        let (sgx_quote, _) = load("sgx");
        let (_, tdx_collateral) = load("tdx");
        assert!(verify_quote(&sgx_quote, &tdx_collateral, FIXTURE_TIME).is_err());
    }

    #[test]
    fn malformed_collateral_is_a_specific_error() {
        let err = Collateral::from_json("{}", "c.json").unwrap_err();
        assert!(err.to_string().starts_with("collateral c.json: "), "{err}");
        let text = std::fs::read_to_string(fixture("sgx_quote_collateral.json")).unwrap();
        let broken = text.replacen("\"root_ca_crl\": \"", "\"root_ca_crl\": \"zz", 1);
        let broken = if broken == text {
            text.replacen("\"root_ca_crl\":\"", "\"root_ca_crl\":\"zz", 1)
        } else {
            broken
        };
        let err = Collateral::from_json(&broken, "c.json").unwrap_err();
        assert!(err.to_string().contains("root_ca_crl is not hex"), "{err}");
    }
}
