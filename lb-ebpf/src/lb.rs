//! The per-packet decision: tracked flow, new flow to a service frontend, or pass.
use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_get_prandom_u32, programs::XdpContext};
use lb_common::{BACKEND_STATE_FREE, CT_DIR_FORWARD, CT_DIR_REPLY, SCOPE_EXTERNAL, Stat, Svc4Key};

use crate::{
    ct,
    maps::{BACKENDS, CT, SERVICES},
    nat::{self, Side},
    parse::{self, Packet, Parsed},
    stats::count,
};

#[inline(always)]
pub fn process(ctx: &XdpContext) -> Result<u32, ()> {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(Stat::Rx, bytes);
    let pkt = match parse::parse(ctx) {
        Parsed::L4(pkt) => pkt,
        Parsed::NotIpv4 => return pass(Stat::PassNotIpv4, bytes),
        Parsed::Malformed => return pass(Stat::PassMalformed, bytes),
        Parsed::OtherProto => return pass(Stat::PassOtherProto, bytes),
        Parsed::Fragment => return pass(Stat::PassFragment, bytes),
    };

    // A tracked flow: one lookup covers both directions, since the key holds the tuple as it
    // stands in the packet and the direction.
    let fwd_key = ct::key_of(&pkt, CT_DIR_FORWARD);
    if let Some(entry) = CT.get_ptr_mut(fwd_key) {
        // SAFETY: pointer from a lookup in this run; plain integer reads.
        let (backend_id, nat_addr, nat_port) =
            unsafe { ((*entry).backend_id, (*entry).nat_addr, (*entry).nat_port) };
        match BACKENDS.get(backend_id) {
            Some(be) if be.state != BACKEND_STATE_FREE && be.addr == nat_addr && be.port == nat_port => {
                ct::touch(entry, &pkt);
                nat::rewrite(&pkt, Side::Destination, nat_addr, nat_port);
                count(Stat::DnatEstablished, bytes);
                return Ok(xdp_action::XDP_PASS);
            }
            _ => {
                // The backend is gone: forget the flow and balance it again below. A TCP peer
                // then gets a reset from the new backend instead of hanging; UDP moves on.
                let _ = CT.remove(fwd_key);
                count(Stat::CtStaleBackend, 0);
            }
        }
    } else {
        let reply_key = ct::key_of(&pkt, CT_DIR_REPLY);
        if let Some(entry) = CT.get_ptr_mut(reply_key) {
            // SAFETY: as above.
            let (nat_addr, nat_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
            ct::touch(entry, &pkt);
            nat::rewrite(&pkt, Side::Source, nat_addr, nat_port);
            return pass(Stat::RevNat, bytes);
        }
    }

    new_flow(&pkt, bytes)
}

#[inline(always)]
fn new_flow(pkt: &Packet, bytes: u64) -> Result<u32, ()> {
    let mut key = Svc4Key {
        addr: pkt.daddr.to_ne_bytes(),
        port: u16::from_be(pkt.dport),
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return pass(Stat::PassNoService, bytes);
    };
    // SAFETY: pointer from a lookup in this run.
    let (count_, svc_id) = unsafe { ((*svc).count, (*svc).svc_id) };
    if count_ == 0 {
        count(Stat::DropNoBackend, bytes);
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: helper with no arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    key.slot = (rnd % u32::from(count_)) as u16 + 1;
    let Some(slot) = SERVICES.get_ptr(key) else {
        count(Stat::DropStaleSlot, bytes);
        return Ok(xdp_action::XDP_DROP);
    };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS.get(backend_id) else {
        count(Stat::DropStaleSlot, bytes);
        return Ok(xdp_action::XDP_DROP);
    };
    if be.state == BACKEND_STATE_FREE {
        count(Stat::DropStaleSlot, bytes);
        return Ok(xdp_action::XDP_DROP);
    }
    let (addr, port) = (be.addr, be.port);
    if ct::create(pkt, addr, port, backend_id, svc_id).is_err() {
        count(Stat::DropCtFull, bytes);
        return Ok(xdp_action::XDP_DROP);
    }
    nat::rewrite(pkt, Side::Destination, addr, port);
    pass(Stat::DnatNew, bytes)
}

#[inline(always)]
fn pass(stat: Stat, bytes: u64) -> Result<u32, ()> {
    count(stat, bytes);
    Ok(xdp_action::XDP_PASS)
}
