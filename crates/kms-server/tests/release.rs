//! Attestation-gated key release through the real client ([`ppml_kms_client::RemoteKms`]) against a
//! server on loopback: a runtime attests again when its token is about to expire, and a
//! server that only issues already-expired tokens releases nothing.

use std::sync::Arc;

use ppml_attestation::Tee;
use ppml_attestation::policy::{AllowedMeasurement, Policy};
use ppml_attestation::service::AttestationService;
use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement};
use ppml_kms::owner::OwnerKey;
use ppml_kms::{KeyManagementService as _, KmsError};
use ppml_kms_client::{RemoteKms, RemoteKmsConfig};
use ppml_kms_server::audit::AuditLog;
use ppml_kms_server::{RootKey, ServerState, Store, router};

struct Fixture {
    dir: tempfile::TempDir,
    url: String,
    platform_key: std::path::PathBuf,
}

/// A server accepting simulated TEEs, issuing tokens valid for `token_ttl` s, and a fresh
/// simulation platform (which the app's policy names).
async fn start(token_ttl: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let platform_key = dir.path().join("sim.pk8");
    let (root, _) = RootKey::generate().unwrap();
    let seed = root.attestation_seed();
    let audit = AuditLog::open(dir.path(), &root.audit_mac_key()).unwrap();
    let store = Store::open(dir.path(), root).unwrap();
    let mut service = AttestationService::new(store.kms_id(), &seed).unwrap();
    service.accept_simulation();
    service.set_token_ttl(token_ttl);
    let app = router(Arc::new(
        ServerState::new(store)
            .with_attestation(service)
            .with_audit(audit),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Fixture {
        dir,
        url,
        platform_key,
    }
}

/// An app whose new primary key releases data keys only to this test binary in the
/// simulated TEE; returns the client, the key and the policy id.
async fn gated_key(
    fixture: &Fixture,
) -> (
    RemoteKms,
    ppml_kms::PrimaryKeyId,
    String,
    ppml_kms::grant::SignedGrant,
) {
    let config = RemoteKmsConfig::new(fixture.url.clone());
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
    let primary = kms.create_primary_key().await.unwrap();
    let platform = SimPlatform::load_or_create(&fixture.platform_key).unwrap();
    let policy = Policy {
        allow_simulation: true,
        sim_platforms: vec![hex::encode(platform.public_key())],
        ..Policy::strict(vec![AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }])
    };
    let policy_id = kms.upload_policy(&policy).await.unwrap();
    kms.set_release_policy(&primary, &policy_id).await.unwrap();
    // The owner's grant of a job reading the dataset `DS` names.
    let grant = ppml_kms::grant::JobGrant {
        version: 1,
        appid,
        job_id: "0123456789abcdef0123456789abcdef".into(),
        application: ppml_kms::grant::GrantedApp::SimpleQuery,
        inputs: vec![ppml_kms::grant::GrantedInput {
            dataset_id: DATASET_ID.into(),
            key_id: primary.0.clone(),
            manifest_sha256: None,
        }],
        output: None,
        reveal_counts: false,
        not_after: u64::MAX,
    };
    let grant = ppml_kms::grant::SignedGrant::sign(&grant, &owner).unwrap();
    (kms, primary, policy_id, grant)
}

const DATASET_ID: &str = "0123456789abcdef0123456789abcdef";
/// The aad of the data keys of dataset `DATASET_ID`.
const DS: &[u8] = b"ppml-dataset:0123456789abcdef0123456789abcdef";

fn audit_count(fixture: &Fixture, action: &str, outcome: &str) -> usize {
    std::fs::read_to_string(fixture.dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|line| line["action"] == action && line["outcome"] == outcome)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_attests_again_before_its_token_expires() {
    let fixture = start(2).await;
    let (kms, primary, policy_id, grant) = gated_key(&fixture).await;
    let (data_key, reference) = kms.generate_data_key(&primary, DS).await.unwrap();
    // Unattested, the server refuses the gated key.
    let refused = kms.unwrap_data_key(&reference, DS).await.unwrap_err();
    assert!(
        matches!(refused, KmsError::AttestationRequired),
        "{refused}"
    );
    let tee = SimTee::new(SimPlatform::load_or_create(&fixture.platform_key).unwrap());
    let kms = kms
        .attest(Arc::new(tee), &policy_id)
        .await
        .unwrap()
        .with_grant(&grant)
        .unwrap();

    let released = kms.unwrap_data_key(&reference, DS).await.unwrap();
    assert_eq!(released.expose_secret(), data_key.expose_secret());
    assert_eq!(audit_count(&fixture, "Attest", "ok"), 1);

    // Past the token's lifetime: the client attests again on its own, and the release works.
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let released = kms.unwrap_data_key(&reference, DS).await.unwrap();
    assert_eq!(released.expose_secret(), data_key.expose_secret());
    assert_eq!(audit_count(&fixture, "Attest", "ok"), 2);
    assert_eq!(audit_count(&fixture, "ReleaseDataKey", "ok"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_release_nothing() {
    // Tokens that expire the second they are issued: the client renews once when the server
    // says "expired", then gives up with a specific error.
    let fixture = start(0).await;
    let (kms, primary, policy_id, grant) = gated_key(&fixture).await;
    let (_, reference) = kms.generate_data_key(&primary, DS).await.unwrap();
    let tee = SimTee::new(SimPlatform::load_or_create(&fixture.platform_key).unwrap());
    let kms = kms
        .attest(Arc::new(tee), &policy_id)
        .await
        .unwrap()
        .with_grant(&grant)
        .unwrap();
    let err = kms.unwrap_data_key(&reference, DS).await.unwrap_err();
    assert!(matches!(err, KmsError::TokenExpired), "{err}");
    assert_eq!(audit_count(&fixture, "ReleaseDataKey", "ok"), 0);
    assert!(
        audit_count(
            &fixture,
            "ReleaseDataKey",
            "attestation token expired (attest again)"
        ) >= 1
    );
    assert!(audit_count(&fixture, "Attest", "ok") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unattested_client_gets_no_gated_key_whatever_it_sends() {
    let fixture = start(300).await;
    let (kms, primary, _, _) = gated_key(&fixture).await;
    let (_, reference) = kms.generate_data_key(&primary, DS).await.unwrap();
    let refused = kms.unwrap_data_key(&reference, DS).await.unwrap_err();
    assert!(
        matches!(refused, KmsError::AttestationRequired),
        "{refused}"
    );
    // `RemoteKms` never asks for ReleaseDataKey; a hand-made request with a forged token or
    // none is refused too.
    let ciphertext = String::from_utf8(reference.wrapped.clone()).unwrap();
    for token in ["", "eyJhbGciOiJFZERTQSJ9.eyJleHAiOjk5OTk5OTk5OTl9.c2ln"] {
        let refused = kms
            .call(
                ppml_kms::protocol::Action::ReleaseDataKey,
                serde_json::json!({"keyid": primary.0, "ciphertext": ciphertext, "aad": "ds",
                                   "token": token}),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                KmsError::Attestation(_) | KmsError::Rejected { .. }
            ),
            "{token:?}: {refused}"
        );
    }
    assert_eq!(audit_count(&fixture, "ReleaseDataKey", "ok"), 0);
}
