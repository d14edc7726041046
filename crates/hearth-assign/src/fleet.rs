//! The capacity manager's view of the worker fleet, free of I/O: workers register by
//! heartbeating ([`Fleet::heartbeat`]), a worker silent for longer than the dead-after period
//! is dead ([`Fleet::tick`]), and [`scale`] decides whether the fleet should grow or shrink.
//!
//! A worker's id names one run of its process (`NAME/STARTED_MS`), so a restarted worker is a
//! new worker: the old run's sandboxes die with the old id, and nothing confuses the two.
//!
//! Every assignment node keeps its own `Fleet` from the heartbeats it receives (workers send
//! them to every node), so a node that becomes a partition's leader already knows who is alive.
//! This state is soft: lost with the process, rebuilt within one heartbeat period.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::partition::{Sandbox, SandboxId, SandboxState, WorkerId};

/// What a worker says about itself in every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// `NAME/STARTED_MS`: one run of one worker process.
    pub id: WorkerId,
    /// Where front ends reach it (authenticated with the cluster secret).
    pub addr: String,
    /// The memory its sandboxes may use in all (its budget), MiB.
    pub memory_mb: u64,
    /// The part of the budget not in use, MiB.
    pub memory_free_mb: u64,
    /// Memory held by idle and ready sandboxes, which the worker evicts to make room for a
    /// new sandbox, MiB.
    #[serde(default)]
    pub memory_idle_mb: u64,
    /// Cores it runs sandboxes on.
    pub cores: u32,
    /// Invocations running now.
    pub busy: u32,
    /// Sandboxes it holds (busy, idle, starting, ready).
    pub sandboxes: u32,
    /// What its caches hold, as locality keys (see [`crate::placement::locality_keys`]).
    pub cached: BTreeSet<String>,
    /// Its idle sandboxes, by function name and revision id (`None`: not reported). A worker
    /// destroys idle sandboxes on its own (keep-alive, demand, memory); the partitions' leaders
    /// drop the idle sandboxes it no longer has ([`stale_idle`]).
    #[serde(default)]
    pub idle: Option<BTreeMap<String, BTreeMap<String, u32>>>,
}

impl WorkerReport {
    /// Share of the memory budget in use, 0.0–1.0.
    pub fn utilisation(&self) -> f64 {
        if self.memory_mb == 0 {
            return 1.0;
        }
        let used = self.memory_mb.saturating_sub(self.memory_free_mb);
        used as f64 / self.memory_mb as f64
    }
}

#[derive(Debug, Clone)]
struct Entry {
    report: WorkerReport,
    last_seen_ms: u64,
    dead_since_ms: Option<u64>,
}

/// The workers one node has heard from.
#[derive(Debug, Clone)]
pub struct Fleet {
    dead_after_ms: u64,
    /// Dead workers are remembered this long (so late heartbeats of a dead run are ignored and
    /// its sandboxes are removed from every partition), then forgotten.
    forget_after_ms: u64,
    /// When this node started: a worker named by a partition but never heard from is only
    /// taken for dead once this node has listened for a whole dead-after period.
    started_ms: u64,
    workers: BTreeMap<WorkerId, Entry>,
}

impl Fleet {
    pub fn new(dead_after_ms: u64, now_ms: u64) -> Self {
        Self {
            dead_after_ms,
            forget_after_ms: dead_after_ms.saturating_mul(100).max(60_000),
            started_ms: now_ms,
            workers: BTreeMap::new(),
        }
    }

    pub fn dead_after_ms(&self) -> u64 {
        self.dead_after_ms
    }

    /// A heartbeat. Returns false (and changes nothing) when it comes from a run already
    /// declared dead: that run's sandboxes are gone from the assignment service, so it must
    /// not be placed on again (a restarted process has a new id).
    pub fn heartbeat(&mut self, report: WorkerReport, now_ms: u64) -> bool {
        match self.workers.get_mut(&report.id) {
            Some(e) if e.dead_since_ms.is_some() => false,
            Some(e) => {
                e.report = report;
                e.last_seen_ms = e.last_seen_ms.max(now_ms);
                true
            }
            None => {
                self.workers.insert(
                    report.id.clone(),
                    Entry {
                        report,
                        last_seen_ms: now_ms,
                        dead_since_ms: None,
                    },
                );
                true
            }
        }
    }

    /// Time passes: workers silent for longer than the dead-after period become dead (returned,
    /// each once); dead ones past the forget period are dropped.
    pub fn tick(&mut self, now_ms: u64) -> Vec<WorkerId> {
        let mut newly_dead = Vec::new();
        let (dead_after, forget_after) = (self.dead_after_ms, self.forget_after_ms);
        self.workers.retain(|id, e| match e.dead_since_ms {
            Some(since) => now_ms.saturating_sub(since) < forget_after,
            None => {
                if now_ms.saturating_sub(e.last_seen_ms) > dead_after {
                    e.dead_since_ms = Some(now_ms);
                    newly_dead.push(id.clone());
                }
                true
            }
        });
        newly_dead
    }

    /// Whether the assignment service should treat `worker` as dead: declared dead, or never
    /// heard from although this node has listened for longer than the dead-after period.
    pub fn is_dead(&self, worker: &str, now_ms: u64) -> bool {
        match self.workers.get(worker) {
            Some(e) => e.dead_since_ms.is_some(),
            None => now_ms.saturating_sub(self.started_ms) > self.dead_after_ms,
        }
    }

    /// Workers alive now, by id.
    pub fn live(&self) -> Vec<WorkerReport> {
        self.workers
            .values()
            .filter(|e| e.dead_since_ms.is_none())
            .map(|e| e.report.clone())
            .collect()
    }

    /// A live worker's report.
    pub fn get(&self, worker: &str) -> Option<&WorkerReport> {
        self.workers
            .get(worker)
            .filter(|e| e.dead_since_ms.is_none())
            .map(|e| &e.report)
    }

    /// Each live worker's report with when it was last heard from.
    pub fn live_seen(&self) -> Vec<(WorkerReport, u64)> {
        self.workers
            .values()
            .filter(|e| e.dead_since_ms.is_none())
            .map(|e| (e.report.clone(), e.last_seen_ms))
            .collect()
    }

    /// Milliseconds since each live worker was last heard from.
    pub fn silence_ms(&self, now_ms: u64) -> BTreeMap<WorkerId, u64> {
        self.workers
            .iter()
            .filter(|(_, e)| e.dead_since_ms.is_none())
            .map(|(id, e)| (id.clone(), now_ms.saturating_sub(e.last_seen_ms)))
            .collect()
    }
}

/// The bounds and the utilisation band the capacity manager keeps the fleet in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalePolicy {
    pub min_workers: u32,
    pub max_workers: u32,
    /// Grow when the fleet's memory utilisation is above this (0.0–1.0).
    pub grow_above: f64,
    /// Shrink when it is below this and an idle worker can go.
    pub shrink_below: f64,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 8,
            grow_above: 0.75,
            shrink_below: 0.25,
        }
    }
}

/// What the capacity manager should do about the fleet's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scale {
    /// Start this many workers.
    Grow(u32),
    /// Stop this worker (the emptiest idle one).
    Shrink(WorkerId),
    Hold,
}

/// The fleet-size decision for the live workers, `starting` workers already asked for and not
/// yet heartbeating.
pub fn scale(policy: &ScalePolicy, live: &[WorkerReport], starting: u32) -> Scale {
    let n = live.len() as u32 + starting;
    if n < policy.min_workers {
        return Scale::Grow(policy.min_workers - n);
    }
    if starting > 0 || live.is_empty() {
        return Scale::Hold;
    }
    let total: u64 = live.iter().map(|w| w.memory_mb).sum();
    let free: u64 = live.iter().map(|w| w.memory_free_mb.min(w.memory_mb)).sum();
    let util = if total == 0 {
        1.0
    } else {
        (total - free) as f64 / total as f64
    };
    if util > policy.grow_above && n < policy.max_workers {
        return Scale::Grow(1);
    }
    if n > policy.max_workers || (util < policy.shrink_below && n > policy.min_workers) {
        // Only a worker with nothing running goes; the one holding the fewest sandboxes.
        let idle = live
            .iter()
            .filter(|w| w.busy == 0)
            .min_by(|a, b| a.sandboxes.cmp(&b.sandboxes).then(a.id.cmp(&b.id)));
        // Would the rest still be under the grow threshold without it?
        if let Some(w) = idle {
            let rest_total = total - w.memory_mb;
            let rest_used = (total - free) - (w.memory_mb - w.memory_free_mb.min(w.memory_mb));
            let fits =
                rest_total > 0 && (rest_used as f64 / rest_total as f64) <= policy.grow_above;
            if fits || n > policy.max_workers {
                return Scale::Shrink(w.id.clone());
            }
        }
    }
    Scale::Hold
}

/// Idle sandboxes of a partition that their workers no longer hold. For each worker that
/// reports its idle sandboxes (`reports`: each with when it was heard), and each function
/// revision, the partition's Idle sandboxes of that revision on that worker beyond the count
/// the worker reported, oldest idle first. Only sandboxes idle since `margin_ms` before the
/// report count: one that became idle after the report was taken may not be in it yet.
pub fn stale_idle<'a>(
    sandboxes: impl Iterator<Item = &'a Sandbox>,
    reports: &[(WorkerReport, u64)],
    margin_ms: u64,
) -> Vec<SandboxId> {
    // (worker, function, revision) → (idle since, sandbox) of each Idle sandbox there.
    type Place<'a> = (&'a str, &'a str, &'a str);
    let mut groups: BTreeMap<Place<'_>, Vec<(u64, SandboxId)>> = BTreeMap::new();
    for s in sandboxes {
        if let (Some(worker), SandboxState::Idle { since_ms, .. }) = (&s.worker, &s.state) {
            groups
                .entry((
                    worker.as_str(),
                    s.key.function.as_str(),
                    s.key.revision.as_str(),
                ))
                .or_default()
                .push((*since_ms, s.id));
        }
    }
    let mut stale = Vec::new();
    for ((worker, function, revision), mut idle) in groups {
        let Some((report, seen_ms)) = reports.iter().find(|(r, _)| r.id == worker) else {
            continue;
        };
        let Some(held) = &report.idle else { continue };
        let reported = held
            .get(function)
            .and_then(|r| r.get(revision))
            .copied()
            .unwrap_or(0) as usize;
        let excess = idle.len().saturating_sub(reported);
        idle.sort();
        stale.extend(
            idle.into_iter()
                .filter(|(since, _)| since.saturating_add(margin_ms) <= *seen_ms)
                .take(excess)
                .map(|(_, id)| id),
        );
    }
    stale.sort();
    stale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::FnKey;

    fn idle(id: u64, worker: &str, function: &str, since_ms: u64) -> Sandbox {
        Sandbox {
            id: SandboxId(id),
            key: FnKey {
                function: function.into(),
                revision: "r1".into(),
            },
            worker: Some(worker.into()),
            memory_mb: 128,
            state: SandboxState::Idle {
                since_ms,
                expires_ms: since_ms + 60_000,
            },
        }
    }

    fn holding(id: &str, idle: &[(&str, u32)]) -> WorkerReport {
        let mut r = report(id, 1024, 1024, 0);
        r.idle = Some(
            idle.iter()
                .map(|(f, n)| (f.to_string(), BTreeMap::from([("r1".to_string(), *n)])))
                .collect(),
        );
        r
    }

    #[test]
    fn idle_sandboxes_a_worker_no_longer_holds_are_stale_oldest_first() {
        let sandboxes = [
            idle(1, "w1", "f", 1_000),
            idle(2, "w1", "f", 3_000),
            idle(3, "w1", "f", 2_000),
            idle(4, "w1", "g", 1_000),
            idle(5, "w2", "f", 1_000),
            idle(6, "w3", "f", 1_000),
        ];
        let reports = [
            // w1 holds one idle sandbox of f and none of g.
            (holding("w1", &[("f", 1)]), 10_000),
            // w2 holds what the partition thinks.
            (holding("w2", &[("f", 1)]), 10_000),
            // w3 does not report idle sandboxes: nothing of it is judged.
            (report("w3", 1024, 1024, 0), 10_000),
        ];
        assert_eq!(
            stale_idle(sandboxes.iter(), &reports, 2_000),
            vec![SandboxId(1), SandboxId(3), SandboxId(4)]
        );
        // A worker the node has not heard from is not judged either (the fleet declares it
        // dead, which removes all its sandboxes).
        assert!(stale_idle(sandboxes.iter(), &reports[1..], 2_000).is_empty());
    }

    #[test]
    fn sandboxes_idle_since_just_before_the_report_are_kept() {
        let sandboxes = [idle(1, "w1", "f", 9_000), idle(2, "w1", "f", 5_000)];
        let reports = [(holding("w1", &[]), 10_000)];
        // Sandbox 1 became idle 1 s before the report: it may be missing from it.
        assert_eq!(
            stale_idle(sandboxes.iter(), &reports, 2_000),
            vec![SandboxId(2)]
        );
        // Busy and initializing sandboxes are never stale.
        let mut busy = idle(3, "w1", "f", 0);
        busy.state = SandboxState::Busy {
            lease: crate::partition::LeaseId(1),
        };
        assert!(stale_idle([busy].iter(), &reports, 2_000).is_empty());
    }

    pub(crate) fn report(id: &str, memory_mb: u64, free: u64, busy: u32) -> WorkerReport {
        WorkerReport {
            id: id.into(),
            addr: format!("{id}.test:7200"),
            memory_mb,
            memory_free_mb: free,
            memory_idle_mb: 0,
            cores: 2,
            busy,
            sandboxes: busy,
            cached: BTreeSet::new(),
            idle: None,
        }
    }

    #[test]
    fn a_silent_worker_dies_once_and_its_late_heartbeats_are_ignored() {
        let mut f = Fleet::new(1_000, 0);
        assert!(f.heartbeat(report("w1/1", 1024, 1024, 0), 0));
        assert!(f.heartbeat(report("w2/1", 1024, 1024, 0), 0));
        assert!(f.tick(900).is_empty());
        assert!(f.heartbeat(report("w2/1", 1024, 900, 1), 900));
        assert_eq!(f.tick(1_500), vec!["w1/1".to_string()]);
        assert!(f.tick(1_600).is_empty(), "reported once");
        assert!(f.is_dead("w1/1", 1_600));
        assert!(!f.is_dead("w2/1", 1_600));
        assert_eq!(f.live().len(), 1);
        assert!(f.get("w1/1").is_none());
        // The dead run comes back: refused; the restarted process has a new id and is welcome.
        assert!(!f.heartbeat(report("w1/1", 1024, 1024, 0), 1_700));
        assert!(f.is_dead("w1/1", 1_700));
        assert!(f.heartbeat(report("w1/1700", 1024, 1024, 0), 1_700));
        assert_eq!(f.live().len(), 2);
    }

    #[test]
    fn unknown_workers_count_as_dead_only_after_a_whole_period_of_listening() {
        let f = Fleet::new(1_000, 5_000);
        assert!(!f.is_dead("never-heard/1", 5_500));
        assert!(f.is_dead("never-heard/1", 6_001));
    }

    #[test]
    fn dead_workers_are_forgotten_eventually() {
        let mut f = Fleet::new(100, 0);
        f.heartbeat(report("w/1", 1, 1, 0), 0);
        assert_eq!(f.tick(200).len(), 1);
        f.tick(200 + 60_001);
        assert!(f.workers.is_empty());
    }

    #[test]
    fn heartbeats_update_the_report() {
        let mut f = Fleet::new(1_000, 0);
        f.heartbeat(report("w/1", 1000, 1000, 0), 0);
        f.heartbeat(report("w/1", 1000, 250, 3), 10);
        let w = f.get("w/1").expect("live");
        assert_eq!(w.busy, 3);
        assert!((w.utilisation() - 0.75).abs() < 1e-9);
        assert_eq!(f.silence_ms(50).get("w/1"), Some(&40));
    }

    #[test]
    fn scale_keeps_the_minimum_and_grows_when_full() {
        let p = ScalePolicy {
            min_workers: 2,
            max_workers: 3,
            grow_above: 0.75,
            shrink_below: 0.25,
        };
        assert_eq!(scale(&p, &[], 0), Scale::Grow(2));
        assert_eq!(scale(&p, &[report("a", 100, 100, 0)], 1), Scale::Hold);
        let busy = [report("a", 100, 10, 4), report("b", 100, 20, 4)];
        assert_eq!(scale(&p, &busy, 0), Scale::Grow(1));
        let full = [
            report("a", 100, 10, 4),
            report("b", 100, 10, 4),
            report("c", 100, 10, 4),
        ];
        assert_eq!(scale(&p, &full, 0), Scale::Hold, "at the maximum");
        // Workers asked for and not yet up are counted: no second request meanwhile.
        assert_eq!(scale(&p, &busy, 1), Scale::Hold);
    }

    #[test]
    fn scale_shrinks_only_idle_workers_and_only_when_the_rest_can_take_the_load() {
        let p = ScalePolicy {
            min_workers: 1,
            max_workers: 4,
            grow_above: 0.75,
            shrink_below: 0.25,
        };
        let quiet = [report("a", 100, 90, 1), report("b", 100, 100, 0)];
        assert_eq!(scale(&p, &quiet, 0), Scale::Shrink("b".into()));
        let all_busy = [report("a", 100, 90, 1), report("b", 100, 95, 1)];
        assert_eq!(scale(&p, &all_busy, 0), Scale::Hold, "nobody idle");
        let one = [report("a", 100, 100, 0)];
        assert_eq!(scale(&p, &one, 0), Scale::Hold, "at the minimum");
        // Removing b would put a above the grow threshold: keep it.
        let p2 = ScalePolicy {
            shrink_below: 0.5,
            ..p
        };
        let uneven = [report("a", 100, 10, 3), report("b", 100, 100, 0)];
        assert_eq!(scale(&p2, &uneven, 0), Scale::Hold);
    }
}
