//! xlb next to kube-proxy, as docs/deploy.md installs it and rolls it back: the node carries
//! kube-proxy's iptables rules for the demo Service (the chains kube-proxy's iptables mode
//! writes: KUBE-SERVICES, a KUBE-SVC chain choosing a KUBE-SEP chain at random, DNAT), and
//!
//! 1. before xlb, the rules serve the ClusterIP;
//! 2. with xlb's agent running, xlb serves it (its counters move, the rules' counter stands
//!    still) and every request still succeeds;
//! 3. after the rollback (agent stopped, `xlb cleanup`), the rules serve it again.
//!
//! Needs root and iptables. Without root it skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI).
use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use xlb_tests::{SingleNode, privileged, tcp_request};

const MANIFEST: &str = include_str!("../manifests/demo.yaml");

/// kube-proxy's iptables-mode rules for the demo Service's TCP port (198.18.0.10:80 to the two
/// pods' 8080), in the shape of its proxier (KUBE-MARK-MASQ left out: the client is outside
/// the cluster CIDR and the pods route back through the node anyway).
const RULES: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEBHTTP - [0:0]
:KUBE-SEP-PODA - [0:0]
:KUBE-SEP-PODB - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 198.18.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-WEBHTTP
-A KUBE-SVC-WEBHTTP -m comment --comment \"default/web:http -> 198.18.10.2:8080\" -m statistic --mode random --probability 0.5 -j KUBE-SEP-PODA
-A KUBE-SVC-WEBHTTP -m comment --comment \"default/web:http -> 198.18.11.2:8080\" -j KUBE-SEP-PODB
-A KUBE-SEP-PODA -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 198.18.10.2:8080
-A KUBE-SEP-PODB -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 198.18.11.2:8080
COMMIT
";

/// Packets the ClusterIP's rule in KUBE-SERVICES matched (the first of each new connection).
fn rule_packets(bed: &SingleNode) -> u64 {
    let save = bed.node.exec("iptables-save", &["-c", "-t", "nat"]).unwrap();
    let line = save.lines().find(|l| l.contains("-A KUBE-SERVICES -d 198.18.0.10/32")).expect("the rule");
    line.trim_start_matches('[').split(':').next().unwrap().parse().unwrap()
}

fn dnat_new(bed: &SingleNode) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    stats["dnat_new"]["packets"].as_u64().unwrap()
}

/// `n` requests from the client to the ClusterIP; all must be answered by a pod.
fn requests(bed: &SingleNode, n: usize, phase: &str) {
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let answers =
        bed.client.enter(|| (0..n).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>());
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.unwrap_or_else(|e| panic!("{phase}: request {i} failed: {e:#}\n{}", bed.logs()));
        assert!(a.pod.starts_with("pod-"), "{phase}: {a:?}");
    }
}

#[test]
fn xlb_takes_over_from_kube_proxys_rules_and_gives_back_on_rollback() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[5353]).expect("servers");
    let rules = bed.work.join("kube-proxy.rules");
    std::fs::write(&rules, RULES).unwrap();
    bed.node.exec("iptables-restore", &[&rules.display().to_string()]).expect("kube-proxy's rules");

    // 1. kube-proxy alone.
    requests(&bed, 20, "kube-proxy alone");
    assert_eq!(rule_packets(&bed), 20, "kube-proxy's rules served every connection");

    // 2. xlb installed next to it: it answers first (at TC ingress, `auto` on a veth: before
    // netfilter, as XDP is).
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let before = dnat_new(&bed);
    requests(&bed, 20, "xlb next to kube-proxy");
    assert_eq!(rule_packets(&bed), 20, "no connection reached kube-proxy's rules");
    assert!(dnat_new(&bed) >= before + 20, "xlb translated the new connections");

    // 3. Rollback: the agent goes, `xlb cleanup` detaches the datapath, kube-proxy serves again.
    bed.agent.take().unwrap().stop(Duration::from_secs(5));
    let out = bed.xlb_cli(&["cleanup"]).unwrap();
    assert!(out.contains("links/tc_ingress_eth0"), "{out}");
    requests(&bed, 20, "after the rollback");
    assert_eq!(rule_packets(&bed), 40, "kube-proxy's rules serve again");
}
