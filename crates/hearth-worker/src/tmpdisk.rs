//! A sandbox's `/tmp`: a file system of its own on the worker's disk, sized by the function's
//! `EphemeralStorage`.
//!
//! Lambda's `/tmp` is disk, 512–10240 MB, separate from memory. A gVisor tmpfs would be memory
//! charged to the sandbox, so each sandbox instead gets a sparse image file formatted as ext4
//! (no journal, no reserved blocks, lazy inode tables: ≈ 50 ms) and loop-mounted on the host;
//! the mount point is bind-mounted at `/tmp`. Writing past the size gives the function `ENOSPC`
//! and nothing else; the image is deleted with the sandbox, so every sandbox starts empty, and
//! only written blocks use disk. The size cannot change after the sandbox is created (the
//! sandbox's gofer keeps the mount it saw at create, and online resizing needs a capability
//! this machine's root lacks), so pre-created sandboxes are pooled per `/tmp` size.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors preparing a `/tmp` disk.
#[derive(Debug, thiserror::Error)]
pub enum TmpError {
    #[error("{tool} is not installed (Debian packages e2fsprogs and mount provide it)")]
    Missing { tool: &'static str },
    #[error("{step} for {path}: {detail}")]
    Step {
        step: &'static str,
        path: PathBuf,
        detail: String,
    },
}

/// One mounted `/tmp` disk.
#[derive(Debug)]
pub struct TmpDisk {
    pub image: PathBuf,
    pub mount: PathBuf,
    pub size_mb: u32,
}

/// ext4's own metadata (inode tables, group descriptors) takes about 3 % of a small file
/// system; the image is made that much larger so the function gets at least `size_mb`.
fn image_bytes(size_mb: u32) -> u64 {
    let mb = size_mb as u64;
    (mb + mb / 25 + 8) * 1024 * 1024
}

fn run(step: &'static str, path: &Path, cmd: &mut Command) -> Result<(), TmpError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TmpError::Step {
            step,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TmpError::Step {
            step,
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl TmpDisk {
    /// Make and mount a fresh, empty disk of `size_mb` in `dir` (`dir/tmp.img`, `dir/tmp`).
    pub fn create(dir: &Path, size_mb: u32) -> Result<TmpDisk, TmpError> {
        let image = dir.join("tmp.img");
        let mount = dir.join("tmp");
        std::fs::create_dir_all(&mount).map_err(|e| TmpError::Step {
            step: "mkdir",
            path: mount.clone(),
            detail: e.to_string(),
        })?;
        let file = std::fs::File::create(&image).map_err(|e| TmpError::Step {
            step: "create image",
            path: image.clone(),
            detail: e.to_string(),
        })?;
        file.set_len(image_bytes(size_mb))
            .map_err(|e| TmpError::Step {
                step: "size image",
                path: image.clone(),
                detail: e.to_string(),
            })?;
        drop(file);
        let disk = TmpDisk {
            image,
            mount,
            size_mb,
        };
        let made = (|| {
            run(
                "mkfs.ext4",
                &disk.image,
                Command::new("mkfs.ext4")
                    .args([
                        "-q",
                        "-F",
                        "-m",
                        "0",
                        "-O",
                        "^has_journal",
                        "-E",
                        "lazy_itable_init=1,nodiscard,root_owner=0:0",
                    ])
                    .arg(&disk.image),
            )?;
            run(
                "mount",
                &disk.mount,
                Command::new("mount")
                    .args(["-o", "loop,nosuid,nodev,noatime"])
                    .arg(&disk.image)
                    .arg(&disk.mount),
            )?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&disk.mount, std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| TmpError::Step {
                    step: "chmod",
                    path: disk.mount.clone(),
                    detail: e.to_string(),
                })?;
            let _ = std::fs::remove_dir(disk.mount.join("lost+found"));
            Ok(())
        })();
        match made {
            Ok(()) => Ok(disk),
            Err(e) => {
                disk.remove();
                Err(match e {
                    TmpError::Step { detail, .. } if detail.contains("No such file") => {
                        TmpError::Missing { tool: "mkfs.ext4" }
                    }
                    other => other,
                })
            }
        }
    }

    /// Unmount and delete the disk (its contents go with it).
    pub fn remove(&self) {
        unmount(&self.mount);
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// Unmount `mount` if something is mounted there (lazily if it is still busy).
pub fn unmount(mount: &Path) {
    let ok = Command::new("umount")
        .arg(mount)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mount)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Mount points under `dir` (a worker's slot directory) that are still mounted: what a killed
/// worker left. Read from `/proc/self/mounts`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_leave_room_for_metadata() {
        assert!(image_bytes(512) >= 512 * 1024 * 1024 * 103 / 100);
        assert!(image_bytes(10240) < 10240 * 1024 * 1024 * 105 / 100);
    }
}
