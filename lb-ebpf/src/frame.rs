//! The frame the balancing core works on: an XDP buffer (`xlb_xdp`) or an skb at TC ingress
//! (`xlb_tc_ingress`). The core is one body for both, monomorphised per program; what differs is
//! here: how the frame's bounds are read, how it is resized for an answer, and how an L4
//! checksum is kept right after a rewrite.
//!
//! An XDP buffer holds a frame as it came off the wire: every checksum in it is complete, and
//! the core updates them in place (RFC 1624). An skb may carry a partial checksum (a packet
//! that a pod's or the node's stack sent through a veth with checksum offload: the L4 field
//! holds only the pseudo-header's sum, which the device completes), or a checksum of the whole
//! frame that the receiving stack checks (`CHECKSUM_COMPLETE`). Only the kernel knows which, so
//! on an skb the L4 checksum goes through `bpf_l4_csum_replace`, which handles every state.
//! The IPv4 header checksum is always complete: updated in place on both.
use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::generated::{
        bpf_csum_update, bpf_l4_csum_replace, bpf_skb_change_head, bpf_skb_change_tail, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
};

/// A program's frame: a raw context pointer, which (unlike a context struct) subprograms may be
/// given.
pub trait Frame: Copy {
    /// An skb: L4 checksums through the kernel's helper (see the module's text).
    const SKB: bool;
    /// Start of the frame's linear data.
    fn data(self) -> usize;
    /// End of the frame's linear data.
    fn data_end(self) -> usize;
    /// Puts `n` bytes in front of the frame; `false` if the kernel refused. Frame pointers must
    /// be read again after it.
    fn grow_head(self, n: u32) -> bool;
    /// Makes the frame `len` bytes long from its start; `false` if the kernel refused. Frame
    /// pointers must be read again after it.
    fn resize(self, len: usize) -> bool;
    /// On an skb: `bpf_l4_csum_replace` at `off` bytes from the frame's start (`from` and `to`
    /// in packet order, `flags` the helper's). Never called for an XDP buffer.
    fn l4_csum_replace(self, off: usize, from: u32, to: u32, flags: u64) -> bool;
    /// On an skb whose checksum covers the whole frame (`CHECKSUM_COMPLETE`): adds `diff` (a
    /// one's complement sum of the changes, as `csum::replace4` makes them) to it, for bytes
    /// rewritten in place that no Internet checksum compensates (SCTP's). Nothing otherwise.
    fn csum_update(self, diff: u32);
}

/// An XDP buffer.
#[derive(Clone, Copy)]
pub struct Xdp(pub *mut xdp_md);

/// An skb, at TC.
#[derive(Clone, Copy)]
pub struct Skb(pub *mut __sk_buff);

impl Frame for Xdp {
    const SKB: bool = false;

    #[inline(always)]
    fn data(self) -> usize {
        // SAFETY: the program's own context.
        unsafe { (*self.0).data as usize }
    }

    #[inline(always)]
    fn data_end(self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.0).data_end as usize }
    }

    #[inline(always)]
    fn grow_head(self, n: u32) -> bool {
        // SAFETY: helper on the program's own context.
        unsafe { bpf_xdp_adjust_head(self.0, -(n as i32)) == 0 }
    }

    #[inline(always)]
    fn resize(self, len: usize) -> bool {
        let cur = self.data_end() - self.data();
        if cur == len {
            return true;
        }
        // SAFETY: helper on the program's own context.
        unsafe { bpf_xdp_adjust_tail(self.0, len as i32 - cur as i32) == 0 }
    }

    #[inline(always)]
    fn l4_csum_replace(self, _off: usize, _from: u32, _to: u32, _flags: u64) -> bool {
        false
    }

    #[inline(always)]
    fn csum_update(self, _diff: u32) {}
}

impl Frame for Skb {
    const SKB: bool = true;

    #[inline(always)]
    fn data(self) -> usize {
        // SAFETY: the program's own context.
        unsafe { (*self.0).data as usize }
    }

    #[inline(always)]
    fn data_end(self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.0).data_end as usize }
    }

    #[inline(always)]
    fn grow_head(self, n: u32) -> bool {
        // SAFETY: helper on the program's own context.
        unsafe { bpf_skb_change_head(self.0, n, 0) == 0 }
    }

    #[inline(always)]
    fn resize(self, len: usize) -> bool {
        // SAFETY: as above; the skb's length counts its paged part too.
        unsafe {
            if (*self.0).len as usize == len {
                return true;
            }
            bpf_skb_change_tail(self.0, len as u32, 0) == 0
        }
    }

    #[inline(always)]
    fn l4_csum_replace(self, off: usize, from: u32, to: u32, flags: u64) -> bool {
        // SAFETY: helper on the program's own context; it checks `off` against the skb.
        unsafe { bpf_l4_csum_replace(self.0, off as u32, u64::from(from), u64::from(to), flags) == 0 }
    }

    #[inline(always)]
    fn csum_update(self, diff: u32) {
        // SAFETY: helper on the program's own context; it refuses (harmlessly) an skb of any
        // other checksum state.
        unsafe {
            bpf_csum_update(self.0, diff);
        }
    }
}
