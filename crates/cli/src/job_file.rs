//! `ppml submit --job-file FILE` ([`ppml::job::JobFile`]): options on the command line win
//! over the file's; `conf` entries of both are applied, the command line's last.

use anyhow::{Context, Result};
use ppml::AppSpec;
use ppml::job::{JobFile, SubmitMode as FileMode};

use crate::cli::{SubmitArgs, SubmitMode};

/// `args` with the options of its `--job-file` filled in (none: `args` unchanged), and the
/// application to submit: the command line's, else the file's. Fails if there is none.
pub fn merge(mut args: SubmitArgs) -> Result<(SubmitArgs, AppSpec)> {
    let mut from_file = None;
    if let Some(path) = args.job_file.clone() {
        let file =
            JobFile::load(&path).with_context(|| format!("--job-file {}", path.display()))?;
        from_file = file.app.clone();
        apply(&mut args, file);
    }
    let app = match &args.app {
        Some(app) => crate::query::submit_app_spec(app)?,
        None => from_file.context(
            "no application: give `simple-query …` or `query …`, or a --job-file with a \
             [simple_query] or [query] table",
        )?,
    };
    Ok((args, app))
}

/// Fills in what the command line left out.
fn apply(args: &mut SubmitArgs, file: JobFile) {
    args.mode = args.mode.or(file.mode.map(|mode| match mode {
        FileMode::LocalTee => SubmitMode::LocalTee,
        FileMode::Client => SubmitMode::Client,
        FileMode::Cluster => SubmitMode::Cluster,
        _ => SubmitMode::Local,
    }));
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
        args.tls.cluster_tls = file.cluster_tls;
        args.tls.insecure_cleartext = file.insecure_cleartext.unwrap_or(false);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use std::path::{Path, PathBuf};

    use ppml::DatasetLocation;

    use crate::cli::{Cli, Command};

    fn local(location: &DatasetLocation) -> &Path {
        location.as_local().unwrap()
    }

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
        let (args, app) = merge(submit_args(&[
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
        let AppSpec::Sql(query) = &app else {
            panic!("{app:?}")
        };
        assert_eq!(query.sql, "SELECT 1");
        let tables: Vec<String> = query
            .tables
            .iter()
            .map(|(name, location)| format!("{name}={location}"))
            .collect();
        assert_eq!(
            tables,
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
        let (args, app) = merge(submit_args(&[
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
        let AppSpec::SimpleQuery(app) = &app else {
            panic!()
        };
        assert_eq!(local(&app.input), Path::new("x"));
    }

    #[test]
    fn a_submission_without_an_application_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "master = \"x\"\n");
        let error = merge(submit_args(&["--job-file", file.to_str().unwrap()])).unwrap_err();
        assert!(format!("{error:#}").contains("no application"), "{error:#}");
    }
}
