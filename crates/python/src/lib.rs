//! The native module of the `ppml` Python package (`ppml._ppml`): a thin PyO3 layer over the
//! [`ppml`] library. Everything it does is a call into that library; what this crate adds is
//! the translation: Python arguments to the library's options, the library's errors to a
//! Python exception class per kind, and query results to the Arrow PyCapsule stream interface
//! (`__arrow_c_stream__`), so that pyarrow, polars, DuckDB and pandas take them as they stream.
//!
//! Calls that wait (attestation, KMS requests, queries, writes) release the GIL, and Ctrl-C
//! cancels them: the main thread checks Python's signals every [`SIGNAL_POLL`] while it waits.
//!
//! The Python-facing API, with its documentation, is `python/ppml/__init__.py` and the type
//! stubs `python/ppml/_ppml.pyi`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow_array::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use arrow_pyarrow::{FromPyArrow, ToPyArrow};
use futures::StreamExt as _;
use ppml::datafusion::arrow::array::{RecordBatch, RecordBatchReader};
use ppml::datafusion::arrow::datatypes::SchemaRef;
use ppml::datafusion::arrow::error::ArrowError;
use ppml::datafusion::dataframe::DataFrame;
use ppml::datafusion::execution::SendableRecordBatchStream;
use ppml::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use ppml::{Attested, ErrorKind, PpmlContext, Unattested};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

create_exception!(
    ppml,
    PpmlError,
    PyException,
    "Base class of every error ppml raises."
);
create_exception!(
    ppml,
    InvalidInput,
    PpmlError,
    "Bad input data: not a ppml file, malformed CSV, a quote that does not verify; and, as \
     its subclass TamperedData, data that fails its authentication."
);
create_exception!(
    ppml,
    TamperedData,
    InvalidInput,
    "Data that fails its authentication: a modified, truncated or reordered file, a dataset \
     whose parts were removed, added, swapped or changed, an edited manifest."
);
create_exception!(
    ppml,
    AccessDenied,
    PpmlError,
    "Access denied: wrong credentials, an unknown or foreign key, a key released only to \
     attested runtimes, a job the owner did not grant; and, as its subclass \
     AttestationFailed, evidence the KMS's policy refuses."
);
create_exception!(
    ppml,
    AttestationFailed,
    AccessDenied,
    "Attestation failed: this runtime's evidence could not be made or the KMS's policy \
     refused it, or the KMS's own evidence did not satisfy this side's policy."
);

/// How often a waiting call lets Python handle signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// The runtime every call of the module runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("ppml")
            .build()
            .expect("a tokio runtime")
    })
}

/// The Python exception for a library error: its class by [`ppml::kind`], its message
/// the error and its causes on one line. In a TEE (an attested context), messages that can
/// quote row values (Arrow's and DataFusion's) are reduced to their kind, as the CLI's are:
/// an exception's text may be printed where the host reads it.
fn to_py(error: ppml::Error, in_tee: bool) -> PyErr {
    let message = if in_tee {
        ppml::crates::cluster::redact::driver_error_text(&error)
    } else {
        ppml::crates::kms::error_chain(&error)
    };
    match error.kind() {
        ErrorKind::TamperedData => TamperedData::new_err(message),
        ErrorKind::InvalidInput => InvalidInput::new_err(message),
        ErrorKind::AttestationFailed => AttestationFailed::new_err(message),
        ErrorKind::AccessDenied => AccessDenied::new_err(message),
        _ => PpmlError::new_err(message),
    }
}

/// Runs `future` to completion without the GIL; Ctrl-C (any exception a signal handler
/// raises) drops it, which cancels what it was doing, and raises. Errors as [`to_py`].
fn wait<T: Send>(
    py: Python<'_>,
    in_tee: bool,
    future: impl Future<Output = ppml::Result<T>> + Send,
) -> PyResult<T> {
    py.detach(|| {
        runtime().block_on(async {
            tokio::pin!(future);
            loop {
                tokio::select! {
                    result = &mut future => return result.map_err(|e| to_py(e, in_tee)),
                    () = tokio::time::sleep(SIGNAL_POLL) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

/// The context in either state: the library keeps them apart as types.
enum AnyContext {
    Unattested(PpmlContext<Unattested>),
    Attested(PpmlContext<Attested>),
}

impl AnyContext {
    /// Whether this process attested, so runs in a TEE whose output the host must not read.
    fn in_tee(&self) -> bool {
        matches!(self, AnyContext::Attested(_))
    }
}

/// Calls the same method on whichever context it is.
macro_rules! with_context {
    ($context:expr, $ctx:ident => $body:expr) => {
        match $context {
            AnyContext::Unattested($ctx) => $body,
            AnyContext::Attested($ctx) => $body,
        }
    };
}

/// A ppml context: the KMS and keys of the environment (the CLI's env vars, `ppml.toml` and
/// `$PPML_HOME`), a DataFusion session that reads encrypted datasets, and, with `tee`, an
/// attestation done before it is returned.
#[pyclass(frozen, module = "ppml._ppml")]
struct Context {
    inner: Arc<AnyContext>,
}

#[pymethods]
impl Context {
    #[new]
    #[pyo3(signature = (*, tee=None, policy=None, grant=None, sim_platform_key=None, kms_url=None, appid=None, apikey=None, home=None, config=None, primary_key=None, output_key=None, master=None, tls_dir=None, target_partitions=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tee: Option<&str>,
        policy: Option<String>,
        grant: Option<PathBuf>,
        sim_platform_key: Option<PathBuf>,
        kms_url: Option<String>,
        appid: Option<String>,
        apikey: Option<String>,
        home: Option<PathBuf>,
        config: Option<PathBuf>,
        primary_key: Option<String>,
        output_key: Option<String>,
        master: Option<String>,
        tls_dir: Option<PathBuf>,
        target_partitions: Option<usize>,
    ) -> PyResult<Self> {
        let in_tee = tee.is_some();
        // As the CLI: arguments over `PPML_*` variables over the configuration file.
        let mut given = ppml::config::GivenSettings::from_env();
        given.kms_url = kms_url.or(given.kms_url);
        given.appid = appid.or(given.appid);
        given.apikey = apikey.or(given.apikey);
        given.home = home.or(given.home);
        given.config = config.or(given.config);
        let settings = ppml::config::Settings::resolve(given).map_err(|e| to_py(e, in_tee))?;
        if grant.is_some() && !in_tee {
            return Err(PyValueError::new_err(
                "grant is for an attested context: give tee and policy too",
            ));
        }
        // An attested context acts under the grant given, else that of `PPML_GRANT`.
        let grant = match in_tee {
            true => grant.or_else(|| settings.grant.clone()),
            false => None,
        }
        .map(|path| ppml::grant::read_grant(&path))
        .transpose()
        .map_err(|e| to_py(e, in_tee))?;
        let mut builder = PpmlContext::builder().settings(settings);
        if let Some(key) = primary_key {
            builder = builder.primary_key(key);
        }
        if let Some(key) = output_key {
            builder = builder.output_key(key);
        }
        if let Some(master) = master {
            builder = builder.placement(
                ppml::client_mode(master, tls_dir.as_deref()).map_err(|e| to_py(e, in_tee))?,
            );
        } else if tls_dir.is_some() {
            return Err(PyValueError::new_err(
                "tls_dir is for a cluster: give master too",
            ));
        }
        if let Some(partitions) = target_partitions {
            builder = builder.target_partitions(partitions);
        }
        let inner = match (tee, policy) {
            (None, None) => AnyContext::Unattested(wait(py, false, builder.build())?),
            (Some(tee), Some(policy)) => {
                let tee = tee.parse().map_err(|e: String| {
                    PyValueError::new_err(format!("tee must be \"sim\", \"sgx\" or \"tdx\": {e}"))
                })?;
                // The simulated TEE's platform key, as the CLI's --sim-platform-key.
                let sim_platform_key = sim_platform_key.or_else(|| {
                    std::env::var_os("PPML_SIM_PLATFORM_KEY")
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from)
                });
                let mut builder = builder.attestation(ppml::AttestationConfig {
                    tee,
                    policy_id: policy,
                    sim_platform_key,
                });
                if let Some(grant) = grant {
                    builder = builder.grant(grant);
                }
                AnyContext::Attested(wait(py, true, builder.build())?)
            }
            (Some(_), None) => {
                return Err(PyValueError::new_err(
                    "tee needs policy: the id of the attestation policy the KMS judges by",
                ));
            }
            (None, Some(_)) => {
                return Err(PyValueError::new_err(
                    "policy needs tee (\"sim\", \"sgx\" or \"tdx\")",
                ));
            }
        };
        Ok(Context {
            inner: Arc::new(inner),
        })
    }

    /// Whether this context attested (it was made with `tee`).
    #[getter]
    fn attested(&self) -> bool {
        self.inner.in_tee()
    }

    /// The encrypted dataset at `path` (a directory or `s3://bucket/prefix`; CSV, NDJSON or
    /// Parquet), verified before this returns.
    fn read(&self, py: Python<'_>, path: String) -> PyResult<Frame> {
        let df = wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx.read(&path).await)
        })?;
        Ok(self.frame(df))
    }

    /// The encrypted CSV dataset at `path`, refused if it holds another format; with
    /// `plaintext`, the plaintext CSV file or directory `path` (`header`: whether its files
    /// start with a header line).
    #[pyo3(signature = (path, *, plaintext=false, header=true))]
    fn read_csv(
        &self,
        py: Python<'_>,
        path: String,
        plaintext: bool,
        header: bool,
    ) -> PyResult<Frame> {
        if !plaintext && !header {
            return Err(PyValueError::new_err(
                "header=False is for plaintext files: an encrypted dataset's manifest says \
                 whether its parts have header lines",
            ));
        }
        self.read_kind(py, path, plaintext, ppml::MediaKind::Csv { header })
    }

    /// The encrypted Parquet dataset at `path`, refused if it holds another format; with
    /// `plaintext`, the plaintext Parquet file or directory `path`.
    #[pyo3(signature = (path, *, plaintext=false))]
    fn read_parquet(&self, py: Python<'_>, path: String, plaintext: bool) -> PyResult<Frame> {
        self.read_kind(py, path, plaintext, ppml::MediaKind::Parquet)
    }

    /// The encrypted NDJSON dataset at `path`, refused if it holds another format; with
    /// `plaintext`, the plaintext newline-delimited JSON file or directory `path`.
    #[pyo3(signature = (path, *, plaintext=false))]
    fn read_json(&self, py: Python<'_>, path: String, plaintext: bool) -> PyResult<Frame> {
        self.read_kind(py, path, plaintext, ppml::MediaKind::Json)
    }

    /// A plaintext file or directory (Parquet, NDJSON, or CSV with a header line).
    fn read_plaintext(&self, py: Python<'_>, path: PathBuf) -> PyResult<Frame> {
        let df = wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx.read_plaintext(&path).await)
        })?;
        Ok(self.frame(df))
    }

    /// Registers the encrypted dataset at `path` as the table `name` for `sql`.
    fn register(&self, py: Python<'_>, name: &str, path: String) -> PyResult<()> {
        wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx.register(name, &path).await)
        })
    }

    /// Registers a plaintext file or directory as the table `name`.
    fn register_plaintext(&self, py: Python<'_>, name: &str, path: PathBuf) -> PyResult<()> {
        wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx.register_plaintext(name, &path).await)
        })
    }

    /// A query over the registered tables, planned now and run when its rows are asked for.
    fn sql(&self, py: Python<'_>, query: &str) -> PyResult<Frame> {
        let df = wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx.sql(query).await)
        })?;
        Ok(self.frame(df))
    }

    /// Writes `data` (a `Frame`, or anything with `__arrow_c_stream__`: a pyarrow Table or
    /// RecordBatchReader, a polars DataFrame) as a new encrypted dataset at `path`, streaming.
    #[pyo3(signature = (data, path, *, format="csv", key=None, partitions=None, overwrite=false))]
    #[allow(clippy::too_many_arguments)]
    fn write<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        path: String,
        format: &str,
        key: Option<String>,
        partitions: Option<usize>,
        overwrite: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let options = ppml::WriteOptions {
            format: format.parse().map_err(|e: String| {
                PyValueError::new_err(format!("format must be csv, json or parquet: {e}"))
            })?,
            key: key.map(ppml::PrimaryKeyId),
            partitions,
            overwrite,
            ..Default::default()
        };
        let summary = match data.cast::<Frame>() {
            Ok(frame) => {
                let df = frame.get().df.clone();
                wait(py, self.inner.in_tee(), async {
                    with_context!(&*self.inner, ctx => ctx.write(df, &path, options).await)
                })?
            }
            Err(_) => {
                let (stream, producer) =
                    python_stream(ArrowArrayStreamReader::from_pyarrow_bound(data)?);
                let written = wait(py, self.inner.in_tee(), async {
                    with_context!(&*self.inner, ctx => ctx.write_stream(stream, &path, options).await)
                });
                // A cancelled or failed write has dropped the stream: the producer stops at
                // its next batch. It may be inside Python code, so it is waited for here,
                // without the GIL, rather than left running into the interpreter's exit.
                py.detach(|| {
                    let _ = runtime().block_on(producer);
                });
                written?
            }
        };
        let out = PyDict::new(py);
        out.set_item("rows", summary.rows)?;
        out.set_item("parts", summary.parts)?;
        out.set_item("plaintext_bytes", summary.plaintext_bytes)?;
        Ok(out)
    }

    /// Encrypts the file or directory `input` into a new dataset at `output`, under the
    /// primary key.
    #[pyo3(signature = (input, output, *, partitions=1, overwrite=false))]
    fn encrypt<'py>(
        &self,
        py: Python<'py>,
        input: PathBuf,
        output: String,
        partitions: usize,
        overwrite: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let options = ppml::files::EncryptOptions {
            partitions,
            overwrite,
            ..Default::default()
        };
        let summary = wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => ctx
                .encrypt_paths(&input, &output, &options, &ppml::files::NoProgress)
                .await)
        })?;
        let out = PyDict::new(py);
        out.set_item("parts", summary.parts)?;
        out.set_item("plaintext_bytes", summary.plaintext_bytes)?;
        Ok(out)
    }

    /// Imports the BigDL PPML dataset `input` (its part files and `.meta`) into a new ppml
    /// dataset at `output` under the primary key, as `ppml import bigdl` does: BigDL's data
    /// key is unwrapped by the context's KMS under `bigdl_key` (the first line of BigDL's
    /// primary key file) [default: the primary key], and every part's HMAC trailer is verified
    /// before the dataset appears. `header`: whether BigDL's CSV parts start with the header
    /// line.
    #[pyo3(signature = (input, output, *, bigdl_key=None, header=true, overwrite=false))]
    fn import_bigdl<'py>(
        &self,
        py: Python<'py>,
        input: PathBuf,
        output: String,
        bigdl_key: Option<String>,
        header: bool,
        overwrite: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let summary = wait(py, self.inner.in_tee(), async {
            with_context!(&*self.inner, ctx => {
                let kms = ctx.kms();
                let primary = kms.primary()?;
                let keys = ppml::bigdl::BigDlKeys::Kms {
                    kms: kms.kms(),
                    primary_key_id: bigdl_key.unwrap_or_else(|| primary.0.clone()),
                };
                let options = ppml::bigdl::ImportOptions {
                    has_header: header,
                    overwrite,
                    ..Default::default()
                };
                let location = ppml::IntoLocation::into_location(output.as_str())?;
                ppml::bigdl::import_bigdl(
                    &keys,
                    &input,
                    kms.kms().as_ref(),
                    primary,
                    location,
                    &options,
                    &ppml::files::NoProgress,
                )
                .await
                .map_err(ppml::Error::from)
            })
        })?;
        let out = PyDict::new(py);
        out.set_item("parts", summary.parts)?;
        out.set_item("plaintext_bytes", summary.plaintext_bytes)?;
        Ok(out)
    }

    /// Verifies the dataset at `dataset` and writes its plaintext to the file `output` (or,
    /// with `directory`, a directory of one file per part); returns the plaintext bytes.
    #[pyo3(signature = (dataset, output, *, directory=false, overwrite=false))]
    fn decrypt(
        &self,
        py: Python<'_>,
        dataset: String,
        output: PathBuf,
        directory: bool,
        overwrite: bool,
    ) -> PyResult<u64> {
        let options = ppml::files::DecryptOptions {
            overwrite,
            ..Default::default()
        };
        wait(py, self.inner.in_tee(), async {
            let target = if directory {
                ppml::files::DecryptOutput::Dir(&output)
            } else {
                ppml::files::DecryptOutput::File(&output)
            };
            with_context!(&*self.inner, ctx => ctx
                .decrypt_dataset(&dataset, target, &options, &ppml::files::NoProgress)
                .await)
        })
    }
}

impl Context {
    /// `read_csv`, `read_parquet` and `read_json`.
    fn read_kind(
        &self,
        py: Python<'_>,
        path: String,
        plaintext: bool,
        kind: ppml::MediaKind,
    ) -> PyResult<Frame> {
        let df = wait(py, self.inner.in_tee(), async {
            if plaintext {
                with_context!(&*self.inner, ctx => ctx.read_plaintext_as(&path, kind).await)
            } else {
                with_context!(&*self.inner, ctx => ctx.read_as(path.as_str(), kind).await)
            }
        })?;
        Ok(self.frame(df))
    }

    fn frame(&self, df: DataFrame) -> Frame {
        Frame {
            df,
            context: self.inner.clone(),
        }
    }
}

/// An Arrow stream from Python as a stream of batches, and the task that pulls them. The
/// producer may be Python code (which takes the GIL itself, released by [`wait`]): batches are
/// pulled on a blocking thread and handed over two at a time at most; the task ends when the
/// producer does or the stream is dropped.
fn python_stream(
    reader: ArrowArrayStreamReader,
) -> (SendableRecordBatchStream, tokio::task::JoinHandle<()>) {
    let schema = reader.schema();
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    let _guard = runtime().enter();
    let producer = tokio::task::spawn_blocking(move || {
        for batch in reader {
            if sender.blocking_send(batch.map_err(Into::into)).is_err() {
                break;
            }
        }
    });
    let batches = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|batch| (batch, receiver))
    });
    (
        Box::pin(RecordBatchStreamAdapter::new(schema, batches)),
        producer,
    )
}

/// The rows of a query, not yet run. It implements the Arrow PyCapsule stream interface:
/// `pyarrow.table(frame)`, `polars.DataFrame(frame)` and DuckDB run it and read its rows as
/// they stream.
#[pyclass(frozen, module = "ppml._ppml")]
struct Frame {
    df: DataFrame,
    context: Arc<AnyContext>,
}

impl Frame {
    /// A frame of the same context.
    fn derived(&self, df: DataFrame) -> Frame {
        Frame {
            df,
            context: self.context.clone(),
        }
    }
}

/// A query's rows as a blocking Arrow reader: each `next` waits on the module's runtime.
struct StreamReader {
    schema: SchemaRef,
    stream: SendableRecordBatchStream,
    /// Keeps the context (its KMS client and session) alive while the stream is read.
    context: Arc<AnyContext>,
}

impl Iterator for StreamReader {
    type Item = Result<RecordBatch, ArrowError>;

    /// An error reaches Python as the consumer's exception text: in a TEE, reduced as
    /// [`to_py`] reduces errors.
    fn next(&mut self) -> Option<Self::Item> {
        let in_tee = self.context.in_tee();
        runtime().block_on(self.stream.next()).map(|batch| {
            batch.map_err(|e| {
                let e = match in_tee {
                    true => ppml::crates::cluster::redact::task_error(e),
                    false => e,
                };
                ArrowError::ExternalError(Box::new(e))
            })
        })
    }
}

impl RecordBatchReader for StreamReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

#[pymethods]
impl Frame {
    /// Runs the query and exports its rows as an Arrow C stream (the PyCapsule interface).
    /// `requested_schema` is not supported (the rows come in their own schema).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        if requested_schema.is_some_and(|s| !s.is_none()) {
            return Err(PyValueError::new_err(
                "a ppml Frame streams its rows in their own schema; cast them afterwards",
            ));
        }
        let df = self.df.clone();
        let context = self.context.clone();
        let stream = wait(py, context.in_tee(), async move {
            with_context!(&*context, ctx => ctx.stream(df).await)
        })?;
        let reader = StreamReader {
            schema: stream.schema(),
            stream,
            context: self.context.clone(),
        };
        // The consumer moves the stream out of the capsule (leaving it released); one it
        // never took is released when the capsule is destroyed.
        let ffi = FFI_ArrowArrayStream::new(Box::new(reader));
        PyCapsule::new_with_value(py, ffi, c"arrow_array_stream")
    }

    /// The rows' schema, as a `pyarrow.Schema`.
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.df.schema().as_arrow().to_pyarrow(py)
    }

    /// Runs the query and returns its rows as a `pyarrow.Table` (in memory: for results
    /// that fit; `write` streams). Errors raise ppml's exceptions (a consumer of
    /// `__arrow_c_stream__` raises its own, with the same message).
    fn to_arrow<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let df = self.df.clone();
        let context = self.context.clone();
        let batches = wait(py, context.in_tee(), async move {
            with_context!(&*context, ctx => ctx.collect(df).await)
        })?;
        // The batches' own schema; the plan's, for a result without rows.
        let schema = match batches.first() {
            Some(batch) => batch.schema().to_pyarrow(py)?,
            None => self.df.schema().as_arrow().to_pyarrow(py)?,
        };
        let batches = batches
            .iter()
            .map(|batch| batch.to_pyarrow(py))
            .collect::<PyResult<Vec<_>>>()?;
        py.import("pyarrow")?
            .getattr("Table")?
            .call_method1("from_batches", (batches, schema))
    }

    /// Runs the query and returns its rows as a `pandas.DataFrame` (through pyarrow; in
    /// memory).
    fn to_pandas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.to_arrow(py)?.call_method0("to_pandas")
    }

    /// Runs the query and returns its rows as a list of `pyarrow.RecordBatch` (in memory).
    fn collect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.to_arrow(py)?.call_method0("to_batches")
    }

    /// The rows for which the SQL condition `condition` holds (`"age > 30 AND job =
    /// 'Developer'"`), still a lazy frame.
    fn filter(&self, condition: &str) -> PyResult<Frame> {
        let in_tee = self.context.in_tee();
        let df = self.df.clone();
        let expr = df
            .parse_sql_expr(condition)
            .map_err(|e| to_py(e.into(), in_tee))?;
        let df = df.filter(expr).map_err(|e| to_py(e.into(), in_tee))?;
        Ok(self.derived(df))
    }

    /// The columns `columns`, in that order, still a lazy frame.
    #[pyo3(signature = (*columns))]
    fn select(&self, columns: Vec<String>) -> PyResult<Frame> {
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        let df = self
            .df
            .clone()
            .select_columns(&names)
            .map_err(|e| to_py(e.into(), self.context.in_tee()))?;
        Ok(self.derived(df))
    }

    /// Registers these rows as the view `name` of the context, for `Context.sql`
    /// (replacing a table or view of that name).
    fn create_view(&self, name: &str) -> PyResult<()> {
        with_context!(&*self.context, ctx => ctx.register_view(name, self.df.clone()))
            .map_err(|e| to_py(e, self.context.in_tee()))
    }

    /// The first `n` rows of the query, still a lazy frame.
    fn limit(&self, n: usize) -> PyResult<Frame> {
        let df = self
            .df
            .clone()
            .limit(0, Some(n))
            .map_err(|e| to_py(e.into(), self.context.in_tee()))?;
        Ok(self.derived(df))
    }

    /// Runs the query and prints its first `n` rows as a table. Refused in an attested
    /// context, as the CLI refuses to print rows in a TEE: standard output is the host's.
    #[pyo3(signature = (n=20))]
    fn show(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        if self.context.in_tee() {
            return Err(PyValueError::new_err(
                "show() prints rows where the host reads them: in an attested context, write \
                 them encrypted (Context.write) for the owner to read",
            ));
        }
        let df = self.limit(n)?.df;
        let context = self.context.clone();
        let text = wait(py, context.in_tee(), async move {
            let batches = with_context!(&*context, ctx => ctx.collect(df).await)?;
            Ok(ppml::datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
        })?;
        py.import("builtins")?.call_method1("print", (text,))?;
        Ok(())
    }

    /// Runs the query (where the context's placement says) and counts its rows.
    fn count(&self, py: Python<'_>) -> PyResult<usize> {
        let df = self.df.clone();
        let context = self.context.clone();
        wait(py, context.in_tee(), async move {
            let mut stream = with_context!(&*context, ctx => ctx.stream(df).await)?;
            let mut rows = 0;
            while let Some(batch) = stream.next().await {
                rows += batch.map_err(ppml::Error::from)?.num_rows();
            }
            Ok(rows)
        })
    }
}

/// Writes `rows` rows of the reference workflow's `people.csv` (`name,age,job`) to `path`,
/// seeded; returns the rows written.
#[pyfunction]
#[pyo3(signature = (path, rows, *, seed=0, overwrite=false))]
fn generate_people(
    py: Python<'_>,
    path: PathBuf,
    rows: u64,
    seed: u64,
    overwrite: bool,
) -> PyResult<u64> {
    py.detach(|| {
        ppml::sample::generate_people(
            &path,
            rows,
            seed,
            overwrite,
            ppml::Durability::default(),
            |_| {},
        )
    })
    .map(|generated| generated.rows)
    .map_err(|e| to_py(e.into(), false))
}

/// The measurement (hex SHA-256) of this process in the simulated TEE: that of its
/// executable, the Python interpreter. A policy that lets this program's simulated evidence
/// through lists it as `mrenclave`.
#[pyfunction]
fn sim_measurement() -> PyResult<String> {
    ppml::crates::attestation::sim::executable_measurement()
        .map(hex::encode)
        .map_err(|e| PpmlError::new_err(e.to_string()))
}

#[pymodule]
fn _ppml(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Context>()?;
    m.add_class::<Frame>()?;
    m.add_function(wrap_pyfunction!(generate_people, m)?)?;
    m.add_function(wrap_pyfunction!(sim_measurement, m)?)?;
    m.add("PpmlError", py.get_type::<PpmlError>())?;
    m.add("InvalidInput", py.get_type::<InvalidInput>())?;
    m.add("TamperedData", py.get_type::<TamperedData>())?;
    m.add("AccessDenied", py.get_type::<AccessDenied>())?;
    m.add("AttestationFailed", py.get_type::<AttestationFailed>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
