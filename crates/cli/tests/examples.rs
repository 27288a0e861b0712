//! The library's examples (`crates/ppml/examples`) run as programs of their own against real
//! encrypted datasets, and their encrypted results are checked, after decryption by the
//! owner, against the same computation done on the plaintext.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{encrypted_people, free_cluster_ports, ppml, run, stdout};

/// The built example `name` (`scripts/test` builds the examples, next to the `ppml` binary,
/// before it runs the tests).
fn example(home: &Path, name: &str) -> Command {
    let path = Path::new(env!("CARGO_BIN_EXE_ppml"))
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with ./scripts/test, or build the examples first \
         (cargo build --release --workspace --examples)",
        path.display()
    );
    // The settings of `ppml(home)`, without the binary.
    let template = ppml(home);
    let mut cmd = Command::new(path);
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd
}

/// The rows of a CSV file (after its header), as a sorted list of lines.
fn rows(csv: &str) -> Vec<String> {
    let mut rows: Vec<String> = csv.lines().skip(1).map(str::to_string).collect();
    rows.sort();
    rows
}

/// `ppml decrypt` of `dataset`, as text.
fn decrypt(home: &Path, dataset: &Path) -> String {
    stdout(&run(ppml(home)
        .args(["decrypt", "--out", "-", "--in"])
        .arg(dataset)))
}

/// The people rows (name, age, job) of `people.csv` that `keep` selects.
fn people_where(csv: &Path, keep: impl Fn(u32, &str) -> bool) -> Vec<String> {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut kept: Vec<String> = text
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            keep(fields[1].parse().unwrap(), fields[2])
        })
        .map(str::to_string)
        .collect();
    kept.sort();
    kept
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
    people_csv: PathBuf,
    people: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let home = root.join("home");
    let people = encrypted_people(&home, &root, 20_000, 11, 2, ppml(&home));
    Fixture {
        people_csv: root.join("people.csv"),
        _dir: dir,
        root,
        home,
        people,
    }
}

fn developers_20_to_40(f: &Fixture) -> Vec<String> {
    people_where(&f.people_csv, |age, job| {
        job == "Developer" && (20..=40).contains(&age)
    })
}

#[test]
fn simple_query_example_writes_exactly_the_developers() {
    let f = fixture();
    let output = f.root.join("developers.enc");
    let out = run(example(&f.home, "simple_query").arg(&f.people).arg(&output));
    assert!(stdout(&out).contains("20000"), "{}", stdout(&out));
    assert_eq!(rows(&decrypt(&f.home, &output)), developers_20_to_40(&f));
}

#[test]
fn join_example_aggregates_two_datasets_under_the_owners_key() {
    let f = fixture();
    let jobs_csv = f.root.join("jobs.csv");
    std::fs::write(
        &jobs_csv,
        "job,department\nDeveloper,Engineering\nEngineer,Engineering\nResearcher,Research\n",
    )
    .unwrap();
    let jobs = f.root.join("jobs.enc");
    run(ppml(&f.home)
        .args(["encrypt", "--in"])
        .arg(&jobs_csv)
        .arg("--out")
        .arg(&jobs));
    let owner = stdout(&run(ppml(&f.home).args(["kms", "create-key"])))
        .trim()
        .to_string();
    let output = f.root.join("by_department.enc");
    run(example(&f.home, "join")
        .env("PPML_OUTPUT_KEY", &owner)
        .arg(&f.people)
        .arg(&jobs)
        .arg(&output));
    let manifest = std::fs::read_to_string(output.join("_manifest.ppml.json")).unwrap();
    assert!(
        manifest.contains(&owner),
        "not under the owner's key: {manifest}"
    );

    // The same aggregate over the plaintext.
    let mut expected: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for line in std::fs::read_to_string(&f.people_csv)
        .unwrap()
        .lines()
        .skip(1)
    {
        let fields: Vec<&str> = line.split(',').collect();
        let department = if fields[2] == "Researcher" {
            "Research"
        } else {
            "Engineering"
        };
        let entry = expected.entry(department).or_default();
        entry.0 += 1;
        entry.1 += fields[1].parse::<u64>().unwrap();
    }
    let text = decrypt(&f.home, &output);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("department,people,average_age"));
    let got: Vec<(String, u64, f64)> = lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (
                fields[0].to_string(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), expected.len(), "{text}");
    for ((department, people, average), (want_department, (count, ages))) in
        got.iter().zip(&expected)
    {
        assert_eq!(department, want_department);
        assert_eq!(people, count);
        assert!(
            (average - *ages as f64 / *count as f64).abs() < 1e-9,
            "{text}"
        );
    }
}

#[test]
fn plaintext_in_example_encrypts_the_selected_rows() {
    let f = fixture();
    let output = f.root.join("seniors.enc");
    run(example(&f.home, "plaintext_in")
        .arg(&f.people_csv)
        .arg(&output));
    let seniors = people_where(&f.people_csv, |age, _| age >= 55);
    assert!(!seniors.is_empty());
    assert_eq!(rows(&decrypt(&f.home, &output)), seniors);
    // The output is a ppml dataset: no row is in it in plaintext.
    let files = common::assert_no_plaintext(&[output], &[seniors[0].as_bytes()]);
    assert!(files >= 2);
}

#[test]
fn client_mode_example_runs_on_a_local_cluster() {
    let f = fixture();
    let cluster = f.root.join("cluster");
    let port = free_cluster_ports(2);
    run(ppml(&f.home)
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
    let output = f.root.join("developers.enc");
    let result = example(&f.home, "client_mode")
        .arg(format!("127.0.0.1:{port}"))
        .arg(cluster.join("tls"))
        .arg(&f.people)
        .arg(&output)
        .output()
        .unwrap();
    // The executors decrypted the input themselves (their metrics count the plaintext bytes
    // their decrypting stores returned), not this process.
    let decrypted_by_executors = common::executors_decrypted_bytes(&cluster);
    run(ppml(&f.home)
        .args(["cluster", "down", "--dir"])
        .arg(&cluster));
    assert!(
        result.status.success(),
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(rows(&decrypt(&f.home, &output)), developers_20_to_40(&f));
    let input_bytes = std::fs::metadata(&f.people_csv).unwrap().len() as f64;
    assert!(
        decrypted_by_executors >= input_bytes,
        "executors decrypted {decrypted_by_executors} of {input_bytes} bytes"
    );
}
