//! The scheduler's job log service (docs/cluster.md §4, cluster mode).
//!
//! A cluster-mode job's driver runs as a task on an executor, so the submitting machine cannot
//! see its output. The driver sends its progress lines to the scheduler, which keeps the last
//! [`MAX_LINES_PER_JOB`] lines of the last [`MAX_JOBS`] jobs in memory (as Ballista keeps its
//! job state), and `ppml logs JOB` reads them back. Lines are written by ppml's driver code
//! only: phases, paths, counts and errors, never row values.
//!
//! The service is gRPC `ppml.cluster.Jobs`, served next to Ballista's `SchedulerGrpc` on the
//! scheduler's port with the same mutual TLS. It is written out by hand here, as
//! `tonic-build` would generate it, because generating it would need `protoc` at build time
//! for two small messages (prost's derive needs no `protoc`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::transport::Channel;

/// Lines kept per job; older lines are dropped (and counted).
pub const MAX_LINES_PER_JOB: usize = 10_000;
/// Jobs whose logs are kept; the logs of the oldest job are dropped first.
pub const MAX_JOBS: usize = 1_000;
/// Longest line kept; longer lines are cut.
pub const MAX_LINE_LEN: usize = 4_096;

const SERVICE: &str = "ppml.cluster.Jobs";
const APPEND_PATH: &str = "/ppml.cluster.Jobs/AppendLog";
const READ_PATH: &str = "/ppml.cluster.Jobs/ReadLog";

/// `AppendLog` request: lines of one job.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendLogRequest {
    /// Ballista's job id.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// The lines, without line breaks.
    #[prost(string, repeated, tag = "2")]
    pub lines: Vec<String>,
}

/// `AppendLog` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppendLogResponse {}

/// `ReadLog` request: the lines of a job from number `from` on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadLogRequest {
    /// Ballista's job id.
    #[prost(string, tag = "1")]
    pub job_id: String,
    /// Number of the first line wanted (0 = the first line ever appended).
    #[prost(uint64, tag = "2")]
    pub from: u64,
}

/// `ReadLog` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadLogResponse {
    /// The lines from `first` on.
    #[prost(string, repeated, tag = "1")]
    pub lines: Vec<String>,
    /// Number of the first line returned (more than the request's `from` if lines were
    /// dropped).
    #[prost(uint64, tag = "2")]
    pub first: u64,
    /// Whether the scheduler knows the job's log at all.
    #[prost(bool, tag = "3")]
    pub known: bool,
}

#[derive(Default)]
struct JobLog {
    /// Number of the first line in `lines`.
    first: u64,
    lines: VecDeque<String>,
}

/// The scheduler's side: every job's log, in memory.
#[derive(Clone, Default)]
pub struct JobsService {
    logs: Arc<Mutex<JobLogs>>,
}

#[derive(Default)]
struct JobLogs {
    jobs: BTreeMap<String, JobLog>,
    /// Jobs in the order their logs started, to drop the oldest.
    order: VecDeque<String>,
}

impl std::fmt::Debug for JobsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobsService").finish_non_exhaustive()
    }
}

impl JobsService {
    /// An empty service.
    pub fn new() -> Self {
        Self::default()
    }

    fn append(&self, request: AppendLogRequest) -> Result<AppendLogResponse, tonic::Status> {
        if !crate::job::valid_job_id(&request.job_id) {
            return Err(tonic::Status::invalid_argument("invalid job id"));
        }
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if !logs.jobs.contains_key(&request.job_id) {
            if logs.order.len() >= MAX_JOBS
                && let Some(oldest) = logs.order.pop_front()
            {
                logs.jobs.remove(&oldest);
            }
            logs.order.push_back(request.job_id.clone());
        }
        let log = logs.jobs.entry(request.job_id).or_default();
        for line in request.lines {
            let mut line: String = line.replace(['\n', '\r'], " ");
            if line.len() > MAX_LINE_LEN {
                let mut cut = MAX_LINE_LEN;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            log.lines.push_back(line);
            if log.lines.len() > MAX_LINES_PER_JOB {
                log.lines.pop_front();
                log.first += 1;
            }
        }
        Ok(AppendLogResponse {})
    }

    fn read(&self, request: ReadLogRequest) -> ReadLogResponse {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        match logs.jobs.get(&request.job_id) {
            None => ReadLogResponse {
                lines: Vec::new(),
                first: request.from,
                known: false,
            },
            Some(log) => {
                let first = request.from.max(log.first);
                let skip = (first - log.first) as usize;
                ReadLogResponse {
                    lines: log.lines.iter().skip(skip).cloned().collect(),
                    first,
                    known: true,
                }
            }
        }
    }
}

impl tonic::server::NamedService for JobsService {
    const NAME: &'static str = SERVICE;
}

/// Adapts one method to tonic's unary handler.
struct Unary<F>(F);

impl<Req, Resp, F> tonic::server::UnaryService<Req> for Unary<F>
where
    F: Fn(Req) -> Result<Resp, tonic::Status> + Clone + Send + 'static,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let result = (self.0)(request.into_inner()).map(tonic::Response::new);
        Box::pin(async move { result })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for JobsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        match request.uri().path() {
            APPEND_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                let method = Unary(move |r: AppendLogRequest| service.append(r));
                Ok(grpc.unary(method, request).await)
            }),
            READ_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                let method = Unary(move |r: ReadLogRequest| Ok(service.read(r)));
                Ok(grpc.unary(method, request).await)
            }),
            _ => Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            }),
        }
    }
}

/// The client side of `ppml.cluster.Jobs`.
#[derive(Clone, Debug)]
pub struct JobsClient {
    inner: tonic::client::Grpc<Channel>,
}

impl JobsClient {
    /// A client on an open channel to the scheduler.
    pub fn new(channel: Channel) -> Self {
        JobsClient {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<Req, Resp>(
        &mut self,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("scheduler not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let path = http::uri::PathAndQuery::from_static(path);
        Ok(self
            .inner
            .unary(tonic::Request::new(request), path, codec)
            .await?
            .into_inner())
    }

    /// Appends `lines` to the log of `job_id`.
    pub async fn append(&mut self, job_id: &str, lines: Vec<String>) -> Result<(), tonic::Status> {
        let _: AppendLogResponse = self
            .unary(
                APPEND_PATH,
                AppendLogRequest {
                    job_id: job_id.to_string(),
                    lines,
                },
            )
            .await?;
        Ok(())
    }

    /// The lines of `job_id`'s log from number `from` on.
    pub async fn read(
        &mut self,
        job_id: &str,
        from: u64,
    ) -> Result<ReadLogResponse, tonic::Status> {
        self.unary(
            READ_PATH,
            ReadLogRequest {
                job_id: job_id.to_string(),
                from,
            },
        )
        .await
    }
}

/// A driver's log: each line goes to the tracing log of its process and to the scheduler's
/// job log. A line that cannot be sent is only logged locally: logging never fails a job.
#[derive(Clone, Debug)]
pub struct DriverLog {
    job_id: String,
    client: Option<JobsClient>,
}

impl DriverLog {
    /// The log of `job_id`, sent through `client` (None: local tracing only).
    pub fn new(job_id: impl Into<String>, client: Option<JobsClient>) -> Self {
        DriverLog {
            job_id: job_id.into(),
            client,
        }
    }

    /// The job this log belongs to.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Records one line (no row values: phases, paths, counts, errors).
    pub async fn line(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(job = %self.job_id, "{line}");
        if let Some(client) = &self.client {
            let mut client = client.clone();
            if let Err(e) = client.append(&self.job_id, vec![line]).await {
                tracing::warn!(job = %self.job_id, "job log not sent to the scheduler: {}", e.message());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(service: &JobsService, job: &str, lines: &[&str]) {
        service
            .append(AppendLogRequest {
                job_id: job.into(),
                lines: lines.iter().map(|l| l.to_string()).collect(),
            })
            .unwrap();
    }

    #[test]
    fn lines_are_read_back_from_an_offset() {
        let service = JobsService::new();
        append(&service, "job1", &["a", "b\nc"]);
        append(&service, "job1", &["d"]);
        let read = service.read(ReadLogRequest {
            job_id: "job1".into(),
            from: 1,
        });
        assert!(read.known);
        assert_eq!(read.first, 1);
        assert_eq!(read.lines, ["b c", "d"]);
        let unknown = service.read(ReadLogRequest {
            job_id: "job2".into(),
            from: 0,
        });
        assert!(!unknown.known && unknown.lines.is_empty());
    }

    #[test]
    fn logs_are_bounded() {
        let service = JobsService::new();
        let long = "é".repeat(MAX_LINE_LEN);
        for _ in 0..MAX_LINES_PER_JOB + 5 {
            append(&service, "job", &[long.as_str()]);
        }
        let read = service.read(ReadLogRequest {
            job_id: "job".into(),
            from: 0,
        });
        assert_eq!(read.first, 5);
        assert_eq!(read.lines.len(), MAX_LINES_PER_JOB);
        assert!(read.lines[0].len() <= MAX_LINE_LEN);
        for job in 0..MAX_JOBS + 1 {
            append(&service, &format!("j{job}"), &["x"]);
        }
        // "job" and "j0" were the oldest.
        for dropped in ["job", "j0"] {
            let read = service.read(ReadLogRequest {
                job_id: dropped.into(),
                from: 0,
            });
            assert!(!read.known, "{dropped}");
        }
        assert!(
            service
                .read(ReadLogRequest {
                    job_id: "j1".into(),
                    from: 0
                })
                .known
        );
    }

    #[test]
    fn invalid_job_ids_are_refused() {
        let service = JobsService::new();
        let refused = service.append(AppendLogRequest {
            job_id: "../x".into(),
            lines: vec!["a".into()],
        });
        assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
