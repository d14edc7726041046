//! Placement, free of I/O: which worker gets a new sandbox.
//!
//! Only workers with room for the sandbox's memory (their free budget plus what their idle and
//! ready sandboxes hold, which a worker evicts for a new sandbox, less what was placed on them
//! since their last heartbeat) are candidates; free memory counts in the score, so a worker
//! that need not evict is preferred. Among them the score prefers, in this
//! order of weight: spreading the function (each sandbox of it a worker already holds counts
//! against it), locality (the worker's caches already hold the function's code, runtime image
//! or snapshot, so the cold start fetches nothing), low load (running invocations per core)
//! and free memory. Ties go to the smaller worker id, so the choice is deterministic.

use std::collections::BTreeMap;

use crate::fleet::WorkerReport;
use crate::partition::WorkerId;

/// Per sandbox of the function already on a worker.
const SPREAD: f64 = 10.0;
/// Per locality key the worker's caches hold.
const LOCALITY: f64 = 4.0;
/// Times running invocations per core.
const LOAD: f64 = 3.0;
/// Times the free share of the worker's memory.
const FREE: f64 = 2.0;

/// The locality keys of a function version: what a worker's caches must hold for its cold
/// start to fetch nothing. Workers report the same keys for what they hold.
pub fn locality_keys(
    code_sha256: &str,
    runtime_image: &str,
    snapshot: Option<&str>,
) -> Vec<String> {
    let mut keys = vec![
        format!("code:{code_sha256}"),
        format!("image:{runtime_image}"),
    ];
    if let Some(s) = snapshot {
        keys.push(format!("snapshot:{s}"));
    }
    keys
}

/// What placement knows about the sandbox to place.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    pub memory_mb: u32,
    /// [`locality_keys`] of the function version.
    pub locality: Vec<String>,
    /// The function's sandboxes on each worker now (any state).
    pub function_sandboxes: BTreeMap<WorkerId, u32>,
    /// Memory (MiB) placed on each worker since its last heartbeat (sandboxes still
    /// initializing there), not yet reflected in its report.
    pub pending_mb: BTreeMap<WorkerId, u64>,
    /// Workers not to use (the caller could not reach them).
    pub avoid: Vec<WorkerId>,
}

/// Why no worker was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoWorker {
    #[error("no worker is registered")]
    NoWorkers,
    #[error("no worker has {needed_mb} MiB free (the most free is {best_free_mb} MiB)")]
    NoCapacity { needed_mb: u32, best_free_mb: u64 },
}

/// The score of one candidate (higher is better); None when it cannot take the sandbox.
fn score(w: &WorkerReport, d: &Demand) -> Option<f64> {
    if d.avoid.iter().any(|a| a == &w.id) {
        return None;
    }
    if room_after_pending(w, d) < u64::from(d.memory_mb) {
        return None;
    }
    let free = free_after_pending(w, d);
    let held = f64::from(d.function_sandboxes.get(&w.id).copied().unwrap_or(0));
    let hits = d.locality.iter().filter(|k| w.cached.contains(*k)).count() as f64;
    let load = f64::from(w.busy) / f64::from(w.cores.max(1));
    let free_share = if w.memory_mb == 0 {
        0.0
    } else {
        free as f64 / w.memory_mb as f64
    };
    Some(-SPREAD * held + LOCALITY * hits - LOAD * load + FREE * free_share)
}

fn free_after_pending(w: &WorkerReport, d: &Demand) -> u64 {
    let pending = d.pending_mb.get(&w.id).copied().unwrap_or(0);
    w.memory_free_mb.min(w.memory_mb).saturating_sub(pending)
}

/// Free memory plus what idle and ready sandboxes hold (evictable), less what is pending.
fn room_after_pending(w: &WorkerReport, d: &Demand) -> u64 {
    let pending = d.pending_mb.get(&w.id).copied().unwrap_or(0);
    w.memory_free_mb
        .saturating_add(w.memory_idle_mb)
        .min(w.memory_mb)
        .saturating_sub(pending)
}

/// The worker for a new sandbox.
pub fn pick(workers: &[WorkerReport], d: &Demand) -> Result<WorkerId, NoWorker> {
    if workers.is_empty() {
        return Err(NoWorker::NoWorkers);
    }
    let mut best: Option<(f64, &WorkerReport)> = None;
    for w in workers {
        let Some(s) = score(w, d) else { continue };
        let better = match best {
            None => true,
            Some((bs, bw)) => s > bs || (s == bs && w.id < bw.id),
        };
        if better {
            best = Some((s, w));
        }
    }
    match best {
        Some((_, w)) => Ok(w.id.clone()),
        None => Err(NoWorker::NoCapacity {
            needed_mb: d.memory_mb,
            best_free_mb: workers
                .iter()
                .filter(|w| !d.avoid.contains(&w.id))
                .map(|w| room_after_pending(w, d))
                .max()
                .unwrap_or(0),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn w(id: &str, free: u64, busy: u32, cached: &[&str]) -> WorkerReport {
        WorkerReport {
            id: id.into(),
            addr: String::new(),
            memory_mb: 4096,
            memory_free_mb: free,
            memory_idle_mb: 0,
            cores: 2,
            busy,
            sandboxes: busy,
            cached: cached
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
            idle: None,
        }
    }

    fn demand(memory_mb: u32) -> Demand {
        Demand {
            memory_mb,
            locality: locality_keys("abc", "python3.11", None),
            ..Default::default()
        }
    }

    #[test]
    fn only_workers_with_room_are_candidates() {
        let fleet = [w("a", 100, 0, &[]), w("b", 600, 0, &[])];
        assert_eq!(pick(&fleet, &demand(512)), Ok("b".into()));
        assert_eq!(
            pick(&fleet, &demand(1024)),
            Err(NoWorker::NoCapacity {
                needed_mb: 1024,
                best_free_mb: 600
            })
        );
        assert_eq!(pick(&[], &demand(128)), Err(NoWorker::NoWorkers));
    }

    #[test]
    fn memory_of_idle_sandboxes_is_room_but_free_memory_is_preferred() {
        let mut full = w("a", 0, 0, &[]);
        full.memory_idle_mb = 800;
        // Only idle sandboxes hold its memory: the worker evicts them for a new one.
        assert_eq!(pick(&[full.clone()], &demand(512)), Ok("a".into()));
        assert!(matches!(
            pick(&[full.clone()], &demand(1024)),
            Err(NoWorker::NoCapacity {
                needed_mb: 1024,
                best_free_mb: 800
            })
        ));
        // A worker with free memory wins over one that would have to evict.
        let free = w("b", 600, 0, &[]);
        assert_eq!(pick(&[full, free], &demand(512)), Ok("b".into()));
    }

    #[test]
    fn memory_placed_since_the_last_heartbeat_counts() {
        let fleet = [w("a", 1000, 0, &[]), w("b", 900, 0, &[])];
        let mut d = demand(512);
        d.pending_mb.insert("a".into(), 600);
        assert_eq!(pick(&fleet, &d), Ok("b".into()));
        d.pending_mb.insert("b".into(), 600);
        assert!(matches!(pick(&fleet, &d), Err(NoWorker::NoCapacity { .. })));
    }

    #[test]
    fn locality_decides_between_equal_workers() {
        let fleet = [
            w("a", 2048, 0, &[]),
            w("b", 2048, 0, &["code:abc"]),
            w("c", 2048, 0, &["code:abc", "image:python3.11"]),
        ];
        assert_eq!(pick(&fleet, &demand(128)), Ok("c".into()));
    }

    #[test]
    fn the_function_is_spread_before_locality_counts() {
        let fleet = [
            w("a", 2048, 0, &[]),
            w("b", 2048, 0, &["code:abc", "image:python3.11"]),
        ];
        let mut d = demand(128);
        assert_eq!(pick(&fleet, &d), Ok("b".into()));
        d.function_sandboxes.insert("b".into(), 1);
        assert_eq!(
            pick(&fleet, &d),
            Ok("a".into()),
            "second sandbox on the other worker"
        );
        d.function_sandboxes.insert("a".into(), 1);
        assert_eq!(pick(&fleet, &d), Ok("b".into()), "one each: locality again");
    }

    #[test]
    fn a_loaded_worker_loses_to_an_idle_one() {
        let fleet = [w("a", 2048, 8, &["code:abc"]), w("b", 2048, 0, &[])];
        assert_eq!(pick(&fleet, &demand(128)), Ok("b".into()));
        let fleet = [w("a", 2048, 1, &["code:abc"]), w("b", 2048, 0, &[])];
        assert_eq!(
            pick(&fleet, &demand(128)),
            Ok("a".into()),
            "a little load: locality wins"
        );
    }

    #[test]
    fn avoided_workers_are_skipped_and_ties_are_deterministic() {
        let fleet = [w("b", 2048, 0, &[]), w("a", 2048, 0, &[])];
        assert_eq!(pick(&fleet, &demand(128)), Ok("a".into()));
        let mut d = demand(128);
        d.avoid.push("a".into());
        assert_eq!(pick(&fleet, &d), Ok("b".into()));
        d.avoid.push("b".into());
        assert!(matches!(pick(&fleet, &d), Err(NoWorker::NoCapacity { .. })));
    }

    #[test]
    fn more_free_memory_wins_among_otherwise_equal_workers() {
        let fleet = [w("a", 1024, 0, &[]), w("b", 4000, 0, &[])];
        assert_eq!(pick(&fleet, &demand(128)), Ok("b".into()));
    }
}
