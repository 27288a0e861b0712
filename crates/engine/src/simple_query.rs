//! SimpleQuery, the example application of the reference workflow.
//!
//! Semantics of the original (BigDL's SimpleQuerySparkExample): read people (`name,age,job`,
//! header row), report `count(name)`, show a preview of `name, age + 1`, keep the rows with
//! `job = 'Developer' AND age BETWEEN 20 AND 40` (both ends inclusive) and write them, all
//! three columns with a header, encrypted. Three phases are timed: `loadInputs`,
//! `doSQLOperations` and `encryptAndSaveOutputs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::prelude::{DataFrame, col, lit};

use crate::{DatasetLocation, EngineError, OutputTarget, PpmlSession, Result, WriteSummary};

/// Number of rows in the `name, age + 1` preview, as Spark's `show()`.
pub const PREVIEW_ROWS: usize = 20;

/// Schema of people.csv.
pub fn people_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("age", DataType::Int64, true),
        Field::new("job", DataType::Utf8, true),
    ]))
}

/// The SimpleQuery filter, as a DataFrame transformation.
pub fn developers_aged_20_to_40(people: DataFrame) -> Result<DataFrame> {
    Ok(people.filter(
        col("job")
            .eq(lit("Developer"))
            .and(col("age").between(lit(20i64), lit(40i64))),
    )?)
}

/// What a SimpleQuery run printed and wrote.
#[derive(Debug)]
pub struct SimpleQueryReport {
    /// `count(name)` over the input.
    pub count: i64,
    /// The `name, age + 1` preview, formatted as a table.
    pub preview: String,
    /// What was written.
    pub output: WriteSummary,
    /// Durations of `loadInputs`, `doSQLOperations` and `encryptAndSaveOutputs`.
    pub timings: [(&'static str, Duration); 3],
}

/// Runs SimpleQuery on the people data at `input` (a directory or an `s3://` prefix) and
/// writes the matching rows to `output`.
/// With `preview` false the preview is not computed (it is empty in the report).
pub async fn run(
    session: &PpmlSession,
    input: impl Into<DatasetLocation>,
    output: OutputTarget<'_>,
    output_partitions: Option<usize>,
    preview: bool,
) -> Result<SimpleQueryReport> {
    let started = Instant::now();
    session
        .register_dataset("people", input, Some(people_schema()))
        .await?;
    let people = session.context().table("people").await?;
    let load_inputs = started.elapsed();

    let started = Instant::now();
    let counted = session
        .collect(
            people
                .clone()
                .aggregate(vec![], vec![count(col("name")).alias("count")])?,
        )
        .await?;
    let count = counted
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>())
        .filter(|a| !a.is_empty())
        .map(|a| a.value(0))
        .ok_or_else(|| {
            EngineError::DataFusion(datafusion::error::DataFusionError::Internal(
                "count returned no rows".into(),
            ))
        })?;
    let preview = if preview {
        let rows = session
            .collect(
                people
                    .clone()
                    .select(vec![col("name"), (col("age") + lit(1i64)).alias("age + 1")])?
                    .limit(0, Some(PREVIEW_ROWS))?,
            )
            .await?;
        pretty_format_batches(&rows)?.to_string()
    } else {
        String::new()
    };
    let developers = developers_aged_20_to_40(people)?;
    let do_sql = started.elapsed();

    let started = Instant::now();
    let written = session
        .write_csv(developers, output, output_partitions)
        .await?;
    let save = started.elapsed();

    Ok(SimpleQueryReport {
        count,
        preview,
        output: written,
        timings: [
            ("loadInputs", load_inputs),
            ("doSQLOperations", do_sql),
            ("encryptAndSaveOutputs", save),
        ],
    })
}
