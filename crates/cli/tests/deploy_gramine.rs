//! `deploy/gramine/build.sh`: the Gramine SGX manifest it renders (`--check`, no Gramine
//! needed) has the properties the enclave's security rests on, the commands it refuses, and
//! the attestation policy it prints (checked with `ppml attest verify` on the real SGX sample
//! quote). What this cannot show: that `gramine-manifest` accepts the template, that
//! `gramine-sgx-sign` signs it, or that the enclave runs (no Gramine, no SGX here).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use toml::{Table, Value};

/// 2025-07-01T00:00:00Z, inside the fixture collateral's validity window.
const FIXTURE_TIME: &str = "1751328000";
const MRENCLAVE: &str = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb";
const MRSIGNER: &str = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6";

/// The crate directory at run time (CI may build in another checkout sharing the target dir).
fn crate_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
}

fn build_sh() -> PathBuf {
    crate_dir().join("../../deploy/gramine/build.sh")
}

fn run_build(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(build_sh())
        .args(args)
        .output()
        .expect("running bash deploy/gramine/build.sh")
}

/// `build.sh --check --out OUT [extra...] -- ppml_args...`
fn check(out: &Path, extra: &[&str], ppml_args: &[&str]) -> Output {
    let mut args = vec!["--check", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(ppml_args);
    run_build(&args)
}

fn manifest(out: &Path) -> Table {
    let text = std::fs::read_to_string(out.join("ppml.manifest")).unwrap();
    text.parse::<Table>()
        .unwrap_or_else(|e| panic!("rendered manifest is not TOML: {e}\n{text}"))
}

fn get<'a>(table: &'a Table, dotted: &str) -> &'a Value {
    let mut parts = dotted.split('.');
    let mut value = table
        .get(parts.next().unwrap())
        .unwrap_or_else(|| panic!("{dotted} missing"));
    for part in parts {
        value = value
            .get(part)
            .unwrap_or_else(|| panic!("{dotted} missing"));
    }
    value
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            // gramine-manifest writes trusted files as tables; accept both forms.
            Value::Table(t) => t["uri"].as_str().unwrap().to_string(),
            other => panic!("unexpected entry {other:?}"),
        })
        .collect()
}

fn mounts(m: &Table) -> Vec<(String, Option<String>, String)> {
    get(m, "fs.mounts")
        .as_array()
        .unwrap()
        .iter()
        .map(|mount| {
            (
                mount["path"].as_str().unwrap().to_string(),
                mount.get("uri").map(|u| u.as_str().unwrap().to_string()),
                mount
                    .get("type")
                    .map_or("chroot", |t| t.as_str().unwrap())
                    .to_string(),
            )
        })
        .collect()
}

/// Every key anywhere in the manifest, dotted.
fn all_keys(table: &Table, prefix: &str, keys: &mut Vec<String>) {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let Value::Table(inner) = value {
            all_keys(inner, &dotted, keys);
        }
        keys.push(dotted);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_renders_a_measured_manifest_with_the_baked_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let result = check(
        &out,
        &[],
        &[
            "simple-query",
            "--input",
            "/data/in",
            "--output",
            "/data/out",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let m = manifest(&out);

    // The entrypoint is the ppml binary of the bundle, and it is measured.
    let entrypoint = get(&m, "libos.entrypoint").as_str().unwrap();
    assert_eq!(entrypoint, "/ppml/bin/ppml");
    let mounts = mounts(&m);
    let binary_uri = mounts
        .iter()
        .find(|(path, _, _)| path == entrypoint)
        .and_then(|(_, uri, _)| uri.clone())
        .expect("the entrypoint is mounted");
    assert_eq!(binary_uri, "file:bin/ppml");
    let trusted = strings(get(&m, "sgx.trusted_files"));
    assert!(trusted.contains(&binary_uri), "{trusted:?}");
    // ...and so are Gramine (LibOS, patched glibc), libgcc_s and the enclave's /etc.
    assert!(
        trusted.iter().any(|t| t.ends_with("/libsysdb.so")),
        "{trusted:?}"
    );
    assert!(
        trusted.iter().any(|t| t.ends_with("/runtime/glibc/")),
        "{trusted:?}"
    );
    assert!(
        trusted.iter().any(|t| t.ends_with("/libgcc_s.so.1")),
        "{trusted:?}"
    );
    assert!(trusted.contains(&"file:etc/".to_string()), "{trusted:?}");
    assert!(mounts.contains(&("/etc".into(), Some("file:etc".into()), "chroot".into())));
    assert!(out.join("etc/nsswitch.conf").is_file());
    if Path::new("/etc/ssl/certs/ca-certificates.crt").is_file() {
        assert!(out.join("etc/ssl/certs/ca-certificates.crt").is_file());
    }

    // The command is baked in: argv[0] is the binary name, `--tee sgx` is added, and so is
    // `--no-preview` (stdout is the host's).
    let argv = strings(get(&m, "loader.argv"));
    assert_eq!(
        argv,
        [
            "ppml",
            "--tee",
            "sgx",
            "simple-query",
            "--input",
            "/data/in",
            "--output",
            "/data/out",
            "--no-preview"
        ]
    );

    // Nothing comes from the host: no insecure__ option, no argv/env file, no passthrough.
    let mut keys = Vec::new();
    all_keys(&m, "", &mut keys);
    for key in &keys {
        let last = key.rsplit('.').next().unwrap();
        assert!(!last.starts_with("insecure__"), "{key} is set");
        assert!(
            last != "argv_src_file" && last != "env_src_file",
            "{key} is set"
        );
    }
    let env = get(&m, "loader.env").as_table().unwrap();
    for (name, value) in env {
        assert!(
            value.is_str(),
            "loader.env.{name} = {value:?} is not a fixed value"
        );
    }
    assert_eq!(env["PPML_HOME"].as_str(), Some("/tmp/ppml-home"));
    assert_eq!(
        env["SSL_CERT_FILE"].as_str(),
        Some("/etc/ssl/certs/ca-certificates.crt")
    );
    assert!(env.contains_key("RUST_LOG"));

    // A production DCAP enclave with the defaults.
    assert_eq!(get(&m, "sgx.debug").as_bool(), Some(false));
    assert_eq!(get(&m, "sgx.remote_attestation").as_str(), Some("dcap"));
    assert_eq!(get(&m, "sgx.file_check_policy").as_str(), Some("strict"));
    assert_eq!(get(&m, "sgx.enclave_size").as_str(), Some("4G"));
    assert_eq!(get(&m, "sgx.max_threads").as_integer(), Some(64));
    assert_eq!(get(&m, "loader.log_level").as_str(), Some("error"));

    // Allowed (unmeasured) files are only the data directories: /data/in, and /data as the
    // parent the output is renamed into (one entry covers both). They are mounted as is.
    assert_eq!(strings(get(&m, "sgx.allowed_files")), ["file:/data/"]);
    assert!(mounts.contains(&("/data".into(), Some("file:/data".into()), "chroot".into())));
    // Scratch space is an in-enclave tmpfs.
    assert!(
        mounts
            .iter()
            .any(|(path, _, kind)| path == "/tmp" && kind == "tmpfs"),
        "{mounts:?}"
    );

    // Options reach the manifest; a second run into the same bundle directory is allowed.
    let result = check(
        &out,
        &["--enclave-size", "8G", "--threads", "32", "--edmm"],
        &[
            "simple-query",
            "--input",
            "/srv/a/in",
            "--output",
            "/srv/b/out",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let m = manifest(&out);
    assert_eq!(get(&m, "sgx.enclave_size").as_str(), Some("8G"));
    assert_eq!(get(&m, "sgx.max_threads").as_integer(), Some(32));
    assert_eq!(get(&m, "sgx.edmm_enable").as_bool(), Some(true));
    assert_eq!(
        strings(get(&m, "sgx.allowed_files")),
        ["file:/srv/a/in/", "file:/srv/b/"]
    );
}

#[test]
fn refuses_commands_that_send_plaintext_to_the_host_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let decrypt = [
        "decrypt",
        "--in",
        "/data/out",
        "--out",
        "/data/plain/out.csv",
    ];

    let result = check(&out, &[], &decrypt);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(stderr(&result).contains("plaintext"), "{}", stderr(&result));
    assert!(!out.join("ppml.manifest").exists());

    for refused in [
        &["query", "--table", "t=/data/in", "--sql", "SELECT * FROM t"][..],
        &[
            "simple-query",
            "--plaintext",
            "--input",
            "/data/in",
            "--output",
            "/data/out",
        ],
        &["quickstart", "--workdir", "/data/q"],
    ] {
        let result = check(&out, &[], refused);
        assert_eq!(
            result.status.code(),
            Some(2),
            "{refused:?}: {}",
            stderr(&result)
        );
        assert!(stderr(&result).contains("plaintext"), "{}", stderr(&result));
    }

    // Explicitly allowed (an enclave on the data owner's own machine): rendered as asked.
    let result = check(&out, &["--allow-plaintext-output"], &decrypt);
    assert!(result.status.success(), "{}", stderr(&result));
    let m = manifest(&out);
    let argv = strings(get(&m, "loader.argv"));
    assert_eq!(argv[..4], ["ppml", "--tee", "sgx", "decrypt"]);
    assert_eq!(
        strings(get(&m, "sgx.allowed_files")),
        ["file:/data/out/", "file:/data/plain/"]
    );

    // Other command lines the enclave must never be given.
    for (refused, why) in [
        (
            &[
                "--tee",
                "sim",
                "simple-query",
                "--input",
                "/d/in",
                "--output",
                "/d/out",
            ][..],
            "sgx",
        ),
        (
            &[
                "--apikey",
                "secret",
                "simple-query",
                "--input",
                "/d/in",
                "--output",
                "/d/out",
            ],
            "--credentials",
        ),
        (
            &["simple-query", "--input", "data/in", "--output", "/d/out"],
            "absolute",
        ),
        (
            &["simple-query", "--input", "/d/in", "--output", "/out"],
            "would be /",
        ),
        (
            &["simple-query", "--input", "/etc/in", "--output", "/d/out"],
            "overlaps",
        ),
        (&[], "no ppml command"),
    ] {
        let result = check(&out, &[], refused);
        assert_eq!(
            result.status.code(),
            Some(2),
            "{refused:?}: {}",
            stderr(&result)
        );
        assert!(
            stderr(&result).contains(why),
            "{refused:?}: {}",
            stderr(&result)
        );
    }
}

#[test]
fn credentials_are_measured_and_the_policy_id_is_the_only_host_value() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let job = [
        "--kms-url",
        "https://kms:9000",
        "--kms-fingerprint",
        "sha256:00",
        "--primary-key",
        "K",
        "simple-query",
        "--input",
        "/data/in",
        "--output",
        "/data/out",
    ];

    // --credentials: a trusted (measured) file, mounted and passed with --config.
    let creds = dir.path().join("creds.toml");
    std::fs::write(
        &creds,
        "[kms]\nappid = \"A\"\napikey = \"s3cr3t-api-key\"\n",
    )
    .unwrap();
    let mut with_policy = vec!["--attestation-policy", "P"];
    with_policy.extend_from_slice(&job);
    let result = check(
        &out,
        &["--credentials", creds.to_str().unwrap()],
        &with_policy,
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let m = manifest(&out);
    let argv = strings(get(&m, "loader.argv"));
    assert_eq!(
        argv[..5],
        ["ppml", "--config", "/ppml/credentials.toml", "--tee", "sgx"]
    );
    assert!(strings(get(&m, "sgx.trusted_files")).contains(&"file:credentials.toml".into()));
    assert!(mounts(&m).contains(&(
        "/ppml/credentials.toml".into(),
        Some("file:credentials.toml".into()),
        "chroot".into()
    )));
    assert_eq!(
        std::fs::read(out.join("credentials.toml")).unwrap(),
        std::fs::read(&creds).unwrap()
    );
    // The api key is not in the manifest (only the file's hash will be, once signed).
    let text = std::fs::read_to_string(out.join("ppml.manifest")).unwrap();
    assert!(!text.contains("s3cr3t-api-key"), "{text}");

    // A credentials file that sets more than credentials is refused.
    std::fs::write(&creds, "[kms]\nappid = \"A\"\nca_cert = \"/x\"\n").unwrap();
    let result = check(&out, &["--credentials", creds.to_str().unwrap()], &job);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));

    // --policy-id-from-host: exactly one passthrough, PPML_ATTESTATION_POLICY.
    let result = check(&out, &["--policy-id-from-host"], &job);
    assert!(result.status.success(), "{}", stderr(&result));
    let m = manifest(&out);
    let env = get(&m, "loader.env").as_table().unwrap();
    let passthrough: Vec<_> = env.iter().filter(|(_, v)| !v.is_str()).collect();
    assert_eq!(passthrough.len(), 1, "{env:?}");
    assert_eq!(passthrough[0].0, "PPML_ATTESTATION_POLICY");
    assert_eq!(
        passthrough[0].1.get("passthrough").and_then(Value::as_bool),
        Some(true)
    );
    // ...and not together with a baked policy id.
    let result = check(&out, &["--policy-id-from-host"], &with_policy);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
}

/// The policy printed from `gramine-sgx-sigstruct-view` output is accepted by ppml and admits
/// exactly the measured enclave (here: the sample quote's enclave).
#[test]
fn printed_policy_admits_the_signed_enclave() {
    let dir = tempfile::tempdir().unwrap();
    let policy_from = |view: &str, signer: bool| -> Output {
        let path = dir.path().join("sigstruct.txt");
        std::fs::write(&path, view).unwrap();
        let mut args = vec!["--policy-from", path.to_str().unwrap()];
        if signer {
            args.push("--signer-policy");
        }
        run_build(&args)
    };
    let json_view = format!(
        r#"{{"mr_signer": "{MRSIGNER}", "mr_enclave": "{MRENCLAVE}", "isv_prod_id": 0,
            "isv_svn": 0, "debug_enclave": false}}"#
    );
    // Older Gramine prints text only.
    let text_view = format!(
        "Attributes:\n    mr_signer: {MRSIGNER}\n    mr_enclave: {MRENCLAVE}\n    \
         isv_prod_id: 0\n    isv_svn: 0\n    debug_enclave: False\n"
    );
    let verify = |policy: &serde_json::Value, name: &str| -> Output {
        let path = dir.path().join(name);
        std::fs::write(&path, policy.to_string()).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ppml"))
            .args(["attest", "verify", "--quote"])
            .arg(crate_dir().join("../attestation/testdata/sgx_quote"))
            .arg("--collateral")
            .arg(crate_dir().join("../attestation/testdata/sgx_quote_collateral.json"))
            .arg("--policy")
            .arg(&path)
            .args(["--at", FIXTURE_TIME])
            .output()
            .unwrap()
    };
    // The sample platform's TCB level; a real deployment keeps the strict default.
    let widen = |policy: &mut serde_json::Value| {
        policy["accepted_tcb_statuses"] =
            serde_json::json!(["UpToDate", "ConfigurationAndSWHardeningNeeded"]);
        policy["accepted_advisories"] = serde_json::json!(["INTEL-SA-00289", "INTEL-SA-00615"]);
    };

    for (view, signer) in [(&json_view, false), (&text_view, false), (&json_view, true)] {
        let result = policy_from(view, signer);
        assert!(result.status.success(), "{}", stderr(&result));
        let mut policy: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
        let entry = &policy["allowed"][0];
        assert_eq!(entry["tee"], "sgx");
        assert_eq!(entry["mrsigner"], MRSIGNER);
        assert_eq!(entry["isvprodid"], 0);
        if signer {
            assert!(entry.get("mrenclave").is_none(), "{policy}");
            assert_eq!(entry["min_isvsvn"], 0);
        } else {
            assert_eq!(entry["mrenclave"], MRENCLAVE);
        }
        assert_eq!(policy["allow_debug"], false);
        assert_eq!(policy["allow_simulation"], false);

        // As printed (strict TCB): parsed by ppml, refused for the sample's TCB level only.
        let out = verify(&policy, "strict.json");
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("ConfigurationAndSWHardeningNeeded"),
            "{}",
            stderr(&out)
        );
        // With that TCB level accepted, the measured enclave is admitted...
        widen(&mut policy);
        let out = verify(&policy, "widened.json");
        assert!(out.status.success(), "{policy}: {}", stderr(&out));
        // ...and an enclave by another signer is not.
        policy["allowed"][0]["mrsigner"] = serde_json::json!("ab".repeat(32));
        let out = verify(&policy, "other.json");
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    }

    // A debug enclave gets no policy.
    let result = policy_from(
        &json_view.replace(r#""debug_enclave": false"#, r#""debug_enclave": true"#),
        false,
    );
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(stderr(&result).contains("debug"), "{}", stderr(&result));
}

/// Without Gramine, a real build stops before doing anything, with exit 2 and a clear message.
#[test]
fn missing_gramine_tools_are_a_clear_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // A PATH with every program of this one except Gramine's, so that the test runs the same
    // whether Gramine is installed or not.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for path_dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for entry in std::fs::read_dir(&path_dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let link = bin.join(&name);
            if !name.to_string_lossy().starts_with("gramine") && !link.exists() {
                let _ = std::os::unix::fs::symlink(entry.path(), &link);
            }
        }
    }
    let out = dir.path().join("bundle");
    for mode in [&[][..], &["--render-only"]] {
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(mode);
        args.extend_from_slice(&["--", "simple-query", "--input", "/d/in", "--output", "/d/o"]);
        let result = Command::new("bash")
            .arg(build_sh())
            .args(&args)
            .env("PATH", &bin)
            .output()
            .expect("running bash deploy/gramine/build.sh");
        assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
        assert!(
            stderr(&result).contains("Gramine tools not found: gramine-manifest"),
            "{}",
            stderr(&result)
        );
        assert!(!out.exists(), "nothing is written");
    }
}

/// `build.sh -- kms serve ...` bundles a KMS enclave: its data directory is the one directory
/// it may open outside itself, it attests as `sgx` (so it starts sealed), and a root key,
/// passphrase or TLS key from the host is refused.
#[test]
fn a_kms_enclave_writes_only_its_data_directory_and_takes_no_host_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kms-bundle");
    let serve = [
        "kms",
        "serve",
        "--listen",
        "0.0.0.0:9000",
        "--data-dir",
        "/var/lib/ppml/kms",
    ];
    let result = check(&out, &[], &serve);
    assert!(result.status.success(), "{}", stderr(&result));
    // A server has no KMS URL, credentials or policy id of its own to warn about.
    assert!(
        !stderr(&result).contains("--kms-url"),
        "{}",
        stderr(&result)
    );
    let m = manifest(&out);
    let argv = strings(get(&m, "loader.argv"));
    assert_eq!(argv[..5], ["ppml", "--tee", "sgx", "kms", "serve"]);
    assert_eq!(
        strings(get(&m, "sgx.allowed_files")),
        ["file:/var/lib/ppml/kms/"]
    );

    for (extra, refused) in [
        (
            &["--root-key-file", "/var/lib/ppml/kms.root.key"][..],
            "--root-key-file",
        ),
        (
            &["--passphrase-file", "/etc/kms-passphrase"][..],
            "--passphrase-file",
        ),
        (
            &["--tls-cert", "/etc/tls.crt", "--tls-key", "/etc/tls.key"][..],
            "--tls-cert",
        ),
        (&["--insecure-http"][..], "--insecure-http"),
    ] {
        let mut args = serve.to_vec();
        args.extend_from_slice(extra);
        let result = check(&dir.path().join("refused"), &[], &args);
        assert_eq!(
            result.status.code(),
            Some(2),
            "{extra:?}: {}",
            stderr(&result)
        );
        assert!(
            stderr(&result).contains(refused) && stderr(&result).contains("ppml kms unseal"),
            "{}",
            stderr(&result)
        );
    }
    let result = check(
        &dir.path().join("refused"),
        &[],
        &["kms", "serve", "--listen", "0.0.0.0:9000"],
    );
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("needs --data-dir"),
        "{}",
        stderr(&result)
    );
}
