//! [`ChunkStore`]: puts, gets, listing and deletion over an origin and an optional cache.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::CHUNK_SIZE;
use crate::cache::ChunkCache;
use crate::crypto::{self, SealedChunk};
use crate::error::StoreError;
use crate::keys::{Scope, ScopeKeys, Secrets};
use crate::manifest::{
    self, ChunkId, ChunkRef, MANIFESTS_DIR, Manifest, ManifestInfo, chunk_path, manifest_path,
    refs_path, validate_name, validate_prefix,
};
use crate::pin::{ChunkPin, Pins};

/// Chunks a put encrypts and uploads at once.
pub const PUT_PARALLELISM: usize = 4;
/// Chunks a get fetches at once.
pub const GET_PARALLELISM: usize = 8;
/// Default for [`ChunkStore::with_gc_grace`]: 24 h (reused chunks are freshened past 12 h).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Chunk and manifest counts of the origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Stored chunks.
    pub chunks: u64,
    /// Stored chunk bytes (ciphertext).
    pub bytes: u64,
    /// Stored manifests, all scopes.
    pub manifests: u64,
}

/// A chunk fetch in progress: resolves to the hash-verified ciphertext.
type Flight = Shared<BoxFuture<'static, Result<Bytes, StoreError>>>;

pub(crate) struct Inner {
    pub(crate) origin: Arc<dyn ObjectStore>,
    cache: Option<ChunkCache>,
    secrets: Secrets,
    /// Chunk fetches in progress, so concurrent readers of one chunk share one fetch.
    flights: Mutex<HashMap<ChunkId, Flight>>,
    /// Chunks puts of this store are using, which its collector must not delete.
    pub(crate) pins: Arc<Pins>,
}

/// The chunk store: content-addressed, convergently encrypted artifacts over an origin object
/// store, with an optional local disk cache. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct ChunkStore {
    pub(crate) inner: Arc<Inner>,
    /// The one setting of collection safety; see [`ChunkStore::with_gc_grace`].
    pub(crate) gc_grace: Duration,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("origin", &self.inner.origin.to_string())
            .field("cache", &self.inner.cache)
            .field("gc_grace", &self.gc_grace)
            .finish_non_exhaustive()
    }
}

/// Removes a flight from the table when its task ends, even by panic.
struct FlightGuard {
    inner: Arc<Inner>,
    id: ChunkId,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        flights(&self.inner).remove(&self.id);
    }
}

fn flights(inner: &Inner) -> MutexGuard<'_, HashMap<ChunkId, Flight>> {
    // The map is consistent after every critical section, so a poisoned lock is usable.
    inner
        .flights
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Age of an object at `now`; zero for times in the future (clock skew).
pub(crate) fn age(
    now: chrono::DateTime<chrono::Utc>,
    then: chrono::DateTime<chrono::Utc>,
) -> Duration {
    (now - then).to_std().unwrap_or(Duration::ZERO)
}

/// An origin in a local directory (created if missing): writes are fsynced, and the empty
/// directories deletes leave are removed.
pub fn local_origin(origin_dir: &Path) -> Result<Arc<dyn ObjectStore>, StoreError> {
    std::fs::create_dir_all(origin_dir).map_err(|e| StoreError::io(origin_dir, e))?;
    let origin = LocalFileSystem::new_with_prefix(origin_dir)?
        .with_automatic_cleanup(true)
        .with_fsync(true);
    Ok(Arc::new(origin))
}

impl ChunkStore {
    /// A store whose origin is a local directory (created if missing), with an optional disk
    /// cache `(directory, max bytes)`.
    pub fn local(
        origin_dir: &Path,
        cache_dir: Option<(&Path, u64)>,
        secrets: Secrets,
    ) -> Result<Self, StoreError> {
        let origin = local_origin(origin_dir)?;
        let cache = match cache_dir {
            Some((dir, max)) => Some(ChunkCache::open(dir, max)?),
            None => None,
        };
        Ok(Self::with_object_store(origin, cache, secrets))
    }

    /// A store over any object store (in memory, local, S3-compatible).
    pub fn with_object_store(
        origin: Arc<dyn ObjectStore>,
        cache: Option<ChunkCache>,
        secrets: Secrets,
    ) -> Self {
        ChunkStore {
            inner: Arc::new(Inner {
                origin,
                cache,
                secrets,
                flights: Mutex::new(HashMap::new()),
                pins: Arc::new(Pins::default()),
            }),
            gc_grace: DEFAULT_GC_GRACE,
        }
    }

    /// Sets the collector's grace period (default [`DEFAULT_GC_GRACE`]): unreferenced chunks
    /// younger than this survive [`ChunkStore::collect_garbage`]. The freshening age of puts
    /// follows from it ([`ChunkStore::freshen_after`], half of it), so the two cannot be set
    /// apart. Every process that puts into or collects one origin should use the same grace.
    pub fn with_gc_grace(mut self, grace: Duration) -> Self {
        self.gc_grace = grace;
        self
    }

    /// The collector's grace period.
    pub fn gc_grace(&self) -> Duration {
        self.gc_grace
    }

    /// How old an existing chunk may be before a put that reuses it rewrites it (same bytes)
    /// to refresh its modification time: half the grace period. The other half is the margin
    /// for the put itself (and for clock skew) between its look at the chunk and its ref
    /// list; see the crate docs.
    pub fn freshen_after(&self) -> Duration {
        self.gc_grace / 2
    }

    /// The origin object store.
    pub fn origin(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.origin
    }

    /// The disk cache, if any.
    pub fn cache(&self) -> Option<&ChunkCache> {
        self.inner.cache.as_ref()
    }

    /// The directory name of `scope` under `manifests/` and `refs/` in the origin: `shared`, or
    /// `o-` and a keyed hash of the owner id (for operators mapping an owner to its objects).
    pub fn scope_tag(&self, scope: &Scope) -> Result<String, StoreError> {
        Ok(self.inner.secrets.scope_keys(scope)?.tag)
    }

    fn keys(&self, scope: &Scope) -> Result<Arc<ScopeKeys>, StoreError> {
        Ok(Arc::new(self.inner.secrets.scope_keys(scope)?))
    }

    // ----- put -----

    /// Stores `data` as manifest `name` of `scope`, replacing any manifest of that name.
    pub async fn put_bytes(
        &self,
        scope: &Scope,
        name: &str,
        data: &[u8],
        meta: BTreeMap<String, String>,
    ) -> Result<ManifestInfo, StoreError> {
        // Index-based (not `data.chunks()`): a closure over `&[u8]` items would make the
        // future's `Send` bound depend on a higher-ranked lifetime that `tokio::spawn` rejects.
        let chunks = stream::iter((0..data.len().div_ceil(CHUNK_SIZE)).map(move |i| {
            let end = data.len().min((i + 1) * CHUNK_SIZE);
            Ok::<_, StoreError>(Bytes::copy_from_slice(&data[i * CHUNK_SIZE..end]))
        }));
        self.put_stream(scope, name, chunks, meta).await
    }

    /// Stores the file at `path` as manifest `name` of `scope`, reading it chunk by chunk (at
    /// most a few chunks are in memory at once).
    pub async fn put_file(
        &self,
        scope: &Scope,
        name: &str,
        path: &Path,
        meta: BTreeMap<String, String>,
    ) -> Result<ManifestInfo, StoreError> {
        validate_name(name)?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StoreError::io(path, e))?;
        let path_buf = path.to_owned();
        let chunks = stream::try_unfold((file, false), move |(mut file, at_end)| {
            let path = path_buf.clone();
            async move {
                if at_end {
                    return Ok(None);
                }
                let mut buf = vec![0u8; CHUNK_SIZE];
                let mut filled = 0;
                while filled < CHUNK_SIZE {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| StoreError::io(&path, e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok(None);
                }
                buf.truncate(filled);
                Ok(Some((Bytes::from(buf), (file, filled < CHUNK_SIZE))))
            }
        });
        self.put_stream(scope, name, chunks, meta).await
    }

    /// The put protocol: chunks (in parallel, order kept), then the ref list, then the sealed
    /// manifest.
    async fn put_stream<S>(
        &self,
        scope: &Scope,
        name: &str,
        chunks: S,
        meta: BTreeMap<String, String>,
    ) -> Result<ManifestInfo, StoreError>
    where
        S: Stream<Item = Result<Bytes, StoreError>> + Send,
    {
        validate_name(name)?;
        let keys = self.keys(scope)?;
        // Each chunk is pinned before the put looks at it, and every pin is held until the
        // manifest is written (or the put fails): this store's collector leaves them alone.
        let stored: Vec<(ChunkRef, Option<u64>, ChunkPin)> = chunks
            .map(|plaintext| {
                let keys = keys.clone();
                async move {
                    let plaintext = plaintext?;
                    let secret = keys.chunk_secret;
                    let sealed = tokio::task::spawn_blocking(move || {
                        crypto::seal_chunk(&secret, &plaintext)
                    })
                    .await?;
                    let pin = self.inner.pins.pin(sealed.id).await;
                    let uploaded = self.store_chunk(&sealed).await?;
                    Ok::<_, StoreError>((sealed.chunk_ref(), uploaded, pin))
                }
            })
            .buffered(PUT_PARALLELISM)
            .try_collect()
            .await?;

        let mut info = ManifestInfo {
            name: name.to_owned(),
            size: 0,
            chunks: stored.len(),
            new_chunks: 0,
            new_bytes: 0,
            meta: meta.clone(),
        };
        let mut refs = Vec::with_capacity(stored.len());
        let mut pins = Vec::with_capacity(stored.len());
        for (chunk, uploaded, pin) in stored {
            info.size += u64::from(chunk.len);
            if let Some(bytes) = uploaded {
                info.new_chunks += 1;
                info.new_bytes += bytes;
            }
            refs.push(chunk);
            pins.push(pin);
        }
        let manifest = Manifest {
            size: info.size,
            chunks: refs,
            meta,
        };
        let origin = &self.inner.origin;
        let ref_list = manifest::encode_refs(&manifest.chunk_ids());
        origin
            .put(&refs_path(&keys.tag, name), PutPayload::from(ref_list))
            .await?;
        let sealed = crypto::seal_manifest(&keys, name, &manifest);
        origin
            .put(&manifest_path(&keys.tag, name), PutPayload::from(sealed))
            .await?;
        // Referenced now: the ref list protects the chunks from here on.
        drop(pins);
        tracing::debug!(
            scope = %keys.tag,
            name,
            size = info.size,
            chunks = info.chunks,
            new_chunks = info.new_chunks,
            "stored artifact"
        );
        Ok(info)
    }

    /// Makes sure the origin holds `sealed`, uploading it only if absent (put-if-absent). An
    /// existing copy older than [`ChunkStore::freshen_after`] is rewritten (same bytes) to
    /// refresh its modification time, so another process's collector cannot take it while
    /// this put is writing its manifest. Returns the bytes uploaded, if it was new.
    async fn store_chunk(&self, sealed: &SealedChunk) -> Result<Option<u64>, StoreError> {
        let origin = &self.inner.origin;
        let path = chunk_path(&sealed.id);
        let payload = || PutPayload::from(sealed.ciphertext.clone());
        match origin.head(&path).await {
            Ok(meta) => {
                if age(chrono::Utc::now(), meta.last_modified) >= self.freshen_after() {
                    origin
                        .put_opts(&path, payload(), PutOptions::from(PutMode::Overwrite))
                        .await?;
                    tracing::trace!(chunk = %sealed.id, "freshened chunk");
                }
                Ok(None)
            }
            Err(e) if is_not_found(&e) => {
                match origin
                    .put_opts(&path, payload(), PutOptions::from(PutMode::Create))
                    .await
                {
                    Ok(_) => Ok(Some(sealed.ciphertext.len() as u64)),
                    // Someone stored it between our look and our put: deduplicated.
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    // ----- get -----

    /// Opens manifest `name` of `scope`.
    pub async fn manifest(&self, scope: &Scope, name: &str) -> Result<Manifest, StoreError> {
        validate_name(name)?;
        let keys = self.keys(scope)?;
        self.open_manifest(&keys, name).await
    }

    async fn open_manifest(&self, keys: &ScopeKeys, name: &str) -> Result<Manifest, StoreError> {
        let data = match self.inner.origin.get(&manifest_path(&keys.tag, name)).await {
            Ok(r) => r.bytes().await?,
            Err(e) if is_not_found(&e) => {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        crypto::open_manifest(keys, name, &data)
    }

    /// Reads artifact `name` of `scope` whole into memory.
    pub async fn get_bytes(&self, scope: &Scope, name: &str) -> Result<Vec<u8>, StoreError> {
        validate_name(name)?;
        let keys = self.keys(scope)?;
        let manifest = self.open_manifest(&keys, name).await?;
        let mut out = Vec::with_capacity(usize::try_from(manifest.size).unwrap_or(0));
        let mut chunks = self.chunk_stream(&keys, &manifest);
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Reads artifact `name` of `scope` into the file `dest`: chunks are fetched
    /// [`GET_PARALLELISM`] at a time, written to a temporary file beside `dest`, synced, and
    /// renamed over `dest`. On error `dest` is untouched.
    pub async fn get_to_file(
        &self,
        scope: &Scope,
        name: &str,
        dest: &Path,
    ) -> Result<ManifestInfo, StoreError> {
        self.get_to_file_with_progress(scope, name, dest, |_, _| {})
            .await
    }

    /// [`ChunkStore::get_to_file`], calling `progress(bytes_written, total)` after each chunk.
    pub async fn get_to_file_with_progress(
        &self,
        scope: &Scope,
        name: &str,
        dest: &Path,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<ManifestInfo, StoreError> {
        validate_name(name)?;
        let keys = self.keys(scope)?;
        let manifest = self.open_manifest(&keys, name).await?;
        let tmp = temp_path_beside(dest);
        let written = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| StoreError::io(&tmp, e))?;
            let mut done = 0u64;
            let mut chunks = self.chunk_stream(&keys, &manifest);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| StoreError::io(&tmp, e))?;
                done += chunk.len() as u64;
                progress(done, manifest.size);
            }
            file.flush().await.map_err(|e| StoreError::io(&tmp, e))?;
            file.sync_all().await.map_err(|e| StoreError::io(&tmp, e))?;
            drop(file);
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| StoreError::io(dest, e))
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok(ManifestInfo {
            name: name.to_owned(),
            size: manifest.size,
            chunks: manifest.chunks.len(),
            new_chunks: 0,
            new_bytes: 0,
            meta: manifest.meta,
        })
    }

    /// Reads and verifies one chunk of a manifest of `scope` (for lazy readers that fetch only
    /// the chunks they touch).
    pub async fn get_chunk(&self, scope: &Scope, chunk: &ChunkRef) -> Result<Bytes, StoreError> {
        let keys = self.keys(scope)?;
        self.read_chunk(&keys, chunk).await
    }

    /// The manifest's chunks in order, fetched [`GET_PARALLELISM`] at a time.
    fn chunk_stream<'a>(
        &'a self,
        keys: &'a ScopeKeys,
        manifest: &'a Manifest,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'a {
        stream::iter(0..manifest.chunks.len())
            .map(move |i| self.read_chunk(keys, &manifest.chunks[i]))
            .buffered(GET_PARALLELISM)
    }

    /// One chunk, fully verified: ciphertext hash, AEAD tag, length, plaintext key.
    async fn read_chunk(&self, keys: &ScopeKeys, chunk: &ChunkRef) -> Result<Bytes, StoreError> {
        let ciphertext = self.fetch(chunk.id).await?;
        let secret = keys.chunk_secret;
        let c = chunk.clone();
        let plaintext =
            tokio::task::spawn_blocking(move || crypto::open_chunk(&secret, &c, &ciphertext))
                .await??;
        Ok(Bytes::from(plaintext))
    }

    /// The ciphertext of `id`, hash-verified, from the cache or the origin; concurrent callers
    /// for one id share one fetch.
    async fn fetch(&self, id: ChunkId) -> Result<Bytes, StoreError> {
        let flight = {
            let mut table = flights(&self.inner);
            match table.get(&id) {
                Some(f) => f.clone(),
                None => {
                    let this = self.clone();
                    // A task, so the fetch (and the cache fill) completes even if every
                    // waiter goes away.
                    let task = tokio::spawn(async move {
                        let _guard = FlightGuard {
                            inner: this.inner.clone(),
                            id,
                        };
                        this.fetch_uncoalesced(id).await
                    });
                    let flight: Flight = async move { task.await? }.boxed().shared();
                    table.insert(id, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    async fn fetch_uncoalesced(&self, id: ChunkId) -> Result<Bytes, StoreError> {
        if let Some(cache) = &self.inner.cache {
            match cache.get(&id).await {
                Ok(Some(data)) => {
                    if verify_blocking(id, data.clone()).await? {
                        return Ok(data);
                    }
                    tracing::warn!(chunk = %id, "corrupt chunk in the cache; dropping it and fetching from the origin");
                    if let Err(e) = cache.remove(&id).await {
                        tracing::warn!(chunk = %id, error = %e, "could not drop corrupt cached chunk");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(chunk = %id, error = %e, "chunk cache read failed; fetching from the origin");
                }
            }
        }
        let data = match self.inner.origin.get(&chunk_path(&id)).await {
            Ok(r) => r.bytes().await?,
            Err(e) if is_not_found(&e) => return Err(StoreError::MissingChunk { chunk: id }),
            Err(e) => return Err(e.into()),
        };
        if !verify_blocking(id, data.clone()).await? {
            tracing::warn!(chunk = %id, "corrupt chunk in the origin");
            return Err(StoreError::Corrupt { chunk: id });
        }
        if let Some(cache) = &self.inner.cache {
            if let Err(e) = cache.insert(&id, data.clone()).await {
                tracing::warn!(chunk = %id, error = %e, "could not cache chunk");
            }
        }
        Ok(data)
    }

    // ----- delete, list, usage -----

    /// Removes manifest `name` of `scope` (the manifest first, then its ref list). Its chunks
    /// stay until the collector finds them unreferenced. `NotFound` if there was no manifest
    /// (a leftover ref list is removed all the same).
    pub async fn delete(&self, scope: &Scope, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        let keys = self.keys(scope)?;
        let origin = &self.inner.origin;
        let mpath = manifest_path(&keys.tag, name);
        let existed = match origin.head(&mpath).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(e.into()),
        };
        if existed {
            delete_if_present(origin.as_ref(), &mpath).await?;
        }
        delete_if_present(origin.as_ref(), &refs_path(&keys.tag, name)).await?;
        if existed {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                name: name.to_owned(),
            })
        }
    }

    /// Names of the manifests of `scope` that start with `prefix` (a plain string prefix),
    /// sorted.
    pub async fn list(&self, scope: &Scope, prefix: &str) -> Result<Vec<String>, StoreError> {
        validate_prefix(prefix)?;
        let keys = self.keys(scope)?;
        // List the deepest directory the prefix names, then filter by the string prefix.
        let dir = match prefix.rfind('/') {
            Some(i) => format!("{MANIFESTS_DIR}/{}/{}", keys.tag, &prefix[..i]),
            None => format!("{MANIFESTS_DIR}/{}", keys.tag),
        };
        let mut names: Vec<String> = self
            .inner
            .origin
            .list(Some(&ObjectPath::from(dir)))
            .try_filter_map(|meta| {
                let name = manifest::split_tagged(MANIFESTS_DIR, &meta.location)
                    .map(|(_, name)| name)
                    .filter(|name| name.starts_with(prefix));
                futures::future::ready(Ok(name))
            })
            .try_collect()
            .await?;
        names.sort();
        Ok(names)
    }

    /// Chunk count and bytes in the origin, and the number of manifests.
    pub async fn usage(&self) -> Result<Usage, StoreError> {
        let origin = &self.inner.origin;
        let mut usage = Usage::default();
        let mut chunks = origin.list(Some(&ObjectPath::from(manifest::CHUNKS_DIR)));
        while let Some(meta) = chunks.try_next().await? {
            if manifest::chunk_id_of(&meta.location).is_some() {
                usage.chunks += 1;
                usage.bytes += meta.size;
            }
        }
        let mut manifests = origin.list(Some(&ObjectPath::from(MANIFESTS_DIR)));
        while manifests.try_next().await?.is_some() {
            usage.manifests += 1;
        }
        Ok(usage)
    }
}

/// Deletes `path`, treating "already gone" as success.
pub(crate) async fn delete_if_present(
    origin: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<(), StoreError> {
    match origin.delete(path).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn verify_blocking(id: ChunkId, data: Bytes) -> Result<bool, StoreError> {
    Ok(tokio::task::spawn_blocking(move || crypto::ciphertext_matches(&id, &data)).await?)
}

/// `<dir>/.<file name>.tmp-<random>`: same directory (so the rename is atomic), unique (so two
/// concurrent downloads to one destination do not interleave).
fn temp_path_beside(dest: &Path) -> PathBuf {
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".to_owned());
    let tmp_name = format!(".{file_name}.tmp-{:016x}", rand::random::<u64>());
    match dest.parent() {
        Some(parent) => parent.join(tmp_name),
        None => PathBuf::from(tmp_name),
    }
}
