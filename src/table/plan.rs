//! The routing plan: which group of a service's routable members a pick draws from, by
//! priority level (Envoy's overprovisioning rule) and locality (zone-aware routing or
//! prefer-local).
//!
//! This module owns the load computations, as pure functions of counts
//! ([`priority_loads`], [`total_health`], [`zone_aware_shares`], [`prefer_local_step`]) that
//! the `locality` fuzz target checks against a straightforward model, and [`RoutingPlan`],
//! their result in a table: groups of routable members, each a dense view with its own
//! weighted schedule, and the cumulative shares a pick draws against.
//!
//! # Invariants
//!
//! * A plan exists only when it restricts something: more than one group, or one group that
//!   is not the whole routable set. Otherwise the table has none and picks take the plain
//!   path.
//! * Every group is non-empty and every member of a group is routable; the shares of the
//!   groups add up to the whole `u32` space, so a draw always lands in a group.
//! * A draw costs one random number, one bucket lookup and (in expectation) under one
//!   comparison: `O(1)` whatever the number of groups or endpoints, no allocation.
#![deny(unsafe_code)]

use crate::table::Members;
use crate::table::schedule::Schedule;

/// One priority level's endpoints: how many are healthy, out of how many are eligible
/// (not marked down or draining by an operator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub struct LevelHealth {
    /// Healthy endpoints.
    pub healthy: u32,
    /// Eligible endpoints (healthy or not, not taken out by an operator).
    pub eligible: u32,
}

impl LevelHealth {
    /// `min(100, healthy% × factor)`, Envoy's health of a priority level (0 for a level with
    /// no eligible endpoint).
    #[inline]
    fn scaled(self, factor: f64) -> f64 {
        if self.eligible == 0 {
            return 0.0;
        }
        let healthy = f64::from(self.healthy.min(self.eligible));
        (100.0 * healthy / f64::from(self.eligible) * factor).min(100.0)
    }
}

/// The percentage of traffic each level takes (Envoy's priority load): level `P` takes
/// `min(remaining, health(P))` in order, where `health(P) = min(100, healthy% × factor)`;
/// if the levels' health sums to less than 100, the loads are normalized to 100 (all of the
/// traffic goes where there is health). All zero when no level has a healthy endpoint.
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub fn priority_loads(levels: &[LevelHealth], factor: f64) -> Vec<f64> {
    let mut remaining = 100.0f64;
    let mut loads: Vec<f64> = levels
        .iter()
        .map(|level| {
            let load = level.scaled(factor).min(remaining);
            remaining -= load;
            load
        })
        .collect();
    let sum: f64 = loads.iter().sum();
    if sum > 0.0 && sum < 100.0 {
        for load in &mut loads {
            *load = *load * 100.0 / sum;
        }
    }
    loads
}

/// Envoy's normalized total health: `min(100, Σ health(P))`. Below the panic threshold the
/// whole service is in panic.
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub fn total_health(levels: &[LevelHealth], factor: f64) -> f64 {
    levels.iter().map(|l| l.scaled(factor)).sum::<f64>().min(100.0)
}

/// Zone-aware shares within one priority level (Envoy's algorithm), or `None` to route
/// across zones plainly.
///
/// `healthy[z]` is each zone's healthy endpoints at this level, `clients[z]` how the callers
/// are spread over the same zones (relative counts), `local` the caller's zone. Plain routing
/// (`None`) when the local zone has fewer than `min_cluster_size` healthy endpoints, when a
/// zone has none, or when no caller is counted in the local zone. Otherwise: if the local
/// zone's share of healthy endpoints is at least its share of callers, everything stays
/// local; else the local zone takes `upstream% / callers%` of the traffic and the rest goes to
/// the other zones in proportion to their residual capacity `max(0, upstream% − callers%)`
/// (in proportion to their healthy endpoints if no zone has any).
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub fn zone_aware_shares(
    local: usize,
    healthy: &[u32],
    clients: &[f64],
    min_cluster_size: u32,
) -> Option<Vec<f64>> {
    debug_assert_eq!(healthy.len(), clients.len());
    if local >= healthy.len() || healthy[local] < min_cluster_size || healthy.contains(&0) {
        return None;
    }
    let upstream_total: f64 = healthy.iter().map(|&h| f64::from(h)).sum();
    let client_total: f64 = clients.iter().sum();
    // Written to be false for NaN too.
    let positive = |x: f64| x.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
    if !positive(client_total) || !positive(clients[local]) {
        return None;
    }
    let upstream = |z: usize| f64::from(healthy[z]) / upstream_total;
    let client = |z: usize| clients[z] / client_total;
    let mut shares = vec![0.0; healthy.len()];
    if upstream(local) >= client(local) {
        shares[local] = 1.0;
        return Some(shares);
    }
    let local_share = upstream(local) / client(local);
    shares[local] = local_share;
    let residual = |z: usize| {
        if z == local {
            0.0
        } else {
            (upstream(z) - client(z)).max(0.0)
        }
    };
    let residual_total: f64 = (0..healthy.len()).map(residual).sum();
    for (z, share) in shares.iter_mut().enumerate() {
        if z == local {
            continue;
        }
        let part = if residual_total > 0.0 {
            residual(z) / residual_total
        } else {
            upstream(z) / (1.0 - upstream(local))
        };
        *share = (1.0 - local_share) * part;
    }
    Some(shares)
}

/// Prefer-local's step: 0 (the local zone), 1 (the local region) or 2 (everywhere). A step
/// is taken while its endpoints are at least `panic_threshold`% healthy (and one is).
#[cfg_attr(not(fuzzing), allow(unreachable_pub))] // public to `fuzz/` through `__fuzz`
pub fn prefer_local_step(local_zone: LevelHealth, local_region: LevelHealth, panic_threshold: u32) -> usize {
    let enough = |h: LevelHealth| {
        h.healthy > 0 && u64::from(h.healthy) * 100 >= u64::from(panic_threshold) * u64::from(h.eligible)
    };
    if enough(local_zone) {
        0
    } else if enough(local_region) {
        1
    } else {
        2
    }
}

/// One member, as the plan sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PlanMember {
    /// Its priority (0 is best).
    pub(crate) level: u32,
    /// Its zone, as an index into the caller's list of zones (`None`: no zone).
    pub(crate) zone: Option<u32>,
    /// In the local zone / the local region.
    pub(crate) local_zone: bool,
    pub(crate) local_region: bool,
    /// Not taken out by an operator (nor by deterministic subsetting).
    pub(crate) eligible: bool,
    pub(crate) healthy: bool,
    pub(crate) routable: bool,
}

/// The locality settings a plan follows.
#[derive(Clone, Debug)]
pub(crate) struct PlanSettings<'a> {
    pub(crate) mode: crate::config::locality::LocalityMode,
    pub(crate) min_cluster_size: u32,
    pub(crate) panic_threshold: u32,
    pub(crate) overprovisioning_factor: f64,
    /// Callers per zone index (`None`: spread like the endpoints).
    pub(crate) client_zones: Option<&'a [f64]>,
}

/// A plan before its views exist: groups of member indices with their shares, the levels'
/// shares (for hash picks) and each member's level.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PlanSpec {
    pub(crate) groups: Vec<(Vec<u32>, f64, u32)>,
    pub(crate) levels: Vec<(u32, f64)>,
    pub(crate) member_level: Vec<u32>,
}

/// The plan for `members` (not in panic: the caller routes plainly then), or `None` when it
/// would not restrict anything.
pub(crate) fn plan_spec(members: &[PlanMember], settings: &PlanSettings<'_>) -> Option<PlanSpec> {
    use crate::config::locality::LocalityMode;
    let mut levels: Vec<u32> = members.iter().filter(|m| m.eligible).map(|m| m.level).collect();
    levels.sort_unstable();
    levels.dedup();
    if levels.len() <= 1 && settings.mode == LocalityMode::Disabled {
        return None;
    }
    let health = |filter: &dyn Fn(&PlanMember) -> bool| {
        let mut h = LevelHealth::default();
        for m in members.iter().filter(|m| m.eligible && filter(m)) {
            h.eligible += 1;
            h.healthy += u32::from(m.healthy);
        }
        h
    };
    let level_health: Vec<LevelHealth> = levels.iter().map(|&l| health(&|m| m.level == l)).collect();
    let loads = priority_loads(&level_health, settings.overprovisioning_factor);
    let mut groups = Vec::new();
    for (&level, &load) in levels.iter().zip(&loads) {
        if load <= 0.0 {
            continue;
        }
        let at_level = |m: &PlanMember| m.level == level && m.routable;
        let indices = |filter: &dyn Fn(&PlanMember) -> bool| -> Vec<u32> {
            (0..members.len())
                .filter(|&i| at_level(&members[i]) && filter(&members[i]))
                .map(|i| i as u32)
                .collect()
        };
        match settings.mode {
            LocalityMode::Disabled => groups.push((indices(&|_| true), load, level)),
            LocalityMode::PreferLocal => {
                let step = prefer_local_step(
                    health(&|m| m.level == level && m.local_zone),
                    health(&|m| m.level == level && m.local_region),
                    settings.panic_threshold,
                );
                let chosen = match step {
                    0 => indices(&|m| m.local_zone),
                    1 => indices(&|m| m.local_region),
                    _ => indices(&|_| true),
                };
                groups.push((chosen, load, level));
            }
            LocalityMode::ZoneAware => {
                // The zones present at this level (members without one form their own).
                let mut zones: Vec<Option<u32>> = members
                    .iter()
                    .filter(|m| m.eligible && m.level == level)
                    .map(|m| m.zone)
                    .collect();
                zones.sort_unstable();
                zones.dedup();
                let local = members
                    .iter()
                    .find(|m| m.local_zone && m.level == level && m.eligible)
                    .map(|m| m.zone)
                    .and_then(|z| zones.iter().position(|x| *x == z));
                let healthy: Vec<u32> = zones
                    .iter()
                    .map(|&z| health(&|m| m.level == level && m.zone == z).healthy)
                    .collect();
                let clients: Vec<f64> = zones
                    .iter()
                    .map(|&z| match (settings.client_zones, z) {
                        (Some(given), Some(z)) => given.get(z as usize).copied().unwrap_or(0.0),
                        (Some(_), None) => 0.0,
                        // Callers spread like the service's registered endpoints (an
                        // operator's drain or mark-down does not move callers).
                        (None, _) => {
                            members.iter().filter(|m| m.level == level && m.zone == z).count() as f64
                        }
                    })
                    .collect();
                let shares = local.and_then(|local| {
                    zone_aware_shares(local, &healthy, &clients, settings.min_cluster_size)
                });
                match shares {
                    Some(shares) => {
                        for (z, share) in zones.iter().zip(shares) {
                            if share > 0.0 {
                                groups.push((indices(&|m| m.zone == *z), load * share, level));
                            }
                        }
                    }
                    None => groups.push((indices(&|_| true), load, level)),
                }
            }
        }
    }
    groups.retain(|(indices, share, _)| !indices.is_empty() && *share > 0.0);
    let routable = members.iter().filter(|m| m.routable).count();
    if groups.is_empty() || (groups.len() == 1 && groups[0].0.len() == routable) {
        return None;
    }
    Some(PlanSpec {
        groups,
        levels: levels.iter().copied().zip(loads).collect(),
        member_level: members.iter().map(|m| m.level).collect(),
    })
}

/// One group a pick may draw: routable members of one priority level (and zone).
#[derive(Debug)]
pub(crate) struct PlanGroup {
    pub(crate) view: Members,
    /// The weighted strategy's schedule over `view`, when its weights differ.
    pub(crate) schedule: Option<Schedule>,
    /// Whether the weights in `view` differ.
    pub(crate) weighted: bool,
    /// The priority level (the endpoints' `priority`).
    pub(crate) level: u32,
}

/// What a table routes by when priorities or locality restrict its routable members.
#[derive(Debug)]
pub(crate) struct RoutingPlan {
    groups: Box<[PlanGroup]>,
    /// Inclusive upper bound of each group's share of the `u32` space (the last is
    /// `u32::MAX`).
    bounds: Box<[u32]>,
    /// For each of 256 buckets of the space (`r >> 24`), the first group whose bound reaches
    /// into it.
    first: Box<[u16; 256]>,
    /// Hash picks: the levels' cumulative shares (inclusive upper bounds of the `u32` space)
    /// and the level each member is at (indexed like the table's members).
    level_bounds: Box<[(u32, u32)]>,
    member_level: Box<[u32]>,
}

impl RoutingPlan {
    /// A plan from `groups` and their shares (non-negative, not all zero; groups with a zero
    /// share are dropped), the levels' shares for hash picks, and each member's level.
    /// `None` if no group is left.
    pub(crate) fn new(
        groups: Vec<(PlanGroup, f64)>,
        levels: &[(u32, f64)],
        member_level: Vec<u32>,
    ) -> Option<RoutingPlan> {
        let groups: Vec<(PlanGroup, f64)> = groups
            .into_iter()
            .filter(|(g, share)| *share > 0.0 && share.is_finite() && g.view.len() > 0)
            .collect();
        if groups.is_empty() || groups.len() > usize::from(u16::MAX) {
            return None;
        }
        let shares: Vec<f64> = groups.iter().map(|(_, s)| *s).collect();
        let bounds = cumulative_bounds(&shares);
        let mut first = Box::new([0u16; 256]);
        let mut g = 0usize;
        for (bucket, slot) in first.iter_mut().enumerate() {
            let start = (bucket as u32) << 24;
            while bounds[g] < start {
                g += 1;
            }
            *slot = g as u16;
        }
        let levels: Vec<(u32, f64)> = levels
            .iter()
            .copied()
            .filter(|(_, s)| *s > 0.0 && s.is_finite())
            .collect();
        let level_shares: Vec<f64> = levels.iter().map(|(_, s)| *s).collect();
        let level_bounds = cumulative_bounds(&level_shares)
            .iter()
            .zip(&levels)
            .map(|(&b, &(level, _))| (b, level))
            .collect();
        Some(RoutingPlan {
            groups: groups.into_iter().map(|(g, _)| g).collect(),
            bounds,
            first,
            level_bounds,
            member_level: member_level.into_boxed_slice(),
        })
    }

    /// The group a pick draws from for the random number `r`.
    #[inline]
    pub(crate) fn group(&self, r: u32) -> &PlanGroup {
        let mut g = usize::from(self.first[(r >> 24) as usize]);
        while r > self.bounds[g] {
            g += 1;
        }
        &self.groups[g]
    }

    /// The groups, in draw order.
    pub(crate) fn groups(&self) -> &[PlanGroup] {
        &self.groups
    }

    /// The level a hash pick of `h` goes to (by the top bits of the hash against the levels'
    /// shares, so a key keeps its level while health is unchanged), if the plan has levels.
    #[inline]
    pub(crate) fn level_of_hash(&self, h: u64) -> Option<u32> {
        let r = (h >> 32) as u32;
        self.level_bounds
            .iter()
            .find(|(bound, _)| r <= *bound)
            .map(|&(_, level)| level)
    }

    /// Member `i`'s level.
    #[inline]
    pub(crate) fn member_level(&self, i: usize) -> u32 {
        self.member_level.get(i).copied().unwrap_or(0)
    }
}

/// Inclusive upper bounds over the `u32` space for `shares` (positive proportions, any
/// scale): share `i` covers `bounds[i-1] + 1 ..= bounds[i]`, and the last bound is
/// `u32::MAX`.
fn cumulative_bounds(shares: &[f64]) -> Box<[u32]> {
    let total: f64 = shares.iter().sum();
    let space = f64::from(u32::MAX) + 1.0;
    let mut acc = 0.0;
    shares
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if i + 1 == shares.len() {
                return u32::MAX;
            }
            acc += s;
            let upper = (acc / total * space).floor();
            if upper < 1.0 {
                0
            } else {
                (upper - 1.0).min(f64::from(u32::MAX)) as u32
            }
        })
        .collect()
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    fn level(healthy: u32, eligible: u32) -> LevelHealth {
        LevelHealth { healthy, eligible }
    }

    #[test]
    fn envoy_priority_table() {
        // Envoy's documented table: P0 healthy %, P1 fully healthy.
        for (p0, expected) in [
            (100, 100.0),
            (72, 100.0),
            (71, 99.4),
            (50, 70.0),
            (25, 35.0),
            (0, 0.0),
        ] {
            let loads = priority_loads(&[level(p0, 100), level(100, 100)], 1.4);
            assert!((loads[0] - expected).abs() < 1e-9, "{p0}%: {loads:?}");
            assert!((loads[0] + loads[1] - 100.0).abs() < 1e-9);
        }
        // Both degraded: normalized to where the health is.
        let loads = priority_loads(&[level(20, 100), level(20, 100)], 1.4);
        assert!(
            (loads[0] - 50.0).abs() < 1e-9 && (loads[1] - 50.0).abs() < 1e-9,
            "{loads:?}"
        );
        assert!((total_health(&[level(20, 100), level(20, 100)], 1.4) - 56.0).abs() < 1e-9);
        assert_eq!(priority_loads(&[level(0, 3), level(0, 0)], 1.4), vec![0.0, 0.0]);
    }

    #[test]
    fn zone_aware_follows_envoy() {
        // 3 zones x 4, all healthy, callers spread alike: all local.
        let clients = [4.0, 4.0, 4.0];
        assert_eq!(
            zone_aware_shares(0, &[4, 4, 4], &clients, 1),
            Some(vec![1.0, 0.0, 0.0])
        );
        // Two local endpoints fail: 2/10 of the capacity, 1/3 of the callers.
        let shares = zone_aware_shares(0, &[2, 4, 4], &clients, 1).unwrap();
        assert!((shares[0] - 0.6).abs() < 1e-9, "{shares:?}");
        assert!((shares[1] - 0.2).abs() < 1e-9 && (shares[2] - 0.2).abs() < 1e-9);
        // Under min_cluster_size, or a zone with nothing healthy: plain routing.
        assert_eq!(zone_aware_shares(0, &[2, 4, 4], &clients, 3), None);
        assert_eq!(zone_aware_shares(0, &[4, 0, 4], &clients, 1), None);
        // Uneven residuals go to the zone with spare capacity.
        let shares = zone_aware_shares(0, &[1, 6, 3], &[1.0, 1.0, 1.0], 1).unwrap();
        let sum: f64 = shares.iter().sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!((shares[0] - 0.3).abs() < 1e-9, "{shares:?}");
        assert!((shares[1] - 0.7).abs() < 1e-9 && shares[2] == 0.0, "{shares:?}");
    }

    #[test]
    fn prefer_local_steps_down_below_the_threshold() {
        assert_eq!(prefer_local_step(level(4, 4), level(8, 8), 50), 0);
        assert_eq!(prefer_local_step(level(2, 4), level(8, 8), 50), 0);
        assert_eq!(prefer_local_step(level(1, 4), level(5, 8), 50), 1);
        assert_eq!(prefer_local_step(level(0, 4), level(3, 8), 50), 2);
        assert_eq!(prefer_local_step(level(0, 0), level(0, 0), 0), 2);
    }

    #[test]
    fn bounds_cover_the_space_in_proportion() {
        let b = cumulative_bounds(&[1.0, 3.0]);
        assert_eq!(b[1], u32::MAX);
        let quarter = (b[0] as f64 + 1.0) / (f64::from(u32::MAX) + 1.0);
        assert!((quarter - 0.25).abs() < 1e-9, "{quarter}");
        assert_eq!(&*cumulative_bounds(&[5.0]), &[u32::MAX]);
    }
}
