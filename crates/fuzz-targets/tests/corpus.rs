//! Replays every input of `fuzz/seeds/<target>` and `fuzz/regressions/<target>` (and of a
//! local campaign's `fuzz/corpus/<target>`, when there is one) through its target on stable
//! Rust (the README's test command runs this), and holds the target list, `fuzz/Cargo.toml`
//! and `fuzz/fuzz_targets/` together.

use std::path::{Path, PathBuf};

use ppml_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    for (name, target) in TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} has no seed");
        let others = ["regressions", "corpus"]
            .into_iter()
            .flat_map(|kind| files(&fuzz_dir().join(kind).join(name)));
        for file in seeds.into_iter().chain(others) {
            let data = match std::fs::read(&file) {
                Ok(data) => data,
                // A fuzzer running on this corpus replaced the file since it was listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", file.display()),
            };
            // A panic here names the input: `cargo fuzz run {name} FILE` reproduces it.
            eprintln!("{name}: {}", file.display());
            target(&data);
        }
    }
}

#[test]
fn every_target_is_a_cargo_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let bins = manifest.matches("[[bin]]").count();
    assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has {bins} [[bin]]s");
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml lacks {name}"
        );
        let source =
            std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
                .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{name}.rs: {e}"));
        assert!(
            source.contains(&format!("ppml_fuzz_targets::{name}(")),
            "fuzz/fuzz_targets/{name}.rs does not call its target"
        );
    }
}

/// Writes the seeds that are made rather than copied (`cargo test --release -p
/// ppml-fuzz-targets --test corpus -- --ignored`): a simulated quote signed by the fuzz
/// platform key (and, in `write_made_cluster_seeds`, a shuffle file and stage plans).
#[test]
#[ignore = "writes fuzz/seeds"]
fn write_made_seeds() {
    let platform = ppml_fuzz_targets::fuzz_sim_platform();
    let mut signed = b"ppml-sim-quote/v1\0".to_vec();
    let measurement = [0xab; 32];
    let report_data = [0x11; 64];
    signed.extend_from_slice(&measurement);
    signed.extend_from_slice(&report_data);
    signed.push(0);
    let signature = platform.sign(&signed);
    let mut quote = vec![1, 0];
    quote.extend_from_slice(b"sim\0");
    quote.extend_from_slice(&measurement);
    quote.extend_from_slice(&report_data);
    quote.push(0);
    quote.extend_from_slice(signature.as_ref());
    assert_eq!(quote.len(), 167);
    let dir = fuzz_dir().join("seeds/sim_quote");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed-valid"), &quote).unwrap();
}

/// A valid shuffle file under the fuzz key and place, and the stage plans a driver signs for
/// a few query shapes (over a CSV table in a temporary directory).
#[tokio::test]
#[ignore = "writes fuzz/seeds"]
async fn write_made_cluster_seeds() {
    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
    use ppml_cluster::shuffle::{MapPartitions, write_shuffle_file};
    use ppml_cluster::stages::{SignedStages, plan_stages};
    use std::sync::Arc;

    let (key, id, schema) = ppml_fuzz_targets::fuzz_shuffle_file();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![Some("ann"), None, Some("bo")])),
            Arc::new(Int64Array::from(vec![Some(41), Some(7), None])),
        ],
    )
    .unwrap();
    let stream = Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter(vec![Ok(batch.clone()), Ok(batch)]),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data-7.arrow");
    write_shuffle_file(stream, &path, &id, &key, &MapPartitions::new([0, 1, 3]))
        .await
        .unwrap();
    let dir = fuzz_dir().join("seeds/shuffle_file");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&path, dir.join("valid")).unwrap();

    for i in 0..3 {
        std::fs::write(
            tmp.path().join(format!("{i}.csv")),
            format!("a,b\n{i},x\n1,y\n"),
        )
        .unwrap();
    }
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
    let table = tmp.path().to_str().unwrap();
    ctx.register_csv("t", table, CsvReadOptions::new())
        .await
        .unwrap();
    ctx.register_csv("u", table, CsvReadOptions::new())
        .await
        .unwrap();
    let dir = fuzz_dir().join("seeds/cluster_plan");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sql) in [
        (
            "group",
            "SELECT a, count(*) FROM t WHERE b <> 'z' GROUP BY a",
        ),
        ("join", "SELECT t.a, u.b FROM t JOIN u ON t.a = u.a"),
        ("union", "SELECT a FROM t UNION ALL SELECT b FROM u"),
        ("sort", "SELECT a, b FROM t ORDER BY b DESC LIMIT 2"),
    ] {
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let stages = plan_stages(&plan, ctx.copied_config().options(), &ctx.task_ctx()).unwrap();
        let signed = SignedStages::from_stages(&stages).unwrap();
        for stage in signed.stage_ids() {
            let bytes = signed.encoded(stage).unwrap();
            // The seed reaches the checks: it decodes where the target decodes it.
            let fresh = SessionContext::new();
            ppml_cluster::driver::decode_plan(bytes, &fresh.task_ctx()).unwrap();
            std::fs::write(dir.join(format!("{name}-stage-{stage}")), bytes).unwrap();
        }
    }
}

/// A token the fuzz attestation service would issue, for `attestation_token`: its claims are
/// those of the simulated quote seed; one seed is the unsigned `header.payload` (the target
/// signs it), the other the whole token signed with [`ppml_fuzz_targets::FUZZ_TOKEN_SEED`].
#[test]
#[ignore = "writes fuzz/seeds"]
fn write_made_token_seeds() {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let platform = ppml_fuzz_targets::fuzz_sim_platform();
    let trusted: [u8; 32] = platform.public_key().as_ref().try_into().unwrap();
    let quote = std::fs::read(fuzz_dir().join("seeds/sim_quote/seed-valid")).unwrap();
    let claims = ppml_attestation::sim::verify_sim(&quote, &[trusted]).unwrap();
    let token = ppml_attestation::service::TokenClaims {
        iss: "ppml-kms:fuzz".into(),
        sub: "fuzz-app".into(),
        iat: 1_799_999_700,
        exp: 1_800_000_000,
        policy: "fuzz-policy".into(),
        runtime_key: b64.encode([5u8; 32]),
        receipt_key: None,
        claims,
    };
    let signing_input = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"EdDSA","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(&token).unwrap())
    );
    let key =
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&ppml_fuzz_targets::FUZZ_TOKEN_SEED)
            .unwrap();
    let signed = format!(
        "{signing_input}.{}",
        b64.encode(key.sign(signing_input.as_bytes()))
    );
    let dir = fuzz_dir().join("seeds/attestation_token");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("seed-unsigned"),
        [b"\0".as_slice(), signing_input.as_bytes()].concat(),
    )
    .unwrap();
    std::fs::write(
        dir.join("seed-signed"),
        [b"\x01".as_slice(), signed.as_bytes()].concat(),
    )
    .unwrap();
}

/// The answers a PCCS gives for the fixture quotes, for `pccs_answers`, in the PCCS v4 wire
/// format: the TCB info and QE identity as signed JSON, the PCK CRL as DER, the root CA CRL as
/// hex, the issuer chains percent-encoded.
#[test]
#[ignore = "writes fuzz/seeds"]
fn write_made_pccs_seeds() {
    let dir = fuzz_dir().join("seeds/pccs_answers");
    std::fs::create_dir_all(&dir).unwrap();
    for (kind, tee) in [(0u8, "sgx"), (1, "tdx")] {
        let path = fuzz_dir().join(format!(
            "../crates/attestation/testdata/{tee}_quote_collateral.json"
        ));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = |name: &str| json[name].as_str().unwrap().to_string();
        let chain = |name: &str| {
            text(name)
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        // A signed document as served: the document under `name`, and its signature.
        let signed = |name: &str, field: &str| {
            let signature = text(&format!("{field}_signature"));
            format!(r#"{{"{name}":{},"signature":"{signature}"}}"#, text(field)).into_bytes()
        };
        use ppml_attestation::pccs::{PccsAnswer, PccsAnswers};
        let answer = |chain: Option<String>, body: Vec<u8>| PccsAnswer {
            url: String::new(),
            issuer_chain: chain,
            body,
        };
        let answers = PccsAnswers {
            pck_crl: answer(
                Some(chain("pck_crl_issuer_chain")),
                hex::decode(text("pck_crl")).unwrap(),
            ),
            tcb_info: answer(
                Some(chain("tcb_info_issuer_chain")),
                signed("tcbInfo", "tcb_info"),
            ),
            qe_identity: answer(
                Some(chain("qe_identity_issuer_chain")),
                signed("enclaveIdentity", "qe_identity"),
            ),
            root_ca_crl: answer(None, text("root_ca_crl").into_bytes()),
        };
        let seed = ppml_fuzz_targets::frame_pccs_answers(kind, &answers);
        std::fs::write(dir.join(format!("seed-{tee}")), seed).unwrap();
    }
}

/// Seeds that must be valid inputs, so that campaigns start past the first checks: the job
/// files load, the made token verifies before its expiry and not after, and the PCCS answers
/// decode to collateral that verifies their quote.
#[test]
fn valid_seeds_are_valid() {
    for tee in ["sgx", "tdx"] {
        let seed = std::fs::read(
            fuzz_dir()
                .join("seeds/pccs_answers")
                .join(format!("seed-{tee}")),
        )
        .unwrap();
        let (quote, answers) = ppml_fuzz_targets::parse_pccs_answers(&seed).expect("framed");
        let collateral = answers.to_collateral().expect("PCCS answers decode");
        let claims = ppml_attestation::dcap::verify_quote(
            quote,
            &collateral,
            ppml_fuzz_targets::FIXTURE_TIME,
        )
        .expect("the decoded collateral verifies the quote");
        assert_eq!(claims.tee.to_string(), tee);
    }
    for seed in ["seed-simple-query", "seed-query"] {
        let path = fuzz_dir().join("seeds/job_file").join(seed);
        if let Err(e) = ppml::job::JobFile::load(&path) {
            panic!("{seed}: {e}");
        }
    }
    use ring::signature::KeyPair as _;
    let seed = std::fs::read(fuzz_dir().join("seeds/attestation_token/seed-signed")).unwrap();
    let key =
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&ppml_fuzz_targets::FUZZ_TOKEN_SEED)
            .unwrap();
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    let token = std::str::from_utf8(&seed[1..]).unwrap();
    let claims =
        ppml_attestation::service::verify_token(token, &public, 1_700_000_000).expect("valid");
    assert_eq!(claims.exp, 1_800_000_000);
    assert!(ppml_attestation::service::verify_token(token, &public, 1_900_000_000).is_err());
}
