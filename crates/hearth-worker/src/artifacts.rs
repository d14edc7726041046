//! Runtime images as chunk-store artifacts.
//!
//! A built image is flattened deterministically (tar with sorted names, zero times, numeric
//! root ownership) and stored in the chunk store's shared scope as `image/<name>`, so identical
//! runtime chunks are stored once for every function and tenant. A worker whose image cache
//! lacks an image materialises it from there: every chunk is verified, the tar is unpacked into
//! a temporary directory and renamed into the cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_store::{ChunkStore, Scope, StoreError};

use crate::images::{ImageError, ImageStore, recipe_for};
use crate::scratch::Scratch;

/// The artifact name of an image.
pub fn image_artifact(name: &str) -> String {
    format!("image/{name}")
}

fn step(step: &str, detail: impl std::fmt::Display) -> ImageError {
    ImageError::Step {
        step: step.to_string(),
        detail: detail.to_string(),
    }
}

/// Flatten a root file system into a deterministic tar file.
pub fn flatten(rootfs: &Path, out: &Path) -> Result<(), ImageError> {
    let status = Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(out)
        .arg("-C")
        .arg(rootfs)
        .arg(".")
        .status()
        .map_err(|e| step("tar", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(step("tar", status))
    }
}

/// Store a built image in the chunk store (shared scope) unless it is there already with the
/// same identity. Returns the number of bytes newly stored.
pub async fn publish_image(
    images: &ImageStore,
    chunks: &ChunkStore,
    name: &str,
) -> Result<u64, ImageError> {
    let rootfs = images.rootfs(name)?;
    let id = images.image_id_by_name(name).unwrap_or_default();
    let artifact = image_artifact(name);
    if let Ok(m) = chunks.manifest(&Scope::Shared, &artifact).await
        && m.meta.get("image_id") == Some(&id)
    {
        return Ok(0);
    }
    let tmp = Scratch::new(images.dir(), "art", "")?;
    let tar = tmp.path().join("image.tar");
    let root = rootfs.clone();
    let t = tar.clone();
    tokio::task::spawn_blocking(move || flatten(&root, &t))
        .await
        .map_err(|e| step("tar", e))??;
    let info_json =
        std::fs::read_to_string(rootfs.with_file_name("image.json")).unwrap_or_default();
    let meta = BTreeMap::from([
        ("image_id".to_string(), id),
        ("image_json".to_string(), info_json),
    ]);
    let info = chunks
        .put_file(&Scope::Shared, &artifact, &tar, meta)
        .await
        .map_err(|e| step("storing the image", e))?;
    Ok(info.new_bytes)
}

/// Make sure the image serving `runtime` is in the local cache, fetching it from the chunk
/// store if it is missing there. Returns its root file system.
pub async fn ensure_image(
    images: &ImageStore,
    chunks: &ChunkStore,
    runtime: &str,
) -> Result<PathBuf, ImageError> {
    if let Ok(root) = images.rootfs_for_runtime(runtime) {
        return Ok(root);
    }
    let name = recipe_for(runtime)?.name;
    let artifact = image_artifact(name);
    let manifest = match chunks.manifest(&Scope::Shared, &artifact).await {
        Ok(m) => m,
        Err(StoreError::NotFound { .. }) => {
            return Err(ImageError::NotBuilt {
                name: name.to_string(),
            });
        }
        Err(e) => return Err(step("reading the image manifest", e)),
    };
    let tmp = Scratch::new(images.dir(), "art", "")?;
    let tar = tmp.path().join("image.tar");
    chunks
        .get_to_file(&Scope::Shared, &artifact, &tar)
        .await
        .map_err(|e| step("fetching the image", e))?;
    let info = manifest.meta.get("image_json").cloned().unwrap_or_default();
    let store = images.clone();
    let name_owned = name.to_string();
    tokio::task::spawn_blocking(move || store.import_tar_with_info(&name_owned, &tar, &info))
        .await
        .map_err(|e| step("unpacking the image", e))?
}
