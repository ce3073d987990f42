//! `cargo xtask image [--tag T] [--oci-archive FILE]`: the runtime image, built with no registry:
//! a root filesystem of the release `xlb` binary and the machine's `bpftool`, each with exactly
//! the shared libraries `ldd` names for it, imported into podman (run with runc; the default
//! container ulimits need CAP_SYS_RESOURCE, so a containers.conf without them is used unless
//! CONTAINERS_CONF names one). Both binaries are run once in the image before it is reported.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, output, run};

/// The tag deploy/daemonset.yaml names (`image: xlb:<version>`).
pub fn default_tag() -> String {
    format!("xlb:{}", env!("CARGO_PKG_VERSION"))
}

/// The containers.conf the image commands run with.
fn containers_conf(work: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(c) = std::env::var("CONTAINERS_CONF") {
        return Ok(PathBuf::from(c));
    }
    let path = work.join("containers.conf");
    std::fs::write(&path, "[containers]\ndefault_ulimits = []\n")?;
    Ok(path)
}

/// `podman` with this build's containers.conf and runc.
fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf).args(["--runtime", "runc"]);
    c
}

/// The shared libraries `binary` loads, as `ldd` resolves them.
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// Copies `from` to `rootfs` + `to`, following links (the libraries' real files).
fn install(rootfs: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let dest = rootfs.join(to.strip_prefix("/").unwrap_or(to));
    std::fs::create_dir_all(dest.parent().context("a path without a parent")?)?;
    std::fs::copy(from, &dest).with_context(|| format!("copying {} into the image", from.display()))?;
    Ok(())
}

pub fn build(root: &Path, tag: &str, oci_archive: Option<&Path>) -> anyhow::Result<()> {
    if Command::new("podman").arg("--version").output().is_err() {
        bail!("podman is not installed: `apt-get install podman runc` (Debian), then run this again");
    }
    run(cargo().args(["build", "--release", "--locked", "-p", "lb-userspace", "--bin", "xlb"]))?;
    let bpftool = output(Command::new("sh").args(["-c", "command -v bpftool"]))
        .map(|p| PathBuf::from(p.trim()))
        .ok()
        .filter(|p| p.is_file())
        .context("bpftool is not installed (`cargo xtask setup` installs it)")?;
    let work = root.join("target/image");
    let rootfs = work.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(&rootfs)?;
    let xlb = root.join("target/release/xlb");
    for (bin, at) in [(&xlb, Path::new("/usr/local/bin/xlb")), (&bpftool, Path::new("/usr/sbin/bpftool"))] {
        install(&rootfs, bin, at)?;
        for lib in libraries(bin)? {
            install(&rootfs, &lib, &lib)?;
        }
    }
    // What the container runtime and the binaries expect to find: the mount points the
    // DaemonSet uses, a writable-by-mount /tmp, and root's entries.
    for d in ["etc", "tmp", "proc", "sys", "dev", "run", "sys/fs/bpf"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/usr/sbin/nologin\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    let tar = work.join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."))?;
    let conf = containers_conf(&work)?;
    run(podman(&conf)
        .arg("import")
        .args(["--change", "ENTRYPOINT [\"/usr/local/bin/xlb\"]", "--change", "CMD [\"--help\"]"])
        .args(["--change", "LABEL org.opencontainers.image.title=xlb"])
        .arg(&tar)
        .arg(tag))?;
    // Both binaries start in the image (their libraries are all there).
    let version = output(podman(&conf).args(["run", "--rm", "--read-only", tag, "--version"]))?;
    let bpftool_version = output(podman(&conf).args([
        "run",
        "--rm",
        "--read-only",
        "--entrypoint",
        "/usr/sbin/bpftool",
        tag,
        "version",
    ]))?;
    ensure!(version.starts_with("xlb "), "the image's xlb printed {version:?}");
    let size = output(podman(&conf).args(["image", "inspect", "--format", "{{.Size}}", tag]))?;
    let mb = size.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
    println!(
        "image {tag}: {mb:.1} MB; {}; {}",
        version.trim(),
        bpftool_version.lines().next().unwrap_or("").trim()
    );
    if let Some(file) = oci_archive {
        run(podman(&conf).args(["save", "--format", "oci-archive", "-o"]).arg(file).arg(tag))?;
        println!("saved as an OCI archive: {}", file.display());
    }
    Ok(())
}
