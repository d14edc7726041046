//! A client of the assignment service: sends each command to its partition's leader.
//!
//! It remembers the leader of each partition, follows a follower's "the leader is N" answer,
//! and tries the other nodes when one cannot be reached, until a deadline. A command whose
//! reply was lost (the connection broke after sending) may have been applied; the caller gets
//! [`ClientError::Unavailable`] then and must not assume either way (a lease taken that way is
//! never released by this caller and expires with its time to live).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fleet::WorkerReport;
use crate::net::{Conn, NetError, PlaceReply, Reply, Request, Secret, WriteReply};
use crate::node::NodeStatus;
use crate::partition::{Command, LeaseId, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the assignment service has no reachable leader for partition {partition} (last error: {last})"
    )]
    Unavailable { partition: u32, last: String },
    #[error("the assignment service has no partition {0}")]
    NoPartition(u32),
    #[error("node {0}: {1}")]
    Node(String, NetError),
}

/// Connections per node kept for reuse.
const POOL: usize = 16;

/// What a reply means for [`Client::on_leader`].
enum Step<T> {
    Done(T),
    /// Not the leader; the leader's address when known.
    NotLeader(Option<String>),
    /// Try the next node (the message says why).
    Next(String),
}

/// The outcome of [`Client::place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Create the sandbox on this worker.
    Worker { id: String, addr: String },
    /// No live worker can take it.
    NoWorker(String),
    /// The lease is no longer live.
    Rejected(String),
}

struct NodeConns {
    addr: String,
    idle: Mutex<Vec<Conn>>,
}

pub struct Client {
    nodes: Vec<NodeConns>,
    secret: Secret,
    partitions: u32,
    /// Index into `nodes` of each partition's last known leader.
    leaders: Vec<AtomicUsize>,
    timeout: Duration,
}

impl Client {
    /// `addrs`: every assignment node's address (any order).
    pub fn new(addrs: &[String], partitions: u32, secret: Secret, timeout: Duration) -> Self {
        Self {
            nodes: addrs
                .iter()
                .map(|a| NodeConns {
                    addr: a.clone(),
                    idle: Mutex::new(Vec::new()),
                })
                .collect(),
            secret,
            partitions,
            leaders: (0..partitions).map(|_| AtomicUsize::new(0)).collect(),
            timeout,
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition a function belongs to.
    pub fn partition_of(&self, function: &str) -> u32 {
        crate::partition_of(function, self.partitions)
    }

    async fn request(&self, node: usize, req: &Request, ttl: Duration) -> Result<Reply, NetError> {
        let n = &self.nodes[node];
        let pooled = n.idle.lock().ok().and_then(|mut v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            None => Conn::connect(&n.addr, &self.secret, ttl).await?,
        };
        let reply = conn.call(req, ttl).await?;
        if let Ok(mut idle) = n.idle.lock()
            && idle.len() < POOL
        {
            idle.push(conn);
        }
        Ok(reply)
    }

    /// Runs `cmd` on partition `p`'s leader.
    pub async fn call(&self, p: u32, cmd: Command) -> Result<Response, ClientError> {
        let req = Request::Write { partition: p, cmd };
        self.on_leader(p, &req, |reply| match reply {
            Reply::Write(WriteReply::Done(resp)) => Step::Done(resp),
            Reply::Write(WriteReply::NotLeader { leader }) => Step::NotLeader(leader.map(|l| l.1)),
            Reply::Write(WriteReply::Unavailable(m)) => Step::Next(m),
            other => Step::Next(format!("unexpected reply {other:?}")),
        })
        .await
    }

    /// Asks partition `p`'s leader to place the Initializing sandbox of `lease`: the worker it
    /// chose (journaled as `Assign`) or why none could be.
    pub async fn place(
        &self,
        p: u32,
        lease: LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    ) -> Result<Placed, ClientError> {
        let req = Request::Place {
            partition: p,
            lease,
            memory_mb,
            locality,
            avoid,
        };
        self.on_leader(p, &req, |reply| match reply {
            Reply::Place(PlaceReply::Placed { worker, addr }) => {
                Step::Done(Placed::Worker { id: worker, addr })
            }
            Reply::Place(PlaceReply::NoWorker(m)) => Step::Done(Placed::NoWorker(m)),
            Reply::Place(PlaceReply::Rejected(m)) => Step::Done(Placed::Rejected(m)),
            Reply::Place(PlaceReply::NotLeader { leader }) => Step::NotLeader(leader.map(|l| l.1)),
            Reply::Place(PlaceReply::Unavailable(m)) => Step::Next(m),
            other => Step::Next(format!("unexpected reply {other:?}")),
        })
        .await
    }

    /// Sends `req` to partition `p`'s leader, following hints and trying the other nodes until
    /// `decide` has an answer or the client's timeout passes.
    async fn on_leader<T>(
        &self,
        p: u32,
        req: &Request,
        decide: impl Fn(Reply) -> Step<T>,
    ) -> Result<T, ClientError> {
        let hint = self
            .leaders
            .get(p as usize)
            .ok_or(ClientError::NoPartition(p))?;
        let deadline = Instant::now() + self.timeout;
        let mut node = hint.load(Ordering::Relaxed) % self.nodes.len().max(1);
        let mut last = String::from("no node answered");
        let mut backoff = Duration::from_millis(20);
        while Instant::now() < deadline {
            let ttl = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            let reply = match self.request(node, req, ttl).await {
                Ok(Reply::NoPartition(p)) => return Err(ClientError::NoPartition(p)),
                Ok(r) => decide(r),
                Err(e) => Step::Next(e.to_string()),
            };
            match reply {
                Step::Done(v) => {
                    hint.store(node, Ordering::Relaxed);
                    return Ok(v);
                }
                Step::NotLeader(Some(addr)) => {
                    last = format!("{} is not the leader", self.nodes[node].addr);
                    match self.nodes.iter().position(|n| n.addr == addr) {
                        Some(i) if i != node => {
                            node = i;
                            continue;
                        }
                        _ => node = (node + 1) % self.nodes.len(),
                    }
                }
                Step::NotLeader(None) => {
                    last = format!(
                        "{} knows no leader (election under way)",
                        self.nodes[node].addr
                    );
                    node = (node + 1) % self.nodes.len();
                }
                Step::Next(m) => {
                    last = format!("{}: {m}", self.nodes[node].addr);
                    node = (node + 1) % self.nodes.len();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Err(ClientError::Unavailable { partition: p, last })
    }

    /// The live workers, as the first node that answers knows them.
    pub async fn fleet(&self) -> Result<Vec<WorkerReport>, ClientError> {
        let mut last = None;
        for (i, n) in self.nodes.iter().enumerate() {
            match self
                .request(i, &Request::Fleet, Duration::from_secs(2))
                .await
            {
                Ok(Reply::Fleet(w)) => return Ok(w),
                Ok(other) => {
                    last = Some(ClientError::Node(
                        n.addr.clone(),
                        NetError::Io(std::io::Error::other(format!("unexpected reply {other:?}"))),
                    ))
                }
                Err(e) => last = Some(ClientError::Node(n.addr.clone(), e)),
            }
        }
        Err(last.unwrap_or(ClientError::Unavailable {
            partition: 0,
            last: "no nodes configured".into(),
        }))
    }

    /// Sends a worker's heartbeat to every node at once. Answers how many took it and whether
    /// any said this worker run is dead (it must then register under a new id).
    pub async fn heartbeat(&self, report: &WorkerReport, ttl: Duration) -> (usize, bool) {
        let req = Request::Heartbeat(report.clone());
        let calls = (0..self.nodes.len()).map(|i| self.request(i, &req, ttl));
        let mut taken = 0;
        let mut dead = false;
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(Reply::Heartbeat(true)) => taken += 1,
                Ok(Reply::Heartbeat(false)) => dead = true,
                _ => {}
            }
        }
        (taken, dead)
    }

    /// Every reachable node's view of the cluster.
    pub async fn status(&self) -> Vec<Result<NodeStatus, ClientError>> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let r = match self
                .request(i, &Request::Status, Duration::from_secs(2))
                .await
            {
                Ok(Reply::Status(s)) => Ok(s),
                Ok(other) => Err(ClientError::Node(
                    n.addr.clone(),
                    NetError::Io(std::io::Error::other(format!("unexpected reply {other:?}"))),
                )),
                Err(e) => Err(ClientError::Node(n.addr.clone(), e)),
            };
            out.push(r);
        }
        out
    }

    /// The last known leader of each partition (node addresses), for display.
    pub fn leader_hints(&self) -> BTreeMap<u32, String> {
        self.leaders
            .iter()
            .enumerate()
            .filter_map(|(p, i)| {
                self.nodes
                    .get(i.load(Ordering::Relaxed))
                    .map(|n| (p as u32, n.addr.clone()))
            })
            .collect()
    }
}
