//! The server on loopback, driven over real HTTP: the happy path and every rejection of
//! docs/kms-api.md, each leaving the server serving and nothing stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ppml_kms_server::{RootKey, ServerState, Store, router};
use serde_json::{Value, json};

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = RootKey::generate().unwrap();
    let store = Store::open(dir.path(), root).unwrap();
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
        _dir: dir,
        _runtime: runtime,
    }
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

fn call(server: &Server, app: &App, action: &str, payload: Value) -> Value {
    let body = signed_body(app, payload, now_ms());
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
        "keyid not found",
    );
    assert_error(
        &call(&server, &other, "DisableKey", json!({"keyid": keyid})),
        "keyid not found",
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
        "decrypt failed",
    );
    assert_error(
        &call(
            &server,
            &app,
            "Decrypt",
            json!({"keyid": keyid, "ciphertext": ciphertext, "aad": "other"}),
        ),
        "decrypt failed",
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
        "key is disabled",
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
