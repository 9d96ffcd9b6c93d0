//! The crate's error type.
//!
//! One `#[non_exhaustive]` enum, [`Error`], for every fallible call: registry writes,
//! configuration, picks. Each variant names the problem and carries the context an
//! operator needs at 3 a.m. (which service, which address, which field). The crate never
//! panics on caller input; it returns one of these.
//!
//! Service names in errors are `Arc<str>` so that the errors a hot path can return during an
//! outage ([`Error::NoEndpoints`], [`Error::NoHealthyEndpoints`]) are built without
//! allocating.
#![deny(unsafe_code)]

use std::net::SocketAddr;

use crate::sync::DataArc;

/// Everything that can go wrong in `tai-loadbalancer`.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Endpoint, Error, ServiceRegistry};
///
/// # pollster_block_on(async {
/// let registry = ServiceRegistry::new();
/// let endpoint = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
/// match registry.deregister("nobody", &endpoint).await {
///     Err(Error::UnknownService { service }) => assert_eq!(&*service, "nobody"),
///     other => panic!("unexpected {other:?}"),
/// }
/// # });
/// # fn pollster_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// #     rt.block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service has never been registered (or was removed).
    #[error("unknown service `{service}`")]
    UnknownService {
        /// The service name that was asked for.
        service: DataArc<str>,
    },

    /// The endpoint is not registered under the service.
    #[error("endpoint {address} is not registered under service `{service}`")]
    UnknownEndpoint {
        /// The service.
        service: DataArc<str>,
        /// The address that was asked for.
        address: SocketAddr,
    },

    /// The service exists but has no endpoints at all.
    #[error("service `{service}` has no endpoints")]
    NoEndpoints {
        /// The service.
        service: DataArc<str>,
    },

    /// The service has endpoints but none is currently routable (all unhealthy or draining).
    #[error("service `{service}` has no healthy endpoints ({total} registered)")]
    NoHealthyEndpoints {
        /// The service.
        service: DataArc<str>,
        /// How many endpoints are registered.
        total: usize,
    },

    /// A service name was rejected.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidServiceName {
        /// The name as given (truncated to 256 bytes).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An endpoint's address cannot receive traffic.
    #[error("invalid endpoint address {address}: {reason}")]
    InvalidAddress {
        /// The rejected address.
        address: SocketAddr,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An endpoint's weight is out of range.
    #[error("invalid weight {weight} for endpoint {address}: must be between 1 and {max}")]
    InvalidWeight {
        /// The endpoint.
        address: SocketAddr,
        /// The rejected weight.
        weight: u32,
        /// The largest accepted weight ([`MAX_WEIGHT`](crate::MAX_WEIGHT)).
        max: u32,
    },

    /// An endpoint's metadata (region, zone, tags) was rejected.
    #[error("invalid metadata for endpoint {address}: {field}: {reason}")]
    InvalidMetadata {
        /// The endpoint.
        address: SocketAddr,
        /// The offending field (`region`, `zone`, `tags`).
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// The same address appears twice in one batch.
    #[error("endpoint {address} appears more than once in the batch for service `{service}`")]
    DuplicateEndpoint {
        /// The service.
        service: DataArc<str>,
        /// The repeated address.
        address: SocketAddr,
    },

    /// Two endpoints of one service carry the same hash key (the
    /// [`HASH_KEY_TAG`](crate::HASH_KEY_TAG) tag): they would own the same keys on the
    /// consistent-hash ring. The registry is left unchanged.
    #[error("endpoints {} and {} of service `{service}` carry the same hash key `{key}`", addresses.0, addresses.1)]
    DuplicateHashKey {
        /// The service.
        service: DataArc<str>,
        /// The repeated hash key.
        key: String,
        /// The endpoint that has it and the one that would also have it.
        addresses: (SocketAddr, SocketAddr),
    },

    /// A subset pick found no routable endpoint in the subset it named, and the fallback
    /// is `no_fallback` (or `default_subset` with an empty default subset).
    #[error("service `{service}` has no routable endpoint in subset {subset}")]
    NoSubsetMatch {
        /// The service.
        service: String,
        /// The subset, as `key=value` pairs.
        subset: String,
    },

    /// A subset pick named a set of tag keys that no `[subsets]` selector has.
    #[error("no subset selector has the keys {keys} (configured: {configured})")]
    UnknownSubsetSelector {
        /// The keys the pick named.
        keys: String,
        /// The configured selectors.
        configured: String,
    },

    /// A session-affinity key is missing, empty or too long.
    #[error("invalid affinity key: {reason}")]
    InvalidAffinityKey {
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A failover group is malformed (a backup equal to the primary, a repeated backup, ...).
    #[error("invalid failover group: {reason}")]
    InvalidFailoverGroup {
        /// What is wrong with it.
        reason: String,
    },

    /// `failover` was called while failover is disabled (`FailoverConfig::enabled` is off).
    #[error("failover is disabled (service `{service}`)")]
    FailoverDisabled {
        /// The group's service.
        service: DataArc<str>,
    },

    /// No failover is left: `max_attempts` were used since the last reset, or no healthy
    /// backup remains after the failed endpoint.
    #[error("failover exhausted for service `{service}` after {attempts} attempts")]
    FailoverExhausted {
        /// The group's service.
        service: DataArc<str>,
        /// Failovers used since the last reset.
        attempts: u32,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: `{field}`: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field, e.g. `consistent_hash.slots`.
        field: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A configuration document could not be parsed.
    #[error("cannot parse configuration{}: {message}", location(*.line, *.column))]
    ConfigParse {
        /// 1-based line of the problem, when known.
        line: Option<usize>,
        /// 1-based column of the problem, when known.
        column: Option<usize>,
        /// The parser's description (names the unknown or mistyped field).
        message: String,
    },

    /// A configuration file could not be read.
    #[error("cannot read configuration file {path}: {message}")]
    ConfigIo {
        /// The path that was read.
        path: String,
        /// The I/O error.
        message: String,
    },

    /// The load balancer was stopped; it routes nothing any more.
    #[error("the load balancer is stopped")]
    Stopped,

    /// A call that needs a tokio runtime (starting health checks) was made outside one.
    #[error("no tokio runtime to run on: {message}")]
    Runtime {
        /// Why the runtime could not be found.
        message: String,
    },

    /// Every connection to the endpoint was in use for the whole `acquire_timeout`.
    #[error("no connection to {address} became free within {waited:?} (pool.acquire_timeout)")]
    AcquireTimeout {
        /// The endpoint.
        address: SocketAddr,
        /// How long the caller waited.
        waited: std::time::Duration,
    },

    /// `max_waiters` callers were already waiting for a connection to the endpoint: shed load.
    #[error(
        "connection pool for {address} is exhausted: {waiters} callers already waiting (pool.max_waiters)"
    )]
    PoolExhausted {
        /// The endpoint.
        address: SocketAddr,
        /// Callers waiting when this one was refused.
        waiters: usize,
    },

    /// Opening a connection failed.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The endpoint.
        address: SocketAddr,
        /// The connector's error, with its causes.
        reason: String,
    },

    /// Opening a connection took longer than `connect_timeout`.
    #[error("connecting to {address} timed out after {timeout:?} (pool.connect_timeout)")]
    ConnectTimeout {
        /// The endpoint.
        address: SocketAddr,
        /// The limit.
        timeout: std::time::Duration,
    },

    /// The endpoint's pool was closed (the endpoint left its service).
    #[error("the connection pool for {address} is closed (the endpoint was removed)")]
    PoolClosed {
        /// The endpoint.
        address: SocketAddr,
    },

    /// The control-plane thread could not be started.
    #[error("cannot start the control-plane thread: {message}")]
    ControlPlane {
        /// The operating system's reason.
        message: String,
    },

    /// A TLS file (CA bundle, certificate or private key) could not be read (feature `tls`).
    #[error("cannot read TLS file {path}: {reason}")]
    TlsFile {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },

    /// TLS material is not what it should be: no PEM block of the expected kind, a block
    /// that does not decode, a certificate that does not parse, an unsupported key
    /// (feature `tls`).
    #[error("invalid TLS {what} in {origin}: {reason}")]
    TlsPem {
        /// What was expected (`CA certificate`, `certificate`, `private key`).
        what: &'static str,
        /// Where it came from: the file's path, or `PEM given in memory`.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A private key does not belong to the certificate it is paired with (feature `tls`).
    #[error("the private key in {key} does not match the certificate in {certificate}")]
    TlsKeyMismatch {
        /// Where the certificate came from.
        certificate: String,
        /// Where the key came from.
        key: String,
    },

    /// TLS settings that cannot be used as asked (feature `tls`): an invalid server name, a
    /// tonic `ClientTlsConfig` that tonic refuses, or a use that needs the certificates
    /// themselves (HTTPS checks, `TlsConnector`) of settings given as an opaque
    /// `ClientTlsConfig`.
    #[error("invalid TLS settings: {reason}")]
    TlsConfig {
        /// Why.
        reason: String,
    },

    /// A balancer's control plane could not publish a change of this service (a panic while
    /// applying it, caught and logged at error level). The change is not visible to that
    /// balancer's picks. A registry write that gets this error has still changed the
    /// registry (it never loses registered state); the balancer publishes the service's
    /// membership again with the next change that succeeds.
    #[error("the control plane could not publish the change of service `{service}`: {reason}")]
    PublishFailed {
        /// The service.
        service: DataArc<str>,
        /// Why (the panic's message).
        reason: DataArc<str>,
    },

    /// A circuit breaker of the service is open: `limit` (configured at `max`) was reached,
    /// so the call was refused at once instead of piling onto a sick or saturated service
    /// (Envoy's circuit breakers; see `[circuit_breakers]` in CONFIGURATION.md). Counted in
    /// `lb.metrics()` and `tai_lb_circuit_open_total{limit=...}`. Through a
    /// [`BalancedChannel`](crate::BalancedChannel) it is a gRPC `UNAVAILABLE` whose message
    /// names the limit and whose `source()` is this error.
    #[error("circuit breaker open for service `{service}`: {limit} ({max}) reached")]
    CircuitOpen {
        /// The service.
        service: DataArc<str>,
        /// Which limit was reached.
        limit: CircuitLimit,
        /// Its configured value.
        max: u32,
    },

    /// An etcd call failed (unreachable, timed out, or refused): registering or
    /// deregistering an instance (`EtcdRegistration`, feature `etcd`).
    #[error("etcd {operation} failed: {reason}")]
    Etcd {
        /// What was being done (`register`, `deregister`).
        operation: &'static str,
        /// The client's error, or the timeout.
        reason: String,
    },
}

/// One of a service's circuit-breaker limits (Envoy's thresholds), as named in
/// [`Error::CircuitOpen`] and in the `limit` label of `tai_lb_circuit_open_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CircuitLimit {
    /// Requests in flight across the service's endpoints (guarded picks alive).
    MaxRequests,
    /// Calls waiting in a [`BalancedChannel`](crate::BalancedChannel) for a stream (every
    /// connection it may open to the endpoint busy).
    MaxPending,
    /// Retries in flight at once (a concurrency budget, beside the channel's rate budget).
    MaxRetries,
    /// Connections to one endpoint, over every channel of the balancer.
    MaxConnectionsPerEndpoint,
}

impl CircuitLimit {
    /// Every limit, in the order of [`index`](Self::index).
    pub const ALL: [CircuitLimit; 4] = [
        CircuitLimit::MaxRequests,
        CircuitLimit::MaxPending,
        CircuitLimit::MaxRetries,
        CircuitLimit::MaxConnectionsPerEndpoint,
    ];

    /// The configuration field's name: `max_requests`, `max_pending`, `max_retries`,
    /// `max_connections_per_endpoint`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitLimit::MaxRequests => "max_requests",
            CircuitLimit::MaxPending => "max_pending",
            CircuitLimit::MaxRetries => "max_retries",
            CircuitLimit::MaxConnectionsPerEndpoint => "max_connections_per_endpoint",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for CircuitLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

impl Error {
    pub(crate) fn invalid_config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unknown_service(service: &str) -> Self {
        Error::UnknownService {
            service: DataArc::from(truncate(service)),
        }
    }
}

/// Truncates caller input that is echoed into an error, so a hostile 10 MB "service name"
/// does not become a 10 MB log line.
pub(crate) fn truncate(s: &str) -> &str {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
