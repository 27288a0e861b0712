//! Faults on a cluster of separate processes: an executor killed with SIGKILL in the middle of
//! a job. The job completes on the executor left, with the rows local mode gives.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Process, encrypted_people, files_under, free_port, ppml, run};

fn decrypted_rows(home: &Path, dataset: &Path) -> Vec<String> {
    let out = run(ppml(home)
        .args(["decrypt", "--out", "-", "--in"])
        .arg(dataset));
    let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("name,"))
        .map(str::to_string)
        .collect();
    rows.sort_unstable();
    rows
}

#[test]
fn an_executor_killed_mid_job_loses_no_rows_and_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded KMS, shared by every process through PPML_HOME (no TEE in this test).
    let home = dir.path().join("home");
    let enc = encrypted_people(&home, dir.path(), 3000000, 3, 8, ppml(&home));

    let local = dir.path().join("local.enc");
    run(ppml(&home)
        .args([
            "submit",
            "--mode",
            "local",
            "simple-query",
            "--no-preview",
            "--input",
        ])
        .arg(&enc)
        .arg("--output")
        .arg(&local));
    let expected = decrypted_rows(&home, &local);
    assert!(expected.len() > 100_000);

    let mut scheduler = ppml(&home)
        .args([
            "scheduler",
            "--bind",
            "127.0.0.1:0",
            "--executor-timeout",
            "3",
        ])
        .arg("--insecure-cleartext")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(scheduler.stderr.take().unwrap()).lines();
    let master = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find_map(|l| {
            l.strip_prefix("ppml scheduler listening on ")
                .map(str::to_string)
        })
        .expect("scheduler address");
    std::thread::spawn(move || for _ in lines {});
    let _scheduler = Process(scheduler);
    let mut executors = Vec::new();
    let mut work_dirs = Vec::new();
    for i in 0..2 {
        let work_dir = dir.path().join(format!("executor-{i}"));
        let child = ppml(&home)
            .args([
                "executor",
                "--master",
                &master,
                "--cores",
                "1",
                "--insecure-cleartext",
            ])
            .args(["--flight-port", &free_port().to_string(), "--work-dir"])
            .arg(&work_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        executors.push(Process(child));
        work_dirs.push(work_dir);
    }

    let output = dir.path().join("cluster.enc");
    let mut submit = ppml(&home)
        .args([
            "submit",
            "--mode",
            "client",
            "--master",
            &master,
            "--insecure-cleartext",
        ])
        .args(["--num-executors", "2", "--executor-cores", "1"])
        .args(["simple-query", "--no-preview", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&output)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Kill executor 1 as soon as the job has written shuffle output on either executor.
    let started = Instant::now();
    while work_dirs.iter().all(|d| {
        !files_under(d)
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".arrow"))
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        submit.try_wait().unwrap().is_none(),
        "the job ended before the kill: nothing was tested"
    );
    executors[1].0.kill().unwrap();
    executors[1].0.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = submit.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the job neither finished nor failed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(submit.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // Ballista reruns the lost executor's tasks (and the map tasks whose shuffle files died
    // with it) on the executor left: the job completes, with exactly the rows of local mode.
    assert!(
        status.success(),
        "the job failed after one of two executors was killed: {stderr}"
    );
    assert_eq!(
        decrypted_rows(&home, &output),
        expected,
        "the job completed after the kill with different rows"
    );
    let siblings: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cluster.enc") && n != "cluster.enc")
        .collect();
    assert!(siblings.is_empty(), "temporary output left: {siblings:?}");
}
