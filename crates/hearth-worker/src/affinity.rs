//! Where a sandbox's threads run.
//!
//! A gVisor sandbox under systrap is two kinds of host process: the sentry (with its gofer),
//! which runs the guest kernel, and stub processes, which run the application and hand each of
//! its system calls to the sentry. With both kinds on one core every system call is two host
//! context switches on that core (≈ 26 µs here); with the sentry on one core and the stubs on
//! another, the sentry picks a call up on its own core (≈ 4 µs), and the round trips of a warm
//! invocation (the runtime client's ≈ 30 system calls) get several times shorter
//! (`docs/perf.md`). [`Pinning::Split`] therefore puts a sandbox's sentry side on one core and
//! its application side on the next one; sandboxes take their core pairs round robin.

use std::fs;
use std::path::Path;

/// How sandboxes are placed on cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Anywhere (the kernel's scheduler decides).
    Off,
    /// Each sandbox on one core (its cgroup's cpuset).
    Core,
    /// Each sandbox's sentry and gofer on one core, its application (the stub processes) on
    /// the next.
    Split,
}

/// The side of a sandbox a host process belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sentry or the gofer (a `runsc` process with its arguments).
    Sentry,
    /// A systrap stub process: it runs application code and has no command line of its own.
    Application,
}

/// Which side a process is on, from its `/proc/PID/cmdline`.
pub fn side(cmdline: &[u8]) -> Side {
    if cmdline.iter().all(|&b| b == 0) {
        Side::Application
    } else {
        Side::Sentry
    }
}

/// Put every thread of `pids` on `sentry_core` or `app_core` by its side. Returns how many
/// threads were placed; a process or thread that ended meanwhile is skipped.
pub fn split(pids: &[i32], sentry_core: usize, app_core: usize) -> usize {
    let mut placed = 0;
    for &pid in pids {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let core = match side(&cmdline) {
            Side::Sentry => sentry_core,
            Side::Application => app_core,
        };
        placed += place_threads(&Path::new("/proc").join(pid.to_string()), core);
    }
    placed
}

fn place_threads(proc_dir: &Path, core: usize) -> usize {
    let Ok(tasks) = fs::read_dir(proc_dir.join("task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&tid| set_affinity(tid, core))
        .count()
}

/// Restrict one thread to one core.
fn set_affinity(tid: i32, core: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET writes inside it, and
    // sched_setaffinity only reads `set` for the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The cores a thread may run on (for tests and checks).
pub fn cores_of(tid: i32) -> Vec<usize> {
    // SAFETY: as in `set_affinity`; sched_getaffinity writes at most the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_have_no_command_line() {
        assert_eq!(side(b""), Side::Application);
        assert_eq!(side(b"\0"), Side::Application);
        assert_eq!(
            side(b"runsc-sandbox\0--root=/x\0boot\0--bundle=/b\0"),
            Side::Sentry
        );
        assert_eq!(side(b"runsc-gofer\0gofer\0"), Side::Sentry);
    }

    #[test]
    fn a_thread_is_placed_and_reads_back() {
        // This test's own thread, moved to core 0 and back to where it was.
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let before = cores_of(tid);
        assert!(!before.is_empty());
        assert!(set_affinity(tid, before[0]));
        assert_eq!(cores_of(tid), vec![before[0]]);
        // SAFETY: as in `set_affinity`, with every core the thread had.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &before {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        assert_eq!(cores_of(tid), before);
    }
}
