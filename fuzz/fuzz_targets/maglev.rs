//! Maglev's table builder and the bounded-load walk, each against a straightforward model.
//!
//! * The builder: for arbitrary small member sets (weights 1 to 4) and prime sizes, the table
//!   equals the paper's population written out plainly (full preference lists, members in
//!   identity order taking weighted turns), every entry is owned, and each member's share is
//!   within one entry of its weighted turns.
//! * The walk: for arbitrary owners, routability, loads, caps and starts, the result equals
//!   the model's (the first routable owner under the cap within `MAX_BOUNDED_WALK` positions,
//!   else the least loaded routable one seen, else none).
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::__fuzz::{MAX_BOUNDED_WALK, Maglev, bounded_walk};

/// Small primes (the default, 65,537, is covered by the unit tests and golden vectors).
const SIZES: [u32; 8] = [251, 257, 263, 307, 499, 509, 1_009, 4_099];

#[derive(Arbitrary, Debug)]
struct Input {
    size: u8,
    members: Vec<(u16, u8)>,
    walk: Walk,
}

#[derive(Arbitrary, Debug)]
struct Walk {
    owners: Vec<u8>,
    loads: Vec<(u8, bool)>,
    start: u16,
    cap: u8,
}

fn member(id: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 2, (id >> 8) as u8, id as u8),
        7000,
    ))
}

/// The population, written out: every member's full preference list, turns in identity
/// (address) order, a member of weight `w` taking a turn in round `r` while
/// `w × r ≥ w_max × (turns + 1)`.
fn model_table(members: &[(SocketAddr, u32)], size: u32) -> Vec<Option<usize>> {
    let m = size as usize;
    let mut table = vec![None; m];
    if members.is_empty() {
        return table;
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| members[i].0);
    let lists: Vec<Vec<usize>> = members
        .iter()
        .map(|&(a, _)| (0..m as u64).map(|j| Maglev::preference(a, size, j)).collect())
        .collect();
    for list in lists.iter().filter(|_| m <= 1_009) {
        let mut seen = list.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), m, "a preference list is a permutation of the table");
    }
    let max_weight = members.iter().map(|m| m.1).max().unwrap();
    let mut next = vec![0usize; members.len()];
    let mut turns = vec![0u64; members.len()];
    let mut filled = 0;
    let mut round = 1u64;
    while filled < m {
        for &i in &order {
            if filled == m {
                break;
            }
            let w = u64::from(members[i].1);
            if w * round < u64::from(max_weight) * (turns[i] + 1) {
                continue;
            }
            turns[i] += 1;
            while table[lists[i][next[i]]].is_some() {
                next[i] += 1;
            }
            table[lists[i][next[i]]] = Some(i);
            next[i] += 1;
            filled += 1;
        }
        round += 1;
    }
    table
}

fn model_walk(
    owners: &[usize],
    start: usize,
    routable: &[bool],
    loads: &[u64],
    cap: u64,
) -> Option<Result<usize, usize>> {
    let window: Vec<usize> = (0..MAX_BOUNDED_WALK.min(owners.len()))
        .map(|k| owners[(start + k) % owners.len()])
        .filter(|&o| routable[o])
        .collect();
    if let Some(&o) = window.iter().find(|&&o| loads[o] < cap) {
        return Some(Ok(o));
    }
    let least = window.iter().map(|&o| loads[o]).min()?;
    window.iter().find(|&&o| loads[o] == least).map(|&o| Err(o))
}

fuzz_target!(|input: Input| {
    // The builder.
    let size = SIZES[usize::from(input.size) % SIZES.len()];
    let mut members: Vec<(SocketAddr, u32)> = input
        .members
        .iter()
        .take(12)
        .map(|&(id, w)| (member(id), u32::from(w % 4) + 1))
        .collect();
    members.dedup_by_key(|m| m.0);
    let mut seen = std::collections::HashSet::new();
    members.retain(|m| seen.insert(m.0));
    let table = Maglev::build(&members, size);
    let model = model_table(&members, size);
    let built: Vec<Option<usize>> = (0..size as usize).map(|e| table.owner_of_entry(e)).collect();
    assert_eq!(built, model, "the table differs from the model");
    if !members.is_empty() {
        assert!(built.iter().all(Option::is_some), "an entry has no owner");
        let total_weight: u32 = members.iter().map(|m| m.1).sum();
        for (i, &(_, w)) in members.iter().enumerate() {
            let share = built.iter().filter(|&&o| o == Some(i)).count() as f64;
            let expected = f64::from(size) * f64::from(w) / f64::from(total_weight);
            // Weighted turns keep each member within its weight of its exact share.
            assert!(
                (share - expected).abs() <= f64::from(members.iter().map(|m| m.1).max().unwrap()) + 1.0,
                "member {i} (weight {w}) owns {share} entries, expected {expected:.1}"
            );
        }
    }

    // The bounded walk.
    let walk = &input.walk;
    let n = walk.loads.len().clamp(1, 16);
    let owners: Vec<usize> = walk
        .owners
        .iter()
        .take(300)
        .map(|&o| usize::from(o) % n)
        .collect();
    let loads: Vec<u64> = (0..n)
        .map(|i| walk.loads.get(i).map_or(0, |l| u64::from(l.0 % 8)))
        .collect();
    let routable: Vec<bool> = (0..n).map(|i| walk.loads.get(i).is_none_or(|l| l.1)).collect();
    let cap = u64::from(walk.cap % 8);
    if owners.is_empty() {
        return;
    }
    let start = usize::from(walk.start) % owners.len();
    let got = bounded_walk(
        owners.len(),
        start,
        |p| Some(owners[p]),
        |o| routable[o],
        |o| if loads[o] < cap { Ok(()) } else { Err(loads[o]) },
    )
    .map(|r| r.map(|(o, ())| o));
    assert_eq!(got, model_walk(&owners, start, &routable, &loads, cap));
});
