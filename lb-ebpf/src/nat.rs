//! Address and port rewrites with incremental checksum updates (RFC 1624).
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::{IPPROTO_UDP, csum};

use crate::{
    frame::Frame,
    parse::{Packet, load16, load32, store16, store32},
};

/// Rewrites the destination (forward translation), or the source (reply translation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Translates `pkt` in frame `f`: `addr` (packet order) and `port` (host order) into the chosen
/// side, and `src_port` (host order), unless 0, as its source port (a SNATed flow's port; its
/// address comes at TC egress). Checksums fixed as the frame needs (see [`crate::frame`]).
#[inline(always)]
pub fn translate<F: Frame>(f: F, pkt: &Packet, side: Side, addr: [u8; 4], port: u16, src_port: u16) {
    if !F::SKB {
        rewrite(pkt, side, addr, port);
        if src_port != 0 {
            rewrite_port(pkt, Side::Source, src_port);
        }
        return;
    }
    let (addr_off, port_off) = match side {
        Side::Source => (12, 0),
        Side::Destination => (16, 2),
    };
    // Offsets, not pointers: the helper below invalidates every packet pointer.
    let check = pkt.l4_check() - f.data();
    let new_addr = u32::from_ne_bytes(addr);
    let new_port = port.to_be();
    let new_sport = src_port.to_be();
    // SAFETY: parse() bounds-checked the whole IPv4 header and the L4 header (20 bytes for TCP,
    // 8 for UDP), which contain every offset used here.
    let (old_addr, old_port, old_sport) = unsafe {
        let old_addr = load32(pkt.l3 + addr_off);
        let old_port = load16(pkt.l4 + port_off);
        let old_sport = load16(pkt.l4);
        let ip_check = load16(pkt.l3 + 10);
        store16(pkt.l3 + 10, csum::replace4(ip_check, old_addr, new_addr));
        store32(pkt.l3 + addr_off, new_addr);
        store16(pkt.l4 + port_off, new_port);
        if src_port != 0 {
            store16(pkt.l4, new_sport);
        }
        (old_addr, old_port, old_sport)
    };
    // A UDP checksum of zero means "none" and stays so.
    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    let _ = f.l4_csum_replace(check, old_addr, new_addr, u64::from(BPF_F_PSEUDO_HDR) | mangled | 4)
        // A port kept (the Service's port is the pod's) leaves the checksum as it is: one helper
        // call fewer on a frequent path.
        && (old_port == new_port || f.l4_csum_replace(check, u32::from(old_port), u32::from(new_port), mangled | 2))
        && (src_port == 0
            || f.l4_csum_replace(check, u32::from(old_sport), u32::from(new_sport), mangled | 2));
}

/// Writes `port` (host order) into the chosen side of `pkt` and fixes the L4 checksum.
#[inline(always)]
pub fn rewrite_port(pkt: &Packet, side: Side, port: u16) {
    let port = port.to_be();
    let port_off = if side == Side::Source { 0 } else { 2 };
    let l4_check = pkt.l4_check();
    // SAFETY: as in `rewrite`: the L4 header was bounds-checked by parse().
    unsafe {
        let old_port = load16(pkt.l4 + port_off);
        let old_l4 = load16(l4_check);
        let mut l4 = csum::replace2(old_l4, old_port, port);
        if pkt.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        store16(l4_check, l4);
        store16(pkt.l4 + port_off, port);
    }
}

/// Writes `addr` (packet order) and `port` (host order) into the chosen side of `pkt` and fixes
/// both checksums.
#[inline(always)]
pub fn rewrite(pkt: &Packet, side: Side, addr: [u8; 4], port: u16) {
    let addr = u32::from_ne_bytes(addr);
    let port = port.to_be();
    let (addr_off, port_off) = match side {
        Side::Source => (12, 0),
        Side::Destination => (16, 2),
    };
    let l4_check = pkt.l4_check();
    // SAFETY: parse() bounds-checked the whole IPv4 header and the L4 header (20 bytes for TCP,
    // 8 for UDP), which contain every offset used here.
    unsafe {
        let old_addr = load32(pkt.l3 + addr_off);
        let old_port = load16(pkt.l4 + port_off);

        let ip_check = load16(pkt.l3 + 10);
        store16(pkt.l3 + 10, csum::replace4(ip_check, old_addr, addr));

        let old_l4 = load16(l4_check);
        let mut l4 = csum::replace4(old_l4, old_addr, addr);
        l4 = csum::replace2(l4, old_port, port);
        if pkt.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        store16(l4_check, l4);

        store32(pkt.l3 + addr_off, addr);
        store16(pkt.l4 + port_off, port);
    }
}

/// Writes `addr` (packet order) into the chosen side of the IPv4 header at `l3` and fixes its
/// checksum: a later fragment, which has no L4 header (its first fragment carried the L4
/// checksum, already fixed for the whole datagram).
#[inline(always)]
pub fn rewrite_addr(l3: usize, side: Side, addr: [u8; 4]) {
    let addr = u32::from_ne_bytes(addr);
    let addr_off = if side == Side::Source { 12 } else { 16 };
    // SAFETY: parse() bounds-checked the 20-byte IPv4 header, which holds every offset used.
    unsafe {
        let old_addr = load32(l3 + addr_off);
        let ip_check = load16(l3 + 10);
        store16(l3 + 10, csum::replace4(ip_check, old_addr, addr));
        store32(l3 + addr_off, addr);
    }
}
