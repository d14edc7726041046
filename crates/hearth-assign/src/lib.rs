//! hearth's assignment service.
//!
//! Functions hash to partitions ([`partition_of`]). Each partition is a Raft group (openraft)
//! whose journal is a redb file ([`store`]) and whose applied state is a [`partition::Partition`]:
//! the partition's sandboxes, leases, per-function concurrency counts and keep-alive deadlines,
//! changed only by [`partition::Command`]s, deterministic and free of I/O. [`node`] runs a
//! member of every partition behind one authenticated TCP listener ([`net`]); [`client`] finds
//! each partition's leader and follows its hints.

pub mod capacity;
pub mod client;
pub mod eventlog;
pub mod fleet;
pub mod net;
pub mod node;
pub mod partition;
pub mod placement;
pub mod queues;
pub mod remote;
pub mod store;

pub use partition::{Command, Response};

openraft::declare_raft_types!(
    /// The Raft types of an assignment partition.
    pub TypeConfig:
        D = partition::Command,
        R = partition::Response,
);

/// The partition a function's sandboxes and leases live in.
pub fn partition_of(function: &str, partitions: u32) -> u32 {
    let hash = blake3::hash(function.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(head) % u64::from(partitions.max(1))) as u32
}
