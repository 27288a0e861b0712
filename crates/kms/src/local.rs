//! The embedded, file-backed KMS.
//!
//! Layout of a KMS directory (all files mode 0600):
//! - `root.key`: 32 random bytes, hex encoded. The only key stored unsealed; it never leaves
//!   this file and this process.
//! - `store.json`: apps (app id and the SHA-256 of the api key) and primary keys, each sealed
//!   with AES-256-GCM under the root key, bound to its key id and owning app.
//! - `store.lock`: taken exclusively while the store is changed, so that concurrent ppml
//!   processes do not lose each other's keys.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::digest;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::sealing::{self, binding, uuid_like};
use crate::{
    AppCredentials, DataKey, KeyManagementService, KeyReference, KmsError, PrimaryKeyId,
    write_private_file_atomic,
};

const ROOT_KEY_FILE: &str = "root.key";
const STORE_FILE: &str = "store.json";
const LOCK_FILE: &str = "store.lock";
const WRAP_VERSION: u8 = 1;
const AAD_PRIMARY: &[u8] = b"ppml-local-kms/v1 primary key\0";
const AAD_DATA: &[u8] = b"ppml-local-kms/v1 data key\0";

#[derive(Serialize, Deserialize, Default)]
struct Store {
    version: u32,
    kms_id: String,
    apps: BTreeMap<String, AppRecord>,
    keys: BTreeMap<String, KeyRecord>,
}

#[derive(Serialize, Deserialize)]
struct AppRecord {
    apikey_sha256: String,
    created_unix: u64,
}

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    appid: String,
    enabled: bool,
    created_unix: u64,
    /// nonce || AES-256-GCM(root key, primary key) || tag, base64.
    sealed: String,
}

/// The embedded KMS, opened for one application.
pub struct LocalKms {
    dir: PathBuf,
    kms_id: String,
    appid: String,
    root: LessSafeKey,
    store: Mutex<Store>,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKms")
            .field("dir", &self.dir)
            .field("kms_id", &self.kms_id)
            .field("appid", &self.appid)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random<const N: usize>() -> Result<[u8; N], KmsError> {
    sealing::random().ok_or(KmsError::Random)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// `WRAP_VERSION || sealing::seal_into(...)`.
fn seal(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
    let mut out = vec![WRAP_VERSION];
    sealing::seal_into(key, aad, plaintext, &mut out).ok_or(KmsError::Random)?;
    Ok(out)
}

fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    match sealed.split_first()? {
        (&WRAP_VERSION, rest) => sealing::open(key, aad, rest),
        _ => None,
    }
}

fn aes_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"))
}

struct StoreLock(File);

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl LocalKms {
    /// True when `dir` holds an initialised KMS.
    pub fn exists(dir: &Path) -> bool {
        dir.join(ROOT_KEY_FILE).is_file() && dir.join(STORE_FILE).is_file()
    }

    /// Creates a KMS in `dir` (a new root key and an empty store). Does nothing if one exists.
    pub fn init(dir: &Path) -> Result<(), KmsError> {
        fs::create_dir_all(dir).map_err(|e| KmsError::storage(dir, e))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let _lock = Self::lock(dir)?;
        if Self::exists(dir) {
            return Ok(());
        }
        let root_path = dir.join(ROOT_KEY_FILE);
        if !root_path.exists() {
            let root = Zeroizing::new(hex::encode(random::<32>()?) + "\n");
            write_private_file_atomic(&root_path, root.as_bytes())
                .map_err(|e| KmsError::storage(&root_path, e))?;
        }
        let store = Store {
            version: 1,
            kms_id: format!("local:{}", hex::encode(random::<8>()?)),
            ..Store::default()
        };
        Self::save(dir, &store)
    }

    /// Registers a new application and returns its credentials. The api key is shown only
    /// here; the store keeps its SHA-256 (it is 256 random bits, so no slow hash is needed).
    pub fn enroll(dir: &Path) -> Result<AppCredentials, KmsError> {
        let _lock = Self::lock(dir)?;
        let mut store = Self::load(dir)?;
        let appid = uuid_like(random::<16>()?);
        let apikey = Zeroizing::new(hex::encode(random::<32>()?));
        store.apps.insert(
            appid.clone(),
            AppRecord {
                apikey_sha256: sha256_hex(apikey.as_bytes()),
                created_unix: now_unix(),
            },
        );
        Self::save(dir, &store)?;
        Ok(AppCredentials {
            appid,
            apikey: Zeroizing::new(apikey.to_string()),
        })
    }

    /// Opens the KMS in `dir` for the application `creds`, checking its api key.
    pub fn open(dir: &Path, creds: &AppCredentials) -> Result<Self, KmsError> {
        if !Self::exists(dir) {
            return Err(KmsError::NotInitialized(dir.to_path_buf()));
        }
        let root_path = dir.join(ROOT_KEY_FILE);
        check_private(&root_path)?;
        let root_hex = Zeroizing::new(
            fs::read_to_string(&root_path).map_err(|e| KmsError::storage(&root_path, e))?,
        );
        let root_bytes = Zeroizing::new(
            hex::decode(root_hex.trim())
                .map_err(|_| KmsError::CorruptStore("root.key is not hex".into()))?,
        );
        if root_bytes.len() != 32 {
            return Err(KmsError::CorruptStore("root.key is not 32 bytes".into()));
        }
        let store = Self::load(dir)?;
        let app = store.apps.get(&creds.appid).ok_or(KmsError::Unauthorized)?;
        let presented = sha256_hex(creds.apikey.as_bytes());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            presented.as_bytes(),
            app.apikey_sha256.as_bytes(),
        )) {
            return Err(KmsError::Unauthorized);
        }
        Ok(LocalKms {
            dir: dir.to_path_buf(),
            kms_id: store.kms_id.clone(),
            appid: creds.appid.clone(),
            root: aes_key(&root_bytes),
            store: Mutex::new(store),
        })
    }

    /// The application this handle acts for.
    pub fn appid(&self) -> &str {
        &self.appid
    }

    /// Ids of the primary keys owned by this application.
    pub fn list_keys(&self) -> Result<Vec<PrimaryKeyId>, KmsError> {
        let store = Self::load(&self.dir)?;
        Ok(store
            .keys
            .iter()
            .filter(|(_, k)| k.appid == self.appid)
            .map(|(id, _)| PrimaryKeyId(id.clone()))
            .collect())
    }

    fn lock(dir: &Path) -> Result<StoreLock, KmsError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| KmsError::storage(&path, e))?;
        file.lock().map_err(|e| KmsError::storage(&path, e))?;
        Ok(StoreLock(file))
    }

    fn load(dir: &Path) -> Result<Store, KmsError> {
        let path = dir.join(STORE_FILE);
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KmsError::NotInitialized(dir.to_path_buf())
            } else {
                KmsError::storage(&path, e)
            }
        })?;
        let store: Store = serde_json::from_slice(&bytes)
            .map_err(|e| KmsError::CorruptStore(format!("{}: {e}", path.display())))?;
        if store.version != 1 {
            return Err(KmsError::CorruptStore(format!(
                "unsupported store version {}",
                store.version
            )));
        }
        Ok(store)
    }

    fn save(dir: &Path, store: &Store) -> Result<(), KmsError> {
        let path = dir.join(STORE_FILE);
        let bytes = serde_json::to_vec_pretty(store).expect("store serializes");
        write_private_file_atomic(&path, &bytes).map_err(|e| KmsError::storage(&path, e))
    }

    fn primary_key_aad(&self, key_id: &str, appid: &str) -> Vec<u8> {
        binding(
            AAD_PRIMARY,
            &[self.kms_id.as_bytes(), key_id.as_bytes(), appid.as_bytes()],
        )
    }

    /// Unseals the primary key `key_id` if this app owns it and it is enabled.
    fn primary_key(&self, key_id: &str) -> Result<LessSafeKey, KmsError> {
        let mut store = self.store.lock().expect("store mutex");
        if !store.keys.contains_key(key_id) {
            // Another process may have created it since we opened.
            *store = Self::load(&self.dir)?;
        }
        let record = store
            .keys
            .get(key_id)
            .filter(|k| k.appid == self.appid)
            .ok_or_else(|| KmsError::KeyNotFound(key_id.to_string()))?;
        if !record.enabled {
            return Err(KmsError::KeyDisabled(key_id.to_string()));
        }
        let sealed = BASE64
            .decode(&record.sealed)
            .map_err(|_| KmsError::CorruptStore(format!("key {key_id} is not base64")))?;
        let bytes = open(
            &self.root,
            &self.primary_key_aad(key_id, &self.appid),
            &sealed,
        )
        .ok_or_else(|| {
            KmsError::CorruptStore(format!(
                "primary key {key_id} does not unseal under this root key"
            ))
        })?;
        Ok(aes_key(&bytes))
    }
}

fn check_private(path: &Path) -> Result<(), KmsError> {
    let meta = fs::metadata(path).map_err(|e| KmsError::storage(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KmsError::CorruptStore(format!(
            "{} is readable by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

#[async_trait]
impl KeyManagementService for LocalKms {
    fn kms_id(&self) -> &str {
        &self.kms_id
    }

    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
        let _lock = Self::lock(&self.dir)?;
        let mut store = Self::load(&self.dir)?;
        let key_id = uuid_like(random::<16>()?);
        let material = Zeroizing::new(random::<32>()?);
        let sealed = seal(
            &self.root,
            &self.primary_key_aad(&key_id, &self.appid),
            &*material,
        )?;
        store.keys.insert(
            key_id.clone(),
            KeyRecord {
                appid: self.appid.clone(),
                enabled: true,
                created_unix: now_unix(),
                sealed: BASE64.encode(sealed),
            },
        );
        Self::save(&self.dir, &store)?;
        *self.store.lock().expect("store mutex") = store;
        tracing::info!(key_id, appid = self.appid, "created primary key");
        Ok(PrimaryKeyId(key_id))
    }

    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError> {
        let key = self.primary_key(&primary.0)?;
        let data_key = DataKey::generate().map_err(|_| KmsError::Random)?;
        let wrapped = seal(
            &key,
            &binding(AAD_DATA, &[primary.0.as_bytes(), aad]),
            data_key.expose_secret(),
        )?;
        Ok((
            data_key,
            KeyReference::new(self.kms_id.clone(), primary.0.clone(), wrapped),
        ))
    }

    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        if key.kms != self.kms_id {
            return Err(KmsError::WrongKms {
                expected: self.kms_id.clone(),
                found: key.kms.clone(),
            });
        }
        let primary = self.primary_key(&key.key_id)?;
        let plaintext = open(
            &primary,
            &binding(AAD_DATA, &[key.key_id.as_bytes(), aad]),
            &key.wrapped,
        )
        .ok_or(KmsError::UnwrapFailed)?;
        DataKey::from_slice(&plaintext).map_err(|_| KmsError::UnwrapFailed)
    }

    /// The embedded KMS has one user, who is its owner: there is nobody to grant jobs to.
    fn under_grant(
        self: std::sync::Arc<Self>,
        _grant: &crate::grant::SignedGrant,
    ) -> Result<std::sync::Arc<dyn KeyManagementService>, KmsError> {
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, AppCredentials) {
        let dir = tempfile::tempdir().unwrap();
        LocalKms::init(dir.path()).unwrap();
        let creds = LocalKms::enroll(dir.path()).unwrap();
        (dir, creds)
    }

    #[tokio::test]
    async fn data_key_round_trip_survives_reopen() {
        let (dir, creds) = setup();
        let kms = LocalKms::open(dir.path(), &creds).unwrap();
        let pk = kms.create_primary_key().await.unwrap();
        let (dk, wrapped) = kms.generate_data_key(&pk, b"ds-1").await.unwrap();
        drop(kms);
        let kms = LocalKms::open(dir.path(), &creds).unwrap();
        let again = kms.unwrap_data_key(&wrapped, b"ds-1").await.unwrap();
        assert_eq!(dk.expose_secret(), again.expose_secret());
        assert_eq!(kms.list_keys().unwrap(), vec![pk]);
    }

    #[tokio::test]
    async fn wrong_aad_or_tampered_wrap_fails() {
        let (dir, creds) = setup();
        let kms = LocalKms::open(dir.path(), &creds).unwrap();
        let pk = kms.create_primary_key().await.unwrap();
        let (_, mut wrapped) = kms.generate_data_key(&pk, b"ds-1").await.unwrap();
        assert!(matches!(
            kms.unwrap_data_key(&wrapped, b"ds-2").await,
            Err(KmsError::UnwrapFailed)
        ));
        wrapped.wrapped[20] ^= 1;
        assert!(matches!(
            kms.unwrap_data_key(&wrapped, b"ds-1").await,
            Err(KmsError::UnwrapFailed)
        ));
    }

    #[tokio::test]
    async fn credentials_are_checked_and_keys_are_per_app() {
        let (dir, creds) = setup();
        let bad = AppCredentials::new(creds.appid.clone(), "0".repeat(64));
        assert!(matches!(
            LocalKms::open(dir.path(), &bad),
            Err(KmsError::Unauthorized)
        ));
        let unknown = AppCredentials::new("nobody", "x");
        assert!(matches!(
            LocalKms::open(dir.path(), &unknown),
            Err(KmsError::Unauthorized)
        ));
        let a = LocalKms::open(dir.path(), &creds).unwrap();
        let pk = a.create_primary_key().await.unwrap();
        let (_, wrapped) = a.generate_data_key(&pk, b"x").await.unwrap();
        let other = LocalKms::enroll(dir.path()).unwrap();
        let b = LocalKms::open(dir.path(), &other).unwrap();
        assert!(matches!(
            b.unwrap_data_key(&wrapped, b"x").await,
            Err(KmsError::KeyNotFound(_))
        ));
        assert!(matches!(
            b.generate_data_key(&pk, b"x").await,
            Err(KmsError::KeyNotFound(_))
        ));
    }

    #[test]
    fn files_are_private_and_hold_no_plaintext_key() {
        let (dir, _) = setup();
        for name in [ROOT_KEY_FILE, STORE_FILE] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let root = fs::read_to_string(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let store = fs::read_to_string(dir.path().join(STORE_FILE)).unwrap();
        assert!(!store.contains(root.trim()));
    }

    #[test]
    fn world_readable_root_key_is_refused() {
        let (dir, creds) = setup();
        fs::set_permissions(
            dir.path().join(ROOT_KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = LocalKms::open(dir.path(), &creds).unwrap_err();
        assert!(err.to_string().contains("readable by other users"), "{err}");
    }
}
