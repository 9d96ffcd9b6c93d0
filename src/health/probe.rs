//! The probes behind each [`HealthCheckKind`]: TCP connect, HTTP/1.1 `GET`, gRPC health, or
//! a custom check. Timeouts are applied by the caller.
#![deny(unsafe_code)]

use std::fmt;

use super::HealthCheck;
use crate::endpoint::Endpoint;
use crate::health::config::{HealthCheckKind, StatusRange};
use crate::sync::DataArc;

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
    Custom(DataArc<dyn HealthCheck>),
}

impl Probe {
    pub(super) fn new(kind: &HealthCheckKind) -> Self {
        match kind {
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
            // Refused by `HealthCheckConfig::validate` without the `grpc` feature; probing
            // would fail every time, so fall back to the connect check the gRPC check implies.
            #[cfg(not(feature = "grpc"))]
            HealthCheckKind::Grpc { .. } => Probe::Tcp,
            HealthCheckKind::Custom(check) => Probe::Custom(check.clone()),
        }
    }

    /// Probes `endpoint` once.
    pub(super) async fn check(&self, endpoint: &Endpoint) -> Result<(), String> {
        match self {
            Probe::Tcp => {
                let stream = tokio::net::TcpStream::connect(endpoint.address)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                drop(stream);
                Ok(())
            }
            Probe::Http { path, expected, host } => http(endpoint, path, *expected, host.as_deref()).await,
            #[cfg(feature = "grpc")]
            Probe::Grpc { service } => grpc(endpoint, service).await,
            Probe::Custom(check) => check.check(endpoint).await,
        }
    }
}

/// `GET path` over a fresh HTTP/1.1 connection (hyper's client connection API).
async fn http(
    endpoint: &Endpoint,
    path: &str,
    expected: StatusRange,
    host: Option<&str>,
) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    let stream = tokio::net::TcpStream::connect(endpoint.address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
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

/// The standard `grpc.health.v1.Health/Check`.
#[cfg(feature = "grpc")]
async fn grpc(endpoint: &Endpoint, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let url = format!("http://{}", endpoint.address);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| format!("gRPC endpoint: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("gRPC connect: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| format!("gRPC health: {} {}", status.code(), status.message()))?;
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
            Probe::Custom(_) => f.write_str("Custom"),
        }
    }
}
