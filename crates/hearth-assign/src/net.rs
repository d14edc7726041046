//! The cluster's wire: authenticated frames over TCP.
//!
//! Every node and client shares a cluster secret. A connection opens with a handshake in
//! which each side proves it knows the secret without sending it (keyed BLAKE3 over both
//! sides' fresh nonces); a peer that fails is dropped before any request is read. After it,
//! every frame is `[u32 length][32-byte MAC][JSON body]`, the MAC keyed by a per-connection
//! session key and covering the direction and a sequence number, so frames cannot be forged,
//! replayed or reordered by whoever can reach the port. (Frames are authenticated, not
//! encrypted: the cluster's traffic holds sandbox bookkeeping, not user payloads.)

use std::time::Duration;

use openraft::alias::{SnapshotMetaOf, VoteOf};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::TypeConfig;
use crate::partition::{Command, Response};

const MAGIC: &[u8; 16] = b"hearth-cluster-1";
/// The largest frame accepted (a snapshot of a busy partition fits many times over).
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer did not prove it knows the cluster secret")]
    BadPeer,
    #[error("a frame failed its integrity check")]
    BadMac,
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("decoding a frame: {0}")]
    Decode(serde_json::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The cluster secret, stretched into a key.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(material: &[u8]) -> Self {
        Self(blake3::derive_key("hearth cluster secret v1", material))
    }

    fn proof(&self, who: &[u8], cn: &[u8; 32], sn: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(who).update(cn).update(sn);
        h.finalize()
    }

    fn session(&self, cn: &[u8; 32], sn: &[u8; 32]) -> [u8; 32] {
        *self.proof(b"session", cn, sn).as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One authenticated connection (either side).
pub struct Conn {
    stream: TcpStream,
    key: [u8; 32],
    /// `b'c'` on the connecting side, `b's'` on the accepting side.
    me: u8,
    sent: u64,
    received: u64,
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

impl Conn {
    /// Connects to `addr` and runs the client side of the handshake.
    pub async fn connect(addr: &str, secret: &Secret, timeout: Duration) -> Result<Self, NetError> {
        let fut = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| NetError::Connect(addr.to_string(), e))?;
            stream.set_nodelay(true)?;
            let cn = nonce();
            let mut hello = Vec::with_capacity(48);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&cn);
            stream.write_all(&hello).await?;
            let mut sn = [0u8; 32];
            stream.read_exact(&mut sn).await?;
            let mut proof = [0u8; 32];
            stream.read_exact(&mut proof).await?;
            if secret.proof(b"server", &cn, &sn) != blake3::Hash::from_bytes(proof) {
                return Err(NetError::BadPeer);
            }
            stream
                .write_all(secret.proof(b"client", &cn, &sn).as_bytes())
                .await?;
            Ok(Self {
                stream,
                key: secret.session(&cn, &sn),
                me: b'c',
                sent: 0,
                received: 0,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| NetError::Timeout(timeout))?
    }

    /// Runs the server side of the handshake on an accepted stream.
    pub async fn accept(mut stream: TcpStream, secret: &Secret) -> Result<Self, NetError> {
        let timeout = Duration::from_secs(5);
        let fut = async {
            stream.set_nodelay(true)?;
            let mut hello = [0u8; 48];
            stream.read_exact(&mut hello).await?;
            if &hello[..16] != MAGIC {
                return Err(NetError::BadPeer);
            }
            let mut cn = [0u8; 32];
            cn.copy_from_slice(&hello[16..]);
            let sn = nonce();
            let mut out = Vec::with_capacity(64);
            out.extend_from_slice(&sn);
            out.extend_from_slice(secret.proof(b"server", &cn, &sn).as_bytes());
            stream.write_all(&out).await?;
            let mut proof = [0u8; 32];
            stream.read_exact(&mut proof).await?;
            if secret.proof(b"client", &cn, &sn) != blake3::Hash::from_bytes(proof) {
                return Err(NetError::BadPeer);
            }
            Ok(Self {
                stream,
                key: secret.session(&cn, &sn),
                me: b's',
                sent: 0,
                received: 0,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| NetError::Timeout(timeout))?
    }

    fn mac(&self, from: u8, seq: u64, body: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[from]).update(&seq.to_le_bytes()).update(body);
        h.finalize()
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), NetError> {
        let body = serde_json::to_vec(msg).map_err(NetError::Decode)?;
        if body.len() > MAX_FRAME {
            return Err(NetError::TooLarge(body.len()));
        }
        let mac = self.mac(self.me, self.sent, &body);
        self.sent += 1;
        let mut frame = Vec::with_capacity(36 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(mac.as_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, NetError> {
        let mut head = [0u8; 36];
        self.stream.read_exact(&mut head).await?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[..4]);
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(NetError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).await?;
        let peer = if self.me == b'c' { b's' } else { b'c' };
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&head[4..]);
        if self.mac(peer, self.received, &body) != blake3::Hash::from_bytes(mac) {
            return Err(NetError::BadMac);
        }
        self.received += 1;
        serde_json::from_slice(&body).map_err(NetError::Decode)
    }

    /// Sends a request and waits for its reply.
    pub async fn call<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        req: &Q,
        timeout: Duration,
    ) -> Result<A, NetError> {
        tokio::time::timeout(timeout, async {
            self.send(req).await?;
            self.recv().await
        })
        .await
        .map_err(|_| NetError::Timeout(timeout))?
    }
}

/// A request to a node.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Append {
        partition: u32,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        partition: u32,
        rpc: VoteRequest<TypeConfig>,
    },
    Snapshot {
        partition: u32,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMetaOf<TypeConfig>,
        /// base64 on the wire (a JSON array of numbers would be four times the size).
        #[serde(with = "crate::queues::b64")]
        data: Vec<u8>,
    },
    /// A command for a partition's journal (a client's write).
    Write { partition: u32, cmd: Command },
    /// The node's view of its partitions.
    Status,
    /// A worker's heartbeat (workers send one to every node).
    Heartbeat(crate::fleet::WorkerReport),
    /// The live workers the node knows.
    Fleet,
    /// Pick a worker for the Initializing sandbox of `lease` and journal the choice (leader
    /// only).
    Place {
        partition: u32,
        lease: crate::partition::LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    },
}

/// A node's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Append(Result<AppendEntriesResponse<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    Write(WriteReply),
    Status(crate::node::NodeStatus),
    /// The request named a partition this node does not have.
    NoPartition(u32),
    /// false: that worker run was declared dead; it must register under a new id.
    Heartbeat(bool),
    Fleet(Vec<crate::fleet::WorkerReport>),
    Place(PlaceReply),
}

/// The answer to [`Request::Place`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlaceReply {
    /// The sandbox is to be created on `worker`, reached at `addr`.
    Placed {
        worker: String,
        addr: String,
    },
    /// No live worker can take it (the reason says why).
    NoWorker(String),
    /// The lease is not live (expired or released) or the sandbox not Initializing.
    Rejected(String),
    NotLeader {
        leader: Option<(u64, String)>,
    },
    Unavailable(String),
}

/// What became of a client's write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteReply {
    /// Committed by a majority and applied.
    Done(Response),
    /// This node does not lead the partition; the leader it knows of, if any.
    NotLeader { leader: Option<(u64, String)> },
    /// The partition cannot take writes now (no quorum, shutting down).
    Unavailable(String),
}
