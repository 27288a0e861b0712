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
    encrypted.register_csv("people", &dest, None).await.unwrap();
    let plaintext = PpmlSession::plaintext(Some(2));
    plaintext
        .register_csv("people", &plain_dir, None)
        .await
        .unwrap();
    let mut results = Vec::new();
    for session in [&encrypted, &plaintext] {
        let batches = session
            .context()
            .sql(sql)
            .await
            .unwrap()
            .collect()
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
        results.push((col(0), col(1)));
    }
    assert_eq!(results[0], results[1]);
    assert!(results[0].0 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_queries_are_accepted_as_sql() {
    let f = fixture().await;
    let dest = write_dataset(&f, "people", &[people(20, 0)]).await;
    let session = PpmlSession::encrypted(f.kms.clone(), None);
    session.register_csv("people", &dest, None).await.unwrap();
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
    session.register_csv("people", &dest, None).await.unwrap();
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
        .register_csv("people", &dest, None)
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
