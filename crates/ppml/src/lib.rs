//! ppml: privacy-preserving analytics over encrypted data, as a library.
//!
//! Data owners encrypt their data under keys held by a key management service (KMS); queries
//! run with Apache DataFusion directly on the encrypted files, inside attested runtimes when the
//! keys demand it; results are written as new encrypted datasets that only their owner can
//! read. This crate is the surface an application uses; the `ppml` command is one such
//! application. `docs/library.md` walks through it with complete programs.
//!
//! # The workflow in code
//!
//! ```no_run
//! use ppml::{PpmlContext, WriteOptions};
//!
//! # async fn example() -> ppml::Result<()> {
//! // 0. Prepare: the KMS of the environment (`PPML_KMS_URL`, `PPML_APPID`, `PPML_APIKEY`,
//! //    `PPML_PRIMARY_KEY`, …, or the embedded KMS in `$PPML_HOME`, created on first use).
//! let ctx = PpmlContext::builder().build().await?;
//!
//! // 1. Encrypt: a CSV file becomes a dataset under a fresh data key wrapped by the KMS.
//! ctx.encrypt_paths(
//!     "people.csv",
//!     "people.enc",
//!     &ppml::files::EncryptOptions::default(),
//!     &ppml::files::NoProgress,
//! )
//! .await?;
//!
//! // 2. Your application: DataFusion DataFrames over the encrypted data.
//! ctx.register("people", "people.enc").await?;
//! let developers = ctx
//!     .sql("SELECT name, age FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40")
//!     .await?;
//!
//! // 3-4. Run it (here, in this process) and write the result encrypted under the output key.
//! let written = ctx.write(developers, "developers.enc", WriteOptions::default()).await?;
//! println!("{} rows", written.rows);
//! # Ok(())
//! # }
//! ```
//!
//! # Attested runtimes
//!
//! A key marked for attested release (`ppml kms release-policy`) is released only to a
//! process that proved to the KMS what it runs. [`PpmlContextBuilder::attest`] turns the
//! builder into one for a [`PpmlContext<Attested>`], whose `build` attests or fails; an
//! [`Unattested`] context is refused such keys by the KMS. The two are different types:
//!
//! ```compile_fail,E0599
//! # async fn example() -> ppml::Result<()> {
//! let ctx = ppml::PpmlContext::builder().build().await?;
//! // Only an attested context has an attestation.
//! println!("{}", ctx.attestation().policy_id());
//! # Ok(())
//! # }
//! ```
//!
//! ```no_run
//! # async fn example() -> ppml::Result<()> {
//! let ctx = ppml::PpmlContext::builder()
//!     .attest(ppml::Tee::Sgx, "my-policy-id")
//!     .build()
//!     .await?;
//! println!("attested under {}", ctx.attestation().policy_id());
//! # Ok(())
//! # }
//! ```
//!
//! # Where queries run
//!
//! [`Placement::LOCAL`] runs plans in this process; [`client_mode`] makes this process the
//! driver of a ppml cluster (Apache DataFusion Ballista), whose attested executors read,
//! shuffle (encrypted) and compute. Applications known by name ([`AppSpec`]: SimpleQuery, SQL)
//! also run as cluster-mode jobs, whose driver is a task on an executor
//! ([`ppml_cluster::submit::JobClient`]).
//!
//! # Crates underneath
//!
//! [`ppml_format`] (the file format), [`ppml_kms`] (the KMS interface and embedded KMS),
//! [`ppml_kms_client`] (the KMS server client), [`ppml_attestation`], [`ppml_engine`]
//! (DataFusion integration), [`ppml_cluster`] (Ballista integration). This crate re-exports
//! what applications need from them.

#![deny(missing_docs)]

mod attest;
pub mod bigdl_env;
pub mod config;
mod context;
mod error;
pub mod grant;
pub mod job;
pub mod receipt;

use std::path::Path;

pub use attest::{
    AttestationConfig, evidence_provider, kms_audit_head_file, pin_kms_root_id,
    read_kms_audit_head, sim_platform, write_kms_audit_head,
};
pub use config::{GivenSettings, KmsBackend, OpenKms, Settings};
pub use context::{
    Attested, IntoLocation, OutputFormat, PpmlContext, PpmlContextBuilder, RuntimeState,
    Unattested, WriteOptions,
};
pub use error::{Error, ErrorClass, ErrorKind, Result, classify, kind};
pub use ppml_attestation::Tee;
pub use ppml_cluster::app::{ClusterPlacement, Placement};
pub use ppml_engine::app::{AppReport, AppSpec, SimpleQuerySpec, SqlReport, SqlSpec};
pub use ppml_engine::dataset::Durability;
pub use ppml_engine::files::MediaKind;
pub use ppml_engine::{DatasetLocation, WriteSummary};
pub use ppml_kms::{AppCredentials, KmsError, PrimaryKeyId};

/// The DataFusion version ppml runs, for DataFrames, Arrow record batches and SQL.
pub use datafusion;

/// Files in, datasets out, and back (`ppml encrypt`, `ppml decrypt`).
pub mod files {
    pub use ppml_engine::files::{
        DecryptOptions, DecryptOutput, EncryptOptions, EncryptSummary, MediaKind, NoProgress,
        Progress, decrypt_dataset, encrypt_paths, input_files,
    };
}

/// BigDL PPML's datasets into ppml datasets (`docs/migrating-from-bigdl.md` §1).
pub mod bigdl {
    pub use ppml_engine::bigdl::{
        BigDlKeys, ImportOptions, ImportSummary, decrypt_bigdl, import_bigdl, read_key_file,
    };
    pub use ppml_format::bigdl::Variant;
}

/// The reference workflow's sample data: `people.csv` (`name,age,job`).
pub mod sample {
    pub use ppml_engine::people::{Generated, JOBS, generate_people, write_people};
}

/// The crates underneath, for what this crate does not re-export.
pub mod crates {
    pub use ppml_attestation as attestation;
    pub use ppml_cluster as cluster;
    pub use ppml_engine as engine;
    pub use ppml_format as format;
    pub use ppml_kms as kms;
    pub use ppml_kms_client as kms_client;
}

/// A client-mode placement: this process drives the cluster whose scheduler is `master`
/// (`host:port`), over mutual TLS with the driver certificate in `tls_dir` (from
/// `ppml cluster certs`), or in cleartext with `None` (development only).
pub fn client_mode(master: impl Into<String>, tls_dir: Option<&Path>) -> Result<Placement> {
    let customizer = match tls_dir {
        Some(dir) => {
            let tls = ppml_cluster::tls::ClusterTls::load(dir, ppml_cluster::tls::DRIVER)?;
            ppml_cluster::tls::client_customizer(&tls)
        }
        None => None,
    };
    Ok(Placement::Cluster(Box::new(ClusterPlacement {
        master: master.into(),
        target_partitions: None,
        conf: Vec::new(),
        customizer,
        driver_memory: None,
        log: None,
    })))
}
