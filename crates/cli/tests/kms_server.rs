//! `ppml kms serve` as a real process: an independent Python client; no acknowledged key
//! lost when the server is killed with SIGKILL; and `docs/kms-openapi.yaml`, the OpenAPI
//! description of its REST API, held against the code: its action and error-kind lists are
//! the code's, every path it names is served, and schemathesis, driven by it against a live
//! server with most bodies validly signed (`compat/schemathesis_hooks.py`), finds no HTTP
//! 5xx, no eHSM `code` 500, no answer that is not JSON and no request that hangs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ppml_kms::protocol::{Action, ErrorKind};
use serde_json::{Value, json};

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data_dir: &std::path::Path) -> ServerProcess {
    serve_with(data_dir, &[])
}

/// `ppml kms serve` over `data_dir`, with `extra` flags. The data directory is given relative
/// to its parent, the server's working directory, as an operator types it.
fn serve_with(data_dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppml"))
        .args(["kms", "serve", "--insecure-http", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir.file_name().unwrap())
        .current_dir(data_dir.parent().unwrap())
        .env("PPML_HOME", data_dir.join("home"))
        .env_remove("PPML_KMS_ROOT_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no address in {line:?}"));
    ServerProcess { child, addr }
}

fn http(addr: SocketAddr, method: &str, action: &str, body: &str) -> std::io::Result<Value> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} /ehsm?Action={action} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("incomplete response"))?
        .1;
    serde_json::from_str(body).map_err(std::io::Error::other)
}

fn signed(appid: &str, apikey: &str, payload: Value, nonce: u64) -> String {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut body = json!({"appid": appid, "payload": payload, "timestamp": ts.to_string(), "nonce": nonce.to_string()});
    let sign = ppml_kms::ehsm::sign(apikey, body.as_object().unwrap());
    body["sign"] = json!(sign);
    body.to_string()
}

#[test]
fn independent_python_client_talks_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&dir.path().join("data"));
    let script = std::path::PathBuf::from(
        // Runtime value first: a cached binary may have been built in another clone.
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../compat/ehsm_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}", server.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn acknowledged_keys_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(&dir.path().join("data"));
    let enrolled = http(server.addr, "GET", "Enroll", "").unwrap();
    let appid = enrolled["result"]["appid"].as_str().unwrap().to_string();
    let apikey = enrolled["result"]["apikey"].as_str().unwrap().to_string();

    // A client streams CreateKey requests while the server is killed under it.
    let addr = server.addr;
    let (a, k) = (appid.clone(), apikey.clone());
    let client = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        for nonce in 0..2000u64 {
            match http(
                addr,
                "POST",
                "CreateKey",
                &signed(&a, &k, json!({"keyspec": "EH_AES_GCM_256"}), nonce),
            ) {
                Ok(r) if r["code"] == 200 => {
                    acknowledged.push(r["result"]["keyid"].as_str().unwrap().to_string())
                }
                _ => break,
            }
        }
        acknowledged
    });
    std::thread::sleep(Duration::from_millis(300));
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let acknowledged = client.join().unwrap();
    assert!(
        !acknowledged.is_empty(),
        "no key was created before the kill"
    );

    let server = serve(&dir.path().join("data"));
    let listed = http(
        server.addr,
        "POST",
        "ListKey",
        &signed(&appid, &apikey, json!({}), 10_000),
    )
    .unwrap();
    let listed: Vec<&str> = listed["result"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["keyid"].as_str().unwrap())
        .collect();
    for (i, keyid) in acknowledged.iter().enumerate() {
        assert!(
            listed.contains(&keyid.as_str()),
            "acknowledged key {keyid} lost"
        );
        let r = http(
            server.addr,
            "POST",
            "GenerateDataKeyWithoutPlaintext",
            &signed(
                &appid,
                &apikey,
                json!({"keyid": keyid, "keylen": 32}),
                20_000 + i as u64,
            ),
        )
        .unwrap();
        assert_eq!(r["code"], 200, "{r}");
    }
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spec() -> Value {
    let text = std::fs::read_to_string(repo().join("docs/kms-openapi.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).expect("docs/kms-openapi.yaml is YAML")
}

fn strings(value: &Value, pointer: &str) -> Vec<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_openapi_lists_are_the_codes() {
    let spec = spec();
    assert_eq!(
        strings(&spec, "/components/schemas/Action/enum"),
        Action::ALL.map(|a| a.name().to_string()),
        "docs/kms-openapi.yaml Action"
    );
    assert_eq!(
        strings(&spec, "/components/schemas/ErrorKind/enum"),
        ErrorKind::ALL.map(|k| k.label().to_string()),
        "docs/kms-openapi.yaml ErrorKind"
    );
    // GET serves exactly the unsigned actions that need no body.
    let get = strings(&spec, "/paths/~1ehsm/get/parameters/0/schema/enum");
    assert_eq!(get, ["Enroll", "GetVersion", "GenerateQuote"]);
    for name in get {
        assert!(Action::from_name(&name).is_some(), "{name}");
    }
}

/// HTTP status and body of `method base+path` with an empty JSON object as body (curl).
fn status_of(base: &str, method: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .args(["-H", "Content-Type: application/json"])
        .args(if method == "GET" {
            vec![]
        } else {
            vec!["-d", "{}"]
        })
        .arg(format!("{base}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn every_path_is_served_and_schemathesis_finds_no_fault() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(&dir.path().join("data"), &["--enable-bigdl-ras"]);
    let base = format!("http://{}", server.addr);
    let spec = spec();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let (status, body) = status_of(&base, &method.to_uppercase(), path);
            assert_ne!(status, 404, "{method} {path} is not served: {body}");
            assert!(status < 500, "{method} {path}: {status} {body}");
        }
    }
    // A malformed query string still gets eHSM's envelope.
    let (status, body) = status_of(&base, "GET", "/ehsm?Action=Enroll&Action=Enroll");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["code"], 400, "{answer}");

    let (_, enrolled) = status_of(&base, "GET", "/ehsm?Action=Enroll");
    let enrolled: Value = serde_json::from_str(&enrolled).unwrap();
    let st = std::env::var("PPML_SCHEMATHESIS").unwrap_or_else(|_| "st".into());
    let out = Command::new(&st)
        .arg("run")
        .arg(repo().join("docs/kms-openapi.yaml"))
        .args(["--url", &base])
        .args(["--checks", "not_a_server_error,ehsm_no_server_fault"])
        .args([
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--request-timeout",
            "10",
        ])
        // schemathesis keeps a cache in its working directory: not in the repository.
        .current_dir(dir.path())
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", repo().join("compat"))
        .env(
            "PPML_TEST_APPID",
            enrolled["result"]["appid"].as_str().unwrap(),
        )
        .env(
            "PPML_TEST_APIKEY",
            enrolled["result"]["apikey"].as_str().unwrap(),
        )
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run schemathesis ({st}: {e}): install it with `python3 -m pip install \
                 schemathesis` (scripts/test-deps does), or set PPML_SCHEMATHESIS"
            )
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.contains("Tested: 6"), "{report}");
    // The server survived it all.
    let (status, _) = status_of(&base, "GET", "/ehsm?Action=GetVersion");
    assert_eq!(status, 200);
}
