//! Key release to an attested runtime: the KMS encrypts a data key to the runtime's public key
//! with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20-Poly1305; the `hpke` crate), so the key never crosses the wire in plaintext and only
//! the process holding the private key, the one whose evidence was verified, can open it.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

/// HPKE `info` of every release: binds the ciphertext to this use.
pub const RELEASE_INFO: &[u8] = b"ppml key release v1";

/// Why sealing or opening a released key failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The runtime public key or encapsulated key is not a valid X25519 key.
    #[error("invalid X25519 public key")]
    PublicKey,
    /// The ciphertext does not open with this runtime key and aad.
    #[error("the released key does not open with this runtime key")]
    Open,
    /// HPKE failed to seal.
    #[error("HPKE seal failed")]
    Seal,
}

/// A runtime's ephemeral key pair; the private half never leaves the process and is zeroed on
/// drop (by the `hpke` crate's key type).
pub struct RuntimeKey {
    private: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: <X25519HkdfSha256 as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for RuntimeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeKey")
            .field("public", &hex::encode(self.public_bytes()))
            .finish_non_exhaustive()
    }
}

impl RuntimeKey {
    /// A fresh key pair from the thread-local CSPRNG (seeded from the OS).
    pub fn generate() -> Self {
        let (private, public) = X25519HkdfSha256::gen_keypair(&mut rand::rng());
        RuntimeKey { private, public }
    }

    /// The public key, 32 bytes: what the evidence's report data binds and the KMS seals to.
    pub fn public_bytes(&self) -> Vec<u8> {
        self.public.to_bytes().to_vec()
    }

    /// Opens a key released by [`seal_to`].
    pub fn open(
        &self,
        encapsulated: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ReleaseError> {
        let encapped = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(encapsulated)
            .map_err(|_| ReleaseError::PublicKey)?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.private,
            &encapped,
            RELEASE_INFO,
            ciphertext,
            aad,
        )
        .map(Zeroizing::new)
        .map_err(|_| ReleaseError::Open)
    }
}

/// Encrypts `secret` to the runtime key `public`; returns (encapsulated key, ciphertext).
pub fn seal_to(
    public: &[u8],
    secret: &[u8],
    aad: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), ReleaseError> {
    let public = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(public)
        .map_err(|_| ReleaseError::PublicKey)?;
    let (encapped, ciphertext) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
            &OpModeS::Base,
            &public,
            RELEASE_INFO,
            secret,
            aad,
            &mut rand::rng(),
        )
        .map_err(|_| ReleaseError::Seal)?;
    Ok((encapped.to_bytes().to_vec(), ciphertext))
}

/// A runtime's receipt signing key (Ed25519, `docs/receipts.md`): made in the runtime once
/// per attested client, bound into every attestation's report data
/// ([`crate::service::expected_report_data_with_receipt_key`]), never written anywhere. The
/// PKCS#8 document it was made from is zeroed as soon as the key is parsed.
pub struct ReceiptKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptKey")
            .field("public", &hex::encode(self.public_bytes()))
            .finish_non_exhaustive()
    }
}

impl ReceiptKey {
    /// A fresh key from the system's random generator.
    pub fn generate() -> Result<Self, ReleaseError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Zeroizing::new(
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| ReleaseError::Seal)?
                .as_ref()
                .to_vec(),
        );
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| ReleaseError::Seal)?;
        Ok(ReceiptKey { pair })
    }

    /// The public key, 32 bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        use ring::signature::KeyPair as _;
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("an Ed25519 public key is 32 bytes")
    }

    /// The Ed25519 signature of `message`, 64 bytes.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runtime_key_opens_a_release() {
        let runtime = RuntimeKey::generate();
        let (enc, ct) = seal_to(&runtime.public_bytes(), &[7u8; 32], b"key-1").unwrap();
        assert_eq!(*runtime.open(&enc, &ct, b"key-1").unwrap(), [7u8; 32]);
        assert!(runtime.open(&enc, &ct, b"key-2").is_err(), "aad is bound");
        let other = RuntimeKey::generate();
        assert!(other.open(&enc, &ct, b"key-1").is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(runtime.open(&enc, &bad, b"key-1").is_err());
        assert!(seal_to(&[1, 2, 3], b"x", b"").is_err());
    }

    #[test]
    fn receipt_signatures_verify_with_the_public_key_only() {
        let key = ReceiptKey::generate().unwrap();
        let signature = key.sign(b"receipt");
        let public = key.public_bytes();
        let verify = |public: &[u8], message: &[u8]| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
                .verify(message, &signature)
                .is_ok()
        };
        assert!(verify(&public, b"receipt"));
        assert!(!verify(&public, b"receipts"));
        assert!(!verify(
            &ReceiptKey::generate().unwrap().public_bytes(),
            b"receipt"
        ));
    }
}
