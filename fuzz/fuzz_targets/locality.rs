//! The priority and zone load computations against a straightforward model.
//!
//! * `priority_loads`: the model assigns levels in order with exact rational arithmetic
//!   (healthy/eligible as fractions of 100, the factor in hundredths), then normalizes; the
//!   crate's loads match within 1e-6 and always sum to 100 or to 0.
//! * `total_health` equals the model's capped sum.
//! * `zone_aware_shares`: `None` exactly when the model falls back; otherwise the shares
//!   match the model's, are non-negative, sum to 1, and the local share is 1 exactly when the
//!   local zone's capacity share covers its callers' share.
//! * `prefer_local_step` matches the model's integer comparison.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tai_loadbalancer::__fuzz::{
    LevelHealth, prefer_local_step, priority_loads, total_health, zone_aware_shares,
};

#[derive(Arbitrary, Debug)]
struct Input {
    levels: Vec<(u16, u16)>,
    factor_hundredths: u16,
    zones: Vec<(u16, u16)>,
    local: u8,
    min_cluster_size: u8,
    threshold: u8,
}

fn model_loads(levels: &[(u32, u32)], factor: f64) -> Vec<f64> {
    let health: Vec<f64> = levels
        .iter()
        .map(|&(healthy, eligible)| {
            if eligible == 0 {
                0.0
            } else {
                (100.0 * f64::from(healthy.min(eligible)) / f64::from(eligible) * factor).min(100.0)
            }
        })
        .collect();
    let mut remaining = 100.0;
    let mut loads = Vec::new();
    for h in &health {
        let l = if *h < remaining { *h } else { remaining };
        loads.push(l);
        remaining -= l;
    }
    let sum: f64 = loads.iter().sum();
    if sum > 0.0 && sum < 100.0 {
        loads.iter().map(|l| l / sum * 100.0).collect()
    } else {
        loads
    }
}

fn model_zones(local: usize, healthy: &[u32], clients: &[f64], min: u32) -> Option<Vec<f64>> {
    if local >= healthy.len() || healthy[local] < min || healthy.iter().any(|&h| h == 0) {
        return None;
    }
    let ht: f64 = healthy.iter().map(|&h| f64::from(h)).sum();
    let ct: f64 = clients.iter().sum();
    if ct <= 0.0 || clients[local] <= 0.0 {
        return None;
    }
    let up: Vec<f64> = healthy.iter().map(|&h| f64::from(h) / ht).collect();
    let cl: Vec<f64> = clients.iter().map(|&c| c / ct).collect();
    let mut out = vec![0.0; healthy.len()];
    if up[local] >= cl[local] {
        out[local] = 1.0;
        return Some(out);
    }
    out[local] = up[local] / cl[local];
    let residual: Vec<f64> = (0..healthy.len())
        .map(|z| if z == local { 0.0 } else { (up[z] - cl[z]).max(0.0) })
        .collect();
    let rt: f64 = residual.iter().sum();
    let others: f64 = 1.0 - up[local];
    for z in 0..healthy.len() {
        if z != local {
            out[z] = (1.0 - out[local])
                * if rt > 0.0 {
                    residual[z] / rt
                } else {
                    up[z] / others
                };
        }
    }
    Some(out)
}

fuzz_target!(|input: Input| {
    let factor = 1.0 + f64::from(input.factor_hundredths % 9_901) / 100.0; // 1.0..=100.0
    let levels: Vec<(u32, u32)> = input
        .levels
        .iter()
        .take(16)
        .map(|&(h, e)| (u32::from(h % 1_000), u32::from(e % 1_000)))
        .collect();
    let health: Vec<LevelHealth> = levels
        .iter()
        .map(|&(healthy, eligible)| LevelHealth { healthy, eligible })
        .collect();
    let loads = priority_loads(&health, factor);
    let model = model_loads(&levels, factor);
    assert_eq!(loads.len(), model.len());
    for (a, b) in loads.iter().zip(&model) {
        assert!((a - b).abs() < 1e-6, "loads {loads:?} vs model {model:?}");
        assert!(*a >= 0.0);
    }
    let sum: f64 = loads.iter().sum();
    assert!(sum == 0.0 || (sum - 100.0).abs() < 1e-6, "loads sum to {sum}");
    let total = total_health(&health, factor);
    let model_total: f64 = levels
        .iter()
        .map(|&(h, e)| {
            if e == 0 {
                0.0
            } else {
                (100.0 * f64::from(h.min(e)) / f64::from(e) * factor).min(100.0)
            }
        })
        .sum::<f64>()
        .min(100.0);
    assert!((total - model_total).abs() < 1e-9);

    let zones: Vec<(u32, u32)> = input
        .zones
        .iter()
        .take(12)
        .map(|&(h, c)| (u32::from(h % 500), u32::from(c % 500)))
        .collect();
    if !zones.is_empty() {
        let healthy: Vec<u32> = zones.iter().map(|z| z.0).collect();
        let clients: Vec<f64> = zones.iter().map(|z| f64::from(z.1)).collect();
        let local = usize::from(input.local) % zones.len();
        let min = u32::from(input.min_cluster_size % 8).max(1);
        let got = zone_aware_shares(local, &healthy, &clients, min);
        let want = model_zones(local, &healthy, &clients, min);
        assert_eq!(got.is_some(), want.is_some(), "{got:?} vs {want:?}");
        if let (Some(got), Some(want)) = (got, want) {
            let sum: f64 = got.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "shares sum to {sum}");
            for (a, b) in got.iter().zip(&want) {
                assert!(*a >= 0.0 && (a - b).abs() < 1e-9, "{got:?} vs {want:?}");
            }
        }
    }

    if let [a, b, ..] = levels[..] {
        let t = u32::from(input.threshold % 101);
        let step = prefer_local_step(
            LevelHealth {
                healthy: a.0,
                eligible: a.1,
            },
            LevelHealth {
                healthy: b.0,
                eligible: b.1,
            },
            t,
        );
        let ok = |(h, e): (u32, u32)| h > 0 && u64::from(h) * 100 >= u64::from(t) * u64::from(e);
        let model = if ok(a) {
            0
        } else if ok(b) {
            1
        } else {
            2
        };
        assert_eq!(step, model);
    }
});
