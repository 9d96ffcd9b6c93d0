//! A tiny HTTP/1.1 server for `/metrics`, for services that have no HTTP server of their own.
#![deny(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::sync::{DataArc, DataWeak};
use crate::{Error, IntegratedLoadBalancer};

/// A running `/metrics` server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `balancer`'s metrics in the Prometheus text format at `GET /metrics` on `address`
/// (anything else is 404), until the returned server is dropped.
///
/// # Errors
///
/// [`Error::Runtime`] outside a tokio runtime or when `address` cannot be bound.
///
/// # Examples
///
/// ```
/// # use std::sync::Arc;
/// # use tai_loadbalancer::*;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// # let registry = Arc::new(ServiceRegistry::new());
/// let lb = Arc::new(IntegratedLoadBalancer::new(registry, LoadBalancingStrategy::RoundRobin, LoadBalancerConfig::default()).await?);
/// let server = serve_metrics("127.0.0.1:0".parse().unwrap(), &lb).await?;
/// println!("scrape http://{}/metrics", server.local_addr());
/// # Ok(())
/// # }
/// ```
pub async fn serve_metrics(
    address: SocketAddr,
    balancer: &DataArc<IntegratedLoadBalancer>,
) -> Result<MetricsServer, Error> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Runtime {
        message: format!("serve_metrics needs a tokio runtime: {e}"),
    })?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Runtime {
            message: format!("cannot listen on {address} for /metrics: {e}"),
        })?;
    let local_addr = listener.local_addr().map_err(|e| Error::Runtime {
        message: format!("cannot read the /metrics listener's address: {e}"),
    })?;
    let balancer: DataWeak<IntegratedLoadBalancer> = DataArc::downgrade(balancer);
    let task = runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let balancer = balancer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let balancer = balancer.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &balancer)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(MetricsServer { local_addr, task })
}

fn respond(
    request: &Request<Incoming>,
    balancer: &DataWeak<IntegratedLoadBalancer>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found; try /metrics\n".into());
    }
    let Some(lb) = balancer.upgrade() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "the balancer was dropped\n".into(),
        );
    };
    let mut response = reply(StatusCode::OK, super::encode_prometheus(&lb));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
