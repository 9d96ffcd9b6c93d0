//! etcd: service discovery ([`EtcdDiscovery`]) and self-registration ([`EtcdRegistration`])
//! over the etcd v3 API (`etcd-client`), behind the `etcd` feature.
//!
//! This module owns the key layout and the record format in etcd, the read-then-watch
//! protocol that turns a key prefix into [`MembershipUpdate`]s, and the lease that keeps a
//! registered instance's record alive.
//!
//! # Key layout and record format
//!
//! One root prefix (default [`DEFAULT_ROOT`], `/services/`) holds every service; each
//! instance is one key, `<root><service>/<instance-id>`, whose value is a JSON record:
//!
//! ```json
//! {"address": "127.0.0.1:5001", "zone": "a", "region": "eu-1", "weight": 3, "tags": {"v": "2"}}
//! ```
//!
//! `address` (an IP socket address, no host names) is required; the rest is optional
//! (weight 1 by default). Unknown fields are ignored, so records can carry more than this
//! crate reads. A record that is not JSON, has a field of the wrong type, an unparsable
//! address, or fails [`Endpoint::validate`] is skipped and counted
//! ([`SourceStats::malformed`](crate::SourceStats::malformed)); the rest of the update
//! applies. A key whose new value is malformed no longer advertises its old address, so that
//! address leaves the service (nothing invented). When several keys advertise the same
//! address, the record under the greatest key wins, in every process alike.
//!
//! # Invariants
//!
//! * **Nothing missed**: each service's prefix is read once (one revision `r`: a big prefix
//!   is read in pages, every page at `r`), published as a [`MembershipUpdate::Snapshot`],
//!   then watched from `r + 1`; every watch response becomes at most one
//!   [`MembershipUpdate::Changes`] per service. After a disconnect the watch resumes after
//!   the last revision seen (the last event's, or a later one from a progress notification
//!   of a quiet watch); if etcd compacted that revision away, or the cluster is a different
//!   one (its id changed, or its revision went backwards), the source reads everything again
//!   and publishes a fresh snapshot.
//! * **Nothing lost**: while etcd is unreachable the source publishes nothing, so every
//!   service keeps its last membership; it reports [`SourceHealth::Degraded`] (logged and
//!   counted by the sink) and retries with capped exponential backoff and jitter, then
//!   reports [`SourceHealth::Healthy`] once it is watching again.
//! * **Same store, same membership**: the membership of a service is a pure function of the
//!   keys under its prefix, so balancers in different processes fed by the same etcd converge
//!   to the same endpoints (and so to the same consistent-hash owners).
//! * A registered instance's key is attached to a lease kept alive by a task; a process that
//!   dies stops the keepalives and its key is deleted when the lease expires. A lost lease
//!   (expired or revoked while the process lives) is replaced and the record put again.
#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use super::{Backoff, Discovery, DiscoverySink, MembershipUpdate, SourceHealth};
use crate::endpoint::validate_service_name;
use crate::endpoint::{Endpoint, EndpointMetadata};
use crate::error::{Error, truncate};
use crate::sync::DataArc;
use crate::sync::atomic::{AtomicU64, Ordering};

/// The default root prefix: services live under `/services/<service>/<instance-id>`.
pub const DEFAULT_ROOT: &str = "/services/";

/// The default lease TTL of an [`EtcdRegistration`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Largest gRPC message accepted from etcd (a range read of a big service).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Longest accepted root prefix or instance id.
const MAX_KEY_PART_LEN: usize = 1024;

/// The default number of keys per range-read page.
pub const DEFAULT_RANGE_PAGE_SIZE: usize = 1000;

/// Largest accepted range-read page.
const MAX_RANGE_PAGE_SIZE: usize = 100_000;

/// Where etcd is and how to talk to it: shared by [`EtcdDiscovery`] and
/// [`EtcdRegistration`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::EtcdConfig;
///
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"])
///     .with_root("/services/")
///     .with_backoff(Duration::from_millis(100), Duration::from_secs(5));
/// config.validate()?;
/// assert_eq!(config.service_prefix("api"), "/services/api/");
/// # Ok::<_, tai_loadbalancer::Error>(())
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    endpoints: Vec<String>,
    root: String,
    options: Option<ConnectOptions>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTls>,
    request_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    range_page_size: usize,
}

impl EtcdConfig {
    /// etcd client URLs (`http://127.0.0.1:2379`), root [`DEFAULT_ROOT`], 5 s request
    /// timeout, backoff from 100 ms to 5 s, HTTP/2 keepalives every 2 s (a dead connection is
    /// noticed within about 4 s even if no packet says so), range reads in pages of
    /// [`DEFAULT_RANGE_PAGE_SIZE`] keys.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            root: DEFAULT_ROOT.to_owned(),
            options: None,
            #[cfg(feature = "tls")]
            tls: None,
            request_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            range_page_size: DEFAULT_RANGE_PAGE_SIZE,
        }
    }

    /// Sets the root prefix (must end with `/`).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    /// Uses these `etcd-client` options (credentials, keepalives, ...) instead of the
    /// defaults.
    pub fn with_connect_options(mut self, options: ConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// TLS with `tls` (feature `tls`), for an etcd that serves `https` and, with mTLS
    /// settings, requires client certificates (`--client-cert-auth`). Endpoints are then
    /// `https://host:port` (or `host:port`). The server name verified is the settings'
    /// [server name](crate::ClientTls::with_server_name), else each URL's host. Each
    /// connection (every reconnect of [`EtcdDiscovery`], every [`EtcdRegistration`]) takes
    /// the current material, so reloaded certificates apply from the next one. A handshake
    /// failure is a reconnect failure: discovery reports [`SourceHealth::Degraded`] with the
    /// reason ("the server rejected the client certificate", "unknown CA", ...) and routing
    /// keeps the last membership.
    ///
    /// # Examples
    ///
    /// ```
    /// use tai_loadbalancer::{EtcdConfig, TlsFiles};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let dir = std::env::temp_dir().join(format!("tai-lb-doc-etcd-tls-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// # let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    /// # std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    /// let tls = TlsFiles::new().ca_file(dir.join("ca.pem")).watch()?;
    /// let config = EtcdConfig::new(["https://127.0.0.1:2379"]).with_tls(tls);
    /// config.validate()?;
    /// # Ok::<_, tai_loadbalancer::Error>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: impl Into<crate::tls::ClientTls>) -> Self {
        self.tls = Some(tls.into());
        self
    }

    /// Bounds every request (connect, read, watch creation, lease calls).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the reconnect backoff: the first retry waits about `initial`, each failure
    /// doubles it up to `max`; every wait is jittered down by up to half.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Reads a service's keys `keys` at a time (every page at the revision of the first, so
    /// the pages add up to one consistent read). Smaller pages keep each etcd response, and
    /// the time etcd spends on it, small for services with many instances.
    pub fn with_range_page_size(mut self, keys: usize) -> Self {
        self.range_page_size = keys;
        self
    }

    /// The number of keys per range-read page.
    pub fn range_page_size(&self) -> usize {
        self.range_page_size
    }

    /// The root prefix.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The etcd client URLs.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix of `service`: `<root><service>/`.
    pub fn service_prefix(&self, service: &str) -> String {
        format!("{}{service}/", self.root)
    }

    /// The key of one instance: `<root><service>/<instance_id>`.
    pub fn instance_key(&self, service: &str, instance_id: &str) -> String {
        format!("{}{service}/{instance_id}", self.root)
    }

    /// Checks the configuration.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field: no endpoints, an endpoint that is not
    /// `http://host:port` (or `host:port`; TLS is not built in), a root that is empty, does
    /// not end with `/` or has control characters, a timeout that is zero or above an hour, a
    /// backoff whose initial delay is zero or above its maximum (or a maximum above a day), or
    /// a range page size outside 1..=100,000.
    pub fn validate(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid_config(
                "etcd.endpoints",
                "at least one etcd URL is needed",
            ));
        }
        #[cfg(feature = "tls")]
        let tls = self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        let tls = false;
        for endpoint in &self.endpoints {
            validate_url(endpoint, tls)?;
        }
        if self.root.is_empty() || !self.root.ends_with('/') {
            return Err(Error::invalid_config(
                "etcd.root",
                format!("{:?} must be non-empty and end with `/`", truncate(&self.root)),
            ));
        }
        if self.root.len() > MAX_KEY_PART_LEN || self.root.chars().any(char::is_control) {
            return Err(Error::invalid_config(
                "etcd.root",
                "must be at most 1024 bytes without control characters",
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(3600) {
            return Err(Error::invalid_config(
                "etcd.request_timeout",
                "must be positive and at most an hour",
            ));
        }
        if self.backoff_max > Duration::from_secs(24 * 3600) {
            return Err(Error::invalid_config(
                "etcd.backoff",
                "the maximum delay must be at most a day",
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(Error::invalid_config(
                "etcd.backoff",
                "the initial delay must be positive and at most the maximum",
            ));
        }
        if !(1..=MAX_RANGE_PAGE_SIZE).contains(&self.range_page_size) {
            return Err(Error::invalid_config(
                "etcd.range_page_size",
                format!(
                    "{} keys: must be 1 to {MAX_RANGE_PAGE_SIZE}",
                    self.range_page_size
                ),
            ));
        }
        Ok(())
    }

    fn connect_options(&self) -> ConnectOptions {
        let options = self.options.clone().unwrap_or_else(|| {
            ConnectOptions::new()
                .with_connect_timeout(self.request_timeout)
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
                .with_keep_alive_while_idle(true)
        });
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            // The material in use now: a reload applies from the next connection.
            return options.with_tls(tls.tonic_config());
        }
        options
    }

    /// Completes the reason of a failure over TLS that does not say why etcd closed the
    /// connection (its refusal of a client certificate often arrives after the client has
    /// written, and is lost): asks etcd with a fresh handshake that writes nothing (see
    /// `ClientTls::diagnose`). Without TLS, or when that teaches nothing, the reason as it is.
    async fn explain(&self, reason: String) -> String {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            if !reason.contains("TLS") {
                let timeout = self.request_timeout.min(Duration::from_secs(2));
                for url in &self.endpoints {
                    let authority = url.strip_prefix("https://").unwrap_or(url).trim_end_matches('/');
                    let Ok(address) = authority.parse::<SocketAddr>() else {
                        continue; // a host name: no address to ask without resolving it
                    };
                    if let Some(why) = tls.diagnose(&Endpoint::new(address, None), timeout).await {
                        return format!("{reason} (TLS: {why})");
                    }
                }
            }
        }
        reason
    }

    /// Connects, bounded by the request timeout.
    async fn connect(&self) -> Result<Client, String> {
        let connect = Client::connect(&self.endpoints, Some(self.connect_options()));
        bounded(self.request_timeout, "connect", connect).await
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connect options may hold credentials: not printed.
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("root", &self.root)
            .field("custom_connect_options", &self.options.is_some())
            .field("tls", &self.tls_debug())
            .field("request_timeout", &self.request_timeout)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("range_page_size", &self.range_page_size)
            .finish()
    }
}

impl EtcdConfig {
    #[cfg(feature = "tls")]
    fn tls_debug(&self) -> Option<&crate::tls::ClientTls> {
        self.tls.as_ref()
    }

    #[cfg(not(feature = "tls"))]
    fn tls_debug(&self) -> Option<()> {
        None
    }
}

fn validate_url(url: &str, tls: bool) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::invalid_config(
            "etcd.endpoints",
            format!("{:?}: {reason}", truncate(url)),
        ))
    };
    let authority = match (url.strip_prefix("https://"), url.strip_prefix("http://"), tls) {
        (Some(authority), _, true) => authority,
        (Some(_), _, false) if cfg!(feature = "tls") => {
            return bad("https needs TLS settings: give them with `EtcdConfig::with_tls`");
        }
        (Some(_), _, false) => {
            return bad(
                "https needs TLS, which this build does not include (feature `tls`); use http on a trusted network",
            );
        }
        (None, Some(_), true) => return bad("TLS settings are given: use https://host:port"),
        (None, Some(authority), false) => authority,
        (None, None, _) => url,
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || authority.chars().any(char::is_whitespace)
    {
        return bad("expected http://host:port");
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return bad("missing port (expected http://host:port)");
    };
    if host.is_empty() || !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return bad("expected http://host:port with a port between 1 and 65535");
    }
    Ok(())
}

/// Runs `fut` (an etcd call) within `timeout`, turning both failures into a reason string.
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    within(timeout, what, fut)
        .await?
        .map_err(|error| format!("etcd {what}: {}", describe(&error)))
}

/// An etcd error in words; a TLS failure says what failed (`etcd_client::Error` does not
/// expose its causes, so its transport error and status are opened here).
fn describe(error: &etcd_client::Error) -> String {
    #[cfg(feature = "tls")]
    {
        let cause = match error {
            etcd_client::Error::TransportError(e) => crate::tls::tls_cause(e),
            etcd_client::Error::GRpcStatus(status) => crate::tls::tls_cause(status),
            _ => None,
        };
        if let Some(reason) = cause {
            return format!("TLS: {reason}");
        }
    }
    error.to_string()
}

/// `fut` bounded by `timeout`, its etcd error left for the caller to look at.
async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<Result<T, etcd_client::Error>, String> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("etcd {what}: no answer within {timeout:?}"))
}

// ===== records =====

/// The JSON record read from etcd. Unknown fields are ignored; wrong types are errors.
#[derive(Deserialize)]
struct WireRecord {
    address: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    priority: Option<u32>,
}

/// The JSON record written by [`EtcdRegistration`].
#[derive(Serialize)]
struct WireRecordOut<'a> {
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    weight: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "is_zero")]
    priority: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The JSON record for `endpoint`, as [`EtcdRegistration`] writes it and [`EtcdDiscovery`]
/// reads it.
///
/// ```
/// use tai_loadbalancer::{Endpoint, EndpointMetadata, etcd_record};
///
/// let endpoint = Endpoint::new("127.0.0.1:5001".parse()?, Some(EndpointMetadata::new().with_zone("a").with_weight(3)));
/// assert_eq!(etcd_record(&endpoint), r#"{"address":"127.0.0.1:5001","zone":"a","weight":3}"#);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
pub fn etcd_record(endpoint: &Endpoint) -> String {
    let meta = endpoint.metadata();
    let record = WireRecordOut {
        address: endpoint.address.to_string(),
        region: meta.region.as_deref(),
        zone: meta.zone.as_deref(),
        weight: meta.weight,
        tags: &meta.tags,
        priority: meta.priority,
    };
    // Serializing strings, integers and a string map cannot fail.
    serde_json::to_string(&record).unwrap_or_default()
}

/// Parses one record: the endpoint, or why it is malformed.
fn parse_record(value: &[u8]) -> Result<Endpoint, String> {
    let record: WireRecord = serde_json::from_slice(value).map_err(|e| format!("not a valid record: {e}"))?;
    let address: SocketAddr = record
        .address
        .parse()
        .map_err(|_| format!("bad address {:?} (expected ip:port)", truncate(&record.address)))?;
    let meta = EndpointMetadata {
        region: record.region,
        zone: record.zone,
        weight: record.weight.unwrap_or(1),
        tags: record.tags.unwrap_or_default(),
        priority: record.priority.unwrap_or(0),
    };
    let metadata = (meta != EndpointMetadata::default()).then_some(meta);
    let endpoint = Endpoint::new(address, metadata);
    endpoint.validate().map_err(|e| e.to_string())?;
    Ok(endpoint)
}

// ===== impl EtcdDiscovery =====

/// Counters of an [`EtcdDiscovery`], readable while it runs (see
/// [`EtcdDiscovery::stats_handle`]).
#[derive(Clone, Default)]
pub struct EtcdDiscoveryStats {
    inner: DataArc<StatsInner>,
}

#[derive(Default)]
struct StatsInner {
    full_reads: AtomicU64,
    watch_resumes: AtomicU64,
    compactions: AtomicU64,
    progress_notifications: AtomicU64,
}

impl EtcdDiscoveryStats {
    /// Full reads of every prefix (the first load, and resyncs after a compaction or a
    /// cluster change).
    pub fn full_reads(&self) -> u64 {
        self.inner.full_reads.load(Ordering::Relaxed)
    }

    /// Reconnections that resumed the watch from the last revision seen (no full read).
    pub fn watch_resumes(&self) -> u64 {
        self.inner.watch_resumes.load(Ordering::Relaxed)
    }

    /// Revisions compacted under the source: watches etcd cancelled because the revision to
    /// resume from was gone, and paged reads restarted because the revision of their first
    /// page was.
    pub fn compactions(&self) -> u64 {
        self.inner.compactions.load(Ordering::Relaxed)
    }

    /// Progress notifications received: etcd telling a quiet watch how far the store's
    /// revision has moved, so that a later resume starts from there.
    pub fn progress_notifications(&self) -> u64 {
        self.inner.progress_notifications.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for EtcdDiscoveryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDiscoveryStats")
            .field("full_reads", &self.full_reads())
            .field("watch_resumes", &self.watch_resumes())
            .field("compactions", &self.compactions())
            .field("progress_notifications", &self.progress_notifications())
            .finish()
    }
}

/// A [`Discovery`] source following services in etcd: the instances under
/// `<root><service>/` (see [`docs::fleet`](crate::docs::fleet) for the record format and guarantees).
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use tai_loadbalancer::{DiscoveryRunner, EtcdConfig, EtcdDiscovery, ServiceRegistry};
///
/// # async fn run() -> Result<(), tai_loadbalancer::Error> {
/// let registry = Arc::new(ServiceRegistry::new());
/// let runner = DiscoveryRunner::new(registry.clone());
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"]);
/// runner.spawn(EtcdDiscovery::new(config, ["api", "search"])?);
/// runner.synced().await; // first read published (or etcd reported unreachable)
/// println!("{:?}", registry.endpoints("api").await);
/// # Ok(())
/// # }
/// # let _ = run; // compiled, not run: it needs etcd
/// ```
pub struct EtcdDiscovery {
    config: EtcdConfig,
    services: Vec<String>,
    stats: EtcdDiscoveryStats,
}

impl EtcdDiscovery {
    /// A source for `services` under `config`'s root.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad `config` (see [`EtcdConfig::validate`]), no
    /// services, a repeated service; [`Error::InvalidServiceName`] for a name the registry
    /// would refuse or one containing `/` (it would overlap another service's prefix).
    pub fn new<I, S>(config: EtcdConfig, services: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        config.validate()?;
        let services: Vec<String> = services.into_iter().map(Into::into).collect();
        if services.is_empty() {
            return Err(Error::invalid_config(
                "etcd.services",
                "at least one service is needed",
            ));
        }
        let mut seen = BTreeSet::new();
        for service in &services {
            validate_service_name(service)?;
            if service.contains('/') {
                return Err(Error::InvalidServiceName {
                    name: truncate(service).to_owned(),
                    reason: "contains `/` (an etcd service prefix is `<root><service>/`)",
                });
            }
            if !seen.insert(service.as_str()) {
                return Err(Error::invalid_config(
                    "etcd.services",
                    format!("service `{}` is listed twice", truncate(service)),
                ));
            }
        }
        Ok(Self {
            config,
            services,
            stats: EtcdDiscoveryStats::default(),
        })
    }

    /// A handle to this source's counters, to keep before the source is spawned.
    pub fn stats_handle(&self) -> EtcdDiscoveryStats {
        self.stats.clone()
    }
}

impl fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("config", &self.config)
            .field("services", &self.services)
            .finish()
    }
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    fn name(&self) -> String {
        format!("etcd:{}", self.config.root)
    }

    fn services(&self) -> Vec<String> {
        self.services.clone()
    }

    async fn run(self: Box<Self>, sink: DiscoverySink) {
        let mut state = WatchState {
            services: self
                .services
                .iter()
                .map(|name| ServiceKeys::new(name, self.config.service_prefix(name)))
                .collect(),
            cluster_id: None,
            needs_full_read: true,
        };
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let end = tokio::select! {
                end = self.session(&mut state, &sink, &mut backoff) => end,
                () = sink.closed() => return,
            };
            match end {
                SessionEnd::Resync => state.needs_full_read = true,
                SessionEnd::Failed(reason) => {
                    let reason = self.config.explain(reason).await;
                    sink.set_health(SourceHealth::Degraded { reason });
                    let delay = backoff.next_delay();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = sink.closed() => return,
                    }
                }
            }
        }
    }
}

/// Why a session (one connection: read, watch) ended.
enum SessionEnd {
    /// Read everything again (compaction, another cluster): not a failure of the store.
    Resync,
    /// The store failed: degrade, back off, reconnect.
    Failed(String),
}

impl From<String> for SessionEnd {
    fn from(reason: String) -> Self {
        SessionEnd::Failed(reason)
    }
}

struct WatchState {
    services: Vec<ServiceKeys>,
    /// The cluster the revisions belong to (from the first read).
    cluster_id: Option<u64>,
    needs_full_read: bool,
}

/// One service's keys and what each advertises.
struct ServiceKeys {
    name: String,
    prefix: String,
    by_key: BTreeMap<Vec<u8>, Endpoint>,
    /// The keys advertising each address; the greatest one wins.
    by_address: BTreeMap<SocketAddr, BTreeSet<Vec<u8>>>,
    /// The last revision of this prefix seen (read or watched).
    revision: i64,
}

impl ServiceKeys {
    fn new(name: &str, prefix: String) -> Self {
        Self {
            name: name.to_owned(),
            prefix,
            by_key: BTreeMap::new(),
            by_address: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The endpoint the service has at `address`, if any key advertises it.
    fn effective(&self, address: &SocketAddr) -> Option<&Endpoint> {
        let key = self.by_address.get(address)?.last()?;
        self.by_key.get(key)
    }

    /// Forgets `key`; returns the address it advertised.
    fn remove_key(&mut self, key: &[u8]) -> Option<SocketAddr> {
        let old = self.by_key.remove(key)?;
        if let Some(keys) = self.by_address.get_mut(&old.address) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_address.remove(&old.address);
            }
        }
        Some(old.address)
    }

    /// Applies a put of `kv`; returns the addresses whose endpoint may have changed.
    fn put(&mut self, kv: &KeyValue, sink: &DiscoverySink, touched: &mut BTreeSet<SocketAddr>) {
        let key = kv.key().to_vec();
        touched.extend(self.remove_key(&key));
        match parse_record(kv.value()) {
            Ok(endpoint) => {
                touched.insert(endpoint.address);
                self.by_address
                    .entry(endpoint.address)
                    .or_default()
                    .insert(key.clone());
                self.by_key.insert(key, endpoint);
            }
            Err(reason) => sink.record_malformed(&format!(
                "{}: {reason}",
                String::from_utf8_lossy(truncate_bytes(kv.key()))
            )),
        }
    }

    /// Replaces everything with the keys of a full read; returns the snapshot.
    fn load(&mut self, kvs: &[KeyValue], sink: &DiscoverySink) -> Vec<Endpoint> {
        self.by_key.clear();
        self.by_address.clear();
        let mut ignored = BTreeSet::new();
        for kv in kvs {
            self.put(kv, sink, &mut ignored);
        }
        self.by_address
            .keys()
            .filter_map(|address| self.effective(address).cloned())
            .collect()
    }

    /// The changes to publish for `touched` addresses.
    fn changes(&self, touched: BTreeSet<SocketAddr>) -> MembershipUpdate {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for address in touched {
            match self.effective(&address) {
                Some(endpoint) => upserts.push(endpoint.clone()),
                None => removals.push(address),
            }
        }
        MembershipUpdate::Changes {
            service: self.name.clone(),
            upserts,
            removals,
        }
    }
}

/// The end of the key range of `prefix`: the smallest key greater than every key that starts
/// with it (etcd's convention: `\0` when there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Reads every key under `prefix`, `page` keys per request, every page at the revision of the
/// first (one consistent read). Returns the keys, the cluster id and the revision.
async fn read_prefix(
    kv: &mut etcd_client::KvClient,
    prefix: &str,
    page: usize,
    timeout: Duration,
    stats: &EtcdDiscoveryStats,
) -> Result<(Vec<KeyValue>, u64, i64), String> {
    let end = prefix_end(prefix.as_bytes());
    let limit = i64::try_from(page).unwrap_or(i64::MAX);
    let mut from = prefix.as_bytes().to_vec();
    let mut kvs = Vec::new();
    let mut read_at: Option<(u64, i64)> = None;
    let mut restarts = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if let Some((_, revision)) = read_at {
            options = options.with_revision(revision);
        }
        let mut response = match within(timeout, "range read", kv.get(from.clone(), Some(options))).await? {
            Ok(response) => response,
            // The revision of the first page was compacted while later pages were read (a
            // big service and an aggressive compaction): read again at a newer revision.
            Err(error) if read_at.is_some() && restarts < 3 && is_compacted(&error) => {
                restarts += 1;
                EtcdDiscoveryStats::bump(&stats.inner.compactions);
                tracing::info!(%prefix, "etcd compacted the revision of a paged read: reading again");
                from = prefix.as_bytes().to_vec();
                kvs.clear();
                read_at = None;
                continue;
            }
            Err(error) => return Err(format!("etcd range read: {}", describe(&error))),
        };
        let Some(header) = response.header() else {
            return Err("etcd range read: response without a header".into());
        };
        let (cluster_id, revision) = *read_at.get_or_insert((header.cluster_id(), header.revision()));
        if header.cluster_id() != cluster_id {
            return Err("etcd range read: the cluster changed between pages".into());
        }
        let more = response.more();
        let page_kvs = response.take_kvs();
        let Some(last) = page_kvs.last() else {
            return Ok((kvs, cluster_id, revision));
        };
        // The next page starts just after the last key of this one.
        from = last.key().to_vec();
        from.push(0);
        kvs.extend(page_kvs);
        if !more {
            return Ok((kvs, cluster_id, revision));
        }
    }
}

/// Whether `error` is etcd's `ErrCompacted` ("required revision has been compacted").
fn is_compacted(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("required revision has been compacted"))
}

fn truncate_bytes(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(256)]
}

impl EtcdDiscovery {
    /// One connection: (re)read if needed, watch, follow until something fails.
    async fn session(
        &self,
        state: &mut WatchState,
        sink: &DiscoverySink,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let timeout = self.config.request_timeout;
        let client = match self.config.connect().await {
            Ok(client) => client,
            Err(reason) => return reason.into(),
        };
        if state.needs_full_read {
            let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
            let mut cluster_id = None;
            let mut snapshots = Vec::with_capacity(state.services.len());
            for service in &mut state.services {
                let (kvs, read_cluster, revision) = match read_prefix(
                    &mut kv,
                    &service.prefix,
                    self.config.range_page_size,
                    timeout,
                    &self.stats,
                )
                .await
                {
                    Ok(read) => read,
                    Err(reason) => return reason.into(),
                };
                cluster_id = Some(read_cluster);
                service.revision = revision;
                let endpoints = service.load(&kvs, sink);
                snapshots.push(MembershipUpdate::Snapshot {
                    service: service.name.clone(),
                    endpoints,
                });
            }
            // Published only once every prefix is read: a failed read publishes nothing.
            for snapshot in snapshots {
                sink.publish(snapshot);
            }
            state.cluster_id = cluster_id;
            state.needs_full_read = false;
            EtcdDiscoveryStats::bump(&self.stats.inner.full_reads);
        } else {
            EtcdDiscoveryStats::bump(&self.stats.inner.watch_resumes);
        }

        // One watch stream, one watcher per service, with ids 1..=n chosen by us.
        let mut watch_client = client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
        let options = |index: usize, service: &ServiceKeys| {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(service.revision + 1)
                .with_watch_id(index as i64 + 1)
                // Quiet prefixes still learn the store's revision, so a reconnect after a
                // compaction can resume instead of reading everything again.
                .with_progress_notify()
        };
        let first = watch_client.watch(
            state.services[0].prefix.as_bytes(),
            Some(options(0, &state.services[0])),
        );
        let mut stream = match bounded(timeout, "watch", first).await {
            Ok(stream) => stream,
            Err(reason) => return reason.into(),
        };
        for (index, service) in state.services.iter().enumerate().skip(1) {
            let more = stream.watch(service.prefix.as_bytes(), Some(options(index, service)));
            if let Err(reason) = bounded(timeout, "watch", more).await {
                return reason.into();
            }
        }

        let mut pending_created = state.services.len();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = if pending_created > 0 {
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(message) => message,
                    Err(_) => {
                        return SessionEnd::Failed(format!("etcd watch: not created within {timeout:?}"));
                    }
                }
            } else {
                stream.message().await
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return SessionEnd::Failed("etcd watch stream closed".into()),
                Err(error) => return SessionEnd::Failed(format!("etcd watch: {}", describe(&error))),
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    EtcdDiscoveryStats::bump(&self.stats.inner.compactions);
                    tracing::info!(root = %self.config.root, compacted = response.compact_revision(),
                        "etcd compacted the revision to resume from: reading everything again");
                    return SessionEnd::Resync;
                }
                return SessionEnd::Failed(format!("etcd watch cancelled: {}", response.cancel_reason()));
            }
            let Some(index) = response
                .watch_id()
                .checked_sub(1)
                .and_then(|id| usize::try_from(id).ok())
                .filter(|&i| i < state.services.len())
            else {
                continue; // a progress notification for the whole stream
            };
            if response.created() {
                if let Some(header) = response.header() {
                    let service = &state.services[index];
                    if state.cluster_id.is_some_and(|id| id != header.cluster_id())
                        || header.revision() < service.revision
                    {
                        tracing::warn!(root = %self.config.root,
                            "etcd is another cluster now (new id, or its revision went backwards): reading everything again");
                        return SessionEnd::Resync;
                    }
                }
                pending_created -= 1;
                if pending_created == 0 {
                    sink.set_health(SourceHealth::Healthy);
                    backoff.reset();
                }
            }
            let service = &mut state.services[index];
            if response.events().is_empty() {
                if !response.created() {
                    // A progress notification: every event of this prefix up to the
                    // header's revision has been delivered.
                    if let Some(header) = response.header() {
                        service.revision = service.revision.max(header.revision());
                        EtcdDiscoveryStats::bump(&self.stats.inner.progress_notifications);
                    }
                }
                continue;
            }
            let mut touched = BTreeSet::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                service.revision = service.revision.max(kv.mod_revision());
                match event.event_type() {
                    EventType::Put => service.put(kv, sink, &mut touched),
                    EventType::Delete => touched.extend(service.remove_key(kv.key())),
                }
            }
            if !touched.is_empty() {
                sink.publish(service.changes(touched));
            }
        }
    }
}

// ===== impl EtcdRegistration =====

/// This instance's record in etcd, under a lease kept alive by a background task: the other
/// half of service discovery.
///
/// While it lives, the key `<root><service>/<instance-id>` holds the instance's
/// [record](etcd_record). Keepalives are sent every third of the TTL; if the lease is lost
/// (it expired while etcd was unreachable, or was revoked) a new one is granted and the
/// record put again; if etcd is unreachable the task retries with backoff.
///
/// * [`deregister`](Self::deregister) deletes the key and revokes the lease at once;
/// * [`drain_and_deregister`](Self::drain_and_deregister) deletes the key, then waits: the
///   balancers stop sending new requests while the ones in flight finish;
/// * dropping it (or the process dying) stops the keepalives: the key is deleted when the
///   lease expires, within the TTL.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tai_loadbalancer::{Endpoint, EtcdConfig, EtcdRegistration};
///
/// # async fn run() -> Result<(), tai_loadbalancer::Error> {
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"]);
/// let me = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
/// let registration = EtcdRegistration::register(&config, "api", "api-1", me, Duration::from_secs(10)).await?;
/// // ... serve ...
/// registration.drain_and_deregister(Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// # let _ = run; // compiled, not run: it needs etcd
/// ```
pub struct EtcdRegistration {
    key: String,
    lease: tokio::sync::watch::Receiver<i64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

/// What the keepalive task needs.
struct Registrant {
    config: EtcdConfig,
    key: String,
    value: String,
    ttl_secs: i64,
    lease: tokio::sync::watch::Sender<i64>,
}

/// A live lease with its record put.
struct Held {
    client: Client,
    lease_id: i64,
    keeper: etcd_client::LeaseKeeper,
    responses: etcd_client::LeaseKeepAliveStream,
}

impl EtcdRegistration {
    /// Puts `endpoint`'s record under `<root><service>/<instance_id>` with a lease of
    /// `lease_ttl` (rounded up to whole seconds; etcd may raise very short TTLs to its
    /// minimum, about 2 s by default) and starts keeping it alive on the current tokio
    /// runtime. Returns once the record is in etcd.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad `config`, an `instance_id` that is empty, has `/`,
    /// whitespace or control characters, or a TTL outside 1 s..=1 day;
    /// [`Error::InvalidServiceName`]; the endpoint's validation errors
    /// ([`Endpoint::validate`]); [`Error::Etcd`] if etcd cannot be reached or refuses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub async fn register(
        config: &EtcdConfig,
        service: &str,
        instance_id: &str,
        endpoint: Endpoint,
        lease_ttl: Duration,
    ) -> Result<Self, Error> {
        config.validate()?;
        validate_service_name(service)?;
        if service.contains('/') {
            return Err(Error::InvalidServiceName {
                name: truncate(service).to_owned(),
                reason: "contains `/` (an etcd service prefix is `<root><service>/`)",
            });
        }
        if instance_id.is_empty()
            || instance_id.len() > MAX_KEY_PART_LEN
            || instance_id.contains('/')
            || instance_id.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::invalid_config(
                "etcd.instance_id",
                format!(
                    "{:?} must be 1 to 1024 bytes without `/`, whitespace or control characters",
                    truncate(instance_id)
                ),
            ));
        }
        if lease_ttl < Duration::from_secs(1) || lease_ttl > Duration::from_secs(86_400) {
            return Err(Error::invalid_config(
                "etcd.lease_ttl",
                "must be between 1 s and 1 day",
            ));
        }
        endpoint.validate()?;
        let ttl_secs =
            i64::try_from(lease_ttl.as_secs() + u64::from(lease_ttl.subsec_nanos() > 0)).unwrap_or(86_400);
        let (lease_tx, lease_rx) = tokio::sync::watch::channel(0);
        let registrant = Registrant {
            config: config.clone(),
            key: config.instance_key(service, instance_id),
            value: etcd_record(&endpoint),
            ttl_secs,
            lease: lease_tx,
        };
        let held = match registrant.establish(None).await {
            Ok(held) => held,
            Err(reason) => {
                return Err(Error::Etcd {
                    operation: "register",
                    reason: config.explain(reason).await,
                });
            }
        };
        let key = registrant.key.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(registrant.keep_alive(held, stop_rx));
        Ok(Self {
            key,
            lease: lease_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The key holding this instance's record.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The id of the lease currently holding the record (it changes when a lost lease is
    /// replaced).
    pub fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Clean shutdown: stops the keepalives, deletes the key (balancers drop this instance
    /// as soon as they see the delete) and revokes the lease.
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`] if etcd could not be reached to delete the key: the record then
    /// disappears when its lease expires, within the TTL.
    pub async fn deregister(self) -> Result<(), Error> {
        self.stop(Duration::ZERO).await
    }

    /// Deregisters, then drains: deletes the key and revokes its lease at once (new
    /// requests stop coming as the balancers see the delete), then waits `drain` while the
    /// process keeps serving the requests in flight. Returns when it is safe to exit.
    ///
    /// # Errors
    ///
    /// As [`deregister`](Self::deregister) (the wait happens either way).
    pub async fn drain_and_deregister(self, drain: Duration) -> Result<(), Error> {
        self.stop(drain).await
    }

    async fn stop(mut self, drain: Duration) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        let removed = match task.await {
            Ok(result) => result,
            Err(error) => Err(Error::Etcd {
                operation: "deregister",
                reason: format!("the keepalive task failed: {error}"),
            }),
        };
        tokio::time::sleep(drain).await;
        removed
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        // No async clean-up here: the keepalives stop and the lease expires.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for EtcdRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistration")
            .field("key", &self.key)
            .field("lease_id", &self.lease_id())
            .finish()
    }
}

impl Registrant {
    /// The longest one keepalive round may take: a third of the TTL (at least 200 ms).
    fn round_limit(&self) -> Duration {
        Duration::from_millis(
            self.ttl_secs
                .unsigned_abs()
                .saturating_mul(1000)
                .div_euclid(3)
                .max(200),
        )
    }

    /// A new connection and keepalive stream for the lease `held` already has (after a
    /// transient failure: the lease, and so the key, may well still be alive).
    async fn reattach(&self, held: &mut Held) -> Result<(), String> {
        let timeout = self.config.request_timeout.min(self.round_limit());
        let client = self.config.connect().await?;
        let mut lease = client.lease_client();
        let (keeper, responses) =
            bounded(timeout, "lease keepalive", lease.keep_alive(held.lease_id)).await?;
        held.client = client;
        held.keeper = keeper;
        held.responses = responses;
        Ok(())
    }

    /// Connects, grants a lease, puts the record under it, opens the keepalive stream.
    /// `stale` (a previous lease) is revoked afterwards, best effort: the key has moved.
    async fn establish(&self, stale: Option<i64>) -> Result<Held, String> {
        let timeout = self.config.request_timeout;
        let client = self.config.connect().await?;
        let mut lease = client.lease_client();
        let grant = bounded(timeout, "lease grant", lease.grant(self.ttl_secs, None)).await?;
        let lease_id = grant.id();
        let mut kv = client.kv_client();
        let put = kv.put(
            self.key.as_bytes(),
            self.value.as_bytes(),
            Some(PutOptions::new().with_lease(lease_id)),
        );
        bounded(timeout, "put", put).await?;
        self.lease.send_replace(lease_id);
        let (keeper, responses) = bounded(timeout, "lease keepalive", lease.keep_alive(lease_id)).await?;
        if let Some(stale) = stale.filter(|&id| id != 0 && id != lease_id) {
            let _ = bounded(timeout, "lease revoke", lease.revoke(stale)).await;
        }
        tracing::info!(key = %self.key, lease_id, ttl = self.ttl_secs, "registered in etcd");
        Ok(Held {
            client,
            lease_id,
            keeper,
            responses,
        })
    }

    /// One keepalive round trip; `Ok(false)` if the lease is gone.
    async fn refresh(&self, held: &mut Held) -> Result<bool, String> {
        // A round must end well inside the lease: at most a third of the TTL.
        let timeout = self.config.request_timeout.min(self.round_limit());
        bounded(timeout, "lease keepalive", held.keeper.keep_alive()).await?;
        match bounded(timeout, "lease keepalive", held.responses.message()).await? {
            Some(response) => Ok(response.ttl() > 0),
            None => Err("etcd lease keepalive: stream closed".into()),
        }
    }

    async fn keep_alive(self, held: Held, mut stop: tokio::sync::oneshot::Receiver<()>) -> Result<(), Error> {
        let interval = Duration::from_millis((self.ttl_secs as u64 * 1000 / 3).max(200));
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let ttl = Duration::from_secs(self.ttl_secs.unsigned_abs());
        let mut held = Some(held);
        let mut last_lease = None;
        let mut renewed = tokio::time::Instant::now();
        let mut struggling = false;
        loop {
            let delay = if held.is_some() && !struggling {
                interval
            } else {
                backoff.next_delay().min(interval)
            };
            tokio::select! {
                _ = &mut stop => return self.remove(held).await,
                () = tokio::time::sleep(delay) => {}
            }
            let outcome = match held.as_mut() {
                Some(current) => {
                    last_lease = Some(current.lease_id);
                    match self.refresh(current).await {
                        Ok(true) => {
                            renewed = tokio::time::Instant::now();
                            struggling = false;
                            backoff.reset();
                            Ok(())
                        }
                        Ok(false) => Err(format!("lease {} was lost", current.lease_id)),
                        // A transient failure while the lease may still be alive: keep it, on
                        // a new connection, rather than re-registering under a new lease.
                        Err(reason) if renewed.elapsed() < ttl => {
                            tracing::warn!(key = %self.key, %reason, "etcd lease keepalive failed: retrying on the same lease");
                            struggling = true;
                            if let Err(reason) = self.reattach(current).await {
                                tracing::warn!(key = %self.key, %reason, "etcd reconnect for the keepalive failed");
                            }
                            Ok(())
                        }
                        Err(reason) => Err(reason),
                    }
                }
                None => match self.establish(last_lease).await {
                    Ok(new) => {
                        backoff.reset();
                        renewed = tokio::time::Instant::now();
                        struggling = false;
                        held = Some(new);
                        Ok(())
                    }
                    Err(reason) => Err(reason),
                },
            };
            if let Err(reason) = outcome {
                if held.take().is_some() {
                    tracing::warn!(key = %self.key, %reason, "etcd registration interrupted: registering again");
                    // A lost lease is replaced at once; a failed store is retried with backoff.
                    backoff.reset();
                } else {
                    tracing::warn!(key = %self.key, %reason, "etcd registration failed: retrying");
                }
            }
        }
    }

    /// Deletes the key and revokes the lease (reconnecting once if there is no connection).
    async fn remove(&self, held: Option<Held>) -> Result<(), Error> {
        let timeout = self.config.request_timeout;
        let failed = |reason| Error::Etcd {
            operation: "deregister",
            reason,
        };
        let (client, lease_id) = match held {
            Some(held) => (held.client, Some(held.lease_id)),
            None => (self.config.connect().await.map_err(failed)?, None),
        };
        let mut kv = client.kv_client();
        bounded(timeout, "delete", kv.delete(self.key.as_bytes(), None))
            .await
            .map_err(failed)?;
        if let Some(lease_id) = lease_id {
            let mut lease = client.lease_client();
            bounded(timeout, "lease revoke", lease.revoke(lease_id))
                .await
                .map_err(failed)?;
        }
        tracing::info!(key = %self.key, "deregistered from etcd");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_with_defaults_and_ignore_unknown_fields() {
        let endpoint = parse_record(br#"{"address":"127.0.0.1:5001","extra":{"x":1}}"#).unwrap();
        assert_eq!(endpoint, Endpoint::new("127.0.0.1:5001".parse().unwrap(), None));
        let full = parse_record(
            br#"{"address":"127.0.0.1:5002","zone":"a","region":"r","weight":3,"tags":{"v":"2"}}"#,
        )
        .unwrap();
        assert_eq!(full.weight(), 3);
        assert_eq!(full.zone(), Some("a"));
        assert_eq!(full.region(), Some("r"));
        assert_eq!(full.tag("v"), Some("2"));
        assert_eq!(parse_record(etcd_record(&full).as_bytes()).unwrap(), full);
        let standby = parse_record(br#"{"address":"127.0.0.1:5003","priority":2}"#).unwrap();
        assert_eq!(standby.priority(), 2);
        assert_eq!(parse_record(etcd_record(&standby).as_bytes()).unwrap(), standby);
        assert!(etcd_record(&standby).contains(r#""priority":2"#));
    }

    #[test]
    fn malformed_records_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"zone":"a"}"#,
            br#"{"address":5001}"#,
            br#"{"address":"localhost:5001"}"#,
            br#"{"address":"127.0.0.1"}"#,
            br#"{"address":"127.0.0.1:5001","weight":"heavy"}"#,
            br#"{"address":"127.0.0.1:5001","weight":-1}"#,
            br#"{"address":"127.0.0.1:5001","weight":0}"#,
            br#"{"address":"127.0.0.1:5001","tags":{"v":2}}"#,
            br#"{"address":"127.0.0.1:5001","zone":""}"#,
            br#"{"address":"0.0.0.0:5001"}"#,
            br#"{"address":"127.0.0.1:5001","priority":128}"#,
            br#"{"address":"127.0.0.1:5001","priority":-1}"#,
        ] {
            assert!(parse_record(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        let field = |config: EtcdConfig| match config.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        let ok = || EtcdConfig::new(["http://127.0.0.1:2379"]);
        assert!(ok().validate().is_ok());
        assert!(EtcdConfig::new(["127.0.0.1:2379"]).validate().is_ok());
        assert_eq!(field(EtcdConfig::new(Vec::<String>::new())), "etcd.endpoints");
        for url in [
            "",
            "http://",
            "http://127.0.0.1",
            "http://h:0",
            "https://h:1",
            "http://h:1/x",
            "h :1",
        ] {
            assert_eq!(field(EtcdConfig::new([url])), "etcd.endpoints", "{url:?}");
        }
        assert_eq!(field(ok().with_root("/services")), "etcd.root");
        assert_eq!(field(ok().with_root("")), "etcd.root");
        assert_eq!(
            field(ok().with_request_timeout(Duration::ZERO)),
            "etcd.request_timeout"
        );
        assert_eq!(
            field(ok().with_backoff(Duration::from_secs(2), Duration::from_secs(1))),
            "etcd.backoff"
        );
        assert_eq!(field(ok().with_range_page_size(0)), "etcd.range_page_size");
        assert_eq!(field(ok().with_range_page_size(100_001)), "etcd.range_page_size");
        assert!(ok().with_range_page_size(1).validate().is_ok());
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/services/api/"), b"/services/api0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn discovery_rejects_bad_services() {
        let config = || EtcdConfig::new(["http://127.0.0.1:2379"]);
        assert!(EtcdDiscovery::new(config(), Vec::<String>::new()).is_err());
        assert!(matches!(
            EtcdDiscovery::new(config(), ["a/b"]),
            Err(Error::InvalidServiceName { .. })
        ));
        assert!(matches!(
            EtcdDiscovery::new(config(), [""]),
            Err(Error::InvalidServiceName { .. })
        ));
        assert!(matches!(
            EtcdDiscovery::new(config(), ["a", "a"]),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(EtcdDiscovery::new(config(), ["a", "b"]).is_ok());
    }
}
