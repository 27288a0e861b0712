// Randomness comes from the operating system through ring (getrandom): AWS-LC's generator
// seeds a CPU-jitter entropy source on first use, which costs ~15 ms per process here.
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::FormatError;

/// Length in bytes of a data key.
pub const DATA_KEY_LEN: usize = 32;

/// A 256-bit data key in plaintext. Zeroed on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; DATA_KEY_LEN]);

impl DataKey {
    /// Wraps raw key bytes (for KMS implementations).
    pub fn from_bytes(bytes: [u8; DATA_KEY_LEN]) -> Self {
        DataKey(bytes)
    }

    /// Copies a key from a slice, which must be exactly [`DATA_KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, FormatError> {
        let arr: [u8; DATA_KEY_LEN] = bytes.try_into().map_err(|_| {
            FormatError::InvalidParameter(format!(
                "a data key is {DATA_KEY_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(DataKey(arr))
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, FormatError> {
        let mut bytes = [0u8; DATA_KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| FormatError::Random)?;
        Ok(DataKey(bytes))
    }

    /// The raw key bytes (for KMS implementations that wrap the key).
    pub fn expose_secret(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// Where a file's data key comes from: which KMS, which primary key, and the data key wrapped
/// (encrypted) under that primary key. Safe to store and print: it holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyReference {
    /// Identifier of the KMS that wrapped the key, e.g. `local:9f3c…` or `ehsm:https://host`.
    pub kms: String,
    /// Identifier of the primary key within that KMS.
    pub key_id: String,
    /// The data key, wrapped by the KMS; opaque to this crate.
    pub wrapped: Vec<u8>,
}

impl KeyReference {
    /// Builds a key reference.
    pub fn new(kms: impl Into<String>, key_id: impl Into<String>, wrapped: Vec<u8>) -> Self {
        KeyReference {
            kms: kms.into(),
            key_id: key_id.into(),
            wrapped,
        }
    }
}

/// Fills `out` with random bytes from the operating system.
pub(crate) fn random_bytes(out: &mut [u8]) -> Result<(), FormatError> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| FormatError::Random)
}
