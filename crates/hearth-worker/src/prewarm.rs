//! How many pre-created sandboxes to keep, per kind: a decision from recent cold-start demand,
//! with no I/O (the pool feeds it timestamps and acts on the numbers).
//!
//! A kind (runtime image, network mode, `/tmp` size) that saw `n` cold starts in the last
//! `window` keeps `n` sandboxes ready, at least one while it saw any cold start within
//! `idle_after`, at most `per_kind_max`; with no demand for `idle_after` it keeps none (the
//! pool empties when idle). When the kinds together want more than `total_max`, the ones with
//! the most recent demand keep theirs first.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bounds of the pre-created pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrewarmConfig {
    /// At most this many ready sandboxes of one kind.
    pub per_kind_max: usize,
    /// At most this many ready sandboxes in all.
    pub total_max: usize,
    /// Demand is the number of cold starts within this window.
    pub window: Duration,
    /// A kind without a cold start for this long keeps no sandbox.
    pub idle_after: Duration,
}

impl Default for PrewarmConfig {
    fn default() -> Self {
        PrewarmConfig {
            per_kind_max: 2,
            total_max: 4,
            window: Duration::from_secs(60),
            idle_after: Duration::from_secs(600),
        }
    }
}

impl PrewarmConfig {
    /// No pre-created sandboxes at all (every cold start creates inline).
    pub fn disabled() -> Self {
        PrewarmConfig {
            per_kind_max: 0,
            total_max: 0,
            ..Self::default()
        }
    }
}

/// Drop demand records older than `idle_after` (the longest any decision looks back).
pub fn forget_old(history: &mut VecDeque<Instant>, now: Instant, cfg: &PrewarmConfig) {
    while let Some(&t) = history.front() {
        if now.duration_since(t) > cfg.idle_after {
            history.pop_front();
        } else {
            break;
        }
    }
}

/// The number of ready sandboxes each kind should have, in the order given.
pub fn targets(kinds: &[&VecDeque<Instant>], now: Instant, cfg: &PrewarmConfig) -> Vec<usize> {
    let mut want: Vec<usize> = kinds
        .iter()
        .map(|h| {
            let recent = h
                .iter()
                .filter(|&&t| now.duration_since(t) <= cfg.window)
                .count();
            let any = h.iter().any(|&t| now.duration_since(t) <= cfg.idle_after);
            if !any {
                0
            } else {
                recent.max(1).min(cfg.per_kind_max)
            }
        })
        .collect();
    // Over the total: the kinds whose last demand is oldest give theirs up first.
    let mut total: usize = want.iter().sum();
    if total > cfg.total_max {
        let mut order: Vec<usize> = (0..kinds.len()).collect();
        order.sort_by_key(|&i| kinds[i].back().copied());
        for i in order {
            let cut = want[i].min(total - cfg.total_max);
            want[i] -= cut;
            total -= cut;
            if total <= cfg.total_max {
                break;
            }
        }
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now: Instant, secs_ago: &[u64]) -> VecDeque<Instant> {
        let mut v: Vec<Instant> = secs_ago
            .iter()
            .map(|s| now - Duration::from_secs(*s))
            .collect();
        v.sort();
        v.into()
    }

    fn cfg() -> PrewarmConfig {
        PrewarmConfig {
            per_kind_max: 3,
            total_max: 4,
            window: Duration::from_secs(60),
            idle_after: Duration::from_secs(600),
        }
    }

    #[test]
    fn no_demand_means_no_sandboxes() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let h = VecDeque::new();
        assert_eq!(targets(&[&h], now, &cfg()), vec![0]);
    }

    #[test]
    fn demand_in_window_sets_the_count_up_to_the_kind_maximum() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let one = at(now, &[5]);
        let two = at(now, &[5, 10]);
        let many = at(now, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(targets(&[&one], now, &cfg()), vec![1]);
        assert_eq!(targets(&[&two], now, &cfg()), vec![2]);
        assert_eq!(targets(&[&many], now, &cfg()), vec![3]);
    }

    #[test]
    fn old_demand_keeps_one_until_idle_then_none() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let old = at(now, &[300, 301, 302]);
        let idle = at(now, &[700]);
        assert_eq!(targets(&[&old, &idle], now, &cfg()), vec![1, 0]);
    }

    #[test]
    fn the_total_is_bounded_and_recent_kinds_keep_theirs() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let stale = at(now, &[50, 51, 52]);
        let fresh = at(now, &[1, 2, 3]);
        let t = targets(&[&stale, &fresh], now, &cfg());
        assert_eq!(t.iter().sum::<usize>(), 4);
        assert_eq!(t, vec![1, 3]);
    }

    #[test]
    fn disabled_keeps_nothing() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let h = at(now, &[1, 2]);
        assert_eq!(targets(&[&h], now, &PrewarmConfig::disabled()), vec![0]);
    }

    #[test]
    fn forgetting_drops_only_records_past_idle() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let mut h = at(now, &[900, 601, 599, 1]);
        forget_old(&mut h, now, &cfg());
        assert_eq!(h.len(), 2);
    }
}
