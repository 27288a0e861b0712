//! The crash-consistency campaign (`scripts/crash-campaign`, docs/reliability.md §2), short:
//! encrypt, simple-query, decrypt, encrypt to S3 (moto) and the KMS server under load, each
//! SIGKILLed at random moments, then checked for visible partial outputs, plaintext left on
//! disk or in the bucket, and lost acknowledged keys, data keys and policies. A second run
//! against a ppml that leaks plaintext shows that the campaign catches it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn campaign(ppml: &std::ffi::OsStr, args: &[&str]) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/crash-campaign");
    Command::new("python3")
        .arg(script)
        .args(args)
        .arg("--ppml")
        .arg(ppml)
        .output()
        .expect("python3 runs scripts/crash-campaign")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn killed_at_random_ppml_leaves_no_partial_output_no_plaintext_and_loses_no_key() {
    let ppml = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_ppml"));
    let out = campaign(ppml, &["--trials", "12", "--rows", "300000", "--seed", "7"]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for kind in ["encrypt", "simple-query", "decrypt", "s3"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("{kind}: 12 trials"))),
            "{report}"
        );
    }
    assert!(report.contains("kms: 12 kills under load"), "{report}");
    // Some kill must land mid-run, or the campaign tested nothing.
    let killed: u32 = report
        .lines()
        .filter_map(|l| l.split(", ").nth(1)?.strip_suffix(" killed mid-run"))
        .map(|n| n.parse::<u32>().unwrap())
        .sum();
    assert!(killed >= 12, "{report}");
    assert!(report.trim_end().ends_with("no violation"), "{report}");
}

#[test]
fn the_campaign_catches_plaintext_and_staging_left_behind() {
    // A ppml that copies its input in the clear to its temporary directory before encrypting,
    // and leaves a hidden staging directory that no later run removes.
    let dir = tempfile::tempdir().unwrap();
    let leaky = dir.path().join("leaky-ppml");
    std::fs::write(
        &leaky,
        format!(
            "#!/bin/sh\nif [ \"$1\" = encrypt ] && [ -n \"$TMPDIR\" ]; then cp \"$3\" \"$TMPDIR/.spill\"; mkdir -p \"$TMPDIR/.stuck.ppml-tmp-x\"; fi\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_ppml")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&leaky, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = campaign(
        leaky.as_os_str(),
        &["--trials", "6", "--rows", "100000", "--only", "encrypt"],
    );
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(": plaintext left in ['.spill']"),
        "{report}"
    );
    // At least one of 6 kills lands before the commit (each does with odds of about 0.8).
    assert!(
        report.contains(": the next run left the killed run's staging in place"),
        "{report}"
    );
}
