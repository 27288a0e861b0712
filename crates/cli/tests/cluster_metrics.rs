//! Monitoring (docs/cluster.md §10): the scheduler and executors of `ppml cluster up` serve
//! Prometheus metrics, a real Prometheus scrapes them and answers queries on them, and the
//! Grafana dashboard in deploy/grafana uses only metrics they expose.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Process, encrypted_people, free_port, http_get, ppml, run};
use ppml_cluster::metrics::{EXECUTOR_METRICS, HISTOGRAMS, SCHEDULER_METRICS};

/// Where Debian's package installs Prometheus (2.42 in bookworm).
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// The Prometheus binary; fails (never skips) when it is missing.
fn prometheus_binary() -> PathBuf {
    if Path::new(PROMETHEUS).is_file() {
        return PROMETHEUS.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "Prometheus is not installed ({PROMETHEUS} is missing and there is no \
                 `prometheus` on PATH): `.ci/run` installs it (Debian package `prometheus`, \
                 `apt-get install prometheus`); this test needs a real Prometheus"
            )
        })
}

/// Percent-encodes a query parameter value.
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks Prometheus at `addr` for the instant value of `query`: the parsed JSON answer.
fn prometheus_query(addr: &str, query: &str) -> serde_json::Value {
    let (status, body) = http_get(
        addr,
        &format!("/api/v1/query?query={}", encode_query(query)),
    )
    .unwrap_or_else(|e| panic!("querying Prometheus at {addr}: {e}"));
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("Prometheus answered {status} with no JSON ({e}): {body}"))
}

/// The single value of a vector `query` (e.g. a `sum(...)`), if Prometheus has one yet.
fn query_value(addr: &str, query: &str) -> Option<f64> {
    let answer = prometheus_query(addr, query);
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"]
        .as_array()?
        .first()?
        .get("value")?
        .get(1)?
        .as_str()?
        .parse()
        .ok()
}

/// Polls `query` until `accept` holds for its value (or fails after `timeout`).
fn wait_for_value(
    addr: &str,
    query: &str,
    accept: impl Fn(f64) -> bool,
    timeout: Duration,
    context: &dyn Fn() -> String,
) -> f64 {
    let started = Instant::now();
    let mut last = None;
    loop {
        last = query_value(addr, query).or(last);
        if let Some(value) = last
            && accept(value)
        {
            return value;
        }
        if started.elapsed() > timeout {
            panic!(
                "{query} through Prometheus: last value {last:?} after {timeout:?}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `ppml cluster down` when dropped, so a failing test leaves no cluster behind.
struct ClusterGuard {
    home: PathBuf,
    dir: PathBuf,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let _ = ppml(&self.home)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Metric families (`# TYPE` lines) of a `/metrics` page.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The sum of every series of `family` on a `/metrics` page.
fn sum_of(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn dashboard_path() -> PathBuf {
    // Read at run time: CI builds in another checkout that shares the target directory.
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../deploy/grafana/ppml-cluster.json")
}

/// Every query expression of the dashboard's panels (rows' nested panels included).
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `ppml_*` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("ppml_") {
        let start = i + found;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Whether `name` is a series of an exposed family (histograms have `_bucket`, `_sum` and
/// `_count` series).
fn is_exposed(name: &str) -> bool {
    EXECUTOR_METRICS.contains(&name)
        || SCHEDULER_METRICS.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            name.strip_prefix(h)
                .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
        })
}

/// The family a dashboard series belongs to.
fn family_of(name: &str) -> &str {
    HISTOGRAMS
        .iter()
        .find(|h| name.starts_with(**h))
        .copied()
        .unwrap_or(name)
}

#[test]
fn the_grafana_dashboard_uses_only_exposed_metrics_and_charts_them_all() {
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS datasource variable"
    );
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 10, "{expressions:?}");
    let mut used = BTreeSet::new();
    for expr in &expressions {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr:?} uses no ppml metric");
        for name in names {
            assert!(
                is_exposed(&name),
                "the dashboard queries {name} ({expr:?}), which neither the scheduler nor the \
                 executors expose (ppml_cluster::metrics)"
            );
            used.insert(family_of(&name).to_string());
        }
    }
    for family in EXECUTOR_METRICS.iter().chain(SCHEDULER_METRICS) {
        assert!(used.contains(*family), "no panel shows {family}");
    }
    // Every panel and query reads the data source of the import.
    fn check_datasources(panels: &serde_json::Value) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] != "row" {
                assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{target}");
            }
            check_datasources(&panel["panels"]);
        }
    }
    check_datasources(&dashboard["panels"]);
}

#[test]
fn prometheus_scrapes_the_metrics_of_a_local_cluster() {
    let prometheus = prometheus_binary();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cluster = dir.path().join("cluster");
    let enc = encrypted_people(&home, dir.path(), 20000, 7, 2, ppml(&home));

    let port = common::free_cluster_ports(2);
    run(ppml(&home)
        .args([
            "cluster",
            "up",
            "--executors",
            "2",
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(&cluster));
    let _cluster = ClusterGuard {
        home: home.clone(),
        dir: cluster.clone(),
    };
    let scheduler_metrics = format!("127.0.0.1:{}", port + 100);
    let executor_metrics: Vec<String> = (0..2)
        .map(|i| format!("127.0.0.1:{}", port + 101 + i))
        .collect();

    // cluster.json and `cluster status` name the metrics URLs.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cluster.join("cluster.json")).unwrap())
            .unwrap();
    let recorded: Vec<&str> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metrics"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = std::iter::once(&scheduler_metrics)
        .chain(&executor_metrics)
        .map(|addr| format!("http://{addr}/metrics"))
        .collect();
    assert_eq!(recorded, expected);
    let status = run(ppml(&home)
        .args(["cluster", "status", "--dir"])
        .arg(&cluster));
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    for url in &expected {
        assert!(status.contains(&format!(" metrics {url}")), "{status}");
    }
    for addr in std::iter::once(&scheduler_metrics).chain(&executor_metrics) {
        let (code, body) = http_get(addr, "/healthz").unwrap();
        assert_eq!((code, body.trim()), (200, "ok"), "{addr}/healthz");
    }

    let output = dir.path().join("result.enc");
    let submitted = run(ppml(&home)
        .args([
            "submit",
            "--mode",
            "client",
            "--master",
            &format!("127.0.0.1:{port}"),
            "--cluster-tls",
        ])
        .arg(cluster.join("tls"))
        .args(["simple-query", "--input"])
        .arg(&enc)
        .arg("--output")
        .arg(&output));
    assert!(
        String::from_utf8_lossy(&submitted.stdout).contains("count(name): 20000"),
        "{}",
        String::from_utf8_lossy(&submitted.stdout)
    );

    // Straight from the processes: every documented family is there, the job was counted,
    // and no value of the data shows.
    let csv_text = std::fs::read_to_string(dir.path().join("people.csv")).unwrap();
    let a_name = csv_text
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').next())
        .unwrap()
        .to_string();
    let (code, page) = http_get(&scheduler_metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let exposed = families(&page);
    for family in SCHEDULER_METRICS {
        assert!(
            exposed.contains(*family),
            "scheduler lacks {family}:\n{page}"
        );
    }
    assert!(!page.contains(&a_name));
    let mut rows_written = 0.0;
    for addr in &executor_metrics {
        let (code, page) = http_get(addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        let exposed = families(&page);
        for family in EXECUTOR_METRICS {
            assert!(
                exposed.contains(*family),
                "executor {addr} lacks {family}:\n{page}"
            );
        }
        assert!(!page.contains(&a_name));
        rows_written += sum_of(&page, "ppml_executor_shuffle_rows_written_total");
    }
    assert!(
        rows_written > 0.0,
        "no shuffle rows counted by the executors"
    );

    // A real Prometheus scraping the scheduler and both executors every second.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: ppml-scheduler\n    static_configs:\n      - targets: ['{scheduler_metrics}']\n\
             \x20 - job_name: ppml-executor\n    static_configs:\n      - targets: ['{}', '{}']\n",
            executor_metrics[0], executor_metrics[1]
        ),
    )
    .unwrap();
    let prometheus_addr = format!("127.0.0.1:{}", free_port());
    let prometheus_log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&prometheus_log).unwrap();
    let _prometheus = Process(
        Command::new(&prometheus)
            .arg("--config.file")
            .arg(&config)
            .arg("--storage.tsdb.path")
            .arg(dir.path().join("tsdb"))
            .arg("--web.listen-address")
            .arg(&prometheus_addr)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", prometheus.display())),
    );
    let context = || {
        let log = std::fs::read_to_string(&prometheus_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let targets = http_get(&prometheus_addr, "/api/v1/targets")
            .map(|(_, body)| body)
            .unwrap_or_else(|e| e.to_string());
        format!(
            "Prometheus log (last lines, newest first):\n{}\ntargets: {targets}",
            tail.join("\n")
        )
    };
    // Prometheus answers once its web server is up.
    let started = Instant::now();
    while http_get(&prometheus_addr, "/-/ready")
        .map(|(code, _)| code)
        .ok()
        != Some(200)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Prometheus did not become ready\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let timeout = Duration::from_secs(60);
    let rows = wait_for_value(
        &prometheus_addr,
        "sum(ppml_executor_shuffle_rows_written_total)",
        |v| v > 0.0,
        timeout,
        &context,
    );
    assert!(rows > 0.0);
    // Once both executors are scraped, the same count as read from them directly.
    wait_for_value(
        &prometheus_addr,
        "sum(ppml_executor_shuffle_rows_written_total)",
        |v| v == rows_written,
        timeout,
        &context,
    );
    for (query, accept) in [
        (
            r#"sum(ppml_scheduler_jobs_total{state="completed"})"#,
            (|v: f64| v >= 1.0) as fn(f64) -> bool,
        ),
        (r#"sum(ppml_scheduler_jobs_total{state="failed"})"#, |v| {
            v == 0.0
        }),
        ("sum(ppml_scheduler_executors)", |v| v == 2.0),
        (
            r#"sum(ppml_executor_tasks_total{outcome="succeeded"})"#,
            |v| v > 0.0,
        ),
        ("sum(ppml_executor_input_bytes_decrypted_total)", |v| {
            v > 0.0
        }),
        (
            r#"sum(ppml_executor_key_releases_total{kind="shuffle",outcome="ok"})"#,
            |v| v >= 1.0,
        ),
        (
            r#"sum(ppml_executor_key_releases_total{outcome="refused"})"#,
            |v| v == 0.0,
        ),
        ("count(up{job=~\"ppml-.*\"} == 1)", |v| v == 3.0),
    ] {
        wait_for_value(&prometheus_addr, query, accept, timeout, &context);
    }

    // Every dashboard query is valid PromQL for this Prometheus (Grafana's interval
    // variables replaced by what Grafana would send).
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_path()).unwrap()).unwrap();
    for expr in dashboard_expressions(&dashboard) {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$__interval", "15s");
        let answer = prometheus_query(&prometheus_addr, &query);
        assert_eq!(answer["status"], "success", "{query}: {answer}");
    }

    run(ppml(&home).args(["cluster", "down", "--dir"]).arg(&cluster));
}
