//! The `grpc.health.v1.Health/Watch` probe: one long-lived stream per endpoint.
//!
//! Each watched endpoint has a background task holding one tonic channel and the `Watch`
//! stream; it publishes what the stream last said through a `tokio::sync::watch` channel,
//! which [`WatchProbe::check`] reads. When a streamed status *changes*, the task asks the
//! manager (through [`Recheck`]) to check the endpoint at once, so a `NOT_SERVING` push is
//! reflected without waiting for the next interval.
//!
//! # Invariants
//!
//! * At most one stream per address. Its task is aborted when its slot is dropped: when the
//!   address is no longer checked ([`WatchProbe::retain`]), when checks stop
//!   ([`WatchProbe::stop`]) or when the probe itself is dropped with the manager. After
//!   `stop`, no stream is opened again.
//! * The task holds only a weak reference to the manager, so it never keeps it alive.
//! * A stream that ends is reopened by the next check, never by the task itself; a stream
//!   that ends within one interval of being opened does not ask for a re-check, so a server
//!   that keeps closing streams costs at most one reconnect per interval and scheduled check.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::probe::{Recheck, Tls, connect_error, grpc_endpoint, status_error};
use crate::endpoint::Endpoint;
use crate::sync::{DataWeak, Mutex};

/// Lower bound of the HTTP/2 PING interval on a watch connection. The pings are what notice
/// a peer that vanished without closing the connection (the stream is silent while the
/// status does not change). Servers may limit pings (grpc-go by default closes a connection
/// pinged more often than every 5 minutes without data); that costs one reconnect, as the
/// stream's end asks for a re-check, which reopens it.
const MIN_KEEPALIVE: Duration = Duration::from_secs(30);

/// What one stream last said.
#[derive(Clone, Debug)]
enum Latest {
    /// Connecting, or waiting for the first message.
    Opening,
    /// The last status streamed.
    Status(ServingStatus),
    /// The server answered `UNIMPLEMENTED` to `Watch` (the task has exited).
    Unimplemented,
    /// The stream failed or ended, for this reason (the task has exited).
    Ended(String),
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The watch state of one address.
enum Slot {
    Watching {
        latest: watch::Receiver<Latest>,
        _task: AbortOnDrop,
    },
    /// The server does not implement `Watch`: plain `Check`s for as long as the address is
    /// checked.
    CheckOnly,
}

#[derive(Default)]
struct Slots {
    by_address: HashMap<SocketAddr, Slot, ahash::RandomState>,
    stopped: bool,
}

/// `grpc.health.v1.Health/Watch` of one service name, on every checked endpoint.
pub(super) struct WatchProbe {
    service: String,
    interval: Duration,
    recheck: DataWeak<dyn Recheck>,
    slots: Mutex<Slots>,
}

impl WatchProbe {
    pub(super) fn new(service: String, interval: Duration, recheck: DataWeak<dyn Recheck>) -> Self {
        Self {
            service,
            interval,
            recheck,
            slots: Mutex::new(Slots::default()),
        }
    }

    /// The latest streamed status of `endpoint`, opening its stream (and waiting for the
    /// first message) if none is open. The caller bounds the wait with its timeout; the
    /// stream keeps connecting in the background if the wait is abandoned.
    pub(super) async fn check(&self, endpoint: &Endpoint, tls: Option<&Tls>) -> Result<(), String> {
        let address = endpoint.address;
        let latest = {
            let mut slots = self.slots.lock();
            if slots.stopped {
                return Err("health checks stopped".to_owned());
            }
            match slots.by_address.get(&address) {
                Some(Slot::CheckOnly) => None,
                Some(Slot::Watching { latest, .. }) if is_open(latest) => Some(latest.clone()),
                _ => {
                    let (latest, task) = self.open(endpoint, grpc_endpoint(endpoint, tls), tls.cloned());
                    let slot = Slot::Watching {
                        latest: latest.clone(),
                        _task: task,
                    };
                    slots.by_address.insert(address, slot);
                    Some(latest)
                }
            }
        };
        let Some(mut latest) = latest else {
            return super::probe::grpc(endpoint, &self.service, tls).await;
        };
        let said = match latest.wait_for(|l| !matches!(l, Latest::Opening)).await {
            Ok(said) => said.clone(),
            Err(_) => Latest::Ended("gRPC health: watch stream ended".to_owned()),
        };
        match said {
            Latest::Status(ServingStatus::Serving) => Ok(()),
            Latest::Status(other) => Err(format!("gRPC health: {}", other.as_str_name())),
            Latest::Ended(reason) => Err(reason),
            Latest::Opening => unreachable!("waited for a message"),
            Latest::Unimplemented => {
                {
                    let mut slots = self.slots.lock();
                    // Only if the slot is still the stream that said so.
                    let ours = matches!(
                        slots.by_address.get(&address),
                        Some(Slot::Watching { latest: l, .. }) if l.same_channel(&latest)
                    );
                    if ours && !slots.stopped {
                        slots.by_address.insert(address, Slot::CheckOnly);
                        tracing::debug!(%address, "gRPC health Watch unimplemented; using Check");
                    }
                }
                super::probe::grpc(endpoint, &self.service, tls).await
            }
        }
    }

    /// Spawns the stream task of `address`, connecting to `target` (the endpoint with the
    /// service's TLS settings, as they are now: a reload applies to the next stream).
    fn open(
        &self,
        endpoint: &Endpoint,
        target: Result<tonic::transport::Endpoint, String>,
        tls: Option<Tls>,
    ) -> (watch::Receiver<Latest>, AbortOnDrop) {
        let (tx, rx) = watch::channel(Latest::Opening);
        let task = tokio::spawn(watch_task(
            endpoint.clone(),
            target,
            tls,
            self.service.clone(),
            self.interval,
            tx,
            self.recheck.clone(),
        ));
        (rx, AbortOnDrop(task.abort_handle()))
    }

    /// Stops the streams of the addresses for which `keep` is false.
    pub(super) fn retain(&self, mut keep: impl FnMut(SocketAddr) -> bool) {
        self.slots.lock().by_address.retain(|address, _| keep(*address));
    }

    /// Stops every stream, and opens none from now on.
    pub(super) fn stop(&self) {
        let dropped = {
            let mut slots = self.slots.lock();
            slots.stopped = true;
            std::mem::take(&mut slots.by_address)
        };
        drop(dropped);
    }

    /// Streams open or opening (for tests).
    #[cfg(test)]
    fn streams(&self) -> usize {
        let slots = self.slots.lock();
        slots
            .by_address
            .values()
            .filter(|s| matches!(s, Slot::Watching { latest, .. } if is_open(latest)))
            .count()
    }
}

/// Whether the stream behind `latest` is still running.
fn is_open(latest: &watch::Receiver<Latest>) -> bool {
    // `has_changed` fails once the task (the sender) is gone, whatever it last said.
    latest.has_changed().is_ok() && !matches!(*latest.borrow(), Latest::Ended(_) | Latest::Unimplemented)
}

/// Why a stream could not go on.
enum Failure {
    Unimplemented,
    Other(String),
}

/// The task of one stream: publishes every message, asks for a re-check when the status
/// changes, and publishes why it ended before exiting.
async fn watch_task(
    endpoint: Endpoint,
    target: Result<tonic::transport::Endpoint, String>,
    tls: Option<Tls>,
    service: String,
    interval: Duration,
    tx: watch::Sender<Latest>,
    recheck: DataWeak<dyn Recheck>,
) {
    let opened = Instant::now();
    let address = endpoint.address;
    let reason = match run_watch(&endpoint, target, tls.as_ref(), service, interval, &tx, &recheck).await {
        Ok(()) => "gRPC health: watch stream ended".to_owned(),
        Err(Failure::Unimplemented) => {
            tx.send_replace(Latest::Unimplemented);
            return;
        }
        Err(Failure::Other(reason)) => reason,
    };
    tracing::debug!(%address, %reason, "gRPC health watch ended");
    let previous = tx.send_replace(Latest::Ended(reason));
    // The endpoint's health is unknown now: re-check it (which reopens the stream), unless
    // the stream was short-lived (see the module's invariants) or nobody waits (a check
    // waiting for the first message reads the reason itself).
    if matches!(previous, Latest::Status(_)) && opened.elapsed() >= interval {
        push(&recheck, address);
    }
}

async fn run_watch(
    endpoint: &Endpoint,
    target: Result<tonic::transport::Endpoint, String>,
    tls: Option<&Tls>,
    service: String,
    interval: Duration,
    tx: &watch::Sender<Latest>,
    recheck: &DataWeak<dyn Recheck>,
) -> Result<(), Failure> {
    let channel = target
        .map_err(Failure::Other)?
        .connect_timeout(interval)
        .http2_keep_alive_interval(interval.max(MIN_KEEPALIVE))
        .connect()
        .await
        .map_err(|e| Failure::Other(connect_error(&e, tls)))?;
    let mut stream = match HealthClient::new(channel)
        .watch(HealthCheckRequest { service })
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => return Err(Failure::Unimplemented),
        Err(status) => {
            return Err(Failure::Other(
                super::probe::diagnosed_status_error(endpoint, &status, tls).await,
            ));
        }
    };
    while let Some(message) = stream.message().await.map_err(|status| {
        // UNIMPLEMENTED after the stream started is not a missing `Watch`.
        Failure::Other(status_error(&status, tls))
    })? {
        let status = message.status();
        let previous = tx.send_replace(Latest::Status(status));
        if matches!(previous, Latest::Status(p) if p != status) {
            push(recheck, endpoint.address);
        }
    }
    Ok(())
}

fn push(recheck: &DataWeak<dyn Recheck>, address: SocketAddr) {
    if let Some(recheck) = recheck.upgrade() {
        recheck.recheck(address);
    }
}

impl fmt::Debug for WatchProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrpcWatch({:?})", self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::DataArc;

    struct Nobody;

    impl Recheck for Nobody {
        fn recheck(&self, _address: SocketAddr) {}
    }

    fn probe() -> (DataArc<Nobody>, WatchProbe) {
        let nobody = DataArc::new(Nobody);
        let weak = DataArc::downgrade(&nobody) as DataWeak<dyn Recheck>;
        (
            nobody,
            WatchProbe::new(String::new(), Duration::from_secs(1), weak),
        )
    }

    #[tokio::test]
    async fn a_refused_connection_fails_and_is_retried_by_the_next_check() {
        // A port nobody listens on: bind, read the port, close.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (_nobody, probe) = probe();
        let endpoint = Endpoint::new(address, None);
        let err = probe.check(&endpoint, None).await.unwrap_err();
        assert!(err.contains("gRPC connect"), "{err}");
        assert_eq!(probe.streams(), 0, "the failed stream is not kept open");
        let err = probe.check(&endpoint, None).await.unwrap_err();
        assert!(err.contains("gRPC connect"), "{err}");
    }

    #[tokio::test]
    async fn stop_and_retain_close_streams() {
        // A listener that accepts but never answers: the stream stays opening.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_nobody, probe) = probe();
        let endpoint = Endpoint::new(address, None);
        let check = tokio::time::timeout(Duration::from_millis(50), probe.check(&endpoint, None)).await;
        assert!(check.is_err(), "no answer yet");
        assert_eq!(probe.streams(), 1);
        probe.retain(|a| a != address);
        assert_eq!(probe.streams(), 0);
        let _ = tokio::time::timeout(Duration::from_millis(50), probe.check(&endpoint, None)).await;
        assert_eq!(probe.streams(), 1);
        probe.stop();
        assert_eq!(probe.streams(), 0);
        assert_eq!(
            probe.check(&endpoint, None).await.unwrap_err(),
            "health checks stopped"
        );
        assert_eq!(probe.streams(), 0);
        drop(listener);
    }
}
