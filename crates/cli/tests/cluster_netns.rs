//! The cluster on a real network: the KMS server, the scheduler, two executors and the driver
//! each run in a network namespace of their own (`ip netns`), joined by veth pairs to a
//! bridge in a further namespace, so every byte between them crosses real interfaces with
//! real addresses (10.77.0.0/24), TLS included. Then:
//!
//! - a SimpleQuery job gives the rows of a local run;
//! - with `tc netem` delay, jitter and loss on every interface, it still does;
//! - with one executor killed mid-shuffle, the job completes on the other (Ballista reruns the
//!   lost tasks) with the same rows;
//! - with one executor cut off from the network mid-job (its interface down), the job
//!   completes on the other or fails with a clear error, in bounded time;
//! - with the scheduler killed mid-job, the driver fails with a clear error in bounded time;
//!   restarted, the scheduler runs the next job with the same rows once executors are back;
//! - no host's directory (KMS data, scheduler, executors' work dirs and temporary
//!   directories, the driver's) holds a row value.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for `ip netns`), which these machines and CI have.
//! Where namespaces cannot be created, the test prints why, loudly, and does nothing else.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Process, files_under, printed_value, stdout};

/// The namespaces of one test run, deleted (with their interfaces) when dropped.
struct Net {
    prefix: String,
    hosts: Vec<&'static str>,
}

const SWITCH: &str = "switch";

impl Net {
    /// A switch namespace with a bridge, and one namespace per host, each with `eth0` on the
    /// bridge at 10.77.0.(index+1). `None`, after saying why, where namespaces cannot be made.
    fn create(hosts: &[&'static str]) -> Option<Net> {
        let prefix = format!("ppml{}", std::process::id());
        let net = Net {
            prefix,
            hosts: hosts.to_vec(),
        };
        if let Err(why) = net.ip(&["netns", "add", &net.ns(SWITCH)]) {
            eprintln!(
                "\n\n*** SKIPPED cluster_netns: network namespaces cannot be created here \
                 ({why}); this test needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and \
                 iproute2 ***\n\n"
            );
            return None;
        }
        let sw = net.ns(SWITCH);
        net.ok(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        net.ok(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            let port = format!("p{i}");
            net.ok(&["netns", "add", &ns]);
            net.ok(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            net.ok(&["-n", &sw, "link", "set", &port, "master", "br0"]);
            net.ok(&["-n", &sw, "link", "set", &port, "up"]);
            net.ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(host)),
                "dev",
                "eth0",
            ]);
            net.ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            net.ok(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(net)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn addr(&self, host: &str) -> String {
        let index = self.hosts.iter().position(|h| *h == host).unwrap();
        format!("10.77.0.{}", index + 1)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn ok(&self, args: &[&str]) {
        if let Err(why) = self.ip(args) {
            panic!("ip {}: {why}", args.join(" "));
        }
    }

    /// `ppml ARGS` on `host` (through `ip netns exec`, which execs ppml itself).
    fn ppml(&self, host: &str, home: &Path) -> Command {
        let inner = common::ppml(home);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(inner.get_program())
            .args(inner.get_args());
        for (name, value) in inner.get_envs() {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
        cmd
    }

    /// Runs `program args` inside `host`'s namespace; the error output if it fails.
    fn exec_in(&self, host: &str, program: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), program])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Impairs every host's link: with `tc netem`, 20 ms ± 5 ms of delay and 1% loss. Kernels
    /// built without netem (these machines') get what they have instead: a 20 Mbit/s token
    /// bucket (`tc tbf`, whose queue delays bursts) and 2% of incoming packets dropped at
    /// random by nftables. Returns what was applied.
    fn impair(&self) -> String {
        let netem = [
            "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "20ms", "5ms", "loss",
            "1%",
        ];
        if self.exec_in(self.hosts[0], "tc", &netem).is_ok() {
            for host in &self.hosts[1..] {
                self.exec_in(host, "tc", &netem).unwrap();
            }
            return "tc netem: delay 20ms ± 5ms, loss 1%".into();
        }
        for host in &self.hosts {
            self.exec_in(
                host,
                "tc",
                &[
                    "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "20mbit", "burst",
                    "32kbit", "latency", "100ms",
                ],
            )
            .unwrap_or_else(|e| panic!("tc tbf on {host}: {e}"));
            for rule in [
                &["add", "table", "inet", "ppml_loss"][..],
                &[
                    "add",
                    "chain",
                    "inet",
                    "ppml_loss",
                    "input",
                    "{ type filter hook input priority 0; }",
                ][..],
                &[
                    "add",
                    "rule",
                    "inet",
                    "ppml_loss",
                    "input",
                    "iifname",
                    "eth0",
                    "numgen",
                    "random",
                    "mod",
                    "100",
                    "<",
                    "2",
                    "drop",
                ][..],
            ] {
                self.exec_in(host, "nft", rule).unwrap_or_else(|e| {
                    panic!(
                        "nft on {host}: {e} (no netem in this kernel, so loss needs nftables: \
                         scripts/test-deps installs it)"
                    )
                });
            }
        }
        "no netem in this kernel: tc tbf 20 Mbit/s (queueing delay) and 2% random loss (nftables)"
            .into()
    }

    fn clear_impairment(&self) {
        for host in &self.hosts {
            let _ = self.exec_in(host, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
            let _ = self.exec_in(host, "nft", &["delete", "table", "inet", "ppml_loss"]);
        }
    }

    fn link(&self, host: &str, state: &str) {
        self.ok(&["-n", &self.ns(host), "link", "set", "eth0", state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in self.hosts.iter().copied().chain([SWITCH]) {
            let _ = self.ip(&["netns", "del", &self.ns(host)]);
        }
    }
}

/// A host's directory, with its own temporary directory for the processes it runs.
fn host_dir(root: &Path, host: &str) -> PathBuf {
    let dir = root.join(host);
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    dir
}

fn checked(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The sorted data rows of a dataset, decrypted by the owner (on the driver's host).
fn rows(net: &Net, client: &Client, dataset: &Path) -> Vec<String> {
    let out = checked(
        client
            .on(net, "driver")
            .args(["decrypt", "--out", "-", "--in"])
            .arg(dataset),
    );
    let mut rows: Vec<String> = stdout(&out).lines().skip(1).map(str::to_string).collect();
    rows.sort_unstable();
    rows
}

/// The KMS connection and app credentials every client uses.
struct Client {
    home: PathBuf,
    url: String,
    fingerprint: String,
    appid: String,
    apikey: String,
    /// The primary key: of the input, and (so that the owner reads them) of the outputs.
    key: String,
}

impl Client {
    fn on(&self, net: &Net, host: &str) -> Command {
        let mut cmd = net.ppml(host, &self.home);
        cmd.env("PPML_KMS_URL", &self.url)
            .env("PPML_KMS_FINGERPRINT", &self.fingerprint)
            .env("PPML_APPID", &self.appid)
            .env("PPML_APIKEY", &self.apikey);
        if !self.key.is_empty() {
            cmd.env("PPML_PRIMARY_KEY", &self.key);
        }
        cmd
    }
}

/// Starts `cmd` and waits for a line of its stdout (or stderr) starting with `prefix`;
/// returns the process and that line's rest. The streams are drained in the background.
fn start(mut cmd: Command, prefix: &str) -> (Process, String) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child: Child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        let prefix = prefix.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(&prefix) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
    }
    let rest = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no line starting with {prefix:?} from {cmd:?}"));
    (Process(child), rest)
}

struct Cluster<'a> {
    net: &'a Net,
    client: &'a Client,
    root: PathBuf,
    tls: PathBuf,
    master: String,
    scheduler: Option<Process>,
    executors: Vec<Option<Process>>,
}

const EXECUTORS: [&str; 2] = ["exec0", "exec1"];

impl Cluster<'_> {
    fn start_scheduler(&mut self) {
        let dir = host_dir(&self.root, "scheduler");
        let mut cmd = self.net.ppml("scheduler", &dir.join("home"));
        cmd.env("TMPDIR", dir.join("tmp"))
            .args([
                "scheduler",
                "--bind",
                &self.master,
                "--executor-timeout",
                "3",
            ])
            .arg("--cluster-tls")
            .arg(&self.tls);
        let (process, _) = start(cmd, "ppml scheduler listening on ");
        self.scheduler = Some(process);
    }

    fn start_executor(&mut self, index: usize) {
        let host = EXECUTORS[index];
        let dir = host_dir(&self.root, host);
        let addr = self.net.addr(host);
        let mut cmd = self.client.on(self.net, host);
        cmd.env("PPML_HOME", dir.join("home"))
            .env("TMPDIR", dir.join("tmp"))
            .args(["executor", "--master", &self.master, "--cores", "1"])
            .args(["--bind-host", &addr, "--external-host", &addr])
            .args(["--flight-port", "50051", "--work-dir"])
            .arg(dir.join("work"))
            .arg("--cluster-tls")
            .arg(&self.tls)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.executors[index] = Some(Process(cmd.spawn().unwrap()));
    }

    /// `ppml submit --mode client simple-query` from the driver's host.
    fn submit(&self, output: &Path) -> Child {
        let dir = host_dir(&self.root, "driver");
        self.client
            .on(self.net, "driver")
            .env("TMPDIR", dir.join("tmp"))
            .args(["submit", "--mode", "client", "--master", &self.master])
            .arg("--cluster-tls")
            .arg(&self.tls)
            .args(["--num-executors", "2", "--executor-cores", "1"])
            .args(["simple-query", "--no-preview", "--input"])
            .arg(self.root.join("people.enc"))
            .arg("--output")
            .arg(output)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The shuffle files on the executors' disks.
    fn shuffle_files(&self) -> std::collections::BTreeSet<PathBuf> {
        EXECUTORS
            .iter()
            .flat_map(|host| files_under(&self.root.join(host).join("work")))
            .filter(|f| f.to_string_lossy().ends_with(".arrow"))
            .collect()
    }

    /// Waits until some executor wrote a shuffle file of the running job (one not among
    /// `before`: a killed executor leaves its files behind).
    fn wait_for_shuffle(&self, job: &mut Child, before: &std::collections::BTreeSet<PathBuf>) {
        let started = Instant::now();
        while self.shuffle_files().is_subset(before) {
            assert!(
                job.try_wait().unwrap().is_none(),
                "the job ended before its shuffle was seen: nothing was tested"
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no shuffle file"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for `job` at most `limit`; returns its exit status and stderr.
fn finish(mut job: Child, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            let out = job.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = job.kill();
            panic!("the job did not end within {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A job that ends either with the expected rows or with a clear error (a `ppml: error:`
/// line, non-zero exit) and no output; returns whether it succeeded.
fn completes_or_fails_clearly(
    cluster: &Cluster,
    job: Child,
    output: &Path,
    expected: &[String],
    what: &str,
) -> bool {
    let (success, stderr) = finish(job, Duration::from_secs(240));
    if success {
        assert_eq!(
            rows(cluster.net, cluster.client, output),
            expected,
            "{what}: other rows"
        );
    } else {
        assert!(
            stderr.contains("error"),
            "{what}: failed without a clear error: {stderr}"
        );
        assert!(!output.exists(), "{what}: a failed job left its output");
    }
    eprintln!(
        "{what}: {}",
        if success {
            "completed with the expected rows".to_string()
        } else {
            format!("failed clearly: {}", stderr.lines().last().unwrap_or(""))
        }
    );
    success
}

#[test]
fn a_cluster_across_network_namespaces_survives_delay_loss_kills_and_cuts() {
    let Some(net) = Net::create(&["kms", "scheduler", "exec0", "exec1", "driver"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();

    // The KMS, on its own host, over TLS pinned by fingerprint.
    let kms_dir = host_dir(&root, "kms");
    let mut kms = net.ppml("kms", &kms_dir.join("home"));
    kms.env("TMPDIR", kms_dir.join("tmp"))
        .args(["kms", "serve", "--listen", "10.77.0.1:9000"])
        .args(["--tls-san", "10.77.0.1", "--data-dir"])
        .arg(kms_dir.join("data"));
    let (_kms, fingerprint) = start(kms, "certificate fingerprint: ");
    let owner = host_dir(&root, "owner");
    let enrolled = checked(
        net.ppml("driver", &owner.join("home"))
            .args(["kms", "enroll", "--kms-url", "https://10.77.0.1:9000"])
            .args(["--kms-fingerprint", &fingerprint]),
    );
    let mut client = Client {
        home: owner.join("home"),
        url: "https://10.77.0.1:9000".into(),
        fingerprint,
        appid: printed_value(&stdout(&enrolled), "appid"),
        apikey: printed_value(&stdout(&enrolled), "apikey"),
        key: String::new(),
    };
    client.key = stdout(&checked(
        client.on(&net, "driver").args(["kms", "create-key"]),
    ))
    .trim()
    .to_string();

    // Data (the plaintext stays outside every host's directory).
    let plain = root.join("people.csv");
    checked(
        common::ppml(&owner.join("home"))
            .args([
                "generate", "people", "--rows", "2000000", "--seed", "11", "--out",
            ])
            .arg(&plain),
    );
    checked(
        client
            .on(&net, "driver")
            .args(["encrypt", "--partitions", "8", "--in"])
            .arg(&plain)
            .arg("--out")
            .arg(root.join("people.enc")),
    );
    let names: Vec<Vec<u8>> = std::fs::read_to_string(&plain)
        .unwrap()
        .lines()
        .skip(1)
        .step_by(10_000)
        .map(|l| l.split(',').next().unwrap().as_bytes().to_vec())
        // Shorter names turn up in ciphertext by chance.
        .filter(|n| n.len() >= 7)
        .collect();
    assert!(names.len() >= 20, "{}", names.len());
    let local = root.join("local.enc");
    checked(
        client
            .on(&net, "driver")
            .args(["submit", "--mode", "local", "simple-query", "--no-preview"])
            .arg("--input")
            .arg(root.join("people.enc"))
            .arg("--output")
            .arg(&local),
    );
    let expected = rows(&net, &client, &local);
    assert!(expected.len() > 100_000);

    let tls = root.join("tls");
    checked(
        common::ppml(&owner.join("home"))
            .args(["cluster", "certs", "--out"])
            .arg(&tls),
    );
    let mut cluster = Cluster {
        net: &net,
        client: &client,
        root: root.clone(),
        tls,
        master: "10.77.0.2:50050".into(),
        scheduler: None,
        executors: vec![None, None],
    };
    cluster.start_scheduler();
    cluster.start_executor(0);
    cluster.start_executor(1);
    let out_dir = root.join("outputs");
    std::fs::create_dir_all(&out_dir).unwrap();

    // 1. Across the network as it is.
    let output = out_dir.join("plain.enc");
    let job = cluster.submit(&output);
    assert!(
        completes_or_fails_clearly(&cluster, job, &output, &expected, "baseline"),
        "the baseline job must succeed"
    );

    // 2. Delay and loss on every interface.
    let impairment = net.impair();
    let output = out_dir.join("impaired.enc");
    let job = cluster.submit(&output);
    assert!(
        completes_or_fails_clearly(&cluster, job, &output, &expected, &impairment),
        "TCP carries the job through delay and loss ({impairment})"
    );
    net.clear_impairment();

    // 3. An executor killed mid-shuffle.
    let output = out_dir.join("killed.enc");
    let before = cluster.shuffle_files();
    let mut job = cluster.submit(&output);
    cluster.wait_for_shuffle(&mut job, &before);
    cluster.executors[1] = None; // SIGKILL
    completes_or_fails_clearly(&cluster, job, &output, &expected, "executor killed");
    cluster.start_executor(1);
    std::thread::sleep(Duration::from_secs(2));

    // 4. An executor cut off mid-job: its interface goes down.
    let output = out_dir.join("cut.enc");
    let before = cluster.shuffle_files();
    let mut job = cluster.submit(&output);
    cluster.wait_for_shuffle(&mut job, &before);
    net.link("exec1", "down");
    completes_or_fails_clearly(&cluster, job, &output, &expected, "executor cut off");
    net.link("exec1", "up");
    cluster.executors[1] = None;
    cluster.start_executor(1);

    // 5. The scheduler killed mid-job, then restarted.
    let output = out_dir.join("scheduler.enc");
    let before = cluster.shuffle_files();
    let mut job = cluster.submit(&output);
    cluster.wait_for_shuffle(&mut job, &before);
    cluster.scheduler = None; // SIGKILL
    let (success, stderr) = finish(job, Duration::from_secs(120));
    assert!(
        !success && stderr.contains("error"),
        "with its scheduler gone the job must fail clearly: {stderr}"
    );
    assert!(!output.exists());
    eprintln!(
        "scheduler killed: the job failed clearly: {}",
        stderr.lines().last().unwrap_or("")
    );
    cluster.start_scheduler();
    // Executors find the new scheduler (restarted here too, as a supervisor would, in case
    // they do not reconnect by themselves).
    let output = out_dir.join("after-restart.enc");
    let started = Instant::now();
    let mut succeeded = false;
    while started.elapsed() < Duration::from_secs(60) {
        let job = cluster.submit(&output);
        let (success, _) = finish(job, Duration::from_secs(120));
        if success {
            succeeded = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if !succeeded {
        for index in 0..2 {
            cluster.executors[index] = None;
            cluster.start_executor(index);
        }
        std::thread::sleep(Duration::from_secs(2));
        let job = cluster.submit(&output);
        assert!(
            completes_or_fails_clearly(&cluster, job, &output, &expected, "after restart"),
            "a restarted scheduler with restarted executors runs the next job"
        );
        eprintln!("after the scheduler's restart, executors had to be restarted too");
    } else {
        assert_eq!(rows(&net, &client, &output), expected);
        eprintln!("after the scheduler's restart, the executors reconnected by themselves");
    }

    // No host holds a row value: the KMS, the scheduler, the executors, the driver.
    drop(cluster);
    let needles: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    let hosts: Vec<PathBuf> = ["kms", "scheduler", "exec0", "exec1", "driver"]
        .iter()
        .map(|h| root.join(h))
        .collect();
    let checked_files = common::assert_no_plaintext(&hosts, &needles);
    assert!(checked_files > 0);
}
