//! End to end in network namespaces: a client reaches a ClusterIP Service through a node running
//! `xlb agent`, over real TCP and UDP sockets, and the pods answer on targetPort.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf, time::Duration};

use xlb_tests::{SingleNode, tcp_request, udp_request};

fn privileged() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("XLB_REQUIRE_PRIVILEGED").map_or(true, |v| v != "1"),
        "end-to-end tests need root; XLB_REQUIRE_PRIVILEGED=1 forbids skipping"
    );
    eprintln!("SKIPPED: end-to-end tests need root");
    false
}

fn testbed() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"))
}

const MANIFEST: &str = include_str!("../manifests/demo.yaml");

#[test]
fn clusterip_tcp_and_udp_reach_both_pods_on_target_port() {
    if !privileged() {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[5353]).expect("servers");
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service("198.18.0.10:53/UDP", 2, Duration::from_secs(10)).unwrap();

    let pods: BTreeMap<String, String> =
        bed.pods.iter().map(|p| (p.name.clone(), p.ip.to_string())).collect();
    let client_ip = bed.client_ip.to_string();

    let vip: SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let tcp =
        bed.client.enter(|| (0..100).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>());
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    // Distinct client tuples: the kernel may hand a new socket an ephemeral port used before, and
    // that is then the same tracked flow, not a new one.
    let mut tuples = std::collections::BTreeSet::new();
    for (i, a) in tcp.into_iter().enumerate() {
        let a = a.unwrap_or_else(|e| panic!("TCP connection {i} failed: {e:#}\n{}", bed.logs()));
        assert_eq!(a.from, vip.into(), "the client must only ever talk to the ClusterIP");
        assert_eq!(a.server.port(), 8080, "the pod answers on targetPort 8080");
        assert_eq!(a.server.ip().to_string(), pods[&a.pod], "{} answered on its own address", a.pod);
        assert_eq!(a.peer.ip().to_string(), client_ip, "the pod sees the client's address");
        tuples.insert(("tcp", a.peer));
        *per_pod.entry(a.pod).or_default() += 1;
    }
    assert_eq!(per_pod.values().sum::<usize>(), 100);
    assert_eq!(per_pod.len(), 2, "both pods receive TCP traffic: {per_pod:?}");

    let dns: SocketAddrV4 = "198.18.0.10:53".parse().unwrap();
    let udp =
        bed.client.enter(|| (0..100).map(|_| udp_request(dns, Duration::from_secs(3))).collect::<Vec<_>>());
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for (i, a) in udp.into_iter().enumerate() {
        let a = a.unwrap_or_else(|e| panic!("UDP datagram {i} got no answer: {e:#}\n{}", bed.logs()));
        assert_eq!(a.from, dns.into(), "UDP answers come back from the ClusterIP and port");
        assert_eq!(a.server.port(), 5353);
        assert_eq!(a.peer.ip().to_string(), client_ip);
        tuples.insert(("udp", a.peer));
        *per_pod.entry(a.pod).or_default() += 1;
    }
    assert_eq!(per_pod.values().sum::<usize>(), 100);
    assert_eq!(per_pod.len(), 2, "both pods receive UDP traffic: {per_pod:?}");

    // The datapath did the work: new flows were translated and replies translated back.
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(
        stats["dnat_new"]["packets"].as_u64().unwrap(),
        tuples.len() as u64,
        "one new flow per client tuple: {stats}"
    );
    assert!(stats["rev_nat"]["packets"].as_u64().unwrap() >= 200, "{stats}");
}

#[test]
fn agent_picks_up_manifest_changes_and_reports_bad_objects() {
    if !privileged() {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    // A broken document and an invalid Service sit next to the good ones and must not stop them.
    bed.write_manifest(
        "00-broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: 7}\n",
    )
    .unwrap();
    bed.write_manifest(
        "01-invalid.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: badip}\nspec: {clusterIP: 300.1.2.3, ports: [{port: 80}]}\n",
    )
    .unwrap();
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let log = bed.agent.as_ref().unwrap().log_text();
    assert!(log.contains("00-broken.yaml") && log.contains("Service default/broken"), "{log}");
    assert!(log.contains("default/badip") && log.contains("300.1.2.3"), "{log}");

    // pod-a turns unready: the agent notices the file change and every new flow lands on pod-b.
    let unready = MANIFEST.replace(
        "- addresses: [\"198.18.10.2\"]\n  conditions: {ready: true, serving: true, terminating: false}",
        "- addresses: [\"198.18.10.2\"]\n  conditions: {ready: false, serving: false, terminating: false}",
    );
    assert_ne!(unready, MANIFEST);
    bed.write_manifest("web.yaml", &unready).unwrap();
    bed.wait_for_service("198.18.0.10:80/TCP", 1, Duration::from_secs(10)).unwrap();
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let answers =
        bed.client.enter(|| (0..20).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>());
    for a in answers {
        assert_eq!(a.expect("connection").pod, "pod-b");
    }
}
