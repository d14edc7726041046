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

use crate::net::{Conn, NetError, Reply, Request, Secret, WriteReply};
use crate::node::NodeStatus;
use crate::partition::{Command, Response};

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
        let hint = self
            .leaders
            .get(p as usize)
            .ok_or(ClientError::NoPartition(p))?;
        let deadline = Instant::now() + self.timeout;
        let mut node = hint.load(Ordering::Relaxed) % self.nodes.len().max(1);
        let mut last = String::from("no node answered");
        let mut backoff = Duration::from_millis(20);
        let req = Request::Write { partition: p, cmd };
        while Instant::now() < deadline {
            let ttl = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            match self.request(node, &req, ttl).await {
                Ok(Reply::Write(WriteReply::Done(resp))) => {
                    hint.store(node, Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(Reply::Write(WriteReply::NotLeader {
                    leader: Some((_, addr)),
                })) => {
                    last = format!("{} is not the leader", self.nodes[node].addr);
                    match self.nodes.iter().position(|n| n.addr == addr) {
                        Some(i) if i != node => {
                            node = i;
                            continue;
                        }
                        _ => node = (node + 1) % self.nodes.len(),
                    }
                }
                Ok(Reply::Write(WriteReply::NotLeader { leader: None })) => {
                    last = format!(
                        "{} knows no leader (election under way)",
                        self.nodes[node].addr
                    );
                    node = (node + 1) % self.nodes.len();
                }
                Ok(Reply::Write(WriteReply::Unavailable(m))) => {
                    last = format!("{}: {m}", self.nodes[node].addr);
                    node = (node + 1) % self.nodes.len();
                }
                Ok(Reply::NoPartition(p)) => return Err(ClientError::NoPartition(p)),
                Ok(other) => last = format!("unexpected reply {other:?}"),
                Err(e) => {
                    last = format!("{}: {e}", self.nodes[node].addr);
                    node = (node + 1) % self.nodes.len();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Err(ClientError::Unavailable { partition: p, last })
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
