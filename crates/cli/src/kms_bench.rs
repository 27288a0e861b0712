//! `ppml kms bench`: a load generator for a KMS server. N concurrent clients, each with its own
//! connection, alternate signed `GenerateDataKeyWithoutPlaintext` and `Decrypt` requests for a
//! fixed time; the result is throughput and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ppml_kms::{AppCredentials, RemoteKms};
use serde_json::{Value, json};

use crate::cli::KmsBenchArgs;
use crate::settings::Settings;

/// Latency percentile from sorted samples (nearest rank).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct WorkerResult {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn worker(kms: RemoteKms, keyid: String, until: Instant) -> WorkerResult {
    let mut result = WorkerResult {
        latencies: Vec::with_capacity(1 << 16),
        errors: 0,
        first_error: None,
    };
    let mut ciphertext: Option<String> = None;
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = match ciphertext.take() {
            None => kms
                .call(
                    "GenerateDataKeyWithoutPlaintext",
                    json!({"keyid": keyid, "keylen": 32, "aad": "ppml-bench"}),
                )
                .await
                .map(|r| {
                    ciphertext = r
                        .get("ciphertext")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                }),
            Some(c) => kms
                .call(
                    "Decrypt",
                    json!({"keyid": keyid, "ciphertext": c, "aad": "ppml-bench"}),
                )
                .await
                .map(|_| ()),
        };
        match outcome {
            Ok(()) => result.latencies.push(started.elapsed()),
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    result
}

pub async fn run(args: &KmsBenchArgs, settings: &Settings) -> Result<()> {
    let Some(config) = settings.remote_config()? else {
        bail!("`ppml kms bench` needs a KMS server: pass --kms-url (or PPML_KMS_URL)");
    };
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let anonymous = RemoteKms::connect(&config, None)
        .await
        .with_context(|| format!("connecting to {}", config.url))?;
    let creds = match (&settings.appid, &settings.apikey) {
        (Some(appid), Some(apikey)) if !args.enroll => {
            AppCredentials::new(appid.clone(), apikey.clone())
        }
        _ => anonymous.enroll().await?,
    };
    let setup = RemoteKms::connect(&config, Some(creds.clone())).await?;
    let keyid = match (&settings.primary_key, args.enroll) {
        (Some(key), false) => key.clone(),
        _ => {
            use ppml_kms::KeyManagementService as _;
            setup.create_primary_key().await?.0
        }
    };
    eprintln!(
        "benchmarking {} with {} connections for {:?} (warm-up {:?})",
        config.url,
        args.connections,
        Duration::from_secs(args.seconds),
        Duration::from_secs(1)
    );
    // One client (one connection pool) per worker, so each worker has its own connection.
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(RemoteKms::connect(&config, Some(creds.clone())).await?);
    }
    let warm_up = Instant::now() + Duration::from_secs(1);
    let warm: Vec<_> = clients
        .iter()
        .map(|c| tokio::spawn(worker(c.clone(), keyid.clone(), warm_up)))
        .collect();
    for task in warm {
        task.await?;
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(worker(c, keyid.clone(), until)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let result = task.await?;
        latencies.extend(result.latencies);
        errors += result.errors;
        first_error = first_error.or(result.first_error);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let ok = latencies.len() as u64;
    let throughput = ok as f64 / elapsed.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "requests: {ok} ok, {errors} failed in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!("throughput: {throughput:.0} requests/s");
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 90.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    if let Some(e) = first_error {
        bail!("{errors} requests failed; the first: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }
}
