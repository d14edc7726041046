//! The asynchronous event queues a partition holds for front ends.
//!
//! A front end in a cluster keeps its queue of `Event` invocations here instead of on its own
//! disk, so an acknowledged event is on a majority of the partition's nodes before the caller
//! gets its 202. Each queue is named by its front end (`hearth frontend --events-queue`) and
//! lives in the partition that name hashes to. The partition stores the queue's records as
//! opaque bytes (the front end's `events` module decides what they mean): events by sequence
//! number and the records of events that failed for good by event id.
//!
//! Like the rest of [`Partition`](crate::partition::Partition) this is deterministic and free of
//! I/O. Every operation is idempotent (puts replace, deletes of absent keys do nothing), so a
//! front end may resend a batch whose answer it lost.
//!
//! **Bound.** A partition's queues together hold at most the `max_bytes` a batch carries. A
//! batch that adds a record (a new event: the caller gets a throttle), deletes nothing and
//! would take the total past it is refused whole. Other batches are always applied, so work in
//! progress can always complete: one that deletes something (an event finishing, with the
//! failed record or destination event it produces, or a re-drive) or only replaces records
//! (an event's retry bookkeeping).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Opaque bytes, serialized as base64 (the journal and the wire are JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        b64::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        b64::deserialize(d).map(Blob)
    }
}

/// `#[serde(with = "crate::queues::b64")]`: a byte vector as a base64 string.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// One change to a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueOp {
    /// Insert or replace the event with this sequence number.
    Put(u64, Blob),
    Delete(u64),
    /// Insert or replace the record of an event that failed for good.
    PutFailed(String, Blob),
    DeleteFailed(String),
}

impl QueueOp {
    fn deletes(&self) -> bool {
        matches!(self, QueueOp::Delete(_) | QueueOp::DeleteFailed(_))
    }

    /// Whether this puts a record `queue` does not hold yet.
    fn adds_to(&self, queue: Option<&Queue>) -> bool {
        match self {
            QueueOp::Put(seq, _) => queue.is_none_or(|q| !q.events.contains_key(seq)),
            QueueOp::PutFailed(id, _) => queue.is_none_or(|q| !q.failed.contains_key(id)),
            QueueOp::Delete(_) | QueueOp::DeleteFailed(_) => false,
        }
    }
}

impl From<hearth_core::eventlog::LogOp> for QueueOp {
    fn from(op: hearth_core::eventlog::LogOp) -> Self {
        use hearth_core::eventlog::LogOp;
        match op {
            LogOp::Put(seq, bytes) => QueueOp::Put(seq, Blob(bytes)),
            LogOp::Delete(seq) => QueueOp::Delete(seq),
            LogOp::PutFailed(id, bytes) => QueueOp::PutFailed(id, Blob(bytes)),
            LogOp::DeleteFailed(id) => QueueOp::DeleteFailed(id),
        }
    }
}

/// One front end's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub events: BTreeMap<u64, Blob>,
    pub failed: BTreeMap<String, Blob>,
}

impl Queue {
    /// Applies one change.
    pub fn apply(&mut self, op: QueueOp) {
        match op {
            QueueOp::Put(seq, b) => {
                self.events.insert(seq, b);
            }
            QueueOp::Delete(seq) => {
                self.events.remove(&seq);
            }
            QueueOp::PutFailed(id, b) => {
                self.failed.insert(id, b);
            }
            QueueOp::DeleteFailed(id) => {
                self.failed.remove(&id);
            }
        }
    }

    fn bytes(&self) -> u64 {
        let events: u64 = self.events.values().map(|b| b.0.len() as u64).sum();
        let failed: u64 = self
            .failed
            .iter()
            .map(|(id, b)| (id.len() + b.0.len()) as u64)
            .sum();
        events + failed
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.failed.is_empty()
    }
}

/// Every queue of a partition, by name (no empty queues are kept).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Queues {
    queues: BTreeMap<String, Queue>,
}

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub stored: u64,
    pub adding: u64,
    pub max_bytes: u64,
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the partition holds {} bytes of queued events; {} more would pass its bound of {} bytes",
            self.stored, self.adding, self.max_bytes
        )
    }
}

/// What a queue's bytes would change by under `ops` (only the growth counts).
fn growth(queue: Option<&Queue>, ops: &[QueueOp]) -> u64 {
    let mut sim: BTreeMap<(bool, String), u64> = BTreeMap::new();
    let old = |k: &(bool, String)| -> u64 {
        let Some(q) = queue else { return 0 };
        if k.0 {
            q.failed
                .get(&k.1)
                .map_or(0, |b| (k.1.len() + b.0.len()) as u64)
        } else {
            k.1.parse::<u64>()
                .ok()
                .and_then(|seq| q.events.get(&seq))
                .map_or(0, |b| b.0.len() as u64)
        }
    };
    let mut before = 0u64;
    for op in ops {
        let (key, size) = match op {
            QueueOp::Put(seq, b) => ((false, seq.to_string()), b.0.len() as u64),
            QueueOp::Delete(seq) => ((false, seq.to_string()), 0),
            QueueOp::PutFailed(id, b) => ((true, id.clone()), (id.len() + b.0.len()) as u64),
            QueueOp::DeleteFailed(id) => ((true, id.clone()), 0),
        };
        if !sim.contains_key(&key) {
            before += old(&key);
        }
        sim.insert(key, size);
    }
    let after: u64 = sim.values().sum();
    after.saturating_sub(before)
}

impl Queues {
    /// Applies `ops` to queue `name`, or refuses them all (see the module documentation).
    pub fn apply(&mut self, name: &str, ops: Vec<QueueOp>, max_bytes: u64) -> Result<(), Full> {
        let current = self.queues.get(name);
        if !ops.iter().any(QueueOp::deletes) && ops.iter().any(|op| op.adds_to(current)) {
            let adding = growth(current, &ops);
            let stored = self.bytes();
            if stored.saturating_add(adding) > max_bytes {
                return Err(Full {
                    stored,
                    adding,
                    max_bytes,
                });
            }
        }
        let queue = self.queues.entry(name.to_string()).or_default();
        for op in ops {
            queue.apply(op);
        }
        if queue.is_empty() {
            self.queues.remove(name);
        }
        Ok(())
    }

    /// Queue `name` (empty if it holds nothing).
    pub fn get(&self, name: &str) -> Queue {
        self.queues.get(name).cloned().unwrap_or_default()
    }

    /// The bytes every queue holds together.
    pub fn bytes(&self) -> u64 {
        self.queues.values().map(Queue::bytes).sum()
    }

    /// Events queued in every queue.
    pub fn events(&self) -> u64 {
        self.queues.values().map(|q| q.events.len() as u64).sum()
    }

    /// Failed records kept in every queue.
    pub fn failed(&self) -> u64 {
        self.queues.values().map(|q| q.failed.len() as u64).sum()
    }

    /// No empty queue is kept.
    pub fn check_invariants(&self) -> Result<(), String> {
        match self.queues.iter().find(|(_, q)| q.is_empty()) {
            Some((name, _)) => Err(format!("queue {name:?} is kept empty")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seq: u64, n: usize) -> QueueOp {
        QueueOp::Put(seq, Blob(vec![7; n]))
    }

    #[test]
    fn puts_and_deletes_apply_in_order_and_are_idempotent() {
        let mut q = Queues::default();
        q.apply("a", vec![put(1, 10), put(2, 20)], 1000).unwrap();
        q.apply("a", vec![put(1, 10), put(2, 20)], 1000).unwrap();
        assert_eq!(q.bytes(), 30);
        assert_eq!(q.events(), 2);
        q.apply(
            "a",
            vec![
                QueueOp::Delete(1),
                QueueOp::PutFailed("e1".into(), Blob(vec![1; 5])),
            ],
            1000,
        )
        .unwrap();
        q.apply("a", vec![QueueOp::Delete(1)], 1000).unwrap();
        let a = q.get("a");
        assert_eq!(a.events.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(a.failed.get("e1"), Some(&Blob(vec![1; 5])));
        assert_eq!(q.bytes(), 20 + 2 + 5);
        assert_eq!(q.get("b"), Queue::default());
    }

    #[test]
    fn a_batch_past_the_bound_is_refused_whole_unless_it_deletes() {
        let mut q = Queues::default();
        q.apply("a", vec![put(1, 60)], 100).unwrap();
        let before = q.clone();
        let err = q.apply("b", vec![put(1, 30), put(2, 20)], 100).unwrap_err();
        assert_eq!(
            err,
            Full {
                stored: 60,
                adding: 50,
                max_bytes: 100
            }
        );
        assert_eq!(q, before, "a refused batch changes nothing");
        // Replacing an event (a retry's bookkeeping) is applied even past the bound.
        q.apply("a", vec![put(1, 160)], 100).unwrap();
        assert_eq!(q.bytes(), 160);
        assert!(q.apply("a", vec![put(2, 1)], 100).is_err());
        // A finishing event may store its failed record even past the bound.
        q.apply(
            "a",
            vec![
                QueueOp::Delete(1),
                QueueOp::PutFailed("x".into(), Blob(vec![0; 200])),
            ],
            100,
        )
        .unwrap();
        assert_eq!(q.events(), 0);
        assert_eq!(q.failed(), 1);
    }

    #[test]
    fn emptied_queues_are_dropped_and_blobs_round_trip_as_base64() {
        let mut q = Queues::default();
        q.apply("a", vec![put(1, 3)], 100).unwrap();
        let json = serde_json::to_string(&q).unwrap();
        assert!(json.contains("\"BwcH\""), "{json}");
        let back: Queues = serde_json::from_str(&json).unwrap();
        assert_eq!(back, q);
        q.apply("a", vec![QueueOp::Delete(1)], 100).unwrap();
        assert_eq!(q, Queues::default());
        q.check_invariants().unwrap();
        assert!(serde_json::from_str::<Blob>("\"not base64!\"").is_err());
    }
}
