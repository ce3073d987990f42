//! The per-packet decision for IPv6: a tracked flow (forward or reply), a new flow to a frontend
//! of [`SERVICES6`], or pass. The same semantics as the IPv4 path in `lb`, over the IPv6 maps:
//! DNAT to a backend chosen at random among the selectable slots, the reply's source written
//! back to the frontend, both directions tracked, idle flows forgotten by the same lifetimes.
//! The L4 checksum is updated incrementally (IPv6 has no header checksum).
//!
//! Keys and values are built in a per-CPU scratch area ([`SCRATCH6`]) and the larger steps are
//! BPF subprograms (`#[inline(never)]`) with frames of their own: IPv6's 16-byte addresses,
//! 40-byte keys and values would otherwise outgrow the 512 bytes of stack.
use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_get_prandom_u32};
use lb_common::{
    BACKEND_STATE_FREE, Backend6, CT_DIR_FORWARD, CT_DIR_REPLY, Ct6Key, Ct6Value, IPPROTO_TCP, IPPROTO_UDP,
    SCOPE_EXTERNAL, SVC_F_NO_LOCAL_ENDPOINT, SVC_F_SOURCE_RANGES, Stat, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    csum,
};

use crate::{
    ct,
    maps::{BACKENDS6, CT6, SCRATCH6, SERVICES6, Scratch6},
    nat::Side,
    parse::{self, Packet6, Parsed6, load_addr6, load16, store16},
    stats::count,
};

#[inline(always)]
fn verdict(stat: Stat, bytes: u64, action: u32) -> Result<u32, ()> {
    count(stat, bytes);
    Ok(action)
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

/// As `ct::flow_over`: the flow tracked by `fwd` (found at `s.key`) is idle past its lifetime
/// in both directions, or a new connection comes on a tuple whose last connection closed.
#[inline(never)]
fn flow_over(s: &mut Scratch6, fwd: &Ct6Value, pkt: &Packet6, now: u32) -> bool {
    if pkt.proto == IPPROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && fwd.tcp_flags & (TCP_FIN | TCP_RST) != 0
    {
        return true;
    }
    if now == fwd.last_seen || now.wrapping_sub(fwd.last_seen) <= ct::lifetime(s.key.proto, fwd.tcp_flags) {
        return false;
    }
    // The reply entry: backend -> client.
    s.key2 = Ct6Key {
        saddr: fwd.nat_addr,
        daddr: s.key.saddr,
        sport: fwd.nat_port,
        dport: s.key.sport,
        proto: s.key.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    match CT6.get_ptr(&s.key2) {
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        Some(r) => unsafe {
            now.wrapping_sub((*r).last_seen) > ct::lifetime(s.key.proto, (*r).tcp_flags | fwd.tcp_flags)
        },
        None => true,
    }
}

/// Tracks a new flow to `be`: the reply entry first (its packets must be recognised once the
/// forward one translates), then the forward entry (`s.key` holds the packet's tuple, forward).
/// `false` when an insert failed.
#[inline(never)]
fn create(s: &mut Scratch6, pkt: &Packet6, be: &Backend6, backend_id: u32, svc_id: u32) -> bool {
    let now = ct::now_secs();
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
        flags: 0,
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
    CT6.insert(&s.key, &s.val, 0).is_ok()
}

/// Returned by [`process`] for a new flow to a frontend without endpoints: the caller sends the
/// answer ([`crate::reject::answer6`]) and counts it. Not an XDP action.
pub const REJECT: u32 = u32::MAX;

/// The IPv6 path. `data` and `end` are the frame's bounds (the context itself cannot be handed
/// to a subprogram: its fields would be split and shifted, which the verifier refuses on
/// pointers).
#[inline(never)]
pub fn process(data: usize, end: usize, bytes: u64) -> Result<u32, ()> {
    let pass = xdp_action::XDP_PASS;
    let pkt = match parse::parse6(data, end) {
        Parsed6::L4(pkt) => pkt,
        Parsed6::Malformed => return verdict(Stat::PassMalformed, bytes, pass),
        Parsed6::OtherProto => return verdict(Stat::PassOtherProto, bytes, pass),
        Parsed6::Fragment => return verdict(Stat::PassFragment, bytes, pass),
    };
    let Some(s) = SCRATCH6.get_ptr_mut(0) else { return verdict(Stat::PassNoService, bytes, pass) };
    // SAFETY: the per-CPU scratch entry; this program run is the only user on this CPU.
    let s = unsafe { &mut *s };
    fill_key(&mut s.key, &pkt, CT_DIR_FORWARD);

    if let Some(entry) = CT6.get_ptr_mut(&s.key) {
        let now = ct::now_secs();
        // SAFETY: pointer from a lookup in this run (a map value: stable for the run).
        let fwd = unsafe { &*entry };
        if flow_over(s, fwd, &pkt, now) {
            let _ = CT6.remove(&s.key);
            count(Stat::CtExpired, 0);
        } else {
            match BACKENDS6.get(fwd.backend_id) {
                Some(be)
                    if be.state != BACKEND_STATE_FREE
                        && be.addr == fwd.nat_addr
                        && be.port == fwd.nat_port =>
                {
                    ct::touch(entry, pkt.tcp_flags, now);
                    rewrite(&pkt, Side::Destination, &be.addr, be.port);
                    return verdict(Stat::DnatEstablished, bytes, pass);
                }
                _ => {
                    // The backend is gone: balance the flow again below.
                    let _ = CT6.remove(&s.key);
                    count(Stat::CtStaleBackend, 0);
                }
            }
        }
    } else {
        s.key.dir = CT_DIR_REPLY;
        if let Some(entry) = CT6.get_ptr_mut(&s.key) {
            ct::touch(entry, pkt.tcp_flags, ct::now_secs());
            // SAFETY: as above.
            let e = unsafe { &*entry };
            rewrite(&pkt, Side::Source, &e.nat_addr, e.nat_port);
            return verdict(Stat::RevNat, bytes, pass);
        }
        s.key.dir = CT_DIR_FORWARD;
    }
    new_flow(s, &pkt, bytes)
}

/// A packet of no tracked flow: to a frontend, a new flow to one of its backends.
#[inline(never)]
fn new_flow(s: &mut Scratch6, pkt: &Packet6, bytes: u64) -> Result<u32, ()> {
    let pass = xdp_action::XDP_PASS;
    let drop = xdp_action::XDP_DROP;
    s.svc.addr = s.key.daddr;
    s.svc.port = s.key.dport;
    s.svc.proto = pkt.proto;
    s.svc.scope = SCOPE_EXTERNAL;
    s.svc.slot = 0;
    s.svc._pad = 0;
    let Some(svc) = SERVICES6.get_ptr(&s.svc) else {
        return verdict(Stat::PassNoService, bytes, pass);
    };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (n, svc_id, flags) = unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags) };
    // Source ranges are not kept for IPv6 frontends yet: closed rather than open.
    if flags & SVC_F_SOURCE_RANGES != 0 {
        return verdict(Stat::DropSourceRange, bytes, drop);
    }
    if n == 0 {
        // As for IPv4: the client is told at once, unless only a traffic policy Local leaves
        // this node without an endpoint. The caller, which holds the context, answers.
        if flags & SVC_F_NO_LOCAL_ENDPOINT == 0 {
            return Ok(REJECT);
        }
        return verdict(Stat::DropNoBackend, bytes, drop);
    }
    // SAFETY: helper with no arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    s.svc.slot = (rnd % u32::from(n)) as u16 + 1;
    let Some(slot) = SERVICES6.get_ptr(&s.svc) else {
        return verdict(Stat::DropStaleSlot, bytes, drop);
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS6.get(backend_id) else {
        return verdict(Stat::DropStaleSlot, bytes, drop);
    };
    if be.state == BACKEND_STATE_FREE {
        return verdict(Stat::DropStaleSlot, bytes, drop);
    }
    if !create(s, pkt, be, backend_id, svc_id) {
        return verdict(Stat::DropCtFull, bytes, drop);
    }
    count(Stat::CtCreated, 0);
    rewrite(pkt, Side::Destination, &be.addr, be.port);
    verdict(Stat::DnatNew, bytes, pass)
}
