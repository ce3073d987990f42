//! A test bed of network namespaces for xlb: a client, a node running `xlb agent`, and pods
//! behind the node, all joined by veth pairs and addressed from 198.18.0.0/15. It is used by the
//! end-to-end tests and by the demo.
//!
//! Everything it creates (namespaces, processes, pinned maps, temporary files) is owned by a
//! value whose `Drop` removes it, so a failing test cleans up too. Names carry the process id
//! (`xlbt<pid>-...`), so leftovers of a run that was killed outright are recognised and removed
//! by the next one ([`reap_stale`]). Nothing is ever attached to, or changed in, the root
//! namespace's interfaces, routes or firewall.
pub mod deploy;
pub mod fake_api;
pub mod image;
pub mod kpb;
pub mod rbac;
pub mod soak;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and call: `xlbt<pid>-<n>`.
pub fn unique_prefix() -> String {
    format!("xlbt{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command to completion; the error carries its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when the process with this id still exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// True when running as root. Otherwise a test that needs root skips (saying so), unless
/// XLB_REQUIRE_PRIVILEGED=1 (set by `cargo xtask test` and CI), where it fails instead.
/// `what` names the tests and why, e.g. "packet tests need root (BPF_PROG_TEST_RUN)".
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("XLB_REQUIRE_PRIVILEGED").map_or(true, |v| v != "1"),
        "{what}; XLB_REQUIRE_PRIVILEGED=1 forbids skipping"
    );
    eprintln!("SKIPPED: {what}");
    false
}

/// Removes namespaces and pin directories left by test-bed processes that no longer exist.
pub fn reap_stale() {
    let owner = |name: &str| -> Option<u32> { name.strip_prefix("xlbt")?.split('-').next()?.parse().ok() };
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner(name).is_some_and(|pid| !alive(pid)) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !alive(pid)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Some(root) = cgroup2_root()
        && let Ok(rd) = std::fs::read_dir(&root)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !alive(pid)) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// CGROUP2_SUPER_MAGIC from linux/magic.h.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Where this machine mounts its cgroup v2 hierarchy (unified or hybrid layout), if it does.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: statfs writes into a zeroed struct we own; the path is a valid C string.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_MAGIC
        }
    })
}

/// A cgroup v2 of the test's own, standing for one node's root cgroup: that node's agent
/// attaches its socket-level programs here (never to the machine's root cgroup), so only the
/// processes a test starts in it ([`in_cgroup`]: the node's processes and its pods) are balanced
/// at the socket. Removed on drop, once its processes are gone.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// `None`, with a note, when the machine has no cgroup v2 hierarchy (the agent then runs
    /// with `--cgroup off`, and the tests of socket-level balancing say they cannot run).
    pub fn new(name: &str) -> anyhow::Result<Option<Self>> {
        let Some(root) = cgroup2_root() else {
            eprintln!(
                "no cgroup v2 hierarchy on this machine: socket-level balancing is off in this test bed"
            );
            return Ok(None);
        };
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Some(Self { path }))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A process that just exited may still be listed for a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while std::fs::remove_dir(&self.path).is_err() && self.path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `xlb-testbed session` in the namespace `ns` and in `cgroup`: one TCP connection (or,
/// with `udp`, one connected UDP socket) to `to`, used every 25 ms, 80 times, connecting again
/// after an error. Its log (`log`) has a line per request: see [`session_lines`].
pub fn spawn_session(
    testbed: &Path,
    ns: &Netns,
    cgroup: &Path,
    udp: bool,
    to: &str,
    log: &Path,
) -> anyhow::Result<Proc> {
    let proto = if udp { "--udp" } else { "--tcp" };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(testbed).args([
        "session",
        proto,
        to,
        "--count",
        "80",
        "--interval-ms",
        "25",
    ]);
    in_cgroup(&mut cmd, cgroup)?;
    Proc::spawn(&format!("session {proto}"), &mut cmd, Some(log))
}

/// The requests a session logged: (epoch ms, `ok POD` or `err ...`).
pub fn session_lines(log: &str) -> Vec<(u128, String)> {
    log.lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// Milliseconds since the epoch, the clock of [`session_lines`].
pub fn epoch_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// The path of `cg`, a test's cgroup for socket-level balancing; `None` (the test skips, and
/// says so) when the machine has no cgroup v2 hierarchy, which fails under
/// XLB_REQUIRE_PRIVILEGED=1 (CI).
pub fn socket_lb_cgroup(cg: Option<&TestCgroup>) -> Option<PathBuf> {
    if let Some(c) = cg {
        return Some(c.path.clone());
    }
    assert!(
        std::env::var("XLB_REQUIRE_PRIVILEGED").map_or(true, |v| v != "1"),
        "socket-level balancing needs a cgroup v2 hierarchy, and this machine has none"
    );
    eprintln!("SKIPPED: no cgroup v2 hierarchy for socket-level balancing");
    None
}

/// Makes the process `cmd` starts a member of `cgroup` (it writes itself into cgroup.procs
/// between fork and exec).
pub fn in_cgroup(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
    // SAFETY: the closure only calls open, write and close (async-signal-safe) on memory it owns.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n == 1 { Ok(()) } else { Err(err) }
        });
    }
    Ok(())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`) to completion.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// The namespace's file, for setns(2) and nsenter.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens live there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), f)
    }
}

/// Runs `f` on a thread that has entered the network namespace of the file `path` (a
/// [`Netns::path`]).
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Joins `a:a_if` and `b:b_if` with a veth pair, created directly inside the two namespaces, and
/// addresses both ends. Transmit checksum offload is turned off at both ends: packets then carry
/// full checksums, as packets from a real wire do (see TOOLCHAIN.md on CHECKSUM_PARTIAL).
pub fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> anyhow::Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
        ns.exec("ethtool", &["-K", ifname, "tx", "off"])?;
    }
    Ok(())
}

/// A child process, killed (by its own pid) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(log) = log {
            let f = std::fs::File::create(log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { name: name.into(), child, log: log.map(Path::to_owned) })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before logging {needle:?}:\n{}", self.name, self.log_text());
            }
            if Instant::now() > deadline {
                bail!("{} did not log {needle:?} within {timeout:?}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the process exits by itself (its exit status).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still runs after {timeout:?}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once reaped.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A directory removed on drop (a temporary directory, or a bpffs pin directory).
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// From inside `ns`: a TCP connection to `tcp` and a UDP datagram to `udp` (connected, so that
/// an ICMP port unreachable fails its next receive). Asserts that both are refused
/// (ECONNREFUSED: a reset, an ICMP port unreachable) within a second, as a client told at once
/// rather than one waiting for a timeout; `logs` goes into the failure's message.
pub fn assert_refused_at_once(ns: &Netns, tcp: SocketAddr, udp: SocketAddr, logs: impl Fn() -> String) {
    let (tcp, udp) = ns.enter(|| {
        let start = Instant::now();
        let tcp = TcpStream::connect_timeout(&tcp, Duration::from_secs(5))
            .map(|_| ())
            .map_err(|e| (e.kind(), start.elapsed()));
        let any: SocketAddr = if udp.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
        let s = std::net::UdpSocket::bind(any).unwrap();
        s.connect(udp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        s.send(b"anyone?").unwrap();
        let udp = s.recv(&mut [0u8; 64]).map(|_| ()).map_err(|e| (e.kind(), start.elapsed()));
        (tcp, udp)
    });
    for (what, r) in [("TCP connect", tcp), ("UDP receive", udp)] {
        let (kind, took) = r.expect_err(what);
        assert_eq!(
            kind,
            std::io::ErrorKind::ConnectionRefused,
            "{what}: {kind:?} after {took:?}\n{}",
            logs()
        );
        assert!(took < Duration::from_secs(1), "{what} was refused only after {took:?}");
    }
}

/// Finds a binary of this workspace: `$XLB_BIN`-style override, else next to the running
/// executable (`target/<profile>/` for binaries, `target/<profile>/deps/` for tests).
pub fn workspace_bin(name: &str, env_override: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env_override) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(anyhow!(
        "cannot find the {name} binary next to {}: build it first (`cargo build -p lb-userspace`; `cargo xtask test` does) or set {env_override}",
        exe.display()
    ))
}

/// Makes sure /sys/fs/bpf is a bpffs, mounting one if nothing is mounted there.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = run("mountpoint", &["-q", "/sys/fs/bpf"]).is_ok();
    if !mounted {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}

/// A pod: a namespace behind the node, with one address.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

/// client ── node ── pods. The node runs `xlb agent` on all its interfaces.
///
/// ```text
///  client 198.18.100.2 ─ eth0 ── eth0 198.18.100.1  node  eth<i> 198.18.<10+i>.1 ── eth0 198.18.<10+i>.2  pod i
///  route 198.18.0.0/16 via node                     ip_forward=1, xlb on every eth        default via node
/// ```
/// Service addresses (ClusterIPs) are taken from 198.18.0.0/24, which no interface carries.
pub struct SingleNode {
    pub prefix: String,
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<Pod>,
    pub client_ip: Ipv4Addr,
    pub node_ifaces: Vec<String>,
    pub work: PathBuf,
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub xlb: PathBuf,
    pub agent: Option<Proc>,
    pub servers: Vec<Proc>,
    /// The node's cgroup, where its agent attaches socket-level balancing.
    pub cgroup: Option<TestCgroup>,
    /// More flags for the agent (e.g. `--lb-algorithm maglev`).
    pub agent_args: Vec<String>,
    /// A command the agent runs under (e.g. `setpriv --bounding-set=... --`).
    pub agent_wrapper: Vec<String>,
    // Dropped last (declaration order): the pins and files outlive the processes using them.
    _pins: DirGuard,
    _work: DirGuard,
}

impl SingleNode {
    /// Builds the namespaces and links for `pods` pods (named as given).
    pub fn new(pod_names: &[&str]) -> anyhow::Result<Self> {
        reap_stale();
        ensure_bpffs()?;
        let xlb = workspace_bin("xlb", "XLB_BIN")?;
        let prefix = unique_prefix();
        let work = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(work.join("manifests"))?;
        let work_guard = DirGuard(work.clone());
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&prefix);
        let pins_guard = DirGuard(pin_dir.clone());

        let cgroup = TestCgroup::new(&format!("{prefix}-node"))?;
        let client = Netns::new(format!("{prefix}-client"))?;
        let node = Netns::new(format!("{prefix}-node"))?;
        link(&client, "eth0", "198.18.100.2/24", &node, "eth0", "198.18.100.1/24")?;
        client.ip(&["route", "add", "198.18.0.0/16", "via", "198.18.100.1"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let mut pods = Vec::new();
        let mut node_ifaces = vec!["eth0".to_string()];
        for (i, name) in pod_names.iter().enumerate() {
            let net = 10 + i;
            let ns = Netns::new(format!("{prefix}-{name}"))?;
            let node_if = format!("eth{}", i + 1);
            link(&node, &node_if, &format!("198.18.{net}.1/24"), &ns, "eth0", &format!("198.18.{net}.2/24"))?;
            ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
            node_ifaces.push(node_if);
            pods.push(Pod { name: name.to_string(), ip: Ipv4Addr::new(198, 18, net as u8, 2), ns });
        }
        Ok(SingleNode {
            prefix,
            client,
            node,
            pods,
            client_ip: Ipv4Addr::new(198, 18, 100, 2),
            node_ifaces,
            manifests: work.join("manifests"),
            work,
            pin_dir,
            xlb,
            agent: None,
            servers: Vec::new(),
            cgroup,
            agent_args: Vec::new(),
            agent_wrapper: Vec::new(),
            _pins: pins_guard,
            _work: work_guard,
        })
    }

    /// Starts an echo server in every pod on the given TCP and UDP ports.
    pub fn start_servers(&mut self, testbed: &Path, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
        for pod in &self.pods {
            self.servers.push(start_server(testbed, pod, tcp, udp, &self.work)?);
        }
        Ok(())
    }

    /// Writes a manifest file into the agent's directory (replacing one of the same name).
    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        write_manifest_in(&self.manifests, file, yaml)
    }

    /// Starts `xlb agent` in the node namespace (through nsenter, so that /sys/fs/bpf stays the
    /// host's bpffs) and waits until it has attached.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let agent = self.spawn_agent()?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Starts `xlb agent` like [`Self::start_agent`], and hands its process to the caller.
    pub fn spawn_agent(&self) -> anyhow::Result<Proc> {
        spawn_agent(&self.xlb, &self.agent_node(), &self.manifests, "xlb agent", &self.work.join("agent.log"))
    }

    /// The command [`Self::spawn_agent`] runs, with `args` more, on the manifests in
    /// `manifests`: for a test to run it as it likes (a second agent, say).
    pub fn agent_command(&self, manifests: &Path, args: &[&str]) -> Command {
        let mut cmd = agent_command(&self.xlb, &self.agent_node(), manifests);
        cmd.args(args);
        cmd
    }

    fn agent_node(&self) -> AgentNode<'_> {
        // The node of the test manifests' endpoints is `nodeName: node-1`.
        AgentNode {
            ns: &self.node,
            pin_dir: &self.pin_dir,
            name: "node-1",
            ifaces: &self.node_ifaces,
            cgroup: self.cgroup.as_ref().map(|c| c.path.as_path()),
            args: &self.agent_args,
            wrapper: &self.agent_wrapper,
            kubeconfig: None,
        }
    }

    /// Runs the xlb CLI against this node's pinned maps.
    pub fn xlb_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        xlb_cli_at(&self.xlb, &self.pin_dir, args)
    }

    /// Lets the client receive the answers xlb sends back by XDP_TX at once (see
    /// [`client_xdp_pass`]).
    pub fn client_takes_xdp_tx(&mut self) -> anyhow::Result<()> {
        let p = client_xdp_pass(&self.xlb, &self.client, &self.work)?;
        self.servers.push(p);
        Ok(())
    }

    /// Waits until `xlb services` lists `frontend` with `backends` backends.
    pub fn wait_for_service(&self, frontend: &str, backends: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.xlb_cli(&["services", "-o", "json"])?;
            let rows: serde_json::Value = serde_json::from_str(&out)?;
            let n = rows
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["frontend"] == frontend)
                .map(|r| r["backends"].as_array().map_or(0, Vec::len));
            if n == Some(backends) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{frontend} never reached {backends} backends; `xlb services` says:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Text of every log (agent and servers), for a failing test's report.
    pub fn logs(&self) -> String {
        logs_of(self.agent.iter().chain(&self.servers))
    }
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test bed {} logs:\n{}", self.prefix, self.logs());
        }
        // Processes first (fields drop after this body in declaration order, but the agent must
        // stop before its namespace goes away).
        if let Some(mut a) = self.agent.take() {
            a.stop(Duration::from_secs(5));
        }
        for mut s in self.servers.drain(..) {
            s.stop(Duration::from_secs(2));
        }
    }
}

/// What a pod's echo server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Name of the pod that answered.
    pub pod: String,
    /// The address and port the server accepted on (as the pod saw it).
    pub server: SocketAddr,
    /// The client address and port as the pod saw it.
    pub peer: SocketAddr,
    /// The address the client received the answer from.
    pub from: SocketAddr,
}

fn parse_answer(line: &str, from: SocketAddr) -> anyhow::Result<Answer> {
    let mut it = line.split_whitespace();
    let (Some(pod), Some(server), Some(peer)) = (it.next(), it.next(), it.next()) else {
        bail!("malformed answer {line:?}");
    };
    Ok(Answer { pod: pod.into(), server: server.parse()?, peer: peer.parse()?, from })
}

/// `GET path` over HTTP/1.1 to `to` (half a second to connect, two to answer): the status and
/// the body read as JSON; `None` when either fails. Runs in the caller's namespace.
pub fn http_get_json(to: std::net::SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: xlb\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(out.split("\r\n\r\n").nth(1)?).ok()?))
}

/// One TCP request: connect, send a line, read the answer line. Runs in the caller's namespace.
pub fn tcp_request(to: SocketAddrV4, timeout: Duration) -> anyhow::Result<Answer> {
    tcp_request_to(to.into(), timeout)
}

/// [`tcp_request`] to an address of either family.
pub fn tcp_request_to(to: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello\n")?;
    let from = s.peer_addr()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).with_context(|| format!("read from {to}"))?;
    parse_answer(&line, from)
}

/// A TCP connection held open: each request is one line out and one answer back. Open it
/// inside a namespace ([`Netns::enter`]); it can be used from any thread afterwards.
pub struct HeldConn {
    stream: TcpStream,
    to: SocketAddr,
}

impl HeldConn {
    pub fn open(to: impl Into<SocketAddr>, timeout: Duration) -> anyhow::Result<Self> {
        let to = to.into();
        let stream = TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect {to}"))?;
        Ok(Self { stream, to })
    }

    /// The connection's own address and port.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// One request on the connection.
    pub fn request(&mut self, timeout: Duration) -> anyhow::Result<Answer> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.write_all(b"ping\n").with_context(|| format!("write to {}", self.to))?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .with_context(|| format!("read from {}", self.to))?;
        if line.is_empty() {
            bail!("{} closed the connection", self.to);
        }
        parse_answer(&line, self.stream.peer_addr()?)
    }
}

/// One UDP request from a fresh socket (a new flow): the answer and where it came from.
pub fn udp_request(to: SocketAddrV4, timeout: Duration) -> anyhow::Result<Answer> {
    udp_request_to(to.into(), timeout)
}

/// [`udp_request`] to an address of either family.
pub fn udp_request_to(to: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"hello\n", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf).with_context(|| format!("no UDP answer from {to}"))?;
    parse_answer(std::str::from_utf8(&buf[..n])?, from)
}

/// A UDP request of `size` bytes (the request line, then padding): a datagram larger than the
/// path's MTU leaves in fragments. The server answers with as many bytes. The answer, with the
/// size the server says it received; an error unless the answer is `size` bytes with its
/// padding intact.
pub fn udp_request_sized(to: SocketAddr, size: usize, timeout: Duration) -> anyhow::Result<(Answer, usize)> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(timeout))?;
    let mut request = b"hello\n".to_vec();
    request.resize(size, b'x');
    s.send_to(&request, to)?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).with_context(|| format!("no UDP answer from {to}"))?;
    let answer = &buf[..n];
    let end = answer.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("no answer line"))?;
    let line = std::str::from_utf8(&answer[..end])?;
    let received = line.split_whitespace().nth(3).and_then(|v| v.parse().ok());
    let received = received.ok_or_else(|| anyhow!("the answer {line:?} does not say the size received"))?;
    ensure!(n == size, "an answer of {n} bytes, not {size}");
    ensure!(answer[end + 1..].iter().all(|&b| b == b'x'), "the answer's padding changed");
    Ok((parse_answer(line, from)?, received))
}

/// `count` requests to `to` (TCP, or UDP with `udp`) made by a process of their own
/// (`xlb-testbed request`) in `ns`, inside `cgroup` when given: as one of that node's processes
/// or pods, which socket-level balancing sees, unlike a thread of the test. Each answer, or the
/// error the request met.
pub fn requests_from(
    testbed: &Path,
    ns: &Netns,
    cgroup: Option<&Path>,
    udp: bool,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<Result<Answer, String>>> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(testbed).args([
        "request",
        if udp { "--udp" } else { "--tcp" },
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if let Some(c) = cgroup {
        in_cgroup(&mut cmd, c)?;
    }
    let out = cmd.output().context("running xlb-testbed request")?;
    if !out.status.success() {
        bail!("xlb-testbed request failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.split_once(' ') {
            Some(("ok", rest)) => {
                let (answer, from) = rest.rsplit_once(' ').ok_or_else(|| anyhow!("malformed line {l:?}"))?;
                Ok(Ok(parse_answer(answer, from.parse()?)?))
            }
            Some(("err", msg)) => Ok(Err(msg.to_owned())),
            _ => bail!("malformed line {l:?}"),
        })
        .collect()
}

/// The echo server run in pods: answers every request on a TCP connection (each read) and
/// every UDP datagram with `<name> <server addr> <peer addr>`. Runs until killed.
/// An address as a server prints it: an IPv4 client of a dual-stack socket as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for &port in tcp {
        // Dual-stack where the namespace has IPv6, else IPv4.
        let l = std::net::TcpListener::bind(("::", port))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
        let name = name.to_owned();
        handles.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let name = name.clone();
                std::thread::spawn(move || {
                    // One answer per request (a read), until the client closes: a connection
                    // can be held open and used again.
                    let _ = c.set_read_timeout(Some(Duration::from_secs(120)));
                    let mut buf = [0u8; 64];
                    while matches!(c.read(&mut buf), Ok(1..)) {
                        let (Ok(local), Ok(peer)) = (c.local_addr(), c.peer_addr()) else { break };
                        let (local, peer) = (canonical(local), canonical(peer));
                        if c.write_all(format!("{name} {local} {peer}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
    for &port in udp {
        let s = UdpSocket::bind(("::", port)).or_else(|_| UdpSocket::bind(("0.0.0.0", port)))?;
        let name = name.to_owned();
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf) else { continue };
                let local = SocketAddr::new(local_ip_for(canonical(peer)), port);
                let mut answer = format!("{name} {local} {}", canonical(peer)).into_bytes();
                // A large request (sent in fragments): its size said, and an answer as large.
                if n > 512 {
                    answer.extend_from_slice(format!(" {n}\n").as_bytes());
                    answer.resize(n, b'x');
                } else {
                    answer.push(b'\n');
                }
                let _ = s.send_to(&answer, peer);
            }
        }));
    }
    println!("{name} listening on tcp {tcp:?} udp {udp:?}");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// The local address the kernel would use towards `peer` (an unbound UDP socket cannot tell
/// which address a datagram arrived on).
fn local_ip_for(peer: SocketAddr) -> std::net::IpAddr {
    UdpSocket::bind(if peer.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|s| {
            s.connect(peer)?;
            s.local_addr()
        })
        .map_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip())
}

/// Sets a flag on SIGINT/SIGTERM so that long-running commands (the demo) can stop and clean up.
pub fn install_interrupt_flag() -> &'static std::sync::atomic::AtomicBool {
    static FLAG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        FLAG.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &FLAG
}

/// Starts the echo server of `pod` on the given ports; its log goes to `work`.
fn start_server(testbed: &Path, pod: &Pod, tcp: &[u16], udp: &[u16], work: &Path) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pod.ns.name]).arg(testbed).args(["serve", "--name", &pod.name]);
    for p in tcp {
        cmd.args(["--tcp", &p.to_string()]);
    }
    for p in udp {
        cmd.args(["--udp", &p.to_string()]);
    }
    let log = work.join(format!("server-{}.log", pod.name));
    let mut proc = Proc::spawn(&format!("server in {}", pod.name), &mut cmd, Some(&log))?;
    proc.wait_for_log("listening", Duration::from_secs(10))?;
    Ok(proc)
}

/// Writes a manifest into `dir` atomically (replacing one of the same name).
fn write_manifest_in(dir: &Path, file: &str, yaml: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// A node an agent runs on: its namespace, pins, name (NODE_NAME) and interfaces.
struct AgentNode<'a> {
    ns: &'a Netns,
    pin_dir: &'a Path,
    name: &'a str,
    ifaces: &'a [String],
    /// The node's cgroup for socket-level balancing; `None`: `--cgroup off`. Never the
    /// machine's own.
    cgroup: Option<&'a Path>,
    /// More agent flags.
    args: &'a [String],
    /// A command the agent runs under.
    wrapper: &'a [String],
    /// The API server's kubeconfig; `None`: the manifests directory.
    kubeconfig: Option<&'a Path>,
}

/// Starts `xlb agent` in `node`'s namespace (through nsenter, so that /sys/fs/bpf stays the
/// host's bpffs) on the manifests in `manifests`, and waits until it has attached.
fn spawn_agent(
    xlb: &Path,
    node: &AgentNode,
    manifests: &Path,
    what: &str,
    log: &Path,
) -> anyhow::Result<Proc> {
    let mut agent = Proc::spawn(what, &mut agent_command(xlb, node, manifests), Some(log))?;
    agent.wait_for_log(" ready pin_dir=", Duration::from_secs(30))?;
    Ok(agent)
}

/// The command that runs `xlb agent` for `node` on the manifests in `manifests`.
fn agent_command(xlb: &Path, node: &AgentNode, manifests: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.ns.path().display()))
        .args(node.wrapper)
        .arg(xlb)
        .arg("--pin-dir")
        .arg(node.pin_dir)
        .arg("agent")
        .env("XLB_LOG", "info")
        .env("NODE_NAME", node.name)
        .arg("--cgroup")
        .arg(node.cgroup.map_or(PathBuf::from("off"), Path::to_path_buf));
    match node.kubeconfig {
        Some(k) => cmd.arg("--kubeconfig").arg(k),
        None => cmd.arg("--manifests").arg(manifests),
    };
    for i in node.ifaces {
        cmd.arg("--iface").arg(i);
    }
    cmd.args(node.args);
    cmd
}

/// Attaches `xlb xdp-pass` (a program that passes every packet) to the client's eth0, as a real
/// NIC would take them: the kernel delivers the frames a veth peer sends back with XDP_TX (xlb's
/// resets and ICMP errors) only to a veth with an XDP program; without one they wait in its
/// queue until other traffic wakes it. The process is the caller's to stop.
fn client_xdp_pass(xlb: &Path, client: &Netns, work: &Path) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", client.path().display())).arg(xlb).args(["xdp-pass", "--iface", "eth0"]);
    let mut p = Proc::spawn("xlb xdp-pass on the client", &mut cmd, Some(&work.join("client-xdp-pass.log")))?;
    p.wait_for_log("attached", Duration::from_secs(10))?;
    Ok(p)
}

/// Runs the xlb CLI against the pins under `pin_dir`.
fn xlb_cli_at(xlb: &Path, pin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let pin = pin_dir.display().to_string();
    let mut full = vec!["--pin-dir", &pin];
    full.extend_from_slice(args);
    run(&xlb.display().to_string(), &full)
}

/// The logs of `procs`, each under its name, for a failing test's report.
fn logs_of<'a>(procs: impl Iterator<Item = &'a Proc>) -> String {
    procs.map(|p| format!("--- {} ---\n{}\n", p.name, p.log_text())).collect()
}

/// Two nodes, pods behind each, a client outside, and optionally a host outside the cluster
/// (a database at a fixed address). With the default pods:
///
/// ```text
///  client 198.18.100.2 ── node-1 198.18.100.1 ─┬─ 198.18.200.1 ── 198.18.200.2 node-2 ── 198.18.20.1 ── pod-b 198.18.20.2
///  route 198.18.0.0/16 via node-1              ├─ 198.18.10.1 ── pod-a 198.18.10.2
///                                              └─ 198.18.50.1 ── db 198.18.50.2 (outside the cluster, optional)
/// ```
/// The k-th pod on node n (1 or 2) is at 198.18.<10 n + k>.2. Each node runs its own
/// `xlb agent` (NODE_NAME node-1, node-2) on all its interfaces, from the same manifest
/// directory (the cluster's objects: as from one API server), with its own pins and cgroup. The
/// nodes route each other's pod networks; node-2 reaches the client's network and the outside
/// host through node-1.
pub struct TwoNodes {
    pub prefix: String,
    pub client: Netns,
    pub nodes: [Netns; 2],
    pub pods: Vec<Pod>,
    /// The node (0 or 1) of each pod.
    pub pod_nodes: Vec<usize>,
    /// The host outside the cluster, when asked for.
    pub outside: Option<Pod>,
    pub client_ip: Ipv4Addr,
    pub work: PathBuf,
    pub manifests: PathBuf,
    pub pin_dirs: [PathBuf; 2],
    pub xlb: PathBuf,
    pub agents: Vec<Proc>,
    pub servers: Vec<Proc>,
    /// Each node's cgroup, where its agent attaches socket-level balancing.
    pub cgroups: [Option<TestCgroup>; 2],
    /// More flags for both agents (e.g. `--lb-algorithm maglev`).
    pub agent_args: Vec<String>,
    /// When set, the agents watch the API server of this kubeconfig instead of the manifests.
    pub kubeconfig: Option<PathBuf>,
    _pins: [DirGuard; 2],
    _work: DirGuard,
}

impl TwoNodes {
    /// pod-a on node-1, pod-b on node-2.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_pods(&[("pod-a", 0), ("pod-b", 1)], false)
    }

    /// The given pods, each on node 0 or 1, and the host outside the cluster if `outside`.
    pub fn with_pods(pods: &[(&str, usize)], outside: bool) -> anyhow::Result<Self> {
        reap_stale();
        ensure_bpffs()?;
        let xlb = workspace_bin("xlb", "XLB_BIN")?;
        let prefix = unique_prefix();
        let work = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(work.join("manifests"))?;
        let work_guard = DirGuard(work.clone());
        let pin_dirs = [1, 2].map(|i| PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-n{i}")));
        let pins = [DirGuard(pin_dirs[0].clone()), DirGuard(pin_dirs[1].clone())];
        let cgroups =
            [TestCgroup::new(&format!("{prefix}-node1"))?, TestCgroup::new(&format!("{prefix}-node2"))?];
        let client = Netns::new(format!("{prefix}-client"))?;
        let n1 = Netns::new(format!("{prefix}-node1"))?;
        let n2 = Netns::new(format!("{prefix}-node2"))?;
        link(&client, "eth0", "198.18.100.2/24", &n1, "eth0", "198.18.100.1/24")?;
        link(&n1, "eth1", "198.18.200.1/24", &n2, "eth0", "198.18.200.2/24")?;
        client.ip(&["route", "add", "198.18.0.0/16", "via", "198.18.100.1"])?;
        n2.ip(&["route", "add", "198.18.100.0/24", "via", "198.18.200.1"])?;
        let nodes = [n1, n2];
        let mut made = Vec::new();
        let mut per_node = [0u8; 2];
        // Node-side interfaces after the node's own: eth2.. on node-1, eth1.. on node-2.
        let mut next_if = [2u8, 1u8];
        for &(name, n) in pods {
            anyhow::ensure!(n < 2, "pod {name} on node {n}: there are two nodes, 0 and 1");
            let net = 10 * (n as u8 + 1) + per_node[n];
            per_node[n] += 1;
            let ns = Netns::new(format!("{prefix}-{name}"))?;
            let node_if = format!("eth{}", next_if[n]);
            next_if[n] += 1;
            link(
                &nodes[n],
                &node_if,
                &format!("198.18.{net}.1/24"),
                &ns,
                "eth0",
                &format!("198.18.{net}.2/24"),
            )?;
            ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
            // The other node reaches this pod through this node's inter-node address.
            let via = if n == 0 { "198.18.200.1" } else { "198.18.200.2" };
            nodes[1 - n].ip(&["route", "add", &format!("198.18.{net}.0/24"), "via", via])?;
            made.push(Pod { name: name.to_string(), ip: Ipv4Addr::new(198, 18, net, 2), ns });
        }
        let outside = if outside {
            let ns = Netns::new(format!("{prefix}-db"))?;
            link(&nodes[0], "ext0", "198.18.50.1/24", &ns, "eth0", "198.18.50.2/24")?;
            ns.ip(&["route", "add", "default", "via", "198.18.50.1"])?;
            nodes[1].ip(&["route", "add", "198.18.50.0/24", "via", "198.18.200.1"])?;
            Some(Pod { name: "db".into(), ip: Ipv4Addr::new(198, 18, 50, 2), ns })
        } else {
            None
        };
        for n in &nodes {
            n.sysctl("net.ipv4.ip_forward", "1")?;
        }
        Ok(TwoNodes {
            prefix,
            client,
            nodes,
            pods: made,
            pod_nodes: pods.iter().map(|p| p.1).collect(),
            outside,
            client_ip: Ipv4Addr::new(198, 18, 100, 2),
            manifests: work.join("manifests"),
            work,
            pin_dirs,
            xlb,
            agents: Vec::new(),
            servers: Vec::new(),
            cgroups,
            agent_args: Vec::new(),
            kubeconfig: None,
            _pins: pins,
            _work: work_guard,
        })
    }

    /// Adds IPv6 beside every IPv4 address of the bed (before the agents start, which read the
    /// node addresses): the client 2001:db8:100::2 behind node-1's 2001:db8:100::1, the nodes'
    /// link 2001:db8:200::1 (node-1) and ::2 (node-2), each pod at 2001:db8:NET::2 behind its
    /// node's ::1 (NET as in its IPv4 subnet), the other node routing there through the nodes'
    /// link. Addresses are added with `nodad`: usable at once.
    pub fn add_ipv6(&self) -> anyhow::Result<()> {
        let addr = |ns: &Netns, a: &str, dev: &str| ns.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"]);
        let [n1, n2] = &self.nodes;
        addr(&self.client, "2001:db8:100::2/64", "eth0")?;
        addr(n1, "2001:db8:100::1/64", "eth0")?;
        addr(n1, "2001:db8:200::1/64", "eth1")?;
        addr(n2, "2001:db8:200::2/64", "eth0")?;
        self.client.ip(&["-6", "route", "add", "2001:db8::/32", "via", "2001:db8:100::1"])?;
        n2.ip(&["-6", "route", "add", "2001:db8:100::/64", "via", "2001:db8:200::1"])?;
        // The pods' links, in the order the constructor made them.
        let mut per_node = [0u8; 2];
        let mut next_if = [2u8, 1u8];
        for (pod, &n) in self.pods.iter().zip(&self.pod_nodes) {
            let net = 10 * (n as u8 + 1) + per_node[n];
            per_node[n] += 1;
            let node_if = format!("eth{}", next_if[n]);
            next_if[n] += 1;
            addr(&self.nodes[n], &format!("2001:db8:{net}::1/64"), &node_if)?;
            addr(&pod.ns, &format!("2001:db8:{net}::2/64"), "eth0")?;
            pod.ns.ip(&["-6", "route", "add", "default", "via", &format!("2001:db8:{net}::1")])?;
            let via = if n == 0 { "2001:db8:200::1" } else { "2001:db8:200::2" };
            self.nodes[1 - n].ip(&["-6", "route", "add", &format!("2001:db8:{net}::/64"), "via", via])?;
        }
        for n in &self.nodes {
            n.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(())
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// An echo server on the host outside the cluster.
    pub fn start_outside_server(&mut self, testbed: &Path, tcp: &[u16]) -> anyhow::Result<()> {
        let outside = self.outside.as_ref().ok_or_else(|| anyhow!("this bed has no outside host"))?;
        self.servers.push(start_server(testbed, outside, tcp, &[], &self.work)?);
        Ok(())
    }

    /// An echo server in one pod.
    pub fn start_server_in(
        &mut self,
        testbed: &Path,
        pod: &str,
        tcp: &[u16],
        udp: &[u16],
    ) -> anyhow::Result<()> {
        let p = start_server(testbed, self.pod(pod), tcp, udp, &self.work)?;
        self.servers.push(p);
        Ok(())
    }

    /// Echo servers in both pods on the given TCP and UDP ports.
    pub fn start_servers(&mut self, testbed: &Path, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
        for pod in &self.pods {
            self.servers.push(start_server(testbed, pod, tcp, udp, &self.work)?);
        }
        Ok(())
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        write_manifest_in(&self.manifests, file, yaml)
    }

    /// Starts an agent on each node and waits until both are ready.
    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..2 {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// Stops the agent of node `i` (0 or 1); its programs stay attached.
    pub fn stop_agent(&mut self, i: usize) {
        let name = format!("xlb agent on node-{}", i + 1);
        if let Some(at) = self.agents.iter().position(|a| a.name == name) {
            self.agents.remove(at).stop(Duration::from_secs(5));
        }
    }

    /// Starts the agent of node `i` (0 or 1) and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        {
            let ns = &self.nodes[i];
            // Every interface but loopback: the client's, the other node's, the pods'.
            let ifaces: Vec<String> = ns
                .ip(&["-o", "link", "show"])?
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
                .filter(|n| n != "lo")
                .collect();
            let name = format!("node-{}", i + 1);
            let cgroup = self.cgroups[i].as_ref().map(|c| c.path.as_path());
            let node = AgentNode {
                ns,
                pin_dir: &self.pin_dirs[i],
                name: &name,
                ifaces: &ifaces,
                cgroup,
                args: &self.agent_args,
                wrapper: &[],
                kubeconfig: self.kubeconfig.as_deref(),
            };
            let log = self.work.join(format!("agent-node{}.log", i + 1));
            let agent =
                spawn_agent(&self.xlb, &node, &self.manifests, &format!("xlb agent on {name}"), &log)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// Runs the xlb CLI against node `i`'s pins (0 or 1).
    pub fn xlb_cli(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        xlb_cli_at(&self.xlb, &self.pin_dirs[i], args)
    }

    /// Lets the client receive the answers xlb sends back by XDP_TX at once (see
    /// [`client_xdp_pass`]).
    pub fn client_takes_xdp_tx(&mut self) -> anyhow::Result<()> {
        let p = client_xdp_pass(&self.xlb, &self.client, &self.work)?;
        self.servers.push(p);
        Ok(())
    }

    pub fn logs(&self) -> String {
        logs_of(self.agents.iter().chain(&self.servers))
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test bed {} logs:\n{}", self.prefix, self.logs());
        }
        for mut p in self.agents.drain(..).chain(self.servers.drain(..)) {
            p.stop(Duration::from_secs(5));
        }
    }
}
