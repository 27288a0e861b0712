//! The KMS audit log: every request is appended to a hash-chained, MACed JSON Lines file,
//! written with group commit and failing closed (`docs/kms-audit.md` is the specification).
//!
//! - [`AuditLog::open`] verifies an existing log completely (chain and every MAC), drops a torn
//!   final line and continues the chain.
//! - [`AuditLog::append`] / [`AuditLog::append_async`] return only once the entry is on disk
//!   (`fdatasync`). One writer thread owns the file; it takes every pending entry, writes them
//!   with one `write` and syncs them with one `fdatasync` (group commit).
//! - If a write or a sync fails, that batch fails and the log stays failed: every later append
//!   returns [`AuditError::Failed`] until the process restarts.
//! - [`verify`] checks a log file, with or without the MAC key.
//!
//! Entries hold request metadata only (request id, app id, action, key id, outcome); no key
//! material, api key, plaintext or ciphertext is ever passed to this module.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use ppml_kms::ehsm::{REPLAY_WINDOW_MS, ReplayId};
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The log's file name inside the directory given to [`AuditLog::open`].
pub const FILE_NAME: &str = "audit.log";

/// A string field longer than this many bytes is cut (at a character boundary) and
/// [`TRUNCATION_MARK`] is appended, so one entry stays small whatever a client sends.
pub const MAX_FIELD_BYTES: usize = 4096;

/// Appended to a string field cut at [`MAX_FIELD_BYTES`].
pub const TRUNCATION_MARK: &str = "…(truncated)";

/// The longest line (without its newline) that [`verify`] and [`AuditLog::open`] accept.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The most entries one group commit writes.
const MAX_BATCH: usize = 4096;

/// `prev` of the first entry.
const ZERO_HASH: [u8; 32] = [0; 32];

/// Length of the `,"mac":"<64 hex>"}` suffix that ends every line.
const MAC_SUFFIX_LEN: usize = MAC_PREFIX.len() + 64 + 2;
const MAC_PREFIX: &[u8] = b",\"mac\":\"";

/// What one request did. The log adds `seq`, `time_ms`, `prev` and `mac`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEntry {
    /// The server's id for the request (also in its response and its tracing spans).
    pub request_id: String,
    /// The app id of the request; empty if the request had none (or was unparseable).
    pub appid: String,
    /// The eHSM action name (`CreateKey`, `Decrypt`, …) or what was asked for.
    pub action: String,
    /// The key id the request named or created; empty if none.
    pub keyid: String,
    /// `"ok"`, or the error message returned to the client.
    pub outcome: String,
    /// The eHSM response code: 200, 400 or 500.
    pub code: u16,
    /// For successful attestations and key releases: the attestation token's claims as
    /// compact JSON (who was attested, to which policy, with what measurements).
    pub attestation: Option<String>,
    /// What a change changed, as compact JSON: the policy id and the SHA-256 of the policy a
    /// key was bound to, the owner key an app was enrolled with.
    pub detail: Option<String>,
    /// The [`ReplayId`] of a signed request whose signature
    /// verified, as 32 hex digits: a restarted server reads the last 20 minutes of them back
    /// and refuses those requests as replays.
    pub replay: Option<String>,
}

impl AuditEntry {
    fn truncate_fields(&mut self) {
        for field in [
            &mut self.request_id,
            &mut self.appid,
            &mut self.action,
            &mut self.keyid,
            &mut self.outcome,
        ]
        .into_iter()
        .chain(self.attestation.as_mut())
        .chain(self.detail.as_mut())
        .chain(self.replay.as_mut())
        {
            if field.len() > MAX_FIELD_BYTES {
                let mut cut = MAX_FIELD_BYTES;
                while !field.is_char_boundary(cut) {
                    cut -= 1;
                }
                field.truncate(cut);
                field.push_str(TRUNCATION_MARK);
            }
        }
    }
}

/// The last durable entry of a log: record it outside the log (the server logs it on
/// shutdown, `Unseal` answers it) to detect a later truncation of the tail.
pub use ppml_kms::protocol::AuditHead;

/// What [`verify`] found in a valid log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of entries, which is also the last `seq`.
    pub entries: u64,
    /// Lowercase hex SHA-256 of the last line; 64 zeros for an empty log.
    pub head_hash: String,
    /// `time_ms` of the first entry.
    pub first_time_ms: Option<u64>,
    /// `time_ms` of the last entry.
    pub last_time_ms: Option<u64>,
    /// Whether every MAC was checked (a key was given).
    pub macs_checked: bool,
    /// Bytes after the last newline: a torn final write that was never acknowledged (the
    /// server removes it on its next start). 0 normally.
    pub torn_tail_bytes: u64,
}

impl VerifyReport {
    /// The head of the verified log.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.entries,
            hash: self.head_hash.clone(),
        }
    }
}

/// Every way opening, appending to or verifying an audit log can fail. Line numbers are
/// 1-based.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An I/O operation on the log file or its directory failed.
    #[error("audit log {path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another [`AuditLog`]) holds the log open.
    #[error("audit log {path} is locked by another process")]
    Locked {
        /// The log file.
        path: PathBuf,
    },
    /// A line is not a well-formed entry in canonical form.
    #[error("audit log {path}: line {line}: {reason}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// The line.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A line's `seq` is not its line number (a line was removed, inserted or moved).
    #[error("audit log {path}: line {line}: seq {found}, expected {line}")]
    BadSeq {
        /// The log file.
        path: PathBuf,
        /// The line, which is also the expected `seq`.
        line: u64,
        /// The `seq` found.
        found: u64,
    },
    /// A line's `prev` is not the hash of the line before it (that line was edited).
    #[error("audit log {path}: line {line}: prev hash does not match {}", prev_desc(.line))]
    BrokenChain {
        /// The log file.
        path: PathBuf,
        /// The line whose `prev` is wrong.
        line: u64,
    },
    /// A line's MAC is wrong: the line was written without the key (or the key is wrong).
    #[error("audit log {path}: line {line}: MAC does not verify")]
    BadMac {
        /// The log file.
        path: PathBuf,
        /// The line.
        line: u64,
    },
    /// Writing or syncing this entry's batch failed; the log is now failed.
    #[error("audit log {path}: write failed, refusing every request until restart: {reason}")]
    WriteFailed {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// An earlier write failed; the log refuses every entry until the process restarts.
    #[error("audit log failed earlier, refusing every request until restart: {reason}")]
    Failed {
        /// The first failure.
        reason: String,
    },
    /// The writer thread is gone (it panicked); nothing can be logged.
    #[error("audit log writer has stopped")]
    Stopped,
}

fn prev_desc(line: &u64) -> String {
    if *line <= 1 {
        "the start of the log (64 zeros)".to_string()
    } else {
        format!("line {}", line - 1)
    }
}

/// An open audit log. Cheap to clone (all clones share one writer); `Send + Sync`. The writer
/// thread stops, after writing what is pending, when the last clone is dropped.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: Option<mpsc::Sender<Msg>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    failed: OnceLock<String>,
    head: Mutex<AuditHead>,
    /// The replay ids found when the log was opened, until taken.
    recent_replays: Mutex<Vec<(u64, ReplayId)>>,
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

// Only the test-only `SwapFile` variant is small; production messages are all `Append`.
#[cfg_attr(test, allow(clippy::large_enum_variant))]
enum Msg {
    Append {
        entry: AuditEntry,
        time_ms: u64,
        reply: Reply,
    },
    /// Test hook: replace the writer's file (with one whose writes fail).
    #[cfg(test)]
    SwapFile(File),
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .field("head", &self.head())
            .field("failed", &self.inner.shared.failed.get())
            .finish()
    }
}

impl AuditLog {
    /// Opens (creating if needed) `dir/audit.log`, takes an exclusive lock on it, verifies the
    /// whole existing log with `mac_key` (chain and every MAC), truncates a torn final line
    /// (one without a newline: it was never acknowledged) with a warning, and starts the
    /// writer thread. Any other defect is an error: the server must not start.
    pub fn open(dir: &Path, mac_key: &[u8; 32]) -> Result<AuditLog, AuditError> {
        let path = dir.join(FILE_NAME);
        let io_err = |path: &Path, op| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, op, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let existed = path.exists();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(io_err(&path, "open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, "lock")(e)),
        }
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir, "sync directory"))?;
        }

        let key = hmac::Key::new(hmac::HMAC_SHA256, mac_key);
        // Requests accepted within the replay window (plus a minute for clock steps) must stay
        // refused after this restart.
        let since = now_ms().saturating_sub(REPLAY_WINDOW_MS + 60_000);
        let scan = scan(&path, &mut file, Some(&key), Some(since))?;
        if scan.report.torn_tail_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = scan.report.torn_tail_bytes,
                "audit log ends with a torn, unacknowledged line; truncating it"
            );
            file.set_len(scan.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(io_err(&path, "truncate torn final line"))?;
        }
        let head = scan.report.head();
        tracing::info!(path = %path.display(), seq = head.seq, head = %head.hash, "audit log opened");

        let shared = Arc::new(Shared {
            failed: OnceLock::new(),
            head: Mutex::new(head),
            recent_replays: Mutex::new(scan.replays),
        });
        let writer = Writer {
            file,
            path: path.clone(),
            key,
            next_seq: scan.report.entries + 1,
            prev: scan.last_hash,
            shared: Arc::clone(&shared),
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ppml-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(&path, "start writer thread"))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path,
                tx: Some(tx),
                shared,
                thread: Some(thread),
            }),
        })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the log holds `head`: its entry `head.seq` is the line whose SHA-256 is
    /// `head.hash`. The log was verified when opened (every line links to the one before),
    /// so this says the log holds, unchanged, everything up to that entry: a log rolled back
    /// to before it, or rewritten, does not.
    pub fn holds(&self, head: &AuditHead) -> Result<bool, AuditError> {
        if head.seq == 0 {
            return Ok(head.hash == hex::encode(ZERO_HASH));
        }
        if self.head().seq < head.seq {
            return Ok(false);
        }
        let io_err = |source| AuditError::Io {
            path: self.inner.path.clone(),
            op: "read",
            source,
        };
        let mut reader = BufReader::new(File::open(&self.inner.path).map_err(io_err)?);
        let mut line = Vec::with_capacity(1024);
        for _ in 0..head.seq {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(io_err)?;
            if read == 0 || line.last() != Some(&b'\n') {
                return Ok(false);
            }
        }
        line.pop();
        Ok(hex::encode(sha256(&line)) == head.hash)
    }

    /// The last durable entry.
    pub fn head(&self) -> AuditHead {
        self.inner
            .shared
            .head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The (time, replay id) of the signed requests the log recorded in the 21 minutes before
    /// it was opened, oldest first; empty after the first call.
    pub fn take_recent_replays(&self) -> Vec<(u64, ReplayId)> {
        std::mem::take(
            &mut *self
                .inner
                .shared
                .recent_replays
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Whether the log has failed (every append now returns an error).
    pub fn is_failed(&self) -> bool {
        self.inner.shared.failed.get().is_some()
    }

    /// Appends `entry` (stamped with the current time) and returns its `seq` once it is durable
    /// on disk. Blocks: call it from a plain thread or `spawn_blocking`, never from async code
    /// (it panics inside a tokio runtime; use [`AuditLog::append_async`] there). An error means
    /// the request must fail.
    pub fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let rx = self.submit(entry)?;
        rx.blocking_recv().map_err(|_| AuditError::Stopped)?
    }

    /// Makes the writer use `file` from now on, so tests elsewhere in the crate can make real
    /// writes fail (e.g. `/dev/full`).
    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&self, file: File) {
        self.send(Msg::SwapFile(file)).expect("writer running");
    }

    /// [`AuditLog::append`] for async code: the same, awaiting the writer instead of blocking.
    pub async fn append_async(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let rx = self.submit(entry)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    fn submit(
        &self,
        mut entry: AuditEntry,
    ) -> Result<oneshot::Receiver<Result<u64, AuditError>>, AuditError> {
        if let Some(reason) = self.inner.shared.failed.get() {
            return Err(AuditError::Failed {
                reason: reason.clone(),
            });
        }
        entry.truncate_fields();
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Append {
            entry,
            time_ms: now_ms(),
            reply,
        };
        self.send(msg)?;
        Ok(rx)
    }

    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        self.inner
            .tx
            .as_ref()
            .ok_or(AuditError::Stopped)?
            .send(msg)
            .map_err(|_| AuditError::Stopped)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The thread that owns the file.
struct Writer {
    file: File,
    path: PathBuf,
    key: hmac::Key,
    next_seq: u64,
    prev: [u8; 32],
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut waiters: Vec<(u64, Reply)> = Vec::new();
        while let Ok(first) = rx.recv() {
            buf.clear();
            let mut seq = self.next_seq;
            let mut prev = self.prev;
            let mut encode_error = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append {
                        entry,
                        time_ms,
                        reply,
                    } => {
                        if let Some(reason) = self.shared.failed.get() {
                            let _ = reply.send(Err(AuditError::Failed {
                                reason: reason.clone(),
                            }));
                        } else {
                            match encode_line(&mut buf, &self.key, seq, time_ms, &entry, &prev) {
                                Ok(hash) => prev = hash,
                                Err(e) => encode_error = Some(e),
                            }
                            waiters.push((seq, reply));
                            seq += 1;
                        }
                    }
                    #[cfg(test)]
                    Msg::SwapFile(file) => self.file = file,
                }
                if waiters.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if waiters.is_empty() {
                continue;
            }
            let result = match encode_error {
                Some(e) => Err(e),
                None => self
                    .file
                    .write_all(&buf)
                    .and_then(|()| self.file.sync_data()),
            };
            match result {
                Ok(()) => {
                    self.next_seq = seq;
                    self.prev = prev;
                    *self
                        .shared
                        .head
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = AuditHead {
                        seq: seq - 1,
                        hash: hex::encode(prev),
                    };
                    for (seq, reply) in waiters.drain(..) {
                        let _ = reply.send(Ok(seq));
                    }
                }
                Err(e) => {
                    let reason = format!("writing {} entries: {e}", waiters.len());
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        entries = waiters.len(),
                        "audit log write failed; refusing every request until restart"
                    );
                    let _ = self.shared.failed.set(reason.clone());
                    for (_, reply) in waiters.drain(..) {
                        let _ = reply.send(Err(AuditError::WriteFailed {
                            path: self.path.clone(),
                            reason: reason.clone(),
                        }));
                    }
                }
            }
        }
    }
}

/// The fields of a line before `mac`, in order; its serde_json serialisation is the MAC input.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time_ms: u64,
    request_id: &'a str,
    appid: &'a str,
    action: &'a str,
    keyid: &'a str,
    outcome: &'a str,
    code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    attestation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay: Option<&'a str>,
    prev: &'a str,
}

/// A whole line, as parsed (and re-serialised to check canonical form) by the verifier.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    time_ms: u64,
    request_id: String,
    appid: String,
    action: String,
    keyid: String,
    outcome: String,
    code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attestation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replay: Option<String>,
    prev: String,
    mac: String,
}

/// Appends one line and its newline to `out`; returns the line's SHA-256.
fn encode_line(
    out: &mut Vec<u8>,
    key: &hmac::Key,
    seq: u64,
    time_ms: u64,
    entry: &AuditEntry,
    prev: &[u8; 32],
) -> io::Result<[u8; 32]> {
    let start = out.len();
    let mut prev_hex = [0u8; 64];
    hex::encode_to_slice(prev, &mut prev_hex).map_err(io::Error::other)?;
    let body = Body {
        seq,
        time_ms,
        request_id: &entry.request_id,
        appid: &entry.appid,
        action: &entry.action,
        keyid: &entry.keyid,
        outcome: &entry.outcome,
        code: entry.code,
        attestation: entry.attestation.as_deref(),
        detail: entry.detail.as_deref(),
        replay: entry.replay.as_deref(),
        prev: std::str::from_utf8(&prev_hex).map_err(io::Error::other)?,
    };
    serde_json::to_writer(&mut *out, &body).map_err(io::Error::other)?;
    let tag = hmac::sign(key, &out[start..]);
    let mut mac_hex = [0u8; 64];
    hex::encode_to_slice(tag.as_ref(), &mut mac_hex).map_err(io::Error::other)?;
    out.pop(); // the body's closing '}'
    out.extend_from_slice(MAC_PREFIX);
    out.extend_from_slice(&mac_hex);
    out.extend_from_slice(b"\"}");
    let hash = sha256(&out[start..]);
    out.push(b'\n');
    Ok(hash)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    hash
}

/// Decodes 64 lowercase hex digits.
fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Checks lines one by one.
struct Verifier<'a> {
    path: &'a Path,
    key: Option<&'a hmac::Key>,
    entries: u64,
    prev: [u8; 32],
    scratch: Vec<u8>,
    first_time_ms: Option<u64>,
    last_time_ms: Option<u64>,
    /// Collect the replay ids of entries written at or after this time.
    replays_since_ms: Option<u64>,
    replays: Vec<(u64, ReplayId)>,
}

impl Verifier<'_> {
    /// Checks the next line (without its newline).
    fn check(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let n = self.entries + 1;
        let corrupt = |reason: String| AuditError::Corrupt {
            path: self.path.to_path_buf(),
            line: n,
            reason,
        };
        let parsed: Line = serde_json::from_slice(line)
            .map_err(|e| corrupt(format!("not a valid audit entry: {e}")))?;
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, &parsed)
            .map_err(|e| corrupt(format!("cannot re-serialise: {e}")))?;
        if self.scratch != line {
            return Err(corrupt(
                "not in canonical form (field order, spacing or escaping differs from what the writer produces)"
                    .into(),
            ));
        }
        if parsed.seq != n {
            return Err(AuditError::BadSeq {
                path: self.path.to_path_buf(),
                line: n,
                found: parsed.seq,
            });
        }
        let prev = decode_hex32(&parsed.prev)
            .ok_or_else(|| corrupt("prev is not 64 lowercase hex digits".into()))?;
        let mac = decode_hex32(&parsed.mac)
            .ok_or_else(|| corrupt("mac is not 64 lowercase hex digits".into()))?;
        if prev != self.prev {
            return Err(AuditError::BrokenChain {
                path: self.path.to_path_buf(),
                line: n,
            });
        }
        if let Some(key) = self.key {
            // Canonical form puts `,"mac":"<64 hex>"}` last: the MAC input is the line with that
            // suffix replaced by `}`.
            self.scratch.truncate(line.len() - MAC_SUFFIX_LEN);
            self.scratch.push(b'}');
            hmac::verify(key, &self.scratch, &mac).map_err(|_| AuditError::BadMac {
                path: self.path.to_path_buf(),
                line: n,
            })?;
        }
        self.prev = sha256(line);
        self.entries = n;
        self.first_time_ms.get_or_insert(parsed.time_ms);
        self.last_time_ms = Some(parsed.time_ms);
        if let (Some(since), Some(replay)) = (self.replays_since_ms, &parsed.replay)
            && parsed.time_ms >= since
        {
            let mut id = ReplayId::default();
            hex::decode_to_slice(replay, &mut id)
                .map_err(|_| corrupt("replay is not 32 hex digits".into()))?;
            self.replays.push((parsed.time_ms, id));
        }
        Ok(())
    }
}

struct Scan {
    report: VerifyReport,
    /// (time, id) of the replay ids written since the time asked for, in log order.
    replays: Vec<(u64, ReplayId)>,
    last_hash: [u8; 32],
    /// Length of the file up to and including the last newline.
    valid_len: u64,
}

fn scan(
    path: &Path,
    file: &mut File,
    key: Option<&hmac::Key>,
    replays_since_ms: Option<u64>,
) -> Result<Scan, AuditError> {
    let mut verifier = Verifier {
        path,
        key,
        entries: 0,
        prev: ZERO_HASH,
        scratch: Vec::with_capacity(1024),
        first_time_ms: None,
        last_time_ms: None,
        replays_since_ms,
        replays: Vec::new(),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(1024);
    let mut valid_len = 0u64;
    let mut torn_tail_bytes = 0u64;
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                op: "read",
                source,
            })?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            if n > MAX_LINE_BYTES {
                return Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: verifier.entries + 1,
                    reason: format!("line longer than {MAX_LINE_BYTES} bytes"),
                });
            }
            // End of file without a newline: a torn write.
            torn_tail_bytes = n as u64;
            break;
        }
        line.pop();
        verifier.check(&line)?;
        valid_len += n as u64;
    }
    Ok(Scan {
        report: VerifyReport {
            entries: verifier.entries,
            head_hash: hex::encode(verifier.prev),
            first_time_ms: verifier.first_time_ms,
            last_time_ms: verifier.last_time_ms,
            macs_checked: key.is_some(),
            torn_tail_bytes,
        },
        last_hash: verifier.prev,
        valid_len,
        replays: verifier.replays,
    })
}

/// Verifies the log file at `path`: every line is a canonical entry, `seq` runs 1, 2, 3, …,
/// every `prev` is the SHA-256 of the line before (64 zeros for line 1), and, if `mac_key` is
/// given, every MAC (compared in constant time). The first defect is returned as an error
/// naming its line. A final line without a newline is not an error: it is reported in
/// [`VerifyReport::torn_tail_bytes`]. Removal of lines at the end cannot be detected here:
/// compare [`VerifyReport::head`] with a head recorded elsewhere.
pub fn verify(path: &Path, mac_key: Option<&[u8; 32]>) -> Result<VerifyReport, AuditError> {
    let mut file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        op: "open",
        source,
    })?;
    let key = mac_key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k));
    Ok(scan(path, &mut file, key.as_ref(), None)?.report)
}

/// An entry as a log holds it: its place and time, and what it recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEntry {
    /// Its sequence number (1 for the first entry).
    pub seq: u64,
    /// When it was written, Unix milliseconds.
    pub time_ms: u64,
    /// What it recorded.
    pub entry: AuditEntry,
}

/// Verifies the log at `path` as [`verify`] does, then returns the entries of job `job_id`:
/// those whose `detail` names it (`{"job_id": …, "grant_sha256": …}`), which every key
/// released or made under the data owner's grant of that job has. A job receipt names the
/// same job id (`docs/receipts.md`).
pub fn job_entries(
    path: &Path,
    mac_key: Option<&[u8; 32]>,
    job_id: &str,
) -> Result<(VerifyReport, Vec<LoggedEntry>), AuditError> {
    use std::io::BufRead as _;
    let report = verify(path, mac_key)?;
    let io_error = |op, source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io_error("open", e))?;
    let mut found = Vec::new();
    for line in io::BufReader::new(file)
        .lines()
        .take(report.entries as usize)
    {
        let line = line.map_err(|e| io_error("read", e))?;
        let Ok(line) = serde_json::from_str::<Line>(&line) else {
            continue;
        };
        let of_job = line
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .is_some_and(|d| d.get("job_id").and_then(|j| j.as_str()) == Some(job_id));
        if of_job {
            found.push(LoggedEntry {
                seq: line.seq,
                time_ms: line.time_ms,
                entry: AuditEntry {
                    request_id: line.request_id,
                    appid: line.appid,
                    action: line.action,
                    keyid: line.keyid,
                    outcome: line.outcome,
                    code: line.code,
                    attestation: line.attestation,
                    detail: line.detail,
                    replay: line.replay,
                },
            });
        }
    }
    Ok((report, found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn job_entries_are_those_whose_detail_names_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        for (i, job) in ["a", "b", "a", ""].into_iter().enumerate() {
            let mut e = entry(i as u64 + 1);
            if !job.is_empty() {
                e.detail = Some(format!(r#"{{"job_id":"{job}","grant_sha256":"00"}}"#));
            }
            log.append(e).unwrap();
        }
        let path = log.path().to_path_buf();
        drop(log);
        let (report, entries) = job_entries(&path, Some(&KEY), "a").unwrap();
        assert_eq!(report.entries, 4);
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(entries[1].entry.request_id, "req-3");
        assert!(job_entries(&path, Some(&KEY), "c").unwrap().1.is_empty());
        // A log that does not verify lists nothing.
        assert!(job_entries(&path, Some(&[8; 32]), "a").is_err());
    }

    const KEY: [u8; 32] = [7; 32];

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            request_id: format!("req-{i}"),
            appid: "app-1".into(),
            action: "Encrypt".into(),
            keyid: format!("key-{}", i % 3),
            outcome: "ok".into(),
            code: 200,
            attestation: None,
            detail: None,
            replay: None,
        }
    }

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        for i in 1..=n {
            assert_eq!(log.append(entry(i)).unwrap(), i);
        }
        let path = log.path().to_path_buf();
        drop(log);
        (dir, path)
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    /// Recomputes a line as an attacker without the key would: new content, `prev` set to the
    /// previous line's hash, the old (now wrong) MAC kept.
    fn rehash_from(lines: &mut [String], from: usize) {
        for i in from..lines.len() {
            let prev = if i == 0 {
                hex::encode(ZERO_HASH)
            } else {
                hex::encode(sha256(lines[i - 1].as_bytes()))
            };
            let mut v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
            v["prev"] = prev.into();
            let parsed: Line = serde_json::from_value(v).unwrap();
            lines[i] = serde_json::to_string(&parsed).unwrap();
        }
    }

    #[test]
    fn round_trip_and_independent_check_of_the_documented_format() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        let odd = AuditEntry {
            request_id: "r\"1\n".into(),
            appid: String::new(),
            action: "Decrypt".into(),
            keyid: String::new(),
            outcome: "decrypt failed: \u{1} é ✓ \\".into(),
            code: 400,
            attestation: None,
            detail: None,
            replay: None,
        };
        assert_eq!(log.append(entry(1)).unwrap(), 1);
        assert_eq!(log.append(odd.clone()).unwrap(), 2);
        assert_eq!(log.append(entry(3)).unwrap(), 3);
        let head = log.head();
        assert_eq!(head.seq, 3);
        let path = log.path().to_path_buf();
        drop(log);

        let full = verify(&path, Some(&KEY)).unwrap();
        assert_eq!(full.entries, 3);
        assert!(full.macs_checked);
        assert_eq!(full.head(), head);
        assert_eq!(full.torn_tail_bytes, 0);
        assert!(full.first_time_ms.unwrap() <= full.last_time_ms.unwrap());
        let chain = verify(&path, None).unwrap();
        assert!(!chain.macs_checked);
        assert_eq!(chain.head_hash, head.hash);

        // Check as an outsider following docs/kms-audit.md, with ring only.
        let text = std::fs::read(&path).unwrap();
        assert!(text.ends_with(b"\n"));
        let lines: Vec<&[u8]> = text[..text.len() - 1].split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 3);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &KEY);
        let mut prev = "0".repeat(64);
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            names.sort_unstable();
            let order = [
                "seq",
                "time_ms",
                "request_id",
                "appid",
                "action",
                "keyid",
                "outcome",
                "code",
                "prev",
                "mac",
            ];
            let mut sorted = order.to_vec();
            sorted.sort_unstable();
            assert_eq!(names, sorted);
            // Fixed order: each field's key appears after the previous one's.
            let text = std::str::from_utf8(line).unwrap();
            let positions: Vec<usize> = order
                .iter()
                .map(|k| text.find(&format!("\"{k}\":")).unwrap())
                .collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
            assert!(line.starts_with(b"{\"seq\":"));
            assert_eq!(v["seq"], i as u64 + 1);
            assert_eq!(v["prev"], prev.as_str());
            let mut body = line[..line.len() - 74].to_vec();
            body.push(b'}');
            let tag = hmac::sign(&key, &body);
            assert_eq!(v["mac"], hex::encode(tag.as_ref()).as_str());
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(parsed.get("mac").is_none());
            prev = hex::encode(digest::digest(&digest::SHA256, line).as_ref());
        }
        assert_eq!(prev, head.hash);
        let second: serde_json::Value = serde_json::from_slice(lines[1]).unwrap();
        assert_eq!(second["request_id"], odd.request_id.as_str());
        assert_eq!(second["outcome"], odd.outcome.as_str());
        assert_eq!(second["code"], 400);
        assert_eq!(second["appid"], "");
    }

    /// The test vector of docs/kms-audit.md §6, computed independently (Python hmac/hashlib).
    #[test]
    fn documented_test_vector() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &KEY);
        let e1 = AuditEntry {
            request_id: "req-1".into(),
            appid: "app-1".into(),
            action: "CreateKey".into(),
            keyid: String::new(),
            outcome: "ok".into(),
            code: 200,
            attestation: None,
            detail: None,
            replay: None,
        };
        let e2 = AuditEntry {
            request_id: "req-2".into(),
            appid: "app-1".into(),
            action: "Decrypt".into(),
            keyid: "3f1c9a2e".into(),
            outcome: "decrypt failed".into(),
            code: 400,
            attestation: None,
            detail: None,
            replay: None,
        };
        let mut buf = Vec::new();
        let h1 = encode_line(&mut buf, &key, 1, 1_700_000_000_001, &e1, &ZERO_HASH).unwrap();
        let h2 = encode_line(&mut buf, &key, 2, 1_700_000_000_002, &e2, &h1).unwrap();
        let expected = concat!(
            r#"{"seq":1,"time_ms":1700000000001,"request_id":"req-1","appid":"app-1","action":"CreateKey","keyid":"","outcome":"ok","code":200,"prev":"0000000000000000000000000000000000000000000000000000000000000000","mac":"0ce74ce1e11f07b0b77e7854c74fe1334efe523205dd3e7fd0e91fb54d9665ae"}"#,
            "\n",
            r#"{"seq":2,"time_ms":1700000000002,"request_id":"req-2","appid":"app-1","action":"Decrypt","keyid":"3f1c9a2e","outcome":"decrypt failed","code":400,"prev":"4993dd90288a4c0be118f7dfc8dc06782b1af39b8917a7f6f1d80a2459665632","mac":"90fe1d9fe4d5589179474d69639d71e9b44120ccb98feaf7aae0c26d24721868"}"#,
            "\n",
        );
        assert_eq!(std::str::from_utf8(&buf).unwrap(), expected);
        assert_eq!(
            hex::encode(h2),
            "691343e7779baf398a845253fbc7931c5bb468df4ff39623fb6e749c8d9c5209"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, &buf).unwrap();
        assert_eq!(
            verify(&path, Some(&KEY)).unwrap().head().hash,
            hex::encode(h2)
        );
    }

    #[test]
    fn empty_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        assert_eq!(
            log.head(),
            AuditHead {
                seq: 0,
                hash: "0".repeat(64)
            }
        );
        let report = verify(log.path(), Some(&KEY)).unwrap();
        assert_eq!(report.entries, 0);
        assert_eq!(report.first_time_ms, None);
    }

    #[test]
    fn concurrent_appends_form_one_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    (0..200u64)
                        .map(|i| log.append(entry(t * 1000 + i)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1600).collect::<Vec<_>>());
        let path = log.path().to_path_buf();
        assert_eq!(log.head().seq, 1600);
        drop(log);
        let report = verify(&path, Some(&KEY)).unwrap();
        assert_eq!(report.entries, 1600);
        let ids: HashSet<String> = read_lines(&path)
            .iter()
            .map(|l| serde_json::from_str::<Line>(l).unwrap().request_id)
            .collect();
        assert_eq!(ids.len(), 1600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_async_works_and_shares_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append_async(entry(i)).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        let blocking = log.clone();
        let last = tokio::task::spawn_blocking(move || blocking.append(entry(99)).unwrap())
            .await
            .unwrap();
        seqs.push(last);
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=51).collect::<Vec<_>>());
        assert_eq!(verify(log.path(), Some(&KEY)).unwrap().entries, 51);
    }

    #[test]
    fn edited_field_is_detected() {
        let (_dir, path) = log_with(5);
        let mut lines = read_lines(&path);
        lines[2] = lines[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"no\"");
        write_lines(&path, &lines);
        let err = verify(&path, None).unwrap_err();
        assert!(
            matches!(err, AuditError::BrokenChain { line: 4, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("line 4: prev hash does not match line 3"),
            "{err}"
        );
        let err = verify(&path, Some(&KEY)).unwrap_err();
        assert!(matches!(err, AuditError::BadMac { line: 3, .. }), "{err}");
        assert!(AuditLog::open(path.parent().unwrap(), &KEY).is_err());
    }

    #[test]
    fn edited_last_line_is_detected_by_the_mac() {
        let (_dir, path) = log_with(3);
        let mut lines = read_lines(&path);
        lines[2] = lines[2].replace("\"code\":200", "\"code\":500");
        write_lines(&path, &lines);
        // Nothing chains to the last line: only its MAC shows the edit.
        assert_eq!(verify(&path, None).unwrap().entries, 3);
        let err = verify(&path, Some(&KEY)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("audit log {}: line 3: MAC does not verify", path.display())
        );
    }

    #[test]
    fn removed_middle_line_is_detected() {
        let (_dir, path) = log_with(5);
        let mut lines = read_lines(&path);
        lines.remove(2);
        write_lines(&path, &lines);
        let err = verify(&path, None).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::BadSeq {
                    line: 3,
                    found: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().ends_with("line 3: seq 4, expected 3"),
            "{err}"
        );
        // Renumbering does not help: the chain breaks.
        let mut v: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        v["seq"] = 3.into();
        lines[2] = serde_json::to_string(&serde_json::from_value::<Line>(v).unwrap()).unwrap();
        write_lines(&path, &lines);
        let err = verify(&path, None).unwrap_err();
        assert!(
            matches!(err, AuditError::BrokenChain { line: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn swapped_lines_are_detected() {
        let (_dir, path) = log_with(5);
        let mut lines = read_lines(&path);
        lines.swap(1, 2);
        write_lines(&path, &lines);
        let err = verify(&path, None).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::BadSeq {
                    line: 2,
                    found: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = verify(&path, Some(&KEY)).unwrap_err();
        assert!(matches!(err, AuditError::BadSeq { line: 2, .. }), "{err}");
    }

    #[test]
    fn rewritten_chain_without_the_key_fails_only_the_mac_check() {
        let (_dir, path) = log_with(6);
        let mut lines = read_lines(&path);
        lines.remove(3);
        for (i, line) in lines.iter_mut().enumerate() {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["seq"] = (i as u64 + 1).into();
            *line = serde_json::to_string(&serde_json::from_value::<Line>(v).unwrap()).unwrap();
        }
        rehash_from(&mut lines, 3);
        write_lines(&path, &lines);
        let chain = verify(&path, None).unwrap();
        assert_eq!(chain.entries, 5);
        let err = verify(&path, Some(&KEY)).unwrap_err();
        assert!(matches!(err, AuditError::BadMac { line: 4, .. }), "{err}");
        let err = AuditLog::open(path.parent().unwrap(), &KEY).unwrap_err();
        assert!(matches!(err, AuditError::BadMac { line: 4, .. }), "{err}");
    }

    #[test]
    fn wrong_key_fails_at_line_1() {
        let (_dir, path) = log_with(2);
        let err = verify(&path, Some(&[8; 32])).unwrap_err();
        assert!(matches!(err, AuditError::BadMac { line: 1, .. }), "{err}");
    }

    #[test]
    fn non_canonical_and_garbage_lines_are_corrupt() {
        let (_dir, path) = log_with(3);
        let lines = read_lines(&path);
        let cases = [
            lines[1].replacen(",", ", ", 1),                    // spacing
            lines[1].replace("\"mac\"", "\"extra\":1,\"mac\""), // unknown field
            lines[1].replace(
                &lines[1][lines[1].len() - 66..lines[1].len() - 2],
                &"A".repeat(64),
            ), // uppercase mac
            "not json".to_string(),
            String::new(),
        ];
        for case in cases {
            let mut edited = lines.clone();
            edited[1] = case.clone();
            write_lines(&path, &edited);
            let err = verify(&path, None).unwrap_err();
            assert!(
                matches!(err, AuditError::Corrupt { line: 2, .. }),
                "{case}: {err}"
            );
        }
        // A first line must chain to 64 zeros.
        let mut edited = lines.clone();
        edited.remove(0);
        for (i, line) in edited.iter_mut().enumerate() {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["seq"] = (i as u64 + 1).into();
            *line = serde_json::to_string(&serde_json::from_value::<Line>(v).unwrap()).unwrap();
        }
        write_lines(&path, &edited);
        let err = verify(&path, None).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("line 1: prev hash does not match the start of the log (64 zeros)"),
            "{err}"
        );
    }

    #[test]
    fn reopen_continues_the_chain() {
        let (dir, path) = log_with(3);
        let head = verify(&path, Some(&KEY)).unwrap().head();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        assert_eq!(log.head(), head);
        assert_eq!(log.append(entry(4)).unwrap(), 4);
        assert_eq!(log.append(entry(5)).unwrap(), 5);
        drop(log);
        let lines = read_lines(&path);
        let fourth: Line = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(fourth.prev, head.hash);
        assert_eq!(verify(&path, Some(&KEY)).unwrap().entries, 5);
    }

    #[test]
    fn open_refuses_a_wrong_key_and_a_second_opener() {
        let (dir, _path) = log_with(2);
        let err = AuditLog::open(dir.path(), &[9; 32]).unwrap_err();
        assert!(matches!(err, AuditError::BadMac { line: 1, .. }), "{err}");
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        let err = AuditLog::open(dir.path(), &KEY).unwrap_err();
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
        drop(log);
        AuditLog::open(dir.path(), &KEY).unwrap();
    }

    #[test]
    fn torn_final_line_is_reported_and_truncated_on_open() {
        let (dir, path) = log_with(3);
        let good_len = std::fs::metadata(&path).unwrap().len();
        let lines = read_lines(&path);
        // A complete fourth line missing only its newline is still unacknowledged.
        for torn in ["{\"seq\":4,\"time_ms\":17", &lines[2]] {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(torn.as_bytes()).unwrap();
            drop(f);
            let report = verify(&path, Some(&KEY)).unwrap();
            assert_eq!(report.entries, 3);
            assert_eq!(report.torn_tail_bytes, torn.len() as u64);
            let log = AuditLog::open(dir.path(), &KEY).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
            assert_eq!(log.head().seq, 3);
            drop(log);
        }
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        assert_eq!(log.append(entry(4)).unwrap(), 4);
        drop(log);
        let report = verify(&path, Some(&KEY)).unwrap();
        assert_eq!((report.entries, report.torn_tail_bytes), (4, 0));
    }

    #[test]
    fn overlong_line_is_corrupt() {
        let (dir, path) = log_with(1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
        drop(f);
        let err = verify(&path, None).unwrap_err();
        assert!(matches!(err, AuditError::Corrupt { line: 2, .. }), "{err}");
        assert!(AuditLog::open(dir.path(), &KEY).is_err());
    }

    #[test]
    fn long_fields_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        let mut e = entry(1);
        e.appid = "é".repeat(MAX_FIELD_BYTES); // 2 bytes each: the cut falls mid-character
        log.append(e).unwrap();
        let line: Line = serde_json::from_str(&read_lines(log.path())[0]).unwrap();
        assert!(line.appid.ends_with(TRUNCATION_MARK));
        assert_eq!(line.appid.len(), MAX_FIELD_BYTES + TRUNCATION_MARK.len());
        verify(log.path(), Some(&KEY)).unwrap();
    }

    /// A real write error (ENOSPC from /dev/full, EBADF from a read-only descriptor) fails the
    /// batch and then every later append, without touching the log file.
    #[test]
    fn write_failure_fails_closed() {
        for broken in ["/dev/full", "read-only"] {
            let (dir, path) = log_with(2);
            let log = AuditLog::open(dir.path(), &KEY).unwrap();
            let bad = if broken == "read-only" {
                File::open(&path).unwrap()
            } else {
                OpenOptions::new().write(true).open(broken).unwrap()
            };
            log.send(Msg::SwapFile(bad)).unwrap();
            assert!(!log.is_failed());
            let err = log.append(entry(3)).unwrap_err();
            assert!(
                matches!(err, AuditError::WriteFailed { .. }),
                "{broken}: {err}"
            );
            assert!(log.is_failed());
            assert_eq!(log.head().seq, 2);
            let err = log.append(entry(4)).unwrap_err();
            assert!(matches!(err, AuditError::Failed { .. }), "{broken}: {err}");
            assert!(err.to_string().contains("refusing every request"), "{err}");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let err = rt.block_on(log.append_async(entry(5))).unwrap_err();
            assert!(matches!(err, AuditError::Failed { .. }), "{broken}: {err}");
            drop(log);
            assert_eq!(verify(&path, Some(&KEY)).unwrap().entries, 2);
            let log = AuditLog::open(dir.path(), &KEY).unwrap();
            assert_eq!(log.append(entry(3)).unwrap(), 3);
        }
    }

    /// Every caller waiting in a failing batch gets the error.
    #[test]
    fn write_failure_reaches_every_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        log.send(Msg::SwapFile(
            OpenOptions::new().write(true).open("/dev/full").unwrap(),
        ))
        .unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let log = log.clone();
                std::thread::spawn(move || log.append(entry(i)))
            })
            .collect();
        for t in threads {
            let err = t.join().unwrap().unwrap_err();
            assert!(
                matches!(
                    err,
                    AuditError::WriteFailed { .. } | AuditError::Failed { .. }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn audit_log_is_send_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<AuditLog>();
    }

    /// `cargo test --release -p ppml-kms-server --lib audit::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_group_commit_throughput() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        for threads in [1u64, 16, 64, 256] {
            let per_thread = 40_000 / threads;
            let start = std::time::Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        for i in 0..per_thread {
                            log.append(entry(t * per_thread + i)).unwrap();
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{threads:>4} threads: {:>8.0} appends/s",
                (threads * per_thread) as f64 / secs
            );
        }
    }

    #[test]
    #[ignore = "benchmark"]
    fn bench_open_one_million_lines() {
        let dir = tempfile::tempdir().unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &KEY);
        let mut buf = Vec::with_capacity(300 << 20);
        let mut prev = ZERO_HASH;
        let mut e = entry(0);
        e.request_id = "0190f5a2-7c1e-7b4e-9d1a-3f0c2b5e8a71".into();
        e.appid = "5b2d6c4e-1f3a-4d8b-9e7c-0a1b2c3d4e5f".into();
        e.keyid = "8c9d0e1f-2a3b-4c5d-6e7f-8091a2b3c4d5".into();
        for seq in 1..=1_000_000 {
            prev = encode_line(&mut buf, &key, seq, 1_700_000_000_000 + seq, &e, &prev).unwrap();
        }
        println!("{} bytes", buf.len());
        std::fs::write(dir.path().join(FILE_NAME), &buf).unwrap();
        let start = std::time::Instant::now();
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        println!("open (full verify): {:?}", start.elapsed());
        assert_eq!(log.head().seq, 1_000_000);
        drop(log);
        let start = std::time::Instant::now();
        verify(&dir.path().join(FILE_NAME), None).unwrap();
        println!("verify chain-only: {:?}", start.elapsed());
    }

    #[test]
    fn a_log_holds_exactly_the_heads_it_passed_through() {
        let (dir, path) = log_with(5);
        let lines = read_lines(&path);
        let head_of = |seq: u64| AuditHead {
            seq,
            hash: hex::encode(sha256(lines[seq as usize - 1].as_bytes())),
        };
        let log = AuditLog::open(dir.path(), &KEY).unwrap();
        assert_eq!(log.head(), head_of(5));
        for seq in 1..=5 {
            assert!(log.holds(&head_of(seq)).unwrap(), "{seq}");
        }
        assert!(
            log.holds(&AuditHead {
                seq: 0,
                hash: hex::encode(ZERO_HASH)
            })
            .unwrap()
        );
        // Another line at the same place, or a place beyond the log's end.
        let mut forged = head_of(3);
        forged.hash = head_of(4).hash;
        assert!(!log.holds(&forged).unwrap());
        assert!(
            !log.holds(&AuditHead {
                seq: 6,
                hash: head_of(5).hash
            })
            .unwrap()
        );
        assert!(
            !log.holds(&AuditHead {
                seq: 0,
                hash: head_of(1).hash
            })
            .unwrap()
        );
    }
}
