//! An assignment node: a member of every partition's Raft group behind one listener.
//!
//! Partition `p`'s journal and snapshot are `<data-dir>/partition-<p>.redb`. The node serves
//! its peers' Raft messages and clients' writes over [`net`](crate::net) on one port. A write
//! reaching a follower is answered with the leader it knows of. Time enters the journal only
//! here: the leader stamps each command with its clock before proposing it, and a ticker on the
//! leader proposes [`Command::Tick`] so expired leases and keep-alives end even when no client
//! writes.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::alias::{SnapshotOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{
    ClientWriteError, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkFactory, RaftNetworkV2, ServerState};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::TypeConfig;
use crate::capacity::{self, Action, Provisioner};
use crate::fleet::{Fleet, ScalePolicy, WorkerReport};
use crate::net::{Conn, NetError, PlaceReply, Reply, Request, Secret, WriteReply};
use crate::partition::{Command, LeaseId, Response, SandboxState, Stats};
use crate::placement::{self, Demand};
use crate::store::{self, StateMachine};

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// An idle sandbox missing from its worker's heartbeat is dropped only when it had been idle
/// this long before the heartbeat was received (it may have become idle after the worker took
/// its report).
const STALE_IDLE_MARGIN_MS: u64 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("opening partition {0}'s journal: {1}")]
    Store(u32, std::io::Error),
    #[error("starting partition {0}'s Raft group: {1}")]
    Raft(u32, String),
    #[error("listening on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("bad Raft timing: {0}")]
    Config(String),
    #[error("initializing partition {0}: {1}")]
    Initialize(u32, String),
}

/// Raft timing (milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// How often the leader proposes a `Tick`.
    pub tick_ms: u64,
    /// A worker silent for this long is dead (see [`crate::fleet`]).
    pub worker_dead_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
            tick_ms: 500,
            worker_dead_ms: 3_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Where to listen (`127.0.0.1:0` picks a port; [`Node::addr`] tells which).
    pub listen: String,
    /// The address peers and clients use to reach this node; `None`: the bound address.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub partitions: u32,
    pub secret: Secret,
    pub timing: Timing,
}

struct Group {
    raft: Raft,
    sm: StateMachine,
    /// Serializes placements: each decides from the state the previous one's `Assign` left.
    placing: tokio::sync::Mutex<()>,
}

pub struct Node {
    id: u64,
    addr: String,
    groups: Vec<Group>,
    secret: Secret,
    stopped: AtomicBool,
    /// The workers this node hears from (soft state: every node gets every heartbeat).
    fleet: std::sync::Mutex<Fleet>,
    /// The capacity manager, when this node may start and stop workers (it acts while it
    /// leads partition 0).
    capacity: std::sync::Mutex<Option<(ScalePolicy, Box<dyn Provisioner>)>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// One partition as a node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub members: Vec<u64>,
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    pub addr: String,
    pub partitions: Vec<PartitionStatus>,
    /// The live workers this node hears from.
    #[serde(default)]
    pub workers: Vec<WorkerReport>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Opens every partition's journal, starts its Raft member and the listener.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<Self>, NodeError> {
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| NodeError::Listen(cfg.listen.clone(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| NodeError::Listen(cfg.listen.clone(), e))?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| NodeError::Store(0, e))?;
        let raft_config = openraft::Config {
            cluster_name: "hearth-assignment".into(),
            heartbeat_interval: cfg.timing.heartbeat_ms,
            election_timeout_min: cfg.timing.election_min_ms,
            election_timeout_max: cfg.timing.election_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
            max_in_snapshot_log_to_keep: 1_000,
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| NodeError::Config(e.to_string()))?,
        );
        let mut groups = Vec::new();
        for p in 0..cfg.partitions {
            let path = cfg.data_dir.join(format!("partition-{p}.redb"));
            let (log, sm) = store::open(&path).map_err(|e| NodeError::Store(p, e))?;
            let net = Network {
                partition: p,
                secret: cfg.secret.clone(),
            };
            let raft = Raft::new(cfg.id, raft_config.clone(), net, log, sm.clone())
                .await
                .map_err(|e| NodeError::Raft(p, e.to_string()))?;
            groups.push(Group {
                raft,
                sm,
                placing: tokio::sync::Mutex::new(()),
            });
        }
        let node = Arc::new(Self {
            id: cfg.id,
            addr,
            groups,
            secret: cfg.secret.clone(),
            stopped: AtomicBool::new(false),
            fleet: std::sync::Mutex::new(Fleet::new(cfg.timing.worker_dead_ms, now_ms())),
            capacity: std::sync::Mutex::new(None),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        let serve = tokio::spawn(serve(listener, Arc::downgrade(&node)));
        let tick = tokio::spawn(tick(Arc::downgrade(&node), cfg.timing.tick_ms));
        if let Ok(mut tasks) = node.tasks.lock() {
            tasks.push(serve);
            tasks.push(tick);
        }
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address peers and clients reach this node at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn partitions(&self) -> u32 {
        self.groups.len() as u32
    }

    /// Makes `members` the voters of every partition that has no membership yet (run once, on
    /// one node, when a cluster is first formed; a partition already initialized is left as it
    /// is).
    pub async fn initialize(&self, members: &BTreeMap<u64, String>) -> Result<(), NodeError> {
        let nodes: BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        for (p, g) in self.groups.iter().enumerate() {
            let p = p as u32;
            if g.raft
                .is_initialized()
                .await
                .map_err(|e| NodeError::Initialize(p, e.to_string()))?
            {
                continue;
            }
            match g.raft.initialize(nodes.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(NodeError::Initialize(p, e.to_string())),
            }
        }
        Ok(())
    }

    /// Proposes `cmd` to partition `p`'s journal, stamped with this node's clock.
    pub async fn write(&self, p: u32, mut cmd: Command) -> WriteReply {
        let Some(g) = self.groups.get(p as usize) else {
            return WriteReply::Unavailable(format!("no partition {p}"));
        };
        if self.stopped.load(Ordering::Relaxed) {
            return WriteReply::Unavailable("the node is stopping".into());
        }
        stamp(&mut cmd, now_ms());
        match g.raft.client_write(cmd).await {
            Ok(resp) => WriteReply::Done(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                WriteReply::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                }
            }
            Err(e) => WriteReply::Unavailable(e.to_string()),
        }
    }

    /// Reads partition `p`'s applied state on this node (it may lag the leader).
    pub async fn read<T>(
        &self,
        p: u32,
        f: impl FnOnce(&crate::partition::Partition) -> T,
    ) -> Option<T> {
        let g = self.groups.get(p as usize)?;
        Some(g.sm.read(f).await)
    }

    pub fn raft(&self, p: u32) -> Option<&Raft> {
        self.groups.get(p as usize).map(|g| &g.raft)
    }

    pub async fn status(&self) -> NodeStatus {
        let mut partitions = Vec::new();
        for (p, g) in self.groups.iter().enumerate() {
            let m = g.raft.metrics().borrow_watched().clone();
            let stats = g.sm.read(|part| part.stats()).await;
            partitions.push(PartitionStatus {
                partition: p as u32,
                state: format!("{:?}", m.state),
                leader: m.current_leader,
                term: m.current_term,
                last_applied: m.last_applied.as_ref().map(|l| l.index),
                members: m.membership_config.membership().voter_ids().collect(),
                stats,
            });
        }
        NodeStatus {
            id: self.id,
            addr: self.addr.clone(),
            partitions,
            workers: self.workers(),
        }
    }

    /// Stops serving and shuts every partition's Raft member down.
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        for g in &self.groups {
            let _ = g.raft.shutdown().await;
        }
    }

    /// Whether this node leads partition `p` now.
    pub fn leads(&self, p: u32) -> bool {
        self.is_leader(p as usize)
    }

    /// A worker's heartbeat; false when that worker run was declared dead.
    pub fn heartbeat(&self, report: WorkerReport) -> bool {
        match self.fleet.lock() {
            Ok(mut f) => {
                let known = f.get(&report.id).is_some();
                let (id, addr) = (report.id.clone(), report.addr.clone());
                let ok = f.heartbeat(report, now_ms());
                if ok && !known {
                    tracing::info!(worker = %id, %addr, "worker registered");
                }
                ok
            }
            Err(_) => false,
        }
    }

    /// Let this node keep the fleet between `policy`'s bounds through `provisioner` (while it
    /// leads partition 0).
    pub fn manage_capacity(&self, policy: ScalePolicy, provisioner: Box<dyn Provisioner>) {
        if let Ok(mut c) = self.capacity.lock() {
            *c = Some((policy, provisioner));
        }
    }

    /// One capacity-manager step, when this node leads partition 0 and manages capacity.
    fn manage_fleet(&self) {
        if !self.is_leader(0) {
            return;
        }
        let live = self.workers();
        let Ok(mut guard) = self.capacity.lock() else {
            return;
        };
        let Some((policy, provisioner)) = guard.as_mut() else {
            return;
        };
        match capacity::step(policy, &live, provisioner.as_mut()) {
            Action::Held => {}
            Action::Started(n) => tracing::info!(workers = live.len(), started = n, "fleet grown"),
            Action::Stopped(w) => {
                tracing::info!(workers = live.len(), stopped = %w, "fleet shrunk")
            }
            Action::Failed(e) => tracing::warn!("capacity manager: {e}"),
        }
    }

    /// Declares every worker that holds sandboxes in this node's partitions dead (`WorkerDead`
    /// in each partition it leads): for a node whose only worker is its own process, at start,
    /// when every worker the journal names is an earlier run. Answers how many were removed.
    pub async fn forget_all_workers(&self) -> usize {
        self.remove_workers(|_| true).await
    }

    /// The live workers this node knows.
    pub fn workers(&self) -> Vec<WorkerReport> {
        self.fleet.lock().map(|f| f.live()).unwrap_or_default()
    }

    /// The leader of partition `p` as (id, address), when known.
    fn leader_of(&self, p: u32) -> Option<(u64, String)> {
        let g = self.groups.get(p as usize)?;
        let m = g.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Placement for the Initializing sandbox of `lease`, decided by the partition's leader from
    /// its state (the function's sandboxes per worker, memory placed and not yet reported) and
    /// the live fleet; the choice is journaled as `Assign` before it is answered.
    pub async fn place(
        &self,
        p: u32,
        lease: LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    ) -> PlaceReply {
        let Some(group) = self.groups.get(p as usize) else {
            return PlaceReply::Unavailable(format!("no partition {p}"));
        };
        let _one_at_a_time = group.placing.lock().await;
        if !self.is_leader(p as usize) {
            return PlaceReply::NotLeader {
                leader: self.leader_of(p),
            };
        }
        let found = self
            .read(p, |part| {
                let function = part.lease(lease)?.function.clone();
                let mut per_worker = BTreeMap::new();
                let mut pending = BTreeMap::new();
                for s in part.sandboxes() {
                    let Some(w) = &s.worker else { continue };
                    if s.key.function == function {
                        *per_worker.entry(w.clone()).or_insert(0u32) += 1;
                    }
                    if matches!(s.state, SandboxState::Initializing { .. }) {
                        *pending.entry(w.clone()).or_insert(0u64) += u64::from(s.memory_mb);
                    }
                }
                Some((per_worker, pending))
            })
            .await
            .flatten();
        let Some((function_sandboxes, pending_mb)) = found else {
            return PlaceReply::Rejected(format!("lease {} is not live", lease.0));
        };
        let workers = self.workers();
        let demand = Demand {
            memory_mb,
            locality,
            function_sandboxes,
            pending_mb,
            avoid,
        };
        let worker = match placement::pick(&workers, &demand) {
            Ok(w) => w,
            Err(e) => return PlaceReply::NoWorker(e.to_string()),
        };
        let addr = workers
            .iter()
            .find(|w| w.id == worker)
            .map(|w| w.addr.clone())
            .unwrap_or_default();
        match self
            .write(
                p,
                Command::Assign {
                    lease,
                    worker: worker.clone(),
                    now_ms: 0,
                },
            )
            .await
        {
            WriteReply::Done(Response::Ok) => PlaceReply::Placed { worker, addr },
            WriteReply::Done(other) => PlaceReply::Rejected(format!("{other:?}")),
            WriteReply::NotLeader { leader } => PlaceReply::NotLeader { leader },
            WriteReply::Unavailable(m) => PlaceReply::Unavailable(m),
        }
    }

    /// The capacity manager's part of a tick: workers silent too long become dead, and every
    /// partition this node leads drops the sandboxes of dead workers (`WorkerDead`), also of a
    /// worker that died before this node became the leader.
    async fn reap_workers(&self) {
        let now = now_ms();
        let newly = match self.fleet.lock() {
            Ok(mut f) => f.tick(now),
            Err(_) => return,
        };
        for w in &newly {
            tracing::warn!(worker = %w, "worker stopped heartbeating: marked dead");
        }
        self.remove_workers(|w| self.fleet.lock().is_ok_and(|f| f.is_dead(w, now)))
            .await;
    }

    /// In every partition this node leads, drops the idle sandboxes their workers no longer
    /// hold (expired or evicted on the worker's own decision), as the workers' last heartbeats
    /// tell ([`crate::fleet::stale_idle`]): so warm leases go where a warm sandbox is.
    async fn drop_stale_idle(&self) {
        let reports = match self.fleet.lock() {
            Ok(f) => f.live_seen(),
            Err(_) => return,
        };
        if reports.iter().all(|(r, _)| r.idle.is_none()) {
            return;
        }
        for p in 0..self.groups.len() {
            if !self.is_leader(p) {
                continue;
            }
            let stale = self
                .read(p as u32, |part| {
                    crate::fleet::stale_idle(part.sandboxes(), &reports, STALE_IDLE_MARGIN_MS)
                        .into_iter()
                        .filter_map(|id| match part.sandbox(id)?.state {
                            SandboxState::Idle { since_ms, .. } => Some((id, since_ms)),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            for (sandbox, since_ms) in stale {
                let cmd = Command::IdleGone {
                    sandbox,
                    since_ms,
                    now_ms: 0,
                };
                if let WriteReply::Done(Response::Expired { .. }) = self.write(p as u32, cmd).await
                {
                    tracing::debug!(
                        partition = p,
                        sandbox = sandbox.0,
                        "an idle sandbox its worker no longer holds removed"
                    );
                }
            }
        }
    }

    /// In every partition this node leads, `WorkerDead` for each worker holding sandboxes there
    /// that `dead` names. Answers how many workers were removed.
    async fn remove_workers(&self, dead: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        for p in 0..self.groups.len() {
            if !self.is_leader(p) {
                continue;
            }
            let on = self
                .read(p as u32, |part| {
                    part.sandboxes()
                        .filter_map(|s| s.worker.clone())
                        .collect::<std::collections::BTreeSet<_>>()
                })
                .await
                .unwrap_or_default();
            for worker in on.into_iter().filter(|w| dead(w)) {
                let cmd = Command::WorkerDead {
                    worker: worker.clone(),
                    now_ms: 0,
                };
                if let WriteReply::Done(Response::Expired {
                    destroy,
                    leases_ended,
                }) = self.write(p as u32, cmd).await
                {
                    removed += 1;
                    tracing::warn!(
                        partition = p,
                        worker = %worker,
                        sandboxes = destroy.len(),
                        leases_ended = leases_ended.len(),
                        "a dead worker's sandboxes removed"
                    );
                }
            }
        }
        removed
    }

    fn is_leader(&self, p: usize) -> bool {
        self.groups
            .get(p)
            .is_some_and(|g| g.raft.metrics().borrow_watched().state == ServerState::Leader)
    }

    async fn handle(&self, req: Request) -> Reply {
        let group = |p: u32| self.groups.get(p as usize);
        match req {
            Request::Append { partition, rpc } => match group(partition) {
                Some(g) => {
                    Reply::Append(g.raft.append_entries(rpc).await.map_err(|e| e.to_string()))
                }
                None => Reply::NoPartition(partition),
            },
            Request::Vote { partition, rpc } => match group(partition) {
                Some(g) => Reply::Vote(g.raft.vote(rpc).await.map_err(|e| e.to_string())),
                None => Reply::NoPartition(partition),
            },
            Request::Snapshot {
                partition,
                vote,
                meta,
                data,
            } => match group(partition) {
                Some(g) => {
                    let snapshot = SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
                        meta,
                        snapshot: Cursor::new(data),
                    };
                    Reply::Snapshot(
                        g.raft
                            .install_full_snapshot(vote, snapshot)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
                None => Reply::NoPartition(partition),
            },
            Request::Write { partition, cmd } => Reply::Write(self.write(partition, cmd).await),
            Request::Status => Reply::Status(self.status().await),
            Request::Heartbeat(report) => Reply::Heartbeat(self.heartbeat(report)),
            Request::Fleet => Reply::Fleet(self.workers()),
            Request::Place {
                partition,
                lease,
                memory_mb,
                locality,
                avoid,
            } => Reply::Place(
                self.place(partition, lease, memory_mb, locality, avoid)
                    .await,
            ),
        }
    }
}

/// Sets the time a command carries.
fn stamp(cmd: &mut Command, now: u64) {
    match cmd {
        Command::Acquire { now_ms, .. }
        | Command::Assign { now_ms, .. }
        | Command::Started { now_ms, .. }
        | Command::Renew { now_ms, .. }
        | Command::Release { now_ms, .. }
        | Command::WorkerDead { now_ms, .. }
        | Command::Tick { now_ms }
        | Command::Gone { now_ms, .. }
        | Command::IdleGone { now_ms, .. } => *now_ms = now,
        Command::Events { .. } | Command::ReadQueue { .. } => {}
    }
}

async fn serve(listener: TcpListener, node: std::sync::Weak<Node>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(n) = node.upgrade() else { return };
        let secret = n.secret.clone();
        drop(n);
        let node = node.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = Conn::accept(stream, &secret).await else {
                return;
            };
            while let Ok(req) = conn.recv::<Request>().await {
                let Some(n) = node.upgrade() else { return };
                let reply = n.handle(req).await;
                drop(n);
                if conn.send(&reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn tick(node: std::sync::Weak<Node>, every_ms: u64) {
    let mut ticks: u64 = 0;
    let mut interval = tokio::time::interval(Duration::from_millis(every_ms.max(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Some(n) = node.upgrade() else { return };
        for p in 0..n.groups.len() {
            if n.is_leader(p) {
                let _ = n.write(p as u32, Command::Tick { now_ms: 0 }).await;
            }
        }
        n.reap_workers().await;
        n.drop_stale_idle().await;
        // The fleet changes slowly: the capacity manager looks every few ticks.
        ticks += 1;
        if ticks.is_multiple_of(4) {
            n.manage_fleet();
        }
    }
}

/// Makes the Raft clients of one partition.
struct Network {
    partition: u32,
    secret: Secret,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Peer {
        Peer {
            partition: self.partition,
            addr: node.addr.clone(),
            secret: self.secret.clone(),
            conn: None,
        }
    }
}

/// Partition `partition`'s Raft messages to one peer, over one connection made on first use
/// and again after any error.
pub struct Peer {
    partition: u32,
    addr: String,
    secret: Secret,
    conn: Option<Conn>,
}

impl Peer {
    async fn call(&mut self, req: Request, ttl: Duration) -> Result<Reply, NetError> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => Conn::connect(&self.addr, &self.secret, ttl).await?,
        };
        let reply = conn.call(&req, ttl).await?;
        self.conn = Some(conn);
        Ok(reply)
    }
}

fn unreachable_err(e: &NetError) -> RPCError<TypeConfig> {
    match e {
        NetError::Connect(..) | NetError::BadPeer => RPCError::Unreachable(Unreachable::new(e)),
        _ => RPCError::Network(NetworkError::new(e)),
    }
}

fn remote_err(msg: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(msg))
}

fn unexpected(reply: Reply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!(
        "unexpected reply: {reply:?}"
    )))
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = Request::Append {
            partition: self.partition,
            rpc,
        };
        match self.call(req, option.soft_ttl()).await {
            Ok(Reply::Append(r)) => r.map_err(remote_err),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(unreachable_err(&e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = Request::Vote {
            partition: self.partition,
            rpc,
        };
        match self.call(req, option.soft_ttl()).await {
            Ok(Reply::Vote(r)) => r.map_err(remote_err),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(unreachable_err(&e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = Request::Snapshot {
            partition: self.partition,
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let ttl = option.hard_ttl();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.call(req, ttl) => match res {
                Ok(Reply::Snapshot(r)) => r.map_err(|m| StreamingError::Network(NetworkError::from_string(m))),
                Ok(other) => Err(StreamingError::Network(NetworkError::from_string(format!("unexpected reply: {other:?}")))),
                Err(e @ (NetError::Connect(..) | NetError::BadPeer)) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }
}

#[async_trait::async_trait]
impl crate::remote::Assignment for Node {
    fn partitions(&self) -> u32 {
        Node::partitions(self)
    }

    async fn call(&self, p: u32, cmd: Command) -> Result<Response, crate::client::ClientError> {
        match self.write(p, cmd).await {
            WriteReply::Done(r) => Ok(r),
            WriteReply::NotLeader { .. } => Err(crate::client::ClientError::Unavailable {
                partition: p,
                last: "this node does not lead the partition".into(),
            }),
            WriteReply::Unavailable(last) => {
                Err(crate::client::ClientError::Unavailable { partition: p, last })
            }
        }
    }

    async fn place(
        &self,
        p: u32,
        lease: LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    ) -> Result<crate::client::Placed, crate::client::ClientError> {
        use crate::client::Placed;
        match Node::place(self, p, lease, memory_mb, locality, avoid).await {
            PlaceReply::Placed { worker, addr } => Ok(Placed::Worker { id: worker, addr }),
            PlaceReply::NoWorker(m) => Ok(Placed::NoWorker(m)),
            PlaceReply::Rejected(m) => Ok(Placed::Rejected(m)),
            PlaceReply::NotLeader { .. } => Err(crate::client::ClientError::Unavailable {
                partition: p,
                last: "this node does not lead the partition".into(),
            }),
            PlaceReply::Unavailable(last) => {
                Err(crate::client::ClientError::Unavailable { partition: p, last })
            }
        }
    }

    async fn fleet(&self) -> Result<Vec<WorkerReport>, crate::client::ClientError> {
        Ok(self.workers())
    }
}
