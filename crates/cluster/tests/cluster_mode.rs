//! Cluster mode with no `ppml` command in sight: this test binary, which links the library
//! crates only, runs the scheduler and executors (whose cluster-mode driver is
//! `ppml_cluster::driver::AppDriver`) and submits a SimpleQuery job with
//! `ppml_cluster::submit::JobClient`, holding no key.

mod common;

use common::{MARKER, people, start_cluster, write_dataset};
use ppml_cluster::driver::DriverSpec;
use ppml_cluster::submit::{JobClient, JobState};
use ppml_engine::PpmlSession;
use ppml_engine::app::{AppSpec, SimpleQuerySpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_mode_job_runs_on_library_executors() {
    let c = start_cluster(2, false).await;
    let input = write_dataset(
        &c,
        "people.enc",
        &[people(400, 0, Some(7)), people(400, 400, None)],
    )
    .await;
    let output = c.dir.path().join("developers.enc");
    let spec = AppSpec::SimpleQuery(SimpleQuerySpec {
        input: input.clone().into(),
        output: output.clone().into(),
        input_partitions: None,
        output_partitions: None,
        overwrite: false,
        plaintext: false,
        no_preview: true,
    });
    let client = JobClient::connect(c.scheduler.to_string(), &None)
        .await
        .unwrap();
    let job = client
        .submit(DriverSpec::new(&spec).unwrap(), None)
        .await
        .unwrap();
    let mut lines = Vec::new();
    let state = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        client.follow(&job, true, |line| lines.push(line.to_string())),
    )
    .await
    .expect("the job ends")
    .unwrap();
    assert!(
        matches!(state, JobState::Succeeded { .. }),
        "{state:?}: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("driver started: SimpleQuery")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(MARKER)), "{lines:?}");

    // The output holds exactly the rows SimpleQuery keeps.
    let session = PpmlSession::encrypted(c.kms.clone(), None);
    session
        .register_dataset("out", &output, None)
        .await
        .unwrap();
    let rows = session
        .collect(session.sql("SELECT name, age, job FROM out").await.unwrap())
        .await
        .unwrap();
    let got: usize = rows.iter().map(|b| b.num_rows()).sum();
    let all = format!("{}{}", people(400, 0, Some(7)), people(400, 400, None));
    let expected = all
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split(',').collect();
            f[2] == "Developer" && (20..=40).contains(&f[1].parse::<u32>().unwrap())
        })
        .count();
    assert_eq!(got, expected);
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&rows)
        .unwrap()
        .to_string();
    assert!(
        text.contains(MARKER),
        "the marker row is a Developer aged 30"
    );
}
