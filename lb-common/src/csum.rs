//! Internet checksum helpers (RFC 1071, incremental update per RFC 1624).
//!
//! All values are taken exactly as they stand in memory (the raw 16-bit words of the packet), so
//! the helpers are correct whatever the host byte order: one's complement sums commute with a
//! byte swap. The kernel program uses the incremental updates; the tests use [`checksum`] to
//! recompute from scratch and compare.

/// Folds a 32-bit one's complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word changes from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// The checksum after a 32-bit word (two 16-bit words) changes from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The checksum after an IPv6 address (eight 16-bit words, as they stand in memory) changes
/// from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: &[u16; 8], new: &[u16; 8]) -> u16 {
    let mut sum = u32::from(!check);
    let mut i = 0;
    while i < 8 {
        sum += u32::from(!old[i]) + u32::from(new[i]);
        i += 1;
    }
    !fold(sum)
}

/// UDP: a zero checksum means "none" and must stay zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub fn udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}

/// One's complement sum of `data` (as raw native-endian 16-bit words) plus `initial`, unfolded.
pub fn sum_words(data: &[u8], initial: u32) -> u32 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_ne_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The full Internet checksum of `data`, in memory order (store it with `to_ne_bytes`).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// The TCP/UDP checksum of `segment` (with its checksum field zeroed) under the IPv4
/// pseudo-header made of `saddr`, `daddr` (4 bytes each, packet order) and `proto`.
pub fn l4_checksum_v4(saddr: [u8; 4], daddr: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&saddr);
    pseudo[4..8].copy_from_slice(&daddr);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    let sum = sum_words(segment, sum_words(&pseudo, 0));
    !fold(sum)
}

/// The TCP or UDP checksum of `segment` (its checksum field zeroed) over IPv6 (RFC 8200's
/// pseudo-header: addresses, upper-layer length, next header).
pub fn l4_checksum_v6(saddr: [u8; 16], daddr: [u8; 16], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&saddr);
    pseudo[16..32].copy_from_slice(&daddr);
    pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo[39] = proto;
    let sum = sum_words(segment, sum_words(&pseudo, 0));
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so failures reproduce.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
    }

    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut rng = Lcg(7);
        for _ in 0..10_000 {
            let mut data = [0u8; 40];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            let before = checksum(&data);
            // Change a 32-bit word at an even offset and a 16-bit word elsewhere.
            let old4 = u32::from_ne_bytes(data[12..16].try_into().unwrap());
            let new4 = rng.next();
            data[12..16].copy_from_slice(&new4.to_ne_bytes());
            let old2 = u16::from_ne_bytes([data[20], data[21]]);
            let new2 = rng.next() as u16;
            data[20..22].copy_from_slice(&new2.to_ne_bytes());
            let incremental = replace2(replace4(before, old4, new4), old2, new2);
            let full = checksum(&data);
            // 0x0000 and 0xffff are the same value in one's complement; RFC 1624 yields 0xffff
            // only for all-zero data, which the generator does not make.
            assert_eq!(incremental, full, "data {data:?}");
        }
    }

    #[test]
    fn ipv6_address_updates_match_full_recomputation() {
        let mut rng = Lcg(11);
        for _ in 0..10_000 {
            let mut data = [0u8; 60];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            let before = checksum(&data);
            let words = |d: &[u8]| -> [u16; 8] {
                core::array::from_fn(|i| u16::from_ne_bytes([d[2 * i], d[2 * i + 1]]))
            };
            let old = words(&data[8..24]);
            for b in data[8..24].iter_mut() {
                *b = rng.next() as u8;
            }
            let new = words(&data[8..24]);
            assert_eq!(replace16(before, &old, &new), checksum(&data), "data {data:?}");
        }
    }

    #[test]
    fn udp_zero_checksum_rules() {
        assert_eq!(udp_fixup(0, 0x1234), 0, "no checksum stays no checksum");
        assert_eq!(udp_fixup(0x1111, 0), 0xffff, "a computed zero is sent as all ones");
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }

    #[test]
    fn known_ipv4_header() {
        // The worked example of RFC 1071 / Wikipedia's IPv4 header checksum: B861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
            0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h).to_ne_bytes(), [0xb8, 0x61]);
    }
}
