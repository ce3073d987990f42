//! Connection tracking: one LRU entry per direction of each translated flow.
use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_loop};
use lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_F_DNAT_BACK, CT_F_EGRESS_REVNAT,
    CT_F_SNAT, CT_SCTP_S, CT_TCP_CLOSE_S, CT_TCP_ESTABLISHED_S, CT_TCP_SYN_S, CT_UDP_S, Ct4Key, Ct4Value,
    IPPROTO_SCTP, IPPROTO_TCP, SNAT_PORT_MAX, SNAT_PORT_MIN, TCP_ACK, TCP_FIN, TCP_RST,
};

use crate::{
    maps::{CONFIG, CT},
    parse::Packet,
};

/// How long an entry may stay idle: by protocol and, for TCP, by the flags its direction has
/// seen (handshake not yet acknowledged, established, closing). From the agent's settings, else
/// the defaults.
#[inline(always)]
pub fn lifetime(proto: u8, tcp_flags: u8) -> u32 {
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let (syn, est, close, udp) = match CONFIG.get(0) {
        Some(c) => (
            or(c.tcp_syn_s, CT_TCP_SYN_S),
            or(c.tcp_established_s, CT_TCP_ESTABLISHED_S),
            or(c.tcp_close_s, CT_TCP_CLOSE_S),
            or(c.udp_s, CT_UDP_S),
        ),
        None => (CT_TCP_SYN_S, CT_TCP_ESTABLISHED_S, CT_TCP_CLOSE_S, CT_UDP_S),
    };
    if proto == IPPROTO_SCTP {
        CT_SCTP_S
    } else if proto != IPPROTO_TCP {
        udp
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        close
    } else if tcp_flags & TCP_ACK != 0 {
        est
    } else {
        syn
    }
}

/// True when the entry has been idle longer than its lifetime at `now`.
#[inline(always)]
pub fn expired(v: &Ct4Value, proto: u8, now: u32) -> bool {
    idle_past(v.last_seen, v.tcp_flags, proto, now)
}

/// True when an entry last used at `last_seen`, whose flow has seen `tcp_flags`, has been idle
/// longer than its lifetime at `now` (either family's entries).
#[inline(always)]
pub fn idle_past(last_seen: u32, tcp_flags: u8, proto: u8, now: u32) -> bool {
    now.wrapping_sub(last_seen) > lifetime(proto, tcp_flags)
}

/// A new connection (a SYN without ACK, `pkt_flags`) on a tuple whose last connection closed
/// (its forward entry has seen a FIN or RST, `seen`).
#[inline(always)]
pub fn reopened(proto: u8, pkt_flags: u8, seen: u8) -> bool {
    proto == IPPROTO_TCP
        && pkt_flags & (lb_common::TCP_SYN | TCP_ACK) == lb_common::TCP_SYN
        && seen & (TCP_FIN | TCP_RST) != 0
}

/// The SNAT port that probe `i` of a flow hashed to `h` tries: the range, from `h` on.
#[inline(always)]
pub fn snat_port_at(h: u32, i: u32) -> u16 {
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    SNAT_PORT_MIN + (h.wrapping_add(i) % range) as u16
}

/// Seconds of CLOCK_MONOTONIC, coarse (a jiffy's precision is plenty for lifetimes).
#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: helper with no arguments, allowed for XDP programs.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn key_of(pkt: &Packet, dir: u8) -> Ct4Key {
    Ct4Key {
        saddr: pkt.saddr.to_ne_bytes(),
        daddr: pkt.daddr.to_ne_bytes(),
        sport: u16::from_be(pkt.sport),
        dport: u16::from_be(pkt.dport),
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// A conntrack value of either family: what [`touch`] updates.
pub trait Touched {
    fn last_seen(&mut self) -> &mut u32;
    fn tcp_flags(&mut self) -> &mut u8;
}

/// Both families' values have the same two fields.
macro_rules! touched {
    ($($t:ty),*) => {$(
        impl Touched for $t {
            #[inline(always)]
            fn last_seen(&mut self) -> &mut u32 {
                &mut self.last_seen
            }
            #[inline(always)]
            fn tcp_flags(&mut self) -> &mut u8 {
                &mut self.tcp_flags
            }
        }
    )*};
}
touched!(Ct4Value, lb_common::Ct6Value);

/// Marks a tracked entry as used at `now` by a packet with `tcp_flags`; writes only what
/// changed, to keep the cache line clean on the hot path.
#[inline(always)]
pub fn touch<V: Touched>(entry: *mut V, tcp_flags: u8, now: u32) {
    // SAFETY: `entry` came from a lookup in this program run; a concurrent eviction can at worst
    // make us write into a recycled slot, which only affects timestamps and flags.
    let e = unsafe { &mut *entry };
    if *e.last_seen() != now {
        *e.last_seen() = now;
    }
    let seen = *e.tcp_flags();
    if seen | tcp_flags != seen {
        *e.tcp_flags() = seen | tcp_flags;
    }
}

/// A packet's ports as they stand in it (network order), in one word for a call's argument:
/// source port high, destination port low.
#[inline(always)]
pub fn ports_word(pkt: &Packet) -> u32 {
    u32::from(pkt.sport) << 16 | u32::from(pkt.dport)
}

/// A reset from the backend ends the flow: its forward entry (client -> frontend), which only
/// the client's packets touch, is marked too, so that it expires after the closing time rather
/// than the established one (6 hours). A flow whose pod was removed is balanced again at its next
/// packet and reset by the new pod; without this each left an established entry behind. For a
/// SNATed flow the reply entry names the client, and the frontend is in its snat-reply entry.
///
/// The reset's addresses and ports (`ports_word`) as they stand in it; its reply entry's
/// `nat_addr` (as stored), and `nat_port | flags << 16 | proto << 24`. A call of its own, with
/// scalar arguments: its keys on the core's stack would overflow the 512 bytes of the chain.
#[inline(never)]
pub fn reset_by_backend(saddr: u32, daddr: u32, ports: u32, nat_addr: u32, nat: u32) {
    let (sport, dport) = (u16::from_be((ports >> 16) as u16), u16::from_be(ports as u16));
    let (nat_port, flags, proto) = (nat as u16, (nat >> 16) as u8, (nat >> 24) as u8);
    let nat_addr = nat_addr.to_ne_bytes();
    let (client, cport, frontend, fport) = if flags & CT_F_DNAT_BACK != 0 {
        let k = Ct4Key {
            saddr: saddr.to_ne_bytes(),
            daddr: nat_addr,
            sport,
            dport: nat_port,
            proto,
            dir: CT_DIR_SNAT_REPLY,
            _pad: 0,
        };
        let Some(e) = CT.get_ptr(k) else { return };
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        let (fa, fp) = unsafe { ((*e).nat_addr, (*e).nat_port) };
        (nat_addr, nat_port, fa, fp)
    } else {
        (daddr.to_ne_bytes(), dport, nat_addr, nat_port)
    };
    let fwd = Ct4Key {
        saddr: client,
        daddr: frontend,
        sport: cport,
        dport: fport,
        proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    if let Some(e) = CT.get_ptr_mut(fwd) {
        // SAFETY: as in `touch`.
        let e = unsafe { &mut *e };
        e.tcp_flags |= TCP_RST;
    }
}

/// A TCP SYN (no ACK) to a backend that is no frontend (a flow another node balanced, passing
/// through to its pod here) opens a new connection on the tuple (client, backend): a reply entry
/// of this node for that tuple (backend -> client, from an earlier flow of the same client port
/// through this node's own frontend to the same pod) is over, since the pod cannot hold two
/// connections on one tuple. It is removed, so that the new flow's answers are not rewritten
/// with the old flow's frontend (reply entries are used whatever their age). For a TCP SYN
/// without ACK only (the caller tests it: `tcp_flags` is 0 for any other protocol), with its
/// addresses and ports (`ports_word`) as they stand in it. A call of its own, as
/// [`reset_by_backend`].
#[inline(never)]
pub fn syn_to_backend(saddr: u32, daddr: u32, ports: u32) {
    if !crate::filter::has_backend(daddr, ports as u16, IPPROTO_TCP) {
        return;
    }
    let reply = Ct4Key {
        saddr: daddr.to_ne_bytes(),
        daddr: saddr.to_ne_bytes(),
        sport: u16::from_be(ports as u16),
        dport: u16::from_be((ports >> 16) as u16),
        proto: IPPROTO_TCP,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let _ = CT.remove(reply);
}

/// Tracks a new flow: the forward entry (client -> frontend, to be sent to the backend) and the
/// reply entry (backend -> client, to be sent back from the frontend).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    backend_addr: [u8; 4],
    backend_port: u16,
    backend_id: u32,
    svc_id: u32,
    reply_flags: u8,
) -> Result<(), i32> {
    let now = now_secs();
    let fwd = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        tcp_flags: pkt.tcp_flags,
        flags: 0,
        backend_id,
        svc_id,
        created: now,
        last_seen: now,
        snat_port: 0,
        _pad: 0,
    };
    let reply_key = Ct4Key {
        saddr: backend_addr,
        daddr: pkt.saddr.to_ne_bytes(),
        sport: backend_port,
        dport: u16::from_be(pkt.sport),
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let reply = Ct4Value {
        nat_addr: pkt.daddr.to_ne_bytes(),
        nat_port: u16::from_be(pkt.dport),
        tcp_flags: 0,
        flags: reply_flags,
        ..fwd
    };
    // Reply first: once the forward entry exists, packets are translated and their replies
    // must already be recognised.
    CT.insert(reply_key, reply, 0)?;
    CT.insert(key_of(pkt, CT_DIR_FORWARD), fwd, 0)
}

/// BPF_NOEXIST: insert only if the key is new.
const NOEXIST: u64 = 1;

/// Inserts `value` at `key` if the key is free (atomically: of two CPUs claiming it, one wins)
/// or held by an expired entry.
#[inline(always)]
fn claim(key: Ct4Key, value: Ct4Value, proto: u8, now: u32) -> bool {
    if CT.insert(key, value, NOEXIST).is_ok() {
        return true;
    }
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let stale = CT.get_ptr(key).is_some_and(|e| expired(unsafe { &*e }, proto, now));
    stale && CT.insert(key, value, 0).is_ok()
}

/// Tracks a new flow from a node-address frontend to a backend on another node: besides the
/// DNAT, its packets leave with the node address and a SNAT port as their source, so that the
/// backend's replies come back here. A hairpin flow (a pod landing on itself through its
/// Service) is tracked the same way, with the frontend (a ClusterIP) in place of the node
/// address. The SNAT port is written at XDP with the DNAT, the address at TC egress (a packet
/// arriving with a local source address is a martian); so the packet is told apart at egress
/// from any other flow of the same client port to the same backend. Four entries:
///
/// - (backend -> node:snat port, reply): write the client back as destination, at XDP;
/// - (backend -> client, snat reply): write the frontend back as source, at TC egress;
/// - (client:snat port -> backend, snat): write the node address as source, at TC egress;
/// - (client -> frontend, forward): the DNAT and the SNAT port, as for every flow; written last.
///
/// The SNAT port is drawn from a hash of the flow and probed until (backend, node, port) is
/// free, and no other flow of the client from that port to that backend exists. Returns the
/// port; `Err` when no port was free among the probes or an insert failed.
#[inline(always)]
pub fn create_snat(
    pkt: &Packet,
    backend_addr: [u8; 4],
    backend_port: u16,
    backend_id: u32,
    svc_id: u32,
) -> Result<u16, i32> {
    let now = now_secs();
    let client = pkt.saddr.to_ne_bytes();
    let (cport, frontend, fport) =
        (u16::from_be(pkt.sport), pkt.daddr.to_ne_bytes(), u16::from_be(pkt.dport));
    let base = Ct4Value {
        nat_addr: client,
        nat_port: cport,
        tcp_flags: 0,
        flags: CT_F_DNAT_BACK,
        backend_id,
        svc_id,
        created: now,
        last_seen: now,
        snat_port: 0,
        _pad: 0,
    };
    let h = pkt.saddr.wrapping_mul(0x9e37_79b1)
        ^ u32::from(pkt.sport).wrapping_mul(0x85eb_ca6b)
        ^ u32::from_ne_bytes(backend_addr).wrapping_mul(0xc2b2_ae35)
        ^ u32::from(backend_port);
    // The probes run under bpf_loop: the verifier walks the callback once, where 16 probes
    // unrolled here cost it about 200,000 instructions.
    let mut probe = Probe4 {
        base,
        client,
        backend: backend_addr,
        frontend,
        h,
        now,
        backend_port,
        port: 0,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let callback: extern "C" fn(u64, *mut Probe4) -> i64 = probe_port;
    // SAFETY: bpf_loop calls `probe_port` (a static subprogram, passed as a function reference)
    // with a pointer to `probe`, on this stack, at most SNAT_PROBES times.
    unsafe {
        bpf_loop(SNAT_PROBES, callback as *mut core::ffi::c_void, (&mut probe as *mut Probe4).cast(), 0)
    };
    let snat_port = probe.port;
    if snat_port == 0 {
        return Err(-1);
    }
    let reply_key = Ct4Key {
        saddr: backend_addr,
        daddr: client,
        sport: backend_port,
        dport: cport,
        proto: pkt.proto,
        dir: CT_DIR_SNAT_REPLY,
        _pad: 0,
    };
    let reply = Ct4Value { nat_addr: frontend, nat_port: fport, flags: CT_F_EGRESS_REVNAT, ..base };
    CT.insert(reply_key, reply, 0)?;
    let fwd = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        tcp_flags: pkt.tcp_flags,
        flags: CT_F_SNAT,
        snat_port,
        ..base
    };
    CT.insert(key_of(pkt, CT_DIR_FORWARD), fwd, 0)?;
    Ok(snat_port)
}

/// SNAT ports probed for a new flow before giving up.
pub const SNAT_PROBES: u32 = 16;

/// The state of [`create_snat`]'s probes, shared with [`probe_port`].
#[repr(C)]
struct Probe4 {
    /// The SNAT reply entry's value: the client, written back as destination.
    base: Ct4Value,
    client: [u8; 4],
    backend: [u8; 4],
    frontend: [u8; 4],
    /// The flow's hash: probe `i` tries the port at `h + i` in the range.
    h: u32,
    now: u32,
    backend_port: u16,
    /// The port claimed; 0 while none is.
    port: u16,
    proto: u8,
    _pad: [u8; 3],
}

/// bpf_loop's callback for [`create_snat`], probe `i`: claims (backend -> frontend:port) and
/// (client:port -> backend), unless the client has a flow of its own from that port to that
/// backend (it would look alike at egress). A key held by a flow idle past its lifetime is free
/// again (the LRU map would only evict it once full). Returns 1 (stop) once a port is claimed.
#[inline(never)]
extern "C" fn probe_port(i: u64, p: *mut Probe4) -> i64 {
    // SAFETY: bpf_loop passes the caller's `Probe4` through.
    let p = unsafe { &mut *p };
    let port = snat_port_at(p.h, i as u32);
    let back = Ct4Key {
        saddr: p.backend,
        daddr: p.frontend,
        sport: p.backend_port,
        dport: port,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let own = Ct4Key { daddr: p.client, ..back };
    if CT.get_ptr(own).is_some() {
        return 0;
    }
    if !claim(back, p.base, p.proto, p.now) {
        return 0;
    }
    let out_key = Ct4Key {
        saddr: p.client,
        daddr: p.backend,
        sport: port,
        dport: p.backend_port,
        proto: p.proto,
        dir: CT_DIR_SNAT,
        _pad: 0,
    };
    let out = Ct4Value { nat_addr: p.frontend, nat_port: port, flags: 0, ..p.base };
    if !claim(out_key, out, p.proto, p.now) {
        let _ = CT.remove(back);
        return 0;
    }
    p.port = port;
    1
}

/// The entry the backend's replies of the flow tracked by `fwd` (found at `key`) refresh: for a
/// SNATed flow (backend -> node:SNAT port, the node address being the frontend the client
/// called), else (backend -> client).
#[inline(always)]
fn reply_key(key: &Ct4Key, fwd: &Ct4Value) -> Ct4Key {
    let snat = fwd.flags & CT_F_SNAT != 0;
    Ct4Key {
        saddr: fwd.nat_addr,
        daddr: if snat { key.daddr } else { key.saddr },
        sport: fwd.nat_port,
        dport: if snat { fwd.snat_port } else { key.sport },
        proto: key.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// Whether the flow whose forward entry `fwd` was found at `key` is over: idle past its
/// lifetime in both directions (a one-way stream only refreshes one), or a new connection (a
/// SYN without ACK) on a tuple whose last connection closed. Only reads.
#[inline(always)]
pub fn flow_over(key: &Ct4Key, fwd: &Ct4Value, pkt: &Packet, now: u32) -> bool {
    if reopened(pkt.proto, pkt.tcp_flags, fwd.tcp_flags) {
        return true;
    }
    // Used this second: alive whatever the lifetime (at least a second), and no settings read.
    if now == fwd.last_seen || !expired(fwd, key.proto, now) {
        return false;
    }
    match CT.get_ptr(reply_key(key, fwd)) {
        // The flow's state is what both directions have seen (a FIN from either side closes).
        Some(r) => {
            // SAFETY: as above.
            let (seen, flags) = unsafe { ((*r).last_seen, (*r).tcp_flags) };
            idle_past(seen, flags | fwd.tcp_flags, key.proto, now)
        }
        None => true,
    }
}
