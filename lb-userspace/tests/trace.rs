//! `xlb trace` against the datapath itself: the datapath program (`xlb_xdp`) is loaded with its
//! maps pinned, as the agent does, and real packets run through it with BPF_PROG_TEST_RUN. The
//! tracer then loads the trace program against the same pins. Every trace must report the
//! backend and produce the frame the datapath produces for the same packet, and leave every map
//! byte for byte as it was (conntrack entries and their timestamps, counters, flow counts).
//!
//! Needs root. Without it the tests skip, unless XLB_REQUIRE_PRIVILEGED=1 (CI).
use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use lb_userspace::{
    cli::packet::{Frame, Frame6, decode, decode6},
    cli::trace::{TraceRequest, Tracer},
    datapath::ebpf::{self, Capacities},
    datapath::{BpfMaps, Datapath as _},
    model::{self, ModelConfig, Proto},
    reconcile::Reconciler,
    source::manifests,
};
use xlb_tests::{DirGuard, ensure_bpffs, privileged, unique_prefix};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.18.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.18.1.2]
- addresses: [198.18.2.2]
- addresses: [198.18.3.2]
---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: default}
spec:
  clusterIP: 198.18.0.11
  ports: [{port: 443, targetPort: https}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: solo-1, namespace: default, labels: {kubernetes.io/service-name: solo}}
addressType: IPv4
ports: [{name: "", port: 8443}]
endpoints: [{addresses: [198.18.4.2]}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 198.18.0.12
  ports: [{port: 80}]
"#;

/// The datapath as the agent runs it: program loaded, maps pinned, filled by the reconciler.
struct Live {
    ebpf: aya::Ebpf,
    rec: Reconciler<BpfMaps>,
    pin_dir: PathBuf,
    _pins: DirGuard,
}

impl Live {
    fn new() -> Self {
        ensure_bpffs().unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_prefix());
        let guard = DirGuard(pin_dir.clone());
        let caps = Capacities {
            service_entries: 4096,
            backends: 1024,
            ct_entries: 4096,
            sock_nat_entries: 1024,
            affinity_entries: 1024,
            ipv6_entries: 1024,
        };
        let ebpf = ebpf::load(Some(&pin_dir), caps).expect("load with pins");
        let rec = Reconciler::new(BpfMaps::open(&pin_dir).unwrap()).unwrap();
        let mut live = Live { ebpf, rec, pin_dir, _pins: guard };
        live.apply(MANIFEST);
        live
    }

    fn apply(&mut self, yaml: &str) {
        let mut objects = manifests::Objects::default();
        manifests::read_str("t.yaml".as_ref(), yaml, &mut objects);
        assert!(objects.errors.is_empty(), "{:?}", objects.errors);
        let m = model::build(&objects.services, &objects.slices, &ModelConfig::default());
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        self.rec.apply(&m.ports).unwrap();
    }

    /// A real packet through the datapath program: verdict and the frame as it leaves.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        ebpf::run_once(ebpf::xdp(&mut self.ebpf).unwrap(), frame).unwrap()
    }

    /// Every map's whole content, in a comparable form.
    fn snapshot(&self) -> String {
        let dp = self.rec.datapath();
        let mut services = dp.read_services().unwrap();
        services.sort_by_key(|(k, _)| *k);
        let backends: Vec<_> =
            (0..64).map(|i| (dp.read_backend(i).unwrap(), dp.read_backend_flows(i).unwrap())).collect();
        let mut ct = dp.read_ct().unwrap();
        ct.sort_by_key(|(k, _)| *k);
        let mut infos = dp.read_svc_infos().unwrap();
        infos.sort_by_key(|(k, _)| *k);
        let mut services6 = dp.read_services6().unwrap();
        services6.sort_by_key(|(k, _)| *k);
        let backends6: Vec<_> = (0..16).map(|i| dp.read_backend6(i).unwrap()).collect();
        let mut ct6 = dp.read_ct6().unwrap();
        ct6.sort_by_key(|(k, _)| *k);
        format!(
            "{services:?}\n{backends:?}\n{ct:?}\n{:?}\n{infos:?}\n{services6:?}\n{backends6:?}\n{ct6:?}",
            dp.read_stats().unwrap()
        )
    }

    fn pins(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.pin_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

fn req(proto: Proto, from: &str, to: &str, tcp_flags: u8) -> TraceRequest {
    TraceRequest { proto, from: sa(from), to: sa(to), tcp_flags, iface: None }
}

fn frame(r: &TraceRequest) -> Vec<u8> {
    let flags = if r.proto == Proto::Tcp { r.tcp_flags } else { 0 };
    match (r.from, r.to) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            Frame { tcp_flags: flags, ..Frame::new(r.proto, from, to) }.build()
        }
        (SocketAddr::V6(from), SocketAddr::V6(to)) => {
            Frame6 { tcp_flags: flags, ..Frame6::new(r.proto, from, to) }.build()
        }
        _ => panic!("mixed families"),
    }
}

#[test]
fn trace_reports_what_the_datapath_does_and_changes_nothing() {
    if !privileged("trace tests need root (BPF_PROG_TEST_RUN)") {
        return;
    }
    let mut live = Live::new();
    let pins_before = live.pins();
    let mut tracer = Tracer::open(&live.pin_dir).expect("tracer");

    // A flow the datapath already carries: the trace names its backend and rewrites the next
    // packet exactly as the datapath then does.
    let syn = req(Proto::Tcp, "198.18.100.2:40000", "198.18.0.10:80", 0x02);
    let (v, first) = live.run(&frame(&syn));
    assert_eq!(v, 2, "XDP_PASS");
    let chosen = decode(&first).unwrap().dst;
    let ack = req(Proto::Tcp, "198.18.100.2:40000", "198.18.0.10:80", 0x10);
    let before = live.snapshot();
    let t = tracer.run(&ack).unwrap();
    assert_eq!(live.snapshot(), before, "the trace changed a map");
    assert_eq!(
        (t.conntrack, t.decision, t.verdict, t.counter),
        ("forward", "existing_flow", "XDP_PASS", "dnat_established")
    );
    let b = t.backend.as_ref().unwrap();
    assert_eq!(SocketAddrV4::new(b.address.parse().unwrap(), b.port), chosen);
    let rw = t.rewrite.as_ref().unwrap();
    assert_eq!(
        (rw.header, rw.before.as_str(), rw.after.clone()),
        ("destination", "198.18.0.10:80", chosen.to_string())
    );
    assert!(rw.checksums_valid);
    let (_, real) = live.run(&frame(&ack));
    assert_eq!(t.frame_out, real, "the trace's frame equals the datapath's, byte for byte");

    // The reply of that flow: source translated back to the ClusterIP.
    let reply = TraceRequest {
        proto: Proto::Tcp,
        from: chosen.into(),
        to: sa("198.18.100.2:40000"),
        tcp_flags: 0x12,
        iface: None,
    };
    let before = live.snapshot();
    let t = tracer.run(&reply).unwrap();
    assert_eq!(live.snapshot(), before, "the trace changed a map");
    assert_eq!((t.conntrack, t.decision, t.counter), ("reply", "reply", "rev_nat"));
    let rw = t.rewrite.as_ref().unwrap();
    assert_eq!((rw.header, rw.after.as_str()), ("source", "198.18.0.10:80"));
    assert_eq!(t.frame_out, live.run(&frame(&reply)).1);

    // A new flow to a service with one backend: the choice is certain, and a real packet then
    // goes exactly where the trace said, with the same bytes; the trace itself tracked nothing.
    {
        let (proto, to) = (Proto::Tcp, "198.18.0.11:443");
        let r = req(proto, "198.18.100.3:50000", to, 0x02);
        let before = live.snapshot();
        let t = tracer.run(&r).unwrap();
        assert_eq!(live.snapshot(), before, "the trace changed a map");
        assert_eq!((t.conntrack, t.decision, t.counter), ("none", "new_flow", "dnat_new"));
        let f = t.frontend.as_ref().unwrap();
        assert_eq!((f.service.as_str(), f.selectable_backends), ("default/solo", 1));
        let b = t.backend.as_ref().unwrap();
        assert_eq!((b.address.as_str(), b.port, b.slot), ("198.18.4.2", 8443, Some(1)));
        assert_eq!(t.frame_out, live.run(&frame(&r)).1, "the real packet went where the trace said");
    }

    // New flows to three backends: a random slot, always a selectable backend, and over many
    // traces more than one; nothing is tracked or counted.
    let before = live.snapshot();
    let mut seen = BTreeSet::new();
    for port in 41000..41060 {
        let t = tracer.run(&req(Proto::Udp, &format!("198.18.100.2:{port}"), "198.18.0.10:53", 0)).unwrap();
        assert_eq!((t.decision, t.counter), ("new_flow", "dnat_new"));
        let b = t.backend.unwrap();
        assert!(matches!(b.slot, Some(1..=3)), "{b:?}");
        assert_eq!(b.port, 5353);
        assert!(t.rewrite.unwrap().checksums_valid);
        seen.insert(b.address);
    }
    assert_eq!(live.snapshot(), before, "60 traces of new flows changed a map");
    assert!(seen.len() >= 2, "the trace draws slots at random like the datapath: {seen:?}");

    // No frontend; a frontend without endpoints.
    let t = tracer.run(&req(Proto::Tcp, "198.18.100.2:1", "198.18.0.99:80", 0x02)).unwrap();
    assert_eq!((t.decision, t.verdict, t.counter), ("no_service", "XDP_PASS", "pass_no_service"));
    assert!(t.rewrite.is_none());
    let syn_to_empty = req(Proto::Tcp, "198.18.100.2:1", "198.18.0.12:80", 0x02);
    let t = tracer.run(&syn_to_empty).unwrap();
    assert_eq!((t.decision, t.verdict, t.counter), ("reject", "XDP_TX", "reject_no_backend"));
    assert!(t.reason.contains("a TCP reset"), "{}", t.reason);
    let rst = req(Proto::Tcp, "198.18.100.2:1", "198.18.0.12:80", 0x04);
    let t2 = tracer.run(&rst).unwrap();
    assert_eq!((t2.decision, t2.verdict, t2.counter), ("no_backend", "XDP_DROP", "drop_no_backend"));
    assert_eq!(live.snapshot(), before);
    assert_eq!(t.frame_out, live.run(&frame(&syn_to_empty)).1, "the trace's reset is the datapath's");

    // The tracked flow's backend goes away: the trace says the flow is balanced again, and the
    // stale conntrack entry is still there afterwards (only a real packet removes it).
    let gone = chosen.ip().to_string();
    let remaining: Vec<String> = ["198.18.1.2", "198.18.2.2", "198.18.3.2"]
        .iter()
        .filter(|a| **a != gone)
        .map(|a| format!("- addresses: [{a}]"))
        .collect();
    let manifest = MANIFEST.replace(
        "- addresses: [198.18.1.2]\n- addresses: [198.18.2.2]\n- addresses: [198.18.3.2]",
        &remaining.join("\n"),
    );
    live.apply(&manifest);
    let before = live.snapshot();
    let t = tracer.run(&ack).unwrap();
    assert_eq!(live.snapshot(), before, "the stale entry must survive a trace");
    assert_eq!((t.conntrack, t.decision, t.counter), ("stale", "new_flow", "dnat_new"));
    assert_ne!(t.backend.unwrap().address, gone);
    assert!(t.not_done.iter().any(|s| s.contains("remove the stale conntrack entry")), "{:?}", t.not_done);

    drop(tracer);
    assert_eq!(live.pins(), pins_before, "the tracer pins nothing");
}

#[test]
fn trace_refuses_maps_that_are_not_there() {
    if !privileged("trace tests need root (BPF_PROG_TEST_RUN)") {
        return;
    }
    ensure_bpffs().unwrap();
    let dir = PathBuf::from("/sys/fs/bpf").join(unique_prefix());
    let _guard = DirGuard(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let err = Tracer::open(&dir).err().expect("no maps, no trace");
    assert!(format!("{err:#}").contains("xlb agent has not run"), "{err:#}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing was created or pinned");
}

/// IPv6 Services for the IPv6 trace: one endpoint (the choice is certain) and none (refused).
const MANIFEST6: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: solo6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "2001:db8:1::11"
  clusterIPs: ["2001:db8:1::11"]
  ports: [{port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: solo6-1, namespace: default, labels: {kubernetes.io/service-name: solo6}}
addressType: IPv6
ports: [{port: 8443}]
endpoints: [{addresses: ["2001:db8:4::2"]}]
---
apiVersion: v1
kind: Service
metadata: {name: empty6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "2001:db8:1::12"
  clusterIPs: ["2001:db8:1::12"]
  ports: [{port: 80}]
"#;

#[test]
fn trace_follows_the_ipv6_path() {
    if !privileged("trace tests need root (BPF_PROG_TEST_RUN)") {
        return;
    }
    let mut live = Live::new();
    live.apply(&format!("{MANIFEST}{MANIFEST6}"));
    let mut tracer = Tracer::open(&live.pin_dir).expect("tracer");
    let (client, vip) = ("[2001:db8:100::2]:40000", "[2001:db8:1::11]:443");

    // A new flow: the one endpoint, the datapath's own bytes, and nothing changed.
    let syn = req(Proto::Tcp, client, vip, 0x02);
    let before = live.snapshot();
    let t = tracer.run(&syn).unwrap();
    assert_eq!(live.snapshot(), before, "the trace changed a map");
    assert_eq!(
        (t.conntrack, t.decision, t.verdict, t.counter),
        ("none", "new_flow", "XDP_PASS", "dnat_new"),
        "{t:?}"
    );
    let f = t.frontend.as_ref().unwrap();
    assert_eq!(
        (f.frontend.as_str(), f.service.as_str(), f.selectable_backends),
        ("[2001:db8:1::11]:443/TCP", "default/solo6", 1)
    );
    let b = t.backend.as_ref().unwrap();
    assert_eq!((b.address.as_str(), b.port, b.slot), ("2001:db8:4::2", 8443, Some(1)));
    let rw = t.rewrite.as_ref().unwrap();
    assert_eq!(
        (rw.header, rw.before.as_str(), rw.after.as_str()),
        ("destination", vip, "[2001:db8:4::2]:8443")
    );
    assert!(rw.checksums_valid && rw.ip_checksum_before.is_empty());
    let text = lb_userspace::cli::trace::trace_text(&t);
    assert!(text.contains("TCP checksum") && !text.contains("IPv4 checksum"), "{text}");
    let (v, real) = live.run(&frame(&syn));
    assert_eq!(v, 2);
    assert_eq!(t.frame_out, real, "the trace's frame equals the datapath's, byte for byte");
    assert_eq!(decode6(&real).unwrap().dst, "[2001:db8:4::2]:8443".parse().unwrap());

    // That flow's next packet, and its reply.
    let ack = req(Proto::Tcp, client, vip, 0x10);
    let before = live.snapshot();
    let t = tracer.run(&ack).unwrap();
    assert_eq!(live.snapshot(), before, "the trace changed a map");
    assert_eq!(
        (t.conntrack, t.decision, t.counter),
        ("forward", "existing_flow", "dnat_established"),
        "{t:?}"
    );
    assert_eq!(t.frame_out, live.run(&frame(&ack)).1);
    let reply = req(Proto::Tcp, "[2001:db8:4::2]:8443", client, 0x12);
    let t = tracer.run(&reply).unwrap();
    assert_eq!((t.conntrack, t.decision, t.counter), ("reply", "reply", "rev_nat"), "{t:?}");
    assert_eq!(t.rewrite.as_ref().map(|r| (r.header, r.after.as_str())), Some(("source", vip)));
    assert_eq!(t.frame_out, live.run(&frame(&reply)).1);

    // No endpoint: refused with a reset, as the datapath does.
    let t = tracer.run(&req(Proto::Tcp, client, "[2001:db8:1::12]:80", 0x02)).unwrap();
    assert_eq!((t.decision, t.verdict, t.counter), ("reject", "XDP_TX", "reject_no_backend"), "{t:?}");
    // No frontend at all.
    let t = tracer.run(&req(Proto::Udp, client, "[2001:db8:1::99]:53", 0)).unwrap();
    assert_eq!((t.decision, t.verdict), ("no_service", "XDP_PASS"), "{t:?}");
    // Mixed families are refused before anything runs.
    assert!(tracer.run(&req(Proto::Tcp, "198.18.100.2:1", vip, 0x02)).is_err());
}

/// An SCTP Service of each family, one endpoint each, for the SCTP trace.
const SCTP_MANIFEST: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: default}
spec:
  clusterIP: 198.18.0.30
  ports: [{port: 3868, targetPort: 13868, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sig-1, namespace: default, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{port: 13868, protocol: SCTP}]
endpoints: [{addresses: [198.18.1.3]}]
---
apiVersion: v1
kind: Service
metadata: {name: sig6, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: "2001:db8:1::30"
  clusterIPs: ["2001:db8:1::30"]
  ports: [{port: 3868, targetPort: 13868, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sig6-1, namespace: default, labels: {kubernetes.io/service-name: sig6}}
addressType: IPv6
ports: [{port: 13868, protocol: SCTP}]
endpoints: [{addresses: ["2001:db8:3::3"]}]
"#;

#[test]
fn trace_shows_an_sctp_translation_with_its_crc32c_right() {
    if !privileged("trace tests need root (BPF_PROG_TEST_RUN)") {
        return;
    }
    let mut live = Live::new();
    live.apply(&format!("{MANIFEST}{SCTP_MANIFEST}"));
    let mut tracer = Tracer::open(&live.pin_dir).expect("tracer");
    for (from, to, backend) in [
        ("198.18.100.2:40000", "198.18.0.30:3868", "198.18.1.3:13868"),
        ("[2001:db8:100::2]:40000", "[2001:db8:1::30]:3868", "[2001:db8:3::3]:13868"),
    ] {
        let t = tracer.run(&req(Proto::Sctp, from, to, 0)).unwrap();
        assert_eq!((t.decision, t.verdict, t.counter), ("new_flow", "XDP_PASS", "dnat_new"), "{t:?}");
        let rw = t.rewrite.as_ref().unwrap();
        assert_eq!((rw.before.as_str(), rw.after.as_str()), (to, backend));
        assert!(rw.checksums_valid, "the CRC32c after the translation: {rw:?}");
        assert_eq!(rw.l4_checksum_before.len(), 10, "a 4-byte checksum in hex: {rw:?}");
        assert_ne!(rw.l4_checksum_before, rw.l4_checksum_after, "the ports changed, so did the CRC32c");
    }
}
