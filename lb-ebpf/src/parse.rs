//! Bounds-checked packet access and header parsing.
//!
//! The Ethernet header is 14 bytes, so IPv4 fields sit on 2-byte boundaries: every access goes
//! through 16-bit loads and stores, which are aligned as long as the frame starts 2-aligned (the
//! kernel's XDP buffers do).
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Reads the 16-bit word at `addr` in memory order.
///
/// # Safety
/// `addr..addr + 2` must have been bounds-checked against `data_end`.
#[inline(always)]
pub unsafe fn load16(addr: usize) -> u16 {
    unsafe { *(addr as *const u16) }
}

/// # Safety
/// As [`load16`].
#[inline(always)]
pub unsafe fn store16(addr: usize, v: u16) {
    unsafe { *(addr as *mut u16) = v }
}

/// Reads a 32-bit field at a 2-aligned `addr`, in memory order.
///
/// # Safety
/// `addr..addr + 4` must have been bounds-checked against `data_end`.
#[inline(always)]
pub unsafe fn load32(addr: usize) -> u32 {
    unsafe { u32::from(load16(addr)) | (u32::from(load16(addr + 2)) << 16) }
}

/// # Safety
/// As [`load32`].
#[inline(always)]
pub unsafe fn store32(addr: usize, v: u32) {
    unsafe {
        store16(addr, v as u16);
        store16(addr + 2, (v >> 16) as u16);
    }
}

/// What the parser found, with the tuple in packet byte order.
pub enum Parsed {
    NotIpv4,
    Malformed,
    OtherProto,
    Fragment,
    L4(Packet),
}

/// An IPv4 TCP or UDP packet whose headers are all within the buffer.
pub struct Packet {
    /// Address of the IPv4 header.
    pub l3: usize,
    /// Address of the TCP or UDP header.
    pub l4: usize,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    /// Address of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check(&self) -> usize {
        if self.proto == IPPROTO_TCP { self.l4 + 16 } else { self.l4 + 6 }
    }
}

/// Parses the frame between `data` and `end` (an XDP buffer, or the linear part of an skb).
#[inline(always)]
pub fn parse(data: usize, end: usize) -> Parsed {
    if data + ETH_HLEN + 20 > end {
        if data + ETH_HLEN > end {
            return Parsed::Malformed;
        }
        // SAFETY: checked just above.
        let proto = u16::from_be(unsafe { load16(data + 12) });
        return if proto == ETH_P_IP { Parsed::Malformed } else { Parsed::NotIpv4 };
    }
    // SAFETY: data + 34 <= end was checked above for every access in this block.
    let (ethertype, vihl, tot_len, frag, proto, saddr, daddr) = unsafe {
        let l3 = data + ETH_HLEN;
        let w0 = load16(l3);
        (
            u16::from_be(load16(data + 12)),
            // first byte of the IP header (version and IHL), whatever the host byte order
            w0.to_ne_bytes()[0],
            u16::from_be(load16(l3 + 2)),
            u16::from_be(load16(l3 + 6)),
            load16(l3 + 8).to_ne_bytes()[1],
            load32(l3 + 12),
            load32(l3 + 16),
        )
    };
    if ethertype != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    if vihl >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || usize::from(tot_len) < ihl {
        return Parsed::Malformed;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::OtherProto;
    }
    if frag & (IP_MF | IP_OFFSET) != 0 {
        return Parsed::Fragment;
    }
    let l3 = data + ETH_HLEN;
    let l4 = l3 + ihl;
    let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 };
    if l4 + l4_len > end || usize::from(tot_len) < ihl + l4_len {
        return Parsed::Malformed;
    }
    // SAFETY: l4 + l4_len <= end checked above; the flags byte is at l4 + 13 < l4 + 20.
    let (sport, dport, tcp_flags) = unsafe {
        let flags = if proto == IPPROTO_TCP { load16(l4 + 12).to_ne_bytes()[1] } else { 0 };
        (load16(l4), load16(l4 + 2), flags)
    };
    Parsed::L4(Packet { l3, l4, proto, tcp_flags, saddr, daddr, sport, dport })
}
