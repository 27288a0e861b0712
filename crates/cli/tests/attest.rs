//! `ppml attest verify` on the real SGX sample quote: claims out, policy judged, tampering
//! and wrong times refused with the documented exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

/// 2025-07-01T00:00:00Z, inside the fixture collateral's validity window.
const FIXTURE_TIME: &str = "1751328000";
const MRENCLAVE: &str = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb";

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../attestation/testdata")
    .join(name)
}

fn verify(quote: &PathBuf, policy: Option<&PathBuf>, at: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppml"));
    cmd.args(["attest", "verify", "--quote"])
        .arg(quote)
        .arg("--collateral")
        .arg(testdata("sgx_quote_collateral.json"))
        .args(["--at", at]);
    if let Some(policy) = policy {
        cmd.arg("--policy").arg(policy);
    }
    cmd.output().unwrap()
}

#[test]
fn sgx_quote_claims_and_policies() {
    let dir = tempfile::tempdir().unwrap();
    let quote = testdata("sgx_quote");

    let out = verify(&quote, None, FIXTURE_TIME);
    assert!(out.status.success(), "{out:?}");
    // The same instant as RFC 3339; a malformed time is a usage error.
    let rfc3339 = verify(&quote, None, "2025-07-01T00:00:00Z");
    assert_eq!(rfc3339.stdout, out.stdout);
    assert_eq!(verify(&quote, None, "July 1st").status.code(), Some(2));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["tee"], "sgx");
    assert_eq!(claims["measurements"]["mrenclave"], MRENCLAVE);
    assert_eq!(claims["tcb_status"], "ConfigurationAndSWHardeningNeeded");

    // The strict default refuses this platform's TCB status: exit 4.
    let strict = dir.path().join("strict.json");
    std::fs::write(
        &strict,
        format!(r#"{{"allowed": [{{"tee": "sgx", "mrenclave": "{MRENCLAVE}"}}]}}"#),
    )
    .unwrap();
    let out = verify(&quote, Some(&strict), FIXTURE_TIME);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Attestation Fail!"), "{stderr}");
    assert!(
        stderr.contains("ConfigurationAndSWHardeningNeeded"),
        "{stderr}"
    );

    // Widened explicitly, it accepts.
    let widened = dir.path().join("widened.json");
    std::fs::write(
        &widened,
        format!(
            r#"{{"allowed": [{{"tee": "sgx", "mrenclave": "{MRENCLAVE}"}}],
                "accepted_tcb_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"],
                "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]}}"#
        ),
    )
    .unwrap();
    let out = verify(&quote, Some(&widened), FIXTURE_TIME);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Attestation Success!"));

    // Another enclave is refused even by the widened policy.
    let other = dir.path().join("other.json");
    std::fs::write(
        &other,
        std::fs::read_to_string(&widened)
            .unwrap()
            .replace(MRENCLAVE, &"ab".repeat(32)),
    )
    .unwrap();
    assert_eq!(
        verify(&quote, Some(&other), FIXTURE_TIME).status.code(),
        Some(4)
    );

    // A tampered quote, or a time outside the collateral window: exit 3.
    let mut bytes = std::fs::read(&quote).unwrap();
    bytes[200] ^= 1;
    let tampered = dir.path().join("tampered");
    std::fs::write(&tampered, bytes).unwrap();
    assert_eq!(
        verify(&tampered, Some(&widened), FIXTURE_TIME)
            .status
            .code(),
        Some(3)
    );
    assert_eq!(verify(&quote, None, "1760000000").status.code(), Some(3));
}

/// `--pccs-url` without `--collateral`: an unreachable PCCS is named in the error; collateral
/// already in the cache (and not expired at the verification time) is used instead.
#[test]
fn collateral_from_an_unreachable_pccs_falls_back_to_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pccs = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let quote = testdata("sgx_quote");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ppml"))
            .env("PPML_HOME", dir.path().join("home"))
            .args(["attest", "verify", "--quote"])
            .arg(&quote)
            .args(["--pccs-url", &pccs, "--collateral-refresh", "0"])
            .arg("--collateral-cache")
            .arg(&cache)
            .args(["--at", FIXTURE_TIME])
            .output()
            .unwrap()
    };

    let out = run();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&pccs), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");

    let platform =
        ppml_attestation::pccs::Platform::of_quote(&std::fs::read(&quote).unwrap()).unwrap();
    std::fs::copy(
        testdata("sgx_quote_collateral.json"),
        ppml_attestation::pccs::cache_file(&cache, &platform),
    )
    .unwrap();
    let out = run();
    assert!(out.status.success(), "{out:?}");
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["measurements"]["mrenclave"], MRENCLAVE);

    // Neither --collateral nor --pccs-url: a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_ppml"))
        .args(["attest", "verify", "--quote"])
        .arg(&quote)
        .env_remove("PPML_PCCS_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
