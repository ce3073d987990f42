//! xlb's kernel program: Kubernetes Service load balancing at XDP, or at TC ingress.
//!
//! One module per concern: `parse` (bounds-checked header access), `maps`, `stats`, `nat`
//! (address/port rewrite with incremental checksums), `ct` (connection tracking), `lb` (service
//! lookup and backend selection, and the per-packet decision, for either program's frame:
//! `frame`), `reject` (the answer for a
//! Service without endpoints), `icmp` (ICMP errors about translated flows), `tc` (TC egress: replies of flows to the node's own
//! addresses, SNAT), `sock` (cgroup programs: socket-level balancing for the node's processes
//! and pods).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The bpf target has no atomic read-modify-write in core::sync::atomic; the intrinsic compiles
// to the BPF atomic add (without fetch when the result is unused, so any kernel takes it).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod filter;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod lb6;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, xdp_action},
        macros::{cgroup_sock_addr, classifier, xdp},
        programs::{SockAddrContext, TcContext, XdpContext},
    };

    /// Attached at XDP on every interface of the node that carries Service traffic: translates
    /// packets to a frontend towards a backend, and replies from a backend back to the frontend.
    #[xdp]
    pub fn xlb_xdp(ctx: XdpContext) -> u32 {
        match crate::lb::datapath(crate::frame::Xdp(ctx.ctx)) {
            Ok(verdict) => verdict,
            // Only reachable if the packet changed under us; never lose it silently.
            Err(()) => xdp_action::XDP_PASS,
        }
    }

    /// Never attached: `xlb trace` runs it with BPF_PROG_TEST_RUN on a crafted packet. The same
    /// decision as `xlb_xdp` against the same (live, pinned) maps, recorded in the trace map
    /// instead of changing conntrack or counters.
    #[xdp]
    pub fn xlb_xdp_trace(ctx: XdpContext) -> u32 {
        let verdict = crate::lb::process::<true, _>(crate::frame::Xdp(ctx.ctx));
        crate::nat::finish_sctp(crate::frame::Xdp(ctx.ctx));
        match verdict {
            Ok(verdict) => verdict,
            Err(()) => xdp_action::XDP_PASS,
        }
    }

    /// Passes every packet. `xlb xdp-pass` attaches it to the far end of a veth whose near end
    /// runs `xlb_xdp` in native mode: the kernel schedules a veth's receive for the frames its
    /// peer sends back (XDP_TX) only when it has an XDP program. Also the benchmarks' floor.
    #[xdp]
    pub fn xlb_xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// The tc datapath (`xlb agent --datapath tc`): attached at TC ingress (tcx) instead of
    /// `xlb_xdp`, it makes the same decision on the skb, after GRO (one translation per GRO
    /// packet), with the same maps and counters. A refusal goes back out of the interface it
    /// came in on by redirect.
    #[classifier]
    pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
        crate::tc::ingress(ctx.skb.skb)
    }

    /// Passes every packet; never attached: the floor of the tc datapath's benchmark.
    #[classifier]
    pub fn xlb_tc_pass(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    /// Attached at TC egress on the same interfaces: translates the replies of flows to the
    /// node's own addresses once the kernel has routed them. Never drops anything.
    #[classifier]
    pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
        crate::tc::egress(&ctx);
        TC_ACT_OK as i32
    }

    /// Attached to the node's cgroup (the root of the cgroup v2 hierarchy, so every process of
    /// the node and of its pods): a TCP or UDP connect to a frontend is given a backend.
    #[cgroup_sock_addr(connect4)]
    pub fn xlb_sock_connect4(ctx: SockAddrContext) -> i32 {
        crate::sock::forward(&ctx, false)
    }

    /// As `xlb_sock_connect4`, for each datagram of an unconnected UDP socket.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn xlb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
        crate::sock::forward(&ctx, true)
    }

    /// A datagram received from a backend that the socket was given shows the frontend as its
    /// source.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn xlb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
        crate::sock::reverse(&ctx)
    }

    /// getpeername on a socket connected through a frontend reports the frontend.
    #[cgroup_sock_addr(getpeername4)]
    pub fn xlb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
        crate::sock::reverse(&ctx)
    }

    /// The IPv6 counterparts: sockets of family AF_INET6 calling IPv6 frontends.
    #[cgroup_sock_addr(connect6)]
    pub fn xlb_sock_connect6(ctx: SockAddrContext) -> i32 {
        crate::sock::forward6(&ctx, false)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn xlb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
        crate::sock::forward6(&ctx, true)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn xlb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
        crate::sock::reverse6(&ctx)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn xlb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
        crate::sock::reverse6(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

/// On the host this crate is an empty binary; the real object is built for the bpf target by
/// lb-userspace's build script.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
