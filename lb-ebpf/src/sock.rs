//! Socket-level load balancing (cgroup sock_addr programs), for the node's own processes and
//! its pods: their packets to a frontend never cross an interface that XDP sees, or cross it
//! from inside the node. The backend is chosen when the socket connects (TCP, connected UDP) or
//! sends a datagram (unconnected UDP), so the packets carry the backend's address from the
//! start: no per-packet translation, no conntrack entry, and a pod reaching its own Service
//! simply talks to itself.
//!
//! What the application sees stays the frontend: `recvmsg` and `getpeername` report the
//! frontend in place of the backend, through the socket's entry in [`SOCK_NAT`].
use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{
    BACKEND_STATE_FREE, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SOCK_NAT_FWD, SOCK_NAT_REV,
    SVC_F_SOURCE_RANGES, SockNat4Key, SockNat4Value, SockNat6Key, SockNat6Value, Stat, Svc4Key, Svc6Key,
};

use crate::{
    maps::{BACKEND_FLOWS, BACKENDS, BACKENDS6, SERVICES, SERVICES6, SOCK_NAT, SOCK_NAT6},
    stats::{atomic_add, count_atomic},
};

/// Let the call go on (a sock_addr program's "allow").
pub const ALLOW: i32 = 1;
/// Fail the call with the error set by [`set_retval`].
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// bpf_set_retval (helper 187, kernel 5.18): the error a rejected connect or sendmsg returns
/// (ECONNREFUSED, as a TCP reset or an ICMP port unreachable would give, instead of EPERM).
#[inline(always)]
fn set_retval(err: i32) {
    // SAFETY: the helper's id and signature from the kernel's uapi (long bpf_set_retval(int)).
    let f: unsafe extern "C" fn(i32) -> i64 = unsafe { core::mem::transmute(187usize) };
    // SAFETY: a helper call with a plain integer.
    unsafe { f(err) };
}

/// connect4 (`sendmsg = false`) and sendmsg4 (`true`): a destination that is a frontend becomes
/// one of its backends.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; plain field reads that the verifier checks.
    let (proto, ip, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let addr = ip.to_ne_bytes();
    let port = u16::from_be(port_be as u16);
    let mut key = Svc4Key { addr, port, proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    let Some(svc) = SERVICES.get_ptr(key) else { return ALLOW };
    // SAFETY: pointer from a lookup in this run.
    let (n, svc_id, flags) = unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags) };
    if flags & SVC_F_SOURCE_RANGES != 0 {
        // The source address is not known yet; the packet path applies the ranges.
        return ALLOW;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if sendmsg {
        // Unconnected UDP: the socket's datagrams to this frontend keep their backend while it
        // lives, as a flow would.
        let fwd = SockNat4Key { cookie, addr, port, proto, kind: SOCK_NAT_FWD };
        if let Some(v) = SOCK_NAT.get_ptr(fwd) {
            // SAFETY: as above.
            let (id, baddr, bport) = unsafe { ((*v).backend_id, (*v).addr, (*v).port) };
            if let Some(be) = BACKENDS.get(id)
                && be.state != BACKEND_STATE_FREE
                && be.addr == baddr
                && be.port == bport
            {
                rewrite(ctx, baddr, bport);
                return ALLOW;
            }
        }
    }
    if n == 0 {
        count_atomic(Stat::SockRefused);
        set_retval(-ECONNREFUSED);
        return REJECT;
    }
    // SAFETY: helper with no arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    key.slot = (rnd % u32::from(n)) as u16 + 1;
    let Some(slot) = SERVICES.get_ptr(key) else { return ALLOW };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS.get(backend_id) else { return ALLOW };
    if be.state == BACKEND_STATE_FREE {
        // A slot caught in an update: leave the call alone rather than guess.
        return ALLOW;
    }
    let (baddr, bport) = (be.addr, be.port);
    let rev = SockNat4Key { cookie, addr: baddr, port: bport, proto, kind: SOCK_NAT_REV };
    let shown = SockNat4Value { addr, port, _pad: 0, backend_id, svc_id };
    if SOCK_NAT.insert(rev, shown, 0).is_err() {
        return ALLOW;
    }
    if sendmsg {
        let fwd = SockNat4Key { cookie, addr, port, proto, kind: SOCK_NAT_FWD };
        let chosen = SockNat4Value { addr: baddr, port: bport, _pad: 0, backend_id, svc_id };
        let _ = SOCK_NAT.insert(fwd, chosen, 0);
    }
    if let Some(flows) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: a u64 inside the array's value area, shared between CPUs.
        unsafe { atomic_add(flows, 1) };
    }
    rewrite(ctx, baddr, bport);
    count_atomic(Stat::SockTranslated);
    ALLOW
}

/// recvmsg4 and getpeername4: a backend this socket was given is shown as the frontend it
/// called.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `forward`.
    let (proto, ip, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockNat4Key {
        cookie,
        addr: ip.to_ne_bytes(),
        port: u16::from_be(port_be as u16),
        proto,
        kind: SOCK_NAT_REV,
    };
    if let Some(v) = SOCK_NAT.get_ptr(key) {
        // SAFETY: as above.
        let (addr, port) = unsafe { ((*v).addr, (*v).port) };
        rewrite(ctx, addr, port);
    }
    ALLOW
}

#[inline(always)]
fn rewrite(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
    // SAFETY: user_ip4 and user_port are writable in these hooks (the verifier checks it);
    // user_port holds the port in network order in its low 16 bits.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
}

/// The IPv6 destination of a sock_addr call, bytes as in the packet.
#[inline(always)]
fn ip6_of(ctx: &SockAddrContext) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: user_ip6 is readable in these hooks, one u32 at a time.
        let w = unsafe { (*ctx.sock_addr).user_ip6[i] }.to_ne_bytes();
        out[4 * i..4 * i + 4].copy_from_slice(&w);
        i += 1;
    }
    out
}

#[inline(always)]
fn rewrite6(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) {
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([addr[4 * i], addr[4 * i + 1], addr[4 * i + 2], addr[4 * i + 3]]);
        // SAFETY: user_ip6 and user_port are writable in these hooks, one u32 at a time.
        unsafe { (*ctx.sock_addr).user_ip6[i] = w };
        i += 1;
    }
    // SAFETY: as above.
    unsafe { (*ctx.sock_addr).user_port = u32::from(port.to_be()) };
}

/// connect6 and sendmsg6: as [`forward`], for IPv6 frontends. (An IPv4-mapped address, an IPv6
/// socket calling an IPv4 frontend, is left alone: no IPv6 frontend has one.)
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; plain field reads that the verifier checks.
    let (proto, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_port) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let addr = ip6_of(ctx);
    let port = u16::from_be(port_be as u16);
    let mut key = Svc6Key { addr, port, proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    let Some(svc) = SERVICES6.get_ptr(&key) else { return ALLOW };
    // SAFETY: pointer from a lookup in this run.
    let (n, svc_id, flags) = unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags) };
    if flags & SVC_F_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if sendmsg {
        let fwd = SockNat6Key { cookie, addr, port, proto, kind: SOCK_NAT_FWD, _pad: 0 };
        if let Some(v) = SOCK_NAT6.get_ptr(&fwd) {
            // SAFETY: as above.
            let v = unsafe { &*v };
            if let Some(be) = BACKENDS6.get(v.backend_id)
                && be.state != BACKEND_STATE_FREE
                && be.addr == v.addr
                && be.port == v.port
            {
                rewrite6(ctx, &be.addr, be.port);
                return ALLOW;
            }
        }
    }
    if n == 0 {
        count_atomic(Stat::SockRefused);
        set_retval(-ECONNREFUSED);
        return REJECT;
    }
    // SAFETY: helper with no arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    key.slot = (rnd % u32::from(n)) as u16 + 1;
    let Some(slot) = SERVICES6.get_ptr(&key) else { return ALLOW };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS6.get(backend_id) else { return ALLOW };
    if be.state == BACKEND_STATE_FREE {
        return ALLOW;
    }
    let rev = SockNat6Key { cookie, addr: be.addr, port: be.port, proto, kind: SOCK_NAT_REV, _pad: 0 };
    let shown = SockNat6Value { addr, port, _pad: 0, backend_id, svc_id, _pad2: 0 };
    if SOCK_NAT6.insert(&rev, &shown, 0).is_err() {
        return ALLOW;
    }
    if sendmsg {
        let fwd = SockNat6Key { cookie, addr, port, proto, kind: SOCK_NAT_FWD, _pad: 0 };
        let chosen = SockNat6Value { addr: be.addr, port: be.port, _pad: 0, backend_id, svc_id, _pad2: 0 };
        let _ = SOCK_NAT6.insert(&fwd, &chosen, 0);
    }
    rewrite6(ctx, &be.addr, be.port);
    count_atomic(Stat::SockTranslated);
    ALLOW
}

/// recvmsg6 and getpeername6: as [`reverse`], for IPv6 sockets.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `forward6`.
    let (proto, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_port) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockNat6Key {
        cookie,
        addr: ip6_of(ctx),
        port: u16::from_be(port_be as u16),
        proto,
        kind: SOCK_NAT_REV,
        _pad: 0,
    };
    if let Some(v) = SOCK_NAT6.get_ptr(&key) {
        // SAFETY: as above.
        let v = unsafe { &*v };
        rewrite6(ctx, &v.addr, v.port);
    }
    ALLOW
}
