//! `ppml attest verify`: offline DCAP quote verification and policy evaluation.

use anyhow::{Context, Result};
use ppml_attestation::Policy;
use ppml_attestation::dcap::{Collateral, verify_quote};

use std::sync::Arc;

use crate::cli::AttestVerifyArgs;
use crate::settings::Settings;

pub async fn verify(args: &AttestVerifyArgs, settings: &Settings) -> Result<()> {
    let quote = std::fs::read(&args.quote)
        .with_context(|| format!("reading the quote {}", args.quote.display()))?;
    let policy: Option<Policy> = match &args.policy {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the policy {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing the policy {}", path.display()))?,
            )
        }
    };
    let now = args.at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let collateral = match &args.collateral {
        Some(path) => Arc::new(Collateral::from_file(path)?),
        None => {
            let cache = args
                .collateral_cache
                .clone()
                .unwrap_or_else(|| settings.home.join("collateral-cache"));
            let client = crate::kms_serve::pccs_client(&args.pccs, &cache)?
                .context("--collateral or --pccs-url is needed")?;
            client
                .collateral_for(&quote, now)
                .await
                .with_context(|| format!("collateral for {}", args.quote.display()))?
        }
    };
    let claims = verify_quote(&quote, &collateral, now)
        .with_context(|| format!("{}", args.quote.display()))?;
    println!("{}", serde_json::to_string_pretty(&claims)?);
    if let Some(policy) = policy {
        policy
            .evaluate(&claims)
            .context("Attestation Fail! the policy refuses this runtime")?;
        eprintln!("Attestation Success! the policy accepts this runtime");
    }
    Ok(())
}

pub fn measure() -> Result<()> {
    let measurement = ppml_attestation::sim::executable_measurement()?;
    println!("{}", hex::encode(measurement));
    Ok(())
}
