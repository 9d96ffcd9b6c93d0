//! Circuit breakers (`[circuit_breakers]`): `max_requests`, `max_pending`, `max_retries` and
//! `max_connections_per_endpoint`, against real tonic servers (the greeter, held in its handler
//! by the test, so "slow" needs no timing) and on the plain pick API. Over a limit a call fails
//! at once with the typed error (through the channel: `UNAVAILABLE` naming the limit, with
//! `Error::CircuitOpen` as its source), and every refusal is counted in `lb.metrics()` and in
//! `tai_lb_circuit_open_total`.
#![cfg(feature = "grpc")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest};
use tai_loadbalancer::{
    BalancedChannel, CircuitBreakerConfig, CircuitLimit, Endpoint, Error, IntegratedLoadBalancer,
    LoadBalancerConfig, LoadBalancingStrategy, RetryPolicy, ServiceRegistry,
};
use tokio::sync::mpsc;
use tonic::Code;

const SERVICE: &str = "greeter";

async fn balancer(
    addresses: &[SocketAddr],
    breakers: CircuitBreakerConfig,
) -> (Arc<ServiceRegistry>, Arc<IntegratedLoadBalancer>) {
    let registry = Arc::new(ServiceRegistry::new());
    for &address in addresses {
        registry
            .register(SERVICE, Endpoint::new(address, None))
            .await
            .unwrap();
    }
    let config = LoadBalancerConfig {
        circuit_breakers: breakers,
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry.clone(), LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    lb.start().await.unwrap();
    (registry, Arc::new(lb))
}

fn hello(i: usize) -> HelloRequest {
    HelloRequest {
        name: format!("c{i}"),
        ..Default::default()
    }
}

/// The limit a refused call names: its status is `UNAVAILABLE`, its message names the
/// limit, and its source is the typed error.
fn refused_by(status: &tonic::Status) -> Option<CircuitLimit> {
    let source = std::error::Error::source(status)?;
    match source.downcast_ref::<Error>()? {
        Error::CircuitOpen { service, limit, .. } => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(&**service, SERVICE);
            assert!(status.message().contains(limit.as_str()), "{status:?}");
            Some(*limit)
        }
        _ => None,
    }
}

/// Starts `n` calls on clones of `channel`, each sending its result to the returned receiver.
fn launch(channel: &BalancedChannel, n: usize) -> mpsc::UnboundedReceiver<Result<String, tonic::Status>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for i in 0..n {
        let mut client = GreeterClient::new(channel.clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = client.say_hello(hello(i)).await.map(|r| r.into_inner().server);
            let _ = tx.send(result);
        });
    }
    rx
}

/// Receives `n` results (each within 10 s: they fail at once, or the test is broken).
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<Result<String, tonic::Status>>,
    n: usize,
) -> Vec<Result<String, tonic::Status>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let result = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a result within 10 s")
            .expect("senders alive");
        out.push(result);
    }
    out
}

/// Waits (up to 10 s) until `condition` holds.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

fn breaker_of(lb: &IntegratedLoadBalancer) -> tai_loadbalancer::CircuitBreakerMetrics {
    lb.metrics()
        .service(SERVICE)
        .and_then(|s| s.circuit_breaker)
        .expect("the service has circuit breakers")
}

/// 64 concurrent callers against `max_requests = 16` and a slow server: the server never
/// sees more than 16 calls at once, the others fail at once with the typed error, and the
/// counter matches the refusals. First with the server holding every call (exactly 16 reach
/// it, 48 are refused while none can finish), then in a loop against a 2 ms server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_caps_what_the_server_sees_and_refuses_the_rest_at_once() {
    let server = GreeterServer::start("s0").unwrap();
    let (_registry, lb) = balancer(
        &[server.address()],
        CircuitBreakerConfig {
            max_requests: Some(16),
            ..Default::default()
        },
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let state = server.state().clone();
    state.hold();
    let mut results = launch(&channel, 64);
    // Every refusal arrives while the server still holds the 16 it admitted.
    let refused = receive(&mut results, 48).await;
    for result in &refused {
        let status = result
            .as_ref()
            .expect_err("only refusals can end while the server holds calls");
        assert_eq!(refused_by(status), Some(CircuitLimit::MaxRequests), "{status:?}");
    }
    until("16 calls reach the server", || {
        state.in_flight.load(Ordering::SeqCst) == 16
    })
    .await;
    let breaker = breaker_of(&lb);
    assert_eq!(breaker.requests, 16);
    assert_eq!(breaker.open(CircuitLimit::MaxRequests), 48);
    assert_eq!(lb.metrics().circuit_open(CircuitLimit::MaxRequests), 48);
    state.release();
    for result in receive(&mut results, 16).await {
        assert_eq!(result.expect("admitted calls succeed"), "s0");
    }
    assert_eq!(state.max_in_flight.load(Ordering::SeqCst), 16);

    // A loop: 64 callers, 20 calls each, against a server that takes 2 ms a call.
    state.delay_ms.store(2, Ordering::Relaxed);
    let before = breaker_of(&lb).open(CircuitLimit::MaxRequests);
    let mut callers = Vec::new();
    for c in 0..64 {
        let mut client = GreeterClient::new(channel.clone());
        callers.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for i in 0..20 {
                match client.say_hello(hello(c * 100 + i)).await {
                    Ok(_) => ok += 1,
                    Err(status) => {
                        assert_eq!(refused_by(&status), Some(CircuitLimit::MaxRequests), "{status:?}");
                        refused += 1;
                    }
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for caller in callers {
        let (o, r) = caller.await.unwrap();
        ok += o;
        refused += r;
    }
    assert_eq!(ok + refused, 64 * 20);
    assert!(ok >= 16, "{ok} calls went through");
    assert!(
        state.max_in_flight.load(Ordering::SeqCst) <= 16,
        "the server saw {} calls at once",
        state.max_in_flight.load(Ordering::SeqCst)
    );
    let breaker = breaker_of(&lb);
    assert_eq!(breaker.open(CircuitLimit::MaxRequests) - before, refused);
    assert_eq!(breaker.requests, 0, "every admitted call gave its place back");
    assert_eq!(lb.in_flight(SERVICE, server.address()), Some(0));
}

/// `max_pending`: the server takes 4 streams per connection (HTTP/2
/// `MAX_CONCURRENT_STREAMS`) and the channel knows it (`max_streams_per_connection(4)`, one
/// connection), so calls beyond them wait in the channel for a stream. With
/// `max_pending = 8`, at most 8 wait, the rest fail at once with the typed error, and the
/// counter matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_caps_calls_waiting_for_a_stream() {
    let server = GreeterServer::builder("s0")
        .max_concurrent_streams(4)
        .start()
        .unwrap();
    let (_registry, lb) = balancer(
        &[server.address()],
        CircuitBreakerConfig {
            max_pending: Some(8),
            ..Default::default()
        },
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .max_streams_per_connection(4)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    // One call first: the connection is up and the client knows the server's stream limit.
    GreeterClient::new(channel.clone())
        .say_hello(hello(0))
        .await
        .unwrap();
    let state = server.state().clone();
    state.hold();
    let calls = 40;
    let mut results = launch(&channel, calls);
    let mut done = Vec::new();
    // Settled: every call is refused (returned), waiting for a stream, or in the handler.
    until("every call is refused, pending or at the server", || {
        while let Ok(result) = results.try_recv() {
            done.push(result);
        }
        let waiting = breaker_of(&lb).pending as usize;
        done.len() + waiting + state.in_flight.load(Ordering::SeqCst) as usize == calls
    })
    .await;
    let breaker = breaker_of(&lb);
    assert_eq!(
        breaker.pending, 8,
        "calls beyond the streams wait, up to the limit"
    );
    assert_eq!(
        state.in_flight.load(Ordering::SeqCst),
        4,
        "the server's stream limit"
    );
    assert_eq!(done.len() as u64, calls as u64 - 4 - breaker.pending);
    for result in &done {
        let status = result
            .as_ref()
            .expect_err("nothing finishes while the server holds calls");
        assert_eq!(refused_by(status), Some(CircuitLimit::MaxPending), "{status:?}");
    }
    assert_eq!(breaker.open(CircuitLimit::MaxPending), done.len() as u64);
    let admitted = calls - done.len();
    state.release();
    for result in receive(&mut results, admitted).await {
        assert_eq!(result.expect("admitted calls succeed"), "s0");
    }
    assert_eq!(breaker_of(&lb).pending, 0);
    assert_eq!(state.max_in_flight.load(Ordering::SeqCst), 4);
}

/// `max_retries`: every first attempt goes to a server that refuses it (`UNAVAILABLE`, so the
/// channel retries on the other one, which holds its calls). With `max_retries = 4`, four
/// retries are in flight at once; the other calls fail at once naming the limit, and the
/// counter matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_caps_concurrent_retries() {
    let refusing = GreeterServer::start("s0").unwrap();
    let slow = GreeterServer::start("s1").unwrap();
    refusing.state().refuse.store(true, Ordering::Relaxed);
    let (_registry, lb) = balancer(
        &[refusing.address(), slow.address()],
        CircuitBreakerConfig {
            max_retries: Some(4),
            ..Default::default()
        },
    )
    .await;
    // Every pick goes to s0 first: a primary/backup order.
    lb.set_failover_group(
        SERVICE,
        Endpoint::new(refusing.address(), None),
        vec![Endpoint::new(slow.address(), None)],
    )
    .await
    .unwrap();
    let channel = BalancedChannel::builder(lb.clone(), SERVICE).build().unwrap();
    let state = slow.state().clone();
    state.hold();
    let calls = 40;
    let mut results = launch(&channel, calls);
    let refused = receive(&mut results, calls - 4).await;
    for result in &refused {
        let status = result
            .as_ref()
            .expect_err("nothing finishes while s1 holds calls");
        assert_eq!(refused_by(status), Some(CircuitLimit::MaxRetries), "{status:?}");
        assert!(status.message().contains("not retried"), "{status:?}");
    }
    until("4 retries reach s1", || {
        state.in_flight.load(Ordering::SeqCst) == 4
    })
    .await;
    let breaker = breaker_of(&lb);
    assert_eq!(breaker.retries, 4);
    assert_eq!(breaker.open(CircuitLimit::MaxRetries), (calls - 4) as u64);
    assert_eq!(refusing.state().refused.load(Ordering::Relaxed), calls as u64);
    state.release();
    for result in receive(&mut results, 4).await {
        assert_eq!(result.expect("admitted retries succeed"), "s1");
    }
    assert_eq!(state.max_in_flight.load(Ordering::SeqCst), 4);
    assert_eq!(breaker_of(&lb).retries, 0, "every retry gave its place back");
}

/// `max_connections_per_endpoint`: a channel allowed 8 connections of one stream each opens
/// only 2 (the limit) and shares them; a second channel, finding the endpoint's connections
/// all held, fails at once with the typed error, and succeeds once the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_endpoint_caps_connections_over_channels() {
    let server = GreeterServer::start("s0").unwrap();
    let (_registry, lb) = balancer(
        &[server.address()],
        CircuitBreakerConfig {
            max_connections_per_endpoint: Some(2),
            ..Default::default()
        },
    )
    .await;
    let first = BalancedChannel::builder(lb.clone(), SERVICE)
        .connections_per_endpoint(8)
        .max_streams_per_connection(1)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let state = server.state().clone();
    state.hold();
    let mut results = launch(&first, 6);
    until("6 calls reach the server", || {
        state.in_flight.load(Ordering::SeqCst) == 6
    })
    .await;
    assert_eq!(first.connections(server.address()), 2);
    assert_eq!(
        state.connections.load(Ordering::Relaxed),
        2,
        "connections the server accepted"
    );
    let breaker = breaker_of(&lb);
    assert_eq!(breaker.connections, 2);
    assert!(breaker.open(CircuitLimit::MaxConnectionsPerEndpoint) >= 1);

    let second = BalancedChannel::builder(lb.clone(), SERVICE)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let status = GreeterClient::new(second.clone())
        .say_hello(hello(99))
        .await
        .expect_err("the endpoint's connections are all held by the first channel");
    assert_eq!(
        refused_by(&status),
        Some(CircuitLimit::MaxConnectionsPerEndpoint),
        "{status:?}"
    );
    state.release();
    for result in receive(&mut results, 6).await {
        assert_eq!(result.unwrap(), "s0");
    }
    drop(first);
    until("the first channel's connections are given back", || {
        breaker_of(&lb).connections == 0
    })
    .await;
    let reply = GreeterClient::new(second.clone())
        .say_hello(hello(100))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server, "s0");
    assert_eq!(breaker_of(&lb).connections, 1);
}

/// The pick API: guarded picks take `max_requests` places and give them back on drop;
/// refusals are `Error::CircuitOpen`, unguarded selections are refused while the service is
/// full, and the exposition counts them (checked by promtool when installed).
#[tokio::test]
async fn guarded_picks_hold_places_and_refusals_are_counted_and_exported() {
    let addresses: Vec<SocketAddr> = (0..3).map(common::addr).collect();
    let (_registry, lb) = balancer(
        &addresses,
        CircuitBreakerConfig {
            max_requests: Some(2),
            ..Default::default()
        },
    )
    .await;
    let first = lb.pick(SERVICE).unwrap();
    let second = lb.service(SERVICE).unwrap().pick().unwrap();
    match lb.pick(SERVICE) {
        Err(Error::CircuitOpen { service, limit, max }) => {
            assert_eq!((&*service, limit, max), (SERVICE, CircuitLimit::MaxRequests, 2));
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    assert!(matches!(lb.select(SERVICE), Err(Error::CircuitOpen { .. })));
    assert!(matches!(
        lb.pick_with_hash(SERVICE, "k"),
        Err(Error::CircuitOpen { .. })
    ));
    assert!(matches!(
        lb.next_endpoint(SERVICE).await,
        Err(Error::CircuitOpen { .. })
    ));
    drop(first);
    let third = lb.pick_with_affinity(SERVICE, "user").unwrap();
    second.success();
    drop(third);
    let breaker = breaker_of(&lb);
    assert_eq!(breaker.requests, 0);
    assert_eq!(breaker.open(CircuitLimit::MaxRequests), 4);
    assert_eq!(breaker.open_total(), 4);
    let text = tai_loadbalancer::encode_prometheus(&lb);
    assert!(
        text.contains(r#"tai_lb_circuit_open_total{service="greeter",limit="max_requests"} 4"#),
        "{text}"
    );
    assert!(text.contains(r#"tai_lb_circuit_breaker_limit{service="greeter",limit="max_requests"} 2"#));
    common::promtool_check(&text);
}

/// Per-service values replace the top-level ones; the others are inherited.
#[tokio::test]
async fn per_service_limits_override_the_top_level_ones() {
    let config = LoadBalancerConfig::from_toml_str(
        "[circuit_breakers]\nmax_requests = 1\nmax_retries = 7\n\
         [services.roomy.circuit_breakers]\nmax_requests = 3\n",
    )
    .unwrap();
    let roomy = config.circuit_breakers_for("roomy");
    assert_eq!((roomy.max_requests, roomy.max_retries), (Some(3), Some(7)));
    let registry = Arc::new(ServiceRegistry::new());
    for service in ["roomy", "tight"] {
        registry.register(service, common::ep(1)).await.unwrap();
    }
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    let held: Vec<_> = (0..3).map(|_| lb.pick("roomy").unwrap()).collect();
    assert!(matches!(lb.pick("roomy"), Err(Error::CircuitOpen { max: 3, .. })));
    let tight = lb.pick("tight").unwrap();
    assert!(matches!(lb.pick("tight"), Err(Error::CircuitOpen { max: 1, .. })));
    drop((held, tight));
    let err =
        LoadBalancerConfig::from_toml_str("[services.x.circuit_breakers]\nmax_pending = 0\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("services.x.circuit_breakers.max_pending"),
        "{err}"
    );
}
