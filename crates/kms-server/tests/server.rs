//! The server on loopback, driven over real HTTP: the happy path and every rejection of
//! docs/kms-api.md, each leaving the server serving and nothing stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ppml_kms_server::{ApiError, PassphraseParams, RootKey, ServerState, Store, router};
use serde_json::{Value, json};

struct Server {
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
    _runtime: tokio::runtime::Runtime,
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = RootKey::generate().unwrap();
    let mut server = start_on(dir.path(), root);
    server._dir = Some(dir);
    server
}

/// A server over the store in `dir`; dropping it stops the server and closes the store.
fn start_on(dir: &std::path::Path, root: RootKey) -> Server {
    let store = Store::open(dir, root).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(Arc::new(ServerState::new(store)));
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        addr,
        _dir: None,
        _runtime: runtime,
    }
}

/// `GET path`; the response body as text.
fn http_get_text(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

fn http(addr: SocketAddr, method: &str, action: &str, body: &[u8]) -> Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} /ehsm?Action={action} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let (status, rest) = text.split_once("\r\n").unwrap();
    assert!(status.contains(" 200 "), "HTTP status {status}");
    let body = rest.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct App {
    appid: String,
    apikey: String,
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn signed_body(app: &App, payload: Value, timestamp: u64) -> Value {
    let nonce = COUNTER
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    let mut body = json!({"appid": app.appid, "payload": payload, "timestamp": timestamp.to_string(), "nonce": nonce});
    let sign = ppml_kms::ehsm::sign(&app.apikey, body.as_object().unwrap());
    body["sign"] = json!(sign);
    body
}

/// A signed request as ppml's client sends it: the body names its action.
fn call(server: &Server, app: &App, action: &str, payload: Value) -> Value {
    let nonce = COUNTER
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    let mut body = json!({"appid": app.appid, "action": action, "payload": payload,
                          "timestamp": now_ms().to_string(), "nonce": nonce});
    let sign = ppml_kms::ehsm::sign(&app.apikey, body.as_object().unwrap());
    body["sign"] = json!(sign);
    http(server.addr, "POST", action, body.to_string().as_bytes())
}

fn enroll(server: &Server) -> App {
    let r = http(server.addr, "GET", "Enroll", b"");
    assert_eq!(r["code"], 200, "{r}");
    App {
        appid: r["result"]["appid"].as_str().unwrap().into(),
        apikey: r["result"]["apikey"].as_str().unwrap().into(),
    }
}

fn assert_error(r: &Value, message: &str) {
    assert_eq!(r["code"], 400, "{r}");
    assert_eq!(r["message"], message, "{r}");
}

#[test]
fn data_key_round_trip() {
    let server = start();
    let app = enroll(&server);
    let r = call(
        &server,
        &app,
        "CreateKey",
        json!({"keyspec": "EH_AES_GCM_256", "origin": "EH_INTERNAL_KEY"}),
    );
    assert_eq!(r["code"], 200, "{r}");
    let keyid = r["result"]["keyid"].as_str().unwrap().to_string();
    let r = call(
        &server,
        &app,
        "GenerateDataKey",
        json!({"keyid": keyid, "keylen": 32, "aad": "ds-1"}),
    );
    let plaintext = r["result"]["plaintext"].as_str().unwrap().to_string();
    let ciphertext = r["result"]["ciphertext"].as_str().unwrap().to_string();
    let r = call(
        &server,
        &app,
        "Decrypt",
        json!({"keyid": keyid, "ciphertext": ciphertext, "aad": "ds-1"}),
    );
    assert_eq!(r["result"]["plaintext"], plaintext);
    let r = call(
        &server,
        &app,
        "GenerateDataKeyWithoutPlaintext",
        json!({"keyid": keyid, "keylen": 16, "aad": ""}),
    );
    assert!(r["result"].get("plaintext").is_none());
    let r = call(
        &server,
        &app,
        "Encrypt",
        json!({"keyid": keyid, "plaintext": "aGVsbG8=", "aad": "x"}),
    );
    let c = r["result"]["ciphertext"].as_str().unwrap();
    let r = call(
        &server,
        &app,
        "Decrypt",
        json!({"keyid": keyid, "ciphertext": c, "aad": "x"}),
    );
    assert_eq!(r["result"]["plaintext"], "aGVsbG8=");
    let r = call(&server, &app, "ListKey", json!({}));
    assert_eq!(r["result"]["list"].as_array().unwrap().len(), 1);
    let r = http(server.addr, "GET", "GetVersion", b"");
    assert_eq!(r["code"], 200);
}

#[test]
fn every_bad_request_gets_its_error_and_the_server_keeps_serving() {
    let server = start();
    let app = enroll(&server);
    let other = enroll(&server);
    let keyid = call(
        &server,
        &app,
        "CreateKey",
        json!({"keyspec": "EH_AES_GCM_128"}),
    )["result"]["keyid"]
        .as_str()
        .unwrap()
        .to_string();
    let good = call(
        &server,
        &app,
        "Encrypt",
        json!({"keyid": keyid, "plaintext": "aGk=", "aad": ""}),
    );
    let ciphertext = good["result"]["ciphertext"].as_str().unwrap().to_string();

    // Wrong signature.
    let mut body = signed_body(&app, json!({"keyid": keyid, "keylen": 32}), now_ms());
    body["sign"] = json!("AAAA");
    assert_error(
        &http(
            server.addr,
            "POST",
            "GenerateDataKey",
            body.to_string().as_bytes(),
        ),
        "sign error",
    );
    // Unknown appid.
    let ghost = App {
        appid: "nobody".into(),
        apikey: "x".into(),
    };
    assert_error(&call(&server, &ghost, "ListKey", json!({})), "sign error");
    // Timestamp outside the window, and of the wrong length.
    let old = signed_body(&app, json!({}), now_ms() - 11 * 60 * 1000);
    assert_error(
        &http(server.addr, "POST", "ListKey", old.to_string().as_bytes()),
        "Timestamp error",
    );
    let mut short = signed_body(&app, json!({}), now_ms());
    short["timestamp"] = json!("123");
    assert_error(
        &http(server.addr, "POST", "ListKey", short.to_string().as_bytes()),
        "Timestamp length error",
    );
    // Replay.
    let once = signed_body(&app, json!({}), now_ms()).to_string();
    assert_eq!(
        http(server.addr, "POST", "ListKey", once.as_bytes())["code"],
        200
    );
    assert_error(
        &http(server.addr, "POST", "ListKey", once.as_bytes()),
        "Timestamp can't be repeated in 20 minutes",
    );
    // Malformed JSON, missing fields, wrong types.
    assert_error(
        &http(server.addr, "POST", "ListKey", b"{not json"),
        "param type error",
    );
    assert_error(
        &http(server.addr, "POST", "ListKey", br#"{"appid":"a"}"#),
        "Missing required parameters",
    );
    assert_error(
        &http(
            server.addr,
            "POST",
            "ListKey",
            br#"{"appid":1,"timestamp":"1","sign":"s"}"#,
        ),
        "param type error",
    );
    // Oversized body.
    let big = vec![b' '; 70 * 1024];
    assert_error(
        &http(server.addr, "POST", "ListKey", &big),
        "payload too large",
    );
    // Base64 garbage.
    assert_error(
        &call(
            &server,
            &app,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": "!!!", "aad": ""}),
        ),
        "base64 decode error",
    );
    // Another app's key.
    assert_error(
        &call(
            &server,
            &other,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": ciphertext, "aad": ""}),
        ),
        "keyid error",
    );
    assert_error(
        &call(&server, &other, "DisableKey", json!({"keyid": keyid})),
        "keyid error",
    );
    // A flipped bit in the ciphertext, and the wrong aad.
    let mut raw = base64_decode(&ciphertext);
    let last = raw.len() - 1;
    raw[last] ^= 1;
    assert_error(
        &call(
            &server,
            &app,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": base64_encode(&raw), "aad": ""}),
        ),
        "Decryption failed, Please confirm that your parameters are correct.",
    );
    assert_error(
        &call(
            &server,
            &app,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": ciphertext, "aad": "other"}),
        ),
        "Decryption failed, Please confirm that your parameters are correct.",
    );
    // A disabled key, then enabled again.
    assert_eq!(
        call(&server, &app, "DisableKey", json!({"keyid": keyid}))["code"],
        200
    );
    assert_error(
        &call(
            &server,
            &app,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": ciphertext, "aad": ""}),
        ),
        "keyid is disabled",
    );
    assert_eq!(
        call(&server, &app, "EnableKey", json!({"keyid": keyid}))["code"],
        200
    );
    // Nothing was stored by the rejected requests, and the server still serves.
    let r = call(&server, &app, "ListKey", json!({}));
    assert_eq!(r["result"]["list"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        call(&server, &other, "ListKey", json!({}))["result"]["list"],
        json!([])
    );
    let r = call(
        &server,
        &app,
        "Decrypt",
        json!({"keyid": keyid, "ciphertext": ciphertext, "aad": ""}),
    );
    assert_eq!(r["result"]["plaintext"], "aGk=");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn create_key(server: &Server, app: &App) -> String {
    let r = call(
        server,
        app,
        "CreateKey",
        json!({"keyspec": "EH_AES_GCM_256"}),
    );
    assert_eq!(r["code"], 200, "{r}");
    r["result"]["keyid"].as_str().unwrap().to_string()
}

fn ok_result(r: Value) -> Value {
    assert_eq!(r["code"], 200, "{r}");
    r["result"].clone()
}

/// The key version a ciphertext carries (bytes 1..5, big-endian).
fn version_of(ciphertext: &str) -> u32 {
    let raw = base64_decode(ciphertext);
    assert_eq!(raw[0], 1);
    u32::from_be_bytes(raw[1..5].try_into().unwrap())
}

fn encrypt(server: &Server, app: &App, keyid: &str, plaintext: &str, aad: &str) -> String {
    let r = call(
        server,
        app,
        "Encrypt",
        json!({"keyid": keyid, "plaintext": plaintext, "aad": aad}),
    );
    ok_result(r)["ciphertext"].as_str().unwrap().to_string()
}

fn decrypt(server: &Server, app: &App, keyid: &str, ciphertext: &str, aad: &str) -> Value {
    call(
        server,
        app,
        "Decrypt",
        json!({"keyid": keyid, "ciphertext": ciphertext, "aad": aad}),
    )
}

#[test]
fn rotate_and_re_encrypt() {
    let server = start();
    let app = enroll(&server);
    let other = enroll(&server);
    let keyid = create_key(&server, &app);
    let c0 = encrypt(&server, &app, &keyid, "djA=", "a");
    assert_eq!(version_of(&c0), 0);

    let r = ok_result(call(&server, &app, "RotateKey", json!({"keyid": keyid})));
    assert_eq!(r, json!({"keyid": keyid, "version": 1}));
    let c1 = encrypt(&server, &app, &keyid, "djE=", "a");
    assert_eq!(version_of(&c1), 1);
    let r = ok_result(call(
        &server,
        &app,
        "GenerateDataKeyWithoutPlaintext",
        json!({"keyid": keyid, "keylen": 32, "aad": "a"}),
    ));
    assert_eq!(version_of(r["ciphertext"].as_str().unwrap()), 1);
    // Both versions decrypt.
    assert_eq!(
        ok_result(decrypt(&server, &app, &keyid, &c0, "a"))["plaintext"],
        "djA="
    );
    assert_eq!(
        ok_result(decrypt(&server, &app, &keyid, &c1, "a"))["plaintext"],
        "djE="
    );
    let list = ok_result(call(&server, &app, "ListKey", json!({})));
    assert_eq!(list["list"][0]["keyVersion"], 1, "{list}");
    assert_eq!(list["list"][0]["keyState"], 1, "{list}");

    // ReEncrypt: the newest version, the same plaintext, no plaintext in the result.
    let r = ok_result(call(&server, &app, "RotateKey", json!({"keyid": keyid})));
    assert_eq!(r["version"], 2);
    let r = ok_result(call(
        &server,
        &app,
        "ReEncrypt",
        json!({"keyid": keyid, "ciphertext": c0, "aad": "a"}),
    ));
    assert_eq!(r.as_object().unwrap().len(), 1, "{r}");
    let c2 = r["ciphertext"].as_str().unwrap().to_string();
    assert_eq!(version_of(&c2), 2);
    assert_ne!(c2, c0);
    assert_eq!(
        ok_result(decrypt(&server, &app, &keyid, &c2, "a"))["plaintext"],
        "djA="
    );
    // ... bound to the same aad.
    assert_error(
        &decrypt(&server, &app, &keyid, &c2, "b"),
        "Decryption failed, Please confirm that your parameters are correct.",
    );

    // Rejections.
    let mut flipped = base64_decode(&c1);
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    assert_error(
        &call(
            &server,
            &app,
            "ReEncrypt",
            json!({"keyid": keyid, "ciphertext": base64_encode(&flipped), "aad": "a"}),
        ),
        "Decryption failed, Please confirm that your parameters are correct.",
    );
    assert_error(
        &call(
            &server,
            &app,
            "ReEncrypt",
            json!({"keyid": keyid, "ciphertext": c1, "aad": "wrong"}),
        ),
        "Decryption failed, Please confirm that your parameters are correct.",
    );
    assert_error(
        &call(
            &server,
            &app,
            "ReEncrypt",
            json!({"keyid": keyid, "ciphertext": "%%%", "aad": "a"}),
        ),
        "base64 decode error",
    );
    assert_error(
        &call(
            &server,
            &other,
            "ReEncrypt",
            json!({"keyid": keyid, "ciphertext": c1, "aad": "a"}),
        ),
        "keyid error",
    );
    assert_error(
        &call(&server, &other, "RotateKey", json!({"keyid": keyid})),
        "keyid error",
    );
    assert_error(
        &call(&server, &app, "RotateKey", json!({"keyid": "no-such-key"})),
        "keyid error",
    );
    assert_error(
        &call(&server, &app, "RotateKey", json!({"keyid": 7})),
        "param type error",
    );
    // A payload is required, as for the other cryptographic actions.
    let mut body = json!({"appid": app.appid, "timestamp": now_ms().to_string(), "nonce": "np"});
    body["sign"] = json!(ppml_kms::ehsm::sign(&app.apikey, body.as_object().unwrap()));
    for action in ["RotateKey", "ReEncrypt"] {
        assert_error(
            &http(server.addr, "POST", action, body.to_string().as_bytes()),
            "Missing required parameters",
        );
    }
    // The failed rotations stored nothing.
    let list = ok_result(call(&server, &app, "ListKey", json!({})));
    assert_eq!(list["list"][0]["keyVersion"], 2, "{list}");

    // A disabled key neither rotates nor re-encrypts; enabled again, it does both.
    ok_result(call(&server, &app, "DisableKey", json!({"keyid": keyid})));
    assert_error(
        &call(&server, &app, "RotateKey", json!({"keyid": keyid})),
        "keyid is disabled",
    );
    assert_error(
        &call(
            &server,
            &app,
            "ReEncrypt",
            json!({"keyid": keyid, "ciphertext": c1, "aad": "a"}),
        ),
        "keyid is disabled",
    );
    ok_result(call(&server, &app, "EnableKey", json!({"keyid": keyid})));
    let r = ok_result(call(
        &server,
        &app,
        "ReEncrypt",
        json!({"keyid": keyid, "ciphertext": c1, "aad": "a"}),
    ));
    assert_eq!(version_of(r["ciphertext"].as_str().unwrap()), 2);
    // A deleted key is gone at once (no stale cache entry).
    ok_result(call(&server, &app, "DeleteKey", json!({"keyid": keyid})));
    assert_error(&decrypt(&server, &app, &keyid, &c0, "a"), "keyid error");
}

#[test]
fn rotations_kms_id_and_root_key_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hex_key) = RootKey::generate().unwrap();
    let root = || RootKey::from_hex(&hex_key).unwrap();

    let server = start_on(dir.path(), root());
    let version = ok_result(http(server.addr, "GET", "GetVersion", b""));
    let kms_id = version["kms_id"].as_str().unwrap().to_string();
    let hex_part = kms_id.strip_prefix("ppml-kms:").unwrap();
    assert_eq!(hex_part.len(), 32);
    assert!(hex_part.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(version["version"].is_string());
    let app = enroll(&server);
    let keyid = create_key(&server, &app);
    let c0 = encrypt(&server, &app, &keyid, "b2xk", "");
    ok_result(call(&server, &app, "RotateKey", json!({"keyid": keyid})));
    let c1 = encrypt(&server, &app, &keyid, "bmV3", "");
    drop(server);

    // Another root key: refused with its own error, and nothing changes.
    let (wrong, _) = RootKey::generate().unwrap();
    let err = Store::open(dir.path(), wrong).unwrap_err();
    assert_eq!(err, ApiError::RootKeyMismatch);
    assert_eq!(
        err.to_string(),
        "the root key does not match this store (wrong root key file, env var or passphrase)"
    );
    assert_eq!(err.code(), 500);

    // The right one: same id, both versions still decrypt, new ciphertexts use version 1.
    let store = Store::open(dir.path(), root()).unwrap();
    assert_eq!(store.kms_id(), kms_id);
    drop(store);
    let server = start_on(dir.path(), root());
    let version = ok_result(http(server.addr, "GET", "GetVersion", b""));
    assert_eq!(version["kms_id"], kms_id.as_str());
    assert_eq!(
        ok_result(decrypt(&server, &app, &keyid, &c0, ""))["plaintext"],
        "b2xk"
    );
    assert_eq!(
        ok_result(decrypt(&server, &app, &keyid, &c1, ""))["plaintext"],
        "bmV3"
    );
    assert_eq!(version_of(&encrypt(&server, &app, &keyid, "eA==", "")), 1);
    drop(server);

    // Another store has another id.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(other_dir.path(), root()).unwrap();
    assert_ne!(other.kms_id(), kms_id);
}

#[test]
fn a_store_from_before_the_root_check_is_checked_against_its_apps() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hex_key) = RootKey::generate().unwrap();
    let store = Store::open(dir.path(), RootKey::from_hex(&hex_key).unwrap()).unwrap();
    store.enroll(now_ms(), None, &mut |_| Ok(())).unwrap();
    drop(store);
    // Remove the meta table, as in a store made before it existed.
    let forget_meta = || {
        let db = redb::Database::create(dir.path().join("kms.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
        assert!(tx.delete_table(meta).unwrap());
        tx.commit().unwrap();
    };
    forget_meta();
    let (wrong, _) = RootKey::generate().unwrap();
    assert_eq!(
        Store::open(dir.path(), wrong).unwrap_err(),
        ApiError::RootKeyMismatch
    );
    let store = Store::open(dir.path(), RootKey::from_hex(&hex_key).unwrap()).unwrap();
    drop(store);
    // From now on the check value decides.
    let (wrong, _) = RootKey::generate().unwrap();
    assert_eq!(
        Store::open(dir.path(), wrong).unwrap_err(),
        ApiError::RootKeyMismatch
    );
}

const CHEAP: PassphraseParams = PassphraseParams {
    memory_kib: 256,
    iterations: 1,
    parallelism: 1,
};

#[test]
fn passphrase_root_keys() {
    let salt: [u8; 16] = std::array::from_fn(|i| i as u8);
    let derive = |pass: &[u8], salt: &[u8; 16]| {
        RootKey::from_passphrase_with_params(pass, salt, CHEAP).unwrap()
    };
    // Argon2id as computed independently (Python argon2-cffi, hash_secret_raw, type ID).
    let expected =
        RootKey::from_hex("856ed52e94f434343fde91d4da3d84c3ea38770127c6b972edca8218005de2bf")
            .unwrap();
    let a = derive(b"correct horse", &salt);
    assert_eq!(*a.audit_mac_key(), *expected.audit_mac_key());
    // Deterministic for (passphrase, salt); another salt or passphrase gives another key.
    assert_eq!(
        *derive(b"correct horse", &salt).audit_mac_key(),
        *a.audit_mac_key()
    );
    let mut salt2 = salt;
    salt2[15] ^= 1;
    assert_ne!(
        *derive(b"correct horse", &salt2).audit_mac_key(),
        *a.audit_mac_key()
    );
    assert_ne!(
        *derive(b"correct horsf", &salt).audit_mac_key(),
        *a.audit_mac_key()
    );
    assert!(RootKey::from_passphrase_with_params(b"", &salt, CHEAP).is_err());
    let too_little_memory = PassphraseParams {
        memory_kib: 1,
        ..CHEAP
    };
    assert!(RootKey::from_passphrase_with_params(b"x", &salt, too_little_memory).is_err());

    // The documented default parameters (m = 64 MiB, t = 3, p = 1), checked the same way.
    assert_eq!(
        PassphraseParams::DEFAULT,
        PassphraseParams {
            memory_kib: 65536,
            iterations: 3,
            parallelism: 1
        }
    );
    let slow = RootKey::from_passphrase(b"correct horse", &salt).unwrap();
    let expected =
        RootKey::from_hex("e3c889ca40ed01e6b6771fc8a5bf16e35ad60b41c9bd5d7e6d63adf51e50b0fd")
            .unwrap();
    assert_eq!(*slow.audit_mac_key(), *expected.audit_mac_key());

    // A store made with a passphrase reopens with it, not with another salt.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), derive(b"pw", &salt)).unwrap());
    drop(Store::open(dir.path(), derive(b"pw", &salt)).unwrap());
    assert_eq!(
        Store::open(dir.path(), derive(b"pw", &salt2)).unwrap_err(),
        ApiError::RootKeyMismatch
    );

    // Salts: random, and read back from their hex form.
    let s1 = RootKey::generate_salt().unwrap();
    assert_ne!(s1, RootKey::generate_salt().unwrap());
    assert_eq!(
        RootKey::salt_from_hex(&format!("{}\n", hex::encode(s1))),
        Ok(s1)
    );
    assert!(RootKey::salt_from_hex("abcd").is_err());
    assert!(RootKey::salt_from_hex("zz").is_err());
}

#[test]
fn audit_mac_key_is_hkdf_of_the_root_key() {
    // HKDF-SHA256(salt = "", ikm = 00 01 .. 1f, info = "ppml-kms-server/v1 audit"), computed
    // independently with Python's hmac.
    let root = RootKey::from_hex(&hex::encode((0u8..32).collect::<Vec<_>>())).unwrap();
    assert_eq!(
        hex::encode(*root.audit_mac_key()),
        "449cd64af6fc8f307c9ec1d371a5fbbc4cc210e991e9fb88c2bef66b67172809"
    );
}

/// Samples of a Prometheus text exposition: (name, labels, value).
fn parse_metrics(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Default::default()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap();
                let labels = rest
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_metrics(text)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
}

#[test]
fn metrics_count_requests_by_action_and_outcome() {
    let server = start();
    let app = enroll(&server);
    let keyid = create_key(&server, &app);
    let _second = create_key(&server, &app);
    let c = encrypt(&server, &app, &keyid, "aGk=", "");
    encrypt(&server, &app, &keyid, "aGk=", "");
    assert_error(
        &decrypt(&server, &app, &keyid, &c, "other"),
        "Decryption failed, Please confirm that your parameters are correct.",
    );
    for made_up in ["NoSuchAction", "AnotherMadeUpAction"] {
        let r = call(&server, &app, made_up, json!({}));
        assert_eq!(
            (r["code"].clone(), r["message"].clone()),
            (json!(404), json!("API Not Found")),
            "{r}"
        );
    }
    ok_result(call(&server, &app, "DisableKey", json!({"keyid": keyid})));

    let text = http_get_text(server.addr, "/metrics");
    let requests = |action, outcome| {
        sample(
            &text,
            "ppml_kms_requests_total",
            &[("action", action), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("Enroll", "ok"), Some(1.0), "{text}");
    assert_eq!(requests("CreateKey", "ok"), Some(2.0), "{text}");
    assert_eq!(requests("Encrypt", "ok"), Some(2.0), "{text}");
    assert_eq!(requests("Decrypt", "decrypt_failed"), Some(1.0), "{text}");
    assert_eq!(requests("Decrypt", "ok"), None, "{text}");
    assert_eq!(requests("unknown", "unknown_action"), Some(2.0), "{text}");
    assert!(!text.contains("NoSuchAction"), "{text}");
    assert_eq!(
        sample(
            &text,
            "ppml_kms_request_duration_seconds_count",
            &[("action", "Encrypt")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "ppml_kms_request_duration_seconds_bucket",
            &[("action", "Encrypt"), ("le", "+Inf")]
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "ppml_kms_request_duration_seconds_sum",
            &[("action", "Encrypt")]
        )
        .unwrap()
            > 0.0
    );
    let keys = |state| sample(&text, "ppml_kms_keys", &[("state", state)]);
    assert_eq!(keys("enabled"), Some(1.0), "{text}");
    assert_eq!(keys("disabled"), Some(1.0), "{text}");

    // Scraping is not counted, and the key gauge follows the store.
    ok_result(call(&server, &app, "EnableKey", json!({"keyid": keyid})));
    let text = http_get_text(server.addr, "/metrics");
    assert_eq!(
        sample(&text, "ppml_kms_keys", &[("state", "enabled")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ppml_kms_keys", &[("state", "disabled")]),
        Some(0.0)
    );
    assert!(!text.contains("action=\"metrics\""));
}

#[test]
fn two_servers_in_one_process_keep_their_own_metrics() {
    let a = start();
    let b = start();
    enroll(&a);
    enroll(&a);
    enroll(&b);
    let count = |s: &Server| {
        sample(
            &http_get_text(s.addr, "/metrics"),
            "ppml_kms_requests_total",
            &[("action", "Enroll"), ("outcome", "ok")],
        )
    };
    assert_eq!(count(&a), Some(2.0));
    assert_eq!(count(&b), Some(1.0));
}

/// One keep-alive HTTP/1.1 connection.
struct KeepAlive {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        KeepAlive {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn post(&mut self, action: &str, body: &[u8]) -> Value {
        use std::io::BufRead;
        let mut request = format!(
            "POST /ehsm?Action={action} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.writer.write_all(&request).unwrap();
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    }
}

/// Throughput of GenerateDataKeyWithoutPlaintext + Decrypt over keep-alive connections, client
/// and server in this process. Run with
/// `cargo test --release -p ppml-kms-server --test server -- --ignored --nocapture bench_`.
#[test]
#[ignore = "benchmark"]
fn bench_data_key_throughput() {
    let server = start();
    let app = enroll(&server);
    let keyid = create_key(&server, &app);
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seconds = 3.0;
    let started = std::time::Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut conn = KeepAlive::connect(server.addr);
                    let mut n = 0u64;
                    while started.elapsed().as_secs_f64() < seconds {
                        let body = signed_body(
                            &app,
                            json!({"keyid": keyid, "keylen": 32, "aad": "bench"}),
                            now_ms(),
                        );
                        let r = conn.post(
                            "GenerateDataKeyWithoutPlaintext",
                            body.to_string().as_bytes(),
                        );
                        let c = r["result"]["ciphertext"].as_str().unwrap().to_string();
                        let body = signed_body(
                            &app,
                            json!({"keyid": keyid, "ciphertext": c, "aad": "bench"}),
                            now_ms(),
                        );
                        let r = conn.post("Decrypt", body.to_string().as_bytes());
                        assert_eq!(r["code"], 200, "{r}");
                        n += 2;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!("{clients} clients: {total} requests, {rate:.0} req/s");
}
