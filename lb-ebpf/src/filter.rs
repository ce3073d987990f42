//! The endpoint filter (lb_common::MAP_FILTER): is (address, port, protocol) possibly a frontend
//! or a backend? Two array reads spare a packet that is neither its three hash lookups.
use lb_common::{filter_bit, filter_bit_backend, filter_bit_backend6, filter_bit6};

use crate::maps::{FILTER, SERVICE_CIDRS};

/// `addr` and `port` as they stand in the packet (network order).
#[inline(always)]
pub fn has(addr: u32, port: u16, proto: u8) -> bool {
    is_set(filter_bit(addr.to_ne_bytes(), u16::from_be(port), proto))
}

/// As [`has`], for an IPv6 address (bytes as in the packet) and a port in host order.
#[inline(always)]
pub fn has6(addr: &[u8; 16], port: u16, proto: u8) -> bool {
    is_set(filter_bit6(*addr, port, proto))
}

/// Whether (`addr`, `port`, `proto`), as they stand in the packet, may be a backend (its
/// second bit, which no frontend sets: lb_common::filter_bit_backend).
#[inline(always)]
pub fn has_backend(addr: u32, port: u16, proto: u8) -> bool {
    is_set(filter_bit_backend(addr.to_ne_bytes(), u16::from_be(port), proto))
}

/// As [`has_backend`], for an IPv6 address (bytes as in the packet) and a port in host order.
#[inline(always)]
pub fn has_backend6(addr: &[u8; 16], port: u16, proto: u8) -> bool {
    is_set(filter_bit_backend6(*addr, port, proto))
}

/// Whether filter bit `bit` is set. A word that cannot be read (never: the index is below the
/// map's size) counts as set.
#[inline(always)]
fn is_set(bit: u32) -> bool {
    FILTER.get(bit >> 6).is_none_or(|w| (*w >> (bit & 63)) & 1 != 0)
}

/// Whether an IPv4 address (as it stands in the packet) lies in the cluster's Service ranges
/// (lb_common::MAP_SERVICE_CIDRS).
#[inline(always)]
pub fn in_service_range(addr: u32) -> bool {
    SERVICE_CIDRS.get(0).is_some_and(|c| c.contains4(addr))
}

/// As [`in_service_range`], for an IPv6 address (bytes as in the packet).
#[inline(always)]
pub fn in_service_range6(addr: &[u8; 16]) -> bool {
    SERVICE_CIDRS.get(0).is_some_and(|c| c.contains6(addr))
}
