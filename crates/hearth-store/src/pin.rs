//! In-process pins: a put holds each chunk it stores or reuses from the moment it looks at the
//! chunk until its manifest is written, and the collector of the same [`ChunkStore`] never
//! deletes a pinned chunk.
//!
//! The collector claims a chunk before its last look and delete; a put that wants a chunk
//! under a claim waits for the delete to finish and then finds the chunk gone and uploads it
//! again. So within one process the check-then-delete of the sweep and the look-then-reuse of
//! a put never interleave, whatever the ages, the grace period or the duration of the put.
//! Across processes (another front end, `hearth store gc`) the grace and freshening ages do
//! that work; see the crate docs.
//!
//! Why a table in memory rather than pin objects in the origin: the origin cannot delete
//! conditionally, so a pin object would still leave a window between the collector's look
//! and its delete; and a put would need two more requests per chunk.
//!
//! [`ChunkStore`]: crate::ChunkStore

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;

use crate::manifest::ChunkId;

enum PinState {
    /// Held by this many puts.
    Held(usize),
    /// The collector is deleting it; closed when it is done.
    Sweeping(Arc<Semaphore>),
}

/// The pin table of one store (shared by its clones).
#[derive(Default)]
pub(crate) struct Pins {
    table: Mutex<HashMap<ChunkId, PinState>>,
}

impl Pins {
    fn table(&self) -> MutexGuard<'_, HashMap<ChunkId, PinState>> {
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pins `id`, first waiting for a sweep of it to finish.
    pub(crate) async fn pin(self: &Arc<Self>, id: ChunkId) -> ChunkPin {
        loop {
            let sweeping = {
                let mut table = self.table();
                match table.entry(id) {
                    Entry::Vacant(v) => {
                        v.insert(PinState::Held(1));
                        break;
                    }
                    Entry::Occupied(mut o) => match o.get_mut() {
                        PinState::Held(n) => {
                            *n += 1;
                            break;
                        }
                        PinState::Sweeping(done) => done.clone(),
                    },
                }
            };
            // No permit is ever added: this returns when the sweep closes the semaphore
            // (at once if it already has).
            let _ = sweeping.acquire().await;
        }
        ChunkPin {
            pins: self.clone(),
            id,
        }
    }

    /// Claims an unpinned `id` for deletion; `None` if a put holds it.
    pub(crate) fn claim(self: &Arc<Self>, id: ChunkId) -> Option<SweepClaim> {
        match self.table().entry(id) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                v.insert(PinState::Sweeping(Arc::new(Semaphore::new(0))));
                Some(SweepClaim {
                    pins: self.clone(),
                    id,
                })
            }
        }
    }

    /// Whether `id` is pinned by a put (for tests and reports).
    #[cfg(test)]
    pub(crate) fn is_pinned(&self, id: &ChunkId) -> bool {
        matches!(self.table().get(id), Some(PinState::Held(_)))
    }
}

/// A put's hold on one chunk; released on drop.
pub(crate) struct ChunkPin {
    pins: Arc<Pins>,
    id: ChunkId,
}

impl Drop for ChunkPin {
    fn drop(&mut self) {
        let mut table = self.pins.table();
        if let Some(PinState::Held(n)) = table.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.id);
            }
        }
    }
}

/// The collector's claim on one chunk it is about to delete; on drop, waiting puts go on.
pub(crate) struct SweepClaim {
    pins: Arc<Pins>,
    id: ChunkId,
}

impl Drop for SweepClaim {
    fn drop(&mut self) {
        if let Some(PinState::Sweeping(done)) = self.pins.table().remove(&self.id) {
            done.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[tokio::test]
    async fn pins_count_and_block_claims() {
        let pins = Arc::new(Pins::default());
        let a = pins.pin(id(1)).await;
        let b = pins.pin(id(1)).await;
        assert!(pins.claim(id(1)).is_none());
        drop(a);
        assert!(pins.is_pinned(&id(1)));
        assert!(pins.claim(id(1)).is_none());
        drop(b);
        assert!(!pins.is_pinned(&id(1)));
        let claim = pins.claim(id(1)).expect("unpinned");
        assert!(pins.claim(id(1)).is_none(), "one claim at a time");
        drop(claim);
        assert!(pins.claim(id(2)).is_some());
    }

    #[tokio::test]
    async fn a_pin_waits_for_the_sweep_of_its_chunk() {
        let pins = Arc::new(Pins::default());
        let claim = pins.claim(id(3)).expect("claim");
        let waiter = tokio::spawn({
            let pins = pins.clone();
            async move {
                let _pin = pins.pin(id(3)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "pinned a chunk under a sweep claim");
        drop(claim);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .expect("task");
        assert!(!pins.is_pinned(&id(3)));
    }
}
