//! Metadata subsets (Envoy's subset load balancing): a table's routable members grouped by
//! the values of configured tag keys, so a pick that names a subset finds its members with
//! one hash lookup instead of filtering.
//!
//! Built on the control plane with the table, from the `[subsets]` selectors: for each
//! selector (a sorted set of tag keys), every combination of values that routable members
//! carry becomes a [`Subset`], a dense view of those members with its own weighted schedule.
//! A member lacking one of a selector's keys is in none of that selector's subsets.
//!
//! # Invariants
//!
//! * Every subset is non-empty and holds routable members only.
//! * A lookup allocates nothing: the request's pairs are sorted in a stack array, hashed
//!   with XXH3 (seeded by the selector's index) and compared with the stored values.
#![deny(unsafe_code)]

use std::collections::HashMap;

use xxhash_rust::xxh3::Xxh3;

use crate::config::locality::{MAX_SUBSET_KEYS, SubsetFallback};
use crate::table::Members;
use crate::table::schedule::Schedule;

/// One subset: the routable members whose tags hold `values` for the selector's keys.
#[derive(Debug)]
pub(crate) struct Subset {
    selector: u32,
    values: Box<[Box<str>]>,
    pub(crate) view: Members,
    pub(crate) schedule: Option<Schedule>,
    pub(crate) weighted: bool,
}

/// Why a subset lookup found nothing to pick from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubsetMiss {
    /// The pairs name no configured selector (or more keys than any has).
    UnknownSelector,
    /// No routable member matches, and the fallback is `no_fallback` or an empty default.
    NoMatch,
    /// No routable member matches and the fallback is `any_endpoint`.
    AnyEndpoint,
}

/// A table's subsets.
#[derive(Debug)]
pub(crate) struct SubsetIndex {
    /// Each selector's keys, sorted.
    selectors: Box<[Box<[Box<str>]>]>,
    subsets: Box<[Subset]>,
    /// Hash of (selector, values) → indices into `subsets`.
    by_hash: HashMap<u64, Vec<u32>>,
    fallback: SubsetFallback,
    /// The default subset's index, if it is configured and non-empty.
    default: Option<u32>,
}

/// Hash of a selector's values, in its keys' order.
fn values_hash<'a>(selector: u32, values: impl Iterator<Item = &'a str>) -> u64 {
    let mut hasher = Xxh3::with_seed(u64::from(selector));
    for v in values {
        hasher.update(&(v.len() as u64).to_le_bytes());
        hasher.update(v.as_bytes());
    }
    hasher.digest()
}

/// A member's tags, for building: a lookup by key.
pub(crate) trait Tags {
    fn tag(&self, key: &str) -> Option<&str>;
}

impl Tags for crate::endpoint::Endpoint {
    fn tag(&self, key: &str) -> Option<&str> {
        crate::endpoint::Endpoint::tag(self, key)
    }
}

impl<T: Tags + ?Sized> Tags for &T {
    fn tag(&self, key: &str) -> Option<&str> {
        (**self).tag(key)
    }
}

/// A subset before its view exists: selector, values and member indices.
pub(crate) struct SubsetSpec {
    pub(crate) selector: u32,
    pub(crate) values: Vec<Box<str>>,
    pub(crate) members: Vec<u32>,
}

/// Groups `routable` member indices of `members` by each selector's values (selectors'
/// keys given sorted).
pub(crate) fn group<T: Tags>(
    selectors: &[Vec<String>],
    members: &[T],
    routable: impl Fn(usize) -> bool,
) -> Vec<SubsetSpec> {
    let mut specs = Vec::new();
    for (s, keys) in selectors.iter().enumerate() {
        let mut by_values: std::collections::BTreeMap<Vec<&str>, Vec<u32>> = Default::default();
        for (i, member) in members.iter().enumerate() {
            if !routable(i) {
                continue;
            }
            let values: Option<Vec<&str>> = keys.iter().map(|k| member.tag(k)).collect();
            if let Some(values) = values {
                by_values.entry(values).or_default().push(i as u32);
            }
        }
        for (values, indices) in by_values {
            specs.push(SubsetSpec {
                selector: s as u32,
                values: values.into_iter().map(Box::from).collect(),
                members: indices,
            });
        }
    }
    specs
}

impl SubsetIndex {
    /// An index over `subsets` (built from [`group`]'s specs), for `selectors` (each sorted),
    /// with `fallback` and the default subset's pairs.
    pub(crate) fn new(
        selectors: &[Vec<String>],
        subsets: Vec<Subset>,
        fallback: SubsetFallback,
        default: &std::collections::BTreeMap<String, String>,
    ) -> SubsetIndex {
        let mut by_hash: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, subset) in subsets.iter().enumerate() {
            let h = values_hash(subset.selector, subset.values.iter().map(|v| &**v));
            by_hash.entry(h).or_default().push(i as u32);
        }
        let mut index = SubsetIndex {
            selectors: selectors
                .iter()
                .map(|keys| keys.iter().map(|k| Box::from(k.as_str())).collect())
                .collect(),
            subsets: subsets.into_boxed_slice(),
            by_hash,
            fallback,
            default: None,
        };
        if fallback == SubsetFallback::DefaultSubset {
            let pairs: Vec<(&str, &str)> = default.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            index.default = index.find(&pairs).ok().flatten();
        }
        index
    }

    /// The subset with member `spec` (for building).
    pub(crate) fn subset(
        spec: &SubsetSpec,
        view: Members,
        schedule: Option<Schedule>,
        weighted: bool,
    ) -> Subset {
        Subset {
            selector: spec.selector,
            values: spec.values.clone().into_boxed_slice(),
            view,
            schedule,
            weighted,
        }
    }

    /// The subset `pairs` name: `Ok(Some)` if it has members, `Ok(None)` if the selector is
    /// known but nothing matches, `Err` if no selector has exactly these keys.
    #[inline]
    fn find(&self, pairs: &[(&str, &str)]) -> Result<Option<u32>, SubsetMiss> {
        if pairs.is_empty() || pairs.len() > MAX_SUBSET_KEYS {
            return Err(SubsetMiss::UnknownSelector);
        }
        let mut sorted: [(&str, &str); MAX_SUBSET_KEYS] = [("", ""); MAX_SUBSET_KEYS];
        sorted[..pairs.len()].copy_from_slice(pairs);
        let sorted = &mut sorted[..pairs.len()];
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let Some(selector) = self.selectors.iter().position(|keys| {
            keys.len() == sorted.len() && keys.iter().zip(sorted.iter()).all(|(k, p)| **k == *p.0)
        }) else {
            return Err(SubsetMiss::UnknownSelector);
        };
        let h = values_hash(selector as u32, sorted.iter().map(|p| p.1));
        let found = self.by_hash.get(&h).and_then(|candidates| {
            candidates.iter().copied().find(|&i| {
                let s = &self.subsets[i as usize];
                s.selector == selector as u32 && s.values.iter().zip(sorted.iter()).all(|(v, p)| **v == *p.1)
            })
        });
        Ok(found)
    }

    /// The subset a pick naming `pairs` draws from, after the fallback policy.
    #[inline]
    pub(crate) fn resolve(&self, pairs: &[(&str, &str)]) -> Result<&Subset, SubsetMiss> {
        match self.find(pairs)? {
            Some(i) => Ok(&self.subsets[i as usize]),
            None => match self.fallback {
                SubsetFallback::NoFallback => Err(SubsetMiss::NoMatch),
                SubsetFallback::AnyEndpoint => Err(SubsetMiss::AnyEndpoint),
                SubsetFallback::DefaultSubset => match self.default {
                    Some(i) => Ok(&self.subsets[i as usize]),
                    None => Err(SubsetMiss::NoMatch),
                },
            },
        }
    }
}
