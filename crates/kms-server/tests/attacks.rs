//! The host's attacks on the KMS (`docs/threat-model.md`), each one a test that the attack
//! fails, with the refusal it gets.
//!
//! The attacker is root on a machine that runs the owner's jobs: it holds the app id and api
//! key that jobs use (from their environment), can send any request to the KMS, can run the
//! attested runtime binary, and can replay what it captured. It does not hold the owner's
//! key (`ppml_kms::owner`), which stays on the owner's machine.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use ppml_attestation::Tee;
use ppml_attestation::policy::{AllowedMeasurement, Policy};
use ppml_attestation::service::AttestationService;
use ppml_attestation::sim::{SimPlatform, SimTee, executable_measurement};
use ppml_kms::grant::{
    DATASET_AAD_PREFIX, GrantedApp, GrantedInput, GrantedOutput, JobGrant, SHUFFLE_AAD_PREFIX,
    SignedGrant,
};
use ppml_kms::owner::OwnerKey;
use ppml_kms::protocol::Action;
use ppml_kms::{AppCredentials, KeyManagementService as _, KmsError, PrimaryKeyId};
use ppml_kms_client::{AttestedKms, RemoteKms, RemoteKmsConfig};
use ppml_kms_server::audit::AuditLog;
use ppml_kms_server::{RootKey, ServerState, Store, router};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// A KMS server on loopback over a store in `dir`, accepting simulated TEEs, and the host's
/// simulation platform (`platform_key`), which the owner's policy names.
struct Kms {
    url: String,
    router: axum::Router,
    platform_key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start() -> Kms {
    let dir = tempfile::tempdir().unwrap();
    let platform_key = dir.path().join("sim.pk8");
    let (root, _) = RootKey::generate().unwrap();
    let seed = root.attestation_seed();
    let audit = AuditLog::open(dir.path(), &root.audit_mac_key()).unwrap();
    let store = Store::open(dir.path(), root).unwrap();
    let mut service = AttestationService::new(store.kms_id(), &seed).unwrap();
    service.accept_simulation();
    let router = router(Arc::new(
        ServerState::new(store)
            .with_attestation(service)
            .with_audit(audit),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = router.clone();
    tokio::spawn(async move { axum::serve(listener, served).await.unwrap() });
    Kms {
        url,
        router,
        platform_key,
        _dir: dir,
    }
}

/// The owner's side: an app enrolled with the owner's key, a key marked for release to this
/// test binary in the simulated TEE, and the owner's client.
struct Owner {
    kms: RemoteKms,
    creds: AppCredentials,
    gated: PrimaryKeyId,
    policy_id: String,
    key: Arc<OwnerKey>,
}

/// The host's simulation platform's public key, as a policy names it.
fn host_platform(kms: &Kms) -> String {
    hex::encode(
        SimPlatform::load_or_create(&kms.platform_key)
            .unwrap()
            .public_key(),
    )
}

/// The owner's policy: this test binary, in the simulated TEE of the host's platform.
fn sim_policy(kms: &Kms) -> Policy {
    Policy {
        allow_simulation: true,
        sim_platforms: vec![host_platform(kms)],
        ..Policy::strict(vec![AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }])
    }
}

async fn owner(kms: &Kms) -> Owner {
    let config = RemoteKmsConfig::new(kms.url.clone());
    let (owner_key, _) = OwnerKey::generate().unwrap();
    let creds = RemoteKms::connect(&config, None)
        .await
        .unwrap()
        .enroll_owned(&owner_key)
        .await
        .unwrap();
    let owner_key = Arc::new(owner_key);
    let client = RemoteKms::connect(&config, Some(creds.clone()))
        .await
        .unwrap()
        .with_owner_key(owner_key.clone());
    let gated = client.create_primary_key().await.unwrap();
    let policy_id = client.upload_policy(&sim_policy(kms)).await.unwrap();
    client.set_release_policy(&gated, &policy_id).await.unwrap();
    Owner {
        kms: client,
        creds,
        gated,
        policy_id,
        key: owner_key,
    }
}

const DATASET: &str = "0123456789abcdef0123456789abcdef";
const OTHER_DATASET: &str = "fedcba9876543210fedcba9876543210";
const JOB: &str = "00112233445566778899aabbccddeeff";

fn dataset_aad(id: &str) -> Vec<u8> {
    format!("{DATASET_AAD_PREFIX}{id}").into_bytes()
}

/// The owner's grant of a job reading `DATASET` under the gated key and writing under
/// `output_key`.
fn job_grant(owner: &Owner, output_key: &PrimaryKeyId) -> JobGrant {
    JobGrant {
        version: 1,
        appid: owner.creds.appid.clone(),
        job_id: JOB.into(),
        application: GrantedApp::SimpleQuery,
        inputs: vec![GrantedInput {
            dataset_id: DATASET.into(),
            key_id: owner.gated.0.clone(),
            manifest_sha256: None,
        }],
        output: Some(GrantedOutput {
            location: "/results/out.enc".into(),
            key_id: output_key.0.clone(),
            overwrite: false,
        }),
        reveal_counts: false,
        not_after: now_ms() / 1000 + 600,
    }
}

/// An app enrolled as eHSM enrolls (no owner key), and its client.
async fn ownerless_app(kms: &Kms) -> (AppCredentials, RemoteKms) {
    let config = RemoteKmsConfig::new(kms.url.clone());
    let creds = RemoteKms::connect(&config, None)
        .await
        .unwrap()
        .enroll()
        .await
        .unwrap();
    let app = RemoteKms::connect(&config, Some(creds.clone()))
        .await
        .unwrap();
    (creds, app)
}

/// What the host has: the app's credentials, no owner key.
async fn host(kms: &Kms, owner: &Owner) -> RemoteKms {
    let config = RemoteKmsConfig::new(kms.url.clone());
    RemoteKms::connect(&config, Some(owner.creds.clone()))
        .await
        .unwrap()
}

/// The host's attested runtime: the genuine binary in the simulated TEE, attested with the
/// app's credentials under the owner's policy.
async fn runtime(kms: &Kms, host: &RemoteKms, owner: &Owner) -> AttestedKms {
    host.clone()
        .attest(sim_tee(kms), &owner.policy_id)
        .await
        .unwrap()
}

fn sim_tee(kms: &Kms) -> Arc<SimTee> {
    Arc::new(SimTee::new(
        SimPlatform::load_or_create(&kms.platform_key).unwrap(),
    ))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A body signed with the api key, as the host can make any: `action` names the action it
/// is signed for (`None`: eHSM's envelope without one).
fn signed_body(creds: &AppCredentials, action: Option<&str>, payload: Value) -> Value {
    let nonce = hex::encode(ppml_kms::sealing::random::<12>().unwrap());
    let mut body = json!({"appid": creds.appid, "payload": payload,
                          "timestamp": now_ms().to_string(), "nonce": nonce});
    if let Some(action) = action {
        body["action"] = json!(action);
    }
    let sign = ppml_kms::ehsm::sign(&creds.apikey, body.as_object().unwrap());
    body["sign"] = json!(sign);
    body
}

/// `POST /ehsm?Action=action` with `body`.
fn post_request(action: &str, body: &Value) -> Request<Body> {
    Request::post(format!("/ehsm?Action={action}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// `GET /ehsm?Action=action`.
fn get_request(action: &str) -> Request<Body> {
    Request::get(format!("/ehsm?Action={action}"))
        .body(Body::empty())
        .unwrap()
}

/// The JSON answer of `router` to `request`.
async fn ask(router: &axum::Router, request: Request<Body>) -> Value {
    let response = router.clone().oneshot(request).await.unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn post(kms: &Kms, action: &str, body: &Value) -> Value {
    ask(&kms.router, post_request(action, body)).await
}

fn assert_refused(answer: &Value, kind: &str) {
    assert_eq!(answer["code"], 400, "{answer}");
    assert_eq!(answer["kind"], kind, "{answer}");
}

/// Attack 1, policy swap: with the api key, upload a permissive policy and bind the owner's
/// gated key to it, then release the key to any runtime. Refused: binding a key to a policy
/// needs the owner's signature, and the key keeps the owner's policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_policy_swap_with_the_api_key_is_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let permissive = Policy {
        allow_simulation: true,
        sim_platforms: vec![host_platform(&kms)],
        allow_debug: true,
        ..Policy::strict(vec![AllowedMeasurement::default()])
    };
    let permissive_id = host.upload_policy(&permissive).await.unwrap();
    let refused = host
        .set_release_policy(&owner.gated, &permissive_id)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, KmsError::OwnerSignatureRequired),
        "{refused}"
    );
    // A hand-made request with the host's own owner signature is refused as well.
    let (stranger, _) = OwnerKey::generate().unwrap();
    let mut body = signed_body(
        &owner.creds,
        Some("SetKeyReleasePolicy"),
        json!({"keyid": owner.gated.0, "policyId": permissive_id}),
    );
    let object = body.as_object_mut().unwrap();
    object.remove("sign");
    let forged = stranger.sign_request(object);
    object.insert("owner_sign".into(), json!(forged));
    let sign = ppml_kms::ehsm::sign(&owner.creds.apikey, object);
    object.insert("sign".into(), json!(sign));
    assert_refused(
        &post(&kms, "SetKeyReleasePolicy", &body).await,
        "owner_signature_required",
    );

    // A runtime attested under the permissive policy gets nothing: the key kept the owner's.
    let (_, reference) = owner
        .kms
        .generate_data_key(&owner.gated, b"ds")
        .await
        .unwrap();
    let runtime = host
        .clone()
        .attest(sim_tee(&kms), &permissive_id)
        .await
        .unwrap();
    let refused = runtime
        .unwrap_data_key(&reference, b"ds")
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, KmsError::Attestation(reason) if reason.contains("another app or policy")),
        "{refused}"
    );
}

/// Attack 1b: an app enrolled without an owner key (eHSM's way) cannot mark keys at all, so
/// no key is ever "gated" by a protection its api key could undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_gating_without_an_owner_is_refused() {
    let kms = start().await;
    let (_, app) = ownerless_app(&kms).await;
    let key = app.create_primary_key().await.unwrap();
    let policy_id = app.upload_policy(&sim_policy(&kms)).await.unwrap();
    let refused = app.set_release_policy(&key, &policy_id).await.unwrap_err();
    assert!(
        matches!(refused, KmsError::OwnerSignatureRequired),
        "{refused}"
    );
}

/// Attack 4b, known data keys: `GenerateDataKey` or `Encrypt` on the owner's marked key would
/// give the host a data key it knows, which attested runtimes would then accept. Both need the
/// owner's signature; `GenerateDataKeyWithoutPlaintext` (nothing known) stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_known_data_keys_under_a_marked_key_are_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let refused = host
        .generate_data_key(&owner.gated, b"ds")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, KmsError::OwnerSignatureRequired),
        "{refused}"
    );
    let refused = host
        .call(
            Action::Encrypt,
            json!({"keyid": owner.gated.0, "plaintext": "AAAA", "aad": "ds"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, KmsError::OwnerSignatureRequired),
        "{refused}"
    );
    host.call(
        Action::GenerateDataKeyWithoutPlaintext,
        json!({"keyid": owner.gated.0, "keylen": 32, "aad": "ds"}),
    )
    .await
    .unwrap();
    // The owner can, and so can an attested runtime under the owner's grant, which gets the
    // key (here the job's shuffle key) sealed to itself.
    owner
        .kms
        .generate_data_key(&owner.gated, b"ds")
        .await
        .unwrap();
    let grant = SignedGrant::sign(&job_grant(&owner, &owner.gated), &owner.key).unwrap();
    let runtime = runtime(&kms, &host, &owner)
        .await
        .with_grant(&grant)
        .unwrap();
    let shuffle = format!("{SHUFFLE_AAD_PREFIX}{JOB}").into_bytes();
    let (data_key, reference) = runtime
        .generate_data_key(&owner.gated, &shuffle)
        .await
        .unwrap();
    let released = runtime.unwrap_data_key(&reference, &shuffle).await.unwrap();
    assert_eq!(released.expose_secret(), data_key.expose_secret());
}

/// Attack 4, input substitution: the host makes its own key, a data key it knows under it,
/// and offers that wrapped key to an attested runtime as if it were the owner's. The runtime
/// refuses it: it reads only keys the owner marked, never through `Decrypt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_input_under_a_host_made_key_is_refused_by_attested_runtimes() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let forged_key = host.create_primary_key().await.unwrap();
    let (_, forged_reference) = host.generate_data_key(&forged_key, b"ds").await.unwrap();
    let runtime = runtime(&kms, &host, &owner).await;
    let refused = runtime
        .unwrap_data_key(&forged_reference, b"ds")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, KmsError::NotMarkedForRelease),
        "{refused}"
    );
    assert!(refused.is_access_denied());
}

/// Attack 2, jobs nobody granted: the host, with the api key and the attested runtime binary
/// (or a cluster certificate, which lets it submit any job to the runtimes), asks for the
/// owner's data keys for a job of its own. Refused unless the request carries the owner's
/// grant naming the dataset: no grant, a grant signed by another key, an edited, expired or
/// other app's grant, or a grant of other datasets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_job_the_owner_did_not_grant_gets_no_key() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let (_, reference) = owner
        .kms
        .generate_data_key(&owner.gated, &dataset_aad(DATASET))
        .await
        .unwrap();
    let runtime = runtime(&kms, &host, &owner).await;
    let grant_refused = |result: Result<ppml_kms::DataKey, KmsError>, why: &str| {
        let refused = result.err().unwrap_or_else(|| panic!("{why}: released"));
        assert!(
            matches!(&refused, KmsError::GrantRefused(_)),
            "{why}: {refused}"
        );
        assert!(refused.is_access_denied(), "{why}");
    };
    grant_refused(
        runtime
            .unwrap_data_key(&reference, &dataset_aad(DATASET))
            .await,
        "no grant",
    );
    let (stranger, _) = OwnerKey::generate().unwrap();
    let grant = job_grant(&owner, &owner.gated);
    let mut expired = grant.clone();
    expired.not_after = now_ms() / 1000 - 1;
    let mut other_app = grant.clone();
    other_app.appid = "another-app".into();
    let mut other_inputs = grant.clone();
    other_inputs.inputs[0].dataset_id = OTHER_DATASET.into();
    let signed = SignedGrant::sign(&grant, &owner.key).unwrap();
    let mut widened = grant.clone();
    widened.inputs.push(GrantedInput {
        dataset_id: OTHER_DATASET.into(),
        key_id: owner.gated.0.clone(),
        manifest_sha256: None,
    });
    let edited = SignedGrant {
        grant: SignedGrant::sign(&widened, &stranger).unwrap().grant,
        signature: signed.signature.clone(),
    };
    for (why, forged) in [
        (
            "signed by another key",
            SignedGrant::sign(&grant, &stranger).unwrap(),
        ),
        ("edited after signing", edited),
        ("expired", SignedGrant::sign(&expired, &owner.key).unwrap()),
        (
            "another app's",
            SignedGrant::sign(&other_app, &owner.key).unwrap(),
        ),
        (
            "of other datasets",
            SignedGrant::sign(&other_inputs, &owner.key).unwrap(),
        ),
    ] {
        grant_refused(
            runtime
                .with_grant(&forged)
                .unwrap()
                .unwrap_data_key(&reference, &dataset_aad(DATASET))
                .await,
            why,
        );
    }
    // The owner's grant opens exactly what it names.
    let granted = runtime.with_grant(&signed).unwrap();
    granted
        .unwrap_data_key(&reference, &dataset_aad(DATASET))
        .await
        .unwrap();
    // The release is in the audit log with the grant's job id.
    let released = audit_lines(&kms, |line| {
        line["action"] == "ReleaseDataKey" && line["outcome"] == "ok"
    });
    assert_eq!(released.len(), 1, "{released:?}");
    assert!(
        released[0]["detail"].as_str().unwrap_or("").contains(JOB),
        "{:?}",
        released[0]
    );
}

/// The audit log's entries for which `pick` holds (waiting briefly for entries written after
/// the answer).
fn audit_lines(kms: &Kms, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    for _ in 0..50 {
        let text = std::fs::read_to_string(kms._dir.path().join("audit.log")).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|line| pick(line))
            .collect();
        if !lines.is_empty() {
            return lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    Vec::new()
}

/// Attacks 4c and 2 (outputs): a granted runtime asked to write under a key of the host's
/// choosing (to read the result), or to write a dataset under an input's key (to replace
/// the owner's input). The KMS makes new dataset keys only under the grant's output key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_output_under_another_key_than_the_granted_one_is_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let output_key = owner.kms.create_primary_key().await.unwrap();
    let host_key = host.create_primary_key().await.unwrap();
    let grant = SignedGrant::sign(&job_grant(&owner, &output_key), &owner.key).unwrap();
    let runtime = runtime(&kms, &host, &owner)
        .await
        .with_grant(&grant)
        .unwrap();
    for key in [&host_key, &owner.gated] {
        let refused = runtime
            .generate_data_key(key, &dataset_aad(OTHER_DATASET))
            .await
            .unwrap_err();
        assert!(matches!(refused, KmsError::GrantRefused(_)), "{refused}");
    }
    runtime
        .generate_data_key(&output_key, &dataset_aad(OTHER_DATASET))
        .await
        .unwrap();
}

/// Attack 5, shuffle key substitution: the scheduler hands a job's tasks a shuffle key of
/// another job (or one under a key that is not the job's input key). Refused: a shuffle key
/// is released only for the grant's own job id, under an input's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_shuffle_key_of_another_job_is_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let runtime = runtime(&kms, &host, &owner).await;
    let mut other_job = job_grant(&owner, &owner.gated);
    other_job.job_id = "ffeeddccbbaa99887766554433221100".into();
    let other_aad = format!("{SHUFFLE_AAD_PREFIX}{}-1", other_job.job_id).into_bytes();
    let (_, others) = runtime
        .with_grant(&SignedGrant::sign(&other_job, &owner.key).unwrap())
        .unwrap()
        .generate_data_key(&owner.gated, &other_aad)
        .await
        .unwrap();
    let ours = runtime
        .with_grant(&SignedGrant::sign(&job_grant(&owner, &owner.gated), &owner.key).unwrap())
        .unwrap();
    let refused = ours.unwrap_data_key(&others, &other_aad).await.unwrap_err();
    assert!(matches!(refused, KmsError::GrantRefused(_)), "{refused}");
    // Nor can the job's own shuffle id be claimed for another job's wrapped key: the aad is
    // bound into the wrapping.
    let ours_aad = format!("{SHUFFLE_AAD_PREFIX}{JOB}-1").into_bytes();
    let refused = ours.unwrap_data_key(&others, &ours_aad).await.unwrap_err();
    assert!(refused.is_access_denied(), "{refused}");
    // A key that is not the job's input key makes no shuffle key.
    let output_key = owner.kms.create_primary_key().await.unwrap();
    let refused = ours
        .generate_data_key(&output_key, &ours_aad)
        .await
        .unwrap_err();
    assert!(matches!(refused, KmsError::GrantRefused(_)), "{refused}");
}

/// Attack 7, rollback: the host restores an older version of a granted dataset. A grant that
/// pins the version (the manifest's SHA-256) makes the runtime refuse any other before it asks
/// for a key; `crates/cli/tests/kms_remote.rs` runs the same attack on real datasets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_rolled_back_dataset_is_refused_under_a_pinning_grant() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let mut grant = job_grant(&owner, &owner.gated);
    grant.inputs[0].manifest_sha256 = Some(hex::encode([7u8; 32]));
    let runtime = runtime(&kms, &host, &owner)
        .await
        .with_grant(&SignedGrant::sign(&grant, &owner.key).unwrap())
        .unwrap();
    let mut id = [0u8; 16];
    hex::decode_to_slice(DATASET, &mut id).unwrap();
    runtime.check_version(&id, &[7u8; 32]).unwrap();
    let refused = runtime.check_version(&id, &[6u8; 32]).unwrap_err();
    assert!(matches!(refused, KmsError::GrantRefused(_)), "{refused}");
}

/// Attack 9a, action substitution: a body the host signed (or captured) for one action is
/// sent as another, e.g. a data-key request replayed as `DeleteKey`. Refused: the body names
/// its action inside the signature, and the key-changing actions need that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_body_signed_for_one_action_is_refused_as_another() {
    let kms = start().await;
    // An app without an owner key: the api key alone may delete its keys, so only the action
    // binding stands between a captured body and a deletion.
    let (creds, app) = ownerless_app(&kms).await;
    let key = app.create_primary_key().await.unwrap();
    let payload = json!({"keyid": key.0, "keylen": 32, "aad": "ds"});

    // Each body is fresh: a refused one is spent too (its signature verified).
    for action in ["DeleteKey", "DisableKey", "RotateKey"] {
        let named = signed_body(
            &creds,
            Some("GenerateDataKeyWithoutPlaintext"),
            payload.clone(),
        );
        assert_refused(&post(&kms, action, &named).await, "action_not_signed");
        assert_refused(&post(&kms, action, &named).await, "replay");
    }
    for action in [
        "DeleteKey",
        "DisableKey",
        "RotateKey",
        "SetKeyReleasePolicy",
    ] {
        let unnamed = signed_body(&creds, None, payload.clone());
        assert_refused(&post(&kms, action, &unnamed).await, "action_not_signed");
    }
    // The key is untouched, and eHSM's own envelope still works for eHSM's data actions.
    let unnamed = signed_body(&creds, None, payload.clone());
    let answer = post(&kms, "GenerateDataKeyWithoutPlaintext", &unnamed).await;
    assert_eq!(answer["code"], 200, "{answer}");
    let listed = app.list_keys().await.unwrap();
    assert!(listed.iter().any(|k| k.keyid == key.0 && k.enabled));
}

/// Attacks 9b, the owner's other powers: disabling, enabling, rotating and deleting the
/// owner's keys with the api key alone are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_key_state_changes_with_the_api_key_are_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    for action in [
        Action::DisableKey,
        Action::EnableKey,
        Action::RotateKey,
        Action::DeleteKey,
    ] {
        let refused = host
            .call(action, json!({"keyid": owner.gated.0}))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, KmsError::OwnerSignatureRequired),
            "{action}: {refused}"
        );
    }
    owner.kms.rotate_key(&owner.gated).await.unwrap();
    owner.kms.set_enabled(&owner.gated, false).await.unwrap();
    owner.kms.set_enabled(&owner.gated, true).await.unwrap();
}

/// Attack 9c, replay after a restart: a signed request captured before the KMS restarts is
/// sent again after it. Refused: the audit log holds the ids of the last 20 minutes' signed
/// requests, and the restarted server reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_replay_after_a_restart_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (root, root_hex) = RootKey::generate().unwrap();
    let serve = |root: RootKey| {
        let audit = AuditLog::open(dir.path(), &root.audit_mac_key()).unwrap();
        let store = Store::open(dir.path(), root).unwrap();
        router(Arc::new(ServerState::new(store).with_audit(audit)))
    };

    let first = serve(root);
    let enrolled = ask(&first, get_request("Enroll")).await;
    let creds = AppCredentials::new(
        enrolled["result"]["appid"].as_str().unwrap(),
        enrolled["result"]["apikey"].as_str().unwrap(),
    );
    let create = signed_body(
        &creds,
        Some("CreateKey"),
        json!({"keyspec": "EH_AES_GCM_256"}),
    );
    assert_eq!(
        ask(&first, post_request("CreateKey", &create)).await["code"],
        200
    );
    drop(first);

    let restarted = serve(RootKey::from_hex(&root_hex).unwrap());
    let replayed = ask(&restarted, post_request("CreateKey", &create)).await;
    assert_eq!(replayed["kind"], "replay", "{replayed}");
    // A fresh request of the same app still works.
    let fresh = signed_body(
        &creds,
        Some("CreateKey"),
        json!({"keyspec": "EH_AES_GCM_256"}),
    );
    assert_eq!(
        ask(&restarted, post_request("CreateKey", &fresh)).await["code"],
        200
    );
}

/// Attack 9d, api keys in the clear: BigDL-RAS's endpoints take the api key unsigned in the
/// body, so anything that sees one request can reuse the key. They are not served unless the
/// operator enables them (`--enable-bigdl-ras`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_bigdl_ras_endpoints_are_off_by_default() {
    let kms = start().await;
    let owner = owner(&kms).await;
    for path in ["/registerPolicy", "/verifyQuote"] {
        let body = json!({"appID": owner.creds.appid, "apiKey": *owner.creds.apikey,
                          "policyType": "SGXMREnclavePolicy", "mrEnclave": "ab".repeat(32)});
        let response = kms
            .router
            .clone()
            .oneshot(
                Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
}

/// Attack 9e, credentials over plain HTTP: the client refuses an `http://` KMS URL that is not
/// loopback, before it sends anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_plain_http_to_a_remote_kms_is_refused() {
    let config = RemoteKmsConfig::new("http://192.0.2.1:9000");
    let refused = RemoteKms::connect(&config, None).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::InvalidConfig(m) if m.contains("loopback")),
        "{refused}"
    );
}

/// Attack 9g, simulated evidence from a platform of the host's choosing: the KMS holds no
/// simulation platform key and trusts none of its own; a simulated quote is verified with the
/// platform keys the owner's policy names, so a quote signed by any other platform (one the
/// host made, another tenant's) is refused, and a policy cannot allow simulation without
/// naming its platforms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_simulation_platform_the_owner_did_not_name_is_refused() {
    let kms = start().await;
    let owner = owner(&kms).await;
    let host = host(&kms, &owner).await;
    let dir = tempfile::tempdir().unwrap();
    let own_platform = SimPlatform::load_or_create(dir.path().join("host.pk8")).unwrap();
    let refused = host
        .clone()
        .attest(Arc::new(SimTee::new(own_platform)), &owner.policy_id)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, KmsError::Attestation(reason)
            if reason.contains("trusted simulation platform keys")),
        "{refused}"
    );
    // The platform the owner named attests.
    runtime(&kms, &host, &owner).await;

    let mut open = sim_policy(&kms);
    open.sim_platforms.clear();
    let refused = host.upload_policy(&open).await.unwrap_err();
    assert!(
        refused.to_string().contains("param type error"),
        "{refused}"
    );
}

/// A KMS on loopback that answers `GenerateQuote` from `own` (its TEE and the certificate
/// digest it binds), or not at all.
async fn kms_with_evidence(own: Option<(Arc<SimTee>, [u8; 32])>) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = RootKey::generate().unwrap();
    let store = Store::open(dir.path(), root).unwrap();
    let mut state = ServerState::new(store);
    if let Some((tee, certificate)) = own {
        // Plain HTTP binds zeros; any other digest is what a relay of another KMS would show.
        state = state.with_own_evidence(tee, Some(certificate));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = router(Arc::new(state));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, dir)
}

/// Attack 11, a KMS the clients did not ask for: the host runs the KMS outside any TEE, or
/// another KMS build, or relays the quote of a genuine KMS from behind an endpoint of its own.
/// A client with a KMS policy asks the KMS for its quote over a fresh challenge and the TLS
/// certificate of its connection before it sends anything secret, and refuses each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_kms_the_clients_policy_does_not_accept_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let platform = SimPlatform::load_or_create(dir.path().join("kms-platform.pk8")).unwrap();
    let kms_policy = kms_policy_for(&platform);
    let tee = Arc::new(SimTee::new(platform));
    let connect = |url: String, policy: ppml_kms_client::KmsPolicy| async move {
        let mut config = RemoteKmsConfig::new(url);
        config.kms_policy = Some(policy);
        RemoteKms::connect(&config, None).await
    };

    // The genuine KMS in its TEE: accepted, and enrolling works.
    let (url, _genuine) = kms_with_evidence(Some((tee.clone(), [0; 32]))).await;
    let kms = connect(url.clone(), kms_policy.clone()).await.unwrap();
    kms.enroll().await.unwrap();

    // Outside any TEE.
    let (plain, _plain_dir) = kms_with_evidence(None).await;
    let refused = connect(plain, kms_policy.clone()).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UntrustedKms(reason) if reason.contains("does not run in a TEE")),
        "{refused}"
    );
    // Another build than the policy names.
    let mut other_build = kms_policy.clone();
    other_build.policy.allowed[0].mrenclave = Some("ab".repeat(32));
    let refused = connect(url, other_build).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UntrustedKms(reason) if reason.contains("measurement")),
        "{refused}"
    );
    // A quote bound to another TLS endpoint than the client's connection (a relay).
    let (relay, _relay_dir) = kms_with_evidence(Some((tee, [7; 32]))).await;
    let refused = connect(relay, kms_policy).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UntrustedKms(reason) if reason.contains("not bound")),
        "{refused}"
    );
}

/// Attack 9f for `GenerateQuote`: it needs no credential and a hardware quote costs the KMS
/// milliseconds, so anyone who reaches the KMS could keep it busy. The server answers 256 at
/// once, then 64 per second, and refuses challenges outside 16 to 64 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_quote_flood_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _) = RootKey::generate().unwrap();
    let store = Store::open(dir.path(), root).unwrap();
    let platform = SimPlatform::load_or_create(dir.path().join("kms-platform.pk8")).unwrap();
    let state = ServerState::new(store).with_own_evidence(Arc::new(SimTee::new(platform)), None);
    let router = router(Arc::new(state));
    use base64::Engine as _;
    let quote = |challenge: &[u8]| {
        let challenge = base64::engine::general_purpose::STANDARD.encode(challenge);
        ask(
            &router,
            get_request(&format!("GenerateQuote&challenge={challenge}")),
        )
    };
    assert_refused(&quote(&[1; 8]).await, "payload_type");
    // The bucket refills while the flood runs: count what passes until the first refusal.
    let started = std::time::Instant::now();
    let mut answered = 0u32;
    let refused = loop {
        let answer = quote(&[1; 32]).await;
        if answer["code"] != 200 || answered > 10_000 {
            break answer;
        }
        answered += 1;
    };
    assert_refused(&refused, "rate_limited");
    let refilled = (started.elapsed().as_secs_f64() * 64.0).ceil() as u32;
    assert!(
        (256..=256 + refilled).contains(&answered),
        "{answered} quotes before the limit ({refilled} refilled)"
    );
}

/// The owner's policy for a KMS in the simulated TEE of `platform`: this test binary.
fn kms_policy_for(platform: &SimPlatform) -> ppml_kms_client::KmsPolicy {
    ppml_kms_client::KmsPolicy {
        policy: Policy {
            allow_simulation: true,
            sim_platforms: vec![hex::encode(platform.public_key())],
            ..Policy::strict(vec![AllowedMeasurement {
                tee: Some(Tee::Sim),
                mrenclave: Some(hex::encode(executable_measurement().unwrap())),
                ..AllowedMeasurement::default()
            }])
        },
        collateral: None,
    }
}

/// A KMS started sealed in the simulated TEE of `platform_key` over `data_dir`, on loopback:
/// its URL, and the sender that stops it.
async fn start_sealed(
    data_dir: &std::path::Path,
    platform_key: &std::path::Path,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    use ppml_kms_server::{KmsServer, OwnTee, RootKeySource, ServerConfig, TlsMode};
    let mut config = ServerConfig::new(data_dir);
    config.listen = "127.0.0.1:0".into();
    config.tls = TlsMode::InsecureHttp;
    config.root_key = RootKeySource::Unseal;
    config.own_tee = Some(OwnTee {
        tee: Tee::Sim,
        sim_platform_key: platform_key.to_path_buf(),
    });
    let server = KmsServer::start(&config).await.unwrap();
    assert!(server.is_sealed());
    let url = server.url();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        server
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (url, stop, running)
}

async fn unseal(
    url: &str,
    policy: &ppml_kms_client::KmsPolicy,
    root: &[u8; 32],
) -> Result<ppml_kms_client::UnsealOutcome, KmsError> {
    unseal_after(url, policy, root, None).await
}

/// Unseals, giving the audit head the owner kept from its last unseal.
async fn unseal_after(
    url: &str,
    policy: &ppml_kms_client::KmsPolicy,
    root: &[u8; 32],
    head: Option<&ppml_kms::protocol::AuditHead>,
) -> Result<ppml_kms_client::UnsealOutcome, KmsError> {
    let mut config = RemoteKmsConfig::new(url);
    config.kms_policy = Some(policy.clone());
    RemoteKms::unseal(&config, &zeroize::Zeroizing::new(*root), head).await
}

/// Attack 12a, the KMS operator reads the root key: a KMS in a TEE takes no root key from the
/// host and starts sealed; until its owner unseals it, it answers every key action with
/// `sealed`. The owner's unseal goes only to a KMS that the owner's policy accepts: one of
/// another build gets nothing and stays sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_sealed_kms_serves_nothing_until_its_owner_unseals_it() {
    use ppml_kms_server::{KmsServer, OwnTee, RootKeySource, ServerConfig, ServerError};
    let dir = tempfile::tempdir().unwrap();
    let platform_key = dir.path().join("kms-platform.pk8");
    let platform = SimPlatform::load_or_create(&platform_key).unwrap();
    let policy = kms_policy_for(&platform);

    // A root key from the host is refused by name.
    let mut config = ServerConfig::new(dir.path().join("host-keyed"));
    config.listen = "127.0.0.1:0".into();
    config.own_tee = Some(OwnTee {
        tee: Tee::Sim,
        sim_platform_key: platform_key.clone(),
    });
    for source in [
        RootKeySource::KeyFile(None),
        RootKeySource::Hex(zeroize::Zeroizing::new("11".repeat(32))),
    ] {
        config.root_key = source;
        assert!(matches!(
            KmsServer::start(&config).await,
            Err(ServerError::HostRootKeyInTee)
        ));
    }
    assert!(!dir.path().join("host-keyed.root.key").exists());
    // So is a TLS key from the host: it could serve the certificate the quote binds.
    config.root_key = RootKeySource::Unseal;
    config.tls = ppml_kms_server::TlsMode::Files {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    assert!(matches!(
        KmsServer::start(&config).await,
        Err(ServerError::HostTlsKeyInTee)
    ));

    let (url, _stop, _running) = start_sealed(&dir.path().join("kms"), &platform_key).await;
    let http = reqwest::Client::new();
    for action in Action::ALL {
        if matches!(
            action,
            Action::GetVersion | Action::GenerateQuote | Action::Unseal
        ) {
            continue;
        }
        let request = if action.is_signed() {
            http.post(format!("{url}/ehsm")).json(&json!({}))
        } else {
            http.get(format!("{url}/ehsm"))
        };
        let answer: Value = request
            .query(&[("Action", action.name())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["kind"], "sealed", "{action}: {answer}");
    }
    assert!(matches!(
        RemoteKms::connect(&RemoteKmsConfig::new(url.clone()), None).await,
        Err(KmsError::Sealed)
    ));

    // The owner's policy for another build: the root key is not sent.
    let root = [0x42; 32];
    let mut other_build = policy.clone();
    other_build.policy.allowed[0].mrenclave = Some("ab".repeat(32));
    let refused = unseal(&url, &other_build, &root).await.unwrap_err();
    assert!(matches!(&refused, KmsError::UntrustedKms(_)), "{refused}");
    assert!(matches!(
        RemoteKms::connect(&RemoteKmsConfig::new(url.clone()), None).await,
        Err(KmsError::Sealed)
    ));

    // The owner's own policy: unsealed, and the quote now binds the root key's id.
    let outcome = unseal(&url, &policy, &root).await.unwrap();
    assert!(outcome.was_sealed);
    assert_eq!(outcome.root_id, ppml_attestation::peer::kms_root_id(&root));
    let mut config = RemoteKmsConfig::new(url.clone());
    config.kms_policy = Some(policy);
    let kms = RemoteKms::connect(&config, None).await.unwrap();
    kms.enroll().await.unwrap();
}

/// Attack 12b, the KMS operator unseals a KMS with a root key of its own: a genuine KMS
/// build over a fresh data directory, unsealed by the host, would hold every key created at
/// it under a root key the host knows. Clients whose KMS policy pins the owner's root id
/// refuse it. Over the owner's data directory, the host's root key does not open the store:
/// the KMS stays sealed and the owner's unseal still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_kms_unsealed_with_the_hosts_root_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let platform_key = dir.path().join("kms-platform.pk8");
    let platform = SimPlatform::load_or_create(&platform_key).unwrap();
    let mut policy = kms_policy_for(&platform);
    let (owner_root, host_root) = ([0x42; 32], [0x66; 32]);
    policy.policy.kms_root_ids = vec![hex::encode(ppml_attestation::peer::kms_root_id(
        &owner_root,
    ))];
    let pinned = |url: &str| {
        let mut config = RemoteKmsConfig::new(url);
        config.kms_policy = Some(policy.clone());
        async move { RemoteKms::connect(&config, None).await }
    };

    // The owner's KMS, unsealed by the owner, then restarted (sealed again).
    let owner_dir = dir.path().join("kms");
    let (url, stop, running) = start_sealed(&owner_dir, &platform_key).await;
    unseal(&url, &policy, &owner_root).await.unwrap();
    pinned(&url).await.unwrap().enroll().await.unwrap();
    stop.send(()).unwrap();
    running.await.unwrap();
    let (url, _stop, _running) = start_sealed(&owner_dir, &platform_key).await;

    // The host's root key over the owner's store: refused, still sealed.
    let mut unpinned = policy.clone();
    unpinned.policy.kms_root_ids.clear();
    let refused = unseal(&url, &unpinned, &host_root).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UnsealFailed(reason) if reason.contains("does not open this KMS's store")),
        "{refused}"
    );
    assert!(matches!(pinned(&url).await, Err(KmsError::Sealed)));
    unseal(&url, &policy, &owner_root).await.unwrap();
    pinned(&url).await.unwrap();

    // A fresh KMS that the host unsealed with its own root key: pinning clients refuse it.
    let (fresh, _stop_fresh, _running_fresh) =
        start_sealed(&dir.path().join("fresh"), &platform_key).await;
    unseal(&fresh, &unpinned, &host_root).await.unwrap();
    let refused = pinned(&fresh).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UntrustedKms(reason) if reason.contains("kms_root_ids")),
        "{refused}"
    );
    // And the owner's unseal sends nothing to a KMS that holds another root key.
    let refused = unseal(&fresh, &unpinned, &owner_root).await.unwrap_err();
    assert!(
        matches!(&refused, KmsError::UnsealFailed(reason) if reason.contains("another root key")),
        "{refused}"
    );
}

/// Attack 12c, KMS rollback: the host puts back an earlier copy of the KMS's data directory
/// (a backup or volume snapshot taken before keys changed), then waits for the owner to unseal
/// it. The owner's unseal carries the audit head of its last unseal; the KMS refuses a store
/// whose audit log does not hold that entry and stays sealed, while the current store
/// unseals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_rolled_back_kms_store_is_refused_at_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let platform_key = dir.path().join("kms-platform.pk8");
    let platform = SimPlatform::load_or_create(&platform_key).unwrap();
    let policy = kms_policy_for(&platform);
    let root = [0x42; 32];
    let data = dir.path().join("kms");
    let snapshot = dir.path().join("snapshot");
    let connect = |url: &str| {
        let mut config = RemoteKmsConfig::new(url);
        config.kms_policy = Some(policy.clone());
        async move { RemoteKms::connect(&config, None).await }
    };
    let stop_and_wait = |(stop, running): (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )| async move {
        stop.send(()).unwrap();
        running.await.unwrap();
    };

    // First unseal of a new KMS; the host snapshots its data directory afterwards.
    let (url, stop, running) = start_sealed(&data, &platform_key).await;
    let first = unseal(&url, &policy, &root).await.unwrap();
    let first_head = first.audit_head.expect("the KMS keeps an audit log");
    connect(&url).await.unwrap().enroll().await.unwrap();
    stop_and_wait((stop, running)).await;
    copy_dir(&data, &snapshot);

    // The owner unseals again after a restart and enrolls another app: the head moves on.
    let (url, stop, running) = start_sealed(&data, &platform_key).await;
    let second = unseal_after(&url, &policy, &root, Some(&first_head))
        .await
        .unwrap();
    let second_head = second.audit_head.unwrap();
    assert!(second_head.seq > first_head.seq, "{second_head:?}");
    connect(&url).await.unwrap().enroll().await.unwrap();
    stop_and_wait((stop, running)).await;

    // The host restores the snapshot: the owner's unseal with its last head is refused.
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&snapshot, &data);
    let (url, _stop, _running) = start_sealed(&data, &platform_key).await;
    let refused = unseal_after(&url, &policy, &root, Some(&second_head))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, KmsError::UnsealFailed(reason) if reason.contains("older than the one its owner last unsealed")),
        "{refused}"
    );
    assert!(matches!(connect(&url).await, Err(KmsError::Sealed)));
    // A forged head (the right entry number, another line) is refused the same way.
    let forged = ppml_kms::protocol::AuditHead {
        seq: first_head.seq,
        hash: "00".repeat(32),
    };
    assert!(matches!(
        unseal_after(&url, &policy, &root, Some(&forged)).await,
        Err(KmsError::UnsealFailed(_))
    ));
    // What the snapshot does hold still unseals it (the residual: a copy made after the
    // owner's last unseal is not detected).
    unseal_after(&url, &policy, &root, Some(&first_head))
        .await
        .unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `docs/threat-model.md` §2 names a test for every attack; each named test exists (in this
/// file unless the row names another).
#[test]
fn the_threat_model_names_tests_that_exist() {
    let root = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../..");
    let doc = std::fs::read_to_string(root.join("docs/threat-model.md")).unwrap();
    let section: Vec<&str> = doc
        .lines()
        .skip_while(|l| !l.starts_with("## 2."))
        .take_while(|l| !l.starts_with("## 3."))
        .filter(|l| l.starts_with("| ") && !l.starts_with("| #") && !l.starts_with("|---"))
        .collect();
    assert!(section.len() >= 10, "{section:?}");
    for row in section {
        let test_cell = row
            .trim_end()
            .trim_end_matches('|')
            .rsplit(" | ")
            .next()
            .unwrap();
        // `test`, or `file` `test`, several separated by `;`.
        for entry in test_cell.split(';') {
            let names: Vec<&str> = entry
                .split('`')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| s)
                .collect();
            let (file, test) = match names.as_slice() {
                [test] => ("crates/kms-server/tests/attacks.rs", *test),
                [file, test] => (*file, *test),
                other => panic!("row without a test: {row} ({other:?})"),
            };
            let source = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("{file}: {e} (row: {row})"));
            // Rust tests, and the Python package's (pytest).
            assert!(
                source.contains(&format!("fn {test}(")) || source.contains(&format!("def {test}(")),
                "{file} has no test {test} (row: {row})"
            );
        }
    }
}

/// Attack 9f, filling the KMS with apps: `Enroll` needs no credential and makes a durable
/// record, so the server allows 30 at once and one per second after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_an_enrollment_flood_is_limited() {
    let kms = start().await;
    let enroll = || ask(&kms.router, get_request("Enroll"));
    for _ in 0..30 {
        assert_eq!(enroll().await["code"], 200);
    }
    assert_refused(&enroll().await, "rate_limited");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(enroll().await["code"], 200);
}
