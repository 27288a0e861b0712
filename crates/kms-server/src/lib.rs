//! ppml's KMS server: the eHSM-KMS REST protocol (`docs/kms-api.md`) over a crash-safe redb
//! store in which every api key and every primary key is sealed under a root key.
//!
//! - [`store`]: the redb store and the root key.
//! - [`api`]: the axum router, request validation and the actions.
//! - `ras`: BigDL-RAS compatible `/registerPolicy` and `/verifyQuote` (docs/attestation.md §6.5).
//! - [`tls`]: the server certificate (given, or self-signed on first start) and the TLS listener.
//! - [`server`]: starting a server from a [`ServerConfig`]: data directory, root key, store,
//!   audit log, attestation service, TLS and listener ([`serve`], [`KmsServer`]).
//! - `sealed`: a KMS in a TEE before its owner's root key arrives (`docs/attestation.md` §9).

pub mod api;
pub mod audit;
mod error;
mod ras;
mod sealed;
pub mod server;
pub mod store;
pub mod tls;

pub use api::{ServerState, router};
pub use error::ApiError;
pub use server::{
    AttestationSettings, KmsServer, OwnTee, RootKeySource, ServerConfig, ServerError, TlsMode,
    serve,
};
pub use store::PassphraseParams;
pub use store::{RootKey, Store};
