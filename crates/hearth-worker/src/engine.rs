//! The sandbox engine: one gVisor (`runsc`) sandbox per execution environment.
//!
//! Why gVisor: each sandbox gets its own user-space kernel, and runsc can checkpoint and
//! restore a running sandbox (what snapshots need). Firecracker-style microVMs need hardware
//! virtualisation these machines do not offer (see `shared/DESIGN.md`); a microVM engine would
//! be a second implementation of the same create / start / restore / destroy surface.
//!
//! # A sandbox's life
//!
//! 1. **create** ([`RunscEngine::create`]): a generic sandbox for one runtime image, made before
//!    anyone knows which function it will serve (the worker keeps a pool of them). Its OCI
//!    bundle has the image's root read-only, empty per-sandbox directories bind-mounted
//!    read-only at `/var/task` and `/opt`, its own `/tmp` disk ([`crate::tmpdisk`]),
//!    optionally its own network namespace ([`crate::netns`]), and the agent as its process
//!    with a generic environment (`HEARTH_AGENT_DEFER=1`). `runsc create` brings up the sentry and gofer; the
//!    agent does not run yet. The pipes given to `runsc create` stay the agent's stdio.
//! 2. **claim**: the function's code is hard-linked into the `/var/task` directory and its
//!    merged layers into `/opt` (a file added to a bind mount's source after create is visible
//!    inside), the cgroup gets the function's
//!    memory limit and CPU share, and the sandbox is pinned to a core.
//! 3. **start** ([`RunscEngine::start`]) boots the agent, which waits for the function's
//!    environment in its first frame; or **restore** ([`RunscEngine::restore`]) restores a
//!    snapshot into the created sandbox (`runsc restore` of a created container, where the
//!    probe says the engine can; otherwise into a fresh container with new pipes).
//! 4. **destroy**: kill, delete, reap, and remove bundle, cgroup, `/tmp` disk and network.
//!
//! Teardown is fast only if someone reaps the sandbox and gofer processes: the worker marks
//! itself a child subreaper, so after `runsc create` exits both processes become its children,
//! and a thread per process `waitpid`s them. `runsc delete` then returns in tens of
//! milliseconds instead of over a second. Container ids have a fixed length because runsc
//! matches ids by prefix.
//!
//! What runsc offers (platform, uncompressed checkpoints, restore into a created container,
//! netstack) is probed at start ([`crate::probe`]); the engine uses the best of it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_proto::{AgentMsg, Frame};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};

use crate::affinity::{self, Pinning};
use crate::cgroup::Cgroups;
use crate::frames;
use crate::netns::{NetPolicy, Network, SandboxNet};
use crate::probe::Caps;
use crate::tmpdisk::TmpDisk;

/// Errors of the sandbox engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "runsc not found at {0}: install it with `./hearth.sh up` (Debian bookworm-backports' runsc) or set HEARTH_RUNSC"
    )]
    NoRunsc(PathBuf),
    #[error("agent binary not found at {0}: build it (see README) or set HEARTH_AGENT")]
    NoAgent(PathBuf),
    #[error("runsc is unusable here: {0}")]
    Unusable(#[from] crate::probe::ProbeError),
    #[error("sandbox networking: {0}")]
    Network(#[from] crate::netns::NetError),
    #[error("sandbox /tmp: {0}")]
    Tmp(#[from] crate::tmpdisk::TmpError),
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Configuration of the runsc engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub runsc: PathBuf,
    /// runsc's state directory (`--root`); owned by this worker alone.
    pub state_root: PathBuf,
    /// Where bundles are written.
    pub bundles: PathBuf,
    /// Per-sandbox directories: the `/var/task` link tree and the `/tmp` disk image.
    pub slots: PathBuf,
    /// The static agent binary, bind-mounted read-only at `/hearth/agent`.
    pub agent: PathBuf,
    /// How sandboxes are placed on cores (round robin).
    pub pinning: Pinning,
    /// Restore through the sentry's control socket where the probe found that works
    /// (`sentry.rs`); false always runs `runsc restore`.
    pub control_restore: bool,
    /// Extra global runsc flags.
    pub extra_flags: Vec<String>,
    /// Whether sandboxes may get outbound networking.
    pub network: NetPolicy,
    /// Where probe results are cached (per runsc binary).
    pub probe_cache: PathBuf,
    /// Mark the sandboxes' sentry and gofer mergeable by the kernel's same-page merging
    /// (`ksm.rs`), starting its scanner if it is off; where the kernel cannot, the engine
    /// says why and runs without.
    pub merge_pages: bool,
}

impl EngineConfig {
    /// A configuration with everything under `dir` (state, bundles, slots) and defaults for
    /// the rest: pinned, egress allowed, probe results cached in `/var/cache/hearth`.
    pub fn under(dir: &Path, runsc: PathBuf, agent: PathBuf) -> Self {
        EngineConfig {
            runsc,
            state_root: dir.join("runsc"),
            bundles: dir.join("bundles"),
            slots: dir.join("slots"),
            agent,
            pinning: Pinning::Split,
            control_restore: true,
            extra_flags: vec![],
            network: NetPolicy::Egress,
            probe_cache: default_probe_cache(),
            merge_pages: true,
        }
    }
}

/// `$HEARTH_PROBE_CACHE`, else `/var/cache/hearth`.
pub fn default_probe_cache() -> PathBuf {
    std::env::var_os("HEARTH_PROBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/hearth"))
}

/// A sandbox's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetMode {
    /// Loopback only (`--network=none`); what snapshots need on this engine.
    None,
    /// Outbound network through the sandbox's own namespace.
    Egress,
}

/// The generic part of a sandbox, fixed at create.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotSpec {
    pub rootfs: PathBuf,
    pub net: NetMode,
    pub tmp_mb: u32,
    pub pids_limit: i64,
    /// Started at create (`runsc start`): the agent runs and waits for its function's
    /// `Configure`, and a runtime with a `prestart` loads meanwhile. What boots use; restores
    /// need a sandbox that was created only.
    pub started: bool,
    /// The memory size a started sandbox's prestart sizes its runtime for (in its environment
    /// as `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`); `None` for images whose prestart does not.
    pub memory_mb: Option<u32>,
}

impl SlotSpec {
    /// Whether a sandbox of this kind can serve `kind` though it was made for another memory
    /// size: its prestart then declines the function and the bootstrap starts a fresh runtime,
    /// which is still faster than creating a sandbox.
    pub fn serves_resized(&self, kind: &SlotSpec) -> bool {
        self.memory_mb.is_some()
            && kind.memory_mb.is_some()
            && SlotSpec {
                memory_mb: kind.memory_mb,
                ..self.clone()
            } == *kind
    }
}

/// What a claim gives a created sandbox.
#[derive(Debug, Clone)]
pub struct Claim {
    pub code_dir: PathBuf,
    /// The function's layers merged ([`crate::layers`]), for `/opt`; `None`: no layers.
    pub opt_dir: Option<PathBuf>,
    pub memory_mb: u32,
}

/// The variables Lambda gives every runtime that do not depend on the function: a sandbox's
/// agent starts with them, so that a prestarted runtime starts as it would for any function.
pub const PLATFORM_ENV: &[(&str, &str)] = &[
    ("TZ", ":UTC"),
    ("LANG", "C.UTF-8"),
    (
        "PATH",
        "/var/lang/bin:/usr/local/bin:/usr/bin:/bin:/opt/bin",
    ),
    (
        "LD_LIBRARY_PATH",
        "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
    ),
    ("LAMBDA_TASK_ROOT", "/var/task"),
    ("LAMBDA_RUNTIME_DIR", "/var/runtime"),
];

/// The [`PLATFORM_ENV`] variables a function may set itself (Lambda documents `LANG`, `PATH` and
/// `LD_LIBRARY_PATH` as not reserved, and takes a function's `TZ`): its own value replaces
/// Lambda's. A prestarted runtime that started with another value declines such a function
/// unless it follows the variable at run time.
pub const FUNCTION_SETTABLE_ENV: &[&str] = &["TZ", "LANG", "PATH", "LD_LIBRARY_PATH"];

/// How long a started sandbox's agent may take to say Hello.
const HELLO_LIMIT: Duration = Duration::from_secs(20);

/// Extra memory allowed above the function's memory size for gVisor's own kernel (the sentry's
/// memory is charged to the sandbox's cgroup).
pub const SENTRY_OVERHEAD_MB: u64 = 64;

/// The memory limit a sandbox is created with (the smallest function size plus the sentry);
/// a claim raises it to the function's size.
pub const CREATE_MEMORY_MB: u64 = 128 + SENTRY_OVERHEAD_MB;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
}

/// The worker's end of the pipe into a sandbox's agent.
pub type AgentIn = Box<dyn AsyncWrite + Send + Sync + Unpin>;
/// The worker's end of the pipe out of a sandbox's agent.
pub type AgentOut = Box<dyn AsyncRead + Send + Sync + Unpin>;

/// A sandbox: its pipes, the processes to reap, and what it owns on the host.
pub struct Sandbox {
    pub id: String,
    pub stdin: AgentIn,
    /// Taken by the frame reader once the sandbox runs.
    pub stdout: Option<AgentOut>,
    reapers: Vec<std::thread::JoinHandle<()>>,
    /// Last lines the sandbox wrote to stderr (agent diagnostics, runsc errors).
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
    pub spec: SlotSpec,
    pub phase: Phase,
    pub created_at: Instant,
    dir: PathBuf,
    tmp: Option<TmpDisk>,
    net: Option<SandboxNet>,
}

impl Sandbox {
    /// A sandbox that owns nothing on the host but its directory: what an engine other than
    /// runsc (a test's fake) hands the pool, with the agent's pipes.
    pub fn detached(
        id: String,
        spec: SlotSpec,
        dir: PathBuf,
        stdin: AgentIn,
        stdout: AgentOut,
    ) -> Self {
        Sandbox {
            id,
            stdin,
            stdout: Some(stdout),
            reapers: Vec::new(),
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
            phase: if spec.started {
                Phase::Running
            } else {
                Phase::Created
            },
            spec,
            created_at: Instant::now(),
            dir,
            tmp: None,
            net: None,
        }
    }

    pub fn task_dir(&self) -> PathBuf {
        self.dir.join("task")
    }

    /// The directory bound read-only at `/opt`: the function's layers, merged.
    pub fn opt_dir(&self) -> PathBuf {
        self.dir.join("opt")
    }
}

/// What the worker's pool needs from a sandbox engine. [`RunscEngine`] runs gVisor; tests of
/// the pool's decisions use [`crate::fake::FakeEngine`], which runs an in-process agent and
/// keeps time on tokio's clock.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Remove what an earlier run left (containers, cgroups, networks); their ids.
    fn cleanup_stale(&self) -> Vec<String>;
    /// Whether sandboxes may get outbound network (the server's policy).
    fn egress_allowed(&self) -> bool;
    /// Whether a sandbox with outbound network can be checkpointed and restored.
    fn egress_with_snapshots(&self) -> bool;
    /// What snapshots depend on: the agent and the engine with its flags.
    fn agent_digest(&self) -> &str;
    fn engine_id(&self) -> String;
    /// A generic sandbox of `spec` (started, with its agent said `Hello`, if `spec.started`).
    async fn create(&self, spec: &SlotSpec) -> Result<Sandbox, EngineError>;
    /// Give a created sandbox to a function and boot its agent.
    async fn start(&self, sandbox: &mut Sandbox, claim: &Claim) -> Result<(), EngineError>;
    /// Give a created sandbox to a function and restore the checkpoint in `image_dir` into it.
    async fn restore(
        &self,
        sandbox: &mut Sandbox,
        claim: &Claim,
        image_dir: &Path,
    ) -> Result<(), EngineError>;
    /// Checkpoint a running sandbox into `image_dir` (the sandbox stops).
    async fn checkpoint(&self, sandbox: &Sandbox, image_dir: &Path) -> Result<(), EngineError>;
    /// Kill the sandbox and remove what it owns. Blocking.
    fn destroy(&self, sandbox: Sandbox);
    /// Freeze or thaw a sandbox; whether it is now as asked.
    fn set_frozen(&self, id: &str, frozen: bool) -> bool;
    /// The sandbox's resident memory, bytes.
    fn resident(&self, id: &str) -> Option<u64>;
    /// Whether a sandbox whose memory peaked at `peak` ran out of memory.
    fn out_of_memory(&self, id: &str, peak: u64) -> bool;
    /// Whether the kernel killed the sandbox for memory.
    fn oom_killed(&self, id: &str) -> bool;
    /// The worker stopped: remove the engine's shared resources (cgroup parent, network).
    fn shutdown(&self);
}

#[async_trait::async_trait]
impl Engine for RunscEngine {
    fn cleanup_stale(&self) -> Vec<String> {
        RunscEngine::cleanup_stale(self)
    }
    fn egress_allowed(&self) -> bool {
        RunscEngine::egress_allowed(self)
    }
    fn egress_with_snapshots(&self) -> bool {
        RunscEngine::egress_with_snapshots(self)
    }
    fn agent_digest(&self) -> &str {
        RunscEngine::agent_digest(self)
    }
    fn engine_id(&self) -> String {
        RunscEngine::engine_id(self)
    }
    async fn create(&self, spec: &SlotSpec) -> Result<Sandbox, EngineError> {
        RunscEngine::create(self, spec).await
    }
    async fn start(&self, sandbox: &mut Sandbox, claim: &Claim) -> Result<(), EngineError> {
        RunscEngine::start(self, sandbox, claim).await
    }
    async fn restore(
        &self,
        sandbox: &mut Sandbox,
        claim: &Claim,
        image_dir: &Path,
    ) -> Result<(), EngineError> {
        RunscEngine::restore(self, sandbox, claim, image_dir).await
    }
    async fn checkpoint(&self, sandbox: &Sandbox, image_dir: &Path) -> Result<(), EngineError> {
        RunscEngine::checkpoint(self, sandbox, image_dir).await
    }
    fn destroy(&self, sandbox: Sandbox) {
        RunscEngine::destroy(self, sandbox)
    }
    fn set_frozen(&self, id: &str, frozen: bool) -> bool {
        self.cgroups.set_frozen(id, frozen)
    }
    fn resident(&self, id: &str) -> Option<u64> {
        self.cgroups.resident(id)
    }
    fn out_of_memory(&self, id: &str, peak: u64) -> bool {
        self.cgroups.out_of_memory(id, peak)
    }
    fn oom_killed(&self, id: &str) -> bool {
        self.cgroups.oom_killed(id)
    }
    fn shutdown(&self) {
        self.cgroups.remove_parent();
        self.shutdown_network();
    }
}

/// The runsc engine.
pub struct RunscEngine {
    cfg: EngineConfig,
    /// SHA-256 of the agent binary: what snapshots depend on.
    agent_digest: String,
    caps: Caps,
    network: Option<Arc<Network>>,
    cgroups: Cgroups,
    next_core: AtomicUsize,
    cores: usize,
    /// Sandboxes' sentry and gofer are marked mergeable (`ksm.rs`).
    merging: bool,
    /// This worker's liveness lock: while held, no other worker removes its cgroups.
    _instance_lock: crate::cgroup::InstanceLock,
}

impl RunscEngine {
    /// Check the configuration, probe runsc, become a child subreaper, prepare cgroups and
    /// (with the egress policy) the worker's network rules.
    pub fn new(mut cfg: EngineConfig) -> Result<Self, EngineError> {
        if !cfg.runsc.is_file() {
            return Err(EngineError::NoRunsc(cfg.runsc.clone()));
        }
        if !cfg.agent.is_file() {
            return Err(EngineError::NoAgent(cfg.agent.clone()));
        }
        for d in [&cfg.state_root, &cfg.bundles, &cfg.slots] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        // Bundles resolve relative paths against the bundle directory: make every path absolute.
        for p in [
            &mut cfg.state_root,
            &mut cfg.bundles,
            &mut cfg.slots,
            &mut cfg.agent,
        ] {
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
        let probe_work = cfg.state_root.with_file_name("probe");
        let caps = crate::probe::probe(&cfg.runsc, &cfg.agent, &probe_work, &cfg.probe_cache)?;
        tracing::info!(
            version = %caps.version,
            platform = %caps.platform,
            uncompressed_checkpoints = caps.uncompressed,
            zero_page_exclusion = caps.zero_pages,
            restore_into_created = caps.restore_into_created,
            control_restore = caps.control_restore,
            netstack = caps.netstack,
            directfs = caps.directfs,
            "runsc probed"
        );
        for note in &caps.notes {
            tracing::info!("runsc probe: {note}");
        }
        // One cgroup directory (and one network table) per worker, named after its state root.
        let instance = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(cfg.state_root.to_string_lossy().as_bytes());
            format!("w{}", &hex::encode(digest)[..10])
        };
        let cgroups = Cgroups::discover(&instance);
        let lock_dir = Path::new(crate::cgroup::WORKER_LOCK_DIR);
        let instance_lock = cgroups.lock_instance(lock_dir);
        cgroups.prepare();
        let gone = cgroups.remove_dead_workers(lock_dir);
        if gone > 0 {
            tracing::info!(
                directories = gone,
                "removed the cgroup directories of workers that are gone"
            );
        }
        let network = match cfg.network {
            NetPolicy::Egress => {
                let net_state = cfg.state_root.with_file_name("net");
                Some(Arc::new(Network::new(&instance, &net_state)?))
            }
            NetPolicy::None => None,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let merging = cfg.merge_pages
            && match crate::ksm::enable(Path::new(crate::ksm::SYSFS)) {
                Ok(changed) => {
                    tracing::info!(
                        changed = %changed.join(" "),
                        "same-page merging on for the sandboxes' sentry and gofer"
                    );
                    true
                }
                Err(e) => {
                    tracing::warn!("same-page merging off: {e}");
                    false
                }
            };
        Ok(RunscEngine {
            agent_digest: file_digest(&cfg.agent),
            caps,
            network,
            cfg,
            cgroups,
            next_core: AtomicUsize::new(0),
            cores,
            merging,
            _instance_lock: instance_lock,
        })
    }

    /// Whether the sandboxes' sentry and gofer are made mergeable (`ksm.rs`).
    pub fn merging(&self) -> bool {
        self.merging
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    pub fn agent_digest(&self) -> &str {
        &self.agent_digest
    }

    pub fn runsc_version(&self) -> &str {
        &self.caps.version
    }

    /// The engine a snapshot depends on: runsc's version and the checkpoint flags.
    pub fn engine_id(&self) -> String {
        self.caps.engine_id()
    }

    /// Whether sandboxes can have outbound networking at all (the server's policy).
    pub fn egress_allowed(&self) -> bool {
        self.network.is_some()
    }

    /// Whether a sandbox with egress can also be checkpointed (only with netstack).
    pub fn egress_with_snapshots(&self) -> bool {
        self.egress_allowed() && self.caps.netstack
    }

    fn network_flag(&self, net: NetMode) -> &'static str {
        match net {
            NetMode::None => "--network=none",
            NetMode::Egress if self.caps.netstack => "--network=sandbox",
            NetMode::Egress => "--network=host",
        }
    }

    fn base_args(&self, net: NetMode) -> Vec<String> {
        let mut a = vec![
            format!("--root={}", self.cfg.state_root.display()),
            format!("--platform={}", self.caps.platform),
            self.network_flag(net).to_string(),
        ];
        a.extend(self.cfg.extra_flags.iter().cloned());
        a
    }

    fn runsc(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.cfg.runsc);
        c.args(self.base_args(NetMode::None)).stdin(Stdio::null());
        c
    }

    fn runsc_async(&self, net: NetMode) -> Command {
        let mut c = Command::new(&self.cfg.runsc);
        c.args(self.base_args(net));
        c
    }

    /// A runsc command that starts a sandbox's processes (create, restore into a new
    /// container): with merging on, marked mergeable, which its gofer and sentry inherit.
    /// With directfs the gofer only serves the mounts' setup and restores, so it gets one Go
    /// processor (`GOMAXPROCS` reaches the gofer; runsc starts the sentry with an empty
    /// environment): fewer per-processor caches, ≈ 0.5 MiB less per sandbox (`docs/perf.md`).
    fn runsc_sandbox(&self, net: NetMode) -> Command {
        let mut c = self.runsc_async(net);
        if self.caps.directfs {
            c.env("GOMAXPROCS", "1");
        }
        if self.merging {
            // SAFETY: the closure runs in the child between fork and exec and makes one
            // system call (prctl), allocating nothing.
            unsafe {
                c.pre_exec(crate::ksm::mark_this_process);
            }
        }
        c
    }

    /// Remove every container, bundle, `/tmp` disk and cgroup an earlier run of this worker
    /// left behind (its network namespaces went when the network was set up). Returns the ids
    /// of containers removed.
    pub fn cleanup_stale(&self) -> Vec<String> {
        let ids = self.list();
        for id in &ids {
            // A sandbox the earlier run left frozen would not answer runsc.
            self.cgroups.set_frozen(id, false);
            let _ = self.runsc().args(["kill", id, "KILL"]).output();
            let _ = self.runsc().args(["delete", "--force", id]).output();
            self.cgroups.remove_sandbox(id);
        }
        for m in crate::tmpdisk::mounts_under(&self.cfg.slots) {
            crate::tmpdisk::unmount(&m);
        }
        for dir in [&self.cfg.bundles, &self.cfg.slots] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
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
        spec: &SlotSpec,
        dir: &Path,
        net: Option<&SandboxNet>,
    ) -> serde_json::Value {
        let mut netns = json!({"type": "network"});
        let mut mounts = vec![
            json!({ "destination": "/proc", "type": "proc", "source": "proc" }),
            json!({ "destination": "/tmp", "type": "bind", "source": dir.join("tmp"),
                    "options": ["rbind", "rw", "nosuid", "nodev"] }),
            json!({ "destination": "/var/task", "type": "bind", "source": dir.join("task"),
                    "options": ["rbind", "ro"] }),
            json!({ "destination": "/opt", "type": "bind", "source": dir.join("opt"),
                    "options": ["rbind", "ro"] }),
            json!({ "destination": "/hearth/agent", "type": "bind", "source": self.cfg.agent,
                    "options": ["bind", "ro"] }),
        ];
        if let Some(n) = net {
            netns["path"] = json!(n.netns_path);
            mounts.push(json!({ "destination": "/etc/resolv.conf", "type": "bind",
                                "source": n.resolv_conf, "options": ["bind", "ro"] }));
        }
        let mut env = vec!["HEARTH_AGENT_DEFER=1".to_string()];
        env.extend(PLATFORM_ENV.iter().map(|(k, v)| format!("{k}={v}")));
        if let Some(mb) = spec.memory_mb {
            env.push(format!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE={mb}"));
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": { "uid": 993, "gid": 990 },
                "args": ["/hearth/agent"],
                "env": env,
                "cwd": "/",
                "noNewPrivileges": true,
                "capabilities": { "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] },
                "rlimits": [ { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 } ]
            },
            "root": { "path": spec.rootfs, "readonly": true },
            "hostname": "hearth",
            "mounts": mounts,
            "linux": {
                "cgroupsPath": self.cgroups.sandbox_path(id),
                "resources": {
                    "memory": { "limit": CREATE_MEMORY_MB * 1024 * 1024 },
                    "pids": { "limit": spec.pids_limit },
                    "cpu": { "shares": 128 }
                },
                "namespaces": [ {"type": "pid"}, netns, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"} ]
            }
        })
    }

    /// Create a generic sandbox (`runsc create`): sentry and gofer up, the agent not yet
    /// running. Takes ≈ 0.2 s plus the `/tmp` disk and network; the worker does this ahead of
    /// demand.
    pub async fn create(&self, spec: &SlotSpec) -> Result<Sandbox, EngineError> {
        let id = Self::new_id();
        let dir = self.cfg.slots.join(&id);
        for sub in ["task", "opt"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let mut owned = Owned {
            dir: dir.clone(),
            tmp: None,
            net: None,
        };
        let made = async {
            let (d, mb) = (dir.clone(), spec.tmp_mb);
            owned.tmp = Some(
                tokio::task::spawn_blocking(move || TmpDisk::create(&d, mb))
                    .await
                    .map_err(|e| EngineError::Runsc {
                        op: "create",
                        id: id.clone(),
                        detail: e.to_string(),
                    })??,
            );
            if spec.net == NetMode::Egress {
                let Some(network) = &self.network else {
                    return Err(EngineError::Runsc {
                        op: "create",
                        id: id.clone(),
                        detail: "egress requested but the server's network policy is none".into(),
                    });
                };
                let network = network.clone();
                owned.net = Some(
                    tokio::task::spawn_blocking(move || network.create())
                        .await
                        .map_err(|e| EngineError::Runsc {
                            op: "create",
                            id: id.clone(),
                            detail: e.to_string(),
                        })??,
                );
            }
            let bundle = self.cfg.bundles.join(&id);
            std::fs::create_dir_all(&bundle).map_err(io_err(&bundle))?;
            let config = bundle.join("config.json");
            let text =
                serde_json::to_vec_pretty(&self.bundle_config(&id, spec, &dir, owned.net.as_ref()))
                    .unwrap_or_default();
            std::fs::write(&config, text).map_err(io_err(&config))?;
            let mut cmd = self.runsc_sandbox(spec.net);
            cmd.args(["create", "--bundle"]).arg(&bundle).arg(&id);
            let (stdin, stdout, stderr_tail) = self.spawn_with_pipes(cmd, "create", &id).await?;
            if spec.started {
                let mut cmd = self.runsc_async(spec.net);
                cmd.args(["start", &id]);
                run_op(cmd, "start", &id).await?;
            }
            Ok::<_, EngineError>((stdin, stdout, stderr_tail))
        }
        .await;
        // A started sandbox is ready once its agent says Hello (after a prestarted runtime
        // has loaded).
        let made = match made {
            Ok((stdin, mut stdout, tail)) if spec.started => {
                match tokio::time::timeout(
                    HELLO_LIMIT,
                    frames::read_frame::<_, AgentMsg>(&mut stdout),
                )
                .await
                {
                    Ok(Ok(Frame {
                        msg: AgentMsg::Hello { protocol, .. },
                        ..
                    })) if protocol == hearth_proto::PROTOCOL_VERSION => Ok((stdin, stdout, tail)),
                    other => Err(EngineError::Runsc {
                        op: "start",
                        id: id.clone(),
                        detail: match other {
                            Ok(Ok(f)) => format!(
                                "the agent's first frame was {:?}, not a matching Hello",
                                f.msg
                            ),
                            Ok(Err(e)) => {
                                format!("no Hello from the agent: {e}; {}", tail_text(&tail))
                            }
                            Err(_) => format!("no Hello from the agent in {HELLO_LIMIT:?}"),
                        },
                    }),
                }
            }
            other => other,
        };
        match made {
            Ok((stdin, stdout, stderr_tail)) => {
                let reapers = self.reap_threads(&id);
                Ok(Sandbox {
                    id,
                    stdin: Box::new(stdin),
                    stdout: Some(Box::new(stdout)),
                    reapers,
                    stderr_tail,
                    spec: spec.clone(),
                    phase: if spec.started {
                        Phase::Running
                    } else {
                        Phase::Created
                    },
                    created_at: Instant::now(),
                    dir,
                    tmp: owned.tmp.take(),
                    net: owned.net.take(),
                })
            }
            Err(e) => {
                // Reap what `runsc create` left (if it got that far): `delete` waits for it.
                let reapers = reapers(&self.cfg.state_root, &id);
                let _ = self.runsc().args(["delete", "--force", &id]).output();
                join_reapers(reapers, Duration::from_secs(3));
                let _ = std::fs::remove_dir_all(self.cfg.bundles.join(&id));
                self.cgroups.remove_sandbox(&id);
                self.release_owned(owned);
                Err(e)
            }
        }
    }

    /// Run a runsc command that leaves a sandbox behind holding the pipes it was given.
    async fn spawn_with_pipes(
        &self,
        mut cmd: Command,
        op: &'static str,
        id: &str,
    ) -> Result<(ChildStdin, ChildStdout, Arc<Mutex<VecDeque<String>>>), EngineError> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| EngineError::Runsc {
            op,
            id: id.to_string(),
            detail: e.to_string(),
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(EngineError::Runsc {
                op,
                id: id.to_string(),
                detail: "no stdio pipes".into(),
            });
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        spawn_stderr_reader(id.to_string(), stderr, stderr_tail.clone());
        let status = child.wait().await.map_err(|e| EngineError::Runsc {
            op,
            id: id.to_string(),
            detail: e.to_string(),
        })?;
        if !status.success() {
            // Give the stderr reader a moment to collect runsc's message.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(EngineError::Runsc {
                op,
                id: id.to_string(),
                detail: format!("{status}: {}", tail_text(&stderr_tail)),
            });
        }
        Ok((stdin, stdout, stderr_tail))
    }

    /// Give a created sandbox to one function: its code and layers, memory limit and CPU
    /// share, a core.
    fn claim(&self, sandbox: &Sandbox, claim: &Claim) -> Result<Option<usize>, EngineError> {
        link_tree(&claim.code_dir, &sandbox.task_dir())?;
        if let Some(opt) = &claim.opt_dir {
            link_tree(opt, &sandbox.opt_dir())?;
        }
        let mem = (claim.memory_mb as u64 + SENTRY_OVERHEAD_MB) * 1024 * 1024;
        self.cgroups.set_memory_limit(&sandbox.id, mem);
        self.cgroups
            .set_cpu_shares(&sandbox.id, (claim.memory_mb as u64 * 1024 / 1769).max(2));
        Ok((self.cfg.pinning != Pinning::Off)
            .then(|| self.next_core.fetch_add(1, Ordering::Relaxed) % self.cores))
    }

    /// Place a running sandbox on `core` (and, split, its application on the next core).
    fn place(&self, id: &str, core: usize) {
        match self.cfg.pinning {
            Pinning::Off => {}
            Pinning::Split if self.cores > 1 => {
                let placed =
                    affinity::split(&self.cgroups.procs(id), core, (core + 1) % self.cores);
                tracing::debug!("placed {placed} threads of {id} from core {core}");
            }
            Pinning::Core | Pinning::Split => self.cgroups.set_cpus(id, &core.to_string()),
        }
    }

    /// Claim a sandbox for a function and boot its agent (unless it was started at create).
    /// The agent then waits for the function's environment (`Configure`) as its first frame.
    pub async fn start(&self, sandbox: &mut Sandbox, claim: &Claim) -> Result<(), EngineError> {
        let core = self.claim(sandbox, claim)?;
        // One core: the cpuset, before the agent starts.
        if let Some(core) = core
            && self.cfg.pinning == Pinning::Core
        {
            self.place(&sandbox.id, core);
        }
        if sandbox.phase != Phase::Running {
            let mut cmd = self.runsc_async(sandbox.spec.net);
            cmd.args(["start", &sandbox.id]);
            run_op(cmd, "start", &sandbox.id).await?;
            sandbox.phase = Phase::Running;
        }
        // Split: per thread, once its processes run (the application's later ones inherit it).
        if let Some(core) = core
            && self.cfg.pinning == Pinning::Split
        {
            self.place(&sandbox.id, core);
        }
        Ok(())
    }

    /// Claim a created sandbox and restore a checkpoint (`checkpoint.img`, and with
    /// uncompressed checkpoints `pages_meta.img` / `pages.img`, in `image_dir`) into it. The
    /// restored agent resumes where the checkpoint stopped it; it does not say `Hello` again.
    pub async fn restore(
        &self,
        sandbox: &mut Sandbox,
        claim: &Claim,
        image_dir: &Path,
    ) -> Result<(), EngineError> {
        if sandbox.phase == Phase::Running {
            return Err(EngineError::Runsc {
                op: "restore",
                id: sandbox.id.clone(),
                detail: "the sandbox was started already; a restore needs a created one".into(),
            });
        }
        let core = self.claim(sandbox, claim)?;
        let bundle = self.cfg.bundles.join(&sandbox.id);
        let mut cmd = self.runsc_sandbox(sandbox.spec.net);
        cmd.arg("restore")
            .arg(format!("--image-path={}", image_dir.display()))
            .args(["--detach", "--bundle"])
            .arg(&bundle)
            .arg(&sandbox.id);
        if self.caps.control_restore && self.cfg.control_restore {
            // The same restore as `runsc restore`, sent to the sentry without starting runsc.
            let t = Instant::now();
            let (root, id, dir) = (
                self.cfg.state_root.clone(),
                sandbox.id.clone(),
                image_dir.to_path_buf(),
            );
            let loopback_only = sandbox.spec.net == NetMode::None;
            tokio::task::spawn_blocking(move || {
                crate::sentry::restore(&root, &id, &dir, loopback_only).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|detail| EngineError::Runsc {
                op: "restore",
                id: sandbox.id.clone(),
                detail,
            })?;
            tracing::debug!(sandbox = %sandbox.id, ms = t.elapsed().as_secs_f64() * 1000.0, "control-socket restore");
        } else if self.caps.restore_into_created {
            let t = Instant::now();
            run_op(cmd, "restore", &sandbox.id).await?;
            tracing::debug!(sandbox = %sandbox.id, ms = t.elapsed().as_secs_f64() * 1000.0, "runsc restore");
        } else {
            // This runsc restores only into a new container: drop the created one (keeping
            // its directory, disk and network) and restore with new pipes.
            let _ = self
                .runsc()
                .args(["delete", "--force", &sandbox.id])
                .output();
            for r in sandbox.reapers.drain(..) {
                let _ = r.join();
            }
            // The new container's cgroup comes from the bundle: give it the claim's limit.
            let config = bundle.join("config.json");
            if let Ok(bytes) = std::fs::read(&config)
                && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            {
                let mem = (claim.memory_mb as u64 + SENTRY_OVERHEAD_MB) * 1024 * 1024;
                v["linux"]["resources"]["memory"]["limit"] = json!(mem);
                std::fs::write(&config, v.to_string()).map_err(io_err(&config))?;
            }
            let (stdin, stdout, tail) = self.spawn_with_pipes(cmd, "restore", &sandbox.id).await?;
            sandbox.stdin = Box::new(stdin);
            sandbox.stdout = Some(Box::new(stdout));
            sandbox.stderr_tail = tail;
            sandbox.reapers = self.reap_threads(&sandbox.id);
        }
        // Restores read the image with every core; placed once restored.
        if let Some(core) = core {
            self.place(&sandbox.id, core);
        }
        sandbox.phase = Phase::Running;
        Ok(())
    }

    /// Checkpoint a running sandbox into `image_dir`. The sandbox is stopped afterwards (runsc
    /// always stops it); destroy it to reap and clean up.
    pub async fn checkpoint(&self, sandbox: &Sandbox, image_dir: &Path) -> Result<(), EngineError> {
        std::fs::create_dir_all(image_dir).map_err(io_err(image_dir))?;
        let mut cmd = self.runsc_async(sandbox.spec.net);
        cmd.arg("checkpoint")
            .arg(format!("--image-path={}", image_dir.display()))
            .args(self.caps.checkpoint_flags())
            .arg(&sandbox.id);
        run_op(cmd, "checkpoint", &sandbox.id).await
    }

    /// Threads that wait for the sandbox and gofer processes (now children of this subreaper).
    fn reap_threads(&self, id: &str) -> Vec<std::thread::JoinHandle<()>> {
        reap_threads(&self.cfg.state_root, id)
    }

    fn release_owned(&self, owned: Owned) {
        if let Some(t) = &owned.tmp {
            t.remove();
        }
        if let (Some(n), Some(network)) = (&owned.net, &self.network) {
            network.destroy(n);
        }
        let _ = std::fs::remove_dir_all(&owned.dir);
    }

    /// Kill and delete a sandbox, reap its processes, remove its bundle, cgroups, `/tmp` disk
    /// and network. Blocking (tens of milliseconds); call from a blocking context.
    pub fn destroy(&self, sandbox: Sandbox) {
        let Sandbox {
            id,
            stdin,
            stdout,
            reapers,
            dir,
            tmp,
            net,
            ..
        } = sandbox;
        drop(stdin);
        drop(stdout);
        // A frozen sandbox (idle, see the pool) would not answer runsc; thawing one that is not
        // frozen changes nothing.
        self.cgroups.set_frozen(&id, false);
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
        self.release_owned(Owned { dir, tmp, net });
    }

    /// Remove the worker's network rules (at shutdown, after every sandbox is gone).
    pub fn shutdown_network(&self) {
        if let Some(n) = &self.network {
            n.shutdown();
        }
    }
}

/// Run a runsc command to completion; its stderr is the error's detail.
/// Threads that wait for a detached sandbox's sandbox and gofer processes (read from its
/// state file under `state_root`). A child subreaper must reap them: until it does they stay
/// zombies, and `runsc delete` waits for them to be gone.
pub(crate) fn reap_threads(state_root: &Path, id: &str) -> Vec<std::thread::JoinHandle<()>> {
    reapers(state_root, id)
        .into_iter()
        .map(|(_, h)| h)
        .collect()
}

/// Wait for [`reapers`] at most `limit`; a process still there then (one runsc could not stop,
/// e.g. an old runsc after a failed restore) is killed, never waited for forever.
pub(crate) fn join_reapers(reapers: Vec<(i32, std::thread::JoinHandle<()>)>, limit: Duration) {
    let deadline = Instant::now() + limit;
    for (pid, r) in reapers {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !r.is_finished() {
            // SAFETY: kill has no memory effects; `pid` is our unreaped child (its reaper
            // thread has not returned), so it cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = r.join();
    }
}

/// [`reap_threads`] with the pid each thread waits for.
pub(crate) fn reapers(state_root: &Path, id: &str) -> Vec<(i32, std::thread::JoinHandle<()>)> {
    let state = state_root.join(format!("{id}_sandbox:{id}.state"));
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
            let h = std::thread::spawn(move || {
                let mut status = 0;
                // SAFETY: waitpid on a specific pid with a valid pointer to a local int.
                unsafe {
                    libc::waitpid(pid, &mut status, 0);
                }
            });
            (pid, h)
        })
        .collect()
}

async fn run_op(mut cmd: Command, op: &'static str, id: &str) -> Result<(), EngineError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| EngineError::Runsc {
            op,
            id: id.to_string(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(EngineError::Runsc {
            op,
            id: id.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// What a sandbox owns on the host besides runsc's state.
struct Owned {
    dir: PathBuf,
    tmp: Option<TmpDisk>,
    net: Option<SandboxNet>,
}

/// Hard-link every file of `src` into `dst` (directories made, symbolic links recreated),
/// copying where the two are on different file systems. The sandbox sees `dst` read-only.
pub fn link_tree(src: &Path, dst: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    let entries = std::fs::read_dir(src).map_err(io_err(src))?;
    for e in entries {
        let e = e.map_err(io_err(src))?;
        let from = e.path();
        let to = dst.join(e.file_name());
        let ty = e.file_type().map_err(io_err(&from))?;
        if ty.is_dir() {
            link_tree(&from, &to)?;
        } else if ty.is_symlink() {
            let target = std::fs::read_link(&from).map_err(io_err(&from))?;
            std::os::unix::fs::symlink(target, &to).map_err(io_err(&to))?;
        } else if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
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
