//! `ppml submit --job-file FILE`: the options of a submission in a TOML file.
//!
//! The keys are the long options of `ppml submit` with `_` for `-`, and the application is a
//! `[simple_query]` or `[query]` table with the options of that subcommand. Options on the
//! command line win over the file; `conf` entries of both are applied, the command line's
//! last. Relative paths in the file are relative to the file's directory.
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

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use ppml_engine::DatasetLocation;

use crate::cli::{QueryArgs, SimpleQueryArgs, SubmitApp, SubmitArgs, SubmitMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
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
    simple_query: Option<SimpleQueryTable>,
    query: Option<QueryTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimpleQueryTable {
    input: String,
    output: String,
    input_partitions: Option<usize>,
    output_partitions: Option<usize>,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    plaintext: bool,
    #[serde(default)]
    no_preview: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryTable {
    sql: Option<String>,
    sql_file: Option<PathBuf>,
    /// Table name → dataset.
    tables: BTreeMap<String, String>,
    output: Option<String>,
    input_partitions: Option<usize>,
    output_partitions: Option<usize>,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    plaintext: bool,
}

/// `path` relative to `base` unless it is absolute.
fn relative_to(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// A dataset of the file: a URL, or a path relative to `base`.
fn dataset(base: &Path, text: &str) -> Result<DatasetLocation> {
    Ok(match DatasetLocation::parse(text)? {
        DatasetLocation::Local(path) => DatasetLocation::Local(relative_to(base, path)),
        url => url,
    })
}

fn parse_mode(text: &str) -> Result<SubmitMode> {
    use clap::ValueEnum;
    SubmitMode::from_str(text, false).map_err(|_| {
        anyhow::anyhow!("mode = {text:?}: expected local, local-tee, client or cluster")
    })
}

/// `args` with the options of its `--job-file` filled in (none: `args` unchanged); fails if
/// no application is given at all.
pub fn merge(mut args: SubmitArgs) -> Result<SubmitArgs> {
    if let Some(path) = args.job_file.clone() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--job-file {}", path.display()))?;
        let file: JobFile =
            toml::from_str(&text).with_context(|| format!("--job-file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        apply(&mut args, file, &base).with_context(|| format!("--job-file {}", path.display()))?;
    }
    if args.app.is_none() {
        bail!(
            "no application: give `simple-query …` or `query …`, or a --job-file with a [simple_query] or [query] table"
        );
    }
    Ok(args)
}

fn apply(args: &mut SubmitArgs, file: JobFile, base: &Path) -> Result<()> {
    if args.mode.is_none() {
        args.mode = file.mode.as_deref().map(parse_mode).transpose()?;
    }
    args.master = args.master.take().or(file.master);
    args.name = args.name.take().or(file.name);
    args.driver_cores = args.driver_cores.or(file.driver_cores);
    args.driver_memory = args.driver_memory.take().or(file.driver_memory);
    args.executor_cores = args.executor_cores.or(file.executor_cores);
    args.num_executors = args.num_executors.or(file.num_executors);
    let mut conf: Vec<String> = file
        .conf
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    conf.append(&mut args.conf);
    args.conf = conf;
    args.detach |= file.detach.unwrap_or(false);
    if args.tls.cluster_tls.is_none() && !args.tls.insecure_cleartext {
        args.tls.cluster_tls = file.cluster_tls.map(|p| relative_to(base, p));
        args.tls.insecure_cleartext = file.insecure_cleartext.unwrap_or(false);
        if args.tls.cluster_tls.is_some() && args.tls.insecure_cleartext {
            bail!("cluster_tls and insecure_cleartext exclude each other");
        }
    }
    let app = match (file.simple_query, file.query) {
        (Some(_), Some(_)) => bail!("give one of [simple_query] and [query], not both"),
        (Some(sq), None) => Some(SubmitApp::SimpleQuery(SimpleQueryArgs {
            input: dataset(base, &sq.input)?,
            output: dataset(base, &sq.output)?,
            input_partitions: sq.input_partitions,
            output_partitions: sq.output_partitions,
            overwrite: sq.overwrite,
            plaintext: sq.plaintext,
            no_preview: sq.no_preview,
        })),
        (None, Some(q)) => {
            if q.sql.is_some() == q.sql_file.is_some() {
                bail!("[query] needs exactly one of sql and sql_file");
            }
            if q.tables.is_empty() {
                bail!("[query] needs at least one table (tables = {{ name = \"DIR\" }})");
            }
            Some(SubmitApp::Query(QueryArgs {
                sql: q.sql,
                sql_file: q.sql_file.map(|p| relative_to(base, p)),
                tables: q
                    .tables
                    .into_iter()
                    .map(|(name, text)| Ok(format!("{name}={}", dataset(base, &text)?)))
                    .collect::<Result<_>>()?,
                output: q.output.map(|text| dataset(base, &text)).transpose()?,
                input_partitions: q.input_partitions,
                output_partitions: q.output_partitions,
                overwrite: q.overwrite,
                plaintext: q.plaintext,
            }))
        }
        (None, None) => None,
    };
    if args.app.is_none() {
        args.app = app;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn submit_args(argv: &[&str]) -> SubmitArgs {
        let mut full = vec!["ppml", "submit"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Submit(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            r#"
mode = "cluster"
master = "file:1"
name = "from file"
cluster_tls = "tls"
detach = true
conf = { "datafusion.execution.batch_size" = "1024" }

[query]
sql = "SELECT 1"
tables = { people = "people.enc", other = "/abs/other.enc" }
output = "s3://bucket/out"
"#,
        );
        let args = merge(submit_args(&[
            "--job-file",
            file.to_str().unwrap(),
            "--master",
            "cli:2",
            "--conf",
            "datafusion.execution.batch_size=2048",
        ]))
        .unwrap();
        assert_eq!(args.mode, Some(SubmitMode::Cluster));
        assert_eq!(args.master.as_deref(), Some("cli:2"));
        assert_eq!(args.name.as_deref(), Some("from file"));
        assert!(args.detach);
        assert_eq!(args.tls.cluster_tls, Some(dir.path().join("tls")));
        assert_eq!(
            args.conf,
            [
                "datafusion.execution.batch_size=1024",
                "datafusion.execution.batch_size=2048"
            ]
        );
        let Some(SubmitApp::Query(query)) = &args.app else {
            panic!("{:?}", args.app)
        };
        assert_eq!(query.sql.as_deref(), Some("SELECT 1"));
        assert_eq!(
            query.tables,
            [
                "other=/abs/other.enc".to_string(),
                format!("people={}", dir.path().join("people.enc").display())
            ]
        );
        assert_eq!(
            query.output.as_ref().map(|o| o.to_string()),
            Some("s3://bucket/out".to_string())
        );
    }

    #[test]
    fn the_command_line_application_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "mode = \"local\"\n[simple_query]\ninput = \"a\"\noutput = \"b\"\n",
        );
        let args = merge(submit_args(&[
            "--mode",
            "client",
            "--job-file",
            file.to_str().unwrap(),
            "simple-query",
            "--input",
            "x",
            "--output",
            "y",
        ]))
        .unwrap();
        assert_eq!(args.mode, Some(SubmitMode::Client));
        let Some(SubmitApp::SimpleQuery(app)) = &args.app else {
            panic!()
        };
        assert_eq!(app.input.as_local(), Some(Path::new("x")));
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
                "[simple_query]\ninput = \"a\"\noutput = \"b\"\n[query]\nsql = \"x\"\ntables = { a = \"x\" }\n",
                "not both",
            ),
            ("master = \"x\"\n", "no application"),
        ] {
            let file = write(dir.path(), text);
            let error = merge(submit_args(&["--job-file", file.to_str().unwrap()])).unwrap_err();
            assert!(
                format!("{error:#}").contains(expected),
                "{text:?}: {error:#}"
            );
        }
        let missing = merge(submit_args(&["--job-file", "/nonexistent/job.toml"])).unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/job.toml"));
    }
}
