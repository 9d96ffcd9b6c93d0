//! Health-aware routing against real servers on loopback, started by the tests themselves: a
//! tokio TCP listener, a hyper HTTP server, a tonic server with tonic-health. Plus the state
//! machine (grace period, thresholds, timeouts, bounded concurrency, jitter) with custom
//! checks under paused time, outlier ejection with back-off, panic mode, slow start, and the
//! consistent-hash guarantee that health flaps move only the flapping endpoint's keys.
#![cfg(feature = "runtime")]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{ep, key};
use tai_loadbalancer::{
    Endpoint, EndpointHealth, Error, HealthCheck, HealthCheckConfig, HealthCheckKind, HealthState,
    IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, OutlierDetectionConfig,
    ServiceRegistry, SlowStartConfig,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ===== helpers =====

/// A TCP backend counting accepted connections; `kill` closes the listening socket.
struct TcpBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpBackend {
    async fn start(addr: SocketAddr, accepted: Arc<AtomicUsize>) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { addr, accepted, task }
    }

    async fn kill(self) -> (SocketAddr, Arc<AtomicUsize>) {
        self.task.abort();
        let _ = self.task.await; // the listener is closed once the task is gone
        (self.addr, self.accepted)
    }
}

fn fast_checks(check: HealthCheckKind) -> HealthCheckConfig {
    HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        grace_period: Duration::ZERO,
        jitter: Duration::from_millis(10),
        max_concurrent: 16,
        check,
    }
}

async fn balancer(
    endpoints: Vec<Endpoint>,
    strategy: LoadBalancingStrategy,
    config: LoadBalancerConfig,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch("svc", endpoints).await.unwrap();
    let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    (registry, lb)
}

fn routable(lb: &IntegratedLoadBalancer) -> Vec<SocketAddr> {
    lb.service("svc")
        .unwrap()
        .endpoints()
        .into_iter()
        .filter(|(_, r)| *r)
        .map(|(e, _)| e.address)
        .collect()
}

/// Polls `cond` every 5 ms; returns how long it took, or panics after `limit`.
async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

// ===== TCP =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_excludes_a_dead_backend_and_restores_it() {
    let a = TcpBackend::start("127.0.0.1:0".parse().unwrap(), Arc::default()).await;
    let b = TcpBackend::start("127.0.0.1:0".parse().unwrap(), Arc::default()).await;
    let health = fast_checks(HealthCheckKind::Tcp);
    let bound = health.interval * health.unhealthy_threshold + health.timeout;
    let config = LoadBalancerConfig {
        health_check: health,
        ..Default::default()
    };
    let (_registry, lb) = balancer(
        vec![Endpoint::new(a.addr, None), Endpoint::new(b.addr, None)],
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    // Routable at once, before any check ran.
    assert_eq!(routable(&lb).len(), 2);
    wait_for(Duration::from_secs(2), "first checks", || {
        a.accepted.load(Ordering::SeqCst) > 0
    })
    .await;

    let (addr, accepted) = a.kill().await;
    let took = wait_for(
        Duration::from_secs(3),
        "the dead backend to leave routing",
        || !routable(&lb).contains(&addr),
    )
    .await;
    // interval x unhealthy_threshold + timeout, plus scheduling slack on a shared machine.
    assert!(
        took < bound + Duration::from_millis(400),
        "took {took:?} (bound {bound:?})"
    );
    for _ in 0..50 {
        assert_eq!(lb.pick("svc").unwrap().address(), b.addr);
    }
    let status = lb
        .health_checks()
        .get_health_status("svc", &Endpoint::new(addr, None))
        .await
        .unwrap();
    assert_eq!(status.state, HealthState::Unhealthy);
    assert!(
        status.last_error.as_deref().unwrap_or("").contains("connect"),
        "{status:?}"
    );

    // Restart on the same port: back after healthy_threshold successes.
    let revived = TcpBackend::start(addr, accepted).await;
    let before = revived.accepted.load(Ordering::SeqCst);
    wait_for(Duration::from_secs(3), "the backend to return", || {
        routable(&lb).contains(&addr)
    })
    .await;
    assert!(
        revived.accepted.load(Ordering::SeqCst) - before >= 2,
        "returned before two successful checks"
    );
    let metrics = lb.metrics();
    let m = metrics.service("svc").unwrap().endpoint(addr).unwrap();
    assert_eq!(m.health, EndpointHealth::Healthy);
    assert!(m.health_check.as_ref().unwrap().checks >= 4);
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_stops_its_checks() {
    let a = TcpBackend::start("127.0.0.1:0".parse().unwrap(), Arc::default()).await;
    let b = TcpBackend::start("127.0.0.1:0".parse().unwrap(), Arc::default()).await;
    let config = LoadBalancerConfig {
        health_check: fast_checks(HealthCheckKind::Tcp),
        ..Default::default()
    };
    let (registry, lb) = balancer(
        vec![Endpoint::new(a.addr, None), Endpoint::new(b.addr, None)],
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    wait_for(Duration::from_secs(2), "checks of a", || {
        a.accepted.load(Ordering::SeqCst) >= 2
    })
    .await;
    registry
        .deregister("svc", &Endpoint::new(a.addr, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // a check already started may land
    let after = a.accepted.load(Ordering::SeqCst);
    let b_before = b.accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.accepted.load(Ordering::SeqCst),
        after,
        "a removed endpoint was still probed"
    );
    assert!(
        b.accepted.load(Ordering::SeqCst) > b_before,
        "the remaining endpoint is still checked"
    );
    lb.stop().await.unwrap();
}

// ===== HTTP =====

async fn http_backend(status: Arc<AtomicU16>) -> SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let code = if req.uri().path() == "/healthz" {
                        status.load(Ordering::SeqCst)
                    } else {
                        404
                    };
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::from("ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_status_code() {
    let status = Arc::new(AtomicU16::new(200));
    let a = http_backend(status.clone()).await;
    let b = http_backend(Arc::new(AtomicU16::new(200))).await;
    let config = LoadBalancerConfig {
        health_check: fast_checks(HealthCheckKind::http("/healthz")),
        ..Default::default()
    };
    let (_r, lb) = balancer(
        vec![Endpoint::new(a, None), Endpoint::new(b, None)],
        LoadBalancingStrategy::Random,
        config,
    )
    .await;
    let checked = lb.health_checks();
    wait_for(Duration::from_secs(2), "a passing HTTP check", || {
        futures_ready(checked.get_health_status("svc", &Endpoint::new(a, None))).is_ok_and(|s| s.checks > 0)
    })
    .await;
    status.store(503, Ordering::SeqCst);
    wait_for(Duration::from_secs(2), "503 to exclude a", || {
        !routable(&lb).contains(&a)
    })
    .await;
    let s = checked
        .get_health_status("svc", &Endpoint::new(a, None))
        .await
        .unwrap();
    assert!(s.last_error.unwrap().contains("503"));
    status.store(204, Ordering::SeqCst);
    wait_for(Duration::from_secs(2), "204 to restore a", || {
        routable(&lb).contains(&a)
    })
    .await;
    lb.stop().await.unwrap();
}

/// Polls an always-ready future once (status queries never wait).
fn futures_ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("status query was not ready"),
    }
}

// ===== gRPC =====

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_follows_serving_status() {
    use tonic_health::ServingStatus;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("greeter", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let other = TcpBackend::start("127.0.0.1:0".parse().unwrap(), Arc::default()).await;
    let mut health = fast_checks(HealthCheckKind::grpc("greeter"));
    health.timeout = Duration::from_millis(80);
    let config = LoadBalancerConfig {
        health_check: health,
        panic_threshold_percent: 0,
        ..Default::default()
    };
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", Endpoint::new(addr, None)).await.unwrap();
    registry
        .register("svc", Endpoint::new(other.addr, None))
        .await
        .unwrap();
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    // The plain TCP listener does not speak gRPC: it leaves routing.
    wait_for(Duration::from_secs(3), "the non-gRPC endpoint to fail", || {
        !routable(&lb).contains(&other.addr)
    })
    .await;
    assert!(routable(&lb).contains(&addr));
    reporter
        .set_service_status("greeter", ServingStatus::NotServing)
        .await;
    wait_for(Duration::from_secs(3), "NOT_SERVING to exclude", || {
        routable(&lb).is_empty()
    })
    .await;
    assert!(matches!(
        lb.pick("svc"),
        Err(Error::NoHealthyEndpoints { total: 2, .. })
    ));
    let s = lb
        .health_checks()
        .get_health_status("svc", &Endpoint::new(addr, None))
        .await
        .unwrap();
    assert!(s.last_error.unwrap().contains("NOT_SERVING"));
    reporter
        .set_service_status("greeter", ServingStatus::Serving)
        .await;
    wait_for(Duration::from_secs(3), "SERVING to restore", || {
        routable(&lb) == vec![addr]
    })
    .await;
    lb.stop().await.unwrap();
}

// ===== gRPC health Watch =====

/// A gRPC server on a loopback ephemeral port serving `routes`; stops with the runtime.
#[cfg(feature = "grpc")]
async fn serve_grpc(routes: tonic::service::Routes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// The service whose health the `Watch` tests report through tonic-health.
#[cfg(feature = "grpc")]
struct Watched;

#[cfg(feature = "grpc")]
impl tonic::server::NamedService for Watched {
    const NAME: &'static str = "test.Watched";
}

/// Checks every 100 ms, thresholds of one.
#[cfg(feature = "grpc")]
fn watch_checks(check: HealthCheckKind) -> HealthCheckConfig {
    HealthCheckConfig {
        unhealthy_threshold: 1,
        healthy_threshold: 1,
        timeout: Duration::from_millis(80),
        ..fast_checks(check)
    }
}

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_push_is_reflected_well_within_the_interval() {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_serving::<Watched>().await;
    let addr = serve_grpc(tonic::service::Routes::new(health_service)).await;
    let config = LoadBalancerConfig {
        health_check: HealthCheckConfig {
            enabled: true,
            // Long: a scheduled check could not explain a change seen within a second.
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            grace_period: Duration::ZERO,
            jitter: Duration::from_millis(100),
            max_concurrent: 4,
            check: HealthCheckKind::grpc_watch(<Watched as tonic::server::NamedService>::NAME),
        },
        panic_threshold_percent: 0,
        ..Default::default()
    };
    let endpoint = Endpoint::new(addr, None);
    let (_registry, lb) = balancer(vec![endpoint.clone()], LoadBalancingStrategy::RoundRobin, config).await;
    let status = || futures_ready(lb.health_checks().get_health_status("svc", &endpoint)).unwrap();
    // The first check (first checks are spread over one interval) opens the stream.
    wait_for(Duration::from_secs(7), "the first check", || status().checks >= 1).await;
    let first = status();
    assert!(first.is_healthy(), "{first:?}");

    reporter.set_not_serving::<Watched>().await;
    let took = wait_for(Duration::from_secs(3), "the NOT_SERVING push to exclude", || {
        routable(&lb).is_empty()
    })
    .await;
    assert!(took < Duration::from_secs(1), "NOT_SERVING took {took:?}");
    let s = status();
    assert_eq!(s.state, HealthState::Unhealthy);
    assert!(s.last_error.as_deref().unwrap().contains("NOT_SERVING"), "{s:?}");
    assert_eq!(s.checks, first.checks + 1, "one re-check per push: {s:?}");
    assert!(matches!(lb.pick("svc"), Err(Error::NoHealthyEndpoints { .. })));

    reporter.set_serving::<Watched>().await;
    let took = wait_for(Duration::from_secs(3), "the SERVING push to restore", || {
        routable(&lb) == vec![addr]
    })
    .await;
    assert!(took < Duration::from_secs(1), "SERVING took {took:?}");
    assert!(status().is_healthy());
    lb.stop().await.unwrap();
}

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_asks_about_its_own_service_name() {
    use tai_loadbalancer::HealthCheckManager;
    use tonic_health::ServingStatus;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("a", ServingStatus::Serving).await;
    reporter.set_service_status("b", ServingStatus::NotServing).await;
    let addr = serve_grpc(tonic::service::Routes::new(health_service)).await;
    let endpoint = Endpoint::new(addr, None);
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", endpoint.clone()).await.unwrap();
    let manager = |service: &str| {
        HealthCheckManager::new(
            registry.clone(),
            watch_checks(HealthCheckKind::grpc_watch(service)),
        )
    };
    let (a, b, unknown) = (
        manager("a").await.unwrap(),
        manager("b").await.unwrap(),
        manager("c").await.unwrap(),
    );
    for m in [&a, &b, &unknown] {
        m.start().await.unwrap();
    }
    let status = |m: &HealthCheckManager| futures_ready(m.get_health_status("svc", &endpoint)).unwrap();
    wait_for(Duration::from_secs(3), "first checks", || {
        [&a, &b, &unknown].iter().all(|m| status(m).checks >= 2)
    })
    .await;
    assert!(status(&a).is_healthy(), "{:?}", status(&a));
    let sb = status(&b);
    assert_eq!(sb.state, HealthState::Unhealthy);
    assert!(sb.last_error.unwrap().contains("NOT_SERVING"));
    // tonic-health answers NOT_FOUND for a name it does not know: a failure, no fallback.
    assert_eq!(status(&unknown).state, HealthState::Unhealthy);

    reporter.set_service_status("a", ServingStatus::NotServing).await;
    reporter.set_service_status("b", ServingStatus::Serving).await;
    wait_for(Duration::from_secs(3), "the statuses to swap", || {
        !status(&a).is_healthy() && status(&b).is_healthy()
    })
    .await;
    assert!(status(&a).last_error.unwrap().contains("NOT_SERVING"));
}

/// A `grpc.health.v1.Health` service whose status the test sets, which can refuse `Watch`,
/// counting calls and the `Watch` streams open.
#[cfg(feature = "grpc")]
struct ScriptedHealth {
    status: tokio::sync::watch::Sender<tonic_health::pb::health_check_response::ServingStatus>,
    watch_unimplemented: bool,
    checks: AtomicUsize,
    watches: AtomicUsize,
    open_streams: Arc<AtomicUsize>,
}

#[cfg(feature = "grpc")]
impl ScriptedHealth {
    fn new(watch_unimplemented: bool) -> Arc<Self> {
        use tonic_health::pb::health_check_response::ServingStatus;
        Arc::new(Self {
            status: tokio::sync::watch::Sender::new(ServingStatus::Serving),
            watch_unimplemented,
            checks: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            open_streams: Arc::default(),
        })
    }

    fn set(&self, status: tonic_health::pb::health_check_response::ServingStatus) {
        self.status.send_replace(status);
    }

    async fn serve(self: &Arc<Self>) -> SocketAddr {
        serve_grpc(tonic::service::Routes::new(
            tonic_health::pb::health_server::HealthServer::from_arc(self.clone()),
        ))
        .await
    }
}

/// Counts down an open `Watch` stream when the server drops it.
#[cfg(feature = "grpc")]
struct OpenStream(Arc<AtomicUsize>);

#[cfg(feature = "grpc")]
impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(feature = "grpc")]
#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for ScriptedHealth {
    async fn check(
        &self,
        _request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(tonic_health::pb::HealthCheckResponse {
            status: *self.status.borrow() as i32,
        }))
    }

    type WatchStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>
                + Send,
        >,
    >;

    async fn watch(
        &self,
        _request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use tokio_stream::StreamExt;

        self.watches.fetch_add(1, Ordering::SeqCst);
        if self.watch_unimplemented {
            return Err(tonic::Status::unimplemented("Watch is not implemented here"));
        }
        self.open_streams.fetch_add(1, Ordering::SeqCst);
        let open = OpenStream(self.open_streams.clone());
        let stream = tokio_stream::wrappers::WatchStream::new(self.status.subscribe()).map(move |status| {
            let _open = &open;
            Ok(tonic_health::pb::HealthCheckResponse {
                status: status as i32,
            })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_falls_back_to_check_when_watch_is_unimplemented() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let server = ScriptedHealth::new(true);
    let addr = server.serve().await;
    let endpoint = Endpoint::new(addr, None);
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", endpoint.clone()).await.unwrap();
    let manager =
        tai_loadbalancer::HealthCheckManager::new(registry, watch_checks(HealthCheckKind::grpc_watch("")))
            .await
            .unwrap();
    manager.start().await.unwrap();
    let status = || futures_ready(manager.get_health_status("svc", &endpoint)).unwrap();
    // Three answered checks (a check may time out on a loaded machine: the short timeout
    // of these tests is not what is tested here).
    wait_for(Duration::from_secs(3), "checks", || {
        let s = status();
        s.checks - s.failed_checks.min(s.checks) >= 3 && s.is_healthy()
    })
    .await;
    assert!(server.checks.load(Ordering::SeqCst) >= 3);

    server.set(ServingStatus::NotServing);
    wait_for(Duration::from_secs(3), "NOT_SERVING by Check", || {
        !status().is_healthy()
    })
    .await;
    assert!(status().last_error.unwrap().contains("NOT_SERVING"));
    server.set(ServingStatus::Serving);
    wait_for(Duration::from_secs(3), "SERVING by Check", || {
        status().is_healthy()
    })
    .await;
    assert_eq!(
        server.watches.load(Ordering::SeqCst),
        1,
        "UNIMPLEMENTED is remembered for the endpoint"
    );
    manager.stop().await.unwrap();
}

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_keeps_one_stream_and_closes_it_with_the_endpoint_or_the_checks() {
    let server = ScriptedHealth::new(false);
    let addr = server.serve().await;
    let endpoint = Endpoint::new(addr, None);
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", endpoint.clone()).await.unwrap();
    let manager = tai_loadbalancer::HealthCheckManager::new(
        registry.clone(),
        watch_checks(HealthCheckKind::grpc_watch("")),
    )
    .await
    .unwrap();
    manager.start().await.unwrap();
    let status = || futures_ready(manager.get_health_status("svc", &endpoint)).unwrap();
    let open = || server.open_streams.load(Ordering::SeqCst);
    wait_for(Duration::from_secs(3), "checks", || status().checks >= 5).await;
    assert!(status().is_healthy());
    assert_eq!(
        server.watches.load(Ordering::SeqCst),
        1,
        "one stream serves every check"
    );
    assert_eq!(
        server.checks.load(Ordering::SeqCst),
        0,
        "no Check while Watch works"
    );
    assert_eq!(open(), 1);

    // An endpoint that leaves the registry loses its stream.
    registry.deregister("svc", &endpoint).await.unwrap();
    wait_for(Duration::from_secs(3), "the stream to close", || open() == 0).await;
    // Back, it gets a new one.
    registry.register("svc", endpoint.clone()).await.unwrap();
    wait_for(Duration::from_secs(3), "a new stream", || open() == 1).await;
    // Stopping the checks closes it too.
    manager.stop().await.unwrap();
    wait_for(Duration::from_secs(3), "the stream to close on stop", || {
        open() == 0
    })
    .await;

    // And so does dropping a manager.
    let manager = tai_loadbalancer::HealthCheckManager::new(
        registry.clone(),
        watch_checks(HealthCheckKind::grpc_watch("")),
    )
    .await
    .unwrap();
    manager.start().await.unwrap();
    wait_for(Duration::from_secs(3), "a stream", || open() == 1).await;
    drop(manager);
    wait_for(Duration::from_secs(3), "the stream to close on drop", || {
        open() == 0
    })
    .await;
}

// ===== the state machine, with custom checks =====

/// A check whose verdict per address is set by the test; counts calls and concurrency.
#[derive(Default)]
struct Scripted {
    down: std::sync::Mutex<HashSet<SocketAddr>>,
    calls: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    delay: std::sync::Mutex<Duration>,
    first_call: std::sync::Mutex<BTreeMap<SocketAddr, Duration>>,
    epoch: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The check handed to the manager (the test keeps the `Arc<Scripted>` to drive it).
struct ScriptedCheck(Arc<Scripted>);

fn scripted(script: &Arc<Scripted>) -> HealthCheckKind {
    HealthCheckKind::custom(ScriptedCheck(script.clone()))
}

#[async_trait::async_trait]
impl HealthCheck for ScriptedCheck {
    async fn check(&self, endpoint: &Endpoint) -> Result<(), String> {
        self.0.check(endpoint).await
    }
}

impl Scripted {
    async fn check(&self, endpoint: &Endpoint) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        {
            let now = tokio::time::Instant::now();
            let epoch = *self.epoch.lock().unwrap().get_or_insert(now);
            self.first_call
                .lock()
                .unwrap()
                .entry(endpoint.address)
                .or_insert(now - epoch);
        }
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(running, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.down.lock().unwrap().contains(&endpoint.address) {
            Err("scripted failure".into())
        } else {
            Ok(())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn grace_period_and_thresholds() {
    let script = Arc::new(Scripted::default());
    script.down.lock().unwrap().insert(common::addr(0));
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", ep(0)).await.unwrap();
    let config = HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(50),
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        grace_period: Duration::from_secs(1),
        jitter: Duration::ZERO,
        max_concurrent: 4,
        check: scripted(&script),
    };
    let manager = tai_loadbalancer::HealthCheckManager::new(registry.clone(), config)
        .await
        .unwrap();
    manager.start().await.unwrap();
    let status = || futures_ready(manager.get_health_status("svc", &ep(0))).unwrap();
    // Inside the grace period failures do not count.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let s = status();
    assert!(s.checks >= 8, "{s:?}");
    assert_eq!(s.consecutive_failures, 0);
    assert!(s.in_grace_period);
    assert_eq!(s.state, HealthState::Healthy);
    // After it, three failures in a row make it unhealthy (not two).
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(status().state, HealthState::Healthy, "{:?}", status());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = status();
    assert_eq!(s.state, HealthState::Unhealthy, "{s:?}");
    assert!(!s.in_grace_period);
    // Two successes in a row bring it back; one is not enough.
    script.down.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status().state, HealthState::Unhealthy);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status().state, HealthState::Healthy);
    manager.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_enforced() {
    let script = Arc::new(Scripted::default());
    *script.delay.lock().unwrap() = Duration::from_secs(60);
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("svc", ep(0)).await.unwrap();
    let config = HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(30),
        unhealthy_threshold: 1,
        grace_period: Duration::ZERO,
        jitter: Duration::ZERO,
        check: scripted(&script),
        ..Default::default()
    };
    let manager = tai_loadbalancer::HealthCheckManager::new(registry, config)
        .await
        .unwrap();
    manager.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = manager.get_health_status("svc", &ep(0)).await.unwrap();
    assert_eq!(s.state, HealthState::Unhealthy);
    assert!(s.last_error.unwrap().contains("timed out"));
    assert!(s.last_latency.unwrap() < Duration::from_millis(40));
}

#[tokio::test(start_paused = true)]
async fn checks_are_bounded_and_spread_over_the_interval() {
    let script = Arc::new(Scripted::default());
    *script.delay.lock().unwrap() = Duration::from_millis(20);
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", (0..200).map(ep).collect())
        .await
        .unwrap();
    let config = HealthCheckConfig {
        enabled: true,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        jitter: Duration::from_millis(100),
        max_concurrent: 8,
        check: scripted(&script),
        ..Default::default()
    };
    let manager = tai_loadbalancer::HealthCheckManager::new(registry, config)
        .await
        .unwrap();
    manager.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        script.max_running.load(Ordering::SeqCst) <= 8,
        "more than max_concurrent checks at once"
    );
    assert!(
        script.calls.load(Ordering::SeqCst) >= 400,
        "{} checks in 3 s",
        script.calls.load(Ordering::SeqCst)
    );
    // First checks are spread over the first interval, not fired in one burst.
    let first = script.first_call.lock().unwrap();
    assert_eq!(first.len(), 200);
    let in_first_quarter = first
        .values()
        .filter(|d| **d < Duration::from_millis(250))
        .count();
    assert!(
        (25..=90).contains(&in_first_quarter),
        "{in_first_quarter} of 200 first checks in the first 250 ms"
    );
    assert!(first.values().max().unwrap() > &Duration::from_millis(750));
}

// ===== panic mode, slow start, hash stability =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_routes_to_all_when_too_few_are_healthy() {
    let script = Arc::new(Scripted::default());
    let config = LoadBalancerConfig {
        health_check: fast_checks(scripted(&script)),
        ..Default::default()
    };
    let (_r, lb) = balancer(
        (0..4).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    // One of four down: 75 % healthy, no panic.
    script.down.lock().unwrap().insert(common::addr(0));
    wait_for(Duration::from_secs(2), "one endpoint out", || {
        routable(&lb).len() == 3
    })
    .await;
    assert!(!lb.is_in_panic("svc").unwrap());
    // Three of four down: 25 % < 50 %: panic, all four take traffic.
    script
        .down
        .lock()
        .unwrap()
        .extend([common::addr(1), common::addr(2)]);
    wait_for(Duration::from_secs(2), "panic", || lb.is_in_panic("svc").unwrap()).await;
    assert_eq!(routable(&lb).len(), 4);
    let picked: HashSet<SocketAddr> = (0..8).map(|_| lb.pick("svc").unwrap().address()).collect();
    assert_eq!(picked.len(), 4);
    assert!(lb.metrics().service("svc").unwrap().panic);
    // Recovery ends the panic.
    script.down.lock().unwrap().clear();
    wait_for(Duration::from_secs(2), "recovery", || {
        !lb.is_in_panic("svc").unwrap()
    })
    .await;
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_panic_mode_no_healthy_endpoint_is_an_error() {
    let script = Arc::new(Scripted::default());
    script
        .down
        .lock()
        .unwrap()
        .extend([common::addr(0), common::addr(1)]);
    let config = LoadBalancerConfig {
        health_check: fast_checks(scripted(&script)),
        panic_threshold_percent: 0,
        ..Default::default()
    };
    let (_r, lb) = balancer((0..2).map(ep).collect(), LoadBalancingStrategy::Random, config).await;
    wait_for(Duration::from_secs(2), "both out", || routable(&lb).is_empty()).await;
    match lb.pick("svc") {
        Err(Error::NoHealthyEndpoints { service, total }) => assert_eq!((&*service, total), ("svc", 2)),
        other => panic!("{other:?}"),
    }
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flaps_move_only_the_flapping_endpoints_keys() {
    let script = Arc::new(Scripted::default());
    let config = LoadBalancerConfig {
        health_check: fast_checks(scripted(&script)),
        ..Default::default()
    };
    let (_r, lb) = balancer(
        (0..8).map(ep).collect(),
        LoadBalancingStrategy::ConsistentHash,
        config,
    )
    .await;
    let owners = |lb: &IntegratedLoadBalancer| -> Vec<SocketAddr> {
        (0..5_000)
            .map(|k| lb.select_with_hash("svc", key(k)).unwrap().address)
            .collect()
    };
    let before = owners(&lb);
    let flapping = common::addr(3);
    script.down.lock().unwrap().insert(flapping);
    wait_for(Duration::from_secs(2), "flapping endpoint out", || {
        !routable(&lb).contains(&flapping)
    })
    .await;
    let during = owners(&lb);
    for (b, d) in before.iter().zip(&during) {
        if *b == flapping {
            assert_ne!(*d, flapping);
        } else {
            assert_eq!(b, d, "a healthy endpoint's key moved");
        }
    }
    // Its keys spread over the others rather than piling onto one neighbour.
    let receivers: HashSet<_> = before
        .iter()
        .zip(&during)
        .filter(|(b, _)| **b == flapping)
        .map(|(_, d)| *d)
        .collect();
    assert!(
        receivers.len() >= 4,
        "the flapping endpoint's keys went to only {} endpoints",
        receivers.len()
    );
    script.down.lock().unwrap().clear();
    wait_for(Duration::from_secs(2), "recovery", || {
        routable(&lb).contains(&flapping)
    })
    .await;
    assert_eq!(owners(&lb), before, "keys came back");
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_endpoints_share() {
    let config = LoadBalancerConfig {
        slow_start: SlowStartConfig {
            window: Duration::from_millis(1_500),
            aggression: 1.0,
            min_weight_percent: 10,
        },
        ..Default::default()
    };
    let (registry, lb) = balancer(vec![ep(0)], LoadBalancingStrategy::Weighted, config).await;
    let share = |lb: &IntegratedLoadBalancer| {
        let picks = 2_000;
        (0..picks)
            .filter(|_| lb.select("svc").unwrap().address == common::addr(1))
            .count() as f64
            / picks as f64
    };
    registry.register("svc", ep(1)).await.unwrap();
    // At the start of the ramp the newcomer gets about min_weight_percent of a full share:
    // weights 100 : 10, so about 9 %.
    let early = share(&lb);
    assert!(early < 0.2, "new endpoint took {early:.2} at once");
    let m = lb.metrics();
    let e = m
        .service("svc")
        .unwrap()
        .endpoint(common::addr(1))
        .unwrap()
        .effective_weight;
    assert!(e < 60, "effective weight {e} at the start of the ramp");
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let late = share(&lb);
    assert!(
        (0.45..=0.55).contains(&late),
        "after the window the newcomer has {late:.2}"
    );
    // Members of the first table do not ramp (nothing served before them).
    assert_eq!(
        m.service("svc")
            .unwrap()
            .endpoint(common::addr(0))
            .unwrap()
            .effective_weight,
        100
    );
    lb.stop().await.unwrap();
}

// ===== outlier detection =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_with_growing_back_off() {
    let config = LoadBalancerConfig {
        outlier_detection: OutlierDetectionConfig {
            enabled: true,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_millis(300),
            max_ejection_time: Duration::from_secs(5),
            max_ejection_percent: 10,
        },
        ..Default::default()
    };
    let (_r, lb) = balancer(
        (0..10).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    let bad = Endpoint::new(common::addr(2), None);
    let fail = |n: usize| {
        for _ in 0..n {
            lb.record_result("svc", &bad, tai_loadbalancer::Outcome::Failure, None)
                .unwrap();
        }
    };
    // Four failures are not enough; a success resets the run.
    fail(4);
    lb.record_result("svc", &bad, tai_loadbalancer::Outcome::Success, None)
        .unwrap();
    fail(4);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(routable(&lb).contains(&bad.address));
    // The fifth in a row ejects it.
    fail(1);
    let t0 = Instant::now();
    wait_for(Duration::from_secs(1), "ejection", || {
        !routable(&lb).contains(&bad.address)
    })
    .await;
    let metrics = lb.metrics();
    let m = metrics.service("svc").unwrap().endpoint(bad.address).unwrap();
    assert_eq!((m.health, m.ejections), (EndpointHealth::Ejected, 1));
    // Only one of ten may be ejected at once (10 %).
    let other = Endpoint::new(common::addr(7), None);
    for _ in 0..5 {
        lb.record_result("svc", &other, tai_loadbalancer::Outcome::Failure, None)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        routable(&lb).contains(&other.address),
        "a second endpoint was ejected past the 10 % cap"
    );
    // Back after base_ejection_time.
    wait_for(Duration::from_secs(2), "return", || {
        routable(&lb).contains(&bad.address)
    })
    .await;
    let first_ejection = t0.elapsed();
    assert!(
        first_ejection >= Duration::from_millis(280),
        "back after {first_ejection:?}"
    );
    // A second ejection lasts twice as long.
    fail(5);
    let t1 = Instant::now();
    wait_for(Duration::from_secs(1), "second ejection", || {
        !routable(&lb).contains(&bad.address)
    })
    .await;
    wait_for(Duration::from_secs(3), "second return", || {
        routable(&lb).contains(&bad.address)
    })
    .await;
    let second_ejection = t1.elapsed();
    assert!(
        second_ejection >= Duration::from_millis(580),
        "second ejection lasted {second_ejection:?}"
    );
    assert_eq!(
        lb.metrics()
            .service("svc")
            .unwrap()
            .endpoint(bad.address)
            .unwrap()
            .ejections,
        2
    );
    lb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_reported_on_picks_feed_outlier_detection() {
    let config = LoadBalancerConfig {
        outlier_detection: OutlierDetectionConfig {
            enabled: true,
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
            ..Default::default()
        },
        ..Default::default()
    };
    let (_r, lb) = balancer(
        (0..2).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        config,
    )
    .await;
    // Every request to endpoint 0 fails, every request to endpoint 1 succeeds.
    for _ in 0..6 {
        let pick = lb.pick("svc").unwrap();
        if pick.address() == common::addr(0) {
            pick.failure()
        } else {
            pick.success()
        }
    }
    wait_for(Duration::from_secs(1), "ejection", || {
        routable(&lb) == vec![common::addr(1)]
    })
    .await;
    for _ in 0..10 {
        assert_eq!(lb.pick("svc").unwrap().address(), common::addr(1));
    }
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn marking_down_is_read_your_writes() {
    let (_r, lb) = balancer(
        (0..3).map(ep).collect(),
        LoadBalancingStrategy::RoundRobin,
        Default::default(),
    )
    .await;
    lb.mark_down("svc", &ep(1)).await.unwrap();
    for _ in 0..20 {
        assert_ne!(lb.pick("svc").unwrap().address(), common::addr(1));
    }
    let m = lb.metrics();
    assert_eq!(
        m.service("svc")
            .unwrap()
            .endpoint(common::addr(1))
            .unwrap()
            .health,
        EndpointHealth::Down
    );
    lb.mark_up("svc", &ep(1)).await.unwrap();
    assert!(routable(&lb).contains(&common::addr(1)));
    assert!(matches!(
        lb.mark_down("svc", &ep(9)).await,
        Err(Error::UnknownEndpoint { .. })
    ));
    assert!(matches!(
        lb.mark_down("nope", &ep(1)).await,
        Err(Error::UnknownService { .. })
    ));
    lb.stop().await.unwrap();
}

#[tokio::test]
async fn bad_health_config_is_refused_naming_the_field() {
    let cases: [(&str, &str); 6] = [
        ("[health_check]\ninterval = \"0s\"", "health_check.interval"),
        (
            "[health_check]\ninterval = \"1s\"\ntimeout = \"2h\"",
            "health_check.timeout",
        ),
        (
            "[health_check]\nunhealthy_threshold = 0",
            "health_check.unhealthy_threshold",
        ),
        (
            "[health_check]\nhealthy_threshold = 0",
            "health_check.healthy_threshold",
        ),
        (
            "[health_check.check]\nkind = \"http\"\npath = \"healthz\"",
            "health_check.check.path",
        ),
        (
            "[outlier_detection]\nmax_ejection_percent = 101",
            "outlier_detection.max_ejection_percent",
        ),
    ];
    for (text, field) in cases {
        match LoadBalancerConfig::from_toml_str(text) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let ok = LoadBalancerConfig::from_toml_str(
        "panic_threshold_percent = 30\n[health_check]\nenabled = true\ninterval = \"500ms\"\ntimeout = \"200ms\"\n[health_check.check]\nkind = \"http\"\npath = \"/healthz\"\nexpected_status = \"200-204\"\n[slow_start]\nwindow = \"30s\"",
    )
    .unwrap();
    assert_eq!(
        ok.health_check.check,
        HealthCheckKind::Http {
            path: "/healthz".into(),
            expected_status: tai_loadbalancer::StatusRange { start: 200, end: 204 },
            host: None
        }
    );
    let registry = Arc::new(ServiceRegistry::new());
    let mut config = LoadBalancerConfig::default();
    config.health_check.max_concurrent = 0;
    assert!(matches!(
        IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config).await,
        Err(Error::InvalidConfig { .. })
    ));
}
