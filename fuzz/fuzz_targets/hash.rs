//! The hash functions: any key, any bucket count.
//!
//! * `jump_hash`: in range, equal to an independent transcription of the published
//!   algorithm (stable), and monotone (growing `n` by one keeps the key or moves it to the new
//!   bucket).
//! * the ring: the built table equals the definition for arbitrary small member sets, and
//!   adding a member only moves slots *to* it.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::__fuzz::Ring;
use tai_loadbalancer::jump_hash;

#[derive(Arbitrary, Debug)]
struct Input {
    key: u64,
    buckets: u32,
    members: Vec<(u16, u8)>,
    extra: (u16, u8),
    probes: Vec<u16>,
}

/// Lamping and Veach's listing, transcribed separately from the crate's.
fn reference(mut key: u64, num_buckets: i32) -> i32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(num_buckets) {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as i32
}

fn member(id: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 1, (id >> 8) as u8, id as u8),
        7000,
    ))
}

fuzz_target!(|input: Input| {
    let n = input.buckets % (1 << 20);
    let b = jump_hash(input.key, n);
    if n == 0 {
        assert_eq!(b, 0);
    } else {
        assert!(b < n);
        assert_eq!(b as i32, reference(input.key, n as i32));
        let grown = jump_hash(input.key, n + 1);
        assert!(grown == b || grown == n, "not monotone: {b} -> {grown} at n={n}");
    }

    // Ring vs definition, and monotonicity of adding a member.
    let slots = 1024;
    let mut members: Vec<(SocketAddr, u32)> = input
        .members
        .iter()
        .take(12)
        .map(|&(id, w)| (member(id), u32::from(w % 4) + 1))
        .collect();
    members.sort();
    members.dedup_by_key(|m| m.0);
    let ring = Ring::build(&members, slots);
    for &p in input.probes.iter().take(32) {
        let slot = u32::from(p) % slots;
        assert_eq!(ring.owner(slot as usize), Ring::definition(&members, slots, slot));
    }
    let extra = (member(input.extra.0), u32::from(input.extra.1 % 4) + 1);
    if members.iter().all(|m| m.0 != extra.0) {
        let mut grown = members.clone();
        grown.push(extra);
        grown.sort();
        let new_index = grown.iter().position(|m| m.0 == extra.0).unwrap();
        let bigger = Ring::build(&grown, slots);
        for slot in 0..slots as usize {
            let (Some(before), Some(after)) = (ring.owner(slot), bigger.owner(slot)) else {
                assert!(members.is_empty());
                continue;
            };
            if after != new_index {
                let before_addr = members[before].0;
                assert_eq!(
                    grown[after].0, before_addr,
                    "slot {slot} moved between existing members"
                );
            }
        }
    }
});
