//! Locality and priority settings: zone-aware routing, priority levels, metadata subsets and
//! deterministic subsetting.
//!
//! Plain data and validation only: [`LocalityConfig`] (`[locality]`), [`PriorityConfig`]
//! (`[priority]`), [`SubsetConfig`] (`[subsets]`) and [`SubsettingConfig`] (`[subsetting]`).
//! The control plane turns them into each table's routing plan (`table::plan`); picks never
//! read them.
//!
//! Invariants: a config that passes `validate()` resolves (environment variables named here
//! are read once, when a balancer is created, by [`LocalityConfig::resolve`] and
//! [`SubsettingConfig::resolve`], which return typed errors rather than guessing).
#![deny(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, truncate};

/// How picks use the endpoints' zones (TOML `mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalityMode {
    /// Zones are ignored (the default).
    #[default]
    Disabled,
    /// The local zone only, while at least `panic_threshold_percent` of its endpoints are
    /// healthy; then the local region; then every zone.
    PreferLocal,
    /// Envoy's zone-aware routing: the local zone gets the share of traffic that keeps every
    /// endpoint's load even, the rest spills to the other zones by their residual capacity.
    ZoneAware,
}

/// Zone-aware routing (`[locality]`).
///
/// ```
/// # use tai_loadbalancer::{LoadBalancerConfig, LocalityMode};
/// let config = LoadBalancerConfig::from_toml_str(r#"
///     [locality]
///     mode = "zone_aware"
///     local_zone = "us-east-1a"
///     min_cluster_size = 2
/// "#).unwrap();
/// assert_eq!(config.locality.mode, LocalityMode::ZoneAware);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalityConfig {
    /// `disabled` (default), `prefer_local` or `zone_aware`.
    pub mode: LocalityMode,
    /// This balancer's zone (compared with [`EndpointMetadata::zone`](crate::EndpointMetadata)).
    pub local_zone: Option<String>,
    /// An environment variable to read the local zone from when `local_zone` is unset (for
    /// example one that Kubernetes' downward API fills).
    pub local_zone_env: Option<String>,
    /// This balancer's region (for `prefer_local`'s second step).
    pub local_region: Option<String>,
    /// An environment variable to read the local region from when `local_region` is unset.
    pub local_region_env: Option<String>,
    /// `zone_aware` routes by zone only while the local zone has at least this many healthy
    /// endpoints (default 1); below it, and whenever a zone has no healthy endpoint, picks
    /// spread over every zone.
    pub min_cluster_size: u32,
    /// How the *callers* (this balancer's fleet) are spread over zones, as relative counts
    /// (for example `{ "us-east-1a" = 12, "us-east-1b" = 4 }`). Envoy learns this from its
    /// local cluster; an embedded balancer cannot, so by default it assumes the callers are
    /// spread like the service's registered endpoints (per priority level, healthy or not,
    /// drained or not). Zones not listed count 0.
    pub client_zones: BTreeMap<String, u32>,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        Self {
            mode: LocalityMode::Disabled,
            local_zone: None,
            local_zone_env: None,
            local_region: None,
            local_region_env: None,
            min_cluster_size: 1,
            client_zones: BTreeMap::new(),
        }
    }
}

/// Largest accepted `locality.min_cluster_size`.
pub const MAX_MIN_CLUSTER_SIZE: u32 = 1_000_000;

/// Where a balancer is, resolved from [`LocalityConfig`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Locality {
    pub(crate) mode: LocalityMode,
    pub(crate) zone: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) min_cluster_size: u32,
    pub(crate) client_zones: BTreeMap<String, u32>,
}

fn check_label(field: &str, value: &Option<String>) -> Result<(), Error> {
    if let Some(v) = value {
        if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
            return Err(Error::invalid_config(
                field,
                format!(
                    "{:?} must be 1 to 255 bytes without control characters",
                    truncate(v)
                ),
            ));
        }
    }
    Ok(())
}

impl LocalityConfig {
    /// Checks every field (prefix `locality.`).
    pub fn validate(&self) -> Result<(), Error> {
        check_label("locality.local_zone", &self.local_zone)?;
        check_label("locality.local_zone_env", &self.local_zone_env)?;
        check_label("locality.local_region", &self.local_region)?;
        check_label("locality.local_region_env", &self.local_region_env)?;
        if self.min_cluster_size == 0 || self.min_cluster_size > MAX_MIN_CLUSTER_SIZE {
            return Err(Error::invalid_config(
                "locality.min_cluster_size",
                format!("{} is not in 1..={MAX_MIN_CLUSTER_SIZE}", self.min_cluster_size),
            ));
        }
        for (zone, count) in &self.client_zones {
            check_label("locality.client_zones", &Some(zone.clone()))?;
            if *count > 1_000_000_000 {
                return Err(Error::invalid_config(
                    "locality.client_zones",
                    format!("{count} callers in `{}` is more than 10^9", truncate(zone)),
                ));
            }
        }
        if !self.client_zones.is_empty() && self.client_zones.values().all(|&c| c == 0) {
            return Err(Error::invalid_config(
                "locality.client_zones",
                "every count is 0 (leave it empty to assume callers are spread like the endpoints)",
            ));
        }
        Ok(())
    }

    /// The local zone and region, reading the named environment variables where the values
    /// are not given. A named environment variable that is unset or empty is an error naming
    /// it (for a mode other than `disabled`); a mode whose place is not configured at all
    /// routes as `disabled`, with a warning in the log.
    pub(crate) fn resolve(&self) -> Result<Locality, Error> {
        let from_env = |value: &Option<String>, env: &Option<String>, field: &str| {
            if value.is_some() {
                return Ok(value.clone());
            }
            let Some(name) = env else { return Ok(None) };
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => {
                    let v = v.trim().to_owned();
                    check_label(field, &Some(v.clone()))?;
                    Ok(Some(v))
                }
                _ if self.mode == LocalityMode::Disabled => Ok(None),
                _ => Err(Error::invalid_config(
                    field,
                    format!("the environment variable {name:?} is unset or empty"),
                )),
            }
        };
        let zone = from_env(&self.local_zone, &self.local_zone_env, "locality.local_zone_env")?;
        let region = from_env(
            &self.local_region,
            &self.local_region_env,
            "locality.local_region_env",
        )?;
        // A mode without the place it needs routes as if disabled (and says so): setting
        // `mode` alone must not fail for want of another field.
        let unplaced = match self.mode {
            LocalityMode::ZoneAware => zone.is_none(),
            LocalityMode::PreferLocal => zone.is_none() && region.is_none(),
            LocalityMode::Disabled => false,
        };
        if unplaced {
            tracing::warn!(
                mode = ?self.mode,
                "[locality] has no local zone (local_zone or local_zone_env){}: routing ignores zones",
                if self.mode == LocalityMode::PreferLocal { " nor region" } else { "" }
            );
        }
        Ok(Locality {
            mode: if unplaced {
                LocalityMode::Disabled
            } else {
                self.mode
            },
            zone,
            region,
            min_cluster_size: self.min_cluster_size,
            client_zones: self.client_zones.clone(),
        })
    }
}

/// Priority levels (`[priority]`): how traffic spills from a level to the next.
///
/// Endpoints carry a priority ([`EndpointMetadata::priority`](crate::EndpointMetadata),
/// 0 is best). Level `P` takes `min(100, health(P) × overprovisioning_factor)` percent of
/// what the levels before it left, where `health(P)` is the percentage of its endpoints that
/// are healthy (Envoy's rule): with the default 1.4, a level keeps all of its traffic down
/// to about 71 % healthy and then spills gradually.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorityConfig {
    /// Default 1.4 (Envoy's 140); `1.0..=100.0`.
    pub overprovisioning_factor: f64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            overprovisioning_factor: 1.4,
        }
    }
}

impl PriorityConfig {
    /// Checks every field (prefix `priority.`).
    pub fn validate(&self) -> Result<(), Error> {
        let f = self.overprovisioning_factor;
        if !f.is_finite() || !(1.0..=100.0).contains(&f) {
            return Err(Error::invalid_config(
                "priority.overprovisioning_factor",
                format!("{f} is not in 1.0..=100.0"),
            ));
        }
        Ok(())
    }
}

/// What a subset pick does when no endpoint matches (TOML `fallback`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubsetFallback {
    /// A typed error, [`Error::NoSubsetMatch`] (the default).
    #[default]
    NoFallback,
    /// A pick over every routable endpoint, as if no subset was named.
    AnyEndpoint,
    /// A pick over `default_subset` (and the typed error if that is empty too).
    DefaultSubset,
}

/// Metadata subsets (`[subsets]`): picks restricted to endpoints whose tags match, from
/// subsets precomputed when a table is built.
///
/// ```
/// # use tai_loadbalancer::{LoadBalancerConfig, SubsetFallback};
/// let config = LoadBalancerConfig::from_toml_str(r#"
///     [subsets]
///     selectors = [["version"], ["stage", "version"]]
///     fallback = "default_subset"
///     default_subset = { version = "v1" }
/// "#).unwrap();
/// assert_eq!(config.subsets.fallback, SubsetFallback::DefaultSubset);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubsetConfig {
    /// The tag-key sets a pick may name (each a set of keys; order does not matter). Subsets
    /// are built for these only: a pick naming another set of keys is
    /// [`Error::UnknownSubsetSelector`].
    pub selectors: Vec<Vec<String>>,
    /// When no endpoint matches: `no_fallback` (default), `any_endpoint`, `default_subset`.
    pub fallback: SubsetFallback,
    /// The subset `default_subset` falls back to (tag key → value; its keys should be one of
    /// the `selectors`, else it never matches: a balancer warns about that).
    pub default_subset: BTreeMap<String, String>,
}

/// Most selectors, and most keys in one.
pub const MAX_SUBSET_SELECTORS: usize = 16;
/// Most tag keys in one selector (and in one subset pick).
pub const MAX_SUBSET_KEYS: usize = 8;

impl SubsetConfig {
    /// Checks every field (prefix `subsets.`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.selectors.len() > MAX_SUBSET_SELECTORS {
            return Err(Error::invalid_config(
                "subsets.selectors",
                format!("more than {MAX_SUBSET_SELECTORS} selectors"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for keys in &self.selectors {
            if keys.is_empty() || keys.len() > MAX_SUBSET_KEYS {
                return Err(Error::invalid_config(
                    "subsets.selectors",
                    format!("a selector has 1 to {MAX_SUBSET_KEYS} tag keys"),
                ));
            }
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != keys.len() {
                return Err(Error::invalid_config(
                    "subsets.selectors",
                    format!("{keys:?} names a key twice"),
                ));
            }
            for key in keys {
                check_label("subsets.selectors", &Some(key.clone()))?;
            }
            if !seen.insert(sorted) {
                return Err(Error::invalid_config(
                    "subsets.selectors",
                    format!("{keys:?} is listed twice"),
                ));
            }
        }
        for (key, value) in &self.default_subset {
            check_label("subsets.default_subset", &Some(key.clone()))?;
            if value.len() > 1020 {
                return Err(Error::invalid_config(
                    "subsets.default_subset",
                    format!("the value of `{}` is longer than 1020 bytes", truncate(key)),
                ));
            }
        }
        Ok(())
    }

    /// What a balancer should warn about: a default subset that cannot match (its keys are
    /// no selector's), or `default_subset` fallback without one. Picks then answer
    /// [`Error::NoSubsetMatch`] where the default would have been used.
    pub(crate) fn warnings(&self) -> Option<&'static str> {
        let mut keys: Vec<String> = self.default_subset.keys().cloned().collect();
        keys.sort();
        let matches = self.selectors.iter().any(|sel| {
            let mut sel = sel.clone();
            sel.sort();
            sel == keys
        });
        if self.fallback == SubsetFallback::DefaultSubset && keys.is_empty() {
            Some("fallback = \"default_subset\" without a default_subset: unmatched subset picks fail")
        } else if !keys.is_empty() && !matches {
            Some("default_subset's keys are not one of the selectors: it never matches")
        } else {
            None
        }
    }
}

/// Deterministic subsetting (`[subsetting]`): each balancer of a large fleet routes to a
/// subset of `subset_size` endpoints of each service, chosen by its client id so that the
/// fleet covers every endpoint evenly (the SRE book's algorithm, see
/// `docs::locality_and_priority`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubsettingConfig {
    /// Endpoints per service for this balancer; 0 (the default) turns subsetting off. A
    /// service with no more endpoints than this is used whole.
    pub subset_size: u32,
    /// This balancer's index in its fleet (0, 1, 2, ...: dense ids spread best).
    pub client_id: Option<u64>,
    /// An environment variable holding the client id when `client_id` is unset (for
    /// example a StatefulSet ordinal). A name like `pod-7` is read as its trailing number.
    pub client_id_env: Option<String>,
}

/// Largest accepted `subsetting.subset_size`.
pub const MAX_SUBSET_SIZE: u32 = 1_000_000;

impl SubsettingConfig {
    /// Checks every field (prefix `subsetting.`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.subset_size > MAX_SUBSET_SIZE {
            return Err(Error::invalid_config(
                "subsetting.subset_size",
                format!("{} is more than {MAX_SUBSET_SIZE}", self.subset_size),
            ));
        }
        check_label("subsetting.client_id_env", &self.client_id_env)?;
        Ok(())
    }

    /// `(subset_size, client_id)` if subsetting is on. On without a client id (given or from
    /// the environment) is an error.
    pub(crate) fn resolve(&self) -> Result<Option<(u32, u64)>, Error> {
        if self.subset_size == 0 {
            return Ok(None);
        }
        if let Some(id) = self.client_id {
            return Ok(Some((self.subset_size, id)));
        }
        let Some(name) = &self.client_id_env else {
            // Setting `subset_size` alone must run: a random client id spreads a fleet's
            // clients over the subsets at random (evenly on average, not exactly).
            let id = crate::sync::random_u64() >> 1;
            tracing::warn!(
                client_id = id,
                "[subsetting] subset_size is set without client_id or client_id_env: using a \
                 random client id (the fleet's spread is then random, not deterministic)"
            );
            return Ok(Some((self.subset_size, id)));
        };
        let value = std::env::var(name).unwrap_or_default();
        match parse_client_id(&value) {
            Some(id) => Ok(Some((self.subset_size, id))),
            None => Err(Error::invalid_config(
                "subsetting.client_id_env",
                format!(
                    "the environment variable {name:?} ({:?}) holds no client id",
                    truncate(&value)
                ),
            )),
        }
    }
}

/// A client id from text: a number, or the trailing number of a name (`pod-7` → 7).
pub(crate) fn parse_client_id(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.len() - text.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    text[text.len() - digits..].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_numbers_or_trailing_numbers() {
        assert_eq!(parse_client_id("7"), Some(7));
        assert_eq!(parse_client_id(" api-12 "), Some(12));
        assert_eq!(parse_client_id("web-3-0"), Some(0));
        assert_eq!(parse_client_id("pod"), None);
        assert_eq!(parse_client_id(""), None);
        assert_eq!(parse_client_id("99999999999999999999999"), None);
    }

    #[test]
    fn modes_need_the_local_place() {
        let zone_aware = LocalityConfig {
            mode: LocalityMode::ZoneAware,
            ..Default::default()
        };
        // Alone, the mode runs (as disabled, with a warning).
        assert_eq!(zone_aware.resolve().unwrap().mode, LocalityMode::Disabled);
        let prefer = LocalityConfig {
            mode: LocalityMode::PreferLocal,
            local_region: Some("eu".into()),
            ..Default::default()
        };
        assert_eq!(prefer.resolve().unwrap().region.as_deref(), Some("eu"));
        let missing_env = LocalityConfig {
            mode: LocalityMode::ZoneAware,
            local_zone_env: Some("TAI_LB_TEST_SURELY_UNSET_ZONE".into()),
            ..Default::default()
        };
        let error = missing_env.resolve().unwrap_err().to_string();
        assert!(error.contains("TAI_LB_TEST_SURELY_UNSET_ZONE"), "{error}");
    }

    #[test]
    fn subset_defaults_that_cannot_match_are_warned_about() {
        let mut config = SubsetConfig {
            selectors: vec![vec!["version".into()]],
            fallback: SubsetFallback::DefaultSubset,
            default_subset: BTreeMap::from([("stage".into(), "prod".into())]),
        };
        config.validate().unwrap();
        assert!(config.warnings().is_some());
        config.default_subset = BTreeMap::from([("version".into(), "v1".into())]);
        assert_eq!(config.warnings(), None);
        config.selectors.push(vec!["version".into()]);
        assert!(config.validate().is_err(), "a selector listed twice");
        let alone = SubsetConfig {
            fallback: SubsetFallback::DefaultSubset,
            ..Default::default()
        };
        alone.validate().unwrap();
        assert!(alone.warnings().is_some());
    }
}
