//! Restart without loss: while a client keeps opening connections to a ClusterIP, the agent is
//! killed with SIGKILL and started again. The XDP program stays attached through its pinned
//! link, the maps stay pinned, and the new agent takes over without rewriting anything: no
//! connection fails, and every id stays the same. The same holds for the node's own processes,
//! balanced at the socket by the cgroup programs, whose pinned links are replaced by the new
//! agent's.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use xlb_tests::{SingleNode, privileged, requests_from, run, tcp_request};

const MANIFEST: &str = include_str!("../manifests/demo.yaml");

/// `xlb services -o json` without the flow counts, which move with traffic.
fn ids(bed: &SingleNode) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["services", "-o", "json"]).unwrap()).unwrap();
    for row in v.as_array_mut().unwrap() {
        for b in row["backends"].as_array_mut().unwrap() {
            b.as_object_mut().unwrap().remove("new_flows");
        }
    }
    v
}

/// The programs attached to the cgroup `path`, by bpftool.
fn cgroup_programs(path: &std::path::Path) -> Vec<String> {
    let out = run("bpftool", &["-j", "cgroup", "show", &path.display().to_string()]).unwrap();
    let v: serde_json::Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
    v.as_array().unwrap().iter().map(|p| format!("{} {}", p["attach_type"], p["name"])).collect()
}

/// Two pods serving 8080, the demo Service, and an agent that serves it.
fn demo_bed() -> SingleNode {
    demo_bed_at("auto")
}

/// As [`demo_bed`], the agent run with `--datapath datapath`.
fn demo_bed_at(datapath: &str) -> SingleNode {
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.agent_args = vec!["--datapath".into(), datapath.into()];
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    bed
}

/// At TC ingress (the datapath `auto` takes on veths).
#[test]
fn sigkill_and_restart_of_the_agent_loses_no_connection() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    sigkill_and_restart("tc");
}

#[test]
fn sigkill_and_restart_of_the_agent_loses_no_connection_at_xdp() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    sigkill_and_restart("xdp");
}

fn sigkill_and_restart(datapath: &str) {
    let mut bed = demo_bed_at(datapath);
    let link = if datapath == "xdp" { "links/xdp_eth0" } else { "links/tc_ingress_eth0" };
    let before = ids(&bed);

    let stop = AtomicBool::new(false);
    let vip: std::net::SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let mut agent = bed.agent.take().expect("agent running");
    let bed_ref = &bed;
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let cg = bed.cgroup.as_ref().expect("the test bed's cgroup v2").path.clone();
    let (results, node_results, killed_at, restarted_at, new_agent) = std::thread::scope(|s| {
        let bed = bed_ref;
        // The node's own processes, balanced at the socket, in batches of fresh processes.
        let node_client = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                out.extend(
                    requests_from(&testbed, &bed.node, Some(&cg), false, vip.into(), 5).expect("request"),
                );
            }
            out
        });
        let client = s.spawn(|| {
            bed.client.enter(|| {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    out.push((t, tcp_request(vip, Duration::from_secs(2)).map(|a| a.pod)));
                    std::thread::sleep(Duration::from_millis(5));
                }
                out
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        agent.signal(libc::SIGKILL);
        agent.stop(Duration::from_secs(5)); // reaps it
        let killed_at = Instant::now();
        let old_log = agent.log_text();
        // With no agent at all, the program keeps forwarding.
        std::thread::sleep(Duration::from_millis(1500));
        let restarted_at = Instant::now();
        // The new agent's log replaces the old one; keep the old one for the report.
        std::fs::write(bed.work.join("agent-killed.log"), old_log).unwrap();
        let new_agent = bed.spawn_agent();
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        let node_results = node_client.join().expect("node client thread");
        (client.join().expect("client thread"), node_results, killed_at, restarted_at, new_agent)
    });
    bed.agent = Some(new_agent.expect("restarted agent"));

    let failed: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let while_dead = results.iter().filter(|(t, _)| *t > killed_at && *t < restarted_at).count();
    let total = results.len();
    eprintln!("{total} connections, {while_dead} of them with no agent running, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {total} connections failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        bed.logs()
    );
    assert!(while_dead >= 20, "only {while_dead} connections were made while the agent was dead");
    let pods: std::collections::BTreeSet<_> = results.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    assert_eq!(pods.len(), 2, "both pods kept getting connections: {pods:?}");
    let node_failed: Vec<_> = node_results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!("{} connections from the node's processes, {} failed", node_results.len(), node_failed.len());
    assert!(node_results.len() >= 20, "only {} connections from the node", node_results.len());
    assert!(node_failed.is_empty(), "connections from the node failed: {node_failed:?}\n{}", bed.logs());

    // The new agent took the pinned link over and rewrote nothing: ids and slots are as before.
    let log = bed.agent.as_ref().unwrap().log_text();
    if datapath == "xdp" {
        assert!(log.contains("attached XDP (replaced the program of the pinned link)"), "{log}");
    } else {
        assert!(
            log.lines().any(|l| l.contains("attached the datapath at TC ingress iface=eth0")
                && l.contains("replaced=true")),
            "{log}"
        );
    }
    assert!(log.contains("attached TC egress (replaced the program of the pinned link)"), "{log}");
    assert!(log.contains("writes=0") && log.contains("deletes=0"), "the restart rewrote maps:\n{log}");
    assert_eq!(before, ids(&bed), "service and backend ids stay the same across the restart");
    assert!(bed.pin_dir.join(link).exists());
    // One program per socket hook: the old agent's links went when the new ones took their pins.
    let progs = cgroup_programs(&cg);
    assert_eq!(progs.len(), 8, "IPv4 and IPv6, four each: {progs:?}");
    assert!(log.contains("attached socket-level balancing") && log.contains("replaced=8"), "{log}");

    // `xlb cleanup` after the agent stops: the pins go, and with them the program.
    bed.agent.take().unwrap().stop(Duration::from_secs(5));
    let out = bed.xlb_cli(&["cleanup"]).unwrap();
    assert!(
        out.contains(link) && out.contains("links/tc_egress_eth0") && out.contains(lb_common::MAP_SERVICES),
        "{out}"
    );
    assert!(!bed.pin_dir.exists(), "nothing left pinned, not even the directory");
    let r = bed.client.enter(|| tcp_request(vip, Duration::from_secs(1)));
    assert!(r.is_err(), "after cleanup no program translates the ClusterIP: {r:?}");
    assert_eq!(cgroup_programs(&cg), Vec::<String>::new(), "the socket programs are detached too");
    let r = requests_from(&testbed, &bed.node, Some(&cg), false, vip.into(), 1).unwrap();
    assert!(r[0].is_err(), "after cleanup the node's processes reach no ClusterIP: {r:?}");
}

#[test]
fn an_agent_of_a_new_layout_takes_over_and_removes_the_old_maps() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = demo_bed();
    let frontends = |bed: &SingleNode| -> Vec<(String, String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&bed.xlb_cli(&["services", "-o", "json"]).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["frontend"].to_string(), r["name"].to_string(), r["backends"].to_string()))
            .collect()
    };
    let before = frontends(&bed);
    bed.agent.take().unwrap().stop(Duration::from_secs(5));

    // As an older agent would have left it: the names map under its older layout's name.
    let current = lb_common::MAP_SVC_INFO;
    let (base, v) = current.rsplit_once("_v").unwrap();
    let older = format!("{base}_v{}", v.parse::<u32>().unwrap() - 1);
    std::fs::rename(bed.pin_dir.join(current), bed.pin_dir.join(&older)).unwrap();
    let err = bed.xlb_cli(&["services"]).unwrap_err().to_string();
    assert!(err.contains(&format!("pinned by an older xlb: found {older}")), "{err}");

    bed.start_agent().expect("agent of the new layout");
    let log = bed.agent.as_ref().unwrap().log_text();
    assert!(log.contains("removed a map of another layout version"), "{log}");
    assert!(!bed.pin_dir.join(&older).exists() && bed.pin_dir.join(current).exists());
    assert_eq!(frontends(&bed), before, "the same frontends, names and backends");
    // Traffic still flows.
    bed.client.enter(|| tcp_request("198.18.0.10:80".parse().unwrap(), Duration::from_secs(2))).unwrap();
}

#[test]
fn maglev_selection_serves_traffic_and_survives_a_restart() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.agent_args = ["--lb-algorithm", "maglev", "--maglev-table-size", "1021"].map(String::from).to_vec();
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let vip = "198.18.0.10:80".parse().unwrap();
    let pods = |bed: &SingleNode| -> std::collections::BTreeSet<String> {
        bed.client.enter(|| {
            (0..40).map(|_| tcp_request(vip, Duration::from_secs(3)).expect("request").pod).collect()
        })
    };
    assert_eq!(pods(&bed).len(), 2, "new flows spread over both pods");
    // The trace names the table it took the slot from.
    let t = bed
        .xlb_cli(&["trace", "--from", "198.18.100.2:40000", "--to", "198.18.0.10:80", "-o", "json"])
        .unwrap();
    assert!(t.contains("Maglev table"), "{t}");
    // The agent restarts onto the pinned tables and keeps serving.
    bed.agent.take().unwrap().stop(Duration::from_secs(5));
    bed.start_agent().expect("agent again");
    let log = bed.agent.as_ref().unwrap().log_text();
    assert!(log.contains("maglev_size: 1021"), "{log}");
    assert_eq!(pods(&bed).len(), 2);
    let t2 = bed
        .xlb_cli(&["trace", "--from", "198.18.100.2:40000", "--to", "198.18.0.10:80", "-o", "json"])
        .unwrap();
    let backend = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap()["backend"].clone();
    assert!(!backend(&t).is_null(), "{t}");
    assert_eq!(backend(&t), backend(&t2), "the same flow goes to the same backend after the restart");
}

/// Every pin under `dir` (maps, and links under links/) with its inode: a pin replaced or
/// re-pinned gets a new one.
fn pins(dir: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = std::collections::BTreeMap::new();
    for sub in ["", "links"] {
        for e in std::fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
            let md = e.metadata().unwrap();
            if md.is_file() {
                out.insert(format!("{sub}/{}", e.file_name().to_string_lossy()), md.ino());
            }
        }
    }
    out
}

/// A second agent on the same node and pin directory (a manual run beside the DaemonSet, or an
/// update whose pods overlap) refuses to start, naming the running one, and changes nothing:
/// the same pins, the same programs on the interfaces, the same maps. It is given a wider node
/// port range and a Service with a node port the first one rejects, which it would otherwise
/// serve.
#[test]
fn a_second_agent_on_the_same_pin_directory_refuses_to_start_and_changes_nothing() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let bed = demo_bed();
    let first_pid = bed.agent.as_ref().unwrap().pid();
    let other = bed.work.join("other-manifests");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("np.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: wide, namespace: default}\nspec: {type: NodePort, clusterIP: 198.18.0.77, ports: [{port: 80, targetPort: 8080, nodePort: 40080}]}\n",
    )
    .unwrap();
    let (services, pinned) = (ids(&bed), pins(&bed.pin_dir));
    // The programs on the node's interfaces: the program of each pinned link (tcx links do not
    // show in `ip link`), and the XDP programs `ip link` shows, without the carrier state, which
    // may still be settling on a bed just made.
    let links = || {
        let mut out = Vec::new();
        for p in pinned.keys().filter(|p| p.starts_with("links/")) {
            let path = bed.pin_dir.join(p.trim_start_matches('/')).display().to_string();
            let link = run("bpftool", &["-j", "link", "show", "pinned", &path]).unwrap();
            let v: serde_json::Value = serde_json::from_str(&link).unwrap();
            out.push(format!("{p}: prog {}", v["prog_id"]));
        }
        let ip = bed.node.ip(&["-d", "link", "show"]).unwrap();
        let mut words = ip.split_whitespace();
        while let Some(w) = words.next() {
            if w == "state" {
                words.next(); // UP, DOWN, UNKNOWN
            } else if !w.starts_with('<') {
                // Not the flags (<NO-CARRIER,BROADCAST,...>): carrier and operational state.
                out.push(w.to_string());
            }
        }
        out
    };
    let attached = links();
    assert!(!attached.iter().any(|l| l.ends_with("prog null")), "{attached:?}");
    assert!(
        attached.iter().any(|l| l.starts_with("links/tc_ingress_") || l.starts_with("links/xdp")),
        "{attached:?}"
    );
    assert!(pinned.keys().any(|p| p.starts_with("links/")), "{pinned:?}");

    let log = bed.work.join("second-agent.log");
    let mut second = xlb_tests::Proc::spawn(
        "second agent",
        &mut bed.agent_command(&other, &["--node-port-range", "30000-50000", "--http-addr", "off"]),
        Some(&log),
    )
    .unwrap();
    // It refuses at once; one still running after 10 s is stopped (by its Drop) and fails.
    let status = second.wait_exit(Duration::from_secs(10));
    let stderr = second.log_text();
    let status =
        status.unwrap_or_else(|e| panic!("the second agent did not refuse to start ({e}): {stderr}"));
    assert!(!status.success(), "the second agent must exit non-zero: {stderr}");
    assert!(
        stderr.contains("another xlb agent is running") && stderr.contains(&format!("pid {first_pid}")),
        "it names the first agent (pid {first_pid}): {stderr}"
    );
    assert_eq!(pins(&bed.pin_dir), pinned, "no pin created, replaced or removed");
    assert_eq!(links(), attached, "the same programs on the node's interfaces");
    assert_eq!(ids(&bed), services, "the same services, ids and backends in the maps");
    assert!(!bed.xlb_cli(&["services"]).unwrap().contains("40080"));
    // And the first agent still serves.
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(5)).unwrap();
    let a = bed.client.enter(|| tcp_request("198.18.0.10:80".parse().unwrap(), Duration::from_secs(2)));
    assert!(a.is_ok(), "{a:?}");
}

/// An upgrade from the preallocated service map (`xlb_svc4_v1`, agents before 2026-12-07):
/// the new agent copies its entries into the new map before its first sync, so every service
/// and backend keeps its id (a tracked flow's backend id still names its backend), a connection
/// open through the upgrade keeps working, and the old map is removed once the new program is
/// attached.
#[test]
fn an_upgrade_from_the_preallocated_service_map_keeps_every_id_and_connection() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = demo_bed();
    let vip: std::net::SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let before = ids(&bed);
    // A connection open through the upgrade (its flow tracked by backend id).
    let mut held = bed.client.enter(|| xlb_tests::HeldConn::open(vip, Duration::from_secs(2))).unwrap();
    let first = held.request(Duration::from_secs(2)).unwrap();
    bed.agent.take().unwrap().stop(Duration::from_secs(5));

    // As an older agent left it: the entries in the map of the older name (the same layout).
    let current = lb_common::MAP_SERVICES;
    let older = lb_common::MAP_SERVICES_V1;
    std::fs::rename(bed.pin_dir.join(current), bed.pin_dir.join(older)).unwrap();
    bed.start_agent().expect("agent of the new layout");
    let log = bed.agent.as_ref().unwrap().log_text();
    assert!(log.contains("copied the service map of the earlier layout"), "{log}");
    assert!(log.contains("removed a map of another layout version"), "{log}");
    assert!(!bed.pin_dir.join(older).exists() && bed.pin_dir.join(current).exists());
    assert_eq!(ids(&bed), before, "every service and backend kept its id");
    let again =
        held.request(Duration::from_secs(2)).expect("the connection open through the upgrade still works");
    assert_eq!(again.pod, first.pod, "the same pod answers");
    bed.client.enter(|| tcp_request(vip, Duration::from_secs(2))).unwrap();
}
