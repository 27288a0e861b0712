//! Command-line interface definition.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ppml_engine::{DatasetLocation, OutputFormat};

/// ppml: privacy-preserving analytics over encrypted data.
///
/// Data is encrypted under data keys that a KMS generates and wraps under your primary key;
/// queries run with Apache DataFusion directly on the encrypted files and write encrypted
/// results. With no KMS options, an embedded KMS in $PPML_HOME (default ~/.ppml) is created on
/// first use.
///
/// Exit codes: 0 success; 1 failure (I/O, internal); 2 usage error; 3 bad input data (tampered,
/// truncated, not a ppml file, malformed CSV, a quote that does not verify, an edited audit log);
/// 4 access denied (credentials, wrong or disabled key, a policy refusing the attestation).
#[derive(Debug, Parser)]
#[command(name = "ppml", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file [default: $PPML_HOME/config.toml]
    #[arg(long, env = "PPML_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the embedded KMS and default configuration [default: ~/.ppml]
    #[arg(long, env = "PPML_HOME", global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Application id at the KMS
    #[arg(long, env = "PPML_APPID", global = true)]
    pub appid: Option<String>,
    /// Application api key at the KMS (prefer the environment variable to the flag)
    #[arg(long, env = "PPML_APIKEY", global = true, hide_env_values = true)]
    pub apikey: Option<String>,
    /// Primary key id under which new data keys are wrapped
    #[arg(long, env = "PPML_PRIMARY_KEY", global = true)]
    pub primary_key: Option<String>,
    /// Primary key id under which query results are written [default: the primary key];
    /// use a key of the data owner's that is not released to runtimes, so that the owner
    /// can decrypt results without a TEE while the inputs stay attestation-gated
    #[arg(long, env = "PPML_OUTPUT_KEY", global = true, value_name = "KEYID")]
    pub output_key: Option<String>,
    /// URL of a KMS server (`ppml kms serve` or eHSM), e.g. https://kms:9000 [default: the
    /// embedded KMS in $PPML_HOME]
    #[arg(long, env = "PPML_KMS_URL", global = true, value_name = "URL")]
    pub kms_url: Option<String>,
    /// Trust exactly the KMS server certificate with this fingerprint (sha256:<hex>, as
    /// printed by `ppml kms serve`)
    #[arg(
        long,
        env = "PPML_KMS_FINGERPRINT",
        global = true,
        value_name = "SHA256"
    )]
    pub kms_fingerprint: Option<String>,
    /// The KMS server's protocol dialect: auto (learnt from its GetVersion), ppml, ehsm
    /// (eHSM-KMS 1.x: base64 aad, keyusage) or ehsm-0.3 (eHSM-KMS 0.3, as BigDL deploys it:
    /// no nonce) [default: auto]
    #[arg(long, env = "PPML_KMS_FLAVOR", global = true, value_name = "FLAVOR")]
    pub kms_flavor: Option<String>,
    /// Trust KMS server certificates signed by this CA (PEM) instead of the system roots
    #[arg(long, env = "PPML_KMS_CA_CERT", global = true, value_name = "FILE")]
    pub kms_ca_cert: Option<PathBuf>,
    /// Verify the KMS before trusting it: its quote (over a fresh challenge and its TLS
    /// certificate) must satisfy this policy (JSON, as `ppml attest policy new` writes), or
    /// nothing is sent to it. Without --kms-fingerprint or --kms-ca-cert, the certificate the
    /// quote binds is the one trusted
    #[arg(long, env = "PPML_KMS_POLICY", global = true, value_name = "FILE")]
    pub kms_policy: Option<PathBuf>,
    /// Collateral JSON for the KMS platform's SGX or TDX quotes (with --kms-policy)
    #[arg(long, env = "PPML_KMS_COLLATERAL", global = true, value_name = "FILE")]
    pub kms_collateral: Option<PathBuf>,
    /// The data owner's key (Ed25519, PKCS#8), made by `ppml kms enroll`: it signs what only
    /// the owner may do (mark, disable, rotate or delete keys). Keep it on the owner's machine,
    /// never on hosts that run jobs [default: $PPML_HOME/owner.pk8 when it exists]
    #[arg(long, env = "PPML_OWNER_KEY", global = true, value_name = "FILE")]
    pub owner_key: Option<PathBuf>,
    /// The data owner's signed grant of this job (`ppml grant`): an attested job reads only
    /// the datasets it names and writes only its output [default: with --owner-key at a KMS
    /// server, a grant of exactly this job is signed at start]
    #[arg(long, env = "PPML_GRANT", global = true, value_name = "FILE")]
    pub grant: Option<PathBuf>,
    /// Let row counts of jobs granted at start be printed and logged (they say how many rows
    /// matched, so they leave the TEE only when the owner allows it)
    #[arg(long, env = "PPML_REVEAL_COUNTS", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub reveal_counts: bool,
    /// Attest this process before it reads data (simple-query, query, quickstart): `sim`
    /// (development), `sgx` (Gramine) or `tdx` (configfs-tsm). Needs a KMS server.
    #[arg(long, env = "PPML_TEE", global = true, value_enum)]
    pub tee: Option<TeeKind>,
    /// Attestation policy id at the KMS (from `ppml kms release-policy`)
    #[arg(
        long,
        env = "PPML_ATTESTATION_POLICY",
        global = true,
        value_name = "ID"
    )]
    pub attestation_policy: Option<String>,
    /// On attestation failure, log the error and continue (keys are still released only if
    /// the KMS policy allows)
    #[arg(long, global = true)]
    pub attestation_debug: bool,
    /// Whether BigDL's attestation variables (`ATTESTATION=true`, …) set up this runtime's
    /// attestation (docs/migrating-from-bigdl.md §4): its outcome then also goes to stdout,
    /// and a failure exits with 1, as in BigDL.
    #[arg(skip)]
    pub bigdl_attestation: bool,
    /// Simulation platform key of `--tee sim` [default: $PPML_HOME/sim-platform.pk8]
    #[arg(
        long,
        env = "PPML_SIM_PLATFORM_KEY",
        global = true,
        value_name = "FILE"
    )]
    pub sim_platform_key: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Do not fsync outputs before renaming them into place (faster; a crash may then leave
    /// an output that fails verification, never a wrong one)
    #[arg(long, env = "PPML_NO_SYNC", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub no_sync: bool,
    /// No progress bars or summaries
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Append log records to FILE (created 0600) instead of writing them to stderr
    #[arg(long, env = "PPML_LOG_FILE", global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate sample data
    #[command(subcommand)]
    Generate(Generate),
    /// Encrypt a file or directory into a ppml dataset
    Encrypt(EncryptArgs),
    /// Decrypt a ppml dataset to a file, a directory or stdout
    Decrypt(DecryptArgs),
    /// Import another system's encrypted dataset into a ppml dataset
    #[command(subcommand)]
    Import(ImportCommand),
    /// BigDL's kms-utils (`entrypoint.sh ACTION APPID APIKEY [PATH]`), on ppml's KMS
    KmsUtils(KmsUtilsArgs),
    /// BigDL's bigdl-ppml-submit.sh: its options and SimpleQuery's arguments, run as `ppml
    /// import bigdl` (a BigDL input) and `ppml submit … simple-query`; --verbose shows what
    /// each option became
    BigdlSubmit(Box<BigdlSubmitArgs>),
    /// Run SimpleQuery on an encrypted people dataset
    SimpleQuery(SimpleQueryArgs),
    /// Run SQL over encrypted tables
    Query(QueryArgs),
    /// Run the whole workflow (KMS, generate, encrypt, query, decrypt, check) in one go
    Quickstart(QuickstartArgs),
    /// Verify attestation evidence
    #[command(subcommand)]
    Attest(AttestCommand),
    /// Manage keys (the embedded KMS, or a KMS server with --kms-url) and run the KMS server
    #[command(subcommand)]
    Kms(KmsCommand),
    /// Run an application (SimpleQuery or SQL) locally, in a TEE, or on a ppml cluster
    Submit(Box<SubmitArgs>),
    /// Run the cluster scheduler (Apache DataFusion Ballista); it holds no keys
    Scheduler(SchedulerArgs),
    /// Run a cluster executor: attests (with --tee), then takes tasks from the scheduler
    Executor(ExecutorArgs),
    /// Set up a ppml cluster (certificates for mutual TLS)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show the state of a cluster job (exit 0 succeeded, 1 failed, 5 queued or running,
    /// 6 unknown to the scheduler)
    Status(JobArgs),
    /// Show the log of a cluster-mode job's driver (phases, jobs, errors; never row values)
    Logs(LogsArgs),
    /// Sign a grant of one job with the owner key: the application, the datasets it may read
    /// (pinned to their current versions), its output and output key. Give the file to the
    /// job (--grant); an attested job runs only what its grant names
    Grant(GrantArgs),
    /// Show or verify a job's receipt, which every job leaves in its output: what ran
    /// (attested code, its measurements and policy), what it read and what it wrote
    /// (docs/receipts.md)
    #[command(subcommand)]
    Receipt(ReceiptCommand),
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Print a job receipt without checking it
    Show(ReceiptShowArgs),
    /// Verify a job receipt: its signature, the attestation token that vouches for the
    /// signing key (up to the KMS's attestation key), the output and input manifests on
    /// storage, and optionally a policy of yours. Exit 3 when something differs from what
    /// the receipt says, 4 when nothing vouches for the runtime
    Verify(ReceiptVerifyArgs),
}

#[derive(Debug, Args)]
pub struct ReceiptShowArgs {
    /// The output dataset (a directory or s3://BUCKET/PREFIX), or a receipt file
    #[arg(value_name = "OUTPUT")]
    pub target: String,
    /// Print the receipt file as it is
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReceiptVerifyArgs {
    /// The output dataset (a directory or s3://BUCKET/PREFIX), or a receipt file
    #[arg(value_name = "OUTPUT")]
    pub target: String,
    /// The attestation key of the KMS that attested the runtime (64 hex digits, as `ppml
    /// receipt verify --kms-url` prints it): verify offline. Without it, the key is asked of
    /// the KMS given by --kms-url
    #[arg(long, env = "PPML_KMS_ATTESTATION_KEY", value_name = "HEX")]
    pub kms_key: Option<String>,
    /// An attestation policy (JSON, docs/attestation.md §4) the runtime and every executor
    /// must satisfy
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Refuse a receipt of a run outside any TEE
    #[arg(long)]
    pub require_attested: bool,
    /// Also open the output with this machine's KMS credentials (the output key's owner's):
    /// checks what only the output key can, the manifest's MAC, the file list and every
    /// part's header
    #[arg(long)]
    pub open_output: bool,
}

/// A job on a ppml cluster.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id printed by `ppml submit --mode cluster`
    #[arg(value_name = "JOB")]
    pub job: String,
    /// The scheduler, HOST:PORT
    #[arg(long, env = "PPML_MASTER", value_name = "HOST:PORT")]
    pub master: String,
    // TLS of the cluster channels.
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Keep printing new lines until the job ends (exit status as `ppml status`)
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `ppml cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster CA and the scheduler, executor and driver certificates for mutual
    /// TLS (ca.pem, <role>.pem, <role>.key; files 0600). Copy the directory to every host (or
    /// only ca.pem and that host's role files) and pass it with --cluster-tls.
    Certs(ClusterCertsArgs),
    /// Start a local development cluster: a scheduler and executors as separate processes on
    /// loopback, with mutual TLS (certificates created in DIR/tls) and logs in DIR. Executors
    /// use this command's KMS and attestation options (--kms-url, --tee, …)
    Up(ClusterUpArgs),
    /// Stop the local cluster started by `ppml cluster up`
    Down(ClusterDirArgs),
    /// Show the processes of the local cluster
    Status(ClusterDirArgs),
}

#[derive(Debug, Args)]
pub struct ClusterDirArgs {
    /// The cluster's directory [default: $PPML_HOME/cluster]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClusterUpArgs {
    #[command(flatten)]
    pub dir: ClusterDirArgs,
    /// Executors to start
    #[arg(long, default_value_t = 2)]
    pub executors: usize,
    /// Cores (concurrent tasks) per executor
    #[arg(long, default_value_t = 1)]
    pub executor_cores: usize,
    /// Memory per executor, e.g. 2g (see `ppml executor --memory`)
    #[arg(long, value_name = "SIZE")]
    pub executor_memory: Option<String>,
    /// Port of the scheduler; executors' shuffle services use the following ports, and the
    /// metrics servers (plain HTTP, loopback) PORT+100 (scheduler) and PORT+101… (executors)
    #[arg(long, default_value_t = 50050)]
    pub port: u16,
    /// Development only: no TLS between the cluster's processes
    #[arg(long)]
    pub insecure_cleartext: bool,
}

#[derive(Debug, Args)]
pub struct ClusterCertsArgs {
    /// Directory to write to (created 0700)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A further IP address or DNS name for the certificates (repeatable); every certificate
    /// is valid for the name ppml-cluster, localhost and 127.0.0.1, and peers verify only
    /// ppml-cluster, so this is needed only by other tools
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Replace an existing CA (every certificate signed by the old one stops working)
    #[arg(long)]
    pub force: bool,
}

/// How a cluster process secures its channels: mutual TLS, or (development only) cleartext.
#[derive(Debug, Clone, Args)]
pub struct ClusterTlsArgs {
    /// Directory with the cluster CA (ca.pem) and this role's certificate and key
    /// (scheduler.*, executor.* or driver.*), from `ppml cluster certs`: mutual TLS on every
    /// cluster channel
    #[arg(
        long,
        env = "PPML_CLUSTER_TLS",
        value_name = "DIR",
        conflicts_with = "insecure_cleartext"
    )]
    pub cluster_tls: Option<PathBuf>,
    /// Development only: no TLS on cluster channels (plans, wrapped keys and encrypted
    /// shuffle files travel in cleartext, and anyone who can reach a port is served)
    #[arg(long)]
    pub insecure_cleartext: bool,
}

/// Where `ppml submit` runs the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SubmitMode {
    /// In this process, no TEE
    Local,
    /// In this process, attested (needs --tee)
    LocalTee,
    /// This process is the driver (attested with --tee); executors of the cluster at --master
    /// read, shuffle and compute
    Client,
    /// The whole job runs in the cluster: its driver is a task on an attested executor, which
    /// writes the encrypted output to (shared) storage; this process holds no key and sees
    /// no row. Follow it with `ppml status JOB` and `ppml logs JOB`
    Cluster,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Where the application runs [default: local]
    #[arg(long, value_enum, env = "PPML_SUBMIT_MODE")]
    pub mode: Option<SubmitMode>,
    /// A TOML job file: these options (`master = "h:p"`, `cluster_tls = "dir"`, `conf = { k =
    /// "v" }`, …) and the application as a [simple_query] or [query] table; the command line
    /// wins; relative paths are relative to the file (docs/cluster.md §4, "Job files")
    #[arg(long, env = "PPML_JOB_FILE", value_name = "FILE")]
    pub job_file: Option<PathBuf>,
    /// The scheduler, HOST:PORT (client and cluster modes)
    #[arg(long, env = "PPML_MASTER", value_name = "HOST:PORT")]
    pub master: Option<String>,
    /// Job name, shown by the scheduler
    #[arg(long)]
    pub name: Option<String>,
    /// Parallelism of the driver in local modes [default: number of cores]
    #[arg(long, value_name = "N")]
    pub driver_cores: Option<usize>,
    /// Memory limit of the driver's query engine, e.g. 2g (operators spill, encrypted,
    /// beyond it)
    #[arg(long, value_name = "SIZE")]
    pub driver_memory: Option<String>,
    /// Not applicable: ppml executors are long-running (set `ppml executor --memory` or
    /// `ppml cluster up --executor-memory`); accepted only to explain that
    #[arg(long, value_name = "SIZE", hide = true)]
    pub executor_memory: Option<String>,
    /// Cores per executor (client mode: parallelism is executors × cores)
    #[arg(long, value_name = "N")]
    pub executor_cores: Option<usize>,
    /// Executors the job is planned for (client mode)
    #[arg(long, value_name = "N")]
    pub num_executors: Option<usize>,
    /// A DataFusion (datafusion.*) or Ballista (ballista.*) setting; repeatable
    #[arg(long = "conf", value_name = "KEY=VALUE")]
    pub conf: Vec<String>,
    /// Cluster mode: print the job id and return at once instead of following the job
    #[arg(long)]
    pub detach: bool,
    // TLS of the cluster channels (client mode needs --cluster-tls or --insecure-cleartext).
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
    /// The application (or the job file's)
    #[command(subcommand)]
    pub app: Option<SubmitApp>,
}

impl SubmitArgs {
    /// `--mode`, local by default.
    pub fn mode(&self) -> SubmitMode {
        self.mode.unwrap_or(SubmitMode::Local)
    }
}

/// `ppml grant`.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Where to write the signed grant
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// How long the grant stays valid, in seconds
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub lifetime: u64,
    /// Do not pin the inputs to their current versions (a newer version of a dataset is then
    /// read too, and so is an older one)
    #[arg(long)]
    pub no_pin: bool,
    /// The job, as `ppml submit` takes it
    #[command(subcommand)]
    pub app: SubmitApp,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SubmitApp {
    /// SimpleQuery on an encrypted people dataset
    SimpleQuery(SimpleQueryArgs),
    /// SQL over encrypted tables
    Query(QueryArgs),
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Address to listen on
    #[arg(long, env = "PPML_SCHEDULER_BIND", default_value = "127.0.0.1:50050")]
    pub bind: String,
    /// Seconds without contact after which an executor is considered lost and its tasks rerun
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub executor_timeout: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (and /healthz): plain HTTP,
    /// counts only (jobs, tasks, executors), never values or keys; port 0 picks a free port
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    // TLS of the cluster channels (--cluster-tls or --insecure-cleartext is required).
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// The scheduler, HOST:PORT
    #[arg(long, env = "PPML_MASTER", value_name = "HOST:PORT")]
    pub master: String,
    /// Address the shuffle (Flight) service listens on
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_host: String,
    /// Host name by which other executors and drivers reach this one [default: --bind-host]
    #[arg(long)]
    pub external_host: Option<String>,
    /// Port of the shuffle (Flight) service
    #[arg(long, default_value_t = 50051)]
    pub flight_port: u16,
    /// Directory for (encrypted) shuffle files [default: $PPML_HOME/executor-<port>]
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Tasks run at once [default: number of cores]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// Memory the executor's tasks may hold together, e.g. 4g (split between its cores;
    /// operators spill, encrypted, beyond it) [default: Ballista's share of the host memory]
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Executor id [default: derived from host and port]
    #[arg(long)]
    pub id: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (and /healthz): plain HTTP,
    /// counts only (tasks, rows, bytes, key releases), never values or keys; port 0 picks a
    /// free port
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    // TLS of the cluster channels (--cluster-tls or --insecure-cleartext is required).
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

/// TEE kinds of `--tee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TeeKind {
    /// Simulated TEE (development only; policies must allow simulation)
    Sim,
    /// Intel SGX under Gramine (/dev/attestation)
    Sgx,
    /// Intel TDX via configfs-tsm
    Tdx,
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Print the measurement of this ppml binary as the simulated TEE reports it (for
    /// policies)
    Measure,
    /// Print the public key of the simulation platform (`--sim-platform-key`, created if
    /// missing), which policies that allow simulation name in `sim_platforms`
    SimPlatform,
    /// Print a quote of this process's TEE (--tee), base64, as BigDL's quote generators do
    /// (for eHSM's VerifyQuote or BigDL-RAS /verifyQuote). Its report data is a hash of
    /// --report-data in a domain of its own: such a quote never answers a key-release
    /// challenge (ppml attests with --tee instead)
    Quote(AttestQuoteArgs),
    /// Verify an SGX or TDX DCAP quote (collateral from a file or a PCCS) and print its
    /// claims (JSON); with --policy, also judge them (exit 4 when the policy refuses, 3 when
    /// the quote does not verify)
    Verify(AttestVerifyArgs),
    /// Write, upload and read attestation policies (docs/attestation.md §4)
    #[command(subcommand)]
    Policy(AttestPolicyCommand),
    /// Run the attestation service. It shares its process, store and audit log with the KMS
    /// (keys are released against its tokens), so this is `ppml kms serve`: same options
    Serve(Box<KmsServeArgs>),
}

#[derive(Debug, Args)]
pub struct AttestQuoteArgs {
    /// Up to 64 bytes in hex; the quote's report data is SHA-512 of a ppml domain and these
    /// bytes, so that it can never answer an attestation challenge [default: none]
    #[arg(long, value_name = "HEX", default_value = "")]
    pub report_data: String,
}

#[derive(Debug, Subcommand)]
pub enum AttestPolicyCommand {
    /// Print a policy JSON for the given runtime (checked before it is printed)
    New(PolicyNewArgs),
    /// Check a policy file and print it normalised (defaults filled in)
    Check {
        /// Policy JSON file
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Upload a policy to the KMS server for the current app; prints its policy id
    Upload {
        /// Policy JSON file
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a policy of the current app stored at the KMS server
    Get {
        /// Policy id (as printed by `upload`)
        #[arg(value_name = "POLICY_ID")]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct PolicyNewArgs {
    /// TEE of the runtime
    #[arg(long, value_enum)]
    pub tee: TeeKind,
    /// SGX MRENCLAVE, or for --tee sim the executable's SHA-256 (`ppml attest measure`)
    #[arg(long, value_name = "HEX")]
    pub mrenclave: Option<String>,
    /// For --tee sim: allow this very ppml binary (its measurement)
    #[arg(long, conflicts_with = "mrenclave")]
    pub this_binary: bool,
    /// For --tee sim: a simulation platform public key to trust (64 hex digits, from `ppml
    /// attest sim-platform` on the runtime's host; repeatable) [default: the public key of
    /// --sim-platform-key]
    #[arg(long = "sim-platform", value_name = "HEX")]
    pub sim_platform: Vec<String>,
    /// SGX MRSIGNER
    #[arg(long, value_name = "HEX")]
    pub mrsigner: Option<String>,
    /// SGX ISVPRODID
    #[arg(long, value_name = "N")]
    pub isvprodid: Option<u16>,
    /// Minimum SGX ISVSVN
    #[arg(long, value_name = "N")]
    pub min_isvsvn: Option<u16>,
    /// TDX MRTD
    #[arg(long, value_name = "HEX")]
    pub mrtd: Option<String>,
    /// TCB statuses to accept besides UpToDate (repeatable), e.g. SWHardeningNeeded
    #[arg(long = "accept-tcb-status", value_name = "STATUS")]
    pub accept_tcb_status: Vec<String>,
    /// Advisory ids to tolerate (repeatable), e.g. INTEL-SA-00615
    #[arg(long = "accept-advisory", value_name = "ID")]
    pub accept_advisory: Vec<String>,
    /// Accept debug enclaves / TDs (their memory is readable by the host)
    #[arg(long)]
    pub allow_debug: bool,
}

#[derive(Debug, Args)]
pub struct AttestVerifyArgs {
    /// The quote (binary)
    #[arg(long, value_name = "FILE")]
    pub quote: PathBuf,
    /// Collateral JSON for the quote's platform (see docs/attestation.md §3); without it,
    /// --pccs-url is required
    #[arg(long, value_name = "FILE", required_unless_present = "pccs_url")]
    pub collateral: Option<PathBuf>,
    #[command(flatten)]
    pub pccs: PccsArgs,
    /// Keep collateral fetched from the PCCS in this directory [default:
    /// $PPML_HOME/collateral-cache]
    #[arg(long, value_name = "DIR")]
    pub collateral_cache: Option<PathBuf>,
    /// Policy JSON (docs/attestation.md §4)
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Verify as of this time: Unix seconds or RFC 3339 (2025-07-01T00:00:00Z) [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum Generate {
    /// people.csv: name,age,job (the reference workflow's generator)
    People(GeneratePeopleArgs),
}

#[derive(Debug, Args)]
pub struct GeneratePeopleArgs {
    /// Number of data rows
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Output file (`-` for stdout)
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Seed for a reproducible file [default: random, printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replace an existing output file
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Input file or directory of files
    #[arg(long = "in", value_name = "PATH")]
    pub input: PathBuf,
    /// Output dataset: a directory, or s3://BUCKET/PREFIX in an S3-compatible store
    /// (configured by AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
    /// AWS_ALLOW_HTTP; see docs/storage.md)
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub out: DatasetLocation,
    /// Split a CSV file into N part files on row boundaries (each with the header)
    #[arg(long, default_value_t = 1)]
    pub partitions: usize,
    /// The CSV input has no header line
    #[arg(long)]
    pub no_header: bool,
    /// Do not check that every CSV row has as many fields as the first. Encryption runs about
    /// 1.2x as fast; rows are still split on row boundaries (quotes respected), and a bad
    /// row is then reported only when a query reads it
    #[arg(long)]
    pub no_row_check: bool,
    /// Plaintext bytes per encrypted segment
    #[arg(long, default_value_t = ppml_format::DEFAULT_SEGMENT_SIZE)]
    pub segment_size: u32,
    /// Convert CSV, NDJSON or Parquet input to this format while encrypting (csv, json or
    /// parquet; the schema is inferred) [default: the input's format, bytes kept]. Parquet is
    /// written with Parquet Modular Encryption (AES_GCM_V1, every column encrypted), readable
    /// by pyarrow with a KMS client of ppml's KMS
    #[arg(long, value_name = "FORMAT")]
    pub to: Option<OutputFormat>,
    /// With --to parquet: encrypt COLUMN with a data key of its own, wrapped under primary key
    /// KEY_ID; a reader the KMS refuses that key still reads every other column. Repeatable
    #[arg(long = "column-key", value_name = "COLUMN=KEY_ID")]
    pub column_keys: Vec<String>,
    /// With --to parquet: leave the Parquet footer (schema, row counts) in plaintext, signed;
    /// column data and statistics stay encrypted
    #[arg(long)]
    pub plaintext_footer: bool,
    /// Replace an existing output (only after the new one is complete)
    #[arg(long)]
    pub overwrite: bool,
}

/// `ppml import …`.
#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Import a BigDL PPML encrypted dataset (AES-CBC "common" parts with .meta, BigDL 2.1/2.2
    /// parts, or nativeaescbc) into a new ppml dataset, verifying every part's HMAC trailer.
    /// The BigDL data key is unwrapped by the KMS (eHSM Decrypt with BigDL's aad) or with the
    /// plaintext primary key of BigDL's no-KMS mode; the new dataset's key comes from ppml's
    /// KMS as for `ppml encrypt`. Nothing is written unless every part verifies
    Bigdl(ImportBigdlArgs),
}

#[derive(Debug, Args)]
pub struct ImportBigdlArgs {
    /// The BigDL dataset: a directory of part files (part-*.csv.cbc, part-*.json.cbc) with its
    /// .meta, or one part file
    #[arg(long = "in", value_name = "PATH")]
    pub input: PathBuf,
    /// Output dataset: a directory, or s3://BUCKET/PREFIX
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub out: DatasetLocation,
    /// The BigDL writer: common (2.3+), 2.2, 2.1 or nativeaescbc [default: detected; 2.2 is
    /// tried before 2.1; nativeaescbc cannot be detected]
    #[arg(long, value_name = "VARIANT", value_parser = parse_bigdl_variant)]
    pub variant: Option<ppml_format::bigdl::Variant>,
    /// BigDL's primary key file (its first line is the eHSM key id the data key is wrapped
    /// under); the KMS of --kms-url unwraps it
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["primary_key_id", "primary_key_plaintext"],
        conflicts_with_all = ["primary_key_id", "primary_key_plaintext"]
    )]
    pub primary_key_path: Option<PathBuf>,
    /// The eHSM key id the BigDL data key is wrapped under (instead of --primary-key-path)
    #[arg(long, value_name = "KEY_ID", conflicts_with = "primary_key_plaintext")]
    pub primary_key_id: Option<String>,
    /// BigDL's no-KMS mode: the base64 primary key (spark.bigdl.primaryKey.*.plainText), or
    /// @FILE to read it from FILE
    #[arg(
        long,
        value_name = "BASE64|@FILE",
        env = "PPML_BIGDL_PRIMARY_KEY_PLAINTEXT",
        hide_env_values = true
    )]
    pub primary_key_plaintext: Option<String>,
    /// BigDL's data key file (dataKeyPath): the wrapped data key, for 2.1/2.2 datasets, which
    /// have no .meta
    #[arg(long, value_name = "FILE")]
    pub data_key_path: Option<PathBuf>,
    /// Import nativeaescbc parts, which carry no MAC: their integrity cannot be verified
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// The CSV parts have no header line
    #[arg(long)]
    pub no_header: bool,
    /// Plaintext bytes per encrypted segment of the new dataset
    #[arg(long, default_value_t = ppml_format::DEFAULT_SEGMENT_SIZE)]
    pub segment_size: u32,
    /// Replace an existing output (only after the new one is complete)
    #[arg(long)]
    pub overwrite: bool,
}

/// `ppml bigdl-submit`: the options of BigDL's bigdl-ppml-submit.sh
/// (docs/migrating-from-bigdl.md §6).
#[derive(Debug, Args)]
pub struct BigdlSubmitArgs {
    /// The Spark master: k8s://https://HOST:PORT or spark://HOST:PORT (ppml's scheduler, or
    /// $PPML_MASTER), local[N]
    #[arg(long, value_name = "URL")]
    pub master: String,
    /// client or cluster
    #[arg(long, default_value = "client", value_name = "MODE")]
    pub deploy_mode: String,
    /// true: attest in SGX (--tee sgx; PPML_TEE wins when set)
    #[arg(long, default_value = "false", value_name = "BOOL")]
    pub sgx_enabled: String,
    /// Gramine's log level (set in the Gramine manifest; reported, not applied)
    #[arg(long, value_name = "LEVEL")]
    pub sgx_log_level: Option<String>,
    /// Enclave size of the driver (reported, not applied)
    #[arg(long, value_name = "SIZE")]
    pub sgx_driver_memory: Option<String>,
    /// JVM heap of the driver (reported, not applied)
    #[arg(long, value_name = "SIZE")]
    pub sgx_driver_jvm_memory: Option<String>,
    /// Enclave size of executors (reported, not applied)
    #[arg(long, value_name = "SIZE")]
    pub sgx_executor_memory: Option<String>,
    /// JVM heap of executors (reported, not applied)
    #[arg(long, value_name = "SIZE")]
    pub sgx_executor_jvm_memory: Option<String>,
    /// The driver's memory limit (--driver-memory)
    #[arg(long, value_name = "SIZE")]
    pub driver_memory: Option<String>,
    /// The driver's cores (--driver-cores)
    #[arg(long, value_name = "N")]
    pub driver_cores: Option<String>,
    /// Executor memory (set when executors start; reported, not applied)
    #[arg(long, value_name = "SIZE")]
    pub executor_memory: Option<String>,
    /// Cores per executor (--executor-cores)
    #[arg(long, value_name = "N")]
    pub executor_cores: Option<String>,
    /// Executors the job is planned for (--num-executors)
    #[arg(long, value_name = "N")]
    pub num_executors: Option<String>,
    /// A Spark setting, KEY=VALUE; repeatable (reported; non-Spark keys are refused)
    #[arg(long = "conf", value_name = "KEY=VALUE")]
    pub conf: Vec<String>,
    /// The job's name
    #[arg(long)]
    pub name: Option<String>,
    /// The application class: BigDL's SimpleQuery
    #[arg(long, value_name = "CLASS")]
    pub class: Option<String>,
    /// Jars for the JVM (not needed; reported)
    #[arg(long, value_name = "JARS")]
    pub jars: Option<String>,
    /// The application jar, then SimpleQuery's arguments (--inputPath, --outputPath,
    /// --inputPartitionNum, --outputPartitionNum, --inputEncryptModeValue,
    /// --outputEncryptModeValue, --primaryKeyPath, --dataKeyPath, --kmsType, --kmsServerIP,
    /// --kmsServerPort, --ehsmAPPID, --ehsmAPIKEY)
    #[arg(
        value_name = "APP_JAR [ARGS]",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true
    )]
    pub app: Vec<String>,
}

/// `ppml kms-utils`: BigDL's kms-utils container commands (docs/migrating-from-bigdl.md §5).
#[derive(Debug, Args)]
pub struct KmsUtilsArgs {
    /// enroll | generatekeys APPID APIKEY | encrypt APPID APIKEY PATH |
    /// encryptwithrepartition APPID APIKEY PATH | decrypt APPID APIKEY PATH
    #[arg(value_name = "ACTION")]
    pub action: String,
    /// The action's arguments, as BigDL's entrypoint.sh takes them
    #[arg(value_name = "ARGS")]
    pub args: Vec<String>,
    /// Where the key files are kept (ehsm_encrypted_primary_key, ehsm_encrypted_data_key)
    #[arg(long, env = "KMS_UTILS_KEY_DIR", default_value = "/home/key")]
    pub key_dir: PathBuf,
}

fn parse_bigdl_variant(text: &str) -> Result<ppml_format::bigdl::Variant, String> {
    ppml_format::bigdl::Variant::from_name(text).ok_or_else(|| {
        format!("unknown BigDL variant {text:?}: one of common, 2.2, 2.1, nativeaescbc")
    })
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Input dataset: a directory, or s3://BUCKET/PREFIX
    #[arg(long = "in", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub input: DatasetLocation,
    /// Output file, all parts concatenated with a single CSV header (`-` for stdout)
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "out_dir",
        conflicts_with = "out_dir"
    )]
    pub out: Option<PathBuf>,
    /// Output directory with one plaintext file per part
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Convert the rows to this format (csv, json or parquet) instead of writing the parts'
    /// plaintext as it is; with --out-dir, one file per partition of the scan
    #[arg(long, value_name = "FORMAT")]
    pub to: Option<OutputFormat>,
    /// Replace an existing output (only after the new one is complete)
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SimpleQueryArgs {
    /// Encrypted input dataset (people: name,age,job): a directory, or s3://BUCKET/PREFIX
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub input: DatasetLocation,
    /// Encrypted output dataset: a directory, or s3://BUCKET/PREFIX
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub output: DatasetLocation,
    /// Parallelism of the scan [default: number of cores]
    #[arg(long, value_name = "N")]
    pub input_partitions: Option<usize>,
    /// Number of output part files [default: as the plan produces]
    #[arg(long, value_name = "N")]
    pub output_partitions: Option<usize>,
    /// Replace an existing output
    #[arg(long)]
    pub overwrite: bool,
    /// Read plaintext CSV and write plaintext CSV, no KMS (for comparisons and benchmarks)
    #[arg(long)]
    pub plaintext: bool,
    /// Do not print the preview rows (name, age + 1). Under --tee they are never printed:
    /// stdout goes to the host
    #[arg(long)]
    pub no_preview: bool,
}

#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("query_text").required(true).args(["sql", "sql_file"]))]
pub struct QueryArgs {
    /// SQL to run
    #[arg(long)]
    pub sql: Option<String>,
    /// File with the SQL to run
    #[arg(long, value_name = "FILE")]
    pub sql_file: Option<PathBuf>,
    /// A table: NAME=DIR or NAME=s3://BUCKET/PREFIX (an encrypted dataset); repeatable
    #[arg(
        long = "table",
        value_name = "NAME=DIR|NAME=s3://BUCKET/PREFIX",
        required = true
    )]
    pub tables: Vec<String>,
    /// Write the result as an encrypted dataset (a directory, or s3://BUCKET/PREFIX) instead
    /// of printing it
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub output: Option<DatasetLocation>,
    /// Parallelism of the scans [default: number of cores]
    #[arg(long, value_name = "N")]
    pub input_partitions: Option<usize>,
    /// Number of output part files
    #[arg(long, value_name = "N")]
    pub output_partitions: Option<usize>,
    /// Format of the output's parts: csv, json (newline-delimited) or parquet
    #[arg(long, value_name = "FORMAT", default_value = "csv")]
    pub output_format: OutputFormat,
    /// Replace an existing output
    #[arg(long)]
    pub overwrite: bool,
    /// Tables are plaintext (CSV, or Parquet and NDJSON by extension), output plaintext (for
    /// comparisons and benchmarks)
    #[arg(long)]
    pub plaintext: bool,
}

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Rows of people.csv to generate
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Working directory for the generated, encrypted and decrypted files
    #[arg(long, value_name = "DIR", default_value = "ppml-quickstart")]
    pub workdir: PathBuf,
    /// Seed of the generated data [default: random]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Part files of the encrypted input
    #[arg(long, default_value_t = 2)]
    pub partitions: usize,
    /// Format of the encrypted input: csv, json (newline-delimited) or parquet (Parquet
    /// Modular Encryption)
    #[arg(long, value_name = "FORMAT", default_value = "csv")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Enroll without an owner key, as eHSM does: the api key alone controls the app, and its
    /// keys cannot be marked for attested release
    #[arg(long)]
    pub no_owner_key: bool,
}

#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Create the embedded KMS (root key, store) if it does not exist; with --server, set up
    /// a KMS server's data directory instead (root key or passphrase salt, store, audit log,
    /// TLS certificate) and print the certificate fingerprint
    Init(KmsInitArgs),
    /// Register a new application; prints its app id and api key (shown once). At a ppml KMS
    /// server the app is owned by the owner key (--owner-key, made if missing), which alone
    /// can mark, disable, rotate or delete its keys
    Enroll(EnrollArgs),
    /// Create a primary key for the current application
    CreateKey,
    /// List the current application's primary keys
    ListKeys,
    /// Add a new version to a primary key (KMS server only); old data stays readable
    Rotate(KeyIdArg),
    /// Upload an attestation policy (JSON, docs/attestation.md §4) and release the key's data
    /// keys only to runtimes it accepts (KMS server only); prints the policy id
    ReleasePolicy(ReleasePolicyArgs),
    /// Disable a primary key (KMS server only): its data keys can no longer be unwrapped
    Disable(KeyIdArg),
    /// Enable a disabled primary key (KMS server only)
    Enable(KeyIdArg),
    /// Run the KMS server (eHSM-compatible REST API, see docs/kms-api.md). With --tee it
    /// starts sealed: it serves no key until its owner runs `ppml kms unseal`
    Serve(Box<KmsServeArgs>),
    /// Unseal a KMS that runs in a TEE (--kms-url): verify its quote against --kms-policy,
    /// then send it the root key sealed to the key its quote binds; prints its root id
    Unseal(UnsealArgs),
    /// Load-test a KMS server (--kms-url): signed GenerateDataKeyWithoutPlaintext and Decrypt
    /// from N concurrent connections; prints throughput and latency percentiles
    Bench(KmsBenchArgs),
    /// Inspect the KMS server's audit log
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct KmsInitArgs {
    /// Initialise a KMS server's data directory rather than the embedded KMS
    #[arg(long)]
    pub server: bool,
    /// Server data directory [default: $PPML_HOME/kms-server]
    #[arg(
        long,
        env = "PPML_KMS_DATA_DIR",
        value_name = "DIR",
        requires = "server"
    )]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub root: RootKeyArgs,
    /// Extra DNS name or IP for the self-signed certificate (repeatable)
    #[arg(long, value_name = "NAME", requires = "server")]
    pub tls_san: Vec<String>,
}

#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// The owner's root key file (64 hex characters, mode 0600); keep it off the KMS's host
    #[arg(long, env = "PPML_KMS_ROOT_KEY_FILE", value_name = "FILE")]
    pub root_key_file: PathBuf,
    /// Create the root key file if it does not exist (the first unseal of a new KMS)
    #[arg(long)]
    pub create: bool,
    /// Add the root id to the KMS policy's kms_root_ids, so that every client using the
    /// policy trusts this KMS only while it holds this root key
    #[arg(long)]
    pub pin: bool,
    /// Where the KMS's audit head is kept between unseals [default: the root key file's name
    /// followed by .audit-head.json]: each unseal sends it, so that a KMS over an older copy
    /// of its store (a restored backup or snapshot) is refused, and keeps the new one
    #[arg(long, env = "PPML_KMS_AUDIT_HEAD_FILE", value_name = "FILE")]
    pub audit_head: Option<PathBuf>,
}

impl UnsealArgs {
    /// The audit head file: `--audit-head`, or [`ppml::kms_audit_head_file`].
    pub fn audit_head_file(&self) -> PathBuf {
        self.audit_head
            .clone()
            .unwrap_or_else(|| ppml::kms_audit_head_file(&self.root_key_file))
    }
}

#[derive(Debug, Args)]
pub struct KmsBenchArgs {
    /// Concurrent connections
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Measured duration in seconds (after a 1 s warm-up)
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Enroll a fresh app and key for the run instead of using the configured ones
    #[arg(long)]
    pub enroll: bool,
}

#[derive(Debug, Args)]
pub struct ReleasePolicyArgs {
    /// Policy JSON file (uploaded first)
    #[arg(long, value_name = "FILE", required_unless_present = "policy_id")]
    pub policy: Option<PathBuf>,
    /// A policy already uploaded (`ppml attest policy upload`)
    #[arg(long, value_name = "POLICY_ID", conflicts_with = "policy")]
    pub policy_id: Option<String>,
    /// Primary key id [default: the configured primary key]
    #[arg(value_name = "KEYID")]
    pub keyid: Option<String>,
}

#[derive(Debug, Args)]
pub struct KeyIdArg {
    /// Primary key id [default: the configured primary key]
    #[arg(value_name = "KEYID")]
    pub keyid: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain (and its MACs when the root key is available); exits
    /// non-zero on any edited, removed or reordered entry
    Verify(AuditVerifyArgs),
    /// List the entries of one job (keys released or made under the owner's grant of that
    /// job id, as its receipt names it), after checking the log as `verify` does
    Show(AuditShowArgs),
}

#[derive(Debug, Args)]
pub struct AuditShowArgs {
    /// The job id (a receipt's `job.id`, a grant's `job_id`)
    #[arg(long, value_name = "ID")]
    pub job: String,
    #[command(flatten)]
    pub log: AuditVerifyArgs,
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// The audit log [default: DATA_DIR/audit.log]
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Server data directory [default: $PPML_HOME/kms-server]
    #[arg(long, env = "PPML_KMS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Check the hash chain only, without the root key (then an attacker who rewrites the
    /// whole chain is not detected)
    #[arg(long)]
    pub chain_only: bool,
    #[command(flatten)]
    pub root: RootKeyArgs,
}

/// Where the KMS server's root key comes from (first match wins): PPML_KMS_ROOT_KEY (hex),
/// a passphrase (Argon2id), or the root key file.
#[derive(Debug, Args, Clone, Default)]
pub struct RootKeyArgs {
    /// Root key file (64 hex characters, mode 0600), created on first start
    /// [default: DATA_DIR.root.key, next to the data directory]
    #[arg(long, env = "PPML_KMS_ROOT_KEY_FILE", value_name = "FILE")]
    pub root_key_file: Option<PathBuf>,
    /// Derive the root key from a passphrase read from this file (Argon2id; the salt is kept
    /// in DATA_DIR/root.salt). PPML_KMS_PASSPHRASE gives the passphrase directly.
    #[arg(long, env = "PPML_KMS_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Options of `ppml kms serve`; each also comes from an env var or the `[server]` table of the
/// configuration file (flags > env > file > default).
#[derive(Debug, Args)]
pub struct KmsServeArgs {
    /// Address to listen on [default: 127.0.0.1:9000]
    #[arg(long, env = "PPML_KMS_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the server's store, audit log and certificate [default:
    /// $PPML_HOME/kms-server]
    #[arg(long, env = "PPML_KMS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub root: RootKeyArgs,
    /// TLS certificate chain (PEM) [default: a self-signed certificate in DATA_DIR/tls,
    /// created on first start; its fingerprint is printed]
    #[arg(
        long,
        env = "PPML_KMS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of --tls-cert
    #[arg(
        long,
        env = "PPML_KMS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS name or IP for the self-signed certificate (repeatable)
    #[arg(long, value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Serve plain HTTP instead of HTTPS (loopback or a trusted network only)
    #[arg(long, env = "PPML_KMS_INSECURE_HTTP", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_http: bool,
    /// Also serve BigDL-RAS's /registerPolicy and /verifyQuote, for BigDL's attestation
    /// clients; they take the api key unsigned in the body, so they are off by default
    #[arg(long, env = "PPML_KMS_BIGDL_RAS", value_parser = clap::builder::BoolishValueParser::new())]
    pub enable_bigdl_ras: bool,
    /// Accept simulated-TEE evidence (development only): from the simulation platforms each
    /// policy names in sim_platforms (public keys); the server holds no platform key
    #[arg(long, env = "PPML_KMS_ALLOW_SIMULATION", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_simulation: bool,
    /// Collateral JSON for verifying SGX quotes (docs/attestation.md §3)
    #[arg(long, value_name = "FILE")]
    pub sgx_collateral: Option<PathBuf>,
    /// Collateral JSON for verifying TDX quotes
    #[arg(long, value_name = "FILE")]
    pub tdx_collateral: Option<PathBuf>,
    #[command(flatten)]
    pub pccs: PccsArgs,
    /// Lifetime of attestation tokens in seconds [default: 300]; runtimes attest again
    /// before theirs expires
    #[arg(long, value_name = "SECONDS")]
    pub attestation_token_ttl: Option<u64>,
}

/// Where DCAP collateral comes from when no collateral file is given.
#[derive(Debug, Args, Clone, Default)]
pub struct PccsArgs {
    /// Fetch DCAP collateral from this PCCS (or https://api.trustedservices.intel.com) and
    /// cache it; collateral files given for a TEE take precedence
    #[arg(long, env = "PPML_PCCS_URL", value_name = "URL")]
    pub pccs_url: Option<String>,
    /// PEM CA certificate of the PCCS's TLS certificate (a local PCCS is usually
    /// self-signed); the system roots are trusted too
    #[arg(long, env = "PPML_PCCS_CA_CERT", value_name = "FILE")]
    pub pccs_ca_cert: Option<PathBuf>,
    /// Refetch cached collateral older than this many seconds [default: 3600]
    #[arg(long, value_name = "SECONDS")]
    pub collateral_refresh: Option<u64>,
}

/// Unix seconds, or an RFC 3339 date and time.
fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let when = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
        format!("{text:?} is neither Unix seconds nor an RFC 3339 time (2025-07-01T00:00:00Z): {e}")
    })?;
    u64::try_from(when.timestamp()).map_err(|_| format!("{text:?} is before 1970"))
}
