//! Snapshots (like Lambda SnapStart): a sandbox checkpointed right after init, restored instead
//! of booted on later cold starts.
//!
//! A snapshot is taken when the runtime, started with `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`,
//! reaches the point where it waits for the platform: `restore/next` (runtimes with restore
//! hooks, such as Python's `awslambdaric`, after their before-snapshot hooks) or its first
//! `next` (runtimes without hooks). `runsc checkpoint` writes the image: with uncompressed
//! checkpoints (where the probe found them) three files, `checkpoint.img` (kernel state),
//! `pages_meta.img` and `pages.img` (raw memory, which runsc reads with parallel `pread`s on
//! restore); otherwise one compressed `checkpoint.img`. The metadata records where the runtime
//! waits and what the image depends on (runtime image, code, agent binary, the engine: runsc's
//! version, platform and checkpoint format, memory size). A lookup whose dependencies differ
//! from the current ones is a miss: the worker boots (and takes a new snapshot) instead of
//! attempting a restore that could break.
//!
//! Storage: the image files are packed into one artifact of the chunk store (`hearth-store`:
//! 512 KiB convergently encrypted chunks, in the function owner's key scope), each file starting
//! on a chunk boundary so that identical page runs of two snapshots give identical chunks; the
//! artifact is named `snapshot/<function>/<version>-<revision>`, with the metadata (and where
//! each file sits) in its manifest; any worker can restore it. The worker's directory
//! `<dir>/<function>/<version>-<revision>/{checkpoint.img, pages*.img, snapshot.json}` is its
//! local copy (runsc restores from files): written to a temporary directory and renamed into
//! place, so a crash never leaves a half snapshot; fetched from the chunk store when missing,
//! chunks in parallel, each verified and written straight into its file. A chunk that fails
//! verification makes the lookup a miss: the worker boots.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use hearth_core::invoker::FunctionSpec;
use hearth_store::{ChunkStore, Scope, StoreError};
use serde::{Deserialize, Serialize};

/// Where the checkpointed runtime waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestorePoint {
    /// In `GET /runtime/restore/next`: send `Restore` after restoring, hooks run, then `next`.
    RestoreNext,
    /// In its first `GET /runtime/invocation/next`: ready for an invocation right away.
    Next,
}

/// What `snapshot.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub function: String,
    pub version: String,
    pub revision_id: String,
    pub point: RestorePoint,
    /// What the image depends on; must equal the current values for a restore.
    pub deps: BTreeMap<String, String>,
    /// Init duration when the snapshot was taken.
    pub init_ms: f64,
    /// Size of `checkpoint.img`.
    pub image_bytes: u64,
    /// How long `runsc checkpoint` took.
    pub checkpoint_ms: f64,
    /// The image files and where each sits in the packed artifact (empty in snapshots from
    /// before packing: the artifact is `checkpoint.img`).
    #[serde(default)]
    pub files: Vec<PackedFile>,
}

/// One image file inside the packed snapshot artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedFile {
    pub name: String,
    /// A multiple of the chunk size.
    pub offset: u64,
    pub len: u64,
}

/// The files `runsc checkpoint` may write, in the order they are packed.
pub const IMAGE_FILES: &[&str] = &["checkpoint.img", "pages_meta.img", "pages.img"];

fn align_up(n: u64) -> u64 {
    let c = hearth_store::CHUNK_SIZE as u64;
    n.div_ceil(c) * c
}

/// Pack the image files found in `dir` into `out`, each at a chunk boundary.
pub fn pack(dir: &Path, out: &Path) -> std::io::Result<Vec<PackedFile>> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = fs::File::create(out)?;
    let mut files = Vec::new();
    let mut pos = 0u64;
    for name in IMAGE_FILES {
        let path = dir.join(name);
        let Ok(mut src) = fs::File::open(&path) else {
            continue;
        };
        let offset = align_up(pos);
        file.seek(SeekFrom::Start(offset))?;
        let len = std::io::copy(&mut src, &mut file)?;
        files.push(PackedFile {
            name: name.to_string(),
            offset,
            len,
        });
        pos = offset + len;
    }
    file.flush()?;
    file.set_len(pos)?;
    Ok(files)
}

/// The total size of the image files in `dir`.
pub fn image_size(dir: &Path) -> u64 {
    IMAGE_FILES
        .iter()
        .filter_map(|n| fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

/// Why no snapshot could be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotMiss {
    #[error("no snapshot")]
    Absent,
    #[error("snapshot is stale: {0} changed")]
    Stale(String),
    #[error("snapshot unreadable: {0}")]
    Unreadable(String),
}

/// Errors creating a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshots are not enabled on this worker")]
    Disabled,
    #[error("init failed: {0}")]
    Init(String),
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("snapshot i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
}

/// Snapshots: the chunk store as origin, a local directory as the worker's copy.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
    chunks: Option<ChunkStore>,
}

/// The owner (account) of a function, from its ARN: its code and snapshots are in the owner's
/// key scope.
pub(crate) fn owner_scope(spec: &FunctionSpec) -> Scope {
    owner_of(&spec.arn)
}

fn owner_of(arn: &str) -> Scope {
    let account = arn.split(':').nth(4).unwrap_or("000000000000");
    Scope::Owner(account.to_string())
}

/// The artifact name of one version's snapshot.
fn artifact_name(spec: &FunctionSpec) -> String {
    format!(
        "snapshot/{}/{}-{}",
        safe(&spec.name),
        safe(&spec.version),
        safe(&spec.revision_id)
    )
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl SnapshotStore {
    /// Snapshots kept in `dir` only, or also in a chunk store (the origin every worker shares).
    pub fn new(dir: impl Into<PathBuf>, chunks: Option<ChunkStore>) -> Self {
        SnapshotStore {
            dir: dir.into(),
            chunks,
        }
    }

    /// The directory of one function version's snapshot.
    pub fn dir_for(&self, spec: &FunctionSpec) -> PathBuf {
        self.dir.join(safe(&spec.name)).join(format!(
            "{}-{}",
            safe(&spec.version),
            safe(&spec.revision_id)
        ))
    }

    /// Find a usable snapshot: present, readable, and taken with the same dependencies.
    pub async fn find(
        &self,
        spec: &FunctionSpec,
        deps: &BTreeMap<String, String>,
    ) -> Result<(PathBuf, SnapshotMeta), SnapshotMiss> {
        match self.find_local(spec, deps) {
            Err(SnapshotMiss::Absent) => {}
            other => return other,
        }
        let Some(chunks) = &self.chunks else {
            return Err(SnapshotMiss::Absent);
        };
        let scope = owner_scope(spec);
        let name = artifact_name(spec);
        let manifest = match chunks.manifest(&scope, &name).await {
            Ok(m) => m,
            Err(StoreError::NotFound { .. }) => return Err(SnapshotMiss::Absent),
            Err(e) => return Err(SnapshotMiss::Unreadable(e.to_string())),
        };
        let meta: SnapshotMeta = manifest
            .meta
            .get("snapshot")
            .and_then(|m| serde_json::from_str(m).ok())
            .ok_or_else(|| SnapshotMiss::Unreadable("manifest has no snapshot metadata".into()))?;
        check_deps(&meta, deps)?;
        let tmp = self
            .tmp_dir()
            .map_err(|e| SnapshotMiss::Unreadable(e.to_string()))?;
        let fetched = if meta.files.is_empty() {
            chunks
                .get_to_file(&scope, &name, &tmp.join("checkpoint.img"))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            unpack(chunks, &scope, &manifest, &meta.files, &tmp).await
        };
        if let Err(e) = fetched {
            let _ = fs::remove_dir_all(&tmp);
            return Err(SnapshotMiss::Unreadable(e));
        }
        let dest = self
            .place(spec, &tmp, &meta)
            .map_err(|e| SnapshotMiss::Unreadable(e.to_string()))?;
        Ok((dest, meta))
    }

    fn find_local(
        &self,
        spec: &FunctionSpec,
        deps: &BTreeMap<String, String>,
    ) -> Result<(PathBuf, SnapshotMeta), SnapshotMiss> {
        let dir = self.dir_for(spec);
        let meta_path = dir.join("snapshot.json");
        let bytes = match fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SnapshotMiss::Absent),
            Err(e) => return Err(SnapshotMiss::Unreadable(e.to_string())),
        };
        let meta: SnapshotMeta =
            serde_json::from_slice(&bytes).map_err(|e| SnapshotMiss::Unreadable(e.to_string()))?;
        check_deps(&meta, deps)?;
        if !dir.join("checkpoint.img").is_file() {
            return Err(SnapshotMiss::Unreadable("checkpoint.img missing".into()));
        }
        for f in &meta.files {
            if fs::metadata(dir.join(&f.name)).map(|m| m.len()).ok() != Some(f.len) {
                return Err(SnapshotMiss::Unreadable(format!("{} missing", f.name)));
            }
        }
        Ok((dir, meta))
    }

    /// A fresh temporary directory for a checkpoint in progress.
    pub fn tmp_dir(&self) -> Result<PathBuf, SnapshotError> {
        let tmp = self
            .dir
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        fs::create_dir_all(&tmp).map_err(|source| SnapshotError::Io {
            path: tmp.clone(),
            source,
        })?;
        Ok(tmp)
    }

    /// Store a finished checkpoint: into the chunk store (if any), then into place locally.
    pub async fn commit(
        &self,
        spec: &FunctionSpec,
        tmp: &Path,
        meta: &SnapshotMeta,
    ) -> Result<PathBuf, SnapshotError> {
        let mut meta = meta.clone();
        if let Some(chunks) = &self.chunks {
            let packed = self
                .dir
                .join(".tmp")
                .join(format!("pack-{}", uuid::Uuid::new_v4().simple()));
            let (src, dst) = (tmp.to_path_buf(), packed.clone());
            meta.files = tokio::task::spawn_blocking(move || pack(&src, &dst))
                .await
                .map_err(|e| SnapshotError::Unavailable(e.to_string()))?
                .map_err(|source| SnapshotError::Io {
                    path: packed.clone(),
                    source,
                })?;
            let text = serde_json::to_string(&meta).unwrap_or_default();
            let stored = chunks
                .put_file(
                    &owner_scope(spec),
                    &artifact_name(spec),
                    &packed,
                    BTreeMap::from([("snapshot".to_string(), text)]),
                )
                .await;
            let _ = fs::remove_file(&packed);
            let info = stored
                .map_err(|e| SnapshotError::Unavailable(format!("storing the snapshot: {e}")))?;
            tracing::info!(
                function = %spec.name,
                chunks = info.chunks,
                new_chunks = info.new_chunks,
                new_bytes = info.new_bytes,
                "snapshot stored in the chunk store"
            );
        }
        self.place(spec, tmp, &meta)
    }

    /// Move a checkpoint directory into place with its metadata (replacing an older one).
    fn place(
        &self,
        spec: &FunctionSpec,
        tmp: &Path,
        meta: &SnapshotMeta,
    ) -> Result<PathBuf, SnapshotError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        let meta_path = tmp.join("snapshot.json");
        fs::write(
            &meta_path,
            serde_json::to_vec_pretty(meta).unwrap_or_default(),
        )
        .map_err(io(&meta_path))?;
        let dest = self.dir_for(spec);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if dest.exists() {
            let old = self
                .dir
                .join(".tmp")
                .join(format!("old-{}", uuid::Uuid::new_v4().simple()));
            fs::rename(&dest, &old).map_err(io(&dest))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(tmp, &dest).map_err(io(&dest))?;
        Ok(dest)
    }

    /// Drop the worker's local copies of a function's snapshots (the chunk store keeps them).
    pub fn evict_local(&self, name: &str) {
        let _ = fs::remove_dir_all(self.dir.join(safe(name)));
    }

    /// Forget every snapshot of a function (`version: None`, it was deleted) or of one version:
    /// local copies and the chunk store's manifests, whose chunks the collector then frees.
    pub async fn remove(&self, function_arn: &str, name: &str, version: Option<&str>) {
        let local = self.dir.join(safe(name));
        let prefix = match version {
            None => {
                self.evict_local(name);
                format!("snapshot/{}/", safe(name))
            }
            Some(v) => {
                let start = format!("{}-", safe(v));
                if let Ok(entries) = fs::read_dir(&local) {
                    for e in entries.flatten() {
                        if e.file_name().to_string_lossy().starts_with(&start) {
                            let _ = fs::remove_dir_all(e.path());
                        }
                    }
                }
                format!("snapshot/{}/{start}", safe(name))
            }
        };
        if let Some(chunks) = &self.chunks {
            let scope = owner_of(function_arn);
            if let Ok(names) = chunks.list(&scope, &prefix).await {
                for n in names {
                    if let Err(e) = chunks.delete(&scope, &n).await {
                        tracing::warn!("releasing snapshot {n}: {e}");
                    }
                }
            }
        }
    }

    /// Remove temporary directories a crash left behind.
    pub fn clean_tmp(&self) {
        let _ = fs::remove_dir_all(self.dir.join(".tmp"));
    }
}

/// Write the packed files of a snapshot artifact into `dir`, fetching chunks in parallel
/// (each verified by the store) and writing each where it belongs.
async fn unpack(
    chunks: &ChunkStore,
    scope: &Scope,
    manifest: &hearth_store::Manifest,
    files: &[PackedFile],
    dir: &Path,
) -> Result<(), String> {
    use futures::StreamExt;
    use std::os::unix::fs::FileExt;
    let cs = hearth_store::CHUNK_SIZE as u64;
    for f in files {
        if f.offset % cs != 0 || f.offset + f.len > manifest.size || f.name.contains('/') {
            return Err(format!("bad file entry {:?}", f.name));
        }
    }
    let mut jobs = Vec::new();
    for f in files {
        let path = dir.join(&f.name);
        let file = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.set_len(f.len)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let file = std::sync::Arc::new(file);
        let first = (f.offset / cs) as usize;
        let end = (f.offset + f.len).div_ceil(cs) as usize;
        for i in first..end {
            jobs.push((file.clone(), i, (i as u64 * cs - f.offset), f.len));
        }
    }
    let results = futures::stream::iter(jobs.into_iter().map(|(file, i, at, len)| async move {
        let chunk_ref = manifest.chunks.get(i).ok_or("manifest too short")?;
        let bytes = chunks
            .get_chunk(scope, chunk_ref)
            .await
            .map_err(|e| e.to_string())?;
        let n = (bytes.len() as u64).min(len - at) as usize;
        let data = bytes.slice(..n);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }))
    .buffer_unordered(hearth_store::GET_PARALLELISM)
    .collect::<Vec<Result<(), String>>>()
    .await;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(())
}

fn check_deps(meta: &SnapshotMeta, deps: &BTreeMap<String, String>) -> Result<(), SnapshotMiss> {
    for (k, v) in deps {
        if meta.deps.get(k) != Some(v) {
            return Err(SnapshotMiss::Stale(k.clone()));
        }
    }
    Ok(())
}
