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

use crate::control::queue::Ack;
use crate::control::{Command, ControlPlane, Settings, Sources};
use crate::endpoint::Endpoint;
#[cfg(feature = "runtime")]
use crate::health::HealthCheckManager;
use crate::pick::consistent::hash_key;
use crate::pick::{Outcome, Pick, choose};
use crate::registry::{MembershipSink, ServiceRegistry};
use crate::stats::{LoadBalancerMetrics, RoutingUpdate};
use crate::sync::atomic::Ordering;
use crate::sync::{Arc, DataArc, DataWeak, SnapshotCell, mpsc};
use crate::table::{Directory, Miss, OutlierSink, Pin, ServiceSlot, ServiceTable};
use crate::{Error, LoadBalancerConfig, LoadBalancingStrategy};

// ===== impl Shared =====

/// What the balancer, its handles and its control thread share.
pub(crate) struct Shared {
    pub(crate) directory: SnapshotCell<Directory>,
    pub(crate) control: ControlPlane,
    /// Where memberships are read from. The registry holds only a `Weak` to this.
    pub(crate) registry: DataArc<ServiceRegistry>,
    /// This balancer's active health checker.
    #[cfg(feature = "runtime")]
    pub(crate) health: HealthCheckManager,
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
impl crate::health::HealthSink for Shared {
    fn health_changed(&self, service: &DataArc<str>) {
        self.control
            .submit_unacked(Command::HealthChanged(service.clone()));
    }
}

impl Shared {
    /// Builds the shared state; the control plane reports failure runs back to it through a
    /// `Weak`, so it is built cyclically.
    pub(crate) fn new(
        registry: DataArc<ServiceRegistry>,
        config: LoadBalancerConfig,
        strategy: LoadBalancingStrategy,
    ) -> DataArc<Self> {
        DataArc::new_cyclic(|me: &DataWeak<Shared>| {
            let outlier_sink: DataWeak<dyn OutlierSink> = me.clone();
            #[cfg(feature = "runtime")]
            let health = HealthCheckManager::create(registry.clone(), config.health_check.clone());
            Self {
                directory: SnapshotCell::new(Arc::new(Directory::empty())),
                control: ControlPlane::new(Settings::new(config, strategy, outlier_sink)),
                registry,
                #[cfg(feature = "runtime")]
                health,
            }
        })
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
        self.control.shutdown(&self.sources(), &self.directory)
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
        let pin = self.choose(&table, slot, hash)?;
        Ok(Pick::new(pin, table.version))
    }

    /// An unguarded selection from `slot`.
    #[inline]
    pub(crate) fn select(&self, slot: &ServiceSlot, hash: Option<u64>) -> Result<Endpoint, Error> {
        let table = slot.table.load();
        let pin = self.choose(&table, slot, hash)?;
        pin.note_selection();
        Ok(pin.endpoint().clone())
    }

    #[inline]
    fn choose<'t>(
        &self,
        table: &'t ServiceTable,
        slot: &ServiceSlot,
        hash: Option<u64>,
    ) -> Result<&'t Arc<Pin>, Error> {
        match choose(table, slot, hash) {
            Ok(pin) => {
                if hash.is_some() && table.ring.is_none() {
                    self.want_ring(slot, table);
                }
                Ok(pin)
            }
            Err(miss) => Err(miss_error(table, miss)),
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

    /// The calling thread's pin of member `address` of `slot`'s current table.
    fn member(slot: &ServiceSlot, address: SocketAddr) -> Result<Arc<Pin>, Error> {
        let table = slot.table.load();
        if let Some(miss) = table.miss {
            return Err(miss_error(&table, miss));
        }
        match table
            .members
            .binary_search_by(|m| m.state.address().cmp(&address))
        {
            Ok(i) => Ok(table.local().members[i].clone()),
            Err(_) => Err(Error::UnknownEndpoint {
                service: table.service.clone(),
                address,
            }),
        }
    }
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
        let shared = Shared::new(registry.clone(), config, strategy);
        #[cfg(feature = "runtime")]
        if shared.control.settings().config.health_check.enabled {
            // The checker learns the endpoints first, so the balancer's first tables can read
            // their (initial, healthy) status. A balancer without checks does not attach it:
            // following the registry would cost every registry write a membership copy.
            shared.health.attach().await;
            let sink: DataWeak<dyn crate::health::HealthSink> =
                DataArc::downgrade(&shared) as DataWeak<dyn crate::health::HealthSink>;
            shared.health.subscribe(sink);
        }
        let sink: DataWeak<dyn MembershipSink> = DataArc::downgrade(&shared) as DataWeak<dyn MembershipSink>;
        registry.attach(sink).await;
        Ok(Self { shared, strategy })
    }

    /// Starts the control-plane thread. Idempotent.
    ///
    /// Until started, registry changes are applied by the task making them; once started, a
    /// dedicated thread coalesces bursts of changes into one rebuild per service.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] after [`stop`](Self::stop); [`Error::ControlPlane`] if the OS
    /// refuses a thread.
    pub async fn start(&self) -> Result<(), Error> {
        let shared = self.shared.clone();
        self.shared
            .control
            .start(move || shared.control.run(&shared.sources(), &shared.directory))?;
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

    /// Whether the control-plane thread is running.
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

    /// A guarded pick: the endpoint with one request in flight until the [`Pick`] is dropped.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn pick(&self, service: &str) -> Result<Pick, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        self.shared.pick(slot, None)
    }

    /// A guarded pick by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn pick_with_hash(&self, service: &str, key: impl AsRef<[u8]>) -> Result<Pick, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        self.shared.pick(slot, Some(hash_key(key)))
    }

    /// An unguarded selection (the synchronous twin of [`next_endpoint`](Self::next_endpoint)).
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn select(&self, service: &str) -> Result<Endpoint, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        self.shared.select(slot, None)
    }

    /// An unguarded selection by consistent hash of `key`.
    ///
    /// # Errors
    ///
    /// As [`next_endpoint`](Self::next_endpoint).
    #[inline]
    pub fn select_with_hash(&self, service: &str, key: impl AsRef<[u8]>) -> Result<Endpoint, Error> {
        let directory = self.shared.directory.load();
        let slot = Shared::slot_by_name(&directory, service)?;
        self.shared.select(slot, Some(hash_key(key)))
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
        let pin = Shared::member(slot, endpoint.address)?;
        pin.record(outcome == Outcome::Success, latency);
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
        LoadBalancerMetrics::from_counters(self.shared.control.counters(&self.shared.sources()))
    }

    /// Takes `endpoint` of `service` out of routing (for maintenance), whatever its health
    /// checks say, until [`mark_up`](Self::mark_up). Requests in flight continue. Returns
    /// once no new pick can return it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`], [`Error::Stopped`].
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
            Shared::member(slot, endpoint.address)?;
            let table = slot.table.load();
            table.service.clone()
        };
        let ack = self.shared.control.submit(Command::MarkDown {
            service: name,
            address: endpoint.address,
            down,
        });
        self.shared
            .control
            .help(&self.shared.sources(), &self.shared.directory);
        ack.await;
        Ok(())
    }

    /// Whether `service` is in panic mode: fewer than `panic_threshold_percent` of its
    /// endpoints are healthy, so picks go to all of them regardless of health.
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

    /// The current endpoints and whether each is routable, in address order.
    pub fn endpoints(&self) -> Vec<(Endpoint, bool)> {
        let table = self.slot.table.load();
        table
            .members
            .iter()
            .map(|m| (m.state.endpoint().clone(), m.routable))
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
