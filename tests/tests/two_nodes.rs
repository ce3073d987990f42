//! Two nodes in network namespaces, each running its own agent: node ports across nodes, as a
//! client outside the cluster sees them.
//!
//! Needs root. Without it the test skips, unless XLB_REQUIRE_PRIVILEGED=1 (CI), where it fails.
use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf, time::Duration};

use xlb_tests::{TwoNodes, privileged, tcp_request};

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
    bed.start_servers(&PathBuf::from(env!("CARGO_BIN_EXE_xlb-testbed")), &[8080]).expect("servers");
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
