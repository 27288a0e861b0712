//! The applications ppml runs by name, described once: [`AppSpec`].
//!
//! The same description is run in every placement: in this process, with a cluster's
//! executors (client mode), and by a cluster-mode driver on an executor, to which it travels
//! as JSON inside the job's plan (`ppml_cluster::driver`). Where the plans run is the
//! [`PpmlSession`]'s business ([`crate::PlanRunner`]); where the result goes is the
//! [`Sink`]'s.

use std::collections::BTreeMap;

use datafusion::arrow::array::RecordBatch;
use ppml_kms::grant::{GrantedApp, JobGrant};
use ppml_kms::{KeyManagementService, PrimaryKeyId};
use serde::{Deserialize, Serialize};

use crate::dataset::{Durability, WriteOptions};
use crate::receipt::JobDescription;
use crate::simple_query::{self, SimpleQueryReport};
use crate::{
    DatasetLocation, EngineError, OutputFormat, OutputTarget, PpmlSession, Result, WriteSummary,
};

/// SimpleQuery of the reference workflow (`crate::simple_query`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleQuerySpec {
    /// The people dataset (`name,age,job`).
    pub input: DatasetLocation,
    /// Where the matching rows are written.
    pub output: DatasetLocation,
    /// Parallelism of the scan [default: the session's].
    #[serde(default)]
    pub input_partitions: Option<usize>,
    /// Output part files [default: as the plan produces].
    #[serde(default)]
    pub output_partitions: Option<usize>,
    /// Replace an existing output.
    #[serde(default)]
    pub overwrite: bool,
    /// Plaintext CSV in and out, no KMS (comparisons and benchmarks; local only).
    #[serde(default)]
    pub plaintext: bool,
    /// Skip the `name, age + 1` preview (which would leave the runtime on stdout).
    #[serde(default)]
    pub no_preview: bool,
}

/// SQL over named tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSpec {
    /// The query (only queries: no DDL, DML or `SET`).
    pub sql: String,
    /// Table name → dataset.
    pub tables: BTreeMap<String, DatasetLocation>,
    /// Where the result is written as a dataset; `None` collects it (local and client modes).
    #[serde(default)]
    pub output: Option<DatasetLocation>,
    /// Parallelism of the scans [default: the session's].
    #[serde(default)]
    pub input_partitions: Option<usize>,
    /// Output part files.
    #[serde(default)]
    pub output_partitions: Option<usize>,
    /// The format of the output's parts.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Replace an existing output.
    #[serde(default)]
    pub overwrite: bool,
    /// Tables are plaintext CSV, the output plaintext (comparisons and benchmarks; local only).
    #[serde(default)]
    pub plaintext: bool,
}

impl SqlSpec {
    /// Parses a `NAME=LOCATION` table argument. Table names are ASCII letters, digits and `_`.
    pub fn parse_table(spec: &str) -> Result<(String, DatasetLocation)> {
        let invalid = |reason: &str| EngineError::InvalidInput {
            path: spec.to_string(),
            reason: reason.to_string(),
        };
        let Some((name, location)) = spec.split_once('=') else {
            return Err(invalid("expected NAME=DIR or NAME=s3://BUCKET/PREFIX"));
        };
        check_table_name(name).map_err(|_| invalid("table names are letters, digits and _"))?;
        Ok((name.to_string(), DatasetLocation::parse(location)?))
    }
}

/// Refuses a write the data owner's job grant does not allow ([`EngineError::NotGranted`]): to
/// another location than the grant's output, under another key, or replacing an existing
/// dataset when the grant does not allow it.
pub fn check_granted_output(
    grant: &JobGrant,
    output: &DatasetLocation,
    key: &PrimaryKeyId,
    overwrite: bool,
) -> Result<()> {
    let refuse = |reason: String| Err(EngineError::NotGranted(reason));
    let Some(granted) = &grant.output else {
        return refuse(format!("job {} writes no output", grant.job_id));
    };
    if DatasetLocation::parse(&granted.location)?.absolute()? != output.absolute()? {
        return refuse(format!(
            "job {} writes to {}, not to {output}",
            grant.job_id, granted.location
        ));
    }
    if granted.key_id != key.0 {
        return refuse(format!(
            "job {} writes under key {}, not {key}",
            grant.job_id, granted.key_id
        ));
    }
    if overwrite && !granted.overwrite {
        return refuse(format!(
            "job {} may not replace an existing {output}",
            grant.job_id
        ));
    }
    Ok(())
}

/// Refuses a table name that is not letters, digits and `_`.
pub fn check_table_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(EngineError::InvalidInput {
            path: name.to_string(),
            reason: "table names are letters, digits and _".into(),
        });
    }
    Ok(())
}

/// An application and its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum AppSpec {
    /// SimpleQuery.
    SimpleQuery(SimpleQuerySpec),
    /// SQL over named tables.
    Sql(SqlSpec),
}

/// Where an application writes its result.
#[derive(Clone, Copy)]
pub enum Sink<'a> {
    /// A new encrypted dataset under a fresh data key wrapped under `primary`.
    Encrypted {
        /// The KMS that generates and wraps the data key.
        kms: &'a dyn KeyManagementService,
        /// The primary key (typically the owner's output key).
        primary: &'a PrimaryKeyId,
        /// Sync before the output appears.
        durability: Durability,
        /// The data owner's grant the job runs under, as its receipt names it (when the KMS
        /// client does not carry it itself: an unattested one).
        grant: Option<&'a ppml_kms::GrantRecord>,
    },
    /// Plaintext CSV parts in a local directory (only for [`AppSpec::is_plaintext`] specs).
    Plaintext {
        /// Sync before the output appears.
        durability: Durability,
    },
}

impl std::fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Encrypted { primary, .. } => write!(f, "Sink::Encrypted({primary})"),
            Sink::Plaintext { .. } => f.write_str("Sink::Plaintext"),
        }
    }
}

/// What an SQL application produced.
#[derive(Debug)]
pub struct SqlReport {
    /// Rows of the result.
    pub rows: u64,
    /// What was written, when the spec has an output.
    pub written: Option<WriteSummary>,
    /// The collected result, when it has none.
    pub batches: Vec<RecordBatch>,
}

/// What an application produced.
#[derive(Debug)]
#[non_exhaustive]
pub enum AppReport {
    /// SimpleQuery's count, preview, output and phase timings.
    SimpleQuery(SimpleQueryReport),
    /// The SQL result.
    Sql(SqlReport),
}

impl AppReport {
    /// Rows written (or collected).
    pub fn rows(&self) -> u64 {
        match self {
            AppReport::SimpleQuery(report) => report.output.rows,
            AppReport::Sql(report) => report.rows,
        }
    }
}

impl AppSpec {
    /// Plaintext in, plaintext out (no KMS; local only).
    pub fn is_plaintext(&self) -> bool {
        match self {
            AppSpec::SimpleQuery(spec) => spec.plaintext,
            AppSpec::Sql(spec) => spec.plaintext,
        }
    }

    /// The scans' parallelism the spec asks for.
    pub fn input_partitions(&self) -> Option<usize> {
        match self {
            AppSpec::SimpleQuery(spec) => spec.input_partitions,
            AppSpec::Sql(spec) => spec.input_partitions,
        }
    }

    /// Where the result is written, if it is.
    pub fn output(&self) -> Option<&DatasetLocation> {
        match self {
            AppSpec::SimpleQuery(spec) => Some(&spec.output),
            AppSpec::Sql(spec) => spec.output.as_ref(),
        }
    }

    /// One line for logs and plan displays: the application's kind, its inputs and output,
    /// never a value or the SQL text.
    pub fn summary(&self) -> String {
        match self {
            AppSpec::SimpleQuery(spec) => format!("SimpleQuery {} -> {}", spec.input, spec.output),
            AppSpec::Sql(spec) => {
                let names: Vec<&str> = spec.tables.keys().map(String::as_str).collect();
                match &spec.output {
                    Some(output) => format!("SQL over {} -> {output}", names.join(", ")),
                    None => format!("SQL over {}", names.join(", ")),
                }
            }
        }
    }

    /// The datasets the application reads.
    pub fn inputs(&self) -> Vec<&DatasetLocation> {
        match self {
            AppSpec::SimpleQuery(spec) => vec![&spec.input],
            AppSpec::Sql(spec) => spec.tables.values().collect(),
        }
    }

    /// Whether the spec may replace an existing output.
    pub fn overwrite(&self) -> bool {
        match self {
            AppSpec::SimpleQuery(spec) => spec.overwrite,
            AppSpec::Sql(spec) => spec.overwrite,
        }
    }

    /// Refuses a spec the data owner's job grant does not allow ([`EngineError::NotGranted`]):
    /// another application or SQL text, an output at another location or under another key
    /// than `output_key`, or an overwrite the grant does not allow. The inputs are the KMS's
    /// to check: it releases the data keys of the datasets the grant names, and no others.
    pub fn check_grant(&self, grant: &JobGrant, output_key: &PrimaryKeyId) -> Result<()> {
        let refuse = |reason: String| Err(EngineError::NotGranted(reason));
        match (&grant.application, self) {
            (GrantedApp::SimpleQuery, AppSpec::SimpleQuery(_)) => {}
            (GrantedApp::Sql { sql }, AppSpec::Sql(spec)) => {
                if *sql != spec.sql {
                    return refuse(format!(
                        "the SQL text is not the one job {} grants",
                        grant.job_id
                    ));
                }
            }
            _ => {
                return refuse(format!(
                    "job {} grants another application than {}",
                    grant.job_id,
                    self.summary()
                ));
            }
        }
        match self.output() {
            Some(output) => check_granted_output(grant, output, output_key, self.overwrite()),
            None => Ok(()),
        }
    }

    /// The spec with every local path made absolute, as another process (an executor) must
    /// see it.
    pub fn with_absolute_paths(&self) -> Result<AppSpec> {
        Ok(match self {
            AppSpec::SimpleQuery(spec) => AppSpec::SimpleQuery(SimpleQuerySpec {
                input: spec.input.absolute()?,
                output: spec.output.absolute()?,
                ..spec.clone()
            }),
            AppSpec::Sql(spec) => AppSpec::Sql(SqlSpec {
                tables: spec
                    .tables
                    .iter()
                    .map(|(name, location)| Ok((name.clone(), location.absolute()?)))
                    .collect::<Result<_>>()?,
                output: spec.output.as_ref().map(|o| o.absolute()).transpose()?,
                ..spec.clone()
            }),
        })
    }

    /// What this application's job receipt says it is: its name and its spec, with absolute
    /// locations (`docs/receipts.md`).
    pub fn job_description(&self) -> Result<JobDescription> {
        let spec = serde_json::to_value(self.with_absolute_paths()?).map_err(|e| {
            EngineError::Receipt(format!("the application does not serialize: {e}"))
        })?;
        let (app, spec) = match spec {
            serde_json::Value::Object(map) if map.len() == 1 => {
                map.into_iter().next().expect("one entry")
            }
            other => ("application".to_string(), other),
        };
        Ok(JobDescription::new(app, spec))
    }

    /// Runs the application in `session` (whose runner decides where its plans run) and
    /// writes the result to `sink`. A plaintext spec needs a plaintext session and sink; an
    /// encrypted one an encrypted sink.
    pub async fn run(&self, session: &PpmlSession, sink: Sink<'_>) -> Result<AppReport> {
        if self.is_plaintext() != matches!(sink, Sink::Plaintext { .. }) {
            return Err(EngineError::InvalidInput {
                path: self.summary(),
                reason: "plaintext applications write plaintext, encrypted ones encrypted \
                         datasets"
                    .into(),
            });
        }
        let mut job = self.job_description()?;
        if let Sink::Encrypted {
            grant: Some(grant), ..
        } = sink
        {
            job.grant = Some(grant.clone());
        }
        match self {
            AppSpec::SimpleQuery(spec) => {
                let output = target(&spec.output, spec.overwrite, sink, job)?;
                Ok(AppReport::SimpleQuery(
                    simple_query::run(
                        session,
                        &spec.input,
                        output,
                        spec.output_partitions,
                        !spec.no_preview,
                    )
                    .await?,
                ))
            }
            AppSpec::Sql(spec) => {
                for (name, location) in &spec.tables {
                    check_table_name(name)?;
                    session.register_dataset(name, location, None).await?;
                }
                let df = session.sql(&spec.sql).await?;
                Ok(AppReport::Sql(match &spec.output {
                    Some(output) => {
                        let written = session
                            .write(
                                df,
                                target(output, spec.overwrite, sink, job)?,
                                spec.output_partitions,
                                spec.output_format,
                            )
                            .await?;
                        SqlReport {
                            rows: written.rows,
                            written: Some(written),
                            batches: Vec::new(),
                        }
                    }
                    None => {
                        let batches = session.collect(df).await?;
                        SqlReport {
                            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
                            written: None,
                            batches,
                        }
                    }
                }))
            }
        }
    }
}

/// The output target of `location` in `sink`, for `job`.
fn target<'a>(
    location: &'a DatasetLocation,
    overwrite: bool,
    sink: Sink<'a>,
    job: JobDescription,
) -> Result<OutputTarget<'a>> {
    Ok(match sink {
        Sink::Encrypted {
            kms,
            primary,
            durability,
            ..
        } => OutputTarget::Encrypted {
            kms,
            primary,
            dir: location.clone(),
            options: WriteOptions {
                overwrite,
                durability,
                job: Some(job),
                ..WriteOptions::default()
            },
        },
        Sink::Plaintext { durability } => OutputTarget::Plaintext {
            dir: location
                .as_local()
                .ok_or_else(|| EngineError::InvalidLocation {
                    location: location.to_string(),
                    reason: "a plaintext output is written to a local directory only".into(),
                })?,
            overwrite,
            durability,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_travel_as_json_and_refuse_unknown_fields() {
        let spec = AppSpec::Sql(SqlSpec {
            sql: "SELECT 1".into(),
            tables: [(
                "people".to_string(),
                DatasetLocation::parse("s3://b-1/p").unwrap(),
            )]
            .into(),
            output: Some(DatasetLocation::parse("/out").unwrap()),
            input_partitions: Some(2),
            output_partitions: None,
            output_format: OutputFormat::Parquet,
            overwrite: false,
            plaintext: false,
        });
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<AppSpec>(&json).unwrap(), spec);
        assert!(json.contains(r#""people":"s3://b-1/p""#), "{json}");
        assert!(
            serde_json::from_str::<AppSpec>(
                r#"{"simple_query":{"input":"a","output":"b","extra":1}}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<AppSpec>(r#"{"copy":{}}"#).is_err());
    }

    #[test]
    fn summaries_name_no_values() {
        let spec = AppSpec::Sql(SqlSpec {
            sql: "SELECT * FROM people WHERE name = 'secret'".into(),
            tables: [("people".to_string(), DatasetLocation::parse("/in").unwrap())].into(),
            output: Some(DatasetLocation::parse("/out").unwrap()),
            input_partitions: None,
            output_partitions: None,
            output_format: OutputFormat::Csv,
            overwrite: false,
            plaintext: false,
        });
        assert_eq!(spec.summary(), "SQL over people -> /out");
    }

    #[test]
    fn table_arguments_are_checked() {
        assert_eq!(
            SqlSpec::parse_table("people=s3://bucket/people").unwrap().0,
            "people"
        );
        for bad in ["people", "=x", "a-b=x", "a b=x"] {
            assert!(SqlSpec::parse_table(bad).is_err(), "{bad}");
        }
    }
}
