//! Answers for a Service without a usable endpoint, as kube-proxy's REJECT rules give them: a
//! TCP reset (RFC 9293 3.10.7.1), or an ICMP port unreachable for UDP (RFC 792, quoting the
//! IPv4 header and the first 8 bytes of the datagram). The frame is rewritten in place into the
//! answer and sent back out of the interface it came in on (XDP_TX), so the client learns at
//! once instead of retrying into a black hole.
//!
//! Every value needed is read before the frame changes size; after `bpf_xdp_adjust_*` every
//! packet pointer is taken and bounds-checked again.
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use lb_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, REJECT_ICMP_BURST, REJECT_ICMP_PER_SEC, TCP_ACK, TCP_FIN,
    TCP_RST, TCP_SYN,
};

use crate::{
    frame::Frame,
    maps::REJECT_BUCKET,
    parse::{ETH_HLEN, Packet, Packet6, Parsed6, load16, load32, parse6, store16, store32},
};

const TTL: u8 = 64;

/// Turns `pkt` into the answer to its sender. `false` when no answer may be sent (the packet is
/// itself a reset, a UDP packet carries IP options, the ICMP rate limit is reached) or the frame
/// could not be resized: the caller then drops it. `TRACE` leaves the rate limiter alone.
#[inline(always)]
pub fn answer<const TRACE: bool, F: Frame>(f: F, pkt: &Packet) -> bool {
    if pkt.proto == IPPROTO_TCP { tcp_reset(f, pkt) } else { icmp_unreachable::<TRACE, F>(f, pkt) }
}

/// Folds a 32-bit sum of 16-bit words into the one's complement checksum, in host order.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the two 16-bit words of an address held in memory order.
#[inline(always)]
fn addr_words(a: u32) -> u32 {
    let a = u32::from_be(a);
    (a >> 16) + (a & 0xffff)
}

/// The three 16-bit words of a MAC address at `at`.
///
/// # Safety
/// `at..at + 6` must be bounds-checked.
#[inline(always)]
unsafe fn mac(at: usize) -> [u16; 3] {
    unsafe { [load16(at), load16(at + 2), load16(at + 4)] }
}

/// # Safety
/// `at..at + 6` must be bounds-checked.
#[inline(always)]
unsafe fn put_mac(at: usize, m: [u16; 3]) {
    unsafe {
        store16(at, m[0]);
        store16(at + 2, m[1]);
        store16(at + 4, m[2]);
    }
}

/// Writes a 20-byte IPv4 header without options at `l3` and its checksum.
///
/// # Safety
/// `l3..l3 + 20` must be bounds-checked.
#[inline(always)]
unsafe fn put_ipv4(l3: usize, tot_len: u16, frag: u16, proto: u8, saddr: u32, daddr: u32) {
    let w0 = 0x4500u16;
    let w4 = (u16::from(TTL) << 8) | u16::from(proto);
    let sum = u32::from(w0)
        + u32::from(tot_len)
        + u32::from(frag)
        + u32::from(w4)
        + addr_words(saddr)
        + addr_words(daddr);
    unsafe {
        store16(l3, w0.to_be());
        store16(l3 + 2, tot_len.to_be());
        store16(l3 + 4, 0); // identification
        store16(l3 + 6, frag.to_be());
        store16(l3 + 8, w4.to_be());
        store16(l3 + 10, fold(sum).to_be());
        store32(l3 + 12, saddr);
        store32(l3 + 16, daddr);
    }
}

#[inline(always)]
fn tcp_reset<F: Frame>(f: F, pkt: &Packet) -> bool {
    if pkt.tcp_flags & TCP_RST != 0 {
        return false; // never answer a reset
    }
    // SAFETY: parse() checked the whole IPv4 header and 20 bytes of TCP header, and the
    // Ethernet header before them.
    let (dst_mac, src_mac, tot_len, ihl, seq, ack, doff) = unsafe {
        // From the checked header pointer: a fresh read of f.data() carries no bounds.
        let eth = pkt.l3 - ETH_HLEN;
        (
            mac(eth),
            mac(eth + 6),
            u16::from_be(load16(pkt.l3 + 2)),
            u32::from(load16(pkt.l3).to_ne_bytes()[0] & 0x0f) * 4,
            u32::from_be(load32(pkt.l4 + 4)),
            u32::from_be(load32(pkt.l4 + 8)),
            u32::from(load16(pkt.l4 + 12).to_ne_bytes()[0] >> 4) * 4,
        )
    };
    // RFC 9293: if the segment has ACK, the reset takes its sequence number from it; otherwise
    // the reset acknowledges the segment (its data, and SYN and FIN, which count one each).
    let (seq_out, ack_out, flags_out) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let payload = u32::from(tot_len).saturating_sub(ihl + doff);
        let len = payload + u32::from(pkt.tcp_flags & TCP_SYN != 0) + u32::from(pkt.tcp_flags & TCP_FIN != 0);
        (0u32, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let (saddr, daddr, sport, dport) = (pkt.saddr, pkt.daddr, pkt.sport, pkt.dport);

    // Ethernet, a 20-byte IPv4 header and a 20-byte TCP header: nothing else.
    const LEN: usize = ETH_HLEN + 20 + 20;
    if !f.resize(LEN) {
        return false;
    }
    let data = f.data();
    if data + LEN > f.data_end() {
        return false;
    }
    let l3 = data + ETH_HLEN;
    let l4 = l3 + 20;
    let w6 = (5u16 << 12) | u16::from(flags_out); // data offset 5, flags
    let sum = addr_words(daddr)
        + addr_words(saddr)
        + u32::from(IPPROTO_TCP)
        + 20
        + u32::from(u16::from_be(dport))
        + u32::from(u16::from_be(sport))
        + (seq_out >> 16)
        + (seq_out & 0xffff)
        + (ack_out >> 16)
        + (ack_out & 0xffff)
        + u32::from(w6);
    // SAFETY: data + LEN <= data_end checked just above.
    unsafe {
        put_mac(data, src_mac);
        put_mac(data + 6, dst_mac);
        put_ipv4(l3, 40, 0x4000, IPPROTO_TCP, daddr, saddr);
        store16(l4, dport);
        store16(l4 + 2, sport);
        store32(l4 + 4, seq_out.to_be());
        store32(l4 + 8, ack_out.to_be());
        store16(l4 + 12, w6.to_be());
        store16(l4 + 14, 0); // window
        store16(l4 + 16, fold(sum).to_be());
        store16(l4 + 18, 0); // urgent pointer
    }
    true
}

/// Takes one answer's worth of credit from this CPU's bucket.
#[inline(always)]
fn icmp_allowed() -> bool {
    let Some(b) = REJECT_BUCKET.get_ptr_mut(0) else { return false };
    const COST: u64 = 1_000_000_000 / REJECT_ICMP_PER_SEC;
    const CAP: u64 = COST * REJECT_ICMP_BURST;
    // SAFETY: helper without arguments; `b` is this CPU's slot of a per-CPU array.
    unsafe {
        let now = bpf_ktime_get_ns();
        let credit = if (*b).last_ns == 0 {
            CAP
        } else {
            ((*b).credit_ns + now.saturating_sub((*b).last_ns)).min(CAP)
        };
        (*b).last_ns = now;
        if credit < COST {
            (*b).credit_ns = credit;
            return false;
        }
        (*b).credit_ns = credit - COST;
    }
    true
}

#[inline(always)]
fn icmp_unreachable<const TRACE: bool, F: Frame>(f: F, pkt: &Packet) -> bool {
    // The quote must be the IPv4 header and 8 bytes: kept to option-less headers, so that every
    // offset below is a constant.
    if pkt.l4 != pkt.l3 + 20 {
        return false;
    }
    if !TRACE && !icmp_allowed() {
        return false;
    }
    // Room for a new IPv4 and ICMP header in front of the datagram: the old IPv4 header then
    // sits exactly where the ICMP message quotes it.
    const GROW: usize = 20 + 8;
    // Frame pointers are re-read afterwards.
    if !f.grow_head(GROW as u32) {
        return false;
    }
    const QUOTE: usize = 20 + 8;
    const LEN: usize = ETH_HLEN + 20 + 8 + QUOTE;
    if !f.resize(LEN) {
        return false;
    }
    let data = f.data();
    if data + LEN > f.data_end() {
        return false;
    }
    let old_eth = data + GROW;
    let quote = old_eth + ETH_HLEN;
    let l3 = data + ETH_HLEN;
    let icmp = l3 + 20;
    // SAFETY: data + LEN <= data_end checked above; every offset below is within LEN.
    unsafe {
        let (dst_mac, src_mac) = (mac(old_eth), mac(old_eth + 6));
        let (saddr, daddr) = (load32(quote + 12), load32(quote + 16));
        put_mac(data, src_mac);
        put_mac(data + 6, dst_mac);
        store16(data + 12, 0x0800u16.to_be());
        put_ipv4(l3, (20 + 8 + QUOTE) as u16, 0, IPPROTO_ICMP, daddr, saddr);
        // Type 3 (destination unreachable), code 3 (port unreachable), 4 unused bytes.
        let w0 = 0x0303u16;
        let mut sum = u32::from(w0);
        let mut i = 0;
        while i < QUOTE {
            sum += u32::from(u16::from_be(load16(quote + i)));
            i += 2;
        }
        store16(icmp, w0.to_be());
        store16(icmp + 2, fold(sum).to_be());
        store32(icmp + 4, 0);
    }
    true
}

/// Sum of the eight 16-bit words of an IPv6 address at `at`, host order.
///
/// # Safety
/// `at..at + 16` must be bounds-checked.
#[inline(always)]
unsafe fn addr6_words(at: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 16 {
        sum += u32::from(u16::from_be(unsafe { load16(at + i) }));
        i += 2;
    }
    sum
}

/// Writes a 40-byte IPv6 header at `l3` with the addresses of the one at `old` swapped (the
/// answer goes back to the sender), and returns the sum of the two addresses' words.
///
/// # Safety
/// `l3..l3 + 40` and `old..old + 40` must be bounds-checked; they may be the same header.
#[inline(always)]
unsafe fn put_ipv6_reply(l3: usize, old: usize, payload_len: u16, next: u8) -> u32 {
    unsafe {
        let mut src = [0u16; 8];
        let mut dst = [0u16; 8];
        let mut i = 0;
        while i < 8 {
            src[i] = load16(old + 8 + 2 * i);
            dst[i] = load16(old + 24 + 2 * i);
            i += 1;
        }
        let sum = addr6_words(old + 8) + addr6_words(old + 24);
        store32(l3, 0x6000_0000u32.to_be()); // version 6, no class, no flow label
        store16(l3 + 4, payload_len.to_be());
        store16(l3 + 6, ((u16::from(next) << 8) | u16::from(TTL)).to_be());
        let mut i = 0;
        while i < 8 {
            store16(l3 + 8 + 2 * i, dst[i]);
            store16(l3 + 24 + 2 * i, src[i]);
            i += 1;
        }
        sum
    }
}

/// The IPv6 answer for a Service without a usable endpoint: a TCP reset, or an ICMPv6 port
/// unreachable (RFC 4443 type 1 code 4) for UDP, quoting the datagram. `false` when none may be
/// sent (a reset, extension headers too long to quote, the rate limit) or the frame could not be
/// resized. A subprogram of
/// its own, given the raw context: the IPv6 path's frame stays small.
#[inline(never)]
pub fn answer6<F: Frame>(f: F) -> bool {
    let Parsed6::L4(pkt) = parse6(f.data(), f.data_end()) else { return false };
    if pkt.proto == IPPROTO_TCP { tcp_reset6(f, &pkt) } else { icmp6_unreachable(f, &pkt) }
}

#[inline(always)]
fn tcp_reset6<F: Frame>(f: F, pkt: &Packet6) -> bool {
    if pkt.tcp_flags & TCP_RST != 0 {
        return false;
    }
    // SAFETY: parse6() checked the IPv6 header, the extension headers and 20 bytes of TCP.
    let (payload_len, seq, ack, doff) = unsafe {
        (
            usize::from(u16::from_be(load16(pkt.l3 + 4))),
            u32::from_be(load32(pkt.l4 + 4)),
            u32::from_be(load32(pkt.l4 + 8)),
            usize::from(load16(pkt.l4 + 12).to_ne_bytes()[0] >> 4) * 4,
        )
    };
    let (seq_out, ack_out, flags_out) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let ext = pkt.l4 - (pkt.l3 + 40);
        let data = payload_len.saturating_sub(ext + doff) as u32;
        let len = data + u32::from(pkt.tcp_flags & TCP_SYN != 0) + u32::from(pkt.tcp_flags & TCP_FIN != 0);
        (0u32, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let (sport, dport) = (pkt.sport, pkt.dport);
    // The TCP header goes right after the IPv6 header (extension headers are not answered),
    // so it is written before the frame shrinks: from the old header's fields, read above.
    // Ethernet, IPv6 and a 20-byte TCP header: nothing else.
    const LEN: usize = ETH_HLEN + 40 + 20;
    // SAFETY: the Ethernet header before the checked IPv6 header; the IPv6 header itself.
    let (dst_mac, src_mac) = unsafe { (mac(pkt.l3 - ETH_HLEN), mac(pkt.l3 - ETH_HLEN + 6)) };
    // The answer's IPv6 header is written over the old one in place (addresses swapped).
    // SAFETY: parse6() checked l3..l3 + 40.
    let addr_sum = unsafe { put_ipv6_reply(pkt.l3, pkt.l3, 20, IPPROTO_TCP) };
    if !f.resize(LEN) {
        return false;
    }
    let data = f.data();
    if data + LEN > f.data_end() {
        return false;
    }
    let l4 = data + ETH_HLEN + 40;
    let w6 = (5u16 << 12) | u16::from(flags_out);
    let sum = addr_sum
        + u32::from(IPPROTO_TCP)
        + 20
        + u32::from(u16::from_be(dport))
        + u32::from(u16::from_be(sport))
        + (seq_out >> 16)
        + (seq_out & 0xffff)
        + (ack_out >> 16)
        + (ack_out & 0xffff)
        + u32::from(w6);
    // SAFETY: data + LEN <= data_end checked just above.
    unsafe {
        put_mac(data, src_mac);
        put_mac(data + 6, dst_mac);
        store16(l4, dport);
        store16(l4 + 2, sport);
        store32(l4 + 4, seq_out.to_be());
        store32(l4 + 8, ack_out.to_be());
        store16(l4 + 12, w6.to_be());
        store16(l4 + 14, 0); // window
        store16(l4 + 16, fold(sum).to_be());
        store16(l4 + 18, 0); // urgent pointer
    }
    true
}

/// Most bytes of the refused packet an ICMPv6 port unreachable quotes: its IPv6 header, any
/// extension headers and the UDP header must fit (else no answer), and as much of the payload as
/// fits besides.
const QUOTE_MAX: usize = 256;

#[inline(always)]
fn icmp6_unreachable<F: Frame>(f: F, pkt: &Packet6) -> bool {
    // The quote starts at the IPv6 header and holds at least the UDP header (the sender's stack
    // reads the ports there, past any extension headers).
    let headers = pkt.l4 + 8 - pkt.l3;
    if headers > QUOTE_MAX || !icmp_allowed() {
        return false;
    }
    // SAFETY: parse6() checked the 40-byte IPv6 header.
    let ip_len = 40 + usize::from(u16::from_be(unsafe { load16(pkt.l3 + 4) }));
    let frame_ip = f.data_end() - pkt.l3;
    // Whole 16-bit words (the checksum runs over words); never fewer than the headers, which
    // are whole 8-byte units.
    let quote_len = ip_len.min(frame_ip).min(QUOTE_MAX) & !1;
    if quote_len < headers {
        return false;
    }
    // Room for a new IPv6 and ICMPv6 header in front: the old IPv6 header then sits exactly
    // where the message quotes it.
    const GROW: usize = 40 + 8;
    // Frame pointers are re-read afterwards.
    if !f.grow_head(GROW as u32) {
        return false;
    }
    let len = ETH_HLEN + 40 + 8 + quote_len;
    if !f.resize(len) {
        return false;
    }
    let data = f.data();
    let end = f.data_end();
    // The fixed part: Ethernet, the new IPv6 and ICMPv6 headers, and the quoted IPv6 header.
    if data + ETH_HLEN + 40 + 8 + 40 > end {
        return false;
    }
    let old_eth = data + GROW;
    let quote = old_eth + ETH_HLEN;
    let l3 = data + ETH_HLEN;
    let icmp = l3 + 40;
    // SAFETY: data + ETH_HLEN + 96 <= end checked above: the headers written, and the quoted
    // IPv6 header read; the rest of the quote is read word by word, each checked.
    unsafe {
        let (dst_mac, src_mac) = (mac(old_eth), mac(old_eth + 6));
        put_mac(data, src_mac);
        put_mac(data + 6, dst_mac);
        store16(data + 12, 0x86ddu16.to_be());
        let addr_sum = put_ipv6_reply(l3, quote, (8 + quote_len) as u16, IPPROTO_ICMPV6);
        // Type 1 (destination unreachable), code 4 (port unreachable), 4 unused bytes; the
        // checksum covers the pseudo-header (addresses, length, next header).
        let w0 = 0x0104u16;
        let mut sum = addr_sum + (8 + quote_len) as u32 + u32::from(IPPROTO_ICMPV6) + u32::from(w0);
        let mut i = 0;
        while i < QUOTE_MAX {
            if i >= quote_len || quote + i + 2 > end {
                break;
            }
            sum += u32::from(u16::from_be(load16(quote + i)));
            i += 2;
        }
        if i != quote_len {
            return false;
        }
        store16(icmp, w0.to_be());
        store16(icmp + 2, fold(sum).to_be());
        store32(icmp + 4, 0);
    }
    true
}
