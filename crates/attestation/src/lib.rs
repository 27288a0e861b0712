//! Attestation for ppml (`docs/attestation.md`).
//!
//! - [`claims`]: the normalised claims document every TEE's evidence is reduced to.
//! - [`dcap`]: SGX (quote v3) and TDX (quote v4) DCAP quote verification with dcap-qvl.
//! - [`pccs`]: collateral fetched from a PCCS (or Intel's PCS) and cached.
//! - [`policy`]: which claims an app accepts.
//! - [`evidence`]: evidence providers (Gramine SGX, configfs-tsm TDX) behind one trait.
//! - [`release`]: data keys sealed to an attested runtime's key with HPKE.
//! - [`peer`]: a client's check of a service's own evidence (the KMS's quote).
//! - [`service`]: challenges, evidence bound to them, policy evaluation, signed tokens.
//! - [`sim`]: the simulated TEE for development: same protocol, Ed25519 platform key.

pub mod claims;
pub mod dcap;
pub mod evidence;
pub mod pccs;
pub mod peer;
pub mod policy;
pub mod release;
pub mod service;
pub mod sim;

pub use claims::{Claims, Tee};
pub use evidence::{Evidence, EvidenceError, EvidenceProvider};
pub use policy::{Policy, PolicyViolation};
