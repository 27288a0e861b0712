//! A KMS in a TEE that has no root key yet (`docs/attestation.md` §9).
//!
//! It answers `GetVersion` (`"sealed": true`), `GenerateQuote` (its quote binds a fresh unseal
//! key, an X25519 key made at start and never stored) and `Unseal`, and refuses every other
//! action with `sealed`. An owner who verified the quote sends the root key sealed to the
//! unseal key (HPKE, as key release does); once that key opens the data directory's store,
//! the server answers everything with the full KMS from then on. The root key lives only in
//! the TEE's memory: nothing of it is written to disk.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ppml_attestation::peer::{KmsKeyState, unseal_aad};
use ppml_attestation::release::RuntimeKey;
use ppml_kms::ehsm::RequestError;
use ppml_kms::protocol::Action;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use zeroize::Zeroizing;

use crate::api::{ActionQuery, MAX_BODY, OwnEvidence, TokenBucket, rate_limit};
use crate::audit::AuditHead;
use crate::server::{ServerConfig, ServerError, serving_state};
use crate::{ApiError, RootKey, ServerState};

/// `Unseal`s tried at once, and the refill per second after that: each opens the store.
const UNSEAL_BURST: u32 = 8;
const UNSEAL_PER_SEC: f64 = 1.0;

/// A sealed KMS, and the full KMS once an owner unsealed it.
pub(crate) struct SealedKms {
    config: ServerConfig,
    own: Arc<OwnEvidence>,
    unseal_key: RuntimeKey,
    unseal_public: [u8; 32],
    attempts: std::sync::Mutex<TokenBucket>,
    /// One unseal at a time: the first root key that opens the store wins.
    unsealing: tokio::sync::Mutex<()>,
    unsealed: OnceLock<(Arc<ServerState>, Router)>,
}

impl SealedKms {
    pub(crate) fn new(config: ServerConfig, own: Arc<OwnEvidence>) -> Self {
        let unseal_key = RuntimeKey::generate();
        let unseal_public: [u8; 32] = unseal_key
            .public_bytes()
            .try_into()
            .expect("an X25519 public key is 32 bytes");
        SealedKms {
            config,
            own,
            unseal_key,
            unseal_public,
            attempts: std::sync::Mutex::new(TokenBucket::new(UNSEAL_BURST, UNSEAL_PER_SEC)),
            unsealing: tokio::sync::Mutex::new(()),
            unsealed: OnceLock::new(),
        }
    }

    /// The full KMS's state, once unsealed.
    pub(crate) fn state(&self) -> Option<&Arc<ServerState>> {
        self.unsealed.get().map(|(state, _)| state)
    }

    /// The router: the sealed actions until an unseal succeeds, the full KMS after.
    pub(crate) fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(dispatch).with_state(self)
    }

    /// Opens the owner's sealed root key and the store with it; on success the server is the
    /// full KMS from the next request on.
    async fn unseal(&self, body: &[u8]) -> Result<Value, ApiError> {
        rate_limit(&self.attempts)?;
        let value: Value = serde_json::from_slice(body).map_err(|_| RequestError::ParamType)?;
        let field = |name: &str| -> Result<Vec<u8>, ApiError> {
            let text = value
                .get(name)
                .and_then(Value::as_str)
                .ok_or(RequestError::MissingParameters)?;
            BASE64.decode(text).map_err(|_| ApiError::Base64)
        };
        let (encapsulated, sealed_root_key) = (field("enc")?, field("sealed_root_key")?);
        // The last audit head the owner saw: a store whose log does not hold it is older
        // than the one the owner last unsealed (docs/attestation.md §9.1).
        let owners_head: Option<AuditHead> = match value.get("audit_head") {
            None | Some(Value::Null) => None,
            Some(head) => {
                Some(serde_json::from_value(head.clone()).map_err(|_| RequestError::ParamType)?)
            }
        };
        let _one_at_a_time = self.unsealing.lock().await;
        if self.unsealed.get().is_some() {
            return Err(ApiError::NotSealed);
        }
        let opened = self
            .unseal_key
            .open(
                &encapsulated,
                &sealed_root_key,
                &unseal_aad(&self.unseal_public),
            )
            .map_err(|_| {
                ApiError::UnsealFailed(
                    "the sealed root key does not open with this KMS's unseal key (was it \
                     sealed to an earlier start of the KMS?)"
                        .into(),
                )
            })?;
        if opened.len() != 32 {
            return Err(ApiError::UnsealFailed(
                "the root key is not 32 bytes".into(),
            ));
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&opened);
        drop(opened);
        let root = RootKey::from_secret(bytes);
        let root_id = root.id();
        let config = self.config.clone();
        let own = Arc::clone(&self.own);
        let state = tokio::task::spawn_blocking(move || serving_state(&config, root, Some(own)))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| match e {
                ServerError::Store {
                    source: ApiError::RootKeyMismatch,
                    ..
                } => ApiError::UnsealFailed("the root key does not open this KMS's store".into()),
                other => ApiError::Internal(other.to_string()),
            })?;
        if let Some(head) = &owners_head {
            let holds = match state.audit() {
                Some(log) => log
                    .holds(head)
                    .map_err(|e| ApiError::Internal(format!("audit log: {e}")))?,
                None => {
                    return Err(ApiError::UnsealFailed(
                        "this KMS keeps no audit log, so it cannot show that its store is not \
                         older than the one its owner last unsealed"
                            .into(),
                    ));
                }
            };
            if !holds {
                tracing::warn!(
                    owners_seq = head.seq,
                    "unseal refused: the store's audit log does not hold the owner's last head"
                );
                return Err(ApiError::UnsealFailed(format!(
                    "the KMS's store is older than the one its owner last unsealed: its audit \
                     log does not hold entry {} as the owner saw it (a restored backup or \
                     snapshot?)",
                    head.seq
                )));
            }
        }
        let state = Arc::new(state);
        crate::api::audit_unseal(&state, &root_id).await?;
        let head = state.audit().map(|log| log.head());
        let kms_id = state.store.kms_id().to_string();
        let router = crate::router(Arc::clone(&state));
        if self.unsealed.set((state, router)).is_err() {
            return Err(ApiError::NotSealed);
        }
        tracing::info!(
            kms_id,
            root_id = hex::encode(root_id),
            "unsealed: an owner's root key opened the store"
        );
        Ok(json!({"kms_id": kms_id, "root_id": hex::encode(root_id), "audit_head": head}))
    }

    /// What a sealed KMS answers to `action`.
    async fn answer(&self, action: &str, query: &ActionQuery, body: Option<&[u8]>) -> Value {
        let result = match (action, body) {
            ("GetVersion", None) => Ok(crate::api::version_answer("", None, true)),
            ("GenerateQuote", None) => self.own.quote(
                query.challenge.as_deref(),
                "",
                KmsKeyState::Sealed {
                    unseal_key: self.unseal_public,
                },
            ),
            ("Unseal", Some(body)) => self.unseal(body).await,
            _ => Err(ApiError::Sealed),
        };
        match result {
            Ok(result) => {
                let message =
                    Action::from_name(action).map_or("successful", Action::success_message);
                json!({"code": 200, "message": message, "result": result})
            }
            Err(err) => {
                tracing::info!(action, outcome = %err, "request to the sealed KMS refused");
                err.answer().to_json()
            }
        }
    }
}

async fn dispatch(State(kms): State<Arc<SealedKms>>, request: Request) -> Response {
    if let Some((_, router)) = kms.unsealed.get() {
        return router.clone().oneshot(request).await.into_response();
    }
    match request.uri().path() {
        "/ehsm" => {}
        "/metrics" => {
            // Scrapers see that the KMS waits for its owner.
            return "# TYPE ppml_kms_sealed gauge\nppml_kms_sealed 1\n".into_response();
        }
        _ => return axum::http::StatusCode::NOT_FOUND.into_response(),
    }
    let query = Query::<ActionQuery>::try_from_uri(request.uri())
        .map(|Query(query)| query)
        .unwrap_or_default();
    let action = query.action.clone().unwrap_or_default();
    let body = if request.method() == axum::http::Method::POST {
        match axum::body::to_bytes(request.into_body(), MAX_BODY).await {
            Ok(bytes) => Some(bytes),
            Err(_) => return axum::Json(ApiError::TooLarge.answer().to_json()).into_response(),
        }
    } else {
        None
    };
    let answer = kms.answer(&action, &query, body.as_deref()).await;
    axum::Json(answer).into_response()
}
