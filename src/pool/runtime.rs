//! The tokio side of the pool: connectors, [`ConnectionPool`], [`PooledConnection`] and the
//! maintenance task.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::pin::Pin as StdPin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::PoolStats;
use super::slots::{Acquired, Aftermath, Grant, Refused, Slots, Tracked};
use crate::config::pool::PoolConfig;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::handoff::ControlEvent;
use crate::stats::EndpointHealth;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::clock::Clock;
use crate::sync::{DataArc, DataWeak, Mutex, SnapshotCell};

/// Opens connections to endpoints: what a "connection" is for a [`ConnectionPool`].
///
/// # Examples
///
/// A connector of in-memory "connections" (tests use such to count connects):
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tai_loadbalancer::{Connector, Endpoint};
///
/// struct Counting(AtomicU64);
///
/// impl Connector for Counting {
///     type Connection = u64;
///     type Error = std::io::Error;
///
///     async fn connect(&self, _endpoint: &Endpoint) -> Result<u64, std::io::Error> {
///         Ok(self.0.fetch_add(1, Ordering::Relaxed))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tai_loadbalancer::Error> {
/// let pool = tai_loadbalancer::ConnectionPool::new(Default::default(), Counting(AtomicU64::new(0)))?;
/// let endpoint = Endpoint::new("127.0.0.1:7000".parse().unwrap(), None);
/// let first = pool.acquire(&endpoint).await?;
/// let second = pool.acquire(&endpoint).await?; // the first is in use: a second connection
/// assert_eq!((*first, *second), (0, 1));
/// # Ok(())
/// # }
/// ```
pub trait Connector: Send + Sync + 'static {
    /// The connection.
    type Connection: Send + 'static;
    /// Why a connect failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens a connection to `endpoint`. The pool bounds it with `connect_timeout`.
    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> impl Future<Output = Result<Self::Connection, Self::Error>> + Send;

    /// A cheap, non-blocking check that an idle connection is still usable (for example,
    /// that the peer has not closed it). Called before an idle connection is handed out and
    /// by the maintenance task; a `false` closes it. The default trusts every connection.
    fn is_valid(&self, connection: &mut Self::Connection) -> bool {
        let _ = connection;
        true
    }
}

/// Plain TCP connections (tokio `TcpStream`) with `TCP_NODELAY` and a connect timeout.
///
/// `is_valid` detects a connection the peer closed (or that has unread bytes, which a
/// request/response protocol would misread) without blocking.
///
/// # Examples
///
/// ```
/// # use std::time::Duration;
/// use tai_loadbalancer::TcpConnector;
/// let connector = TcpConnector::new().connect_timeout(Duration::from_millis(500));
/// # let _ = connector;
/// ```
#[derive(Clone, Debug)]
pub struct TcpConnector {
    connect_timeout: Duration,
    nodelay: bool,
}

impl Default for TcpConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpConnector {
    /// `TCP_NODELAY` on, a 1 s connect timeout.
    pub fn new() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            nodelay: true,
        }
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Turns `TCP_NODELAY` on or off.
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }
}

impl Connector for TcpConnector {
    type Connection = tokio::net::TcpStream;
    type Error = std::io::Error;

    async fn connect(&self, endpoint: &Endpoint) -> Result<tokio::net::TcpStream, std::io::Error> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(endpoint.address),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            )
        })??;
        stream.set_nodelay(self.nodelay)?;
        Ok(stream)
    }

    fn is_valid(&self, connection: &mut tokio::net::TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match connection.try_read(&mut byte) {
            // Nothing to read: open and quiet, as an idle connection should be.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            // End of stream (the peer closed), stray bytes, or an error.
            _ => false,
        }
    }
}

/// tonic `Channel`s (HTTP/2, one per connection), for pooling more than one connection per
/// endpoint (the 100-concurrent-streams ceiling of many servers).
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{ConnectionPool, GrpcConnector, PoolConfig};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tai_loadbalancer::Error> {
/// let pool = ConnectionPool::new(PoolConfig::default(), GrpcConnector::new())?;
/// # let _ = pool;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "grpc")]
#[derive(Clone, Debug)]
pub struct GrpcConnector {
    connect_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
}

#[cfg(feature = "grpc")]
impl Default for GrpcConnector {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "grpc")]
impl GrpcConnector {
    /// Plain-text HTTP/2 (`http://`), 1 s connect timeout.
    pub fn new() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// TLS (and mTLS) with `tls` (feature `tls`): each connection takes the current material
    /// (reloaded files included), verifies the endpoint's `tls_server_name` tag or the
    /// service's server name (else its IP address), and requires ALPN `h2`.
    ///
    /// # Examples
    ///
    /// ```
    /// use tai_loadbalancer::{ConnectionPool, GrpcConnector, PoolConfig};
    /// use tonic::transport::{Certificate, ClientTlsConfig};
    ///
    /// # let ca_pem = rcgen::generate_simple_self_signed(vec!["api.internal".into()]).unwrap().cert.pem();
    /// let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
    /// let connector = GrpcConnector::new().tls(tls);
    /// let pool = ConnectionPool::new(PoolConfig::default(), connector)?;
    /// # let _ = pool;
    /// # Ok::<_, tai_loadbalancer::Error>(())
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: impl Into<crate::tls::ClientTls>) -> Self {
        self.tls = Some(tls.into());
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

#[cfg(feature = "grpc")]
impl Connector for GrpcConnector {
    type Connection = tonic::transport::Channel;
    type Error = GrpcConnectError;

    async fn connect(&self, endpoint: &Endpoint) -> Result<tonic::transport::Channel, GrpcConnectError> {
        #[cfg(feature = "tls")]
        let target = match &self.tls {
            Some(tls) => tls
                .grpc_endpoint(endpoint)
                .map(|(target, _generation)| target)
                .map_err(|e| GrpcConnectError(e.to_string()))?,
            None => plaintext(endpoint)?,
        };
        #[cfg(not(feature = "tls"))]
        let target = plaintext(endpoint)?;
        target
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| GrpcConnectError::from_transport(&e))
    }
}

#[cfg(feature = "grpc")]
fn plaintext(endpoint: &Endpoint) -> Result<tonic::transport::Endpoint, GrpcConnectError> {
    tonic::transport::Endpoint::from_shared(format!("http://{}", endpoint.address))
        .map_err(|e| GrpcConnectError::from_transport(&e))
}

/// Why [`GrpcConnector`] could not connect, in words: tonic's error with its causes (with the
/// `tls` feature, a handshake failure says what failed: "certificate expired", "name
/// mismatch", "unknown CA", ...).
#[cfg(feature = "grpc")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcConnectError(String);

#[cfg(feature = "grpc")]
impl GrpcConnectError {
    fn from_transport(error: &tonic::transport::Error) -> Self {
        #[cfg(feature = "tls")]
        {
            Self(crate::tls::describe_error(error))
        }
        #[cfg(not(feature = "tls"))]
        {
            use std::error::Error as _;
            let mut text = error.to_string();
            let mut next = error.source();
            while let Some(cause) = next {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                next = cause.source();
            }
            Self(text)
        }
    }
}

#[cfg(feature = "grpc")]
impl fmt::Display for GrpcConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "grpc")]
impl std::error::Error for GrpcConnectError {}

/// One endpoint's pool.
struct EndpointPool<T> {
    endpoint: Endpoint,
    slots: Slots<T>,
    max_lifetime_ms: u64,
    created: AtomicU64,
    closed: AtomicU64,
    timeouts: AtomicU64,
    rejected: AtomicU64,
    connect_errors: AtomicU64,
    clock: Clock,
}

impl<T> EndpointPool<T> {
    fn finish(&self, after: Aftermath<T>) {
        let closed = after.finish();
        if closed > 0 {
            self.closed.fetch_add(closed as u64, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> PoolStats {
        let c = self.slots.counts();
        PoolStats {
            open: c.open,
            idle: c.idle,
            in_use: c.in_use(),
            connecting: c.connecting,
            waiters: c.waiters,
            created: self.created.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
        }
    }
}

type EndpointMap<T> = HashMap<SocketAddr, DataArc<EndpointPool<T>>, ahash::RandomState>;

struct Inner<C: Connector> {
    config: PoolConfig,
    connector: C,
    endpoints: SnapshotCell<EndpointMap<C::Connection>>,
    /// Serializes changes to `endpoints` (never taken by an acquire of a known endpoint).
    writer: Mutex<()>,
    /// Counters of endpoints removed so far, so totals never go backwards.
    removed: Mutex<PoolStats>,
    maintenance: AtomicBool,
    clock: Clock,
}

/// Per-endpoint pools of reusable connections.
///
/// Cheap to clone (clones share the pools). Never more than `max_connections` open per
/// endpoint, waiters served first come, first served; see [`PoolConfig`] for the limits.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{ConnectionPool, Endpoint, PoolConfig, TcpConnector};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let address = listener.local_addr()?;
/// # tokio::spawn(async move {
/// #     let (mut s, _) = listener.accept().await.unwrap();
/// #     let mut b = [0u8; 4];
/// #     while s.read_exact(&mut b).await.is_ok() { s.write_all(&b).await.unwrap(); }
/// # });
/// let pool = ConnectionPool::new(PoolConfig::default(), TcpConnector::new())?;
/// let endpoint = Endpoint::new(address, None);
///
/// // Acquire connection
/// let mut conn = pool.acquire(&endpoint).await?;
/// conn.write_all(b"ping").await?;
/// # let mut b = [0u8; 4]; conn.read_exact(&mut b).await?;
///
/// // Connection is automatically released when dropped
/// drop(conn);
/// let again = pool.acquire(&endpoint).await?; // the same connection, reused
/// assert_eq!(pool.stats(&endpoint).unwrap().created, 1);
/// # drop(again);
/// # Ok(())
/// # }
/// ```
pub struct ConnectionPool<C: Connector> {
    inner: DataArc<Inner<C>>,
}

impl<C: Connector> Clone for ConnectionPool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Connector> fmt::Debug for ConnectionPool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("config", &self.inner.config)
            .field("totals", &self.totals())
            .finish()
    }
}

impl<C: Connector> ConnectionPool<C> {
    /// A pool with no endpoints yet; each endpoint's pool is made on its first `acquire`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the offending field.
    pub fn new(config: PoolConfig, connector: C) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            inner: DataArc::new(Inner {
                config,
                connector,
                endpoints: SnapshotCell::new(crate::sync::Arc::new(EndpointMap::default())),
                writer: Mutex::new(()),
                removed: Mutex::new(PoolStats::default()),
                maintenance: AtomicBool::new(false),
                clock: Clock::system(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// The connector.
    pub fn connector(&self) -> &C {
        &self.inner.connector
    }

    /// A connection to `endpoint`: the most recently used idle one that is still fresh and
    /// valid, else a new one if fewer than `max_connections` are open, else the first one
    /// returned while this caller waits (first come, first served) for up to
    /// `acquire_timeout`. The connection goes back to the pool when the handle is dropped.
    ///
    /// # Errors
    ///
    /// * [`Error::PoolExhausted`]: `max_waiters` callers are already waiting (at once).
    /// * [`Error::AcquireTimeout`]: nothing became free within `acquire_timeout`.
    /// * [`Error::Connect`], [`Error::ConnectTimeout`]: opening a connection failed; the
    ///   slot passes to the next waiter, which tries for itself.
    /// * [`Error::PoolClosed`]: the endpoint was removed (see [`follow`](Self::follow)).
    pub async fn acquire(&self, endpoint: &Endpoint) -> Result<PooledConnection<C::Connection>, Error> {
        if let Err(e) = tokio::runtime::Handle::try_current() {
            return Err(Error::Runtime {
                message: format!("ConnectionPool::acquire needs a tokio runtime: {e}"),
            });
        }
        let pool = self.endpoint_pool(endpoint);
        self.ensure_maintenance();
        let inner = &*self.inner;
        let now = inner.clock.now_ms();
        let (idle_ms, life_ms) = (millis(inner.config.idle_timeout), pool.max_lifetime_ms);
        let mut after = Aftermath::default();
        let acquired = pool.slots.acquire(
            |t, since| fresh(t, since, now, idle_ms, life_ms) && inner.connector.is_valid(&mut t.conn),
            &mut after,
        );
        pool.finish(after);
        let address = endpoint.address;
        match acquired {
            Ok(Acquired::Idle(tracked)) => Ok(PooledConnection::new(pool, tracked)),
            Ok(Acquired::Create) => self.create(pool).await,
            Ok(Acquired::Wait(ticket)) => {
                let waited = {
                    let wait = Wait {
                        pool: &pool,
                        ticket,
                        done: false,
                    };
                    tokio::time::timeout(inner.config.acquire_timeout, wait).await
                };
                match waited {
                    Err(_) => {
                        let n = pool.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            // Logged at 1, 2, 4, 8... so an overload does not flood the log.
                            tracing::warn!(%address, timeouts = n, "pool acquire timed out: every connection busy");
                        }
                        Err(Error::AcquireTimeout {
                            address,
                            waited: inner.config.acquire_timeout,
                        })
                    }
                    Ok(Ok(Grant::Conn(tracked))) => Ok(PooledConnection::new(pool, tracked)),
                    Ok(Ok(Grant::Slot)) => self.create(pool).await,
                    Ok(Err(_)) => Err(Error::PoolClosed { address }),
                }
            }
            Err(Refused::Exhausted { waiters }) => {
                let n = pool.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%address, waiters, rejected = n, "pool exhausted: max_waiters reached, shedding load");
                }
                Err(Error::PoolExhausted { address, waiters })
            }
            Err(Refused::Closed) => Err(Error::PoolClosed { address }),
        }
    }

    /// Opens a connection on a slot the caller holds.
    async fn create(
        &self,
        pool: DataArc<EndpointPool<C::Connection>>,
    ) -> Result<PooledConnection<C::Connection>, Error> {
        // Held across the connect: a failed connect, or this future dropped mid-connect,
        // gives the slot back (to the next waiter).
        let reservation = Reservation::new(&pool);
        let conn = self.connect(&pool).await?;
        reservation.keep();
        pool.slots.connected();
        let tracked = Tracked {
            conn,
            created_ms: self.inner.clock.now_ms(),
        };
        Ok(PooledConnection::new(pool, tracked))
    }

    /// One connect, bounded by `connect_timeout`, counted.
    async fn connect(&self, pool: &EndpointPool<C::Connection>) -> Result<C::Connection, Error> {
        let address = pool.endpoint.address;
        let timeout = self.inner.config.connect_timeout;
        let result = match tokio::time::timeout(timeout, self.inner.connector.connect(&pool.endpoint)).await {
            Ok(Ok(conn)) => {
                pool.created.fetch_add(1, Ordering::Relaxed);
                return Ok(conn);
            }
            Ok(Err(e)) => Error::Connect {
                address,
                reason: error_chain(&e),
            },
            Err(_) => Error::ConnectTimeout { address, timeout },
        };
        pool.connect_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%address, error = %result, "pool connect failed");
        Err(result)
    }

    /// The pool of `endpoint`, made on first use.
    fn endpoint_pool(&self, endpoint: &Endpoint) -> DataArc<EndpointPool<C::Connection>> {
        if let Some(pool) = self.inner.endpoints.load().get(&endpoint.address) {
            return pool.clone();
        }
        let _writer = self.inner.writer.lock();
        let current = self.inner.endpoints.load_full();
        if let Some(pool) = current.get(&endpoint.address) {
            return pool.clone();
        }
        let config = &self.inner.config;
        let pool = DataArc::new(EndpointPool {
            endpoint: endpoint.clone(),
            slots: Slots::new(config.max_connections, config.max_waiters),
            max_lifetime_ms: millis(config.max_lifetime),
            created: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            clock: self.inner.clock.clone(),
        });
        let mut next = (*current).clone();
        next.insert(endpoint.address, pool.clone());
        self.inner.endpoints.store(crate::sync::Arc::new(next));
        pool
    }

    /// Counters of `endpoint`'s pool (`None` if it has none).
    pub fn stats(&self, endpoint: &Endpoint) -> Option<PoolStats> {
        self.inner
            .endpoints
            .load()
            .get(&endpoint.address)
            .map(|p| p.stats())
    }

    /// Counters summed over every endpoint (removed endpoints' counters included).
    pub fn totals(&self) -> PoolStats {
        let mut total = *self.inner.removed.lock();
        for pool in self.inner.endpoints.load().values() {
            total.add(&pool.stats());
        }
        total
    }

    /// Endpoints with a pool, and their counters.
    pub fn endpoints(&self) -> Vec<(SocketAddr, PoolStats)> {
        let mut out: Vec<_> = self
            .inner
            .endpoints
            .load()
            .iter()
            .map(|(a, p)| (*a, p.stats()))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Drains `endpoint`'s pool: idle connections close at once, connections in use close
    /// when returned, and no idle connection is kept (nor `min_connections` replenished)
    /// until [`undrain`](Self::undrain). Acquires still work (a request already routed to
    /// the endpoint completes) on fresh connections.
    pub fn drain(&self, endpoint: &Endpoint) {
        self.set_draining(endpoint.address, true);
    }

    /// Ends a [`drain`](Self::drain).
    pub fn undrain(&self, endpoint: &Endpoint) {
        self.set_draining(endpoint.address, false);
    }

    fn set_draining(&self, address: SocketAddr, draining: bool) {
        if let Some(pool) = self.inner.endpoints.load().get(&address) {
            let mut after = Aftermath::default();
            pool.slots.set_draining(draining, &mut after);
            pool.finish(after);
        }
    }

    /// Drops `endpoint`'s pool: idle connections close now, connections in use when
    /// returned; waiters and later acquires for it get [`Error::PoolClosed`] until it is
    /// acquired again... which makes a fresh pool. Returns whether it had one.
    pub fn remove(&self, endpoint: &Endpoint) -> bool {
        self.remove_address(endpoint.address)
    }

    fn remove_address(&self, address: SocketAddr) -> bool {
        let _writer = self.inner.writer.lock();
        let current = self.inner.endpoints.load_full();
        let Some(pool) = current.get(&address).cloned() else {
            return false;
        };
        let mut next = (*current).clone();
        next.remove(&address);
        self.inner.endpoints.store(crate::sync::Arc::new(next));
        let mut after = Aftermath::default();
        pool.slots.close(&mut after);
        pool.finish(after);
        let mut stats = pool.stats();
        // What is still open is closed as it comes back; count it as closed now so totals
        // stay consistent once the endpoint is gone.
        stats.closed += stats.open as u64;
        stats.open = 0;
        stats.idle = 0;
        stats.in_use = 0;
        stats.connecting = 0;
        stats.waiters = 0;
        self.inner.removed.lock().add(&stats);
        true
    }

    /// Follows `balancer`'s routing: an endpoint that starts draining (or leaves its service)
    /// has its pool drained, one that is routable again is undrained, and one released by
    /// the balancer (its requests finished, or the drain timeout expired) has its pool
    /// removed unless another service of the balancer still has it. The subscription ends
    /// when the pool is dropped or the balancer stops.
    pub fn follow(&self, balancer: &crate::IntegratedLoadBalancer) {
        let weak: DataWeak<Inner<C>> = DataArc::downgrade(&self.inner);
        // Per address, per service of the balancer that has it: whether it is draining there.
        // A pool is drained while no service has its address as a non-draining member.
        let mut membership: HashMap<SocketAddr, HashMap<String, bool>> = HashMap::new();
        // What routing looks like now (later publications are applied on top of it).
        for (service, endpoints) in balancer.current_topology() {
            for (address, health) in endpoints {
                membership
                    .entry(address)
                    .or_default()
                    .insert(service.clone(), health == EndpointHealth::Draining);
            }
        }
        let settle =
            |pool: &ConnectionPool<C>, address: SocketAddr, services: Option<&HashMap<String, bool>>| {
                let serving = services.is_some_and(|s| s.values().any(|draining| !draining));
                pool.set_draining(address, !serving);
            };
        balancer.subscribe_control(Box::new(move |event: &ControlEvent| {
            let Some(inner) = weak.upgrade() else {
                return false;
            };
            let pool = ConnectionPool { inner };
            match event {
                ControlEvent::Published(update) => {
                    let now: HashMap<SocketAddr, EndpointHealth> = if update.removed {
                        HashMap::new()
                    } else {
                        update.endpoints.iter().copied().collect()
                    };
                    let mut touched: HashSet<SocketAddr> = now.keys().copied().collect();
                    // Members that left this service: draining here until released.
                    for (address, services) in membership.iter_mut() {
                        if !now.contains_key(address) {
                            if let Some(draining) = services.get_mut(&update.service) {
                                *draining = true;
                                touched.insert(*address);
                            }
                        }
                    }
                    for (&address, &health) in &now {
                        membership
                            .entry(address)
                            .or_default()
                            .insert(update.service.clone(), health == EndpointHealth::Draining);
                    }
                    for address in touched {
                        settle(&pool, address, membership.get(&address));
                    }
                }
                ControlEvent::Released { service, released } => {
                    let address = released.address;
                    if let Some(services) = membership.get_mut(&address) {
                        services.remove(service);
                        if services.is_empty() {
                            membership.remove(&address);
                        }
                    }
                    match membership.get(&address) {
                        // No service of this balancer has it any more: drop its pool.
                        None => {
                            pool.remove_address(address);
                        }
                        Some(services) => settle(&pool, address, Some(services)),
                    }
                }
            }
            true
        }));
    }

    /// Starts the maintenance task on the current tokio runtime (once).
    fn ensure_maintenance(&self) {
        if self.inner.maintenance.load(Ordering::Relaxed)
            || self.inner.maintenance.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let weak = DataArc::downgrade(&self.inner);
        let interval = self.inner.config.maintenance_interval;
        tokio::spawn(async move {
            // If the runtime shuts down (the task is dropped), the next acquire starts a new one.
            let _alive = MaintenanceAlive(weak.clone());
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                ConnectionPool { inner }.maintain();
            }
        });
    }

    /// Closes expired and invalid idle connections, then replenishes `min_connections`.
    fn maintain(&self) {
        let inner = &*self.inner;
        let now = inner.clock.now_ms();
        let idle_ms = millis(inner.config.idle_timeout);
        let endpoints = inner.endpoints.load_full();
        for pool in endpoints.values() {
            let mut after = Aftermath::default();
            pool.slots.reap(
                |t, since| {
                    fresh(t, since, now, idle_ms, pool.max_lifetime_ms)
                        && inner.connector.is_valid(&mut t.conn)
                },
                &mut after,
            );
            pool.finish(after);
            let want = pool.slots.reserve(inner.config.effective_min_connections());
            for _ in 0..want {
                let this = self.clone();
                let pool = pool.clone();
                tokio::spawn(async move {
                    let reservation = Reservation::new(&pool);
                    if let Ok(conn) = this.connect(&pool).await {
                        reservation.keep();
                        let tracked = Tracked {
                            conn,
                            created_ms: this.inner.clock.now_ms(),
                        };
                        let mut after = Aftermath::default();
                        pool.slots
                            .add_reserved(tracked, this.inner.clock.now_ms(), &mut after);
                        pool.finish(after);
                    }
                });
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Whether a connection may be reused: idle for less than `idle_ms`, younger than `life_ms`.
fn fresh<T>(t: &Tracked<T>, idle_since: u64, now: u64, idle_ms: u64, life_ms: u64) -> bool {
    now.saturating_sub(idle_since) < idle_ms && now.saturating_sub(t.created_ms) < life_ms
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Clears the pool's "maintenance running" flag when the maintenance task ends or is dropped.
struct MaintenanceAlive<C: Connector>(DataWeak<Inner<C>>);

impl<C: Connector> Drop for MaintenanceAlive<C> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.maintenance.store(false, Ordering::Release);
        }
    }
}

/// A slot reserved for a connect (by an acquire or a `min_connections` refill): given back
/// to the next waiter when dropped, unless [`keep`](Self::keep) says the connect succeeded.
/// Covers a failed connect and a future dropped mid-connect (a cancelled acquire, a runtime
/// shutting down) alike.
struct Reservation<'a, T> {
    pool: &'a EndpointPool<T>,
    armed: bool,
}

impl<'a, T> Reservation<'a, T> {
    fn new(pool: &'a EndpointPool<T>) -> Self {
        Self { pool, armed: true }
    }

    /// The connect succeeded: the slot now belongs to the new connection.
    fn keep(mut self) {
        self.armed = false;
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            let mut after = Aftermath::default();
            self.pool.slots.connect_failed(&mut after);
            self.pool.finish(after);
        }
    }
}

/// A place in an endpoint's queue; leaving it (drop) passes on anything granted meanwhile.
struct Wait<'a, T> {
    pool: &'a EndpointPool<T>,
    ticket: u64,
    done: bool,
}

impl<T> Future for Wait<'_, T> {
    type Output = Result<Grant<T>, Refused>;

    fn poll(mut self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = self.pool.slots.poll_wait(self.ticket, cx.waker());
        if polled.is_ready() {
            self.done = true;
        }
        polled
    }
}

impl<T> Drop for Wait<'_, T> {
    fn drop(&mut self) {
        if !self.done {
            let mut after = Aftermath::default();
            self.pool
                .slots
                .cancel(self.ticket, self.pool.clock.now_ms(), &mut after);
            self.pool.finish(after);
        }
    }
}

/// A connection on loan from a [`ConnectionPool`]; dereferences to the connection and goes
/// back to the pool when dropped (or is closed, if it was marked broken or has expired).
pub struct PooledConnection<T: Send + 'static> {
    pool: DataArc<EndpointPool<T>>,
    tracked: Option<Tracked<T>>,
    broken: bool,
}

impl<T: Send + 'static> PooledConnection<T> {
    fn new(pool: DataArc<EndpointPool<T>>, tracked: Tracked<T>) -> Self {
        Self {
            pool,
            tracked: Some(tracked),
            broken: false,
        }
    }

    /// The endpoint it is connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.pool.endpoint
    }

    /// Marks the connection broken (an I/O error, a protocol error): it is closed instead of
    /// reused when dropped.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Closes the connection now instead of returning it.
    pub fn discard(mut self) {
        self.broken = true;
    }

    /// Takes the connection out of the pool for good (its slot is freed).
    pub fn detach(mut self) -> T {
        let tracked = self.tracked.take().expect("present until drop");
        let mut after = Aftermath::<T>::default();
        // The slot is freed exactly as for a closed connection, but the caller keeps it.
        self.pool.slots.release_slot_only(&mut after);
        self.pool.finish(after);
        tracked.conn
    }
}

impl<T: Send + 'static> Deref for PooledConnection<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.tracked.as_ref().expect("present until drop").conn
    }
}

impl<T: Send + 'static> DerefMut for PooledConnection<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.tracked.as_mut().expect("present until drop").conn
    }
}

impl<T: Send + 'static> fmt::Debug for PooledConnection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("endpoint", &self.pool.endpoint.address)
            .field("broken", &self.broken)
            .finish()
    }
}

impl<T: Send + 'static> Drop for PooledConnection<T> {
    fn drop(&mut self) {
        if let Some(tracked) = self.tracked.take() {
            let now = self.pool.clock.now_ms();
            let keep = !self.broken && now.saturating_sub(tracked.created_ms) < self.pool.max_lifetime_ms;
            let mut after = Aftermath::default();
            self.pool.slots.release(tracked, keep, now, &mut after);
            self.pool.finish(after);
        }
    }
}
