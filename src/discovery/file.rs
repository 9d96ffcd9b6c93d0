//! The file source: services and endpoints listed in a TOML file an operator edits.
//!
//! This module owns [`FileDiscovery`] and the file format. The source polls the file and
//! publishes each service's whole membership ([`MembershipUpdate::Snapshot`]) whenever the
//! file's content changes.
//!
//! The format, the all-or-nothing rule, removal semantics and change detection are
//! documented on [`FileDiscovery`] (the public page for this private module).
#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use toml::Spanned;

use super::{Discovery, DiscoverySink, MembershipUpdate, SourceHealth};
use crate::Error;
use crate::config::line_col;
use crate::endpoint::validate_service_name;
use crate::endpoint::{Endpoint, EndpointMetadata};

/// How often [`FileDiscovery`] polls its file unless told otherwise.
pub const DEFAULT_FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest accepted poll interval.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A file younger than this is re-read even if its timestamp and size look unchanged.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// How long a changed file's content must stay the same before it is applied.
const SETTLE: Duration = Duration::from_millis(25);

/// A [`Discovery`] source reading services and endpoints from a TOML file, reloaded when it
/// changes.
///
/// # Format
///
/// ```toml
/// [[services]]
/// name = "api"
///
/// [[services.endpoints]]
/// address = "127.0.0.1:5001"        # IP:port (no host names: use the DNS source for those)
/// region = "us-west-2"              # optional
/// zone = "us-west-2a"               # optional
/// weight = 5                        # optional, 1..=1000000, default 1
/// tags = { track = "canary" }       # optional
/// priority = 1                      # optional, 0..=127, default 0 (the best level)
///
/// [[services.endpoints]]
/// address = "127.0.0.1:5002"
///
/// [[services]]
/// name = "billing"
/// endpoints = []                    # a service with no endpoints (yet)
/// ```
///
/// Unknown fields are errors (a typo such as `wieght` must not silently mean weight 1).
///
/// # Behaviour
///
/// * **A file applies whole or not at all.** Any problem (a syntax error, an unknown or
///   mistyped field, an address that does not parse, an endpoint [`Endpoint::validate`]
///   rejects, a service or address listed twice, two endpoints of a service with one
///   `hash_key` tag) rejects the whole file with
///   [`Error::ConfigParse`] naming the line, column and field. The file is written by an
///   operator: applying the half that parses would route by a membership nobody wrote, so
///   the last good membership stays, the source reports [`SourceHealth::Degraded`] (the
///   error is its `last_error`), and it turns healthy again once the file is fixed. (Sources
///   reading machine-written records, such as etcd, skip a bad record instead.)
/// * **A service removed from the file is emptied**: it gets an empty snapshot, because
///   deleting its section is the operator saying "no endpoints". It stays registered (with
///   no endpoints) so balancers answer [`Error::NoEndpoints`] rather than an unknown service.
/// * **Change detection**: every poll stats the file; its content is read when the
///   modification time or size changed, or when the modification time is under two seconds
///   old (a rewrite within one timestamp tick keeps both), and the membership is republished
///   only when the content differs from the last good one. Changed content is applied only
///   if two reads 25 ms apart agree, and an empty file is an error (the last good membership
///   stays), so a file being rewritten in place is not taken half-written. Writing it
///   atomically (a temporary file renamed over the old one) is still best.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tai_loadbalancer::{DiscoveryRunner, FileDiscovery, ServiceRegistry};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let dir = std::env::temp_dir().join(format!("tai-lb-doc-file-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("services.toml");
/// std::fs::write(
///     &path,
///     r#"
/// [[services]]
/// name = "api"
///
/// [[services.endpoints]]
/// address = "127.0.0.1:5001"
/// weight = 3
/// "#,
/// )?;
///
/// let registry = Arc::new(ServiceRegistry::new());
/// let runner = DiscoveryRunner::new(registry.clone());
/// runner.spawn(FileDiscovery::new(&path).with_poll_interval(std::time::Duration::from_millis(100)));
/// runner.synced().await;
/// assert_eq!(registry.endpoints("api").await?[0].weight(), 3);
/// runner.shutdown().await;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct FileDiscovery {
    path: PathBuf,
    poll_interval: Duration,
}

impl fmt::Debug for FileDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDiscovery")
            .field("path", &self.path)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl FileDiscovery {
    /// A source for the file at `path`, polled every [`DEFAULT_FILE_POLL_INTERVAL`].
    ///
    /// The file need not exist yet: until it does, the source reports itself degraded.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            poll_interval: DEFAULT_FILE_POLL_INTERVAL,
        }
    }

    /// Sets how often the file is checked for changes (at least 10 ms).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(MIN_POLL_INTERVAL);
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Reads and parses the file now (blocking), as the source would: to check a file before
    /// deploying it, or at startup.
    ///
    /// # Errors
    ///
    /// [`Error::ConfigIo`] if it cannot be read, else as [`parse_services_toml`].
    pub fn load(&self) -> Result<BTreeMap<String, Vec<Endpoint>>, Error> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| self.io_error(&e))?;
        parse_services_toml(&text)
    }

    fn io_error(&self, e: &std::io::Error) -> Error {
        Error::ConfigIo {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// Parses a services file (format on [`FileDiscovery`]) into each service's
/// endpoints, in address order.
///
/// # Errors
///
/// [`Error::ConfigParse`] with the line and column of the first problem and a message
/// naming the field (`services[0].endpoints[1].weight: ...`): TOML syntax, unknown or
/// mistyped fields, an address that is not `IP:port`, an endpoint [`Endpoint::validate`]
/// rejects, an invalid or repeated service name, an address listed twice in a service, a
/// [`HASH_KEY_TAG`](crate::HASH_KEY_TAG) shared by two endpoints of a service.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Error, parse_services_toml};
///
/// let services = parse_services_toml(
///     "[[services]]\nname = \"api\"\n[[services.endpoints]]\naddress = \"127.0.0.1:5001\"\n",
/// )?;
/// assert_eq!(services["api"].len(), 1);
///
/// let bad = "[[services]]\nname = \"api\"\n[[services.endpoints]]\naddress = \"127.0.0.1:5001\"\nweight = 0\n";
/// match parse_services_toml(bad) {
///     Err(Error::ConfigParse { line: Some(5), message, .. }) => assert!(message.contains("weight"), "{message}"),
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok::<_, Error>(())
/// ```
pub fn parse_services_toml(text: &str) -> Result<BTreeMap<String, Vec<Endpoint>>, Error> {
    let raw: RawFile = toml::from_str(text).map_err(|e| crate::config::toml_error(text, &e))?;
    let at = |span: std::ops::Range<usize>, message: String| {
        let (line, column) = line_col(text, span.start);
        Error::ConfigParse {
            line: Some(line),
            column: Some(column),
            message,
        }
    };
    let mut services = BTreeMap::new();
    for (s, service) in raw.services.iter().enumerate() {
        let service = service.get_ref();
        let name = service.name.get_ref();
        if let Err(Error::InvalidServiceName { reason, .. }) = validate_service_name(name) {
            return Err(at(
                service.name.span(),
                format!("services[{s}].name: invalid service name: {reason}"),
            ));
        }
        if services.contains_key(name) {
            return Err(at(
                service.name.span(),
                format!(
                    "services[{s}].name: service `{}` is listed twice",
                    crate::error::truncate(name)
                ),
            ));
        }
        let mut endpoints: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        let mut hash_keys: BTreeMap<String, SocketAddr> = BTreeMap::new();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let endpoint = endpoint.get_ref();
            let field = |f: &str| format!("services[{s}].endpoints[{i}].{f}");
            let address: SocketAddr = endpoint.address.get_ref().trim().parse().map_err(|_| {
                at(
                    endpoint.address.span(),
                    format!(
                        "{}: {:?} is not an IP:port address",
                        field("address"),
                        crate::error::truncate(endpoint.address.get_ref())
                    ),
                )
            })?;
            let built = endpoint.to_endpoint(address);
            if let Err(error) = built.validate() {
                let (name, span) = endpoint.span_of(&error);
                return Err(at(span, format!("{}: {error}", field(name))));
            }
            if let Some(key) = built.tag(crate::endpoint::HASH_KEY_TAG) {
                if let Some(other) = hash_keys.insert(key.to_owned(), address) {
                    let span = endpoint
                        .tags
                        .as_ref()
                        .map_or(endpoint.address.span(), Spanned::span);
                    return Err(at(
                        span,
                        format!(
                            "{}: hash key {:?} of {address} is also the hash key of {other} in \
                             service `{}` (each endpoint's must be unique)",
                            field("tags"),
                            crate::error::truncate(key),
                            crate::error::truncate(name)
                        ),
                    ));
                }
            }
            if endpoints.insert(address, built).is_some() {
                return Err(at(
                    endpoint.address.span(),
                    format!(
                        "{}: {address} is listed twice in service `{}`",
                        field("address"),
                        crate::error::truncate(name)
                    ),
                ));
            }
        }
        services.insert(name.clone(), endpoints.into_values().collect());
    }
    Ok(services)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: Spanned<String>,
    region: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
    tags: Option<Spanned<BTreeMap<String, String>>>,
    priority: Option<Spanned<u32>>,
}

impl RawEndpoint {
    fn to_endpoint(&self, address: SocketAddr) -> Endpoint {
        let plain = self.region.is_none()
            && self.zone.is_none()
            && self.weight.is_none()
            && self.tags.is_none()
            && self.priority.is_none();
        if plain {
            return Endpoint::new(address, None);
        }
        let metadata = EndpointMetadata {
            region: self.region.as_ref().map(|r| r.get_ref().clone()),
            zone: self.zone.as_ref().map(|z| z.get_ref().clone()),
            weight: self.weight.as_ref().map_or(1, |w| *w.get_ref()),
            tags: self
                .tags
                .as_ref()
                .map(|t| t.get_ref().clone())
                .unwrap_or_default(),
            priority: self.priority.as_ref().map_or(0, |p| *p.get_ref()),
        };
        Endpoint::new(address, Some(metadata))
    }

    /// The field a validation error is about, and where it is in the file.
    fn span_of(&self, error: &Error) -> (&'static str, std::ops::Range<usize>) {
        let address = ("address", self.address.span());
        match error {
            Error::InvalidWeight { .. } => self.weight.as_ref().map_or(address, |w| ("weight", w.span())),
            Error::InvalidMetadata { field, .. } => {
                let span = match *field {
                    "region" => self.region.as_ref().map(Spanned::span),
                    "zone" => self.zone.as_ref().map(Spanned::span),
                    "tags" => self.tags.as_ref().map(Spanned::span),
                    "priority" => self.priority.as_ref().map(Spanned::span),
                    _ => None,
                };
                span.map_or(address, |span| (*field, span))
            }
            _ => address,
        }
    }
}

// ===== impl Discovery =====

/// What the last poll saw of the file.
#[derive(Default)]
struct Seen {
    /// Modification time and size at the last read.
    stamp: Option<(Option<SystemTime>, u64)>,
    /// The content of the last good parse.
    good_text: Option<String>,
    /// The membership last published, per service.
    published: BTreeMap<String, Vec<Endpoint>>,
    /// Whether the last poll failed (then every poll reads again).
    failing: bool,
}

#[async_trait::async_trait]
impl Discovery for FileDiscovery {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn run(self: Box<Self>, sink: DiscoverySink) {
        let mut seen = Seen::default();
        loop {
            self.poll(&sink, &mut seen).await;
            tokio::select! {
                _ = sink.closed() => return,
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }
}

/// The result of reading the file off the runtime's threads.
enum Read {
    Unchanged,
    Text(String, (Option<SystemTime>, u64)),
}

impl FileDiscovery {
    /// One poll: reads the file if it may have changed, and publishes what changed.
    async fn poll(&self, sink: &DiscoverySink, seen: &mut Seen) {
        let path = self.path.clone();
        let last_stamp = if seen.failing { None } else { seen.stamp };
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Read> {
            let meta = std::fs::metadata(&path)?;
            let modified = meta.modified().ok();
            let stamp = (modified, meta.len());
            let racy = modified
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_none_or(|age| age < RACY_WINDOW);
            if last_stamp == Some(stamp) && !racy {
                return Ok(Read::Unchanged);
            }
            // A file being rewritten in place can be caught half-written, and a prefix of
            // TOML is often valid TOML (with services or endpoints missing). Only content
            // that reads the same twice, SETTLE apart, is taken; else the next poll retries.
            let text = std::fs::read_to_string(&path)?;
            std::thread::sleep(SETTLE);
            if std::fs::read_to_string(&path)? != text {
                return Ok(Read::Unchanged);
            }
            Ok(Read::Text(text, stamp))
        })
        .await;
        let (text, stamp) = match read {
            Ok(Ok(Read::Unchanged)) => return,
            Ok(Ok(Read::Text(text, stamp))) => (text, stamp),
            Ok(Err(e)) => return self.fail(sink, seen, self.io_error(&e)),
            Err(join) => {
                let e = std::io::Error::other(join.to_string());
                return self.fail(sink, seen, self.io_error(&e));
            }
        };
        if seen.good_text.as_deref() == Some(text.as_str()) {
            seen.stamp = Some(stamp);
            if seen.failing {
                seen.failing = false;
                sink.set_health(SourceHealth::Healthy);
            }
            return;
        }
        if text.trim().is_empty() {
            // Truncated for a rewrite, most likely: never read as "no services".
            let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty");
            return self.fail(sink, seen, self.io_error(&e));
        }
        let services = match parse_services_toml(&text) {
            Ok(services) => services,
            Err(error) => return self.fail(sink, seen, error),
        };
        // Services that left the file are emptied: the operator removed them.
        let gone: BTreeSet<String> = seen
            .published
            .iter()
            .filter(|(s, endpoints)| !endpoints.is_empty() && !services.contains_key(*s))
            .map(|(s, _)| s.clone())
            .collect();
        for service in gone {
            tracing::info!(source = %self.name(), %service, "service removed from the file: emptying it");
            seen.published.insert(service.clone(), Vec::new());
            sink.publish(MembershipUpdate::Snapshot {
                service,
                endpoints: Vec::new(),
            });
        }
        for (service, endpoints) in services {
            if seen.published.get(&service) == Some(&endpoints) {
                continue;
            }
            seen.published.insert(service.clone(), endpoints.clone());
            sink.publish(MembershipUpdate::Snapshot { service, endpoints });
        }
        seen.good_text = Some(text);
        seen.stamp = Some(stamp);
        seen.failing = false;
        sink.set_health(SourceHealth::Healthy);
    }

    fn fail(&self, sink: &DiscoverySink, seen: &mut Seen, error: Error) {
        seen.failing = true;
        sink.set_health(SourceHealth::Degraded {
            reason: format!("{}: {error}", self.path.display()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[services]]
name = "api"

[[services.endpoints]]
address = "127.0.0.1:5001"
region = "us-west-2"
zone = "us-west-2a"
weight = 5
tags = { track = "canary" }

[[services.endpoints]]
address = "127.0.0.1:5002"

[[services]]
name = "empty"
"#;

    fn parse_err(text: &str) -> (usize, String) {
        match parse_services_toml(text) {
            Err(Error::ConfigParse {
                line: Some(line),
                message,
                ..
            }) => (line, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_field() {
        let services = parse_services_toml(GOOD).unwrap();
        assert_eq!(services.len(), 2);
        let api = &services["api"];
        assert_eq!(api.len(), 2);
        assert_eq!(api[0].address, "127.0.0.1:5001".parse().unwrap());
        assert_eq!(api[0].region(), Some("us-west-2"));
        assert_eq!(api[0].zone(), Some("us-west-2a"));
        assert_eq!(api[0].weight(), 5);
        assert_eq!(api[0].tag("track"), Some("canary"));
        assert_eq!(api[1].weight(), 1);
        assert!(services["empty"].is_empty());
        assert!(parse_services_toml("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_line_and_field() {
        let (line, message) = parse_err(&GOOD.replace("weight = 5", "weight = 0"));
        assert_eq!(line, 9);
        assert!(message.contains("services[0].endpoints[0].weight"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("weight = 5", "wieght = 5"));
        assert_eq!(line, 9);
        assert!(message.contains("wieght"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("weight = 5", "weight = -5"));
        assert_eq!(line, 9);
        assert!(message.contains("weight") || message.contains("u32"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("\"127.0.0.1:5002\"", "\"localhost:5002\""));
        assert_eq!(line, 13);
        assert!(message.contains("services[0].endpoints[1].address"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("\"127.0.0.1:5002\"", "\"127.0.0.1:0\""));
        assert_eq!(line, 13);
        assert!(message.contains("port 0"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("\"127.0.0.1:5002\"", "\"127.0.0.1:5001\""));
        assert_eq!(line, 13);
        assert!(message.contains("listed twice"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("zone = \"us-west-2a\"", "zone = \"\""));
        assert_eq!(line, 8);
        assert!(message.contains("endpoints[0].zone"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("name = \"empty\"", "name = \"api\""));
        assert_eq!(line, 16);
        assert!(message.contains("services[1].name"), "{message}");

        let (line, message) = parse_err(&GOOD.replace("name = \"empty\"", "name = \" x\""));
        assert_eq!(line, 16);
        assert!(message.contains("whitespace"), "{message}");

        let (line, _) = parse_err("[[services]]\nname = \"api\"\n[[services.endpoints]\n");
        assert_eq!(line, 3);
    }

    #[test]
    fn load_reports_missing_file_as_io_error() {
        let source = FileDiscovery::new("/nonexistent/tai-lb/services.toml");
        assert!(matches!(source.load(), Err(Error::ConfigIo { .. })));
        assert_eq!(source.poll_interval(), DEFAULT_FILE_POLL_INTERVAL);
        assert_eq!(
            source.with_poll_interval(Duration::ZERO).poll_interval(),
            MIN_POLL_INTERVAL
        );
    }
}
