//! Datasets in S3, against a real S3-protocol server: moto's server mode (`moto_server`, from
//! `pip install 'moto[server]'`; `.ci/run` installs it). The tests fail, not skip, without it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::Int64Array;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use ppml_kms::{AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId};

use crate::dataset::{DatasetWriter, WriteOptions, part_name};
use crate::s3::{S3Stores, s3_object_store, test_support};
use crate::{DatasetLocation, DatasetPin, EngineError, PpmlSession};

/// A `moto_server` on a free loopback port, killed when dropped.
pub(crate) struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}): the S3 tests need a real S3-protocol \
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

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request; returns the status code.
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

    /// Creates `bucket` and points this process's clients of it at this server.
    pub(crate) fn bucket(&self, bucket: &str) {
        assert_eq!(self.request("PUT", &format!("/{bucket}")).unwrap(), 200);
        test_support::use_endpoint(bucket, &self.endpoint());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    _moto: Moto,
    kms: Arc<LocalKms>,
    primary: PrimaryKeyId,
}

async fn fixture(bucket: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kms_dir = dir.path().join("kms");
    LocalKms::init(&kms_dir).unwrap();
    let creds: AppCredentials = LocalKms::enroll(&kms_dir).unwrap();
    let kms = Arc::new(LocalKms::open(&kms_dir, &creds).unwrap());
    let primary = kms.create_primary_key().await.unwrap();
    let moto = Moto::start();
    moto.bucket(bucket);
    Fixture {
        dir,
        _moto: moto,
        kms,
        primary,
    }
}

fn people(rows: usize, offset: usize) -> String {
    let jobs = ["Developer", "Engineer", "Researcher"];
    let mut out = String::from("name,age,job\n");
    for i in offset..offset + rows {
        out.push_str(&format!("n{i},{},{}\n", 18 + i % 43, jobs[i % 3]));
    }
    out
}

fn location(url: &str) -> DatasetLocation {
    DatasetLocation::parse(url).unwrap()
}

async fn write_dataset(
    f: &Fixture,
    url: &str,
    contents: &[String],
    overwrite: bool,
) -> Result<(), EngineError> {
    let writer = DatasetWriter::create(
        f.kms.as_ref(),
        &f.primary,
        location(url),
        WriteOptions {
            segment_size: 4096,
            overwrite,
            ..WriteOptions::default()
        },
    )
    .await?;
    let mut entries = Vec::new();
    for (i, text) in contents.iter().enumerate() {
        let mut part = writer.part(&part_name(i, "csv")).await?;
        // In pieces, as a query writes batches, with back-pressure in between.
        for piece in text.as_bytes().chunks(1 << 20) {
            part.write_all(piece).unwrap();
            part.ready().await?;
        }
        entries.push(part.finish().await?);
    }
    writer.commit(entries).await?;
    Ok(())
}

async fn objects(bucket: &str, prefix: &str) -> Vec<String> {
    let store = s3_object_store(bucket).unwrap();
    let mut names: Vec<String> = store
        .list(Some(&StorePath::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

async fn count_and_sum(session: &PpmlSession) -> (i64, i64) {
    let batches = session
        .collect(
            session
                .sql(
                    "SELECT count(*) AS n, sum(age) AS s FROM people \
                     WHERE job = 'Developer' AND age BETWEEN 20 AND 40",
                )
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let col = |i: usize| {
        batches[0]
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    (col(0), col(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_datasets_are_written_read_and_queried_like_directories() {
    let f = fixture("ppml-engine-rw").await;
    // The first part spans several 5 MiB upload chunks.
    let parts = vec![people(600_000, 0), people(700, 600_000), people(0, 0)];
    assert!(parts[0].len() > 11 << 20, "{}", parts[0].len());
    write_dataset(&f, "s3://ppml-engine-rw/in/people", &parts, false)
        .await
        .unwrap();
    assert_eq!(
        objects("ppml-engine-rw", "in/people").await,
        [
            "in/people/_manifest.ppml.json",
            "in/people/part-00000.csv.ppml",
            "in/people/part-00001.csv.ppml",
            "in/people/part-00002.csv.ppml",
        ]
    );

    let local = f.dir.path().join("people");
    {
        let writer =
            DatasetWriter::create(f.kms.as_ref(), &f.primary, &local, WriteOptions::default())
                .await
                .unwrap();
        let mut entries = Vec::new();
        for (i, text) in parts.iter().enumerate() {
            let mut part = writer.part(&part_name(i, "csv")).await.unwrap();
            part.write_all(text.as_bytes()).unwrap();
            entries.push(part.finish().await.unwrap());
        }
        writer.commit(entries).await.unwrap();
    }

    let on_s3 = PpmlSession::encrypted(f.kms.clone(), Some(2));
    let dataset = on_s3
        .register_dataset("people", location("s3://ppml-engine-rw/in/people/"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dataset.display, "s3://ppml-engine-rw/in/people");
    let on_disk = PpmlSession::encrypted(f.kms.clone(), Some(2));
    on_disk
        .register_dataset("people", &local, None)
        .await
        .unwrap();
    let expected = count_and_sum(&on_disk).await;
    assert!(expected.0 > 0);
    assert_eq!(count_and_sum(&on_s3).await, expected);

    // A query result written to S3 reads back the same.
    let df = on_s3
        .sql("SELECT * FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40")
        .await
        .unwrap();
    let summary = on_s3
        .write_csv(
            df,
            crate::OutputTarget::Encrypted {
                kms: f.kms.as_ref(),
                primary: &f.primary,
                dir: location("s3://ppml-engine-rw/out/developers"),
                options: WriteOptions {
                    job: Some(crate::receipt::JobDescription::new(
                        "sql",
                        serde_json::json!({"sql": "developers"}),
                    )),
                    ..WriteOptions::default()
                },
            },
            Some(2),
        )
        .await
        .unwrap();
    assert_eq!(summary.rows, expected.0 as u64);
    // The job's receipt is an object beside the manifest, which binds it; it names the
    // input it read on S3.
    let output = location("s3://ppml-engine-rw/out/developers");
    let receipt =
        crate::dataset::read_dataset_file(&output, ppml_format::manifest::RECEIPT_FILE_NAME)
            .await
            .unwrap()
            .expect("a receipt object");
    let manifest =
        crate::dataset::read_dataset_file(&output, ppml_format::manifest::MANIFEST_FILE_NAME)
            .await
            .unwrap()
            .unwrap();
    let manifest = ppml_format::manifest::UnverifiedManifest::from_json(&manifest).unwrap();
    assert_eq!(
        manifest.unauthenticated().receipt_sha256(),
        Some(
            &ring::digest::digest(&ring::digest::SHA256, &receipt)
                .as_ref()
                .try_into()
                .unwrap()
        )
    );
    let receipt = ppml_format::receipt::Receipt::from_json(&receipt).unwrap();
    let body = receipt.body();
    assert_eq!(body.output.location, "s3://ppml-engine-rw/out/developers");
    assert_eq!(body.inputs.len(), 1);
    assert_eq!(body.inputs[0].location, "s3://ppml-engine-rw/in/people");
    assert_eq!(body.output.rows, Some(expected.0 as u64));
    let out = PpmlSession::encrypted(f.kms.clone(), None);
    out.register_dataset(
        "people",
        location("s3://ppml-engine-rw/out/developers"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(count_and_sum(&out).await, expected);

    // As Parquet with modular encryption: written to S3, read back through the S3 store's
    // PME decryption.
    let df = on_s3
        .sql("SELECT * FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40")
        .await
        .unwrap();
    on_s3
        .write(
            df,
            crate::OutputTarget::Encrypted {
                kms: f.kms.as_ref(),
                primary: &f.primary,
                dir: location("s3://ppml-engine-rw/out/developers-pq"),
                options: WriteOptions::default(),
            },
            Some(2),
            crate::OutputFormat::Parquet,
        )
        .await
        .unwrap();
    let pq = PpmlSession::encrypted(f.kms.clone(), None);
    let dataset = pq
        .register_dataset(
            "people",
            location("s3://ppml-engine-rw/out/developers-pq"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(dataset.is_pme());
    assert_eq!(count_and_sum(&pq).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_truncated_and_swapped_s3_objects_are_refused() {
    let f = fixture("ppml-engine-tamper").await;
    let text = people(3000, 0);
    for name in ["a", "b", "c", "d"] {
        write_dataset(
            &f,
            &format!("s3://ppml-engine-tamper/{name}"),
            std::slice::from_ref(&text),
            false,
        )
        .await
        .unwrap();
    }
    let store = s3_object_store("ppml-engine-tamper").unwrap();
    let part = |name: &str| StorePath::from(format!("{name}/part-00000.csv.ppml"));
    let read = |location: StorePath| {
        let store = store.clone();
        async move {
            store
                .get(&location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec()
        }
    };
    let query = |name: &'static str| {
        let kms = f.kms.clone();
        async move {
            let session = PpmlSession::encrypted(kms, None);
            session
                .register_dataset(
                    "people",
                    location(&format!("s3://ppml-engine-tamper/{name}")),
                    None,
                )
                .await?;
            session
                .collect(session.sql("SELECT count(*) FROM people").await?)
                .await
        }
    };

    // A flipped byte in a segment: the part opens (header and size are intact) but the
    // segment does not authenticate, and the error names the part.
    let mut bytes = read(part("a")).await;
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    store
        .put(&part("a"), PutPayload::from(bytes))
        .await
        .unwrap();
    let err = query("a").await.unwrap_err().to_string();
    assert!(
        err.contains("s3://ppml-engine-tamper/a/part-00000.csv.ppml"),
        "{err}"
    );

    // A truncated part is refused when the dataset is opened.
    let bytes = read(part("b")).await;
    store
        .put(
            &part("b"),
            PutPayload::from(bytes[..bytes.len() - 10].to_vec()),
        )
        .await
        .unwrap();
    let err = query("b").await.unwrap_err();
    assert!(
        matches!(&err, EngineError::PartMismatch { path, what: "size" }
            if path == "s3://ppml-engine-tamper/b/part-00000.csv.ppml"),
        "{err}"
    );

    // A manifest edited, or replaced by another dataset's.
    let manifest = |name: &str| StorePath::from(format!("{name}/_manifest.ppml.json"));
    let edited = String::from_utf8(read(manifest("c")).await)
        .unwrap()
        .replace("header=present", "header=absent");
    store
        .put(&manifest("c"), PutPayload::from(edited.into_bytes()))
        .await
        .unwrap();
    let err = query("c").await.unwrap_err().to_string();
    assert!(
        err.starts_with("s3://ppml-engine-tamper/c/_manifest.ppml.json: "),
        "{err}"
    );
    let other = read(manifest("a")).await;
    store
        .put(&manifest("d"), PutPayload::from(other))
        .await
        .unwrap();
    let err = query("d").await.unwrap_err();
    assert!(matches!(err, EngineError::PartMismatch { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_dataset_replaced_after_planning_is_refused_by_executors() {
    let f = fixture("ppml-engine-pin").await;
    let url = "s3://ppml-engine-pin/people";
    write_dataset(&f, url, &[people(500, 0)], false)
        .await
        .unwrap();
    // The planner verifies the dataset and pins it in the plan's locations...
    let planner = PpmlSession::encrypted(f.kms.clone(), None);
    let dataset = planner
        .register_dataset("people", location(url), None)
        .await
        .unwrap()
        .unwrap();
    let pinned = StorePath::from(DatasetPin::of(&dataset).segment())
        .join("people")
        .join("part-00000.csv.ppml");
    // ...an executor opens the pinned dataset on first access...
    let executor = Arc::new(S3Stores::with_opener(f.kms.clone()));
    let store = executor.decrypting("ppml-engine-pin").unwrap();
    let first = store.get(&pinned).await.unwrap().bytes().await.unwrap();
    assert_eq!(&first[..], people(500, 0).as_bytes());

    // ...but a fresh executor, after the owner replaced the dataset, refuses it.
    write_dataset(&f, url, &[people(500, 1)], true)
        .await
        .unwrap();
    let late = Arc::new(S3Stores::with_opener(f.kms.clone()));
    let err = late
        .decrypting("ppml-engine-pin")
        .unwrap()
        .get(&pinned)
        .await
        .unwrap_err();
    let err = crate::store::engine_error(err);
    assert!(
        matches!(&err, EngineError::DatasetChanged(d) if d == "s3://ppml-engine-pin/people"),
        "{err}"
    );

    // Executors find the bucket's store through DataFusion's registry.
    let mut runtime = datafusion::execution::runtime_env::RuntimeEnv::default();
    late.install(&mut runtime);
    let url = crate::s3::store_url("ppml-engine-pin");
    assert!(runtime.object_store_registry.get_store(&url).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_s3_writes_leave_nothing_and_outputs_are_not_replaced_silently() {
    let f = fixture("ppml-engine-fail").await;
    let bucket = "ppml-engine-fail";

    // A write that fails after one part was uploaded: aborting deletes it, and the
    // unfinished multipart upload of the other leaves no object.
    let writer = DatasetWriter::create(
        f.kms.as_ref(),
        &f.primary,
        location("s3://ppml-engine-fail/out"),
        WriteOptions::default(),
    )
    .await
    .unwrap();
    let mut done = writer.part(&part_name(0, "csv")).await.unwrap();
    done.write_all(people(100, 0).as_bytes()).unwrap();
    done.finish().await.unwrap();
    let mut unfinished = writer.part(&part_name(1, "csv")).await.unwrap();
    unfinished.write_all(people(100, 0).as_bytes()).unwrap();
    assert_eq!(objects(bucket, "out").await, ["out/part-00000.csv.ppml"]);
    drop(unfinished);
    writer.abort().await;
    assert!(objects(bucket, "out").await.is_empty());

    // A dataset is not replaced without overwrite, and a prefix holding other objects is not
    // written into.
    let url = "s3://ppml-engine-fail/people";
    write_dataset(&f, url, &[people(10, 0)], false)
        .await
        .unwrap();
    let err = write_dataset(&f, url, &[people(10, 0)], false)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "s3://ppml-engine-fail/people: output already exists (remove it or pass --overwrite)"
    );
    let store = s3_object_store(bucket).unwrap();
    store
        .put(
            &StorePath::from("junk/x.csv"),
            PutPayload::from_static(b"x"),
        )
        .await
        .unwrap();
    let err = write_dataset(&f, "s3://ppml-engine-fail/junk", &[people(10, 0)], false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::PrefixNotEmpty { example, .. }
            if example == "s3://ppml-engine-fail/junk/x.csv"),
        "{err}"
    );

    // With overwrite the new dataset replaces the old one only at its manifest, and the old
    // parts are deleted afterwards.
    write_dataset(&f, url, &[people(20, 0), people(5, 20)], true)
        .await
        .unwrap();
    let listed = objects(bucket, "people").await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(!listed.contains(&"people/part-00000.csv.ppml".to_string()));
    let session = PpmlSession::encrypted(f.kms.clone(), None);
    session
        .register_dataset("people", location(url), None)
        .await
        .unwrap();
    let rows = session
        .collect(session.sql("SELECT count(*) FROM people").await.unwrap())
        .await
        .unwrap();
    let n = rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 25);

    // A manifest that appears while a write is in progress wins: the late writer refuses to
    // commit and deletes its parts.
    let writer = DatasetWriter::create(
        f.kms.as_ref(),
        &f.primary,
        location("s3://ppml-engine-fail/race"),
        WriteOptions::default(),
    )
    .await
    .unwrap();
    let mut part = writer.part(&part_name(0, "csv")).await.unwrap();
    part.write_all(people(10, 0).as_bytes()).unwrap();
    let entry = part.finish().await.unwrap();
    write_dataset(&f, "s3://ppml-engine-fail/race", &[people(3, 0)], true)
        .await
        .unwrap();
    let winner = objects(bucket, "race").await;
    let err = writer.commit(vec![entry]).await.unwrap_err();
    assert!(matches!(err, EngineError::OutputExists(_)), "{err}");
    assert_eq!(objects(bucket, "race").await, winner);
}
