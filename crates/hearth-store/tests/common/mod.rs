//! Helpers shared by the integration tests: deterministic data, an in-memory store, and a
//! probing object store wrapper that counts requests and can hold one request at a gate.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use hearth_store::{ChunkId, ChunkStore, GcReport, Secrets, StoreError};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use tokio::sync::oneshot;

pub const C: usize = hearth_store::CHUNK_SIZE;

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn no_meta() -> BTreeMap<String, String> {
    BTreeMap::new()
}

pub fn secrets() -> Secrets {
    Secrets::from_master_key([42; 32])
}

/// A store over a fresh in-memory origin, with a handle on the origin.
pub fn mem_store() -> (ChunkStore, Arc<InMemory>) {
    let origin = Arc::new(InMemory::new());
    let store = ChunkStore::with_object_store(origin.clone(), None, secrets());
    (store, origin)
}

/// One collection of `store`'s origin with grace `grace` (the store's pins still apply).
pub async fn collect(store: &ChunkStore, grace: Duration) -> Result<GcReport, StoreError> {
    store.clone().with_gc_grace(grace).collect_garbage().await
}

/// Another process's store over the same origin: same keys, its own pins.
pub fn other_process(origin: Arc<dyn ObjectStore>, grace: Duration) -> ChunkStore {
    ChunkStore::with_object_store(origin, None, secrets()).with_gc_grace(grace)
}

/// Every object under `prefix`, sorted by location.
pub async fn objects(origin: &dyn ObjectStore, prefix: &str) -> Vec<ObjectMeta> {
    use futures::TryStreamExt;
    let mut all: Vec<ObjectMeta> = origin
        .list(Some(&Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    all.sort_by(|a, b| a.location.cmp(&b.location));
    all
}

pub async fn read(origin: &dyn ObjectStore, path: &Path) -> Bytes {
    origin.get(path).await.unwrap().bytes().await.unwrap()
}

pub async fn write(origin: &dyn ObjectStore, path: &Path, data: Vec<u8>) {
    origin.put(path, PutPayload::from(data)).await.unwrap();
}

/// The ids of the chunks currently in the origin.
pub async fn chunk_ids(origin: &dyn ObjectStore) -> Vec<ChunkId> {
    objects(origin, "chunks")
        .await
        .iter()
        .map(|m| m.location.filename().unwrap().parse().unwrap())
        .collect()
}

/// One request to hold: the first request of kind `op` ("get", "head", "put") whose location
/// starts with `prefix` signals `reached` and waits for `release`.
struct Gate {
    op: &'static str,
    prefix: String,
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// Wraps an object store; counts chunk reads, can delay chunk reads, can hold a request.
#[derive(Debug)]
pub struct Probe {
    pub inner: Arc<dyn ObjectStore>,
    chunk_gets: AtomicUsize,
    chunk_get_delay: Mutex<Option<Duration>>,
    gate: Mutex<Option<Gate>>,
    /// Chunks last written before the time given are reported (to lists and heads) as older
    /// by the duration given, to play out interleavings that need chunks hours old.
    chunk_age: Mutex<Option<(chrono::DateTime<chrono::Utc>, chrono::Duration)>>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gate({} {})", self.op, self.prefix)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Probe({})", self.inner)
    }
}

/// Held request handle: wait for it to be reached, then release it.
pub struct Held {
    pub reached: oneshot::Receiver<()>,
    pub release: oneshot::Sender<()>,
}

impl Probe {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Probe {
            inner,
            chunk_gets: AtomicUsize::new(0),
            chunk_get_delay: Mutex::new(None),
            gate: Mutex::new(None),
            chunk_age: Mutex::new(None),
        })
    }

    pub fn chunk_gets(&self) -> usize {
        self.chunk_gets.load(Ordering::SeqCst)
    }

    pub fn set_chunk_get_delay(&self, d: Option<Duration>) {
        *self.chunk_get_delay.lock().unwrap() = d;
    }

    /// Makes the chunks stored so far look `age` older than they are (to lists and heads);
    /// chunks written (or rewritten) later show their true age.
    pub fn set_chunk_age(&self, age: Duration) {
        let age = chrono::Duration::from_std(age).unwrap();
        *self.chunk_age.lock().unwrap() = Some((chrono::Utc::now(), age));
    }

    fn aged(&self, meta: ObjectMeta) -> ObjectMeta {
        age_meta(*self.chunk_age.lock().unwrap(), meta)
    }

    /// Holds the next `op` request on a location under `prefix`.
    pub fn hold(&self, op: &'static str, prefix: &str) -> Held {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.gate.lock().unwrap() = Some(Gate {
            op,
            prefix: prefix.to_owned(),
            reached: reached_tx,
            release: release_rx,
        });
        Held {
            reached: reached_rx,
            release: release_tx,
        }
    }

    async fn pass(&self, op: &'static str, location: &Path) {
        let gate = {
            let mut g = self.gate.lock().unwrap();
            match &*g {
                Some(gate) if gate.op == op && location.as_ref().starts_with(&gate.prefix) => {
                    g.take()
                }
                _ => None,
            }
        };
        if let Some(gate) = gate {
            let _ = gate.reached.send(());
            let _ = gate.release.await;
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Probe {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.pass("put", location).await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head { "head" } else { "get" };
        self.pass(op, location).await;
        if !options.head && location.as_ref().starts_with("chunks/") {
            self.chunk_gets.fetch_add(1, Ordering::SeqCst);
            let delay = *self.chunk_get_delay.lock().unwrap();
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
        }
        let mut result = self.inner.get_opts(location, options).await?;
        result.meta = self.aged(result.meta);
        Ok(result)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        use futures::StreamExt;
        let age = *self.chunk_age.lock().unwrap();
        self.inner
            .list(prefix)
            .map(move |meta| meta.map(|m| age_meta(age, m)))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn age_meta(
    age: Option<(chrono::DateTime<chrono::Utc>, chrono::Duration)>,
    mut meta: ObjectMeta,
) -> ObjectMeta {
    if let Some((before, by)) = age
        && meta.location.as_ref().starts_with("chunks/")
        && meta.last_modified <= before
    {
        meta.last_modified -= by;
    }
    meta
}
