//! Collateral from a PCCS (Intel's Provisioning Certificate Caching Service) or Intel's PCS,
//! cached in memory and on disk.
//!
//! A quote names its platform through the PCK certificate chain it embeds: the leaf carries
//! the FMSPC and is issued by the Processor or Platform CA. The collateral of one
//! (TEE, FMSPC, CA) triple — PCK CRL, root CA CRL, TCB info and QE identity with their issuer
//! chains — is fetched with four GETs of the PCCS v4 API and then serves every quote of that
//! platform until it is due for refresh. Collateral is signed by Intel and verified with the
//! quote, so the PCCS is not trusted for integrity: a hostile PCCS can only withhold fresh
//! collateral, which ages out (`nextUpdate`) and then fails verification.
//!
//! Hand-written rather than dcap-qvl's `CollateralClient`: that needs dcap-qvl's `report`
//! feature, which brings reqwest 0.13 with aws-lc-rs and hickory-dns, a second HTTP and TLS
//! stack next to the one ppml already uses. The protocol is four GETs (same endpoints and
//! headers as dcap-qvl's client).
//!
//! The cache files are the offline collateral format ([`Collateral::to_json`]), so any of them
//! can be handed to `ppml attest verify --collateral` or `--sgx-collateral`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::config::PckCa;
use dcap_qvl::quote::Quote;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::claims::Tee;
use crate::dcap::Collateral;

/// Intel's PCS, usable directly instead of a PCCS (needs no API key for collateral).
pub const INTEL_PCS_URL: &str = "https://api.trustedservices.intel.com";

/// Where Intel publishes the SGX root CA's CRL (Intel's PCS has no `rootcacrl` endpoint).
const INTEL_ROOT_CA_CRL_URL: &str =
    "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der";

/// Collateral older than this is fetched again even when its `nextUpdate` is later, so that
/// new TCB levels and revocations reach the verifier within the hour.
pub const DEFAULT_REFRESH_SECS: u64 = 3600;

/// Why collateral could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PccsError {
    /// The PCCS URL or TLS settings are unusable.
    #[error("PCCS configuration: {0}")]
    Config(String),
    /// The quote does not name its platform (unparseable, or no embedded PCK chain).
    #[error("cannot tell the quote's platform: {0}")]
    Quote(String),
    /// The PCCS could not be reached or answered with an error.
    #[error("PCCS {url}: {reason}")]
    Fetch {
        /// The request.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The PCCS answered with something that is not collateral.
    #[error("PCCS {url}: malformed response: {reason}")]
    Malformed {
        /// The request.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The on-disk cache cannot be written.
    #[error("collateral cache {path}: {reason}")]
    Cache {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// How to reach the PCCS and where to keep what it returns.
#[derive(Clone, Debug, Default)]
pub struct PccsOptions {
    /// PEM CA certificate(s) to trust for the PCCS's TLS certificate, in addition to the
    /// system roots (a local PCCS usually has a self-signed certificate).
    pub ca_cert: Option<PathBuf>,
    /// Directory for the on-disk cache; collateral there survives restarts and is used when
    /// the PCCS is unreachable and it has not expired.
    pub cache_dir: Option<PathBuf>,
    /// Refetch after this many seconds; [`DEFAULT_REFRESH_SECS`] when `None`.
    pub refresh_secs: Option<u64>,
}

/// The platform a quote's collateral belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// SGX or TDX (the TCB info and QE identity differ).
    pub tee: Tee,
    /// The FMSPC, upper-case hex (12 digits).
    pub fmspc: String,
    /// `processor` or `platform`: the PCK CA that issued the leaf.
    pub ca: &'static str,
}

impl Platform {
    /// Reads the platform from the PCK chain embedded in `quote`.
    pub fn of_quote(quote: &[u8]) -> Result<Self, PccsError> {
        let parsed = Quote::parse(quote).map_err(|e| PccsError::Quote(format!("{e:#}")))?;
        let fmspc = dcap_qvl::intel::quote_fmspc(&parsed).map_err(|e| {
            PccsError::Quote(format!(
                "{e:#} (only quotes that embed their PCK certificate chain are supported)"
            ))
        })?;
        let ca = match dcap_qvl::intel::quote_ca(&parsed)
            .map_err(|e| PccsError::Quote(format!("{e:#}")))?
        {
            PckCa::Processor => "processor",
            PckCa::Platform => "platform",
        };
        let tee = if parsed.header.is_sgx() {
            Tee::Sgx
        } else {
            Tee::Tdx
        };
        Ok(Platform {
            tee,
            fmspc: hex::encode_upper(fmspc),
            ca,
        })
    }

    fn cache_file_name(&self) -> String {
        format!("{}-{}-{}.json", self.tee, self.fmspc, self.ca)
    }
}

#[derive(Clone)]
struct Cached {
    collateral: Arc<Collateral>,
    fetched_at: u64,
    expires_at: u64,
}

/// Fetches collateral from a PCCS and caches it per platform. Thread-safe; fetches are async.
pub struct PccsClient {
    base_url: String,
    http: reqwest::Client,
    cache_dir: Option<PathBuf>,
    refresh_secs: u64,
    memory: Mutex<HashMap<Platform, Cached>>,
}

impl std::fmt::Debug for PccsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PccsClient")
            .field("base_url", &self.base_url)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SignedJson<'a> {
    #[serde(borrow, rename = "tcbInfo", alias = "enclaveIdentity")]
    body: &'a RawValue,
    signature: String,
}

impl PccsClient {
    /// A client for the PCCS at `url` (e.g. `https://pccs.example:8081`, with or without the
    /// `/sgx/certification/v4` suffix, or [`INTEL_PCS_URL`]).
    pub fn new(url: &str, options: &PccsOptions) -> Result<Self, PccsError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| PccsError::Config(format!("PCCS URL {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(PccsError::Config(format!(
                "PCCS URL {url:?}: the scheme must be https (or http)"
            )));
        }
        let base_url = url
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_string();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Fetches are rare and may run on a fresh runtime each time (see
            // `AttestationService::set_pccs`); pooled connections would outlive it.
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60));
        if let Some(path) = &options.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                PccsError::Config(format!("PCCS CA certificate {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                PccsError::Config(format!("PCCS CA certificate {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(PccsError::Config(format!(
                    "PCCS CA certificate {}: no certificate in the file",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| PccsError::Config(format!("HTTP client: {e}")))?;
        if let Some(dir) = &options.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| PccsError::Cache {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(PccsClient {
            base_url,
            http,
            cache_dir: options.cache_dir.clone(),
            refresh_secs: options.refresh_secs.unwrap_or(DEFAULT_REFRESH_SECS),
            memory: Mutex::new(HashMap::new()),
        })
    }

    /// The collateral that verifies `quote` as of `now` (Unix seconds): from memory or the
    /// disk cache while it is younger than the refresh interval and `now` is before its
    /// `nextUpdate`, else fetched. If the PCCS fails and a cached copy has not expired, the
    /// cached copy is used (with a warning).
    pub async fn collateral_for(
        &self,
        quote: &[u8],
        now: u64,
    ) -> Result<Arc<Collateral>, PccsError> {
        let platform = Platform::of_quote(quote)?;
        let cached = self.cached(&platform);
        if let Some(entry) = &cached
            && now < entry.expires_at
            && wall_clock().saturating_sub(entry.fetched_at) < self.refresh_secs
        {
            return Ok(Arc::clone(&entry.collateral));
        }
        match self.fetch(&platform).await {
            Ok(collateral) => {
                let expires_at = collateral.next_update().unwrap_or(0);
                let collateral = Arc::new(collateral);
                self.store(&platform, &collateral)?;
                self.memory.lock().expect("collateral cache lock").insert(
                    platform.clone(),
                    Cached {
                        collateral: Arc::clone(&collateral),
                        fetched_at: wall_clock(),
                        expires_at,
                    },
                );
                tracing::info!(
                    tee = %platform.tee, fmspc = %platform.fmspc, ca = platform.ca,
                    "fetched DCAP collateral from the PCCS"
                );
                Ok(collateral)
            }
            Err(err) => match cached {
                Some(entry) if now < entry.expires_at => {
                    tracing::warn!(
                        %err, tee = %platform.tee, fmspc = %platform.fmspc,
                        "PCCS unavailable; using cached collateral"
                    );
                    Ok(entry.collateral)
                }
                _ => Err(err),
            },
        }
    }

    fn cached(&self, platform: &Platform) -> Option<Cached> {
        if let Some(entry) = self
            .memory
            .lock()
            .expect("collateral cache lock")
            .get(platform)
        {
            return Some(entry.clone());
        }
        let path = self.cache_dir.as_ref()?.join(platform.cache_file_name());
        let text = std::fs::read_to_string(&path).ok()?;
        let collateral = match Collateral::from_json(&text, &path.display().to_string()) {
            Ok(collateral) => collateral,
            Err(err) => {
                tracing::warn!(%err, "ignoring unreadable cached collateral");
                return None;
            }
        };
        let fetched_at = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let entry = Cached {
            expires_at: collateral.next_update().unwrap_or(0),
            collateral: Arc::new(collateral),
            fetched_at,
        };
        self.memory
            .lock()
            .expect("collateral cache lock")
            .insert(platform.clone(), entry.clone());
        Some(entry)
    }

    fn store(&self, platform: &Platform, collateral: &Collateral) -> Result<(), PccsError> {
        let Some(dir) = &self.cache_dir else {
            return Ok(());
        };
        let path = dir.join(platform.cache_file_name());
        let fail = |e: std::io::Error| PccsError::Cache {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
        std::io::Write::write_all(&mut tmp, collateral.to_json().as_bytes()).map_err(fail)?;
        tmp.as_file().sync_all().map_err(fail)?;
        tmp.persist(&path).map_err(|e| fail(e.error))?;
        Ok(())
    }

    fn url(&self, tee: &str, path: &str) -> String {
        format!("{}/{tee}/certification/v4/{path}", self.base_url)
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, PccsError> {
        let fail = |reason: String| PccsError::Fetch {
            url: url.to_string(),
            reason,
        };
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(fail(format!("HTTP {}", response.status())));
        }
        Ok(response)
    }

    /// GETs one answer, with the first of `chain_headers` that it has.
    async fn answer(&self, url: String, chain_headers: &[&str]) -> Result<PccsAnswer, PccsError> {
        let response = self.get(&url).await?;
        let issuer_chain = chain_headers
            .iter()
            .find_map(|name| response.headers().get(*name).map(|value| (name, value)))
            .map(|(name, value)| {
                value
                    .to_str()
                    .map(str::to_owned)
                    .map_err(|e| PccsError::Malformed {
                        url: url.clone(),
                        reason: format!("{name}: {e}"),
                    })
            })
            .transpose()?;
        let body = response.bytes().await.map_err(|e| PccsError::Fetch {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        Ok(PccsAnswer {
            url,
            issuer_chain,
            body: body.to_vec(),
        })
    }

    /// Fetches the collateral of `platform`.
    pub async fn fetch(&self, platform: &Platform) -> Result<Collateral, PccsError> {
        let tee = platform.tee.to_string();
        let pck_crl_url = self.url("sgx", &format!("pckcrl?ca={}&encoding=der", platform.ca));
        let tcb_url = self.url(
            &tee,
            &format!("tcb?fmspc={}&update=standard", platform.fmspc),
        );
        let qe_url = self.url(&tee, "qe/identity?update=standard");
        let root_crl_url = if self.base_url.starts_with(INTEL_PCS_URL) {
            INTEL_ROOT_CA_CRL_URL.to_string()
        } else {
            self.url("sgx", "rootcacrl")
        };
        let answers = PccsAnswers {
            pck_crl: self
                .answer(pck_crl_url, &[PccsAnswers::PCK_CRL_CHAIN])
                .await?,
            tcb_info: self
                .answer(
                    tcb_url,
                    &[PccsAnswers::TCB_INFO_CHAIN, "SGX-TCB-Info-Issuer-Chain"],
                )
                .await?,
            qe_identity: self
                .answer(qe_url, &[PccsAnswers::QE_IDENTITY_CHAIN])
                .await?,
            root_ca_crl: self.answer(root_crl_url, &[]).await?,
        };
        answers.to_collateral()
    }
}

/// One answer of a PCCS as received: the request, the answer's issuer chain header if it has
/// one (percent-encoded, as PCS and PCCS send it), and its body.
#[derive(Clone, Debug, Default)]
pub struct PccsAnswer {
    /// The request, named in errors.
    pub url: String,
    /// The value of the issuer chain header.
    pub issuer_chain: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// The four answers that make one platform's collateral, as received. Decoding them
/// ([`PccsAnswers::to_collateral`]) is all that ppml does with a PCCS's bytes before
/// verifying them, kept apart from HTTP so that it can be tested and fuzzed alone.
#[derive(Clone, Debug, Default)]
pub struct PccsAnswers {
    /// `GET /sgx/certification/v4/pckcrl?ca=…&encoding=der`, with [`Self::PCK_CRL_CHAIN`].
    pub pck_crl: PccsAnswer,
    /// `GET /{sgx,tdx}/certification/v4/tcb?fmspc=…`, with [`Self::TCB_INFO_CHAIN`].
    pub tcb_info: PccsAnswer,
    /// `GET /{sgx,tdx}/certification/v4/qe/identity`, with [`Self::QE_IDENTITY_CHAIN`].
    pub qe_identity: PccsAnswer,
    /// The root CA's CRL: `GET /sgx/certification/v4/rootcacrl` of a PCCS, or Intel's file.
    pub root_ca_crl: PccsAnswer,
}

impl PccsAnswers {
    /// The PCK CRL's issuer chain header.
    pub const PCK_CRL_CHAIN: &str = "SGX-PCK-CRL-Issuer-Chain";
    /// The TCB info's issuer chain header (Intel's PCS for SGX also sends it with an `SGX-`
    /// prefix).
    pub const TCB_INFO_CHAIN: &str = "TCB-Info-Issuer-Chain";
    /// The QE identity's issuer chain header.
    pub const QE_IDENTITY_CHAIN: &str = "SGX-Enclave-Identity-Issuer-Chain";

    /// The collateral in the answers, not yet verified (that happens with each quote):
    /// CRLs as DER, hex or PEM; TCB info and QE identity as signed JSON whose signed part is
    /// kept byte for byte; issuer chains percent-decoded.
    pub fn to_collateral(&self) -> Result<Collateral, PccsError> {
        let (tcb_info, tcb_info_signature) = self.tcb_info.signed_json()?;
        let (qe_identity, qe_identity_signature) = self.qe_identity.signed_json()?;
        Ok(Collateral::from_parts(QuoteCollateralV3 {
            pck_crl_issuer_chain: self.pck_crl.issuer_chain(Self::PCK_CRL_CHAIN)?,
            root_ca_crl: self.root_ca_crl.crl()?,
            pck_crl: self.pck_crl.crl()?,
            tcb_info_issuer_chain: self.tcb_info.issuer_chain(Self::TCB_INFO_CHAIN)?,
            tcb_info,
            tcb_info_signature,
            qe_identity_issuer_chain: self.qe_identity.issuer_chain(Self::QE_IDENTITY_CHAIN)?,
            qe_identity,
            qe_identity_signature,
            pck_certificate_chain: None,
        }))
    }
}

impl PccsAnswer {
    fn malformed(&self, reason: String) -> PccsError {
        PccsError::Malformed {
            url: self.url.clone(),
            reason,
        }
    }

    fn issuer_chain(&self, header: &str) -> Result<String, PccsError> {
        let value = self
            .issuer_chain
            .as_deref()
            .ok_or_else(|| self.malformed(format!("no {header} header")))?;
        percent_decode_str(value)
            .decode_utf8()
            .map(|chain| chain.into_owned())
            .map_err(|e| self.malformed(format!("{header}: {e}")))
    }

    /// A signed JSON document (TCB info or QE identity): the signed part and the signature.
    fn signed_json(&self) -> Result<(String, Vec<u8>), PccsError> {
        let signed: SignedJson =
            serde_json::from_slice(&self.body).map_err(|e| self.malformed(e.to_string()))?;
        let signature = hex::decode(&signed.signature)
            .map_err(|e| self.malformed(format!("signature: {e}")))?;
        // The signature covers the document's bytes exactly as served: keep them raw.
        Ok((signed.body.get().to_string(), signature))
    }

    fn crl(&self) -> Result<Vec<u8>, PccsError> {
        decode_crl(&self.body).ok_or_else(|| self.malformed("not a CRL (DER, hex or PEM)".into()))
    }
}

/// A CRL as served: DER (Intel PCS with `encoding=der`), hex of the DER (PCCS `rootcacrl`),
/// or PEM.
fn decode_crl(body: &[u8]) -> Option<Vec<u8>> {
    if body.first() == Some(&0x30) {
        return Some(body.to_vec());
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    if let Some(pem) = text.strip_prefix("-----BEGIN X509 CRL-----") {
        let b64: String = pem
            .split("-----END X509 CRL-----")
            .next()?
            .split_whitespace()
            .collect();
        use base64::Engine as _;
        return base64::engine::general_purpose::STANDARD.decode(b64).ok();
    }
    let der = hex::decode(text).ok()?;
    (der.first() == Some(&0x30)).then_some(der)
}

/// Seconds since the epoch by the system clock. Cache age is real time, whereas `now` in
/// [`PccsClient::collateral_for`] is the time verification is judged at (pinned in tests).
fn wall_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where the on-disk cache in `dir` keeps the collateral of `platform`.
pub fn cache_file(dir: &Path, platform: &Platform) -> PathBuf {
    dir.join(platform.cache_file_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("testdata")
        .join(name)
    }

    /// A PCCS on loopback serving the collateral of one fixture in the PCCS v4 wire format,
    /// counting requests; `mode` switches it to failing or tampering.
    struct FakePccs {
        url: String,
        requests: Arc<std::sync::atomic::AtomicUsize>,
        mode: Arc<Mutex<&'static str>>,
    }

    impl FakePccs {
        fn start(tee: &str) -> Self {
            let answers = fixture_answers(tee);
            let chain = |answer: &PccsAnswer| answer.issuer_chain.clone().unwrap();
            let tcb = String::from_utf8(answers.tcb_info.body.clone()).unwrap();
            let qe = String::from_utf8(answers.qe_identity.body.clone()).unwrap();
            let pck_crl = answers.pck_crl.body.clone();
            let root_crl = answers.root_ca_crl.body.clone();
            let pck_chain = chain(&answers.pck_crl);
            let tcb_chain = chain(&answers.tcb_info);
            let qe_chain = chain(&answers.qe_identity);
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mode = Arc::new(Mutex::new("ok"));
            let (count, current) = (Arc::clone(&requests), Arc::clone(&mode));
            std::thread::spawn(move || {
                use std::io::{BufRead as _, Write as _};
                for stream in listener.incoming() {
                    let mut stream = stream.unwrap();
                    let mut line = String::new();
                    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                    reader.read_line(&mut line).unwrap();
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        if header.trim().is_empty() {
                            break;
                        }
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mode = *current.lock().unwrap();
                    let (status, header, body): (&str, Option<(&str, &String)>, Vec<u8>) =
                        if mode == "down" {
                            ("503 Service Unavailable", None, b"down".to_vec())
                        } else if path.contains("/pckcrl?") {
                            (
                                "200 OK",
                                Some(("SGX-PCK-CRL-Issuer-Chain", &pck_chain)),
                                pck_crl.clone(),
                            )
                        } else if path.contains("/tcb?fmspc=") {
                            let body = if mode == "tamper" {
                                tcb.replacen("\"version\":", "\"version\": ", 1)
                            } else {
                                tcb.clone()
                            };
                            (
                                "200 OK",
                                Some(("TCB-Info-Issuer-Chain", &tcb_chain)),
                                body.into_bytes(),
                            )
                        } else if path.contains("/qe/identity") {
                            (
                                "200 OK",
                                Some(("SGX-Enclave-Identity-Issuer-Chain", &qe_chain)),
                                qe.clone().into_bytes(),
                            )
                        } else if path.ends_with("/rootcacrl") {
                            ("200 OK", None, root_crl.clone())
                        } else {
                            ("404 Not Found", None, Vec::new())
                        };
                    let mut response = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    if let Some((name, value)) = header {
                        response.push_str(&format!("{name}: {value}\r\n"));
                    }
                    response.push_str("\r\n");
                    let _ = stream.write_all(response.as_bytes());
                    let _ = stream.write_all(&body);
                }
            });
            FakePccs {
                url,
                requests,
                mode,
            }
        }

        fn requests(&self) -> usize {
            self.requests.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn set_mode(&self, mode: &'static str) {
            *self.mode.lock().unwrap() = mode;
        }
    }

    /// What a PCCS answers for the fixture quote of `tee`, in the PCCS v4 wire format: the
    /// PCK CRL as DER, the root CA CRL as hex, TCB info and QE identity as signed JSON, the
    /// issuer chains percent-encoded.
    fn fixture_answers(tee: &str) -> PccsAnswers {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{tee}_quote_collateral.json"))).unwrap(),
        )
        .unwrap();
        let field = |name: &str| json[name].as_str().unwrap().to_string();
        let answer = |chain: Option<&str>, body: Vec<u8>| PccsAnswer {
            url: "fixture".into(),
            issuer_chain: chain.map(|name| {
                percent_encoding::utf8_percent_encode(
                    &field(name),
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string()
            }),
            body,
        };
        let signed = |name: &str, doc: &str| {
            format!(
                r#"{{"{name}":{},"signature":"{}"}}"#,
                field(doc),
                field(&format!("{doc}_signature"))
            )
            .into_bytes()
        };
        PccsAnswers {
            pck_crl: answer(
                Some("pck_crl_issuer_chain"),
                hex::decode(field("pck_crl")).unwrap(),
            ),
            tcb_info: answer(Some("tcb_info_issuer_chain"), signed("tcbInfo", "tcb_info")),
            qe_identity: answer(
                Some("qe_identity_issuer_chain"),
                signed("enclaveIdentity", "qe_identity"),
            ),
            root_ca_crl: answer(None, field("root_ca_crl").into_bytes()),
        }
    }

    #[test]
    fn answers_decode_to_collateral_or_to_a_specific_error() {
        let quote = std::fs::read(fixture("sgx_quote")).unwrap();
        let good = fixture_answers("sgx");
        let collateral = good.to_collateral().unwrap();
        crate::dcap::verify_quote(&quote, &collateral, FIXTURE_TIME).unwrap();
        let refused = |change: &dyn Fn(&mut PccsAnswers), expected: &str| {
            let mut answers = good.clone();
            change(&mut answers);
            let err = answers.to_collateral().unwrap_err();
            assert!(
                matches!(err, PccsError::Malformed { .. }) && err.to_string().contains(expected),
                "{expected}: {err}"
            );
        };
        refused(
            &|a| a.tcb_info.issuer_chain = None,
            "no TCB-Info-Issuer-Chain header",
        );
        refused(
            &|a| a.pck_crl.issuer_chain = Some("%FF%FE".into()),
            "SGX-PCK-CRL-Issuer-Chain: invalid utf-8",
        );
        refused(
            &|a| a.pck_crl.body = b"<html>error</html>".to_vec(),
            "not a CRL",
        );
        refused(&|a| a.qe_identity.body = b"{}".to_vec(), "missing field");
        refused(
            &|a| a.tcb_info.body = br#"{"tcbInfo":{},"signature":"zz"}"#.to_vec(),
            "signature: Invalid character",
        );
    }

    /// 2025-07-01T00:00:00Z, inside both fixtures' collateral validity windows.
    const FIXTURE_TIME: u64 = 1_751_328_000;

    fn service_with(pccs: PccsClient) -> crate::service::AttestationService {
        let mut service = crate::service::AttestationService::new("test", &[7; 32]).unwrap();
        service.set_pccs(pccs);
        service
    }

    #[test]
    fn collateral_fetched_from_a_pccs_verifies_both_fixtures_and_is_cached() {
        for tee in ["sgx", "tdx"] {
            let pccs = FakePccs::start(tee);
            let cache = tempfile::tempdir().unwrap();
            let options = PccsOptions {
                cache_dir: Some(cache.path().to_path_buf()),
                ..PccsOptions::default()
            };
            let quote = std::fs::read(fixture(&format!("{tee}_quote"))).unwrap();
            let service = service_with(PccsClient::new(&pccs.url, &options).unwrap());
            let claims = service.verify_dcap(&quote, FIXTURE_TIME).unwrap();
            assert_eq!(claims.tee.to_string(), tee);
            assert_eq!(pccs.requests(), 4, "{tee}: four GETs");
            service.verify_dcap(&quote, FIXTURE_TIME).unwrap();
            assert_eq!(
                pccs.requests(),
                4,
                "{tee}: the second quote is served from memory"
            );

            // The cache file is offline collateral, equal to what the fixture holds.
            let platform = Platform::of_quote(&quote).unwrap();
            let cached = Collateral::from_file(&cache_file(cache.path(), &platform)).unwrap();
            crate::dcap::verify_quote(&quote, &cached, FIXTURE_TIME).unwrap();

            // A restarted verifier with the PCCS down uses the unexpired disk copy.
            pccs.set_mode("down");
            let options = PccsOptions {
                refresh_secs: Some(0),
                ..options
            };
            let restarted = service_with(PccsClient::new(&pccs.url, &options).unwrap());
            restarted.verify_dcap(&quote, FIXTURE_TIME).unwrap();
            assert_eq!(pccs.requests(), 5, "{tee}: one failed refresh attempt");
            // ... but not once it has expired.
            let after_expiry = cached.next_update().unwrap() + 1;
            let err = restarted.verify_dcap(&quote, after_expiry).unwrap_err();
            assert!(
                err.to_string()
                    .contains("collateral for the evidence is unavailable")
                    && err.to_string().contains("HTTP 503"),
                "{tee}: {err}"
            );
        }
    }

    #[test]
    fn a_failing_or_tampering_pccs_is_refused_with_a_specific_error() {
        let pccs = FakePccs::start("sgx");
        let quote = std::fs::read(fixture("sgx_quote")).unwrap();
        pccs.set_mode("down");
        let service = service_with(PccsClient::new(&pccs.url, &PccsOptions::default()).unwrap());
        let err = service.verify_dcap(&quote, FIXTURE_TIME).unwrap_err();
        assert!(err.to_string().contains("HTTP 503"), "{err}");
        // Collateral is signed by Intel: a PCCS that alters it cannot make a quote verify.
        pccs.set_mode("tamper");
        let err = service.verify_dcap(&quote, FIXTURE_TIME).unwrap_err();
        assert!(
            err.to_string().starts_with("evidence does not verify"),
            "{err}"
        );
        // Nothing listens here any more.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let service = service_with(PccsClient::new(&url, &PccsOptions::default()).unwrap());
        let err = service.verify_dcap(&quote, FIXTURE_TIME).unwrap_err();
        assert!(err.to_string().contains(&url), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_service_fetches_from_a_blocking_thread_of_a_running_runtime() {
        let pccs = FakePccs::start("tdx");
        let quote = std::fs::read(fixture("tdx_quote")).unwrap();
        let service = Arc::new(service_with(
            PccsClient::new(&pccs.url, &PccsOptions::default()).unwrap(),
        ));
        let claims = tokio::task::spawn_blocking(move || service.verify_dcap(&quote, FIXTURE_TIME))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claims.tcb_status, "UpToDate");
    }

    #[test]
    fn quotes_name_their_platform() {
        let sgx = Platform::of_quote(&std::fs::read(fixture("sgx_quote")).unwrap()).unwrap();
        assert_eq!(sgx.tee, Tee::Sgx);
        assert_eq!(sgx.fmspc.len(), 12);
        let tdx = Platform::of_quote(&std::fs::read(fixture("tdx_quote")).unwrap()).unwrap();
        assert_eq!(tdx.tee, Tee::Tdx);
        let err = Platform::of_quote(b"not a quote").unwrap_err();
        assert!(matches!(err, PccsError::Quote(_)), "{err}");
    }

    #[test]
    fn next_update_is_the_earliest_of_tcb_info_and_qe_identity() {
        let collateral = Collateral::from_file(&fixture("sgx_quote_collateral.json")).unwrap();
        // README: qeIdentity nextUpdate 2025-07-19T10:01:18Z, before the TCB info's.
        assert_eq!(collateral.next_update(), Some(1_752_919_278));
    }

    #[test]
    fn crls_are_accepted_as_der_hex_or_pem() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        assert_eq!(decode_crl(&der), Some(der.clone()));
        assert_eq!(decode_crl(hex::encode(&der).as_bytes()), Some(der.clone()));
        use base64::Engine as _;
        let pem = format!(
            "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert_eq!(decode_crl(pem.as_bytes()), Some(der));
        assert_eq!(decode_crl(b"<html>error</html>"), None);
    }

    #[test]
    fn urls_are_normalised() {
        let client = PccsClient::new(
            "https://pccs.local:8081/sgx/certification/v4/",
            &PccsOptions::default(),
        )
        .unwrap();
        assert_eq!(
            client.url("tdx", "qe/identity"),
            "https://pccs.local:8081/tdx/certification/v4/qe/identity"
        );
        assert!(PccsClient::new("ftp://x", &PccsOptions::default()).is_err());
        assert!(PccsClient::new("not a url", &PccsOptions::default()).is_err());
    }
}
