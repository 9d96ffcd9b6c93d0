//! The load balancer: the read path users call, and the handle that owns a control plane.
//!
//! This module owns [`IntegratedLoadBalancer`] and [`ServiceHandle`]. The read path is:
//!
//! 1. load the service [`Directory`] (one wait-free snapshot load) and find the service's
//!    slot with one hash lookup, or skip both by holding a [`ServiceHandle`];
//! 2. load the slot's current table (one wait-free snapshot load);
//! 3. let the strategy choose among the table's routable endpoints ([`crate::pick`]);
//! 4. count the selection on the endpoint's own atomics and, for a [`Pick`], clone its `Arc`.
//!
//! No step takes a lock, allocates, awaits or depends on the number of endpoints, and
//! nothing here writes a table: writes go through the registry to the control plane.
//!
//! # Invariants
//!
//! * A decision uses one table version from load to return.
//! * After [`stop`](IntegratedLoadBalancer::stop) every pick fails with [`Error::Stopped`].
#![deny(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::affinity::{AffinityManager, fingerprint};
use crate::config::affinity::{AffinityRequest, validate_key};
use crate::control::{ControlPlane, Settings, Sources};
use crate::endpoint::Endpoint;
use crate::error::CircuitLimit;
use crate::handoff::queue::Ack;
use crate::handoff::{Command, MembershipSink, OutlierSink};
#[cfg(feature = "runtime")]
use crate::health::HealthCheckManager;
use crate::pick::{Chosen, Outcome, Pick, SubsetChoice, bound_under_cap, choose, choose_subset, hash_owner};
use crate::registry::ServiceRegistry;
use crate::stats::EndpointHealth;
use crate::stats::{LoadBalancerMetrics, RoutingUpdate};
use crate::sync::atomic::Ordering;
use crate::sync::{DataArc, DataWeak, mpsc, name_cache, thread_ordinal};
use crate::table::ring::hash_key;
use crate::table::subsets::SubsetMiss;
use crate::table::{Directory, DirectoryCell, MemberHealth, Miss, ServiceSlot, ServiceTable, report};
use crate::{Error, LoadBalancerConfig, LoadBalancingStrategy};

// ===== impl Shared =====

/// What the balancer, its handles and its control thread share.
pub(crate) struct Shared {
    pub(crate) directory: DirectoryCell,
    pub(crate) control: ControlPlane,
    /// Where memberships are read from. The registry holds only a `Weak` to this.
    pub(crate) registry: DataArc<ServiceRegistry>,
    /// This balancer's active health checker.
    #[cfg(feature = "runtime")]
    pub(crate) health: HealthCheckManager,
    /// Session-affinity bindings.
    pub(crate) affinity: AffinityManager,
    /// Topology events and key moves.
    #[cfg(feature = "runtime")]
    pub(crate) rebalancer: crate::rebalance::RebalanceManager,
    /// Samples for `requests_per_second`.
    pub(crate) rate: crate::stats::RateWindow,
    /// The JSON-lines file sink of health events, when `health_events.log_path` is set.
    event_log: crate::sync::Mutex<Option<crate::events::log::EventLog>>,
    /// This balancer's id in the per-thread name cache.
    cache_id: u64,
}

impl MembershipSink for Shared {
    fn submit(&self, command: Command) -> Ack {
        self.control.submit(command)
    }

    fn help(&self) {
        self.control.help(&self.sources(), &self.directory);
    }

    fn is_closed(&self) -> bool {
        self.control.is_closed()
    }
}

impl OutlierSink for Shared {
    fn consecutive_failures(&self, service: &DataArc<str>, address: SocketAddr) {
        self.control.submit_unacked(Command::Outlier {
            service: service.clone(),
            address,
        });
    }
}

#[cfg(feature = "runtime")]
impl crate::handoff::HealthSink for Shared {
    fn health_changed(&self, service: &DataArc<str>) {
        self.control
            .submit_unacked(Command::HealthChanged(service.clone()));
    }
}

#[cfg(feature = "runtime")]
impl crate::rebalance::RebalanceHost for Shared {
    fn subscribe(&self, watcher: crate::handoff::Watcher) {
        self.control.subscribe(watcher);
    }

    fn topology(&self) -> Vec<(String, Vec<(SocketAddr, EndpointHealth)>)> {
        self.current_topology()
    }

    fn strategy(&self) -> crate::RebalanceStrategy {
        self.control.settings().config.rebalance.strategy.clone()
    }

    fn routable_set(&self, service: &str) -> Result<(u64, std::collections::HashSet<SocketAddr>), Error> {
        Shared::routable_set(self, service)
    }

    fn affinity(&self) -> &AffinityManager {
        &self.affinity
    }

    fn drain_status(&self, service: &str, address: SocketAddr, since_version: u64) -> Option<(u64, bool)> {
        self.control.drain_status(service, address, since_version)
    }
}

impl Shared {
    /// Builds the shared state; the control plane reports failure runs back to it through a
    /// `Weak`, so it is built cyclically.
    pub(crate) fn new(
        registry: DataArc<ServiceRegistry>,
        config: LoadBalancerConfig,
        strategy: LoadBalancingStrategy,
    ) -> Result<DataArc<Self>, Error> {
        let affinity = AffinityManager::new(config.affinity.clone())?;
        // Resolved up front (the environment read once): a missing local zone or client id
        // is this call's typed error.
        let locality = config.locality.resolve()?;
        let subsetting = config.subsetting.resolve()?;
        if let Some(warning) = config.subsets.warnings() {
            tracing::warn!("[subsets]: {warning}");
        }
        Ok(DataArc::new_cyclic(|me: &DataWeak<Shared>| {
            let outlier_sink: DataWeak<dyn OutlierSink> = me.clone();
            #[cfg(feature = "runtime")]
            let health = HealthCheckManager::create(registry.clone(), config.health_check.clone());
            Self {
                directory: DirectoryCell::new(),
                control: ControlPlane::new(Settings::with(
                    config,
                    strategy,
                    outlier_sink,
                    locality,
                    subsetting,
                )),
                registry,
                #[cfg(feature = "runtime")]
                health,
                affinity,
                #[cfg(feature = "runtime")]
                rebalancer: crate::rebalance::RebalanceManager::new(me.clone()),
                rate: crate::stats::RateWindow::default(),
                event_log: crate::sync::Mutex::new(None),
                cache_id: name_cache::owner_id(),
            }
        }))
    }

    /// Every service's members and their health in the current snapshots.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn current_topology(&self) -> Vec<(String, Vec<(SocketAddr, EndpointHealth)>)> {
        self.directory
            .load()
            .services
            .iter()
            .map(|(name, slot)| {
                let table = slot.table.load();
                let members = (0..table.members.len())
                    .map(|i| (table.member_address(i), table.info[i].health))
                    .collect();
                (name.to_string(), members)
            })
            .collect()
    }

    /// The routable members of `service` now (healthy, not draining), with the table version.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn routable_set(
        &self,
        service: &str,
    ) -> Result<(u64, std::collections::HashSet<SocketAddr>), Error> {
        let directory = self.directory.load();
        let slot = Self::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        if let Some(miss) = table.miss {
            return Err(miss_error(&table, miss));
        }
        let set = table
            .routable
            .entries()
            .iter()
            .map(|e| table.address(&e.payload))
            .collect();
        Ok((table.version, set))
    }

    /// The endpoint `key` is bound to if that endpoint is still routable; otherwise the key's
    /// consistent-hash owner, which becomes the new binding. Returns the decision (with its
    /// lease if `hold` and bounded loads took one).
    #[inline]
    fn choose_with_affinity<'t>(
        &self,
        table: &'t ServiceTable,
        slot: &ServiceSlot,
        key: &str,
        shard: usize,
        hold: bool,
    ) -> Result<Chosen<'t>, Error> {
        let fp = fingerprint(&table.service, key);
        if let Some(binding) = self.affinity.lookup(fp) {
            let address = binding.endpoint.address;
            let index = binding.hint(table.version).or_else(|| {
                let i = table.member_index(address)?;
                binding.set_hint(table.version, i);
                Some(i)
            });
            if let Some(i) = index {
                // A draining endpoint keeps its sticky keys unless the strategy moves them at
                // once (they then move in batches or on `rebalance_service`).
                let sticky_draining = table.info[i].health == MemberHealth::Draining
                    && self
                        .control
                        .settings()
                        .config
                        .rebalance
                        .strategy
                        .sticky_while_draining();
                if table.members.entries()[i].payload.routable() || sticky_draining {
                    // Bounded loads: a hot key whose endpoint is at the cap spills this
                    // request along the ring; the key stays bound to its endpoint.
                    return match bound_under_cap(table, i, shard, hold) {
                        Ok(held) => Ok(Chosen {
                            view: &table.members,
                            index: i,
                            held,
                        }),
                        Err(_) => self.choose(table, slot, Some(hash_key(key)), shard, hold),
                    };
                }
            }
            self.affinity.note_moved();
        }
        let hash = hash_key(key);
        let chosen = self.choose(table, slot, Some(hash), shard, hold)?;
        // A new key is bound to its consistent-hash owner (so every balancer of a fleet binds
        // it alike), even when bounded loads route this one request elsewhere.
        let (bound_view, bound) = match table.balance_factor {
            Some(_) => hash_owner(table, hash),
            None => (chosen.view, chosen.index),
        };
        self.affinity
            .insert(&table.service, fp, table.endpoint(bound_view, bound));
        Ok(chosen)
    }

    /// What the control plane reads from.
    pub(crate) fn sources(&self) -> Sources<'_> {
        #[cfg(feature = "runtime")]
        let health = self
            .control
            .settings()
            .config
            .health_check
            .enabled
            .then(|| self.health.source());
        #[cfg(not(feature = "runtime"))]
        let health = None;
        Sources {
            membership: &*self.registry,
            health,
        }
    }

    fn shutdown(&self) -> bool {
        #[cfg(feature = "runtime")]
        self.health.stop_now();
        let stopped = self.control.shutdown(&self.sources(), &self.directory);
        // After the control plane: the log writes everything it decided, then ends.
        let log = self.event_log.lock().take();
        if let Some(log) = log {
            log.stop();
        }
        stopped
    }

    /// Runs `f` on the slot of `service`, found through the calling thread's name cache:
    /// while the directory is unchanged, a repeated name costs a comparison, not a
    /// snapshot load and a hash lookup.
    #[inline]
    fn by_name<R>(
        &self,
        service: &str,
        f: impl FnOnce(&ServiceSlot) -> Result<R, Error>,
    ) -> Result<R, Error> {
        // Read before the directory (see `DirectoryCell::version`).
        let version = self.directory.version();
        let mut f = Some(f);
        let cached = name_cache::with(self.cache_id, version, service, |slot: &ServiceSlot| {
            // `f` is still there: `with` calls this at most once.
            f.take().map(|f| f(slot))
        });
        if let Some(Some(result)) = cached {
            return result;
        }
        let directory = self.directory.load();
        let (name, slot) = match directory.services.get_key_value(service) {
            Some(found) => found,
            None => return Err(unknown(&directory, service)),
        };
        name_cache::put(self.cache_id, version, name.clone(), slot.clone());
        match f.take() {
            Some(f) => f(slot),
            None => unreachable!("the cached lookup did not run"),
        }
    }

    #[inline]
    fn slot_by_name<'d>(directory: &'d Directory, service: &str) -> Result<&'d ServiceSlot, Error> {
        match directory.get(service) {
            Some(slot) => Ok(slot),
            None => Err(unknown(directory, service)),
        }
    }

    /// A guarded pick from `slot`.
    #[inline]
    pub(crate) fn pick(&self, slot: &ServiceSlot, hash: Option<u64>) -> Result<Pick, Error> {
        let table = slot.table.load();
        let shard = thread_ordinal();
        let ticket = Ticket::admit(&table)?;
        Ok(self
            .choose(&table, slot, hash, shard, true)?
            .into_pick(&table, shard, ticket.keep()))
    }

    /// An unguarded selection from `slot`.
    #[inline]
    pub(crate) fn select(&self, slot: &ServiceSlot, hash: Option<u64>) -> Result<Endpoint, Error> {
        let table = slot.table.load();
        let shard = thread_ordinal();
        Ticket::check(&table)?;
        let Chosen { view, index, .. } = self.choose(&table, slot, hash, shard, false)?;
        view.note_selection(index, shard);
        Ok(table.endpoint(view, index))
    }

    #[inline]
    fn choose<'t>(
        &self,
        table: &'t ServiceTable,
        slot: &ServiceSlot,
        hash: Option<u64>,
        shard: usize,
        hold: bool,
    ) -> Result<Chosen<'t>, Error> {
        match choose(table, slot, hash, shard, hold) {
            Ok(chosen) => {
                if hash.is_some() && table.ring.is_none() {
                    self.want_ring(slot, table);
                }
                Ok(chosen)
            }
            Err(miss) => Err(miss_error(table, miss)),
        }
    }

    /// A guarded pick from the metadata subset `pairs` names (see `[subsets]`).
    #[inline]
    pub(crate) fn pick_subset(&self, slot: &ServiceSlot, pairs: &[(&str, &str)]) -> Result<Pick, Error> {
        let table = slot.table.load();
        let shard = thread_ordinal();
        let ticket = Ticket::admit(&table)?;
        match choose_subset(&table, slot, pairs, shard) {
            Ok(chosen) => Ok(chosen.into_pick(&table, shard, ticket.keep())),
            Err(why) => Err(self.subset_error(&table, pairs, why)),
        }
    }

    /// An unguarded selection from the metadata subset `pairs` names.
    #[inline]
    pub(crate) fn select_subset(
        &self,
        slot: &ServiceSlot,
        pairs: &[(&str, &str)],
    ) -> Result<Endpoint, Error> {
        let table = slot.table.load();
        let shard = thread_ordinal();
        Ticket::check(&table)?;
        match choose_subset(&table, slot, pairs, shard) {
            Ok(Chosen { view, index, .. }) => {
                view.note_selection(index, shard);
                Ok(table.endpoint(view, index))
            }
            Err(why) => Err(self.subset_error(&table, pairs, why)),
        }
    }

    #[cold]
    fn subset_error(&self, table: &ServiceTable, pairs: &[(&str, &str)], why: SubsetChoice) -> Error {
        let describe = |pairs: &[(&str, &str)]| {
            let mut sorted: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            sorted.sort();
            format!("{{{}}}", sorted.join(", "))
        };
        match why {
            SubsetChoice::Miss(miss) => miss_error(table, miss),
            SubsetChoice::Subset(SubsetMiss::UnknownSelector) => {
                let mut keys: Vec<&str> = pairs.iter().map(|p| p.0).collect();
                keys.sort_unstable();
                Error::UnknownSubsetSelector {
                    keys: format!("{keys:?}"),
                    configured: format!("{:?}", self.control.settings().config.subsets.selectors),
                }
            }
            SubsetChoice::Subset(_) => Error::NoSubsetMatch {
                service: table.service.to_string(),
                subset: describe(pairs),
            },
        }
    }

    /// Asks the control plane, once per service, to carry a ring in this service's tables.
    #[cold]
    fn want_ring(&self, slot: &ServiceSlot, table: &ServiceTable) {
        // Relaxed: the flag only deduplicates requests; the control plane reads it under its
        // lock after taking the command, which the queue's lock orders after this swap.
        if !slot.hash_wanted.swap(true, Ordering::Relaxed) {
            self.control
                .submit_unacked(Command::WantRing(table.service.clone()));
        }
    }
}

/// A guarded pick's place under the service's circuit-breaker `max_requests`, taken before
/// the decision and given back if the decision fails (or handed to the [`Pick`]).
struct Ticket<'t>(Option<&'t crate::breaker::Breaker>);

impl<'t> Ticket<'t> {
    /// Takes a place if the service limits its requests (after the misses of a stopped or
    /// removed service, which answer as they would without a breaker).
    #[inline]
    fn admit(table: &'t ServiceTable) -> Result<Ticket<'t>, Error> {
        let Some(breaker) = &table.members.context().breaker else {
            return Ok(Ticket(None));
        };
        if let Some(miss) = table.miss {
            return Err(miss_error(table, miss));
        }
        Ok(Ticket(
            breaker.admit(CircuitLimit::MaxRequests)?.then_some(&**breaker),
        ))
    }

    /// For an unguarded selection: refused while the service is at its limit (it holds
    /// nothing, so it takes no place).
    #[inline]
    fn check(table: &ServiceTable) -> Result<(), Error> {
        match &table.members.context().breaker {
            Some(breaker) if table.miss.is_none() => breaker.check(CircuitLimit::MaxRequests),
            _ => Ok(()),
        }
    }

    /// Hands the place to the pick: whether it holds one.
    #[inline]
    fn keep(mut self) -> bool {
        self.0.take().is_some()
    }
}

impl Drop for Ticket<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.release(CircuitLimit::MaxRequests);
        }
    }
}

/// The index of member `address` of `table`, or why there is none.
fn member(table: &ServiceTable, address: SocketAddr) -> Result<usize, Error> {
    if let Some(miss) = table.miss {
        return Err(miss_error(table, miss));
    }
    table.member_index(address).ok_or_else(|| Error::UnknownEndpoint {
        service: table.service.clone(),
        address,
    })
}

#[cold]
fn unknown(directory: &Directory, service: &str) -> Error {
    if directory.stopped {
        Error::Stopped
    } else {
        Error::unknown_service(service)
    }
}

#[cold]
fn miss_error(table: &ServiceTable, miss: Miss) -> Error {
    match miss {
        Miss::NoEndpoints => Error::NoEndpoints {
            service: table.service.clone(),
        },
        Miss::NoHealthy => Error::NoHealthyEndpoints {
            service: table.service.clone(),
            total: table.members.len(),
        },
        Miss::Stopped => Error::Stopped,
        Miss::Removed => Error::UnknownService {
            service: table.service.clone(),
        },
    }
}

// ===== impl IntegratedLoadBalancer =====

/// A client-side load balancer attached to a [`ServiceRegistry`].
///
/// It routes every service of its registry with one [`LoadBalancingStrategy`] (per-service
/// overrides in [`LoadBalancerConfig::services`]). Two APIs read the same wait-free routing
/// snapshots:
///
/// * the seed's async API, [`next_endpoint`](Self::next_endpoint) and
///   [`next_endpoint_with_hash`](Self::next_endpoint_with_hash): ready at once, never waiting
///   on a lock or a channel;
/// * the synchronous hot path, [`pick`](Self::pick) (an RAII [`Pick`] guard that holds the
///   request in flight, for least-connections and draining) and [`select`](Self::select), or
///   the same on a pre-resolved [`ServiceHandle`].
///
/// Registry changes are applied by the balancer's control plane: on the caller's task until
/// [`start`](Self::start), by a dedicated thread afterwards. Either way a registry call returns
/// only once this balancer routes by the new membership.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tai_loadbalancer::{Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let registry = Arc::new(ServiceRegistry::new());
/// registry.register("api", Endpoint::new("127.0.0.1:5001".parse()?, None)).await?;
/// registry.register("api", Endpoint::new("127.0.0.1:5002".parse()?, None)).await?;
///
/// let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?;
/// lb.start().await?;
/// let first = lb.next_endpoint("api").await?;
/// let second = lb.next_endpoint("api").await?;
/// assert_ne!(first.address, second.address);
///
/// // Read-your-writes: once deregister returns, the endpoint is never picked again.
/// registry.deregister("api", &first).await?;
/// for _ in 0..10 {
///     assert_eq!(lb.next_endpoint("api").await?.address, second.address);
/// }
/// lb.stop().await?;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct IntegratedLoadBalancer {
    shared: DataArc<Shared>,
    strategy: LoadBalancingStrategy,
}

impl IntegratedLoadBalancer {
    /// Creates a balancer over `registry`, routing with `strategy`.
    ///
    /// The config is validated first. The balancer is attached to the registry and has
    /// published tables for every registered service when this returns.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the offending field.
    pub async fn new(
        registry: DataArc<ServiceRegistry>,
        strategy: LoadBalancingStrategy,
        config: LoadBalancerConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let shared = Shared::new(registry.clone(), config, strategy)?;
        #[cfg(feature = "runtime")]
        if shared.control.settings().config.health_check.enabled {
            // The checker learns the endpoints first, so the balancer's first tables can read
            // their (initial, healthy) status. A balancer without checks does not attach it:
            // following the registry would cost every registry write a membership copy.
            shared.health.attach().await;
            let sink: DataWeak<dyn crate::handoff::HealthSink> =
                DataArc::downgrade(&shared) as DataWeak<dyn crate::handoff::HealthSink>;
            shared.health.subscribe(sink);
        }
        let events = &shared.control.settings().config.health_events;
        if events.log_path.is_some() {
            // Before attaching: the log starts with the services' first members (`added`).
            let queue = shared.control.subscribe_health(events.buffer);
            let log = crate::events::log::EventLog::start(events, queue)?;
            *shared.event_log.lock() = Some(log);
        }
        let sink: DataWeak<dyn MembershipSink> = DataArc::downgrade(&shared) as DataWeak<dyn MembershipSink>;
        let lb = Self { shared, strategy };
        registry.attach(sink).await?;
        Ok(lb)
    }

    /// Starts the control-plane thread. Idempotent.
    ///
    /// Until started, registry changes are applied by the task making them; once started, a
    /// dedicated thread coalesces bursts of changes into one rebuild per service.
    ///
    /// The thread applies every change under `catch_unwind`: a panic while applying one
    /// service's change is logged at error level and its writers get
    /// [`Error::PublishFailed`], while other services go on. Should the thread die anyway,
    /// the changes it held fail the same way, and the next write (or `start`) restarts it.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] after [`stop`](Self::stop); [`Error::ControlPlane`] if the OS
    /// refuses a thread.
    pub async fn start(&self) -> Result<(), Error> {
        // A weak reference: the runner is kept to restart a thread that died, and must not
        // keep the balancer alive.
        let shared = DataArc::downgrade(&self.shared);
        self.shared.control.start(DataArc::new(move || {
            if let Some(shared) = shared.upgrade() {
                shared.control.run(&shared.sources(), &shared.directory);
            }
        }))?;
        #[cfg(feature = "runtime")]
        if self.shared.control.settings().config.health_check.enabled {
            self.shared.health.start_now()?;
        }
        Ok(())
    }

    /// Stops the balancer: stops its health checks, joins the control-plane thread, detaches
    /// from the registry, and makes every later pick fail with [`Error::Stopped`]. Requests
    /// in flight keep their picks. Idempotent; also done on drop.
    pub async fn stop(&self) -> Result<(), Error> {
        if self.shared.shutdown() {
            tracing::debug!("load balancer stopped");
        }
        Ok(())
    }

    /// Whether the control-plane thread is running (`false` before `start`, after `stop`,
    /// and after the thread died, until the next write or `start` restarts it).
    pub fn is_running(&self) -> bool {
        self.shared.control.is_running()
    }

    /// The next endpoint of `service` by the balancer's strategy (the seed API).
    ///
    /// Ready at once. Counts a selection but holds nothing in flight; use
    /// [`pick`](Self::pick) where in-flight counts matter (least connections, draining).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::NoEndpoints`], [`Error::NoHealthyEndpoints`],
    /// [`Error::Stopped`].
    pub async fn next_endpoint(&self, service: &str) -> Result<Endpoint, Error> {
        self.select(service)
    }

    /// The endpoint owning `key` on `service`'s consistent-hash ring, whatever the strategy.
    ///
    /// The same key maps to the same endpoint on every balancer holding the same endpoints,
    /// in any process (see [`crate::docs::consistent_hashing`]).
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    pub async fn next_endpoint_with_hash(
        &self,
        service: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Endpoint, Error> {
        self.select_with_hash(service, key)
    }

    /// The endpoint for session `key` of `service` (the seed API): the endpoint the key is
    /// bound to while it stays routable; otherwise the key's consistent-hash owner, which then
    /// becomes the binding (so balancers of a fleet agree on new keys without sharing state).
    /// Bindings expire after `affinity.ttl` without use and are bounded by
    /// `affinity.max_entries`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAffinityKey`] for an empty or over-long key; otherwise as
    /// [`next_endpoint`](Self::next_endpoint).
    pub async fn next_endpoint_with_affinity(&self, service: &str, key: &str) -> Result<Endpoint, Error> {
        self.select_with_affinity(service, key)
    }

    /// As [`next_endpoint_with_affinity`](Self::next_endpoint_with_affinity), deriving the key
    /// from `request` with the configured [`AffinityStrategy`](crate::AffinityStrategy).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAffinityKey`] when the request lacks what the strategy needs.
    pub async fn next_endpoint_for_request(
        &self,
        service: &str,
        request: &AffinityRequest<'_>,
    ) -> Result<Endpoint, Error> {
        let key = self.shared.affinity.config().strategy.key(request)?;
        self.select_with_affinity(service, &key)
    }

    /// The synchronous, unguarded form of
    /// [`next_endpoint_with_affinity`](Self::next_endpoint_with_affinity).
    ///
    /// # Errors
    ///
    /// As [`next_endpoint_with_affinity`](Self::next_endpoint_with_affinity).
    pub fn select_with_affinity(&self, service: &str, key: &str) -> Result<Endpoint, Error> {
        validate_key(key)?;
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        let shard = thread_ordinal();
        Ticket::check(&table)?;
        let Chosen { view, index, .. } = self
            .shared
            .choose_with_affinity(&table, slot, key, shard, false)?;
        view.note_selection(index, shard);
        Ok(table.endpoint(view, index))
    }

    /// A guarded pick by session affinity (see
    /// [`next_endpoint_with_affinity`](Self::next_endpoint_with_affinity)).
    ///
    /// # Errors
    ///
    /// As [`next_endpoint_with_affinity`](Self::next_endpoint_with_affinity).
    pub fn pick_with_affinity(&self, service: &str, key: &str) -> Result<Pick, Error> {
        validate_key(key)?;
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        let shard = thread_ordinal();
        let ticket = Ticket::admit(&table)?;
        Ok(self
            .shared
            .choose_with_affinity(&table, slot, key, shard, true)?
            .into_pick(&table, shard, ticket.keep()))
    }

    /// A guarded pick for one attempt of a call that may be retried: routed by `route`, and
    /// if that lands on an address in `avoid` (tried already by this call), the first other
    /// routable member from a random start instead. An affinity key is not rebound by such a
    /// detour. Costs one table scan only when a detour is needed.
    #[cfg(feature = "grpc")]
    pub(crate) fn pick_route(
        &self,
        service: &str,
        route: Route<'_>,
        avoid: &[SocketAddr],
    ) -> Result<Pick, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        let shard = thread_ordinal();
        let ticket = Ticket::admit(&table)?;
        let chosen = match route {
            Route::Strategy => self.shared.choose(&table, slot, None, shard, true)?,
            Route::Hash(hash) => self.shared.choose(&table, slot, Some(hash), shard, true)?,
            Route::Affinity(key) => {
                validate_key(key)?;
                self.shared.choose_with_affinity(&table, slot, key, shard, true)?
            }
            Route::Subset(pairs) => choose_subset(&table, slot, pairs, shard)
                .map_err(|why| self.shared.subset_error(&table, pairs, why))?,
        };
        if !avoid.contains(&chosen.address(&table)) {
            return Ok(chosen.into_pick(&table, shard, ticket.keep()));
        }
        drop(chosen); // a lease bounded loads took ends here
        let routable = &table.routable;
        let n = routable.len();
        let start = crate::sync::random_below(n.max(1));
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&k| !avoid.contains(&table.address(&routable.entries()[k].payload)))
            .map(|k| Pick::new(&table, routable, k, shard).with_admission(ticket.keep()))
            .ok_or_else(|| Error::NoHealthyEndpoints {
                service: table.service.clone(),
                total: table.members.len(),
            })
    }

    /// Every service's members and their health in the current snapshots.
    #[cfg(feature = "runtime")]
    pub(crate) fn current_topology(&self) -> Vec<(String, Vec<(SocketAddr, EndpointHealth)>)> {
        self.shared.current_topology()
    }

    /// Calls `watcher` for every control-plane event from now on (pools follow routing so).
    #[cfg(feature = "runtime")]
    pub(crate) fn subscribe_control(&self, watcher: crate::handoff::Watcher) {
        self.shared.control.subscribe(watcher);
    }

    /// This balancer's session-affinity table.
    pub fn affinity(&self) -> &AffinityManager {
        &self.shared.affinity
    }

    /// A guarded pick: the endpoint with one request in flight until the [`Pick`] is dropped.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn pick(&self, service: &str) -> Result<Pick, Error> {
        self.shared.by_name(service, |slot| self.shared.pick(slot, None))
    }

    /// A guarded pick by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn pick_with_hash(&self, service: &str, key: impl AsRef<[u8]>) -> Result<Pick, Error> {
        let hash = hash_key(key);
        self.shared
            .by_name(service, |slot| self.shared.pick(slot, Some(hash)))
    }

    /// An unguarded selection (the synchronous twin of [`next_endpoint`](Self::next_endpoint)).
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn select(&self, service: &str) -> Result<Endpoint, Error> {
        self.shared
            .by_name(service, |slot| self.shared.select(slot, None))
    }

    /// An unguarded selection by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn select_with_hash(&self, service: &str, key: impl AsRef<[u8]>) -> Result<Endpoint, Error> {
        let hash = hash_key(key);
        self.shared
            .by_name(service, |slot| self.shared.select(slot, Some(hash)))
    }

    /// A guarded pick among the endpoints of the metadata subset `subset` names: tag
    /// key/value pairs whose keys are one of the `[subsets]` selectors (in any order). The
    /// strategy picks inside the subset, which was precomputed with the routing table, so the
    /// pick never filters; no lock, no allocation.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tai_loadbalancer::*;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let registry = Arc::new(ServiceRegistry::new());
    /// for (port, version) in [(5001, "v1"), (5002, "v2")] {
    ///     let meta = EndpointMetadata::new().with_tag("version", version);
    ///     registry.register("api", Endpoint::new(format!("127.0.0.1:{port}").parse().unwrap(), Some(meta))).await?;
    /// }
    /// let config = LoadBalancerConfig::from_toml_str("[subsets]\nselectors = [[\"version\"]]\n")?;
    /// let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config).await?;
    /// let pick = lb.pick_subset("api", &[("version", "v2")])?;
    /// assert_eq!(pick.address().port(), 5002);
    /// assert!(matches!(lb.pick_subset("api", &[("version", "v3")]), Err(Error::NoSubsetMatch { .. })));
    /// # Ok::<_, Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSubsetSelector`] if no selector has exactly these keys;
    /// [`Error::NoSubsetMatch`] if no routable endpoint matches and the fallback
    /// (`[subsets] fallback`) is `no_fallback` or an empty `default_subset`; otherwise as
    /// [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn pick_subset(&self, service: &str, subset: &[(&str, &str)]) -> Result<Pick, Error> {
        self.shared
            .by_name(service, |slot| self.shared.pick_subset(slot, subset))
    }

    /// An unguarded selection from a metadata subset (see [`pick_subset`](Self::pick_subset)).
    ///
    /// # Errors
    ///
    /// As [`pick_subset`](Self::pick_subset).
    #[inline]
    pub fn select_subset(&self, service: &str, subset: &[(&str, &str)]) -> Result<Endpoint, Error> {
        self.shared
            .by_name(service, |slot| self.shared.select_subset(slot, subset))
    }

    /// A handle to `service` that skips the name lookup on every pick.
    ///
    /// The handle follows the service's tables as they are republished. If the service is
    /// removed from the registry the handle answers [`Error::UnknownService`]; resolve a new
    /// one if it is registered again.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::Stopped`].
    pub fn service(&self, service: &str) -> Result<ServiceHandle, Error> {
        let directory = self.shared.directory.load();
        match directory.services.get_key_value(service) {
            Some((name, slot)) => Ok(ServiceHandle {
                shared: self.shared.clone(),
                slot: slot.clone(),
                name: name.clone(),
            }),
            None => Err(unknown(&directory, service)),
        }
    }

    /// Reports the outcome of a request sent to `endpoint` after
    /// [`next_endpoint`](Self::next_endpoint) (a [`Pick`] reports on itself instead).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`] (for example, removed since),
    /// [`Error::Stopped`].
    pub fn record_result(
        &self,
        service: &str,
        endpoint: &Endpoint,
        outcome: Outcome,
        latency: Option<Duration>,
    ) -> Result<(), Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        let i = member(&table, endpoint.address)?;
        let view = &table.members;
        let shard = thread_ordinal();
        report(
            view.record(i),
            view.context(),
            || view.aux(i, shard),
            |success| view.count(i, shard, success),
            outcome == Outcome::Success,
            latency,
        );
        Ok(())
    }

    /// The names of the services this balancer routes, sorted.
    pub fn services(&self) -> Vec<String> {
        let directory = self.shared.directory.load();
        let mut names: Vec<String> = directory.services.keys().map(|s| s.to_string()).collect();
        names.sort();
        names
    }

    /// A snapshot of the request counters (see [`LoadBalancerMetrics`] for their meaning).
    pub fn metrics(&self) -> LoadBalancerMetrics {
        let settings = self.shared.control.settings();
        let mut metrics = LoadBalancerMetrics::from_counters(
            self.shared.control.counters(&self.shared.sources()),
            settings.locality.zone.as_deref(),
        );
        metrics.requests_per_second = self.shared.rate.sample(metrics.total_requests);
        metrics.affinity = self.shared.affinity.stats();
        metrics
    }

    /// Takes `endpoint` of `service` out of routing (for maintenance), whatever its health
    /// checks say, until [`mark_up`](Self::mark_up). Requests in flight continue. Returns
    /// once no new pick can return it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`], [`Error::Stopped`],
    /// [`Error::PublishFailed`] (the control plane could not publish it yet: retry; the next
    /// publication of the service includes it).
    pub async fn mark_down(&self, service: &str, endpoint: &Endpoint) -> Result<(), Error> {
        self.set_down(service, endpoint, true).await
    }

    /// Undoes [`mark_down`](Self::mark_down): the endpoint routes again by its health.
    ///
    /// # Errors
    ///
    /// As [`mark_down`](Self::mark_down).
    pub async fn mark_up(&self, service: &str, endpoint: &Endpoint) -> Result<(), Error> {
        self.set_down(service, endpoint, false).await
    }

    async fn set_down(&self, service: &str, endpoint: &Endpoint, down: bool) -> Result<(), Error> {
        let name = {
            let directory = self.shared.directory.load();
            let slot = Shared::slot_by_name(&directory, service)?;
            let table = slot.table.load();
            member(&table, endpoint.address)?;
            table.service.clone()
        };
        let ack = self.shared.control.submit(Command::MarkDown {
            service: name.clone(),
            address: endpoint.address,
            down,
        });
        self.shared
            .control
            .help(&self.shared.sources(), &self.shared.directory);
        ack.await.into_result(&name)
    }

    /// Routes `service` by a primary/backup order: every pick (without a hash key) goes to
    /// the first healthy endpoint of `primary, backups...`, so the primary takes all traffic
    /// until it fails, then the first healthy backup, and the primary again once it recovers.
    /// Endpoints of the group that are not registered are skipped. Returns once picks follow
    /// the group.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidFailoverGroup`] (a backup equal to the primary, or repeated),
    /// [`Error::UnknownService`], [`Error::Stopped`].
    pub async fn set_failover_group(
        &self,
        service: &str,
        primary: Endpoint,
        backups: Vec<Endpoint>,
    ) -> Result<(), Error> {
        let chain = crate::failover::failover_chain(primary, backups)?;
        let order = chain.iter().map(|e| e.address).collect();
        self.command_for(service, |service| Command::Failover {
            service,
            order: Some(order),
        })
        .await
    }

    /// Removes the failover group of `service`: picks follow the strategy again.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::Stopped`].
    pub async fn clear_failover_group(&self, service: &str) -> Result<(), Error> {
        self.command_for(service, |service| Command::Failover { service, order: None })
            .await
    }

    /// How `address` of `service` is routed now (`None` if it is not a member).
    pub fn endpoint_health(&self, service: &str, address: SocketAddr) -> Option<EndpointHealth> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service).ok()?;
        let table = slot.table.load();
        let i = table.member_index(address)?;
        Some(table.info[i].health)
    }

    /// Drains `endpoint` of `service` (for a rolling deploy): it gets no new picks from the
    /// moment this is called (read-your-writes), requests in flight complete, and its
    /// affinity keys move off by the rebalance strategy. Returns once its in-flight count is
    /// 0 or the strategy's drain timeout expired. The endpoint stays registered and draining
    /// (deregister it, or [`undrain`](Self::undrain) it).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`], [`Error::Stopped`],
    /// [`Error::PublishFailed`] (the control plane could not publish it yet: retry; the next
    /// publication of the service includes it).
    #[cfg(feature = "runtime")]
    pub async fn drain(&self, service: &str, endpoint: &Endpoint) -> Result<crate::DrainReport, Error> {
        let started = tokio::time::Instant::now();
        let address = endpoint.address;
        let name = self.member_name(service, address)?;
        let in_flight_at_start = self.in_flight(service, address).unwrap_or(0);
        self.set_draining(service, endpoint, true).await?;
        // Every table from this version on has the endpoint out of routing.
        let since = self.shared.control.table_version(&name).unwrap_or(0);
        Ok(self
            .shared
            .rebalancer
            .wait_drained(&name, address, since, in_flight_at_start, started)
            .await)
    }

    /// Ends a drain: the endpoint routes by its health again.
    ///
    /// # Errors
    ///
    /// As [`drain`](Self::drain).
    pub async fn undrain(&self, service: &str, endpoint: &Endpoint) -> Result<(), Error> {
        self.set_draining(service, endpoint, false).await
    }

    async fn set_draining(&self, service: &str, endpoint: &Endpoint, draining: bool) -> Result<(), Error> {
        let address = endpoint.address;
        self.member_name(service, address)?;
        self.command_for(service, |service| Command::Drain {
            service,
            address,
            draining,
        })
        .await
    }

    /// The service's interned name, checking `address` is a member.
    fn member_name(&self, service: &str, address: SocketAddr) -> Result<DataArc<str>, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        member(&table, address)?;
        Ok(table.service.clone())
    }

    /// Requests in flight on `address` of `service` now, over all threads and every
    /// generation of the endpoint (an earlier registration of the same address whose requests
    /// are still running counts too); `None` if it is not a member. Read with `Acquire`: when
    /// it returns 0, everything those requests recorded (outcomes, latencies) is visible.
    pub fn in_flight(&self, service: &str, address: SocketAddr) -> Option<u64> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service).ok()?;
        let table = slot.table.load();
        table.member_index(address)?;
        let (in_flight, _) = self.shared.control.drain_status(&table.service, address, 0)?;
        Some(in_flight)
    }

    /// Queues a command for `service` and waits until it is published.
    async fn command_for(
        &self,
        service: &str,
        make: impl FnOnce(DataArc<str>) -> Command,
    ) -> Result<(), Error> {
        let name = {
            let directory = self.shared.directory.load();
            let slot = Shared::slot_by_name(&directory, service)?;
            slot.table.load().service.clone()
        };
        let ack = self.shared.control.submit(make(name.clone()));
        self.shared
            .control
            .help(&self.shared.sources(), &self.shared.directory);
        ack.await.into_result(&name)
    }

    /// This balancer's rebalancer: topology events, key moves, `rebalance_service`.
    #[cfg(feature = "runtime")]
    pub fn rebalancer(&self) -> &crate::RebalanceManager {
        &self.shared.rebalancer
    }

    /// Whether `service` is in panic mode: fewer than `panic_threshold_percent` of its
    /// endpoints are healthy, so picks go to all of them regardless of health, except the
    /// ones an operator marked down or is draining (those never take new picks, and do not
    /// count towards the threshold).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::Stopped`].
    pub fn is_in_panic(&self, service: &str) -> Result<bool, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        let table = slot.table.load();
        Ok(table.panic)
    }

    /// Every routing-table publication from now on, for every service: what changed
    /// membership, health and panic state, version by version. Subscribers that fall behind
    /// queue without bound; drop the receiver to unsubscribe.
    pub fn routing_updates(&self) -> RoutingUpdates {
        RoutingUpdates(self.shared.control.watch())
    }

    /// Every health event from now on, for every service (see [`HealthEvent`](crate::HealthEvent)):
    /// endpoints added and removed, unhealthy (with the check's error) and healthy again,
    /// ejected (with the duration) and returned, draining and released, marked down and up,
    /// and panic mode entered and left, numbered in the order the control plane decided
    /// them. A `Stream`; it holds up to `health_events.buffer` unread events (then loses the
    /// oldest, counted) and ends when the balancer stops.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tai_loadbalancer::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// # let registry = Arc::new(ServiceRegistry::new());
    /// let endpoint = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
    /// registry.register("api", endpoint.clone()).await?;
    /// let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?;
    /// let mut events = lb.health_events();
    /// lb.mark_down("api", &endpoint).await?;
    /// let event = events.next().await.unwrap();
    /// assert_eq!((event.endpoint, &event.kind), (Some(endpoint.address), &HealthEventKind::MarkedDown));
    /// println!("{}", event.to_json_line());
    /// # Ok(())
    /// # }
    /// ```
    pub fn health_events(&self) -> crate::HealthEvents {
        let capacity = self.shared.control.settings().config.health_events.buffer;
        crate::HealthEvents::new(self.shared.control.subscribe_health(capacity))
    }

    /// This balancer's active health checker (started by [`start`](Self::start) when
    /// `health_check.enabled`).
    #[cfg(feature = "runtime")]
    pub fn health_checks(&self) -> &HealthCheckManager {
        &self.shared.health
    }

    /// The balancer's default strategy.
    pub fn strategy(&self) -> LoadBalancingStrategy {
        self.strategy
    }

    /// The balancer's configuration.
    pub fn config(&self) -> &LoadBalancerConfig {
        &self.shared.control.settings().config
    }

    /// The registry this balancer follows.
    pub fn registry(&self) -> &DataArc<ServiceRegistry> {
        &self.shared.registry
    }
}

impl Drop for IntegratedLoadBalancer {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

impl fmt::Debug for IntegratedLoadBalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegratedLoadBalancer")
            .field("strategy", &self.strategy)
            .field("directory", &*self.shared.directory.load())
            .field("control", &self.shared.control)
            .finish()
    }
}

// ===== failover groups over a balancer's health =====

impl crate::failover::HealthView for IntegratedLoadBalancer {
    fn health(&self, service: &str, address: SocketAddr) -> Option<EndpointHealth> {
        self.endpoint_health(service, address)
    }
}

impl crate::FailoverManager {
    /// Learns endpoint health from `balancer`'s routing snapshots (a group of service `s`
    /// reads the health of the same addresses in the balancer's service `s`): failover then
    /// skips unhealthy backups, and failback returns to a recovered primary. Without it every
    /// endpoint counts as healthy.
    pub fn with_health_from(self, balancer: DataArc<IntegratedLoadBalancer>) -> Self {
        self.with_health_view(balancer)
    }
}

// ===== impl RoutingUpdates =====

/// A subscription to routing-table publications (see
/// [`IntegratedLoadBalancer::routing_updates`]).
#[derive(Debug)]
pub struct RoutingUpdates(mpsc::Receiver<RoutingUpdate>);

impl RoutingUpdates {
    /// The next update if one is waiting.
    pub fn try_next(&self) -> Option<RoutingUpdate> {
        self.0.try_recv().ok()
    }

    /// Waits up to `timeout` for the next update (blocking the thread).
    pub fn next_timeout(&self, timeout: Duration) -> Option<RoutingUpdate> {
        self.0.recv_timeout(timeout).ok()
    }

    /// Every update waiting now.
    pub fn drain(&self) -> Vec<RoutingUpdate> {
        self.0.try_iter().collect()
    }
}

// ===== impl ServiceHandle =====

/// How one attempt of a balanced call is routed.
#[cfg(feature = "grpc")]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Route<'a> {
    /// The service's strategy.
    Strategy,
    /// Consistent hash of a key (already hashed).
    Hash(u64),
    /// Session affinity by key.
    Affinity(&'a str),
    /// The strategy inside a metadata subset (tag key/value pairs).
    Subset(&'a [(&'a str, &'a str)]),
}

/// One service of an [`IntegratedLoadBalancer`], resolved once: picks skip the name lookup.
///
/// Cheap to clone and `Send + Sync`; keep one per service on the hot path.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use tai_loadbalancer::*;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// # let registry = Arc::new(ServiceRegistry::new());
/// # registry.register("api", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await.unwrap();
/// let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::Random, Default::default()).await?;
/// let api = lb.service("api")?;
/// let pick = api.pick()?;
/// assert_eq!(pick.address().port(), 5001);
/// # Ok::<_, Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ServiceHandle {
    shared: DataArc<Shared>,
    slot: DataArc<ServiceSlot>,
    name: DataArc<str>,
}

impl ServiceHandle {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A guarded pick (see [`IntegratedLoadBalancer::pick`]).
    ///
    /// # Errors
    ///
    /// [`Error::NoEndpoints`], [`Error::NoHealthyEndpoints`], [`Error::UnknownService`] (the
    /// service was removed), [`Error::Stopped`].
    #[inline]
    pub fn pick(&self) -> Result<Pick, Error> {
        self.shared.pick(&self.slot, None)
    }

    /// A guarded pick by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`pick`](Self::pick).
    #[inline]
    pub fn pick_with_hash(&self, key: impl AsRef<[u8]>) -> Result<Pick, Error> {
        self.shared.pick(&self.slot, Some(hash_key(key)))
    }

    /// A guarded pick by consistent hash, for callers that already hold the key's
    /// [`hash_key`](crate::hash_key) value.
    ///
    /// # Errors
    ///
    /// As [`pick`](Self::pick).
    #[inline]
    pub fn pick_with_key_hash(&self, key_hash: u64) -> Result<Pick, Error> {
        self.shared.pick(&self.slot, Some(key_hash))
    }

    /// An unguarded selection.
    ///
    /// # Errors
    ///
    /// As [`pick`](Self::pick).
    #[inline]
    pub fn select(&self) -> Result<Endpoint, Error> {
        self.shared.select(&self.slot, None)
    }

    /// An unguarded selection by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`pick`](Self::pick).
    #[inline]
    pub fn select_with_hash(&self, key: impl AsRef<[u8]>) -> Result<Endpoint, Error> {
        self.shared.select(&self.slot, Some(hash_key(key)))
    }

    /// A guarded pick from a metadata subset (see
    /// [`IntegratedLoadBalancer::pick_subset`]).
    ///
    /// # Errors
    ///
    /// As [`IntegratedLoadBalancer::pick_subset`].
    #[inline]
    pub fn pick_subset(&self, subset: &[(&str, &str)]) -> Result<Pick, Error> {
        self.shared.pick_subset(&self.slot, subset)
    }

    /// The current endpoints and whether each is routable, in address order.
    pub fn endpoints(&self) -> Vec<(Endpoint, bool)> {
        let table = self.slot.table.load();
        let view = &table.members;
        (0..view.len())
            .map(|i| {
                (
                    view.record(i).endpoint.clone(),
                    view.entries()[i].payload.routable(),
                )
            })
            .collect()
    }
}

impl fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("service", &self.name)
            .finish()
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::fault;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    async fn balancer(service: &str, started: bool) -> (DataArc<ServiceRegistry>, IntegratedLoadBalancer) {
        let registry = DataArc::new(ServiceRegistry::new());
        registry.register(service, ep(1)).await.unwrap();
        let lb = IntegratedLoadBalancer::new(
            registry.clone(),
            LoadBalancingStrategy::RoundRobin,
            LoadBalancerConfig::default(),
        )
        .await
        .unwrap();
        if started {
            lb.start().await.unwrap();
        }
        (registry, lb)
    }

    /// A panic while a balancer applies a registry write: the writer gets a typed error (never
    /// `Ok` for an unpublished change), the registry keeps the change, other services keep
    /// being published, and the next write of the service publishes everything.
    async fn a_panicking_publication(service: &str, started: bool) {
        let (registry, lb) = balancer(service, started).await;
        registry.register("other", ep(9)).await.unwrap();
        fault::panic_in_rebuild(service, 1);
        let written = tokio::time::timeout(Duration::from_secs(10), registry.register(service, ep(2)))
            .await
            .expect("no write hangs");
        match written {
            Err(Error::PublishFailed { service: s, reason }) => {
                assert_eq!(&*s, service);
                assert!(reason.contains("injected fault"), "{reason}");
            }
            other => panic!("expected PublishFailed, got {other:?}"),
        }
        assert_eq!(
            registry.endpoints(service).await.unwrap().len(),
            2,
            "the registry keeps it"
        );
        let routed = lb.service(service).unwrap().endpoints();
        assert_eq!(routed.len(), 1, "not published by the balancer");
        registry.register("other", ep(8)).await.unwrap();
        assert_eq!(lb.service("other").unwrap().endpoints().len(), 2);
        registry.register(service, ep(3)).await.unwrap();
        let ports: Vec<u16> = lb
            .service(service)
            .unwrap()
            .endpoints()
            .iter()
            .map(|(e, _)| e.address.port())
            .collect();
        assert_eq!(ports, [1, 2, 3]);
        // Operator commands of that service work too.
        lb.mark_down(service, &ep(2)).await.unwrap();
        assert!(lb.is_running() == started);
        lb.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_publication_on_the_control_thread_fails_only_its_writer() {
        a_panicking_publication("fault-started", true).await;
    }

    #[tokio::test]
    async fn a_panicking_publication_on_the_writer_fails_only_its_writer() {
        a_panicking_publication("fault-unstarted", false).await;
    }

    #[tokio::test]
    async fn an_operator_command_whose_publication_panics_is_an_error() {
        let (_registry, lb) = balancer("fault-mark", true).await;
        fault::panic_in_rebuild("fault-mark", 1);
        assert!(matches!(
            lb.mark_down("fault-mark", &ep(1)).await,
            Err(Error::PublishFailed { .. })
        ));
        lb.mark_down("fault-mark", &ep(1)).await.unwrap();
        assert_eq!(
            lb.endpoint_health("fault-mark", ep(1).address),
            Some(EndpointHealth::Down)
        );
        lb.stop().await.unwrap();
        assert!(matches!(
            lb.mark_up("fault-mark", &ep(1)).await,
            Err(Error::Stopped)
        ));
    }

    #[tokio::test]
    async fn a_dead_control_thread_is_restarted_by_the_next_write() {
        let registry = DataArc::new(ServiceRegistry::new());
        registry.register("svc", ep(1)).await.unwrap();
        let mut config = LoadBalancerConfig::default();
        config.control_plane.thread_name = "fault-lb-thread".into();
        let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
            .await
            .unwrap();
        lb.start().await.unwrap();
        fault::kill_thread("fault-lb-thread");
        let first = tokio::time::timeout(Duration::from_secs(10), registry.register("svc", ep(2)))
            .await
            .expect("no write hangs");
        assert!(matches!(first, Err(Error::PublishFailed { .. })), "{first:?}");
        // Later writes revive the thread (or, racing its last moments, fail); none hangs.
        let mut published = false;
        for port in 3..20 {
            let write = tokio::time::timeout(Duration::from_secs(10), registry.register("svc", ep(port)))
                .await
                .expect("no write hangs");
            if write.is_ok() {
                published = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(published);
        assert!(lb.is_running(), "the thread was restarted");
        assert!(lb.service("svc").unwrap().endpoints().len() >= 3);
        lb.stop().await.unwrap();
    }
}
