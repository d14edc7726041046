//! Scratch directories in the image cache, and the sweep of those dead processes left.
//!
//! An image build, import or fetch works in a scratch directory beside the cached images and
//! renames it into place when done; publishing an image flattens it into a tar there. Such a
//! directory is hundreds of MiB, and a process killed mid-way (a server stopped while it
//! publishes its images, a build interrupted) used to leave it behind in the cache for good.
//!
//! Each scratch directory `.<kind>-<id>` has a lock file `.<kind>-<id>.lock` beside it, taken
//! before the directory is made and let go after it is removed (the unlink-while-locked
//! protocol of [`crate::netns::try_lock`]). A process making new scratch space first sweeps the
//! cache: a directory whose lock file it can take, or that has none, belongs to a process that
//! is gone, and is removed. A tree with anything still mounted inside (a killed `mmdebstrap`
//! leaves the host's `/dev` and `/proc` bound there) is never removed: deleting it would reach
//! through the mounts into the host's files. It is logged instead.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;

use crate::netns::{release, try_lock};

/// The kinds of scratch directory a sweep may remove.
const KINDS: [&str; 2] = [".tmp-", ".art-"];
/// Replaced images moved aside before deletion (no owner to wait for once renamed).
const OLD: &str = ".old-";
const LOCK_SUFFIX: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("scratch space at {path}: {detail}")]
    Io { path: PathBuf, detail: String },
}

fn io(path: &Path, detail: impl std::fmt::Display) -> ScratchError {
    ScratchError::Io {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// A scratch directory, removed (unless something is mounted inside) when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    lock: Option<(PathBuf, Flock<File>)>,
}

impl Scratch {
    /// A new scratch directory `<cache>/.<kind>-<id>` (kind is `tmp` or `art`), after sweeping
    /// what dead processes left in `cache`.
    pub fn new(cache: &Path, kind: &str, label: &str) -> Result<Scratch, ScratchError> {
        fs::create_dir_all(cache).map_err(|e| io(cache, e))?;
        sweep(cache);
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("{label}-")
        };
        let name = format!(".{kind}-{label}{}", uuid::Uuid::new_v4().simple());
        let path = cache.join(&name);
        let lock_path = cache.join(format!("{name}{LOCK_SUFFIX}"));
        let lock = match try_lock(&lock_path, true) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(io(&lock_path, "held by another process")),
            Err(e) => return Err(io(&lock_path, e)),
        };
        let scratch = Scratch {
            path,
            lock: Some((lock_path, lock)),
        };
        fs::create_dir(&scratch.path).map_err(|e| io(&scratch.path, e))?;
        Ok(scratch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Renamed into place when the work succeeded: then there is nothing left to remove.
        if fs::symlink_metadata(&self.path).is_ok() {
            remove_unless_mounted(&self.path);
        }
        if let Some((path, lock)) = self.lock.take() {
            release(&path, lock);
        }
    }
}

/// Remove the scratch directories (and stray lock files) of processes that are gone. Errors
/// are logged: a sweep never fails the work that triggered it.
pub fn sweep(cache: &Path) -> usize {
    let Ok(entries) = fs::read_dir(cache) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.starts_with(OLD) {
            removed += usize::from(remove_unless_mounted(&path));
            continue;
        }
        if !KINDS.iter().any(|k| name.starts_with(k)) {
            continue;
        }
        if let Some(dir) = name.strip_suffix(LOCK_SUFFIX) {
            // A lock file whose directory is gone: its owner died between the two removals.
            if !cache.join(dir).exists()
                && let Ok(Some(lock)) = try_lock(&path, false)
            {
                release(&path, lock);
            }
            continue;
        }
        let lock_path = cache.join(format!("{name}{LOCK_SUFFIX}"));
        let lock = if lock_path.exists() {
            match try_lock(&lock_path, false) {
                Ok(Some(lock)) => Some(lock),
                // Held: its owner is alive. Gone: its owner finished between the two looks.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(path = %lock_path.display(), "sweeping the image cache: {e}");
                    continue;
                }
            }
        } else {
            // The owner takes the lock before it makes the directory and lets go of it after
            // removing it: a directory without one was left by a process that is gone.
            None
        };
        removed += usize::from(remove_unless_mounted(&path));
        if let Some(lock) = lock {
            release(&lock_path, lock);
        }
    }
    removed
}

/// Remove a tree unless something is mounted at or beneath it. True if it was removed.
fn remove_unless_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(mount) = mounted_beneath(&mounts, path) {
        tracing::warn!(
            path = %path.display(),
            mount = %mount,
            "leaving a scratch directory with a mount inside (unmount it, then delete the directory)"
        );
        return false;
    }
    match fs::remove_dir_all(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %path.display(), "removing a scratch directory: {e}");
            false
        }
    }
}

/// The first mount point (from `/proc/self/mountinfo` text) at or beneath `path`.
fn mounted_beneath(mountinfo: &str, path: &Path) -> Option<String> {
    let base = path.to_str()?.trim_end_matches('/');
    mountinfo.lines().find_map(|line| {
        // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        let point = line.split(' ').nth(4)?;
        let point = unescape_mountinfo(point);
        let beneath = point == base
            || point
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('/'));
        beneath.then_some(point)
    })
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(digits) = std::str::from_utf8(digits)
            && let Ok(code) = u8::from_str_radix(digits, 8)
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_scratch_directory_is_removed_with_its_lock_when_dropped() {
        let cache = tempfile::tempdir().expect("tempdir");
        let s = Scratch::new(cache.path(), "art", "").expect("scratch");
        fs::write(s.path().join("image.tar"), b"x").expect("write");
        assert_eq!(names(cache.path()).len(), 2, "the directory and its lock");
        drop(s);
        assert!(names(cache.path()).is_empty());
    }

    #[test]
    fn a_sweep_removes_what_dead_owners_left_and_keeps_live_ones_and_images() {
        let cache = tempfile::tempdir().expect("tempdir");
        let c = cache.path();
        // Live: held by this process through another open file description.
        let live = Scratch::new(c, "tmp", "python3.13").expect("scratch");
        // Dead without a lock file (written before locks existed, or never locked).
        fs::create_dir_all(c.join(".art-dead1/sub")).expect("mkdir");
        fs::write(c.join(".art-dead1/sub/f"), b"x").expect("write");
        // Dead with a lock file nobody holds.
        fs::create_dir(c.join(".tmp-x-dead2")).expect("mkdir");
        fs::write(c.join(".tmp-x-dead2.lock"), b"").expect("write");
        // A stray lock file, a replaced image moved aside, and a real image.
        fs::write(c.join(".art-gone.lock"), b"").expect("write");
        fs::create_dir(c.join(".old-python3.11-abc")).expect("mkdir");
        fs::create_dir_all(c.join("python3.11/rootfs")).expect("mkdir");

        assert_eq!(sweep(c), 3);
        let live_name = live
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            names(c),
            vec![
                live_name.clone(),
                format!("{live_name}.lock"),
                "python3.11".to_string()
            ]
        );
        drop(live);
        assert_eq!(names(c), vec!["python3.11".to_string()]);
    }

    #[test]
    fn a_tree_with_a_mount_inside_is_found_and_left() {
        let info = "22 1 0:20 / /work/cache/.tmp-a/rootfs/dev rw - devtmpfs udev rw\n\
                    23 1 0:21 / /work/cache/.tmp-ab rw - tmpfs t rw\n\
                    24 1 0:22 / /work/with\\040space rw - tmpfs t rw\n";
        assert_eq!(
            mounted_beneath(info, Path::new("/work/cache/.tmp-a")).as_deref(),
            Some("/work/cache/.tmp-a/rootfs/dev")
        );
        assert_eq!(
            mounted_beneath(info, Path::new("/work/cache/.tmp-ab/")).as_deref(),
            Some("/work/cache/.tmp-ab")
        );
        assert_eq!(
            mounted_beneath(info, Path::new("/work/cache/.tmp-abc")),
            None
        );
        assert_eq!(
            mounted_beneath(info, Path::new("/work/with space")).as_deref(),
            Some("/work/with space")
        );
    }
}
