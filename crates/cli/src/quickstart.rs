//! `ppml quickstart`: the whole workflow in one command, checked end to end.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ppml_engine::OutputFormat;
use ppml_engine::app::AppReport;
use ppml_kms::{AppCredentials, KeyManagementService};

use crate::cli::{DecryptArgs, EncryptArgs, GeneratePeopleArgs, QuickstartArgs, SimpleQueryArgs};
use crate::settings::Settings;
use crate::{crypt, generate, query};

/// Order-independent digest of a multiset of rows: count and wrapping sum of row hashes.
#[derive(Debug, Default, PartialEq, Eq)]
struct RowSet {
    rows: u64,
    sum: u64,
}

impl RowSet {
    fn add(&mut self, row: &str) {
        let mut hasher = DefaultHasher::new();
        row.hash(&mut hasher);
        self.rows += 1;
        self.sum = self.sum.wrapping_add(hasher.finish());
    }
}

fn expected_rows(people: &Path) -> Result<RowSet> {
    let mut set = RowSet::default();
    let reader = BufReader::with_capacity(1 << 20, fs::File::open(people)?);
    for line in reader.lines().skip(1) {
        let line = line?;
        let mut fields = line.split(',');
        let (_, age, job) = (fields.next(), fields.next(), fields.next());
        let age: u32 = age.context("short row")?.parse()?;
        if job == Some("Developer") && (20..=40).contains(&age) {
            set.add(&line);
        }
    }
    Ok(set)
}

fn actual_rows(result: &Path) -> Result<RowSet> {
    let mut set = RowSet::default();
    let reader = BufReader::with_capacity(1 << 20, fs::File::open(result)?);
    let mut lines = reader.lines();
    ensure!(
        lines.next().transpose()?.as_deref() == Some("name,age,job"),
        "the decrypted result does not start with the header name,age,job"
    );
    for line in lines {
        set.add(&line?);
    }
    Ok(set)
}

/// Starts a KMS server (plain HTTP on loopback, inside this process) over
/// `work/kms-server`, accepting simulated TEEs (of the platforms policies name) and itself
/// in the simulated TEE of the platform `work/kms-platform.pk8`, so that clients can verify
/// it; returns its URL. It starts sealed, and stops when the process ends.
async fn start_in_process_kms(work: &Path) -> Result<String> {
    let mut config = ppml_kms_server::ServerConfig::new(work.join("kms-server"));
    config.root_key = ppml_kms_server::RootKeySource::Unseal;
    config.listen = "127.0.0.1:0".into();
    config.tls = ppml_kms_server::TlsMode::InsecureHttp;
    config.attestation.allow_simulation = true;
    config.own_tee = Some(ppml_kms_server::OwnTee {
        tee: ppml_attestation::Tee::Sim,
        sim_platform_key: work.join("kms-platform.pk8"),
    });
    let server = ppml_kms_server::KmsServer::start(&config).await?;
    let url = server.url();
    tokio::spawn(async move {
        if let Err(e) = server.run(std::future::pending()).await {
            tracing::error!(error = %e, "the in-process KMS server stopped");
        }
    });
    Ok(url)
}

pub async fn run(args: &QuickstartArgs, settings: &mut Settings) -> Result<()> {
    let started = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let work = &args.workdir;
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let people = work.join("people.csv");
    let encrypted = work.join("people.enc");
    let output = work.join("developers.enc");
    let decrypted = work.join("developers.csv");
    for stale in [&encrypted, &output] {
        if stale.exists() {
            fs::remove_dir_all(stale)?;
        }
    }
    for stale in [&people, &decrypted] {
        if stale.exists() {
            fs::remove_file(stale)?;
        }
    }

    let t = Instant::now();
    // Without a KMS server configured, quickstart runs one in this process (loopback) with
    // its audit log and attestation, and attests itself in the simulated TEE, so that the
    // main command exercises the real protocol end to end.
    let in_process = settings.kms_url.is_none();
    if in_process {
        let url = start_in_process_kms(work).await?;
        println!(
            "[0/5] prepare: KMS server in this process at {url} (audit log and data in {}), \
             simulated TEE",
            work.join("kms-server").display()
        );
        // The owner's policy for the KMS: this very binary in the simulated TEE of the KMS's
        // platform. Every client below verifies the KMS's quote against it first.
        let kms_platform =
            ppml::sim_platform(Some(&work.join("kms-platform.pk8")), &settings.home)?;
        let kms_policy = ppml_attestation::Policy::for_runtime(
            &ppml_attestation::policy::AllowedMeasurement {
                tee: Some(ppml_attestation::Tee::Sim),
                mrenclave: Some(hex::encode(ppml_attestation::sim::executable_measurement()?)),
                ..Default::default()
            },
            &[kms_platform.public_key()],
        )?;
        let kms_policy_path = work.join("kms-policy.json");
        fs::write(&kms_policy_path, serde_json::to_string_pretty(&kms_policy)?)
            .with_context(|| format!("writing {}", kms_policy_path.display()))?;
        settings.kms_url = Some(url);
        settings.kms_fingerprint = None;
        settings.kms_ca_cert = None;
        settings.kms_policy = Some(kms_policy_path.clone());
        settings.kms_collateral = None;
        // The owner unseals the KMS: its root key goes only to the KMS whose quote satisfies
        // the policy, and the policy then pins that root key.
        let owner_root = work.join("owner-root.key");
        let earlier_root = ppml_kms_server::server::default_root_key_file(&work.join("kms-server"));
        if !owner_root.exists() && earlier_root.exists() {
            // A work directory whose KMS kept its root key on the host: the owner takes it.
            fs::rename(&earlier_root, &owner_root)?;
        }
        let (root_key, _) = ppml_kms_server::server::owner_root_key_file(&owner_root, true)?;
        // The audit head of the last unseal: a KMS over an older copy of its store is refused.
        let head_file = ppml::kms_audit_head_file(&owner_root);
        let last_head = ppml::read_kms_audit_head(&head_file)?;
        let unsealed = ppml_kms_client::RemoteKms::unseal(
            &settings
                .remote_config()?
                .context("a KMS URL is configured")?,
            &root_key,
            last_head.as_ref(),
        )
        .await?;
        if let Some(head) = &unsealed.audit_head {
            ppml::write_kms_audit_head(&head_file, head)?;
        }
        ppml::pin_kms_root_id(&kms_policy_path, &unsealed.root_id)?;
        settings.kms_policy = Some(kms_policy_path.clone());
        println!(
            "      the KMS runs in the simulated TEE, sealed until the owner's root key ({}) \
             unsealed it; clients verify its quote and root id {:.16}… against {} \
             (--kms-policy) before they send anything",
            owner_root.display(),
            hex::encode(unsealed.root_id),
            kms_policy_path.display()
        );
        settings.tee = Some(crate::cli::TeeKind::Sim);
        settings.sim_platform_key = Some(work.join("sim-platform.pk8"));
        settings.appid = None;
        settings.apikey = None;
    }
    let remote = settings
        .connect_remote_anonymous()
        .await?
        .context("a KMS URL is configured")?;
    if !in_process {
        println!("[0/5] prepare: KMS server at {}", remote.kms_id());
    }
    let creds = match (&settings.appid, &settings.apikey) {
        (Some(appid), Some(apikey)) => AppCredentials::new(appid.clone(), apikey.clone()),
        _ => {
            // The data owner's own key: it alone marks the input key for attested release
            // and encrypts under it; the job below gets only the app id and api key.
            if in_process {
                settings.owner_key = Some(work.join("owner.pk8"));
            }
            let (creds, owner_key) = settings.enroll_owned().await?;
            println!(
                "      owner key {} (stays with the data owner)",
                owner_key.display()
            );
            creds
        }
    };
    let mut kms = ppml_kms_client::RemoteKms::connect(
        &settings
            .remote_config()?
            .context("a KMS URL is configured")?,
        Some(creds.clone()),
    )
    .await?;
    if let Some(owner) = settings.load_owner_key()? {
        kms = kms.with_owner_key(owner);
    }
    let primary = kms.create_primary_key().await?;
    if in_process {
        // Release this key's data keys only to this very binary in the simulated TEE of this
        // machine's simulation platform.
        let measurement = hex::encode(ppml_attestation::sim::executable_measurement()?);
        let platform =
            ppml::sim_platform(settings.sim_platform_key.as_deref(), &settings.home)?.public_key();
        let policy = ppml_attestation::Policy {
            allow_simulation: true,
            sim_platforms: vec![hex::encode(platform)],
            ..ppml_attestation::Policy::strict(vec![ppml_attestation::policy::AllowedMeasurement {
                tee: Some(ppml_attestation::Tee::Sim),
                mrenclave: Some(measurement.clone()),
                ..Default::default()
            }])
        };
        let policy_id = kms.upload_policy(&policy).await?;
        kms.set_release_policy(&primary, &policy_id).await?;
        println!(
            "      policy {policy_id}: input keys released only to this binary (sim measurement \
             {measurement:.16}…)"
        );
        settings.attestation_policy = Some(policy_id);
        // Results go under a second key that is not released to runtimes: the owner decrypts
        // them without a TEE, while the inputs stay readable only inside it.
        let output_key = kms.create_primary_key().await?;
        println!("      results are written under the owner's key {output_key}");
        settings.output_key = Some(output_key.0);
    }
    let (appid, apikey) = (creds.appid.clone(), creds.apikey.to_string());
    println!("      enrolled app {appid} and created primary key {primary}");
    settings.appid = Some(appid);
    settings.apikey = Some(apikey);
    settings.primary_key = Some(primary.0.clone());
    timings.push(("prepare", t.elapsed()));

    println!("[1/5] generate {} rows and encrypt them", args.rows);
    let t = Instant::now();
    let generated = generate::run(
        &GeneratePeopleArgs {
            rows: args.rows,
            out: people.clone(),
            seed: args.seed,
            overwrite: false,
        },
        true,
        settings.durability,
    )?;
    timings.push(("generate", t.elapsed()));
    let t = Instant::now();
    crypt::encrypt(
        &EncryptArgs {
            input: people.clone(),
            out: (&encrypted).into(),
            partitions: args.partitions,
            no_header: false,
            no_row_check: false,
            segment_size: ppml_format::DEFAULT_SEGMENT_SIZE,
            to: (args.format != OutputFormat::Csv).then_some(args.format),
            column_keys: Vec::new(),
            plaintext_footer: false,
            overwrite: false,
        },
        settings,
    )
    .await?;
    timings.push(("encrypt", t.elapsed()));

    println!("[2/5] application: SimpleQuery");
    match settings.tee {
        Some(tee) => println!(
            "[3/5] attestation: {tee:?} TEE; the query and the decryption each attest to the \
             KMS, which releases data keys only against a token, sealed to the runtime's key"
        ),
        None => println!("[3/5] attestation: none (no --tee; data keys come from Decrypt)"),
    }
    println!("[4/5] submit: local mode, DataFusion over the encrypted dataset");
    let t = Instant::now();
    let spec = query::simple_query_spec(&SimpleQueryArgs {
        input: (&encrypted).into(),
        output: (&output).into(),
        input_partitions: None,
        output_partitions: Some(1),
        overwrite: false,
        plaintext: false,
        no_preview: false,
    });
    // The owner grants exactly this job (what `ppml grant` writes); the runtime gets the file.
    let output_key = settings.output_primary_key();
    let job = ppml::grant::GrantedJob::App {
        spec: &spec,
        output_key: output_key.as_ref(),
    };
    if settings.tee.is_some()
        && let Some(grant) = settings.job_grant(job, &settings.grant_options).await?
    {
        let file = work.join("job.grant");
        ppml::grant::write_grant(&file, &grant)?;
        let granted = grant.unverified().map_err(ppml::KmsError::from)?;
        println!(
            "      the owner granted job {} (SimpleQuery of {} pinned input(s), output under \
             {}, counts {}): {}",
            granted.job_id,
            granted.inputs.len(),
            granted.output.as_ref().map_or("-", |o| o.key_id.as_str()),
            if granted.reveal_counts {
                "shown"
            } else {
                "withheld"
            },
            file.display()
        );
        settings.grant = Some(file);
    }
    let AppReport::SimpleQuery(report) =
        query::run(&spec, settings, ppml_cluster::app::Placement::LOCAL).await?
    else {
        bail!("SimpleQuery reported another application's result");
    };
    // The grant was for that job only.
    settings.grant = None;
    timings.push(("simple-query", t.elapsed()));

    println!("[5/5] decrypt the result with the data owner's credentials, outside the TEE");
    let t = Instant::now();
    let runtime_tee = if in_process {
        settings.tee.take()
    } else {
        settings.tee
    };
    crypt::decrypt(
        &DecryptArgs {
            input: (&output).into(),
            out: Some(decrypted.clone()),
            out_dir: None,
            to: None,
            overwrite: false,
        },
        settings,
    )
    .await?;
    timings.push(("decrypt", t.elapsed()));
    if in_process {
        // The same credentials outside the TEE cannot read the input.
        let refused = work.join("people.refused.csv");
        let outcome = crypt::decrypt(
            &DecryptArgs {
                input: (&encrypted).into(),
                out: Some(refused.clone()),
                out_dir: None,
                to: None,
                overwrite: false,
            },
            settings,
        )
        .await;
        match outcome {
            Err(err) if !refused.exists() => {
                println!("      outside the TEE the input stays sealed: {err}")
            }
            Err(_) => bail!("a refused decryption left {}", refused.display()),
            Ok(_) => {
                let _ = fs::remove_file(&refused);
                bail!("the input key was released to a process outside the TEE")
            }
        }
        settings.tee = runtime_tee;
    }

    let t = Instant::now();
    if report.count != generated.rows as i64 {
        bail!(
            "count(name) is {}, but {} rows were generated",
            report.count,
            generated.rows
        );
    }
    let expected = expected_rows(&people)?;
    let actual = actual_rows(&decrypted)?;
    if expected.rows != generated.developers_20_to_40 {
        bail!(
            "re-reading people.csv found {} matching rows, the generator counted {}",
            expected.rows,
            generated.developers_20_to_40
        );
    }
    if actual != expected {
        bail!(
            "the decrypted result has {} rows (digest {:x}); expected the generator's {} \
             Developers aged 20..=40 (digest {:x})",
            actual.rows,
            actual.sum,
            expected.rows,
            expected.sum
        );
    }
    timings.push(("check", t.elapsed()));

    // The job's receipt: what ran, what it read, what it wrote, checked as the owner would.
    let t = Instant::now();
    let kms_key = settings.kms_attestation_key().await.ok().flatten();
    let location = ppml::DatasetLocation::Local(output.clone());
    let verified = ppml::receipt::verify_receipt(
        &location,
        &ppml::receipt::VerifyOptions {
            kms_attestation_key: kms_key,
            policy: None,
            require_attested: settings.tee.is_some(),
            // The owner's credentials open the output (its key is the owner's).
            output_keys: Some(settings.kms.open_kms().await?.kms()),
        },
    )
    .await
    .map_err(ppml::Error::from)
    .context("the job's receipt does not verify")?;
    timings.push(("receipt", t.elapsed()));

    println!();
    println!(
        "quickstart OK: {} of {} rows are Developers aged 20..=40; the decrypted result holds exactly them",
        actual.rows, generated.rows
    );
    for (step, d) in &timings {
        println!("  {step:<13} {:>8.3} s", d.as_secs_f64());
    }
    println!(
        "  {:<13} {:>8.3} s",
        "total",
        started.elapsed().as_secs_f64()
    );
    println!(
        "files in {}: people.csv (plaintext input), people.enc/ (encrypted), developers.enc/ (encrypted result), developers.csv (decrypted result)",
        work.display()
    );
    let job = &verified.receipt.body().job.id;
    match (verified.attested(), kms_key) {
        (true, Some(key)) => println!(
            "job receipt verified (job {job}, attested runtime): check it again with\n  \
             ppml receipt verify {} --require-attested --kms-key {}",
            output.display(),
            hex::encode(key)
        ),
        _ => println!(
            "job receipt verified (job {job}, UNATTESTED run; see it with `ppml receipt show {}`)",
            output.display()
        ),
    }
    Ok(())
}
