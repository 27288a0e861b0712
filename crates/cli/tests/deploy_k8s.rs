//! `deploy/helm/ppml` and `deploy/k8s`: every manifest parses and has the fields Kubernetes
//! needs; selectors select their pods; every container has an image, resources, a non-root
//! security context and (when it serves a port) probes; no Secret carries data and no
//! credential is a literal (in manifests or in values.yaml); every `ppml` subcommand and flag
//! the containers run exists in the built binary; every `.Values` path of the templates
//! exists; the plain manifests are the chart rendered with default values; the init
//! container's copy of the Secrets yields files ppml accepts; and the Dockerfile builds ppml
//! for the chart's user without baking in a secret. Each rule is also shown to fail on an
//! inline bad manifest, values file, command line or Dockerfile.
//!
//! The chart is linted and rendered with `helm` (`.ci/run` installs it; `PPML_HELM` names
//! another binary). What this cannot show: that a Kubernetes API server accepts the objects,
//! that the image builds, or that pods run (no cluster, no Docker engine, no SGX or TDX here).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Environment variables ppml reads directly rather than through a clap `env` (so `--help`
/// does not name them): the KMS server's root key and passphrase (`kms_serve.rs`,
/// `root_key()`).
const DIRECT_ENV: &[&str] = &["PPML_KMS_ROOT_KEY", "PPML_KMS_PASSPHRASE"];

/// The crate directory at run time (CI may build in another checkout sharing the target dir).
fn crate_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
}

fn repo_dir() -> PathBuf {
    crate_dir().join("../..")
}

fn chart_dir() -> PathBuf {
    repo_dir().join("deploy/helm/ppml")
}

fn k8s_dir() -> PathBuf {
    repo_dir().join("deploy/k8s")
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Every non-empty YAML document of `text`, as JSON values.
fn parse_docs(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{origin}: document {i} is not YAML: {e}"));
            let json = serde_json::to_value(&value).unwrap_or_else(|e| {
                panic!("{origin}: document {i} is not representable as JSON: {e}")
            });
            (!json.is_null()).then_some(json)
        })
        .collect()
}

fn parse_file(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_docs(&text, &path.display().to_string())
}

/// The plain manifests: every `*.yaml` of deploy/k8s, by file name.
fn plain_manifests() -> BTreeMap<String, Vec<Value>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(k8s_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, parse_file(&path));
        }
    }
    assert!(
        files.contains_key("ppml.yaml") && files.contains_key("submit-job.yaml"),
        "deploy/k8s must hold ppml.yaml and submit-job.yaml, found {:?}",
        files.keys()
    );
    files
}

fn values_yaml() -> Value {
    let mut docs = parse_file(&chart_dir().join("values.yaml"));
    assert_eq!(docs.len(), 1, "values.yaml is one document");
    docs.remove(0)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// `Kind/name` of an object, for messages.
fn object_id(doc: &Value) -> String {
    format!(
        "{}/{}",
        str_at(doc, "/kind").unwrap_or("?"),
        str_at(doc, "/metadata/name").unwrap_or("?")
    )
}

// ---------------------------------------------------------------------------------------------
// Rules on manifests
// ---------------------------------------------------------------------------------------------

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "Job"];

/// The pod template of a workload (`/spec/template`), if `doc` is one.
fn pod_template(doc: &Value) -> Option<&Value> {
    let kind = str_at(doc, "/kind")?;
    WORKLOADS
        .contains(&kind)
        .then(|| doc.pointer("/spec/template"))
        .flatten()
}

/// Every container of a pod spec, init containers first, with its list name.
fn containers(pod_spec: &Value) -> Vec<(&'static str, &Value)> {
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        if let Some(items) = pod_spec.get(list).and_then(Value::as_array) {
            out.extend(items.iter().map(|c| (list, c)));
        }
    }
    out
}

fn labels_of(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// A secret-looking environment variable name: its value must come from a Secret.
fn is_credential_env(name: &str) -> bool {
    // Key ids and file paths, not key material.
    const NOT_SECRET: &[&str] = &[
        "PPML_PRIMARY_KEY",
        "PPML_OUTPUT_KEY",
        "PPML_SIM_PLATFORM_KEY",
        "PPML_KMS_TLS_KEY",
    ];
    let upper = name.to_ascii_uppercase();
    if NOT_SECRET.contains(&upper.as_str()) {
        return false;
    }
    [
        "APPID",
        "APIKEY",
        "API_KEY",
        "PASSWORD",
        "PASSPHRASE",
        "SECRET",
        "TOKEN",
        "ROOT_KEY",
        "PRIVATE_KEY",
    ]
    .iter()
    .any(|w| upper.contains(w))
        || upper.ends_with("_KEY")
}

/// Flags that would put a credential on a command line.
const CREDENTIAL_FLAGS: &[&str] = &["--appid", "--apikey", "--passphrase"];

/// The command line of a container as strings (`command` then `args`).
fn command_line(container: &Value) -> (Vec<String>, Vec<String>) {
    let strings = |key: &str| -> Vec<String> {
        container
            .get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    (strings("command"), strings("args"))
}

/// The arguments given to `ppml` by a container, if it runs ppml: no `command` (the image's
/// ENTRYPOINT is ppml), or a command ending in `ppml` (e.g. `gramine-sgx ppml`).
fn ppml_args(container: &Value) -> Option<Vec<String>> {
    let (command, args) = command_line(container);
    match command.last() {
        None => Some(args),
        Some(last) if Path::new(last).file_name().is_some_and(|n| n == "ppml") => Some(args),
        Some(_) => None,
    }
}

/// The value of `--tee` (or PPML_TEE) of a ppml container.
fn tee_of(container: &Value, args: &[String]) -> Option<String> {
    if let Some(i) = args.iter().position(|a| a == "--tee") {
        return args.get(i + 1).cloned();
    }
    if let Some(value) = args.iter().find_map(|a| a.strip_prefix("--tee=")) {
        return Some(value.to_string());
    }
    container
        .get("env")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| str_at(e, "/name") == Some("PPML_TEE"))
        .and_then(|e| str_at(e, "/value"))
        .map(str::to_string)
}

fn check_resources(at: &str, container: &Value, problems: &mut Vec<String>) {
    for part in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if container
                .pointer(&format!("/resources/{part}/{resource}"))
                .is_none()
            {
                problems.push(format!("{at}: no resources.{part}.{resource}"));
            }
        }
    }
}

fn check_security(at: &str, pod_spec: &Value, container: &Value, problems: &mut Vec<String>) {
    let non_root =
        |v: &Value| v.pointer("/securityContext/runAsNonRoot") == Some(&Value::Bool(true));
    let container_root =
        container.pointer("/securityContext/runAsNonRoot") == Some(&Value::Bool(false));
    if container_root || !(non_root(container) || non_root(pod_spec)) {
        problems.push(format!(
            "{at}: securityContext does not set runAsNonRoot: true"
        ));
    }
    if let Some(uid) = container
        .pointer("/securityContext/runAsUser")
        .or_else(|| pod_spec.pointer("/securityContext/runAsUser"))
        .and_then(Value::as_u64)
        && uid == 0
    {
        problems.push(format!("{at}: runs as user 0"));
    }
    if container.pointer("/securityContext/allowPrivilegeEscalation") != Some(&Value::Bool(false)) {
        problems.push(format!(
            "{at}: securityContext does not set allowPrivilegeEscalation: false"
        ));
    }
    if container.pointer("/securityContext/readOnlyRootFilesystem") != Some(&Value::Bool(true)) {
        problems.push(format!(
            "{at}: securityContext does not set readOnlyRootFilesystem: true"
        ));
    }
    if container.pointer("/securityContext/privileged") == Some(&Value::Bool(true)) {
        problems.push(format!("{at}: privileged"));
    }
}

fn check_probes(at: &str, container: &Value, problems: &mut Vec<String>) {
    let ports: Vec<&Value> = container
        .get("ports")
        .and_then(Value::as_array)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    if ports.is_empty() {
        return;
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        let Some(spec) = container.get(probe) else {
            problems.push(format!("{at}: serves ports but has no {probe}"));
            continue;
        };
        let port = spec
            .pointer("/httpGet/port")
            .or_else(|| spec.pointer("/tcpSocket/port"))
            .or_else(|| spec.pointer("/grpc/port"));
        let known = port.is_some_and(|port| {
            ports
                .iter()
                .any(|p| p.get("name") == Some(port) || p.get("containerPort") == Some(port))
        });
        if !known {
            problems.push(format!(
                "{at}: {probe} does not probe a declared port ({port:?})"
            ));
        }
    }
}

fn check_env(at: &str, container: &Value, problems: &mut Vec<String>) {
    for env in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(env, "/name").unwrap_or_default();
        if name.is_empty() {
            problems.push(format!("{at}: an env entry without a name"));
            continue;
        }
        if is_credential_env(name)
            && (env.get("value").is_some() || env.pointer("/valueFrom/secretKeyRef").is_none())
        {
            problems.push(format!(
                "{at}: env {name} must come from a Secret (valueFrom.secretKeyRef), not a literal"
            ));
        }
    }
    if container.get("envFrom").is_some() {
        problems.push(format!(
            "{at}: envFrom (name each variable, so that the rules above apply)"
        ));
    }
}

/// Every `$(NAME)` in a command line must be a variable of the container: Kubernetes leaves
/// an unknown reference as it is, so ppml would get the literal text.
fn check_references(
    at: &str,
    container: &Value,
    command: &[String],
    args: &[String],
    problems: &mut Vec<String>,
) {
    let defined: BTreeSet<&str> = container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| str_at(e, "/name"))
        .collect();
    for token in command.iter().chain(args) {
        let mut rest = token.as_str();
        while let Some(start) = rest.find("$(") {
            let tail = &rest[start + 2..];
            let Some(end) = tail.find(')') else { break };
            let name = &tail[..end];
            if !defined.contains(name) {
                problems.push(format!(
                    "{at}: $({name}) is not an env variable of the container"
                ));
            }
            rest = &tail[end..];
        }
    }
}

/// Every rule that needs no `ppml` binary, over one set of objects (a file, or a rendering).
fn check_manifests(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    // Pod labels (with the selectors that must match them) of the workloads, for Services.
    let mut pods: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for doc in docs {
        let id = object_id(doc);
        for (pointer, what) in [
            ("/apiVersion", "apiVersion"),
            ("/kind", "kind"),
            ("/metadata/name", "metadata.name"),
        ] {
            if str_at(doc, pointer).is_none_or(str::is_empty) {
                problems.push(format!("{id}: no {what}"));
            }
        }
        let kind = str_at(doc, "/kind").unwrap_or_default();
        if kind == "Secret" && (doc.get("data").is_some() || doc.get("stringData").is_some()) {
            problems.push(format!(
                "{id}: a Secret with data in a manifest (reference an existing Secret by name)"
            ));
        }
        if WORKLOADS.contains(&kind) {
            let Some(template) = pod_template(doc) else {
                problems.push(format!("{id}: no spec.template"));
                continue;
            };
            let pod_labels = labels_of(template.pointer("/metadata/labels"));
            if kind != "Job" {
                let selector = labels_of(doc.pointer("/spec/selector/matchLabels"));
                if selector.is_empty() {
                    problems.push(format!("{id}: no spec.selector.matchLabels"));
                } else if !is_subset(&selector, &pod_labels) {
                    problems.push(format!(
                        "{id}: spec.selector.matchLabels {selector:?} do not match the pod labels {pod_labels:?}"
                    ));
                }
            }
            pods.push((id.clone(), pod_labels.clone()));
            let pod_spec = template.get("spec").cloned().unwrap_or(Value::Null);
            if pod_spec.pointer("/securityContext").is_none() {
                problems.push(format!("{id}: no pod securityContext"));
            }
            // With service links, a Service named ppml-kms would put PPML_KMS_PORT and
            // friends into the PPML_* variables ppml reads.
            if pod_spec.get("enableServiceLinks") != Some(&Value::Bool(false)) {
                problems.push(format!("{id}: enableServiceLinks is not false"));
            }
            let all = containers(&pod_spec);
            if !all.iter().any(|(list, _)| *list == "containers") {
                problems.push(format!("{id}: no containers"));
            }
            for (list, container) in all {
                let at = format!("{id} {list}/{}", str_at(container, "/name").unwrap_or("?"));
                if str_at(container, "/image").is_none_or(str::is_empty) {
                    problems.push(format!("{at}: no image"));
                }
                check_resources(&at, container, &mut problems);
                check_security(&at, &pod_spec, container, &mut problems);
                check_probes(&at, container, &mut problems);
                check_env(&at, container, &mut problems);
                let (command, args) = command_line(container);
                check_references(&at, container, &command, &args, &mut problems);
                for token in command.iter().chain(&args) {
                    let flag = token.split('=').next().unwrap_or_default();
                    if CREDENTIAL_FLAGS.contains(&flag) {
                        problems.push(format!(
                            "{at}: {flag} on the command line (use the environment, from a Secret)"
                        ));
                    }
                }
                if let Some(args) = ppml_args(container)
                    && tee_of(container, &args).as_deref() == Some("sim")
                    && pod_labels.get("ppml.io/environment").map(String::as_str)
                        != Some("development")
                {
                    problems.push(format!(
                        "{at}: --tee sim (simulated TEE) in a pod not labelled ppml.io/environment: development"
                    ));
                }
            }
        }
    }
    for doc in docs
        .iter()
        .filter(|d| str_at(d, "/kind") == Some("Service"))
    {
        let id = object_id(doc);
        let selector = labels_of(doc.pointer("/spec/selector"));
        if selector.is_empty() {
            problems.push(format!("{id}: no spec.selector"));
        } else if !pods.iter().any(|(_, labels)| is_subset(&selector, labels)) {
            problems.push(format!(
                "{id}: spec.selector {selector:?} selects no pod of {:?}",
                pods.iter().map(|(id, _)| id).collect::<Vec<_>>()
            ));
        }
        let ports = doc.pointer("/spec/ports").and_then(Value::as_array);
        if ports.is_none_or(|p| p.is_empty()) {
            problems.push(format!("{id}: no spec.ports"));
        }
        // Named target ports must be declared by the selected pods' containers.
        for port in ports.into_iter().flatten() {
            if let Some(target) = str_at(port, "/targetPort") {
                let declared = docs
                    .iter()
                    .filter_map(pod_template)
                    .filter(|t| is_subset(&selector, &labels_of(t.pointer("/metadata/labels"))))
                    .flat_map(|t| containers(t.get("spec").unwrap_or(&Value::Null)))
                    .flat_map(|(_, c)| c.get("ports").and_then(Value::as_array).cloned())
                    .flatten()
                    .any(|p| str_at(&p, "/name") == Some(target));
                if !declared {
                    problems.push(format!(
                        "{id}: targetPort {target} is not a port of the selected pods"
                    ));
                }
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Rules on values.yaml and the templates
// ---------------------------------------------------------------------------------------------

/// Credentials in values: a credential-named key with a non-empty scalar, or a string that
/// looks like key material (PEM, 64 hex characters).
fn check_values(values: &Value) -> Vec<String> {
    fn walk(path: &str, value: &Value, problems: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let child_path = format!("{path}.{key}");
                    let normalized: String = key
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric())
                        .collect::<String>()
                        .to_ascii_lowercase();
                    let credential_key = [
                        "appid",
                        "apikey",
                        "password",
                        "passphrase",
                        "rootkey",
                        "token",
                        "privatekey",
                        "secret",
                        "tlskey",
                        "key",
                    ]
                    .contains(&normalized.as_str());
                    let non_empty_scalar = match child {
                        Value::String(s) => !s.is_empty(),
                        Value::Number(_) | Value::Bool(_) => true,
                        _ => false,
                    };
                    // `key` is the key *name* inside a referenced Secret (rootKey.key).
                    if credential_key && non_empty_scalar && normalized != "key" {
                        problems.push(format!(
                            "values{child_path}: a credential as a plain value (reference an existing Secret)"
                        ));
                    }
                    walk(&child_path, child, problems);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), item, problems);
                }
            }
            Value::String(s) => {
                let hex64 = s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
                if s.contains("-----BEGIN") || hex64 {
                    problems.push(format!("values{path}: looks like key material"));
                }
            }
            _ => {}
        }
    }
    let mut problems = Vec::new();
    walk("", values, &mut problems);
    problems
}

/// Every `.Values.a.b` path in `template` that does not resolve in `values`.
fn unresolved_values_paths(template: &str, values: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find(".Values.") {
        let tail = &rest[at + ".Values.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(tail.len());
        let path = tail[..end].trim_end_matches('.');
        let mut node = values;
        for segment in path.split('.') {
            match node.get(segment) {
                Some(child) => node = child,
                None => {
                    problems.push(format!(".Values.{path}: {segment:?} is not in values.yaml"));
                    break;
                }
            }
        }
        rest = &tail[end..];
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// ppml subcommands and flags
// ---------------------------------------------------------------------------------------------

/// `ppml <path> --help`, cached.
struct Help {
    cache: BTreeMap<Vec<String>, String>,
}

impl Help {
    fn new() -> Self {
        Help {
            cache: BTreeMap::new(),
        }
    }

    fn get(&mut self, path: &[String]) -> &str {
        self.cache.entry(path.to_vec()).or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_ppml"))
                .args(path)
                .arg("--help")
                .env_remove("PPML_HOME")
                .output()
                .expect("running ppml --help");
            assert!(
                out.status.success(),
                "ppml {} --help failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    }
}

/// The subcommands listed under `Commands:` in a help text.
fn subcommands(help: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                break;
            }
            // Wrapped descriptions are indented further than the names.
            if !line.starts_with("   ")
                && let Some(name) = line.split_whitespace().next()
            {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Whether `help` documents `flag` (as a whole word).
fn has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let after = help[i + flag.len()..].chars().next();
        let before = help[..i].chars().next_back();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Problems with one ppml command line (`at` names the container).
fn check_ppml_args(
    at: &str,
    args: &[String],
    env_names: &[String],
    help: &mut Help,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut path: Vec<String> = Vec::new();
    // A flag's value is never a subcommand, even when it spells one (`--name simple-query`).
    let mut value_expected = false;
    for token in args {
        if std::mem::take(&mut value_expected) {
            continue;
        }
        if let Some(flag) = token.strip_prefix("--").map(|_| token.as_str()) {
            let (flag, inline_value) = match flag.split_once('=') {
                Some((flag, _)) => (flag, true),
                None => (flag, false),
            };
            let help_text = help.get(&path);
            if !has_flag(help_text, flag) {
                problems.push(format!(
                    "{at}: `ppml {}` has no flag {flag}",
                    path.join(" ")
                ));
            }
            value_expected = !inline_value && help_text.contains(&format!("{flag} <"));
        } else if !token.starts_with('-') && subcommands(help.get(&path)).contains(token) {
            path.push(token.clone());
        }
    }
    if path.is_empty() {
        problems.push(format!("{at}: runs no ppml subcommand: {args:?}"));
    }
    for name in env_names.iter().filter(|n| n.starts_with("PPML_")) {
        let documented = help.get(&path).contains(&format!("[env: {name}"));
        if !documented && !DIRECT_ENV.contains(&name.as_str()) {
            problems.push(format!(
                "{at}: env {name} is not an option of `ppml {}`",
                path.join(" ")
            ));
        }
    }
    problems
}

/// Flag problems of every ppml container in `docs`.
fn check_flags(docs: &[Value], help: &mut Help) -> Vec<String> {
    let mut problems = Vec::new();
    for doc in docs {
        let Some(template) = pod_template(doc) else {
            continue;
        };
        let pod_spec = template.get("spec").unwrap_or(&Value::Null);
        for (list, container) in containers(pod_spec) {
            let Some(args) = ppml_args(container) else {
                continue;
            };
            let at = format!(
                "{} {list}/{}",
                object_id(doc),
                str_at(container, "/name").unwrap_or("?")
            );
            let env_names: Vec<String> = container
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| str_at(e, "/name").map(str::to_string))
                .collect();
            problems.extend(check_ppml_args(&at, &args, &env_names, help));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Helm
// ---------------------------------------------------------------------------------------------

fn helm() -> PathBuf {
    let helm = std::env::var_os("PPML_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("helm"));
    match Command::new(&helm).arg("version").output() {
        Ok(out) if out.status.success() => helm,
        _ => panic!(
            "these tests need helm ({}): .ci/run installs it; or set PPML_HELM to a helm binary",
            helm.display()
        ),
    }
}

fn helm_run(args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template ppml CHART --namespace ppml [extra...]`, parsed.
fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "ppml",
        chart.to_str().unwrap(),
        "--namespace",
        "ppml",
    ];
    args.extend_from_slice(extra);
    parse_docs(
        &helm_run(&args),
        &format!("helm template {}", extra.join(" ")),
    )
}

/// `kmsClient.kmsPolicy` set to [`KMS_POLICY`] (a JSON string, for `--set-json`).
const KMS_POLICY_SETTING: &str =
    r#"kmsClient.kmsPolicy="{\"allowed\":[{\"tee\":\"sgx\",\"mrenclave\":\"ab\"}]}""#;
const KMS_POLICY: &str = r#"{"allowed":[{"tee":"sgx","mrenclave":"ab"}]}"#;

/// Chart settings rendered in the tests besides the defaults.
const VARIANTS: &[&[&str]] = &[
    &[],
    &["--set", "submit.enabled=true"],
    &["--set-json", KMS_POLICY_SETTING],
    &[
        "--set",
        "submit.enabled=true",
        "--set",
        "submit.app=query",
        "--set",
        "submit.query.sql=SELECT count(*) AS n FROM people WHERE age > 30",
        "--set",
        "submit.query.tables={people=/data/people.enc}",
        "--set",
        "submit.query.output=/data/jobs.enc",
        "--set",
        "submit.name=jobs",
        "--set",
        "submit.numExecutors=3",
        "--set",
        "submit.mountData=true",
        "--set",
        "grafana.dashboard.enabled=true",
    ],
    &[
        "--set",
        "executor.tee.kind=sim",
        "--set",
        "executor.tee.sim.platformKeySecret=ppml-sim-platform",
        "--set",
        "submit.enabled=true",
    ],
    &[
        "--set",
        "executor.tee.kind=sgx",
        "--set",
        "executor.tee.sgx.resources.sgx\\.intel\\.com/enclave=1",
        "--set",
        "executor.tee.sgx.resources.sgx\\.intel\\.com/provision=1",
        "--set",
        "executor.tee.sgx.devices={/dev/sgx_enclave,/dev/sgx_provision}",
        "--set",
        "executor.command={gramine-sgx,ppml}",
    ],
    &[
        "--set",
        "kms.tls.existingSecret=ppml-kms-tls",
        "--set",
        "kms.rootKey.existingSecret=",
        "--set",
        "kms.passphrase.existingSecret=ppml-kms-passphrase",
        "--set",
        "kmsClient.caSecret=ppml-kms-ca",
        "--set",
        "kmsClient.attestationPolicy=policy-id",
        "--set",
        "kmsClient.primaryKey=key-id",
        "--set",
        "kms.pccsUrl=https://pccs:8081",
        "--set",
        "kms.attestationTokenTtl=600",
        "--set",
        "submit.enabled=true",
    ],
    &[
        "--set",
        "kms.tee.kind=sim",
        "--set",
        "kms.tee.sim.platformKeySecret=ppml-kms-sim-platform",
        "--set",
        "executor.tee.kind=sim",
        "--set",
        "executor.tee.sim.platformKeySecret=ppml-sim-platform",
        "--set-json",
        KMS_POLICY_SETTING,
    ],
    &[
        "--set",
        "kms.tee.kind=sgx",
        "--set",
        "kms.tee.sgx.resources.sgx\\.intel\\.com/enclave=1",
        "--set",
        "kms.tee.sgx.devices={/dev/sgx_enclave,/dev/sgx_provision}",
        "--set",
        "kms.command={gramine-sgx,ppml}",
        "--set-json",
        KMS_POLICY_SETTING,
    ],
];

/// Differences between two sets of objects, by `Kind/name` and the first differing field.
fn diff_objects(expected: &[Value], actual: &[Value]) -> Vec<String> {
    fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, format!("{at}/{k}")),
                    _ => Some(format!("{at}/{k}")),
                })
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (p, q))| first_difference(p, q, format!("{at}/{i}"))),
            _ => (a != b).then(|| format!("{at} ({a} vs {b})")),
        }
    }
    let index = |docs: &[Value]| -> BTreeMap<String, Value> {
        docs.iter().map(|d| (object_id(d), d.clone())).collect()
    };
    let (expected, actual) = (index(expected), index(actual));
    let mut problems = Vec::new();
    for (id, want) in &expected {
        match actual.get(id) {
            None => problems.push(format!("{id}: missing from the plain manifests")),
            Some(got) => {
                if let Some(at) = first_difference(want, got, String::new()) {
                    problems.push(format!("{id}: differs from the chart at {at}"));
                }
            }
        }
    }
    for id in actual.keys().filter(|id| !expected.contains_key(*id)) {
        problems.push(format!("{id}: not in the chart"));
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_manifests_follow_the_rules() {
    let mut help = Help::new();
    let mut problems = Vec::new();
    let mut kinds = BTreeSet::new();
    for (file, docs) in plain_manifests() {
        assert!(!docs.is_empty(), "{file}: no objects");
        kinds.extend(docs.iter().map(object_id));
        problems.extend(
            check_manifests(&docs)
                .into_iter()
                .map(|p| format!("{file}: {p}")),
        );
        problems.extend(
            check_flags(&docs, &mut help)
                .into_iter()
                .map(|p| format!("{file}: {p}")),
        );
        for doc in &docs {
            // The default deployment never uses the simulated TEE.
            let text = doc.to_string();
            assert!(
                !text.contains("\"--tee\",\"sim\"") && !text.contains("development"),
                "{file}: {} uses the simulated TEE",
                object_id(doc)
            );
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for want in [
        "Service/ppml-kms",
        "StatefulSet/ppml-kms",
        "Service/ppml-scheduler",
        "Deployment/ppml-scheduler",
        "Deployment/ppml-executor",
        "Job/ppml-submit",
    ] {
        assert!(
            kinds.contains(want),
            "{want} missing from deploy/k8s: {kinds:?}"
        );
    }
    // The KMS keeps its store on a PersistentVolume.
    let all: Vec<Value> = plain_manifests().into_values().flatten().collect();
    let kms = all
        .iter()
        .find(|d| object_id(d) == "StatefulSet/ppml-kms")
        .unwrap();
    assert_eq!(
        str_at(kms, "/spec/volumeClaimTemplates/0/metadata/name"),
        Some("data")
    );
}

#[test]
fn chart_values_hold_no_credentials_and_templates_use_only_defined_values() {
    let chart: Value = parse_file(&chart_dir().join("Chart.yaml")).remove(0);
    for field in ["apiVersion", "name", "version", "appVersion"] {
        assert!(
            chart.get(field).is_some_and(|v| !v.is_null()),
            "Chart.yaml: no {field}"
        );
    }
    assert_eq!(str_at(&chart, "/apiVersion"), Some("v2"));
    let values = values_yaml();
    let problems = check_values(&values);
    assert!(problems.is_empty(), "{problems:#?}");

    let mut problems = Vec::new();
    let mut templates = 0;
    for entry in std::fs::read_dir(chart_dir().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        templates += 1;
        problems.extend(
            unresolved_values_paths(&text, &values)
                .into_iter()
                .map(|p| format!("{}: {p}", path.display())),
        );
    }
    assert!(templates >= 5, "templates missing");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn helm_lints_and_every_rendering_follows_the_rules() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let mut help = Help::new();
    for variant in VARIANTS {
        let mut lint = vec!["lint", "--strict", chart];
        lint.extend_from_slice(variant);
        helm_run(&lint);
        let docs = render(variant);
        let mut problems = check_manifests(&docs);
        problems.extend(check_flags(&docs, &mut help));
        assert!(problems.is_empty(), "with {variant:?}: {problems:#?}");
        let sim = variant.contains(&"executor.tee.kind=sim");
        let labelled = docs
            .iter()
            .filter_map(pod_template)
            .filter(|t| str_at(t, "/metadata/labels/ppml.io~1environment") == Some("development"))
            .count();
        let pods = docs.iter().filter_map(pod_template).count();
        if sim {
            assert_eq!(labelled, pods, "sim: every pod labelled development");
        } else {
            assert_eq!(labelled, 0, "{variant:?}: labelled development without sim");
        }
    }

    // The executors' policy for the KMS: a ConfigMap, mounted where PPML_KMS_POLICY points.
    let docs = render(&["--set-json", KMS_POLICY_SETTING]);
    let policy_map = docs
        .iter()
        .find(|d| {
            str_at(d, "/kind") == Some("ConfigMap")
                && str_at(d, "/metadata/name").is_some_and(|n| n.ends_with("-kms-policy"))
        })
        .expect("the KMS policy ConfigMap");
    assert_eq!(
        str_at(policy_map, "/data/kms-policy.json"),
        Some(KMS_POLICY)
    );
    let executor = docs
        .iter()
        .filter_map(pod_template)
        .find(|t| {
            t.pointer("/spec/containers/0/args")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("executor")))
        })
        .expect("the executor's pod template");
    let container = executor.pointer("/spec/containers/0").unwrap();
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "PPML_KMS_POLICY"
            && e["value"] == "/etc/ppml/kms-policy/kms-policy.json")
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/etc/ppml/kms-policy")
    );

    // The Grafana dashboard ConfigMap holds deploy/grafana/ppml-cluster.json (the chart's
    // files/ppml-cluster.json is a symbolic link to it).
    let docs = render(&["--set", "grafana.dashboard.enabled=true"]);
    let config_map = docs
        .iter()
        .find(|d| object_id(d) == "ConfigMap/ppml-grafana-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(
        str_at(config_map, "/metadata/labels/grafana_dashboard"),
        Some("1")
    );
    let embedded: Value =
        serde_json::from_str(str_at(config_map, "/data/ppml-cluster.json").unwrap()).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("deploy/grafana/ppml-cluster.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(embedded, dashboard);

    // The KMS in a TEE: started with --tee, given no root key, TLS key or passphrase by the
    // cluster (it is sealed until its owner unseals it), trusted through the KMS policy.
    let docs = render(&[
        "--set",
        "kms.tee.kind=tdx",
        "--set",
        "kms.passphrase.existingSecret=ppml-kms-passphrase",
        "--set-json",
        KMS_POLICY_SETTING,
    ]);
    let kms = docs
        .iter()
        .find(|d| object_id(d) == "StatefulSet/ppml-kms")
        .and_then(pod_template)
        .expect("the KMS's pod template");
    let container = kms.pointer("/spec/containers/0").unwrap();
    let args = ppml_args(container).unwrap();
    assert_eq!(tee_of(container, &args).as_deref(), Some("tdx"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--tls-cert")),
        "{args:?}"
    );
    let env = container["env"].as_array().unwrap();
    assert!(
        !env.iter().any(|e| e["name"] == "PPML_KMS_ROOT_KEY"
            || e["name"] == "PPML_KMS_PASSPHRASE"
            || e["name"] == "PPML_KMS_ROOT_KEY_FILE"),
        "{env:?}"
    );
    assert!(
        kms.pointer("/spec/volumes")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .all(|v| v.pointer("/secret").is_none()),
        "no Secret reaches the KMS in a TEE"
    );

    // Choices the chart refuses instead of rendering.
    for (args, message) in [
        (
            &["--set", "kms.tee.kind=tdx"][..],
            "set kmsClient.kmsPolicy",
        ),
        (
            &[
                "--set",
                "kms.tee.kind=tdx",
                "--set",
                "kms.tls.existingSecret=ppml-kms-tls",
                "--set-json",
                KMS_POLICY_SETTING,
            ][..],
            "makes its own TLS key",
        ),
        (
            &[
                "--set",
                "kms.tee.kind=sim",
                "--set-json",
                KMS_POLICY_SETTING,
            ][..],
            "needs kms.tee.sim.platformKeySecret",
        ),
        (
            &["--set", "executor.tee.kind=sim"][..],
            "needs executor.tee.sim.platformKeySecret",
        ),
        (
            &["--set", "executor.tee.kind=sev"][..],
            "must be tdx, sgx, sim or none",
        ),
        (
            &["--set", "submit.enabled=true", "--set", "submit.app=shell"][..],
            "submit.app must be simple-query or query",
        ),
    ] {
        let mut cmd = vec!["template", "ppml", chart];
        cmd.extend_from_slice(args);
        let out = Command::new(helm()).args(&cmd).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{args:?}: {stderr}"
        );
    }
}

/// The argument after `flag` in a command line.
fn arg_after(args: &[String], flag: &str) -> Option<String> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).cloned()
}

/// The `env` entry `name` of a container.
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container
        .get("env")?
        .as_array()?
        .iter()
        .find(|e| str_at(e, "/name") == Some(name))
}

/// BigDL's chart values in the table of docs/migrating-from-bigdl.md §7 (the names before
/// `:` in the backticked spans of each row's first cell; Secrets' rows aside).
fn bigdl_values_in_the_migration_guide() -> Vec<String> {
    let guide = std::fs::read_to_string(repo_dir().join("docs/migrating-from-bigdl.md")).unwrap();
    let section = guide
        .split("\n## 7. ")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("§7 of the migration guide");
    let mut names = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split(" | ").next().unwrap();
        for span in first_cell.split('`').skip(1).step_by(2) {
            let name = span.split(':').next().unwrap().to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// A values file of BigDL's chart (deploy/bigdl/values.yaml, bigdl-ppml-helm's values with
/// their placeholders filled in) installs as it is: each BigDL value lands on the ppml value
/// it stands for, the rendering follows every rule, NOTES names what each value became,
/// `sgx: "false"` runs the executors without a TEE, and what ppml cannot honour fails the
/// install with the reason.
#[test]
fn a_bigdl_values_file_installs_as_it_is() {
    let values = repo_dir().join("deploy/bigdl/values.yaml");
    let values = values.to_str().unwrap();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let mut help = Help::new();
    helm_run(&["lint", "--strict", chart, "-f", values]);

    let docs = render(&["-f", values]);
    let mut problems = check_manifests(&docs);
    problems.extend(check_flags(&docs, &mut help));
    assert!(problems.is_empty(), "{problems:#?}");
    let find = |docs: &[Value], id: &str| docs.iter().find(|d| object_id(d) == id).cloned();
    assert!(
        find(&docs, "StatefulSet/ppml-kms").is_none(),
        "kmsURL names the KMS: the release deploys none"
    );
    assert!(
        docs.iter().filter_map(pod_template).all(|t| str_at(
            t,
            "/metadata/labels/ppml.io~1environment"
        )
        .is_none()),
        "sgx true: nothing labelled development"
    );
    for template in docs.iter().filter_map(pod_template) {
        for (_, container) in containers(template.get("spec").unwrap()) {
            assert_eq!(
                str_at(container, "/image"),
                Some("registry.example.com/ppml-gramine:2.4.0"),
                "BigDL's image is every container's"
            );
        }
    }

    let executors = find(&docs, "Deployment/ppml-executor").expect("the executors");
    assert_eq!(executors.pointer("/spec/replicas"), Some(&Value::from(2)));
    let pod = pod_template(&executors).unwrap();
    let container = pod.pointer("/spec/containers/0").unwrap();
    let args = ppml_args(container).unwrap();
    assert_eq!(tee_of(container, &args).as_deref(), Some("sgx"), "{args:?}");
    assert_eq!(arg_after(&args, "--cores").as_deref(), Some("8"));
    assert_eq!(arg_after(&args, "--memory").as_deref(), Some("1024m"));
    for part in ["requests", "limits"] {
        assert_eq!(
            str_at(container, &format!("/resources/{part}/cpu")),
            Some("8")
        );
        // 1g and Spark's overhead: 10%, at least 384 MiB.
        assert_eq!(
            str_at(container, &format!("/resources/{part}/memory")),
            Some("1408Mi")
        );
    }
    assert_eq!(
        env_entry(container, "PPML_KMS_URL").and_then(|e| str_at(e, "/value")),
        Some("https://10.0.0.2:9000")
    );
    for (name, key) in [
        ("PPML_APPID", "app_id"),
        ("PPML_APIKEY", "app_key"),
        ("PPML_ATTESTATION_POLICY", "policy_id"),
    ] {
        let entry = env_entry(container, name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(
            str_at(entry, "/valueFrom/secretKeyRef/name"),
            Some("kms-secret"),
            "{name}"
        );
        assert_eq!(str_at(entry, "/valueFrom/secretKeyRef/key"), Some(key));
    }
    let claims: Vec<&str> = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .filter_map(|v| str_at(v, "/persistentVolumeClaim/claimName"))
        .collect();
    assert_eq!(claims, ["nfs-pvc"]);

    let job = find(&docs, "Job/ppml-submit").expect("class SimpleQuery: the submit Job");
    let container = pod_template(&job)
        .unwrap()
        .pointer("/spec/containers/0")
        .unwrap();
    let args = ppml_args(container).unwrap();
    assert_eq!(args[..3], ["submit", "--mode", "cluster"], "{args:?}");
    assert_eq!(arg_after(&args, "--name").as_deref(), Some("simple-query"));
    assert_eq!(
        arg_after(&args, "--driver-memory").as_deref(),
        Some("1024m")
    );
    assert_eq!(arg_after(&args, "--num-executors").as_deref(), Some("2"));
    assert!(args.iter().any(|a| a == "simple-query"), "{args:?}");
    assert!(
        env_entry(container, "PPML_APPID").is_none(),
        "the submitter holds no credentials"
    );

    // sgx "false": executors without a TEE, and every pod says it is not confidential.
    let docs = render(&["-f", values, "--set", "sgx=false"]);
    let mut problems = check_manifests(&docs);
    problems.extend(check_flags(&docs, &mut help));
    assert!(problems.is_empty(), "{problems:#?}");
    let executors = find(&docs, "Deployment/ppml-executor").unwrap();
    let container = pod_template(&executors)
        .unwrap()
        .pointer("/spec/containers/0")
        .unwrap();
    let args = ppml_args(container).unwrap();
    assert_eq!(tee_of(container, &args), None, "{args:?}");
    assert_eq!(
        str_at(&executors, "/metadata/labels/ppml.io~1tee"),
        Some("none")
    );
    assert!(
        docs.iter()
            .filter_map(pod_template)
            .all(|t| str_at(t, "/metadata/labels/ppml.io~1environment") == Some("development"))
    );

    // What each value became, as `helm install` prints it.
    let notes = helm_run(&[
        "install",
        "--dry-run=client",
        "ppml",
        chart,
        "-f",
        values,
        "--set",
        "sgx=false",
    ]);
    assert!(notes.contains("WITHOUT a TEE"), "{notes}");
    let documented = bigdl_values_in_the_migration_guide();
    assert_eq!(documented.len(), 20, "{documented:?}");
    let chart_values = values_yaml();
    for name in &documented {
        assert!(
            name == "image" || chart_values.get(name).is_some(),
            "{name} is not in the chart's values.yaml"
        );
    }
    for name in documented
        .iter()
        .map(String::as_str)
        .chain(["app credentials"])
    {
        assert!(
            notes
                .lines()
                .any(|l| l.starts_with(&format!("  {name} ")) && l.contains(" -> ")),
            "NOTES names no {name}:\n{notes}"
        );
    }

    // What ppml cannot honour fails, with the reason.
    for (setting, message) in [
        ("sgx=maybe", r#"sgx "maybe": "true" or "false""#),
        ("kmsURL=http://10.0.0.2:9000", "only over TLS"),
        (
            "class=org.apache.spark.examples.SparkPi",
            "ppml runs BigDL's SimpleQuery",
        ),
        ("deployMode=yarn", "client or cluster"),
        ("executorMem=lots", "a memory size such as 512m"),
        ("executorInstances=0", "a number of executors"),
        ("executorCores=eight", "a number of cores"),
        ("k8sMaster=https://10.0.0.1:6443", "k8s://https://HOST:PORT"),
    ] {
        let out = Command::new(helm())
            .args(["template", "ppml", chart, "-f", values, "--set", setting])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{setting}: {stderr}"
        );
    }
}

#[test]
fn plain_manifests_are_the_chart_with_default_values() {
    let files = plain_manifests();
    let default = render(&[]);
    let problems = diff_objects(&default, &files["ppml.yaml"]);
    assert!(
        problems.is_empty(),
        "deploy/k8s/ppml.yaml is not the chart rendered with default values (run deploy/k8s/render.sh): {problems:#?}"
    );
    let submit = render(&[
        "--set",
        "submit.enabled=true",
        "--show-only",
        "templates/submit-job.yaml",
    ]);
    let problems = diff_objects(&submit, &files["submit-job.yaml"]);
    assert!(
        problems.is_empty(),
        "deploy/k8s/submit-job.yaml differs from the chart (run deploy/k8s/render.sh): {problems:#?}"
    );

    // The submit Job reaches the scheduler's Service and port with the flags of cluster mode.
    let job = &files["submit-job.yaml"][0];
    let args = ppml_args(job.pointer("/spec/template/spec/containers/0").unwrap()).unwrap();
    let joined = args.join(" ");
    for want in [
        "submit --mode cluster --master ppml-scheduler:50050 --cluster-tls /run/ppml/cluster-tls --detach",
        "simple-query --input /data/people.enc --output /data/developers.enc",
    ] {
        assert!(joined.contains(want), "{joined}");
    }
}

#[test]
fn components_agree_on_ports_images_and_secrets() {
    let docs: Vec<Value> = plain_manifests().into_values().flatten().collect();
    let find = |id: &str| {
        docs.iter()
            .find(|d| object_id(d) == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let container = |id: &str| {
        find(id)
            .pointer("/spec/template/spec/containers/0")
            .unwrap()
    };
    let service_port = |id: &str, name: &str| {
        find(id)
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .find(|p| str_at(p, "/name") == Some(name))
            .and_then(|p| p.get("port"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{id} has no port {name}"))
    };
    let arg_after = |args: &[String], flag: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing in {args:?}"));
        args[i + 1].clone()
    };
    let scheduler = ppml_args(container("Deployment/ppml-scheduler")).unwrap();
    let executor = ppml_args(container("Deployment/ppml-executor")).unwrap();
    let submit = ppml_args(container("Job/ppml-submit")).unwrap();
    let kms = ppml_args(container("StatefulSet/ppml-kms")).unwrap();

    // Everyone dials the scheduler at its Service's port, which the scheduler binds.
    let grpc = service_port("Service/ppml-scheduler", "grpc");
    assert_eq!(arg_after(&scheduler, "--bind"), format!("0.0.0.0:{grpc}"));
    assert_eq!(
        arg_after(&executor, "--master"),
        format!("ppml-scheduler:{grpc}")
    );
    assert_eq!(
        arg_after(&submit, "--master"),
        format!("ppml-scheduler:{grpc}")
    );
    let metrics = service_port("Service/ppml-scheduler", "metrics");
    assert_eq!(
        arg_after(&scheduler, "--metrics-addr"),
        format!("0.0.0.0:{metrics}")
    );
    // The KMS listens on its Service's port, which the clients' URL names.
    let https = service_port("Service/ppml-kms", "https");
    assert_eq!(arg_after(&kms, "--listen"), format!("0.0.0.0:{https}"));
    let kms_url = container("Deployment/ppml-executor")["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| str_at(e, "/name") == Some("PPML_KMS_URL"))
        .and_then(|e| str_at(e, "/value"))
        .unwrap();
    assert_eq!(kms_url, format!("https://ppml-kms:{https}"));
    // Prometheus annotations name the metrics ports.
    for (id, flag) in [
        ("Deployment/ppml-scheduler", &scheduler),
        ("Deployment/ppml-executor", &executor),
    ] {
        let port = str_at(
            find(id),
            "/spec/template/metadata/annotations/prometheus.io~1port",
        )
        .unwrap();
        assert!(
            arg_after(flag, "--metrics-addr").ends_with(&format!(":{port}")),
            "{id}"
        );
    }
    // One image for every container, init containers included.
    let images: BTreeSet<&str> = docs
        .iter()
        .filter_map(pod_template)
        .flat_map(|t| containers(t.get("spec").unwrap()))
        .filter_map(|(_, c)| str_at(c, "/image"))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    // Each role mounts its own TLS Secret, read-only, at the --cluster-tls directory.
    for (id, secret, args) in [
        (
            "Deployment/ppml-scheduler",
            "ppml-cluster-tls-scheduler",
            &scheduler,
        ),
        (
            "Deployment/ppml-executor",
            "ppml-cluster-tls-executor",
            &executor,
        ),
        ("Job/ppml-submit", "ppml-cluster-tls-driver", &submit),
    ] {
        let spec = find(id).pointer("/spec/template/spec").unwrap();
        let volumes = spec["volumes"].as_array().unwrap();
        assert!(
            volumes
                .iter()
                .any(|v| str_at(v, "/secret/secretName") == Some(secret)),
            "{id}: no volume of Secret {secret}"
        );
        let dir = arg_after(args, "--cluster-tls");
        let mount = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| dir.starts_with(str_at(m, "/mountPath").unwrap()))
            .unwrap_or_else(|| panic!("{id}: {dir} is not mounted"));
        assert_eq!(mount["readOnly"], Value::Bool(true), "{id}: {dir} writable");
    }
}

/// The init container's script, run on a copy of a Secret volume's layout (files are
/// symlinks into `..data`, group-readable under fsGroup), yields what ppml accepts: 0600
/// files in 0700 directories, same contents.
#[test]
fn init_container_copies_secrets_to_private_files() {
    use std::os::unix::fs::{PermissionsExt, symlink};

    let docs: Vec<Value> = plain_manifests().into_values().flatten().collect();
    let scheduler = docs
        .iter()
        .find(|d| object_id(d) == "Deployment/ppml-scheduler")
        .unwrap();
    let init = scheduler
        .pointer("/spec/template/spec/initContainers/0")
        .unwrap();
    let (command, _) = command_line(init);
    assert_eq!(command[..2], ["/bin/sh".to_string(), "-ec".to_string()]);
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("ppml-secrets");
    let run = tmp.path().join("run-ppml");
    std::fs::create_dir_all(&run).unwrap();
    let script = command[2]
        .replace("/ppml-secrets", secrets.to_str().unwrap())
        .replace("/run/ppml", run.to_str().unwrap());
    let volume = secrets.join("cluster-tls");
    let data = volume.join("..2026_11_29_00_00_00.000000000");
    std::fs::create_dir_all(&data).unwrap();
    symlink(data.file_name().unwrap(), volume.join("..data")).unwrap();
    for file in ["ca.pem", "scheduler.pem", "scheduler.key"] {
        std::fs::write(data.join(file), format!("contents of {file}")).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o440)).unwrap();
        symlink(Path::new("..data").join(file), volume.join(file)).unwrap();
    }
    let out = Command::new("/bin/sh")
        .args(["-ec", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = run.join("cluster-tls");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&copied), 0o700);
    let mut names: Vec<String> = std::fs::read_dir(&copied)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.pem", "scheduler.key", "scheduler.pem"]);
    for name in &names {
        let path = copied.join(name);
        assert_eq!(mode(&path), 0o600, "{name}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("contents of {name}")
        );
    }
}

/// Problems of the Dockerfile: the build command, the runtime user (`uid`, the chart's
/// runAsUser), the entrypoint, the toolchain (`rust_version`, the workspace's), a Debian
/// runtime (the init container needs /bin/sh and install), and no secret-looking ENV or ARG.
fn check_dockerfile(text: &str, uid: u64, rust_version: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let lines: Vec<String> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let instruction = |name: &str| -> Vec<&String> {
        lines
            .iter()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .collect()
    };
    if !lines
        .iter()
        .any(|l| l.contains("cargo build --release -p ppml-cli --locked"))
    {
        problems.push("Dockerfile: no `cargo build --release -p ppml-cli --locked`".to_string());
    }
    if !instruction("ARG")
        .iter()
        .any(|l| l.as_str() == format!("ARG RUST_VERSION={rust_version}"))
    {
        problems.push(format!("Dockerfile: RUST_VERSION is not {rust_version}"));
    }
    let froms = instruction("FROM");
    match froms.last() {
        Some(last) if last.contains("debian:") && last.contains("-slim") => {}
        other => problems.push(format!(
            "Dockerfile: the runtime stage is not Debian slim: {other:?}"
        )),
    }
    if froms.len() < 2 {
        problems.push("Dockerfile: not multi-stage".to_string());
    }
    match instruction("USER").last() {
        Some(user) if user.as_str() == format!("USER {uid}:{uid}") => {}
        other => problems.push(format!(
            "Dockerfile: the last USER is not {uid}:{uid}: {other:?}"
        )),
    }
    if instruction("ENTRYPOINT").last().map(|l| l.as_str()) != Some("ENTRYPOINT [\"ppml\"]") {
        problems.push("Dockerfile: ENTRYPOINT is not [\"ppml\"]".to_string());
    }
    for line in instruction("ENV").into_iter().chain(instruction("ARG")) {
        for word in line.split_whitespace().skip(1) {
            let name = word.split('=').next().unwrap_or_default();
            if is_credential_env(name) {
                problems.push(format!("Dockerfile: {name} is baked into the image"));
            }
        }
    }
    for line in instruction("COPY") {
        if line.contains(".key") || line.contains(".pem") || line.contains("credentials") {
            problems.push(format!("Dockerfile: copies key material: {line}"));
        }
    }
    problems
}

#[test]
fn dockerfile_builds_ppml_for_the_charts_user_and_bakes_in_no_secret() {
    let text = std::fs::read_to_string(repo_dir().join("Dockerfile")).unwrap();
    let values = values_yaml();
    let uid = values
        .pointer("/podSecurityContext/runAsUser")
        .and_then(Value::as_u64)
        .unwrap();
    let cargo: toml::Table = std::fs::read_to_string(repo_dir().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let rust_version = cargo["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    assert_eq!(
        check_dockerfile(&text, uid, rust_version),
        Vec::<String>::new()
    );
    // The build context keeps what the build needs.
    let ignore = std::fs::read_to_string(repo_dir().join(".dockerignore")).unwrap();
    for needed in ["!Cargo.toml", "!Cargo.lock", "!crates/"] {
        assert!(
            ignore.lines().any(|l| l == needed),
            ".dockerignore: {needed}"
        );
    }

    // Each rule fails.
    for (from, to, expected) in [
        ("--locked", "", "no `cargo build"),
        ("USER 10001:10001", "USER root", "the last USER is not"),
        (
            "ENTRYPOINT [\"ppml\"]",
            "ENTRYPOINT [\"sh\"]",
            "ENTRYPOINT is not",
        ),
        (
            "FROM debian:",
            "FROM gcr.io/distroless/cc-",
            "not Debian slim",
        ),
        (
            "ARG RUST_VERSION=",
            "ARG RUST_VERSION=1.",
            "RUST_VERSION is not",
        ),
        (
            "ENV PPML_HOME=/var/lib/ppml/home",
            "ENV PPML_APIKEY=x PPML_HOME=/h",
            "PPML_APIKEY is baked",
        ),
        (
            "COPY --from=builder /out/ppml",
            "COPY app.key /k\nCOPY --from=builder /out/ppml",
            "copies key material",
        ),
    ] {
        assert!(text.contains(from), "{from:?} not in the Dockerfile");
        let problems = check_dockerfile(&text.replacen(from, to, 1), uid, rust_version);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{from:?} -> {to:?}: expected {expected:?}, got {problems:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Each rule fails on a bad manifest
// ---------------------------------------------------------------------------------------------

/// A minimal good workload; the negative cases each break one thing in it.
const GOOD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: good
spec:
  selector:
    matchLabels: {app: good}
  template:
    metadata:
      labels: {app: good}
    spec:
      enableServiceLinks: false
      securityContext: {runAsNonRoot: true, runAsUser: 10001}
      containers:
        - name: scheduler
          image: ppml:0.1.0
          args: [scheduler, --bind, "$(POD_IP):50050", --cluster-tls, /run/ppml/cluster-tls]
          env:
            - name: POD_IP
              valueFrom: {fieldRef: {fieldPath: status.podIP}}
            - name: PPML_APIKEY
              valueFrom: {secretKeyRef: {name: creds, key: apikey}}
          ports: [{name: metrics, containerPort: 50150}]
          readinessProbe: {httpGet: {path: /healthz, port: metrics}}
          livenessProbe: {httpGet: {path: /healthz, port: metrics}}
          resources:
            requests: {cpu: 100m, memory: 64Mi}
            limits: {cpu: 100m, memory: 64Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
---
apiVersion: v1
kind: Service
metadata:
  name: good
spec:
  selector: {app: good}
  ports: [{name: metrics, port: 50150, targetPort: metrics}]
"#;

fn problems_of(yaml: &str) -> Vec<String> {
    check_manifests(&parse_docs(yaml, "inline"))
}

fn assert_caught(what: &str, bad: String, expected: &str) {
    let problems = problems_of(&bad);
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "{what}: expected a problem containing {expected:?}, got {problems:#?}"
    );
}

#[test]
fn every_manifest_rule_fails_on_a_bad_manifest() {
    assert_eq!(problems_of(GOOD), Vec::<String>::new(), "the good manifest");
    let cases: &[(&str, &str, &str, &str)] = &[
        ("apiVersion", "apiVersion: apps/v1\n", "", "no apiVersion"),
        (
            "name",
            "  name: good\nspec:\n  selector",
            "  labels: {}\nspec:\n  selector",
            "no metadata.name",
        ),
        (
            "selector",
            "matchLabels: {app: good}",
            "matchLabels: {app: other}",
            "do not match the pod labels",
        ),
        (
            "service",
            "  selector: {app: good}\n  ports",
            "  selector: {app: nobody}\n  ports",
            "selects no pod",
        ),
        (
            "target port",
            "targetPort: metrics",
            "targetPort: http",
            "targetPort http is not a port",
        ),
        ("image", "image: ppml:0.1.0", "image: \"\"", "no image"),
        (
            "resources",
            "limits: {cpu: 100m, memory: 64Mi}",
            "limits: {cpu: 100m}",
            "no resources.limits.memory",
        ),
        (
            "probe",
            "          readinessProbe: {httpGet: {path: /healthz, port: metrics}}\n",
            "",
            "no readinessProbe",
        ),
        (
            "probe port",
            "livenessProbe: {httpGet: {path: /healthz, port: metrics}}",
            "livenessProbe: {httpGet: {path: /healthz, port: 9999}}",
            "does not probe a declared port",
        ),
        (
            "non-root",
            "{runAsNonRoot: true, runAsUser: 10001}",
            "{runAsUser: 10001}",
            "runAsNonRoot: true",
        ),
        (
            "root user",
            "{runAsNonRoot: true, runAsUser: 10001}",
            "{runAsNonRoot: true, runAsUser: 0}",
            "runs as user 0",
        ),
        (
            "escalation",
            "allowPrivilegeEscalation: false",
            "allowPrivilegeEscalation: true",
            "allowPrivilegeEscalation: false",
        ),
        (
            "read-only root",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            "readOnlyRootFilesystem: true",
        ),
        (
            "literal credential",
            "valueFrom: {secretKeyRef: {name: creds, key: apikey}}",
            "value: hunter2",
            "PPML_APIKEY must come from a Secret",
        ),
        (
            "credential flag",
            "args: [scheduler,",
            "args: [scheduler, --apikey, hunter2,",
            "--apikey on the command line",
        ),
        (
            "simulated TEE",
            "args: [scheduler,",
            "args: [executor, --tee, sim,",
            "not labelled ppml.io/environment: development",
        ),
        (
            "service links",
            "enableServiceLinks: false",
            "enableServiceLinks: true",
            "enableServiceLinks is not false",
        ),
        (
            "undefined reference",
            "$(POD_IP):50050",
            "$(POD_ADDRESS):50050",
            "$(POD_ADDRESS) is not an env variable",
        ),
    ];
    for (what, from, to, expected) in cases {
        assert!(GOOD.contains(from), "{what}: {from:?} not in GOOD");
        assert_caught(what, GOOD.replacen(from, to, 1), expected);
    }
    // A root key in the environment, and a Secret object carrying data.
    assert_caught(
        "root key literal",
        GOOD.replacen(
            "          ports:",
            "            - name: PPML_KMS_ROOT_KEY\n              value: \"00\"\n          ports:",
            1,
        ),
        "PPML_KMS_ROOT_KEY must come from a Secret",
    );
    assert_caught(
        "secret data",
        format!(
            "{GOOD}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\ndata:\n  apikey: aHVudGVyMg==\n"
        ),
        "a Secret with data",
    );
    // The simulated TEE is fine where the pod says it is for development.
    let sim = GOOD
        .replacen("args: [scheduler,", "args: [executor, --tee, sim,", 1)
        .replacen(
            "      labels: {app: good}",
            "      labels: {app: good, ppml.io/environment: development}",
            1,
        );
    assert_eq!(problems_of(&sim), Vec::<String>::new());
}

#[test]
fn values_and_template_rules_fail_on_bad_input() {
    let bad: Value = parse_docs(
        "credentials:\n  existingSecret: creds\n  apikey: hunter2\nkms:\n  rootKey:\n    existingSecret: \"\"\n    key: root-key\n  passphrase: correct horse\n  extra: \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\ntls:\n  cert: \"-----BEGIN PRIVATE KEY-----\"\n",
        "inline values",
    )
    .remove(0);
    let problems = check_values(&bad);
    for expected in [
        "values.credentials.apikey: a credential",
        "values.kms.passphrase: a credential",
        "values.kms.extra: looks like key material",
        "values.tls.cert: looks like key material",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected}: {problems:#?}"
        );
    }
    assert!(
        !problems.iter().any(|p| p.contains("rootKey")),
        "a Secret reference is not a credential: {problems:#?}"
    );

    let values = values_yaml();
    assert_eq!(
        unresolved_values_paths(
            "{{ .Values.executor.tee.kind }} {{ $.Values.kms.port }}",
            &values
        ),
        Vec::<String>::new()
    );
    let problems = unresolved_values_paths("{{ .Values.executor.tee.knd | quote }}", &values);
    assert_eq!(
        problems,
        [".Values.executor.tee.knd: \"knd\" is not in values.yaml"]
    );
}

#[test]
fn flag_rules_fail_on_unknown_subcommands_flags_and_env() {
    let mut help = Help::new();
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let env = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // Good: nested subcommands, values that are not subcommands, global flags after them.
    let good = check_ppml_args(
        "good",
        &args("kms serve --listen 0.0.0.0:9000 --data-dir /d --tls-san x"),
        &env(&["PPML_HOME", "PPML_KMS_ROOT_KEY"]),
        &mut help,
    );
    assert_eq!(good, Vec::<String>::new());
    let good = check_ppml_args(
        "good",
        &args("executor --tee tdx --master s:50050 --cluster-tls /t"),
        &env(&[
            "PPML_KMS_URL",
            "PPML_APPID",
            "PPML_APIKEY",
            "PPML_ATTESTATION_POLICY",
        ]),
        &mut help,
    );
    assert_eq!(good, Vec::<String>::new());
    for (line, env_names, expected) in [
        (
            "scheduler --bind x --no-such-flag",
            &[][..],
            "has no flag --no-such-flag",
        ),
        ("executor --bind x", &[][..], "has no flag --bind"),
        (
            "submit --mode client --output-partitions 2 query --sql x --table a=b",
            &[][..],
            "`ppml submit` has no flag --output-partitions",
        ),
        ("--tee sgx", &[][..], "runs no ppml subcommand"),
        (
            "scheduler --bind x",
            &["PPML_NO_SUCH_VARIABLE"][..],
            "env PPML_NO_SUCH_VARIABLE is not an option",
        ),
    ] {
        let problems = check_ppml_args("bad", &args(line), &env(env_names), &mut help);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{line}: expected {expected:?}, got {problems:#?}"
        );
    }
    // The plain manifests and a changed copy: one differing argument is reported.
    let files = plain_manifests();
    let mut changed = files["ppml.yaml"].clone();
    let executor = changed
        .iter_mut()
        .find(|d| object_id(d) == "Deployment/ppml-executor")
        .unwrap();
    executor["spec"]["template"]["spec"]["containers"][0]["args"][4] =
        Value::String("elsewhere:50050".into());
    let problems = diff_objects(&files["ppml.yaml"], &changed);
    assert_eq!(
        problems,
        [
            "Deployment/ppml-executor: differs from the chart at /spec/template/spec/containers/0/args/4 (\"ppml-scheduler:50050\" vs \"elsewhere:50050\")"
        ]
    );
}
