//! The eHSM REST API: `GET /ehsm?Action=Enroll|GetVersion`, `POST /ehsm?Action=...`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::response::Json;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ppml_kms::ehsm::{self, ReplayCache, RequestError};
use ring::aead::LessSafeKey;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ApiError;
use crate::store::{self, Store, random};

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest plaintext accepted by Encrypt (eHSM's limit).
pub const MAX_PLAINTEXT: usize = 6 * 1024;
const CIPHERTEXT_VERSION: u8 = 1;
const AAD_DATA: &[u8] = b"ppml-kms-server/v1 data\0";

/// Shared state of the server.
pub struct ServerState {
    /// The persistent store.
    pub store: Store,
    /// Recently seen (timestamp, nonce) pairs.
    pub replay: ReplayCache,
}

impl ServerState {
    /// State over `store`.
    pub fn new(store: Store) -> Self {
        ServerState {
            store,
            replay: ReplayCache::new(),
        }
    }
}

/// The HTTP router.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/ehsm", get(handle_get).post(handle_post))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

#[derive(Deserialize)]
struct ActionQuery {
    #[serde(rename = "Action")]
    action: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn respond(action: &str, result: Result<Value, ApiError>) -> Json<Value> {
    match result {
        Ok(result) => {
            tracing::info!(action, outcome = "ok", "request");
            Json(json!({"code": 200, "message": "successful", "result": result}))
        }
        Err(err) => {
            if let ApiError::Internal(detail) = &err {
                tracing::error!(action, detail, "request failed");
            } else {
                tracing::info!(action, outcome = %err, "request rejected");
            }
            Json(json!({"code": err.code(), "message": err.message(), "result": {}}))
        }
    }
}

async fn handle_get(
    State(state): State<Arc<ServerState>>,
    Query(q): Query<ActionQuery>,
) -> Json<Value> {
    let action = q.action.unwrap_or_default();
    let result = tokio::task::spawn_blocking({
        let action = action.clone();
        move || unsigned(&state, &action)
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::Internal(e.to_string())));
    respond(&action, result)
}

async fn handle_post(
    State(state): State<Arc<ServerState>>,
    Query(q): Query<ActionQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Json<Value> {
    let action = q.action.unwrap_or_default();
    let result = match body {
        Err(_) => Err(ApiError::TooLarge),
        Ok(body) => {
            let action = action.clone();
            tokio::task::spawn_blocking(move || signed(&state, &action, &body))
                .await
                .unwrap_or_else(|e| Err(ApiError::Internal(e.to_string())))
        }
    };
    respond(&action, result)
}

fn unsigned(state: &ServerState, action: &str) -> Result<Value, ApiError> {
    match action {
        "Enroll" => {
            let (appid, apikey) = state.store.enroll(now_ms())?;
            Ok(json!({"appid": appid, "apikey": *apikey}))
        }
        "GetVersion" => Ok(json!({"version": env!("CARGO_PKG_VERSION"), "git_sha": ""})),
        _ => Err(ApiError::UnknownAction),
    }
}

const CRYPTOGRAPHIC: [&str; 5] = [
    "CreateKey",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "Encrypt",
    "Decrypt",
];

/// Validates the envelope (docs/kms-api.md §4, in that order) and runs the action.
fn signed(state: &ServerState, action: &str, body: &[u8]) -> Result<Value, ApiError> {
    if matches!(action, "Enroll" | "GetVersion") {
        return unsigned(state, action);
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| RequestError::ParamType)?;
    let obj = value.as_object().ok_or(RequestError::ParamType)?;
    let (Some(appid), Some(timestamp), Some(sign)) =
        (obj.get("appid"), obj.get("timestamp"), obj.get("sign"))
    else {
        return Err(RequestError::MissingParameters.into());
    };
    let payload = obj.get("payload");
    if payload.is_none() && CRYPTOGRAPHIC.contains(&action) {
        return Err(RequestError::MissingParameters.into());
    }
    let (Some(appid), Some(timestamp), Some(sign)) =
        (appid.as_str(), timestamp.as_str(), sign.as_str())
    else {
        return Err(RequestError::ParamType.into());
    };
    let nonce = match obj.get("nonce") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(RequestError::ParamType.into()),
    };
    let empty = Map::new();
    let payload = match payload {
        None => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => return Err(RequestError::ParamType.into()),
    };
    let now = now_ms();
    ehsm::check_timestamp(timestamp, now)?;
    state
        .replay
        .check_and_record(appid, timestamp, nonce, now)?;
    let apikey = state.store.apikey(appid)?.ok_or(RequestError::Sign)?;
    if !ehsm::verify(&apikey, obj, sign) {
        return Err(RequestError::Sign.into());
    }
    run(&state.store, action, appid, payload)
}

fn field<'a>(payload: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    payload
        .get(name)
        .and_then(Value::as_str)
        .ok_or(ApiError::PayloadType)
}

fn optional_str<'a>(payload: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match payload.get(name) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::PayloadType),
    }
}

fn data_aad(keyid: &str, aad: &str) -> Vec<u8> {
    ppml_kms::sealing::binding(AAD_DATA, &[keyid.as_bytes(), aad.as_bytes()])
}

/// `base64(0x01 || u32 key version || nonce || ciphertext || tag)`.
fn encrypt(
    key: &LessSafeKey,
    version: usize,
    keyid: &str,
    aad: &str,
    plaintext: &[u8],
) -> Result<String, ApiError> {
    let mut out = vec![CIPHERTEXT_VERSION];
    out.extend_from_slice(&(version as u32).to_be_bytes());
    out.extend_from_slice(&store::seal(key, &data_aad(keyid, aad), plaintext)?);
    Ok(BASE64.encode(out))
}

fn decrypt(
    store: &Store,
    appid: &str,
    keyid: &str,
    aad: &str,
    ciphertext: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let bytes = BASE64.decode(ciphertext).map_err(|_| ApiError::Base64)?;
    if bytes.len() < 5 || bytes[0] != CIPHERTEXT_VERSION {
        return Err(ApiError::DecryptFailed);
    }
    let version = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
    let key = store.key_version(appid, keyid, version)?;
    store::open(&key, &data_aad(keyid, aad), &bytes[5..]).ok_or(ApiError::DecryptFailed)
}

fn run(
    store: &Store,
    action: &str,
    appid: &str,
    payload: &Map<String, Value>,
) -> Result<Value, ApiError> {
    match action {
        "CreateKey" => {
            let keyspec = optional_str(payload, "keyspec")?;
            let keyspec = if keyspec.is_empty() {
                "EH_AES_GCM_256"
            } else {
                keyspec
            };
            let origin = optional_str(payload, "origin")?;
            if !(origin.is_empty() || origin == "EH_INTERNAL_KEY") {
                return Err(ApiError::PayloadType);
            }
            let keyid = store.create_key(appid, keyspec, now_ms())?;
            Ok(json!({"keyid": keyid}))
        }
        "GenerateDataKey" | "GenerateDataKeyWithoutPlaintext" => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let keylen = payload
                .get("keylen")
                .and_then(Value::as_u64)
                .filter(|n| (1..=1024).contains(n))
                .ok_or(ApiError::PayloadType)? as usize;
            let (version, key) = store.usable_key(appid, keyid)?;
            let mut data_key = zeroize::Zeroizing::new(vec![0u8; keylen]);
            for chunk in data_key.chunks_mut(32) {
                let bytes = zeroize::Zeroizing::new(random::<32>()?);
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let ciphertext = encrypt(&key, version, keyid, aad, &data_key)?;
            if action == "GenerateDataKey" {
                Ok(json!({"plaintext": BASE64.encode(&*data_key), "ciphertext": ciphertext}))
            } else {
                Ok(json!({"ciphertext": ciphertext}))
            }
        }
        "Encrypt" => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let plaintext = zeroize::Zeroizing::new(
                BASE64
                    .decode(field(payload, "plaintext")?)
                    .map_err(|_| ApiError::Base64)?,
            );
            if plaintext.len() > MAX_PLAINTEXT {
                return Err(ApiError::PayloadType);
            }
            let (version, key) = store.usable_key(appid, keyid)?;
            Ok(json!({"ciphertext": encrypt(&key, version, keyid, aad, &plaintext)?}))
        }
        "Decrypt" => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let plaintext = decrypt(store, appid, keyid, aad, field(payload, "ciphertext")?)?;
            Ok(json!({"plaintext": BASE64.encode(&*plaintext)}))
        }
        "ListKey" => {
            let list: Vec<Value> = store
                .list_keys(appid)?
                .into_iter()
                .map(|(keyid, r)| {
                    json!({"keyid": keyid, "keyspec": r.keyspec, "creationDate": r.created_ms,
                           "keyState": if r.enabled { 1 } else { 0 }})
                })
                .collect();
            Ok(json!({"list": list}))
        }
        "EnableKey" | "DisableKey" => {
            store.set_enabled(appid, field(payload, "keyid")?, action == "EnableKey")?;
            Ok(json!({}))
        }
        "DeleteKey" => {
            store.delete_key(appid, field(payload, "keyid")?)?;
            Ok(json!({}))
        }
        _ => Err(ApiError::UnknownAction),
    }
}
