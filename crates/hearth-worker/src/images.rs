//! Runtime images: the read-only root file systems sandboxes boot from.
//!
//! An image is a Debian root built with `mmdebstrap` from the machine's apt sources (the same
//! way for every runtime: one tool, reproducible, ≈ 20–30 s), or imported from a directory or a
//! tarball a user supplies. Built images live in a cache directory as `<cache>/<name>/rootfs`
//! with `<cache>/<name>/image.json` written last: an image without its `image.json` is
//! incomplete (a crash mid-build) and is rebuilt. A build goes to a temporary directory that is
//! renamed into place, so two builders never see each other's half-built trees.
//!
//! Every image gets the mount points a sandbox needs (`/var/task`, `/var/runtime`, `/opt`,
//! `/tmp`, and `/hearth/agent` where the agent binary is bind-mounted), because the sandbox
//! root is mounted read-only and gVisor cannot create them at start.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// Errors building, importing or finding images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "unknown runtime {0:?} (supported: python3.11, provided, provided.al2, provided.al2023)"
    )]
    UnknownRuntime(String),
    #[error("runtime image {name:?} is not built yet: run `hearth image build {name}`")]
    NotBuilt { name: String },
    #[error("{tool} is not installed: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    #[error("image i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot import {0}: not a directory or a tar archive")]
    BadImport(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to build one runtime image.
#[derive(Debug, Clone, Copy)]
pub struct Recipe {
    /// Image name, also the cache directory name.
    pub name: &'static str,
    /// Debian packages to install on top of `minbase`.
    pub packages: &'static [&'static str],
    /// Python wheels installed with pip into `/var/runtime` (no dependencies resolved).
    pub wheels: &'static [&'static str],
    /// Contents of `/var/runtime/bootstrap`, if the runtime brings its own.
    pub bootstrap: Option<&'static str>,
    /// `AWS_EXECUTION_ENV` value.
    pub execution_env: &'static str,
}

const PYTHON_BOOTSTRAP: &str = "#!/bin/sh\n\
# hearth python3.11 runtime: the official AWS Lambda runtime interface client\n\
export PYTHONPATH=\"/var/runtime${PYTHONPATH:+:$PYTHONPATH}\"\n\
exec /usr/bin/python3 -m awslambdaric \"$_HANDLER\"\n";

/// The runtimes hearth builds.
pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "python3.11",
        packages: &["python3", "libstdc++6", "ca-certificates"],
        wheels: &["awslambdaric", "simplejson", "snapshot-restore-py"],
        bootstrap: Some(PYTHON_BOOTSTRAP),
        execution_env: "AWS_Lambda_python3.11",
    },
    Recipe {
        name: "provided",
        packages: &["ca-certificates", "curl"],
        wheels: &[],
        bootstrap: None,
        execution_env: "AWS_Lambda_provided",
    },
];

/// The recipe serving a runtime identifier as given in `CreateFunction`.
pub fn recipe_for(runtime: &str) -> Result<&'static Recipe, ImageError> {
    let name = match runtime {
        "python3.11" => "python3.11",
        "provided" | "provided.al2" | "provided.al2023" => "provided",
        other => return Err(ImageError::UnknownRuntime(other.to_string())),
    };
    RECIPES
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ImageError::UnknownRuntime(runtime.to_string()))
}

/// What `image.json` records about a built image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub source: String,
    pub packages: Vec<String>,
    pub wheels: Vec<String>,
    pub built_at: String,
}

/// The image cache directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// An image cache at `dir` (made absolute: bundles refer to image roots by path).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        ImageStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root file system of a built image, by image name.
    pub fn rootfs(&self, name: &str) -> Result<PathBuf, ImageError> {
        let base = self.dir.join(name);
        if base.join("image.json").is_file() {
            Ok(base.join("rootfs"))
        } else {
            Err(ImageError::NotBuilt {
                name: name.to_string(),
            })
        }
    }

    /// Identity of the built image serving a runtime: a digest of its `image.json` (a rebuild
    /// changes it, so snapshots taken on the old image are not restored on the new one).
    pub fn image_id(&self, runtime: &str) -> Option<String> {
        self.image_id_by_name(recipe_for(runtime).ok()?.name)
    }

    /// [`ImageStore::image_id`] by image name.
    pub fn image_id_by_name(&self, name: &str) -> Option<String> {
        use sha2::Digest;
        let bytes = fs::read(self.dir.join(name).join("image.json")).ok()?;
        Some(hex::encode(sha2::Sha256::digest(&bytes)))
    }

    /// Unpack an image tar fetched from the chunk store, keeping its original `image.json`
    /// (so its identity, and the snapshots that depend on it, stay valid).
    pub fn import_tar_with_info(
        &self,
        name: &str,
        tar: &Path,
        image_json: &str,
    ) -> Result<PathBuf, ImageError> {
        let tmp = self.fresh_tmp(name)?;
        let rootfs = tmp.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
        let mut cmd = Command::new("tar");
        cmd.arg("-xf")
            .arg(tar)
            .arg("-C")
            .arg(&rootfs)
            .arg("--numeric-owner");
        if let Err(e) = run_streaming(cmd, "untar image", &mut |_| {}) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let meta = tmp.join("image.json");
        fs::write(&meta, image_json).map_err(io_err(&meta))?;
        let dest = self.dir.join(name);
        if dest.join("image.json").is_file() {
            // Another fetch finished first; sandboxes may already use it: keep it.
            let _ = fs::remove_dir_all(&tmp);
            return Ok(dest.join("rootfs"));
        }
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        Ok(dest.join("rootfs"))
    }

    /// The root file system serving a runtime identifier.
    pub fn rootfs_for_runtime(&self, runtime: &str) -> Result<PathBuf, ImageError> {
        self.rootfs(recipe_for(runtime)?.name)
    }

    /// Build every image that is missing.
    pub fn ensure_all(&self, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
        for recipe in RECIPES {
            if self.rootfs(recipe.name).is_err() {
                self.build(recipe, progress)?;
            } else {
                progress(&format!("{}: cached", recipe.name));
            }
        }
        Ok(())
    }

    /// Build one image with mmdebstrap (and pip for wheels), reporting progress lines.
    pub fn build(
        &self,
        recipe: &Recipe,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        which("mmdebstrap").ok_or(ImageError::MissingTool {
            tool: "mmdebstrap",
            hint: "apt-get install -y mmdebstrap",
        })?;
        let tmp = self.fresh_tmp(recipe.name)?;
        let rootfs = tmp.join("rootfs");
        let suite = host_suite();
        progress(&format!(
            "{}: mmdebstrap {suite} + {}",
            recipe.name,
            recipe.packages.join(",")
        ));
        let mut cmd = Command::new("mmdebstrap");
        cmd.arg("--variant=minbase")
            .arg("--mode=root")
            .arg(format!("--include={}", recipe.packages.join(",")))
            .arg("--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*")
            .arg(&suite)
            .arg(&rootfs);
        run_streaming(cmd, "mmdebstrap", &mut |line| {
            progress(&format!("{}: {line}", recipe.name))
        })?;
        if !recipe.wheels.is_empty() {
            progress(&format!(
                "{}: pip wheels {}",
                recipe.name,
                recipe.wheels.join(",")
            ));
            let target = rootfs.join("var/runtime");
            let mut pip = Command::new(python_for_pip());
            pip.args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
            ])
            .arg("--target")
            .arg(&target)
            .args([
                "--platform",
                "manylinux2014_x86_64",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
            ])
            .args(recipe.wheels);
            run_streaming(pip, "pip install", &mut |line| {
                progress(&format!("{}: {line}", recipe.name))
            })?;
        }
        finish_rootfs(&rootfs, recipe.bootstrap)?;
        let info = ImageInfo {
            name: recipe.name.to_string(),
            source: format!("mmdebstrap {suite}"),
            packages: recipe.packages.iter().map(|s| s.to_string()).collect(),
            wheels: recipe.wheels.iter().map(|s| s.to_string()).collect(),
            built_at: unix_now_string(),
        };
        let out = self.commit(&tmp, recipe.name, &info)?;
        progress(&format!("{}: built at {}", recipe.name, out.display()));
        Ok(out)
    }

    /// Import a root file system from a directory or a tarball under `name`.
    pub fn import(
        &self,
        name: &str,
        source: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(ImageError::Step {
                step: "import".into(),
                detail: format!("invalid image name {name:?}"),
            });
        }
        let tmp = self.fresh_tmp(name)?;
        let rootfs = tmp.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
        progress(&format!("{name}: importing {}", source.display()));
        let mut cmd;
        if source.is_dir() {
            cmd = Command::new("cp");
            cmd.arg("-a")
                .arg("--")
                .arg(format!("{}/.", source.display()))
                .arg(&rootfs);
        } else if source.is_file() {
            cmd = Command::new("tar");
            cmd.arg("-xf")
                .arg(source)
                .arg("-C")
                .arg(&rootfs)
                .arg("--no-same-owner");
        } else {
            let _ = fs::remove_dir_all(&tmp);
            return Err(ImageError::BadImport(source.to_path_buf()));
        }
        if let Err(e) = run_streaming(cmd, "import", &mut |l| progress(l)) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        finish_rootfs(&rootfs, None)?;
        let info = ImageInfo {
            name: name.to_string(),
            source: format!("import {}", source.display()),
            packages: vec![],
            wheels: vec![],
            built_at: unix_now_string(),
        };
        self.commit(&tmp, name, &info)
    }

    fn fresh_tmp(&self, name: &str) -> Result<PathBuf, ImageError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = self
            .dir
            .join(format!(".tmp-{name}-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(tmp)
    }

    fn commit(&self, tmp: &Path, name: &str, info: &ImageInfo) -> Result<PathBuf, ImageError> {
        let meta = tmp.join("image.json");
        let text = serde_json::to_vec_pretty(info).map_err(|e| ImageError::Step {
            step: "image.json".into(),
            detail: e.to_string(),
        })?;
        fs::write(&meta, text).map_err(io_err(&meta))?;
        let dest = self.dir.join(name);
        if dest.exists() {
            // Replace a stale or incomplete image: move it aside first, then delete it.
            let old = self
                .dir
                .join(format!(".old-{name}-{}", uuid::Uuid::new_v4().simple()));
            fs::rename(&dest, &old).map_err(io_err(&dest))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        Ok(dest.join("rootfs"))
    }
}

/// Add the mount points and bootstrap every sandbox root needs.
fn finish_rootfs(rootfs: &Path, bootstrap: Option<&str>) -> Result<(), ImageError> {
    for d in [
        "var/task",
        "var/runtime",
        "opt",
        "tmp",
        "hearth",
        "proc",
        "dev",
    ] {
        let p = rootfs.join(d);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    let agent = rootfs.join("hearth/agent");
    if !agent.exists() {
        fs::write(&agent, b"").map_err(io_err(&agent))?;
    }
    if let Some(script) = bootstrap {
        use std::os::unix::fs::PermissionsExt;
        let path = rootfs.join("var/runtime/bootstrap");
        fs::write(&path, script).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Run a command, passing each output line to `line`; fail with its last lines.
fn run_streaming(
    mut cmd: Command,
    step: &str,
    line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| ImageError::Step {
        step: step.to_string(),
        detail: e.to_string(),
    })?;
    // Merge stderr into the same line stream from a helper thread.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        }));
    }
    drop(tx);
    let mut tail: Vec<String> = Vec::new();
    for l in rx {
        line(&l);
        tail.push(l);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|e| ImageError::Step {
        step: step.to_string(),
        detail: e.to_string(),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Step {
            step: step.to_string(),
            detail: format!("{status}: {}", tail.join("\n")),
        })
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn python_for_pip() -> String {
    std::env::var("HEARTH_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// The Debian suite of this machine (its apt sources are what mmdebstrap can reach).
fn host_suite() -> String {
    if let Ok(s) = std::env::var("HEARTH_DEBIAN_SUITE") {
        return s;
    }
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "bookworm".to_string())
}

pub(crate) fn unix_now_string() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_cache_paths_become_absolute() {
        // Regression: a relative image cache put a relative root path into bundles, which runsc
        // resolved against the bundle directory and failed to mount.
        let store = ImageStore::new("target/hearth-images");
        assert!(store.dir().is_absolute());
        assert!(store.dir().ends_with("target/hearth-images"));
    }

    #[test]
    fn runtimes_map_to_recipes() {
        assert_eq!(
            recipe_for("python3.11").map(|r| r.name).ok(),
            Some("python3.11")
        );
        for r in ["provided", "provided.al2", "provided.al2023"] {
            assert_eq!(recipe_for(r).map(|r| r.name).ok(), Some("provided"));
        }
        assert!(matches!(
            recipe_for("nodejs20.x"),
            Err(ImageError::UnknownRuntime(_))
        ));
    }

    #[test]
    fn import_from_directory_adds_mount_points_and_is_atomic() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("bin")).unwrap();
        fs::write(src.path().join("bin/hello"), b"hi").unwrap();
        let cache = tempfile::tempdir().unwrap();
        let store = ImageStore::new(cache.path());
        assert!(matches!(
            store.rootfs("mine"),
            Err(ImageError::NotBuilt { .. })
        ));
        let root = store.import("mine", src.path(), &mut |_| {}).unwrap();
        assert_eq!(fs::read(root.join("bin/hello")).unwrap(), b"hi");
        assert!(root.join("var/task").is_dir());
        assert!(root.join("hearth/agent").is_file());
        assert_eq!(store.rootfs("mine").unwrap(), root);
        // No temporary directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(cache.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        assert!(store.import("../x", src.path(), &mut |_| {}).is_err());
        // A tarball imports the same way and replaces the earlier image.
        let tar = cache.path().join("root.tar");
        let status = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(src.path())
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        fs::write(src.path().join("bin/hello"), b"changed").unwrap();
        let root = store.import("mine", &tar, &mut |_| {}).unwrap();
        assert_eq!(fs::read(root.join("bin/hello")).unwrap(), b"hi");
        assert!(matches!(
            store.import("y", &src.path().join("missing"), &mut |_| {}),
            Err(ImageError::BadImport(_))
        ));
    }
}
