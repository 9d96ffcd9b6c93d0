//! The probes behind each [`HealthCheckKind`]: TCP connect, HTTP/1.1 `GET`, gRPC health
//! (`Check`, or `Watch` streams), or a custom check. Timeouts are applied by the caller.
#![deny(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;

#[cfg(feature = "grpc")]
use super::grpc_watch::WatchProbe;
use crate::config::health::{HealthCheck, HealthCheckConfig, HealthCheckKind, StatusRange};
use crate::endpoint::Endpoint;
use crate::sync::{DataArc, DataWeak};

/// The TLS settings a check of one service uses: the service's [`ClientTls`] (feature
/// `tls`), set by the channel built for it or by [`HealthCheckManager::set_tls`]. Without the
/// feature, checks are plaintext, always.
///
/// [`ClientTls`]: crate::ClientTls
/// [`HealthCheckManager::set_tls`]: crate::HealthCheckManager::set_tls
#[cfg(feature = "tls")]
pub(super) type Tls = crate::tls::ClientTls;

/// Without the `tls` feature there are no TLS settings: `Option<&Tls>` is always `None`.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub(super) enum Tls {}

/// Who a probe asks to check an endpoint again at once (the manager), when the probe learns
/// on its own that the endpoint's health changed (a `Watch` stream's push).
#[cfg_attr(not(feature = "grpc"), allow(dead_code))] // only `Watch` probes push
pub(super) trait Recheck: Send + Sync {
    /// Makes every target at `address` due now and wakes the scheduler.
    fn recheck(&self, address: SocketAddr);
}

/// A probe, built once from the configured kind.
pub(super) enum Probe {
    Tcp,
    Http {
        path: String,
        expected: StatusRange,
        host: Option<String>,
    },
    #[cfg(feature = "grpc")]
    Grpc {
        service: String,
    },
    #[cfg(feature = "grpc")]
    GrpcWatch(WatchProbe),
    Custom(DataArc<dyn HealthCheck>),
}

impl Probe {
    /// The probe of `config.check`; `recheck` hears the pushes of probes that have them.
    pub(super) fn new(config: &HealthCheckConfig, recheck: DataWeak<dyn Recheck>) -> Self {
        #[cfg(not(feature = "grpc"))]
        let _ = recheck;
        match &config.check {
            HealthCheckKind::Tcp => Probe::Tcp,
            HealthCheckKind::Http {
                path,
                expected_status,
                host,
            } => Probe::Http {
                path: path.clone(),
                expected: *expected_status,
                host: host.clone(),
            },
            #[cfg(feature = "grpc")]
            HealthCheckKind::Grpc { service } => Probe::Grpc {
                service: service.clone(),
            },
            #[cfg(feature = "grpc")]
            HealthCheckKind::GrpcWatch { service } => {
                Probe::GrpcWatch(WatchProbe::new(service.clone(), config.interval, recheck))
            }
            // Refused by `LoadBalancerConfig::validate` without the `grpc` feature; probing
            // would fail every time, so fall back to the connect check the gRPC check implies.
            #[cfg(not(feature = "grpc"))]
            HealthCheckKind::Grpc { .. } | HealthCheckKind::GrpcWatch { .. } => Probe::Tcp,
            HealthCheckKind::Custom(check) => Probe::Custom(check.clone()),
        }
    }

    /// Probes `endpoint` once, over TLS with `tls` where the check speaks TLS (gRPC and
    /// HTTP; a TCP check only connects).
    pub(super) async fn check(&self, endpoint: &Endpoint, tls: Option<&Tls>) -> Result<(), String> {
        match self {
            Probe::Tcp => {
                let stream = tokio::net::TcpStream::connect(endpoint.address)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                drop(stream);
                Ok(())
            }
            Probe::Http { path, expected, host } => {
                http(endpoint, path, *expected, host.as_deref(), tls).await
            }
            #[cfg(feature = "grpc")]
            Probe::Grpc { service } => grpc(endpoint, service, tls).await,
            #[cfg(feature = "grpc")]
            Probe::GrpcWatch(watch) => watch.check(endpoint, tls).await,
            Probe::Custom(check) => check.check(endpoint).await,
        }
    }

    /// Releases what the probe keeps for addresses for which `keep` is false (the streams
    /// of endpoints no longer checked). `keep` is not called by probes that keep nothing.
    pub(super) fn retain(&self, keep: impl FnMut(SocketAddr) -> bool) {
        #[cfg(feature = "grpc")]
        if let Probe::GrpcWatch(watch) = self {
            watch.retain(keep);
        }
        #[cfg(not(feature = "grpc"))]
        let _ = keep;
    }

    /// Releases everything the probe keeps, and keeps nothing from now on (checks stopped).
    pub(super) fn stop(&self) {
        #[cfg(feature = "grpc")]
        if let Probe::GrpcWatch(watch) = self {
            watch.stop();
        }
    }
}

/// `GET path` over a fresh HTTP/1.1 connection (hyper's client connection API); HTTPS when
/// the service has TLS settings (ALPN `http/1.1`, the same roots, identity and server name).
async fn http(
    endpoint: &Endpoint,
    path: &str,
    expected: StatusRange,
    host: Option<&str>,
    tls: Option<&Tls>,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(endpoint.address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match tls {
        #[cfg(feature = "tls")]
        Some(tls) => {
            let (config, name) = tls
                .rustls_for(endpoint, &[b"http/1.1".to_vec()])
                .map_err(|e| e.to_string())?;
            let host = host.map(str::to_owned).or_else(|| {
                tls.name_for(endpoint)
                    .map(|name| format!("{name}:{}", endpoint.address.port()))
            });
            let stream = crate::tls::handshake(stream, config, name)
                .await
                .map_err(|e| e.to_string())?;
            http_over(stream, endpoint, path, expected, host.as_deref()).await
        }
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
        None => http_over(stream, endpoint, path, expected, host).await,
    }
}

async fn http_over<S>(
    stream: S,
    endpoint: &Endpoint,
    path: &str,
    expected: StatusRange,
    host: Option<&str>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let host = host.map_or_else(|| endpoint.address.to_string(), str::to_owned);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "tai-loadbalancer-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let result = sender.send_request(request).await;
    driver.abort();
    let response = result.map_err(|e| format!("HTTP request: {e}"))?;
    let status = response.status().as_u16();
    if expected.contains(status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {expected}"))
    }
}

/// The tonic endpoint of a gRPC check of `endpoint`: `https` with the service's TLS
/// settings, else `http`.
#[cfg(feature = "grpc")]
pub(super) fn grpc_endpoint(
    endpoint: &Endpoint,
    tls: Option<&Tls>,
) -> Result<tonic::transport::Endpoint, String> {
    match tls {
        #[cfg(feature = "tls")]
        Some(tls) => tls
            .grpc_endpoint(endpoint)
            .map(|(grpc, _generation)| grpc)
            .map_err(|e| format!("gRPC endpoint: {e}")),
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
        None => tonic::transport::Endpoint::from_shared(format!("http://{}", endpoint.address))
            .map_err(|e| format!("gRPC endpoint: {e}")),
    }
}

/// Words a failed connect: the TLS failure if that is what it was ("certificate expired",
/// "name mismatch", ...), else the error and its causes.
#[cfg(feature = "grpc")]
pub(super) fn connect_error(error: &tonic::transport::Error, tls: Option<&Tls>) -> String {
    #[cfg(feature = "tls")]
    {
        let reason = tls.and_then(|tls| tls.explain(error));
        format!(
            "gRPC connect: {}",
            reason.unwrap_or_else(|| crate::tls::describe_error(error))
        )
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = tls;
        use std::error::Error as _;
        match error.source() {
            Some(source) => format!("gRPC connect: {error}: {source}"),
            None => format!("gRPC connect: {error}"),
        }
    }
}

/// Words a failed health call, naming a TLS cause when there is one (a TLS 1.3 server
/// refuses a client certificate after the client's side of the handshake is done, so the
/// refusal arrives with the first call, not the connect).
#[cfg(feature = "grpc")]
pub(super) fn status_error(status: &tonic::Status, tls: Option<&Tls>) -> String {
    #[cfg(feature = "tls")]
    if let Some(reason) = tls.and_then(|tls| tls.explain(status)) {
        return format!("gRPC health: TLS: {reason}");
    }
    #[cfg(not(feature = "tls"))]
    let _ = tls;
    format!("gRPC health: {} {}", status.code(), status.message())
}

/// [`status_error`], and when the server closed the connection for no reason the error
/// shows, the reason found by asking it again (the check's timeout bounds the whole).
#[cfg(feature = "grpc")]
pub(super) async fn diagnosed_status_error(
    endpoint: &Endpoint,
    status: &tonic::Status,
    tls: Option<&Tls>,
) -> String {
    #[cfg(feature = "tls")]
    if let Some(tls) = tls {
        if let Some(reason) = tls
            .explain_with_diagnosis(endpoint, status, std::time::Duration::from_secs(2))
            .await
        {
            return format!("gRPC health: TLS: {reason}");
        }
    }
    let _ = endpoint;
    status_error(status, tls)
}

/// The standard `grpc.health.v1.Health/Check`, over a fresh connection.
#[cfg(feature = "grpc")]
pub(super) async fn grpc(endpoint: &Endpoint, service: &str, tls: Option<&Tls>) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let channel = grpc_endpoint(endpoint, tls)?
        .connect()
        .await
        .map_err(|e| connect_error(&e, tls))?;
    let response = match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(response) => response,
        Err(status) => return Err(diagnosed_status_error(endpoint, &status, tls).await),
    };
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("gRPC health: {}", other.as_str_name())),
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp => f.write_str("Tcp"),
            Probe::Http { path, .. } => write!(f, "Http({path})"),
            #[cfg(feature = "grpc")]
            Probe::Grpc { service } => write!(f, "Grpc({service:?})"),
            #[cfg(feature = "grpc")]
            Probe::GrpcWatch(watch) => fmt::Debug::fmt(watch, f),
            Probe::Custom(_) => f.write_str("Custom"),
        }
    }
}
