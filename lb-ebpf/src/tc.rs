//! TC egress: the reply half of flows whose frontend is one of this node's own addresses
//! (node ports, externalIPs the node carries). XDP left such replies untouched so that the
//! kernel could route them (a packet arriving with a local source address is a martian); here,
//! on the way out, the source becomes the node address and port the client used.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{CT_DIR_REPLY, CT_F_EGRESS_REVNAT, IPPROTO_UDP, Stat};

use crate::{
    ct,
    maps::CT,
    parse::{self, Parsed},
    stats::count,
};

#[inline(always)]
pub fn egress(ctx: &TcContext) {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Parsed::L4(pkt) = parse::parse(data, end) else { return };
    let Some(entry) = CT.get_ptr(ct::key_of(&pkt, CT_DIR_REPLY)) else { return };
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (flags, nat_addr, nat_port) = unsafe { ((*entry).flags, (*entry).nat_addr, (*entry).nat_port) };
    if flags & CT_F_EGRESS_REVNAT == 0 {
        return; // translated at XDP already
    }
    let (l3, l4) = (pkt.l3 - data, pkt.l4 - data);
    let l4_check = pkt.l4_check() - data;
    let (old_addr, new_addr) = (pkt.saddr, u32::from_ne_bytes(nat_addr));
    let (old_port, new_port) = (pkt.sport, nat_port.to_be());
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
        count(Stat::EgressRevNat, u64::from(ctx.len()));
    }
}
