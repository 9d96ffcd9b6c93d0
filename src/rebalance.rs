//! Rebalancing: topology-change events, draining, and moving session-affinity keys.
//!
//! This module owns [`RebalanceConfig`]/[`RebalanceStrategy`], the event types
//! ([`RebalanceEvent`], [`ReleasedEndpoint`], [`DrainReport`]) and [`RebalanceManager`], which
//! follows a balancer's table publications, reports what changed, and moves affinity keys off
//! endpoints that left routing according to the strategy:
//!
//! | strategy | keys of an endpoint that left routing | keys of a draining endpoint | drain waits at most |
//! |---|---|---|---|
//! | `Immediate` | unbound at once | unbound at once | 30 s |
//! | `Gradual` | unbound at once (nothing can serve them) | keep being served, unbound `batch_size` per `batch_interval` | `drain_timeout` |
//! | `Manual` | re-bound on their next lookup | keep being served until `rebalance_service` | 30 s |
//!
//! Draining ([`IntegratedLoadBalancer::drain`](crate::IntegratedLoadBalancer::drain)) takes an
//! endpoint out of new picks at once (read-your-writes), lets requests in flight complete, and
//! reports it *released* when its in-flight count reaches 0 or the drain timeout expires,
//! whichever comes first. A deregistered endpoint is released the same way by the control
//! plane (its counters are folded into the service's and its state dropped).
#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::stats::{EndpointHealth, RoutingUpdate};

/// Drain timeout of the `Immediate` and `Manual` strategies.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest accepted `rebalance.strategy.drain_timeout` (a day).
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted `rebalance.strategy.batch_interval` (an hour).
pub const MAX_BATCH_INTERVAL: Duration = Duration::from_secs(3600);

/// How affinity keys move and how long drains wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RebalanceStrategy {
    /// Keys bound to an endpoint that leaves routing (or drains) are unbound at once.
    #[default]
    Immediate,
    /// A draining endpoint keeps serving its sticky keys while they are unbound in batches.
    Gradual {
        /// How long a drain waits for requests in flight (and keys) before releasing.
        #[serde(with = "humantime_serde")]
        drain_timeout: Duration,
        /// Keys unbound per batch.
        batch_size: usize,
        /// Time between batches.
        #[serde(with = "humantime_serde")]
        batch_interval: Duration,
    },
    /// Nothing moves until [`RebalanceManager::rebalance_service`] is called.
    Manual,
}

impl RebalanceStrategy {
    /// A gradual strategy with `drain_timeout`, 100 keys per batch, a batch every 100 ms.
    pub fn gradual(drain_timeout: Duration) -> Self {
        Self::Gradual {
            drain_timeout,
            batch_size: 100,
            batch_interval: Duration::from_millis(100),
        }
    }

    /// How long a drain waits for requests in flight.
    pub fn drain_timeout(&self) -> Duration {
        match self {
            Self::Gradual { drain_timeout, .. } => *drain_timeout,
            Self::Immediate | Self::Manual => DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Whether a draining endpoint keeps serving the keys bound to it (until they are moved).
    pub(crate) fn sticky_while_draining(&self) -> bool {
        !matches!(self, Self::Immediate)
    }
}

/// Rebalancing settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// How keys move and how long drains wait (default `Immediate`).
    pub strategy: RebalanceStrategy,
}

impl RebalanceConfig {
    /// Checks every field (prefix `rebalance.`).
    pub fn validate(&self) -> Result<(), Error> {
        if let RebalanceStrategy::Gradual {
            drain_timeout,
            batch_size,
            batch_interval,
        } = &self.strategy
        {
            if drain_timeout.is_zero() || *drain_timeout > MAX_DRAIN_TIMEOUT {
                return Err(Error::invalid_config(
                    "rebalance.strategy.drain_timeout",
                    format!("{drain_timeout:?} is not between zero (excluded) and a day"),
                ));
            }
            if *batch_size == 0 {
                return Err(Error::invalid_config(
                    "rebalance.strategy.batch_size",
                    "must be at least 1",
                ));
            }
            if batch_interval.is_zero() || *batch_interval > MAX_BATCH_INTERVAL {
                return Err(Error::invalid_config(
                    "rebalance.strategy.batch_interval",
                    format!("{batch_interval:?} is not between zero (excluded) and an hour"),
                ));
            }
        }
        Ok(())
    }
}

/// What started a rebalance event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RebalanceTrigger {
    /// A new routing table: membership or health changed.
    Topology,
    /// [`RebalanceManager::rebalance_service`].
    Manual,
    /// A drain (or a batch of its keys moving).
    Drain,
    /// An endpoint that left was released by the control plane.
    Release,
}

/// An endpoint whose requests in flight are finished (or abandoned at the drain timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasedEndpoint {
    /// The endpoint.
    pub address: SocketAddr,
    /// Requests still in flight when it was released (0 unless it timed out).
    pub in_flight_abandoned: u64,
    /// Whether the drain timeout expired first.
    pub timed_out: bool,
}

/// What changed in a service, and what the rebalancer did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalanceEvent {
    /// The service.
    pub service: String,
    /// What started it.
    pub trigger: RebalanceTrigger,
    /// The routing-table version it refers to (0 when none).
    pub version: u64,
    /// Endpoints that joined.
    pub added: Vec<SocketAddr>,
    /// Endpoints that left (deregistered).
    pub removed: Vec<SocketAddr>,
    /// Endpoints whose health changed, with the new health.
    pub health_changed: Vec<(SocketAddr, EndpointHealth)>,
    /// Endpoints released after draining or removal.
    pub released: Vec<ReleasedEndpoint>,
    /// Affinity keys moved off endpoints (unbound, to be re-bound on their next request).
    pub affinity_keys_moved: usize,
    /// Affinity keys still bound to a draining endpoint (gradual progress).
    pub affinity_keys_pending: usize,
}

impl RebalanceEvent {
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn new(service: impl Into<String>, trigger: RebalanceTrigger, version: u64) -> Self {
        Self {
            service: service.into(),
            trigger,
            version,
            added: Vec::new(),
            removed: Vec::new(),
            health_changed: Vec::new(),
            released: Vec::new(),
            affinity_keys_moved: 0,
            affinity_keys_pending: 0,
        }
    }

    /// Whether anything changed or moved.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.health_changed.is_empty()
            && self.released.is_empty()
            && self.affinity_keys_moved == 0
    }
}

/// The outcome of a drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// The endpoint.
    pub address: SocketAddr,
    /// Requests in flight when the drain started.
    pub in_flight_at_start: u64,
    /// Requests still in flight when it ended (0 unless it timed out).
    pub in_flight_at_end: u64,
    /// Whether the drain timeout expired first.
    pub timed_out: bool,
    /// Affinity keys moved off the endpoint.
    pub affinity_keys_moved: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// Diffs consecutive publications of each service.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
pub(crate) struct TopologyDiff {
    last: HashMap<String, BTreeMap<SocketAddr, EndpointHealth>>,
}

#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
impl TopologyDiff {
    /// The event for `update` (added, removed, health changes), remembering it.
    pub(crate) fn apply(&mut self, update: &RoutingUpdate) -> RebalanceEvent {
        let mut event =
            RebalanceEvent::new(update.service.clone(), RebalanceTrigger::Topology, update.version);
        let now: BTreeMap<SocketAddr, EndpointHealth> = update.endpoints.iter().copied().collect();
        let before = self.last.remove(&update.service).unwrap_or_default();
        for (address, health) in &now {
            match before.get(address) {
                None => event.added.push(*address),
                Some(old) if old != health => event.health_changed.push((*address, *health)),
                Some(_) => {}
            }
        }
        event.removed = before.keys().filter(|a| !now.contains_key(a)).copied().collect();
        if !update.removed {
            self.last.insert(update.service.clone(), now);
        }
        event
    }
}

#[cfg(feature = "runtime")]
pub use manager::{RebalanceEvents, RebalanceManager};

#[cfg(feature = "runtime")]
mod manager {
    use std::fmt;

    use super::*;
    use crate::balancer::Shared;
    use crate::control::ControlEvent;
    use crate::sync::{DataArc, DataWeak, Mutex};

    /// A subscription to [`RebalanceEvent`]s.
    #[derive(Debug)]
    pub struct RebalanceEvents(tokio::sync::mpsc::UnboundedReceiver<RebalanceEvent>);

    impl RebalanceEvents {
        /// The next event (waits for one); `None` once the balancer is gone.
        pub async fn recv(&mut self) -> Option<RebalanceEvent> {
            self.0.recv().await
        }

        /// The next event if one is waiting.
        pub fn try_recv(&mut self) -> Option<RebalanceEvent> {
            self.0.try_recv().ok()
        }
    }

    struct Inner {
        shared: DataWeak<Shared>,
        subscribers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<RebalanceEvent>>>,
        task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    }

    /// Follows a balancer's topology and moves affinity keys by the configured strategy.
    ///
    /// Obtain it with [`IntegratedLoadBalancer::rebalancer`](crate::IntegratedLoadBalancer::rebalancer).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tai_loadbalancer::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// # let registry = Arc::new(ServiceRegistry::new());
    /// # registry.register("service", Endpoint::new("127.0.0.1:5001".parse().unwrap(), None)).await?;
    /// # let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?;
    /// let manager = lb.rebalancer();
    /// let mut events = manager.subscribe();
    /// // Start watching for changes
    /// manager.start().await?;
    /// // Manually trigger rebalance
    /// let event = manager.rebalance_service("service").await?;
    /// assert_eq!(event.affinity_keys_moved, 0);
    /// # drop(events.try_recv());
    /// # Ok(())
    /// # }
    /// ```
    pub struct RebalanceManager {
        inner: DataArc<Inner>,
    }

    impl RebalanceManager {
        pub(crate) fn new(shared: DataWeak<Shared>) -> Self {
            Self {
                inner: DataArc::new(Inner {
                    shared,
                    subscribers: Mutex::new(Vec::new()),
                    task: Mutex::new(None),
                }),
            }
        }

        /// Events from now on. Drop the receiver to unsubscribe.
        pub fn subscribe(&self) -> RebalanceEvents {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.inner.subscribers.lock().push(tx);
            RebalanceEvents(rx)
        }

        /// Starts following the balancer's publications on the current tokio runtime.
        /// Idempotent.
        ///
        /// # Errors
        ///
        /// [`Error::Runtime`] outside a runtime; [`Error::Stopped`] if the balancer is gone.
        pub async fn start(&self) -> Result<(), Error> {
            let mut task = self.inner.task.lock();
            if task.is_some() {
                return Ok(());
            }
            let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Runtime {
                message: e.to_string(),
            })?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            shared.control.subscribe(Box::new(move |event: &ControlEvent| {
                tx.send(event.clone()).is_ok()
            }));
            // What routing looks like now, so the first change after `start` is reported as a
            // change (an update already in this seed arrives as an empty diff).
            let mut diff = TopologyDiff::default();
            for (name, members) in shared.current_topology() {
                diff.last.insert(name, members.into_iter().collect());
            }
            *task = Some(runtime.spawn(Inner::run(self.inner.clone(), rx, diff)));
            Ok(())
        }

        /// Stops following (idempotent).
        pub fn stop(&self) {
            if let Some(task) = self.inner.task.lock().take() {
                task.abort();
            }
        }

        /// The configured strategy.
        pub fn strategy(&self) -> RebalanceStrategy {
            self.inner
                .shared
                .upgrade()
                .map(|s| s.control.settings().config.rebalance.strategy.clone())
                .unwrap_or_default()
        }

        /// Moves every affinity key of `service` bound to an endpoint that cannot take it
        /// (gone, unhealthy, ejected, down or draining) off that endpoint now; the keys are
        /// re-bound to their consistent-hash owner on their next request.
        ///
        /// # Errors
        ///
        /// [`Error::UnknownService`], [`Error::Stopped`].
        pub async fn rebalance_service(&self, service: &str) -> Result<RebalanceEvent, Error> {
            let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
            let (version, keep) = shared.routable_set(service)?;
            let moved = shared.affinity.unbind_where(service, |a| !keep.contains(&a));
            let mut event = RebalanceEvent::new(service, RebalanceTrigger::Manual, version);
            event.affinity_keys_moved = moved;
            self.inner.publish(&event);
            Ok(event)
        }

        /// Publishes an event to the subscribers (used by drains).
        pub(crate) fn publish(&self, event: &RebalanceEvent) {
            self.inner.publish(event);
        }
    }

    impl Drop for RebalanceManager {
        fn drop(&mut self) {
            self.stop();
        }
    }

    impl fmt::Debug for RebalanceManager {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RebalanceManager")
                .field("running", &self.inner.task.lock().is_some())
                .finish_non_exhaustive()
        }
    }

    impl Inner {
        fn publish(&self, event: &RebalanceEvent) {
            tracing::debug!(
                service = %event.service,
                trigger = ?event.trigger,
                added = event.added.len(),
                removed = event.removed.len(),
                health_changed = event.health_changed.len(),
                released = event.released.len(),
                keys_moved = event.affinity_keys_moved,
                "rebalance event"
            );
            self.subscribers.lock().retain(|s| s.send(event.clone()).is_ok());
        }

        /// Unbinds the keys of a removed endpoint `batch_size` at a time, one batch per
        /// `batch_interval`, publishing each batch with what is still pending.
        async fn unbind_in_batches(
            inner: DataArc<Inner>,
            service: String,
            address: SocketAddr,
            batch_size: usize,
            batch_interval: Duration,
        ) {
            loop {
                let Some(shared) = inner.shared.upgrade() else {
                    return;
                };
                let moved = shared.affinity.unbind(&service, address, batch_size);
                if moved == 0 {
                    return;
                }
                let mut event = RebalanceEvent::new(service.clone(), RebalanceTrigger::Topology, 0);
                event.affinity_keys_moved = moved;
                event.affinity_keys_pending = shared.affinity.count_bound(&service, address);
                let done = event.affinity_keys_pending == 0;
                drop(shared);
                inner.publish(&event);
                if done {
                    return;
                }
                tokio::time::sleep(batch_interval).await;
            }
        }

        async fn run(
            inner: DataArc<Inner>,
            mut events: tokio::sync::mpsc::UnboundedReceiver<ControlEvent>,
            mut diff: TopologyDiff,
        ) {
            while let Some(event) = events.recv().await {
                let Some(shared) = inner.shared.upgrade() else {
                    return;
                };
                // One event's handling panicking (a bug) is logged and the next event is
                // handled: the rebalancer never stops silently.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Self::handle(&inner, &shared, &mut diff, event);
                }));
                if handled.is_err() {
                    tracing::error!("rebalancer: handling a topology event panicked; going on with the next");
                }
            }
        }

        fn handle(inner: &DataArc<Inner>, shared: &Shared, diff: &mut TopologyDiff, event: ControlEvent) {
            let strategy = shared.control.settings().config.rebalance.strategy.clone();
            match event {
                ControlEvent::Published(update) => {
                    let mut event = diff.apply(&update);
                    // Under `Gradual`, the keys of removed endpoints are unbound in
                    // batches (each key still moves at once on its own next request: the
                    // endpoint is gone); progress is published per batch.
                    let batched: Vec<SocketAddr> = match &strategy {
                        RebalanceStrategy::Gradual {
                            batch_size,
                            batch_interval,
                            ..
                        } => {
                            for &address in &event.removed {
                                let (inner, service) = (inner.clone(), update.service.clone());
                                let (batch_size, batch_interval) = (*batch_size, *batch_interval);
                                tokio::spawn(async move {
                                    Self::unbind_in_batches(
                                        inner,
                                        service,
                                        address,
                                        batch_size,
                                        batch_interval,
                                    )
                                    .await;
                                });
                            }
                            event.removed.clone()
                        }
                        _ => Vec::new(),
                    };
                    // Keys bound to endpoints that can no longer serve them.
                    let gone: Vec<SocketAddr> = event
                        .removed
                        .iter()
                        .copied()
                        .filter(|a| !batched.contains(a))
                        .chain(event.health_changed.iter().filter_map(|(a, h)| {
                            let leaves = match h {
                                EndpointHealth::Healthy => false,
                                EndpointHealth::Draining => !strategy.sticky_while_draining(),
                                _ => true,
                            };
                            leaves.then_some(*a)
                        }))
                        .collect();
                    if !matches!(strategy, RebalanceStrategy::Manual) && !gone.is_empty() {
                        event.affinity_keys_moved = shared
                            .affinity
                            .unbind_where(&update.service, |a| gone.contains(&a));
                    }
                    if !event.is_empty() {
                        inner.publish(&event);
                    }
                }
                ControlEvent::Released { service, released } => {
                    let mut event = RebalanceEvent::new(service, RebalanceTrigger::Release, 0);
                    event.released.push(released);
                    inner.publish(&event);
                }
            }
        }
    }
}
