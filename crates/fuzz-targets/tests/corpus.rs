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
            let data = std::fs::read(&file).unwrap();
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
/// platform key.
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
