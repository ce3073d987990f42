//! Address and port rewrites with incremental checksum updates (RFC 1624).
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::{IPPROTO_SCTP, IPPROTO_UDP, crc32c, csum};

use crate::{
    frame::Frame,
    maps::{SCRATCH_XDP, SCRATCH6, SCTP_CRC6, SCTP_TRANSLATE4, SctpFix},
    parse::{ETH_HLEN, Packet, load16, load32, store16, store32},
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
    if pkt.proto == IPPROTO_SCTP {
        translate_sctp(f, pkt, side, addr, port, src_port);
        return;
    }
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

/// [`translate`] for SCTP: left whole to [`finish_sctp`] at the end of the run (the core's
/// frame has no stack to spare for it, and there the verifier walks it once per verdict with
/// every other register dead, instead of once per path into a translation, which doubled its
/// walk of the program).
#[inline(always)]
fn translate_sctp<F: Frame>(f: F, pkt: &Packet, side: Side, addr: [u8; 4], port: u16, src_port: u16) {
    if let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) {
        // SAFETY: this CPU's scratch entry of the datapath; one program run at a time uses it.
        // Field by field: a whole `SctpFix` would be built on the stack first.
        unsafe {
            let fix = &mut (*s).sctp;
            fix.kind = SCTP_TRANSLATE4;
            fix.source = side == Side::Source;
            fix.l4 = (pkt.l4 - f.data()) as u16;
            fix.addr = addr;
            fix.ports = u32::from(port) | (u32::from(src_port) << 16);
        }
    }
}

/// Leaves the CRC32c update of the IPv6 SCTP packet at `l4`, whose address and ports were just
/// rewritten (ports from `old_ports`; `diff`: see [`sctp_ports_changed`]), to [`finish_sctp`],
/// for the reasons [`translate_sctp`] gives.
#[inline(always)]
pub fn defer_sctp6<F: Frame>(f: F, l4: usize, old_ports: u32, len: u32, diff: u32) {
    if let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) {
        let fix =
            SctpFix { kind: SCTP_CRC6, l4: (l4 - f.data()) as u16, old_ports, len, diff, ..SctpFix::NONE };
        // SAFETY: as in `translate_sctp`.
        unsafe { (*s).sctp = fix };
    }
}

/// The end of a datapath run: the SCTP translation or checksum update left by
/// [`translate_sctp`] or [`defer_sctp6`], if any. A subprogram: its frame is not on top of the
/// core's.
#[inline(never)]
pub fn finish_sctp<F: Frame>(f: F) {
    let Some(s) = SCRATCH6.get_ptr_mut(SCRATCH_XDP) else { return };
    // SAFETY: as in `translate_sctp`.
    let fix = unsafe { &mut (*s).sctp };
    let kind = fix.kind;
    if kind == 0 {
        return;
    }
    fix.kind = 0;
    let off = usize::from(fix.l4);
    let (data, end) = (f.data(), f.data_end());
    // The headers before it: at most 14 + 60 (IPv4), or 14 + 40 + extension headers.
    if off > 1024 || data + off + 12 > end {
        return;
    }
    let l4 = data + off;
    if kind == SCTP_CRC6 {
        // SAFETY: bounds-checked just above.
        unsafe { sctp_ports_changed(f, l4, fix.old_ports, fix.len, fix.diff) };
        return;
    }
    let l3 = data + ETH_HLEN;
    if l3 + 20 > end {
        return;
    }
    let (addr_off, port_off) = if fix.source { (12, 0) } else { (16, 2) };
    let (port, src_port) = (fix.ports as u16, (fix.ports >> 16) as u16);
    let new_addr = u32::from_ne_bytes(fix.addr);
    // SAFETY: the IPv4 header and SCTP's common header were bounds-checked above.
    unsafe {
        let len = u32::from(u16::from_be(load16(l3 + 2))).wrapping_sub((l4 - l3) as u32);
        let old_ports = load32(l4);
        let old_addr = load32(l3 + addr_off);
        let ip_check = load16(l3 + 10);
        store16(l3 + 10, csum::replace4(ip_check, old_addr, new_addr));
        store32(l3 + addr_off, new_addr);
        store16(l4 + port_off, port.to_be());
        if src_port != 0 {
            store16(l4, src_port.to_be());
        }
        sctp_ports_changed(f, l4, old_ports, len, 0);
    }
}

/// After the ports of the SCTP packet at `l4` (`len` bytes long) changed from `old_ports` (its
/// first four bytes as they stood in memory): its CRC32c updated to match (see
/// `lb_common::crc32c`). On an skb whose checksum covers the frame, that sum follows the ports,
/// the checksum field and `diff` (other bytes changed, as a one's complement sum).
///
/// # Safety
/// `l4..l4 + 12` must have been bounds-checked.
#[inline(always)]
pub unsafe fn sctp_ports_changed<F: Frame>(f: F, l4: usize, old_ports: u32, len: u32, diff: u32) {
    // SAFETY: as the caller promised.
    let (new_ports, crc) = unsafe { (load32(l4), load32(l4 + 8)) };
    let fixed = sctp_crc(crc, old_ports, new_ports, len);
    // SAFETY: as above.
    unsafe { store32(l4 + 8, fixed) };
    if F::SKB {
        let words = |v: u32| (v & 0xffff) + (v >> 16);
        f.csum_update(diff + words(!old_ports) + words(new_ports) + words(!crc) + words(fixed));
    }
}

/// The checksum field the SCTP packet at `l4` (`len` bytes long) needs once its source port
/// becomes `sport` (packet order): for TC egress, which writes through helpers and so computes
/// the field before any of them invalidates the packet pointers.
///
/// # Safety
/// `l4..l4 + 12` must have been bounds-checked.
#[inline(always)]
pub unsafe fn sctp_crc_with_sport(l4: usize, sport: u16, len: u32) -> u32 {
    // SAFETY: as the caller promised.
    let (old_ports, crc) = unsafe { (load32(l4), load32(l4 + 8)) };
    sctp_crc(crc, old_ports, (old_ports & !0xffff) | u32::from(sport), len)
}

/// The SCTP checksum field `crc` (as it stands in memory) after the packet's first four bytes
/// changed from `old_ports` to `new_ports` (likewise), the packet being `len` bytes long.
#[inline(always)]
pub fn sctp_crc(crc: u32, old_ports: u32, new_ports: u32, len: u32) -> u32 {
    if old_ports == new_ports {
        return crc;
    }
    // Memory holds the checksum little-endian, and `load32` reads memory in host order.
    (u32::from_le(crc) ^ crc_delta(u32::from_le(old_ports ^ new_ports), len)).to_le()
}

/// `lb_common::crc32c::sctp_update` as one subprogram for every caller.
#[inline(never)]
fn crc_delta(changed: u32, len: u32) -> u32 {
    crc32c::sctp_update(changed, len)
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
