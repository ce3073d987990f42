//! Benchmark of the datapath's cost per packet (not a test: it prints measured figures).
//!
//! The XDP program is loaded (never attached) with its maps filled through the reconciler with N
//! ClusterIP Services of 5 endpoints each, plus one NodePort Service whose endpoint runs on
//! another node, and run by the kernel with BPF_PROG_TEST_RUN on crafted frames. A program that
//! rewrites a packet cannot be timed with repeat > 1 (the kernel would run it again on the
//! already rewritten buffer), so every call runs it once on a fresh copy of the frame, on one
//! CPU, and the kernel's own measurement of that run is taken; the floor, a program that only
//! returns XDP_PASS (`xlb_xdp_pass`, from the same object), is measured in the same rounds and
//! subtracted. Each figure is the median over rounds of the per-round median, with the rounds'
//! minimum and maximum.
//!
//! Paths: a packet to no service; a new TCP flow to a ClusterIP (a new client port each call);
//! an established flow; a new flow to a node port whose endpoint is on another node (SNAT: four
//! conntrack entries); a backend's reply translated back. The same five over IPv6: every Service
//! is dual-stack (an IPv6 clusterIP with 5 IPv6 endpoints), and the NodePort Service has an IPv6
//! node address with 64 IPv6 endpoints on other nodes.
//!
//! `--hook tc` times the tc datapath's program (`xlb_tc_ingress`, on an skb) instead, against the
//! floor of a TC program that only passes (`xlb_tc_pass`).
//!
//! Run with `cargo xtask bench-datapath [-- --services 1,1000,10000,100000 --calls C --rounds R
//! --hook xdp|tc --json FILE]` (root).
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb_common::{PROG_TC_PASS, PROG_XDP_PASS, SVC_F_CLUSTER_IP, SVC_F_LOCAL, SVC_F_NODE_PORT};
use lb_userspace::{
    cli::packet::{Frame, Frame6},
    datapath::BpfMaps,
    datapath::ebpf::{self, Capacities, Hook},
    model::{BackendState, DesiredBackend, DesiredPort, Frontend, PortRef, Proto, Shown, SvcType},
    reconcile::Reconciler,
};

struct Args {
    services: Vec<u32>,
    calls: u32,
    rounds: u32,
    /// Also write the figures here, as JSON (for `cargo xtask bench-report`).
    json: Option<std::path::PathBuf>,
    /// Run only this path (for profiling it), e.g. "new flow".
    only: Option<String>,
    /// The program timed: the XDP datapath's or the tc datapath's.
    hook: Hook,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        services: vec![1, 1_000, 10_000, 100_000],
        calls: 4_000,
        rounds: 5,
        json: None,
        only: None,
        hook: Hook::Xdp,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().context("missing value")?;
        match flag.as_str() {
            "--services" => a.services = val.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--calls" => a.calls = val.parse()?,
            "--rounds" => a.rounds = val.parse()?,
            "--json" => a.json = Some(val.into()),
            "--only" => a.only = Some(val),
            "--hook" => {
                a.hook = match val.as_str() {
                    "xdp" => Hook::Xdp,
                    "tc" => Hook::Tc,
                    other => bail!("--hook {other:?}: xdp or tc"),
                }
            }
            other => bail!(
                "unknown argument {other:?} (--services N,N,.. --calls C --rounds R --hook xdp|tc --json FILE)"
            ),
        }
    }
    if a.services.iter().any(|&n| n == 0 || n > 200_000) || a.calls == 0 || a.rounds == 0 {
        bail!("--services must be in 1..=200000, --calls and --rounds at least 1");
    }
    Ok(a)
}

const ENDPOINTS: u32 = 5;

/// Service i's ClusterIP: 198.18.0.0 + i + 1 (in 198.18.0.0/15).
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i + 1)
}

/// Endpoint b (of all): one of ten addresses in 198.19.255.0/24, and a port.
fn endpoint(b: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(198, 19, 255, 1 + (b / 50_000) as u8), 10_000 + (b % 50_000) as u16)
}

const NODE: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 1);

/// Service i's IPv6 clusterIP: 2001:db8:1::/64 + i + 1.
fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0)) + u128::from(i) + 1)
}

/// IPv6 endpoint b: as [`endpoint`], in 2001:db8:ff::/64.
fn endpoint6(b: u32) -> (Ipv6Addr, u16) {
    (Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1 + (b / 50_000) as u16), 10_000 + (b % 50_000) as u16)
}

const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 1);

fn port(
    name: String,
    svc_type: SvcType,
    port: u16,
    frontends: Vec<(Frontend, u16)>,
    backends: Vec<DesiredBackend>,
) -> Arc<DesiredPort> {
    let family = lb_userspace::model::Family::of(&frontends[0].0.addr);
    let (frontends, frontend_kinds) = frontends.into_iter().unzip();
    Arc::new(DesiredPort {
        id: PortRef {
            namespace: "bench".into(),
            name: name.into(),
            port_name: String::new(),
            proto: Proto::Tcp,
            family,
        },
        svc_type,
        port,
        node_port: (svc_type == SvcType::NodePort).then_some(30_080),
        frontends,
        frontend_kinds,
        backends,
        shown: Shown::default(),
        source_ranges: Vec::new(),
    })
}

/// N dual-stack ClusterIP Services (port 80, 5 endpoints per family) and one NodePort Service
/// (198.19.254.1:30080 and [2001:db8:fe::1]:30080) whose 64 endpoints per family are on other
/// nodes.
fn services(n: u32) -> Vec<Arc<DesiredPort>> {
    let be = |addr: std::net::IpAddr, port| DesiredBackend {
        addr,
        port,
        state: BackendState::Active,
        local: false,
        topo: true,
    };
    let mut out: Vec<Arc<DesiredPort>> = (0..n)
        .flat_map(|i| {
            let b4 =
                (0..ENDPOINTS).map(|j| endpoint(i * ENDPOINTS + j)).map(|(a, p)| be(a.into(), p)).collect();
            let b6 =
                (0..ENDPOINTS).map(|j| endpoint6(i * ENDPOINTS + j)).map(|(a, p)| be(a.into(), p)).collect();
            let f4 = Frontend { addr: vip(i).into(), port: 80, proto: Proto::Tcp };
            let f6 = Frontend { addr: vip6(i).into(), port: 80, proto: Proto::Tcp };
            [
                port(format!("svc-{i}"), SvcType::ClusterIP, 80, vec![(f4, SVC_F_CLUSTER_IP)], b4),
                port(format!("svc-{i}"), SvcType::ClusterIP, 80, vec![(f6, SVC_F_CLUSTER_IP)], b6),
            ]
        })
        .collect();
    let f6 = Frontend { addr: NODE6.into(), port: 30_080, proto: Proto::Tcp };
    let bes6 =
        (0..64u16).map(|i| be(Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 2 + i).into(), 8080)).collect();
    out.push(port("remote".into(), SvcType::NodePort, 80, vec![(f6, SVC_F_NODE_PORT | SVC_F_LOCAL)], bes6));
    let f = Frontend { addr: NODE.into(), port: 30_080, proto: Proto::Tcp };
    // 64 endpoints: each (endpoint, node address) pair has 4536 SNAT ports.
    let bes = (0..64u8)
        .map(|i| DesiredBackend {
            addr: Ipv4Addr::new(198, 19, 254, 2 + i).into(),
            port: 8080,
            state: BackendState::Active,
            local: false,
            topo: true,
        })
        .collect();
    out.push(port("remote".into(), SvcType::NodePort, 80, vec![(f, SVC_F_NODE_PORT | SVC_F_LOCAL)], bes));
    out
}

/// Runs `prog` once on `frame`: the kernel's time for that run, and the verdict.
fn once<P>(prog: &P, frame: &[u8], out: &mut [u8]) -> anyhow::Result<(Duration, u32)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let r =
        prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(out), ..TestRunOptions::new() })?;
    Ok((r.duration, r.return_value))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with bit 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

type FrameGen = Box<dyn FnMut(u32) -> Vec<u8>>;

/// Client k of the new flows: 198.19.0.0/16 addresses and ports, a different tuple each.
fn client(k: u32) -> std::net::SocketAddrV4 {
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + ((k >> 14) & 0xfff));
    std::net::SocketAddrV4::new(addr, 1024 + (k & 0x3fff) as u16)
}

/// IPv6 client k of the new flows: as [`client`], in 2001:db8:100::/64.
fn client6(k: u32) -> SocketAddrV6 {
    let addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1 + ((k >> 14) & 0xfff) as u16);
    SocketAddrV6::new(addr, 1024 + (k & 0x3fff) as u16, 0, 0)
}

/// The paths measured, in the order of the tables' columns.
const PATHS4: [&str; 5] = ["no service", "new flow", "established", "new flow, SNAT", "reply"];
const PATHS6: [&str; 5] =
    ["IPv6 no service", "IPv6 new flow", "IPv6 established", "IPv6 new flow, SNAT", "IPv6 reply"];

/// Under `perf record -D -1 --control fifo:CTL,ACK` (see `cargo xtask bench`), with the FIFOs'
/// directory in XLB_PERF_CTL: turns sampling on or off around the measured calls, and waits for
/// perf's acknowledgement.
fn perf_control(cmd: &str) {
    let Ok(dir) = std::env::var("XLB_PERF_CTL") else { return };
    let dir = std::path::PathBuf::from(dir);
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("ctl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{cmd}\n").as_bytes()));
    if sent.is_ok() {
        let mut ack = [0u8; 5];
        let _ = std::fs::File::open(dir.join("ack")).and_then(|mut f| std::io::Read::read(&mut f, &mut ack));
    }
}

/// The timed program and its floor (loaded), by hook, with the verdict of a pass.
enum Progs<'a> {
    Xdp(&'a Xdp, &'a Xdp),
    Tc(&'a SchedClassifier, &'a SchedClassifier),
}

impl Progs<'_> {
    fn run(&self, floor: bool, frame: &[u8], out: &mut [u8]) -> anyhow::Result<(Duration, u32)> {
        match (self, floor) {
            (Progs::Xdp(p, _), false) => once(*p, frame, out),
            (Progs::Xdp(_, f), true) => once(*f, frame, out),
            (Progs::Tc(p, _), false) => once(*p, frame, out),
            (Progs::Tc(_, f), true) => once(*f, frame, out),
        }
    }

    /// XDP_PASS, or TC_ACT_OK.
    fn pass_verdict(&self) -> u32 {
        match self {
            Progs::Xdp(..) => 2,
            Progs::Tc(..) => 0,
        }
    }
}

/// Loads the floor program of `hook`; the datapath's own was loaded with the object.
fn load_floor(obj: &mut aya::Ebpf, hook: Hook) -> anyhow::Result<()> {
    match hook {
        Hook::Xdp => {
            let p: &mut Xdp = obj.program_mut(PROG_XDP_PASS).context("no pass program")?.try_into()?;
            p.load()?;
        }
        Hook::Tc => {
            let p: &mut SchedClassifier =
                obj.program_mut(PROG_TC_PASS).context("no TC pass program")?.try_into()?;
            p.load()?;
        }
    }
    Ok(())
}

/// The loaded programs of `hook` in `obj`.
fn progs(obj: &aya::Ebpf, hook: Hook) -> anyhow::Result<Progs<'_>> {
    let get = |name: &str| obj.program(name).with_context(|| format!("no program {name}"));
    Ok(match hook {
        Hook::Xdp => Progs::Xdp(get(lb_common::PROG_XDP)?.try_into()?, get(PROG_XDP_PASS)?.try_into()?),
        Hook::Tc => Progs::Tc(get(lb_common::PROG_TC_INGRESS)?.try_into()?, get(PROG_TC_PASS)?.try_into()?),
    })
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    pin_to_cpu0();
    let (program, floor_name) = match a.hook {
        Hook::Xdp => ("XDP program (xlb_xdp)", PROG_XDP_PASS),
        Hook::Tc => ("tc datapath's program (xlb_tc_ingress, on an skb)", PROG_TC_PASS),
    };
    println!("xlb datapath cost per packet, {program}, BPF_PROG_TEST_RUN, one run per call on a fresh");
    println!(
        "frame, CPU 0, net of the floor ({floor_name} in the same rounds): median of {} rounds of {} calls [min-max]",
        a.rounds, a.calls
    );
    let mut rows = Vec::new();
    let mut tables: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for &n in &a.services {
        let caps = Capacities {
            service_entries: (n * (ENDPOINTS + 1) + 64).next_power_of_two(),
            backends: (n * ENDPOINTS + 64).next_power_of_two(),
            ct_entries: 262_144,
            ipv6_entries: (n * (ENDPOINTS + 1) + 64).next_power_of_two().max(262_144),
            ..Capacities::default()
        };
        let mut obj = ebpf::load_hooks(None, caps, &[a.hook]).context("loading the datapath")?;
        let maps = BpfMaps::take(&mut obj)?;
        let mut rec = Reconciler::new(maps)?;
        let started = std::time::Instant::now();
        rec.apply(&services(n))?;
        let programmed = started.elapsed();
        load_floor(&mut obj, a.hook)?;
        let progs = progs(&obj, a.hook)?;

        // The last service: the same lookup cost as any (hash maps), the farthest in the table.
        let target = vip(n - 1);
        let to = std::net::SocketAddrV4::new(target, 80);
        let mut out = vec![0u8; 256];
        // An established flow and its reply: set up once.
        let flow = client(u32::MAX >> 2);
        let syn = Frame::tcp(flow, to).build();
        let (_, _) = progs.run(false, &syn, &mut out)?;
        let backend = lb_userspace::cli::packet::decode(&out).context("decoding the DNATed SYN")?.dst;
        let ack = Frame { tcp_flags: 0x10, ..Frame::tcp(flow, to) }.build();
        let reply = Frame { tcp_flags: 0x12, ..Frame::tcp(backend, flow) }.build();
        let node_port = std::net::SocketAddrV4::new(NODE, 30_080);
        // The same over IPv6.
        let to6 = SocketAddrV6::new(vip6(n - 1), 80, 0, 0);
        let flow6 = client6(u32::MAX >> 2);
        let (_, _) = progs.run(false, &Frame6::tcp(flow6, to6).build(), &mut out)?;
        let backend6 = lb_userspace::cli::packet::decode6(&out).context("decoding the DNATed IPv6 SYN")?.dst;
        let ack6 = Frame6 { tcp_flags: 0x10, ..Frame6::tcp(flow6, to6) }.build();
        let reply6 = Frame6 { tcp_flags: 0x12, ..Frame6::tcp(backend6, flow6) }.build();
        let node_port6 = SocketAddrV6::new(NODE6, 30_080, 0, 0);
        let nowhere6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0xfd, 0, 0, 0, 0, 1), 9, 0, 0);

        let mut paths: Vec<(&str, FrameGen)> = vec![
            (
                "no service",
                Box::new(move |_| {
                    Frame::udp(client(1), std::net::SocketAddrV4::new(Ipv4Addr::new(198, 19, 253, 1), 9))
                        .build()
                }),
            ),
            ("new flow", Box::new(move |k| Frame::tcp(client(k), to).build())),
            ("established", Box::new(move |_| ack.clone())),
            ("new flow, SNAT", Box::new(move |k| Frame::tcp(client(k), node_port).build())),
            ("reply", Box::new(move |_| reply.clone())),
            ("IPv6 no service", Box::new(move |_| Frame6::udp(client6(1), nowhere6).build())),
            ("IPv6 new flow", Box::new(move |k| Frame6::tcp(client6(k), to6).build())),
            ("IPv6 established", Box::new(move |_| ack6.clone())),
            ("IPv6 new flow, SNAT", Box::new(move |k| Frame6::tcp(client6(k), node_port6).build())),
            ("IPv6 reply", Box::new(move |_| reply6.clone())),
        ];
        if let Some(only) = &a.only {
            paths.retain(|(name, _)| name == only);
            if paths.is_empty() {
                bail!(
                    "--only {only:?}: no such path ({})",
                    PATHS4.iter().chain(&PATHS6).copied().collect::<Vec<_>>().join(", ")
                );
            }
        }
        let mut net: Vec<Vec<i64>> = vec![Vec::new(); paths.len()];
        let mut floors = Vec::new();
        let mut k = 0u32;
        perf_control("enable");
        for round in 0..a.rounds {
            // The floor, on the same frame sizes.
            let frame = Frame::tcp(client(0), to).build();
            let mut f: Vec<u64> = (0..a.calls)
                .map(|_| progs.run(true, &frame, &mut out).map(|(d, _)| d.as_nanos() as u64))
                .collect::<anyhow::Result<_>>()?;
            let floor = median(&mut f);
            floors.push(floor);
            for (i, (name, make)) in paths.iter_mut().enumerate() {
                let mut t = Vec::with_capacity(a.calls as usize);
                for _ in 0..a.calls {
                    k = k.wrapping_add(1);
                    let frame = make(k);
                    let (d, verdict) = progs.run(false, &frame, &mut out)?;
                    if verdict != progs.pass_verdict() {
                        bail!("{name}: verdict {verdict}, not a pass (round {round})");
                    }
                    t.push(d.as_nanos() as u64);
                }
                net[i].push(median(&mut t) as i64 - floor as i64);
            }
        }
        perf_control("disable");
        let cell = |v: &mut Vec<i64>| {
            v.sort_unstable();
            format!("{} [{}-{}]", v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let stat = |v: &Vec<i64>| {
            let mut v = v.clone();
            v.sort_unstable();
            serde_json::json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1]})
        };
        let mut paths_json = serde_json::Map::new();
        for (i, (name, _)) in paths.iter().enumerate() {
            paths_json.insert((*name).to_owned(), stat(&net[i]));
        }
        let floor_stat = stat(&floors.iter().map(|&f| f as i64).collect());
        rows.push(serde_json::json!({
            "services": n, "endpoints": ENDPOINTS, "hook": a.hook.to_string(), "paths_ns": paths_json, "floor_ns": floor_stat,
            "programmed_s": programmed.as_secs_f64(),
        }));
        let mut floor_sorted = floors.clone();
        floor_sorted.sort_unstable();
        let floor = floor_sorted[floor_sorted.len() / 2];
        for (t, names) in [PATHS4, PATHS6].iter().enumerate() {
            let cells: Vec<String> = names
                .iter()
                .map(|want| match paths.iter().position(|(name, _)| name == want) {
                    Some(i) => cell(&mut net[i]),
                    None => "-".into(),
                })
                .collect();
            tables[t].push(format!("| {n} | {} | {floor} |", cells.join(" | ")));
        }
        eprintln!(
            "   ({n} dual-stack services x {ENDPOINTS} endpoints per family programmed in {programmed:.2?})"
        );
    }
    for (names, rows) in [PATHS4, PATHS6].iter().zip(&tables) {
        println!();
        println!(
            "| services | {} | floor (ns) |",
            names.iter().map(|p| format!("{p} (ns)")).collect::<Vec<_>>().join(" | ")
        );
        println!("|{}", "---|".repeat(names.len() + 2));
        for r in rows {
            println!("{r}");
        }
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({"calls": a.calls, "rounds": a.rounds, "rows": rows});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
