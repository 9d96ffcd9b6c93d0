//! Jump consistent hash (Lamping and Veach, "A Fast, Minimal Memory, Consistent Hash
//! Algorithm", 2014).
//!
//! A pure function from a 64-bit key and a bucket count `n` to a bucket in `0..n`: perfectly
//! balanced, no memory, and *monotone*: growing `n` to `n + 1` moves a key only to the new
//! bucket `n`. It is the right tool when buckets are numbered and only added or removed at
//! the end (shards of a store, partitions of a log). It is not the service ring: endpoints are
//! a set whose members leave from the middle (see [`crate::pick::consistent`] for the
//! construction used there and why). The function's output is part of the crate's
//! compatibility promise (`tests/hash_golden.rs`).
#![deny(unsafe_code)]

/// The bucket in `0..buckets` for `key`. Returns 0 when `buckets` is 0.
///
/// Costs `O(ln buckets)` iterations of a dependent floating-point division.
///
/// ```
/// use tai_loadbalancer::jump_hash;
///
/// let key = 0xdead_beef_u64;
/// let b10 = jump_hash(key, 10);
/// assert!(b10 < 10);
/// // Monotone: with one more bucket the key stays or moves to the new bucket.
/// let b11 = jump_hash(key, 11);
/// assert!(b11 == b10 || b11 == 10);
/// ```
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_range_and_monotone() {
        for key in (0..2_000u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            let mut prev = jump_hash(key, 1);
            assert_eq!(prev, 0);
            for n in 2..200u32 {
                let b = jump_hash(key, n);
                assert!(b < n);
                assert!(b == prev || b == n - 1, "key {key} n {n}: {prev} -> {b}");
                prev = b;
            }
        }
        assert_eq!(jump_hash(42, 0), 0);
    }

    #[test]
    fn balanced() {
        let n = 10u32;
        let mut counts = [0u32; 10];
        for k in 0..100_000u64 {
            counts[jump_hash(crate::table::ring::mix64(k), n) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
