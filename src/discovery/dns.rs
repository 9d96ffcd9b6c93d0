//! The DNS source: services whose members are the A/AAAA or SRV records of a DNS name.
//!
//! This module owns [`DnsDiscovery`], its [`DnsConfig`] and [`DnsTarget`]s. It resolves
//! each target with `hickory-resolver` (its own in-process resolver: no libc, no cache shared
//! with anything else), publishes each service's whole membership when an answer changes
//! it, and re-resolves each target when its records expire.
//!
//! The record mapping, refresh schedule and failure behaviour are documented on
//! [`DnsDiscovery`] (the public page for this private module).
#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::{Backoff, Discovery, DiscoverySink, MembershipUpdate, SourceHealth};
use crate::Error;
use crate::endpoint::validate_service_name;
use crate::endpoint::{Endpoint, EndpointMetadata};

/// Tag holding an SRV record's priority.
const TAG_PRIORITY: &str = "srv_priority";
/// Tag holding an SRV record's target host.
const TAG_TARGET: &str = "srv_target";
/// SRV target hosts looked up at once per resolution (the rest wait for a free slot), so a
/// large SRV set does not open hundreds of queries in one burst.
const MAX_CONCURRENT_HOST_LOOKUPS: usize = 16;

// ===== DnsTarget =====

/// What to resolve for one service: a DNS name and the kind of records to read.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{DnsTarget, DnsTargetKind};
///
/// let web = DnsTarget::a("web", "web.internal.example.", 8080);
/// assert_eq!(web.kind(), DnsTargetKind::A { port: 8080 });
/// let api = DnsTarget::srv("api", "_grpc._tcp.api.internal.example.");
/// assert_eq!(api.service(), "api");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DnsTarget {
    service: String,
    name: String,
    kind: DnsTargetKind,
}

/// The records a [`DnsTarget`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DnsTargetKind {
    /// IPv4 addresses (A records), each an endpoint on `port`.
    A {
        /// The port the endpoints listen on.
        port: u16,
    },
    /// IPv6 addresses (AAAA records), each an endpoint on `port`.
    Aaaa {
        /// The port the endpoints listen on.
        port: u16,
    },
    /// SRV records: host, port, priority and weight per endpoint.
    Srv,
}

impl DnsTarget {
    /// Endpoints of `service` at the A records of `name`, on `port`.
    ///
    /// End `name` with `.` to make it absolute; otherwise the system's search domains apply
    /// (with the system configuration).
    pub fn a(service: impl Into<String>, name: impl Into<String>, port: u16) -> Self {
        Self::new(service, name, DnsTargetKind::A { port })
    }

    /// Endpoints of `service` at the AAAA records of `name`, on `port`.
    pub fn aaaa(service: impl Into<String>, name: impl Into<String>, port: u16) -> Self {
        Self::new(service, name, DnsTargetKind::Aaaa { port })
    }

    /// Endpoints of `service` from the SRV records of `name` (e.g. `_http._tcp.api.example.`).
    pub fn srv(service: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(service, name, DnsTargetKind::Srv)
    }

    /// A target of any kind.
    pub fn new(service: impl Into<String>, name: impl Into<String>, kind: DnsTargetKind) -> Self {
        Self {
            service: service.into(),
            name: name.into(),
            kind,
        }
    }

    /// The service it feeds.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The DNS name resolved.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The records read.
    pub fn kind(&self) -> DnsTargetKind {
        self.kind
    }
}

// ===== DnsConfig =====

/// How [`DnsDiscovery`] resolves: name servers, refresh bounds, jitter, timeouts, backoff.
///
/// `DnsConfig::default()` uses the system's resolver configuration (`/etc/resolv.conf`),
/// refreshes between 5 s and 5 min (up to 10 % before the TTL), gives each query 2 s, and
/// retries failures after 500 ms doubling up to 30 s.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::DnsConfig;
///
/// let config = DnsConfig::default()
///     .with_nameserver("127.0.0.1:5353".parse().unwrap())
///     .with_refresh_bounds(Duration::from_secs(1), Duration::from_secs(60))
///     .with_backoff(Duration::from_millis(200), Duration::from_secs(10));
/// assert!(config.validate().is_ok());
/// assert!(config.with_jitter(2.0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DnsConfig {
    nameservers: Vec<SocketAddr>,
    min_refresh: Duration,
    max_refresh: Duration,
    jitter: f64,
    timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    lowest_srv_priority_only: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_refresh: Duration::from_secs(5),
            max_refresh: Duration::from_secs(300),
            jitter: 0.1,
            timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            lowest_srv_priority_only: false,
        }
    }
}

impl DnsConfig {
    /// Asks the name server at `address` (UDP, and TCP on the same port for truncated
    /// answers) instead of the system's. Call again to add more (tried in order).
    pub fn with_nameserver(mut self, address: SocketAddr) -> Self {
        self.nameservers.push(address);
        self
    }

    /// Bounds the refresh interval: a record's TTL is used, but never less than `min` nor
    /// more than `max`.
    pub fn with_refresh_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_refresh = min;
        self.max_refresh = max;
        self
    }

    /// Brings each refresh forward by up to `fraction` of its interval (`0.0..=0.5`; default
    /// 0.1), so a fleet does not ask in step and no answer is used past its TTL.
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// How long one query may take before it counts as failed (default 2 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Retry backoff after a failure: about `initial`, doubling per failure up to `max`;
    /// every wait is jittered down by up to half.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Keeps only the SRV records of the lowest priority value (the most preferred), as RFC
    /// 2782 clients do, instead of balancing over every priority by weight (the default).
    pub fn with_lowest_srv_priority_only(mut self, only: bool) -> Self {
        self.lowest_srv_priority_only = only;
        self
    }

    /// The configured name servers (empty: the system's).
    pub fn nameservers(&self) -> &[SocketAddr] {
        &self.nameservers
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field: refresh bounds with `min` zero or above
    /// `max` (or `max` above a day), jitter outside `0.0..=0.5`, a timeout that is zero or
    /// above an hour, backoff with `initial` zero or above `max` (or `max` above a day), a
    /// name server on port 0 or the unspecified address.
    pub fn validate(&self) -> Result<(), Error> {
        if self.min_refresh.is_zero() || self.min_refresh > self.max_refresh {
            return Err(Error::invalid_config(
                "dns.refresh",
                format!(
                    "min ({:?}) must be above zero and at most max ({:?})",
                    self.min_refresh, self.max_refresh
                ),
            ));
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return Err(Error::invalid_config(
                "dns.jitter",
                format!("{} is outside 0.0..=0.5", self.jitter),
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(Error::invalid_config(
                "dns.timeout",
                "must be above zero and at most an hour",
            ));
        }
        for (field, value) in [
            ("dns.refresh", self.max_refresh),
            ("dns.backoff", self.backoff_max),
        ] {
            if value > Duration::from_secs(24 * 3600) {
                return Err(Error::invalid_config(
                    field,
                    format!("max ({value:?}) must be at most a day"),
                ));
            }
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(Error::invalid_config(
                "dns.backoff",
                format!(
                    "initial ({:?}) must be above zero and at most max ({:?})",
                    self.backoff_initial, self.backoff_max
                ),
            ));
        }
        for address in &self.nameservers {
            if address.port() == 0 || address.ip().is_unspecified() {
                return Err(Error::invalid_config(
                    "dns.nameserver",
                    format!("{address} is not a name server address"),
                ));
            }
        }
        Ok(())
    }

    fn resolver(&self) -> Result<TokioResolver, Error> {
        let mut builder = if self.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| Error::ConfigIo {
                path: "system resolver configuration (/etc/resolv.conf)".into(),
                message: e.to_string(),
            })?
        } else {
            let servers = self
                .nameservers
                .iter()
                .map(|address| {
                    let mut server = NameServerConfig::udp_and_tcp(address.ip());
                    for connection in &mut server.connections {
                        connection.port = address.port();
                    }
                    server
                })
                .collect();
            let builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            );
            let mut builder = builder;
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options = builder.options_mut();
        options.timeout = self.timeout;
        // Retries are ours (with backoff and health reporting); the cache is off so every
        // refresh asks the name server.
        options.attempts = 1;
        options.cache_size = 0;
        builder
            .build()
            .map_err(|e| Error::invalid_config("dns", format!("cannot build the resolver: {e}")))
    }

    /// The wait after an answer with `ttl`: bounded, then jittered down (never past the
    /// record's expiry) within the bounds.
    fn refresh_after(&self, ttl: Duration) -> Duration {
        let base = ttl.clamp(self.min_refresh, self.max_refresh).as_secs_f64();
        let spread = -base * self.jitter * unit_random();
        Duration::from_secs_f64((base + spread).max(0.0)).clamp(self.min_refresh, self.max_refresh)
    }
}

/// A uniform random number in `[0, 1)`.
fn unit_random() -> f64 {
    (crate::sync::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

// ===== DnsDiscovery =====

/// A [`Discovery`] source resolving A/AAAA or SRV records.
///
/// # Mapping
///
/// * **A / AAAA** target (`DnsTarget::a`, `DnsTarget::aaaa`): one endpoint per address, on
///   the target's port, weight 1.
/// * **SRV** target (`DnsTarget::srv`): one endpoint per record, at the addresses of its
///   target host (from the answer's additional section, else resolved as A/AAAA, the
///   hosts concurrently) on the record's port. The SRV weight becomes the endpoint weight
///   (weight 0, "rarely", becomes 1, the smallest valid weight); the priority becomes the
///   endpoint's [priority level](crate::EndpointMetadata::priority) by rank (the lowest
///   value is level 0, the next level 1, ...), so lower-priority records get traffic as the
///   better levels lose health (`[priority]`'s overprovisioning rule), and it is also kept
///   raw in tag `srv_priority`; the target host is tag `srv_target`.
///   [`DnsConfig::with_lowest_srv_priority_only`] keeps only the lowest (most preferred)
///   priority's records, as RFC 2782 clients do. A target of `.` ("no service here") contributes
///   nothing.
/// * Several targets may feed one service (an A and an AAAA target for dual stack): its
///   membership is the union of their last answers.
///
/// # Refresh
///
/// A target is re-resolved when its answer expires: at the smallest TTL among the records
/// used, bounded by [`DnsConfig::with_refresh_bounds`], brought forward by up to `jitter` (so a
/// fleet of clients does not query in lockstep). The resolver's cache is off: every refresh
/// asks the name server.
///
/// # Failure behaviour
///
/// * **A resolution failure** (timeout, SERVFAIL, REFUSED, network error) keeps the target's
///   last answer (never empties a service because DNS is unreachable), reports the source
///   [`SourceHealth::Degraded`] with a warning, and retries with capped exponential backoff
///   and jitter ([`DnsConfig::with_backoff`]); the next good answer makes it healthy again.
/// * **An authoritative empty answer** (NXDOMAIN, or the name exists without records of the
///   type) empties the target's contribution, like Envoy's `STRICT_DNS` clusters: the name
///   server has answered, and its answer is that there are no instances. Keeping the last
///   records instead would route to instances the zone's owner removed (a drained service
///   would never drain), inventing membership. The empty answer is re-asked after its
///   negative TTL (the SOA minimum), bounded as above.
/// * **An SRV target host whose lookup fails** (timeout, SERVFAIL, ...; not "no
///   addresses", which is a bad record, below) holds back neither the SRV answer nor the
///   other hosts: the answer applies (new, changed and removed records, the other hosts'
///   addresses), and the failing host keeps the addresses it had at its last successful
///   lookup for this target, so nothing is lost. A failing host with no last addresses (new
///   in the SRV set, or never resolved) would leave a hole: on the target's first
///   resolution the hosts that did resolve are published without waiting for it (there is
///   nothing to lose yet), but once the target has an answer, or when nothing resolved at
///   all, the whole resolution counts as failed and the last answer stays (a rename of
///   every SRV target during a DNS outage does not empty the service). Either way the
///   source is [`SourceHealth::Degraded`] (the reason names the host)
///   and the target is retried after the backoff delay (or its TTL, if sooner) until every
///   host resolves; then it is healthy again. Last addresses are kept per target, only for
///   the hosts its current SRV records name.
/// * **A bad record** (an SRV port 0, an SRV target host without addresses, an address
///   that cannot receive traffic) is skipped and counted as malformed
///   ([`DiscoverySink::record_malformed`]); the rest applies. It is counted (and logged)
///   once, when it appears: a refresh that finds the same bad record again does not count
///   it again, and one that no longer finds it forgets it (it counts again if it returns).
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tai_loadbalancer::{DiscoveryRunner, DnsConfig, DnsDiscovery, DnsTarget, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tai_loadbalancer::Error> {
/// let config = DnsConfig::default()
///     .with_nameserver("127.0.0.1:5353".parse().unwrap())
///     .with_refresh_bounds(Duration::from_secs(1), Duration::from_secs(60));
/// let source = DnsDiscovery::new(
///     config,
///     [
///         DnsTarget::srv("api", "_grpc._tcp.api.test."),
///         DnsTarget::a("web", "web.test.", 8080),
///     ],
/// )?;
/// let registry = Arc::new(ServiceRegistry::new());
/// let runner = DiscoveryRunner::new(registry.clone());
/// runner.spawn(source);
/// runner.synced().await;
/// println!("{:?}", registry.endpoints("api").await?);
/// # Ok(())
/// # }
/// ```
pub struct DnsDiscovery {
    config: DnsConfig,
    targets: Vec<DnsTarget>,
    resolver: TokioResolver,
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("config", &self.config)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl DnsDiscovery {
    /// A source resolving `targets` as `config` says.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad config ([`DnsConfig::validate`]), no targets, a
    /// target whose service name is invalid, whose DNS name does not parse, whose port is 0,
    /// or that is listed twice; [`Error::ConfigIo`] when the system configuration is asked
    /// for and cannot be read.
    pub fn new(config: DnsConfig, targets: impl IntoIterator<Item = DnsTarget>) -> Result<Self, Error> {
        config.validate()?;
        let targets: Vec<DnsTarget> = targets.into_iter().collect();
        if targets.is_empty() {
            return Err(Error::invalid_config("dns.targets", "no targets to resolve"));
        }
        let mut seen = BTreeSet::new();
        for (i, target) in targets.iter().enumerate() {
            let field = |f: &str| format!("dns.targets[{i}].{f}");
            if let Err(Error::InvalidServiceName { reason, .. }) = validate_service_name(&target.service) {
                return Err(Error::invalid_config(
                    field("service"),
                    format!("invalid service name: {reason}"),
                ));
            }
            let name = crate::error::truncate(&target.name);
            match Name::from_utf8(&target.name) {
                Ok(parsed) if !parsed.is_root() && !target.name.trim().is_empty() => {}
                Ok(_) => return Err(Error::invalid_config(field("name"), "must not be empty")),
                Err(e) => {
                    return Err(Error::invalid_config(
                        field("name"),
                        format!("{name:?} is not a DNS name: {e}"),
                    ));
                }
            }
            if let DnsTargetKind::A { port: 0 } | DnsTargetKind::Aaaa { port: 0 } = target.kind {
                return Err(Error::invalid_config(
                    field("port"),
                    "port 0 cannot receive traffic",
                ));
            }
            if !seen.insert(target) {
                return Err(Error::invalid_config(
                    field("name"),
                    format!("{name:?} is listed twice for service `{}`", target.service),
                ));
            }
        }
        let resolver = config.resolver()?;
        Ok(Self {
            config,
            targets,
            resolver,
        })
    }

    /// The targets, as given.
    pub fn targets(&self) -> &[DnsTarget] {
        &self.targets
    }
}

/// One target's answer: its endpoints, how long they are valid, and what the target
/// remembers for its next resolution.
struct Answer {
    endpoints: Vec<Endpoint>,
    ttl: Duration,
    /// SRV target hosts whose lookup failed, each with why (empty: a complete answer).
    unresolved: Vec<(Name, String)>,
    /// Every bad record met, described (the same record gives the same text each time).
    malformed: BTreeSet<String>,
    /// SRV: the addresses used for each target host the records name (fresh, or the last
    /// known ones of a host whose lookup failed).
    hosts: BTreeMap<Name, Vec<IpAddr>>,
}

/// What one target remembers from its previous resolution.
#[derive(Debug, Default)]
struct TargetMemory {
    /// SRV target host -> its addresses at its last successful lookup; only the hosts the
    /// last SRV answer named (so it never grows past the SRV set).
    hosts: BTreeMap<Name, Vec<IpAddr>>,
    /// The bad records of the last answer, already counted and logged.
    malformed: BTreeSet<String>,
}

impl TargetMemory {
    /// Takes in `answer`'s memory, counting (and logging) only the bad records the previous
    /// answer did not have.
    fn remember(&mut self, answer: &mut Answer, sink: &DiscoverySink) {
        for reason in answer.malformed.difference(&self.malformed) {
            sink.record_malformed(reason);
        }
        self.malformed = std::mem::take(&mut answer.malformed);
        self.hosts = std::mem::take(&mut answer.hosts);
    }
}

/// What the per-target tasks tell the coordinator.
struct Report {
    target: usize,
    outcome: Outcome,
}

/// The result of one resolution of a target.
enum Outcome {
    /// An answer: it applies, and the target is healthy.
    Complete(Vec<Endpoint>),
    /// An answer that applies, but without fresh addresses for some SRV target hosts
    /// (`reason` names them): the target counts as failing until they resolve.
    Partial {
        endpoints: Vec<Endpoint>,
        reason: String,
    },
    /// No answer: the target keeps its last one.
    Failed(String),
}

#[async_trait::async_trait]
impl Discovery for DnsDiscovery {
    fn name(&self) -> String {
        let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        format!("dns:{}", names.join(","))
    }

    fn services(&self) -> Vec<String> {
        let services: BTreeSet<String> = self.targets.iter().map(|t| t.service.clone()).collect();
        services.into_iter().collect()
    }

    async fn run(self: Box<Self>, sink: DiscoverySink) {
        let name = self.name();
        let Self {
            config,
            targets,
            resolver,
        } = *self;
        let (reports, mut inbox) = tokio::sync::mpsc::unbounded_channel();
        // Each target runs on its own schedule; dropping the set (on return) stops them.
        let mut tasks = tokio::task::JoinSet::new();
        for (index, target) in targets.iter().enumerate() {
            tasks.spawn(target_loop(
                index,
                target.clone(),
                resolver.clone(),
                config.clone(),
                sink.clone(),
                reports.clone(),
            ));
        }
        drop(reports);
        let mut state = Coordinator::new(name, &targets);
        loop {
            tokio::select! {
                _ = sink.closed() => return,
                report = inbox.recv() => match report {
                    Some(report) => state.apply(report, &sink),
                    None => return,
                },
            }
        }
    }
}

/// Resolves one target forever, reporting every outcome, waiting TTL or backoff between.
async fn target_loop(
    index: usize,
    target: DnsTarget,
    resolver: TokioResolver,
    config: DnsConfig,
    sink: DiscoverySink,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    // Kept across failed resolutions: a failure reads no records, so it neither forgets a
    // host's addresses nor makes a known bad record new again.
    let mut memory = TargetMemory::default();
    let mut answered = false;
    loop {
        let resolved = resolve(&resolver, &config, &target, &memory.hosts)
            .await
            .and_then(|answer| hold_back_if_lossy(answer, answered));
        let (outcome, delay) = match resolved {
            Ok(mut answer) => {
                answered = true;
                memory.remember(&mut answer, &sink);
                let refresh = config.refresh_after(answer.ttl);
                if answer.unresolved.is_empty() {
                    backoff.reset();
                    (Outcome::Complete(answer.endpoints), refresh)
                } else {
                    // Retried like a failure, but never later than the answer's TTL.
                    let delay = backoff.next_delay().min(refresh);
                    let reason = unresolved_reason(&target, &answer.unresolved, &memory.hosts);
                    tracing::warn!(service = %target.service, name = %target.name, %reason, retry_in = ?delay,
                        "DNS resolution incomplete: applying the rest of the answer");
                    let endpoints = answer.endpoints;
                    (Outcome::Partial { endpoints, reason }, delay)
                }
            }
            Err(reason) => {
                let delay = backoff.next_delay();
                tracing::warn!(service = %target.service, name = %target.name, %reason, retry_in = ?delay,
                    "DNS resolution failed: keeping the last answer");
                (Outcome::Failed(reason), delay)
            }
        };
        if reports
            .send(Report {
                target: index,
                outcome,
            })
            .is_err()
        {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

/// `answer`, unless it is partial in a way that could lose membership: a failing host has no
/// last addresses (new in the SRV set, or never resolved) and either the target already had
/// an answer (publishing would drop what that host replaces) or nothing resolved at all.
/// Then the resolution counts as failed and the last answer stays.
fn hold_back_if_lossy(answer: Answer, answered: bool) -> Result<Answer, String> {
    let unknown: Vec<String> = answer
        .unresolved
        .iter()
        .filter(|(host, _)| !answer.hosts.contains_key(host))
        .map(|(host, error)| format!("SRV target {host} did not resolve: {error}"))
        .collect();
    if unknown.is_empty() || (!answered && !answer.endpoints.is_empty()) {
        return Ok(answer);
    }
    Err(unknown.join("; "))
}

/// Why an answer is partial: the target, and each unresolved host with whether it kept its
/// last known addresses.
fn unresolved_reason(
    target: &DnsTarget,
    unresolved: &[(Name, String)],
    kept: &BTreeMap<Name, Vec<IpAddr>>,
) -> String {
    let hosts: Vec<String> = unresolved
        .iter()
        .map(|(host, error)| {
            let keeps = if kept.get(host).is_some_and(|ips| !ips.is_empty()) {
                "keeping its last addresses"
            } else {
                "no last addresses"
            };
            format!("SRV target {host} did not resolve ({keeps}): {error}")
        })
        .collect();
    format!("{}: {}", target.name, hosts.join("; "))
}

/// Merges the targets' answers per service, publishes changes, and reports health.
struct Coordinator {
    name: String,
    services: Vec<String>,
    /// Per target: its last good answer (`None` before the first).
    answers: Vec<Option<Vec<Endpoint>>>,
    /// Per target: whether its last attempt failed, and whether it was attempted at all.
    failing: Vec<bool>,
    attempted: Vec<bool>,
    published: BTreeMap<String, Vec<Endpoint>>,
    degraded: bool,
}

impl Coordinator {
    fn new(name: String, targets: &[DnsTarget]) -> Self {
        Self {
            name,
            services: targets.iter().map(|t| t.service.clone()).collect(),
            answers: vec![None; targets.len()],
            failing: vec![false; targets.len()],
            attempted: vec![false; targets.len()],
            published: BTreeMap::new(),
            degraded: false,
        }
    }

    fn apply(&mut self, report: Report, sink: &DiscoverySink) {
        let index = report.target;
        self.attempted[index] = true;
        let failure = match report.outcome {
            Outcome::Complete(endpoints) => {
                self.answers[index] = Some(endpoints);
                self.publish(&self.services[index].clone(), sink);
                None
            }
            // The answer applies, and the target stays failing until it is complete.
            Outcome::Partial { endpoints, reason } => {
                self.answers[index] = Some(endpoints);
                self.publish(&self.services[index].clone(), sink);
                Some(reason)
            }
            Outcome::Failed(reason) => Some(reason),
        };
        self.failing[index] = failure.is_some();
        if let Some(reason) = failure {
            if !self.degraded {
                self.degraded = true;
                sink.set_health(SourceHealth::Degraded {
                    reason: format!("{}: {reason}", self.name),
                });
            }
        } else if !self.failing.contains(&true) && !self.attempted.contains(&false) {
            self.degraded = false;
            sink.set_health(SourceHealth::Healthy);
        }
    }

    /// Publishes the union of `service`'s target answers if it changed.
    fn publish(&mut self, service: &str, sink: &DiscoverySink) {
        let mut merged: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        let mut known = false;
        for (answer, _) in self
            .answers
            .iter()
            .zip(&self.services)
            .filter(|(_, s)| s.as_str() == service)
        {
            if let Some(endpoints) = answer {
                known = true;
                for endpoint in endpoints {
                    merged.entry(endpoint.address).or_insert_with(|| endpoint.clone());
                }
            }
        }
        if !known {
            return;
        }
        let endpoints: Vec<Endpoint> = merged.into_values().collect();
        if self.published.get(service) == Some(&endpoints) {
            return;
        }
        tracing::debug!(source = %self.name, %service, endpoints = endpoints.len(), "DNS membership changed");
        self.published.insert(service.to_owned(), endpoints.clone());
        sink.publish(MembershipUpdate::Snapshot {
            service: service.to_owned(),
            endpoints,
        });
    }
}

// ===== resolution =====

/// A lookup's records, or "authoritatively none" (with the negative TTL, if known), or a
/// failure.
enum Records {
    Found(hickory_resolver::lookup::Lookup),
    None(Option<Duration>),
}

async fn lookup(resolver: &TokioResolver, name: &str, kind: RecordType) -> Result<Records, String> {
    match resolver.lookup(name, kind).await {
        Ok(lookup) => Ok(Records::Found(lookup)),
        Err(error) => match negative_ttl(&error) {
            Some(ttl) => Ok(Records::None(ttl)),
            None => Err(format!("{kind} lookup of {name}: {error}")),
        },
    }
}

/// `Some` when `error` is an authoritative "no such records": NXDOMAIN, or NODATA with the
/// zone's SOA and no referral (a NOERROR answer that only points to other name servers is a
/// lame or misconfigured server, not "no instances"). The negative TTL when the answer
/// carried one.
fn negative_ttl(error: &NetError) -> Option<Option<Duration>> {
    use hickory_resolver::proto::op::ResponseCode;
    match error {
        NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(none))
            if none.response_code == ResponseCode::NXDomain
                || (none.response_code == ResponseCode::NoError
                    && none.soa.is_some()
                    && none.ns.is_none()) =>
        {
            Some(none.negative_ttl.map(|s| Duration::from_secs(u64::from(s))))
        }
        _ => None,
    }
}

/// Resolves `target` once; `known_hosts` are the SRV target hosts' last known addresses
/// (used for a host whose lookup fails).
async fn resolve(
    resolver: &TokioResolver,
    config: &DnsConfig,
    target: &DnsTarget,
    known_hosts: &BTreeMap<Name, Vec<IpAddr>>,
) -> Result<Answer, String> {
    let (kind, port) = match target.kind {
        DnsTargetKind::A { port } => (RecordType::A, port),
        DnsTargetKind::Aaaa { port } => (RecordType::AAAA, port),
        DnsTargetKind::Srv => return resolve_srv(resolver, config, target, known_hosts).await,
    };
    let lookup = match lookup(resolver, &target.name, kind).await? {
        Records::Found(lookup) => lookup,
        Records::None(ttl) => return Ok(Answer::empty(ttl.unwrap_or(config.min_refresh))),
    };
    let mut ttl = u32::MAX;
    let mut endpoints = Vec::new();
    let mut malformed = BTreeSet::new();
    for record in lookup.answers() {
        let ip = match &record.data {
            RData::A(a) if kind == RecordType::A => IpAddr::V4(a.0),
            RData::AAAA(aaaa) if kind == RecordType::AAAA => IpAddr::V6(aaaa.0),
            _ => continue, // CNAMEs on the way
        };
        ttl = ttl.min(record.ttl);
        if let Some(endpoint) = checked(
            Endpoint::new(SocketAddr::new(ip, port), None),
            target,
            &mut malformed,
        ) {
            endpoints.push(endpoint);
        }
    }
    Ok(Answer {
        endpoints,
        ttl: ttl_of(ttl, config),
        unresolved: Vec::new(),
        malformed,
        hosts: BTreeMap::new(),
    })
}

impl Answer {
    /// An authoritative "no records", valid for `ttl`.
    fn empty(ttl: Duration) -> Self {
        Self {
            endpoints: Vec::new(),
            ttl,
            unresolved: Vec::new(),
            malformed: BTreeSet::new(),
            hosts: BTreeMap::new(),
        }
    }
}

fn ttl_of(ttl: u32, config: &DnsConfig) -> Duration {
    if ttl == u32::MAX {
        config.min_refresh
    } else {
        Duration::from_secs(u64::from(ttl))
    }
}

/// `endpoint` if it can receive traffic; else described into `malformed`.
fn checked(endpoint: Endpoint, target: &DnsTarget, malformed: &mut BTreeSet<String>) -> Option<Endpoint> {
    match endpoint.validate() {
        Ok(()) => Some(endpoint),
        Err(error) => {
            malformed.insert(format!("{} ({}): {error}", target.name, target.service));
            None
        }
    }
}

async fn resolve_srv(
    resolver: &TokioResolver,
    config: &DnsConfig,
    target: &DnsTarget,
    known_hosts: &BTreeMap<Name, Vec<IpAddr>>,
) -> Result<Answer, String> {
    let lookup = match lookup(resolver, &target.name, RecordType::SRV).await? {
        Records::Found(lookup) => lookup,
        Records::None(ttl) => return Ok(Answer::empty(ttl.unwrap_or(config.min_refresh))),
    };
    let mut ttl = u32::MAX;
    let mut records: Vec<(u16, u16, u16, Name)> = Vec::new();
    for record in lookup.answers() {
        if let RData::SRV(srv) = &record.data {
            ttl = ttl.min(record.ttl);
            if !srv.target.is_root() {
                records.push((srv.priority, srv.weight, srv.port, srv.target.clone()));
            }
        }
    }
    if config.lowest_srv_priority_only {
        if let Some(lowest) = records.iter().map(|r| r.0).min() {
            records.retain(|r| r.0 == lowest);
        }
    }
    // Most preferred first: an address listed twice keeps its best record.
    records.sort_by_key(|r| (r.0, std::cmp::Reverse(r.1)));
    let named: BTreeSet<&Name> = records.iter().map(|r| &r.3).collect();
    // Addresses of the target hosts: from the additional section, else asked for.
    let mut hosts: BTreeMap<Name, Vec<IpAddr>> = BTreeMap::new();
    for record in lookup.additionals() {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if named.contains(&record.name) {
            ttl = ttl.min(record.ttl);
            hosts.entry(record.name.clone()).or_default().push(ip);
        }
    }
    // The others, concurrently. A host whose lookup fails keeps its last known addresses
    // (if any) and makes the answer partial; it never fails the whole target.
    let missing: Vec<&Name> = named
        .into_iter()
        .filter(|host| !hosts.contains_key(*host))
        .collect();
    // Concurrently on this task (no spawn), at most MAX_CONCURRENT_HOST_LOOKUPS at once,
    // results in the order of `missing`.
    let pending: Vec<_> = missing.iter().map(|host| resolve_host(resolver, host)).collect();
    let lookups: Vec<_> = futures_util::stream::iter(pending)
        .buffered(MAX_CONCURRENT_HOST_LOOKUPS)
        .collect()
        .await;
    let mut unresolved = Vec::new();
    for (host, result) in missing.into_iter().zip(lookups) {
        match result {
            Ok((ips, host_ttl)) => {
                ttl = ttl.min(host_ttl);
                hosts.insert(host.clone(), ips);
            }
            Err(error) => {
                if let Some(ips) = known_hosts.get(host) {
                    hosts.insert(host.clone(), ips.clone());
                }
                unresolved.push((host.clone(), error));
            }
        }
    }
    // SRV priorities become priority levels by rank: the lowest value is level 0, the next
    // level 1, ... (so 10/20/30 are levels 0/1/2), at most `MAX_PRIORITY`.
    let mut priorities: Vec<u16> = records.iter().map(|r| r.0).collect();
    priorities.dedup(); // sorted above
    let level_of = |p: u16| {
        let rank = priorities.binary_search(&p).unwrap_or(0) as u32;
        rank.min(crate::endpoint::MAX_PRIORITY)
    };
    let mut endpoints: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    let mut malformed = BTreeSet::new();
    for (priority, weight, port, host) in records {
        let host_text = host.to_ascii();
        // `None`: a host that failed with no last addresses; it contributes nothing yet.
        let Some(ips) = hosts.get(&host) else { continue };
        if ips.is_empty() {
            malformed.insert(format!(
                "{} ({}): SRV target {host_text} has no addresses",
                target.name, target.service
            ));
            continue;
        }
        let metadata = EndpointMetadata::new()
            .with_weight(u32::from(weight.max(1)))
            .with_priority(level_of(priority))
            .with_tag(TAG_PRIORITY, priority.to_string())
            .with_tag(TAG_TARGET, host_text.trim_end_matches('.'));
        for ip in ips {
            let address = SocketAddr::new(*ip, port);
            if endpoints.contains_key(&address) {
                continue;
            }
            if let Some(endpoint) = checked(
                Endpoint::new(address, Some(metadata.clone())),
                target,
                &mut malformed,
            ) {
                endpoints.insert(address, endpoint);
            }
        }
    }
    Ok(Answer {
        endpoints: endpoints.into_values().collect(),
        ttl: ttl_of(ttl, config),
        unresolved,
        malformed,
        hosts,
    })
}

/// The addresses of an SRV target host (A, then AAAA if it has no A records), with their
/// TTL; none (with TTL `u32::MAX`) when it authoritatively has neither: the SRV record
/// points nowhere.
async fn resolve_host(resolver: &TokioResolver, host: &Name) -> Result<(Vec<IpAddr>, u32), String> {
    let name = host.to_ascii();
    for kind in [RecordType::A, RecordType::AAAA] {
        if let Records::Found(lookup) = lookup(resolver, &name, kind).await? {
            let mut ttl = u32::MAX;
            let ips: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|record| {
                    let ip = match &record.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                        _ => return None,
                    };
                    ttl = ttl.min(record.ttl);
                    Some(ip)
                })
                .collect();
            if !ips.is_empty() {
                return Ok((ips, ttl));
            }
        }
    }
    Ok((Vec::new(), u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<DnsDiscovery, Error>) -> String {
        match result {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    fn local() -> DnsConfig {
        DnsConfig::default().with_nameserver("127.0.0.1:5353".parse().unwrap())
    }

    #[test]
    fn bad_config_and_targets_are_typed_errors() {
        let target = || DnsTarget::a("api", "api.test.", 80);
        assert_eq!(field_of(DnsDiscovery::new(local(), [])), "dns.targets");
        assert_eq!(
            field_of(DnsDiscovery::new(
                local().with_refresh_bounds(Duration::from_secs(2), Duration::from_secs(1)),
                [target()]
            )),
            "dns.refresh"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                local().with_refresh_bounds(Duration::ZERO, Duration::from_secs(1)),
                [target()]
            )),
            "dns.refresh"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(local().with_jitter(f64::NAN), [target()])),
            "dns.jitter"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                local().with_timeout(Duration::ZERO),
                [target()]
            )),
            "dns.timeout"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                local().with_backoff(Duration::from_secs(2), Duration::from_secs(1)),
                [target()]
            )),
            "dns.backoff"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                DnsConfig::default().with_nameserver("0.0.0.0:53".parse().unwrap()),
                [target()]
            )),
            "dns.nameserver"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(local(), [DnsTarget::a("", "api.test.", 80)])),
            "dns.targets[0].service"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                local(),
                [target(), DnsTarget::a("api", "bad..name", 80)]
            )),
            "dns.targets[1].name"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(local(), [DnsTarget::srv("api", "")])),
            "dns.targets[0].name"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(
                local(),
                [DnsTarget::aaaa("api", "api.test.", 0)]
            )),
            "dns.targets[0].port"
        );
        assert_eq!(
            field_of(DnsDiscovery::new(local(), [target(), target()])),
            "dns.targets[1].name"
        );
        // Built outside a runtime: construction needs none.
        let ok = DnsDiscovery::new(local(), [target(), DnsTarget::srv("api", "_x._tcp.api.test.")]).unwrap();
        assert_eq!(ok.targets().len(), 2);
        assert_eq!(ok.name(), "dns:api.test.,_x._tcp.api.test.");
    }

    #[test]
    fn refresh_is_bounded_and_jittered() {
        let config = DnsConfig::default()
            .with_refresh_bounds(Duration::from_secs(2), Duration::from_secs(60))
            .with_jitter(0.1);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let d = config.refresh_after(Duration::from_secs(30));
            assert!(
                d >= Duration::from_secs(27) && d <= Duration::from_secs(33),
                "{d:?}"
            );
            seen.insert(d.as_millis());
            let low = config.refresh_after(Duration::ZERO);
            assert!(
                low >= Duration::from_secs(2) && low <= Duration::from_millis(2200),
                "{low:?}"
            );
            let high = config.refresh_after(Duration::from_secs(86_400));
            assert!(
                high >= Duration::from_secs(54) && high <= Duration::from_secs(60),
                "{high:?}"
            );
        }
        assert!(seen.len() > 10, "jitter spreads refreshes: {seen:?}");
    }
}
