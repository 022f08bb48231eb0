//! Link settings for the `openpista` binary that keep an idle daemon small
//! (measured by `benches/daemon.rs`, see docs/BENCHMARKS.md).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=startup-order.txt");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" {
        return;
    }
    // Relative relocations packed as DT_RELR (glibc >= 2.36, Debian 12): the
    // dynamic loader reads every relocation at start-up, and the classic
    // table (1.8 MB, 24 bytes per relocation) stayed resident.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    // The functions `openpista start` runs until it idles, placed next to
    // each other (`scripts/startup-order.sh` records them). Only for
    // optimized x86-64 builds, which rustc (>= 1.90, and the workspace needs
    // 1.95) links with LLD; names missing after a change are skipped.
    let order = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("startup-order.txt");
    let optimized = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    if optimized && x86_64 && order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
