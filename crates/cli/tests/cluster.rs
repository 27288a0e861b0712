//! `ppml scheduler`, `ppml executor` and `ppml submit` as separate processes on loopback, with
//! a KMS server and the simulated TEE: attested executors run the job, an executor that fails
//! attestation exits before it ever registers, client mode gives the rows local-tee mode
//! gives, cluster mode (driver on an executor, submitter without KMS credentials) too, and
//! the executors' disks hold no plaintext. Every cluster channel is mutual TLS,
//! with certificates from `ppml cluster certs`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    Process, assert_no_plaintext, encrypted_people, free_port, ppml, run, spawn_and_read, stdout,
};

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines.dedup_by(|a, b| a == b && a.starts_with("name,"));
    lines
}

#[test]
fn client_mode_on_attested_executors_matches_local_tee_mode() {
    let dir = tempfile::tempdir().unwrap();
    let sim_key = dir.path().join("sim-platform.pk8");

    // The KMS and attestation service, accepting simulated TEEs of the platforms policies
    // name.
    let mut serve = ppml(&dir.path().join("server-home"));
    serve
        .args(["kms", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("kms"))
        .arg("--allow-simulation");
    let mut kms = serve
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(kms.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.rsplit_once(' ').unwrap().1.to_string();
    assert!(url.starts_with("https://"), "{first}");
    let second = lines.next().unwrap().unwrap();
    let fingerprint = second
        .strip_prefix("certificate fingerprint: ")
        .unwrap_or_else(|| panic!("no fingerprint in {second:?}"))
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    let _kms = Process(kms);
    let home = dir.path().join("home");
    let enroll = run(ppml(&home).args([
        "kms",
        "enroll",
        "--kms-url",
        &url,
        "--kms-fingerprint",
        &fingerprint,
    ]));
    let text = stdout(&enroll);
    let value = |name: &str| common::printed_value(&text, name);
    let (appid, apikey) = (value("appid"), value("apikey"));
    let client = |home: &Path| {
        let mut cmd = ppml(home);
        cmd.env("PPML_KMS_URL", &url)
            .env("PPML_KMS_FINGERPRINT", &fingerprint)
            .env("PPML_APPID", &appid)
            .env("PPML_APIKEY", &apikey)
            .env("PPML_SIM_PLATFORM_KEY", &sim_key);
        cmd
    };
    let primary = stdout(&run(client(&home).args(["kms", "create-key"])))
        .trim()
        .to_string();
    let with_key = |home: &Path| {
        let mut cmd = client(home);
        cmd.env("PPML_PRIMARY_KEY", &primary);
        cmd
    };

    // Data: people, encrypted under a key released only to attested runtimes.
    let enc = encrypted_people(&home, dir.path(), 20000, 7, 3, with_key(&home));
    let measurement = stdout(&run(ppml(&home).args(["attest", "measure"])))
        .trim()
        .to_string();
    let platform = stdout(&run(client(&home).args(["attest", "sim-platform"])))
        .trim()
        .to_string();
    let policy_file = |name: &str, mrenclave: &str| {
        common::sim_policy(&dir.path().join(name), mrenclave, &platform)
    };
    let good = stdout(&run(with_key(&home)
        .args(["kms", "release-policy", "--policy"])
        .arg(policy_file("good.json", &measurement))))
    .trim()
    .to_string();
    let other = stdout(&run(with_key(&home)
        .args(["kms", "release-policy", "--policy"])
        .arg(policy_file("other.json", &"00".repeat(32)))))
    .trim()
    .to_string();
    // release-policy sets the policy for the key; restore the good one for the job.
    run(with_key(&home).args(["kms", "release-policy", "--policy-id", &good]));

    // The cluster CA and the scheduler, executor and driver certificates.
    let certs = dir.path().join("cluster-tls");
    let written = stdout(&run(ppml(&home)
        .args(["cluster", "certs", "--out"])
        .arg(&certs)));
    for file in [
        "ca.pem",
        "scheduler.pem",
        "scheduler.key",
        "executor.pem",
        "executor.key",
    ] {
        assert!(written.contains(file), "{file} not in {written:?}");
    }
    let again = ppml(&home)
        .args(["cluster", "certs", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "the CA was replaced without --force"
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );
    // Cluster processes need TLS or an explicit opt-out: a usage error otherwise.
    let bare = ppml(&dir.path().join("scheduler-home"))
        .args(["scheduler", "--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(bare.status.code(), Some(2), "{bare:?}");
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("--cluster-tls"),
        "{bare:?}"
    );

    // The scheduler, and two attested executors, with mutual TLS.
    let mut scheduler = ppml(&dir.path().join("scheduler-home"));
    scheduler
        .args(["scheduler", "--bind", "127.0.0.1:0", "--cluster-tls"])
        .arg(&certs);
    let (_scheduler, line) = spawn_and_read(scheduler, "ppml scheduler listening on ", true);
    let master = line
        .trim_start_matches("ppml scheduler listening on ")
        .to_string();
    let mut executors = Vec::new();
    let mut work_dirs = Vec::new();
    for i in 0..2 {
        let work_dir = dir.path().join(format!("executor-{i}"));
        let mut cmd = with_key(&dir.path().join(format!("executor-home-{i}")));
        cmd.args(["--tee", "sim", "--attestation-policy", &good])
            .args(["executor", "--master", &master, "--cores", "2"])
            .args(["--flight-port", &free_port().to_string(), "--work-dir"])
            .arg(&work_dir)
            .arg("--cluster-tls")
            .arg(&certs);
        let (process, _) = spawn_and_read(cmd, "Attestation Success!", true);
        executors.push(process);
        work_dirs.push(work_dir);
    }

    // An executor refused by its policy stops before it registers: exit 4, the failure line.
    let started = Instant::now();
    let refused = with_key(&dir.path().join("executor-home-x"))
        .args(["--tee", "sim", "--attestation-policy", &other])
        .args(["executor", "--master", &master])
        .args(["--flight-port", &free_port().to_string()])
        .arg("--cluster-tls")
        .arg(&certs)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Attestation Fail! Application killed!")
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    // SimpleQuery in local-tee mode and in client mode.
    let submit = |mode: &[&str], out: &str| {
        let output = dir.path().join(out);
        // The owner key is in this home: the job's grant is signed at start, and shows counts.
        let result = with_key(&home)
            .args([
                "--tee",
                "sim",
                "--attestation-policy",
                &good,
                "--reveal-counts",
            ])
            .arg("submit")
            .args(mode)
            .args(["simple-query", "--no-preview", "--input"])
            .arg(&enc)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(result.status.success(), "{mode:?}: {result:?}");
        let decrypted = run(with_key(&home)
            .args(["--tee", "sim", "--attestation-policy", &good])
            .args(["decrypt", "--out", "-", "--in"])
            .arg(&output));
        (stdout(&result), sorted_lines(&stdout(&decrypted)))
    };
    let (local_report, local_rows) = submit(&["--mode", "local-tee"], "local.enc");
    let certs_arg = certs.to_str().unwrap();
    let client_mode = [
        "--mode",
        "client",
        "--master",
        &master,
        "--num-executors",
        "2",
        "--cluster-tls",
        certs_arg,
    ];
    let (cluster_report, cluster_rows) = submit(&client_mode, "cluster.enc");
    // A task error that would quote a value (casting names to numbers) reaches the submitter
    // with the value withheld (docs/cluster.md §12), in local-tee mode as well: a TEE's
    // stderr goes to the host (docs/threat-model.md, attack 8).
    let cast = |mode: &[&str], out: &str| {
        with_key(&home)
            .args(["--tee", "sim", "--attestation-policy", &good])
            .arg("submit")
            .args(mode)
            .args([
                "query",
                "--sql",
                "SELECT CAST(name AS INT) AS n FROM people",
            ])
            .arg("--table")
            .arg(format!("people={}", enc.display()))
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let local_cast = cast(&["--mode", "local-tee"], "cast-local.enc");
    assert_eq!(local_cast.status.code(), Some(1), "{local_cast:?}");
    let message = String::from_utf8_lossy(&local_cast.stderr);
    assert!(message.contains("CastError (details withheld"), "{message}");
    assert!(!message.contains("Cannot cast string"), "{message}");
    let cluster_cast = cast(&client_mode, "cast-cluster.enc");
    assert_eq!(cluster_cast.status.code(), Some(1), "{cluster_cast:?}");
    let message = String::from_utf8_lossy(&cluster_cast.stderr);
    assert!(
        message.contains("Arrow CastError (details withheld"),
        "{message}"
    );
    assert!(!message.contains("Cannot cast string"), "{message}");
    assert!(!dir.path().join("cast-cluster.enc").exists());

    assert!(local_rows.len() > 100, "{} rows", local_rows.len());
    assert_eq!(
        local_rows, cluster_rows,
        "client mode differs from local-tee mode"
    );
    let count = |report: &str| {
        report
            .lines()
            .find(|l| l.starts_with("count(name): "))
            .map(str::to_string)
    };
    assert_eq!(count(&local_report), Some("count(name): 20000".into()));
    assert_eq!(count(&cluster_report), count(&local_report));

    // Every output carries a receipt that verifies up to the KMS's attestation key (asked of
    // the KMS); the client-mode one lists the executors that computed it, the local one none.
    let receipt_executors = |output: &Path| {
        let verified = run(with_key(&home)
            .args(["receipt", "verify", "--require-attested"])
            .arg(output));
        let text = stdout(&verified);
        assert!(text.contains("runtime:  sim attested"), "{text}");
        let shown = stdout(&run(ppml(&home)
            .args(["receipt", "show", "--json"])
            .arg(output)));
        let receipt: serde_json::Value = serde_json::from_str(&shown).unwrap();
        receipt["body"]["runtime"]["executors"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(receipt_executors(&dir.path().join("local.enc")), 0);
    let listed = receipt_executors(&dir.path().join("cluster.enc"));
    assert!((1..=4).contains(&listed), "{listed} executor tokens");

    // Cluster mode: the driver runs on an executor. The submitting process has no KMS
    // credentials at all (only the key ids, which are not secret) and sees no row.
    let keyless = |home: &Path| {
        let mut cmd = ppml(home);
        cmd.env("PPML_PRIMARY_KEY", &primary)
            .env_remove("PPML_APPID")
            .env_remove("PPML_APIKEY")
            .env_remove("PPML_KMS_URL");
        cmd
    };
    let submitter_home = dir.path().join("submitter-home");
    let cluster_args = ["--master", master.as_str(), "--cluster-tls", certs_arg];
    let output = dir.path().join("cluster-mode.enc");
    // The owner grants the job; the submitter gets only the grant file.
    let grant = dir.path().join("cluster-mode.grant");
    run(with_key(&home)
        .arg("grant")
        .arg("--out")
        .arg(&grant)
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&output));
    let submit_cluster_mode = || {
        keyless(&submitter_home)
            .arg("--grant")
            .arg(&grant)
            .args(["submit", "--mode", "cluster"])
            .args(cluster_args)
            .args(["simple-query", "--input"])
            .arg(&enc)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap()
    };
    let followed = submit_cluster_mode();
    assert!(followed.status.success(), "{followed:?}");
    let log = stdout(&followed);
    let job = log.lines().next().unwrap().trim().to_string();
    assert!(
        !job.is_empty() && job.chars().all(|c| c.is_ascii_alphanumeric()),
        "{log}"
    );
    assert!(log.contains("driver started: SimpleQuery"), "{log}");
    // Attack 3: the job log (the scheduler's) carries no row counts the grant did not allow.
    assert!(
        log.contains(&format!("wrote {}", output.display())),
        "{log}"
    );
    assert!(!log.contains(" rows"), "{log}");
    assert!(log.contains("driver finished"), "{log}");
    assert!(
        !log.contains("count(name)"),
        "a value reached the submitter: {log}"
    );
    let decrypted = run(with_key(&home)
        .args(["--tee", "sim", "--attestation-policy", &good])
        .args(["decrypt", "--out", "-", "--in"])
        .arg(&output));
    assert_eq!(
        sorted_lines(&stdout(&decrypted)),
        local_rows,
        "cluster mode differs from local-tee mode"
    );
    // Signed by the executor that ran the driver, listing the executors of the job.
    assert!(receipt_executors(&output) >= 1);
    // The same job again fails in the driver (the output exists): exit 1, the reason shown,
    // the first output untouched.
    let again = submit_cluster_mode();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(stdout(&again).contains("driver failed:"), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );

    // A join and aggregate, detached, followed with `status` and `logs`; same rows as in
    // local-tee mode.
    let sql = "SELECT a.job, count(*) AS n, max(b.age) AS oldest FROM people a \
               JOIN people b ON a.name = b.name GROUP BY a.job";
    let table = format!("people={}", enc.display());
    let query_out = dir.path().join("query-cluster.enc");
    // This one from a TOML job file (paths relative to the file).
    let job_file = dir.path().join("join.toml");
    std::fs::write(
        &job_file,
        format!(
            "mode = \"cluster\"\nmaster = \"{master}\"\ncluster_tls = \"cluster-tls\"\n\
             detach = true\nname = \"join-test\"\n\n[query]\nsql = \"{sql}\"\n\
             tables = {{ people = \"people.enc\" }}\noutput = \"query-cluster.enc\"\n"
        ),
    )
    .unwrap();
    let query_grant = dir.path().join("query.grant");
    run(with_key(&home)
        .arg("grant")
        .arg("--out")
        .arg(&query_grant)
        .args(["query", "--sql", sql, "--table", &table, "--output"])
        .arg(&query_out));
    let detached = keyless(&submitter_home)
        .env("PPML_GRANT", &query_grant)
        .args(["submit", "--job-file"])
        .arg(&job_file)
        .output()
        .unwrap();
    assert!(detached.status.success(), "{detached:?}");
    let job = stdout(&detached).trim().to_string();
    let status = |job: &str| {
        let out = keyless(&submitter_home)
            .args(["status", job])
            .args(cluster_args)
            .output()
            .unwrap();
        (out.status.code(), stdout(&out))
    };
    let (code, line) = status(&job);
    assert!(matches!(code, Some(0) | Some(5)), "{code:?} {line}");
    assert!(line.contains("join-test"), "{line}");
    let followed = keyless(&submitter_home)
        .args(["logs", "-f", &job])
        .args(cluster_args)
        .output()
        .unwrap();
    assert_eq!(followed.status.code(), Some(0), "{followed:?}");
    assert!(
        stdout(&followed).contains("driver finished"),
        "{followed:?}"
    );
    let (code, line) = status(&job);
    assert_eq!(code, Some(0), "{line}");
    assert!(line.contains("succeeded"), "{line}");
    assert_eq!(status("nosuchjob").0, Some(6));
    let local_query = dir.path().join("query-local.enc");
    run(with_key(&home)
        .args(["--tee", "sim", "--attestation-policy", &good])
        .args(["submit", "--mode", "local-tee"])
        .args(["query", "--sql", sql, "--table", &table, "--output"])
        .arg(&local_query));
    let rows = |dataset: &Path| {
        sorted_lines(&stdout(&run(with_key(&home)
            .args(["--tee", "sim", "--attestation-policy", &good])
            .args(["decrypt", "--out", "-", "--in"])
            .arg(dataset))))
    };
    let local_query_rows = rows(&local_query);
    assert!(local_query_rows.len() > 3, "{local_query_rows:?}");
    assert_eq!(rows(&query_out), local_query_rows);

    // No plaintext row on the executors' disks (shuffle files, and spills next to them).
    work_dirs.extend(
        work_dirs
            .clone()
            .iter()
            .map(|dir| dir.with_extension("spill"))
            .filter(|dir| dir.exists()),
    );
    let sample = local_rows
        .iter()
        .find(|l| !l.starts_with("name,"))
        .unwrap()
        .clone();
    let files = assert_no_plaintext(&work_dirs, &[sample.as_bytes(), b"Developer"]);
    assert!(files > 0, "the executors wrote no shuffle files");
    drop(executors);
}
