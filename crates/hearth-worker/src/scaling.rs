//! Pacing cold starts (sans-IO): what an invocation that found no idle sandbox of its revision
//! does, start one or wait for one.
//!
//! A burst of concurrent calls must not become a pile of parallel cold starts that starve each
//! other on a few cores. Two rules, both pure functions of counts and recent timings:
//!
//! - **Wait for a sandbox that will be free sooner than a new one would be ready.** The
//!   revision's sandboxes that are busy or starting will each serve the waiters in turn (oldest
//!   first); the `k`-th waiter (0-based) among `coming` such sandboxes expects to wait about
//!   `(k / coming + 1)` invocation durations, plus what is left of a start in progress when
//!   nothing is busy yet. If that is less than a cold start takes, it waits.
//! - **Start no more sandboxes at once than the worker can start** (`start_limit`); past it,
//!   the invocation waits for an idle sandbox or a free start.
//!
//! A cold start that claims a ready sandbox is quick; once the ready ones are taken, the next
//! start must create its sandbox first, and takes at least as long as a create
//! ([`RevisionLoad::create_ms`]). Averaging only the quick claims would start sandboxes that
//! each take far longer than the wait for a busy one.
//!
//! Timings are exponentially weighted averages of this worker's own invocations and cold
//! starts of the revision. Before an invocation of the revision has finished, nothing waits
//! for a busy sandbox (a burst of slow first calls starts as many sandboxes as the start limit
//! lets through); before a cold start has finished one is assumed to take
//! [`DEFAULT_COLD_MS`].
//!
//! A third rule is Lambda's scaling rate: each function may add at most
//! [`BurstRule::per_window`] new sandboxes per [`BurstRule::window`] (Lambda: 1,000 per 10 s).
//! A start past it is throttled (429, `FunctionInvocationRateLimitExceeded`); the worker
//! logs when the next one is allowed ([`BurstBucket`]).

use std::time::Duration;

/// A revision's load and timings, as the pool counts them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RevisionLoad {
    /// Invocations running in the revision's sandboxes.
    pub busy: usize,
    /// Cold starts of the revision in progress.
    pub starting: usize,
    /// Invocations already waiting for one of its sandboxes (ahead of this one).
    pub waiting: usize,
    /// Average invocation duration, once one has finished.
    pub invoke_ms: Option<f64>,
    /// Average cold start (claim to ready), once one has finished.
    pub cold_ms: Option<f64>,
    /// What creating a sandbox takes on this worker, when no ready sandbox of the revision's
    /// kind waits and the next start must create one; `None` when one waits.
    pub create_ms: Option<f64>,
    /// How many invocations of the revision finished per second lately (`None`: too few to
    /// tell).
    pub done_per_s: Option<f64>,
}

impl RevisionLoad {
    pub const fn idle() -> Self {
        RevisionLoad {
            busy: 0,
            starting: 0,
            waiting: 0,
            invoke_ms: None,
            cold_ms: None,
            create_ms: None,
            done_per_s: None,
        }
    }
}

/// Before any measurement: a cold start is assumed to take this long.
pub const DEFAULT_COLD_MS: f64 = 1000.0;

/// Weight of a new measurement in the averages.
const EWMA_WEIGHT: f64 = 0.2;

/// What to do on a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Start a new sandbox now.
    Start,
    /// Wait for a sandbox of the revision to come free (or for a start to be allowed).
    Wait,
}

/// The decision for an invocation that found no idle sandbox of its revision.
pub fn on_miss(load: &RevisionLoad, starts_in_flight: usize, start_limit: usize) -> Miss {
    // A start without a ready sandbox to claim creates one first: it takes at least that long.
    let cold = load
        .cold_ms
        .unwrap_or(DEFAULT_COLD_MS)
        .max(load.create_ms.unwrap_or(0.0));
    let coming = load.busy + load.starting;
    // Until one invocation has finished nobody knows how long they take: never wait for one.
    if let Some(invoke) = load.invoke_ms
        && coming > 0
    {
        let rounds = (load.waiting / coming) as f64 + 1.0;
        // With nothing busy yet, the first sandboxes come free after their start finishes
        // (at most a whole cold start from now) and their first invocation.
        let head = if load.busy == 0 { cold } else { 0.0 };
        let mut expect = rounds * invoke;
        // Sandboxes that have been coming free at a measured rate serve the queue at that
        // rate: on cores that are all busy, each invocation takes longer the more run at once
        // (and a few slow ones weigh on the average), while the rate at which the revision's
        // sandboxes come free does not fall.
        if let Some(rate) = load.done_per_s.filter(|r| *r > 0.0) {
            expect = expect.min((load.waiting + 1) as f64 / rate * 1000.0);
        }
        if head + expect < cold {
            return Miss::Wait;
        }
    }
    if starts_in_flight < start_limit.max(1) {
        Miss::Start
    } else {
        Miss::Wait
    }
}

/// How fast one function may add sandboxes: `per_window` new ones per `window`, refilled
/// evenly (a token bucket holding at most `per_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstRule {
    pub per_window: u32,
    pub window: Duration,
}

impl Default for BurstRule {
    /// Lambda's: 1,000 new execution environments every 10 seconds per function.
    fn default() -> Self {
        BurstRule {
            per_window: 1000,
            window: Duration::from_secs(10),
        }
    }
}

/// One function's allowance of new sandboxes under a [`BurstRule`]; times are the caller's
/// clock (any monotonic origin), so the bucket is a pure value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstBucket {
    tokens: f64,
    at: Duration,
}

impl BurstBucket {
    /// A full bucket at time `now`.
    pub fn new(rule: BurstRule, now: Duration) -> Self {
        BurstBucket {
            tokens: rule.per_window as f64,
            at: now,
        }
    }

    /// Tokens per second under `rule`; `None` when nothing ever refills.
    fn rate(rule: BurstRule) -> Option<f64> {
        (rule.per_window > 0 && !rule.window.is_zero())
            .then(|| rule.per_window as f64 / rule.window.as_secs_f64())
    }

    /// The tokens the bucket holds at `now` (a clock going backwards adds none).
    fn tokens_at(&self, rule: BurstRule, now: Duration) -> f64 {
        let refilled =
            Self::rate(rule).map_or(0.0, |rate| now.saturating_sub(self.at).as_secs_f64() * rate);
        (self.tokens + refilled).min(rule.per_window as f64)
    }

    /// Whether the bucket has refilled to the whole burst by `now` (it can then be dropped and
    /// made anew).
    pub fn full(&self, rule: BurstRule, now: Duration) -> bool {
        self.tokens_at(rule, now) >= rule.per_window as f64
    }

    /// Take one start at `now`: `Ok` if allowed, else how long until one is.
    pub fn take(&mut self, rule: BurstRule, now: Duration) -> Result<(), Duration> {
        let Some(rate) = Self::rate(rule) else {
            // No allowance can ever refill: refuse with the window as the hint.
            return Err(rule.window.max(Duration::from_secs(1)));
        };
        self.tokens = self.tokens_at(rule, now);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Fold one measurement into an average.
pub fn ewma(avg: Option<f64>, sample: Duration) -> Option<f64> {
    let ms = sample.as_secs_f64() * 1000.0;
    Some(match avg {
        None => ms,
        Some(a) => a + EWMA_WEIGHT * (ms - a),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(busy: usize, starting: usize, waiting: usize) -> RevisionLoad {
        RevisionLoad {
            busy,
            starting,
            waiting,
            invoke_ms: Some(2.0),
            cold_ms: Some(60.0),
            create_ms: None,
            done_per_s: None,
        }
    }

    #[test]
    fn the_rate_sandboxes_come_free_at_bounds_the_wait() {
        // Seven busy sandboxes whose calls average 130 ms on saturated cores: 56 waiters ahead
        // expect 9 rounds (1.2 s), longer than an 800 ms create...
        let saturated = RevisionLoad {
            invoke_ms: Some(130.0),
            create_ms: Some(800.0),
            ..load(7, 0, 56)
        };
        assert_eq!(on_miss(&saturated, 0, 2), Miss::Start);
        // ...but the revision finishes 400 calls a second: the 57th comes in 143 ms.
        let measured = RevisionLoad {
            done_per_s: Some(400.0),
            ..saturated
        };
        assert_eq!(on_miss(&measured, 0, 2), Miss::Wait);
        // A slow rate never makes the wait look longer than the durations say.
        let slow = RevisionLoad {
            done_per_s: Some(1.0),
            ..load(1, 0, 3)
        };
        assert_eq!(on_miss(&slow, 0, 2), Miss::Wait);
    }

    #[test]
    fn a_start_that_must_create_its_sandbox_counts_the_create() {
        // 41 rounds of 2 ms behind one busy sandbox: longer than a 60 ms claim of a ready
        // sandbox, shorter than creating one (500 ms).
        assert_eq!(on_miss(&load(1, 0, 40), 0, 2), Miss::Start);
        let none_ready = RevisionLoad {
            create_ms: Some(500.0),
            ..load(1, 0, 40)
        };
        assert_eq!(on_miss(&none_ready, 0, 2), Miss::Wait);
        let very_long = RevisionLoad {
            waiting: 260,
            ..none_ready
        };
        assert_eq!(on_miss(&very_long, 0, 2), Miss::Start);
    }

    #[test]
    fn nothing_running_means_a_start_while_starts_are_free() {
        assert_eq!(on_miss(&RevisionLoad::idle(), 0, 2), Miss::Start);
        assert_eq!(on_miss(&load(0, 0, 0), 1, 2), Miss::Start);
        // The worker is starting as much as it can: wait.
        assert_eq!(on_miss(&load(0, 0, 0), 2, 2), Miss::Wait);
        // A limit of 0 is taken as 1, so nothing waits forever.
        assert_eq!(on_miss(&load(0, 0, 0), 0, 0), Miss::Start);
    }

    #[test]
    fn a_short_queue_behind_busy_sandboxes_waits_a_long_one_starts() {
        // One busy sandbox, 2 ms invocations, 60 ms cold starts: up to 28 waiters ahead still
        // expect less than a cold start ((28 / 1 + 1) * 2 = 58 ms).
        assert_eq!(on_miss(&load(1, 0, 0), 0, 2), Miss::Wait);
        assert_eq!(on_miss(&load(1, 0, 28), 0, 2), Miss::Wait);
        assert_eq!(on_miss(&load(1, 0, 29), 0, 2), Miss::Start);
        // More sandboxes share the queue.
        assert_eq!(on_miss(&load(4, 0, 100), 0, 2), Miss::Wait);
        assert_eq!(on_miss(&load(4, 0, 120), 0, 2), Miss::Start);
        // Past the start limit it waits all the same.
        assert_eq!(on_miss(&load(1, 0, 29), 2, 2), Miss::Wait);
    }

    #[test]
    fn slow_invocations_are_not_waited_for() {
        let slow = RevisionLoad {
            invoke_ms: Some(500.0),
            ..load(1, 0, 0)
        };
        assert_eq!(on_miss(&slow, 0, 2), Miss::Start);
    }

    #[test]
    fn a_start_in_progress_is_not_waited_for_when_a_new_one_would_be_as_quick() {
        // Nothing busy yet: a waiter would wait for the start and its first invocation, which
        // is no quicker than starting another.
        assert_eq!(on_miss(&load(0, 1, 0), 0, 2), Miss::Start);
        assert_eq!(on_miss(&load(0, 1, 0), 2, 2), Miss::Wait);
    }

    #[test]
    fn before_an_invocation_finished_only_the_start_limit_paces() {
        let first = RevisionLoad {
            busy: 1,
            starting: 1,
            ..RevisionLoad::idle()
        };
        assert_eq!(on_miss(&first, 1, 2), Miss::Start);
        assert_eq!(on_miss(&first, 2, 2), Miss::Wait);
        // Once one has finished (1 s cold start assumed, 100 ms calls): nine waiters queue
        // behind one busy sandbox, the tenth starts another.
        let known = RevisionLoad {
            busy: 1,
            invoke_ms: Some(100.0),
            ..RevisionLoad::idle()
        };
        assert_eq!(on_miss(&known, 0, 2), Miss::Wait);
        let long = RevisionLoad {
            waiting: 9,
            ..known
        };
        assert_eq!(on_miss(&long, 0, 2), Miss::Start);
    }

    #[test]
    fn a_function_adds_at_most_its_burst_then_refills_evenly() {
        let rule = BurstRule {
            per_window: 3,
            window: Duration::from_secs(3),
        };
        let t0 = Duration::from_secs(100);
        let mut b = BurstBucket::new(rule, t0);
        for _ in 0..3 {
            assert_eq!(b.take(rule, t0), Ok(()));
        }
        // Empty: the next start is one second (window / per_window) away.
        let wait = b.take(rule, t0).expect_err("throttled");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
        // Half a second later, half a token: still throttled, half a second to go.
        let wait = b
            .take(rule, t0 + Duration::from_millis(500))
            .expect_err("throttled");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert_eq!(b.take(rule, t0 + Duration::from_secs(1)), Ok(()));
        // A long pause refills to the burst, never past it.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.take(rule, later), Ok(()));
        }
        assert!(b.take(rule, later).is_err());
        assert!(!b.full(rule, later));
        assert!(b.full(rule, later + Duration::from_secs(3)));
    }

    #[test]
    fn lambdas_rule_is_a_thousand_per_ten_seconds_and_a_zero_rule_refuses() {
        let rule = BurstRule::default();
        let mut b = BurstBucket::new(rule, Duration::ZERO);
        for _ in 0..1000 {
            assert_eq!(b.take(rule, Duration::ZERO), Ok(()));
        }
        let wait = b.take(rule, Duration::ZERO).expect_err("throttled");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-9, "{wait:?}");
        // A clock that goes backwards does not mint tokens.
        assert!(b.take(rule, Duration::ZERO).is_err());
        let none = BurstRule {
            per_window: 0,
            window: Duration::from_secs(10),
        };
        let mut z = BurstBucket::new(none, Duration::ZERO);
        assert_eq!(
            z.take(none, Duration::from_secs(99)),
            Err(Duration::from_secs(10))
        );
    }

    #[test]
    fn averages_follow_measurements() {
        let a = ewma(None, Duration::from_millis(100));
        assert_eq!(a, Some(100.0));
        let b = ewma(a, Duration::from_millis(200)).unwrap_or_default();
        assert!((b - 120.0).abs() < 1e-9, "{b}");
    }
}
