//! A function's layers as its sandbox's `/opt`.
//!
//! Lambda extracts a function's layers into `/opt` in the order the function lists them, a
//! later layer's file replacing an earlier one's at the same path. Here a layer version is a
//! package like function code, named by its SHA-256: the worker unpacks it once into its code
//! cache (`<cache>/<sha256-hex>/`) exactly as it does code. The merged tree of one ordered list
//! of layers is then built once, as hard links into those unpacked trees, at
//! `<cache>/opt-<key>/`, where the key is the SHA-256 of the list ([`list_key`]); every sandbox
//! of every function with that list shares it, and a claim links it into the sandbox's own
//! `/opt` directory as it links the code into `/var/task`. Building goes into a temporary
//! directory (`.tmp-<uuid>`, which the code store's clean-up removes after a crash) renamed into
//! place when complete, so a half-merged tree is never used.
//!
//! Why hard links into a merged tree rather than the alternatives: an overlay mount per
//! sandbox needs mount privileges and one more mount to tear down per sandbox; bind-mounting
//! each layer over `/opt` cannot merge directories; copying costs time and disk for every
//! list. Hard links cost one directory entry per file, and the files are never written: the
//! sandbox sees `/opt` read-only, and merging replaces a directory entry, never a file's
//! contents (so a later layer never changes an earlier layer's cached file).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a merged `/opt` tree could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("merging layers at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The key of an ordered list of layer packages (hex SHA-256s): another order is another
/// tree.
pub fn list_key(sha256_hexes: &[String]) -> String {
    let mut h = Sha256::new();
    for hex in sha256_hexes {
        h.update(hex.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The merged tree of `layers` (unpacked layer trees, in the function's order) under `cache`,
/// built if it is not there yet. Blocking: call it from a blocking thread.
pub fn merged_tree(cache: &Path, key: &str, layers: &[PathBuf]) -> Result<PathBuf, LayerError> {
    let dir = cache.join(format!("opt-{key}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    fs::create_dir_all(cache).map_err(io_err(cache))?;
    let tmp = cache.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let built = layers.iter().try_for_each(|layer| overlay(layer, &tmp));
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Someone merged the same list meanwhile: theirs is as good as ours.
        if !dir.is_dir() {
            return Err(io_err(&dir)(e));
        }
    }
    Ok(dir)
}

/// Link every file of `src` into `dst`, replacing what is there: a file by a file, a file by a
/// directory or a directory by a file (the later layer wins, as when Lambda extracts it).
fn overlay(src: &Path, dst: &Path) -> Result<(), LayerError> {
    for entry in fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type().map_err(io_err(&from))?;
        let existing = fs::symlink_metadata(&to).ok().map(|m| m.is_dir());
        if kind.is_dir() {
            if existing == Some(false) {
                fs::remove_file(&to).map_err(io_err(&to))?;
            }
            if existing != Some(true) {
                fs::create_dir(&to).map_err(io_err(&to))?;
            }
            overlay(&from, &to)?;
            continue;
        }
        match existing {
            Some(true) => fs::remove_dir_all(&to).map_err(io_err(&to))?,
            Some(false) => fs::remove_file(&to).map_err(io_err(&to))?,
            None => {}
        }
        if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(io_err(&from))?;
            std::os::unix::fs::symlink(target, &to).map_err(io_err(&to))?;
        } else if fs::hard_link(&from, &to).is_err() {
            // Another file system: a copy (of a file this tree owns alone).
            fs::copy(&from, &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

/// Where a runtime looks for layer content beyond `PATH` (`/opt/bin`) and `LD_LIBRARY_PATH`
/// (`/opt/lib`), which every sandbox has: for Python, `PYTHONPATH` with the layer's
/// `python/lib/pythonX.Y/site-packages` and `python` directories, as Lambda's Python runtimes
/// search them. `None` for runtimes that need nothing more.
pub fn runtime_path(runtime: &str) -> Option<(&'static str, String)> {
    let version = runtime.strip_prefix("python")?;
    Some((
        "PYTHONPATH",
        format!("/opt/python/lib/python{version}/site-packages:/opt/python"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn later_layers_win_and_earlier_trees_stay_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write(&a.join("python/pkg/__init__.py"), "A = 1\n");
        write(&a.join("shared.txt"), "from a\n");
        write(&a.join("bin/tool"), "a's tool\n");
        write(&a.join("was_file"), "a file in a\n");
        write(&b.join("shared.txt"), "from b\n");
        write(&b.join("bin/other"), "b's tool\n");
        write(&b.join("was_file/inside"), "a directory in b\n");
        let key = list_key(&["aa".into(), "bb".into()]);
        let merged = merged_tree(&cache, &key, &[a.clone(), b.clone()]).expect("merge");
        assert_eq!(merged, cache.join(format!("opt-{key}")));
        assert_eq!(read(&merged.join("python/pkg/__init__.py")), "A = 1\n");
        assert_eq!(read(&merged.join("shared.txt")), "from b\n");
        assert_eq!(read(&merged.join("bin/tool")), "a's tool\n");
        assert_eq!(read(&merged.join("bin/other")), "b's tool\n");
        assert_eq!(read(&merged.join("was_file/inside")), "a directory in b\n");
        // Merging replaced entries, never contents: the layers' own trees are unchanged.
        assert_eq!(read(&a.join("shared.txt")), "from a\n");
        assert_eq!(read(&a.join("was_file")), "a file in a\n");
        // Hard links, not copies.
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| fs::metadata(p).expect("meta").ino();
        assert_eq!(ino(&merged.join("bin/tool")), ino(&a.join("bin/tool")));
        // The other order is another tree, with a's file on top.
        let key2 = list_key(&["bb".into(), "aa".into()]);
        assert_ne!(key, key2);
        let merged2 = merged_tree(&cache, &key2, &[b, a]).expect("merge");
        assert_eq!(read(&merged2.join("shared.txt")), "from a\n");
        assert_eq!(read(&merged2.join("was_file")), "a file in a\n");
        // Nothing temporary left; a second call reuses the tree.
        let names: Vec<String> = fs::read_dir(&cache)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("opt-")), "{names:?}");
        assert_eq!(
            merged_tree(&cache, &key, &[]).expect("cached"),
            merged,
            "an existing tree is reused as is"
        );
    }

    #[test]
    fn a_missing_layer_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let r = merged_tree(&cache, "k", &[dir.path().join("missing")]);
        assert!(matches!(r, Err(LayerError::Io { .. })));
        assert_eq!(fs::read_dir(&cache).expect("dir").count(), 0);
    }

    #[test]
    fn python_runtimes_search_the_layers_python_directories() {
        assert_eq!(
            runtime_path("python3.11"),
            Some((
                "PYTHONPATH",
                "/opt/python/lib/python3.11/site-packages:/opt/python".to_string()
            ))
        );
        assert_eq!(runtime_path("provided.al2023"), None);
    }
}
