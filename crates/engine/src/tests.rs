//! Tests of the DataFusion integration against the embedded KMS.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use ppml_kms::{AppCredentials, KeyManagementService, LocalKms, PrimaryKeyId};

use crate::dataset::{DatasetWriter, WriteOptions, open_dataset, part_name};
use crate::{DecryptingStore, EngineError, PpmlSession};

struct Fixture {
    dir: tempfile::TempDir,
    kms: Arc<LocalKms>,
    primary: PrimaryKeyId,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kms_dir = dir.path().join("kms");
    LocalKms::init(&kms_dir).unwrap();
    let creds: AppCredentials = LocalKms::enroll(&kms_dir).unwrap();
    let kms = Arc::new(LocalKms::open(&kms_dir, &creds).unwrap());
    let primary = kms.create_primary_key().await.unwrap();
    Fixture { dir, kms, primary }
}

fn people(rows: usize, offset: usize) -> String {
    let jobs = ["Developer", "Engineer", "Researcher"];
    let mut out = String::from("name,age,job\n");
    for i in offset..offset + rows {
        out.push_str(&format!("n{i},{},{}\n", 18 + i % 43, jobs[i % 3]));
    }
    out
}

/// Writes `contents` as one part each into a dataset with small segments.
async fn write_dataset(f: &Fixture, name: &str, contents: &[String]) -> std::path::PathBuf {
    let dest = f.dir.path().join(name);
    let writer = DatasetWriter::create(
        f.kms.as_ref(),
        &f.primary,
        &dest,
        WriteOptions {
            segment_size: 256,
            ..WriteOptions::default()
        },
    )
    .await
    .unwrap();
    let mut entries = Vec::new();
    for (i, text) in contents.iter().enumerate() {
        let mut part = writer.part(&part_name(i, "csv")).await.unwrap();
        part.write_all(text.as_bytes()).unwrap();
        entries.push(part.finish().await.unwrap());
    }
    writer.commit(entries).await.unwrap();
    dest
}

fn store_root(dir: &Path) -> StorePath {
    StorePath::from_absolute_path(dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_serves_plaintext_ranges() {
    let f = fixture().await;
    let text = people(300, 0);
    let dest = write_dataset(&f, "ds", std::slice::from_ref(&text)).await;
    let inner = Arc::new(LocalFileSystem::new());
    let dataset = open_dataset(inner.as_ref(), &store_root(&dest), "ds", f.kms.as_ref())
        .await
        .unwrap();
    let store = DecryptingStore::new(inner);
    let pinned_root = store.register(&dataset);
    let location = pinned_root.join(dataset.parts[0].entry.name.as_str());
    // The ciphertext's own location is not visible through the store.
    assert!(store.head(&dataset.parts[0].location).await.is_err());
    assert_eq!(store.head(&location).await.unwrap().size, text.len() as u64);
    let listed: Vec<_> = store.list(None).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    let whole = store.get(&location).await.unwrap().bytes().await.unwrap();
    assert_eq!(&whole[..], text.as_bytes());

    // Every range around segment boundaries, and pseudo-random ranges elsewhere.
    let len = text.len() as u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for boundary in (0..len).step_by(256) {
        for start in boundary.saturating_sub(2)..(boundary + 2).min(len) {
            ranges.push((start, (start + 1).min(len)));
            ranges.push((start, (start + 300).min(len)));
        }
    }
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..300 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let start = (seed >> 33) % len;
        let end = (start + 1 + (seed >> 13) % 3000).min(len);
        ranges.push((start, end));
    }
    for (start, end) in ranges {
        let got = store
            .get_opts(
                &location,
                GetOptions {
                    range: Some(GetRange::Bounded(start..end)),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            &got[..],
            &text.as_bytes()[start as usize..end as usize],
            "{start}..{end}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_files_cannot_be_read_through_the_store() {
    let f = fixture().await;
    let dest = write_dataset(&f, "ds", &[people(10, 0)]).await;
    let store = DecryptingStore::new(Arc::new(LocalFileSystem::new()));
    let location = store_root(&dest).join("part-00000.csv.ppml");
    let err = store.get(&location).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_datasets_open_on_first_access_and_only_as_pinned() {
    let f = fixture().await;
    let text = people(40, 0);
    let dest = write_dataset(&f, "ds", std::slice::from_ref(&text)).await;
    let other = write_dataset(&f, "other", &[people(40, 100)]).await;
    let inner = Arc::new(LocalFileSystem::new());
    // The planner verifies the dataset and names it by its pinned location...
    let dataset = open_dataset(inner.as_ref(), &store_root(&dest), "ds", f.kms.as_ref())
        .await
        .unwrap();
    let planner = DecryptingStore::new(inner.clone());
    let part = planner.register(&dataset).join("part-00000.csv.ppml");

    // ...and a store that never saw it (an executor's) opens it on first access.
    let executor = DecryptingStore::new(inner.clone()).with_opener(f.kms.clone());
    let read = executor.get(&part).await.unwrap().bytes().await.unwrap();
    assert_eq!(&read[..], text.as_bytes());

    // The same pin over another dataset's directory is refused.
    let pin = crate::DatasetPin::of(&dataset).segment();
    let swapped = StorePath::from(pin.as_str());
    let swapped = store_root(&other)
        .parts()
        .fold(swapped, |p, s| p.join(s))
        .join("part-00000.csv.ppml");
    let err = executor.get(&swapped).await.unwrap_err().to_string();
    assert!(err.contains("changed after the query was planned"), "{err}");

    // A store without an opener serves only what was registered.
    let plain = DecryptingStore::new(inner);
    assert!(plain.get(&part).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_on_ciphertext_matches_query_on_plaintext() {
    let f = fixture().await;
    let parts = vec![people(1000, 0), people(700, 1000), people(0, 0)];
    let dest = write_dataset(&f, "people", &parts).await;
    let plain_dir = f.dir.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    for (i, text) in parts.iter().enumerate() {
        std::fs::write(plain_dir.join(format!("p{i}.csv")), text).unwrap();
    }
    let sql = "SELECT count(*) AS n, sum(age) AS s FROM people \
               WHERE job = 'Developer' AND age BETWEEN 20 AND 40";
    let encrypted = PpmlSession::encrypted(f.kms.clone(), Some(2));
    encrypted
        .register_dataset("people", &dest, None)
        .await
        .unwrap();
    let plaintext = PpmlSession::plaintext(Some(2));
    plaintext
        .register_dataset("people", &plain_dir, None)
        .await
        .unwrap();
    let results = [
        first_row(&encrypted, sql).await,
        first_row(&plaintext, sql).await,
    ];
    assert_eq!(results[0], results[1]);
    assert!(results[0][0] > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_queries_are_accepted_as_sql() {
    let f = fixture().await;
    let dest = write_dataset(&f, "people", &[people(20, 0)]).await;
    let session = PpmlSession::encrypted(f.kms.clone(), None);
    session
        .register_dataset("people", &dest, None)
        .await
        .unwrap();
    let out = f.dir.path().join("leak.csv");
    for statement in [
        format!("COPY people TO '{}' STORED AS CSV", out.display()),
        "SET datafusion.runtime.temp_directory = '/tmp'".to_string(),
        "CREATE TABLE t AS SELECT * FROM people".to_string(),
        "INSERT INTO people VALUES ('x', 1, 'y')".to_string(),
    ] {
        assert!(session.sql(&statement).await.is_err(), "{statement}");
    }
    assert!(!out.exists());
    let rows = session
        .collect(session.sql("SELECT count(*) FROM people").await.unwrap())
        .await
        .unwrap();
    assert_eq!(rows[0].num_rows(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_keeps_the_tables_and_bounds_the_pool() {
    let f = fixture().await;
    let dest = write_dataset(&f, "people", &[people(2000, 0)]).await;
    let session = PpmlSession::encrypted(f.kms.clone(), Some(2));
    session
        .register_dataset("people", &dest, None)
        .await
        .unwrap();
    let session = session.with_memory_limit(64 << 20);
    let pool = session.context().runtime_env().memory_pool.memory_limit();
    assert!(matches!(
        pool,
        datafusion::execution::memory_pool::MemoryLimit::Finite(n) if n == 64 << 20
    ));
    let rows = session
        .collect(
            session
                .sql("SELECT name FROM people ORDER BY name DESC")
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_cannot_be_read_without_the_key() {
    let f = fixture().await;
    let dest = write_dataset(&f, "people", &[people(50, 0)]).await;
    let other = fixture().await;
    let session = PpmlSession::encrypted(other.kms.clone(), None);
    let err = session
        .register_dataset("people", &dest, None)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Kms { .. }), "{err}");
    assert!(
        session.context().sql("SELECT * FROM people").await.is_err(),
        "the table must not be registered"
    );
    // The plaintext session sees only ciphertext: no row of the input appears.
    let part = std::fs::read(dest.join("part-00000.csv.ppml")).unwrap();
    assert!(!part.windows(3).any(|w| w == b"n10"));
}

/// The first row of `sql`'s result in `session`, whose columns are all 64-bit integers.
async fn first_row(session: &PpmlSession, sql: &str) -> Vec<i64> {
    let batches = session
        .context()
        .sql(sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    batches[0]
        .columns()
        .iter()
        .map(|c| c.as_any().downcast_ref::<Int64Array>().unwrap().value(0))
        .collect()
}

/// `count(*)`, `sum(age)` and the number of distinct jobs of the `people` table in `session`.
async fn people_totals(session: &PpmlSession, table: &str) -> Vec<i64> {
    first_row(
        session,
        &format!("SELECT count(*) AS n, sum(age) AS s, count(DISTINCT job) AS j FROM {table}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_and_ndjson_datasets_are_queried_converted_and_written() {
    use crate::files::{
        DecryptOptions, DecryptOutput, EncryptOptions, MediaKind, NoProgress, decrypt_dataset,
        encrypt_paths,
    };
    use crate::{OutputFormat, OutputTarget};

    let f = fixture().await;
    let csv = f.dir.path().join("people.csv");
    std::fs::write(&csv, people(5000, 0)).unwrap();
    let plaintext = PpmlSession::plaintext(Some(2));
    plaintext
        .register_dataset("people", &csv, None)
        .await
        .unwrap();
    let expected = people_totals(&plaintext, "people").await;
    assert_eq!(expected[0], 5000);

    let encrypted = PpmlSession::encrypted(f.kms.clone(), Some(2));
    for (to, table) in [
        (OutputFormat::Parquet, "pq"),
        (OutputFormat::Json, "js"),
        (OutputFormat::Csv, "cs"),
    ] {
        let dest = f.dir.path().join(table);
        let options = EncryptOptions {
            partitions: 2,
            to: Some(to),
            ..EncryptOptions::default()
        };
        let summary = encrypt_paths(
            f.kms.as_ref(),
            &f.primary,
            &csv,
            &dest,
            &options,
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(summary.parts, 2, "{to:?}");
        let dataset = encrypted
            .register_dataset(table, &dest, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            MediaKind::from_media_type(dataset.manifest.media_type()),
            to.media_kind()
        );
        // Parquet parts are Parquet files with modular encryption; the others ppml files.
        let suffix = match to {
            OutputFormat::Parquet => ".parquet".to_string(),
            other => format!(".{}{}", other.extension(), crate::dataset::PART_SUFFIX),
        };
        assert_eq!(dataset.is_pme(), to == OutputFormat::Parquet);
        assert!(
            dataset
                .parts
                .iter()
                .all(|p| p.entry.name.ends_with(&suffix)),
            "{to:?}"
        );
        assert_eq!(people_totals(&encrypted, table).await, expected, "{to:?}");
    }

    // One query over the three formats.
    let joined = first_row(
        &encrypted,
        "SELECT count(*) AS n FROM pq JOIN js ON pq.name = js.name \
         JOIN cs ON cs.name = js.name AND cs.age = pq.age",
    )
    .await;
    assert_eq!(joined, [5000]);

    // Query results written as encrypted Parquet and NDJSON read back the same.
    for (format, name) in [
        (OutputFormat::Parquet, "out_pq"),
        (OutputFormat::Json, "out_js"),
    ] {
        let dest = f.dir.path().join(name);
        let df = encrypted.sql("SELECT * FROM cs").await.unwrap();
        let written = encrypted
            .write(
                df,
                OutputTarget::Encrypted {
                    kms: f.kms.as_ref(),
                    primary: &f.primary,
                    dir: dest.clone().into(),
                    options: WriteOptions::default(),
                },
                Some(3),
                format,
            )
            .await
            .unwrap();
        assert_eq!((written.rows, written.parts), (5000, 3), "{format:?}");
        encrypted.register_dataset(name, &dest, None).await.unwrap();
        assert_eq!(
            people_totals(&encrypted, name).await,
            expected,
            "{format:?}"
        );
    }

    // Decrypted to a directory, the Parquet parts are plain Parquet files; one file is refused.
    let plain_dir = f.dir.path().join("pq_plain");
    decrypt_dataset(
        f.kms.as_ref(),
        &f.dir.path().join("pq").into(),
        DecryptOutput::Dir(&plain_dir),
        &DecryptOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    let files = crate::files::input_files(&plain_dir).unwrap();
    assert!(
        files.iter().all(|p| p.extension().unwrap() == "parquet"),
        "{files:?}"
    );
    let reread = PpmlSession::plaintext(Some(2));
    reread
        .register_dataset("people", &plain_dir, None)
        .await
        .unwrap();
    assert_eq!(people_totals(&reread, "people").await, expected);
    let one_file = decrypt_dataset(
        f.kms.as_ref(),
        &f.dir.path().join("pq").into(),
        DecryptOutput::File(&f.dir.path().join("all.parquet")),
        &DecryptOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(one_file, EngineError::InvalidInput { ref reason, .. } if reason.contains("2 parts")),
        "{one_file}"
    );
    assert!(!f.dir.path().join("all.parquet").exists());

    // Decrypted with conversion: Parquet (PME) to one CSV file with the input's rows, to
    // NDJSON on a stream, and NDJSON to a directory of Parquet files.
    let sorted_lines = |text: &str| {
        let mut lines: Vec<String> = text.lines().skip(1).map(str::to_string).collect();
        lines.sort();
        lines
    };
    let as_csv = f.dir.path().join("pq.csv");
    let rows = crate::files::decrypt_converted(
        f.kms.clone(),
        &f.dir.path().join("pq").into(),
        DecryptOutput::File(&as_csv),
        OutputFormat::Csv,
        &DecryptOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(rows, 5000);
    assert_eq!(
        sorted_lines(&std::fs::read_to_string(&as_csv).unwrap()),
        sorted_lines(&std::fs::read_to_string(&csv).unwrap())
    );
    let mut json = Vec::new();
    let rows = crate::files::decrypt_converted(
        f.kms.clone(),
        &f.dir.path().join("pq").into(),
        DecryptOutput::Stream(&mut json),
        OutputFormat::Json,
        &DecryptOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (rows, json.iter().filter(|b| **b == b'\n').count()),
        (5000, 5000)
    );
    let pq_dir = f.dir.path().join("js_as_parquet");
    crate::files::decrypt_converted(
        f.kms.clone(),
        &f.dir.path().join("js").into(),
        DecryptOutput::Dir(&pq_dir),
        OutputFormat::Parquet,
        &DecryptOptions::default(),
    )
    .await
    .unwrap();
    let reread = PpmlSession::plaintext(Some(2));
    reread
        .register_dataset("people", &pq_dir, None)
        .await
        .unwrap();
    assert_eq!(people_totals(&reread, "people").await, expected);

    // Plain Parquet files encrypted as they are are queryable too.
    let kept = f.dir.path().join("kept");
    encrypt_paths(
        f.kms.as_ref(),
        &f.primary,
        &plain_dir,
        &kept,
        &EncryptOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    encrypted
        .register_dataset("kept", &kept, None)
        .await
        .unwrap();
    assert_eq!(people_totals(&encrypted, "kept").await, expected);

    // A flipped byte in a Parquet part fails the query.
    let part = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".parquet.ppml"))
        .unwrap();
    let mut bytes = std::fs::read(&part).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&part, bytes).unwrap();
    let tampered = PpmlSession::encrypted(f.kms.clone(), Some(2));
    let failed = match tampered.register_dataset("kept", &kept, None).await {
        Err(e) => e.to_string(),
        Ok(_) => tampered
            .sql("SELECT * FROM kept")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err()
            .to_string(),
    };
    assert!(
        failed.contains("authentic") || failed.contains("tamper"),
        "{failed}"
    );
}

/// A KMS that refuses one primary key's data keys (a user or runtime the owner did not give
/// that key), and otherwise is `inner`.
#[derive(Debug)]
struct RefusingKms {
    inner: Arc<LocalKms>,
    refused: PrimaryKeyId,
}

#[async_trait::async_trait]
impl KeyManagementService for RefusingKms {
    fn kms_id(&self) -> &str {
        self.inner.kms_id()
    }
    async fn create_primary_key(&self) -> Result<PrimaryKeyId, ppml_kms::KmsError> {
        self.inner.create_primary_key().await
    }
    async fn generate_data_key(
        &self,
        primary: &PrimaryKeyId,
        aad: &[u8],
    ) -> Result<(ppml_format::DataKey, ppml_format::KeyReference), ppml_kms::KmsError> {
        self.inner.generate_data_key(primary, aad).await
    }
    async fn unwrap_data_key(
        &self,
        key: &ppml_format::KeyReference,
        aad: &[u8],
    ) -> Result<ppml_format::DataKey, ppml_kms::KmsError> {
        if key.key_id == self.refused.0 {
            return Err(ppml_kms::KmsError::GrantRefused(format!(
                "key {} is not granted",
                key.key_id
            )));
        }
        self.inner.unwrap_data_key(key, aad).await
    }
    fn under_grant(
        self: Arc<Self>,
        _grant: &ppml_kms::grant::SignedGrant,
    ) -> Result<Arc<dyn KeyManagementService>, ppml_kms::KmsError> {
        Ok(self)
    }
}

async fn collect_text(session: &PpmlSession, sql: &str) -> std::result::Result<String, String> {
    let df = session.sql(sql).await.map_err(|e| e.to_string())?;
    let batches = session.collect(df).await.map_err(|e| e.to_string())?;
    Ok(
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string(),
    )
}

/// Copies dataset directory `from` to a fresh `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pme_parquet_detects_every_tampering_and_denies_only_withheld_columns() {
    use crate::OutputFormat;
    use crate::files::{EncryptOptions, NoProgress, encrypt_paths};
    use crate::pme::PmeOptions;

    let f = fixture().await;
    let secret = f.kms.create_primary_key().await.unwrap();
    let csv = f.dir.path().join("people.csv");
    std::fs::write(&csv, people(4000, 0)).unwrap();
    let write = |dest: std::path::PathBuf, column_keys: Vec<(String, PrimaryKeyId)>| {
        let (kms, primary, csv) = (f.kms.clone(), f.primary.clone(), csv.clone());
        async move {
            let options = EncryptOptions {
                partitions: 2,
                to: Some(OutputFormat::Parquet),
                parquet: PmeOptions {
                    column_keys,
                    plaintext_footer: false,
                },
                ..EncryptOptions::default()
            };
            encrypt_paths(kms.as_ref(), &primary, &csv, &dest, &options, &NoProgress)
                .await
                .unwrap();
            dest
        }
    };
    let dataset = write(
        f.dir.path().join("pq"),
        vec![("name".to_string(), secret.clone())],
    )
    .await;
    let other = write(f.dir.path().join("other"), Vec::new()).await;
    let parts: Vec<String> = ["part-00000.parquet", "part-00001.parquet"]
        .map(String::from)
        .to_vec();
    for part in &parts {
        assert!(dataset.join(part).exists(), "{part}");
    }

    // The owner reads everything.
    let owner = PpmlSession::encrypted(f.kms.clone(), Some(2));
    owner.register_dataset("t", &dataset, None).await.unwrap();
    let plain = PpmlSession::plaintext(Some(2));
    plain.register_dataset("t", &csv, None).await.unwrap();
    assert_eq!(
        people_totals(&owner, "t").await,
        people_totals(&plain, "t").await
    );
    let names = "SELECT name FROM t ORDER BY name LIMIT 3";
    assert_eq!(
        collect_text(&owner, names).await.unwrap(),
        collect_text(&plain, names).await.unwrap()
    );

    // A reader refused the name column's key reads the other columns, and is denied that one.
    let refusing = Arc::new(RefusingKms {
        inner: f.kms.clone(),
        refused: secret.clone(),
    });
    let reader = PpmlSession::encrypted(refusing.clone(), Some(2));
    let verified = reader
        .register_dataset("t", &dataset, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(verified.refused_columns().0, vec!["name".to_string()]);
    let ages = "SELECT job, count(*) AS n, sum(age) AS s FROM t GROUP BY job ORDER BY job";
    assert_eq!(
        collect_text(&reader, ages).await.unwrap(),
        collect_text(&plain, ages).await.unwrap()
    );
    let denied = collect_text(&reader, names).await.unwrap_err();
    assert!(
        denied.contains("access denied to column(s) name") && denied.contains("not granted"),
        "{denied}"
    );
    // Withholding the dataset's own key withholds everything.
    let nothing = PpmlSession::encrypted(
        Arc::new(RefusingKms {
            inner: f.kms.clone(),
            refused: f.primary.clone(),
        }),
        Some(2),
    );
    let refused = nothing
        .register_dataset("t", &dataset, None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not granted"), "{refused}");

    // Every tampering is detected, with a specific error.
    type Edit = Box<dyn Fn(&Path)>;
    let flip = |name: &'static str, from_end: Option<usize>| -> Edit {
        Box::new(move |dir: &Path| {
            let path = dir.join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = match from_end {
                Some(n) => bytes.len() - n,
                None => bytes.len() / 3,
            };
            bytes[at] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        })
    };
    let other_part = other.join("part-00000.parquet");
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "a flipped byte in a page",
            flip("part-00000.parquet", None),
            "failed authentication",
        ),
        (
            "a flipped byte in the footer",
            flip("part-00000.parquet", Some(30)),
            "footer",
        ),
        (
            "a flipped byte in the manifest",
            Box::new(|dir: &Path| {
                // Moves the column key's protection from `name` to `age`.
                let path = dir.join("_manifest.ppml.json");
                let mut manifest: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                manifest["column_keys"][0]["columns"][0] = "age".into();
                std::fs::write(&path, manifest.to_string()).unwrap();
            }),
            "manifest authentication failed",
        ),
        (
            "a truncated part",
            Box::new(|dir: &Path| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("part-00001.parquet"))
                    .unwrap();
                let len = file.metadata().unwrap().len();
                file.set_len(len - 10).unwrap();
            }),
            "size",
        ),
        (
            "a removed part",
            Box::new(|dir: &Path| std::fs::remove_file(dir.join("part-00001.parquet")).unwrap()),
            "part-00001.parquet",
        ),
        (
            "an added part",
            Box::new(move |dir: &Path| {
                std::fs::copy(
                    dir.join("part-00001.parquet"),
                    dir.join("part-00002.parquet"),
                )
                .unwrap();
            }),
            "part-00002.parquet",
        ),
        (
            "swapped parts",
            Box::new(|dir: &Path| {
                let (a, b) = (
                    dir.join("part-00000.parquet"),
                    dir.join("part-00001.parquet"),
                );
                let tmp = dir.join("swap");
                std::fs::rename(&a, &tmp).unwrap();
                std::fs::rename(&b, &a).unwrap();
                std::fs::rename(&tmp, &b).unwrap();
            }),
            "part-0000",
        ),
        (
            "a part replayed from another dataset of the same primary key",
            Box::new(move |dir: &Path| {
                std::fs::copy(&other_part, dir.join("part-00000.parquet")).unwrap();
            }),
            "part-00000.parquet",
        ),
    ];
    for (i, (what, edit, expected)) in cases.into_iter().enumerate() {
        let copy = f.dir.path().join(format!("tampered-{i}"));
        copy_dir(&dataset, &copy);
        edit(&copy);
        let session = PpmlSession::encrypted(f.kms.clone(), Some(2));
        let error = match session.register_dataset("t", &copy, None).await {
            Err(e) => e.to_string(),
            Ok(_) => collect_text(&session, "SELECT * FROM t")
                .await
                .expect_err(what),
        };
        assert!(error.contains(expected), "{what}: {error}");
        // Query output of a failed read is never left behind.
        let out = f.dir.path().join(format!("out-{i}"));
        if let Ok(df) = session.sql("SELECT * FROM t").await {
            let target = crate::OutputTarget::Encrypted {
                kms: f.kms.as_ref(),
                primary: &f.primary,
                dir: out.clone().into(),
                options: WriteOptions::default(),
            };
            assert!(
                session
                    .write(df, target, None, OutputFormat::Parquet)
                    .await
                    .is_err(),
                "{what}"
            );
        }
        assert!(!out.exists(), "{what}: output left behind");
    }

    // The AAD prefix binds a part to its dataset and name: part 0 read as part 1 (a swap of
    // two parts of one size) or as a part of another dataset fails in its first module.
    let crate::dataset::PartBody::Pme(part) = &verified.parts[0].body else {
        panic!("a PME part")
    };
    let id = *verified.manifest.dataset_id();
    for (dataset_id, name) in [(id, "part-00001.parquet"), ([7; 16], "part-00000.parquet")] {
        let misnamed = crate::pme::PmePart::new(part.keys.clone(), &dataset_id, name);
        let options = datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions::new()
            .with_file_decryption_properties(misnamed.decryption_properties().unwrap());
        let opened = datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new_with_options(
            std::fs::File::open(dataset.join("part-00000.parquet")).unwrap(),
            options,
        );
        assert!(opened.is_err(), "{name}");
    }
    let rightly = crate::pme::PmePart::new(part.keys.clone(), &id, "part-00000.parquet");
    let options = datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions::new()
        .with_file_decryption_properties(rightly.decryption_properties().unwrap());
    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new_with_options(
        std::fs::File::open(dataset.join("part-00000.parquet")).unwrap(),
        options,
    )
    .unwrap();

    // A part changed after its dataset was verified fails when it is read (the AAD prefix
    // and the keys come from the verified manifest, not from the file).
    let late = f.dir.path().join("late");
    copy_dir(&dataset, &late);
    let session = PpmlSession::encrypted(f.kms.clone(), Some(2));
    session.register_dataset("t", &late, None).await.unwrap();
    let a = late.join("part-00000.parquet");
    let mut bytes = std::fs::read(&a).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&a, bytes).unwrap();
    let error = collect_text(&session, "SELECT * FROM t").await.unwrap_err();
    assert!(error.contains("failed authentication"), "{error}");
}
