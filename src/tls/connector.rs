//! TLS connections over TCP (tokio-rustls): [`TlsConnector`] for connection pools, the
//! handshake the HTTPS health check uses, and [`describe_error`], which words a handshake
//! failure for a person ("certificate expired", "name mismatch", "unknown CA", "the server
//! requires a client certificate").
//!
//! # Invariants
//!
//! * Every connection reads the [`ClientTls`]'s material when it opens: a reload applies to
//!   the next connection, never to one already open.
//! * A handshake is bounded by the caller's timeout (the pool's `connect_timeout`, the
//!   check's `timeout`); a failed handshake is an error of that connection only.
#![deny(unsafe_code)]

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::ClientTls;
use crate::endpoint::Endpoint;
use crate::pool::{Connector, TcpConnector};
use crate::sync::DataArc;

/// A TLS connection over TCP, as [`TlsConnector`] opens it.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS handshake over `stream` with `config`, verifying `name`.
pub(crate) async fn handshake(
    stream: TcpStream,
    config: DataArc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<TlsStream> {
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| {
            let reason = describe_error(&e);
            std::io::Error::new(e.kind(), format!("TLS handshake: {reason}"))
        })
}

/// TLS connections (tokio-rustls over [`TcpConnector`]) for a
/// [`ConnectionPool`](crate::ConnectionPool), with the settings of a [`ClientTls`]: each new
/// connection takes the current material (reloaded files included) and verifies the
/// endpoint's server name (its `tls_server_name` tag, else the service's name, else its IP
/// address).
///
/// `is_valid` closes idle connections the peer has closed.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::{ClientTls, ConnectionPool, PoolConfig, TlsConnector};
///
/// # let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap().cert.pem();
/// let tls = ClientTls::from_pem(ca.as_bytes(), None)?.with_server_name("localhost")?;
/// let connector = TlsConnector::new(tls)?
///     .alpn(["http/1.1"])
///     .connect_timeout(Duration::from_millis(500));
/// let pool = ConnectionPool::new(PoolConfig::default(), connector)?;
/// # let _ = pool;
/// # Ok::<_, tai_loadbalancer::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsConnector {
    tls: ClientTls,
    tcp: TcpConnector,
    connect_timeout: Duration,
    alpn: Vec<Vec<u8>>,
}

impl TlsConnector {
    /// Connections with `tls`'s settings, no ALPN, a 1 s connect timeout (TCP and handshake
    /// together).
    ///
    /// # Errors
    ///
    /// [`Error::TlsConfig`](crate::Error::TlsConfig) for settings made from a tonic
    /// `ClientTlsConfig` (it does not show its certificates to other TLS clients).
    pub fn new(tls: ClientTls) -> Result<Self, crate::Error> {
        if !tls.has_material() {
            return Err(crate::Error::TlsConfig {
                reason: "TlsConnector needs settings built with `ClientTls::from_pem` or `TlsFiles`, \
                         not a tonic `ClientTlsConfig`"
                    .to_owned(),
            });
        }
        let connect_timeout = Duration::from_secs(1);
        Ok(Self {
            tls,
            tcp: TcpConnector::new().connect_timeout(connect_timeout),
            connect_timeout,
            alpn: Vec::new(),
        })
    }

    /// The ALPN protocols to offer (for example `["h2"]` or `["http/1.1"]`).
    pub fn alpn<I, P>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// Bounds the TCP connect and the handshake together.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.tcp = self.tcp.connect_timeout(timeout);
        self.connect_timeout = timeout;
        self
    }

    /// The settings.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "alpn",
                &self
                    .alpn
                    .iter()
                    .map(|p| String::from_utf8_lossy(p))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Connector for TlsConnector {
    type Connection = TlsStream;
    type Error = std::io::Error;

    async fn connect(&self, endpoint: &Endpoint) -> Result<TlsStream, std::io::Error> {
        let (config, name) = self
            .tls
            .rustls_for(endpoint, &self.alpn)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let connect = async {
            let stream = self.tcp.connect(endpoint).await?;
            handshake(stream, config, name).await
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS connect timed out after {:?}", self.connect_timeout),
                )
            })?
    }

    fn is_valid(&self, connection: &mut TlsStream) -> bool {
        // Peek at the socket without blocking: pending means open and quiet; 0 bytes means
        // the peer closed it. Unread bytes are fine here (TLS 1.3 servers send session
        // tickets after the handshake); a close_notify among them is seen by the next read.
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match connection.get_ref().0.poll_peek(&mut cx, &mut buf) {
            Poll::Pending => true,
            Poll::Ready(Ok(n)) => n > 0,
            Poll::Ready(Err(_)) => false,
        }
    }
}

// ===== describing handshake failures =====

/// Words the TLS failure in `error`'s chain (a rustls error, possibly inside `io::Error`s,
/// hyper's or tonic's errors) for a person; without a TLS cause, the whole chain joined by
/// `": "`.
pub(crate) fn describe_error(error: &(dyn std::error::Error + 'static)) -> String {
    tls_cause(error).unwrap_or_else(|| chain(error))
}

/// The TLS cause in `error`'s chain, worded, if there is one.
pub(crate) fn tls_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(found) = tls_cause(inner) {
                return Some(found);
            }
        }
        // tonic's own TLS errors are private types, and some paths carry rustls' error as
        // text only: recognised by their words.
        let text = e.to_string();
        if let Some(alert) = text.split("received fatal alert: ").nth(1) {
            let alert = alert
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default();
            return Some(describe_alert_name(alert));
        }
        if text.contains("HTTP/2 was not negotiated") {
            return Some(
                "the server did not negotiate HTTP/2 (ALPN `h2`): it may not speak gRPC over TLS".to_owned(),
            );
        }
        if text.contains("TLS handshake timed out") {
            return Some("the TLS handshake timed out".to_owned());
        }
        next = e.source();
    }
    None
}

/// Whether the peer closed the connection under `error` (reset, broken pipe, end of stream).
pub(crate) fn closed_by_peer(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(http) = e.downcast_ref::<hyper::Error>() {
            if http.is_canceled() || http.is_closed() || http.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            ) {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                if closed_by_peer(inner) {
                    return true;
                }
            }
        }
        next = e.source();
    }
    false
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

fn describe_rustls(error: &rustls::Error) -> String {
    use rustls::CertificateError as Cert;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::Expired | Cert::ExpiredContext { .. } => {
                format!("server certificate rejected: certificate expired ({cert})")
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                format!("server certificate rejected: certificate not valid yet ({cert})")
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                format!("server certificate rejected: name mismatch ({cert})")
            }
            Cert::UnknownIssuer => {
                "server certificate rejected: unknown CA (not issued by a trusted root)".to_owned()
            }
            Cert::BadSignature => {
                format!("server certificate rejected: bad signature ({cert})")
            }
            Cert::Revoked => "server certificate rejected: revoked".to_owned(),
            other => format!("server certificate rejected: {other}"),
        },
        rustls::Error::AlertReceived(alert) => describe_alert_name(&format!("{alert:?}")),
        rustls::Error::NoCertificatesPresented => "the server presented no certificate".to_owned(),
        other => format!("TLS error: {other}"),
    }
}

/// Words a TLS alert received from the server, by its name in rustls' `AlertDescription`.
fn describe_alert_name(alert: &str) -> String {
    match alert {
        "CertificateRequired" => {
            "the server requires a client certificate (mTLS) and none was sent (alert: certificate required)"
                .to_owned()
        }
        "BadCertificate"
        | "UnsupportedCertificate"
        | "CertificateRevoked"
        | "CertificateExpired"
        | "CertificateUnknown"
        | "UnknownCA"
        | "AccessDenied" => {
            format!("the server rejected the client certificate (alert: {alert})")
        }
        "NoApplicationProtocol" => {
            "the server supports none of the ALPN protocols offered (alert: no application protocol)"
                .to_owned()
        }
        other => format!("the server ended the connection with TLS alert {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_common_failures() {
        let wrapped = |e: rustls::Error| {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            describe_error(&io)
        };
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
            .contains("unknown CA")
        );
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))
            .contains("certificate expired")
        );
        assert!(
            wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
            ))
            .contains("name mismatch")
        );
        assert!(
            wrapped(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
            ))
            .contains("requires a client certificate")
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(describe_error(&plain), "refused");
        assert!(tls_cause(&plain).is_none());
    }
}
