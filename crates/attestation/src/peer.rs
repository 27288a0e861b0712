//! Verifying a service's evidence about itself (`docs/attestation.md` §8 and §9): before a
//! client sends credentials or wrapped keys to a KMS, it challenges the KMS (`GenerateQuote`)
//! and judges the quote by its own policy for the KMS; before an owner sends a sealed KMS its
//! root key (`Unseal`), it does the same.
//!
//! The quote's report data ([`kms_quote_report_data`]) binds the client's challenge, the
//! SHA-256 of the TLS certificate the KMS serves, the KMS's id and its [`KmsKeyState`]: the
//! public unseal key of a sealed KMS, or the [`kms_root_id`] of the root key an unsealed one
//! holds. A client compares it with the certificate of its own connection, so a host that
//! relays the real KMS's quote through a TLS endpoint of its own, or answers with another
//! KMS's quote, is refused; and a client that pins root ids refuses a genuine KMS that a host
//! unsealed with a root key of its own.

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
/// HKDF-SHA256 `info` of [`kms_root_id`].
pub const ROOT_ID_INFO: &[u8] = b"ppml-kms-server/v1 root id";
/// Domain separation prefix of [`unseal_aad`].
pub const UNSEAL_DOMAIN: &[u8] = b"ppml-kms-unseal/1";

/// Whether a KMS holds a root key, as its quote states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmsKeyState {
    /// No root key yet: an owner may send one sealed to this X25519 public key.
    Sealed {
        /// The KMS's unseal key, fresh at each start and never stored.
        unseal_key: [u8; 32],
    },
    /// The KMS holds the root key with this id.
    Unsealed {
        /// [`kms_root_id`] of the root key.
        root_id: [u8; 32],
    },
}

/// The public id of a KMS root key: HKDF-SHA256(salt = empty, ikm = root key, info =
/// `ppml-kms-server/v1 root id`), 32 bytes. It tells root keys apart and reveals nothing of
/// the key; whoever holds the key can compute it, so an owner pins it in the KMS policy.
pub fn kms_root_id(root_key: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
        .extract(root_key)
        .expand(&[ROOT_ID_INFO], ring::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 with a 32-byte output");
    out
}

/// The HPKE additional data of an `Unseal`: `"ppml-kms-unseal/1" ‖ unseal_key`, so a sealed
/// root key opens only as an unseal, at the KMS start that made this unseal key.
pub fn unseal_aad(unseal_key: &[u8; 32]) -> Vec<u8> {
    [UNSEAL_DOMAIN, unseal_key.as_slice()].concat()
}

/// The report data of a KMS's quote over `challenge`: `SHA-512("ppml-kms-quote/1" ‖ u32
/// len(challenge) ‖ challenge ‖ SHA-256(TLS certificate DER) ‖ u32 len(kms_id) ‖ kms_id ‖
/// state)`, lengths big-endian, where `state` is `0x00 ‖ unseal key` for a sealed KMS and
/// `0x01 ‖ root id` for an unsealed one. A KMS serving plain HTTP (loopback only) binds 32
/// zero bytes as its certificate digest; a sealed KMS, whose store is not open, binds an empty
/// `kms_id`.
pub fn kms_quote_report_data(
    challenge: &[u8],
    tls_cert_sha256: &[u8; 32],
    kms_id: &str,
    state: &KmsKeyState,
) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(KMS_QUOTE_DOMAIN);
    ctx.update(&(challenge.len() as u32).to_be_bytes());
    ctx.update(challenge);
    ctx.update(tls_cert_sha256);
    ctx.update(&(kms_id.len() as u32).to_be_bytes());
    ctx.update(kms_id.as_bytes());
    match state {
        KmsKeyState::Sealed { unseal_key } => {
            ctx.update(&[0]);
            ctx.update(unseal_key);
        }
        KmsKeyState::Unsealed { root_id } => {
            ctx.update(&[1]);
            ctx.update(root_id);
        }
    }
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

    const ROOT: KmsKeyState = KmsKeyState::Unsealed { root_id: [3; 32] };

    #[test]
    fn report_data_binds_every_field() {
        let data = |challenge: &[u8], cert: u8, kms_id: &str, state: &KmsKeyState| {
            kms_quote_report_data(challenge, &[cert; 32], kms_id, state)
        };
        let base = data(b"challenge-0123456", 1, "ppml-kms:a", &ROOT);
        for other in [
            data(b"challenge-0123457", 1, "ppml-kms:a", &ROOT),
            data(b"challenge-0123456", 2, "ppml-kms:a", &ROOT),
            data(b"challenge-0123456", 1, "ppml-kms:b", &ROOT),
            data(
                b"challenge-0123456",
                1,
                "ppml-kms:a",
                &KmsKeyState::Unsealed { root_id: [4; 32] },
            ),
            data(
                b"challenge-0123456",
                1,
                "ppml-kms:a",
                &KmsKeyState::Sealed {
                    unseal_key: [3; 32],
                },
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn root_ids_tell_root_keys_apart() {
        assert_eq!(kms_root_id(&[1; 32]), kms_root_id(&[1; 32]));
        assert_ne!(kms_root_id(&[1; 32]), kms_root_id(&[2; 32]));
        assert_ne!(kms_root_id(&[1; 32]), [1; 32]);
    }

    #[test]
    fn a_peer_quote_is_judged_by_the_clients_policy_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::load_or_create(dir.path().join("p.pk8")).unwrap();
        let key = hex::encode(platform.public_key());
        let tee = SimTee::new(platform);
        let bound = kms_quote_report_data(&[7; 32], &[1; 32], "ppml-kms:x", &ROOT);
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
        let relayed = kms_quote_report_data(&[7; 32], &[9; 32], "ppml-kms:x", &ROOT);
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
