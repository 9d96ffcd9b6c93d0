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
            #[cfg(feature = "grpc")]
            Probe::GrpcWatch(watch) => watch.check(endpoint).await,
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

/// The standard `grpc.health.v1.Health/Check`, over a fresh connection.
#[cfg(feature = "grpc")]
pub(super) async fn grpc(endpoint: &Endpoint, service: &str) -> Result<(), String> {
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
            #[cfg(feature = "grpc")]
            Probe::GrpcWatch(watch) => fmt::Debug::fmt(watch, f),
            Probe::Custom(_) => f.write_str("Custom"),
        }
    }
}
