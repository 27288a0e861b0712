//! ppml on Apache DataFusion Ballista (see `docs/cluster.md`).
//!
//! Every executor is an attested runtime: it gets dataset and shuffle keys only from the KMS,
//! and every byte it writes to disk or sends to another process is encrypted.
//!
//! - [`shuffle`]: shuffle files as ppml-format files holding Arrow IPC streams, under a
//!   per-job key, bound to their place in the job.
//! - [`flight`]: the executor's Arrow Flight service, which serves those files (still
//!   encrypted) to other executors and to the driver, and the matching client.
//! - [`job`]: the `ppml.*` settings every task carries, and the job's shuffle key.
//! - [`stages`]: the stage plans the job's driver signs, and how an executor runs only them
//!   and checks that its inputs cover their stage.
//! - [`engine`]: the executor's execution engine: plan checks, encrypted shuffle readers and
//!   writers.
//! - [`process`]: ppml's builds of the Ballista scheduler and executor.
//! - [`metrics`]: Prometheus metrics of the scheduler and executors (counts only), served
//!   at `/metrics` in plain HTTP, and the counting KMS and object store decorators.
//! - [`app`]: running an application ([`ppml_engine::app::AppSpec`]) in this process or on a
//!   cluster: [`app::Placement`], [`app::run_app`].
//! - [`client`]: the driver's [`ppml_engine::PlanRunner`], which runs plans on the cluster.
//! - [`driver`]: cluster mode: the driver as a task on an executor ([`driver::AppDriver`]), its
//!   plan node and ppml's plan codec.
//! - [`submit`]: submitting a cluster-mode job, and following its state and log.
//! - [`jobs`]: the scheduler's job log service, which cluster-mode drivers write to.
//! - [`local`]: a local development cluster of separate processes (`ppml cluster up`).
//! - [`redact`]: what a failed task's error may say outside the executor (no data).
//! - [`tls`]: mutual TLS on every cluster channel: the cluster CA, role certificates, server
//!   configurations and the client endpoint customizer.

pub mod app;
pub mod client;
pub mod driver;
pub mod engine;
mod error;
pub mod flight;
pub mod job;
pub mod jobs;
pub mod local;
pub mod metrics;
pub mod process;
pub mod redact;
pub mod shuffle;
pub mod stages;
pub mod submit;
pub mod tls;

pub use client::ClusterRunner;
pub use error::ClusterError;
