//! What a balanced gRPC call costs: our `BalancedChannel` against tonic's own balancer
//! (`Channel::balance_list`, tower's power-of-two-choices over per-endpoint channels), both in
//! front of the same three loopback greeter servers, in the same run. A single tonic
//! `Channel` to one server is the floor (no balancing at all).
//!
//! * `grpc_unary/1_caller/*`: one caller, one call at a time: the latency of a unary RPC
//!   (criterion's median), the balancer's overhead included.
//! * `grpc_unary/64_callers/*`: 64 concurrent callers sharing the client; one iteration is
//!   one call by each caller, and criterion's `thrpt` is calls per second.
//!
//! After criterion, 15 short rounds per client and concurrency, interleaved in a rotating
//! order, print p50/p99 call latency (hdrhistogram, all rounds pooled) and the median
//! round's calls per second with the range.
//!
//! Run: `cargo bench --bench grpc_channel -- --warm-up-time 1 --measurement-time 3`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest};
use tai_loadbalancer::{
    BalancedChannel, Endpoint, IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy,
    ServiceRegistry,
};
use tonic::transport::Channel;

const SERVICE: &str = "greeter";
const CALLERS: usize = 64;

/// The clients under test, over the same servers.
struct Clients {
    ours: GreeterClient<BalancedChannel>,
    tonic: GreeterClient<Channel>,
    direct: GreeterClient<Channel>,
    _servers: Vec<GreeterServer>,
    _lb: Arc<IntegratedLoadBalancer>,
}

fn request() -> HelloRequest {
    HelloRequest {
        name: "bench".into(),
        delay_ms: 0,
        fail_with: 0,
    }
}

async fn clients() -> Clients {
    let servers: Vec<_> = (0..3)
        .map(|i| GreeterServer::start(&format!("s{i}")).expect("greeter"))
        .collect();
    let registry = Arc::new(ServiceRegistry::new());
    for server in &servers {
        registry
            .register(SERVICE, Endpoint::new(server.address(), None))
            .await
            .expect("register");
    }
    let lb = Arc::new(
        IntegratedLoadBalancer::new(
            registry,
            LoadBalancingStrategy::LeastConnections,
            LoadBalancerConfig::default(),
        )
        .await
        .expect("balancer"),
    );
    let ours = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).expect("channel"));
    let endpoints = servers.iter().map(|s| {
        Channel::from_shared(format!("http://{}", s.address()))
            .expect("uri")
            .tcp_nodelay(true)
    });
    let tonic = GreeterClient::new(Channel::balance_list(endpoints));
    let direct = GreeterClient::new(
        Channel::from_shared(format!("http://{}", servers[0].address()))
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect"),
    );
    let mut clients = Clients {
        ours,
        tonic,
        direct,
        _servers: servers,
        _lb: lb,
    };
    // Connections up on every path before measuring.
    for _ in 0..200 {
        clients.ours.say_hello(request()).await.expect("ours");
        clients.tonic.say_hello(request()).await.expect("tonic");
        clients.direct.say_hello(request()).await.expect("direct");
    }
    clients
}

/// `iters` calls by `callers` concurrent callers sharing `client`; returns the wall time and
/// each call's latency.
async fn run<T>(
    client: &GreeterClient<T>,
    callers: usize,
    iters: u64,
    latencies: Option<&mut Histogram<u64>>,
) -> Duration
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Error: Into<tonic::codegen::StdError>,
{
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for c in 0..callers as u64 {
        let mut client = client.clone();
        let n = iters / callers as u64 + u64::from(c < iters % callers as u64);
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
            for _ in 0..n {
                let sent = Instant::now();
                client.say_hello(request()).await.expect("rpc");
                let _ = local.record(sent.elapsed().as_nanos() as u64 / 1_000);
            }
            local
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
    for task in tasks {
        all.add(task.await.expect("caller")).expect("same bounds");
    }
    let elapsed = started.elapsed();
    if let Some(latencies) = latencies {
        latencies.add(&all).expect("same bounds");
    }
    elapsed
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clients = rt.block_on(clients());

    let mut group = c.benchmark_group("grpc_unary");
    for callers in [1, CALLERS] {
        // One iteration = one call by each caller, so the time is per round of `callers`
        // concurrent calls and criterion's throughput is calls per second.
        group.throughput(Throughput::Elements(callers as u64));
        let calls = |iters: u64| iters * callers as u64;
        let label = if callers == 1 {
            "1_caller".to_owned()
        } else {
            format!("{callers}_callers")
        };
        group.bench_function(format!("{label}/tai_balanced_channel"), |b| {
            b.iter_custom(|iters| rt.block_on(run(&clients.ours, callers, calls(iters), None)));
        });
        group.bench_function(format!("{label}/tonic_balance_list"), |b| {
            b.iter_custom(|iters| rt.block_on(run(&clients.tonic, callers, calls(iters), None)));
        });
        group.bench_function(format!("{label}/direct_single_channel"), |b| {
            b.iter_custom(|iters| rt.block_on(run(&clients.direct, callers, calls(iters), None)));
        });
    }
    group.finish();

    // Percentiles and throughput over many short rounds, interleaved in a rotating order so
    // that machine noise and position effects hit every client alike: the median round is
    // the throughput figure, the pooled latencies give p50/p99.
    const ROUNDS: usize = 15;
    let names = [
        "tai_balanced_channel",
        "tonic_balance_list",
        "direct_single_channel",
    ];
    println!("\ncall latency and throughput ({ROUNDS} rounds per cell, interleaved, rotating order):");
    println!(
        "{:<24} {:>8} {:>8} {:>10} {:>10} {:>14} {:>22}",
        "client", "callers", "calls", "p50 µs", "p99 µs", "median calls/s", "min..max calls/s"
    );
    for (callers, calls_per_round) in [(1, 1_000u64), (CALLERS, 6_400)] {
        let mut histograms: Vec<Histogram<u64>> = names
            .iter()
            .map(|_| Histogram::new_with_bounds(1, 10_000_000, 3).expect("bounds"))
            .collect();
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        for round in 0..ROUNDS {
            for k in 0..names.len() {
                let i = (round + k) % names.len();
                let histogram = &mut histograms[i];
                let wall = match i {
                    0 => rt.block_on(run(&clients.ours, callers, calls_per_round, Some(histogram))),
                    1 => rt.block_on(run(&clients.tonic, callers, calls_per_round, Some(histogram))),
                    _ => rt.block_on(run(&clients.direct, callers, calls_per_round, Some(histogram))),
                };
                rates[i].push(calls_per_round as f64 / wall.as_secs_f64());
            }
        }
        for i in 0..names.len() {
            let rates = &mut rates[i];
            rates.sort_by(f64::total_cmp);
            println!(
                "{:<24} {:>8} {:>8} {:>10} {:>10} {:>14.0} {:>22}",
                names[i],
                callers,
                histograms[i].len(),
                histograms[i].value_at_quantile(0.5),
                histograms[i].value_at_quantile(0.99),
                rates[ROUNDS / 2],
                format!("{:.0}..{:.0}", rates[0], rates[ROUNDS - 1]),
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
