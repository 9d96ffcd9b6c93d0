//! The `greeter.v1.Greeter` gRPC service that tai-loadbalancer's demo, end-to-end tests and
//! benches call: the generated code ([`pb`]), a service whose replies name the instance that
//! answered and which can be told to wait, fail or refuse ([`NamedGreeter`]), and a loopback
//! server with the standard health service that can be killed abruptly and restarted on the
//! same port ([`GreeterServer`]).
//!
//! Code generation runs at build time with `tonic-prost-build` and the vendored `protoc` of
//! `protoc-bin-vendored` (no system package needed).

/// Generated messages, client and server of `greeter.v1`.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("greeter.v1");
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub use pb::greeter_client::GreeterClient;
use pb::greeter_server::Greeter;
pub use pb::{HelloReply, HelloRequest};
use tonic::{Request, Response, Status};
pub use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The gRPC service name of the greeter (for health checks).
pub const SERVICE_NAME: &str = "greeter.v1.Greeter";

/// The full path of `SayHello` (for retry policies).
pub const SAY_HELLO_PATH: &str = "/greeter.v1.Greeter/SayHello";

/// Counters and switches shared by a greeter and its owner.
#[derive(Debug, Default)]
pub struct GreeterState {
    /// Calls answered with a reply.
    pub served: AtomicU64,
    /// Calls answered `UNAVAILABLE` because [`refuse`](Self::refuse) was set.
    pub refused: AtomicU64,
    /// Calls that reached the handler (all of them).
    pub received: AtomicU64,
    /// When set, every call is answered `UNAVAILABLE` at once.
    pub refuse: AtomicBool,
    /// TCP connections accepted (over every start of the server).
    pub connections: AtomicU64,
    /// Milliseconds every reply is held back (0: none), to make one server slow.
    pub delay_ms: AtomicU64,
    /// Calls served per client certificate (its DER bytes), over TLS with client
    /// certificates (see [`GreeterServer::start_tls`]).
    pub client_certificates: std::sync::Mutex<std::collections::HashMap<Vec<u8>, u64>>,
    /// Calls in the handler now.
    pub in_flight: AtomicU64,
    /// The most calls that were in the handler at once.
    pub max_in_flight: AtomicU64,
    /// While `true`, calls wait in the handler (see [`hold`](Self::hold)).
    gate: tokio::sync::watch::Sender<bool>,
}

impl GreeterState {
    /// Makes every call wait in the handler (counted in [`in_flight`](Self::in_flight))
    /// until [`release`](Self::release): a server as slow as a test needs, without timing.
    pub fn hold(&self) {
        self.gate.send_replace(true);
    }

    /// Lets held calls (and later ones) go on.
    pub fn release(&self) {
        self.gate.send_replace(false);
    }

    /// Calls served to the client certificate `der`.
    pub fn calls_from(&self, der: &[u8]) -> u64 {
        let seen = self.client_certificates.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(der).copied().unwrap_or(0)
    }
}

/// A greeter that answers as `name`.
#[derive(Clone, Debug)]
pub struct NamedGreeter {
    name: String,
    state: Arc<GreeterState>,
}

impl NamedGreeter {
    /// A greeter answering as `name`, with its counters in `state`.
    pub fn new(name: impl Into<String>, state: Arc<GreeterState>) -> Self {
        Self {
            name: name.into(),
            state,
        }
    }

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> pb::greeter_server::GreeterServer<Self> {
        pb::greeter_server::GreeterServer::new(self)
    }
}

/// Counts a call in [`GreeterState::in_flight`] while it lives.
struct InFlight<'a>(&'a GreeterState);

impl<'a> InFlight<'a> {
    fn new(state: &'a GreeterState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl Greeter for NamedGreeter {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let _in_flight = InFlight::new(&self.state);
        self.state.received.fetch_add(1, Ordering::Relaxed);
        let mut gate = self.state.gate.subscribe();
        // A closed sender cannot happen (the state owns it); either way, go on.
        let _ = gate.wait_for(|held| !*held).await;
        if self.state.refuse.load(Ordering::Relaxed) {
            self.state.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable(format!("{} refuses calls", self.name)));
        }
        if let Some(leaf) = request.peer_certs().as_deref().and_then(|chain| chain.first()) {
            let mut seen = self
                .state
                .client_certificates
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *seen.entry(leaf.as_ref().to_vec()).or_default() += 1;
        }
        let request = request.into_inner();
        let slow = self.state.delay_ms.load(Ordering::Relaxed);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(request.delay_ms))).await;
        }
        if request.fail_with != 0 {
            return Err(Status::new(tonic::Code::from(request.fail_with), "asked to fail"));
        }
        self.state.served.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(HelloReply {
            message: format!("Hello, {}!", request.name),
            server: self.name.clone(),
        }))
    }
}

/// A greeter server on loopback, with `grpc.health.v1` (reporting `SERVING` for the server and
/// for [`SERVICE_NAME`]), running on its own thread and runtime so that [`kill`](Self::kill)
/// drops every connection at once, like a crashed process.
#[derive(Debug)]
pub struct GreeterServer {
    name: String,
    address: SocketAddr,
    state: Arc<GreeterState>,
    health: HealthReporter,
    settings: Settings,
    running: Option<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

/// How a server is set up (kept to restart it alike).
#[derive(Clone, Debug, Default)]
struct Settings {
    tls: Option<tonic::transport::ServerTlsConfig>,
    max_concurrent_streams: Option<u32>,
}

/// Builds a [`GreeterServer`] with options: see [`GreeterServer::builder`].
#[derive(Debug)]
pub struct GreeterServerBuilder {
    name: String,
    address: SocketAddr,
    settings: Settings,
}

impl GreeterServerBuilder {
    /// Listen on `address` (a loopback address; port 0 for an ephemeral one).
    pub fn address(mut self, address: SocketAddr) -> Self {
        self.address = address;
        self
    }

    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: calls beyond it on one connection wait in
    /// the client for a stream.
    pub fn max_concurrent_streams(mut self, streams: u32) -> Self {
        self.settings.max_concurrent_streams = Some(streams);
        self
    }

    /// Starts the server.
    pub fn start(self) -> std::io::Result<GreeterServer> {
        GreeterServer::start_with_state(
            &self.name,
            self.address,
            Arc::new(GreeterState::default()),
            self.settings,
        )
    }
}

impl GreeterServer {
    /// Starts `name` on an ephemeral port of 127.0.0.1.
    pub fn start(name: &str) -> std::io::Result<Self> {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// A server named `name`, on an ephemeral port of 127.0.0.1 unless set, with options.
    pub fn builder(name: &str) -> GreeterServerBuilder {
        GreeterServerBuilder {
            name: name.to_owned(),
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            settings: Settings::default(),
        }
    }

    /// Starts `name` on `address` (a loopback address; port 0 for an ephemeral one).
    pub fn start_on(name: &str, address: SocketAddr) -> std::io::Result<Self> {
        Self::start_with_state(
            name,
            address,
            Arc::new(GreeterState::default()),
            Settings::default(),
        )
    }

    /// Starts `name` on an ephemeral port of 127.0.0.1, serving TLS (rustls) with `tls`:
    /// its identity, and with `client_ca_root` set, mTLS (client certificates required
    /// unless `client_auth_optional`). Calls are counted per client certificate in
    /// [`GreeterState::client_certificates`].
    pub fn start_tls(name: &str, tls: tonic::transport::ServerTlsConfig) -> std::io::Result<Self> {
        let address = SocketAddr::from(([127, 0, 0, 1], 0));
        let settings = Settings {
            tls: Some(tls),
            ..Settings::default()
        };
        Self::start_with_state(name, address, Arc::new(GreeterState::default()), settings)
    }

    fn start_with_state(
        name: &str,
        address: SocketAddr,
        state: Arc<GreeterState>,
        settings: Settings,
    ) -> std::io::Result<Self> {
        if !address.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "greeter servers listen on loopback only",
            ));
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let greeter = NamedGreeter::new(name, state.clone()).into_service();
        let accepted = state.clone();
        let reporter = health.clone();
        let server_tls = settings.tls.clone();
        let max_concurrent_streams = settings.max_concurrent_streams;
        let thread = std::thread::Builder::new()
            .name(format!("greeter-{name}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let bound = async {
                        let socket = if address.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        socket.set_reuseaddr(true)?;
                        socket.bind(address)?;
                        socket.listen(1024)
                    }
                    .await;
                    let listener = match bound {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut builder =
                        tonic::transport::Server::builder().max_concurrent_streams(max_concurrent_streams);
                    if let Some(tls) = server_tls {
                        builder = match builder.tls_config(tls) {
                            Ok(builder) => builder,
                            Err(e) => {
                                let _ = ready_tx.send(Err(std::io::Error::other(e)));
                                return;
                            }
                        };
                    }
                    reporter.set_service_status("", ServingStatus::Serving).await;
                    reporter
                        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
                        .await;
                    let _ = ready_tx.send(listener.local_addr());
                    // Replies are small writes: without TCP_NODELAY, Nagle's algorithm holds
                    // one back until the client's delayed ACK (~40 ms) whenever an earlier
                    // reply on the connection is still unacknowledged.
                    let incoming = tokio_stream::StreamExt::map(
                        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                        move |connection| {
                            if connection.is_ok() {
                                accepted.connections.fetch_add(1, Ordering::Relaxed);
                            }
                            connection
                        },
                    );
                    let server = builder
                        .add_service(health_service)
                        .add_service(greeter)
                        .serve_with_incoming(incoming);
                    tokio::select! {
                        _ = server => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: peers see the sockets close.
                drop(runtime);
            })?;
        let address = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("greeter thread ended before listening"))??;
        Ok(Self {
            name: name.to_owned(),
            address,
            state,
            health,
            settings,
            running: Some((stop_tx, thread)),
        })
    }

    /// The server's name (in its replies).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its counters and switches.
    pub fn state(&self) -> &Arc<GreeterState> {
        &self.state
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops it abruptly: the listener and every connection close at once, calls in progress
    /// are cut off (as when a process crashes). Returns when the sockets are closed.
    pub fn kill(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }

    /// Starts it again on the same port, with the same counters.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let restarted = Self::start_with_state(
            &self.name,
            self.address,
            self.state.clone(),
            self.settings.clone(),
        )?;
        *self = restarted;
        Ok(())
    }

    /// Sets what its health service answers for `service` (`""`: the server as a whole).
    pub async fn set_health(&self, service: &str, status: ServingStatus) {
        self.health.set_service_status(service, status).await;
    }
}

impl Drop for GreeterServer {
    fn drop(&mut self) {
        self.kill();
    }
}
