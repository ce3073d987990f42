//! Bounds-checked packet access and header parsing.
//!
//! The Ethernet header is 14 bytes, so IPv4 fields sit on 2-byte boundaries: every access goes
//! through 16-bit loads and stores, which are aligned as long as the frame starts 2-aligned (the
//! kernel's XDP buffers do).
use lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
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
    /// An IPv6 frame: [`parse6`] reads it.
    Ipv6,
    Malformed,
    OtherProto,
    /// A TCP or UDP fragment after the first: no ports in it.
    Fragment(Fragment),
    L4(Packet),
}

/// A later fragment of an IPv4 TCP or UDP datagram: its header (bounds-checked), no L4 header.
pub struct Fragment {
    /// Address of the IPv4 header.
    pub l3: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    /// The IP identification, in packet order.
    pub id: u16,
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
    /// The IP identification, in packet order.
    pub id: u16,
    /// The first fragment of a datagram sent in fragments: its later fragments are translated
    /// as it is ([`crate::maps::FRAG4`]).
    pub first_fragment: bool,
}

impl Packet {
    /// Address of the L4 checksum field (SCTP's CRC32c included).
    #[inline(always)]
    pub fn l4_check(&self) -> usize {
        match self.proto {
            IPPROTO_TCP => self.l4 + 16,
            IPPROTO_SCTP => self.l4 + 8,
            _ => self.l4 + 6,
        }
    }

    /// Length of an SCTP packet, from its common header to the end (what its CRC32c covers).
    #[inline(always)]
    pub fn sctp_len(&self) -> u32 {
        // SAFETY: parse() bounds-checked the IPv4 header; its total length covers the L4 header.
        u32::from(u16::from_be(unsafe { load16(self.l3 + 2) })) - (self.l4 - self.l3) as u32
    }
}

/// The fixed length of a TCP (20), SCTP (12, the common header) or UDP (8) header: what the
/// core reads of it.
#[inline(always)]
pub const fn l4_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_SCTP => 12,
        _ => 8,
    }
}

/// The protocols whose flows are balanced.
#[inline(always)]
pub const fn balanced(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
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
        return match proto {
            ETH_P_IP => Parsed::Malformed,
            ETH_P_IPV6 => Parsed::Ipv6,
            _ => Parsed::NotIpv4,
        };
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
        return if ethertype == ETH_P_IPV6 { Parsed::Ipv6 } else { Parsed::NotIpv4 };
    }
    if vihl >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || usize::from(tot_len) < ihl {
        return Parsed::Malformed;
    }
    if !balanced(proto) {
        return Parsed::OtherProto;
    }
    // SCTP over IP fragments is not translated: its checksum covers the whole datagram, whose
    // length only the last fragment tells (SCTP senders size packets to the path's MTU).
    if proto == IPPROTO_SCTP && frag & (IP_OFFSET | IP_MF) != 0 {
        return Parsed::OtherProto;
    }
    let l3 = data + ETH_HLEN;
    // The IP identification is read for fragments only (a load less on every other packet).
    // SAFETY (both): data + 34 <= end was checked above, and l3 + 4 < data + 34.
    if frag & IP_OFFSET != 0 {
        // A header longer than the frame (found by the fuzzer): the kernel drops it; not ours
        // to translate.
        if l3 + ihl > end {
            return Parsed::Malformed;
        }
        let id = unsafe { load16(l3 + 4) };
        return Parsed::Fragment(Fragment { l3, proto, saddr, daddr, id });
    }
    // The first of several fragments holds the L4 header, and the checksum of the whole
    // datagram: it is translated as a datagram in one piece would be.
    let first_fragment = frag & IP_MF != 0;
    let id = if first_fragment { unsafe { load16(l3 + 4) } } else { 0 };
    let l4 = l3 + ihl;
    let l4_len = l4_len(proto);
    if l4 + l4_len > end || usize::from(tot_len) < ihl + l4_len {
        return Parsed::Malformed;
    }
    // SAFETY: l4 + l4_len <= end checked above; the flags byte is at l4 + 13 < l4 + 20.
    let (sport, dport, tcp_flags) = unsafe {
        let flags = if proto == IPPROTO_TCP { load16(l4 + 12).to_ne_bytes()[1] } else { 0 };
        (load16(l4), load16(l4 + 2), flags)
    };
    Parsed::L4(Packet { l3, l4, proto, tcp_flags, saddr, daddr, sport, dport, id, first_fragment })
}

/// What the IPv6 parser found.
pub enum Parsed6 {
    Malformed,
    /// Neither TCP, UDP nor SCTP (ICMPv6, ESP, no next header, an unknown header, or a chain of
    /// extension headers longer than [`MAX_EXT_HEADERS`]).
    OtherProto,
    /// A TCP or UDP fragment after the first (no ports in it).
    Fragment(Fragment6),
    /// A fragment header further down a chain of extension headers: never rewritten.
    OtherFragment,
    L4(Packet6),
}

/// A later fragment of an IPv6 TCP or UDP datagram: its header (bounds-checked), no L4 header.
pub struct Fragment6 {
    /// Address of the IPv6 header.
    pub l3: usize,
    /// The protocol after the fragment header.
    pub proto: u8,
    /// The fragment header's identification, in packet order.
    pub id: u32,
}

/// An IPv6 TCP or UDP packet whose headers, extension headers included, are all within the
/// buffer. The addresses are read from the packet where needed (at `l3 + 8` and `l3 + 24`):
/// copies of them would crowd the 512-byte stack.
pub struct Packet6 {
    /// Address of the IPv6 header.
    pub l3: usize,
    /// Address of the TCP or UDP header.
    pub l4: usize,
    /// Address of the L4 checksum field, computed where its bound was checked: the verifier
    /// cannot tie a later test of `proto` to the check made for it.
    pub l4_check: usize,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Packet byte order.
    pub sport: u16,
    pub dport: u16,
    /// The first fragment of a datagram sent in fragments: its later fragments are translated
    /// as it is ([`crate::maps::FRAG6`]) by the fragment header's identification (`frag_id`,
    /// packet order).
    pub first_fragment: bool,
    pub frag_id: u32,
}

impl Packet6 {
    /// Length of an SCTP packet, from its common header to the end (what its CRC32c covers).
    #[inline(always)]
    pub fn sctp_len(&self) -> u32 {
        // SAFETY: parse6() bounds-checked the IPv6 header; its payload covers the L4 header.
        let payload = u32::from(u16::from_be(unsafe { load16(self.l3 + 4) }));
        payload - (self.l4 - self.l3 - 40) as u32
    }
}

/// Extension headers skipped before giving up on finding TCP or UDP (RFC 8200 orders at most
/// hop-by-hop, destination options, routing, fragment, authentication, destination options).
pub const MAX_EXT_HEADERS: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Copies the 16 bytes of an IPv6 address at a 2-aligned `addr` into `out`.
///
/// # Safety
/// `addr..addr + 16` must have been bounds-checked against `data_end`.
#[inline(always)]
pub unsafe fn load_addr6(addr: usize, out: &mut [u8; 16]) {
    let mut i = 0;
    while i < 8 {
        // SAFETY: within the checked 16 bytes.
        let w = unsafe { load16(addr + 2 * i) }.to_ne_bytes();
        out[2 * i] = w[0];
        out[2 * i + 1] = w[1];
        i += 1;
    }
}

/// Parses the IPv6 frame between `data` and `end` (its ethertype already read), skipping
/// hop-by-hop, routing, destination options and authentication headers. Every header is
/// bounds-checked before it is read, and the L4 header must lie within the payload length.
#[inline(always)]
pub fn parse6(data: usize, end: usize) -> Parsed6 {
    let l3 = data + ETH_HLEN;
    if l3 + 40 > end {
        return Parsed6::Malformed;
    }
    // SAFETY: l3 + 40 <= end checked above.
    let (version, payload_len, first) = unsafe {
        (load16(l3).to_ne_bytes()[0] >> 4, u16::from_be(load16(l3 + 4)), load16(l3 + 6).to_ne_bytes()[0])
    };
    if version != 6 {
        return Parsed6::Malformed;
    }
    let mut next = first;
    let mut off = l3 + 40;
    // A fragment header right after the IPv6 header (where senders put it when no other
    // extension header comes first): a later fragment is known by its protocol alone; the
    // first fragment (more to come) holds the L4 header and the whole datagram's checksum, and
    // is translated as a datagram in one piece would be. Only UDP's: IPv6 stacks size TCP
    // segments to the path's MTU rather than fragment them, and following a first fragment
    // through every TCP path too doubles the verifier's work on the program (+0.35 s at each
    // load). A fragment header further down a chain of extension headers, or before TCP, is
    // passed untouched (`OtherFragment`).
    let (mut first_fragment, mut frag_id) = (false, 0u32);
    if next == NEXTHDR_FRAGMENT {
        if off + 8 > end {
            return Parsed6::Malformed;
        }
        // SAFETY: off + 8 <= end checked just above.
        let (nh, offset_m, id) =
            unsafe { (load16(off).to_ne_bytes()[0], u16::from_be(load16(off + 2)), load32(off + 4)) };
        if offset_m & 0xfff8 != 0 {
            if nh != IPPROTO_TCP && nh != IPPROTO_UDP {
                return Parsed6::OtherFragment;
            }
            return Parsed6::Fragment(Fragment6 { l3, proto: nh, id });
        }
        if nh != IPPROTO_UDP {
            return Parsed6::OtherFragment;
        }
        // With no more to come, the datagram is whole.
        first_fragment = offset_m & 1 != 0;
        frag_id = id;
        next = nh;
        off += 8;
    }
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        i += 1;
        let len = match next {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => break,
            NEXTHDR_FRAGMENT => return Parsed6::OtherFragment,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                // Every extension header is at least 8 bytes.
                if off + 8 > end {
                    return Parsed6::Malformed;
                }
                // SAFETY: off + 8 <= end checked just above.
                let [nh, hlen] = unsafe { load16(off) }.to_ne_bytes();
                // Units of 8 bytes past the first 8; the authentication header counts 4-byte
                // units past the first 8 (RFC 4302).
                let len = if next == NEXTHDR_AUTH {
                    (usize::from(hlen) + 2) * 4
                } else {
                    (usize::from(hlen) + 1) * 8
                };
                next = nh;
                len
            }
            _ => return Parsed6::OtherProto,
        };
        off += len;
    }
    if !balanced(next) {
        return Parsed6::OtherProto;
    }
    let l4 = off;
    // Each length a constant in its branch, so that the verifier knows the bound of each read.
    let (tcp_flags, l4_check) = if next == IPPROTO_TCP {
        if l4 + 20 > end || l4 + 20 > l3 + 40 + usize::from(payload_len) {
            return Parsed6::Malformed;
        }
        // SAFETY: l4 + 20 <= end checked just above; the flags byte is at l4 + 13.
        (unsafe { load16(l4 + 12) }.to_ne_bytes()[1], l4 + 16)
    } else if next == IPPROTO_SCTP {
        // The common header: ports, verification tag, checksum.
        if l4 + 12 > end || l4 + 12 > l3 + 40 + usize::from(payload_len) {
            return Parsed6::Malformed;
        }
        (0, l4 + 8)
    } else {
        if l4 + 8 > end || l4 + 8 > l3 + 40 + usize::from(payload_len) {
            return Parsed6::Malformed;
        }
        (0, l4 + 6)
    };
    // SAFETY: l4 + 8 <= end in both branches above.
    let (sport, dport) = unsafe { (load16(l4), load16(l4 + 2)) };
    Parsed6::L4(Packet6 { l3, l4, l4_check, proto: next, tcp_flags, sport, dport, first_fragment, frag_id })
}
