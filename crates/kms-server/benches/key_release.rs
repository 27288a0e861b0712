//! The key-release round trip on loopback (issue 4), with the audit log on as deployed:
//! `Decrypt` of an unmarked key (the baseline), `ReleaseDataKey` of a key marked for attested
//! release (token check, unwrap, HPKE seal, and the client's HPKE open), and a whole
//! attestation (`AttestChallenge` + simulated evidence + `Attest`).
//! `cargo bench -p ppml-kms-server --bench key_release`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ppml_attestation::EvidenceProvider;
use ppml_attestation::Tee;
use ppml_attestation::policy::{AllowedMeasurement, Policy};
use ppml_attestation::service::AttestationService;
use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement};
use ppml_kms::KeyManagementService as _;
use ppml_kms::owner::OwnerKey;
use ppml_kms_client::{RemoteKms, RemoteKmsConfig};
use ppml_kms_server::audit::AuditLog;
use ppml_kms_server::{RootKey, ServerState, Store, router};

/// The aad of a dataset's data keys.
const DS: &[u8] = b"ppml-dataset:0123456789abcdef0123456789abcdef";

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let platform = SimPlatform::load_or_create(dir.path().join("sim.pk8")).unwrap();
    let (root, _) = RootKey::generate().unwrap();
    let seed = root.attestation_seed();
    let audit = AuditLog::open(dir.path(), &root.audit_mac_key()).unwrap();
    let store = Store::open(dir.path(), root).unwrap();
    let mut service = AttestationService::new(store.kms_id(), &seed).unwrap();
    service.accept_simulation();
    let platform_hex = hex::encode(platform.public_key());
    let app = router(Arc::new(
        ServerState::new(store)
            .with_attestation(service)
            .with_audit(audit),
    ));
    let provider: Arc<dyn EvidenceProvider> = Arc::new(SimTee::new(platform));

    let (plain, attested, plain_ref, gated_ref, policy_id) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let config = RemoteKmsConfig::new(url);
        let (owner, _) = OwnerKey::generate().unwrap();
        let creds = RemoteKms::connect(&config, None)
            .await
            .unwrap()
            .enroll_owned(&owner)
            .await
            .unwrap();
        let appid = creds.appid.clone();
        let owner = Arc::new(owner);
        let kms = RemoteKms::connect(&config, Some(creds))
            .await
            .unwrap()
            .with_owner_key(owner.clone());
        let open_key = kms.create_primary_key().await.unwrap();
        let gated_key = kms.create_primary_key().await.unwrap();
        let policy = Policy {
            allow_simulation: true,
            sim_platforms: vec![platform_hex],
            ..Policy::strict(vec![AllowedMeasurement {
                tee: Some(Tee::Sim),
                mrenclave: Some(hex::encode(executable_measurement().unwrap())),
                ..AllowedMeasurement::default()
            }])
        };
        let policy_id = kms.upload_policy(&policy).await.unwrap();
        kms.set_release_policy(&gated_key, &policy_id)
            .await
            .unwrap();
        let (_, plain_ref) = kms.generate_data_key(&open_key, DS).await.unwrap();
        let (_, gated_ref) = kms.generate_data_key(&gated_key, DS).await.unwrap();
        // The owner's grant of a job reading the dataset of `DS`, as a granted runtime sends
        // it with every release.
        let grant = ppml_kms::grant::JobGrant {
            version: 1,
            appid,
            job_id: "0123456789abcdef0123456789abcdef".into(),
            application: ppml_kms::grant::GrantedApp::SimpleQuery,
            inputs: vec![ppml_kms::grant::GrantedInput {
                dataset_id: "0123456789abcdef0123456789abcdef".into(),
                key_id: gated_key.0.clone(),
                manifest_sha256: None,
            }],
            output: None,
            reveal_counts: false,
            not_after: u64::MAX,
        };
        let grant = ppml_kms::grant::SignedGrant::sign(&grant, &owner).unwrap();
        let attested = kms
            .clone()
            .attest(Arc::clone(&provider), &policy_id)
            .await
            .unwrap()
            .with_grant(&grant)
            .unwrap();
        (kms, attested, plain_ref, gated_ref, policy_id)
    });

    let mut group = c.benchmark_group("key_release");
    group.sample_size(50);
    group.bench_function("decrypt_round_trip_unmarked_key", |b| {
        b.iter(|| {
            runtime
                .block_on(plain.unwrap_data_key(&plain_ref, DS))
                .unwrap()
        })
    });
    group.bench_function("release_round_trip_attested", |b| {
        b.iter(|| {
            runtime
                .block_on(attested.unwrap_data_key(&gated_ref, DS))
                .unwrap()
        })
    });
    group.bench_function("attest_round_trip_sim", |b| {
        b.iter(|| {
            let kms = plain.clone();
            runtime
                .block_on(kms.attest(Arc::clone(&provider), &policy_id))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
