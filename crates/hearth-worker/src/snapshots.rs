//! Snapshots (like Lambda SnapStart): a sandbox checkpointed right after init, restored instead
//! of booted on later cold starts.
//!
//! A snapshot is taken when the runtime, started with `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`,
//! reaches the point where it waits for the platform: `restore/next` (runtimes with restore
//! hooks, such as Python's `awslambdaric`, after their before-snapshot hooks) or its first
//! `next` (runtimes without hooks). `runsc checkpoint` writes one image file; its metadata
//! records where the runtime waits and what the image depends on (runtime image, code, agent
//! binary, runsc version, memory size). A lookup whose dependencies differ from the current ones
//! is a miss: the worker boots instead of attempting a restore that could break.
//!
//! Storage: the image is an artifact of the chunk store (`hearth-store`: 512 KiB convergently
//! encrypted chunks, in the function owner's key scope), named
//! `snapshot/<function>/<version>-<revision>`, with the metadata in its manifest; any worker can
//! restore it. The worker's directory
//! `<dir>/<function>/<version>-<revision>/{checkpoint.img, snapshot.json}` is its local copy (runsc
//! restores from a file): written to a temporary directory and renamed into place, so a crash
//! never leaves a half snapshot; fetched from the chunk store (every chunk verified) when missing.
//! A chunk that fails verification makes the lookup a miss: the worker boots.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use hearth_api::invoker::FunctionSpec;
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
        if let Err(e) = chunks
            .get_to_file(&scope, &name, &tmp.join("checkpoint.img"))
            .await
        {
            let _ = fs::remove_dir_all(&tmp);
            return Err(SnapshotMiss::Unreadable(e.to_string()));
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
        if let Some(chunks) = &self.chunks {
            let text = serde_json::to_string(meta).unwrap_or_default();
            let info = chunks
                .put_file(
                    &owner_scope(spec),
                    &artifact_name(spec),
                    &tmp.join("checkpoint.img"),
                    BTreeMap::from([("snapshot".to_string(), text)]),
                )
                .await
                .map_err(|e| SnapshotError::Unavailable(format!("storing the snapshot: {e}")))?;
            tracing::info!(
                function = %spec.name,
                chunks = info.chunks,
                new_chunks = info.new_chunks,
                new_bytes = info.new_bytes,
                "snapshot stored in the chunk store"
            );
        }
        self.place(spec, tmp, meta)
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

fn check_deps(meta: &SnapshotMeta, deps: &BTreeMap<String, String>) -> Result<(), SnapshotMiss> {
    for (k, v) in deps {
        if meta.deps.get(k) != Some(v) {
            return Err(SnapshotMiss::Stale(k.clone()));
        }
    }
    Ok(())
}
