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
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{
    Affinity4Value, BACKEND_STATE_FREE, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SOCK_NAT_FWD, SOCK_NAT_REV,
    SVC_F_SOURCE_RANGES, SockAffinityKey, SockNat4Key, SockNat4Value, SockNat6Key, SockNat6Value, Stat,
    Svc4Key, Svc6Key,
};

use crate::{
    ct,
    maps::{
        BACKEND_FLOWS, BACKEND_FLOWS6, BACKENDS, BACKENDS6, SERVICES, SERVICES6, SOCK_AFFINITY, SOCK_NAT,
        SOCK_NAT6,
    },
    stats::{atomic_add, count_atomic},
};

/// sessionAffinity ClientIP at the socket: the slot of this network namespace's last backend
/// for the service port, if it came within `timeout` seconds and `holds(slot)` says the slot
/// (among the `count` selectable ones) still holds that backend; its time is refreshed. `None`:
/// a backend is chosen anew (and remembered by [`remember_affinity`]).
#[inline(always)]
fn kept_affinity(
    key: &SockAffinityKey,
    count: u16,
    timeout: u32,
    now: u32,
    holds: impl Fn(u16, u32) -> bool,
) -> Option<u16> {
    let a = SOCK_AFFINITY.get_ptr_mut(*key)?;
    // SAFETY: pointer from a lookup in this run; plain integer reads.
    let (backend_id, slot, used) = unsafe { ((*a).backend_id, (*a).slot, (*a).last_used) };
    if now.wrapping_sub(used) > timeout || slot == 0 || slot > count || !holds(slot, backend_id) {
        return None;
    }
    if used != now {
        // SAFETY: as above; a racing writer can only make the time one of two recent values.
        unsafe { (*a).last_used = now };
    }
    Some(slot)
}

#[inline(always)]
fn remember_affinity(key: &SockAffinityKey, backend_id: u32, slot: u16, now: u32) {
    let v = Affinity4Value { backend_id, slot, _pad: 0, last_used: now, _pad2: 0 };
    let _ = SOCK_AFFINITY.insert(*key, v, 0);
}

/// The slot of a new connection: the one affinity keeps, else one of the `count` at random.
#[inline(always)]
fn slot_for(kept: Option<u16>, count: u16) -> u16 {
    kept.unwrap_or_else(|| {
        // SAFETY: helper with no arguments.
        let rnd = unsafe { bpf_get_prandom_u32() };
        (rnd % u32::from(count)) as u16 + 1
    })
}

/// The affinity key of this socket's namespace for a service port whose sessionAffinity
/// timeout is `timeout` (`None`: no affinity).
#[inline(always)]
fn affinity_key(ctx: &SockAddrContext, svc_id: u32, family: u8, timeout: u32) -> Option<SockAffinityKey> {
    if timeout == 0 {
        return None;
    }
    // SAFETY: the helper takes the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    Some(SockAffinityKey { netns, svc_id, family, _pad: [0; 3] })
}

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

/// What socket-level balancing does with a call to an IPv4 destination.
enum To4 {
    /// Not a frontend (or a case left to the packet path): the call goes on untouched.
    Leave,
    /// A frontend without endpoints: the call fails with ECONNREFUSED.
    Refuse,
    /// The backend the call goes to instead.
    Backend([u8; 4], u16),
}

/// connect4 (`sendmsg = false`) and sendmsg4 (`true`): a destination that is a frontend becomes
/// one of its backends.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; plain field reads that the verifier checks.
    let (proto, ip, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port) };
    match balance4(ctx, ip.to_ne_bytes(), u16::from_be(port_be as u16), proto, sendmsg) {
        To4::Leave => ALLOW,
        To4::Refuse => refuse(),
        To4::Backend(addr, port) => {
            rewrite(ctx, addr, port);
            ALLOW
        }
    }
}

/// A frontend without endpoints: counted, and the call fails with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    count_atomic(Stat::SockRefused);
    set_retval(-ECONNREFUSED);
    REJECT
}

/// The choice of [`forward`] for a call to `addr`:`port` (host order), shared with IPv6 sockets
/// calling an IPv4 frontend by its IPv4-mapped address. Records the socket's translation.
#[inline(always)]
fn balance4(ctx: &SockAddrContext, addr: [u8; 4], port: u16, proto: u8, sendmsg: bool) -> To4 {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return To4::Leave;
    }
    let mut key = Svc4Key { addr, port, proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    let Some(svc) = SERVICES.get_ptr(key) else {
        // An address of the Service ranges that no frontend holds: refused at once, as the
        // packet path answers it.
        if crate::filter::in_service_range(u32::from_ne_bytes(addr)) {
            return To4::Refuse;
        }
        return To4::Leave;
    };
    // SAFETY: pointer from a lookup in this run.
    let (n, svc_id, flags, timeout) =
        unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags, (*svc).affinity_timeout) };
    if flags & SVC_F_SOURCE_RANGES != 0 {
        // The source address is not known yet; the packet path applies the ranges.
        return To4::Leave;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
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
                return To4::Backend(baddr, bport);
            }
        }
    }
    if n == 0 {
        return To4::Refuse;
    }
    let aff = affinity_key(ctx, svc_id, 4, timeout);
    let now = if aff.is_some() { ct::now_secs() } else { 0 };
    let holds = |slot: u16, id: u32| {
        let k = Svc4Key { slot, ..key };
        // SAFETY: pointer from a lookup in this run.
        SERVICES.get_ptr(k).is_some_and(|v| unsafe { (*v).backend_id } == id)
    };
    let kept = aff.as_ref().and_then(|a| kept_affinity(a, n, timeout, now, holds));
    key.slot = slot_for(kept, n);
    let Some(slot) = SERVICES.get_ptr(key) else { return To4::Leave };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS.get(backend_id) else { return To4::Leave };
    if be.state == BACKEND_STATE_FREE {
        // A slot caught in an update: leave the call alone rather than guess.
        return To4::Leave;
    }
    let (baddr, bport) = (be.addr, be.port);
    if let Some(a) = &aff
        && kept.is_none()
    {
        remember_affinity(a, backend_id, key.slot, now);
    }
    let rev = SockNat4Key { cookie, addr: baddr, port: bport, proto, kind: SOCK_NAT_REV };
    let shown = SockNat4Value { addr, port, _pad: 0, backend_id, svc_id };
    if SOCK_NAT.insert(rev, shown, 0).is_err() {
        return To4::Leave;
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
    count_atomic(Stat::SockTranslated);
    To4::Backend(baddr, bport)
}

/// recvmsg4 and getpeername4: a backend this socket was given is shown as the frontend it
/// called.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `forward`.
    let (proto, ip, port_be) = unsafe { ((*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port) };
    if let Some((addr, port)) = shown4(ctx, ip.to_ne_bytes(), u16::from_be(port_be as u16), proto) {
        rewrite(ctx, addr, port);
    }
    ALLOW
}

/// The frontend to show in place of backend `addr`:`port`, if this socket was given it.
#[inline(always)]
fn shown4(ctx: &SockAddrContext, addr: [u8; 4], port: u16, proto: u8) -> Option<([u8; 4], u16)> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockNat4Key { cookie, addr, port, proto, kind: SOCK_NAT_REV };
    // SAFETY: pointer from a lookup in this run; plain reads.
    SOCK_NAT.get_ptr(key).map(|v| unsafe { ((*v).addr, (*v).port) })
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    let mapped = a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff;
    mapped.then(|| [a[12], a[13], a[14], a[15]])
}

/// `addr` as an IPv4-mapped IPv6 address.
#[inline(always)]
fn mapped(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&addr);
    out
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

/// connect6 and sendmsg6: as [`forward`], for IPv6 frontends. An IPv6 socket calling an IPv4
/// frontend by its IPv4-mapped address (`::ffff:a.b.c.d`, as dual-stack runtimes do) is balanced
/// over the IPv4 maps, and given the backend's IPv4-mapped address.
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
    if let Some(v4) = v4_mapped(&addr) {
        return match balance4(ctx, v4, port, proto, sendmsg) {
            To4::Leave => ALLOW,
            To4::Refuse => refuse(),
            To4::Backend(baddr, bport) => {
                rewrite6(ctx, &mapped(baddr), bport);
                ALLOW
            }
        };
    }
    let mut key = Svc6Key { addr, port, proto, scope: SCOPE_EXTERNAL, slot: 0, _pad: 0 };
    let Some(svc) = SERVICES6.get_ptr(&key) else {
        return if crate::filter::in_service_range6(&addr) { refuse() } else { ALLOW };
    };
    // SAFETY: pointer from a lookup in this run.
    let (n, svc_id, flags, timeout) =
        unsafe { ((*svc).count, (*svc).svc_id, (*svc).flags, (*svc).affinity_timeout) };
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
        return refuse();
    }
    let aff = affinity_key(ctx, svc_id, 6, timeout);
    let now = if aff.is_some() { ct::now_secs() } else { 0 };
    let holds = |slot: u16, id: u32| {
        let k = Svc6Key { slot, ..key };
        // SAFETY: pointer from a lookup in this run.
        SERVICES6.get_ptr(&k).is_some_and(|v| unsafe { (*v).backend_id } == id)
    };
    let kept = aff.as_ref().and_then(|a| kept_affinity(a, n, timeout, now, holds));
    key.slot = slot_for(kept, n);
    let Some(slot) = SERVICES6.get_ptr(&key) else { return ALLOW };
    // SAFETY: as above.
    let backend_id = unsafe { (*slot).backend_id };
    let Some(be) = BACKENDS6.get(backend_id) else { return ALLOW };
    if be.state == BACKEND_STATE_FREE {
        return ALLOW;
    }
    if let Some(a) = &aff
        && kept.is_none()
    {
        remember_affinity(a, backend_id, key.slot, now);
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
    if let Some(flows) = BACKEND_FLOWS6.get_ptr_mut(backend_id) {
        // SAFETY: a u64 inside the array's value area, shared between CPUs.
        unsafe { atomic_add(flows, 1) };
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
    let addr = ip6_of(ctx);
    let port = u16::from_be(port_be as u16);
    if let Some(v4) = v4_mapped(&addr) {
        // An IPv4 backend given to an IPv6 socket by its IPv4-mapped address.
        if let Some((faddr, fport)) = shown4(ctx, v4, port, proto) {
            rewrite6(ctx, &mapped(faddr), fport);
        }
        return ALLOW;
    }
    // SAFETY: the helper takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockNat6Key { cookie, addr, port, proto, kind: SOCK_NAT_REV, _pad: 0 };
    if let Some(v) = SOCK_NAT6.get_ptr(&key) {
        // SAFETY: as above.
        let v = unsafe { &*v };
        rewrite6(ctx, &v.addr, v.port);
    }
    ALLOW
}
