//! The datapath fuzzer (`cargo xtask fuzz`; a bounded run is in the test suite): frames made
//! from a corpus of valid ones of every kind the datapath handles, mutated at random, run with
//! BPF_PROG_TEST_RUN through the XDP program, the tc datapath's TC ingress program and the TC
//! egress program, with maps the reconciler filled from Services of every kind. Every run is
//! checked against what the programs may do:
//!
//! - a verdict the program may give (XDP: pass, drop, answer; TC: ok, shot, redirect; egress:
//!   ok only);
//! - a frame passed changed is a translation: its length kept, its IPv4 header and L4 checksums
//!   valid when the input's were (a zero UDP checksum kept zero), only addresses, ports and
//!   checksums changed (and an ICMP error's quoted headers), a new destination a backend of the
//!   frontend it addressed (or a client seen, for a reply to a SNAT port), a new source a
//!   frontend of the backend it came from (or a node address, at egress);
//! - a frame dropped was addressed to a frontend; a frame answered was addressed to a frontend
//!   without endpoints, and the answer is an ICMP port unreachable or a TCP reset to its sender;
//! - the counters: every frame counted once in `rx` and once under one verdict counter.
//!
//! A failing frame is written, with the program and the reason, to a file that `--replay` runs
//! again.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use lb_common::{STAT_NAMES, crc32c, csum};

use crate::{
    cli::packet::{Frame, Frame6, IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, icmp_error4, sctp_data},
    datapath::{
        BpfMaps, Datapath as _,
        ebpf::{self, Capacities, Hook},
    },
    model::{self, ModelConfig, Proto},
    reconcile::Reconciler,
    source::manifests,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frames to make (each runs through the three programs).
    pub frames: u64,
    pub seed: u64,
    /// Frames to run again instead (a file this fuzzer wrote).
    pub replay: Option<PathBuf>,
    /// Where failing frames are written.
    pub failures: PathBuf,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub frames: u64,
    /// Program runs (frames times programs).
    pub runs: u64,
    /// Invariant checks made.
    pub checks: u64,
    /// Runs per program and verdict.
    pub verdicts: BTreeMap<String, u64>,
    /// Runs that changed the frame and passed it (translations).
    pub translated: u64,
    /// Frames BPF_PROG_TEST_RUN would not run (an skb test run refuses some truncated IPv6
    /// headers), per program.
    pub not_run: BTreeMap<&'static str, u64>,
    pub failures: Vec<Failure>,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub program: &'static str,
    pub reason: String,
    pub frame: Vec<u8>,
}

/// Services of every kind, both families: ClusterIP, node ports, externalIP, ingress IP (TCP,
/// UDP and SCTP) with a local, a remote (SNAT) and a terminating endpoint; Local policies with
/// sessionAffinity and loadBalancerSourceRanges; a Service without endpoints; a hostPort.
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  clusterIP: 198.18.0.10
  clusterIPs: [198.18.0.10, "2001:db8:1::10"]
  externalIPs: [198.18.5.10]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
  - {name: sig, port: 3868, targetPort: 13868, nodePort: 30868, protocol: SCTP}
status: {loadBalancer: {ingress: [{ip: 198.18.6.10}, {ip: "2001:db8:6::10"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: sig, port: 13868, protocol: SCTP}]
endpoints:
- {addresses: [198.18.1.2], nodeName: node-1}
- {addresses: [198.18.2.2], nodeName: node-2}
- {addresses: [198.18.1.3], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: sig, port: 13868, protocol: SCTP}]
endpoints:
- {addresses: ["2001:db8:2::2"], nodeName: node-1}
- {addresses: ["2001:db8:3::2"], nodeName: node-2}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.18.0.11
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [198.18.100.0/24]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 198.18.6.11}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.18.1.4], nodeName: node-1}
- {addresses: [198.18.2.4], nodeName: node-2}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  clusterIP: 198.18.0.20
  clusterIPs: [198.18.0.20, "2001:db8:1::20"]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: hp, namespace: default}
spec:
  nodeName: node-1
  containers: [{name: c, image: x, ports: [{containerPort: 443, hostPort: 8443}]}]
status: {podIP: 198.18.1.9, podIPs: [{ip: 198.18.1.9}]}
"#;

const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE6: &str = "2001:db8:100::1";

/// A loaded datapath with its maps filled, and what the checks need to know of its Services.
struct Bed {
    ebpf: aya::Ebpf,
    rec: Reconciler<BpfMaps>,
    /// Frontend (address, port, protocol) -> its backends.
    frontends: BTreeMap<(IpAddr, u16, u8), BTreeSet<(IpAddr, u16)>>,
    /// Backend (address, port, protocol) -> the frontends it serves.
    backends: BTreeMap<(IpAddr, u16, u8), BTreeSet<(IpAddr, u16)>>,
    /// Frontends that refuse new flows (no usable endpoint): answers may come from them.
    refusing: BTreeSet<(IpAddr, u16, u8)>,
    node_addrs: BTreeSet<IpAddr>,
    /// Every source address the run sent (the clients a reply may be sent back to).
    sources: BTreeSet<IpAddr>,
}

impl Bed {
    fn new(maglev: Option<u32>) -> anyhow::Result<Self> {
        let caps = Capacities {
            service_entries: 4096,
            backends: 1024,
            ct_entries: 4096,
            sock_nat_entries: 1024,
            affinity_entries: 1024,
            ipv6_entries: 1024,
        };
        let mut ebpf =
            ebpf::load_hooks(None, caps, &[Hook::Xdp, Hook::Tc]).context("loading the datapath")?;
        let maps = BpfMaps::take(&mut ebpf).and_then(|m| m.with_maglev_taken(&mut ebpf))?;
        let mut rec = Reconciler::new(maps)?;
        if let Some(m) = maglev {
            crate::datapath::write_config(
                &mut ebpf,
                lb_common::DatapathConfig { maglev_size: m, ..Default::default() },
            )?;
            rec.set_maglev(m);
        }
        let node_addrs: Vec<IpAddr> = vec![NODE4.into(), NODE6.parse::<Ipv6Addr>()?.into()];
        let cfg = ModelConfig {
            node_addrs: node_addrs.clone(),
            node_name: Some("node-1".into()),
            ..ModelConfig::default()
        };
        let mut objects = manifests::Objects::default();
        manifests::read_str("fuzz.yaml".as_ref(), SERVICES, &mut objects);
        anyhow::ensure!(objects.errors.is_empty(), "the fuzzer's Services: {:?}", objects.errors);
        let mut m = model::build(&objects.services, &objects.slices, &cfg);
        let pods: Vec<Arc<_>> = objects.pods.into_iter().map(Arc::new).collect();
        model::add_host_ports(&mut m, &pods, &cfg);
        anyhow::ensure!(m.rejected.is_empty(), "the fuzzer's Services: {:?}", m.rejected);
        rec.apply(&m.ports)?;
        let mut bed = Bed {
            ebpf,
            rec,
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            refusing: BTreeSet::new(),
            node_addrs: node_addrs.into_iter().collect(),
            sources: BTreeSet::new(),
        };
        for p in &m.ports {
            let proto = p.id.proto.number();
            let usable = p.backends.iter().any(|b| b.state != model::BackendState::Draining);
            for f in &p.frontends {
                let fk = (f.addr, f.port, proto);
                let bes = bed.frontends.entry(fk).or_default();
                for b in p.backends.iter().filter(|b| b.addr.is_ipv6() == f.addr.is_ipv6()) {
                    bes.insert((b.addr, b.port));
                    bed.backends.entry((b.addr, b.port, proto)).or_default().insert((f.addr, f.port));
                }
                if !usable || bes.is_empty() {
                    bed.refusing.insert(fk);
                }
            }
        }
        anyhow::ensure!(
            !bed.refusing.is_empty() && bed.frontends.len() > 20,
            "the fuzzer's Services are served"
        );
        Ok(bed)
    }

    fn stats(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        Ok(self.rec.datapath().read_stats()?.into_iter().map(|(n, p, _)| (n, p)).collect())
    }
}

/// A small deterministic generator (xorshift64*), so that a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The valid frames mutations start from: to every frontend (TCP with each flag set, UDP with
/// and without checksum, SCTP INIT and DATA), from every backend to clients (replies, SNAT
/// replies to node ports), ICMP errors about flows, IP options, fragments, IPv6 extension
/// headers, and frames that are no Service's.
fn corpus(bed: &Bed, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let client4 = |rng: &mut Rng| {
        let net = if rng.chance(80) { 100 } else { 200 };
        SocketAddrV4::new(Ipv4Addr::new(198, 18, net, 2 + rng.below(4) as u8), 40000 + rng.below(64) as u16)
    };
    let client6 = |rng: &mut Rng| {
        SocketAddrV6::new(
            format!("2001:db8:100::{}", 2 + rng.below(4)).parse().unwrap(),
            40000 + rng.below(64) as u16,
            0,
            0,
        )
    };
    let protos = [Proto::Tcp, Proto::Udp, Proto::Sctp];
    for &(addr, port, proto) in bed.frontends.keys() {
        let Some(p) = Proto::from_number(proto) else { continue };
        for _ in 0..3 {
            match addr {
                IpAddr::V4(a) => {
                    let dst = SocketAddrV4::new(a, port);
                    out.push(frame4(p, client4(rng), dst, rng));
                }
                IpAddr::V6(a) => {
                    let dst = SocketAddrV6::new(a, port, 0, 0);
                    out.push(frame6(p, client6(rng), dst, rng));
                }
            }
        }
    }
    for &(addr, port, proto) in bed.backends.keys() {
        let Some(p) = Proto::from_number(proto) else { continue };
        match addr {
            IpAddr::V4(a) => {
                out.push(frame4(p, SocketAddrV4::new(a, port), client4(rng), rng));
                // A reply to a SNAT port of the node.
                let snat = SocketAddrV4::new(NODE4, lb_common::SNAT_PORT_MIN + rng.below(64) as u16);
                out.push(frame4(p, SocketAddrV4::new(a, port), snat, rng));
            }
            IpAddr::V6(a) => {
                out.push(frame6(p, SocketAddrV6::new(a, port, 0, 0), client6(rng), rng));
            }
        }
    }
    // ICMP errors about a flow: from a router to a frontend (about a reply sent from it), and
    // from a backend to a client.
    let quoted = frame4(Proto::Udp, SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 53), client4(rng), rng);
    out.push(icmp_error4([198, 18, 100, 254], [198, 18, 0, 10], 3, 4, &quoted));
    let quoted = frame4(Proto::Tcp, client4(rng), SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 8080), rng);
    out.push(icmp_error4([198, 18, 1, 2], [198, 18, 100, 2], 3, 3, &quoted));
    // IP options, fragments, IPv6 extension headers, and no Service's traffic.
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 53);
    out.push(Frame { ip_options: vec![1, 1, 1, 0], ..Frame::udp(client4(rng), vip) }.build());
    out.push(Frame { more_fragments: true, payload: vec![7; 64], ..Frame::udp(client4(rng), vip) }.build());
    out.push(Frame { frag_offset: 9, payload: vec![7; 64], ..Frame::udp(client4(rng), vip) }.build());
    let vip6: SocketAddrV6 = "[2001:db8:1::10]:80".parse().unwrap();
    for ext in [vec![(IPV6_HOP_BY_HOP, 8)], vec![(IPV6_DEST_OPTS, 16)], vec![(IPV6_FRAGMENT, 8)]] {
        out.push(Frame6 { ext, ..Frame6::new(*rng.pick(&protos), client6(rng), vip6) }.build());
    }
    out.push(frame4(Proto::Tcp, client4(rng), SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 80), rng));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    out.push(arp);
    out
}

fn frame4(p: Proto, src: SocketAddrV4, dst: SocketAddrV4, rng: &mut Rng) -> Vec<u8> {
    let mut f = Frame::new(p, src, dst);
    match p {
        Proto::Tcp => f.tcp_flags = *rng.pick(&[0x02, 0x10, 0x12, 0x18, 0x11, 0x04, 0x14]),
        Proto::Udp => {
            f.udp_no_checksum = rng.chance(20);
            f.payload = vec![rng.next() as u8; rng.below(200) as usize];
        }
        Proto::Sctp => {
            if rng.chance(50) {
                f.payload = sctp_data(rng.next() as u32, &vec![0x5c; rng.below(600) as usize]);
            }
        }
    }
    f.build()
}

fn frame6(p: Proto, src: SocketAddrV6, dst: SocketAddrV6, rng: &mut Rng) -> Vec<u8> {
    let mut f = Frame6::new(p, src, dst);
    match p {
        Proto::Tcp => f.tcp_flags = *rng.pick(&[0x02, 0x10, 0x12, 0x11, 0x04]),
        Proto::Udp => f.payload = vec![rng.next() as u8; rng.below(200) as usize],
        Proto::Sctp => {
            if rng.chance(50) {
                f.payload = sctp_data(rng.next() as u32, &vec![0x5c; rng.below(600) as usize]);
            }
        }
    }
    f.build()
}

/// A frame made from `base`: as it is, or mutated one to three times.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut f = base.to_vec();
    if rng.chance(10) {
        return f;
    }
    for _ in 0..1 + rng.below(3) {
        let n = f.len();
        // Headers are where parsers go wrong: most mutations land in the first 80 bytes.
        let at = |rng: &mut Rng| {
            if rng.chance(80) {
                12 + rng.below(68.min(n as u64 - 12)) as usize
            } else {
                rng.below(n as u64) as usize
            }
        };
        match rng.below(9) {
            0 => {
                let cut = 14 + rng.below((n - 13) as u64) as usize;
                f.truncate(cut);
            }
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = at(rng);
                    f[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let i = at(rng);
                let r = rng.next() as u8;
                f[i] = *rng.pick(&[0, 0xff, r]);
            }
            // IPv4: version and IHL, total length, fragment fields, protocol.
            3 if n > 34 => f[14] = (*rng.pick(&[4u8, 6, 0, 15]) << 4) | rng.below(16) as u8,
            4 if n > 34 => {
                let len = *rng.pick(&[0u16, 19, 20, 21, (n - 14) as u16 - 1, (n - 14) as u16 + 1, 0xffff]);
                f[16..18].copy_from_slice(&len.to_be_bytes());
            }
            5 if n > 34 => {
                f[20] = *rng.pick(&[0x20u8, 0x40, 0x3f, 0x00]);
                f[21] = rng.next() as u8;
            }
            6 if n > 34 => f[23] = *rng.pick(&[1u8, 6, 17, 132, 58, 0, 255]),
            // A checksum or a length field in the L4 header.
            7 if n > 40 => {
                let i = 34 + rng.below(20.min(n as u64 - 34)) as usize;
                f[i] = rng.next() as u8;
            }
            _ => {
                let extra = rng.below(64) as usize;
                f.extend((0..extra).map(|_| rng.next() as u8));
            }
        }
    }
    f
}

/// A random frame: an Ethernet header of either IP family and random bytes.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let n = 14 + rng.below(200) as usize;
    let mut f: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    let r = rng.next() as u16;
    let ty: u16 = *rng.pick(&[0x0800, 0x0800, 0x86dd, 0x0806, r]);
    f[12..14].copy_from_slice(&ty.to_be_bytes());
    if ty == 0x0800 && n > 15 {
        f[14] = 0x45;
    }
    f
}

/// What the checks read of a frame: addresses, ports, protocol and checksums, where it has them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Offset of the L4 header; ports when it is TCP, UDP or SCTP and whole.
    l4: usize,
    ports: Option<(u16, u16)>,
    /// IPv4: the header checksum verifies.
    ip_ok: bool,
    /// The L4 checksum verifies (`None`: a fragment, a header cut short, another protocol).
    l4_ok: Option<bool>,
    udp_zero: bool,
    /// Where the bytes that no translation may change begin.
    payload: usize,
}

fn view(f: &[u8]) -> Option<View> {
    if f.len() < 14 {
        return None;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => view4(f),
        0x86dd => view6(f),
        _ => None,
    }
}

/// IPv4 as the datapath reads it: the header within the frame, its total length at least the
/// header (a total length past the frame's end is the kernel's to drop; the datapath may
/// translate it all the same, and its L4 checksum is then not checked here).
fn view4(f: &[u8]) -> Option<View> {
    let ip = f.get(14..)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || tot < ihl || ihl > ip.len() {
        return None;
    }
    let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?);
    let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?);
    let proto = ip[9];
    let ip_ok = csum::fold(csum::sum_words(&ip[..ihl], 0)) == 0xffff;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let l4 = 14 + ihl;
    if frag & 0x1fff != 0 {
        // A later fragment: no L4 header; only its addresses may be rewritten.
        return Some(View {
            v6: false,
            src,
            dst,
            proto,
            l4,
            ports: None,
            ip_ok,
            l4_ok: None,
            udp_zero: false,
            payload: l4,
        });
    }
    let whole = tot <= ip.len() && frag & 0x2000 == 0;
    let seg = &ip[ihl..tot.min(ip.len())];
    let (ports, l4_ok, udp_zero, payload) = l4_view(proto, seg, !whole, l4, |s| {
        csum::l4_checksum_v4(ip[12..16].try_into().unwrap(), ip[16..20].try_into().unwrap(), proto, s)
    });
    Some(View { v6: false, src, dst, proto, l4, ports, ip_ok, l4_ok, udp_zero, payload })
}

/// IPv6 as the datapath reads it, extension headers followed (at most six).
fn view6(f: &[u8]) -> Option<View> {
    let ip = f.get(14..)?;
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
    let (mut next, mut off, mut fragment) = (ip[6], 40usize, false);
    for _ in 0..6 {
        let h = match next {
            0 | 43 | 60 | 51 | 44 => ip.get(off..off + 8)?,
            _ => break,
        };
        if next == 44 {
            let offset_m = u16::from_be_bytes([h[2], h[3]]);
            if offset_m & 0xfff8 != 0 {
                // A later fragment: only its addresses may be rewritten.
                let l4 = 14 + off + 8;
                return Some(View {
                    v6: true,
                    src,
                    dst,
                    proto: h[0],
                    l4,
                    ports: None,
                    ip_ok: true,
                    l4_ok: None,
                    udp_zero: false,
                    payload: l4,
                });
            }
            fragment |= offset_m & 1 != 0;
        }
        let len = match next {
            44 => 8,
            51 => (usize::from(h[1]) + 2) * 4,
            _ => (usize::from(h[1]) + 1) * 8,
        };
        next = h[0];
        off += len;
    }
    let end = (40 + plen).min(ip.len());
    let seg = ip.get(off..end)?;
    let whole = 40 + plen <= ip.len() && !fragment;
    let l4 = 14 + off;
    let proto = next;
    let (ports, l4_ok, udp_zero, payload) = l4_view(proto, seg, !whole, l4, |s| {
        csum::l4_checksum_v6(ip[8..24].try_into().unwrap(), ip[24..40].try_into().unwrap(), proto, s)
    });
    Some(View { v6: true, src, dst, proto, l4, ports, ip_ok: true, l4_ok, udp_zero, payload })
}

/// Ports, checksum, zero UDP checksum and payload offset of an L4 segment at frame offset `l4`.
fn l4_view(
    proto: u8,
    seg: &[u8],
    fragment: bool,
    l4: usize,
    inet: impl Fn(&[u8]) -> u16,
) -> (Option<(u16, u16)>, Option<bool>, bool, usize) {
    let (hlen, check_at, width) = match proto {
        6 => (20, 16, 2),
        17 => (8, 6, 2),
        132 => (12, 8, 4),
        // ICMP and ICMPv6: the header and the quoted headers (IPv4 with options, or IPv6, and 8
        // bytes) may be rewritten.
        1 => (8 + 60 + 8, 2, 2),
        58 => (8 + 40 + 8, 2, 2),
        _ => return (None, None, false, l4),
    };
    let payload = l4 + hlen.min(seg.len());
    if seg.len() < hlen.min(8) {
        return (None, None, false, payload);
    }
    let ports = matches!(proto, 6 | 17 | 132)
        .then(|| (u16::from_be_bytes([seg[0], seg[1]]), u16::from_be_bytes([seg[2], seg[3]])));
    if fragment || seg.len() < hlen.min(check_at + width) || (matches!(proto, 6 | 132) && seg.len() < hlen) {
        return (ports, None, false, payload);
    }
    let mut copy = seg.to_vec();
    copy[check_at..check_at + width].fill(0);
    let udp_zero = proto == 17 && seg[6..8] == [0, 0];
    let ok = match proto {
        132 => crc32c::crc32c(&copy).to_le_bytes() == seg[8..12],
        1 => csum::fold(csum::sum_words(seg, 0)) == 0xffff,
        _ => {
            let c = inet(&copy);
            let c = if proto == 17 && c == 0 { 0xffff } else { c };
            udp_zero || c.to_ne_bytes() == seg[check_at..check_at + 2]
        }
    };
    (ports, Some(ok), udp_zero, payload)
}

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Runs the fuzzer: `opts.frames` frames (or the replayed ones) through each program.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let mut rng = Rng(opts.seed.max(1));
    let mut report = Report::default();
    let frames: Vec<Vec<u8>> = match &opts.replay {
        Some(path) => read_replay(path)?,
        None => Vec::new(),
    };
    // Half the frames against random selection, half against Maglev.
    for (half, maglev) in [(0, None), (1, Some(lb_common::MAGLEV_DEFAULT_SIZE))] {
        let mut bed = Bed::new(maglev)?;
        let corpus = corpus(&bed, &mut rng);
        let n = if opts.replay.is_some() {
            frames.len() as u64
        } else {
            opts.frames / 2 + half * (opts.frames % 2)
        };
        let mut i = 0u64;
        while i < n {
            // In batches, so that the counters are checked for each.
            let batch: Vec<Vec<u8>> = (i..(i + 1000).min(n))
                .map(|k| {
                    if opts.replay.is_some() {
                        frames[k as usize].clone()
                    } else if rng.chance(5) {
                        random_frame(&mut rng)
                    } else {
                        let base = rng.below(corpus.len() as u64) as usize;
                        mutate(&corpus[base], &mut rng)
                    }
                })
                .collect();
            i += batch.len() as u64;
            run_batch(&mut bed, &batch, &mut report)?;
        }
    }
    if !report.failures.is_empty() {
        let mut out = std::fs::File::create(&opts.failures)
            .with_context(|| format!("writing {}", opts.failures.display()))?;
        for f in &report.failures {
            writeln!(out, "{} {} # {}", f.program, hex(&f.frame), f.reason)?;
        }
    }
    Ok(report)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The frames of a failures file (`PROGRAM HEX # REASON` per line).
fn read_replay(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let h = l.split_whitespace().nth(1).context("a line without a frame")?;
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2).context("odd hex")?, 16).context("bad hex"))
                .collect()
        })
        .collect()
}

/// The counters under which a packet the balancing core saw is counted (exactly one each).
fn is_verdict_counter(name: &str) -> bool {
    name.starts_with("pass_")
        || name.starts_with("drop_")
        || name.starts_with("reject_")
        || matches!(name, "dnat_new" | "dnat_established" | "rev_nat" | "icmp_translated" | "frag_translated")
}

fn run_batch(bed: &mut Bed, batch: &[Vec<u8>], report: &mut Report) -> anyhow::Result<()> {
    for frame in batch {
        if let Some(v) = view(frame) {
            bed.sources.insert(v.src);
        }
    }
    for (hook, program) in [(Hook::Xdp, "xlb_xdp"), (Hook::Tc, "xlb_tc_ingress")] {
        let before = bed.stats()?;
        let mut ran = 0u64;
        for frame in batch {
            let Ok((verdict, out)) = ebpf::run_datapath_once(&mut bed.ebpf, hook, frame) else {
                *report.not_run.entry(program).or_default() += 1;
                continue;
            };
            ran += 1;
            report.runs += 1;
            *report.verdicts.entry(format!("{program} {}", verdict_name(verdict))).or_default() += 1;
            if let Err(reason) = check_ingress(bed, frame, verdict, &out, report) {
                report.failures.push(Failure { program, reason, frame: frame.clone() });
            }
        }
        // The counters: every frame in rx, and under exactly one verdict counter (a later
        // fragment's counter at egress aside: egress runs after this).
        let after = bed.stats()?;
        let delta = |n: &str| after.get(n).copied().unwrap_or(0) - before.get(n).copied().unwrap_or(0);
        let verdicts: u64 = STAT_NAMES.iter().filter(|n| is_verdict_counter(n)).map(|n| delta(n)).sum();
        report.checks += 2;
        if delta("rx") != ran || verdicts != ran {
            report.failures.push(Failure {
                program,
                reason: format!(
                    "counters: {ran} frames run, rx grew by {}, the verdict counters by {verdicts}",
                    delta("rx")
                ),
                frame: Vec::new(),
            });
        }
    }
    for frame in batch {
        let egress = ebpf::tc_egress(&mut bed.ebpf)?;
        let Ok((verdict, out)) = ebpf::run_once(egress, frame) else {
            *report.not_run.entry("xlb_tc_egress").or_default() += 1;
            continue;
        };
        report.runs += 1;
        *report.verdicts.entry(format!("xlb_tc_egress {verdict}")).or_default() += 1;
        let r = if verdict != 0 {
            Err(format!("TC egress gave verdict {verdict}; it only ever passes"))
        } else {
            check_translation(bed, frame, &out, true, report)
        };
        if let Err(reason) = r {
            report.failures.push(Failure { program: "xlb_tc_egress", reason, frame: frame.clone() });
        }
    }
    report.frames += batch.len() as u64;
    Ok(())
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "aborted",
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        XDP_TX => "answer",
        _ => "other",
    }
}

fn frontend_of(v: &View) -> Option<(IpAddr, u16, u8)> {
    v.ports.map(|(_, d)| (v.dst, d, v.proto))
}

fn check_ingress(
    bed: &Bed,
    frame: &[u8],
    verdict: u32,
    out: &[u8],
    report: &mut Report,
) -> Result<(), String> {
    report.checks += 1;
    match verdict {
        XDP_PASS => check_translation(bed, frame, out, false, report),
        XDP_DROP => {
            // Drops are for frontends: no endpoint (a reset not answered, rate limit), a Local
            // policy without a local endpoint, source ranges, a full conntrack map.
            let to = view(frame).and_then(|v| frontend_of(&v));
            match to {
                Some(f) if bed.frontends.contains_key(&f) => Ok(()),
                _ => Err(format!("dropped, not addressed to a frontend ({to:?})")),
            }
        }
        XDP_TX => {
            let v = view(frame).ok_or("answered a frame it cannot have parsed")?;
            let f = frontend_of(&v).ok_or("answered a frame without ports")?;
            if !bed.refusing.contains(&f) {
                return Err(format!("answered for {f:?}, which has endpoints"));
            }
            let a = view(out).ok_or("the answer is not an IP packet")?;
            let refusal = match (a.v6, a.proto) {
                (false, 1) => out.get(a.l4..a.l4 + 2) == Some(&[3, 3]),
                (true, 58) => out.get(a.l4..a.l4 + 2) == Some(&[1, 4]),
                (_, 6) => out.get(a.l4 + 13).is_some_and(|fl| fl & 0x04 != 0),
                _ => false,
            };
            report.checks += 2;
            if !refusal {
                return Err("the answer is neither a port unreachable nor a reset".into());
            }
            if (a.src, a.dst) != (v.dst, v.src) || a.l4_ok != Some(true) || !a.ip_ok {
                return Err(format!(
                    "the answer {:?} -> {:?} is not to the sender, or its checksums are wrong",
                    a.src, a.dst
                ));
            }
            Ok(())
        }
        other => Err(format!("verdict {other} ({})", verdict_name(other))),
    }
}

/// A frame passed: unchanged, or translated as the module's text says.
fn check_translation(
    bed: &Bed,
    frame: &[u8],
    out: &[u8],
    egress: bool,
    report: &mut Report,
) -> Result<(), String> {
    report.checks += 1;
    if out == frame {
        return Ok(());
    }
    report.translated += 1;
    if out.len() != frame.len() {
        return Err(format!("translated to {} bytes from {}", out.len(), frame.len()));
    }
    let (a, b) = match (view(frame), view(out)) {
        (Some(a), Some(b)) => (a, b),
        (a, _) => return Err(format!("changed a frame it cannot have parsed ({a:?})")),
    };
    report.checks += 5;
    if a.ip_ok && !b.ip_ok {
        return Err("the IPv4 header checksum broke".into());
    }
    if a.l4_ok == Some(true) && b.l4_ok != Some(true) {
        return Err(format!("the L4 checksum broke ({:?} -> {:?})", a.l4_ok, b.l4_ok));
    }
    if a.udp_zero != b.udp_zero && a.l4_ok.is_some() {
        return Err("a zero UDP checksum was not kept zero (or became zero)".into());
    }
    let fixed = a.payload.min(frame.len());
    if frame[fixed..] != out[fixed..] || frame[..12] != out[..12] {
        return Err(format!("bytes outside the headers changed (from {fixed})"));
    }
    if a.proto != b.proto || a.v6 != b.v6 {
        return Err("the protocol changed".into());
    }
    let (Some((sp, dp)), Some((nsp, ndp))) = (a.ports, b.ports) else {
        // ICMP errors: the outer addresses only.
        // ICMP errors and later fragments: the outer addresses only, each one that changed now a
        // frontend's, a backend's, a node's or a client's.
        let known = |x: &IpAddr| {
            bed.frontends.keys().any(|f| f.0 == *x)
                || bed.backends.keys().any(|f| f.0 == *x)
                || bed.sources.contains(x)
                || bed.node_addrs.contains(x)
        };
        for (old, new) in [(a.src, b.src), (a.dst, b.dst)] {
            if old != new && !known(&new) {
                return Err(format!("an address rewritten to {new}, no frontend, backend, node or client"));
            }
        }
        return Ok(());
    };
    if (a.dst, dp) != (b.dst, ndp) {
        // A new destination: a backend of the frontend addressed, or (a reply to a SNAT port of
        // this node) a client.
        match bed.frontends.get(&(a.dst, dp, a.proto)) {
            Some(bes) if !egress => {
                if !bes.contains(&(b.dst, ndp)) {
                    return Err(format!(
                        "sent to {}, not a backend of {}",
                        sock(b.dst, ndp),
                        sock(a.dst, dp)
                    ));
                }
            }
            _ if bed.node_addrs.contains(&a.dst) && !egress => {
                if !bed.sources.contains(&b.dst) {
                    return Err(format!(
                        "a reply to {} sent to {}, no client",
                        sock(a.dst, dp),
                        sock(b.dst, ndp)
                    ));
                }
            }
            _ => return Err(format!("destination {} rewritten to {}", sock(a.dst, dp), sock(b.dst, ndp))),
        }
    }
    if (a.src, sp) != (b.src, nsp) {
        // A new source: the frontend a backend's reply is from; at egress or for a SNATed flow,
        // a node address; a SNAT port for a SNATed flow (its address comes at egress).
        let from_backend = bed.backends.get(&(a.src, sp, a.proto));
        let ok = from_backend.is_some_and(|fs| fs.contains(&(b.src, nsp)))
            || (bed.node_addrs.contains(&b.src))
            || (b.src == a.src && (lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&nsp));
        if !ok {
            return Err(format!("source {} rewritten to {}", sock(a.src, sp), sock(b.src, nsp)));
        }
    }
    Ok(())
}

fn sock(a: IpAddr, p: u16) -> SocketAddr {
    SocketAddr::new(a, p)
}
