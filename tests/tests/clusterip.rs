//! End to end in network namespaces: a client reaches a ClusterIP Service through a node running
//! `xlb agent`, over real TCP and UDP sockets, and the pods answer on targetPort.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf, time::Duration};

use xlb_tests::{SingleNode, privileged, tcp_request, udp_request};

fn testbed() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"))
}

const MANIFEST: &str = include_str!("../manifests/demo.yaml");

#[test]
fn clusterip_tcp_and_udp_reach_both_pods_on_target_port() {
    if !privileged("end-to-end tests need root") {
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
    if !privileged("end-to-end tests need root") {
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

/// SIGHUP makes the agent read its manifests at once: with a poll of ten minutes, a change is in
/// the maps within seconds only because of the signal.
#[test]
fn sighup_reads_the_manifests_at_once() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.agent_args = vec!["--poll-ms".into(), "600000".into()];
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let unready = MANIFEST.replace(
        "- addresses: [\"198.18.10.2\"]\n  conditions: {ready: true, serving: true, terminating: false}",
        "- addresses: [\"198.18.10.2\"]\n  conditions: {ready: false, serving: false, terminating: false}",
    );
    assert_ne!(unready, MANIFEST);
    bed.write_manifest("web.yaml", &unready).unwrap();
    // Not picked up without the signal (the poll is ten minutes away)...
    std::thread::sleep(Duration::from_secs(1));
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::ZERO).expect("changed without a signal");
    // ... and at once with it.
    bed.agent.as_ref().unwrap().signal(libc::SIGHUP);
    bed.wait_for_service("198.18.0.10:80/TCP", 1, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
    assert!(bed.agent.as_ref().unwrap().log_text().contains("SIGHUP: reading the source again"));
}

/// A LoadBalancer Service with an externalIP and a selector-less Service with hand-made
/// Endpoints: every frontend (ClusterIP, externalIP, ingress IP, and the nodePort on each of the
/// node's addresses) leads to the pods, replies come from the address the client used, the pods
/// see the client's own address, and the agent's /metrics and /readyz say so.
#[test]
fn node_port_external_and_ingress_addresses_and_hand_made_endpoints() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080, 9090], &[]).expect("servers");
    bed.write_manifest(
        "lb.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: shop, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.18.0.20\n  externalIPs: [198.18.0.21]\n  selector: {app: shop}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.0.22}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: shop-1, namespace: default, labels: {kubernetes.io/service-name: shop}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [198.18.10.2], nodeName: node-1}\n- {addresses: [198.18.11.2], nodeName: node-1}\n",
    )
    .unwrap();
    // No selector: the Endpoints are written by hand (here: pod-b's other port, standing in
    // for a database outside the cluster).
    bed.write_manifest(
        "db.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec:\n  clusterIP: 198.18.0.30\n  ports: [{name: pg, port: 5432, targetPort: 9090}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: db, namespace: default}\nsubsets:\n- addresses: [{ip: 198.18.11.2}]\n  ports: [{name: pg, port: 9090}]\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.22:80/TCP", 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service("198.18.0.30:5432/TCP", 1, Duration::from_secs(10)).unwrap();

    let client_ip = bed.client_ip;
    // The node's addresses: towards the client, and towards each pod.
    for frontend in [
        "198.18.0.20:80",
        "198.18.0.21:80",
        "198.18.0.22:80",
        "198.18.100.1:30080",
        "198.18.10.1:30080",
        "198.18.11.1:30080",
    ] {
        let to: SocketAddrV4 = frontend.parse().unwrap();
        let answers =
            bed.client.enter(|| (0..30).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
        let mut pods = std::collections::BTreeSet::new();
        for a in answers {
            let a = a.unwrap_or_else(|e| panic!("{frontend}: {e:#}\n{}", bed.logs()));
            assert_eq!(a.from, to.into(), "the reply comes from the address the client used");
            assert_eq!(a.server.port(), 8080);
            assert_eq!(a.peer.ip(), std::net::IpAddr::V4(client_ip), "{frontend}: the pod sees the client");
            pods.insert(a.pod);
        }
        assert_eq!(pods.len(), 2, "{frontend}: both pods answer");
    }
    // A new address on the node: the node port answers there too, within a poll or so.
    bed.node.ip(&["addr", "add", "198.18.100.5/24", "dev", "eth0"]).unwrap();
    let new_addr: SocketAddrV4 = "198.18.100.5:30080".parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let a = loop {
        match bed.client.enter(|| tcp_request(new_addr, Duration::from_millis(300))) {
            Ok(a) => break a,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the node port never answered on a new node address: {e:#}\n{}", bed.logs())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(a.from, new_addr.into());
    assert!(bed.agent.as_ref().unwrap().log_text().contains("the node's addresses changed"));
    let db: SocketAddrV4 = "198.18.0.30:5432".parse().unwrap();
    let a = bed.client.enter(|| tcp_request(db, Duration::from_secs(3))).expect("db");
    assert_eq!((a.pod.as_str(), a.server.port()), ("pod-b", 9090));

    // The agent's own endpoints, inside the node's namespace.
    let get = |path: &str| {
        bed.node.enter(|| {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:10249").expect("agent HTTP endpoint");
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(value("xlb_ready"), 1.0);
    assert_eq!(value("xlb_objects{kind=\"Service\"}"), 2.0);
    // shop: clusterIP, externalIP, ingress IP and 4 node addresses; db: its clusterIP.
    assert_eq!(value("xlb_frontends"), 8.0);
    assert!(value("xlb_datapath_packets_total{counter=\"egress_rev_nat\"}") >= 90.0, "{metrics}");
    assert!(value("xlb_datapath_packets_total{counter=\"dnat_new\"}") >= 91.0, "{metrics}");
    assert!(value("xlb_syncs_total{result=\"ok\"}") >= 1.0);
}

/// A Service whose endpoints are all gone is refused at once, as kube-proxy refuses it: a TCP
/// connection gets a reset (ECONNREFUSED) and a UDP datagram an ICMP port unreachable (the
/// next receive on the connected socket fails with ECONNREFUSED), both from the Service
/// address, instead of retrying into silence until a timeout. At XDP (the answer leaves by
/// XDP_TX) and at TC ingress (by redirect).
#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    refused_at_once("xdp");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_by_the_tc_datapath() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    refused_at_once("tc");
}

fn refused_at_once(datapath: &str) {
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    bed.agent_args = vec!["--datapath".into(), datapath.into()];
    bed.write_manifest(
        "gone.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: gone, namespace: default}\nspec:\n  clusterIP: 198.18.0.40\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.40:80/TCP", 0, Duration::from_secs(10)).unwrap();
    let log = bed.agent.as_ref().unwrap().log_text();
    if datapath == "xdp" {
        // The answer leaves by XDP_TX. On a veth in native XDP mode the kernel wakes the peer's
        // receive for such frames only when the peer runs an XDP program (with GRO alone they
        // wait for other traffic); a physical NIC needs nothing of the kind. The agent warns.
        assert!(log.contains("veth in native XDP mode") && log.contains("iface=eth0"), "{log}");
        bed.client_takes_xdp_tx().expect("xdp-pass on the client");
    } else {
        // By redirect from the skb: the peer needs nothing.
        assert!(log.contains("attached the datapath at TC ingress iface=eth0"), "{log}");
        assert!(!log.contains("veth in native XDP mode"), "{log}");
    }

    xlb_tests::assert_refused_at_once(
        &bed.client,
        "198.18.0.40:80".parse().unwrap(),
        "198.18.0.40:53".parse().unwrap(),
        || bed.logs(),
    );
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(stats["reject_no_backend"]["packets"], 2, "{stats}");
    // `xlb stats` says where the datapath runs.
    let text = bed.xlb_cli(&["stats"]).unwrap();
    assert!(text.starts_with(&format!("datapath: eth0 {datapath}, eth1 {datapath}")), "{text}");
}

/// externalTrafficPolicy Local: the node port leads only to the endpoint on this node (node-1),
/// the pod sees the client's own address, and the clusterIP (internalTrafficPolicy Cluster)
/// still reaches both pods, the other one being declared on node-2.
#[test]
fn external_traffic_policy_local_keeps_node_port_traffic_on_this_node() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    bed.write_manifest(
        "local.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: local, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 198.18.0.50\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [198.18.10.2], nodeName: node-1}\n- {addresses: [198.18.11.2], nodeName: node-2}\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.50:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let count = |to: &str| -> BTreeMap<String, usize> {
        let to: SocketAddrV4 = to.parse().unwrap();
        let answers =
            bed.client.enter(|| (0..30).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
        let mut per_pod = BTreeMap::new();
        for a in answers {
            let a = a.unwrap_or_else(|e| panic!("{to}: {e:#}\n{}", bed.logs()));
            assert_eq!(a.from, to.into());
            assert_eq!(a.peer.ip(), std::net::IpAddr::V4(bed.client_ip), "the pod sees the client");
            *per_pod.entry(a.pod).or_default() += 1;
        }
        per_pod
    };
    let external = count("198.18.100.1:30090");
    assert_eq!(external, BTreeMap::from([("pod-a".to_string(), 30)]), "only this node's endpoint");
    let internal = count("198.18.0.50:80");
    assert_eq!(internal.len(), 2, "the clusterIP reaches both: {internal:?}");
}

/// loadBalancerSourceRanges: a client outside them gets nothing from the LoadBalancer address
/// (its SYN is dropped), while the clusterIP still answers it; a Service whose ranges include
/// the client answers on its LoadBalancer address.
#[test]
fn load_balancer_source_ranges_keep_other_clients_out() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    let lb = |name: &str, n: u8, ranges: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.18.0.{n}\n  loadBalancerSourceRanges: [{ranges}]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 300{n}}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.18.1.{n}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [198.18.10.2]}}]\n"
        )
    };
    // The client is 198.18.100.2.
    bed.write_manifest("closed.yaml", &lb("closed", 70, "203.0.113.0/24")).unwrap();
    bed.write_manifest("open.yaml", &lb("open", 71, "198.18.100.0/24")).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.1.70:80/TCP", 1, Duration::from_secs(10)).unwrap();
    bed.wait_for_service("198.18.1.71:80/TCP", 1, Duration::from_secs(10)).unwrap();
    let req = |to: &str| bed.client.enter(|| tcp_request(to.parse().unwrap(), Duration::from_secs(1)));
    let closed = req("198.18.1.70:80");
    assert!(closed.is_err(), "a client outside the ranges is answered: {closed:?}");
    assert_eq!(req("198.18.0.70:80").expect("the clusterIP is not guarded").pod, "pod-a");
    assert_eq!(req("198.18.1.71:80").expect("a client inside the ranges").pod, "pod-a");
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["drop_source_range"]["packets"].as_u64().unwrap() >= 1, "{stats}");
    let described = bed.xlb_cli(&["describe", "service", "closed"]).unwrap();
    assert!(described.contains("LoadBalancer Source Ranges: 203.0.113.0/24"), "{described}");
}

/// A node port whose only endpoint is declared on another node (node-2; in this bed it is
/// reached through the same node): the flow is SNATed to the node address the client used, so
/// the pod sees the node, the reply comes back through the node, and the client sees it from
/// the node port it called.
#[test]
fn node_port_to_another_nodes_endpoint_is_snated_to_the_node() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    bed.write_manifest(
        "far.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: far, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 198.18.0.80\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30180}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: far-1, namespace: default, labels: {kubernetes.io/service-name: far}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [198.18.11.2], nodeName: node-2}\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.80:80/TCP", 1, Duration::from_secs(10)).unwrap();
    let log = bed.agent.as_ref().unwrap().log_text();
    assert!(log.contains("reserved the SNAT source ports"), "{log}");
    let reserved = bed.node.exec("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]).unwrap();
    assert!(reserved.contains("61000-65535"), "{reserved}");

    let to: SocketAddrV4 = "198.18.100.1:30180".parse().unwrap();
    let answers =
        bed.client.enter(|| (0..30).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
    for a in answers {
        let a = a.unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs()));
        assert_eq!(a.pod, "pod-b");
        assert_eq!(a.from, to.into(), "the reply comes from the node port the client called");
        assert_eq!(a.peer.ip().to_string(), "198.18.100.1", "the pod sees the node's address (SNAT)");
        assert!(a.peer.port() >= 61000, "from a SNAT port: {}", a.peer);
    }
    // The clusterIP is not SNATed: the pod sees the client.
    let a =
        bed.client.enter(|| tcp_request("198.18.0.80:80".parse().unwrap(), Duration::from_secs(3))).unwrap();
    assert_eq!(a.peer.ip(), std::net::IpAddr::V4(bed.client_ip));
    let ct: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["conntrack", "-o", "json"]).unwrap()).unwrap();
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|r| r["snat"].as_str().is_some_and(|s| s.starts_with("198.18.100.1:"))),
        "{ct}"
    );
}

/// With `--service-cidr`, a client connecting to the ClusterIP of a Service that was deleted
/// gets a reset at once (ECONNREFUSED), and a UDP datagram an ICMP port unreachable, instead of
/// the packet being routed out of the node (here: "no route to host"; on a node with a default
/// route, a hang until timeout). A node process is refused at the socket the same way.
#[test]
fn a_deleted_services_cluster_ip_is_refused_at_once_within_the_service_range() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    bed.agent_args = vec!["--service-cidr".into(), "198.18.0.0/24".into()];
    bed.write_manifest(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 198.18.0.41\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]\nendpoints: [{addresses: [198.18.10.2]}]\n",
    )
    .unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.41:80/TCP", 1, Duration::from_secs(10)).unwrap();
    bed.client_takes_xdp_tx().expect("xdp-pass on the client");
    let vip: std::net::SocketAddrV4 = "198.18.0.41:80".parse().unwrap();
    bed.client.enter(|| tcp_request(vip, Duration::from_secs(2))).expect("served while the Service exists");

    // The Service is deleted.
    std::fs::remove_file(bed.manifests.join("web.yaml")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bed.xlb_cli(&["services"]).unwrap().contains("198.18.0.41") {
        assert!(std::time::Instant::now() < deadline, "the Service is still in the maps");
        std::thread::sleep(Duration::from_millis(50));
    }
    xlb_tests::assert_refused_at_once(&bed.client, vip.into(), "198.18.0.41:53".parse().unwrap(), || {
        bed.logs()
    });
    let stats: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(stats["reject_no_service"]["packets"], 2, "{stats}");
    assert_eq!(stats["reject_no_backend"]["packets"], 0, "{stats}");

    // A process of the node, balanced at the socket: refused at connect.
    if let Some(cg) = xlb_tests::socket_lb_cgroup(bed.cgroup.as_ref()) {
        let r = xlb_tests::requests_from(&testbed(), &bed.node, Some(&cg), false, vip.into(), 1).unwrap();
        let err = r[0].as_ref().expect_err("refused");
        assert!(err.contains("refused"), "{err}");
        let stats: serde_json::Value =
            serde_json::from_str(&bed.xlb_cli(&["stats", "-o", "json"]).unwrap()).unwrap();
        assert_eq!(stats["sock_refused"]["packets"], 1, "{stats}");
    }
}

/// What kube-proxy leaves alone, xlb leaves alone (issue 22): a LoadBalancer ingress IP whose
/// ipMode is Proxy belongs to a load balancer that proxies to the nodes, so a node does not
/// answer for it (the ipMode VIP one beside it is served); a Service labelled
/// service.kubernetes.io/service-proxy-name is another proxy's, until an agent started with
/// `--service-proxy-name` of that value serves it (and then only it).
#[test]
fn ingress_ips_in_proxy_mode_and_services_of_another_proxy_are_not_served() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    bed.write_manifest(
        "lb.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 198.18.0.50\n  ports: [{port: 80, targetPort: 8080, nodePort: 30050}]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.0.51, ipMode: VIP}, {ip: 198.18.0.52, ipMode: Proxy}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [198.18.10.2], nodeName: node-1}\n",
    )
    .unwrap();
    bed.write_manifest(
        "other.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default, labels: {service.kubernetes.io/service-proxy-name: xlb-b}}\nspec:\n  clusterIP: 198.18.0.53\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: other-1, namespace: default, labels: {kubernetes.io/service-name: other, service.kubernetes.io/service-proxy-name: xlb-b}}\naddressType: IPv4\nports: [{port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [198.18.10.2], nodeName: node-1}\n",
    )
    .unwrap();
    let answers = |bed: &SingleNode, to: &str| {
        let to: SocketAddrV4 = to.parse().unwrap();
        bed.client.enter(|| tcp_request(to, Duration::from_millis(800))).is_ok()
    };
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.51:80/TCP", 1, Duration::from_secs(10)).unwrap();
    assert!(answers(&bed, "198.18.0.50:80"), "the clusterIP\n{}", bed.logs());
    assert!(answers(&bed, "198.18.0.51:80"), "the ingress IP in VIP mode\n{}", bed.logs());
    assert!(!answers(&bed, "198.18.0.52:80"), "the ingress IP in Proxy mode is the load balancer's");
    assert!(!answers(&bed, "198.18.0.53:80"), "another proxy's Service");
    let listed = bed.xlb_cli(&["get", "services"]).unwrap();
    assert!(!listed.contains("198.18.0.52") && !listed.contains("other"), "{listed}");

    // The same node with an agent for xlb-b: its Service only.
    drop(bed.agent.take());
    bed.agent_args.push("--service-proxy-name=xlb-b".into());
    bed.start_agent().expect("agent for xlb-b");
    bed.wait_for_service("198.18.0.53:80/TCP", 1, Duration::from_secs(10)).unwrap();
    assert!(answers(&bed, "198.18.0.53:80"), "its own Service\n{}", bed.logs());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while answers(&bed, "198.18.0.50:80") {
        assert!(std::time::Instant::now() < deadline, "the unlabelled Service is not the named agent's");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node health server that load balancers probe, as kube-proxy's on port 10256: from
/// outside the node, 503 with kube-proxy's JSON body while no sync has succeeded (here the
/// Services do not fit the service map), 200 once one has.
#[test]
fn the_node_health_server_answers_503_until_a_sync_succeeds_then_200() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    let services = |n: usize| -> String {
        (0..n)
            .map(|i| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  clusterIP: 198.18.0.{}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [198.18.10.2], nodeName: node-1}}\n", 100 + i))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    bed.write_manifest("s.yaml", &services(20)).unwrap();
    bed.agent_args.extend(["--max-service-entries".to_string(), "16".to_string()]);
    bed.start_agent().expect("agent");
    let probe = |bed: &SingleNode, path: &str| {
        bed.client.enter(|| xlb_tests::http_get_json("198.18.100.1:10256".parse().unwrap(), path))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        // The agent is up (it logged its first, failed, sync) and its server answers.
        let failed_once = bed.agent.as_ref().unwrap().log_text().contains("too small")
            || bed.logs().contains("initial sync failed");
        if failed_once && let Some(r) = probe(&bed, "/healthz") {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no answer on 10256\n{}", bed.logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "no sync has succeeded: {body}\n{}", bed.logs());
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert!(body["currentTime"].as_str().is_some_and(|t| t.ends_with(" +0000 UTC")), "{body}");

    // Services that fit: the sync succeeds, and the node is healthy.
    bed.write_manifest("s.yaml", &services(2)).unwrap();
    bed.wait_for_service("198.18.0.101:80/TCP", 1, Duration::from_secs(10)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match probe(&bed, "/healthz") {
            Some((200, body)) => {
                assert_eq!(body["nodeEligible"], true);
                assert!(
                    body["lastUpdated"].as_str().unwrap() <= body["currentTime"].as_str().unwrap(),
                    "{body}"
                );
                break;
            }
            other => assert!(std::time::Instant::now() < deadline, "{other:?}\n{}", bed.logs()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(probe(&bed, "/livez").map(|r| r.0), Some(200));
}

/// EndpointSlice topology hints (trafficDistribution PreferClose, topology-aware routing), as
/// kube-proxy honours them: on a node of zone a (`--node-zone`, as the Node's label gives it
/// from the API server), while every endpoint is hinted and one is for zone a, the clusterIP
/// reaches that one only; once an endpoint has no hint, every endpoint.
#[test]
fn topology_hints_keep_a_clients_traffic_in_its_zone_while_every_endpoint_is_hinted() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).expect("servers");
    let manifest = |b_hint: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 198.18.0.60\n  trafficDistribution: PreferClose\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [198.18.10.2], nodeName: node-2, hints: {{forZones: [{{name: a}}]}}}}\n- {{addresses: [198.18.11.2], nodeName: node-3{b_hint}}}\n"
        )
    };
    bed.write_manifest("web.yaml", &manifest(", hints: {forZones: [{name: b}]}")).unwrap();
    bed.agent_args.extend(["--node-zone".to_string(), "a".to_string()]);
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.60:80/TCP", 2, Duration::from_secs(10)).unwrap();
    let vip: SocketAddrV4 = "198.18.0.60:80".parse().unwrap();
    let pods = |bed: &SingleNode| -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for a in
            bed.client.enter(|| (0..30).map(|_| tcp_request(vip, Duration::from_secs(3))).collect::<Vec<_>>())
        {
            *seen.entry(a.unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs())).pod).or_insert(0) += 1;
        }
        seen
    };
    assert_eq!(pods(&bed), BTreeMap::from([("pod-a".to_string(), 30)]), "zone a's endpoint only");
    // pod-b loses its hint: the hints are not used, every endpoint is.
    bed.write_manifest("web.yaml", &manifest("")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = pods(&bed);
        if seen.len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {seen:?}\n{}", bed.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An SCTP one-to-one socket (RFC 6458's TCP-like style), or why there is none.
fn sctp_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the descriptor is owned by the returned value.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a valid socket and option of the size given.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    Ok(fd)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// Checks the return value of a libc call.
fn ok(rc: isize, what: &str) -> std::io::Result<usize> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc as usize)
}

/// Where the kernel has SCTP: an association through a ClusterIP to the pod's targetPort, a
/// message each way. These machines' kernels have none (socket() fails with
/// EPROTONOSUPPORT): the test says so and stops, and the packet tests prove the translation.
#[test]
fn sctp_through_a_cluster_ip_end_to_end_where_the_kernel_has_sctp() {
    use std::os::fd::AsRawFd;
    if !privileged("netns tests need root") {
        return;
    }
    if let Err(e) = sctp_socket() {
        eprintln!(
            "skipped: this kernel has no SCTP sockets (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e})"
        );
        return;
    }
    let mut bed = SingleNode::new(&["pod-a"]).unwrap();
    let pod = SocketAddrV4::new(bed.pods[0].ip, 13868);
    bed.write_manifest(
        "sctp.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: sig, namespace: default}}\nspec:\n  clusterIP: 198.18.0.60\n  ports: [{{port: 3868, targetPort: 13868, protocol: SCTP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sig-1, namespace: default, labels: {{kubernetes.io/service-name: sig}}}}\naddressType: IPv4\nports: [{{port: 13868, protocol: SCTP}}]\nendpoints: [{{addresses: [{}], nodeName: node-1}}]\n",
            pod.ip()
        ),
    )
    .unwrap();
    bed.start_agent().unwrap();
    bed.wait_for_service("198.18.0.60:3868/SCTP", 1, Duration::from_secs(10)).unwrap();

    // The pod listens on its port; the socket keeps the pod's namespace on any thread.
    let listener = bed.pods[0]
        .ns
        .enter(|| -> std::io::Result<_> {
            let s = sctp_socket()?;
            let a = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 13868));
            // SAFETY: a valid socket and address of the size given.
            ok(
                unsafe {
                    libc::bind(
                        s.as_raw_fd(),
                        (&a as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                } as isize,
                "bind",
            )?;
            // SAFETY: as above.
            ok(unsafe { libc::listen(s.as_raw_fd(), 4) } as isize, "listen")?;
            Ok(s)
        })
        .unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        // SAFETY: a listening socket; the peer's address is not asked for.
        let c = ok(
            unsafe { libc::accept(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) }
                as isize,
            "accept",
        )?;
        let mut buf = [0u8; 64];
        // SAFETY: a connected socket and a buffer of the size given.
        let n = ok(unsafe { libc::read(c as i32, buf.as_mut_ptr().cast(), buf.len()) }, "read")?;
        let reply = [b"echo:".as_slice(), &buf[..n]].concat();
        // SAFETY: as above.
        ok(unsafe { libc::write(c as i32, reply.as_ptr().cast(), reply.len()) }, "write")?;
        // SAFETY: the accepted descriptor, closed once.
        unsafe { libc::close(c as i32) };
        Ok(buf[..n].to_vec())
    });
    let answer = bed
        .client
        .enter(|| -> std::io::Result<Vec<u8>> {
            let s = sctp_socket()?;
            let a = sockaddr("198.18.0.60:3868".parse().unwrap());
            // SAFETY: a valid socket and address of the size given.
            ok(
                unsafe {
                    libc::connect(
                        s.as_raw_fd(),
                        (&a as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                } as isize,
                "connect to the ClusterIP",
            )?;
            // SAFETY: a connected socket and buffers of the sizes given.
            ok(unsafe { libc::write(s.as_raw_fd(), b"hello".as_ptr().cast(), 5) }, "write")?;
            let mut buf = [0u8; 64];
            // SAFETY: as above.
            let n = ok(unsafe { libc::read(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }, "read")?;
            Ok(buf[..n].to_vec())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
    assert_eq!(server.join().unwrap().unwrap(), b"hello");
    assert_eq!(answer, b"echo:hello", "the pod's answer, from the ClusterIP");
    let flows = bed.xlb_cli(&["conntrack"]).unwrap();
    assert!(flows.contains("SCTP"), "{flows}");
}
