//! What TLS costs (feature `tls`), with plaintext measured in the same run as the baseline.
//!
//! * `tls_new_connection/*`: opening one connection to a loopback greeter server and closing
//!   it: TCP and the HTTP/2 handshake (tonic's `Endpoint::connect`), in plaintext, over TLS,
//!   and over mTLS (the client presents a certificate); and `TlsConnector` alone (TCP and
//!   the TLS handshake, no HTTP/2), the pool's cost per new connection. ECDSA P-256
//!   certificates (rcgen's default), TLS 1.3, rustls with ring.
//! * `grpc_unary_tls/*`: one unary call on connections already open, one caller: tonic's own
//!   `Channel` to one server, and a `BalancedChannel` over three servers, each in plaintext
//!   and over mTLS.
//!
//! After criterion, the four unary clients again in 15 short interleaved rounds (the machine
//! is shared and noisy): the median round's time per call, with the range.
//!
//! Run: `cargo bench --features tls --bench tls -- --warm-up-time 1 --measurement-time 3`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tai_lb_greeter::{GreeterClient, GreeterServer, HelloRequest};
use tai_loadbalancer::{
    BalancedChannel, ClientTls, Connector, Endpoint, IntegratedLoadBalancer, LoadBalancerConfig,
    LoadBalancingStrategy, ServiceRegistry, TlsConnector,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

const NAME: &str = "greeter.bench";

/// A CA, a server certificate for [`NAME`], a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, "bench CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(params, ca_key);
    let leaf = |name: &str, usage| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).expect("leaf").pem(),
            key.serialize_pem(),
        )
    };
    Pki {
        ca,
        server: leaf(NAME, ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf("bench-client", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

impl Pki {
    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.server.0, &self.server.1))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }

    fn client_tls(&self, with_identity: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(NAME);
        if with_identity {
            tls.identity(Identity::from_pem(&self.client.0, &self.client.1))
        } else {
            tls
        }
    }

    fn mtls(&self) -> ClientTls {
        ClientTls::from_pem(
            self.ca.as_bytes(),
            Some((self.client.0.as_bytes(), self.client.1.as_bytes())),
        )
        .expect("PEM")
        .with_server_name(NAME)
        .expect("name")
    }
}

fn request() -> HelloRequest {
    HelloRequest {
        name: "bench".into(),
        ..Default::default()
    }
}

async fn balanced(servers: &[GreeterServer], tls: Option<ClientTls>) -> GreeterClient<BalancedChannel> {
    let registry = Arc::new(ServiceRegistry::new());
    for server in servers {
        registry
            .register("greeter", Endpoint::new(server.address(), None))
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
    let mut builder = BalancedChannel::builder(lb, "greeter");
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    GreeterClient::new(builder.build().expect("channel"))
}

/// Runs `op` `iters` times in a row on the runtime; the time they took.
async fn timed<F, Fut>(iters: u64, mut op: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for _ in 0..iters {
        op().await;
    }
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = pki();
    let plain: Vec<_> = (0..3)
        .map(|i| GreeterServer::start(&format!("p{i}")).expect("server"))
        .collect();
    let secure: Vec<_> = (0..3)
        .map(|i| GreeterServer::start_tls(&format!("t{i}"), pki.server_tls()).expect("server"))
        .collect();

    let mut group = c.benchmark_group("tls_new_connection");
    let plain_uri = format!("http://{}", plain[0].address());
    let secure_uri = format!("https://{}", secure[0].address());
    let plain_endpoint = Channel::from_shared(plain_uri.clone()).expect("uri");
    group.bench_function("plaintext", |b| {
        b.iter_custom(|iters| {
            rt.block_on(timed(iters, || async {
                drop(plain_endpoint.connect().await.expect("connect"));
            }))
        });
    });
    for (label, identity) in [("tls", false), ("mtls", true)] {
        let endpoint = Channel::from_shared(secure_uri.clone())
            .expect("uri")
            .tls_config(pki.client_tls(identity))
            .expect("tls");
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(timed(iters, || async {
                    drop(endpoint.connect().await.expect("connect"));
                }))
            });
        });
    }
    let connector = TlsConnector::new(pki.mtls()).expect("connector").alpn(["h2"]);
    let endpoint = Endpoint::new(secure[0].address(), None);
    group.bench_function("tls_connector_mtls_no_http2", |b| {
        b.iter_custom(|iters| {
            rt.block_on(timed(iters, || async {
                drop(connector.connect(&endpoint).await.expect("connect"));
            }))
        });
    });
    group.finish();

    let mut group = c.benchmark_group("grpc_unary_tls");
    let (tonic_plain, tonic_mtls, ours_plain, ours_mtls) = rt.block_on(async {
        let tonic_plain = GreeterClient::new(
            Channel::from_shared(plain_uri.clone())
                .expect("uri")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect"),
        );
        let tonic_mtls = GreeterClient::new(
            Channel::from_shared(secure_uri.clone())
                .expect("uri")
                .tls_config(pki.client_tls(true))
                .expect("tls")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect"),
        );
        (
            tonic_plain,
            tonic_mtls,
            balanced(&plain, None).await,
            balanced(&secure, Some(pki.mtls())).await,
        )
    });
    macro_rules! unary {
        ($label:expr, $client:expr) => {
            let client = $client;
            group.bench_function($label, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(timed(iters, || {
                        let mut client = client.clone();
                        async move {
                            client.say_hello(request()).await.expect("call");
                        }
                    }))
                });
            });
        };
    }
    unary!("tonic_channel/plaintext", tonic_plain.clone());
    unary!("tonic_channel/mtls", tonic_mtls.clone());
    unary!("balanced_channel/plaintext", ours_plain.clone());
    unary!("balanced_channel/mtls", ours_mtls.clone());
    group.finish();

    // The machine is shared: the four clients again, in short rounds interleaved in a
    // rotating order so that noise hits them alike; the median round per client.
    const ROUNDS: usize = 15;
    const CALLS: u64 = 300;
    let mut per_call: [Vec<f64>; 4] = Default::default();
    rt.block_on(async {
        for round in 0..ROUNDS {
            for k in 0..4 {
                let which = (round + k) % 4;
                let elapsed = match which {
                    0 => calls(&tonic_plain, CALLS).await,
                    1 => calls(&tonic_mtls, CALLS).await,
                    2 => calls(&ours_plain, CALLS).await,
                    _ => calls(&ours_mtls, CALLS).await,
                };
                per_call[which].push(elapsed.as_secs_f64() * 1e6 / CALLS as f64);
            }
        }
    });
    println!("\ninterleaved rounds ({ROUNDS} x {CALLS} calls each), median µs per call:");
    for (label, mut samples) in [
        "tonic_channel/plaintext",
        "tonic_channel/mtls",
        "balanced_channel/plaintext",
        "balanced_channel/mtls",
    ]
    .into_iter()
    .zip(per_call)
    {
        samples.sort_by(f64::total_cmp);
        println!(
            "  {label:28} {:7.1}  (rounds {:.1} to {:.1})",
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1]
        );
    }
}

/// `n` calls in a row on `client`.
async fn calls<C>(client: &GreeterClient<C>, n: u64) -> Duration
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = client.clone();
    let started = Instant::now();
    for _ in 0..n {
        client.say_hello(request()).await.expect("call");
    }
    started.elapsed()
}

criterion_group!(benches, bench);
criterion_main!(benches);
