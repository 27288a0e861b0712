#!/usr/bin/env bash
# Builds ppml as a Gramine SGX enclave whose command line is measured: see README.md here.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
TEMPLATE="$SCRIPT_DIR/ppml.manifest.template"
MARKER=".ppml-gramine-bundle"

usage() {
    cat <<'EOF'
Usage: deploy/gramine/build.sh [OPTIONS] -- PPML_ARGS...

Builds ppml (release), renders ppml.manifest.template with gramine-manifest, signs the enclave
with gramine-sgx-sign and prints MRENCLAVE/MRSIGNER as a ppml attestation policy (JSON, on
stdout; also written to OUT). The command the enclave runs is PPML_ARGS, baked into the
manifest (loader.argv) and so into MRENCLAVE; the host cannot change it. `--tee sgx` is added
when PPML_ARGS has no --tee.

Run the result with:  cd OUT && gramine-sgx ppml

Options:
  --out DIR              output bundle directory [default: ./ppml-sgx]
  --binary PATH          use this ppml binary instead of `cargo build --release`
  --signing-key PEM      enclave signing key (RSA-3072, e=3) [default: OUT/enclave-key.pem,
                         generated with gramine-sgx-gen-private-key if missing]
  --enclave-size SIZE    sgx.enclave_size [default: 4G]
  --threads N            sgx.max_threads [default: 64]
  --worker-threads N     TOKIO_WORKER_THREADS in the enclave [default: threads/4]
  --edmm                 sgx.edmm_enable = true (needs Linux >= 6.0 and an EDMM-capable CPU)
  --isvprodid N          sgx.isvprodid [default: 0]
  --isvsvn N             sgx.isvsvn [default: 0]
  --data-dir DIR         an extra directory of encrypted datasets (sgx.allowed_files);
                         repeatable. The directories of --input/--table/--in and the parent
                         directories of --output/--out/--out-dir in PPML_ARGS are added
                         automatically.
  --credentials FILE     TOML file with a [kms] table (appid, apikey, and optionally
                         primary_key, output_key, url, fingerprint): copied into the bundle
                         as a trusted (measured) file and passed as `--config`. Never put
                         --apikey in PPML_ARGS: the manifest is not secret.
  --arch-libdir DIR      host directory of libgcc_s.so.1 [default: /lib/$(uname -m)-linux-gnu]
  --ca-bundle FILE       TLS root certificates measured into the enclave
                         [default: /etc/ssl/certs/ca-certificates.crt]
  --rust-log FILTER      RUST_LOG in the enclave [default: warn]
  --log-level LEVEL      Gramine loader.log_level: none, error or warning [default: error]
  --allow-plaintext-output
                         allow a command that writes plaintext outside the enclave (decrypt,
                         quickstart, --plaintext, query without --output)
  --policy-id-from-host  the one exception to "nothing from the host": the enclave takes
                         PPML_ATTESTATION_POLICY from the host environment, so that the
                         printed policy can pin this MRENCLAVE (a policy id cannot be baked
                         into the enclave that the policy itself measures; see README.md)
  --render-only          render OUT/ppml.manifest with gramine-manifest; do not build or sign
  --check                no Gramine needed: render the template with a built-in substitution
                         of the known variables (placeholder Gramine paths) into
                         OUT/ppml.manifest and check its structure
  --policy-from FILE     only print the attestation policy (pinning MRENCLAVE) for the output
                         of `gramine-sgx-sigstruct-view [--output-format json] ppml.sig`
  --signer-policy        with --policy-from: pin MRSIGNER, ISVPRODID and minimum ISVSVN
                         instead
  -h, --help             this help

Exit codes: 0 success, 1 failure, 2 usage error, a refused command line, or Gramine tools
missing.
EOF
}

die() {
    printf 'build.sh: error: %s\n' "$1" >&2
    exit "${2:-1}"
}

usage_error() {
    printf 'build.sh: error: %s\n(see deploy/gramine/build.sh --help)\n' "$1" >&2
    exit 2
}

need_value() {
    if [[ $# -lt 2 ]]; then
        usage_error "$1 needs a value"
    fi
}

# The Python half: argv analysis, rendering without Gramine, manifest checks, the policy.
# Standard library only (tomllib, or tomli which Gramine itself depends on, for the checks).
PY_HELPER=$(
    cat <<'PY'
import json, os, re, shutil, sys

RESERVED = ["/lib", "/etc", "/tmp", "/ppml", "/proc", "/sys", "/dev"]
# Options of `ppml` that take a value (so that the value is not taken for a subcommand).
VALUE_OPTS = {
    "--config", "--home", "--appid", "--apikey", "--primary-key", "--output-key", "--kms-url",
    "--kms-fingerprint", "--kms-ca-cert", "--tee", "--attestation-policy",
    "--sim-platform-key", "--input", "--output", "--table", "--in", "--out", "--out-dir",
    "--input-partitions", "--output-partitions", "--sql", "--partitions", "--segment-size",
    "--rows", "--seed", "--workdir", "--policy", "--quote", "--collateral", "--at",
    "--connections", "--seconds", "--listen", "--data-dir", "--root-key-file",
    "--passphrase-file", "--tls-cert", "--tls-key", "--tls-san", "--sim-platform",
    "--sgx-collateral", "--tdx-collateral", "--log", "--pccs-url", "--pccs-ca-cert",
    "--collateral-cache", "--collateral-refresh",
}
CREDENTIAL_KEYS = {"appid", "apikey", "primary_key", "output_key", "url", "fingerprint"}
IN_ENCLAVE_CREDENTIALS = "/ppml/credentials.toml"


def warn(msg):
    print(f"build.sh: warning: {msg}", file=sys.stderr)


def toml_str(s):
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F:
            out.append("\\u%04x" % o)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def load_toml(path):
    try:
        import tomllib as toml
    except ImportError:
        try:
            import tomli as toml
        except ImportError:
            return None
    with open(path, "rb") as f:
        return toml.load(f)


def parse_ppml_args(args):
    """Splits ppml's arguments into (option, value-or-None) pairs and positionals."""
    opts, positionals, i = [], [], 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            positionals.extend(args[i + 1:])
            break
        if tok.startswith("--") and "=" in tok:
            name, value = tok.split("=", 1)
            opts.append((name, value))
        elif tok in VALUE_OPTS:
            if i + 1 >= len(args):
                raise SystemExit(f"build.sh: error: {tok} in the ppml command needs a value")
            opts.append((tok, args[i + 1]))
            i += 1
        elif tok.startswith("-") and tok != "-":
            opts.append((tok, None))
        else:
            positionals.append(tok)
        i += 1
    return opts, positionals


def overlaps(a, b):
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def under(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def prepare(settings_path, out_vars):
    s = json.load(open(settings_path))
    args = s["argv"]
    errors = []
    for a in args:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            errors.append(f"argument {a!r} is not valid UTF-8")
    if not args:
        errors.append("no ppml command given after `--` (e.g. -- simple-query --input ...)")
    opts, positionals = parse_ppml_args(args)
    values = lambda name: [v for n, v in opts if n == name]
    has = lambda name: any(n == name for n, _ in opts)
    sub = positionals[0] if positionals else None

    # What the enclave may never be told by the baked command line.
    tees = values("--tee")
    if any(t != "sgx" for t in tees):
        errors.append(f"--tee {' '.join(t for t in tees if t != 'sgx')}: this enclave attests as `sgx` only")
    if has("--apikey"):
        errors.append("--apikey in the command line would be readable in the (public) "
                      "manifest: give the credentials with build.sh --credentials FILE")
    if s["policy_id_from_host"] and has("--attestation-policy"):
        errors.append("--policy-id-from-host and --attestation-policy in the command line "
                      "exclude each other")
    if has("--config"):
        errors.append("--config: a host file cannot be read by the enclave; give the "
                      "credentials with build.sh --credentials FILE (measured)")
    plaintext = []
    if sub == "decrypt":
        plaintext.append("`decrypt` writes plaintext")
    if sub == "quickstart":
        plaintext.append("`quickstart` writes plaintext (people.csv, the decrypted result)")
    if has("--plaintext"):
        plaintext.append("--plaintext reads and writes plaintext files")
    if sub == "query" and not has("--output"):
        plaintext.append("`query` without --output prints the result rows on stdout")
    if plaintext and not s["allow_plaintext_output"]:
        errors.append(
            "refusing a command that sends plaintext out of the enclave, to storage or "
            "stdout the host reads: " + "; ".join(plaintext)
            + " (pass --allow-plaintext-output only for an enclave that runs on the data "
            "owner's own machine)")
    elif plaintext:
        warn("--allow-plaintext-output: " + "; ".join(plaintext))

    # Data directories: what the command reads and writes, plus --data-dir.
    dirs = []
    def add_dir(path, origin):
        if not path or path == "-":
            return
        if not os.path.isabs(path):
            errors.append(f"{origin} {path}: data paths must be absolute (the enclave's "
                          "working directory is not the host's)")
            return
        dirs.append((os.path.normpath(path), origin))
    for v in values("--input"):
        add_dir(v, "--input")
    for v in values("--table"):
        add_dir(v.split("=", 1)[1] if "=" in v else v, "--table")
    for v in values("--in"):
        # encrypt --in may be a single file: allow its directory.
        add_dir(v if sub == "decrypt" else os.path.dirname(os.path.normpath(v)) or v, "--in")
    for name in ("--output", "--out", "--out-dir"):
        for v in values(name):
            # Outputs are written to a temporary sibling and renamed into place.
            if v != "-" and os.path.isabs(v):
                add_dir(os.path.dirname(os.path.normpath(v)) or "/", f"{name} {v} (its parent)")
            else:
                add_dir(v, name)
    for v in s["data_dirs"]:
        add_dir(v, "--data-dir")
    # A KMS enclave: its data directory (store, audit log, collateral cache, all sealed under
    # the root key or public) is the one directory it may write, and nothing secret may come
    # from the host (docs/attestation.md §9): the owner's `ppml kms unseal` brings the root
    # key, and the TLS key is made in enclave memory at each start.
    is_kms = positionals[:2] == ["kms", "serve"]
    if is_kms:
        kms_dirs = values("--data-dir")
        if not kms_dirs:
            errors.append("kms serve needs --data-dir DIR (absolute): the KMS's store and audit "
                          "log, the enclave's one writable directory")
        for v in kms_dirs:
            add_dir(v, "kms serve --data-dir")
        for flag in ("--root-key-file", "--passphrase-file", "--tls-cert", "--tls-key",
                     "--insecure-http"):
            if has(flag):
                errors.append(f"{flag}: a KMS enclave takes its root key only from its owner "
                              "(`ppml kms unseal`) and makes its own TLS key in enclave memory")
    reserved = RESERVED + [s["arch_libdir"]]
    for d, origin in dirs:
        if d == "/":
            errors.append(f"{origin}: the data directory would be / (put datasets and "
                          "outputs in a directory of their own, e.g. /data/in, /data/out)")
            continue
        for r in reserved:
            if overlaps(d, r):
                errors.append(f"{origin}: data directory {d} overlaps the enclave's {r}")
    chosen = []  # the smallest set of directories covering all of them
    for d in sorted({d for d, _ in dirs}, key=lambda p: (p.count("/"), p)):
        if not any(under(d, c) for c in chosen):
            chosen.append(d)
    chosen.sort()

    # Extra trusted files: the KMS CA certificate, the credentials.
    extra_mounts, extra_trusted, copies = [], [], []
    for path in values("--kms-ca-cert"):
        if not os.path.isabs(path):
            errors.append(f"--kms-ca-cert {path}: must be absolute")
            continue
        if any(overlaps(path, r) for r in reserved) or any(under(path, d) for d in chosen):
            errors.append(f"--kms-ca-cert {path}: choose a path outside /etc, /lib, /tmp, "
                          "/ppml and the data directories (e.g. /opt/ppml/kms-ca.pem)")
            continue
        copies.append([path, "kms-ca.pem"])
        extra_mounts.append((path, "kms-ca.pem"))
        extra_trusted.append("kms-ca.pem")
    creds = {}
    if s["credentials"]:
        data = load_toml(s["credentials"])
        if data is None:
            errors.append("cannot check --credentials: no tomllib/tomli in this python3")
        else:
            kms = data.get("kms")
            if set(data) != {"kms"} or not isinstance(kms, dict) or not set(kms) <= CREDENTIAL_KEYS:
                errors.append(f"--credentials {s['credentials']}: expected only a [kms] table "
                              f"with keys among {sorted(CREDENTIAL_KEYS)}")
            else:
                creds = kms
        copies.append([s["credentials"], "credentials.toml"])
        extra_mounts.append((IN_ENCLAVE_CREDENTIALS, "credentials.toml"))
        extra_trusted.append("credentials.toml")

    if errors:
        for e in errors:
            print(f"build.sh: error: {e}", file=sys.stderr)
        raise SystemExit(2)

    # The baked command line: argv[0], our additions, then the caller's arguments.
    argv = ["ppml"]
    if s["credentials"]:
        argv += ["--config", IN_ENCLAVE_CREDENTIALS]
    if not tees:
        argv += ["--tee", "sgx"]
    argv += args

    # Warnings about a job command that will not work, or works with weaker guarantees (a
    # KMS is the server: it has no KMS URL, credentials or policy id of its own).
    if not is_kms:
        if not has("--kms-url") and "url" not in creds:
            warn("no --kms-url: `--tee sgx` needs a KMS server, the job will fail to attest")
        if not has("--attestation-policy") and not s["policy_id_from_host"]:
            warn("no --attestation-policy: `--tee sgx` needs the policy id printed by "
                 "`ppml kms release-policy`")
        if not (has("--kms-fingerprint") or has("--kms-ca-cert") or "fingerprint" in creds):
            warn("no --kms-fingerprint or --kms-ca-cert: the KMS is authenticated by the measured "
                 "CA bundle (any public CA); pinning its certificate is stronger")
        if not has("--appid") and "appid" not in creds:
            warn("no KMS app credentials (--credentials FILE): the job cannot authenticate to the KMS")
    writes_encrypted = sub in ("simple-query", "encrypt") or (sub == "query" and has("--output"))
    if writes_encrypted and not (has("--primary-key") or has("--output-key")
                                 or "primary_key" in creds or "output_key" in creds):
        warn("no --primary-key: the job has no key to encrypt its output under")
    if has("--output-key") or "output_key" in creds:
        warn("--output-key: the host holds this app's credentials, so results are confidential "
             "from it only if that key's data keys are not released on the api key alone")
    if sub == "simple-query" and not has("--no-preview"):
        # The preview (name, age + 1 of 20 rows) would go to stdout, which is the host's.
        argv.append("--no-preview")
    if not chosen:
        warn("no data directory: the enclave can open no file outside itself")

    mounts = [(p, "file:" + u) for p, u in extra_mounts]
    variables = {
        "argv": "[" + ", ".join(toml_str(a) for a in argv) + "]",
        "data_mounts": "\n".join(
            f"  {{ path = {toml_str(d)}, uri = {toml_str('file:' + d)} }},"
            for d in chosen),
        "allowed_files": "\n".join(f"  {toml_str('file:' + d + '/')}," for d in chosen),
        "extra_mounts": "\n".join(
            f"  {{ path = {toml_str(p)}, uri = {toml_str(u)} }}," for p, u in mounts),
        "extra_trusted_files": "\n".join(
            f"  {toml_str('file:' + t)}," for t in extra_trusted),
        "host_env": ("loader.env.PPML_ATTESTATION_POLICY = { passthrough = true }"
                     if s["policy_id_from_host"] else ""),
    }
    for key in ("arch_libdir", "enclave_size", "max_threads", "edmm_enable", "isvprodid",
                "isvsvn", "worker_threads", "rust_log", "log_level"):
        variables[key] = str(s[key])
    json.dump({"variables": variables, "copies": copies, "argv": argv, "data_dirs": chosen,
               "policy_id_from_host": s["policy_id_from_host"]},
              open(out_vars, "w"), indent=2)


def defines(vars_path):
    """NUL-separated NAME=VALUE records for gramine-manifest -D."""
    variables = json.load(open(vars_path))["variables"]
    sys.stdout.write("".join(f"{k}={v}\0" for k, v in variables.items()))


def render_check(template_path, vars_path, out_path):
    variables = json.load(open(vars_path))["variables"]
    builtins = {
        # Placeholders for what gramine-manifest knows: the Debian/Ubuntu package's paths.
        "gramine.libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        "gramine.runtimedir()": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
    }
    text = open(template_path).read()
    if re.search(r"\{[%#]", text):
        raise SystemExit("build.sh: error: the template uses Jinja statements or comments, "
                         "which --check does not render")
    def sub(m):
        name = m.group(1)
        if name in variables:
            return variables[name]
        if name in builtins:
            return builtins[name]
        raise SystemExit(f"build.sh: error: unknown template variable {{{{ {name} }}}}")
    rendered = re.sub(r"\{\{\s*(.*?)\s*\}\}", sub, text)
    header = ("# Rendered by build.sh --check without Gramine: gramine.libos and "
              "gramine.runtimedir() are placeholders.\n")
    open(out_path, "w").write(header + rendered)


def lint(manifest_path, vars_path):
    """The properties the enclave's security rests on, checked on the rendered manifest."""
    m = load_toml(manifest_path)
    if m is None:
        print("build.sh: warning: no tomllib/tomli: rendered manifest not checked",
              file=sys.stderr)
        return
    expected = json.load(open(vars_path))
    problems = []
    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else k
                if k.startswith("insecure__"):
                    problems.append(f"{key} is set")
                walk(v, key)
    walk(m, "")
    loader, sgx = m.get("loader", {}), m.get("sgx", {})
    for k in ("argv_src_file", "env_src_file"):
        if k in loader:
            problems.append(f"loader.{k} is set")
    for k, v in loader.get("env", {}).items():
        if isinstance(v, str) or (isinstance(v, dict) and set(v) == {"value"}):
            continue
        if (k == "PPML_ATTESTATION_POLICY" and v == {"passthrough": True}
                and expected["policy_id_from_host"]):
            continue  # --policy-id-from-host: the one value the host gives (README.md)
        problems.append(f"loader.env.{k} is not a fixed value")
    if loader.get("argv") != expected["argv"]:
        problems.append("loader.argv is not the baked command line")
    if m.get("libos", {}).get("entrypoint") != "/ppml/bin/ppml":
        problems.append("libos.entrypoint is not /ppml/bin/ppml")
    uris = lambda entries: [e["uri"] if isinstance(e, dict) else e for e in entries]
    if "file:bin/ppml" not in uris(sgx.get("trusted_files", [])):
        problems.append("the ppml binary is not a trusted file")
    if sgx.get("debug") is not False:
        problems.append("sgx.debug is not false")
    if sgx.get("remote_attestation") != "dcap":
        problems.append("sgx.remote_attestation is not dcap")
    if sgx.get("file_check_policy", "strict") != "strict":
        problems.append("sgx.file_check_policy is not strict")
    if uris(sgx.get("allowed_files", [])) != [f"file:{d}/" for d in expected["data_dirs"]]:
        problems.append("sgx.allowed_files is not exactly the data directories")
    if problems:
        for p in problems:
            print(f"build.sh: error: rendered manifest: {p}", file=sys.stderr)
        raise SystemExit(1)


def policy(view_path, kind, out_path):
    text = open(view_path).read()
    try:
        fields = json.loads(text)
    except ValueError:
        fields = {}
        for key, value in re.findall(
                r"^\s*(mr_enclave|mr_signer|isv_prod_id|isv_svn|debug_enclave)\s*[:=]\s*\"?([^\"\s]+)\"?",
                text, re.M):
            fields[key] = value
    try:
        mrenclave = str(fields["mr_enclave"]).lower()
        mrsigner = str(fields["mr_signer"]).lower()
        isvprodid = int(fields.get("isv_prod_id", 0))
        isvsvn = int(fields.get("isv_svn", 0))
        debug = str(fields.get("debug_enclave", "true")).lower() not in ("false", "0")
    except (KeyError, ValueError) as e:
        raise SystemExit(f"build.sh: error: {view_path}: not gramine-sgx-sigstruct-view output ({e})")
    for name, value in (("mr_enclave", mrenclave), ("mr_signer", mrsigner)):
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise SystemExit(f"build.sh: error: {view_path}: {name} is not 32 bytes of hex")
    if debug:
        raise SystemExit(f"build.sh: error: {view_path}: a debug enclave (or debug_enclave "
                         "missing): its memory is readable by the host, refusing to write a policy")
    if kind == "enclave":
        # This exact enclave: ppml binary, libraries, manifest and baked command line.
        entry = {"tee": "sgx", "mrenclave": mrenclave, "mrsigner": mrsigner,
                 "isvprodid": isvprodid}
    else:
        # Any enclave signed by this key with this product id and at least this SVN.
        entry = {"tee": "sgx", "mrsigner": mrsigner, "isvprodid": isvprodid,
                 "min_isvsvn": isvsvn}
    doc = {
        "allowed": [entry],
        "accepted_tcb_statuses": ["UpToDate"],
        "accepted_advisories": [],
        "allow_debug": False,
        "allow_simulation": False,
    }
    text = json.dumps(doc, indent=2) + "\n"
    if out_path != "-":
        open(out_path, "w").write(text)
    sys.stdout.write(text)
    print(f"MRENCLAVE={mrenclave}\nMRSIGNER={mrsigner}\nISVPRODID={isvprodid}\nISVSVN={isvsvn}",
          file=sys.stderr)


cmd, rest = sys.argv[1], sys.argv[2:]
{"prepare": prepare, "defines": defines, "render-check": render_check, "lint": lint,
 "policy": policy}[cmd](*rest)
PY
)

py() {
    python3 -c "$PY_HELPER" "$@"
}

# --- options -----------------------------------------------------------------------------
OUT="$PWD/ppml-sgx"
BINARY=""
SIGNING_KEY=""
ENCLAVE_SIZE="4G"
THREADS="64"
WORKER_THREADS=""
EDMM="false"
ISVPRODID="0"
ISVSVN="0"
DATA_DIRS=()
CREDENTIALS=""
ARCH_LIBDIR="/lib/$(uname -m)-linux-gnu"
CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt"
RUST_LOG_FILTER="warn"
LOG_LEVEL="error"
ALLOW_PLAINTEXT="false"
POLICY_ID_FROM_HOST="false"
SIGNER_POLICY="false"
MODE="build"
POLICY_FROM=""
PPML_ARGS=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --binary) need_value "$@"; BINARY="$2"; shift 2 ;;
        --signing-key) need_value "$@"; SIGNING_KEY="$2"; shift 2 ;;
        --enclave-size) need_value "$@"; ENCLAVE_SIZE="$2"; shift 2 ;;
        --threads) need_value "$@"; THREADS="$2"; shift 2 ;;
        --worker-threads) need_value "$@"; WORKER_THREADS="$2"; shift 2 ;;
        --edmm) EDMM="true"; shift ;;
        --isvprodid) need_value "$@"; ISVPRODID="$2"; shift 2 ;;
        --isvsvn) need_value "$@"; ISVSVN="$2"; shift 2 ;;
        --data-dir) need_value "$@"; DATA_DIRS+=("$2"); shift 2 ;;
        --credentials) need_value "$@"; CREDENTIALS="$2"; shift 2 ;;
        --arch-libdir) need_value "$@"; ARCH_LIBDIR="$2"; shift 2 ;;
        --ca-bundle) need_value "$@"; CA_BUNDLE="$2"; shift 2 ;;
        --rust-log) need_value "$@"; RUST_LOG_FILTER="$2"; shift 2 ;;
        --log-level) need_value "$@"; LOG_LEVEL="$2"; shift 2 ;;
        --allow-plaintext-output) ALLOW_PLAINTEXT="true"; shift ;;
        --policy-id-from-host) POLICY_ID_FROM_HOST="true"; shift ;;
        --signer-policy) SIGNER_POLICY="true"; shift ;;
        --render-only) MODE="render-only"; shift ;;
        --check) MODE="check"; shift ;;
        --policy-from) need_value "$@"; MODE="policy"; POLICY_FROM="$2"; shift 2 ;;
        --) shift; PPML_ARGS=("$@"); break ;;
        *) usage_error "unknown option $1 (the ppml command goes after --)" ;;
    esac
done

command -v python3 >/dev/null || die "python3 is needed (standard library only)" 2

if [[ "$MODE" == "policy" ]]; then
    [[ -f "$POLICY_FROM" ]] || usage_error "--policy-from $POLICY_FROM: no such file"
    if [[ "$SIGNER_POLICY" == "true" ]]; then
        py policy "$POLICY_FROM" signer -
    else
        py policy "$POLICY_FROM" enclave -
    fi
    exit 0
fi

# --- validation --------------------------------------------------------------------------
[[ "$ENCLAVE_SIZE" =~ ^[1-9][0-9]*[KMG]?$ ]] || usage_error "--enclave-size $ENCLAVE_SIZE: expected e.g. 4G, 512M"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || usage_error "--threads $THREADS: expected a positive integer"
if [[ -z "$WORKER_THREADS" ]]; then
    WORKER_THREADS=$((THREADS / 4 > 0 ? THREADS / 4 : 1))
fi
[[ "$WORKER_THREADS" =~ ^[1-9][0-9]*$ ]] || usage_error "--worker-threads $WORKER_THREADS: expected a positive integer"
((WORKER_THREADS + 4 <= THREADS)) || usage_error "--worker-threads $WORKER_THREADS leaves too few of --threads $THREADS for blocking I/O and Gramine's own threads (keep at least 4 spare)"
for pair in "isvprodid:$ISVPRODID" "isvsvn:$ISVSVN"; do
    value=${pair#*:}
    if ! [[ "$value" =~ ^(0|[1-9][0-9]{0,4})$ ]] || ((value > 65535)); then
        usage_error "--${pair%%:*} $value: expected 0..65535"
    fi
done
[[ "$ARCH_LIBDIR" =~ ^/[A-Za-z0-9_./+-]*$ ]] || usage_error "--arch-libdir $ARCH_LIBDIR: expected an absolute path of plain characters"
[[ "$RUST_LOG_FILTER" =~ ^[A-Za-z0-9_:=,.-]+$ ]] || usage_error "--rust-log $RUST_LOG_FILTER: letters, digits and _ : = , . - only"
case "$LOG_LEVEL" in
    none | error | warning) ;;
    *) usage_error "--log-level $LOG_LEVEL: none, error or warning (more verbose Gramine logs leak enclave data)" ;;
esac
if [[ -n "$CREDENTIALS" && ! -f "$CREDENTIALS" ]]; then
    usage_error "--credentials $CREDENTIALS: no such file"
fi
if [[ -n "$BINARY" && ! -x "$BINARY" ]]; then
    usage_error "--binary $BINARY: not an executable file"
fi

# Gramine tools, before any work.
missing=()
case "$MODE" in
    build)
        for tool in gramine-manifest gramine-sgx-sign gramine-sgx-sigstruct-view; do
            command -v "$tool" >/dev/null || missing+=("$tool")
        done
        if [[ -z "$SIGNING_KEY" ]]; then
            command -v gramine-sgx-gen-private-key >/dev/null || missing+=(gramine-sgx-gen-private-key)
        fi
        ;;
    render-only)
        command -v gramine-manifest >/dev/null || missing+=(gramine-manifest)
        ;;
esac
if [[ ${#missing[@]} -gt 0 ]]; then
    die "Gramine tools not found: ${missing[*]}. Install Gramine (1.7 or newer, https://gramine.readthedocs.io/en/stable/installation.html), or use --check to render the manifest without Gramine." 2
fi

# --- the bundle directory ----------------------------------------------------------------
if [[ -e "$OUT" && ! -d "$OUT" ]]; then
    usage_error "--out $OUT: exists and is not a directory"
fi
if [[ -d "$OUT" && ! -e "$OUT/$MARKER" && -n "$(ls -A "$OUT")" ]]; then
    usage_error "--out $OUT: a non-empty directory that build.sh did not create; choose another"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/$MARKER"
rm -rf "${OUT:?}/etc" "${OUT:?}/bin" "$OUT/ppml.manifest" "$OUT/ppml.manifest.sgx" "$OUT/ppml.sig" \
    "$OUT/policy.json" "$OUT/credentials.toml" "$OUT/kms-ca.pem" "$OUT/manifest-vars.json" \
    "$OUT/settings.json" "$OUT/policy-signer.json" "$OUT/sigstruct.txt"

# Settings for the Python half, as JSON (no shell quoting of the ppml arguments anywhere).
python3 - "$OUT/settings.json" "$ENCLAVE_SIZE" "$THREADS" "$EDMM" "$ISVPRODID" "$ISVSVN" \
    "$WORKER_THREADS" "$RUST_LOG_FILTER" "$LOG_LEVEL" "$ARCH_LIBDIR" "$ALLOW_PLAINTEXT" \
    "$POLICY_ID_FROM_HOST" "$CREDENTIALS" "${#DATA_DIRS[@]}" ${DATA_DIRS[@]+"${DATA_DIRS[@]}"} \
    ${PPML_ARGS[@]+"${PPML_ARGS[@]}"} <<'PY'
import json, sys
(out, enclave_size, threads, edmm, isvprodid, isvsvn, workers, rust_log, log_level,
 arch_libdir, allow_plaintext, policy_id_from_host, credentials, ndirs, *rest) = sys.argv[1:]
ndirs = int(ndirs)
json.dump({
    "enclave_size": enclave_size, "max_threads": threads, "edmm_enable": edmm,
    "isvprodid": isvprodid, "isvsvn": isvsvn, "worker_threads": workers,
    "rust_log": rust_log, "log_level": log_level, "arch_libdir": arch_libdir,
    "allow_plaintext_output": allow_plaintext == "true",
    "policy_id_from_host": policy_id_from_host == "true", "credentials": credentials,
    "data_dirs": rest[:ndirs], "argv": rest[ndirs:],
}, open(out, "w"), indent=2)
PY

py prepare "$OUT/settings.json" "$OUT/manifest-vars.json"

# /etc of the enclave: measured as a whole.
mkdir -p "$OUT/etc/ssl/certs"
cat >"$OUT/etc/nsswitch.conf" <<'EOF'
# Written by ppml's deploy/gramine/build.sh; measured into the enclave.
passwd: files
group: files
hosts: files dns
EOF
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$OUT/etc/hosts"
printf 'multi on\n' >"$OUT/etc/host.conf"
if [[ -f "$CA_BUNDLE" ]]; then
    cp "$CA_BUNDLE" "$OUT/etc/ssl/certs/ca-certificates.crt"
elif [[ "$MODE" == "check" ]]; then
    printf 'build.sh: warning: --ca-bundle %s: no such file (not copied)\n' "$CA_BUNDLE" >&2
else
    die "--ca-bundle $CA_BUNDLE: no such file (install ca-certificates or pass --ca-bundle)"
fi
if [[ "$MODE" != "check" && ! -f "$ARCH_LIBDIR/libgcc_s.so.1" ]]; then
    die "$ARCH_LIBDIR/libgcc_s.so.1 not found: pass --arch-libdir"
fi

# Extra trusted files named by the command (KMS CA certificate) or --credentials.
while IFS= read -r -d '' src && IFS= read -r -d '' dest; do
    [[ -f "$src" ]] || die "$src: no such file (it is measured into the enclave)"
    install -m 0600 "$src" "$OUT/$dest"
done < <(python3 -c 'import json, sys
for src, dest in json.load(open(sys.argv[1]))["copies"]:
    sys.stdout.write(src + "\0" + dest + "\0")' "$OUT/manifest-vars.json")

# --- check mode: no Gramine --------------------------------------------------------------
if [[ "$MODE" == "check" ]]; then
    py render-check "$TEMPLATE" "$OUT/manifest-vars.json" "$OUT/ppml.manifest"
    py lint "$OUT/ppml.manifest" "$OUT/manifest-vars.json"
    printf 'build.sh: rendered %s (structure checked; not rendered by gramine-manifest, not signed)\n' \
        "$OUT/ppml.manifest" >&2
    exit 0
fi

# --- the binary --------------------------------------------------------------------------
mkdir -p "$OUT/bin"
if [[ -z "$BINARY" && "$MODE" == "build" ]]; then
    command -v cargo >/dev/null || die "cargo not found: install Rust or pass --binary PATH" 2
    printf 'build.sh: cargo build --release -p ppml-cli --bin ppml\n' >&2
    (cd "$REPO_ROOT" && cargo build --release -p ppml-cli --bin ppml)
    target_dir=$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    BINARY="$target_dir/release/ppml"
fi
if [[ -n "$BINARY" ]]; then
    cp "$BINARY" "$OUT/bin/ppml"
    chmod 0755 "$OUT/bin/ppml"
fi

# --- render with gramine-manifest --------------------------------------------------------
defines=()
while IFS= read -r -d '' define; do
    defines+=("-D" "$define")
done < <(py defines "$OUT/manifest-vars.json")
(cd "$OUT" && gramine-manifest "${defines[@]}" "$TEMPLATE" ppml.manifest)
py lint "$OUT/ppml.manifest" "$OUT/manifest-vars.json"

if [[ "$MODE" == "render-only" ]]; then
    printf 'build.sh: rendered %s (not signed)\n' "$OUT/ppml.manifest" >&2
    [[ -f "$OUT/bin/ppml" ]] || printf 'build.sh: note: no ppml binary in %s/bin yet (--binary PATH)\n' "$OUT" >&2
    exit 0
fi

# --- sign --------------------------------------------------------------------------------
if [[ -z "$SIGNING_KEY" ]]; then
    SIGNING_KEY="$OUT/enclave-key.pem"
    if [[ ! -f "$SIGNING_KEY" ]]; then
        gramine-sgx-gen-private-key "$SIGNING_KEY"
        chmod 0600 "$SIGNING_KEY"
        printf 'build.sh: generated a signing key %s: MRSIGNER is its hash. Keep it (later builds reuse it); for production sign with a key kept offline.\n' \
            "$SIGNING_KEY" >&2
    fi
fi
[[ -f "$SIGNING_KEY" ]] || usage_error "--signing-key $SIGNING_KEY: no such file"
SIGNING_KEY=$(cd "$(dirname "$SIGNING_KEY")" && pwd)/$(basename "$SIGNING_KEY")
(cd "$OUT" && gramine-sgx-sign --manifest ppml.manifest --output ppml.manifest.sgx --key "$SIGNING_KEY")

if ! (cd "$OUT" && gramine-sgx-sigstruct-view --output-format json ppml.sig >sigstruct.txt 2>/dev/null); then
    (cd "$OUT" && gramine-sgx-sigstruct-view ppml.sig >sigstruct.txt)
fi
py policy "$OUT/sigstruct.txt" enclave "$OUT/policy.json" >/dev/null 2>&1
if [[ "$POLICY_ID_FROM_HOST" == "true" ]]; then
    printf '\nbuild.sh: enclave signed in %s. Its attestation policy (pins this MRENCLAVE; also in %s/policy.json):\n' "$OUT" "$OUT" >&2
    py policy "$OUT/sigstruct.txt" enclave -
    cat >&2 <<EOF

Next (data owner):  ppml kms release-policy --policy $OUT/policy.json KEYID   # prints POLICY_ID
Run (host):         cd $OUT && PPML_ATTESTATION_POLICY=POLICY_ID gramine-sgx ppml
EOF
else
    printf '\nbuild.sh: enclave signed in %s. Signer policy (MRSIGNER + ISVPRODID + minimum ISVSVN; also in %s/policy-signer.json):\n' "$OUT" "$OUT" >&2
    py policy "$OUT/sigstruct.txt" signer "$OUT/policy-signer.json"
    if grep -q -- '--attestation-policy' "$OUT/manifest-vars.json"; then
        cat >&2 <<EOF

The baked --attestation-policy must name a policy like this one, uploaded before the build
(ppml kms release-policy --policy $OUT/policy-signer.json KEYID).
Run (host):  cd $OUT && gramine-sgx ppml
EOF
    else
        cat >&2 <<EOF

The command line names no attestation policy yet. Upload this one and mark the key
  ppml kms release-policy --policy $OUT/policy-signer.json KEYID   # prints POLICY_ID
then build again with --attestation-policy POLICY_ID in the command (same --out, so the same
signing key and MRSIGNER), or use --policy-id-from-host to pin MRENCLAVE instead (README.md).
EOF
    fi
fi
