//! [`TlsConnector`]: TLS connections (tokio-rustls over [`TcpConnector`]) for a
//! [`ConnectionPool`](crate::ConnectionPool), with the settings of a [`ClientTls`]
//! (feature `tls`).
//!
//! # Invariants
//!
//! * Every connection reads the [`ClientTls`]'s material when it opens: a reload applies to
//!   the next connection, never to one already open.
//! * The TCP connect and the handshake share one `connect_timeout`.
#![deny(unsafe_code)]

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use super::{Connector, TcpConnector};
use crate::endpoint::Endpoint;
use crate::tls::{ClientTls, TlsStream, handshake};

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
