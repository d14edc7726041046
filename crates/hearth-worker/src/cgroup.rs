//! Cgroups of sandboxes: nested under the worker's own cgroup, read for memory figures.
//!
//! runsc places a sandbox in `cgroupsPath`; a relative path is resolved against the cgroup of
//! the runsc process, which is the worker's own. hearth gives every sandbox
//! `hearth/<worker instance>/<sandbox id>`, so all sandboxes of one worker sit under one parent per hierarchy
//! and a restarted worker finds (and removes) what an earlier run left there.
//!
//! Both cgroup v1 (one hierarchy per controller, as on this machine) and v2 are handled. On v1
//! the `cpuset` parent must carry `cpus` and `mems` before runsc can create a child in it (the
//! kernel starts a new cpuset empty), so [`Cgroups::prepare`] copies them from above.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;

/// Name of the directory all hearth cgroups live under; each worker has its own directory
/// below it (several workers, e.g. parallel tests, share a machine without seeing each other).
pub const PARENT: &str = "hearth";

/// Where workers' liveness locks are: `<dir>/<instance>`, locked (`flock`) for as long as the
/// worker runs. A lock dies with its process, so a worker killed before it could remove its
/// cgroup directories leaves a free lock (or none), and the next worker to start on the
/// machine removes them ([`Cgroups::remove_dead_workers`]).
pub const WORKER_LOCK_DIR: &str = "/run/hearth/workers";

/// A worker's liveness lock, held until dropped (then its file is unlinked, still locked).
#[derive(Debug)]
pub struct InstanceLock {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl InstanceLock {
    /// Whether this worker holds its lock (not when another holder in this process or another
    /// has it: then that holder keeps the directories alive anyway).
    pub fn held(&self) -> bool {
        self.lock.is_some()
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            crate::netns::release(&self.path, lock);
        }
    }
}

/// Where this process's cgroups are.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// (controller list as in /proc/self/cgroup, absolute directory of our own cgroup).
    own: Vec<(String, PathBuf)>,
    unified: bool,
    /// `hearth/<worker instance>`, relative to our own cgroup.
    parent: String,
    /// The worker instance's name.
    instance: String,
}

/// Remove the directories in `dir` the kernel lets go (cgroups without processes or children).
/// Returns how many went.
fn remove_empty_children(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir() && fs::remove_dir(e.path()).is_ok())
        .count()
}

impl Cgroups {
    /// Discover the cgroups of the current process; `instance` names this worker's directory.
    pub fn discover(instance: &str) -> Self {
        let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut own = Vec::new();
        let mut unified_only = true;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if ctrls.is_empty() {
                let dir = Path::new("/sys/fs/cgroup").join(rel);
                let unified_dir = Path::new("/sys/fs/cgroup/unified").join(rel);
                let d = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                    dir
                } else {
                    unified_dir
                };
                own.push((String::new(), d));
            } else {
                unified_only = false;
                let mount = ctrls.strip_prefix("name=").unwrap_or(ctrls);
                own.push((
                    ctrls.to_string(),
                    Path::new("/sys/fs/cgroup").join(mount).join(rel),
                ));
            }
        }
        Cgroups {
            own,
            unified: unified_only,
            parent: format!("{PARENT}/{instance}"),
            instance: instance.to_string(),
        }
    }

    /// The `hearth` directory in each of this process's hierarchies (every worker's directory
    /// is below it).
    pub fn roots(&self) -> Vec<PathBuf> {
        self.own.iter().map(|(_, d)| d.join(PARENT)).collect()
    }

    /// Take this worker's liveness lock under `lock_dir` (normally [`WORKER_LOCK_DIR`]), before
    /// any of its directories exist. A worker sweeping a dead run of this instance holds the
    /// lock for a moment: wait up to a second; after that another live holder has it.
    pub fn lock_instance(&self, lock_dir: &Path) -> InstanceLock {
        let path = lock_dir.join(&self.instance);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut lock = None;
        if fs::create_dir_all(lock_dir).is_ok() {
            loop {
                match crate::netns::try_lock(&path, true) {
                    Ok(Some(l)) => {
                        lock = Some(l);
                        break;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(25));
                    }
                    _ => break,
                }
            }
        }
        if lock.is_none() {
            tracing::warn!(lock = %path.display(), "another process holds this worker's liveness lock");
        }
        InstanceLock { path, lock }
    }

    /// Remove what workers that are gone left: for every other worker directory under the
    /// `hearth` directories whose liveness lock (under `lock_dir`) is free or missing, its
    /// sandbox directories and itself. The kernel refuses to remove a cgroup that still has
    /// processes, so a sandbox still running is never touched. Returns the directories removed.
    pub fn remove_dead_workers(&self, lock_dir: &Path) -> usize {
        let mut names = std::collections::BTreeSet::new();
        for root in self.roots() {
            if let Ok(entries) = fs::read_dir(&root) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name != self.instance && e.path().is_dir() {
                        names.insert(name);
                    }
                }
            }
        }
        let mut removed = 0;
        for name in names {
            let path = lock_dir.join(&name);
            // Held by a live worker: keep. Free: ours now, until its directories are gone.
            let lock = match crate::netns::try_lock(&path, false) {
                Ok(Some(lock)) => Some(lock),
                Ok(None) if path.exists() => continue,
                Ok(None) => None,
                Err(_) => continue,
            };
            for root in self.roots() {
                let dir = root.join(&name);
                removed += remove_empty_children(&dir);
                if fs::remove_dir(&dir).is_ok() {
                    removed += 1;
                }
            }
            if let Some(lock) = lock {
                crate::netns::release(&path, lock);
            }
        }
        removed
    }

    fn controller_dir(&self, controller: &str) -> Option<&Path> {
        if self.unified {
            return self
                .own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_path());
        }
        self.own
            .iter()
            .find(|(c, _)| c.split(',').any(|x| x == controller))
            .map(|(_, p)| p.as_path())
    }

    /// The relative `cgroupsPath` for a sandbox.
    pub fn sandbox_path(&self, id: &str) -> String {
        format!("{}/{id}", self.parent)
    }

    /// Make the parent usable (v1 cpuset needs cpus and mems).
    pub fn prepare(&self) {
        if self.unified {
            return;
        }
        if let Some(dir) = self.controller_dir("cpuset") {
            let mut above = dir.to_path_buf();
            for part in self.parent.split('/') {
                let here = above.join(part);
                let _ = fs::create_dir_all(&here);
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let current = fs::read_to_string(here.join(f)).unwrap_or_default();
                    if current.trim().is_empty()
                        && let Ok(v) = fs::read_to_string(above.join(f))
                    {
                        let _ = fs::write(here.join(f), v.trim());
                    }
                }
                above = here;
            }
        }
    }

    /// Remove this worker's (empty) directory under the hearth parent, at shutdown.
    pub fn remove_parent(&self) {
        for (_, dir) in &self.own {
            let _ = fs::remove_dir(dir.join(&self.parent));
        }
    }

    /// Remove empty sandbox cgroups left under the parent (after their sandboxes are gone).
    /// Returns how many directories were removed.
    pub fn remove_stale(&self) -> usize {
        self.own
            .iter()
            .map(|(_, dir)| remove_empty_children(&dir.join(&self.parent)))
            .sum()
    }

    /// Remove one sandbox's cgroup directories (runsc normally does; this is the safety net).
    pub fn remove_sandbox(&self, id: &str) {
        for (_, dir) in &self.own {
            let _ = fs::remove_dir(dir.join(&self.parent).join(id));
        }
    }

    /// Sandbox cgroup directories that exist now (used by tests and leak checks).
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (_, dir) in &self.own {
            if let Ok(entries) = fs::read_dir(dir.join(&self.parent)) {
                out.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        out
    }

    /// The host processes of a sandbox now (sentry, gofer, stubs).
    pub fn procs(&self, id: &str) -> Vec<i32> {
        let Some(dir) = self
            .controller_dir("cpuset")
            .or(self.controller_dir("memory"))
        else {
            return Vec::new();
        };
        fs::read_to_string(dir.join(&self.parent).join(id).join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Restrict a running sandbox to `cpus` (e.g. `"1"`): pins it after a restore.
    pub fn set_cpus(&self, id: &str, cpus: &str) {
        if let Some(dir) = self.controller_dir("cpuset") {
            let file = dir.join(&self.parent).join(id).join("cpuset.cpus");
            if let Err(e) = fs::write(&file, cpus) {
                tracing::debug!("pinning {id}: {}: {e}", file.display());
            }
        }
    }

    /// Set a sandbox's memory limit (a claim raises the create-time limit to the function's).
    pub fn set_memory_limit(&self, id: &str, bytes: u64) {
        if let Some(dir) = self.controller_dir("memory") {
            let file = if self.unified {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            let path = dir.join(&self.parent).join(id).join(file);
            if let Err(e) = fs::write(&path, bytes.to_string()) {
                tracing::warn!("memory limit of {id}: {}: {e}", path.display());
            }
        }
    }

    /// Set a sandbox's CPU share (v1 `cpu.shares`; v2 `cpu.weight` scaled from it).
    pub fn set_cpu_shares(&self, id: &str, shares: u64) {
        if let Some(dir) = self.controller_dir("cpu") {
            let (file, value) = if self.unified {
                (
                    "cpu.weight",
                    (1 + (shares.saturating_sub(2)) * 9999 / 262_142).to_string(),
                )
            } else {
                ("cpu.shares", shares.to_string())
            };
            let path = dir.join(&self.parent).join(id).join(file);
            if let Err(e) = fs::write(&path, value) {
                tracing::debug!("cpu share of {id}: {}: {e}", path.display());
            }
        }
    }

    /// Memory a sandbox holds now, without the host's page cache of files it wrote (its `/tmp`
    /// disk): anonymous and shared memory (gVisor keeps the application's memory in a memfd).
    /// The kernel charges the cache of `/tmp` writes to the cgroup too, and reclaims it under
    /// pressure; it is not the function's memory, so cgroup peaks (`memory.max_usage_in_bytes`,
    /// `memory.peak`) overstate it. The worker samples this during invocations instead.
    pub fn resident(&self, id: &str) -> Option<u64> {
        let dir = self.controller_dir("memory")?.join(&self.parent).join(id);
        let stat = fs::read_to_string(dir.join("memory.stat")).ok()?;
        let names: &[&str] = if self.unified {
            &["anon", "shmem"]
        } else {
            &["total_rss", "total_shmem"]
        };
        Some(
            names
                .iter()
                .map(|n| {
                    stat.lines()
                        .find_map(|l| l.strip_prefix(n).and_then(|v| v.strip_prefix(' ')))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                })
                .sum(),
        )
    }

    /// Freeze (`true`) or thaw (`false`) every process of a sandbox (cgroup v1's freezer, v2's
    /// `cgroup.freeze`): a frozen sandbox uses no CPU (systrap's threads otherwise spin a little
    /// even when the sandbox is idle) until it is thawed, which takes well under a millisecond.
    /// Returns whether the kernel took the request.
    pub fn set_frozen(&self, id: &str, frozen: bool) -> bool {
        let (controller, file, value) = if self.unified {
            ("", "cgroup.freeze", if frozen { "1" } else { "0" })
        } else {
            (
                "freezer",
                "freezer.state",
                if frozen { "FROZEN" } else { "THAWED" },
            )
        };
        let Some(dir) = self.controller_dir(controller) else {
            return false;
        };
        let path = dir.join(&self.parent).join(id).join(file);
        match fs::write(&path, value) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("{}: {e}", path.display());
                false
            }
        }
    }

    /// Whether a sandbox is frozen (or freezing); `None` when that cannot be read.
    pub fn is_frozen(&self, id: &str) -> Option<bool> {
        let (controller, file) = if self.unified {
            ("", "cgroup.freeze")
        } else {
            ("freezer", "freezer.state")
        };
        let dir = self.controller_dir(controller)?.join(&self.parent).join(id);
        let text = fs::read_to_string(dir.join(file)).ok()?;
        Some(matches!(text.trim(), "1" | "FROZEN" | "FREEZING"))
    }

    /// CPU time all of this worker's sandboxes have used, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        if self.unified {
            let dir = self.controller_dir("")?.join(&self.parent);
            let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse::<u64>()
                .ok()?;
            return Some(usec.saturating_mul(1000));
        }
        let dir = self.controller_dir("cpuacct")?.join(&self.parent);
        fs::read_to_string(dir.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The sandbox's memory limit in bytes.
    pub fn memory_limit(&self, id: &str) -> Option<u64> {
        let dir = self.controller_dir("memory")?.join(&self.parent).join(id);
        let file = if self.unified {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }

    /// Whether a sandbox whose resident memory peaked at `peak` bytes ran out of memory:
    /// OOM-killed, or within 10 % of its limit (inside gVisor an allocation past the limit can
    /// fail instead of being killed). Reclaim of `/tmp` page cache alone does not count.
    pub fn out_of_memory(&self, id: &str, peak: u64) -> bool {
        self.oom_killed(id) || self.memory_limit(id).is_some_and(|l| peak >= l / 10 * 9)
    }

    /// Whether the kernel OOM-killed something in the sandbox's cgroup.
    pub fn oom_killed(&self, id: &str) -> bool {
        let Some(dir) = self.controller_dir("memory") else {
            return false;
        };
        let dir = dir.join(&self.parent).join(id);
        let file = if self.unified {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
        let count = |key: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(key)
                        .map(|v| v.trim().parse::<u64>().unwrap_or(0))
                })
                .unwrap_or(0)
        };
        count("oom_kill ") > 0 || (self.unified && count("oom ") > 0)
    }
}
