//! Endpoints: the backends a service's traffic is balanced over.
//!
//! This module owns the *value* side of an endpoint ([`Endpoint`], [`EndpointMetadata`]) and
//! its validation. The *mutable* per-request side (in-flight count, outcome counters) lives in
//! [`crate::table::EndpointState`] beside the routing snapshot.
//!
//! # Invariants
//!
//! * Within a service an endpoint is identified by its [`Endpoint::address`]: registering the
//!   same address again replaces its metadata, never adds a second endpoint.
//! * Cloning an `Endpoint` never allocates: the metadata is shared behind an `Arc` (and absent
//!   entirely for endpoints created with `None`).
//! * [`Endpoint::validate`] is the single definition of a routable endpoint; the registry
//!   refuses anything it rejects.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::error::{Error, truncate};
use crate::sync::DataArc;

/// Longest accepted service name, in bytes (a DNS name's limit).
pub const MAX_SERVICE_NAME_LEN: usize = 253;

/// Checks a service name: non-empty, at most 253 bytes, no control characters, no leading or
/// trailing whitespace.
pub(crate) fn validate_service_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_SERVICE_NAME_LEN {
        "longer than 253 bytes"
    } else if name.chars().any(char::is_control) {
        "contains control characters"
    } else if name.trim() != name {
        "has leading or trailing whitespace"
    } else {
        return Ok(());
    };
    Err(Error::InvalidServiceName {
        name: truncate(name).to_owned(),
        reason,
    })
}

/// The metadata tag that places an endpoint on the consistent-hash ring by a stable key
/// instead of its address (gRPC A76's hash key): an instance whose address changes when it
/// restarts (a Kubernetes StatefulSet pod, say) keeps the keys it owned, on every balancer of
/// a fleet. Two endpoints of one service may not carry the same hash key.
///
/// ```
/// use tai_loadbalancer::{Endpoint, EndpointMetadata, HASH_KEY_TAG};
///
/// let pod = Endpoint::new(
///     "127.0.0.1:8080".parse().unwrap(),
///     Some(EndpointMetadata::new().with_tag(HASH_KEY_TAG, "cache-0")),
/// );
/// assert_eq!(pod.tag(HASH_KEY_TAG), Some("cache-0"));
/// ```
pub const HASH_KEY_TAG: &str = "hash_key";

/// Largest accepted endpoint weight.
///
/// Weights are relative: `95` and `5` give a 95/5 split. The bound keeps the weighted
/// schedule and the consistent-hash ring small (see `CONFIGURATION.md`).
pub const MAX_WEIGHT: u32 = 1_000_000;

const MAX_LABEL_LEN: usize = 255;
const MAX_TAGS: usize = 64;

/// One backend instance of a service: an address plus optional metadata.
///
/// # Examples
///
/// ```
/// use tai_loadbalancer::{Endpoint, EndpointMetadata};
///
/// let plain = Endpoint::new("127.0.0.1:5001".parse().unwrap(), None);
/// assert_eq!(plain.weight(), 1);
///
/// let canary = Endpoint::new(
///     "127.0.0.1:5002".parse().unwrap(),
///     Some(EndpointMetadata::new().with_region("us-west-2").with_weight(5).with_tag("track", "canary")),
/// );
/// assert_eq!(canary.address.port(), 5002);
/// assert_eq!(canary.region(), Some("us-west-2"));
/// assert_eq!(canary.tag("track"), Some("canary"));
/// ```
///
/// Two endpoints are equal when their addresses and metadata are equal (`None` metadata
/// equals the defaults).
#[derive(Clone)]
pub struct Endpoint {
    /// Where requests for this endpoint go. Identity within a service.
    pub address: SocketAddr,
    metadata: Option<DataArc<EndpointMetadata>>,
}

/// Descriptive data about an endpoint: placement, weight and free-form tags.
///
/// Plain data with public fields; `Default` has weight 1 and nothing else set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointMetadata {
    /// Cloud region, e.g. `us-west-2`. Matched by
    /// [`ServiceRegistry::find_matching`](crate::ServiceRegistry::find_matching).
    pub region: Option<String>,
    /// Availability zone, e.g. `us-west-2a`.
    pub zone: Option<String>,
    /// Relative weight, `1..=MAX_WEIGHT` (default 1). Used by the weighted, least-connections,
    /// peak-EWMA and consistent-hash strategies.
    pub weight: u32,
    /// Free-form labels (version, track, ...).
    pub tags: BTreeMap<String, String>,
    /// Priority level, `0..=MAX_PRIORITY` (default 0, the best): traffic spills to a level
    /// only as the levels before it lose health (see
    /// [`PriorityConfig`](crate::PriorityConfig)).
    pub priority: u32,
}

/// Largest accepted [`EndpointMetadata::priority`] (128 levels, as Envoy allows).
pub const MAX_PRIORITY: u32 = 127;

static DEFAULT_METADATA: EndpointMetadata = EndpointMetadata {
    region: None,
    zone: None,
    weight: 1,
    tags: BTreeMap::new(),
    priority: 0,
};

impl Default for EndpointMetadata {
    fn default() -> Self {
        DEFAULT_METADATA.clone()
    }
}

impl EndpointMetadata {
    /// Metadata with weight 1 and nothing else set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the weight (validated at registration: `1..=MAX_WEIGHT`).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the priority level (validated at registration: `0..=MAX_PRIORITY`).
    pub fn with_priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Adds or replaces a tag.
    pub fn with_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }
}

impl Endpoint {
    /// Creates an endpoint. `None` metadata means weight 1, no region, zone or tags.
    ///
    /// Construction never fails; [`ServiceRegistry`](crate::ServiceRegistry) validates
    /// endpoints when they are registered (see [`Endpoint::validate`]).
    pub fn new(address: SocketAddr, metadata: Option<EndpointMetadata>) -> Self {
        Self {
            address,
            metadata: metadata.map(DataArc::new),
        }
    }

    /// The endpoint's metadata (the defaults when it was created with `None`).
    pub fn metadata(&self) -> &EndpointMetadata {
        self.metadata.as_deref().unwrap_or(&DEFAULT_METADATA)
    }

    /// Returns a copy with `metadata` replacing the current metadata.
    pub fn with_metadata(mut self, metadata: EndpointMetadata) -> Self {
        self.metadata = Some(DataArc::new(metadata));
        self
    }

    /// The shared metadata, if any (for interning).
    pub(crate) fn shared_metadata(&self) -> Option<&DataArc<EndpointMetadata>> {
        self.metadata.as_ref()
    }

    /// The endpoint with its metadata replaced by `metadata`, which must be equal to it.
    pub(crate) fn with_shared_metadata(mut self, metadata: DataArc<EndpointMetadata>) -> Endpoint {
        debug_assert!(self.metadata.as_deref() == Some(&*metadata));
        self.metadata = Some(metadata);
        self
    }

    /// Whether it was registered with metadata (`false` for `Endpoint::new(address, None)`).
    pub(crate) fn has_metadata(&self) -> bool {
        self.metadata.is_some()
    }

    /// The relative weight (1 unless set).
    pub fn weight(&self) -> u32 {
        self.metadata().weight
    }

    /// The region, if set.
    pub fn region(&self) -> Option<&str> {
        self.metadata().region.as_deref()
    }

    /// The zone, if set.
    pub fn zone(&self) -> Option<&str> {
        self.metadata().zone.as_deref()
    }

    /// The priority level (0 unless set).
    pub fn priority(&self) -> u32 {
        self.metadata().priority
    }

    /// The value of tag `key`, if set.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.metadata().tags.get(key).map(String::as_str)
    }

    /// Checks that the endpoint can receive traffic.
    ///
    /// Rejected: port 0; the unspecified address (`0.0.0.0`, `::`); multicast and the IPv4
    /// broadcast address; weight outside `1..=MAX_WEIGHT`; empty or over-long region, zone
    /// or tag keys; more than 64 tags.
    ///
    /// ```
    /// use tai_loadbalancer::{Endpoint, EndpointMetadata, Error};
    ///
    /// let zero_weight = Endpoint::new(
    ///     "127.0.0.1:80".parse().unwrap(),
    ///     Some(EndpointMetadata::new().with_weight(0)),
    /// );
    /// assert!(matches!(zero_weight.validate(), Err(Error::InvalidWeight { weight: 0, .. })));
    /// let port_zero = Endpoint::new("127.0.0.1:0".parse().unwrap(), None);
    /// assert!(matches!(port_zero.validate(), Err(Error::InvalidAddress { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        let address = self.address;
        let bad = |reason| Err(Error::InvalidAddress { address, reason });
        if address.port() == 0 {
            return bad("port 0 cannot receive traffic");
        }
        match address.ip() {
            ip if ip.is_unspecified() => return bad("the unspecified address cannot be dialled"),
            ip if ip.is_multicast() => return bad("multicast addresses are not endpoints"),
            IpAddr::V4(v4) if v4.is_broadcast() => {
                return bad("the broadcast address is not an endpoint");
            }
            _ => {}
        }
        let meta = self.metadata();
        if meta.weight == 0 || meta.weight > MAX_WEIGHT {
            return Err(Error::InvalidWeight {
                address,
                weight: meta.weight,
                max: MAX_WEIGHT,
            });
        }
        let bad_meta = |field, reason: String| {
            Err(Error::InvalidMetadata {
                address,
                field,
                reason,
            })
        };
        for (field, value) in [("region", &meta.region), ("zone", &meta.zone)] {
            if let Some(value) = value {
                if value.is_empty() {
                    return bad_meta(field, "must not be empty (leave it unset instead)".into());
                }
                if value.len() > MAX_LABEL_LEN {
                    return bad_meta(field, format!("longer than {MAX_LABEL_LEN} bytes"));
                }
            }
        }
        if meta.priority > MAX_PRIORITY {
            return bad_meta(
                "priority",
                format!("{} is more than {MAX_PRIORITY}", meta.priority),
            );
        }
        if meta.tags.len() > MAX_TAGS {
            return bad_meta("tags", format!("more than {MAX_TAGS} tags"));
        }
        for (key, value) in &meta.tags {
            if key.is_empty() {
                return bad_meta("tags", "tag keys must not be empty".into());
            }
            if key.len() > MAX_LABEL_LEN || value.len() > 4 * MAX_LABEL_LEN {
                return bad_meta(
                    "tags",
                    format!("tag `{}` is too long", crate::error::truncate(key)),
                );
            }
            if key == HASH_KEY_TAG && (value.is_empty() || value.len() > MAX_LABEL_LEN) {
                return bad_meta(
                    "tags",
                    format!("the `{HASH_KEY_TAG}` tag must be 1 to {MAX_LABEL_LEN} bytes"),
                );
            }
        }
        Ok(())
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        self.address == other.address && self.metadata() == other.metadata()
    }
}

impl Eq for Endpoint {}

impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.address.hash(state);
        self.metadata().hash(state);
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Endpoint");
        d.field("address", &self.address);
        if let Some(meta) = &self.metadata {
            d.field("metadata", meta);
        }
        d.finish()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.address.fmt(f)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(address: SocketAddr) -> Self {
        Endpoint::new(address, None)
    }
}

/// Wire form: `{ address = "127.0.0.1:5001", region = "...", zone = "...", weight = 1, tags = {...} }`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointRecord {
    address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    priority: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn one() -> u32 {
    1
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let meta = self.metadata();
        EndpointRecord {
            address: self.address,
            region: meta.region.clone(),
            zone: meta.zone.clone(),
            weight: meta.weight,
            tags: meta.tags.clone(),
            priority: meta.priority,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let r = EndpointRecord::deserialize(deserializer)?;
        let meta = EndpointMetadata {
            region: r.region,
            zone: r.zone,
            weight: r.weight,
            tags: r.tags,
            priority: r.priority,
        };
        let metadata = (meta != DEFAULT_METADATA).then_some(meta);
        Ok(Endpoint::new(r.address, metadata))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["api", "api-service", "a.b.c", "checkout/v2", "ünïcode"] {
            validate_service_name(ok).unwrap();
        }
        for bad in ["", " api", "api ", "a\nb", "a\0b"] {
            assert!(
                matches!(validate_service_name(bad), Err(Error::InvalidServiceName { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_service_name(&"x".repeat(254)).is_err());
        assert!(validate_service_name(&"x".repeat(253)).is_ok());
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::new(s.parse().unwrap(), None)
    }

    #[test]
    fn defaults_without_metadata() {
        let e = ep("127.0.0.1:1");
        assert_eq!(e.weight(), 1);
        assert_eq!(e.region(), None);
        assert_eq!(e.metadata(), &EndpointMetadata::default());
        assert!(e.validate().is_ok());
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "0.0.0.0:80",
            "[::]:80",
            "127.0.0.1:0",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[ff02::1]:80",
        ] {
            assert!(
                matches!(ep(bad).validate(), Err(Error::InvalidAddress { .. })),
                "{bad} should be rejected"
            );
        }
        assert!(ep("[::1]:80").validate().is_ok());
    }

    #[test]
    fn rejects_bad_metadata() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let with = |m: EndpointMetadata| Endpoint::new(addr, Some(m)).validate();
        assert!(matches!(
            with(EndpointMetadata::new().with_weight(0)),
            Err(Error::InvalidWeight { weight: 0, .. })
        ));
        assert!(matches!(
            with(EndpointMetadata::new().with_weight(MAX_WEIGHT + 1)),
            Err(Error::InvalidWeight { .. })
        ));
        assert!(with(EndpointMetadata::new().with_weight(MAX_WEIGHT)).is_ok());
        assert!(matches!(
            with(EndpointMetadata::new().with_region("")),
            Err(Error::InvalidMetadata { field: "region", .. })
        ));
        assert!(matches!(
            with(EndpointMetadata::new().with_zone("z".repeat(300))),
            Err(Error::InvalidMetadata { field: "zone", .. })
        ));
        assert!(matches!(
            with(EndpointMetadata::new().with_tag("", "x")),
            Err(Error::InvalidMetadata { field: "tags", .. })
        ));
    }

    #[test]
    fn serde_round_trip() {
        let e = Endpoint::new(
            "127.0.0.1:7".parse().unwrap(),
            Some(
                EndpointMetadata::new()
                    .with_zone("a")
                    .with_weight(3)
                    .with_tag("v", "2"),
            ),
        );
        let text = toml::to_string(&e).unwrap();
        let back: Endpoint = toml::from_str(&text).unwrap();
        assert_eq!(back, e);
        let plain: Endpoint = toml::from_str("address = \"127.0.0.1:8\"").unwrap();
        assert_eq!(plain, ep("127.0.0.1:8"));
        assert!(toml::from_str::<Endpoint>("address = \"127.0.0.1:8\"\nwieght = 3").is_err());
    }
}
