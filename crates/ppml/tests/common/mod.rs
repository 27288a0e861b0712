//! What the attested-context tests share: a KMS server with simulated attestation, an app
//! enrolled with an owner key, and the owner's policy for this test binary in the simulated
//! TEE.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use ppml::Tee;
use ppml::config::{GivenSettings, Settings};
use ppml::crates::attestation::policy::{AllowedMeasurement, Policy};
use ppml::crates::attestation::sim::executable_measurement;
use ppml::crates::kms_client::RemoteKms;

/// An owner's app at a KMS server of its own (loopback, plain HTTP, simulation allowed).
pub struct OwnedApp {
    /// Holds the server's data (`kms/`), the owner's home (`home/`) and the test's files.
    pub dir: tempfile::TempDir,
    /// The owner's settings: the server, the app's credentials, the owner key.
    pub settings: Settings,
    /// The app's client (signing as the owner).
    pub remote: RemoteKms,
    /// The simulation platform key of this host.
    pub platform_key: PathBuf,
    /// The owner's policy: this test binary in the simulated TEE of this host's platform.
    pub policy: Policy,
    /// Its id at the KMS.
    pub policy_id: String,
}

pub async fn owned_app() -> OwnedApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ppml_kms_server::ServerConfig::new(dir.path().join("kms"));
    config.listen = "127.0.0.1:0".into();
    config.tls = ppml_kms_server::TlsMode::InsecureHttp;
    config.attestation.allow_simulation = true;
    let server = ppml_kms_server::KmsServer::start(&config).await.unwrap();
    let url = server.url();
    tokio::spawn(server.run(std::future::pending()));

    let home = dir.path().join("home");
    let mut settings = Settings::resolve(GivenSettings {
        home: Some(home.clone()),
        kms_url: Some(url),
        ..GivenSettings::default()
    })
    .unwrap();
    let (creds, _) = settings.enroll_owned().await.unwrap();
    settings.appid = Some(creds.appid.clone());
    settings.apikey = Some(creds.apikey.to_string());
    let kms = settings.open_kms().await.unwrap();
    let remote = kms.backend.remote().unwrap().clone();
    // The owner trusts the simulation platform of the host that runs the job.
    let platform_key = dir.path().join("sim-platform.pk8");
    let platform = ppml::sim_platform(Some(&platform_key), &home)
        .unwrap()
        .public_key();
    let policy = Policy {
        allow_simulation: true,
        sim_platforms: vec![hex::encode(platform)],
        ..Policy::strict(vec![AllowedMeasurement {
            tee: Some(Tee::Sim),
            mrenclave: Some(hex::encode(executable_measurement().unwrap())),
            ..AllowedMeasurement::default()
        }])
    };
    let policy_id = remote.upload_policy(&policy).await.unwrap();
    OwnedApp {
        dir,
        settings,
        remote,
        platform_key,
        policy,
        policy_id,
    }
}
