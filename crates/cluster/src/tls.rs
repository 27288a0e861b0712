//! Mutual TLS on every cluster channel (docs/cluster.md §7).
//!
//! A cluster has its own CA. Every process holds a certificate of that CA for its role
//! ([`SCHEDULER`], [`EXECUTOR`], [`DRIVER`]) and:
//!
//! - serves (scheduler gRPC, executor Flight) with [`server_tls`]: its certificate, and a
//!   client certificate of the cluster CA is mandatory;
//! - connects (executor → scheduler, driver → scheduler, executor/driver → Flight) through
//!   [`client_customizer`]: every endpoint is rebuilt as `https://<host:port>`, presents the
//!   process's certificate and accepts only a server certificate of the cluster CA valid for
//!   [`SERVER_NAME`]. That name is the same for every server, so that executors can be reached
//!   by IP address or by any host name.
//!
//! [`generate_cluster_certs`] creates the CA and the role certificates with `rcgen`. The files
//! of a directory are `ca.pem`, `<role>.pem` (certificate) and `<role>.key` (private key,
//! mode 0600); [`ClusterTls::load`] reads them for one role. The CA's private key is never
//! written: to add a host, generate the whole set again.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use zeroize::Zeroizing;

use crate::ClusterError;
use crate::flight::EndpointCustomizer;

/// The DNS name every cluster server certificate carries and every client verifies.
pub const SERVER_NAME: &str = "ppml-cluster";

/// Role name of the scheduler's certificate.
pub const SCHEDULER: &str = "scheduler";
/// Role name of the executors' certificate.
pub const EXECUTOR: &str = "executor";
/// Role name of the driver's (`ppml submit`) certificate.
pub const DRIVER: &str = "driver";
/// The roles [`generate_cluster_certs`] is usually asked for.
pub const ROLES: [&str; 3] = [SCHEDULER, EXECUTOR, DRIVER];

/// File name of the CA certificate in a cluster TLS directory.
pub const CA_FILE: &str = "ca.pem";

/// Time a peer gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Client connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keep-alive of client connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 keep-alive ping interval of client connections.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2 keep-alive ping timeout of client connections.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Validity of the CA certificate (10 years).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the role certificates (2 years).
const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates are valid from a little before their creation (clock skew).
const BACKDATE: Duration = Duration::from_secs(3600);

/// One process's cluster TLS material: the cluster CA, and this process's certificate chain
/// and private key (PEM). `Debug` shows neither key nor certificates.
#[derive(Clone)]
pub struct ClusterTls {
    name: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn setup(message: impl Into<String>) -> ClusterError {
    ClusterError::Setup(message.into())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, ClusterError> {
    std::fs::read(path).map_err(|e| {
        setup(format!(
            "cluster TLS: cannot read {what} {}: {e}",
            path.display()
        ))
    })
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, ClusterError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            setup(format!(
                "cluster TLS: {}: not a PEM certificate: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(setup(format!(
            "cluster TLS: {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn roots(
    ca: &[CertificateDer<'static>],
    path: &Path,
) -> Result<Arc<rustls::RootCertStore>, ClusterError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone()).map_err(|e| {
            setup(format!(
                "cluster TLS: {}: not a usable CA certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(Arc::new(roots))
}

impl ClusterTls {
    /// Reads `dir/ca.pem`, `dir/<name>.pem` and `dir/<name>.key`.
    ///
    /// Refuses a key file that its group or others may read or write, and checks that the
    /// key matches the certificate and that the certificate is a client certificate issued by
    /// the CA (so that a mix-up of files shows here, not as a failed handshake later).
    pub fn load(dir: &Path, name: &str) -> Result<Self, ClusterError> {
        if !is_valid_name(name) {
            return Err(setup(format!(
                "cluster TLS: invalid certificate name {name:?}"
            )));
        }
        let ca_path = dir.join(CA_FILE);
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let ca_pem = read_file(&ca_path, "the cluster CA certificate")?;
        let cert_pem = read_file(&cert_path, &format!("the {name} certificate"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let metadata = std::fs::metadata(&key_path).map_err(|e| {
                setup(format!(
                    "cluster TLS: cannot read the {name} private key {}: {e}",
                    key_path.display()
                ))
            })?;
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(setup(format!(
                    "cluster TLS: the private key {} is accessible to other users (mode {:03o}); \
                     run `chmod 600 {}`",
                    key_path.display(),
                    mode & 0o777,
                    key_path.display()
                )));
            }
        }
        let key_pem = Zeroizing::new(read_file(&key_path, &format!("the {name} private key"))?);

        let ca = parse_certs(&ca_pem, &ca_path)?;
        let chain = parse_certs(&cert_pem, &cert_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            setup(format!(
                "cluster TLS: {}: not a PEM private key: {e}",
                key_path.display()
            ))
        })?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &ring_provider()).map_err(
            |e| {
                setup(format!(
                    "cluster TLS: {} and {} do not make a usable identity: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            },
        )?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&ca, &ca_path)?,
            ring_provider(),
        )
        .build()
        .map_err(|e| setup(format!("cluster TLS: {}: {e}", ca_path.display())))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                setup(format!(
                    "cluster TLS: {} is not a client certificate of the cluster CA {}: {e}",
                    cert_path.display(),
                    ca_path.display()
                ))
            })?;
        Ok(ClusterTls {
            name: name.to_owned(),
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Checks that this certificate can serve: issued by the CA for server authentication
    /// and valid for [`SERVER_NAME`] (the scheduler and executors call this at start).
    pub fn verify_server(&self) -> Result<(), ClusterError> {
        let ca = parse_certs(&self.ca_pem, Path::new(CA_FILE))?;
        let chain = parse_certs(&self.cert_pem, Path::new(&format!("{}.pem", self.name)))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(&ca, Path::new(CA_FILE))?,
            ring_provider(),
        )
        .build()
        .map_err(|e| setup(format!("cluster TLS: {CA_FILE}: {e}")))?;
        let server_name = ServerName::try_from(SERVER_NAME).expect("valid DNS name");
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &chain[0],
            &chain[1..],
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
            setup(format!(
                "cluster TLS: the {} certificate cannot serve the cluster (it must be a server \
                 certificate of the cluster CA for {SERVER_NAME:?}): {e}",
                self.name
            ))
        })?;
        Ok(())
    }

    /// The certificate's role name (`scheduler`, `executor`, `driver`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// This process's certificate chain (PEM).
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, self.key_pem.as_slice())
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }
}

/// TLS of a cluster server: this process's certificate, and a client certificate issued by
/// the cluster CA is required of every client.
pub fn server_tls(tls: &ClusterTls) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(tls.identity())
        .client_ca_root(tls.ca())
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// TLS of a cluster client: trusts only the cluster CA, verifies [`SERVER_NAME`] and
/// presents this process's certificate.
pub fn client_tls(tls: &ClusterTls) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(tls.ca())
        .identity(tls.identity())
        .domain_name(SERVER_NAME)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// The endpoint customizer of every cluster client (Ballista's executor → scheduler channel,
/// ppml's driver and Flight reader).
///
/// It rebuilds the endpoint as `https://<authority>` (same host and port; Ballista builds
/// `http://` URLs, on which tonic would silently use cleartext even with a TLS config),
/// applies the connect timeout (20 s), `TCP_NODELAY`, TCP keep-alive (60 s) and HTTP/2
/// keep-alive (every 30 s, 20 s timeout, also while idle), and sets [`client_tls`]. It never
/// returns a cleartext endpoint: an endpoint without an authority fails. Other settings of
/// the endpoint it is given (e.g. a request timeout) are not carried over.
pub fn client_customizer(tls: &ClusterTls) -> EndpointCustomizer {
    let config = client_tls(tls);
    Some(Arc::new(move |endpoint: Endpoint| {
        let authority = endpoint
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        // "https://" without an authority does not parse: no endpoint, rather than a bad one.
        let rebuilt = Endpoint::from_shared(format!("https://{authority}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tls_config(config.clone())?;
        debug_assert_eq!(rebuilt.uri().scheme_str(), Some("https"));
        Ok(rebuilt)
    }))
}

/// Whether `name` can name a certificate file: `[A-Za-z0-9_-]{1,64}`, not `ca`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "ca"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `host` is an IP address or a DNS name (letters, digits, `-`, dot-separated).
fn is_valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    // Positive, and as long as asked for.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    rcgen::SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut rcgen::CertificateParams, validity: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
}

fn generation_error(what: &str) -> impl FnOnce(rcgen::Error) -> ClusterError + '_ {
    move |e| setup(format!("cluster TLS: generating {what}: {e}"))
}

/// Creates a cluster CA and, for each of `names`, a certificate issued by it, in `dir`
/// (created 0700 if missing): `ca.pem`, `<name>.pem`, `<name>.key`, every file 0600.
/// Returns the files written, the CA certificate last.
///
/// Each role certificate is valid for server and client authentication, with the subject
/// alternative names [`SERVER_NAME`], `localhost`, `127.0.0.1` and every one of `hosts` (IP
/// address or DNS name). The CA (`CN=ppml cluster CA`, 10 years, path length 0) signs only
/// these certificates: its private key is dropped, never written. Role certificates are valid
/// for 2 years.
///
/// Refuses to replace an existing `ca.pem` unless `force` is set.
pub fn generate_cluster_certs(
    dir: &Path,
    names: &[&str],
    hosts: &[String],
    force: bool,
) -> Result<Vec<PathBuf>, ClusterError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    if names.is_empty() {
        return Err(setup("cluster TLS: no certificate to generate"));
    }
    for (i, name) in names.iter().enumerate() {
        if !is_valid_name(name) {
            return Err(setup(format!(
                "cluster TLS: invalid certificate name {name:?} (letters, digits, '_', '-'; not \"ca\")"
            )));
        }
        if names[..i].contains(name) {
            return Err(setup(format!(
                "cluster TLS: certificate name {name:?} given twice"
            )));
        }
    }
    let mut sans: Vec<String> = vec![SERVER_NAME.into(), "localhost".into(), "127.0.0.1".into()];
    for host in hosts {
        let host = host.trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if !is_valid_host(host) {
            return Err(setup(format!(
                "cluster TLS: {host:?} is neither an IP address nor a DNS name"
            )));
        }
        let host = host.to_ascii_lowercase();
        if !sans.contains(&host) {
            sans.push(host);
        }
    }
    let ca_path = dir.join(CA_FILE);
    if !force && std::fs::symlink_metadata(&ca_path).is_ok() {
        return Err(setup(format!(
            "cluster TLS: {} exists; refusing to replace the cluster CA (use --force to \
             replace the CA and every certificate)",
            ca_path.display()
        )));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| setup(format!("cluster TLS: creating {}: {e}", dir.display())))?;
    }

    let ca_key = KeyPair::generate().map_err(generation_error("the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ppml cluster CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "ppml");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.serial_number = Some(random_serial());
    set_validity(&mut ca_params, CA_VALIDITY);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)
        .map_err(generation_error("the CA certificate"))?;

    let write = |path: &Path, bytes: &[u8]| {
        ppml_kms::write_private_file_atomic(path, bytes)
            .map_err(|e| setup(format!("cluster TLS: writing {}: {e}", path.display())))
    };
    let mut written = Vec::new();
    for name in names {
        let key = KeyPair::generate().map_err(generation_error("a key"))?;
        let mut params = CertificateParams::new(sans.clone())
            .map_err(generation_error("the subject alternative names"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ppml cluster {name}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ppml");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params
            .signed_by(&key, &*ca)
            .map_err(generation_error(&format!("the {name} certificate")))?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let key_path = dir.join(format!("{name}.key"));
        let cert_path = dir.join(format!("{name}.pem"));
        write(&key_path, key_pem.as_bytes())?;
        write(&cert_path, cert.pem().as_bytes())?;
        written.push(cert_path);
        written.push(key_path);
    }
    // The CA last: an interrupted run leaves no ca.pem, so it can simply be run again.
    write(&ca_path, ca.pem().as_bytes())?;
    written.push(ca_path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let written = generate_cluster_certs(
            &tls_dir,
            &ROLES,
            &["10.1.2.3".into(), "node-1.example".into()],
            false,
        )
        .unwrap();
        assert_eq!(written.len(), 7);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&tls_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for file in &written {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
        for role in ROLES {
            let tls = ClusterTls::load(&tls_dir, role).unwrap();
            tls.verify_server().unwrap();
            assert_eq!(tls.name(), role);
            let debug = format!("{tls:?}");
            assert!(!debug.contains("PRIVATE"), "{debug}");
        }

        // No silent replacement of the CA.
        let err = generate_cluster_certs(&tls_dir, &ROLES, &[], false).unwrap_err();
        assert!(err.to_string().contains("ca.pem exists"), "{err}");
        generate_cluster_certs(&tls_dir, &ROLES, &[], true).unwrap();

        // A certificate of another CA does not load with this CA.
        let other = dir.path().join("other");
        generate_cluster_certs(&other, &[DRIVER], &[], false).unwrap();
        std::fs::copy(other.join("driver.pem"), tls_dir.join("driver.pem")).unwrap();
        std::fs::copy(other.join("driver.key"), tls_dir.join("driver.key")).unwrap();
        let err = ClusterTls::load(&tls_dir, DRIVER).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a client certificate of the cluster CA"),
            "{err}"
        );

        // A key that does not match the certificate.
        std::fs::copy(other.join("driver.key"), tls_dir.join("executor.key")).unwrap();
        let err = ClusterTls::load(&tls_dir, EXECUTOR).unwrap_err();
        assert!(err.to_string().contains("executor.key"), "{err}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClusterTls::load(dir.path(), SCHEDULER)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.pem"), "{err}");
        generate_cluster_certs(dir.path(), &[SCHEDULER], &[], false).unwrap();
        let err = ClusterTls::load(dir.path(), EXECUTOR)
            .unwrap_err()
            .to_string();
        assert!(err.contains("executor.pem"), "{err}");

        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("scheduler.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = ClusterTls::load(dir.path(), SCHEDULER)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scheduler.key") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        ClusterTls::load(dir.path(), SCHEDULER).unwrap();

        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let err = ClusterTls::load(dir.path(), SCHEDULER)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }

    #[test]
    fn bad_names_and_hosts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for names in [&[][..], &["ca"], &["a/b"], &[""], &["x", "x"]] {
            assert!(
                generate_cluster_certs(dir.path(), names, &[], false).is_err(),
                "{names:?}"
            );
        }
        for host in ["a b", "-x.example", "a..b", "é.example", ""] {
            assert!(
                generate_cluster_certs(dir.path(), &[DRIVER], &[host.to_string()], false).is_err(),
                "{host:?}"
            );
        }
        assert!(!dir.path().join(CA_FILE).exists());
        generate_cluster_certs(
            dir.path(),
            &[DRIVER],
            &["[::1]".into(), "Host-1".into()],
            false,
        )
        .unwrap();
    }

    #[test]
    fn the_customizer_always_returns_https() {
        let dir = tempfile::tempdir().unwrap();
        generate_cluster_certs(dir.path(), &[DRIVER], &[], false).unwrap();
        let tls = ClusterTls::load(dir.path(), DRIVER).unwrap();
        let customize = client_customizer(&tls).unwrap();
        for (url, expected) in [
            ("http://10.0.0.7:50050", "https://10.0.0.7:50050/"),
            ("http://[::1]:7", "https://[::1]:7/"),
            ("https://host.example:443", "https://host.example:443/"),
            (
                "http://executor-3:50051/some/path",
                "https://executor-3:50051/",
            ),
        ] {
            let endpoint = customize(Endpoint::from_shared(url).unwrap()).unwrap();
            assert_eq!(endpoint.uri().to_string(), expected, "{url}");
            assert_eq!(endpoint.get_connect_timeout(), Some(CONNECT_TIMEOUT));
            assert_eq!(endpoint.get_tcp_keepalive(), Some(TCP_KEEPALIVE));
        }
        // No authority: an error, never a cleartext endpoint.
        assert!(customize(Endpoint::from_static("/relative")).is_err());
    }
}
