//! ICMP errors about translated flows, translated too, so that path MTU discovery and
//! unreachable errors reach the endpoint that can act on them (RFC 5508's rules for NAT):
//!
//! - an error about a reply the node sent from a frontend (a router between the node and the
//!   client says "fragmentation needed" to the frontend address) goes to the backend: the outer
//!   destination and the quoted source become the backend's;
//! - an error about a client's packet the node sent to a backend (the backend's own "port
//!   unreachable", or a router's) goes on to the client with the quoted destination set back to
//!   the frontend, and the outer source too when the backend itself sent it (unless the frontend
//!   is a node address: a local source is for TC egress, and the client matches the quote).
//!
//! Only errors whose outer and quoted IPv4 headers carry no options are translated; the quoted
//! header and the first 8 bytes of the quoted datagram are read and rewritten, and every
//! checksum they touch (outer IPv4, ICMP, quoted IPv4) is updated. ICMPv6 errors about IPv6 flows
//! are translated alike ([`translate6`]); Packet Too Big is the one path MTU discovery needs.
use lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_EGRESS_REVNAT, Ct4Key, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, csum,
};

use crate::{
    maps::{CT, CT6, SCRATCH_XDP, SCRATCH6},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, load_addr6, load16, load32, store16, store32},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Translates the frame between `data` and `end` if it is an ICMP error about a tracked flow;
/// `true` if it did. Parsed here on its own, at constant offsets (outer and quoted IPv4 headers
/// without options), so that the TCP/UDP parser's packet ranges stay as the verifier knows them.
#[inline(always)]
pub fn translate(data: usize, end: usize) -> bool {
    let l3 = data + ETH_HLEN;
    let l4 = l3 + 20;
    // ICMP header (8), quoted IPv4 header (20, no options), 8 bytes of its datagram.
    let q3 = l4 + 8;
    let q4 = q3 + 20;
    if q4 + 8 > end {
        return false;
    }
    // SAFETY: q4 + 8 <= end checked above, and every offset read lies below it.
    let (
        ethertype,
        vihl,
        tot_len,
        frag,
        proto,
        ty,
        q_vihl,
        q_proto,
        q_saddr,
        q_daddr,
        q_sport,
        q_dport,
        o_saddr,
        o_daddr,
    ) = unsafe {
        (
            u16::from_be(load16(data + 12)),
            load16(l3).to_ne_bytes()[0],
            u16::from_be(load16(l3 + 2)),
            u16::from_be(load16(l3 + 6)),
            load16(l3 + 8).to_ne_bytes()[1],
            load16(l4).to_ne_bytes()[0],
            load16(q3).to_ne_bytes()[0],
            load16(q3 + 8).to_ne_bytes()[1],
            load32(q3 + 12),
            load32(q3 + 16),
            load16(q4),
            load16(q4 + 2),
            load32(l3 + 12),
            load32(l3 + 16),
        )
    };
    // The datagram's length must cover the quote: bytes past it are padding the kernel trims
    // (the fuzzer found such an error translated in its padding).
    if ethertype != ETH_P_IP
        || vihl != 0x45
        || proto != IPPROTO_ICMP
        || frag & 0x3fff != 0
        || usize::from(tot_len) < q4 + 8 - l3
    {
        return false;
    }
    if (ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED)
        || q_vihl != 0x45
        || (q_proto != IPPROTO_TCP && q_proto != IPPROTO_UDP)
    {
        return false;
    }
    let key = |saddr: u32, daddr: u32, sport: u16, dport: u16, dir: u8| Ct4Key {
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        proto: q_proto,
        dir,
        _pad: 0,
    };

    // The quoted packet went frontend -> client: it was a reply; the flow's forward entry
    // (client -> frontend) names the backend.
    if let Some(e) = CT.get_ptr(key(q_daddr, q_saddr, q_dport, q_sport, CT_DIR_FORWARD)) {
        // SAFETY: pointer from a lookup in this run.
        let (addr, port) = unsafe { (u32::from_ne_bytes((*e).nat_addr), (*e).nat_port.to_be()) };
        // SAFETY: every offset is within q4 + 8 <= end, or the outer header.
        unsafe {
            if o_daddr == q_saddr {
                rewrite_outer(l3, 16, o_daddr, addr);
            }
            rewrite_quote(l4, q3, 12, q4, q_saddr, addr, q_sport, port);
        }
        return true;
    }
    // The quoted packet went client -> backend (after DNAT): the reply entry (backend ->
    // client) names the frontend.
    if let Some(e) = CT.get_ptr(key(q_daddr, q_saddr, q_dport, q_sport, CT_DIR_REPLY)) {
        // SAFETY: as above.
        let (addr, port, flags) =
            unsafe { (u32::from_ne_bytes((*e).nat_addr), (*e).nat_port.to_be(), (*e).flags) };
        // SAFETY: as above.
        unsafe {
            if o_saddr == q_daddr && flags & CT_F_EGRESS_REVNAT == 0 {
                rewrite_outer(l3, 12, o_saddr, addr);
            }
            rewrite_quote(l4, q3, 16, q4 + 2, q_daddr, addr, q_dport, port);
        }
        return true;
    }
    false
}

/// Replaces the outer address at `l3 + off` and fixes the outer header checksum.
///
/// # Safety
/// `l3..l3 + 20` must be bounds-checked.
#[inline(always)]
unsafe fn rewrite_outer(l3: usize, off: usize, old: u32, new: u32) {
    unsafe {
        store16(l3 + 10, csum::replace4(load16(l3 + 10), old, new));
        store32(l3 + off, new);
    }
}

/// Replaces an address (at `q3 + addr_off`) and a port (at `port_at`) of the quoted datagram,
/// fixing the quoted header's checksum and the ICMP checksum, which covers both.
///
/// # Safety
/// The ICMP header at `l4`, the quoted header at `q3` and `port_at + 2` must be bounds-checked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rewrite_quote(
    l4: usize,
    q3: usize,
    addr_off: usize,
    port_at: usize,
    old: u32,
    new: u32,
    old_port: u16,
    new_port: u16,
) {
    unsafe {
        let old_qcheck = load16(q3 + 10);
        let new_qcheck = csum::replace4(old_qcheck, old, new);
        let mut icmp = load16(l4 + 2);
        icmp = csum::replace4(icmp, old, new);
        icmp = csum::replace2(icmp, old_qcheck, new_qcheck);
        icmp = csum::replace2(icmp, old_port, new_port);
        store16(l4 + 2, icmp);
        store16(q3 + 10, new_qcheck);
        store32(q3 + addr_off, new);
        store16(port_at, new_port);
    }
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// The same translation for ICMPv6 errors (destination unreachable, packet too big, time
/// exceeded) about tracked IPv6 flows: outer and quoted IPv6 headers without extension headers,
/// the quoted addresses and ports read and rewritten, and the ICMPv6 checksum (which covers the
/// outer addresses through the pseudo-header, and the whole quote) updated. A subprogram with its
/// keys in the IPv6 scratch area. `true` if it translated the frame.
#[inline(never)]
pub fn translate6(data: usize, end: usize) -> bool {
    let l3 = data + ETH_HLEN;
    let l4 = l3 + 40;
    // ICMPv6 header (8), quoted IPv6 header (40), the first 8 bytes of its datagram.
    let q3 = l4 + 8;
    let q4 = q3 + 40;
    if q4 + 8 > end {
        return false;
    }
    // SAFETY: q4 + 8 <= end checked above, and every offset read lies below it.
    let (ethertype, payload_len, next, ty, q_version, q_next, q_sport, q_dport) = unsafe {
        (
            u16::from_be(load16(data + 12)),
            u16::from_be(load16(l3 + 4)),
            load16(l3 + 6).to_ne_bytes()[0],
            load16(l4).to_ne_bytes()[0],
            load16(q3).to_ne_bytes()[0] >> 4,
            load16(q3 + 6).to_ne_bytes()[0],
            load16(q4),
            load16(q4 + 2),
        )
    };
    // As for IPv4: the payload length must cover the quote.
    if ethertype != ETH_P_IPV6 || next != IPPROTO_ICMPV6 || usize::from(payload_len) < q4 + 8 - l4 {
        return false;
    }
    if (ty != ICMPV6_DEST_UNREACH && ty != ICMPV6_PACKET_TOO_BIG && ty != ICMPV6_TIME_EXCEEDED)
        || q_version != 6
        || (q_next != IPPROTO_TCP && q_next != IPPROTO_UDP)
    {
        return false;
    }
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) else { return false };
    // SAFETY: the per-CPU scratch entry of XDP; this program run is its only user.
    let s = unsafe { &mut *s };
    // The quoted packet's tuple, turned around: (quoted destination -> quoted source).
    // SAFETY: both quoted addresses are below q4.
    unsafe {
        load_addr6(q3 + 24, &mut s.key.saddr);
        load_addr6(q3 + 8, &mut s.key.daddr);
    }
    s.key.sport = u16::from_be(q_dport);
    s.key.dport = u16::from_be(q_sport);
    s.key.proto = q_next;
    s.key._pad = 0;
    let icmp_check = l4 + 2;

    // The quoted packet went frontend -> client: it was a reply; the flow's forward entry
    // (client -> frontend) names the backend.
    s.key.dir = CT_DIR_FORWARD;
    if let Some(e) = CT6.get_ptr(&s.key) {
        // SAFETY: pointer from a lookup in this run; plain reads.
        unsafe { (s.val.nat_addr, s.val.nat_port) = ((*e).nat_addr, (*e).nat_port) };
        // SAFETY: every offset is within q4 + 8 <= end.
        unsafe {
            if same_addr(l3 + 24, q3 + 8) {
                put_addr(l3 + 24, &s.val.nat_addr, icmp_check);
            }
            put_addr(q3 + 8, &s.val.nat_addr, icmp_check);
            put_port(q4, s.val.nat_port, icmp_check);
        }
        return true;
    }
    // The quoted packet went client -> backend (after DNAT): the reply entry (backend ->
    // client) names the frontend.
    s.key.dir = CT_DIR_REPLY;
    if let Some(e) = CT6.get_ptr(&s.key) {
        // SAFETY: as above.
        let flags = unsafe {
            (s.val.nat_addr, s.val.nat_port) = ((*e).nat_addr, (*e).nat_port);
            (*e).flags
        };
        // SAFETY: as above.
        unsafe {
            // Sent by the backend itself: from the frontend, unless that is a node address (a
            // local source is for TC egress; the client matches the quote).
            if same_addr(l3 + 8, q3 + 24) && flags & CT_F_EGRESS_REVNAT == 0 {
                put_addr(l3 + 8, &s.val.nat_addr, icmp_check);
            }
            put_addr(q3 + 24, &s.val.nat_addr, icmp_check);
            put_port(q4 + 2, s.val.nat_port, icmp_check);
        }
        return true;
    }
    false
}

/// Whether the IPv6 addresses at `a` and `b` are equal.
///
/// # Safety
/// Both 16-byte ranges must be bounds-checked.
#[inline(always)]
unsafe fn same_addr(a: usize, b: usize) -> bool {
    let mut i = 0;
    while i < 8 {
        // SAFETY: within the checked ranges.
        if unsafe { load16(a + 2 * i) != load16(b + 2 * i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Writes the IPv6 address `new` at `at`, and updates the checksum at `check` for the change.
///
/// # Safety
/// `at..at + 16` and `check..check + 2` must be bounds-checked.
#[inline(always)]
unsafe fn put_addr(at: usize, new: &[u8; 16], check: usize) {
    let mut old_w = [0u16; 8];
    let mut new_w = [0u16; 8];
    let mut i = 0;
    while i < 8 {
        // SAFETY: within the checked range.
        old_w[i] = unsafe { load16(at + 2 * i) };
        new_w[i] = u16::from_ne_bytes([new[2 * i], new[2 * i + 1]]);
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        store16(check, csum::replace16(load16(check), &old_w, &new_w));
        let mut i = 0;
        while i < 8 {
            store16(at + 2 * i, new_w[i]);
            i += 1;
        }
    }
}

/// Writes `port` (host order) at `at` and updates the checksum at `check`.
///
/// # Safety
/// `at..at + 2` and `check..check + 2` must be bounds-checked.
#[inline(always)]
unsafe fn put_port(at: usize, port: u16, check: usize) {
    let new = port.to_be();
    // SAFETY: as above.
    unsafe {
        store16(check, csum::replace2(load16(check), load16(at), new));
        store16(at, new);
    }
}
