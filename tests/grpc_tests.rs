//! End-to-end tests of `BalancedChannel` against real tonic servers on loopback (the greeter
//! of `examples/greeter`, each on its own runtime so it can be killed like a crashed process).
#![cfg(feature = "grpc")]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tai_lb_greeter::{
    GreeterClient, GreeterServer, HelloRequest, SAY_HELLO_PATH, SERVICE_NAME, ServingStatus,
};
use tai_loadbalancer::{
    BalancedChannel, Endpoint, EndpointMetadata, HealthCheckConfig, HealthCheckKind, Idempotent,
    IntegratedLoadBalancer, LoadBalancerConfig, LoadBalancingStrategy, RequestHash, RetryPolicy,
    ServiceRegistry,
};
use tonic::Code;

const SERVICE: &str = "greeter";

fn servers(n: usize) -> Vec<GreeterServer> {
    (0..n)
        .map(|i| GreeterServer::start(&format!("s{i}")).expect("start greeter"))
        .collect()
}

/// A loopback address nothing listens on.
fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn balancer(
    addresses: &[SocketAddr],
    strategy: LoadBalancingStrategy,
    config: LoadBalancerConfig,
) -> (Arc<ServiceRegistry>, Arc<IntegratedLoadBalancer>) {
    let registry = Arc::new(ServiceRegistry::new());
    for &address in addresses {
        registry
            .register(
                SERVICE,
                Endpoint::new(address, Some(EndpointMetadata::new().with_weight(10))),
            )
            .await
            .unwrap();
    }
    let lb = IntegratedLoadBalancer::new(registry.clone(), strategy, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    (registry, Arc::new(lb))
}

fn request(name: &str) -> tonic::Request<HelloRequest> {
    tonic::Request::new(HelloRequest {
        name: name.to_owned(),
        ..Default::default()
    })
}

fn grpc_checks(interval: Duration) -> HealthCheckConfig {
    HealthCheckConfig {
        enabled: true,
        interval,
        // Generous: a debug build's first check also connects.
        timeout: interval * 9 / 10,
        unhealthy_threshold: 1,
        healthy_threshold: 1,
        grace_period: Duration::ZERO,
        jitter: Duration::from_millis(5),
        check: HealthCheckKind::grpc(SERVICE_NAME),
        ..Default::default()
    }
}

fn total_in_flight(lb: &IntegratedLoadBalancer, addresses: &[SocketAddr]) -> u64 {
    addresses.iter().filter_map(|a| lb.in_flight(SERVICE, *a)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_routes_real_rpcs() {
    let servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    for strategy in [
        LoadBalancingStrategy::RoundRobin,
        LoadBalancingStrategy::Random,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancingStrategy::Weighted,
        LoadBalancingStrategy::ConsistentHash,
        LoadBalancingStrategy::PeakEwma,
    ] {
        let (_registry, lb) = balancer(&addresses, strategy, LoadBalancerConfig::default()).await;
        let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
        let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..90 {
            let reply = client
                .say_hello(request(&format!("c{i}")))
                .await
                .expect("rpc")
                .into_inner();
            assert_eq!(reply.message, format!("Hello, c{i}!"));
            *by_server.entry(reply.server).or_default() += 1;
        }
        assert_eq!(by_server.len(), 3, "{strategy}: {by_server:?}");
        if matches!(
            strategy,
            LoadBalancingStrategy::RoundRobin | LoadBalancingStrategy::Weighted
        ) {
            assert!(by_server.values().all(|&n| n == 30), "{strategy}: {by_server:?}");
        }
        let metrics = lb.metrics();
        assert_eq!(metrics.successful_requests, 90, "{strategy}");
        assert_eq!(metrics.failed_requests, 0, "{strategy}");
        assert_eq!(total_in_flight(&lb, &addresses), 0, "{strategy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_load_fails_no_idempotent_call_and_is_excluded() {
    let mut servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let config = LoadBalancerConfig {
        health_check: grpc_checks(Duration::from_millis(100)),
        ..Default::default()
    };
    let (_registry, lb) = balancer(&addresses, LoadBalancingStrategy::LeastConnections, config).await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .retry(RetryPolicy::default().idempotent_method(SAY_HELLO_PATH))
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut client = GreeterClient::new(channel.clone());
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..150 {
                let mut req = request(&format!("w{worker}-{i}"));
                req.get_mut().delay_ms = 2;
                match client.say_hello(req).await {
                    Ok(reply) => {
                        let _ = tx.send(reply.into_inner().server);
                    }
                    Err(status) => failures.push(status),
                }
            }
            failures
        }));
    }
    drop(tx);
    // Kill s0 once the load is well under way.
    let mut seen = 0;
    while seen < 600 {
        rx.recv().await.unwrap();
        seen += 1;
    }
    let served_before_kill = servers[0].state().served.load(Ordering::Relaxed);
    assert!(served_before_kill > 0);
    servers[0].kill();
    let mut after_kill: HashMap<String, usize> = HashMap::new();
    while let Some(server) = rx.recv().await {
        *after_kill.entry(server).or_default() += 1;
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed calls, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(seen + after_kill.values().sum::<usize>(), 16 * 150);
    // Excluded: its health checks fail and the snapshot no longer routes to it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let routable = lb.service(SERVICE).unwrap().endpoints();
        if routable.iter().any(|(e, up)| e.address == addresses[0] && !up) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "killed server still routable: {routable:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(total_in_flight(&lb, &addresses), 0);
}

/// A key whose consistent-hash owner is `address`.
fn key_owned_by(lb: &IntegratedLoadBalancer, address: SocketAddr) -> String {
    (0..10_000)
        .map(|i| format!("key-{i}"))
        .find(|k| lb.select_with_hash(SERVICE, k).unwrap().address == address)
        .expect("some key maps to each endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_reached_a_server_is_retried_only_when_idempotent() {
    let mut servers = servers(2);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .hash_header("x-key")
        .build()
        .unwrap();
    let client = GreeterClient::new(channel);
    let to_s0 = key_owned_by(&lb, addresses[0]);
    let call = |delay_ms: u32, fail_with: Code, idempotent: bool| {
        let mut client = client.clone();
        let key = to_s0.clone();
        async move {
            let mut req = request("x");
            req.get_mut().delay_ms = delay_ms;
            req.get_mut().fail_with = fail_with as i32;
            req.metadata_mut().insert("x-key", key.parse().unwrap());
            if idempotent {
                req.extensions_mut().insert(Idempotent);
            }
            client.say_hello(req).await
        }
    };
    let received = |s: &GreeterServer| s.state().received.load(Ordering::Relaxed);
    // Waits (at most 10 s) until `server` has received `n` calls.
    async fn until_received(server: &GreeterServer, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while server.state().received.load(Ordering::Relaxed) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} received {} calls, not {n}, within 10 s",
                server.name(),
                server.state().received.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // An INTERNAL answer came from the server: it is the answer, not retried.
    let status = call(0, Code::Internal, false).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!((received(&servers[0]), received(&servers[1])), (1, 0));

    // A non-idempotent call cut off by a crash of its server is not sent again.
    let plain = tokio::spawn(call(2_000, Code::Ok, false));
    until_received(&servers[0], 2).await;
    servers[0].kill();
    let status = plain.await.unwrap().unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(received(&servers[1]), 0, "not retried: {status:?}");

    // The same call marked idempotent is sent again, to the other server, and succeeds.
    // First s0 is back and the channel reconnected to it: a call that fails before reaching
    // a server (the channel's first attempt after the crash may) goes to s1 instead, so
    // plain calls are made until one is answered by s0.
    servers[0].restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(reply) = call(0, Code::Ok, false).await {
            if reply.into_inner().server == "s0" {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "s0 not reachable again within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (on_s0, on_s1) = (received(&servers[0]), received(&servers[1]));
    let marked = tokio::spawn(call(300, Code::Ok, true));
    until_received(&servers[0], on_s0 + 1).await;
    servers[0].kill();
    let reply = marked.await.unwrap().expect("retried on s1").into_inner();
    assert_eq!(reply.server, "s1");
    assert_eq!(received(&servers[1]), on_s1 + 1);
    assert_eq!(total_in_flight(&lb, &addresses), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_never_reached_a_server_are_retried_elsewhere() {
    let servers = servers(2);
    let dead = dead_address();
    let mut addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    addresses.push(dead);
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
    for i in 0..30 {
        // Not idempotent: still safe to retry, the connection to `dead` was refused.
        let reply = client
            .say_hello(request(&format!("r{i}")))
            .await
            .expect("failed over");
        assert!(reply.into_inner().server.starts_with('s'));
    }
    let metrics = lb.metrics();
    let dead_stats = metrics.services[0]
        .endpoints
        .iter()
        .find(|e| e.address == dead)
        .expect("dead endpoint in metrics")
        .clone();
    assert_eq!(dead_stats.successes, 0);
    assert!(dead_stats.failures >= 1, "{dead_stats:?}");
    assert_eq!(metrics.successful_requests, 30);

    // A server that answers UNAVAILABLE at once (trailers-only) is skipped the same way.
    servers[0].state().refuse.store(true, Ordering::Relaxed);
    for i in 0..20 {
        let reply = client
            .say_hello(request(&format!("u{i}")))
            .await
            .expect("failed over");
        assert_eq!(reply.into_inner().server, "s1");
    }
    assert!(servers[0].state().refused.load(Ordering::Relaxed) >= 1);
    assert_eq!(total_in_flight(&lb, &addresses), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_and_max_attempts() {
    // Every endpoint refuses connections: each call could try 3 of them.
    let addresses: Vec<_> = (0..3).map(|_| dead_address()).collect();
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let policy = RetryPolicy::default()
        .max_attempts(3)
        .budget_percent(20.0)
        .min_retries_per_second(1);
    let mut client = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .retry(policy)
            .build()
            .unwrap(),
    );
    let calls = 300;
    for i in 0..calls {
        let status = client.say_hello(request(&format!("b{i}"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let attempts = lb.metrics().failed_requests;
    let retries = attempts - calls;
    // tower's TpsBudget: a reserve of min_per_sec × 10 s, plus 20 % of the calls.
    let allowed = 10 + calls / 5;
    assert!(retries > 0, "some calls were retried");
    assert!(
        retries <= allowed + 2,
        "{retries} retries for {calls} calls (budget {allowed})"
    );

    // max_attempts bounds one call even with budget to spare.
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let mut client = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .retry(RetryPolicy::default().max_attempts(2))
            .build()
            .unwrap(),
    );
    assert!(client.say_hello(request("m")).await.is_err());
    assert_eq!(lb.metrics().failed_requests, 2);
    assert_eq!(total_in_flight(&lb, &addresses), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_not_serving_excludes_an_endpoint() {
    let servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let config = LoadBalancerConfig {
        health_check: grpc_checks(Duration::from_millis(200)),
        ..Default::default()
    };
    let (_registry, lb) = balancer(&addresses, LoadBalancingStrategy::RoundRobin, config).await;
    let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
    // Endpoints start unchecked; wait until the first checks have passed everywhere.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !lb.service(SERVICE).unwrap().endpoints().iter().all(|(_, up)| *up) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoints never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // NOT_SERVING for the greeter service only: the server as a whole stays SERVING.
    servers[1]
        .set_health(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    servers[1].set_health("", ServingStatus::Serving).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while lb
        .service(SERVICE)
        .unwrap()
        .endpoints()
        .iter()
        .any(|(e, up)| e.address == addresses[1] && *up)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "NOT_SERVING endpoint still routable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = servers[1].state().received.load(Ordering::Relaxed);
    for i in 0..60 {
        let reply = client
            .say_hello(request(&format!("h{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(reply.server, "s1");
    }
    assert_eq!(servers[1].state().received.load(Ordering::Relaxed), before);
    // SERVING again: routed to again.
    servers[1].set_health(SERVICE_NAME, ServingStatus::Serving).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !lb
        .service(SERVICE)
        .unwrap()
        .endpoints()
        .iter()
        .any(|(e, up)| e.address == addresses[1] && *up)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SERVING endpoint not routable again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s1 = 0;
    for i in 0..30 {
        if client
            .say_hello(request(&format!("b{i}")))
            .await
            .unwrap()
            .into_inner()
            .server
            == "s1"
        {
            s1 += 1;
        }
    }
    assert!(s1 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_and_hash_by_header_hold() {
    let servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let sticky = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .affinity_header("x-session-id")
            .build()
            .unwrap(),
    );
    let hashed = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .hash_header("x-user")
            .build()
            .unwrap(),
    );
    for (mut client, header) in [(sticky, "x-session-id"), (hashed, "x-user")] {
        let mut owners: HashMap<String, String> = HashMap::new();
        for round in 0..5 {
            for session in 0..30 {
                let mut req = request(&format!("{round}"));
                req.metadata_mut()
                    .insert(header, format!("session-{session}").parse().unwrap());
                let server = client.say_hello(req).await.unwrap().into_inner().server;
                let owner = owners
                    .entry(format!("session-{session}"))
                    .or_insert_with(|| server.clone());
                assert_eq!(
                    *owner, server,
                    "{header}: session-{session} moved in round {round}"
                );
            }
        }
        let distinct: std::collections::HashSet<_> = owners.values().collect();
        assert!(
            distinct.len() >= 2,
            "{header}: keys spread over servers: {owners:?}"
        );
    }
    assert!(lb.affinity().len() >= 30);
    // Calls without the header are routed by the strategy (round robin here).
    let mut plain = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .affinity_header("x-session-id")
            .build()
            .unwrap(),
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        seen.insert(plain.say_hello(request("n")).await.unwrap().into_inner().server);
    }
    assert_eq!(seen.len(), 3);
    // A custom extractor (the request path here) works the same way.
    let mut custom = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .affinity_key(|parts| {
                parts
                    .headers
                    .get("tenant")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .build()
            .unwrap(),
    );
    let mut owner = None;
    for _ in 0..10 {
        let mut req = request("t");
        req.metadata_mut().insert("tenant", "acme".parse().unwrap());
        let server = custom.say_hello(req).await.unwrap().into_inner().server;
        assert_eq!(*owner.get_or_insert_with(|| server.clone()), server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a76_hash_on_method_and_header_and_a_random_hash_without_the_header() {
    let servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let name_of =
        |server: &str| -> SocketAddr { servers.iter().find(|s| s.name() == server).unwrap().address() };
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;

    // Method and header: the owner of hash_key("<path>\0<value>"), computable anywhere.
    let mut by_method = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .hash_request(RequestHash::header("x-user").with_method())
            .build()
            .unwrap(),
    );
    let mut differs = 0;
    for user in 0..30 {
        let value = format!("user-{user}");
        let mut req = request("m");
        req.metadata_mut().insert("x-user", value.parse().unwrap());
        let server = by_method.say_hello(req).await.unwrap().into_inner().server;
        let expected = lb
            .select_with_hash(SERVICE, format!("{SAY_HELLO_PATH}\0{value}"))
            .unwrap()
            .address;
        assert_eq!(name_of(&server), expected, "{value}");
        if lb.select_with_hash(SERVICE, &value).unwrap().address != expected {
            differs += 1;
        }
    }
    assert!(differs > 0, "the method is part of the hash");

    // Without the header: the strategy (round robin: a strict cycle over the three servers),
    // or with `random_when_absent` a random hash per call (the chance that 60 random picks
    // keep a cycle of three is 3^-57).
    let mut sequences = Vec::new();
    for random_when_absent in [false, true] {
        let policy = RequestHash::header("x-user");
        let policy = if random_when_absent {
            policy.random_when_absent()
        } else {
            policy
        };
        let mut client = GreeterClient::new(
            BalancedChannel::builder(lb.clone(), SERVICE)
                .hash_request(policy)
                .build()
                .unwrap(),
        );
        let mut sequence = Vec::new();
        for _ in 0..60 {
            let server = client
                .say_hello(request("no key"))
                .await
                .unwrap()
                .into_inner()
                .server;
            sequence.push(server);
        }
        sequences.push(sequence);
    }
    let cyclic = |s: &[String]| s.windows(4).all(|w| w[0] == w[3]) && s[0] != s[1] && s[1] != s[2];
    assert!(
        cyclic(&sequences[0]),
        "the strategy routes calls without the header: {:?}",
        sequences[0]
    );
    assert!(!cyclic(&sequences[1]), "random hashes: {:?}", sequences[1]);
    let reached: std::collections::HashSet<_> = sequences[1].iter().collect();
    assert_eq!(reached.len(), 3, "random hashes reach every server");

    // A bad header name is a typed error when the channel is built.
    let err = BalancedChannel::builder(lb.clone(), SERVICE)
        .hash_request(RequestHash::header("bad header"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("bad header"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_header_routes_calls_inside_the_subset() {
    let servers = servers(3);
    let registry = Arc::new(ServiceRegistry::new());
    for (server, version) in servers.iter().zip(["v1", "v2", "v2"]) {
        let meta = EndpointMetadata::new().with_tag("version", version);
        registry
            .register(SERVICE, Endpoint::new(server.address(), Some(meta)))
            .await
            .unwrap();
    }
    let mut config = LoadBalancerConfig::default();
    config.subsets.selectors = vec![vec!["version".into()]];
    let lb = Arc::new(
        IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
            .await
            .unwrap(),
    );
    let mut client = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .subset_header("x-version", "version")
            .build()
            .unwrap(),
    );
    let mut by_version: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for version in ["v1", "v2", ""] {
        for _ in 0..12 {
            let mut req = request("s");
            if !version.is_empty() {
                req.metadata_mut().insert("x-version", version.parse().unwrap());
            }
            let server = client.say_hello(req).await.unwrap().into_inner().server;
            by_version.entry(version.to_owned()).or_default().insert(server);
        }
    }
    assert_eq!(by_version["v1"], ["s0".to_owned()].into());
    assert_eq!(by_version["v2"], ["s1".to_owned(), "s2".to_owned()].into());
    assert_eq!(by_version[""].len(), 3, "no header: the whole service");
    // No endpoint matches (no fallback configured): UNAVAILABLE naming the subset.
    let mut req = request("s");
    req.metadata_mut().insert("x-version", "v9".parse().unwrap());
    let status = client.say_hello(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("version=v9"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_leave_no_request_in_flight() {
    let servers = servers(2);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    let (_registry, lb) = balancer(
        &addresses,
        LoadBalancingStrategy::LeastConnections,
        LoadBalancerConfig::default(),
    )
    .await;
    let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
    client.say_hello(request("warm")).await.unwrap();

    // A deadline set on the call (grpc-timeout) ends it, on time, with DEADLINE_EXCEEDED.
    let mut req = request("late");
    req.get_mut().delay_ms = 2_000;
    req.set_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let status = client.say_hello(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(1_500));
    assert_eq!(total_in_flight(&lb, &addresses), 0);

    // The channel's own timeout applies to calls without one.
    let mut bounded = GreeterClient::new(
        BalancedChannel::builder(lb.clone(), SERVICE)
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
    );
    let mut req = request("late");
    req.get_mut().delay_ms = 2_000;
    assert_eq!(
        bounded.say_hello(req).await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    assert_eq!(total_in_flight(&lb, &addresses), 0);

    // Cancellation: callers that give up release their endpoint at once.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = request("cancelled");
            req.get_mut().delay_ms = 5_000;
            let _ = client.say_hello(req).await;
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while total_in_flight(&lb, &addresses) < 8 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    assert_eq!(total_in_flight(&lb, &addresses), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_follows_the_registry() {
    let servers = servers(3);
    let (registry, lb) = balancer(
        &[servers[0].address()],
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
    let count = |client: &mut GreeterClient<BalancedChannel>| {
        let mut client = client.clone();
        async move {
            let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..30 {
                *by_server
                    .entry(client.say_hello(request("f")).await.unwrap().into_inner().server)
                    .or_default() += 1;
            }
            by_server
        }
    };
    assert_eq!(count(&mut client).await.keys().collect::<Vec<_>>(), ["s0"]);
    for s in &servers[1..] {
        registry
            .register(SERVICE, Endpoint::new(s.address(), None))
            .await
            .unwrap();
    }
    assert_eq!(count(&mut client).await.len(), 3);
    registry
        .deregister(SERVICE, &Endpoint::new(servers[0].address(), None))
        .await
        .unwrap();
    let after = count(&mut client).await;
    assert!(!after.contains_key("s0"), "{after:?}");
    // Draining s1: no new calls.
    lb.drain(SERVICE, &Endpoint::new(servers[1].address(), None))
        .await
        .unwrap();
    let after = count(&mut client).await;
    assert_eq!(after.keys().collect::<Vec<_>>(), ["s2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_typed_errors() {
    let (_registry, lb) = balancer(
        &[dead_address()],
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let field = |r: Result<BalancedChannel, tai_loadbalancer::Error>| match r.unwrap_err() {
        tai_loadbalancer::Error::InvalidConfig { field, .. } => field,
        other => panic!("{other:?}"),
    };
    let b = || BalancedChannel::builder(lb.clone(), SERVICE);
    assert_eq!(
        field(b().connections_per_endpoint(0).build()),
        "grpc.connections_per_endpoint"
    );
    assert_eq!(
        field(b().connections_per_endpoint(65).build()),
        "grpc.connections_per_endpoint"
    );
    assert_eq!(
        field(b().max_streams_per_connection(0).build()),
        "grpc.max_streams_per_connection"
    );
    assert_eq!(
        field(b().affinity_header("bad header").build()),
        "grpc.key_header"
    );
    assert_eq!(field(b().timeout(Duration::ZERO).build()), "grpc.timeout");
    assert_eq!(
        field(b().connect_timeout(Duration::ZERO).build()),
        "grpc.connect_timeout"
    );
    assert_eq!(
        field(b().retry(RetryPolicy::default().max_attempts(0)).build()),
        "retry.max_attempts"
    );
    assert_eq!(
        field(
            b().retry(RetryPolicy::default().idempotent_method("nope"))
                .build()
        ),
        "retry.idempotent_method"
    );
    assert!(matches!(
        BalancedChannel::new(lb.clone(), "").unwrap_err(),
        tai_loadbalancer::Error::InvalidServiceName { .. }
    ));
    // An unknown service is UNAVAILABLE per call, naming it.
    let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), "nobody").unwrap());
    let status = client.say_hello(request("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("nobody"), "{status:?}");
}

/// `delay_ms` calls made at once on `channel`; returns when all have answered.
async fn concurrent_slow_calls(channel: &BalancedChannel, calls: usize, delay_ms: u32) {
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let mut client = GreeterClient::new(channel.clone());
            tokio::spawn(async move {
                let mut request = request(&format!("slow{i}"));
                request.get_mut().delay_ms = delay_ms;
                client.say_hello(request).await.map(|_| ())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_on_demand_when_streams_fill_up_to_the_limit() {
    let servers = servers(1);
    let address = servers[0].address();
    let accepted = || servers[0].state().connections.load(Ordering::Relaxed);
    let (_registry, lb) = balancer(
        &[address],
        LoadBalancingStrategy::RoundRobin,
        LoadBalancerConfig::default(),
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .connections_per_endpoint(3)
        .max_streams_per_connection(2)
        .build()
        .unwrap();
    assert_eq!(
        channel.connections(address),
        0,
        "nothing opens before the first call"
    );

    // One call at a time never fills a connection: one is enough.
    let mut client = GreeterClient::new(channel.clone());
    for i in 0..20 {
        client.say_hello(request(&format!("n{i}"))).await.unwrap();
    }
    assert_eq!((channel.connections(address), accepted()), (1, 1));

    // 6 calls held open at once, 2 streams per connection: 3 connections.
    concurrent_slow_calls(&channel, 6, 300).await;
    assert_eq!((channel.connections(address), accepted()), (3, 3));

    // 12 at once: the limit is 3 connections, the calls share them.
    concurrent_slow_calls(&channel, 12, 200).await;
    assert_eq!((channel.connections(address), accepted()), (3, 3));
    assert_eq!(lb.in_flight(SERVICE, address), Some(0));

    // The default: one connection per endpoint, however many calls.
    let single = BalancedChannel::new(lb.clone(), SERVICE).unwrap();
    concurrent_slow_calls(&single, 30, 200).await;
    assert_eq!((single.connections(address), accepted()), (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_calls_away_from_a_slow_server_that_least_connections_keeps_using() {
    let servers = servers(3);
    let addresses: Vec<_> = servers.iter().map(GreeterServer::address).collect();
    servers[0].state().delay_ms.store(30, Ordering::Relaxed);
    let mut served_by_slow = BTreeMap::new();
    for strategy in [
        LoadBalancingStrategy::PeakEwma,
        LoadBalancingStrategy::LeastConnections,
    ] {
        let (_registry, lb) = balancer(&addresses, strategy, LoadBalancerConfig::default()).await;
        let mut client = GreeterClient::new(BalancedChannel::new(lb.clone(), SERVICE).unwrap());
        let mut slow = 0;
        // One caller, one call at a time: in-flight counts are always 0, so only latency can
        // tell the servers apart.
        for i in 0..60 {
            let reply = client
                .say_hello(request(&format!("c{i}")))
                .await
                .unwrap()
                .into_inner();
            if reply.server == "s0" {
                slow += 1;
            }
        }
        served_by_slow.insert(strategy.to_string(), slow);
    }
    // Peak-EWMA: the slow server's one probe (and perhaps a retry after its estimate fades);
    // least connections spreads one caller's calls evenly.
    assert!(served_by_slow["peak_ewma"] <= 3, "{served_by_slow:?}");
    assert!(served_by_slow["least_connections"] >= 10, "{served_by_slow:?}");
}
