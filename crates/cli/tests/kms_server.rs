//! `ppml kms serve` as a real process: an independent Python client, and no acknowledged key
//! lost when the server is killed with SIGKILL.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppml"))
        .args([
            "kms",
            "serve",
            "--insecure-http",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
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
    let server = serve(dir.path());
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
    let mut server = serve(dir.path());
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

    let server = serve(dir.path());
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
