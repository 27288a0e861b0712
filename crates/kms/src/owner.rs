//! The data owner's signing key: the authority that runtimes and hosts never hold.
//!
//! An app's api key signs every request (`docs/kms-api.md` §3), and it is handed to every
//! machine that runs the app's jobs, so it cannot be what decides how the app's keys are
//! protected. An app enrolled with an *owner key* (an Ed25519 public key, `Enroll`'s
//! `owner_key` parameter) additionally needs the owner's signature for the actions that change
//! a key's protection or state, or that would hand out a plaintext data key of a key marked
//! for attested release (`docs/kms-api.md` §4.1): a host holding the api key can use the keys
//! only as the owner allowed.
//!
//! The signature, `owner_sign` in the envelope, is Ed25519 over [`OWNER_SIGNATURE_CONTEXT`]
//! followed by the canonical string of the body without `sign` and `owner_sign` (the same
//! canonical form as the HMAC, §3). The body must name its action in its `action` field, so a
//! signed request is valid for that action only.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::KmsError;

/// Domain separation of owner signatures from every other use of Ed25519 in ppml.
pub const OWNER_SIGNATURE_CONTEXT: &[u8] = b"ppml owner request v1\0";

/// Name of the envelope field carrying the owner's signature.
pub const OWNER_SIGN_FIELD: &str = "owner_sign";

/// Name of the envelope field naming the action the body is signed for.
pub const ACTION_FIELD: &str = "action";

/// An owner key pair, loaded from a PKCS#8 file that only the owner's machine holds.
pub struct OwnerKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerKey")
            .field("public_key", &self.public_text())
            .finish()
    }
}

impl OwnerKey {
    /// A new random key pair and its PKCS#8 document (to be stored by the caller).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), KmsError> {
        let rng = ring::rand::SystemRandom::new();
        let document = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KmsError::Random)?;
        let pkcs8 = Zeroizing::new(document.as_ref().to_vec());
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// The key pair of a PKCS#8 v2 document (as [`OwnerKey::generate`] writes).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KmsError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|pair| OwnerKey { pair })
            .map_err(|e| KmsError::InvalidConfig(format!("not an Ed25519 PKCS#8 owner key: {e}")))
    }

    /// Reads the key from `path`.
    pub fn load(path: &Path) -> Result<Self, KmsError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| KmsError::storage(path, e))?);
        Self::from_pkcs8(&bytes)
            .map_err(|e| KmsError::InvalidConfig(format!("{}: {e}", path.display())))
    }

    /// Reads the key from `path`, or makes a new one there (mode 0600, written atomically).
    pub fn load_or_create(path: &Path) -> Result<Self, KmsError> {
        if path.exists() {
            return Self::load(path);
        }
        let (key, pkcs8) = Self::generate()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| KmsError::storage(dir, e))?;
        }
        crate::write_private_file_atomic(path, &pkcs8).map_err(|e| KmsError::storage(path, e))?;
        Ok(key)
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as `Enroll`'s `owner_key` parameter carries it (base64url, no padding).
    pub fn public_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public_key())
    }

    /// Signs `message` (callers prefix their own domain-separation context).
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Signs a request body (which must already hold `action`, and must not yet hold `sign`):
    /// the value of its `owner_sign` field.
    pub fn sign_request(&self, body: &Map<String, Value>) -> String {
        let signature = self.pair.sign(&owner_message(body));
        BASE64.encode(signature.as_ref())
    }
}

/// Parses an `owner_key` parameter: 32 bytes in base64url (padding optional).
pub fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let bytes = URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?;
    bytes.try_into().ok()
}

/// Whether `signature` (base64) is the owner signature of `body` by `public_key`.
pub fn verify_request(public_key: &[u8; 32], body: &Map<String, Value>, signature: &str) -> bool {
    let Ok(signature) = BASE64.decode(signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&owner_message(body), &signature)
        .is_ok()
}

/// What the owner signs: the context, then the canonical string of the body without `sign`
/// and `owner_sign`.
fn owner_message(body: &Map<String, Value>) -> Vec<u8> {
    let mut unsigned = body.clone();
    unsigned.remove(OWNER_SIGN_FIELD);
    unsigned.remove("sign");
    let mut message = OWNER_SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(crate::ehsm::canonical_string(&unsigned).as_bytes());
    message
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body() -> Map<String, Value> {
        json!({"appid": "A", "action": "SetKeyReleasePolicy",
               "payload": {"keyid": "K", "policyId": "P"}, "timestamp": "1690000000000"})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn a_signature_covers_the_action_and_the_payload() {
        let (owner, pkcs8) = OwnerKey::generate().unwrap();
        let public = parse_public_key(&owner.public_text()).unwrap();
        assert_eq!(public, owner.public_key());
        let mut signed = body();
        let signature = owner.sign_request(&signed);
        // The HMAC `sign` and the signature itself are outside the signed message.
        signed.insert("sign".into(), json!("hmac"));
        signed.insert(OWNER_SIGN_FIELD.into(), json!(signature.clone()));
        assert!(verify_request(&public, &signed, &signature));

        let mut other_action = signed.clone();
        other_action.insert(ACTION_FIELD.into(), json!("DeleteKey"));
        assert!(!verify_request(&public, &other_action, &signature));
        let mut other_policy = signed.clone();
        other_policy["payload"]["policyId"] = json!("Q");
        assert!(!verify_request(&public, &other_policy, &signature));
        let (stranger, _) = OwnerKey::generate().unwrap();
        assert!(!verify_request(&stranger.public_key(), &signed, &signature));
        assert!(!verify_request(&public, &signed, "not base64!"));
        // The stored document gives back the same key.
        let reloaded = OwnerKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(reloaded.public_key(), public);
    }

    #[test]
    fn keys_are_written_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.pk8");
        let created = OwnerKey::load_or_create(&path).unwrap();
        let loaded = OwnerKey::load_or_create(&path).unwrap();
        assert_eq!(created.public_key(), loaded.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            OwnerKey::load(&path),
            Err(KmsError::InvalidConfig(_))
        ));
        assert_eq!(parse_public_key("short"), None);
    }
}
