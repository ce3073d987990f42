//! The per-packet decision for IPv6: a tracked flow (forward or reply), a new flow to a frontend
//! of [`SERVICES6`], or pass. The same semantics as the IPv4 path in `lb`, over the IPv6 maps:
//! DNAT to a backend chosen at random among the selectable slots, the reply's source written
//! back to the frontend, both directions tracked, idle flows forgotten by the same lifetimes.
//! Frontends on the node's own addresses (node ports, hostPorts) have their replies translated
//! at TC egress ([`egress`]), and are SNATed to the node when the endpoint is on another node;
//! a pod reaching itself through its Service is SNATed to the frontend (hairpin).
//! The L4 checksum is updated incrementally (IPv6 has no header checksum).
//!
//! Keys and values are built in a per-CPU scratch area ([`SCRATCH6`]) and the larger steps are
//! BPF subprograms (`#[inline(never)]`) with frames of their own: IPv6's 16-byte addresses,
//! 40-byte keys and values would otherwise outgrow the 512 bytes of stack.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, xdp_action},
    helpers::generated::{bpf_get_prandom_u32, bpf_loop},
    programs::TcContext,
};
use lb_common::{
    Affinity4Value, BACKEND_F_LOCAL, BACKEND_STATE_FREE, Backend6, CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT,
    CT_DIR_SNAT_REPLY, CT_F_DNAT_BACK, CT_F_EGRESS_REVNAT, CT_F_SNAT, Ct6Key, Ct6Value, FragPorts,
    IPPROTO_SCTP, IPPROTO_UDP, SCOPE_EXTERNAL, SVC_F_LOCAL, SVC_F_LOCAL_LIST, SVC_F_NO_LOCAL_ENDPOINT,
    SVC_F_SOURCE_RANGES, SrcRange6, Stat, TRACE_AFFINITY, TRACE_CT_EXPIRED, TRACE_CT_FORWARD, TRACE_CT_REPLY,
    TRACE_CT_STALE, TRACE_FRONTEND, TRACE_MAGLEV, TRACE_NEW_FLOW, TRACE_REJECT, TRACE_REWRITE, TraceRecord,
    csum, is_snat_port, maglev_flow_hash6, maglev_key,
};

use crate::{
    ct, filter,
    frame::Frame,
    maps::{
        AFFINITY6, BACKEND_FLOWS6, BACKENDS6, CONFIG, CT6, FRAG6, MAGLEV, SCRATCH_TC, SCRATCH_XDP, SCRATCH6,
        SERVICES6, SOURCE_RANGES6, Scratch6, TRACE as TRACE_MAP,
    },
    nat::{self, Side},
    parse::{self, Fragment6, Packet6, Parsed6, load_addr6, load16, load32, store16},
    stats::{atomic_add, count},
};

#[inline(always)]
fn verdict(stat: Stat, bytes: u64, action: u32) -> Result<u32, ()> {
    count(stat, bytes);
    Ok(action)
}

/// The verdict of the datapath (`TRACE = false`: counted) or of the trace program (recorded in
/// the trace map, nothing counted).
#[inline(always)]
fn verdict_t<const TRACE: bool>(stat: Stat, bytes: u64, action: u32) -> Result<u32, ()> {
    if TRACE {
        step::<TRACE>(|r| {
            r.stat = stat as u32;
            r.verdict = action;
        });
        Ok(action)
    } else {
        verdict(stat, bytes, action)
    }
}

/// Records a step of the trace program's decision; nothing in the datapath.
#[inline(always)]
fn step<const TRACE: bool>(f: impl FnOnce(&mut TraceRecord)) {
    if TRACE && let Some(r) = TRACE_MAP.get_ptr_mut(0) {
        // SAFETY: the single-entry trace array, from a lookup in this run; only the trace
        // program (run by one `xlb trace` at a time, on its own copy of the map) writes it.
        f(unsafe { &mut *r });
    }
}

/// Writes the packet's tuple into `key`, with direction `dir`.
#[inline(always)]
fn fill_key(key: &mut Ct6Key, pkt: &Packet6, dir: u8) {
    // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
    unsafe {
        load_addr6(pkt.l3 + 8, &mut key.saddr);
        load_addr6(pkt.l3 + 24, &mut key.daddr);
    }
    key.sport = u16::from_be(pkt.sport);
    key.dport = u16::from_be(pkt.dport);
    key.proto = pkt.proto;
    key.dir = dir;
    key._pad = 0;
}

/// Translates `pkt` in frame `f`: `addr` and `port` (host order) into the chosen side, and
/// `src_port` (host order), unless 0, as its source port (a SNATed flow's port; its address
/// comes at TC egress). The two ports come as one argument, `port | src_port << 16` (a BPF
/// function takes at most five). The L4 checksum (whose pseudo-header covers both addresses)
/// is updated in place on an XDP buffer ([`rewrite`], [`rewrite_port`]: the XDP program's
/// subprograms as they were before the tc datapath, which bench-datapath measured 10 ns faster
/// on an IPv6 established flow than one subprogram for both frames), by the kernel's helper on
/// an skb ([`translate_skb`]; see [`crate::frame`]).
#[inline(always)]
fn translate<F: Frame>(f: F, pkt: &Packet6, side: Side, addr: &[u8; 16], ports: u32) {
    if pkt.proto == IPPROTO_SCTP {
        translate_sctp(f, pkt, side, addr, ports);
        return;
    }
    if F::SKB {
        translate_skb(f, pkt, side, addr, ports);
        return;
    }
    let (port, src_port) = (ports as u16, (ports >> 16) as u16);
    rewrite(pkt, side, addr, port);
    if src_port != 0 {
        rewrite_port(pkt, Side::Source, src_port);
    }
}

/// [`translate`] on an skb: the addresses and ports written in place, the L4 checksum through
/// `bpf_l4_csum_replace`.
#[inline(never)]
fn translate_skb<F: Frame>(f: F, pkt: &Packet6, side: Side, addr: &[u8; 16], ports: u32) {
    let (port, src_port) = ((ports as u16).to_be(), ((ports >> 16) as u16).to_be());
    let (addr_off, port_off) = match side {
        Side::Source => (8, 0),
        Side::Destination => (24, 2),
    };
    // The pseudo-header's change, as a one's complement sum of 16-bit words.
    let diff = write_addr(pkt, addr_off, addr);
    // SAFETY: parse6() bounds-checked the L4 header (20 bytes for TCP, 8 for UDP), which holds
    // the ports and the checksum.
    let (old_port, old_sport) = unsafe {
        let old = (load16(pkt.l4 + port_off), load16(pkt.l4));
        store16(pkt.l4 + port_off, port);
        if src_port != 0 {
            store16(pkt.l4, src_port);
        }
        old
    };
    // An offset, not a pointer: the helper invalidates every packet pointer.
    let check_off = pkt.l4_check - f.data();
    // A UDP checksum of zero means "none" and stays so. BPF_F_IPV6: an skb whose checksum
    // covers the whole frame keeps it (the address moved within the frame, no header checksum
    // took the change); kernels before 6.16 do not know the flag and refuse it.
    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    let _ = (f.l4_csum_replace(check_off, 0, diff, pseudo | BPF_F_IPV6)
        || f.l4_csum_replace(check_off, 0, diff, pseudo))
        && (old_port == port
            || f.l4_csum_replace(check_off, u32::from(old_port), u32::from(port), mangled | 2))
        && (src_port == 0
            || f.l4_csum_replace(check_off, u32::from(old_sport), u32::from(src_port), mangled | 2));
}

/// Writes `addr` at `addr_off` of `pkt`'s IPv6 header; the change as a one's complement sum of
/// 16-bit words (what a checksum over the addresses, or of the whole frame, must take in).
#[inline(always)]
fn write_addr(pkt: &Packet6, addr_off: usize, addr: &[u8; 16]) -> u32 {
    let mut diff = 0u32;
    let mut i = 0;
    while i < 8 {
        let new = u16::from_ne_bytes([addr[2 * i], addr[2 * i + 1]]);
        // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
        unsafe {
            diff += u32::from(!load16(pkt.l3 + addr_off + 2 * i)) + u32::from(new);
            store16(pkt.l3 + addr_off + 2 * i, new);
        }
        i += 1;
    }
    diff
}

/// [`translate`] for SCTP, on either frame: the address and ports written in place, then the
/// CRC32c updated for the ports (SCTP's checksum has no pseudo-header); on an skb whose checksum
/// covers the frame, that sum follows every change.
#[inline(never)]
fn translate_sctp<F: Frame>(f: F, pkt: &Packet6, side: Side, addr: &[u8; 16], ports: u32) {
    let (port, src_port) = ((ports as u16).to_be(), ((ports >> 16) as u16).to_be());
    let (addr_off, port_off) = match side {
        Side::Source => (8, 0),
        Side::Destination => (24, 2),
    };
    let len = pkt.sctp_len();
    let diff = write_addr(pkt, addr_off, addr);
    // SAFETY: parse6() bounds-checked SCTP's 12-byte common header.
    unsafe {
        let old_ports = load32(pkt.l4);
        store16(pkt.l4 + port_off, port);
        if src_port != 0 {
            store16(pkt.l4, src_port);
        }
        nat::defer_sctp6(f, pkt.l4, old_ports, len, diff);
    }
}

/// Writes `addr` and `port` (host order) into the chosen side of `pkt` and fixes the L4
/// checksum (the pseudo-header covers both addresses).
#[inline(never)]
fn rewrite(pkt: &Packet6, side: Side, addr: &[u8; 16], port: u16) {
    let (addr_off, port_off) = match side {
        Side::Source => (8, 0),
        Side::Destination => (24, 2),
    };
    let port = port.to_be();
    let l4_check = pkt.l4_check;
    let mut old = [0u16; 8];
    let mut new = [0u16; 8];
    let mut i = 0;
    while i < 8 {
        // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
        old[i] = unsafe { load16(pkt.l3 + addr_off + 2 * i) };
        new[i] = u16::from_ne_bytes([addr[2 * i], addr[2 * i + 1]]);
        i += 1;
    }
    // SAFETY: parse6() bounds-checked the L4 header (20 bytes for TCP, 8 for UDP), which holds
    // the ports and the checksum.
    unsafe {
        let old_port = load16(pkt.l4 + port_off);
        let old_l4 = load16(l4_check);
        let mut l4 = csum::replace2(csum::replace16(old_l4, &old, &new), old_port, port);
        if pkt.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        store16(l4_check, l4);
        store16(pkt.l4 + port_off, port);
        let mut i = 0;
        while i < 8 {
            store16(pkt.l3 + addr_off + 2 * i, new[i]);
            i += 1;
        }
    }
}

/// Writes `port` (host order) into the chosen side of `pkt` and fixes the L4 checksum.
#[inline(never)]
fn rewrite_port(pkt: &Packet6, side: Side, port: u16) {
    let off = match side {
        Side::Source => 0,
        Side::Destination => 2,
    };
    let port = port.to_be();
    // SAFETY: parse6() bounds-checked the L4 header, which holds the ports and the checksum.
    unsafe {
        let old_port = load16(pkt.l4 + off);
        let old_l4 = load16(pkt.l4_check);
        let mut l4 = csum::replace2(old_l4, old_port, port);
        if pkt.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        store16(pkt.l4_check, l4);
        store16(pkt.l4 + off, port);
    }
}

/// The ports argument of [`translate`].
#[inline(always)]
fn ports(port: u16, src_port: u16) -> u32 {
    u32::from(port) | (u32::from(src_port) << 16)
}

/// `BPF_F_IPV6` of `bpf_l4_csum_replace` (Linux 6.16).
const BPF_F_IPV6: u64 = 1 << 7;

/// As `ct::flow_over`: the flow tracked by `fwd` (found at `s.key`) is idle past its lifetime
/// in both directions, or a new connection comes on a tuple whose last connection closed.
#[inline(never)]
fn flow_over(s: &mut Scratch6, fwd: &Ct6Value, pkt: &Packet6, now: u32) -> bool {
    if ct::reopened(pkt.proto, pkt.tcp_flags, fwd.tcp_flags) {
        return true;
    }
    if now == fwd.last_seen || !ct::idle_past(fwd.last_seen, fwd.tcp_flags, s.key.proto, now) {
        return false;
    }
    // The reply entry: backend -> client, or backend -> node:SNAT port for a SNATed flow (the
    // node address being the frontend the client called).
    let snat = fwd.flags & CT_F_SNAT != 0;
    s.key2 = Ct6Key {
        saddr: fwd.nat_addr,
        daddr: if snat { s.key.daddr } else { s.key.saddr },
        sport: fwd.nat_port,
        dport: if snat { fwd.snat_port } else { s.key.sport },
        proto: s.key.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    match CT6.get_ptr(&s.key2) {
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        Some(r) => unsafe { ct::idle_past((*r).last_seen, (*r).tcp_flags | fwd.tcp_flags, s.key.proto, now) },
        None => true,
    }
}

/// Tracks a new flow to `be` (`s.backend_id`, of `s.svc_id`): the reply entry first (its packets
/// must be recognised once the forward one translates), then the forward entry (`s.key` holds
/// the packet's tuple, forward). The reply entry gets `reply_flags`. `false` when an insert
/// failed.
#[inline(never)]
fn create(s: &mut Scratch6, pkt: &Packet6, be: &Backend6, reply_flags: u8) -> bool {
    let now = ct::now_secs();
    let (backend_id, svc_id) = (s.backend_id, s.svc_id);
    // The reply entry: (backend -> client), written back as (frontend -> client).
    s.key2 = Ct6Key {
        saddr: be.addr,
        daddr: s.key.saddr,
        sport: be.port,
        dport: s.key.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    s.val = Ct6Value {
        nat_addr: s.key.daddr,
        nat_port: s.key.dport,
        tcp_flags: 0,
        flags: reply_flags,
        backend_id,
        svc_id,
        created: now,
        last_seen: now,
        snat_port: 0,
        _pad: 0,
    };
    if CT6.insert(&s.key2, &s.val, 0).is_err() {
        return false;
    }
    s.val.nat_addr = be.addr;
    s.val.nat_port = be.port;
    s.val.tcp_flags = pkt.tcp_flags;
    s.val.flags = 0;
    CT6.insert(&s.key, &s.val, 0).is_ok()
}

/// BPF_NOEXIST: insert only if the key is new.
const NOEXIST: u64 = 1;

/// Inserts `val` at `key` if the key is free (of two CPUs claiming it, one wins) or held by an
/// entry idle past its lifetime.
#[inline(always)]
fn claim(key: &Ct6Key, val: &Ct6Value, now: u32) -> bool {
    if CT6.insert(key, val, NOEXIST).is_ok() {
        return true;
    }
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let stale = CT6
        .get_ptr(key)
        .is_some_and(|e| unsafe { ct::idle_past((*e).last_seen, (*e).tcp_flags, key.proto, now) });
    stale && CT6.insert(key, val, 0).is_ok()
}

/// As `ct::create_snat`, for IPv6: tracks a new flow from a node-address frontend to a backend on
/// another node, or a hairpin flow, with four entries:
///
/// - (backend -> frontend:SNAT port, reply): write the client back as destination, at XDP;
/// - (backend -> client, SNAT reply): write the frontend back as source, at TC egress;
/// - (client:SNAT port -> backend, SNAT): write the frontend as source, at TC egress;
/// - (client -> frontend, forward): the DNAT and the SNAT port; written last.
///
/// The SNAT port is drawn from a hash of the flow and probed until both keys it needs are free
/// and the client has no flow of its own from that port to that backend. Returns the port, 0 when
/// none was free among the probes or an insert failed.
#[inline(never)]
fn create_snat(s: &mut Scratch6, pkt: &Packet6) -> u16 {
    // Every key and value is written in place in the scratch area: built on the stack, they would
    // take this subprogram past what the call chain may use.
    let now = ct::now_secs();
    let proto = pkt.proto;
    // The base value: the client, written back as destination of the backend's replies.
    s.val.nat_addr = s.key.saddr;
    s.val.nat_port = s.key.sport;
    s.val.tcp_flags = 0;
    s.val.flags = CT_F_DNAT_BACK;
    s.val.backend_id = s.backend_id;
    s.val.svc_id = s.svc_id;
    s.val.created = now;
    s.val.last_seen = now;
    s.val.snat_port = 0;
    s.val._pad = 0;
    // The SNAT entry's value: the frontend, as source, with the port set below.
    s.val2 = s.val;
    s.val2.nat_addr = s.key.daddr;
    s.val2.flags = 0;
    let w = |a: &[u8; 16]| u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    let h = w(&s.key.saddr).wrapping_mul(0x9e37_79b1)
        ^ u32::from(s.key.sport).wrapping_mul(0x85eb_ca6b)
        ^ w(&s.be.addr).wrapping_mul(0xc2b2_ae35)
        ^ u32::from(s.be.port);
    // The probes run under bpf_loop: the verifier walks the callback once, where 16 probes
    // unrolled cost it about 400,000 instructions (checked by the verifier test in packet6.rs).
    let mut probe = Probe { h, now, port: 0 };
    let callback: extern "C" fn(u64, *mut Probe) -> i64 = probe_port;
    // SAFETY: bpf_loop calls `probe_port` (a static subprogram, passed as a function reference)
    // with a pointer to `probe`, on this stack, at most SNAT_PROBES times.
    unsafe {
        bpf_loop(ct::SNAT_PROBES, callback as *mut core::ffi::c_void, (&mut probe as *mut Probe).cast(), 0)
    };
    let snat_port = probe.port;
    if snat_port == 0 {
        return 0;
    }
    // (backend -> client): the frontend back as source at egress.
    let be = s.be;
    set_key(&mut s.key2, &be.addr, &s.key.saddr, be.port, s.key.sport, proto, CT_DIR_SNAT_REPLY);
    s.val2.nat_addr = s.key.daddr;
    s.val2.nat_port = s.key.dport;
    s.val2.flags = CT_F_EGRESS_REVNAT;
    if CT6.insert(&s.key2, &s.val2, 0).is_err() {
        return 0;
    }
    // The forward entry: the DNAT and the SNAT port.
    s.val2.nat_addr = be.addr;
    s.val2.nat_port = be.port;
    s.val2.tcp_flags = pkt.tcp_flags;
    s.val2.flags = CT_F_SNAT;
    s.val2.snat_port = snat_port;
    if CT6.insert(&s.key, &s.val2, 0).is_err() {
        return 0;
    }
    snat_port
}

/// The state of [`create_snat`]'s probes, shared with [`probe_port`].
#[repr(C)]
struct Probe {
    /// The flow's hash: probe `i` tries the port at `h + i` in the range.
    h: u32,
    now: u32,
    /// The port claimed; 0 while none is.
    port: u16,
}

/// bpf_loop's callback for [`create_snat`]: probe `i`. Returns 1 (stop) once a port is claimed.
#[inline(never)]
extern "C" fn probe_port(i: u64, probe: *mut Probe) -> i64 {
    // SAFETY: bpf_loop passes the caller's `Probe` through.
    let probe = unsafe { &mut *probe };
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) else { return 1 };
    // SAFETY: the per-CPU scratch entry of XDP, which created it; this run is its only user.
    let s = unsafe { &mut *s };
    let port = ct::snat_port_at(probe.h, i as u32);
    if claim_port(s, port, probe.now) {
        probe.port = port;
        return 1;
    }
    0
}

/// One probe of [`create_snat`]: claims `port` for the flow at `s.key` to `s.be`, or leaves
/// everything as it was. A subprogram of its own: inlined into [`probe_port`], it costs the
/// verifier about 30,000 more instructions (checked by the verifier test in packet6.rs).
#[inline(never)]
fn claim_port(s: &mut Scratch6, port: u16, now: u32) -> bool {
    let (proto, be) = (s.key.proto, s.be);
    // The client's own flow from that port to that backend (not SNATed) would look alike at
    // egress.
    set_key(&mut s.key3, &be.addr, &s.key.saddr, be.port, port, proto, CT_DIR_REPLY);
    if CT6.get_ptr(&s.key3).is_some() {
        return false;
    }
    // Claim (backend -> frontend:port), then (client:port -> backend).
    set_key(&mut s.key2, &be.addr, &s.key.daddr, be.port, port, proto, CT_DIR_REPLY);
    if !claim(&s.key2, &s.val, now) {
        return false;
    }
    set_key(&mut s.key3, &s.key.saddr, &be.addr, port, be.port, proto, CT_DIR_SNAT);
    s.val2.nat_port = port;
    if !claim(&s.key3, &s.val2, now) {
        let _ = CT6.remove(&s.key2);
        return false;
    }
    true
}

/// Writes a conntrack key in place.
#[inline(always)]
fn set_key(k: &mut Ct6Key, saddr: &[u8; 16], daddr: &[u8; 16], sport: u16, dport: u16, proto: u8, dir: u8) {
    k.saddr = *saddr;
    k.daddr = *daddr;
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
    k.dir = dir;
    k._pad = 0;
}

/// A reset from the backend (a reply, its reply entry `e`; its tuple in `s.key`) ends the flow:
/// its forward entry is marked too (as `ct::reset_by_backend`, IPv4).
#[inline(always)]
fn reset_by_backend(s: &mut Scratch6, e: &Ct6Value) {
    let proto = s.key.proto;
    if e.flags & CT_F_DNAT_BACK != 0 {
        // The reply entry names the client; its snat-reply entry (backend -> client), the frontend.
        set_key(&mut s.key2, &s.key.saddr, &e.nat_addr, s.key.sport, e.nat_port, proto, CT_DIR_SNAT_REPLY);
        let Some(sr) = CT6.get_ptr(&s.key2) else { return };
        // SAFETY: pointer from a lookup in this run.
        let sr = unsafe { &*sr };
        set_key(&mut s.key3, &e.nat_addr, &sr.nat_addr, e.nat_port, sr.nat_port, proto, CT_DIR_FORWARD);
    } else {
        set_key(&mut s.key3, &s.key.daddr, &e.nat_addr, s.key.dport, e.nat_port, proto, CT_DIR_FORWARD);
    }
    if let Some(fwd) = CT6.get_ptr_mut(&s.key3) {
        // SAFETY: as in `ct::touch`.
        unsafe { (*fwd).tcp_flags |= lb_common::TCP_RST };
    }
}

/// A TCP SYN to a backend that is no frontend (its tuple in `s.key`) ends this node's reply
/// entry of that tuple (as `ct::syn_to_backend`, IPv4).
#[inline(always)]
fn syn_to_backend(s: &mut Scratch6, pkt: &Packet6) {
    if pkt.proto != lb_common::IPPROTO_TCP
        || pkt.tcp_flags & (lb_common::TCP_SYN | lb_common::TCP_ACK) != lb_common::TCP_SYN
    {
        return;
    }
    set_key(&mut s.key2, &s.key.daddr, &s.key.saddr, s.key.dport, s.key.sport, pkt.proto, CT_DIR_REPLY);
    let _ = CT6.remove(&s.key2);
}

/// Returned by [`process`] for a new flow to a frontend without endpoints: the caller sends the
/// answer ([`crate::reject::answer6`]) and counts it. Not an XDP action.
pub const REJECT: u32 = u32::MAX;
/// Returned by [`process`] for a new flow to an address of the Service ranges that no frontend
/// holds: the caller answers, as for [`REJECT`], and counts it apart.
pub const REJECT_NO_SERVICE: u32 = u32::MAX - 1;

/// A packet of no tracked flow to no frontend: passed, unless its destination lies in the
/// Service ranges (see `lb::no_service`).
#[inline(always)]
fn no_service<const TRACE: bool>(daddr: &[u8; 16], bytes: u64) -> Result<u32, ()> {
    if filter::in_service_range6(daddr) {
        step::<TRACE>(|r| r.steps |= TRACE_REJECT);
        return Ok(REJECT_NO_SERVICE);
    }
    verdict_t::<TRACE>(Stat::PassNoService, bytes, xdp_action::XDP_PASS)
}

/// The IPv6 path, for either program's frame `f`, whose bounds the caller reads: `data` and
/// `end` (read here, from a context only read, the compiler would hand over the 32-bit fields
/// instead, which the verifier refuses to extend into pointers).
#[inline(never)]
pub fn process<const TRACE: bool, F: Frame>(f: F, data: usize, end: usize, bytes: u64) -> Result<u32, ()> {
    let pass = xdp_action::XDP_PASS;
    let pkt = match parse::parse6(data, end) {
        Parsed6::L4(pkt) => pkt,
        Parsed6::Malformed => return verdict_t::<TRACE>(Stat::PassMalformed, bytes, pass),
        Parsed6::OtherProto => {
            let stat = if !TRACE && crate::icmp::translate6(data, end) {
                Stat::IcmpTranslated
            } else {
                Stat::PassOtherProto
            };
            return verdict_t::<TRACE>(stat, bytes, pass);
        }
        Parsed6::Fragment(f) => return later_fragment::<TRACE>(&f, bytes),
        Parsed6::OtherFragment => return verdict_t::<TRACE>(Stat::PassFragment, bytes, pass),
    };
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) else {
        return verdict_t::<TRACE>(Stat::PassNoService, bytes, pass);
    };
    // SAFETY: the per-CPU scratch entry; this program run is the only user on this CPU.
    let s = unsafe { &mut *s };
    fill_key(&mut s.key, &pkt, CT_DIR_FORWARD);

    // The endpoint filter, as for IPv4: a packet to no frontend can be neither a new flow nor a
    // tracked flow's forward direction; one from no backend cannot be a reply. The source is
    // looked up only when needed.
    // Not in a trace: it only skips lookups that would miss.
    let to_known = TRACE || filter::has6(&s.key.daddr, s.key.dport, s.key.proto);
    let from_known = (!to_known).then(|| filter::has6(&s.key.saddr, s.key.sport, s.key.proto));
    if from_known == Some(false) {
        return no_service::<TRACE>(&s.key.daddr, bytes);
    }
    // The first fragment of a datagram to a frontend or from a backend: its later fragments,
    // which carry no ports, are translated as it is (see `later_fragment`).
    if !TRACE && pkt.first_fragment {
        remember_fragment(s, &pkt);
    }

    if let Some(entry) = if to_known { CT6.get_ptr_mut(&s.key) } else { None } {
        let now = ct::now_secs();
        // SAFETY: pointer from a lookup in this run (a map value: stable for the run).
        let fwd = unsafe { &*entry };
        step::<TRACE>(|r| {
            r.steps |= TRACE_CT_FORWARD;
            r.ct_backend_id = fwd.backend_id;
            r.svc_id = fwd.svc_id;
        });
        if flow_over(s, fwd, &pkt, now) {
            if TRACE {
                step::<TRACE>(|r| r.steps |= TRACE_CT_EXPIRED);
            } else {
                let _ = CT6.remove(&s.key);
                count(Stat::CtExpired, 0);
            }
        } else {
            match BACKENDS6.get(fwd.backend_id) {
                Some(be)
                    if be.state != BACKEND_STATE_FREE
                        && be.addr == fwd.nat_addr
                        && be.port == fwd.nat_port =>
                {
                    if !TRACE {
                        ct::touch(entry, pkt.tcp_flags, now);
                    }
                    // The SNAT port is non-zero only in the forward entry of a SNATed flow: the
                    // port now, the address at TC egress.
                    translate(f, &pkt, Side::Destination, &be.addr, ports(be.port, fwd.snat_port));
                    step::<TRACE>(|r| {
                        r.steps |= TRACE_REWRITE;
                        r.backend_id = fwd.backend_id;
                    });
                    return verdict_t::<TRACE>(Stat::DnatEstablished, bytes, pass);
                }
                _ => {
                    // The backend is gone: balance the flow again below.
                    if TRACE {
                        step::<TRACE>(|r| r.steps |= TRACE_CT_STALE);
                    } else {
                        let _ = CT6.remove(&s.key);
                        count(Stat::CtStaleBackend, 0);
                    }
                }
            }
        }
    } else if from_known.unwrap_or_else(|| filter::has6(&s.key.saddr, s.key.sport, s.key.proto)) {
        s.key.dir = CT_DIR_REPLY;
        if let Some(entry) = CT6.get_ptr_mut(&s.key) {
            if !TRACE {
                ct::touch(entry, pkt.tcp_flags, ct::now_secs());
                if pkt.tcp_flags & lb_common::TCP_RST != 0 {
                    // SAFETY: as above.
                    reset_by_backend(s, unsafe { &*entry });
                }
            }
            // SAFETY: as above.
            let e = unsafe { &*entry };
            step::<TRACE>(|r| {
                r.steps |= TRACE_CT_REPLY;
                r.ct_backend_id = e.backend_id;
                r.backend_id = e.backend_id;
                r.svc_id = e.svc_id;
            });
            if e.flags & CT_F_DNAT_BACK != 0 {
                // A reply to a SNATed flow: back to the client; TC egress then gives it the
                // frontend as source.
                translate(f, &pkt, Side::Destination, &e.nat_addr, ports(e.nat_port, 0));
            } else if e.flags & CT_F_EGRESS_REVNAT != 0 {
                // The source becomes a local address: routed first, translated at TC egress.
                return verdict_t::<TRACE>(Stat::PassEgressRevNat, bytes, pass);
            } else {
                translate(f, &pkt, Side::Source, &e.nat_addr, ports(e.nat_port, 0));
            }
            step::<TRACE>(|r| r.steps |= TRACE_REWRITE);
            return verdict_t::<TRACE>(Stat::RevNat, bytes, pass);
        }
        s.key.dir = CT_DIR_FORWARD;
    }
    if !to_known {
        return no_service::<TRACE>(&s.key.daddr, bytes);
    }
    new_flow::<TRACE, F>(f, s, &pkt, bytes)
}

/// Puts the ports of `pkt`, a first fragment whose tuple is in `s.key`, in [`FRAG6`].
#[inline(always)]
fn remember_fragment(s: &mut Scratch6, pkt: &Packet6) {
    s.frag.saddr = s.key.saddr;
    s.frag.daddr = s.key.daddr;
    s.frag.id = pkt.frag_id;
    s.frag.proto = pkt.proto;
    s.frag._pad = [0; 3];
    let _ = FRAG6.insert(&s.frag, FragPorts { sport: pkt.sport, dport: pkt.dport }, 0);
}

/// Finds the ports that the first fragment of `f`'s datagram left in [`FRAG6`] and puts the
/// datagram's tuple in `s.key` (direction `dir`); `false` when there are none (no Service's
/// flow, or the first fragment has not come).
#[inline(always)]
fn fragment_key(s: &mut Scratch6, f: &Fragment6, dir: u8) -> bool {
    // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
    unsafe {
        load_addr6(f.l3 + 8, &mut s.frag.saddr);
        load_addr6(f.l3 + 24, &mut s.frag.daddr);
    }
    s.frag.id = f.id;
    s.frag.proto = f.proto;
    s.frag._pad = [0; 3];
    let Some(p) = FRAG6.get_ptr(&s.frag) else { return false };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (sport, dport) = unsafe { ((*p).sport, (*p).dport) };
    s.key.saddr = s.frag.saddr;
    s.key.daddr = s.frag.daddr;
    s.key.sport = u16::from_be(sport);
    s.key.dport = u16::from_be(dport);
    s.key.proto = f.proto;
    s.key.dir = dir;
    s.key._pad = 0;
    true
}

/// Writes `addr` into the chosen side of the IPv6 header at `l3` (which has no checksum; the
/// L4 checksum is in the datagram's first fragment).
#[inline(always)]
fn rewrite_addr(l3: usize, side: Side, addr: &[u8; 16]) {
    let at = if side == Side::Source { l3 + 8 } else { l3 + 24 };
    let mut i = 0;
    while i < 8 {
        // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
        unsafe { store16(at + 2 * i, u16::from_ne_bytes([addr[2 * i], addr[2 * i + 1]])) };
        i += 1;
    }
}

/// A later fragment of a TCP or UDP datagram: translated as its first fragment was (the tracked
/// flow's addresses; its ports are in the first fragment only). Without a first fragment seen
/// it passes untouched. Reads only: the first fragment made and refreshed the flow's entries.
#[inline(always)]
fn later_fragment<const TRACE: bool>(f: &Fragment6, bytes: u64) -> Result<u32, ()> {
    let pass = xdp_action::XDP_PASS;
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) else {
        return verdict_t::<TRACE>(Stat::PassFragment, bytes, pass);
    };
    // SAFETY: the per-CPU scratch entry; this program run is the only user on this CPU.
    let s = unsafe { &mut *s };
    if !fragment_key(s, f, CT_DIR_FORWARD) {
        return verdict_t::<TRACE>(Stat::PassFragment, bytes, pass);
    }
    if let Some(e) = CT6.get_ptr(&s.key) {
        // SAFETY: pointer from a lookup in this run (a map value: stable for the run).
        rewrite_addr(f.l3, Side::Destination, unsafe { &(*e).nat_addr });
    } else {
        s.key.dir = CT_DIR_REPLY;
        let Some(e) = CT6.get_ptr(&s.key) else {
            return verdict_t::<TRACE>(Stat::PassFragment, bytes, pass);
        };
        // SAFETY: as above.
        let e = unsafe { &*e };
        if e.flags & CT_F_EGRESS_REVNAT != 0 {
            return verdict_t::<TRACE>(Stat::PassEgressRevNat, bytes, pass);
        }
        let side = if e.flags & CT_F_DNAT_BACK != 0 { Side::Destination } else { Side::Source };
        rewrite_addr(f.l3, side, &e.nat_addr);
    }
    step::<TRACE>(|r| r.steps |= TRACE_REWRITE);
    verdict_t::<TRACE>(Stat::FragTranslated, bytes, pass)
}

/// A packet of no tracked flow: to a frontend, a new flow to one of its backends.
#[inline(never)]
fn new_flow<const TRACE: bool, F: Frame>(
    f: F,
    s: &mut Scratch6,
    pkt: &Packet6,
    bytes: u64,
) -> Result<u32, ()> {
    let pass = xdp_action::XDP_PASS;
    let drop = xdp_action::XDP_DROP;
    s.svc.addr = s.key.daddr;
    s.svc.port = s.key.dport;
    s.svc.proto = pkt.proto;
    s.svc.scope = SCOPE_EXTERNAL;
    s.svc.slot = 0;
    s.svc._pad = 0;
    let Some(svc) = SERVICES6.get_ptr(&s.svc) else {
        if !TRACE && filter::has_backend6(&s.key.daddr, s.key.dport, pkt.proto) {
            syn_to_backend(s, pkt);
        }
        return no_service::<TRACE>(&s.svc.addr, bytes);
    };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (n, svc_id, flags) = unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags) };
    step::<TRACE>(|r| {
        r.steps |= TRACE_FRONTEND;
        r.svc_id = svc_id;
        r.count = n;
    });
    if flags & SVC_F_SOURCE_RANGES != 0 {
        s.range.prefix_len = 32 + 128;
        s.range.data = SrcRange6 { svc_id, addr: s.key.saddr };
        if SOURCE_RANGES6.get(&s.range).is_none() {
            return verdict_t::<TRACE>(Stat::DropSourceRange, bytes, drop);
        }
    }
    if n == 0 {
        // As for IPv4: the client is told at once, unless only a traffic policy Local leaves
        // this node without an endpoint. The caller, which holds the context, answers.
        if flags & SVC_F_NO_LOCAL_ENDPOINT == 0 {
            step::<TRACE>(|r| r.steps |= TRACE_REJECT);
            return Ok(REJECT);
        }
        return verdict_t::<TRACE>(Stat::DropNoBackend, bytes, drop);
    }
    // sessionAffinity ClientIP, then Maglev, then a slot at random, as for IPv4.
    // SAFETY: as above.
    let affinity = unsafe { (*svc).affinity_timeout };
    let now = if affinity != 0 { ct::now_secs() } else { 0 };
    s.svc_id = svc_id;
    let kept = affinity != 0 && keep_affinity::<TRACE>(s, n, affinity, now);
    if kept {
        step::<TRACE>(|r| r.steps |= TRACE_AFFINITY);
    } else if maglev_slot(s, flags, n) {
        step::<TRACE>(|r| r.steps |= TRACE_MAGLEV);
    } else {
        // SAFETY: helper with no arguments.
        let rnd = unsafe { bpf_get_prandom_u32() };
        s.svc.slot = (rnd % u32::from(n)) as u16 + 1;
    }
    let chosen = s.svc.slot;
    step::<TRACE>(|r| r.slot = chosen);
    let Some(slot) = SERVICES6.get_ptr(&s.svc) else {
        return verdict_t::<TRACE>(Stat::DropStaleSlot, bytes, drop);
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    step::<TRACE>(|r| r.backend_id = backend_id);
    let Some(be) = BACKENDS6.get(backend_id) else {
        return verdict_t::<TRACE>(Stat::DropStaleSlot, bytes, drop);
    };
    if be.state == BACKEND_STATE_FREE {
        return verdict_t::<TRACE>(Stat::DropStaleSlot, bytes, drop);
    }
    if TRACE {
        // The same rewrite, and nothing tracked or recorded.
        step::<TRACE>(|r| r.steps |= TRACE_NEW_FLOW | TRACE_REWRITE);
        translate(f, pkt, Side::Destination, &be.addr, ports(be.port, 0));
        return verdict_t::<TRACE>(Stat::DnatNew, bytes, pass);
    }
    // Recorded before the flow is tracked: nothing below then depends on how the slot was
    // chosen, which keeps the verifier from walking the SNAT probes once per way.
    if affinity != 0 && !kept {
        let v = Affinity4Value { backend_id, slot: s.svc.slot, _pad: 0, last_used: now, _pad2: 0 };
        let _ = AFFINITY6.insert(&s.aff, &v, 0);
    }
    s.backend_id = backend_id;
    let local_frontend = flags & SVC_F_LOCAL != 0;
    // Hairpin: a pod landing on itself through its Service; SNAT to the frontend, as for IPv4.
    let hairpin = be.addr == s.key.saddr;
    let mut snat_port = 0;
    if hairpin || (local_frontend && be.flags & BACKEND_F_LOCAL == 0) {
        // The endpoint is on another node, or is the client itself: SNAT, so that its reply
        // comes back here.
        s.be = *be;
        snat_port = create_snat(s, pkt);
        if snat_port == 0 {
            return verdict_t::<TRACE>(Stat::DropCtFull, bytes, drop);
        }
    } else if !create(s, pkt, be, if local_frontend { CT_F_EGRESS_REVNAT } else { 0 }) {
        return verdict_t::<TRACE>(Stat::DropCtFull, bytes, drop);
    }
    count(Stat::CtCreated, 0);
    if let Some(n) = BACKEND_FLOWS6.get_ptr_mut(backend_id) {
        // SAFETY: a u64 inside the array's value area, 8-aligned; shared between CPUs.
        unsafe { atomic_add(n, 1) };
    }
    translate(f, pkt, Side::Destination, &be.addr, ports(be.port, snat_port));
    verdict_t::<TRACE>(Stat::DnatNew, bytes, pass)
}

/// As `lb::keep_affinity`: sets `s.svc.slot` to the slot of the client's affinity entry (its key
/// left in `s.aff` for the caller) if it is within `timeout` and the slot, among the `count`
/// selectable ones, still holds its backend; refreshes the entry's time.
#[inline(never)]
fn keep_affinity<const TRACE: bool>(s: &mut Scratch6, count: u16, timeout: u32, now: u32) -> bool {
    s.aff.svc_id = s.svc_id;
    s.aff.client = s.key.saddr;
    let Some(a) = AFFINITY6.get_ptr_mut(&s.aff) else { return false };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (backend_id, slot, used) = unsafe { ((*a).backend_id, (*a).slot, (*a).last_used) };
    if now.wrapping_sub(used) > timeout || slot == 0 || slot > count {
        return false;
    }
    s.svc.slot = slot;
    // SAFETY: as above.
    if SERVICES6.get_ptr(&s.svc).is_none_or(|v| unsafe { (*v).backend_id } != backend_id) {
        return false;
    }
    if !TRACE && used != now {
        // SAFETY: as above; a racing writer can only make the time one of two recent values.
        unsafe { (*a).last_used = now };
    }
    true
}

/// As `lb::maglev_slot`: with Maglev on, sets `s.svc.slot` from the frontend's table (the same
/// flow gets the same slot on every node). `false` when Maglev is off, the table is missing or
/// names no selectable slot.
#[inline(never)]
fn maglev_slot(s: &mut Scratch6, flags: u16, count: u16) -> bool {
    let size = CONFIG.get(0).map_or(0, |c| c.maglev_size);
    if size == 0 {
        return false;
    }
    let table = maglev_key(s.svc_id, flags & SVC_F_LOCAL_LIST != 0);
    let idx = maglev_flow_hash6(s.key.saddr, s.key.sport, s.key.proto) % size;
    // SAFETY: inner arrays are written only by the agent, which replaces a table whole.
    let four = unsafe { MAGLEV.get_value(&table, &(idx / 4)) };
    match four.map(|&v| (v >> ((idx % 4) * 16)) as u16) {
        Some(slot) if slot >= 1 && slot <= count => {
            s.svc.slot = slot;
            true
        }
        _ => false,
    }
}

/// The source a packet leaving gets, by its tuple in `s.key` (direction [`CT_DIR_SNAT`]): put
/// in `s.val` (address and port) with its counter; `None`: it leaves as it is.
#[inline(always)]
fn source_nat(s: &mut Scratch6, to_backend: bool, from_backend: bool) -> Option<Stat> {
    if to_backend && let Some(e) = CT6.get_ptr(&s.key) {
        // A SNATed flow leaving towards its backend: the node address and SNAT port.
        // SAFETY: pointer from a lookup in this run; plain reads.
        unsafe { (s.val.nat_addr, s.val.nat_port) = ((*e).nat_addr, (*e).nat_port) };
        return Some(Stat::EgressSnat);
    }
    if !from_backend {
        return None;
    }
    s.key.dir = CT_DIR_SNAT_REPLY;
    if let Some(e) = CT6.get_ptr(&s.key) {
        // A SNATed flow's reply on its way to the client: the frontend.
        // SAFETY: as above.
        unsafe { (s.val.nat_addr, s.val.nat_port) = ((*e).nat_addr, (*e).nat_port) };
        return Some(Stat::EgressRevNat);
    }
    s.key.dir = CT_DIR_REPLY;
    let e = CT6.get_ptr(&s.key)?;
    // SAFETY: as above.
    let flags = unsafe { (*e).flags };
    if flags & CT_F_EGRESS_REVNAT == 0 {
        return None; // translated at XDP already
    }
    // SAFETY: as above.
    unsafe { (s.val.nat_addr, s.val.nat_port) = ((*e).nat_addr, (*e).nat_port) };
    Some(Stat::EgressRevNat)
}

/// TC egress for IPv6, as `tc::egress`: a SNATed flow leaving towards its backend gets the
/// frontend (the node address) as source; a SNATed flow's reply, or the reply of a flow to a
/// node address, gets the frontend the client called as source. A subprogram given the raw
/// context (see [`process`]). The later fragments of a datagram whose first got a new source
/// get the same source address.
#[inline(never)]
pub fn egress(skb: *mut __sk_buff) {
    let ctx = TcContext::new(skb);
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_TC) else { return };
    // SAFETY: the per-CPU scratch entry of TC egress; this program run is its only user.
    let s = unsafe { &mut *s };
    let pkt = match parse::parse6(data, end) {
        Parsed6::L4(pkt) => pkt,
        Parsed6::Fragment(f) => {
            // A later fragment of a datagram whose first fragment got a new source here: the
            // same source address.
            if fragment_key(s, &f, CT_DIR_SNAT) && source_nat(s, true, true).is_some() {
                let l3 = f.l3 - data;
                if ctx.store(l3 + 8, &s.val.nat_addr, 0).is_ok() {
                    count(Stat::FragTranslated, u64::from(ctx.len()));
                }
            }
            return;
        }
        _ => return,
    };
    fill_key(&mut s.key, &pkt, CT_DIR_SNAT);
    // As `tc::egress`: only a packet from a backend, or from a SNAT port to a backend, may have
    // an entry below; the others are spared the lookups.
    let to_backend = is_snat_port(s.key.sport) && filter::has6(&s.key.daddr, s.key.dport, s.key.proto);
    let from_backend = filter::has_backend6(&s.key.saddr, s.key.sport, s.key.proto);
    if !to_backend && !from_backend {
        return;
    }
    let Some(stat) = source_nat(s, to_backend, from_backend) else { return };
    if pkt.first_fragment {
        remember_fragment(s, &pkt);
    }
    let (l3, l4) = (pkt.l3 - data, pkt.l4 - data);
    let l4_check = pkt.l4_check - data;
    let mut old = [0u32; 4];
    let mut new = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        // SAFETY: parse6() bounds-checked the 40-byte IPv6 header.
        old[i] =
            unsafe { u32::from(load16(pkt.l3 + 8 + 4 * i)) | (u32::from(load16(pkt.l3 + 10 + 4 * i)) << 16) };
        let a = &s.val.nat_addr;
        new[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        i += 1;
    }
    // SAFETY: as above (the L4 header: ports and checksum).
    let old_port = unsafe { load16(pkt.l4) };
    let new_port = s.val.nat_port.to_be();
    if pkt.proto == IPPROTO_SCTP {
        // No pseudo-header: the new address leaves the CRC32c as it is, the port changes it;
        // computed before the helpers (which invalidate packet pointers), stored through them,
        // keeping a checksum of the whole frame right.
        // SAFETY: parse6() bounds-checked SCTP's 12-byte common header.
        let new_crc = unsafe { nat::sctp_crc_with_sport(pkt.l4, new_port, pkt.sctp_len()) };
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        let ok = ctx.store(l3 + 8, &s.val.nat_addr, flags).is_ok()
            && ctx.store(l4, &new_port, flags).is_ok()
            && ctx.store(l4 + 8, &new_crc, flags).is_ok();
        if ok {
            count(stat, u64::from(ctx.len()));
        }
        return;
    }
    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // The helpers keep the checksum right for every skb checksum state (partial included); the
    // pseudo-header covers the address, 4 bytes at a time.
    let mut ok = true;
    let mut i = 0;
    while i < 4 {
        if old[i] != new[i] {
            ok = ok
                && ctx
                    .l4_csum_replace(
                        l4_check,
                        u64::from(old[i]),
                        u64::from(new[i]),
                        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
                    )
                    .is_ok();
        }
        i += 1;
    }
    let ok = ok
        && ctx.l4_csum_replace(l4_check, u64::from(old_port), u64::from(new_port), mangled | 2).is_ok()
        && ctx.store(l3 + 8, &s.val.nat_addr, 0).is_ok()
        && ctx.store(l4, &new_port, 0).is_ok();
    if ok {
        count(stat, u64::from(ctx.len()));
    }
}
