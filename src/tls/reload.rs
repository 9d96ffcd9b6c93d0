//! [`TlsFiles`]: TLS material read from files, and reloaded when they change.
//!
//! Follows the approach of the file discovery source: every poll reads the files (they are
//! small), and only a set that differs from the one in use, reads the same twice a moment
//! apart, parses, and whose key matches its certificate is applied, whole. Anything else
//! keeps the last good set, counts a refused reload and logs why (once per distinct bad
//! content, not at every poll).
//!
//! # Invariants
//!
//! * The reload task holds only a weak reference to the settings: it ends when the last
//!   [`ClientTls`] clone is dropped (which also aborts it).
//! * A generation is applied only when the bytes changed: an unchanged poll never makes
//!   channels reconnect.
#![deny(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::material::{self, Pem};
use super::{ClientTls, Shared};
use crate::error::Error;
use crate::sync::DataWeak;

/// How often [`TlsFiles::watch`] polls its files unless told otherwise.
pub const DEFAULT_TLS_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest accepted poll interval.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long changed content must stay the same before it is applied (a file rewritten in
/// place is not taken half-written).
const SETTLE: Duration = Duration::from_millis(25);

/// The files of a [`ClientTls`]: a CA bundle and/or the system's roots, and optionally a
/// client certificate chain and its key (mTLS).
///
/// [`load`](Self::load) reads them once. [`watch`](Self::watch) also polls them every
/// [`poll_interval`](Self::poll_interval) and applies a changed set when it is complete and
/// valid: new connections use it, connections already open finish what they carry.
/// Replace files atomically (write a temporary file, rename it over the old one); when a
/// certificate and its key are replaced one after the other, the moment between the two
/// renames is a mismatched set, refused, and the pair is applied at the next poll.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::{Error, TlsFiles};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let files = TlsFiles::new()
///     .ca_file("/nonexistent/ca.pem")
///     .identity_files("/nonexistent/client.pem", "/nonexistent/client.key")
///     .poll_interval(Duration::from_millis(500));
/// match files.watch() {
///     Err(Error::TlsFile { path, .. }) => assert_eq!(path, "/nonexistent/ca.pem"),
///     other => panic!("{other:?}"),
/// }
/// # });
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    ca: Option<PathBuf>,
    native_roots: bool,
    identity: Option<(PathBuf, PathBuf)>,
    poll_interval: Duration,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self::new()
    }
}

impl TlsFiles {
    /// No files yet; polled every [`DEFAULT_TLS_POLL_INTERVAL`] once watched.
    pub fn new() -> Self {
        Self {
            ca: None,
            native_roots: false,
            identity: None,
            poll_interval: DEFAULT_TLS_POLL_INTERVAL,
        }
    }

    /// A PEM bundle of the CA certificates to trust.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// Also trust the system's root certificates (read once, at each load).
    pub fn native_roots(mut self, enabled: bool) -> Self {
        self.native_roots = enabled;
        self
    }

    /// The client certificate chain (PEM, leaf first) and its private key (PEM), for mTLS.
    pub fn identity_files(mut self, certificate: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((certificate.into(), key.into()));
        self
    }

    /// How often [`watch`](Self::watch) reads the files (default 1 s, at least 10 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The CA bundle's path.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The client certificate's and key's paths.
    pub fn identity_paths(&self) -> Option<(&Path, &Path)> {
        self.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// Reads and validates the files once; the settings do not reload.
    ///
    /// # Errors
    ///
    /// [`Error::TlsFile`] naming a file that cannot be read, [`Error::TlsPem`] naming one
    /// that holds no usable PEM, [`Error::TlsKeyMismatch`] naming the certificate and key
    /// that do not belong together, [`Error::TlsConfig`] when no CA is given.
    pub fn load(&self) -> Result<ClientTls, Error> {
        self.validate()?;
        let bytes = self.read().map_err(|(path, e)| file_error(&path, &e))?;
        let material = self.build(&bytes)?;
        Ok(ClientTls::from_material(material, bytes, None))
    }

    /// Reads and validates the files, then reloads them as they change, on the current
    /// tokio runtime, for as long as a clone of the returned settings lives.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load); [`Error::InvalidConfig`] for a poll interval under 10 ms;
    /// [`Error::Runtime`] outside a tokio runtime.
    pub fn watch(&self) -> Result<ClientTls, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| Error::Runtime {
            message: e.to_string(),
        })?;
        self.validate()?;
        let bytes = self.read().map_err(|(path, e)| file_error(&path, &e))?;
        let material = self.build(&bytes)?;
        let tls = ClientTls::from_material(material, bytes, Some(self.clone()));
        let weak: DataWeak<Shared> = crate::sync::DataArc::downgrade(&tls.shared);
        let task = runtime.spawn(reload_loop(weak, self.clone()));
        *tls.shared.watcher.lock() = Some(task.abort_handle());
        tracing::debug!(files = ?self, "watching TLS files");
        Ok(tls)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.poll_interval < MIN_POLL_INTERVAL {
            return Err(Error::invalid_config(
                "tls.poll_interval",
                format!(
                    "{:?} is under the minimum of {MIN_POLL_INTERVAL:?}",
                    self.poll_interval
                ),
            ));
        }
        if self.ca.is_none() && !self.native_roots {
            return Err(Error::TlsConfig {
                reason: "no CA certificates: give a CA file or ask for the system's roots".to_owned(),
            });
        }
        Ok(())
    }

    /// The paths, in a fixed order: CA, certificate, key.
    fn paths(&self) -> [Option<&Path>; 3] {
        [
            self.ca.as_deref(),
            self.identity.as_ref().map(|(c, _)| c.as_path()),
            self.identity.as_ref().map(|(_, k)| k.as_path()),
        ]
    }

    /// Reads every file (blocking: the files are small, and the watcher reads them off the
    /// runtime's threads).
    fn read(&self) -> Result<Vec<Option<Vec<u8>>>, (PathBuf, std::io::Error)> {
        self.paths()
            .into_iter()
            .map(|path| {
                path.map(|p| std::fs::read(p).map_err(|e| (p.to_path_buf(), e)))
                    .transpose()
            })
            .collect()
    }

    fn build(&self, bytes: &[Option<Vec<u8>>]) -> Result<material::Material, Error> {
        let paths = self.paths();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.map(|p| p.display().to_string()).unwrap_or_default())
            .collect();
        let pem = |i: usize| {
            bytes.get(i).and_then(Option::as_deref).map(|b| Pem {
                origin: names[i].as_str(),
                bytes: b,
            })
        };
        let identity = match (pem(1), pem(2)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        };
        material::build(pem(0), self.native_roots, identity)
    }
}

fn file_error(path: &Path, error: &std::io::Error) -> Error {
    Error::TlsFile {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca)
            .field("native_roots", &self.native_roots)
            .field("identity", &self.identity)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// What one poll found.
enum Poll {
    Unchanged,
    Changed(Vec<Option<Vec<u8>>>),
    Failed(String),
}

/// Polls `files` until the settings are dropped.
async fn reload_loop(shared: DataWeak<Shared>, files: TlsFiles) {
    // The last refused content, so a bad set is logged once, not at every poll.
    let mut refused: Option<Vec<Option<Vec<u8>>>> = None;
    let mut failing_read: Option<String> = None;
    loop {
        tokio::time::sleep(files.poll_interval).await;
        let Some(current_bytes) = shared.upgrade().map(|s| s.current.load().source_bytes.clone()) else {
            return;
        };
        let reader = files.clone();
        let polled = tokio::task::spawn_blocking(move || {
            let first = match reader.read() {
                Ok(bytes) => bytes,
                Err((path, e)) => return Poll::Failed(file_error(&path, &e).to_string()),
            };
            if first == current_bytes {
                return Poll::Unchanged;
            }
            std::thread::sleep(SETTLE);
            match reader.read() {
                Ok(second) if second == first => Poll::Changed(first),
                // Still being written: the next poll looks again.
                Ok(_) => Poll::Unchanged,
                Err((path, e)) => Poll::Failed(file_error(&path, &e).to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| Poll::Failed(format!("TLS file reader: {e}")));
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match polled {
            Poll::Unchanged => failing_read = None,
            Poll::Failed(reason) => {
                // A missing file (mid-rename on some systems, or deleted): keep the set.
                if failing_read.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(%reason, "TLS files unreadable: keeping the certificates in use");
                    shared.refuse(reason.clone());
                    failing_read = Some(reason);
                }
            }
            Poll::Changed(bytes) => {
                failing_read = None;
                if refused.as_ref() == Some(&bytes) {
                    continue;
                }
                match files.build(&bytes) {
                    Ok(material) => {
                        let expires = material.client_not_after;
                        let generation = shared.replace(material, bytes);
                        refused = None;
                        tracing::info!(generation, client_certificate_not_after = ?expires, "TLS files reloaded");
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        tracing::warn!(%reason, "TLS files changed but are not a valid set: keeping the certificates in use");
                        shared.refuse(reason);
                        refused = Some(bytes);
                    }
                }
            }
        }
    }
}
