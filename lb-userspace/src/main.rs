//! The `xlb` binary: the agent and the CLI.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceConfig},
    cli,
    datapath::BpfMaps,
    ebpf::Capacities,
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
    Agent(AgentArgs),
    /// Detach the datapath and remove its pinned links and maps (uninstall from this node).
    Cleanup,
    /// List the services as the datapath holds them.
    #[command(alias = "svc")]
    Services(OutputArgs),
    /// Datapath counters by verdict and reason, summed over CPUs.
    Stats(OutputArgs),
    /// `xlb get services`: the same as `xlb services`.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    #[command(alias = "svc", alias = "service")]
    Services(OutputArgs),
}

#[derive(clap::Args)]
struct OutputArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
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

#[derive(clap::Args)]
struct AgentArgs {
    /// Read Services, EndpointSlices and Endpoints from this directory of manifests (YAML or
    /// JSON, re-read on change) instead of the API server.
    #[arg(long, env = "XLB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Default: in-cluster service account, or KUBECONFIG, or
    /// ~/.kube/config.
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Interface to attach to (repeat for each interface carrying Service traffic or replies).
    #[arg(long = "iface", required = true)]
    interfaces: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
    /// The cluster's node port range (kube-apiserver's --service-node-port-range); node ports
    /// outside it are rejected.
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    node_port_range: std::ops::RangeInclusive<u16>,
    /// Address of /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_http_addr)]
    http_addr: HttpAddr,
    /// /healthz fails once a change has waited this many seconds for a successful sync.
    #[arg(long, default_value_t = 60)]
    healthz_max_pending_s: u64,
    /// After a change, wait this long (ms) for more before syncing, so a burst is one sync.
    #[arg(long, default_value_t = 10)]
    batch_delay_ms: u64,
    /// Capacity of the service map (frontends plus backend slots).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICE_ENTRIES)]
    max_service_entries: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the connection-tracking map (two entries per flow).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_CT_ENTRIES)]
    max_ct_entries: u32,
    /// How often to check the manifest directory for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
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

fn main() -> ExitCode {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => {
            let source = match a.manifests {
                Some(dir) => SourceConfig::Manifests { dir, poll: Duration::from_millis(a.poll_ms.max(10)) },
                None => SourceConfig::Kube { kubeconfig: a.kubeconfig },
            };
            let cfg = AgentConfig {
                source,
                interfaces: a.interfaces,
                pin_dir: cli.pin_dir,
                xdp_mode: match a.xdp_mode {
                    Mode::Auto => XdpMode::Default,
                    Mode::Native => XdpMode::Driver,
                    Mode::Generic => XdpMode::Skb,
                },
                capacities: Capacities {
                    service_entries: a.max_service_entries,
                    backends: a.max_backends,
                    ct_entries: a.max_ct_entries,
                },
                batch_delay: Duration::from_millis(a.batch_delay_ms),
                node_port_range: a.node_port_range,
                http_addr: a.http_addr.0,
                max_pending: Duration::from_secs(a.healthz_max_pending_s),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Cleanup => {
            let removed = lb_userspace::ebpf::unpin_all(&cli.pin_dir)
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
            let stats = maps.read_stats()?;
            match o.output {
                Output::Table => {
                    println!("{:<20} {:>14} {:>16}", "COUNTER", "PACKETS", "BYTES");
                    for (name, p, b) in stats {
                        println!("{name:<20} {p:>14} {b:>16}");
                    }
                }
                Output::Json => {
                    let v: serde_json::Map<String, serde_json::Value> = stats
                        .into_iter()
                        .map(|(n, p, b)| (n.to_string(), serde_json::json!({"packets": p, "bytes": b})))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
            Ok(())
        }
        Command::Services(o) | Command::Get { what: GetWhat::Services(o) } => {
            let maps = BpfMaps::open(&cli.pin_dir)?;
            let rows = cli::service_rows(&maps)?;
            match o.output {
                Output::Table => print!("{}", cli::services_table(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows).context("json")?),
            }
            Ok(())
        }
    }
}
