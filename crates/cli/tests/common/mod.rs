//! Helpers shared by the `ppml` command's integration tests (each test file is its own crate
//! and uses some of them).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ppml --quiet` with `PPML_HOME=home` and none of the caller's ppml settings.
pub fn ppml(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppml"));
    cmd.env("PPML_HOME", home).arg("--quiet");
    for var in [
        "PPML_APPID",
        "PPML_APIKEY",
        "PPML_PRIMARY_KEY",
        "PPML_OUTPUT_KEY",
        "PPML_KMS_URL",
        "PPML_KMS_FINGERPRINT",
        "PPML_KMS_FLAVOR",
        "PPML_KMS_CA_CERT",
        "PPML_KMS_ROOT_KEY",
        "PPML_KMS_PASSPHRASE",
        "PPML_CONFIG",
        "PPML_MASTER",
        "PPML_TEE",
        "PPML_ATTESTATION_POLICY",
        "PPML_CLUSTER_TLS",
        "PPML_SUBMIT_MODE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The value of a `name = "value"` line of `text` (as `ppml kms enroll` prints its
/// credentials).
pub fn printed_value(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {name} in {text:?}"))
        .to_string()
}

/// Writes to `path` a policy that accepts the simulated TEE running `mrenclave` on the
/// simulation platform `platform` (hex public key); returns `path`.
pub fn sim_policy(path: &Path, mrenclave: &str, platform: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            r#"{{"allowed": [{{"tee": "sim", "mrenclave": "{mrenclave}"}}], "allow_simulation": true, "sim_platforms": ["{platform}"]}}"#
        ),
    )
    .unwrap();
    path.to_path_buf()
}

/// The standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `cmd` and returns it with the first line of its stderr (or stdout) starting with
/// `prefix`; the rest of that stream is drained in the background.
pub fn spawn_and_read(mut cmd: Command, prefix: &str, from_stderr: bool) -> (Process, String) {
    if from_stderr {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    }
    let mut child = cmd.spawn().unwrap();
    let pipe: Box<dyn std::io::Read + Send> = if from_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let mut lines = BufReader::new(pipe).lines();
    let line = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"));
    std::thread::spawn(move || for _ in lines {});
    (Process(child), line)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port such that the ports `ppml cluster up --executors N --port BASE` uses are
/// free: the scheduler and the shuffle services (BASE..=BASE+N) and their metrics
/// (BASE+100..=BASE+100+N).
pub fn free_cluster_ports(executors: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base < 60000
            && (1..=executors)
                .chain(100..=100 + executors)
                .all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no free ports for a cluster of {executors} executors");
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Fails the test if any file under `dirs` contains one of `needles`; returns the number of
/// files checked.
pub fn assert_no_plaintext(dirs: &[PathBuf], needles: &[&[u8]]) -> usize {
    let mut files = 0;
    for dir in dirs {
        for file in files_under(dir) {
            // Ballista deletes a job's intermediate stages as soon as the job succeeds.
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            for needle in needles {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == *needle),
                    "{} holds plaintext",
                    file.display()
                );
            }
            files += 1;
        }
    }
    files
}

/// Whether process `pid` still runs (a zombie does not).
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .is_some_and(|state| state != 'Z')
}

/// `ppml generate people` (`rows`, `seed`) into `dir/people.csv`, then `encrypt` it into
/// `dir/people.enc` in `partitions` parts with `encrypt_cmd` (a `ppml` command carrying the
/// KMS settings); returns the dataset.
pub fn encrypted_people(
    home: &Path,
    dir: &Path,
    rows: u64,
    seed: u64,
    partitions: usize,
    mut encrypt_cmd: Command,
) -> PathBuf {
    let csv = dir.join("people.csv");
    run(ppml(home)
        .args(["generate", "people", "--rows", &rows.to_string()])
        .args(["--seed", &seed.to_string(), "--out"])
        .arg(&csv));
    let enc = dir.join("people.enc");
    run(encrypt_cmd
        .args(["encrypt", "--partitions", &partitions.to_string(), "--in"])
        .arg(&csv)
        .arg("--out")
        .arg(&enc));
    enc
}

/// A plain HTTP/1.0 GET: the status code and the body.
pub fn http_get(addr: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let socket = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The plaintext input bytes the executors of the local cluster in `cluster` decrypted, from
/// their metrics (`ppml_executor_input_bytes_decrypted_total`).
pub fn executors_decrypted_bytes(cluster: &Path) -> f64 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cluster.join("cluster.json")).unwrap())
            .unwrap();
    state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metrics"].as_str())
        .filter_map(|url| {
            let (addr, path) = url.strip_prefix("http://")?.split_once('/')?;
            http_get(addr, &format!("/{path}"))
                .ok()
                .map(|(_, body)| body)
        })
        .flat_map(|page| {
            page.lines()
                .filter(|l| l.starts_with("ppml_executor_input_bytes_decrypted_total "))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}
