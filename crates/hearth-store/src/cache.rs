//! The worker-local disk tier: a bounded directory of ciphertext chunks.
//!
//! Files are named by chunk id (`<dir>/<first two hex digits>/<id>`) and hold exactly the bytes
//! the origin holds, so the cache needs no index: reopening the directory after a restart finds
//! every chunk again. Writes go to `<dir>/tmp/` and are renamed into place, so a crash never
//! leaves a half-written chunk under its name; a chunk that rots on disk anyway is caught by the
//! store's verification, dropped and fetched again.
//!
//! The bound is in bytes. Recency is kept in memory (a tick per access) and mirrored in each
//! file's modification time, which a hit refreshes; on open the files are ranked by that time,
//! so least-recently-used order survives restarts. When an insert takes the total over the
//! bound, the least recently used chunks are deleted until it fits.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

use crate::error::StoreError;
use crate::manifest::ChunkId;

/// A bounded, persistent, least-recently-used directory of ciphertext chunks. Cheap to clone.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<CacheInner>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.inner.dir)
            .field("max_bytes", &self.inner.max_bytes)
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

struct CacheInner {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<ChunkId, Entry>,
    /// tick → id, oldest first.
    lru: BTreeMap<u64, ChunkId>,
    total: u64,
    tick: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    tick: u64,
}

impl CacheState {
    fn touch(&mut self, id: &ChunkId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(id) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *id);
        }
    }

    fn add(&mut self, id: ChunkId, size: u64) {
        if self.entries.contains_key(&id) {
            self.touch(&id);
            return;
        }
        self.tick += 1;
        self.entries.insert(
            id,
            Entry {
                size,
                tick: self.tick,
            },
        );
        self.lru.insert(self.tick, id);
        self.total += size;
    }

    fn forget(&mut self, id: &ChunkId) -> bool {
        match self.entries.remove(id) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.total -= e.size;
                true
            }
            None => false,
        }
    }

    /// Removes least recently used entries until the total fits; returns them.
    fn evict_to(&mut self, max_bytes: u64) -> Vec<ChunkId> {
        let mut victims = Vec::new();
        while self.total > max_bytes {
            let Some((_, id)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&id) {
                self.total -= e.size;
            }
            victims.push(id);
        }
        victims
    }
}

impl ChunkCache {
    /// Opens (creating if needed) a cache directory bounded to `max_bytes`, indexing the chunks
    /// already there and evicting down to the bound.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let tmp = dir.join("tmp");
        // Leftovers of writes interrupted by a crash.
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&tmp, e)),
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;

        let mut found: Vec<(SystemTime, ChunkId, u64)> = Vec::new();
        for fan in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let fan = fan.map_err(|e| StoreError::io(dir, e))?;
            let fan_name = fan.file_name();
            let Some(fan_name) = fan_name.to_str() else {
                continue;
            };
            if fan_name.len() != 2 || !fan.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let fan_path = fan.path();
            for file in std::fs::read_dir(&fan_path).map_err(|e| StoreError::io(&fan_path, e))? {
                let file = file.map_err(|e| StoreError::io(&fan_path, e))?;
                let Some(id) = file
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<ChunkId>().ok())
                else {
                    continue;
                };
                if id.to_hex()[..2] != *fan_name {
                    continue;
                }
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, id, meta.len()));
            }
        }
        found.sort();
        let mut state = CacheState::default();
        for (_, id, size) in found {
            state.add(id, size);
        }
        let victims = state.evict_to(max_bytes);
        let cache = ChunkCache {
            inner: Arc::new(CacheInner {
                dir: dir.to_owned(),
                max_bytes,
                state: Mutex::new(state),
            }),
        };
        for id in victims {
            let path = cache.path_of(&id);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(StoreError::io(path, e));
                }
            }
        }
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// Bytes of chunks held now.
    pub fn used_bytes(&self) -> u64 {
        self.state().total
    }

    /// Number of chunks held now.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// Whether the cache holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache holds `id` (without counting as an access).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state().entries.contains_key(id)
    }

    /// Where the file of `id` lives.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.inner.dir.join(&hex[..2]).join(hex)
    }

    fn state(&self) -> MutexGuard<'_, CacheState> {
        // The state is consistent after every critical section, so a poisoned lock is usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads `id` if the cache holds it, counting as an access. The bytes are not verified
    /// here: the caller checks them and calls [`ChunkCache::remove`] on a mismatch.
    pub async fn get(&self, id: &ChunkId) -> Result<Option<Bytes>, StoreError> {
        if !self.contains(id) {
            return Ok(None);
        }
        let path = self.path_of(id);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut file = std::fs::File::open(&path)?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            // Keep recency across restarts; best effort.
            let _ = file.set_modified(SystemTime::now());
            Ok(data)
        })
        .await?;
        match read {
            Ok(data) => {
                self.state().touch(id);
                Ok(Some(Bytes::from(data)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Deleted behind our back (or by a racing eviction): a miss.
                self.state().forget(id);
                Ok(None)
            }
            Err(e) => Err(StoreError::io(self.path_of(id), e)),
        }
    }

    /// Stores verified ciphertext of `id`, evicting least recently used chunks to stay within
    /// the bound. A chunk larger than the whole bound is not cached.
    pub async fn insert(&self, id: &ChunkId, data: Bytes) -> Result<(), StoreError> {
        let size = data.len() as u64;
        if size > self.inner.max_bytes {
            return Ok(());
        }
        if self.contains(id) {
            self.state().touch(id);
            return Ok(());
        }
        let path = self.path_of(id);
        let tmp = self.inner.dir.join("tmp").join(format!(
            "{}.{:016x}",
            id.to_hex(),
            rand::random::<u64>()
        ));
        let (p, t) = (path.clone(), tmp.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&t, &data)?;
            std::fs::rename(&t, &p)
        })
        .await?;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::io(path, e));
        }
        let victims = {
            let mut state = self.state();
            state.add(*id, size);
            state.evict_to(self.inner.max_bytes)
        };
        if !victims.is_empty() {
            tracing::debug!(evicted = victims.len(), "chunk cache over its bound");
            self.delete_files(victims).await?;
        }
        Ok(())
    }

    /// Drops `id` (a corrupt copy, say).
    pub async fn remove(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.state().forget(id);
        self.delete_files(vec![*id]).await
    }

    async fn delete_files(&self, ids: Vec<ChunkId>) -> Result<(), StoreError> {
        let paths: Vec<PathBuf> = ids.iter().map(|id| self.path_of(id)).collect();
        tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(path, e)),
                }
            }
            Ok(())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of_ciphertext(&[n])
    }

    #[tokio::test]
    async fn lru_eviction_keeps_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1000).unwrap();
        for n in 0..5u8 {
            cache
                .insert(&id(n), Bytes::from(vec![n; 300]))
                .await
                .unwrap();
            assert!(cache.used_bytes() <= 1000);
            // Keep chunk 0 hot.
            assert!(cache.get(&id(0)).await.unwrap().is_some());
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.contains(&id(0)), "recently used survives");
        assert!(cache.contains(&id(4)));
        assert!(!cache.contains(&id(1)) && !cache.contains(&id(2)));
        assert!(!cache.path_of(&id(1)).exists(), "evicted file deleted");
        assert_eq!(cache.get(&id(4)).await.unwrap().unwrap(), vec![4u8; 300]);

        // Too big for the whole cache: not cached.
        cache
            .insert(&id(9), Bytes::from(vec![9; 1001]))
            .await
            .unwrap();
        assert!(!cache.contains(&id(9)));
    }

    #[tokio::test]
    async fn survives_reopen_in_lru_order_and_shrinks_to_a_new_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = ChunkCache::open(dir.path(), 10_000).unwrap();
            for n in 0..4u8 {
                cache
                    .insert(&id(n), Bytes::from(vec![n; 100]))
                    .await
                    .unwrap();
                // Distinct modification times.
                let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + n as u64);
                std::fs::File::open(cache.path_of(&id(n)))
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
        // A leftover temporary file and a stray file are ignored.
        std::fs::write(dir.path().join("tmp/junk"), b"x").unwrap();
        std::fs::write(dir.path().join("README"), b"x").unwrap();
        let cache = ChunkCache::open(dir.path(), 250).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.used_bytes(), 200);
        assert!(cache.contains(&id(2)) && cache.contains(&id(3)));
        assert!(!dir.path().join("tmp/junk").exists());
        assert_eq!(cache.get(&id(3)).await.unwrap().unwrap(), vec![3u8; 100]);

        // A file removed behind the cache's back is a miss, not an error.
        std::fs::remove_file(cache.path_of(&id(2))).unwrap();
        assert!(cache.get(&id(2)).await.unwrap().is_none());
        assert!(!cache.contains(&id(2)));
        assert_eq!(cache.used_bytes(), 100);
        cache.remove(&id(3)).await.unwrap();
        assert!(cache.is_empty());
        assert_eq!(cache.used_bytes(), 0);
    }
}
