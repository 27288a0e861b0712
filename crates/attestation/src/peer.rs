//! Verifying a service's evidence about itself (`docs/attestation.md` §7): before a client
//! sends credentials or wrapped keys to a KMS, it challenges the KMS (`GenerateQuote`) and
//! judges the quote by its own policy for the KMS.
//!
//! The quote's report data ([`kms_quote_report_data`]) binds the client's challenge, the
//! SHA-256 of the TLS certificate the KMS serves and the KMS's id. A client compares it with
//! the certificate of its own connection, so a host that relays the real KMS's quote through a
//! TLS endpoint of its own, or answers with another KMS's quote, is refused.

use ring::digest;

use crate::claims::Claims;
use crate::dcap::Collateral;
use crate::evidence::Evidence;
use crate::policy::Policy;
use crate::service::{AttestError, check_binding, verify_dcap_as, verify_sim_under};

/// Domain separation prefix of [`kms_quote_report_data`].
pub const KMS_QUOTE_DOMAIN: &[u8] = b"ppml-kms-quote/1";
/// Shortest challenge a KMS answers, in bytes.
pub const MIN_CHALLENGE_LEN: usize = 16;
/// Longest challenge a KMS answers, in bytes.
pub const MAX_CHALLENGE_LEN: usize = 64;

/// The report data of a KMS's quote over `challenge`: `SHA-512("ppml-kms-quote/1" ‖ u32
/// len(challenge) ‖ challenge ‖ SHA-256(TLS certificate DER) ‖ u32 len(kms_id) ‖ kms_id)`,
/// lengths big-endian. A KMS serving plain HTTP (loopback only) binds 32 zero bytes as its
/// certificate digest.
pub fn kms_quote_report_data(
    challenge: &[u8],
    tls_cert_sha256: &[u8; 32],
    kms_id: &str,
) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(KMS_QUOTE_DOMAIN);
    ctx.update(&(challenge.len() as u32).to_be_bytes());
    ctx.update(challenge);
    ctx.update(tls_cert_sha256);
    ctx.update(&(kms_id.len() as u32).to_be_bytes());
    ctx.update(kms_id.as_bytes());
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Verifies a peer's `evidence`, checks that its report data is `expected_report_data`, and
/// judges its claims by `policy`. Simulated evidence is verified with the policy's
/// `sim_platforms`; SGX and TDX quotes need `collateral` for their platform.
pub fn verify_peer_evidence(
    evidence: &Evidence,
    expected_report_data: &[u8; 64],
    policy: &Policy,
    collateral: Option<&Collateral>,
    now: u64,
) -> Result<Claims, AttestError> {
    let claims = match evidence.tee {
        crate::Tee::Sim => verify_sim_under(&evidence.quote, policy)?,
        tee => {
            let collateral = collateral.ok_or(AttestError::NoCollateral(tee))?;
            verify_dcap_as(tee, &evidence.quote, collateral, now)?
        }
    };
    check_binding(&claims, expected_report_data)?;
    policy.evaluate(&claims)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::EvidenceProvider as _;
    use crate::policy::AllowedMeasurement;
    use crate::sim::{SimPlatform, SimTee, executable_measurement};

    #[test]
    fn report_data_binds_every_field() {
        let base = kms_quote_report_data(b"challenge-0123456", &[1; 32], "ppml-kms:a");
        assert_ne!(
            base,
            kms_quote_report_data(b"challenge-0123457", &[1; 32], "ppml-kms:a")
        );
        assert_ne!(
            base,
            kms_quote_report_data(b"challenge-0123456", &[2; 32], "ppml-kms:a")
        );
        assert_ne!(
            base,
            kms_quote_report_data(b"challenge-0123456", &[1; 32], "ppml-kms:b")
        );
    }

    #[test]
    fn a_peer_quote_is_judged_by_the_clients_policy_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::load_or_create(dir.path().join("p.pk8")).unwrap();
        let key = hex::encode(platform.public_key());
        let tee = SimTee::new(platform);
        let bound = kms_quote_report_data(&[7; 32], &[1; 32], "ppml-kms:x");
        let evidence = tee.evidence(&bound).unwrap();
        let mut policy = Policy::strict(vec![AllowedMeasurement {
            tee: Some(crate::Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }]);
        policy.allow_simulation = true;
        policy.sim_platforms = vec![key];
        verify_peer_evidence(&evidence, &bound, &policy, None, 0).unwrap();

        // Another certificate than the one the quote binds (a relay).
        let relayed = kms_quote_report_data(&[7; 32], &[9; 32], "ppml-kms:x");
        assert!(matches!(
            verify_peer_evidence(&evidence, &relayed, &policy, None, 0),
            Err(AttestError::Binding)
        ));
        // Another binary than the policy names.
        let mut other = policy.clone();
        other.allowed[0].mrenclave = Some("00".repeat(32));
        assert!(matches!(
            verify_peer_evidence(&evidence, &bound, &other, None, 0),
            Err(AttestError::Policy(_))
        ));
        // A platform the policy does not name.
        let mut other = policy.clone();
        other.sim_platforms = vec!["07".repeat(32)];
        assert!(matches!(
            verify_peer_evidence(&evidence, &bound, &other, None, 0),
            Err(AttestError::Evidence(_))
        ));
    }
}
