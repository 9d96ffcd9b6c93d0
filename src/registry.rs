//! The service registry: the authoritative membership of every service.
//!
//! This module owns [`ServiceRegistry`]. It is control-plane state: a map from service name to
//! its endpoints (keyed by address), behind one lock that is never taken on the pick path.
//! Load balancers *attach* to a registry; every change is pushed to each attached balancer's
//! control plane, and the registry call returns only once all of them have published tables
//! reflecting it.
//!
//! # Invariants
//!
//! * **Read-your-writes**: when `register`, `register_batch`, `replace`, `update`,
//!   `deregister` or `remove_service` returns, every balancer attached to this registry routes
//!   by the membership the call observed: a deregistered endpoint is never picked by a
//!   selection that starts after the call returned. This holds whatever the call returns: a
//!   call that changed nothing (an identical registration racing the first) or failed
//!   because of the state it saw (a second `deregister` of the same endpoint: `UnknownEndpoint`)
//!   also waits until the changes queued before it are published.
//! * **No false success**: a call returns `Ok` only once every attached balancer has
//!   published the change; if one could not (a panic while applying it, caught and logged),
//!   the call returns [`Error::PublishFailed`] and the registry keeps the change.
//! * **All or nothing**: a call validates everything before changing anything; a rejected
//!   call leaves the registry exactly as it was. A batch is applied as one version.
//! * **Identity is the address**: registering an address already present replaces its
//!   metadata; identical re-registration changes nothing (and publishes nothing).
//! * Versions increase by one per applied change, across all services, and are delivered to
//!   each balancer in order (they are queued while the registry lock is held).
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use crate::endpoint::{Endpoint, EndpointMetadata, validate_service_name};
use crate::error::{Error, truncate};
use crate::handoff::queue::Ack;
use crate::handoff::{Command, MembershipSink, MembershipSource};
use crate::sync::{DataArc, DataWeak, Mutex};

/// A service's endpoints, sorted by address, shared copy-on-write with the balancers that
/// read them: a read hands out the list itself (no copy), and the first change after a read
/// copies it once (so a burst of changes between two reads costs one copy).
#[derive(Clone, Default)]
struct Members(DataArc<Vec<Endpoint>>);

impl Members {
    fn position(&self, address: &SocketAddr) -> Result<usize, usize> {
        self.0.binary_search_by(|e| e.address.cmp(address))
    }

    fn get(&self, address: &SocketAddr) -> Option<&Endpoint> {
        self.position(address).ok().map(|i| &self.0[i])
    }

    /// Adds `endpoint`, or replaces the one with its address.
    fn insert(&mut self, endpoint: Endpoint) {
        match self.position(&endpoint.address) {
            Ok(i) => DataArc::make_mut(&mut self.0)[i] = endpoint,
            Err(i) => DataArc::make_mut(&mut self.0).insert(i, endpoint),
        }
    }

    fn remove(&mut self, address: &SocketAddr) -> Option<Endpoint> {
        let i = self.position(address).ok()?;
        Some(DataArc::make_mut(&mut self.0).remove(i))
    }

    /// Adds or replaces every endpoint of `batch` (sorted by address, no duplicates), then
    /// removes the addresses in `removals`, in one merge: `O(n + k log k)` for `n` endpoints
    /// and a batch of `k`, where inserting one by one into the sorted list would cost
    /// `O(n·k)`. Returns whether anything changed.
    fn merge(&mut self, batch: Vec<Endpoint>, removals: &[SocketAddr], interner: &mut Interner) -> bool {
        let unchanged = batch.iter().all(|e| self.get(&e.address) == Some(e))
            && removals.iter().all(|a| self.get(a).is_none());
        if unchanged {
            return false;
        }
        let mut gone = removals.to_vec();
        gone.sort_unstable();
        let removed = |a: &SocketAddr| gone.binary_search(a).is_ok();
        let old = std::mem::take(DataArc::make_mut(&mut self.0));
        let mut merged = Vec::with_capacity(old.len() + batch.len());
        let mut old = old.into_iter().peekable();
        let mut batch = batch.into_iter().peekable();
        loop {
            let take_new = match (old.peek(), batch.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(o), Some(n)) => n.address <= o.address,
            };
            if take_new {
                let Some(new) = batch.next() else { break };
                if old.next_if(|o| o.address == new.address).is_some() {
                    // replaced by `new`
                }
                if !removed(&new.address) {
                    merged.push(interner.intern(new));
                }
            } else if let Some(o) = old.next() {
                if !removed(&o.address) {
                    merged.push(o);
                }
            }
        }
        *DataArc::make_mut(&mut self.0) = merged;
        true
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The first hash key that `upserts` would share with another endpoint once applied
    /// (with `removals` removed): `(key, the endpoint that has it, the one that would also)`.
    /// Cheap when no upsert carries a hash key (the common case).
    fn hash_key_conflict<'a>(
        &'a self,
        upserts: impl Iterator<Item = &'a Endpoint> + Clone,
        removals: &[SocketAddr],
    ) -> Option<(String, SocketAddr, SocketAddr)> {
        use crate::endpoint::HASH_KEY_TAG;
        if upserts.clone().all(|e| e.tag(HASH_KEY_TAG).is_none()) {
            return None;
        }
        let replaced: std::collections::HashSet<SocketAddr> = upserts
            .clone()
            .map(|e| e.address)
            .chain(removals.iter().copied())
            .collect();
        let mut owners: std::collections::HashMap<&str, SocketAddr> = self
            .values()
            .filter(|e| !replaced.contains(&e.address))
            .filter_map(|e| Some((e.tag(HASH_KEY_TAG)?, e.address)))
            .collect();
        for e in upserts {
            if removals.contains(&e.address) {
                continue;
            }
            let Some(key) = e.tag(HASH_KEY_TAG) else { continue };
            match owners.insert(key, e.address) {
                Some(other) if other != e.address => return Some((key.to_owned(), other, e.address)),
                _ => {}
            }
        }
        None
    }

    fn values(&self) -> std::slice::Iter<'_, Endpoint> {
        self.0.iter()
    }

    /// Whether it holds exactly `wanted`.
    fn same_as(&self, wanted: &BTreeMap<SocketAddr, Endpoint>) -> bool {
        self.0.len() == wanted.len() && self.0.iter().zip(wanted.values()).all(|(a, b)| a == b)
    }

    fn from_map(map: BTreeMap<SocketAddr, Endpoint>) -> Self {
        Members(DataArc::new(map.into_values().collect()))
    }
}

#[derive(Default)]
struct ServiceRecord {
    endpoints: Members,
    version: u64,
}

#[derive(Default)]
struct RegistryState {
    services: BTreeMap<DataArc<str>, ServiceRecord>,
    sinks: Vec<DataWeak<dyn MembershipSink>>,
    version: u64,
    /// Metadata values registered, shared by every endpoint that carries an equal one (a
    /// fleet's endpoints mostly share a few zones, weights and tags: one allocation each,
    /// not one per endpoint).
    metadata: Interner,
}

/// The metadata interner: equal values share one allocation. Values nobody else holds are
/// purged whenever the pool has doubled since the last purge (amortized O(1) per insert).
#[derive(Default)]
struct Interner {
    pool: std::collections::HashSet<DataArc<EndpointMetadata>, ahash::RandomState>,
    purge_at: usize,
}

impl Interner {
    /// `endpoint` with its metadata replaced by the pooled equal value (added if new).
    fn intern(&mut self, endpoint: Endpoint) -> Endpoint {
        let Some(metadata) = endpoint.shared_metadata() else {
            return endpoint;
        };
        if let Some(pooled) = self.pool.get(metadata) {
            return endpoint.with_shared_metadata(pooled.clone());
        }
        self.pool.insert(metadata.clone());
        if self.pool.len() >= self.purge_at {
            self.pool.retain(|m| DataArc::strong_count(m) > 1);
            self.purge_at = (self.pool.len() * 2).max(64);
        }
        endpoint
    }
}

impl RegistryState {
    /// Announces a change of `service` to every live sink; returns the acks and the sinks to
    /// help.
    fn broadcast(&mut self, service: &DataArc<str>) -> Delivery {
        let mut delivery = Delivery::default();
        self.sinks.retain(|weak| match weak.upgrade() {
            Some(sink) if !sink.is_closed() => {
                delivery
                    .acks
                    .push((service.clone(), sink.submit(Command::Changed(service.clone()))));
                delivery.sinks.push(sink);
                true
            }
            _ => false,
        });
        delivery
    }

    /// What waits for every change of `service` announced so far (a service that is not in
    /// the registry may still be in the balancers' tables until its removal is published).
    /// A name that could never have been registered needs no wait.
    fn sync(&mut self, service: &str) -> Delivery {
        if validate_service_name(service).is_err() {
            return Delivery::default();
        }
        self.broadcast(&DataArc::from(service))
    }
}

/// Acks to await and sinks to help once the registry lock is released.
#[derive(Default)]
struct Delivery {
    acks: Vec<(DataArc<str>, Ack)>,
    sinks: Vec<DataArc<dyn MembershipSink>>,
}

impl Delivery {
    /// Lets sinks without a thread apply the change, then waits for every publication.
    ///
    /// # Errors
    ///
    /// [`Error::PublishFailed`] if a balancer could not publish it (the registry keeps the
    /// change). A balancer that was stopped meanwhile routes nothing and is not an error.
    async fn complete(self) -> Result<(), Error> {
        for sink in &self.sinks {
            sink.help();
        }
        let mut first_error = None;
        for (service, ack) in self.acks {
            match ack.await.into_result(&service) {
                Ok(()) | Err(Error::Stopped) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The outcome of a registry call and what to wait for before reporting it.
///
/// Every call that read a service's state waits, whatever its outcome, until every attached
/// balancer has published that state: a call that changed nothing (an identical
/// re-registration racing the first one) or that failed because of the state it saw (a
/// second `deregister` of the same endpoint) must not return while picks still follow an
/// older state than the one it observed.
struct Synced {
    delivery: Delivery,
    result: Result<(), Error>,
}

impl Synced {
    /// Waits for the publication, then reports: the call's own error first, then a failure
    /// to publish.
    async fn complete(self) -> Result<(), Error> {
        let published = self.delivery.complete().await;
        self.result?;
        published
    }
}

/// The membership of every service, shared by any number of load balancers.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Endpoint, EndpointMetadata, ServiceRegistry};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let registry = ServiceRegistry::new();
/// let west = EndpointMetadata::new().with_region("us-west-2").with_zone("us-west-2a");
/// registry
///     .register_batch(
///         "api",
///         vec![
///             Endpoint::new("127.0.0.1:5001".parse()?, Some(west.clone())),
///             Endpoint::new("127.0.0.1:5002".parse()?, None),
///         ],
///     )
///     .await?;
/// let found = registry.find_matching("api", Some("us-west-2"), None).await?;
/// assert_eq!(found.len(), 1);
/// registry.deregister("api", &found[0]).await?;
/// assert_eq!(registry.endpoints("api").await?.len(), 1);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct ServiceRegistry {
    state: Mutex<RegistryState>,
}

impl ServiceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `endpoint` under `service` (creating the service if needed). Registering an
    /// address that is already present replaces its metadata.
    ///
    /// Returns once every attached balancer routes by the new membership.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidServiceName`], [`Error::InvalidAddress`], [`Error::InvalidWeight`],
    /// [`Error::InvalidMetadata`], [`Error::DuplicateHashKey`] (another endpoint of the
    /// service carries its hash key); [`Error::PublishFailed`] if an attached balancer could
    /// not publish the change (the registry keeps it).
    pub async fn register(&self, service: impl Into<String>, endpoint: Endpoint) -> Result<(), Error> {
        let service = service.into();
        validate_service_name(&service)?;
        endpoint.validate()?;
        self.change(&service, true, |record, interner| {
            if let Some(conflict) = record
                .endpoints
                .hash_key_conflict(std::iter::once(&endpoint), &[])
            {
                return Err(duplicate_hash_key(&service, conflict));
            }
            let unchanged = record.endpoints.get(&endpoint.address) == Some(&endpoint);
            if !unchanged {
                record.endpoints.insert(interner.intern(endpoint));
            }
            Ok(!unchanged)
        })
        .complete()
        .await
    }

    /// Registers several endpoints under `service` as one change: all of them or, if any is
    /// invalid or an address repeats, none.
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register), plus [`Error::DuplicateEndpoint`].
    pub async fn register_batch(
        &self,
        service: impl Into<String>,
        endpoints: Vec<Endpoint>,
    ) -> Result<(), Error> {
        let service = service.into();
        validate_service_name(&service)?;
        let mut seen = std::collections::BTreeSet::new();
        for endpoint in &endpoints {
            endpoint.validate()?;
            if !seen.insert(endpoint.address) {
                return Err(Error::DuplicateEndpoint {
                    service: DataArc::from(service.as_str()),
                    address: endpoint.address,
                });
            }
        }
        if endpoints.is_empty() {
            return Ok(());
        }
        let mut endpoints = endpoints;
        endpoints.sort_unstable_by_key(|e| e.address);
        self.change(&service, true, |record, interner| {
            if let Some(conflict) = record.endpoints.hash_key_conflict(endpoints.iter(), &[]) {
                return Err(duplicate_hash_key(&service, conflict));
            }
            Ok(record.endpoints.merge(endpoints, &[], interner))
        })
        .complete()
        .await
    }

    /// Makes `endpoints` the whole membership of `service`, as one change (one version, one
    /// table rebuild per balancer): addresses not listed are removed, listed ones are added
    /// or have their metadata replaced. The service is created if needed; an empty list
    /// leaves it registered with no endpoints. This is how a discovery source publishes a
    /// full snapshot.
    ///
    /// # Errors
    ///
    /// As [`register_batch`](Self::register_batch); a rejected call changes nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use tai_loadbalancer::{Endpoint, ServiceRegistry};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let registry = ServiceRegistry::new();
    /// registry.register("api", Endpoint::new("127.0.0.1:5001".parse()?, None)).await?;
    /// registry
    ///     .replace("api", vec![Endpoint::new("127.0.0.1:5002".parse()?, None)])
    ///     .await?;
    /// let addresses: Vec<_> = registry.endpoints("api").await?.iter().map(|e| e.address).collect();
    /// assert_eq!(addresses, ["127.0.0.1:5002".parse()?]);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn replace(&self, service: impl Into<String>, endpoints: Vec<Endpoint>) -> Result<(), Error> {
        let service = service.into();
        validate_service_name(&service)?;
        let wanted = validated_batch(&service, endpoints)?;
        self.change_or_create(&service, |record, interner| {
            if let Some(conflict) = Members::default().hash_key_conflict(wanted.values(), &[]) {
                return Err(duplicate_hash_key(&service, conflict));
            }
            if record.endpoints.same_as(&wanted) {
                return Ok(false);
            }
            let wanted = wanted
                .into_iter()
                .map(|(address, endpoint)| (address, interner.intern(endpoint)))
                .collect();
            record.endpoints = Members::from_map(wanted);
            Ok(true)
        })
        .complete()
        .await
    }

    /// Applies incremental changes to `service` as one change: `upserts` are added or have
    /// their metadata replaced, then `removals` are removed (addresses not present are
    /// ignored, so replaying a change is harmless). The service is created if needed.
    ///
    /// # Errors
    ///
    /// As [`register_batch`](Self::register_batch); a rejected call changes nothing.
    pub async fn update(
        &self,
        service: impl Into<String>,
        upserts: Vec<Endpoint>,
        removals: &[SocketAddr],
    ) -> Result<(), Error> {
        let service = service.into();
        validate_service_name(&service)?;
        let upserts = validated_batch(&service, upserts)?;
        self.change_or_create(&service, |record, interner| {
            if let Some(conflict) = record.endpoints.hash_key_conflict(upserts.values(), removals) {
                return Err(duplicate_hash_key(&service, conflict));
            }
            let upserts = upserts.into_values().collect();
            Ok(record.endpoints.merge(upserts, removals, interner))
        })
        .complete()
        .await
    }

    /// As [`change`](Self::change) with `create`, except that a service created by this call
    /// stays registered even when it ends up empty.
    fn change_or_create(
        &self,
        service: &str,
        f: impl FnOnce(&mut ServiceRecord, &mut Interner) -> Result<bool, Error>,
    ) -> Synced {
        self.change(service, true, |record, interner| {
            // A stored record has a version: it was inserted by an applied change.
            let created = record.version == 0;
            Ok(f(record, interner)? || created)
        })
    }

    /// Removes the endpoint with `endpoint.address` from `service` (its metadata is not
    /// compared). The service stays registered, possibly with no endpoints.
    ///
    /// Returns once no attached balancer can pick it for a new request. Requests already in
    /// flight on it are not interrupted.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`] (returned once every balancer
    /// has published the state that made it so), [`Error::PublishFailed`].
    pub async fn deregister(&self, service: &str, endpoint: &Endpoint) -> Result<(), Error> {
        let address = endpoint.address;
        self.change(service, false, |record, _| {
            match record.endpoints.remove(&address) {
                Some(_) => Ok(true),
                None => Err(Error::UnknownEndpoint {
                    service: DataArc::from(truncate(service)),
                    address,
                }),
            }
        })
        .complete()
        .await
    }

    /// Removes `service` and all its endpoints; balancers then answer
    /// [`Error::UnknownService`] for it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub async fn remove_service(&self, service: &str) -> Result<(), Error> {
        let synced = {
            let mut state = self.state.lock();
            match state.services.remove_entry(service) {
                Some((name, _)) => {
                    state.version += 1;
                    tracing::debug!(service = %name, version = state.version, "service removed from registry");
                    Synced {
                        delivery: state.broadcast(&name),
                        result: Ok(()),
                    }
                }
                // Maybe removed by a call that is still waiting for its publication: wait for
                // it too, so picks no longer see the service when this error is returned.
                None => Synced {
                    delivery: state.sync(service),
                    result: Err(Error::unknown_service(service)),
                },
            }
        };
        synced.complete().await
    }

    /// The endpoints of `service` in `region` and `zone` (`None` matches anything), in
    /// address order.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub async fn find_matching(
        &self,
        service: &str,
        region: Option<&str>,
        zone: Option<&str>,
    ) -> Result<Vec<Endpoint>, Error> {
        let state = self.state.lock();
        let record = state
            .services
            .get(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        Ok(record
            .endpoints
            .values()
            .filter(|e| region.is_none_or(|r| e.region() == Some(r)))
            .filter(|e| zone.is_none_or(|z| e.zone() == Some(z)))
            .cloned()
            .collect())
    }

    /// All endpoints of `service`, in address order.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`].
    pub async fn endpoints(&self, service: &str) -> Result<Vec<Endpoint>, Error> {
        self.find_matching(service, None, None).await
    }

    /// The names of all registered services, sorted.
    pub async fn services(&self) -> Vec<String> {
        self.state.lock().services.keys().map(|s| s.to_string()).collect()
    }

    /// The registry's version: the number of changes applied so far.
    pub fn version(&self) -> u64 {
        self.state.lock().version
    }

    /// Applies `f` to the record of `service` under the lock; if it reports a change, bumps
    /// the version and queues the new membership to every balancer. A record created for this
    /// call is removed again if `f` fails or changes nothing.
    ///
    /// Whatever the outcome, the returned [`Synced`] waits until every balancer has published
    /// the state the call observed (a change that changed nothing, or an error the state
    /// caused, still waits for the changes queued before it).
    fn change(
        &self,
        service: &str,
        create: bool,
        f: impl FnOnce(&mut ServiceRecord, &mut Interner) -> Result<bool, Error>,
    ) -> Synced {
        let mut state = self.state.lock();
        let (name, mut record, created) = match state.services.remove_entry(service) {
            Some((name, record)) => (name, record, false),
            None if create => (DataArc::from(service), ServiceRecord::default(), true),
            None => {
                return Synced {
                    delivery: state.sync(service),
                    result: Err(Error::unknown_service(service)),
                };
            }
        };
        // The record is out of the map while `f` runs (invisible: we hold the lock); it goes
        // back unless it was created for this call and the call failed or changed nothing.
        let result = f(&mut record, &mut state.metadata);
        let changed = matches!(result, Ok(true));
        if changed {
            state.version += 1;
            record.version = state.version;
            tracing::debug!(
                service = %name,
                version = record.version,
                endpoints = record.endpoints.len(),
                "registry membership changed"
            );
        }
        if !created || changed {
            state.services.insert(name.clone(), record);
        }
        // A change is announced; anything else waits for what was announced before it (the
        // same command: balancers re-read the membership, find nothing newer and publish
        // nothing, but only after every earlier command).
        Synced {
            delivery: state.broadcast(&name),
            result: result.map(|_| ()),
        }
    }

    /// Attaches a balancer: announces every service to it and keeps it informed of every
    /// later change. Returns what to complete before the balancer is used.
    pub(crate) fn attach(
        &self,
        sink: DataWeak<dyn MembershipSink>,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        let mut state = self.state.lock();
        let mut delivery = Delivery::default();
        if let Some(strong) = sink.upgrade() {
            for name in state.services.keys() {
                delivery
                    .acks
                    .push((name.clone(), strong.submit(Command::Changed(name.clone()))));
            }
            delivery.sinks.push(strong);
            state.sinks.push(sink);
        }
        delivery.complete()
    }
}

/// The error for a hash key two endpoints of `service` would share.
fn duplicate_hash_key(service: &str, (key, a, b): (String, SocketAddr, SocketAddr)) -> Error {
    Error::DuplicateHashKey {
        service: DataArc::from(truncate(service)),
        key: truncate(&key).to_owned(),
        addresses: (a, b),
    }
}

/// Validates `endpoints` for one batch of `service`: each endpoint, and no address twice.
fn validated_batch(service: &str, endpoints: Vec<Endpoint>) -> Result<BTreeMap<SocketAddr, Endpoint>, Error> {
    let mut batch = BTreeMap::new();
    for endpoint in endpoints {
        endpoint.validate()?;
        let address = endpoint.address;
        if batch.insert(address, endpoint).is_some() {
            return Err(Error::DuplicateEndpoint {
                service: DataArc::from(service),
                address,
            });
        }
    }
    Ok(batch)
}

impl MembershipSource for ServiceRegistry {
    fn membership(&self, service: &str) -> Option<(u64, DataArc<Vec<Endpoint>>)> {
        let state = self.state.lock();
        let record = state.services.get(service)?;
        Some((record.version, record.endpoints.0.clone()))
    }
}

impl fmt::Debug for ServiceRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("ServiceRegistry")
            .field("services", &state.services.len())
            .field("version", &state.version)
            .field("balancers", &state.sinks.len())
            .finish()
    }
}
