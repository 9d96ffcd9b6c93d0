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
#![deny(unsafe_code)]

pub(crate) mod queue;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use crate::endpoint::Endpoint;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Arc, DataArc, Mutex, SnapshotCell, thread};
use crate::table::build::{RingCache, TableInput, build};
use crate::table::{CounterValues, Directory, EndpointState, Member, Miss, ServiceSlot, ServiceTable};
use crate::{Error, LoadBalancerConfig, LoadBalancingStrategy};
use queue::{Ack, Envelope, Queue};

/// A change for the control plane.
#[derive(Debug)]
pub(crate) enum Command {
    /// The membership of this service changed in the registry (or it was created or removed):
    /// read it again.
    Changed(DataArc<str>),
    /// A hash-keyed pick found no ring on this service's table: build rings for it.
    WantRing(DataArc<str>),
}

/// Where the control plane reads memberships from (the registry; a trait so the control
/// plane does not depend on the registry's internals).
pub(crate) trait MembershipSource {
    /// The current membership of `service` (sorted by address) and its version, `None` if
    /// the service does not exist.
    fn membership(&self, service: &str) -> Option<(u64, DataArc<[Endpoint]>)>;
}

// ===== impl ServiceControl =====

/// Control-plane bookkeeping of one service.
struct ServiceControl {
    name: DataArc<str>,
    slot: DataArc<ServiceSlot>,
    membership_version: u64,
    endpoints: DataArc<[Endpoint]>,
    /// Current members' states, in address order.
    states: Vec<Arc<EndpointState>>,
    ring: RingCache,
    table_version: u64,
    /// Retired generations still referenced by an old table or a guard.
    retiring: Vec<Arc<EndpointState>>,
    /// Final counters of dropped generations whose address is still a member.
    retired_members: HashMap<SocketAddr, CounterValues, ahash::RandomState>,
    /// Final counters of dropped generations of addresses no longer members.
    retired: CounterValues,
    dirty: bool,
}

impl ServiceControl {
    fn new(name: DataArc<str>, strategy: LoadBalancingStrategy, hash_slots: u32) -> Self {
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
            dirty: true,
        }
    }

    /// Rebuilds and publishes this service's table from `self.endpoints`.
    fn rebuild(&mut self, strategy: LoadBalancingStrategy, hash_slots: u32) {
        let started = Instant::now();
        let shards = crate::sync::shard_count();
        // Merge the sorted previous states with the sorted new membership: keep the state of
        // every endpoint that stays as it was, start a generation for new or changed ones,
        // retire the rest.
        let previous = std::mem::take(&mut self.states);
        let mut previous = previous.into_iter().peekable();
        let mut states = Vec::with_capacity(self.endpoints.len());
        let mut members = Vec::with_capacity(self.endpoints.len());
        let endpoints = self.endpoints.clone();
        for endpoint in endpoints.iter() {
            while let Some(old) = previous.next_if(|s| s.address() < endpoint.address) {
                self.retire(old, false);
            }
            let state = match previous.next_if(|s| s.address() == endpoint.address) {
                Some(old) if old.endpoint() == endpoint => old,
                Some(old) => {
                    self.retire(old, true);
                    Arc::new(EndpointState::new(endpoint.clone(), shards))
                }
                None => Arc::new(EndpointState::new(endpoint.clone(), shards)),
            };
            members.push(Member {
                state: state.clone(),
                weight: endpoint.weight(),
                routable: true,
            });
            states.push(state);
        }
        for old in previous {
            self.retire(old, false);
        }
        self.states = states;

        let wants_ring = strategy == LoadBalancingStrategy::ConsistentHash
            || self.slot.hash_wanted.load(Ordering::Relaxed);
        let ring = wants_ring.then(|| self.ring.ring_for(&members, hash_slots));
        self.table_version += 1;
        let table = build(TableInput {
            service: self.name.clone(),
            version: self.table_version,
            membership_version: self.membership_version,
            strategy,
            members,
            hash_slots,
            ring,
            shards,
        });
        let (total, routable) = (table.members.len(), table.routable_len());
        self.slot.table.store(Arc::new(table));
        self.dirty = false;
        tracing::debug!(
            service = %self.name,
            version = self.table_version,
            membership_version = self.membership_version,
            endpoints = total,
            routable,
            %strategy,
            ring = wants_ring,
            build_us = started.elapsed().as_micros() as u64,
            "published routing table"
        );
    }

    /// Retires a generation. `stays` tells whether its address remains a member.
    fn retire(&mut self, state: Arc<EndpointState>, stays: bool) {
        if !stays {
            if let Some(c) = self.retired_members.remove(&state.address()) {
                self.retired.add(&c);
            }
        }
        self.retiring.push(state);
    }

    /// Folds retired generations that nothing refers to any more into the retired totals.
    fn sweep(&mut self) {
        let members = &self.states;
        let retired_members = &mut self.retired_members;
        let retired = &mut self.retired;
        self.retiring.retain(|s| {
            if EndpointState::is_referenced(s) {
                return true;
            }
            let counters = s.counters();
            let address = s.address();
            if members.binary_search_by(|m| m.address().cmp(&address)).is_ok() {
                retired_members.entry(address).or_default().add(&counters);
            } else {
                retired.add(&counters);
            }
            false
        });
    }

    /// Publishes a tombstone table.
    fn bury(&mut self, miss: Miss, strategy: LoadBalancingStrategy, hash_slots: u32) {
        self.table_version += 1;
        let table = ServiceTable::empty(
            self.name.clone(),
            self.table_version,
            strategy,
            hash_slots,
            Some(miss),
        );
        self.slot.table.store(Arc::new(table));
    }
}

/// Counters of one service, read under the control lock.
#[derive(Debug)]
pub(crate) struct ServiceCounters {
    pub(crate) name: DataArc<str>,
    pub(crate) strategy: LoadBalancingStrategy,
    pub(crate) table_version: u64,
    pub(crate) membership_version: u64,
    pub(crate) endpoints: Vec<(Endpoint, bool, CounterValues)>,
    /// Removed endpoints (retiring and retired) together.
    pub(crate) removed: CounterValues,
}

// ===== impl ControlState =====

/// Everything the control plane knows; guarded by [`ControlPlane`]'s state lock.
struct ControlState {
    services: HashMap<DataArc<str>, ServiceControl, ahash::RandomState>,
    stopped: bool,
}

impl ControlState {
    /// Applies a batch and publishes what changed.
    fn step(
        &mut self,
        cfg: &Settings,
        source: &dyn MembershipSource,
        directory: &SnapshotCell<Directory>,
        batch: impl Iterator<Item = Command>,
    ) {
        if self.stopped {
            return;
        }
        let mut dirty: Vec<DataArc<str>> = Vec::new();
        let mut changed: Vec<DataArc<str>> = Vec::new();
        for command in batch {
            match command {
                Command::Changed(service) => {
                    if !changed.contains(&service) {
                        changed.push(service);
                    }
                }
                Command::WantRing(service) => {
                    if let Some(sc) = self.services.get_mut(&service) {
                        if !sc.dirty {
                            sc.dirty = true;
                            dirty.push(sc.name.clone());
                        }
                    }
                }
            }
        }
        let mut directory_changed = false;
        for service in changed {
            let strategy = cfg.strategy_for(&service);
            match (source.membership(&service), self.services.get_mut(&service)) {
                (Some((version, endpoints)), Some(sc)) => {
                    if version > sc.membership_version {
                        sc.membership_version = version;
                        sc.endpoints = endpoints;
                        if !sc.dirty {
                            sc.dirty = true;
                            dirty.push(sc.name.clone());
                        }
                    }
                }
                (Some((version, endpoints)), None) => {
                    let mut sc = ServiceControl::new(service.clone(), strategy, cfg.hash_slots);
                    sc.membership_version = version;
                    sc.endpoints = endpoints;
                    dirty.push(sc.name.clone());
                    self.services.insert(service, sc);
                    directory_changed = true;
                }
                (None, Some(_)) => {
                    if let Some(mut sc) = self.services.remove(&service) {
                        sc.bury(Miss::Removed, strategy, cfg.hash_slots);
                        tracing::debug!(service = %sc.name, "service removed");
                    }
                    directory_changed = true;
                }
                (None, None) => {}
            }
        }
        for name in dirty {
            if let Some(sc) = self.services.get_mut(&name) {
                if sc.dirty {
                    sc.rebuild(cfg.strategy_for(&name), cfg.hash_slots);
                }
            }
        }
        for sc in self.services.values_mut() {
            if !sc.retiring.is_empty() {
                sc.sweep();
            }
        }
        if directory_changed {
            self.publish_directory(directory);
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
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) config: LoadBalancerConfig,
    pub(crate) default_strategy: LoadBalancingStrategy,
    pub(crate) hash_slots: u32,
}

impl Settings {
    pub(crate) fn new(config: LoadBalancerConfig, default_strategy: LoadBalancingStrategy) -> Self {
        Self {
            hash_slots: config.consistent_hash.slots,
            config,
            default_strategy,
        }
    }

    fn strategy_for(&self, service: &str) -> LoadBalancingStrategy {
        self.config.strategy_for(service, self.default_strategy)
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

    /// Queues a command nobody waits for (from the data plane: never blocks).
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
    pub(crate) fn help(&self, source: &dyn MembershipSource, directory: &SnapshotCell<Directory>) {
        if !self.is_running() {
            while self.process(source, directory) {}
        }
    }

    /// Takes one batch (in push order, under the state lock), applies and publishes it, then
    /// resolves its acks. Returns whether anything was taken.
    pub(crate) fn process(&self, source: &dyn MembershipSource, directory: &SnapshotCell<Directory>) -> bool {
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
            state.step(&self.settings, source, directory, commands);
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

    /// The thread's loop: wait for commands, process them, until shut down.
    pub(crate) fn run(&self, source: &dyn MembershipSource, directory: &SnapshotCell<Directory>) {
        tracing::debug!("control plane thread started");
        while self.queue.wait_pending() {
            self.process(source, directory);
        }
        tracing::debug!("control plane thread stopped");
    }

    /// Stops the thread (joining it), applies what was queued, then publishes stopped
    /// tombstones for every service. Idempotent. Returns whether this call stopped it.
    pub(crate) fn shutdown(
        &self,
        source: &dyn MembershipSource,
        directory: &SnapshotCell<Directory>,
    ) -> bool {
        self.queue.close();
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("control plane thread panicked");
            }
        }
        self.running.store(false, Ordering::Release);
        while self.process(source, directory) {}
        let mut state = self.state.lock();
        if state.stopped {
            return false;
        }
        state.stopped = true;
        for sc in state.services.values_mut() {
            let strategy = self.settings.strategy_for(&sc.name);
            sc.bury(Miss::Stopped, strategy, self.settings.hash_slots);
        }
        state.publish_directory(directory);
        true
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Counters of every service (live endpoints, plus removed ones folded together).
    pub(crate) fn counters(&self) -> Vec<ServiceCounters> {
        let mut state = self.state.lock();
        let mut out: Vec<ServiceCounters> = state
            .services
            .values_mut()
            .map(ServiceControl::counters)
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl ServiceControl {
    fn counters(&mut self) -> ServiceCounters {
        self.sweep();
        let table = self.slot.table.load();
        let mut removed = self.retired;
        let mut earlier: HashMap<SocketAddr, CounterValues, ahash::RandomState> =
            self.retired_members.clone();
        for s in &self.retiring {
            let address = s.address();
            if self
                .states
                .binary_search_by(|m| m.address().cmp(&address))
                .is_ok()
            {
                earlier.entry(address).or_default().add(&s.counters());
            } else {
                removed.add(&s.counters());
            }
        }
        // `states` and a live table's `members` are built in the same (address) order; a
        // tombstone has no members, and nothing in it is routable.
        let endpoints = self
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let routable = table.members.get(i).is_some_and(|m| m.routable);
                let mut counters = s.counters();
                if let Some(c) = earlier.get(&s.address()) {
                    counters.add(c);
                }
                (s.endpoint().clone(), routable, counters)
            })
            .collect();
        ServiceCounters {
            name: self.name.clone(),
            strategy: table.strategy,
            table_version: table.version,
            membership_version: table.membership_version,
            endpoints,
            removed,
        }
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
