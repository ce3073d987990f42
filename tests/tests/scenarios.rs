//! The documented ways of exposing a Service, end to end on a cluster in network namespaces:
//! a client outside, two nodes each running its own `xlb agent` from the same objects (as from
//! one API server), pods behind the nodes, and a host outside the cluster. One test per
//! scenario of issue 7; each fails if the behaviour it names breaks.
//!
//! Needs root. Without it the tests skip, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where they fail.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use xlb_tests::{Answer, Netns, Proc, TwoNodes, privileged, requests_from, tcp_request};

fn testbed() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed"))
}

fn slice(svc: &str, name: &str, port_name: &str, port: u16, endpoints: &[(&str, &str)]) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints:\n{}\n---\n",
        eps.join("\n")
    )
}

const POD_A: (&str, &str) = ("198.18.10.2", "node-1");
const POD_B: (&str, &str) = ("198.18.20.2", "node-2");

/// `n` TCP requests from a thread in `ns` (through the packet path): the pods that answered.
fn from_ns(ns: &Netns, to: &str, n: usize) -> Vec<Answer> {
    let to: SocketAddrV4 = to.parse().unwrap();
    ns.enter(|| (0..n).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>())
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{to}: {e:#}")))
        .collect()
}

/// `n` TCP requests from a process of node `i` (balanced at the socket, in its cgroup).
fn from_node(bed: &TwoNodes, i: usize, to: &str, n: usize) -> Vec<Answer> {
    let cg = bed.cgroups[i].as_ref().expect("cgroup v2 for socket-level balancing").path.clone();
    requests_from(&testbed(), &bed.nodes[i], Some(&cg), false, to.parse().unwrap(), n)
        .expect("xlb-testbed request")
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{to} from node-{}: {e}\n{}", i + 1, bed.logs())))
        .collect()
}

fn pods(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.pod.clone()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `xlb services -o json` rows of node `i` for Service `name`.
fn rows(bed: &TwoNodes, i: usize, name: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&bed.xlb_cli(i, &["services", "-o", "json"]).unwrap()).unwrap();
    v.as_array().unwrap().iter().filter(|r| r["name"] == name).cloned().collect()
}

#[test]
fn s1_cluster_ip_port_80_to_8080_on_two_nodes_from_a_pod_and_from_a_node() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    bed.write_manifest(
        "web.yaml",
        &("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  clusterIP: 198.18.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n".to_string()
            + &slice("web", "web-1", "http", 8080, &[POD_A, POD_B])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    // From pod-b on node-2: through node-2's datapath, to both pods, each seeing pod-b.
    let a = from_ns(&bed.pods[1].ns, "198.18.0.10:80", 30);
    assert_eq!(pods(&a), set(&["pod-a", "pod-b"]));
    assert!(a.iter().all(|a| a.server.port() == 8080 && a.from == "198.18.0.10:80".parse().unwrap()));
    // From a process of node-1.
    let a = from_node(&bed, 0, "198.18.0.10:80", 30);
    assert_eq!(pods(&a), set(&["pod-a", "pod-b"]));
}

#[test]
fn s2_node_port_nginx_service_on_every_nodes_address_even_without_a_local_pod() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::with_pods(&[("nginx-1", 0)], false).expect("test bed");
    bed.start_servers(&testbed(), &[80], &[]).unwrap();
    bed.write_manifest(
        "nginx.yaml",
        &("apiVersion: v1\nkind: Service\nmetadata: {name: nginx-service, namespace: default}\nspec:\n  type: NodePort\n  selector: {app: nginx}\n  clusterIP: 198.18.0.11\n  ports: [{port: 30080, targetPort: 80, nodePort: 30001}]\n---\n".to_string()
            + &slice("nginx-service", "nginx-1", "", 80, &[POD_A])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    // node-1 has the pod; node-2 (198.18.200.2) has none and sends on to node-1's pod.
    for node in ["198.18.100.1:30001", "198.18.200.2:30001"] {
        let a = from_ns(&bed.client, node, 10);
        assert_eq!(pods(&a), set(&["nginx-1"]), "{node}");
        assert!(a.iter().all(|a| a.from == node.parse().unwrap() && a.server.port() == 80), "{node}: {a:?}");
    }
    // The Service's own port (30080) on its ClusterIP, from a process of node-2.
    assert_eq!(pods(&from_node(&bed, 1, "198.18.0.11:30080", 5)), set(&["nginx-1"]));
}

#[test]
fn s3_node_port_as_kubectl_expose_makes_it_and_one_left_to_allocation() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    let svc = |name: &str, ip: &str, node_port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  selector: {{app: {name}}}\n  clusterIP: {ip}\n  ports: [{{port: 80, protocol: TCP, targetPort: 8080{node_port}}}]\n---\n"
        )
    };
    bed.write_manifest(
        "exposed.yaml",
        &(svc("exposed", "198.18.0.12", ", nodePort: 30080")
            + &slice("exposed", "exposed-1", "", 8080, &[POD_A, POD_B])),
    )
    .unwrap();
    bed.write_manifest(
        "auto.yaml",
        &(svc("auto", "198.18.0.13", "") + &slice("auto", "auto-1", "", 8080, &[POD_B])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    assert_eq!(pods(&from_ns(&bed.client, "198.18.100.1:30080", 30)), set(&["pod-a", "pod-b"]));
    // The allocated node port: the same on both nodes, in the range, and served.
    let np = |i| rows(&bed, i, "auto")[0]["node_port"].as_u64().expect("an allocated nodePort");
    let (np1, np2) = (np(0), np(1));
    assert_eq!(np1, np2, "both nodes allocate the same node port");
    assert!((30000..=32767).contains(&np1) && np1 != 30080, "{np1}");
    for node in ["198.18.100.1", "198.18.200.2"] {
        assert_eq!(pods(&from_ns(&bed.client, &format!("{node}:{np1}"), 5)), set(&["pod-b"]));
    }
    // Each agent says which Service got which node port, and `xlb describe` shows it.
    let said = format!("service=default/auto port=80 protocol=TCP node_port={np1}");
    let logs = bed.logs();
    assert_eq!(
        logs.lines().filter(|l| l.contains("assigned a node port") && l.contains(&said)).count(),
        2,
        "{logs}"
    );
    for i in 0..2 {
        let d = bed.xlb_cli(i, &["describe", "service", "auto"]).unwrap();
        assert!(d.lines().any(|l| l.starts_with("NodePort:") && l.contains(&format!("{np1}/TCP"))), "{d}");
    }
}

#[test]
fn s4_service_without_selector_mysql_production_reaches_a_fixed_outside_address() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::with_pods(&[("pod-a", 0), ("pod-b", 1)], true).expect("test bed");
    bed.start_outside_server(&testbed(), &[3306]).unwrap();
    // No selector: hand-made Endpoints (core/v1), as the documentation's example.
    bed.write_manifest(
        "mysql.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: mysql-production, namespace: default}\nspec:\n  clusterIP: 198.18.0.14\n  ports: [{port: 3306, protocol: TCP}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: mysql-production, namespace: default}\nsubsets:\n- addresses: [{ip: 198.18.50.2}]\n  ports: [{port: 3306}]\n",
    )
    .unwrap();
    bed.start_agents().unwrap();
    // From a pod on each node (packet path) and from node-2's processes (socket level).
    for pod in 0..2 {
        let a = from_ns(&bed.pods[pod].ns, "198.18.0.14:3306", 5);
        assert_eq!(pods(&a), set(&["db"]));
        assert!(a.iter().all(|a| a.peer.ip() == bed.pods[pod].ip), "the database sees the pod: {a:?}");
    }
    assert_eq!(pods(&from_node(&bed, 1, "198.18.0.14:3306", 5)), set(&["db"]));
}

#[test]
fn s5_load_balancer_ingress_ip_is_served_by_the_nodes() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    bed.write_manifest(
        "lb.yaml",
        &("apiVersion: v1\nkind: Service\nmetadata: {name: shop, namespace: default}\nspec:\n  type: LoadBalancer\n  selector: {app: shop}\n  clusterIP: 198.18.0.15\n  ports: [{port: 80, targetPort: 8080, nodePort: 30015}]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.1.15}]}}\n---\n".to_string()
            + &slice("shop", "shop-1", "", 8080, &[POD_A, POD_B])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    // The client's route sends the ingress IP to node-1, as a load balancer would.
    let a = from_ns(&bed.client, "198.18.1.15:80", 30);
    assert_eq!(pods(&a), set(&["pod-a", "pod-b"]));
    assert!(a.iter().all(|a| a.from == "198.18.1.15:80".parse().unwrap()));
    // And its node port, on either node.
    assert_eq!(pods(&from_ns(&bed.client, "198.18.200.2:30015", 20)), set(&["pod-a", "pod-b"]));
}

#[test]
fn s6_external_name_has_no_datapath_and_the_cli_shows_it() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.write_manifest(
        "db.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: my-database, namespace: prod}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n",
    )
    .unwrap();
    bed.start_agents().unwrap();
    for i in 0..2 {
        let r = rows(&bed, i, "my-database");
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0]["type"].as_str(), r[0]["external_name"].as_str()),
            (Some("ExternalName"), Some("db.example.com"))
        );
        assert!(
            r[0]["frontend"].is_null() && r[0]["backends"].as_array().unwrap().is_empty(),
            "no datapath: {r:?}"
        );
        let table = bed.xlb_cli(i, &["get", "services"]).unwrap();
        assert!(table.contains("my-database") && table.contains("db.example.com"), "{table}");
    }
}

#[test]
fn s7_named_target_port_served_on_different_container_ports() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    // Both pods name their port "web": 8080 in pod-a, 9090 in pod-b.
    bed.start_server_in(&testbed(), "pod-a", &[8080], &[]).unwrap();
    bed.start_server_in(&testbed(), "pod-b", &[9090], &[]).unwrap();
    bed.write_manifest(
        "web.yaml",
        &("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  clusterIP: 198.18.0.17\n  ports: [{name: http, port: 80, targetPort: web}]\n---\n".to_string()
            + &slice("web", "web-a", "http", 8080, &[POD_A])
            + &slice("web", "web-b", "http", 9090, &[POD_B])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    let a = from_ns(&bed.client, "198.18.0.17:80", 30);
    let by_pod: BTreeMap<String, u16> = a.iter().map(|a| (a.pod.clone(), a.server.port())).collect();
    assert_eq!(by_pod, BTreeMap::from([("pod-a".into(), 8080), ("pod-b".into(), 9090)]));
}

#[test]
fn s8_host_port_is_served_on_its_pods_node_only() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    // pod-a on node-1 exposes its container port 8080 on hostPort 8081 (no Service at all).
    bed.write_manifest(
        "pod-a.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: pod-a, namespace: default}\nspec:\n  nodeName: node-1\n  containers:\n  - name: web\n    image: web\n    ports: [{containerPort: 8080, hostPort: 8081}]\nstatus: {podIP: 198.18.10.2, phase: Running}\n",
    )
    .unwrap();
    bed.start_agents().unwrap();
    // From outside, on node-1's address: the pod answers and sees the client itself.
    let a = from_ns(&bed.client, "198.18.100.1:8081", 20);
    assert_eq!(pods(&a), set(&["pod-a"]));
    assert!(a.iter().all(|a| a.peer.ip() == bed.client_ip && a.from == "198.18.100.1:8081".parse().unwrap()));
    // node-2 runs no such pod: nothing listens there.
    let r = bed.client.enter(|| tcp_request("198.18.200.2:8081".parse().unwrap(), Duration::from_secs(2)));
    assert!(r.is_err(), "node-2 must not serve pod-a's hostPort: {r:?}");
    // From a process of node-1 (socket level), at its own address.
    assert_eq!(pods(&from_node(&bed, 0, "198.18.100.1:8081", 5)), set(&["pod-a"]));
    // The CLI shows it on node-1 only.
    let hp = rows(&bed, 0, "pod-a");
    assert!(!hp.is_empty() && hp.iter().all(|r| r["type"] == "HostPort" && r["port"] == 8081), "{hp:?}");
    assert!(rows(&bed, 1, "pod-a").is_empty(), "node-2 serves no hostPort");
}

#[test]
fn s9_endpoints_follow_pods_within_a_second() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::with_pods(&[("pod-a", 0), ("pod-b", 1), ("pod-c", 1)], false).expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  clusterIP: 198.18.0.19\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n";
    let eps = |list: &[(&str, &str, bool)]| {
        let e: Vec<String> = list
            .iter()
            .map(|(ip, node, ready)| {
                format!("- {{addresses: [{ip}], nodeName: {node}, conditions: {{ready: {ready}}}}}")
            })
            .collect();
        format!(
            "{svc}apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{}\n",
            e.join("\n")
        )
    };
    let (a, b, c) = (("198.18.10.2", "node-1"), ("198.18.20.2", "node-2"), ("198.18.21.2", "node-2"));
    bed.write_manifest("web.yaml", &eps(&[(a.0, a.1, true), (b.0, b.1, true)])).unwrap();
    bed.start_agents().unwrap();
    // Until `want` answers every one of 20 requests from the client (through node-1, whose
    // node-2 endpoints are reached without SNAT: a ClusterIP): how long it took.
    // A connection racing with its endpoint's deletion may be reset (as with kube-proxy): only
    // the answers count here.
    let follow = |want: &[&str]| -> Duration {
        let started = Instant::now();
        let to: SocketAddrV4 = "198.18.0.19:80".parse().unwrap();
        loop {
            let answers = bed
                .client
                .enter(|| (0..20).map(|_| tcp_request(to, Duration::from_secs(3))).collect::<Vec<_>>());
            let got: BTreeSet<String> = answers.into_iter().filter_map(|a| a.ok().map(|a| a.pod)).collect();
            if got == set(want) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "never only {want:?}: {got:?}\n{}",
                bed.logs()
            );
        }
    };
    follow(&["pod-a", "pod-b"]);
    // pod-b turns unready.
    bed.write_manifest("web.yaml", &eps(&[(a.0, a.1, true), (b.0, b.1, false)])).unwrap();
    let t = follow(&["pod-a"]);
    assert!(t < Duration::from_secs(1), "unready pod-b still got traffic after {t:?}");
    // pod-b is deleted, pod-c appears (on node-2) and turns ready.
    bed.write_manifest("web.yaml", &eps(&[(a.0, a.1, true), (c.0, c.1, true)])).unwrap();
    let t = follow(&["pod-a", "pod-c"]);
    assert!(t < Duration::from_secs(1), "pod-c got traffic only after {t:?}");
}

#[test]
fn s10_an_agent_restarted_on_one_node_while_traffic_flows_through_it() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = TwoNodes::new().expect("test bed");
    bed.start_servers(&testbed(), &[8080], &[]).unwrap();
    // A node port on node-1 whose only endpoint is on node-2 (SNATed), and a ClusterIP.
    bed.write_manifest(
        "far.yaml",
        &("apiVersion: v1\nkind: Service\nmetadata: {name: far, namespace: default}\nspec:\n  type: NodePort\n  selector: {app: far}\n  clusterIP: 198.18.0.20\n  ports: [{port: 80, targetPort: 8080, nodePort: 30020}]\n---\n".to_string()
            + &slice("far", "far-1", "", 8080, &[POD_B])),
    )
    .unwrap();
    bed.start_agents().unwrap();
    // Two clients opening a connection every 10 ms for about 3 s, as processes of their own.
    let mut clients = Vec::new();
    for to in ["198.18.100.1:30020", "198.18.0.20:80"] {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &bed.client.name]).arg(testbed()).args([
            "request",
            "--tcp",
            to,
            "--count",
            "250",
            "--interval-ms",
            "10",
        ]);
        let log = bed.work.join(format!("client-{}.log", to.replace([':', '.'], "_")));
        clients.push(Proc::spawn(&format!("client of {to}"), &mut cmd, Some(&log)).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    // node-1's agent stops (SIGTERM) and starts again while they run.
    bed.stop_agent(0);
    std::thread::sleep(Duration::from_millis(500));
    bed.start_agent(0).expect("node-1's agent restarted");
    for c in &mut clients {
        c.wait_exit(Duration::from_secs(30)).unwrap();
        let log = c.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let failed: Vec<&&str> = lines.iter().filter(|l| !l.starts_with("ok pod-b ")).collect();
        assert_eq!(lines.len(), 250, "{}: {log}", c.name);
        assert!(
            failed.is_empty(),
            "{}: {} of 250 failed or strayed: {failed:?}\nnode-1 stats:\n{}\nnode-2 stats:\n{}\n{}",
            c.name,
            failed.len(),
            bed.xlb_cli(0, &["stats"]).unwrap_or_default(),
            bed.xlb_cli(1, &["stats"]).unwrap_or_default(),
            bed.logs()
        );
    }
    let log = bed.agents.iter().find(|a| a.name.ends_with("node-1")).unwrap().log_text();
    assert!(
        log.contains("replaced the program of the pinned link"),
        "the new agent took the links over: {log}"
    );
}
