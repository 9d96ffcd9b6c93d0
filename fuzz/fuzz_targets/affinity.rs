//! The affinity table against a model with TTL and capacity.
//!
//! Arbitrary binds, lookups, removals and clock advances run against the real table (on a
//! manual clock) and a `BTreeMap` model that records each binding's last use. The eviction
//! policy is the cache's own, so the model cannot say *which* entry is evicted; it checks
//! everything else: the table never exceeds `max_entries`; a lookup never returns an expired
//! binding, nor an endpoint the key was not bound to; a binding made and used within its TTL
//! is returned unless it was evicted (and then it stays gone until bound again).
#![no_main]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::__fuzz::Affinity;
use tai_loadbalancer::{AffinityConfig, AffinityStrategy, Endpoint, Error};

#[derive(Arbitrary, Debug)]
enum Op {
    Set { service: u8, key: u8, endpoint: u8 },
    Get { service: u8, key: u8 },
    Remove { service: u8, key: u8 },
    Advance { ms: u16 },
    SetEmptyKey,
}

#[derive(Arbitrary, Debug)]
struct Input {
    max_entries: u8,
    ttl_ms: u16,
    ops: Vec<Op>,
}

fn endpoint(i: u8) -> Endpoint {
    Endpoint::new(
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 1, i % 8 + 1), 7000)),
        None,
    )
}

fn names(service: u8, key: u8) -> (String, String) {
    (format!("s{}", service % 3), format!("k{}", key % 24))
}

fuzz_target!(|input: Input| {
    let max_entries = usize::from(input.max_entries % 16) + 1;
    let ttl = u64::from(input.ttl_ms % 1000) + 1;
    let config = AffinityConfig {
        strategy: AffinityStrategy::CustomKey,
        ttl: Duration::from_millis(ttl),
        max_entries,
    };
    let table = Affinity::new(config).expect("valid config");
    // (service, key) -> (endpoint, last use); may hold entries the table evicted.
    let mut model: BTreeMap<(String, String), (Endpoint, u64)> = BTreeMap::new();
    let mut now = 0u64;
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Set {
                service,
                key,
                endpoint: e,
            } => {
                let (s, k) = names(service, key);
                table.set(&s, &k, endpoint(e)).unwrap();
                model.insert((s, k), (endpoint(e), now));
            }
            Op::Get { service, key } => {
                let (s, k) = names(service, key);
                let got = table.get(&s, &k);
                match (got, model.get_mut(&(s.clone(), k.clone()))) {
                    (Some(e), Some((bound, last))) => {
                        assert_eq!(e, *bound, "returned an endpoint the key was not bound to");
                        assert!(now - *last < ttl, "returned an expired binding");
                        *last = now;
                    }
                    (Some(e), None) => panic!("returned {e} for a key that was never bound (or was removed)"),
                    (None, Some(_)) => {
                        // Expired, or evicted by the capacity bound: gone either way.
                        model.remove(&(s, k));
                    }
                    (None, None) => {}
                }
            }
            Op::Remove { service, key } => {
                let (s, k) = names(service, key);
                let removed = table.remove(&s, &k);
                let modelled = model.remove(&(s, k));
                if let Some(e) = removed {
                    assert_eq!(
                        Some(e),
                        modelled.map(|(e, _)| e),
                        "removed a binding the model does not have"
                    );
                }
            }
            Op::Advance { ms } => {
                now += u64::from(ms % 2000);
                table.now.store(now, Ordering::Relaxed);
            }
            Op::SetEmptyKey => {
                assert!(matches!(
                    table.set("s0", "", endpoint(0)),
                    Err(Error::InvalidAffinityKey { .. })
                ));
            }
        }
        assert!(
            table.table.len() <= max_entries,
            "{} entries > max_entries {max_entries}",
            table.table.len()
        );
    }
});
