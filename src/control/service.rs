//! Control-plane bookkeeping of one service: its membership, endpoint generations, health
//! (active results, ejections, slow-start ramps) and the tables built from them.
//!
//! # Invariants
//!
//! * `states` is in address order, one generation per current member; `endpoints` is the
//!   membership they were built from.
//! * A member is *healthy* when its active checks pass and it is not ejected; it is
//!   *routable* when healthy, or when the service is in panic (fewer than
//!   `panic_threshold_percent` of the members not marked down or draining are healthy), in
//!   which case every member not marked down or draining is. An operator's decision always
//!   holds: marked-down and draining members are never routable.
//! * Health never changes the consistent-hash ring (it is a function of addresses and
//!   registered weights), so health flaps move no keys of healthy endpoints.
//! * Ejection and ramp records exist only for current members.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Settings, Sources};
use crate::config::strategy::LoadBalancingStrategy;
use crate::endpoint::Endpoint;
use crate::stats::ReleasedEndpoint;
use crate::stats::{EndpointCounters, EndpointHealth, RoutingUpdate, ServiceCounters};
use crate::sync::atomic::Ordering;
use crate::sync::{Arc, DataArc};
use crate::table::build::{RingCache, TableInput, build};
use crate::table::{
    CounterValues, EndpointState, Member, MemberHealth, Miss, OutlierReport, ServiceSlot, ServiceTable,
};

/// `now + d`, saturating instead of overflowing: validated durations are bounded (a day at
/// most), so this only guards against a bound being raised without a look at this sum.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// A retired endpoint generation waiting for its guards.
pub(super) struct Retiring {
    state: Arc<EndpointState>,
    since: Instant,
    /// The address left the service (not just a metadata change): its release is reported.
    departed: bool,
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

pub(super) struct ServiceControl {
    pub(super) name: DataArc<str>,
    pub(super) slot: DataArc<ServiceSlot>,
    pub(super) membership_version: u64,
    pub(super) endpoints: DataArc<[Endpoint]>,
    /// Current members' states, in address order.
    states: Vec<Arc<EndpointState>>,
    ring: RingCache,
    table_version: u64,
    /// Retired generations still referenced by an old table or a guard, with when they
    /// retired and whether their address left the service.
    pub(super) retiring: Vec<Retiring>,
    /// Final counters of dropped generations whose address is still a member.
    retired_members: HashMap<SocketAddr, CounterValues, ahash::RandomState>,
    /// Final counters of dropped generations of addresses no longer members.
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
    /// Whether a table was built from a membership yet (members of the first one do not
    /// slow-start: nothing was serving before them).
    built: bool,
    panic: bool,
    pub(super) dirty: bool,
}

impl ServiceControl {
    pub(super) fn new(name: DataArc<str>, strategy: LoadBalancingStrategy, hash_slots: u32) -> Self {
        let table = ServiceTable::empty(name.clone(), 0, strategy, hash_slots, None);
        let slot = DataArc::new(ServiceSlot::new(
            table,
            strategy == LoadBalancingStrategy::ConsistentHash,
        ));
        Self {
            name,
            slot,
            membership_version: 0,
            endpoints: DataArc::from(Vec::new()),
            states: Vec::new(),
            ring: RingCache::default(),
            table_version: 0,
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
            built: false,
            panic: false,
            dirty: true,
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
        let shards = crate::sync::shard_count();
        let slow_start = &settings.config.slow_start;
        let rtt_decay =
            (strategy == LoadBalancingStrategy::PeakEwma).then_some(settings.config.peak_ewma.decay);
        self.refresh_health(sources, now, slow_start.window > Duration::ZERO);

        // Merge the sorted previous states with the sorted new membership: keep the state of
        // every endpoint that stays as it was, start a generation for new or changed ones,
        // retire the rest.
        let previous = std::mem::take(&mut self.states);
        let mut previous = previous.into_iter().peekable();
        let mut states = Vec::with_capacity(self.endpoints.len());
        let endpoints = self.endpoints.clone();
        for endpoint in endpoints.iter() {
            while let Some(old) = previous.next_if(|s| s.address() < endpoint.address) {
                self.retire(old, false);
            }
            let state = match previous.next_if(|s| s.address() == endpoint.address) {
                Some(old) if old.endpoint() == endpoint => old,
                Some(old) => {
                    self.retire(old, true);
                    Arc::new(EndpointState::new(
                        endpoint.clone(),
                        shards,
                        self.report(settings),
                        rtt_decay,
                    ))
                }
                None => {
                    if self.built && !slow_start.window.is_zero() {
                        self.ramps.insert(endpoint.address, now);
                    }
                    Arc::new(EndpointState::new(
                        endpoint.clone(),
                        shards,
                        self.report(settings),
                        rtt_decay,
                    ))
                }
            };
            states.push(state);
        }
        for old in previous {
            self.retire(old, false);
        }
        self.states = states;
        self.forget_departed();
        self.schedule_ramp(settings, now);

        // Health, weights, panic.
        let scale = if slow_start.window.is_zero() { 1 } else { 100 };
        let mut members: Vec<Member> = self
            .states
            .iter()
            .map(|state| {
                let address = state.address();
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
                let weight = state.endpoint().weight();
                let factor = self.ramps.get(&address).map_or(1.0, |start| {
                    slow_start.factor(now.saturating_duration_since(*start))
                });
                let effective = (f64::from(weight) * f64::from(scale) * factor).round().max(1.0) as u32;
                Member {
                    state: state.clone(),
                    weight,
                    effective_weight: effective,
                    health,
                    routable: health == MemberHealth::Healthy,
                }
            })
            .collect();
        // Panic mode is about health (active checks and outlier ejection), never about what
        // an operator decided: marked-down and draining members are left out of the count and
        // stay out of routing in panic (as Envoy leaves its excluded hosts out).
        let healthy = members.iter().filter(|m| m.routable).count();
        let eligible = members
            .iter()
            .filter(|m| !m.health.is_operator_decision())
            .count();
        let threshold = u64::from(settings.config.panic_threshold_percent);
        let panic = eligible > 0 && (healthy as u64) * 100 < threshold * eligible as u64;
        if panic {
            for m in &mut members {
                m.routable = !m.health.is_operator_decision();
            }
        }
        if panic != self.panic {
            if panic {
                tracing::warn!(service = %self.name, healthy, eligible, total = members.len(), "panic mode: routing to every endpoint not marked down or draining");
            } else {
                tracing::info!(service = %self.name, healthy, eligible, total = members.len(), "panic mode over");
            }
        }
        self.panic = panic;

        let wants_ring = strategy == LoadBalancingStrategy::ConsistentHash
            || self.slot.hash_wanted.load(Ordering::Relaxed);
        let ring = wants_ring.then(|| self.ring.ring_for(&members, settings.hash_slots));
        self.table_version += 1;
        let update = RoutingUpdate {
            service: self.name.to_string(),
            version: self.table_version,
            endpoints: members.iter().map(|m| (m.state.address(), m.health)).collect(),
            routable: members
                .iter()
                .filter(|m| m.routable)
                .map(|m| m.state.address())
                .collect(),
            panic,
            removed: false,
        };
        let failover = self.failover_order.as_ref().map(|order| {
            order
                .iter()
                .filter_map(|a| members.binary_search_by(|m| m.state.address().cmp(a)).ok())
                .map(|i| i as u32)
                .collect()
        });
        let table = build(TableInput {
            service: self.name.clone(),
            version: self.table_version,
            membership_version: self.membership_version,
            strategy,
            members,
            hash_slots: settings.hash_slots,
            ring,
            shards,
            panic,
            failover,
        });
        let (total, routable) = (table.members.len(), table.routable_len());
        self.slot.table.store(Arc::new(table));
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

    fn report(&self, settings: &Settings) -> Option<OutlierReport> {
        let od = &settings.config.outlier_detection;
        od.enabled.then(|| OutlierReport {
            sink: settings.outlier_sink.clone(),
            service: self.name.clone(),
            threshold: u64::from(od.consecutive_failures),
        })
    }

    /// Reads active health from the health checker; endpoints that recovered start their
    /// slow-start ramp.
    fn refresh_health(&mut self, sources: &Sources<'_>, now: Instant, ramp: bool) {
        let Some(health) = sources.health else { return };
        let unhealthy: HashSet<SocketAddr, ahash::RandomState> =
            health.unhealthy(&self.name).into_iter().collect();
        for recovered in self.unhealthy.difference(&unhealthy) {
            tracing::info!(service = %self.name, endpoint = %recovered, "endpoint healthy again");
            if ramp {
                self.ramps.insert(*recovered, now);
            }
        }
        for failed in unhealthy.difference(&self.unhealthy) {
            tracing::warn!(service = %self.name, endpoint = %failed, "endpoint unhealthy: out of routing");
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
        let is_member = |a: &SocketAddr| states.binary_search_by(|s| s.address().cmp(a)).is_ok();
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
            .binary_search_by(|s| s.address().cmp(&address))
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
        }
        changed
    }

    /// Marks `address` down (or up again). Returns whether anything changed.
    pub(super) fn mark_down(&mut self, address: SocketAddr, down: bool) -> bool {
        if self
            .states
            .binary_search_by(|s| s.address().cmp(&address))
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
        }
        changed
    }

    /// Ejects `address` after a run of failures, unless the ejection cap is reached. Returns
    /// whether the table must be rebuilt.
    pub(super) fn eject(&mut self, address: SocketAddr, settings: &Settings, now: Instant) -> bool {
        let od = &settings.config.outlier_detection;
        let Ok(index) = self.states.binary_search_by(|s| s.address().cmp(&address)) else {
            return false; // removed meanwhile
        };
        let state = self.states[index].clone();
        state.failures().reset();
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
        true
    }

    /// Runs the timers due at `now`: ends ejections and advances ramps. Returns whether the
    /// table must be rebuilt.
    pub(super) fn tick(&mut self, settings: &Settings, now: Instant) -> bool {
        let drain_timeout = settings.config.rebalance.strategy.drain_timeout();
        // A departed endpoint past its drain timeout is released by the sweep a rebuild runs.
        let mut changed = self
            .retiring
            .iter()
            .any(|r| r.departed && now.saturating_duration_since(r.since) >= drain_timeout);
        let ramp = !settings.config.slow_start.window.is_zero();
        for (address, e) in &mut self.ejections {
            if e.until.is_some_and(|until| until <= now) {
                e.until = None;
                e.changed = now;
                changed = true;
                tracing::info!(service = %self.name, endpoint = %address, "ejection over: endpoint back in routing");
                if let Ok(i) = self.states.binary_search_by(|s| s.address().cmp(address)) {
                    self.states[i].failures().reset();
                }
                if ramp {
                    self.ramps.insert(*address, now);
                }
            }
        }
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
            .filter(|r| r.departed)
            .filter_map(|r| r.since.checked_add(drain_timeout))
            .min();
        [ejection, self.ramp_tick, release].into_iter().flatten().min()
    }

    /// Retires a generation. `stays` tells whether its address remains a member.
    fn retire(&mut self, state: Arc<EndpointState>, stays: bool) {
        if !stays {
            if let Some(c) = self.retired_members.remove(&state.address()) {
                self.retired.add(&c);
            }
        }
        self.retiring.push(Retiring {
            state,
            since: Instant::now(),
            departed: !stays,
        });
    }

    /// Folds retired generations that nothing refers to any more into the retired totals,
    /// and releases departed ones still in use after `drain_timeout` (their late counter
    /// updates are then lost). Returns the releases of departed endpoints.
    pub(super) fn sweep(&mut self, now: Instant, drain_timeout: Duration) -> Vec<ReleasedEndpoint> {
        let members = &self.states;
        let retired_members = &mut self.retired_members;
        let retired = &mut self.retired;
        let mut released = Vec::new();
        self.retiring.retain(|r| {
            let referenced = EndpointState::is_referenced(&r.state);
            let timed_out =
                referenced && r.departed && now.saturating_duration_since(r.since) >= drain_timeout;
            if referenced && !timed_out {
                return true;
            }
            let counters = r.state.counters();
            let address = r.state.address();
            if members.binary_search_by(|m| m.address().cmp(&address)).is_ok() {
                retired_members.entry(address).or_default().add(&counters);
            } else {
                retired.add(&counters);
            }
            if r.departed {
                released.push(ReleasedEndpoint {
                    address,
                    in_flight_abandoned: if timed_out { counters.in_flight } else { 0 },
                    timed_out,
                });
            }
            false
        });
        released
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
            self.name.clone(),
            self.table_version,
            strategy,
            hash_slots,
            Some(miss),
        );
        self.slot.table.store(Arc::new(table));
        RoutingUpdate {
            service: self.name.to_string(),
            version: self.table_version,
            endpoints: Vec::new(),
            routable: Vec::new(),
            panic: false,
            removed: true,
        }
    }

    /// Counters of the service (live endpoints one by one, removed ones folded together).
    pub(super) fn counters(&mut self, sources: &Sources<'_>) -> ServiceCounters {
        let table = self.slot.table.load();
        let mut removed = self.retired.clone();
        let mut earlier: HashMap<SocketAddr, CounterValues, ahash::RandomState> =
            self.retired_members.clone();
        for r in &self.retiring {
            let address = r.state.address();
            if self
                .states
                .binary_search_by(|m| m.address().cmp(&address))
                .is_ok()
            {
                earlier.entry(address).or_default().add(&r.state.counters());
            } else {
                removed.add(&r.state.counters());
            }
        }
        // `states` and a live table's `members` are built in the same (address) order; a
        // tombstone has no members, and nothing in it is routable.
        let endpoints = self
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let member = table.members.get(i);
                let mut counters = s.counters();
                if let Some(c) = earlier.get(&s.address()) {
                    counters.add(c);
                }
                EndpointCounters {
                    endpoint: s.endpoint().clone(),
                    routable: member.is_some_and(|m| m.routable),
                    health: member.map_or(EndpointHealth::Healthy, |m| m.health),
                    effective_weight: member.map_or(s.endpoint().weight(), |m| m.effective_weight),
                    ejections: self.ejections.get(&s.address()).map_or(0, |e| e.count),
                    consecutive_failures: s.failures().consecutive(),
                    counters,
                    check: sources.health.and_then(|h| h.status(&self.name, s.address())),
                    latency_estimate: s.latency_estimate(),
                }
            })
            .collect();
        ServiceCounters {
            name: self.name.clone(),
            strategy: table.strategy,
            table_version: table.version,
            membership_version: table.membership_version,
            panic: table.panic,
            endpoints,
            removed,
        }
    }
}
