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

mod service;
#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use crate::config::LoadBalancerConfig;
use crate::config::locality::Locality;
use crate::config::strategy::LoadBalancingStrategy;
use crate::error::Error;
use crate::events::{EventHub, EventQueue};
use crate::handoff::queue::{Ack, AckOutcome, Queue};
use crate::handoff::{Command, ControlEvent, HealthSource, MembershipSource, OutlierSink, Watcher};
use crate::stats::{RoutingUpdate, ServiceCounters};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{DataArc, DataWeak, Mutex, mpsc, thread};
use crate::table::{Directory, DirectoryCell, Miss};
use service::ServiceControl;

/// Test-only fault injection: panics at chosen points of the control plane.
#[cfg(test)]
pub(crate) mod fault {
    use crate::sync::Mutex;

    /// Services whose next `n` rebuilds panic.
    static REBUILDS: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
    /// Control-plane threads (by name) that die at their next step.
    static THREADS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Makes the next `times` rebuilds of `service` panic.
    pub(crate) fn panic_in_rebuild(service: &str, times: usize) {
        REBUILDS.lock().push((service.to_owned(), times));
    }

    /// Makes the control-plane thread named `name` die at its next step.
    pub(crate) fn kill_thread(name: &str) {
        THREADS.lock().push(name.to_owned());
    }

    pub(super) fn maybe_panic_in_rebuild(service: &str) {
        let mut rebuilds = REBUILDS.lock();
        if let Some(entry) = rebuilds.iter_mut().find(|(s, n)| s == service && *n > 0) {
            entry.1 -= 1;
            drop(rebuilds);
            panic!("injected fault: rebuild of `{service}`");
        }
    }

    pub(super) fn maybe_kill_thread(name: &str) {
        let mut threads = THREADS.lock();
        if let Some(i) = threads.iter().position(|t| t == name) {
            threads.remove(i);
            drop(threads);
            panic!("injected fault: control-plane thread `{name}` dies");
        }
    }
}

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
    /// Health-event subscribers and numbering.
    events: EventHub,
    stopped: bool,
}

/// Services whose changes a step could not publish, with the reason.
type Failed = HashMap<DataArc<str>, DataArc<str>, ahash::RandomState>;

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> DataArc<str> {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
    DataArc::from(text.as_str())
}

impl ControlState {
    /// Applies a batch and publishes what changed. Each service is applied on its own, under
    /// `catch_unwind`: a panic while applying one service's changes (a bug, or a panicking
    /// source) is logged at error level and reported in the result, and the other services of
    /// the batch are still published.
    fn step(
        &mut self,
        cfg: &Settings,
        sources: &Sources<'_>,
        directory: &DirectoryCell,
        batch: Vec<Command>,
    ) -> Failed {
        let mut failed = Failed::default();
        if self.stopped {
            return failed;
        }
        let now = Instant::now();
        // Group by service, keeping each service's commands in push order.
        let mut groups: Vec<(DataArc<str>, Vec<Command>)> = Vec::new();
        for command in batch {
            let service = command.service().clone();
            match groups.iter_mut().find(|(s, _)| *s == service) {
                Some((_, commands)) => commands.push(command),
                None => groups.push((service, vec![command])),
            }
        }
        let mut directory_changed = false;
        for (service, commands) in groups {
            let applied = catch_unwind(AssertUnwindSafe(|| {
                self.apply(&service, commands, cfg, sources, now)
            }));
            match applied {
                Ok(changed) => directory_changed |= changed,
                Err(payload) => {
                    let reason = panic_message(&*payload);
                    tracing::error!(service = %service, %reason, "control plane: applying a change panicked; its writers get an error, other services go on");
                    // Whatever the panic left half-done is redone by the next command of
                    // this service, whatever it is: the service stays marked for a rebuild,
                    // and the next step that touches it rebuilds it.
                    if let Some(sc) = self.services.get_mut(&service) {
                        sc.dirty = true;
                    }
                    failed.insert(service, reason);
                }
            }
        }
        self.sweep(cfg, now);
        self.deliver_events(cfg);
        if directory_changed {
            self.publish_directory(directory);
        }
        failed
    }

    /// Delivers the health events services recorded, service by service in their order.
    fn deliver_events(&mut self, cfg: &Settings) {
        for sc in self.services.values_mut() {
            if !sc.events.is_empty() {
                self.events.deliver(&sc.name, sc.events.drain(..));
            }
        }
        // Relaxed: read by the services under this same lock.
        cfg.listening
            .store(self.events.has_subscribers(), Ordering::Relaxed);
    }

    /// Applies the commands of one service, then re-reads its membership if it changed, and
    /// rebuilds its table if anything changed. Returns whether the directory must be
    /// republished (the service appeared or disappeared).
    fn apply(
        &mut self,
        service: &DataArc<str>,
        commands: Vec<Command>,
        cfg: &Settings,
        sources: &Sources<'_>,
        now: Instant,
    ) -> bool {
        let mut reread = false;
        // A service whose last rebuild failed is rebuilt by its next command, even one that
        // changes nothing (a repeated mark-down whose first publication failed).
        let mut dirty = self.services.get(service).is_some_and(|sc| sc.dirty);
        for command in commands {
            let Some(sc) = self.services.get_mut(service) else {
                reread |= matches!(command, Command::Changed(_));
                continue;
            };
            dirty |= match command {
                Command::Changed(_) => {
                    reread = true;
                    false
                }
                Command::WantRing(_) | Command::HealthChanged(_) => true,
                Command::Outlier { address, .. } => sc.eject(address, cfg, now),
                Command::MarkDown { address, down, .. } => sc.mark_down(address, down),
                Command::Drain {
                    address, draining, ..
                } => sc.set_draining(address, draining),
                Command::Failover { order, .. } => {
                    sc.failover_order = order;
                    true
                }
            };
        }
        let mut directory_changed = false;
        if reread {
            match (
                sources.membership.membership(service),
                self.services.get_mut(service),
            ) {
                (Some((version, endpoints)), Some(sc)) => {
                    if version > sc.membership_version {
                        sc.membership_version = version;
                        sc.endpoints = endpoints;
                        dirty = true;
                    }
                }
                (Some((version, endpoints)), None) => {
                    let mut sc = ServiceControl::new(service.clone(), cfg);
                    sc.membership_version = version;
                    sc.endpoints = endpoints;
                    self.services.insert(service.clone(), sc);
                    dirty = true;
                    directory_changed = true;
                }
                (None, Some(_)) => {
                    if let Some(mut sc) = self.services.remove(service) {
                        sc.depart_all();
                        let pending: Vec<_> = sc.events.drain(..).collect();
                        self.events.deliver(&sc.name, pending);
                        let update = sc.bury(Miss::Removed, cfg.strategy_for(service), cfg.hash_slots);
                        self.announce(update);
                        tracing::debug!(service = %sc.name, "service removed");
                    }
                    return true;
                }
                (None, None) => {}
            }
        }
        if dirty {
            if let Some(sc) = self.services.get_mut(service) {
                sc.dirty = true;
                let update = sc.rebuild(cfg, sources, now);
                self.announce(update);
            }
        }
        directory_changed
    }

    /// Sweeps retired generations of every service (and releases timed-out drains).
    fn sweep(&mut self, cfg: &Settings, now: Instant) {
        let drain_timeout = cfg.config.rebalance.strategy.drain_timeout();
        let mut released = Vec::new();
        for sc in self.services.values_mut() {
            if sc.sweep_due() {
                for r in sc.sweep(now, drain_timeout) {
                    released.push((sc.name.to_string(), r));
                }
            }
            sc.maintain(now);
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
            if sc.next_deadline(drain_timeout).is_some_and(|d| d <= now) && sc.tick(cfg, now) {
                dirty.push(sc.name.clone());
            }
        }
        for name in dirty {
            let rebuilt = catch_unwind(AssertUnwindSafe(|| {
                self.services
                    .get_mut(&name)
                    .map(|sc| sc.rebuild(cfg, sources, now))
            }));
            match rebuilt {
                Ok(Some(update)) => self.announce(update),
                Ok(None) => {}
                Err(payload) => {
                    let reason = panic_message(&*payload);
                    tracing::error!(service = %name, %reason, "control plane: a timer's rebuild panicked");
                    if let Some(sc) = self.services.get_mut(&name) {
                        sc.dirty = true;
                    }
                }
            }
        }
        // Also releases timed-out drains.
        self.sweep(cfg, now);
        self.deliver_events(cfg);
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

    /// Calls every watcher; one that hung up (returns `false`) or panics is dropped, so a
    /// broken subscriber never stops publication.
    fn tell(&mut self, event: ControlEvent) {
        if !self.watchers.is_empty() {
            self.watchers
                .retain_mut(|w| match catch_unwind(AssertUnwindSafe(|| w(&event))) {
                    Ok(keep) => keep,
                    Err(payload) => {
                        let reason = panic_message(&*payload);
                        tracing::error!(%reason, "control plane: a subscriber panicked and was dropped");
                        false
                    }
                });
        }
    }

    fn publish_directory(&self, directory: &DirectoryCell) {
        let services = self
            .services
            .iter()
            .map(|(name, sc)| (name.clone(), sc.slot.clone()))
            .collect();
        directory.publish(Directory {
            services,
            stopped: self.stopped,
        });
    }
}

/// Immutable settings of one control plane.
pub(crate) struct Settings {
    pub(crate) config: LoadBalancerConfig,
    /// Whether anyone subscribes to health events (services record none otherwise).
    pub(crate) listening: DataArc<AtomicBool>,
    pub(crate) default_strategy: LoadBalancingStrategy,
    pub(crate) hash_slots: u32,
    /// Where data-plane failure runs are reported (the balancer itself).
    pub(crate) outlier_sink: DataWeak<dyn OutlierSink>,
    /// `[locality]` with the local zone and region resolved (environment read once).
    pub(crate) locality: Locality,
    /// `(subset_size, client_id)` when deterministic subsetting is on.
    pub(crate) subsetting: Option<(u32, u64)>,
}

impl Settings {
    /// The settings of a balancer; reads the environment variables `[locality]` and
    /// `[subsetting]` name, and fails with a typed error if what they need is missing.
    #[cfg(test)]
    pub(crate) fn new(
        config: LoadBalancerConfig,
        default_strategy: LoadBalancingStrategy,
        outlier_sink: DataWeak<dyn OutlierSink>,
    ) -> Result<Self, crate::Error> {
        let locality = config.locality.resolve()?;
        let subsetting = config.subsetting.resolve()?;
        Ok(Self::with(
            config,
            default_strategy,
            outlier_sink,
            locality,
            subsetting,
        ))
    }

    /// The settings with `[locality]` and `[subsetting]` already resolved.
    pub(crate) fn with(
        config: LoadBalancerConfig,
        default_strategy: LoadBalancingStrategy,
        outlier_sink: DataWeak<dyn OutlierSink>,
        locality: Locality,
        subsetting: Option<(u32, u64)>,
    ) -> Self {
        Self {
            hash_slots: config.consistent_hash.slots,
            locality,
            subsetting,
            listening: DataArc::new(AtomicBool::new(false)),
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

/// The body of the control-plane thread, kept so a thread that died can be restarted.
pub(crate) type Runner = DataArc<dyn Fn() + Send + Sync>;

/// The write path of one balancer.
pub(crate) struct ControlPlane {
    settings: Settings,
    queue: Queue<Command>,
    state: Mutex<ControlState>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    /// The thread's body, from [`start`](Self::start) until shutdown.
    runner: Mutex<Option<Runner>>,
    running: AtomicBool,
    /// Set by a dying thread (before it fails the commands still queued).
    dead: AtomicBool,
}

impl ControlPlane {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            queue: Queue::new(),
            state: Mutex::new(ControlState {
                services: HashMap::default(),
                watchers: Vec::new(),
                events: EventHub::default(),
                stopped: false,
            }),
            thread: Mutex::new(None),
            runner: Mutex::new(None),
            running: AtomicBool::new(false),
            dead: AtomicBool::new(false),
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

    /// Whether the control-plane thread is running: started, and not dead.
    pub(crate) fn is_running(&self) -> bool {
        // Acquire pairs with the Release in `start`: a helper that sees `true` may leave the
        // queue to the thread.
        self.running.load(Ordering::Acquire) && self.thread_alive(&self.thread.lock())
    }

    fn thread_alive(&self, thread: &Option<thread::JoinHandle<()>>) -> bool {
        // SeqCst pairs with the store in `run`'s exit guard: a writer that queued after the
        // dying thread's last look at the queue sees the flag and revives the thread.
        !self.dead.load(Ordering::SeqCst) && thread.as_ref().is_some_and(|h| !thread::is_finished(h))
    }

    /// Applies queued commands on the caller's thread unless the control-plane thread runs.
    /// A thread that died (it never should: every step runs under `catch_unwind`) is
    /// restarted here, so the next write after a death revives it.
    pub(crate) fn help(&self, sources: &Sources<'_>, directory: &DirectoryCell) {
        if self.is_running() || self.revive() {
            return;
        }
        while self.process(sources, directory) {}
    }

    /// Restarts a control-plane thread that was started and died. Returns whether a thread
    /// runs afterwards.
    fn revive(&self) -> bool {
        if !self.running.load(Ordering::Acquire) || self.queue.is_closed() {
            return false;
        }
        let Some(runner) = self.runner.lock().clone() else {
            return false;
        };
        let mut thread = self.thread.lock();
        if self.thread_alive(&thread) {
            return true; // someone else revived it
        }
        if let Some(dead) = thread.take() {
            let reason = match dead.join() {
                Ok(()) => DataArc::from("it returned"),
                Err(payload) => panic_message(&*payload),
            };
            tracing::error!(%reason, "control-plane thread died; restarting it");
        }
        self.dead.store(false, Ordering::SeqCst);
        match thread::spawn(
            self.settings.config.control_plane.thread_name.clone(),
            move || runner(),
        ) {
            Ok(handle) => {
                *thread = Some(handle);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot restart the control-plane thread; writers apply their changes themselves");
                // Writers now apply their changes themselves.
                self.running.store(false, Ordering::Release);
                false
            }
        }
    }

    /// Takes one batch (in push order, under the state lock), applies and publishes it, then
    /// resolves its acks: `Applied` for the published services, `Failed` with the reason for
    /// a service whose application panicked (or for all of them if the step itself
    /// panicked), `Stopped` after shutdown. Returns whether anything was taken.
    pub(crate) fn process(&self, sources: &Sources<'_>, directory: &DirectoryCell) -> bool {
        let mut state = self.state.lock();
        let batch = self.queue.take(self.settings.config.control_plane.max_batch);
        if batch.is_empty() {
            return false;
        }
        let mut acks = Vec::with_capacity(batch.len());
        let mut commands = Vec::with_capacity(batch.len());
        for envelope in batch {
            if let Some(ack) = envelope.ack {
                acks.push((envelope.command.service().clone(), ack));
            }
            commands.push(envelope.command);
        }
        let stopped = state.stopped;
        let result = catch_unwind(AssertUnwindSafe(|| {
            state.step(&self.settings, sources, directory, commands)
        }));
        drop(state);
        // Resolved after publication and outside the lock.
        match result {
            _ if stopped => {
                for (_, ack) in acks {
                    ack.complete(AckOutcome::Stopped);
                }
            }
            Ok(failed) => {
                for (service, ack) in acks {
                    ack.complete(match failed.get(&service) {
                        None => AckOutcome::Applied,
                        Some(reason) => AckOutcome::Failed(reason.clone()),
                    });
                }
            }
            Err(payload) => {
                let reason = panic_message(&*payload);
                tracing::error!(%reason, "control plane: a step panicked; its writers get an error");
                for (_, ack) in acks {
                    ack.complete(AckOutcome::Failed(reason.clone()));
                }
            }
        }
        true
    }

    /// Starts the control-plane thread (idempotent; restarts a thread that died). `run` is
    /// its body; it is kept to restart the thread.
    pub(crate) fn start(&self, run: Runner) -> Result<(), Error> {
        let mut thread = self.thread.lock();
        if self.thread_alive(&thread) {
            return Ok(());
        }
        if self.queue.is_closed() {
            return Err(Error::Stopped);
        }
        if let Some(dead) = thread.take() {
            if let Err(payload) = dead.join() {
                let reason = panic_message(&*payload);
                tracing::error!(%reason, "control-plane thread had died; restarting it");
            }
        }
        self.dead.store(false, Ordering::SeqCst);
        *self.runner.lock() = Some(run.clone());
        let handle = thread::spawn(
            self.settings.config.control_plane.thread_name.clone(),
            move || run(),
        )
        .map_err(|e| Error::ControlPlane {
            message: e.to_string(),
        })?;
        *thread = Some(handle);
        // Release pairs with the Acquire in `is_running`.
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// The thread's loop: wait for commands or the next timer, process, until shut down.
    /// Steps and timers run under `catch_unwind`; should the thread die anyway, the commands
    /// still queued fail (their writers get an error, never a hang) and the next write
    /// restarts it.
    pub(crate) fn run(&self, sources: &Sources<'_>, directory: &DirectoryCell) {
        struct OnExit<'a>(&'a ControlPlane);
        impl Drop for OnExit<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    // Writers that queue from now on revive the thread (see `help`).
                    self.0.dead.store(true, Ordering::SeqCst);
                    let reason: DataArc<str> = DataArc::from("the control-plane thread died");
                    tracing::error!("control-plane thread died; failing the changes it held");
                    while !self.0.queue.is_empty() {
                        for envelope in self.0.queue.take(usize::MAX) {
                            if let Some(ack) = envelope.ack {
                                ack.complete(AckOutcome::Failed(reason.clone()));
                            }
                        }
                    }
                }
            }
        }
        let _on_exit = OnExit(self);
        tracing::debug!("control plane thread started");
        loop {
            let deadline = self.state.lock().next_deadline(&self.settings);
            if !self.queue.wait_pending_until(deadline) {
                break;
            }
            #[cfg(test)]
            fault::maybe_kill_thread(&self.settings.config.control_plane.thread_name);
            self.process(sources, directory);
            let ticked = catch_unwind(AssertUnwindSafe(|| {
                self.state.lock().tick(&self.settings, sources);
            }));
            if let Err(payload) = ticked {
                let reason = panic_message(&*payload);
                tracing::error!(%reason, "control plane: running timers panicked");
            }
        }
        tracing::debug!("control plane thread stopped");
    }

    /// Stops the thread (joining it), applies what was queued, then publishes stopped
    /// tombstones for every service. Idempotent. Returns whether this call stopped it.
    pub(crate) fn shutdown(&self, sources: &Sources<'_>, directory: &DirectoryCell) -> bool {
        self.queue.close();
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("control plane thread panicked");
            }
        }
        self.runner.lock().take();
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
        state.events.close();
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

    /// A new health-event subscriber holding up to `capacity` events (closed at once if the
    /// control plane is stopped).
    pub(crate) fn subscribe_health(&self, capacity: usize) -> DataArc<EventQueue> {
        let queue = EventQueue::new(capacity);
        let mut state = self.state.lock();
        if state.stopped {
            queue.close();
        } else {
            state.events.subscribe(queue.clone());
            // Relaxed: read under this same lock.
            self.settings.listening.store(true, Ordering::Relaxed);
        }
        queue
    }

    /// Calls `watcher` for every event from now on (on the control plane's thread).
    pub(crate) fn subscribe(&self, watcher: Watcher) {
        let mut state = self.state.lock();
        if !state.stopped {
            state.watchers.push(watcher);
        }
    }

    /// Counters of every service (live endpoints, plus removed ones folded together).
    ///
    /// The control lock is held only to take each service's snapshot (its current table and
    /// the counters of retired generations), never for a pass over the endpoints, so a
    /// scrape of a large service does not delay a registry write's publication.
    pub(crate) fn counters(&self, sources: &Sources<'_>) -> Vec<ServiceCounters> {
        let running = self.is_running();
        let snapshots: Vec<_> = {
            let mut state = self.state.lock();
            state
                .services
                .values_mut()
                .map(|sc| {
                    if !running {
                        // No thread folds them every minute: fold now (O(endpoints), but a
                        // balancer that is not started has no writer waiting on the thread).
                        sc.fold_selections();
                    }
                    (self.settings.strategy_for(&sc.name), sc.snapshot())
                })
                .collect()
        };
        let mut out: Vec<ServiceCounters> = snapshots
            .into_iter()
            .map(|(strategy, snapshot)| snapshot.counters(strategy, sources.health))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Requests in flight on `address` of `service`, over all its generations, and whether
    /// no table older than `since_version` is still held (see `ServiceControl::drain_status`).
    /// `None` if the service is unknown.
    pub(crate) fn drain_status(
        &self,
        service: &str,
        address: SocketAddr,
        since_version: u64,
    ) -> Option<(u64, bool)> {
        let mut state = self.state.lock();
        let sc = state.services.get_mut(service)?;
        Some(sc.drain_status(address, since_version))
    }

    /// The published table version of `service` (`None` if unknown).
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn table_version(&self, service: &str) -> Option<u64> {
        self.state
            .lock()
            .services
            .get(service)
            .map(|sc| sc.table_version())
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
