//! The worker's sandbox pool: assignment of invocations to execution environments.
//!
//! Each function revision (name, version, revision id) has a stack of idle sandboxes. An
//! invocation takes the most recently used idle sandbox of its revision (warm start) or
//! starts a new one (cold start), runs, and hands the sandbox back.
//!
//! A cold start does not pay for creating a sandbox: the worker keeps a few sandboxes per kind
//! (runtime image, network mode, `/tmp` size) already through `runsc create` ("ready"), and a
//! cold start claims one: the function's code is linked into its `/var/task`, its memory limit
//! written, and it is booted (the agent gets the function's environment in its first frame)
//! or a snapshot is restored into it. How many are kept follows recent cold-start demand
//! ([`crate::prewarm`]); a background task refills and trims off the request path, within the
//! memory and disk budgets; with none ready a cold start creates one inline. One invocation at a time per sandbox; concurrent invocations
//! of one function run in separate sandboxes. Idle sandboxes are destroyed after the
//! keep-alive period, except those beyond what the revision's recent demand predicts
//! ([`crate::demand`]), which go after a short idle grace; least-recently-used idle sandboxes
//! are evicted when a new one would pass the worker's memory budget.
//!
//! Failures follow Lambda: a handled function error keeps the sandbox; a timeout, a runtime
//! exit, or the sandbox dying (out of memory) destroys it and the caller gets a function
//! error. Concurrency limits (reserved per function, and the account's unreserved pool) are
//! checked before any work and answered with `TooManyRequests`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::VecDeque;

use hearth_core::invoker::{
    FunctionSpec, InvokeError, InvokeRequest, InvokeResult, Invoker, LOG_FLUSH_BYTES,
    LOG_TAIL_BYTES, LogTarget,
};
use hearth_proto::{AgentMsg, Frame, HostMsg, InvokeMeta, MAX_SYNC_PAYLOAD, SandboxConfig};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::demand::{self, DemandConfig, DemandHistory};
use crate::engine::{Claim, Engine, NetMode, SENTRY_OVERHEAD_MB, Sandbox, SlotSpec};
use crate::evict;
use crate::frames;
use crate::images::{ImageStore, recipe_for};
use crate::prewarm::{self, PrewarmConfig};
use crate::scaling;
use crate::snapshots::{RestorePoint, SnapshotError, SnapshotMeta, SnapshotMiss, SnapshotStore};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub region: String,
    /// How long an idle sandbox is kept for reuse (those beyond the predicted demand: see
    /// [`WorkerConfig::demand`]).
    pub keep_alive: Duration,
    /// How each revision's recent demand decides how many of its idle sandboxes keep the
    /// keep-alive; the others go after the idle grace.
    pub demand: DemandConfig,
    /// Memory all sandboxes together may be given (function memory + sentry overhead; a
    /// ready, unclaimed sandbox counts the sentry overhead).
    pub memory_budget_mb: u64,
    /// Disk all sandboxes' `/tmp` disks together may be given (their full sizes).
    pub disk_budget_mb: u64,
    /// How many sandboxes are kept created ahead of demand.
    pub prewarm: PrewarmConfig,
    /// Longest init (boot + runtime start + handler import) before the start fails.
    pub init_timeout: Duration,
    /// Where snapshots are kept; `None` disables snapshots.
    pub snapshot_dir: Option<PathBuf>,
    /// The chunk store artifacts (code, snapshots) are kept in; `None`: code must be in the
    /// code cache already, snapshots stay local.
    pub chunk_store: Option<hearth_store::ChunkStore>,
    /// The worker's content-addressed cache of unpacked code (`<cache>/<sha256-hex>/`, as
    /// [`hearth_core::code::CodeStore`] lays it out), filled from the chunk store; survives
    /// restarts. `None`: the worker cannot run code.
    pub code_cache: Option<PathBuf>,
    /// Cold starts the worker runs at once; further misses wait for a sandbox or a free start
    /// (see [`crate::scaling`]). Default: the number of cores.
    pub start_limit: usize,
    /// How fast one function may add sandboxes on this worker (Lambda's scaling rate:
    /// 1,000 per 10 s); a cold start past it is throttled with
    /// `FunctionInvocationRateLimitExceeded`.
    pub burst: scaling::BurstRule,
    /// An idle sandbox unused for this long is frozen (cgroup freezer) until it is taken
    /// again: idle systrap sandboxes otherwise keep using a little CPU each, which adds up
    /// with many of them. Thawing takes well under a millisecond. `None`: never freeze.
    pub freeze_idle_after: Option<Duration>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            region: "us-east-1".into(),
            keep_alive: Duration::from_secs(300),
            demand: DemandConfig::default(),
            memory_budget_mb: default_memory_budget_mb(),
            disk_budget_mb: 64 * 1024,
            prewarm: PrewarmConfig::default(),
            init_timeout: Duration::from_secs(10),
            snapshot_dir: None,
            chunk_store: None,
            code_cache: None,
            start_limit: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            burst: scaling::BurstRule::default(),
            freeze_idle_after: Some(Duration::from_secs(2)),
        }
    }
}

/// 80 % of the machine's memory.
pub fn default_memory_budget_mb() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| {
                    v.split_whitespace()
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                })
        })
        .unwrap_or(4 * 1024 * 1024);
    total_kb / 1024 * 8 / 10
}

/// A worker's load, as its heartbeats report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    pub memory_budget_mb: u64,
    /// Memory promised to live and ready sandboxes.
    pub memory_committed_mb: u64,
    /// Invocations running or starting.
    pub busy: usize,
    /// Live and ready sandboxes.
    pub sandboxes: usize,
    /// Memory of idle and ready sandboxes (what eviction can free), MiB.
    pub memory_idle_mb: u64,
    /// Idle sandboxes by function name and revision id.
    pub idle: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
}

/// Counts of sandboxes, for status output, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub live: usize,
    pub idle: usize,
    pub cold_starts: usize,
    pub warm_starts: usize,
    /// Cold starts served by restoring a snapshot.
    pub restores: usize,
    /// Created sandboxes waiting to be claimed.
    pub ready: usize,
    /// Cold starts that claimed a ready sandbox (the rest created one inline).
    pub claimed_ready: usize,
    /// Invocations that waited for a sandbox instead of starting one (cold-start pacing).
    pub paced: usize,
    /// Cold starts refused by the function's scaling rate ([`WorkerConfig::burst`]).
    pub burst_throttled: usize,
    /// Idle sandboxes destroyed before their keep-alive because they were beyond their
    /// revision's predicted demand ([`WorkerConfig::demand`]).
    pub expired_beyond_demand: usize,
}

/// One execution environment owned by the pool.
struct Env {
    sandbox: Sandbox,
    frames: mpsc::Receiver<Frame<AgentMsg>>,
    function: String,
    memory_mb: u32,
    last_used: Instant,
    /// Frozen while idle ([`WorkerConfig::freeze_idle_after`]); thawed when taken.
    frozen: bool,
}

/// One revision's load, timings and waiting invocations (oldest first).
#[derive(Default)]
struct Revision {
    busy: usize,
    starting: usize,
    invoke_ms: Option<f64>,
    cold_ms: Option<f64>,
    waiters: VecDeque<(u64, oneshot::Sender<Env>)>,
    next_waiter: u64,
    /// When its latest invocations finished (the last second's, at most [`RATE_SAMPLES`]).
    finished: VecDeque<Instant>,
    /// The function's reserved concurrency, as its last invocation stated it.
    reserved: Option<u32>,
}

impl Revision {
    fn unused(&self) -> bool {
        self.busy == 0 && self.starting == 0 && self.waiters.is_empty()
    }

    /// An invocation finished at `now` after running for `ran`.
    fn finished(&mut self, now: Instant, ran: Duration) {
        self.invoke_ms = scaling::ewma(self.invoke_ms, ran);
        self.finished.push_back(now);
        while self.finished.len() > RATE_SAMPLES
            || self
                .finished
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.finished.pop_front();
        }
    }

    /// Invocations finished per second over the last second (at least four to tell).
    fn done_per_s(&self, now: Instant) -> Option<f64> {
        let first = *self.finished.front()?;
        let span = now.saturating_duration_since(first).as_secs_f64();
        (self.finished.len() >= 4 && span > 0.0 && span <= RATE_WINDOW.as_secs_f64())
            .then(|| (self.finished.len() - 1) as f64 / span)
    }
}

/// How far back the rate of finished invocations looks, and how many it keeps.
const RATE_WINDOW: Duration = Duration::from_secs(1);
const RATE_SAMPLES: usize = 4096;

#[derive(Default)]
struct State {
    idle: HashMap<String, Vec<Env>>,
    /// Created sandboxes per kind, oldest first.
    ready: HashMap<SlotSpec, Vec<Sandbox>>,
    /// Sandboxes of each kind being created for `ready`.
    creating: HashMap<SlotSpec, usize>,
    /// Cold starts per kind (the pre-created pool's demand).
    demand: HashMap<SlotSpec, VecDeque<Instant>>,
    /// Memory promised to live and ready sandboxes.
    committed_mb: u64,
    /// Disk promised to live and ready sandboxes' `/tmp`.
    committed_disk_mb: u64,
    live: usize,
    claimed_ready: usize,
    /// Revisions whose stale snapshot is being replaced.
    resnapshots: std::collections::HashSet<String>,
    inflight: HashMap<String, u32>,
    inflight_unreserved: u32,
    /// Per revision: how loaded it is, and the invocations waiting for one of its sandboxes.
    revisions: HashMap<String, Revision>,
    /// Per revision: its recent invocations (how many of its sandboxes to keep warm).
    revision_demand: HashMap<String, DemandHistory>,
    /// Idle sandboxes destroyed early, beyond their revision's predicted demand.
    expired_beyond_demand: usize,
    /// Cold starts running now (all revisions).
    starts_in_flight: usize,
    /// Average time to create a sandbox on this worker (ready pool and inline).
    create_ms: Option<f64>,
    /// Since when ready-pool refills have been held back because calls wait for sandboxes.
    refill_held_since: Option<Instant>,
    /// Misses that waited for a sandbox instead of starting one.
    paced: usize,
    /// Per function: its allowance of new sandboxes ([`WorkerConfig::burst`]).
    burst: HashMap<String, scaling::BurstBucket>,
    /// Cold starts refused by the burst rule.
    burst_throttled: usize,
    cold_starts: usize,
    warm_starts: usize,
    restores: usize,
}

struct Inner {
    engine: Arc<dyn Engine>,
    images: ImageStore,
    snapshots: Option<SnapshotStore>,
    cfg: WorkerConfig,
    state: Mutex<State>,
    closed: AtomicBool,
    destroying: AtomicUsize,
    destroyed: Notify,
    /// Wakes the refill task (a cold start claimed or missed a ready sandbox).
    refill: Arc<Notify>,
    /// Wakes waiting invocations to decide again (a start finished, an invocation ended).
    changed: Notify,
    /// The origin of the burst buckets' clock.
    epoch: Instant,
}

/// The in-process worker: implements [`Invoker`] over runsc sandboxes.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// How an invocation ended inside the sandbox.
enum Outcome {
    Response(Vec<u8>),
    FunctionError(Vec<u8>),
    Exit(String),
    Died,
    Timeout,
}

/// Where init stopped.
enum Init {
    /// The runtime waits in `next`.
    Ready {
        init_ms: f64,
    },
    /// The runtime waits in `restore/next` (snap-start mode).
    RestoreReady,
    Failed {
        doc: Vec<u8>,
    },
}

/// How a new sandbox came to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Booted,
    Restored,
}

impl Worker {
    /// Create the worker; removes what an earlier run left and starts the keep-alive reaper.
    pub fn new(engine: Arc<dyn Engine>, images: ImageStore, cfg: WorkerConfig) -> Self {
        let stale = engine.cleanup_stale();
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                "removed sandboxes left by an earlier run"
            );
        }
        let snapshots = cfg
            .snapshot_dir
            .as_ref()
            .map(|d| SnapshotStore::new(d, cfg.chunk_store.clone()));
        if let Some(s) = &snapshots {
            s.clean_tmp();
        }
        let inner = Arc::new(Inner {
            engine,
            images,
            snapshots,
            cfg,
            state: Mutex::new(State::default()),
            closed: AtomicBool::new(false),
            destroying: AtomicUsize::new(0),
            destroyed: Notify::new(),
            refill: Arc::new(Notify::new()),
            changed: Notify::new(),
            epoch: now(),
        });
        tokio::spawn(refill_loop(Arc::downgrade(&inner)));
        let weak = Arc::downgrade(&inner);
        let tick = (inner.cfg.keep_alive.min(inner.cfg.demand.idle_grace) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Relaxed) {
                    break;
                }
                inner.expire_idle();
            }
        });
        Worker { inner }
    }

    /// Freeze every idle sandbox unused for `after` now, whatever
    /// [`WorkerConfig::freeze_idle_after`] says (benchmarks compare frozen with unfrozen idle
    /// sandboxes). Returns how many were frozen.
    pub fn freeze_idle(&self, after: Duration) -> usize {
        let mut st = self.inner.lock();
        self.inner.freeze_idle_in(&mut st, now(), after)
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        PoolStats {
            live: st.live,
            idle: st.idle.values().map(Vec::len).sum(),
            cold_starts: st.cold_starts,
            warm_starts: st.warm_starts,
            restores: st.restores,
            ready: st.ready.values().map(Vec::len).sum(),
            claimed_ready: st.claimed_ready,
            paced: st.paced,
            burst_throttled: st.burst_throttled,
            expired_beyond_demand: st.expired_beyond_demand,
        }
    }

    /// What a heartbeat says about this worker's load.
    pub fn load(&self) -> WorkerLoad {
        let st = self.inner.lock();
        WorkerLoad {
            memory_budget_mb: self.inner.cfg.memory_budget_mb,
            memory_committed_mb: st.committed_mb,
            busy: st.revisions.values().map(|r| r.busy + r.starting).sum(),
            sandboxes: st.live + st.ready.values().map(Vec::len).sum::<usize>(),
            idle: idle_by_revision(&st.idle),
            memory_idle_mb: st
                .idle
                .values()
                .flatten()
                .map(|e| e.memory_mb as u64 + SENTRY_OVERHEAD_MB)
                .sum::<u64>()
                + st.ready.values().map(Vec::len).sum::<usize>() as u64 * SENTRY_OVERHEAD_MB,
        }
    }

    /// Destroy every idle sandbox and wait until all destroys finish; later invocations fail.
    /// Busy sandboxes are destroyed as their invocations end.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Waiting invocations see the flag and give up.
        self.inner.changed.notify_waiters();
        let (idle, ready): (Vec<Env>, Vec<Sandbox>) = {
            let mut st = self.inner.lock();
            (
                st.idle.drain().flat_map(|(_, v)| v).collect(),
                st.ready.drain().flat_map(|(_, v)| v).collect(),
            )
        };
        for env in idle {
            self.inner.destroy(env);
        }
        for sandbox in ready {
            self.inner.destroy_ready(sandbox);
        }
        let deadline = now() + Duration::from_secs(30);
        loop {
            let (live, creating) = {
                let st = self.inner.lock();
                (st.live, st.creating.values().sum::<usize>())
            };
            if live == 0 && creating == 0 && self.inner.destroying.load(Ordering::SeqCst) == 0 {
                break;
            }
            if now() > deadline {
                tracing::warn!(live, "shutdown: sandboxes still busy");
                break;
            }
            let _ =
                tokio::time::timeout(Duration::from_millis(100), self.inner.destroyed.notified())
                    .await;
        }
        self.inner.engine.shutdown();
    }

    /// Expect cold starts of `runtime` (e.g. at server start): the pool keeps a sandbox of its
    /// default kind ready until it has seen no demand for the idle period.
    pub fn prewarm(&self, runtime: &str) {
        let Ok(rootfs) = self.inner.images.rootfs_for_runtime(runtime) else {
            return;
        };
        let kind = SlotSpec {
            rootfs,
            net: if self.inner.engine.egress_allowed() {
                NetMode::Egress
            } else {
                NetMode::None
            },
            tmp_mb: 512,
            pids_limit: PIDS_LIMIT,
            started: true,
            // Lambda's default memory size, which hearth's API gives a function that sets none.
            memory_mb: prestart_memory(runtime, 128),
        };
        self.inner
            .lock()
            .demand
            .entry(kind)
            .or_default()
            .push_back(now());
        self.inner.refill.notify_one();
    }
}

const PIDS_LIMIT: i64 = 1024;

/// The memory size a started sandbox of `runtime` is made for, when its prestart sizes its
/// runtime from it ([`crate::images::Recipe::sized_prestart`]); `None` otherwise.
fn prestart_memory(runtime: &str, memory_mb: u32) -> Option<u32> {
    recipe_for(runtime)
        .is_ok_and(|r| r.sized_prestart)
        .then_some(memory_mb)
}

/// While calls wait for sandboxes, the ready pool gets at most one new sandbox this often.
const REFILL_HOLD: Duration = Duration::from_secs(5);

/// The pool's clock: tokio's, which tests pause and advance (`tokio::time::pause`), so that the
/// pool's timing decisions run on virtual time against a fake engine ([`crate::fake`]).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Time since `t` on the pool's clock.
fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}

/// Keep the ready pool at its targets: one sandbox created at a time (creation is CPU-heavy and
/// the machine may have few cores), extras destroyed, all within the budgets.
async fn refill_loop(weak: std::sync::Weak<Inner>) {
    // After a failed create, wait longer each time (up to 30 s) before the next attempt.
    let mut backoff = Duration::ZERO;
    loop {
        let Some(inner) = weak.upgrade() else { break };
        if inner.closed.load(Ordering::SeqCst) {
            break;
        }
        let (create, extra) = inner.plan_refill();
        for sandbox in extra {
            inner.destroy_ready(sandbox);
        }
        let outcome = match create {
            Some(kind) => inner.create_ready(kind).await,
            None => Refill::Idle,
        };
        let wait = match outcome {
            Refill::Created => {
                backoff = Duration::ZERO;
                Duration::ZERO
            }
            Refill::Idle => Duration::from_millis(250).max(backoff),
            Refill::Failed => {
                backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                backoff
            }
        };
        let refill = inner.refill.clone();
        drop(inner);
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, refill.notified()).await;
        }
    }
}

/// What one refill step did.
enum Refill {
    Created,
    /// Nothing to do, or no room in the budgets.
    Idle,
    Failed,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destroy a sandbox in the background (runsc kill + delete + reap: tens of ms).
    fn destroy(self: &Arc<Self>, env: Env) {
        self.release(
            env.memory_mb as u64 + SENTRY_OVERHEAD_MB,
            env.sandbox.spec.tmp_mb as u64,
            true,
        );
        self.teardown(env);
    }

    /// Destroy a ready (unclaimed) sandbox and release what it holds.
    fn destroy_ready(self: &Arc<Self>, sandbox: Sandbox) {
        self.release(SENTRY_OVERHEAD_MB, sandbox.spec.tmp_mb as u64, false);
        self.destroy_sandbox(sandbox);
    }

    fn destroy_sandbox(self: &Arc<Self>, sandbox: Sandbox) {
        self.destroying.fetch_add(1, Ordering::SeqCst);
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            inner.engine.destroy(sandbox);
            inner.destroying.fetch_sub(1, Ordering::SeqCst);
            inner.destroyed.notify_waiters();
        });
    }

    /// What the refill task should do now: the kind to create one sandbox of (if any) and the
    /// ready sandboxes past their kind's target.
    fn plan_refill(&self) -> (Option<SlotSpec>, Vec<Sandbox>) {
        let now = now();
        let cfg = &self.cfg.prewarm;
        let mut st = self.lock();
        for h in st.demand.values_mut() {
            prewarm::forget_old(h, now, cfg);
        }
        st.demand.retain(|_, h| !h.is_empty());
        let mut kinds: Vec<SlotSpec> = st.demand.keys().cloned().collect();
        for k in st.ready.keys() {
            if !st.demand.contains_key(k) {
                kinds.push(k.clone());
            }
        }
        let empty = VecDeque::new();
        let histories: Vec<&VecDeque<Instant>> = kinds
            .iter()
            .map(|k| st.demand.get(k).unwrap_or(&empty))
            .collect();
        let targets = prewarm::targets(&histories, now, cfg);
        // While invocations wait for sandboxes the cores are busy serving them: a create would
        // slow them down for a sandbox none of them gets. Refill once nothing waits, or at most
        // one sandbox per `REFILL_HOLD` while calls keep waiting (a function that keeps the
        // worker saturated must not leave every other function's cold starts without a ready
        // sandbox).
        let waiting = st.revisions.values().any(|r| !r.waiters.is_empty());
        let busy = if waiting {
            let held = *st.refill_held_since.get_or_insert(now);
            now.saturating_duration_since(held) < REFILL_HOLD
        } else {
            st.refill_held_since = None;
            false
        };
        let mut create = None;
        let mut extra = Vec::new();
        for (kind, target) in kinds.iter().zip(targets) {
            let ready = st.ready.get(kind).map(Vec::len).unwrap_or(0);
            let creating = st.creating.get(kind).copied().unwrap_or(0);
            if ready > target {
                if let Some(v) = st.ready.get_mut(kind) {
                    // The oldest go first.
                    extra.extend(v.drain(..ready - target));
                }
            } else if ready + creating < target && create.is_none() && !busy {
                create = Some(kind.clone());
            }
        }
        st.ready.retain(|_, v| !v.is_empty());
        if create.is_some() && waiting {
            // The next create under load waits another `REFILL_HOLD`.
            st.refill_held_since = Some(now);
        }
        (create, extra)
    }

    /// Create one ready sandbox of `kind`, if the budgets allow without evicting anything.
    async fn create_ready(self: &Arc<Self>, kind: SlotSpec) -> Refill {
        {
            let mut st = self.lock();
            if st.committed_mb + SENTRY_OVERHEAD_MB > self.cfg.memory_budget_mb
                || st.committed_disk_mb + kind.tmp_mb as u64 > self.cfg.disk_budget_mb
            {
                return Refill::Idle;
            }
            st.committed_mb += SENTRY_OVERHEAD_MB;
            st.committed_disk_mb += kind.tmp_mb as u64;
            *st.creating.entry(kind.clone()).or_insert(0) += 1;
        }
        let made = self.create_timed(&kind).await;
        let mut st = self.lock();
        if let Some(n) = st.creating.get_mut(&kind) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.creating.remove(&kind);
            }
        }
        match made {
            Ok(sandbox) if !self.closed.load(Ordering::SeqCst) => {
                st.ready.entry(kind).or_default().push(sandbox);
                Refill::Created
            }
            Ok(sandbox) => {
                drop(st);
                self.destroy_ready(sandbox);
                Refill::Idle
            }
            Err(e) => {
                st.committed_mb = st.committed_mb.saturating_sub(SENTRY_OVERHEAD_MB);
                st.committed_disk_mb = st.committed_disk_mb.saturating_sub(kind.tmp_mb as u64);
                drop(st);
                tracing::warn!("creating a ready sandbox: {e}");
                Refill::Failed
            }
        }
    }

    /// Create a sandbox of `kind`, folding how long it took into the worker's create average
    /// (what a start without a ready sandbox pays, see [`scaling::RevisionLoad::create_ms`]).
    async fn create_timed(&self, kind: &SlotSpec) -> Result<Sandbox, crate::engine::EngineError> {
        let t = now();
        let made = self.engine.create(kind).await;
        if made.is_ok() {
            let mut st = self.lock();
            st.create_ms = scaling::ewma(st.create_ms, since(t));
        }
        made
    }

    /// A sandbox of `kind` for a cold start: a ready one when there is one, else created now.
    /// Its memory (function size + sentry) and disk are reserved.
    async fn claim_sandbox(
        self: &Arc<Self>,
        kind: &SlotSpec,
        memory_mb: u32,
    ) -> Result<Sandbox, InvokeError> {
        let ready = {
            let mut st = self.lock();
            st.demand.entry(kind.clone()).or_default().push_back(now());
            let mut s = st.ready.get_mut(kind).and_then(|v| v.pop());
            if s.is_none() {
                // None made for this memory size yet (its demand, counted above, has the
                // refill make some): one made for another size boots it without a prestart.
                s = st
                    .ready
                    .iter_mut()
                    .find(|(k, v)| !v.is_empty() && k.serves_resized(kind))
                    .and_then(|(_, v)| v.pop());
            }
            st.ready.retain(|_, v| !v.is_empty());
            if s.is_some() {
                st.claimed_ready += 1;
                st.live += 1;
            }
            s
        };
        self.refill.notify_one();
        if let Some(sandbox) = ready {
            // The sentry overhead and disk are already held; add the function's memory.
            if let Err(e) = self.reserve(memory_mb as u64, 0, false) {
                self.release(SENTRY_OVERHEAD_MB, kind.tmp_mb as u64, true);
                self.destroy_sandbox(sandbox);
                return Err(e);
            }
            return Ok(sandbox);
        }
        let need = memory_mb as u64 + SENTRY_OVERHEAD_MB;
        self.reserve(need, kind.tmp_mb as u64, true)?;
        match self.create_timed(kind).await {
            Ok(s) => Ok(s),
            Err(e) => {
                self.release(need, kind.tmp_mb as u64, true);
                Err(InvokeError::Service(e.to_string()))
            }
        }
    }

    /// A sandbox for an invocation of `key`, counted busy: taken from the idle stack, or
    /// `handed` over by a finishing invocation (already counted busy). `None` (and destroyed)
    /// if its runtime died meanwhile (a background thread exited, it ran out of memory): a
    /// sandbox that died is replaced, never handed an invocation.
    fn take_if_alive(
        self: &Arc<Self>,
        key: &str,
        mut env: Env,
        handed: bool,
        log: &mut InvLog,
    ) -> Option<Env> {
        if env.frozen {
            self.engine.set_frozen(&env.sandbox.id, false);
            env.frozen = false;
        }
        if still_alive(&mut env, log) {
            let mut st = self.lock();
            st.warm_starts += 1;
            if !handed {
                st.revisions.entry(key.to_string()).or_default().busy += 1;
            }
            return Some(env);
        }
        tracing::info!(sandbox = %env.sandbox.id, "idle sandbox died; replacing it");
        if handed {
            self.unbusy(key);
        }
        self.destroy(env);
        self.changed.notify_waiters();
        None
    }

    /// A sandbox handed over to an invocation of `key` will not serve it.
    fn unbusy(&self, key: &str) {
        if let Some(rev) = self.lock().revisions.get_mut(key) {
            rev.busy = rev.busy.saturating_sub(1);
        }
    }

    /// A cold start of `key` ended: it no longer counts as starting; if it succeeded its
    /// invocation now counts busy.
    fn start_done(&self, key: &str, ok: bool, took: Duration) {
        let mut st = self.lock();
        st.starts_in_flight = st.starts_in_flight.saturating_sub(1);
        let rev = st.revisions.entry(key.to_string()).or_default();
        rev.starting = rev.starting.saturating_sub(1);
        if ok {
            rev.busy += 1;
            rev.cold_ms = scaling::ewma(rev.cold_ms, took);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// An invocation of `key` ended (`ran`: how long it ran, if it reached the function).
    fn finish_busy(&self, key: &str, ran: Option<Duration>) {
        let mut st = self.lock();
        if let Some(rev) = st.revisions.get_mut(key) {
            rev.busy = rev.busy.saturating_sub(1);
            if let Some(d) = ran {
                rev.finished(now(), d);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// An invocation of `key` ended after running for `ran` and keeps its sandbox: the sandbox
    /// goes to the oldest invocation waiting for the revision, still counted busy (for that
    /// one), else to the idle stack. One step under the lock: a waiter deciding meanwhile never
    /// sees the revision with one sandbox fewer than it has, and starts no extra one.
    fn finish_and_give_back(&self, key: &str, ran: Duration, mut env: Env) {
        let mut st = self.lock();
        let State {
            revisions, idle, ..
        } = &mut *st;
        let rev = revisions.entry(key.to_string()).or_default();
        rev.finished(now(), ran);
        while let Some((_, tx)) = rev.waiters.pop_front() {
            match tx.send(env) {
                Ok(()) => {
                    drop(st);
                    self.changed.notify_waiters();
                    return;
                }
                Err(back) => env = back,
            }
        }
        rev.busy = rev.busy.saturating_sub(1);
        idle.entry(key.to_string()).or_default().push(env);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Kill a sandbox whose memory is already released from the accounting.
    fn teardown(self: &Arc<Self>, env: Env) {
        let Env {
            sandbox, frames, ..
        } = env;
        drop(frames);
        self.destroy_sandbox(sandbox);
    }

    /// Freeze the idle sandboxes unused for `after` (under the pool's lock, so a claim cannot
    /// take one between the decision and the write: a claim thaws what it takes). Returns how
    /// many were frozen now.
    fn freeze_idle_in(&self, st: &mut State, now: Instant, after: Duration) -> usize {
        let engine = &self.engine;
        let mut n = 0;
        for env in st.idle.values_mut().flatten() {
            if !env.frozen && now.duration_since(env.last_used) >= after {
                env.frozen = engine.set_frozen(&env.sandbox.id, true);
                n += usize::from(env.frozen);
            }
        }
        n
    }

    /// Destroy idle sandboxes past their keep-alive, and those beyond their revision's predicted
    /// demand past the idle grace ([`demand::expired`]).
    fn expire_idle(self: &Arc<Self>) {
        let now = now();
        let (keep_alive, dcfg) = (self.cfg.keep_alive, self.cfg.demand);
        let expired: Vec<Env> = {
            let mut st = self.lock();
            let State {
                idle,
                revisions,
                revision_demand,
                ..
            } = &mut *st;
            let mut out = Vec::new();
            for (key, envs) in idle.iter_mut() {
                let rev = revisions.get(key);
                let in_use = rev.map_or(0, |r| r.busy + r.starting);
                let predicted = revision_demand.get(key).map_or(0, |h| {
                    demand::predict(h, now, &dcfg, keep_alive, rev.and_then(|r| r.reserved))
                });
                let last_used: Vec<Instant> = envs.iter().map(|e| e.last_used).collect();
                let doomed = demand::expired(&last_used, in_use, predicted, now, keep_alive, &dcfg);
                let (old, keep): (Vec<_>, Vec<_>) =
                    envs.drain(..).zip(doomed).partition(|(_, d)| *d);
                *envs = keep.into_iter().map(|(e, _)| e).collect();
                if !old.is_empty() {
                    tracing::debug!(
                        revision = %key,
                        predicted,
                        in_use,
                        idle = envs.len() + old.len(),
                        expire = old.len(),
                        "idle sandboxes expire"
                    );
                }
                out.extend(old.into_iter().map(|(e, _)| e));
            }
            st.idle.retain(|_, v| !v.is_empty());
            if let Some(after) = self.cfg.freeze_idle_after {
                self.freeze_idle_in(&mut st, now, after);
            }
            st.expired_beyond_demand += out
                .iter()
                .filter(|e| now.duration_since(e.last_used) < keep_alive)
                .count();
            // Load records and histories of revisions with nothing running, starting, waiting
            // or idle (histories: and no invocation within the keep-alive).
            let State {
                revisions,
                idle,
                revision_demand,
                ..
            } = &mut *st;
            revisions.retain(|k, r| !r.unused() || idle.contains_key(k));
            revision_demand.retain(|k, h| {
                h.forget_old(now, &dcfg);
                !h.is_stale(now, keep_alive) || idle.contains_key(k)
            });
            // Allowances back at the whole burst are the same as none.
            let (rule, t) = (self.cfg.burst, since(self.epoch));
            st.burst.retain(|_, b| !b.full(rule, t));
            out
        };
        for env in expired {
            let idle_ms = now.duration_since(env.last_used).as_millis() as u64;
            tracing::debug!(sandbox = %env.sandbox.id, function = %env.function, idle_ms, "idle sandbox expired");
            self.destroy(env);
        }
    }

    /// An invocation of revision `key` arrived: it counts in the revision's demand until the
    /// returned guard is dropped.
    fn arrive(self: &Arc<Self>, key: &str, reserved: Option<u32>) -> InFlight {
        let now = now();
        let mut st = self.lock();
        st.revision_demand
            .entry(key.to_string())
            .or_insert_with(|| DemandHistory::new(now))
            .arrive(now, &self.cfg.demand);
        st.revisions.entry(key.to_string()).or_default().reserved = reserved;
        InFlight {
            inner: self.clone(),
            key: key.to_string(),
            since: now,
        }
    }

    /// Reserve memory and disk for a sandbox, evicting least-recently-used idle sandboxes (and
    /// then ready ones) when they do not fit (the choice is [`evict::plan`]'s; nothing is
    /// evicted when even that would not make room). `new_sandbox`: count one more live sandbox.
    fn reserve(
        self: &Arc<Self>,
        need_mb: u64,
        disk_mb: u64,
        new_sandbox: bool,
    ) -> Result<(), InvokeError> {
        let (mut evict, mut evict_ready) = (Vec::new(), Vec::new());
        let fits = {
            let mut st = self.lock();
            let idle: Vec<evict::Idle<(String, String)>> = st
                .idle
                .iter()
                .flat_map(|(k, v)| {
                    v.iter().map(move |e| evict::Idle {
                        id: (k.clone(), e.sandbox.id.clone()),
                        last_used: e.last_used,
                        size: evict::Size {
                            memory_mb: e.memory_mb as u64 + SENTRY_OVERHEAD_MB,
                            disk_mb: e.sandbox.spec.tmp_mb as u64,
                        },
                    })
                })
                .collect();
            let ready: Vec<evict::Ready<(SlotSpec, String)>> = st
                .ready
                .iter()
                .flat_map(|(kind, v)| {
                    v.iter().rev().map(move |s| evict::Ready {
                        id: (kind.clone(), s.id.clone()),
                        size: evict::Size {
                            memory_mb: SENTRY_OVERHEAD_MB,
                            disk_mb: s.spec.tmp_mb as u64,
                        },
                    })
                })
                .collect();
            let plan = evict::plan(
                evict::Size {
                    memory_mb: self.cfg.memory_budget_mb,
                    disk_mb: self.cfg.disk_budget_mb,
                },
                evict::Size {
                    memory_mb: st.committed_mb,
                    disk_mb: st.committed_disk_mb,
                },
                evict::Size {
                    memory_mb: need_mb,
                    disk_mb,
                },
                &idle,
                &ready,
            );
            if let Some(plan) = plan {
                for (key, id) in plan.idle {
                    let Some(v) = st.idle.get_mut(&key) else {
                        continue;
                    };
                    let Some(i) = v.iter().position(|e| e.sandbox.id == id) else {
                        continue;
                    };
                    let env = v.remove(i);
                    st.committed_mb = st
                        .committed_mb
                        .saturating_sub(env.memory_mb as u64 + SENTRY_OVERHEAD_MB);
                    st.committed_disk_mb = st
                        .committed_disk_mb
                        .saturating_sub(env.sandbox.spec.tmp_mb as u64);
                    st.live = st.live.saturating_sub(1);
                    evict.push(env);
                }
                for (kind, id) in plan.ready {
                    let Some(v) = st.ready.get_mut(&kind) else {
                        continue;
                    };
                    let Some(i) = v.iter().position(|s| s.id == id) else {
                        continue;
                    };
                    let sandbox = v.remove(i);
                    st.committed_mb = st.committed_mb.saturating_sub(SENTRY_OVERHEAD_MB);
                    st.committed_disk_mb = st
                        .committed_disk_mb
                        .saturating_sub(sandbox.spec.tmp_mb as u64);
                    evict_ready.push(sandbox);
                }
                st.idle.retain(|_, v| !v.is_empty());
                st.ready.retain(|_, v| !v.is_empty());
            }
            let fits = st.committed_mb + need_mb <= self.cfg.memory_budget_mb
                && st.committed_disk_mb + disk_mb <= self.cfg.disk_budget_mb;
            if fits {
                st.committed_mb += need_mb;
                st.committed_disk_mb += disk_mb;
                if new_sandbox {
                    st.live += 1;
                }
            }
            fits
        };
        for env in evict {
            tracing::debug!(sandbox = %env.sandbox.id, "evicted to make room");
            self.teardown(env);
        }
        for sandbox in evict_ready {
            self.destroy_sandbox(sandbox);
        }
        if fits {
            Ok(())
        } else {
            Err(InvokeError::TooManyRequests {
                reason: "ConcurrentInvocationLimitExceeded".into(),
            })
        }
    }

    /// Give back memory and disk; `sandbox_gone`: one live sandbox fewer.
    fn release(&self, mb: u64, disk_mb: u64, sandbox_gone: bool) {
        let mut st = self.lock();
        st.committed_mb = st.committed_mb.saturating_sub(mb);
        st.committed_disk_mb = st.committed_disk_mb.saturating_sub(disk_mb);
        if sandbox_gone {
            st.live = st.live.saturating_sub(1);
        }
    }
}

/// One invocation in its revision's demand history, from its arrival until dropped.
struct InFlight {
    inner: Arc<Inner>,
    key: String,
    since: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = now();
        let ran = now.saturating_duration_since(self.since);
        let cfg = self.inner.cfg.demand;
        let mut st = self.inner.lock();
        st.revision_demand
            .entry(self.key.clone())
            .or_insert_with(|| DemandHistory::new(now))
            .finish(now, ran, &cfg);
    }
}

/// Holds one unit of concurrency until dropped.
struct Admission {
    inner: Arc<Inner>,
    function: String,
    reserved: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(n) = st.inflight.get_mut(&self.function) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.inflight.remove(&self.function);
            }
        }
        if !self.reserved {
            st.inflight_unreserved = st.inflight_unreserved.saturating_sub(1);
        }
    }
}

fn admit(inner: &Arc<Inner>, req: &InvokeRequest) -> Result<Admission, InvokeError> {
    let mut st = inner.lock();
    let name = &req.spec.name;
    let current = st.inflight.get(name).copied().unwrap_or(0);
    match req.reserved_concurrency {
        Some(limit) => {
            if current >= limit {
                return Err(InvokeError::TooManyRequests {
                    reason: "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
                });
            }
        }
        None => {
            if st.inflight_unreserved >= req.unreserved_limit {
                return Err(InvokeError::TooManyRequests {
                    reason: "ConcurrentInvocationLimitExceeded".into(),
                });
            }
            st.inflight_unreserved += 1;
        }
    }
    *st.inflight.entry(name.clone()).or_insert(0) += 1;
    Ok(Admission {
        inner: inner.clone(),
        function: name.clone(),
        reserved: req.reserved_concurrency.is_some(),
    })
}

/// Drain what an idle sandbox said while idle: output goes to the next invocation's log;
/// a runtime exit or a closed channel means it is dead.
fn still_alive(env: &mut Env, log: &mut InvLog) -> bool {
    loop {
        match env.frames.try_recv() {
            Ok(Frame {
                msg: AgentMsg::Log,
                body,
            }) => log.push(&body),
            Ok(Frame {
                msg: AgentMsg::RuntimeExit { .. },
                ..
            }) => return false,
            Ok(_) => {}
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
}

/// An invocation's log on its way to the log sink: what arrives is passed on in pieces of at
/// most [`LOG_FLUSH_BYTES`] (cut after a line end where there is one), and only the last
/// [`LOG_TAIL_BYTES`] are kept for the result, so memory per invocation is bounded whatever
/// the function prints.
struct InvLog {
    sink: Option<LogTarget>,
    pending: Vec<u8>,
    tail: Vec<u8>,
}

impl InvLog {
    fn new(sink: Option<LogTarget>) -> Self {
        InvLog {
            sink,
            pending: Vec::new(),
            tail: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * LOG_TAIL_BYTES {
            let cut = self.tail.len() - LOG_TAIL_BYTES;
            self.tail.drain(..cut);
        }
        if self.sink.is_none() {
            return;
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = LOG_FLUSH_BYTES - self.pending.len();
            let (now, later) = rest.split_at(rest.len().min(room));
            self.pending.extend_from_slice(now);
            rest = later;
            if self.pending.len() >= LOG_FLUSH_BYTES {
                let cut = self
                    .pending
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map(|i| i + 1)
                    .unwrap_or(self.pending.len());
                self.write_out(cut);
            }
        }
    }

    fn push_str(&mut self, text: &str) {
        self.push(text.as_bytes());
    }

    fn write_out(&mut self, n: usize) {
        if let Some(sink) = &self.sink {
            sink.0.write(&self.pending[..n]);
        }
        self.pending.drain(..n);
    }

    fn ends_with_newline(&self) -> bool {
        self.tail.last().is_none_or(|&b| b == b'\n')
    }

    /// Send what is pending and return the tail.
    fn finish(mut self) -> String {
        let n = self.pending.len();
        self.write_out(n);
        let start = self.tail.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&self.tail[start..]).into_owned()
    }
}

/// Idle sandboxes by function name and revision id (the parts of their pool keys).
fn idle_by_revision(
    idle: &HashMap<String, Vec<Env>>,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>> {
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>> =
        Default::default();
    for (key, envs) in idle.iter().filter(|(_, v)| !v.is_empty()) {
        let Some((name, revision)) = name_and_revision(key) else {
            continue;
        };
        *out.entry(name.to_string())
            .or_default()
            .entry(revision.to_string())
            .or_default() += envs.len() as u32;
    }
    out
}

/// The function name and revision id of a [`pool_key`].
fn name_and_revision(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.split('\u{0}');
    let (name, _version, revision) = (parts.next()?, parts.next()?, parts.next()?);
    Some((name, revision))
}

fn pool_key(spec: &FunctionSpec) -> String {
    format!(
        "{}\u{0}{}\u{0}{}",
        spec.name, spec.version, spec.revision_id
    )
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The environment Lambda gives a runtime, for one function version.
pub fn lambda_env(spec: &FunctionSpec, region: &str, init_type: &str) -> Vec<String> {
    let exec_env = hearth_core::runtimes::lookup(&spec.runtime).and_then(|r| r.execution_env);
    let day = chrono_day();
    let stream = format!("{day}/[{}]{}", spec.version, uuid::Uuid::new_v4().simple());
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let platform = [
        ("_HANDLER", spec.handler.clone()),
        ("AWS_LAMBDA_FUNCTION_NAME", spec.name.clone()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            spec.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_FUNCTION_VERSION", spec.version.clone()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", init_type.to_string()),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", spec.name),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME", stream),
        ("AWS_REGION", region.to_string()),
        ("AWS_DEFAULT_REGION", region.to_string()),
        (
            "AWS_EXECUTION_ENV",
            exec_env.unwrap_or_default().to_string(),
        ),
    ];
    let platform: Vec<(&str, String)> = platform
        .into_iter()
        .chain(
            crate::engine::PLATFORM_ENV
                .iter()
                .filter(|(k, _)| {
                    !(crate::engine::FUNCTION_SETTABLE_ENV.contains(k) && spec.env.contains_key(*k))
                })
                .map(|(k, v)| (*k, v.to_string())),
        )
        .collect();
    env.retain(|kv| {
        !platform
            .iter()
            .any(|(k, _)| kv.split('=').next() == Some(*k))
    });
    // Lambda sets no AWS_EXECUTION_ENV for OS-only (custom) runtimes.
    env.extend(
        platform
            .iter()
            .filter(|(k, _)| !(exec_env.is_none() && *k == "AWS_EXECUTION_ENV"))
            .map(|(k, v)| format!("{k}={v}")),
    );
    // Where the runtime's language finds layer content (Python: `PYTHONPATH`), unless the
    // function sets that variable itself.
    if !spec.layers.is_empty()
        && let Some((key, value)) = crate::layers::runtime_path(&spec.runtime)
        && !spec.env.contains_key(key)
    {
        env.push(format!("{key}={value}"));
    }
    env
}

fn chrono_day() -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = (epoch_ms() / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}/{m:02}/{d:02}")
}

fn error_doc(message: &str, error_type: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "errorMessage": message, "errorType": error_type }))
        .unwrap_or_default()
}

impl Worker {
    /// The unpacked code of a version (named by its `CodeSha256`), from the worker's code
    /// cache, fetched from the chunk store when missing (see [`Worker::package_dir`]).
    async fn code_dir(&self, spec: &FunctionSpec) -> Result<PathBuf, InvokeError> {
        self.package_dir(spec, &spec.code_sha256, "the function's code")
            .await
    }

    /// The merged tree of a version's layers, in its order (later layers over earlier ones),
    /// for the sandbox's `/opt`; `None` without layers. Each layer is a package like code,
    /// unpacked into the code cache; the merged tree is cached beside them per ordered list
    /// ([`crate::layers`]).
    async fn opt_dir(&self, spec: &FunctionSpec) -> Result<Option<PathBuf>, InvokeError> {
        if spec.layers.is_empty() {
            return Ok(None);
        }
        let mut dirs = Vec::with_capacity(spec.layers.len());
        let mut hexes = Vec::with_capacity(spec.layers.len());
        for sha256 in &spec.layers {
            dirs.push(self.package_dir(spec, sha256, "a layer").await?);
            hexes.push(hearth_core::code::CodeRef::hex_of(sha256).unwrap_or_default());
        }
        let Some(cache) = self.inner.cfg.code_cache.clone() else {
            return Err(InvokeError::NotReady(
                "this worker has no code cache to unpack the function's layers into".into(),
            ));
        };
        let key = crate::layers::list_key(&hexes);
        tokio::task::spawn_blocking(move || crate::layers::merged_tree(&cache, &key, &dirs))
            .await
            .map_err(|e| InvokeError::Service(e.to_string()))?
            .map(Some)
            .map_err(|e| InvokeError::Service(e.to_string()))
    }

    /// The unpacked package named by `sha256` (base64 SHA-256, as `CodeSha256`; `what` it is,
    /// for errors), from the worker's code cache, fetched from the chunk store (verified chunk
    /// by chunk, then checked against its SHA-256) when missing.
    async fn package_dir(
        &self,
        spec: &FunctionSpec,
        sha256: &str,
        what: &str,
    ) -> Result<PathBuf, InvokeError> {
        let hex_sha = hearth_core::code::CodeRef::hex_of(sha256)
            .ok_or_else(|| InvokeError::Service(format!("bad SHA-256 {sha256:?} of {what}")))?;
        let Some(cache) = &self.inner.cfg.code_cache else {
            return Err(InvokeError::NotReady(format!(
                "this worker has no code cache to unpack {what} into"
            )));
        };
        let store = hearth_core::code::CodeStore::new(cache.clone(), Default::default());
        let dir = store.dir_for(&hex_sha);
        if dir.is_dir() {
            return Ok(dir);
        }
        let Some(chunks) = &self.inner.cfg.chunk_store else {
            return Err(InvokeError::NotReady(format!(
                "{what} of {} (SHA-256 {sha256}) is not on this worker, which has no chunk store to fetch it from",
                spec.name
            )));
        };
        let zip = chunks
            .get_bytes(
                &crate::snapshots::owner_scope(spec),
                &hearth_core::code::code_artifact(&hex_sha),
            )
            .await
            .map_err(|e| InvokeError::NotReady(format!("fetching {what}: {e}")))?;
        let stored = tokio::task::spawn_blocking(move || store.store_zip(&zip))
            .await
            .map_err(|e| InvokeError::Service(e.to_string()))?
            .map_err(|e| InvokeError::Service(format!("unpacking {what}: {e}")))?;
        if stored.sha256_hex != hex_sha {
            return Err(InvokeError::Service(format!(
                "the artifact of {what} does not match its SHA-256"
            )));
        }
        Ok(stored.dir)
    }

    /// The network a version's sandboxes get: egress unless the server's policy or the
    /// function says none, or the version restores from snapshots and the engine cannot
    /// checkpoint a sandbox with network access.
    pub fn net_mode(&self, spec: &FunctionSpec) -> NetMode {
        let engine = &self.inner.engine;
        let wanted = spec.egress && engine.egress_allowed();
        let snapshot_blocks = spec.snap_start && !engine.egress_with_snapshots();
        if wanted && !snapshot_blocks {
            NetMode::Egress
        } else {
            NetMode::None
        }
    }

    /// The kind of sandbox one function version boots in (`started`) or restores into.
    fn slot_spec(&self, spec: &FunctionSpec, started: bool) -> Result<SlotSpec, InvokeError> {
        let rootfs = self
            .inner
            .images
            .rootfs_for_runtime(&spec.runtime)
            .map_err(|e| InvokeError::NotReady(e.to_string()))?;
        Ok(SlotSpec {
            rootfs,
            net: self.net_mode(spec),
            tmp_mb: spec.ephemeral_storage_mb,
            pids_limit: PIDS_LIMIT,
            started,
            memory_mb: started
                .then(|| prestart_memory(&spec.runtime, spec.memory_mb))
                .flatten(),
        })
    }

    /// Claim a sandbox (ready or new) and boot it for `spec`, or restore `image` into it; its
    /// frames arrive on `Env::frames`.
    async fn launch(
        &self,
        spec: &FunctionSpec,
        init_type: &str,
        image: Option<&Path>,
    ) -> Result<Env, InvokeError> {
        let inner = &self.inner;
        let code_dir = self.code_dir(spec).await?;
        let opt_dir = self.opt_dir(spec).await?;
        if let Some(chunks) = &self.inner.cfg.chunk_store {
            crate::artifacts::ensure_image(&self.inner.images, chunks, &spec.runtime)
                .await
                .map_err(|e| InvokeError::NotReady(e.to_string()))?;
        }
        let kind = self.slot_spec(spec, image.is_none())?;
        let mut sandbox = inner.claim_sandbox(&kind, spec.memory_mb).await?;
        let claim = Claim {
            code_dir,
            opt_dir,
            memory_mb: spec.memory_mb,
        };
        let mut started = match image {
            None => inner.engine.start(&mut sandbox, &claim).await,
            Some(dir) => inner.engine.restore(&mut sandbox, &claim, dir).await,
        }
        .map_err(|e| e.to_string());
        if started.is_ok() && image.is_none() {
            let config = SandboxConfig {
                env: lambda_env(spec, &inner.cfg.region, init_type),
            };
            started = frames::write_frame(&mut sandbox.stdin, &HostMsg::Configure(config), b"")
                .await
                .map_err(|e| format!("configuring the sandbox: {e}"));
        }
        if let Err(e) = started {
            inner.release(
                spec.memory_mb as u64 + SENTRY_OVERHEAD_MB,
                kind.tmp_mb as u64,
                true,
            );
            inner.destroy_sandbox(sandbox);
            return Err(InvokeError::Service(e));
        }
        // Bounded: at most 16 frames of at most 64 KB wait here per sandbox.
        let (tx, rx) = mpsc::channel(16);
        if let Some(mut stdout) = sandbox.stdout.take() {
            let id = sandbox.id.clone();
            tokio::spawn(async move {
                loop {
                    match frames::read_frame::<_, AgentMsg>(&mut stdout).await {
                        Ok(f) => {
                            if tx.send(f).await.is_err() {
                                break;
                            }
                        }
                        Err(hearth_proto::FrameError::Closed) => break,
                        Err(e) => {
                            tracing::warn!(sandbox = %id, "agent channel: {e}");
                            break;
                        }
                    }
                }
            });
        }
        Ok(Env {
            sandbox,
            frames: rx,
            function: spec.name.clone(),
            memory_mb: spec.memory_mb,
            last_used: now(),
            frozen: false,
        })
    }

    fn init_limit(&self, spec: &FunctionSpec) -> Duration {
        self.inner
            .cfg
            .init_timeout
            .max(Duration::from_secs(spec.timeout_s as u64))
    }

    /// Follow init until the runtime waits for the platform (or init fails).
    async fn wait_init(&self, env: &mut Env, limit: Duration, log: &mut InvLog) -> Init {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = tokio::select! {
                f = env.frames.recv() => f,
                _ = tokio::time::sleep_until(deadline) => {
                    return Init::Failed { doc: error_doc(
                        &format!("Init timed out after {:.2} seconds", limit.as_secs_f64()),
                        "Runtime.InitTimeout") };
                }
            };
            match frame {
                Some(Frame {
                    msg: AgentMsg::Hello { protocol, .. },
                    ..
                }) => {
                    if protocol != hearth_proto::PROTOCOL_VERSION {
                        return Init::Failed {
                            doc: error_doc(
                                "agent speaks another protocol version",
                                "Runtime.AgentMismatch",
                            ),
                        };
                    }
                }
                Some(Frame {
                    msg: AgentMsg::Log,
                    body,
                }) => log.push(&body),
                Some(Frame {
                    msg: AgentMsg::InitDone { init_ms },
                    ..
                }) => return Init::Ready { init_ms },
                Some(Frame {
                    msg: AgentMsg::RestoreReady,
                    ..
                }) => return Init::RestoreReady,
                Some(Frame {
                    msg: AgentMsg::InitError { .. },
                    body,
                }) => return Init::Failed { doc: body },
                Some(Frame {
                    msg: AgentMsg::RestoreError { .. },
                    body,
                }) => return Init::Failed { doc: body },
                Some(Frame {
                    msg: AgentMsg::RuntimeExit { status },
                    ..
                }) => {
                    return Init::Failed {
                        doc: error_doc(
                            &format!("Runtime exited with error: {status}"),
                            "Runtime.ExitError",
                        ),
                    };
                }
                Some(_) => {}
                None => {
                    let detail = env
                        .sandbox
                        .stderr_tail
                        .lock()
                        .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                        .unwrap_or_default();
                    tracing::debug!(sandbox = %env.sandbox.id, "sandbox ended during init: {detail}");
                    let (msg, ty) = if self.inner.engine.oom_killed(&env.sandbox.id) {
                        (
                            "Runtime exited with error: signal: killed",
                            "Runtime.OutOfMemory",
                        )
                    } else {
                        (
                            "Runtime exited without providing a reason",
                            "Runtime.ExitError",
                        )
                    };
                    return Init::Failed {
                        doc: error_doc(msg, ty),
                    };
                }
            }
        }
    }

    /// What a snapshot of `spec` depends on, as of now.
    fn snapshot_deps(&self, spec: &FunctionSpec) -> BTreeMap<String, String> {
        let engine = &self.inner.engine;
        BTreeMap::from([
            (
                "runtime_image".to_string(),
                self.inner
                    .images
                    .image_id(&spec.runtime)
                    .unwrap_or_default(),
            ),
            ("code_sha256".to_string(), spec.code_sha256.clone()),
            ("agent".to_string(), engine.agent_digest().to_string()),
            ("engine".to_string(), engine.engine_id()),
            ("memory_mb".to_string(), spec.memory_mb.to_string()),
        ])
        .into_iter()
        // The layers, in order, where there are any (snapshots of functions without layers
        // stay valid).
        .chain((!spec.layers.is_empty()).then(|| ("layers".to_string(), spec.layers.join(","))))
        .collect()
    }

    /// Boot a sandbox in snap-start mode, run init until the runtime waits, checkpoint it and
    /// keep the image. Replaces an older snapshot of the same version.
    pub async fn create_snapshot(
        &self,
        spec: &FunctionSpec,
    ) -> Result<SnapshotMeta, SnapshotError> {
        let store = self
            .inner
            .snapshots
            .as_ref()
            .ok_or(SnapshotError::Disabled)?;
        let mut env = self
            .launch(spec, "snap-start", None)
            .await
            .map_err(|e| SnapshotError::Unavailable(e.to_string()))?;
        let mut log = InvLog::new(None);
        let point = match self
            .wait_init(&mut env, self.init_limit(spec), &mut log)
            .await
        {
            Init::RestoreReady => RestorePoint::RestoreNext,
            Init::Ready { .. } => RestorePoint::Next,
            Init::Failed { doc } => {
                self.inner.destroy(env);
                return Err(SnapshotError::Init(
                    String::from_utf8_lossy(&doc).into_owned(),
                ));
            }
        };
        let init_ms = since(env.last_used).as_secs_f64() * 1000.0;
        let tmp = store.tmp_dir()?;
        let t = now();
        let checkpointed = self.inner.engine.checkpoint(&env.sandbox, &tmp).await;
        let checkpoint_ms = since(t).as_secs_f64() * 1000.0;
        self.inner.destroy(env);
        if let Err(e) = checkpointed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        let image_bytes = crate::snapshots::image_size(&tmp);
        let meta = SnapshotMeta {
            function: spec.name.clone(),
            version: spec.version.clone(),
            revision_id: spec.revision_id.clone(),
            point,
            deps: self.snapshot_deps(spec),
            init_ms,
            image_bytes,
            checkpoint_ms,
            files: Vec::new(),
        };
        store.commit(spec, &tmp, &meta).await?;
        tracing::info!(function = %spec.name, version = %spec.version, image_bytes, "snapshot taken");
        Ok(meta)
    }

    /// Try to restore a sandbox from the version's snapshot. `None` means: boot instead (the
    /// reason, if any, is appended to `log`).
    async fn try_restore(&self, spec: &FunctionSpec, log: &mut InvLog) -> Option<(Env, f64)> {
        let store = self.inner.snapshots.as_ref()?;
        let (dir, meta) = match store.find(spec, &self.snapshot_deps(spec)).await {
            Ok(found) => found,
            Err(SnapshotMiss::Absent) => return None,
            Err(miss) => {
                tracing::info!(function = %spec.name, "not restoring: {miss}");
                if let SnapshotMiss::Stale(_) = miss {
                    // Taken with another engine, agent, image or memory size: boot now, and
                    // take a new snapshot in the background for later cold starts.
                    self.resnapshot(spec);
                }
                return None;
            }
        };
        let t = now();
        let mut env = match self.launch(spec, "snap-start", Some(&dir)).await {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(function = %spec.name, "restore failed, booting instead: {e}");
                return None;
            }
        };
        tracing::debug!(function = %spec.name, ms = since(t).as_secs_f64() * 1000.0, "restored; resuming the runtime");
        if meta.point == RestorePoint::RestoreNext {
            if frames::write_frame(&mut env.sandbox.stdin, &HostMsg::Restore, b"")
                .await
                .is_err()
            {
                self.inner.destroy(env);
                return None;
            }
            match self.wait_init(&mut env, self.init_limit(spec), log).await {
                Init::Ready { .. } => {}
                Init::RestoreReady => {}
                Init::Failed { doc } => {
                    let text = String::from_utf8_lossy(&doc);
                    log.push_str(&format!("RESTORE_ERROR {text}\n"));
                    tracing::info!(function = %spec.name, "after-restore hook failed, booting instead: {text}");
                    self.inner.destroy(env);
                    return None;
                }
            }
        }
        self.inner.lock().restores += 1;
        tracing::debug!(function = %spec.name, ms = since(t).as_secs_f64() * 1000.0, "restore done");
        Some((env, since(t).as_secs_f64() * 1000.0))
    }

    /// Take a new snapshot of `spec` in the background (once at a time per revision).
    fn resnapshot(&self, spec: &FunctionSpec) {
        let key = pool_key(spec);
        if !self.inner.lock().resnapshots.insert(key.clone()) {
            return;
        }
        let worker = self.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            match worker.create_snapshot(&spec).await {
                Ok(_) => {
                    tracing::info!(function = %spec.name, version = %spec.version, "stale snapshot replaced")
                }
                Err(e) => tracing::warn!(function = %spec.name, "replacing a stale snapshot: {e}"),
            }
            worker.inner.lock().resnapshots.remove(&key);
        });
    }

    /// A new sandbox for `spec`: restored from its snapshot when it has one, else booted.
    async fn create(
        &self,
        spec: &FunctionSpec,
        log: &mut InvLog,
    ) -> Result<(Env, Init, Start), InvokeError> {
        if spec.snap_start
            && let Some((env, restore_ms)) = self.try_restore(spec, log).await
        {
            return Ok((
                env,
                Init::Ready {
                    init_ms: restore_ms,
                },
                Start::Restored,
            ));
        }
        let mut env = self.launch(spec, "on-demand", None).await?;
        let init = self.wait_init(&mut env, self.init_limit(spec), log).await;
        self.inner.lock().cold_starts += 1;
        Ok((env, init, Start::Booted))
    }

    async fn run(
        env: &mut Env,
        req: &InvokeRequest,
        request_id: &str,
        log: &mut InvLog,
        engine: &dyn Engine,
        peak: &mut u64,
    ) -> Outcome {
        let timeout = Duration::from_secs(req.spec.timeout_s as u64);
        let meta = InvokeMeta {
            request_id: request_id.to_string(),
            deadline_ms: epoch_ms() + timeout.as_millis() as u64,
            invoked_function_arn: req.invoked_arn.clone(),
            trace_id: format!(
                "Root=1-{:08x}-{};Parent={:016x};Sampled=0",
                epoch_ms() / 1000,
                &uuid::Uuid::new_v4().simple().to_string()[..24],
                rand::random::<u64>()
            ),
            client_context: req.client_context.clone(),
            cognito_identity: None,
        };
        if frames::write_frame(&mut env.sandbox.stdin, &HostMsg::Invoke(meta), &req.payload)
            .await
            .is_err()
        {
            return Outcome::Died;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // A streamed response goes to the caller's sink, or is gathered here without one.
        let mut gathered = Vec::new();
        let mut streamed_bytes = 0usize;
        // The function's memory is sampled while it runs (cgroup peaks count page cache), from
        // 50 ms on: a short invoke's is read once, after its response, off the way in.
        let every = Duration::from_millis(50);
        let mut sample = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let frame = tokio::select! {
                f = env.frames.recv() => f,
                _ = tokio::time::sleep_until(deadline) => return Outcome::Timeout,
                _ = sample.tick() => {
                    if let Some(now) = engine.resident(&env.sandbox.id) {
                        *peak = (*peak).max(now);
                    }
                    continue;
                }
            };
            match frame {
                Some(Frame {
                    msg: AgentMsg::Log,
                    body,
                }) => log.push(&body),
                Some(Frame {
                    msg: AgentMsg::Response { request_id: id },
                    body,
                }) if id == request_id => {
                    return Outcome::Response(body);
                }
                Some(Frame {
                    msg: AgentMsg::FunctionError { request_id: id, .. },
                    body,
                }) if id == request_id => {
                    return Outcome::FunctionError(body);
                }
                Some(Frame {
                    msg:
                        AgentMsg::StreamStart {
                            request_id: id,
                            content_type,
                        },
                    ..
                }) if id == request_id => {
                    if let Some(sink) = &req.response {
                        sink.0.start(content_type.as_deref());
                    }
                }
                Some(Frame {
                    msg: AgentMsg::StreamChunk { request_id: id },
                    body,
                }) if id == request_id => {
                    streamed_bytes += body.len();
                    match &req.response {
                        Some(sink) => sink.0.chunk(&body),
                        // Gathered for a buffered caller, within the synchronous limit.
                        None if streamed_bytes <= MAX_SYNC_PAYLOAD => {
                            gathered.extend_from_slice(&body)
                        }
                        None => gathered = Vec::new(),
                    }
                }
                Some(Frame {
                    msg: AgentMsg::StreamEnd { request_id: id },
                    ..
                }) if id == request_id => {
                    if req.response.is_none() && streamed_bytes > MAX_SYNC_PAYLOAD {
                        return Outcome::FunctionError(error_doc(
                            &format!(
                                "Response payload size ({streamed_bytes} bytes) exceeded \
                                 maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."
                            ),
                            "Function.ResponseSizeTooLarge",
                        ));
                    }
                    return Outcome::Response(gathered);
                }
                Some(Frame {
                    msg: AgentMsg::RuntimeExit { status },
                    ..
                }) => return Outcome::Exit(status),
                Some(_) => {}
                None => return Outcome::Died,
            }
        }
    }
}

#[async_trait::async_trait]
impl Invoker for Worker {
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        // The invocation runs in a task of its own: if the caller goes away (a client timeout
        // drops the HTTP request), it still ends properly and its sandbox goes back to the pool
        // or is destroyed, never leaked.
        let worker = self.clone();
        tokio::spawn(async move { worker.run_invocation(req).await })
            .await
            .map_err(|e| InvokeError::Service(format!("invocation task: {e}")))?
    }

    fn retire(&self, function_name: &str) {
        self.retire_idle(function_name);
    }

    async fn prepare(&self, spec: FunctionSpec) -> Result<(), String> {
        self.prepare_snapshot(spec).await
    }

    fn forget(&self, function_arn: &str) {
        self.forget_function(function_arn);
    }

    fn snapshots_keep_network(&self) -> bool {
        !self.inner.engine.egress_allowed() || self.inner.engine.egress_with_snapshots()
    }

    fn forget_version(&self, function_arn: &str, version: &str) {
        self.forget_function_version(function_arn, version);
    }
}

impl Worker {
    /// A sandbox of revision `key` for one invocation: an idle one (`Some`), or `None` when
    /// this invocation is to start one (counted as a start in flight). Misses are paced by
    /// [`scaling::on_miss`]: an invocation may wait, oldest first, for one of the revision's
    /// sandboxes to come free instead of starting another, and waits when the worker runs
    /// as many starts as it may.
    async fn acquire(
        &self,
        key: &str,
        spec: &FunctionSpec,
        log: &mut InvLog,
    ) -> Result<Option<Env>, InvokeError> {
        let inner = &self.inner;
        let function = spec.name.as_str();
        let mut queued: Option<(u64, oneshot::Receiver<Env>)> = None;
        // The kind of sandbox a boot of this version would claim (whether one is ready decides
        // how long a start would take); looked up on the first miss, never on a warm start.
        let mut kind: Option<Option<SlotSpec>> = None;
        loop {
            if inner.closed.load(Ordering::SeqCst) {
                if let Some((id, rx)) = queued.as_mut() {
                    if let Some(rev) = inner.lock().revisions.get_mut(key) {
                        rev.waiters.retain(|(w, _)| w != id);
                    }
                    // A sandbox handed over just now goes with the worker.
                    if let Ok(env) = rx.try_recv() {
                        inner.unbusy(key);
                        inner.destroy(env);
                    }
                }
                return Err(InvokeError::NotReady("the worker is shutting down".into()));
            }
            // Handed over by a finishing invocation?
            if let Some((_, rx)) = queued.as_mut()
                && let Ok(env) = rx.try_recv()
            {
                queued = None;
                if let Some(env) = inner.take_if_alive(key, env, true, log) {
                    return Ok(Some(env));
                }
                continue;
            }
            let changed = inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let waiting = {
                let mut st = inner.lock();
                if queued.is_none()
                    && let Some(env) = st.idle.get_mut(key).and_then(Vec::pop)
                {
                    drop(st);
                    if let Some(env) = inner.take_if_alive(key, env, false, log) {
                        return Ok(Some(env));
                    }
                    continue;
                }
                let Some(kind_now) = &kind else {
                    drop(st);
                    kind = Some(self.slot_spec(spec, true).ok());
                    continue;
                };
                let (starts, limit) = (st.starts_in_flight, inner.cfg.start_limit);
                let ready = kind_now
                    .as_ref()
                    .is_some_and(|k| st.ready.get(k).is_some_and(|v| !v.is_empty()));
                let create_ms = (!ready).then(|| st.create_ms.unwrap_or(scaling::DEFAULT_COLD_MS));
                let rev = st.revisions.entry(key.to_string()).or_default();
                let position = match &queued {
                    None => rev.waiters.len(),
                    Some((id, _)) => match rev.waiters.iter().position(|(w, _)| w == id) {
                        Some(p) => p,
                        // Taken off the queue: a sandbox was handed over just now.
                        None => continue,
                    },
                };
                let load = scaling::RevisionLoad {
                    busy: rev.busy,
                    starting: rev.starting,
                    waiting: position,
                    invoke_ms: rev.invoke_ms,
                    cold_ms: rev.cold_ms,
                    create_ms,
                    done_per_s: rev.done_per_s(now()),
                };
                match scaling::on_miss(&load, starts, limit) {
                    scaling::Miss::Start => {
                        tracing::debug!(
                            function,
                            busy = load.busy,
                            starting = load.starting,
                            waiting = load.waiting,
                            invoke_ms = load.invoke_ms,
                            cold_ms = load.cold_ms,
                            create_ms = load.create_ms,
                            done_per_s = load.done_per_s,
                            starts,
                            "cold start"
                        );
                        if let Some((id, _)) = &queued {
                            rev.waiters.retain(|(w, _)| w != id);
                        }
                        let (rule, t) = (inner.cfg.burst, since(inner.epoch));
                        let allowed = st
                            .burst
                            .entry(function.to_string())
                            .or_insert_with(|| scaling::BurstBucket::new(rule, t))
                            .take(rule, t);
                        if let Err(wait) = allowed {
                            st.burst_throttled += 1;
                            drop(st);
                            // Those behind this one decide again (they may find a sandbox).
                            inner.changed.notify_waiters();
                            tracing::info!(
                                function,
                                per_window = rule.per_window,
                                window_s = rule.window.as_secs_f64(),
                                next_in_ms = wait.as_millis() as u64,
                                "cold start throttled by the function's scaling rate"
                            );
                            return Err(InvokeError::TooManyRequests {
                                reason: "FunctionInvocationRateLimitExceeded".into(),
                            });
                        }
                        let rev = st.revisions.entry(key.to_string()).or_default();
                        rev.starting += 1;
                        st.starts_in_flight += 1;
                        false
                    }
                    scaling::Miss::Wait => {
                        if queued.is_none() {
                            let (tx, rx) = oneshot::channel();
                            let id = rev.next_waiter;
                            rev.next_waiter += 1;
                            rev.waiters.push_back((id, tx));
                            st.paced += 1;
                            queued = Some((id, rx));
                        }
                        true
                    }
                }
            };
            if !waiting {
                return Ok(None);
            }
            let Some((_, rx)) = queued.as_mut() else {
                continue;
            };
            // Decide again when something changes, and at least every 100 ms.
            tokio::select! {
                got = rx => {
                    queued = None;
                    if let Ok(env) = got
                        && let Some(env) = inner.take_if_alive(key, env, true, log)
                    {
                        return Ok(Some(env));
                    }
                }
                _ = &mut changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn run_invocation(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(InvokeError::NotReady("the worker is shutting down".into()));
        }
        let _admission = admit(inner, &req)?;
        let key = pool_key(&req.spec);
        let _in_flight = inner.arrive(&key, req.reserved_concurrency);
        let request_id = req.request_id.clone();
        let mut log = InvLog::new(req.log.clone());
        let warm = match self.acquire(&key, &req.spec, &mut log).await {
            Ok(warm) => warm,
            Err(e) => {
                log.finish();
                return Err(e);
            }
        };
        // Counted busy from here (or starting, counted by `acquire`) until `finish_busy`.
        let cold_started = now();
        let (mut env, init_ms) = match warm {
            Some(env) => (env, None),
            None => {
                let created = self.create(&req.spec, &mut log).await;
                inner.start_done(&key, created.is_ok(), since(cold_started));
                let (env, init, start) = match created {
                    Ok(created) => created,
                    Err(e) => {
                        inner.finish_busy(&key, None);
                        log.finish();
                        return Err(e);
                    }
                };
                match init {
                    Init::Ready { init_ms } => (env, Some((init_ms, start))),
                    Init::RestoreReady => {
                        inner.finish_busy(&key, None);
                        inner.destroy(env);
                        log.finish();
                        return Err(InvokeError::Service(
                            "runtime stopped in restore/next on a boot".into(),
                        ));
                    }
                    Init::Failed { doc } => {
                        let ty = serde_json::from_slice::<serde_json::Value>(&doc)
                            .ok()
                            .and_then(|v| {
                                v.get("errorType")
                                    .and_then(|t| t.as_str())
                                    .map(String::from)
                            })
                            .unwrap_or_else(|| "Runtime.Unknown".into());
                        if !log.ends_with_newline() {
                            log.push_str("\n");
                        }
                        log.push_str(&format!(
                            "START RequestId: {request_id} Version: {}\n",
                            req.spec.version
                        ));
                        log.push_str(&format!("END RequestId: {request_id}\n"));
                        log.push_str(&format!(
                            "REPORT RequestId: {request_id}\tDuration: 0.00 ms\tBilled Duration: 0 ms\tMemory Size: {} MB\tMax Memory Used: {} MB\tStatus: error\tError Type: {ty}\n",
                            req.spec.memory_mb,
                            inner.engine.resident(&env.sandbox.id).unwrap_or(0) / (1024 * 1024),
                        ));
                        inner.finish_busy(&key, None);
                        inner.destroy(env);
                        return Ok(InvokeResult {
                            payload: doc,
                            function_error: true,
                            log: log.finish(),
                        });
                    }
                }
            }
        };
        if !log.ends_with_newline() {
            log.push_str("\n");
        }
        log.push_str(&format!(
            "START RequestId: {request_id} Version: {}\n",
            req.spec.version
        ));
        let started = now();
        let engine = &*inner.engine;
        let mut peak = 0;
        let outcome = Self::run(&mut env, &req, &request_id, &mut log, engine, &mut peak).await;
        let duration = since(started);
        peak = peak.max(engine.resident(&env.sandbox.id).unwrap_or(0));
        let peak_mb = peak / (1024 * 1024);
        let timeout_s = req.spec.timeout_s;
        let note = |log: &mut InvLog, text: &str| {
            if !log.ends_with_newline() {
                log.push_str("\n");
            }
            log.push_str(text);
        };
        let (payload, function_error, keep) = match outcome {
            Outcome::Response(body) => (body, false, true),
            Outcome::FunctionError(body) => (body, true, true),
            Outcome::Timeout => {
                let msg = format!(
                    "{} {request_id} Task timed out after {timeout_s}.00 seconds",
                    chrono_now_iso()
                );
                note(&mut log, &format!("{msg}\n"));
                (error_doc(&msg, "Sandbox.Timedout"), true, false)
            }
            Outcome::Exit(status) => {
                // A runtime that exits after its sandbox hit the memory limit ran out of memory
                // (inside gVisor an allocation past the limit can fail instead of being killed).
                let ty = if engine.out_of_memory(&env.sandbox.id, peak) {
                    "Runtime.OutOfMemory"
                } else {
                    "Runtime.ExitError"
                };
                let msg =
                    format!("RequestId: {request_id} Error: Runtime exited with error: {status}");
                note(&mut log, &format!("{msg}\n{ty}\n"));
                (error_doc(&msg, ty), true, false)
            }
            Outcome::Died => {
                // Let the frame reader see the end, then ask the cgroup why the sandbox died.
                let (msg, ty) = if engine.out_of_memory(&env.sandbox.id, peak) {
                    (
                        format!(
                            "RequestId: {request_id} Error: Runtime exited with error: signal: killed"
                        ),
                        "Runtime.OutOfMemory",
                    )
                } else {
                    (
                        format!(
                            "RequestId: {request_id} Error: Runtime exited without providing a reason"
                        ),
                        "Runtime.ExitError",
                    )
                };
                note(&mut log, &format!("{msg}\n{ty}\n"));
                (error_doc(&msg, ty), true, false)
            }
        };
        note(&mut log, &format!("END RequestId: {request_id}\n"));
        let ms = duration.as_secs_f64() * 1000.0;
        let mut report = format!(
            "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\tMax Memory Used: {peak_mb} MB\t",
            ms.ceil().max(1.0) as u64,
            req.spec.memory_mb
        );
        match init_ms {
            Some((i, Start::Booted)) => report.push_str(&format!("Init Duration: {i:.2} ms\t")),
            Some((i, Start::Restored)) => {
                report.push_str(&format!("Restore Duration: {i:.2} ms\t"))
            }
            None => {}
        }
        if !keep {
            report.push_str("Status: error\t");
        }
        report.push('\n');
        log.push_str(&report);
        if keep && !inner.closed.load(Ordering::SeqCst) {
            env.last_used = now();
            inner.finish_and_give_back(&key, duration, env);
        } else {
            inner.finish_busy(&key, Some(duration));
            inner.destroy(env);
        }
        Ok(InvokeResult {
            payload,
            function_error,
            log: log.finish(),
        })
    }

    async fn prepare_snapshot(&self, spec: FunctionSpec) -> Result<(), String> {
        if !spec.snap_start || self.inner.snapshots.is_none() {
            return Ok(());
        }
        self.create_snapshot(&spec)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn forget_function(&self, function_arn: &str) {
        let name = hearth_core::invoker::function_name_of(function_arn).to_string();
        self.retire(&name);
        if let Some(s) = self.inner.snapshots.clone() {
            s.evict_local(&name);
            let arn = function_arn.to_string();
            tokio::spawn(async move { s.remove(&arn, &name, None).await });
        }
    }

    fn forget_function_version(&self, function_arn: &str, version: &str) {
        if let Some(s) = self.inner.snapshots.clone() {
            let name = hearth_core::invoker::function_name_of(function_arn).to_string();
            let (arn, version) = (function_arn.to_string(), version.to_string());
            tokio::spawn(async move { s.remove(&arn, &name, Some(&version)).await });
        }
    }

    fn retire_idle(&self, function_name: &str) {
        let envs: Vec<Env> = {
            let mut st = self.inner.lock();
            let mut out = Vec::new();
            for envs in st.idle.values_mut() {
                let (gone, keep): (Vec<Env>, Vec<Env>) =
                    envs.drain(..).partition(|e| e.function == function_name);
                *envs = keep;
                out.extend(gone);
            }
            st.idle.retain(|_, v| !v.is_empty());
            out
        };
        for env in envs {
            self.inner.destroy(env);
        }
    }
}

fn chrono_now_iso() -> String {
    let ms = epoch_ms();
    let secs = ms / 1000;
    let day = chrono_day().replace('/', "-");
    let rem = secs % 86_400;
    format!(
        "{day}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<(Vec<u8>, usize)>);

    impl hearth_core::invoker::LogSink for Collect {
        fn write(&self, bytes: &[u8]) {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            assert!(bytes.len() <= LOG_FLUSH_BYTES, "pieces are bounded");
            g.0.extend_from_slice(bytes);
            g.1 += 1;
        }
    }

    #[test]
    fn invocation_logs_stream_to_the_sink_and_keep_a_bounded_tail() {
        let sink = Arc::new(Collect(Mutex::new((Vec::new(), 0))));
        let mut log = InvLog::new(Some(LogTarget(sink.clone())));
        let mut expected = Vec::new();
        // 20 MB of output in uneven pieces, lines of varying length.
        for i in 0..20_000u32 {
            let line = format!("{i} {}\n", "x".repeat((i % 2000) as usize));
            log.push(line.as_bytes());
            expected.extend_from_slice(line.as_bytes());
            assert!(log.pending.len() <= LOG_FLUSH_BYTES);
            assert!(log.tail.len() <= 2 * LOG_TAIL_BYTES);
        }
        log.push_str("REPORT end\n");
        expected.extend_from_slice(b"REPORT end\n");
        let tail = log.finish();
        let g = sink.0.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(g.0, expected, "the sink got every byte, in order");
        assert!(g.1 > 100, "in many pieces: {}", g.1);
        assert!(tail.len() <= LOG_TAIL_BYTES);
        assert!(tail.ends_with("REPORT end\n"));
    }

    #[test]
    fn without_a_sink_only_the_tail_is_kept() {
        let mut log = InvLog::new(None);
        for _ in 0..1000 {
            log.push(&[b'y'; 10_000]);
        }
        assert!(log.pending.is_empty());
        assert!(log.tail.len() <= 2 * LOG_TAIL_BYTES);
        assert_eq!(log.finish().len(), LOG_TAIL_BYTES);
    }

    #[test]
    fn pool_keys_give_back_their_function_and_revision() {
        assert_eq!(
            name_and_revision("f\u{0}$LATEST\u{0}rev-1"),
            Some(("f", "rev-1"))
        );
        assert_eq!(name_and_revision("f\u{0}3"), None);
    }

    #[test]
    fn civil_dates() {
        let d = chrono_day();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
        assert!(chrono_now_iso().ends_with('Z'));
    }

    #[test]
    fn python_functions_with_layers_search_the_layers() {
        let spec = |runtime: &str, layers: Vec<String>, env: &[(&str, &str)]| FunctionSpec {
            name: "f".into(),
            version: "$LATEST".into(),
            arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            runtime: runtime.into(),
            handler: "app.handler".into(),
            memory_mb: 128,
            timeout_s: 3,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            code_sha256: String::new(),
            layers,
            revision_id: "r".into(),
            snap_start: false,
            ephemeral_storage_mb: 512,
            egress: true,
        };
        let pythonpath = |s: &FunctionSpec| {
            lambda_env(s, "us-east-1", "on-demand")
                .into_iter()
                .filter(|kv| kv.starts_with("PYTHONPATH="))
                .collect::<Vec<_>>()
        };
        let one = vec!["bGF5ZXI=".to_string()];
        assert_eq!(
            pythonpath(&spec("python3.13", one.clone(), &[])),
            ["PYTHONPATH=/opt/python/lib/python3.13/site-packages:/opt/python"]
        );
        assert!(
            pythonpath(&spec("python3.11", vec![], &[])).is_empty(),
            "no layers"
        );
        assert!(pythonpath(&spec("provided.al2023", one.clone(), &[])).is_empty());
        assert_eq!(
            pythonpath(&spec("python3.11", one, &[("PYTHONPATH", "/mine")])),
            ["PYTHONPATH=/mine"],
            "the function's own value stays"
        );
    }

    #[test]
    fn lambda_env_sets_platform_vars_and_user_vars_cannot_override_them() {
        let mut spec = FunctionSpec {
            name: "f".into(),
            version: "$LATEST".into(),
            arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            runtime: "python3.11".into(),
            handler: "app.handler".into(),
            memory_mb: 256,
            timeout_s: 3,
            env: Default::default(),
            code_sha256: String::new(),
            layers: Vec::new(),
            revision_id: "r".into(),
            snap_start: false,
            ephemeral_storage_mb: 512,
            egress: true,
        };
        spec.env.insert("GREETING".into(), "hi".into());
        spec.env.insert("AWS_REGION".into(), "evil".into());
        let env = lambda_env(&spec, "eu-west-1", "on-demand");
        assert!(env.contains(&"GREETING=hi".to_string()));
        assert!(env.contains(&"AWS_REGION=eu-west-1".to_string()));
        assert!(!env.contains(&"AWS_REGION=evil".to_string()));
        assert!(env.contains(&"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=256".to_string()));
        assert!(env.contains(&"AWS_EXECUTION_ENV=AWS_Lambda_python3.11".to_string()));
        let mut custom = spec.clone();
        custom.runtime = "provided.al2023".into();
        let custom_env = lambda_env(&custom, "eu-west-1", "on-demand");
        assert!(
            !custom_env
                .iter()
                .any(|e| e.starts_with("AWS_EXECUTION_ENV="))
        );
        assert!(custom_env.contains(&"LAMBDA_TASK_ROOT=/var/task".to_string()));
        assert!(
            env.iter()
                .any(|e| e.starts_with("AWS_LAMBDA_LOG_STREAM_NAME=") && e.contains("[$LATEST]"))
        );
        assert!(
            !env.iter()
                .any(|e| e.starts_with("AWS_LAMBDA_MAX_CONCURRENCY"))
        );
        assert!(env.contains(&"TZ=:UTC".to_string()));
        // A function's own TZ, LANG, PATH or LD_LIBRARY_PATH replaces Lambda's; the task root
        // stays Lambda's.
        let mut own = spec.clone();
        own.env.insert("TZ".into(), "Europe/Paris".into());
        own.env
            .insert("PATH".into(), "/var/task/bin:/usr/bin".into());
        own.env
            .insert("LAMBDA_TASK_ROOT".into(), "/elsewhere".into());
        let own_env = lambda_env(&own, "eu-west-1", "on-demand");
        let values = |key: &str| {
            own_env
                .iter()
                .filter_map(|e| e.strip_prefix(&format!("{key}=")))
                .collect::<Vec<_>>()
        };
        assert_eq!(values("TZ"), ["Europe/Paris"]);
        assert_eq!(values("PATH"), ["/var/task/bin:/usr/bin"]);
        assert_eq!(values("LANG"), ["C.UTF-8"]);
        assert_eq!(values("LAMBDA_TASK_ROOT"), ["/var/task"]);
    }
}
