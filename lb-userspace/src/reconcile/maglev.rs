//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): a lookup table of a
//! prime size M in which each backend owns about M/N entries, filled from per-backend
//! permutations so that removing one of N backends moves about 1/N of the flows, and every node
//! that builds the table from the same backends builds the same table.
//!
//! Backends are named by `address:port`; the table holds slots (1-based positions in the list
//! given), which is what the datapath's service map is indexed by.

/// 64-bit FNV-1a: stable across builds and machines (the std hasher is not promised to be).
pub(crate) fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// splitmix64's finalizer: spreads FNV's weak low bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The lookup table of size `m` (a prime) for `backends` (names; their order gives the slots
/// 1..=n). Empty when there is no backend.
pub fn table(backends: &[String], m: u32) -> Vec<u16> {
    let n = backends.len();
    if n == 0 || m < 2 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = mix(fnv1a(b.as_bytes(), 0xcbf2_9ce4_8422_2325)) % m64;
            let skip = mix(fnv1a(b.as_bytes(), 0x84222325_cbf29ce4)) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut out = vec![0u16; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while out[c as usize] != 0 {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            out[c as usize] = (i + 1) as u16;
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.{}.2:8080", 10 + i)).collect()
    }

    #[test]
    fn every_backend_owns_about_its_share() {
        let t = table(&names(7), 16_381);
        assert_eq!(t.len(), 16_381);
        for slot in 1..=7u16 {
            let owned = t.iter().filter(|&&s| s == slot).count();
            let share = 16_381 / 7;
            assert!(owned.abs_diff(share) <= 1, "slot {slot} owns {owned}, its share is {share}");
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table() {
        assert_eq!(table(&names(5), 1021), table(&names(5), 1021));
        assert!(table(&[], 1021).is_empty());
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth() {
        let m = 16_381;
        for n in [3usize, 5, 10, 30] {
            let all = names(n);
            let before = table(&all, m);
            let removed = n / 2;
            let rest: Vec<String> =
                all.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, b)| b.clone()).collect();
            let after = table(&rest, m);
            // Compare backends, not slots (slots after the removed one shift by one).
            let name_of = |list: &[String], s: u16| list[usize::from(s) - 1].clone();
            let moved =
                (0..m as usize).filter(|&i| name_of(&all, before[i]) != name_of(&rest, after[i])).count();
            let ideal = m as usize / n;
            // The removed backend's entries must move; Maglev moves only a little more.
            assert!(moved >= ideal - 1, "n={n}: {moved} moved, fewer than the removed share {ideal}");
            assert!(moved as f64 <= ideal as f64 * 1.3 + 16.0, "n={n}: {moved} moved, ideal {ideal}");
        }
    }
}
