//! The simulated TEE, for development on machines without SGX or TDX (`docs/attestation.md`).
//!
//! It runs the same protocol as a real TEE: evidence binds 64 bytes of report data and a
//! measurement of the runtime, signed by a *simulation platform key* standing in for the
//! hardware's attestation key. The measurement is the SHA-256 of the running executable.
//! Simulated evidence proves nothing about confidentiality: anyone holding the platform key
//! file can forge it. Policies accept it only when they explicitly allow simulation (and log a
//! warning on every acceptance; [`verify_sim`] itself does not log).
//!
//! # Sim quote, version 1
//!
//! A fixed-size binary structure of [`SIM_QUOTE_LEN`] = 167 bytes:
//!
//! | offset | size | field                                                              |
//! |-------:|-----:|--------------------------------------------------------------------|
//! |      0 |    2 | version, u16 little-endian: `01 00`                                |
//! |      2 |    4 | TEE tag: ASCII `sim` and a NUL: `73 69 6d 00`                      |
//! |      6 |   32 | measurement: SHA-256 of the executable                             |
//! |     38 |   64 | report data                                                        |
//! |    102 |    1 | debug: `00` (false) or `01` (true); [`SimTee`] always writes `00`  |
//! |    103 |   64 | signature: Ed25519 (RFC 8032) by the simulation platform key       |
//!
//! The signature covers the 115-byte message
//! `"ppml-sim-quote/v1\0"` (18 bytes: the ASCII text and a NUL) || measurement (32) ||
//! report data (64) || debug (1).
//! Verifiers reject any other length, any other version, tag or debug byte, and a signature
//! that does not verify under one of their trusted platform public keys (32-byte raw Ed25519
//! keys).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::claims::{Claims, Measurements, Tee};
use crate::evidence::{Evidence, EvidenceError, EvidenceProvider};

/// The sim quote format version this module writes and reads.
pub const SIM_QUOTE_VERSION: u16 = 1;
/// The size of a version 1 sim quote.
pub const SIM_QUOTE_LEN: usize = 2 + 4 + 32 + 64 + 1 + 64;

/// Whether `quote` has the shape of a sim quote (its size, version and TEE tag); says nothing
/// of its signature.
pub fn is_sim_quote(quote: &[u8]) -> bool {
    quote.len() == SIM_QUOTE_LEN
        && quote[0..2] == SIM_QUOTE_VERSION.to_le_bytes()
        && quote[2..6] == TEE_TAG
}
/// The TCB status of simulated evidence in [`Claims::tcb_status`].
pub const SIM_TCB_STATUS: &str = "Simulated";

const TEE_TAG: [u8; 4] = *b"sim\0";
const SIGNATURE_DOMAIN: &[u8] = b"ppml-sim-quote/v1\0";
const MEASUREMENT_AT: usize = 6;
const REPORT_DATA_AT: usize = MEASUREMENT_AT + 32;
const DEBUG_AT: usize = REPORT_DATA_AT + 64;
const SIGNATURE_AT: usize = DEBUG_AT + 1;

/// Why simulated evidence could not be produced or verified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The quote does not have the size of its version.
    #[error("sim quote is {found} bytes, expected {expected}")]
    Length {
        /// The size of a quote of this version.
        expected: usize,
        /// The size received.
        found: usize,
    },
    /// The quote has a version this build does not know.
    #[error("sim quote version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u16),
    /// The TEE tag is not `sim\0`.
    #[error("not a sim quote (TEE tag {0:02x?})")]
    NotSim([u8; 4]),
    /// The debug byte is neither 0 nor 1.
    #[error("sim quote debug flag is {0:#04x}, expected 0x00 or 0x01")]
    InvalidDebugFlag(u8),
    /// The signature does not verify under any trusted platform key: the quote was modified,
    /// or it comes from another simulation platform.
    #[error(
        "sim quote signature does not verify with any of the {trusted} trusted simulation platform keys: the quote was modified or comes from another platform"
    )]
    Signature {
        /// How many keys were tried.
        trusted: usize,
    },
    /// Reading or writing the platform key file failed.
    #[error("simulation platform key {path}: {source}")]
    KeyIo {
        /// The key file (or its temporary sibling).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The platform key file does not hold an Ed25519 PKCS#8 (v2) key.
    #[error("simulation platform key {path} is not an Ed25519 PKCS#8 key: {reason}")]
    KeyInvalid {
        /// The key file.
        path: PathBuf,
        /// Why ring rejected it.
        reason: String,
    },
    /// The executable could not be read to measure it.
    #[error("cannot measure the executable {path}: {source}")]
    Measure {
        /// The executable.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

fn key_io(path: &Path, source: io::Error) -> SimError {
    SimError::KeyIo {
        path: path.to_path_buf(),
        source,
    }
}

/// A simulation platform: the Ed25519 key standing in for a TEE's attestation key.
pub struct SimPlatform {
    key: Ed25519KeyPair,
    path: PathBuf,
}

impl std::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("path", &self.path)
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl SimPlatform {
    /// Loads the platform key from `path` (PKCS#8 v2 DER, as written by ring), or creates it
    /// there when the file does not exist: parent directories are created (0700), the key is
    /// written to a temporary sibling with mode 0600, synced, and linked into place without
    /// replacing a file another process created meanwhile (that one is then loaded).
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<SimPlatform, SimError> {
        let path = path.as_ref();
        match fs::read(path) {
            Ok(bytes) => Self::from_pkcs8(path, &Zeroizing::new(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(key_io(path, e)),
        }
    }

    fn from_pkcs8(path: &Path, pkcs8: &[u8]) -> Result<SimPlatform, SimError> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| SimError::KeyInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "simulation platform key is readable by other users"
            );
        }
        Ok(SimPlatform {
            key,
            path: path.to_path_buf(),
        })
    }

    fn create(path: &Path) -> Result<SimPlatform, SimError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| key_io(dir, e))?;
        let name = path.file_name().ok_or_else(|| SimError::KeyInvalid {
            path: path.to_path_buf(),
            reason: "the path has no file name".into(),
        })?;
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| SimError::Random)?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| key_io(&tmp, e))?;
            file.write_all(pkcs8.as_ref())
                .and_then(|()| file.sync_all())
                .map_err(|e| key_io(&tmp, e))?;
            // A hard link fails if `path` exists, where a rename would replace a key another
            // process just created (and is already using).
            match fs::hard_link(&tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Ok(false);
                }
                // Filesystems without hard links: rename (atomic, but last creator wins).
                Err(_) => fs::rename(&tmp, path).map_err(|e| key_io(path, e))?,
            }
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| key_io(dir, e))?;
            Ok(true)
        })();
        let _ = fs::remove_file(&tmp);
        if result? {
            Self::from_pkcs8(path, pkcs8.as_ref())
        } else {
            // Another process created the key first: use theirs.
            let bytes = Zeroizing::new(fs::read(path).map_err(|e| key_io(path, e))?);
            Self::from_pkcs8(path, &bytes)
        }
    }

    /// The platform's public key (raw Ed25519), which verifiers trust.
    pub fn public_key(&self) -> [u8; 32] {
        self.key
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The simulated TEE: produces sim quotes over the running executable's measurement.
#[derive(Debug)]
pub struct SimTee {
    platform: SimPlatform,
}

impl SimTee {
    /// A simulated TEE signing with `platform`'s key.
    pub fn new(platform: SimPlatform) -> Self {
        SimTee { platform }
    }

    /// The simulation platform.
    pub fn platform(&self) -> &SimPlatform {
        &self.platform
    }
}

impl EvidenceProvider for SimTee {
    fn tee(&self) -> Tee {
        Tee::Sim
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, EvidenceError> {
        let measurement = executable_measurement()?;
        Ok(Evidence {
            tee: Tee::Sim,
            quote: encode_quote(&self.platform.key, &measurement, report_data, false),
        })
    }
}

/// The message a sim quote's signature covers.
fn signed_message(measurement: &[u8], report_data: &[u8], debug: u8) -> Vec<u8> {
    [SIGNATURE_DOMAIN, measurement, report_data, &[debug]].concat()
}

fn encode_quote(
    key: &Ed25519KeyPair,
    measurement: &[u8; 32],
    report_data: &[u8; 64],
    debug: bool,
) -> Vec<u8> {
    let debug = u8::from(debug);
    let signature = key.sign(&signed_message(measurement, report_data, debug));
    let quote = [
        &SIM_QUOTE_VERSION.to_le_bytes()[..],
        &TEE_TAG,
        measurement,
        report_data,
        &[debug],
        signature.as_ref(),
    ]
    .concat();
    debug_assert_eq!(quote.len(), SIM_QUOTE_LEN);
    quote
}

/// Verifies a sim quote (layout in the [module documentation](self)) against the trusted
/// simulation platform keys and returns its claims: `tee` sim, the measurement as
/// `mrenclave`, `tcb_status` [`SIM_TCB_STATUS`], no advisories.
///
/// Does not judge the claims (measurement, debug) and does not log: that is the policy's job.
pub fn verify_sim(quote: &[u8], trusted_platform_keys: &[[u8; 32]]) -> Result<Claims, SimError> {
    let length_error = SimError::Length {
        expected: SIM_QUOTE_LEN,
        found: quote.len(),
    };
    let version = match quote {
        [a, b, ..] => u16::from_le_bytes([*a, *b]),
        _ => return Err(length_error),
    };
    if version != SIM_QUOTE_VERSION {
        return Err(SimError::UnsupportedVersion(version));
    }
    if quote.len() != SIM_QUOTE_LEN {
        return Err(length_error);
    }
    let tag: [u8; 4] = quote[2..MEASUREMENT_AT].try_into().expect("4 bytes");
    if tag != TEE_TAG {
        return Err(SimError::NotSim(tag));
    }
    let measurement = &quote[MEASUREMENT_AT..REPORT_DATA_AT];
    let report_data = &quote[REPORT_DATA_AT..DEBUG_AT];
    let debug = match quote[DEBUG_AT] {
        0 => false,
        1 => true,
        other => return Err(SimError::InvalidDebugFlag(other)),
    };
    let signature = &quote[SIGNATURE_AT..];
    let message = signed_message(measurement, report_data, u8::from(debug));
    let signed_by_trusted = trusted_platform_keys.iter().any(|key| {
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message, signature)
            .is_ok()
    });
    if !signed_by_trusted {
        return Err(SimError::Signature {
            trusted: trusted_platform_keys.len(),
        });
    }
    Ok(Claims {
        tee: Tee::Sim,
        measurements: Measurements {
            mrenclave: Some(hex::encode(measurement)),
            ..Measurements::default()
        },
        debug,
        tcb_status: SIM_TCB_STATUS.to_owned(),
        advisory_ids: Vec::new(),
        report_data: hex::encode(report_data),
    })
}

/// The SHA-256 of the running executable: the measurement of simulated evidence. Computed
/// once per process (reading the file in chunks) and cached.
///
/// On Linux the file read is `/proc/self/exe`, which is the running image even if the path
/// it was started from has been replaced since (e.g. by a rebuild); elsewhere it is
/// [`std::env::current_exe`].
pub fn executable_measurement() -> Result<[u8; 32], SimError> {
    static MEASUREMENT: OnceLock<[u8; 32]> = OnceLock::new();
    if let Some(measurement) = MEASUREMENT.get() {
        return Ok(*measurement);
    }
    let proc_exe = Path::new("/proc/self/exe");
    let measurement = if cfg!(target_os = "linux") && proc_exe.exists() {
        file_measurement(proc_exe)?
    } else {
        let exe = std::env::current_exe().map_err(|source| SimError::Measure {
            path: PathBuf::from("<current executable>"),
            source,
        })?;
        file_measurement(&exe)?
    };
    Ok(*MEASUREMENT.get_or_init(|| measurement))
}

/// The SHA-256 of the file at `path`, as a sim measurement: what a policy allowing another
/// binary's simulated evidence lists.
pub fn file_measurement(path: &Path) -> Result<[u8; 32], SimError> {
    let measure_error = |source| SimError::Measure {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(measure_error)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => context.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(measure_error(e)),
        }
    }
    Ok(context
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_data() -> [u8; 64] {
        std::array::from_fn(|i| 200u8.wrapping_sub(i as u8))
    }

    fn new_platform(dir: &Path, name: &str) -> SimPlatform {
        SimPlatform::load_or_create(dir.join(name)).unwrap()
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .try_into()
            .unwrap()
    }

    #[test]
    fn evidence_verifies_and_carries_measurement_and_report_data() {
        let dir = tempfile::tempdir().unwrap();
        let platform = new_platform(dir.path(), "sim-platform.pk8");
        let key = platform.public_key();
        let tee = SimTee::new(platform);
        assert_eq!(tee.tee(), Tee::Sim);
        let evidence = tee.evidence(&report_data()).unwrap();
        assert_eq!(evidence.tee, Tee::Sim);
        assert_eq!(evidence.quote.len(), SIM_QUOTE_LEN);

        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        let expected_measurement = sha256(&exe);
        assert_eq!(executable_measurement().unwrap(), expected_measurement);

        let claims = verify_sim(&evidence.quote, &[key]).unwrap();
        assert_eq!(
            claims,
            Claims {
                tee: Tee::Sim,
                measurements: Measurements {
                    mrenclave: Some(hex::encode(expected_measurement)),
                    ..Measurements::default()
                },
                debug: false,
                tcb_status: "Simulated".into(),
                advisory_ids: vec![],
                report_data: hex::encode(report_data()),
            }
        );
        assert_eq!(claims.report_data_bytes(), Some(report_data()));
        // Any trusted key will do.
        let other = new_platform(dir.path(), "other.pk8").public_key();
        assert!(verify_sim(&evidence.quote, &[other, key]).is_ok());
    }

    #[test]
    fn quote_layout_is_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let platform = new_platform(dir.path(), "p.pk8");
        let measurement = [0x11; 32];
        let quote = encode_quote(&platform.key, &measurement, &report_data(), true);
        assert_eq!(&quote[0..6], b"\x01\x00sim\x00");
        assert_eq!(&quote[6..38], &measurement);
        assert_eq!(&quote[38..102], &report_data());
        assert_eq!(quote[102], 1);
        let message = [
            b"ppml-sim-quote/v1\0".as_slice(),
            &measurement,
            &report_data(),
            &[1],
        ]
        .concat();
        assert_eq!(message.len(), 115);
        UnparsedPublicKey::new(&ED25519, platform.public_key())
            .verify(&message, &quote[103..167])
            .unwrap();
        let claims = verify_sim(&quote, &[platform.public_key()]).unwrap();
        assert!(claims.debug);
        assert_eq!(claims.measurements.mrenclave, Some("11".repeat(32)));
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let platform = new_platform(dir.path(), "p.pk8");
        let keys = [platform.public_key()];
        let quote = SimTee::new(platform)
            .evidence(&report_data())
            .unwrap()
            .quote;
        verify_sim(&quote, &keys).unwrap();
        for i in 0..quote.len() {
            for bit in [0x01, 0x80] {
                let mut bad = quote.clone();
                bad[i] ^= bit;
                let err = verify_sim(&bad, &keys).unwrap_err();
                let expected = match i {
                    0..2 => matches!(err, SimError::UnsupportedVersion(_)),
                    2..6 => matches!(err, SimError::NotSim(_)),
                    102 if bit == 0x80 => matches!(err, SimError::InvalidDebugFlag(0x80)),
                    _ => matches!(err, SimError::Signature { trusted: 1 }),
                };
                assert!(expected, "byte {i} bit {bit:#x}: {err:?}");
            }
        }
    }

    #[test]
    fn another_platforms_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ours = new_platform(dir.path(), "ours.pk8");
        let theirs = new_platform(dir.path(), "theirs.pk8");
        assert_ne!(ours.public_key(), theirs.public_key());
        let quote = SimTee::new(theirs).evidence(&report_data()).unwrap().quote;
        assert!(matches!(
            verify_sim(&quote, &[ours.public_key()]),
            Err(SimError::Signature { trusted: 1 })
        ));
        assert!(matches!(
            verify_sim(&quote, &[]),
            Err(SimError::Signature { trusted: 0 })
        ));
    }

    #[test]
    fn truncated_or_extended_quote_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let platform = new_platform(dir.path(), "p.pk8");
        let keys = [platform.public_key()];
        let quote = SimTee::new(platform)
            .evidence(&report_data())
            .unwrap()
            .quote;
        for len in 0..quote.len() {
            let err = verify_sim(&quote[..len], &keys).unwrap_err();
            assert!(
                matches!(err, SimError::Length { expected: 167, found } if found == len),
                "{len}: {err:?}"
            );
        }
        let mut longer = quote.clone();
        longer.push(0);
        assert!(matches!(
            verify_sim(&longer, &keys),
            Err(SimError::Length { found: 168, .. })
        ));
    }

    #[test]
    fn key_file_is_private_and_reloads_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home/ppml/sim-platform.pk8");
        let created = SimPlatform::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let reloaded = SimPlatform::load_or_create(&path).unwrap();
        assert_eq!(reloaded.public_key(), created.public_key());
        assert_eq!(reloaded.path(), path);
        assert!(Ed25519KeyPair::from_pkcs8(&fs::read(&path).unwrap()).is_ok());
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sim-platform.pk8"], "temporary files left behind");
        // Debug output shows the public key, not the private one.
        let debug = format!("{created:?}");
        assert!(
            debug.contains(&hex::encode(created.public_key())),
            "{debug}"
        );
    }

    #[test]
    fn concurrent_first_use_yields_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim-platform.pk8");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| SimPlatform::load_or_create(&path).unwrap().public_key()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:x?}");
        assert_eq!(
            SimPlatform::load_or_create(&path).unwrap().public_key(),
            keys[0]
        );
    }

    #[test]
    fn corrupt_key_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim-platform.pk8");
        fs::write(&path, b"not a key").unwrap();
        assert!(matches!(
            SimPlatform::load_or_create(&path),
            Err(SimError::KeyInvalid { path: p, .. }) if p == path
        ));
    }

    #[test]
    fn file_measurement_streams_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        assert_eq!(file_measurement(&path).unwrap(), sha256(&data));
        assert!(matches!(
            file_measurement(&dir.path().join("missing")),
            Err(SimError::Measure { .. })
        ));
    }
}
