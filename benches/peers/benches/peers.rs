//! `tai-loadbalancer` against two peers, in one run and over one workload.
//!
//! Workload: one service of 1,024 static, healthy, equal-weight backends on loopback
//! addresses (`127.0.x.y:port`, spread over 127.0.0.0/8); one thread; one selection per
//! iteration, its result passed to `black_box`. Nothing changes membership while measuring.
//!
//! * `peers/round_robin/*`: the next backend in rotation, returned as an owned value.
//!   - `pingora`: `LoadBalancer<RoundRobin>::select(b"", 256)` (pingora-load-balancing 0.9,
//!     returns an owned `Backend`).
//!   - `ours_handle`: `ServiceHandle::select()` (returns an owned `Endpoint`).
//!   - `ours_by_name`: `IntegratedLoadBalancer::select("svc")` (adds the service-name lookup).
//! * `peers/p2c/*`: power of two choices on in-flight requests, with the in-flight count
//!   raised for the request and lowered when it completes.
//!   - `tower`: `tower::balance::p2c::Balance` over `ServiceList` of `PendingRequests`-wrapped
//!     `service_fn`s that answer at once; one `poll_ready` (noop waker) + `call`, and the
//!     response future polled once (it is ready), which releases the in-flight count.
//!   - `ours`: `ServiceHandle::pick()` with `LeastConnections`; the `Pick` guard is dropped
//!     each iteration, which releases the in-flight count.
//! * `peers/consistent/*`: consistent hashing of an 8-byte key that changes every iteration
//!   (`i.to_le_bytes()`).
//!   - `pingora_ketama`: `LoadBalancer<Consistent>::select(key, 256)` (Ketama ring).
//!   - `ours`: `ServiceHandle::select_with_hash(key)` with `ConsistentHash`.
//!
//! Run: `cargo bench --manifest-path benches/peers/Cargo.toml -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pingora_load_balancing::LoadBalancer;
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use tai_loadbalancer::{
    Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, ServiceRegistry,
};
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};

/// Backends per service.
const N: usize = 1_024;

/// pingora's bound on how many backends `select` may visit (all are healthy, so 1 is used).
const MAX_ITERATIONS: usize = 256;

/// The `i`-th loopback backend: 64 ports per host, hosts from 127.0.0.1 up; never 127.0.0.0.
fn addr(i: usize) -> SocketAddr {
    let host = (i / 64) as u32 + 1;
    let ip = Ipv4Addr::from(0x7f00_0000 | (host & 0x00ff_ffff));
    SocketAddr::V4(SocketAddrV4::new(ip, 20_000 + (i % 64) as u16))
}

fn addrs() -> impl Iterator<Item = SocketAddr> {
    (0..N).map(addr)
}

// ===== pingora =====

fn pingora<S>() -> LoadBalancer<S>
where
    S: pingora_load_balancing::selection::BackendSelection + 'static,
    S::Iter: pingora_load_balancing::selection::BackendIter,
{
    // Parsed `SocketAddr`s: no DNS. Builds the selector synchronously.
    let lb = LoadBalancer::<S>::try_from_iter(addrs()).expect("static backends");
    assert_eq!(lb.backends().get_backend().len(), N);
    lb
}

// ===== tower =====

type TowerEndpoint = tower::util::ServiceFn<fn(u32) -> Ready<Result<usize, Infallible>>>;

fn answer(request: u32) -> Ready<Result<usize, Infallible>> {
    ready(Ok(request as usize))
}

type TowerP2c = Balance<ServiceList<Vec<PendingRequests<TowerEndpoint, CompleteOnResponse>>>, u32>;

fn tower_p2c() -> TowerP2c {
    let services: Vec<_> = (0..N)
        .map(|_| {
            let svc: TowerEndpoint = tower::service_fn(answer as fn(u32) -> _);
            PendingRequests::new(svc, CompleteOnResponse::default())
        })
        .collect();
    let mut balance = Balance::new(ServiceList::new::<u32>(services));
    // The first poll drains the discovery stream and readies every endpoint.
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(balance.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    assert_eq!(balance.len(), N);
    balance
}

/// One p2c request: `poll_ready` + `call`, then the (ready) response future polled once.
fn tower_request(balance: &mut TowerP2c, cx: &mut Context<'_>, i: u32) -> usize {
    match balance.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => unreachable!("every endpoint is always ready"),
    }
    let fut = pin!(balance.call(i));
    match fut.poll(cx) {
        Poll::Ready(Ok(v)) => v,
        _ => unreachable!("the response is ready"),
    }
}

// ===== ours =====

/// A started balancer over `svc` (1,024 endpoints); keep both values alive while measuring.
fn ours(
    rt: &tokio::runtime::Runtime,
    strategy: LoadBalancingStrategy,
) -> (Arc<ServiceRegistry>, IntegratedLoadBalancer) {
    rt.block_on(async {
        let registry = Arc::new(ServiceRegistry::new());
        let endpoints: Vec<_> = addrs().map(|a| Endpoint::new(a, None)).collect();
        registry.register_batch("svc", endpoints).await.expect("register");
        let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, LoadBalancerConfig::default())
            .await
            .expect("balancer");
        lb.start().await.expect("start");
        (registry, lb)
    })
}

// ===== benches =====

fn peers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("peers");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // Round robin.
    let pingora_rr = pingora::<RoundRobin>();
    group.bench_function("round_robin/pingora", |b| {
        b.iter(|| black_box(pingora_rr.select(black_box(b""), MAX_ITERATIONS)))
    });
    let (_rr_registry, rr) = ours(&rt, LoadBalancingStrategy::RoundRobin);
    let rr_handle = rr.service("svc").expect("handle");
    group.bench_function("round_robin/ours_handle", |b| {
        b.iter(|| black_box(rr_handle.select()))
    });
    group.bench_function("round_robin/ours_by_name", |b| {
        b.iter(|| black_box(rr.select(black_box("svc"))))
    });

    // Power of two choices over in-flight counts.
    let mut tower = tower_p2c();
    let mut cx = Context::from_waker(Waker::noop());
    let mut i = 0u32;
    group.bench_function("p2c/tower", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(tower_request(&mut tower, &mut cx, i))
        })
    });
    let (_lc_registry, lc) = ours(&rt, LoadBalancingStrategy::LeastConnections);
    let lc_handle = lc.service("svc").expect("handle");
    group.bench_function("p2c/ours", |b| {
        b.iter(|| {
            let pick = lc_handle.pick().expect("pick");
            black_box(pick.address())
            // `pick` drops here: the in-flight count is released.
        })
    });

    // Consistent hashing, a new 8-byte key each iteration.
    let ketama = pingora::<Consistent>();
    let mut k = 0u64;
    group.bench_function("consistent/pingora_ketama", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(ketama.select(&k.to_le_bytes(), MAX_ITERATIONS))
        })
    });
    let (_ch_registry, ch) = ours(&rt, LoadBalancingStrategy::ConsistentHash);
    let ch_handle = ch.service("svc").expect("handle");
    group.bench_function("consistent/ours", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(ch_handle.select_with_hash(k.to_le_bytes()))
        })
    });

    group.finish();
    // The balancers (and the runtime) live until here.
    drop((rr, lc, ch));
}

criterion_group!(benches, peers);
criterion_main!(benches);
