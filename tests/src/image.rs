//! The runtime image's layout, built with no registry: a root filesystem of the `xlb` binary and
//! the machine's `bpftool`, each with exactly the shared libraries `ldd` names for it, root's
//! passwd and group entries and the mount points the DaemonSet uses, imported into podman.
//!
//! One file for both users: `cargo xtask image` (xtask/src/image.rs includes it, with the release
//! binary) and the end-to-end test of the image (tests/tests/image.rs, with the tested binary),
//! so that the test runs the layout users get. Only std and anyhow here.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where the image puts the two binaries (the Dockerfile's runtime stage has the same).
pub const XLB_AT: &str = "/usr/local/bin/xlb";
pub const BPFTOOL_AT: &str = "/usr/sbin/bpftool";

/// The containers.conf the image commands run with: CONTAINERS_CONF's when set, else one written
/// into `work` without default ulimits (setting them needs CAP_SYS_RESOURCE, which the machines
/// this project runs on do not give).
pub fn containers_conf(work: &Path) -> anyhow::Result<PathBuf> {
    if let Some(c) = std::env::var_os("CONTAINERS_CONF").filter(|c| !c.is_empty()) {
        return Ok(PathBuf::from(c));
    }
    std::fs::create_dir_all(work)?;
    let path = work.join("containers.conf");
    std::fs::write(&path, "[containers]\ndefault_ulimits = []\n")?;
    Ok(path)
}

/// `podman` with `conf` and runc (crun refuses the hybrid cgroup layout of some hosts).
pub fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf).args(["--runtime", "runc"]);
    c
}

/// Whether podman can be started at all.
pub fn podman_installed() -> bool {
    Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The machine's bpftool (Debian's package puts it in /usr/sbin).
pub fn bpftool() -> anyhow::Result<PathBuf> {
    ["/usr/sbin/bpftool", "/usr/bin/bpftool", "/usr/local/sbin/bpftool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("bpftool is not installed (`cargo xtask setup` installs it)")
}

/// Runs `cmd`; its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The shared libraries `binary` loads, as `ldd` resolves them (the dynamic loader among them).
pub fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
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

/// Lays out the image's root filesystem in `rootfs` (emptied first): `xlb` and `bpftool` with
/// their libraries, the DaemonSet's mount points, root's entries.
pub fn assemble(rootfs: &Path, xlb: &Path, bpftool: &Path) -> anyhow::Result<()> {
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)?;
    }
    std::fs::create_dir_all(rootfs)?;
    for (bin, at) in [(xlb, XLB_AT), (bpftool, BPFTOOL_AT)] {
        install(rootfs, bin, Path::new(at))?;
        for lib in libraries(bin)? {
            install(rootfs, &lib, &lib)?;
        }
    }
    // What the container runtime and the binaries expect to find: the mount points the
    // DaemonSet uses (the runtime makes the deeper ones) and root's entries.
    for d in ["etc", "tmp", "proc", "sys", "dev", "run", "sys/fs/bpf"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/usr/sbin/nologin\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// Builds the image `tag` from `xlb` (and the machine's bpftool) in `work` and imports it into
/// podman. Returns the image's size in bytes.
pub fn build(work: &Path, xlb: &Path, tag: &str, conf: &Path) -> anyhow::Result<u64> {
    let rootfs = work.join("rootfs");
    assemble(&rootfs, xlb, &bpftool()?)?;
    let tar = work.join("rootfs.tar");
    output(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."))?;
    output(
        podman(conf)
            .arg("import")
            .args(["--change", &format!("ENTRYPOINT [\"{XLB_AT}\"]"), "--change", "CMD [\"--help\"]"])
            .args(["--change", "LABEL org.opencontainers.image.title=xlb"])
            .arg(&tar)
            .arg(tag),
    )?;
    std::fs::remove_file(&tar)?;
    std::fs::remove_dir_all(&rootfs)?;
    let size = output(podman(conf).args(["image", "inspect", "--format", "{{.Size}}", tag]))?;
    size.parse().with_context(|| format!("podman's size of {tag}: {size:?}"))
}
