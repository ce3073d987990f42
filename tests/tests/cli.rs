//! The CLI on a running datapath with the agent stopped: real connections go through the attached
//! XDP program, the agent is stopped (the program stays attached, the maps pinned), and every
//! command still reads the node. `xlb trace` reports the backend and rewrite the attached program
//! gave the real connection, predicts where a new connection to a one-backend Service goes, and
//! leaves conntrack, flow counts and translation counters as they were.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    time::Duration,
};

use serde_json::Value;
use xlb_tests::{SingleNode, privileged, tcp_request};

const MANIFEST: &str = include_str!("../manifests/demo.yaml");

/// `solo`: ClusterIP 198.18.0.11:443 to pod-b (198.18.11.2) on 8443, the only endpoint.
const SOLO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: default}
spec:
  clusterIP: 198.18.0.11
  ports: [{name: https, port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: solo-1, namespace: default, labels: {kubernetes.io/service-name: solo}}
addressType: IPv4
ports: [{name: https, port: 8443, protocol: TCP}]
endpoints: [{addresses: ["198.18.11.2"], conditions: {ready: true}}]
"#;

fn json(bed: &SingleNode, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = bed.xlb_cli(&a).unwrap_or_else(|e| panic!("xlb {args:?}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("xlb {args:?} printed no JSON ({e}): {out}"))
}

/// What a trace must not change: every tracked flow (without its age, which moves with the
/// clock), every backend's flow counts, and the counters of translated and dropped packets
/// (`rx` and `pass_*` also count the namespaces' own ARP and IPv6 chatter, so they are left out).
fn live_state(bed: &SingleNode) -> (Value, Value, Vec<(String, Value)>) {
    let mut ct = json(bed, &["conntrack"]);
    for row in ct.as_array_mut().unwrap() {
        row.as_object_mut().unwrap().remove("age_seconds");
        row.as_object_mut().unwrap().remove("idle_seconds");
    }
    let stats = json(bed, &["stats"]);
    let counters = stats
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| !(name.as_str() == "rx" || name.starts_with("pass_")))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    (ct, json(bed, &["backends"]), counters)
}

#[test]
fn the_cli_reads_and_traces_the_datapath_with_the_agent_stopped() {
    if !privileged("end-to-end tests need root") {
        return;
    }
    let mut bed = SingleNode::new(&["pod-a", "pod-b"]).expect("test bed");
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080, 8443], &[])
        .expect("servers");
    bed.write_manifest("web.yaml", MANIFEST).unwrap();
    bed.write_manifest("solo.yaml", SOLO).unwrap();
    bed.start_agent().expect("agent");
    bed.wait_for_service("198.18.0.10:80/TCP", 2, Duration::from_secs(10)).unwrap();
    bed.wait_for_service("198.18.0.11:443/TCP", 1, Duration::from_secs(10)).unwrap();

    // A real connection through the attached program; the client keeps its address and port.
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
    let (client, pod, server) = bed.client.enter(|| {
        let mut s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"hello\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("answer");
        let mut it = line.split_whitespace();
        let (pod, server) = (it.next().unwrap().to_string(), it.next().unwrap().to_string());
        (s.local_addr().unwrap().to_string(), pod, server)
    });
    // Let the connection's close finish, so that no packet of it moves the state below.
    std::thread::sleep(Duration::from_millis(500));

    // Stop the agent: the program stays attached and the maps pinned.
    let mut agent = bed.agent.take().expect("agent");
    agent.stop(Duration::from_secs(5));
    assert!(agent.log_text().contains("the program stays attached"), "{}", agent.log_text());

    // Every listing reads the node without the agent.
    let services = json(&bed, &["get", "services"]);
    let frontends: Vec<&str> =
        services.as_array().unwrap().iter().filter_map(|r| r["frontend"].as_str()).collect();
    assert!(
        frontends.contains(&"198.18.0.10:80/TCP") && frontends.contains(&"198.18.0.11:443/TCP"),
        "{services}"
    );
    let table = bed.xlb_cli(&["get", "services"]).unwrap();
    assert!(table.contains("198.18.0.10:80/TCP") && table.contains("web:http"), "{table}");
    let described = bed.xlb_cli(&["describe", "service", "default/web"]).unwrap();
    assert!(described.contains("IP:                       198.18.0.10"), "{described}");
    assert!(described.contains("TargetPort:               8080"), "{described}");
    let flows = json(&bed, &["conntrack", "--client", &client]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0]["backend"], server.as_str(), "conntrack names the pod that answered ({pod})");
    assert_eq!(flows[0]["service"], "default/web:http");
    let backends = json(&bed, &["backends"]);
    let mine = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]) == server)
        .unwrap();
    assert!(
        mine["new_flows"].as_u64().unwrap() >= 1 && mine["active_flows"].as_u64().unwrap() >= 1,
        "{mine}"
    );
    assert!(bed.xlb_cli(&["stats"]).unwrap().contains("dnat_new"));

    let before = live_state(&bed);

    // The tracked flow: same backend, same rewrite as the real connection got. The packet is
    // traced as arriving on the node's eth0, from inside the node's namespace.
    let pin = bed.pin_dir.display().to_string();
    let trace = |args: &[&str]| -> Value {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", bed.node.path().display())).arg(&bed.xlb).args([
            "--pin-dir",
            &pin,
            "trace",
        ]);
        cmd.args(args).args(["-o", "json"]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "xlb trace {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let t = trace(&["--from", &client, "--to", "198.18.0.10:80", "--tcp-flags", "ack", "--iface", "eth0"]);
    assert_eq!(t["decision"], "existing_flow", "{t:#}");
    assert_eq!(t["verdict"], "XDP_PASS");
    assert_eq!(format!("{}:{}", t["backend"]["address"].as_str().unwrap(), t["backend"]["port"]), server);
    assert_eq!(t["rewrite"]["header"], "destination");
    assert_eq!(t["rewrite"]["after"], server.as_str());
    assert_eq!(t["rewrite"]["checksums_valid"], true);
    assert_eq!(t["packet"]["iface"], "eth0");
    // Its reply, as the pod would send it.
    let t = trace(&["--from", &server, "--to", &client, "--tcp-flags", "syn,ack"]);
    assert_eq!((t["decision"].as_str(), t["rewrite"]["header"].as_str()), (Some("reply"), Some("source")));
    assert_eq!(t["rewrite"]["after"], "198.18.0.10:80");

    // A new connection to the one-backend Service: the trace says where it will go.
    let t = trace(&["--from", "198.18.100.2:45678", "--to", "198.18.0.11:443"]);
    assert_eq!(t["decision"], "new_flow", "{t:#}");
    assert_eq!(t["frontend"]["service"], "default/solo:https");
    assert_eq!(t["rewrite"]["after"], "198.18.11.2:8443");
    assert!(
        t["not_done"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("create the conntrack entries"))
    );

    // Nothing live changed.
    assert_eq!(live_state(&bed), before, "a trace changed conntrack, flow counts or counters");

    // And the real connection goes where the trace said.
    let a =
        bed.client.enter(|| tcp_request("198.18.0.11:443".parse().unwrap(), Duration::from_secs(3))).unwrap();
    assert_eq!(a.server.to_string(), "198.18.11.2:8443");
    assert_eq!(a.pod, "pod-b");
}
