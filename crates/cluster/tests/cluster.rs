//! A scheduler and two executors in this process, on loopback: queries on encrypted datasets
//! give the same rows as the local engine, and nothing a job leaves on the executors' disks
//! holds a plaintext value.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, MARKER, files_under, people, start_cluster, write_dataset};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use ppml_cluster::ClusterRunner;
use ppml_cluster::process::cluster_session_config;
use ppml_engine::dataset::WriteOptions;
use ppml_engine::{OutputTarget, PpmlSession, simple_query};

fn local_session(c: &Cluster) -> PpmlSession {
    PpmlSession::encrypted(c.kms.clone(), Some(3))
}

fn cluster_session(c: &Cluster) -> PpmlSession {
    let runner = ClusterRunner::new(
        c.scheduler.to_string(),
        c.kms.clone(),
        c.primary.clone(),
        None,
    );
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

async fn read_dataset(c: &Cluster, dir: &Path) -> Vec<String> {
    let session = local_session(c);
    session.register_csv("out", dir, None).await.unwrap();
    let df = session.context().table("out").await.unwrap();
    sorted_rows(&df.collect().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_on_the_cluster_match_local_mode_and_leave_no_plaintext() {
    let c = start_cluster(2, false).await;
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
            dir: (&output).into(),
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
            // Ballista deletes a job's intermediate stages as soon as the job succeeds.
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
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
