//! Benchmarks of the verifier (issue 4): DCAP quote verification with the collateral already
//! in memory (as the PCCS cache keeps it), simulated-TEE evidence, the whole local
//! attestation (challenge, evidence, verification, policy, signed token), and the HPKE seal
//! and open of a released data key. `cargo bench -p ppml-attestation`.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use ppml_attestation::Tee;
use ppml_attestation::dcap::{Collateral, verify_quote};
use ppml_attestation::evidence::EvidenceProvider as _;
use ppml_attestation::policy::{AllowedMeasurement, Policy};
use ppml_attestation::release::{RuntimeKey, seal_to};
use ppml_attestation::service::{AttestationRequest, AttestationService, expected_report_data};
use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement, verify_sim};

/// 2025-07-01T00:00:00Z, inside the fixtures' collateral validity windows.
const FIXTURE_TIME: u64 = 1_751_328_000;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("testdata")
    .join(name)
}

fn bench(c: &mut Criterion) {
    for tee in ["sgx", "tdx"] {
        let quote = std::fs::read(testdata(&format!("{tee}_quote"))).unwrap();
        let collateral =
            Collateral::from_file(&testdata(&format!("{tee}_quote_collateral.json"))).unwrap();
        c.bench_function(
            &format!("attestation/verify_{tee}_quote_cached_collateral"),
            |b| b.iter(|| verify_quote(&quote, &collateral, FIXTURE_TIME).unwrap()),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let platform = SimPlatform::load_or_create(dir.path().join("sim.pk8")).unwrap();
    let trusted = [platform.public_key()];
    let mut service = AttestationService::new("bench", &[9; 32]).unwrap();
    service.accept_simulation();
    let tee = SimTee::new(platform);
    let evidence = tee.evidence(&[1; 64]).unwrap();
    c.bench_function("attestation/verify_sim_quote", |b| {
        b.iter(|| verify_sim(&evidence.quote, &trusted).unwrap())
    });

    let policy = Policy {
        allow_simulation: true,
        sim_platforms: vec![hex::encode(trusted[0])],
        ..Policy::strict(vec![AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }])
    };
    c.bench_function("attestation/attest_sim_locally", |b| {
        b.iter(|| {
            let runtime = RuntimeKey::generate();
            let nonce = service.challenge(FIXTURE_TIME).unwrap();
            let evidence = tee
                .evidence(&expected_report_data(&nonce, &runtime.public_bytes()))
                .unwrap();
            service
                .attest(
                    &AttestationRequest {
                        app: "app",
                        policy_name: "p",
                        policy: &policy,
                        nonce: &nonce,
                        runtime_key: &runtime.public_bytes(),
                        receipt_key: None,
                        evidence: &evidence,
                    },
                    FIXTURE_TIME,
                )
                .unwrap()
        })
    });

    let runtime = RuntimeKey::generate();
    let public = runtime.public_bytes();
    c.bench_function("attestation/hpke_seal_and_open_data_key", |b| {
        b.iter(|| {
            let (encapsulated, sealed) = seal_to(&public, &[5; 32], b"key-1").unwrap();
            runtime.open(&encapsulated, &sealed, b"key-1").unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
