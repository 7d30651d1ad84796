//! Builds grace's preload library (`preload/src/lib.rs`) into `OUT_DIR`, where `src/inject.rs`
//! embeds it with `include_bytes!`: installing grace installs the library too.
//!
//! It is one `no_std` file with no dependencies, so `rustc` builds it directly: no nested cargo
//! (which would fight the outer one for its lock), no C compiler beyond the linker Rust already
//! needs. The `preload/` crate exists for `cargo clippy -p grace-preload` and `cargo fmt`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The architectures the library's constants and hidden personality stub are written for.
const SUPPORTED_ARCHES: &[&str] = &["x86_64", "aarch64", "riscv64"];

fn main() {
    println!("cargo:rerun-if-changed=preload/src");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("libgrace_preload.so");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // A static (musl) grace cannot preload a shared library into anything: it has the seccomp
    // substitution only.
    let env_ = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || !SUPPORTED_ARCHES.contains(&arch.as_str()) || env_ == "musl" {
        // grace then reports that injection is not available on this platform.
        std::fs::write(&out, b"").expect("writing an empty preload library");
        return;
    }

    let source = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("preload/src/lib.rs");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = env::var("TARGET").expect("TARGET");
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2024", "--crate-type", "cdylib"])
        .args(["--crate-name", "grace_preload", "--target", &target])
        // Small, fast and self-contained whatever the profile of the outer build.
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "codegen-units=1",
        ])
        .args(["-C", "debuginfo=0", "-C", "strip=symbols"])
        .arg("-o")
        .arg(&out)
        .arg(&source);
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        cmd.arg("-C").arg(format!("linker={linker}"));
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running rustc for the preload library: {e}"));
    assert!(
        status.success(),
        "building the preload library ({}) failed: {status}",
        source.display()
    );
}
