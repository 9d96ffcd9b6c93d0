//! Service discovery: sources of membership feeding a [`ServiceRegistry`].
//!
//! This module owns the [`Discovery`] trait (a source of membership changes: a file, DNS,
//! etcd, your own), the [`DiscoverySink`] a source publishes into, and the
//! [`DiscoveryRunner`] that runs sources on tokio tasks and applies what they publish to one
//! registry, so every balancer attached to that registry follows them.
//!
//! Sources shipped here: [`FileDiscovery`] (a TOML file, feature `runtime`), `DnsDiscovery`
//! (A/AAAA and SRV records, feature `dns`) and `EtcdDiscovery` (feature `etcd`). Operators
//! watch them through [`DiscoveryRunner::stats`] or, with `prometheus`,
//! `encode_discovery_prometheus`.
//!
//! # Invariants
//!
//! * **One owner per service**: a source that declares a service ([`Discovery::services`])
//!   owns it from its spawn on, the earlier spawned winning; an undeclared service goes to
//!   the first source that publishes it. Updates from any other source are skipped
//!   (counted in [`SourceStats::conflicts`], logged).
//!   Sources compose by owning different services (static + DNS + etcd side by side).
//! * **Coalescing**: publishing never waits on the registry. Updates queue per service and
//!   merge (a snapshot replaces what was queued, changes fold into it); the runner applies
//!   each service's queue as one registry change (one version, one table rebuild per
//!   balancer), so a burst of thousands of changes costs a few rebuilds.
//! * **Nothing lost, nothing invented**: a source that fails keeps its last membership in the
//!   registry (a degraded source never empties a service); only what a source publishes
//!   changes membership; invalid endpoints are dropped at [`DiscoverySink::publish`]
//!   (counted in [`SourceStats::malformed`]) so one bad record never holds back the changes
//!   merged with it; a source that panics is reported stopped and its services keep their
//!   last membership.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use crate::endpoint::Endpoint;
use crate::registry::ServiceRegistry;
use crate::sync::{DataArc, Mutex};

#[cfg(feature = "dns")]
mod dns;
#[cfg(feature = "etcd")]
mod etcd;
mod file;
#[cfg(feature = "dns")]
pub use dns::{DnsConfig, DnsDiscovery, DnsTarget, DnsTargetKind};
#[cfg(feature = "etcd")]
pub use etcd::{
    DEFAULT_LEASE_TTL, DEFAULT_RANGE_PAGE_SIZE, DEFAULT_ROOT, EtcdConfig, EtcdDiscovery, EtcdDiscoveryStats,
    EtcdRegistration, etcd_record,
};
pub use file::{DEFAULT_FILE_POLL_INTERVAL, FileDiscovery, parse_services_toml};

/// Capped exponential backoff with jitter for sources retrying their store: each wait is in
/// `[d/2, d]`, where `d` starts at `initial` and doubles per failure up to `max`.
#[cfg(any(feature = "dns", feature = "etcd"))]
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: std::time::Duration,
    max: std::time::Duration,
    next: std::time::Duration,
}

#[cfg(any(feature = "dns", feature = "etcd"))]
impl Backoff {
    pub(crate) fn new(initial: std::time::Duration, max: std::time::Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// After a success: the next failure waits about `initial` again.
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }

    pub(crate) fn next_delay(&mut self) -> std::time::Duration {
        let full = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let half = full / 2;
        let jitter_us = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if jitter_us == 0 {
            0
        } else {
            crate::sync::random_u64() % jitter_us.saturating_add(1)
        };
        half + std::time::Duration::from_micros(jitter)
    }
}

/// One change of membership published by a source.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipUpdate {
    /// The whole membership of `service` (endpoints not listed are removed).
    Snapshot {
        /// The service.
        service: String,
        /// Its endpoints.
        endpoints: Vec<Endpoint>,
    },
    /// Incremental changes to `service`.
    Changes {
        /// The service.
        service: String,
        /// Endpoints added, or whose metadata changed.
        upserts: Vec<Endpoint>,
        /// Addresses removed.
        removals: Vec<SocketAddr>,
    },
}

impl MembershipUpdate {
    /// The service this update is about.
    pub fn service(&self) -> &str {
        match self {
            Self::Snapshot { service, .. } | Self::Changes { service, .. } => service,
        }
    }
}

/// The health of a source, as the source reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceHealth {
    /// Not yet connected or loaded.
    #[default]
    Starting,
    /// Connected and up to date.
    Healthy,
    /// Unreachable or failing: its services keep their last membership.
    Degraded {
        /// Why, for operators.
        reason: String,
    },
    /// The source ended (its task returned).
    Stopped,
}

/// Counters and state of one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceStats {
    /// The source's name.
    pub name: String,
    /// Its current health.
    pub health: SourceHealth,
    /// Updates published by the source.
    pub updates: u64,
    /// Registry changes made from them (after coalescing).
    pub applied: u64,
    /// Records the source skipped as malformed.
    pub malformed: u64,
    /// Updates the registry rejected (invalid endpoints).
    pub rejected: u64,
    /// Updates skipped because another source owns the service.
    pub conflicts: u64,
    /// Times the source went from healthy (or starting) to degraded.
    pub degradations: u64,
    /// The last error the source reported, if any.
    pub last_error: Option<String>,
}

/// A source of membership: runs until its sink is closed, publishing what it learns.
///
/// Implementations retry their own failures (with backoff) and report them through
/// [`DiscoverySink::set_health`]; they never publish an empty membership because they could
/// not reach their store. Records they cannot parse are skipped through
/// [`DiscoverySink::record_malformed`]; endpoints that parse but are invalid
/// ([`Endpoint::validate`]) are dropped by [`DiscoverySink::publish`] itself. A source
/// reports [`SourceHealth::Healthy`] (or `Degraded`) once its first load is published:
/// [`DiscoveryRunner::synced`] waits for that.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Discovery, DiscoveryRunner, DiscoverySink, Endpoint, MembershipUpdate, ServiceRegistry, SourceHealth};
/// use std::sync::Arc;
///
/// struct Fixed(Vec<Endpoint>);
///
/// #[async_trait::async_trait]
/// impl Discovery for Fixed {
///     fn name(&self) -> String {
///         "fixed".into()
///     }
///     async fn run(self: Box<Self>, sink: DiscoverySink) {
///         sink.publish(MembershipUpdate::Snapshot { service: "api".into(), endpoints: self.0 });
///         sink.set_health(SourceHealth::Healthy);
///         sink.closed().await;
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let registry = Arc::new(ServiceRegistry::new());
/// let runner = DiscoveryRunner::new(registry.clone());
/// runner.spawn(Fixed(vec![Endpoint::new("127.0.0.1:5001".parse()?, None)]));
/// runner.synced().await;
/// assert_eq!(registry.endpoints("api").await?.len(), 1);
/// runner.shutdown().await;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[async_trait::async_trait]
pub trait Discovery: Send + 'static {
    /// A name for logs and metrics, e.g. `file:/etc/lb/services.toml` or `etcd:/services/`.
    fn name(&self) -> String;

    /// The services this source is configured for, if it knows them before it runs (DNS and
    /// etcd sources do; a file source learns them from the file). The runner claims them for
    /// this source when it is spawned, in spawn order, so which source owns a service does
    /// not depend on which answers first: every process configured alike agrees. A service
    /// no source declared goes to the first source that publishes it.
    fn services(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs the source: publishes into `sink` until [`DiscoverySink::closed`] resolves.
    async fn run(self: Box<Self>, sink: DiscoverySink);
}

/// What a source publishes into. Cheap to clone; publishing never blocks.
#[derive(Clone)]
pub struct DiscoverySink {
    source: usize,
    inner: DataArc<RunnerInner>,
}

impl DiscoverySink {
    /// Queues `update` for the registry (merged with what is queued for its service).
    ///
    /// Endpoints that fail [`Endpoint::validate`] are skipped and counted as malformed (the
    /// rest of the update applies); an update for an invalid service name is skipped whole
    /// and counted as rejected. So what reaches the registry is always valid, and one bad
    /// record never holds back the changes merged with it.
    pub fn publish(&self, update: MembershipUpdate) {
        let (update, malformed) = sanitize(update);
        {
            let mut state = self.inner.state.lock();
            if state.closed {
                return;
            }
            let stats = &mut state.sources[self.source].stats;
            stats.updates += 1;
            for reason in &malformed {
                stats.malformed += 1;
                tracing::warn!(source = %stats.name, %reason, "discovery record skipped as malformed");
            }
            let update = match update {
                Ok(update) => update,
                Err(error) => {
                    stats.rejected += 1;
                    stats.last_error = Some(error.to_string());
                    tracing::warn!(source = %stats.name, %error, "discovery update skipped");
                    return;
                }
            };
            let service = update.service().to_owned();
            match state.owners.get(&service) {
                Some(&owner) if owner != self.source => {
                    let owner_name = state.sources[owner].stats.name.clone();
                    let stats = &mut state.sources[self.source].stats;
                    stats.conflicts += 1;
                    tracing::warn!(source = %stats.name, %service, owner = %owner_name,
                        "discovery update skipped: another source owns this service");
                    return;
                }
                Some(_) => {}
                None => {
                    state.owners.insert(service.clone(), self.source);
                }
            }
            let pending = state.pending.remove(&service);
            let merged = Pending::merge(pending, update);
            state.pending.insert(service, merged);
            state.queued_updates += 1;
        }
        self.inner.wake.notify_one();
    }

    /// Reports the source's health; a change to degraded is logged and counted (a new
    /// reason while already degraded is logged and kept as `last_error`, not counted again).
    pub fn set_health(&self, health: SourceHealth) {
        let mut state = self.inner.state.lock();
        let stats = &mut state.sources[self.source].stats;
        if stats.health == health {
            return;
        }
        match &health {
            SourceHealth::Degraded { reason } => {
                // A new reason while already degraded is not a new degradation.
                if !matches!(stats.health, SourceHealth::Degraded { .. }) {
                    stats.degradations += 1;
                }
                stats.last_error = Some(reason.clone());
                tracing::warn!(source = %stats.name, %reason, "discovery source degraded: keeping the last membership");
            }
            SourceHealth::Healthy => {
                tracing::info!(source = %stats.name, "discovery source healthy");
            }
            _ => {}
        }
        stats.health = health;
        drop(state);
        self.inner.progress.send_modify(|p| *p += 1);
    }

    /// Counts a record the source skipped as malformed (and logs `reason`).
    pub fn record_malformed(&self, reason: &str) {
        let mut state = self.inner.state.lock();
        let stats = &mut state.sources[self.source].stats;
        stats.malformed += 1;
        tracing::warn!(source = %stats.name, %reason, "discovery record skipped as malformed");
    }

    /// Whether the runner was shut down (the source should return).
    pub fn is_closed(&self) -> bool {
        self.inner.state.lock().closed
    }

    /// Resolves when the runner is shut down.
    pub async fn closed(&self) {
        let mut closed = self.inner.closed.subscribe();
        // `wait_for` checks the current value first: no shutdown is missed.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

impl fmt::Debug for DiscoverySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoverySink")
            .field("source", &self.source)
            .finish()
    }
}

/// Checks an update before it is queued: the service name, and each endpoint (invalid ones
/// are dropped and described).
fn sanitize(update: MembershipUpdate) -> (Result<MembershipUpdate, crate::Error>, Vec<String>) {
    let mut malformed = Vec::new();
    if let Err(error) = crate::endpoint::validate_service_name(update.service()) {
        return (Err(error), malformed);
    }
    let mut keep_valid = |endpoints: Vec<Endpoint>| {
        endpoints
            .into_iter()
            .filter(|e| match e.validate() {
                Ok(()) => true,
                Err(error) => {
                    malformed.push(format!("{}: {error}", e.address));
                    false
                }
            })
            .collect::<Vec<_>>()
    };
    let update = match update {
        MembershipUpdate::Snapshot { service, endpoints } => MembershipUpdate::Snapshot {
            service,
            endpoints: keep_valid(endpoints),
        },
        MembershipUpdate::Changes {
            service,
            upserts,
            removals,
        } => MembershipUpdate::Changes {
            service,
            upserts: keep_valid(upserts),
            removals,
        },
    };
    (Ok(update), malformed)
}

/// Marks a source stopped when its task ends, normally or by a panic.
struct StoppedOnDrop(DiscoverySink);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.inner.state.lock();
            let stats = &mut state.sources[self.0.source].stats;
            stats.last_error = Some("the source panicked".to_owned());
            tracing::error!(source = %stats.name, "discovery source panicked: its services keep their last membership");
        }
        self.0.set_health(SourceHealth::Stopped);
    }
}

/// What is queued for one service: a full membership, or changes since the registry's.
#[derive(Debug)]
enum Pending {
    Snapshot(BTreeMap<SocketAddr, Endpoint>),
    Changes {
        upserts: BTreeMap<SocketAddr, Endpoint>,
        removals: std::collections::BTreeSet<SocketAddr>,
    },
}

impl Pending {
    fn merge(pending: Option<Self>, update: MembershipUpdate) -> Self {
        match update {
            // A later snapshot makes whatever was queued irrelevant. (A duplicate address
            // in one snapshot: the last one wins here, as a map; the registry never sees it.)
            MembershipUpdate::Snapshot { endpoints, .. } => {
                Self::Snapshot(endpoints.into_iter().map(|e| (e.address, e)).collect())
            }
            MembershipUpdate::Changes {
                upserts, removals, ..
            } => {
                let mut pending = pending.unwrap_or(Self::Changes {
                    upserts: BTreeMap::new(),
                    removals: Default::default(),
                });
                match &mut pending {
                    Self::Snapshot(members) => {
                        for endpoint in upserts {
                            members.insert(endpoint.address, endpoint);
                        }
                        for address in removals {
                            members.remove(&address);
                        }
                    }
                    Self::Changes {
                        upserts: queued,
                        removals: removed,
                    } => {
                        for endpoint in upserts {
                            removed.remove(&endpoint.address);
                            queued.insert(endpoint.address, endpoint);
                        }
                        for address in removals {
                            queued.remove(&address);
                            removed.insert(address);
                        }
                    }
                }
                pending
            }
        }
    }
}

struct SourceSlot {
    stats: SourceStats,
}

#[derive(Default)]
struct RunnerState {
    sources: Vec<SourceSlot>,
    owners: BTreeMap<String, usize>,
    /// Services whose owner was declared at spawn (see [`Discovery::services`]).
    declared: std::collections::BTreeSet<String>,
    pending: BTreeMap<String, Pending>,
    /// Updates published (accepted into `pending`) so far, and applied so far.
    queued_updates: u64,
    applied_updates: u64,
    /// Registry writes made (one per service per round, after coalescing).
    registry_writes: u64,
    closed: bool,
}

struct RunnerInner {
    registry: DataArc<ServiceRegistry>,
    state: Mutex<RunnerState>,
    wake: tokio::sync::Notify,
    closed: tokio::sync::watch::Sender<bool>,
    /// Bumped whenever a source's health changes or a round of updates is applied.
    progress: tokio::sync::watch::Sender<u64>,
}

/// Runs [`Discovery`] sources and applies what they publish to a [`ServiceRegistry`].
///
/// Needs a tokio runtime (sources and the applier run as tasks on the current one). See
/// [`Discovery`] for an example.
pub struct DiscoveryRunner {
    inner: DataArc<RunnerInner>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl DiscoveryRunner {
    /// A runner feeding `registry`; starts its applier task on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn new(registry: DataArc<ServiceRegistry>) -> Self {
        let inner = DataArc::new(RunnerInner {
            registry,
            state: Mutex::new(RunnerState::default()),
            wake: tokio::sync::Notify::new(),
            closed: tokio::sync::watch::channel(false).0,
            progress: tokio::sync::watch::channel(0).0,
        });
        let applier = tokio::spawn(apply_loop(inner.clone()));
        Self {
            inner,
            tasks: Mutex::new(vec![applier]),
        }
    }

    /// Starts `source` on its own task.
    pub fn spawn(&self, source: impl Discovery) {
        self.spawn_boxed(Box::new(source));
    }

    /// Starts a boxed source on its own task.
    pub fn spawn_boxed(&self, source: Box<dyn Discovery>) {
        let name = source.name();
        let declared = source.services();
        let index = {
            let mut state = self.inner.state.lock();
            state.sources.push(SourceSlot {
                stats: SourceStats {
                    name: name.clone(),
                    ..Default::default()
                },
            });
            let index = state.sources.len() - 1;
            for service in declared {
                match state.owners.get(&service) {
                    // Declared by an earlier source: that one keeps it.
                    Some(&owner) if state.declared.contains(&service) => {
                        let owner = state.sources[owner].stats.name.clone();
                        tracing::warn!(source = %name, %service, %owner,
                            "discovery source declares a service another source owns: its updates for it will be skipped");
                    }
                    // Claimed dynamically (first publish) or not at all: the declaration wins.
                    _ => {
                        state.owners.insert(service.clone(), index);
                        state.declared.insert(service);
                    }
                }
            }
            index
        };
        let sink = DiscoverySink {
            source: index,
            inner: self.inner.clone(),
        };
        let task = tokio::spawn(async move {
            // Dropped when `run` returns or unwinds: a source that panicked is reported as
            // stopped (with the reason), so `synced` does not wait for it forever.
            let _stopped = StoppedOnDrop(sink.clone());
            source.run(sink).await;
        });
        self.tasks.lock().push(task);
    }

    /// Every source's counters and health, in spawn order.
    pub fn stats(&self) -> Vec<SourceStats> {
        self.inner
            .state
            .lock()
            .sources
            .iter()
            .map(|s| s.stats.clone())
            .collect()
    }

    /// Registry writes made so far, after coalescing: an upper bound on the table rebuilds
    /// discovery caused in each attached balancer (a write that changes nothing rebuilds
    /// nothing).
    pub fn registry_writes(&self) -> u64 {
        self.inner.state.lock().registry_writes
    }

    /// Resolves once every source has finished its first load (reported anything but
    /// [`SourceHealth::Starting`]) and everything published so far is in the registry (and so
    /// in every attached balancer's routing).
    pub async fn synced(&self) {
        let mut progress = self.inner.progress.subscribe();
        loop {
            progress.borrow_and_update();
            {
                let state = self.inner.state.lock();
                let started = state
                    .sources
                    .iter()
                    .all(|s| s.stats.health != SourceHealth::Starting);
                if state.closed || (started && state.applied_updates >= state.queued_updates) {
                    return;
                }
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops every source and the applier; what is in the registry stays.
    pub async fn shutdown(&self) {
        self.inner.state.lock().closed = true;
        self.inner.closed.send_replace(true);
        self.inner.wake.notify_one();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for DiscoveryRunner {
    fn drop(&mut self) {
        self.inner.state.lock().closed = true;
        self.inner.closed.send_replace(true);
        self.inner.wake.notify_one();
    }
}

impl fmt::Debug for DiscoveryRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryRunner")
            .field("sources", &self.stats())
            .finish()
    }
}

/// Takes everything queued and applies it, one registry change per service, until closed.
async fn apply_loop(inner: DataArc<RunnerInner>) {
    loop {
        let (batch, queued) = {
            let mut state = inner.state.lock();
            if state.closed && state.pending.is_empty() {
                return;
            }
            (std::mem::take(&mut state.pending), state.queued_updates)
        };
        if batch.is_empty() {
            inner.wake.notified().await;
            continue;
        }
        for (service, pending) in batch {
            let result = match pending {
                Pending::Snapshot(members) => {
                    inner
                        .registry
                        .replace(service.as_str(), members.into_values().collect())
                        .await
                }
                Pending::Changes { upserts, removals } => {
                    let removals: Vec<_> = removals.into_iter().collect();
                    inner
                        .registry
                        .update(service.as_str(), upserts.into_values().collect(), &removals)
                        .await
                }
            };
            let mut state = inner.state.lock();
            let owner = state.owners.get(&service).copied();
            state.registry_writes += 1;
            match result {
                Ok(()) => {
                    if let Some(owner) = owner {
                        state.sources[owner].stats.applied += 1;
                    }
                }
                Err(error) => {
                    if let Some(owner) = owner {
                        let stats = &mut state.sources[owner].stats;
                        stats.rejected += 1;
                        stats.last_error = Some(error.to_string());
                        tracing::warn!(source = %stats.name, %service, %error, "discovery update rejected by the registry");
                    }
                }
            }
        }
        inner.state.lock().applied_updates = queued;
        inner.progress.send_modify(|p| *p += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointMetadata;
    use crate::{IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy};

    #[test]
    #[cfg(any(feature = "dns", feature = "etcd"))]
    fn backoff_doubles_to_the_cap_with_jitter() {
        use std::time::Duration;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let bounds = [(50, 100), (100, 200), (200, 400), (200, 400)];
        for (low, high) in bounds {
            let d = backoff.next_delay();
            assert!(
                d >= Duration::from_millis(low) && d <= Duration::from_millis(high),
                "{d:?} not in {low}..={high} ms"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    type Batch = (Vec<MembershipUpdate>, tokio::sync::oneshot::Sender<()>);

    /// Publishes each batch it is sent in one go (no await between updates), then acks.
    struct Scripted(tokio::sync::mpsc::UnboundedReceiver<Batch>);

    #[async_trait::async_trait]
    impl Discovery for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }

        async fn run(mut self: Box<Self>, sink: DiscoverySink) {
            sink.set_health(SourceHealth::Healthy);
            loop {
                let batch = tokio::select! {
                    _ = sink.closed() => return,
                    batch = self.0.recv() => batch,
                };
                let Some((updates, ack)) = batch else { return };
                for update in updates {
                    sink.publish(update);
                }
                let _ = ack.send(());
            }
        }
    }

    struct Harness {
        registry: DataArc<ServiceRegistry>,
        lb: IntegratedLoadBalancer,
        runner: DiscoveryRunner,
        batches: tokio::sync::mpsc::UnboundedSender<Batch>,
    }

    impl Harness {
        async fn new() -> Self {
            let registry = DataArc::new(ServiceRegistry::new());
            let lb = IntegratedLoadBalancer::new(
                registry.clone(),
                LoadBalancingStrategy::RoundRobin,
                LoadBalancerConfig::default(),
            )
            .await
            .unwrap();
            let runner = DiscoveryRunner::new(registry.clone());
            let (batches, inbox) = tokio::sync::mpsc::unbounded_channel();
            runner.spawn(Scripted(inbox));
            runner.synced().await;
            Self {
                registry,
                lb,
                runner,
                batches,
            }
        }

        /// Publishes `updates` as one burst and waits until they are in the registry;
        /// returns the registry writes they cost.
        async fn burst(&self, updates: Vec<MembershipUpdate>) -> u64 {
            let before = self.runner.registry_writes();
            let (ack, acked) = tokio::sync::oneshot::channel();
            self.batches.send((updates, ack)).unwrap();
            acked.await.unwrap();
            self.runner.synced().await;
            self.runner.registry_writes() - before
        }

        /// What the balancer routes `service` over: address and weight, in address order.
        fn routed(&self, service: &str) -> Vec<(SocketAddr, u32)> {
            self.lb
                .service(service)
                .unwrap()
                .endpoints()
                .into_iter()
                .map(|(e, _)| (e.address, e.weight()))
                .collect()
        }
    }

    fn addr(i: usize) -> SocketAddr {
        let [_, _, hi, lo] = u32::try_from(i).unwrap().to_be_bytes();
        SocketAddr::from(([127, 1, hi, lo], 9000))
    }

    fn ep(i: usize, weight: u32) -> Endpoint {
        Endpoint::new(addr(i), Some(EndpointMetadata::new().with_weight(weight)))
    }

    fn changes(upserts: Vec<Endpoint>, removals: Vec<SocketAddr>) -> MembershipUpdate {
        MembershipUpdate::Changes {
            service: "svc".into(),
            upserts,
            removals,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        // One thread: a burst is published entirely before the applier task runs, so the
        // coalescing below is deterministic.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_burst_of_5000_changes_coalesces_into_one_registry_write() {
        rt().block_on(async {
            let h = Harness::new().await;
            let version = h.registry.version();
            // 5,000 changes: 4,000 adds, then 1,000 of them removed one by one.
            let mut burst: Vec<_> = (0..4_000).map(|i| changes(vec![ep(i, 1)], vec![])).collect();
            burst.extend((0..1_000).map(|i| changes(vec![], vec![addr(i * 4)])));
            assert_eq!(burst.len(), 5_000);
            let writes = h.burst(burst).await;
            assert_eq!(writes, 1, "5,000 changes to one service: one registry write");
            assert_eq!(h.registry.version() - version, 1, "one registry version");
            let routed = h.routed("svc");
            assert_eq!(routed.len(), 3_000);
            assert!(routed.iter().all(|(a, _)| !(0..1_000).any(|i| addr(i * 4) == *a)));
            let stats = &h.runner.stats()[0];
            assert_eq!(stats.updates, 5_000);
            assert_eq!(stats.applied, 1);
            // Two services in one burst: one write each.
            let writes = h
                .burst(vec![
                    changes(vec![ep(1, 2)], vec![]),
                    MembershipUpdate::Changes {
                        service: "other".into(),
                        upserts: vec![ep(7, 1)],
                        removals: vec![],
                    },
                    changes(vec![ep(2, 2)], vec![]),
                ])
                .await;
            assert_eq!(writes, 2);
            h.runner.shutdown().await;
        });
    }

    #[test]
    fn coalescing_preserves_the_order_of_upserts_and_removals() {
        rt().block_on(async {
            let h = Harness::new().await;
            h.burst(vec![changes(vec![ep(1, 1), ep(2, 1), ep(3, 1)], vec![])])
                .await;
            let writes = h
                .burst(vec![
                    // removed then re-added: present, with the later metadata
                    changes(vec![], vec![addr(1)]),
                    changes(vec![ep(1, 5)], vec![]),
                    // added then removed: absent (and never routed)
                    changes(vec![ep(4, 1)], vec![]),
                    changes(vec![], vec![addr(4)]),
                    // updated twice: the last wins
                    changes(vec![ep(2, 3)], vec![]),
                    changes(vec![ep(2, 4)], vec![]),
                    // within one update, upserts apply before removals
                    changes(vec![ep(3, 9)], vec![addr(3)]),
                    // removing an address that was never there is harmless
                    changes(vec![], vec![addr(99)]),
                ])
                .await;
            assert_eq!(writes, 1);
            assert_eq!(h.routed("svc"), vec![(addr(1), 5), (addr(2), 4)]);
            h.runner.shutdown().await;
        });
    }

    #[test]
    fn a_snapshot_replaces_queued_changes_and_later_changes_fold_into_it() {
        rt().block_on(async {
            let h = Harness::new().await;
            h.burst(vec![changes(vec![ep(1, 1), ep(2, 1)], vec![])]).await;
            let writes = h
                .burst(vec![
                    changes(vec![ep(3, 1)], vec![]),
                    MembershipUpdate::Snapshot {
                        service: "svc".into(),
                        endpoints: vec![ep(5, 1), ep(6, 1)],
                    },
                    changes(vec![ep(7, 2)], vec![addr(5)]),
                ])
                .await;
            assert_eq!(writes, 1);
            // 1 and 2 (registry) and 3 (queued before the snapshot) are gone; 5 removed after.
            assert_eq!(h.routed("svc"), vec![(addr(6), 1), (addr(7), 2)]);
            // An empty snapshot empties the service but keeps it known.
            h.burst(vec![MembershipUpdate::Snapshot {
                service: "svc".into(),
                endpoints: vec![],
            }])
            .await;
            assert!(h.routed("svc").is_empty());
            h.runner.shutdown().await;
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalid_endpoint_is_dropped_and_the_rest_of_the_update_applies() {
        let h = Harness::new().await;
        h.burst(vec![MembershipUpdate::Snapshot {
            service: "svc".into(),
            endpoints: vec![ep(1, 1), ep(2, 1)],
        }])
        .await;
        // Port 0 is invalid; it arrives merged with a valid upsert and a removal.
        let bad = Endpoint::new("127.0.0.1:0".parse().unwrap(), None);
        h.burst(vec![MembershipUpdate::Changes {
            service: "svc".into(),
            upserts: vec![bad, ep(3, 5)],
            removals: vec![addr(1)],
        }])
        .await;
        assert_eq!(h.routed("svc"), vec![(addr(2), 1), (addr(3), 5)]);
        let stats = &h.runner.stats()[0];
        assert_eq!((stats.malformed, stats.rejected), (1, 0));
        // An invalid service name is skipped whole and counted.
        h.burst(vec![MembershipUpdate::Snapshot {
            service: " bad name".into(),
            endpoints: vec![ep(4, 1)],
        }])
        .await;
        assert_eq!(h.runner.stats()[0].rejected, 1);
        assert_eq!(h.registry.services().await, vec!["svc".to_owned()]);
        h.runner.shutdown().await;
    }

    struct Panics;

    #[async_trait::async_trait]
    impl Discovery for Panics {
        fn name(&self) -> String {
            "panics".into()
        }

        async fn run(self: Box<Self>, sink: DiscoverySink) {
            sink.publish(MembershipUpdate::Snapshot {
                service: "kept".into(),
                endpoints: vec![ep(7, 1)],
            });
            panic!("a source bug");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_that_panics_is_reported_stopped_and_its_membership_stays() {
        let registry = DataArc::new(ServiceRegistry::new());
        let runner = DiscoveryRunner::new(registry.clone());
        runner.spawn(Panics);
        tokio::time::timeout(std::time::Duration::from_secs(5), runner.synced())
            .await
            .expect("synced must not wait for a dead source");
        let stats = &runner.stats()[0];
        assert_eq!(stats.health, SourceHealth::Stopped);
        assert_eq!(stats.last_error.as_deref(), Some("the source panicked"));
        assert_eq!(registry.endpoints("kept").await.unwrap().len(), 1);
        runner.shutdown().await;
    }

    /// Publishes one snapshot of `svc` after `delay`; declares `svc` if `declare`.
    struct Timed {
        name: &'static str,
        declare: bool,
        delay: std::time::Duration,
        endpoint: usize,
    }

    #[async_trait::async_trait]
    impl Discovery for Timed {
        fn name(&self) -> String {
            self.name.into()
        }

        fn services(&self) -> Vec<String> {
            if self.declare {
                vec!["svc".into()]
            } else {
                Vec::new()
            }
        }

        async fn run(self: Box<Self>, sink: DiscoverySink) {
            tokio::time::sleep(self.delay).await;
            sink.publish(MembershipUpdate::Snapshot {
                service: "svc".into(),
                endpoints: vec![ep(self.endpoint, 1)],
            });
            sink.set_health(SourceHealth::Healthy);
            sink.closed().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_declared_service_belongs_to_its_source_whoever_answers_first() {
        let registry = DataArc::new(ServiceRegistry::new());
        let runner = DiscoveryRunner::new(registry.clone());
        // The declaring source is slow; the undeclared one publishes at once, and loses.
        runner.spawn(Timed {
            name: "declares",
            declare: true,
            delay: std::time::Duration::from_millis(100),
            endpoint: 1,
        });
        runner.spawn(Timed {
            name: "eager",
            declare: false,
            delay: std::time::Duration::ZERO,
            endpoint: 2,
        });
        runner.synced().await;
        let addresses: Vec<_> = registry
            .endpoints("svc")
            .await
            .unwrap()
            .iter()
            .map(|e| e.address)
            .collect();
        assert_eq!(addresses, vec![addr(1)]);
        let stats = runner.stats();
        assert_eq!((stats[0].conflicts, stats[1].conflicts), (0, 1));
        runner.shutdown().await;
    }
}
