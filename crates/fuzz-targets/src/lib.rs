//! The bodies of ppml's fuzz targets: one function per parser or decoder that sees bytes an
//! attacker chooses. `fuzz/` (cargo fuzz, nightly) calls them from libFuzzer, and
//! `tests/corpus.rs` replays every file of `fuzz/seeds/<target>` and
//! `fuzz/regressions/<target>` through them on stable Rust, in the test command.
//!
//! A target fails by panicking (or by a sanitizer report under cargo fuzz); every `Err` the
//! code under test returns is a correct answer to bad input. Targets bound what they read, so
//! that a declared length cannot make one input take unbounded time or memory here.

use std::io::{Cursor, Read};

use ppml_format::{DataKey, DecryptingReader, RandomAccessReader, UnverifiedHeader};

/// A target: its name and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name: the directory names under `fuzz/seeds`, `fuzz/regressions` and a
/// campaign's `fuzz/corpus`.
pub const TARGETS: &[Target] = &[
    ("file_header", file_header),
    ("stream_reader", stream_reader),
    ("random_access", random_access),
    ("manifest", manifest),
    ("kms_envelope", kms_envelope),
    ("policy", policy),
    ("sim_quote", sim_quote),
    ("dcap_quote", dcap_quote),
    ("collateral", collateral),
    ("job_grant", job_grant),
    ("kms_action", kms_action),
    ("map_partitions", map_partitions),
    ("shuffle_file", shuffle_file),
    ("cluster_plan", cluster_plan),
    ("parquet_key_material", parquet_key_material),
    ("bigdl_part", bigdl_part),
    ("ras_body", ras_body),
    ("attestation_token", attestation_token),
    ("spill_file", spill_file),
    ("job_file", job_file),
    ("pccs_answers", pccs_answers),
    ("csv_rows", csv_rows),
    ("receipt", receipt),
];

/// The data key of the format's test vectors (`crates/format/testdata/vectors`), so that
/// corpora seeded from them reach past the header's MAC.
const VECTOR_KEY: [u8; 32] = [0x42; 32];

/// Plaintext read from one input at most.
const MAX_PLAINTEXT: u64 = 1 << 20;

/// A file's header: parsed, then verified with the vectors' key.
pub fn file_header(data: &[u8]) {
    if let Ok(header) = UnverifiedHeader::parse(data) {
        let _ = header.sha256();
        let _ = header.verify(&DataKey::from_bytes(VECTOR_KEY));
    }
}

/// A whole file through the streaming reader (header, then every segment).
pub fn stream_reader(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    let Ok(header) = UnverifiedHeader::read_from(&mut cursor) else {
        return;
    };
    let Ok(reader) = DecryptingReader::new(cursor, header, &DataKey::from_bytes(VECTOR_KEY)) else {
        return;
    };
    let _ = std::io::copy(&mut reader.take(MAX_PLAINTEXT), &mut std::io::sink());
}

/// A file through the random-access reader: the first 6 bytes are the range to read
/// (offset u32, length u16, big-endian), the rest is the file.
pub fn random_access(data: &[u8]) {
    let Some((range, file)) = data.split_at_checked(6) else {
        return;
    };
    let offset = u64::from(u32::from_be_bytes([range[0], range[1], range[2], range[3]]));
    let len = usize::from(u16::from_be_bytes([range[4], range[5]]));
    let Ok(mut reader) =
        RandomAccessReader::new(Cursor::new(file), &DataKey::from_bytes(VECTOR_KEY))
    else {
        return;
    };
    let _ = reader.plaintext_len();
    let mut out = vec![0u8; len];
    let _ = reader.read_at(offset, &mut out);
}

/// A dataset manifest (`_manifest.ppml.json`): parsed, then verified with the vectors' key.
pub fn manifest(data: &[u8]) {
    if let Ok(manifest) = ppml_format::manifest::UnverifiedManifest::from_json(data) {
        // What a receipt verifier reads without the key.
        let _ = manifest.unauthenticated().content_sha256();
        let _ = manifest.verify(&DataKey::from_bytes(VECTOR_KEY));
    }
}

/// A job receipt (`_receipt.ppml.json`, docs/receipts.md): parsed, its signature checked over
/// the canonical form of its body, and written back, which must read as the same receipt.
pub fn receipt(data: &[u8]) {
    use ppml_format::receipt::Receipt;
    let Ok(receipt) = Receipt::from_json(data) else {
        return;
    };
    let _ = receipt.verify_signature();
    let _ = Receipt::signing_input(receipt.body());
    let again = Receipt::from_json(&receipt.to_json()).expect("a receipt written back reads");
    assert_eq!(again.body(), receipt.body());
    assert_eq!(again.signature(), receipt.signature());
    assert_eq!(again.verify_signature(), receipt.verify_signature());
}

/// A KMS request envelope: its canonical string, signature check, timestamp and replay id.
pub fn kms_envelope(data: &[u8]) {
    let Ok(serde_json::Value::Object(body)) = serde_json::from_slice(data) else {
        return;
    };
    let _ = ppml_kms::ehsm::canonical_string(&body);
    let presented = body.get("sign").and_then(|v| v.as_str()).unwrap_or("");
    let _ = ppml_kms::ehsm::verify("api-key", &body, presented);
    let timestamp = body.get("timestamp").and_then(|v| v.as_str()).unwrap_or("");
    let _ = ppml_kms::ehsm::check_timestamp(timestamp, 1_700_000_000_000);
    let appid = body.get("appid").and_then(|v| v.as_str()).unwrap_or("");
    let nonce = body.get("nonce").and_then(|v| v.as_str());
    let _ = ppml_kms::ehsm::replay_id(appid, timestamp, nonce);
}

/// An attestation policy: parsed, checked, and used to judge a fixed set of claims.
pub fn policy(data: &[u8]) {
    use ppml_attestation::policy::Policy;
    let Ok(policy) = serde_json::from_slice::<Policy>(data) else {
        return;
    };
    let _ = policy.check();
    let _ = policy.sim_platform_keys();
    let _ = policy.kms_root_id_values();
    let claims = ppml_attestation::Claims {
        tee: ppml_attestation::Tee::Sgx,
        measurements: ppml_attestation::claims::Measurements {
            mrenclave: Some("ab".repeat(32)),
            mrsigner: Some("cd".repeat(32)),
            isvprodid: Some(1),
            isvsvn: Some(2),
            ..Default::default()
        },
        debug: false,
        tcb_status: "UpToDate".into(),
        advisory_ids: vec!["INTEL-SA-00615".into()],
        report_data: "00".repeat(64),
    };
    let _ = policy.evaluate(&claims);
}

/// The simulation platform whose quotes [`sim_quote`] trusts: the Ed25519 key of seed
/// `[7; 32]`, so that a seed corpus signed with it reaches past the signature check.
pub fn fuzz_sim_platform() -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a 32-byte seed")
}

/// A simulated quote, verified against [`fuzz_sim_platform`].
pub fn sim_quote(data: &[u8]) {
    use ring::signature::KeyPair as _;
    use std::sync::OnceLock;
    static TRUSTED: OnceLock<[u8; 32]> = OnceLock::new();
    let trusted = TRUSTED.get_or_init(|| {
        fuzz_sim_platform()
            .public_key()
            .as_ref()
            .try_into()
            .expect("an Ed25519 public key is 32 bytes")
    });
    let _ = ppml_attestation::sim::verify_sim(data, &[*trusted]);
}

/// An SGX or TDX quote, verified with the test collateral of `crates/attestation/testdata`.
pub fn dcap_quote(data: &[u8]) {
    use std::sync::OnceLock;
    static COLLATERAL: OnceLock<Option<ppml_attestation::dcap::Collateral>> = OnceLock::new();
    let collateral = COLLATERAL.get_or_init(|| {
        ppml_attestation::dcap::Collateral::from_json(
            include_str!("../../attestation/testdata/sgx_quote_collateral.json"),
            "sgx_quote_collateral.json",
        )
        .ok()
    });
    if let Some(collateral) = collateral {
        let _ = ppml_attestation::dcap::verify_quote(data, collateral, 1_735_689_600);
    }
}

/// DCAP collateral JSON (as a PCCS or a collateral file gives it).
pub fn collateral(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(collateral) = ppml_attestation::dcap::Collateral::from_json(text, "fuzz")
    {
        let _ = collateral.next_update();
        let _ = collateral.to_json();
    }
}

/// The SGX and TDX quotes of `crates/attestation/testdata`.
const FIXTURE_QUOTES: [&[u8]; 2] = [
    include_bytes!("../../attestation/testdata/sgx_quote"),
    include_bytes!("../../attestation/testdata/tdx_quote"),
];
/// A time inside the validity of the fixture quotes' collateral (2025-07-01, Unix seconds).
pub const FIXTURE_TIME: u64 = 1_751_328_000;

/// The input of [`pccs_answers`]: the first byte picks the fixture quote (even: SGX, odd:
/// TDX), then seven fields, each a u32 little-endian length and its bytes: the PCK CRL's
/// issuer chain header and body, the TCB info's header and body, the QE identity's header and
/// body, the root CA CRL's body. An empty header is no header.
pub fn parse_pccs_answers(
    data: &[u8],
) -> Option<(&'static [u8], ppml_attestation::pccs::PccsAnswers)> {
    use ppml_attestation::pccs::{PccsAnswer, PccsAnswers};
    let (&kind, mut rest) = data.split_first()?;
    let mut field = || -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let bytes = rest.get(4..)?.get(..len)?.to_vec();
        rest = &rest[4 + len..];
        Some(bytes)
    };
    let mut answer = |chain: bool| -> Option<PccsAnswer> {
        let issuer_chain = if chain {
            let header = field()?;
            (!header.is_empty()).then(|| String::from_utf8_lossy(&header).into_owned())
        } else {
            None
        };
        Some(PccsAnswer {
            url: "fuzz".into(),
            issuer_chain,
            body: field()?,
        })
    };
    let answers = PccsAnswers {
        pck_crl: answer(true)?,
        tcb_info: answer(true)?,
        qe_identity: answer(true)?,
        root_ca_crl: answer(false)?,
    };
    Some((FIXTURE_QUOTES[usize::from(kind & 1)], answers))
}

/// The input of [`pccs_answers`] that [`parse_pccs_answers`] reads back as `answers`, for
/// the fixture quote `kind` (0: SGX, 1: TDX).
pub fn frame_pccs_answers(kind: u8, answers: &ppml_attestation::pccs::PccsAnswers) -> Vec<u8> {
    let header = |answer: &ppml_attestation::pccs::PccsAnswer| {
        answer.issuer_chain.clone().unwrap_or_default().into_bytes()
    };
    let fields = [
        header(&answers.pck_crl),
        answers.pck_crl.body.clone(),
        header(&answers.tcb_info),
        answers.tcb_info.body.clone(),
        header(&answers.qe_identity),
        answers.qe_identity.body.clone(),
        answers.root_ca_crl.body.clone(),
    ];
    let mut framed = vec![kind];
    for field in fields {
        let len = u32::try_from(field.len()).expect("a field under 4 GiB");
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(&field);
    }
    framed
}

/// What a PCCS answers ([`parse_pccs_answers`]), decoded to collateral, which must survive its
/// own offline format and then verifies a fixture quote or not: a hostile PCCS controls all of
/// these bytes.
pub fn pccs_answers(data: &[u8]) {
    let Some((quote, answers)) = parse_pccs_answers(data) else {
        return;
    };
    if let Ok(collateral) = answers.to_collateral() {
        let json = collateral.to_json();
        let again = ppml_attestation::dcap::Collateral::from_json(&json, "fuzz")
            .expect("collateral decoded from a PCCS reads back from its offline format");
        assert_eq!(again.to_json(), json, "offline format round trip");
        let _ = ppml_attestation::dcap::verify_quote(quote, &collateral, FIXTURE_TIME);
    }
}

/// `ppml encrypt`'s CSV row check (`ppml_engine::csv_split`), differential: with the portable
/// and with the CPU's block masks, it must find the row ends, the first error and the header
/// that the byte-by-byte definition finds. The first two bytes pick the chunk size; the third
/// whether rows are checked (bit 0) and the spacing of the row ends asked for (the rest, 0:
/// none); then the file.
pub fn csv_rows(data: &[u8]) {
    use ppml_engine::csv_split::differential::{Masks, check};
    let [low, high, mode, file @ ..] = data else {
        return;
    };
    let chunk = usize::from(u16::from_le_bytes([*low, *high])) % 1024 + 1;
    let check_rows = mode & 1 == 1;
    let step = usize::from(mode >> 1) * 8;
    let wants: Vec<usize> = if step == 0 {
        Vec::new()
    } else {
        (0..=file.len() + step).step_by(step).take(256).collect()
    };
    for masks in [Masks::Portable, Masks::Detected] {
        if let Err(mismatch) = check(file, chunk, &wants, check_rows, masks) {
            panic!("{mismatch}");
        }
    }
}

/// A signed job grant file, and the grant JSON inside it.
pub fn job_grant(data: &[u8]) {
    let _ = ppml_kms::grant::JobGrant::from_json(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(signed) = ppml_kms::grant::SignedGrant::from_text(text)
    {
        let _ = signed.unverified();
        let _ = signed.sha256_hex();
    }
}

/// A KMS server of its own (a store in a temporary directory, one app), its router, and the
/// app's credentials, made once per process (requests run on [`current_thread_runtime`]).
struct FuzzKms {
    router: axum::Router,
    appid: String,
    apikey: String,
    keyid: String,
    nonce: std::sync::atomic::AtomicU64,
}

fn fuzz_kms() -> &'static FuzzKms {
    use std::sync::{Arc, OnceLock};
    static KMS: OnceLock<FuzzKms> = OnceLock::new();
    KMS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (root, _) = ppml_kms_server::RootKey::generate().expect("a root key");
        let store = ppml_kms_server::Store::open(dir.path(), root).expect("a store");
        let (appid, apikey) = store.enroll(0, None, &mut |_| Ok(())).expect("an app");
        let keyid = store
            .create_key(&appid, "EH_AES_GCM_256", 0, &mut |_| Ok(()))
            .expect("a key");
        // As `ppml kms serve` runs: with its attestation service.
        let mut attestation =
            ppml_attestation::service::AttestationService::new(store.kms_id(), &[9; 32])
                .expect("an attestation service");
        attestation.accept_simulation();
        // Collateral for both quote kinds, as a deployed KMS has (from a PCCS or files): a
        // quote then reaches DCAP verification instead of "no collateral" (a 500 of the
        // BigDL-RAS, rightly: the server is not configured for it).
        for (tee, json, name) in [
            (
                ppml_attestation::claims::Tee::Sgx,
                include_str!("../../attestation/testdata/sgx_quote_collateral.json"),
                "sgx_quote_collateral.json",
            ),
            (
                ppml_attestation::claims::Tee::Tdx,
                include_str!("../../attestation/testdata/tdx_quote_collateral.json"),
                "tdx_quote_collateral.json",
            ),
        ] {
            let collateral = ppml_attestation::dcap::Collateral::from_json(json, name)
                .expect("the test collateral");
            attestation.set_collateral(tee, collateral);
        }
        let router = ppml_kms_server::router(Arc::new(
            ppml_kms_server::ServerState::new(store)
                .with_attestation(attestation)
                .with_bigdl_ras(),
        ));
        // The store lives in a static, which is never dropped: its directory is removed now
        // rather than left in the temporary directory at exit. The store keeps its database
        // file open, which outlives its name; nothing opens a path in the directory again.
        drop(dir);
        FuzzKms {
            router,
            appid,
            apikey: apikey.to_string(),
            keyid,
            nonce: std::sync::atomic::AtomicU64::new(0),
        }
    })
}

/// A signed request of one KMS action to a live router: the first byte picks the action
/// (`Action::ALL`), the rest is the payload (JSON, or else a string), in which `$KEY` stands
/// for the id of the app's key. The envelope is valid (the app's signature, a fresh nonce,
/// the current time), so every input reaches the action's own payload checks. An answer with
/// code 500 (a server fault) is a finding: bad input must get a 400 answer.
pub fn kms_action(data: &[u8]) {
    use ppml_kms::protocol::Action;
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let action = Action::ALL[usize::from(pick) % Action::ALL.len()];
    let kms = fuzz_kms();
    let payload = String::from_utf8_lossy(payload).replace("$KEY", &kms.keyid);
    let payload = serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let nonce = kms.nonce.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut body = serde_json::Map::new();
    body.insert("appid".into(), kms.appid.clone().into());
    body.insert("payload".into(), payload);
    body.insert("timestamp".into(), now_ms.to_string().into());
    body.insert("nonce".into(), format!("{nonce:024x}").into());
    body.insert("action".into(), action.name().into());
    let sign = ppml_kms::ehsm::sign(&kms.apikey, &body);
    body.insert("sign".into(), sign.into());
    let path = format!("/ehsm?Action={}", action.name());
    let (_, body) = post_json(&path, serde_json::to_vec(&body).expect("JSON"));
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
    assert_ne!(answer["code"], 500, "{action}: {answer}");
}

/// POSTs a JSON `body` to `path` on the fuzz KMS's router; the answer's status and body.
fn post_json(path: &str, body: Vec<u8>) -> (axum::http::StatusCode, Vec<u8>) {
    use tower::ServiceExt as _;
    let request = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .expect("a request");
    current_thread_runtime().block_on(async {
        let response = fuzz_kms()
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, body.to_vec())
    })
}

/// A shuffle file's `ppml.map_partitions` text: one set has one text, so whatever parses
/// prints back as itself.
pub fn map_partitions(data: &[u8]) {
    use ppml_cluster::shuffle::MapPartitions;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(set) = MapPartitions::parse(text) {
        assert_eq!(set.to_text(), text, "a parsed set prints back as its text");
    }
}

/// The key, place and schema of the fuzzed shuffle file (`write_made_cluster_seeds` writes a
/// valid file with them).
pub fn fuzz_shuffle_file() -> (
    std::sync::Arc<ppml_cluster::shuffle::ShuffleKey>,
    ppml_cluster::shuffle::ShuffleFileId,
    datafusion::arrow::datatypes::SchemaRef,
) {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let key = ppml_cluster::shuffle::ShuffleKey::new(
        DataKey::from_bytes(VECTOR_KEY),
        ppml_format::KeyReference::new("local:fuzz", "shuffle", vec![0x42; 16]),
    );
    let id = ppml_cluster::shuffle::ShuffleFileId {
        job_id: "fuzz-job".into(),
        stage_id: 1,
        partition_id: 0,
        file_id: 7,
    };
    let schema = Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("age", DataType::Int64, true),
    ]);
    (std::sync::Arc::new(key), id, std::sync::Arc::new(schema))
}

/// The targets' runtime, made once per process.
fn current_thread_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// A shuffle file as an executor reads it from another executor: header, key, place,
/// segments, the Arrow IPC stream inside and its map partitions.
pub fn shuffle_file(data: &[u8]) {
    use futures::StreamExt as _;
    let (key, id, schema) = fuzz_shuffle_file();
    let source = Box::new(Cursor::new(data.to_vec()));
    current_thread_runtime().block_on(async move {
        let check = Box::new(|partitions: &ppml_cluster::shuffle::MapPartitions| {
            let _ = partitions.to_text();
            Ok(())
        });
        let mut batches = ppml_cluster::shuffle::read_shuffle_stream(
            source,
            "fuzz".into(),
            id,
            key,
            schema,
            check,
        );
        let mut rows = 0;
        while let Some(Ok(batch)) = batches.next().await {
            rows += batch.num_rows();
            if rows as u64 > MAX_PLAINTEXT {
                break;
            }
        }
    });
}

/// A physical plan as the scheduler sends it to an executor (ppml's plan codec), then the
/// executor's checks of it: the operator allow-list, and the partitions and inputs of a task
/// of it against itself as the signed stage.
pub fn cluster_plan(data: &[u8]) {
    use std::sync::OnceLock;
    static CONTEXT: OnceLock<datafusion::prelude::SessionContext> = OnceLock::new();
    let ctx = CONTEXT.get_or_init(datafusion::prelude::SessionContext::new);
    let Ok(plan) = ppml_cluster::driver::decode_plan(data, &ctx.task_ctx()) else {
        return;
    };
    let _ = ppml_cluster::engine::check_stage_plan(&plan);
    if let Ok(task) = ppml_cluster::stages::task_plan(1, &plan, &plan) {
        let _ = task.output_partitions(&plan);
    }
    let _ = ppml_cluster::stages::Feeding::of(1, &plan);
}

/// The key metadata of a Parquet part (`ppml_format::pme`), as a foreign file carries it:
/// parsed, and what parses must serialize and parse back to the same material. The same bytes
/// as the end of a Parquet file give its footer digest or an error.
pub fn parquet_key_material(data: &[u8]) {
    if let Ok(material) = ppml_format::pme::KeyMaterial::parse(data) {
        let bytes = material.to_bytes().expect("parsed key material serializes");
        let again = ppml_format::pme::KeyMaterial::parse(&bytes).expect("its own bytes parse");
        assert_eq!(again, material);
    }
    let _ = ppml_format::pme::footer_digest(data, data.len() as u64);
}

/// The data key string of the BigDL test vectors (`crates/format/testdata/bigdl`), so that
/// corpora seeded from them reach past the MAC.
const BIGDL_VECTOR_KEY: &str = "q2x0n4HkR8Jc1pWm3ZsT7vYbA5eF9gLhKjNoPqRsTuU=";

/// A BigDL part (`ppml_format::bigdl`): the first byte picks the variant, the rest is the file,
/// read to the end under the vectors' key; `.meta` parsing and the no-KMS unwrap on the same
/// bytes.
pub fn bigdl_part(data: &[u8]) {
    use ppml_format::bigdl::{self, DataKeyString, PartReader, Variant};
    let Some((&pick, file)) = data.split_first() else {
        return;
    };
    let variant = Variant::ALL[usize::from(pick) % Variant::ALL.len()];
    if let Ok(header) = bigdl::parse_header(variant, file) {
        let key = DataKeyString::new(zeroize::Zeroizing::new(BIGDL_VECTOR_KEY.to_string()));
        let body = &file[variant.header_len()..];
        if let Ok(reader) = PartReader::new(body, variant, &header, &key) {
            let _ = std::io::copy(&mut reader.take(MAX_PLAINTEXT), &mut std::io::sink());
        }
    }
    let _ = bigdl::parse_meta(file);
    if let Ok(text) = std::str::from_utf8(file) {
        let _ = bigdl::unwrap_with_plaintext_primary_key("AAECAwQFBgcICQoLDA0ODw==", text);
    }
}

/// A BigDL-RAS request body (`POST /registerPolicy` or `/verifyQuote`, picked by the first
/// byte) to the live router of [`kms_action`]'s KMS, with `$APPID` and `$APIKEY` standing for
/// its app's credentials so that inputs reach past the credential check. An HTTP 500 is a
/// finding: the RAS answers 500 only when it cannot write its audit log or lacks the
/// collateral for a quote's kind, and this KMS has collateral for both kinds.
pub fn ras_body(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kms = fuzz_kms();
    let path = if pick % 2 == 0 {
        "/registerPolicy"
    } else {
        "/verifyQuote"
    };
    let body = String::from_utf8_lossy(body)
        .replace("$APPID", &kms.appid)
        .replace("$APIKEY", &kms.apikey);
    let (status, body) = post_json(path, body.into_bytes());
    assert_ne!(
        status,
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    let _: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
}

/// The seed of the fuzz attestation service's token signing key.
pub const FUZZ_TOKEN_SEED: [u8; 32] = [9; 32];

/// An attestation token as the KMS checks it before releasing a key
/// (`ppml_attestation::service::verify_token`). Odd first byte: the rest is a whole token,
/// taken as it is. Even: the rest is its `header.payload`, which the target signs with the
/// fuzz service key, so that inputs reach the header and claims checks past the signature.
pub fn attestation_token(data: &[u8]) {
    use ring::signature::KeyPair as _;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let key =
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&FUZZ_TOKEN_SEED).expect("a key pair");
    let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
    let token = if pick % 2 == 1 {
        text.to_string()
    } else {
        use base64::Engine as _;
        let signature = key.sign(text.as_bytes());
        format!(
            "{text}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
        )
    };
    // Before and after the expiry of the seeds' token.
    for now in [1_700_000_000, 1_900_000_000] {
        if let Ok(claims) = ppml_attestation::service::verify_token(&token, &public, now) {
            assert!(now < claims.exp, "an expired token verified");
        }
    }
}

/// A spill file changed on disk: the target writes a known spill file through
/// `ppml_engine::spill::EncryptedSpill` (DataFusion's temp-file factory), applies the input
/// to it as edits (each 5 bytes: a 4-byte big-endian offset, taken modulo the file length,
/// and a byte to XOR there; offset `0xffffffff` instead truncates the file to the byte/256 of
/// its length), then reads it back: the reader must fail, or, when the edits changed
/// nothing, return exactly what was written.
pub fn spill_file(data: &[u8]) {
    use datafusion::execution::TempFileFactory as _;
    use futures::StreamExt as _;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let spill = ppml_engine::spill::EncryptedSpill::new(dir.path().join("spill"))
        .expect("a spill directory");
    let file = spill.create_temp_file("fuzz").expect("a spill file");
    let written: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut writer = file.open_writer().expect("a writer");
        use std::io::Write as _;
        writer.write_all(&written).expect("written");
        writer.finish().expect("finished");
    }
    let path = file.path().expect("a path").to_path_buf();
    let mut bytes = std::fs::read(&path).expect("the spill file");
    let original = bytes.clone();
    for edit in data.chunks_exact(5) {
        let raw = u32::from_be_bytes(edit[..4].try_into().expect("4 bytes"));
        if raw == u32::MAX {
            bytes.truncate(usize::from(edit[4]) * bytes.len() / 256);
        } else if !bytes.is_empty() {
            let offset = raw as usize % bytes.len();
            bytes[offset] ^= edit[4];
        }
    }
    std::fs::write(&path, &bytes).expect("rewritten");
    let read = current_thread_runtime().block_on(async {
        let mut stream = file.read_stream().ok()?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.ok()?);
        }
        Some(out)
    });
    match read {
        Some(plain) => {
            assert_eq!(bytes, original, "a changed spill file was read");
            assert_eq!(plain, written, "a spill file read back other bytes");
        }
        None => assert_ne!(bytes, original, "an unchanged spill file failed to read"),
    }
}

/// A job file (`ppml submit --job-file`, TOML) as `ppml::job::JobFile::load` reads it, from a
/// temporary directory of its own.
pub fn job_file(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, data).expect("written");
    let _ = ppml::job::JobFile::load(&path);
}
