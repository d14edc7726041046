//! Same-page merging (the kernel's KSM) for the sandboxes' own processes.
//!
//! About half of an idle Python sandbox's memory is runsc itself: the sentry's and the gofer's
//! private memory (Go heaps, runtime structures), much of it alike from one sandbox to the next
//! or all zeros. The application's memory is not in it: under gVisor that lives in the
//! sentry's memory file, shared memory that KSM never scans. So marking the sentry and gofer
//! mergeable lets the kernel keep one copy of their identical pages (and map zero pages to its
//! zero page) without ever comparing a function's own pages with another's.
//!
//! Merging needs Linux 6.4+ (`prctl(PR_SET_MEMORY_MERGE)`: a whole process, inherited by its
//! children and kept across `execve`, which is how runsc's re-executions and the gofer and
//! sentry it starts get it) and the kernel's scanner running (`/sys/kernel/mm/ksm/run` = 1).
//! The engine turns the scanner on when it is off (and then also maps merged zero pages to the
//! kernel's zero page), and marks the `runsc` processes that start sandboxes; nothing else on
//! the host becomes mergeable. [`plan`] decides what to write, [`enable`] writes it.

use std::path::{Path, PathBuf};

/// Where the kernel's KSM settings are.
pub const SYSFS: &str = "/sys/kernel/mm/ksm";

#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    #[error("this kernel has no same-page merging ({0} is missing)")]
    Missing(PathBuf),
    #[error(
        "this kernel cannot mark a whole process mergeable (prctl PR_SET_MEMORY_MERGE needs Linux 6.4 or later): {0}"
    )]
    NoProcessMerge(std::io::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot turn same-page merging on (writing {value} to {path}): {source}")]
    Write {
        path: PathBuf,
        value: &'static str,
        source: std::io::Error,
    },
}

/// The scanner's settings that matter here, as read from sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `run`: 0 stopped, 1 running, 2 stopped after unmerging everything.
    pub run: u8,
    /// `use_zero_pages`, where the kernel has it.
    pub use_zero_pages: Option<u8>,
}

/// The writes (setting, value) that make the scanner merge the sandboxes' pages. A scanner
/// already running is left as its administrator set it; one that is not is started, with
/// zero pages mapped to the kernel's zero page (a merged zero page then costs nothing).
pub fn plan(s: Settings) -> Vec<(&'static str, &'static str)> {
    if s.run == 1 {
        return Vec::new();
    }
    let mut writes = Vec::new();
    if s.use_zero_pages == Some(0) {
        writes.push(("use_zero_pages", "1"));
    }
    writes.push(("run", "1"));
    writes
}

fn read_setting(dir: &Path, name: &str) -> Result<Option<u8>, KsmError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.trim().parse().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KsmError::Read { path, source }),
    }
}

/// Check that this kernel can merge whole processes and start its scanner (under `dir`,
/// normally [`SYSFS`]) if it is not running. Returns the settings written, for the log.
pub fn enable(dir: &Path) -> Result<Vec<String>, KsmError> {
    let run_path = dir.join("run");
    let Some(run) = read_setting(dir, "run")? else {
        return Err(KsmError::Missing(run_path));
    };
    process_merge_supported().map_err(KsmError::NoProcessMerge)?;
    let settings = Settings {
        run,
        use_zero_pages: read_setting(dir, "use_zero_pages")?,
    };
    let mut done = Vec::new();
    for (name, value) in plan(settings) {
        let path = dir.join(name);
        std::fs::write(&path, value).map_err(|source| KsmError::Write {
            path: path.clone(),
            value,
            source,
        })?;
        done.push(format!("{}={value}", path.display()));
    }
    Ok(done)
}

/// Whether `prctl(PR_SET_MEMORY_MERGE)` exists here, asked without changing this process
/// (`PR_GET_MEMORY_MERGE` fails with `EINVAL` on kernels without it).
pub fn process_merge_supported() -> std::io::Result<()> {
    // SAFETY: prctl(PR_GET_MEMORY_MERGE) takes integer arguments and only reads a flag.
    prctl_result(unsafe { libc::prctl(libc::PR_GET_MEMORY_MERGE, 0, 0, 0, 0) })
}

/// Mark the calling process (and what it later starts) mergeable. Meant for a child between
/// `fork` and `exec`: it makes one system call and allocates nothing.
pub fn mark_this_process() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_MEMORY_MERGE, 1) takes integer arguments and changes only this
    // process's memory-merging flag.
    prctl_result(unsafe { libc::prctl(libc::PR_SET_MEMORY_MERGE, 1, 0, 0, 0) })
}

fn prctl_result(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One process's merging, from `/proc/PID/ksm_stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessStat {
    /// The whole process is mergeable (`ksm_merge_any: yes`).
    pub merge_any: bool,
    /// Its pages now backed by a shared KSM page.
    pub merging_pages: u64,
    /// Its zero pages now mapped to the kernel's zero page.
    pub zero_pages: u64,
}

/// Parse `/proc/PID/ksm_stat`.
pub fn parse_stat(text: &str) -> ProcessStat {
    let mut s = ProcessStat::default();
    for line in text.lines() {
        let (key, value) = match line.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => match line.split_once(' ') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => continue,
            },
        };
        match key {
            "ksm_merge_any" => s.merge_any = value == "yes",
            "ksm_merging_pages" => s.merging_pages = value.parse().unwrap_or(0),
            "ksm_zero_pages" => s.zero_pages = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    s
}

/// `/proc/PID/ksm_stat` of a live process (None: gone, or a kernel without it).
pub fn process_stat(pid: i32) -> Option<ProcessStat> {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_stat"))
        .ok()
        .map(|t| parse_stat(&t))
}

/// How many full passes the scanner has made (under `dir`, normally [`SYSFS`]).
pub fn full_scans(dir: &Path) -> Option<u64> {
    read_count(dir, "full_scans")
}

/// Pages the scanner has saved host-wide: duplicates now sharing a KSM page plus zero pages
/// mapped to the kernel's zero page (under `dir`, normally [`SYSFS`]).
pub fn saved_pages(dir: &Path) -> Option<u64> {
    Some(read_count(dir, "pages_sharing")? + read_count(dir, "ksm_zero_pages").unwrap_or(0))
}

fn read_count(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_scanner_is_started_with_zero_pages_mapped_to_the_zero_page() {
        let w = plan(Settings {
            run: 0,
            use_zero_pages: Some(0),
        });
        assert_eq!(w, vec![("use_zero_pages", "1"), ("run", "1")]);
        // Unmerged and stopped (2) is started again too; a kernel without the zero-page
        // setting only gets `run`.
        let w = plan(Settings {
            run: 2,
            use_zero_pages: None,
        });
        assert_eq!(w, vec![("run", "1")]);
        let w = plan(Settings {
            run: 0,
            use_zero_pages: Some(1),
        });
        assert_eq!(w, vec![("run", "1")]);
    }

    #[test]
    fn a_running_scanner_keeps_its_administrators_settings() {
        assert!(
            plan(Settings {
                run: 1,
                use_zero_pages: Some(0),
            })
            .is_empty()
        );
    }

    #[test]
    fn enable_writes_the_plan_into_the_settings_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("run"), "0\n").expect("write");
        std::fs::write(dir.path().join("use_zero_pages"), "0\n").expect("write");
        match enable(dir.path()) {
            Ok(done) => {
                assert_eq!(done.len(), 2, "{done:?}");
                let read = |n: &str| {
                    std::fs::read_to_string(dir.path().join(n))
                        .expect("read")
                        .trim()
                        .to_string()
                };
                assert_eq!(read("run"), "1");
                assert_eq!(read("use_zero_pages"), "1");
                // Running now: a second start changes nothing.
                assert_eq!(enable(dir.path()).expect("again"), Vec::<String>::new());
            }
            // A kernel before 6.4: nothing may have been written.
            Err(KsmError::NoProcessMerge(_)) => {
                let run = std::fs::read_to_string(dir.path().join("run")).expect("read");
                assert_eq!(run.trim(), "0");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_kernel_without_ksm_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = enable(dir.path()).expect_err("no run file");
        assert!(matches!(e, KsmError::Missing(_)), "{e}");
        assert!(e.to_string().contains("no same-page merging"), "{e}");
    }

    #[test]
    fn ksm_stat_is_parsed() {
        let s = parse_stat(
            "ksm_rmap_items 1681\nksm_zero_pages 143\nksm_merging_pages 141\n\
             ksm_process_profit 1055680\nksm_merge_any: yes\nksm_mergeable: yes\n",
        );
        assert_eq!(
            s,
            ProcessStat {
                merge_any: true,
                merging_pages: 141,
                zero_pages: 143,
            }
        );
        assert!(!parse_stat("ksm_merge_any: no\n").merge_any);
        assert_eq!(parse_stat(""), ProcessStat::default());
    }
}
