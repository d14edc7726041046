//! Deployment packages: validate a zip and unpack it into the content-addressed code store.
//!
//! A package is unpacked once into `<data-dir>/code/<sha256-hex>/` and shared by every
//! function version with the same zip; that directory is what a sandbox mounts read-only at
//! `/var/task`. Unpacking goes into a temporary directory (`.tmp-<uuid>`) that is renamed into
//! place only when complete, so a crash never leaves a half-unpacked tree under a real name
//! (leftover temporaries are removed by [`CodeStore::clean_temp`] at start-up). An existing
//! directory is reused as is: the same bytes always unpack to the same tree.
//!
//! The zip is untrusted input. Rejected, with nothing stored:
//! - more than [`CodeLimits::max_zipped_bytes`] of zip ([`CodeError::TooLarge`]);
//! - not a zip, corrupt data, bad CRC, encrypted entries ([`CodeError::Invalid`]);
//! - absolute paths, `..` components, NUL bytes ([`CodeError::UnsafePath`]);
//! - symbolic links, whatever they point at ([`CodeError::Symlink`]);
//! - more than [`CodeLimits::max_entries`] entries ([`CodeError::TooManyEntries`]);
//! - more than [`CodeLimits::max_unzipped_bytes`] unpacked, by the sizes the zip declares and
//!   by the bytes actually inflated (a zip bomb can lie about its sizes)
//!   ([`CodeError::UnzippedTooLarge`]).
//!
//! Permissions are normalized: files 0644, or 0755 if the zip gives them any execute bit (a
//! custom runtime's `bootstrap` must stay executable); directories 0755. Set-uid bits and
//! world-writable modes never reach the disk.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};
use zip::ZipArchive;

/// Lambda's deployment package limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeLimits {
    /// Zipped package (50 MB for direct upload).
    pub max_zipped_bytes: u64,
    /// Unzipped package (250 MB).
    pub max_unzipped_bytes: u64,
    /// Entries in one zip.
    pub max_entries: usize,
}

impl Default for CodeLimits {
    fn default() -> Self {
        CodeLimits {
            max_zipped_bytes: 52_428_800,
            max_unzipped_bytes: 262_144_000,
            max_entries: 20_000,
        }
    }
}

/// Why a package was rejected, or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("Zipped size must be smaller than {limit} bytes (got {size})")]
    TooLarge { size: u64, limit: u64 },
    #[error("Unzipped size must be smaller than {limit} bytes")]
    UnzippedTooLarge { limit: u64 },
    #[error("the zip file has {count} entries, more than the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("the zip file contains an unsafe path: {0:?}")]
    UnsafePath(String),
    #[error("the zip file contains a symbolic link: {0:?}")]
    Symlink(String),
    /// Storage failed (disk full, permissions): an internal fault.
    #[error("code storage i/o: {0}")]
    Io(#[from] io::Error),
}

fn invalid(e: impl std::fmt::Display) -> CodeError {
    CodeError::Invalid(format!(
        "Could not unzip uploaded file. Please check your file, then try to upload again. ({e})"
    ))
}

/// A stored package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCode {
    /// Base64 SHA-256 of the zip (`CodeSha256`).
    pub sha256_b64: String,
    /// Hex SHA-256 of the zip (the directory name).
    pub sha256_hex: String,
    /// Zip length (`CodeSize`).
    pub size: u64,
    /// The unpacked tree.
    pub dir: PathBuf,
}

/// The content-addressed directory of unpacked packages.
#[derive(Debug, Clone)]
pub struct CodeStore {
    root: PathBuf,
    limits: CodeLimits,
}

/// One entry to extract, validated.
struct Planned {
    index: usize,
    path: PathBuf,
    dir: bool,
    executable: bool,
}

impl CodeStore {
    /// A store rooted at `root` (`<data-dir>/code`); nothing is created until first use.
    pub fn new(root: PathBuf, limits: CodeLimits) -> Self {
        CodeStore { root, limits }
    }

    pub fn limits(&self) -> CodeLimits {
        self.limits
    }

    /// Directory of the package with this hex SHA-256.
    pub fn dir_for(&self, sha256_hex: &str) -> PathBuf {
        self.root.join(sha256_hex)
    }

    /// Remove temporaries a crash left behind.
    pub fn clean_temp(&self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }

    /// Validate `zip` and make sure it is unpacked. Synchronous and possibly slow: call it
    /// from a blocking thread.
    pub fn store_zip(&self, zip: &[u8]) -> Result<StoredCode, CodeError> {
        let size = zip.len() as u64;
        if size > self.limits.max_zipped_bytes {
            return Err(CodeError::TooLarge {
                size,
                limit: self.limits.max_zipped_bytes,
            });
        }
        let digest = Sha256::digest(zip);
        let sha256_hex = hex::encode(digest);
        let sha256_b64 = base64::engine::general_purpose::STANDARD.encode(digest);
        let dir = self.dir_for(&sha256_hex);
        let stored = StoredCode {
            sha256_b64,
            sha256_hex,
            size,
            dir: dir.clone(),
        };
        if dir.is_dir() {
            return Ok(stored);
        }

        let mut archive = ZipArchive::new(Cursor::new(zip)).map_err(invalid)?;
        let plan = self.plan(&mut archive)?;

        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)?;
        let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        DirBuilder::new().mode(0o755).create(&tmp)?;
        if let Err(e) = self.extract(&mut archive, &plan, &tmp) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        File::open(&tmp)?.sync_all()?;
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            // Someone unpacked the same zip meanwhile: theirs is as good as ours.
            if !dir.is_dir() {
                return Err(CodeError::Io(e));
            }
        }
        File::open(&self.root)?.sync_all()?;
        Ok(stored)
    }

    /// Check every entry's metadata before writing anything.
    fn plan(&self, archive: &mut ZipArchive<Cursor<&[u8]>>) -> Result<Vec<Planned>, CodeError> {
        let count = archive.len();
        if count > self.limits.max_entries {
            return Err(CodeError::TooManyEntries {
                count,
                limit: self.limits.max_entries,
            });
        }
        let mut declared = 0u64;
        let mut plan = Vec::with_capacity(count);
        for index in 0..count {
            let entry = archive.by_index_raw(index).map_err(invalid)?;
            let name = entry.name().map_err(invalid)?.into_owned();
            if entry.is_symlink() {
                return Err(CodeError::Symlink(name));
            }
            if entry.encrypted() {
                return Err(invalid(format!("entry {name:?} is encrypted")));
            }
            declared = declared.saturating_add(entry.size());
            if declared > self.limits.max_unzipped_bytes {
                return Err(CodeError::UnzippedTooLarge {
                    limit: self.limits.max_unzipped_bytes,
                });
            }
            let Some(path) = safe_relative_path(&name)? else {
                continue; // the root itself ("./")
            };
            let executable = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
            plan.push(Planned {
                index,
                path,
                dir: entry.is_dir(),
                executable,
            });
        }
        Ok(plan)
    }

    fn extract(
        &self,
        archive: &mut ZipArchive<Cursor<&[u8]>>,
        plan: &[Planned],
        into: &Path,
    ) -> Result<(), CodeError> {
        let limit = self.limits.max_unzipped_bytes;
        let mut written = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        for item in plan {
            let target = into.join(&item.path);
            if item.dir {
                make_dirs(&target).map_err(tree_error)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
                continue;
            }
            if let Some(parent) = target.parent() {
                make_dirs(parent).map_err(tree_error)?;
            }
            let mode = if item.executable { 0o755 } else { 0o644 };
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)
                .map_err(tree_error)?;
            let mut entry = archive.by_index(item.index).map_err(invalid)?;
            loop {
                let n = entry.read(&mut buf).map_err(invalid)?;
                if n == 0 {
                    break;
                }
                written += n as u64;
                if written > limit {
                    return Err(CodeError::UnzippedTooLarge { limit });
                }
                file.write_all(&buf[..n])?;
            }
            file.sync_all()?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

fn make_dirs(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o755).create(path)
}

/// Errors creating the tree that the zip's own layout causes (duplicate names, a file where
/// a directory should be) are the zip's fault; the rest are storage faults.
fn tree_error(e: io::Error) -> CodeError {
    match e.kind() {
        io::ErrorKind::AlreadyExists
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory => invalid(format!("conflicting entries: {e}")),
        _ => CodeError::Io(e),
    }
}

/// The entry's path relative to the package root, or an error if it could escape it.
/// `Ok(None)` for the root itself.
fn safe_relative_path(name: &str) -> Result<Option<PathBuf>, CodeError> {
    let unsafe_path = || CodeError::UnsafePath(name.to_string());
    if name.contains('\0') || name.starts_with('/') || name.starts_with('\\') {
        return Err(unsafe_path());
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        return Err(unsafe_path()); // a Windows drive path
    }
    let mut path = PathBuf::new();
    for component in name.split('/') {
        if component.split('\\').any(|c| c == "..") {
            return Err(unsafe_path());
        }
        if component.is_empty() || component == "." {
            continue;
        }
        path.push(component);
    }
    Ok(if path.as_os_str().is_empty() {
        None
    } else {
        Some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        assert_eq!(
            safe_relative_path("a/b.py").expect("ok"),
            Some(PathBuf::from("a/b.py"))
        );
        assert_eq!(
            safe_relative_path("./a//b/").expect("ok"),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(safe_relative_path("./").expect("ok"), None);
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "\\x",
            "C:/x",
            "a/..\\..\\x",
            "a\0b",
            "a/..",
        ] {
            assert!(
                matches!(safe_relative_path(bad), Err(CodeError::UnsafePath(_))),
                "{bad:?} accepted"
            );
        }
    }
}
