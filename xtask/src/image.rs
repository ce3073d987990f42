//! `cargo xtask image [--tag T] [--oci-archive FILE]`: the runtime image, built with no registry
//! (the layout is tests/src/image.rs, which the image's end-to-end test builds too): the release
//! `xlb` and the machine's `bpftool`, each with exactly the shared libraries `ldd` names for it,
//! imported into podman (run with runc; the default container ulimits need CAP_SYS_RESOURCE, so
//! a containers.conf without them is used unless CONTAINERS_CONF names one). Both binaries are
//! run once in the image before it is reported.
use std::path::Path;

use anyhow::{bail, ensure};

#[path = "../../tests/src/image.rs"]
mod layout;

use crate::{cargo, run};
use layout::{output, podman};

/// The tag deploy/daemonset.yaml names (`image: xlb:<version>`).
pub fn default_tag() -> String {
    format!("xlb:{}", env!("CARGO_PKG_VERSION"))
}

pub fn build(root: &Path, tag: &str, oci_archive: Option<&Path>) -> anyhow::Result<()> {
    if !layout::podman_installed() {
        bail!("podman is not installed: `cargo xtask setup` (as root) installs it, with runc");
    }
    run(cargo().args(["build", "--release", "--locked", "-p", "lb-userspace", "--bin", "xlb"]))?;
    let work = root.join("target/image");
    let conf = layout::containers_conf(&work)?;
    let size = layout::build(&work, &root.join("target/release/xlb"), tag, &conf)?;
    // Both binaries start in the image (their libraries are all there).
    let version = output(podman(&conf).args(["run", "--rm", "--read-only", tag, "--version"]))?;
    let bpftool_version = output(podman(&conf).args([
        "run",
        "--rm",
        "--read-only",
        "--entrypoint",
        layout::BPFTOOL_AT,
        tag,
        "version",
    ]))?;
    ensure!(version.starts_with("xlb "), "the image's xlb printed {version:?}");
    println!(
        "image {tag}: {:.1} MB; {}; {}",
        size as f64 / 1e6,
        version.trim(),
        bpftool_version.lines().next().unwrap_or("").trim()
    );
    if let Some(file) = oci_archive {
        run(podman(&conf).args(["save", "--format", "oci-archive", "-o"]).arg(file).arg(tag))?;
        println!("saved as an OCI archive: {}", file.display());
    }
    Ok(())
}
