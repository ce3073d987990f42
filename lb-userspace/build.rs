//! Builds the eBPF object (lb-ebpf, for the bpf target, with the nightly toolchain and
//! bpf-linker) into OUT_DIR, where src/datapath/ebpf.rs embeds it.
//!
//! With AYA_BUILD_SKIP=1 (for clippy or docs on a machine without bpf-linker) an empty object is
//! written instead; the agent then refuses to load with a clear error.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out_dir.join("xlb-ebpf"), b"")?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir =
        manifest.parent().ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?.join("lb-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={}/../lb-common/src", ebpf_dir);
    // The nightly that builds the eBPF crate: `nightly`, or a dated one (the Dockerfile's).
    println!("cargo:rerun-if-env-changed=XLB_NIGHTLY");
    let nightly = env::var("XLB_NIGHTLY").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "nightly".into());
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&nightly),
    )
}
