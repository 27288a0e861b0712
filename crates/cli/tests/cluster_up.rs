//! `ppml cluster up|status|down`: a local development cluster of separate processes with
//! mutual TLS, used by `ppml submit --mode client`.

mod common;

use common::{encrypted_people, free_cluster_ports, is_running, ppml, run};

fn pids(state: &str) -> Vec<u32> {
    let value: serde_json::Value = serde_json::from_str(state).unwrap();
    value["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn cluster_up_runs_client_mode_jobs_and_down_stops_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cluster = dir.path().join("cluster");
    let enc = encrypted_people(&home, dir.path(), 50000, 5, 2, ppml(&home));

    let port = free_cluster_ports(2);
    let up = run(ppml(&home)
        .args([
            "cluster",
            "up",
            "--executors",
            "2",
            "--executor-memory",
            "256m",
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(&cluster));
    let printed = String::from_utf8_lossy(&up.stdout).into_owned();
    let master = format!("127.0.0.1:{port}");
    assert!(
        printed.contains(&format!("master = \"{master}\"")),
        "{printed}"
    );
    assert!(cluster.join("tls/ca.pem").exists());
    let state = std::fs::read_to_string(cluster.join("cluster.json")).unwrap();
    let started = pids(&state);
    assert_eq!(started.len(), 3);

    // A second `up` refuses while the first cluster runs.
    let again = ppml(&home)
        .args(["cluster", "up", "--port", &port.to_string(), "--dir"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // The executors were given their memory (a pool of 256 MiB split over their core).
    let executor_log = std::fs::read_to_string(cluster.join("executor-0.log")).unwrap_or_default();
    let command_line = std::fs::read_to_string(format!("/proc/{}/cmdline", started[1]))
        .unwrap_or_default()
        .replace('\0', " ");
    assert!(
        command_line.contains("--memory 256m"),
        "{command_line} {executor_log}"
    );

    // Sizes are checked before anything starts.
    for (args, needle) in [
        (vec!["--driver-memory", "lots"], "--driver-memory"),
        (vec!["--executor-memory", "1g"], "long-running"),
    ] {
        let out = ppml(&home)
            .args(["submit", "--mode", "local"])
            .args(&args)
            .args(["simple-query", "--input"])
            .arg(&enc)
            .arg("--output")
            .arg(dir.path().join("never.enc"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{out:?}"
        );
        assert!(!dir.path().join("never.enc").exists());
    }

    let status = run(ppml(&home)
        .args(["cluster", "status", "--dir"])
        .arg(&cluster));
    assert_eq!(
        String::from_utf8_lossy(&status.stdout)
            .matches(" running ")
            .count(),
        3
    );

    let output = dir.path().join("result.enc");
    let submitted = run(ppml(&home)
        .args([
            "submit",
            "--mode",
            "client",
            "--master",
            &master,
            "--driver-memory",
            "128m",
            "--cluster-tls",
        ])
        .arg(cluster.join("tls"))
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&output));
    assert!(String::from_utf8_lossy(&submitted.stdout).contains("count(name): 50000"));
    let decrypted = run(ppml(&home)
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&output));
    assert!(String::from_utf8_lossy(&decrypted.stdout).starts_with("name,age,job\n"));

    // Without TLS material the cluster refuses the driver.
    let cleartext = ppml(&home)
        .args([
            "submit",
            "--mode",
            "client",
            "--master",
            &master,
            "--insecure-cleartext",
        ])
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(dir.path().join("cleartext.enc"))
        .output()
        .unwrap();
    assert!(!cleartext.status.success());
    assert!(!dir.path().join("cleartext.enc").exists());

    run(ppml(&home).args(["cluster", "down", "--dir"]).arg(&cluster));
    for pid in started {
        assert!(!is_running(pid), "process {pid} still runs after down");
    }
    assert!(
        !ppml(&home)
            .args(["cluster", "status", "--dir"])
            .arg(&cluster)
            .status()
            .unwrap()
            .success()
    );
}
