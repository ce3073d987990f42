//! Two nodes in network namespaces, each running its own agent: node ports across nodes, as a
//! client outside the cluster sees them; ClusterIPs from the nodes' processes and pods, at the
//! socket and through XDP, and a pod reaching its own Service.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use xlb_tests::{Answer, TwoNodes, privileged, requests_from, tcp_request};

fn service(name: &str, n: u8, node_port: u16, extra: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 198.18.0.{n}\n{extra}  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

const POD_A: &str = "- {addresses: [198.18.10.2], nodeName: node-1}\n";
const POD_B: &str = "- {addresses: [198.18.20.2], nodeName: node-2}\n";

/// (pod that answered, address the pod saw the client at) for 20 connections to `to`.
fn answers(bed: &TwoNodes, to: &str) -> BTreeMap<(String, String), usize> {
    let to: SocketAddrV4 = to.parse().unwrap();
    let all =
        bed.client.enter(|| (0..20).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
    let mut seen = BTreeMap::new();
    for a in all {
        let a = a.unwrap_or_else(|e| panic!("{to}: {e:#}\n{}", bed.logs()));
        assert_eq!(a.from, to.into(), "the client only ever hears from the address it called");
        *seen.entry((a.pod, a.peer.ip().to_string())).or_default() += 1;
    }
    seen
}

#[test]
fn node_ports_across_two_nodes() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    // far: its only endpoint is on node-2. local: one on each node, externalTrafficPolicy Local.
    bed.write_manifest("far.yaml", &service("far", 90, 30090, "", POD_B)).unwrap();
    bed.write_manifest(
        "local.yaml",
        &service("local", 91, 30091, "  externalTrafficPolicy: Local\n", &format!("{POD_A}{POD_B}")),
    )
    .unwrap();
    bed.start_agents().expect("agents");

    // On node-1 for the pod on node-2: SNATed to node-1, so the reply comes back through it.
    let far = answers(&bed, "198.18.100.1:30090");
    assert_eq!(far, BTreeMap::from([(("pod-b".into(), "198.18.100.1".into()), 20)]), "{far:?}");
    // The same node port on node-2's own address: its endpoint is local there, no SNAT.
    let far2 = answers(&bed, "198.18.200.2:30090");
    assert_eq!(far2, BTreeMap::from([(("pod-b".into(), "198.18.100.2".into()), 20)]), "{far2:?}");

    // externalTrafficPolicy Local: each node sends to its own pod only, and the pod sees the
    // client's real address.
    let l1 = answers(&bed, "198.18.100.1:30091");
    assert_eq!(l1, BTreeMap::from([(("pod-a".into(), "198.18.100.2".into()), 20)]), "{l1:?}");
    let l2 = answers(&bed, "198.18.200.2:30091");
    assert_eq!(l2, BTreeMap::from([(("pod-b".into(), "198.18.100.2".into()), 20)]), "{l2:?}");

    // node-1's datapath did the SNAT, and says so.
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["egress_snat"]["packets"].as_u64().unwrap() >= 40, "{stats}");
}

/// (pod that answered, address the pod saw the client at) for each answer; panics on errors.
fn tally(
    to: &str,
    all: Vec<Result<Answer, String>>,
    logs: impl Fn() -> String,
) -> BTreeMap<(String, String), usize> {
    let to: SocketAddrV4 = to.parse().unwrap();
    let mut seen = BTreeMap::new();
    for a in all {
        let a = a.unwrap_or_else(|e| panic!("{to}: {e}\n{}", logs()));
        assert_eq!(a.from, to.into(), "the caller only ever sees the address it called: {a:?}");
        *seen.entry((a.pod, a.peer.ip().to_string())).or_default() += 1;
    }
    seen
}

#[test]
fn cluster_ips_from_nodes_and_pods_and_a_pod_reaching_itself() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = TwoNodes::new().expect("test bed");
    let (Some(cg1), Some(cg2)) = (
        xlb_tests::socket_lb_cgroup(bed.cgroups[0].as_ref()),
        xlb_tests::socket_lb_cgroup(bed.cgroups[1].as_ref()),
    ) else {
        return;
    };
    bed.start_servers(&testbed, &[8080], &[5353]).expect("servers");
    // web: a pod on each node. self: pod-a only. none: no endpoint at all.
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 198.18.0.95\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\nendpoints:\n".to_string() + POD_A + POD_B;
    bed.write_manifest("web.yaml", &web).unwrap();
    let own = "apiVersion: v1\nkind: Service\nmetadata: {name: self, namespace: default}\nspec:\n  clusterIP: 198.18.0.96\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: self-1, namespace: default, labels: {kubernetes.io/service-name: self}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n".to_string() + POD_A;
    bed.write_manifest("self.yaml", &own).unwrap();
    bed.write_manifest(
        "none.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: none, namespace: default}\nspec:\n  clusterIP: 198.18.0.97\n  ports: [{port: 80, targetPort: 8080}]\n",
    )
    .unwrap();
    bed.start_agents().expect("agents");
    let logs = || bed.logs();
    let req = |ns: &xlb_tests::Netns, cg: Option<&std::path::Path>, udp: bool, to: &str, n: usize| {
        requests_from(&testbed, ns, cg, udp, to.parse().unwrap(), n).expect("xlb-testbed request")
    };
    let pods =
        |m: &BTreeMap<(String, String), usize>| m.keys().map(|(p, _)| p.clone()).collect::<BTreeSet<_>>();
    let both: BTreeSet<String> = ["pod-a".into(), "pod-b".into()].into();

    // A process of node-1 (in node-1's cgroup): the node has no route to ClusterIPs at all, so
    // only socket-level balancing gets it there. It reaches both pods, and TCP's peer name and
    // UDP's reply source are the ClusterIP it called.
    let tcp = tally("198.18.0.95:80", req(&bed.nodes[0], Some(&cg1), false, "198.18.0.95:80", 30), logs);
    assert_eq!(pods(&tcp), both, "{tcp:?}");
    let udp = tally("198.18.0.95:53", req(&bed.nodes[0], Some(&cg1), true, "198.18.0.95:53", 30), logs);
    assert_eq!(pods(&udp), both, "{udp:?}");
    // The same process outside the node's cgroup gets nowhere: no route.
    let outside = req(&bed.nodes[0], None, false, "198.18.0.95:80", 1);
    assert!(
        outside[0].is_err(),
        "without socket-level balancing the node cannot reach a ClusterIP: {outside:?}"
    );

    // A pod on node-2, in node-2's cgroup: both pods, and the pods see its own address.
    let from_b = tally("198.18.0.95:80", req(&bed.pods[1].ns, Some(&cg2), false, "198.18.0.95:80", 30), logs);
    assert_eq!(pods(&from_b), both, "{from_b:?}");
    assert!(from_b.keys().all(|(_, peer)| peer == "198.18.20.2"), "{from_b:?}");
    // The same pod outside the cgroup: its packets go through node-2's XDP program instead (and
    // the half that land on pod-b itself are hairpinned there).
    let xdp_b = tally("198.18.0.95:80", req(&bed.pods[1].ns, None, false, "198.18.0.95:80", 30), logs);
    assert_eq!(pods(&xdp_b), both, "{xdp_b:?}");

    // Hairpin, a pod reaching its own Service: at the socket it simply talks to itself...
    let hp = tally("198.18.0.96:80", req(&bed.pods[0].ns, Some(&cg1), false, "198.18.0.96:80", 10), logs);
    assert_eq!(hp, BTreeMap::from([(("pod-a".into(), "198.18.10.2".into()), 10)]), "{hp:?}");
    // ...and through XDP (outside the cgroup) node-1 SNATs it to the Service's address, so that
    // the pod never sees a packet from itself and its answer comes back through the node.
    let hp = tally("198.18.0.96:80", req(&bed.pods[0].ns, None, false, "198.18.0.96:80", 10), logs);
    assert_eq!(hp, BTreeMap::from([(("pod-a".into(), "198.18.0.96".into()), 10)]), "{hp:?}");

    // No endpoint: refused at once, at the socket.
    let started = Instant::now();
    let none = req(&bed.nodes[0], Some(&cg1), false, "198.18.0.97:80", 1);
    let took = started.elapsed();
    let err = none[0].as_ref().expect_err("a Service without endpoints must refuse");
    assert!(err.contains("refused"), "{err}");
    assert!(took < Duration::from_secs(1), "refused at once, not after a timeout: {took:?}");

    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["sock_translated"]["packets"].as_u64().unwrap() >= 70, "{stats}");
    assert!(stats["sock_refused"]["packets"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn refusals_and_source_ranges_across_two_nodes() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    bed.write_manifest("empty.yaml", &service("empty", 92, 30092, "", "  []\n")).unwrap();
    let lb = |name: &str, n: u8, ranges: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.18.0.{n}\n  loadBalancerSourceRanges: [{ranges}]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 300{n}}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.18.1.{n}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{POD_B}"
        )
    };
    // The client is 198.18.100.2; the only endpoint is on node-2.
    bed.write_manifest("closed.yaml", &lb("closed", 93, "203.0.113.0/24")).unwrap();
    bed.write_manifest("open.yaml", &lb("open", 94, "198.18.100.0/24")).unwrap();
    bed.start_agents().expect("agents");
    // The answers xlb sends back by XDP_TX reach the client's veth at once only if it runs an
    // XDP program (TOOLCHAIN.md), as a real NIC needs none.
    bed.client_takes_xdp_tx().expect("xdp-pass on the client");
    let req =
        |to: &str, t: u64| bed.client.enter(|| tcp_request(to.parse().unwrap(), Duration::from_secs(t)));

    // No endpoint: refused at once on either node (node-2 is reached through node-1).
    for to in ["198.18.100.1:30092", "198.18.200.2:30092", "198.18.0.92:80"] {
        let started = Instant::now();
        let err = req(to, 3).expect_err("a Service without endpoints must refuse");
        assert!(format!("{err:#}").contains("refused"), "{to}: {err:#}");
        assert!(started.elapsed() < Duration::from_secs(1), "{to}: refused at once, not after a timeout");
    }
    // loadBalancerSourceRanges: the client is outside one range and inside the other.
    assert!(req("198.18.1.93:80", 1).is_err(), "a client outside loadBalancerSourceRanges is answered");
    let open = req("198.18.1.94:80", 3).unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs()));
    assert_eq!((open.pod.as_str(), open.peer.ip().to_string()), ("pod-b", "198.18.100.2".to_string()));
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["drop_source_range"]["packets"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["reject_no_backend"]["packets"].as_u64().unwrap() >= 2, "{stats}");
}

/// Node ports over IPv6 across two nodes: a dual-stack NodePort Service whose IPv6 endpoint on
/// node-2 is reached through node-1's IPv6 address, SNATed to node-1 so that its reply comes
/// back the same way; its endpoint on node-1 sees the client; the client hears only from the
/// node port it called. On node-2's own address, node-2's endpoint is local and sees the client.
#[test]
fn ipv6_node_ports_across_two_nodes() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.add_ipv6().expect("IPv6 addresses");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    let manifest = |name: &str, n: u8, node_port: u16, extra: &str, eps: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 198.18.0.{n}\n  clusterIPs: [198.18.0.{n}, \"2001:db8:1::{n}\"]\n{extra}  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-6, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv6\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
        )
    };
    let (a6, b6) = (
        "- {addresses: [\"2001:db8:10::2\"], nodeName: node-1}\n",
        "- {addresses: [\"2001:db8:20::2\"], nodeName: node-2}\n",
    );
    bed.write_manifest("far6.yaml", &manifest("far6", 92, 30092, "", b6)).unwrap();
    bed.write_manifest(
        "both6.yaml",
        &manifest("both6", 93, 30093, "  externalTrafficPolicy: Local\n", &format!("{a6}{b6}")),
    )
    .unwrap();
    bed.start_agents().expect("agents");
    let answers6 = |to: &str| -> BTreeMap<(String, String), usize> {
        let to: std::net::SocketAddr = to.parse().unwrap();
        let all = bed.client.enter(|| {
            (0..20).map(|_| xlb_tests::tcp_request_to(to, Duration::from_secs(3))).collect::<Vec<_>>()
        });
        let mut seen = BTreeMap::new();
        for a in all {
            let a = a.unwrap_or_else(|e| panic!("{to}: {e:#}\n{}", bed.logs()));
            assert_eq!(a.from, to, "the client only ever hears from the address it called");
            *seen.entry((a.pod, a.peer.ip().to_string())).or_default() += 1;
        }
        seen
    };
    // On node-1 for the pod on node-2: SNATed to node-1's address, from a SNAT port.
    let far = answers6("[2001:db8:100::1]:30092");
    assert_eq!(far, BTreeMap::from([(("pod-b".into(), "2001:db8:100::1".into()), 20)]), "{far:?}");
    // On node-2's own address, its endpoint is local: the pod sees the client.
    let far2 = answers6("[2001:db8:200::2]:30092");
    assert_eq!(far2, BTreeMap::from([(("pod-b".into(), "2001:db8:100::2".into()), 20)]), "{far2:?}");
    // externalTrafficPolicy Local: each node sends to its own pod, which sees the client.
    let l1 = answers6("[2001:db8:100::1]:30093");
    assert_eq!(l1, BTreeMap::from([(("pod-a".into(), "2001:db8:100::2".into()), 20)]), "{l1:?}");
    let l2 = answers6("[2001:db8:200::2]:30093");
    assert_eq!(l2, BTreeMap::from([(("pod-b".into(), "2001:db8:100::2".into()), 20)]), "{l2:?}");
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["egress_snat"]["packets"].as_u64().unwrap() >= 20, "{stats}");
}

/// The tc datapath on packets whose L4 checksum is partial (CHECKSUM_PARTIAL: sent through a veth
/// with transmit checksum offload, as pods and clients here send them), which it must update
/// through the kernel's helper: the field holds only the pseudo-header's sum until a device
/// completes it. The link between the nodes has no offload, so the kernel completes the sums as
/// packets cross it, and no receiver trusts a sum unchecked (receive offload off everywhere): a
/// wrongly updated partial sum makes the packet a checksum error at the pod, and the connection
/// fails. Node port with SNAT across nodes, ClusterIP (TCP and UDP) from outside and from a pod,
/// and a refusal.
#[test]
fn the_tc_datapath_keeps_partial_checksums_right_across_nodes() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = TwoNodes::new().expect("test bed");
    bed.agent_args = vec!["--datapath".into(), "tc".into()];
    let offload = |ns: &xlb_tests::Netns, ifname: &str, tx: &str| {
        ns.exec("ethtool", &["-K", ifname, "tx", tx, "rx", "off"]).expect("ethtool");
    };
    offload(&bed.client, "eth0", "on");
    offload(&bed.nodes[0], "eth0", "on");
    offload(&bed.nodes[0], "eth1", "off");
    offload(&bed.nodes[1], "eth0", "off");
    offload(&bed.nodes[0], "eth2", "on");
    offload(&bed.nodes[1], "eth1", "on");
    for p in &bed.pods {
        offload(&p.ns, "eth0", "on");
    }
    bed.start_servers(&testbed, &[8080], &[5353]).expect("servers");
    bed.write_manifest("far.yaml", &service("far", 90, 30090, "", POD_B)).unwrap();
    let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: default}\nspec:\n  clusterIP: 198.18.0.98\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: b-1, namespace: default, labels: {kubernetes.io/service-name: b}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\nendpoints:\n".to_string() + POD_B;
    bed.write_manifest("b.yaml", &b).unwrap();
    bed.write_manifest(
        "none.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: none, namespace: default}\nspec:\n  clusterIP: 198.18.0.97\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]\n",
    )
    .unwrap();
    bed.start_agents().expect("agents");
    let log = bed.agents[0].log_text();
    assert!(log.contains("attached the datapath at TC ingress iface=eth0"), "{log}");
    let logs = || bed.logs();

    // Node port on node-1, endpoint on node-2: DNAT at node-1's TC ingress, SNAT at its egress.
    let far = answers(&bed, "198.18.100.1:30090");
    assert_eq!(far, BTreeMap::from([(("pod-b".into(), "198.18.100.1".into()), 20)]), "{far:?}");
    // ClusterIP from the client and from pod-a, TCP and UDP, to pod-b on the other node.
    let from_client = answers(&bed, "198.18.0.98:80");
    assert_eq!(
        from_client,
        BTreeMap::from([(("pod-b".into(), "198.18.100.2".into()), 20)]),
        "{from_client:?}"
    );
    let pod_a = &bed.pods[0].ns;
    for (udp, to) in [(false, "198.18.0.98:80"), (true, "198.18.0.98:53")] {
        let r =
            requests_from(&testbed, pod_a, None, udp, to.parse().unwrap(), 20).expect("xlb-testbed request");
        let seen = tally(to, r, logs);
        assert_eq!(seen, BTreeMap::from([(("pod-b".into(), "198.18.10.2".into()), 20)]), "{to}: {seen:?}");
    }
    // A Service without endpoints: the reset and the ICMP error go back by redirect.
    xlb_tests::assert_refused_at_once(
        &bed.client,
        "198.18.0.97:80".parse().unwrap(),
        "198.18.0.97:53".parse().unwrap(),
        logs,
    );
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["egress_snat"]["packets"].as_u64().unwrap() >= 20, "{stats}");
    assert_eq!(stats["reject_no_backend"]["packets"], 2, "{stats}");
}

/// Health check node ports (issue 22): the cloud load balancer of a LoadBalancer Service with
/// externalTrafficPolicy Local probes its healthCheckNodePort on every node, as kube-proxy
/// answers it: 200 with the count of this node's ready endpoints where there are some, 503
/// where there are none, in kube-proxy's JSON; and the answers follow the pod from one node
/// to the other.
#[test]
fn health_check_node_ports_tell_the_load_balancer_which_nodes_have_endpoints() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    let lb = |endpoints: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: shop}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.18.0.98\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30098}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.18.0.99}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: lb-1, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
        )
    };
    bed.write_manifest("lb.yaml", &lb(POD_A)).unwrap();
    bed.start_agents().expect("agents");
    let probe = |node: &str| {
        bed.client.enter(|| xlb_tests::http_get_json(format!("{node}:32100").parse().unwrap(), "/"))
    };
    let (node1, node2) = ("198.18.100.1", "198.18.200.2");
    let wait_for = |node: &str, status: u16, local: u64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = probe(node);
            if let Some((s, body)) = &got
                && *s == status
                && body["localEndpoints"] == local
            {
                assert_eq!(body["service"], serde_json::json!({"namespace": "shop", "name": "lb"}), "{body}");
                assert_eq!(body["serviceProxyHealthy"], true, "{body}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node}: want {status} with {local} local endpoints, got {got:?}\n{}",
                bed.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(node1, 200, 1);
    wait_for(node2, 503, 0);
    // The pod moves to node-2: the load balancer is told to send there instead.
    bed.write_manifest("lb.yaml", &lb(POD_B)).unwrap();
    wait_for(node1, 503, 0);
    wait_for(node2, 200, 1);
    // The Service goes: its health check node port closes.
    std::fs::remove_file(bed.manifests.join("lb.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while probe(node2).is_some() {
        assert!(Instant::now() < deadline, "the health check node port stays open\n{}", bed.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// sessionAffinity ClientIP at the socket (issue 22): a node process's connections to a
/// ClusterIP with affinity (socket-level balancing, the node having no route to ClusterIPs)
/// keep one backend while they come within the timeout, and once it has passed a backend is
/// chosen anew (within a few rounds, one of them is the other pod). The client is the socket's
/// network namespace (here the node's own).
#[test]
fn socket_level_session_affinity_keeps_a_backend_for_its_timeout() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = TwoNodes::new().expect("test bed");
    let Some(cg1) = xlb_tests::socket_lb_cgroup(bed.cgroups[0].as_ref()) else {
        return;
    };
    bed.start_servers(&testbed, &[8080], &[]).expect("servers");
    let sticky = "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  clusterIP: 198.18.0.94\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n".to_string() + POD_A + POD_B;
    bed.write_manifest("sticky.yaml", &sticky).unwrap();
    bed.start_agents().expect("agents");
    let logs = || bed.logs();
    let round = |ns: &xlb_tests::Netns| -> BTreeSet<String> {
        let all = requests_from(&testbed, ns, Some(&cg1), false, "198.18.0.94:80".parse().unwrap(), 10)
            .expect("xlb-testbed request");
        tally("198.18.0.94:80", all, logs).into_keys().map(|(pod, _)| pod).collect()
    };
    // Within the timeout (each round takes well under a second): one backend, every time.
    let first = round(&bed.nodes[0]);
    assert_eq!(first.len(), 1, "one backend within the timeout: {first:?}");
    let mut seen = first.clone();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(2100));
        let r = round(&bed.nodes[0]);
        assert_eq!(r.len(), 1, "one backend within the timeout: {r:?}");
        seen.extend(r);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "after the timeout the backend is chosen anew: only ever {seen:?}");
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(0, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["sock_translated"]["packets"].as_u64().unwrap() >= 20, "at the socket: {stats}");
}
