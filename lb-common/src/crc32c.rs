//! The SCTP checksum (CRC32c, RFC 9260 appendix A) and its update after a port rewrite.
//!
//! SCTP's checksum covers the SCTP packet alone (no pseudo-header), so an address translation
//! leaves it as it is; a port translation changes the packet's first four bytes. A CRC is linear
//! over GF(2): for two messages of the same length, `crc(a) ^ crc(b)` is the raw CRC (no initial
//! value, no final complement) of `a ^ b`. Here `a ^ b` is the four bytes of ports that changed,
//! `D`, followed by `len - 4` zero bytes, whose raw CRC is `D(x) * x^(8 * len) mod P` in the
//! reflected representation. So the kernel program updates the checksum with one carry-less
//! multiplication by `x^(8 * len)`, taken from two tables of 256 entries (low and high byte of
//! `len`), instead of reading the whole packet.
//!
//! Reflected representation: bit 31 of a `u32` is the coefficient of `x^0`, bit 0 that of `x^31`
//! (the first bit of the message is the lowest bit of its first byte). The checksum field holds
//! the CRC as a little-endian 32-bit value (Linux's `sctp_compute_cksum`).

/// The Castagnoli polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// `x^0` in the reflected representation.
const ONE: u32 = 1 << 31;

/// `a(x) * b(x) mod P`, both reflected (zlib's `multmodp`): 32 steps without a branch, so that
/// a kernel program's verifier walks it once per path instead of splitting paths at every bit.
#[inline(always)]
pub const fn mulmod(mut a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        // Bit 31 of `a` is the coefficient of x^i at step i; `b` is b(x) * x^i. Each mask is
        // all ones when its bit is set.
        p ^= b & 0u32.wrapping_sub(a >> 31);
        a <<= 1;
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    p
}

const fn powers(step: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    t[0] = ONE;
    let mut i = 1;
    while i < 256 {
        t[i] = mulmod(t[i - 1], step);
        i += 1;
    }
    t
}

/// `x^8` (one byte of zeros), reflected.
const X8: u32 = ONE >> 8;

/// `SHIFT_LO[i] = x^(8 * i) mod P`.
pub static SHIFT_LO: [u32; 256] = powers(X8);

/// `SHIFT_HI[i] = x^(8 * 256 * i) mod P`.
pub static SHIFT_HI: [u32; 256] = powers(mulmod(powers(X8)[255], X8));

/// The CRC32c of `data`: what an SCTP packet's checksum field holds (little-endian) when it is
/// computed with that field zeroed.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    !crc
}

/// What to XOR into the checksum of an SCTP packet `len` bytes long (from its common header to
/// its end; less than 65,536) when the XOR of its first four bytes before and after is
/// `changed` (those bytes read as a little-endian `u32`). Both the checksum and `changed` are
/// little-endian values: on a little-endian host, the words as they stand in memory.
#[inline(always)]
pub fn sctp_update(changed: u32, len: u32) -> u32 {
    let lo = SHIFT_LO[(len & 0xff) as usize];
    let hi = SHIFT_HI[((len >> 8) & 0xff) as usize];
    mulmod(mulmod(changed, lo), hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_value_of_crc32c() {
        // The catalogue's check value of CRC-32/ISCSI (CRC32c).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_tables_are_powers_of_x() {
        // x^(8 * 256) computed a byte at a time.
        let mut p = ONE;
        for _ in 0..256 {
            p = mulmod(p, X8);
        }
        assert_eq!(SHIFT_HI[1], p);
        assert_eq!(mulmod(SHIFT_LO[200], SHIFT_LO[55]), SHIFT_LO[255]);
        assert_eq!(mulmod(SHIFT_HI[3], SHIFT_HI[4]), SHIFT_HI[7]);
    }

    #[test]
    fn an_updated_checksum_equals_the_recomputed_one() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for round in 0..2_000 {
            // Lengths across both tables, up to the largest IPv4 payload.
            let len = match round % 4 {
                0 => 12 + (next() % 64) as usize,
                1 => 12 + (next() % 1500) as usize,
                2 => 12 + (next() % 9000) as usize,
                _ => 12 + (next() % (65_535 - 12 - 20)) as usize,
            };
            let mut buf = [0u8; 65_536];
            let pkt = &mut buf[..len];
            pkt.iter_mut().for_each(|b| *b = next() as u8);
            pkt[8..12].fill(0);
            let before = crc32c(pkt);
            let old = u32::from_le_bytes(pkt[0..4].try_into().unwrap());
            let new = next();
            pkt[0..4].copy_from_slice(&new.to_le_bytes());
            let after = crc32c(pkt);
            assert_eq!(before ^ sctp_update(old ^ new, len as u32), after, "len {len}");
        }
    }
}
