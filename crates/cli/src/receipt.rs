//! `ppml receipt show|verify`: job receipts (docs/receipts.md), through `ppml::receipt`.

use anyhow::{Context, Result};
use ppml::DatasetLocation;
use ppml::receipt::{Receipt, VerifyOptions};

use crate::cli::{ReceiptShowArgs, ReceiptVerifyArgs};
use crate::settings::Settings;

/// `ppml receipt show`: the receipt, unchecked.
pub async fn show(args: &ReceiptShowArgs) -> Result<()> {
    let target = DatasetLocation::parse(&args.target)?;
    let (receipt, bytes, _) = ppml::receipt::read_receipt(&target)
        .await
        .map_err(ppml::Error::from)?;
    if args.json {
        print!("{}", String::from_utf8_lossy(&bytes));
    } else {
        print_receipt(&receipt);
        println!("(not verified: run `ppml receipt verify {}`)", args.target);
    }
    Ok(())
}

/// `ppml receipt verify`.
pub async fn verify(args: &ReceiptVerifyArgs, settings: &mut Settings) -> Result<()> {
    let target = DatasetLocation::parse(&args.target)?;
    let kms_attestation_key = match &args.kms_key {
        Some(text) => Some(
            hex::decode(text.trim())
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| crate::exit::UsageError("--kms-key takes 64 hex digits".into()))?,
        ),
        None => settings
            .kms_attestation_key()
            .await
            .context("asking the KMS for its attestation key")?,
    };
    let policy = args
        .policy
        .as_deref()
        .map(crate::attest::read_policy)
        .transpose()?;
    let output_keys = match args.open_output {
        true => Some(settings.kms.open_kms().await?.kms()),
        false => None,
    };
    let options = VerifyOptions {
        kms_attestation_key,
        policy,
        require_attested: args.require_attested,
        output_keys,
    };
    let verified = ppml::receipt::verify_receipt(&target, &options)
        .await
        .map_err(ppml::Error::from)
        .with_context(|| format!("{}: the job receipt does not verify", args.target))?;
    print_receipt(&verified.receipt);
    if let Some(from) = &verified.moved_from {
        println!("note: the output was written to {from} and is now at {target}");
    }
    match (&verified.token, kms_attestation_key) {
        (Some(_), Some(key)) => println!(
            "verified: signed by the runtime's receipt key, which KMS attestation key {} vouched \
             for; {} executor token(s) verified; the output and {} input manifest(s) match{}",
            hex::encode(key),
            verified.executors.len(),
            verified.receipt.body().inputs.len(),
            if args.policy.is_some() {
                "; the runtime satisfies the policy"
            } else {
                ""
            }
        ),
        _ => println!(
            "verified: UNATTESTED run (nothing vouches for what ran); the output and {} input \
             manifest(s) match",
            verified.receipt.body().inputs.len()
        ),
    }
    Ok(())
}

fn print_receipt(receipt: &Receipt) {
    let body = receipt.body();
    let time = |ms: u64| {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| ms.to_string())
    };
    println!(
        "job:      {} ({}, ppml {})",
        body.job.id, body.job.app, body.job.ppml_version
    );
    println!("spec:     {}", body.job.spec);
    if let Some(grant) = &body.job.grant_sha256 {
        println!("grant:    sha256 {grant}");
    }
    let runtime = &body.runtime;
    if runtime.attested {
        println!(
            "runtime:  {} attested by {} under policy {}",
            runtime.tee.as_deref().unwrap_or("?"),
            runtime.kms.as_deref().unwrap_or("?"),
            runtime.policy.as_deref().unwrap_or("?")
        );
        if let Some(measurements) = &runtime.measurements {
            println!("          measurements {measurements}");
        }
    } else {
        println!("runtime:  NOT ATTESTED");
    }
    for (i, executor) in runtime.executors.iter().enumerate() {
        println!(
            "executor: {i} {}",
            if executor.token.is_some() {
                "attested"
            } else {
                "NOT ATTESTED"
            }
        );
    }
    for input in &body.inputs {
        println!(
            "input:    {} (dataset {}, key {}, manifest sha256 {})",
            input.location, input.dataset_id, input.key_id, input.manifest_sha256
        );
    }
    let output = &body.output;
    println!(
        "output:   {} (dataset {}, key {}, {} part(s){})",
        output.location,
        output.dataset_id,
        output.key_id,
        output.parts,
        output
            .rows
            .map(|rows| format!(", {rows} rows"))
            .unwrap_or_default()
    );
    println!(
        "time:     {} to {}",
        time(body.started_at_ms),
        time(body.finished_at_ms)
    );
}
