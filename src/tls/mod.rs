//! TLS and mTLS for every client the crate opens (feature `tls`): [`ClientTls`], the TLS
//! settings of a service, loaded from tonic's `ClientTlsConfig`, from PEM, or from files
//! that are reloaded when they change ([`TlsFiles`]); the handshake and the wording of
//! handshake failures. (`TlsConnector`, the pools' connector, lives with the pools.)
//!
//! rustls only, with its `ring` crypto provider (see the README's TLS section for why);
//! no OpenSSL.
//!
//! This module owns the current TLS material of a service and its rotation. It does not own
//! connections: [`BalancedChannel`](crate::BalancedChannel), the health checks,
//! [`GrpcConnector`](crate::GrpcConnector), [`TlsConnector`](crate::TlsConnector) and
//! [`EtcdConfig`](crate::EtcdConfig) read the current material each time they open one.
//!
//! # Invariants
//!
//! * A [`ClientTls`] always holds one whole, valid set of material (roots, identity, the key
//!   matching the certificate). A reload replaces it whole, or not at all: a file caught
//!   half-written, a key that does not match its certificate, a missing file keep the last
//!   good set (counted and logged, [`TlsStats::last_error`]).
//! * Each replacement increments [`TlsStats::generation`]. Connections opened afterwards use
//!   the new set; connections already open are not cut: calls on them finish.
//! * Nothing here panics on input; handshake failures are errors of one connection.
#![deny(unsafe_code)]

mod connector;
pub(crate) mod material;
mod reload;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tonic::transport::ClientTlsConfig;

pub use connector::TlsStream;
pub(crate) use connector::{describe_error, handshake, tls_cause};
pub use reload::{DEFAULT_TLS_POLL_INTERVAL, TlsFiles};

use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{DataArc, Mutex, SnapshotCell};
use material::{IN_MEMORY, Material, Pem};

/// The endpoint metadata tag that overrides a service's TLS server name for one endpoint
/// (for fleets whose servers present per-instance names).
pub const TLS_SERVER_NAME_TAG: &str = "tls_server_name";

/// The TLS settings of a service: the CA roots to trust, an optional client identity
/// (mTLS) and the server name to verify.
///
/// One `ClientTls` serves a whole service: give it to
/// [`BalancedChannelBuilder::tls`](crate::BalancedChannelBuilder::tls) and the channel's
/// connections *and* the balancer's gRPC and HTTP health checks of that service use it (one
/// setting, not two to keep in sync). [`GrpcConnector::tls`](crate::GrpcConnector::tls),
/// [`TlsConnector`](crate::TlsConnector) and [`EtcdConfig::with_tls`](crate::EtcdConfig::with_tls) take it too.
///
/// - **Server name**: [`with_server_name`](Self::with_server_name) sets one name for the
///   service; an endpoint's metadata tag `tls_server_name` ([`TLS_SERVER_NAME_TAG`])
///   overrides it for that endpoint. Without either, the endpoint's IP address is verified
///   (the certificate needs an IP subject alternative name), as tonic does.
/// - **ALPN** is `h2` for gRPC (and required of the server), `http/1.1` for HTTPS checks.
/// - **Rotation**: built by [`TlsFiles::watch`], it reloads when the files change; see
///   [`TlsFiles`].
///
/// Cloning is cheap; clones share the material and its reloads.
///
/// # Examples
///
/// tonic's own settings, as they are:
///
/// ```
/// use tai_loadbalancer::ClientTls;
/// use tonic::transport::{Certificate, ClientTlsConfig};
///
/// # let ca_pem = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap().cert.pem();
/// let tls = ClientTls::from(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
///     .with_server_name("greeter.internal")?;
/// assert_eq!(tls.server_name(), Some("greeter.internal"));
/// # Ok::<_, tai_loadbalancer::Error>(())
/// ```
///
/// From PEM, with the problems typed:
///
/// ```
/// use tai_loadbalancer::{ClientTls, Error};
///
/// match ClientTls::from_pem(b"not a certificate", None) {
///     Err(Error::TlsPem { what, .. }) => assert_eq!(what, "CA certificate"),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Clone)]
pub struct ClientTls {
    server_name: Option<DataArc<str>>,
    shared: DataArc<Shared>,
}

/// What the clones of a [`ClientTls`] share.
struct Shared {
    current: SnapshotCell<Current>,
    /// Reloads applied, and refused (the last good set kept).
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The files being watched (a reloading `ClientTls`).
    files: Option<TlsFiles>,
    /// The reload task, aborted with the last clone.
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.watcher.lock().take() {
            task.abort();
        }
    }
}

/// One set of material, as in use.
pub(crate) struct Current {
    generation: u64,
    tonic: ClientTlsConfig,
    /// `None` for settings given as a tonic `ClientTlsConfig` (opaque: no PEM to read).
    material: Option<Material>,
    loaded_at: SystemTime,
    /// The bytes it was built from (files), to notice changes.
    pub(crate) source_bytes: Vec<Option<Vec<u8>>>,
}

impl ClientTls {
    fn with_current(current: Current, files: Option<TlsFiles>) -> Self {
        Self {
            server_name: None,
            shared: DataArc::new(Shared {
                current: SnapshotCell::new(crate::sync::Arc::new(current)),
                reloads: AtomicU64::new(0),
                failed_reloads: AtomicU64::new(0),
                last_error: Mutex::new(None),
                files,
                watcher: Mutex::new(None),
            }),
        }
    }

    fn from_material(
        material: Material,
        source_bytes: Vec<Option<Vec<u8>>>,
        files: Option<TlsFiles>,
    ) -> Self {
        Self::with_current(
            Current {
                generation: 1,
                tonic: material.tonic.clone(),
                material: Some(material),
                loaded_at: SystemTime::now(),
                source_bytes,
            },
            files,
        )
    }

    /// tonic's own TLS settings, used as they are for gRPC (the channel and the gRPC health
    /// checks; tonic performs the handshakes). A `ClientTlsConfig` does not show its
    /// certificates, so settings made this way cannot serve an HTTPS check or a
    /// [`TlsConnector`](crate::TlsConnector), do not report expiry, and do not reload: use [`from_pem`](Self::from_pem)
    /// or [`TlsFiles`] for those. A server name set with `domain_name` applies to every
    /// endpoint, unless the endpoint's `tls_server_name` tag or
    /// [`with_server_name`](Self::with_server_name) says otherwise.
    pub fn from_tonic(config: ClientTlsConfig) -> Self {
        Self::with_current(
            Current {
                generation: 1,
                tonic: config,
                material: None,
                loaded_at: SystemTime::now(),
                source_bytes: Vec::new(),
            },
            None,
        )
    }

    /// Settings from PEM: `ca` holds one or more CA certificates; `identity` is a client
    /// certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1), for mTLS.
    ///
    /// # Errors
    ///
    /// [`Error::TlsPem`] (no certificate, a block that does not decode, no key),
    /// [`Error::TlsKeyMismatch`], [`Error::TlsConfig`].
    pub fn from_pem(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<Self, Error> {
        let pem = |bytes| Pem {
            origin: IN_MEMORY,
            bytes,
        };
        let material = material::build(Some(pem(ca)), false, identity.map(|(c, k)| (pem(c), pem(k))))?;
        Ok(Self::from_material(material, Vec::new(), None))
    }

    /// The same settings with `name` as the server name to verify for every endpoint of
    /// the service whose metadata has no `tls_server_name` tag.
    ///
    /// # Errors
    ///
    /// [`Error::TlsConfig`] when `name` is not a valid DNS name or IP address.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        parse_server_name(&name)?;
        self.server_name = Some(DataArc::from(name));
        Ok(self)
    }

    /// The service's server name, if one was set.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Counters, the current generation and the certificates' expiry.
    ///
    /// # Examples
    ///
    /// ```
    /// use tai_loadbalancer::ClientTls;
    ///
    /// # let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap().cert.pem();
    /// # let me = rcgen::generate_simple_self_signed(vec!["client".into()]).unwrap();
    /// # let (cert, key) = (me.cert.pem(), me.signing_key.serialize_pem());
    /// let tls = ClientTls::from_pem(ca.as_bytes(), Some((cert.as_bytes(), key.as_bytes())))?;
    /// let stats = tls.stats();
    /// assert_eq!((stats.generation, stats.reloads, stats.failed_reloads), (1, 0, 0));
    /// assert!(stats.client_certificate_expires_in().is_some());
    /// # Ok::<_, tai_loadbalancer::Error>(())
    /// ```
    pub fn stats(&self) -> TlsStats {
        let current = self.shared.current.load_full();
        let material = current.material.as_ref();
        TlsStats {
            generation: current.generation,
            loaded_at: current.loaded_at,
            reloads: self.shared.reloads.load(Ordering::Relaxed),
            failed_reloads: self.shared.failed_reloads.load(Ordering::Relaxed),
            last_error: self.shared.last_error.lock().clone(),
            client_certificate_not_after: material.and_then(|m| m.client_not_after),
            ca_not_after: material.and_then(|m| m.ca_not_after),
            watching: self.shared.files.clone(),
        }
    }

    /// The generation of the material in use (1 at first, +1 per applied reload).
    pub fn generation(&self) -> u64 {
        self.shared.current.load().generation
    }

    // ===== for the crate's clients =====

    /// The server name to verify on `endpoint`: its tag, else the service's name, else
    /// `None` (the address).
    pub(crate) fn name_for<'a>(&'a self, endpoint: &'a Endpoint) -> Option<&'a str> {
        endpoint.tag(TLS_SERVER_NAME_TAG).or(self.server_name.as_deref())
    }

    /// A tonic endpoint (`https://address`, TLS for `endpoint`, ALPN `h2`) with the current
    /// material, and that material's generation.
    ///
    /// # Errors
    ///
    /// [`Error::TlsConfig`] for an invalid server name (the tag's, most likely) or settings
    /// tonic refuses.
    pub(crate) fn grpc_endpoint(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(tonic::transport::Endpoint, u64), Error> {
        let current = self.shared.current.load_full();
        let mut config = current.tonic.clone();
        let name = self.name_for(endpoint);
        if let Some(name) = name {
            parse_server_name(name).map_err(|e| tag_error(endpoint, e))?;
            config = config.domain_name(name);
        }
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(endpoint.address.to_string())
            .path_and_query("/")
            .build()
            .map_err(|e| Error::TlsConfig {
                reason: e.to_string(),
            })?;
        let mut grpc = tonic::transport::Endpoint::from(uri)
            .tls_config(config)
            .map_err(|e| Error::TlsConfig {
                reason: format!("for {}: {}", endpoint.address, describe_error(&e)),
            })?;
        if let Some(name) = name {
            // `:authority` names the server as verified, as gRPC clients do.
            if let Ok(origin) = format!("https://{}", authority(name, endpoint.address)).parse::<http::Uri>()
            {
                grpc = grpc.origin(origin);
            }
        }
        Ok((grpc, current.generation))
    }

    /// The rustls configuration with `alpn`, and the server name to verify on `endpoint`.
    ///
    /// # Errors
    ///
    /// [`Error::TlsConfig`] for settings made from a tonic `ClientTlsConfig` (no material) or
    /// an invalid server name.
    pub(crate) fn rustls_for(
        &self,
        endpoint: &Endpoint,
        alpn: &[Vec<u8>],
    ) -> Result<(DataArc<rustls::ClientConfig>, ServerName<'static>), Error> {
        let current = self.shared.current.load_full();
        let Some(material) = current.material.as_ref() else {
            return Err(Error::TlsConfig {
                reason: "settings given as a tonic `ClientTlsConfig` serve gRPC only; build them with \
                         `ClientTls::from_pem` or `TlsFiles` for HTTPS checks and `TlsConnector`"
                    .to_owned(),
            });
        };
        let name = match self.name_for(endpoint) {
            Some(name) => parse_server_name(name).map_err(|e| tag_error(endpoint, e))?,
            None => ServerName::IpAddress(endpoint.address.ip().into()),
        };
        let config = if alpn.is_empty() {
            material.rustls.clone()
        } else {
            let mut config = rustls::ClientConfig::clone(&material.rustls);
            config.alpn_protocols = alpn.to_vec();
            DataArc::new(config)
        };
        Ok((config, name))
    }

    /// Words a failure of a connection made with these settings: the TLS cause if there is
    /// one; else, for settings known to have no client certificate, a connection the server
    /// closed (reset, broken pipe, end of stream) is most likely an mTLS server refusing the
    /// client. (With TLS 1.3 a server checks the client's certificate after the client has
    /// finished its side of the handshake and started sending: the server's "certificate
    /// required" alert is often lost behind the broken connection.)
    pub(crate) fn explain(&self, error: &(dyn std::error::Error + 'static)) -> Option<String> {
        if let Some(reason) = tls_cause(error) {
            return Some(reason);
        }
        let without_identity = self
            .shared
            .current
            .load()
            .material
            .as_ref()
            .is_some_and(|m| m.client_not_after.is_none());
        if without_identity && connector::closed_by_peer(error) {
            return Some(format!(
                "the server closed the connection right after the TLS handshake: it most likely requires a \
                 client certificate (mTLS), and these TLS settings have none ({})",
                describe_error(error)
            ));
        }
        None
    }

    /// Why the server at `endpoint` closed a connection made with these settings, found by
    /// asking it: a fresh handshake (ALPN `h2`), then a read without writing anything, so the
    /// server's TLS alert (sent when it refuses the client's certificate, after the client's
    /// side of a TLS 1.3 handshake is done) arrives before any write can break the
    /// connection. `None` when the server accepts this client (it speaks first, as HTTP/2
    /// servers do), when nothing is learned within `timeout`, or for settings without
    /// material. Used off the request path only: by failed health checks and etcd
    /// reconnects, after the connection was closed under them.
    pub(crate) async fn diagnose(&self, endpoint: &Endpoint, timeout: Duration) -> Option<String> {
        use tokio::io::AsyncReadExt;

        let (config, name) = self.rustls_for(endpoint, &[b"h2".to_vec()]).ok()?;
        let ask = async {
            let tcp = tokio::net::TcpStream::connect(endpoint.address).await.ok()?;
            let mut stream = match handshake(tcp, config, name).await {
                Ok(stream) => stream,
                Err(e) => return Some(e.to_string()),
            };
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(0) => Some(
                    "the server closed the connection right after the TLS handshake, without an alert: it refuses \
                     this client"
                        .to_owned(),
                ),
                Ok(_) => None,
                Err(e) => Some(describe_error(&e)),
            }
        };
        tokio::time::timeout(timeout, ask).await.ok().flatten()
    }

    /// [`explain`](Self::explain), then, for a connection the server closed that `explain`
    /// cannot account for, [`diagnose`](Self::diagnose).
    pub(crate) async fn explain_with_diagnosis(
        &self,
        endpoint: &Endpoint,
        error: &(dyn std::error::Error + Send + Sync + 'static),
        timeout: Duration,
    ) -> Option<String> {
        if let Some(reason) = self.explain(error) {
            return Some(reason);
        }
        if connector::closed_by_peer(error) {
            return self.diagnose(endpoint, timeout).await;
        }
        None
    }

    /// Whether these settings hold PEM material (not an opaque tonic configuration).
    pub(crate) fn has_material(&self) -> bool {
        self.shared.current.load().material.is_some()
    }

    /// tonic's configuration for the current material, with the service's server name
    /// (for clients that connect to URLs rather than endpoints: etcd).
    #[cfg(feature = "etcd")]
    pub(crate) fn tonic_config(&self) -> ClientTlsConfig {
        let config = self.shared.current.load().tonic.clone();
        match self.server_name.as_deref() {
            Some(name) => config.domain_name(name),
            None => config,
        }
    }
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_owned()).map_err(|_| Error::TlsConfig {
        reason: format!(
            "{:?} is not a valid TLS server name (a DNS name or an IP address)",
            crate::error::truncate(name)
        ),
    })
}

fn tag_error(endpoint: &Endpoint, error: Error) -> Error {
    match error {
        Error::TlsConfig { reason } if endpoint.tag(TLS_SERVER_NAME_TAG).is_some() => Error::TlsConfig {
            reason: format!(
                "endpoint {} (tag `{TLS_SERVER_NAME_TAG}`): {reason}",
                endpoint.address
            ),
        },
        other => other,
    }
}

/// `name:port`, bracketing IPv6 literals.
fn authority(name: &str, address: SocketAddr) -> String {
    if name.contains(':') {
        format!("[{name}]:{}", address.port())
    } else {
        format!("{name}:{}", address.port())
    }
}

impl From<ClientTlsConfig> for ClientTls {
    fn from(config: ClientTlsConfig) -> Self {
        Self::from_tonic(config)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.shared.current.load();
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name.as_deref())
            .field("generation", &current.generation)
            .field("from_pem", &current.material.is_some())
            .field("files", &self.shared.files)
            .finish_non_exhaustive()
    }
}

/// The state of a [`ClientTls`]: what is loaded, and how reloading goes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsStats {
    /// The generation in use: 1 at first, +1 per applied reload.
    pub generation: u64,
    /// When the material in use was loaded.
    pub loaded_at: SystemTime,
    /// Reloads applied.
    pub reloads: u64,
    /// Reloads refused (the last good material kept): unreadable, unparsable, mismatched.
    pub failed_reloads: u64,
    /// Why the last refused reload was refused (cleared by a successful one).
    pub last_error: Option<String>,
    /// When the client certificate in use expires (`None`: no client certificate, or settings
    /// given as a tonic `ClientTlsConfig`). Alert well before it: an expired client
    /// certificate fails every new connection to an mTLS server.
    pub client_certificate_not_after: Option<SystemTime>,
    /// When the first of the trusted CA certificates expires (`None`: as above).
    pub ca_not_after: Option<SystemTime>,
    /// The files reloaded, when the settings come from [`TlsFiles::watch`].
    pub watching: Option<TlsFiles>,
}

impl TlsStats {
    /// Seconds from the Unix epoch to [`client_certificate_not_after`](Self::client_certificate_not_after).
    pub fn client_certificate_expiry_seconds(&self) -> Option<u64> {
        self.client_certificate_not_after
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    /// How long until the client certificate expires (zero once it has).
    pub fn client_certificate_expires_in(&self) -> Option<Duration> {
        self.client_certificate_not_after
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
    }
}

impl Shared {
    /// Installs a new set (a reload). Returns the new generation.
    fn replace(&self, material: Material, source_bytes: Vec<Option<Vec<u8>>>) -> u64 {
        let generation = self.current.load().generation + 1;
        self.current.store(crate::sync::Arc::new(Current {
            generation,
            tonic: material.tonic.clone(),
            material: Some(material),
            loaded_at: SystemTime::now(),
            source_bytes,
        }));
        // Relaxed: statistics only.
        self.reloads.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = None;
        generation
    }

    fn refuse(&self, reason: String) {
        // Relaxed: statistics only.
        self.failed_reloads.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_checked() {
        let tls = ClientTls::from(ClientTlsConfig::new());
        assert!(matches!(
            tls.clone().with_server_name("bad name!"),
            Err(Error::TlsConfig { .. })
        ));
        assert_eq!(
            tls.clone().with_server_name("a.example").unwrap().server_name(),
            Some("a.example")
        );
        assert!(tls.with_server_name("127.0.0.1").is_ok());
        assert_eq!(authority("::1", "[::1]:5".parse().unwrap()), "[::1]:5");
    }
}
