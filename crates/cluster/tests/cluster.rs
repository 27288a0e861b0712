//! A scheduler and two executors in this process, on loopback: queries on encrypted datasets
//! give the same rows as the local engine, and nothing a job leaves on the executors' disks
//! holds a plaintext value.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use ppml_cluster::ClusterRunner;
use ppml_cluster::process::{
    ExecutorOptions, SchedulerOptions, cluster_session_config, run_executor, run_scheduler,
};
use ppml_engine::dataset::{DatasetWriter, WriteOptions, part_name};
use ppml_engine::{OutputTarget, PpmlSession, simple_query};
use ppml_kms::{AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId};

/// A value that appears in the input and in the SimpleQuery result, and nowhere by chance.
const MARKER: &str = "qzxjvkwq";

struct Cluster {
    dir: tempfile::TempDir,
    kms: Arc<LocalKms>,
    primary: PrimaryKeyId,
    scheduler: String,
    work_dirs: Vec<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_cluster(executors: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let kms_dir = dir.path().join("kms");
    LocalKms::init(&kms_dir).unwrap();
    let creds: AppCredentials = LocalKms::enroll(&kms_dir).unwrap();
    let kms = Arc::new(LocalKms::open(&kms_dir, &creds).unwrap());
    let primary = kms.create_primary_key().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheduler = listener.local_addr().unwrap();
    tokio::spawn(async move {
        run_scheduler(
            listener,
            SchedulerOptions::default(),
            std::future::pending(),
        )
        .await
        .unwrap()
    });
    let mut work_dirs = Vec::new();
    for i in 0..executors {
        let work_dir = dir.path().join(format!("executor-{i}"));
        work_dirs.push(work_dir.clone());
        let options = ExecutorOptions {
            executor_id: format!("executor-{i}"),
            scheduler_host: "127.0.0.1".into(),
            scheduler_port: scheduler.port(),
            bind_host: "127.0.0.1".into(),
            external_host: "127.0.0.1".into(),
            flight_port: free_port(),
            work_dir,
            vcores: 2,
            kms: kms.clone(),
            customizer: None,
            flight_tls: None,
        };
        tokio::spawn(async move { run_executor(options).await.unwrap() });
    }
    Cluster {
        dir,
        kms,
        primary,
        scheduler: scheduler.to_string(),
        work_dirs,
    }
}

/// `name,age,job` rows; row `marker_row` is a Developer aged 30 named [`MARKER`].
fn people(rows: usize, offset: usize, marker_row: Option<usize>) -> String {
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

async fn write_dataset(c: &Cluster, name: &str, contents: &[String]) -> PathBuf {
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
        let mut part = writer.part(&part_name(i, "csv")).unwrap();
        part.write_all(text.as_bytes()).unwrap();
        entries.push(part.finish().unwrap());
    }
    writer.commit(entries).unwrap();
    dest
}

fn local_session(c: &Cluster) -> PpmlSession {
    PpmlSession::encrypted(c.kms.clone(), Some(3))
}

fn cluster_session(c: &Cluster) -> PpmlSession {
    let runner = ClusterRunner::new(&c.scheduler, c.kms.clone(), c.primary.clone(), None);
    PpmlSession::encrypted_with_config(
        c.kms.clone(),
        cluster_session_config().with_target_partitions(3),
    )
    .with_runner(Arc::new(runner))
}

/// Rows as sorted lines, so results compare regardless of partitioning.
fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).unwrap().to_string();
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

async fn read_dataset(c: &Cluster, dir: &Path) -> Vec<String> {
    let session = local_session(c);
    session.register_csv("out", dir, None).await.unwrap();
    let df = session.context().table("out").await.unwrap();
    sorted_rows(&df.collect().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_on_the_cluster_match_local_mode_and_leave_no_plaintext() {
    let c = start_cluster(2).await;
    let input = write_dataset(
        &c,
        "people",
        &[
            people(3000, 0, Some(1234)),
            people(2500, 3000, None),
            people(10, 5500, None),
        ],
    )
    .await;

    // SimpleQuery, locally and on the cluster.
    let mut results = Vec::new();
    for (mode, session) in [
        ("local", local_session(&c)),
        ("cluster", cluster_session(&c)),
    ] {
        let output = c.dir.path().join(format!("out-{mode}"));
        let target = OutputTarget::Encrypted {
            kms: c.kms.as_ref(),
            primary: &c.primary,
            dir: &output,
            options: WriteOptions::default(),
        };
        let report = tokio::time::timeout(
            Duration::from_secs(120),
            simple_query::run(&session, &input, target, Some(2), true),
        )
        .await
        .expect("SimpleQuery finishes")
        .unwrap();
        results.push((
            report.count,
            report.output.rows,
            read_dataset(&c, &output).await,
        ));
    }
    assert_eq!(results[0].0, 5510);
    assert_eq!(
        results[0], results[1],
        "cluster SimpleQuery differs from local"
    );
    assert!(results[1].2.iter().any(|row| row.contains(MARKER)));

    // A join and an aggregate, whose plans shuffle by hash between stages.
    let jobs = write_dataset(
        &c,
        "jobs",
        &["job,dept\nDeveloper,R&D\nEngineer,R&D\nResearcher,Labs\n".to_string()],
    )
    .await;
    let sql = "SELECT j.dept, p.job, count(*) AS n, sum(p.age) AS ages, min(p.name) AS first \
               FROM people p JOIN jobs j ON p.job = j.job \
               WHERE p.age > 25 GROUP BY j.dept, p.job";
    let mut answers = Vec::new();
    for session in [local_session(&c), cluster_session(&c)] {
        session.register_csv("people", &input, None).await.unwrap();
        session.register_csv("jobs", &jobs, None).await.unwrap();
        let df = session.context().sql(sql).await.unwrap();
        let batches = tokio::time::timeout(Duration::from_secs(120), session.collect(df))
            .await
            .expect("join finishes")
            .unwrap();
        answers.push(sorted_rows(&batches));
    }
    assert_eq!(answers[0].len(), 3, "{:?}", answers[0]);
    assert_eq!(
        answers[0], answers[1],
        "cluster join/aggregate differs from local"
    );

    // Every file the jobs left on the executors is ciphertext.
    let mut shuffle_files = 0;
    for work_dir in &c.work_dirs {
        for file in files_under(work_dir) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "{} holds plaintext",
                file.display()
            );
            assert!(
                !bytes.windows(9).any(|w| w == b"Developer"),
                "{} holds plaintext",
                file.display()
            );
            shuffle_files += 1;
        }
    }
    assert!(shuffle_files > 0, "the jobs wrote no shuffle files");
}
