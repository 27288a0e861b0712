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
use ppml_engine::{OutputFormat, OutputTarget, PpmlSession, simple_query};

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
    session.register_dataset("out", dir, None).await.unwrap();
    let df = session.context().table("out").await.unwrap();
    sorted_rows(&df.collect().await.unwrap())
}

/// The sorted rows of `sql` over the datasets `people` and `jobs`, locally and on the cluster.
async fn local_and_cluster_rows(
    c: &Cluster,
    people: &Path,
    jobs: &Path,
    sql: &str,
) -> [Vec<String>; 2] {
    let mut answers = [Vec::new(), Vec::new()];
    for (answer, session) in answers
        .iter_mut()
        .zip([local_session(c), cluster_session(c)])
    {
        session
            .register_dataset("people", people, None)
            .await
            .unwrap();
        session.register_dataset("jobs", jobs, None).await.unwrap();
        let df = session.context().sql(sql).await.unwrap();
        let batches = tokio::time::timeout(Duration::from_secs(120), session.collect(df))
            .await
            .expect("the query finishes")
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        *answer = sorted_rows(&batches);
    }
    answers
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
    let answers = local_and_cluster_rows(&c, &input, &jobs, sql).await;
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

/// Query shapes whose stages the executors must restrict as the scheduler does (unions,
/// joins whose small side is broadcast, sorts with limits, windows, global aggregates): each
/// gives the same rows on the cluster, running the driver's signed stages, as locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_shapes_on_the_cluster_match_local_mode() {
    let c = start_cluster(2, false).await;
    let input = write_dataset(
        &c,
        "people",
        &[
            people(700, 0, None),
            people(500, 700, None),
            people(300, 1200, None),
            people(5, 1500, None),
        ],
    )
    .await;
    let jobs = write_dataset(
        &c,
        "jobs",
        &["job,dept\nDeveloper,R&D\nEngineer,R&D\nResearcher,Labs\n".to_string()],
    )
    .await;
    let queries = [
        "SELECT job, count(*) AS n FROM people WHERE age > 30 GROUP BY job \
         UNION ALL SELECT dept, count(*) FROM jobs GROUP BY dept",
        "SELECT name, age FROM people WHERE age < 20 \
         UNION ALL SELECT name, age FROM people WHERE age > 59",
        "SELECT p.name, j.dept FROM people p JOIN jobs j ON p.job = j.job WHERE p.age = 44",
        "SELECT name, age FROM people ORDER BY age DESC, name LIMIT 7",
        "SELECT job, name, rank() OVER (PARTITION BY job ORDER BY age DESC, name) AS r \
         FROM people WHERE age > 58",
        "SELECT count(*), count(DISTINCT job), min(age), max(name) FROM people",
        "SELECT DISTINCT age % 7 AS a FROM people",
        "SELECT 1 AS one",
    ];
    for sql in queries {
        let answers = local_and_cluster_rows(&c, &input, &jobs, sql).await;
        assert!(!answers[0].is_empty(), "{sql}");
        assert_eq!(
            answers[0], answers[1],
            "{sql}: the cluster differs from local"
        );
    }
}

/// Parquet and NDJSON datasets (written from a CSV one by a local query) are read by the
/// executors as the driver reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parquet_and_ndjson_datasets_on_the_cluster_match_local_mode() {
    let c = start_cluster(2, false).await;
    let csv_people = write_dataset(
        &c,
        "people",
        &[people(900, 0, None), people(400, 900, None)],
    )
    .await;
    let csv_jobs = write_dataset(
        &c,
        "jobs",
        &["job,dept\nDeveloper,R&D\nEngineer,R&D\nResearcher,Labs\n".to_string()],
    )
    .await;
    let mut converted = Vec::new();
    for (source, format, name) in [
        (&csv_people, OutputFormat::Parquet, "people_pq"),
        (&csv_jobs, OutputFormat::Json, "jobs_js"),
    ] {
        let session = local_session(&c);
        session.register_dataset("t", source, None).await.unwrap();
        let df = session.sql("SELECT * FROM t").await.unwrap();
        let output = c.dir.path().join(name);
        let target = OutputTarget::Encrypted {
            kms: c.kms.as_ref(),
            primary: &c.primary,
            dir: (&output).into(),
            options: WriteOptions::default(),
        };
        session.write(df, target, Some(2), format).await.unwrap();
        converted.push(output);
    }
    for sql in [
        "SELECT job, count(*) AS n, sum(age) AS s FROM people WHERE age > 30 GROUP BY job",
        "SELECT p.name, j.dept FROM people p JOIN jobs j ON p.job = j.job WHERE p.age = 44",
        "SELECT name, age FROM people ORDER BY age DESC, name LIMIT 5",
    ] {
        let answers = local_and_cluster_rows(&c, &converted[0], &converted[1], sql).await;
        let csv_answers = local_and_cluster_rows(&c, &csv_people, &csv_jobs, sql).await;
        assert!(!answers[0].is_empty(), "{sql}");
        assert_eq!(
            answers[0], answers[1],
            "{sql}: the cluster differs from local"
        );
        assert_eq!(
            answers[0], csv_answers[0],
            "{sql}: Parquet/NDJSON differ from CSV"
        );
    }
}

/// Attack 2b on a running cluster: a holder of a cluster certificate copies a job's settings
/// (its wrapped shuffle key, its grant, its signed stages) and submits a plan of its own over
/// the same input, to read the task statistics of a predicate of its choosing. The executors
/// refuse every task of it: they run only the stages the job's driver signed. The same
/// settings with the driver's own plan still run, and settings without signed stages are
/// refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_a_job_replayed_with_plans_of_its_own_is_refused() {
    use ppml_cluster::client::{
        JobSetting, JobState, job_status, scheduler_channel, scheduler_client, submit_plan,
    };
    use ppml_cluster::job::{new_job_key, with_job_settings};
    use ppml_cluster::stages::{SignedStages, plan_stages};

    let c = start_cluster(2, false).await;
    let input = write_dataset(
        &c,
        "people",
        &[people(300, 0, None), people(300, 300, None)],
    )
    .await;
    let session = cluster_session(&c);
    session
        .register_dataset("people", &input, None)
        .await
        .unwrap();
    let ctx = session.context();
    let physical = |sql: &'static str| async move {
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    };
    let owners = physical("SELECT job, count(*) FROM people GROUP BY job").await;
    let theirs = physical("SELECT job, count(*) FROM people WHERE age = 59 GROUP BY job").await;

    // The driver's settings of its job.
    let job_id = "0123456789abcdef0123456789abcdef-replayed";
    let (mut job, key) = new_job_key(c.kms.as_ref(), &c.primary, job_id)
        .await
        .unwrap();
    let stages = plan_stages(&owners, ctx.copied_config().options(), &ctx.task_ctx()).unwrap();
    job.stages = Some(
        SignedStages::from_stages(&stages)
            .unwrap()
            .sign(job_id, &key),
    );
    let settings_of = |job: &ppml_cluster::job::JobSettings| {
        let mut config = with_job_settings(ctx.copied_config());
        job.apply(&mut config).unwrap();
        config
            .options()
            .entries()
            .into_iter()
            .map(|e| JobSetting {
                key: e.key,
                value: e.value,
            })
            .collect::<Vec<_>>()
    };
    let addr = c.scheduler.to_string();
    let mut scheduler = scheduler_client(scheduler_channel(&addr, &None).await.unwrap());
    let mut outcome = async |plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
                             settings: Vec<JobSetting>| {
        let id = submit_plan(&mut scheduler, &addr, plan, settings, "attack".into())
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = job_status(&mut scheduler, &addr, &id).await.unwrap();
            match status.and_then(|s| s.status) {
                Some(JobState::Successful(_)) => return Ok(()),
                Some(JobState::Failed(failed)) => return Err(failed.error),
                _ if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("job {id} still {other:?}"),
            }
        }
    };

    outcome(&owners, settings_of(&job))
        .await
        .expect("the driver's own plan runs under its settings");
    let refused = outcome(&theirs, settings_of(&job)).await.unwrap_err();
    // Ballista reports the executor's error in its debug form (`StagePlan("…")`).
    assert!(
        refused.contains("StagePlan") && refused.contains("as the job's driver planned it"),
        "{refused}"
    );
    job.stages = None;
    let refused = outcome(&owners, settings_of(&job)).await.unwrap_err();
    assert!(refused.contains("carries no ppml.stages"), "{refused}");
}
