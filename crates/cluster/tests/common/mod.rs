//! A scheduler and executors in the test's process, on loopback, over the embedded KMS;
//! shared by the cluster crate's integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ppml_cluster::driver::AppDriver;
use ppml_cluster::process::{ExecutorOptions, SchedulerOptions, run_executor, run_scheduler};
use ppml_cluster::tls::{
    ClusterTls, DRIVER, EXECUTOR, ROLES, SCHEDULER, client_customizer, generate_cluster_certs,
    server_tls,
};
use ppml_engine::dataset::{DatasetWriter, WriteOptions, part_name};
use ppml_kms::{AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId};

/// A value that appears in the input and in the SimpleQuery result, and nowhere by chance.
pub const MARKER: &str = "qzxjvkwq";

/// A running cluster and the KMS its datasets are encrypted with.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kms: Arc<LocalKms>,
    pub primary: PrimaryKeyId,
    pub scheduler: SocketAddr,
    pub flight_ports: Vec<u16>,
    pub work_dirs: Vec<PathBuf>,
    /// The driver's TLS identity, when the cluster uses TLS.
    pub driver: Option<ClusterTls>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a scheduler and `executors` executors (2 vcores each), with mutual TLS if `tls`.
pub async fn start_cluster(executors: usize, tls: bool) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (scheduler_tls, executor_tls, driver) = if tls {
        let certs = dir.path().join("tls");
        generate_cluster_certs(&certs, &ROLES, &[], false).unwrap();
        (
            Some(ClusterTls::load(&certs, SCHEDULER).unwrap()),
            Some(ClusterTls::load(&certs, EXECUTOR).unwrap()),
            Some(ClusterTls::load(&certs, DRIVER).unwrap()),
        )
    } else {
        (None, None, None)
    };

    let kms_dir = dir.path().join("kms");
    LocalKms::init(&kms_dir).unwrap();
    let creds: AppCredentials = LocalKms::enroll(&kms_dir).unwrap();
    let kms = Arc::new(LocalKms::open(&kms_dir, &creds).unwrap());
    let primary = kms.create_primary_key().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheduler = listener.local_addr().unwrap();
    let options = SchedulerOptions {
        tls: scheduler_tls.as_ref().map(server_tls),
        customizer: scheduler_tls.as_ref().and_then(client_customizer),
        ..SchedulerOptions::default()
    };
    tokio::spawn(async move {
        run_scheduler(listener, options, std::future::pending())
            .await
            .unwrap()
    });
    let mut flight_ports = Vec::new();
    let mut work_dirs = Vec::new();
    for i in 0..executors {
        let flight_port = free_port();
        flight_ports.push(flight_port);
        let work_dir = dir.path().join(format!("executor-{i}"));
        work_dirs.push(work_dir.clone());
        let options = ExecutorOptions {
            executor_id: format!("executor-{i}"),
            scheduler_host: "127.0.0.1".into(),
            scheduler_port: scheduler.port(),
            bind_host: "127.0.0.1".into(),
            external_host: "127.0.0.1".into(),
            flight_port,
            work_dir,
            vcores: 2,
            memory_pool_size: None,
            kms: kms.clone(),
            customizer: executor_tls.as_ref().and_then(client_customizer),
            driver: Some(Arc::new(AppDriver {
                input_key: Some(primary.clone()),
                ..AppDriver::default()
            })),
            flight_tls: executor_tls.as_ref().map(server_tls),
        };
        tokio::spawn(async move { run_executor(options).await.unwrap() });
    }
    Cluster {
        dir,
        kms,
        primary,
        scheduler,
        flight_ports,
        work_dirs,
        driver,
    }
}

/// `name,age,job` rows; row `marker_row` is a Developer aged 30 named [`MARKER`].
pub fn people(rows: usize, offset: usize, marker_row: Option<usize>) -> String {
    let jobs = ["Developer", "Engineer", "Researcher"];
    let mut out = String::from("name,age,job\n");
    for i in offset..offset + rows {
        if Some(i) == marker_row {
            out.push_str(&format!("{MARKER},30,Developer\n"));
        } else {
            out.push_str(&format!("n{i},{},{}\n", 18 + i % 43, jobs[i % 3]));
        }
    }
    out
}

/// Writes each of `contents` as one part of a new encrypted dataset `name`.
pub async fn write_dataset(c: &Cluster, name: &str, contents: &[String]) -> PathBuf {
    let dest = c.dir.path().join(name);
    let writer = DatasetWriter::create(
        c.kms.as_ref(),
        &c.primary,
        &dest,
        WriteOptions {
            segment_size: 4096,
            ..WriteOptions::default()
        },
    )
    .await
    .unwrap();
    let mut entries = Vec::new();
    for (i, text) in contents.iter().enumerate() {
        let mut part = writer.part(&part_name(i, "csv")).await.unwrap();
        part.write_all(text.as_bytes()).unwrap();
        entries.push(part.finish().await.unwrap());
    }
    writer.commit(entries).await.unwrap();
    dest
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}
