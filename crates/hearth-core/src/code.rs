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
//! - not a zip, corrupt data, bad CRC, encrypted entries, entries that collide (a file where
//!   a directory is, a name twice), names too long for the file system
//!   ([`CodeError::Invalid`]);
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
//!
//! [`CodeStore::check_zip`] applies every rule without writing anything (it inflates each
//! entry into nothing), for `UpdateFunctionCode` with `DryRun`. With a zip directory
//! ([`CodeStore::with_zip_dir`], used when there is no chunk store) the zip itself is kept as
//! well, as `<zip-dir>/<sha256-hex>.zip`, so `GetFunction` can offer it for download.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};
use zip::ZipArchive;

use serde::{Deserialize, Serialize};

/// Where a version's code lives and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRef {
    /// Base64 SHA-256 of the zip (`CodeSha256`).
    pub sha256_b64: String,
    /// Hex SHA-256 of the zip: the code directory's name.
    pub sha256_hex: String,
    /// Zip length in bytes (`CodeSize`).
    pub size: u64,
}

impl CodeRef {
    /// The reference of a package with these bytes.
    pub fn of(zip: &[u8]) -> CodeRef {
        let digest = Sha256::digest(zip);
        CodeRef {
            sha256_hex: hex::encode(digest),
            sha256_b64: base64::engine::general_purpose::STANDARD.encode(digest),
            size: zip.len() as u64,
        }
    }

    /// The hex digest behind a `CodeSha256` (base64) value, if it is one.
    pub fn hex_of(sha256_b64: &str) -> Option<String> {
        base64::engine::general_purpose::STANDARD
            .decode(sha256_b64)
            .ok()
            .filter(|d| d.len() == 32)
            .map(hex::encode)
    }
}

/// The chunk-store artifact holding the package whose SHA-256 is `sha256_hex`.
pub fn code_artifact(sha256_hex: &str) -> String {
    format!("code/{sha256_hex}")
}

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
    #[error("not a valid zip file: {0}")]
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
    CodeError::Invalid(e.to_string())
}

/// Longest file name component and path Linux accepts.
const MAX_COMPONENT_BYTES: usize = 255;
const MAX_PATH_BYTES: usize = 4095;

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

impl StoredCode {
    /// What a version record keeps of it.
    pub fn code_ref(&self) -> CodeRef {
        CodeRef {
            sha256_b64: self.sha256_b64.clone(),
            sha256_hex: self.sha256_hex.clone(),
            size: self.size,
        }
    }
}

/// The content-addressed directory of unpacked packages.
#[derive(Debug, Clone)]
pub struct CodeStore {
    root: PathBuf,
    limits: CodeLimits,
    /// Where zips are kept too, if anywhere.
    zips: Option<PathBuf>,
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
        CodeStore {
            root,
            limits,
            zips: None,
        }
    }

    /// Also keep every stored zip in `dir` (created on first use).
    pub fn with_zip_dir(mut self, dir: PathBuf) -> Self {
        self.zips = Some(dir);
        self
    }

    /// The kept zip with this hex SHA-256, if zips are kept (it may not exist).
    pub fn zip_path(&self, sha256_hex: &str) -> Option<PathBuf> {
        self.zips
            .as_ref()
            .map(|dir| dir.join(format!("{sha256_hex}.zip")))
    }

    pub fn limits(&self) -> CodeLimits {
        self.limits
    }

    /// Directory of the package with this hex SHA-256.
    pub fn dir_for(&self, sha256_hex: &str) -> PathBuf {
        self.root.join(sha256_hex)
    }

    /// Bytes the unpacked package with this hex SHA-256 holds (its regular files), for the
    /// limit on a function's code and layers together. Walks the tree: call it from a
    /// blocking thread.
    pub fn unpacked_size(&self, sha256_hex: &str) -> io::Result<u64> {
        fn walk(dir: &Path) -> io::Result<u64> {
            let mut total = 0u64;
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    total = total.saturating_add(walk(&entry.path())?);
                } else if kind.is_file() {
                    total = total.saturating_add(entry.metadata()?.len());
                }
            }
            Ok(total)
        }
        walk(&self.dir_for(sha256_hex))
    }

    /// Remove temporaries a crash left behind.
    pub fn clean_temp(&self) -> io::Result<()> {
        for dir in std::iter::once(&self.root).chain(self.zips.as_ref()) {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    if entry.file_type()?.is_dir() {
                        fs::remove_dir_all(entry.path())?;
                    } else {
                        fs::remove_file(entry.path())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The size check and digest every package gets first (cheap: no unzipping).
    pub fn digest(&self, zip: &[u8]) -> Result<CodeRef, CodeError> {
        let size = zip.len() as u64;
        if size > self.limits.max_zipped_bytes {
            return Err(CodeError::TooLarge {
                size,
                limit: self.limits.max_zipped_bytes,
            });
        }
        Ok(CodeRef::of(zip))
    }

    /// Apply every rule [`CodeStore::store_zip`] applies, writing nothing. Synchronous and
    /// possibly slow (it inflates every entry): call it from a blocking thread.
    pub fn check_zip(&self, zip: &[u8]) -> Result<CodeRef, CodeError> {
        let code = self.digest(zip)?;
        let mut archive = ZipArchive::new(Cursor::new(zip)).map_err(invalid)?;
        let plan = self.plan(&mut archive)?;
        let mut inflated = 0u64;
        for item in plan.iter().filter(|item| !item.dir) {
            let mut entry = archive.by_index(item.index).map_err(invalid)?;
            self.copy_bounded(&mut entry, &mut io::sink(), &mut inflated)?;
        }
        Ok(code)
    }

    /// Validate `zip` and make sure it is unpacked. Synchronous and possibly slow: call it
    /// from a blocking thread.
    pub fn store_zip(&self, zip: &[u8]) -> Result<StoredCode, CodeError> {
        let code = self.digest(zip)?;
        let dir = self.dir_for(&code.sha256_hex);
        let stored = StoredCode {
            sha256_b64: code.sha256_b64,
            sha256_hex: code.sha256_hex,
            size: code.size,
            dir: dir.clone(),
        };
        if dir.is_dir() {
            self.keep_zip(&stored.sha256_hex, zip)?;
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
        self.keep_zip(&stored.sha256_hex, zip)?;
        Ok(stored)
    }

    /// Write the zip to the zip directory (if there is one and it is not there yet), through a
    /// temporary and a rename.
    fn keep_zip(&self, sha256_hex: &str, zip: &[u8]) -> Result<(), CodeError> {
        let (Some(dir), Some(path)) = (&self.zips, self.zip_path(sha256_hex)) else {
            return Ok(());
        };
        if path.is_file() {
            return Ok(());
        }
        DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            file.write_all(zip)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(written?)
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
        // Every path the tree will have, explicit or implied by a deeper one: is it a
        // directory? A name can be a file once, or a directory any number of times.
        let mut tree: HashMap<PathBuf, bool> = HashMap::new();
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
            let dir = entry.is_dir();
            check_tree(&mut tree, &path, dir)?;
            let executable = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
            plan.push(Planned {
                index,
                path,
                dir,
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
        let mut written = 0u64;
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
            self.copy_bounded(&mut entry, &mut file, &mut written)?;
            file.sync_all()?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

impl CodeStore {
    /// Inflate `entry` into `out`, failing once the package's running total `inflated` passes
    /// the unzipped limit (the sizes a zip declares can lie).
    fn copy_bounded(
        &self,
        entry: &mut impl Read,
        out: &mut impl Write,
        inflated: &mut u64,
    ) -> Result<(), CodeError> {
        let limit = self.limits.max_unzipped_bytes;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = entry.read(&mut buf).map_err(invalid)?;
            if n == 0 {
                return Ok(());
            }
            *inflated += n as u64;
            if *inflated > limit {
                return Err(CodeError::UnzippedTooLarge { limit });
            }
            out.write_all(&buf[..n])?;
        }
    }
}

/// Record `path` in `tree`, rejecting a layout that cannot be unpacked: a name that is a file
/// and a directory, or a file twice.
fn check_tree(tree: &mut HashMap<PathBuf, bool>, path: &Path, dir: bool) -> Result<(), CodeError> {
    let conflict = || invalid(format!("conflicting entries at {}", path.display()));
    for ancestor in path.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        match tree.get(ancestor) {
            Some(false) => return Err(conflict()),
            Some(true) => {}
            None => {
                tree.insert(ancestor.to_path_buf(), true);
            }
        }
    }
    match (tree.get(path), dir) {
        (Some(true), true) => Ok(()),
        (Some(_), _) => Err(conflict()),
        (None, _) => {
            tree.insert(path.to_path_buf(), dir);
            Ok(())
        }
    }
}

/// Packages stored but not yet referenced by a committed function record, which the release
/// of unused code must leave alone.
///
/// Storing a package and committing the record that references it are two steps (chunk store,
/// then redb), and a release (after a delete) reads the records, lists the stored packages
/// and deletes the unreferenced ones. Without pins, a release that read the records before a
/// create committed, and listed after its put, deleted the package the new function was about
/// to use. The rule:
///
/// - a store takes a [`PackagePin`] *before* it puts the package, and drops it only after its
///   record is committed (or the operation failed);
/// - a release holds the session lock throughout; inside it, it reads the pins *first*, then
///   the records, and deletes only what neither pins nor records hold;
/// - taking a pin waits for a running release session; dropping one does not need it.
///
/// So a pin dropped before a release read the pins belongs to a record committed before the
/// release read the records (the release sees the reference); a pin dropped later was seen;
/// and a pin taken after the session started is followed by a put after the session ended (the
/// put stores the package again if the release deleted it).
#[derive(Debug, Default)]
pub struct PackagePins {
    session: tokio::sync::Mutex<()>,
    pins: std::sync::Mutex<HashMap<String, usize>>,
}

impl PackagePins {
    fn pins(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        self.pins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pin package `sha256_hex` (waiting for a release in progress to finish).
    pub async fn pin(self: &std::sync::Arc<Self>, sha256_hex: &str) -> PackagePin {
        let _session = self.session.lock().await;
        *self.pins().entry(sha256_hex.to_string()).or_default() += 1;
        PackagePin {
            pins: self.clone(),
            sha256_hex: sha256_hex.to_string(),
        }
    }

    /// Start a release: no pin is taken until the returned guard is dropped.
    pub async fn release_session(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.session.lock().await
    }

    /// The packages pinned now.
    pub fn pinned(&self) -> std::collections::HashSet<String> {
        self.pins().keys().cloned().collect()
    }
}

/// A hold on one package until its record is committed; released on drop.
#[derive(Debug)]
pub struct PackagePin {
    pins: std::sync::Arc<PackagePins>,
    sha256_hex: String,
}

impl Drop for PackagePin {
    fn drop(&mut self) {
        let mut pins = self.pins.pins();
        if let Some(n) = pins.get_mut(&self.sha256_hex) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.sha256_hex);
            }
        }
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
    if name.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "entry name of {} bytes is too long",
            name.len()
        )));
    }
    let mut path = PathBuf::new();
    for component in name.split('/') {
        if component.split('\\').any(|c| c == "..") {
            return Err(unsafe_path());
        }
        if component.is_empty() || component == "." {
            continue;
        }
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(invalid(format!(
                "entry name component {component:?} is too long"
            )));
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
    fn tree_conflicts() {
        let mut tree = HashMap::new();
        for (path, dir) in [("a/b", false), ("a", true), ("a/", true), ("c", false)] {
            check_tree(&mut tree, Path::new(path), dir).expect(path);
        }
        for (path, dir) in [("a", false), ("a/b", false), ("a/b/c", false), ("c", true)] {
            assert!(
                matches!(
                    check_tree(&mut tree, Path::new(path), dir),
                    Err(CodeError::Invalid(_))
                ),
                "{path} accepted"
            );
        }
    }

    #[test]
    fn unpacked_size_counts_the_files_of_a_stored_package() {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        for (name, len) in [("a.txt", 100usize), ("d/b.bin", 2_000), ("d/e/c", 0)] {
            w.start_file(name, opts).expect("start");
            w.write_all(&vec![7u8; len]).expect("write");
        }
        w.add_directory("empty/", opts).expect("dir");
        let zip = w.finish().expect("finish").into_inner();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CodeStore::new(dir.path().join("code"), CodeLimits::default());
        let stored = store.store_zip(&zip).expect("store");
        assert_eq!(
            store.unpacked_size(&stored.sha256_hex).expect("size"),
            2_100
        );
        assert!(store.unpacked_size(&"0".repeat(64)).is_err(), "not stored");
    }

    #[tokio::test]
    async fn pins_count_and_wait_for_a_release() {
        let pins = std::sync::Arc::new(PackagePins::default());
        let a = pins.pin("x").await;
        let b = pins.pin("x").await;
        drop(a);
        assert!(pins.pinned().contains("x"));
        drop(b);
        assert!(pins.pinned().is_empty());
        let session = pins.release_session().await;
        let waiter = tokio::spawn({
            let pins = pins.clone();
            async move { pins.pin("y").await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "pinned during a release");
        drop(session);
        let pin = waiter.await.expect("task");
        assert!(pins.pinned().contains("y"));
        drop(pin);
    }

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
