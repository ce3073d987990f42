//! Connection tracking: one LRU entry per direction of each translated flow.
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, Ct4Key, Ct4Value};

use crate::{maps::CT, parse::Packet};

/// Seconds of CLOCK_MONOTONIC, coarse (a jiffy's precision is plenty for lifetimes).
#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: helper with no arguments, allowed for XDP programs.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn key_of(pkt: &Packet, dir: u8) -> Ct4Key {
    Ct4Key {
        saddr: pkt.saddr.to_ne_bytes(),
        daddr: pkt.daddr.to_ne_bytes(),
        sport: u16::from_be(pkt.sport),
        dport: u16::from_be(pkt.dport),
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// Marks a tracked entry as used by `pkt` now; writes only what changed, to keep the cache line
/// clean on the hot path. The clock is read here, so packets that match no flow never pay for it.
#[inline(always)]
pub fn touch(entry: *mut Ct4Value, pkt: &Packet) {
    let now = now_secs();
    // SAFETY: `entry` came from a lookup in this program run; a concurrent eviction can at worst
    // make us write into a recycled slot, which only affects timestamps and flags.
    unsafe {
        if (*entry).last_seen != now {
            (*entry).last_seen = now;
        }
        if (*entry).tcp_flags | pkt.tcp_flags != (*entry).tcp_flags {
            (*entry).tcp_flags |= pkt.tcp_flags;
        }
    }
}

/// Tracks a new flow: the forward entry (client -> frontend, to be sent to the backend) and the
/// reply entry (backend -> client, to be sent back from the frontend).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    backend_addr: [u8; 4],
    backend_port: u16,
    backend_id: u32,
    svc_id: u32,
    reply_flags: u8,
) -> Result<(), i32> {
    let now = now_secs();
    let fwd = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        tcp_flags: pkt.tcp_flags,
        flags: 0,
        backend_id,
        svc_id,
        created: now,
        last_seen: now,
    };
    let reply_key = Ct4Key {
        saddr: backend_addr,
        daddr: pkt.saddr.to_ne_bytes(),
        sport: backend_port,
        dport: u16::from_be(pkt.sport),
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let reply = Ct4Value {
        nat_addr: pkt.daddr.to_ne_bytes(),
        nat_port: u16::from_be(pkt.dport),
        tcp_flags: 0,
        flags: reply_flags,
        ..fwd
    };
    // Reply first: once the forward entry exists, packets are translated and their replies
    // must already be recognised.
    CT.insert(reply_key, reply, 0)?;
    CT.insert(key_of(pkt, CT_DIR_FORWARD), fwd, 0)
}
