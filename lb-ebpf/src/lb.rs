//! The per-packet decision: tracked flow, new flow to a service frontend, or pass.
//!
//! One body serves two programs. `TRACE = false` is the datapath. `TRACE = true` is the trace
//! program that `xlb trace` runs on a crafted packet against the live maps: it makes the same
//! lookups and the same choice, rewrites the same headers, and records each step in
//! [`TRACE`](crate::maps::TRACE) instead of changing anything the datapath shares (no conntrack
//! insert, touch or delete, no counter).
use aya_ebpf::{bindings::xdp_action, btf_maps::lpm_trie::Key, helpers::generated::bpf_get_prandom_u32};
use lb_common::{
    Affinity4Key, Affinity4Value, BACKEND_F_LOCAL, BACKEND_STATE_FREE, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_F_DNAT_BACK, CT_F_EGRESS_REVNAT, Ct4Key, Frag4Key, FragPorts, SCOPE_EXTERNAL, SVC_F_LOCAL,
    SVC_F_LOCAL_LIST, SVC_F_NO_LOCAL_ENDPOINT, SVC_F_SOURCE_RANGES, SrcRange4, Stat, Svc4Key, TRACE_AFFINITY,
    TRACE_CT_EXPIRED, TRACE_CT_FORWARD, TRACE_CT_REPLY, TRACE_CT_STALE, TRACE_FRONTEND, TRACE_MAGLEV,
    TRACE_NEW_FLOW, TRACE_REJECT, TRACE_REWRITE, TraceRecord, maglev_flow_hash, maglev_key,
};

use crate::{
    ct, filter,
    frame::Frame,
    icmp,
    maps::{AFFINITY, BACKEND_FLOWS, BACKENDS, CONFIG, CT, FRAG4, MAGLEV, SERVICES, SOURCE_RANGES, TRACE},
    nat::{self, Side},
    parse::{self, Packet, Parsed},
    reject,
    stats::{atomic_add, count},
};

/// Where the trace program writes; `None` in the datapath, so every use compiles away there.
type Rec = Option<*mut TraceRecord>;

#[inline(always)]
fn step(rec: Rec, f: impl FnOnce(&mut TraceRecord)) {
    if let Some(r) = rec {
        // SAFETY: pointer into the single-entry trace array, from a lookup in this run; only
        // the trace program (run by one `xlb trace` at a time on its own copy) writes it.
        f(unsafe { &mut *r });
    }
}

/// The datapath's entry, for either program's frame (XDP or TC ingress; verdicts are XDP's,
/// which the TC program maps): IPv6 frames to [`crate::lb6`], the rest to [`process`] in a
/// subprogram of its own. Its frame (the IPv4 path, all inline) and the IPv6 path's chain of
/// subprograms would not fit in the 512 bytes of stack one call chain may use if one called the
/// other.
#[inline(always)]
pub fn datapath<F: Frame>(f: F) -> Result<u32, ()> {
    let (data, end) = (f.data(), f.data_end());
    // SAFETY: the 14-byte Ethernet header is bounds-checked first.
    if data + parse::ETH_HLEN <= end && u16::from_be(unsafe { parse::load16(data + 12) }) == parse::ETH_P_IPV6
    {
        let bytes = (end - data) as u64;
        count(Stat::Rx, bytes);
        return answer6(f, None, process_v6(f, data, end, bytes)?, bytes);
    }
    process_v4(f)
}

/// The IPv6 path, then what it left to do to an SCTP packet ([`nat::finish_sctp`]), unless the
/// packet's first header is TCP, UDP or ICMPv6 (SCTP may come after extension headers).
#[inline(never)]
fn process_v6<F: Frame>(f: F, data: usize, end: usize, bytes: u64) -> Result<u32, ()> {
    let verdict = crate::lb6::process::<false, F>(f, data, end, bytes);
    let (data, end) = (f.data(), f.data_end());
    if data + parse::ETH_HLEN + 40 <= end {
        // SAFETY: bounds-checked just above.
        let next = unsafe { parse::load16(data + parse::ETH_HLEN + 6) }.to_ne_bytes()[0];
        if next != lb_common::IPPROTO_TCP
            && next != lb_common::IPPROTO_UDP
            && next != lb_common::IPPROTO_ICMPV6
        {
            nat::finish_sctp(f);
        }
    }
    verdict
}

/// What the IPv6 path decided: an XDP action, or an answer for the caller, which holds the
/// context, to send ([`crate::lb6::REJECT`], [`crate::lb6::REJECT_NO_SERVICE`]).
#[inline(always)]
fn answer6<F: Frame>(f: F, rec: Rec, action: u32, bytes: u64) -> Result<u32, ()> {
    let (sent, unsent) = match action {
        crate::lb6::REJECT => (Stat::RejectNoBackend, Stat::DropNoBackend),
        crate::lb6::REJECT_NO_SERVICE => (Stat::RejectNoService, Stat::DropNoService),
        action => return Ok(action),
    };
    if reject::answer6(f) { verdict(rec, sent, bytes, xdp_action::XDP_TX) } else { drop(rec, unsent, bytes) }
}

/// The IPv4 path, then what it left to do to an SCTP packet ([`nat::finish_sctp`]): looked at
/// for SCTP packets only (a lookup less on every other packet).
#[inline(never)]
fn process_v4<F: Frame>(f: F) -> Result<u32, ()> {
    let verdict = process::<false, F>(f);
    if is_sctp4(f) {
        nat::finish_sctp(f);
    }
    verdict
}

/// An IPv4 SCTP packet (after the run: a refusal may have made it another).
#[inline(always)]
pub fn is_sctp4<F: Frame>(f: F) -> bool {
    let (data, end) = (f.data(), f.data_end());
    // SAFETY: bounds-checked first; the protocol is byte 9 of the IPv4 header.
    data + parse::ETH_HLEN + 20 <= end
        && unsafe { parse::load16(data + parse::ETH_HLEN + 8) }.to_ne_bytes()[1] == lb_common::IPPROTO_SCTP
}

#[inline(always)]
pub fn process<const TRACE_MODE: bool, F: Frame>(f: F) -> Result<u32, ()> {
    let rec: Rec = if TRACE_MODE { TRACE.get_ptr_mut(0) } else { None };
    if TRACE_MODE && rec.is_none() {
        return Ok(xdp_action::XDP_ABORTED);
    }
    let bytes = (f.data_end() - f.data()) as u64;
    if !TRACE_MODE {
        count(Stat::Rx, bytes);
    }
    let pkt = match parse::parse(f.data(), f.data_end()) {
        Parsed::L4(pkt) => pkt,
        Parsed::NotIpv4 => return pass(rec, Stat::PassNotIpv4, bytes),
        // IPv6 has a path of its own (see `datapath`), which the trace program follows here.
        Parsed::Ipv6 if TRACE_MODE => {
            return answer6(f, rec, crate::lb6::process::<true, F>(f, f.data(), f.data_end(), bytes)?, bytes);
        }
        Parsed::Ipv6 => return pass(rec, Stat::PassNotIpv4, bytes),
        Parsed::Malformed => return pass(rec, Stat::PassMalformed, bytes),
        Parsed::OtherProto => {
            let stat = if icmp::translate(f.data(), f.data_end()) {
                Stat::IcmpTranslated
            } else {
                Stat::PassOtherProto
            };
            return pass(rec, stat, bytes);
        }
        Parsed::Fragment(f) => return later_fragment(rec, &f, bytes),
    };

    // The filter: a packet to no frontend can be neither a new flow nor a tracked one's forward
    // direction (keyed client -> frontend); one from no backend cannot be a reply (keyed backend
    // -> client). Not in a trace: it only skips lookups that would miss.
    // The source is looked up only when needed: here if the destination missed, else once the
    // forward lookup has.
    let to_known = TRACE_MODE || filter::has(pkt.daddr, pkt.dport, pkt.proto);
    let from_known = (!to_known).then(|| filter::has(pkt.saddr, pkt.sport, pkt.proto));
    if from_known == Some(false) {
        return no_service::<TRACE_MODE, F>(f, rec, &pkt, bytes);
    }
    // The first fragment of a datagram to a frontend or from a backend: its later fragments,
    // which carry no ports, are translated as it is (see `later_fragment`).
    if !TRACE_MODE {
        remember_fragment(&pkt);
    }

    // A tracked flow: one lookup covers both directions, since the key holds the tuple as it
    // stands in the packet and the direction.
    let fwd_key = ct::key_of(&pkt, CT_DIR_FORWARD);
    let mut tracked = if to_known { CT.get_ptr_mut(fwd_key) } else { None };
    // The clock is read only for packets of tracked flows (here, or for a reply below).
    let now = if tracked.is_some() { ct::now_secs() } else { 0 };
    // SAFETY: pointer from a lookup in this run.
    if let Some(entry) = tracked
        && ct::flow_over(&fwd_key, unsafe { &*entry }, &pkt, now)
    {
        // Idle past its lifetime, or a new connection on a closed tuple: forgotten here, balanced
        // again below (its other entries are overwritten by the new flow's, or age out).
        if TRACE_MODE {
            step(rec, |r| r.steps |= TRACE_CT_EXPIRED);
        } else {
            let _ = CT.remove(fwd_key);
            count(Stat::CtExpired, 0);
        }
        tracked = None;
    }
    if let Some(entry) = tracked {
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        let (backend_id, svc_id, nat_addr, nat_port) =
            unsafe { ((*entry).backend_id, (*entry).svc_id, (*entry).nat_addr, (*entry).nat_port) };
        // Non-zero only in the forward entry of a SNATed flow.
        // SAFETY: as above.
        let snat_port = unsafe { (*entry).snat_port };
        step(rec, |r| {
            r.steps |= TRACE_CT_FORWARD;
            r.ct_backend_id = backend_id;
            r.svc_id = svc_id;
        });
        match BACKENDS.get(backend_id) {
            Some(be) if be.state != BACKEND_STATE_FREE && be.addr == nat_addr && be.port == nat_port => {
                if !TRACE_MODE {
                    ct::touch(entry, pkt.tcp_flags, now);
                }
                nat::translate(f, &pkt, Side::Destination, nat_addr, nat_port, snat_port);
                step(rec, |r| {
                    r.steps |= TRACE_REWRITE;
                    r.backend_id = backend_id;
                });
                return pass(rec, Stat::DnatEstablished, bytes);
            }
            _ => {
                // The backend is gone: forget the flow and balance it again below. A TCP peer
                // then gets a reset from the new backend instead of hanging; UDP moves on.
                if TRACE_MODE {
                    step(rec, |r| r.steps |= TRACE_CT_STALE);
                } else {
                    let _ = CT.remove(fwd_key);
                    count(Stat::CtStaleBackend, 0);
                }
            }
        }
    } else if from_known.unwrap_or_else(|| TRACE_MODE || filter::has(pkt.saddr, pkt.sport, pkt.proto)) {
        let reply_key = ct::key_of(&pkt, CT_DIR_REPLY);
        if let Some(entry) = CT.get_ptr_mut(reply_key) {
            // SAFETY: as above.
            let (nat_addr, nat_port, backend_id, svc_id, flags) = unsafe {
                ((*entry).nat_addr, (*entry).nat_port, (*entry).backend_id, (*entry).svc_id, (*entry).flags)
            };
            if !TRACE_MODE {
                ct::touch(entry, pkt.tcp_flags, ct::now_secs());
            }
            step(rec, |r| {
                r.steps |= TRACE_CT_REPLY;
                r.ct_backend_id = backend_id;
                r.backend_id = backend_id;
                r.svc_id = svc_id;
            });
            let side = if flags & CT_F_DNAT_BACK != 0 {
                // A reply to a SNATed flow: back to the client; TC egress then gives it the
                // frontend as source.
                Side::Destination
            } else if flags & CT_F_EGRESS_REVNAT != 0 {
                // The source becomes a local address: the kernel must route the reply first,
                // and TC egress translates it.
                if !TRACE_MODE {
                    reset_seen(&pkt, nat_addr, nat_port, flags);
                }
                return pass(rec, Stat::PassEgressRevNat, bytes);
            } else {
                Side::Source
            };
            nat::translate(f, &pkt, side, nat_addr, nat_port, 0);
            step(rec, |r| r.steps |= TRACE_REWRITE);
            // (After the rewrite: nothing of the packet is needed after the call.)
            if !TRACE_MODE {
                reset_seen(&pkt, nat_addr, nat_port, flags);
            }
            return pass(rec, Stat::RevNat, bytes);
        }
    }

    if !to_known {
        return no_service::<TRACE_MODE, F>(f, rec, &pkt, bytes);
    }
    new_flow::<TRACE_MODE, F>(f, rec, &pkt, bytes)
}

/// A reply from the backend with a reset: the flow's forward entry learns of it
/// (`ct::reset_by_backend`). `nat_addr`, `nat_port`, `flags`: its reply entry's.
#[inline(always)]
fn reset_seen(pkt: &Packet, nat_addr: [u8; 4], nat_port: u16, flags: u8) {
    if pkt.tcp_flags & lb_common::TCP_RST != 0 {
        let nat = u32::from(nat_port) | u32::from(flags) << 16 | u32::from(pkt.proto) << 24;
        ct::reset_by_backend(pkt.saddr, pkt.daddr, ct::ports_word(pkt), u32::from_ne_bytes(nat_addr), nat);
    }
}

/// The key of [`FRAG4`]: what each fragment of a datagram carries (packet order).
#[inline(always)]
pub fn frag_key(saddr: u32, daddr: u32, id: u16, proto: u8) -> Frag4Key {
    Frag4Key { saddr: saddr.to_ne_bytes(), daddr: daddr.to_ne_bytes(), id, proto, _pad: 0 }
}

/// When `pkt` is the first fragment of a datagram, puts its ports in [`FRAG4`], by what its
/// later fragments carry too, for [`fragment_keys`].
#[inline(always)]
pub fn remember_fragment(pkt: &Packet) {
    if pkt.first_fragment {
        let ports = FragPorts { sport: pkt.sport, dport: pkt.dport };
        let _ = FRAG4.insert(frag_key(pkt.saddr, pkt.daddr, pkt.id, pkt.proto), ports, 0);
    }
}

/// The conntrack key, by direction, of the datagram whose later fragment is `f`: its ports are
/// those its first fragment left in [`FRAG4`]; `None` without them.
#[inline(always)]
pub fn fragment_keys(f: &parse::Fragment) -> Option<impl Fn(u8) -> Ct4Key + '_> {
    let ports = FRAG4.get_ptr(frag_key(f.saddr, f.daddr, f.id, f.proto))?;
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (sport, dport) = unsafe { (u16::from_be((*ports).sport), u16::from_be((*ports).dport)) };
    Some(move |dir| Ct4Key {
        saddr: f.saddr.to_ne_bytes(),
        daddr: f.daddr.to_ne_bytes(),
        sport,
        dport,
        proto: f.proto,
        dir,
        _pad: 0,
    })
}

/// A later fragment of a TCP or UDP datagram: translated as its first fragment was, found by
/// the ports that fragment left in [`FRAG4`] (the tracked flow's addresses; its ports are in
/// the first fragment only). Without them (no Service's flow, or it came before its first) it
/// passes untouched. Reads only: the first fragment made and refreshed the flow's entries.
#[inline(always)]
fn later_fragment(rec: Rec, f: &parse::Fragment, bytes: u64) -> Result<u32, ()> {
    let Some(key) = fragment_keys(f) else {
        return pass(rec, Stat::PassFragment, bytes);
    };
    let (side, addr) = if let Some(e) = CT.get_ptr(key(CT_DIR_FORWARD)) {
        // SAFETY: as above.
        (Side::Destination, unsafe { (*e).nat_addr })
    } else if let Some(e) = CT.get_ptr(key(CT_DIR_REPLY)) {
        // SAFETY: as above.
        let (flags, addr) = unsafe { ((*e).flags, (*e).nat_addr) };
        if flags & CT_F_EGRESS_REVNAT != 0 {
            return pass(rec, Stat::PassEgressRevNat, bytes);
        }
        (if flags & CT_F_DNAT_BACK != 0 { Side::Destination } else { Side::Source }, addr)
    } else {
        return pass(rec, Stat::PassFragment, bytes);
    };
    nat::rewrite_addr(f.l3, side, addr);
    step(rec, |r| r.steps |= TRACE_REWRITE);
    pass(rec, Stat::FragTranslated, bytes)
}

/// A packet of no tracked flow to no frontend. Passed, unless its destination lies in the
/// cluster's Service ranges: no Service holds it (deleted, or a port the Service does not have),
/// so the client is told at once, as for a Service without endpoints, instead of the packet
/// being routed out of the node to time out.
#[inline(always)]
fn no_service<const TRACE_MODE: bool, F: Frame>(f: F, rec: Rec, pkt: &Packet, bytes: u64) -> Result<u32, ()> {
    if !filter::in_service_range(pkt.daddr) {
        // (Last: nothing of the packet is needed after the call.)
        // Only a SYN (no ACK) calls: the common case, any other packet, pays one test.
        if !TRACE_MODE && pkt.tcp_flags & (lb_common::TCP_SYN | lb_common::TCP_ACK) == lb_common::TCP_SYN {
            ct::syn_to_backend(pkt.saddr, pkt.daddr, ct::ports_word(pkt));
        }
        return pass(rec, Stat::PassNoService, bytes);
    }
    if reject::answer::<TRACE_MODE, F>(f, pkt) {
        step(rec, |r| r.steps |= TRACE_REJECT);
        return verdict(rec, Stat::RejectNoService, bytes, xdp_action::XDP_TX);
    }
    drop(rec, Stat::DropNoService, bytes)
}

#[inline(always)]
fn new_flow<const TRACE_MODE: bool, F: Frame>(f: F, rec: Rec, pkt: &Packet, bytes: u64) -> Result<u32, ()> {
    let mut key = Svc4Key {
        addr: pkt.daddr.to_ne_bytes(),
        port: u16::from_be(pkt.dport),
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return no_service::<TRACE_MODE, F>(f, rec, pkt, bytes);
    };
    // SAFETY: pointer from a lookup in this run.
    let (count_, svc_id, svc_flags) = unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags) };
    step(rec, |r| {
        r.steps |= TRACE_FRONTEND;
        r.svc_id = svc_id;
        r.count = count_;
    });
    if svc_flags & SVC_F_SOURCE_RANGES != 0 {
        let k = Key::new(64, SrcRange4 { svc_id, addr: pkt.saddr.to_ne_bytes() });
        if SOURCE_RANGES.get(&k).is_none() {
            return drop(rec, Stat::DropSourceRange, bytes);
        }
    }
    if count_ == 0 {
        // As kube-proxy: the client is told at once (TCP reset, ICMP port unreachable), unless
        // only a traffic policy Local leaves this node without an endpoint: then the packet
        // is dropped, so that a load balancer's health check sees the node as down.
        if svc_flags & SVC_F_NO_LOCAL_ENDPOINT == 0 && reject::answer::<TRACE_MODE, F>(f, pkt) {
            step(rec, |r| r.steps |= TRACE_REJECT);
            return verdict(rec, Stat::RejectNoBackend, bytes, xdp_action::XDP_TX);
        }
        return drop(rec, Stat::DropNoBackend, bytes);
    }
    // sessionAffinity ClientIP: the client's last backend for this service port, if it came
    // within the timeout and its slot still holds that backend; else a slot at random.
    // SAFETY: as above.
    let affinity = unsafe { (*svc).affinity_timeout };
    let aff_key = Affinity4Key { svc_id, client: pkt.saddr.to_ne_bytes() };
    let now = if affinity != 0 { ct::now_secs() } else { 0 };
    let kept = affinity != 0 && keep_affinity::<TRACE_MODE>(&mut key, &aff_key, count_, affinity, now);
    if kept {
        step(rec, |r| r.steps |= TRACE_AFFINITY);
    } else if maglev_slot(&mut key, pkt, svc_id, svc_flags, count_) {
        step(rec, |r| r.steps |= TRACE_MAGLEV);
    } else {
        // SAFETY: helper with no arguments.
        let rnd = unsafe { bpf_get_prandom_u32() };
        key.slot = (rnd % u32::from(count_)) as u16 + 1;
    }
    step(rec, |r| r.slot = key.slot);
    let Some(slot) = SERVICES.get_ptr(key) else {
        return drop(rec, Stat::DropStaleSlot, bytes);
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    step(rec, |r| r.backend_id = backend_id);
    let Some(be) = BACKENDS.get(backend_id) else {
        return drop(rec, Stat::DropStaleSlot, bytes);
    };
    if be.state == BACKEND_STATE_FREE {
        return drop(rec, Stat::DropStaleSlot, bytes);
    }
    let (addr, port, be_flags) = (be.addr, be.port, be.flags);
    let mut snat_port = 0u16;
    if TRACE_MODE {
        step(rec, |r| r.steps |= TRACE_NEW_FLOW);
    } else {
        let local_frontend = svc_flags & SVC_F_LOCAL != 0;
        // Hairpin: a pod reaching its own Service and landing on itself. Its packet would come
        // back with its own address as source, which it drops as a martian, and its reply would
        // never reach the node: SNAT to the frontend, so that the pod answers the frontend and
        // the node translates the answer back (kube-proxy masquerades hairpin traffic too).
        let hairpin = addr == pkt.saddr.to_ne_bytes();
        let created = if hairpin || (local_frontend && be_flags & BACKEND_F_LOCAL == 0) {
            // The endpoint is on another node, or is the client itself: SNAT, so that its
            // reply comes back here.
            ct::create_snat(pkt, addr, port, backend_id, svc_id)
        } else {
            let reply_flags = if local_frontend { CT_F_EGRESS_REVNAT } else { 0 };
            ct::create(pkt, addr, port, backend_id, svc_id, reply_flags).map(|()| 0)
        };
        match created {
            Ok(p) => snat_port = p,
            Err(_) => return drop(rec, Stat::DropCtFull, bytes),
        }
        count(Stat::CtCreated, 0);
        if affinity != 0 && !kept {
            let v = Affinity4Value { backend_id, slot: key.slot, _pad: 0, last_used: now, _pad2: 0 };
            let _ = AFFINITY.insert(aff_key, v, 0);
        }
        if let Some(n) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
            // SAFETY: a u64 inside the array's value area, 8-aligned; shared between CPUs.
            unsafe { atomic_add(n, 1) };
        }
    }
    // With SNAT, the SNAT port now; the node address at TC egress, once routed.
    nat::translate(f, pkt, Side::Destination, addr, port, snat_port);
    step(rec, |r| r.steps |= TRACE_REWRITE);
    pass(rec, Stat::DnatNew, bytes)
}

/// With Maglev on (a table size in the settings), sets `key.slot` from the frontend's table:
/// the same flow gets the same slot on every node. `false` (random selection) when Maglev is
/// off, the table is missing, or it names no slot of the `count` selectable ones (an update in
/// progress).
#[inline(always)]
fn maglev_slot(key: &mut Svc4Key, pkt: &Packet, svc_id: u32, flags: u16, count: u16) -> bool {
    let size = CONFIG.get(0).map_or(0, |c| c.maglev_size);
    if size == 0 {
        return false;
    }
    let table = maglev_key(svc_id, flags & SVC_F_LOCAL_LIST != 0);
    let idx = maglev_flow_hash(pkt.saddr.to_ne_bytes(), u16::from_be(pkt.sport), pkt.proto) % size;
    // SAFETY: inner arrays are written only by the agent, which replaces a table whole (a new
    // map swapped in), never in place.
    let four = unsafe { MAGLEV.get_value(&table, &(idx / 4)) };
    match four.map(|&v| (v >> ((idx % 4) * 16)) as u16) {
        Some(slot) if slot >= 1 && slot <= count => {
            key.slot = slot;
            true
        }
        _ => false,
    }
}

/// Sets `key.slot` to the slot of the client's affinity entry if it is within `timeout` and the
/// slot (among the selectable ones) still holds its backend; refreshes the entry's time (not in
/// a trace). `false` when a backend must be chosen anew.
#[inline(always)]
fn keep_affinity<const TRACE_MODE: bool>(
    key: &mut Svc4Key,
    aff_key: &Affinity4Key,
    count: u16,
    timeout: u32,
    now: u32,
) -> bool {
    let Some(a) = AFFINITY.get_ptr_mut(*aff_key) else { return false };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (backend_id, slot, used) = unsafe { ((*a).backend_id, (*a).slot, (*a).last_used) };
    if now.wrapping_sub(used) > timeout || slot == 0 || slot > count {
        return false;
    }
    key.slot = slot;
    // SAFETY: as above.
    if SERVICES.get_ptr(*key).is_none_or(|v| unsafe { (*v).backend_id } != backend_id) {
        return false;
    }
    if !TRACE_MODE && used != now {
        // SAFETY: as above; a racing writer can only make the time one of two recent values.
        unsafe { (*a).last_used = now };
    }
    true
}

#[inline(always)]
fn pass(rec: Rec, stat: Stat, bytes: u64) -> Result<u32, ()> {
    verdict(rec, stat, bytes, xdp_action::XDP_PASS)
}

#[inline(always)]
fn drop(rec: Rec, stat: Stat, bytes: u64) -> Result<u32, ()> {
    verdict(rec, stat, bytes, xdp_action::XDP_DROP)
}

#[inline(always)]
fn verdict(rec: Rec, stat: Stat, bytes: u64, action: u32) -> Result<u32, ()> {
    match rec {
        Some(_) => step(rec, |r| {
            r.stat = stat as u32;
            r.verdict = action;
        }),
        None => count(stat, bytes),
    }
    Ok(action)
}
