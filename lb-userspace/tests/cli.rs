//! The `xlb` CLI on maps of known content: each command's table, JSON and YAML output compared
//! with what it must print, and its errors for missing maps, maps of another layout version and
//! a user without permission. The maps are pinned by loading the datapath object, then written
//! directly (no agent runs).
//!
//! Needs root. Without it the tests skip, unless XLB_REQUIRE_PRIVILEGED=1 (CI).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aya::maps::PerCpuValues;
use lb_common::*;
use lb_userspace::{
    cli::monotonic_secs,
    datapath::ebpf::{self, Capacities},
    datapath::{BpfMaps, Datapath as _},
};
use xlb_tests::{DirGuard, ensure_bpffs, privileged, unique_prefix};

fn xlb() -> &'static str {
    env!("CARGO_BIN_EXE_xlb")
}

fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [0u8; N];
    b[..s.len()].copy_from_slice(s.as_bytes());
    b
}

fn key(addr: [u8; 4], port: u16, proto: u8, slot: u16) -> Svc4Key {
    Svc4Key { addr, port, proto, scope: SCOPE_EXTERNAL, slot, _pad: 0 }
}

/// Pins the maps under a new directory and fills them with a known picture:
/// - default/web:http (LoadBalancer, port 80 -> targetPort 8080, nodePort 30080, ClientIP
///   affinity, externalTrafficPolicy Local) at clusterIP 198.18.0.10 and at 198.18.0.50 (an
///   externalIP that is also the ingress IP); backends 1 and 2 active, 3 terminating;
/// - default/dns (ClusterIP 198.18.0.11, 53/UDP -> 5353), backend 4;
/// - prod/db (ExternalName db.example.com);
/// - three tracked flows: one TCP with both entries, one UDP with only its forward entry, one
///   whose backend id now names another backend (stale).
fn known_maps() -> (PathBuf, DirGuard) {
    ensure_bpffs().unwrap();
    let dir = PathBuf::from("/sys/fs/bpf").join(unique_prefix());
    let guard = DirGuard(dir.clone());
    let caps = Capacities {
        service_entries: 64,
        backends: 16,
        ct_entries: 64,
        sock_nat_entries: 64,
        affinity_entries: 64,
        ipv6_entries: 64,
    };
    drop(ebpf::load(Some(&dir), caps).expect("load with pins"));
    let mut m = BpfMaps::open(&dir).unwrap();
    let info = |ns: &str, name: &str, port_name: &str, port: u16, proto: u8, ty: u8| SvcInfo {
        namespace: fixed(ns),
        name: fixed(name),
        port_name: fixed(port_name),
        port,
        proto,
        svc_type: ty,
        ..SvcInfo::default()
    };
    m.write_svc_info(
        1,
        SvcInfo {
            target_port: fixed("8080"),
            node_port: 30080,
            affinity_timeout: 10800,
            external_policy: POLICY_LOCAL,
            backends: 3,
            ..info("default", "web", "http", 80, IPPROTO_TCP, SVC_TYPE_LOAD_BALANCER)
        },
    )
    .unwrap();
    m.write_svc_info(
        2,
        SvcInfo {
            external_name: fixed("db.example.com"),
            ..info("prod", "db", "", 5432, IPPROTO_TCP, SVC_TYPE_EXTERNAL_NAME)
        },
    )
    .unwrap();
    m.write_svc_info(
        3,
        SvcInfo {
            target_port: fixed("5353"),
            backends: 1,
            ..info("default", "dns", "", 53, IPPROTO_UDP, SVC_TYPE_CLUSTER_IP)
        },
    )
    .unwrap();
    let be = |a: [u8; 4], port, state| Backend4 { addr: a, port, state, flags: 0 };
    m.write_backend(1, be([198, 18, 1, 2], 8080, BACKEND_STATE_ACTIVE)).unwrap();
    m.write_backend(2, be([198, 18, 2, 2], 8080, BACKEND_STATE_ACTIVE)).unwrap();
    m.write_backend(3, be([198, 18, 3, 2], 8080, BACKEND_STATE_TERMINATING)).unwrap();
    m.write_backend(4, be([198, 18, 1, 2], 5353, BACKEND_STATE_ACTIVE)).unwrap();
    m.write_source_range(1, "198.18.100.0/24".parse().unwrap()).unwrap();
    m.write_source_range(1, "10.0.0.0/8".parse().unwrap()).unwrap();
    for (id, n) in [(1, 7), (2, 5), (4, 2)] {
        m.flows.set(id, n, 0).unwrap();
    }
    for (addr, flags) in
        [([198, 18, 0, 10], SVC_F_CLUSTER_IP), ([198, 18, 0, 50], SVC_F_EXTERNAL_IP | SVC_F_LB_INGRESS)]
    {
        for (slot, id) in [(1, 1), (2, 2), (3, 3)] {
            m.write_service(
                key(addr, 80, IPPROTO_TCP, slot),
                Svc4Value { backend_id: id, svc_id: 1, ..Default::default() },
            )
            .unwrap();
        }
        m.write_service(
            key(addr, 80, IPPROTO_TCP, 0),
            Svc4Value { svc_id: 1, count: 2, flags, ..Default::default() },
        )
        .unwrap();
    }
    m.write_service(
        key([198, 18, 0, 11], 53, IPPROTO_UDP, 1),
        Svc4Value { backend_id: 4, svc_id: 3, ..Default::default() },
    )
    .unwrap();
    m.write_service(
        key([198, 18, 0, 11], 53, IPPROTO_UDP, 0),
        Svc4Value { svc_id: 3, count: 1, flags: SVC_F_CLUSTER_IP, ..Default::default() },
    )
    .unwrap();
    m.flush().unwrap(); // the writes held back to be sent together

    let now = monotonic_secs() as u32;
    let ct = |s: [u8; 4], sp, d: [u8; 4], dp, proto, dir| Ct4Key {
        saddr: s,
        daddr: d,
        sport: sp,
        dport: dp,
        proto,
        dir,
        _pad: 0,
    };
    let val = |a: [u8; 4], p, flags, be, svc, age, idle| Ct4Value {
        nat_addr: a,
        nat_port: p,
        tcp_flags: flags,
        flags: 0,
        backend_id: be,
        svc_id: svc,
        created: now - age,
        last_seen: now - idle,
        ..Default::default()
    };
    let client = [198, 18, 100, 2];
    m.ct.insert(
        ct(client, 40000, [198, 18, 0, 10], 80, IPPROTO_TCP, CT_DIR_FORWARD),
        val([198, 18, 1, 2], 8080, 0x12, 1, 1, 100, 5),
        0,
    )
    .unwrap();
    m.ct.insert(
        ct([198, 18, 1, 2], 8080, client, 40000, IPPROTO_TCP, CT_DIR_REPLY),
        val([198, 18, 0, 10], 80, 0, 1, 1, 100, 4),
        0,
    )
    .unwrap();
    m.ct.insert(
        ct([198, 18, 100, 3], 5000, [198, 18, 0, 11], 53, IPPROTO_UDP, CT_DIR_FORWARD),
        val([198, 18, 1, 2], 5353, 0, 4, 3, 30, 30),
        0,
    )
    .unwrap();
    m.ct.insert(
        ct(client, 40001, [198, 18, 0, 50], 80, IPPROTO_TCP, CT_DIR_FORWARD),
        val([198, 18, 9, 9], 8080, 0x02, 2, 1, 60, 60),
        0,
    )
    .unwrap();

    let cpus = aya::util::nr_cpus().unwrap();
    let per_cpu = |p: u64, b: u64| {
        let mut v = vec![StatValue::default(); cpus];
        v[0] = StatValue { packets: p, bytes: b };
        PerCpuValues::try_from(v).unwrap()
    };
    m.stats.set(Stat::Rx as u32, per_cpu(20, 2000), 0).unwrap();
    m.stats.set(Stat::DnatNew as u32, per_cpu(3, 180), 0).unwrap();
    m.stats.set(Stat::DnatEstablished as u32, per_cpu(9, 900), 0).unwrap();
    m.stats.set(Stat::RevNat as u32, per_cpu(8, 920), 0).unwrap();
    (dir, guard)
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_xlb(dir: &Path, args: &[&str]) -> Out {
    let o = Command::new(xlb()).arg("--pin-dir").arg(dir).args(args).output().unwrap();
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn stdout(dir: &Path, args: &[&str]) -> String {
    let o = run_xlb(dir, args);
    assert!(o.ok, "xlb {args:?} failed: {}", o.stderr);
    o.stdout
}

/// Ages and idle times move with the clock: `NNNs` becomes `Ns` (values are checked in JSON).
fn no_times(s: &str) -> String {
    s.split('\n')
        .map(|l| {
            l.split("   ")
                .map(|c| {
                    let t = c.trim();
                    if t.len() > 1
                        && t.ends_with('s')
                        && t[..t.len() - 1].chars().all(|ch| ch.is_ascii_digit())
                    {
                        c.replace(t, "Ns")
                    } else {
                        c.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("   ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_listing_prints_the_known_maps() {
    if !privileged("CLI tests need root (pinned BPF maps)") {
        return;
    }
    let (dir, _guard) = known_maps();

    assert_eq!(stdout(&dir, &["get", "services"]), GET_SERVICES);
    assert_eq!(stdout(&dir, &["services"]), GET_SERVICES, "`xlb services` is `xlb get services`");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&dir, &["get", "services", "-o", "json"])).unwrap();
    let want: serde_json::Value = serde_json::from_str(GET_SERVICES_JSON).unwrap();
    assert_eq!(json, want, "{}", serde_json::to_string_pretty(&json).unwrap());
    let yaml: serde_json::Value =
        serde_yaml::from_str(&stdout(&dir, &["get", "services", "-o", "yaml"])).unwrap();
    assert_eq!(yaml, want, "YAML carries the same document");

    assert_eq!(stdout(&dir, &["describe", "service", "default/web"]), DESCRIBE_WEB);
    assert_eq!(stdout(&dir, &["describe", "svc", "prod/db"]), DESCRIBE_DB);
    let d: serde_json::Value =
        serde_json::from_str(&stdout(&dir, &["describe", "service", "web", "-o", "json"])).unwrap();
    assert_eq!(d, serde_json::from_str::<serde_json::Value>(DESCRIBE_WEB_JSON).unwrap(), "{d:#}");
    let missing = run_xlb(&dir, &["describe", "service", "default/nope"]);
    assert!(
        !missing.ok && missing.stderr.contains("default/nope is not in the datapath"),
        "{}",
        missing.stderr
    );

    assert_eq!(stdout(&dir, &["backends"]), BACKENDS);
    assert_eq!(stdout(&dir, &["get", "backends"]), BACKENDS);
    let b: serde_json::Value = serde_json::from_str(&stdout(&dir, &["backends", "-o", "json"])).unwrap();
    assert_eq!(b, serde_json::from_str::<serde_json::Value>(BACKENDS_JSON).unwrap(), "{b:#}");

    assert_eq!(no_times(&stdout(&dir, &["conntrack"])), CONNTRACK);
    let ct: serde_json::Value = serde_json::from_str(&stdout(&dir, &["conntrack", "-o", "json"])).unwrap();
    let rows = ct.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let ages: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r["age_seconds"].as_u64().unwrap(), r["idle_seconds"].as_u64().unwrap()))
        .collect();
    for ((age, idle), (want_age, want_idle)) in ages.iter().zip([(100, 4), (60, 60), (30, 30)]) {
        assert!(
            (want_age..=want_age + 2).contains(age) && (want_idle..=want_idle + 2).contains(idle),
            "{ages:?}"
        );
    }
    let mut first = rows[0].clone();
    first["age_seconds"] = 0.into();
    first["idle_seconds"] = 0.into();
    assert_eq!(first, serde_json::from_str::<serde_json::Value>(CONNTRACK_FIRST_JSON).unwrap(), "{first:#}");
    let clients = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["conntrack", "-o", "json"];
        a.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&stdout(&dir, &a)).unwrap();
        v.as_array().unwrap().iter().map(|r| r["client"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(clients(&["--service", "default/dns"]), ["198.18.100.3:5000"]);
    assert_eq!(clients(&["--service", "web"]), ["198.18.100.2:40000", "198.18.100.2:40001"]);
    assert_eq!(clients(&["--client", "198.18.100.2"]), ["198.18.100.2:40000", "198.18.100.2:40001"]);
    assert_eq!(clients(&["--client", "198.18.100.2:40001"]), ["198.18.100.2:40001"]);
    assert_eq!(clients(&["--backend", "198.18.1.2"]), ["198.18.100.2:40000", "198.18.100.3:5000"]);
    assert_eq!(clients(&["--backend", "198.18.1.2:5353"]), ["198.18.100.3:5000"]);
    assert_eq!(clients(&["--frontend", "198.18.0.50:80"]), ["198.18.100.2:40001"]);
    assert!(clients(&["--service", "prod/db"]).is_empty());
    let bad = run_xlb(&dir, &["conntrack", "--client", "nope"]);
    assert!(!bad.ok && bad.stderr.contains("neither ADDRESS nor ADDRESS:PORT"), "{}", bad.stderr);

    assert_eq!(stdout(&dir, &["stats"]), STATS);
    let s: serde_json::Value = serde_json::from_str(&stdout(&dir, &["stats", "-o", "json"])).unwrap();
    assert_eq!(
        s["dnat_new"],
        serde_json::json!({"packets": 3, "bytes": 180, "verdict": "pass (translated)", "meaning": "first packet of a new flow, sent to a backend"})
    );
    assert_eq!(s["drop_no_backend"]["verdict"], "drop");
    assert_eq!(s.as_object().unwrap().len(), STAT_COUNT as usize + 2, "the counters, ct_live and ct_evicted");
    assert_eq!(s["ct_live"]["packets"], 3, "the three tracked flows");
    let y: serde_json::Value = serde_yaml::from_str(&stdout(&dir, &["stats", "-o", "yaml"])).unwrap();
    assert_eq!(y, s);
}

#[test]
fn errors_say_what_is_wrong() {
    if !privileged("CLI tests need root (pinned BPF maps)") {
        return;
    }
    // No agent ever ran with this pin directory.
    let nothing = PathBuf::from("/sys/fs/bpf").join(unique_prefix());
    for args in [
        &["services"][..],
        &["backends"],
        &["conntrack"],
        &["stats"],
        &["describe", "svc", "x"],
        &["trace", "--from", "198.18.100.2:1", "--to", "198.18.0.10:80"],
    ] {
        let o = run_xlb(&nothing, args);
        assert!(!o.ok, "{args:?}");
        assert!(
            o.stderr.contains("xlb agent has not run on this node with --pin-dir"),
            "{args:?}: {}",
            o.stderr
        );
    }
    assert!(!nothing.exists(), "the CLI creates nothing");

    // Maps of an older layout version (an agent of an older xlb pinned them), then of a newer.
    let (dir, _guard) = known_maps();
    std::fs::rename(dir.join(MAP_SVC_INFO), dir.join("xlb_svcinfo_v1")).unwrap();
    let o = run_xlb(&dir, &["services"]);
    assert!(!o.ok);
    assert!(
        o.stderr.contains("pinned by an older xlb: found xlb_svcinfo_v1, this xlb reads xlb_svcinfo_v2"),
        "{}",
        o.stderr
    );
    std::fs::rename(dir.join("xlb_svcinfo_v1"), dir.join("xlb_svcinfo_v3")).unwrap();
    let o = run_xlb(&dir, &["trace", "--from", "198.18.100.2:1", "--to", "198.18.0.10:80"]);
    assert!(!o.ok && o.stderr.contains("pinned by a newer xlb: found xlb_svcinfo_v3"), "{}", o.stderr);
    // `xlb cleanup` removes maps of other versions too.
    let o = run_xlb(&dir, &["cleanup"]);
    assert!(o.ok && o.stdout.contains("xlb_svcinfo_v3"), "{}", o.stdout);
    assert!(!dir.exists(), "and the emptied pin directory");

    // A user without the privileges to read BPF maps.
    let (dir, _guard) = known_maps();
    let tmp = std::env::temp_dir().join(unique_prefix());
    let _tmp = DirGuard(tmp.clone());
    std::fs::create_dir_all(&tmp).unwrap();
    let bin = tmp.join("xlb");
    std::fs::copy(xlb(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(&bin)
        .arg("--pin-dir")
        .arg(&dir)
        .arg("services")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("permission denied") && err.contains("needs root"), "{err}");
}

const GET_SERVICES_JSON: &str = r#"[
  {
    "namespace": "default",
    "name": "dns",
    "type": "ClusterIP",
    "port_name": "",
    "frontend": "198.18.0.11:53/UDP",
    "frontend_kinds": [
      "ClusterIP"
    ],
    "address": "198.18.0.11",
    "port": 53,
    "protocol": "UDP",
    "service_port": 53,
    "target_port": "5353",
    "node_port": null,
    "external_name": null,
    "session_affinity": "None",
    "affinity_timeout_seconds": null,
    "external_traffic_policy": "Cluster",
    "internal_traffic_policy": "Cluster",
    "service_id": 3,
    "backends": [
      {
        "address": "198.18.1.2",
        "port": 5353,
        "state": "active",
        "id": 4,
        "selectable": true,
        "new_flows": 2
      }
    ]
  },
  {
    "namespace": "default",
    "name": "web",
    "type": "LoadBalancer",
    "port_name": "http",
    "frontend": "198.18.0.10:80/TCP",
    "frontend_kinds": [
      "ClusterIP"
    ],
    "address": "198.18.0.10",
    "port": 80,
    "protocol": "TCP",
    "service_port": 80,
    "target_port": "8080",
    "node_port": 30080,
    "external_name": null,
    "session_affinity": "ClientIP",
    "affinity_timeout_seconds": 10800,
    "external_traffic_policy": "Local",
    "internal_traffic_policy": "Cluster",
    "service_id": 1,
    "backends": [
      {
        "address": "198.18.1.2",
        "port": 8080,
        "state": "active",
        "id": 1,
        "selectable": true,
        "new_flows": 7
      },
      {
        "address": "198.18.2.2",
        "port": 8080,
        "state": "active",
        "id": 2,
        "selectable": true,
        "new_flows": 5
      },
      {
        "address": "198.18.3.2",
        "port": 8080,
        "state": "terminating",
        "id": 3,
        "selectable": false,
        "new_flows": 0
      }
    ]
  },
  {
    "namespace": "default",
    "name": "web",
    "type": "LoadBalancer",
    "port_name": "http",
    "frontend": "198.18.0.50:80/TCP",
    "frontend_kinds": [
      "ExternalIP",
      "LoadBalancerIngress"
    ],
    "address": "198.18.0.50",
    "port": 80,
    "protocol": "TCP",
    "service_port": 80,
    "target_port": "8080",
    "node_port": 30080,
    "external_name": null,
    "session_affinity": "ClientIP",
    "affinity_timeout_seconds": 10800,
    "external_traffic_policy": "Local",
    "internal_traffic_policy": "Cluster",
    "service_id": 1,
    "backends": [
      {
        "address": "198.18.1.2",
        "port": 8080,
        "state": "active",
        "id": 1,
        "selectable": true,
        "new_flows": 7
      },
      {
        "address": "198.18.2.2",
        "port": 8080,
        "state": "active",
        "id": 2,
        "selectable": true,
        "new_flows": 5
      },
      {
        "address": "198.18.3.2",
        "port": 8080,
        "state": "terminating",
        "id": 3,
        "selectable": false,
        "new_flows": 0
      }
    ]
  },
  {
    "namespace": "prod",
    "name": "db",
    "type": "ExternalName",
    "port_name": "",
    "frontend": null,
    "frontend_kinds": [],
    "address": null,
    "port": 5432,
    "protocol": "TCP",
    "service_port": 5432,
    "target_port": "",
    "node_port": null,
    "external_name": "db.example.com",
    "session_affinity": "None",
    "affinity_timeout_seconds": null,
    "external_traffic_policy": "Cluster",
    "internal_traffic_policy": "Cluster",
    "service_id": 2,
    "backends": []
  }
]
"#;

const DESCRIBE_WEB: &str = r#"Name:                     web
Namespace:                default
Type:                     LoadBalancer
IP:                       198.18.0.10
External IPs:             198.18.0.50
LoadBalancer Ingress:     198.18.0.50
LoadBalancer Source Ranges: 10.0.0.0/8,198.18.100.0/24
Session Affinity:         ClientIP (timeout 10800s)
External Traffic Policy:  Local
Internal Traffic Policy:  Cluster
Port:                     http  80/TCP
TargetPort:               8080
NodePort:                 http  30080/TCP
Endpoints:                198.18.1.2:8080,198.18.2.2:8080
Service ID:               1
Frontends:                198.18.0.10:80/TCP,198.18.0.50:80/TCP
Backends:
  ID   ADDRESS           STATE         SELECTABLE   NEW-FLOWS   ACTIVE-FLOWS   WHY
  1    198.18.1.2:8080   active        yes          7           1              ready
  2    198.18.2.2:8080   active        yes          5           0              ready
  3    198.18.3.2:8080   terminating   no           0           0              terminating: no new flows while an endpoint is ready
Note:                     affinity is kept per client address on the packet path, per network namespace at the socket
"#;

const DESCRIBE_DB: &str = r#"Name:                     db
Namespace:                prod
Type:                     ExternalName
External Name:            db.example.com
Session Affinity:         None
External Traffic Policy:  Cluster
Internal Traffic Policy:  Cluster
Port:                     <unset>  5432/TCP
TargetPort:               5432
Endpoints:                <none>
Service ID:               2
Frontends:                <none>
"#;

const DESCRIBE_WEB_JSON: &str = r#"{
  "namespace": "default",
  "name": "web",
  "type": "LoadBalancer",
  "cluster_ips": [
    "198.18.0.10"
  ],
  "external_ips": [
    "198.18.0.50"
  ],
  "load_balancer_ingress": [
    "198.18.0.50"
  ],
  "load_balancer_source_ranges": [
    "10.0.0.0/8",
    "198.18.100.0/24"
  ],
  "external_name": null,
  "session_affinity": "ClientIP",
  "affinity_timeout_seconds": 10800,
  "external_traffic_policy": "Local",
  "internal_traffic_policy": "Cluster",
  "ports": [
    {
      "name": "http",
      "port": 80,
      "protocol": "TCP",
      "target_port": "8080",
      "node_port": 30080,
      "service_id": 1,
      "frontends": [
        "198.18.0.10:80/TCP",
        "198.18.0.50:80/TCP"
      ],
      "backends": [
        {
          "id": 1,
          "address": "198.18.1.2",
          "port": 8080,
          "state": "active",
          "selectable": true,
          "why": "ready",
          "new_flows": 7,
          "active_flows": 1
        },
        {
          "id": 2,
          "address": "198.18.2.2",
          "port": 8080,
          "state": "active",
          "selectable": true,
          "why": "ready",
          "new_flows": 5,
          "active_flows": 0
        },
        {
          "id": 3,
          "address": "198.18.3.2",
          "port": 8080,
          "state": "terminating",
          "selectable": false,
          "why": "terminating: no new flows while an endpoint is ready",
          "new_flows": 0,
          "active_flows": 0
        }
      ]
    }
  ]
}
"#;

const BACKENDS: &str = r#"ID   BACKEND               STATE         NEW-FLOWS   ACTIVE-FLOWS   SERVICES
1    198.18.1.2:8080/TCP   active        7           1              default/web:http
2    198.18.2.2:8080/TCP   active        5           0              default/web:http
3    198.18.3.2:8080/TCP   terminating   0           0              default/web:http
4    198.18.1.2:5353/UDP   active        2           1              default/dns
"#;

const BACKENDS_JSON: &str = r#"[
  {
    "id": 1,
    "address": "198.18.1.2",
    "port": 8080,
    "protocol": "TCP",
    "state": "active",
    "services": [
      "default/web:http"
    ],
    "new_flows": 7,
    "active_flows": 1
  },
  {
    "id": 2,
    "address": "198.18.2.2",
    "port": 8080,
    "protocol": "TCP",
    "state": "active",
    "services": [
      "default/web:http"
    ],
    "new_flows": 5,
    "active_flows": 0
  },
  {
    "id": 3,
    "address": "198.18.3.2",
    "port": 8080,
    "protocol": "TCP",
    "state": "terminating",
    "services": [
      "default/web:http"
    ],
    "new_flows": 0,
    "active_flows": 0
  },
  {
    "id": 4,
    "address": "198.18.1.2",
    "port": 5353,
    "protocol": "UDP",
    "state": "active",
    "services": [
      "default/dns"
    ],
    "new_flows": 2,
    "active_flows": 1
  }
]
"#;

const CONNTRACK: &str = r#"PROTO   CLIENT               FRONTEND         BACKEND           SERVICE            FLAGS     AGE    IDLE   STATE
TCP     198.18.100.2:40000   198.18.0.10:80   198.18.1.2:8080   default/web:http   SYN,ACK   Ns   Ns     ok
TCP     198.18.100.2:40001   198.18.0.50:80   198.18.9.9:8080   default/web:http   SYN       Ns    Ns    no-reply-entry,stale
UDP     198.18.100.3:5000    198.18.0.11:53   198.18.1.2:5353   default/dns        -         Ns    Ns    no-reply-entry
"#;

const CONNTRACK_FIRST_JSON: &str = r#"{
  "protocol": "TCP",
  "client": "198.18.100.2:40000",
  "frontend": "198.18.0.10:80",
  "backend": "198.18.1.2:8080",
  "backend_id": 1,
  "service_id": 1,
  "service": "default/web:http",
  "tcp_flags": "SYN,ACK",
  "snat": null,
  "forward_tracked": true,
  "reply_tracked": true,
  "stale": false,
  "age_seconds": 0,
  "idle_seconds": 0
}
"#;

const STATS: &str = r#"datapath: attached to no interface
COUNTER               VERDICT             PACKETS   BYTES   MEANING
rx                    seen                20        2000    every packet the program saw
pass_not_ipv4         pass                0         0       neither IPv4 nor IPv6 (ARP, VLAN...)
pass_malformed        pass                0         0       truncated or inconsistent header; left to the kernel
pass_other_proto      pass                0         0       IPv4 but neither TCP nor UDP (nor an ICMP error about a tracked flow)
pass_fragment         pass                0         0       later fragment whose first fragment was not seen translated (not a Service's flow)
pass_no_service       pass                0         0       no frontend and no tracked flow matched
dnat_new              pass (translated)   3         180     first packet of a new flow, sent to a backend
dnat_established      pass (translated)   9         900     packet of a tracked flow, sent to its backend
rev_nat               pass (translated)   8         920     reply from a backend, source set back to the frontend
drop_no_backend       drop                0         0       service has no usable endpoint and no answer was possible (a reset, IP options, ICMP rate limit), or a traffic policy Local leaves this node without one
drop_stale_slot       drop                0         0       backend slot vanished during an update (race with the agent)
drop_ct_full          drop                0         0       connection could not be tracked (conntrack map update failed)
ct_stale_backend      event               0         0       tracked flow whose backend was removed; balanced again
reject_no_backend     reject (answered)   0         0       service has no usable endpoint: answered with a TCP reset or ICMP port unreachable
pass_egress_rev_nat   pass                0         0       reply of a flow to a node address, left for TC egress to translate
egress_rev_nat        pass (translated)   0         0       TC egress: reply's source set back to the node address and port
drop_source_range     drop                0         0       new flow to a LoadBalancer IP from a client outside loadBalancerSourceRanges
icmp_translated       pass (translated)   0         0       ICMP error about a tracked flow, translated for the backend or client it concerns
egress_snat           pass (translated)   0         0       TC egress: a flow to an endpoint on another node leaves with the node's address
sock_translated       sock (translated)   0         0       socket level: a connect or UDP datagram of a node process or pod to a frontend was given a backend
sock_refused          sock (refused)      0         0       socket level: a connect or UDP datagram to a frontend without usable endpoints, or to an address of the Service ranges no Service holds, failed with ECONNREFUSED
ct_created            event               0         0       new flow tracked
ct_expired            event               0         0       tracked flow over (idle past its lifetime, or a new connection on a closed one); balanced again
reject_no_service     reject (answered)   0         0       new flow to an address of the Service ranges (--service-cidr) that no Service holds: answered with a TCP reset or ICMP port unreachable
drop_no_service       drop                0         0       as reject_no_service, where no answer was possible (a reset, IP options, ICMP rate limit)
frag_translated       pass (translated)   0         0       later fragment of a translated datagram, given the addresses its first fragment got
ct_live               derived             3         0       flows tracked now (forward entries in the conntrack map)
ct_evicted            derived             0         0       flows evicted from the full conntrack map before they expired (created - expired - stale - live)
"#;

const GET_SERVICES: &str = r#"NAMESPACE   NAME       TYPE           FRONTEND             AFFINITY           POLICY(EXT/INT)   BACKENDS
default     dns        ClusterIP      198.18.0.11:53/UDP   None               Cluster/Cluster   198.18.1.2:5353
default     web:http   LoadBalancer   198.18.0.10:80/TCP   ClientIP(10800s)   Local/Cluster     198.18.1.2:8080,198.18.2.2:8080,198.18.3.2:8080 (terminating)
default     web:http   LoadBalancer   198.18.0.50:80/TCP   ClientIP(10800s)   Local/Cluster     198.18.1.2:8080,198.18.2.2:8080,198.18.3.2:8080 (terminating)
prod        db         ExternalName   <none>               None               Cluster/Cluster   db.example.com (DNS only)
"#;
