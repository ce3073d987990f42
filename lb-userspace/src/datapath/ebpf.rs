//! Loading the kernel program: the embedded object, map capacities, pins, and attachment.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use lb_common::{
    ALL_MAPS, MAP_BACKEND_FLOWS, MAP_BACKENDS, MAP_CT, MAP_SERVICES, MAP_SOCK_NAT, PROG_SOCK_CONNECT4,
    PROG_SOCK_GETPEERNAME4, PROG_SOCK_RECVMSG4, PROG_SOCK_SENDMSG4, PROG_TC_EGRESS, PROG_TC_INGRESS,
    PROG_XDP, PROG_XDP_TRACE,
};

/// The socket-level programs, each with the name of its link's pin.
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    (PROG_SOCK_CONNECT4, "sock_connect4"),
    (PROG_SOCK_SENDMSG4, "sock_sendmsg4"),
    (PROG_SOCK_RECVMSG4, "sock_recvmsg4"),
    (PROG_SOCK_GETPEERNAME4, "sock_getpeername4"),
    (lb_common::PROG_SOCK_CONNECT6, "sock_connect6"),
    (lb_common::PROG_SOCK_SENDMSG6, "sock_sendmsg6"),
    (lb_common::PROG_SOCK_RECVMSG6, "sock_recvmsg6"),
    (lb_common::PROG_SOCK_GETPEERNAME6, "sock_getpeername6"),
];

/// The object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-ebpf"));

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this xlb binary was built without its eBPF object (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error(
        "{dir} is not on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf` (the DaemonSet mounts the host's)"
    )]
    NoBpffs { dir: PathBuf },
    #[error("cannot create pin directory {dir}: {source}")]
    PinDir { dir: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "a program ({PROG_XDP}, {PROG_XDP_TRACE}, {PROG_TC_INGRESS}, {PROG_TC_EGRESS} or a socket program) is missing from the object or has the wrong type"
    )]
    NoProgram,
    #[error("the pinned map {name} changed while loading (an agent restarting, or `xlb cleanup`); try again")]
    MapsChanged { name: &'static str },
    #[error("loading program {PROG_XDP} into the kernel failed: {0}")]
    Verify(ProgramError),
    #[error("attaching to interface {iface} failed: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error(
        "cannot open cgroup {dir} for socket-level balancing: {source} (pass --cgroup with the cgroup v2 root, or --cgroup off)"
    )]
    Cgroup { dir: PathBuf, source: std::io::Error },
    #[error("attaching {prog} to cgroup {dir} failed: {source}")]
    AttachCgroup { prog: &'static str, dir: PathBuf, source: ProgramError },
    #[error("pinning the link on {iface} at {path} failed: {reason}")]
    PinLink { iface: String, path: PathBuf, reason: String },
}

/// How the program came to run on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link was created and pinned.
    New,
    /// A link pinned by an earlier agent now runs this program (atomic replace: no packet
    /// meets an interface without a program).
    Replaced,
    /// The kernel has no XDP links (before 5.9): attached through netlink, which cannot be
    /// pinned, so the program detaches when the agent stops.
    Unpinned,
}

/// When a link is pinned at `path`, hands it to `update`, which makes it run the new program
/// (atomically: no packet meets the interface without one). A pin whose link no longer works
/// (its interface was deleted) is removed. `true` when the pinned link now runs the program.
fn update_pinned(
    path: &Path,
    iface: &str,
    update: impl FnOnce(FdLink) -> Result<(), String>,
) -> Result<bool, LoadError> {
    if !path.exists() {
        return Ok(false);
    }
    match PinnedLink::from_pin(path).map_err(|e| e.to_string()).and_then(|p| update(FdLink::from(p))) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(%iface, path = %path.display(), error = %e, "pinned link is unusable; creating a new one");
            std::fs::remove_file(path).map_err(|e| LoadError::PinLink {
                iface: iface.to_owned(),
                path: path.to_owned(),
                reason: format!("removing the old pin: {e}"),
            })?;
            Ok(false)
        }
    }
}

/// Where the XDP link of `iface` is pinned.
pub fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{XDP_LINK}{iface}"))
}

/// The names of the datapath's link pins under `links/`, before the interface's name: the XDP
/// program's, and the TC ingress program's (the tc datapath).
const XDP_LINK: &str = "xdp_";
const TC_INGRESS_LINK: &str = "tc_ingress_";

/// Map capacities; defaults from lb-common.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub service_entries: u32,
    pub backends: u32,
    pub ct_entries: u32,
    pub sock_nat_entries: u32,
    pub affinity_entries: u32,
    /// Capacity of each IPv6 map (frontends and slots, backends, conntrack).
    pub ipv6_entries: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            service_entries: lb_common::DEFAULT_MAX_SERVICE_ENTRIES,
            backends: lb_common::DEFAULT_MAX_BACKENDS,
            ct_entries: lb_common::DEFAULT_MAX_CT_ENTRIES,
            sock_nat_entries: lb_common::DEFAULT_MAX_SOCK_NAT,
            affinity_entries: lb_common::DEFAULT_MAX_AFFINITY,
            ipv6_entries: lb_common::DEFAULT_MAX_IPV6_ENTRIES,
        }
    }
}

/// The magic number of the filesystem `dir` lies on (statfs), if it can be read.
fn fs_magic(dir: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// True when `dir` lies on a bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    fs_magic(dir) == Some(BPF_FS_MAGIC)
}

/// Creates the pin directory if it is not there, and checks that it lies on a bpffs.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), LoadError> {
    std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir { dir: dir.to_owned(), source })?;
    if !is_bpffs(dir) {
        return Err(LoadError::NoBpffs { dir: dir.to_owned() });
    }
    Ok(())
}

/// Loads the object and its XDP program. With `pin_dir`, every map is pinned there, and maps
/// already pinned there (by an earlier agent) are reused with their content.
pub fn load(pin_dir: Option<&Path>, caps: Capacities) -> Result<Ebpf, LoadError> {
    load_hooks(pin_dir, caps, &[Hook::Xdp])
}

/// As [`load`], with the program of each hook in `hooks` (the XDP program, the TC ingress one or
/// both); the TC egress and socket programs always.
pub fn load_hooks(pin_dir: Option<&Path>, caps: Capacities, hooks: &[Hook]) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(MAP_SERVICES, caps.service_entries)
        .map_max_entries(MAP_BACKENDS, caps.backends)
        .map_max_entries(MAP_BACKEND_FLOWS, caps.backends)
        .map_max_entries(MAP_CT, caps.ct_entries)
        .map_max_entries(MAP_SOCK_NAT, caps.sock_nat_entries)
        .map_max_entries(lb_common::MAP_AFFINITY, caps.affinity_entries)
        .map_max_entries(lb_common::MAP_AFFINITY6, caps.affinity_entries)
        .map_max_entries(lb_common::MAP_SOCK_AFFINITY, caps.affinity_entries)
        .map_max_entries(lb_common::MAP_SERVICES6, caps.ipv6_entries)
        .map_max_entries(lb_common::MAP_BACKENDS6, caps.ipv6_entries)
        .map_max_entries(lb_common::MAP_CT6, caps.ipv6_entries)
        .map_max_entries(lb_common::MAP_BACKEND_FLOWS6, caps.ipv6_entries)
        .map_max_entries(lb_common::MAP_SOCK_NAT6, caps.ipv6_entries);
    let paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => {
            prepare_pin_dir(dir)?;
            ALL_MAPS.into_iter().map(|m| (m, dir.join(m))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT)?;
    if hooks.contains(&Hook::Xdp) {
        xdp(&mut ebpf)?.load().map_err(LoadError::Verify)?;
    }
    if hooks.contains(&Hook::Tc) {
        tc_ingress(&mut ebpf)?;
    }
    tc_egress(&mut ebpf)?.load().map_err(LoadError::Verify)?;
    for (name, _) in SOCK_PROGRAMS {
        sock_program(&mut ebpf, name)?.load().map_err(LoadError::Verify)?;
    }
    Ok(ebpf)
}

/// A loaded socket-level program, by name (one of [`SOCK_PROGRAMS`]).
pub fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr, LoadError> {
    ebpf.program_mut(name).ok_or(LoadError::NoProgram)?.try_into().map_err(|_| LoadError::NoProgram)
}

/// Where the link of socket program `pin` (from [`SOCK_PROGRAMS`]) is pinned.
pub fn sock_link_pin(pin_dir: &Path, pin: &str) -> PathBuf {
    pin_dir.join("links").join(pin)
}

/// The root of the cgroup v2 hierarchy (where every process of the node and its pods lies
/// below), from /proc/self/mountinfo: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified
/// on hybrid ones. `None` when no cgroup2 is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "36 25 0:31 / /sys/fs/cgroup rw,... - cgroup2 cgroup2 rw"
        let (left, right) = l.split_once(" - ")?;
        let mut f = left.split_whitespace().skip(3);
        let (root, mount) = (f.next()?, f.next()?);
        (right.split_whitespace().next()? == "cgroup2" && root == "/").then(|| PathBuf::from(mount))
    })
}

/// The effective capabilities of this process (CapEff of /proc/self/status), as a bit set.
pub fn effective_capabilities() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
}

/// Checks the capabilities the agent needs, before it tries anything: an error naming the
/// missing ones when the datapath cannot be loaded, and warnings for what works only in part.
/// `caps` is a set as [`effective_capabilities`] gives it.
pub fn check_capabilities(caps: u64, socket_lb: bool) -> anyhow::Result<Vec<String>> {
    const NET_ADMIN: u32 = 12;
    const SYS_PTRACE: u32 = 19;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    // Since 5.8 CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON.
    if !has(BPF) && !has(SYS_ADMIN) {
        missing.push("CAP_BPF (to load programs and create maps)");
    }
    if !has(PERFMON) && !has(SYS_ADMIN) {
        missing
            .push("CAP_PERFMON (the verifier allows the datapath's packet pointer arithmetic only with it)");
    }
    if !has(NET_ADMIN) {
        missing.push("CAP_NET_ADMIN (to attach to interfaces and cgroups)");
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "missing capabilities: {}. The agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and CAP_SYS_ADMIN and CAP_SYS_PTRACE for socket termination (deploy/daemonset.yaml lists them)",
            missing.join("; ")
        );
    }
    let mut warnings = Vec::new();
    if socket_lb && !(has(SYS_ADMIN) && has(SYS_PTRACE)) {
        warnings.push(
            "without CAP_SYS_ADMIN and CAP_SYS_PTRACE the agent cannot enter the pods' network namespaces: sockets connected to a removed backend are not terminated, and their owners find out only from timeouts"
                .to_owned(),
        );
    }
    Ok(warnings)
}

/// Whether `dir` is a directory of a cgroup v2 hierarchy.
fn is_cgroup2(dir: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    fs_magic(dir) == Some(CGROUP2_SUPER_MAGIC)
}

/// The cgroup of `--cgroup`: `off` is none; `auto` the root of the cgroup v2 hierarchy, which
/// covers every process of the node only outside a cgroup namespace of its own (a container's
/// /sys/fs/cgroup is just the container); any other value a cgroup v2 directory, or on a hybrid
/// host the `unified` directory below it (so that the host's /sys/fs/cgroup can be given as is).
pub fn socket_lb_cgroup(arg: &str) -> anyhow::Result<Option<PathBuf>> {
    /// The inode of the initial cgroup namespace (the kernel's PROC_CGROUP_INIT_INO).
    const INIT_CGROUP_NS: u64 = 0xEFFF_FFFB;
    match arg {
        "off" => Ok(None),
        "auto" => {
            use std::os::unix::fs::MetadataExt as _;
            if std::fs::metadata("/proc/self/ns/cgroup").is_ok_and(|m| m.ino() != INIT_CGROUP_NS) {
                anyhow::bail!(
                    "--cgroup auto: this process is in a cgroup namespace of its own (a container), whose cgroup root holds only the container's processes; mount the host's /sys/fs/cgroup (hostPath) and pass its path, or --cgroup off"
                );
            }
            cgroup2_root().map(Some).ok_or_else(|| {
                anyhow::anyhow!(
                    "no cgroup v2 hierarchy is mounted: socket-level balancing needs one (mount it, pass --cgroup PATH, or --cgroup off)"
                )
            })
        }
        dir => {
            let dir = PathBuf::from(dir);
            if is_cgroup2(&dir) {
                Ok(Some(dir))
            } else if is_cgroup2(&dir.join("unified")) {
                Ok(Some(dir.join("unified")))
            } else {
                anyhow::bail!(
                    "--cgroup {}: not a directory of a cgroup v2 hierarchy (nor is its unified/); pass the host's cgroup2 mount, auto, or off",
                    dir.display()
                )
            }
        }
    }
}

/// Attaches the socket-level programs to the cgroup `dir` through links pinned under
/// `pin_dir/links`. Links an earlier agent pinned there are replaced: the new link is attached
/// next to the old one (both run for a moment, which is harmless: a socket given a backend by
/// the first no longer names a frontend for the second), then its pin takes the old pin's place
/// and the old link goes with it.
pub fn attach_sock_pinned(ebpf: &mut Ebpf, dir: &Path, pin_dir: &Path) -> Result<Vec<Attached>, LoadError> {
    let cgroup =
        std::fs::File::open(dir).map_err(|source| LoadError::Cgroup { dir: dir.to_owned(), source })?;
    let mut done = Vec::new();
    for (name, pin) in SOCK_PROGRAMS {
        let path = sock_link_pin(pin_dir, pin);
        let pin_err = |reason: String| LoadError::PinLink {
            iface: format!("cgroup {}", dir.display()),
            path: path.clone(),
            reason,
        };
        let attach_err = |source| LoadError::AttachCgroup { prog: name, dir: dir.to_owned(), source };
        let prog = sock_program(ebpf, name)?;
        // Flags 0: cgroup links always run next to the cgroup's other programs, and the kernel
        // refuses BPF_F_ALLOW_MULTI on them (aya creates links from kernel 5.7 on).
        let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|e| pin_err(format!("not a link: {e}")))?;
        let parent = path.parent().unwrap_or(pin_dir);
        std::fs::create_dir_all(parent)
            .map_err(|e| pin_err(format!("creating {}: {e}", parent.display())))?;
        // bpffs takes no dots in names.
        let tmp = path.with_file_name(format!("{pin}_new"));
        let _ = std::fs::remove_file(&tmp);
        drop(fd_link.pin(&tmp).map_err(|e| pin_err(e.to_string()))?);
        let replaced = path.exists();
        std::fs::rename(&tmp, &path).map_err(|e| pin_err(format!("renaming {}: {e}", tmp.display())))?;
        done.push(if replaced { Attached::Replaced } else { Attached::New });
    }
    Ok(done)
}

/// Loads [`PROG_XDP_PASS`] alone (every map of the object created as small as can be, unpinned)
/// and attaches it to `iface` in `mode`. It stays attached while the returned object lives.
pub fn attach_xdp_pass(iface: &str, mode: XdpMode) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    for m in ALL_MAPS.into_iter().chain([lb_common::MAP_TRACE, lb_common::MAP_REJECT_BUCKET]) {
        loader.map_max_entries(m, 1);
    }
    let mut ebpf = loader.load(OBJECT)?;
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::PROG_XDP_PASS)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(|_| LoadError::NoProgram)?;
    prog.load().map_err(LoadError::Verify)?;
    prog.attach(iface, mode).map_err(|source| LoadError::Attach { iface: iface.to_owned(), source })?;
    Ok(ebpf)
}

/// The loaded TC egress program.
pub fn tc_egress(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    ebpf.program_mut(PROG_TC_EGRESS).ok_or(LoadError::NoProgram)?.try_into().map_err(|_| LoadError::NoProgram)
}

/// The TC ingress program (the tc datapath), loaded (here, unless [`load_hooks`] did: only the
/// tc datapath needs it, and its verification takes as long as the XDP program's).
pub fn tc_ingress(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_TC_INGRESS)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(|_| LoadError::NoProgram)?;
    if prog.fd().is_err() {
        prog.load().map_err(LoadError::Verify)?;
    }
    Ok(prog)
}

/// TC programs are attached through tcx links (kernel 6.6), which can be pinned like XDP
/// links, so that they survive the agent and are replaced atomically by the next one.
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Runs a packet program (XDP or TC) once on `frame` with BPF_PROG_TEST_RUN: its verdict and
/// the frame as it leaves.
pub fn run_once<P>(prog: &P, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError>
where
    P: for<'a> aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::TestRunResult,
        >,
{
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(aya::programs::TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..aya::programs::TestRunOptions::new()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Where the balancing core runs on a node's interfaces: at XDP (`xlb_xdp`) or at TC ingress on
/// the skb (`xlb_tc_ingress`, the tc datapath).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// The hook packet tests and benchmarks run: `XLB_PACKET_HOOK=tc` for the tc datapath,
    /// else XDP.
    pub fn from_env() -> Self {
        match std::env::var("XLB_PACKET_HOOK").as_deref() {
            Ok("tc") => Hook::Tc,
            _ => Hook::Xdp,
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// TC's verdicts, as the tc datapath gives them.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// XDP's, which [`run_datapath_once`] reports for both hooks.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Runs the balancing core at `hook` once on `frame` (BPF_PROG_TEST_RUN): its verdict as the
/// XDP program's (the tc program's pass, drop and redirect back out as XDP_PASS, XDP_DROP and
/// XDP_TX; any other TC verdict is an error) and the frame as it leaves.
pub fn run_datapath_once(ebpf: &mut Ebpf, hook: Hook, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    match hook {
        Hook::Xdp => Ok(run_once(xdp(ebpf)?, frame)?),
        Hook::Tc => {
            let (verdict, out) = run_once(tc_ingress(ebpf)?, frame)?;
            let v = match verdict {
                TC_ACT_OK => XDP_PASS,
                TC_ACT_SHOT => XDP_DROP,
                TC_ACT_REDIRECT => XDP_TX,
                other => anyhow::bail!("the tc datapath gave verdict {other}, which it never should"),
            };
            Ok((v, out))
        }
    }
}

/// Where the TC egress link of `iface` is pinned.
pub fn tc_link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("tc_egress_{iface}"))
}

/// Where the TC ingress link of `iface` (the tc datapath) is pinned.
pub fn tc_ingress_link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{TC_INGRESS_LINK}{iface}"))
}

/// Attaches the TC egress program to `iface` through a tcx link pinned under `pin_dir/links`,
/// or updates the program of a link pinned there by an earlier agent. Needs [`tcx_supported`].
pub fn attach_tc_pinned(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<Attached, LoadError> {
    let path = tc_link_pin(pin_dir, iface);
    attach_tcx_pinned(tc_egress(ebpf)?, iface, TcAttachType::Egress, &path, pin_dir)
}

/// Attaches the TC ingress program (the tc datapath) to `iface` as [`attach_tc_pinned`] does
/// the egress one.
pub fn attach_tc_ingress_pinned(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<Attached, LoadError> {
    let path = tc_ingress_link_pin(pin_dir, iface);
    attach_tcx_pinned(tc_ingress(ebpf)?, iface, TcAttachType::Ingress, &path, pin_dir)
}

fn attach_tcx_pinned(
    prog: &mut SchedClassifier,
    iface: &str,
    at: TcAttachType,
    path: &Path,
    pin_dir: &Path,
) -> Result<Attached, LoadError> {
    let pin_err =
        |reason: String| LoadError::PinLink { iface: iface.to_owned(), path: path.to_owned(), reason };
    if update_pinned(path, iface, |l| {
        let link = SchedClassifierLink::try_from(l).map_err(|e| e.to_string())?;
        prog.attach_to_link(link).map(drop).map_err(|e| e.to_string())
    })? {
        return Ok(Attached::Replaced);
    }
    let attach_err = |source| LoadError::Attach { iface: iface.to_owned(), source };
    let id = prog
        .attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let fd_link = FdLink::try_from(link).map_err(|e| pin_err(format!("not a link: {e}")))?;
    let dir = path.parent().unwrap_or(pin_dir);
    std::fs::create_dir_all(dir).map_err(|e| pin_err(format!("creating {}: {e}", dir.display())))?;
    drop(fd_link.pin(path).map_err(|e| pin_err(e.to_string()))?);
    Ok(Attached::New)
}

/// The interfaces the datapath is attached to under `pin_dir`, by their pinned links, and the
/// hook of each, sorted by interface.
pub fn attached_hooks(pin_dir: &Path) -> Vec<(String, Hook)> {
    let mut out: Vec<(String, Hook)> = std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if let Some(i) = name.strip_prefix(XDP_LINK) {
                Some((i.to_string(), Hook::Xdp))
            } else {
                name.strip_prefix(TC_INGRESS_LINK).map(|i| (i.to_string(), Hook::Tc))
            }
        })
        .collect();
    out.sort();
    out
}

/// The hook the balancing core runs at on each interface (`--datapath`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// Per interface: XDP on physical NICs whose driver gains from native
    /// XDP, tc on every other device.
    Auto,
    /// XDP on every interface.
    Xdp,
    /// TC ingress on every interface.
    Tc,
}

/// Drivers of physical NICs whose native XDP runs before any skb is built and keeps their
/// offloads: on these `auto` takes XDP.
const NATIVE_XDP_DRIVERS: [&str; 12] = [
    "mlx5_core",
    "mlx4_en",
    "i40e",
    "ice",
    "ixgbe",
    "igb",
    "igc",
    "bnxt_en",
    "nfp",
    "qede",
    "sfc",
    "ixgbevf",
];

/// The hook for `iface` under `choice`, and why. `auto`: XDP on a physical NIC whose driver is
/// known to gain from native XDP ([`NATIVE_XDP_DRIVERS`]); TC everywhere else: virtual devices
/// (veth, bridge, vxlan, geneve, ipip, ...), where native XDP copies every frame and takes TSO and
/// GRO away, and virtual NICs (virtio_net, ena, gve, ...), where it turns off their receive
/// offloads. TC needs tcx (Linux 6.6): without it `auto` takes XDP.
pub fn choose_hook(iface: &str, choice: HookChoice) -> (Hook, String) {
    match choice {
        HookChoice::Xdp => (Hook::Xdp, "--datapath xdp".into()),
        HookChoice::Tc => (Hook::Tc, "--datapath tc".into()),
        HookChoice::Auto => {
            let driver = driver(iface).unwrap_or_else(|| "unknown".into());
            let physical = Path::new("/sys/class/net").join(iface).join("device").exists();
            if !tcx_supported() {
                (Hook::Xdp, format!("auto: driver {driver}; the kernel has no tcx (Linux 6.6)"))
            } else if physical && NATIVE_XDP_DRIVERS.contains(&driver.as_str()) {
                (Hook::Xdp, format!("auto: physical NIC, driver {driver} has native XDP"))
            } else if physical {
                (
                    Hook::Tc,
                    format!("auto: driver {driver} (native XDP would cost its offloads or is missing)"),
                )
            } else {
                (Hook::Tc, format!("auto: virtual device, driver {driver}"))
            }
        }
    }
}

/// Loads the trace program ([`PROG_XDP_TRACE`]) against the maps pinned under `pin_dir`, which
/// must all exist (the caller opened them): nothing is created or pinned. `expected` are the ids
/// of the maps the caller opened; if a pin changed in between (an agent restarting, `xlb
/// cleanup`), loading fails rather than trace against other maps.
pub fn load_trace(pin_dir: &Path, expected: &[(&'static str, u32)]) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS.into_iter().map(|m| (m, pin_dir.join(m))).collect();
    for (name, path) in &paths {
        if expected.iter().any(|(e, _)| e == name) {
            // A map the loader would have to create (its pin vanished since the caller opened
            // it) gets this tell-tale size, so that it can be recognised and its pin taken away
            // again.
            loader.map_pin_path(name, path.as_path()).map_max_entries(name, TRACE_SENTINEL_ENTRIES);
        } else if [
            lb_common::MAP_CONFIG,
            lb_common::MAP_AFFINITY,
            lb_common::MAP_AFFINITY6,
            lb_common::MAP_MAGLEV,
        ]
        .contains(name)
            && path.exists()
        {
            // The agent's settings, the clients' affinities and the Maglev tables, read only.
            loader.map_pin_path(name, path.as_path());
        } else {
            // A map the trace program does not use (or the settings, never written: defaults):
            // a private one, as small as can be.
            loader.map_max_entries(name, 1);
        }
    }
    let mut ebpf = loader.load(OBJECT)?;
    for (name, want) in expected {
        let info = ebpf.map(name).and_then(map_data).and_then(|m| m.info().ok());
        if info.as_ref().map(|i| i.id()) != Some(*want) {
            if let Some(i) = info
                && i.max_entries() == TRACE_SENTINEL_ENTRIES
            {
                let path = pin_dir.join(name);
                let pinned = aya::maps::MapData::from_pin(&path).ok().and_then(|m| m.info().ok());
                if pinned.map(|p| p.id()) == Some(i.id()) {
                    let _ = std::fs::remove_file(&path);
                }
            }
            return Err(LoadError::MapsChanged { name });
        }
    }
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP_TRACE)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(|_| LoadError::NoProgram)?;
    prog.load().map_err(LoadError::Verify)?;
    Ok(ebpf)
}

/// Capacity given to maps [`load_trace`] must never create.
const TRACE_SENTINEL_ENTRIES: u32 = 3;

fn map_data(m: &aya::maps::Map) -> Option<&aya::maps::MapData> {
    use aya::maps::Map;
    match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::LpmTrie(d) => Some(d),
        _ => None,
    }
}

/// The loaded trace program.
pub fn xdp_trace(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(PROG_XDP_TRACE).ok_or(LoadError::NoProgram)?.try_into().map_err(|_| LoadError::NoProgram)
}

/// The loaded XDP program.
pub fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(PROG_XDP).ok_or(LoadError::NoProgram)?.try_into().map_err(|_| LoadError::NoProgram)
}

/// Attaches the XDP program to `iface` through a link pinned under `pin_dir/links`, so that it
/// keeps running when the agent stops or is killed. A link pinned there by an earlier agent is
/// updated in place to this program; a pin whose link no longer works (its interface was
/// deleted) is replaced by a new link.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpMode,
    pin_dir: &Path,
) -> Result<Attached, LoadError> {
    let path = link_pin(pin_dir, iface);
    let pin_err = |reason: String| LoadError::PinLink { iface: iface.to_owned(), path: path.clone(), reason };
    let prog = xdp(ebpf)?;
    // The program keeps the link's handle until the agent exits; the pin keeps the link.
    if update_pinned(&path, iface, |l| {
        let link = XdpLink::try_from(l).map_err(|e| e.to_string())?;
        prog.attach_to_link(link).map(drop).map_err(|e| e.to_string())
    })? {
        return Ok(Attached::Replaced);
    }
    let id =
        prog.attach(iface, mode).map_err(|source| LoadError::Attach { iface: iface.to_owned(), source })?;
    let link = prog.take_link(id).map_err(|source| LoadError::Attach { iface: iface.to_owned(), source })?;
    match FdLink::try_from(link) {
        Ok(fd_link) => {
            let dir = path.parent().unwrap_or(pin_dir);
            std::fs::create_dir_all(dir).map_err(|e| pin_err(format!("creating {}: {e}", dir.display())))?;
            let pinned = fd_link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
            drop(pinned); // the pin holds the link
            Ok(Attached::New)
        }
        Err(_) => {
            // Converting dropped the netlink attachment: attach again and keep it in the
            // program, which the agent holds until it exits.
            prog.attach(iface, mode)
                .map_err(|source| LoadError::Attach { iface: iface.to_owned(), source })?;
            Ok(Attached::Unpinned)
        }
    }
}

/// The kernel driver of `iface` (ETHTOOL_GDRVINFO), e.g. "veth"; `None` if it cannot be read.
pub fn driver(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket used for one ioctl and closed; `req` points at `info`, both
    // live for the call, laid out as the kernel's ifreq and ethtool_drvinfo.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req as *mut IfReq);
        libc::close(fd);
        r == 0
    };
    ok.then(|| crate::reconcile::unfixed(&info.driver))
}

/// Removes the pinned links (detaching the programs, which it waits for) and maps under
/// `pin_dir`. Returns what was removed.
pub fn unpin_all(pin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = pin_dir.join("links");
    let (mut links_left, mut progs_left) = (Vec::new(), Vec::new());
    if links.is_dir() {
        for e in std::fs::read_dir(&links)? {
            let p = e?.path();
            if let Ok(l) = PinnedLink::from_pin(&p)
                && let Ok(info) = FdLink::from(l).info()
            {
                links_left.push(info.id());
                progs_left.push(info.program_id());
            }
            std::fs::remove_file(&p)?;
            removed.push(p);
        }
        std::fs::remove_dir(&links)?;
    }
    // The kernel releases an unpinned link from a work queue: its id goes first, then the
    // program is detached and put. Return once the programs are gone too, so that nothing
    // runs any more (unless an agent still holds them: then only the links are waited for).
    let wait = |ids: &mut Vec<u32>, live: &dyn Fn() -> Vec<u32>, limit: std::time::Duration| {
        let deadline = std::time::Instant::now() + limit;
        while !ids.is_empty() && std::time::Instant::now() < deadline {
            let now = live();
            ids.retain(|id| now.contains(id));
            if !ids.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    };
    wait(
        &mut links_left,
        &|| aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect(),
        std::time::Duration::from_secs(5),
    );
    wait(
        &mut progs_left,
        &|| aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect(),
        std::time::Duration::from_secs(2),
    );
    for m in lb_common::ALL_MAPS {
        let p = pin_dir.join(m);
        if p.exists() {
            std::fs::remove_file(&p)?;
            removed.push(p);
        }
    }
    for p in crate::datapath::other_version_pins(pin_dir) {
        std::fs::remove_file(&p)?;
        removed.push(p);
    }
    // The directory too, once nothing is left in it (an uninstall leaves no trace on the node).
    if !removed.is_empty() && std::fs::remove_dir(pin_dir).is_ok() {
        removed.push(pin_dir.to_owned());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::check_capabilities as check;

    fn set(caps: &[u32]) -> u64 {
        caps.iter().fold(0u64, |s, c| s | 1 << c)
    }

    #[test]
    fn capabilities_are_checked_before_loading() {
        // The DaemonSet's set: BPF, NET_ADMIN, PERFMON, SYS_ADMIN, SYS_PTRACE.
        assert!(check(set(&[39, 12, 38, 21, 19]), true).unwrap().is_empty());
        // Without socket termination's two, it loads and says what is lost.
        let w = check(set(&[39, 12, 38]), true).unwrap();
        assert!(w.len() == 1 && w[0].contains("CAP_SYS_PTRACE"), "{w:?}");
        assert!(check(set(&[39, 12, 38]), false).unwrap().is_empty());
        // CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON.
        assert!(check(set(&[12, 21]), false).is_ok());
        let e = check(set(&[39, 12]), false).unwrap_err().to_string();
        assert!(e.contains("CAP_PERFMON (") && !e.contains("CAP_BPF ("), "{e}");
        let e = check(0, false).unwrap_err().to_string();
        assert!(["CAP_BPF (", "CAP_PERFMON (", "CAP_NET_ADMIN ("].iter().all(|c| e.contains(c)), "{e}");
    }
}
