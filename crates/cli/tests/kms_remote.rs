//! The whole workflow against a real `ppml kms serve` over TLS (self-signed certificate pinned
//! by fingerprint): enroll, create-key, encrypt, query, decrypt, rotate, disable; the audit
//! log it leaves behind verifies, and an edited one does not; pyarrow reads and writes the
//! encrypted Parquet of ppml with keys of the same server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{ppml, run, stdout};

struct Server {
    child: Child,
    url: String,
    fingerprint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Stops the server with SIGTERM (a clean shutdown) and waits for it.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn serve_tls(data_dir: &Path) -> Server {
    serve_tls_with(data_dir, &[])
}

fn serve_tls_with(data_dir: &Path, extra: &[&std::ffi::OsStr]) -> Server {
    let mut child = ppml(&data_dir.join("server-home"))
        .args(["kms", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first
        .rsplit_once(' ')
        .map(|(_, url)| url.to_string())
        .filter(|url| url.starts_with("https://"))
        .unwrap_or_else(|| panic!("no https URL in {first:?}"));
    let second = lines.next().unwrap().unwrap();
    let fingerprint = second
        .strip_prefix("certificate fingerprint: ")
        .unwrap_or_else(|| panic!("no fingerprint in {second:?}"))
        .to_string();
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        url,
        fingerprint,
    }
}

struct Client {
    home: PathBuf,
    url: String,
    fingerprint: String,
    appid: String,
    apikey: String,
    primary: String,
}

impl Client {
    fn cmd(&self) -> Command {
        let mut cmd = ppml(&self.home);
        cmd.env("PPML_KMS_URL", &self.url)
            .env("PPML_KMS_FINGERPRINT", &self.fingerprint)
            .env("PPML_APPID", &self.appid)
            .env("PPML_APIKEY", &self.apikey)
            .env("PPML_PRIMARY_KEY", &self.primary);
        cmd
    }

    fn enroll(server: &Server, home: PathBuf) -> Client {
        let out = run(ppml(&home)
            .args(["kms", "enroll", "--kms-url", &server.url])
            .args(["--kms-fingerprint", &server.fingerprint]));
        let text = stdout(&out);
        let value = |name: &str| common::printed_value(&text, name);
        let mut client = Client {
            home,
            url: server.url.clone(),
            fingerprint: server.fingerprint.clone(),
            appid: value("appid"),
            apikey: value("apikey"),
            primary: String::new(),
        };
        let out = run(client.cmd().args(["kms", "create-key"]));
        client.primary = stdout(&out).trim().to_string();
        assert!(!client.primary.is_empty());
        client
    }

    /// `ppml encrypt --in input --out dir/people.enc`; returns the dataset.
    fn encrypt(&self, input: &Path, dir: &Path) -> PathBuf {
        let enc = dir.join("people.enc");
        run(self
            .cmd()
            .args(["encrypt", "--in"])
            .arg(input)
            .arg("--out")
            .arg(&enc));
        enc
    }
}

fn people(dir: &Path, rows: u32) -> PathBuf {
    let path = dir.join("people.csv");
    let mut text = String::from("name,age,job\n");
    let jobs = ["Developer", "Engineer", "Researcher"];
    for i in 0..rows {
        text.push_str(&format!(
            "n{i},{},{}\n",
            18 + i % 43,
            jobs[(i % 3) as usize]
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn workflow_against_a_tls_kms_server_with_rotation_disable_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("kms");
    let server = serve_tls(&data_dir);
    assert!(server.fingerprint.starts_with("sha256:"));
    let client = Client::enroll(&server, dir.path().join("home"));

    let input = people(dir.path(), 3000);
    let enc = dir.path().join("people.enc");
    run(client
        .cmd()
        .args(["encrypt", "--partitions", "2", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&enc));
    let result = dir.path().join("result.enc");
    run(client
        .cmd()
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&result));
    let decrypted = dir.path().join("people.out.csv");
    run(client
        .cmd()
        .args(["decrypt", "--in"])
        .arg(&enc)
        .arg("--out")
        .arg(&decrypted));
    assert_eq!(
        std::fs::read(&decrypted).unwrap(),
        std::fs::read(&input).unwrap()
    );
    let out = run(client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&result));
    let rows: Vec<String> = stdout(&out).lines().skip(1).map(str::to_string).collect();
    let expected = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let age: u32 = f[1].parse().unwrap();
            f[2] == "Developer" && (20..=40).contains(&age)
        })
        .count();
    assert_eq!(rows.len(), expected);
    assert!(expected > 0);

    // The embedded KMS cannot open data of the server (exit 4, names both KMS).
    let out = ppml(&dir.path().join("other-home"))
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // Rotation: old data still decrypts, new data is written under the new version.
    let out = run(client.cmd().args(["kms", "rotate"]));
    assert!(stdout(&out).contains("version 1"), "{}", stdout(&out));
    run(client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc));
    let enc2 = dir.path().join("people2.enc");
    run(client
        .cmd()
        .args(["encrypt", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&enc2));
    run(client
        .cmd()
        .args(["decrypt", "--out", "/dev/null", "--in"])
        .arg(&enc2));

    // A disabled key releases nothing: exit 4 with a specific message.
    run(client.cmd().args(["kms", "disable"]));
    let out = client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disabled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    run(client.cmd().args(["kms", "enable"]));
    run(client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc));

    // Another app cannot use the key.
    let other = Client::enroll(&server, dir.path().join("home2"));
    let out = other
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // A wrong pin is refused before anything is sent.
    let mut wrong = client.cmd();
    wrong.env(
        "PPML_KMS_FINGERPRINT",
        format!("sha256:{}", "00".repeat(32)),
    );
    let out = wrong.args(["kms", "list-keys"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = stdout(&run(client.cmd().args(["kms", "list-keys"])));
    assert!(listed.contains(&client.primary) && listed.contains("enabled"));

    server.stop();

    // The audit log the server wrote verifies, with and without the root key.
    let verify = |extra: &[&str]| {
        ppml(&dir.path().join("server-home"))
            .args(["kms", "audit", "verify", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = verify(&[]);
    assert!(out.status.success(), "{out:?}");
    let report = stdout(&out);
    let entries: u64 = report
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry count in {report:?}"));
    assert!(entries >= 15, "{report}");
    assert!(verify(&["--chain-only"]).status.success());

    // An edited entry is detected.
    let log = data_dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"DisableKey\"", "\"EnableKey\"", 1);
    assert_ne!(edited, text, "the log should record DisableKey");
    std::fs::write(&log, edited).unwrap();
    for extra in [&[][..], &["--chain-only"][..]] {
        let out = verify(extra);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("line "),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn quickstart_runs_against_a_kms_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_tls(&dir.path().join("kms"));
    let out = run(ppml(&dir.path().join("home"))
        .args(["quickstart", "--rows", "20000", "--workdir"])
        .arg(dir.path().join("work"))
        .env("PPML_KMS_URL", &server.url)
        .env("PPML_KMS_FINGERPRINT", &server.fingerprint));
    let text = stdout(&out);
    assert!(text.contains("KMS server"), "{text}");
    assert!(
        !dir.path().join("home/kms").exists(),
        "the embedded KMS must not be created"
    );
}

#[test]
fn server_from_a_toml_config_with_a_passphrase_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("kms");
    let home = dir.path().join("server-home");
    let passphrase = "correct horse battery staple";

    // `kms init --server` sets up the directory: a salt instead of a root key file.
    let out = run(ppml(&home)
        .args(["kms", "init", "--server", "--data-dir"])
        .arg(&data_dir)
        .env("PPML_KMS_PASSPHRASE", passphrase));
    assert!(stdout(&out).contains("certificate fingerprint: sha256:"));
    assert!(data_dir.join("root.salt").is_file());
    assert!(!data_dir.join("root.key").exists());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&data_dir.join("tls/key.pem")), 0o600);

    // Listen address, data directory and plain HTTP all come from the [server] table.
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ninsecure_http = true\n",
            data_dir.display()
        ),
    )
    .unwrap();
    let start = |passphrase: &str| {
        ppml(&home)
            .args(["--config"])
            .arg(&config)
            .args(["kms", "serve"])
            .env("PPML_KMS_PASSPHRASE", passphrase)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = start(passphrase);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line:?}");
    let out = run(ppml(&dir.path().join("client")).args(["kms", "enroll", "--kms-url", &url]));
    assert!(stdout(&out).contains("apikey"));
    let _ = child.kill();
    let _ = child.wait();

    // The wrong passphrase derives another root key: the server refuses to start.
    let out = start("wrong passphrase").wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root key does not match"), "{stderr}");
}

/// Marks the client's primary key for release to this ppml binary in the simulated TEE on the
/// platform `sim_key` (`ppml kms release-policy`); returns the policy id.
fn mark_for_this_binary(client: &Client, sim_key: &Path, dir: &Path) -> String {
    let measurement = stdout(&run(client.cmd().args(["attest", "measure"])))
        .trim()
        .to_string();
    let platform = sim_platform(client, sim_key);
    let policy_file = common::sim_policy(&dir.join("policy.json"), &measurement, &platform);
    stdout(&run(client
        .cmd()
        .args(["kms", "release-policy", "--policy"])
        .arg(&policy_file)))
    .trim()
    .to_string()
}

/// The public key of the simulation platform `key` (created if missing), as policies name it.
fn sim_platform(client: &Client, key: &Path) -> String {
    let hex = stdout(&run(client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", key)
        .args(["attest", "sim-platform"])))
    .trim()
    .to_string();
    assert_eq!(hex.len(), 64, "{hex}");
    hex
}

#[test]
fn attested_runtime_gets_keys_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let client = Client::enroll(&server, dir.path().join("home"));
    let input = people(dir.path(), 2000);
    let enc = dir.path().join("people.enc");
    run(client
        .cmd()
        .args(["encrypt", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&enc));

    // A policy that accepts exactly this ppml binary in the simulated TEE.
    let measurement = stdout(&run(client.cmd().args(["attest", "measure"])))
        .trim()
        .to_string();
    assert_eq!(measurement.len(), 64);
    let platform = sim_platform(&client, &sim_key);
    let policy_file = |name: &str, mrenclave: &str| {
        common::sim_policy(&dir.path().join(name), mrenclave, &platform)
    };
    let good = policy_file("good.json", &measurement);
    let policy = stdout(&run(client
        .cmd()
        .args(["kms", "release-policy", "--policy"])
        .arg(&good)))
    .trim()
    .to_string();

    let query = |extra: &[&str], out: &str| {
        client
            .cmd()
            .args(extra)
            .env("PPML_SIM_PLATFORM_KEY", &sim_key)
            .args(["simple-query", "--input"])
            .arg(&enc)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    // Not attested: the key is not released (exit 4), nothing is written.
    let out = query(&[], "r0.enc");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("attested runtimes"));
    assert!(!dir.path().join("r0.enc").exists());

    // Attested in the simulated TEE under the policy: the query runs. Its stdout goes to the
    // host, so it prints no preview rows.
    let out = query(&["--tee", "sim", "--attestation-policy", &policy], "r1.enc");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Attestation Success!"));
    assert!(!stdout(&out).contains("Developer"), "{}", stdout(&out));

    // Attack 8, values in errors: a row the query cannot parse. Under --tee the error names
    // its kind, never the row (the owner encrypts it: the key is marked, and the owner key
    // in this home signs the data-key request).
    let mut bad = String::from("name,age,job\n");
    for i in 0..2000 {
        bad.push_str(&format!("p{i},{},Developer\n", 20 + i % 50));
    }
    bad.push_str("alice-ssn-123-45-6789,unknown,Developer\n");
    let bad_csv = dir.path().join("bad.csv");
    std::fs::write(&bad_csv, bad).unwrap();
    let bad_enc = dir.path().join("bad.enc");
    run(client
        .cmd()
        .args(["encrypt", "--in"])
        .arg(&bad_csv)
        .arg("--out")
        .arg(&bad_enc));
    let out = client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["--tee", "sim", "--attestation-policy", &policy])
        .args(["simple-query", "--input"])
        .arg(&bad_enc)
        .arg("--output")
        .arg(dir.path().join("bad-out.enc"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let printed = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("details withheld"), "{printed}");
    assert!(!printed.contains("alice-ssn"), "{printed}");
    // A query that would print its rows is refused before it reads anything.
    let out = client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["--tee", "sim", "--attestation-policy", &policy])
        .args(["query", "--sql", "SELECT * FROM people", "--table"])
        .arg(format!("people={}", enc.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give --output"),
        "{out:?}"
    );
    let out = client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["--tee", "sim", "--attestation-policy", &policy])
        .args(["decrypt", "--out", "-", "--in"])
        .arg(dir.path().join("r1.enc"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("name,age,job\n"));

    // A policy for another binary refuses this one: the process stops before reading data.
    let other = policy_file("other.json", &"00".repeat(32));
    let other_policy = stdout(&run(client
        .cmd()
        .args(["kms", "release-policy", "--policy"])
        .arg(&other)))
    .trim()
    .to_string();
    let out = query(
        &["--tee", "sim", "--attestation-policy", &other_policy],
        "r2.enc",
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Attestation Fail! Application killed!"),
        "{stderr}"
    );
    assert!(stderr.contains("measurement not allowed"), "{stderr}");
    assert!(!dir.path().join("r2.enc").exists());
    // In debug mode it continues, but the KMS still releases nothing.
    let out = query(
        &[
            "--tee",
            "sim",
            "--attestation-policy",
            &other_policy,
            "--attestation-debug",
        ],
        "r3.enc",
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ERROR: Attestation Fail! In debug mode, continue.")
    );
    assert!(!dir.path().join("r3.enc").exists());

    // Evidence from a simulation platform the server does not trust is refused, even under
    // the policy that accepts this binary.
    let mut untrusted = client.cmd();
    let out = untrusted
        .env(
            "PPML_SIM_PLATFORM_KEY",
            dir.path().join("other-platform.pk8"),
        )
        .args(["--tee", "sim", "--attestation-policy", &other_policy])
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(dir.path().join("r5.enc"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Attestation Fail!"), "{stderr}");
    assert!(stderr.contains("does not verify"), "{stderr}");
}

/// `ppml attest policy new|check|upload|get`, `kms release-policy --policy-id`, and an owner
/// output key: an attested query writes its result under a key that is not released to
/// runtimes, so the owner decrypts the result without a TEE, but not the input.
#[test]
fn attestation_policies_and_an_owner_output_key() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let client = Client::enroll(&server, dir.path().join("home"));

    // Without --sim-platform, the policy names the platform of --sim-platform-key.
    let policy_json = stdout(&run(client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["attest", "policy", "new", "--tee", "sim", "--this-binary"])));
    let policy: serde_json::Value = serde_json::from_str(&policy_json).unwrap();
    let measurement = stdout(&run(client.cmd().args(["attest", "measure"])));
    assert_eq!(policy["allowed"][0]["mrenclave"], measurement.trim());
    assert_eq!(policy["allow_simulation"], true);
    assert_eq!(
        policy["sim_platforms"],
        serde_json::json!([sim_platform(&client, &sim_key)])
    );
    assert_eq!(
        policy["accepted_tcb_statuses"],
        serde_json::json!(["UpToDate"])
    );
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, &policy_json).unwrap();
    let checked = stdout(&run(client
        .cmd()
        .args(["attest", "policy", "check"])
        .arg(&policy_file)));
    assert_eq!(checked, policy_json);
    let id = stdout(&run(client
        .cmd()
        .args(["attest", "policy", "upload"])
        .arg(&policy_file)))
    .trim()
    .to_string();
    let stored = stdout(&run(client.cmd().args(["attest", "policy", "get", &id])));
    assert_eq!(stored, policy_json);
    run(client
        .cmd()
        .args(["kms", "release-policy", "--policy-id", &id]));
    let output_key = stdout(&run(client.cmd().args(["kms", "create-key"])))
        .trim()
        .to_string();

    let enc = client.encrypt(&people(dir.path(), 3000), dir.path());
    let result = dir.path().join("result.enc");
    run(client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["--tee", "sim", "--attestation-policy", &id])
        .args(["--output-key", &output_key])
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&result));
    // The owner, outside any TEE: the result opens, the input does not.
    let out = run(client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&result));
    let text = stdout(&out);
    assert!(text.starts_with("name,age,job\n"), "{text}");
    assert_eq!(
        text.lines().count() - 1,
        (0..3000u32)
            .filter(|i| i % 3 == 0 && (20..=40).contains(&(18 + i % 43)))
            .count()
    );
    let out = client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&enc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(out.stdout.is_empty());

    // Bad policies are refused before anything is uploaded.
    for (args, expected) in [
        (vec!["--tee", "sgx"], "needs --mrenclave or --mrsigner"),
        (vec!["--tee", "sgx", "--mrenclave", "zz"], "is not hex"),
        (vec!["--tee", "tdx", "--mrtd", "00"], "must be 48 bytes"),
        (
            vec!["--tee", "sgx", "--this-binary"],
            "use it with --tee sim",
        ),
    ] {
        let out = client
            .cmd()
            .args(["attest", "policy", "new"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"allowed": []}"#).unwrap();
    let out = client
        .cmd()
        .args(["attest", "policy", "upload"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("allows no runtime"));
    let out = ppml(dir.path())
        .args(["attest", "policy", "get", &id])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kms-url"));
}

/// Attacks 2, 3/8b, 4c and 7 with the release build, as the host runs them: it holds the app
/// credentials (not the owner key), runs the attested binary, and controls storage. An
/// attested job runs only under the owner's grant, does only what the grant names, reads only
/// the granted version of its inputs, and shows counts only if the grant says so.
#[test]
fn attack_jobs_outside_the_owners_grant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let owner = Client::enroll(&server, dir.path().join("owner-home"));
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let enc = owner.encrypt(&people(dir.path(), 2000), &data);
    let measurement = stdout(&run(owner.cmd().args(["attest", "measure"])))
        .trim()
        .to_string();
    let platform = sim_platform(&owner, &sim_key);
    let policy_path = dir.path().join("policy.json");
    std::fs::write(
        &policy_path,
        format!(
            r#"{{"allowed": [{{"tee": "sim", "mrenclave": "{measurement}"}}], "allow_simulation": true, "sim_platforms": ["{platform}"]}}"#
        ),
    )
    .unwrap();
    let policy = stdout(&run(owner
        .cmd()
        .args(["kms", "release-policy", "--policy"])
        .arg(&policy_path)))
    .trim()
    .to_string();
    let output_key = stdout(&run(owner.cmd().args(["kms", "create-key"])))
        .trim()
        .to_string();

    // The host: the same credentials in a home without the owner key.
    let host = Client {
        home: dir.path().join("host-home"),
        url: owner.url.clone(),
        fingerprint: owner.fingerprint.clone(),
        appid: owner.appid.clone(),
        apikey: owner.apikey.clone(),
        primary: owner.primary.clone(),
    };
    std::fs::create_dir(&host.home).unwrap();
    let attested = |client: &Client, args: &[&str]| {
        client
            .cmd()
            .env("PPML_SIM_PLATFORM_KEY", &sim_key)
            .args(["--tee", "sim", "--attestation-policy", &policy])
            .args(["--output-key", &output_key])
            .args(args)
            .output()
            .unwrap()
    };
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let enc_text = enc.to_string_lossy().into_owned();
    // SimpleQuery of the dataset into `output`, with `extra` arguments (a grant).
    let simple_query = |extra: &[&str], output: &str, more: &[&str]| {
        let out = path(output);
        let mut args = extra.to_vec();
        args.extend([
            "simple-query",
            "--input",
            enc_text.as_str(),
            "--output",
            &out,
        ]);
        args.extend_from_slice(more);
        attested(&host, &args)
    };
    let refused = |out: &std::process::Output, what: &str, output: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{what}: {out:?}");
        assert!(stderr.contains("grant"), "{what}: {stderr}");
        assert!(!dir.path().join(output).exists(), "{what}");
    };

    // Attack 2: a job nobody granted.
    let out = simple_query(&[], "r0.enc", &[]);
    refused(&out, "no grant", "r0.enc");

    // The owner grants one SimpleQuery, pinned to the dataset as it is now.
    let grant = path("job.grant");
    run(owner
        .cmd()
        .args(["--output-key", &output_key])
        .args([
            "grant",
            "--out",
            &grant,
            "simple-query",
            "--input",
            &enc_text,
        ])
        .args(["--output", &path("granted.enc")]));
    let with_grant = |args: &[&str]| {
        let mut all = vec!["--grant", grant.as_str()];
        all.extend_from_slice(args);
        attested(&host, &all)
    };
    // Attack 2 with the grant: another application, another output, the input overwritten
    // (attack 4c).
    let table = format!("people={enc_text}");
    let out = with_grant(&[
        "query",
        "--sql",
        "SELECT * FROM people",
        "--table",
        &table,
        "--output",
        &path("all.enc"),
    ]);
    refused(&out, "other SQL", "all.enc");
    let out = simple_query(&["--grant", &grant], "elsewhere.enc", &[]);
    refused(&out, "other output", "elsewhere.enc");
    let out = with_grant(&[
        "simple-query",
        "--input",
        &enc_text,
        "--output",
        &enc_text,
        "--overwrite",
    ]);
    assert_eq!(out.status.code(), Some(4), "input overwritten: {out:?}");
    assert!(enc.join("_manifest.ppml.json").exists());

    // The granted job runs; attack 3/8b: no counts leave the runtime.
    let out = simple_query(&["--grant", &grant], "granted.enc", &[]);
    assert!(out.status.success(), "{out:?}");
    let printed = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(!printed.contains("count(name)"), "{printed}");
    assert!(!printed.contains(" rows"), "{printed}");
    // The owner reads the result.
    let result = stdout(&run(owner.cmd().args([
        "decrypt",
        "--out",
        "-",
        "--in",
        &path("granted.enc"),
    ])));
    assert!(result.starts_with("name,age,job\n"), "{result}");

    // Attack 7: the host keeps this version, the owner writes a new one and grants a job on
    // it, the host puts the old one back. A new version is a new dataset (its own id), so the
    // old one is refused as a dataset the grant does not name; a version of the same id with
    // another manifest is refused by the pin (`crates/kms-server/tests/attacks.rs`
    // `attack_a_rolled_back_dataset_is_refused_under_a_pinning_grant`).
    let old = dir.path().join("people.old");
    copy_dir(&enc, &old);
    run(owner
        .cmd()
        .args(["encrypt", "--overwrite", "--in"])
        .arg(people(dir.path(), 1000))
        .arg("--out")
        .arg(&enc));
    let v2 = dir.path().join("people.v2");
    copy_dir(&enc, &v2);
    let grant_v2 = path("v2.grant");
    run(owner
        .cmd()
        .args(["--output-key", &output_key, "--reveal-counts"])
        .args([
            "grant",
            "--out",
            &grant_v2,
            "simple-query",
            "--input",
            &enc_text,
        ])
        .args(["--output", &path("v2.enc")]));
    std::fs::remove_dir_all(&enc).unwrap();
    copy_dir(&old, &enc);
    let out = simple_query(&["--grant", &grant_v2], "v2.enc", &[]);
    refused(&out, "rolled back", "v2.enc");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not an input of job"),
        "{out:?}"
    );
    // With the granted version back, the job runs, and this grant shows counts.
    std::fs::remove_dir_all(&enc).unwrap();
    copy_dir(&v2, &enc);
    let out = simple_query(&["--grant", &grant_v2], "v2.enc", &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("count(name): 1000"), "{out:?}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A KMS in the (simulated) TEE starts sealed and proves itself over TLS: its owner unseals
/// it with `ppml kms unseal`, which pins the root id in the KMS policy; a client with
/// `--kms-policy` then enrolls and works with it; the same client refuses a KMS outside a TEE
/// (exit 4) and sends it nothing that needs a credential. The root key and the TLS key are
/// nowhere on the KMS's disk.
#[test]
fn clients_verify_the_kms_before_trusting_it() {
    let dir = tempfile::tempdir().unwrap();
    let kms_platform = dir.path().join("kms-platform.pk8");
    let in_tee = serve_tls_with(
        &dir.path().join("kms"),
        &[
            "--tee".as_ref(),
            "sim".as_ref(),
            "--sim-platform-key".as_ref(),
            kms_platform.as_os_str(),
        ],
    );
    let home = dir.path().join("home");
    let platform = stdout(&run(ppml(&home)
        .env("PPML_SIM_PLATFORM_KEY", &kms_platform)
        .args(["attest", "sim-platform"])))
    .trim()
    .to_string();
    let policy = stdout(&run(ppml(&home).args([
        "attest",
        "policy",
        "new",
        "--tee",
        "sim",
        "--this-binary",
        "--sim-platform",
        &platform,
    ])));
    let policy_file = dir.path().join("kms-policy.json");
    std::fs::write(&policy_file, policy).unwrap();

    // No fingerprint: the certificate a KMS's quote binds is the one trusted.
    let verified = |server: &Server, home: &Path| {
        ppml(home)
            .args(["kms", "enroll", "--kms-url", &server.url])
            .arg("--kms-policy")
            .arg(&policy_file)
            .output()
            .unwrap()
    };
    let sealed = verified(&in_tee, &home);
    assert!(!sealed.status.success(), "{sealed:?}");
    assert!(
        String::from_utf8_lossy(&sealed.stderr).contains("the KMS is sealed"),
        "{sealed:?}"
    );

    let owner = dir.path().join("owner");
    std::fs::create_dir_all(&owner).unwrap();
    let root_key_file = owner.join("root.key");
    let unseal = |extra: &[&str]| {
        ppml(&home)
            .args(["kms", "unseal", "--kms-url", &in_tee.url])
            .arg("--kms-policy")
            .arg(&policy_file)
            .arg("--root-key-file")
            .arg(&root_key_file)
            .args(extra)
            .output()
            .unwrap()
    };
    let missing = unseal(&[]);
    assert!(!missing.status.success(), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--create"),
        "{missing:?}"
    );
    let unsealed = unseal(&["--create", "--pin"]);
    assert!(unsealed.status.success(), "{unsealed:?}");
    let root_id = stdout(&unsealed)
        .lines()
        .find_map(|l| l.strip_prefix("root id: "))
        .expect("the root id is printed")
        .to_string();
    let pinned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&policy_file).unwrap()).unwrap();
    assert_eq!(pinned["kms_root_ids"][0], root_id.as_str());
    // The owner keeps the KMS's audit head beside the root key, for the next unseal.
    let head: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(owner.join("root.key.audit-head.json")).unwrap(),
    )
    .unwrap();
    assert!(head["seq"].as_u64().unwrap() >= 1, "{head}");
    assert_eq!(head["hash"].as_str().unwrap().len(), 64, "{head}");
    assert!(
        stdout(&unsealed).contains("audit head: entry"),
        "{unsealed:?}"
    );
    // Again: the KMS already holds this root key.
    let again = unseal(&[]);
    assert!(again.status.success(), "{again:?}");
    assert!(
        stdout(&again).contains("already holds this root key"),
        "{again:?}"
    );

    let enrolled = verified(&in_tee, &home);
    assert!(enrolled.status.success(), "{enrolled:?}");
    assert!(stdout(&enrolled).contains("appid = "), "{enrolled:?}");

    // Nor is its TLS key: the certificate is made in memory at each start.
    assert!(!dir.path().join("kms/tls").exists());
    // The root key is not on the KMS's disk, in hex or in bytes.
    let root_hex = std::fs::read_to_string(&root_key_file)
        .unwrap()
        .trim()
        .to_string();
    let root_bytes = hex::decode(&root_hex).unwrap();
    for entry in walk(dir.path()) {
        if entry.starts_with(&owner) {
            continue;
        }
        let content = std::fs::read(&entry).unwrap();
        assert!(
            !contains(&content, root_hex.as_bytes()) && !contains(&content, &root_bytes),
            "the root key is in {}",
            entry.display()
        );
    }

    let outside = serve_tls(&dir.path().join("plain-kms"));
    let other_home = dir.path().join("other-home");
    let refused = verified(&outside, &other_home);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the KMS is not trusted") && stderr.contains("does not run in a TEE"),
        "{stderr}"
    );
    assert!(!other_home.join("config.toml").exists());
}

/// pyarrow reads the Parquet ppml writes and writes Parquet ppml imports, both encrypted with
/// Parquet Modular Encryption under keys of this KMS server (compat/pme_interop.py, a pyarrow
/// KmsClient written from docs/file-format.md §12 and docs/kms-api.md).
#[test]
fn pyarrow_reads_and_writes_ppml_encrypted_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_tls(&dir.path().join("kms"));
    let client = Client::enroll(&server, dir.path().join("home"));
    let secret = stdout(&run(client.cmd().args(["kms", "create-key"])))
        .trim()
        .to_string();
    let input = people(dir.path(), 5000);
    let script = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../compat/pme_interop.py");
    let python = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("python3")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pme_interop.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let kms_args = |verb: &str| -> Vec<std::ffi::OsString> {
        [
            verb,
            &client.url,
            &client.fingerprint,
            &client.appid,
            &client.apikey,
        ]
        .iter()
        .map(|s| s.into())
        .collect()
    };
    let sorted_rows = |csv: &str| {
        let mut rows: Vec<String> = csv.lines().skip(1).map(|l| l.replace('"', "")).collect();
        rows.sort();
        rows
    };
    let expected = sorted_rows(&std::fs::read_to_string(&input).unwrap());

    // ppml writes, with the name column under a key of its own; pyarrow reads every row.
    let enc = dir.path().join("people.pq.enc");
    run(client
        .cmd()
        .args(["encrypt", "--to", "parquet", "--partitions", "2"])
        .args(["--column-key", &format!("name={secret}"), "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&enc));
    let mut args = kms_args("read");
    for part in ["part-00000.parquet", "part-00001.parquet"] {
        args.push(enc.join(part).into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let read = String::from_utf8(python(&args)).unwrap();
    assert_eq!(sorted_rows(&read), expected);

    // pyarrow writes; ppml imports the file into a dataset and queries it.
    let written = dir.path().join("py.parquet");
    let mut args = kms_args("write");
    args.push(client.primary.clone().into());
    args.push("pyarrow-import".into());
    args.push(input.clone().into());
    args.push(written.clone().into());
    args.push(format!("name={secret}").into());
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    python(&args);
    // Encrypted footer: the file starts (and ends) with the PME magic.
    assert_eq!(&std::fs::read(&written).unwrap()[..4], b"PARE");
    let imported = dir.path().join("imported.enc");
    run(client
        .cmd()
        .args(["encrypt", "--to", "parquet", "--in"])
        .arg(&written)
        .arg("--out")
        .arg(&imported));
    let out = run(client
        .cmd()
        .args(["query", "--table"])
        .arg(format!("t={}", imported.display()))
        .args([
            "--sql",
            "SELECT count(*) AS n, sum(age) AS s, min(name) AS m FROM t",
        ]));
    let sum: u64 = expected
        .iter()
        .map(|r| r.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    let min = expected
        .iter()
        .map(|r| r.split(',').next().unwrap())
        .min()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains(&format!("| {} ", expected.len()))
            && text.contains(&format!("| {sum} "))
            && text.contains(min),
        "{text}"
    );
}

/// BigDL PPML datasets made by an independent writer (compat/bigdl_writer.py, written from
/// BigDL's layout) import into ppml datasets with the same rows: data keys from this server
/// standing in for BigDL's eHSM (GenerateDataKeyWithoutPlaintext and Decrypt with aad
/// "test"), or from BigDL's no-KMS mode. Each part's HMAC trailer is verified: a flipped byte
/// is refused and leaves nothing; nativeaescbc (no MAC) needs --allow-unauthenticated.
#[test]
fn bigdl_datasets_import_verified_and_query_to_the_same_rows() {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let server = serve_tls(&dir.path().join("kms"));
    let client = Client::enroll(&server, dir.path().join("home"));
    let bigdl_key = stdout(&run(client.cmd().args(["kms", "create-key"])))
        .trim()
        .to_string();
    let primary_key_file = dir.path().join("primaryKey");
    std::fs::write(&primary_key_file, format!("{bigdl_key}\n")).unwrap();
    let input = people(dir.path(), 3000);
    let sorted_rows = |csv: &str| {
        let mut rows: Vec<String> = csv
            .lines()
            .filter(|l| *l != "name,age,job")
            .map(str::to_string)
            .collect();
        rows.sort();
        rows
    };
    let expected = sorted_rows(&std::fs::read_to_string(&input).unwrap());
    let writer =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../compat/bigdl_writer.py");
    let write_bigdl = |variant: &str, out: &Path, keys: &[&OsStr]| {
        let result = Command::new("python3")
            .arg(&writer)
            .args(["--variant", variant, "--parts", "3", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(out)
            .args(keys)
            .output()
            .unwrap();
        assert!(
            result.status.success(),
            "bigdl_writer.py {variant}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    };
    let from_kms: Vec<std::ffi::OsString> = [
        "--kms",
        &client.url,
        &client.fingerprint,
        &client.appid,
        &client.apikey,
        &bigdl_key,
    ]
    .iter()
    .map(|s| s.into())
    .collect();
    let from_kms: Vec<&OsStr> = from_kms.iter().map(|s| s.as_os_str()).collect();
    let import = |bigdl: &Path, out: &Path, extra: &[&OsStr]| {
        client
            .cmd()
            .args(["import", "bigdl", "--in"])
            .arg(bigdl)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let decrypted_rows = |dataset: &Path| {
        let out = run(client
            .cmd()
            .args(["decrypt", "--out", "-", "--in"])
            .arg(dataset));
        sorted_rows(&stdout(&out))
    };
    let key_path: Vec<&OsStr> = vec![
        OsStr::new("--primary-key-path"),
        primary_key_file.as_os_str(),
    ];

    // common (BigDL 2.3+), data key from the KMS; the query runs over the imported dataset.
    let common = dir.path().join("bigdl-common");
    write_bigdl("common", &common, &from_kms);
    assert!(common.join(".meta").is_file());
    let imported = dir.path().join("common.enc");
    let out = import(&common, &imported, &key_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(decrypted_rows(&imported), expected);
    let count = run(client
        .cmd()
        .args(["query", "--table"])
        .arg(format!("people={}", imported.display()))
        .args([
            "--sql",
            "SELECT count(*) AS n FROM people WHERE job = 'Developer'",
        ]));
    let developers = expected
        .iter()
        .filter(|r| r.ends_with(",Developer"))
        .count();
    assert!(
        stdout(&count).contains(&format!("| {developers} ")),
        "{}",
        stdout(&count)
    );

    // NDJSON parts (`part-….json.cbc`, Spark's `write.json`) import as an NDJSON dataset.
    let json_input = dir.path().join("people.json");
    let json_lines: String = expected
        .iter()
        .map(|row| {
            let f: Vec<&str> = row.split(',').collect();
            format!(
                "{{\"name\":\"{}\",\"age\":{},\"job\":\"{}\"}}\n",
                f[0], f[1], f[2]
            )
        })
        .collect();
    std::fs::write(&json_input, json_lines).unwrap();
    let json_bigdl = dir.path().join("bigdl-json");
    let result = Command::new("python3")
        .arg(&writer)
        .args(["--variant", "common", "--parts", "2", "--in"])
        .arg(&json_input)
        .arg("--out")
        .arg(&json_bigdl)
        .args(&from_kms)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let imported = dir.path().join("json.enc");
    let out = import(&json_bigdl, &imported, &key_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counted = run(client
        .cmd()
        .args(["query", "--table"])
        .arg(format!("people={}", imported.display()))
        .args(["--sql", "SELECT count(*) AS n, sum(age) AS s FROM people"]));
    let sum: u64 = expected
        .iter()
        .map(|r| r.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        stdout(&counted).contains(&format!("| {} ", expected.len()))
            && stdout(&counted).contains(&format!("| {sum} ")),
        "{}",
        stdout(&counted)
    );

    // 2.2, wrapped key in BigDL's dataKey file; the variant is detected.
    let legacy = dir.path().join("bigdl-2.2");
    let data_key_file = dir.path().join("dataKey-2.2");
    let mut keys = from_kms.clone();
    keys.extend([OsStr::new("--data-key-file"), data_key_file.as_os_str()]);
    write_bigdl("2.2", &legacy, &keys);
    let imported = dir.path().join("legacy22.enc");
    let mut args = key_path.clone();
    args.extend([OsStr::new("--data-key-path"), data_key_file.as_os_str()]);
    let out = import(&legacy, &imported, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(decrypted_rows(&imported), expected);

    // 2.1 in BigDL's no-KMS mode (plaintext primary key); detected as 2.1 after 2.2 fails.
    let primary_plaintext = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let legacy = dir.path().join("bigdl-2.1");
    let data_key_file = dir.path().join("dataKey-2.1");
    write_bigdl(
        "2.1",
        &legacy,
        &[
            OsStr::new("--primary-key-plaintext"),
            OsStr::new(primary_plaintext),
            OsStr::new("--data-key-file"),
            data_key_file.as_os_str(),
        ],
    );
    let imported = dir.path().join("legacy21.enc");
    let out = import(
        &legacy,
        &imported,
        &[
            OsStr::new("--primary-key-plaintext"),
            OsStr::new(primary_plaintext),
            OsStr::new("--data-key-path"),
            data_key_file.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(decrypted_rows(&imported), expected);

    // nativeaescbc has no MAC: refused unless asked, then imported with a warning.
    let native = dir.path().join("bigdl-native");
    write_bigdl("nativeaescbc", &native, &from_kms);
    let imported = dir.path().join("native.enc");
    let mut args = key_path.clone();
    args.extend([OsStr::new("--variant"), OsStr::new("nativeaescbc")]);
    let out = import(&native, &imported, &args);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-unauthenticated"));
    assert!(!imported.exists());
    args.push(OsStr::new("--allow-unauthenticated"));
    let out = import(&native, &imported, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT verified"));
    assert_eq!(decrypted_rows(&imported), expected);

    // Attack: a flipped ciphertext byte in the second part. BigDL itself would read it; ppml
    // refuses it (bad input) and leaves no dataset, not even the first part.
    let mut parts: Vec<_> = std::fs::read_dir(&common)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".csv.cbc"))
        .collect();
    parts.sort();
    let mut bytes = std::fs::read(&parts[1]).unwrap();
    let middle = 400 + (bytes.len() - 432) / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&parts[1], bytes).unwrap();
    let imported = dir.path().join("tampered.enc");
    let out = import(&common, &imported, &key_path);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HMAC trailer does not match"), "{stderr}");
    assert!(!imported.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("tampered"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A wrong primary key unwraps nothing (access denied).
    let out = import(
        &common,
        &imported,
        &[OsStr::new("--primary-key-id"), OsStr::new(&client.primary)],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// ppml's server as a drop-in eHSM for BigDL's attestation client: a client that behaves as
/// BigDL's EHSMAttestationService (compat/bigdl_attestation_client.py: `sign` read as a
/// string, `result` as an int) accepts a good quote and rejects a tampered one, one of another
/// runtime, and one judged by a policy that does not allow it.
#[test]
fn bigdls_ehsm_attestation_client_accepts_good_quotes_and_rejects_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let client = Client::enroll(&server, dir.path().join("home"));
    let measurement = stdout(&run(client.cmd().args(["attest", "measure"])))
        .trim()
        .to_string();
    let platform = sim_platform(&client, &sim_key);
    let upload = |name: &str, mrenclave: &str| {
        let path = common::sim_policy(&dir.path().join(name), mrenclave, &platform);
        stdout(&run(client
            .cmd()
            .args(["attest", "policy", "upload"])
            .arg(&path)))
        .trim()
        .to_string()
    };
    let this_binary = upload("this.json", &measurement);
    let another_binary = upload("other.json", &"ab".repeat(32));
    let quote = stdout(&run(client
        .cmd()
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args([
            "--tee",
            "sim",
            "attest",
            "quote",
            "--report-data",
            "0badc0de",
        ])))
    .trim()
    .to_string();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../compat/bigdl_attestation_client.py");
    let bigdl_client = |quote: &str, policy: &str| {
        Command::new("python3")
            .arg(&script)
            .args([&client.url, &client.appid, &client.apikey, quote, policy])
            .output()
            .unwrap()
    };
    let out = bigdl_client(&quote, &this_binary);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("Attestation Success!"), "{out:?}");

    // A flipped byte of the report data: the platform signature no longer holds.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut tampered = b64.decode(&quote).unwrap();
    // Attack, the quote command as an oracle: the report data (sim quote bytes 38..102) are
    // never the bytes asked for, so no such quote answers a key-release challenge.
    let report_data = &tampered[38..102];
    assert!(
        !report_data.starts_with(&[0x0b, 0xad, 0xc0, 0xde]),
        "{report_data:?}"
    );
    assert!(report_data[32..].iter().any(|&b| b != 0));
    tampered[40] ^= 0x01;
    for (quote, policy) in [
        (b64.encode(&tampered), this_binary.as_str()),
        (quote.clone(), another_binary.as_str()),
    ] {
        let out = bigdl_client(&quote, policy);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stdout(&out).contains("Attestation Fail! Application killed!"),
            "{out:?}"
        );
    }
}

/// BigDL's attestation variables set up a ppml runtime as they set up BigDL's: the KMS from
/// `ATTESTATION_URL` (`host:port`), the app from `APP_ID`/`API_KEY`, the policy from
/// `ATTESTATION_POLICYID`, the TEE from `QUOTE_TYPE`; the outcome goes to stdout as BigDL
/// prints it, and a failure exits with 1 before anything is read.
#[test]
fn bigdl_attestation_variables_attest_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let client = Client::enroll(&server, dir.path().join("home"));
    let enc = client.encrypt(&people(dir.path(), 500), dir.path());
    let policy = mark_for_this_binary(&client, &sim_key, dir.path());
    let host_port = server.url.strip_prefix("https://").unwrap().to_string();
    // Only the TLS pin and the primary key come from ppml's own variables.
    let bigdl_runtime = |vars: &[(&str, &str)], out: &str| {
        let mut cmd = ppml(&client.home);
        cmd.env("PPML_KMS_FINGERPRINT", &client.fingerprint)
            .env("PPML_PRIMARY_KEY", &client.primary)
            .env("PPML_SIM_PLATFORM_KEY", &sim_key)
            .env("ATTESTATION", "true")
            .env("ATTESTATION_URL", &host_port)
            .env("APP_ID", &client.appid)
            .env("API_KEY", &client.apikey)
            .env("ATTESTATION_POLICYID", &policy)
            .env("ATTESTATION_TYPE", "EHSMAttestationService");
        for (name, value) in vars {
            cmd.env(name, value);
        }
        cmd.args(["simple-query", "--input"])
            .arg(&enc)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };

    // The simulated TEE (ppml's own PPML_TEE wins over QUOTE_TYPE): attested, the job runs.
    let out = bigdl_runtime(&[("QUOTE_TYPE", "gramine"), ("PPML_TEE", "sim")], "ok.enc");
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("Attestation Success!"), "{out:?}");
    assert!(dir.path().join("ok.enc").is_dir());

    // QUOTE_TYPE=gramine outside SGX: no evidence, BigDL's failure line, exit 1, no output.
    let out = bigdl_runtime(&[("QUOTE_TYPE", "gramine")], "sgx.enc");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout(&out).contains("Attestation Fail! Application killed!"),
        "{out:?}"
    );
    assert!(!dir.path().join("sgx.enc").exists());

    // ATTESTATION_DEBUG goes on after the failure (loudly); the gated key is still refused.
    let out = bigdl_runtime(&[("ATTESTATION_DEBUG", "true")], "debug.enc");
    assert!(
        stdout(&out).contains("ERROR:Attestation Fail! In debug mode, continue."),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(!dir.path().join("debug.enc").exists());

    // A variable ppml cannot honour is refused, never ignored.
    let out = bigdl_runtime(&[("ATTESTATION_TYPE", "DummyAttestationService")], "x.enc");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ATTESTATION_TYPE"));
}

/// BigDL's kms-utils steps (`entrypoint.sh enroll|generatekeys|encrypt|decrypt $appid $apikey
/// $path`, with KMS_TYPE, EHSM_KMS_IP and EHSM_KMS_PORT) as `ppml kms-utils`: keys in the key
/// directory, a ppml dataset at PATH.encrypted, plaintext at PATH.decrypted; a BigDL dataset
/// decrypts too, each part's MAC verified.
#[test]
fn bigdl_kms_utils_steps_work_with_their_positional_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_tls(&dir.path().join("kms"));
    let (ip, port) = server
        .url
        .strip_prefix("https://")
        .unwrap()
        .rsplit_once(':')
        .map(|(ip, port)| (ip.to_string(), port.to_string()))
        .unwrap();
    let key_dir = dir.path().join("key");
    let utils = |args: &[&str]| {
        let mut cmd = ppml(&dir.path().join("home"));
        cmd.env("PPML_KMS_FINGERPRINT", &server.fingerprint)
            .env("KMS_TYPE", "ehsm")
            .env("EHSM_KMS_IP", &ip)
            .env("EHSM_KMS_PORT", &port)
            .env("KMS_UTILS_KEY_DIR", &key_dir)
            .arg("kms-utils")
            .args(args);
        run(&mut cmd)
    };
    let enrolled = stdout(&utils(&["enroll"]));
    let appid = common::printed_value(&enrolled, "appid");
    let apikey = common::printed_value(&enrolled, "apikey");
    utils(&["generatekeys", &appid, &apikey]);
    let primary = std::fs::read_to_string(key_dir.join("ehsm_encrypted_primary_key")).unwrap();
    assert!(key_dir.join("ehsm_encrypted_data_key").is_file());

    let input = people(dir.path(), 1000);
    let input_text = input.to_str().unwrap().to_string();
    utils(&["encryptwithrepartition", &appid, &apikey, &input_text]);
    let encrypted = format!("{input_text}.encrypted");
    assert_eq!(
        std::fs::read_dir(&encrypted)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("part-"))
            .count(),
        4
    );
    utils(&["decrypt", &appid, &apikey, &encrypted]);
    let sorted_rows = |dir: &str| {
        let mut rows: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flat_map(|e| {
                std::fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .lines()
                    .filter(|l| *l != "name,age,job")
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        rows
    };
    let mut expected: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    expected.sort();
    assert_eq!(sorted_rows(&format!("{encrypted}.decrypted")), expected);

    // A BigDL dataset written under the generated primary key decrypts to the same rows.
    let bigdl = dir.path().join("bigdl");
    let writer =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../compat/bigdl_writer.py");
    let out = Command::new("python3")
        .arg(&writer)
        .args(["--variant", "common", "--parts", "2", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&bigdl)
        .args([
            "--kms",
            &server.url,
            &server.fingerprint,
            &appid,
            &apikey,
            primary.trim(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bigdl_text = bigdl.to_str().unwrap().to_string();
    utils(&["decrypt", &appid, &apikey, &bigdl_text]);
    assert_eq!(sorted_rows(&format!("{bigdl_text}.decrypted")), expected);

    // Other KMS types are refused, not ignored.
    let out = ppml(&dir.path().join("home"))
        .env("KMS_TYPE", "simple")
        .args(["kms-utils", "generatekeys", "a", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// The seed document's own BigDL submission (workflow.md), with only its host, path and
/// credential values replaced, runs SimpleQuery through `ppml bigdl-submit` against
/// `ppml cluster up` and this KMS server; its BigDL input is imported with every MAC checked,
/// and the output decrypts to the reference rows.
#[test]
fn the_seed_bigdl_submit_command_runs_against_a_ppml_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");
    let server = serve_tls_with(&dir.path().join("kms"), &["--allow-simulation".as_ref()]);
    let client = Client::enroll(&server, dir.path().join("home"));
    let data = dir.path().join("data/simplequery");
    std::fs::create_dir_all(data.join("keys")).unwrap();
    let primary = stdout(&run(client.cmd().args(["kms", "create-key"])))
        .trim()
        .to_string();
    std::fs::write(data.join("keys/primaryKey"), format!("{primary}\n")).unwrap();
    std::fs::write(data.join("keys/dataKey"), "unused\n").unwrap();
    let input = people(dir.path(), 3000);
    let writer =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../compat/bigdl_writer.py");
    let out = Command::new("python3")
        .arg(&writer)
        .args(["--variant", "common", "--parts", "3", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(data.join("people_encrypted"))
        .args([
            "--kms",
            &server.url,
            &server.fingerprint,
            &client.appid,
            &client.apikey,
            &primary,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The driver and the executors attest in the simulated TEE (this machine has no SGX):
    // PPML_TEE wins over --sgx-enabled true's SGX. The imported dataset goes under the
    // client's primary key, released only to attested runtimes (PPML_PRIMARY_KEY); the BigDL
    // key unwraps the input and takes the results, which the owner decrypts.
    let policy = mark_for_this_binary(&client, &sim_key, dir.path());

    let port = common::free_cluster_ports(1);
    let cluster = dir.path().join("cluster");
    run(client
        .cmd()
        .env("PPML_TEE", "sim")
        .env("PPML_ATTESTATION_POLICY", &policy)
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args(["cluster", "up", "--executors", "1", "--port"])
        .arg(port.to_string())
        .arg("--dir")
        .arg(&cluster));
    let (host, kms_port) = server
        .url
        .strip_prefix("https://")
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    let path = |p: &str| data.join(p).display().to_string();
    let master = format!("k8s://https://127.0.0.1:{port}");
    let jar = "local:///ppml/trusted-big-data-ml/work/data/simplequery/spark-encrypt-io-0.3.0-SNAPSHOT.jar";
    let submitted = ppml(&client.home)
        .env("PPML_KMS_FINGERPRINT", &client.fingerprint)
        .env("PPML_PRIMARY_KEY", &client.primary)
        .env("PPML_CLUSTER_TLS", cluster.join("tls"))
        .env("PPML_TEE", "sim")
        .env("PPML_ATTESTATION_POLICY", &policy)
        .env("PPML_SIM_PLATFORM_KEY", &sim_key)
        .args([
            "bigdl-submit",
            "--master", &master, "--deploy-mode", "client", "--sgx-enabled", "true",
            "--sgx-log-level", "error", "--sgx-driver-memory", "64g",
            "--sgx-driver-jvm-memory", "12g", "--sgx-executor-memory", "64g",
            "--sgx-executor-jvm-memory", "12g", "--driver-memory", "32g", "--driver-cores", "8",
            "--executor-memory", "32g", "--executor-cores", "8", "--num-executors", "2",
            "--conf", "spark.kubernetes.container.image=intelanalytics/bigdl-ppml-trusted-big-data-ml-python-gramine:latest",
            "--name", "simplequery", "--verbose",
            "--class", "com.intel.analytics.bigdl.ppml.examples.SimpleQuerySparkExample",
            "--jars", "local:///ppml/trusted-big-data-ml/spark-encrypt-io-0.3.0-SNAPSHOT.jar",
            jar,
            "--inputPath", &path("people_encrypted"),
            "--outputPath", &path("people_encrypted_output"),
            "--inputPartitionNum", "8", "--outputPartitionNum", "8",
            "--inputEncryptModeValue", "AES/CBC/PKCS5Padding",
            "--outputEncryptModeValue", "AES/CBC/PKCS5Padding",
            "--primaryKeyPath", &path("keys/primaryKey"),
            "--dataKeyPath", &path("keys/dataKey"),
            "--kmsType", "EHSMKeyManagementService",
            "--kmsServerIP", host, "--kmsServerPort", kms_port,
            "--ehsmAPPID", &client.appid, "--ehsmAPIKEY", &client.apikey,
        ])
        .output()
        .unwrap();
    run(ppml(&client.home)
        .args(["cluster", "down", "--dir"])
        .arg(&cluster));
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert!(submitted.status.success(), "{stderr}");
    // --verbose says what each option became; the api key is never shown.
    for needle in [
        "--mode client --master 127.0.0.1:",
        "--sgx-enabled true → the TEE of PPML_TEE",
        "--sgx-executor-memory 64g → not a submission setting",
        "ppml import bigdl",
        "Attestation Success!",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    assert!(!stderr.contains(client.apikey.as_str()), "{stderr}");
    assert!(!data.join("people_encrypted_output.ppml-input").exists());

    let decrypted = run(client
        .cmd()
        .args(["decrypt", "--out", "-", "--in"])
        .arg(data.join("people_encrypted_output")));
    let mut rows: Vec<String> = stdout(&decrypted)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    rows.sort();
    let mut expected: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let age: u32 = f[1].parse().unwrap();
            f[2] == "Developer" && (20..=40).contains(&age)
        })
        .map(str::to_string)
        .collect();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(rows, expected);
}
