//! A scheduler, two executors and a driver in this process, on loopback, with mutual TLS on
//! every channel: a job gives the local engine's answer, and the scheduler and the executors'
//! Flight services refuse cleartext clients, clients without a certificate and clients with a
//! certificate of another CA.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::Action;
use arrow_flight::flight_service_client::FlightServiceClient;
use ballista_core::serde::protobuf::GetJobStatusParams;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use common::{Cluster, people, start_cluster, write_dataset};
use ppml_cluster::ClusterRunner;
use ppml_cluster::flight::{FETCH_ACTION, FetchRequest};
use ppml_cluster::process::cluster_session_config;
use ppml_cluster::tls::{self, DRIVER, SERVER_NAME, client_customizer, generate_cluster_certs};
use ppml_engine::dataset::WriteOptions;
use ppml_engine::{OutputTarget, PpmlSession, simple_query};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Longest time any single connection attempt may take here.
const ATTEMPT: Duration = Duration::from_secs(30);

async fn simple_query_count(c: &Cluster, session: &PpmlSession, input: &Path, out: &str) -> i64 {
    let output = c.dir.path().join(out);
    let target = OutputTarget::Encrypted {
        kms: c.kms.as_ref(),
        primary: &c.primary,
        dir: (&output).into(),
        options: WriteOptions::default(),
    };
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        simple_query::run(session, input, target, Some(2), true),
    )
    .await
    .expect("SimpleQuery finishes")
    .unwrap();
    report.count
}

/// How a test client connects.
enum Client {
    /// h2c, no TLS at all.
    Cleartext,
    /// TLS with this configuration.
    Tls(ClientTlsConfig),
}

fn endpoint(client: &Client, port: u16) -> Endpoint {
    match client {
        Client::Cleartext => Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap(),
        Client::Tls(config) => Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(config.clone())
            .unwrap(),
    }
    .connect_timeout(Duration::from_secs(10))
}

/// A scheduler RPC; `Ok` if the scheduler answered it.
async fn call_scheduler(client: &Client, port: u16) -> Result<(), String> {
    let attempt = async {
        let channel = endpoint(client, port)
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        SchedulerGrpcClient::new(channel)
            .get_job_status(GetJobStatusParams {
                job_id: "no-such-job".into(),
            })
            .await
            .map(drop)
            .map_err(|status| format!("get_job_status: {status:?}"))
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A Flight fetch of a file that does not exist; `Ok` if the executor answered it (with
/// `NotFound`).
async fn call_flight(client: &Client, port: u16) -> Result<(), String> {
    let attempt = async {
        let channel = endpoint(client, port)
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let request = FetchRequest {
            job_id: "no-such-job".into(),
            stage_id: 1,
            partition_id: 0,
            file_id: 0,
        };
        let answer = FlightServiceClient::new(channel)
            .do_action(Action {
                r#type: FETCH_ACTION.into(),
                body: serde_json::to_vec(&request).unwrap().into(),
            })
            .await;
        match answer {
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(format!("do_action: {status:?}")),
            Ok(_) => Err("do_action: a stream for a file that does not exist".into()),
        }
    };
    tokio::time::timeout(ATTEMPT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_on_every_channel() {
    let c = start_cluster(2, true).await;
    let driver = c.driver.as_ref().expect("TLS cluster");
    let input = write_dataset(
        &c,
        "people",
        &[
            people(3000, 0, None),
            people(2500, 3000, None),
            people(10, 5500, None),
        ],
    )
    .await;

    // SimpleQuery locally, and on the cluster over mutual TLS.
    let local = PpmlSession::encrypted(c.kms.clone(), Some(3));
    let local_count = simple_query_count(&c, &local, &input, "out-local").await;
    let runner = ClusterRunner::new(
        c.scheduler.to_string(),
        c.kms.clone(),
        c.primary.clone(),
        client_customizer(driver),
    );
    let cluster = PpmlSession::encrypted_with_config(
        c.kms.clone(),
        cluster_session_config().with_target_partitions(3),
    )
    .with_runner(Arc::new(runner));
    let cluster_count = simple_query_count(&c, &cluster, &input, "out-cluster").await;
    assert_eq!(local_count, 5510);
    assert_eq!(
        cluster_count, local_count,
        "cluster SimpleQuery differs from local"
    );

    // A driver that speaks cleartext cannot submit.
    let cleartext_runner = ClusterRunner::new(
        c.scheduler.to_string(),
        c.kms.clone(),
        c.primary.clone(),
        None,
    );
    let cleartext = PpmlSession::encrypted_with_config(
        c.kms.clone(),
        cluster_session_config().with_target_partitions(3),
    )
    .with_runner(Arc::new(cleartext_runner));
    let output = c.dir.path().join("out-cleartext");
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        simple_query::run(
            &cleartext,
            &input,
            OutputTarget::Encrypted {
                kms: c.kms.as_ref(),
                primary: &c.primary,
                dir: (&output).into(),
                options: WriteOptions::default(),
            },
            Some(2),
            true,
        ),
    )
    .await
    .expect("the cleartext driver gives up");
    assert!(refused.is_err(), "a cleartext driver ran a job");

    // The clients of the test.
    let certs = c.dir.path().join("tls");
    let ca = Certificate::from_pem(driver.ca_pem());
    let good = Client::Tls(tls::client_tls(driver));
    let other_ca = c.dir.path().join("other-ca");
    generate_cluster_certs(&other_ca, &[DRIVER], &[], false).unwrap();
    let foreign_identity = Identity::from_pem(
        read(other_ca.join("driver.pem")),
        read(other_ca.join("driver.key")),
    );
    let foreign = Client::Tls(
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(foreign_identity)
            .domain_name(SERVER_NAME),
    );
    let anonymous = Client::Tls(
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name(SERVER_NAME),
    );
    // A client that trusts the other CA does not accept the cluster's servers either.
    let wrong_trust = Client::Tls(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(other_ca.join("ca.pem"))))
            .identity(Identity::from_pem(
                read(certs.join("driver.pem")),
                read(certs.join("driver.key")),
            ))
            .domain_name(SERVER_NAME),
    );

    let scheduler_port = c.scheduler.port();
    call_scheduler(&good, scheduler_port)
        .await
        .expect("the driver's certificate is accepted by the scheduler");
    for port in &c.flight_ports {
        call_flight(&good, *port)
            .await
            .expect("the driver's certificate is accepted by the executor");
    }
    for (name, client) in [
        ("cleartext", &Client::Cleartext),
        ("no client certificate", &anonymous),
        ("certificate of another CA", &foreign),
        ("trusting another CA", &wrong_trust),
    ] {
        let scheduler = call_scheduler(client, scheduler_port).await;
        assert!(scheduler.is_err(), "scheduler served a client with {name}");
        eprintln!("scheduler refused {name}: {}", scheduler.unwrap_err());
        for port in &c.flight_ports {
            let flight = call_flight(client, *port).await;
            assert!(
                flight.is_err(),
                "executor {port} served a client with {name}"
            );
            eprintln!("executor {port} refused {name}: {}", flight.unwrap_err());
        }
    }

    // The cluster still works after all that.
    call_scheduler(&good, scheduler_port).await.unwrap();
}
