//! ppml's Apache DataFusion integration.
//!
//! - [`dataset`]: opening an encrypted dataset (manifest verified, data key released by the
//!   KMS, every part's header checked) and writing one atomically.
//! - [`store`]: [`DecryptingStore`], an `object_store` that serves the *plaintext* of verified
//!   part files, decrypting segment by segment while DataFusion streams byte ranges. DataFusion's
//!   own CSV source, with its file-range splitting and parallelism, then works unchanged, and
//!   no decrypted copy is ever written to disk.
//! - [`session`]: a DataFusion session whose file store decrypts, plus encrypted CSV output.
//! - [`spill`]: [`spill::EncryptedSpill`], DataFusion's spill-file backend for encrypted
//!   sessions: sorts, aggregations and joins under memory pressure spill ppml-encrypted files
//!   under a key that exists only in process memory, never plaintext.
//! - [`simple_query`]: the SimpleQuery application of the reference workflow.
//! - [`app`]: [`app::AppSpec`], the applications ppml runs by name (SimpleQuery, SQL), described
//!   once and run the same way in every placement.
//! - [`location`] and [`s3`]: datasets in directories or under `s3://` prefixes of any
//!   S3-compatible object store (docs/storage.md).
//! - [`files`]: files in, datasets out, and back ([`files::encrypt_paths`],
//!   [`files::decrypt_dataset`]), with the CSV row check of [`csv_split`].
//! - [`output`]: [`output::AtomicFile`], a file that appears only when complete.
//! - [`people`]: the reference workflow's `people.csv` generator.
//! - [`plan_check`]: the operators a ppml runtime runs (an allow-list).

pub mod aligned_writer;
pub mod app;
pub mod bigdl;
pub mod csv_split;
pub mod dataset;
mod error;
pub mod files;
pub mod location;
pub mod output;
pub mod people;
pub mod plan_check;
pub mod pme;
pub mod receipt;
pub mod s3;
#[cfg(test)]
mod s3_tests;
pub mod session;
pub mod simple_query;
pub mod spill;
pub mod staging;
pub mod store;
#[cfg(test)]
mod tests;

pub use error::EngineError;
pub use location::DatasetLocation;
pub use session::{LocalRunner, OutputFormat, OutputTarget, PlanRunner, PpmlSession, WriteSummary};
pub use store::{DatasetPin, DecryptingStore, LOCAL_STORE_URL};

/// Result type of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The KMS `aad` that binds a wrapped data key to one dataset.
pub fn dataset_aad(dataset_id: &[u8; 16]) -> Vec<u8> {
    format!("ppml-dataset:{}", hex_lower(dataset_id)).into_bytes()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
