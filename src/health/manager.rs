//! [`HealthCheckManager`]: schedules and runs active checks, keeps each endpoint's status.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::Instrument;

use super::probe::{Probe, Recheck};
use crate::config::health::HealthCheckConfig;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::handoff::queue::Ack;
use crate::handoff::{Command, HealthSink, HealthSource, MembershipSink, MembershipSource};
use crate::registry::ServiceRegistry;
use crate::stats::{HealthState, HealthStatus};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{DataArc, DataWeak, Mutex, random_below};

struct Target {
    endpoint: Endpoint,
    /// Distinguishes this registration from an earlier one of the same address.
    id: u64,
    registered_at: Instant,
    next_due: Instant,
    checking: bool,
    /// The probe asked for a re-check while a check was in progress: the next one is due as
    /// soon as this one is recorded (its answer may predate the change).
    recheck: bool,
    status: HealthStatus,
}

#[derive(Default)]
struct State {
    services: HashMap<DataArc<str>, HashMap<SocketAddr, Target, ahash::RandomState>, ahash::RandomState>,
    /// Services whose membership changed since the last reconciliation.
    pending: Vec<DataArc<str>>,
    next_id: u64,
}

/// A check to run.
struct Due {
    service: DataArc<str>,
    endpoint: Endpoint,
    id: u64,
}

struct Inner {
    config: HealthCheckConfig,
    registry: DataArc<ServiceRegistry>,
    probe: Probe,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    sinks: Mutex<Vec<DataWeak<dyn HealthSink>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stopped: AtomicBool,
    /// The TLS settings of services whose checks speak TLS.
    #[cfg(feature = "tls")]
    tls: Mutex<HashMap<String, crate::tls::ClientTls>>,
}

/// Active health checking of every endpoint of a registry.
///
/// Each endpoint is probed every `interval` (plus up to `jitter`, clamped to half the interval; first probes spread over one
/// interval), with at most `max_concurrent` probes at once and `timeout` enforced on each.
/// `unhealthy_threshold` failures in a row (not counting those in the endpoint's
/// `grace_period` after registration) make it unhealthy; `healthy_threshold` successes in a
/// row make it healthy again. Every balancer of the registry that was built with this
/// configuration gets its own manager, started by
/// [`IntegratedLoadBalancer::start`](crate::IntegratedLoadBalancer::start) when
/// `health_check.enabled` is set, and routes by its verdicts.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tai_loadbalancer::{Endpoint, HealthCheckConfig, HealthCheckManager, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = Arc::new(ServiceRegistry::new());
/// let endpoint = Endpoint::new("127.0.0.1:5001".parse()?, None);
/// registry.register("service", endpoint.clone()).await?;
///
/// let manager = HealthCheckManager::new(registry, HealthCheckConfig::default()).await?;
/// // Start health checking
/// manager.start().await?;
/// // Check if endpoint is healthy (new endpoints are, until checks say otherwise)
/// let healthy = manager.is_healthy("service", &endpoint).await?;
/// assert!(healthy);
/// // Get health status
/// let status = manager.get_health_status("service", &endpoint).await?;
/// assert!(status.in_grace_period);
/// manager.stop().await?;
/// # Ok(())
/// # }
/// ```
pub struct HealthCheckManager {
    inner: DataArc<Inner>,
}

impl HealthCheckManager {
    /// A manager for every endpoint of `registry`, not yet checking (see
    /// [`start`](Self::start)). Every registered endpoint starts healthy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the offending `health_check.*` field.
    pub async fn new(registry: DataArc<ServiceRegistry>, config: HealthCheckConfig) -> Result<Self, Error> {
        config.validate()?;
        let manager = Self::create(registry, config);
        manager.attach().await;
        Ok(manager)
    }

    /// Builds the manager without attaching it (the balancer attaches it itself).
    pub(crate) fn create(registry: DataArc<ServiceRegistry>, config: HealthCheckConfig) -> Self {
        Self {
            // The probe holds a weak reference to ask for re-checks: its background tasks
            // (watch streams) never keep the manager alive.
            inner: DataArc::new_cyclic(|inner| Inner {
                probe: Probe::new(&config, inner.clone() as DataWeak<dyn Recheck>),
                config,
                registry,
                state: Mutex::new(State::default()),
                wake: tokio::sync::Notify::new(),
                sinks: Mutex::new(Vec::new()),
                task: Mutex::new(None),
                stopped: AtomicBool::new(false),
                #[cfg(feature = "tls")]
                tls: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Follows the registry from now on (learning every endpoint it holds).
    pub(crate) fn attach(&self) -> impl Future<Output = ()> + use<> {
        let sink: DataWeak<dyn MembershipSink> =
            DataArc::downgrade(&self.inner) as DataWeak<dyn MembershipSink>;
        let attached = self.inner.registry.attach(sink);
        // The manager's own sink acknowledges at once and never fails.
        async move {
            let _ = attached.await;
        }
    }

    /// Tells `sink` about every transition from now on.
    pub(crate) fn subscribe(&self, sink: DataWeak<dyn HealthSink>) {
        self.inner.sinks.lock().push(sink);
    }

    /// The health source the control plane reads.
    pub(crate) fn source(&self) -> &dyn HealthSource {
        &*self.inner
    }

    /// Starts checking, on the current tokio runtime. Idempotent.
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] after [`stop`](Self::stop); [`Error::Runtime`] outside a tokio
    /// runtime.
    pub async fn start(&self) -> Result<(), Error> {
        self.start_now()
    }

    pub(crate) fn start_now(&self) -> Result<(), Error> {
        let mut task = self.inner.task.lock();
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        if task.is_some() {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Runtime {
            message: e.to_string(),
        })?;
        *task = Some(runtime.spawn(Inner::run(self.inner.clone())));
        tracing::debug!(
            interval_ms = self.inner.config.interval.as_millis() as u64,
            check = ?self.inner.config.check,
            "health checks started"
        );
        Ok(())
    }

    /// Stops checking (in-flight probes are abandoned, `Watch` streams closed). Statuses
    /// stay readable. Idempotent.
    pub async fn stop(&self) -> Result<(), Error> {
        self.stop_now();
        Ok(())
    }

    pub(crate) fn stop_now(&self) {
        // Release pairs with the Acquire in `start_now` and `is_closed`.
        self.inner.stopped.store(true, Ordering::Release);
        if let Some(task) = self.inner.task.lock().take() {
            task.abort();
            tracing::debug!("health checks stopped");
        }
        // After the flag, so a check still finishing cannot open a stream again.
        self.inner.probe.stop();
    }

    /// Whether checks are running.
    pub fn is_running(&self) -> bool {
        self.inner.task.lock().as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether `endpoint` of `service` is healthy by its checks.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`].
    pub async fn is_healthy(&self, service: &str, endpoint: &Endpoint) -> Result<bool, Error> {
        self.get_health_status(service, endpoint)
            .await
            .map(|s| s.is_healthy())
    }

    /// The check status of `endpoint` of `service`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownService`], [`Error::UnknownEndpoint`].
    pub async fn get_health_status(&self, service: &str, endpoint: &Endpoint) -> Result<HealthStatus, Error> {
        self.inner.reconcile();
        if let Some(target) = self
            .inner
            .state
            .lock()
            .services
            .get(service)
            .and_then(|t| t.get(&endpoint.address))
        {
            return Ok(self.inner.status_of(target, Instant::now()));
        }
        // Not tracked (checks disabled, so the manager does not follow the registry): a
        // registered endpoint is healthy and unchecked.
        let (_, endpoints) = self
            .inner
            .registry
            .membership(service)
            .ok_or_else(|| Error::unknown_service(service))?;
        if endpoints
            .binary_search_by(|e| e.address.cmp(&endpoint.address))
            .is_err()
        {
            return Err(Error::UnknownEndpoint {
                service: DataArc::from(crate::error::truncate(service)),
                address: endpoint.address,
            });
        }
        Ok(HealthStatus::new())
    }

    /// The configuration.
    pub fn config(&self) -> &HealthCheckConfig {
        &self.inner.config
    }

    /// Checks of `service` speak TLS with `tls` from the next check on (feature `tls`):
    /// `grpc` and `grpc_watch` checks over TLS (ALPN `h2`), `http` checks as HTTPS (ALPN
    /// `http/1.1`), with the same roots, identity and server names as the service's
    /// connections; TCP checks only connect. A handshake failure is a failed check whose
    /// reason ("certificate expired", "name mismatch", "unknown CA", ...) is the status's
    /// `last_error` and is logged. An open `Watch` stream keeps its connection; new ones use
    /// the current material.
    ///
    /// [`BalancedChannelBuilder::tls`](crate::BalancedChannelBuilder::tls) calls this for
    /// its service; call it yourself for services reached otherwise (a [`TlsConnector`]
    /// pool, say). Replaces the service's previous setting.
    ///
    /// [`TlsConnector`]: crate::TlsConnector
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tai_loadbalancer::{ClientTls, HealthCheckConfig, HealthCheckKind, HealthCheckManager, ServiceRegistry};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let ca = rcgen::generate_simple_self_signed(vec!["api.internal".into()])?.cert.pem();
    /// let config = HealthCheckConfig { enabled: true, check: HealthCheckKind::http("/healthz"), ..Default::default() };
    /// let manager = HealthCheckManager::new(Arc::new(ServiceRegistry::new()), config).await?;
    /// // HTTPS checks of "api", verifying the name api.internal.
    /// manager.set_tls("api", ClientTls::from_pem(ca.as_bytes(), None)?.with_server_name("api.internal")?);
    /// assert_eq!(manager.tls("api").unwrap().server_name(), Some("api.internal"));
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tls")]
    pub fn set_tls(&self, service: &str, tls: crate::tls::ClientTls) {
        self.inner.tls.lock().insert(service.to_owned(), tls);
    }

    /// The TLS settings checks of `service` use, if any (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls(&self, service: &str) -> Option<crate::tls::ClientTls> {
        self.inner.tls.lock().get(service).cloned()
    }

    /// Every service with TLS settings, and its settings, sorted by service (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls_services(&self) -> Vec<(String, crate::tls::ClientTls)> {
        let mut all: Vec<_> = self
            .inner
            .tls
            .lock()
            .iter()
            .map(|(s, t)| (s.clone(), t.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Drop for HealthCheckManager {
    fn drop(&mut self) {
        self.stop_now();
    }
}

impl fmt::Debug for HealthCheckManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheckManager")
            .field("check", &self.inner.probe)
            .field("interval", &self.inner.config.interval)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

// ===== impl CatchUnwind =====

/// A future that turns a panic while polling the inner future into `Err(message)`.
struct CatchUnwind<'a, T>(std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>);

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
                std::task::Poll::Ready(Err(message))
            }
        }
    }
}

// ===== impl Inner =====

impl Inner {
    fn status_of(&self, target: &Target, now: Instant) -> HealthStatus {
        let mut status = target.status.clone();
        status.in_grace_period =
            now.saturating_duration_since(target.registered_at) < self.config.grace_period;
        status
    }

    fn random_delay(max: Duration) -> Duration {
        let nanos = usize::try_from(max.as_nanos()).unwrap_or(usize::MAX);
        if nanos == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(random_below(nanos) as u64)
        }
    }

    /// Brings the targets of changed services in line with the registry.
    fn reconcile(&self) {
        let pending = std::mem::take(&mut self.state.lock().pending);
        if pending.is_empty() {
            return;
        }
        for service in pending {
            // Read the registry without holding our own lock (the registry calls into us).
            let membership = self.registry.membership(&service);
            let now = Instant::now();
            let mut state = self.state.lock();
            let State {
                services, next_id, ..
            } = &mut *state;
            match membership {
                None => {
                    services.remove(&service);
                }
                Some((_, endpoints)) => {
                    let targets = services.entry(service.clone()).or_default();
                    targets
                        .retain(|address, _| endpoints.binary_search_by(|e| e.address.cmp(address)).is_ok());
                    for endpoint in endpoints.iter() {
                        match targets.get_mut(&endpoint.address) {
                            Some(target) => target.endpoint = endpoint.clone(),
                            None => {
                                *next_id += 1;
                                targets.insert(
                                    endpoint.address,
                                    Target {
                                        endpoint: endpoint.clone(),
                                        id: *next_id,
                                        registered_at: now,
                                        // Spread first checks over one interval.
                                        next_due: now + Self::random_delay(self.config.interval),
                                        checking: false,
                                        recheck: false,
                                        status: HealthStatus::new(),
                                    },
                                );
                            }
                        }
                    }
                }
            }
        }
        // Close what the probe keeps (watch streams) for addresses no longer checked.
        let state = self.state.lock();
        self.probe
            .retain(|address| state.services.values().any(|t| t.contains_key(&address)));
    }

    /// Marks due targets as being checked and returns them, with the next due time.
    fn take_due(&self, now: Instant) -> (Vec<Due>, Option<Instant>) {
        let mut state = self.state.lock();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (service, targets) in &mut state.services {
            for target in targets.values_mut() {
                if target.checking {
                    continue;
                }
                if target.next_due <= now {
                    target.checking = true;
                    due.push(Due {
                        service: service.clone(),
                        endpoint: target.endpoint.clone(),
                        id: target.id,
                    });
                } else {
                    next = Some(next.map_or(target.next_due, |n| n.min(target.next_due)));
                }
            }
        }
        (due, next)
    }

    /// The scheduler: runs until the manager is stopped (aborted) or dropped.
    async fn run(inner: DataArc<Inner>) {
        let permits = DataArc::new(tokio::sync::Semaphore::new(inner.config.max_concurrent));
        let mut probes = tokio::task::JoinSet::new();
        loop {
            inner.reconcile();
            let (due, next) = inner.take_due(Instant::now());
            for due in due {
                let (inner, permits) = (inner.clone(), permits.clone());
                let span =
                    tracing::debug_span!("health_check", service = %due.service, endpoint = %due.endpoint);
                probes.spawn(
                    async move {
                        let Ok(_permit) = permits.acquire_owned().await else {
                            return;
                        };
                        inner.probe(due).await;
                    }
                    .instrument(span),
                );
            }
            while probes.try_join_next().is_some() {}
            let sleep =
                tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + inner.config.interval));
            tokio::select! {
                () = sleep => {}
                () = inner.wake.notified() => {}
                Some(_) = probes.join_next(), if !probes.is_empty() => {}
            }
        }
    }

    /// Runs one check and records its result.
    async fn probe(&self, due: Due) {
        let started = Instant::now();
        #[cfg(feature = "tls")]
        let tls = self.tls.lock().get(&*due.service).cloned();
        #[cfg(not(feature = "tls"))]
        let tls: Option<super::probe::Tls> = None;
        // A check that panics (a custom one with a bug) is a failed check with the panic's
        // message as its reason: the endpoint keeps being checked, and the scheduler, the
        // other checks and the balancer never see the panic.
        let check = CatchUnwind(Box::pin(self.probe.check(&due.endpoint, tls.as_ref())));
        let result = match tokio::time::timeout(self.config.timeout, check).await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => Err(format!("the check panicked: {panic}")),
            Err(_) => Err(format!("timed out after {:?}", self.config.timeout)),
        };
        let latency = started.elapsed();
        // Stopped while the check ran: it is abandoned, not recorded (a `Watch` check sees
        // its stream closed by `stop` and would otherwise count a failure).
        // Acquire pairs with the Release in `stop_now`.
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        if let Err(reason) = &result {
            tracing::debug!(%reason, latency_us = latency.as_micros() as u64, "health check failed");
        }
        if self.record(&due, result, latency) {
            self.notify(&due.service);
        }
        // The next check of this target may now be due earlier than the scheduler's sleep.
        self.wake.notify_one();
    }

    /// Applies a result; returns whether the endpoint changed state.
    fn record(&self, due: &Due, result: Result<(), String>, latency: Duration) -> bool {
        let now = Instant::now();
        let config = &self.config;
        let mut state = self.state.lock();
        let Some(target) = state
            .services
            .get_mut(&due.service)
            .and_then(|t| t.get_mut(&due.endpoint.address))
            .filter(|t| t.id == due.id)
        else {
            return false; // removed (or re-registered) while the check ran
        };
        target.checking = false;
        target.next_due = if std::mem::take(&mut target.recheck) {
            now
        } else {
            now + config.interval + Self::random_delay(config.effective_jitter())
        };
        let in_grace = now.saturating_duration_since(target.registered_at) < config.grace_period;
        let status = &mut target.status;
        status.checks += 1;
        status.last_check = Some(SystemTime::now());
        status.last_latency = Some(latency);
        let before = status.state;
        match result {
            Ok(()) => {
                status.consecutive_successes = status.consecutive_successes.saturating_add(1);
                status.consecutive_failures = 0;
                if status.state == HealthState::Unhealthy
                    && status.consecutive_successes >= config.healthy_threshold
                {
                    status.state = HealthState::Healthy;
                }
            }
            Err(reason) => {
                status.failed_checks += 1;
                status.last_error = Some(reason);
                status.consecutive_successes = 0;
                if !in_grace {
                    status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                    if status.state == HealthState::Healthy
                        && status.consecutive_failures >= config.unhealthy_threshold
                    {
                        status.state = HealthState::Unhealthy;
                    }
                }
            }
        }
        let changed = status.state != before;
        if changed {
            status.since = SystemTime::now();
            tracing::info!(
                service = %due.service,
                endpoint = %due.endpoint.address,
                state = ?status.state,
                last_error = status.last_error.as_deref().unwrap_or(""),
                "health state changed"
            );
        }
        changed
    }

    fn notify(&self, service: &DataArc<str>) {
        let sinks: Vec<_> = {
            let mut sinks = self.sinks.lock();
            sinks.retain(|s| s.strong_count() > 0);
            sinks.iter().filter_map(DataWeak::upgrade).collect()
        };
        for sink in sinks {
            sink.health_changed(service);
        }
    }
}

impl Recheck for Inner {
    fn recheck(&self, address: SocketAddr) {
        let now = Instant::now();
        let mut found = false;
        {
            let mut state = self.state.lock();
            for target in state.services.values_mut().filter_map(|t| t.get_mut(&address)) {
                found = true;
                if target.checking {
                    target.recheck = true;
                } else {
                    target.next_due = now;
                }
            }
        }
        if found {
            tracing::debug!(%address, "health re-check requested");
            self.wake.notify_one();
        }
    }
}

impl MembershipSink for Inner {
    fn submit(&self, command: Command) -> Ack {
        if let Command::Changed(service) = command {
            let mut state = self.state.lock();
            if !state.pending.contains(&service) {
                state.pending.push(service);
            }
        }
        self.wake.notify_one();
        Ack::resolved()
    }

    fn help(&self) {
        // Nothing on the writer's path: the scheduler, woken by `submit`, reconciles at once
        // (and coalesces a burst of changes into one read of the membership).
    }

    fn is_closed(&self) -> bool {
        // A stopped manager keeps following the registry: its statuses stay readable.
        false
    }
}

impl HealthSource for Inner {
    fn unhealthy(&self, service: &str) -> Vec<SocketAddr> {
        let state = self.state.lock();
        state.services.get(service).map_or_else(Vec::new, |targets| {
            targets
                .iter()
                .filter(|(_, t)| t.status.state == HealthState::Unhealthy)
                .map(|(a, _)| *a)
                .collect()
        })
    }

    fn status(&self, service: &str, address: SocketAddr) -> Option<HealthStatus> {
        let state = self.state.lock();
        let target = state.services.get(service)?.get(&address)?;
        Some(self.status_of(target, Instant::now()))
    }
}
