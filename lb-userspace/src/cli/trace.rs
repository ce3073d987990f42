//! `xlb trace`: the datapath's decision for one made-up packet, taken by the kernel.
//!
//! The object's trace program (`xlb_xdp_trace`, the datapath's own code built a second time with
//! tracing on) is loaded against the live pinned maps and run once with BPF_PROG_TEST_RUN on a
//! crafted frame. It makes the same lookups and the same choice as the attached program and
//! rewrites the frame the same way, but it records its steps in a private map instead of
//! creating, touching or deleting conntrack entries or counting anything. The rewritten frame
//! comes back from the kernel and is decoded here.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{
    MAP_TRACE, STAT_NAMES, TRACE_AFFINITY, TRACE_CT_EXPIRED, TRACE_CT_FORWARD, TRACE_CT_REPLY,
    TRACE_CT_STALE, TRACE_FRONTEND, TRACE_MAGLEV, TRACE_REWRITE, TraceRecord,
};
use serde::Serialize;

use crate::{
    cli::packet::{ETH_HLEN, Frame, Frame6, checksum_field, decode, decode6},
    cli::{View, tcp_flag_names},
    datapath::ebpf,
    datapath::{BpfMaps, Datapath as _},
    model::Proto,
};

/// The packet to trace: IPv4 or IPv6 (`from` and `to` of one family).
#[derive(Clone, Debug)]
pub struct TraceRequest {
    pub proto: Proto,
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// TCP flags byte (SYN by default).
    pub tcp_flags: u8,
    /// The interface the packet arrives on (must exist in the caller's network namespace).
    pub iface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TracePacket {
    pub protocol: String,
    pub from: String,
    pub to: String,
    pub tcp_flags: String,
    pub iface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceFrontend {
    pub frontend: String,
    /// `NS/NAME[:PORT]`.
    pub service: String,
    pub service_id: u32,
    /// Backends new flows choose from.
    pub selectable_backends: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceBackend {
    pub id: u32,
    pub address: String,
    pub port: u16,
    /// For a new flow, the slot chosen (1..=selectable_backends).
    pub slot: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    /// `destination` (towards a backend) or `source` (a reply, back to the frontend).
    pub header: &'static str,
    pub before: String,
    pub after: String,
    pub ip_checksum_before: String,
    pub ip_checksum_after: String,
    pub l4_checksum_before: String,
    pub l4_checksum_after: String,
    /// Both checksums of the rewritten frame verify.
    pub checksums_valid: bool,
}

/// The schema of `xlb trace -o json|yaml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub packet: TracePacket,
    /// `forward` (the flow is tracked), `reply` (a reply of a tracked flow), `stale` (tracked,
    /// but its backend is gone), `expired` (tracked, but over), or `none`.
    pub conntrack: &'static str,
    pub frontend: Option<TraceFrontend>,
    /// `existing_flow`, `reply`, `new_flow`, `no_service`, `no_backend`, `stale_slot`, or the
    /// counter's name for packets passed before any lookup (`pass_not_ipv4`, ...).
    pub decision: &'static str,
    /// Why, in words.
    pub reason: String,
    pub backend: Option<TraceBackend>,
    pub rewrite: Option<Rewrite>,
    /// `XDP_PASS`, `XDP_DROP`, ...
    pub verdict: &'static str,
    /// The counter a real packet is counted under (besides `rx`).
    pub counter: &'static str,
    /// What a real packet would also have changed, and this trace did not.
    pub not_done: Vec<String>,
    /// The frame as the program left it.
    #[serde(skip)]
    pub frame_out: Vec<u8>,
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

/// The trace program, loaded against the pinned maps.
pub struct Tracer {
    ebpf: Ebpf,
    maps: BpfMaps,
}

impl Tracer {
    /// Opens the maps pinned under `pin_dir` and loads the trace program against them.
    pub fn open(pin_dir: &std::path::Path) -> anyhow::Result<Self> {
        let maps = BpfMaps::open(pin_dir)?;
        let ids = maps.ids()?;
        let ebpf = ebpf::load_trace(pin_dir, &ids).context("loading the trace program")?;
        Ok(Tracer { ebpf, maps })
    }

    /// Runs the trace program once on the packet `req` describes.
    pub fn run(&mut self, req: &TraceRequest) -> anyhow::Result<Trace> {
        let flags = if req.proto == Proto::Tcp { req.tcp_flags } else { 0 };
        let frame = match (req.from, req.to) {
            (SocketAddr::V4(from), SocketAddr::V4(to)) => {
                Frame { tcp_flags: flags, ..Frame::new(req.proto, from, to) }.build()
            }
            (SocketAddr::V6(from), SocketAddr::V6(to)) => {
                Frame6 { tcp_flags: flags, ..Frame6::new(req.proto, from, to) }.build()
            }
            _ => anyhow::bail!("--from {} and --to {} are of different families", req.from, req.to),
        };
        self.run_frame(&frame, req)
    }

    /// Runs the trace program once on `frame_in`.
    pub fn run_frame(&mut self, frame_in: &[u8], req: &TraceRequest) -> anyhow::Result<Trace> {
        let ifindex = match &req.iface {
            Some(name) => {
                let c = std::ffi::CString::new(name.as_str()).context("interface name")?;
                // SAFETY: a valid C string.
                let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if i == 0 {
                    anyhow::bail!("no interface {name:?} in this network namespace");
                }
                Some(i)
            }
            None => None,
        };
        {
            let mut rec: Array<_, TraceRecord> =
                Array::try_from(self.ebpf.map_mut(MAP_TRACE).context("the trace map is missing")?)?;
            rec.set(0, TraceRecord::default(), 0).context("clearing the trace record")?;
        }
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (u32 each).
        let ctx: Vec<u8> = [0, frame_in.len() as u32, 0, ifindex.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame_in.len() + 256];
        let prog = ebpf::xdp_trace(&mut self.ebpf)?;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame_in),
                data_out: Some(&mut out),
                ctx_in: ifindex.map(|_| ctx.as_slice()),
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN of the trace program")?;
        out.truncate(r.data_size_out as usize);
        let rec: TraceRecord = {
            let a: Array<_, TraceRecord> =
                Array::try_from(self.ebpf.map(MAP_TRACE).context("the trace map is missing")?)?;
            a.get(&0, 0).context("reading the trace record")?
        };
        self.explain(req, frame_in, out, r.return_value, rec)
    }

    fn explain(
        &self,
        req: &TraceRequest,
        frame_in: &[u8],
        frame_out: Vec<u8>,
        verdict: u32,
        rec: TraceRecord,
    ) -> anyhow::Result<Trace> {
        let view = View::read(&self.maps)?;
        let label = |id: u32| view.port_label(id);
        let v6 = req.to.is_ipv6();
        let backend = |id: u32, slot: Option<u16>| -> anyhow::Result<TraceBackend> {
            let (address, port) = if v6 {
                let b = self.maps.read_backend6(id)?;
                (Ipv6Addr::from(b.addr).to_string(), b.port)
            } else {
                let b = self.maps.read_backend(id)?;
                (Ipv4Addr::from(b.addr).to_string(), b.port)
            };
            Ok(TraceBackend { id, address, port, slot })
        };
        let counter = STAT_NAMES.get(rec.stat as usize).copied().unwrap_or("unknown");
        let protocol = req.proto.to_string();
        let steps = rec.steps;
        let conntrack = if steps & TRACE_CT_STALE != 0 {
            "stale"
        } else if steps & TRACE_CT_EXPIRED != 0 {
            "expired"
        } else if steps & TRACE_CT_FORWARD != 0 {
            "forward"
        } else if steps & TRACE_CT_REPLY != 0 {
            "reply"
        } else {
            "none"
        };
        let frontend = (steps & TRACE_FRONTEND != 0).then(|| TraceFrontend {
            frontend: format!("{}/{protocol}", req.to),
            service: label(rec.svc_id),
            service_id: rec.svc_id,
            selectable_backends: rec.count,
        });
        let mut not_done = Vec::new();
        // What a refusal sends back.
        let answer = match (req.proto, v6) {
            (Proto::Tcp, _) => "a TCP reset",
            (_, false) => "an ICMP port unreachable",
            (_, true) => "an ICMPv6 port unreachable",
        };
        let (decision, reason, chosen) = match counter {
            "dnat_established" => {
                not_done.push("refresh the conntrack entry's last-seen time and TCP flags".to_string());
                (
                    "existing_flow",
                    format!(
                        "the flow is tracked (conntrack entry client -> frontend): it stays with backend {}",
                        rec.backend_id
                    ),
                    Some(backend(rec.backend_id, None)?),
                )
            }
            "rev_nat" => {
                not_done.push("refresh the conntrack entry's last-seen time".to_string());
                (
                    "reply",
                    format!(
                        "a reply of a tracked flow (conntrack entry backend -> client) of {}: its source becomes the frontend again",
                        label(rec.svc_id)
                    ),
                    Some(backend(rec.backend_id, None)?),
                )
            }
            "icmp_translated" => (
                "icmp_error",
                "an ICMP error about a tracked flow: its quoted packet and addresses are translated for the backend or client it concerns".to_string(),
                None,
            ),
            "drop_source_range" => (
                "source_range",
                format!(
                    "{} allows new flows on this LoadBalancer address only from its loadBalancerSourceRanges, and {} is outside them: dropped",
                    label(rec.svc_id),
                    req.from.ip()
                ),
                None,
            ),
            "pass_egress_rev_nat" => {
                not_done.push("refresh the conntrack entry's last-seen time".to_string());
                (
                    "reply",
                    format!(
                        "a reply of a tracked flow of {} to one of this node's addresses: left untouched here so that the kernel routes it; TC egress then sets its source back to the node address and port the client used",
                        label(rec.svc_id)
                    ),
                    Some(backend(rec.backend_id, None)?),
                )
            }
            "dnat_new" => {
                not_done.push(
                    "create the conntrack entries client -> frontend and backend -> client".to_string(),
                );
                not_done.push(format!("add one to backend {}'s new-flow count", rec.backend_id));
                let mut why = if steps & TRACE_AFFINITY != 0 {
                    not_done.push("refresh the client's session affinity".to_string());
                    format!("sessionAffinity ClientIP: the client keeps its backend (slot {})", rec.slot)
                } else if steps & TRACE_MAGLEV != 0 {
                    format!(
                        "slot {} of {} from the service port's Maglev table (the same on every node for this client address and port)",
                        rec.slot, rec.count
                    )
                } else if rec.count == 1 {
                    "the frontend has one backend for new flows".to_string()
                } else {
                    format!(
                        "slot {} of {} chosen at random (a real packet may draw another slot)",
                        rec.slot, rec.count
                    )
                };
                if steps & TRACE_CT_EXPIRED != 0 {
                    why = format!(
                        "the tracked flow is over (idle past its lifetime, or a new connection on a closed one), so it is balanced again; {why}"
                    );
                    not_done.insert(0, "forget the expired conntrack entry".to_string());
                }
                if steps & TRACE_CT_STALE != 0 {
                    why = format!(
                        "the tracked flow's backend {} is gone, so the flow is balanced again; {why}",
                        rec.ct_backend_id
                    );
                    not_done.insert(0, "remove the stale conntrack entry".to_string());
                }
                ("new_flow", why, Some(backend(rec.backend_id, Some(rec.slot))?))
            }
            "reject_no_backend" => (
                "reject",
                format!(
                    "{} has no endpoint that takes new flows: the packet is answered with {answer} to its sender",
                    label(rec.svc_id)
                ),
                None,
            ),
            "drop_no_backend" => (
                "no_backend",
                format!(
                    "{} has no endpoint here that takes new flows, and no answer is sent (a traffic policy Local and no endpoint on this node, or the packet is a reset or carries IP options): it is dropped",
                    label(rec.svc_id)
                ),
                None,
            ),
            "drop_stale_slot" => (
                "stale_slot",
                "the chosen slot or backend vanished while the agent was updating the service".to_string(),
                None,
            ),
            "reject_no_service" => (
                "reject",
                format!(
                    "no Service holds this address, port and protocol, and the address is in the Service ranges (--service-cidr): the packet is answered with {answer} to its sender"
                ),
                None,
            ),
            "drop_no_service" => (
                "no_service",
                "no Service holds this address, port and protocol, in the Service ranges, and no answer is sent (the packet is a reset or carries IP options, or the ICMP rate limit is reached): it is dropped".to_string(),
                None,
            ),
            "frag_translated" => (
                "fragment",
                "a later fragment of a datagram whose first fragment was translated: it gets the addresses that fragment got (its ports are in the first fragment only)".to_string(),
                None,
            ),
            "pass_no_service" => (
                "no_service",
                "no frontend is at this address, port and protocol, and no tracked flow matches: the packet goes on untouched".to_string(),
                None,
            ),
            other => (
                // Passed before any lookup.
                STAT_NAMES.iter().copied().find(|n| *n == other).unwrap_or("unknown"),
                format!("passed untouched ({})", crate::cli::stat_meaning(other)),
                None,
            ),
        };
        not_done.push(format!("count the packet under rx and {counter}"));
        let rewrite = if steps & TRACE_REWRITE != 0 && v6 {
            // IPv6 has no header checksum; the frames are built without extension headers.
            match (decode6(frame_in), decode6(&frame_out)) {
                (Some(b), Some(a)) => {
                    let (header, from, to) =
                        if b.dst != a.dst { ("destination", b.dst, a.dst) } else { ("source", b.src, a.src) };
                    let l4 = ETH_HLEN + 40;
                    Some(Rewrite {
                        header,
                        before: from.to_string(),
                        after: to.to_string(),
                        ip_checksum_before: String::new(),
                        ip_checksum_after: String::new(),
                        l4_checksum_before: checksum_field(req.proto, &frame_in[l4..]),
                        l4_checksum_after: checksum_field(req.proto, &frame_out[l4..]),
                        checksums_valid: a.l4_checksum_ok,
                    })
                }
                _ => None,
            }
        } else if steps & TRACE_REWRITE != 0 {
            let before = decode(frame_in);
            let after = decode(&frame_out);
            match (before, after) {
                (Some(b), Some(a)) => {
                    let (header, from, to) =
                        if b.dst != a.dst { ("destination", b.dst, a.dst) } else { ("source", b.src, a.src) };
                    let ip_off = ETH_HLEN + 10;
                    let ihl = usize::from(frame_in[ETH_HLEN] & 0x0f) * 4;
                    let l4 = ETH_HLEN + ihl;
                    let word = |f: &[u8], o: usize| format!("0x{:04x}", u16::from_be_bytes([f[o], f[o + 1]]));
                    Some(Rewrite {
                        header,
                        before: from.to_string(),
                        after: to.to_string(),
                        ip_checksum_before: word(frame_in, ip_off),
                        ip_checksum_after: word(&frame_out, ip_off),
                        l4_checksum_before: checksum_field(req.proto, &frame_in[l4..]),
                        l4_checksum_after: checksum_field(req.proto, &frame_out[l4..]),
                        checksums_valid: a.ip_checksum_ok && a.l4_checksum_ok,
                    })
                }
                _ => None,
            }
        } else {
            None
        };
        Ok(Trace {
            packet: TracePacket {
                protocol,
                from: req.from.to_string(),
                to: req.to.to_string(),
                tcp_flags: if req.proto == Proto::Tcp {
                    tcp_flag_names(req.tcp_flags)
                } else {
                    String::new()
                },
                iface: req.iface.clone(),
            },
            conntrack,
            frontend,
            decision,
            reason,
            backend: chosen,
            rewrite,
            verdict: verdict_name(verdict),
            counter,
            not_done,
            frame_out,
        })
    }
}

/// `xlb trace` as text.
pub fn trace_text(t: &Trace) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(o, "{k:<11}{v}");
    };
    let mut pkt = format!("{} {} -> {}", t.packet.protocol, t.packet.from, t.packet.to);
    if !t.packet.tcp_flags.is_empty() {
        pkt.push_str(&format!(" [{}]", t.packet.tcp_flags));
    }
    if let Some(i) = &t.packet.iface {
        pkt.push_str(&format!(" on {i}"));
    }
    line("packet", pkt);
    line(
        "conntrack",
        match t.conntrack {
            "forward" => "tracked flow (entry client -> frontend)".into(),
            "reply" => "reply of a tracked flow (entry backend -> client)".into(),
            "stale" => "tracked, but the flow's backend is gone".into(),
            "expired" => {
                "tracked, but the flow is over (idle past its lifetime, or closed and opened again)".into()
            }
            _ => "no entry".into(),
        },
    );
    if let Some(f) = &t.frontend {
        line(
            "frontend",
            format!(
                "{} = {} (service id {}), {} backend(s) take new flows",
                f.frontend, f.service, f.service_id, f.selectable_backends
            ),
        );
    }
    line("decision", format!("{}: {}", t.decision, t.reason));
    if let Some(b) = &t.backend {
        line("backend", format!("#{} {}:{}", b.id, b.address, b.port));
    }
    if let Some(r) = &t.rewrite {
        let l4 =
            format!("{} checksum {} -> {}", t.packet.protocol, r.l4_checksum_before, r.l4_checksum_after);
        let sums = if r.ip_checksum_before.is_empty() {
            // IPv6: no header checksum.
            format!("{l4} ({})", if r.checksums_valid { "valid" } else { "INVALID" })
        } else {
            format!(
                "IPv4 checksum {} -> {}, {l4} ({})",
                r.ip_checksum_before,
                r.ip_checksum_after,
                if r.checksums_valid { "both valid" } else { "INVALID" }
            )
        };
        line("rewrite", format!("{} {} -> {}; {sums}", r.header, r.before, r.after));
    }
    line("verdict", format!("{} (counter {})", t.verdict, t.counter));
    line(
        "not done",
        format!("a real packet would also {}; the trace changed nothing live", t.not_done.join(", ")),
    );
    o
}
