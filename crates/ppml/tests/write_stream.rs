//! Rows an application holds (an Arrow stream, not a query) written as an encrypted dataset:
//! dealt to parts in turn, ciphertext on disk, read back whole; a stream that fails midway
//! leaves no dataset. Also: a dataset read as another format than its own is refused, and a
//! DataFrame registered as a view is a table of later queries.

use std::sync::Arc;

use futures::StreamExt as _;
use ppml::config::{GivenSettings, Settings};
use ppml::datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use ppml::datafusion::arrow::datatypes::{DataType, Field, Schema};
use ppml::datafusion::execution::SendableRecordBatchStream;
use ppml::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use ppml::{OutputFormat, PpmlContext, WriteOptions};

fn rows(batches: usize, fail_at: Option<usize>) -> (SendableRecordBatchStream, Arc<Schema>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("secret", DataType::Utf8, false),
    ]));
    let batch_schema = schema.clone();
    let stream = futures::stream::iter(0..batches).map(move |b| {
        if Some(b) == fail_at {
            return Err(ppml::datafusion::error::DataFusionError::Execution(
                "the producer failed".into(),
            ));
        }
        let ids: Vec<i64> = (0..100).map(|i| (b * 100 + i) as i64).collect();
        let secrets: Vec<String> = ids.iter().map(|i| format!("secret-{i:06}")).collect();
        Ok(RecordBatch::try_new(
            batch_schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(secrets)),
            ],
        )
        .unwrap())
    });
    (
        Box::pin(RecordBatchStreamAdapter::new(schema.clone(), stream)),
        schema,
    )
}

async fn context(dir: &std::path::Path) -> PpmlContext<ppml::Unattested> {
    let settings = Settings::resolve(GivenSettings {
        home: Some(dir.join("home")),
        ..GivenSettings::default()
    })
    .unwrap();
    PpmlContext::builder()
        .settings(settings)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_stream_is_written_in_parts_and_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path()).await;
    let out = dir.path().join("held.enc");
    let (stream, _) = rows(30, None);
    let options = WriteOptions {
        format: OutputFormat::Json,
        partitions: Some(4),
        ..WriteOptions::default()
    };
    let summary = ctx.write_stream(stream, &out, options).await.unwrap();
    assert_eq!((summary.rows, summary.parts), (3000, 4));
    for part in std::fs::read_dir(&out).unwrap() {
        let bytes = std::fs::read(part.unwrap().path()).unwrap();
        assert!(!bytes.windows(7).any(|w| w == b"secret-"));
    }
    ctx.register("held", &out).await.unwrap();
    let batches = ctx
        .collect(ctx.sql("SELECT count(*), sum(id) FROM held").await.unwrap())
        .await
        .unwrap();
    let count = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let sum = batches[0]
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(
        (count.value(0), sum.value(0)),
        (3000, (0..3000).sum::<i64>())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_midway_leaves_no_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path()).await;
    let out = dir.path().join("failed.enc");
    let (stream, _) = rows(30, Some(17));
    let options = WriteOptions {
        partitions: Some(3),
        ..WriteOptions::default()
    };
    let error = ctx.write_stream(stream, &out, options).await.unwrap_err();
    let chain = ppml::crates::kms::error_chain(&error);
    assert!(chain.contains("the producer failed"), "{chain}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "home")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_read_as_another_format_is_refused_and_a_view_joins_queries() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path()).await;
    let dataset = dir.path().join("rows.enc");
    let (stream, _) = rows(3, None);
    let options = WriteOptions {
        format: OutputFormat::Json,
        ..Default::default()
    };
    ctx.write_stream(stream, &dataset, options).await.unwrap();

    let refused = ctx.read_csv(&dataset).await.unwrap_err();
    assert_eq!(refused.kind(), ppml::ErrorKind::InvalidInput, "{refused}");
    assert!(refused.to_string().contains("not CSV"), "{refused}");
    let refused = ctx
        .read_as(&dataset, ppml::MediaKind::Parquet)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not Parquet"), "{refused}");

    let json = ctx.read_as(&dataset, ppml::MediaKind::Json).await.unwrap();
    let evens = json
        .clone()
        .filter(json.parse_sql_expr("id % 2 = 0").unwrap())
        .unwrap();
    ctx.register_view("evens", evens).unwrap();
    let counted = ctx
        .collect(ctx.sql("SELECT count(*) AS c FROM evens").await.unwrap())
        .await
        .unwrap();
    let c = counted[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(c, 150);
    assert!(
        ctx.register_view("bad name", ctx.sql("SELECT 1").await.unwrap())
            .is_err()
    );
}
