//! The capacity manager: keeps the worker fleet between its bounds by utilisation
//! ([`crate::fleet::scale`]), starting and stopping workers through a [`Provisioner`].
//!
//! One assignment node acts at a time: the leader of partition 0. The decision is pure; the
//! effects (processes, units, pods) sit behind the trait. [`LocalProvisioner`] starts `hearth
//! worker` processes on this machine; another provisioner (systemd units on several hosts,
//! Kubernetes) implements the same three methods: start one worker, stop a named one, and say
//! how many it started that have not registered yet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fleet::{Scale, ScalePolicy, WorkerReport, scale};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("starting a worker: {0}")]
    Start(std::io::Error),
    #[error("stopping worker {0}: {1}")]
    Stop(String, String),
    #[error("worker {0} was not started by this provisioner")]
    NotMine(String),
}

/// Starts and stops workers.
pub trait Provisioner: Send {
    /// Start one worker (it registers by heartbeating).
    fn start(&mut self) -> Result<(), ProvisionError>;
    /// Stop the worker whose id (`NAME/START_MS`) is `worker`.
    fn stop(&mut self, worker: &str) -> Result<(), ProvisionError>;
    /// Workers started and not yet registered (`live` is the fleet now); forgets those that
    /// exited or took too long.
    fn starting(&mut self, live: &[WorkerReport]) -> u32;
}

/// What the capacity manager did in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Started(u32),
    Stopped(String),
    Held,
    Failed(String),
}

/// One step: decide from the live fleet and act.
pub fn step(policy: &ScalePolicy, live: &[WorkerReport], p: &mut dyn Provisioner) -> Action {
    let starting = p.starting(live);
    match scale(policy, live, starting) {
        Scale::Grow(n) => {
            for i in 0..n {
                if let Err(e) = p.start() {
                    return if i == 0 {
                        Action::Failed(e.to_string())
                    } else {
                        Action::Started(i)
                    };
                }
            }
            Action::Started(n)
        }
        Scale::Shrink(w) => match p.stop(&w) {
            Ok(()) => Action::Stopped(w),
            Err(e) => Action::Failed(e.to_string()),
        },
        Scale::Hold => Action::Held,
    }
}

/// Starts `hearth worker` processes on this machine: `program` with `args`, plus
/// `--name NAME --listen 127.0.0.1:PORT --data-dir DIR/NAME` for each new worker (names
/// `PREFIX-1`, `PREFIX-2`, ...). Its workers stop (SIGTERM) when it is dropped.
pub struct LocalProvisioner {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    prefix: String,
    next: u32,
    /// How long a started worker may take to register before it no longer counts as starting.
    register_within: Duration,
    children: BTreeMap<String, (Child, Instant)>,
}

impl LocalProvisioner {
    pub fn new(program: PathBuf, args: Vec<String>, dir: PathBuf, prefix: &str) -> Self {
        Self {
            program,
            args,
            dir,
            prefix: prefix.to_string(),
            next: 1,
            register_within: Duration::from_secs(120),
            children: BTreeMap::new(),
        }
    }

    fn free_port() -> Result<u16, ProvisionError> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(ProvisionError::Start)?;
        Ok(l.local_addr().map_err(ProvisionError::Start)?.port())
    }
}

fn terminate(child: &mut Child) {
    // SIGTERM lets the worker remove its sandboxes; kill(1) because std sends only SIGKILL.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

impl Provisioner for LocalProvisioner {
    fn start(&mut self) -> Result<(), ProvisionError> {
        let name = format!("{}-{}", self.prefix, self.next);
        self.next += 1;
        let data = self.dir.join(&name);
        std::fs::create_dir_all(&data).map_err(ProvisionError::Start)?;
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(ProvisionError::Start)?;
        let err = log.try_clone().map_err(ProvisionError::Start)?;
        let port = Self::free_port()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .arg("--name")
            .arg(&name)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(ProvisionError::Start)?;
        tracing::info!(worker = %name, pid = child.id(), "capacity manager started a worker");
        self.children.insert(name, (child, Instant::now()));
        Ok(())
    }

    fn stop(&mut self, worker: &str) -> Result<(), ProvisionError> {
        let name = worker.split('/').next().unwrap_or(worker);
        let Some((mut child, _)) = self.children.remove(name) else {
            return Err(ProvisionError::NotMine(worker.to_string()));
        };
        terminate(&mut child);
        // Reaped in the background: a worker takes a moment to remove its sandboxes.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        tracing::info!(worker, "capacity manager stopped a worker");
        Ok(())
    }

    fn starting(&mut self, live: &[WorkerReport]) -> u32 {
        let within = self.register_within;
        self.children.retain(|name, (child, _)| match child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(worker = %name, %status, "a worker the capacity manager started exited");
                false
            }
            _ => true,
        });
        self.children
            .iter()
            .filter(|(name, (_, at))| {
                let registered = live
                    .iter()
                    .any(|w| w.id.split('/').next() == Some(name.as_str()));
                !registered && at.elapsed() < within
            })
            .count() as u32
    }
}

impl Drop for LocalProvisioner {
    fn drop(&mut self) {
        for (_, (child, _)) in self.children.iter_mut() {
            terminate(child);
        }
        for (_, (child, _)) in self.children.iter_mut() {
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it was asked; workers it starts register when the test says so.
    #[derive(Default)]
    struct Fake {
        started: u32,
        stopped: Vec<String>,
        pending: u32,
        fail: bool,
    }

    impl Provisioner for Fake {
        fn start(&mut self) -> Result<(), ProvisionError> {
            if self.fail {
                return Err(ProvisionError::Start(std::io::Error::other("no")));
            }
            self.started += 1;
            self.pending += 1;
            Ok(())
        }
        fn stop(&mut self, worker: &str) -> Result<(), ProvisionError> {
            self.stopped.push(worker.to_string());
            Ok(())
        }
        fn starting(&mut self, _live: &[WorkerReport]) -> u32 {
            self.pending
        }
    }

    fn w(id: &str, free: u64, busy: u32) -> WorkerReport {
        WorkerReport {
            id: id.into(),
            addr: String::new(),
            memory_mb: 100,
            memory_free_mb: free,
            memory_idle_mb: 0,
            cores: 2,
            busy,
            sandboxes: busy,
            cached: Default::default(),
            idle: None,
        }
    }

    #[test]
    fn the_fleet_is_brought_to_its_minimum_once_and_grows_under_load() {
        let policy = ScalePolicy {
            min_workers: 2,
            max_workers: 3,
            ..Default::default()
        };
        let mut p = Fake::default();
        assert_eq!(step(&policy, &[], &mut p), Action::Started(2));
        // Not registered yet: no second round of starts.
        assert_eq!(step(&policy, &[], &mut p), Action::Held);
        p.pending = 0;
        let busy = [w("a/1", 10, 4), w("b/1", 10, 4)];
        assert_eq!(step(&policy, &busy, &mut p), Action::Started(1));
        assert_eq!(p.started, 3);
    }

    #[test]
    fn an_idle_worker_is_stopped_when_the_rest_suffice() {
        let policy = ScalePolicy {
            min_workers: 1,
            max_workers: 3,
            ..Default::default()
        };
        let mut p = Fake::default();
        let quiet = [w("a/1", 90, 1), w("b/1", 100, 0)];
        assert_eq!(step(&policy, &quiet, &mut p), Action::Stopped("b/1".into()));
        assert_eq!(p.stopped, vec!["b/1".to_string()]);
    }

    #[test]
    fn a_failing_provisioner_is_reported() {
        let policy = ScalePolicy::default();
        let mut p = Fake {
            fail: true,
            ..Default::default()
        };
        assert!(matches!(step(&policy, &[], &mut p), Action::Failed(_)));
    }

    #[test]
    fn the_local_provisioner_starts_processes_and_stops_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in for `hearth worker`: sleeps until terminated.
        let mut p = LocalProvisioner::new(
            "/bin/sh".into(),
            vec!["-c".into(), "sleep 30".into(), "worker".into()],
            dir.path().to_path_buf(),
            "auto",
        );
        p.start().expect("start");
        p.start().expect("start");
        assert_eq!(p.starting(&[]), 2);
        assert_eq!(p.starting(&[w("auto-1/5", 100, 0)]), 1, "auto-1 registered");
        assert!(dir.path().join("auto-2").is_dir());
        p.stop("auto-1/5").expect("stop");
        assert!(matches!(p.stop("other/1"), Err(ProvisionError::NotMine(_))));
        assert_eq!(p.starting(&[]), 1);
        drop(p);
    }
}
