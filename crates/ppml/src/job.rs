//! Job files: a submission's options and its application in TOML (`ppml submit --job-file`,
//! `docs/cluster.md` §4).
//!
//! The keys are the long options of `ppml submit` with `_` for `-`, and the application is a
//! `[simple_query]` table (a [`SimpleQuerySpec`]) or a `[query]` table (an [`SqlSpec`] whose
//! SQL may instead be in `sql_file`). Relative paths in the file are relative to its
//! directory.
//!
//! ```toml
//! mode = "cluster"
//! master = "scheduler.example:50050"
//! cluster_tls = "tls"
//! name = "nightly developers"
//! detach = true
//! conf = { "datafusion.execution.batch_size" = "8192" }
//!
//! [simple_query]
//! input = "/shared/people.enc"
//! output = "/shared/developers.enc"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ppml_engine::DatasetLocation;
use ppml_engine::app::{AppSpec, SimpleQuerySpec, SqlSpec, check_table_name};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Where a submitted application runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubmitMode {
    /// In the submitting process, no TEE.
    Local,
    /// In the submitting process, attested.
    LocalTee,
    /// The submitting process is the driver; a cluster's executors compute.
    Client,
    /// Driver and executors in the cluster; the submitter holds no key.
    Cluster,
}

impl std::str::FromStr for SubmitMode {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Ok(match text {
            "local" => SubmitMode::Local,
            "local-tee" => SubmitMode::LocalTee,
            "client" => SubmitMode::Client,
            "cluster" => SubmitMode::Cluster,
            _ => {
                return Err(Error::Config {
                    what: format!("mode = {text:?}"),
                    reason: "expected local, local-tee, client or cluster".into(),
                });
            }
        })
    }
}

/// A parsed job file, its paths resolved against the file's directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFile {
    /// `mode`.
    pub mode: Option<SubmitMode>,
    /// `master`: the scheduler, `host:port`.
    pub master: Option<String>,
    /// `name`: the job's name.
    pub name: Option<String>,
    /// `driver_cores`.
    pub driver_cores: Option<usize>,
    /// `driver_memory`, e.g. `2g`.
    pub driver_memory: Option<String>,
    /// `executor_cores`.
    pub executor_cores: Option<usize>,
    /// `num_executors`.
    pub num_executors: Option<usize>,
    /// `conf`: `datafusion.*` / `ballista.*` settings, by key.
    pub conf: BTreeMap<String, String>,
    /// `detach`.
    pub detach: Option<bool>,
    /// `cluster_tls`: the directory of the cluster certificates.
    pub cluster_tls: Option<PathBuf>,
    /// `insecure_cleartext`.
    pub insecure_cleartext: Option<bool>,
    /// The `[simple_query]` or `[query]` application.
    pub app: Option<AppSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobFile {
    mode: Option<String>,
    master: Option<String>,
    name: Option<String>,
    driver_cores: Option<usize>,
    driver_memory: Option<String>,
    executor_cores: Option<usize>,
    num_executors: Option<usize>,
    #[serde(default)]
    conf: BTreeMap<String, String>,
    detach: Option<bool>,
    cluster_tls: Option<PathBuf>,
    insecure_cleartext: Option<bool>,
    simple_query: Option<SimpleQuerySpec>,
    query: Option<QueryTable>,
}

/// `[query]`: an [`SqlSpec`] whose SQL may also come from a file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryTable {
    sql: Option<String>,
    sql_file: Option<PathBuf>,
    tables: BTreeMap<String, DatasetLocation>,
    output: Option<DatasetLocation>,
    input_partitions: Option<usize>,
    output_partitions: Option<usize>,
    #[serde(default)]
    output_format: ppml_engine::OutputFormat,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    plaintext: bool,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Config {
        what: format!("job file {}", path.display()),
        reason: reason.into(),
    }
}

impl JobFile {
    /// Reads, parses and checks the job file at `path`.
    pub fn load(path: &Path) -> Result<JobFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading job file {}", path.display()), e))?;
        let raw: RawJobFile = toml::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let relative = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        if raw.cluster_tls.is_some() && raw.insecure_cleartext == Some(true) {
            return Err(invalid(
                path,
                "cluster_tls and insecure_cleartext exclude each other",
            ));
        }
        let app = match (raw.simple_query, raw.query) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    path,
                    "give one of [simple_query] and [query], not both",
                ));
            }
            (Some(sq), None) => Some(AppSpec::SimpleQuery(SimpleQuerySpec {
                input: sq.input.relative_to(base),
                output: sq.output.relative_to(base),
                ..sq
            })),
            (None, Some(q)) => {
                let sql = match (q.sql, q.sql_file) {
                    (Some(sql), None) => sql,
                    (None, Some(file)) => {
                        let file = relative(file);
                        std::fs::read_to_string(&file).map_err(|e| {
                            Error::io(format!("reading sql_file {}", file.display()), e)
                        })?
                    }
                    _ => {
                        return Err(invalid(
                            path,
                            "[query] needs exactly one of sql and sql_file",
                        ));
                    }
                };
                if q.tables.is_empty() {
                    return Err(invalid(
                        path,
                        "[query] needs at least one table (tables = { name = \"DIR\" })",
                    ));
                }
                for name in q.tables.keys() {
                    check_table_name(name)?;
                }
                Some(AppSpec::Sql(SqlSpec {
                    sql,
                    tables: q
                        .tables
                        .into_iter()
                        .map(|(name, location)| (name, location.relative_to(base)))
                        .collect(),
                    output: q.output.map(|o| o.relative_to(base)),
                    input_partitions: q.input_partitions,
                    output_partitions: q.output_partitions,
                    output_format: q.output_format,
                    overwrite: q.overwrite,
                    plaintext: q.plaintext,
                }))
            }
            (None, None) => None,
        };
        Ok(JobFile {
            mode: raw
                .mode
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e: Error| invalid(path, e.to_string()))?,
            master: raw.master,
            name: raw.name,
            driver_cores: raw.driver_cores,
            driver_memory: raw.driver_memory,
            executor_cores: raw.executor_cores,
            num_executors: raw.num_executors,
            conf: raw.conf,
            detach: raw.detach,
            cluster_tls: raw.cluster_tls.map(relative),
            insecure_cleartext: raw.insecure_cleartext,
            app,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "mode = \"local-tee\"\ncluster_tls = \"tls\"\n[simple_query]\ninput = \"in.enc\"\n\
             output = \"s3://bucket/out\"\nno_preview = true\n",
        );
        let job = JobFile::load(&file).unwrap();
        assert_eq!(job.mode, Some(SubmitMode::LocalTee));
        assert_eq!(job.cluster_tls, Some(dir.path().join("tls")));
        let Some(AppSpec::SimpleQuery(app)) = job.app else {
            panic!("{:?}", job.app)
        };
        assert_eq!(
            app.input.as_local(),
            Some(dir.path().join("in.enc").as_path())
        );
        assert_eq!(app.output.to_string(), "s3://bucket/out");
        assert!(app.no_preview);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for (text, expected) in [
            ("mod = \"cluster\"\n", "unknown field"),
            ("mode = \"moon\"\n", "expected local"),
            ("[query]\ntables = { a = \"x\" }\n", "exactly one of sql"),
            ("[query]\nsql = \"x\"\ntables = {}\n", "at least one table"),
            (
                "[query]\nsql = \"x\"\ntables = { \"a-b\" = \"x\" }\n",
                "letters, digits",
            ),
            (
                "[simple_query]\ninput = \"a\"\noutput = \"b\"\n[query]\nsql = \"x\"\ntables = { a = \"x\" }\n",
                "not both",
            ),
            (
                "cluster_tls = \"t\"\ninsecure_cleartext = true\n",
                "exclude each other",
            ),
        ] {
            let file = write(dir.path(), text);
            let error = JobFile::load(&file).unwrap_err();
            assert!(error.to_string().contains(expected), "{text:?}: {error}");
        }
        let missing = JobFile::load(Path::new("/nonexistent/job.toml")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/job.toml"));
    }
}
