//! `xlb-testbed serve`: the echo server run in pods. `xlb-testbed request`: requests made by a
//! process of their own (a node process or a pod's, for socket-level balancing). `xlb-testbed
//! demo`: the README's demo.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use xlb_tests::{SingleNode, install_interrupt_flag, serve, tcp_request, udp_request, workspace_bin};

/// How long `request` waits for a connection or an answer.
const TIMEOUT: Duration = Duration::from_secs(3);

const DEMO_MANIFEST: &str = include_str!("../../manifests/demo.yaml");

fn usage() -> ! {
    eprintln!(
        "usage: xlb-testbed serve --name NAME [--tcp PORT]... [--udp PORT]...\n       xlb-testbed request (--tcp|--udp) ADDR:PORT [--count N] [--interval-ms M]\n       xlb-testbed session (--tcp|--udp) ADDR:PORT [--count N] [--interval-ms M]\n       xlb-testbed demo"
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
            let (mut to, mut udp, mut count, mut every) = (None, false, 1usize, 0u64);
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let v = it.next().unwrap_or_else(|| usage());
                match a.as_str() {
                    "--tcp" => to = Some(v.parse::<SocketAddrV4>()?),
                    "--udp" => (to, udp) = (Some(v.parse::<SocketAddrV4>()?), true),
                    "--count" => count = v.parse()?,
                    "--interval-ms" => every = v.parse()?,
                    _ => usage(),
                }
            }
            let to = to.unwrap_or_else(|| usage());
            for _ in 0..count {
                let r = if udp { udp_request(to, TIMEOUT) } else { tcp_request(to, TIMEOUT) };
                match r {
                    Ok(a) => println!("ok {} {} {} {}", a.pod, a.server, a.peer, a.from),
                    Err(e) => println!("err {e:#}"),
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(Duration::from_millis(every));
            }
            Ok(())
        }
        Some("session") => {
            // One connection (TCP, or a connected UDP socket) used every interval; on an error
            // it says so and connects again. Each line: epoch ms, then `ok POD` or `err ...`.
            let (mut to, mut udp, mut count, mut every) = (None, false, 10usize, 50u64);
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let v = it.next().unwrap_or_else(|| usage());
                match a.as_str() {
                    "--tcp" => to = Some(v.parse::<SocketAddrV4>()?),
                    "--udp" => (to, udp) = (Some(v.parse::<SocketAddrV4>()?), true),
                    "--count" => count = v.parse()?,
                    "--interval-ms" => every = v.parse()?,
                    _ => usage(),
                }
            }
            let to = to.unwrap_or_else(|| usage());
            session(to, udp, count, Duration::from_millis(every))
        }
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

fn session(to: SocketAddrV4, udp: bool, count: usize, every: Duration) -> anyhow::Result<()> {
    use std::io::Write as _;
    enum Conn {
        Tcp(xlb_tests::HeldConn),
        Udp(std::net::UdpSocket),
    }
    let open = || -> anyhow::Result<Conn> {
        Ok(if udp {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
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
    println!("xlb demo: a Kubernetes ClusterIP Service load-balanced by xlb's XDP program,");
    println!("on network namespaces of this machine (client -> node -> two pods); no cluster needed.");

    step(stop, "Setting up namespaces: client, node, pod-a, pod-b (198.18.0.0/15)")?;
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).context("building the namespaces")?;
    for p in &bed.pods {
        println!("   {:<6} {}  (namespace {})", p.name, p.ip, p.ns.name);
    }
    println!("   client {}  node interfaces {:?}", bed.client_ip, bed.node_ifaces);
    bed.start_servers(&testbed, &[8080], &[5353])?;
    println!("   each pod runs an echo server on TCP 8080 and UDP 5353 that says who it is");

    step(stop, "Starting `xlb agent` on the node with this manifest")?;
    for line in DEMO_MANIFEST.lines().filter(|l| !l.starts_with('#')) {
        println!("   | {line}");
    }
    bed.write_manifest("demo.yaml", DEMO_MANIFEST)?;
    bed.start_agent()?;
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10))?;
    println!("   agent attached XDP to the node's interfaces and wrote the service maps");

    step(stop, "`xlb services` (read from the pinned maps)")?;
    print!("{}", bed.xlb_cli(&["services"])?);

    step(stop, "10 TCP connections from the client to ClusterIP 198.18.0.10:80")?;
    let vip: SocketAddrV4 = "198.18.0.10:80".parse()?;
    let answers =
        bed.client.enter(|| (0..10).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>());
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for (i, a) in answers.into_iter().enumerate() {
        let a = a?;
        println!(
            "   #{:<2} {} -> {}  answered by {} at {} (targetPort), reply seen from {}",
            i + 1,
            a.peer,
            vip,
            a.pod,
            a.server,
            a.from
        );
        *per_pod.entry(a.pod).or_default() += 1;
    }
    println!("   per pod: {per_pod:?}");

    step(stop, "4 UDP datagrams to 198.18.0.10:53, each from a new socket")?;
    let dns: SocketAddrV4 = "198.18.0.10:53".parse()?;
    let answers =
        bed.client.enter(|| (0..4).map(|_| udp_request(dns, Duration::from_secs(3))).collect::<Vec<_>>());
    for a in answers {
        let a = a?;
        println!(
            "   {} -> {}  answered by {} at {}, reply seen from {}",
            a.peer, dns, a.pod, a.server, a.from
        );
    }

    step(stop, "Datapath counters (`xlb` reads them from the per-CPU stats map)")?;
    print!("{}", bed.xlb_cli(&["stats"]).unwrap_or_else(|e| format!("   (unavailable: {e})\n")));

    step(stop, "Cleaning up: stopping the agent and servers, deleting namespaces and pins")?;
    drop(bed);
    println!("   done");
    Ok(())
}
