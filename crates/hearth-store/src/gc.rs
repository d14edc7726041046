//! The collector: mark from ref lists, sweep unreferenced chunks older than a grace period.
//!
//! The order of steps matters (see the crate docs for the argument):
//!
//! 1. list the chunks, remembering each one's modification time and e-tag;
//! 2. list the manifests;
//! 3. read every ref list and mark its chunks. A ref list whose manifest is missing is a put in
//!    progress (young) or a leftover of a crash (old): a young one marks like any other, an old
//!    one is ignored (and counted in [`GcReport::orphan_refs`]);
//! 4. a manifest without a ref list is re-checked (a concurrent delete removes the manifest
//!    first, then the ref list); if it is still there and its ref list still is not, the store
//!    is inconsistent and nothing is swept — the collector cannot read that manifest's chunks;
//! 5. sweep: a chunk that is unmarked and was already older than `grace` when listed is claimed
//!    (skipped if a put of this store has it pinned; a put that wants it meanwhile waits for the
//!    claim), looked at once more and deleted only if it has not been rewritten since (a put of
//!    another process that reuses an old chunk rewrites it).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::error::StoreError;
use crate::manifest::{self, CHUNKS_DIR, ChunkId, MANIFESTS_DIR, REFS_DIR};
use crate::store::{ChunkStore, age, delete_if_present};

/// Requests the collector keeps in flight.
const GC_PARALLELISM: usize = 16;

/// What one collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks looked at.
    pub scanned: u64,
    /// Chunks deleted.
    pub deleted: u64,
    /// Ciphertext bytes deleted.
    pub bytes_freed: u64,
    /// Chunks kept (referenced, or younger than the grace period).
    pub kept: u64,
    /// Of the kept chunks, those kept only because they were younger than the grace period.
    pub kept_young: u64,
    /// Of the kept chunks, those kept only because a put in progress holds them.
    pub kept_in_use: u64,
    /// Ref lists read (one per manifest, plus young orphans).
    pub ref_lists: u64,
    /// Ref lists older than the grace period whose manifest is gone (left by a crash); their
    /// chunks are not marked.
    pub orphan_refs: u64,
}

impl ChunkStore {
    /// Deletes chunks that no manifest of any scope references and that are older than the
    /// store's grace period ([`ChunkStore::with_gc_grace`]). Safe to run while puts, gets and
    /// deletes go on: puts of this store pin their chunks; puts of other processes are
    /// covered by the grace period if they use the same one (see the crate docs).
    pub async fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let grace: Duration = self.gc_grace;
        let origin = self.inner.origin.clone();
        let mut report = GcReport::default();

        // 1. Chunks.
        let listed_at = chrono::Utc::now();
        let chunks: Vec<(ChunkId, ObjectMeta)> = origin
            .list(Some(&ObjectPath::from(CHUNKS_DIR)))
            .try_filter_map(|meta| {
                futures::future::ready(Ok(
                    manifest::chunk_id_of(&meta.location).map(|id| (id, meta))
                ))
            })
            .try_collect()
            .await?;

        // 2. Manifests.
        let manifests: HashSet<(String, String)> = origin
            .list(Some(&ObjectPath::from(MANIFESTS_DIR)))
            .try_filter_map(|meta| {
                futures::future::ready(Ok(manifest::split_tagged(MANIFESTS_DIR, &meta.location)))
            })
            .try_collect()
            .await?;

        // 3. Ref lists.
        let refs: Vec<ObjectMeta> = origin
            .list(Some(&ObjectPath::from(REFS_DIR)))
            .try_collect()
            .await?;
        let marked_at = chrono::Utc::now();
        let mut with_refs: HashSet<(String, String)> = HashSet::new();
        let mut to_read: Vec<ObjectPath> = Vec::new();
        for meta in refs {
            let Some(key) = manifest::split_tagged(REFS_DIR, &meta.location) else {
                continue;
            };
            if !manifests.contains(&key) && age(marked_at, meta.last_modified) >= grace {
                report.orphan_refs += 1;
                continue;
            }
            with_refs.insert(key);
            to_read.push(meta.location);
        }

        // 4. Manifests whose ref list we did not see.
        for (tag, name) in manifests.difference(&with_refs) {
            match origin.head(&manifest::manifest_path(tag, name)).await {
                Err(object_store::Error::NotFound { .. }) => continue, // deleted meanwhile
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            let refs = manifest::refs_path(tag, name);
            match origin.head(&refs).await {
                Ok(_) => to_read.push(refs),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(StoreError::Inconsistent(format!(
                        "manifest {tag}/{name} has no ref list; swept nothing"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }

        let mut marked: HashSet<ChunkId> = HashSet::new();
        let mut ref_lists = stream::iter(to_read)
            .map(|path| {
                let origin = origin.clone();
                async move {
                    match origin.get(&path).await {
                        Ok(r) => Ok(Some((path, r.bytes().await?))),
                        // Deleted since we listed it: its manifest is gone too.
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(StoreError::from(e)),
                    }
                }
            })
            .buffer_unordered(GC_PARALLELISM);
        while let Some(item) = ref_lists.try_next().await? {
            let Some((path, data)) = item else { continue };
            let ids = manifest::decode_refs(&data).ok_or_else(|| {
                StoreError::Inconsistent(format!("ref list {path} is unreadable; swept nothing"))
            })?;
            report.ref_lists += 1;
            marked.extend(ids);
        }
        drop(ref_lists);

        // 5. Sweep.
        let mut candidates: HashMap<ChunkId, ObjectMeta> = HashMap::new();
        for (id, meta) in chunks {
            report.scanned += 1;
            if marked.contains(&id) {
                report.kept += 1;
            } else if age(listed_at, meta.last_modified) < grace {
                report.kept += 1;
                report.kept_young += 1;
            } else {
                candidates.insert(id, meta);
            }
        }
        let pins = self.inner.pins.clone();
        let mut sweeps = stream::iter(candidates)
            .map(|(id, listed)| {
                let origin = origin.clone();
                let pins = pins.clone();
                async move {
                    // Held until the delete is done: a put of this store cannot reuse the
                    // chunk in between, it waits and then stores it again.
                    let Some(_claim) = pins.claim(id) else {
                        return Ok(Swept::InUse);
                    };
                    let now = match origin.head(&listed.location).await {
                        Ok(meta) => meta,
                        Err(object_store::Error::NotFound { .. }) => return Ok(Swept::Gone),
                        Err(e) => return Err(StoreError::from(e)),
                    };
                    if now.last_modified != listed.last_modified || now.e_tag != listed.e_tag {
                        // Rewritten by a put since we listed it: in use again.
                        return Ok(Swept::Rewritten);
                    }
                    delete_if_present(origin.as_ref(), &listed.location).await?;
                    tracing::trace!(chunk = %id, "collected chunk");
                    Ok(Swept::Deleted(listed.size))
                }
            })
            .buffer_unordered(GC_PARALLELISM);
        while let Some(outcome) = sweeps.try_next().await? {
            match outcome {
                Swept::Deleted(size) => {
                    report.deleted += 1;
                    report.bytes_freed += size;
                }
                Swept::Rewritten => report.kept += 1,
                Swept::InUse => {
                    report.kept += 1;
                    report.kept_in_use += 1;
                }
                Swept::Gone => {}
            }
        }
        tracing::info!(
            scanned = report.scanned,
            deleted = report.deleted,
            bytes_freed = report.bytes_freed,
            kept = report.kept,
            orphan_refs = report.orphan_refs,
            "garbage collection done"
        );
        Ok(report)
    }
}

/// What sweeping one candidate did.
enum Swept {
    Deleted(u64),
    Rewritten,
    /// Pinned by a put of this store.
    InUse,
    Gone,
}
