//! What the installed runsc can do, found by trying it.
//!
//! hearth does not compare version strings: at start it runs small sandboxes (the static agent
//! in an otherwise empty root) and reads runsc's own flag list, and uses the best of what works:
//!
//! - **platform**: `systrap` (cheap syscalls; runsc's default since 2023) if a sandbox runs on
//!   it, else `ptrace`. Neither working means runsc is unusable here: hearth refuses to start.
//! - **uncompressed checkpoints** (`checkpoint --compression=none`, page files restored with
//!   parallel reads) and `--exclude-committed-zero-pages`: from `runsc checkpoint --help`.
//! - **restore into a created container**: a sandbox is checkpointed, a second one created,
//!   and the image restored into it. Pre-created sandboxes then serve snapshot restores too.
//! - **netstack** (`--network=sandbox`): a sandbox with gVisor's own network stack is started
//!   inside a fresh network namespace (broken on 6.x kernels with runsc builds before
//!   2024-08; see `shared/research/gvisor.md`).
//!
//! Probing takes about a second, so the result is cached per runsc binary (by its SHA-256) in
//! a small JSON file; a different runsc binary is probed again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

/// Bumped when the probe itself changes, so cached results from an older probe are redone.
const PROBE_FORMAT: u32 = 4;

/// Capabilities of one runsc binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    pub format: u32,
    /// `runsc --version`, first line.
    pub version: String,
    /// The platform sandboxes run on (`systrap` or `ptrace`).
    pub platform: String,
    /// `checkpoint --compression=none` is accepted.
    pub uncompressed: bool,
    /// `checkpoint --exclude-committed-zero-pages` is accepted.
    pub zero_pages: bool,
    /// A checkpoint restores into a container made with `runsc create`.
    pub restore_into_created: bool,
    /// A restore into a created container works through the sentry's control socket
    /// (`sentry.rs`), without executing `runsc restore`.
    #[serde(default)]
    pub control_restore: bool,
    /// `--network=sandbox` (gVisor's netstack) works here.
    pub netstack: bool,
    /// The sentry opens the container's files itself (`--directfs`, on by default where
    /// runsc has it): the gofer then only serves the mounts' setup and restores.
    #[serde(default)]
    pub directfs: bool,
    /// Why a feature was found missing (what runsc said).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Caps {
    /// The flags a checkpoint is taken with, as recorded with the snapshot: a snapshot taken
    /// with other flags (or another runsc) is never restored.
    pub fn engine_id(&self) -> String {
        format!(
            "{} platform={} compression={}",
            self.version,
            self.platform,
            if self.uncompressed { "none" } else { "flate" }
        )
    }

    /// The extra `runsc checkpoint` flags these capabilities allow.
    pub fn checkpoint_flags(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.uncompressed {
            f.push("--compression=none".to_string());
        }
        if self.zero_pages {
            f.push("--exclude-committed-zero-pages".to_string());
        }
        f
    }
}

/// Why runsc cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("runsc at {0} does not run: {1}")]
    NotRunnable(PathBuf, String),
    #[error("runsc cannot start a sandbox on this machine (tried systrap and ptrace): {0}")]
    NoPlatform(String),
    #[error("probe i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Probe `runsc` (cached in `cache_dir`, keyed by the binary's digest). `work` is a scratch
/// directory the probe may fill and empties again.
pub fn probe(
    runsc: &Path,
    agent: &Path,
    work: &Path,
    cache_dir: &Path,
) -> Result<Caps, ProbeError> {
    let digest = crate::engine::file_digest(runsc);
    let cache = cache_dir.join(format!("runsc-{}.json", &digest[..digest.len().min(16)]));
    if let Ok(bytes) = std::fs::read(&cache)
        && let Ok(caps) = serde_json::from_slice::<Caps>(&bytes)
        && caps.format == PROBE_FORMAT
    {
        return Ok(caps);
    }
    let caps = probe_uncached(runsc, agent, work)?;
    if std::fs::create_dir_all(cache_dir).is_ok() {
        let tmp = cache.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&caps).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &cache);
        }
    }
    Ok(caps)
}

fn probe_uncached(runsc: &Path, agent: &Path, work: &Path) -> Result<Caps, ProbeError> {
    let version = crate::engine::runsc_version(runsc);
    if version.is_empty() {
        return Err(ProbeError::NotRunnable(
            runsc.to_path_buf(),
            "`runsc --version` printed nothing".into(),
        ));
    }
    let _ = std::fs::remove_dir_all(work);
    let p = Probe::new(runsc, agent, work)?;
    let result = (|| {
        let mut failures = Vec::new();
        let mut platform = None;
        for candidate in ["systrap", "ptrace"] {
            match p.run_once(candidate, "none", None) {
                Ok(()) => {
                    platform = Some(candidate.to_string());
                    break;
                }
                Err(e) => failures.push(format!("{candidate}: {e}")),
            }
        }
        let Some(platform) = platform else {
            return Err(ProbeError::NoPlatform(failures.join("; ")));
        };
        let directfs = directfs_default(&runsc_output(runsc, &["flags"]));
        let help = runsc_output(runsc, &["checkpoint", "--help"]);
        let uncompressed = help.contains("-compression");
        let zero_pages = help.contains("exclude-committed-zero-pages");
        let mut notes = Vec::new();
        let netstack = match p.netstack(&platform) {
            Ok(()) => true,
            Err(e) => {
                notes.push(format!("netstack: {e}"));
                false
            }
        };
        let control_restore = match p.try_restore_into_created(&platform, uncompressed, true) {
            Ok(()) => true,
            Err(e) => {
                notes.push(format!("restore through the control socket: {e}"));
                false
            }
        };
        let restore_into_created = control_restore
            || match p.try_restore_into_created(&platform, uncompressed, false) {
                Ok(()) => true,
                Err(e) => {
                    notes.push(format!("restore into a created container: {e}"));
                    false
                }
            };
        Ok(Caps {
            format: PROBE_FORMAT,
            version,
            platform,
            uncompressed,
            zero_pages,
            restore_into_created,
            control_restore,
            netstack,
            directfs,
            notes,
        })
    })();
    p.cleanup();
    result
}

/// Whether `runsc flags` lists `-directfs` with a default of true (hearth never sets it).
fn directfs_default(flags: &str) -> bool {
    let mut lines = flags.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "-directfs" {
            return lines.next().is_some_and(|d| d.contains("(default true)"));
        }
    }
    false
}

/// What `runsc ARGS` printed (stdout, then stderr); empty if it did not run.
fn runsc_output(runsc: &Path, args: &[&str]) -> String {
    Command::new(runsc)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

struct Probe {
    runsc: PathBuf,
    agent: PathBuf,
    work: PathBuf,
    root: PathBuf,
    n: std::cell::Cell<u32>,
}

impl Probe {
    fn new(runsc: &Path, agent: &Path, work: &Path) -> Result<Self, ProbeError> {
        let root = work.join("rootfs");
        for d in ["hearth", "proc", "dev", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|source| ProbeError::Io { path: p, source })?;
        }
        let a = root.join("hearth/agent");
        std::fs::write(&a, b"").map_err(|source| ProbeError::Io { path: a, source })?;
        Ok(Probe {
            runsc: runsc.to_path_buf(),
            agent: std::path::absolute(agent).unwrap_or_else(|_| agent.to_path_buf()),
            work: work.to_path_buf(),
            root,
            n: std::cell::Cell::new(0),
        })
    }

    fn state(&self) -> PathBuf {
        self.work.join("state")
    }

    fn cmd(&self, platform: &str, network: &str) -> Command {
        let mut c = Command::new(&self.runsc);
        c.arg(format!("--root={}", self.state().display()))
            .arg(format!("--platform={platform}"))
            .arg(format!("--network={network}"));
        c
    }

    /// A bundle running the agent (which, with no runtime to start and stdin at EOF, says
    /// hello and exits 0).
    fn bundle(&self, netns: Option<&Path>) -> Result<(String, PathBuf), ProbeError> {
        let n = self.n.get() + 1;
        self.n.set(n);
        let id = format!("hp{:06}{:08x}", n, rand::random::<u32>());
        let dir = self.work.join(&id);
        std::fs::create_dir_all(&dir).map_err(|source| ProbeError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut net = json!({"type": "network"});
        if let Some(p) = netns {
            net["path"] = json!(p);
        }
        let config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["/hearth/agent"],
                "env": ["PATH=/bin", "LAMBDA_TASK_ROOT=/tmp", "LAMBDA_RUNTIME_DIR=/tmp"],
                "cwd": "/",
                "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []}
            },
            "root": {"path": self.root, "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/hearth/agent", "type": "bind", "source": self.agent, "options": ["bind", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, net, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
            }
        });
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string())
            .map_err(|source| ProbeError::Io { path, source })?;
        Ok((id, dir))
    }

    /// Run the agent to completion in the foreground.
    fn run_once(&self, platform: &str, network: &str, netns: Option<&Path>) -> Result<(), String> {
        let (id, dir) = self.bundle(netns).map_err(|e| e.to_string())?;
        let child = self
            .cmd(platform, network)
            .args(["run", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = wait_bounded(child, Duration::from_secs(20));
        let _ = self
            .cmd(platform, "none")
            .args(["delete", "--force", &id])
            .output();
        let (ok, stdout, stderr) = out?;
        // The agent's first frame starts with the frame magic; an empty stdout means the
        // sandbox never ran it.
        if ok && !stdout.is_empty() {
            Ok(())
        } else {
            Err(last_line(&stderr))
        }
    }

    fn netstack(&self, platform: &str) -> Result<(), String> {
        let name = format!("hprobe{:08x}", rand::random::<u32>());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err("`ip netns add` failed (is iproute2 installed?)".into());
        }
        let path = PathBuf::from("/var/run/netns").join(&name);
        let works = self.run_once(platform, "sandbox", Some(&path));
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        works
    }

    fn try_restore_into_created(
        &self,
        platform: &str,
        uncompressed: bool,
        via_control: bool,
    ) -> Result<(), String> {
        let (a, adir) = self.bundle(None).map_err(|e| e.to_string())?;
        let (b, bdir) = self.bundle(None).map_err(|e| e.to_string())?;
        let image = self
            .work
            .join(if via_control { "image-ctl" } else { "image" });
        // This process may be a child subreaper (an engine made earlier in it): detached
        // sandboxes are then its children and must be reaped, or `runsc delete` waits forever.
        let mut reapers = Vec::new();
        let result = (|| {
            // The agent waits on its stdin (a pipe held open here) until checkpointed.
            let mut first = self
                .cmd(platform, "none")
                .args(["run", "--detach", "--bundle"])
                .arg(&adir)
                .arg(&a)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            let held = first.stdin.take();
            let status = first.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("run: {status}"));
            }
            reapers.extend(crate::engine::reapers(&self.state(), &a));
            // Wait for the agent's hello, so the checkpoint sees a running agent; its stdout
            // stays open until the checkpoint is done (a closed pipe would end the agent).
            let mut first_out = first.stdout.take();
            if let Some(out) = first_out.as_mut() {
                let mut byte = [0u8; 1];
                let _ = out.read(&mut byte);
            }
            let mut ck = self.cmd(platform, "none");
            ck.arg("checkpoint")
                .arg(format!("--image-path={}", image.display()));
            if uncompressed {
                ck.arg("--compression=none");
            }
            let out = ck
                .arg(&a)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            drop(held);
            drop(first_out);
            if !out.status.success() {
                return Err(format!("checkpoint: {}", last_line(&out.stderr)));
            }
            let mut created = self
                .cmd(platform, "none")
                .args(["create", "--bundle"])
                .arg(&bdir)
                .arg(&b)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            let held_b = created.stdin.take();
            let status = created.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("create: {status}"));
            }
            reapers.extend(crate::engine::reapers(&self.state(), &b));
            if via_control {
                crate::sentry::restore(&self.state(), &b, &image, true)
                    .map_err(|e| e.to_string())?;
                // runsc must agree that the container now runs (the restored agent lives
                // while its stdin is held open).
                let out = self
                    .cmd(platform, "none")
                    .args(["state", &b])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| e.to_string())?;
                drop(held_b);
                let state: serde_json::Value =
                    serde_json::from_slice(&out.stdout).map_err(|e| format!("state: {e}"))?;
                return match state["status"].as_str() {
                    Some("running") => Ok(()),
                    other => Err(format!("restored container is {other:?}, not running")),
                };
            }
            let out = self
                .cmd(platform, "none")
                .arg("restore")
                .arg(format!("--image-path={}", image.display()))
                .args(["--detach", "--bundle"])
                .arg(&bdir)
                .arg(&b)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            drop(held_b);
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("restore: {}", last_line(&out.stderr)))
            }
        })();
        for id in [&a, &b] {
            let _ = self
                .cmd(platform, "none")
                .args(["kill", id, "KILL"])
                .output();
            let _ = self
                .cmd(platform, "none")
                .args(["delete", "--force", id])
                .output();
        }
        crate::engine::join_reapers(reapers, Duration::from_secs(3));
        result
    }

    fn cleanup(&self) {
        if let Ok(out) = self.cmd("ptrace", "none").args(["list", "-quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self
                    .cmd("ptrace", "none")
                    .args(["delete", "--force", id.trim()])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Wait for a child at most `limit` (killing it after), returning (success, stdout, stderr).
fn wait_bounded(
    mut child: std::process::Child,
    limit: Duration,
) -> Result<(bool, Vec<u8>, Vec<u8>), String> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(1 << 20).read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(1 << 20).read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", limit.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    Ok((status.success(), out, err))
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(uncompressed: bool, zero: bool) -> Caps {
        Caps {
            format: PROBE_FORMAT,
            version: "runsc version 0.0~20240729.0".into(),
            platform: "systrap".into(),
            uncompressed,
            zero_pages: zero,
            restore_into_created: true,
            control_restore: true,
            netstack: false,
            directfs: true,
            notes: vec![],
        }
    }

    #[test]
    fn directfs_is_read_from_runsc_flags() {
        let newer = "  -dcache int\n    \tSet the global dentry cache size. (default -1)\n  -directfs\n    \tdirectly access the container filesystems from the sentry. Sentry runs with higher privileges. (default true)\n  -file-access value\n";
        assert!(directfs_default(newer));
        assert!(!directfs_default(&newer.replace("(default true)", "")));
        // An older runsc without the flag.
        assert!(!directfs_default("  -dcache int\n  -file-access value\n"));
    }

    #[test]
    fn checkpoint_flags_follow_capabilities() {
        assert!(caps(false, false).checkpoint_flags().is_empty());
        assert_eq!(
            caps(true, true).checkpoint_flags(),
            vec![
                "--compression=none".to_string(),
                "--exclude-committed-zero-pages".to_string()
            ]
        );
    }

    #[test]
    fn engine_id_changes_with_platform_and_compression() {
        let a = caps(true, true);
        let mut b = a.clone();
        b.platform = "ptrace".into();
        let c = caps(false, false);
        assert_ne!(a.engine_id(), b.engine_id());
        assert_ne!(a.engine_id(), c.engine_id());
        // Zero-page exclusion does not change the image format a restore reads.
        assert_eq!(caps(true, false).engine_id(), a.engine_id());
    }
}
