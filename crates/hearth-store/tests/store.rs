//! Behaviour of the store: round trips, determinism, dedup, scopes, tamper detection, cache.
// Helpers outside `#[test]` functions unwrap too; clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hearth_store::{ChunkCache, ChunkStore, Scope, Secrets, StoreError, TAG_LEN};
use object_store::ObjectStoreExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn owner(o: &str) -> Scope {
    Scope::Owner(o.to_owned())
}

fn scopes() -> impl Strategy<Value = Scope> {
    prop_oneof![Just(Scope::Shared), "[a-z0-9]{1,12}".prop_map(Scope::Owner)]
}

/// put → get returns the same bytes, through memory and through files; checks what the put
/// reports and what the origin holds.
async fn check_round_trip(scope: &Scope, payload: &[u8]) {
    let (store, origin) = mem_store();
    let len = payload.len();
    let meta: BTreeMap<_, _> = [("dep".to_owned(), "rt/python3.12".to_owned())].into();
    let info = store
        .put_bytes(scope, "fn/code.zip", payload, meta.clone())
        .await
        .unwrap();
    assert_eq!(info.name, "fn/code.zip");
    assert_eq!(info.size, len as u64);
    assert_eq!(info.chunks, len.div_ceil(C));
    assert_eq!(info.new_chunks, info.chunks);
    assert_eq!(info.new_bytes, (len + info.chunks * TAG_LEN) as u64);
    assert_eq!(info.meta, meta);
    assert_eq!(
        store.get_bytes(scope, "fn/code.zip").await.unwrap(),
        payload
    );

    let m = store.manifest(scope, "fn/code.zip").await.unwrap();
    assert_eq!(m.size, len as u64);
    assert_eq!(m.meta, meta);
    assert_eq!(m.chunks.len(), info.chunks);
    for (i, c) in m.chunks.iter().enumerate() {
        assert_eq!(c.len as usize, C.min(len - i * C));
        // The origin holds ciphertext: tag-sized longer, and not the plaintext.
        let stored = read(origin.as_ref(), &hearth_store::manifest::chunk_path(&c.id)).await;
        assert_eq!(stored.len(), c.len as usize + TAG_LEN);
        assert_ne!(
            &stored[..c.len as usize],
            &payload[i * C..i * C + c.len as usize]
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, payload).unwrap();
    let info2 = store
        .put_file(scope, "fn/from-file", &src, BTreeMap::new())
        .await
        .unwrap();
    assert_eq!((info2.size, info2.chunks), (info.size, info.chunks));
    assert_eq!(
        info2.new_chunks, 0,
        "same plaintext, same scope: nothing new"
    );
    let m2 = store.manifest(scope, "fn/from-file").await.unwrap();
    assert_eq!(m2.chunks, m.chunks, "file and memory puts chunk alike");
    let dest = dir.path().join("out");
    let got = store
        .get_to_file(scope, "fn/from-file", &dest)
        .await
        .unwrap();
    assert_eq!(got.size, len as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), payload);
}

#[tokio::test]
async fn round_trip_at_chunk_boundaries() {
    for (i, len) in [0, 1, C - 1, C, C + 1, 2 * C, 2 * C + 1]
        .into_iter()
        .enumerate()
    {
        check_round_trip(&Scope::Owner("b".into()), &data(i as u64, len)).await;
    }
}

#[tokio::test]
async fn round_trip_a_few_mib() {
    let len = 3 * 1024 * 1024 + 12345;
    check_round_trip(&Scope::Shared, &data(77, len)).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(len in 0..2 * C + 17, seed in any::<u64>(), scope in scopes()) {
        rt().block_on(check_round_trip(&scope, &data(seed, len)));
    }

    /// Same plaintext and scope ⇒ same chunk ids and ciphertext, even in another store with
    /// the same master key; a different master key ⇒ nothing in common.
    #[test]
    fn deterministic(len in 0..2 * C + 1, seed in any::<u64>(), scope in scopes()) {
        rt().block_on(async {
            let payload = data(seed, len);
            let (a, a_origin) = mem_store();
            let (b, b_origin) = mem_store();
            a.put_bytes(&scope, "x", &payload, no_meta()).await.unwrap();
            b.put_bytes(&scope, "y", &payload, no_meta()).await.unwrap();
            let ma = a.manifest(&scope, "x").await.unwrap();
            let mb = b.manifest(&scope, "y").await.unwrap();
            assert_eq!(ma.chunks, mb.chunks);
            let ids = chunk_ids(a_origin.as_ref()).await;
            assert_eq!(ids, chunk_ids(b_origin.as_ref()).await);
            for id in &ids {
                let p = hearth_store::manifest::chunk_path(id);
                assert_eq!(read(a_origin.as_ref(), &p).await, read(b_origin.as_ref(), &p).await);
            }

            let other = ChunkStore::with_object_store(
                Arc::new(InMemory::new()), None, Secrets::from_master_key([7; 32]));
            other.put_bytes(&scope, "x", &payload, no_meta()).await.unwrap();
            let mo = other.manifest(&scope, "x").await.unwrap();
            let theirs: HashSet<_> = mo.chunks.iter().map(|c| c.id).collect();
            assert!(ma.chunks.iter().all(|c| !theirs.contains(&c.id)));
        });
    }

    /// Same data in two owners, or shared and owned, shares no chunk; one owner's keys cannot
    /// open another's manifest.
    #[test]
    fn scopes_are_separate(len in 1usize..C + C / 2, seed in any::<u64>(), a in "[a-z]{1,8}", b in "[a-z]{1,8}") {
        prop_assume!(a != b);
        let (a, b) = (format!("tenant-{a}"), format!("tenant-{b}"));
        rt().block_on(async {
            let (store, origin) = mem_store();
            let payload = data(seed, len);
            let mut id_sets = Vec::new();
            for scope in [owner(&a), owner(&b), Scope::Shared] {
                let info = store.put_bytes(&scope, "same/name", &payload, no_meta()).await.unwrap();
                assert_eq!(info.new_chunks, info.chunks, "nothing dedupes across scopes");
                let m = store.manifest(&scope, "same/name").await.unwrap();
                id_sets.push(m.chunks.iter().map(|c| c.id).collect::<HashSet<_>>());
            }
            for i in 0..3 {
                for j in i + 1..3 {
                    assert!(id_sets[i].is_disjoint(&id_sets[j]));
                }
            }
            // Owner ids do not appear in the origin.
            for meta in objects(origin.as_ref(), "").await {
                for part in meta.location.parts() {
                    assert!(part.as_ref() != a && part.as_ref() != b);
                }
            }
            // Put owner a's sealed manifest where owner b's is: b cannot open it.
            let path_of = |scope: &Scope| {
                hearth_store::manifest::manifest_path(&store.scope_tag(scope).unwrap(), "same/name")
            };
            let sealed_a = read(origin.as_ref(), &path_of(&owner(&a))).await;
            write(origin.as_ref(), &path_of(&owner(&b)), sealed_a.to_vec()).await;
            let r = store.manifest(&owner(&b), "same/name").await;
            assert!(matches!(r, Err(StoreError::Tampered { .. })), "{r:?}");
            write(origin.as_ref(), &path_of(&Scope::Shared), sealed_a.to_vec()).await;
            assert!(matches!(store.get_bytes(&Scope::Shared, "same/name").await, Err(StoreError::Tampered { .. })));
            assert_eq!(store.get_bytes(&owner(&a), "same/name").await.unwrap(), payload);
            // And a's names are not visible in b's listing of a name only a has.
            store.put_bytes(&owner(&a), "only/a", b"x", no_meta()).await.unwrap();
            assert_eq!(store.list(&owner(&b), "only").await.unwrap(), Vec::<String>::new());
            assert!(matches!(store.get_bytes(&owner(&b), "only/a").await, Err(StoreError::NotFound { .. })));
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any change to a stored chunk (flip a byte, truncate, extend) makes the read fail; the
    /// store never returns different data.
    #[test]
    fn tampered_chunk_is_detected(len in 1usize..C + C / 2, seed in any::<u64>(), which in any::<prop::sample::Index>(), pos in any::<prop::sample::Index>(), how in 0u8..3) {
        rt().block_on(async {
            let (store, origin) = mem_store();
            let payload = data(seed, len);
            let scope = owner("t");
            store.put_bytes(&scope, "a", &payload, no_meta()).await.unwrap();
            let m = store.manifest(&scope, "a").await.unwrap();
            let victim = m.chunks[which.index(m.chunks.len())].id;
            let p = hearth_store::manifest::chunk_path(&victim);
            let mut bytes = read(origin.as_ref(), &p).await.to_vec();
            match how {
                0 => { let i = pos.index(bytes.len()); bytes[i] ^= 0x20; }
                1 => bytes.truncate(pos.index(bytes.len())),
                _ => bytes.push(0),
            }
            write(origin.as_ref(), &p, bytes).await;
            match store.get_bytes(&scope, "a").await {
                Err(StoreError::Corrupt { chunk }) => assert_eq!(chunk, victim),
                other => panic!("expected Corrupt, got {:?}", other.map(|v| v.len())),
            }
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("out");
            assert!(matches!(store.get_to_file(&scope, "a", &dest).await, Err(StoreError::Corrupt { .. })));
            assert!(!dest.exists());
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary file removed");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any change to a sealed manifest makes it fail to open.
    #[test]
    fn tampered_manifest_is_detected(seed in any::<u64>(), pos in any::<prop::sample::Index>(), bit in 0u8..8, truncate in any::<bool>()) {
        rt().block_on(async {
            let (store, origin) = mem_store();
            let scope = owner("m");
            store.put_bytes(&scope, "a", &data(seed, 1000), no_meta()).await.unwrap();
            let p = manifest_location(&store, &scope, "a");
            let mut bytes = read(origin.as_ref(), &p).await.to_vec();
            let i = pos.index(bytes.len());
            if truncate { bytes.truncate(i) } else { bytes[i] ^= 1 << bit }
            write(origin.as_ref(), &p, bytes).await;
            assert!(matches!(store.get_bytes(&scope, "a").await, Err(StoreError::Tampered { .. })));
            assert!(matches!(store.manifest(&scope, "a").await, Err(StoreError::Tampered { .. })));
        });
    }
}

/// Where manifest `name` of `scope` is stored.
fn manifest_location(store: &ChunkStore, scope: &Scope, name: &str) -> Path {
    hearth_store::manifest::manifest_path(&store.scope_tag(scope).unwrap(), name)
}

#[tokio::test]
async fn dedup_within_a_scope() {
    let (store, _origin) = mem_store();
    let scope = owner("dedup");
    let shared_prefix = data(1, 2 * C);
    let mut a = shared_prefix.clone();
    a.extend_from_slice(&data(2, 100));
    let mut b = shared_prefix.clone();
    b.extend_from_slice(&data(3, C + 10));

    let ia = store.put_bytes(&scope, "a", &a, no_meta()).await.unwrap();
    assert_eq!((ia.chunks, ia.new_chunks), (3, 3));
    let usage = store.usage().await.unwrap();
    assert_eq!((usage.chunks, usage.manifests), (3, 1));

    // Same data again, same name and another name: nothing new.
    let again = store.put_bytes(&scope, "a", &a, no_meta()).await.unwrap();
    assert_eq!((again.new_chunks, again.new_bytes), (0, 0));
    let copy = store
        .put_bytes(&scope, "copy/of-a", &a, no_meta())
        .await
        .unwrap();
    assert_eq!(copy.new_chunks, 0);
    // A shared 2-chunk prefix: only the 2 different chunks are new.
    let ib = store.put_bytes(&scope, "b", &b, no_meta()).await.unwrap();
    assert_eq!((ib.chunks, ib.new_chunks), (4, 2));
    assert_eq!(ib.new_bytes, (C + TAG_LEN + 10 + TAG_LEN) as u64);
    let ma = store.manifest(&scope, "a").await.unwrap();
    let mb = store.manifest(&scope, "b").await.unwrap();
    assert_eq!(ma.chunks[..2], mb.chunks[..2]);
    assert_ne!(ma.chunks[2], mb.chunks[2]);

    // Repeated chunks inside one artifact are stored once.
    let zeros = vec![0u8; 3 * C];
    let iz = store
        .put_bytes(&scope, "zeros", &zeros, no_meta())
        .await
        .unwrap();
    assert_eq!((iz.chunks, iz.new_chunks), (3, 1));

    let usage = store.usage().await.unwrap();
    assert_eq!(usage.chunks, 3 + 2 + 1);
    assert_eq!(usage.manifests, 4);
    assert_eq!(store.get_bytes(&scope, "b").await.unwrap(), b);
    assert_eq!(store.get_bytes(&scope, "zeros").await.unwrap(), zeros);
}

#[tokio::test]
async fn swapped_or_substituted_chunks_are_detected() {
    let (store, origin) = mem_store();
    let scope = owner("swap");
    let payload = data(9, 2 * C);
    store
        .put_bytes(&scope, "a", &payload, no_meta())
        .await
        .unwrap();
    let m = store.manifest(&scope, "a").await.unwrap();
    let (p0, p1) = (
        hearth_store::manifest::chunk_path(&m.chunks[0].id),
        hearth_store::manifest::chunk_path(&m.chunks[1].id),
    );
    let (c0, c1) = (
        read(origin.as_ref(), &p0).await,
        read(origin.as_ref(), &p1).await,
    );
    // Swap the two chunks.
    write(origin.as_ref(), &p0, c1.to_vec()).await;
    write(origin.as_ref(), &p1, c0.to_vec()).await;
    assert!(matches!(
        store.get_bytes(&scope, "a").await,
        Err(StoreError::Corrupt { .. })
    ));
    // Substitute a valid chunk of another artifact of the same scope.
    store
        .put_bytes(&scope, "other", &data(10, C), no_meta())
        .await
        .unwrap();
    let other = store.manifest(&scope, "other").await.unwrap();
    let valid = read(
        origin.as_ref(),
        &hearth_store::manifest::chunk_path(&other.chunks[0].id),
    )
    .await;
    write(origin.as_ref(), &p0, valid.to_vec()).await;
    write(origin.as_ref(), &p1, c1.to_vec()).await;
    match store.get_bytes(&scope, "a").await {
        Err(StoreError::Corrupt { chunk }) => assert_eq!(chunk, m.chunks[0].id),
        other => panic!("expected Corrupt, got {:?}", other.map(|v| v.len())),
    }
    // A missing chunk is reported as such.
    origin.delete(&p0).await.unwrap();
    assert!(matches!(
        store.get_bytes(&scope, "a").await,
        Err(StoreError::MissingChunk { .. })
    ));
    // Restored: reads again.
    write(origin.as_ref(), &p0, c0.to_vec()).await;
    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
}

#[tokio::test]
async fn manifest_moved_to_another_name_fails() {
    let (store, origin) = mem_store();
    let scope = Scope::Shared;
    store
        .put_bytes(&scope, "img/a", b"aaa", no_meta())
        .await
        .unwrap();
    store
        .put_bytes(&scope, "img/b", b"bbb", no_meta())
        .await
        .unwrap();
    let a = read(origin.as_ref(), &Path::from("manifests/shared/img/a")).await;
    write(
        origin.as_ref(),
        &Path::from("manifests/shared/img/b"),
        a.to_vec(),
    )
    .await;
    assert!(matches!(
        store.get_bytes(&scope, "img/b").await,
        Err(StoreError::Tampered { .. })
    ));
}

#[tokio::test]
async fn corrupt_cached_chunk_is_dropped_and_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::new(Arc::new(InMemory::new()));
    let cache = ChunkCache::open(&dir.path().join("cache"), 64 * C as u64).unwrap();
    let store = ChunkStore::with_object_store(probe.clone(), Some(cache.clone()), secrets());
    let scope = owner("c");
    let payload = data(5, 3 * C + 7);
    store
        .put_bytes(&scope, "a", &payload, no_meta())
        .await
        .unwrap();
    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
    assert_eq!(probe.chunk_gets(), 4);
    assert_eq!(cache.len(), 4);
    // Second read: all from the cache.
    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
    assert_eq!(probe.chunk_gets(), 4);

    // Corrupt one cached file and truncate another.
    let m = store.manifest(&scope, "a").await.unwrap();
    let f0 = cache.path_of(&m.chunks[0].id);
    let mut bytes = std::fs::read(&f0).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&f0, &bytes).unwrap();
    let f3 = cache.path_of(&m.chunks[3].id);
    std::fs::write(&f3, b"").unwrap();

    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
    assert_eq!(
        probe.chunk_gets(),
        6,
        "exactly the two bad chunks came from the origin"
    );
    // The cache holds good copies again.
    let good = read(
        probe.as_ref(),
        &hearth_store::manifest::chunk_path(&m.chunks[0].id),
    )
    .await;
    assert_eq!(std::fs::read(&f0).unwrap(), good.to_vec());
    assert_eq!(store.get_bytes(&scope, "a").await.unwrap(), payload);
    assert_eq!(
        probe.chunk_gets(),
        7,
        "only the read above went to the origin"
    );

    // Corrupt in the cache and in the origin: an error, not wrong data.
    std::fs::write(&f0, b"junk").unwrap();
    write(
        probe.inner.as_ref(),
        &hearth_store::manifest::chunk_path(&m.chunks[0].id),
        b"junk".to_vec(),
    )
    .await;
    assert!(matches!(
        store.get_bytes(&scope, "a").await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn cache_survives_restart_and_serves_without_origin() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Arc::new(InMemory::new());
    let cache_dir = dir.path().join("cache");
    let scope = Scope::Shared;
    let payload = data(6, 2 * C);
    {
        let cache = ChunkCache::open(&cache_dir, 64 * C as u64).unwrap();
        let store = ChunkStore::with_object_store(origin.clone(), Some(cache), secrets());
        store
            .put_bytes(&scope, "img", &payload, no_meta())
            .await
            .unwrap();
        store.get_bytes(&scope, "img").await.unwrap();
    }
    // Chunks gone from the origin (manifest kept): the reopened cache still serves them.
    for meta in objects(origin.as_ref(), "chunks").await {
        origin.delete(&meta.location).await.unwrap();
    }
    let cache = ChunkCache::open(&cache_dir, 64 * C as u64).unwrap();
    assert_eq!(cache.len(), 2);
    let store = ChunkStore::with_object_store(origin.clone(), Some(cache), secrets());
    assert_eq!(store.get_bytes(&scope, "img").await.unwrap(), payload);
}

#[tokio::test]
async fn cache_stays_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 3 * (C + TAG_LEN) as u64 + 10;
    let cache = ChunkCache::open(dir.path(), bound).unwrap();
    let (origin_store, _) = mem_store();
    let store = ChunkStore::with_object_store(
        origin_store.origin().clone(),
        Some(cache.clone()),
        secrets(),
    );
    let scope = owner("lru");
    let payload = data(8, 10 * C);
    store
        .put_bytes(&scope, "big", &payload, no_meta())
        .await
        .unwrap();
    assert_eq!(store.get_bytes(&scope, "big").await.unwrap(), payload);
    assert_eq!(cache.len(), 3);
    assert!(cache.used_bytes() <= bound);
    let on_disk: u64 = walk(dir.path())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, cache.used_bytes());
    // Read three chunks one by one: they are the ones kept, the rest was evicted.
    let m = store.manifest(&scope, "big").await.unwrap();
    for c in &m.chunks[4..7] {
        store.get_chunk(&scope, c).await.unwrap();
    }
    for (i, c) in m.chunks.iter().enumerate() {
        assert_eq!(cache.contains(&c.id), (4..7).contains(&i), "chunk {i}");
    }
    assert!(cache.used_bytes() <= bound);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn concurrent_readers_share_one_fetch() {
    let probe = Probe::new(Arc::new(InMemory::new()));
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 64 * C as u64).unwrap();
    let store = ChunkStore::with_object_store(probe.clone(), Some(cache), secrets());
    let scope = owner("sf");
    let payload = data(11, 3 * C);
    store
        .put_bytes(&scope, "a", &payload, no_meta())
        .await
        .unwrap();
    probe.set_chunk_get_delay(Some(Duration::from_millis(150)));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            store.get_bytes(&scope, "a").await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), payload);
    }
    assert_eq!(
        probe.chunk_gets(),
        3,
        "one origin read per chunk for 8 readers"
    );
}

#[tokio::test]
async fn local_origin_with_cache_round_trips_files() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = Secrets::load_or_create(&dir.path().join("master.key")).unwrap();
    let cache_dir = dir.path().join("cache");
    let store = ChunkStore::local(
        &dir.path().join("store"),
        Some((&cache_dir, 8 * C as u64)),
        secrets.clone(),
    )
    .unwrap();
    let scope = owner("local");
    let src = dir.path().join("snapshot.img");
    let payload = data(12, 3 * C + 3);
    std::fs::write(&src, &payload).unwrap();
    let meta: BTreeMap<_, _> = [("base".to_owned(), "rt/node22".to_owned())].into();
    let info = store
        .put_file(&scope, "snap/fn1/v1", &src, meta.clone())
        .await
        .unwrap();
    assert_eq!((info.chunks, info.new_chunks), (4, 4));

    let dest = dir.path().join("restore/out.img");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, b"old contents").unwrap();
    let mut seen = Vec::new();
    let got = store
        .get_to_file_with_progress(&scope, "snap/fn1/v1", &dest, |done, total| {
            seen.push((done, total))
        })
        .await
        .unwrap();
    assert_eq!(got.meta, meta);
    assert_eq!(std::fs::read(&dest).unwrap(), payload);
    assert_eq!(seen.len(), 4);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        seen.last(),
        Some(&(payload.len() as u64, payload.len() as u64))
    );
    assert_eq!(
        walk(&dir.path().join("restore")).len(),
        1,
        "no temporary left"
    );

    // Flip a byte of a chunk file on disk, with the cache emptied: Corrupt.
    let m = store.manifest(&scope, "snap/fn1/v1").await.unwrap();
    let hex = m.chunks[2].id.to_hex();
    let file = dir.path().join("store/chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let uncached = ChunkStore::local(&dir.path().join("store"), None, secrets.clone()).unwrap();
    assert!(matches!(
        uncached.get_bytes(&scope, "snap/fn1/v1").await,
        Err(StoreError::Corrupt { .. })
    ));
    // The cached copy is still good and verified, so the cached store still reads.
    assert_eq!(
        store.get_bytes(&scope, "snap/fn1/v1").await.unwrap(),
        payload
    );

    // Listing, deletion, names.
    store
        .put_bytes(&scope, "snap/fn1/v2", b"v2", no_meta())
        .await
        .unwrap();
    store
        .put_bytes(&scope, "snap/fn2/v1", b"x", no_meta())
        .await
        .unwrap();
    store
        .put_bytes(&scope, "code/fn1", b"x", no_meta())
        .await
        .unwrap();
    assert_eq!(
        store.list(&scope, "snap/fn1/").await.unwrap(),
        vec!["snap/fn1/v1", "snap/fn1/v2"]
    );
    assert_eq!(
        store.list(&scope, "snap/fn").await.unwrap(),
        vec!["snap/fn1/v1", "snap/fn1/v2", "snap/fn2/v1"]
    );
    assert_eq!(store.list(&scope, "").await.unwrap().len(), 4);
    assert_eq!(
        store.list(&scope, "nothing/").await.unwrap(),
        Vec::<String>::new()
    );
    store.delete(&scope, "snap/fn1/v2").await.unwrap();
    assert!(matches!(
        store.delete(&scope, "snap/fn1/v2").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get_bytes(&scope, "snap/fn1/v2").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.list(&scope, "snap/fn1/").await.unwrap(),
        vec!["snap/fn1/v1"]
    );

    // The key file persists: a store reopened with it reads the data.
    let reopened = ChunkStore::local(
        &dir.path().join("store"),
        Some((&cache_dir, 8 * C as u64)),
        Secrets::load_or_create(&dir.path().join("master.key")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        reopened.get_bytes(&scope, "snap/fn1/v1").await.unwrap(),
        payload
    );
}

/// Every public future can be spawned (is `Send` for any lifetime).
#[tokio::test]
async fn futures_are_spawnable() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = mem_store();
    let src = dir.path().join("src");
    std::fs::write(&src, data(1, C + 1)).unwrap();
    let dest = dir.path().join("dest");
    let s = store.clone();
    tokio::spawn(async move {
        s.put_bytes(&Scope::Shared, "a", &data(1, C + 1), no_meta())
            .await
            .map(drop)
    })
    .await
    .unwrap()
    .unwrap();
    let s = store.clone();
    tokio::spawn(async move {
        s.put_file(&Scope::Shared, "b", &src, no_meta())
            .await
            .map(drop)
    })
    .await
    .unwrap()
    .unwrap();
    let s = store.clone();
    tokio::spawn(async move { s.get_bytes(&Scope::Shared, "b").await.map(drop) })
        .await
        .unwrap()
        .unwrap();
    let s = store.clone();
    tokio::spawn(async move {
        s.get_to_file_with_progress(&Scope::Shared, "b", &dest, |_, _| {})
            .await
            .map(drop)
    })
    .await
    .unwrap()
    .unwrap();
    let s = store.clone();
    tokio::spawn(async move {
        let m = s.manifest(&Scope::Shared, "a").await?;
        s.get_chunk(&Scope::Shared, &m.chunks[0]).await?;
        s.list(&Scope::Shared, "").await?;
        s.usage().await?;
        s.delete(&Scope::Shared, "a").await?;
        collect(&s, Duration::ZERO).await.map(drop)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(store.list(&Scope::Shared, "").await.unwrap(), vec!["b"]);
}

#[tokio::test]
async fn invalid_names_are_rejected() {
    let (store, origin) = mem_store();
    for bad in ["", "/abs", "a/../b", "..", "a//b", "sp ace", "a/", "x\n"] {
        assert!(
            matches!(
                store.put_bytes(&Scope::Shared, bad, b"x", no_meta()).await,
                Err(StoreError::InvalidName { .. })
            ),
            "{bad:?}"
        );
        assert!(matches!(
            store.get_bytes(&Scope::Shared, bad).await,
            Err(StoreError::InvalidName { .. })
        ));
    }
    assert!(matches!(
        store.list(&Scope::Shared, "/x").await,
        Err(StoreError::InvalidName { .. })
    ));
    assert!(matches!(
        store.put_bytes(&owner(""), "a", b"x", no_meta()).await,
        Err(StoreError::InvalidName { .. })
    ));
    assert!(
        objects(origin.as_ref(), "").await.is_empty(),
        "nothing written"
    );
}
