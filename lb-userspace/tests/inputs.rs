//! Agent input fuzzing (issue 23): random Services, EndpointSlices, Endpoints and Pods with
//! hostile values (port lists of up to 100 ports, ports 1 and 65535, up to 1,000 endpoints,
//! names at their length limit, named and numbered target ports, every protocol, invalid and
//! IPv4-mapped addresses, unknown protocols, duplicate ports, missing fields) and malformed
//! documents, written as manifests and taken as the agent takes them: the manifests source,
//! the model, the reconciler into the in-memory datapath. Each Service is made valid, or broken
//! by one known defect (the whole Service, or one part of it); after every round:
//!
//! - nothing panicked, and the reconciler applied the model;
//! - each broken Service is rejected with a reason, alone (for a whole defect) or in that part
//!   (its other frontends served);
//! - each valid Service is served: every one of its ports at its clusterIP, with the backends
//!   its slices give;
//! - each malformed document is reported, and costs no other object.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_userspace::{
    datapath::{Datapath as _, MemDatapath},
    model::{self, ModelConfig},
    reconcile::Reconciler,
    source::manifests,
};
use serde_json::{Value, json};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// What was done to a Service.
#[derive(Clone, Debug, PartialEq)]
enum Made {
    Valid,
    /// Rejected whole, for this defect.
    Broken(&'static str),
    /// Served, but for its `nodePort` or `externalIP` part.
    PartlyBroken(&'static str),
}

/// A name at most `max` long, at the limit now and then.
fn name(rng: &mut Rng, base: &str, max: usize) -> String {
    if rng.chance(15) {
        let mut n = base.to_string();
        while n.len() < max {
            n.push('x');
        }
        n.truncate(max);
        n
    } else {
        base.to_string()
    }
}

/// One Service (index `i`), its EndpointSlice (or core/v1 Endpoints), and what was made of it.
fn service(rng: &mut Rng, i: usize) -> (String, Vec<Value>, Made, Ipv4Addr, usize) {
    let svc_name = name(rng, &format!("s{i}-"), 63);
    let vip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
    let n_ports = if rng.chance(10) { 20 + rng.below(80) as usize } else { 1 + rng.below(4) as usize };
    let protos = ["TCP", "UDP", "SCTP"];
    // Node ports for at most ten ports each (the range would not hold a hundred per Service).
    let ty = if n_ports > 10 { "ClusterIP" } else { *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]) };
    let mut ports = Vec::new();
    let mut slice_ports = Vec::new();
    for k in 0..n_ports {
        // Distinct port numbers, the edges among them.
        let port = match k {
            0 if rng.chance(20) => 65535,
            1 if rng.chance(20) => 1,
            _ => 1000 + k as u64,
        };
        let proto = *rng.pick(&protos);
        let pname = format!("p{k}");
        let named = rng.chance(50);
        let target = 10_000 + k as u64;
        let mut p = json!({"name": pname, "port": port, "protocol": proto,
            "targetPort": if named { json!(pname) } else { json!(target) }});
        if ty != "ClusterIP" {
            p["nodePort"] = json!(30000 + (i * 10 + k) as u64);
        }
        ports.push(p);
        slice_ports.push(json!({"name": pname, "port": target, "protocol": proto}));
    }
    let mut spec = json!({"type": ty, "clusterIP": vip.to_string(), "ports": ports});
    if rng.chance(10) {
        spec["externalIPs"] = json!([format!("198.19.{}.{}", i / 250, i % 250 + 1)]);
    }
    // One defect at most.
    let made = match rng.below(14) {
        0 => {
            spec["ports"][0]["port"] = json!(0);
            Made::Broken("port 0")
        }
        1 => {
            spec["ports"][0]["protocol"] = json!(*rng.pick(&["QUIC", "tcp", ""]));
            Made::Broken("unknown protocol")
        }
        2 => {
            let first = spec["ports"][0].clone();
            spec["ports"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "dup", "port": first["port"], "protocol": first["protocol"]}));
            Made::Broken("duplicate port")
        }
        3 => {
            spec["clusterIP"] = json!(*rng.pick(&["198.18.0.999", "::ffff:198.18.1.1", "not-an-ip"]));
            Made::Broken("invalid clusterIP")
        }
        4 if ty != "ClusterIP" => {
            spec["ports"][0]["nodePort"] = json!(*rng.pick(&[1u64, 29999, 40000]));
            Made::PartlyBroken("nodePort")
        }
        5 if spec.get("externalIPs").is_some() => {
            spec["externalIPs"] = json!(["198.19.0.300"]);
            Made::PartlyBroken("externalIP")
        }
        _ => Made::Valid,
    };
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc_name, "namespace": "fuzz"}, "spec": spec});
    // Endpoints: up to 1,000 now and then, a hostile address among them (left out alone).
    let n_eps = if rng.chance(3) { 1000 } else { rng.below(6) as usize };
    let mut eps = Vec::new();
    let mut good = 0;
    for e in 0..n_eps {
        let addr = if rng.chance(3) {
            rng.pick(&["999.1.1.1", "::ffff:10.0.0.1", "2001:db8::1", "198.18.0.1/32"]).to_string()
        } else {
            good += 1;
            format!("10.{}.{}.{}", (i / 200) % 250, (i % 200) + (e / 250) % 5, e % 250 + 1)
        };
        eps.push(json!({"addresses": [addr], "conditions": {"ready": true}}));
    }
    let objects = if rng.chance(15) {
        // core/v1 Endpoints instead of a slice.
        let addrs: Vec<Value> = eps.iter().map(|e| json!({"ip": e["addresses"][0]})).collect();
        let ports: Vec<Value> = slice_ports
            .iter()
            .map(|p| json!({"name": p["name"], "port": p["port"], "protocol": p["protocol"]}))
            .collect();
        vec![
            svc,
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": svc_name, "namespace": "fuzz"},
            "subsets": [{"addresses": addrs, "ports": ports}]}),
        ]
    } else {
        vec![
            svc,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-1", &svc_name[..svc_name.len().min(60)]), "namespace": "fuzz",
                "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": "IPv4", "ports": slice_ports, "endpoints": eps}),
        ]
    };
    (svc_name, objects, made, vip, good)
}

/// Documents that are not objects the agent can read.
const MALFORMED: &[&str] = &[
    "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"cut\"",
    "apiVersion: v1\nkind: Service\nmetadata: [not, a, map]\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: wrongtype, namespace: fuzz}\nspec: {ports: 80}\n",
    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: noaddr, namespace: fuzz}\nendpoints: 7\n",
    "- just\n- a list\n",
    "\t\u{0}\u{7f} not yaml: [",
    "apiVersion: v1\nkind: Service\nmetadata: {name: badip, namespace: fuzz}\nspec: {clusterIP: [1]}\n",
];

/// A Pod whose hostPort leads to a container port out of range: rejected by the model, alone.
const BAD_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: badpod, namespace: fuzz}\nspec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 99999, hostPort: 8443}]}]}\nstatus: {podIP: 10.250.0.1}\n";

#[test]
fn hostile_objects_are_rejected_alone_and_every_valid_one_is_served() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut docs: Vec<String> = Vec::new();
        let mut made: BTreeMap<String, (Made, Ipv4Addr, usize)> = BTreeMap::new();
        let mut malformed = 0;
        for i in 0..150 {
            let (name, objects, m, vip, good) = service(&mut rng, i);
            for o in objects {
                docs.push(serde_json::to_string(&o).unwrap());
            }
            made.insert(name, (m, vip, good));
            if rng.chance(5) {
                docs.push(rng.pick(MALFORMED).to_string());
                malformed += 1;
            }
        }
        docs.push(BAD_POD.to_string());
        // A YAML stream (a text that starts with `{` is read as a stream of JSON documents).
        let text = format!("# xlb input fuzzing, seed {seed}\n{}", docs.join("\n---\n"));
        let mut objects = manifests::Objects::default();
        manifests::read_str("fuzz.yaml".as_ref(), &text, &mut objects);
        assert!(
            objects.errors.len() >= malformed,
            "seed {seed}: {} errors for {malformed} malformed documents",
            objects.errors.len()
        );
        let cfg = ModelConfig {
            node_addrs: vec!["198.18.100.1".parse().unwrap()],
            node_name: Some("node-1".into()),
            ..ModelConfig::default()
        };
        let mut m = model::build(&objects.services, &objects.slices, &cfg);
        let pods: Vec<std::sync::Arc<_>> = objects.pods.into_iter().map(std::sync::Arc::new).collect();
        model::add_host_ports(&mut m, &pods, &cfg);
        let dp = MemDatapath { filter: vec![0; lb_common::FILTER_WORDS as usize], ..Default::default() };
        let mut rec = Reconciler::new(dp).unwrap();
        rec.apply(&m.ports).unwrap_or_else(|e| panic!("seed {seed}: the reconciler refused the model: {e}"));

        let rejected: BTreeMap<&str, Vec<&model::Rejection>> =
            m.rejected.iter().filter(|r| r.kind == "Service").fold(BTreeMap::new(), |mut acc, r| {
                acc.entry(r.name.as_str()).or_default().push(r);
                acc
            });
        assert!(m.rejected.iter().all(|r| !r.reason.is_empty()), "seed {seed}: a rejection without a reason");
        assert!(
            m.rejected.iter().any(|r| r.kind == "Pod" && r.name == "badpod"),
            "seed {seed}: the Pod with container port 99999: {:?}",
            m.rejected.iter().filter(|r| r.kind == "Pod").collect::<Vec<_>>()
        );
        let services = rec.datapath().read_services().unwrap();
        let served: BTreeSet<(Ipv4Addr, u16)> = services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, _)| (Ipv4Addr::from(k.addr), k.port))
            .collect();
        let count_at = |vip: Ipv4Addr| -> BTreeMap<u16, u16> {
            services
                .iter()
                .filter(|(k, v)| k.slot == 0 && Ipv4Addr::from(k.addr) == vip && v.svc_id != 0)
                .map(|(k, v)| (k.port, v.count))
                .collect()
        };
        let spec_ports = |name: &str| -> usize {
            objects
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .map_or(0, |s| s.spec.as_ref().and_then(|sp| sp.ports.as_ref()).map_or(0, Vec::len))
        };
        for (name, (mk, vip, good)) in &made {
            let r = rejected.get(name.as_str()).cloned().unwrap_or_default();
            match mk {
                Made::Valid => {
                    assert!(
                        r.is_empty(),
                        "seed {seed}: valid {name} was rejected: {:?}",
                        &r[..r.len().min(3)]
                    );
                    let at = count_at(*vip);
                    assert_eq!(
                        at.len(),
                        spec_ports(name),
                        "seed {seed}: valid {name} at {vip}: ports {at:?}"
                    );
                    // Every port has the slice's good endpoints (ready, addresses that parse).
                    for (port, count) in at {
                        assert_eq!(usize::from(count), *good, "seed {seed}: {name} {vip}:{port}");
                    }
                }
                Made::Broken(defect) => {
                    assert!(
                        r.iter().any(|r| r.part.is_none()),
                        "seed {seed}: {name} ({defect}) was not rejected: {r:?}"
                    );
                    assert!(
                        !served.iter().any(|(a, _)| a == vip),
                        "seed {seed}: {name} ({defect}) is served at {vip}"
                    );
                }
                Made::PartlyBroken(part) => {
                    assert!(
                        r.iter().any(|r| r.part == Some(part)) && r.iter().all(|r| r.part.is_some()),
                        "seed {seed}: {name} (bad {part}): {r:?}"
                    );
                    assert_eq!(
                        count_at(*vip).len(),
                        spec_ports(name),
                        "seed {seed}: {name} (bad {part}) is served at its clusterIP"
                    );
                }
            }
        }
    }
}
