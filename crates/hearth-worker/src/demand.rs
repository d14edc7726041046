//! How many warm sandboxes of a function revision to keep, and which idle ones expire: a
//! decision from the revision's recent demand, with no I/O (the pool feeds it the starts and
//! ends of invocations and acts on the answers).
//!
//! A [`DemandHistory`] counts, per bucket of time (a twelfth of [`DemandConfig::window`]), the
//! revision's arrivals, its completions with their total duration, and the highest number of
//! its invocations in flight. Its memory is bounded by the number of buckets, not by the rate.
//!
//! [`predict`] turns it into a number of sandboxes: the larger of the peak concurrency over the
//! window and the arrival rate times the mean duration (Little's law: the mean number in
//! flight), at least one while the revision was invoked within the keep-alive (a function
//! called every few minutes keeps its sandbox, as before), bounded by
//! [`DemandConfig::max_per_revision`] and by the function's reserved concurrency when the pool
//! knows it. [`expired`] then splits the revision's idle sandboxes: the most recently used ones,
//! up to the prediction less the sandboxes in use, keep the full keep-alive; the rest expire
//! after [`DemandConfig::idle_grace`]. So after a burst of `N` the extra sandboxes are gone
//! about a window (plus the grace when they were used late in it) after the burst instead of
//! after the keep-alive, and with no demand for the keep-alive nothing is kept, as before.
//!
//! Alternatives: a fixed minimum per function (Lambda's provisioned concurrency) needs an
//! operator to size it; an exponentially decayed rate reacts with a lag that depends on the
//! rate itself; keeping everything for the keep-alive (what the pool did) holds a burst's
//! memory for minutes. The peak over a sliding window is what a burst actually needed, and
//! simple to check.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Buckets per window.
const BUCKETS: u32 = 12;

/// How demand is measured and how quickly idle sandboxes beyond it go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandConfig {
    /// Peak concurrency and arrival rate are measured over this window.
    pub window: Duration,
    /// An idle sandbox beyond the prediction is destroyed after this long idle (one within it
    /// after the keep-alive). At or above the keep-alive this turns the decision off.
    pub idle_grace: Duration,
    /// At most this many sandboxes of one revision are predicted.
    pub max_per_revision: usize,
}

impl Default for DemandConfig {
    fn default() -> Self {
        DemandConfig {
            window: Duration::from_secs(60),
            idle_grace: Duration::from_secs(30),
            max_per_revision: 100,
        }
    }
}

impl DemandConfig {
    /// Every idle sandbox keeps the full keep-alive.
    pub fn disabled() -> Self {
        DemandConfig {
            idle_grace: Duration::MAX,
            ..Self::default()
        }
    }

    fn bucket_len(&self) -> Duration {
        (self.window / BUCKETS).max(Duration::from_millis(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    index: u64,
    arrivals: u64,
    completions: u64,
    /// Total duration of the completions.
    busy: Duration,
    /// Most invocations in flight at once during the bucket (including at its start).
    peak: usize,
}

/// One revision's recent invocations.
#[derive(Debug, Clone)]
pub struct DemandHistory {
    origin: Instant,
    running: usize,
    /// Oldest first; only buckets that saw an event.
    buckets: VecDeque<Bucket>,
    last_arrival: Option<Instant>,
}

impl DemandHistory {
    pub fn new(now: Instant) -> Self {
        DemandHistory {
            origin: now,
            running: 0,
            buckets: VecDeque::new(),
            last_arrival: None,
        }
    }

    /// An invocation arrived (it counts in flight until [`DemandHistory::finish`]).
    pub fn arrive(&mut self, now: Instant, cfg: &DemandConfig) {
        self.open(now, cfg);
        self.running += 1;
        self.last_arrival = Some(self.last_arrival.map_or(now, |t| t.max(now)));
        let running = self.running;
        if let Some(b) = self.buckets.back_mut() {
            b.arrivals += 1;
            b.peak = b.peak.max(running);
        }
    }

    /// An invocation that arrived earlier ended after `ran`.
    pub fn finish(&mut self, now: Instant, ran: Duration, cfg: &DemandConfig) {
        self.open(now, cfg);
        self.running = self.running.saturating_sub(1);
        if let Some(b) = self.buckets.back_mut() {
            b.completions += 1;
            b.busy = b.busy.saturating_add(ran);
        }
    }

    /// Invocations in flight now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Nothing in flight and no arrival within `keep_alive`: the history can be dropped.
    pub fn is_stale(&self, now: Instant, keep_alive: Duration) -> bool {
        self.running == 0
            && self
                .last_arrival
                .is_none_or(|t| now.saturating_duration_since(t) > keep_alive)
    }

    /// Drop buckets that fell out of the window.
    pub fn forget_old(&mut self, now: Instant, cfg: &DemandConfig) {
        let first = self.first_in_window(now, cfg);
        while self.buckets.front().is_some_and(|b| b.index < first) {
            self.buckets.pop_front();
        }
    }

    /// The highest number of invocations in flight at once within the window.
    pub fn peak(&self, now: Instant, cfg: &DemandConfig) -> usize {
        self.in_window(now, cfg)
            .map(|b| b.peak)
            .fold(self.running, usize::max)
    }

    /// Arrivals per second over the window.
    pub fn arrival_rate(&self, now: Instant, cfg: &DemandConfig) -> f64 {
        let n: u64 = self.in_window(now, cfg).map(|b| b.arrivals).sum();
        n as f64 / window_len(cfg).as_secs_f64()
    }

    /// The mean duration of the invocations that ended within the window.
    pub fn mean_duration(&self, now: Instant, cfg: &DemandConfig) -> Option<Duration> {
        let (n, total) = self
            .in_window(now, cfg)
            .fold((0u64, Duration::ZERO), |(n, t), b| {
                (n + b.completions, t.saturating_add(b.busy))
            });
        u32::try_from(n).ok().filter(|&n| n > 0).map(|n| total / n)
    }

    fn index(&self, t: Instant, cfg: &DemandConfig) -> u64 {
        let nanos =
            t.saturating_duration_since(self.origin).as_nanos() / cfg.bucket_len().as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn first_in_window(&self, now: Instant, cfg: &DemandConfig) -> u64 {
        (self.index(now, cfg) + 1).saturating_sub(BUCKETS as u64)
    }

    fn in_window(&self, now: Instant, cfg: &DemandConfig) -> impl Iterator<Item = &Bucket> {
        let first = self.first_in_window(now, cfg);
        self.buckets.iter().filter(move |b| b.index >= first)
    }

    /// Open the bucket `now` falls in, unless it is open (an event reported late goes to the
    /// newest bucket).
    fn open(&mut self, now: Instant, cfg: &DemandConfig) {
        let index = self.index(now, cfg);
        if self.buckets.back().is_none_or(|b| b.index < index) {
            // The level at the bucket's start is what is in flight before this event.
            self.buckets.push_back(Bucket {
                index,
                arrivals: 0,
                completions: 0,
                busy: Duration::ZERO,
                peak: self.running,
            });
            self.forget_old(now, cfg);
        }
    }
}

/// The window as the buckets cover it.
fn window_len(cfg: &DemandConfig) -> Duration {
    cfg.bucket_len() * BUCKETS
}

/// How many sandboxes of the revision to keep: see the module docs. `reserved`: the function's
/// reserved concurrency, if known.
pub fn predict(
    history: &DemandHistory,
    now: Instant,
    cfg: &DemandConfig,
    keep_alive: Duration,
    reserved: Option<u32>,
) -> usize {
    let peak = history.peak(now, cfg);
    let little = history
        .mean_duration(now, cfg)
        .map(|d| (history.arrival_rate(now, cfg) * d.as_secs_f64()).ceil())
        // `as` saturates; a non-finite product cannot come from finite inputs.
        .map_or(0, |x| x as usize);
    let mut want = peak.max(little);
    if want == 0 && !history.is_stale(now, keep_alive) {
        want = 1;
    }
    let bound = reserved.map_or(usize::MAX, |r| r as usize);
    want.min(cfg.max_per_revision).min(bound)
}

/// Which of a revision's idle sandboxes expire now, given when each was last used (any order),
/// how many of its sandboxes are in use or starting, and the prediction: `true` at the index of
/// each that expires. The most recently used idle ones within the prediction keep the
/// keep-alive; the others get [`DemandConfig::idle_grace`] (never more than the keep-alive).
pub fn expired(
    last_used: &[Instant],
    in_use: usize,
    predicted: usize,
    now: Instant,
    keep_alive: Duration,
    cfg: &DemandConfig,
) -> Vec<bool> {
    let keep = predicted.saturating_sub(in_use);
    let mut order: Vec<usize> = (0..last_used.len()).collect();
    // Most recently used first.
    order.sort_by_key(|&i| std::cmp::Reverse(last_used[i]));
    let mut out = vec![false; last_used.len()];
    for (rank, i) in order.into_iter().enumerate() {
        let limit = if rank < keep {
            keep_alive
        } else {
            cfg.idle_grace.min(keep_alive)
        };
        out[i] = now.saturating_duration_since(last_used[i]) >= limit;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Duration = Duration::from_secs(300);

    fn cfg() -> DemandConfig {
        DemandConfig {
            window: Duration::from_secs(60),
            idle_grace: Duration::from_secs(30),
            max_per_revision: 10,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// `n` invocations in flight at once from `at`, each taking `ran`.
    fn burst(h: &mut DemandHistory, at: Instant, n: usize, ran: Duration) {
        for _ in 0..n {
            h.arrive(at, &cfg());
        }
        for _ in 0..n {
            h.finish(at + ran, ran, &cfg());
        }
    }

    #[test]
    fn no_invocation_predicts_nothing() {
        let t0 = Instant::now();
        let h = DemandHistory::new(t0);
        assert_eq!(predict(&h, t0 + s(1), &cfg(), KEEP, None), 0);
        assert!(h.is_stale(t0 + s(1), KEEP));
    }

    #[test]
    fn a_burst_is_kept_for_the_window_then_one_until_the_keep_alive() {
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        burst(&mut h, t0 + s(1), 6, s(1));
        assert_eq!(h.running(), 0);
        assert_eq!(h.peak(t0 + s(10), &cfg()), 6);
        assert_eq!(predict(&h, t0 + s(10), &cfg(), KEEP, None), 6);
        // Out of the window (buckets of 5 s: gone by 70 s).
        assert_eq!(predict(&h, t0 + s(70), &cfg(), KEEP, None), 1);
        assert!(!h.is_stale(t0 + s(300), KEEP));
        assert_eq!(predict(&h, t0 + s(302), &cfg(), KEEP, None), 0);
        assert!(h.is_stale(t0 + s(302), KEEP));
    }

    #[test]
    fn invocations_still_running_count_in_the_peak() {
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        for _ in 0..3 {
            h.arrive(t0, &cfg());
        }
        // Long past the window, still in flight.
        assert_eq!(predict(&h, t0 + s(1000), &cfg(), KEEP, None), 3);
        h.finish(t0 + s(1000), s(1000), &cfg());
        assert_eq!(predict(&h, t0 + s(1001), &cfg(), KEEP, None), 3);
        // A bucket opened while two were in flight remembers that level.
        assert_eq!(h.peak(t0 + s(1001), &cfg()), 3);
        assert_eq!(h.running(), 2);
    }

    #[test]
    fn sequential_calls_need_one_sandbox() {
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        for i in 0..50 {
            let at = t0 + Duration::from_millis(1000 * i);
            h.arrive(at, &cfg());
            h.finish(
                at + Duration::from_millis(100),
                Duration::from_millis(100),
                &cfg(),
            );
        }
        let now = t0 + s(51);
        assert_eq!(h.peak(now, &cfg()), 1);
        assert_eq!(
            h.mean_duration(now, &cfg()),
            Some(Duration::from_millis(100))
        );
        assert_eq!(predict(&h, now, &cfg(), KEEP, None), 1);
    }

    #[test]
    fn arrival_rate_times_duration_counts_when_above_the_peak() {
        // 4 calls a second that each report 2 s (the pool measured a longer time than these
        // events span): Little's law says 8 in flight on average.
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        for i in 0..240 {
            let at = t0 + Duration::from_millis(250 * i);
            h.arrive(at, &cfg());
            h.finish(at, s(2), &cfg());
        }
        let now = t0 + s(60);
        assert_eq!(h.peak(now, &cfg()), 1);
        let rate = h.arrival_rate(now, &cfg());
        assert!((3.5..=4.0).contains(&rate), "{rate}");
        assert_eq!(predict(&h, now, &cfg(), KEEP, None), 8);
    }

    #[test]
    fn the_prediction_is_bounded_by_the_maximum_and_the_reservation() {
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        burst(&mut h, t0, 25, s(1));
        let now = t0 + s(5);
        assert_eq!(predict(&h, now, &cfg(), KEEP, None), 10);
        assert_eq!(predict(&h, now, &cfg(), KEEP, Some(4)), 4);
        assert_eq!(predict(&h, now, &cfg(), KEEP, Some(0)), 0);
    }

    #[test]
    fn memory_is_bounded_by_the_buckets() {
        let t0 = Instant::now();
        let mut h = DemandHistory::new(t0);
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_millis(100 * i);
            h.arrive(at, &cfg());
            h.finish(at, Duration::from_millis(10), &cfg());
        }
        assert!(h.buckets.len() <= BUCKETS as usize, "{}", h.buckets.len());
    }

    #[test]
    fn idle_sandboxes_beyond_the_prediction_expire_after_the_grace() {
        let t0 = Instant::now();
        let now = t0 + s(100);
        // Five idle, last used 40 s, 41 s, ... 44 s ago (given out of order).
        let used: Vec<Instant> = [42, 40, 44, 41, 43].iter().map(|&a| now - s(a)).collect();
        // Predicted 3 with one in use: the two most recent idle ones keep the keep-alive.
        assert_eq!(
            expired(&used, 1, 3, now, KEEP, &cfg()),
            vec![true, false, true, false, true]
        );
        // Within the grace nothing goes.
        assert_eq!(
            expired(&used, 1, 3, now - s(20), KEEP, &cfg()),
            vec![false; 5]
        );
        // Everything in use already covers the prediction: all idle ones get the grace.
        assert_eq!(expired(&used, 3, 3, now, KEEP, &cfg()), vec![true; 5]);
        // Within the prediction, the keep-alive still ends it.
        assert_eq!(
            expired(&used, 0, 5, now + s(258), KEEP, &cfg()),
            vec![true, false, true, false, true]
        );
    }

    #[test]
    fn disabled_keeps_every_idle_sandbox_for_the_keep_alive() {
        let t0 = Instant::now();
        let now = t0 + s(1000);
        let used = vec![now - s(299), now - s(300)];
        assert_eq!(
            expired(&used, 0, 0, now, KEEP, &DemandConfig::disabled()),
            vec![false, true]
        );
    }
}
