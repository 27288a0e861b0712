//! AES-256-GCM sealing shared by the embedded KMS and the KMS server: keys and secrets at rest,
//! and data keys wrapped under primary keys.
//!
//! A sealed value is `nonce (12 random bytes) || ciphertext || tag (16 bytes)`; callers bind it
//! to its use with [`binding`] as associated data and may add their own version prefix.

use ring::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + 16;

/// `N` random bytes from the operating system, or `None` if its generator failed.
pub fn random<const N: usize>() -> Option<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).ok()?;
    Some(out)
}

/// Seals `plaintext` under `key` with a fresh random nonce, appending to `out`.
/// Fails only if the random generator fails.
pub fn seal_into(key: &LessSafeKey, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let nonce = random::<NONCE_LEN>()?;
    out.reserve(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .ok()?;
    out.extend_from_slice(tag.as_ref());
    Some(())
}

/// Opens what [`seal_into`] appended; `None` if it does not authenticate.
pub fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut body = Zeroizing::new(body.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .ok()?
        .len();
    body.truncate(len);
    Some(body)
}

/// Associated data binding a sealed value to its use: `prefix`, then each part preceded by its
/// length as a big-endian u32 (so no two part lists give the same bytes).
pub fn binding(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A random identifier in the 8-4-4-4-12 hex form of a UUID.
pub fn uuid_like(bytes: [u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
