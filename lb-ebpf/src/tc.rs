//! TC ingress, the tc datapath: the balancing core of `lb` on the skb (see [`ingress`]).
//!
//! TC egress: source rewrites that must wait until the kernel has routed the packet, because the
//! new source is one of this node's own addresses (a packet arriving with a local source
//! address is a martian):
//! - replies of flows to a node address (node ports, externalIPs the node carries) get the node
//!   address and port the client used;
//! - packets of flows SNATed towards an endpoint on another node get the node address and the
//!   flow's SNAT port.
//!
//! The later fragments of a datagram whose first fragment got a new source here get the same
//! source address.
use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action,
    },
    helpers::generated::{bpf_redirect, bpf_skb_pull_data},
    programs::TcContext,
};
use lb_common::{
    CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_F_EGRESS_REVNAT, Ct4Key, IPPROTO_SCTP, IPPROTO_UDP,
    Stat, is_snat_port,
};

use crate::{
    ct, filter,
    frame::{Frame, Skb},
    lb,
    maps::CT,
    nat,
    parse::{self, Parsed},
    stats::count,
};

/// Headers the core reads (IPv4 with options and TCP with options, an ICMP error's quoted
/// headers, IPv6 extension headers) must lie in the skb's linear part: this much of a longer skb
/// is made linear when it is not.
const LINEAR: u32 = 192;

/// The tc datapath: [`lb::datapath`] on the skb, its verdicts as TC's (a refusal, built in
/// place, goes back out of the interface the packet came in on).
#[inline(always)]
pub fn ingress(skb: *mut __sk_buff) -> i32 {
    let f = Skb(skb);
    // SAFETY: the program's own context.
    let len = unsafe { (*skb).len };
    let want = headers_len(f.data(), f.data_end()).unwrap_or(LINEAR).min(len);
    if ((f.data_end() - f.data()) as u32) < want {
        // SAFETY: helper on the program's own context; the core reads the bounds afresh. On
        // failure the core sees what is linear and passes what it cannot parse.
        let _ = unsafe { bpf_skb_pull_data(skb, want) };
    }
    match lb::datapath(f) {
        Ok(xdp_action::XDP_DROP) => TC_ACT_SHOT,
        // SAFETY: helper without pointers; the ifindex the skb came in on.
        Ok(xdp_action::XDP_TX) => unsafe { bpf_redirect((*skb).ifindex, 0) as i32 },
        _ => TC_ACT_OK,
    }
}

/// The length of a TCP or UDP packet's headers (Ethernet, IPv4 with options or IPv6 without
/// extension headers, the fixed L4 header), which is all the core reads of it, when the linear
/// part holds the IP header's first 20 bytes; `None` for any other packet (IPv6 extension
/// headers, ICMP errors with their quoted headers...). A packet whose payload lies in pages (a
/// TCP write, a GRO packet) then keeps it there: pulling [`LINEAR`] bytes copied each such
/// packet's payload into a new head.
#[inline(always)]
fn headers_len(data: usize, end: usize) -> Option<u32> {
    if data + parse::ETH_HLEN + 20 > end {
        return None;
    }
    let l3 = data + parse::ETH_HLEN;
    // SAFETY: bounds-checked just above; every offset is within the IP header's first 20 bytes.
    let (ethertype, vihl, next6, proto4) = unsafe {
        (
            u16::from_be(parse::load16(data + 12)),
            parse::load16(l3).to_ne_bytes()[0],
            parse::load16(l3 + 6).to_ne_bytes()[0],
            parse::load16(l3 + 8).to_ne_bytes()[1],
        )
    };
    let (l3_len, proto) = match ethertype {
        parse::ETH_P_IP => (u32::from(vihl & 0x0f) * 4, proto4),
        parse::ETH_P_IPV6 => (40, next6),
        _ => return None,
    };
    if !parse::balanced(proto) {
        return None;
    }
    Some(parse::ETH_HLEN as u32 + l3_len + parse::l4_len(proto) as u32)
}

#[inline(always)]
pub fn egress(ctx: &TcContext) {
    let (data, end) = (ctx.data(), ctx.data_end());
    let pkt = match parse::parse(data, end) {
        Parsed::L4(pkt) => pkt,
        Parsed::Ipv6 => return crate::lb6::egress(ctx.skb.skb),
        Parsed::Fragment(f) => return later_fragment(ctx, &f, data),
        _ => return,
    };
    // Every entry below is of a packet that a backend sent (a SNAT reply, a reply to a node
    // address), or of a SNATed flow's packet to its backend from a SNAT port. Most packets are
    // neither, and are spared the conntrack's lookups (each a cache miss in a large table): a
    // flow's packets to its backend leave from the client's own port, and a reply translated at
    // ingress has the frontend as source.
    let to_backend = is_snat_port(u16::from_be(pkt.sport)) && filter::has(pkt.daddr, pkt.dport, pkt.proto);
    let from_backend = filter::has_backend(pkt.saddr, pkt.sport, pkt.proto);
    if !to_backend && !from_backend {
        return;
    }
    let Some((nat, stat)) = source_nat(|dir| ct::key_of(&pkt, dir), to_backend, from_backend) else { return };
    // A first fragment's later ones get the same source (see `later_fragment`).
    lb::remember_fragment(&pkt);
    let (l3, l4) = (pkt.l3 - data, pkt.l4 - data);
    let l4_check = pkt.l4_check() - data;
    let (old_addr, new_addr) = (pkt.saddr, u32::from_ne_bytes(nat.0));
    let (old_port, new_port) = (pkt.sport, nat.1.to_be());
    if pkt.proto == IPPROTO_SCTP {
        // No pseudo-header: the address changes the IPv4 header's checksum only, the port the
        // CRC32c, computed before the helpers (which invalidate packet pointers) and stored
        // through them, keeping a checksum of the whole frame right.
        // SAFETY: parse() bounds-checked SCTP's 12-byte common header.
        let new_crc = unsafe { nat::sctp_crc_with_sport(pkt.l4, new_port, pkt.sctp_len()) };
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        let ok = ctx
            .l3_csum_replace(l3 + 10, u64::from(old_addr), u64::from(new_addr), 4)
            .and_then(|()| ctx.store(l3 + 12, &new_addr, 0))
            .and_then(|()| ctx.store(l4, &new_port, flags))
            .and_then(|()| ctx.store(l4 + 8, &new_crc, flags));
        if ok.is_ok() {
            count(stat, u64::from(ctx.len()));
        }
        return;
    }
    // A UDP checksum of zero means "none" and stays so.
    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // The helpers keep the checksums right for every skb checksum state (partial included).
    // Written through the helper too, not in place as `nat::translate` does at ingress: a
    // program that writes packets directly gets an unclone check run on every packet, and
    // every TCP packet leaves as a clone; this program writes none directly.
    let ok = ctx
        .l4_csum_replace(
            l4_check,
            u64::from(old_addr),
            u64::from(new_addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .and_then(|()| ctx.l4_csum_replace(l4_check, u64::from(old_port), u64::from(new_port), mangled | 2))
        .and_then(|()| ctx.l3_csum_replace(l3 + 10, u64::from(old_addr), u64::from(new_addr), 4))
        .and_then(|()| ctx.store(l3 + 12, &new_addr, 0))
        .and_then(|()| ctx.store(l4, &new_port, 0));
    if ok.is_ok() {
        count(stat, u64::from(ctx.len()));
    }
}

/// The source a packet leaving gets (address and port), found by the conntrack key of each
/// direction (`key`); `None`: it leaves as it is. `to_backend`: it may be a SNATed flow's on its
/// way to its backend; `from_backend`: it may be a backend's reply.
#[inline(always)]
fn source_nat(
    key: impl Fn(u8) -> Ct4Key,
    to_backend: bool,
    from_backend: bool,
) -> Option<(([u8; 4], u16), Stat)> {
    if to_backend && let Some(e) = CT.get_ptr(key(CT_DIR_SNAT)) {
        // A SNATed flow leaving towards its backend: the node address and SNAT port as source.
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        return Some((unsafe { ((*e).nat_addr, (*e).nat_port) }, Stat::EgressSnat));
    }
    if !from_backend {
        return None;
    }
    if let Some(e) = CT.get_ptr(key(CT_DIR_SNAT_REPLY)) {
        // A SNATed flow's reply on its way to the client: the frontend as source.
        // SAFETY: as above.
        return Some((unsafe { ((*e).nat_addr, (*e).nat_port) }, Stat::EgressRevNat));
    }
    let e = CT.get_ptr(key(CT_DIR_REPLY))?;
    // SAFETY: as above.
    let (flags, addr, port) = unsafe { ((*e).flags, (*e).nat_addr, (*e).nat_port) };
    // Else translated at XDP already.
    (flags & CT_F_EGRESS_REVNAT != 0).then_some(((addr, port), Stat::EgressRevNat))
}

/// A later fragment (no ports in it) of a datagram whose first fragment got a source here: the
/// same source address, found by the ports that fragment left in `FRAG4`.
#[inline(always)]
fn later_fragment(ctx: &TcContext, f: &parse::Fragment, data: usize) {
    let Some(key) = lb::fragment_keys(f) else { return };
    // Its ports are those of its first fragment, which had a new source here.
    let Some(((addr, _), _)) = source_nat(key, true, true) else { return };
    let (old_addr, new_addr) = (f.saddr, u32::from_ne_bytes(addr));
    let l3 = f.l3 - data;
    let ok = ctx
        .l3_csum_replace(l3 + 10, u64::from(old_addr), u64::from(new_addr), 4)
        .and_then(|()| ctx.store(l3 + 12, &new_addr, 0));
    if ok.is_ok() {
        count(Stat::FragTranslated, u64::from(ctx.len()));
    }
}
