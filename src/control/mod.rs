//! The control plane: consumes membership changes, rebuilds routing tables, publishes them.
//!
//! This module owns the *write path*. Writers never touch a table: a registry change pushes a
//! [`Command`] naming the changed service onto the [`queue`] and awaits its acknowledgement.
//! The control plane takes commands in batches, reads each touched service's *current*
//! membership from the registry once (so a burst of k changes to one service costs one
//! membership copy and one rebuild, not k), builds new immutable tables with
//! [`crate::table::build`], stores each with one `store`, republishes the service
//! [`Directory`] when services appear or disappear, and only then acknowledges the batch.
//!
//! Two executors run the same [`ControlPlane::process`] step:
//!
//! * the control-plane thread ([`ControlPlane::start`]), which blocks on the queue;
//! * before the thread is started (or if the caller asks), the writer itself
//!   ([`ControlPlane::help`]), so a balancer that was never started still follows its
//!   registry with read-your-writes.
//!
//! # Invariants
//!
//! * Commands are taken from the queue while the state lock is held, and the membership they
//!   announce is read from the registry after they were taken, so what is published is at
//!   least as new as every change acknowledged with it (read-your-writes), even when the
//!   thread and helpers race.
//! * Per service, membership versions only move forward; an older one is ignored.
//! * Lock order: control state, then registry, then queue. The registry never takes the
//!   control state lock.
//! * Endpoint states are kept per address across rebuilds (counters survive republication).
//!   A metadata change starts a new generation of the state; a removed endpoint's state, or
//!   a replaced generation, retires: its counters stay in the endpoint's (or, once the address
//!   is gone, the service's) totals, and it is dropped once no table or guard refers to it.
//! * After [`ControlPlane::shutdown`] no table is published except the stopped tombstones.
//! * Timers (ejection expiry, slow-start ramps) run on the control-plane thread only: a
//!   balancer that was never started applies changes but does not run timers.
#![deny(unsafe_code)]

pub(crate) mod queue;
mod service;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use crate::endpoint::Endpoint;
use crate::stats::RoutingUpdate;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Arc, DataArc, DataWeak, Mutex, SnapshotCell, mpsc, thread};
use crate::table::{Directory, Miss, OutlierSink};
use crate::{Error, HealthStatus, LoadBalancerConfig, LoadBalancingStrategy};
use queue::{Ack, Envelope, Queue};
use service::ServiceControl;
pub(crate) use service::{EndpointCounters, ServiceCounters};

/// A change for the control plane.
#[derive(Debug)]
pub(crate) enum Command {
    /// The membership of this service changed in the registry (or it was created or removed):
    /// read it again.
    Changed(DataArc<str>),
    /// A hash-keyed pick found no ring on this service's table: build rings for it.
    WantRing(DataArc<str>),
    /// The active health of an endpoint of this service changed: read it again.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    HealthChanged(DataArc<str>),
    /// An endpoint reached its consecutive-failure threshold (outlier detection).
    Outlier {
        service: DataArc<str>,
        address: SocketAddr,
    },
    /// An operator marked an endpoint down (`true`) or up again (`false`).
    MarkDown {
        service: DataArc<str>,
        address: SocketAddr,
        down: bool,
    },
    /// Start (`true`) or stop draining an endpoint: no new picks, requests in flight finish.
    Drain {
        service: DataArc<str>,
        address: SocketAddr,
        draining: bool,
    },
    /// Route the service to the first healthy endpoint of this order (`None`: by strategy).
    Failover {
        service: DataArc<str>,
        order: Option<Vec<SocketAddr>>,
    },
}

/// Where the control plane reads memberships from (the registry; a trait so the control
/// plane does not depend on the registry's internals).
pub(crate) trait MembershipSource {
    /// The current membership of `service` (sorted by address) and its version, `None` if
    /// the service does not exist.
    fn membership(&self, service: &str) -> Option<(u64, DataArc<[Endpoint]>)>;
}

/// Where the control plane reads active health from (the health checker).
pub(crate) trait HealthSource: Send + Sync {
    /// Members of `service` currently failing their checks.
    fn unhealthy(&self, service: &str) -> Vec<SocketAddr>;
    /// The check status of one endpoint, for metrics.
    fn status(&self, service: &str, address: SocketAddr) -> Option<HealthStatus>;
}

/// What the control plane tells its subscribers.
#[derive(Clone, Debug)]
pub(crate) enum ControlEvent {
    /// A table was published.
    Published(RoutingUpdate),
    /// A removed endpoint's requests are finished (or abandoned at the drain timeout).
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    Released {
        service: String,
        released: crate::rebalance::ReleasedEndpoint,
    },
}

/// A subscriber: called for each event on the control plane's thread; must not block.
/// Returns `false` to unsubscribe.
pub(crate) type Watcher = Box<dyn FnMut(&ControlEvent) -> bool + Send>;

/// What a control step reads from.
#[derive(Clone, Copy)]
pub(crate) struct Sources<'a> {
    pub(crate) membership: &'a dyn MembershipSource,
    pub(crate) health: Option<&'a dyn HealthSource>,
}

// ===== impl ControlState =====

/// Everything the control plane knows; guarded by [`ControlPlane`]'s state lock.
struct ControlState {
    services: HashMap<DataArc<str>, ServiceControl, ahash::RandomState>,
    watchers: Vec<Watcher>,
    stopped: bool,
}

impl ControlState {
    /// Applies a batch and publishes what changed.
    fn step(
        &mut self,
        cfg: &Settings,
        sources: &Sources<'_>,
        directory: &SnapshotCell<Directory>,
        batch: impl Iterator<Item = Command>,
    ) {
        if self.stopped {
            return;
        }
        let now = Instant::now();
        let mut dirty: Vec<DataArc<str>> = Vec::new();
        let mut changed: Vec<DataArc<str>> = Vec::new();
        for command in batch {
            match command {
                Command::Changed(service) => {
                    if !changed.contains(&service) {
                        changed.push(service);
                    }
                }
                Command::WantRing(service) | Command::HealthChanged(service) => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        if sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                Command::Outlier { service, address } => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        if sc.eject(address, cfg, now) && sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                Command::MarkDown {
                    service,
                    address,
                    down,
                } => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        if sc.mark_down(address, down) && sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                Command::Drain {
                    service,
                    address,
                    draining,
                } => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        if sc.set_draining(address, draining) && sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                Command::Failover { service, order } => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        sc.failover_order = order;
                        if sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
            }
        }
        let mut directory_changed = false;
        for service in changed {
            match (
                sources.membership.membership(&service),
                self.services.get_mut(&service),
            ) {
                (Some((version, endpoints)), Some(sc)) => {
                    if version > sc.membership_version {
                        sc.membership_version = version;
                        sc.endpoints = endpoints;
                        if sc.mark() {
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                (Some((version, endpoints)), None) => {
                    let mut sc =
                        ServiceControl::new(service.clone(), cfg.strategy_for(&service), cfg.hash_slots);
                    sc.membership_version = version;
                    sc.endpoints = endpoints;
                    dirty.push(sc.name.clone());
                    self.services.insert(service, sc);
                    directory_changed = true;
                }
                (None, Some(_)) => {
                    if let Some(mut sc) = self.services.remove(&service) {
                        let update = sc.bury(Miss::Removed, cfg.strategy_for(&service), cfg.hash_slots);
                        self.announce(update);
                        tracing::debug!(service = %sc.name, "service removed");
                    }
                    directory_changed = true;
                }
                (None, None) => {}
            }
        }
        self.rebuild(dirty, cfg, sources, now);
        if directory_changed {
            self.publish_directory(directory);
        }
    }

    /// Rebuilds the named services that are still dirty, and sweeps retired generations.
    fn rebuild(&mut self, dirty: Vec<DataArc<str>>, cfg: &Settings, sources: &Sources<'_>, now: Instant) {
        for name in dirty {
            if let Some(sc) = self.services.get_mut(&name) {
                if sc.dirty {
                    let update = sc.rebuild(cfg, sources, now);
                    self.announce(update);
                }
            }
        }
        let drain_timeout = cfg.config.rebalance.strategy.drain_timeout();
        let mut released = Vec::new();
        for sc in self.services.values_mut() {
            if !sc.retiring.is_empty() {
                for r in sc.sweep(now, drain_timeout) {
                    released.push((sc.name.to_string(), r));
                }
            }
        }
        for (service, released) in released {
            self.tell(ControlEvent::Released { service, released });
        }
    }

    /// Runs the timers that are due.
    fn tick(&mut self, cfg: &Settings, sources: &Sources<'_>) {
        if self.stopped {
            return;
        }
        let now = Instant::now();
        let drain_timeout = cfg.config.rebalance.strategy.drain_timeout();
        let mut dirty = Vec::new();
        for sc in self.services.values_mut() {
            if sc.next_deadline(drain_timeout).is_some_and(|d| d <= now) && sc.tick(cfg, now) && sc.mark() {
                dirty.push(sc.name.clone());
            }
        }
        // Rebuilding also sweeps retired generations (and releases timed-out drains).
        self.rebuild(dirty, cfg, sources, now);
    }

    fn next_deadline(&self, cfg: &Settings) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        let drain_timeout = cfg.config.rebalance.strategy.drain_timeout();
        self.services
            .values()
            .filter_map(|sc| sc.next_deadline(drain_timeout))
            .min()
    }

    /// Sends a publication to every subscriber (dropping the ones that hung up).
    fn announce(&mut self, update: RoutingUpdate) {
        self.tell(ControlEvent::Published(update));
    }

    fn tell(&mut self, event: ControlEvent) {
        if !self.watchers.is_empty() {
            self.watchers.retain_mut(|w| w(&event));
        }
    }

    fn publish_directory(&self, directory: &SnapshotCell<Directory>) {
        let services = self
            .services
            .iter()
            .map(|(name, sc)| (name.clone(), sc.slot.clone()))
            .collect();
        directory.store(Arc::new(Directory {
            services,
            stopped: self.stopped,
        }));
    }
}

/// Immutable settings of one control plane.
pub(crate) struct Settings {
    pub(crate) config: LoadBalancerConfig,
    pub(crate) default_strategy: LoadBalancingStrategy,
    pub(crate) hash_slots: u32,
    /// Where data-plane failure runs are reported (the balancer itself).
    pub(crate) outlier_sink: DataWeak<dyn OutlierSink>,
}

impl Settings {
    pub(crate) fn new(
        config: LoadBalancerConfig,
        default_strategy: LoadBalancingStrategy,
        outlier_sink: DataWeak<dyn OutlierSink>,
    ) -> Self {
        Self {
            hash_slots: config.consistent_hash.slots,
            config,
            default_strategy,
            outlier_sink,
        }
    }

    pub(crate) fn strategy_for(&self, service: &str) -> LoadBalancingStrategy {
        self.config.strategy_for(service, self.default_strategy)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("default_strategy", &self.default_strategy)
            .field("hash_slots", &self.hash_slots)
            .finish_non_exhaustive()
    }
}

// ===== impl ControlPlane =====

/// The write path of one balancer.
pub(crate) struct ControlPlane {
    settings: Settings,
    queue: Queue<Command>,
    state: Mutex<ControlState>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    running: AtomicBool,
}

impl ControlPlane {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            queue: Queue::new(),
            state: Mutex::new(ControlState {
                services: HashMap::default(),
                watchers: Vec::new(),
                stopped: false,
            }),
            thread: Mutex::new(None),
            running: AtomicBool::new(false),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Queues a command; the ack resolves once its effect is published.
    pub(crate) fn submit(&self, command: Command) -> Ack {
        self.queue.push(command)
    }

    /// Queues a command nobody waits for (from the data plane or the health checker: never
    /// blocks).
    pub(crate) fn submit_unacked(&self, command: Command) {
        self.queue.push_unacked(command);
    }

    /// Whether the control-plane thread is running.
    pub(crate) fn is_running(&self) -> bool {
        // Acquire pairs with the Release in `start`: a helper that sees `true` may leave the
        // queue to the thread.
        self.running.load(Ordering::Acquire)
    }

    /// Applies queued commands on the caller's thread unless the control-plane thread runs.
    pub(crate) fn help(&self, sources: &Sources<'_>, directory: &SnapshotCell<Directory>) {
        if !self.is_running() {
            while self.process(sources, directory) {}
        }
    }

    /// Takes one batch (in push order, under the state lock), applies and publishes it, then
    /// resolves its acks. Returns whether anything was taken.
    pub(crate) fn process(&self, sources: &Sources<'_>, directory: &SnapshotCell<Directory>) -> bool {
        let acks: Vec<_> = {
            let mut state = self.state.lock();
            let batch: Vec<Envelope<Command>> = self.queue.take(self.settings.config.control_plane.max_batch);
            if batch.is_empty() {
                return false;
            }
            let mut acks = Vec::with_capacity(batch.len());
            let commands = batch.into_iter().map(|e| {
                acks.push(e.ack);
                e.command
            });
            state.step(&self.settings, sources, directory, commands);
            acks
        };
        drop(acks); // resolves every ack of the batch, after publication
        true
    }

    /// Starts the control-plane thread (idempotent). `run` is its body.
    pub(crate) fn start(&self, run: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let mut thread = self.thread.lock();
        if thread.is_some() {
            return Ok(());
        }
        if self.queue.is_closed() {
            return Err(Error::Stopped);
        }
        let handle =
            thread::spawn(self.settings.config.control_plane.thread_name.clone(), run).map_err(|e| {
                Error::ControlPlane {
                    message: e.to_string(),
                }
            })?;
        *thread = Some(handle);
        // Release pairs with the Acquire in `is_running`.
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// The thread's loop: wait for commands or the next timer, process, until shut down.
    pub(crate) fn run(&self, sources: &Sources<'_>, directory: &SnapshotCell<Directory>) {
        tracing::debug!("control plane thread started");
        loop {
            let deadline = self.state.lock().next_deadline(&self.settings);
            if !self.queue.wait_pending_until(deadline) {
                break;
            }
            self.process(sources, directory);
            self.state.lock().tick(&self.settings, sources);
        }
        tracing::debug!("control plane thread stopped");
    }

    /// Stops the thread (joining it), applies what was queued, then publishes stopped
    /// tombstones for every service. Idempotent. Returns whether this call stopped it.
    pub(crate) fn shutdown(&self, sources: &Sources<'_>, directory: &SnapshotCell<Directory>) -> bool {
        self.queue.close();
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("control plane thread panicked");
            }
        }
        self.running.store(false, Ordering::Release);
        while self.process(sources, directory) {}
        let mut state = self.state.lock();
        if state.stopped {
            return false;
        }
        state.stopped = true;
        let mut updates = Vec::new();
        for sc in state.services.values_mut() {
            let strategy = self.settings.strategy_for(&sc.name);
            updates.push(sc.bury(Miss::Stopped, strategy, self.settings.hash_slots));
        }
        for update in updates {
            state.announce(update);
        }
        state.watchers.clear();
        state.publish_directory(directory);
        true
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Subscribes to table publications.
    pub(crate) fn watch(&self) -> mpsc::Receiver<RoutingUpdate> {
        let (tx, rx) = mpsc::channel();
        self.subscribe(Box::new(move |event: &ControlEvent| match event {
            ControlEvent::Published(update) => tx.send(update.clone()).is_ok(),
            ControlEvent::Released { .. } => true,
        }));
        rx
    }

    /// Calls `watcher` for every event from now on (on the control plane's thread).
    pub(crate) fn subscribe(&self, watcher: Watcher) {
        let mut state = self.state.lock();
        if !state.stopped {
            state.watchers.push(watcher);
        }
    }

    /// Counters of every service (live endpoints, plus removed ones folded together).
    pub(crate) fn counters(&self, sources: &Sources<'_>) -> Vec<ServiceCounters> {
        let mut state = self.state.lock();
        let mut out: Vec<ServiceCounters> = state
            .services
            .values_mut()
            .map(|sc| sc.counters(sources))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("queue", &self.queue)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}
