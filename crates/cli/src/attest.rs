//! `ppml attest`: DCAP quote verification, policy evaluation and policy management.

use anyhow::{Context, Result};
use ppml_attestation::Policy;
use ppml_attestation::dcap::{Collateral, verify_quote};

use std::sync::Arc;

use ppml_attestation::Tee;

use crate::cli::{AttestPolicyCommand, AttestVerifyArgs, PolicyNewArgs};
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

/// A quote of this process's TEE over the given report data, base64 on stdout.
pub fn quote(args: &crate::cli::AttestQuoteArgs, settings: &Settings) -> Result<()> {
    let Some(tee) = settings.tee else {
        crate::usage_bail!("ppml attest quote needs --tee sgx|tdx|sim: the TEE to quote");
    };
    let bytes = match hex::decode(&args.report_data) {
        Ok(bytes) if bytes.len() <= 64 => bytes,
        _ => crate::usage_bail!("--report-data must be at most 64 bytes of hex"),
    };
    // Never the given bytes themselves: see user_report_data.
    let report_data = ppml_attestation::service::user_report_data(&bytes);
    let config = ppml::AttestationConfig {
        tee: tee.tee(),
        policy_id: String::new(),
        sim_platform_key: settings.sim_platform_key.clone(),
    };
    let provider = ppml::evidence_provider(&config, &settings.home)?;
    let evidence = provider.evidence(&report_data)?;
    // Standard base64, as eHSM and BigDL-RAS take quotes.
    println!("{}", data_encoding_base64(&evidence.quote));
    Ok(())
}

fn data_encoding_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The public key of this machine's simulation platform, as policies name it.
pub fn sim_platform(settings: &Settings) -> Result<()> {
    let platform = ppml::sim_platform(settings.sim_platform_key.as_deref(), &settings.home)?;
    println!("{}", hex::encode(platform.public_key()));
    Ok(())
}

/// Reads and checks a policy file: valid JSON of a policy that allows some runtime (and, if
/// it allows simulation, names its simulation platforms).
pub fn read_policy(path: &std::path::Path) -> Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the policy {}", path.display()))?;
    let policy: Policy = serde_json::from_str(&text)
        .with_context(|| format!("parsing the policy {}", path.display()))?;
    policy
        .check()
        .with_context(|| format!("the policy {}", path.display()))?;
    Ok(policy)
}

/// The policy `ppml attest policy new` describes.
pub fn new_policy(args: &PolicyNewArgs, settings: &Settings) -> Result<Policy> {
    let tee = args.tee.tee();
    let sim_platforms = if tee != Tee::Sim {
        Vec::new()
    } else if args.sim_platform.is_empty() {
        let platform = ppml::sim_platform(settings.sim_platform_key.as_deref(), &settings.home)?;
        vec![platform.public_key()]
    } else {
        args.sim_platform
            .iter()
            .map(|text| ppml_attestation::policy::parse_sim_platform(text))
            .collect::<Result<_, _>>()
            .context("--sim-platform")?
    };
    let mrenclave = if args.this_binary {
        if tee != Tee::Sim {
            crate::usage_bail!(
                "--this-binary is the simulated TEE's measurement: use it with --tee sim"
            );
        }
        Some(hex::encode(ppml_attestation::sim::executable_measurement()?))
    } else {
        args.mrenclave.clone()
    };
    let mut policy = Policy::for_runtime(
        &ppml_attestation::policy::AllowedMeasurement {
            tee: Some(tee),
            mrenclave,
            mrsigner: args.mrsigner.clone(),
            isvprodid: args.isvprodid,
            min_isvsvn: args.min_isvsvn,
            mrtd: args.mrtd.clone(),
            rtmr: None,
        },
        &sim_platforms,
    )?;
    for status in &args.accept_tcb_status {
        if !policy.accepted_tcb_statuses.contains(status) {
            policy.accepted_tcb_statuses.push(status.clone());
        }
    }
    policy.accepted_advisories = args.accept_advisory.clone();
    policy.allow_debug = args.allow_debug;
    Ok(policy)
}

pub async fn policy(command: &AttestPolicyCommand, settings: &mut Settings) -> Result<()> {
    match command {
        AttestPolicyCommand::New(args) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&new_policy(args, settings)?)?
            );
        }
        AttestPolicyCommand::Check { file } => {
            let policy = read_policy(file)?;
            println!("{}", serde_json::to_string_pretty(&policy)?);
        }
        AttestPolicyCommand::Upload { file } => {
            let policy = read_policy(file)?;
            let remote = settings.open_remote().await?;
            println!("{}", remote.upload_policy(&policy).await?);
        }
        AttestPolicyCommand::Get { id } => {
            let remote = settings.open_remote().await?;
            let policy = remote.get_policy(id).await?;
            println!("{}", serde_json::to_string_pretty(&policy)?);
        }
    }
    Ok(())
}
