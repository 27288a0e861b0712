//! The verifier side of ppml's attestation protocol (`docs/attestation.md` §6): single-use
//! challenges, evidence bound to the challenge and to the runtime's public key, policy
//! evaluation, and short-lived signed attestation tokens.
//!
//! Tokens are JWTs (RFC 7519) signed with EdDSA/Ed25519 (RFC 8037): `base64url(header) "."
//! base64url(payload) "." base64url(signature)`, header `{"alg":"EdDSA","typ":"JWT"}`, so any
//! JOSE library can check them with the service's public key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::claims::{Claims, Tee};
use crate::dcap::{Collateral, verify_quote};
use crate::evidence::Evidence;
use crate::pccs::PccsClient;
use crate::policy::{Policy, PolicyViolation};
use crate::sim::verify_sim;

/// Length of a challenge nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// How long a challenge may be answered.
pub const CHALLENGE_TTL_SECS: u64 = 120;
/// Most unexpired challenges one app may hold ([`AttestationService::challenge_for`]).
pub const MAX_CHALLENGES_PER_APP: usize = 64;
/// Most unexpired challenges the service holds for all apps together.
pub const MAX_CHALLENGES: usize = 16_384;
/// Length of a receipt signing key (Ed25519 public key).
pub const RECEIPT_KEY_LEN: usize = 32;
/// How long a token is valid by default ([`AttestationService::set_token_ttl`]).
pub const TOKEN_TTL_SECS: u64 = 300;
const JWT_HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// The report data that binds evidence to a challenge and a runtime key:
/// `SHA-256(nonce || runtime public key) || 32 zero bytes`.
pub fn expected_report_data(nonce: &[u8], runtime_public_key: &[u8]) -> [u8; 64] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(nonce);
    ctx.update(runtime_public_key);
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(ctx.finish().as_ref());
    out
}

/// Domain of the receipt-key half of [`expected_report_data_with_receipt_key`].
const RECEIPT_KEY_DOMAIN: &[u8] = b"ppml-receipt-key/v1\0";

/// The report data that binds evidence to a challenge, a runtime key and a receipt signing
/// key (Ed25519, 32 bytes; `docs/receipts.md`): `SHA-256(nonce || runtime public key) ||
/// SHA-256("ppml-receipt-key/v1" 0x00 || receipt public key)`. A token issued for it vouches
/// for both keys: the KMS seals released keys to the first, and the receipts the runtime
/// signs verify with the second.
pub fn expected_report_data_with_receipt_key(
    nonce: &[u8],
    runtime_public_key: &[u8],
    receipt_public_key: &[u8],
) -> [u8; 64] {
    let mut out = expected_report_data(nonce, runtime_public_key);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(RECEIPT_KEY_DOMAIN);
    ctx.update(receipt_public_key);
    out[32..].copy_from_slice(ctx.finish().as_ref());
    out
}

/// Domain of [`user_report_data`].
const USER_REPORT_DOMAIN: &[u8] = b"ppml-user-report-data/v1\0";

/// The report data of a quote made over data a caller chose (`ppml attest quote`, for eHSM's
/// `VerifyQuote` or BigDL-RAS): SHA-512 of a domain and `data`, never `data` itself. A ppml
/// runtime in a TEE must not be an oracle that quotes any report data: a quote over
/// [`expected_report_data`] of someone else's key would answer an `Attest` challenge for that
/// key (and a quote over `kms_quote_report_data` would stand for a KMS). Under this
/// domain a quote can be neither: its last 32 bytes are not zero, making an answer with
/// a receipt key would take a SHA-512 whose halves are chosen SHA-256 values, and a KMS's
/// report data are SHA-512 under another domain.
pub fn user_report_data(data: &[u8]) -> [u8; 64] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    ctx.update(USER_REPORT_DOMAIN);
    ctx.update(data);
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-512 is 64 bytes")
}

/// Verifies a DCAP `quote` declared as `tee` evidence with `collateral`; a quote of another
/// TEE than declared is refused.
pub(crate) fn verify_dcap_as(
    tee: Tee,
    quote: &[u8],
    collateral: &Collateral,
    now: u64,
) -> Result<Claims, AttestError> {
    let claims =
        verify_quote(quote, collateral, now).map_err(|e| AttestError::Evidence(e.to_string()))?;
    if claims.tee != tee {
        return Err(AttestError::Evidence(format!(
            "declared {tee} evidence is a {} quote",
            claims.tee
        )));
    }
    Ok(claims)
}

/// Refuses claims whose report data is not `expected` (compared in constant time).
pub(crate) fn check_binding(claims: &Claims, expected: &[u8; 64]) -> Result<(), AttestError> {
    let presented = claims.report_data_bytes().ok_or(AttestError::Binding)?;
    if ring_eq(expected, &presented) {
        Ok(())
    } else {
        Err(AttestError::Binding)
    }
}

/// Verifies a simulated quote with the platform keys `policy` names, if it allows simulation.
pub(crate) fn verify_sim_under(quote: &[u8], policy: &Policy) -> Result<Claims, AttestError> {
    if !policy.allow_simulation {
        return Err(PolicyViolation::SimulationNotAllowed.into());
    }
    let platforms = policy
        .sim_platform_keys()
        .map_err(|e| AttestError::Evidence(format!("the policy: {e}")))?;
    verify_sim(quote, &platforms).map_err(|e| AttestError::Evidence(e.to_string()))
}

/// Intel's `sgx_ql_qv_result_t` for the outcome of [`AttestationService::verify_any_quote`], as
/// eHSM's `VerifyQuote` answers it: 0 for a quote that verified with an up-to-date TCB (and
/// for accepted simulated evidence), the `0xA00x` TCB states for one that verified with an
/// older TCB, and a failure code otherwise.
pub fn sgx_ql_qv_result(outcome: &Result<Claims, AttestError>) -> u32 {
    match outcome {
        Ok(claims) => match claims.tcb_status.as_str() {
            "UpToDate" | crate::sim::SIM_TCB_STATUS => qv::OK,
            "ConfigurationNeeded" => qv::CONFIG_NEEDED,
            "OutOfDate" => qv::OUT_OF_DATE,
            "OutOfDateConfigurationNeeded" => qv::OUT_OF_DATE_CONFIG_NEEDED,
            "SWHardeningNeeded" => qv::SW_HARDENING_NEEDED,
            "ConfigurationAndSWHardeningNeeded" => qv::CONFIG_AND_SW_HARDENING_NEEDED,
            "Revoked" => qv::REVOKED,
            _ => qv::UNSPECIFIED,
        },
        Err(AttestError::Evidence(_)) => qv::INVALID_SIGNATURE,
        Err(_) => qv::UNSPECIFIED,
    }
}

/// Values of Intel's `sgx_ql_qv_result_t` (`sgx_qve_header.h`).
pub mod qv {
    /// The quote verified and the TCB is up to date.
    pub const OK: u32 = 0x0000;
    /// Verified; the platform needs a configuration change.
    pub const CONFIG_NEEDED: u32 = 0xA001;
    /// Verified; the TCB is out of date.
    pub const OUT_OF_DATE: u32 = 0xA002;
    /// Verified; out of date and a configuration change is needed.
    pub const OUT_OF_DATE_CONFIG_NEEDED: u32 = 0xA003;
    /// The quote's signature (or structure) does not verify.
    pub const INVALID_SIGNATURE: u32 = 0xA004;
    /// The platform's key or TCB is revoked.
    pub const REVOKED: u32 = 0xA005;
    /// Not verified for another reason (including a refusing policy).
    pub const UNSPECIFIED: u32 = 0xA006;
    /// Verified; software hardening is needed.
    pub const SW_HARDENING_NEEDED: u32 = 0xA007;
    /// Verified; configuration and software hardening are needed.
    pub const CONFIG_AND_SW_HARDENING_NEEDED: u32 = 0xA008;
}

/// Why an attestation was refused or a token is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The nonce was never issued (to this app), was already used, or expired.
    #[error("unknown, used or expired challenge")]
    Challenge,
    /// The app (or the service) holds as many unexpired challenges as it may.
    #[error(
        "too many outstanding challenges: use the ones issued, or wait until they expire (120 s)"
    )]
    TooManyChallenges,
    /// The evidence's report data is not SHA-256(nonce || runtime key).
    #[error("the evidence is not bound to this challenge and runtime key")]
    Binding,
    /// The evidence does not verify.
    #[error("evidence does not verify: {0}")]
    Evidence(String),
    /// No collateral is configured for DCAP evidence.
    #[error("no collateral available to verify {0} evidence")]
    NoCollateral(Tee),
    /// The collateral for the evidence could not be fetched from the PCCS.
    #[error("collateral for the evidence is unavailable: {0}")]
    CollateralUnavailable(String),
    /// The policy refuses the claims.
    #[error(transparent)]
    Policy(#[from] PolicyViolation),
    /// The token is malformed or not signed by this service.
    #[error("invalid attestation token: {0}")]
    Token(String),
    /// The token was valid but has expired: attest again.
    #[error("the attestation token has expired")]
    TokenExpired,
    /// The random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// What a token asserts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer: the service id.
    pub iss: String,
    /// Subject: the app whose policy was applied.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Name of the policy that accepted the runtime.
    pub policy: String,
    /// The runtime's public key (base64url): released keys are encrypted to it.
    pub runtime_key: String,
    /// The runtime's receipt signing key (Ed25519, base64url), when it bound one into its
    /// evidence: the receipts it signs verify with it (`docs/receipts.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_key: Option<String>,
    /// The verified claims.
    pub claims: Claims,
}

/// One runtime's attempt to attest.
#[derive(Clone, Copy, Debug)]
pub struct AttestationRequest<'a> {
    /// The app whose policy applies.
    pub app: &'a str,
    /// The policy's name (recorded in the token).
    pub policy_name: &'a str,
    /// The policy.
    pub policy: &'a Policy,
    /// The nonce from [`AttestationService::challenge`].
    pub nonce: &'a [u8],
    /// The runtime's public key (released keys are encrypted to it).
    pub runtime_key: &'a [u8],
    /// The runtime's receipt signing key, if it has one; the evidence then binds it too
    /// ([`expected_report_data_with_receipt_key`]).
    pub receipt_key: Option<&'a [u8]>,
    /// The evidence, with report data [`expected_report_data`]`(nonce, runtime_key)`, or
    /// [`expected_report_data_with_receipt_key`] when there is a receipt key.
    pub evidence: &'a Evidence,
}

/// Verifies evidence and issues tokens. Thread-safe.
pub struct AttestationService {
    id: String,
    signing: Ed25519KeyPair,
    /// Outstanding challenges: the app each was issued to (empty: any) and its expiry.
    challenges: Mutex<HashMap<[u8; NONCE_LEN], (String, u64)>>,
    accept_simulation: bool,
    collateral: HashMap<Tee, Arc<Collateral>>,
    pccs: Option<PccsClient>,
    token_ttl: u64,
}

impl std::fmt::Debug for AttestationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestationService")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl AttestationService {
    /// A service named `id` signing tokens with the Ed25519 key from `seed` (the KMS server
    /// derives it from its root key).
    pub fn new(id: impl Into<String>, seed: &[u8; 32]) -> Result<Self, AttestError> {
        let signing = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| AttestError::Token("invalid signing seed".into()))?;
        Ok(AttestationService {
            id: id.into(),
            signing,
            challenges: Mutex::new(HashMap::new()),
            accept_simulation: false,
            collateral: HashMap::new(),
            pccs: None,
            token_ttl: TOKEN_TTL_SECS,
        })
    }

    /// Accepts evidence of the simulated TEE (development only). Each policy decides which
    /// simulation platforms it trusts ([`Policy::sim_platforms`], public keys): the service
    /// verifies a simulated quote with the keys of the policy it is judged by, and holds no
    /// platform key itself.
    pub fn accept_simulation(&mut self) {
        self.accept_simulation = true;
    }

    /// Uses `collateral` to verify DCAP evidence of `tee` (takes precedence over a PCCS).
    pub fn set_collateral(&mut self, tee: Tee, collateral: Collateral) {
        self.collateral.insert(tee, Arc::new(collateral));
    }

    /// Issues tokens valid for `secs` seconds (default [`TOKEN_TTL_SECS`]); runtimes attest
    /// again before their token expires.
    pub fn set_token_ttl(&mut self, secs: u64) {
        self.token_ttl = secs;
    }

    /// Fetches collateral for DCAP evidence from this PCCS when none was set for its TEE.
    ///
    /// Verification then blocks on the fetch: call [`Self::attest`] and
    /// [`Self::verify_dcap`] from a blocking thread (`spawn_blocking`), or outside a runtime.
    pub fn set_pccs(&mut self, pccs: PccsClient) {
        self.pccs = Some(pccs);
    }

    /// The collateral for a DCAP `quote` of `tee`: configured, else from the PCCS.
    fn dcap_collateral(
        &self,
        tee: Tee,
        quote: &[u8],
        now: u64,
    ) -> Result<Arc<Collateral>, AttestError> {
        if let Some(collateral) = self.collateral.get(&tee) {
            return Ok(Arc::clone(collateral));
        }
        let pccs = self.pccs.as_ref().ok_or(AttestError::NoCollateral(tee))?;
        block_on(pccs.collateral_for(quote, now))
            .map_err(|e| AttestError::CollateralUnavailable(e.to_string()))
    }

    /// Verifies a DCAP quote (SGX or TDX, whichever the quote is) with the configured
    /// collateral or the PCCS's, without challenge or binding checks.
    pub fn verify_dcap(&self, quote: &[u8], now: u64) -> Result<Claims, AttestError> {
        if self.collateral.is_empty() && self.pccs.is_none() {
            return Err(AttestError::NoCollateral(Tee::Sgx));
        }
        let tee = match dcap_qvl::quote::Quote::parse(quote) {
            Ok(parsed) if parsed.header.is_sgx() => Tee::Sgx,
            Ok(_) => Tee::Tdx,
            Err(e) => return Err(AttestError::Evidence(format!("not a DCAP quote: {e:#}"))),
        };
        let collateral = self.dcap_collateral(tee, quote, now)?;
        verify_quote(quote, &collateral, now).map_err(|e| AttestError::Evidence(e.to_string()))
    }

    /// Verifies a quote without challenge or binding checks (eHSM's `VerifyQuote`): a DCAP
    /// quote (SGX or TDX), or a sim quote when this service accepts simulation and `policy`
    /// allows it; then judges the claims by `policy`, when one is given.
    pub fn verify_any_quote(
        &self,
        quote: &[u8],
        policy: Option<&Policy>,
        now: u64,
    ) -> Result<Claims, AttestError> {
        let claims = if crate::sim::is_sim_quote(quote) {
            if !self.accept_simulation {
                return Err(AttestError::Evidence(
                    "a simulated quote, and this service does not accept simulated TEEs".into(),
                ));
            }
            let policy = policy.ok_or_else(|| {
                AttestError::Evidence(
                    "a simulated quote is judged only under a policy that names its platform"
                        .into(),
                )
            })?;
            verify_sim_under(quote, policy)?
        } else {
            self.verify_dcap(quote, now)?
        };
        if let Some(policy) = policy {
            policy.evaluate(&claims)?;
        }
        Ok(claims)
    }

    /// The token signing public key (raw Ed25519, 32 bytes).
    pub fn public_key(&self) -> [u8; 32] {
        self.signing
            .public_key()
            .as_ref()
            .try_into()
            .expect("32-byte key")
    }

    /// A fresh single-use nonce, valid for [`CHALLENGE_TTL_SECS`], for any app.
    pub fn challenge(&self, now: u64) -> Result<[u8; NONCE_LEN], AttestError> {
        self.challenge_for("", now)
    }

    /// A fresh single-use nonce for `app` only, valid for [`CHALLENGE_TTL_SECS`]. An app may
    /// hold at most [`MAX_CHALLENGES_PER_APP`] unexpired challenges and the service
    /// [`MAX_CHALLENGES`], so that asking for challenges cannot exhaust the server's memory.
    pub fn challenge_for(&self, app: &str, now: u64) -> Result<[u8; NONCE_LEN], AttestError> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| AttestError::Random)?;
        let mut challenges = self.challenges.lock().expect("challenge lock");
        challenges.retain(|_, (_, expiry)| *expiry > now);
        let held = challenges
            .values()
            .filter(|(owner, _)| owner == app)
            .count();
        if held >= MAX_CHALLENGES_PER_APP || challenges.len() >= MAX_CHALLENGES {
            return Err(AttestError::TooManyChallenges);
        }
        challenges.insert(nonce, (app.to_string(), now + CHALLENGE_TTL_SECS));
        Ok(nonce)
    }

    /// Verifies the request's evidence, checks that it answers the nonce for the runtime key,
    /// judges it by the policy, and returns a signed token. The nonce is spent whatever the
    /// outcome.
    pub fn attest(
        &self,
        request: &AttestationRequest<'_>,
        now: u64,
    ) -> Result<String, AttestError> {
        self.attest_with_claims(request, now)
            .map(|(token, _)| token)
    }

    /// [`Self::attest`], also returning what the token asserts (for the audit log).
    pub fn attest_with_claims(
        &self,
        request: &AttestationRequest<'_>,
        now: u64,
    ) -> Result<(String, TokenClaims), AttestError> {
        let AttestationRequest {
            app,
            policy_name,
            policy,
            nonce,
            runtime_key,
            receipt_key,
            evidence,
        } = *request;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| AttestError::Challenge)?;
        match self
            .challenges
            .lock()
            .expect("challenge lock")
            .remove(&nonce)
        {
            Some((owner, expiry)) if expiry > now && (owner.is_empty() || owner == app) => {}
            _ => return Err(AttestError::Challenge),
        }
        let claims = match evidence.tee {
            Tee::Sim => {
                if !self.accept_simulation {
                    return Err(AttestError::Evidence(
                        "this attestation service does not accept simulated TEEs (its operator \
                         enables them with --allow-simulation)"
                            .into(),
                    ));
                }
                verify_sim_under(&evidence.quote, policy)?
            }
            tee => {
                let collateral = self.dcap_collateral(tee, &evidence.quote, now)?;
                verify_dcap_as(tee, &evidence.quote, &collateral, now)?
            }
        };
        let expected = match receipt_key {
            Some(receipt_key) if receipt_key.len() != RECEIPT_KEY_LEN => {
                return Err(AttestError::Evidence(format!(
                    "a receipt key is {RECEIPT_KEY_LEN} bytes (Ed25519), not {}",
                    receipt_key.len()
                )));
            }
            Some(receipt_key) => {
                expected_report_data_with_receipt_key(&nonce, runtime_key, receipt_key)
            }
            None => expected_report_data(&nonce, runtime_key),
        };
        check_binding(&claims, &expected)?;
        policy.evaluate(&claims)?;
        let token = TokenClaims {
            iss: self.id.clone(),
            sub: app.to_string(),
            iat: now,
            exp: now + self.token_ttl,
            policy: policy_name.to_string(),
            runtime_key: B64URL.encode(runtime_key),
            receipt_key: receipt_key.map(|k| B64URL.encode(k)),
            claims,
        };
        let payload = serde_json::to_vec(&token).map_err(|e| AttestError::Token(e.to_string()))?;
        let signing_input = format!("{}.{}", B64URL.encode(JWT_HEADER), B64URL.encode(payload));
        let signature = self.signing.sign(signing_input.as_bytes());
        Ok((
            format!("{signing_input}.{}", B64URL.encode(signature)),
            token,
        ))
    }
}

/// Runs `future` to completion from synchronous code: on the current runtime when there is
/// one (the caller must be allowed to block: a `spawn_blocking` thread or a multi-threaded
/// runtime's worker), else on a temporary single-threaded runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(future)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a single-threaded tokio runtime")
            .block_on(future),
    }
}

fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Checks a token's signature with the service key `public_key` and its expiry at `now`.
pub fn verify_token(
    token: &str,
    public_key: &[u8; 32],
    now: u64,
) -> Result<TokenClaims, AttestError> {
    let claims = verify_token_signature(token, public_key)?;
    if now >= claims.exp {
        return Err(AttestError::TokenExpired);
    }
    Ok(claims)
}

/// Checks a token's signature with the service key `public_key`, whatever its expiry: what
/// it asserted, it asserted when it was issued (a receipt verifier reads tokens long after
/// they expired).
pub fn verify_token_signature(
    token: &str,
    public_key: &[u8; 32],
) -> Result<TokenClaims, AttestError> {
    let bad = |why: &str| AttestError::Token(why.to_string());
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not three dot-separated parts"));
    };
    let signature = B64URL
        .decode(signature)
        .map_err(|_| bad("signature is not base64url"))?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(format!("{header}.{payload}").as_bytes(), &signature)
        .map_err(|_| bad("signature does not verify with the service key"))?;
    if B64URL.decode(header).ok().as_deref() != Some(JWT_HEADER.as_bytes()) {
        return Err(bad("unexpected header"));
    }
    let payload = B64URL
        .decode(payload)
        .map_err(|_| bad("payload is not base64url"))?;
    serde_json::from_slice(&payload).map_err(|e| bad(&format!("payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::EvidenceProvider as _;
    use crate::policy::AllowedMeasurement;
    use crate::sim::{SimPlatform, SimTee, executable_measurement};

    const NOW: u64 = 1_800_000_000;

    struct Fixture {
        _dir: tempfile::TempDir,
        service: AttestationService,
        tee: SimTee,
        policy: Policy,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::load_or_create(dir.path().join("platform.pk8")).unwrap();
        let mut service = AttestationService::new("ppml-kms:test", &[9; 32]).unwrap();
        service.accept_simulation();
        let mut policy = Policy::strict(vec![AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }]);
        policy.allow_simulation = true;
        policy.sim_platforms = vec![hex::encode(platform.public_key())];
        Fixture {
            _dir: dir,
            service,
            tee: SimTee::new(platform),
            policy,
        }
    }

    fn attest(
        f: &Fixture,
        nonce: &[u8],
        key: &[u8],
        bound_key: &[u8],
    ) -> Result<String, AttestError> {
        let evidence = f
            .tee
            .evidence(&expected_report_data(nonce, bound_key))
            .unwrap();
        f.service.attest(&request(f, nonce, key, &evidence), NOW)
    }

    fn request<'a>(
        f: &'a Fixture,
        nonce: &'a [u8],
        key: &'a [u8],
        evidence: &'a Evidence,
    ) -> AttestationRequest<'a> {
        AttestationRequest {
            app: "app-1",
            policy_name: "default",
            policy: &f.policy,
            nonce,
            runtime_key: key,
            receipt_key: None,
            evidence,
        }
    }

    /// A token vouches for the receipt key only when the evidence binds it: evidence bound
    /// to the runtime key alone, or to another receipt key, is refused with one.
    #[test]
    fn a_receipt_key_is_vouched_for_only_when_the_evidence_binds_it() {
        let f = fixture();
        let attest_with = |bound: Option<&[u8]>, sent: Option<&[u8]>| {
            let nonce = f.service.challenge(NOW).unwrap();
            let report = match bound {
                Some(k) => expected_report_data_with_receipt_key(&nonce, b"rk", k),
                None => expected_report_data(&nonce, b"rk"),
            };
            let evidence = f.tee.evidence(&report).unwrap();
            let request = AttestationRequest {
                receipt_key: sent,
                ..request(&f, &nonce, b"rk", &evidence)
            };
            f.service.attest(&request, NOW)
        };
        let token = attest_with(Some(&[7; 32]), Some(&[7; 32])).unwrap();
        let claims = verify_token(&token, &f.service.public_key(), NOW).unwrap();
        assert_eq!(claims.receipt_key, Some(B64URL.encode([7u8; 32])));
        for (bound, sent) in [
            (None, Some(&[7u8; 32][..])),
            (Some(&[8u8; 32][..]), Some(&[7u8; 32][..])),
            (Some(&[7u8; 32][..]), None),
        ] {
            assert!(
                matches!(attest_with(bound, sent), Err(AttestError::Binding)),
                "{bound:?} {sent:?}"
            );
        }
        assert!(matches!(
            attest_with(Some(&[7; 31]), Some(&[7; 31])),
            Err(AttestError::Evidence(_))
        ));
        // Tokens without a receipt key keep their old shape.
        let plain = attest_with(None, None).unwrap();
        let claims = verify_token(&plain, &f.service.public_key(), NOW).unwrap();
        assert_eq!(claims.receipt_key, None);
        // A token's signature still verifies once it has expired.
        assert!(verify_token_signature(&plain, &f.service.public_key()).is_ok());
        assert!(verify_token(&plain, &f.service.public_key(), NOW + TOKEN_TTL_SECS).is_err());
    }

    /// Attack: use a runtime's quote command as an oracle, asking it to quote the binding of
    /// a challenge to the attacker's own key. The quote's report data are in another domain,
    /// so the service refuses the binding; the same evidence over the raw binding (what a
    /// runtime makes only for its own key) is accepted.
    #[test]
    fn attack_a_user_quote_never_answers_a_challenge() {
        let f = fixture();
        for whole in [true, false] {
            let nonce = f.service.challenge(NOW).unwrap();
            let binding = expected_report_data(&nonce, b"attacker-key");
            let data = if whole { &binding[..] } else { &binding[..32] };
            let evidence = f.tee.evidence(&user_report_data(data)).unwrap();
            let refused = f
                .service
                .attest(&request(&f, &nonce, b"attacker-key", &evidence), NOW);
            assert!(matches!(refused, Err(AttestError::Binding)), "{refused:?}");
            let nonce = f.service.challenge(NOW).unwrap();
            let evidence = f.tee.evidence(&expected_report_data(&nonce, b"k")).unwrap();
            assert!(
                f.service
                    .attest(&request(&f, &nonce, b"k", &evidence), NOW)
                    .is_ok()
            );
        }
    }

    #[test]
    fn sim_runtime_gets_a_token_that_verifies() {
        let f = fixture();
        let nonce = f.service.challenge(NOW).unwrap();
        let token = attest(&f, &nonce, b"runtime-key", b"runtime-key").unwrap();
        let claims = verify_token(&token, &f.service.public_key(), NOW + 1).unwrap();
        assert_eq!(claims.sub, "app-1");
        assert_eq!(claims.iss, "ppml-kms:test");
        assert_eq!(claims.claims.tee, Tee::Sim);
        assert_eq!(claims.runtime_key, B64URL.encode(b"runtime-key"));
        assert_eq!(claims.exp, NOW + TOKEN_TTL_SECS);
        // Expired, tampered, or checked with another key: refused.
        assert!(verify_token(&token, &f.service.public_key(), NOW + TOKEN_TTL_SECS).is_err());
        let other = AttestationService::new("x", &[1; 32]).unwrap();
        assert!(verify_token(&token, &other.public_key(), NOW).is_err());
        let (head, sig) = token.rsplit_once('.').unwrap();
        let (h, payload) = head.split_once('.').unwrap();
        let mut p = B64URL.decode(payload).unwrap();
        let at = p.len() / 2;
        p[at] ^= 1;
        let forged = format!("{h}.{}.{sig}", B64URL.encode(p));
        assert!(verify_token(&forged, &f.service.public_key(), NOW).is_err());
    }

    #[test]
    fn dcap_quotes_verify_with_the_configured_collateral() {
        let dir = std::path::PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("testdata");
        let mut service = AttestationService::new("x", &[2; 32]).unwrap();
        let quote = std::fs::read(dir.join("sgx_quote")).unwrap();
        assert!(matches!(
            service.verify_dcap(&quote, 1_751_328_000),
            Err(AttestError::NoCollateral(_))
        ));
        for tee in [Tee::Sgx, Tee::Tdx] {
            let file = dir.join(format!("{tee}_quote_collateral.json"));
            service.set_collateral(tee, Collateral::from_file(&file).unwrap());
        }
        let claims = service.verify_dcap(&quote, 1_751_328_000).unwrap();
        assert_eq!(claims.tee, Tee::Sgx);
        let tdx = std::fs::read(dir.join("tdx_quote")).unwrap();
        assert_eq!(
            service.verify_dcap(&tdx, 1_751_328_000).unwrap().tee,
            Tee::Tdx
        );
        let mut bad = quote.clone();
        bad[300] ^= 1;
        assert!(service.verify_dcap(&bad, 1_751_328_000).is_err());
    }

    #[test]
    fn nonces_are_single_use_and_expire() {
        let f = fixture();
        let nonce = f.service.challenge(NOW).unwrap();
        attest(&f, &nonce, b"k", b"k").unwrap();
        assert!(matches!(
            attest(&f, &nonce, b"k", b"k"),
            Err(AttestError::Challenge)
        ));
        assert!(matches!(
            attest(&f, &[7; NONCE_LEN], b"k", b"k"),
            Err(AttestError::Challenge)
        ));
        let old = f.service.challenge(NOW - CHALLENGE_TTL_SECS).unwrap();
        assert!(matches!(
            attest(&f, &old, b"k", b"k"),
            Err(AttestError::Challenge)
        ));
    }

    #[test]
    fn challenges_are_per_app_and_bounded() {
        let f = fixture();
        // Another app's challenge does not attest this one ("app-1").
        let foreign = f.service.challenge_for("app-2", NOW).unwrap();
        assert!(matches!(
            attest(&f, &foreign, b"k", b"k"),
            Err(AttestError::Challenge)
        ));
        let own = f.service.challenge_for("app-1", NOW).unwrap();
        attest(&f, &own, b"k", b"k").unwrap();
        for _ in 0..MAX_CHALLENGES_PER_APP {
            f.service.challenge_for("app-3", NOW).unwrap();
        }
        assert!(matches!(
            f.service.challenge_for("app-3", NOW),
            Err(AttestError::TooManyChallenges)
        ));
        // Others are not affected, and the app gets more once its challenges expire.
        f.service.challenge_for("app-4", NOW).unwrap();
        f.service
            .challenge_for("app-3", NOW + CHALLENGE_TTL_SECS)
            .unwrap();
    }

    #[test]
    fn evidence_bound_to_another_key_or_nonce_is_refused() {
        let f = fixture();
        let nonce = f.service.challenge(NOW).unwrap();
        // Evidence made for the attacker's key, presented with the victim's key.
        assert!(matches!(
            attest(&f, &nonce, b"victim", b"attacker"),
            Err(AttestError::Binding)
        ));
        let nonce = f.service.challenge(NOW).unwrap();
        let evidence = f
            .tee
            .evidence(&expected_report_data(&[0; NONCE_LEN], b"k"))
            .unwrap();
        assert!(matches!(
            f.service.attest(&request(&f, &nonce, b"k", &evidence), NOW),
            Err(AttestError::Binding)
        ));
    }

    #[test]
    fn policy_and_trust_are_enforced() {
        let mut f = fixture();
        f.policy.allow_simulation = false;
        let nonce = f.service.challenge(NOW).unwrap();
        assert!(matches!(
            attest(&f, &nonce, b"k", b"k"),
            Err(AttestError::Policy(PolicyViolation::SimulationNotAllowed))
        ));
        // A simulation platform the policy does not name (another owner's, say).
        let mut f = fixture();
        f.policy.sim_platforms = vec!["07".repeat(32)];
        let nonce = f.service.challenge(NOW).unwrap();
        assert!(matches!(
            attest(&f, &nonce, b"k", b"k"),
            Err(AttestError::Evidence(e)) if e.contains("trusted simulation platform keys")
        ));
        // A service whose operator did not enable simulation.
        let mut f = fixture();
        f.service.accept_simulation = false;
        let nonce = f.service.challenge(NOW).unwrap();
        assert!(matches!(
            attest(&f, &nonce, b"k", b"k"),
            Err(AttestError::Evidence(e)) if e.contains("--allow-simulation")
        ));
        // DCAP evidence without collateral.
        let f = fixture();
        let nonce = f.service.challenge(NOW).unwrap();
        let evidence = Evidence {
            tee: Tee::Sgx,
            quote: vec![0; 10],
        };
        assert!(matches!(
            f.service.attest(&request(&f, &nonce, b"k", &evidence), NOW),
            Err(AttestError::NoCollateral(Tee::Sgx))
        ));
    }
}
