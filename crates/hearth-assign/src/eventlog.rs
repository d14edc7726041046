//! A front end's asynchronous queue kept in the assignment service: [`ReplicatedLog`], the
//! [`EventLog`] a cluster's front end stores its `Event` invocations in.
//!
//! The queue lives in the partition its name hashes to ([`crate::queues`]), so a commit returns
//! only once a majority of that partition's nodes journaled it: an acknowledged event survives
//! the loss of any one machine, the front end's included. Only the front end that owns a queue
//! writes it, so the log keeps a mirror of the queue in memory for reads: it is filled from a
//! read through the journal at open and changed only by commits the partition applied.
//!
//! A commit that finds no leader (an election under way) is sent again until `retry_for` has
//! passed; its operations are idempotent, so a batch that landed but whose answer was lost does
//! no harm when it lands again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_core::eventlog::{EventLog, EventLogError, LogOp};

use crate::client::ClientError;
use crate::partition::{Command, Response};
use crate::queues::{Queue, QueueOp};
use crate::remote::Assignment;

/// The largest bound a partition's queues may be given: a whole queue is read in one frame of
/// the cluster's wire (64 MiB, base64 inflates by a third).
pub const MAX_QUEUE_BYTES: u64 = 40 << 20;

/// One front end's queue in the assignment service. See the module documentation.
pub struct ReplicatedLog {
    assignment: Arc<dyn Assignment>,
    queue: String,
    partition: u32,
    max_bytes: u64,
    retry_for: Duration,
    mirror: std::sync::Mutex<Queue>,
    closed: AtomicBool,
}

impl std::fmt::Debug for ReplicatedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedLog")
            .field("queue", &self.queue)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl ReplicatedLog {
    /// Opens queue `queue` (created by its first write): reads what it holds through the
    /// journal of its partition, waiting up to `retry_for` for a leader. `max_bytes` bounds the
    /// queues of that partition together (at most [`MAX_QUEUE_BYTES`]).
    pub async fn open(
        assignment: Arc<dyn Assignment>,
        queue: &str,
        max_bytes: u64,
        retry_for: Duration,
    ) -> Result<ReplicatedLog, EventLogError> {
        if queue.is_empty() {
            return Err(EventLogError::Failed("an event queue needs a name".into()));
        }
        if max_bytes > MAX_QUEUE_BYTES {
            return Err(EventLogError::Failed(format!(
                "an event queue bound of {max_bytes} bytes is past the largest, {MAX_QUEUE_BYTES}"
            )));
        }
        let partition = assignment.partition_of(&format!("events/{queue}"));
        let log = ReplicatedLog {
            assignment,
            queue: queue.to_string(),
            partition,
            max_bytes,
            retry_for,
            mirror: std::sync::Mutex::new(Queue::default()),
            closed: AtomicBool::new(false),
        };
        let read = Command::ReadQueue {
            queue: log.queue.clone(),
        };
        match log.send(read).await? {
            Response::Queue { events, failed } => {
                let mut m = log.lock()?;
                m.events = events.into_iter().collect();
                m.failed = failed.into_iter().collect();
            }
            other => {
                return Err(EventLogError::Failed(format!(
                    "reading event queue {queue}: unexpected answer {other:?}"
                )));
            }
        }
        Ok(log)
    }

    /// The partition this queue lives in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Queue>, EventLogError> {
        self.mirror
            .lock()
            .map_err(|_| EventLogError::Failed("the queue's mirror is poisoned".into()))
    }

    /// `cmd` on the queue's partition, sent again while no leader answers, up to `retry_for`.
    async fn send(&self, cmd: Command) -> Result<Response, EventLogError> {
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.assignment.call(self.partition, cmd.clone()).await {
                Ok(r) => return Ok(r),
                Err(e @ ClientError::NoPartition(_)) => {
                    return Err(EventLogError::Failed(e.to_string()));
                }
                Err(e) => {
                    if Instant::now() + pause > deadline {
                        return Err(EventLogError::Unavailable(e.to_string()));
                    }
                    tracing::debug!(queue = %self.queue, "event queue write retried: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

#[async_trait]
impl EventLog for ReplicatedLog {
    async fn commit(&self, ops: Vec<LogOp>) -> Result<(), EventLogError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(EventLogError::Closed);
        }
        let ops: Vec<QueueOp> = ops.into_iter().map(QueueOp::from).collect();
        let cmd = Command::Events {
            queue: self.queue.clone(),
            ops: ops.clone(),
            max_bytes: self.max_bytes,
        };
        match self.send(cmd).await? {
            Response::Ok => {
                let mut mirror = self.lock()?;
                for op in ops {
                    mirror.apply(op);
                }
                Ok(())
            }
            Response::QueueFull { why } => Err(EventLogError::Full(why)),
            other => Err(EventLogError::Failed(format!(
                "unexpected answer to an event queue write: {other:?}"
            ))),
        }
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, EventLogError> {
        Ok(self.lock()?.events.get(&seq).map(|b| b.0.clone()))
    }

    fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, EventLogError> {
        Ok(self
            .lock()?
            .events
            .iter()
            .map(|(k, v)| (*k, v.0.clone()))
            .collect())
    }

    fn failed(&self) -> Result<Vec<(String, Vec<u8>)>, EventLogError> {
        Ok(self
            .lock()?
            .failed
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect())
    }

    fn failed_one(&self, id: &str) -> Result<Option<Vec<u8>>, EventLogError> {
        Ok(self.lock()?.failed.get(id).map(|b| b.0.clone()))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}
