//! The server's store: apps and primary keys in a redb database, sealed under the root key.
//!
//! redb commits are durable when `commit` returns (it fsyncs), so a key whose CreateKey was
//! acknowledged survives a crash of the process or the machine.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ppml_kms::sealing::{self, binding, uuid_like};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ApiError;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const AAD_APIKEY: &[u8] = b"ppml-kms-server/v1 apikey\0";
const AAD_KEY: &[u8] = b"ppml-kms-server/v1 primary key\0";

/// The root key that seals everything in the store. Never written to the store or logged.
pub struct RootKey(LessSafeKey);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

impl RootKey {
    /// A root key from 64 hex characters.
    pub fn from_hex(hex_key: &str) -> Result<Self, String> {
        let bytes = Zeroizing::new(hex::decode(hex_key.trim()).map_err(|_| "root key is not hex")?);
        if bytes.len() != 32 {
            return Err("root key must be 32 bytes (64 hex characters)".into());
        }
        Ok(RootKey(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes).expect("32-byte key"),
        )))
    }

    /// A fresh random root key, returned with its hex form (to be saved by the caller).
    pub fn generate() -> Result<(Self, Zeroizing<String>), String> {
        let bytes = Zeroizing::new(random::<32>().map_err(|_| "random generator failed")?);
        let hex_key = Zeroizing::new(hex::encode(*bytes));
        Ok((Self::from_hex(&hex_key)?, hex_key))
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, ApiError> {
        seal(&self.0, aad, plaintext).map(|v| BASE64.encode(v))
    }

    fn open(&self, aad: &[u8], sealed: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let bytes = BASE64
            .decode(sealed)
            .map_err(|_| ApiError::Internal("corrupt sealed value".into()))?;
        open(&self.0, aad, &bytes).ok_or_else(|| {
            ApiError::Internal("sealed value does not open under the root key".into())
        })
    }
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], ApiError> {
    sealing::random().ok_or_else(|| ApiError::Internal("random generator failed".into()))
}

/// `nonce || AES-256-GCM(key, nonce, aad, plaintext) || tag` (see [`sealing`]).
pub(crate) fn seal(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    sealing::seal_into(key, aad, plaintext, &mut out)
        .ok_or_else(|| ApiError::Internal("seal failed".into()))?;
    Ok(out)
}

pub(crate) use sealing::open;

#[derive(Serialize, Deserialize)]
struct AppRecord {
    apikey_sealed: String,
    created_ms: u64,
}

/// A primary key as stored (its material sealed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Owning app.
    pub appid: String,
    /// eHSM key spec, e.g. `EH_AES_GCM_256`.
    pub keyspec: String,
    /// Whether the key may be used.
    pub enabled: bool,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    versions: Vec<String>,
}

impl KeyRecord {
    /// Key length in bytes for the spec.
    pub fn key_len(spec: &str) -> Option<usize> {
        match spec {
            "EH_AES_GCM_128" => Some(16),
            "EH_AES_GCM_192" => Some(24),
            "EH_AES_GCM_256" => Some(32),
            _ => None,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// The server's persistent state.
pub struct Store {
    db: Database,
    root: RootKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store `kms.redb` in `dir`.
    pub fn open(dir: &Path, root: RootKey) -> Result<Self, ApiError> {
        std::fs::create_dir_all(dir).map_err(internal)?;
        let db = Database::create(dir.join("kms.redb")).map_err(internal)?;
        let tx = db.begin_write().map_err(internal)?;
        tx.open_table(APPS).map_err(internal)?;
        tx.open_table(KEYS).map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(Store { db, root })
    }

    /// Registers a new app; returns its id and api key.
    pub fn enroll(&self, now_ms: u64) -> Result<(String, Zeroizing<String>), ApiError> {
        let appid = uuid_like(random::<16>()?);
        let apikey = Zeroizing::new(BASE64.encode(random::<24>()?));
        let record = AppRecord {
            apikey_sealed: self
                .root
                .seal(&binding(AAD_APIKEY, &[appid.as_bytes()]), apikey.as_bytes())?,
            created_ms: now_ms,
        };
        let tx = self.db.begin_write().map_err(internal)?;
        {
            let mut apps = tx.open_table(APPS).map_err(internal)?;
            let bytes = serde_json::to_vec(&record).map_err(internal)?;
            apps.insert(appid.as_str(), bytes.as_slice())
                .map_err(internal)?;
        }
        tx.commit().map_err(internal)?;
        Ok((appid, apikey))
    }

    /// The api key of `appid`, if the app exists.
    pub fn apikey(&self, appid: &str) -> Result<Option<Zeroizing<String>>, ApiError> {
        let tx = self.db.begin_read().map_err(internal)?;
        let apps = tx.open_table(APPS).map_err(internal)?;
        let Some(bytes) = apps.get(appid).map_err(internal)? else {
            return Ok(None);
        };
        let record: AppRecord = serde_json::from_slice(bytes.value()).map_err(internal)?;
        let plain = self.root.open(
            &binding(AAD_APIKEY, &[appid.as_bytes()]),
            &record.apikey_sealed,
        )?;
        let text = String::from_utf8(plain.to_vec()).map_err(internal)?;
        Ok(Some(Zeroizing::new(text)))
    }

    fn key_aad(keyid: &str, appid: &str, version: usize) -> Vec<u8> {
        binding(
            AAD_KEY,
            &[
                keyid.as_bytes(),
                appid.as_bytes(),
                &(version as u32).to_be_bytes(),
            ],
        )
    }

    /// Creates a primary key for `appid`; durable when this returns.
    pub fn create_key(&self, appid: &str, keyspec: &str, now_ms: u64) -> Result<String, ApiError> {
        let len = KeyRecord::key_len(keyspec).ok_or(ApiError::PayloadType)?;
        let keyid = uuid_like(random::<16>()?);
        let material = Zeroizing::new(random::<32>()?);
        let sealed = self
            .root
            .seal(&Self::key_aad(&keyid, appid, 0), &material[..len])?;
        let record = KeyRecord {
            appid: appid.to_string(),
            keyspec: keyspec.to_string(),
            enabled: true,
            created_ms: now_ms,
            versions: vec![sealed],
        };
        self.put_key(&keyid, &record)?;
        Ok(keyid)
    }

    fn put_key(&self, keyid: &str, record: &KeyRecord) -> Result<(), ApiError> {
        let tx = self.db.begin_write().map_err(internal)?;
        {
            let mut keys = tx.open_table(KEYS).map_err(internal)?;
            let bytes = serde_json::to_vec(record).map_err(internal)?;
            keys.insert(keyid, bytes.as_slice()).map_err(internal)?;
        }
        tx.commit().map_err(internal)
    }

    /// The key `keyid` if `appid` owns it; another app's key is reported as not found.
    pub fn key(&self, appid: &str, keyid: &str) -> Result<KeyRecord, ApiError> {
        let tx = self.db.begin_read().map_err(internal)?;
        let keys = tx.open_table(KEYS).map_err(internal)?;
        let bytes = keys
            .get(keyid)
            .map_err(internal)?
            .ok_or(ApiError::KeyNotFound)?;
        let record: KeyRecord = serde_json::from_slice(bytes.value()).map_err(internal)?;
        if record.appid != appid {
            return Err(ApiError::KeyNotFound);
        }
        Ok(record)
    }

    /// The newest version's material of an enabled key, with its version number.
    pub fn usable_key(&self, appid: &str, keyid: &str) -> Result<(usize, LessSafeKey), ApiError> {
        let record = self.key(appid, keyid)?;
        if !record.enabled {
            return Err(ApiError::KeyDisabled);
        }
        let version = record.versions.len() - 1;
        Ok((version, self.material(&record, keyid, version)?))
    }

    /// The material of version `version` of an enabled key.
    pub fn key_version(
        &self,
        appid: &str,
        keyid: &str,
        version: usize,
    ) -> Result<LessSafeKey, ApiError> {
        let record = self.key(appid, keyid)?;
        if !record.enabled {
            return Err(ApiError::KeyDisabled);
        }
        if version >= record.versions.len() {
            return Err(ApiError::DecryptFailed);
        }
        self.material(&record, keyid, version)
    }

    fn material(
        &self,
        record: &KeyRecord,
        keyid: &str,
        version: usize,
    ) -> Result<LessSafeKey, ApiError> {
        let bytes = self.root.open(
            &Self::key_aad(keyid, &record.appid, version),
            &record.versions[version],
        )?;
        // AES-GCM with 128/192-bit keys is served by expanding to a 256-bit key with SHA-256,
        // since ring offers AES-128-GCM and AES-256-GCM only.
        let key = if bytes.len() == 32 {
            UnboundKey::new(&AES_256_GCM, &bytes)
        } else {
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            UnboundKey::new(&AES_256_GCM, digest.as_ref())
        }
        .map_err(internal)?;
        Ok(LessSafeKey::new(key))
    }

    /// Enables or disables a key.
    pub fn set_enabled(&self, appid: &str, keyid: &str, enabled: bool) -> Result<(), ApiError> {
        let mut record = self.key(appid, keyid)?;
        record.enabled = enabled;
        self.put_key(keyid, &record)
    }

    /// Deletes a key for good.
    pub fn delete_key(&self, appid: &str, keyid: &str) -> Result<(), ApiError> {
        self.key(appid, keyid)?;
        let tx = self.db.begin_write().map_err(internal)?;
        {
            let mut keys = tx.open_table(KEYS).map_err(internal)?;
            keys.remove(keyid).map_err(internal)?;
        }
        tx.commit().map_err(internal)
    }

    /// Keys of `appid`: (keyid, record).
    pub fn list_keys(&self, appid: &str) -> Result<Vec<(String, KeyRecord)>, ApiError> {
        let tx = self.db.begin_read().map_err(internal)?;
        let keys = tx.open_table(KEYS).map_err(internal)?;
        let mut out = Vec::new();
        for entry in keys.iter().map_err(internal)? {
            let (k, v) = entry.map_err(internal)?;
            let record: KeyRecord = serde_json::from_slice(v.value()).map_err(internal)?;
            if record.appid == appid {
                out.push((k.value().to_string(), record));
            }
        }
        Ok(out)
    }
}
