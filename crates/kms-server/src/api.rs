//! The eHSM REST API: `GET /ehsm?Action=Enroll|GetVersion|GenerateQuote`,
//! `POST /ehsm?Action=...`, and `GET /metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use ppml_kms::ehsm::{self, ReplayCache, RequestError};
use ppml_kms::grant::SignedGrant;
use ppml_kms::owner;
use ppml_kms::protocol::{Action, OwnerAuthority};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use ring::aead::LessSafeKey;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ApiError;
use crate::audit::{AuditEntry, AuditLog};
use crate::store::{self, Release, Store, random};
use ppml_attestation::evidence::Evidence;
use ppml_attestation::policy::AllowedMeasurement;
use ppml_attestation::release::seal_to;
use ppml_attestation::service::{
    AttestError, AttestationRequest, AttestationService, CHALLENGE_TTL_SECS, verify_token,
};
use ppml_attestation::{Policy, Tee};

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest plaintext accepted by Encrypt (eHSM's limit).
pub const MAX_PLAINTEXT: usize = 6 * 1024;
const CIPHERTEXT_VERSION: u8 = 1;
const AAD_DATA: &[u8] = b"ppml-kms-server/v1 data\0";

/// Metric labels of requests that are not protocol actions: the BigDL-RAS endpoints, and
/// every unknown name (so clients cannot create new series).
const OTHER_LABELS: [&str; 4] = [
    "RasRegisterPolicy",
    "RasVerifyQuote",
    "RasEnroll",
    "unknown",
];

/// Actions that write to the store (an fsync) or scan it: run on the blocking pool. The others
/// are served from the store's caches and run on the async workers.
fn is_blocking(action: Option<Action>) -> bool {
    use Action as A;
    matches!(
        action,
        Some(
            A::VerifyQuote
                | A::GenerateQuote
                | A::SetKeyReleasePolicy
                | A::UploadQuotePolicy
                | A::Attest
                | A::Enroll
                | A::CreateKey
                | A::EnableKey
                | A::DisableKey
                | A::DeleteKey
                | A::RotateKey
                | A::ListKey
        )
    )
}

/// The action's name as a metric label: an [`Action`]'s name or one of [`OTHER_LABELS`].
fn action_label(action: &str) -> &'static str {
    match Action::from_name(action) {
        Some(known) => known.name(),
        None => OTHER_LABELS
            .iter()
            .find(|a| **a == action)
            .copied()
            .unwrap_or("unknown"),
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The server's Prometheus metrics, in a registry of its own (so several servers can run in
/// one process).
struct Metrics {
    registry: Registry,
    requests: Family<Labels<2>, Counter>,
    duration: Family<Labels<1>, Histogram, fn() -> Histogram>,
    keys: Family<Labels<1>, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        fn histogram() -> Histogram {
            Histogram::new([
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        }
        let mut registry = Registry::default();
        let requests = Family::<Labels<2>, Counter>::default();
        let duration = Family::<Labels<1>, Histogram, fn() -> Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        let keys = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "ppml_kms_requests",
            "KMS requests by action and outcome (ok or the error kind)",
            requests.clone(),
        );
        registry.register_with_unit(
            "ppml_kms_request_duration",
            "Time to serve a KMS request, by action",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "ppml_kms_keys",
            "Primary keys in the store, by state",
            keys.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            keys,
        }
    }

    fn record(&self, action: &str, outcome: &'static str, started: Instant) {
        let action = action_label(action);
        self.requests
            .get_or_create(&[("action", action), ("outcome", outcome)])
            .inc();
        self.duration
            .get_or_create(&[("action", action)])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Shared state of the server.
pub struct ServerState {
    /// The persistent store.
    pub store: Store,
    replay: ReplayCache,
    metrics: Metrics,
    audit: Option<AuditLog>,
    attestation: Option<AttestationService>,
    request_ids: RequestIds,
    bigdl_ras: bool,
    pub(crate) enrollments: std::sync::Mutex<TokenBucket>,
    own_evidence: Option<Arc<OwnEvidence>>,
    /// [`Store::root_id`], computed once for `GenerateQuote`.
    own_root_id: [u8; 32],
}

/// The KMS's own TEE, which answers `GenerateQuote` (docs/attestation.md §8), sealed or not.
pub(crate) struct OwnEvidence {
    provider: Arc<dyn ppml_attestation::EvidenceProvider>,
    /// SHA-256 of the TLS certificate the server presents (zeros for plain HTTP).
    tls_cert_sha256: [u8; 32],
    quotes: std::sync::Mutex<TokenBucket>,
}

impl OwnEvidence {
    pub(crate) fn new(
        provider: Arc<dyn ppml_attestation::EvidenceProvider>,
        tls_cert_sha256: Option<[u8; 32]>,
    ) -> Self {
        OwnEvidence {
            provider,
            tls_cert_sha256: tls_cert_sha256.unwrap_or([0; 32]),
            quotes: std::sync::Mutex::new(TokenBucket::new(QUOTE_BURST, QUOTE_PER_SEC)),
        }
    }

    /// `GenerateQuote`'s answer: evidence over the client's challenge, the TLS certificate,
    /// `kms_id` and the key `state`.
    pub(crate) fn quote(
        &self,
        challenge: Option<&str>,
        kms_id: &str,
        state: ppml_attestation::peer::KmsKeyState,
    ) -> Result<Value, ApiError> {
        use ppml_attestation::peer::{
            KmsKeyState, MAX_CHALLENGE_LEN, MIN_CHALLENGE_LEN, kms_quote_report_data,
        };
        let challenge = BASE64
            .decode(challenge.ok_or(RequestError::MissingParameters)?)
            .map_err(|_| ApiError::Base64)?;
        if !(MIN_CHALLENGE_LEN..=MAX_CHALLENGE_LEN).contains(&challenge.len()) {
            return Err(ApiError::PayloadType);
        }
        rate_limit(&self.quotes)?;
        let report_data = kms_quote_report_data(&challenge, &self.tls_cert_sha256, kms_id, &state);
        let evidence = self.provider.evidence(&report_data).map_err(|e| {
            tracing::error!(error = %e, "the KMS's own evidence is unavailable");
            ApiError::AttestationFailed(format!("the KMS's evidence is unavailable: {e}"))
        })?;
        let mut answer = json!({
            "challenge": BASE64.encode(&challenge),
            "tee": evidence.tee.to_string(),
            "quote": BASE64.encode(&evidence.quote),
            "kms_id": kms_id,
        });
        match state {
            KmsKeyState::Sealed { unseal_key } => {
                answer["sealed"] = json!(true);
                answer["unseal_key"] = json!(hex::encode(unseal_key));
            }
            KmsKeyState::Unsealed { root_id } => {
                answer["sealed"] = json!(false);
                answer["root_id"] = json!(hex::encode(root_id));
            }
        }
        Ok(answer)
    }
}

/// A budget of `capacity` events at once, refilled by one per `refill` (enrollments: each
/// makes a durable record, and `Enroll` needs no credential).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    refill_per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(capacity: u32, refill_per_sec: f64) -> Self {
        TokenBucket {
            capacity: f64::from(capacity),
            refill_per_sec,
            tokens: f64::from(capacity),
            last: Instant::now(),
        }
    }

    /// Takes one event from the budget, or says there is none left.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_sec).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Takes one event from `bucket`, or refuses the request (`rate_limited`).
pub(crate) fn rate_limit(bucket: &std::sync::Mutex<TokenBucket>) -> Result<(), ApiError> {
    if bucket
        .lock()
        .is_ok_and(|mut bucket| bucket.take(Instant::now()))
    {
        Ok(())
    } else {
        Err(ApiError::RateLimited)
    }
}

/// `Enroll`s allowed at once, and the refill per second after that.
const ENROLL_BURST: u32 = 30;
const ENROLL_PER_SEC: f64 = 1.0;
/// `GenerateQuote` needs no credential either, and a hardware quote costs milliseconds.
const QUOTE_BURST: u32 = 256;
const QUOTE_PER_SEC: f64 = 64.0;

/// Request ids: a random prefix per server start and a counter, e.g. `3f9a01c2-42`.
#[derive(Debug)]
struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let prefix = ppml_kms::sealing::random::<4>().map(hex::encode);
        RequestIds {
            prefix: prefix.unwrap_or_else(|| format!("{:08x}", now_ms() as u32)),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// What the audit entry of a request needs to know besides its outcome; filled in as far as
/// the request could be parsed.
#[derive(Debug, Default, Clone)]
struct RequestContext {
    request_id: String,
    appid: String,
    keyid: String,
    /// The token claims of a successful attestation or key release, for the audit entry.
    attestation: Option<String>,
    /// What a change changed (`AuditEntry::detail`).
    detail: Option<String>,
    /// The request's replay id, once its signature verified.
    replay: Option<ppml_kms::ehsm::ReplayId>,
    /// The change's entry was written ahead of its commit ([`write_ahead`]).
    audited: bool,
}

impl RequestContext {
    fn new(request_id: String) -> Self {
        RequestContext {
            request_id,
            ..RequestContext::default()
        }
    }

    /// The audit entry of the request with `result`, leaving the context as it was (for an
    /// entry written ahead of a change).
    fn entry(&self, action: &str, result: &Result<Value, ApiError>) -> AuditEntry {
        self.clone().into_entry(action, result)
    }

    /// The audit entry of the request with `result`.
    fn into_entry(self, action: &str, result: &Result<Value, ApiError>) -> AuditEntry {
        let keyid = match (result, self.keyid.is_empty()) {
            (Ok(value), true) => value
                .get("keyid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => self.keyid,
        };
        let (outcome, code) = match result {
            Ok(_) => ("ok".to_string(), 200),
            Err(e) => (e.message(), e.code()),
        };
        AuditEntry {
            request_id: self.request_id,
            appid: self.appid,
            action: action.to_string(),
            keyid,
            outcome,
            code,
            attestation: self.attestation.filter(|_| result.is_ok()),
            detail: self.detail,
            replay: self.replay.map(hex::encode),
        }
    }
}

/// Makes the audit entry of a change durable before the change commits (called from the
/// store's [`store::BeforeCommit`] hook, on the blocking pool): a change the log cannot record
/// never takes effect, and once the log has failed every later change is refused.
fn write_ahead(
    state: &ServerState,
    context: &mut RequestContext,
    action: Action,
) -> Result<(), ApiError> {
    if let Some(audit) = &state.audit {
        audit
            .append(context.entry(action.name(), &Ok(Value::Null)))
            .map_err(|e| ApiError::Internal(format!("audit log: {e}")))?;
    }
    context.audited = true;
    Ok(())
}

/// `{"policy_id", "policy_sha256"}` of a stored policy, for the audit entry of a change that
/// stores or assigns it.
fn policy_detail(policy_id: &str, policy_text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, policy_text.as_bytes());
    json!({"policy_id": policy_id, "policy_sha256": hex::encode(digest.as_ref())}).to_string()
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// State over `store`.
    pub fn new(store: Store) -> Self {
        ServerState {
            store,
            replay: ReplayCache::default(),
            metrics: Metrics::new(),
            audit: None,
            attestation: None,
            request_ids: RequestIds::new(),
            bigdl_ras: false,
            enrollments: std::sync::Mutex::new(TokenBucket::new(ENROLL_BURST, ENROLL_PER_SEC)),
            own_evidence: None,
            own_root_id: [0; 32],
        }
    }

    /// Answers `GenerateQuote` with evidence from `provider`, the TEE this server runs in,
    /// binding the SHA-256 of the TLS certificate it serves (`None`: plain HTTP, bound as
    /// zeros) and the id of its root key, so clients can verify the KMS before they trust it
    /// (docs/attestation.md §8).
    pub fn with_own_evidence(
        self,
        provider: Arc<dyn ppml_attestation::EvidenceProvider>,
        tls_cert_sha256: Option<[u8; 32]>,
    ) -> Self {
        self.with_own(Arc::new(OwnEvidence::new(provider, tls_cert_sha256)))
    }

    pub(crate) fn with_own(mut self, own: Arc<OwnEvidence>) -> Self {
        self.own_evidence = Some(own);
        self.own_root_id = self.store.root_id();
        self
    }

    /// Records every request in `audit` (docs/kms-audit.md) before answering it; when the log
    /// cannot be written, requests fail (fail closed).
    /// The signed requests the log accepted in the replay window before a restart stay
    /// refused as replays.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.replay.preload(audit.take_recent_replays());
        self.audit = Some(audit);
        self
    }

    /// Also serves BigDL-RAS's `/registerPolicy` and `/verifyQuote` (docs/attestation.md
    /// §6.5). They are off by default: they take the api key in the request body, unsigned.
    pub fn with_bigdl_ras(mut self) -> Self {
        self.bigdl_ras = true;
        self
    }

    /// Serves the attestation actions with `service` (docs/attestation.md §7).
    pub fn with_attestation(mut self, service: AttestationService) -> Self {
        self.attestation = Some(service);
        self
    }

    /// The audit log, if one is attached.
    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// The attestation service, if attached (for the BigDL-RAS endpoints, `ras.rs`).
    pub(crate) fn attestation(&self) -> Option<&AttestationService> {
        self.attestation.as_ref()
    }

    /// A new request id, as in every response's `x-request-id` (for `ras.rs`).
    pub(crate) fn next_request_id(&self) -> String {
        self.request_ids.next()
    }

    /// Counts a request in the metrics (for `ras.rs`; `action` must be one of [`OTHER_LABELS`]).
    pub(crate) fn record_request(&self, action: &str, outcome: &'static str, started: Instant) {
        self.metrics.record(action, outcome, started);
    }

    /// The metrics in the Prometheus text format (0.0.4); reads the key counts from the store.
    pub fn render_metrics(&self) -> Result<String, ApiError> {
        let (enabled, disabled) = self.store.key_counts()?;
        let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .keys
            .get_or_create(&[("state", "enabled")])
            .set(as_gauge(enabled));
        self.metrics
            .keys
            .get_or_create(&[("state", "disabled")])
            .set(as_gauge(disabled));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.metrics.registry)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(out)
    }
}

/// The HTTP router.
pub fn router(state: Arc<ServerState>) -> Router {
    let api = Router::new()
        .route("/ehsm", get(handle_get).post(handle_post))
        .route("/metrics", get(handle_metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::clone(&state));
    if state.bigdl_ras {
        api.merge(crate::ras::router(state))
    } else {
        api
    }
}

async fn handle_metrics(State(state): State<Arc<ServerState>>) -> Response {
    let rendered = tokio::task::spawn_blocking(move || state.render_metrics())
        .await
        .unwrap_or_else(|e| Err(ApiError::Internal(e.to_string())));
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = ?e, "rendering metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[derive(Default, Deserialize)]
pub(crate) struct ActionQuery {
    #[serde(rename = "Action")]
    pub(crate) action: Option<String>,
    /// `Enroll`: the owner's Ed25519 public key (base64url).
    owner_key: Option<String>,
    /// `GenerateQuote`: the client's challenge (base64).
    pub(crate) challenge: Option<String>,
}

/// `GetVersion`'s answer, sealed (no store open: an empty `kms_id`) or not.
pub(crate) fn version_answer(kms_id: &str, attestation_key: Option<String>, sealed: bool) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git_sha": "",
        "kms_id": kms_id,
        "attestation_key": attestation_key,
        "sealed": sealed,
    })
}

/// Records in the audit log that an owner's root key, with id `root_id`, unsealed the KMS:
/// the log's first entry after every start of a KMS in a TEE.
pub(crate) async fn audit_unseal(state: &ServerState, root_id: &[u8; 32]) -> Result<(), ApiError> {
    let Some(audit) = &state.audit else {
        return Ok(());
    };
    let mut context = RequestContext::new(state.request_ids.next());
    context.detail = Some(json!({"root_id": hex::encode(root_id)}).to_string());
    audit
        .append_async(context.into_entry(Action::Unseal.name(), &Ok(json!({}))))
        .await
        .map(drop)
        .map_err(|e| ApiError::Internal(format!("audit log: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes the audit entry (when a log is attached), then answers. If the entry cannot be
/// made durable the client gets an internal error instead of the result: nothing is answered
/// that the audit log does not hold.
async fn respond(
    state: &ServerState,
    action: &str,
    context: RequestContext,
    started: Instant,
    mut result: Result<Value, ApiError>,
) -> Response {
    let request_id = context.request_id.clone();
    // A change that succeeded was logged before it committed; a change whose commit failed
    // after that gets a second entry with the failure.
    let logged_ahead = context.audited && result.is_ok();
    if let (Some(audit), false) = (&state.audit, logged_ahead) {
        let entry = context.into_entry(action, &result);
        if let Err(e) = audit.append_async(entry).await {
            result = Err(ApiError::Internal(format!("audit log: {e}")));
        }
    }
    let body = match result {
        Ok(result) => {
            state.metrics.record(action, "ok", started);
            tracing::debug!(action, request_id, outcome = "ok", "request");
            let message = Action::from_name(action).map_or("successful", Action::success_message);
            json!({"code": 200, "message": message, "result": result})
        }
        Err(err) => {
            state.metrics.record(action, err.kind(), started);
            if let ApiError::Internal(detail) = &err {
                tracing::error!(action, request_id, detail, "request failed");
            } else {
                tracing::info!(action, request_id, outcome = %err, "request rejected");
            }
            err.answer().to_json()
        }
    };
    ([("x-request-id", request_id)], Json(body)).into_response()
}

/// Runs `work` on the blocking pool for the actions of [`is_blocking`], inline otherwise.
async fn run_action<T: Send + 'static>(
    state: &Arc<ServerState>,
    action: &str,
    work: impl FnOnce(&ServerState) -> T + Send + 'static,
) -> Result<T, ApiError> {
    if is_blocking(Action::from_name(action)) {
        let state = Arc::clone(state);
        tokio::task::spawn_blocking(move || work(&state))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))
    } else {
        Ok(work(state))
    }
}

/// The answer to a query string that does not parse (a repeated `Action`, say): eHSM's
/// envelope with `param type error`, like every other refusal, rather than axum's plain text.
async fn malformed_query(state: &ServerState, started: Instant) -> Response {
    let context = RequestContext::new(state.request_ids.next());
    let refused = Err(ApiError::Request(RequestError::ParamType));
    respond(state, "", context, started, refused).await
}

async fn handle_get(
    State(state): State<Arc<ServerState>>,
    query: Result<Query<ActionQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let Ok(Query(q)) = query else {
        return malformed_query(&state, started).await;
    };
    let action = q.action.clone().unwrap_or_default();
    let request_id = state.request_ids.next();
    let (result, context) = run_action(&state, &action, {
        let action = action.clone();
        let request_id = request_id.clone();
        move |state| {
            let mut context = RequestContext::new(request_id);
            let result = unsigned(state, &action, &q, &mut context);
            (result, context)
        }
    })
    .await
    .unwrap_or_else(|e| (Err(e), RequestContext::new(request_id)));
    respond(&state, &action, context, started, result).await
}

async fn handle_post(
    State(state): State<Arc<ServerState>>,
    query: Result<Query<ActionQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let Ok(Query(q)) = query else {
        return malformed_query(&state, started).await;
    };
    let action = q.action.unwrap_or_default();
    let request_id = state.request_ids.next();
    let (result, context) = match body {
        Err(_) => (Err(ApiError::TooLarge), RequestContext::new(request_id)),
        Ok(body) => run_action(&state, &action, {
            let action = action.clone();
            let request_id = request_id.clone();
            move |state| {
                let mut context = RequestContext::new(request_id);
                let result = signed(state, &action, &body, &mut context);
                (result, context)
            }
        })
        .await
        .unwrap_or_else(|e| (Err(e), RequestContext::new(request_id))),
    };
    respond(&state, &action, context, started, result).await
}

fn unsigned(
    state: &ServerState,
    action: &str,
    query: &ActionQuery,
    context: &mut RequestContext,
) -> Result<Value, ApiError> {
    match action {
        "Enroll" => {
            let owner_key = match query.owner_key.as_deref() {
                None => None,
                Some(text) => {
                    Some(ppml_kms::owner::parse_public_key(text).ok_or(ApiError::PayloadType)?)
                }
            };
            rate_limit(&state.enrollments)?;
            if let Some(key) = owner_key {
                context.detail =
                    Some(json!({"owner_key": URL_SAFE_NO_PAD.encode(key)}).to_string());
            }
            let (appid, apikey) = state.store.enroll(now_ms(), owner_key, &mut |appid| {
                context.appid = appid.to_string();
                write_ahead(state, context, Action::Enroll)
            })?;
            Ok(json!({"appid": appid, "apikey": *apikey}))
        }
        "GetVersion" => Ok(version_answer(
            state.store.kms_id(),
            state
                .attestation
                .as_ref()
                .map(|a| hex::encode(a.public_key())),
            false,
        )),
        "GenerateQuote" => generate_quote(state, query.challenge.as_deref()),
        "Unseal" => Err(ApiError::NotSealed),
        _ => Err(ApiError::UnknownAction),
    }
}

/// The KMS's quote over a client's challenge, its TLS certificate, its id and its root id.
fn generate_quote(state: &ServerState, challenge: Option<&str>) -> Result<Value, ApiError> {
    let own = state
        .own_evidence
        .as_ref()
        .ok_or_else(|| ApiError::AttestationFailed("this KMS does not run in a TEE".into()))?;
    own.quote(
        challenge,
        state.store.kms_id(),
        ppml_attestation::peer::KmsKeyState::Unsealed {
            root_id: state.own_root_id,
        },
    )
}

/// Validates the envelope (docs/kms-api.md §4, in that order) and runs the action.
fn signed(
    state: &ServerState,
    action: &str,
    body: &[u8],
    context: &mut RequestContext,
) -> Result<Value, ApiError> {
    let action = Action::from_name(action).ok_or(ApiError::UnknownAction)?;
    if !action.is_signed() {
        // eHSM's clients (BigDL's) POST GenerateQuote with `{payload: {challenge}}`; the
        // answer is public, so their signature need not be checked.
        let challenge = (action == Action::GenerateQuote)
            .then(|| serde_json::from_slice::<Value>(body).ok())
            .flatten()
            .and_then(|v| {
                v.pointer("/payload/challenge")?
                    .as_str()
                    .map(str::to_string)
            });
        let query = ActionQuery {
            challenge,
            ..ActionQuery::default()
        };
        return unsigned(state, action.name(), &query, context);
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| RequestError::ParamType)?;
    let obj = value.as_object().ok_or(RequestError::ParamType)?;
    let (Some(appid), Some(timestamp), Some(sign)) =
        (obj.get("appid"), obj.get("timestamp"), obj.get("sign"))
    else {
        return Err(RequestError::MissingParameters.into());
    };
    let payload = obj.get("payload");
    if payload.is_none() && action.needs_payload() {
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
    context.appid = appid.chars().take(128).collect();
    let empty = Map::new();
    let payload = match payload {
        None => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => return Err(RequestError::ParamType.into()),
    };
    if let Some(keyid) = payload.get("keyid").and_then(Value::as_str) {
        context.keyid = keyid.chars().take(128).collect();
    }
    let now = now_ms();
    ehsm::check_timestamp(timestamp, now)?;
    let replay_id = state.replay.check(appid, timestamp, nonce, now)?;
    let auth = state.store.app_auth(appid)?.ok_or(RequestError::Sign)?;
    if !ehsm::verify(&auth.apikey, obj, sign) {
        return Err(RequestError::Sign.into());
    }
    state.replay.record(replay_id, now)?;
    context.replay = Some(replay_id);
    check_authority(state, action, appid, obj, payload, &auth)?;
    use Action as A;
    match action {
        A::UploadQuotePolicy
        | A::GetQuotePolicy
        | A::AttestChallenge
        | A::Attest
        | A::SetKeyReleasePolicy
        | A::ReleaseDataKey
        | A::GenerateSealedDataKey
        | A::VerifyQuote => attestation_action(state, action, appid, payload, &auth, context),
        _ => run(state, action, appid, payload, context),
    }
}

/// The checks after the signature (`docs/kms-api.md` §4 rule 7 and §4.1): the body names the
/// action it was signed for, and the owner signed what only the owner may do.
fn check_authority(
    state: &ServerState,
    action: Action,
    appid: &str,
    body: &Map<String, Value>,
    payload: &Map<String, Value>,
    auth: &store::AppAuth,
) -> Result<(), ApiError> {
    let named = match body.get(owner::ACTION_FIELD) {
        None => false,
        Some(Value::String(name)) if name == action.name() => true,
        Some(_) => return Err(ApiError::ActionNotSigned),
    };
    if !named && action.needs_signed_action() {
        return Err(ApiError::ActionNotSigned);
    }
    let needs_owner = match action.owner_authority() {
        OwnerAuthority::NotNeeded => false,
        OwnerAuthority::OwnerOnly => true,
        // Apps enrolled without an owner key keep eHSM's rules: the api key is everything.
        OwnerAuthority::Required => auth.owner_key.is_some(),
        OwnerAuthority::ForMarkedKeys => {
            auth.owner_key.is_some()
                && state
                    .store
                    .release_policy(appid, field(payload, "keyid")?)?
                    .is_some()
        }
    };
    if !needs_owner {
        return Ok(());
    }
    let (Some(public_key), true, Some(Value::String(signature))) =
        (auth.owner_key, named, body.get(owner::OWNER_SIGN_FIELD))
    else {
        return Err(ApiError::OwnerSignatureRequired);
    };
    if !owner::verify_request(&public_key, body, signature) {
        return Err(ApiError::OwnerSignatureRequired);
    }
    Ok(())
}

fn b64_field(payload: &Map<String, Value>, name: &str) -> Result<Vec<u8>, ApiError> {
    BASE64
        .decode(field(payload, name)?)
        .map_err(|_| ApiError::Base64)
}

/// The attestation actions (docs/attestation.md §7).
fn attestation_action(
    state: &ServerState,
    action: Action,
    appid: &str,
    payload: &Map<String, Value>,
    auth: &store::AppAuth,
    context: &mut RequestContext,
) -> Result<Value, ApiError> {
    let service = state.attestation.as_ref().ok_or_else(|| {
        // A server without the service (a library embedding): a refusal, not a fault.
        ApiError::AttestationFailed("this KMS has no attestation service".into())
    })?;
    let now_secs = now_ms() / 1000;
    match action {
        Action::UploadQuotePolicy => {
            // ppml's policy document, or eHSM's {mr_enclave, mr_signer} shape.
            let policy = match payload.get("policy") {
                Some(Value::String(text)) => {
                    serde_json::from_str::<Policy>(text).map_err(|_| ApiError::PayloadType)?
                }
                Some(_) => return Err(ApiError::PayloadType),
                None => {
                    let entry = AllowedMeasurement {
                        tee: Some(Tee::Sgx),
                        mrenclave: Some(optional_str(payload, "mr_enclave")?.to_string())
                            .filter(|s| !s.is_empty()),
                        mrsigner: Some(optional_str(payload, "mr_signer")?.to_string())
                            .filter(|s| !s.is_empty()),
                        ..AllowedMeasurement::default()
                    };
                    if entry.mrenclave.is_none() && entry.mrsigner.is_none() {
                        return Err(ApiError::PayloadType);
                    }
                    Policy::strict(vec![entry])
                }
            };
            policy.check().map_err(|_| ApiError::PayloadType)?;
            if !policy.kms_root_ids.is_empty() {
                // Root ids judge a KMS; a key's release policy judges runtimes.
                return Err(ApiError::PayloadType);
            }
            let text =
                serde_json::to_string(&policy).map_err(|e| ApiError::Internal(e.to_string()))?;
            let id = state.store.put_policy(appid, &text, now_ms(), &mut |id| {
                context.detail = Some(policy_detail(id, &text));
                write_ahead(state, context, action)
            })?;
            Ok(json!({"policyId": id}))
        }
        Action::GetQuotePolicy => {
            // ppml's policy document, and eHSM's fields (its first SGX measurement).
            let id = field(payload, "policyId")?;
            let (text, created_ms) = state.store.policy_record(appid, id)?;
            let policy: Policy =
                serde_json::from_str(&text).map_err(|e| ApiError::Internal(e.to_string()))?;
            let sgx = policy
                .allowed
                .iter()
                .find(|m| m.mrenclave.is_some() || m.mrsigner.is_some());
            Ok(json!({
                "policyId": id,
                "policy": text,
                "mr_enclave": sgx.and_then(|m| m.mrenclave.clone()).unwrap_or_default(),
                "mr_signer": sgx.and_then(|m| m.mrsigner.clone()).unwrap_or_default(),
                "createTime": created_ms,
            }))
        }
        Action::AttestChallenge => {
            let nonce = service
                .challenge_for(appid, now_secs)
                .map_err(|e| match e {
                    AttestError::TooManyChallenges => ApiError::AttestationFailed(e.to_string()),
                    e => ApiError::Internal(e.to_string()),
                })?;
            Ok(json!({"nonce": BASE64.encode(nonce), "expires_in": CHALLENGE_TTL_SECS}))
        }
        Action::Attest => {
            let policy_id = field(payload, "policyId")?;
            let policy: Policy = serde_json::from_str(&state.store.policy(appid, policy_id)?)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let tee: Tee = field(payload, "tee")?
                .parse()
                .map_err(|_| ApiError::PayloadType)?;
            let evidence = Evidence {
                tee,
                quote: b64_field(payload, "quote")?,
            };
            let nonce = b64_field(payload, "nonce")?;
            let runtime_key = b64_field(payload, "runtime_key")?;
            let receipt_key = match payload.get("receipt_key") {
                None => None,
                Some(_) => Some(b64_field(payload, "receipt_key")?),
            };
            let request = AttestationRequest {
                app: appid,
                policy_name: policy_id,
                policy: &policy,
                nonce: &nonce,
                runtime_key: &runtime_key,
                receipt_key: receipt_key.as_deref(),
                evidence: &evidence,
            };
            match service.attest_with_claims(&request, now_secs) {
                Ok((token, issued)) => {
                    context.attestation = serde_json::to_string(&issued).ok();
                    Ok(json!({"token": token}))
                }
                Err(AttestError::Random) => {
                    Err(ApiError::Internal("random generator failed".into()))
                }
                Err(e) => Err(ApiError::AttestationFailed(e.to_string())),
            }
        }
        Action::VerifyQuote => {
            // eHSM's action: verify a DCAP quote against one of the app's policies. The nonce
            // is echoed; unlike `Attest` it is not a server challenge, so the answer proves
            // nothing about freshness (see docs/attestation.md §6.2).
            // As eHSM answers it: `result` is Intel's sgx_ql_qv_result_t and `sign` the HMAC of
            // the other fields under the app's api key, which BigDL's clients read.
            let quote = b64_field(payload, "quote")?;
            let nonce = optional_str(payload, "nonce")?;
            let policy: Option<Policy> = match optional_str(payload, "policyId")? {
                "" => None,
                id => Some(
                    serde_json::from_str(&state.store.policy(appid, id)?)
                        .map_err(|e| ApiError::Internal(e.to_string()))?,
                ),
            };
            let outcome = service.verify_any_quote(&quote, policy.as_ref(), now_secs);
            let mut answer = Map::new();
            answer.insert(
                "result".into(),
                json!(ppml_attestation::service::sgx_ql_qv_result(&outcome)),
            );
            answer.insert("nonce".into(), json!(nonce));
            match &outcome {
                Ok(claims) => {
                    // eHSM also reports the measurements of a quote that verified.
                    let m = &claims.measurements;
                    answer.insert(
                        "mr_enclave".into(),
                        json!(m.mrenclave.as_deref().unwrap_or("")),
                    );
                    answer.insert(
                        "mr_signer".into(),
                        json!(m.mrsigner.as_deref().unwrap_or("")),
                    );
                    answer.insert("tcb_status".into(), json!(claims.tcb_status));
                }
                Err(e) => tracing::info!(appid, reason = %e, "VerifyQuote: refused"),
            }
            let sign = ehsm::sign(&auth.apikey, &answer);
            answer.insert("sign".into(), json!(sign));
            Ok(Value::Object(answer))
        }
        Action::SetKeyReleasePolicy => {
            let keyid = field(payload, "keyid")?;
            let policy_id = field(payload, "policyId")?;
            context.detail = Some(policy_detail(
                policy_id,
                &state.store.policy(appid, policy_id)?,
            ));
            state
                .store
                .set_release_policy(appid, keyid, policy_id, &mut |_| {
                    write_ahead(state, context, action)
                })?;
            Ok(json!({}))
        }
        Action::GenerateSealedDataKey => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let keylen = data_key_len(payload)?;
            let required = state.store.release_policy(appid, keyid)?;
            let (token, runtime_key) =
                check_token(service, payload, appid, required.as_deref(), now_secs)?;
            let use_ = GrantedUse::Generation { keyid, aad };
            check_grant(
                appid,
                auth,
                required.is_some(),
                payload,
                use_,
                now_secs,
                context,
            )?;
            let (version, key) = state.store.usable_key(appid, keyid)?;
            let data_key = random_data_key(keylen)?;
            let ciphertext = encrypt(&key, version, keyid, aad, &data_key)?;
            let (encapsulated, sealed) = seal_to(&runtime_key, &data_key, keyid.as_bytes())
                .map_err(|e| ApiError::AttestationFailed(e.to_string()))?;
            context.attestation = serde_json::to_string(&token).ok();
            Ok(
                json!({"ciphertext": ciphertext, "encapsulated_key": BASE64.encode(encapsulated),
                      "sealed_key": BASE64.encode(sealed)}),
            )
        }
        Action::ReleaseDataKey => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let Some(required) = state.store.release_policy(appid, keyid)? else {
                return Err(ApiError::NotMarkedForRelease);
            };
            let (token, runtime_key) =
                check_token(service, payload, appid, Some(&required), now_secs)?;
            check_grant(
                appid,
                auth,
                true,
                payload,
                GrantedUse::Release { keyid, aad },
                now_secs,
                context,
            )?;
            let plaintext = decrypt(
                &state.store,
                appid,
                keyid,
                aad,
                field(payload, "ciphertext")?,
                Release::Sealed,
            )?;
            let (encapsulated, sealed) = seal_to(&runtime_key, &plaintext, keyid.as_bytes())
                .map_err(|e| ApiError::AttestationFailed(e.to_string()))?;
            tracing::info!(
                appid,
                keyid,
                tee = %token.claims.tee,
                measurement = token.claims.measurements.mrenclave.as_deref()
                    .or(token.claims.measurements.mrtd.as_deref())
                    .unwrap_or(""),
                "data key released to an attested runtime"
            );
            context.attestation = serde_json::to_string(&token).ok();
            Ok(
                json!({"encapsulated_key": BASE64.encode(encapsulated), "ciphertext": BASE64.encode(sealed)}),
            )
        }
        _ => Err(ApiError::UnknownAction),
    }
}

/// What a data-key request asks of a job grant.
#[derive(Clone, Copy)]
enum GrantedUse<'a> {
    /// Unwrap an existing data key (`ReleaseDataKey`).
    Release { keyid: &'a str, aad: &'a str },
    /// Make a new one (`GenerateSealedDataKey`).
    Generation { keyid: &'a str, aad: &'a str },
}

/// The job-grant rule of data-key requests (`docs/kms-api.md` §4.2): in an app with an owner
/// key, a data key of a key marked for attested release goes only to a request carrying a
/// grant the owner signed, for this app, unexpired, that allows this use (the dataset, the
/// output, or the job's shuffle key); a grant sent for any other key is checked the same.
/// Apps without an owner key keep eHSM's rules: the api key is everything. The grant's job id
/// and digest go into the request's audit entry.
fn check_grant(
    appid: &str,
    auth: &store::AppAuth,
    marked: bool,
    payload: &Map<String, Value>,
    use_: GrantedUse<'_>,
    now_secs: u64,
    context: &mut RequestContext,
) -> Result<(), ApiError> {
    let text = match payload.get("grant") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.as_str()),
        Some(_) => return Err(ApiError::PayloadType),
    };
    let Some(owner_key) = auth.owner_key else {
        return Ok(());
    };
    let Some(text) = text else {
        return if marked {
            Err(ApiError::GrantRefused(
                "this key's data keys go only to jobs the data owner granted, and the request \
                 carries no grant"
                    .into(),
            ))
        } else {
            Ok(())
        };
    };
    let signed = SignedGrant::from_text(text)?;
    let grant = signed.verify(&owner_key, appid, now_secs)?;
    match use_ {
        GrantedUse::Release { keyid, aad } => grant.allows_release(keyid, aad)?,
        GrantedUse::Generation { keyid, aad } => grant.allows_generation(keyid, aad)?,
    }
    context.detail =
        Some(json!({"job_id": grant.job_id, "grant_sha256": signed.sha256_hex()}).to_string());
    Ok(())
}

/// The payload's attestation token, checked: signed by this server, not expired, issued to
/// `appid` and, when `required_policy` is given, for exactly that policy. Returns the token
/// and the runtime public key it vouches for.
fn check_token(
    service: &AttestationService,
    payload: &Map<String, Value>,
    appid: &str,
    required_policy: Option<&str>,
    now_secs: u64,
) -> Result<(ppml_attestation::service::TokenClaims, Vec<u8>), ApiError> {
    let token = verify_token(field(payload, "token")?, &service.public_key(), now_secs).map_err(
        |e| match e {
            AttestError::TokenExpired => ApiError::TokenExpired,
            e => ApiError::AttestationFailed(e.to_string()),
        },
    )?;
    if token.sub != appid || required_policy.is_some_and(|p| token.policy != p) {
        return Err(ApiError::AttestationFailed(
            "the token was issued for another app or policy than this key's".into(),
        ));
    }
    let runtime_key = URL_SAFE_NO_PAD
        .decode(&token.runtime_key)
        .map_err(|_| ApiError::AttestationFailed("token runtime key".into()))?;
    Ok((token, runtime_key))
}

/// `keylen` of a data-key request: 1 to 1024 bytes.
fn data_key_len(payload: &Map<String, Value>) -> Result<usize, ApiError> {
    payload
        .get("keylen")
        .and_then(Value::as_u64)
        .filter(|n| (1..=1024).contains(n))
        .map(|n| n as usize)
        .ok_or(ApiError::PayloadType)
}

/// `len` random bytes.
fn random_data_key(len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let mut data_key = zeroize::Zeroizing::new(vec![0u8; len]);
    for chunk in data_key.chunks_mut(32) {
        let bytes = zeroize::Zeroizing::new(random::<32>()?);
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Ok(data_key)
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
    release: Release,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let bytes = BASE64.decode(ciphertext).map_err(|_| ApiError::Base64)?;
    if bytes.len() < 5 || bytes[0] != CIPHERTEXT_VERSION {
        return Err(ApiError::DecryptFailed);
    }
    let version = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
    let key = store.key_version(appid, keyid, version, release)?;
    store::open(&key, &data_aad(keyid, aad), &bytes[5..]).ok_or(ApiError::DecryptFailed)
}

fn run(
    state: &ServerState,
    action: Action,
    appid: &str,
    payload: &Map<String, Value>,
    context: &mut RequestContext,
) -> Result<Value, ApiError> {
    let store = &state.store;
    let mut write_ahead = |id: &str| {
        context.keyid = id.chars().take(128).collect();
        write_ahead(state, context, action)
    };
    match action {
        Action::CreateKey => {
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
            let keyid = store.create_key(appid, keyspec, now_ms(), &mut write_ahead)?;
            Ok(json!({"keyid": keyid}))
        }
        Action::GenerateDataKey | Action::GenerateDataKeyWithoutPlaintext => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let keylen = data_key_len(payload)?;
            let (version, key) = store.usable_key(appid, keyid)?;
            let data_key = random_data_key(keylen)?;
            let ciphertext = encrypt(&key, version, keyid, aad, &data_key)?;
            if action == Action::GenerateDataKey {
                Ok(json!({"plaintext": BASE64.encode(&*data_key), "ciphertext": ciphertext}))
            } else {
                Ok(json!({"ciphertext": ciphertext}))
            }
        }
        Action::Encrypt => {
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
        Action::Decrypt => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let ciphertext = field(payload, "ciphertext")?;
            let plaintext = decrypt(store, appid, keyid, aad, ciphertext, Release::ToCaller)?;
            Ok(json!({"plaintext": BASE64.encode(&*plaintext)}))
        }
        Action::ReEncrypt => {
            let keyid = field(payload, "keyid")?;
            let aad = optional_str(payload, "aad")?;
            let ciphertext = field(payload, "ciphertext")?;
            let plaintext = decrypt(store, appid, keyid, aad, ciphertext, Release::Sealed)?;
            let (version, key) = store.usable_key(appid, keyid)?;
            Ok(json!({"ciphertext": encrypt(&key, version, keyid, aad, &plaintext)?}))
        }
        Action::RotateKey => {
            let keyid = field(payload, "keyid")?;
            let version = store.rotate_key(appid, keyid, &mut write_ahead)?;
            Ok(json!({"keyid": keyid, "version": version}))
        }
        Action::ListKey => {
            let list: Vec<Value> = store
                .list_keys(appid)?
                .into_iter()
                .map(|(keyid, r)| {
                    // eHSM's fields (ppml keys do not expire; aliases are not kept) and the
                    // key version.
                    json!({"keyid": keyid, "keyspec": r.keyspec, "creationDate": r.created_ms,
                           "expireTime": 0, "alias": "",
                           "keyState": if r.enabled { 1 } else { 0 },
                           "keyVersion": r.newest_version()})
                })
                .collect();
            Ok(json!({"list": list}))
        }
        Action::EnableKey | Action::DisableKey => {
            let enable = action == Action::EnableKey;
            store.set_enabled(appid, field(payload, "keyid")?, enable, &mut write_ahead)?;
            Ok(json!({}))
        }
        Action::DeleteKey => {
            store.delete_key(appid, field(payload, "keyid")?, &mut write_ahead)?;
            Ok(json!({}))
        }
        _ => Err(ApiError::UnknownAction),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use crate::RootKey;
    use crate::audit::AuditLog;

    async fn get(app: &Router, action: &str) -> Value {
        let response = app
            .clone()
            .oneshot(
                Request::get(format!("/ehsm?Action={action}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(response.headers().contains_key("x-request-id"));
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// A server embedded without an attestation service refuses the attestation actions with
    /// a reason, as a client error (found by the `kms_action` fuzz target, which must see no
    /// 500 answer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attestation_actions_without_the_service_are_refused_not_faults() {
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = RootKey::generate().unwrap();
        let store = Store::open(dir.path(), root).unwrap();
        let (appid, apikey) = store.enroll(now_ms(), None, &mut |_| Ok(())).unwrap();
        let app = router(Arc::new(ServerState::new(store)));
        for action in ["AttestChallenge", "Attest", "UploadQuotePolicy"] {
            let answer = post(&app, action, &appid, &apikey, json!({"policyId": "x"})).await;
            assert_eq!(answer["kind"], "attestation_failed", "{action}: {answer}");
            assert_eq!(answer["code"], 400, "{action}: {answer}");
        }
    }

    /// When the audit log cannot be written, requests fail and keep failing (fail closed);
    /// answered requests are in the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_fail_closed_when_the_audit_log_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = RootKey::generate().unwrap();
        let mac_key = root.audit_mac_key();
        let store = Store::open(dir.path(), root).unwrap();
        let audit = AuditLog::open(dir.path(), &mac_key).unwrap();
        let state = Arc::new(ServerState::new(store).with_audit(audit.clone()));
        let app = router(state.clone());

        let ok = get(&app, "GetVersion").await;
        assert_eq!(ok["code"], 200, "{ok}");
        let enrolled = get(&app, "Enroll").await;
        assert_eq!(enrolled["code"], 200, "{enrolled}");
        assert_eq!(audit.head().seq, 2);

        audit.replace_file_for_test(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        for action in ["GetVersion", "Enroll", "GetVersion"] {
            let refused = get(&app, action).await;
            assert_eq!(refused["code"], 500, "{action}: {refused}");
            assert!(refused["result"].as_object().unwrap().is_empty());
            assert!(refused.get("result").unwrap().get("apikey").is_none());
        }
        assert!(audit.is_failed());
        drop(app);
        drop(state);
        drop(audit);
        let report = crate::audit::verify(&dir.path().join("audit.log"), Some(&mac_key)).unwrap();
        assert_eq!(report.entries, 2);
    }

    /// Attack 6, changes behind a failing audit log: once the log cannot be written, a change
    /// (here the owner disabling a key) is refused *and does not happen*, so the log never
    /// misses a change that took effect; the owner's policy assignment is logged with the
    /// policy's content hash.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attack_changes_behind_a_failed_audit_log_do_not_happen() {
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = RootKey::generate().unwrap();
        let mac_key = root.audit_mac_key();
        let seed = root.attestation_seed();
        let store = Store::open(dir.path(), root).unwrap();
        let audit = AuditLog::open(dir.path(), &mac_key).unwrap();
        let service = AttestationService::new(store.kms_id(), &seed).unwrap();
        let state = Arc::new(
            ServerState::new(store)
                .with_audit(audit.clone())
                .with_attestation(service),
        );
        let app = router(state.clone());
        let (owner, _) = owner::OwnerKey::generate().unwrap();
        let enrolled = get(&app, &format!("Enroll&owner_key={}", owner.public_text())).await;
        let appid = enrolled["result"]["appid"].as_str().unwrap().to_string();
        let apikey = enrolled["result"]["apikey"].as_str().unwrap().to_string();
        let call = |action: &'static str, payload: Value| {
            post_as(&app, action, &appid, &apikey, Some(&owner), payload)
        };
        let keyid =
            call("CreateKey", json!({"keyspec": "EH_AES_GCM_256"})).await["result"]["keyid"]
                .as_str()
                .unwrap()
                .to_string();
        let policy = json!({"allowed": [{"tee": "sgx", "mrenclave": "ab".repeat(32)}]});
        let policy_id = call("UploadQuotePolicy", json!({"policy": policy.to_string()})).await
            ["result"]["policyId"]
            .as_str()
            .unwrap()
            .to_string();
        let marked = call(
            "SetKeyReleasePolicy",
            json!({"keyid": keyid, "policyId": policy_id}),
        )
        .await;
        assert_eq!(marked["code"], 200, "{marked}");
        let assigned = audit_lines(dir.path(), "SetKeyReleasePolicy");
        assert_eq!(assigned.len(), 1, "one entry per change: {assigned:?}");
        let detail: Value = serde_json::from_str(assigned[0]["detail"].as_str().unwrap()).unwrap();
        let stored = state.store.policy(&appid, &policy_id).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, stored.as_bytes());
        assert_eq!(detail["policy_id"], policy_id.as_str());
        assert_eq!(detail["policy_sha256"], hex::encode(digest.as_ref()));
        let entries_before = audit.head().seq;

        audit.replace_file_for_test(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        let refused = call("DisableKey", json!({"keyid": keyid})).await;
        assert_eq!(refused["code"], 500, "{refused}");
        assert!(state.store.key(&appid, &keyid).unwrap().enabled);
        for action in ["RotateKey", "DeleteKey"] {
            let refused = call(action, json!({"keyid": keyid})).await;
            assert_eq!(refused["code"], 500, "{action}: {refused}");
        }
        let key = state.store.key(&appid, &keyid).unwrap();
        assert!(key.enabled);
        assert_eq!(key.newest_version(), 0);
        drop(app);
        drop(state);
        drop(audit);
        let report = crate::audit::verify(&dir.path().join("audit.log"), Some(&mac_key)).unwrap();
        assert_eq!(report.entries, entries_before);
    }

    /// A server over a fresh store in `dir` with an attestation service set up by `configure`.
    fn attested_server(
        dir: &std::path::Path,
        configure: impl FnOnce(&mut AttestationService),
    ) -> Router {
        let (root, _) = RootKey::generate().unwrap();
        let seed = root.attestation_seed();
        let audit = AuditLog::open(dir, &root.audit_mac_key()).unwrap();
        let store = Store::open(dir, root).unwrap();
        let mut service = AttestationService::new(store.kms_id(), &seed).unwrap();
        configure(&mut service);
        router(Arc::new(
            ServerState::new(store)
                .with_attestation(service)
                .with_audit(audit),
        ))
    }

    /// The audit log lines of `action` written by an [`attested_server`] in `dir`.
    fn audit_lines(dir: &std::path::Path, action: &str) -> Vec<Value> {
        std::fs::read_to_string(dir.join("audit.log"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|line| line["action"] == action)
            .collect()
    }

    async fn post(app: &Router, action: &str, appid: &str, apikey: &str, payload: Value) -> Value {
        post_as(app, action, appid, apikey, None, payload).await
    }

    /// A request as ppml's client signs it: the body names its action, and `owner` (if given)
    /// signs it as the app's owner.
    async fn post_as(
        app: &Router,
        action: &str,
        appid: &str,
        apikey: &str,
        owner: Option<&owner::OwnerKey>,
        payload: Value,
    ) -> Value {
        let mut body = Map::new();
        body.insert("appid".into(), json!(appid));
        body.insert("action".into(), json!(action));
        body.insert("payload".into(), payload);
        body.insert("timestamp".into(), json!(now_ms().to_string()));
        body.insert(
            "nonce".into(),
            json!(hex::encode(ppml_kms::sealing::random::<8>().unwrap())),
        );
        if let Some(owner) = owner {
            let signature = owner.sign_request(&body);
            body.insert(owner::OWNER_SIGN_FIELD.into(), json!(signature));
        }
        let sign = ehsm::sign(apikey, &body);
        body.insert("sign".into(), json!(sign));
        let response = app
            .clone()
            .oneshot(
                Request::post(format!("/ehsm?Action={action}"))
                    .header("content-type", "application/json")
                    .body(Body::from(Value::Object(body).to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// A simulated runtime attests through the API: policy upload, challenge, evidence bound
    /// to the challenge and its key, a token that verifies with the key GetVersion publishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sim_runtime_attests_through_the_api() {
        use ppml_attestation::evidence::EvidenceProvider as _;
        use ppml_attestation::service::{expected_report_data, verify_token};
        use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement};

        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::load_or_create(dir.path().join("sim.pk8")).unwrap();
        let platform_hex = hex::encode(platform.public_key());
        let app = attested_server(dir.path(), |service| service.accept_simulation());

        let version = get(&app, "GetVersion").await;
        let service_key: [u8; 32] =
            hex::decode(version["result"]["attestation_key"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
        let enrolled = get(&app, "Enroll").await;
        let appid = enrolled["result"]["appid"].as_str().unwrap().to_string();
        let apikey = enrolled["result"]["apikey"].as_str().unwrap().to_string();
        let policy = json!({
            "allowed": [{"tee": "sim", "mrenclave": hex::encode(executable_measurement().unwrap())}],
            "allow_simulation": true,
            "sim_platforms": [platform_hex]
        });
        let uploaded = post(
            &app,
            "UploadQuotePolicy",
            &appid,
            &apikey,
            json!({"policy": policy.to_string()}),
        )
        .await;
        let policy_id = uploaded["result"]["policyId"].as_str().unwrap().to_string();
        let fetched = post(
            &app,
            "GetQuotePolicy",
            &appid,
            &apikey,
            json!({"policyId": policy_id}),
        )
        .await;
        assert_eq!(fetched["code"], 200, "{fetched}");

        let tee = SimTee::new(platform);
        let attest = |nonce: Vec<u8>, key: &'static [u8]| {
            let evidence = tee.evidence(&expected_report_data(&nonce, key)).unwrap();
            json!({"policyId": policy_id, "tee": "sim", "quote": BASE64.encode(&evidence.quote),
                   "nonce": BASE64.encode(&nonce), "runtime_key": BASE64.encode(key)})
        };
        let challenge = post(&app, "AttestChallenge", &appid, &apikey, json!({})).await;
        let nonce = BASE64
            .decode(challenge["result"]["nonce"].as_str().unwrap())
            .unwrap();
        let request = attest(nonce.clone(), b"runtime public key");
        let answer = post(&app, "Attest", &appid, &apikey, request.clone()).await;
        assert_eq!(answer["code"], 200, "{answer}");
        let token = answer["result"]["token"].as_str().unwrap();
        let claims = verify_token(token, &service_key, now_ms() / 1000).unwrap();
        assert_eq!(claims.sub, appid);
        assert_eq!(claims.policy, policy_id);

        // The same answer again: the nonce is spent.
        let replay = post(&app, "Attest", &appid, &apikey, request).await;
        assert_eq!(replay["code"], 400);
        assert!(
            replay["message"]
                .as_str()
                .unwrap()
                .starts_with("attestation failed"),
            "{replay}"
        );

        // Another app cannot use (or read) this app's policy.
        let other = get(&app, "Enroll").await;
        let (oid, okey) = (
            other["result"]["appid"].as_str().unwrap().to_string(),
            other["result"]["apikey"].as_str().unwrap().to_string(),
        );
        let refused = post(
            &app,
            "GetQuotePolicy",
            &oid,
            &okey,
            json!({"policyId": policy_id}),
        )
        .await;
        assert_eq!(refused["message"], "Invalid  policyId.");
        let challenge = post(&app, "AttestChallenge", &oid, &okey, json!({})).await;
        let nonce = BASE64
            .decode(challenge["result"]["nonce"].as_str().unwrap())
            .unwrap();
        let refused = post(&app, "Attest", &oid, &okey, attest(nonce, b"k")).await;
        assert_eq!(refused["message"], "Invalid  policyId.");

        // eHSM's policy shape is accepted and stored as a strict SGX policy.
        let ehsm = post(
            &app,
            "UploadQuotePolicy",
            &appid,
            &apikey,
            json!({"mr_enclave": "ab".repeat(32)}),
        )
        .await;
        let id = ehsm["result"]["policyId"].as_str().unwrap();
        let stored = post(
            &app,
            "GetQuotePolicy",
            &appid,
            &apikey,
            json!({"policyId": id}),
        )
        .await;
        let stored: Policy =
            serde_json::from_str(stored["result"]["policy"].as_str().unwrap()).unwrap();
        assert_eq!(stored.accepted_tcb_statuses, ["UpToDate"]);
        assert!(!stored.allow_simulation);
    }

    /// A key marked for attested release: Decrypt is refused; ReleaseDataKey with a valid
    /// token returns the data key sealed to the runtime's key, which only it can open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attested_key_release() {
        use ppml_attestation::evidence::EvidenceProvider as _;
        use ppml_attestation::release::RuntimeKey;
        use ppml_attestation::service::expected_report_data;
        use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement};

        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::load_or_create(dir.path().join("sim.pk8")).unwrap();
        let platform_hex = hex::encode(platform.public_key());
        let app = attested_server(dir.path(), |service| service.accept_simulation());
        let tee = SimTee::new(platform);

        let (owner_a, _) = owner::OwnerKey::generate().unwrap();
        let owner_a = Arc::new(owner_a);
        let enrolled = get(&app, &format!("Enroll&owner_key={}", owner_a.public_text())).await;
        let appid = enrolled["result"]["appid"].as_str().unwrap().to_string();
        let apikey = enrolled["result"]["apikey"].as_str().unwrap().to_string();
        let call = |action: &'static str, payload: Value| {
            let (app, appid, apikey) = (app.clone(), appid.clone(), apikey.clone());
            let owner = Arc::clone(&owner_a);
            async move { post_as(&app, action, &appid, &apikey, Some(&owner), payload).await }
        };
        let policy = json!({
            "allowed": [{"tee": "sim", "mrenclave": hex::encode(executable_measurement().unwrap())}],
            "allow_simulation": true,
            "sim_platforms": [platform_hex]
        });
        let policy_id = call("UploadQuotePolicy", json!({"policy": policy.to_string()})).await
            ["result"]["policyId"]
            .as_str()
            .unwrap()
            .to_string();
        let keyid =
            call("CreateKey", json!({"keyspec": "EH_AES_GCM_256"})).await["result"]["keyid"]
                .as_str()
                .unwrap()
                .to_string();
        // Data keys of two datasets, and the owner's grant of a job reading both.
        let ds = format!("ppml-dataset:{}", "0a".repeat(16));
        let other = format!("ppml-dataset:{}", "0b".repeat(16));
        let grant = ppml_kms::grant::SignedGrant::sign(
            &ppml_kms::grant::JobGrant {
                version: 1,
                appid: appid.clone(),
                job_id: "0c".repeat(16),
                application: ppml_kms::grant::GrantedApp::SimpleQuery,
                inputs: ["0a", "0b"]
                    .map(|id| ppml_kms::grant::GrantedInput {
                        dataset_id: id.repeat(16),
                        key_id: keyid.clone(),
                        manifest_sha256: None,
                    })
                    .to_vec(),
                output: None,
                reveal_counts: false,
                not_after: u64::MAX,
            },
            &owner_a,
        )
        .unwrap()
        .to_text();
        let generated = call(
            "GenerateDataKey",
            json!({"keyid": keyid, "keylen": 32, "aad": ds}),
        )
        .await;
        let data_key = BASE64
            .decode(generated["result"]["plaintext"].as_str().unwrap())
            .unwrap();
        let wrapped = generated["result"]["ciphertext"]
            .as_str()
            .unwrap()
            .to_string();

        // Before marking, ReleaseDataKey is refused and Decrypt works; after, the reverse.
        let plain = call(
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": wrapped, "aad": ds}),
        )
        .await;
        assert_eq!(plain["code"], 200, "{plain}");
        let unmarked = call(
            "ReleaseDataKey",
            json!({"keyid": keyid, "ciphertext": wrapped, "aad": ds, "token": "x.y.z"}),
        )
        .await;
        assert_eq!(unmarked["message"], ApiError::NotMarkedForRelease.message());
        let marked = call(
            "SetKeyReleasePolicy",
            json!({"keyid": keyid, "policyId": policy_id}),
        )
        .await;
        assert_eq!(marked["code"], 200, "{marked}");
        let refused = call(
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": wrapped, "aad": ds}),
        )
        .await;
        assert_eq!(refused["message"], ApiError::AttestationRequired.message());

        let runtime = RuntimeKey::generate();
        let nonce = BASE64
            .decode(
                call("AttestChallenge", json!({})).await["result"]["nonce"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        let evidence = tee
            .evidence(&expected_report_data(&nonce, &runtime.public_bytes()))
            .unwrap();
        let answer = call(
            "Attest",
            json!({"policyId": policy_id, "tee": "sim",
            "quote": BASE64.encode(&evidence.quote), "nonce": BASE64.encode(&nonce),
            "runtime_key": BASE64.encode(runtime.public_bytes())}),
        )
        .await;
        let token = answer["result"]["token"].as_str().unwrap().to_string();

        let released = call(
            "ReleaseDataKey",
            json!({"keyid": keyid, "ciphertext": wrapped,
            "aad": ds, "token": token, "grant": grant}),
        )
        .await;
        assert_eq!(released["code"], 200, "{released}");
        let enc = BASE64
            .decode(released["result"]["encapsulated_key"].as_str().unwrap())
            .unwrap();
        let sealed = BASE64
            .decode(released["result"]["ciphertext"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            *runtime.open(&enc, &sealed, keyid.as_bytes()).unwrap(),
            data_key
        );
        assert!(
            RuntimeKey::generate()
                .open(&enc, &sealed, keyid.as_bytes())
                .is_err()
        );
        assert!(!released.to_string().contains(&BASE64.encode(&data_key)));

        // A forged token, or a wrong aad, releases nothing.
        let forged = format!("{}x", token);
        let refused = call(
            "ReleaseDataKey",
            json!({"keyid": keyid, "ciphertext": wrapped,
            "aad": ds, "token": forged, "grant": grant}),
        )
        .await;
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .starts_with("attestation failed"),
            "{refused}"
        );
        let refused = call(
            "ReleaseDataKey",
            json!({"keyid": keyid, "ciphertext": wrapped,
            "aad": other, "token": token, "grant": grant}),
        )
        .await;
        assert_eq!(
            refused["message"],
            "Decryption failed, Please confirm that your parameters are correct."
        );

        // App A's token opens nothing of app B's: not through B's credentials (wrong app), not
        // through A's (B's key is not A's).
        let (owner_b, _) = owner::OwnerKey::generate().unwrap();
        let owner_b = Arc::new(owner_b);
        let enrolled_b = get(&app, &format!("Enroll&owner_key={}", owner_b.public_text())).await;
        let (appid_b, apikey_b) = (
            enrolled_b["result"]["appid"].as_str().unwrap().to_string(),
            enrolled_b["result"]["apikey"].as_str().unwrap().to_string(),
        );
        let call_b = |action: &'static str, payload: Value| {
            let (app, appid, apikey) = (app.clone(), appid_b.clone(), apikey_b.clone());
            let owner = Arc::clone(&owner_b);
            async move { post_as(&app, action, &appid, &apikey, Some(&owner), payload).await }
        };
        let policy_b = call_b("UploadQuotePolicy", json!({"policy": policy.to_string()})).await
            ["result"]["policyId"]
            .as_str()
            .unwrap()
            .to_string();
        let key_b =
            call_b("CreateKey", json!({"keyspec": "EH_AES_GCM_256"})).await["result"]["keyid"]
                .as_str()
                .unwrap()
                .to_string();
        call_b(
            "SetKeyReleasePolicy",
            json!({"keyid": key_b, "policyId": policy_b}),
        )
        .await;
        let wrapped_b = call_b(
            "GenerateDataKeyWithoutPlaintext",
            json!({"keyid": key_b, "keylen": 32, "aad": "ds"}),
        )
        .await["result"]["ciphertext"]
            .as_str()
            .unwrap()
            .to_string();
        let refused = call_b(
            "ReleaseDataKey",
            json!({"keyid": key_b, "ciphertext": wrapped_b, "aad": "ds", "token": token}),
        )
        .await;
        assert_eq!(
            refused["message"],
            "attestation failed: the token was issued for another app or policy than this key's",
            "{refused}"
        );
        let refused = call(
            "ReleaseDataKey",
            json!({"keyid": key_b, "ciphertext": wrapped_b, "aad": "ds", "token": token}),
        )
        .await;
        assert_eq!(refused["message"], "keyid error", "{refused}");

        // The audit log holds the claims of every attestation and release that succeeded,
        // and no claims on refusals.
        let measurement = hex::encode(executable_measurement().unwrap());
        for action in ["Attest", "ReleaseDataKey"] {
            let lines = audit_lines(dir.path(), action);
            let ok: Vec<&Value> = lines.iter().filter(|l| l["outcome"] == "ok").collect();
            assert!(!ok.is_empty(), "{action}: {lines:?}");
            for line in &ok {
                let token: Value =
                    serde_json::from_str(line["attestation"].as_str().unwrap()).unwrap();
                assert_eq!(token["claims"]["tee"], "sim", "{line}");
                assert_eq!(
                    token["claims"]["measurements"]["mrenclave"],
                    measurement.as_str()
                );
                assert_eq!(token["sub"], line["appid"]);
                assert!(token["policy"].is_string());
            }
            for line in lines.iter().filter(|l| l["outcome"] != "ok") {
                assert!(line.get("attestation").is_none(), "{line}");
            }
        }
        assert!(
            audit_lines(dir.path(), "ReleaseDataKey")
                .iter()
                .any(|l| l["outcome"] != "ok"),
            "refusals are logged too"
        );
    }

    /// eHSM's VerifyQuote: the answer shape, and a refusal for the fixture quote, whose
    /// collateral expired in 2025 (the positive path at a pinned time is tested in
    /// ppml-attestation's service tests).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_quote_answers_with_a_verdict() {
        let testdata = std::path::PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("../attestation/testdata");
        let dir = tempfile::tempdir().unwrap();
        let collateral = ppml_attestation::dcap::Collateral::from_file(
            &testdata.join("sgx_quote_collateral.json"),
        )
        .unwrap();
        let app = attested_server(dir.path(), |service| {
            service.set_collateral(Tee::Sgx, collateral)
        });
        let enrolled = get(&app, "Enroll").await;
        let appid = enrolled["result"]["appid"].as_str().unwrap().to_string();
        let apikey = enrolled["result"]["apikey"].as_str().unwrap().to_string();
        let uploaded = post(&app, "UploadQuotePolicy", &appid, &apikey,
            json!({"mr_enclave": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"})).await;
        let policy_id = uploaded["result"]["policyId"].as_str().unwrap().to_string();
        let quote = BASE64.encode(std::fs::read(testdata.join("sgx_quote")).unwrap());
        let answer = post(
            &app,
            "VerifyQuote",
            &appid,
            &apikey,
            json!({"quote": quote, "nonce": "n-1", "policyId": policy_id}),
        )
        .await;
        assert_eq!(answer["code"], 200, "{answer}");
        // The collateral expired, so the quote does not verify: sgx_ql_qv_result_t
        // INVALID_SIGNATURE, and the answer is signed.
        assert_eq!(answer["result"]["result"], 0xA004);
        assert_eq!(answer["result"]["nonce"], "n-1");
        let mut fields = answer["result"].as_object().unwrap().clone();
        let sign = fields.remove("sign").unwrap();
        assert_eq!(sign, ehsm::sign(&apikey, &fields));
        let garbage = post(
            &app,
            "VerifyQuote",
            &appid,
            &apikey,
            json!({"quote": "!!", "policyId": policy_id}),
        )
        .await;
        assert_eq!(garbage["message"], "base64 decode error");
    }
}
