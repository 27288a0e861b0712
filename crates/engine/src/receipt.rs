//! The job receipt a job's output carries (`docs/receipts.md`): assembled here when the output
//! dataset commits, signed by the runtime's receipt key when the KMS client is an attested
//! runtime's ([`KeyManagementService::receipt_attestation`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use ppml_format::manifest::Manifest;
use ppml_format::receipt::{
    ExecutorRecord, InputRecord, JobRecord, OutputRecord, Receipt, ReceiptBody, RuntimeRecord,
};
use ppml_kms::KeyManagementService;
use serde_json::Value;

use crate::store::DatasetPin;
use crate::{DatasetLocation, EngineError, Result};

/// The attestation tokens of the executors a distributed job's result was computed by, as
/// the result's files carry them (`ppml_cluster::shuffle`): filled in while the result is
/// read, listed in the job's receipt once it is written.
#[derive(Debug, Default)]
pub struct ExecutorAttestations(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl ExecutorAttestations {
    /// Most tokens kept (a long job renews each executor's token every few minutes).
    pub const MAX: usize = 4096;

    /// Adds `tokens`, up to [`ExecutorAttestations::MAX`] in all.
    pub fn extend(&self, tokens: impl IntoIterator<Item = String>) {
        let mut set = self.0.lock().expect("attestations lock");
        for token in tokens {
            if set.len() >= Self::MAX {
                break;
            }
            set.insert(token);
        }
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("attestations lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// What a job is, for its receipt: set by whoever runs it ([`crate::app::AppSpec::run`], a
/// library program's write) in [`crate::dataset::WriteOptions::job`].
#[derive(Clone, Debug)]
pub struct JobDescription {
    /// The application: `simple_query`, `sql`, `dataframe` or `stream`.
    pub app: String,
    /// Its canonical description (the application's parameters, the SQL text, a plan).
    pub spec: Value,
    /// The datasets it read; [`crate::PpmlSession::write`] fills them in from the plan when
    /// empty.
    pub inputs: Vec<InputRecord>,
    /// When it started, Unix milliseconds.
    pub started_at_ms: u64,
    /// The executors that computed it, when its plans ran on a cluster; set by
    /// [`crate::PpmlSession::write`] from its runner.
    pub executors: Option<Arc<ExecutorAttestations>>,
    /// The data owner's grant it runs under, when the KMS client does not carry it (an
    /// unattested client keeps no grant: [`KeyManagementService::job_grant`]).
    pub grant: Option<ppml_kms::GrantRecord>,
}

impl JobDescription {
    /// A job of `app` described by `spec`, starting now.
    pub fn new(app: impl Into<String>, spec: Value) -> Self {
        JobDescription {
            app: app.into(),
            spec,
            inputs: Vec::new(),
            started_at_ms: now_ms(),
            executors: None,
            grant: None,
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The input record of a verified dataset read from `location`.
pub(crate) fn input_record(
    location: &DatasetLocation,
    dataset: &crate::dataset::VerifiedDataset,
) -> Result<InputRecord> {
    Ok(InputRecord {
        location: location.absolute()?.to_string(),
        dataset_id: crate::hex_lower(dataset.manifest.dataset_id()),
        key_id: dataset.manifest.key().key_id.clone(),
        manifest_sha256: crate::hex_lower(&dataset.manifest_sha256),
    })
}

/// The datasets `plan` scans, as `opened` (the session's datasets by pin) records them, in
/// the order of their locations. Every table of an encrypted session is read through a
/// pinned location (`<pin>/…`), so the pins in the plan's file groups are exactly the
/// dataset versions it reads.
pub(crate) fn inputs_of(
    plan: &Arc<dyn ExecutionPlan>,
    opened: &std::collections::HashMap<DatasetPin, InputRecord>,
) -> Vec<InputRecord> {
    let mut found = BTreeMap::new();
    let _ = plan.apply(|node| {
        if let Some(config) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
        {
            for file in config.file_groups.iter().flat_map(|g| g.files()) {
                let pin = file
                    .object_meta
                    .location
                    .parts()
                    .next()
                    .and_then(|segment| DatasetPin::parse(segment.as_ref()));
                if let Some(record) = pin.and_then(|pin| opened.get(&pin)) {
                    found.insert(
                        (record.location.clone(), record.manifest_sha256.clone()),
                        record.clone(),
                    );
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found.into_values().collect()
}

/// What the runtime record says of the runtime a token was issued to: read from the token
/// the KMS just issued to this process (the verifier checks its signature).
fn runtime_record(token: &str) -> Result<RuntimeRecord> {
    let bad = || EngineError::Receipt("the attestation token is not a JWT".into());
    let payload = token.split('.').nth(1).ok_or_else(bad)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad())?;
    let claims: Value = serde_json::from_slice(&payload).map_err(|_| bad())?;
    let text = |value: &Value| value.as_str().map(str::to_string);
    Ok(RuntimeRecord {
        attested: true,
        kms: text(&claims["iss"]),
        tee: text(&claims["claims"]["tee"]),
        measurements: Some(claims["claims"]["measurements"].clone()),
        policy: text(&claims["policy"]),
        token: Some(token.to_string()),
        executors: Vec::new(),
    })
}

/// The receipt file of `job`, whose output at `location` is `manifest` with `rows` rows:
/// signed when `kms` is an attested runtime's. Rows are recorded only where counts may leave
/// the runtime: when the owner's grant says so, or in an unattested run without a grant
/// (which prints them anyway).
pub(crate) async fn receipt_file(
    kms: &dyn KeyManagementService,
    job: &JobDescription,
    location: &DatasetLocation,
    manifest: &Manifest,
    rows: u64,
) -> Result<Vec<u8>> {
    let kms_error = |source| EngineError::Kms {
        dataset: location.to_string(),
        source,
    };
    let attestation = kms.receipt_attestation().await.map_err(kms_error)?;
    let grant = kms.job_grant().or_else(|| job.grant.clone());
    let reveal_counts = match &grant {
        Some(grant) => grant.reveal_counts,
        None => attestation.is_none(),
    };
    let job_id = match &grant {
        Some(grant) => grant.job_id.clone(),
        None => {
            let mut id = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                .map_err(|_| EngineError::Receipt("the random generator failed".into()))?;
            crate::hex_lower(&id)
        }
    };
    let mut runtime = match &attestation {
        Some(attestation) => runtime_record(&attestation.token)?,
        None => RuntimeRecord::default(),
    };
    if let Some(executors) = &job.executors {
        runtime.executors = executors
            .tokens()
            .into_iter()
            .map(|token| ExecutorRecord { token: Some(token) })
            .collect();
    }
    let body = ReceiptBody {
        job: JobRecord {
            id: job_id,
            app: job.app.clone(),
            spec: job.spec.clone(),
            ppml_version: env!("CARGO_PKG_VERSION").to_string(),
            grant_sha256: grant.map(|g| g.sha256_hex),
        },
        runtime,
        inputs: job.inputs.clone(),
        output: OutputRecord {
            location: location.absolute()?.to_string(),
            dataset_id: crate::hex_lower(manifest.dataset_id()),
            key_id: manifest.key().key_id.clone(),
            content_sha256: crate::hex_lower(&manifest.content_sha256()),
            parts: manifest.parts().len() as u64,
            rows: reveal_counts.then_some(rows),
        },
        started_at_ms: job.started_at_ms,
        finished_at_ms: now_ms(),
    };
    let receipt_error = |e: ppml_format::receipt::ReceiptError| EngineError::Receipt(e.to_string());
    let receipt = match attestation {
        Some(attestation) => {
            let message = Receipt::signing_input(&body).map_err(receipt_error)?;
            let signature = kms.sign_receipt(&message).ok_or_else(|| {
                EngineError::Receipt("the attested KMS client has no receipt key".into())
            })?;
            Receipt::signed(body, &attestation.public_key, &signature).map_err(receipt_error)?
        }
        None => Receipt::unsigned(body).map_err(receipt_error)?,
    };
    Ok(receipt.to_json())
}
