//! `cargo xtask`: set-up, demo and test orchestration. Nothing here is part of xlb itself.
//!
//! - `cargo xtask setup`: installs what building and testing xlb needs on a fresh machine
//!   (Debian packages, rust-src for the nightly toolchain, bpf-linker built against the
//!   nightly's own LLVM, a bpffs on /sys/fs/bpf). Idempotent: a second run installs nothing.
//! - `cargo xtask demo`: set-up, build, then the demo in network namespaces.
//! - `cargo xtask test`: set-up, build, then every test, privileged ones included.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod image;
mod mutants;
mod report;

/// Debian packages the build, the tests and the demo use. podman and runc run the image (crun,
/// podman's default runtime, refuses hybrid cgroup hosts); openssl makes the image test's API
/// server certificate.
const APT_PACKAGES: &[&str] =
    &["bpftool", "iproute2", "ethtool", "util-linux", "iperf3", "iptables", "podman", "runc", "openssl"];
/// The bpf-linker release known to work with the nightly's LLVM 22 (see README, Toolchain).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The nightly toolchain that builds the eBPF crate: `nightly`, or the one XLB_NIGHTLY names
/// (the Dockerfile pins a dated one; lb-userspace/build.rs reads the same variable).
fn nightly() -> String {
    std::env::var("XLB_NIGHTLY").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "nightly".into())
}

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install build and test prerequisites (idempotent).
    Setup {
        /// Only what building xlb needs: the toolchains and bpf-linker (for image builds).
        #[arg(long)]
        build_only: bool,
    },
    /// Run the demo: a ClusterIP Service served by xlb in network namespaces.
    Demo,
    /// Run the whole test suite (needs root for the packet and end-to-end tests).
    Test {
        /// Let privileged tests skip instead of fail when not run as root.
        #[arg(long)]
        allow_skip: bool,
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Run every benchmark (datapath, control plane, traffic against kube-proxy's iptables and
    /// nftables modes) and write BENCHMARKS.md with its plots (about 20 minutes; root).
    Bench(bench::BenchArgs),
    /// Write BENCHMARKS.md and its plots from the results of an earlier `cargo xtask bench`.
    BenchReport {
        /// The results directory (`target/bench/<time>`).
        dir: PathBuf,
    },
    /// Benchmark the datapath's cost per packet (BPF_PROG_TEST_RUN, floor subtracted) at 1 to
    /// 100,000 Services x 5 endpoints: no service, new flow, established, SNAT, reply.
    BenchDatapath {
        /// Passed on to the benchmark: --services N,N,.. --calls C --rounds R.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the datapath (release build, root): frames made from valid ones of every kind and
    /// mutated, through the XDP, TC ingress and TC egress programs with BPF_PROG_TEST_RUN, every
    /// run checked against what the programs may do. Failing frames go to fuzz-failures.txt.
    Fuzz {
        /// Passed on to the fuzzer: --frames N (default 1,000,000) --seed S --replay FILE
        /// --failures FILE --record FILE (a summary for BENCHMARKS.md: docs/bench/fuzz.md).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The chaos soak (root): the two-node bed under constant load while endpoints, Services,
    /// agents, the API server and node addresses change at random; every lost connection and
    /// leaked entry counted. `--record` writes its figures to docs/bench/soak.md.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        record: bool,
    },
    /// Build the runtime image with no registry and load it into podman: the release `xlb` and
    /// the machine's `bpftool`, each with the shared libraries it loads (needs podman and runc).
    Image {
        /// The image's name (default: the one deploy/daemonset.yaml runs, xlb:VERSION).
        #[arg(long)]
        tag: Option<String>,
        /// Also save it as an OCI archive, for a user to push to a registry.
        #[arg(long)]
        oci_archive: Option<PathBuf>,
    },
    /// Put plausible bugs into the kernel program one at a time and run the packet tests, the
    /// trace tests and the fuzzer's bounded run against each (root; about a minute per
    /// mutant). `--record` writes the kill table to docs/mutants.md.
    Mutants {
        /// Only the mutants whose description contains this text.
        #[arg(long)]
        only: Option<String>,
        #[arg(long)]
        record: bool,
    },
    /// Benchmark the agent's control plane (release build): cold start with N Services x E
    /// endpoints from a fake API server, endpoint-change-to-map latency, memory.
    BenchAgent {
        /// Passed on to the benchmark: --services N --endpoints E --changes C.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn cmd_ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u == "0")
}

/// Installs the Debian packages of `packages` that are not installed yet (none: nothing runs).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// `build_only`: just what building needs (the toolchains and bpf-linker), not the test
/// packages or the bpffs mount (for an image build, which has neither root on a host nor mounts).
fn setup(build_only: bool) -> anyhow::Result<()> {
    let nightly = nightly();
    let nightly = nightly.as_str();
    // 1. Debian packages.
    if !build_only {
        apt_install(APT_PACKAGES)?;
    }

    // 2. The nightly toolchain (for the eBPF crate) and its rust-src (for -Z build-std=core).
    //    An installed nightly is used as it is: updating it would change its LLVM under bpf-linker.
    if !cmd_ok(Command::new("rustc").arg(format!("+{nightly}")).arg("--version")) {
        run(Command::new("rustup").args(["toolchain", "install", nightly, "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", nightly]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", nightly]))?;
    }

    // 3. bpf-linker, linked against the nightly's own libLLVM so that both use the same LLVM.
    let sysroot = output(Command::new("rustc").arg(format!("+{nightly}")).args(["--print", "sysroot"]))?;
    let lib_dir = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so").to_owned();
    let major = llvm.trim_start_matches("LLVM-").split(['-', '.']).next().unwrap_or("").to_owned();
    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
        && cmd_ok(Command::new("bpf-linker").arg("--help"));
    if !linker_ok {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute)");
        let rustflags =
            format!("-C link-arg=-Wl,-rpath,{lib} -L {lib} -l dylib={llvm}", lib = lib_dir.display());
        run(Command::new("cargo")
            .arg(format!("+{nightly}"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
            .args(["--no-default-features", "--features", &format!("llvm-{major},no-llvm-linking")])
            .env("RUSTFLAGS", rustflags))?;
    }

    // 4. A bpffs for the pinned maps (never a second one on top of an existing mount).
    if !build_only && is_root() && !cmd_ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    eprintln!("xtask: set-up complete");
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => setup(build_only),
        Cmd::Demo => {
            setup(false)?;
            build()?;
            if !is_root() {
                bail!("the demo creates network namespaces and loads eBPF: run it as root");
            }
            run(Command::new(root().join("target/debug/xlb-testbed")).arg("demo"))
        }
        Cmd::Bench(args) => {
            setup(false)?;
            bench::run_all(&args)
        }
        Cmd::BenchReport { dir } => report::write(&dir, &root()),
        Cmd::BenchDatapath { args } => {
            setup(false)?;
            if !is_root() {
                bail!("the benchmark loads eBPF: run it as root");
            }
            run(cargo().args(["build", "--release", "-p", "lb-userspace", "--example", "bench-datapath"]))?;
            run(Command::new(root().join("target/release/examples/bench-datapath")).args(&args))
        }
        Cmd::Fuzz { args } => {
            setup(false)?;
            if !is_root() {
                bail!("the fuzzer loads eBPF: run it as root");
            }
            run(cargo().args(["build", "--release", "-p", "lb-userspace", "--example", "fuzz-datapath"]))?;
            let commit = Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(root())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            run(Command::new(root().join("target/release/examples/fuzz-datapath"))
                .env("XLB_COMMIT", commit)
                .args(&args))
        }
        Cmd::Soak { minutes, seed, record } => {
            setup(false)?;
            if !is_root() {
                bail!("the soak creates network namespaces and loads eBPF: run it as root");
            }
            build()?;
            let mut cmd = Command::new(root().join("target/debug/xlb-testbed"));
            cmd.current_dir(root()).args(["soak", "--minutes", &minutes.to_string()]);
            if let Some(s) = seed {
                cmd.args(["--seed", &s.to_string()]);
            }
            if record {
                cmd.arg("--record").arg(root().join("docs/bench/soak.md"));
            }
            run(&mut cmd)
        }
        Cmd::Image { tag, oci_archive } => {
            setup(true)?;
            image::build(&root(), &tag.unwrap_or_else(image::default_tag), oci_archive.as_deref())
        }
        Cmd::Mutants { only, record } => {
            setup(false)?;
            if !is_root() {
                bail!("the packet tests load eBPF: run it as root");
            }
            mutants::run(&root(), only.as_deref(), record)
        }
        Cmd::BenchAgent { args } => {
            setup(false)?;
            if !is_root() {
                bail!("the benchmark loads eBPF and creates a network namespace: run it as root");
            }
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "--bin",
                "xlb",
                "--example",
                "bench-agent",
            ]))?;
            run(Command::new(root().join("target/release/examples/bench-agent"))
                .args(&args)
                .env("XLB_BIN", root().join("target/release/xlb")))
        }
        Cmd::Test { allow_skip, no_lint } => {
            setup(false)?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--check"]))?;
                run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            }
            build()?;
            let mut test = cargo();
            test.args(["test", "--workspace", "--no-fail-fast"]);
            if !allow_skip {
                test.env("XLB_REQUIRE_PRIVILEGED", "1");
            }
            let all = run(&mut test);
            // The packet tables again, against the tc datapath's program (XLB_PACKET_HOOK).
            let mut tc = cargo();
            tc.args([
                "test",
                "-p",
                "lb-userspace",
                "--test",
                "packet",
                "--test",
                "packet6",
                "--no-fail-fast",
            ])
            .env("XLB_PACKET_HOOK", "tc");
            if !allow_skip {
                tc.env("XLB_REQUIRE_PRIVILEGED", "1");
            }
            let tc = run(&mut tc).context("the packet tests against the tc datapath");
            all.and(tc)
        }
    }
}
