//! Job receipts (`docs/receipts.md`): every job that writes an output leaves one in it,
//! signed by the attested runtime that ran the job. This module reads and verifies them:
//! the signature, the attestation token that vouches for the signing key (up to the KMS's
//! attestation key), the datasets on storage against the digests the receipt names, and
//! optionally the runtime against a policy of the verifier's.
//!
//! ```no_run
//! # async fn example(kms_key: [u8; 32]) -> ppml::Result<()> {
//! use ppml::receipt::{VerifyOptions, verify_receipt};
//!
//! let output = ppml::DatasetLocation::parse("developers.enc")?;
//! let verified = verify_receipt(
//!     &output,
//!     &VerifyOptions {
//!         kms_attestation_key: Some(kms_key),
//!         require_attested: true,
//!         ..VerifyOptions::default()
//!     },
//! )
//! .await?;
//! println!("job {} ran in {:?}", verified.receipt.body().job.id, verified.receipt.body().runtime.tee);
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use ppml_attestation::Policy;
use ppml_attestation::service::{TokenClaims, verify_token_signature};
use ppml_engine::dataset::read_dataset_file;
use ppml_engine::{DatasetLocation, EngineError};
use ppml_format::manifest::{MANIFEST_FILE_NAME, UnverifiedManifest};
pub use ppml_format::receipt::{
    ExecutorRecord, InputRecord, JobRecord, OutputRecord, RECEIPT_FILE_NAME, Receipt, ReceiptBody,
    ReceiptSignature, RuntimeRecord,
};

/// What a verification checks beyond the receipt itself.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The attestation key of the KMS that attested the runtime (`GetVersion`'s
    /// `attestation_key`): what vouches for receipt keys. Required for attested receipts.
    pub kms_attestation_key: Option<[u8; 32]>,
    /// A policy of the verifier's that the runtime must satisfy (its measurements, TEE,
    /// debug mode, TCB), judged on the claims the KMS verified.
    pub policy: Option<Policy>,
    /// Refuse a receipt of an unattested run.
    pub require_attested: bool,
    /// Open the output with keys from this KMS client (its owner's): checks what only the
    /// output key can, the manifest's MAC, its file list and every part's header. Without
    /// it, a changed MAC (which makes the output unreadable, never different) goes unseen.
    pub output_keys: Option<std::sync::Arc<dyn ppml_kms::KeyManagementService>>,
}

/// Why a receipt does not verify. Each names what differs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// There is no receipt where one was looked for.
    #[error("{0}: no job receipt ({RECEIPT_FILE_NAME})")]
    NoReceipt(String),
    /// The receipt file is not a receipt.
    #[error("{location}: {source}")]
    Malformed {
        /// The receipt file.
        location: String,
        /// What is wrong with it.
        source: ppml_format::receipt::ReceiptError,
    },
    /// The signature does not verify over the body: the receipt was changed after signing.
    #[error(
        "the receipt's signature does not verify: its body was changed after the runtime signed it"
    )]
    Signature,
    /// The output manifest does not bind this receipt file.
    #[error(
        "the output manifest does not bind this receipt: the receipt file was changed, or \
         belongs to another output (manifest: {bound}, receipt file: {found})"
    )]
    NotBound {
        /// The receipt digest the manifest names (`none` when it names none).
        bound: String,
        /// The SHA-256 of the receipt file.
        found: String,
    },
    /// The output dataset is not the one the receipt names.
    #[error("output {location}: its {what} is {found}, the receipt says {expected}")]
    OutputDiffers {
        /// The output dataset.
        location: String,
        /// What differs: `dataset id`, `key id`, `manifest`.
        what: &'static str,
        /// What the receipt says.
        expected: String,
        /// What storage holds.
        found: String,
    },
    /// An input dataset is not the version the receipt names.
    #[error(
        "input {location}: its manifest's SHA-256 is {found}, the receipt says {expected}: the input changed after the job read it"
    )]
    InputDiffers {
        /// The input dataset.
        location: String,
        /// What the receipt says.
        expected: String,
        /// What storage holds.
        found: String,
    },
    /// An input dataset is gone.
    #[error("input {0} is not on storage any more (no manifest)")]
    InputMissing(String),
    /// The run was not attested and the verifier requires it.
    #[error("the receipt is from an unattested run: nothing vouches for the code that ran the job")]
    Unattested,
    /// An attested receipt, and no KMS key to check its token with.
    #[error(
        "an attested receipt is checked against its KMS's attestation key: give the key \
         (--kms-key) or the KMS (--kms-url)"
    )]
    NoKmsKey,
    /// The receipt key is not one the KMS vouched for.
    #[error("the receipt key is not vouched for by the KMS: {0}")]
    Unvouched(String),
    /// The verifier's policy refuses the runtime.
    #[error("the runtime does not satisfy the given policy: {0}")]
    Policy(#[from] ppml_attestation::PolicyViolation),
    /// Reading the datasets failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl VerifyError {
    /// The kind of failure, for exit codes and exception types.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            VerifyError::Signature
            | VerifyError::NotBound { .. }
            | VerifyError::OutputDiffers { .. }
            | VerifyError::InputDiffers { .. } => K::TamperedData,
            VerifyError::Malformed { .. }
            | VerifyError::NoReceipt(_)
            | VerifyError::InputMissing(_) => K::InvalidInput,
            VerifyError::Unattested | VerifyError::Unvouched(_) | VerifyError::Policy(_) => {
                K::AttestationFailed
            }
            VerifyError::NoKmsKey => K::Failure,
            VerifyError::Engine(e) => crate::kind(e),
        }
    }
}

/// A receipt that verified.
#[derive(Clone, Debug)]
pub struct VerifiedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// The claims of the runtime's token, checked with the KMS's key (attested receipts).
    pub token: Option<TokenClaims>,
    /// The claims of each executor's token, checked with the KMS's key.
    pub executors: Vec<TokenClaims>,
    /// Where the output is now, when it is not where the job wrote it (it was moved or
    /// copied with its receipt).
    pub moved_from: Option<String>,
}

impl VerifiedReceipt {
    /// Whether an attested runtime signed the receipt.
    pub fn attested(&self) -> bool {
        self.token.is_some()
    }
}

/// The receipt at `target`: a receipt file, or the output dataset that holds one. Returns the
/// receipt, its file's bytes and the dataset it belongs with.
pub async fn read_receipt(
    target: &DatasetLocation,
) -> Result<(Receipt, Vec<u8>, DatasetLocation), VerifyError> {
    let (bytes, output, display) = match target.as_local() {
        Some(path) if path.is_file() => {
            let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (
                bytes,
                DatasetLocation::Local(parent.to_path_buf()),
                path.display().to_string(),
            )
        }
        _ => {
            let bytes = read_dataset_file(target, RECEIPT_FILE_NAME)
                .await?
                .ok_or_else(|| VerifyError::NoReceipt(target.to_string()))?;
            (
                bytes.to_vec(),
                target.clone(),
                format!("{target}/{RECEIPT_FILE_NAME}"),
            )
        }
    };
    let receipt = Receipt::from_json(&bytes).map_err(|source| VerifyError::Malformed {
        location: display,
        source,
    })?;
    Ok((receipt, bytes, output))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Verifies the receipt at `target` (a receipt file, or the output dataset that holds one):
///
/// 0. a signed receipt's signature verifies over its body with the key it names;
/// 1. the output dataset's manifest binds the receipt file's SHA-256, and is the dataset the
///    receipt names (dataset id, key id, the digest of everything else the manifest binds);
///    with `options.output_keys`, the output opens with its key;
/// 2. every input's manifest on storage is the version the receipt names;
/// 3. for an attested receipt: the signature verifies with the receipt key, the runtime's
///    token is signed by the KMS's attestation key and vouches for that key, and the runtime
///    fields are the token's; each executor's token is the KMS's too;
/// 4. `options.policy`, if any, accepts the runtime's claims; `options.require_attested`, or
///    a policy, refuses an unattested receipt.
pub async fn verify_receipt(
    target: &DatasetLocation,
    options: &VerifyOptions,
) -> Result<VerifiedReceipt, VerifyError> {
    let (receipt, bytes, output) = read_receipt(target).await?;
    let body = receipt.body();
    let display = output.to_string();

    // 0. A signed body is as it was signed (which key signed it is step 3's question).
    let signer = match receipt.signature() {
        None => None,
        Some(_) => Some(receipt.verify_signature().map_err(|e| match e {
            ppml_format::receipt::ReceiptError::Signature => VerifyError::Signature,
            source => VerifyError::Malformed {
                location: display.clone(),
                source,
            },
        })?),
    };

    // 1. The output and the receipt bind each other.
    let manifest_bytes = read_dataset_file(&output, MANIFEST_FILE_NAME)
        .await?
        .ok_or_else(|| EngineError::NotADataset(display.clone()))?;
    let manifest = UnverifiedManifest::from_json(&manifest_bytes)
        .map_err(|e| EngineError::format(format!("{display}/{MANIFEST_FILE_NAME}"), e))?;
    let manifest = manifest.unauthenticated();
    let found = sha256_hex(&bytes);
    match manifest.receipt_sha256() {
        Some(bound) if hex::encode(bound) == found => {}
        bound => {
            return Err(VerifyError::NotBound {
                bound: bound.map_or_else(|| "none".to_string(), hex::encode),
                found,
            });
        }
    }
    let differs = |what, expected: &str, found: String| VerifyError::OutputDiffers {
        location: display.clone(),
        what,
        expected: expected.to_string(),
        found,
    };
    let dataset_id = hex::encode(manifest.dataset_id());
    if dataset_id != body.output.dataset_id {
        return Err(differs("dataset id", &body.output.dataset_id, dataset_id));
    }
    if manifest.key().key_id != body.output.key_id {
        return Err(differs(
            "key id",
            &body.output.key_id,
            manifest.key().key_id.clone(),
        ));
    }
    let content = hex::encode(manifest.content_sha256());
    if content != body.output.content_sha256 {
        return Err(differs(
            "manifest (parts, sizes, key, media type)",
            &body.output.content_sha256,
            content,
        ));
    }
    if let Some(kms) = &options.output_keys {
        ppml_engine::files::verify_dataset(&output, kms.as_ref()).await?;
    }
    let here = output.absolute()?.to_string();
    let moved_from = (here != body.output.location).then(|| body.output.location.clone());

    // 2. The inputs are the versions read.
    for input in &body.inputs {
        let location = DatasetLocation::parse(&input.location)?;
        let bytes = read_dataset_file(&location, MANIFEST_FILE_NAME)
            .await?
            .ok_or_else(|| VerifyError::InputMissing(input.location.clone()))?;
        let found = sha256_hex(&bytes);
        if found != input.manifest_sha256 {
            return Err(VerifyError::InputDiffers {
                location: input.location.clone(),
                expected: input.manifest_sha256.clone(),
                found,
            });
        }
    }

    // 3. Who signed it, and who vouches for the signer.
    let runtime = &body.runtime;
    let (token, executors) = match (signer, runtime.attested) {
        (None, false) => {
            // No unattested runtime satisfies a policy.
            if options.require_attested || options.policy.is_some() {
                return Err(VerifyError::Unattested);
            }
            (None, Vec::new())
        }
        (None, true) => return Err(VerifyError::Signature),
        (Some(signer), attested) => {
            if !attested {
                return Err(VerifyError::Unvouched(
                    "the receipt is signed but says its runtime was not attested".into(),
                ));
            }
            let kms_key = options.kms_attestation_key.ok_or(VerifyError::NoKmsKey)?;
            let token = runtime
                .token
                .as_deref()
                .ok_or_else(|| VerifyError::Unvouched("the receipt carries no token".into()))?;
            let claims = verify_token_signature(token, &kms_key)
                .map_err(|e| VerifyError::Unvouched(format!("the runtime's token: {e}")))?;
            check_runtime(runtime, &claims, &signer)?;
            let executors = runtime
                .executors
                .iter()
                .enumerate()
                .filter_map(|(i, executor)| executor.token.as_deref().map(|t| (i, t)))
                .map(|(i, token)| {
                    verify_token_signature(token, &kms_key)
                        .map_err(|e| VerifyError::Unvouched(format!("executor {i}'s token: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (Some(claims), executors)
        }
    };

    // 4. The verifier's own policy.
    if let (Some(policy), Some(claims)) = (&options.policy, &token) {
        policy.evaluate(&claims.claims)?;
        for executor in &executors {
            policy.evaluate(&executor.claims)?;
        }
    }
    Ok(VerifiedReceipt {
        receipt,
        token,
        executors,
        moved_from,
    })
}

/// Checks that `claims` (the runtime's verified token) vouch for `signer` and say what the
/// receipt's runtime record says.
fn check_runtime(
    runtime: &RuntimeRecord,
    claims: &TokenClaims,
    signer: &[u8; 32],
) -> Result<(), VerifyError> {
    use base64::Engine as _;
    let vouched = claims
        .receipt_key
        .as_deref()
        .and_then(|k| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(k)
                .ok()
        })
        .ok_or_else(|| {
            VerifyError::Unvouched("the runtime's token vouches for no receipt key".into())
        })?;
    // subtle's slice comparison is constant-time and false for slices of other lengths.
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&vouched[..], &signer[..])) {
        return Err(VerifyError::Unvouched(
            "the receipt was signed by another key than the one the runtime's token vouches for"
                .into(),
        ));
    }
    let measurements = serde_json::to_value(&claims.claims.measurements).ok();
    let tee = claims.claims.tee.to_string();
    for (what, recorded, verified) in [
        ("kms", runtime.kms.clone(), Some(claims.iss.clone())),
        ("tee", runtime.tee.clone(), Some(tee)),
        (
            "policy",
            runtime.policy.clone(),
            Some(claims.policy.clone()),
        ),
    ] {
        if recorded != verified {
            return Err(VerifyError::Unvouched(format!(
                "the receipt's runtime {what} is {recorded:?}, its token's {verified:?}"
            )));
        }
    }
    if runtime.measurements != measurements {
        return Err(VerifyError::Unvouched(
            "the receipt's runtime measurements are not its token's".into(),
        ));
    }
    Ok(())
}
