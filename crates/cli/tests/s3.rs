//! `s3://` datasets end to end, against a real S3-protocol server: moto's server mode
//! (`moto_server`, from `python3 -m pip install 'moto[server]'`, which `.ci/run` installs).
//! Without it these tests fail with that instruction; they never skip.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_cluster_ports, ppml, run, stdout};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// A `moto_server` on a free loopback port, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = common::free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}): the s3:// tests need a real S3-protocol \
                     server; install it with `python3 -m pip install 'moto[server]'` (.ci/run \
                     does)"
                )
            });
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.request("GET", "/moto-api/").is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited at start-up ({status})");
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))
    }

    /// Creates `bucket` and returns a client of it.
    fn bucket(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        assert_eq!(self.request("PUT", &format!("/{bucket}")).unwrap(), 200);
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_access_key_id("testing")
                .with_secret_access_key("testing")
                .with_region("us-east-1")
                .build()
                .unwrap(),
        )
    }

    /// `ppml` configured for this server by the standard AWS variables.
    fn ppml(&self, home: &Path) -> Command {
        let mut cmd = ppml(home);
        cmd.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1");
        cmd
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The objects under `prefix/`, sorted.
fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    block_on(async {
        let mut names: Vec<String> = store
            .list(Some(&StorePath::from(prefix)))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        names
    })
}

fn get(store: &Arc<dyn ObjectStore>, key: &str) -> Vec<u8> {
    block_on(async {
        store
            .get(&StorePath::from(key))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    })
}

fn put(store: &Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
    block_on(async {
        store
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .unwrap();
    });
}

/// `GET http://host:port/path` (given as `host:port/path`); the body, if the request worked.
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd`, which must fail with exit code `code`; returns its stderr.
fn fails(cmd: &mut Command, code: i32) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(code), "{cmd:?}: {out:?}");
    stderr(&out)
}

/// Lines of a CSV text, sorted (the order of rows across output parts is not fixed).
fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn generate(home: &Path, csv: &Path, rows: u64) {
    run(ppml(home)
        .args(["generate", "people", "--rows", &rows.to_string()])
        .args(["--seed", "7", "--out"])
        .arg(csv));
}

#[test]
fn encrypt_query_and_decrypt_through_s3_match_local_mode() {
    let moto = Moto::start();
    let store = moto.bucket("ppml-cli");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let csv = dir.path().join("people.csv");
    generate(&home, &csv, 30000);

    // The owner uploads the encrypted dataset (workflow step 1).
    for out in [
        "s3://ppml-cli/datasets/people.enc".to_string(),
        dir.path().join("people.enc").display().to_string(),
    ] {
        run(moto
            .ppml(&home)
            .args(["encrypt", "--partitions", "3", "--in"])
            .arg(&csv)
            .args(["--out", &out]));
    }
    assert_eq!(
        objects(&store, "datasets/people.enc"),
        [
            "datasets/people.enc/_manifest.ppml.json",
            "datasets/people.enc/part-00000.csv.ppml",
            "datasets/people.enc/part-00001.csv.ppml",
            "datasets/people.enc/part-00002.csv.ppml",
        ]
    );
    // No plaintext in the bucket.
    let part = get(&store, "datasets/people.enc/part-00000.csv.ppml");
    assert!(!part.windows(9).any(|w| w == b"Developer"));

    // Decrypting from S3 gives back the input.
    let from_s3 = run(moto.ppml(&home).args([
        "decrypt",
        "--out",
        "-",
        "--in",
        "s3://ppml-cli/datasets/people.enc",
    ]));
    assert_eq!(stdout(&from_s3), std::fs::read_to_string(&csv).unwrap());
    let parts_dir = dir.path().join("parts");
    run(moto
        .ppml(&home)
        .args([
            "decrypt",
            "--in",
            "s3://ppml-cli/datasets/people.enc",
            "--out-dir",
        ])
        .arg(&parts_dir));
    assert!(parts_dir.join("part-00002.csv").exists());

    // SimpleQuery from S3 to S3 equals SimpleQuery on local directories.
    let local_out = dir.path().join("developers.enc");
    let local = run(moto
        .ppml(&home)
        .args(["simple-query", "--no-preview", "--input"])
        .arg(dir.path().join("people.enc"))
        .arg("--output")
        .arg(&local_out));
    let remote = run(moto.ppml(&home).args([
        "simple-query",
        "--no-preview",
        "--input",
        "s3://ppml-cli/datasets/people.enc",
        "--output",
        "s3://ppml-cli/results/developers.enc",
    ]));
    let count = |out: &Output| {
        stdout(out)
            .lines()
            .filter(|l| l.starts_with("count(name)") || l.starts_with("wrote "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(count(&remote), count(&local));
    assert!(stdout(&remote).contains("count(name): 30000"));
    let decrypt = |input: &str| {
        stdout(&run(moto
            .ppml(&home)
            .args(["decrypt", "--out", "-", "--in", input])))
    };
    let expected = decrypt(&local_out.display().to_string());
    assert!(expected.lines().count() > 100);
    assert_eq!(
        sorted_lines(&decrypt("s3://ppml-cli/results/developers.enc")),
        sorted_lines(&expected)
    );

    // SQL over S3 tables, printed and written to S3.
    let sql = "SELECT job, count(*) AS n, sum(age) AS s FROM people GROUP BY job ORDER BY job";
    let printed = |table: &str| {
        stdout(&run(moto
            .ppml(&home)
            .args(["query", "--sql", sql, "--table", table])))
    };
    let local_table = format!("people={}", dir.path().join("people.enc").display());
    assert_eq!(
        printed("people=s3://ppml-cli/datasets/people.enc"),
        printed(&local_table)
    );
    run(moto.ppml(&home).args([
        "query",
        "--sql",
        sql,
        "--table",
        "people=s3://ppml-cli/datasets/people.enc",
        "--output",
        "s3://ppml-cli/results/by-job",
        "--output-partitions",
        "1",
    ]));
    let by_job = decrypt("s3://ppml-cli/results/by-job");
    assert!(by_job.starts_with("job,n,s\n"), "{by_job}");
    let table_rows = printed(&local_table)
        .lines()
        .filter(|l| l.starts_with("| "))
        .count();
    assert_eq!(by_job.lines().count(), table_rows, "{by_job}");

    // `submit --mode local` goes through the same code.
    run(moto.ppml(&home).args([
        "submit",
        "--mode",
        "local",
        "simple-query",
        "--no-preview",
        "--input",
        "s3://ppml-cli/datasets/people.enc",
        "--output",
        "s3://ppml-cli/results/submitted.enc",
    ]));
    assert_eq!(
        sorted_lines(&decrypt("s3://ppml-cli/results/submitted.enc")),
        sorted_lines(&expected)
    );
}

#[test]
fn tampered_truncated_and_replaced_s3_objects_fail_loudly() {
    let moto = Moto::start();
    let store = moto.bucket("ppml-tamper");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let csv = dir.path().join("people.csv");
    generate(&home, &csv, 5000);
    for name in ["flipped", "truncated", "edited", "swapped", "other"] {
        run(moto
            .ppml(&home)
            .args([
                "encrypt",
                "--partitions",
                "2",
                "--segment-size",
                "1024",
                "--in",
            ])
            .arg(&csv)
            .args(["--out", &format!("s3://ppml-tamper/{name}")]));
    }

    // One flipped byte in a segment of a part: decryption and queries fail naming the part.
    let key = "flipped/part-00001.csv.ppml";
    let mut bytes = get(&store, key);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    put(&store, key, bytes);
    let part_url = "s3://ppml-tamper/flipped/part-00001.csv.ppml";
    let err = fails(
        moto.ppml(&home)
            .args(["decrypt", "--out", "-", "--in", "s3://ppml-tamper/flipped"]),
        3,
    );
    assert!(err.contains(part_url), "{err}");
    let err = fails(
        moto.ppml(&home).args([
            "query",
            "--sql",
            "SELECT count(*) FROM people WHERE age > 30",
            "--table",
            "people=s3://ppml-tamper/flipped",
        ]),
        3,
    );
    assert!(err.contains(part_url), "{err}");

    // A truncated part.
    let key = "truncated/part-00000.csv.ppml";
    let bytes = get(&store, key);
    put(&store, key, bytes[..bytes.len() - 7].to_vec());
    let err = fails(
        moto.ppml(&home).args([
            "simple-query",
            "--input",
            "s3://ppml-tamper/truncated",
            "--output",
            "s3://ppml-tamper/never",
        ]),
        3,
    );
    assert!(
        err.contains(
            "s3://ppml-tamper/truncated/part-00000.csv.ppml: part does not match the manifest \
             (size)"
        ),
        "{err}"
    );
    assert!(objects(&store, "never").is_empty());

    // An edited manifest, and a manifest replaced by another dataset's.
    let manifest = String::from_utf8(get(&store, "edited/_manifest.ppml.json")).unwrap();
    put(
        &store,
        "edited/_manifest.ppml.json",
        manifest
            .replace("header=present", "header=absent")
            .into_bytes(),
    );
    let err = fails(
        moto.ppml(&home)
            .args(["decrypt", "--out", "-", "--in", "s3://ppml-tamper/edited"]),
        3,
    );
    assert!(
        err.contains("s3://ppml-tamper/edited/_manifest.ppml.json"),
        "{err}"
    );
    put(
        &store,
        "swapped/_manifest.ppml.json",
        get(&store, "other/_manifest.ppml.json"),
    );
    let err = fails(
        moto.ppml(&home)
            .args(["decrypt", "--out", "-", "--in", "s3://ppml-tamper/swapped"]),
        3,
    );
    assert!(err.contains("s3://ppml-tamper/swapped/part-0000"), "{err}");

    // A prefix without a manifest is not a dataset.
    let err = fails(
        moto.ppml(&home)
            .args(["decrypt", "--out", "-", "--in", "s3://ppml-tamper/nothing"]),
        3,
    );
    assert!(
        err.contains("s3://ppml-tamper/nothing: not a ppml encrypted dataset"),
        "{err}"
    );
}

#[test]
fn failed_s3_writes_leave_no_objects_and_overwrite_is_explicit() {
    let moto = Moto::start();
    let store = moto.bucket("ppml-fail");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let inputs = dir.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    // 2 MiB of good rows, then a file with a malformed row: the first part is uploaded before
    // the second fails.
    let mut good = String::from("name,age,job\n");
    while good.len() < 2 << 20 {
        good.push_str("Alice,30,Developer\n");
    }
    std::fs::write(inputs.join("a.csv"), &good).unwrap();
    std::fs::write(inputs.join("b.csv"), "name,age,job\nBob,31\n").unwrap();
    let err = fails(
        moto.ppml(&home)
            .args(["encrypt", "--in"])
            .arg(&inputs)
            .args(["--out", "s3://ppml-fail/dataset"]),
        3,
    );
    assert!(err.contains("b.csv"), "{err}");
    assert_eq!(objects(&store, "dataset"), Vec::<String>::new());

    // A query that fails while its output is being written leaves nothing either.
    std::fs::remove_file(inputs.join("b.csv")).unwrap();
    run(moto
        .ppml(&home)
        .args(["encrypt", "--in"])
        .arg(inputs.join("a.csv"))
        .args(["--out", "s3://ppml-fail/dataset"]));
    let out = moto
        .ppml(&home)
        .args([
            "query",
            "--sql",
            "SELECT arrow_cast(name, 'Int64') AS n FROM people",
            "--table",
            "people=s3://ppml-fail/dataset",
            "--output",
            "s3://ppml-fail/result",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).to_lowercase().contains("cast"), "{out:?}");
    assert_eq!(objects(&store, "result"), Vec::<String>::new());

    // An existing dataset is replaced only with --overwrite; then its old parts are gone.
    let before = objects(&store, "dataset");
    let err = fails(
        moto.ppml(&home)
            .args(["encrypt", "--in"])
            .arg(inputs.join("a.csv"))
            .args(["--out", "s3://ppml-fail/dataset"]),
        1,
    );
    assert!(
        err.contains(
            "s3://ppml-fail/dataset: output already exists (remove it or pass --overwrite)"
        ),
        "{err}"
    );
    assert_eq!(objects(&store, "dataset"), before);
    run(moto
        .ppml(&home)
        .args(["encrypt", "--overwrite", "--partitions", "2", "--in"])
        .arg(inputs.join("a.csv"))
        .args(["--out", "s3://ppml-fail/dataset"]));
    let after = objects(&store, "dataset");
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.iter().all(|o| !before[1..].contains(o)), "{after:?}");
    let decrypted =
        run(moto
            .ppml(&home)
            .args(["decrypt", "--out", "-", "--in", "s3://ppml-fail/dataset"]));
    assert_eq!(stdout(&decrypted), good);

    // Leftovers of an interrupted write (objects but no manifest) are not written into.
    put(&store, "left/part-00000.csv.ppml", b"partial".to_vec());
    let err = fails(
        moto.ppml(&home)
            .args(["encrypt", "--in"])
            .arg(inputs.join("a.csv"))
            .args(["--out", "s3://ppml-fail/left"]),
        1,
    );
    assert!(err.contains("holds objects but no ppml dataset"), "{err}");

    // Bad URLs are usage errors naming the URL.
    let out = moto
        .ppml(&home)
        .args(["decrypt", "--out", "-", "--in", "s3://Bad_Bucket/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("s3://Bad_Bucket/x"), "{out:?}");
}

#[test]
fn cluster_executors_read_s3_datasets() {
    let moto = Moto::start();
    let store = moto.bucket("ppml-cluster");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let csv = dir.path().join("people.csv");
    generate(&home, &csv, 40000);
    run(moto
        .ppml(&home)
        .args(["encrypt", "--partitions", "4", "--in"])
        .arg(&csv)
        .args(["--out", "s3://ppml-cluster/people.enc"]));
    let local = run(moto.ppml(&home).args([
        "simple-query",
        "--no-preview",
        "--input",
        "s3://ppml-cluster/people.enc",
        "--output",
        "s3://ppml-cluster/local.enc",
    ]));

    // The executors get the AWS variables from `cluster up`'s environment.
    let cluster = dir.path().join("cluster");
    let port = free_cluster_ports(2);
    run(moto
        .ppml(&home)
        .args([
            "cluster",
            "up",
            "--executors",
            "2",
            "--port",
            &port.to_string(),
        ])
        .arg("--dir")
        .arg(&cluster));
    let submitted = moto
        .ppml(&home)
        .args([
            "submit",
            "--mode",
            "client",
            "--master",
            &format!("127.0.0.1:{port}"),
            "--num-executors",
            "2",
            "--cluster-tls",
        ])
        .arg(cluster.join("tls"))
        .args([
            "simple-query",
            "--no-preview",
            "--input",
            "s3://ppml-cluster/people.enc",
            "--output",
            "s3://ppml-cluster/cluster.enc",
        ])
        .output()
        .unwrap();
    // Cluster mode: the driver runs on an executor, which writes the output to S3; the
    // submitting process has neither S3 nor KMS credentials.
    let cluster_mode = ppml(&home)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_ENDPOINT_URL")
        .args([
            "submit",
            "--mode",
            "cluster",
            "--master",
            &format!("127.0.0.1:{port}"),
            "--cluster-tls",
        ])
        .arg(cluster.join("tls"))
        .args([
            "simple-query",
            "--input",
            "s3://ppml-cluster/people.enc",
            "--output",
            "s3://ppml-cluster/cluster-mode.enc",
        ])
        .output()
        .unwrap();
    // The executors decrypted the input themselves (their metrics count the plaintext bytes
    // their `ppml://s3-<bucket>` stores returned).
    let decrypted_by_executors = common::executors_decrypted_bytes(&cluster);
    let logs: String = (0..2)
        .map(|i| {
            std::fs::read_to_string(cluster.join(format!("executor-{i}.log"))).unwrap_or_default()
        })
        .collect();
    run(ppml(&home).args(["cluster", "down", "--dir"]).arg(&cluster));
    assert!(submitted.status.success(), "{submitted:?}\n{logs}");
    assert!(cluster_mode.status.success(), "{cluster_mode:?}\n{logs}");
    assert!(
        stdout(&cluster_mode).contains("part(s) to s3://ppml-cluster/cluster-mode.enc"),
        "{cluster_mode:?}"
    );
    let input_bytes = std::fs::metadata(&csv).unwrap().len() as f64;
    assert!(
        decrypted_by_executors >= input_bytes,
        "executors decrypted {decrypted_by_executors} of {input_bytes} bytes"
    );
    let count = |out: &Output| {
        stdout(out)
            .lines()
            .find(|l| l.starts_with("count(name)"))
            .map(str::to_string)
    };
    assert_eq!(count(&submitted), count(&local));
    let decrypt = |input: &str| {
        stdout(&run(moto
            .ppml(&home)
            .args(["decrypt", "--out", "-", "--in", input])))
    };
    let expected = decrypt("s3://ppml-cluster/local.enc");
    assert!(expected.lines().count() > 100);
    assert_eq!(
        sorted_lines(&decrypt("s3://ppml-cluster/cluster.enc")),
        sorted_lines(&expected)
    );
    assert!(objects(&store, "cluster.enc").len() > 1);
    assert_eq!(
        sorted_lines(&decrypt("s3://ppml-cluster/cluster-mode.enc")),
        sorted_lines(&expected)
    );
}
