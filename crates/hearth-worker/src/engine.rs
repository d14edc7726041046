//! The sandbox engine: one gVisor (`runsc`) sandbox per execution environment.
//!
//! Why gVisor: each sandbox gets its own user-space kernel, and runsc can checkpoint and
//! restore a running sandbox (what snapshots need). Firecracker-style microVMs need hardware
//! virtualisation these machines do not offer (see `shared/DESIGN.md`); a microVM engine would
//! be a second implementation of the same `start` / `destroy` surface.
//!
//! A sandbox is an OCI bundle (`<bundles>/<id>/config.json`) run with
//! `runsc run --detach` and the `--network=none` network (loopback only). The agent is the
//! container's process; its stdin/stdout are pipes this process owns (the frame channel), its
//! stderr a pipe whose lines go to the worker's debug log.
//!
//! Teardown is fast only if someone reaps the sandbox and gofer processes: the worker marks
//! itself a child subreaper, so after `runsc run --detach` exits both processes become its
//! children, and a thread per process `waitpid`s them. `runsc delete` then returns in tens of
//! milliseconds instead of over a second. Container ids have a fixed length because runsc
//! matches ids by prefix.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};

use crate::cgroup::Cgroups;

/// Errors of the sandbox engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("runsc not found at {0}: install it with `apt-get install -y runsc`")]
    NoRunsc(PathBuf),
    #[error("agent binary not found at {0}: build it (see README) or set HEARTH_AGENT")]
    NoAgent(PathBuf),
    #[error("runsc {op} {id} failed: {detail}")]
    Runsc {
        op: &'static str,
        id: String,
        detail: String,
    },
    #[error("sandbox i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Configuration of the runsc engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub runsc: PathBuf,
    /// runsc's state directory (`--root`); owned by this worker alone.
    pub state_root: PathBuf,
    /// Where bundles are written.
    pub bundles: PathBuf,
    /// The static agent binary, bind-mounted read-only at `/hearth/agent`.
    pub agent: PathBuf,
    /// Pin each sandbox to one core (round robin). Syscalls under the ptrace platform are
    /// 4–5× cheaper pinned (`shared/research/gvisor.md`).
    pub pin_cores: bool,
    /// Extra global runsc flags (e.g. `--platform=systrap` on newer runsc).
    pub extra_flags: Vec<String>,
}

/// What to run in one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub rootfs: PathBuf,
    pub code_dir: PathBuf,
    /// `KEY=VALUE` environment of the agent (passed on to the runtime).
    pub env: Vec<String>,
    pub memory_mb: u32,
    pub tmp_mb: u32,
    pub pids_limit: i64,
}

/// Extra memory allowed above the function's memory size for gVisor's own kernel (the sentry's
/// memory is charged to the sandbox's cgroup).
pub const SENTRY_OVERHEAD_MB: u64 = 64;

/// A running sandbox: its pipes and the processes to reap.
pub struct Sandbox {
    pub id: String,
    pub stdin: ChildStdin,
    /// Taken by the frame reader once the sandbox is handed to the pool.
    pub stdout: Option<ChildStdout>,
    reapers: Vec<std::thread::JoinHandle<()>>,
    /// Last lines the sandbox wrote to stderr (agent diagnostics, runsc errors).
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// The runsc engine.
pub struct RunscEngine {
    cfg: EngineConfig,
    /// SHA-256 of the agent binary and runsc's version: what snapshots depend on.
    agent_digest: String,
    runsc_version: String,
    cgroups: Cgroups,
    next_core: AtomicUsize,
    cores: usize,
}

impl RunscEngine {
    /// Check the configuration, become a child subreaper, prepare cgroups.
    pub fn new(mut cfg: EngineConfig) -> Result<Self, EngineError> {
        if !cfg.runsc.is_file() {
            return Err(EngineError::NoRunsc(cfg.runsc.clone()));
        }
        if !cfg.agent.is_file() {
            return Err(EngineError::NoAgent(cfg.agent.clone()));
        }
        for d in [&cfg.state_root, &cfg.bundles] {
            std::fs::create_dir_all(d).map_err(|source| EngineError::Io {
                path: d.clone(),
                source,
            })?;
        }
        // Bundles resolve relative paths against the bundle directory: make every path absolute.
        for p in [&mut cfg.state_root, &mut cfg.bundles, &mut cfg.agent] {
            *p = std::path::absolute(&*p).map_err(|source| EngineError::Io {
                path: p.clone(),
                source,
            })?;
        }
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integer arguments and changes only
        // this process's reaping behaviour.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        // One cgroup directory per worker, named after its state root.
        let instance = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(cfg.state_root.to_string_lossy().as_bytes());
            format!("w{}", &hex::encode(digest)[..12])
        };
        let cgroups = Cgroups::discover(&instance);
        cgroups.prepare();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(RunscEngine {
            agent_digest: file_digest(&cfg.agent),
            runsc_version: runsc_version(&cfg.runsc),
            cfg,
            cgroups,
            next_core: AtomicUsize::new(0),
            cores,
        })
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn agent_digest(&self) -> &str {
        &self.agent_digest
    }

    pub fn runsc_version(&self) -> &str {
        &self.runsc_version
    }

    fn runsc(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.cfg.runsc);
        c.arg(format!("--root={}", self.cfg.state_root.display()))
            .arg("--network=none")
            .args(&self.cfg.extra_flags)
            .stdin(Stdio::null());
        c
    }

    /// Remove every container, bundle and cgroup an earlier run of this worker left behind.
    /// Returns the ids of containers removed.
    pub fn cleanup_stale(&self) -> Vec<String> {
        let ids = self.list();
        for id in &ids {
            let _ = self.runsc().args(["kill", id, "KILL"]).output();
            let _ = self.runsc().args(["delete", "--force", id]).output();
            self.cgroups.remove_sandbox(id);
        }
        if let Ok(entries) = std::fs::read_dir(&self.cfg.bundles) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.cgroups.remove_stale();
        ids
    }

    /// Container ids runsc knows under this worker's state root.
    pub fn list(&self) -> Vec<String> {
        match self.runsc().args(["list", "-quiet"]).output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A new fixed-length sandbox id.
    pub fn new_id() -> String {
        let n: u64 = rand::random();
        format!("hs{n:016x}")
    }

    fn bundle_config(
        &self,
        id: &str,
        spec: &SandboxSpec,
        core: Option<usize>,
    ) -> serde_json::Value {
        let mem = (spec.memory_mb as u64 + SENTRY_OVERHEAD_MB) * 1024 * 1024;
        let mut cpu = json!({ "shares": (spec.memory_mb as u64 * 1024 / 1769).max(2) });
        if let Some(core) = core {
            cpu["cpus"] = json!(core.to_string());
            cpu["mems"] = json!("0");
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": { "uid": 993, "gid": 990 },
                "args": ["/hearth/agent"],
                "env": spec.env,
                "cwd": "/",
                "noNewPrivileges": true,
                "capabilities": { "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] },
                "rlimits": [ { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 } ]
            },
            "root": { "path": spec.rootfs, "readonly": true },
            "hostname": "hearth",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", spec.tmp_mb)] },
                { "destination": "/var/task", "type": "bind", "source": spec.code_dir, "options": ["rbind", "ro"] },
                { "destination": "/hearth/agent", "type": "bind", "source": self.cfg.agent, "options": ["bind", "ro"] }
            ],
            "linux": {
                "cgroupsPath": self.cgroups.sandbox_path(id),
                "resources": {
                    "memory": { "limit": mem },
                    "pids": { "limit": spec.pids_limit },
                    "cpu": cpu
                },
                "namespaces": [ {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"} ]
            }
        })
    }

    /// Write the bundle and start the sandbox. Returns once the agent process runs.
    pub async fn start(&self, spec: &SandboxSpec) -> Result<Sandbox, EngineError> {
        self.launch(spec, None).await
    }

    /// Restore a sandbox from a checkpoint image directory (`checkpoint.img` inside), with a
    /// bundle of its own (own id, cgroup and pipes). The restored agent resumes where the
    /// checkpoint stopped it; it does not say `Hello` again.
    pub async fn restore(
        &self,
        spec: &SandboxSpec,
        image_dir: &Path,
    ) -> Result<Sandbox, EngineError> {
        self.launch(spec, Some(image_dir)).await
    }

    /// Checkpoint a running sandbox into `image_dir`. The sandbox is stopped afterwards (runsc
    /// always stops it); destroy it to reap and clean up.
    pub async fn checkpoint(&self, sandbox: &Sandbox, image_dir: &Path) -> Result<(), EngineError> {
        std::fs::create_dir_all(image_dir).map_err(|source| EngineError::Io {
            path: image_dir.to_path_buf(),
            source,
        })?;
        let out = Command::new(&self.cfg.runsc)
            .arg(format!("--root={}", self.cfg.state_root.display()))
            .arg("--network=none")
            .args(&self.cfg.extra_flags)
            .arg("checkpoint")
            .arg(format!("--image-path={}", image_dir.display()))
            .arg(&sandbox.id)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| EngineError::Runsc {
                op: "checkpoint",
                id: sandbox.id.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(EngineError::Runsc {
                op: "checkpoint",
                id: sandbox.id.clone(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    async fn launch(
        &self,
        spec: &SandboxSpec,
        image_dir: Option<&Path>,
    ) -> Result<Sandbox, EngineError> {
        let op = if image_dir.is_some() {
            "restore"
        } else {
            "run"
        };
        let id = Self::new_id();
        let bundle = self.cfg.bundles.join(&id);
        std::fs::create_dir_all(&bundle).map_err(|source| EngineError::Io {
            path: bundle.clone(),
            source,
        })?;
        let config = bundle.join("config.json");
        // Boots run pinned from the start (syscalls are 4-5x cheaper pinned under ptrace);
        // restores decompress the image on every core, so they are pinned once restored.
        let core = self
            .cfg
            .pin_cores
            .then(|| self.next_core.fetch_add(1, Ordering::Relaxed) % self.cores);
        let bundle_core = if image_dir.is_some() { None } else { core };
        let text = serde_json::to_vec_pretty(&self.bundle_config(&id, spec, bundle_core))
            .unwrap_or_default();
        std::fs::write(&config, text).map_err(|source| EngineError::Io {
            path: config.clone(),
            source,
        })?;

        let mut cmd = Command::new(&self.cfg.runsc);
        cmd.arg(format!("--root={}", self.cfg.state_root.display()))
            .arg("--network=none")
            .args(&self.cfg.extra_flags)
            .arg(op);
        if let Some(dir) = image_dir {
            cmd.arg(format!("--image-path={}", dir.display()));
        }
        cmd.args(["--detach", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| EngineError::Runsc {
            op,
            id: id.clone(),
            detail: e.to_string(),
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(EngineError::Runsc {
                op,
                id,
                detail: "no stdio pipes".into(),
            });
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        spawn_stderr_reader(id.clone(), stderr, stderr_tail.clone());
        let status = child.wait().await.map_err(|e| EngineError::Runsc {
            op,
            id: id.clone(),
            detail: e.to_string(),
        })?;
        if !status.success() {
            // Give the stderr reader a moment to collect runsc's message.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let detail = tail_text(&stderr_tail);
            let _ = self.runsc().args(["delete", "--force", &id]).output();
            let _ = std::fs::remove_dir_all(&bundle);
            self.cgroups.remove_sandbox(&id);
            return Err(EngineError::Runsc {
                op,
                id,
                detail: format!("{status}: {detail}"),
            });
        }
        if image_dir.is_some()
            && let Some(core) = core
        {
            self.cgroups.set_cpus(&id, &core.to_string());
        }
        let reapers = self.reap_threads(&id);
        Ok(Sandbox {
            id,
            stdin,
            stdout: Some(stdout),
            reapers,
            stderr_tail,
        })
    }

    /// Threads that wait for the sandbox and gofer processes (now children of this subreaper).
    fn reap_threads(&self, id: &str) -> Vec<std::thread::JoinHandle<()>> {
        let state = self.cfg.state_root.join(format!("{id}_sandbox:{id}.state"));
        let pids = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| {
                let mut pids = Vec::new();
                if let Some(p) = v.pointer("/sandbox/pid").and_then(|p| p.as_i64()) {
                    pids.push(p as i32);
                }
                if let Some(p) = v.get("goferPid").and_then(|p| p.as_i64()) {
                    pids.push(p as i32);
                }
                pids
            })
            .unwrap_or_default();
        pids.into_iter()
            .filter(|p| *p > 1)
            .map(|pid| {
                std::thread::spawn(move || {
                    let mut status = 0;
                    // SAFETY: waitpid on a specific pid with a valid pointer to a local int.
                    unsafe {
                        libc::waitpid(pid, &mut status, 0);
                    }
                })
            })
            .collect()
    }

    /// Kill and delete a sandbox, reap its processes, remove its bundle and cgroups.
    /// Blocking (tens of milliseconds); call from a blocking context.
    pub fn destroy(&self, sandbox: Sandbox) {
        let Sandbox {
            id,
            stdin,
            stdout,
            reapers,
            ..
        } = sandbox;
        drop(stdin);
        drop(stdout);
        let _ = self.runsc().args(["kill", &id, "KILL"]).output();
        let out = self.runsc().args(["delete", "--force", &id]).output();
        if let Ok(o) = &out
            && !o.status.success()
        {
            tracing::debug!(sandbox = %id, "runsc delete: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        for r in reapers {
            let _ = r.join();
        }
        let _ = std::fs::remove_dir_all(self.cfg.bundles.join(&id));
        self.cgroups.remove_sandbox(&id);
    }
}

fn spawn_stderr_reader(
    id: String,
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(sandbox = %id, "sandbox stderr: {line}");
            if let Ok(mut t) = tail.lock() {
                if t.len() >= 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
}

fn tail_text(tail: &Arc<Mutex<VecDeque<String>>>) -> String {
    tail.lock()
        .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// `runsc --version`'s first line (what a snapshot image depends on).
pub fn runsc_version(runsc: &Path) -> String {
    std::process::Command::new(runsc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

/// SHA-256 of a file, hex (identifies the agent binary a snapshot was taken with).
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest;
    match std::fs::read(path) {
        Ok(bytes) => hex::encode(sha2::Sha256::digest(&bytes)),
        Err(_) => String::new(),
    }
}

/// Default runsc path: `$HEARTH_RUNSC`, else the first `runsc` on PATH, else `/usr/bin/runsc`.
pub fn default_runsc() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_RUNSC") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("runsc"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| Path::new("/usr/bin/runsc").to_path_buf())
}
