//! Job receipts (docs/receipts.md), against a KMS server with simulated attestation: a granted
//! job in an attested context leaves a receipt that verifies up to the KMS's attestation key;
//! every attack a storage or host operator can make on a receipt, its output or its inputs
//! fails, naming what differs.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ppml::config::Settings;
use ppml::crates::attestation::policy::{AllowedMeasurement, Policy};
use ppml::crates::attestation::sim::executable_measurement;
use ppml::crates::format::manifest::MANIFEST_FILE_NAME;
use ppml::files::{EncryptOptions, NoProgress};
use ppml::receipt::{RECEIPT_FILE_NAME, Receipt, VerifyError, VerifyOptions, verify_receipt};
use ppml::{DatasetLocation, ErrorKind, PpmlContext, Tee};

mod common;

struct Fixture {
    dir: tempfile::TempDir,
    settings: Settings,
    attestation: ppml::AttestationConfig,
    policy: Policy,
    kms_key: [u8; 32],
    /// An input under a key marked for attested release.
    gated_input: PathBuf,
    /// An input under an unmarked key.
    plain_input: PathBuf,
    output_key: ppml::PrimaryKeyId,
}

async fn fixture() -> Fixture {
    let common::OwnedApp {
        dir,
        mut settings,
        remote,
        platform_key,
        policy,
        policy_id,
    } = common::owned_app().await;
    use ppml::crates::kms::KeyManagementService as _;
    let gated = remote.create_primary_key().await.unwrap();
    let plain = remote.create_primary_key().await.unwrap();
    let output_key = remote.create_primary_key().await.unwrap();
    remote.set_release_policy(&gated, &policy_id).await.unwrap();
    let kms_key = remote.attestation_key().await.unwrap();

    let csv = dir.path().join("people.csv");
    std::fs::write(
        &csv,
        "name,age,job\nann,31,Developer\nbob,52,Engineer\ncid,25,Developer\n",
    )
    .unwrap();
    let mut inputs = Vec::new();
    for (name, key) in [("gated.enc", &gated), ("plain.enc", &plain)] {
        settings.primary_key = Some(key.0.clone());
        let owner = PpmlContext::builder()
            .settings(settings.clone())
            .build()
            .await
            .unwrap();
        let path = dir.path().join(name);
        owner
            .encrypt_paths(&csv, &path, &EncryptOptions::default(), &NoProgress)
            .await
            .unwrap();
        inputs.push(path);
    }
    settings.primary_key = Some(gated.0.clone());
    settings.output_key = Some(output_key.0.clone());
    Fixture {
        attestation: ppml::AttestationConfig {
            tee: Tee::Sim,
            policy_id,
            sim_platform_key: Some(platform_key),
        },
        policy,
        kms_key,
        plain_input: inputs.pop().unwrap(),
        gated_input: inputs.pop().unwrap(),
        output_key,
        settings,
        dir,
    }
}

fn sql_job(input: &Path, output: &Path) -> ppml::AppSpec {
    ppml::AppSpec::Sql(ppml::SqlSpec {
        sql: "SELECT name FROM people WHERE job = 'Developer'".into(),
        tables: [(
            "people".to_string(),
            DatasetLocation::Local(input.to_path_buf()),
        )]
        .into(),
        output: Some(DatasetLocation::Local(output.to_path_buf())),
        input_partitions: None,
        output_partitions: None,
        output_format: Default::default(),
        overwrite: false,
        plaintext: false,
    })
}

/// Runs `job` as the owner granted it, in the simulated TEE.
async fn run_attested(f: &Fixture, job: &ppml::AppSpec) {
    let grant = f
        .settings
        .job_grant(
            ppml::grant::GrantedJob::App {
                spec: job,
                output_key: Some(&f.output_key),
            },
            &ppml::grant::GrantOptions::default(),
        )
        .await
        .unwrap()
        .expect("the owner key is on this machine");
    let ctx = PpmlContext::builder()
        .settings(f.settings.clone())
        .attestation(f.attestation.clone())
        .grant(grant)
        .build()
        .await
        .unwrap();
    ctx.run(job).await.unwrap();
}

fn options(f: &Fixture) -> VerifyOptions {
    VerifyOptions {
        kms_attestation_key: Some(f.kms_key),
        policy: Some(f.policy.clone()),
        require_attested: true,
        output_keys: None,
    }
}

async fn verify(f: &Fixture, output: &Path) -> Result<ppml::receipt::VerifiedReceipt, VerifyError> {
    verify_receipt(&DatasetLocation::Local(output.to_path_buf()), &options(f)).await
}

/// Flips one bit of every byte of `file` in turn (restoring it after) and verifies the
/// receipt of `output` with `options` each time: the errors, and the positions of the
/// changes that verified.
async fn flip_every_byte(
    output: &Path,
    file: &Path,
    options: &VerifyOptions,
) -> (Vec<VerifyError>, Vec<usize>) {
    let original = std::fs::read(file).unwrap();
    let location = DatasetLocation::Local(output.to_path_buf());
    let (mut errors, mut verified) = (Vec::new(), Vec::new());
    for at in 0..original.len() {
        let mut changed = original.clone();
        changed[at] ^= 0x01;
        std::fs::write(file, &changed).unwrap();
        match verify_receipt(&location, options).await {
            Ok(_) => verified.push(at),
            Err(e) => errors.push(e),
        }
    }
    std::fs::write(file, &original).unwrap();
    verify_receipt(&location, options).await.unwrap();
    (errors, verified)
}

/// [`flip_every_byte`] where no change may verify.
async fn every_flipped_byte_fails(
    output: &Path,
    file: &Path,
    options: &VerifyOptions,
) -> Vec<VerifyError> {
    let (errors, verified) = flip_every_byte(output, file, options).await;
    assert!(
        verified.is_empty(),
        "{} still verifies with byte(s) {verified:?} changed",
        file.display()
    );
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attested_jobs_receipt_verifies_and_any_change_fails_naming_what() {
    let f = fixture().await;
    let output = f.dir.path().join("developers.enc");
    let job = sql_job(&f.gated_input, &output);
    run_attested(&f, &job).await;

    let verified = verify(&f, &output).await.unwrap();
    assert!(verified.attested());
    let body = verified.receipt.body();
    assert_eq!(body.job.app, "sql");
    assert_eq!(
        body.job.spec["sql"],
        "SELECT name FROM people WHERE job = 'Developer'"
    );
    assert!(body.job.grant_sha256.is_some());
    assert_eq!(body.runtime.tee.as_deref(), Some("sim"));
    assert_eq!(
        body.runtime.policy.as_deref(),
        Some(f.attestation.policy_id.as_str())
    );
    assert_eq!(
        body.runtime.measurements.as_ref().unwrap()["mrenclave"],
        hex::encode(executable_measurement().unwrap())
    );
    assert_eq!(body.inputs.len(), 1);
    assert_eq!(
        body.inputs[0].location,
        std::path::absolute(&f.gated_input)
            .unwrap()
            .to_string_lossy()
    );
    assert_eq!(body.output.key_id, f.output_key.0);
    // The owner's grant withholds counts (the default), so the receipt does too.
    assert_eq!(body.output.rows, None);
    // The output is still a dataset its owner reads: the receipt is part of it.
    let owner = PpmlContext::builder()
        .settings(f.settings.clone())
        .build()
        .await
        .unwrap();
    let names = owner.read_csv(&output).await.unwrap();
    assert_eq!(owner.collect(names).await.unwrap()[0].num_rows(), 2);

    // A policy of the verifier's that the runtime does not satisfy.
    let other = Policy::strict(vec![AllowedMeasurement {
        tee: Some(Tee::Sim),
        mrenclave: Some("00".repeat(32)),
        ..AllowedMeasurement::default()
    }]);
    let refused = verify_receipt(
        &DatasetLocation::Local(output.clone()),
        &VerifyOptions {
            policy: Some(other),
            ..options(&f)
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, VerifyError::Policy(_)), "{refused}");
    assert_eq!(refused.kind(), ErrorKind::AttestationFailed);
    // Checked with another KMS's attestation key: nothing vouches for the receipt key.
    let refused = verify_receipt(
        &DatasetLocation::Local(output.clone()),
        &VerifyOptions {
            kms_attestation_key: Some([9; 32]),
            ..options(&f)
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, VerifyError::Unvouched(_)), "{refused}");
    // Without any KMS key, an attested receipt cannot be checked.
    let refused = verify_receipt(
        &DatasetLocation::Local(output.clone()),
        &VerifyOptions {
            kms_attestation_key: None,
            ..options(&f)
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, VerifyError::NoKmsKey), "{refused}");

    // Any byte of the receipt, of the output manifest or of the input manifest.
    let with_keys = VerifyOptions {
        output_keys: Some(owner.key_service()),
        ..options(&f)
    };
    let receipt_errors =
        every_flipped_byte_fails(&output, &output.join(RECEIPT_FILE_NAME), &options(&f)).await;
    assert!(
        receipt_errors
            .iter()
            .any(|e| matches!(e, VerifyError::Signature)),
        "a changed value is a broken signature"
    );
    assert!(receipt_errors.iter().all(|e| matches!(
        e,
        VerifyError::Signature | VerifyError::NotBound { .. } | VerifyError::Malformed { .. }
    )));
    let output_manifest = output.join(MANIFEST_FILE_NAME);
    let output_errors = every_flipped_byte_fails(&output, &output_manifest, &with_keys).await;
    // Without the output key, only the MAC goes unchecked: a changed MAC leaves the output
    // unreadable, never different.
    let (_, unseen) = flip_every_byte(&output, &output_manifest, &options(&f)).await;
    let text = std::fs::read_to_string(&output_manifest).unwrap();
    let mac_at = text.find("\"mac\": \"").unwrap() + "\"mac\": \"".len();
    assert!(!unseen.is_empty());
    assert!(
        unseen.iter().all(|at| (mac_at..mac_at + 64).contains(at)),
        "{unseen:?} (the MAC is at {mac_at})"
    );
    assert!(
        output_errors
            .iter()
            .any(|e| e.kind() == ErrorKind::TamperedData && matches!(e, VerifyError::Engine(_)))
    );
    assert!(output_errors.iter().any(|e| matches!(
        e,
        VerifyError::OutputDiffers {
            what: "dataset id",
            ..
        }
    )));
    assert!(output_errors.iter().any(|e| matches!(
        e,
        VerifyError::OutputDiffers {
            what: "manifest (parts, sizes, key, media type)",
            ..
        }
    )));
    let input_manifest = f.gated_input.join(MANIFEST_FILE_NAME);
    let input_errors = every_flipped_byte_fails(&output, &input_manifest, &options(&f)).await;
    assert!(input_errors.iter().all(|e| matches!(
        e,
        VerifyError::InputDiffers { location, .. } if location.ends_with("gated.enc")
    )));
    assert_eq!(input_errors[0].kind(), ErrorKind::TamperedData);
    let message = input_errors[0].to_string();
    assert!(message.contains("gated.enc"), "{message}");

    // A part file changed: the manifest still binds the receipt, but the owner's reads fail
    // (the receipt vouches for the manifest, the manifest for the parts).
    let part = std::fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".ppml"))
        .unwrap();
    let original = std::fs::read(&part).unwrap();
    let mut changed = original.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(&part, &changed).unwrap();
    let failed = match owner.read_csv(&output).await {
        Err(e) => e,
        Ok(names) => owner.collect(names).await.unwrap_err(),
    };
    assert_eq!(failed.kind(), ErrorKind::TamperedData, "{failed}");
    std::fs::write(&part, &original).unwrap();

    // The KMS's audit log lists the job's key releases under the receipt's job id.
    let (_, entries) = ppml_kms_server::audit::job_entries(
        &f.dir.path().join("kms").join("audit.log"),
        None,
        &body.job.id,
    )
    .unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.entry.action.as_str()).collect();
    assert!(actions.contains(&"ReleaseDataKey"), "{actions:?}");
    assert!(actions.contains(&"GenerateSealedDataKey"), "{actions:?}");
    assert!(entries.iter().all(|e| e.entry.attestation.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_forged_and_unattested_receipts_fail() {
    let f = fixture().await;
    let first = f.dir.path().join("first.enc");
    let second = f.dir.path().join("second.enc");
    run_attested(&f, &sql_job(&f.gated_input, &first)).await;
    run_attested(&f, &sql_job(&f.gated_input, &second)).await;
    verify(&f, &second).await.unwrap();

    // The first job's receipt copied beside the second output.
    let first_receipt = std::fs::read(first.join(RECEIPT_FILE_NAME)).unwrap();
    let second_receipt = std::fs::read(second.join(RECEIPT_FILE_NAME)).unwrap();
    std::fs::write(second.join(RECEIPT_FILE_NAME), &first_receipt).unwrap();
    let refused = verify(&f, &second).await.unwrap_err();
    assert!(matches!(refused, VerifyError::NotBound { .. }), "{refused}");
    // …and the second manifest edited to bind it (a verifier without the data key cannot
    // check the manifest's MAC): the receipt names another dataset.
    let manifest_path = second.join(MANIFEST_FILE_NAME);
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let sha = |bytes: &[u8]| hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes));
    let rebound = manifest.replace(&sha(&second_receipt), &sha(&first_receipt));
    assert_ne!(rebound, manifest);
    std::fs::write(&manifest_path, &rebound).unwrap();
    let refused = verify(&f, &second).await.unwrap_err();
    assert!(
        matches!(
            refused,
            VerifyError::OutputDiffers {
                what: "dataset id",
                ..
            }
        ),
        "{refused}"
    );
    assert_eq!(refused.kind(), ErrorKind::TamperedData);

    // A receipt of the host's own: the true body with claims of its choosing, signed by a
    // key it made, and the manifest rebound to it. The token vouches for another key.
    let receipt = Receipt::from_json(&second_receipt).unwrap();
    let mut body = receipt.body().clone();
    body.output.rows = Some(1_000_000);
    let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
    use ring::signature::KeyPair as _;
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    let install_forged = |body| {
        let signature = key.sign(&Receipt::signing_input(&body).unwrap());
        let forged = Receipt::signed(body, &public, signature.as_ref())
            .unwrap()
            .to_json();
        std::fs::write(second.join(RECEIPT_FILE_NAME), &forged).unwrap();
        let rebound = manifest.replace(&sha(&second_receipt), &sha(&forged));
        std::fs::write(&manifest_path, rebound).unwrap();
    };
    install_forged(body);
    let refused = verify(&f, &second).await.unwrap_err();
    assert!(
        matches!(&refused, VerifyError::Unvouched(why) if why.contains("another key")),
        "{refused}"
    );
    assert_eq!(refused.kind(), ErrorKind::AttestationFailed);
    // The same with a token the host made itself, signed by a key of its own.
    let mut body = receipt.body().clone();
    let token = body.runtime.token.clone().unwrap();
    let (head, _) = token.rsplit_once('.').unwrap();
    let (_, payload) = head.split_once('.').unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(payload).unwrap()).unwrap();
    claims["receipt_key"] = b64.encode(public).into();
    let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
    let header = b64.encode(r#"{"alg":"EdDSA","typ":"JWT"}"#);
    let token_signature = key.sign(format!("{header}.{payload}").as_bytes());
    body.runtime.token = Some(format!(
        "{header}.{payload}.{}",
        b64.encode(token_signature.as_ref())
    ));
    install_forged(body);
    let refused = verify(&f, &second).await.unwrap_err();
    assert!(
        matches!(&refused, VerifyError::Unvouched(why) if why.contains("service key")),
        "{refused}"
    );

    // An unattested run, with a library program's DataFrame: its receipt says so, lists the
    // input the plan read, and fails `require_attested`.
    let mut settings = f.settings.clone();
    settings.primary_key = None;
    let ctx = PpmlContext::builder()
        .settings(settings)
        .build()
        .await
        .unwrap();
    ctx.register("people", &f.plain_input).await.unwrap();
    let developers = ctx
        .sql("SELECT name FROM people WHERE job = 'Developer'")
        .await
        .unwrap();
    let unattested = f.dir.path().join("unattested.enc");
    ctx.write(developers, &unattested, ppml::WriteOptions::default())
        .await
        .unwrap();
    let refused = verify(&f, &unattested).await.unwrap_err();
    assert!(matches!(refused, VerifyError::Unattested), "{refused}");
    assert_eq!(refused.kind(), ErrorKind::AttestationFailed);
    // A policy of the verifier's is not met by an unattested runtime either.
    let refused = verify_receipt(
        &DatasetLocation::Local(unattested.clone()),
        &VerifyOptions {
            policy: Some(f.policy.clone()),
            ..VerifyOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, VerifyError::Unattested), "{refused}");
    let verified = verify_receipt(
        &DatasetLocation::Local(unattested.clone()),
        &VerifyOptions::default(),
    )
    .await
    .unwrap();
    assert!(!verified.attested());
    let body = verified.receipt.body();
    assert!(!body.runtime.attested);
    assert!(verified.receipt.signature().is_none());
    assert_eq!(body.job.app, "dataframe");
    assert!(
        body.job.spec["plan"]
            .as_str()
            .unwrap()
            .contains("Developer")
    );
    assert_eq!(body.inputs.len(), 1);
    assert!(body.inputs[0].location.ends_with("plain.enc"));
    // Unattested, without a grant: the count is printed anyway, and recorded.
    assert_eq!(body.output.rows, Some(2));
    // Claiming attestation without a signature is refused.
    let text = std::fs::read_to_string(unattested.join(RECEIPT_FILE_NAME)).unwrap();
    let claimed = text.replace("\"attested\": false", "\"attested\": true");
    std::fs::write(unattested.join(RECEIPT_FILE_NAME), claimed).unwrap();
    assert!(matches!(
        verify_receipt(
            &DatasetLocation::Local(unattested.clone()),
            &VerifyOptions::default()
        )
        .await,
        Err(VerifyError::NotBound { .. })
    ));

    // Rows a program wrote from a stream: a "stream" job, no inputs.
    let batch = ctx
        .collect(ctx.read_csv(&f.plain_input).await.unwrap())
        .await
        .unwrap();
    let stream = ppml::datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
        batch[0].schema(),
        futures::stream::iter(batch.into_iter().map(Ok)),
    );
    let streamed = f.dir.path().join("streamed.enc");
    ctx.write_stream(Box::pin(stream), &streamed, ppml::WriteOptions::default())
        .await
        .unwrap();
    let verified = verify_receipt(&DatasetLocation::Local(streamed), &VerifyOptions::default())
        .await
        .unwrap();
    assert_eq!(verified.receipt.body().job.app, "stream");
    assert!(verified.receipt.body().inputs.is_empty());
}
