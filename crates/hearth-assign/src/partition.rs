//! One partition of the assignment service: its sandboxes, leases, per-function concurrency
//! counts and keep-alive deadlines.
//!
//! A [`Partition`] is the applied state of a Raft group, so it is a deterministic state machine:
//! [`Partition::apply`] is its only mutator, it reads no clock (the leader stamps `now_ms` into
//! every [`Command`]), does no I/O, draws no random numbers and iterates only ordered maps.
//! Applying the same commands in the same order gives the same state on every replica.
//!
//! # Lifecycle
//!
//! ```text
//!            Acquire (cold)           Assign          Started
//!   (none) ─────────────────> Initializing ──> (worker set) ──> Busy
//!                                  │                              │  Release healthy
//!                                  │ Release / lease expiry       v
//!                                  └────────> Dead    Idle <──────┘
//!                                               ^      │  Acquire (warm) -> Busy
//!          Release unhealthy / lease expiry ────┘      │  keep-alive expiry (Tick) -> removed
//! ```
//!
//! Choices this module makes where the commands leave room:
//!
//! - **Counting.** Concurrency counts include every lease in the table, even one whose
//!   `expires_ms` has passed but that no [`Command::Tick`] has removed yet. Ticks are frequent,
//!   and counting a lease until it is removed keeps the limit strict and the state simple.
//!   Renew, Release, Assign and Started, on the other hand, treat such a lease as already gone
//!   (`Rejected { LeaseExpired }`) and leave the cleanup to the Tick.
//! - **Warm order.** "Most recently idled" is the order in which releases were applied (a
//!   sequence number), not `since_ms`, so clocks of successive leaders need not agree.
//! - **Releasing a sandbox that never started** (a lease released while its sandbox is still
//!   Initializing) kills the sandbox whatever `healthy` says: its state is unknown.
//! - **A sandbox without a worker** (Initializing, before Assign) that dies is removed at once
//!   rather than kept as Dead: no worker holds it. Tick still reports it in `destroy` with
//!   `None` as its worker when its lease expires.
//! - **Dead sandboxes** stay in the table (counted in [`Stats::dead`]) until the next Tick,
//!   which removes them and reports them in `destroy`. A Tick that ends a lease marks its
//!   sandbox Dead and removes it in the same step.
//! - **WorkerDead** removes the worker's sandboxes immediately (nothing of a dead worker is kept
//!   as Dead) and reports them all in `destroy`, in case the worker comes back.
//! - **Gone** answers `Expired` with an empty `destroy` (the worker already destroyed the
//!   sandbox) and the lease that ended, if any.
//! - **Renew** never shortens a lease: the new expiry is the later of the old one and
//!   `now_ms + lease_ttl_ms`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::queues::{Blob, QueueOp, Queues};

/// The name of a worker.
pub type WorkerId = String;

/// A sandbox, unique within its partition and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SandboxId(pub u64);

/// A lease, unique within its partition and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// A function revision: name plus the revision id of its immutable configuration+code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FnKey {
    pub function: String,
    pub revision: String,
}

/// The concurrency limits an [`Command::Acquire`] is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The function's reserved concurrency, if set: its leases never exceed it (and do not count
    /// against the unreserved pool). Some(0) means the function is throttled entirely.
    pub reserved: Option<u32>,
    /// This partition's share of the account's unreserved concurrency: leases of all functions
    /// without a reservation, together, never exceed it.
    pub unreserved: u32,
    /// The function's scaling rate (new sandboxes per window), if limited.
    #[serde(default)]
    pub burst: Option<BurstLimit>,
}

/// Lambda's scaling rate: at most `per_window` new sandboxes of one function per `window_ms`
/// (a token bucket that starts full and refills evenly over the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstLimit {
    pub per_window: u32,
    pub window_ms: u64,
}

/// One function's scaling-rate bucket, in thousandths of a sandbox (integer arithmetic, so
/// every replica computes the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    milli: u64,
    at_ms: u64,
    limit: BurstLimit,
}

impl Bucket {
    fn cap(limit: BurstLimit) -> u64 {
        u64::from(limit.per_window).saturating_mul(1000)
    }

    /// Refilled to `now_ms` under `limit` (a changed limit applies from now).
    fn refill(&mut self, limit: BurstLimit, now_ms: u64) {
        let cap = Self::cap(limit);
        let elapsed = now_ms.saturating_sub(self.at_ms);
        let added = elapsed.saturating_mul(cap) / limit.window_ms.max(1);
        self.milli = self.milli.saturating_add(added).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
        self.limit = limit;
    }

    fn full_at(&self, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(self.limit, now_ms);
        b.milli >= Self::cap(self.limit)
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Placement was asked for this sandbox for `lease`; the sandbox's `worker` is None until
    /// `Assign` records where it is being created.
    Initializing { lease: LeaseId },
    /// Warm and free; `expires_ms` is the keep-alive deadline.
    Idle { since_ms: u64, expires_ms: u64 },
    /// Running the invocation that holds `lease`.
    Busy { lease: LeaseId },
    /// Unusable; removed (and reported to be destroyed) by the next Tick.
    Dead,
}

/// One sandbox: a process of one function revision on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: SandboxId,
    pub key: FnKey,
    /// None only while Initializing, before `Assign`.
    pub worker: Option<WorkerId>,
    pub memory_mb: u32,
    pub state: SandboxState,
}

/// An invocation's exclusive hold on one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub sandbox: SandboxId,
    pub function: String,
    pub holder: String,
    pub expires_ms: u64,
    /// Counted against the unreserved pool (the function had no reservation when it was taken).
    pub unreserved: bool,
    /// The id the Acquire that took it carried ([`Command::Acquire`]'s `request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// A change to a partition. Every command carries the leader's time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Take a lease: the most recently idled Idle sandbox of `key` (warm), else a new sandbox in
    /// Initializing (the caller asks placement, then sends Assign). Throttled when the limit is
    /// reached (leases of the function = Initializing + Busy).
    Acquire {
        key: FnKey,
        memory_mb: u32,
        holder: String,
        limits: Limits,
        now_ms: u64,
        lease_ttl_ms: u64,
        /// The caller's id for this acquire. A retry with the same id (the reply was lost, or
        /// the leader changed before answering) gets the lease the first one took while that
        /// lease lives, and takes no second one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
    },
    /// Record the worker chosen for an Initializing sandbox (only valid while its lease is live
    /// and it has no worker yet).
    Assign {
        lease: LeaseId,
        worker: WorkerId,
        now_ms: u64,
    },
    /// The sandbox finished initialising and the lease holder now runs on it:
    /// Initializing -> Busy (same lease).
    Started { lease: LeaseId, now_ms: u64 },
    /// Extend a live lease (long invocations renew).
    Renew {
        lease: LeaseId,
        now_ms: u64,
        lease_ttl_ms: u64,
    },
    /// Return a lease. healthy=true: sandbox -> Idle { since_ms: now, expires_ms: now +
    /// keep_alive_ms }; healthy=false (timeout, crash, OOM, failed init): sandbox -> Dead.
    Release {
        lease: LeaseId,
        healthy: bool,
        keep_alive_ms: u64,
        now_ms: u64,
    },
    /// A worker died (missed heartbeats / failed health checks): every sandbox on it is removed,
    /// every lease on them ends.
    WorkerDead { worker: WorkerId, now_ms: u64 },
    /// Time passes: expired leases end (their sandboxes die), Idle sandboxes past their
    /// keep-alive and Dead sandboxes are removed and reported to be destroyed.
    Tick { now_ms: u64 },
    /// A worker reports it destroyed a sandbox (evicted, crashed): remove it; if it was
    /// Busy/Initializing its lease ends.
    Gone { sandbox: SandboxId, now_ms: u64 },
    /// The worker no longer holds this idle sandbox (it expired or evicted it on its own):
    /// removed if it is still Idle since `since_ms`; otherwise rejected and nothing changes (a
    /// sandbox leased again in the meantime is not touched).
    IdleGone {
        sandbox: SandboxId,
        since_ms: u64,
        now_ms: u64,
    },
    /// Changes to a front end's asynchronous event queue ([`crate::queues`]): applied together,
    /// or refused together (`QueueFull`) when they add bytes past `max_bytes` and delete
    /// nothing.
    Events {
        queue: String,
        ops: Vec<QueueOp>,
        max_bytes: u64,
    },
    /// Everything in a front end's queue, read through the journal (so it reflects every write
    /// acknowledged before it). Changes nothing.
    ReadQueue { queue: String },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Acquire {
                key,
                holder,
                now_ms,
                ..
            } => write!(
                f,
                "acquire {}@{} for {holder} at {now_ms}",
                key.function, key.revision
            ),
            Command::Assign {
                lease,
                worker,
                now_ms,
            } => write!(f, "assign lease {} to {worker} at {now_ms}", lease.0),
            Command::Started { lease, now_ms } => {
                write!(f, "started lease {} at {now_ms}", lease.0)
            }
            Command::Renew { lease, now_ms, .. } => {
                write!(f, "renew lease {} at {now_ms}", lease.0)
            }
            Command::Release {
                lease,
                healthy,
                now_ms,
                ..
            } => {
                let how = if *healthy { "healthy" } else { "unhealthy" };
                write!(f, "release lease {} {how} at {now_ms}", lease.0)
            }
            Command::WorkerDead { worker, now_ms } => {
                write!(f, "worker {worker} dead at {now_ms}")
            }
            Command::Tick { now_ms } => write!(f, "tick at {now_ms}"),
            Command::Gone { sandbox, now_ms } => {
                write!(f, "sandbox {} gone at {now_ms}", sandbox.0)
            }
            Command::IdleGone {
                sandbox, since_ms, ..
            } => write!(f, "idle sandbox {} (since {since_ms}) gone", sandbox.0),
            Command::Events { queue, ops, .. } => {
                write!(f, "{} change(s) to event queue {queue}", ops.len())
            }
            Command::ReadQueue { queue } => write!(f, "read event queue {queue}"),
        }
    }
}

/// Why an Acquire was throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThrottleReason {
    /// The function holds as many leases as its reserved concurrency.
    ReservedFunctionConcurrency,
    /// The function's reserved concurrency is 0.
    ReservedFunctionConcurrencyZero,
    /// A new sandbox would exceed the function's scaling rate ([`Limits::burst`]).
    FunctionScalingRate,
    /// The functions without a reservation hold this partition's whole unreserved share.
    AccountConcurrency,
}

/// Why a command was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    UnknownLease,
    UnknownSandbox,
    WrongState,
    LeaseExpired,
}

/// What applying a command answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Warm: a lease on an Idle sandbox, now Busy.
    Leased {
        lease: LeaseId,
        sandbox: SandboxId,
        worker: WorkerId,
        expires_ms: u64,
    },
    /// Cold: a lease on a new Initializing sandbox; ask placement for a worker and send Assign.
    Place {
        lease: LeaseId,
        sandbox: SandboxId,
        expires_ms: u64,
    },
    Throttled {
        reason: ThrottleReason,
    },
    Ok,
    /// Renew: the new expiry.
    Renewed {
        expires_ms: u64,
    },
    /// Sandboxes the workers should destroy (Tick, WorkerDead) and leases that ended without a
    /// Release (so their holders get clean errors).
    Expired {
        destroy: Vec<(SandboxId, Option<WorkerId>)>,
        leases_ended: Vec<LeaseId>,
    },
    /// The command named a lease or sandbox that does not exist (any more) or is in the wrong
    /// state. Never changes state.
    Rejected {
        reason: RejectReason,
    },
    /// An `Events` batch was refused: the partition's queues would pass their bound.
    QueueFull {
        why: String,
    },
    /// A queue's events and failed records (`ReadQueue`).
    Queue {
        events: Vec<(u64, Blob)>,
        failed: Vec<(String, Blob)>,
    },
}

/// How many sandboxes a partition holds in each state, and its leases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub initializing: u32,
    pub idle: u32,
    pub busy: u32,
    pub dead: u32,
    pub leases: u32,
    /// Asynchronous events queued in the partition (front ends' queues), and their bytes.
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub event_bytes: u64,
}

/// The state of one partition. See the module documentation.
///
/// Serialized (the Raft snapshot) as its sandboxes, leases, id counters and the idle order; the
/// concurrency counts and the idle index are rebuilt, and checked, on deserialization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Snapshot", into = "Snapshot")]
pub struct Partition {
    /// The last sandbox id handed out (ids start at 1).
    last_sandbox: u64,
    /// The last lease id handed out (ids start at 1).
    last_lease: u64,
    /// The last idle sequence number handed out: orders Idle sandboxes by when they idled.
    last_idle: u64,
    sandboxes: BTreeMap<SandboxId, Sandbox>,
    leases: BTreeMap<LeaseId, Lease>,
    /// Leases per function (no zero entries).
    running: BTreeMap<String, u32>,
    /// Leases with `unreserved` set.
    unreserved_in_use: u32,
    /// Idle sandboxes per revision by idle sequence number (last = most recently idled; no
    /// empty entries).
    idle: BTreeMap<FnKey, BTreeMap<u64, SandboxId>>,
    /// The idle sequence number of each Idle sandbox.
    idle_seq: BTreeMap<SandboxId, u64>,
    /// Scaling-rate buckets of functions that started sandboxes recently (a full bucket is
    /// dropped by Tick: it is the same as none).
    burst: BTreeMap<String, Bucket>,
    /// Front ends' asynchronous event queues kept in this partition ([`crate::queues`]).
    queues: Queues,
    /// The live leases taken by Acquires that carried a request id, by that id.
    by_request: BTreeMap<String, LeaseId>,
}

/// The serialized form of a [`Partition`].
#[derive(Serialize, Deserialize)]
struct Snapshot {
    last_sandbox: u64,
    last_lease: u64,
    last_idle: u64,
    sandboxes: Vec<Sandbox>,
    leases: Vec<Lease>,
    /// (idle sequence number, sandbox) of every Idle sandbox.
    idle: Vec<(u64, SandboxId)>,
    #[serde(default)]
    burst: Vec<(String, Bucket)>,
    #[serde(default)]
    queues: Queues,
}

impl From<Partition> for Snapshot {
    fn from(p: Partition) -> Self {
        Snapshot {
            last_sandbox: p.last_sandbox,
            last_lease: p.last_lease,
            last_idle: p.last_idle,
            idle: p.idle_seq.iter().map(|(s, q)| (*q, *s)).collect(),
            sandboxes: p.sandboxes.into_values().collect(),
            leases: p.leases.into_values().collect(),
            burst: p.burst.into_iter().collect(),
            queues: p.queues,
        }
    }
}

impl TryFrom<Snapshot> for Partition {
    type Error = String;

    fn try_from(s: Snapshot) -> Result<Self, String> {
        let mut p = Partition {
            last_sandbox: s.last_sandbox,
            last_lease: s.last_lease,
            last_idle: s.last_idle,
            burst: s.burst.into_iter().collect(),
            queues: s.queues,
            ..Partition::default()
        };
        for sandbox in s.sandboxes {
            let id = sandbox.id;
            if p.sandboxes.insert(id, sandbox).is_some() {
                return Err(format!("sandbox {id:?} appears twice"));
            }
        }
        for lease in s.leases {
            let id = lease.id;
            if p.leases.contains_key(&id) {
                return Err(format!("lease {id:?} appears twice"));
            }
            p.add_lease(lease);
        }
        for (seq, id) in s.idle {
            let key = match p.sandboxes.get(&id) {
                Some(sandbox) => sandbox.key.clone(),
                None => return Err(format!("idle entry names unknown sandbox {id:?}")),
            };
            if p.idle_seq.insert(id, seq).is_some() {
                return Err(format!("sandbox {id:?} idle twice"));
            }
            if p.idle.entry(key).or_default().insert(seq, id).is_some() {
                return Err(format!("idle sequence number {seq} used twice"));
            }
        }
        p.check_invariants()?;
        Ok(p)
    }
}

impl Partition {
    /// An empty partition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one command: the only way a partition changes.
    pub fn apply(&mut self, cmd: Command) -> Response {
        let response = match cmd {
            Command::Acquire {
                key,
                memory_mb,
                holder,
                limits,
                now_ms,
                lease_ttl_ms,
                request,
            } => self.acquire(
                key,
                memory_mb,
                holder,
                limits,
                now_ms,
                lease_ttl_ms,
                request,
            ),
            Command::Assign {
                lease,
                worker,
                now_ms,
            } => self.assign(lease, worker, now_ms),
            Command::Started { lease, now_ms } => self.started(lease, now_ms),
            Command::Renew {
                lease,
                now_ms,
                lease_ttl_ms,
            } => self.renew(lease, now_ms, lease_ttl_ms),
            Command::Release {
                lease,
                healthy,
                keep_alive_ms,
                now_ms,
            } => self.release(lease, healthy, keep_alive_ms, now_ms),
            Command::WorkerDead { worker, now_ms: _ } => self.worker_dead(&worker),
            Command::Tick { now_ms } => self.tick(now_ms),
            Command::Gone { sandbox, now_ms: _ } => self.gone(sandbox),
            Command::IdleGone {
                sandbox, since_ms, ..
            } => match self.sandboxes.get(&sandbox).map(|s| &s.state) {
                Some(SandboxState::Idle { since_ms: s, .. }) if *s == since_ms => {
                    self.gone(sandbox)
                }
                Some(_) => rejected(RejectReason::WrongState),
                None => rejected(RejectReason::UnknownSandbox),
            },
            Command::Events {
                queue,
                ops,
                max_bytes,
            } => match self.queues.apply(&queue, ops, max_bytes) {
                Ok(()) => Response::Ok,
                Err(full) => Response::QueueFull {
                    why: full.to_string(),
                },
            },
            Command::ReadQueue { queue } => {
                let q = self.queues.get(&queue);
                Response::Queue {
                    events: q.events.into_iter().collect(),
                    failed: q.failed.into_iter().collect(),
                }
            }
        };
        debug_assert_eq!(self.check_invariants(), Ok(()));
        response
    }

    pub fn sandbox(&self, id: SandboxId) -> Option<&Sandbox> {
        self.sandboxes.get(&id)
    }

    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every sandbox, by id.
    pub fn sandboxes(&self) -> impl Iterator<Item = &Sandbox> {
        self.sandboxes.values()
    }

    /// Every lease in the table (including expired ones no Tick has removed yet), by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Leases held by a function now (Initializing + Busy).
    pub fn running(&self, function: &str) -> u32 {
        self.running.get(function).copied().unwrap_or(0)
    }

    /// Leases counted against the unreserved pool now.
    pub fn unreserved_in_use(&self) -> u32 {
        self.unreserved_in_use
    }

    /// The id the next lease will get: every lease handed out so far has a smaller one.
    pub fn next_lease_id(&self) -> LeaseId {
        LeaseId(self.last_lease + 1)
    }

    /// The id the next sandbox will get: every sandbox made so far has a smaller one.
    pub fn next_sandbox_id(&self) -> SandboxId {
        SandboxId(self.last_sandbox + 1)
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            leases: count(self.leases.len()),
            events: self.queues.events(),
            event_bytes: self.queues.bytes(),
            ..Stats::default()
        };
        for sandbox in self.sandboxes.values() {
            match sandbox.state {
                SandboxState::Initializing { .. } => stats.initializing += 1,
                SandboxState::Idle { .. } => stats.idle += 1,
                SandboxState::Busy { .. } => stats.busy += 1,
                SandboxState::Dead => stats.dead += 1,
            }
        }
        stats
    }

    /// Checks every invariant: each Busy/Initializing sandbox has exactly one lease pointing at
    /// it and vice versa; no sandbox is referenced by two leases; a sandbox has no worker only
    /// while Initializing; ids are below the counters; the counts equal a recount from the lease
    /// table; the idle index holds exactly the Idle sandboxes.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.queues.check_invariants()?;
        let mut referenced = BTreeSet::new();
        let mut running: BTreeMap<String, u32> = BTreeMap::new();
        let mut unreserved = 0u32;
        for (id, lease) in &self.leases {
            if lease.id != *id {
                return Err(format!("lease {id:?} stored as {:?}", lease.id));
            }
            if id.0 == 0 || id.0 > self.last_lease {
                return Err(format!(
                    "lease {id:?} beyond the counter {}",
                    self.last_lease
                ));
            }
            if !referenced.insert(lease.sandbox) {
                return Err(format!("sandbox {:?} held by two leases", lease.sandbox));
            }
            let Some(sandbox) = self.sandboxes.get(&lease.sandbox) else {
                return Err(format!(
                    "lease {id:?} holds unknown sandbox {:?}",
                    lease.sandbox
                ));
            };
            match sandbox.state {
                SandboxState::Initializing { lease: l } | SandboxState::Busy { lease: l }
                    if l == *id => {}
                ref other => {
                    return Err(format!(
                        "lease {id:?} holds sandbox {:?} in state {other:?}",
                        lease.sandbox
                    ));
                }
            }
            if sandbox.key.function != lease.function {
                return Err(format!(
                    "lease {id:?} of {} holds a sandbox of {}",
                    lease.function, sandbox.key.function
                ));
            }
            *running.entry(lease.function.clone()).or_default() += 1;
            if lease.unreserved {
                unreserved += 1;
            }
            if let Some(r) = &lease.request
                && self.by_request.get(r) != Some(id)
            {
                return Err(format!("lease {id:?} of request {r} is not indexed"));
            }
        }
        if self.by_request.len() != self.leases.values().filter(|l| l.request.is_some()).count() {
            return Err("the request index names leases that are gone".into());
        }
        if running != self.running {
            return Err(format!(
                "running counts {:?} but the leases give {running:?}",
                self.running
            ));
        }
        if unreserved != self.unreserved_in_use {
            return Err(format!(
                "unreserved in use {} but the leases give {unreserved}",
                self.unreserved_in_use
            ));
        }

        let mut idle = BTreeSet::new();
        for (id, sandbox) in &self.sandboxes {
            if sandbox.id != *id {
                return Err(format!("sandbox {id:?} stored as {:?}", sandbox.id));
            }
            if id.0 == 0 || id.0 > self.last_sandbox {
                return Err(format!(
                    "sandbox {id:?} beyond the counter {}",
                    self.last_sandbox
                ));
            }
            match sandbox.state {
                SandboxState::Initializing { lease } | SandboxState::Busy { lease } => {
                    match self.leases.get(&lease) {
                        Some(l) if l.sandbox == *id => {}
                        _ => return Err(format!("sandbox {id:?} names lease {lease:?}, not its")),
                    }
                }
                SandboxState::Idle { .. } => {
                    idle.insert(*id);
                }
                SandboxState::Dead => {}
            }
            let initializing = matches!(sandbox.state, SandboxState::Initializing { .. });
            if sandbox.worker.is_none() && !initializing {
                return Err(format!(
                    "sandbox {id:?} has no worker but is {:?}",
                    sandbox.state
                ));
            }
        }

        let mut indexed = BTreeSet::new();
        for (key, by_seq) in &self.idle {
            if by_seq.is_empty() {
                return Err(format!("empty idle entry for {key:?}"));
            }
            for (seq, id) in by_seq {
                if *seq == 0 || *seq > self.last_idle {
                    return Err(format!("idle sequence number {seq} beyond the counter"));
                }
                if self.idle_seq.get(id) != Some(seq) {
                    return Err(format!(
                        "idle index and sequence numbers disagree on {id:?}"
                    ));
                }
                match self.sandboxes.get(id) {
                    Some(s) if s.key == *key => {}
                    _ => return Err(format!("idle index has {id:?} under {key:?}")),
                }
                if !indexed.insert(*id) {
                    return Err(format!("sandbox {id:?} indexed twice"));
                }
            }
        }
        if indexed.len() != self.idle_seq.len() {
            return Err("idle sequence numbers name sandboxes the index lacks".into());
        }
        if indexed != idle {
            return Err(format!(
                "idle index {indexed:?} but the Idle sandboxes are {idle:?}"
            ));
        }
        Ok(())
    }

    /// What an Acquire with request id `request` answered, if the lease it took still lives
    /// (a retry of it changes nothing).
    fn replay(&self, request: &str, holder: &str, now_ms: u64) -> Option<Response> {
        let lease = self.leases.get(self.by_request.get(request)?)?;
        if lease.holder != holder || now_ms > lease.expires_ms {
            return None;
        }
        let sandbox = self.sandboxes.get(&lease.sandbox)?;
        match (&sandbox.state, &sandbox.worker) {
            (SandboxState::Busy { .. }, Some(worker)) => Some(Response::Leased {
                lease: lease.id,
                sandbox: sandbox.id,
                worker: worker.clone(),
                expires_ms: lease.expires_ms,
            }),
            (SandboxState::Initializing { .. }, _) => Some(Response::Place {
                lease: lease.id,
                sandbox: sandbox.id,
                expires_ms: lease.expires_ms,
            }),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        key: FnKey,
        memory_mb: u32,
        holder: String,
        limits: Limits,
        now_ms: u64,
        lease_ttl_ms: u64,
        request: Option<String>,
    ) -> Response {
        if let Some(again) = request
            .as_ref()
            .and_then(|r| self.replay(r, &holder, now_ms))
        {
            return again;
        }
        // An id already in use (by another holder) is not this caller's to share.
        let request = request.filter(|r| !self.by_request.contains_key(r));
        match limits.reserved {
            Some(0) => {
                return Response::Throttled {
                    reason: ThrottleReason::ReservedFunctionConcurrencyZero,
                };
            }
            Some(reserved) if self.running(&key.function) >= reserved => {
                return Response::Throttled {
                    reason: ThrottleReason::ReservedFunctionConcurrency,
                };
            }
            None if self.unreserved_in_use >= limits.unreserved => {
                return Response::Throttled {
                    reason: ThrottleReason::AccountConcurrency,
                };
            }
            _ => {}
        }

        let warm = self.warm_pick(&key, now_ms);
        if warm.is_none()
            && let Some(limit) = limits.burst
        {
            let bucket = self.burst.entry(key.function.clone()).or_insert(Bucket {
                milli: Bucket::cap(limit),
                at_ms: now_ms,
                limit,
            });
            bucket.refill(limit, now_ms);
            if bucket.milli < 1000 {
                return Response::Throttled {
                    reason: ThrottleReason::FunctionScalingRate,
                };
            }
            bucket.milli -= 1000;
        }
        self.last_lease += 1;
        let lease = LeaseId(self.last_lease);
        let expires_ms = now_ms.saturating_add(lease_ttl_ms);
        let (sandbox, response) = match warm {
            Some((sandbox, worker)) => {
                self.remove_idle(sandbox);
                if let Some(s) = self.sandboxes.get_mut(&sandbox) {
                    s.state = SandboxState::Busy { lease };
                }
                let response = Response::Leased {
                    lease,
                    sandbox,
                    worker,
                    expires_ms,
                };
                (sandbox, response)
            }
            None => {
                self.last_sandbox += 1;
                let sandbox = SandboxId(self.last_sandbox);
                self.sandboxes.insert(
                    sandbox,
                    Sandbox {
                        id: sandbox,
                        key: key.clone(),
                        worker: None,
                        memory_mb,
                        state: SandboxState::Initializing { lease },
                    },
                );
                let response = Response::Place {
                    lease,
                    sandbox,
                    expires_ms,
                };
                (sandbox, response)
            }
        };
        self.add_lease(Lease {
            id: lease,
            sandbox,
            function: key.function,
            holder,
            expires_ms,
            unreserved: limits.reserved.is_none(),
            request,
        });
        response
    }

    /// The most recently idled sandbox of `key` that is still within its keep-alive and has a
    /// worker.
    fn warm_pick(&self, key: &FnKey, now_ms: u64) -> Option<(SandboxId, WorkerId)> {
        let by_seq = self.idle.get(key)?;
        by_seq.values().rev().find_map(|id| {
            let sandbox = self.sandboxes.get(id)?;
            match (&sandbox.state, &sandbox.worker) {
                (SandboxState::Idle { expires_ms, .. }, Some(worker)) if *expires_ms >= now_ms => {
                    Some((*id, worker.clone()))
                }
                _ => None,
            }
        })
    }

    /// The lease `id` if it exists and has not expired at `now_ms`.
    fn live_lease(&self, id: LeaseId, now_ms: u64) -> Result<&Lease, RejectReason> {
        let lease = self.leases.get(&id).ok_or(RejectReason::UnknownLease)?;
        if now_ms > lease.expires_ms {
            return Err(RejectReason::LeaseExpired);
        }
        Ok(lease)
    }

    /// The live lease `id` and its sandbox, which must exist.
    fn live_lease_and_sandbox(
        &self,
        id: LeaseId,
        now_ms: u64,
    ) -> Result<(&Lease, &Sandbox), RejectReason> {
        let lease = self.live_lease(id, now_ms)?;
        let sandbox = self
            .sandboxes
            .get(&lease.sandbox)
            .ok_or(RejectReason::UnknownSandbox)?;
        Ok((lease, sandbox))
    }

    fn assign(&mut self, lease: LeaseId, worker: WorkerId, now_ms: u64) -> Response {
        let sandbox = match self.live_lease_and_sandbox(lease, now_ms) {
            Ok((_, sandbox)) => match (&sandbox.state, &sandbox.worker) {
                (SandboxState::Initializing { lease: l }, None) if *l == lease => sandbox.id,
                _ => return rejected(RejectReason::WrongState),
            },
            Err(reason) => return rejected(reason),
        };
        if let Some(s) = self.sandboxes.get_mut(&sandbox) {
            s.worker = Some(worker);
        }
        Response::Ok
    }

    fn started(&mut self, lease: LeaseId, now_ms: u64) -> Response {
        let sandbox = match self.live_lease_and_sandbox(lease, now_ms) {
            Ok((_, sandbox)) => match (&sandbox.state, &sandbox.worker) {
                (SandboxState::Initializing { lease: l }, Some(_)) if *l == lease => sandbox.id,
                _ => return rejected(RejectReason::WrongState),
            },
            Err(reason) => return rejected(reason),
        };
        if let Some(s) = self.sandboxes.get_mut(&sandbox) {
            s.state = SandboxState::Busy { lease };
        }
        Response::Ok
    }

    fn renew(&mut self, lease: LeaseId, now_ms: u64, lease_ttl_ms: u64) -> Response {
        if let Err(reason) = self.live_lease(lease, now_ms) {
            return rejected(reason);
        }
        match self.leases.get_mut(&lease) {
            Some(l) => {
                l.expires_ms = l.expires_ms.max(now_ms.saturating_add(lease_ttl_ms));
                Response::Renewed {
                    expires_ms: l.expires_ms,
                }
            }
            None => rejected(RejectReason::UnknownLease),
        }
    }

    fn release(
        &mut self,
        lease: LeaseId,
        healthy: bool,
        keep_alive_ms: u64,
        now_ms: u64,
    ) -> Response {
        let (sandbox, started) = match self.live_lease_and_sandbox(lease, now_ms) {
            Ok((_, sandbox)) => match sandbox.state {
                SandboxState::Busy { lease: l } if l == lease => (sandbox.id, true),
                SandboxState::Initializing { lease: l } if l == lease => (sandbox.id, false),
                _ => return rejected(RejectReason::WrongState),
            },
            Err(reason) => return rejected(reason),
        };
        self.take_lease(lease);
        if healthy && started {
            self.make_idle(sandbox, now_ms, now_ms.saturating_add(keep_alive_ms));
        } else {
            self.kill(sandbox);
        }
        Response::Ok
    }

    fn worker_dead(&mut self, worker: &str) -> Response {
        let on_worker: Vec<SandboxId> = self
            .sandboxes
            .values()
            .filter(|s| s.worker.as_deref() == Some(worker))
            .map(|s| s.id)
            .collect();
        let mut destroy = Vec::with_capacity(on_worker.len());
        let mut leases_ended = Vec::new();
        for id in on_worker {
            if let Some((sandbox, ended)) = self.remove_sandbox(id) {
                leases_ended.extend(ended);
                destroy.push((id, sandbox.worker));
            }
        }
        leases_ended.sort();
        Response::Expired {
            destroy,
            leases_ended,
        }
    }

    fn tick(&mut self, now_ms: u64) -> Response {
        self.burst.retain(|_, b| !b.full_at(now_ms));
        let leases_ended: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|l| now_ms > l.expires_ms)
            .map(|l| l.id)
            .collect();
        for id in &leases_ended {
            if let Some(lease) = self.take_lease(*id)
                && let Some(sandbox) = self.sandboxes.get_mut(&lease.sandbox)
            {
                sandbox.state = SandboxState::Dead;
            }
        }
        let doomed: Vec<SandboxId> = self
            .sandboxes
            .values()
            .filter(|s| match s.state {
                SandboxState::Dead => true,
                SandboxState::Idle { expires_ms, .. } => now_ms > expires_ms,
                SandboxState::Initializing { .. } | SandboxState::Busy { .. } => false,
            })
            .map(|s| s.id)
            .collect();
        let mut destroy = Vec::with_capacity(doomed.len());
        for id in doomed {
            if let Some((sandbox, _)) = self.remove_sandbox(id) {
                destroy.push((id, sandbox.worker));
            }
        }
        Response::Expired {
            destroy,
            leases_ended,
        }
    }

    fn gone(&mut self, sandbox: SandboxId) -> Response {
        match self.remove_sandbox(sandbox) {
            Some((_, ended)) => Response::Expired {
                destroy: Vec::new(),
                leases_ended: ended.into_iter().collect(),
            },
            None => rejected(RejectReason::UnknownSandbox),
        }
    }

    /// Puts a lease in the table and counts it.
    fn add_lease(&mut self, lease: Lease) {
        *self.running.entry(lease.function.clone()).or_default() += 1;
        if lease.unreserved {
            self.unreserved_in_use += 1;
        }
        if let Some(r) = &lease.request {
            self.by_request.insert(r.clone(), lease.id);
        }
        self.leases.insert(lease.id, lease);
    }

    /// Takes a lease out of the table and uncounts it; its sandbox is left as it is.
    fn take_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(n) = self.running.get_mut(&lease.function) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&lease.function);
            }
        }
        if lease.unreserved {
            self.unreserved_in_use = self.unreserved_in_use.saturating_sub(1);
        }
        if let Some(r) = &lease.request {
            self.by_request.remove(r);
        }
        Some(lease)
    }

    /// Removes a sandbox, ending its lease if it has one (returned).
    fn remove_sandbox(&mut self, id: SandboxId) -> Option<(Sandbox, Option<LeaseId>)> {
        self.remove_idle(id);
        let sandbox = self.sandboxes.remove(&id)?;
        let ended = match sandbox.state {
            SandboxState::Initializing { lease } | SandboxState::Busy { lease } => {
                self.take_lease(lease).map(|l| l.id)
            }
            SandboxState::Idle { .. } | SandboxState::Dead => None,
        };
        Some((sandbox, ended))
    }

    /// A sandbox whose lease was taken out becomes Dead, or is removed if it has no worker.
    fn kill(&mut self, id: SandboxId) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if sandbox.worker.is_some() {
            sandbox.state = SandboxState::Dead;
        } else {
            self.sandboxes.remove(&id);
        }
    }

    /// A sandbox whose lease was taken out becomes Idle, the most recently idled of its key.
    fn make_idle(&mut self, id: SandboxId, since_ms: u64, expires_ms: u64) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        sandbox.state = SandboxState::Idle {
            since_ms,
            expires_ms,
        };
        self.last_idle += 1;
        let seq = self.last_idle;
        self.idle
            .entry(sandbox.key.clone())
            .or_default()
            .insert(seq, id);
        self.idle_seq.insert(id, seq);
    }

    /// Takes a sandbox out of the idle index (its state is left as it is).
    fn remove_idle(&mut self, id: SandboxId) {
        let Some(seq) = self.idle_seq.remove(&id) else {
            return;
        };
        let Some(key) = self.sandboxes.get(&id).map(|s| &s.key) else {
            return;
        };
        if let Some(by_seq) = self.idle.get_mut(key) {
            by_seq.remove(&seq);
            if by_seq.is_empty() {
                self.idle.remove(key);
            }
        }
    }
}

fn rejected(reason: RejectReason) -> Response {
    Response::Rejected { reason }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: u64 = 1_000;
    const KEEP: u64 = 10_000;

    fn key(function: &str, revision: &str) -> FnKey {
        FnKey {
            function: function.into(),
            revision: revision.into(),
        }
    }

    fn open() -> Limits {
        Limits {
            reserved: None,
            unreserved: 100,
            burst: None,
        }
    }

    fn acquire_with(k: &FnKey, limits: Limits, now_ms: u64, lease_ttl_ms: u64) -> Command {
        Command::Acquire {
            key: k.clone(),
            memory_mb: 128,
            holder: "h".into(),
            limits,
            now_ms,
            lease_ttl_ms,
            request: None,
        }
    }

    fn acquire(p: &mut Partition, k: &FnKey, limits: Limits, now_ms: u64) -> Response {
        p.apply(acquire_with(k, limits, now_ms, TTL))
    }

    #[test]
    fn an_acquire_sent_twice_takes_one_lease() {
        let mut p = Partition::new();
        let k = key("f", "r1");
        let with_id = |now_ms| {
            let mut cmd = acquire_with(&k, open(), now_ms, TTL);
            if let Command::Acquire { request, .. } = &mut cmd {
                *request = Some("abc".into());
            }
            cmd
        };
        let first = p.apply(with_id(100));
        let Response::Place { lease, sandbox, .. } = first.clone() else {
            panic!("expected Place, got {first:?}");
        };
        // The reply was lost; the caller sends it again (a new leader stamps a later time).
        assert_eq!(p.apply(with_id(150)), first);
        assert_eq!(p.running("f"), 1);
        assert_eq!(p.sandboxes().count(), 1);
        // Placed and started: the same retry now reads as a warm lease on that sandbox.
        assert_eq!(assign(&mut p, lease, "w1", 160), Response::Ok);
        assert_eq!(started(&mut p, lease, 170), Response::Ok);
        assert!(matches!(
            p.apply(with_id(180)),
            Response::Leased { lease: l, sandbox: s, .. } if l == lease && s == sandbox
        ));
        assert_eq!(p.running("f"), 1);
        // Once the lease is returned the id is free: the same id is a new acquire.
        assert_eq!(release(&mut p, lease, true, 200), Response::Ok);
        assert!(matches!(
            p.apply(with_id(210)),
            Response::Leased { lease: l, .. } if l != lease
        ));
        // Another holder's acquire with the same id takes its own lease.
        let mut other = with_id(220);
        if let Command::Acquire { holder, .. } = &mut other {
            *holder = "someone else".into();
        }
        assert!(matches!(p.apply(other), Response::Place { .. }));
        assert_eq!(p.running("f"), 2);
        assert_eq!(p.check_invariants(), Ok(()));
    }

    fn assign(p: &mut Partition, lease: LeaseId, worker: &str, now_ms: u64) -> Response {
        p.apply(Command::Assign {
            lease,
            worker: worker.into(),
            now_ms,
        })
    }

    fn started(p: &mut Partition, lease: LeaseId, now_ms: u64) -> Response {
        p.apply(Command::Started { lease, now_ms })
    }

    fn release(p: &mut Partition, lease: LeaseId, healthy: bool, now_ms: u64) -> Response {
        p.apply(Command::Release {
            lease,
            healthy,
            keep_alive_ms: KEEP,
            now_ms,
        })
    }

    fn tick(p: &mut Partition, now_ms: u64) -> Response {
        p.apply(Command::Tick { now_ms })
    }

    #[test]
    fn the_scaling_rate_bounds_new_sandboxes_not_warm_ones_and_refills_evenly() {
        let mut p = Partition::new();
        let k = key("f", "r1");
        let limits = Limits {
            burst: Some(BurstLimit {
                per_window: 3,
                window_ms: 3_000,
            }),
            ..open()
        };
        // Three new sandboxes at once, then the fourth is refused.
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(cold(&mut p, &k, limits, "w", 0));
        }
        assert_eq!(
            acquire(&mut p, &k, limits, 10),
            Response::Throttled {
                reason: ThrottleReason::FunctionScalingRate
            }
        );
        // A warm lease takes no token.
        assert_eq!(release(&mut p, leases[0].0, true, 20), Response::Ok);
        assert!(matches!(
            acquire(&mut p, &k, limits, 30),
            Response::Leased { .. }
        ));
        // One token per second comes back.
        assert!(matches!(
            acquire(&mut p, &k, limits, 900),
            Response::Throttled { .. }
        ));
        assert!(matches!(
            acquire(&mut p, &k, limits, 1_000),
            Response::Place { .. }
        ));
        assert!(matches!(
            acquire(&mut p, &k, limits, 1_100),
            Response::Throttled { .. }
        ));
        // Other functions have their own bucket; without a limit there is none.
        assert!(matches!(
            acquire(&mut p, &key("g", "r1"), limits, 1_100),
            Response::Place { .. }
        ));
        assert!(matches!(
            acquire(&mut p, &k, open(), 1_100),
            Response::Place { .. }
        ));
        p.check_invariants().expect("invariants");
    }

    #[test]
    fn scaling_rate_buckets_survive_a_snapshot_and_full_ones_are_dropped() {
        let mut p = Partition::new();
        let k = key("f", "r1");
        let limits = Limits {
            burst: Some(BurstLimit {
                per_window: 1,
                window_ms: 1_000,
            }),
            ..open()
        };
        cold(&mut p, &k, limits, "w", 0);
        let copy: Partition =
            serde_json::from_slice(&serde_json::to_vec(&p).expect("ser")).expect("de");
        assert_eq!(copy, p);
        let mut copy = copy;
        assert!(matches!(
            acquire(&mut copy, &k, limits, 500),
            Response::Throttled { .. }
        ));
        tick(&mut p, 500);
        assert_eq!(p.burst.len(), 1, "still refilling");
        tick(&mut p, 1_000);
        assert!(p.burst.is_empty(), "full again: dropped");
    }

    /// A cold start through to Busy on `worker`.
    fn cold(
        p: &mut Partition,
        k: &FnKey,
        limits: Limits,
        worker: &str,
        now_ms: u64,
    ) -> (LeaseId, SandboxId) {
        let Response::Place { lease, sandbox, .. } = acquire(p, k, limits, now_ms) else {
            panic!("expected a cold placement");
        };
        assert_eq!(assign(p, lease, worker, now_ms), Response::Ok);
        assert_eq!(started(p, lease, now_ms), Response::Ok);
        (lease, sandbox)
    }

    fn leased(r: Response) -> (LeaseId, SandboxId) {
        match r {
            Response::Leased { lease, sandbox, .. } => (lease, sandbox),
            other => panic!("expected a warm lease, got {other:?}"),
        }
    }

    fn expired(r: Response) -> (Vec<(SandboxId, Option<WorkerId>)>, Vec<LeaseId>) {
        match r {
            Response::Expired {
                destroy,
                leases_ended,
            } => (destroy, leases_ended),
            other => panic!("expected Expired, got {other:?}"),
        }
    }

    fn ok(p: &Partition) {
        assert_eq!(p.check_invariants(), Ok(()));
    }

    #[test]
    fn cold_start_then_release_then_warm_reuse() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let Response::Place {
            lease,
            sandbox,
            expires_ms,
        } = acquire(&mut p, &k, open(), 100)
        else {
            panic!("expected a cold placement");
        };
        assert_eq!(
            (lease, sandbox, expires_ms),
            (LeaseId(1), SandboxId(1), 100 + TTL)
        );
        let s = p.sandbox(sandbox).expect("sandbox");
        assert_eq!(s.state, SandboxState::Initializing { lease });
        assert_eq!((s.worker.as_deref(), s.memory_mb), (None, 128));
        assert_eq!(p.running("f"), 1);
        assert_eq!(p.unreserved_in_use(), 1);
        assert_eq!(
            p.lease(lease).expect("lease"),
            &Lease {
                id: lease,
                sandbox,
                function: "f".into(),
                holder: "h".into(),
                expires_ms: 100 + TTL,
                unreserved: true,
                request: None,
            }
        );

        assert_eq!(assign(&mut p, lease, "w1", 110), Response::Ok);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").worker.as_deref(),
            Some("w1")
        );
        assert_eq!(started(&mut p, lease, 120), Response::Ok);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Busy { lease }
        );
        assert_eq!(p.stats().busy, 1);

        assert_eq!(release(&mut p, lease, true, 200), Response::Ok);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Idle {
                since_ms: 200,
                expires_ms: 200 + KEEP
            }
        );
        assert_eq!(p.running("f"), 0);
        assert_eq!(p.unreserved_in_use(), 0);
        assert!(p.lease(lease).is_none());
        ok(&p);

        let r = acquire(&mut p, &k, open(), 300);
        assert_eq!(
            r,
            Response::Leased {
                lease: LeaseId(2),
                sandbox,
                worker: "w1".into(),
                expires_ms: 300 + TTL,
            }
        );
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Busy { lease: LeaseId(2) }
        );
        assert_eq!(p.running("f"), 1);
        assert_eq!(
            p.stats(),
            Stats {
                busy: 1,
                leases: 1,
                ..Stats::default()
            }
        );
        ok(&p);
    }

    #[test]
    fn warm_reuse_is_lifo() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (l1, s1) = cold(&mut p, &k, open(), "w1", 0);
        let (l2, s2) = cold(&mut p, &k, open(), "w1", 0);
        let (l3, s3) = cold(&mut p, &k, open(), "w2", 0);
        release(&mut p, l1, true, 10);
        release(&mut p, l3, true, 20);
        release(&mut p, l2, true, 30);
        assert_eq!(leased(acquire(&mut p, &k, open(), 40)).1, s2);
        assert_eq!(leased(acquire(&mut p, &k, open(), 40)).1, s3);
        assert_eq!(leased(acquire(&mut p, &k, open(), 40)).1, s1);
        assert!(matches!(
            acquire(&mut p, &k, open(), 40),
            Response::Place { .. }
        ));
        ok(&p);
    }

    #[test]
    fn warm_order_is_release_order_even_at_equal_times() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (l1, s1) = cold(&mut p, &k, open(), "w1", 0);
        let (l2, _) = cold(&mut p, &k, open(), "w1", 0);
        release(&mut p, l2, true, 10);
        release(&mut p, l1, true, 10);
        assert_eq!(leased(acquire(&mut p, &k, open(), 10)).1, s1);
    }

    #[test]
    fn warm_pick_needs_the_exact_revision_and_a_live_keep_alive() {
        let mut p = Partition::new();
        let (l1, s1) = cold(&mut p, &key("f", "1"), open(), "w1", 0);
        release(&mut p, l1, true, 0);
        // Another revision of the same function starts cold.
        let r = acquire(&mut p, &key("f", "2"), open(), 1);
        assert!(
            matches!(r, Response::Place { sandbox, .. } if sandbox != s1),
            "{r:?}"
        );
        // Past the keep-alive (not yet ticked away) the idle sandbox is not handed out.
        let r = acquire(&mut p, &key("f", "1"), open(), KEEP + 1);
        assert!(
            matches!(r, Response::Place { sandbox, .. } if sandbox != s1),
            "{r:?}"
        );
        assert!(matches!(
            p.sandbox(s1).expect("sandbox").state,
            SandboxState::Idle { .. }
        ));
        // At the deadline itself it still is.
        let mut q = Partition::new();
        let (l, s) = cold(&mut q, &key("f", "1"), open(), "w1", 0);
        release(&mut q, l, true, 0);
        assert_eq!(leased(acquire(&mut q, &key("f", "1"), open(), KEEP)).1, s);
        ok(&p);
        ok(&q);
    }

    #[test]
    fn keep_alive_expiry_by_tick_destroys_idle_sandboxes() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (l1, s1) = cold(&mut p, &k, open(), "w1", 0);
        let (l2, s2) = cold(&mut p, &k, open(), "w2", 0);
        release(&mut p, l1, true, 0);
        release(&mut p, l2, true, 500);
        assert_eq!(expired(tick(&mut p, KEEP)), (vec![], vec![]));
        assert_eq!(p.stats().idle, 2);
        assert_eq!(
            expired(tick(&mut p, KEEP + 1)),
            (vec![(s1, Some("w1".into()))], vec![])
        );
        assert!(p.sandbox(s1).is_none());
        assert_eq!(
            expired(tick(&mut p, KEEP + 501)),
            (vec![(s2, Some("w2".into()))], vec![])
        );
        assert_eq!(p.sandboxes().count(), 0);
        assert!(matches!(
            acquire(&mut p, &k, open(), KEEP + 600),
            Response::Place { .. }
        ));
        ok(&p);
    }

    #[test]
    fn lease_expiry_by_tick_kills_the_sandbox_and_frees_the_count() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let limits = Limits {
            reserved: Some(2),
            unreserved: 0,
            burst: None,
        };
        let (busy, s_busy) = cold(&mut p, &k, limits, "w1", 0);
        // An Initializing sandbox with a worker, and one still without.
        let Response::Place {
            lease: init,
            sandbox: s_init,
            ..
        } = acquire(&mut p, &key("g", "1"), open(), 50)
        else {
            panic!("expected a cold placement");
        };
        assign(&mut p, init, "w2", 50);
        let Response::Place {
            lease: unplaced,
            sandbox: s_unplaced,
            ..
        } = acquire(&mut p, &key("g", "1"), open(), 60)
        else {
            panic!("expected a cold placement");
        };
        assert_eq!(
            (p.running("f"), p.running("g"), p.unreserved_in_use()),
            (1, 2, 2)
        );

        // At the expiry itself the lease lives.
        assert_eq!(expired(tick(&mut p, TTL)), (vec![], vec![]));
        assert_eq!(
            expired(tick(&mut p, TTL + 1)),
            (vec![(s_busy, Some("w1".into()))], vec![busy])
        );
        assert!(p.sandbox(s_busy).is_none());
        assert!(p.lease(busy).is_none());
        assert_eq!(p.running("f"), 0);
        assert_eq!(
            expired(tick(&mut p, TTL + 100)),
            (
                vec![(s_init, Some("w2".into())), (s_unplaced, None)],
                vec![init, unplaced]
            )
        );
        assert_eq!((p.running("g"), p.unreserved_in_use()), (0, 0));
        assert_eq!(p.stats(), Stats::default());
        ok(&p);
    }

    #[test]
    fn an_expired_lease_is_rejected_before_the_tick_and_still_counts() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let limits = Limits {
            reserved: Some(1),
            unreserved: 0,
            burst: None,
        };
        let Response::Place { lease, .. } = acquire(&mut p, &k, limits, 0) else {
            panic!("expected a cold placement");
        };
        let before = p.clone();
        let late = TTL + 1;
        let cmds = [
            Command::Assign {
                lease,
                worker: "w1".into(),
                now_ms: late,
            },
            Command::Started {
                lease,
                now_ms: late,
            },
            Command::Renew {
                lease,
                now_ms: late,
                lease_ttl_ms: TTL,
            },
            Command::Release {
                lease,
                healthy: true,
                keep_alive_ms: KEEP,
                now_ms: late,
            },
        ];
        for cmd in cmds {
            assert_eq!(
                p.apply(cmd),
                Response::Rejected {
                    reason: RejectReason::LeaseExpired
                }
            );
            assert_eq!(p, before);
        }
        // Until a Tick removes it, the expired lease still counts.
        assert_eq!(
            acquire(&mut p, &k, limits, late),
            Response::Throttled {
                reason: ThrottleReason::ReservedFunctionConcurrency
            }
        );
        tick(&mut p, late);
        assert!(matches!(
            acquire(&mut p, &k, limits, late),
            Response::Place { .. }
        ));
        ok(&p);
    }

    #[test]
    fn renew_extends_and_never_shortens() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (lease, sandbox) = cold(&mut p, &k, open(), "w1", 0);
        let r = p.apply(Command::Renew {
            lease,
            now_ms: 900,
            lease_ttl_ms: TTL,
        });
        assert_eq!(r, Response::Renewed { expires_ms: 1_900 });
        let r = p.apply(Command::Renew {
            lease,
            now_ms: 950,
            lease_ttl_ms: 10,
        });
        assert_eq!(r, Response::Renewed { expires_ms: 1_900 });
        assert_eq!(expired(tick(&mut p, 1_500)), (vec![], vec![]));
        assert_eq!(p.lease(lease).expect("lease").expires_ms, 1_900);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Busy { lease }
        );
        assert_eq!(expired(tick(&mut p, 1_901)).1, vec![lease]);
        ok(&p);
    }

    #[test]
    fn reserved_concurrency_throttles_the_third_acquire() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let limits = Limits {
            reserved: Some(2),
            unreserved: 0,
            burst: None,
        };
        let (l1, s1) = cold(&mut p, &k, limits, "w1", 0);
        let _ = cold(&mut p, &k, limits, "w1", 0);
        assert_eq!(p.running("f"), 2);
        assert_eq!(p.unreserved_in_use(), 0);
        let before = p.clone();
        assert_eq!(
            acquire(&mut p, &k, limits, 1),
            Response::Throttled {
                reason: ThrottleReason::ReservedFunctionConcurrency
            }
        );
        assert_eq!(p, before);
        // An idle sandbox does not count; a release makes room.
        release(&mut p, l1, true, 2);
        assert_eq!(p.running("f"), 1);
        assert_eq!(leased(acquire(&mut p, &k, limits, 3)).1, s1);
        assert!(matches!(
            acquire(&mut p, &k, limits, 4),
            Response::Throttled { .. }
        ));
        ok(&p);
    }

    #[test]
    fn reserved_zero_throttles_everything() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (lease, _) = cold(&mut p, &k, open(), "w1", 0);
        release(&mut p, lease, true, 0);
        let before = p.clone();
        let zero = Limits {
            reserved: Some(0),
            unreserved: 100,
            burst: None,
        };
        assert_eq!(
            acquire(&mut p, &k, zero, 1),
            Response::Throttled {
                reason: ThrottleReason::ReservedFunctionConcurrencyZero
            }
        );
        assert_eq!(p, before);
        assert_eq!(p.next_lease_id(), LeaseId(2));
    }

    #[test]
    fn the_unreserved_pool_is_shared_by_functions_without_reservations() {
        let mut p = Partition::new();
        let pool = Limits {
            reserved: None,
            unreserved: 3,
            burst: None,
        };
        let (a1, _) = cold(&mut p, &key("a", "1"), pool, "w1", 0);
        let _ = cold(&mut p, &key("a", "1"), pool, "w1", 0);
        let (b1, _) = cold(&mut p, &key("b", "1"), pool, "w1", 0);
        assert_eq!(p.unreserved_in_use(), 3);
        let before = p.clone();
        for f in ["a", "b", "c"] {
            assert_eq!(
                acquire(&mut p, &key(f, "1"), pool, 1),
                Response::Throttled {
                    reason: ThrottleReason::AccountConcurrency
                }
            );
        }
        assert_eq!(p, before);
        // b's release lets a in (cold: b's idle sandbox is of another function).
        release(&mut p, b1, true, 2);
        assert!(matches!(
            acquire(&mut p, &key("a", "1"), pool, 3),
            Response::Place { .. }
        ));
        assert_eq!((p.running("a"), p.running("b")), (3, 0));
        release(&mut p, a1, false, 4);
        assert_eq!(p.unreserved_in_use(), 2);
        ok(&p);
    }

    #[test]
    fn a_reserved_function_does_not_consume_the_unreserved_pool() {
        let mut p = Partition::new();
        let reserved = Limits {
            reserved: Some(5),
            unreserved: 1,
            burst: None,
        };
        let pool = Limits {
            reserved: None,
            unreserved: 1,
            burst: None,
        };
        for _ in 0..3 {
            cold(&mut p, &key("r", "1"), reserved, "w1", 0);
        }
        assert_eq!((p.running("r"), p.unreserved_in_use()), (3, 0));
        assert!(matches!(
            acquire(&mut p, &key("g", "1"), pool, 1),
            Response::Place { .. }
        ));
        assert_eq!(p.unreserved_in_use(), 1);
        assert_eq!(
            acquire(&mut p, &key("g", "1"), pool, 1),
            Response::Throttled {
                reason: ThrottleReason::AccountConcurrency
            }
        );
        // The reserved function is not held back by the full pool.
        assert!(matches!(
            acquire(&mut p, &key("r", "1"), reserved, 1),
            Response::Place { .. }
        ));
        assert!(
            p.leases()
                .filter(|l| l.function == "r")
                .all(|l| !l.unreserved)
        );
        ok(&p);
    }

    #[test]
    fn worker_dead_ends_leases_and_its_sandboxes_are_never_leased_again() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (busy, s_busy) = cold(&mut p, &k, open(), "w1", 0);
        let (idle, s_idle) = cold(&mut p, &k, open(), "w1", 0);
        let (other, s_other) = cold(&mut p, &k, open(), "w2", 0);
        let (dead, s_dead) = cold(&mut p, &k, open(), "w1", 0);
        let Response::Place {
            lease: init,
            sandbox: s_init,
            ..
        } = acquire(&mut p, &k, open(), 0)
        else {
            panic!("expected a cold placement");
        };
        assign(&mut p, init, "w1", 0);
        release(&mut p, other, true, 1);
        release(&mut p, idle, true, 2); // the most recently idled
        release(&mut p, dead, false, 2);

        let r = p.apply(Command::WorkerDead {
            worker: "w1".into(),
            now_ms: 3,
        });
        let w1 = Some(String::from("w1"));
        assert_eq!(
            expired(r),
            (
                vec![
                    (s_busy, w1.clone()),
                    (s_idle, w1.clone()),
                    (s_dead, w1.clone()),
                    (s_init, w1)
                ],
                vec![busy, init]
            )
        );
        assert!(p.sandboxes().all(|s| s.worker.as_deref() == Some("w2")));
        assert_eq!(p.running("f"), 0);
        assert_eq!(
            release(&mut p, busy, true, 4),
            Response::Rejected {
                reason: RejectReason::UnknownLease
            }
        );
        assert_eq!(leased(acquire(&mut p, &k, open(), 5)).1, s_other);
        assert!(matches!(
            acquire(&mut p, &k, open(), 5),
            Response::Place { .. }
        ));
        // A worker with nothing on it.
        assert_eq!(
            expired(p.apply(Command::WorkerDead {
                worker: "w9".into(),
                now_ms: 6
            })),
            (vec![], vec![])
        );
        ok(&p);
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (busy, s_busy) = cold(&mut p, &k, open(), "w1", 0);
        let (idle, s_idle) = cold(&mut p, &k, open(), "w1", 0);
        let Response::Place { lease: fresh, .. } = acquire(&mut p, &k, open(), 0) else {
            panic!("expected a cold placement");
        };
        let Response::Place { lease: placed, .. } = acquire(&mut p, &k, open(), 0) else {
            panic!("expected a cold placement");
        };
        assign(&mut p, placed, "w2", 0);
        // `idle` is released; its sandbox goes to the warm lease `warm`.
        release(&mut p, idle, true, 0);
        let (warm, s_warm) = leased(acquire(&mut p, &k, open(), 0));
        assert_eq!(s_warm, s_idle);
        let unknown = LeaseId(999);
        let cases: Vec<(Command, RejectReason)> = vec![
            (
                Command::Assign {
                    lease: unknown,
                    worker: "w1".into(),
                    now_ms: 1,
                },
                RejectReason::UnknownLease,
            ),
            (
                Command::Started {
                    lease: unknown,
                    now_ms: 1,
                },
                RejectReason::UnknownLease,
            ),
            (
                Command::Renew {
                    lease: unknown,
                    now_ms: 1,
                    lease_ttl_ms: TTL,
                },
                RejectReason::UnknownLease,
            ),
            (
                Command::Release {
                    lease: unknown,
                    healthy: true,
                    keep_alive_ms: KEEP,
                    now_ms: 1,
                },
                RejectReason::UnknownLease,
            ),
            (
                Command::Release {
                    lease: idle,
                    healthy: true,
                    keep_alive_ms: KEEP,
                    now_ms: 1,
                },
                RejectReason::UnknownLease,
            ),
            (
                Command::Gone {
                    sandbox: SandboxId(999),
                    now_ms: 1,
                },
                RejectReason::UnknownSandbox,
            ),
            // Assign twice, to a Busy sandbox, or to a warm lease.
            (
                Command::Assign {
                    lease: placed,
                    worker: "w3".into(),
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
            (
                Command::Assign {
                    lease: busy,
                    worker: "w3".into(),
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
            (
                Command::Assign {
                    lease: warm,
                    worker: "w3".into(),
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
            // Started before Assign, twice, or on a warm lease.
            (
                Command::Started {
                    lease: fresh,
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
            (
                Command::Started {
                    lease: busy,
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
            (
                Command::Started {
                    lease: warm,
                    now_ms: 1,
                },
                RejectReason::WrongState,
            ),
        ];
        for (cmd, reason) in cases {
            let before = p.clone();
            let shown = cmd.to_string();
            assert_eq!(p.apply(cmd), Response::Rejected { reason }, "{shown}");
            assert_eq!(p, before, "{shown}");
        }
        assert_eq!(
            p.sandbox(s_busy).expect("sandbox").state,
            SandboxState::Busy { lease: busy }
        );
        assert!(matches!(
            p.sandbox(s_idle).expect("sandbox").state,
            SandboxState::Busy { .. }
        ));
        ok(&p);
    }

    #[test]
    fn an_unhealthy_release_kills_the_sandbox_until_the_tick_removes_it() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (lease, sandbox) = cold(&mut p, &k, open(), "w1", 0);
        assert_eq!(release(&mut p, lease, false, 10), Response::Ok);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Dead
        );
        assert_eq!(
            p.stats(),
            Stats {
                dead: 1,
                ..Stats::default()
            }
        );
        assert_eq!(p.running("f"), 0);
        assert!(
            matches!(acquire(&mut p, &k, open(), 11), Response::Place { sandbox: s, .. } if s != sandbox)
        );
        let (destroy, ended) = expired(tick(&mut p, 12));
        assert_eq!(destroy, vec![(sandbox, Some("w1".into()))]);
        assert!(ended.is_empty());
        assert!(p.sandbox(sandbox).is_none());
        ok(&p);
    }

    #[test]
    fn releasing_a_sandbox_that_never_started_kills_it() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let Response::Place { lease, sandbox, .. } = acquire(&mut p, &k, open(), 0) else {
            panic!("expected a cold placement");
        };
        assign(&mut p, lease, "w1", 0);
        assert_eq!(release(&mut p, lease, true, 1), Response::Ok);
        assert_eq!(
            p.sandbox(sandbox).expect("sandbox").state,
            SandboxState::Dead
        );
        // Without a worker there is nothing to keep.
        let Response::Place { lease, sandbox, .. } = acquire(&mut p, &k, open(), 2) else {
            panic!("expected a cold placement");
        };
        assert_eq!(release(&mut p, lease, false, 3), Response::Ok);
        assert!(p.sandbox(sandbox).is_none());
        assert_eq!(p.running("f"), 0);
        ok(&p);
    }

    #[test]
    fn idle_gone_removes_only_a_sandbox_still_idle_since_the_same_time() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (a, s_a) = cold(&mut p, &k, open(), "w1", 0);
        let (b, s_b) = cold(&mut p, &k, open(), "w1", 0);
        release(&mut p, a, true, 10);
        release(&mut p, b, true, 20);
        // Sandbox b was leased again and released later: its idle time no longer matches.
        let Response::Leased { lease, sandbox, .. } = acquire(&mut p, &k, open(), 30) else {
            panic!("expected a warm lease");
        };
        assert_eq!(sandbox, s_b);
        let before = p.clone();
        let gone_b = |p: &mut Partition, since_ms| {
            p.apply(Command::IdleGone {
                sandbox: s_b,
                since_ms,
                now_ms: 40,
            })
        };
        assert_eq!(gone_b(&mut p, 20), rejected(RejectReason::WrongState));
        assert_eq!(p, before, "a busy sandbox is not touched");
        release(&mut p, lease, true, 50);
        assert_eq!(gone_b(&mut p, 20), rejected(RejectReason::WrongState));
        assert!(p.sandbox(s_b).is_some());
        let r = p.apply(Command::IdleGone {
            sandbox: s_a,
            since_ms: 10,
            now_ms: 60,
        });
        assert_eq!(expired(r), (vec![], vec![]));
        assert!(p.sandbox(s_a).is_none());
        assert_eq!(gone_b(&mut p, 50), expired_ok());
        assert!(p.sandbox(s_b).is_none());
        assert_eq!(
            p.apply(Command::IdleGone {
                sandbox: s_a,
                since_ms: 10,
                now_ms: 70,
            }),
            rejected(RejectReason::UnknownSandbox)
        );
        ok(&p);
    }

    fn expired_ok() -> Response {
        Response::Expired {
            destroy: vec![],
            leases_ended: vec![],
        }
    }

    #[test]
    fn gone_removes_the_sandbox_and_ends_its_lease() {
        let mut p = Partition::new();
        let k = key("f", "1");
        let (busy, s_busy) = cold(&mut p, &k, open(), "w1", 0);
        let (idle, s_idle) = cold(&mut p, &k, open(), "w1", 0);
        release(&mut p, idle, true, 1);
        let r = p.apply(Command::Gone {
            sandbox: s_busy,
            now_ms: 2,
        });
        assert_eq!(expired(r), (vec![], vec![busy]));
        assert!(p.sandbox(s_busy).is_none() && p.lease(busy).is_none());
        assert_eq!(p.running("f"), 0);
        let r = p.apply(Command::Gone {
            sandbox: s_idle,
            now_ms: 3,
        });
        assert_eq!(expired(r), (vec![], vec![]));
        assert!(p.sandbox(s_idle).is_none());
        assert!(matches!(
            acquire(&mut p, &k, open(), 4),
            Response::Place { .. }
        ));
        ok(&p);
    }

    #[test]
    fn ids_are_monotonic_and_never_reused() {
        let mut p = Partition::new();
        let k = key("f", "1");
        assert_eq!(
            (p.next_lease_id(), p.next_sandbox_id()),
            (LeaseId(1), SandboxId(1))
        );
        let (l1, s1) = cold(&mut p, &k, open(), "w1", 0);
        p.apply(Command::Gone {
            sandbox: s1,
            now_ms: 1,
        });
        let (l2, s2) = cold(&mut p, &k, open(), "w1", 2);
        assert!(l2 > l1 && s2 > s1);
        assert_eq!(
            (p.next_lease_id(), p.next_sandbox_id()),
            (LeaseId(3), SandboxId(3))
        );
        release(&mut p, l2, true, 3);
        let (l3, s3) = leased(acquire(&mut p, &k, open(), 4));
        assert_eq!((l3, s3), (LeaseId(3), s2));
    }

    /// A partition with sandboxes in every state, of two functions and revisions.
    fn varied() -> Partition {
        let mut p = Partition::new();
        let (l, _) = cold(&mut p, &key("f", "1"), open(), "w1", 0);
        release(&mut p, l, true, 1);
        let (l, _) = cold(&mut p, &key("f", "2"), open(), "w2", 0);
        release(&mut p, l, true, 2);
        let (l, _) = cold(&mut p, &key("g", "1"), open(), "w1", 0);
        release(&mut p, l, false, 3);
        let reserved = Limits {
            reserved: Some(3),
            unreserved: 0,
            burst: None,
        };
        cold(&mut p, &key("g", "1"), reserved, "w2", 4);
        acquire(&mut p, &key("f", "1"), open(), 5);
        let Response::Place { lease, .. } = acquire(&mut p, &key("f", "1"), open(), 6) else {
            panic!("expected a cold placement");
        };
        assign(&mut p, lease, "w1", 6);
        p
    }

    #[test]
    fn stats_count_each_state() {
        let p = varied();
        assert_eq!(
            p.stats(),
            Stats {
                initializing: 1,
                idle: 1,
                busy: 2,
                dead: 1,
                leases: 3,
                events: 0,
                event_bytes: 0,
            }
        );
        ok(&p);
    }

    #[test]
    fn serde_round_trip_gives_an_equal_partition() {
        let p = varied();
        let json = serde_json::to_string(&p).expect("serialize");
        let mut q: Partition = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(q, p);
        assert_eq!(serde_json::to_string(&q).expect("serialize"), json);
        // The copy behaves like the original.
        let mut p = p;
        for cmd in [
            acquire_with(&key("f", "1"), open(), 10, TTL),
            acquire_with(&key("f", "2"), open(), 10, TTL),
            Command::Tick { now_ms: 2_000 },
        ] {
            assert_eq!(q.apply(cmd.clone()), p.apply(cmd));
        }
        assert_eq!(q, p);
        let empty: Partition =
            serde_json::from_str(&serde_json::to_string(&Partition::new()).expect("serialize"))
                .expect("deserialize");
        assert_eq!(empty, Partition::new());
    }

    #[test]
    fn an_inconsistent_snapshot_is_refused() {
        let p = varied();
        let mut v = serde_json::to_value(&p).expect("serialize");
        // Forget the leases: Busy sandboxes now point at nothing.
        v["leases"] = serde_json::json!([]);
        assert!(serde_json::from_value::<Partition>(v).is_err());
        let mut v = serde_json::to_value(&p).expect("serialize");
        v["idle"] = serde_json::json!([]);
        assert!(serde_json::from_value::<Partition>(v).is_err());
        let mut v = serde_json::to_value(&p).expect("serialize");
        v["last_lease"] = serde_json::json!(0);
        assert!(serde_json::from_value::<Partition>(v).is_err());
    }

    #[test]
    fn the_same_commands_give_the_same_state() {
        let mut a = varied();
        let mut b = varied();
        assert_eq!(a, b);
        let cmds = vec![
            acquire_with(&key("f", "1"), open(), 10, TTL),
            Command::WorkerDead {
                worker: "w2".into(),
                now_ms: 11,
            },
            Command::Tick { now_ms: 5_000 },
            acquire_with(&key("g", "1"), open(), 5_001, TTL),
        ];
        for cmd in cmds {
            assert_eq!(a.apply(cmd.clone()), b.apply(cmd));
            assert_eq!(a, b);
        }
    }

    #[test]
    fn commands_display_in_one_line() {
        let cmd = acquire_with(&key("f", "1"), open(), 10, TTL);
        assert_eq!(cmd.to_string(), "acquire f@1 for h at 10");
        assert_eq!(Command::Tick { now_ms: 3 }.to_string(), "tick at 3");
    }

    /// A lease or sandbox a random step names, when the step is applied: mostly one the command
    /// fits (a lease in the state the command needs, the n-th modulo how many), sometimes any
    /// that exists, sometimes any id at all (likely gone or never made).
    #[derive(Debug, Clone, Copy)]
    enum Ref {
        Fit(usize),
        Existing(usize),
        Raw(u64),
    }

    /// What state of its sandbox a command is meant for.
    #[derive(Clone, Copy)]
    enum Want {
        Unplaced,
        Placed,
        Busy,
        Held,
    }

    impl Ref {
        fn pick<T: Copy>(self, fit: &[T], all: &[T], raw: fn(u64) -> T) -> T {
            match self {
                Ref::Fit(n) if !fit.is_empty() => fit[n % fit.len()],
                Ref::Fit(n) | Ref::Existing(n) if !all.is_empty() => all[n % all.len()],
                Ref::Fit(n) | Ref::Existing(n) => raw(n as u64 + 1),
                Ref::Raw(id) => raw(id),
            }
        }

        fn lease(self, p: &Partition, want: Want) -> LeaseId {
            let fits = |l: &Lease| {
                let Some(s) = p.sandbox(l.sandbox) else {
                    return false;
                };
                let initializing = matches!(s.state, SandboxState::Initializing { .. });
                match want {
                    Want::Unplaced => initializing && s.worker.is_none(),
                    Want::Placed => initializing && s.worker.is_some(),
                    Want::Busy => matches!(s.state, SandboxState::Busy { .. }),
                    Want::Held => true,
                }
            };
            let fit: Vec<LeaseId> = p.leases().filter(|l| fits(l)).map(|l| l.id).collect();
            let all: Vec<LeaseId> = p.leases().map(|l| l.id).collect();
            self.pick(&fit, &all, LeaseId)
        }

        fn sandbox(self, p: &Partition) -> SandboxId {
            let all: Vec<SandboxId> = p.sandboxes().map(|s| s.id).collect();
            self.pick(&all, &all, SandboxId)
        }
    }

    fn reference() -> impl Strategy<Value = Ref> + Clone {
        prop_oneof![
            5 => (0usize..16).prop_map(Ref::Fit),
            2 => (0usize..16).prop_map(Ref::Existing),
            1 => (0u64..40).prop_map(Ref::Raw),
        ]
    }

    /// One step of a random run: how much time passes, then what is sent.
    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            function: usize,
            revision: usize,
            reserved: Option<u32>,
            unreserved: u32,
            ttl: u64,
            /// A request id from a small set: repeats are retries.
            request: Option<u8>,
        },
        Assign {
            lease: Ref,
            worker: usize,
        },
        Started {
            lease: Ref,
        },
        Renew {
            lease: Ref,
            ttl: u64,
        },
        Release {
            lease: Ref,
            healthy: bool,
            keep_alive: u64,
        },
        WorkerDead {
            worker: usize,
        },
        Tick,
        Gone {
            sandbox: Ref,
        },
        /// A change to one of two event queues: an event of `size` bytes put, or deleted.
        Events {
            queue: usize,
            seq: u64,
            size: usize,
            delete: bool,
        },
        ReadQueue {
            queue: usize,
        },
    }

    const QUEUES: [&str; 2] = ["fe1", "fe2"];

    const FUNCTIONS: [&str; 3] = ["a", "b", "c"];
    const REVISIONS: [&str; 2] = ["1", "2"];
    const WORKERS: [&str; 3] = ["w1", "w2", "w3"];

    fn op() -> impl Strategy<Value = Op> {
        let lease = reference();
        prop_oneof![
            6 => (
                0..FUNCTIONS.len(),
                prop_oneof![4 => Just(0usize), 1 => Just(1usize)],
                prop::option::weighted(0.2, 0u32..4),
                0u32..10,
                1u64..1_000,
                prop::option::weighted(0.5, 0u8..4),
            )
                .prop_map(|(function, revision, reserved, unreserved, ttl, request)| Op::Acquire {
                    function,
                    revision,
                    reserved,
                    unreserved,
                    ttl,
                    request,
                }),
            3 => (lease.clone(), 0..WORKERS.len())
                .prop_map(|(lease, worker)| Op::Assign { lease, worker }),
            4 => lease.clone().prop_map(|lease| Op::Started { lease }),
            1 => (lease.clone(), 1u64..1_000).prop_map(|(lease, ttl)| Op::Renew { lease, ttl }),
            4 => (lease, prop::bool::weighted(0.9), 0u64..2_000).prop_map(
                |(lease, healthy, keep_alive)| Op::Release {
                    lease,
                    healthy,
                    keep_alive,
                }
            ),
            1 => (0..WORKERS.len()).prop_map(|worker| Op::WorkerDead { worker }),
            1 => Just(Op::Tick),
            1 => reference().prop_map(|sandbox| Op::Gone { sandbox }),
            2 => (0..QUEUES.len(), 0u64..6, 0usize..400, prop::bool::weighted(0.3)).prop_map(
                |(queue, seq, size, delete)| Op::Events { queue, seq, size, delete }
            ),
            1 => (0..QUEUES.len()).prop_map(|queue| Op::ReadQueue { queue }),
        ]
    }

    fn to_command(op: &Op, p: &Partition, now_ms: u64) -> Command {
        match op {
            Op::Acquire {
                function,
                revision,
                reserved,
                unreserved,
                ttl,
                request,
            } => {
                let mut cmd = acquire_with(
                    &key(FUNCTIONS[*function], REVISIONS[*revision]),
                    Limits {
                        reserved: *reserved,
                        unreserved: *unreserved,
                        burst: None,
                    },
                    now_ms,
                    *ttl,
                );
                if let Command::Acquire { request: r, .. } = &mut cmd {
                    *r = request.map(|n| format!("req{n}"));
                }
                cmd
            }
            Op::Assign { lease, worker } => Command::Assign {
                lease: lease.lease(p, Want::Unplaced),
                worker: WORKERS[*worker].into(),
                now_ms,
            },
            Op::Started { lease } => Command::Started {
                lease: lease.lease(p, Want::Placed),
                now_ms,
            },
            Op::Renew { lease, ttl } => Command::Renew {
                lease: lease.lease(p, Want::Held),
                now_ms,
                lease_ttl_ms: *ttl,
            },
            Op::Release {
                lease,
                healthy,
                keep_alive,
            } => Command::Release {
                lease: lease.lease(p, Want::Busy),
                healthy: *healthy,
                keep_alive_ms: *keep_alive,
                now_ms,
            },
            Op::WorkerDead { worker } => Command::WorkerDead {
                worker: WORKERS[*worker].into(),
                now_ms,
            },
            Op::Tick => Command::Tick { now_ms },
            Op::Gone { sandbox } => Command::Gone {
                sandbox: sandbox.sandbox(p),
                now_ms,
            },
            Op::Events {
                queue,
                seq,
                size,
                delete,
            } => Command::Events {
                queue: QUEUES[*queue].into(),
                ops: vec![if *delete {
                    QueueOp::Delete(*seq)
                } else {
                    QueueOp::Put(*seq, Blob(vec![1; *size]))
                }],
                max_bytes: 1_000,
            },
            Op::ReadQueue { queue } => Command::ReadQueue {
                queue: QUEUES[*queue].into(),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_runs_keep_the_invariants_and_never_lease_twice(
            steps in prop::collection::vec((0u64..30, op()), 1..150)
        ) {
            let mut p = Partition::new();
            let mut twin = Partition::new();
            // Which lease holds each sandbox, as told by the responses alone.
            let mut held: BTreeMap<SandboxId, LeaseId> = BTreeMap::new();
            let mut now = 0u64;
            for (dt, op) in &steps {
                now += dt;
                let cmd = to_command(op, &p, now);
                let shown = cmd.to_string();
                let before = p.clone();
                let r = p.apply(cmd.clone());
                prop_assert_eq!(&twin.apply(cmd.clone()), &r);
                prop_assert_eq!(p.check_invariants(), Ok(()), "after {}", shown);
                // A retried Acquire (same request id) answers with the lease it took, and
                // changes nothing.
                let replayed = match (&cmd, &r) {
                    (
                        Command::Acquire { request: Some(_), .. },
                        Response::Leased { lease, sandbox, .. } | Response::Place { lease, sandbox, .. },
                    ) => held.get(sandbox) == Some(lease),
                    _ => false,
                };
                if replayed {
                    prop_assert_eq!(&p, &before, "a replayed acquire changed the state");
                    continue;
                }
                match &r {
                    Response::Leased { lease, sandbox, worker, .. } => {
                        prop_assert!(
                            !held.contains_key(sandbox),
                            "{:?} leased to {:?} while {:?} holds it", sandbox, lease, held.get(sandbox)
                        );
                        let s = p.sandbox(*sandbox).expect("leased sandbox");
                        prop_assert_eq!(&s.state, &SandboxState::Busy { lease: *lease });
                        prop_assert_eq!(s.worker.as_ref(), Some(worker));
                        held.insert(*sandbox, *lease);
                    }
                    Response::Place { lease, sandbox, .. } => {
                        prop_assert!(before.sandbox(*sandbox).is_none(), "placed an existing sandbox");
                        prop_assert!(!held.contains_key(sandbox));
                        held.insert(*sandbox, *lease);
                    }
                    Response::Ok => {
                        if let Command::Release { lease, .. } = &cmd {
                            held.retain(|_, l| l != lease);
                        }
                    }
                    Response::Expired { leases_ended, .. } => {
                        held.retain(|_, l| !leases_ended.contains(l));
                    }
                    Response::Rejected { .. }
                    | Response::Throttled { .. }
                    | Response::QueueFull { .. }
                    | Response::Queue { .. } => {
                        prop_assert_eq!(&p, &before, "{:?} changed the state", r);
                    }
                    Response::Renewed { .. } => {}
                }
                // Every lease end was reported: the responses and the table agree.
                let table: BTreeMap<SandboxId, LeaseId> =
                    p.leases().map(|l| (l.sandbox, l.id)).collect();
                prop_assert_eq!(&table, &held);
                let stats = p.stats();
                prop_assert_eq!(
                    (stats.initializing + stats.idle + stats.busy + stats.dead) as usize,
                    p.sandboxes().count()
                );
                prop_assert_eq!(stats.leases, stats.initializing + stats.busy);
                // The queues never pass their bound by a batch that only adds, and event
                // commands leave sandboxes and leases alone.
                if let Command::Events { queue, ops, .. } = &cmd {
                    let new_event = ops.iter().any(|o| matches!(o,
                        QueueOp::Put(seq, _) if !before.queues.get(queue).events.contains_key(seq)));
                    if new_event && r == Response::Ok {
                        prop_assert!(stats.event_bytes <= 1_000, "{:?}", stats);
                    }
                    prop_assert_eq!(p.leases().count(), before.leases().count());
                    prop_assert_eq!(p.sandboxes().count(), before.sandboxes().count());
                }
            }
            prop_assert_eq!(&p, &twin);
            let json = serde_json::to_string(&p).expect("serialize");
            let back: Partition = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(&back, &p);
        }
    }
}
