//! Connection pool against a real TCP server on loopback that counts the connections it
//! accepts and holds open.
#![cfg(feature = "runtime")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tai_loadbalancer::{
    ConnectionPool, Connector, Endpoint, Error, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, PoolConfig, ServiceRegistry, TcpConnector,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An echo server (one line in, the same line out) counting connections.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    /// Bumping it makes every connection task close its connection.
    drop_all: watch::Sender<u64>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let max_open = Arc::new(AtomicUsize::new(0));
        let (drop_all, watcher) = watch::channel(0u64);
        let acceptor = {
            let (accepted, open, max_open) = (accepted.clone(), open.clone(), max_open.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    max_open.fetch_max(now, Ordering::SeqCst);
                    let (open, mut watcher) = (open.clone(), watcher.clone());
                    watcher.mark_unchanged();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        loop {
                            tokio::select! {
                                n = stream.read(&mut buf) => match n {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => if stream.write_all(&buf[..n]).await.is_err() { break },
                                },
                                _ = watcher.changed() => break,
                            }
                        }
                        drop(stream);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Server {
            addr,
            accepted,
            open,
            max_open,
            drop_all,
            acceptor,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr, None)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes every connection (the listener stays).
    fn drop_connections(&self) {
        self.drop_all.send_modify(|g| *g += 1);
    }

    /// Stops listening and closes every connection.
    async fn kill(self) -> SocketAddr {
        self.acceptor.abort();
        self.drop_connections();
        for _ in 0..200 {
            if self.open() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.addr
    }
}

async fn ping(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping\n");
    Ok(())
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn config(max: usize) -> PoolConfig {
    PoolConfig {
        max_connections: max,
        acquire_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        maintenance_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

#[tokio::test]
async fn sequential_acquires_reuse_one_connection() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(config(4), TcpConnector::new()).unwrap();
    for _ in 0..100 {
        let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
        ping(&mut conn).await.unwrap();
    }
    assert_eq!(server.accepted(), 1);
    let stats = pool.stats(&server.endpoint()).unwrap();
    assert_eq!(
        (stats.open, stats.idle, stats.in_use, stats.created),
        (1, 1, 0, 1)
    );
}

#[test]
fn max_is_respected_under_two_thread_contention() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = Server::start().await;
        let pool = ConnectionPool::new(
            PoolConfig {
                acquire_timeout: Duration::from_secs(10),
                ..config(3)
            },
            TcpConnector::new(),
        )
        .unwrap();
        let over = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (pool, endpoint, over) = (pool.clone(), server.endpoint(), over.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let mut conn = pool.acquire(&endpoint).await.unwrap();
                    if pool.stats(&endpoint).unwrap().open > 3 {
                        over.fetch_add(1, Ordering::SeqCst);
                    }
                    ping(&mut conn).await.unwrap();
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(over.load(Ordering::SeqCst), 0);
        assert!(
            server.max_open.load(Ordering::SeqCst) <= 3,
            "server saw more than max"
        );
        assert!(
            server.accepted() <= 3,
            "connections are reused: {}",
            server.accepted()
        );
        let stats = pool.stats(&server.endpoint()).unwrap();
        assert_eq!((stats.in_use, stats.waiters), (0, 0));
        assert!(stats.open <= 3);
    });
}

#[tokio::test]
async fn acquire_times_out_when_every_connection_is_in_use() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            acquire_timeout: Duration::from_millis(100),
            ..config(1)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let held = pool.acquire(&server.endpoint()).await.unwrap();
    let started = std::time::Instant::now();
    match pool.acquire(&server.endpoint()).await {
        Err(Error::AcquireTimeout { address, waited }) => {
            assert_eq!(address, server.addr);
            assert_eq!(waited, Duration::from_millis(100));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(pool.stats(&server.endpoint()).unwrap().timeouts, 1);
    drop(held);
    // The timed-out waiter left the queue: the connection went idle and is reused.
    pool.acquire(&server.endpoint()).await.unwrap();
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn max_waiters_rejects_at_once() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            max_waiters: 2,
            acquire_timeout: Duration::from_secs(5),
            ..config(1)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let held = pool.acquire(&server.endpoint()).await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let (pool, endpoint) = (pool.clone(), server.endpoint());
            tokio::spawn(async move { pool.acquire(&endpoint).await.map(drop) })
        })
        .collect();
    eventually("two waiters", || {
        pool.stats(&server.endpoint()).unwrap().waiters == 2
    })
    .await;
    let started = std::time::Instant::now();
    match pool.acquire(&server.endpoint()).await {
        Err(Error::PoolExhausted { address, waiters }) => assert_eq!((address, waiters), (server.addr, 2)),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(100), "rejected at once");
    assert_eq!(pool.stats(&server.endpoint()).unwrap().rejected, 1);
    drop(held);
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        server.accepted(),
        1,
        "the waiters were handed the same connection"
    );
}

#[tokio::test]
async fn waiters_are_served_first_come_first_served() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            acquire_timeout: Duration::from_secs(5),
            ..config(1)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let held = pool.acquire(&server.endpoint()).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (p, endpoint, order) = (pool.clone(), server.endpoint(), order.clone());
        tasks.push(tokio::spawn(async move {
            let conn = p.acquire(&endpoint).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(2)).await;
            drop(conn);
        }));
        eventually("queued", || {
            pool.stats(&server.endpoint()).unwrap().waiters == i + 1
        })
        .await;
    }
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn idle_connections_expire_and_are_replaced() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            idle_timeout: Duration::from_millis(150),
            ..config(2)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    drop(conn);
    assert_eq!(pool.stats(&server.endpoint()).unwrap().idle, 1);
    // The maintenance task closes it after idle_timeout; the server sees the close.
    eventually("idle connection reaped", || {
        pool.stats(&server.endpoint()).unwrap().open == 0
    })
    .await;
    eventually("server saw the close", || server.open() == 0).await;
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    assert_eq!(server.accepted(), 2, "a new connection after expiry");
    assert_eq!(pool.stats(&server.endpoint()).unwrap().closed, 1);
}

#[tokio::test]
async fn connections_past_their_lifetime_are_closed_on_return() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            max_lifetime: Duration::from_millis(150),
            maintenance_interval: Duration::from_secs(3600),
            ..config(2)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ping(&mut conn).await.unwrap(); // still usable while in use
    drop(conn);
    let stats = pool.stats(&server.endpoint()).unwrap();
    assert_eq!(
        (stats.open, stats.idle, stats.closed),
        (0, 0, 1),
        "closed on return, not kept"
    );
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn min_connections_are_replenished_after_the_server_drops_them() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            min_connections: 2,
            ..config(4)
        },
        TcpConnector::new(),
    )
    .unwrap();
    drop(pool.acquire(&server.endpoint()).await.unwrap());
    eventually("two open", || {
        server.open() == 2 && pool.stats(&server.endpoint()).unwrap().idle == 2
    })
    .await;
    assert_eq!(server.accepted(), 2);
    server.drop_connections();
    // The maintenance task finds them closed (is_valid) and opens two new ones.
    eventually("replenished", || server.accepted() == 4 && server.open() == 2).await;
    eventually("pool agrees", || {
        let s = pool.stats(&server.endpoint()).unwrap();
        s.open == 2 && s.idle == 2
    })
    .await;
    // And the new ones work.
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    assert_eq!(server.accepted(), 4);
}

#[tokio::test]
async fn a_server_killed_mid_use_errors_without_deadlock_and_recovers() {
    let server = Server::start().await;
    let endpoint = server.endpoint();
    let pool = ConnectionPool::new(
        PoolConfig {
            acquire_timeout: Duration::from_secs(2),
            ..config(1)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let mut conn = pool.acquire(&endpoint).await.unwrap();
    ping(&mut conn).await.unwrap();
    // Waiters queue behind the one connection.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (pool, endpoint) = (pool.clone(), endpoint.clone());
            tokio::spawn(async move { pool.acquire(&endpoint).await.map(drop) })
        })
        .collect();
    eventually("three waiters", || pool.stats(&endpoint).unwrap().waiters == 3).await;
    let addr = server.kill().await;
    // The connection in use fails; the caller marks it broken.
    assert!(ping(&mut conn).await.is_err());
    conn.discard();
    // Each waiter in turn gets the slot, fails to connect (refused), passes it on: all
    // finish with a connect error, none waits out its timeout.
    let started = std::time::Instant::now();
    for w in waiters {
        match w.await.unwrap() {
            Err(Error::Connect { address, reason }) => {
                assert_eq!(address, addr);
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no waiter waited for its timeout"
    );
    let stats = pool.stats(&endpoint).unwrap();
    assert_eq!((stats.open, stats.waiters, stats.connect_errors), (0, 0, 3));
    // The server comes back on the same port: the pool recovers.
    let server = Server::start_on(addr).await;
    let mut conn = pool.acquire(&endpoint).await.unwrap();
    ping(&mut conn).await.unwrap();
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn a_broken_connection_is_not_reused() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(config(2), TcpConnector::new()).unwrap();
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    conn.mark_broken();
    drop(conn);
    let _conn = pool.acquire(&server.endpoint()).await.unwrap();
    eventually("two accepted", || server.accepted() == 2).await;
    assert_eq!(pool.stats(&server.endpoint()).unwrap().closed, 1);
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_not_handed_out() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            maintenance_interval: Duration::from_secs(3600),
            ..config(2)
        },
        TcpConnector::new(),
    )
    .unwrap();
    drop(pool.acquire(&server.endpoint()).await.unwrap());
    eventually("server accepted it", || server.open() == 1).await;
    server.drop_connections();
    eventually("server closed it", || server.open() == 0).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut conn = pool.acquire(&server.endpoint()).await.unwrap();
    ping(&mut conn).await.unwrap();
    assert_eq!(
        server.accepted(),
        2,
        "the dead idle connection was checked and replaced"
    );
}

/// In-memory connections, for timing semantics under paused time.
struct Slow {
    delay: Duration,
    fail_first: AtomicU64,
    made: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("refused by the test connector")]
struct Refused;

impl Connector for Slow {
    type Connection = u64;
    type Error = Refused;

    async fn connect(&self, _endpoint: &Endpoint) -> Result<u64, Refused> {
        tokio::time::sleep(self.delay).await;
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Refused);
        }
        Ok(self.made.fetch_add(1, Ordering::SeqCst))
    }
}

fn slow(delay_ms: u64, fail_first: u64) -> Slow {
    Slow {
        delay: Duration::from_millis(delay_ms),
        fail_first: AtomicU64::new(fail_first),
        made: AtomicU64::new(0),
    }
}

fn ep() -> Endpoint {
    Endpoint::new("127.0.0.1:1".parse().unwrap(), None)
}

#[tokio::test(start_paused = true)]
async fn a_failed_connect_wakes_the_next_waiter_which_retries() {
    let pool = ConnectionPool::new(
        PoolConfig {
            acquire_timeout: Duration::from_secs(10),
            ..config(1)
        },
        slow(100, 1),
    )
    .unwrap();
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.acquire(&ep()).await.map(|c| *c) })
    };
    tokio::task::yield_now().await;
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.acquire(&ep()).await.map(|c| *c) })
    };
    let started = tokio::time::Instant::now();
    assert!(matches!(first.await.unwrap(), Err(Error::Connect { .. })));
    assert_eq!(
        second.await.unwrap().unwrap(),
        0,
        "the waiter connected for itself"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "no timeout involved"
    );
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_and_acquire_timeout_are_exact() {
    let pool = ConnectionPool::new(
        PoolConfig {
            connect_timeout: Duration::from_millis(300),
            acquire_timeout: Duration::from_millis(700),
            ..config(1)
        },
        slow(1_000, 0),
    )
    .unwrap();
    let started = tokio::time::Instant::now();
    match pool.acquire(&ep()).await {
        Err(Error::ConnectTimeout { timeout, .. }) => assert_eq!(timeout, Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(pool.stats(&ep()).unwrap().open, 0, "the slot came back");
    // Cancelling an acquire mid-connect gives the slot back too.
    let pending = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.acquire(&ep()).await.map(|c| *c) })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pool.stats(&ep()).unwrap().connecting, 1);
    pending.abort();
    let _ = pending.await;
    assert_eq!(pool.stats(&ep()).unwrap().open, 0);
}

#[tokio::test(start_paused = true)]
async fn detach_frees_the_slot() {
    let pool = ConnectionPool::new(config(1), slow(0, 0)).unwrap();
    let conn = pool.acquire(&ep()).await.unwrap();
    assert_eq!(conn.detach(), 0);
    assert_eq!(pool.stats(&ep()).unwrap().open, 0);
    assert_eq!(*pool.acquire(&ep()).await.unwrap(), 1);
}

#[tokio::test]
async fn bad_config_is_a_typed_error_naming_the_field() {
    for (config, field) in [
        (
            PoolConfig {
                max_connections: 0,
                ..Default::default()
            },
            "pool.max_connections",
        ),
        (
            PoolConfig {
                min_connections: usize::MAX,
                ..Default::default()
            },
            "pool.min_connections",
        ),
        (
            PoolConfig {
                acquire_timeout: Duration::ZERO,
                ..Default::default()
            },
            "pool.acquire_timeout",
        ),
        (
            PoolConfig {
                connect_timeout: Duration::ZERO,
                ..Default::default()
            },
            "pool.connect_timeout",
        ),
        (
            PoolConfig {
                idle_timeout: Duration::ZERO,
                ..Default::default()
            },
            "pool.idle_timeout",
        ),
        (
            PoolConfig {
                max_lifetime: Duration::ZERO,
                ..Default::default()
            },
            "pool.max_lifetime",
        ),
        (
            PoolConfig {
                maintenance_interval: Duration::ZERO,
                ..Default::default()
            },
            "pool.maintenance_interval",
        ),
        (
            PoolConfig {
                max_waiters: tai_loadbalancer::MAX_POOL_SIZE + 1,
                ..Default::default()
            },
            "pool.max_waiters",
        ),
        (
            PoolConfig {
                max_connections: tai_loadbalancer::MAX_POOL_SIZE + 1,
                ..Default::default()
            },
            "pool.max_connections",
        ),
    ] {
        match ConnectionPool::new(config, TcpConnector::new()) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    PoolConfig::default().validate().unwrap();
}

#[test]
fn acquire_outside_a_tokio_runtime_is_a_typed_error() {
    let pool = ConnectionPool::new(config(1), TcpConnector::new()).unwrap();
    let result = futures_lite_block_on(pool.acquire(&ep()));
    assert!(matches!(result, Err(Error::Runtime { .. })), "{result:?}");
}

fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            return v;
        }
    }
}

#[tokio::test]
async fn the_pool_follows_draining_and_removal_in_the_balancer() {
    let a = Server::start().await;
    let b = Server::start().await;
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch("svc", vec![a.endpoint(), b.endpoint()])
        .await
        .unwrap();
    let lb = Arc::new(
        IntegratedLoadBalancer::new(
            registry.clone(),
            LoadBalancingStrategy::RoundRobin,
            LoadBalancerConfig::default(),
        )
        .await
        .unwrap(),
    );
    lb.start().await.unwrap();
    let pool = ConnectionPool::new(config(4), TcpConnector::new()).unwrap();
    pool.follow(&lb);

    // Two connections to a: one idle, one in use.
    let mut in_use = pool.acquire(&a.endpoint()).await.unwrap();
    let idle = pool.acquire(&a.endpoint()).await.unwrap();
    drop(idle);
    ping(&mut in_use).await.unwrap();
    assert_eq!((a.open(), pool.stats(&a.endpoint()).unwrap().idle), (2, 1));

    // Draining a: its idle connection closes at once, the one in use when returned.
    let drainer = {
        let (lb, endpoint) = (lb.clone(), a.endpoint());
        tokio::spawn(async move { lb.drain("svc", &endpoint).await })
    };
    eventually("idle closed at drain", || a.open() == 1).await;
    ping(&mut in_use).await.unwrap(); // the request in flight completes
    drop(in_use);
    eventually("returned connection closed", || a.open() == 0).await;
    let report = drainer.await.unwrap().unwrap();
    assert_eq!(report.in_flight_at_end, 0);
    assert_eq!(pool.stats(&a.endpoint()).unwrap().open, 0);

    // Deregistration (after its requests finished) drops the endpoint's pool.
    registry.deregister("svc", &a.endpoint()).await.unwrap();
    eventually("pool removed", || pool.stats(&a.endpoint()).is_none()).await;
    assert!(pool.totals().closed >= 2);

    // b was never touched.
    drop(pool.acquire(&b.endpoint()).await.unwrap());
    assert_eq!(pool.stats(&b.endpoint()).unwrap().idle, 1);
    lb.stop().await.unwrap();
}

#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connector_pools_tonic_channels_to_a_real_server() {
    use tai_loadbalancer::GrpcConnector;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("greeter", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = Endpoint::new(listener.local_addr().unwrap(), None);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let pool = ConnectionPool::new(config(2), GrpcConnector::new()).unwrap();
    for _ in 0..5 {
        let channel = pool.acquire(&endpoint).await.unwrap();
        let reply = HealthClient::new((*channel).clone())
            .check(HealthCheckRequest {
                service: "greeter".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, 1, "SERVING");
    }
    assert_eq!(
        pool.stats(&endpoint).unwrap().created,
        1,
        "the channel was reused"
    );
    // Nothing listening: a typed connect error.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_endpoint = Endpoint::new(dead.local_addr().unwrap(), None);
    drop(dead);
    assert!(matches!(
        pool.acquire(&dead_endpoint).await,
        Err(Error::Connect { .. } | Error::ConnectTimeout { .. })
    ));
}

#[cfg(feature = "prometheus")]
#[tokio::test]
async fn pool_exposition_passes_promtool() {
    let server = Server::start().await;
    let pool = ConnectionPool::new(
        PoolConfig {
            max_waiters: 0,
            ..config(1)
        },
        TcpConnector::new(),
    )
    .unwrap();
    let held = pool.acquire(&server.endpoint()).await.unwrap();
    assert!(matches!(
        pool.acquire(&server.endpoint()).await,
        Err(Error::PoolExhausted { .. })
    ));
    let text = tai_loadbalancer::encode_pool_prometheus(&pool);
    let endpoint = server.addr.to_string();
    for line in [
        format!(r#"tai_lb_pool_connections{{endpoint="{endpoint}",state="in_use"}} 1"#),
        format!(r#"tai_lb_pool_connections_created_total{{endpoint="{endpoint}"}} 1"#),
        format!(r#"tai_lb_pool_rejected_total{{endpoint="{endpoint}"}} 1"#),
    ] {
        assert!(text.contains(&line), "{line} missing in\n{text}");
    }
    drop(held);
    common::promtool_check(&text);
}

#[tokio::test]
async fn an_endpoint_shared_by_two_services_keeps_its_pool_until_both_let_it_go() {
    let server = Server::start().await;
    let other = Server::start().await;
    let registry = Arc::new(ServiceRegistry::new());
    registry.register("a", server.endpoint()).await.unwrap();
    registry
        .register_batch("b", vec![server.endpoint(), other.endpoint()])
        .await
        .unwrap();
    let lb = IntegratedLoadBalancer::new(
        registry.clone(),
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await
    .unwrap();
    lb.start().await.unwrap();
    // Follows a balancer whose services were published before: it knows both already.
    let pool = ConnectionPool::new(config(4), TcpConnector::new()).unwrap();
    pool.follow(&lb);
    drop(pool.acquire(&server.endpoint()).await.unwrap());
    assert_eq!(pool.stats(&server.endpoint()).unwrap().idle, 1);

    // Leaves `a` (and is released there): `b` still routes to it, so its pool stays usable.
    registry.deregister("a", &server.endpoint()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = pool.stats(&server.endpoint()).expect("still pooled for b");
    assert_eq!(stats.idle, 1, "not drained while b serves it: {stats:?}");
    drop(pool.acquire(&server.endpoint()).await.unwrap());
    assert_eq!(server.accepted(), 1, "and reused");

    // Leaves `b` too: drained, then released, then its pool is gone.
    registry.deregister("b", &server.endpoint()).await.unwrap();
    eventually("pool removed", || pool.stats(&server.endpoint()).is_none()).await;
    eventually("connection closed", || server.open() == 0).await;
    lb.stop().await.unwrap();
}
