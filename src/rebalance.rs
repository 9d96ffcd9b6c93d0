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

#[cfg(feature = "runtime")]
use crate::stats::{DrainReport, ReleasedEndpoint};
use crate::stats::{EndpointHealth, RebalanceEvent, RebalanceTrigger, RoutingUpdate};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

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
pub(crate) use manager::RebalanceHost;
#[cfg(feature = "runtime")]
pub use manager::{RebalanceEvents, RebalanceManager};

#[cfg(feature = "runtime")]
mod manager {
    use std::fmt;

    use std::time::Duration;

    use super::*;
    use crate::affinity::AffinityManager;
    use crate::config::rebalance::RebalanceStrategy;
    use crate::error::Error;
    use crate::handoff::{ControlEvent, Watcher};
    use crate::sync::{DataArc, DataWeak, Mutex};

    /// What the rebalancer needs of its balancer: its control-plane events, its topology, its
    /// settings and its affinity table. Implemented by the balancer; the rebalancer holds it
    /// weakly and knows nothing else of it.
    pub(crate) trait RebalanceHost: Send + Sync {
        /// Calls `watcher` for every control-plane event from now on.
        fn subscribe(&self, watcher: Watcher);
        /// Every service's members and their health in the current snapshots.
        fn topology(&self) -> Vec<(String, Vec<(SocketAddr, EndpointHealth)>)>;
        /// The configured strategy.
        fn strategy(&self) -> RebalanceStrategy;
        /// The routable members of `service` now (healthy, not draining), with the table
        /// version.
        fn routable_set(&self, service: &str) -> Result<(u64, std::collections::HashSet<SocketAddr>), Error>;
        /// The session-affinity table.
        fn affinity(&self) -> &AffinityManager;
        /// Requests in flight on `address` of `service` over all its generations, and
        /// whether every table older than `since_version` is gone (`None`: unknown service).
        fn drain_status(&self, service: &str, address: SocketAddr, since_version: u64)
        -> Option<(u64, bool)>;
    }

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
        host: DataWeak<dyn RebalanceHost>,
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
        pub(crate) fn new(host: DataWeak<dyn RebalanceHost>) -> Self {
            Self {
                inner: DataArc::new(Inner {
                    host,
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
            let host = self.inner.host.upgrade().ok_or(Error::Stopped)?;
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Runtime {
                message: e.to_string(),
            })?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            host.subscribe(Box::new(move |event: &ControlEvent| {
                tx.send(event.clone()).is_ok()
            }));
            // What routing looks like now, so the first change after `start` is reported as a
            // change (an update already in this seed arrives as an empty diff).
            let mut diff = TopologyDiff::default();
            for (name, members) in host.topology() {
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
                .host
                .upgrade()
                .map(|host| host.strategy())
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
            let host = self.inner.host.upgrade().ok_or(Error::Stopped)?;
            let (version, keep) = host.routable_set(service)?;
            let moved = host.affinity().unbind_where(service, |a| !keep.contains(&a));
            let mut event = RebalanceEvent::new(service, RebalanceTrigger::Manual, version);
            event.affinity_keys_moved = moved;
            self.inner.publish(&event);
            Ok(event)
        }

        /// Waits until a draining endpoint is released: nothing in flight on it (over all its
        /// generations) once no table older than `since_version` (the first one with it out of
        /// routing) is held, so no request can still start on it; and, under `Gradual`, its
        /// affinity keys moved off in batches. Or until the drain timeout. Moves the keys by
        /// the strategy, publishes the progress and the release, and reports.
        pub(crate) async fn wait_drained(
            &self,
            service: &DataArc<str>,
            address: SocketAddr,
            since_version: u64,
            in_flight_at_start: u64,
            started: tokio::time::Instant,
        ) -> DrainReport {
            let Some(host) = self.inner.host.upgrade() else {
                return DrainReport {
                    address,
                    in_flight_at_start,
                    in_flight_at_end: 0,
                    timed_out: false,
                    affinity_keys_moved: 0,
                    elapsed: started.elapsed(),
                };
            };
            let strategy = host.strategy();
            let timeout = strategy.drain_timeout();
            let affinity = host.affinity();
            let mut moved = match strategy {
                RebalanceStrategy::Immediate => affinity.unbind(service, address, usize::MAX),
                _ => 0,
            };
            let mut next_batch = started;
            loop {
                let now = tokio::time::Instant::now();
                if let RebalanceStrategy::Gradual {
                    batch_size,
                    batch_interval,
                    ..
                } = &strategy
                {
                    if now >= next_batch {
                        let batch = affinity.unbind(service, address, *batch_size);
                        moved += batch;
                        next_batch = now.checked_add(*batch_interval).unwrap_or(now);
                        if batch > 0 {
                            let mut event = RebalanceEvent::new(&**service, RebalanceTrigger::Drain, 0);
                            event.affinity_keys_moved = batch;
                            event.affinity_keys_pending = affinity.count_bound(service, address);
                            self.inner.publish(&event);
                        }
                    }
                }
                // Unknown service (removed meanwhile): nothing can be in flight through it.
                let (in_flight, settled) = host
                    .drain_status(service, address, since_version)
                    .unwrap_or((0, true));
                let keys_left = matches!(strategy, RebalanceStrategy::Gradual { .. })
                    && affinity.count_bound(service, address) > 0;
                let timed_out = now.duration_since(started) >= timeout;
                let drained = settled && in_flight == 0 && !keys_left;
                if drained || timed_out {
                    let report = DrainReport {
                        address,
                        in_flight_at_start,
                        in_flight_at_end: in_flight,
                        timed_out: !drained,
                        affinity_keys_moved: moved,
                        elapsed: now.duration_since(started),
                    };
                    let mut event = RebalanceEvent::new(&**service, RebalanceTrigger::Drain, 0);
                    event.released.push(ReleasedEndpoint {
                        address,
                        in_flight_abandoned: in_flight,
                        timed_out: report.timed_out,
                    });
                    event.affinity_keys_moved = moved;
                    self.inner.publish(&event);
                    tracing::info!(
                        service = %service,
                        endpoint = %address,
                        in_flight_at_start,
                        in_flight_at_end = in_flight,
                        timed_out = report.timed_out,
                        keys_moved = moved,
                        "drain finished"
                    );
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
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
                let Some(host) = inner.host.upgrade() else {
                    return;
                };
                let moved = host.affinity().unbind(&service, address, batch_size);
                if moved == 0 {
                    return;
                }
                let mut event = RebalanceEvent::new(service.clone(), RebalanceTrigger::Topology, 0);
                event.affinity_keys_moved = moved;
                event.affinity_keys_pending = host.affinity().count_bound(&service, address);
                let done = event.affinity_keys_pending == 0;
                drop(host);
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
                let Some(host) = inner.host.upgrade() else {
                    return;
                };
                // One event's handling panicking (a bug) is logged and the next event is
                // handled: the rebalancer never stops silently.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Self::handle(&inner, &*host, &mut diff, event);
                }));
                if handled.is_err() {
                    tracing::error!("rebalancer: handling a topology event panicked; going on with the next");
                }
            }
        }

        fn handle(
            inner: &DataArc<Inner>,
            host: &dyn RebalanceHost,
            diff: &mut TopologyDiff,
            event: ControlEvent,
        ) {
            let strategy = host.strategy();
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
                        event.affinity_keys_moved = host
                            .affinity()
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
