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
