//! Per-CPU counters.
use lb_common::Stat;

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
    }
}

/// `*p += v` as one BPF atomic add (without fetch when the result is unused, so any kernel takes
/// it): for counters that other CPUs, or an interrupting program on this one, also update.
///
/// # Safety
/// `p` points at a live, 8-aligned u64 in a map value.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v) };
}

/// Counts one event of `stat` (bytes untouched) from process context, where an XDP run on this
/// CPU may interrupt the update: atomically (the socket programs).
#[inline(always)]
pub fn count_atomic(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: pointer into this CPU's slot, from a lookup in this run.
        unsafe { atomic_add(&raw mut (*v).packets, 1) };
    }
}
