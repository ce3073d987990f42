//! The `xlb` binary: the agent and the CLI.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig},
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
    /// Run the agent: load the datapath and keep it equal to the manifests.
    Agent(AgentArgs),
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
    /// Directory of Service and EndpointSlice manifests (YAML or JSON), re-read on change.
    #[arg(long, env = "XLB_MANIFESTS")]
    manifests: PathBuf,
    /// Interface to attach to (repeat for each interface carrying Service traffic or replies).
    #[arg(long = "iface", required = true)]
    interfaces: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XLB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            let cfg = AgentConfig {
                manifests: a.manifests,
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
                poll: Duration::from_millis(a.poll_ms.max(10)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
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
