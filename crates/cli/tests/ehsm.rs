//! ppml as a client of eHSM-KMS, the KMS BigDL PPML deploys: against emulations of eHSM 0.3.2
//! and of eHSM's main branch (compat/ehsm_emulator.py, written from their validation and
//! signing rules), enroll, create a key, encrypt, query and decrypt work with the dialect
//! learnt from `GetVersion`, and a wrong dialect fails with eHSM's own refusal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Process, ppml, run, spawn_and_read, stdout};

fn compat(script: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../compat")
    .join(script)
}

/// Starts the emulator of eHSM `version`; returns it and its URL.
fn emulator(version: &str) -> (Process, String) {
    let mut cmd = Command::new("python3");
    cmd.arg(compat("ehsm_emulator.py"))
        .args(["--version", version]);
    let (process, line) = spawn_and_read(cmd, "listening ", false);
    let url = line.strip_prefix("listening ").unwrap().to_string();
    (process, url)
}

struct App {
    home: PathBuf,
    url: String,
    appid: String,
    apikey: String,
}

impl App {
    fn enroll(home: &Path, url: &str) -> App {
        let text = stdout(&run(ppml(home).args(["kms", "enroll", "--kms-url", url])));
        let value = |name: &str| common::printed_value(&text, name);
        App {
            home: home.to_path_buf(),
            url: url.to_string(),
            appid: value("appid"),
            apikey: value("apikey"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = ppml(&self.home);
        cmd.env("PPML_KMS_URL", &self.url)
            .env("PPML_APPID", &self.appid)
            .env("PPML_APIKEY", &self.apikey);
        cmd
    }
}

#[test]
fn ppml_works_with_ehsm_0_3_and_ehsm_main() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("people.csv");
    run(ppml(&dir.path().join("gen"))
        .args([
            "generate", "people", "--rows", "2000", "--seed", "7", "--out",
        ])
        .arg(&input));
    let plaintext = std::fs::read_to_string(&input).unwrap();
    for (version, wrong_flavor, wrong_refusal) in [
        // 0.3.2 signs no nonce: a main-dialect request is a bad signature (access denied).
        ("0.3.2", "ehsm", "sign error"),
        // main needs keyusage on CreateKey, which 0.3 requests lack.
        ("main", "ehsm-0.3", "The keyusage cannot be empty"),
    ] {
        let (_emulator, url) = emulator(version);
        let app = App::enroll(&dir.path().join(format!("home-{version}")), &url);
        let key = stdout(&run(app.cmd().args(["kms", "create-key"])))
            .trim()
            .to_string();
        assert_eq!(key.len(), 36, "{version}: eHSM key ids are UUIDs: {key}");
        let enc = dir.path().join(format!("people-{version}.enc"));
        run(app
            .cmd()
            .env("PPML_PRIMARY_KEY", &key)
            .args(["encrypt", "--partitions", "2", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&enc));
        let counted = run(app
            .cmd()
            .env("PPML_PRIMARY_KEY", &key)
            .args(["query", "--table"])
            .arg(format!("people={}", enc.display()))
            .args(["--sql", "SELECT count(*) AS n FROM people"]));
        assert!(
            stdout(&counted).contains("| 2000 "),
            "{version}: {}",
            stdout(&counted)
        );
        let decrypted = run(app
            .cmd()
            .env("PPML_PRIMARY_KEY", &key)
            .args(["decrypt", "--out", "-", "--in"])
            .arg(&enc));
        assert_eq!(stdout(&decrypted), plaintext, "{version}");

        // Another app's credentials do not unwrap this app's keys.
        let other = App::enroll(&dir.path().join(format!("other-{version}")), &url);
        let out = other
            .cmd()
            .args(["decrypt", "--out", "-", "--in"])
            .arg(&enc)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(4),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The other dialect is refused by the server, with its own message.
        let out = app
            .cmd()
            .args(["kms", "create-key", "--kms-flavor", wrong_flavor])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{version} spoken as {wrong_flavor}");
        assert!(
            stderr.contains(wrong_refusal)
                || (wrong_refusal == "sign error" && out.status.code() == Some(4)),
            "{version} as {wrong_flavor}: {stderr}"
        );
    }
}
