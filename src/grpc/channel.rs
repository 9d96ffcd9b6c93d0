//! [`BalancedChannel`]: a `tower::Service<http::Request<_>>` that generated tonic clients
//! accept, routing every call through the balancer's data plane.
//!
//! Per call: the routing key is read from the request (a header, or a custom extractor), one
//! endpoint is picked from the current snapshot (a wait-free load, no lock), the call is sent
//! on that endpoint's tonic `Channel` (HTTP/2, created on first use; up to
//! `connections_per_endpoint` connections, another opened only when every open one carries
//! `max_streams_per_connection` calls), and its gRPC status and latency are recorded on the pick when the
//! response ends: passive health, metrics and the least-connections load all see it.
//!
//! Invariants:
//! - `poll_ready` is always ready: readiness never hangs on one endpoint (tower #824); a sick
//!   endpoint is out of the snapshot (health checks, outlier detection), and a call that still
//!   meets one fails over to another within the [`RetryPolicy`].
//! - Every pick is ended exactly once: recorded when the response ends, or released when the
//!   call or its response body is dropped (cancellation, deadline): in-flight counts return
//!   to 0.
//! - Endpoints released by the balancer (removed and drained) lose their channel here; calls
//!   still holding a clone finish on it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin as StdPin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use super::body::{BalancedBody, FailureCodes, Recorder, Replay, grpc_status};
use super::retry::{Idempotent, RetryBudget, RetryPolicy, format_grpc_timeout, parse_grpc_timeout};
use super::trace::{CallTrace, OpenAttempt, code_name, record_end};
use crate::balancer::{IntegratedLoadBalancer, Route};
use crate::breaker::{Admission, Breaker};
use crate::endpoint::Endpoint;
use crate::error::{CircuitLimit, Error};
use crate::handoff::ControlEvent;
use crate::pick::Outcome;
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{DataArc, DataWeak, Mutex, SnapshotCell};
use crate::table::ring::hash_key;

/// Errors a [`BalancedChannel`] returns: a `tonic::Status` (no endpoint, deadline) or the
/// endpoint channel's transport error, which tonic turns into a status.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most connections a [`BalancedChannel`] opens per endpoint.
pub const MAX_CONNECTIONS_PER_ENDPOINT: usize = 64;

/// The default number of concurrent calls per connection before a [`BalancedChannel`] opens
/// another one to the same endpoint (when allowed more than one).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 100;

/// The largest accepted `max_streams_per_connection` (HTTP/2's stream limit is a `u32`).
const MAX_STREAMS_PER_CONNECTION: usize = u32::MAX as usize;

/// Reads a routing key from a call's request head.
pub type KeyExtractorFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

/// Where a call's routing key comes from, and what it does.
#[derive(Clone)]
enum KeySource {
    Header(HeaderName),
    Custom(DataArc<KeyExtractorFn>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyMode {
    /// Sticky sessions through the balancer's affinity table.
    Affinity,
    /// Consistent hash (no table; the owner moves only when membership changes).
    Hash,
}

#[derive(Clone)]
struct RequestKey {
    source: KeySource,
    mode: KeyMode,
    /// Hash the call's method path with the key (see [`RequestHash::with_method`]).
    with_method: bool,
    /// A call without a key gets a random hash instead of the strategy's pick.
    random_when_absent: bool,
}

/// How a [`BalancedChannel`] hashes a call for consistent hashing: gRPC A76's
/// `request_hash_header`, with two options.
///
/// * [`with_method`](Self::with_method): the hash covers the call's method path and the
///   header, so one user's calls to different methods spread over endpoints while each
///   (method, user) pair stays put. The hash is XXH3-64 of the path, a NUL byte and the value,
///   which is [`hash_key`](crate::hash_key) of `"/pkg.Service/Method\0value"`: any process
///   can compute where a call goes.
/// * [`random_when_absent`](Self::random_when_absent): a call without the header gets a
///   random hash (A76's fallback), so it lands on a uniformly random endpoint through the hash
///   path (bounded loads included) instead of the balancer's strategy.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::RequestHash;
///
/// let policy = RequestHash::header("x-user").with_method().random_when_absent();
/// # let _ = policy;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHash {
    header: String,
    with_method: bool,
    random_when_absent: bool,
}

impl RequestHash {
    /// Hash on the value of request header / metadata key `name` (validated when the channel
    /// is built). Calls without it are routed by the strategy.
    pub fn header(name: &str) -> Self {
        Self {
            header: name.to_owned(),
            with_method: false,
            random_when_absent: false,
        }
    }

    /// Hash the call's method path together with the header's value.
    pub fn with_method(mut self) -> Self {
        self.with_method = true;
        self
    }

    /// A call without the header gets a random hash (A76's fallback) instead of the
    /// balancer's strategy.
    pub fn random_when_absent(mut self) -> Self {
        self.random_when_absent = true;
        self
    }
}

/// XXH3-64 of `path`, a NUL byte and `value`: [`hash_key`] of the three concatenated, without
/// building the string.
fn hash_method_and_key(path: &str, value: &str) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(path.as_bytes());
    hasher.update(&[0]);
    hasher.update(value.as_bytes());
    hasher.digest()
}

impl RequestKey {
    fn extract(&self, parts: &http::request::Parts) -> Option<String> {
        match &self.source {
            KeySource::Header(name) => parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
            KeySource::Custom(extract) => extract(parts).filter(|k| !k.is_empty()),
        }
    }
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            KeySource::Header(name) => name.as_str(),
            KeySource::Custom(_) => "<custom>",
        };
        f.debug_struct("RequestKey")
            .field("source", &source)
            .field("mode", &self.mode)
            .field("with_method", &self.with_method)
            .field("random_when_absent", &self.random_when_absent)
            .finish()
    }
}

/// Builds a [`BalancedChannel`]; see [`BalancedChannel::builder`].
#[derive(Debug)]
pub struct BalancedChannelBuilder {
    lb: DataArc<IntegratedLoadBalancer>,
    service: String,
    key: Option<RequestKey>,
    key_error: Option<Error>,
    subset: Vec<(HeaderName, String)>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    connections_per_endpoint: usize,
    max_streams_per_connection: usize,
    failure_codes: FailureCodes,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
}

impl BalancedChannelBuilder {
    /// Sticky sessions keyed by a request header / gRPC metadata key (for example
    /// `x-session-id`): the first call of a key goes to the key's consistent-hash owner and
    /// later calls stick to the endpoint it got, through the balancer's
    /// [`AffinityManager`](crate::AffinityManager), until that endpoint leaves or fails. Calls
    /// without the header are routed by the strategy.
    pub fn affinity_header(mut self, name: &str) -> Self {
        self.key = self.header_key(name, KeyMode::Affinity);
        self
    }

    /// Consistent hashing on a request header / metadata key: a key always goes to the same
    /// endpoint while membership is unchanged, on every instance of the client. Calls without
    /// the header are routed by the strategy.
    pub fn hash_header(mut self, name: &str) -> Self {
        self.key = self.header_key(name, KeyMode::Hash);
        self
    }

    /// Sticky sessions keyed by `extract` (`None`: route that call by the strategy).
    pub fn affinity_key(
        mut self,
        extract: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Some(RequestKey {
            source: KeySource::Custom(DataArc::new(extract)),
            mode: KeyMode::Affinity,
            with_method: false,
            random_when_absent: false,
        });
        self
    }

    /// Consistent hashing on the key `extract` returns (`None`: route by the strategy).
    pub fn hash_key(
        mut self,
        extract: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Some(RequestKey {
            source: KeySource::Custom(DataArc::new(extract)),
            mode: KeyMode::Hash,
            with_method: false,
            random_when_absent: false,
        });
        self
    }

    /// Consistent hashing by `policy`: a header, optionally with the method, optionally a
    /// random hash for calls without the header (see [`RequestHash`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use tai_loadbalancer::*;
    /// # #[allow(dead_code)]
    /// # async fn f(lb: Arc<IntegratedLoadBalancer>) -> Result<(), Error> {
    /// let channel = BalancedChannel::builder(lb, "cache")
    ///     .hash_request(RequestHash::header("x-user").with_method().random_when_absent())
    ///     .build()?;
    /// # let _ = channel; Ok(()) }
    /// ```
    pub fn hash_request(mut self, policy: RequestHash) -> Self {
        self.key = self
            .header_key(&policy.header, KeyMode::Hash)
            .map(|key| RequestKey {
                with_method: policy.with_method,
                random_when_absent: policy.random_when_absent,
                ..key
            });
        self
    }

    fn header_key(&mut self, name: &str, mode: KeyMode) -> Option<RequestKey> {
        match HeaderName::try_from(name) {
            Ok(name) => Some(RequestKey {
                source: KeySource::Header(name),
                mode,
                with_method: false,
                random_when_absent: false,
            }),
            Err(e) => {
                self.key_error = Some(Error::InvalidConfig {
                    field: "grpc.key_header".to_owned(),
                    reason: format!("{name:?} is not a valid header name: {e}"),
                });
                None
            }
        }
    }

    /// Routes calls inside a metadata subset (see
    /// [`IntegratedLoadBalancer::pick_subset`](crate::IntegratedLoadBalancer::pick_subset)):
    /// the value of request header `header` is the value of tag `tag`. Call it once per key
    /// of a `[subsets]` selector; a call carrying all of the headers picks inside that subset
    /// by the strategy (under the subset fallback policy), a call missing one is routed
    /// normally. Affinity and hash keys take precedence.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use tai_loadbalancer::*;
    /// # #[allow(dead_code)]
    /// # fn f(lb: Arc<IntegratedLoadBalancer>) -> Result<(), Error> {
    /// let channel = BalancedChannel::builder(lb, "api")
    ///     .subset_header("x-version", "version")
    ///     .build()?;
    /// # let _ = channel; Ok(()) }
    /// ```
    pub fn subset_header(mut self, header: &str, tag: &str) -> Self {
        match HeaderName::try_from(header) {
            Ok(name) => self.subset.push((name, tag.to_owned())),
            Err(e) => {
                self.key_error = Some(Error::InvalidConfig {
                    field: "grpc.subset_header".to_owned(),
                    reason: format!("{header:?} is not a valid header name: {e}"),
                });
            }
        }
        self
    }

    /// When calls are retried on another endpoint (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A deadline for calls that carry none (`grpc-timeout`); calls that carry one keep the
    /// earlier of the two. Sent to the server as `grpc-timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long connecting to one endpoint may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most HTTP/2 connections per endpoint (default 1, at most
    /// [`MAX_CONNECTIONS_PER_ENDPOINT`]). An endpoint's first connection opens on its first
    /// call; another opens only when every open one carries
    /// [`max_streams_per_connection`](Self::max_streams_per_connection) calls, and each call
    /// goes to the open connection with the fewest. Raise it when servers cap concurrent
    /// streams per connection (often at 100) and one connection is the bottleneck. Connections
    /// stay open until the endpoint leaves the balancer.
    pub fn connections_per_endpoint(mut self, connections: usize) -> Self {
        self.connections_per_endpoint = connections;
        self
    }

    /// Concurrent calls (HTTP/2 streams) per connection before another connection to the
    /// same endpoint is opened (default [`DEFAULT_MAX_STREAMS_PER_CONNECTION`], the usual
    /// server limit). Once [`connections_per_endpoint`](Self::connections_per_endpoint)
    /// connections are open, further calls share them (HTTP/2 queues streams over the
    /// server's limit).
    pub fn max_streams_per_connection(mut self, streams: usize) -> Self {
        self.max_streams_per_connection = streams;
        self
    }

    /// The gRPC status codes that count as the endpoint's failure in passive health and error
    /// metrics (default: `UNKNOWN`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE`,
    /// `DATA_LOSS`). Other codes describe the request, not the endpoint.
    pub fn failure_codes(mut self, codes: &[Code]) -> Self {
        self.failure_codes = FailureCodes::of(codes);
        self
    }

    /// TLS (and mTLS) for every connection of the channel (feature `tls`): tonic's
    /// `ClientTlsConfig` as it is, or a [`ClientTls`](crate::ClientTls) built from PEM or from
    /// files that are reloaded as they change ([`TlsFiles`](crate::TlsFiles)).
    ///
    /// The setting is the service's: [`build`](Self::build) gives it to the balancer's
    /// health checks too, so `grpc`/`grpc_watch` checks of the service run over the same TLS
    /// and `http` checks speak HTTPS with the same roots (a second channel to the same
    /// service replaces it). Each endpoint verifies its `tls_server_name` tag if it has one,
    /// else the service's server name, else its IP address; ALPN is `h2`. After a reload, new
    /// calls go to new connections made with the new certificates, and calls in progress
    /// finish on the old ones.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tai_loadbalancer::{BalancedChannel, IntegratedLoadBalancer, LoadBalancingStrategy, ServiceRegistry};
    /// use tonic::transport::{Certificate, ClientTlsConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let ca_pem = rcgen::generate_simple_self_signed(vec!["greeter.internal".into()])?.cert.pem();
    /// let registry = Arc::new(ServiceRegistry::new());
    /// let lb = Arc::new(
    ///     IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, Default::default()).await?,
    /// );
    /// let tls = ClientTlsConfig::new()
    ///     .ca_certificate(Certificate::from_pem(&ca_pem))
    ///     .domain_name("greeter.internal");
    /// let channel = BalancedChannel::builder(lb, "greeter").tls(tls).build()?;
    /// # let _ = channel;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: impl Into<crate::tls::ClientTls>) -> Self {
        self.tls = Some(tls.into());
        self
    }

    /// Validates the settings and builds the channel. Endpoint connections open on first use.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the setting (`grpc.*`, `retry.*`),
    /// [`Error::InvalidServiceName`]; with TLS, `Error::TlsConfig` for settings tonic
    /// refuses.
    pub fn build(self) -> Result<BalancedChannel, Error> {
        if let Some(error) = self.key_error {
            return Err(error);
        }
        crate::endpoint::validate_service_name(&self.service)?;
        self.retry.validate()?;
        let bad = |field: &str, reason: &str| Error::InvalidConfig {
            field: format!("grpc.{field}"),
            reason: reason.to_owned(),
        };
        if !(1..=MAX_CONNECTIONS_PER_ENDPOINT).contains(&self.connections_per_endpoint) {
            return Err(bad(
                "connections_per_endpoint",
                &format!("must be between 1 and {MAX_CONNECTIONS_PER_ENDPOINT}"),
            ));
        }
        if !(1..=MAX_STREAMS_PER_CONNECTION).contains(&self.max_streams_per_connection) {
            return Err(bad(
                "max_streams_per_connection",
                &format!("must be between 1 and {MAX_STREAMS_PER_CONNECTION}"),
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(300) {
            return Err(bad("connect_timeout", "must be between 1 ns and 5 minutes"));
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > Duration::from_secs(100_000) {
                return Err(bad("timeout", "must be between 1 ns and 100000 s"));
            }
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            // tonic checks its settings when an endpoint is made: do it now, once, so a bad
            // identity is an error here rather than on every call. Nothing connects.
            let probe = Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 1)), None);
            tls.grpc_endpoint(&probe)?;
            self.lb.health_checks().set_tls(&self.service, tls.clone());
        }
        let channels = DataArc::new(EndpointChannels {
            map: SnapshotCell::new(crate::sync::Arc::new(HashMap::new())),
            create: Mutex::new(()),
            connect_timeout: self.connect_timeout,
            per_endpoint: self.connections_per_endpoint,
            max_streams: self.max_streams_per_connection,
            #[cfg(feature = "tls")]
            tls: self.tls,
        });
        follow_releases(&self.lb, &self.service, &channels);
        Ok(BalancedChannel {
            inner: DataArc::new(Inner {
                budget: self.retry.budget(),
                lb: self.lb,
                service: self.service,
                key: self.key,
                subset: self.subset,
                retry: self.retry,
                timeout: self.timeout,
                failure_codes: self.failure_codes,
                channels,
            }),
        })
    }
}

/// A balanced gRPC channel: give it to a generated tonic client
/// (`GreeterClient::new(channel)`) and every call is routed by the balancer.
///
/// - **Routing**: the balancer's strategy (round robin, least connections, weighted, ...), or
///   a key per call ([`affinity_header`](BalancedChannelBuilder::affinity_header),
///   [`hash_header`](BalancedChannelBuilder::hash_header), or a custom extractor), over the
///   current snapshot of the service: endpoints that are unhealthy, ejected or draining are
///   not in it. Registry changes (added, removed, drained endpoints) apply to the next call,
///   without rebuilding the client.
/// - **Outcome**: the gRPC status (from the trailers, or a trailers-only answer) and the
///   latency up to the end of the response are recorded on the endpoint: passive health,
///   metrics, least-connections load.
/// - **Failover**: a call that fails before reaching a server, or any failed call of an
///   idempotent method, is retried on another endpoint per the [`RetryPolicy`] and its retry
///   budget.
/// - **Deadlines**: `grpc-timeout` (tonic's `Request::set_timeout`) or the channel's
///   [`timeout`](BalancedChannelBuilder::timeout) bounds the call, retries included, and
///   reaches the server; a call dropped by its caller releases its endpoint at once.
///
/// Cloning is cheap (one reference count); clones share connections and the retry budget.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest};
/// use tai_loadbalancer::{BalancedChannel, Endpoint, IntegratedLoadBalancer, LoadBalancingStrategy,
///     RetryPolicy, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = GreeterServer::start("s0")?; // a real gRPC server on 127.0.0.1
/// let registry = Arc::new(ServiceRegistry::new());
/// registry.register("greeter", Endpoint::new(server.address(), None)).await?;
/// let lb = Arc::new(
///     IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::LeastConnections, Default::default()).await?,
/// );
/// let channel = BalancedChannel::builder(lb.clone(), "greeter")
///     .affinity_header("x-session-id")
///     .retry(RetryPolicy::default().idempotent_method("/greeter.v1.Greeter/SayHello"))
///     .build()?;
/// let mut client = GreeterClient::new(channel);
/// let reply = client.say_hello(HelloRequest { name: "ada".into(), ..Default::default() }).await?;
/// assert_eq!(reply.into_inner().server, "s0");
/// assert_eq!(lb.in_flight("greeter", server.address()), Some(0));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct BalancedChannel {
    inner: DataArc<Inner>,
}

impl BalancedChannel {
    /// A builder for a channel to `service` of `lb`.
    pub fn builder(lb: DataArc<IntegratedLoadBalancer>, service: &str) -> BalancedChannelBuilder {
        BalancedChannelBuilder {
            lb,
            service: service.to_owned(),
            key: None,
            key_error: None,
            subset: Vec::new(),
            retry: RetryPolicy::default(),
            timeout: None,
            connect_timeout: Duration::from_secs(1),
            connections_per_endpoint: 1,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            failure_codes: FailureCodes::DEFAULT,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A channel to `service` of `lb` with the default settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidServiceName`].
    pub fn new(lb: DataArc<IntegratedLoadBalancer>, service: &str) -> Result<Self, Error> {
        Self::builder(lb, service).build()
    }

    /// The service this channel calls.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// HTTP/2 connections this channel has open (or opening) to `address`: 0 before its first
    /// call and after the balancer released it, then 1 up to
    /// [`connections_per_endpoint`](BalancedChannelBuilder::connections_per_endpoint) as load
    /// requires.
    pub fn connections(&self, address: SocketAddr) -> usize {
        self.inner.channels.opened(address)
    }

    /// The balancer this channel routes with.
    pub fn balancer(&self) -> &IntegratedLoadBalancer {
        &self.inner.lb
    }

    /// Endpoints that currently have connections open or opening through this channel.
    pub fn connected_endpoints(&self) -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = self.inner.channels.map.load().keys().copied().collect();
        addresses.sort_unstable();
        addresses
    }
}

impl fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.inner.service)
            .field("key", &self.inner.key)
            .field("retry", &self.inner.retry)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

impl Service<Request<Body>> for BalancedChannel {
    type Response = Response<BalancedBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: the endpoint is chosen per call, from endpoints that are up.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        use tracing::Instrument;
        let trace = CallTrace::new(&self.inner.service, request.uri().path());
        let span = trace.span.clone();
        ResponseFuture(Box::pin(self.inner.clone().call(request, trace).instrument(span)))
    }
}

/// The response future of a [`BalancedChannel`] call.
pub struct ResponseFuture(StdPin<Box<dyn Future<Output = Result<Response<BalancedBody>, BoxError>> + Send>>);

impl Future for ResponseFuture {
    type Output = Result<Response<BalancedBody>, BoxError>;

    fn poll(mut self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

struct Inner {
    lb: DataArc<IntegratedLoadBalancer>,
    service: String,
    key: Option<RequestKey>,
    /// Request headers naming a metadata subset, and the tag key each one gives.
    subset: Vec<(HeaderName, String)>,
    retry: RetryPolicy,
    budget: RetryBudget,
    timeout: Option<Duration>,
    failure_codes: FailureCodes,
    channels: DataArc<EndpointChannels>,
}

/// How an attempt ended, when the call may go on to another endpoint.
enum Failed {
    /// The endpoint's channel failed the call (transport error).
    Error(BoxError),
    /// A trailers-only `UNAVAILABLE` answer.
    Unavailable(Response<Body>),
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

impl Inner {
    async fn call(
        self: DataArc<Self>,
        request: Request<Body>,
        mut trace: CallTrace,
    ) -> Result<Response<BalancedBody>, BoxError> {
        let started = Instant::now();
        let result = self.attempts(request, &mut trace, started).await;
        trace.record_attempts();
        match &result {
            Err(error) => {
                let code = error.downcast_ref::<tonic::Status>().map(tonic::Status::code);
                record_end(&trace.span, code, started.elapsed());
            }
            // Trailers-only: the call is over (a streamed body records it when it ends).
            Ok(response) => {
                if let Some(code) = grpc_status(response.headers()) {
                    record_end(&trace.span, Some(code), started.elapsed());
                }
            }
        }
        result
    }

    /// Picks, sends and retries; records each attempt's span (the call's span is recorded
    /// by the caller on an error, by the response body when it streams, here otherwise).
    async fn attempts(
        &self,
        request: Request<Body>,
        trace: &mut CallTrace,
        started: Instant,
    ) -> Result<Response<BalancedBody>, BoxError> {
        let (mut parts, body) = request.into_parts();
        let header_timeout = parts
            .headers
            .get(&GRPC_TIMEOUT)
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let timeout = match (header_timeout, self.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = timeout.map(|t| started + t);
        let key = self.key.as_ref().and_then(|k| k.extract(&parts));
        let route = match (&key, &self.key) {
            (Some(key), Some(k)) if k.mode == KeyMode::Affinity => Route::Affinity(key),
            (Some(key), Some(k)) if k.with_method => Route::Hash(hash_method_and_key(parts.uri.path(), key)),
            (Some(key), Some(_)) => Route::Hash(hash_key(key)),
            (None, Some(k)) if k.random_when_absent => Route::Hash(crate::sync::random_u64()),
            _ => Route::Strategy,
        };
        // A call carrying every subset header is routed inside that subset by the strategy
        // (keys and hashes route first; a call missing one of the headers is not restricted).
        let subset_values: Option<Vec<(&str, String)>> = match route {
            Route::Strategy if !self.subset.is_empty() => self
                .subset
                .iter()
                .map(|(header, tag)| {
                    let value = parts.headers.get(header)?.to_str().ok()?;
                    Some((tag.as_str(), value.to_owned()))
                })
                .collect(),
            _ => None,
        };
        let subset_pairs: Option<Vec<(&str, &str)>> = subset_values
            .as_ref()
            .map(|values| values.iter().map(|(t, v)| (*t, v.as_str())).collect());
        let route = match &subset_pairs {
            Some(pairs) => Route::Subset(pairs),
            None => route,
        };
        let idempotent =
            parts.extensions.get::<Idempotent>().is_some() || self.retry.is_idempotent(parts.uri.path());
        self.budget.deposit();
        let mut replay = Replay::read(body, self.retry.max_replay_bytes).await?;

        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<Failed> = None;
        // The service's circuit breakers, known from the first pick.
        let mut breaker: Option<DataArc<Breaker>> = None;
        let mut retry_reason: Option<String> = None;
        for attempt in 1..=self.retry.max_attempts {
            // A retry holds one of the service's `max_retries` places until it ends.
            let retry = match (&breaker, attempt > 1) {
                (Some(breaker), true) => match Admission::take(breaker, CircuitLimit::MaxRetries) {
                    Ok(admission) => admission,
                    Err(error) => return Err(circuit_open(error, last.is_some())),
                },
                _ => None,
            };
            let pick = match self.lb.pick_route(&self.service, route, &tried) {
                Ok(pick) => pick,
                Err(error @ Error::CircuitOpen { .. }) => return Err(circuit_open(error, last.is_some())),
                Err(error) => return last.map_or_else(|| Err(no_endpoint(&error)), finish_failed),
            };
            if breaker.is_none() {
                breaker = pick.breaker().cloned();
            }
            let span = trace.attempt(pick.address(), attempt, retry_reason.as_deref());
            #[cfg(feature = "opentelemetry")]
            super::otel::inject(&span, &mut parts.headers);
            let Some(body) = replay.next_body() else {
                break; // a partial body cannot be sent twice (not reached: retries check)
            };
            if let Some(deadline) = deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    drop(pick);
                    return Err(deadline_exceeded(timeout));
                }
                if let Ok(value) = HeaderValue::from_str(&format_grpc_timeout(remaining)) {
                    parts.headers.insert(GRPC_TIMEOUT.clone(), value);
                }
            }
            let acquired = match self.channels.connections(pick.endpoint(), breaker.as_ref()) {
                Ok(connections) => match breaker.as_ref().filter(|b| b.limits(CircuitLimit::MaxPending)) {
                    // Every stream busy: wait for one (a pending call), within the deadline.
                    Some(breaker) => {
                        let waited = connections.acquire_waiting(breaker);
                        match deadline {
                            None => waited.await,
                            Some(deadline) => match tokio::time::timeout_at(deadline, waited).await {
                                Ok(waited) => waited,
                                Err(_) => return Err(deadline_exceeded(timeout)),
                            },
                        }
                    }
                    None => Ok(connections.acquire()),
                },
                Err(error) => Err(error),
            };
            let (channel, stream) = match acquired {
                Ok(acquired) => acquired,
                Err(
                    error @ Error::CircuitOpen {
                        limit: CircuitLimit::MaxPending,
                        ..
                    },
                ) => return Err(circuit_open(error, last.is_some())),
                Err(error) => {
                    // The endpoint's connection cannot be set up (its TLS server name, or
                    // its connections are all held by other channels at the circuit
                    // breaker's limit): nothing was sent, so another endpoint may take the
                    // call.
                    let address = pick.address();
                    if !matches!(error, Error::CircuitOpen { .. }) {
                        pick.record(Outcome::Failure, None);
                    }
                    let error =
                        status_with_source(tonic::Status::unavailable(format!("{address}: {error}")), error);
                    span.record("error", tracing::field::display(&error));
                    record_end(&span, Some(Code::Unavailable), Duration::ZERO);
                    let may_retry = attempt < self.retry.max_attempts
                        && replay.is_replayable()
                        && deadline.is_none_or(|d| Instant::now() < d)
                        && self.budget.withdraw();
                    if may_retry {
                        tracing::debug!(service = %self.service, endpoint = %address, attempt, %error, "cannot connect, retrying on another endpoint");
                        retry_reason = Some("cannot connect".to_owned());
                        tried.push(address);
                        last = Some(Failed::Error(error));
                        continue;
                    }
                    return Err(error);
                }
            };
            let request = Request::from_parts(parts.clone(), body);
            let attempt_started = Instant::now();
            let sent = send(channel, request);
            let result = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
                    Ok(result) => result,
                    Err(_) => {
                        let latency = attempt_started.elapsed();
                        pick.record(self.failure_codes.outcome(Code::DeadlineExceeded), Some(latency));
                        record_end(&span, Some(Code::DeadlineExceeded), latency);
                        return Err(deadline_exceeded(timeout));
                    }
                },
                None => sent.await,
            };
            let may_retry = |before_server: bool| {
                attempt < self.retry.max_attempts
                    && (before_server || idempotent)
                    && replay.is_replayable()
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && self.budget.withdraw()
            };
            match result {
                Ok(response) => {
                    let latency = attempt_started.elapsed();
                    match grpc_status(response.headers()) {
                        // Trailers-only: the call is over.
                        Some(Code::Cancelled | Code::DeadlineExceeded)
                            if deadline.is_some_and(|d| Instant::now() >= d) =>
                        {
                            // The server's timer (set from our grpc-timeout) won the race
                            // with ours; tonic servers answer CANCELLED. It is our deadline.
                            pick.record(self.failure_codes.outcome(Code::DeadlineExceeded), Some(latency));
                            record_end(&span, Some(Code::DeadlineExceeded), latency);
                            return Err(deadline_exceeded(timeout));
                        }
                        Some(code) => {
                            let address = pick.address();
                            pick.record(self.failure_codes.outcome(code), Some(latency));
                            record_end(&span, Some(code), latency);
                            if code == Code::Unavailable && may_retry(true) {
                                tracing::debug!(service = %self.service, endpoint = %address, attempt, "UNAVAILABLE, retrying on another endpoint");
                                retry_reason = Some(code_name(code).to_owned());
                                tried.push(address);
                                last = Some(Failed::Unavailable(response));
                                continue;
                            }
                            return Ok(response.map(|b| BalancedBody::new(b, None)));
                        }
                        None => {
                            let recorder = Recorder {
                                pick,
                                started: attempt_started,
                                failure_codes: self.failure_codes,
                                stream,
                                retry,
                                trace: OpenAttempt {
                                    attempt: span,
                                    call: trace.span.clone(),
                                    call_started: started,
                                },
                            };
                            return Ok(response.map(|b| BalancedBody::new(b, Some(recorder))));
                        }
                    }
                }
                Err(error) if timed_out(&*error) => {
                    // The endpoint channel's own grpc-timeout timer fired first (it races
                    // ours): the caller sees the same DEADLINE_EXCEEDED either way.
                    let latency = attempt_started.elapsed();
                    pick.record(self.failure_codes.outcome(Code::DeadlineExceeded), Some(latency));
                    record_end(&span, Some(Code::DeadlineExceeded), latency);
                    return Err(deadline_exceeded(timeout));
                }
                Err(error) => {
                    let address = pick.address();
                    let before_server = never_reached_server(&*error);
                    pick.record(Outcome::Failure, None);
                    #[cfg(feature = "tls")]
                    let error = tls_error_in_words(error, address, self.channels.tls.as_ref());
                    span.record("error", tracing::field::display(&error));
                    record_end(&span, None, attempt_started.elapsed());
                    if may_retry(before_server) {
                        tracing::debug!(service = %self.service, endpoint = %address, attempt, before_server, %error, "call failed, retrying on another endpoint");
                        retry_reason = Some(if before_server {
                            "transport error before the request reached the server".to_owned()
                        } else {
                            "transport error (idempotent method)".to_owned()
                        });
                        tried.push(address);
                        last = Some(Failed::Error(error));
                        continue;
                    }
                    return Err(error);
                }
            }
        }
        last.map_or_else(|| Err(no_endpoint(&Error::Stopped)), finish_failed)
    }
}

fn finish_failed(failed: Failed) -> Result<Response<BalancedBody>, BoxError> {
    match failed {
        Failed::Error(error) => Err(error),
        Failed::Unavailable(response) => Ok(response.map(|b| BalancedBody::new(b, None))),
    }
}

fn no_endpoint(error: &Error) -> BoxError {
    Box::new(tonic::Status::unavailable(error.to_string()))
}

/// `status` with `error` as its source (callers can downcast `source()` to [`Error`]).
fn status_with_source(mut status: tonic::Status, error: Error) -> BoxError {
    status.set_source(crate::sync::DataArc::new(error));
    Box::new(status)
}

/// A call refused by a circuit breaker: `UNAVAILABLE`, naming the limit, with the typed
/// [`Error::CircuitOpen`] as its source. `retrying`: the call had failed once already and
/// this was its retry.
fn circuit_open(error: Error, retrying: bool) -> BoxError {
    let message = if retrying {
        format!("{error}: the failed attempt was not retried (tai-loadbalancer)")
    } else {
        format!("{error} (tai-loadbalancer)")
    };
    status_with_source(tonic::Status::unavailable(message), error)
}

fn deadline_exceeded(timeout: Option<Duration>) -> BoxError {
    let timeout = timeout.unwrap_or_default();
    Box::new(tonic::Status::deadline_exceeded(format!(
        "deadline of {timeout:?} exceeded (tai-loadbalancer)"
    )))
}

async fn send(mut channel: Channel, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    channel.ready().await?;
    Ok(channel.call(request).await?)
}

/// A transport error whose cause is TLS becomes an `UNAVAILABLE` status that says what went
/// wrong ("certificate expired", "the server requires a client certificate", ...), with the
/// transport error as its source; other errors are returned as they are. tonic alone says
/// "transport error".
#[cfg(feature = "tls")]
fn tls_error_in_words(error: BoxError, address: SocketAddr, tls: Option<&crate::tls::ClientTls>) -> BoxError {
    let Some(reason) = tls.and_then(|tls| tls.explain(&*error)) else {
        return error;
    };
    let mut status = tonic::Status::unavailable(format!("TLS with {address}: {reason}"));
    status.set_source(crate::sync::DataArc::from(error));
    Box::new(status)
}

/// Whether a transport error proves the request never reached a server: the connection
/// could not be made (tonic's `ConnectError`), or hyper gave up before sending it.
/// Whether `error` is tonic's deadline timer (`TimeoutExpired`) anywhere in its chain.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cause = e.source();
    }
    false
}

fn never_reached_server(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_canceled() {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// The endpoints' tonic channels, created on first use.
struct EndpointChannels {
    map: SnapshotCell<HashMap<SocketAddr, crate::sync::Arc<Connections>>>,
    create: Mutex<()>,
    connect_timeout: Duration,
    per_endpoint: usize,
    max_streams: usize,
    /// The service's TLS settings; connections are remade when their generation changes.
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
}

/// How an endpoint's connections are made.
struct Template {
    endpoint: tonic::transport::Endpoint,
    generation: u64,
    server_name: Option<Box<str>>,
}

/// One endpoint's connections: up to `slots.len()`, opened in order as load requires.
///
/// Invariants: `opened` (at least 1) only grows, up to `slots.len()`; a slot below `opened`
/// has its channel created by the first call that uses it; `streams` counts the calls a
/// slot carries (each [`StreamGuard`] adds one and takes it back once).
struct Connections {
    slots: Box<[ConnectionSlot]>,
    opened: AtomicUsize,
    max_streams: usize,
    /// The endpoint, and the service's circuit breakers when its connections are counted
    /// there (every opened one is given back on drop).
    address: SocketAddr,
    breaker: Option<DataArc<Breaker>>,
    /// Calls waiting for a stream ([`acquire_waiting`](Self::acquire_waiting)), woken one
    /// per stream freed.
    waiters: AtomicUsize,
    freed: tokio::sync::Notify,
    /// How each connection is made (address, timeouts, TLS).
    template: tonic::transport::Endpoint,
    /// The TLS generation the template was made with (0 without TLS).
    generation: u64,
    /// The TLS server name the template verifies (`None`: none set, or no TLS).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    server_name: Option<Box<str>>,
}

struct ConnectionSlot {
    channel: std::sync::OnceLock<Channel>,
    streams: crossbeam_utils::CachePadded<AtomicUsize>,
}

/// One call on one connection of an endpoint: counted in the connection's streams until
/// dropped (when the response ends, or the call is given up).
pub(crate) struct StreamGuard {
    connections: crate::sync::Arc<Connections>,
    slot: usize,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // SeqCst, with the waiters' count below and in `acquire_waiting`: either a waiter
        // sees this stream free when it rescans, or this drop sees the waiter and wakes it.
        self.connections.slots[self.slot]
            .streams
            .fetch_sub(1, Ordering::SeqCst);
        if self.connections.waiters.load(Ordering::SeqCst) > 0 {
            self.connections.freed.notify_one();
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        if let Some(breaker) = &self.breaker {
            for _ in 0..self.opened() {
                breaker.close_connection(self.address);
            }
        }
    }
}

impl Connections {
    /// An endpoint's connections, the first one counted in `breaker` (the caller checked
    /// it was allowed).
    fn new(
        max_connections: usize,
        max_streams: usize,
        template: Template,
        address: SocketAddr,
        breaker: Option<DataArc<Breaker>>,
    ) -> Self {
        Self {
            address,
            breaker,
            template: template.endpoint,
            generation: template.generation,
            server_name: template.server_name,
            slots: (0..max_connections.max(1))
                .map(|_| ConnectionSlot {
                    channel: std::sync::OnceLock::new(),
                    streams: crossbeam_utils::CachePadded::new(AtomicUsize::new(0)),
                })
                .collect(),
            opened: AtomicUsize::new(1),
            max_streams,
            waiters: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// The open connection with the fewest calls, opening one more first if every open one
    /// carries `max_streams` and the limits allow; if none can be opened, the least loaded
    /// one anyway (HTTP/2 queues the stream past the server's limit).
    fn acquire(self: &crate::sync::Arc<Self>) -> (Channel, StreamGuard) {
        match self.claim(true) {
            Some(acquired) => acquired,
            None => unreachable!("claim(share = true) always places the call"),
        }
    }

    /// As [`acquire`](Self::acquire), but when every connection that may be open carries
    /// `max_streams` calls, the call waits here (first come, first served) for one to end,
    /// holding one of the service's circuit-breaker `max_pending` places while it does: at
    /// the limit it fails at once with [`Error::CircuitOpen`].
    async fn acquire_waiting(
        self: &crate::sync::Arc<Self>,
        breaker: &DataArc<Breaker>,
    ) -> Result<(Channel, StreamGuard), Error> {
        if let Some(acquired) = self.claim(false) {
            return Ok(acquired);
        }
        let _pending = Admission::take(breaker, CircuitLimit::MaxPending)?;
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(acquired) = self.claim(false) {
                return Ok(acquired);
            }
            freed.await;
        }
    }

    /// Places a call on the open connection with the fewest calls, opening one more first if
    /// every open one carries `max_streams` and the limits allow. When none can be opened:
    /// the least loaded one anyway if `share`, else `None`. The call claims its stream with a
    /// compare-and-swap of the count it chose by, so racing calls cannot push a connection
    /// past `max_streams` while another may open (they rescan instead).
    fn claim(self: &crate::sync::Arc<Self>, share: bool) -> Option<(Channel, StreamGuard)> {
        loop {
            let opened = self.opened.load(Ordering::Acquire).clamp(1, self.slots.len());
            let (mut slot, mut least) = (0, usize::MAX);
            for (i, candidate) in self.slots[..opened].iter().enumerate() {
                let streams = candidate.streams.load(Ordering::Relaxed);
                if streams < least {
                    (slot, least) = (i, streams);
                    if streams == 0 {
                        break;
                    }
                }
            }
            if least >= self.max_streams && opened < self.slots.len() {
                // Every open connection is full: open the next one (if another call did
                // meanwhile, the rescan sees it) and place the call again. At the circuit
                // breaker's `max_connections_per_endpoint`, share the least loaded instead.
                let allowed = self
                    .breaker
                    .as_ref()
                    .is_none_or(|b| b.open_connection(self.address).is_ok());
                if allowed {
                    let won = self
                        .opened
                        .compare_exchange(opened, opened + 1, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                    if !won {
                        if let Some(breaker) = &self.breaker {
                            breaker.close_connection(self.address);
                        }
                    }
                    continue;
                }
            }
            if least >= self.max_streams && !share {
                return None;
            }
            // SeqCst: see `StreamGuard::drop`.
            if self.slots[slot]
                .streams
                .compare_exchange(least, least + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue; // another call took or released a stream here meanwhile: rescan
            }
            let channel = self.slots[slot]
                .channel
                .get_or_init(|| self.template.connect_lazy())
                .clone();
            let guard = StreamGuard {
                connections: self.clone(),
                slot,
            };
            return Some((channel, guard));
        }
    }

    /// Connections opened so far.
    fn opened(&self) -> usize {
        self.opened.load(Ordering::Acquire).clamp(1, self.slots.len())
    }
}

impl EndpointChannels {
    /// The connections to `endpoint`, for one call to take a stream on. They are made on its
    /// first call, and made again (new connections, new handshakes) when the TLS material
    /// has been reloaded since; calls on the old ones finish there.
    ///
    /// With the service's circuit breakers (`breaker`), the connections are counted there: a
    /// first connection beyond `max_connections_per_endpoint` (the others held by other
    /// channels) is [`Error::CircuitOpen`].
    fn connections(
        &self,
        endpoint: &Endpoint,
        breaker: Option<&DataArc<Breaker>>,
    ) -> Result<crate::sync::Arc<Connections>, Error> {
        let address = endpoint.address;
        if let Some(connections) = self.map.load().get(&address) {
            if self.current(connections, endpoint) {
                return Ok(connections.clone());
            }
        }
        let _creating = self.create.lock();
        let map = self.map.load_full();
        if let Some(connections) = map.get(&address) {
            if self.current(connections, endpoint) {
                return Ok(connections.clone());
            }
        }
        let template = self.template(endpoint)?;
        if let Some(breaker) = breaker {
            breaker.open_connection(address)?;
        }
        let connections = crate::sync::Arc::new(Connections::new(
            self.per_endpoint,
            self.max_streams,
            template,
            address,
            breaker.cloned(),
        ));
        let mut map = HashMap::clone(&map);
        map.insert(address, connections.clone());
        self.map.store(crate::sync::Arc::new(map));
        Ok(connections)
    }

    /// Whether `connections` were made with the TLS material in use and the server name
    /// `endpoint` asks for now (its `tls_server_name` tag may have changed).
    fn current(&self, connections: &Connections, endpoint: &Endpoint) -> bool {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return connections.generation == tls.generation()
                && connections.server_name.as_deref() == tls.name_for(endpoint);
        }
        let _ = endpoint;
        connections.generation == 0
    }

    /// Connections open (or opening) to `address`; 0 if none.
    fn opened(&self, address: SocketAddr) -> usize {
        self.map.load().get(&address).map_or(0, |c| c.opened())
    }

    /// How connections to `endpoint` are made, with the TLS generation and server name.
    fn template(&self, endpoint: &Endpoint) -> Result<Template, Error> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let (template, generation) = tls.grpc_endpoint(endpoint)?;
            return Ok(Template {
                endpoint: template.connect_timeout(self.connect_timeout).tcp_nodelay(true),
                generation,
                server_name: tls.name_for(endpoint).map(Box::from),
            });
        }
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(endpoint.address.to_string())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        let template = tonic::transport::Endpoint::from(uri)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        Ok(Template {
            endpoint: template,
            generation: 0,
            server_name: None,
        })
    }

    fn remove(&self, address: SocketAddr) {
        let _creating = self.create.lock();
        let map = self.map.load_full();
        if map.contains_key(&address) {
            let mut map = HashMap::clone(&map);
            map.remove(&address);
            self.map.store(crate::sync::Arc::new(map));
        }
    }
}

/// Drops an endpoint's channel once the balancer has released it from `service`.
fn follow_releases(lb: &IntegratedLoadBalancer, service: &str, channels: &DataArc<EndpointChannels>) {
    let weak: DataWeak<EndpointChannels> = DataArc::downgrade(channels);
    let service = service.to_owned();
    lb.subscribe_control(Box::new(move |event: &ControlEvent| {
        let Some(channels) = weak.upgrade() else {
            return false;
        };
        if let ControlEvent::Released {
            service: released_from,
            released,
        } = event
        {
            if *released_from == service {
                channels.remove(released.address);
            }
        }
        true
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_hash_is_the_key_hash_of_path_nul_value() {
        for (path, value) in [
            ("/helloworld.Greeter/SayHello", "user-1"),
            ("/a/b", ""),
            ("", "x"),
            (
                "/pkg.Service/Method",
                "a much longer header value that spans several stripes of XXH3",
            ),
        ] {
            assert_eq!(
                hash_method_and_key(path, value),
                hash_key(format!("{path}\0{value}")),
                "{path} {value}"
            );
        }
        let long = "v".repeat(1_000); // past XXH3's one-shot thresholds (240 bytes, stripes)
        assert_eq!(
            hash_method_and_key("/p/m", &long),
            hash_key(format!("/p/m\0{long}"))
        );
        assert_ne!(hash_method_and_key("/a/b", "c"), hash_method_and_key("/a/bc", ""));
    }
}
