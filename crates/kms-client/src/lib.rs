//! The client of KMS servers that speak the eHSM REST protocol (`docs/kms-api.md`): the ppml
//! KMS server (`ppml kms serve`) and Intel eHSM-KMS itself.
//!
//! Two types, one per state of the runtime, so that code cannot confuse them:
//!
//! - [`RemoteKms`], an *unattested* client: data keys come from `GenerateDataKey` (32 bytes,
//!   bound to the caller's `aad`) and go back through `Decrypt`, which the server refuses for
//!   keys marked for attested release ([`KmsError::AttestationRequired`]).
//! - [`AttestedKms`], made only by [`RemoteKms::attest`] from evidence that the KMS accepted:
//!   it unwraps with `ReleaseDataKey`, sealed to a runtime key that never leaves this process,
//!   and attests again before its token expires.
//!
//! The wrapped key kept in file headers is the server's base64 ciphertext, verbatim, so any
//! client of the same KMS can unwrap it. Answers are read through the shared wire contract
//! ([`ppml_kms::protocol`]), never by their text.
//!
//! TLS trust is explicit ([`TlsTrust`]): the system roots, a CA certificate file, or the
//! SHA-256 fingerprint of the server's certificate (what `ppml kms serve` prints for its
//! self-signed certificate). Plain `http://` URLs are accepted, for loopback and tests.

pub mod load_test;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use ppml_attestation::peer::KmsKeyState;
use ppml_kms::grant::SignedGrant;
use ppml_kms::owner::OwnerKey;
use ppml_kms::protocol::{Action, AuditHead, OwnerAuthority, read_answer};
pub use ppml_kms::{
    AppCredentials, DataKey, KeyManagementService, KeyReference, KmsError, PrimaryKeyId,
    error_chain, format_fingerprint,
};

/// How the client decides that it talks to the right server over TLS.
#[derive(Clone, Debug, Default)]
pub enum TlsTrust {
    /// The operating system's trusted roots, with host name checks (a KMS with a public or
    /// enterprise certificate).
    #[default]
    SystemRoots,
    /// A CA certificate (PEM) that signed the server's certificate, with host name checks.
    CaFile(PathBuf),
    /// Exactly the server certificate whose DER encoding has this SHA-256 digest. Host names
    /// are not checked: the pin names one certificate, and the handshake proves the server
    /// holds its private key.
    Fingerprint([u8; 32]),
    /// The certificate the KMS's quote binds (a KMS in a TEE makes its own at each start):
    /// the first one presented is pinned, and the KMS policy check, which this trust needs
    /// ([`RemoteKmsConfig::kms_policy`]), refuses a KMS whose quote does not bind it.
    Attested,
}

impl TlsTrust {
    /// Parses a fingerprint as printed by `ppml kms serve`: `sha256:` followed by 64 hex
    /// characters (colons between bytes allowed; the prefix is optional).
    pub fn parse_fingerprint(text: &str) -> Result<Self, KmsError> {
        let hex_text: String = text
            .trim()
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let bytes = hex::decode(&hex_text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                KmsError::InvalidConfig(format!(
                    "{text:?} is not a SHA-256 certificate fingerprint (expected sha256:<64 hex>)"
                ))
            })?;
        Ok(TlsTrust::Fingerprint(bytes))
    }
}

/// The client's check of the KMS's certificate when it is not reqwest's own: a chain to a
/// CA or the system roots (`chain`), and one certificate only (`pinned`): the fingerprint
/// given, or, with a KMS policy and no fingerprint, the first certificate the chain accepted
/// (the one the KMS's quote is then checked against). Handshake signatures are verified with
/// the provider's algorithms, so the server must hold the certificate's private key.
#[derive(Debug)]
struct ServerCertificate {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    /// Pin the first certificate presented even without a chain ([`TlsTrust::Attested`]).
    attested: bool,
    pinned: std::sync::Mutex<Option<[u8; 32]>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertificate {
    /// The certificate this client accepts, once there is one.
    fn pinned(&self) -> Option<[u8; 32]> {
        *self
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ServerCertVerifier for ServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = || {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        };
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref())
            .as_ref()
            .try_into()
            .expect("32-byte digest");
        let mut pinned = self
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *pinned {
            // Only a certificate the chain accepted is pinned on first use, or any for an
            // attested KMS, whose quote must then bind it.
            None if self.chain.is_some() || self.attested => *pinned = Some(digest),
            None => return refused(),
            Some(pin) if bool::from(subtle::ConstantTimeEq::ct_eq(&pin[..], &digest[..])) => {}
            Some(_) => return refused(),
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client's own policy for the KMS (`docs/attestation.md` §8).
#[derive(Clone, Debug)]
pub struct KmsPolicy {
    /// What the KMS must be: its TEE and measurement, as for runtimes. A simulated KMS is
    /// accepted only on the platforms the policy names.
    pub policy: ppml_attestation::Policy,
    /// Collateral for the KMS platform's SGX or TDX quotes (not needed for simulation).
    pub collateral: Option<ppml_attestation::dcap::Collateral>,
}

/// Where the KMS is and how to trust it.
#[derive(Clone, Debug)]
pub struct RemoteKmsConfig {
    /// Base URL, e.g. `https://kms.example:9000` (the client appends `/ehsm?Action=…`).
    pub url: String,
    /// TLS trust for `https://` URLs.
    pub trust: TlsTrust,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Verify the KMS before trusting it: at connection, before any credential or key is
    /// sent, the client asks for the KMS's quote (`GenerateQuote`) over a fresh challenge and
    /// the TLS certificate of its connection, and refuses a KMS this policy does not accept
    /// ([`KmsError::UntrustedKms`]); every later connection must present the same certificate.
    pub kms_policy: Option<KmsPolicy>,
    /// The protocol dialect the server speaks ([`KmsFlavor::Auto`]: learnt from `GetVersion`).
    pub flavor: KmsFlavor,
}

/// The dialect of the eHSM protocol a KMS server speaks (`docs/kms-api.md` §9.1). eHSM's
/// versions validate and sign requests differently, and a client must follow each one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KmsFlavor {
    /// Learnt from `GetVersion`: ppml's server names itself, eHSM gives its `version`
    /// (`0.x` is [`KmsFlavor::Ehsm03`], later ones [`KmsFlavor::Ehsm`]).
    #[default]
    Auto,
    /// ppml's KMS server: requests carry a nonce and their action; `aad` is text.
    Ppml,
    /// eHSM-KMS 1.x (its `main`): `aad` must be base64 and its decoded bytes are bound (ppml
    /// sends base64 of its aad); `CreateKey` needs `keyusage`; requests carry a nonce.
    Ehsm,
    /// eHSM-KMS 0.3 (the version BigDL deploys): signs `{appid, timestamp, payload}` only, so
    /// requests carry no nonce; `aad` is text.
    Ehsm03,
}

impl KmsFlavor {
    /// The flavor's name on the command line and in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            KmsFlavor::Auto => "auto",
            KmsFlavor::Ppml => "ppml",
            KmsFlavor::Ehsm => "ehsm",
            KmsFlavor::Ehsm03 => "ehsm-0.3",
        }
    }

    /// The flavor named `name` (see [`KmsFlavor::name`]).
    pub fn from_name(name: &str) -> Option<KmsFlavor> {
        [
            KmsFlavor::Auto,
            KmsFlavor::Ppml,
            KmsFlavor::Ehsm,
            KmsFlavor::Ehsm03,
        ]
        .into_iter()
        .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// The flavor of a server that answered `GetVersion` with `version` (its `result`).
    fn detect(version: &Map<String, Value>) -> KmsFlavor {
        if version
            .get("kms_id")
            .and_then(Value::as_str)
            .is_some_and(|id| id.starts_with("ppml-kms:"))
        {
            return KmsFlavor::Ppml;
        }
        match version.get("version").and_then(Value::as_str) {
            Some(v) if v.trim_start_matches('v').starts_with("0.") => KmsFlavor::Ehsm03,
            _ => KmsFlavor::Ehsm,
        }
    }
}

impl std::str::FromStr for KmsFlavor {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        KmsFlavor::from_name(text)
            .ok_or_else(|| format!("unknown KMS flavor {text:?}: auto, ppml, ehsm or ehsm-0.3"))
    }
}

impl std::fmt::Display for KmsFlavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl RemoteKmsConfig {
    /// A configuration with the default trust (system roots) and a 30 s timeout.
    pub fn new(url: impl Into<String>) -> Self {
        RemoteKmsConfig {
            url: url.into(),
            trust: TlsTrust::default(),
            timeout: Duration::from_secs(30),
            kms_policy: None,
            flavor: KmsFlavor::Auto,
        }
    }
}

/// What [`RemoteKms::unseal`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsealOutcome {
    /// The KMS's id (of its store).
    pub kms_id: String,
    /// The id of the root key it now holds ([`ppml_attestation::peer::kms_root_id`]).
    pub root_id: [u8; 32],
    /// False when the KMS was already unsealed with this root key.
    pub was_sealed: bool,
    /// The KMS's audit head right after the unseal (its `Unseal` entry), when it was sealed
    /// and keeps an audit log: give it to the next unseal, which a KMS over an older store
    /// then refuses.
    pub audit_head: Option<AuditHead>,
}

/// The SHA-256 a KMS's quote binds for the connection to `url`: the certificate the client
/// pinned, or zeros for plain HTTP (loopback only).
fn bound_certificate(
    url: &str,
    certificate: Option<&ServerCertificate>,
) -> Result<[u8; 32], KmsError> {
    match certificate {
        Some(verifier) if url.starts_with("https://") => verifier
            .pinned()
            .ok_or_else(|| KmsError::UntrustedKms("no TLS certificate was presented".into())),
        _ => Ok([0; 32]),
    }
}

/// A primary key as listed by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKeyInfo {
    /// Key id.
    pub keyid: String,
    /// eHSM key spec, e.g. `EH_AES_GCM_256`.
    pub keyspec: String,
    /// Whether the key is enabled.
    pub enabled: bool,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// The result of a successful attestation: the token and the runtime key it names.
struct Attested {
    token: String,
    runtime: ppml_attestation::release::RuntimeKey,
    /// When to attest again: a margin before the token expires, by this process's clock
    /// (the token's lifetime `exp - iat` counted from its receipt, so clock skew between
    /// this host and the server does not matter).
    renew_at: std::time::Instant,
}

/// Attest again this long before the token expires (at most a quarter of its lifetime).
const RENEW_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);

/// What re-attestation needs, and the current token.
struct Attestation {
    provider: Arc<dyn ppml_attestation::EvidenceProvider>,
    policy_id: String,
    /// Signs this runtime's job receipts; every attestation binds it (docs/receipts.md).
    receipt_key: ppml_attestation::release::ReceiptKey,
    current: tokio::sync::Mutex<Arc<Attested>>,
}

/// An HTTP(S) connection to an eHSM-protocol KMS; cheap to clone.
#[derive(Clone)]
pub struct RemoteKms {
    endpoint: String,
    http: reqwest::Client,
    creds: Option<AppCredentials>,
    kms_id: String,
    owner: Option<Arc<OwnerKey>>,
    flavor: KmsFlavor,
}

impl std::fmt::Debug for RemoteKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKms")
            .field("endpoint", &self.endpoint)
            .field("kms_id", &self.kms_id)
            .field("creds", &self.creds)
            .field("owner", &self.owner)
            .field("flavor", &self.flavor)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The [`ServerCertificate`] check of `trust`: a fingerprint is the pin; with a CA or the
/// system roots, the first certificate they accept becomes it.
fn server_certificate(
    trust: &TlsTrust,
    provider: Arc<CryptoProvider>,
) -> Result<ServerCertificate, KmsError> {
    let chain = |roots: rustls::RootCertStore| {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map(Some)
        .map_err(|e| KmsError::InvalidConfig(format!("TLS trust: {e}")))
    };
    let (chain, pinned) = match trust {
        TlsTrust::Fingerprint(sha256) => (None, Some(*sha256)),
        TlsTrust::Attested => (None, None),
        TlsTrust::CaFile(path) => {
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| KmsError::InvalidConfig(format!("{}: {e}", path.display())))?
            {
                let cert = cert.map_err(|e| {
                    KmsError::InvalidConfig(format!(
                        "{}: not a PEM certificate: {e}",
                        path.display()
                    ))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| KmsError::InvalidConfig(format!("{}: {e}", path.display())))?;
            }
            (chain(roots)?, None)
        }
        TlsTrust::SystemRoots => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(KmsError::InvalidConfig(
                    "no trusted root certificates on this system".into(),
                ));
            }
            (chain(roots)?, None)
        }
    };
    Ok(ServerCertificate {
        chain,
        attested: matches!(trust, TlsTrust::Attested),
        pinned: std::sync::Mutex::new(pinned),
        provider,
    })
}

fn http_client(
    config: &RemoteKmsConfig,
) -> Result<(reqwest::Client, Option<Arc<ServerCertificate>>), KmsError> {
    let builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .user_agent(concat!("ppml/", env!("CARGO_PKG_VERSION")));
    // A KMS policy or a fingerprint needs ppml's certificate check; a CA or the system roots
    // alone are reqwest's.
    let (builder, certificate) = match (&config.trust, &config.kms_policy) {
        (TlsTrust::Attested, None) => {
            return Err(KmsError::InvalidConfig(
                "an attested KMS certificate needs a KMS policy (--kms-policy) to check it".into(),
            ));
        }
        (TlsTrust::SystemRoots, None) => (builder, None),
        (TlsTrust::CaFile(path), None) => {
            let pem = std::fs::read(path).map_err(|e| KmsError::storage(path, e))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                KmsError::InvalidConfig(format!("{}: not a PEM certificate: {e}", path.display()))
            })?;
            let builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
            (builder, None)
        }
        (trust, _) => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let certificate = Arc::new(server_certificate(trust, provider.clone())?);
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| KmsError::InvalidConfig(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(certificate.clone())
                .with_no_client_auth();
            (builder.use_preconfigured_tls(tls), Some(certificate))
        }
    };
    let client = builder
        .build()
        .map_err(|e| KmsError::InvalidConfig(format!("building the HTTP client: {e}")))?;
    Ok((client, certificate))
}

/// Whether `url`'s host is `localhost` or a loopback IP address.
fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn string_field(result: &Map<String, Value>, name: &str) -> Result<String, KmsError> {
    result
        .get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| KmsError::Protocol(format!("response without {name:?}")))
}

fn aad_text(aad: &[u8]) -> Result<&str, KmsError> {
    std::str::from_utf8(aad).map_err(|_| {
        KmsError::InvalidConfig(
            "the eHSM protocol carries aad as text; this aad is not UTF-8".into(),
        )
    })
}

impl RemoteKms {
    /// Connects to the KMS at `config.url`: asks its version (which also checks TLS trust)
    /// and learns its id; with a KMS policy, verifies the KMS first (`docs/attestation.md`
    /// §8). `creds` may be `None` for [`RemoteKms::enroll`] only. A sealed KMS is
    /// [`KmsError::Sealed`].
    pub async fn connect(
        config: &RemoteKmsConfig,
        creds: Option<AppCredentials>,
    ) -> Result<Self, KmsError> {
        let (kms, version, certificate) = Self::reach(config, creds).await?;
        if version.get("sealed").and_then(Value::as_bool) == Some(true) {
            return Err(KmsError::Sealed);
        }
        if let Some(policy) = &config.kms_policy {
            let certificate = bound_certificate(&config.url, certificate.as_deref())?;
            let (state, kms_id) = kms.verify_kms(policy, &certificate).await?;
            if matches!(state, KmsKeyState::Sealed { .. }) {
                return Err(KmsError::Sealed);
            }
            if kms_id != kms.kms_id {
                return Err(KmsError::UntrustedKms(format!(
                    "its quote names KMS {kms_id:?}, its version {:?}",
                    kms.kms_id
                )));
            }
        }
        Ok(kms)
    }

    /// The client of `config.url` after a first `GetVersion`: the version's result and the
    /// certificate check that pinned the certificate it presented.
    async fn reach(
        config: &RemoteKmsConfig,
        creds: Option<AppCredentials>,
    ) -> Result<(Self, Map<String, Value>, Option<Arc<ServerCertificate>>), KmsError> {
        let base = config.url.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(KmsError::InvalidConfig(format!(
                "KMS URL {:?} must start with https:// (or http:// for loopback)",
                config.url
            )));
        }
        if base.starts_with("http://") && !is_loopback_url(base) {
            // Credentials, wrapped keys and tokens would cross the network in the clear.
            return Err(KmsError::InvalidConfig(format!(
                "KMS URL {:?}: plain http:// is accepted only for loopback addresses; use https://",
                config.url
            )));
        }
        let (http, certificate) = http_client(config)?;
        let mut kms = RemoteKms {
            endpoint: format!("{base}/ehsm"),
            http,
            creds,
            kms_id: String::new(),
            owner: None,
            flavor: config.flavor,
        };
        let version = kms.unsigned(Action::GetVersion).await?;
        let detected = KmsFlavor::detect(&version);
        kms.flavor = match config.flavor {
            KmsFlavor::Auto => detected,
            // ppml's server is always spoken to as itself: it needs the signed action.
            _ if detected == KmsFlavor::Ppml => KmsFlavor::Ppml,
            given => given,
        };
        // The ppml server names itself; a plain eHSM is named by its URL.
        kms.kms_id = match version.get("kms_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("ehsm:{base}"),
        };
        Ok((kms, version, certificate))
    }

    /// Unseals the KMS at `config.url` with the owner's `root_key` (`docs/attestation.md`
    /// §9): verifies the KMS by `config.kms_policy` (required), sends the root key sealed to
    /// the unseal key its quote binds, and checks that its next quote binds the root key's id.
    /// A KMS already unsealed with this root key is left as it is; one unsealed with another
    /// is [`KmsError::UnsealFailed`]. Nothing is sent to a KMS the policy refuses.
    pub async fn unseal(
        config: &RemoteKmsConfig,
        root_key: &Zeroizing<[u8; 32]>,
        last_head: Option<&AuditHead>,
    ) -> Result<UnsealOutcome, KmsError> {
        use ppml_attestation::peer::{kms_root_id, unseal_aad};
        let policy = config.kms_policy.as_ref().ok_or_else(|| {
            KmsError::InvalidConfig(
                "unsealing needs a KMS policy (--kms-policy): the root key goes only to a KMS \
                 whose evidence satisfies it"
                    .into(),
            )
        })?;
        let root_id = kms_root_id(root_key);
        let pinned = policy
            .policy
            .kms_root_id_values()
            .map_err(|e| KmsError::InvalidConfig(e.to_string()))?;
        if !pinned.is_empty() && !pinned.contains(&root_id) {
            return Err(KmsError::InvalidConfig(format!(
                "the KMS policy pins other root keys (kms_root_ids) than this one ({})",
                hex::encode(root_id)
            )));
        }
        let (kms, _, certificate) = Self::reach(config, None).await?;
        let certificate = bound_certificate(&config.url, certificate.as_deref())?;
        let unseal_key = match kms.verify_kms(policy, &certificate).await? {
            (KmsKeyState::Unsealed { root_id: held }, kms_id) => {
                if held != root_id {
                    return Err(KmsError::UnsealFailed(format!(
                        "the KMS is already unsealed with another root key (id {})",
                        hex::encode(held)
                    )));
                }
                return Ok(UnsealOutcome {
                    kms_id,
                    root_id,
                    was_sealed: false,
                    audit_head: None,
                });
            }
            (KmsKeyState::Sealed { unseal_key }, _) => unseal_key,
        };
        let (encapsulated, sealed_root_key) = ppml_attestation::release::seal_to(
            &unseal_key,
            root_key.as_slice(),
            &unseal_aad(&unseal_key),
        )
        .map_err(|e| KmsError::UnsealFailed(e.to_string()))?;
        let response = kms
            .http
            .post(&kms.endpoint)
            .query(&[("Action", Action::Unseal.name())])
            .json(&json!({
                "enc": BASE64.encode(encapsulated),
                "sealed_root_key": BASE64.encode(sealed_root_key),
                "audit_head": last_head,
            }))
            .send()
            .await
            .map_err(|e| kms.transport(e))?;
        let answer = kms.read(response).await?;
        let audit_head = match answer.get("audit_head") {
            None | Some(Value::Null) => None,
            Some(head) => Some(serde_json::from_value(head.clone()).map_err(|e| {
                KmsError::UnsealFailed(format!("the KMS answered a malformed audit head: {e}"))
            })?),
        };
        match kms.verify_kms(policy, &certificate).await? {
            (KmsKeyState::Unsealed { root_id: held }, kms_id) if held == root_id => {
                Ok(UnsealOutcome {
                    kms_id,
                    root_id,
                    was_sealed: true,
                    audit_head,
                })
            }
            _ => Err(KmsError::UnsealFailed(
                "after the unseal, the KMS's quote does not bind this root key".into(),
            )),
        }
    }

    /// Asks the KMS for its quote over a fresh challenge and checks it against `policy`,
    /// bound to the certificate of this client's connections (`docs/attestation.md` §8):
    /// returns the key state and KMS id the quote binds.
    async fn verify_kms(
        &self,
        policy: &KmsPolicy,
        certificate: &[u8; 32],
    ) -> Result<(KmsKeyState, String), KmsError> {
        use ppml_attestation::peer::{kms_quote_report_data, verify_peer_evidence};
        let untrusted = |reason: String| KmsError::UntrustedKms(reason);
        let mut challenge = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
            .map_err(|_| KmsError::Random)?;
        let answer = self
            .unsigned_with(
                Action::GenerateQuote,
                &[("challenge", BASE64.encode(challenge).as_str())],
            )
            .await
            .map_err(|e| untrusted(format!("it gave no quote: {e}")))?;
        let tee: ppml_attestation::Tee =
            serde_json::from_value(answer.get("tee").cloned().unwrap_or(Value::Null))
                .map_err(|_| KmsError::Protocol("GenerateQuote without a valid \"tee\"".into()))?;
        let quote = BASE64
            .decode(string_field(&answer, "quote")?)
            .map_err(|_| KmsError::Protocol("GenerateQuote's quote is not base64".into()))?;
        let hex32 = |name: &str| -> Result<[u8; 32], KmsError> {
            hex::decode(string_field(&answer, name)?)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    KmsError::Protocol(format!("GenerateQuote's {name} is not 32 hex bytes"))
                })
        };
        let state = match answer.get("sealed").and_then(Value::as_bool) {
            Some(true) => KmsKeyState::Sealed {
                unseal_key: hex32("unseal_key")?,
            },
            Some(false) => KmsKeyState::Unsealed {
                root_id: hex32("root_id")?,
            },
            None => {
                return Err(KmsError::Protocol(
                    "GenerateQuote without \"sealed\"".into(),
                ));
            }
        };
        let kms_id = string_field(&answer, "kms_id")?;
        let evidence = ppml_attestation::Evidence { tee, quote };
        let expected = kms_quote_report_data(&challenge, certificate, &kms_id, &state);
        let now = now_ms() / 1000;
        let claims = verify_peer_evidence(
            &evidence,
            &expected,
            &policy.policy,
            policy.collateral.as_ref(),
            now,
        )
        .map_err(|e| untrusted(e.to_string()))?;
        if let KmsKeyState::Unsealed { root_id } = &state {
            let pinned = policy
                .policy
                .kms_root_id_values()
                .map_err(|e| KmsError::InvalidConfig(e.to_string()))?;
            if !pinned.is_empty() && !pinned.contains(root_id) {
                return Err(untrusted(format!(
                    "it holds root key {}, which the KMS policy does not name (kms_root_ids)",
                    hex::encode(root_id)
                )));
            }
        }
        tracing::info!(
            kms_id = %kms_id,
            tee = %claims.tee,
            sealed = matches!(state, KmsKeyState::Sealed { .. }),
            measurement = claims.measurements.mrenclave.as_deref().or(claims.measurements.mrtd.as_deref()).unwrap_or(""),
            "the KMS's evidence satisfies the KMS policy"
        );
        Ok((state, kms_id))
    }

    /// Signs the requests that need the data owner's authority with `owner`
    /// (`docs/kms-api.md` §4.1): marking keys for attested release, disabling, enabling,
    /// rotating and deleting keys, and plaintext data keys of marked keys.
    pub fn with_owner_key(mut self, owner: Arc<OwnerKey>) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Whether this client holds the data owner's key.
    pub fn has_owner_key(&self) -> bool {
        self.owner.is_some()
    }

    /// Whether the server is ppml's (it knows the `action` and `owner_sign` fields and owner
    /// keys; eHSM signs a fixed set of fields and would refuse them).
    pub fn is_ppml_server(&self) -> bool {
        self.kms_id.starts_with("ppml-kms:")
    }

    /// The dialect this client speaks to the server (never [`KmsFlavor::Auto`]).
    pub fn flavor(&self) -> KmsFlavor {
        self.flavor
    }

    /// `aad` as this server's dialect carries it: text, or for eHSM 1.x base64 of its bytes
    /// (eHSM binds the decoded bytes).
    fn wire_aad(&self, aad: &[u8]) -> Result<String, KmsError> {
        match self.flavor {
            KmsFlavor::Ehsm => Ok(BASE64.encode(aad)),
            _ => aad_text(aad).map(str::to_string),
        }
    }

    fn transport(&self, e: reqwest::Error) -> KmsError {
        KmsError::Transport {
            url: self.endpoint.clone(),
            detail: error_chain(&e),
        }
    }

    async fn unsigned(&self, action: Action) -> Result<Map<String, Value>, KmsError> {
        self.unsigned_with(action, &[]).await
    }

    async fn unsigned_with(
        &self,
        action: Action,
        parameters: &[(&str, &str)],
    ) -> Result<Map<String, Value>, KmsError> {
        let mut query = vec![("Action", action.name())];
        query.extend_from_slice(parameters);
        let response = self
            .http
            .get(&self.endpoint)
            .query(&query)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        self.read(response).await
    }

    async fn read(&self, response: reqwest::Response) -> Result<Map<String, Value>, KmsError> {
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| {
            KmsError::Protocol(format!(
                "HTTP {status} with a body that is not eHSM JSON ({} bytes)",
                bytes.len()
            ))
        })?;
        read_answer(value)
    }

    /// Sends a signed request and returns its `result`.
    pub async fn call(
        &self,
        action: Action,
        payload: Value,
    ) -> Result<Map<String, Value>, KmsError> {
        let creds = self.creds.as_ref().ok_or(KmsError::Unauthorized)?;
        let nonce = ppml_kms::sealing::random::<12>().ok_or(KmsError::Random)?;
        let mut body = Map::new();
        body.insert("appid".into(), Value::String(creds.appid.clone()));
        body.insert("payload".into(), payload);
        body.insert("timestamp".into(), Value::String(now_ms().to_string()));
        // eHSM 0.3 signs only {appid, timestamp, payload}: a nonce would break the signature.
        if self.flavor != KmsFlavor::Ehsm03 {
            body.insert("nonce".into(), Value::String(hex::encode(nonce)));
        }
        if self.is_ppml_server() {
            // The action inside the signature: the body is good for this action only.
            body.insert(
                ppml_kms::owner::ACTION_FIELD.into(),
                Value::String(action.name().into()),
            );
            if let Some(owner) = &self.owner
                && action.owner_authority() != OwnerAuthority::NotNeeded
            {
                let signature = owner.sign_request(&body);
                body.insert(
                    ppml_kms::owner::OWNER_SIGN_FIELD.into(),
                    Value::String(signature),
                );
            }
        }
        let sign = ppml_kms::ehsm::sign(&creds.apikey, &body);
        body.insert("sign".into(), Value::String(sign));
        let response = self
            .http
            .post(&self.endpoint)
            .query(&[("Action", action.name())])
            .json(&body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        self.read(response).await
    }

    /// Registers a new application (eHSM `Enroll`); the api key is shown only here. The app
    /// has no owner key: its api key alone can do everything eHSM allows, and it cannot mark
    /// keys for attested release (see [`RemoteKms::enroll_owned`]).
    pub async fn enroll(&self) -> Result<AppCredentials, KmsError> {
        let result = self.unsigned(Action::Enroll).await?;
        Ok(AppCredentials::new(
            string_field(&result, "appid")?,
            Zeroizing::new(string_field(&result, "apikey")?).to_string(),
        ))
    }

    /// Registers a new application owned by `owner` (ppml's `Enroll` with `owner_key`): the
    /// actions of `docs/kms-api.md` §4.1 then need `owner`'s signature, which the api key
    /// handed to runtimes and hosts cannot give.
    pub async fn enroll_owned(&self, owner: &OwnerKey) -> Result<AppCredentials, KmsError> {
        if !self.is_ppml_server() {
            return Err(KmsError::InvalidConfig(
                "owner keys need a ppml KMS server; this KMS is not one".into(),
            ));
        }
        let public = owner.public_text();
        let result = self
            .unsigned_with(Action::Enroll, &[("owner_key", &public)])
            .await?;
        Ok(AppCredentials::new(
            string_field(&result, "appid")?,
            Zeroizing::new(string_field(&result, "apikey")?).to_string(),
        ))
    }

    /// The calling app's primary keys.
    pub async fn list_keys(&self) -> Result<Vec<RemoteKeyInfo>, KmsError> {
        let result = self.call(Action::ListKey, json!({})).await?;
        let list = result
            .get("list")
            .and_then(Value::as_array)
            .ok_or_else(|| KmsError::Protocol("ListKey without a list".into()))?;
        list.iter()
            .map(|entry| {
                let entry = entry
                    .as_object()
                    .ok_or_else(|| KmsError::Protocol("ListKey entry is not an object".into()))?;
                Ok(RemoteKeyInfo {
                    keyid: string_field(entry, "keyid")?,
                    keyspec: entry
                        .get("keyspec")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                    enabled: entry.get("keyState").and_then(Value::as_u64) == Some(1),
                    created_ms: entry
                        .get("creationDate")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                })
            })
            .collect()
    }

    /// Adds a new version to a primary key (ppml extension `RotateKey`); returns the new
    /// version number. Data keys wrapped before stay unwrappable.
    pub async fn rotate_key(&self, primary: &PrimaryKeyId) -> Result<u64, KmsError> {
        let result = self
            .call(Action::RotateKey, json!({"keyid": primary.0}))
            .await
            .map_err(|e| with_key(e, primary))?;
        result
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| KmsError::Protocol("RotateKey without a version".into()))
    }

    /// Enables or disables a primary key.
    pub async fn set_enabled(&self, primary: &PrimaryKeyId, enabled: bool) -> Result<(), KmsError> {
        let action = if enabled {
            Action::EnableKey
        } else {
            Action::DisableKey
        };
        self.call(action, json!({"keyid": primary.0}))
            .await
            .map_err(|e| with_key(e, primary))?;
        Ok(())
    }

    /// Stores an attestation policy for this app (`UploadQuotePolicy`); returns its id.
    pub async fn upload_policy(
        &self,
        policy: &ppml_attestation::Policy,
    ) -> Result<String, KmsError> {
        let text = serde_json::to_string(policy)
            .map_err(|e| KmsError::Protocol(format!("policy JSON: {e}")))?;
        let result = self
            .call(Action::UploadQuotePolicy, json!({"policy": text}))
            .await?;
        string_field(&result, "policyId")
    }

    /// Releases `primary`'s data keys only to runtimes attested under `policy_id`
    /// (`SetKeyReleasePolicy`).
    pub async fn set_release_policy(
        &self,
        primary: &PrimaryKeyId,
        policy_id: &str,
    ) -> Result<(), KmsError> {
        self.call(
            Action::SetKeyReleasePolicy,
            json!({"keyid": primary.0, "policyId": policy_id}),
        )
        .await
        .map_err(|e| with_key(e, primary))?;
        Ok(())
    }
}

impl RemoteKms {
    /// The KMS's attestation key (`GetVersion`'s `attestation_key`, Ed25519): what the
    /// attestation tokens it issues verify with. A KMS that attests no runtime has none
    /// ([`KmsError::InvalidConfig`]).
    pub async fn attestation_key(&self) -> Result<[u8; 32], KmsError> {
        let version = self.unsigned(Action::GetVersion).await?;
        let key = version
            .get("attestation_key")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                KmsError::InvalidConfig(format!(
                    "KMS {} attests no runtime: it has no attestation key",
                    self.kms_id
                ))
            })?;
        hex::decode(key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| KmsError::Protocol("GetVersion attestation_key is not 32 bytes".into()))
    }

    /// A stored attestation policy of this app (`GetQuotePolicy`).
    pub async fn get_policy(&self, policy_id: &str) -> Result<ppml_attestation::Policy, KmsError> {
        let stored = self
            .call(Action::GetQuotePolicy, json!({"policyId": policy_id}))
            .await?;
        serde_json::from_str(&string_field(&stored, "policy")?).map_err(|e| {
            KmsError::Protocol(format!(
                "GetQuotePolicy returned a policy ppml cannot read: {e}"
            ))
        })
    }

    /// Attests this process to the KMS (docs/attestation.md §6): a fresh runtime key, a
    /// challenge, evidence from `provider` bound to both, and a token for `policy_id`. The
    /// returned client unwraps data keys of keys marked for attested release with
    /// `ReleaseDataKey`, opened with the runtime key; before the token expires, or when the
    /// server says it has, it attests again with `provider` (a new runtime key and fresh
    /// evidence). A refusal is [`KmsError::Attestation`] and leaves no attested client.
    pub async fn attest(
        self,
        provider: Arc<dyn ppml_attestation::EvidenceProvider>,
        policy_id: &str,
    ) -> Result<AttestedKms, KmsError> {
        let receipt_key = ppml_attestation::release::ReceiptKey::generate()
            .map_err(|e| KmsError::Attestation(format!("making the receipt key: {e}")))?;
        let attested = self
            .attest_once(provider.as_ref(), policy_id, &receipt_key)
            .await?;
        // An attested runtime never speaks for the owner.
        let mut remote = self;
        remote.owner = None;
        Ok(AttestedKms {
            remote,
            attestation: Arc::new(Attestation {
                provider,
                policy_id: policy_id.to_string(),
                receipt_key,
                current: tokio::sync::Mutex::new(Arc::new(attested)),
            }),
            grant: None,
        })
    }

    async fn attest_once(
        &self,
        provider: &dyn ppml_attestation::EvidenceProvider,
        policy_id: &str,
        receipt_key: &ppml_attestation::release::ReceiptKey,
    ) -> Result<Attested, KmsError> {
        use ppml_attestation::release::RuntimeKey;
        use ppml_attestation::service::expected_report_data_with_receipt_key;
        let runtime = RuntimeKey::generate();
        let challenge = self.call(Action::AttestChallenge, json!({})).await?;
        let nonce = BASE64
            .decode(string_field(&challenge, "nonce")?)
            .map_err(|_| KmsError::Protocol("AttestChallenge nonce is not base64".into()))?;
        let receipt_public = receipt_key.public_bytes();
        let evidence = provider
            .evidence(&expected_report_data_with_receipt_key(
                &nonce,
                &runtime.public_bytes(),
                &receipt_public,
            ))
            .map_err(|e| KmsError::Attestation(format!("collecting evidence: {e}")))?;
        let result = self
            .call(
                Action::Attest,
                json!({
                    "policyId": policy_id,
                    "tee": evidence.tee.to_string(),
                    "quote": BASE64.encode(&evidence.quote),
                    "nonce": BASE64.encode(&nonce),
                    "runtime_key": BASE64.encode(runtime.public_bytes()),
                    "receipt_key": BASE64.encode(receipt_public),
                }),
            )
            .await
            .map_err(|e| match e {
                // Any other refusal of the evidence (an unknown policy, say) is a failed
                // attestation too.
                KmsError::Rejected { message, .. } => KmsError::Attestation(message),
                other => other,
            })?;
        let received = std::time::Instant::now();
        let token = string_field(&result, "token")?;
        let lifetime = token_lifetime(&token)?;
        Ok(Attested {
            token,
            runtime,
            renew_at: received + lifetime - RENEW_MARGIN.min(lifetime / 4),
        })
    }

    async fn decrypt(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        let ciphertext = std::str::from_utf8(&key.wrapped).map_err(|_| KmsError::UnwrapFailed)?;
        let plaintext = self
            .decrypt_text(&key.key_id, ciphertext, &self.wire_aad(aad)?)
            .await?;
        DataKey::from_slice(&plaintext).map_err(|_| KmsError::UnwrapFailed)
    }

    /// eHSM `GenerateDataKeyWithoutPlaintext` with the request's fields as given (for other
    /// eHSM clients' key files, such as BigDL's, whose `aad` is `"test"`): the wrapped key.
    pub async fn generate_data_key_without_plaintext(
        &self,
        key_id: &str,
        keylen: usize,
        aad: &str,
    ) -> Result<String, KmsError> {
        let result = self
            .call(
                Action::GenerateDataKeyWithoutPlaintext,
                json!({"keyid": key_id, "keylen": keylen, "aad": aad}),
            )
            .await
            .map_err(|e| with_key(e, &PrimaryKeyId(key_id.to_string())))?;
        string_field(&result, "ciphertext")
    }

    /// eHSM `Decrypt` with the request's fields as given; the plaintext bytes.
    async fn decrypt_text(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let result = self
            .call(
                Action::Decrypt,
                json!({"keyid": key_id, "ciphertext": ciphertext, "aad": aad}),
            )
            .await
            .map_err(|e| with_key(e, &PrimaryKeyId(key_id.to_string())))?;
        Ok(Zeroizing::new(
            BASE64
                .decode(string_field(&result, "plaintext")?)
                .map_err(|_| KmsError::Protocol("Decrypt plaintext is not base64".into()))?,
        ))
    }

    fn check_kms(&self, key: &KeyReference) -> Result<(), KmsError> {
        if key.kms != self.kms_id {
            return Err(KmsError::WrongKms {
                expected: self.kms_id.clone(),
                found: key.kms.clone(),
            });
        }
        Ok(())
    }
}

/// A client of an attested runtime, made by [`RemoteKms::attest`]: the only type that can ask
/// the KMS for `ReleaseDataKey`. Cheap to clone; clones share the token.
#[derive(Clone)]
pub struct AttestedKms {
    remote: RemoteKms,
    attestation: Arc<Attestation>,
    grant: Option<Arc<GrantInUse>>,
}

/// The job grant an [`AttestedKms`] acts under: its wire text and its content.
struct GrantInUse {
    text: String,
    grant: ppml_kms::grant::JobGrant,
    sha256_hex: String,
}

impl std::fmt::Debug for AttestedKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestedKms")
            .field("remote", &self.remote)
            .field("policy_id", &self.attestation.policy_id)
            .finish()
    }
}

impl AttestedKms {
    /// The connection underneath, for the calls that need no attestation (admin actions).
    pub fn remote(&self) -> &RemoteKms {
        &self.remote
    }

    /// The attestation policy this runtime was attested under.
    pub fn policy_id(&self) -> &str {
        &self.attestation.policy_id
    }

    /// This client acting under the data owner's job grant: `ReleaseDataKey` and
    /// `GenerateSealedDataKey` carry it (the KMS checks the owner's signature and that the
    /// grant names the dataset, the output or the job's shuffle key), and dataset versions the
    /// grant pins are enforced ([`KeyManagementService::check_version`]). Shares the token.
    pub fn with_grant(&self, grant: &SignedGrant) -> Result<AttestedKms, KmsError> {
        let content = grant.unverified()?;
        Ok(AttestedKms {
            grant: Some(Arc::new(GrantInUse {
                text: grant.to_text(),
                grant: content,
                sha256_hex: grant.sha256_hex(),
            })),
            ..self.clone()
        })
    }

    /// The grant this client acts under, if any.
    pub fn grant(&self) -> Option<&ppml_kms::grant::JobGrant> {
        self.grant.as_deref().map(|g| &g.grant)
    }

    /// `payload` with this client's grant, if it has one.
    fn with_grant_field(&self, mut payload: Value) -> Value {
        if let (Some(grant), Value::Object(map)) = (&self.grant, &mut payload) {
            map.insert("grant".into(), Value::String(grant.text.clone()));
        }
        payload
    }

    /// The current attestation token (a JWT signed by the KMS), renewed first if it is due.
    pub async fn token(&self) -> Result<String, KmsError> {
        Ok(self.current(None).await?.token.clone())
    }

    /// The token to use now: the current one, or a new one if it is due for renewal or is
    /// `expired` (the token the server just refused; another task may have renewed it).
    async fn current(&self, expired: Option<&Arc<Attested>>) -> Result<Arc<Attested>, KmsError> {
        let attestation = &self.attestation;
        let mut current = attestation.current.lock().await;
        let refused = expired.is_some_and(|old| Arc::ptr_eq(old, &current));
        if refused || std::time::Instant::now() >= current.renew_at {
            tracing::info!("the attestation token is expiring: attesting again");
            let renewed = self
                .remote
                .attest_once(
                    attestation.provider.as_ref(),
                    &attestation.policy_id,
                    &attestation.receipt_key,
                )
                .await?;
            *current = Arc::new(renewed);
        }
        Ok(Arc::clone(&current))
    }

    async fn release(
        &self,
        attested: &Attested,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let primary = PrimaryKeyId(key_id.to_string());
        let result = self
            .remote
            .call(
                Action::ReleaseDataKey,
                self.with_grant_field(
                    json!({"keyid": key_id, "ciphertext": ciphertext, "aad": aad,
                           "token": attested.token}),
                ),
            )
            .await;
        let result = match result {
            Ok(result) => result,
            Err(KmsError::Rejected { message, .. }) => return Err(KmsError::Attestation(message)),
            Err(e) => return Err(with_key(e, &primary)),
        };
        attested.open_sealed(&result, "ciphertext", key_id)
    }

    /// [`release`](Self::release), attesting again once when the token expired.
    async fn release_renewing(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let attested = self.current(None).await?;
        match self.release(&attested, key_id, ciphertext, aad).await {
            Err(KmsError::TokenExpired) => {
                let renewed = self.current(Some(&attested)).await?;
                self.release(&renewed, key_id, ciphertext, aad).await
            }
            other => other,
        }
    }

    async fn generate_sealed(
        &self,
        attested: &Attested,
        primary: &PrimaryKeyId,
        aad: &str,
    ) -> Result<(DataKey, KeyReference), KmsError> {
        let result = self
            .remote
            .call(
                Action::GenerateSealedDataKey,
                self.with_grant_field(
                    json!({"keyid": primary.0, "keylen": ppml_kms::DATA_KEY_LEN, "aad": aad,
                           "token": attested.token}),
                ),
            )
            .await
            .map_err(|e| match e {
                KmsError::Rejected { message, .. } => KmsError::Attestation(message),
                e => with_key(e, primary),
            })?;
        let plaintext = attested.open_sealed(&result, "sealed_key", &primary.0)?;
        let key = DataKey::from_slice(&plaintext)
            .map_err(|e| KmsError::Protocol(format!("GenerateSealedDataKey: {e}")))?;
        let wrapped = string_field(&result, "ciphertext")?.into_bytes();
        Ok((key, KeyReference::new(self.kms_id(), &primary.0, wrapped)))
    }
}

impl Attested {
    /// Opens the data key that an answer carries sealed to this runtime's key: the HPKE
    /// `encapsulated_key` and the ciphertext in `field`, bound to `keyid`.
    fn open_sealed(
        &self,
        result: &Map<String, Value>,
        field: &str,
        keyid: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let decode = |name: &str| {
            BASE64
                .decode(string_field(result, name)?)
                .map_err(|_| KmsError::Protocol(format!("sealed key: {name} is not base64")))
        };
        self.runtime
            .open(
                &decode("encapsulated_key")?,
                &decode(field)?,
                keyid.as_bytes(),
            )
            .map_err(|_| KmsError::UnwrapFailed)
    }
}

/// `exp - iat` of an attestation token (a JWT; docs/attestation.md §6.1). The signature is
/// the server's business: the client reads the payload only to know when to renew.
fn token_lifetime(token: &str) -> Result<std::time::Duration, KmsError> {
    let bad = || KmsError::Protocol("Attest returned a malformed token".into());
    let payload = token.split('.').nth(1).ok_or_else(bad)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad())?;
    let claims: ppml_attestation::service::TokenClaims =
        serde_json::from_slice(&payload).map_err(|_| bad())?;
    Ok(std::time::Duration::from_secs(
        claims.exp.saturating_sub(claims.iat),
    ))
}

fn with_key(err: KmsError, primary: &PrimaryKeyId) -> KmsError {
    match err {
        KmsError::KeyNotFound(_) => KmsError::KeyNotFound(primary.0.clone()),
        KmsError::KeyDisabled(_) => KmsError::KeyDisabled(primary.0.clone()),
        other => other,
    }
}

#[async_trait]
impl KeyManagementService for RemoteKms {
    fn kms_id(&self) -> &str {
        &self.kms_id
    }

    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
        let mut payload = json!({"keyspec": "EH_AES_GCM_256", "origin": "EH_INTERNAL_KEY"});
        if self.flavor == KmsFlavor::Ehsm {
            payload["keyusage"] = Value::String("EH_KEYUSAGE_ENCRYPT_DECRYPT".into());
        }
        let result = self.call(Action::CreateKey, payload).await?;
        Ok(PrimaryKeyId(string_field(&result, "keyid")?))
    }

    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError> {
        let result = self
            .call(
                Action::GenerateDataKey,
                json!({"keyid": primary.0, "keylen": ppml_kms::DATA_KEY_LEN, "aad": self.wire_aad(aad)?}),
            )
            .await
            .map_err(|e| with_key(e, primary))?;
        let plaintext = Zeroizing::new(
            BASE64
                .decode(string_field(&result, "plaintext")?)
                .map_err(|_| {
                    KmsError::Protocol("GenerateDataKey plaintext is not base64".into())
                })?,
        );
        let key = DataKey::from_slice(&plaintext)
            .map_err(|e| KmsError::Protocol(format!("GenerateDataKey: {e}")))?;
        let wrapped = string_field(&result, "ciphertext")?.into_bytes();
        Ok((key, KeyReference::new(&self.kms_id, &primary.0, wrapped)))
    }

    /// Unwraps with `Decrypt`; a key marked for attested release is refused by the server
    /// ([`KmsError::AttestationRequired`]): only an [`AttestedKms`] can release it.
    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        self.check_kms(key)?;
        self.decrypt(key, aad).await
    }

    async fn unwrap_foreign_key(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        self.decrypt_text(key_id, ciphertext, aad).await
    }

    /// An unattested client reads only keys that are not marked for attested release, which
    /// need no grant.
    fn under_grant(
        self: Arc<Self>,
        _grant: &SignedGrant,
    ) -> Result<Arc<dyn KeyManagementService>, KmsError> {
        Ok(self)
    }
}

#[async_trait]
impl KeyManagementService for AttestedKms {
    fn kms_id(&self) -> &str {
        self.remote.kms_id()
    }

    async fn create_primary_key(&self) -> Result<PrimaryKeyId, KmsError> {
        self.remote.create_primary_key().await
    }

    /// A new data key sealed to this runtime (`GenerateSealedDataKey`): it never crosses the
    /// wire in plaintext, and a key marked for attested release gives one only to a runtime
    /// attested under its policy.
    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(DataKey, KeyReference), KmsError> {
        let aad = aad_text(aad)?;
        let attested = self.current(None).await?;
        match self.generate_sealed(&attested, primary, aad).await {
            Err(KmsError::TokenExpired) => {
                let renewed = self.current(Some(&attested)).await?;
                self.generate_sealed(&renewed, primary, aad).await
            }
            other => other,
        }
    }

    /// Unwraps with `ReleaseDataKey` under the current token (renewed when it is due or the
    /// server says it expired). A key that is not marked for attested release is refused
    /// ([`KmsError::NotMarkedForRelease`]), never unwrapped with `Decrypt`: anyone with the
    /// api key can make such a key and data under it, so an attested runtime that accepted it
    /// would read data the owner never wrote.
    async fn unwrap_data_key(&self, key: &KeyReference, aad: &[u8]) -> Result<DataKey, KmsError> {
        self.remote.check_kms(key)?;
        let ciphertext = std::str::from_utf8(&key.wrapped).map_err(|_| KmsError::UnwrapFailed)?;
        let plaintext = self
            .release_renewing(&key.key_id, ciphertext, aad_text(aad)?)
            .await?;
        DataKey::from_slice(&plaintext).map_err(|_| KmsError::UnwrapFailed)
    }

    /// Released like [`unwrap_data_key`](Self::unwrap_data_key): sealed to this runtime.
    async fn unwrap_foreign_key(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        self.release_renewing(key_id, ciphertext, aad).await
    }

    fn under_grant(
        self: Arc<Self>,
        grant: &SignedGrant,
    ) -> Result<Arc<dyn KeyManagementService>, KmsError> {
        Ok(Arc::new(self.with_grant(grant)?))
    }

    fn check_version(
        &self,
        dataset_id: &[u8; 16],
        manifest_sha256: &[u8; 32],
    ) -> Result<(), KmsError> {
        match self.grant() {
            Some(grant) => Ok(grant.allows_version(dataset_id, manifest_sha256)?),
            None => Ok(()),
        }
    }

    async fn receipt_attestation(&self) -> Result<Option<ppml_kms::ReceiptAttestation>, KmsError> {
        Ok(Some(ppml_kms::ReceiptAttestation {
            token: self.token().await?,
            public_key: self.attestation.receipt_key.public_bytes(),
        }))
    }

    fn sign_receipt(&self, message: &[u8]) -> Option<Vec<u8>> {
        Some(self.attestation.receipt_key.sign(message))
    }

    fn job_grant(&self) -> Option<ppml_kms::GrantRecord> {
        self.grant
            .as_deref()
            .map(|g| ppml_kms::GrantRecord::new(&g.grant, g.sha256_hex.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for url in [
            "http://127.0.0.1:9000",
            "http://127.8.0.1",
            "http://localhost:1",
            "http://[::1]:9000",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:9000",
            "http://kms.example",
            "http://localhost.example.com",
            "http://[::2]",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn fingerprints_round_trip() {
        let printed = format_fingerprint(b"certificate bytes");
        let TlsTrust::Fingerprint(bytes) = TlsTrust::parse_fingerprint(&printed).unwrap() else {
            panic!("not a fingerprint")
        };
        assert_eq!(format!("sha256:{}", hex::encode(bytes)), printed);
        let with_colons = printed
            .trim_start_matches("sha256:")
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert!(TlsTrust::parse_fingerprint(&with_colons).is_ok());
        assert!(TlsTrust::parse_fingerprint("sha256:abcd").is_err());
        assert!(TlsTrust::parse_fingerprint("not hex at all").is_err());
    }
}
