//! A load generator for a KMS server (`ppml kms bench`): N concurrent clients, each with its
//! own connection, alternate signed `GenerateDataKeyWithoutPlaintext` and `Decrypt` requests
//! for a fixed time; the result is throughput and latency percentiles.

use std::time::{Duration, Instant};

use ppml_kms::protocol::Action;
use ppml_kms::{AppCredentials, KeyManagementService as _, KmsError, PrimaryKeyId};
use serde_json::{Value, json};

use crate::{RemoteKms, RemoteKmsConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadTest {
    /// Concurrent connections (at least 1).
    pub connections: usize,
    /// Measured duration, after [`LoadTest::warm_up`].
    pub duration: Duration,
    /// Unmeasured run before, to open connections and fill caches.
    pub warm_up: Duration,
    /// The app to run as; `None` enrolls a fresh one.
    pub credentials: Option<AppCredentials>,
    /// The primary key to use; `None` creates one.
    pub primary_key: Option<PrimaryKeyId>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Requests answered successfully.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Length of the measured run.
    pub elapsed: Duration,
    /// Latencies of the successful requests, sorted.
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Latency percentile `p` (0..=100), nearest rank.
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

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
                    Action::GenerateDataKeyWithoutPlaintext,
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
                    Action::Decrypt,
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

impl LoadTest {
    /// Runs the load test against the KMS of `config`.
    pub async fn run(&self, config: &RemoteKmsConfig) -> Result<LoadReport, KmsError> {
        if self.connections == 0 {
            return Err(KmsError::InvalidConfig(
                "a load test needs at least one connection".into(),
            ));
        }
        let creds = match &self.credentials {
            Some(creds) => creds.clone(),
            None => RemoteKms::connect(config, None).await?.enroll().await?,
        };
        let setup = RemoteKms::connect(config, Some(creds.clone())).await?;
        let keyid = match &self.primary_key {
            Some(key) => key.0.clone(),
            None => setup.create_primary_key().await?.0,
        };
        // One client (one connection pool) per worker, so each worker has its own connection.
        let mut clients = Vec::new();
        for _ in 0..self.connections {
            clients.push(RemoteKms::connect(config, Some(creds.clone())).await?);
        }
        let join = |e: tokio::task::JoinError| KmsError::Protocol(format!("load worker: {e}"));
        let warm_up = Instant::now() + self.warm_up;
        let warm: Vec<_> = clients
            .iter()
            .map(|c| tokio::spawn(worker(c.clone(), keyid.clone(), warm_up)))
            .collect();
        for task in warm {
            task.await.map_err(join)?;
        }
        let started = Instant::now();
        let until = started + self.duration;
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::spawn(worker(c, keyid.clone(), until)))
            .collect();
        let mut report = LoadReport {
            ok: 0,
            failed: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        };
        for task in tasks {
            let result = task.await.map_err(join)?;
            report.latencies.extend(result.latencies);
            report.failed += result.errors;
            report.first_error = report.first_error.or(result.first_error);
        }
        report.elapsed = started.elapsed();
        report.latencies.sort_unstable();
        report.ok = report.latencies.len() as u64;
        Ok(report)
    }
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
