//! TC egress: source rewrites that must wait until the kernel has routed the packet, because the
//! new source is one of this node's own addresses (a packet arriving with a local source
//! address is a martian):
//! - replies of flows to a node address (node ports, externalIPs the node carries) get the node
//!   address and port the client used;
//! - packets of flows SNATed towards an endpoint on another node get the node address and the
//!   flow's SNAT port.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_F_EGRESS_REVNAT, IPPROTO_UDP, Stat};

use crate::{
    ct, filter,
    maps::CT,
    parse::{self, Parsed},
    stats::count,
};

#[inline(always)]
pub fn egress(ctx: &TcContext) {
    let (data, end) = (ctx.data(), ctx.data_end());
    let pkt = match parse::parse(data, end) {
        Parsed::L4(pkt) => pkt,
        Parsed::Ipv6 => return crate::lb6::egress(ctx.skb.skb),
        _ => return,
    };
    // Every entry below has a backend at one end (source or destination).
    if !filter::has(pkt.daddr, pkt.dport, pkt.proto) && !filter::has(pkt.saddr, pkt.sport, pkt.proto) {
        return;
    }
    // A SNATed flow leaving towards its backend: the node address and SNAT port as source.
    let (nat, stat) = if let Some(e) = CT.get_ptr(ct::key_of(&pkt, CT_DIR_SNAT)) {
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        (unsafe { ((*e).nat_addr, (*e).nat_port) }, Stat::EgressSnat)
    } else if let Some(e) = CT.get_ptr(ct::key_of(&pkt, CT_DIR_SNAT_REPLY)) {
        // A SNATed flow's reply on its way to the client: the frontend as source.
        // SAFETY: as above.
        (unsafe { ((*e).nat_addr, (*e).nat_port) }, Stat::EgressRevNat)
    } else if let Some(e) = CT.get_ptr(ct::key_of(&pkt, CT_DIR_REPLY)) {
        // SAFETY: as above.
        let (flags, addr, port) = unsafe { ((*e).flags, (*e).nat_addr, (*e).nat_port) };
        if flags & CT_F_EGRESS_REVNAT == 0 {
            return; // translated at XDP already
        }
        ((addr, port), Stat::EgressRevNat)
    } else {
        return;
    };
    let (l3, l4) = (pkt.l3 - data, pkt.l4 - data);
    let l4_check = pkt.l4_check() - data;
    let (old_addr, new_addr) = (pkt.saddr, u32::from_ne_bytes(nat.0));
    let (old_port, new_port) = (pkt.sport, nat.1.to_be());
    // A UDP checksum of zero means "none" and stays so.
    let mangled = if pkt.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // The helpers keep the checksums right for every skb checksum state (partial included).
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
