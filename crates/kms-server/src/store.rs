//! The server's store: apps and primary keys in a redb database, sealed under the root key.
//!
//! redb commits are durable when `commit` returns (it fsyncs), so a key whose CreateKey or
//! RotateKey was acknowledged survives a crash of the process or the machine.
//!
//! Reads are served from two in-memory caches, since every request needs its app's api key and
//! most need a key's material: api keys per app (apps are never deleted and their api key never
//! changes) and opened key records per key id. Within one process the [`Store`] is the only
//! writer, and every method that writes a key invalidates its cache entry after the commit (see
//! `KeyCache` for why a concurrent fill never reinstates a stale entry).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use ppml_kms::sealing::{self, binding, uuid_like};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ApiError;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Store-wide values: `server_id` (16 random bytes) and `root_check` (sealed under the root key).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Attestation policies by policy id: `{appid, policy (JSON text), created_ms}`.
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const META_SERVER_ID: &str = "server_id";
const META_ROOT_CHECK: &str = "root_check";
const AAD_APIKEY: &[u8] = b"ppml-kms-server/v1 apikey\0";
const AAD_KEY: &[u8] = b"ppml-kms-server/v1 primary key\0";
const AAD_ROOT_CHECK: &[u8] = b"ppml-kms-server/v1 root check\0";
const ROOT_CHECK_TEXT: &[u8] = b"ppml-kms-server root key check";
const HKDF_INFO_AUDIT: &[u8] = b"ppml-kms-server/v1 audit";
const HKDF_INFO_ATTESTATION: &[u8] = b"ppml-kms-server/v1 attestation token";

/// Argon2id cost parameters for [`RootKey::from_passphrase_with_params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseParams {
    /// Memory in KiB (`m`).
    pub memory_kib: u32,
    /// Passes over the memory (`t`).
    pub iterations: u32,
    /// Lanes (`p`).
    pub parallelism: u32,
}

impl PassphraseParams {
    /// The parameters of [`RootKey::from_passphrase`]: Argon2id v1.3, m = 64 MiB, t = 3, p = 1,
    /// 32-byte output (about 0.1-0.3 s on one core). Changing them changes every derived key.
    pub const DEFAULT: PassphraseParams = PassphraseParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };
}

/// Bytes of a passphrase salt.
pub const SALT_LEN: usize = 16;

/// The root key that seals everything in the store. Never written to the store or logged.
pub struct RootKey {
    key: LessSafeKey,
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

impl RootKey {
    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &*bytes).expect("32-byte key"));
        RootKey { key, bytes }
    }

    /// A root key from its 32 bytes (an owner's, opened from an `Unseal`).
    pub fn from_secret(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self::from_bytes(bytes)
    }

    /// The key's public id ([`ppml_attestation::peer::kms_root_id`]): what an unsealed KMS's
    /// quote binds and what owners pin in their KMS policy.
    pub fn id(&self) -> [u8; 32] {
        ppml_attestation::peer::kms_root_id(&self.bytes)
    }

    /// A root key from 64 hex characters.
    pub fn from_hex(hex_key: &str) -> Result<Self, String> {
        Self::bytes_from_hex(hex_key).map(Self::from_bytes)
    }

    /// The 32 bytes of a root key in 64 hex characters (surrounding whitespace ignored).
    pub fn bytes_from_hex(hex_key: &str) -> Result<Zeroizing<[u8; 32]>, String> {
        let decoded =
            Zeroizing::new(hex::decode(hex_key.trim()).map_err(|_| "root key is not hex")?);
        let mut bytes = Zeroizing::new([0u8; 32]);
        if decoded.len() != bytes.len() {
            return Err("root key must be 32 bytes (64 hex characters)".into());
        }
        bytes.copy_from_slice(&decoded);
        Ok(bytes)
    }

    /// A fresh random root key, returned with its hex form (to be saved by the caller).
    pub fn generate() -> Result<(Self, Zeroizing<String>), String> {
        let bytes = Zeroizing::new(random::<32>().map_err(|_| "random generator failed")?);
        let hex_key = Zeroizing::new(hex::encode(*bytes));
        Ok((Self::from_bytes(bytes), hex_key))
    }

    /// The root key derived from a passphrase with Argon2id and [`PassphraseParams::DEFAULT`]
    /// (m = 64 MiB, t = 3, p = 1). `salt` is not secret but must be kept with the store (the
    /// CLI keeps it in `DATA_DIR/root.salt`): another salt gives another key.
    pub fn from_passphrase(passphrase: &[u8], salt: &[u8; SALT_LEN]) -> Result<Self, String> {
        Self::from_passphrase_with_params(passphrase, salt, PassphraseParams::DEFAULT)
    }

    /// [`RootKey::from_passphrase`] with explicit Argon2id costs; for tests (cheap parameters)
    /// and for stores created with non-default costs. All intermediates are zeroized.
    pub fn from_passphrase_with_params(
        passphrase: &[u8],
        salt: &[u8; SALT_LEN],
        params: PassphraseParams,
    ) -> Result<Self, String> {
        if passphrase.is_empty() {
            return Err("the root key passphrase is empty".into());
        }
        let argon_params = argon2::Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            Some(32),
        )
        .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon_params.clone(),
        );
        // Our own memory blocks, so that they are wiped (hash_password_into drops its own
        // without wiping them).
        let mut blocks = Zeroizing::new(vec![argon2::Block::default(); argon_params.block_count()]);
        let mut bytes = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into_with_memory(passphrase, salt, &mut *bytes, &mut blocks[..])
            .map_err(|e| format!("Argon2id failed: {e}"))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A fresh random salt for [`RootKey::from_passphrase`].
    pub fn generate_salt() -> Result<[u8; SALT_LEN], String> {
        random::<SALT_LEN>().map_err(|_| "random generator failed".into())
    }

    /// A salt from its 32-hex-character form (surrounding whitespace ignored).
    pub fn salt_from_hex(text: &str) -> Result<[u8; SALT_LEN], String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "salt is not hex")?;
        bytes.try_into().map_err(|_| {
            format!(
                "salt must be {SALT_LEN} bytes ({} hex characters)",
                2 * SALT_LEN
            )
        })
    }

    /// The audit log's MAC key: HKDF-SHA256(salt = empty, ikm = root key,
    /// info = `ppml-kms-server/v1 audit`), 32 bytes. Independent of the sealing key.
    pub fn audit_mac_key(&self) -> Zeroizing<[u8; 32]> {
        self.subkey(HKDF_INFO_AUDIT)
    }

    /// The seed of the attestation token signing key (Ed25519): HKDF-SHA256(salt = empty,
    /// ikm = root key, info = `ppml-kms-server/v1 attestation token`).
    pub fn attestation_seed(&self) -> Zeroizing<[u8; 32]> {
        self.subkey(HKDF_INFO_ATTESTATION)
    }

    fn subkey(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&*self.bytes);
        prk.expand(&[info], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut *out))
            .expect("HKDF-SHA256 with a 32-byte output");
        out
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, ApiError> {
        seal(&self.key, aad, plaintext).map(|v| BASE64.encode(v))
    }

    fn open(&self, aad: &[u8], sealed: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let bytes = BASE64
            .decode(sealed)
            .map_err(|_| ApiError::Internal("corrupt sealed value".into()))?;
        open(&self.key, aad, &bytes).ok_or_else(|| {
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
    /// The owner's Ed25519 public key (base64url), for apps enrolled with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_key: Option<String>,
}

/// What authenticates an app's requests: its api key and, if it was enrolled with one, its
/// owner's public key (`ppml_kms::owner`).
pub struct AppAuth {
    /// The api key (HMAC key of the request signature).
    pub apikey: Zeroizing<String>,
    /// The owner's Ed25519 public key.
    pub owner_key: Option<[u8; 32]>,
}

/// Called once a change is staged and before it commits, with the id of what it creates or
/// changes (app id, key id, policy id): the server makes the change's audit entry durable
/// there, so that a change the audit log could not record never takes effect
/// (`docs/kms-audit.md` §9). An error aborts the change.
pub type BeforeCommit<'a> = &'a mut dyn FnMut(&str) -> Result<(), ApiError>;

/// Where the plaintext of a decryption goes; see [`Store::key_version`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Back to the caller in plaintext (`Decrypt`).
    ToCaller,
    /// Nowhere outside the server, or only sealed to an attested runtime (`ReEncrypt`,
    /// `ReleaseDataKey`).
    Sealed,
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
    /// When set, data keys are released only to runtimes attested under this policy id
    /// (`ReleaseDataKey`); plain `Decrypt` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_policy: Option<String>,
}

impl KeyRecord {
    /// The newest version (0 until the first RotateKey).
    pub fn newest_version(&self) -> usize {
        self.versions.len().saturating_sub(1)
    }

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

/// A key record with every version's material opened, as cached.
struct OpenedKey {
    appid: String,
    enabled: bool,
    release_policy: Option<String>,
    /// Material of each version, index = version.
    versions: Vec<LessSafeKey>,
}

/// The cache of opened keys. A fill reads the generation before reading the database and
/// inserts only if no write invalidated anything meanwhile; a write commits, then removes the
/// entry and bumps the generation under the lock. So an entry is either read after the last
/// commit to its key or removed by that commit's invalidation.
#[derive(Default)]
struct KeyCache {
    map: HashMap<String, Arc<OpenedKey>>,
    generation: u64,
}

/// The server's persistent state.
pub struct Store {
    db: Database,
    root: RootKey,
    kms_id: String,
    apikeys: RwLock<HashMap<String, Arc<AppAuth>>>,
    keys: RwLock<KeyCache>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("kms_id", &self.kms_id)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store `kms.redb` in `dir`.
    ///
    /// A new store gets a random server id and a check value sealed under `root`; opening an
    /// existing store with another root key fails with [`ApiError::RootKeyMismatch`] and
    /// changes nothing.
    pub fn open(dir: &Path, root: RootKey) -> Result<Self, ApiError> {
        std::fs::create_dir_all(dir).map_err(internal)?;
        let db = Database::create(dir.join("kms.redb")).map_err(internal)?;
        let tx = db.begin_write().map_err(internal)?;
        let checked = Self::check_meta(&tx, &root);
        let server_id = match checked {
            Ok(id) => id,
            Err(e) => {
                tx.abort().map_err(internal)?;
                return Err(e);
            }
        };
        tx.commit().map_err(internal)?;
        Ok(Store {
            db,
            root,
            kms_id: format!("ppml-kms:{}", hex::encode(server_id)),
            apikeys: RwLock::default(),
            keys: RwLock::default(),
        })
    }

    /// Creates the tables and the meta values if missing; checks the root key otherwise.
    fn check_meta(tx: &redb::WriteTransaction, root: &RootKey) -> Result<[u8; 16], ApiError> {
        let apps = tx.open_table(APPS).map_err(internal)?;
        tx.open_table(KEYS).map_err(internal)?;
        tx.open_table(POLICIES).map_err(internal)?;
        let mut meta = tx.open_table(META).map_err(internal)?;
        let stored_id = meta
            .get(META_SERVER_ID)
            .map_err(internal)?
            .map(|v| v.value().to_vec());
        let server_id: [u8; 16] = match stored_id {
            Some(id) => id
                .try_into()
                .map_err(|_| internal("corrupt server id in the store"))?,
            None => {
                let id = random::<16>()?;
                meta.insert(META_SERVER_ID, id.as_slice())
                    .map_err(internal)?;
                id
            }
        };
        let check_aad = binding(AAD_ROOT_CHECK, &[&server_id]);
        let stored_check = meta
            .get(META_ROOT_CHECK)
            .map_err(internal)?
            .map(|v| v.value().to_vec());
        match stored_check {
            Some(sealed) => {
                let opened = open(&root.key, &check_aad, &sealed);
                if opened.as_deref().map(Vec::as_slice) != Some(ROOT_CHECK_TEXT) {
                    return Err(ApiError::RootKeyMismatch);
                }
            }
            None => {
                // A store from before the check: the root key must open what it holds.
                if let Some(entry) = apps.first().map_err(internal)? {
                    let (appid, bytes) = entry;
                    let record: AppRecord =
                        serde_json::from_slice(bytes.value()).map_err(internal)?;
                    let aad = binding(AAD_APIKEY, &[appid.value().as_bytes()]);
                    if root.open(&aad, &record.apikey_sealed).is_err() {
                        return Err(ApiError::RootKeyMismatch);
                    }
                }
                let sealed = seal(&root.key, &check_aad, ROOT_CHECK_TEXT)?;
                meta.insert(META_ROOT_CHECK, sealed.as_slice())
                    .map_err(internal)?;
            }
        }
        Ok(server_id)
    }

    /// This store's stable id, `ppml-kms:` and 32 hex digits (random, made on first open).
    pub fn kms_id(&self) -> &str {
        &self.kms_id
    }

    /// The id of the root key the store is sealed under ([`RootKey::id`]).
    pub fn root_id(&self) -> [u8; 32] {
        self.root.id()
    }

    /// Registers a new app, with the owner's public key if given; returns its id and api key.
    pub fn enroll(
        &self,
        now_ms: u64,
        owner_key: Option<[u8; 32]>,
        before_commit: BeforeCommit<'_>,
    ) -> Result<(String, Zeroizing<String>), ApiError> {
        let appid = uuid_like(random::<16>()?);
        let apikey = Zeroizing::new(BASE64.encode(random::<24>()?));
        let record = AppRecord {
            apikey_sealed: self
                .root
                .seal(&binding(AAD_APIKEY, &[appid.as_bytes()]), apikey.as_bytes())?,
            created_ms: now_ms,
            owner_key: owner_key.map(|k| URL_SAFE_NO_PAD.encode(k)),
        };
        self.insert_json(APPS, &appid, &record, before_commit)?;
        Ok((appid, apikey))
    }

    /// The api key of `appid`, if the app exists.
    pub fn apikey(&self, appid: &str) -> Result<Option<Zeroizing<String>>, ApiError> {
        Ok(self
            .app_auth(appid)?
            .map(|auth| Zeroizing::new(String::clone(&auth.apikey))))
    }

    /// The api key and owner key of `appid` from the cache, read and opened on a miss. Apps
    /// are never deleted and neither key ever changes, so entries never go stale; unknown apps
    /// are not cached.
    pub fn app_auth(&self, appid: &str) -> Result<Option<Arc<AppAuth>>, ApiError> {
        if let Some(k) = self.apikeys.read().expect("apikey cache").get(appid) {
            return Ok(Some(Arc::clone(k)));
        }
        let Some(record) = self.get_json::<AppRecord>(APPS, appid)? else {
            return Ok(None);
        };
        let plain = self.root.open(
            &binding(AAD_APIKEY, &[appid.as_bytes()]),
            &record.apikey_sealed,
        )?;
        let text = String::from_utf8(plain.to_vec()).map_err(internal)?;
        let owner_key = match &record.owner_key {
            None => None,
            Some(text) => Some(
                ppml_kms::owner::parse_public_key(text)
                    .ok_or_else(|| internal("stored owner key is malformed"))?,
            ),
        };
        let auth = Arc::new(AppAuth {
            apikey: Zeroizing::new(text),
            owner_key,
        });
        self.apikeys
            .write()
            .expect("apikey cache")
            .insert(appid.to_string(), Arc::clone(&auth));
        Ok(Some(auth))
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

    /// New random material for version `version` of a key, sealed under the root key.
    fn new_version(
        &self,
        keyid: &str,
        appid: &str,
        keyspec: &str,
        version: usize,
    ) -> Result<String, ApiError> {
        let len = KeyRecord::key_len(keyspec).ok_or(ApiError::PayloadType)?;
        let material = Zeroizing::new(random::<32>()?);
        self.root
            .seal(&Self::key_aad(keyid, appid, version), &material[..len])
    }

    /// Creates a primary key for `appid`; durable when this returns.
    pub fn create_key(
        &self,
        appid: &str,
        keyspec: &str,
        now_ms: u64,
        before_commit: BeforeCommit<'_>,
    ) -> Result<String, ApiError> {
        KeyRecord::key_len(keyspec).ok_or(ApiError::PayloadType)?;
        let keyid = uuid_like(random::<16>()?);
        let record = KeyRecord {
            appid: appid.to_string(),
            keyspec: keyspec.to_string(),
            enabled: true,
            created_ms: now_ms,
            versions: vec![self.new_version(&keyid, appid, keyspec, 0)?],
            release_policy: None,
        };
        self.insert_json(KEYS, &keyid, &record, before_commit)?;
        Ok(keyid)
    }

    /// Reads, changes and writes the record of `keyid` in one write transaction (so concurrent
    /// changes of one key are serialized), then invalidates its cache entry. `change` returns
    /// `Ok(false)` to delete the key.
    fn modify_key<T>(
        &self,
        appid: &str,
        keyid: &str,
        change: impl FnOnce(&mut KeyRecord) -> Result<(bool, T), ApiError>,
        before_commit: BeforeCommit<'_>,
    ) -> Result<T, ApiError> {
        let tx = self.db.begin_write().map_err(internal)?;
        let result = (|| {
            let mut keys = tx.open_table(KEYS).map_err(internal)?;
            let mut record: KeyRecord = {
                let bytes = keys
                    .get(keyid)
                    .map_err(internal)?
                    .ok_or(ApiError::KeyNotFound)?;
                serde_json::from_slice(bytes.value()).map_err(internal)?
            };
            if record.appid != appid {
                return Err(ApiError::KeyNotFound);
            }
            let (keep, out) = change(&mut record)?;
            if keep {
                let bytes = serde_json::to_vec(&record).map_err(internal)?;
                keys.insert(keyid, bytes.as_slice()).map_err(internal)?;
            } else {
                keys.remove(keyid).map_err(internal)?;
            }
            before_commit(keyid)?;
            Ok(out)
        })();
        match result {
            Ok(out) => {
                tx.commit().map_err(internal)?;
                self.invalidate(keyid);
                Ok(out)
            }
            Err(e) => {
                tx.abort().map_err(internal)?;
                Err(e)
            }
        }
    }

    fn invalidate(&self, keyid: &str) {
        let mut cache = self.keys.write().expect("key cache");
        cache.map.remove(keyid);
        cache.generation += 1;
    }

    /// The key `keyid` if `appid` owns it; another app's key is reported as not found.
    pub fn key(&self, appid: &str, keyid: &str) -> Result<KeyRecord, ApiError> {
        let record: KeyRecord = self.get_json(KEYS, keyid)?.ok_or(ApiError::KeyNotFound)?;
        if record.appid != appid {
            return Err(ApiError::KeyNotFound);
        }
        Ok(record)
    }

    /// The opened key `keyid` from the cache, read and opened on a miss; checks ownership and
    /// that the key is enabled.
    fn opened_key(&self, appid: &str, keyid: &str) -> Result<Arc<OpenedKey>, ApiError> {
        let cached = {
            let cache = self.keys.read().expect("key cache");
            match cache.map.get(keyid) {
                Some(k) => Ok(Arc::clone(k)),
                None => Err(cache.generation),
            }
        };
        let opened = match cached {
            Ok(k) => k,
            Err(generation) => {
                let record: KeyRecord = self.get_json(KEYS, keyid)?.ok_or(ApiError::KeyNotFound)?;
                let versions = (0..record.versions.len())
                    .map(|v| self.material(&record, keyid, v))
                    .collect::<Result<Vec<_>, _>>()?;
                if versions.is_empty() {
                    return Err(internal("key without material"));
                }
                let opened = Arc::new(OpenedKey {
                    appid: record.appid,
                    enabled: record.enabled,
                    release_policy: record.release_policy,
                    versions,
                });
                let mut cache = self.keys.write().expect("key cache");
                if cache.generation == generation {
                    cache.map.insert(keyid.to_string(), Arc::clone(&opened));
                }
                opened
            }
        };
        if opened.appid != appid {
            return Err(ApiError::KeyNotFound);
        }
        if !opened.enabled {
            return Err(ApiError::KeyDisabled);
        }
        Ok(opened)
    }

    /// The newest version's material of an enabled key, with its version number.
    pub fn usable_key(&self, appid: &str, keyid: &str) -> Result<(usize, LessSafeKey), ApiError> {
        let opened = self.opened_key(appid, keyid)?;
        let version = opened.versions.len() - 1;
        Ok((version, opened.versions[version].clone()))
    }

    /// The material of version `version` of an enabled key, for a decryption whose result
    /// goes where `release` says: a key marked for attested release gives its plaintext to
    /// callers only through `ReleaseDataKey` ([`ApiError::AttestationRequired`] otherwise).
    pub fn key_version(
        &self,
        appid: &str,
        keyid: &str,
        version: usize,
        release: Release,
    ) -> Result<LessSafeKey, ApiError> {
        let opened = self.opened_key(appid, keyid)?;
        if release == Release::ToCaller && opened.release_policy.is_some() {
            return Err(ApiError::AttestationRequired);
        }
        opened
            .versions
            .get(version)
            .cloned()
            .ok_or(ApiError::DecryptFailed)
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

    /// Adds a new version to an enabled key; returns its number (the first rotation gives 1).
    /// New encryptions use it; older versions still decrypt. Durable when this returns.
    pub fn rotate_key(
        &self,
        appid: &str,
        keyid: &str,
        before_commit: BeforeCommit<'_>,
    ) -> Result<usize, ApiError> {
        self.modify_key(
            appid,
            keyid,
            |record| {
                if !record.enabled {
                    return Err(ApiError::KeyDisabled);
                }
                let version = record.versions.len();
                if u32::try_from(version).is_err() {
                    return Err(ApiError::Internal("too many key versions".into()));
                }
                let sealed = self.new_version(keyid, &record.appid, &record.keyspec, version)?;
                record.versions.push(sealed);
                Ok((true, version))
            },
            before_commit,
        )
    }

    /// Enables or disables a key.
    pub fn set_enabled(
        &self,
        appid: &str,
        keyid: &str,
        enabled: bool,
        before_commit: BeforeCommit<'_>,
    ) -> Result<(), ApiError> {
        self.modify_key(
            appid,
            keyid,
            |record| {
                record.enabled = enabled;
                Ok((true, ()))
            },
            before_commit,
        )
    }

    /// Marks a key "release only to attested runtimes" under policy `policy_id` of the same
    /// app. There is no way back: a key's protection can only be changed to another policy.
    pub fn set_release_policy(
        &self,
        appid: &str,
        keyid: &str,
        policy_id: &str,
        before_commit: BeforeCommit<'_>,
    ) -> Result<(), ApiError> {
        self.policy(appid, policy_id)?;
        self.modify_key(
            appid,
            keyid,
            |record| {
                record.release_policy = Some(policy_id.to_string());
                Ok((true, ()))
            },
            before_commit,
        )
    }

    /// The release policy of an enabled key of `appid`, if it has one (from the cache).
    pub fn release_policy(&self, appid: &str, keyid: &str) -> Result<Option<String>, ApiError> {
        Ok(self.opened_key(appid, keyid)?.release_policy.clone())
    }

    /// Deletes a key for good.
    pub fn delete_key(
        &self,
        appid: &str,
        keyid: &str,
        before_commit: BeforeCommit<'_>,
    ) -> Result<(), ApiError> {
        self.modify_key(appid, keyid, |_| Ok((false, ())), before_commit)
    }

    /// The JSON value under `key` in `table`, if any.
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, ApiError> {
        let tx = self.db.begin_read().map_err(internal)?;
        let table = tx.open_table(table).map_err(internal)?;
        match table.get(key).map_err(internal)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes.value())
                .map(Some)
                .map_err(internal),
        }
    }

    /// Inserts `value` as JSON under `key` in `table`; durable when this returns.
    fn insert_json<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
        before_commit: BeforeCommit<'_>,
    ) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(value).map_err(internal)?;
        let tx = self.db.begin_write().map_err(internal)?;
        let staged = tx
            .open_table(table)
            .map_err(internal)
            .and_then(|mut t| t.insert(key, bytes.as_slice()).map(drop).map_err(internal))
            .and_then(|()| before_commit(key));
        match staged {
            Ok(()) => tx.commit().map_err(internal),
            Err(e) => {
                tx.abort().map_err(internal)?;
                Err(e)
            }
        }
    }

    /// Stores an attestation policy (JSON text) for `appid`; returns its id. Durable on return.
    pub fn put_policy(
        &self,
        appid: &str,
        policy_json: &str,
        now_ms: u64,
        before_commit: BeforeCommit<'_>,
    ) -> Result<String, ApiError> {
        let id = uuid_like(random::<16>()?);
        let record =
            serde_json::json!({"appid": appid, "policy": policy_json, "created_ms": now_ms});
        self.insert_json(POLICIES, &id, &record, before_commit)?;
        Ok(id)
    }

    /// The policy `id` of `appid` (JSON text); another app's policy is reported as not found.
    pub fn policy(&self, appid: &str, id: &str) -> Result<String, ApiError> {
        self.policy_record(appid, id).map(|(policy, _)| policy)
    }

    /// The policy `id` of `appid` (JSON text) and when it was stored (Unix ms).
    pub fn policy_record(&self, appid: &str, id: &str) -> Result<(String, u64), ApiError> {
        let record: serde_json::Value = self
            .get_json(POLICIES, id)?
            .ok_or(ApiError::PolicyNotFound)?;
        if record["appid"] != appid {
            return Err(ApiError::PolicyNotFound);
        }
        let policy = record["policy"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| internal("policy record without policy"))?;
        Ok((policy, record["created_ms"].as_u64().unwrap_or(0)))
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

    /// The policy `appid` stored last (id, JSON text), if it has any: the app's default for
    /// BigDL-RAS quotes that name no policy.
    pub fn newest_policy(&self, appid: &str) -> Result<Option<(String, String)>, ApiError> {
        let tx = self.db.begin_read().map_err(internal)?;
        let policies = tx.open_table(POLICIES).map_err(internal)?;
        let mut newest: Option<(u64, String, String)> = None;
        for entry in policies.iter().map_err(internal)? {
            let (k, v) = entry.map_err(internal)?;
            let record: serde_json::Value = serde_json::from_slice(v.value()).map_err(internal)?;
            if record["appid"] != appid {
                continue;
            }
            let created = record["created_ms"].as_u64().unwrap_or(0);
            let Some(text) = record["policy"].as_str() else {
                return Err(internal("policy record without policy"));
            };
            // Ids break ties, so that the choice never depends on the table's order.
            let key = k.value().to_string();
            if newest
                .as_ref()
                .is_none_or(|(c, id, _)| (created, &key) > (*c, id))
            {
                newest = Some((created, key, text.to_string()));
            }
        }
        Ok(newest.map(|(_, id, text)| (id, text)))
    }

    /// Numbers of (enabled, disabled) keys of all apps; one pass over the keys table.
    pub fn key_counts(&self) -> Result<(u64, u64), ApiError> {
        #[derive(Deserialize)]
        struct State {
            enabled: bool,
        }
        let tx = self.db.begin_read().map_err(internal)?;
        let keys = tx.open_table(KEYS).map_err(internal)?;
        let (mut enabled, mut disabled) = (0, 0);
        for entry in keys.iter().map_err(internal)? {
            let (_, v) = entry.map_err(internal)?;
            let state: State = serde_json::from_slice(v.value()).map_err(internal)?;
            if state.enabled {
                enabled += 1;
            } else {
                disabled += 1;
            }
        }
        Ok((enabled, disabled))
    }
}
