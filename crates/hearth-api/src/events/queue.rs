//! The durable part of asynchronous invocation: the queue over an [`EventLog`], by default
//! [`RedbLog`], `<data-dir>/events.redb` (a front end in a cluster uses the assignment
//! service's replicated log instead).
//!
//! The redb log has two tables: `events` (sequence number → the event: a JSON header and the raw payload) and
//! `failed` (event id → the record of an event that failed for good). Every change is a
//! [`Batch`] of operations that commit together (an event's deletion with its failed record
//! and the destination event it produces, say). One writer thread owns the write side and
//! commits whatever batches are waiting in one redb transaction (group commit), so many
//! accepts share one fsync; a batch's future resolves only after its commit is durable, and an
//! `Invoke` is answered 202 only then. Reads (an event's payload at dispatch, failed records)
//! use redb read transactions beside the writer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hearth_core::eventlog::{EventLog, EventLogError, LogOp};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const FAILED: TableDefinition<&str, &[u8]> = TableDefinition::new("failed");

/// The most batches one commit takes.
const MAX_GROUP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("event database: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt event record {0}: {1}")]
    Corrupt(String, String),
    #[error("encoding an event record: {0}")]
    Encode(serde_json::Error),
    #[error("the event writer stopped")]
    WriterGone,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error(transparent)]
    Log(#[from] EventLogError),
}

fn dberr<E: Into<redb::Error>>(e: E) -> QueueError {
    QueueError::Db(e.into())
}

/// What the queue keeps of one event besides its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeader {
    /// The request id of the `Invoke` that queued it (the invocation's id on every attempt).
    pub id: String,
    pub function: String,
    /// As invoked: `$LATEST`, a version or an alias (`None`: unqualified).
    pub qualifier: Option<String>,
    /// When it was accepted (ms since the epoch).
    pub accepted_ms: u64,
    /// Not before this (ms since the epoch): the time of its next retry.
    pub due_ms: u64,
    /// Attempts that ran and failed.
    pub runs: u32,
    /// `X-Amz-Client-Context`, decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_context: Option<String>,
    /// How many destination deliveries led to this event (0: a caller's own).
    #[serde(default)]
    pub depth: u32,
    /// The last attempt's response, while it waits for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<super::LastAttempt>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub header: EventHeader,
    pub payload: Vec<u8>,
}

impl Event {
    fn encode(&self) -> Result<Vec<u8>, QueueError> {
        let header = serde_json::to_vec(&self.header).map_err(QueueError::Encode)?;
        let len = u32::try_from(header.len())
            .map_err(|_| QueueError::Commit("event header too large".into()))?;
        let mut out = Vec::with_capacity(4 + header.len() + self.payload.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    fn decode(seq: u64, bytes: &[u8]) -> Result<Event, QueueError> {
        let corrupt = |why: &str| QueueError::Corrupt(seq.to_string(), why.to_string());
        let len_bytes: [u8; 4] = bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("short record"))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let header_bytes = bytes
            .get(4..4 + len)
            .ok_or_else(|| corrupt("short header"))?;
        let header = serde_json::from_slice(header_bytes).map_err(|e| corrupt(&e.to_string()))?;
        Ok(Event {
            header,
            payload: bytes[4 + len..].to_vec(),
        })
    }
}

/// One durable change.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace an event.
    Put(u64, Event),
    Delete(u64),
    /// Insert or replace a failed record (JSON).
    PutFailed(String, Vec<u8>),
    DeleteFailed(String),
}

/// Changes that commit together.
pub type Batch = Vec<Op>;

impl Op {
    fn into_log(self) -> Result<LogOp, QueueError> {
        Ok(match self {
            Op::Put(seq, event) => LogOp::Put(seq, event.encode()?),
            Op::Delete(seq) => LogOp::Delete(seq),
            Op::PutFailed(id, bytes) => LogOp::PutFailed(id, bytes),
            Op::DeleteFailed(id) => LogOp::DeleteFailed(id),
        })
    }
}

/// The queue's events, in whichever [`EventLog`] holds them.
pub struct Queue {
    log: Arc<dyn EventLog>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    /// Open (or create) the redb file at `path`; returns the queue and every event in it (left
    /// by an earlier run: they are all still to do).
    pub fn open(path: &Path) -> Result<(Queue, Vec<(u64, EventHeader)>), QueueError> {
        Queue::with_log(Arc::new(RedbLog::open(path)?))
    }

    /// The queue over `log`, and every event already in it.
    pub fn with_log(
        log: Arc<dyn EventLog>,
    ) -> Result<(Queue, Vec<(u64, EventHeader)>), QueueError> {
        let mut found = Vec::new();
        let mut last = 0u64;
        for (seq, bytes) in log.events()? {
            last = last.max(seq);
            found.push((seq, Event::decode(seq, &bytes)?.header));
        }
        Ok((
            Queue {
                log,
                next_seq: AtomicU64::new(last + 1),
            },
            found,
        ))
    }

    /// A fresh sequence number (order of acceptance).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Commit `ops` durably (with whatever else is waiting).
    pub async fn commit(&self, ops: Batch) -> Result<(), QueueError> {
        let ops = ops
            .into_iter()
            .map(Op::into_log)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.log.commit(ops).await?)
    }

    /// One event (blocking).
    pub fn get(&self, seq: u64) -> Result<Option<Event>, QueueError> {
        self.log
            .get(seq)?
            .map(|bytes| Event::decode(seq, &bytes))
            .transpose()
    }

    /// Every failed record (blocking), in id order.
    pub fn failed(&self) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        Ok(self.log.failed()?)
    }

    /// One failed record (blocking).
    pub fn failed_one(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.log.failed_one(id)?)
    }

    /// Stop the writer after what is queued has committed.
    pub fn close(&self) {
        self.log.close();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.close();
    }
}

struct Pending {
    ops: Vec<LogOp>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The embedded event log: `<data-dir>/events.redb`, one writer thread committing whatever
/// batches wait in one transaction.
pub struct RedbLog {
    db: Arc<Database>,
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<Pending>>>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for RedbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLog").finish_non_exhaustive()
    }
}

impl RedbLog {
    pub fn open(path: &Path) -> Result<RedbLog, QueueError> {
        let db = Database::create(path).map_err(dberr)?;
        let txn = db.begin_write().map_err(dberr)?;
        {
            txn.open_table(EVENTS).map_err(dberr)?;
            txn.open_table(FAILED).map_err(dberr)?;
        }
        txn.commit().map_err(dberr)?;
        let db = Arc::new(db);
        let (tx, rx) = std::sync::mpsc::channel::<Pending>();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("hearth-events".into())
            .spawn(move || write_loop(&writer_db, &rx))
            .map_err(|e| QueueError::Commit(format!("starting the event writer: {e}")))?;
        Ok(RedbLog {
            db,
            tx: std::sync::Mutex::new(Some(tx)),
            writer: std::sync::Mutex::new(Some(writer)),
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, QueueError>,
    ) -> Result<T, EventLogError> {
        let txn = self.db.begin_read().map_err(|e| from_queue(dberr(e)))?;
        f(&txn).map_err(from_queue)
    }
}

fn from_queue(e: QueueError) -> EventLogError {
    EventLogError::Failed(e.to_string())
}

#[async_trait::async_trait]
impl EventLog for RedbLog {
    async fn commit(&self, ops: Vec<LogOp>) -> Result<(), EventLogError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        {
            let tx = self.tx.lock().map_err(|_| EventLogError::Closed)?;
            let tx = tx.as_ref().ok_or(EventLogError::Closed)?;
            tx.send(Pending { ops, done })
                .map_err(|_| EventLogError::Closed)?;
        }
        wait.await
            .map_err(|_| EventLogError::Closed)?
            .map_err(EventLogError::Failed)
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, EventLogError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS).map_err(dberr)?;
            let value = table.get(seq).map_err(dberr)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
    }

    fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, EventLogError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS).map_err(dberr)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(dberr)? {
                let (k, v) = entry.map_err(dberr)?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn failed(&self) -> Result<Vec<(String, Vec<u8>)>, EventLogError> {
        self.read(|txn| {
            let table = txn.open_table(FAILED).map_err(dberr)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(dberr)? {
                let (k, v) = entry.map_err(dberr)?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn failed_one(&self, id: &str) -> Result<Option<Vec<u8>>, EventLogError> {
        self.read(|txn| {
            let table = txn.open_table(FAILED).map_err(dberr)?;
            Ok(table.get(id).map_err(dberr)?.map(|v| v.value().to_vec()))
        })
    }

    fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for RedbLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(db: &Database, rx: &std::sync::mpsc::Receiver<Pending>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let result = apply(db, &group).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, batches = group.len(), "event commit failed");
        }
        for p in group {
            let _ = p.done.send(result.clone());
        }
    }
}

fn apply(db: &Database, group: &[Pending]) -> Result<(), QueueError> {
    let txn = db.begin_write().map_err(dberr)?;
    {
        let mut events = txn.open_table(EVENTS).map_err(dberr)?;
        let mut failed = txn.open_table(FAILED).map_err(dberr)?;
        for p in group {
            for op in &p.ops {
                match op {
                    LogOp::Put(seq, bytes) => {
                        events.insert(*seq, bytes.as_slice()).map_err(dberr)?;
                    }
                    LogOp::Delete(seq) => {
                        events.remove(*seq).map_err(dberr)?;
                    }
                    LogOp::PutFailed(id, bytes) => {
                        failed
                            .insert(id.as_str(), bytes.as_slice())
                            .map_err(dberr)?;
                    }
                    LogOp::DeleteFailed(id) => {
                        failed.remove(id.as_str()).map_err(dberr)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(dberr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, payload: &[u8]) -> Event {
        Event {
            header: EventHeader {
                id: id.into(),
                function: "f".into(),
                qualifier: None,
                accepted_ms: 1,
                due_ms: 1,
                runs: 0,
                client_context: None,
                depth: 0,
                last: None,
            },
            payload: payload.to_vec(),
        }
    }

    #[tokio::test]
    async fn committed_events_survive_a_reopen_and_batches_are_atomic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.redb");
        {
            let (q, found) = Queue::open(&path).expect("open");
            assert!(found.is_empty());
            let (a, b) = (q.next_seq(), q.next_seq());
            assert!(b > a);
            // Many concurrent commits share writes and all land.
            let q = Arc::new(q);
            let mut tasks = Vec::new();
            for i in 0..200u64 {
                let q = q.clone();
                tasks.push(tokio::spawn(async move {
                    let seq = q.next_seq();
                    q.commit(vec![Op::Put(seq, event(&format!("e{i}"), b"{\"i\":1}"))])
                        .await
                }));
            }
            for t in tasks {
                t.await.expect("join").expect("commit");
            }
            // One batch: an event leaves and its failed record appears.
            let first = q.get(3).expect("get").expect("there");
            q.commit(vec![
                Op::Delete(3),
                Op::PutFailed(first.header.id.clone(), b"{}".to_vec()),
            ])
            .await
            .expect("commit");
            assert_eq!(q.get(3).expect("get"), None);
        }
        let (q, found) = Queue::open(&path).expect("reopen");
        assert_eq!(found.len(), 199);
        assert!(q.next_seq() > found.iter().map(|f| f.0).max().unwrap_or(0));
        assert_eq!(q.failed().expect("failed").len(), 1);
        let any = found[0].0;
        let ev = q.get(any).expect("get").expect("there");
        assert_eq!(ev.payload, b"{\"i\":1}");
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        assert!(Event::decode(1, b"\x01").is_err());
        assert!(Event::decode(1, b"\xff\x00\x00\x00{}").is_err());
        let ok = event("x", b"[]").encode().expect("encode");
        assert_eq!(Event::decode(1, &ok).expect("decode"), event("x", b"[]"));
    }
}
