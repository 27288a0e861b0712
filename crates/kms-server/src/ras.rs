//! BigDL Remote Attestation Service (RAS) compatibility: `GET /enroll`, `POST /registerPolicy`
//! and `POST /verifyQuote` (`docs/attestation.md` §6.5), so that BigDL PPML's `BigDLAttestationService`
//! client, its `RegisterMrEnclave` admin tool and `attestation_cli.py` work against
//! `ppml kms serve`.
//!
//! Shapes matched (read in intel-analytics/ipex-llm, the BigDL repository's current name):
//! - the server, `scala/ppml/src/main/scala/com/intel/analytics/bigdl/ppml/attestation/`
//!   `BigDLRemoteAttestationService.scala`: fields `appID`, `apiKey`, `policyType`, `mrEnclave`,
//!   `mrSigner`, `isvProdID`, `mrTD`, `rtmr`, `quote`, `policyID`; answers `{"policyID"}` and
//!   `{"result"}`; refusals `Invalid app_id and api_key.` and `Unsupported policy type.`;
//! - the verdicts, BigDL-core `ppml/src/main/cpp/quote_verification.cpp`: 0 for an `UpToDate`
//!   platform, 1 for a non-terminal TCB status (configuration, SW hardening, out of date), -1
//!   for a refusal;
//! - the clients, `.../attestation/service/BigDLAttestationService.scala`,
//!   `.../attestation/admin/RegisterMrEnclave.scala` and
//!   `python/ppml/src/bigdl/ppml/attestation/attestation_service.py`, `attestation_cli.py`
//!   (they read `result` as a number and `policyID` as a string, whatever the HTTP status);
//! - `ppml/services/bigdl-attestation-service/README.md` (the REST API table).
//!
//! Differences, all on the safe side: the api key is compared in constant time against the
//! store's sealed key; a quote is always judged against one of the app's policies (without
//! `policyID`, the one it registered last; the original accepted any genuine quote); a
//! registered policy is a strict ppml
//! policy (§4: `UpToDate` only, no advisories, no debug TEE), so a quote the original answered
//! with 1 needs a policy that accepts its TCB status (uploaded with `UploadQuotePolicy`); the
//! report-data policy types are refused (ppml binds report data with `Attest`, §6.1); every
//! answer is JSON with a numeric `result` (the original sometimes sent `"0"` or plain text).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ppml_attestation::policy::AllowedMeasurement;
use ppml_attestation::service::AttestError;
use ppml_attestation::{Claims, Policy, Tee};
use serde_json::{Map, Value, json};

use crate::ApiError;
use crate::api::{MAX_BODY, ServerState};
use crate::audit::AuditEntry;

/// The audit action and metrics label of `POST /registerPolicy`.
const REGISTER: &str = "RasRegisterPolicy";
/// The audit action and metrics label of `POST /verifyQuote`.
const VERIFY: &str = "RasVerifyQuote";
/// The audit action and metrics label of `GET /enroll`.
const ENROLL: &str = "RasEnroll";

/// Milliseconds since the Unix epoch (tests pin it to the fixtures' collateral window).
type Clock = fn() -> u64;

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
struct RasState {
    server: Arc<ServerState>,
    now_ms: Clock,
}

/// The two endpoints, with their own state; `api::router` merges them. Bodies over
/// [`MAX_BODY`] are refused as on `/ehsm`.
pub(crate) fn router(server: Arc<ServerState>) -> Router {
    routes(server, system_ms)
}

fn routes(server: Arc<ServerState>, now_ms: Clock) -> Router {
    Router::new()
        .route("/registerPolicy", post(register_policy))
        .route("/verifyQuote", post(verify_quote))
        .route("/enroll", axum::routing::get(enroll))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(RasState { server, now_ms })
}

/// Why a RAS request was refused. Every refusal answers `{"result": -1, "message"}`.
#[derive(Debug)]
enum RasError {
    /// Unknown app, missing or wrong api key (the original's message).
    Credentials,
    /// A field is missing, of the wrong type or of the wrong format.
    Field(String),
    /// A `policyType` that ppml does not map to a policy.
    UnsupportedPolicy(String),
    /// Unknown policy id, or another app's.
    PolicyNotFound,
    /// `quote` is not base64.
    Base64,
    /// The quote does not verify, or the policy refuses it; the claims when it verified.
    Refused(String, Option<Box<Claims>>),
    /// The body is over [`MAX_BODY`].
    TooLarge,
    /// Too many enrollments in a short time.
    RateLimited,
    /// The server cannot verify quotes (no attestation service, no collateral).
    NotConfigured(String),
    /// A server fault; details are logged, not returned.
    Internal(String),
}

impl From<ApiError> for RasError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::PolicyNotFound => RasError::PolicyNotFound,
            ApiError::RateLimited => RasError::RateLimited,
            ApiError::Internal(detail) => RasError::Internal(detail),
            other => RasError::Internal(other.to_string()),
        }
    }
}

impl RasError {
    fn message(&self) -> String {
        match self {
            RasError::Credentials => "Invalid app_id and api_key.".into(),
            RasError::Field(detail) => format!("param type error: {detail}"),
            RasError::UnsupportedPolicy(detail) => format!("Unsupported policy type. {detail}"),
            RasError::PolicyNotFound => "policyID not found".into(),
            RasError::Base64 => ApiError::Base64.message(),
            RasError::Refused(reason, _) => ApiError::AttestationFailed(reason.clone()).message(),
            RasError::TooLarge => ApiError::TooLarge.message(),
            RasError::RateLimited => ApiError::RateLimited.message(),
            RasError::NotConfigured(detail) => detail.clone(),
            RasError::Internal(_) => ApiError::Internal(String::new()).message(),
        }
    }

    /// The HTTP status, also the audit entry's code.
    fn code(&self) -> u16 {
        match self {
            RasError::NotConfigured(_) | RasError::Internal(_) => 500,
            _ => 400,
        }
    }

    /// The `outcome` label of the request metrics (docs/kms-api.md §7).
    fn kind(&self) -> &'static str {
        match self {
            RasError::Credentials => "invalid_credentials",
            RasError::Field(_) => "payload_type",
            RasError::UnsupportedPolicy(_) => "unsupported_policy_type",
            RasError::PolicyNotFound => "policy_not_found",
            RasError::Base64 => "base64",
            RasError::Refused(..) => "attestation_failed",
            RasError::TooLarge => "too_large",
            RasError::RateLimited => "rate_limited",
            RasError::NotConfigured(_) => "not_configured",
            RasError::Internal(_) => "internal",
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({"result": -1, "message": self.message()});
        if let RasError::Refused(_, Some(claims)) = self {
            body["claims"] = json!(claims);
        }
        body
    }
}

type Work = fn(&ServerState, &str, &Map<String, Value>, u64) -> Result<Value, RasError>;

async fn register_policy(
    State(state): State<RasState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, REGISTER, body, register).await
}

async fn verify_quote(
    State(state): State<RasState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, VERIFY, body, verify).await
}

/// `GET /enroll`: a new app, as eHSM's `Enroll` makes it (rate limited, no owner key),
/// answered in both of the shapes BigDL-RAS versions used.
async fn enroll(State(state): State<RasState>) -> Response {
    let started = Instant::now();
    let server = Arc::clone(&state.server);
    let now_ms = (state.now_ms)();
    let (appid, result) = tokio::task::spawn_blocking(move || {
        let mut appid = String::new();
        let result = crate::api::rate_limit(&server.enrollments)
            .and_then(|()| {
                server.store.enroll(now_ms, None, &mut |id| {
                    appid = id.to_string();
                    match server.audit().filter(|audit| audit.is_failed()) {
                        Some(_) => Err(ApiError::Internal("the audit log has failed".into())),
                        None => Ok(()),
                    }
                })
            })
            .map(|(id, apikey)| {
                json!({"appID": id, "apiKey": *apikey, "app_id": id, "api_key": *apikey})
            })
            .map_err(RasError::from);
        (appid, result)
    })
    .await
    .unwrap_or_else(|e| (String::new(), Err(RasError::Internal(e.to_string()))));
    respond(&state.server, ENROLL, appid, started, result).await
}

/// Parses and authenticates the request and runs `work` on the blocking pool (a store write
/// with fsync, or a DCAP verification), then audits and answers.
async fn handle(
    state: RasState,
    action: &'static str,
    body: Result<Bytes, BytesRejection>,
    work: Work,
) -> Response {
    let started = Instant::now();
    let (appid, result) = match body {
        Err(_) => (String::new(), Err(RasError::TooLarge)),
        Ok(body) => {
            let server = Arc::clone(&state.server);
            let now_ms = (state.now_ms)();
            tokio::task::spawn_blocking(move || run(&server, &body, now_ms, work))
                .await
                .unwrap_or_else(|e| (String::new(), Err(RasError::Internal(e.to_string()))))
        }
    };
    respond(&state.server, action, appid, started, result).await
}

/// Returns the request's `appID` (for the audit entry, as far as the body could be read) and
/// the outcome.
fn run(
    state: &ServerState,
    body: &[u8],
    now_ms: u64,
    work: Work,
) -> (String, Result<Value, RasError>) {
    let request = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(request)) => request,
        _ => {
            let refused = RasError::Field("the body is not a JSON object".into());
            return (String::new(), Err(refused));
        }
    };
    let appid = match request.get("appID") {
        Some(Value::String(appid)) => appid.chars().take(128).collect(),
        _ => String::new(),
    };
    let result = authenticate(state, &request).and_then(|app| work(state, app, &request, now_ms));
    (appid, result)
}

/// The app of `appID`, if `apiKey` is its api key. As in the original, the key travels in the
/// body (there is no signature); it is compared in constant time with the store's key.
fn authenticate<'a>(
    state: &ServerState,
    request: &'a Map<String, Value>,
) -> Result<&'a str, RasError> {
    let (Some(Value::String(appid)), Some(Value::String(apikey))) =
        (request.get("appID"), request.get("apiKey"))
    else {
        return Err(RasError::Credentials);
    };
    let stored = state.store.app_auth(appid)?.ok_or(RasError::Credentials)?;
    if same_secret(stored.apikey.as_bytes(), apikey.as_bytes()) {
        Ok(appid)
    } else {
        Err(RasError::Credentials)
    }
}

/// Constant-time equality of two secrets of any length: their SHA-256 digests compared with
/// `subtle`, so the time depends on neither the contents nor the lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    let digest = |x: &[u8]| ring::digest::digest(&ring::digest::SHA256, x);
    bool::from(digest(a).as_ref().ct_eq(digest(b).as_ref()))
}

/// `POST /registerPolicy`: the RAS policy as a strict ppml policy of the app.
fn register(
    state: &ServerState,
    appid: &str,
    request: &Map<String, Value>,
    now_ms: u64,
) -> Result<Value, RasError> {
    let policy = Policy::strict(vec![measurement(request)?]);
    let text = serde_json::to_string(&policy).map_err(|e| RasError::Internal(e.to_string()))?;
    // A stored policy changes nothing until the owner assigns it to a key; its entry follows
    // the response like every RAS request's, and a failed audit log refuses it here.
    let id = state
        .store
        .put_policy(appid, &text, now_ms, &mut |_| match state
            .audit()
            .filter(|audit| audit.is_failed())
        {
            Some(_) => Err(ApiError::Internal("the audit log has failed".into())),
            None => Ok(()),
        })?;
    Ok(json!({"policyID": id}))
}

/// The runtime a RAS policy allows. Without `policyType`, the shape of the original's help page
/// (`{mrEnclave, mrSigner}`, either or both) is an SGX policy on what is given.
fn measurement(request: &Map<String, Value>) -> Result<AllowedMeasurement, RasError> {
    let sgx = |mrenclave, mrsigner, isvprodid| AllowedMeasurement {
        tee: Some(Tee::Sgx),
        mrenclave,
        mrsigner,
        isvprodid,
        ..AllowedMeasurement::default()
    };
    let tdx = |mrtd, rtmr| AllowedMeasurement {
        tee: Some(Tee::Tdx),
        mrtd: Some(mrtd),
        rtmr,
        ..AllowedMeasurement::default()
    };
    let policy_type = match request.get("policyType") {
        None | Some(Value::Null) => "",
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(RasError::Field("policyType must be a string".into())),
    };
    Ok(match policy_type {
        "" => {
            let mrenclave = optional_hex(request, "mrEnclave", 32)?;
            let mrsigner = optional_hex(request, "mrSigner", 32)?;
            if mrenclave.is_none() && mrsigner.is_none() {
                return Err(RasError::UnsupportedPolicy(
                    "Give policyType (SGXMREnclavePolicy, SGXMRSignerPolicy, TDXMRTDPolicy or \
                     TDXLaunchTimePolicy), or mrEnclave and/or mrSigner."
                        .into(),
                ));
            }
            sgx(mrenclave, mrsigner, None)
        }
        "SGXMREnclavePolicy" => sgx(Some(hex(request, "mrEnclave", 32)?), None, None),
        "SGXMRSignerPolicy" => sgx(
            None,
            Some(hex(request, "mrSigner", 32)?),
            Some(isv_prod_id(request)?),
        ),
        "TDXMRTDPolicy" => tdx(hex(request, "mrTD", 48)?, None),
        "TDXLaunchTimePolicy" => {
            let rtmr = hex(request, "rtmr", 4 * 48)?;
            let part = |i: usize| Some(rtmr[i * 96..(i + 1) * 96].to_string());
            tdx(
                hex(request, "mrTD", 48)?,
                Some([part(0), part(1), part(2), part(3)]),
            )
        }
        t @ ("SGXReportDataPolicy" | "TDXReportDataPolicy") => {
            return Err(RasError::UnsupportedPolicy(format!(
                "{t}: ppml binds report data to a fresh challenge and the runtime's key with its \
                 Attest protocol (docs/attestation.md §6.1); register a measurement policy."
            )));
        }
        other => {
            let other: String = other.chars().take(64).collect();
            return Err(RasError::UnsupportedPolicy(format!(
                "{other:?} is not one of SGXMREnclavePolicy, SGXMRSignerPolicy, TDXMRTDPolicy, \
                 TDXLaunchTimePolicy."
            )));
        }
    })
}

/// The field `name`: exactly `2 * bytes` hex digits, returned in lowercase.
fn hex(request: &Map<String, Value>, name: &str, bytes: usize) -> Result<String, RasError> {
    optional_hex(request, name, bytes)?
        .ok_or_else(|| RasError::Field(format!("{name} is required ({} hex digits)", 2 * bytes)))
}

fn optional_hex(
    request: &Map<String, Value>,
    name: &str,
    bytes: usize,
) -> Result<Option<String>, RasError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s))
            if s.len() == 2 * bytes && s.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(_) => Err(RasError::Field(format!(
            "{name} must be {} hex digits",
            2 * bytes
        ))),
    }
}

/// `isvProdID`: the enclave's ISVPRODID, a number or a decimal string. (The original compared
/// a hex rendering of the two little-endian bytes read big-endian, which agrees only for 0.)
fn isv_prod_id(request: &Map<String, Value>) -> Result<u16, RasError> {
    let value = match request.get("isvProdID") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    };
    value
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| RasError::Field("isvProdID must be a number from 0 to 65535".into()))
}

/// `POST /verifyQuote`: verifies the DCAP quote with the server's collateral and judges it with
/// the app's policy `policyID`.
fn verify(
    state: &ServerState,
    appid: &str,
    request: &Map<String, Value>,
    now_ms: u64,
) -> Result<Value, RasError> {
    // Without policyID (BigDL's clients may omit it), the app's newest policy judges: ppml
    // never accepts a quote on its genuineness alone.
    let text = match request.get("policyID") {
        Some(Value::String(id)) if !id.is_empty() => state.store.policy(appid, id)?,
        None | Some(Value::Null) | Some(Value::String(_)) => state
            .store
            .newest_policy(appid)?
            .map(|(_, text)| text)
            .ok_or_else(|| {
                RasError::Field(
                    "no policyID, and the app has no policy to judge the quote by (register \
                     one with /registerPolicy)"
                        .into(),
                )
            })?,
        Some(_) => return Err(RasError::Field("policyID must be a string".into())),
    };
    let policy: Policy =
        serde_json::from_str(&text).map_err(|e| RasError::Internal(e.to_string()))?;
    let quote = match request.get("quote") {
        Some(Value::String(quote)) if !quote.is_empty() => {
            BASE64.decode(quote).map_err(|_| RasError::Base64)?
        }
        _ => return Err(RasError::Field("quote (base64) is required".into())),
    };
    let service = state.attestation().ok_or_else(|| {
        RasError::NotConfigured("attestation is not configured on this server".into())
    })?;
    let claims = match service.verify_dcap(&quote, now_ms / 1000) {
        Ok(claims) => claims,
        Err(AttestError::NoCollateral(tee)) => {
            return Err(RasError::NotConfigured(format!(
                "this server has no DCAP collateral for {tee} quotes (start `ppml kms serve` \
                 with --{tee}-collateral FILE or --pccs-url URL)"
            )));
        }
        Err(e) => return Err(RasError::Refused(e.to_string(), None)),
    };
    if let Err(violation) = policy.evaluate(&claims) {
        return Err(RasError::Refused(
            violation.to_string(),
            Some(Box::new(claims)),
        ));
    }
    // The original's verdicts (quote_verification.cpp): 0 for an up-to-date platform, 1 for a
    // non-terminal TCB status, which only a policy that accepts it lets through here; a revoked
    // platform is terminal whatever the policy says.
    let result = match claims.tcb_status.as_str() {
        "UpToDate" => 0,
        "Revoked" => {
            return Err(RasError::Refused(
                "TCB status Revoked is terminal".into(),
                Some(Box::new(claims)),
            ));
        }
        _ => 1,
    };
    Ok(json!({"result": result, "claims": claims}))
}

/// Writes the audit entry (when a log is attached), then answers; as `api::respond`, a request
/// whose entry cannot be made durable fails with 500 (fail closed).
async fn respond(
    state: &ServerState,
    action: &'static str,
    appid: String,
    started: Instant,
    mut result: Result<Value, RasError>,
) -> Response {
    let request_id = state.next_request_id();
    if let Some(audit) = state.audit() {
        let (outcome, code) = match &result {
            Ok(_) => ("ok".to_string(), 200),
            Err(e) => (e.message(), e.code()),
        };
        let entry = AuditEntry {
            request_id: request_id.clone(),
            appid,
            action: action.to_string(),
            keyid: String::new(),
            outcome,
            code,
            attestation: None,
            detail: None,
            replay: None,
        };
        if let Err(e) = audit.append_async(entry).await {
            result = Err(RasError::Internal(format!("audit log: {e}")));
        }
    }
    let (status, body) = match result {
        Ok(body) => {
            state.record_request(action, "ok", started);
            tracing::debug!(action, request_id, outcome = "ok", "request");
            (StatusCode::OK, body)
        }
        Err(err) => {
            state.record_request(action, err.kind(), started);
            match &err {
                RasError::Internal(detail) => {
                    tracing::error!(action, request_id, detail, "request failed")
                }
                _ => {
                    tracing::info!(action, request_id, outcome = %err.message(), "request rejected")
                }
            }
            let status =
                StatusCode::from_u16(err.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, err.body())
        }
    };
    (status, [("x-request-id", request_id)], Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use ppml_attestation::dcap::Collateral;
    use ppml_attestation::service::AttestationService;
    use ppml_kms::ehsm;
    use tower::ServiceExt as _;

    use super::*;
    use crate::audit::AuditLog;
    use crate::{RootKey, Store};

    const MRENCLAVE: &str = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb";
    const MRSIGNER: &str = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6";
    const MRTD: &str = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7";
    const SGX_REFUSAL: &str = "attestation failed: TCB status ConfigurationAndSWHardeningNeeded is not accepted by the policy";

    /// 2025-07-01T00:00:00Z, inside the fixtures' collateral windows (testdata/README.md).
    fn fixture_time() -> u64 {
        1_751_328_000_000
    }

    fn testdata(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("../attestation/testdata")
        .join(name)
    }

    fn quote(tee: &str) -> Vec<u8> {
        std::fs::read(testdata(&format!("{tee}_quote"))).unwrap()
    }

    struct Server {
        state: Arc<ServerState>,
        /// `api::router` (eHSM, metrics, and the RAS endpoints on the system clock).
        api: Router,
        /// The RAS endpoints at [`fixture_time`].
        ras: Router,
        audit: Option<(AuditLog, zeroize::Zeroizing<[u8; 32]>)>,
    }

    /// A server over a fresh store in `dir`, with an attestation service holding the SGX and
    /// TDX fixture collateral when `collateral`, and an audit log when `audited`.
    fn server(dir: &std::path::Path, collateral: bool, audited: bool) -> Server {
        let (root, _) = RootKey::generate().unwrap();
        let seed = root.attestation_seed();
        let mac_key = root.audit_mac_key();
        let store = Store::open(dir, root).unwrap();
        let mut service = AttestationService::new(store.kms_id(), &seed).unwrap();
        if collateral {
            for (tee, name) in [(Tee::Sgx, "sgx"), (Tee::Tdx, "tdx")] {
                let file = testdata(&format!("{name}_quote_collateral.json"));
                service.set_collateral(tee, Collateral::from_file(&file).unwrap());
            }
        }
        let mut state = ServerState::new(store)
            .with_attestation(service)
            .with_bigdl_ras();
        let mut audit = None;
        if audited {
            let log = AuditLog::open(dir, &mac_key).unwrap();
            state = state.with_audit(log.clone());
            audit = Some((log, mac_key));
        }
        let state = Arc::new(state);
        Server {
            api: crate::api::router(Arc::clone(&state)),
            ras: routes(Arc::clone(&state), fixture_time),
            state,
            audit,
        }
    }

    fn enroll(state: &ServerState) -> (String, String) {
        let (appid, apikey) = state
            .store
            .enroll(system_ms(), None, &mut |_| Ok(()))
            .unwrap();
        (appid, apikey.to_string())
    }

    /// POSTs `body` to `path`; returns the HTTP status and the JSON answer.
    async fn call(app: &Router, path: &str, body: impl Into<Body>) -> (u16, Value) {
        let response = app
            .clone()
            .oneshot(
                Request::post(path)
                    .header("content-type", "application/json")
                    .body(body.into())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(response.headers().contains_key("x-request-id"));
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn ras(app: &Router, path: &str, body: Value) -> (u16, Value) {
        call(app, path, body.to_string()).await
    }

    /// `/registerPolicy` for the app; the new policy id.
    async fn register(app: &Router, app_key: &(String, String), policy: Value) -> String {
        let mut body = json!({"appID": app_key.0, "apiKey": app_key.1});
        body.as_object_mut()
            .unwrap()
            .extend(policy.as_object().unwrap().clone());
        let (status, answer) = ras(app, "/registerPolicy", body).await;
        assert_eq!(status, 200, "{answer}");
        answer["policyID"].as_str().unwrap().to_string()
    }

    fn verify_body(app_key: &(String, String), quote: &[u8], policy_id: &str) -> Value {
        json!({"appID": app_key.0, "apiKey": app_key.1, "quote": BASE64.encode(quote),
               "policyID": policy_id})
    }

    /// ppml's own policy upload: the signed eHSM `UploadQuotePolicy`.
    async fn upload_ppml_policy(app: &Router, app_key: &(String, String), policy: Value) -> String {
        let mut body = Map::new();
        body.insert("appid".into(), json!(app_key.0));
        body.insert("payload".into(), json!({"policy": policy.to_string()}));
        body.insert("timestamp".into(), json!(system_ms().to_string()));
        let sign = ehsm::sign(&app_key.1, &body);
        body.insert("sign".into(), json!(sign));
        let (_, answer) = call(
            app,
            "/ehsm?Action=UploadQuotePolicy",
            Value::Object(body).to_string(),
        )
        .await;
        assert_eq!(answer["code"], 200, "{answer}");
        answer["result"]["policyId"].as_str().unwrap().to_string()
    }

    /// The real fixture quotes: RAS-registered (strict) policies refuse the SGX quote for its
    /// TCB status and accept the up-to-date TDX quote with 0; a ppml policy that accepts the
    /// SGX platform's status and advisories lets it through with the original's warning, 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fixture_quotes_get_the_original_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), true, false);
        let app = enroll(&server.state);
        let sgx = quote("sgx");

        for policy in [
            json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE}),
            json!({"policyType": "SGXMRSignerPolicy", "mrSigner": MRSIGNER, "isvProdID": 0}),
            json!({"mrEnclave": MRENCLAVE.to_uppercase(), "mrSigner": MRSIGNER}),
        ] {
            let id = register(&server.ras, &app, policy.clone()).await;
            let stored: Policy =
                serde_json::from_str(&server.state.store.policy(&app.0, &id).unwrap()).unwrap();
            assert_eq!(stored.accepted_tcb_statuses, ["UpToDate"], "{policy}");
            assert!(!stored.allow_debug && !stored.allow_simulation);
            let (status, answer) =
                ras(&server.ras, "/verifyQuote", verify_body(&app, &sgx, &id)).await;
            assert_eq!(status, 400, "{policy}: {answer}");
            assert_eq!(answer["result"], -1);
            assert_eq!(answer["message"], SGX_REFUSAL);
            assert_eq!(answer["claims"]["measurements"]["mrenclave"], MRENCLAVE);
        }

        let accepting = json!({
            "allowed": [{"tee": "sgx", "mrenclave": MRENCLAVE, "mrsigner": MRSIGNER}],
            "accepted_tcb_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"],
            "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]
        });
        let id = upload_ppml_policy(&server.api, &app, accepting).await;
        let (status, answer) = ras(&server.ras, "/verifyQuote", verify_body(&app, &sgx, &id)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["result"], 1);
        assert_eq!(
            answer["claims"]["tcb_status"],
            "ConfigurationAndSWHardeningNeeded"
        );
        assert_eq!(answer["claims"]["measurements"]["mrsigner"], MRSIGNER);

        let tdx_policy = json!({"policyType": "TDXMRTDPolicy", "mrTD": MRTD});
        let id = register(&server.ras, &app, tdx_policy).await;
        let (status, answer) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &quote("tdx"), &id),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["result"], 0);
        assert_eq!(answer["claims"]["tee"], "tdx");
        let rtmr: Vec<String> =
            serde_json::from_value(answer["claims"]["measurements"]["rtmr"].clone()).unwrap();
        // The TDX policy does not admit the SGX enclave.
        let (_, answer) = ras(&server.ras, "/verifyQuote", verify_body(&app, &sgx, &id)).await;
        assert_eq!(answer["result"], -1);
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .starts_with("attestation failed: TCB status"),
            "{answer}"
        );

        // TDXLaunchTimePolicy: MRTD and the four RTMRs of the fixture, concatenated.
        let launch = json!({"policyType": "TDXLaunchTimePolicy", "mrTD": MRTD,
                            "rtmr": rtmr.concat()});
        let id = register(&server.ras, &app, launch).await;
        let (status, answer) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &quote("tdx"), &id),
        )
        .await;
        assert_eq!(
            (status, answer["result"].clone()),
            (200, json!(0)),
            "{answer}"
        );
    }

    /// `GET /enroll` makes an app whose credentials work at once, in both answer shapes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enroll_makes_an_app() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), true, false);
        let response = server
            .ras
            .clone()
            .oneshot(Request::get("/enroll").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(answer["appID"], answer["app_id"], "{answer}");
        assert_eq!(answer["apiKey"], answer["api_key"], "{answer}");
        let app = (
            answer["appID"].as_str().unwrap().to_string(),
            answer["apiKey"].as_str().unwrap().to_string(),
        );
        register(
            &server.ras,
            &app,
            json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE}),
        )
        .await;
    }

    /// Each refusal answers `result: -1` with its own message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_have_specific_messages() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), true, false);
        let app = enroll(&server.state);
        let other = enroll(&server.state);
        let sgx = quote("sgx");
        let id = register(
            &server.ras,
            &app,
            json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE}),
        )
        .await;
        let refused = |status: u16, answer: &Value, message: &str| {
            assert_eq!(status, 400, "{answer}");
            assert_eq!(answer["result"], -1, "{answer}");
            let text = answer["message"].as_str().unwrap();
            assert!(text.starts_with(message), "{text:?} is not {message:?}…");
        };

        // Wrong api key, another app's key, unknown app, no key: on both endpoints.
        let policy = json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE});
        for (appid, apikey) in [
            (json!(app.0), json!(format!("{}x", app.1))),
            (json!(app.0), json!(other.1)),
            (json!("no-such-app"), json!(app.1)),
            (json!(app.0), Value::Null),
        ] {
            let mut body = verify_body(&app, &sgx, &id);
            body["appID"] = appid.clone();
            body["apiKey"] = apikey.clone();
            let (status, answer) = ras(&server.ras, "/verifyQuote", body).await;
            refused(status, &answer, "Invalid app_id and api_key.");
            let mut body = policy.clone();
            body["appID"] = appid;
            body["apiKey"] = apikey;
            let (status, answer) = ras(&server.ras, "/registerPolicy", body).await;
            refused(status, &answer, "Invalid app_id and api_key.");
        }

        // Unknown policy id, and another app's policy id.
        let (status, answer) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &sgx, "00000000-0000-0000-0000-000000000000"),
        )
        .await;
        refused(status, &answer, "policyID not found");
        let (status, answer) =
            ras(&server.ras, "/verifyQuote", verify_body(&other, &sgx, &id)).await;
        refused(status, &answer, "policyID not found");
        // Without policyID, the app's newest policy judges (this one refuses the fixture's
        // TCB status, as it does with its id); an app without a policy is refused.
        let mut body = verify_body(&app, &sgx, &id);
        body.as_object_mut().unwrap().remove("policyID");
        let (status, answer) = ras(&server.ras, "/verifyQuote", body).await;
        refused(status, &answer, "attestation failed: TCB status");
        let mut body = verify_body(&other, &sgx, &id);
        body.as_object_mut().unwrap().remove("policyID");
        let (status, answer) = ras(&server.ras, "/verifyQuote", body).await;
        refused(
            status,
            &answer,
            "param type error: no policyID, and the app has no policy",
        );

        // A flipped byte in the quote's report body (MRSIGNER): the signature no longer holds.
        let mut flipped = sgx.clone();
        flipped[200] ^= 0x01;
        let (status, answer) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &flipped, &id),
        )
        .await;
        refused(
            status,
            &answer,
            "attestation failed: evidence does not verify",
        );
        assert!(answer.get("claims").is_none());
        let mut body = verify_body(&app, &sgx, &id);
        body["quote"] = json!("!!not base64");
        let (status, answer) = ras(&server.ras, "/verifyQuote", body).await;
        refused(status, &answer, "base64 decode error");

        // Policies ppml does not map, and malformed measurements.
        for (bad, message) in [
            (
                json!({"policyType": "SGXReportDataPolicy", "reportData": "00"}),
                "Unsupported policy type. SGXReportDataPolicy",
            ),
            (
                json!({"policyType": "NoSuchPolicy", "mrEnclave": MRENCLAVE}),
                "Unsupported policy type. \"NoSuchPolicy\"",
            ),
            (json!({}), "Unsupported policy type. Give policyType"),
            (
                json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": &MRENCLAVE[2..]}),
                "param type error: mrEnclave must be 64 hex digits",
            ),
            (
                json!({"policyType": "SGXMRSignerPolicy", "mrSigner": MRSIGNER}),
                "param type error: isvProdID must be a number",
            ),
            (
                json!({"policyType": "TDXMRTDPolicy", "mrTD": MRENCLAVE}),
                "param type error: mrTD must be 96 hex digits",
            ),
        ] {
            let mut body = bad.clone();
            body["appID"] = json!(app.0);
            body["apiKey"] = json!(app.1);
            let (status, answer) = ras(&server.ras, "/registerPolicy", body).await;
            refused(status, &answer, message);
        }

        // Through the merged router: a body over the limit, and one that is not JSON.
        let big = format!(
            "{{\"appID\":\"{}\",\"pad\":\"{}\"}}",
            app.0,
            "a".repeat(MAX_BODY)
        );
        let (status, answer) = call(&server.api, "/verifyQuote", big).await;
        refused(status, &answer, "payload too large");
        let (status, answer) = call(&server.api, "/registerPolicy", "not json").await;
        refused(
            status,
            &answer,
            "param type error: the body is not a JSON object",
        );
    }

    /// Without collateral (or without an attestation service) quotes cannot be verified: a
    /// clear server-side error, not a refusal of the quote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_without_collateral_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), false, false);
        let app = enroll(&server.state);
        let id = register(
            &server.ras,
            &app,
            json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE}),
        )
        .await;
        let (status, answer) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &quote("sgx"), &id),
        )
        .await;
        assert_eq!((status, answer["result"].clone()), (500, json!(-1)));
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("no DCAP collateral"),
            "{answer}"
        );

        let dir = tempfile::tempdir().unwrap();
        let (root, _) = RootKey::generate().unwrap();
        let state = Arc::new(ServerState::new(Store::open(dir.path(), root).unwrap()));
        let app = enroll(&state);
        let bare = routes(Arc::clone(&state), fixture_time);
        let id = register(
            &bare,
            &app,
            json!({"policyType": "TDXMRTDPolicy", "mrTD": MRTD}),
        )
        .await;
        let (status, answer) =
            ras(&bare, "/verifyQuote", verify_body(&app, &quote("tdx"), &id)).await;
        assert_eq!(status, 500);
        assert_eq!(
            answer["message"],
            "attestation is not configured on this server"
        );
    }

    /// Every request is in the audit log (never its api key) and in the metrics; when the log
    /// cannot be written, requests fail with 500 (fail closed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_audited_counted_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), true, true);
        let app = enroll(&server.state);
        let id = register(
            &server.ras,
            &app,
            json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE}),
        )
        .await;
        let (status, _) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &quote("sgx"), &id),
        )
        .await;
        assert_eq!(status, 400);
        let mut wrong = verify_body(&app, &quote("sgx"), &id);
        wrong["apiKey"] = json!("wrong");
        ras(&server.ras, "/verifyQuote", wrong).await;

        let (audit, mac_key) = server.audit.as_ref().unwrap();
        let log = std::fs::read_to_string(audit.path()).unwrap();
        assert!(!log.contains(&app.1), "the api key is in the audit log");
        let entries: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary: Vec<(&str, &str, &str, u64)> = entries
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap(),
                    e["appid"].as_str().unwrap(),
                    e["outcome"].as_str().unwrap(),
                    e["code"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("RasRegisterPolicy", app.0.as_str(), "ok", 200),
                ("RasVerifyQuote", app.0.as_str(), SGX_REFUSAL, 400),
                (
                    "RasVerifyQuote",
                    app.0.as_str(),
                    "Invalid app_id and api_key.",
                    400
                ),
            ]
        );
        assert_eq!(
            crate::audit::verify(audit.path(), Some(mac_key))
                .unwrap()
                .entries,
            3
        );

        let metrics = server.state.render_metrics().unwrap();
        for line in [
            r#"ppml_kms_requests_total{action="RasRegisterPolicy",outcome="ok"} 1"#,
            r#"ppml_kms_requests_total{action="RasVerifyQuote",outcome="attestation_failed"} 1"#,
            r#"ppml_kms_requests_total{action="RasVerifyQuote",outcome="invalid_credentials"} 1"#,
        ] {
            assert!(metrics.contains(line), "{line} not in\n{metrics}");
        }

        audit.replace_file_for_test(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        let mut body = json!({"policyType": "SGXMREnclavePolicy", "mrEnclave": MRENCLAVE});
        body["appID"] = json!(app.0);
        body["apiKey"] = json!(app.1);
        let (status, answer) = ras(&server.ras, "/registerPolicy", body).await;
        assert_eq!(status, 500, "{answer}");
        assert_eq!(answer["result"], -1);
        assert!(answer.get("policyID").is_none());
        let (status, _) = ras(
            &server.ras,
            "/verifyQuote",
            verify_body(&app, &quote("sgx"), &id),
        )
        .await;
        assert_eq!(status, 500);
        assert!(audit.is_failed());
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abc\0"));
        assert!(!same_secret(b"", b"a"));
    }
}
