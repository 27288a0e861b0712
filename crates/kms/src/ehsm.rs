//! The request-signing rules of the eHSM-KMS REST protocol, shared by ppml's eHSM-compatible
//! server and its client (see `docs/kms-api.md`).
//!
//! A signed request body is a JSON object `{appid, payload, timestamp, [nonce], sign}`.
//! `sign = base64(HMAC-SHA256(apikey, canonical(body without sign)))`, where the canonical
//! string joins the non-empty top-level fields, sorted by name in byte order, as `k=v` with
//! `&`, and flattens nested objects the same way (`payload=aad=x&keyid=y`). "Empty" follows
//! eHSM's JavaScript server exactly (`value != ''`): empty strings, `null`, `false` and the
//! number 0 are left out; an object is always kept, even when empty.
//!
//! Timestamps are 13-digit Unix milliseconds, accepted within ±10 minutes of the server's
//! clock, and each (app, timestamp, nonce) may be used once in 20 minutes.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use serde_json::Value;

/// Largest accepted difference between a request's timestamp and the server clock.
pub const MAX_TIMESTAMP_SKEW_MS: u64 = 10 * 60 * 1000;
/// How long a (timestamp, nonce) stays remembered for replay detection.
pub const REPLAY_WINDOW_MS: u64 = 2 * MAX_TIMESTAMP_SKEW_MS;
/// Number of digits of a timestamp.
pub const TIMESTAMP_LEN: usize = 13;

/// Why a signed request was rejected; the `Display` text is eHSM's error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// `appid`, `timestamp` or `sign` is missing.
    #[error("Missing required parameters")]
    MissingParameters,
    /// A field has the wrong JSON type.
    #[error("param type error")]
    ParamType,
    /// The timestamp is not 13 characters.
    #[error("Timestamp length error")]
    TimestampLength,
    /// The timestamp is not a number or is outside the ±10 minute window.
    #[error("Timestamp error")]
    Timestamp,
    /// The (timestamp, nonce) was already used by this app within 20 minutes.
    #[error("Timestamp can't be repeated in 20 minutes")]
    Replay,
    /// The signature does not match.
    #[error("sign error")]
    Sign,
}

fn js_string(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Bool(false) => None,
        Value::Bool(true) => Some("true".into()),
        Value::Number(n) => {
            if n.as_f64() == Some(0.0) {
                None
            } else {
                Some(n.to_string())
            }
        }
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(canonical_entries(
            items.iter().enumerate().map(|(i, v)| (i.to_string(), v)),
        )),
        Value::Object(map) => Some(canonical_entries(map.iter().map(|(k, v)| (k.clone(), v)))),
    }
}

fn canonical_entries<'a>(entries: impl Iterator<Item = (String, &'a Value)>) -> String {
    let mut entries: Vec<(String, &Value)> = entries.collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = String::new();
    for (key, value) in entries {
        if let Some(text) = js_string(value) {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&key);
            out.push('=');
            out.push_str(&text);
        }
    }
    out
}

/// The string that is signed: every field of `body` except `sign`, canonicalised.
pub fn canonical_string(body: &serde_json::Map<String, Value>) -> String {
    canonical_entries(
        body.iter()
            .filter(|(k, _)| k.as_str() != "sign")
            .map(|(k, v)| (k.clone(), v)),
    )
}

/// `base64(HMAC-SHA256(apikey, canonical_string(body)))`.
pub fn sign(apikey: &str, body: &serde_json::Map<String, Value>) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, apikey.as_bytes());
    BASE64.encode(hmac::sign(&key, canonical_string(body).as_bytes()).as_ref())
}

/// Checks `presented` against the signature of `body`, in constant time.
pub fn verify(apikey: &str, body: &serde_json::Map<String, Value>, presented: &str) -> bool {
    let Ok(presented) = BASE64.decode(presented) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, apikey.as_bytes());
    hmac::verify(&key, canonical_string(body).as_bytes(), &presented).is_ok()
}

/// Parses and range-checks a request timestamp against `now_ms`.
pub fn check_timestamp(timestamp: &str, now_ms: u64) -> Result<u64, RequestError> {
    if timestamp.len() != TIMESTAMP_LEN {
        return Err(RequestError::TimestampLength);
    }
    let ts: u64 = timestamp.parse().map_err(|_| RequestError::Timestamp)?;
    if ts.abs_diff(now_ms) >= MAX_TIMESTAMP_SKEW_MS {
        return Err(RequestError::Timestamp);
    }
    Ok(ts)
}

/// The identity of a signed request for replay detection: the first 16 bytes of SHA-256 over
/// the length-prefixed (app id, timestamp, nonce). It is what the KMS server writes into the
/// audit entry of a signed request (`docs/kms-audit.md` §2), so that a restarted server still
/// refuses the requests of the last 20 minutes.
pub type ReplayId = [u8; 16];

/// The [`ReplayId`] of a request.
pub fn replay_id(appid: &str, timestamp: &str, nonce: Option<&str>) -> ReplayId {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [appid, timestamp, nonce.unwrap_or("")] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part.as_bytes());
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&context.finish().as_ref()[..16]);
    id
}

/// Remembers the [`ReplayId`]s of recent requests to reject replays: each is accepted once in
/// [`REPLAY_WINDOW_MS`]; since timestamps outside ±10 minutes are rejected anyway, a replay
/// can never get through once its entry has expired. O(1) per request; memory is about 50
/// bytes per request of the last 20 minutes. A collision of two 128-bit ids would only refuse
/// a fresh request as a replay.
#[derive(Debug, Default)]
pub struct ReplayCache {
    inner: Mutex<ReplayInner>,
}

#[derive(Debug, Default)]
struct ReplayInner {
    seen: HashSet<ReplayId>,
    order: VecDeque<(u64, ReplayId)>,
}

impl ReplayCache {
    /// Fails if (appid, timestamp, nonce) was recorded within the window; returns its id for
    /// [`ReplayCache::record`]. Nothing is recorded yet, so unsigned requests cannot fill the
    /// guard or spend another app's (timestamp, nonce) pairs.
    pub fn check(
        &self,
        appid: &str,
        timestamp: &str,
        nonce: Option<&str>,
        now_ms: u64,
    ) -> Result<ReplayId, RequestError> {
        let id = replay_id(appid, timestamp, nonce);
        let mut inner = self.inner.lock().expect("replay guard lock");
        inner.expire(now_ms);
        if inner.seen.contains(&id) {
            return Err(RequestError::Replay);
        }
        Ok(id)
    }

    /// Records a checked id once its request is authenticated; fails if a concurrent request
    /// with the same triple recorded it first.
    pub fn record(&self, id: ReplayId, now_ms: u64) -> Result<(), RequestError> {
        let mut inner = self.inner.lock().expect("replay guard lock");
        if !inner.seen.insert(id) {
            return Err(RequestError::Replay);
        }
        inner.order.push_back((now_ms, id));
        Ok(())
    }

    /// Remembers the ids of requests accepted before a restart (from the audit log), oldest
    /// first, each with the time it was accepted.
    pub fn preload(&self, accepted: impl IntoIterator<Item = (u64, ReplayId)>) {
        let mut inner = self.inner.lock().expect("replay guard lock");
        for (at_ms, id) in accepted {
            if inner.seen.insert(id) {
                inner.order.push_back((at_ms, id));
            }
        }
    }
}

impl ReplayInner {
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(at, old)) = self.order.front() {
            if now_ms.saturating_sub(at) <= REPLAY_WINDOW_MS {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn canonical_string_matches_the_protocol_example() {
        let b = body(json!({
            "timestamp": "1690000000000",
            "payload": {"keylen": 32, "keyid": "K", "aad": "test"},
            "appid": "ID",
            "sign": "ignored",
        }));
        assert_eq!(
            canonical_string(&b),
            "appid=ID&payload=aad=test&keyid=K&keylen=32&timestamp=1690000000000"
        );
    }

    #[test]
    fn empty_values_are_skipped_like_the_javascript_server() {
        let b = body(json!({
            "appid": "A",
            "payload": {"aad": "", "flag": false, "n": 0, "t": true, "x": null, "inner": {}},
            "nonce": "",
            "timestamp": "1",
        }));
        assert_eq!(
            canonical_string(&b),
            "appid=A&payload=inner=&t=true&timestamp=1"
        );
    }

    #[test]
    fn sign_and_verify() {
        let b =
            body(json!({"appid": "A", "payload": {"keyid": "k"}, "timestamp": "1690000000000"}));
        let s = sign("secret", &b);
        assert!(verify("secret", &b, &s));
        assert!(!verify("other", &b, &s));
        assert!(!verify("secret", &b, "not base64!"));
        let mut changed = b.clone();
        changed.insert("timestamp".into(), json!("1690000000001"));
        assert!(!verify("secret", &changed, &s));
    }

    #[test]
    fn timestamps_are_checked_like_ehsm() {
        let now = 1_690_000_000_000;
        assert_eq!(check_timestamp("1690000000000", now), Ok(now));
        assert_eq!(
            check_timestamp("169000000000", now),
            Err(RequestError::TimestampLength)
        );
        assert_eq!(
            check_timestamp("16900000000ab", now),
            Err(RequestError::Timestamp)
        );
        let late = (now + MAX_TIMESTAMP_SKEW_MS).to_string();
        assert_eq!(check_timestamp(&late, now), Err(RequestError::Timestamp));
        let early = (now - MAX_TIMESTAMP_SKEW_MS + 1).to_string();
        assert!(check_timestamp(&early, now).is_ok());
    }

    #[test]
    fn replays_are_rejected_per_app_within_the_window() {
        let cache = ReplayCache::default();
        let accept = |appid: &str, nonce: Option<&str>, now: u64| {
            let id = cache.check(appid, "1690000000000", nonce, now)?;
            cache.record(id, now)
        };
        let now = 1_690_000_000_000;
        accept("a", None, now).unwrap();
        assert_eq!(accept("a", None, now + 1), Err(RequestError::Replay));
        accept("b", None, now).unwrap();
        accept("a", Some("n1"), now).unwrap();
        // Checked but never recorded (e.g. a bad signature): the triple stays usable.
        cache.check("c", "1690000000000", None, now).unwrap();
        accept("c", None, now).unwrap();
        // Two requests checked concurrently: only the first to record wins.
        let first = cache.check("d", "1690000000000", None, now).unwrap();
        let second = cache.check("d", "1690000000000", None, now).unwrap();
        cache.record(first, now).unwrap();
        assert_eq!(cache.record(second, now), Err(RequestError::Replay));
        accept("a", None, now + REPLAY_WINDOW_MS + 1).unwrap();
        assert_eq!(
            RequestError::Replay.to_string(),
            "Timestamp can't be repeated in 20 minutes"
        );
    }

    #[test]
    fn ids_accepted_before_a_restart_are_refused_after_it() {
        let now = 1_690_000_000_000;
        let restarted = ReplayCache::default();
        restarted.preload([(now - 1000, replay_id("a", "1690000000000", Some("n")))]);
        assert_eq!(
            restarted.check("a", "1690000000000", Some("n"), now),
            Err(RequestError::Replay)
        );
        // The fields are length-prefixed: moving a boundary gives another id.
        assert_ne!(
            replay_id("ab", "1", Some("c")),
            replay_id("a", "b1", Some("c"))
        );
        assert!(
            restarted
                .check("a", "1690000000000", Some("m"), now)
                .is_ok()
        );
        assert!(
            restarted
                .check("a", "1690000000000", Some("n"), now + REPLAY_WINDOW_MS)
                .is_ok()
        );
    }
}

#[cfg(test)]
mod compat {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use serde_json::json;

    /// Cross-checks signatures with an independent Python implementation (compat/ehsm_sign.py).
    #[test]
    fn python_client_computes_the_same_signatures() {
        let script = std::path::PathBuf::from(
            // Runtime value first: a cached binary may have been built in another clone.
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .join("../../compat/ehsm_sign.py");
        let bodies = [
            json!({"appid": "ID", "payload": {"aad": "test", "keyid": "K", "keylen": 32}, "timestamp": "1690000000000"}),
            json!({"appid": "a-b", "payload": {"keyspec": "EH_AES_GCM_128", "origin": "EH_INTERNAL_KEY"}, "timestamp": "1690000000001", "nonce": "xyz"}),
            json!({"appid": "A", "payload": {"aad": "", "f": false, "n": 0, "t": true, "inner": {"z": 1, "a": "q"}, "list": ["x", "y"]}, "timestamp": "1"}),
            json!({"appid": "ü", "payload": {"plaintext": "aGVsbG8=", "Zed": "upper sorts first"}, "timestamp": "1690000000002"}),
        ];
        for body in bodies {
            let mut child = Command::new("python3")
                .arg(&script)
                .arg("api-key-1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 is installed");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(body.to_string().as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let python = String::from_utf8(out.stdout).unwrap();
            let rust = super::sign("api-key-1", body.as_object().unwrap());
            assert_eq!(python.trim(), rust, "{body}");
        }
    }
}
