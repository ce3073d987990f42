//! The `xlb` binary: the agent and the CLI.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceConfig},
    cli::trace,
    cli::{self, Output, View},
    datapath::ebpf::Capacities,
    datapath::{BpfMaps, Datapath as _},
};

#[derive(Parser)]
#[command(name = "xlb", version, about = "Kubernetes Service load balancing in eBPF (XDP)")]
struct Cli {
    /// bpffs directory holding the pinned maps.
    #[arg(long, global = true, env = "XLB_PIN_DIR", default_value = lb_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the datapath and keep it equal to the API server's Services and
    /// EndpointSlices (or to a manifest directory).
    Agent(Box<AgentArgs>),
    /// Detach the datapath and remove its pinned links and maps (uninstall from this node).
    Cleanup,
    /// List the services as the datapath holds them, one row per frontend (like `kubectl get
    /// services`).
    #[command(alias = "svc")]
    Services(OutputArgs),
    /// `xlb get services|backends|conntrack`: the same as the commands of those names.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// One Service in detail, in the shape of `kubectl describe service`, with datapath ids,
    /// backend states and flow counts.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Every backend, its state, new and active flows, and the service ports using it.
    Backends(OutputArgs),
    /// Tracked flows (connection tracking), filterable by service, client, frontend and backend.
    #[command(alias = "ct")]
    Conntrack(ConntrackArgs),
    /// Datapath counters by verdict and reason, summed over CPUs.
    Stats(OutputArgs),
    /// Explain what the datapath does with a packet: runs the datapath's decision in the kernel
    /// (BPF_PROG_TEST_RUN) on a crafted packet against the live maps. Changes nothing live: no
    /// conntrack entry, counter or flow count.
    Trace(TraceArgs),
    /// Attach a program that passes every packet to an interface, until interrupted. On the far
    /// end of a veth whose near end runs xlb in native XDP mode, it makes the kernel deliver the
    /// answers xlb sends back (resets, ICMP errors) at once. Used by the test beds.
    XdpPass {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    #[command(alias = "svc", alias = "service")]
    Services(OutputArgs),
    #[command(alias = "backend")]
    Backends(OutputArgs),
    #[command(alias = "ct")]
    Conntrack(ConntrackArgs),
}

#[derive(Subcommand)]
enum DescribeWhat {
    #[command(alias = "svc", alias = "services")]
    Service {
        /// NAMESPACE/NAME, or NAME in namespace default.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(clap::Args)]
struct OutputArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
struct ConntrackArgs {
    /// Only flows of this Service (NAMESPACE/NAME, or NAME in namespace default).
    #[arg(long)]
    service: Option<String>,
    /// Only flows from this client (ADDRESS or ADDRESS:PORT).
    #[arg(long)]
    client: Option<cli::AddrFilter>,
    /// Only flows to this frontend (ADDRESS or ADDRESS:PORT).
    #[arg(long)]
    frontend: Option<cli::AddrFilter>,
    /// Only flows to this backend (ADDRESS or ADDRESS:PORT).
    #[arg(long)]
    backend: Option<cli::AddrFilter>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceProto {
    Tcp,
    Udp,
    Sctp,
}

#[derive(clap::Args)]
struct TraceArgs {
    #[arg(long, value_enum, default_value_t = TraceProto::Tcp)]
    proto: TraceProto,
    /// Source of the packet: ADDRESS:PORT, or [ADDRESS]:PORT for IPv6.
    #[arg(long)]
    from: std::net::SocketAddr,
    /// Destination of the packet: ADDRESS:PORT, or [ADDRESS]:PORT for IPv6 (of the family of
    /// --from).
    #[arg(long)]
    to: std::net::SocketAddr,
    /// TCP flags of the packet, comma-separated (syn, ack, fin, rst, psh, urg).
    #[arg(long, default_value = "syn", value_parser = parse_tcp_flags)]
    tcp_flags: u8,
    /// Interface the packet arrives on (in this network namespace).
    #[arg(long)]
    iface: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_tcp_flags(s: &str) -> Result<u8, String> {
    let mut f = 0u8;
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        f |= match name.to_ascii_lowercase().as_str() {
            "fin" => 0x01,
            "syn" => 0x02,
            "rst" => 0x04,
            "psh" => 0x08,
            "ack" => 0x10,
            "urg" => 0x20,
            other => return Err(format!("unknown TCP flag {other:?} (want syn, ack, fin, rst, psh, urg)")),
        };
    }
    Ok(f)
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native where the driver supports it, else generic.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

#[derive(Clone, Copy, ValueEnum)]
enum LbAlgorithm {
    Random,
    Maglev,
}

fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if lb_common::MAGLEV_SIZES.contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not one of the prime table sizes {:?}", lb_common::MAGLEV_SIZES))
    }
}

impl From<Mode> for XdpMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => XdpMode::Default,
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
        }
    }
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Read Services, EndpointSlices and Endpoints from this directory of manifests (YAML or
    /// JSON, re-read on change) instead of the API server.
    #[arg(long, env = "XLB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Default: in-cluster service account, or KUBECONFIG, or
    /// ~/.kube/config.
    #[arg(long, env = "XLB_KUBECONFIG", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Interface to attach to (repeat for each interface carrying Service traffic or replies;
    /// comma-separated lists are taken too). `auto`: every interface with a default route
    /// (IPv4 or IPv6), read once at start.
    #[arg(long = "iface", env = "XLB_IFACE", required = true, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Where the node's sysctls are (the SNAT source ports are reserved in
    /// net/ipv4/ip_local_reserved_ports below it). In a container, whose own /proc/sys is
    /// read-only, a hostPath mount of the host's /proc/sys/net.
    #[arg(long, env = "XLB_PROC_SYS", default_value = "/proc/sys")]
    proc_sys: PathBuf,
    /// Check the flags, resolve `auto` values, print the settings the agent would run with, and
    /// exit without loading anything.
    #[arg(long)]
    dry_run: bool,
    /// Where the balancing core runs on each interface: `xdp` (native or generic, by
    /// --xdp-mode), `tc` (TC ingress on the skb, after GRO; needs Linux 6.6), or `auto`: XDP on
    /// physical NICs whose driver gains from native XDP, tc on every other device (veth, bridge,
    /// tunnels, virtual NICs). The agent logs its choice per interface.
    #[arg(long, env = "XLB_DATAPATH", value_enum, default_value_t = lb_userspace::datapath::ebpf::HookChoice::Auto)]
    datapath: lb_userspace::datapath::ebpf::HookChoice,
    #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
    /// The cluster's node port range (kube-apiserver's --service-node-port-range); node ports
    /// outside it are rejected.
    #[arg(long, env = "XLB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_range)]
    node_port_range: std::ops::RangeInclusive<u16>,
    /// Answer node ports only on the node's addresses within these prefixes (comma-separated
    /// CIDRs, as kube-proxy's --nodeport-addresses). Default: every address but loopback.
    #[arg(long, env = "XLB_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<lb_userspace::model::Cidr>,
    /// The cluster's Service IP ranges (kube-apiserver's --service-cluster-ip-range;
    /// comma-separated CIDRs, up to 4 per family). A new connection to an address of these
    /// ranges that no Service holds (a deleted Service, a port the Service does not have) is
    /// answered at once with a TCP reset or an ICMP port unreachable, rate-limited and counted,
    /// instead of being routed out of the node. Default: none (such traffic is routed as any).
    #[arg(long, env = "XLB_SERVICE_CIDR", value_delimiter = ',', value_parser = parse_service_cidr)]
    service_cidr: Vec<lb_userspace::model::Cidr>,
    /// Serve only the Services labelled service.kubernetes.io/service-proxy-name=NAME (and
    /// leave every other Service to other proxies). Default: the Services without that label,
    /// as kube-proxy (those with it belong to the proxy it names).
    #[arg(long, env = "XLB_SERVICE_PROXY_NAME", value_parser = parse_proxy_name)]
    service_proxy_name: Option<String>,
    /// This node's zone, for EndpointSlice topology hints (hints.forZones). Default: from the
    /// API server, the label topology.kubernetes.io/zone of this node's Node object; from
    /// manifests, none (zone hints are then not used).
    #[arg(long, env = "XLB_NODE_ZONE")]
    node_zone: Option<String>,
    /// This node's name as EndpointSlices give it in nodeName (for externalTrafficPolicy and
    /// internalTrafficPolicy Local). Default: NODE_NAME (set it from the downward API), else
    /// the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, env = "XLB_HTTP_ADDR", default_value = "127.0.0.1:10249", value_parser = parse_http_addr)]
    http_addr: HttpAddr,
    /// Address of the node health server that load balancers probe, as kube-proxy's
    /// --healthz-bind-address: /healthz and /livez answer 200 once the first sync succeeded
    /// and while no change waits longer than --healthz-max-pending-s, else 503 (also while the
    /// agent stops), with kube-proxy's JSON body ("off" to disable).
    #[arg(long, env = "XLB_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256", value_parser = parse_http_addr)]
    healthz_bind_address: HttpAddr,
    /// /healthz fails once a change has waited this many seconds for a successful sync.
    #[arg(long, env = "XLB_HEALTHZ_MAX_PENDING_S", default_value_t = 60)]
    healthz_max_pending_s: u64,
    /// After a change, wait this long (ms) for more before syncing. 0: a change is synced at
    /// once, and the changes that arrive while a sync runs are synced together by the next.
    #[arg(long, env = "XLB_BATCH_DELAY_MS", default_value_t = 0)]
    batch_delay_ms: u64,
    /// Capacity of the service map (frontends plus backend slots).
    #[arg(long, env = "XLB_MAX_SERVICE_ENTRIES", default_value_t = lb_common::DEFAULT_MAX_SERVICE_ENTRIES)]
    max_service_entries: u32,
    /// Capacity of the backend map.
    #[arg(long, env = "XLB_MAX_BACKENDS", default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the connection-tracking map (two entries per flow).
    #[arg(long, env = "XLB_MAX_CT_ENTRIES", default_value_t = lb_common::DEFAULT_MAX_CT_ENTRIES)]
    max_ct_entries: u32,
    /// How often to read the node's addresses again (node ports follow them), in milliseconds.
    #[arg(long, env = "XLB_ADDRESS_POLL_MS", default_value_t = 2000)]
    address_poll_ms: u64,
    /// How often to check the manifest directory for changes, in milliseconds.
    #[arg(long, env = "XLB_POLL_MS", default_value_t = 200)]
    poll_ms: u64,
    /// Socket-level balancing (cgroup programs) for the processes of this cgroup v2 and below,
    /// so that the node's own processes and its pods reach ClusterIPs: "auto" is the root of
    /// the cgroup v2 hierarchy (every process of the node), "off" disables it, anything else is
    /// the path of a cgroup directory.
    #[arg(long, env = "XLB_CGROUP", default_value = "auto")]
    cgroup: String,
    /// Seconds a TCP flow whose handshake the client has not acknowledged yet stays tracked
    /// while idle.
    #[arg(long, env = "XLB_CT_TCP_SYN_TIMEOUT", default_value_t = lb_common::CT_TCP_SYN_S, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_syn_timeout: u32,
    /// Seconds an established TCP flow stays tracked while idle.
    #[arg(long, env = "XLB_CT_TCP_ESTABLISHED_TIMEOUT", default_value_t = lb_common::CT_TCP_ESTABLISHED_S, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_established_timeout: u32,
    /// Seconds a TCP flow stays tracked while idle once a FIN or RST was seen.
    #[arg(long, env = "XLB_CT_TCP_CLOSE_TIMEOUT", default_value_t = lb_common::CT_TCP_CLOSE_S, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_close_timeout: u32,
    /// Seconds a UDP flow stays tracked while idle.
    #[arg(long, env = "XLB_CT_UDP_TIMEOUT", default_value_t = lb_common::CT_UDP_S, value_parser = clap::value_parser!(u32).range(1..))]
    ct_udp_timeout: u32,
    /// How new flows choose a backend: at random, or by Maglev consistent hashing (every node
    /// picks the same backend for the same client address and port, and a backend change moves
    /// few flows; costs --maglev-table-size x 2 bytes of kernel memory per service port).
    #[arg(long, env = "XLB_LB_ALGORITHM", value_enum, default_value_t = LbAlgorithm::Random)]
    lb_algorithm: LbAlgorithm,
    /// Entries of each Maglev table: a prime, at least about 100 x the most backends a service
    /// has (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071).
    #[arg(long, env = "XLB_MAGLEV_TABLE_SIZE", default_value_t = lb_common::MAGLEV_DEFAULT_SIZE, value_parser = parse_maglev_size)]
    maglev_table_size: u32,
    /// Capacity of the session affinity map (one entry per client and service port with
    /// sessionAffinity ClientIP; least recently used first out).
    #[arg(long, env = "XLB_MAX_AFFINITY_ENTRIES", default_value_t = lb_common::DEFAULT_MAX_AFFINITY)]
    max_affinity_entries: u32,
    /// Capacity of each IPv6 map (frontends and backend slots; backends; conntrack, two
    /// entries per flow).
    #[arg(long, env = "XLB_MAX_IPV6_ENTRIES", default_value_t = lb_common::DEFAULT_MAX_IPV6_ENTRIES)]
    max_ipv6_entries: u32,
    /// Capacity of the socket-level translation map (two entries per unconnected UDP socket
    /// and frontend, one per connected socket).
    #[arg(long, env = "XLB_MAX_SOCK_NAT_ENTRIES", default_value_t = lb_common::DEFAULT_MAX_SOCK_NAT)]
    max_sock_nat_entries: u32,
}

#[derive(Clone)]
struct HttpAddr(Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse().map(|a| HttpAddr(Some(a))).map_err(|e| format!("{s:?}: {e} (want ADDRESS:PORT or off)"))
}

fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    lb_userspace::model::parse_port_range(s)
}

/// Warns of XLB_* variables in the environment that no agent flag reads: a misspelt setting
/// in the ConfigMap would otherwise be ignored without a word.
fn parse_service_cidr(s: &str) -> Result<lb_userspace::model::Cidr, String> {
    let c: lb_userspace::model::Cidr = s.trim().parse()?;
    if c.len == 0 {
        return Err(format!("{s}: a /0 is no Service range"));
    }
    Ok(c)
}

fn warn_unknown_settings() {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let known: Vec<String> = cli
        .get_arguments()
        .chain(cli.find_subcommand("agent").into_iter().flat_map(|a| a.get_arguments()))
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        // XLB_LOG is the log filter; the others belong to the test beds and benchmarks.
        const NOT_FLAGS: [&str; 6] = [
            "XLB_LOG",
            "XLB_BIN",
            "XLB_TESTBED_BIN",
            "XLB_REQUIRE_PRIVILEGED",
            "XLB_PERF_CTL",
            "XLB_PERF_AGENT",
        ];
        let ours = k.starts_with("XLB_") && !NOT_FLAGS.contains(&&*k) && !k.starts_with("XLB_KPB_");
        if ours && !known.iter().any(|n| *n == *k) {
            tracing::warn!(variable = %k, "unknown setting in the environment (misspelt?); it is ignored");
        }
    }
}

/// The host name (what kubelet registers as the node name by default).
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    (r == 0).then(|| lb_userspace::reconcile::unfixed(&buf)).filter(|h| !h.is_empty())
}

fn main() -> ExitCode {
    // An empty setting means its default (a ConfigMap key left empty), where clap would take
    // the empty string as the value.
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(k, v)| k.to_string_lossy().starts_with("XLB_") && v.is_empty())
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::remove_var(k) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XLB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: container logs and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_proxy_name(s: &str) -> Result<String, String> {
    lb_userspace::source::ProxyName::new(Some(s.to_string())).map(|_| s.to_string())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => {
            let node_name = a.node_name.or_else(hostname);
            let source = match a.manifests {
                Some(dir) => SourceConfig::Manifests { dir, poll: Duration::from_millis(a.poll_ms.max(10)) },
                None => SourceConfig::Kube {
                    kubeconfig: a.kubeconfig,
                    node_name: node_name.clone(),
                    watch_node: a.node_zone.is_none(),
                },
            };
            let cfg = AgentConfig {
                source,
                interfaces: lb_userspace::agent::node::resolve_interfaces(&a.interfaces)?,
                pin_dir: cli.pin_dir,
                xdp_mode: a.xdp_mode.into(),
                datapath_hook: a.datapath,
                capacities: Capacities {
                    service_entries: a.max_service_entries,
                    backends: a.max_backends,
                    ct_entries: a.max_ct_entries,
                    sock_nat_entries: a.max_sock_nat_entries,
                    affinity_entries: a.max_affinity_entries,
                    ipv6_entries: a.max_ipv6_entries,
                },
                batch_delay: Duration::from_millis(a.batch_delay_ms),
                node_port_range: a.node_port_range,
                nodeport_addresses: a.nodeport_addresses,
                service_cidrs: a.service_cidr,
                node_name,
                address_poll: Duration::from_millis(a.address_poll_ms.max(100)),
                http_addr: a.http_addr.0,
                healthz_addr: a.healthz_bind_address.0,
                max_pending: Duration::from_secs(a.healthz_max_pending_s),
                datapath: lb_common::DatapathConfig {
                    tcp_syn_s: a.ct_tcp_syn_timeout,
                    tcp_established_s: a.ct_tcp_established_timeout,
                    tcp_close_s: a.ct_tcp_close_timeout,
                    udp_s: a.ct_udp_timeout,
                    maglev_size: match a.lb_algorithm {
                        LbAlgorithm::Random => 0,
                        LbAlgorithm::Maglev => a.maglev_table_size,
                    },
                    _pad: 0,
                },
                socket_lb_cgroup: lb_userspace::datapath::ebpf::socket_lb_cgroup(&a.cgroup)?,
                proc_sys: a.proc_sys,
                node_zone: a.node_zone.clone(),
                proxy_name: lb_userspace::source::ProxyName::new(a.service_proxy_name)
                    .map_err(|e| anyhow::anyhow!("--service-proxy-name: {e}"))?,
            };
            warn_unknown_settings();
            if a.dry_run {
                print!("{}", cfg.describe());
                return Ok(());
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::XdpPass { iface, xdp_mode } => {
            let _attached = lb_userspace::datapath::ebpf::attach_xdp_pass(&iface, xdp_mode.into())
                .with_context(|| format!("attaching {} to {iface}", lb_common::PROG_XDP_PASS))?;
            println!("attached {} to {iface}; interrupt to detach", lb_common::PROG_XDP_PASS);
            use std::io::Write as _;
            std::io::stdout().flush()?;
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                anyhow::Ok(())
            })
        }
        Command::Cleanup => {
            let removed = lb_userspace::datapath::ebpf::unpin_all(&cli.pin_dir)
                .with_context(|| format!("removing the pins under {}", cli.pin_dir.display()))?;
            if removed.is_empty() {
                println!("nothing pinned under {}", cli.pin_dir.display());
            }
            for p in removed {
                println!("removed {}", p.display());
            }
            Ok(())
        }
        Command::Stats(o) => {
            let maps = BpfMaps::open(&cli.pin_dir)?;
            let stats = cli::with_ct_rows(maps.read_stats()?, &cli::read_flows(&maps)?);
            emit(o.output, &cli::stat_rows(&stats), || {
                let hooks = lb_userspace::datapath::ebpf::attached_hooks(&cli.pin_dir);
                let line = if hooks.is_empty() {
                    "datapath: attached to no interface".to_string()
                } else {
                    let each: Vec<String> = hooks.iter().map(|(i, h)| format!("{i} {h}")).collect();
                    format!("datapath: {}", each.join(", "))
                };
                format!("{line}\n{}", cli::stats_table(&stats))
            })
        }
        Command::Services(o) | Command::Get { what: GetWhat::Services(o) } => {
            let rows = View::read(&BpfMaps::open(&cli.pin_dir)?)?.service_rows();
            emit(o.output, &rows, || cli::services_table(&rows))
        }
        Command::Backends(o) | Command::Get { what: GetWhat::Backends(o) } => {
            let maps = BpfMaps::open(&cli.pin_dir)?;
            let view = View::read(&maps)?;
            let rows = view.backend_rows(&view.active_flows(&cli::read_flows(&maps)?));
            emit(o.output, &rows, || cli::backends_table(&rows))
        }
        Command::Conntrack(a) | Command::Get { what: GetWhat::Conntrack(a) } => {
            let maps = BpfMaps::open(&cli.pin_dir)?;
            let filter = cli::FlowFilter {
                service: a.service.as_deref().map(cli::parse_service),
                client: a.client,
                frontend: a.frontend,
                backend: a.backend,
            };
            let rows = View::read(&maps)?.flow_rows(&cli::read_flows(&maps)?, cli::monotonic_secs(), &filter);
            emit(a.output.output, &rows, || cli::flows_table(&rows))
        }
        Command::Describe { what: DescribeWhat::Service { name, output } } => {
            let maps = BpfMaps::open(&cli.pin_dir)?;
            let (ns, n) = cli::parse_service(&name);
            let view = View::read(&maps)?;
            let d = view.describe(&ns, &n, &view.active_flows(&cli::read_flows(&maps)?)).ok_or_else(|| {
                anyhow::anyhow!(
                    "service {ns}/{n} is not in the datapath (not known to the agent, rejected, or headless; `xlb get services` lists what is)"
                )
            })?;
            emit(output.output, &d, || cli::describe_text(&d))
        }
        Command::Trace(a) => {
            let req = trace::TraceRequest {
                proto: match a.proto {
                    TraceProto::Tcp => lb_userspace::model::Proto::Tcp,
                    TraceProto::Udp => lb_userspace::model::Proto::Udp,
                    TraceProto::Sctp => lb_userspace::model::Proto::Sctp,
                },
                from: a.from,
                to: a.to,
                tcp_flags: a.tcp_flags,
                iface: a.iface,
            };
            let t = trace::Tracer::open(&cli.pin_dir)?.run(&req)?;
            emit(a.output.output, &t, || trace::trace_text(&t))
        }
    }
}

/// Prints `value` as JSON/YAML, or the table `text` renders.
fn emit<T: serde::Serialize>(out: Output, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    use std::io::Write as _;
    let s = match cli::structured(out, value)? {
        Some(s) => s,
        None => text(),
    };
    // A closed pipe (`xlb conntrack | head`) is not an error worth a message.
    match std::io::stdout().write_all(s.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
