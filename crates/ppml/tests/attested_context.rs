//! An unattested context is refused a key marked for attested release, by the KMS server;
//! an attested one (simulated TEE) reads the same dataset. The unattested client has no way
//! to ask for `ReleaseDataKey` at all (see the `compile_fail` example of the crate docs).

use ppml::crates::attestation::policy::{AllowedMeasurement, Policy};
use ppml::files::{EncryptOptions, NoProgress};
use ppml::{ErrorClass, KmsError, PpmlContext, Tee};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_attested_context_reads_a_gated_dataset() {
    let common::OwnedApp {
        dir,
        mut settings,
        remote,
        platform_key,
        policy_id,
        ..
    } = common::owned_app().await;
    use ppml::crates::kms::KeyManagementService as _;
    let gated = remote.create_primary_key().await.unwrap();
    let owner = remote.create_primary_key().await.unwrap();
    remote.set_release_policy(&gated, &policy_id).await.unwrap();
    settings.primary_key = Some(gated.0.clone());
    settings.output_key = Some(owner.0.clone());

    // The owner encrypts under the gated key (generating a data key needs no attestation).
    let csv = dir.path().join("people.csv");
    std::fs::write(&csv, "name,age,job\nann,31,Developer\nbob,52,Engineer\n").unwrap();
    let dataset = dir.path().join("people.enc");
    let owner_ctx = PpmlContext::builder()
        .settings(settings.clone())
        .build()
        .await
        .unwrap();
    owner_ctx
        .encrypt_paths(&csv, &dataset, &EncryptOptions::default(), &NoProgress)
        .await
        .unwrap();

    // Unattested: the KMS refuses the gated key.
    let refused = owner_ctx.read_csv(&dataset).await.unwrap_err();
    assert_eq!(refused.class(), ErrorClass::AccessDenied, "{refused}");
    assert!(
        refused
            .to_string()
            .contains(&KmsError::AttestationRequired.to_string()),
        "{refused}"
    );

    let attestation = ppml::AttestationConfig {
        tee: Tee::Sim,
        policy_id: policy_id.clone(),
        sim_platform_key: Some(platform_key.clone()),
    };
    // Attested, but in a job the owner did not grant: the KMS refuses the gated key.
    let ungranted = PpmlContext::builder()
        .settings(settings.clone())
        .attestation(attestation.clone())
        .build()
        .await
        .unwrap();
    let refused = ungranted.read_csv(&dataset).await.unwrap_err();
    assert_eq!(refused.class(), ErrorClass::AccessDenied, "{refused}");
    assert!(refused.to_string().contains("grant"), "{refused}");

    // Attested in the simulated TEE under the policy, in the job the owner granted: the same
    // dataset opens, and only the granted output can be written.
    let job = ppml::AppSpec::Sql(ppml::SqlSpec {
        sql: "SELECT name FROM people".into(),
        tables: [(
            "people".to_string(),
            ppml::DatasetLocation::Local(dataset.clone()),
        )]
        .into(),
        output: Some(ppml::DatasetLocation::Local(dir.path().join("names.enc"))),
        input_partitions: None,
        output_partitions: None,
        output_format: Default::default(),
        overwrite: false,
        plaintext: false,
    });
    let grant = settings
        .job_grant(
            ppml::grant::GrantedJob::App {
                spec: &job,
                output_key: Some(&owner),
            },
            &ppml::grant::GrantOptions::default(),
        )
        .await
        .unwrap()
        .expect("the owner key is on this machine");
    let attested = PpmlContext::builder()
        .settings(settings.clone())
        .attestation(attestation)
        .grant(grant)
        .build()
        .await
        .unwrap();
    assert_eq!(attested.attestation().policy_id(), policy_id);
    let elsewhere = attested
        .write(
            attested.read_csv(&dataset).await.unwrap(),
            dir.path().join("stolen.enc"),
            ppml::WriteOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(elsewhere.class(), ErrorClass::AccessDenied, "{elsewhere}");
    assert!(!dir.path().join("stolen.enc").exists());
    let people = attested.read_csv(&dataset).await.unwrap();
    let rows: usize = attested
        .collect(people)
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 2);

    // A policy the runtime does not satisfy: the build fails, there is no unattested fallback.
    let strict = Policy::strict(vec![AllowedMeasurement {
        tee: Some(Tee::Sgx),
        mrenclave: Some("00".repeat(32)),
        ..AllowedMeasurement::default()
    }]);
    let strict_id = remote.upload_policy(&strict).await.unwrap();
    let failed = PpmlContext::builder()
        .settings(settings)
        .attestation(ppml::AttestationConfig {
            tee: Tee::Sim,
            policy_id: strict_id,
            sim_platform_key: Some(platform_key.clone()),
        })
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(failed, ppml::Error::Attestation { .. }),
        "{failed}"
    );
    assert_eq!(failed.class(), ErrorClass::AccessDenied);
}
