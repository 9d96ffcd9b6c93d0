//! Differential fuzzing of the registry and the data plane against a naive model.
//!
//! Arbitrary registry operations and picks run against the real `ServiceRegistry` and
//! `IntegratedLoadBalancer` (not started, so every change is applied on the calling thread)
//! and against a `BTreeMap` model. After every step they must agree on membership, on errors,
//! on which endpoints picks may return, on the round-robin rotation, and on the owner of every
//! consistent-hash key, computed here from the ring's *definition* (rendezvous over slot
//! permutations) without the ring.
//!
//! Picks can also be *held* across later steps (`Hold`, `Release`): endpoints are then
//! removed, re-registered with new metadata (a new generation, in a new slot) and re-added
//! while guards of their earlier generations are alive, so counter slots are retired and
//! reused under live guards. Every held pick must keep reading the endpoint it was picked as
//! (its address and the weight it had), the balancer's in-flight total must equal the number
//! of held picks, and it must return to 0 once they are released.
#![no_main]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::__fuzz::Ring;
use tai_loadbalancer::{
    Endpoint, EndpointMetadata, Error, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry, hash_key,
};

const SLOTS: u32 = 1024;

#[derive(Arbitrary, Debug)]
enum Op {
    Register { endpoint: u8, weight: u8 },
    RegisterBatch { endpoints: Vec<(u8, u8)> },
    Deregister { endpoint: u8 },
    RemoveService,
    Pick,
    PickRound,
    PickHash { key: u64 },
    Hold,
    Release { index: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    strategy: u8,
    ops: Vec<Op>,
}

/// Polls a future that must already be complete (the balancer is not started: registry
/// calls apply their change on this thread and return at once).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("registry call did not complete inline"),
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1 + i % 32), 9000))
}

fn endpoint(i: u8, weight: u8) -> Endpoint {
    let weight = u32::from(weight % 5); // 0 is invalid on purpose
    Endpoint::new(addr(i), Some(EndpointMetadata::new().with_weight(weight)))
}

fuzz_target!(|input: Input| {
    let strategy = match input.strategy % 5 {
        0 => LoadBalancingStrategy::RoundRobin,
        1 => LoadBalancingStrategy::Random,
        2 => LoadBalancingStrategy::LeastConnections,
        3 => LoadBalancingStrategy::Weighted,
        _ => LoadBalancingStrategy::ConsistentHash,
    };
    let mut config = LoadBalancerConfig::default();
    config.consistent_hash.slots = SLOTS;
    let registry = Arc::new(ServiceRegistry::new());
    let lb = now(IntegratedLoadBalancer::new(registry.clone(), strategy, config)).unwrap();
    // The model: `None` = service unknown.
    let mut model: Option<BTreeMap<SocketAddr, u32>> = None;
    // Picks held across steps, with the weight their endpoint had when picked and the
    // incarnation of the service they came from (a removed service leaves the metrics).
    let mut held: Vec<(tai_loadbalancer::Pick, u32, u32)> = Vec::new();
    let mut incarnation = 0u32;

    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Register { endpoint: i, weight } => {
                let e = endpoint(i, weight);
                let result = now(registry.register("svc", e.clone()));
                if e.weight() == 0 {
                    assert!(matches!(result, Err(Error::InvalidWeight { .. })), "{result:?}");
                } else {
                    result.unwrap();
                    model
                        .get_or_insert_with(BTreeMap::new)
                        .insert(e.address, e.weight());
                }
            }
            Op::RegisterBatch { endpoints } => {
                let batch: Vec<Endpoint> = endpoints.iter().take(8).map(|&(i, w)| endpoint(i, w)).collect();
                // The registry reports the first problem in batch order.
                let mut seen = std::collections::BTreeSet::new();
                let mut problem = None;
                for e in &batch {
                    if e.weight() == 0 {
                        problem = Some("weight");
                        break;
                    }
                    if !seen.insert(e.address) {
                        problem = Some("duplicate");
                        break;
                    }
                }
                let (invalid, duplicate) = (problem == Some("weight"), problem == Some("duplicate"));
                let result = now(registry.register_batch("svc", batch.clone()));
                if invalid {
                    assert!(matches!(result, Err(Error::InvalidWeight { .. })), "{result:?}");
                } else if duplicate {
                    assert!(
                        matches!(result, Err(Error::DuplicateEndpoint { .. })),
                        "{result:?}"
                    );
                } else {
                    result.unwrap();
                    if !batch.is_empty() {
                        let m = model.get_or_insert_with(BTreeMap::new);
                        for e in &batch {
                            m.insert(e.address, e.weight());
                        }
                    }
                }
            }
            Op::Deregister { endpoint: i } => {
                let result = now(registry.deregister("svc", &endpoint(i, 1)));
                match &mut model {
                    None => assert!(matches!(result, Err(Error::UnknownService { .. })), "{result:?}"),
                    Some(m) => match m.remove(&addr(i)) {
                        Some(_) => result.unwrap(),
                        None => assert!(matches!(result, Err(Error::UnknownEndpoint { .. })), "{result:?}"),
                    },
                }
            }
            Op::RemoveService => {
                let result = now(registry.remove_service("svc"));
                assert_eq!(result.is_ok(), model.take().is_some(), "{result:?}");
                incarnation += 1;
            }
            Op::Pick => match (&model, lb.pick("svc")) {
                (None, Err(Error::UnknownService { .. })) => {}
                (Some(m), Err(Error::NoEndpoints { .. })) if m.is_empty() => {}
                (Some(m), Ok(pick)) => assert!(m.contains_key(&pick.address())),
                (m, r) => panic!("model {m:?} vs pick {r:?}"),
            },
            Op::PickRound => {
                // A full rotation of round robin (or of the smooth weighted schedule's
                // distinct members) visits exactly the model's endpoints.
                if let (Some(m), LoadBalancingStrategy::RoundRobin) = (&model, strategy) {
                    if !m.is_empty() {
                        let first = lb.select("svc").unwrap().address;
                        let start = m.keys().position(|a| *a == first).unwrap();
                        for k in 1..=m.len() {
                            let expected = m.keys().nth((start + k) % m.len()).unwrap();
                            assert_eq!(lb.select("svc").unwrap().address, *expected);
                        }
                    }
                }
            }
            Op::Hold => match (&model, lb.pick("svc")) {
                (None, Err(Error::UnknownService { .. })) => {}
                (Some(m), Err(Error::NoEndpoints { .. })) if m.is_empty() => {}
                (Some(m), Ok(pick)) => {
                    let weight = m[&pick.address()];
                    assert_eq!(pick.endpoint().weight(), weight);
                    if held.len() < 32 {
                        held.push((pick, weight, incarnation));
                    }
                }
                (m, r) => panic!("model {m:?} vs pick {r:?}"),
            },
            Op::Release { index } => {
                if !held.is_empty() {
                    let (pick, _, _) = held.swap_remove(usize::from(index) % held.len());
                    pick.success();
                }
            }
            Op::PickHash { key } => {
                let key = key.to_le_bytes();
                match (&model, lb.select_with_hash("svc", key)) {
                    (None, Err(Error::UnknownService { .. })) => {}
                    (Some(m), Err(Error::NoEndpoints { .. })) if m.is_empty() => {}
                    (Some(m), Ok(e)) => {
                        let members: Vec<(SocketAddr, u32)> = m.iter().map(|(a, w)| (*a, *w)).collect();
                        let slot = (hash_key(key) >> (64 - SLOTS.trailing_zeros())) as u32;
                        let owner = Ring::definition(&members, SLOTS, slot).unwrap();
                        assert_eq!(
                            e.address, members[owner].0,
                            "hash owner differs from the definition"
                        );
                    }
                    (m, r) => panic!("model {m:?} vs hash pick {r:?}"),
                }
            }
        }
        // Held picks still read the endpoint generation they were picked as, whatever
        // happened to its slot's service since.
        for (pick, weight, _) in &held {
            assert_eq!(
                pick.endpoint().address,
                pick.address(),
                "a held pick's slot was reused"
            );
            assert_eq!(pick.endpoint().weight(), *weight, "a held pick's record changed");
        }
        let current = held.iter().filter(|h| h.2 == incarnation).count() as u64;
        assert_eq!(lb.metrics().in_flight, current, "in flight counts the held picks");
        // Membership agrees after every step.
        match &model {
            None => assert!(now(registry.endpoints("svc")).is_err()),
            Some(m) => {
                let got: Vec<(SocketAddr, u32)> = now(registry.endpoints("svc"))
                    .unwrap()
                    .iter()
                    .map(|e| (e.address, e.weight()))
                    .collect();
                let want: Vec<(SocketAddr, u32)> = m.iter().map(|(a, w)| (*a, *w)).collect();
                assert_eq!(got, want);
            }
        }
    }
    drop(held);
    assert_eq!(lb.metrics().in_flight, 0);
});
