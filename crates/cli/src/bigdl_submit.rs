//! `ppml bigdl-submit`: the options of BigDL's `bigdl-ppml-submit.sh` and SimpleQuery's
//! arguments, turned into `ppml import bigdl` (a BigDL input) and `ppml submit … simple-query`
//! (docs/migrating-from-bigdl.md §6). Every option becomes something named in `--verbose`
//! output, or is refused; none is dropped silently.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::cli::BigdlSubmitArgs;

/// SimpleQuery's main classes in BigDL's releases.
const SIMPLE_QUERY_CLASSES: [&str; 2] = [
    "com.intel.analytics.bigdl.ppml.examples.SimpleQuerySparkExample",
    "com.intel.analytics.bigdl.ppml.examples.SimpleQueryExample",
];

/// What a BigDL submission becomes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// `ppml import bigdl` arguments, when the input is a BigDL dataset.
    pub import: Option<Vec<OsString>>,
    /// The `ppml … submit … simple-query` arguments.
    pub submit: Vec<OsString>,
    /// Environment of both commands (the KMS and its credentials: never on a command line).
    pub env: Vec<(String, String)>,
    /// The temporary ppml dataset the BigDL input is imported into (removed afterwards).
    pub imported_input: Option<PathBuf>,
    /// How each option was mapped, for `--verbose`.
    pub notes: Vec<String>,
}

fn refuse(message: String) -> anyhow::Error {
    anyhow::Error::new(crate::exit::UsageError(message))
}

/// SimpleQuery's own arguments (`--inputPath …`), as name → value.
fn app_arguments(app: &[String]) -> Result<(String, Vec<(String, String)>)> {
    let (jar, rest) = app
        .split_first()
        .ok_or_else(|| refuse("the application jar and its arguments are missing".into()))?;
    let mut pairs = Vec::new();
    let mut iter = rest.iter();
    while let Some(name) = iter.next() {
        let Some(key) = name.strip_prefix("--") else {
            return Err(refuse(format!(
                "SimpleQuery argument {name:?}: expected --name value"
            )));
        };
        let value = iter
            .next()
            .ok_or_else(|| refuse(format!("SimpleQuery argument --{key} has no value")))?;
        pairs.push((key.to_string(), value.clone()));
    }
    Ok((jar.clone(), pairs))
}

fn first_line(path: &Path) -> Result<String> {
    let line = ppml_engine::bigdl::read_key_file(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    Ok(line.to_string())
}

/// The scheduler and mode of a Spark master URL.
fn placement(master: &str, deploy_mode: &str, notes: &mut Vec<String>) -> Result<Vec<String>> {
    let scheduler = |rest: &str| -> Result<String> {
        let host_port = rest.trim_end_matches('/');
        // A Kubernetes master: ppml's scheduler takes its place, unless PPML_MASTER names it.
        match std::env::var("PPML_MASTER").ok().filter(|m| !m.is_empty()) {
            Some(master) => Ok(master),
            None if host_port.rsplit_once(':').is_some() => Ok(host_port.to_string()),
            None => Err(refuse(format!(
                "--master {master}: no port; ppml's scheduler is HOST:PORT"
            ))),
        }
    };
    let local_cores = |spec: &str| -> Result<Option<String>> {
        match spec {
            "local" => Ok(Some("1".into())),
            "local[*]" => Ok(None),
            _ => spec
                .strip_prefix("local[")
                .and_then(|n| n.strip_suffix(']'))
                .filter(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
                .map(|n| Some(n.to_string()))
                .ok_or_else(|| refuse(format!("--master {spec}: not a Spark master URL"))),
        }
    };
    let mode = match deploy_mode {
        "client" => "client",
        "cluster" => "cluster",
        other => {
            return Err(refuse(format!("--deploy-mode {other}: client or cluster")));
        }
    };
    let remote = master
        .strip_prefix("k8s://https://")
        .or_else(|| master.strip_prefix("k8s://http://"))
        .or_else(|| master.strip_prefix("k8s://"))
        .or_else(|| master.strip_prefix("spark://"));
    if let Some(rest) = remote {
        let scheduler = scheduler(rest)?;
        notes.push(format!(
            "--master {master} --deploy-mode {deploy_mode} → --mode {mode} --master {scheduler} \
             (ppml's scheduler stands in for the Spark master)"
        ));
        return Ok(vec![
            "--mode".into(),
            mode.into(),
            "--master".into(),
            scheduler,
        ]);
    }
    if master.starts_with("local") {
        let cores = local_cores(master)?;
        notes.push(format!(
            "--master {master} → --mode local{}",
            cores
                .as_deref()
                .map(|c| format!(" --driver-cores {c}"))
                .unwrap_or_default()
        ));
        let mut out = vec!["--mode".to_string(), "local".to_string()];
        if let Some(cores) = cores {
            out.extend(["--driver-cores".into(), cores]);
        }
        return Ok(out);
    }
    Err(refuse(format!(
        "--master {master}: k8s://https://HOST:PORT, spark://HOST:PORT or local[N]"
    )))
}

/// Turns a BigDL submission into ppml commands (nothing is run).
pub fn translate(args: &BigdlSubmitArgs) -> Result<Translation> {
    let mut t = Translation::default();
    let mut submit: Vec<String> = Vec::new();
    let mut global: Vec<String> = Vec::new();

    // The TEE: ppml's own PPML_TEE wins (e.g. the simulated TEE on a development machine).
    let sgx = match args.sgx_enabled.as_str() {
        "true" => true,
        "false" => false,
        other => return Err(refuse(format!("--sgx-enabled {other}: true or false"))),
    };
    let tee_given = std::env::var("PPML_TEE").is_ok_and(|v| !v.is_empty());
    match (sgx, tee_given) {
        (true, false) => {
            global.extend(["--tee".into(), "sgx".into()]);
            t.notes
                .push("--sgx-enabled true → --tee sgx (Gramine DCAP attestation)".into());
        }
        (true, true) => t
            .notes
            .push("--sgx-enabled true → the TEE of PPML_TEE, which is set".into()),
        (false, _) => t.notes.push(
            "--sgx-enabled false → no TEE (keys marked for attested release are refused)".into(),
        ),
    }
    let mode_args = placement(&args.master, &args.deploy_mode, &mut t.notes)?;
    let local = mode_args.get(1).is_some_and(|m| m == "local");
    let mode_args = if local && sgx {
        // Attested in this process: SimpleQuery runs in the local TEE.
        let mut m = mode_args;
        m[1] = "local-tee".into();
        m
    } else {
        mode_args
    };
    submit.extend(mode_args);
    for (flag, value, mapped) in [
        ("--driver-cores", &args.driver_cores, !local),
        ("--driver-memory", &args.driver_memory, true),
        ("--executor-cores", &args.executor_cores, true),
        ("--num-executors", &args.num_executors, true),
    ] {
        if let Some(value) = value
            && mapped
        {
            submit.extend([flag.to_string(), value.clone()]);
            t.notes.push(format!("{flag} {value} → {flag} {value}"));
        }
    }
    if let Some(name) = &args.name {
        submit.extend(["--name".into(), name.clone()]);
        t.notes.push(format!("--name {name} → --name {name}"));
    }
    for (flag, value) in [
        ("--executor-memory", &args.executor_memory),
        ("--sgx-driver-memory", &args.sgx_driver_memory),
        ("--sgx-driver-jvm-memory", &args.sgx_driver_jvm_memory),
        ("--sgx-executor-memory", &args.sgx_executor_memory),
        ("--sgx-executor-jvm-memory", &args.sgx_executor_jvm_memory),
        ("--sgx-log-level", &args.sgx_log_level),
    ] {
        if let Some(value) = value {
            t.notes.push(format!(
                "{flag} {value} → not a submission setting in ppml: executors are sized and \
                 their enclaves configured when they start (ppml cluster up --executor-memory, \
                 the Gramine manifest)"
            ));
        }
    }
    if let Some(jars) = &args.jars {
        t.notes.push(format!(
            "--jars {jars} → not needed: SimpleQuery is built into ppml"
        ));
    }
    for conf in &args.conf {
        let (key, value) = conf
            .split_once('=')
            .ok_or_else(|| refuse(format!("--conf {conf}: expected KEY=VALUE")))?;
        match key {
            "spark.kubernetes.container.image" => t.notes.push(format!(
                "--conf {key}={value} → the image of the cluster's pods (ppml's Helm chart `image`), not a submission setting"
            )),
            k if k.starts_with("spark.") => t.notes.push(format!(
                "--conf {key}={value} → a Spark setting; ppml's engine has no equivalent"
            )),
            _ => return Err(refuse(format!("--conf {key}: not a Spark setting"))),
        }
    }
    let class = args
        .class
        .as_deref()
        .ok_or_else(|| refuse("--class is required: BigDL's SimpleQuery".into()))?;
    if !SIMPLE_QUERY_CLASSES.contains(&class) {
        return Err(refuse(format!(
            "--class {class}: ppml runs BigDL's SimpleQuery; write other applications as SQL \
             (ppml submit … query --sql)"
        )));
    }
    t.notes
        .push(format!("--class {class} → simple-query (built in)"));

    let (jar, app) = app_arguments(&args.app)?;
    t.notes.push(format!(
        "{jar} → not needed: SimpleQuery is built into ppml"
    ));
    let get = |name: &str| {
        app.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    const KNOWN: [&str; 15] = [
        "inputPath",
        "outputPath",
        "inputPartitionNum",
        "outputPartitionNum",
        "inputEncryptModeValue",
        "outputEncryptModeValue",
        "primaryKeyPath",
        "dataKeyPath",
        "kmsType",
        "kmsServerIP",
        "kmsServerPort",
        "ehsmAPPID",
        "ehsmAPIKEY",
        "simpleAPPID",
        "simpleAPIKEY",
    ];
    if let Some((unknown, _)) = app.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
        return Err(refuse(format!("SimpleQuery has no argument --{unknown}")));
    }
    let input = PathBuf::from(
        get("inputPath").ok_or_else(|| refuse("SimpleQuery needs --inputPath".into()))?,
    );
    let output = PathBuf::from(
        get("outputPath").ok_or_else(|| refuse("SimpleQuery needs --outputPath".into()))?,
    );

    // The KMS.
    match get("kmsType").as_deref() {
        Some("EHSMKeyManagementService") | None => {}
        Some(other) => {
            return Err(refuse(format!(
                "--kmsType {other}: ppml uses an eHSM-API KMS (EHSMKeyManagementService: ppml's \
                 server or eHSM); SimpleKeyManagementService keys can be computed by anyone"
            )));
        }
    }
    if let (Some(ip), Some(port)) = (get("kmsServerIP"), get("kmsServerPort")) {
        let url = format!("https://{ip}:{port}");
        t.notes.push(format!(
            "--kmsServerIP {ip} --kmsServerPort {port} → PPML_KMS_URL={url}"
        ));
        t.env.push(("PPML_KMS_URL".into(), url));
    }
    if let Some(appid) = get("ehsmAPPID") {
        t.notes.push(format!("--ehsmAPPID {appid} → PPML_APPID"));
        t.env.push(("PPML_APPID".into(), appid));
    }
    if let Some(apikey) = get("ehsmAPIKEY") {
        t.notes.push(
            "--ehsmAPIKEY … → PPML_APIKEY (in the environment, never on a command line)".into(),
        );
        t.env.push(("PPML_APIKEY".into(), apikey));
    }
    for unused in ["simpleAPPID", "simpleAPIKEY"] {
        if get(unused).is_some() {
            return Err(refuse(format!(
                "--{unused}: the simple KMS is not supported"
            )));
        }
    }
    let primary_key_path = get("primaryKeyPath").map(PathBuf::from);
    if let Some(path) = &primary_key_path {
        // BigDL's one primary key unwraps its input's data key, and the results go under
        // it. ppml's own PPML_PRIMARY_KEY, when set, is the key of the imported dataset (e.g.
        // one marked for attested release), and PPML_OUTPUT_KEY that of the results.
        let keyid = first_line(path)?;
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
        let mut uses = Vec::new();
        if set("PPML_PRIMARY_KEY") {
            uses.push(
                "the BigDL input's key; the imported dataset's is PPML_PRIMARY_KEY, which is set",
            );
        } else {
            t.env.push(("PPML_PRIMARY_KEY".into(), keyid.clone()));
            uses.push("the key of the BigDL input and of the imported dataset (PPML_PRIMARY_KEY)");
        }
        if !set("PPML_OUTPUT_KEY") {
            t.env.push(("PPML_OUTPUT_KEY".into(), keyid.clone()));
            uses.push("the results' key (PPML_OUTPUT_KEY)");
        }
        t.notes.push(format!(
            "--primaryKeyPath {} → eHSM key {keyid}: {}",
            path.display(),
            uses.join("; ")
        ));
    }

    // The input: a BigDL dataset is imported first; a ppml dataset is read as it is.
    let input_mode = get("inputEncryptModeValue").unwrap_or_else(|| "plain_text".into());
    let is_ppml = input
        .join(ppml_format::manifest::MANIFEST_FILE_NAME)
        .is_file();
    let query_input = if is_ppml {
        t.notes.push(format!(
            "--inputPath {} → a ppml dataset, read as it is",
            input.display()
        ));
        input.clone()
    } else if input_mode.eq_ignore_ascii_case("AES/CBC/PKCS5Padding") {
        let imported = PathBuf::from(format!("{}.ppml-input", output.display()));
        let key_path = primary_key_path
            .clone()
            .ok_or_else(|| refuse("a BigDL input needs --primaryKeyPath".into()))?;
        let mut import: Vec<OsString> = vec![
            "import".into(),
            "bigdl".into(),
            "--in".into(),
            input.clone().into(),
            "--out".into(),
            imported.clone().into(),
            "--primary-key-path".into(),
            key_path.into(),
            "--overwrite".into(),
        ];
        if let Some(data_key) = get("dataKeyPath")
            && !input.join(ppml_format::bigdl::META_FILE).is_file()
        {
            import.extend(["--data-key-path".into(), data_key.into()]);
        }
        t.notes.push(format!(
            "--inputPath {} --inputEncryptModeValue {input_mode} → ppml import bigdl into {} (every part's MAC verified; removed after the job)",
            input.display(),
            imported.display()
        ));
        t.import = Some(import);
        t.imported_input = Some(imported.clone());
        imported
    } else {
        return Err(refuse(format!(
            "--inputPath {} --inputEncryptModeValue {input_mode}: ppml reads encrypted datasets \
             (BigDL's AES/CBC/PKCS5Padding ones, or ppml's); encrypt plaintext first with \
             ppml encrypt",
            input.display()
        )));
    };
    let output_mode = get("outputEncryptModeValue").unwrap_or_else(|| "plain_text".into());
    if output_mode.eq_ignore_ascii_case("plain_text") {
        return Err(refuse(
            "--outputEncryptModeValue plain_text: ppml writes query results encrypted only; \
             the owner decrypts them with ppml decrypt"
                .into(),
        ));
    }
    t.notes.push(format!(
        "--outputPath {} --outputEncryptModeValue {output_mode} → a ppml dataset (authenticated AES-256-GCM), replaced like Spark's mode(\"overwrite\"); decrypt it with ppml decrypt",
        output.display()
    ));

    let mut simple_query: Vec<String> = vec![
        "simple-query".into(),
        "--input".into(),
        query_input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
        "--overwrite".into(),
    ];
    if let Some(n) = get("inputPartitionNum") {
        simple_query.extend(["--input-partitions".into(), n]);
    }
    let partitions = get("outputPartitionNum").unwrap_or_else(|| "4".into());
    simple_query.extend(["--output-partitions".into(), partitions]);
    if let Some(path) = get("dataKeyPath")
        && t.import.is_none()
    {
        t.notes.push(format!(
            "--dataKeyPath {path} → not needed: ppml makes a data key per dataset"
        ));
    }

    t.submit = global
        .into_iter()
        .chain(std::iter::once("submit".to_string()))
        .chain(submit)
        .chain(simple_query)
        .map(OsString::from)
        .collect();
    Ok(t)
}

/// Runs the translation: the import (if any), then the submission; the temporary import is
/// removed whatever the outcome. Returns the submission's exit code.
pub fn run(args: &BigdlSubmitArgs, verbose: bool, quiet: bool) -> Result<u8> {
    let translation = translate(args)?;
    let exe = std::env::current_exe().context("finding the ppml executable")?;
    if verbose {
        for note in &translation.notes {
            eprintln!("bigdl-submit: {note}");
        }
    }
    let command = |argv: &[OsString]| {
        let mut cmd = std::process::Command::new(&exe);
        if quiet {
            cmd.arg("--quiet");
        }
        cmd.args(argv);
        for (k, v) in &translation.env {
            cmd.env(k, v);
        }
        if verbose {
            let shown: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into()).collect();
            eprintln!("bigdl-submit: running ppml {}", shown.join(" "));
        }
        cmd
    };
    let cleanup = || {
        if let Some(imported) = &translation.imported_input {
            let _ = std::fs::remove_dir_all(imported);
        }
    };
    if let Some(import) = &translation.import {
        let status = command(import)
            .status()
            .context("running ppml import bigdl")?;
        if !status.success() {
            cleanup();
            return Ok(status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1));
        }
    }
    let status = command(&translation.submit)
        .status()
        .context("running ppml submit");
    cleanup();
    let status = status?;
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn translate_args(extra: &[&str], app: &[&str]) -> Result<Translation> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.enc");
        std::fs::create_dir(&input).unwrap();
        std::fs::write(input.join(ppml_format::manifest::MANIFEST_FILE_NAME), "{}").unwrap();
        let mut argv: Vec<String> = ["ppml", "bigdl-submit", "--master", "local[2]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv.extend(
            [
                "--class",
                SIMPLE_QUERY_CLASSES[0],
                "app.jar",
                "--inputPath",
                input.to_str().unwrap(),
                "--outputPath",
                "/tmp/out",
                "--outputEncryptModeValue",
                "AES/CBC/PKCS5Padding",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        argv.extend(app.iter().map(|s| s.to_string()));
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::BigdlSubmit(args) = cli.command else {
            panic!("not bigdl-submit")
        };
        translate(&args)
    }

    #[test]
    fn a_ppml_input_runs_locally_with_every_option_named() {
        let t = translate_args(&["--driver-memory", "1g", "--conf", "spark.foo=1"], &[]).unwrap();
        let submit: Vec<String> = t
            .submit
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            submit[..5],
            ["submit", "--mode", "local", "--driver-cores", "2"]
        );
        assert!(submit.contains(&"--overwrite".to_string()));
        assert!(t.import.is_none());
        assert!(
            t.notes
                .iter()
                .any(|n| n.starts_with("--conf spark.foo=1 →"))
        );
        assert!(
            t.notes
                .iter()
                .any(|n| n.starts_with("--driver-memory 1g →"))
        );
    }

    #[test]
    fn what_has_no_meaning_is_refused() {
        for (extra, app) in [
            (vec!["--conf", "foo=1"], vec![]),
            (vec![], vec!["--kmsType", "SimpleKeyManagementService"]),
            (vec![], vec!["--noSuchArgument", "1"]),
            (vec![], vec!["--outputEncryptModeValue", "plain_text"]),
            (vec!["--sgx-enabled", "maybe"], vec![]),
            (vec!["--deploy-mode", "yarn"], vec![]),
        ] {
            let err = translate_args(&extra, &app).unwrap_err();
            assert!(
                err.is::<crate::exit::UsageError>(),
                "{extra:?} {app:?}: {err}"
            );
        }
    }
}
