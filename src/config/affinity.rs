//! Session-affinity settings and how a session key is derived from a request.
//!
//! Plain data and pure functions: [`AffinityConfig`] (the seed's three fields),
//! [`AffinityStrategy`] and [`AffinityRequest`] (where a key comes from), the key limits. The
//! table that uses them is [`AffinityManager`](crate::AffinityManager).
#![deny(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, truncate};

/// Longest accepted session key, in bytes.
pub const MAX_AFFINITY_KEY_LEN: usize = 4096;

/// Session-affinity settings (exactly the seed's three fields).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tai_loadbalancer::{AffinityConfig, AffinityStrategy};
///
/// let affinity_config = AffinityConfig {
///     strategy: AffinityStrategy::CustomKey,
///     ttl: Duration::from_secs(3600),
///     max_entries: 100_000,
/// };
/// affinity_config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    /// Where the session key comes from.
    pub strategy: AffinityStrategy,
    /// An entry unused for this long expires (default 1 h).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most entries kept (default 100,000); beyond it the coldest are evicted.
    pub max_entries: usize,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        Self {
            strategy: AffinityStrategy::CustomKey,
            ttl: Duration::from_secs(3600),
            max_entries: 100_000,
        }
    }
}

/// Largest accepted `max_entries`.
pub const MAX_AFFINITY_ENTRIES: usize = 50_000_000;

/// Longest accepted `affinity.ttl` (a year).
pub const MAX_AFFINITY_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl AffinityConfig {
    /// Checks every field (prefix `affinity.`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.ttl.is_zero() {
            return Err(Error::invalid_config("affinity.ttl", "must be greater than zero"));
        }
        if self.ttl > MAX_AFFINITY_TTL {
            return Err(Error::invalid_config(
                "affinity.ttl",
                format!("{:?} is more than a year", self.ttl),
            ));
        }
        if self.max_entries == 0 {
            return Err(Error::invalid_config(
                "affinity.max_entries",
                "must be at least 1",
            ));
        }
        if self.max_entries > MAX_AFFINITY_ENTRIES {
            return Err(Error::invalid_config(
                "affinity.max_entries",
                format!("must be at most {MAX_AFFINITY_ENTRIES}"),
            ));
        }
        if let AffinityStrategy::Cookie { name } = &self.strategy {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
            {
                return Err(Error::invalid_config(
                    "affinity.strategy.name",
                    format!("{:?} is not a cookie name (RFC 6265 token)", truncate(name)),
                ));
            }
        }
        Ok(())
    }
}

/// Where a request's session key comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AffinityStrategy {
    /// The client's IP address (not its port).
    SourceIp,
    /// The authenticated user id.
    UserId,
    /// The value of the named cookie in the request's `Cookie` header.
    Cookie {
        /// Cookie name, e.g. `"SESSIONID"`.
        name: String,
    },
    /// A key the caller supplies.
    #[default]
    CustomKey,
}

/// What a request offers for deriving its session key. Fill in what you have.
///
/// ```
/// use tai_loadbalancer::{AffinityRequest, AffinityStrategy};
///
/// let cookie = AffinityStrategy::Cookie { name: "SESSIONID".into() };
/// let request = AffinityRequest::new().cookie_header("theme=dark; SESSIONID=abc123");
/// assert_eq!(cookie.key(&request).unwrap(), "abc123");
///
/// let by_ip = AffinityRequest::new().source("127.0.0.1:40000".parse().unwrap());
/// assert_eq!(AffinityStrategy::SourceIp.key(&by_ip).unwrap(), "127.0.0.1");
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct AffinityRequest<'a> {
    source: Option<SocketAddr>,
    user_id: Option<&'a str>,
    cookie_header: Option<&'a str>,
    custom_key: Option<&'a str>,
}

impl<'a> AffinityRequest<'a> {
    /// A request offering nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The client's address.
    pub fn source(mut self, source: SocketAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// The authenticated user id.
    pub fn user_id(mut self, user_id: &'a str) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// The raw `Cookie` header value (`name=value; name2=value2`).
    pub fn cookie_header(mut self, header: &'a str) -> Self {
        self.cookie_header = Some(header);
        self
    }

    /// A key of the caller's choosing.
    pub fn custom_key(mut self, key: &'a str) -> Self {
        self.custom_key = Some(key);
        self
    }
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b="2"`), quotes removed.
pub fn cookie_value<'h>(header: &'h str, name: &str) -> Option<&'h str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| {
            let v = v.trim();
            v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
        })
    })
}

impl AffinityStrategy {
    /// The session key of `request` under this strategy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAffinityKey`] when the request lacks what the strategy needs (no source
    /// address, no user id, no such cookie, no custom key) or the key is empty or too long.
    pub fn key(&self, request: &AffinityRequest<'_>) -> Result<String, Error> {
        let missing = |what: &'static str| Error::InvalidAffinityKey { reason: what };
        let key = match self {
            AffinityStrategy::SourceIp => match request
                .source
                .ok_or_else(|| missing("the request has no source address"))?
                .ip()
            {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => ip.to_canonical().to_string(),
            },
            AffinityStrategy::UserId => request
                .user_id
                .ok_or_else(|| missing("the request has no user id"))?
                .to_owned(),
            AffinityStrategy::Cookie { name } => {
                let header = request
                    .cookie_header
                    .ok_or_else(|| missing("the request has no Cookie header"))?;
                cookie_value(header, name)
                    .ok_or_else(|| missing("the Cookie header does not carry the affinity cookie"))?
                    .to_owned()
            }
            AffinityStrategy::CustomKey => request
                .custom_key
                .ok_or_else(|| missing("no custom key was given"))?
                .to_owned(),
        };
        validate_key(&key)?;
        Ok(key)
    }
}

/// Checks a session key: non-empty and at most [`MAX_AFFINITY_KEY_LEN`] bytes.
pub(crate) fn validate_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidAffinityKey {
            reason: "the key is empty",
        });
    }
    if key.len() > MAX_AFFINITY_KEY_LEN {
        return Err(Error::InvalidAffinityKey {
            reason: "the key is longer than 4096 bytes",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_parsing() {
        assert_eq!(cookie_value("a=1; SESSIONID=abc; b=2", "SESSIONID"), Some("abc"));
        assert_eq!(cookie_value("SESSIONID=\"q v\"", "SESSIONID"), Some("q v"));
        assert_eq!(cookie_value("xSESSIONID=1", "SESSIONID"), None);
        assert_eq!(cookie_value("", "a"), None);
        assert_eq!(cookie_value("a", "a"), None);
    }

    #[test]
    fn keys_by_strategy() {
        let r = AffinityRequest::new()
            .source("[::ffff:127.0.0.1]:9".parse().unwrap())
            .user_id("u1")
            .cookie_header("S=xyz")
            .custom_key("k");
        assert_eq!(AffinityStrategy::SourceIp.key(&r).unwrap(), "127.0.0.1");
        assert_eq!(AffinityStrategy::UserId.key(&r).unwrap(), "u1");
        assert_eq!(
            AffinityStrategy::Cookie { name: "S".into() }.key(&r).unwrap(),
            "xyz"
        );
        assert_eq!(AffinityStrategy::CustomKey.key(&r).unwrap(), "k");
        let empty = AffinityRequest::new();
        for s in [
            AffinityStrategy::SourceIp,
            AffinityStrategy::UserId,
            AffinityStrategy::CustomKey,
        ] {
            assert!(matches!(s.key(&empty), Err(Error::InvalidAffinityKey { .. })));
        }
        assert!(matches!(
            AffinityStrategy::CustomKey.key(&AffinityRequest::new().custom_key("")),
            Err(Error::InvalidAffinityKey { .. })
        ));
    }

    #[test]
    fn config_validation_names_fields() {
        let bad = |c: AffinityConfig| match c.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            bad(AffinityConfig {
                ttl: Duration::ZERO,
                ..Default::default()
            }),
            "affinity.ttl"
        );
        assert_eq!(
            bad(AffinityConfig {
                max_entries: 0,
                ..Default::default()
            }),
            "affinity.max_entries"
        );
        assert_eq!(
            bad(AffinityConfig {
                strategy: AffinityStrategy::Cookie { name: "a b".into() },
                ..Default::default()
            }),
            "affinity.strategy.name"
        );
    }
}
