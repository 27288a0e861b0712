//! Link flags for the `ppml` binary.

use std::path::Path;

fn main() {
    // Pack the executable's ~280,000 relative relocations (DataFusion's vtables and tables) as
    // DT_RELR instead of 24-byte RELA entries, so that the dynamic loader reads ~80 KiB instead
    // of 6.7 MB at every start (about 1 ms of each command here). A binary linked this way
    // starts only on glibc >= 2.36, so the flag is used only when building natively against
    // such a glibc (it defines the GLIBC_ABI_DT_RELR version).
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if target == host && target.ends_with("linux-gnu") && glibc_supports_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // Fold byte-identical functions and constants: DataFusion's generics leave many identical
    // copies (about 9 MB of the binary). `--icf=all` is an lld option, so it is passed only
    // where the linker is known to be rustc's own rust-lld: x86-64 Linux (its default since
    // Rust 1.90; rust-version is 1.94) with no linker or linker flags configured.
    // `tests/binary_size.rs` holds the binary to its budget only when it is linked this way.
    println!("cargo::rustc-check-cfg=cfg(ppml_icf)");
    if target == "x86_64-unknown-linux-gnu" && linker_is_the_default() {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
        println!("cargo:rustc-cfg=ppml_icf");
    }
}

fn linker_is_the_default() -> bool {
    let rustflags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    std::env::var_os("RUSTC_LINKER").is_none()
        && !rustflags.contains("linker")
        && !rustflags.contains("fuse-ld")
        && !rustflags.contains("link-self-contained")
}

fn glibc_supports_relr() -> bool {
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
    ]
    .iter()
    .filter(|path| Path::new(path).exists())
    .filter_map(|path| std::fs::read(path).ok())
    .any(|libc| libc.windows(17).any(|w| w == b"GLIBC_ABI_DT_RELR"))
}
