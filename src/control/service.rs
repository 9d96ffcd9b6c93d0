//! Control-plane bookkeeping of one service: its membership, endpoint generations and their
//! slots in the service's counter arena, health (active results, ejections, slow-start
//! ramps), the tables built from them, and the tables and slots being retired.
//!
//! # Invariants
//!
//! * `states` is in address order, one generation (one live slot) per current member;
//!   `endpoints` is the membership they were built from. A metadata change starts a new
//!   generation in a new slot; the old one retires.
//! * A member is *healthy* when its active checks pass and it is not ejected; it is
//!   *routable* when healthy, or when the service is in panic (fewer than
//!   `panic_threshold_percent` of the members not marked down or draining are healthy), in
//!   which case every member not marked down or draining is. An operator's decision always
//!   holds: marked-down and draining members are never routable.
//! * Health never changes the consistent-hash ring (it is a function of addresses and
//!   registered weights), so health flaps move no keys of healthy endpoints.
//! * Ejection and ramp records exist only for current members.
//! * A replaced table is kept here until no picker holds it, and dropped here: the request
//!   path never frees a table (which would cost it one release per endpoint and view). A
//!   retired slot is recycled (its counters folded into the service's totals) once no kept
//!   table contains it and nothing is in flight on it.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Settings, Sources};
use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::error::CircuitLimit;
use crate::events::{HealthEventKind, PendingEvent, short_reason};
use crate::handoff::HealthSource;
use crate::stats::{
    CircuitBreakerMetrics, CounterValues, EndpointCounters, ReleasedEndpoint, RoutingUpdate, ServiceCounters,
};
use crate::sync::arena::{SlotCounters, SlotId};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Arc, DataArc};
use crate::table::build::{HashParams, MemberInput, RingCache, SubsetsInput, TableInput, build};
use crate::table::estimate::{Decay, estimate_ns, expire, now_ns};
use crate::table::plan::{LevelHealth, PlanMember, PlanSettings, PlanSpec, plan_spec, total_health};
use crate::table::ring::OwnedRingId;
use crate::table::subsetting::subset_mask;
use crate::table::{
    Arena, MemberHealth, MemberInfo, Miss, OutlierReport, ServiceContext, ServiceSlot, ServiceTable,
    SlotRecord,
};

/// `now + d`, saturating instead of overflowing: validated durations are bounded (a day at
/// most), so this only guards against a bound being raised without a look at this sum.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// How `endpoint` is placed on the consistent-hash ring: by its hash key if it carries one,
/// else by its address.
fn ring_id(endpoint: &Endpoint) -> OwnedRingId {
    match endpoint.tag(crate::endpoint::HASH_KEY_TAG) {
        Some(key) => OwnedRingId::Key(DataArc::from(key)),
        None => OwnedRingId::Address(endpoint.address),
    }
}

/// How often kept tables and retired slots are looked at again while some wait.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// How often selection counts are folded and stale Peak-EWMA estimates cleared.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

/// One current member: its endpoint and its generation's slot.
#[derive(Clone, Debug)]
struct MemberState {
    endpoint: Endpoint,
    slot: SlotId,
}

/// A retired endpoint generation: its slot waits for the tables and guards that hold it.
#[derive(Debug)]
pub(super) struct Retiring {
    slot: SlotId,
    address: SocketAddr,
    since: Instant,
    /// The address left the service (not just a metadata change): its release is reported.
    departed: bool,
    /// Its release was reported (at the drain timeout, with requests still in flight).
    released: bool,
}

/// Outlier-detection history of one address.
#[derive(Clone, Copy, Debug)]
struct Ejection {
    /// Ejected until then; `None` while not ejected.
    until: Option<Instant>,
    /// Ejections so far (decays by one per `base_ejection_time` spent un-ejected).
    count: u32,
    /// When `until` was last set or cleared.
    changed: Instant,
}

/// What a metrics read takes under the control lock: O(1) per service plus the retired
/// generations (few), so a scrape never holds the lock for a pass over the endpoints.
pub(super) struct ServiceSnapshot {
    name: DataArc<str>,
    /// The last live table (not a tombstone): its members are the current endpoints.
    table: Arc<ServiceTable>,
    /// The published table's version and panic state (a tombstone after stop).
    published: (u64, u64, bool),
    removed: CounterValues,
    earlier: HashMap<SocketAddr, CounterValues, ahash::RandomState>,
    /// Members ejected now, with the end of their ejection.
    ejected: Vec<(SocketAddr, Instant)>,
}

pub(super) struct ServiceControl {
    pub(super) name: DataArc<str>,
    pub(super) slot: DataArc<ServiceSlot>,
    pub(super) membership_version: u64,
    pub(super) endpoints: DataArc<Vec<Endpoint>>,
    /// The service's counter arena.
    arena: Arena,
    /// Current members, in address order.
    states: Vec<MemberState>,
    ring: RingCache,
    table_version: u64,
    /// The last table built from a membership (not a tombstone).
    live: Arc<ServiceTable>,
    /// Replaced tables a picker may still hold; dropped here once nothing else does.
    old_tables: Vec<Arc<ServiceTable>>,
    /// Retired generations whose slots are not recycled yet.
    pub(super) retiring: Vec<Retiring>,
    /// Final counters of recycled generations whose address is still a member.
    retired_members: HashMap<SocketAddr, CounterValues, ahash::RandomState>,
    /// Final counters of recycled generations of addresses no longer members.
    retired: CounterValues,
    /// Members failing their active checks (as of the last rebuild).
    unhealthy: HashSet<SocketAddr, ahash::RandomState>,
    /// Members an operator marked down.
    down: HashSet<SocketAddr, ahash::RandomState>,
    /// Members being drained.
    draining: HashSet<SocketAddr, ahash::RandomState>,
    /// Primary/backup order routing the service, if set.
    pub(super) failover_order: Option<Vec<SocketAddr>>,
    ejections: HashMap<SocketAddr, Ejection, ahash::RandomState>,
    /// Members in their slow-start ramp, with its start.
    ramps: HashMap<SocketAddr, Instant, ahash::RandomState>,
    /// When the ramping weights are next recomputed (`None` without ramps).
    ramp_tick: Option<Instant>,
    /// When kept tables and retired slots are next looked at (`None` without any).
    sweep_tick: Option<Instant>,
    /// When selection counts are next folded.
    maintenance_tick: Instant,
    /// Whether a table was built from a membership yet (members of the first one do not
    /// slow-start: nothing was serving before them).
    built: bool,
    panic: bool,
    pub(super) dirty: bool,
    /// Health events decided since the control plane last delivered them.
    pub(super) events: Vec<PendingEvent>,
    /// Whether anyone subscribes to health events (none are recorded otherwise).
    listening: DataArc<AtomicBool>,
}

impl ServiceControl {
    pub(super) fn new(name: DataArc<str>, settings: &Settings) -> Self {
        let strategy = settings.strategy_for(&name);
        let od = &settings.config.outlier_detection;
        let context = ServiceContext {
            service: name.clone(),
            outlier: od.enabled.then(|| OutlierReport {
                sink: settings.outlier_sink.clone(),
                threshold: u64::from(od.consecutive_failures),
            }),
            decay: (strategy == LoadBalancingStrategy::PeakEwma)
                .then(|| Decay::new(settings.config.peak_ewma.decay)),
            breaker: crate::breaker::Breaker::new(name.clone(), settings.config.circuit_breakers_for(&name)),
        };
        let estimates = context.decay.is_some();
        // Bounded loads compare an endpoint's requests in flight with the service's average:
        // the arena then keeps the total, and one shard, so that a pick checks the cap and
        // takes its place in one compare-and-swap (`View::try_lease`): two threads cannot both
        // take an endpoint's last place under the cap. The price is that every thread's
        // picks of this service count on the same lines.
        let totals = settings.config.consistent_hash.balance_factor.is_some();
        let shards = if totals { 1 } else { crate::sync::shard_count() };
        let arena = Arena::with_totals(shards, estimates, totals, context);
        let table = Arc::new(ServiceTable::empty(
            &arena,
            name.clone(),
            0,
            strategy,
            settings.hash_slots,
            None,
        ));
        let slot = DataArc::new(ServiceSlot::new(
            ServiceTable::empty(&arena, name.clone(), 0, strategy, settings.hash_slots, None),
            strategy == LoadBalancingStrategy::ConsistentHash,
        ));
        Self {
            name,
            slot,
            membership_version: 0,
            endpoints: DataArc::new(Vec::new()),
            arena,
            states: Vec::new(),
            ring: RingCache::default(),
            table_version: 0,
            live: table,
            old_tables: Vec::new(),
            retiring: Vec::new(),
            retired_members: HashMap::default(),
            retired: CounterValues::default(),
            unhealthy: HashSet::default(),
            down: HashSet::default(),
            draining: HashSet::default(),
            failover_order: None,
            ejections: HashMap::default(),
            ramps: HashMap::default(),
            ramp_tick: None,
            sweep_tick: None,
            maintenance_tick: later(Instant::now(), MAINTENANCE_INTERVAL),
            built: false,
            panic: false,
            dirty: true,
            events: Vec::new(),
            listening: settings.listening.clone(),
        }
    }

    /// Rebuilds and publishes this service's table.
    pub(super) fn rebuild(
        &mut self,
        settings: &Settings,
        sources: &Sources<'_>,
        now: Instant,
    ) -> RoutingUpdate {
        let started = Instant::now();
        #[cfg(test)]
        super::fault::maybe_panic_in_rebuild(&self.name);
        let strategy = settings.strategy_for(&self.name);
        let slow_start = &settings.config.slow_start;
        self.refresh_health(sources, now, slow_start.window > Duration::ZERO);

        // Merge the sorted previous states with the sorted new membership: keep the slot of
        // every endpoint that stays as it was, give new or changed ones a new generation (a
        // new slot), retire the rest.
        let previous = std::mem::take(&mut self.states);
        let mut previous = previous.into_iter().peekable();
        let mut states = Vec::with_capacity(self.endpoints.len());
        let endpoints = self.endpoints.clone();
        for endpoint in endpoints.iter() {
            while let Some(old) = previous.next_if(|s| s.endpoint.address < endpoint.address) {
                self.retire(old, false, now);
            }
            let slot = match previous.next_if(|s| s.endpoint.address == endpoint.address) {
                Some(old) if old.endpoint == *endpoint => old.slot,
                Some(old) => {
                    self.retire(old, true, now);
                    self.arena.alloc(SlotRecord::new(endpoint.clone()))
                }
                None => {
                    if self.built && !slow_start.window.is_zero() {
                        self.ramps.insert(endpoint.address, now);
                    }
                    self.note(PendingEvent::endpoint(endpoint.address, HealthEventKind::Added));
                    self.arena.alloc(SlotRecord::new(endpoint.clone()))
                }
            };
            states.push(MemberState {
                endpoint: endpoint.clone(),
                slot,
            });
        }
        for old in previous {
            self.retire(old, false, now);
        }
        self.states = states;
        self.forget_departed();
        self.schedule_ramp(settings, now);

        // Health, weights, panic.
        let scale = if slow_start.window.is_zero() { 1 } else { 100 };
        let mut members: Vec<MemberInput> = self
            .states
            .iter()
            .map(|state| {
                let address = state.endpoint.address;
                let health = if self.draining.contains(&address) {
                    MemberHealth::Draining
                } else if self.down.contains(&address) {
                    MemberHealth::Down
                } else if self.unhealthy.contains(&address) {
                    MemberHealth::Unhealthy
                } else if self.ejections.get(&address).is_some_and(|e| e.until.is_some()) {
                    MemberHealth::Ejected
                } else {
                    MemberHealth::Healthy
                };
                let weight = state.endpoint.weight();
                let factor = self.ramps.get(&address).map_or(1.0, |start| {
                    slow_start.factor(now.saturating_duration_since(*start))
                });
                let effective = (f64::from(weight) * f64::from(scale) * factor).round().max(1.0) as u32;
                MemberInput {
                    slot: state.slot,
                    address,
                    has_metadata: state.endpoint.has_metadata(),
                    info: MemberInfo {
                        health,
                        weight,
                        effective_weight: effective,
                        ejections: self.ejections.get(&address).map_or(0, |e| e.count),
                    },
                    routable: health == MemberHealth::Healthy,
                }
            })
            .collect();
        // Deterministic subsetting: members outside this balancer's subset take none of its
        // traffic (and do not count for panic). A subset an operator emptied falls back to
        // the whole service.
        let in_subset = self.subset_mask(settings, &members);
        for (m, &inside) in members.iter_mut().zip(&in_subset) {
            m.routable &= inside;
        }
        let eligible_at = |m: &MemberInput, inside: bool| inside && !m.info.health.is_operator_decision();

        // Panic mode is about health (active checks and outlier ejection), never about what
        // an operator decided: marked-down and draining members are left out of the count and
        // stay out of routing in panic (as Envoy leaves its excluded hosts out). With several
        // priority levels, the service panics when Envoy's normalized total health (each
        // level's healthy share times the overprovisioning factor, summed, capped at 100) is
        // under the threshold.
        let healthy = members.iter().filter(|m| m.routable).count();
        let eligible = members
            .iter()
            .zip(&in_subset)
            .filter(|(m, inside)| eligible_at(m, **inside))
            .count();
        let threshold = u64::from(settings.config.panic_threshold_percent);
        let levels = self.level_health(&members, &in_subset);
        let panic = if levels.len() > 1 {
            eligible > 0
                && total_health(&levels, settings.config.priority.overprovisioning_factor) < threshold as f64
        } else {
            eligible > 0 && (healthy as u64) * 100 < threshold * eligible as u64
        };
        if panic {
            for (m, &inside) in members.iter_mut().zip(&in_subset) {
                m.routable = eligible_at(m, inside);
            }
        }
        let plan = if panic {
            None
        } else {
            self.plan(settings, &members, &in_subset)
        };
        let subsets = self.subsets_input(settings, &members);
        if panic != self.panic {
            if panic {
                tracing::warn!(service = %self.name, healthy, eligible, total = members.len(), "panic mode: routing to every endpoint not marked down or draining");
                self.note(PendingEvent::service(HealthEventKind::PanicEntered {
                    healthy,
                    eligible,
                }));
            } else {
                tracing::info!(service = %self.name, healthy, eligible, total = members.len(), "panic mode over");
                self.note(PendingEvent::service(HealthEventKind::PanicLeft {
                    healthy,
                    eligible,
                }));
            }
        }
        self.panic = panic;

        let wants_ring = strategy == LoadBalancingStrategy::ConsistentHash
            || self.slot.hash_wanted.load(Ordering::Relaxed);
        let ring = wants_ring.then(|| {
            let key = self
                .states
                .iter()
                .zip(&members)
                .map(|(state, m)| (ring_id(&state.endpoint), m.info.weight))
                .collect();
            let ch = &settings.config.consistent_hash;
            self.ring.ring_for(
                key,
                HashParams {
                    algorithm: ch.algorithm,
                    slots: ch.slots,
                    maglev_size: ch.maglev_table_size,
                },
            )
        });
        self.table_version += 1;
        let update = RoutingUpdate {
            service: self.name.to_string(),
            version: self.table_version,
            endpoints: members.iter().map(|m| (m.address, m.info.health)).collect(),
            routable: members.iter().filter(|m| m.routable).map(|m| m.address).collect(),
            panic,
            removed: false,
        };
        let failover = self.failover_order.as_ref().map(|order| {
            order
                .iter()
                .filter_map(|a| members.binary_search_by(|m| m.address.cmp(a)).ok())
                .map(|i| i as u32)
                .collect()
        });
        let table = Arc::new(build(
            &self.arena,
            TableInput {
                service: self.name.clone(),
                version: self.table_version,
                membership_version: self.membership_version,
                strategy,
                members,
                hash_slots: settings.hash_slots,
                ring,
                hash_algorithm: settings.config.consistent_hash.algorithm,
                balance_factor: settings.config.consistent_hash.balance_factor,
                panic,
                failover,
                plan,
                subsets,
            },
        ));
        let (total, routable) = (table.members.len(), table.routable_len());
        self.publish(table.clone(), now);
        self.live = table;
        self.built = true;
        self.dirty = false;
        tracing::debug!(
            service = %self.name,
            version = self.table_version,
            membership_version = self.membership_version,
            endpoints = total,
            routable,
            panic,
            %strategy,
            ring = wants_ring,
            build_us = started.elapsed().as_micros() as u64,
            "published routing table"
        );
        update
    }

    /// Which members are in this balancer's deterministic subset (all when subsetting is off,
    /// and when an operator took out every member of the subset).
    fn subset_mask(&self, settings: &Settings, members: &[MemberInput]) -> Vec<bool> {
        let Some((k, client)) = settings.subsetting else {
            return vec![true; members.len()];
        };
        let ids: Vec<Vec<u8>> = self
            .states
            .iter()
            .map(|state| {
                let id = ring_id(&state.endpoint);
                let mut bytes = [0u8; 4 + crate::table::ring::MAX_KEY_BYTES];
                let len = crate::table::ring::id_bytes(id.as_id(), &mut bytes);
                bytes[..len].to_vec()
            })
            .collect();
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let mask = subset_mask(&refs, client, k);
        let usable = members
            .iter()
            .zip(&mask)
            .any(|(m, &inside)| inside && !m.info.health.is_operator_decision());
        if usable { mask } else { vec![true; members.len()] }
    }

    /// Each priority level's healthy and eligible members, levels in order.
    fn level_health(&self, members: &[MemberInput], in_subset: &[bool]) -> Vec<LevelHealth> {
        let mut levels: std::collections::BTreeMap<u32, LevelHealth> = Default::default();
        for ((state, m), &inside) in self.states.iter().zip(members).zip(in_subset) {
            if !inside || m.info.health.is_operator_decision() {
                continue;
            }
            let level = levels.entry(state.endpoint.priority()).or_default();
            level.eligible += 1;
            level.healthy += u32::from(m.routable);
        }
        levels.into_values().collect()
    }

    /// The routing plan of priorities and locality for `members` (not in panic), if it
    /// restricts anything.
    fn plan(&self, settings: &Settings, members: &[MemberInput], in_subset: &[bool]) -> Option<PlanSpec> {
        let locality = &settings.locality;
        let mut zones: Vec<&str> = self.states.iter().filter_map(|s| s.endpoint.zone()).collect();
        zones.sort_unstable();
        zones.dedup();
        let plan_members: Vec<PlanMember> = self
            .states
            .iter()
            .zip(members)
            .zip(in_subset)
            .map(|((state, m), &inside)| {
                let endpoint = &state.endpoint;
                PlanMember {
                    level: endpoint.priority(),
                    zone: endpoint
                        .zone()
                        .and_then(|z| zones.binary_search(&z).ok())
                        .map(|z| z as u32),
                    local_zone: locality.zone.is_some() && endpoint.zone() == locality.zone.as_deref(),
                    local_region: locality.region.is_some()
                        && endpoint.region() == locality.region.as_deref(),
                    eligible: inside && !m.info.health.is_operator_decision(),
                    healthy: m.routable,
                    routable: m.routable,
                }
            })
            .collect();
        let client_zones: Option<Vec<f64>> = (!locality.client_zones.is_empty()).then(|| {
            zones
                .iter()
                .map(|z| f64::from(locality.client_zones.get(*z).copied().unwrap_or(0)))
                .collect()
        });
        plan_spec(
            &plan_members,
            &PlanSettings {
                mode: locality.mode,
                min_cluster_size: locality.min_cluster_size,
                panic_threshold: settings.config.panic_threshold_percent,
                overprovisioning_factor: settings.config.priority.overprovisioning_factor,
                client_zones: client_zones.as_deref(),
            },
        )
    }

    /// The `[subsets]` groups of the routable members, if selectors are configured.
    fn subsets_input(&self, settings: &Settings, members: &[MemberInput]) -> Option<SubsetsInput> {
        let config = &settings.config.subsets;
        if config.selectors.is_empty() {
            return None;
        }
        let selectors: Vec<Vec<String>> = config
            .selectors
            .iter()
            .map(|keys| {
                let mut keys = keys.clone();
                keys.sort();
                keys
            })
            .collect();
        let endpoints: Vec<&Endpoint> = self.states.iter().map(|s| &s.endpoint).collect();
        let specs = crate::table::subsets::group(&selectors, &endpoints, |i| members[i].routable);
        Some(SubsetsInput {
            selectors,
            specs,
            fallback: config.fallback,
            default: config.default_subset.clone(),
        })
    }

    /// Stores `table` as the service's current one, keeping the one it replaces until no
    /// picker holds it.
    fn publish(&mut self, table: Arc<ServiceTable>, now: Instant) {
        let old = self.slot.table.swap(table);
        self.old_tables.push(old);
        self.drop_unread_tables();
        if self.sweep_tick.is_none() && !self.old_tables.is_empty() {
            self.sweep_tick = Some(later(now, SWEEP_INTERVAL));
        }
    }

    /// Drops the kept tables nothing else holds any more (their views release their slots).
    fn drop_unread_tables(&mut self) {
        // A count of 1 is ours alone: the cell no longer has it and no loaded snapshot does
        // (arc-swap turns every outstanding load of a replaced value into a count before
        // `swap` returns), so none can appear.
        self.old_tables.retain(|t| Arc::strong_count(t) > 1);
    }

    /// Reads active health from the health checker; endpoints that recovered start their
    /// slow-start ramp.
    fn refresh_health(&mut self, sources: &Sources<'_>, now: Instant, ramp: bool) {
        let Some(health) = sources.health else { return };
        let unhealthy: HashSet<SocketAddr, ahash::RandomState> =
            health.unhealthy(&self.name).into_iter().collect();
        let mut recovered: Vec<SocketAddr> = self.unhealthy.difference(&unhealthy).copied().collect();
        recovered.sort_unstable();
        for recovered in recovered {
            tracing::info!(service = %self.name, endpoint = %recovered, "endpoint healthy again");
            if ramp {
                self.ramps.insert(recovered, now);
            }
            self.note(PendingEvent::endpoint(recovered, HealthEventKind::Healthy));
        }
        let mut failed: Vec<SocketAddr> = unhealthy.difference(&self.unhealthy).copied().collect();
        failed.sort_unstable();
        for failed in failed {
            let reason = health
                .status(&self.name, failed)
                .and_then(|s| s.last_error)
                .map(|r| short_reason(&r));
            tracing::warn!(service = %self.name, endpoint = %failed, reason = reason.as_deref().unwrap_or(""), "endpoint unhealthy: out of routing");
            self.note(PendingEvent::endpoint(
                failed,
                HealthEventKind::Unhealthy { reason },
            ));
        }
        self.unhealthy = unhealthy;
    }

    /// Keeps `ramp_tick` set while any member ramps.
    fn schedule_ramp(&mut self, settings: &Settings, now: Instant) {
        if self.ramps.is_empty() {
            self.ramp_tick = None;
        } else if self.ramp_tick.is_none() {
            let step = (settings.config.slow_start.window / 20)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            self.ramp_tick = Some(later(now, step));
        }
    }

    /// Drops health records of addresses that are no longer members.
    fn forget_departed(&mut self) {
        let states = &self.states;
        let is_member = |a: &SocketAddr| states.binary_search_by(|s| s.endpoint.address.cmp(a)).is_ok();
        self.ejections.retain(|a, _| is_member(a));
        self.ramps.retain(|a, _| is_member(a));
        self.unhealthy.retain(|a| is_member(a));
        self.down.retain(|a| is_member(a));
        self.draining.retain(|a| is_member(a));
    }

    /// Starts or stops draining `address`. Returns whether anything changed.
    pub(super) fn set_draining(&mut self, address: SocketAddr, draining: bool) -> bool {
        if self
            .states
            .binary_search_by(|s| s.endpoint.address.cmp(&address))
            .is_err()
        {
            return false;
        }
        let changed = if draining {
            self.draining.insert(address)
        } else {
            self.draining.remove(&address)
        };
        if changed {
            tracing::info!(service = %self.name, endpoint = %address, draining, "endpoint drain");
            let kind = if draining {
                HealthEventKind::Draining
            } else {
                HealthEventKind::Undrained
            };
            self.note(PendingEvent::endpoint(address, kind));
        }
        changed
    }

    /// Marks `address` down (or up again). Returns whether anything changed.
    pub(super) fn mark_down(&mut self, address: SocketAddr, down: bool) -> bool {
        if self
            .states
            .binary_search_by(|s| s.endpoint.address.cmp(&address))
            .is_err()
        {
            return false;
        }
        let changed = if down {
            self.down.insert(address)
        } else {
            self.down.remove(&address)
        };
        if changed {
            tracing::info!(service = %self.name, endpoint = %address, down, "endpoint marked by operator");
            let kind = if down {
                HealthEventKind::MarkedDown
            } else {
                HealthEventKind::MarkedUp
            };
            self.note(PendingEvent::endpoint(address, kind));
        }
        changed
    }

    /// Ejects `address` after a run of failures, unless the ejection cap is reached. Returns
    /// whether the table must be rebuilt.
    pub(super) fn eject(&mut self, address: SocketAddr, settings: &Settings, now: Instant) -> bool {
        let od = &settings.config.outlier_detection;
        let Ok(index) = self.states.binary_search_by(|s| s.endpoint.address.cmp(&address)) else {
            return false; // removed meanwhile
        };
        self.arena.record(self.states[index].slot).reset_failures();
        if !od.enabled {
            return false;
        }
        let active = self.ejections.values().filter(|e| e.until.is_some()).count();
        if self.ejections.get(&address).is_some_and(|e| e.until.is_some()) {
            return false;
        }
        let cap = ((self.states.len() as u64 * u64::from(od.max_ejection_percent)) / 100).max(1) as usize;
        if active >= cap {
            tracing::warn!(
                service = %self.name,
                endpoint = %address,
                ejected = active,
                max_ejection_percent = od.max_ejection_percent,
                "not ejecting: too many endpoints already ejected"
            );
            return false;
        }
        let e = self.ejections.entry(address).or_insert(Ejection {
            until: None,
            count: 0,
            changed: now,
        });
        let idle = now.saturating_duration_since(e.changed);
        let decay =
            (idle.as_nanos() / od.base_ejection_time.as_nanos().max(1)).min(u128::from(u32::MAX)) as u32;
        e.count = e.count.saturating_sub(decay) + 1;
        let duration = od
            .base_ejection_time
            .saturating_mul(e.count)
            .min(od.effective_max_ejection_time());
        e.until = Some(later(now, duration));
        e.changed = now;
        tracing::warn!(
            service = %self.name,
            endpoint = %address,
            consecutive_failures = od.consecutive_failures,
            ejections = e.count,
            ejected_for_ms = duration.as_millis() as u64,
            "endpoint ejected by outlier detection"
        );
        let ejections = e.count;
        self.note(PendingEvent::endpoint(
            address,
            HealthEventKind::Ejected { duration, ejections },
        ));
        true
    }

    /// Runs the timers due at `now`: ends ejections and advances ramps. Returns whether the
    /// table must be rebuilt.
    pub(super) fn tick(&mut self, settings: &Settings, now: Instant) -> bool {
        // Retired generations are swept (and released at their drain timeout) by the control
        // plane's sweep after every tick, whether or not the table changes.
        let mut changed = false;
        let ramp = !settings.config.slow_start.window.is_zero();
        let mut returned = Vec::new();
        for (address, e) in &mut self.ejections {
            if e.until.is_some_and(|until| until <= now) {
                e.until = None;
                e.changed = now;
                changed = true;
                returned.push(*address);
                tracing::info!(service = %self.name, endpoint = %address, "ejection over: endpoint back in routing");
                if let Ok(i) = self.states.binary_search_by(|s| s.endpoint.address.cmp(address)) {
                    self.arena.record(self.states[i].slot).reset_failures();
                }
                if ramp {
                    self.ramps.insert(*address, now);
                }
            }
        }
        returned.sort_unstable();
        self.note_all(
            returned
                .into_iter()
                .map(|a| PendingEvent::endpoint(a, HealthEventKind::Returned)),
        );
        if self.ramp_tick.is_some_and(|t| t <= now) {
            let window = settings.config.slow_start.window;
            self.ramps
                .retain(|_, start| now.saturating_duration_since(*start) < window);
            self.ramp_tick = None;
            changed = true; // weights moved (or a ramp ended)
        }
        self.schedule_ramp(settings, now);
        changed
    }

    /// When this service next needs [`tick`](Self::tick) (or a sweep, for departed
    /// endpoints still in use, given `drain_timeout`).
    pub(super) fn next_deadline(&self, drain_timeout: Duration) -> Option<Instant> {
        let ejection = self.ejections.values().filter_map(|e| e.until).min();
        let release = self
            .retiring
            .iter()
            .filter(|r| r.departed && !r.released)
            .filter_map(|r| r.since.checked_add(drain_timeout))
            .min();
        [
            ejection,
            self.ramp_tick,
            release,
            self.sweep_tick,
            Some(self.maintenance_tick),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Retires a generation. `stays` tells whether its address remains a member.
    fn retire(&mut self, state: MemberState, stays: bool, now: Instant) {
        self.arena.retire(state.slot);
        if !stays {
            self.note(PendingEvent::endpoint(
                state.endpoint.address,
                HealthEventKind::Removed,
            ));
        }
        self.retiring.push(Retiring {
            slot: state.slot,
            address: state.endpoint.address,
            since: now,
            departed: !stays,
            released: false,
        });
        if self.sweep_tick.is_none() {
            self.sweep_tick = Some(later(now, SWEEP_INTERVAL));
        }
    }

    /// Drops unread tables, recycles the slots nothing holds any more (folding their counters
    /// into the service's totals), and reports departed generations released: once nothing
    /// is in flight on them, or at `drain_timeout` with what is still in flight (their slots
    /// then wait for those requests). Returns the releases.
    pub(super) fn sweep(&mut self, now: Instant, drain_timeout: Duration) -> Vec<ReleasedEndpoint> {
        self.drop_unread_tables();
        let mut released = Vec::new();
        for recycled in self.arena.recycle() {
            let mut counters = CounterValues::from_slot(&recycled.counters);
            counters.latency = recycled.record.latency.snapshot();
            let address = recycled.record.endpoint.address;
            if self
                .states
                .binary_search_by(|m| m.endpoint.address.cmp(&address))
                .is_ok()
            {
                self.retired_members.entry(address).or_default().add(&counters);
            } else {
                if let Some(earlier) = self.retired_members.remove(&address) {
                    self.retired.add(&earlier);
                }
                self.retired.add(&counters);
            }
            if let Some(i) = self.retiring.iter().position(|r| r.slot == recycled.slot) {
                let r = self.retiring.swap_remove(i);
                if r.departed && !r.released {
                    released.push(ReleasedEndpoint {
                        address: r.address,
                        in_flight_abandoned: 0,
                        timed_out: false,
                    });
                }
            }
        }
        for r in &mut self.retiring {
            if r.departed && !r.released && now.saturating_duration_since(r.since) >= drain_timeout {
                r.released = true;
                released.push(ReleasedEndpoint {
                    address: r.address,
                    in_flight_abandoned: self.arena.counters(r.slot).in_flight,
                    timed_out: true,
                });
            }
        }
        self.sweep_tick =
            (!self.old_tables.is_empty() || !self.retiring.is_empty()).then(|| later(now, SWEEP_INTERVAL));
        self.note_all(released.iter().map(|r| {
            PendingEvent::endpoint(
                r.address,
                HealthEventKind::Released {
                    in_flight_abandoned: r.in_flight_abandoned,
                    timed_out: r.timed_out,
                },
            )
        }));
        released
    }

    /// Whether a sweep has something to do now: retired generations or kept tables to look
    /// at again, a departed generation's drain timeout reached.
    pub(super) fn sweep_due(&self) -> bool {
        !self.retiring.is_empty() || !self.old_tables.is_empty()
    }

    /// Folds selection counts now (see [`maintain`](Self::maintain)).
    pub(super) fn fold_selections(&self) {
        self.arena.fold_selections();
    }

    /// Folds selection counts and clears stale Peak-EWMA estimates, when due.
    pub(super) fn maintain(&mut self, now: Instant) {
        if now < self.maintenance_tick {
            return;
        }
        self.maintenance_tick = later(now, MAINTENANCE_INTERVAL);
        self.arena.fold_selections();
        if self.arena.context().decay.is_some() {
            let (table, ns) = (&self.live, now_ns());
            for i in 0..table.members.len() {
                for shard in 0..table.members.shards() {
                    expire(table.members.aux(i, shard), ns);
                }
            }
        }
    }

    /// Requests in flight on `address` now, over its current and retired generations, and
    /// whether that is final: whether every table older than `since_version` (in which the
    /// address may still have been routable) is gone, so no new request can start on it.
    pub(super) fn drain_status(&mut self, address: SocketAddr, since_version: u64) -> (u64, bool) {
        self.drop_unread_tables();
        let settled = self.old_tables.iter().all(|t| t.version >= since_version);
        let current = self
            .states
            .binary_search_by(|m| m.endpoint.address.cmp(&address))
            .ok()
            .map_or(0, |i| self.arena.counters(self.states[i].slot).in_flight);
        let retired: u64 = self
            .retiring
            .iter()
            .filter(|r| r.address == address)
            .map(|r| self.arena.counters(r.slot).in_flight)
            .sum();
        (current + retired, settled)
    }

    /// The version of the published table.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(super) fn table_version(&self) -> u64 {
        self.table_version
    }

    /// Records a health event, if anyone listens.
    fn note(&mut self, event: PendingEvent) {
        // Relaxed: set and read under the control plane's state lock.
        if self.listening.load(Ordering::Relaxed) {
            self.events.push(event);
        }
    }

    fn note_all(&mut self, events: impl IntoIterator<Item = PendingEvent>) {
        if self.listening.load(Ordering::Relaxed) {
            self.events.extend(events);
        }
    }

    /// Every current member leaves (the service was removed from the registry).
    pub(super) fn depart_all(&mut self) {
        let departed: Vec<PendingEvent> = self
            .states
            .iter()
            .map(|s| PendingEvent::endpoint(s.endpoint.address, HealthEventKind::Removed))
            .collect();
        self.note_all(departed);
    }

    /// Publishes a tombstone table.
    pub(super) fn bury(
        &mut self,
        miss: Miss,
        strategy: LoadBalancingStrategy,
        hash_slots: u32,
    ) -> RoutingUpdate {
        self.table_version += 1;
        let table = ServiceTable::empty(
            &self.arena,
            self.name.clone(),
            self.table_version,
            strategy,
            hash_slots,
            Some(miss),
        );
        self.publish(Arc::new(table), Instant::now());
        RoutingUpdate {
            service: self.name.to_string(),
            version: self.table_version,
            endpoints: Vec::new(),
            routable: Vec::new(),
            panic: false,
            removed: true,
        }
    }

    /// What a metrics read needs, taken under the control lock in O(retired generations).
    pub(super) fn snapshot(&mut self) -> ServiceSnapshot {
        let mut removed = self.retired.clone();
        let mut earlier = self.retired_members.clone();
        for r in &self.retiring {
            let mut counters = CounterValues::from_slot(&self.arena.counters(r.slot));
            counters.latency = self.arena.record(r.slot).latency.snapshot();
            if self
                .states
                .binary_search_by(|m| m.endpoint.address.cmp(&r.address))
                .is_ok()
            {
                earlier.entry(r.address).or_default().add(&counters);
            } else {
                removed.add(&counters);
            }
        }
        let published = self.slot.table.load();
        ServiceSnapshot {
            name: self.name.clone(),
            table: self.live.clone(),
            published: (published.version, published.membership_version, published.panic),
            removed,
            earlier,
            ejected: self
                .ejections
                .iter()
                .filter_map(|(a, e)| Some((*a, e.until?)))
                .collect(),
        }
    }
}

impl ServiceSnapshot {
    /// The service's counters, read outside the control lock: each member's counters from the
    /// table's view, its check status from `health`.
    pub(super) fn counters(
        self,
        strategy: LoadBalancingStrategy,
        health: Option<&dyn HealthSource>,
    ) -> ServiceCounters {
        let table = &self.table;
        let view = &table.members;
        let now = now_ns();
        let taken = Instant::now();
        let decay = view.context().decay;
        let endpoints = (0..view.len())
            .map(|i| {
                let record = view.record(i);
                let info = &table.info[i];
                let target = &view.entries()[i].payload;
                let mut counters = CounterValues::from_slot(&view.counters(i));
                counters.latency = record.latency.snapshot();
                let address = record.endpoint.address;
                if let Some(c) = self.earlier.get(&address) {
                    counters.add(c);
                }
                let latency_estimate = decay.and_then(|decay| {
                    let (sum, n) = (0..view.shards())
                        .map(|s| estimate_ns(view.aux(i, s), decay, now))
                        .filter(|&ns| ns > 0.0)
                        .fold((0.0, 0u32), |(sum, n), ns| (sum + ns, n + 1));
                    (n > 0).then(|| Duration::from_nanos((sum / f64::from(n)).min(u64::MAX as f64) as u64))
                });
                EndpointCounters {
                    endpoint: record.endpoint.clone(),
                    routable: target.routable() && self.published.0 == table.version,
                    health: info.health,
                    effective_weight: info.effective_weight,
                    ejections: info.ejections,
                    ejection_remaining: self
                        .ejected
                        .iter()
                        .find(|(a, _)| *a == address)
                        .map(|(_, until)| until.saturating_duration_since(taken)),
                    consecutive_failures: record.consecutive_failures(),
                    counters,
                    check: health.and_then(|h| h.status(&self.name, address)),
                    latency_estimate,
                }
            })
            .collect();
        let circuit_breaker = view.context().breaker.as_ref().map(|b| {
            let counts = b.counts();
            let at = |l: CircuitLimit| counts.active[l.index()];
            CircuitBreakerMetrics {
                limits: counts.limits,
                requests: at(CircuitLimit::MaxRequests),
                pending: at(CircuitLimit::MaxPending),
                retries: at(CircuitLimit::MaxRetries),
                connections: at(CircuitLimit::MaxConnectionsPerEndpoint),
                refused: counts.open,
            }
        });
        ServiceCounters {
            name: self.name,
            strategy,
            table_version: self.published.0,
            membership_version: self.published.1,
            panic: self.published.2,
            endpoints,
            removed: self.removed,
            circuit_breaker,
        }
    }
}

impl CounterValues {
    /// The counts of one slot (the latency histogram is read separately).
    pub(crate) fn from_slot(c: &SlotCounters) -> CounterValues {
        CounterValues {
            in_flight: c.in_flight,
            selections: c.selections,
            successes: c.successes,
            failures: c.failures,
            latency: Default::default(),
        }
    }
}
