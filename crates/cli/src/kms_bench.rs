//! `ppml kms bench`: prints what [`ppml_kms_client::load_test`] measured.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ppml_kms::{AppCredentials, PrimaryKeyId};
use ppml_kms_client::load_test::LoadTest;

use crate::cli::KmsBenchArgs;
use crate::settings::Settings;

pub async fn run(args: &KmsBenchArgs, settings: &Settings) -> Result<()> {
    let Some(config) = settings.remote_config()? else {
        crate::usage_bail!("`ppml kms bench` needs a KMS server: pass --kms-url (or PPML_KMS_URL)");
    };
    if args.connections == 0 {
        crate::usage_bail!("--connections must be at least 1");
    }
    let (credentials, primary_key) = match (&settings.appid, &settings.apikey) {
        (Some(appid), Some(apikey)) if !args.enroll => (
            Some(AppCredentials::new(appid.clone(), apikey.clone())),
            settings.primary_key.clone().map(PrimaryKeyId),
        ),
        _ => (None, None),
    };
    let test = LoadTest {
        connections: args.connections,
        duration: Duration::from_secs(args.seconds),
        warm_up: Duration::from_secs(1),
        credentials,
        primary_key,
    };
    eprintln!(
        "benchmarking {} with {} connections for {:?} (warm-up {:?})",
        config.url, test.connections, test.duration, test.warm_up
    );
    let report = test
        .run(&config)
        .await
        .with_context(|| format!("load-testing {}", config.url))?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "requests: {} ok, {} failed in {:.2} s",
        report.ok,
        report.failed,
        report.elapsed.as_secs_f64()
    );
    println!("throughput: {:.0} requests/s", report.throughput());
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        ms(report.percentile(50.0)),
        ms(report.percentile(90.0)),
        ms(report.percentile(99.0)),
        ms(report.latencies.last().copied().unwrap_or_default())
    );
    if let Some(e) = report.first_error {
        bail!("{} requests failed; the first: {e}", report.failed);
    }
    Ok(())
}
