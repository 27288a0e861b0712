//! End-to-end tests of the `ppml` binary: the workflow, and bad input failing loudly with a
//! specific message, a documented exit code, and no output left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Env {
            home: root.join("home"),
            root,
            _dir: dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn ppml(&self, args: &[&str]) -> Output {
        self.ppml_env(args, &[])
    }

    fn ppml_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppml"));
        cmd.args(args)
            .env("PPML_HOME", &self.home)
            .env_remove("PPML_APPID")
            .env_remove("PPML_APIKEY")
            .env_remove("PPML_PRIMARY_KEY")
            .env_remove("PPML_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ppml(args);
        assert!(
            out.status.success(),
            "ppml {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// people.csv with `rows` rows, encrypted into `parts` parts with small segments.
    fn encrypted_people(&self, name: &str, rows: u64, parts: usize) -> (PathBuf, PathBuf) {
        let csv = self.path(&format!("{name}.csv"));
        let enc = self.path(&format!("{name}.enc"));
        self.ok(&[
            "generate",
            "people",
            "--rows",
            &rows.to_string(),
            "--out",
            s(&csv),
            "--seed",
            "7",
        ]);
        self.ok(&[
            "encrypt",
            "--in",
            s(&csv),
            "--out",
            s(&enc),
            "--partitions",
            &parts.to_string(),
            "--segment-size",
            "1024",
        ]);
        (csv, enc)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
}

fn parts(dir: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ppml"))
        .collect();
    parts.sort();
    parts
}

/// No file or directory other than `allowed` exists in `dir` (no partial outputs, no temp
/// files with plaintext).
fn assert_only(dir: &Path, allowed: &[&str]) {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
    allowed.sort();
    assert_eq!(names, allowed);
}

#[test]
fn generate_is_deterministic_and_counts_developers() {
    let env = Env::new();
    let a = env.path("a.csv");
    let b = env.path("b.csv");
    let out_a = env.ok(&[
        "generate",
        "people",
        "--rows",
        "20000",
        "--out",
        s(&a),
        "--seed",
        "3",
    ]);
    let out_b = env.ok(&[
        "generate",
        "people",
        "--rows",
        "20000",
        "--out",
        s(&b),
        "--seed",
        "3",
    ]);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_eq!(out_a, out_b);
    let text = fs::read_to_string(&a).unwrap();
    let expected = text
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let age: u32 = f[1].parse().unwrap();
            f[2] == "Developer" && (20..=40).contains(&age)
        })
        .count();
    assert_eq!(out_a.trim(), format!("Developers aged 20..=40: {expected}"));
}

#[test]
fn encrypt_decrypt_round_trip_with_partitions() {
    let env = Env::new();
    let (csv, enc) = env.encrypted_people("people", 30000, 3);
    assert_eq!(parts(&enc).len(), 3);
    let original = fs::read(&csv).unwrap();
    // The ciphertext does not contain the plaintext.
    let header_line = b"name,age,job";
    for part in parts(&enc) {
        let bytes = fs::read(part).unwrap();
        assert!(!bytes.windows(header_line.len()).any(|w| w == header_line));
    }
    let out = env.path("back.csv");
    env.ok(&["decrypt", "--in", s(&enc), "--out", s(&out)]);
    assert_eq!(fs::read(&out).unwrap(), original);
    // Per-part output: each part starts with the header, rows split on row boundaries.
    let dir = env.path("back");
    env.ok(&["decrypt", "--in", s(&enc), "--out-dir", s(&dir)]);
    let mut rows = 0;
    for i in 0..3 {
        let text = fs::read_to_string(dir.join(format!("part-0000{i}.csv"))).unwrap();
        assert!(text.starts_with("name,age,job\n"));
        assert!(text.ends_with('\n'));
        rows += text.lines().count() - 1;
    }
    assert_eq!(rows, 30000);
    // stdout.
    let stdout = env.ok(&["decrypt", "--in", s(&enc), "--out", "-"]);
    assert_eq!(stdout.as_bytes(), &original[..]);
}

#[test]
fn simple_query_writes_exactly_the_matching_rows() {
    let env = Env::new();
    let (csv, enc) = env.encrypted_people("people", 50000, 2);
    let out = env.path("dev.enc");
    let printed = env.ok(&[
        "simple-query",
        "--input",
        s(&enc),
        "--output",
        s(&out),
        "--output-partitions",
        "3",
        "--input-partitions",
        "2",
    ]);
    assert!(printed.contains("count(name): 50000"), "{printed}");
    for phase in ["loadInputs", "doSQLOperations", "encryptAndSaveOutputs"] {
        assert!(printed.contains(&format!("{phase} time:")), "{printed}");
    }
    assert_eq!(parts(&out).len(), 3);
    let result = env.path("dev.csv");
    env.ok(&["decrypt", "--in", s(&out), "--out", s(&result)]);
    let mut expected: Vec<String> = fs::read_to_string(&csv)
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
    let text = fs::read_to_string(&result).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("name,age,job"));
    let mut actual: Vec<String> = lines.map(str::to_string).collect();
    expected.sort();
    actual.sort();
    assert_eq!(actual, expected);

    // The preview shows names; --no-preview keeps every record off stdout.
    let first_name = expected[0].split(',').next().unwrap().to_string();
    assert!(
        printed.contains("(age + Int64(1))") || printed.contains("age + 1"),
        "{printed}"
    );
    let quiet = env.ok(&[
        "simple-query",
        "--input",
        s(&enc),
        "--output",
        s(&env.path("dev2.enc")),
        "--no-preview",
    ]);
    assert!(quiet.contains("count(name): 50000"), "{quiet}");
    assert!(!quiet.contains('|'), "{quiet}");
    assert!(!quiet.contains(&format!(" {first_name} ")), "{quiet}");
}

#[test]
fn sql_query_over_encrypted_tables() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 5000, 2);
    let printed = env.ok(&[
        "query",
        "--table",
        &format!("people={}", s(&enc)),
        "--sql",
        "SELECT count(*) AS n, min(age) AS lo, max(age) AS hi FROM people",
    ]);
    assert!(printed.contains("| 5000 | 18 | 60 |"), "{printed}");
}

#[test]
fn quickstart_runs_the_whole_workflow() {
    let env = Env::new();
    let work = env.path("qs");
    let out = env.ok(&[
        "quickstart",
        "--rows",
        "20000",
        "--workdir",
        s(&work),
        "--seed",
        "5",
    ]);
    assert!(out.contains("quickstart OK"), "{out}");
    assert!(work.join("developers.csv").is_file());
    // The main command runs the real protocol: a KMS server with its audit log, the
    // simulated TEE attesting, and keys released only through ReleaseDataKey.
    assert!(out.contains("simulated TEE"), "{out}");
    // The KMS runs in the simulated TEE too, and the clients verified it first.
    assert!(out.contains("clients verify its quote"), "{out}");
    let kms_policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("kms-policy.json")).unwrap())
            .unwrap();
    assert_eq!(kms_policy["allow_simulation"], true);
    // The owner unsealed the KMS and pinned its root key; the KMS's host has no root key file.
    assert!(out.contains("sealed until the owner's root key"), "{out}");
    assert_eq!(
        kms_policy["kms_root_ids"].as_array().map(Vec::len),
        Some(1),
        "{kms_policy}"
    );
    assert!(!work.join("kms-server.root.key").exists());
    assert!(!work.join("kms-server/root.key").exists());
    let audit = std::fs::read_to_string(work.join("kms-server/audit.log")).unwrap();
    for action in [
        "\"Attest\"",
        "\"SetKeyReleasePolicy\"",
        "\"ReleaseDataKey\"",
    ] {
        assert!(audit.contains(action), "{action} not in the audit log");
    }
    // The input key is released only through ReleaseDataKey; plain Decrypt serves only the
    // owner's output key, and was refused for the input key outside the TEE.
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let input_key = lines
        .iter()
        .find(|l| l["action"] == "ReleaseDataKey" && l["outcome"] == "ok")
        .map(|l| l["keyid"].clone())
        .expect("a release");
    let decrypts: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["action"] == "Decrypt").collect();
    assert!(decrypts.iter().any(|l| l["outcome"] == "ok"));
    for line in &decrypts {
        if line["keyid"] == input_key {
            assert_ne!(line["outcome"], "ok", "{line}");
        }
    }
    assert!(
        decrypts.iter().any(|l| l["keyid"] == input_key),
        "the refused attempt is logged"
    );
    assert!(
        out.contains("outside the TEE the input stays sealed"),
        "{out}"
    );

    // The job left a receipt; the command the quickstart prints verifies it offline.
    let command = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ppml receipt verify"))
        .unwrap_or_else(|| panic!("no receipt command in {out}"));
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let verified = env.ok(&args);
    assert!(verified.contains("runtime:  sim attested"), "{verified}");
    assert!(
        verified.contains("verified: signed by the runtime's receipt key"),
        "{verified}"
    );
    let output = work.join("developers.enc");
    let shown = env.ok(&["receipt", "show", s(&output)]);
    assert!(shown.contains("simple_query"), "{shown}");
    let job = shown
        .lines()
        .find_map(|l| l.strip_prefix("job:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    // A changed receipt: exit 3, naming the signature.
    let receipt = output.join("_receipt.ppml.json");
    let original = fs::read_to_string(&receipt).unwrap();
    fs::write(
        &receipt,
        original.replacen("simple_query", "simple_qvery", 1),
    )
    .unwrap();
    let changed = env.ppml(&args);
    assert_eq!(changed.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&changed.stderr).contains("signature does not verify"),
        "{changed:?}"
    );
    fs::write(&receipt, &original).unwrap();
    // Another KMS's key vouches for nothing: exit 4.
    let key_at = args.iter().position(|a| *a == "--kms-key").unwrap() + 1;
    let mut other = args.clone();
    let zeros = "0".repeat(64);
    other[key_at] = &zeros;
    assert_eq!(env.ppml(&other).status.code(), Some(4));
    // The KMS's audit log lists the job's key releases under the receipt's job id.
    let entries = env.ok(&[
        "kms",
        "audit",
        "show",
        "--job",
        &job,
        "--data-dir",
        s(&work.join("kms-server")),
        "--chain-only",
    ]);
    assert!(entries.contains("ReleaseDataKey"), "{entries}");
    assert!(entries.contains("sim policy="), "{entries}");
}

#[test]
fn first_use_creates_the_embedded_kms_once() {
    let env = Env::new();
    let csv = env.path("p.csv");
    env.ok(&["generate", "people", "--rows", "10", "--out", s(&csv)]);
    let first = env.ppml(&["encrypt", "--in", s(&csv), "--out", s(&env.path("a.enc"))]);
    assert!(stderr(&first).contains("created an embedded KMS"));
    let second = env.ppml(&["encrypt", "--in", s(&csv), "--out", s(&env.path("b.enc"))]);
    assert!(second.status.success());
    assert!(!stderr(&second).contains("created an embedded KMS"));
    use std::os::unix::fs::PermissionsExt;
    for f in ["config.toml", "kms/root.key", "kms/store.json"] {
        let mode = fs::metadata(env.home.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
}

/// Runs decrypt and simple-query on a damaged dataset: both fail with `code` and the
/// message, and leave no output.
fn assert_rejected(env: &Env, enc: &Path, code: i32, needles: &[&str]) {
    let out = env.path("out.csv");
    let result = env.ppml(&["decrypt", "--in", s(enc), "--out", s(&out)]);
    assert_fails(&result, code, needles);
    assert!(!out.exists());
    let query_out = env.path("query.enc");
    let result = env.ppml(&["simple-query", "--input", s(enc), "--output", s(&query_out)]);
    assert_fails(&result, code, needles);
    assert!(!query_out.exists());
}

#[test]
fn flipped_byte_in_a_segment_is_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 2);
    let part = &parts(&enc)[1];
    let mut bytes = fs::read(part).unwrap();
    let at = bytes.len() - 500;
    bytes[at] ^= 0x01;
    fs::write(part, bytes).unwrap();
    assert_rejected(
        &env,
        &enc,
        3,
        &["part-00001.csv.ppml", "failed authentication"],
    );
    assert_only(&env.root, &["home", "people.csv", "people.enc"]);
}

#[test]
fn flipped_byte_in_a_header_is_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 2);
    let part = &parts(&enc)[0];
    let mut bytes = fs::read(part).unwrap();
    bytes[20] ^= 0x80;
    fs::write(part, bytes).unwrap();
    assert_rejected(
        &env,
        &enc,
        3,
        &[
            "part-00000.csv.ppml",
            "does not match the manifest (header)",
        ],
    );
}

#[test]
fn truncated_parts_are_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 2);
    let part = &parts(&enc)[0];
    let bytes = fs::read(part).unwrap();
    fs::write(part, &bytes[..bytes.len() - 100]).unwrap();
    assert_rejected(&env, &enc, 3, &["part-00000.csv.ppml", "size"]);
}

#[test]
fn reordered_segments_are_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 1);
    let part = &parts(&enc)[0];
    let mut bytes = fs::read(part).unwrap();
    let header = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let seg = 1024 + 16;
    let first: Vec<u8> = bytes[header..header + seg].to_vec();
    bytes.copy_within(header + seg..header + 2 * seg, header);
    bytes[header + seg..header + 2 * seg].copy_from_slice(&first);
    fs::write(part, bytes).unwrap();
    assert_rejected(
        &env,
        &enc,
        3,
        &["part-00000.csv.ppml", "segment 0 failed authentication"],
    );
}

#[test]
fn removed_added_renamed_and_swapped_parts_are_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 2);
    let (_, other) = env.encrypted_people("other", 3000, 2);
    let p = parts(&enc);

    let saved = fs::read(&p[1]).unwrap();
    fs::remove_file(&p[1]).unwrap();
    assert_rejected(&env, &enc, 3, &["part \"part-00001.csv.ppml\"", "missing"]);
    fs::write(&p[1], &saved).unwrap();

    fs::write(enc.join("part-00002.csv.ppml"), &saved).unwrap();
    assert_rejected(
        &env,
        &enc,
        3,
        &["part-00002.csv.ppml", "not part of the dataset"],
    );
    fs::remove_file(enc.join("part-00002.csv.ppml")).unwrap();

    // Swap the two parts' names.
    let a = fs::read(&p[0]).unwrap();
    fs::write(&p[0], &saved).unwrap();
    fs::write(&p[1], &a).unwrap();
    assert_rejected(&env, &enc, 3, &["does not match the manifest"]);
    fs::write(&p[0], &a).unwrap();
    fs::write(&p[1], &saved).unwrap();

    // A part of another dataset under the same name.
    fs::copy(parts(&other)[1].clone(), &p[1]).unwrap();
    assert_rejected(
        &env,
        &enc,
        3,
        &["part-00001.csv.ppml", "does not match the manifest"],
    );
    fs::write(&p[1], &saved).unwrap();

    // Back to intact, it decrypts.
    env.ok(&["decrypt", "--in", s(&enc), "--out", s(&env.path("ok.csv"))]);
}

#[test]
fn edited_manifest_is_rejected() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 3000, 2);
    let manifest = enc.join("_manifest.ppml.json");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(&manifest, text.replace("header=present", "header=absent")).unwrap();
    assert_rejected(&env, &enc, 3, &["manifest authentication failed"]);
    fs::write(&manifest, "{ not json").unwrap();
    assert_rejected(&env, &enc, 3, &["malformed manifest"]);
}

#[test]
fn wrong_credentials_or_wrong_key_are_denied() {
    let env = Env::new();
    let (_, enc) = env.encrypted_people("people", 1000, 1);
    let config = fs::read_to_string(env.home.join("config.toml")).unwrap();
    let appid = config
        .lines()
        .find_map(|l| l.strip_prefix("appid = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let out = env.ppml_env(
        &["decrypt", "--in", s(&enc), "--out", s(&env.path("x.csv"))],
        &[("PPML_APPID", &appid), ("PPML_APIKEY", &"0".repeat(64))],
    );
    assert_fails(&out, 4, &["rejected the app credentials"]);
    assert!(!env.path("x.csv").exists());

    // Another app of the same KMS cannot use this app's key.
    let enrolled = env.ok(&["kms", "enroll"]);
    let field = |name: &str| {
        enrolled
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = \"")))
            .unwrap()
            .trim_end_matches('"')
            .to_string()
    };
    let out = env.ppml_env(
        &["decrypt", "--in", s(&enc), "--out", s(&env.path("x.csv"))],
        &[
            ("PPML_APPID", &field("appid")),
            ("PPML_APIKEY", &field("apikey")),
        ],
    );
    assert_fails(&out, 4, &["not found for this app"]);

    // Another KMS altogether.
    let other_home = env.path("other-home");
    let out = env.ppml_env(
        &["decrypt", "--in", s(&enc), "--out", s(&env.path("x.csv"))],
        &[("PPML_HOME", s(&other_home))],
    );
    assert_fails(&out, 4, &["was encrypted with KMS"]);
    assert!(!env.path("x.csv").exists());
}

#[test]
fn non_ppml_input_is_rejected() {
    let env = Env::new();
    let dir = env.path("plain");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("part-00000.csv"), "name,age,job\n").unwrap();
    assert_rejected(&env, &dir, 3, &["not a ppml encrypted dataset"]);
    let file = env.path("file.csv");
    fs::write(&file, "name,age,job\n").unwrap();
    let out = env.ppml(&["decrypt", "--in", s(&file), "--out", s(&env.path("o.csv"))]);
    assert_fails(&out, 3, &["not a ppml encrypted dataset"]);
}

#[test]
fn csv_row_with_wrong_field_count_is_reported_with_its_line() {
    let env = Env::new();
    let csv = env.path("bad.csv");
    fs::write(
        &csv,
        "name,age,job\nann,30,Developer\nbob,31\ncid,32,Engineer\n",
    )
    .unwrap();
    let enc = env.path("bad.enc");
    let out = env.ppml(&[
        "encrypt",
        "--in",
        s(&csv),
        "--out",
        s(&enc),
        "--partitions",
        "2",
    ]);
    assert_fails(&out, 3, &["bad.csv: line 3: expected 3 fields, found 2"]);
    assert!(!enc.exists());
    assert_only(&env.root, &["bad.csv", "home"]);
}

#[test]
fn without_the_row_check_parts_still_split_on_rows_and_a_query_reports_the_bad_row() {
    let env = Env::new();
    let csv = env.path("quoted.csv");
    let mut text = String::from("name,note,age\n");
    for i in 0..300 {
        // Quoted fields with commas and line ends: a split inside one would corrupt a part.
        text.push_str(&format!("n{i},\"a,\nb {i}\",{}\n", 20 + i % 30));
    }
    fs::write(&csv, &text).unwrap();
    let enc = env.path("quoted.enc");
    env.ok(&[
        "encrypt",
        "--in",
        s(&csv),
        "--out",
        s(&enc),
        "--partitions",
        "3",
        "--no-row-check",
    ]);
    let parts = env.path("parts");
    env.ok(&["decrypt", "--in", s(&enc), "--out-dir", s(&parts)]);
    let mut rows = 0;
    let mut names: Vec<_> = fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3);
    for part in &names {
        let body = fs::read_to_string(part).unwrap();
        let body = body
            .strip_prefix("name,note,age\n")
            .expect("every part has the header");
        assert!(
            body.starts_with('n') && body.ends_with('\n'),
            "{}",
            part.display()
        );
        rows += body.matches("\",").count();
    }
    assert_eq!(rows, 300);

    // A bad row passes encryption unchecked and is reported when a query reads it.
    let bad = env.path("bad.csv");
    fs::write(&bad, "name,age,job\nann,30,Developer\nbob,31\n").unwrap();
    let bad_enc = env.path("bad.enc");
    env.ok(&[
        "encrypt",
        "--in",
        s(&bad),
        "--out",
        s(&bad_enc),
        "--no-row-check",
    ]);
    let out = env.ppml(&[
        "simple-query",
        "--input",
        s(&bad_enc),
        "--output",
        s(&env.path("q.enc")),
    ]);
    assert_fails(&out, 3, &["incorrect number of fields for line 3"]);
    assert!(!env.path("q.enc").exists());
}

#[test]
fn existing_output_is_not_overwritten_without_flag() {
    let env = Env::new();
    let (csv, enc) = env.encrypted_people("people", 100, 1);
    let out = env.ppml(&["encrypt", "--in", s(&csv), "--out", s(&enc)]);
    assert_fails(&out, 1, &["already exists"]);
    env.ok(&["encrypt", "--in", s(&csv), "--out", s(&enc), "--overwrite"]);
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    let out = env.ppml(&["encrypt", "--in"]);
    assert_eq!(out.status.code(), Some(2));
    // Found after parsing: flags that do not go together, values out of range.
    let csv = env.path("p.csv");
    env.ok(&["generate", "people", "--rows", "10", "--out", s(&csv)]);
    for (args, message) in [
        (
            &[
                "submit",
                "--mode",
                "local",
                "--tee",
                "sim",
                "simple-query",
                "--input",
                "/nonexistent.enc",
                "--output",
                "/nonexistent-out.enc",
            ][..],
            "--mode local runs without a TEE",
        ),
        (
            &[
                "encrypt",
                "--in",
                s(&csv),
                "--out",
                s(&env.path("p.enc")),
                "--partitions",
                "0",
            ][..],
            "--partitions must be at least 1",
        ),
        (
            &[
                "query", "--table", "t=/x.enc", "--table", "t=/y.enc", "--sql", "SELECT 1",
            ][..],
            "given twice",
        ),
    ] {
        let out = env.ppml(args);
        assert_fails(&out, 2, &[message]);
    }
    assert!(!env.path("p.enc").exists());
}

/// Boolean env vars take 1/0, yes/no, true/false, on/off, as the README documents
/// (`PPML_NO_SYNC=1`); anything else is a usage error naming the variable's values.
#[test]
fn boolean_env_vars_take_one_and_zero() {
    let env = Env::new();
    let csv = env.path("p.csv");
    let out = env.ppml_env(
        &["generate", "people", "--rows", "10", "--out", s(&csv)],
        &[("PPML_NO_SYNC", "1"), ("PPML_REVEAL_COUNTS", "0")],
    );
    assert!(out.status.success(), "{out:?}");
    let out = env.ppml_env(
        &[
            "generate",
            "people",
            "--rows",
            "10",
            "--out",
            s(&env.path("q.csv")),
        ],
        &[("PPML_NO_SYNC", "maybe")],
    );
    assert_fails(&out, 2, &["maybe"]);
    assert!(!env.path("q.csv").exists());
    let out = env.ppml_env(
        &[
            "kms",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            s(&env.path("kms")),
        ],
        &[("PPML_KMS_INSECURE_HTTP", "perhaps")],
    );
    assert_fails(&out, 2, &["perhaps"]);
}

#[test]
fn log_records_go_to_the_log_file_instead_of_stderr() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let log = env.path("ppml.log");
    // A client-mode submit to a closed port: it logs a warning about cleartext, then fails.
    let out = env.ppml(&[
        "--log-file",
        s(&log),
        "submit",
        "--mode",
        "client",
        "--master",
        "127.0.0.1:1",
        "--insecure-cleartext",
        "simple-query",
        "--input",
        s(&env.path("missing.enc")),
        "--output",
        s(&env.path("out.enc")),
    ]);
    assert!(!out.status.success());
    let written = fs::read_to_string(&log).unwrap();
    assert!(
        written.contains("WARN") && written.contains("--insecure-cleartext"),
        "{written}"
    );
    assert!(!stderr(&out).contains(" WARN "), "{}", stderr(&out));
    assert_eq!(
        fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // An unwritable log file is a clear failure before anything runs.
    let out = env.ppml(&[
        "--log-file",
        "/nonexistent/dir/ppml.log",
        "kms",
        "list-keys",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--log-file"));
}

/// Secrets given in the environment (the api key, BigDL's plaintext primary key) never show in
/// `--help`, which clap would otherwise print as `[env: NAME=value]`.
#[test]
fn secret_environment_values_never_show_in_help() {
    let env = Env::new();
    for command in [&["import", "bigdl", "--help"][..], &["query", "--help"][..]] {
        let out = env.ppml_env(
            command,
            &[
                ("PPML_APIKEY", "s3cr3t-apikey"),
                ("PPML_BIGDL_PRIMARY_KEY_PLAINTEXT", "s3cr3t-primary"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command:?}");
        assert!(!text.contains("s3cr3t"), "{command:?}: {text}");
    }
}
