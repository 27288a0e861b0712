use ppml_kms::KmsError;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A task's ppml settings are missing or malformed.
    #[error("job settings: {0}")]
    JobSettings(String),
    /// The KMS refused or failed to create or release a job's shuffle key.
    #[error("job {job_id}: cannot obtain the shuffle key: {source}")]
    ShuffleKey {
        /// The driver's job id.
        job_id: String,
        /// The KMS error.
        source: KmsError,
    },
    /// A stage plan contains an operator an executor must not run (docs/cluster.md §5.2).
    #[error("refused plan: {0}")]
    RefusedPlan(String),
    /// A task's plan is not a stage its job's driver planned and signed, or the signed
    /// stages are missing or do not verify (docs/cluster.md §6.6).
    #[error("refused stage: {0}")]
    StagePlan(String),
    /// The scheduler could not be reached or refused a request.
    #[error("scheduler {addr}: {message}")]
    Scheduler {
        /// The scheduler's address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The job failed in the cluster.
    #[error("job {job_id} failed: {message}")]
    JobFailed {
        /// Ballista's job id.
        job_id: String,
        /// The scheduler's description of the failure.
        message: String,
    },
    /// Encoding or decoding a plan failed.
    #[error("plan serialisation: {0}")]
    Plan(String),
    /// A Ballista component failed.
    #[error(transparent)]
    Ballista(#[from] ballista_core::error::BallistaError),
    /// DataFusion failed.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// The application failed: planning, reading its inputs or writing its output.
    #[error(transparent)]
    App(#[from] ppml_engine::EngineError),
    /// The scheduler's list of shuffle or result files is not the one the plan makes: a file
    /// listed twice, one missing, or one of another stage or partition. Each file proves its
    /// own place in the job; this is what the list as a whole must satisfy.
    #[error("incomplete or altered shuffle files: {0}")]
    ShuffleFiles(String),
    /// Setting up TLS or networking failed.
    #[error("{0}")]
    Setup(String),
}

impl From<ClusterError> for datafusion::error::DataFusionError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::DataFusion(e) => e,
            other => datafusion::error::DataFusionError::External(Box::new(other)),
        }
    }
}
