//! The runtime process: finding and starting `bootstrap`, signalling it, and reaping children.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A started runtime: its pid (also its process group) and the read ends of its output pipes.
pub struct Runtime {
    pub pid: i32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The bootstrap candidates, in Lambda's order.
pub fn candidates(task_root: &Path, runtime_dir: &Path) -> [PathBuf; 3] {
    [
        task_root.join("bootstrap"),
        PathBuf::from("/opt/bootstrap"),
        runtime_dir.join("bootstrap"),
    ]
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The bootstrap [`spawn`] would start.
pub fn chosen(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| is_executable(p)).cloned()
}

/// Start the first executable bootstrap. The runtime gets `env`, runs in `cwd` in a process
/// group of its own, reads /dev/null and writes to two pipes. The error is a message for an
/// `Runtime.InvalidEntrypoint` init error.
pub fn spawn(
    candidates: &[PathBuf],
    cwd: &Path,
    env: Vec<(OsString, OsString)>,
) -> Result<Runtime, String> {
    let Some(path) = candidates.iter().find(|p| is_executable(p)) else {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(format!(
            "Couldn't find valid bootstrap(s): [{}]",
            list.join(" ")
        ));
    };
    // Absolute, so a relative task root is not resolved a second time against `cwd`.
    let program = std::path::absolute(path).unwrap_or_else(|_| path.clone());
    let mut child = Command::new(&program)
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("fork/exec {}: {e}", program.display()))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("runtime pipes missing".into());
    };
    // `child` is dropped without waiting: the reaper owns reaping.
    Ok(Runtime {
        pid: child.id() as i32,
        stdout: stdout.into(),
        stderr: stderr.into(),
    })
}

/// A runtime started before its function is known (`<runtime dir>/prestart`): it loads what
/// it can, says so on fd 4 (`r`), waits for a function's environment on fd 3, then answers on
/// fd 4 whether it takes it (`y`) or not (`n` and why) and exits.
pub struct Prestart {
    runtime: Runtime,
    config: std::fs::File,
    answer: std::fs::File,
}

/// Start `path` as a prestarted runtime, if it is an executable file. `env` is what it starts
/// with (the agent's own platform variables); it runs in `/` until configured.
pub fn prestart(path: &Path, env: Vec<(OsString, OsString)>) -> Option<Result<Prestart, String>> {
    if !is_executable(path) {
        return None;
    }
    Some(start_prestart(path, env))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn start_prestart(path: &Path, env: Vec<(OsString, OsString)>) -> Result<Prestart, String> {
    use std::os::fd::AsRawFd;
    let (config_read, config_write) = pipe()?;
    let (answer_read, answer_write) = pipe()?;
    let (cr, aw) = (config_read.as_raw_fd(), answer_write.as_raw_fd());
    let mut cmd = Command::new(path);
    cmd.current_dir("/")
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The two ends
    // are first moved above 9 so that placing one at 3 cannot overwrite the other.
    unsafe {
        cmd.pre_exec(move || {
            let high_c = libc::fcntl(cr, libc::F_DUPFD, 10);
            let high_a = libc::fcntl(aw, libc::F_DUPFD, 10);
            if high_c < 0 || high_a < 0 || libc::dup2(high_c, 3) < 0 || libc::dup2(high_a, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(high_c);
            libc::close(high_a);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("fork/exec {}: {e}", path.display()))?;
    drop((config_read, answer_write));
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("prestart pipes missing".into());
    };
    Ok(Prestart {
        runtime: Runtime {
            pid: child.id() as i32,
            stdout: stdout.into(),
            stderr: stderr.into(),
        },
        config: config_write.into(),
        answer: answer_read.into(),
    })
}

impl Prestart {
    /// Wait until it says it has loaded (`r` on fd 4), exits, or `limit` passes.
    pub fn wait_loaded(&self, limit: std::time::Duration) {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.answer.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes one pollfd we own.
            let n =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return; // timed out: hand over later all the same
            }
            let mut byte = [0u8; 1];
            // SAFETY: reads at most one byte into a live buffer from a descriptor we own.
            let got = unsafe { libc::read(pfd.fd, byte.as_mut_ptr().cast(), 1) };
            if got != 1 || byte[0] == b'r' {
                return; // loaded, or gone (hand_over finds out)
            }
        }
    }

    /// Give it the function's environment. `Ok` with the runtime if it took it; `Err` if it
    /// declined or died (it is killed and reaped, its output dropped).
    pub fn hand_over(mut self, env: &[(OsString, OsString)]) -> Result<Runtime, String> {
        use std::io::{Read, Write};
        let mut bytes = Vec::new();
        for (k, v) in env {
            bytes.extend_from_slice(k.as_encoded_bytes());
            bytes.push(b'=');
            bytes.extend_from_slice(v.as_encoded_bytes());
            bytes.push(0);
        }
        let sent = self.config.write_all(&bytes);
        drop(self.config);
        // "y", or "n" and a reason up to end of file; nothing if it died.
        let mut first = [0u8; 1];
        let got = sent.is_ok() && matches!(self.answer.read(&mut first), Ok(1));
        if got && first[0] == b'y' {
            return Ok(self.runtime);
        }
        let mut why = Vec::new();
        if got && first[0] == b'n' {
            let _ = (&mut self.answer).take(512).read_to_end(&mut why);
        }
        discard(self.runtime.pid);
        Err(if got {
            format!(
                "the prestarted runtime declined the configuration: {}",
                String::from_utf8_lossy(&why)
            )
        } else {
            "the prestarted runtime had exited".into()
        })
    }

    /// Stop it unused.
    pub fn discard(self) {
        discard(self.runtime.pid);
    }
}

fn discard(pid: i32) {
    signal_group(pid, libc::SIGKILL);
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`; `pid` is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Send `sig` to the runtime's process group (it and whatever it started).
pub fn signal_group(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; a stale group only yields ESRCH.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Reap every child, forever (as PID 1 the agent inherits orphans). Calls `on_exit` with the
/// runtime's status string when `runtime_pid` exits. Returns once no children are left.
pub fn reap(runtime_pid: i32, on_exit: impl FnOnce(String)) {
    let mut on_exit = Some(on_exit);
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return; // ECHILD: nothing left to reap
        }
        if let Some(f) = on_exit.take_if(|_| pid == runtime_pid) {
            f(describe_status(status));
        }
    }
}

/// A wait status as Go's `os.ProcessState` prints it: `exit status 1`, `signal: killed`.
pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        return format!("exit status {}", libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let core = if libc::WCOREDUMP(status) {
            " (core dumped)"
        } else {
            ""
        };
        return format!("signal: {}{core}", signal_name(sig));
    }
    format!("wait status {status:#x}")
}

fn signal_name(sig: libc::c_int) -> String {
    let name = match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGSYS => "bad system call",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_status_strings() {
        assert_eq!(describe_status(0), "exit status 0");
        assert_eq!(describe_status(3 << 8), "exit status 3");
        assert_eq!(describe_status(libc::SIGKILL), "signal: killed");
        assert_eq!(describe_status(libc::SIGTERM), "signal: terminated");
        assert_eq!(
            describe_status(libc::SIGSEGV | 0x80),
            "signal: segmentation fault (core dumped)"
        );
        assert_eq!(describe_status(40), "signal: signal 40");
    }

    #[test]
    fn missing_bootstrap_lists_candidates() {
        let c = candidates(Path::new("/nonexistent/task"), Path::new("/nonexistent/rt"));
        let err = spawn(&c[..1], Path::new("/"), vec![])
            .err()
            .expect("no bootstrap");
        assert_eq!(
            err,
            "Couldn't find valid bootstrap(s): [/nonexistent/task/bootstrap]"
        );
    }
}
