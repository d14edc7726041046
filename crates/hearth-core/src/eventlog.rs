//! Where the asynchronous queue keeps its events: the [`EventLog`] trait.
//!
//! The front end's queue (`hearth-api`'s `events` module) decides what to store; an event log
//! only stores it, durably, as opaque records: events by sequence number and failed records by
//! event id. Two implementations exist: a redb file on the front end's own disk (the embedded
//! default) and the assignment service's replicated partitions (`hearth-assign`'s
//! `eventlog`), where a commit is durable once a majority of the partition's nodes journaled it.
//!
//! Every operation is idempotent (puts replace, deletes of absent keys do nothing), so a commit
//! whose answer was lost can be sent again.

use async_trait::async_trait;

/// One change to an event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Insert or replace the event with this sequence number.
    Put(u64, Vec<u8>),
    Delete(u64),
    /// Insert or replace a failed record.
    PutFailed(String, Vec<u8>),
    DeleteFailed(String),
}

impl LogOp {
    /// The bytes this operation stores (0 for deletes).
    pub fn stored_bytes(&self) -> u64 {
        match self {
            LogOp::Put(_, b) => b.len() as u64,
            LogOp::PutFailed(id, b) => (id.len() + b.len()) as u64,
            LogOp::Delete(_) | LogOp::DeleteFailed(_) => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    /// Storing would take the log past its bound; nothing was stored.
    #[error("the asynchronous event queue is full: {0}")]
    Full(String),
    /// The store could not be reached or refused; the commit may or may not have landed.
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    /// The log is closed.
    #[error("the event store is closed")]
    Closed,
    #[error("event store: {0}")]
    Failed(String),
}

/// Durable storage of the asynchronous queue. See the module documentation.
#[async_trait]
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// Store `ops` atomically; returns once they are durable. Concurrent commits may share
    /// one write.
    async fn commit(&self, ops: Vec<LogOp>) -> Result<(), EventLogError>;
    /// One event.
    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, EventLogError>;
    /// Every event, in sequence order (read when the queue opens).
    fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, EventLogError>;
    /// Every failed record, in id order.
    fn failed(&self) -> Result<Vec<(String, Vec<u8>)>, EventLogError>;
    fn failed_one(&self, id: &str) -> Result<Option<Vec<u8>>, EventLogError>;
    /// Finish what is being committed and refuse further commits.
    fn close(&self);
}
