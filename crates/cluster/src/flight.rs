//! The executor's Arrow Flight service for encrypted shuffle files, and its client
//! (`docs/cluster.md` §6.4, §7).
//!
//! Stock Ballista serves shuffle files through its own Flight service, which also decodes
//! them (`do_get`). ppml replaces that service as a whole through
//! `ExecutorProcessConfig::override_arrow_flight_service` ([`flight_server_provider`]) with
//! [`PpmlFlightService`], which answers a single action, [`FETCH_ACTION`]: it streams the
//! bytes of one shuffle file, still encrypted, in chunks of [`CHUNK_SIZE`]. Every other Flight
//! method is unimplemented. The reader decrypts locally; TLS (when configured) adds peer
//! authentication.
//!
//! On the client side, [`fetch_shuffle_file`] returns a blocking [`std::io::Read`] over the
//! file's bytes as they arrive, so that a synchronous decoder can consume them with memory
//! bounded by a few chunks.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::job::{MAX_JOB_ID_LEN, valid_job_id};

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use ballista_core::JobId;
use ballista_core::error::BallistaError;
use ballista_core::execution_plans::create_shuffle_path;
use ballista_core::utils::{GrpcServerConfig, create_grpc_server, create_grpc_server_incoming};
use ballista_executor::ArrowFlightServerProvider;
use ballista_executor::shutdown::Shutdown;
use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

/// Name of the only action the service answers.
pub const FETCH_ACTION: &str = "ppml.fetch.v1";

/// Size of the chunks a shuffle file is streamed in (1 MiB).
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Largest gRPC message the server and the client encode or decode (16 MiB).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Chunks buffered between the client's network task and its blocking reader.
const CLIENT_CHANNEL_CAPACITY: usize = 8;

/// Connect timeout of the client's endpoint (the customizer may override it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Body of a fetch action (JSON): which shuffle file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// Ballista job id; must match `^[A-Za-z0-9_-]{1,128}$`.
    pub job_id: String,
    /// Stage that wrote the file.
    pub stage_id: u32,
    /// Output partition of the stage.
    pub partition_id: u32,
    /// Sequence number of the file within the partition.
    pub file_id: u64,
}

impl fmt::Display for FetchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shuffle file (job {:?}, stage {}, partition {}, file {})",
            self.job_id, self.stage_id, self.partition_id, self.file_id
        )
    }
}

/// Where the shuffle file named by `request` lives below `work_dir` (hash-shuffle layout,
/// with a file id), or `None` if the job id is not valid.
pub fn shuffle_file_path(work_dir: &std::path::Path, request: &FetchRequest) -> Option<PathBuf> {
    if !valid_job_id(&request.job_id) {
        return None;
    }
    create_shuffle_path(
        work_dir,
        &JobId::new(request.job_id.as_str()),
        request.stage_id as usize,
        request.partition_id as usize,
        Some(request.file_id),
        false,
    )
    .ok()
}

type BoxedFlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// ppml's executor Flight service: answers only `do_action(FETCH_ACTION)` by streaming the
/// bytes of the (already encrypted) shuffle file, in chunks of [`CHUNK_SIZE`] as
/// `arrow_flight::Result { body }` messages; every other method returns
/// `Status::unimplemented`.
///
/// The job id must match `^[A-Za-z0-9_-]{1,128}$` (else `invalid_argument`), so that a request
/// cannot escape the work directory; a missing file is `not_found`. The file is read with
/// `tokio::fs`, one chunk at a time.
#[derive(Clone, Debug)]
pub struct PpmlFlightService {
    work_dir: PathBuf,
}

impl PpmlFlightService {
    /// A service serving the shuffle files below `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
        }
    }

    /// Opens the file named by a fetch action's body and streams it.
    async fn fetch(&self, body: &[u8]) -> Result<BoxedFlightStream<arrow_flight::Result>, Status> {
        let request: FetchRequest = serde_json::from_slice(body).map_err(|e| {
            Status::invalid_argument(format!("malformed {FETCH_ACTION} request: {e}"))
        })?;
        let path = shuffle_file_path(&self.work_dir, &request).ok_or_else(|| {
            tracing::warn!(job_id = ?request.job_id, "refused fetch with an invalid job id");
            Status::invalid_argument(format!(
                "invalid job id {:?}: must match ^[A-Za-z0-9_-]{{1,{MAX_JOB_ID_LEN}}}$",
                request.job_id
            ))
        })?;
        let not_found = || Status::not_found(format!("{request} not found"));
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => {
                tracing::warn!(%request, path = %path.display(), error = %e, "cannot open shuffle file");
                return Err(Status::internal(format!("cannot open {request}: {e}")));
            }
        };
        let metadata = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("cannot stat {request}: {e}")))?;
        if !metadata.is_file() {
            return Err(not_found());
        }
        tracing::debug!(%request, len = metadata.len(), "serving shuffle file");
        Ok(file_chunks(file, request.to_string()))
    }
}

/// Streams `file` in chunks of [`CHUNK_SIZE`] (the last one shorter), never holding more than
/// one chunk.
fn file_chunks(file: tokio::fs::File, what: String) -> BoxedFlightStream<arrow_flight::Result> {
    let stream = futures::stream::try_unfold(Some(file), move |state| {
        let what = what.clone();
        async move {
            let Some(mut file) = state else {
                return Ok(None);
            };
            let mut chunk = BytesMut::with_capacity(CHUNK_SIZE);
            let mut at_end = false;
            while chunk.len() < CHUNK_SIZE {
                let n = file.read_buf(&mut chunk).await.map_err(|e| {
                    tracing::warn!(file = %what, error = %e, "error reading shuffle file");
                    Status::internal(format!("error reading {what}: {e}"))
                })?;
                if n == 0 {
                    at_end = true;
                    break;
                }
            }
            if chunk.is_empty() {
                return Ok(None);
            }
            let next = if at_end { None } else { Some(file) };
            Ok(Some((
                arrow_flight::Result {
                    body: chunk.freeze(),
                },
                next,
            )))
        }
    });
    Box::pin(stream)
}

#[tonic::async_trait]
impl FlightService for PpmlFlightService {
    type HandshakeStream = BoxedFlightStream<HandshakeResponse>;
    type ListFlightsStream = BoxedFlightStream<FlightInfo>;
    type DoGetStream = BoxedFlightStream<FlightData>;
    type DoPutStream = BoxedFlightStream<PutResult>;
    type DoExchangeStream = BoxedFlightStream<FlightData>;
    type DoActionStream = BoxedFlightStream<arrow_flight::Result>;
    type ListActionsStream = BoxedFlightStream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented("list_flights"))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("get_flight_info"))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }

    async fn do_get(
        &self,
        _request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Status::unimplemented("do_get"))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("do_put"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != FETCH_ACTION {
            return Err(Status::unimplemented(format!(
                "do_action {:?}: only {FETCH_ACTION} is served",
                action.r#type
            )));
        }
        self.fetch(&action.body).await.map(Response::new)
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(Status::unimplemented("list_actions"))
    }
}

/// TLS material for servers; `None` = cleartext (development/tests only).
pub type ServerTls = Option<tonic::transport::ServerTlsConfig>;

/// Builds the provider for `ExecutorProcessConfig::override_arrow_flight_service`: it binds
/// the address (before returning, so that peers may connect at once), serves
/// [`PpmlFlightService`] on the executor's work directory (with `tls` if `Some`) until the
/// `Shutdown` fires, and logs with `tracing`. Maximum message sizes are
/// [`MAX_MESSAGE_SIZE`].
///
/// The provider must be called within a Tokio runtime (Ballista's executor process does).
/// A failure to bind or to set up TLS is returned through the task's result.
pub fn flight_server_provider(tls: ServerTls) -> Arc<ArrowFlightServerProvider> {
    Arc::new(
        move |work_dir: String, addr: SocketAddr, shutdown: Shutdown, config: GrpcServerConfig| {
            start_server(tls.clone(), work_dir, addr, shutdown, &config)
        },
    )
}

fn start_server(
    tls: ServerTls,
    work_dir: String,
    addr: SocketAddr,
    mut shutdown: Shutdown,
    config: &GrpcServerConfig,
) -> JoinHandle<Result<(), BallistaError>> {
    let use_tls = tls.is_some();
    let mut builder = create_grpc_server(config);
    if let Some(tls) = tls {
        builder = match builder.tls_config(tls) {
            Ok(builder) => builder,
            Err(e) => {
                tracing::error!(%addr, error = %e, "invalid TLS configuration for the ppml flight server");
                return tokio::spawn(async move { Err(BallistaError::TonicError(e)) });
            }
        };
    }
    let incoming = match create_grpc_server_incoming(addr, config) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the ppml flight server");
            return tokio::spawn(async move { Err(e) });
        }
    };
    let service = FlightServiceServer::new(PpmlFlightService::new(work_dir.as_str()))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    tracing::info!(%addr, tls = use_tls, %work_dir, "ppml flight server listening");
    tokio::spawn(async move {
        let result = builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { shutdown.recv().await })
            .await;
        match &result {
            Ok(()) => tracing::info!(%addr, "ppml flight server stopped"),
            Err(e) => tracing::error!(%addr, error = %e, "ppml flight server failed"),
        }
        result.map_err(BallistaError::TonicError)
    })
}

/// How clients build their channel: a function applied to the endpoint before connecting
/// (ppml sets TLS here); `None` = use the endpoint as is.
pub type EndpointCustomizer = Option<
    Arc<
        dyn Fn(
                tonic::transport::Endpoint,
            ) -> Result<tonic::transport::Endpoint, tonic::transport::Error>
            + Send
            + Sync,
    >,
>;

/// Errors of [`fetch_shuffle_file`]; each names the executor and the file.
#[derive(Debug, thiserror::Error)]
pub enum FlightError {
    /// The request is not valid (e.g. a bad job id); nothing was sent.
    #[error("invalid request for {file} from executor {addr}: {reason}")]
    InvalidRequest {
        /// Executor address (`host:port`).
        addr: String,
        /// The file requested.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint could not be built (bad URL, or the customizer failed).
    #[error("cannot build endpoint {url} to fetch {file} from executor {addr}: {source}")]
    Endpoint {
        /// Executor address (`host:port`).
        addr: String,
        /// The URL of the endpoint.
        url: String,
        /// The file requested.
        file: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection to the executor failed.
    #[error("cannot connect to executor {addr} to fetch {file}: {source}")]
    Connect {
        /// Executor address (`host:port`).
        addr: String,
        /// The file requested.
        file: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The executor answered with an error status (before or during the transfer).
    #[error(
        "fetching {file} from executor {addr} failed: {code:?}: {message}",
        code = status.code(),
        message = status.message()
    )]
    Status {
        /// Executor address (`host:port`).
        addr: String,
        /// The file requested.
        file: String,
        /// The gRPC status.
        status: Box<Status>,
    },
    /// The transfer stopped without the end of the stream (e.g. the runtime shut down).
    #[error("transfer of {file} from executor {addr} was interrupted")]
    Interrupted {
        /// Executor address (`host:port`).
        addr: String,
        /// The file requested.
        file: String,
    },
}

impl FlightError {
    /// The gRPC status code, if the executor answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            FlightError::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    fn io_kind(&self) -> io::ErrorKind {
        use tonic::Code;
        match self {
            FlightError::InvalidRequest { .. } | FlightError::Endpoint { .. } => {
                io::ErrorKind::InvalidInput
            }
            FlightError::Connect { .. } => io::ErrorKind::ConnectionRefused,
            FlightError::Interrupted { .. } => io::ErrorKind::UnexpectedEof,
            FlightError::Status { status, .. } => match status.code() {
                Code::NotFound => io::ErrorKind::NotFound,
                Code::InvalidArgument => io::ErrorKind::InvalidInput,
                Code::PermissionDenied | Code::Unauthenticated => io::ErrorKind::PermissionDenied,
                Code::DeadlineExceeded => io::ErrorKind::TimedOut,
                Code::Unavailable | Code::Cancelled | Code::Aborted => {
                    io::ErrorKind::ConnectionAborted
                }
                _ => io::ErrorKind::Other,
            },
        }
    }
}

impl From<FlightError> for io::Error {
    fn from(e: FlightError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// Fetches one shuffle file from the executor at `host:port` and returns a blocking
/// [`std::io::Read`] over its bytes as they arrive.
///
/// A task on the current runtime pulls the Flight stream and pushes its chunks into a bounded
/// channel (8 chunks), from which the reader pulls; dropping the reader cancels the transfer.
/// Errors before the first byte (bad request, connection, the executor's answer such as
/// `NotFound`) are returned here; errors later in the stream surface as [`io::Error`] from
/// `read` (wrapping a [`FlightError`]), and stay: every later `read` fails too.
///
/// The URL is `http://host:port` when `customizer` is `None`; otherwise `https://host:port`
/// with the customizer applied.
///
/// Must be called within a Tokio runtime; the returned reader blocks, so use it on a blocking
/// thread (`spawn_blocking`), never on an async worker thread (where it panics).
pub async fn fetch_shuffle_file(
    host: &str,
    port: u16,
    request: &FetchRequest,
    customizer: &EndpointCustomizer,
) -> Result<Box<dyn io::Read + Send>, FlightError> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let file = request.to_string();
    if !valid_job_id(&request.job_id) {
        return Err(FlightError::InvalidRequest {
            addr,
            file,
            reason: format!(
                "job id must match ^[A-Za-z0-9_-]{{1,{MAX_JOB_ID_LEN}}}$, got {:?}",
                request.job_id
            ),
        });
    }
    let body = match serde_json::to_vec(request) {
        Ok(body) => body,
        Err(e) => {
            return Err(FlightError::InvalidRequest {
                addr,
                file,
                reason: e.to_string(),
            });
        }
    };

    let scheme = if customizer.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{addr}");
    let endpoint_error = |source| FlightError::Endpoint {
        addr: addr.clone(),
        url: url.clone(),
        file: file.clone(),
        source,
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(endpoint_error)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let endpoint = match customizer {
        Some(customize) => customize(endpoint).map_err(endpoint_error)?,
        None => endpoint,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| FlightError::Connect {
            addr: addr.clone(),
            file: file.clone(),
            source,
        })?;
    let mut client = FlightServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);

    let status_error = |addr: &str, file: &str, status: Status| FlightError::Status {
        addr: addr.to_owned(),
        file: file.to_owned(),
        status: Box::new(status),
    };
    let action = Action {
        r#type: FETCH_ACTION.to_owned(),
        body: body.into(),
    };
    let mut stream = client
        .do_action(action)
        .await
        .map_err(|s| status_error(&addr, &file, s))?
        .into_inner();
    // The first chunk, so that an error before the first byte is returned here.
    let first = stream
        .message()
        .await
        .map_err(|s| status_error(&addr, &file, s))?;
    tracing::debug!(%addr, %file, "fetching shuffle file");

    let (tx, rx) = mpsc::channel(CLIENT_CHANNEL_CAPACITY);
    let (current, pump) = match first {
        None => (Bytes::new(), None),
        Some(first) => {
            let (addr, file) = (addr.clone(), file.clone());
            let task = tokio::spawn(async move {
                loop {
                    let chunk = match stream.message().await {
                        Ok(Some(message)) if message.body.is_empty() => continue,
                        Ok(Some(message)) => Chunk::Data(message.body),
                        Ok(None) => Chunk::End,
                        Err(status) => {
                            tracing::warn!(%addr, %file, error = %status, "shuffle transfer failed");
                            Chunk::Failed(status_error(&addr, &file, status).into())
                        }
                    };
                    let last = !matches!(chunk, Chunk::Data(_));
                    if tx.send(chunk).await.is_err() || last {
                        // Either done, or the reader was dropped: stop (and drop the stream).
                        return;
                    }
                }
            });
            (first.body, Some(task.abort_handle()))
        }
    };
    Ok(Box::new(FetchReader {
        rx,
        current,
        state: if pump.is_some() {
            State::Open
        } else {
            State::Done
        },
        pump,
        addr,
        file,
    }))
}

/// What the client's network task hands to the reader.
enum Chunk {
    Data(Bytes),
    End,
    Failed(io::Error),
}

enum State {
    Open,
    Done,
    Failed(io::ErrorKind, String),
}

/// The blocking reader returned by [`fetch_shuffle_file`].
struct FetchReader {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
    state: State,
    pump: Option<AbortHandle>,
    addr: String,
    file: String,
}

impl io::Read for FetchReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current[..n]);
                self.current.advance(n);
                return Ok(n);
            }
            match &self.state {
                State::Open => {}
                State::Done => return Ok(0),
                State::Failed(kind, message) => return Err(io::Error::new(*kind, message.clone())),
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(data)) => self.current = data,
                Some(Chunk::End) => self.state = State::Done,
                Some(Chunk::Failed(e)) => {
                    self.state = State::Failed(e.kind(), e.to_string());
                    return Err(e);
                }
                None => {
                    let e: io::Error = FlightError::Interrupted {
                        addr: self.addr.clone(),
                        file: self.file.clone(),
                    }
                    .into();
                    self.state = State::Failed(e.kind(), e.to_string());
                    return Err(e);
                }
            }
        }
    }
}

impl Drop for FetchReader {
    fn drop(&mut self) {
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballista_executor::shutdown::ShutdownNotifier;
    use std::io::Read;

    struct TestServer {
        addr: SocketAddr,
        work_dir: tempfile::TempDir,
        notifier: ShutdownNotifier,
        handle: JoinHandle<Result<(), BallistaError>>,
    }

    impl TestServer {
        fn start() -> Self {
            let work_dir = tempfile::tempdir().unwrap();
            let addr = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap()
            };
            let notifier = ShutdownNotifier::new();
            let provider = flight_server_provider(None);
            let handle = provider(
                work_dir.path().to_str().unwrap().to_owned(),
                addr,
                notifier.subscribe_for_shutdown(),
                GrpcServerConfig::default(),
            );
            Self {
                addr,
                work_dir,
                notifier,
                handle,
            }
        }

        fn write(&self, request: &FetchRequest, data: &[u8]) {
            let path = create_shuffle_path(
                self.work_dir.path(),
                &JobId::new(request.job_id.as_str()),
                request.stage_id as usize,
                request.partition_id as usize,
                Some(request.file_id),
                false,
            )
            .unwrap();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }

        async fn client(&self) -> FlightServiceClient<tonic::transport::Channel> {
            let channel = Endpoint::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
            FlightServiceClient::new(channel)
        }

        async fn fetch(&self, request: &FetchRequest) -> Result<Box<dyn Read + Send>, FlightError> {
            fetch_shuffle_file("127.0.0.1", self.addr.port(), request, &None).await
        }

        async fn stop(self) {
            self.notifier.notify_shutdown.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(30), self.handle)
                .await
                .expect("server did not stop")
                .unwrap()
                .unwrap();
        }
    }

    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    fn request(job_id: &str) -> FetchRequest {
        FetchRequest {
            job_id: job_id.to_owned(),
            stage_id: 2,
            partition_id: 3,
            file_id: 7,
        }
    }

    async fn read_all(mut reader: Box<dyn Read + Send>) -> io::Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .unwrap()
    }

    fn fetch_action(body: impl Into<Bytes>) -> Action {
        Action {
            r#type: FETCH_ACTION.to_owned(),
            body: body.into(),
        }
    }

    #[test]
    fn job_ids() {
        assert!(valid_job_id("aZ09_-"));
        assert!(valid_job_id(&"a".repeat(128)));
        for bad in ["", "../etc", "a/b", ".", "..", "a b", "é", "a\0"] {
            assert!(!valid_job_id(bad), "{bad:?}");
        }
        assert!(!valid_job_id(&"a".repeat(129)));
        assert_eq!(
            shuffle_file_path(std::path::Path::new("/w"), &request("..")),
            None
        );
        assert_eq!(
            shuffle_file_path(std::path::Path::new("/w"), &request("job")),
            Some(PathBuf::from("/w/job/2/3/data-7.arrow"))
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fetches_a_file_in_chunks() {
        let server = TestServer::start();
        let req = request("job_1-A");
        let data = pseudo_random(3 * CHUNK_SIZE + CHUNK_SIZE / 2 + 123, 0x9e37_79b9_7f4a_7c15);
        server.write(&req, &data);

        let reader = server.fetch(&req).await.unwrap();
        let fetched = read_all(reader).await.unwrap();
        assert_eq!(fetched.len(), data.len());
        assert!(fetched == data, "bytes differ");

        // On the wire: 1 MiB chunks, the last one shorter.
        let mut stream = server
            .client()
            .await
            .do_action(fetch_action(serde_json::to_vec(&req).unwrap()))
            .await
            .unwrap()
            .into_inner();
        let mut sizes = Vec::new();
        while let Some(message) = stream.message().await.unwrap() {
            sizes.push(message.body.len());
        }
        assert_eq!(
            sizes,
            [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE / 2 + 123]
        );

        // An empty file is an empty stream.
        let empty = FetchRequest {
            file_id: 8,
            ..req.clone()
        };
        server.write(&empty, &[]);
        assert!(
            read_all(server.fetch(&empty).await.unwrap())
                .await
                .unwrap()
                .is_empty()
        );

        // Dropping a reader mid-stream cancels the transfer and does not hold the server.
        let mut reader = server.fetch(&req).await.unwrap();
        let head = tokio::task::spawn_blocking(move || {
            let mut head = [0u8; 10];
            reader.read_exact(&mut head).unwrap();
            head
        })
        .await
        .unwrap();
        assert_eq!(head, data[..10]);

        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missing_file_is_not_found() {
        let server = TestServer::start();
        let req = request("job1");
        let error: io::Error = match server.fetch(&req).await {
            Err(e) => {
                assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
                e.into()
            }
            Ok(reader) => read_all(reader).await.unwrap_err(),
        };
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let message = error.to_string();
        for part in ["\"job1\"", "stage 2", "partition 3", "file 7", "127.0.0.1"] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn invalid_requests_are_refused() {
        let server = TestServer::start();
        // The client refuses to send it.
        let err = server.fetch(&request("../etc")).await.err().unwrap();
        assert!(matches!(err, FlightError::InvalidRequest { .. }), "{err}");

        // The server refuses it too.
        let mut client = server.client().await;
        for job_id in ["../etc", "..", "", "a/b", &"x".repeat(129)] {
            let status = client
                .do_action(fetch_action(serde_json::to_vec(&request(job_id)).unwrap()))
                .await
                .err()
                .unwrap();
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{job_id:?}: {status}"
            );
        }
        let bodies: [&[u8]; 3] = [
            b"not json",
            br#"{"job_id":"j","stage_id":1,"partition_id":1}"#,
            br#"{"job_id":"j","stage_id":1,"partition_id":1,"file_id":1,"path":"/etc"}"#,
        ];
        for body in bodies {
            let status = client.do_action(fetch_action(body)).await.err().unwrap();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        }
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn other_methods_are_unimplemented() {
        let server = TestServer::start();
        let mut client = server.client().await;
        let unimplemented = |result: Result<_, Status>| match result {
            Ok(_) => panic!("expected unimplemented"),
            Err(status) => assert_eq!(status.code(), tonic::Code::Unimplemented, "{status}"),
        };
        unimplemented(
            client
                .do_get(Ticket {
                    ticket: Bytes::from_static(b"anything"),
                })
                .await
                .map(drop),
        );
        unimplemented(client.list_actions(Empty {}).await.map(drop));
        unimplemented(client.list_flights(Criteria::default()).await.map(drop));
        unimplemented(
            client
                .get_flight_info(FlightDescriptor::default())
                .await
                .map(drop),
        );
        unimplemented(
            client
                .handshake(futures::stream::iter([HandshakeRequest::default()]))
                .await
                .map(drop),
        );
        unimplemented(
            client
                .do_action(Action {
                    r#type: "IO_BLOCK_TRANSPORT".to_owned(),
                    body: Bytes::new(),
                })
                .await
                .map(drop),
        );
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connection_errors_are_returned() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let err = fetch_shuffle_file("127.0.0.1", port, &request("job"), &None)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, FlightError::Connect { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bind_errors_are_reported() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let notifier = ShutdownNotifier::new();
        let handle = flight_server_provider(None)(
            "/nonexistent".to_owned(),
            listener.local_addr().unwrap(),
            notifier.subscribe_for_shutdown(),
            GrpcServerConfig::default(),
        );
        assert!(handle.await.unwrap().is_err());
    }
}
