//! TLS and mTLS end to end (feature `tls`), against two server implementations started on
//! loopback by the tests: tonic servers with rustls (`GreeterServer::start_tls`) and
//! grpc-core servers (Python `grpcio`, see `tls_support`). Every certificate is made at test
//! time with rcgen.
//!
//! For each kind of server:
//! - calls succeed over TLS (tonic's `ClientTlsConfig` as is) and over mTLS (PEM);
//! - servers whose certificate has the wrong name, is expired, or comes from an unknown CA
//!   are marked unhealthy, with the reason in `last_error`, and get no calls while a good
//!   one serves them all;
//! - a client without a certificate is refused by an mTLS server, and the error says so;
//! - rotating the CA bundle and the client certificate (files replaced atomically) under
//!   load fails no call, and new connections present the new certificate;
//! - `NOT_SERVING` over a `Watch` stream takes an endpoint out, over mTLS.
//!
//! Then, once: per-endpoint server names (`tls_server_name`), HTTPS health checks,
//! `TlsConnector` and `GrpcConnector` pools, the typed errors of bad files, reloads that keep
//! the last good set, and the expiry metric.
#![cfg(feature = "tls")]

#[cfg(feature = "prometheus")]
mod common;
mod tls_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest, SERVICE_NAME, ServingStatus};
use tai_loadbalancer::{
    BalancedChannel, ClientTls, ConnectionPool, Endpoint, EndpointHealth, EndpointMetadata, Error,
    GrpcConnector, HealthCheckConfig, HealthCheckKind, HealthState, IntegratedLoadBalancer,
    LoadBalancerConfig, LoadBalancingStrategy, PoolConfig, ServiceRegistry, TLS_SERVER_NAME_TAG,
    TlsConnector, TlsFiles,
};
use tls_support::{
    CURRENT_NOT_AFTER, Ca, GrpcioServer, Leaf, TempDir, grpcio_python, replace_file, server_tls,
};
use tonic::transport::{Certificate, ClientTlsConfig};

const SERVICE: &str = "greeter";
const NAME: &str = "greeter.test";

// ===== servers of both kinds =====

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Tonic,
    Grpcio,
}

/// What the tests need of a server, whichever implementation it is.
enum Server {
    Tonic(GreeterServer),
    Grpcio(GrpcioServer),
}

impl Server {
    fn address(&self) -> SocketAddr {
        match self {
            Server::Tonic(s) => s.address(),
            Server::Grpcio(s) => s.address,
        }
    }

    async fn set_serving(&mut self, serving: bool) {
        match self {
            Server::Tonic(s) => {
                let status = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                s.set_health(SERVICE_NAME, status).await;
            }
            Server::Grpcio(s) => s.set_health(SERVICE_NAME, serving),
        }
    }

    /// Calls the tonic server served to the client certificate `der` (tonic servers only).
    fn calls_from(&self, der: &[u8]) -> u64 {
        match self {
            Server::Tonic(s) => s.state().calls_from(der),
            Server::Grpcio(_) => unreachable!("grpcio servers report the client in their replies"),
        }
    }
}

/// Starts servers of one kind, or skips (grpcio without its interpreter, outside CI).
struct Servers {
    kind: Kind,
    python: Option<PathBuf>,
}

impl Servers {
    fn of(kind: Kind) -> Option<Servers> {
        let python = match kind {
            Kind::Tonic => None,
            Kind::Grpcio => Some(grpcio_python()?),
        };
        Some(Servers { kind, python })
    }

    fn start(&self, name: &str, leaf: &Leaf, client_cas: &[&Ca]) -> Server {
        match self.kind {
            Kind::Tonic => {
                Server::Tonic(GreeterServer::start_tls(name, server_tls(leaf, client_cas)).unwrap())
            }
            Kind::Grpcio => {
                let python = self.python.as_deref().unwrap();
                Server::Grpcio(GrpcioServer::start(python, name, leaf, client_cas))
            }
        }
    }
}

// ===== the client side =====

fn health_config(check: HealthCheckKind) -> HealthCheckConfig {
    HealthCheckConfig {
        enabled: true,
        interval: Duration::from_millis(300),
        timeout: Duration::from_millis(250),
        jitter: Duration::from_millis(10),
        unhealthy_threshold: 2,
        healthy_threshold: 1,
        grace_period: Duration::ZERO,
        check,
        ..Default::default()
    }
}

/// A balancer over `endpoints` of [`SERVICE`], with `check` health checks (if any); not
/// started: the tests start it once the service's TLS is set (before, checks would speak
/// plaintext to TLS servers).
async fn balancer(endpoints: Vec<Endpoint>, check: Option<HealthCheckKind>) -> Arc<IntegratedLoadBalancer> {
    let registry = Arc::new(ServiceRegistry::new());
    registry.register_batch(SERVICE, endpoints).await.unwrap();
    let config = LoadBalancerConfig {
        health_check: check.map(health_config).unwrap_or_default(),
        // Route by health alone (no panic mode): unhealthy endpoints get no calls.
        panic_threshold_percent: 0,
        ..Default::default()
    };
    let lb = IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
        .await
        .unwrap();
    Arc::new(lb)
}

fn tonic_tls(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name(NAME)
}

fn mtls(ca: &Ca, client: &Leaf) -> ClientTls {
    ClientTls::from_pem(
        ca.pem.as_bytes(),
        Some((client.cert_pem.as_bytes(), client.key_pem.as_bytes())),
    )
    .unwrap()
    .with_server_name(NAME)
    .unwrap()
}

async fn hello(channel: &BalancedChannel, name: &str) -> Result<tai_lb_greeter::HelloReply, tonic::Status> {
    let request = HelloRequest {
        name: name.to_owned(),
        ..Default::default()
    };
    GreeterClient::new(channel.clone())
        .say_hello(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Waits (bounded) until `endpoint`'s health state is `state` and routing follows it;
/// returns its status.
async fn wait_for_state(
    lb: &IntegratedLoadBalancer,
    endpoint: &Endpoint,
    state: HealthState,
) -> tai_loadbalancer::HealthStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = lb
            .health_checks()
            .get_health_status(SERVICE, endpoint)
            .await
            .unwrap();
        // The checker's verdict, and the routing snapshot that publishes it (a moment later).
        let routed = match state {
            HealthState::Healthy => EndpointHealth::Healthy,
            HealthState::Unhealthy => EndpointHealth::Unhealthy,
        };
        if status.state == state
            && status.checks > 0
            && lb.endpoint_health(SERVICE, endpoint.address) == Some(routed)
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not become {state:?} within 15 s: {status:?}",
            endpoint.address
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ===== calls over TLS and mTLS =====

async fn calls_succeed_over_tls_and_mtls(kind: Kind) {
    let Some(servers) = Servers::of(kind) else { return };
    let ca = Ca::new("test CA");
    let client = ca.client("client-1");
    let tls_only = servers.start("tls", &ca.server(&[NAME]), &[]);
    let mutual = servers.start("mtls", &ca.server(&[NAME]), &[&ca]);

    // TLS: tonic's ClientTlsConfig as it is; gRPC checks over the same TLS keep it healthy.
    let endpoint = Endpoint::new(tls_only.address(), None);
    let lb = balancer(vec![endpoint.clone()], Some(HealthCheckKind::grpc(SERVICE_NAME))).await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(tonic_tls(&ca))
        .build()
        .unwrap();
    lb.start().await.unwrap();
    for i in 0..20 {
        let reply = hello(&channel, &format!("tls-{i}")).await.unwrap();
        assert_eq!(reply.server, "tls");
        assert_eq!(
            reply.message.split('!').next().unwrap(),
            format!("Hello, tls-{i}")
        );
    }
    let status = wait_for_state(&lb, &endpoint, HealthState::Healthy).await;
    assert_eq!(status.failed_checks, 0, "{status:?}");

    // mTLS: a client identity from PEM.
    let endpoint = Endpoint::new(mutual.address(), None);
    let lb = balancer(vec![endpoint.clone()], Some(HealthCheckKind::grpc(SERVICE_NAME))).await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(mtls(&ca, &client))
        .build()
        .unwrap();
    lb.start().await.unwrap();
    for i in 0..20 {
        let reply = hello(&channel, &format!("mtls-{i}")).await.unwrap();
        assert_eq!(reply.server, "mtls");
        if kind == Kind::Grpcio {
            assert!(reply.message.ends_with("client=client-1"), "{}", reply.message);
        }
    }
    if let Server::Tonic(_) = &mutual {
        assert_eq!(mutual.calls_from(&client.der), 20);
    }
    let status = wait_for_state(&lb, &endpoint, HealthState::Healthy).await;
    assert_eq!(status.failed_checks, 0, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_over_tls_and_mtls_tonic() {
    calls_succeed_over_tls_and_mtls(Kind::Tonic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_over_tls_and_mtls_grpcio() {
    calls_succeed_over_tls_and_mtls(Kind::Grpcio).await;
}

// ===== bad server certificates =====

async fn bad_server_certificates_are_unhealthy_and_get_no_calls(kind: Kind) {
    let Some(servers) = Servers::of(kind) else { return };
    let ca = Ca::new("test CA");
    let stranger = Ca::new("unknown CA");
    let good = servers.start("good", &ca.server(&[NAME]), &[]);
    let wrong_name = servers.start("wrong-name", &ca.server(&["other.test"]), &[]);
    let expired = servers.start("expired", &ca.expired_server(&[NAME]), &[]);
    let unknown_ca = servers.start("unknown-ca", &stranger.server(&[NAME]), &[]);
    let endpoint = |s: &Server| Endpoint::new(s.address(), None);
    let all = [&good, &wrong_name, &expired, &unknown_ca];
    let lb = balancer(
        all.iter().map(|s| endpoint(s)).collect(),
        Some(HealthCheckKind::grpc(SERVICE_NAME)),
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(tonic_tls(&ca))
        .build()
        .unwrap();
    lb.start().await.unwrap();

    for (server, words) in [
        (&wrong_name, "name mismatch"),
        (&expired, "certificate expired"),
        (&unknown_ca, "unknown CA"),
    ] {
        let status = wait_for_state(&lb, &endpoint(server), HealthState::Unhealthy).await;
        let reason = status.last_error.unwrap_or_default();
        assert!(
            reason.contains(words),
            "{}: expected {words:?} in {reason:?}",
            server.address()
        );
    }
    assert!(
        wait_for_state(&lb, &endpoint(&good), HealthState::Healthy)
            .await
            .is_healthy()
    );

    for i in 0..60 {
        let reply = hello(&channel, &format!("call-{i}")).await.unwrap();
        assert_eq!(reply.server, "good", "call {i} went elsewhere");
    }
    if kind == Kind::Tonic {
        for server in [&wrong_name, &expired, &unknown_ca] {
            let Server::Tonic(s) = server else { unreachable!() };
            assert_eq!(
                s.state().received.load(Ordering::Relaxed),
                0,
                "{} got calls",
                s.name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_certificates_are_unhealthy_and_get_no_calls_tonic() {
    bad_server_certificates_are_unhealthy_and_get_no_calls(Kind::Tonic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_certificates_are_unhealthy_and_get_no_calls_grpcio() {
    bad_server_certificates_are_unhealthy_and_get_no_calls(Kind::Grpcio).await;
}

// ===== a client without a certificate =====

async fn client_without_certificate_is_refused(kind: Kind) {
    let Some(servers) = Servers::of(kind) else { return };
    let ca = Ca::new("test CA");
    let server = servers.start("mtls", &ca.server(&[NAME]), &[&ca]);
    let endpoint = Endpoint::new(server.address(), None);
    let lb = balancer(vec![endpoint.clone()], Some(HealthCheckKind::grpc(SERVICE_NAME))).await;
    let no_identity = ClientTls::from_pem(ca.pem.as_bytes(), None)
        .unwrap()
        .with_server_name(NAME)
        .unwrap();
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(no_identity)
        .build()
        .unwrap();
    lb.start().await.unwrap();
    let status = hello(&channel, "anonymous").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "the error should say a client certificate is needed: {status:?}"
    );
    let health = wait_for_state(&lb, &endpoint, HealthState::Unhealthy).await;
    let reason = health.last_error.unwrap_or_default();
    assert!(reason.contains("client certificate"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused_tonic() {
    client_without_certificate_is_refused(Kind::Tonic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused_grpcio() {
    client_without_certificate_is_refused(Kind::Grpcio).await;
}

// ===== rotation under load =====

/// Callers sending calls until told to stop; counts successes, failures, and replies that
/// name `client-v2` (grpcio servers put the client's name in the reply).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    from_v2: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(channel: &BalancedChannel, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok: Arc<AtomicU64> = Arc::default();
        let from_v2: Arc<AtomicU64> = Arc::default();
        let tasks = (0..callers)
            .map(|c| {
                let (channel, stop) = (channel.clone(), stop.clone());
                let (ok, from_v2) = (ok.clone(), from_v2.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    // Bounded: at most 20,000 calls per caller.
                    for i in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match hello(&channel, &format!("c{c}-{i}")).await {
                            Ok(reply) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if reply.message.ends_with("client=client-v2") {
                                    from_v2.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(status) => {
                                errors.push(format!("{status:?}"));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    errors
                })
            })
            .collect();
        Load {
            stop,
            ok,
            from_v2,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for task in self.tasks {
            errors.extend(task.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

async fn rotation_under_load_fails_no_call(kind: Kind) {
    let Some(servers) = Servers::of(kind) else { return };
    let (ca1, ca2) = (Ca::new("CA 1"), Ca::new("CA 2"));
    let (v1, v2) = (ca1.client("client-v1"), ca2.client("client-v2"));
    // A is from before the rotation (CA 1) and already trusts clients of both CAs; B is
    // from after it: a CA 2 certificate, and only CA 2 clients.
    let old = servers.start("old", &ca1.server(&[NAME]), &[&ca1, &ca2]);
    let new = servers.start("new", &ca2.server(&[NAME]), &[&ca2]);

    let dir = TempDir::new("rotation");
    let (ca_file, cert_file, key_file) = (dir.path("ca.pem"), dir.path("client.pem"), dir.path("client.key"));
    replace_file(&ca_file, &ca1.pem);
    replace_file(&cert_file, &v1.cert_pem);
    replace_file(&key_file, &v1.key_pem);
    let tls = TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert_file, &key_file)
        .poll_interval(Duration::from_millis(50))
        .watch()
        .unwrap()
        .with_server_name(NAME)
        .unwrap();
    assert_eq!(
        tls.stats().client_certificate_expiry_seconds(),
        Some(CURRENT_NOT_AFTER)
    );

    let old_endpoint = Endpoint::new(old.address(), None);
    let new_endpoint = Endpoint::new(new.address(), None);
    let lb = balancer(
        vec![old_endpoint.clone()],
        Some(HealthCheckKind::grpc(SERVICE_NAME)),
    )
    .await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(tls.clone())
        .build()
        .unwrap();
    lb.start().await.unwrap();
    let load = Load::start(&channel, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Rotate: the CA bundle gains CA 2, then the certificate, then (a moment later) its key.
    // Between the two renames the files are a mismatched pair: refused, the old set kept.
    replace_file(&ca_file, &format!("{}{}", ca1.pem, ca2.pem));
    replace_file(&cert_file, &v2.cert_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls.stats().failed_reloads == 0 {
        assert!(
            Instant::now() < deadline,
            "the mismatched pair was not noticed: {:?}",
            tls.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = tls.stats();
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("does not match"),
        "{refused:?}"
    );
    assert_eq!(refused.generation, 1, "a mismatched set must not be applied");
    replace_file(&key_file, &v2.key_pem);
    while tls.generation() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new set was not applied: {:?}",
            tls.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tls.stats().last_error, None);

    // The new server joins; it accepts only the new client certificate. Then the old leaves.
    lb.registry()
        .register(SERVICE, new_endpoint.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    lb.registry().deregister(SERVICE, &old_endpoint).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from_v2 = load.from_v2.load(Ordering::Relaxed);
    let (ok, errors) = load.stop().await;

    assert!(
        errors.is_empty(),
        "{} of {} calls failed: {:?}",
        errors.len(),
        ok,
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 200, "too little load to show anything: {ok} calls");
    match (&old, &new) {
        (Server::Tonic(_), Server::Tonic(_)) => {
            assert!(
                old.calls_from(&v1.der) > 0,
                "the old certificate was in use first"
            );
            assert!(
                new.calls_from(&v2.der) > 0,
                "new connections use the new certificate"
            );
            assert_eq!(new.calls_from(&v1.der), 0);
        }
        _ => assert!(from_v2 > 0, "new connections use the new certificate"),
    }
    let status = lb
        .health_checks()
        .get_health_status(SERVICE, &new_endpoint)
        .await
        .unwrap();
    assert!(
        status.is_healthy(),
        "checks of the new server use the new set: {status:?}"
    );

    // The expiry of the client certificate in use, and the reloads, as Prometheus metrics.
    #[cfg(feature = "prometheus")]
    {
        let text = tai_loadbalancer::encode_prometheus(&lb);
        for line in [
            format!(
                "tai_lb_tls_client_certificate_expiry_timestamp_seconds{{service=\"{SERVICE}\"}} {CURRENT_NOT_AFTER}"
            ),
            format!("tai_lb_tls_generation{{service=\"{SERVICE}\"}} 2"),
            format!("tai_lb_tls_reloads_total{{service=\"{SERVICE}\",outcome=\"applied\"}} 1"),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        common::promtool_check(&text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_call_tonic() {
    rotation_under_load_fails_no_call(Kind::Tonic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_call_grpcio() {
    rotation_under_load_fails_no_call(Kind::Grpcio).await;
}

// ===== NOT_SERVING over Watch, over mTLS =====

async fn not_serving_over_watch_takes_endpoint_out(kind: Kind) {
    let Some(servers) = Servers::of(kind) else { return };
    let ca = Ca::new("test CA");
    let client = ca.client("client-1");
    let mut first = servers.start("first", &ca.server(&[NAME]), &[&ca]);
    let second = servers.start("second", &ca.server(&[NAME]), &[&ca]);
    let (e1, e2) = (
        Endpoint::new(first.address(), None),
        Endpoint::new(second.address(), None),
    );
    let mut check = health_config(HealthCheckKind::grpc_watch(SERVICE_NAME));
    check.interval = Duration::from_secs(5); // only a pushed change can act within it
    check.timeout = Duration::from_secs(3);
    check.unhealthy_threshold = 1;
    let registry = Arc::new(ServiceRegistry::new());
    registry
        .register_batch(SERVICE, vec![e1.clone(), e2.clone()])
        .await
        .unwrap();
    let config = LoadBalancerConfig {
        health_check: check,
        panic_threshold_percent: 0,
        ..Default::default()
    };
    let lb = Arc::new(
        IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, config)
            .await
            .unwrap(),
    );
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(mtls(&ca, &client))
        .build()
        .unwrap();
    lb.start().await.unwrap();
    wait_for_state(&lb, &e1, HealthState::Healthy).await;
    wait_for_state(&lb, &e2, HealthState::Healthy).await;

    let pushed = Instant::now();
    first.set_serving(false).await;
    let status = wait_for_state(&lb, &e1, HealthState::Unhealthy).await;
    assert!(
        pushed.elapsed() < Duration::from_secs(4),
        "the push acted, not the 5 s interval"
    );
    assert!(status.last_error.unwrap_or_default().contains("NOT_SERVING"));
    for i in 0..30 {
        assert_eq!(hello(&channel, &format!("w{i}")).await.unwrap().server, "second");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_over_watch_takes_endpoint_out_tonic() {
    not_serving_over_watch_takes_endpoint_out(Kind::Tonic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_over_watch_takes_endpoint_out_grpcio() {
    not_serving_over_watch_takes_endpoint_out(Kind::Grpcio).await;
}

// ===== per-endpoint server names =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_verifies_its_tls_server_name_tag() {
    let ca = Ca::new("test CA");
    let s0 = GreeterServer::start_tls("s0", server_tls(&ca.server(&["s0.greeter.test"]), &[])).unwrap();
    let s1 = GreeterServer::start_tls("s1", server_tls(&ca.server(&["s1.greeter.test"]), &[])).unwrap();
    let tagged = |s: &GreeterServer, name: &str| {
        Endpoint::new(
            s.address(),
            Some(EndpointMetadata::new().with_tag(TLS_SERVER_NAME_TAG, name)),
        )
    };
    // s1's tag names s0's certificate: a name mismatch, found by the checks.
    let endpoints = vec![tagged(&s0, "s0.greeter.test"), tagged(&s1, "s0.greeter.test")];
    let lb = balancer(endpoints.clone(), Some(HealthCheckKind::grpc(SERVICE_NAME))).await;
    let channel = BalancedChannel::builder(lb.clone(), SERVICE)
        .tls(tonic_tls(&ca)) // the service's name (greeter.test) is on neither certificate
        .build()
        .unwrap();
    lb.start().await.unwrap();
    let status = wait_for_state(&lb, &endpoints[1], HealthState::Unhealthy).await;
    assert!(status.last_error.unwrap_or_default().contains("name mismatch"));
    for i in 0..10 {
        assert_eq!(hello(&channel, &format!("n{i}")).await.unwrap().server, "s0");
    }
    // Fixed tag: back in routing, verified by its own name.
    lb.registry()
        .register(SERVICE, tagged(&s1, "s1.greeter.test"))
        .await
        .unwrap();
    wait_for_state(&lb, &endpoints[1], HealthState::Healthy).await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        seen.insert(hello(&channel, &format!("m{i}")).await.unwrap().server);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["s0", "s1"]);

    // A changed tag applies to the endpoint's open connections too: s1 is now asked for
    // s0's name, so its new connections fail the handshake (before the checks notice, calls
    // that picked it are retried on s0).
    lb.registry()
        .register(SERVICE, tagged(&s1, "s0.greeter.test"))
        .await
        .unwrap();
    let served_by_s1 = s1.state().served.load(Ordering::Relaxed);
    for i in 0..10 {
        assert_eq!(hello(&channel, &format!("o{i}")).await.unwrap().server, "s0");
    }
    assert_eq!(s1.state().served.load(Ordering::Relaxed), served_by_s1);

    // A tag that is not a name at all is that endpoint's error, not a panic or a stall.
    lb.registry()
        .register(SERVICE, tagged(&s1, "not a name!"))
        .await
        .unwrap();
    let status = wait_for_state(&lb, &endpoints[1], HealthState::Unhealthy).await;
    assert!(
        status
            .last_error
            .unwrap_or_default()
            .contains("not a valid TLS server name")
    );
    assert_eq!(hello(&channel, "still").await.unwrap().server, "s0");
}

// ===== HTTPS checks and raw TLS pools =====

/// A TLS server on loopback (tokio-rustls): answers every connection with `respond` after
/// reading the first bytes (HTTP) or echoes (when `respond` is `None`).
async fn tls_server(leaf: &Leaf, alpn: &[&[u8]], respond: Option<&'static [u8]>) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let written = match respond {
                        Some(answer) => stream.write_all(answer).await,
                        None => stream.write_all(&buf[..n]).await,
                    };
                    if written.is_err() || respond.is_some() {
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_checks_use_the_service_roots() {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let ca = Ca::new("test CA");
    let good = tls_server(&ca.server(&[NAME]), &[b"http/1.1"], Some(OK)).await;
    let expired = tls_server(&ca.expired_server(&[NAME]), &[b"http/1.1"], Some(OK)).await;
    let (good, expired) = (Endpoint::new(good, None), Endpoint::new(expired, None));
    let lb = balancer(
        vec![good.clone(), expired.clone()],
        Some(HealthCheckKind::http("/healthz")),
    )
    .await;
    let tls = ClientTls::from_pem(ca.pem.as_bytes(), None)
        .unwrap()
        .with_server_name(NAME)
        .unwrap();
    lb.health_checks().set_tls(SERVICE, tls);
    lb.start().await.unwrap();
    let status = wait_for_state(&lb, &expired, HealthState::Unhealthy).await;
    assert!(
        status
            .last_error
            .unwrap_or_default()
            .contains("certificate expired")
    );
    let status = wait_for_state(&lb, &good, HealthState::Healthy).await;
    assert!(status.checks > 0 && status.failed_checks == 0, "{status:?}");

    // Settings given as a tonic ClientTlsConfig cannot serve HTTPS: the check says why.
    lb.health_checks()
        .set_tls(SERVICE, ClientTls::from(tonic_tls(&ca)));
    let status = wait_for_state(&lb, &good, HealthState::Unhealthy).await;
    assert!(status.last_error.unwrap_or_default().contains("serve gRPC only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connector_pools_connections_and_words_failures() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = Ca::new("test CA");
    let echo = Endpoint::new(tls_server(&ca.server(&[NAME]), &[b"echo"], None).await, None);
    let tls = ClientTls::from_pem(ca.pem.as_bytes(), None)
        .unwrap()
        .with_server_name(NAME)
        .unwrap();
    let pool = ConnectionPool::new(
        PoolConfig::default(),
        TlsConnector::new(tls).unwrap().alpn(["echo"]),
    )
    .unwrap();
    for _ in 0..3 {
        let mut conn = pool.acquire(&echo).await.unwrap();
        assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"echo"[..]));
        conn.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        conn.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");
    }
    assert_eq!(pool.stats(&echo).unwrap().created, 1, "one connection, reused");

    let stranger = Ca::new("unknown CA");
    let wrong = ClientTls::from_pem(stranger.pem.as_bytes(), None)
        .unwrap()
        .with_server_name(NAME)
        .unwrap();
    let pool = ConnectionPool::new(PoolConfig::default(), TlsConnector::new(wrong).unwrap()).unwrap();
    match pool.acquire(&echo).await {
        Err(Error::Connect { address, reason }) => {
            assert_eq!(address, echo.address);
            assert!(reason.contains("unknown CA"), "{reason}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }

    assert!(matches!(
        TlsConnector::new(ClientTls::from(tonic_tls(&ca))),
        Err(Error::TlsConfig { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connector_speaks_mtls() {
    let ca = Ca::new("test CA");
    let client = ca.client("pooled");
    let server = GreeterServer::start_tls("pooled", server_tls(&ca.server(&[NAME]), &[&ca])).unwrap();
    let endpoint = Endpoint::new(server.address(), None);
    let pool = ConnectionPool::new(
        PoolConfig::default(),
        GrpcConnector::new().tls(mtls(&ca, &client)),
    )
    .unwrap();
    let channel = pool.acquire(&endpoint).await.unwrap();
    let reply = GreeterClient::new(channel.clone())
        .say_hello(HelloRequest {
            name: "pool".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.server, "pooled");
    assert_eq!(server.state().calls_from(&client.der), 1);

    let expired = GreeterServer::start_tls("expired", server_tls(&ca.expired_server(&[NAME]), &[])).unwrap();
    let pool = ConnectionPool::new(PoolConfig::default(), GrpcConnector::new().tls(tonic_tls(&ca))).unwrap();
    match pool.acquire(&Endpoint::new(expired.address(), None)).await {
        Err(Error::Connect { reason, .. }) => assert!(reason.contains("certificate expired"), "{reason}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

// ===== bad input, reloads, expiry =====

#[test]
fn bad_files_are_typed_errors_that_name_the_file() {
    let ca = Ca::new("test CA");
    let (a, b) = (ca.client("a"), ca.client("b"));
    let dir = TempDir::new("bad-input");
    let write = |name: &str, text: &str| {
        let path = dir.path(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_file = write("ca.pem", &ca.pem);
    let name = |p: &PathBuf| p.display().to_string();

    let missing = dir.path("missing.pem");
    match TlsFiles::new().ca_file(&missing).load() {
        Err(Error::TlsFile { path, .. }) => assert_eq!(path, name(&missing)),
        other => panic!("{other:?}"),
    }
    let garbage = write("garbage.pem", "hello");
    match TlsFiles::new().ca_file(&garbage).load() {
        Err(error @ Error::TlsPem { .. }) => {
            assert!(error.to_string().contains(&name(&garbage)), "{error}");
            assert!(error.to_string().contains("CA certificate"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let broken = write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    assert!(matches!(
        TlsFiles::new().ca_file(&broken).load(),
        Err(Error::TlsPem { .. })
    ));
    let (cert_a, key_b) = (write("a.pem", &a.cert_pem), write("b.key", &b.key_pem));
    match TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert_a, &key_b)
        .load()
    {
        Err(Error::TlsKeyMismatch { certificate, key }) => {
            assert_eq!((certificate, key), (name(&cert_a), name(&key_b)));
        }
        other => panic!("{other:?}"),
    }
    let cert_as_key = write("cert-as-key.pem", &a.cert_pem);
    match TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert_a, &cert_as_key)
        .load()
    {
        Err(Error::TlsPem { what, origin, .. }) => {
            assert_eq!((what, origin), ("private key", name(&cert_as_key)))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(TlsFiles::new().load(), Err(Error::TlsConfig { .. })));
    assert!(matches!(
        ClientTls::from_pem(
            ca.pem.as_bytes(),
            Some((a.cert_pem.as_bytes(), b.key_pem.as_bytes()))
        ),
        Err(Error::TlsKeyMismatch { .. })
    ));
    assert!(matches!(
        TlsFiles::new().ca_file(&ca_file).watch(),
        Err(Error::Runtime { .. })
    ));

    let key_a = write("a.key", &a.key_pem);
    let tls = TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert_a, &key_a)
        .load()
        .unwrap();
    let stats = tls.stats();
    assert_eq!(stats.client_certificate_expiry_seconds(), Some(CURRENT_NOT_AFTER));
    assert_eq!(
        stats
            .ca_not_after
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        Some(2_366_841_600) // 2045-01-01
    );
    assert!(
        stats
            .client_certificate_expires_in()
            .is_some_and(|d| d > Duration::from_secs(86_400 * 365))
    );
    assert_eq!((stats.generation, stats.reloads, stats.watching), (1, 0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_last_good_set() {
    let ca = Ca::new("test CA");
    let (v1, v2) = (ca.client("v1"), ca.client("v2"));
    let dir = TempDir::new("reload");
    let (ca_file, cert, key) = (dir.path("ca.pem"), dir.path("c.pem"), dir.path("c.key"));
    replace_file(&ca_file, &ca.pem);
    replace_file(&cert, &v1.cert_pem);
    replace_file(&key, &v1.key_pem);
    let tls = TlsFiles::new()
        .ca_file(&ca_file)
        .identity_files(&cert, &key)
        .poll_interval(Duration::from_millis(20))
        .watch()
        .unwrap();
    let wait = |what: &'static str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: {:?}", tls.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Unchanged files: no new generation (connections are not remade for nothing).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tls.generation(), 1);

    replace_file(&ca_file, "-----BEGIN CERTIFICATE-----\ntruncated");
    wait("a broken CA file is refused", &|| tls.stats().failed_reloads >= 1);
    let stats = tls.stats();
    assert_eq!(stats.generation, 1);
    assert!(stats.last_error.unwrap().contains(&ca_file.display().to_string()));

    std::fs::remove_file(&key).unwrap();
    wait("a missing key is refused", &|| {
        tls.stats().last_error.is_some_and(|e| e.contains("c.key"))
    });
    assert_eq!(tls.generation(), 1);

    replace_file(&ca_file, &ca.pem);
    replace_file(&cert, &v2.cert_pem);
    replace_file(&key, &v2.key_pem);
    wait("the fixed set is applied", &|| tls.generation() == 2);
    let stats = tls.stats();
    assert_eq!((stats.reloads, stats.last_error), (1, None));
    assert!(stats.failed_reloads >= 2);
}

#[test]
fn system_roots_load_when_the_system_has_them() {
    // Debian's `ca-certificates` (installed by .ci/run) provides the bundle; without it the
    // request is a typed error, not an empty trust store.
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    match TlsFiles::new().native_roots(true).load() {
        Ok(tls) => {
            assert!(bundle.exists(), "roots loaded, but from where?");
            assert_eq!(tls.stats().generation, 1);
        }
        Err(Error::TlsConfig { reason }) => {
            assert!(!bundle.exists(), "the system has roots, yet: {reason}");
            assert!(reason.contains("system's root certificates"), "{reason}");
        }
        Err(other) => panic!("{other:?}"),
    }
}
