//! Which queued event runs next, and what follows an attempt: pure decisions, no I/O, no clock
//! (every call takes `now` in milliseconds).
//!
//! Fairness: functions with ready events take turns (round robin), so one function's backlog
//! never starves another's; a global cap bounds the attempts in flight. Throttling: an attempt
//! that is throttled (or cannot run for a platform reason) does not count against the event's
//! retries; the event goes back to the front of its function's lane, the lane is parked for a
//! back-off that doubles with each consecutive throttle, and the lane's own cap drops to what
//! was running when the throttle came (so it converges on the function's concurrency limit;
//! each success raises it by one again). Retries after a function error follow Lambda's
//! schedule: the first after the base delay (Lambda: about a minute), the second after twice it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

/// Delays, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The delay before the first retry after a function error; the second waits twice it.
    pub retry_base_ms: u64,
    /// The first back-off of a throttled lane; doubled per consecutive throttle.
    pub throttle_min_ms: u64,
    /// The longest back-off of a throttled lane.
    pub throttle_max_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retry_base_ms: 60_000,
            throttle_min_ms: 100,
            throttle_max_ms: 5_000,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The function ran and failed (error, timeout, crash).
    FunctionError,
    /// Concurrency or rate limits, or the platform could not run it now.
    Throttled,
}

/// Lambda's `requestContext.condition` of a finished event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Condition {
    Success,
    RetriesExhausted,
    EventAgeExceeded,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Success => "Success",
            Condition::RetriesExhausted => "RetriesExhausted",
            Condition::EventAgeExceeded => "EventAgeExceeded",
        }
    }
}

/// What to do with an event after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is finished (deliver to the destination for `condition`).
    Finish(Condition),
    /// Run it again at `at_ms`; it has now run `runs` times.
    Retry { at_ms: u64, runs: u32 },
    /// Throttled: back into its lane (in memory; nothing durable changes).
    Requeue,
}

/// Whether an event accepted at `accepted_ms` is too old to run at `now`.
pub fn expired(accepted_ms: u64, now: u64, max_age_s: u32) -> bool {
    now.saturating_sub(accepted_ms) > u64::from(max_age_s) * 1000
}

/// The decision after an attempt of an event that had run `runs_before` times.
pub fn after_attempt(
    outcome: Outcome,
    runs_before: u32,
    max_retries: u32,
    now: u64,
    policy: &Policy,
) -> Decision {
    match outcome {
        Outcome::Success => Decision::Finish(Condition::Success),
        Outcome::Throttled => Decision::Requeue,
        Outcome::FunctionError => {
            let runs = runs_before + 1;
            if runs > max_retries {
                Decision::Finish(Condition::RetriesExhausted)
            } else {
                let factor = 1u64 << (runs - 1).min(16);
                Decision::Retry {
                    at_ms: now + policy.retry_base_ms.saturating_mul(factor),
                    runs,
                }
            }
        }
    }
}

/// What the scheduler learns after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The event left the queue (succeeded or failed for good).
    Removed { success: bool },
    /// Run again at this time.
    Retry { at_ms: u64 },
    /// Throttled: to the front of its lane, the lane backs off.
    Throttled,
}

/// One function's queued events.
#[derive(Debug, Default)]
struct Lane {
    ready: VecDeque<u64>,
    /// Every event of this function in the queue (ready, delayed or in flight): seq → accepted.
    queued: BTreeMap<u64, u64>,
    inflight: usize,
    /// This lane's own cap on attempts in flight.
    limit: usize,
    parked_until: u64,
    streak: u32,
    in_rotation: bool,
    stats: Counters,
}

/// Counts since this process started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Counters {
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub throttled: u64,
}

/// One function's queue, for `hearth fn status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LaneStats {
    /// Events queued (ready, waiting for a retry, or running).
    pub depth: usize,
    pub running: usize,
    /// Accept time (ms since the epoch) of the oldest queued event.
    pub oldest_accepted_ms: Option<u64>,
    #[serde(flatten)]
    pub counters: Counters,
}

/// The dispatcher's view of the queue.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
    max_inflight: usize,
    inflight: usize,
    lanes: HashMap<String, Lane>,
    rotation: VecDeque<String>,
    /// (due, seq, function) of events waiting for a retry.
    delayed: BinaryHeap<Reverse<(u64, u64, String)>>,
}

impl Scheduler {
    pub fn new(policy: Policy, max_inflight: usize) -> Self {
        Scheduler {
            policy,
            max_inflight: max_inflight.max(1),
            inflight: 0,
            lanes: HashMap::new(),
            rotation: VecDeque::new(),
            delayed: BinaryHeap::new(),
        }
    }

    fn lane(&mut self, function: &str) -> &mut Lane {
        let max = self.max_inflight;
        self.lanes
            .entry(function.to_string())
            .or_insert_with(|| Lane {
                limit: max,
                ..Lane::default()
            })
    }

    fn make_ready(&mut self, function: &str, seq: u64, front: bool) {
        let lane = self.lane(function);
        if front {
            lane.ready.push_front(seq);
        } else {
            lane.ready.push_back(seq);
        }
        if !lane.in_rotation {
            lane.in_rotation = true;
            self.rotation.push_back(function.to_string());
        }
    }

    /// A queued event: new, or found in the durable queue at start. It runs from `due_ms` on.
    pub fn add(&mut self, function: &str, seq: u64, accepted_ms: u64, due_ms: u64, now: u64) {
        self.lane(function).queued.insert(seq, accepted_ms);
        if due_ms <= now {
            self.make_ready(function, seq, false);
        } else {
            self.delayed
                .push(Reverse((due_ms, seq, function.to_string())));
        }
    }

    /// The next event to attempt now, if any may run: `(function, seq)`.
    pub fn next(&mut self, now: u64) -> Option<(String, u64)> {
        while let Some(Reverse((due, _, _))) = self.delayed.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, seq, function))) = self.delayed.pop() else {
                break;
            };
            self.make_ready(&function, seq, false);
        }
        if self.inflight >= self.max_inflight {
            return None;
        }
        for _ in 0..self.rotation.len() {
            let function = self.rotation.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&function) else {
                continue;
            };
            if lane.ready.is_empty() {
                lane.in_rotation = false;
                continue;
            }
            let runnable = lane.parked_until <= now && lane.inflight < lane.limit;
            let seq = if runnable {
                lane.ready.pop_front()
            } else {
                None
            };
            let still_ready = !lane.ready.is_empty();
            if still_ready {
                self.rotation.push_back(function.clone());
            } else {
                lane.in_rotation = false;
            }
            if let Some(seq) = seq {
                lane.inflight += 1;
                self.inflight += 1;
                return Some((function, seq));
            }
        }
        None
    }

    /// When [`Scheduler::next`] may next have something, if nothing runs now: the earliest of
    /// a retry coming due and a parked lane waking.
    pub fn next_wake(&self) -> Option<u64> {
        let delayed = self.delayed.peek().map(|Reverse((due, _, _))| *due);
        let parked = self
            .lanes
            .values()
            .filter(|l| !l.ready.is_empty() && l.parked_until > 0)
            .map(|l| l.parked_until)
            .min();
        match (delayed, parked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// An attempt of `seq` (from [`Scheduler::next`]) ended.
    pub fn finish(&mut self, function: &str, seq: u64, what: Finished, now: u64) {
        self.inflight = self.inflight.saturating_sub(1);
        let (min, max_backoff, max) = (
            self.policy.throttle_min_ms,
            self.policy.throttle_max_ms,
            self.max_inflight,
        );
        let lane = self.lane(function);
        lane.inflight = lane.inflight.saturating_sub(1);
        match what {
            Finished::Removed { success } => {
                lane.queued.remove(&seq);
                lane.streak = 0;
                lane.parked_until = 0;
                lane.limit = (lane.limit + 1).min(max);
                if success {
                    lane.stats.succeeded += 1;
                } else {
                    lane.stats.failed += 1;
                }
            }
            Finished::Retry { at_ms } => {
                lane.stats.retried += 1;
                lane.streak = 0;
                lane.parked_until = 0;
                self.delayed
                    .push(Reverse((at_ms, seq, function.to_string())));
            }
            Finished::Throttled => {
                lane.stats.throttled += 1;
                // Throttles of attempts that started together are one signal: only one that
                // comes after the lane's back-off ended lengthens it.
                if now >= lane.parked_until {
                    lane.streak = lane.streak.saturating_add(1);
                    let backoff = min
                        .saturating_mul(1u64 << (lane.streak - 1).min(20))
                        .min(max_backoff);
                    lane.parked_until = now + backoff;
                }
                lane.limit = lane.inflight.max(1);
                self.make_ready(function, seq, true);
            }
        }
        self.prune(function);
    }

    /// Forget a lane with nothing queued, keeping its counters only while it has events.
    fn prune(&mut self, function: &str) {
        if let Some(lane) = self.lanes.get(function)
            && lane.queued.is_empty()
            && lane.inflight == 0
            && lane.ready.is_empty()
            && lane.stats == Counters::default()
        {
            self.lanes.remove(function);
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// One function's queue.
    pub fn stats(&self, function: &str) -> LaneStats {
        match self.lanes.get(function) {
            None => LaneStats::default(),
            Some(lane) => LaneStats {
                depth: lane.queued.len(),
                running: lane.inflight,
                oldest_accepted_ms: lane.queued.values().min().copied(),
                counters: lane.stats,
            },
        }
    }

    /// Every function with events queued or counted.
    pub fn functions(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lanes.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            retry_base_ms: 1000,
            throttle_min_ms: 100,
            throttle_max_ms: 800,
        }
    }

    #[test]
    fn retries_follow_lambdas_schedule_then_exhaust() {
        let p = policy();
        assert_eq!(
            after_attempt(Outcome::FunctionError, 0, 2, 10_000, &p),
            Decision::Retry {
                at_ms: 11_000,
                runs: 1
            }
        );
        assert_eq!(
            after_attempt(Outcome::FunctionError, 1, 2, 20_000, &p),
            Decision::Retry {
                at_ms: 22_000,
                runs: 2
            }
        );
        assert_eq!(
            after_attempt(Outcome::FunctionError, 2, 2, 30_000, &p),
            Decision::Finish(Condition::RetriesExhausted)
        );
        assert_eq!(
            after_attempt(Outcome::FunctionError, 0, 0, 0, &p),
            Decision::Finish(Condition::RetriesExhausted)
        );
        assert_eq!(
            after_attempt(Outcome::Success, 2, 2, 0, &p),
            Decision::Finish(Condition::Success)
        );
        assert_eq!(
            after_attempt(Outcome::Throttled, 2, 2, 0, &p),
            Decision::Requeue
        );
    }

    #[test]
    fn age_is_checked_against_the_configured_maximum() {
        assert!(!expired(1_000, 61_000, 60));
        assert!(expired(1_000, 61_001, 60));
        assert!(!expired(5_000, 1_000, 60), "a clock step back is not age");
    }

    #[test]
    fn a_backlog_does_not_starve_another_function() {
        let mut s = Scheduler::new(policy(), 2);
        for seq in 0..100 {
            s.add("big", seq, 0, 0, 0);
        }
        s.add("small", 1000, 0, 0, 0);
        let a = s.next(0).expect("one");
        let b = s.next(0).expect("two");
        assert_eq!(s.next(0), None, "the global cap holds");
        let names = [a.0.as_str(), b.0.as_str()];
        assert!(names.contains(&"small"), "{names:?}");
        assert!(names.contains(&"big"), "{names:?}");
    }

    #[test]
    fn turns_alternate_between_functions_with_backlogs() {
        let mut s = Scheduler::new(policy(), 1);
        for seq in 0..10 {
            s.add("a", seq, 0, 0, 0);
            s.add("b", 100 + seq, 0, 0, 0);
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let (f, seq) = s.next(0).expect("ready");
            order.push(f.clone());
            s.finish(&f, seq, Finished::Removed { success: true }, 0);
        }
        assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn a_throttled_lane_backs_off_and_converges_on_the_limit() {
        let mut s = Scheduler::new(policy(), 8);
        for seq in 0..8 {
            s.add("f", seq, 0, 0, 0);
        }
        let running: Vec<_> = std::iter::from_fn(|| s.next(0)).collect();
        assert_eq!(running.len(), 8);
        // The function's limit is 1: one runs, seven are throttled at once (one back-off).
        for (f, seq) in &running[1..] {
            s.finish(f, *seq, Finished::Throttled, 0);
        }
        assert_eq!(s.stats("f").counters.throttled, 7);
        assert_eq!(s.next(50), None, "parked");
        assert_eq!(s.next_wake(), Some(100), "the first back-off");
        assert_eq!(
            s.next(100),
            None,
            "at the lane's limit: one is still running"
        );
        s.finish("f", running[0].1, Finished::Removed { success: true }, 100);
        // Throttled events went back to the front; the limit grew by one.
        let (_, a) = s.next(100).expect("runs");
        let (_, b) = s.next(100).expect("runs");
        assert_eq!((a, b), (running[7].1, running[6].1));
        assert_eq!(s.next(100), None, "limit 2");
        s.finish("f", a, Finished::Throttled, 100);
        s.finish("f", b, Finished::Throttled, 100);
        assert_eq!(s.next_wake(), Some(200));
        // Each throttle after a back-off doubles it, up to the cap.
        let mut wakes = Vec::new();
        for _ in 0..5 {
            let wake = s.next_wake().expect("parked");
            let (f, seq) = s.next(wake).expect("runs after the back-off");
            s.finish(&f, seq, Finished::Throttled, wake);
            wakes.push(s.next_wake().expect("parked") - wake);
        }
        assert_eq!(wakes, [200, 400, 800, 800, 800]);
        assert_eq!(s.stats("f").depth, 7, "nothing dropped");
    }

    #[test]
    fn retries_wait_for_their_time_and_stats_follow() {
        let mut s = Scheduler::new(policy(), 4);
        s.add("f", 1, 500, 0, 1_000);
        let (f, seq) = s.next(1_000).expect("ready");
        s.finish(&f, seq, Finished::Retry { at_ms: 2_000 }, 1_000);
        assert_eq!(s.next(1_999), None);
        assert_eq!(s.next_wake(), Some(2_000));
        let st = s.stats("f");
        assert_eq!(
            (st.depth, st.running, st.oldest_accepted_ms),
            (1, 0, Some(500))
        );
        assert_eq!(st.counters.retried, 1);
        let (f, seq) = s.next(2_000).expect("due");
        assert_eq!(s.stats("f").running, 1);
        s.finish(&f, seq, Finished::Removed { success: false }, 2_000);
        let st = s.stats("f");
        assert_eq!((st.depth, st.counters.failed), (0, 1));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn events_due_later_at_start_wait() {
        let mut s = Scheduler::new(policy(), 4);
        s.add("f", 1, 0, 5_000, 1_000);
        assert_eq!(s.next(1_000), None);
        assert_eq!(s.next(5_000).map(|x| x.1), Some(1));
    }
}
