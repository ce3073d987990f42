//! `xlb-testbed serve`: the echo server run in pods. `xlb-testbed request`: requests made by a
//! process of their own (a node process or a pod's, for socket-level balancing). `xlb-testbed
//! demo`: the README's demo. `xlb-testbed kpb-plugin`: xlb in the kube-proxy baseline harness
//! (see [`xlb_tests::kpb`]).
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use xlb_tests::{
    Answer, TwoNodes, install_interrupt_flag, requests_from, serve, tcp_request, tcp_request_to,
    udp_request_to, workspace_bin,
};

/// How long `request` waits for a connection or an answer.
const TIMEOUT: Duration = Duration::from_secs(3);

const DEMO_MANIFEST: &str = include_str!("../../manifests/cluster-demo.yaml");

fn usage() -> ! {
    eprintln!(
        "usage: xlb-testbed serve --name NAME [--tcp PORT]... [--udp PORT]...\n       xlb-testbed request (--tcp|--udp) ADDR:PORT [--count N] [--interval-ms M]\n       xlb-testbed session (--tcp|--udp) ADDR:PORT [--count N] [--interval-ms M]\n       xlb-testbed demo\n       xlb-testbed soak [--minutes M | --seconds S] [--seed S] [--record FILE]\n       xlb-testbed kpb-plugin (full|update) NETNS CLUSTER_JSON | cleanup NETNS"
    );
    std::process::exit(2)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let (mut name, mut tcp, mut udp) = (String::from("server"), Vec::new(), Vec::new());
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let v = it.next().unwrap_or_else(|| usage());
                match a.as_str() {
                    "--name" => name = v.clone(),
                    "--tcp" => tcp.push(v.parse()?),
                    "--udp" => udp.push(v.parse()?),
                    _ => usage(),
                }
            }
            serve(&name, &tcp, &udp)
        }
        Some("request") => {
            let t = Target::parse(&args[1..], 1, 0)?;
            for _ in 0..t.count {
                let r = if t.udp { udp_request_to(t.to, TIMEOUT) } else { tcp_request_to(t.to, TIMEOUT) };
                match r {
                    Ok(a) => println!("ok {} {} {} {}", a.pod, a.server, a.peer, a.from),
                    Err(e) => println!("err {e:#}"),
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(t.every);
            }
            Ok(())
        }
        Some("session") => {
            // One connection (TCP, or a connected UDP socket) used every interval; on an error
            // it says so and connects again. Each line: epoch ms, then `ok POD` or `err ...`.
            let t = Target::parse(&args[1..], 10, 50)?;
            session(t.to, t.udp, t.count, t.every)
        }
        Some("kpb-plugin") => xlb_tests::kpb::main(&args[1..]),
        Some("soak") => xlb_tests::soak::main(&args[1..]),
        Some("demo") => {
            let stop = install_interrupt_flag();
            match demo(stop) {
                // Everything the demo made is gone by now: the test bed was dropped on the way out.
                Err(_) if stop.load(Ordering::SeqCst) => {
                    eprintln!("\ninterrupted: the demo's namespaces, processes and pins are removed");
                    std::process::exit(130)
                }
                other => other,
            }
        }
        _ => usage(),
    }
}

/// `(--tcp|--udp) ADDR:PORT [--count N] [--interval-ms M]`.
struct Target {
    to: std::net::SocketAddr,
    udp: bool,
    count: usize,
    every: Duration,
}

impl Target {
    fn parse(args: &[String], count: usize, every_ms: u64) -> anyhow::Result<Self> {
        let (mut to, mut udp, mut count, mut every_ms) = (None, false, count, every_ms);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v = it.next().unwrap_or_else(|| usage());
            match a.as_str() {
                "--tcp" => to = Some(v.parse::<std::net::SocketAddr>()?),
                "--udp" => (to, udp) = (Some(v.parse::<std::net::SocketAddr>()?), true),
                "--count" => count = v.parse()?,
                "--interval-ms" => every_ms = v.parse()?,
                _ => usage(),
            }
        }
        Ok(Self { to: to.unwrap_or_else(|| usage()), udp, count, every: Duration::from_millis(every_ms) })
    }
}

fn session(to: std::net::SocketAddr, udp: bool, count: usize, every: Duration) -> anyhow::Result<()> {
    use std::io::Write as _;
    enum Conn {
        Tcp(xlb_tests::HeldConn),
        Udp(std::net::UdpSocket),
    }
    let open = || -> anyhow::Result<Conn> {
        Ok(if udp {
            let s = std::net::UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Conn::Udp(s)
        } else {
            Conn::Tcp(xlb_tests::HeldConn::open(to, TIMEOUT)?)
        })
    };
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut conn = open()?;
    for _ in 0..count {
        let r = match &mut conn {
            Conn::Tcp(c) => c.request(TIMEOUT).map(|a| a.pod),
            Conn::Udp(s) => (|| -> anyhow::Result<String> {
                s.send(b"session\n")?;
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("").to_string())
            })(),
        };
        match r {
            Ok(pod) => println!("{} ok {pod}", now_ms()),
            Err(e) => {
                println!("{} err {e:#}", now_ms());
                conn = open()?;
            }
        }
        std::io::stdout().flush()?;
        std::thread::sleep(every);
    }
    Ok(())
}

fn step(stop: &AtomicBool, what: &str) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    println!("\n== {what}");
    Ok(())
}

fn demo(stop: &AtomicBool) -> anyhow::Result<()> {
    let testbed = workspace_bin("xlb-testbed", "XLB_TESTBED_BIN")?;
    println!("xlb demo: Kubernetes Services served by xlb's eBPF datapath on a two-node cluster made");
    println!("of network namespaces on this machine (198.18.0.0/15); no Kubernetes needed.");

    step(stop, "Building the cluster")?;
    let mut bed =
        TwoNodes::with_pods(&[("pod-a", 0), ("pod-b", 1)], true).context("building the namespaces")?;
    println!("   client 198.18.100.2 --- node-1 198.18.100.1 --- node-2 198.18.200.2");
    for (p, n) in bed.pods.iter().zip(&bed.pod_nodes) {
        println!("   {:<6} {:<12} on node-{}", p.name, p.ip, n + 1);
    }
    println!("   db     198.18.50.2  outside the cluster (behind node-1)");
    bed.start_servers(&testbed, &[8080, 80], &[])?;
    bed.start_outside_server(&testbed, &[3306])?;
    println!("   every pod and the db run an echo server that answers with its name");

    step(stop, "Starting `xlb agent` on each node, both reading the same objects")?;
    for line in DEMO_MANIFEST.lines().filter(|l| !l.starts_with('#') && !l.starts_with("---")) {
        println!("   | {line}");
    }
    bed.write_manifest("cluster.yaml", DEMO_MANIFEST)?;
    bed.start_agents()?;
    println!(
        "   both agents attached their datapath (the tc datapath on these veths: --datapath auto), TC egress and socket programs, and wrote the service maps"
    );

    step(stop, "`xlb get services` on node-1 (read from its pinned maps)")?;
    print!("{}", bed.xlb_cli(0, &["get", "services"])?);

    let show =
        |what: &str, from: &str, to: &str, answers: Vec<anyhow::Result<Answer>>| -> anyhow::Result<()> {
            println!("   {what}");
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for a in answers {
                let a = a?;
                *seen
                    .entry(format!(
                        "answered by {:<6} at {}, which saw the caller as {}",
                        a.pod,
                        a.server,
                        a.peer.ip()
                    ))
                    .or_default() += 1;
            }
            for (line, n) in seen {
                println!("     {from} -> {to}: {n:>2} x {line}");
            }
            Ok(())
        };
    step(stop, "NodePort nginx-service (nodePort 30001) from the client, on both nodes")?;
    for node in ["198.18.100.1:30001", "198.18.200.2:30001"] {
        let to: SocketAddrV4 = node.parse()?;
        let answers =
            bed.client.enter(|| (0..6).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
        show(&format!("to {node}:"), "client", node, answers)?;
    }
    println!(
        "   node-1 has no nginx pod: it sends the connection on to node-2's pod and SNATs it to its own"
    );
    println!("   address (the pod sees 198.18.100.1), so that the reply comes back through node-1.");

    step(stop, "ClusterIP web (198.18.0.10:80 -> targetPort 8080) from pod-b, and from a process of node-1")?;
    let vip: SocketAddrV4 = "198.18.0.10:80".parse()?;
    let answers = bed.pods[1]
        .ns
        .enter(|| (0..10).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>());
    show("from pod-b (translated by node-2's datapath at TC ingress):", "pod-b", "198.18.0.10:80", answers)?;
    println!(
        "     (pod-b landing on itself is hairpinned: SNATed to the Service address, so it sees 198.18.0.10)"
    );
    if let Some(cg) = &bed.cgroups[0] {
        let answers = requests_from(&testbed, &bed.nodes[0], Some(&cg.path), false, vip.into(), 10)?
            .into_iter()
            .map(|r| r.map_err(|e| anyhow::anyhow!(e)))
            .collect();
        show(
            "from node-1 itself (translated at connect() by its socket program):",
            "node-1",
            "198.18.0.10:80",
            answers,
        )?;
    }

    step(stop, "mysql-production (no selector, hand-made Endpoints) from pod-a")?;
    let db: SocketAddrV4 = "198.18.0.12:3306".parse()?;
    let answers =
        bed.pods[0].ns.enter(|| (0..3).map(|_| tcp_request(db, Duration::from_secs(3))).collect::<Vec<_>>());
    show("to the database outside the cluster:", "pod-a", "198.18.0.12:3306", answers)?;

    step(stop, "Datapath counters on node-1 (`xlb stats`, non-zero ones)")?;
    let stats = bed.xlb_cli(0, &["stats"]).unwrap_or_default();
    for line in stats.lines().filter(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        l.starts_with("COUNTER") || f.iter().skip(1).any(|w| w.parse::<u64>().is_ok_and(|n| n > 0))
    }) {
        println!("   {line}");
    }

    step(stop, "Cleaning up: stopping agents and servers, deleting namespaces, pins and cgroups")?;
    drop(bed);
    println!("   done");
    Ok(())
}
