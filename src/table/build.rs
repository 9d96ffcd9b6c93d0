//! Building a [`ServiceTable`]: a pure function of the members and the strategy.
//!
//! Runs on the control plane only. The expensive part, the consistent-hash ring, depends on
//! nothing but the members' addresses and weights, so [`RingCache`] keeps the last one and a
//! rebuild that changes only health or metadata reuses it (health flaps never rebuild, and
//! therefore never move, the ring).
#![deny(unsafe_code)]

use std::net::SocketAddr;

use crate::config::HashAlgorithm;
use crate::config::strategy::LoadBalancingStrategy;
use crate::sync::DataArc;
use crate::sync::arena::{Entry, SlotId};
use crate::table::maglev::MaglevTable;
use crate::table::plan::{PlanGroup, PlanSpec, RoutingPlan};
use crate::table::ring::{HashRing, OwnedRingId, RingId};
use crate::table::schedule::Schedule;
use crate::table::subsets::{SubsetIndex, SubsetSpec};
use crate::table::{Arena, Hashing, MemberHealth, MemberInfo, ServiceTable, Target};

/// One member, as the control plane knows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemberInput {
    pub(crate) slot: SlotId,
    pub(crate) address: SocketAddr,
    pub(crate) has_metadata: bool,
    pub(crate) info: MemberInfo,
    /// Picks may return it (healthy, or in panic and not taken out by an operator).
    pub(crate) routable: bool,
}

/// Everything a table is made of.
#[derive(Debug)]
pub(crate) struct TableInput {
    pub(crate) service: DataArc<str>,
    pub(crate) version: u64,
    pub(crate) membership_version: u64,
    pub(crate) strategy: LoadBalancingStrategy,
    /// All members, in address order.
    pub(crate) members: Vec<MemberInput>,
    pub(crate) hash_slots: u32,
    /// The ring or Maglev table to carry, if any (from [`RingCache::ring_for`]).
    pub(crate) ring: Option<DataArc<Hashing>>,
    /// The configured algorithm (for hash picks before `ring` exists).
    pub(crate) hash_algorithm: HashAlgorithm,
    /// Bounded loads' factor, if on.
    pub(crate) balance_factor: Option<f64>,
    /// Whether routability was widened because too few members are healthy.
    pub(crate) panic: bool,
    /// Member indices of a primary/backup order, if the service is routed by one.
    pub(crate) failover: Option<Box<[u32]>>,
    /// Priority levels and locality, when they restrict the routable members.
    pub(crate) plan: Option<PlanSpec>,
    /// Metadata subsets: the selectors (keys sorted), the groups, the fallback and the
    /// default subset's pairs.
    pub(crate) subsets: Option<SubsetsInput>,
}

/// The `[subsets]` part of a table's input.
pub(crate) struct SubsetsInput {
    pub(crate) selectors: Vec<Vec<String>>,
    pub(crate) specs: Vec<SubsetSpec>,
    pub(crate) fallback: crate::config::locality::SubsetFallback,
    pub(crate) default: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for SubsetsInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubsetsInput")
            .field("selectors", &self.selectors)
            .field("subsets", &self.specs.len())
            .finish_non_exhaustive()
    }
}

/// Builds the table over `arena`'s slots: the member and routable views, the weights, and
/// the weighted schedule when the strategy needs one.
pub(crate) fn build(arena: &Arena, input: TableInput) -> ServiceTable {
    let mut v6 = Vec::new();
    let members: Vec<Entry<Target>> = input
        .members
        .iter()
        .map(|m| Entry {
            slot: m.slot,
            payload: Target::new(
                m.address,
                &mut v6,
                m.info.effective_weight,
                m.routable,
                m.info.health == MemberHealth::Healthy,
                m.has_metadata,
            ),
        })
        .collect();
    let routable: Vec<Entry<Target>> = members.iter().filter(|e| e.payload.routable()).copied().collect();
    let routable_len = routable.len();
    // A group of members (by index) as a view with its weighted schedule.
    let strategy = input.strategy;
    let pool = |indices: &[u32]| {
        let entries: Vec<Entry<Target>> = indices.iter().map(|&i| members[i as usize]).collect();
        let weights: Vec<u32> = entries.iter().map(|e| e.payload.weight()).collect();
        let weighted = weights.windows(2).any(|w| w[0] != w[1]);
        let schedule = match strategy {
            LoadBalancingStrategy::Weighted => Schedule::build(&weights),
            _ => None,
        };
        (arena.view(entries), schedule, weighted)
    };
    let plan = input.plan.and_then(|spec| {
        let groups = spec
            .groups
            .iter()
            .map(|(indices, share, level)| {
                let (view, schedule, weighted) = pool(indices);
                (
                    PlanGroup {
                        view,
                        schedule,
                        weighted,
                        level: *level,
                    },
                    *share,
                )
            })
            .collect();
        RoutingPlan::new(groups, &spec.levels, spec.member_level).map(Box::new)
    });
    let subsets = input.subsets.map(|sub| {
        let built = sub
            .specs
            .iter()
            .map(|spec| {
                let (view, schedule, weighted) = pool(&spec.members);
                SubsetIndex::subset(spec, view, schedule, weighted)
            })
            .collect();
        Box::new(SubsetIndex::new(
            &sub.selectors,
            built,
            sub.fallback,
            &sub.default,
        ))
    });
    let weights: Vec<u32> = routable.iter().map(|e| e.payload.weight()).collect();
    let weighted = weights.windows(2).any(|w| w[0] != w[1]);
    let schedule = match input.strategy {
        LoadBalancingStrategy::Weighted => Schedule::build(&weights),
        _ => None,
    };
    ServiceTable {
        service: input.service,
        version: input.version,
        membership_version: input.membership_version,
        strategy: input.strategy,
        members: arena.view(members),
        routable: arena.view(routable),
        info: input.members.iter().map(|m| m.info).collect(),
        v6: v6.into_boxed_slice(),
        weighted,
        schedule,
        ring: input.ring,
        hash_algorithm: input.hash_algorithm,
        balance_factor: input.balance_factor,
        cap_scale: input
            .balance_factor
            .map_or(0.0, |c| c / routable_len.max(1) as f64),
        hash_slots: input.hash_slots,
        miss: None,
        panic: input.panic,
        failover: input.failover,
        plan,
        subsets,
    }
}

/// How a service's consistent-hash structure is built: the algorithm and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HashParams {
    pub(crate) algorithm: HashAlgorithm,
    /// Ring slots (a power of two).
    pub(crate) slots: u32,
    /// Maglev table size (a prime).
    pub(crate) maglev_size: u32,
}

/// The last ring (or Maglev table) built for a service and the member set it was built for.
#[derive(Debug, Default)]
pub(crate) struct RingCache {
    key: Vec<(OwnedRingId, u32)>,
    params: Option<HashParams>,
    ring: Option<DataArc<Hashing>>,
}

impl RingCache {
    /// The structure for members `key` (identity and registered weight, in the table's member
    /// order): the cached one when they are unchanged, otherwise a new one (which replaces
    /// the cache).
    pub(crate) fn ring_for(&mut self, key: Vec<(OwnedRingId, u32)>, params: HashParams) -> DataArc<Hashing> {
        if let (true, Some(ring)) = (self.params == Some(params) && self.key == key, &self.ring) {
            return ring.clone();
        }
        let ids: Vec<(RingId<'_>, u32)> = key.iter().map(|(id, w)| (id.as_id(), *w)).collect();
        let ring = DataArc::new(match params.algorithm {
            HashAlgorithm::Ring => Hashing::Ring(HashRing::build(&ids, params.slots)),
            HashAlgorithm::Maglev => {
                if (params.maglev_size as usize) < 100 * ids.len() {
                    tracing::warn!(
                        endpoints = ids.len(),
                        maglev_table_size = params.maglev_size,
                        "Maglev table smaller than 100 entries per endpoint: balance is coarse"
                    );
                }
                Hashing::Maglev(MaglevTable::build(&ids, params.maglev_size))
            }
        });
        self.key = key;
        self.params = Some(params);
        self.ring = Some(ring.clone());
        ring
    }
}
