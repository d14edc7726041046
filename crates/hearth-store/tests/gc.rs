//! The collector: what it deletes, what it keeps, and how it behaves next to puts.
// Helpers outside `#[test]` functions unwrap too; clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hearth_store::manifest::{chunk_path, refs_path};
use hearth_store::{ChunkId, ChunkStore, Scope, StoreError, TAG_LEN};
use object_store::ObjectStoreExt;
use object_store::memory::InMemory;

const HOUR: Duration = Duration::from_secs(3600);

fn owner(o: &str) -> Scope {
    Scope::Owner(o.to_owned())
}

async fn ids_of(store: &ChunkStore, scope: &Scope, name: &str) -> HashSet<ChunkId> {
    let m = store.manifest(scope, name).await.unwrap();
    m.chunks.iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn deleting_one_of_two_sharing_manifests_frees_only_its_own_chunks() {
    let (store, origin) = mem_store();
    let scope = owner("gc");
    let prefix = data(1, 2 * C);
    let mut a = prefix.clone();
    a.extend_from_slice(&data(2, 3 * C));
    let mut b = prefix;
    b.extend_from_slice(&data(3, C + 9));
    store.put_bytes(&scope, "a", &a, no_meta()).await.unwrap();
    store.put_bytes(&scope, "b", &b, no_meta()).await.unwrap();
    // An unrelated artifact of another scope that happens to contain a's bytes.
    store
        .put_bytes(&Scope::Shared, "img", &a, no_meta())
        .await
        .unwrap();
    let ids_a = ids_of(&store, &scope, "a").await;
    let ids_b = ids_of(&store, &scope, "b").await;
    let ids_img = ids_of(&store, &Scope::Shared, "img").await;
    assert_eq!(ids_a.intersection(&ids_b).count(), 2);

    // Nothing is garbage yet.
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.scanned, r.deleted, r.kept), (12, 0, 12));

    store.delete(&scope, "a").await.unwrap();
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!(r.scanned, 12);
    assert_eq!(r.deleted, 3, "only the chunks unique to a");
    assert_eq!(r.bytes_freed, 3 * (C + TAG_LEN) as u64);
    assert_eq!(r.kept, 9);
    assert_eq!(r.ref_lists, 2);
    let left: HashSet<ChunkId> = chunk_ids(origin.as_ref()).await.into_iter().collect();
    let expected: HashSet<ChunkId> = ids_b.union(&ids_img).copied().collect();
    assert_eq!(left, expected);
    assert!(ids_a.difference(&ids_b).all(|id| !left.contains(id)));
    assert_eq!(store.get_bytes(&scope, "b").await.unwrap(), b);
    assert_eq!(store.get_bytes(&Scope::Shared, "img").await.unwrap(), a);

    // A second run finds nothing more.
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.deleted, r.kept), (0, 9));
}

#[tokio::test]
async fn chunks_younger_than_grace_survive_then_everything_goes() {
    let (store, origin) = mem_store();
    let scope = owner("young");
    store
        .put_bytes(&scope, "a", &data(4, 3 * C), no_meta())
        .await
        .unwrap();
    store
        .put_bytes(&Scope::Shared, "b", &data(5, C), no_meta())
        .await
        .unwrap();
    store.delete(&scope, "a").await.unwrap();
    let r = collect(&store, HOUR).await.unwrap();
    assert_eq!((r.deleted, r.kept, r.kept_young), (0, 4, 3));

    store.delete(&Scope::Shared, "b").await.unwrap();
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.scanned, r.deleted), (4, 4));
    assert!(
        objects(origin.as_ref(), "").await.is_empty(),
        "nothing left"
    );
    let usage = store.usage().await.unwrap();
    assert_eq!((usage.chunks, usage.bytes, usage.manifests), (0, 0, 0));
}

#[tokio::test]
async fn put_then_gc_with_grace_keeps_the_put() {
    let (store, _) = mem_store();
    let scope = owner("p");
    let payload = data(6, 2 * C + 1);
    store
        .put_bytes(&scope, "a", &payload, no_meta())
        .await
        .unwrap();
    let r = collect(&store, HOUR).await.unwrap();
    assert_eq!(r.deleted, 0);
    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
}

/// A put that has uploaded its chunks but not yet written its ref list (held at the gate) is
/// protected from another process's collector by the grace period; with no grace its chunks
/// would be taken. The collector of the put's own store keeps them even with no grace: the put
/// pins them.
#[tokio::test]
async fn gc_during_a_put_keeps_chunks_within_grace() {
    for (grace, same_store) in [
        (HOUR, false),
        (Duration::ZERO, false),
        (Duration::ZERO, true),
    ] {
        let probe = Probe::new(Arc::new(InMemory::new()));
        let store = ChunkStore::with_object_store(probe.clone(), None, secrets());
        let collector = if same_store {
            store.clone()
        } else {
            other_process(probe.clone(), grace)
        };
        let scope = owner("race");
        let payload = data(7, 3 * C);
        let held = probe.hold("put", "refs/");
        let put = tokio::spawn({
            let (store, scope, payload) = (store.clone(), scope.clone(), payload.clone());
            async move { store.put_bytes(&scope, "a", &payload, no_meta()).await }
        });
        held.reached.await.unwrap();
        // Chunks are in the origin, unreferenced.
        assert_eq!(chunk_ids(probe.as_ref()).await.len(), 3);
        let r = collect(&collector, grace).await.unwrap();
        held.release.send(()).unwrap();
        put.await.unwrap().unwrap();
        if same_store {
            assert_eq!((r.deleted, r.kept_in_use), (0, 3), "{r:?}");
            assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
        } else if grace == HOUR {
            assert_eq!((r.deleted, r.kept_young), (0, 3));
            assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
        } else {
            // Demonstrates what the grace period is for.
            assert_eq!(r.deleted, 3);
            assert!(matches!(
                store.get_bytes(&scope, "a").await,
                Err(StoreError::MissingChunk { .. })
            ));
        }
    }
}

/// A put of another process reusing a chunk the collector has already chosen to delete
/// rewrites it, and the collector's last look before deleting sees the rewrite and keeps it.
#[tokio::test]
async fn chunk_rewritten_by_a_put_during_the_sweep_is_kept() {
    let probe = Probe::new(Arc::new(InMemory::new()));
    let store = ChunkStore::with_object_store(probe.clone(), None, secrets());
    let scope = owner("fresh");
    let payload = data(8, C / 2);
    store
        .put_bytes(&scope, "old", &payload, no_meta())
        .await
        .unwrap();
    store.delete(&scope, "old").await.unwrap();
    let id = chunk_ids(probe.as_ref()).await[0];

    // The collector will stop at its look at the (garbage) chunk.
    let held = probe.hold("head", "chunks/");
    let gc = tokio::spawn({
        let store = store.clone();
        async move { collect(&store, Duration::ZERO).await }
    });
    held.reached.await.unwrap();
    // Meanwhile another process stores the same data; the chunk exists and is older than its
    // freshening age (zero here), so the put rewrites it.
    let before = probe.head(&chunk_path(&id)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let eager = other_process(probe.clone(), Duration::ZERO);
    let info = eager
        .put_bytes(&scope, "new", &payload, no_meta())
        .await
        .unwrap();
    assert_eq!(info.new_chunks, 0);
    let after = probe.head(&chunk_path(&id)).await.unwrap();
    assert!(after.last_modified > before.last_modified, "rewritten");
    held.release.send(()).unwrap();
    let r = gc.await.unwrap().unwrap();
    assert_eq!((r.deleted, r.kept), (0, 1));
    assert_eq!(store.get_bytes(&scope, "new").await.unwrap(), payload);
}

/// A put of the same store that wants a chunk the collector is deleting waits for the delete,
/// then stores the chunk again: the check-then-delete and the look-then-reuse never interleave.
#[tokio::test]
async fn a_put_waits_for_the_sweep_of_a_chunk_it_reuses_then_stores_it_again() {
    let probe = Probe::new(Arc::new(InMemory::new()));
    let store = ChunkStore::with_object_store(probe.clone(), None, secrets());
    let scope = owner("claimed");
    let payload = data(18, C / 3);
    store
        .put_bytes(&scope, "old", &payload, no_meta())
        .await
        .unwrap();
    store.delete(&scope, "old").await.unwrap();

    let held = probe.hold("head", "chunks/");
    let gc = tokio::spawn({
        let store = store.clone();
        async move { collect(&store, Duration::ZERO).await }
    });
    held.reached.await.unwrap();
    let put = tokio::spawn({
        let (store, scope, payload) = (store.clone(), scope.clone(), payload.clone());
        async move { store.put_bytes(&scope, "new", &payload, no_meta()).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!put.is_finished(), "the put reused a chunk under deletion");
    held.release.send(()).unwrap();
    let r = gc.await.unwrap().unwrap();
    assert_eq!(r.deleted, 1);
    let info = put.await.unwrap().unwrap();
    assert_eq!(info.new_chunks, 1, "stored again after the delete");
    assert_eq!(store.get_bytes(&scope, "new").await.unwrap(), payload);
}

#[test]
fn freshening_age_follows_the_grace_period() {
    let (store, _) = mem_store();
    assert_eq!(store.gc_grace(), hearth_store::DEFAULT_GC_GRACE);
    for grace in [Duration::from_secs(1), HOUR, 24 * HOUR] {
        let store = store.clone().with_gc_grace(grace);
        assert_eq!(store.gc_grace(), grace);
        assert!(store.freshen_after() < grace);
        assert!(
            grace - store.freshen_after() >= grace / 2,
            "a margin for the put"
        );
    }
}

#[tokio::test]
async fn reusing_a_recent_chunk_does_not_rewrite_it() {
    let (store, origin) = mem_store();
    let scope = owner("lazy");
    let payload = data(9, 100);
    store
        .put_bytes(&scope, "a", &payload, no_meta())
        .await
        .unwrap();
    let id = chunk_ids(origin.as_ref()).await[0];
    let before = origin.head(&chunk_path(&id)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .put_bytes(&scope, "b", &payload, no_meta())
        .await
        .unwrap();
    let after = origin.head(&chunk_path(&id)).await.unwrap();
    assert_eq!(after.last_modified, before.last_modified);
}

#[tokio::test]
async fn manifest_without_ref_list_stops_the_collector() {
    let (store, origin) = mem_store();
    let scope = owner("inc");
    store
        .put_bytes(&scope, "a", &data(10, C), no_meta())
        .await
        .unwrap();
    store
        .put_bytes(&scope, "garbage", &data(11, C), no_meta())
        .await
        .unwrap();
    store.delete(&scope, "garbage").await.unwrap();
    let tag = store.scope_tag(&scope).unwrap();
    origin.delete(&refs_path(&tag, "a")).await.unwrap();
    let r = collect(&store, Duration::ZERO).await;
    assert!(matches!(r, Err(StoreError::Inconsistent(_))), "{r:?}");
    assert_eq!(chunk_ids(origin.as_ref()).await.len(), 2, "nothing swept");

    // An unreadable ref list stops it too.
    write(
        origin.as_ref(),
        &refs_path(&tag, "a"),
        b"not ids\n".to_vec(),
    )
    .await;
    let r = collect(&store, Duration::ZERO).await;
    assert!(matches!(r, Err(StoreError::Inconsistent(_))), "{r:?}");
    assert_eq!(chunk_ids(origin.as_ref()).await.len(), 2, "nothing swept");
}

/// A ref list left without its manifest (a crash between the two) protects its chunks while
/// young, and is ignored once older than the grace period.
#[tokio::test]
async fn orphaned_ref_lists_expire() {
    let (store, origin) = mem_store();
    let scope = owner("orphan");
    store
        .put_bytes(&scope, "a", &data(12, 2 * C), no_meta())
        .await
        .unwrap();
    let tag = store.scope_tag(&scope).unwrap();
    origin
        .delete(&hearth_store::manifest::manifest_path(&tag, "a"))
        .await
        .unwrap();
    let r = collect(&store, HOUR).await.unwrap();
    assert_eq!((r.deleted, r.orphan_refs, r.ref_lists), (0, 0, 1));
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.deleted, r.orphan_refs, r.ref_lists), (2, 1, 0));
    // Deleting the name cleans the leftover ref list.
    assert!(matches!(
        store.delete(&scope, "a").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(objects(origin.as_ref(), "").await.is_empty());
}

#[tokio::test]
async fn replacing_a_manifest_releases_the_old_chunks() {
    let (store, origin) = mem_store();
    let scope = owner("replace");
    store
        .put_bytes(&scope, "latest", &data(13, 2 * C), no_meta())
        .await
        .unwrap();
    let v2 = data(14, C);
    store
        .put_bytes(&scope, "latest", &v2, no_meta())
        .await
        .unwrap();
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.deleted, r.kept), (2, 1));
    assert_eq!(chunk_ids(origin.as_ref()).await.len(), 1);
    assert_eq!(store.get_bytes(&scope, "latest").await.unwrap(), v2);
}

#[tokio::test]
async fn gc_on_a_local_origin() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::local(&dir.path().join("store"), None, secrets()).unwrap();
    let scope = owner("disk");
    let a = data(15, 2 * C);
    store.put_bytes(&scope, "x/a", &a, no_meta()).await.unwrap();
    store
        .put_bytes(&scope, "x/b", &data(16, C), no_meta())
        .await
        .unwrap();
    store.delete(&scope, "x/b").await.unwrap();
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!((r.scanned, r.deleted, r.kept), (3, 1, 2));
    assert_eq!(store.get_bytes(&scope, "x/a").await.unwrap(), a);
    store.delete(&scope, "x/a").await.unwrap();
    let r = collect(&store, Duration::ZERO).await.unwrap();
    assert_eq!(r.deleted, 2);
    let usage = store.usage().await.unwrap();
    assert_eq!((usage.chunks, usage.manifests), (0, 0));
}

/// Issue 7, item 5: `hearth up` collected with a 1 h grace while puts re-freshened reused
/// chunks only past 12 h. A put that reuses a released chunk two hours old, with a sweep
/// running before the put writes its ref list, must not lose the chunk: not with the put in the
/// collector's own store (pins), nor from another process (freshening age below the grace).
#[tokio::test]
async fn regression_7_5_put_reusing_an_old_released_chunk_during_a_sweep() {
    for same_store in [true, false] {
        let probe = Probe::new(Arc::new(InMemory::new()));
        let collector =
            ChunkStore::with_object_store(probe.clone(), None, secrets()).with_gc_grace(HOUR);
        let store = if same_store {
            collector.clone()
        } else {
            other_process(probe.clone(), HOUR)
        };
        let scope = owner("reuse");
        let payload = data(17, C + 100);
        store
            .put_bytes(&scope, "old", &payload, no_meta())
            .await
            .unwrap();
        store.delete(&scope, "old").await.unwrap();
        probe.set_chunk_age(2 * HOUR);

        // The put has looked at (and reused) both chunks; it is about to write its ref list.
        let held = probe.hold("put", "refs/");
        let put = tokio::spawn({
            let (store, scope, payload) = (store.clone(), scope.clone(), payload.clone());
            async move { store.put_bytes(&scope, "new", &payload, no_meta()).await }
        });
        held.reached.await.unwrap();
        let r = collector.collect_garbage().await.unwrap();
        held.release.send(()).unwrap();
        put.await.unwrap().unwrap();
        assert_eq!(r.deleted, 0, "same store {same_store}: {r:?}");
        assert_eq!(store.get_bytes(&scope, "new").await.unwrap(), payload);
    }
}
