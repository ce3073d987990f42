//! End to end over IPv6: the single-node test bed with IPv6 addresses from 2001:db8::/32 on
//! every link as well as its IPv4 ones (a dual-stack network), and a dual-stack Service as the
//! API server writes it (two clusterIPs, an IPv4 and an IPv6 EndpointSlice). The real agent
//! serves both families: TCP connections and UDP datagrams to the IPv6 clusterIP reach both pods
//! at their IPv6 addresses on targetPort, every answer comes back from the clusterIP, the pods
//! see the client's own address; the IPv4 clusterIP still reaches the pods at their IPv4
//! addresses; the node's own processes reach the IPv6 clusterIP at the socket (connect6,
//! sendmsg6, recvmsg6, getpeername6); and an endpoint removed from the IPv6 slice takes no new
//! flows.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use xlb_tests::{SingleNode, privileged, tcp_request, tcp_request_to, udp_request_sized, udp_request_to};

const VIP6: &str = "[2001:db8:1::10]";

fn manifest(v6_pods: &[usize]) -> String {
    let v6_eps: String = v6_pods
        .iter()
        .map(|i| format!("- {{addresses: [\"2001:db8:{}::2\"], conditions: {{ready: true}}}}\n", 10 + i))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: ClusterIP
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 198.18.0.10
  clusterIPs: [198.18.0.10, "2001:db8:1::10"]
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- {{addresses: ["198.18.10.2"], conditions: {{ready: true}}}}
- {{addresses: ["198.18.11.2"], conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
{v6_eps}"#
    )
}

/// 20 requests from a node process in the node's cgroup to `to` (balanced at the socket): each
/// answered on `target`, by a pod at an address of the family `ipv6` says, and reported by the
/// socket as coming from `to`. The pods that answered.
fn node_requests(
    bed: &SingleNode,
    testbed: &std::path::Path,
    cg: &std::path::Path,
    udp: bool,
    to: SocketAddr,
    target: u16,
    ipv6: bool,
) -> BTreeSet<String> {
    let answers = xlb_tests::requests_from(testbed, &bed.node, Some(cg), udp, to, 20).unwrap();
    let mut pods = BTreeSet::new();
    for a in answers {
        let a = a.unwrap_or_else(|e| panic!("a node process to {to}: {e}\n{}", bed.logs()));
        assert_eq!(a.from, to, "the socket reports the frontend it called");
        assert_eq!(a.server.port(), target);
        assert_eq!(a.server.ip().is_ipv6(), ipv6, "{a:?}");
        pods.insert(a.pod);
    }
    pods
}

/// Adds IPv6 to the bed's links: client 2001:db8:100::2 behind the node's 2001:db8:100::1,
/// pod i at 2001:db8:(10+i)::2 behind the node's ::1 on its link. `nodad`: usable at once.
fn add_ipv6(bed: &SingleNode) {
    let addr = |ns: &xlb_tests::Netns, a: &str, dev: &str| {
        ns.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"]).unwrap();
    };
    addr(&bed.client, "2001:db8:100::2/64", "eth0");
    addr(&bed.node, "2001:db8:100::1/64", "eth0");
    bed.client.ip(&["-6", "route", "add", "2001:db8::/32", "via", "2001:db8:100::1"]).unwrap();
    bed.node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    for (i, pod) in bed.pods.iter().enumerate() {
        let net = 10 + i;
        addr(&bed.node, &format!("2001:db8:{net}::1/64"), &format!("eth{}", i + 1));
        addr(&pod.ns, &format!("2001:db8:{net}::2/64"), "eth0");
        pod.ns.ip(&["-6", "route", "add", "default", "via", &format!("2001:db8:{net}::1")]).unwrap();
    }
}

/// The IPv6 bed with both pods serving TCP 8080 and UDP on `udp`, and the node's cgroup for
/// socket-level balancing (with the testbed binary); `None` (the test skips) without root or
/// cgroup v2.
fn bed_in_a_cgroup(udp: &[u16]) -> Option<(SingleNode, PathBuf, PathBuf)> {
    if !privileged("end-to-end tests need root") {
        return None;
    }
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    add_ipv6(&bed);
    let cg = xlb_tests::socket_lb_cgroup(bed.cgroup.as_ref())?;
    bed.start_servers(&testbed, &[8080], udp).expect("servers");
    Some((bed, testbed, cg))
}

/// The dual-stack bed with both pods serving TCP 8080 and UDP 5353, the dual-stack Service
/// `manifest` of both, and the agent serving its `port` ("80/TCP") on both clusterIPs.
fn dual_stack_bed(port: &str) -> SingleNode {
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    add_ipv6(&bed);
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[5353]).expect("servers");
    bed.write_manifest("web.yaml", &manifest(&[0, 1])).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service(&format!("{VIP6}:{port}"), 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service(&format!("198.18.0.10:{port}"), 2, Duration::from_secs(10)).unwrap();
    bed
}

#[test]
fn a_dual_stack_service_is_served_over_ipv6_and_ipv4() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let bed = dual_stack_bed("80/TCP");

    let client: std::net::IpAddr = "2001:db8:100::2".parse().unwrap();
    let pod6 = |i: usize| format!("2001:db8:{}::2", 10 + i);
    let check =
        |what: &str, vip: SocketAddr, target: u16, answers: Vec<anyhow::Result<xlb_tests::Answer>>| {
            let mut pods = BTreeSet::new();
            for (i, a) in answers.into_iter().enumerate() {
                let a = a.unwrap_or_else(|e| panic!("{what} {i} failed: {e:#}\n{}", bed.logs()));
                assert_eq!(a.from, vip, "{what}: answered from the clusterIP");
                assert_eq!(a.server.port(), target, "{what}: on targetPort");
                let idx: usize =
                    a.pod.trim_start_matches("pod-").chars().next().map_or(9, |c| c as usize - 'a' as usize);
                assert_eq!(
                    a.server.ip().to_string(),
                    pod6(idx),
                    "{what}: {} answered at its IPv6 address",
                    a.pod
                );
                assert_eq!(a.peer.ip(), client, "{what}: the pod sees the client's address");
                pods.insert(a.pod);
            }
            pods
        };

    let tcp: SocketAddr = format!("{VIP6}:80").parse().unwrap();
    let answers = bed.client.enter(|| (0..60).map(|_| tcp_request_to(tcp, Duration::from_secs(3))).collect());
    assert_eq!(check("TCP connection", tcp, 8080, answers).len(), 2, "both pods answer over IPv6");
    let udp: SocketAddr = format!("{VIP6}:53").parse().unwrap();
    let answers: Vec<_> =
        bed.client.enter(|| (0..40).map(|_| udp_request_to(udp, Duration::from_secs(3))).collect());
    // Each datagram comes from a fresh socket; one whose port the kernel gave an earlier one
    // again (within the flow's lifetime) is that flow's, not a new one.
    let udp_flows = answers
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(|a| a.peer.port())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    assert_eq!(check("UDP datagram", udp, 5353, answers).len(), 2);

    // The IPv4 family is served to the IPv4 endpoints.
    let v4 = "198.18.0.10:80".parse().unwrap();
    for _ in 0..10 {
        let a = bed.client.enter(|| tcp_request(v4, Duration::from_secs(3))).unwrap();
        assert!(a.server.ip().is_ipv4() && a.from == SocketAddr::from(v4), "{a:?}");
    }

    // The node's own processes (in its cgroup) reach the IPv6 clusterIP at the socket: the node
    // has no route to it, and getpeername and recvmsg report the clusterIP.
    let cg = bed
        .cgroup
        .as_ref()
        .map(|c| c.path.clone())
        .expect("a cgroup v2 hierarchy for socket-level balancing");
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    for (udp, to, target) in [(false, tcp, 8080), (true, udp, 5353)] {
        let pods = node_requests(&bed, &testbed, &cg, udp, to, target, true);
        assert_eq!(pods.len(), 2, "{to}: both pods from the node's processes");
    }

    // pod-a leaves the IPv6 slice: new IPv6 flows reach pod-b only.
    bed.write_manifest("web.yaml", &manifest(&[1])).unwrap();
    bed.wait_for_service(&format!("{VIP6}:80/TCP"), 1, Duration::from_secs(10)).unwrap();
    let answers = bed.client.enter(|| (0..20).map(|_| tcp_request_to(tcp, Duration::from_secs(3))).collect());
    assert_eq!(check("TCP after the removal", tcp, 8080, answers), ["pod-b".to_string()].into());

    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    // 60 TCP and the UDP flows over IPv6, 10 over IPv4, 20 after the removal.
    assert!(stats["dnat_new"]["packets"].as_u64().unwrap() >= 90 + udp_flows, "{stats}");
}

#[test]
fn udp_datagrams_in_fragments_reach_the_pods_whole_and_their_answers_come_back_whole() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    // 4,000 bytes over links of MTU 1,500: three fragments each way, of which only the first
    // carries the ports; the node does not reassemble them (no conntrack in its namespace).
    let bed = dual_stack_bed("53/UDP");
    for vip in ["198.18.0.10:53".to_string(), format!("{VIP6}:53")] {
        let vip: SocketAddr = vip.parse().unwrap();
        let answers = bed.client.enter(|| {
            (0..10).map(|_| udp_request_sized(vip, 4000, Duration::from_secs(3))).collect::<Vec<_>>()
        });
        for (i, a) in answers.into_iter().enumerate() {
            let (a, received) = a.unwrap_or_else(|e| panic!("datagram {i} to {vip}: {e:#}\n{}", bed.logs()));
            assert_eq!(received, 4000, "the pod received the whole datagram");
            assert_eq!(a.from, vip, "the answer, whole, comes from the clusterIP");
            assert_eq!(a.server.port(), 5353);
        }
    }
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    // Each of the 20 datagrams and of their answers has two later fragments.
    assert!(stats["frag_translated"]["packets"].as_u64().unwrap() >= 80, "{stats}");
}

/// An IPv6-only Service without endpoints is refused at once, over IPv6: a TCP reset for the
/// connect, an ICMPv6 port unreachable for the UDP datagram (ECONNREFUSED on the socket).
#[test]
fn an_ipv6_service_without_endpoints_is_refused_at_once() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    add_ipv6(&bed);
    bed.write_manifest(
        "gone.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: gone, namespace: default}\nspec:\n  ipFamilies: [IPv6]\n  clusterIP: \"2001:db8:1::40\"\n  clusterIPs: [\"2001:db8:1::40\"]\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("[2001:db8:1::40]:80/TCP", 0, Duration::from_secs(10)).unwrap();
    // The answers leave by XDP_TX: the client's veth needs an XDP program to take them at once
    // (see the IPv4 test of the same name).
    bed.client_takes_xdp_tx().expect("xdp-pass on the client");
    xlb_tests::assert_refused_at_once(
        &bed.client,
        "[2001:db8:1::40]:80".parse().unwrap(),
        "[2001:db8:1::40]:53".parse().unwrap(),
        || bed.logs(),
    );
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(stats["reject_no_backend"]["packets"], 2, "{stats}");
}

/// A dual-stack NodePort Service answers on the node's IPv6 address: its endpoint on this node
/// sees the client's address (the reply gets the node port as source at TC egress), its endpoint
/// declared on another node sees the node's address and a SNAT port, and the client hears only
/// from the node port it called.
#[test]
fn an_ipv6_node_port_serves_local_endpoints_and_snats_to_others() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    add_ipv6(&bed);
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080], &[]).expect("servers");
    bed.write_manifest(
        "np.yaml",
        r#"apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: "2001:db8:1::30"
  clusterIPs: ["2001:db8:1::30", 198.18.0.30]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-v6, namespace: default, labels: {kubernetes.io/service-name: np}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["2001:db8:10::2"], nodeName: node-1}
- {addresses: ["2001:db8:11::2"], nodeName: node-2}
"#,
    )
    .unwrap();
    bed.start_agent().expect("agent");
    let node_port: SocketAddr = "[2001:db8:100::1]:30080".parse().unwrap();
    bed.wait_for_service(&format!("{node_port}/TCP"), 2, Duration::from_secs(10))
        .map_err(|e| panic!("{e:#}\n{}", bed.logs()))
        .unwrap();
    let answers = bed
        .client
        .enter(|| (0..40).map(|_| tcp_request_to(node_port, Duration::from_secs(3))).collect::<Vec<_>>());
    let mut pods = BTreeSet::new();
    for a in answers {
        let a = a.unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs()));
        assert_eq!(a.from, node_port, "the reply comes from the node port the client called");
        match a.pod.as_str() {
            "pod-a" => {
                assert_eq!(a.peer.ip().to_string(), "2001:db8:100::2", "a local endpoint sees the client")
            }
            "pod-b" => {
                assert_eq!(
                    a.peer.ip().to_string(),
                    "2001:db8:100::1",
                    "another node's endpoint sees the node (SNAT)"
                );
                assert!(a.peer.port() >= lb_common::SNAT_PORT_MIN, "from a SNAT port: {}", a.peer);
            }
            other => panic!("answered by {other}"),
        }
        pods.insert(a.pod);
    }
    assert_eq!(pods.len(), 2, "both endpoints answer");
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["egress_snat"]["packets"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["egress_rev_nat"]["packets"].as_u64().unwrap() >= 1, "{stats}");
    // The CLI lists the IPv6 flows, the SNATed ones with the node address they leave with.
    let ct: serde_json::Value = serde_json::from_str(
        &bed.xlb_cli(&["conntrack", "--frontend", "[2001:db8:100::1]:30080", "-o", "json"]).unwrap(),
    )
    .unwrap();
    let rows = ct.as_array().unwrap();
    assert!(!rows.is_empty(), "{ct}");
    assert!(rows.iter().all(|r| r["client"].as_str().unwrap().starts_with("[2001:db8:100::2]:")), "{ct}");
    assert!(
        rows.iter().any(|r| r["snat"].as_str().is_some_and(|s| s.starts_with("[2001:db8:100::1]:"))),
        "{ct}"
    );
}

/// Socket termination over IPv6: a node process's connected UDP socket and TCP connection to the
/// IPv6 clusterIP (balanced at the socket) are destroyed when their endpoint leaves the IPv6
/// slice; the process sees one error, connects again, and from shortly after the removal every
/// request reaches the endpoint that stays.
#[test]
fn ipv6_sockets_connected_to_a_removed_endpoint_are_terminated() {
    let Some((mut bed, testbed, cg)) = bed_in_a_cgroup(&[5353]) else { return };
    bed.write_manifest("web.yaml", &manifest(&[0, 1])).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service(&format!("{VIP6}:80/TCP"), 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service(&format!("{VIP6}:53/UDP"), 2, Duration::from_secs(10)).unwrap();

    let lines = |p: &xlb_tests::Proc| xlb_tests::session_lines(&p.log_text());
    let mut sessions = Vec::new();
    for (udp, port) in [(true, 53), (false, 80)] {
        let log = bed.work.join(format!("session6-{udp}.log"));
        let to = format!("{VIP6}:{port}");
        sessions.push(xlb_tests::spawn_session(&testbed, &bed.node, &cg, udp, &to, &log).unwrap());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sessions.iter().any(|s| lines(s).len() < 10) {
        assert!(std::time::Instant::now() < deadline, "sessions did not start:\n{}", bed.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Remove pod-a from the IPv6 slice when a session uses it, else pod-b.
    let using: Vec<String> = sessions.iter().map(|s| lines(s).last().unwrap().1.clone()).collect();
    let gone = if using.iter().any(|u| u == "ok pod-a") { 0 } else { 1 };
    let stays = 1 - gone;
    let stays_name = ["pod-a", "pod-b"][stays];
    bed.write_manifest("web.yaml", &manifest(&[stays])).unwrap();
    bed.wait_for_service(&format!("{VIP6}:80/TCP"), 1, Duration::from_secs(10)).unwrap();
    bed.wait_for_service(&format!("{VIP6}:53/UDP"), 1, Duration::from_secs(10)).unwrap();
    let applied = xlb_tests::epoch_ms();
    for s in &mut sessions {
        let status = s.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "{}: {status}\n{}", s.name, s.log_text());
    }
    for (s, was) in sessions.iter().zip(&using) {
        let l = lines(s);
        let after: Vec<&(u128, String)> = l.iter().filter(|(t, _)| *t > applied + 100).collect();
        assert!(after.len() >= 10, "{}: too few requests after the removal: {l:?}", s.name);
        assert!(
            after.iter().all(|(_, r)| *r == format!("ok {stays_name}")),
            "{}: a request after the removal did not reach {stays_name}: {after:?}",
            s.name
        );
        if *was != format!("ok {stays_name}") {
            // This session's socket was on the removed pod: terminated, and connected again.
            let err = l.iter().find(|(_, r)| r.starts_with("err"));
            assert!(err.is_some_and(|(t, _)| *t >= applied.saturating_sub(1000)), "{}: {l:?}", s.name);
        }
    }
    assert!(
        bed.logs().contains("terminated sockets connected to removed backends"),
        "the agent says what it did:\n{}",
        bed.logs()
    );
}

/// IPv6 sockets calling an IPv4 clusterIP by its IPv4-mapped address (`::ffff:198.18.0.10`, as
/// dual-stack runtimes such as the JVM do by default) are balanced at the socket like IPv4 ones:
/// the node's processes reach both pods at their IPv4 addresses, by TCP and UDP, and the socket
/// reports the mapped clusterIP as its peer. The node has no route to the clusterIP.
#[test]
fn ipv6_sockets_reach_an_ipv4_cluster_ip_by_its_ipv4_mapped_address() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let testbed = PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"));
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    let Some(cg) = xlb_tests::socket_lb_cgroup(bed.cgroup.as_ref()) else { return };
    bed.start_servers(&testbed, &[8080], &[5353]).expect("servers");
    bed.write_manifest("web.yaml", &manifest(&[])).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service("198.18.0.10:53/UDP", 2, Duration::from_secs(10)).unwrap();
    for (udp, port, target) in [(false, 80, 8080), (true, 53, 5353)] {
        let to: SocketAddr = format!("[::ffff:198.18.0.10]:{port}").parse().unwrap();
        let pods = node_requests(&bed, &testbed, &cg, udp, to, target, false);
        assert_eq!(pods.len(), 2, "{to}: both pods");
    }
    // Outside the node's cgroup, the same call finds no route.
    let to: SocketAddr = "[::ffff:198.18.0.10]:80".parse().unwrap();
    let outside = xlb_tests::requests_from(&testbed, &bed.node, None, false, to, 1).unwrap();
    assert!(outside[0].is_err(), "{outside:?}");
}

/// sessionAffinity ClientIP at the socket for an IPv6 Service: a node process's connections
/// keep one backend within the timeout, and once it has passed one is chosen anew.
#[test]
fn ipv6_socket_level_session_affinity_keeps_a_backend_for_its_timeout() {
    let Some((mut bed, testbed, cg)) = bed_in_a_cgroup(&[]) else { return };
    bed.write_manifest(
        "sticky.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  ipFamilies: [IPv6]\n  clusterIP: \"2001:db8:1::20\"\n  clusterIPs: [\"2001:db8:1::20\"]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}\naddressType: IPv6\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [\"2001:db8:10::2\"]}\n- {addresses: [\"2001:db8:11::2\"]}\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("[2001:db8:1::20]:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let to: SocketAddr = "[2001:db8:1::20]:80".parse().unwrap();
    let first = node_requests(&bed, &testbed, &cg, false, to, 8080, true);
    assert_eq!(first.len(), 1, "one backend within the timeout: {first:?}");
    let mut seen = first;
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(2100));
        let r = node_requests(&bed, &testbed, &cg, false, to, 8080, true);
        assert_eq!(r.len(), 1, "one backend within the timeout: {r:?}");
        seen.extend(r);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "after the timeout the backend is chosen anew: only ever {seen:?}");
}
