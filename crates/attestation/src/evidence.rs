//! Evidence providers: how a runtime obtains a quote over 64 bytes of report data from the TEE
//! it runs in (`docs/attestation.md`).
//!
//! Every provider implements [`EvidenceProvider`]; the caller binds the evidence to its session
//! through the report data (SHA-256(nonce || runtime public key), zero-padded to 64 bytes).
//! Providers only fetch the quote: they neither parse nor verify it (see [`crate::dcap`] and
//! [`crate::sim::verify_sim`]).
//!
//! - [`GramineSgx`]: an SGX enclave under Gramine, through its `/dev/attestation` pseudo-files.
//! - [`ConfigfsTdx`]: a TDX guest, through the Linux configfs-tsm report interface.
//! - [`crate::sim::SimTee`]: ppml's simulated TEE, for development.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::claims::Tee;
use crate::sim::SimError;

/// Evidence produced by a TEE: a quote to be verified by the verifier for its [`Tee`].
///
/// In JSON the quote is standard base64 (with padding): `{"tee":"sgx","quote":"AwACAA..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// The TEE that produced the quote.
    pub tee: Tee,
    /// The quote: a DCAP quote (v3 for SGX, v4 for TDX) or a sim quote
    /// ([`crate::sim`] documents its layout).
    #[serde(with = "base64_bytes")]
    pub quote: Vec<u8>,
}

/// Serde helpers: bytes as standard base64.
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD
            .decode(text)
            .map_err(|e| D::Error::custom(format!("quote is not valid base64: {e}")))
    }
}

/// The evidence provider of a process running in `tee`; the simulated TEE signs with the
/// platform key `sim_platform_key` (created if missing).
pub fn provider_for(
    tee: Tee,
    sim_platform_key: &Path,
) -> Result<std::sync::Arc<dyn EvidenceProvider>, SimError> {
    Ok(match tee {
        Tee::Sim => std::sync::Arc::new(crate::sim::SimTee::new(
            crate::sim::SimPlatform::load_or_create(sim_platform_key)?,
        )),
        Tee::Sgx => std::sync::Arc::new(GramineSgx::default()),
        Tee::Tdx => std::sync::Arc::new(ConfigfsTdx::default()),
    })
}

/// A source of evidence: the TEE the process runs in.
pub trait EvidenceProvider: Send + Sync + std::fmt::Debug {
    /// The TEE this provider's evidence comes from.
    fn tee(&self) -> Tee;

    /// A quote binding `report_data`.
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, EvidenceError>;
}

/// Why evidence could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// The TEE interface is absent or not accessible: the process does not run in this TEE, or
    /// lacks the permission to use its interface.
    #[error("attestation interface not available at {path}: {reason}")]
    NotAvailable {
        /// The file or directory that is missing or inaccessible.
        path: PathBuf,
        /// Why this usually happens.
        reason: String,
    },
    /// Reading or writing a file of the TEE interface failed.
    #[error("attestation I/O error at {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Gramine runs without DCAP attestation (`/dev/attestation/attestation_type` is not
    /// `dcap`).
    #[error(
        "Gramine attestation type is {0:?}, not \"dcap\": set sgx.remote_attestation = \"dcap\" in the Gramine manifest"
    )]
    WrongAttestationType(String),
    /// The configfs-tsm provider is not the TDX guest driver (e.g. `sev_guest`).
    #[error("configfs-tsm provider is {0:?}, not \"tdx_guest\": this is not an Intel TDX guest")]
    WrongProvider(String),
    /// The configfs-tsm report entry's `generation` did not advance by exactly our one write
    /// of `inblob`: another writer used the entry (so `outblob` may not cover our report
    /// data), or the kernel rejected the write.
    #[error(
        "configfs-tsm report {entry}: generation is {found} after reading the quote, expected {expected}: another process wrote to the report entry, or the kernel rejected the report data"
    )]
    ConcurrentUse {
        /// The report entry directory.
        entry: PathBuf,
        /// The generation expected: the one read before writing, plus one.
        expected: u64,
        /// The generation read after reading `outblob`.
        found: u64,
    },
    /// A TEE interface file has content that does not follow its ABI.
    #[error("unexpected content in {path}: {reason}")]
    Malformed {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The simulated TEE failed.
    #[error("simulated TEE: {0}")]
    Sim(#[from] SimError),
}

impl EvidenceError {
    fn io(path: &Path, source: io::Error) -> Self {
        EvidenceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `NotAvailable` for a missing or forbidden file, `Io` otherwise.
    fn access(path: &Path, source: io::Error, missing: &str) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => EvidenceError::NotAvailable {
                path: path.to_path_buf(),
                reason: missing.to_owned(),
            },
            io::ErrorKind::PermissionDenied => EvidenceError::NotAvailable {
                path: path.to_path_buf(),
                reason: format!("permission denied ({source})"),
            },
            _ => EvidenceError::io(path, source),
        }
    }
}

/// Reads a text attribute, without surrounding whitespace and NULs.
fn read_text(path: &Path, missing: &str) -> Result<String, EvidenceError> {
    let bytes = fs::read(path).map_err(|e| EvidenceError::access(path, e, missing))?;
    let text = String::from_utf8(bytes).map_err(|_| EvidenceError::Malformed {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })?;
    Ok(text
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_owned())
}

/// Serialises report-data writes and quote reads of all [`GramineSgx`] providers in the
/// process: Gramine's `user_report_data` is per process, so two threads interleaving
/// write/read would get each other's quote.
static GRAMINE_LOCK: Mutex<()> = Mutex::new(());

/// Evidence from an SGX enclave running under Gramine with DCAP attestation.
///
/// Protocol (Gramine's `/dev/attestation` pseudo-filesystem):
/// 1. `<root>/attestation_type` must read `dcap` (`none` means the manifest does not enable
///    remote attestation; `epid` is not supported by ppml).
/// 2. The 64 bytes of report data are written to `<root>/user_report_data`.
/// 3. `<root>/quote` is read: Gramine produces a DCAP quote (v3) whose report body carries the
///    report data written in step 2.
///
/// Steps 2-3 hold a process-wide lock, as `user_report_data` is shared by the whole process.
#[derive(Clone, Debug)]
pub struct GramineSgx {
    root: PathBuf,
}

impl GramineSgx {
    /// Where Gramine mounts its attestation pseudo-filesystem.
    pub const DEFAULT_ROOT: &str = "/dev/attestation";

    /// A provider using the attestation files under `root` (a directory in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        GramineSgx { root: root.into() }
    }

    /// The directory of the attestation files.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Default for GramineSgx {
    fn default() -> Self {
        GramineSgx::new(Self::DEFAULT_ROOT)
    }
}

impl EvidenceProvider for GramineSgx {
    fn tee(&self) -> Tee {
        Tee::Sgx
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, EvidenceError> {
        const NOT_GRAMINE: &str = "not running in a Gramine SGX enclave (no /dev/attestation)";
        fs::metadata(&self.root).map_err(|e| EvidenceError::access(&self.root, e, NOT_GRAMINE))?;

        let type_path = self.root.join("attestation_type");
        let attestation_type = read_text(
            &type_path,
            "Gramine does not expose the attestation type (Gramine too old?)",
        )?;
        if attestation_type != "dcap" {
            return Err(EvidenceError::WrongAttestationType(attestation_type));
        }

        let _lock = GRAMINE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let data_path = self.root.join("user_report_data");
        // Gramine accepts exactly 64 bytes here; the next quote read covers them.
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&data_path)
            .and_then(|mut file| file.write_all(report_data))
            .map_err(|e| EvidenceError::access(&data_path, e, NOT_GRAMINE))?;

        let quote_path = self.root.join("quote");
        let quote = fs::read(&quote_path)
            .map_err(|e| EvidenceError::access(&quote_path, e, NOT_GRAMINE))?;
        if quote.is_empty() {
            return Err(EvidenceError::Malformed {
                path: quote_path,
                reason: "empty quote".into(),
            });
        }
        Ok(Evidence {
            tee: Tee::Sgx,
            quote,
        })
    }
}

/// Points of the configfs-tsm protocol where the kernel acts on its own; the test fixture's
/// fake kernel hooks in there (outside tests nothing happens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TsmEvent {
    /// After `mkdir`: configfs populates the new entry with its attribute files.
    Mkdir,
    /// After `inblob` was closed: configfs commits a binary attribute's write on close, the
    /// kernel stores the report data and increments `generation`.
    InblobClosed,
    /// Before `rmdir`: configfs removes the attributes together with the entry.
    Rmdir,
}

#[cfg(test)]
type FakeKernel = std::sync::Arc<dyn Fn(TsmEvent, &Path) + Send + Sync>;

/// Evidence from an Intel TDX guest, through the Linux configfs-tsm report interface
/// (`Documentation/ABI/testing/configfs-tsm`, Linux 6.7 and later).
///
/// Protocol, one fresh report entry per call (so that concurrent requests never share one):
/// 1. `mkdir <root>/<unique name>`: the kernel populates the entry with its attributes.
/// 2. `provider` must read `tdx_guest`.
/// 3. `generation` is read (`g`).
/// 4. The 64 bytes of report data are written to `inblob` (configfs commits binary
///    attributes when the file is closed, and ignores errors at that point).
/// 5. `outblob` is read: the kernel generates the TDX quote (v4) over the report data.
/// 6. `generation` must now be exactly `g + 1`: a larger value means another writer touched
///    the entry, so the quote may not cover our report data; an unchanged value means the
///    kernel silently rejected our write. Either is [`EvidenceError::ConcurrentUse`].
/// 7. `rmdir` the entry (also on failure); an `rmdir` failure is logged, not returned.
///
/// Needs write access to `<root>` (usually root) and configfs mounted at `/sys/kernel/config`.
#[derive(Clone)]
pub struct ConfigfsTdx {
    root: PathBuf,
    #[cfg(test)]
    fake_kernel: Option<FakeKernel>,
}

impl std::fmt::Debug for ConfigfsTdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigfsTdx")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ConfigfsTdx {
    /// Where the configfs-tsm report interface lives.
    pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";

    /// The provider of TDX quotes in configfs-tsm.
    pub const TDX_PROVIDER: &str = "tdx_guest";

    /// A provider creating its report entries under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ConfigfsTdx {
            root: root.into(),
            #[cfg(test)]
            fake_kernel: None,
        }
    }

    /// The directory report entries are created in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the kernel does by itself at `event` (nothing to do outside the test fixture).
    fn kernel(&self, _event: TsmEvent, _entry: &Path) {
        #[cfg(test)]
        if let Some(kernel) = &self.fake_kernel {
            kernel(_event, _entry);
        }
    }

    /// Creates a fresh report entry.
    fn create_entry(&self) -> Result<TsmEntry<'_>, EvidenceError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        const MISSING: &str = "configfs-tsm report interface not found: not a TDX guest, configfs not mounted at /sys/kernel/config, or Linux older than 6.7";
        // A stale entry left by a crashed process with the same pid may exist: skip it.
        for _ in 0..64 {
            let name = format!(
                "ppml-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = self.root.join(name);
            match fs::create_dir(&path) {
                Ok(()) => {
                    let entry = TsmEntry { tdx: self, path };
                    self.kernel(TsmEvent::Mkdir, &entry.path);
                    return Ok(entry);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(EvidenceError::access(&self.root, e, MISSING));
                }
                Err(e) => return Err(EvidenceError::access(&path, e, MISSING)),
            }
        }
        Err(EvidenceError::Malformed {
            path: self.root.clone(),
            reason: "64 report entry names in a row already exist".into(),
        })
    }
}

impl Default for ConfigfsTdx {
    fn default() -> Self {
        ConfigfsTdx::new(Self::DEFAULT_ROOT)
    }
}

/// A report entry, removed when dropped.
struct TsmEntry<'a> {
    tdx: &'a ConfigfsTdx,
    path: PathBuf,
}

impl TsmEntry<'_> {
    fn attribute(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn read_generation(&self) -> Result<u64, EvidenceError> {
        let path = self.attribute("generation");
        let text = read_text(&path, "the report entry has no generation attribute")?;
        text.parse().map_err(|_| EvidenceError::Malformed {
            path,
            reason: format!("generation {text:?} is not a number"),
        })
    }
}

impl Drop for TsmEntry<'_> {
    fn drop(&mut self) {
        self.tdx.kernel(TsmEvent::Rmdir, &self.path);
        if let Err(e) = fs::remove_dir(&self.path) {
            tracing::warn!(entry = %self.path.display(), error = %e, "cannot remove configfs-tsm report entry");
        }
    }
}

impl EvidenceProvider for ConfigfsTdx {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, EvidenceError> {
        const NO_ATTRIBUTE: &str = "the report entry lacks this configfs-tsm attribute";
        let entry = self.create_entry()?;

        let provider = read_text(&entry.attribute("provider"), NO_ATTRIBUTE)?;
        if provider != Self::TDX_PROVIDER {
            return Err(EvidenceError::WrongProvider(provider));
        }

        let before = entry.read_generation()?;
        let inblob = entry.attribute("inblob");
        OpenOptions::new()
            .write(true)
            .open(&inblob)
            .and_then(|mut file| file.write_all(report_data))
            .map_err(|e| EvidenceError::access(&inblob, e, NO_ATTRIBUTE))?;
        self.kernel(TsmEvent::InblobClosed, &entry.path);

        let outblob = entry.attribute("outblob");
        let quote =
            fs::read(&outblob).map_err(|e| EvidenceError::access(&outblob, e, NO_ATTRIBUTE))?;
        let after = entry.read_generation()?;
        let expected = before
            .checked_add(1)
            .ok_or_else(|| EvidenceError::Malformed {
                path: entry.attribute("generation"),
                reason: "generation at its maximum".into(),
            })?;
        if after != expected {
            return Err(EvidenceError::ConcurrentUse {
                entry: entry.path.clone(),
                expected,
                found: after,
            });
        }
        if quote.is_empty() {
            return Err(EvidenceError::Malformed {
                path: outblob,
                reason: "empty quote".into(),
            });
        }
        Ok(Evidence {
            tee: Tee::Tdx,
            quote,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn report_data() -> [u8; 64] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(1))
    }

    #[test]
    fn evidence_json_has_base64_quote_and_round_trips() {
        let evidence = Evidence {
            tee: Tee::Sgx,
            quote: vec![0, 1, 2, 0xff],
        };
        let json = serde_json::to_string(&evidence).unwrap();
        assert_eq!(json, r#"{"tee":"sgx","quote":"AAEC/w=="}"#);
        assert_eq!(serde_json::from_str::<Evidence>(&json).unwrap(), evidence);
        assert!(
            serde_json::from_str::<Evidence>(r#"{"tee":"sgx","quote":"not base64!"}"#).is_err()
        );
    }

    // --- Gramine ---------------------------------------------------------------------------

    /// A directory standing in for `/dev/attestation`. What it cannot show: that Gramine's
    /// quote actually carries the report data written (the file here is static) and that
    /// Gramine rejects writes of other sizes.
    fn gramine_fixture(attestation_type: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("attestation_type"), attestation_type).unwrap();
        // Longer stale content: the provider must leave exactly its 64 bytes.
        fs::write(dir.path().join("user_report_data"), [0xee; 100]).unwrap();
        fs::write(dir.path().join("quote"), b"SGX-QUOTE-V3-BYTES").unwrap();
        dir
    }

    #[test]
    fn gramine_writes_report_data_and_returns_quote() {
        let dir = gramine_fixture("dcap");
        let provider = GramineSgx::new(dir.path());
        assert_eq!(provider.tee(), Tee::Sgx);
        let evidence = provider.evidence(&report_data()).unwrap();
        assert_eq!(evidence.tee, Tee::Sgx);
        assert_eq!(evidence.quote, b"SGX-QUOTE-V3-BYTES");
        let written = fs::read(dir.path().join("user_report_data")).unwrap();
        assert_eq!(written, report_data());
    }

    #[test]
    fn gramine_without_dcap_is_refused_before_writing() {
        for kind in ["none", "epid\n"] {
            let dir = gramine_fixture(kind);
            let err = GramineSgx::new(dir.path())
                .evidence(&report_data())
                .unwrap_err();
            assert!(
                matches!(&err, EvidenceError::WrongAttestationType(t) if t == kind.trim()),
                "{err:?}"
            );
            assert!(err.to_string().contains("sgx.remote_attestation"), "{err}");
            let untouched = fs::read(dir.path().join("user_report_data")).unwrap();
            assert_eq!(untouched, [0xee; 100]);
        }
    }

    #[test]
    fn gramine_missing_root_is_not_available_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("attestation");
        let err = GramineSgx::new(&root).evidence(&report_data()).unwrap_err();
        match &err {
            EvidenceError::NotAvailable { path, .. } => assert_eq!(path, &root),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(&root.display().to_string()));
        assert_eq!(GramineSgx::default().root(), Path::new("/dev/attestation"));
    }

    #[test]
    fn gramine_missing_quote_file_names_it() {
        let dir = gramine_fixture("dcap");
        fs::remove_file(dir.path().join("quote")).unwrap();
        match GramineSgx::new(dir.path()).evidence(&report_data()) {
            Err(EvidenceError::NotAvailable { path, .. }) => {
                assert_eq!(path, dir.path().join("quote"))
            }
            other => panic!("{other:?}"),
        }
    }

    // --- configfs-tsm ----------------------------------------------------------------------

    /// A fake kernel behind a directory standing in for `/sys/kernel/config/tsm/report`,
    /// acting synchronously at the points where configfs acts (see [`TsmEvent`]):
    /// - on mkdir it creates `inblob`, `outblob`, `generation` (0) and `provider`;
    /// - when `inblob` is closed it accepts exactly 64 bytes (else ignores the write, as
    ///   configfs ignores errors on close), adds 1 + `concurrent_writes` to `generation` and
    ///   makes `outblob` = "TDX-QUOTE:" || inblob (the last writer's data if concurrent);
    /// - on rmdir it removes the attribute files.
    ///
    /// What it cannot show: the real attribute semantics (on configfs `outblob` is generated
    /// lazily when read, writes to read-only attributes fail, `inblob` is write-only), the
    /// kernel's own limits (e.g. EBUSY after too many unread writes), quoting errors from the
    /// TDX module/QGS, and permissions (configfs-tsm usually needs root).
    #[derive(Default)]
    struct Kernel {
        provider: &'static str,
        concurrent_writes: u64,
        entries: Mutex<Vec<PathBuf>>,
    }

    impl Kernel {
        fn act(&self, event: TsmEvent, entry: &Path) {
            let attr = |name: &str| entry.join(name);
            match event {
                TsmEvent::Mkdir => {
                    self.entries.lock().unwrap().push(entry.to_path_buf());
                    fs::write(attr("inblob"), b"").unwrap();
                    fs::write(attr("outblob"), b"").unwrap();
                    fs::write(attr("generation"), "0\n").unwrap();
                    fs::write(attr("provider"), format!("{}\n", self.provider)).unwrap();
                }
                TsmEvent::InblobClosed => {
                    let inblob = fs::read(attr("inblob")).unwrap();
                    if inblob.len() != 64 {
                        return;
                    }
                    let generation: u64 = fs::read_to_string(attr("generation"))
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    let last_data = if self.concurrent_writes > 0 {
                        vec![0xaa; 64]
                    } else {
                        inblob
                    };
                    let next = generation + 1 + self.concurrent_writes;
                    fs::write(attr("generation"), format!("{next}\n")).unwrap();
                    fs::write(
                        attr("outblob"),
                        [b"TDX-QUOTE:".as_slice(), &last_data].concat(),
                    )
                    .unwrap();
                }
                TsmEvent::Rmdir => {
                    for name in ["inblob", "outblob", "generation", "provider"] {
                        let _ = fs::remove_file(attr(name));
                    }
                }
            }
        }
    }

    fn tdx_fixture(kernel: Kernel) -> (tempfile::TempDir, ConfigfsTdx, Arc<Kernel>) {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(kernel);
        let hook = kernel.clone();
        let mut tdx = ConfigfsTdx::new(dir.path());
        tdx.fake_kernel = Some(Arc::new(move |event, entry| hook.act(event, entry)));
        (dir, tdx, kernel)
    }

    fn is_empty_dir(path: &Path) -> bool {
        fs::read_dir(path).unwrap().next().is_none()
    }

    #[test]
    fn tdx_quote_covers_report_data_and_entry_is_removed() {
        let (dir, tdx, kernel) = tdx_fixture(Kernel {
            provider: "tdx_guest",
            ..Kernel::default()
        });
        assert_eq!(tdx.tee(), Tee::Tdx);
        let evidence = tdx.evidence(&report_data()).unwrap();
        assert_eq!(evidence.tee, Tee::Tdx);
        assert_eq!(
            evidence.quote,
            [b"TDX-QUOTE:".as_slice(), &report_data()].concat()
        );
        // A second request uses a fresh entry.
        tdx.evidence(&[9; 64]).unwrap();
        let entries = kernel.entries.lock().unwrap().clone();
        assert_eq!(entries.len(), 2);
        assert_ne!(entries[0], entries[1]);
        assert!(entries.iter().all(|e| e.parent() == Some(dir.path())));
        assert!(is_empty_dir(dir.path()), "report entries left behind");
    }

    #[test]
    fn tdx_concurrent_writer_is_detected() {
        let (dir, tdx, _) = tdx_fixture(Kernel {
            provider: "tdx_guest",
            concurrent_writes: 1,
            ..Kernel::default()
        });
        match tdx.evidence(&report_data()) {
            Err(EvidenceError::ConcurrentUse {
                entry,
                expected: 1,
                found: 2,
            }) => assert_eq!(entry.parent(), Some(dir.path())),
            other => panic!("{other:?}"),
        }
        assert!(is_empty_dir(dir.path()), "report entry left behind");
    }

    #[test]
    fn tdx_write_ignored_by_kernel_is_detected() {
        // A kernel that never advances the generation (e.g. configfs dropped the write).
        let dir = tempfile::tempdir().unwrap();
        let mut tdx = ConfigfsTdx::new(dir.path());
        let kernel = Kernel {
            provider: "tdx_guest",
            ..Kernel::default()
        };
        tdx.fake_kernel = Some(Arc::new(move |event, entry| {
            if event != TsmEvent::InblobClosed {
                kernel.act(event, entry);
            }
        }));
        assert!(matches!(
            tdx.evidence(&report_data()),
            Err(EvidenceError::ConcurrentUse {
                expected: 1,
                found: 0,
                ..
            })
        ));
        assert!(is_empty_dir(dir.path()));
    }

    #[test]
    fn tdx_other_provider_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut tdx = ConfigfsTdx::new(dir.path());
        let kernel = Kernel {
            provider: "sev_guest",
            ..Kernel::default()
        };
        let inblob_written = Arc::new(Mutex::new(false));
        let flag = inblob_written.clone();
        tdx.fake_kernel = Some(Arc::new(move |event, entry| {
            if event == TsmEvent::Rmdir {
                *flag.lock().unwrap() = !fs::read(entry.join("inblob")).unwrap().is_empty();
            }
            kernel.act(event, entry);
        }));
        match tdx.evidence(&report_data()) {
            Err(EvidenceError::WrongProvider(p)) => assert_eq!(p, "sev_guest"),
            other => panic!("{other:?}"),
        }
        assert!(!*inblob_written.lock().unwrap());
        assert!(is_empty_dir(dir.path()));
    }

    #[test]
    fn tdx_missing_interface_is_not_available() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tsm/report");
        match ConfigfsTdx::new(&root).evidence(&report_data()) {
            Err(EvidenceError::NotAvailable { path, reason }) => {
                assert_eq!(path, root);
                assert!(reason.contains("configfs"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A directory without a kernel behind it: mkdir makes an empty entry without
        // attributes; the error names the missing attribute and the entry is removed.
        match ConfigfsTdx::new(dir.path()).evidence(&report_data()) {
            Err(EvidenceError::NotAvailable { path, .. }) => {
                assert_eq!(path.file_name().unwrap(), "provider")
            }
            other => panic!("{other:?}"),
        }
        assert!(is_empty_dir(dir.path()), "report entry left behind");
        assert_eq!(
            ConfigfsTdx::default().root(),
            Path::new("/sys/kernel/config/tsm/report")
        );
    }
}
