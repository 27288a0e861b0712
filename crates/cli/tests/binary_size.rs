//! The size budget of the `ppml` binary: at most 80 MB (issue 19), as the release profile in
//! the workspace's `Cargo.toml` builds it on x86-64 Linux with rustc's own linker (where
//! `crates/cli/build.rs` folds identical code). The profile's comment says which crates are
//! built for size and why; BENCHMARKS.md ("Build and binary") has the measurements. A change
//! that crosses the budget has to win the room back there, with measurements, rather than
//! move the line.

/// 80 MB, in bytes (BENCHMARKS.md reports sizes in MB of 10^6 bytes).
const BUDGET_BYTES: u64 = 80_000_000;

#[test]
fn the_release_binary_fits_its_size_budget() {
    // `ppml_icf`: x86-64 Linux, linked by rustc's own lld with identical code folding
    // (set by `build.rs`).
    let built_as_shipped = cfg!(all(not(debug_assertions), ppml_icf));
    if !built_as_shipped {
        eprintln!(
            "binary size budget: not checked (only the x86-64 Linux release build with \
             rustc's own linker is)"
        );
        return;
    }
    let path = env!("CARGO_BIN_EXE_ppml");
    let size = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .len();
    assert!(
        size <= BUDGET_BYTES,
        "{path} is {size} bytes, over the budget of {BUDGET_BYTES}: see the release profile's \
         comment in Cargo.toml and BENCHMARKS.md, \"Build and binary\""
    );
    eprintln!("binary size budget: {size} of {BUDGET_BYTES} bytes");
}
