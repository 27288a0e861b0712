//! Command-line interface definition.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ppml: privacy-preserving analytics over encrypted data.
///
/// Data is encrypted under data keys that a KMS generates and wraps under your primary key;
/// queries run with Apache DataFusion directly on the encrypted files and write encrypted
/// results. With no KMS options, an embedded KMS in $PPML_HOME (default ~/.ppml) is created on
/// first use.
///
/// Exit codes: 0 success; 1 failure (I/O, internal); 2 usage error; 3 bad input data (tampered,
/// truncated, not a ppml file, malformed CSV); 4 key access denied (credentials, wrong key).
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
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Do not fsync outputs before renaming them into place (faster; a crash may then leave
    /// an output that fails verification, never a wrong one)
    #[arg(long, env = "PPML_NO_SYNC", global = true)]
    pub no_sync: bool,
    /// No progress bars or summaries
    #[arg(short, long, global = true)]
    pub quiet: bool,
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
    /// Run SimpleQuery on an encrypted people dataset
    SimpleQuery(SimpleQueryArgs),
    /// Run SQL over encrypted tables
    Query(QueryArgs),
    /// Run the whole workflow (KMS, generate, encrypt, query, decrypt, check) in one go
    Quickstart(QuickstartArgs),
    /// Manage the embedded KMS
    #[command(subcommand)]
    Kms(KmsCommand),
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
    /// Output dataset directory
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Split a CSV file into N part files on row boundaries (each with the header)
    #[arg(long, default_value_t = 1)]
    pub partitions: usize,
    /// The CSV input has no header line
    #[arg(long)]
    pub no_header: bool,
    /// Plaintext bytes per encrypted segment
    #[arg(long, default_value_t = ppml_format::DEFAULT_SEGMENT_SIZE)]
    pub segment_size: u32,
    /// Replace an existing output (only after the new one is complete)
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Input dataset directory
    #[arg(long = "in", value_name = "DIR")]
    pub input: PathBuf,
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
    /// Replace an existing output (only after the new one is complete)
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct SimpleQueryArgs {
    /// Encrypted input dataset (people: name,age,job)
    #[arg(long, value_name = "DIR")]
    pub input: PathBuf,
    /// Encrypted output dataset
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
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
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// SQL to run
    #[arg(long)]
    pub sql: String,
    /// A table: NAME=DIR (an encrypted dataset); repeatable
    #[arg(long = "table", value_name = "NAME=DIR", required = true)]
    pub tables: Vec<String>,
    /// Write the result as an encrypted dataset instead of printing it
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Parallelism of the scans [default: number of cores]
    #[arg(long, value_name = "N")]
    pub input_partitions: Option<usize>,
    /// Number of output part files
    #[arg(long, value_name = "N")]
    pub output_partitions: Option<usize>,
    /// Replace an existing output
    #[arg(long)]
    pub overwrite: bool,
    /// Tables are plaintext CSV, output plaintext (for comparisons and benchmarks)
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
}

#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Create the embedded KMS (root key, store) if it does not exist
    Init,
    /// Register a new application; prints its app id and api key (shown once)
    Enroll,
    /// Create a primary key for the current application
    CreateKey,
    /// List the current application's primary keys
    ListKeys,
    /// Run the KMS server (eHSM-compatible REST API, see docs/kms-api.md)
    Serve(KmsServeArgs),
}

#[derive(Debug, Args)]
pub struct KmsServeArgs {
    /// Address to listen on
    #[arg(long, env = "PPML_KMS_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: String,
    /// Directory of the server's store [default: $PPML_HOME/kms-server]
    #[arg(long, env = "PPML_KMS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Root key file (64 hex characters, mode 0600), created on first start
    /// [default: DATA_DIR/root.key]; PPML_KMS_ROOT_KEY (hex) takes precedence
    #[arg(long, value_name = "FILE")]
    pub root_key_file: Option<PathBuf>,
    /// Serve plain HTTP. Required for now: TLS is not implemented yet, and the server refuses
    /// to start without this explicit acknowledgement.
    #[arg(long)]
    pub insecure_http: bool,
}
