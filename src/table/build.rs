//! Building a [`ServiceTable`]: a pure function of the members and the strategy.
//!
//! Runs on the control plane only. The expensive part, the consistent-hash ring, depends on
//! nothing but the members' addresses and weights, so [`RingCache`] keeps the last one and a
//! rebuild that changes only health or metadata reuses it (health flaps never rebuild, and
//! therefore never move, the ring).
#![deny(unsafe_code)]

use std::net::SocketAddr;

use crate::LoadBalancingStrategy;
use crate::pick::consistent::HashRing;
use crate::pick::weighted::Schedule;
use crate::sync::DataArc;
use crate::table::{Member, ServiceTable, ShardView};

/// Everything a table is made of.
#[derive(Debug)]
pub(crate) struct TableInput {
    pub(crate) service: DataArc<str>,
    pub(crate) version: u64,
    pub(crate) membership_version: u64,
    pub(crate) strategy: LoadBalancingStrategy,
    /// All members, in address order.
    pub(crate) members: Vec<Member>,
    pub(crate) hash_slots: u32,
    /// The ring to carry, if any (from [`RingCache::ring_for`]).
    pub(crate) ring: Option<DataArc<HashRing>>,
    /// Number of counter shards (a power of two; every member's state has that many pins).
    pub(crate) shards: usize,
    /// Whether `members` were made all routable because too few are healthy.
    pub(crate) panic: bool,
    /// Member indices of a primary/backup order, if the service is routed by one.
    pub(crate) failover: Option<Box<[u32]>>,
}

/// Builds the table: routable subset, weights, and the weighted schedule when the strategy
/// needs one.
pub(crate) fn build(input: TableInput) -> ServiceTable {
    let shards = (0..input.shards.max(1))
        .map(|s| ShardView {
            routable: input
                .members
                .iter()
                .filter(|m| m.routable)
                .map(|m| m.state.pin(s).clone())
                .collect(),
            members: input.members.iter().map(|m| m.state.pin(s).clone()).collect(),
        })
        .collect();
    let weights: Vec<u32> = input
        .members
        .iter()
        .filter(|m| m.routable)
        .map(|m| m.effective_weight)
        .collect();
    let uniform = weights.windows(2).all(|w| w[0] == w[1]);
    let schedule = match input.strategy {
        LoadBalancingStrategy::Weighted => Schedule::build(&weights),
        _ => None,
    };
    ServiceTable {
        service: input.service,
        version: input.version,
        membership_version: input.membership_version,
        strategy: input.strategy,
        members: input.members.into_boxed_slice(),
        shards,
        routable_weights: (!uniform).then(|| weights.into_boxed_slice()),
        schedule,
        ring: input.ring,
        hash_slots: input.hash_slots,
        miss: None,
        panic: input.panic,
        failover: input.failover,
    }
}

/// The last ring built for a service and the member set it was built for.
#[derive(Debug, Default)]
pub(crate) struct RingCache {
    key: Vec<(SocketAddr, u32)>,
    slots: u32,
    ring: Option<DataArc<HashRing>>,
}

impl RingCache {
    /// The ring for `members`: the cached one when addresses and weights are unchanged,
    /// otherwise a new one (which replaces the cache).
    pub(crate) fn ring_for(&mut self, members: &[Member], slots: u32) -> DataArc<HashRing> {
        let unchanged = self.slots == slots
            && self.key.len() == members.len()
            && self.key.iter().zip(members).all(|(k, m)| *k == m.ring_key());
        if let (true, Some(ring)) = (unchanged, &self.ring) {
            return ring.clone();
        }
        self.key = members.iter().map(Member::ring_key).collect();
        self.slots = slots;
        let ring = DataArc::new(HashRing::build(&self.key, slots));
        self.ring = Some(ring.clone());
        ring
    }
}
