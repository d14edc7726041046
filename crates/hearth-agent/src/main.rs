//! hearth-agent: the process that runs as PID 1 inside each sandbox.
//!
//! It starts the function's runtime (`bootstrap`), serves it the Lambda Runtime API on
//! loopback, and relays between the runtime and the worker outside the sandbox, which speaks
//! [`hearth_proto`] frames over the agent's stdin (worker → agent) and stdout (agent → worker).
//!
//! # Threads
//!
//! - **main**: reads `HostMsg` frames from stdin. `Invoke` queues an invocation, `Restore`
//!   releases a pending `restore/next`, `Shutdown` or EOF stops the runtime (SIGTERM to its
//!   process group, SIGKILL 500 ms later) and exits 0. A malformed frame exits 1.
//! - **pump** ([`output`]): the only writer of stdout. It `poll`s the runtime's stdout and
//!   stderr pipes and a control pipe, forwarding runtime output as coalesced `Log` frames.
//! - **accept** and **one thread per connection** ([`api`], [`http`]): the Runtime API.
//!   Handlers share one state machine (a mutex and a condvar: init running / failed / done,
//!   queued invocations, the current invocation and whether it was answered).
//! - **reaper** ([`process`]): `waitpid(-1)` in a loop, reaping the runtime and, as PID 1,
//!   every orphan. When the runtime exits it reports `RuntimeExit` and the agent exits 0.
//!
//! # Ordering
//!
//! No thread but the pump writes stdout. Everyone else queues frames through an
//! [`output::Emitter`]: a channel plus one byte on the pump's control pipe. When woken, the
//! pump first reads everything readable on the runtime's pipes (non-blocking) and writes it as
//! `Log` frames, and only then writes the queued frames. A runtime writes its output before it
//! sends the HTTP request that makes a handler queue `Response`, `FunctionError` or `InitDone`,
//! so that output is in the pipes by then and reaches the worker first. Frames are queued
//! while the state lock is held, so their order matches the order of state transitions.
//! `Hello` is written by the main thread before the pump starts, so it is always first.

mod api;
mod http;
mod output;
mod process;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hearth_proto::{AgentMsg, Frame, FrameError, HostMsg, PROTOCOL_VERSION, read_frame};

use api::Shared;

/// How long the runtime gets between SIGTERM and SIGKILL on shutdown.
const GRACE: Duration = Duration::from_millis(500);

/// Startup failures (everything later is reported to the worker as frames).
#[derive(Debug)]
enum AgentError {
    Listen(String, io::Error),
    Setup(&'static str, io::Error),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            AgentError::Setup(what, e) => write!(f, "cannot {what}: {e}"),
        }
    }
}

/// Configuration, from the agent's environment.
struct Config {
    listen: String,
    task_root: PathBuf,
    runtime_dir: PathBuf,
    snap_start: bool,
}

impl Config {
    fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        Config {
            listen: var("HEARTH_AGENT_LISTEN", "127.0.0.1:9001"),
            task_root: var("LAMBDA_TASK_ROOT", "/var/task").into(),
            runtime_dir: var("LAMBDA_RUNTIME_DIR", "/var/runtime").into(),
            snap_start: std::env::var("AWS_LAMBDA_INITIALIZATION_TYPE").as_deref()
                == Ok("snap-start"),
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("hearth-agent: {e}");
        std::process::exit(1);
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), AgentError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| AgentError::Setup("start a thread", e))
}

fn run() -> Result<(), AgentError> {
    let config = Config::from_env();
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| AgentError::Listen(config.listen.clone(), e))?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| AgentError::Listen(config.listen.clone(), e))?
        .to_string();
    let (out, mut pump) = output::channel().map_err(|e| AgentError::Setup("create a pipe", e))?;

    // The runtime's environment: ours, minus HEARTH_*, plus the Runtime API address.
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.as_encoded_bytes().starts_with(b"HEARTH_"))
        .collect();
    env.push(("AWS_LAMBDA_RUNTIME_API".into(), api_addr.into()));

    let started = Instant::now();
    let candidates = process::candidates(&config.task_root, &config.runtime_dir);
    let runtime = process::spawn(&candidates, &config.task_root, env);
    // Written before the pump runs, so it precedes any runtime output.
    pump.write_now(&AgentMsg::Hello {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
    });
    let shared = Arc::new(Shared::new(out, config.snap_start, started));

    let runtime_pid = match runtime {
        Ok(rt) => {
            pump.attach(rt.stdout)
                .and_then(|()| pump.attach(rt.stderr))
                .map_err(|e| AgentError::Setup("set up the runtime's pipes", e))?;
            pump.set_runtime(rt.pid);
            // The reaper starts only now, so it never races std's own wait in `spawn`.
            let sh = shared.clone();
            let pid = rt.pid;
            spawn_thread("reaper", move || {
                process::reap(pid, |status| sh.runtime_exited(status))
            })?;
            Some(rt.pid)
        }
        Err(message) => {
            eprintln!("hearth-agent: {message}");
            shared.fail_init("Runtime.InvalidEntrypoint", &message);
            None
        }
    };
    spawn_thread("pump", move || pump.run())?;
    let sh = shared.clone();
    spawn_thread("accept", move || api::serve(sh, listener))?;

    serve_worker(&shared, runtime_pid)
}

/// Read the worker's frames until shutdown.
fn serve_worker(shared: &Shared, runtime_pid: Option<i32>) -> ! {
    let mut input = io::stdin().lock();
    loop {
        match read_frame::<_, HostMsg>(&mut input) {
            Ok(Frame {
                msg: HostMsg::Invoke(meta),
                body,
            }) => shared.invoke(meta, body),
            Ok(Frame {
                msg: HostMsg::Restore,
                ..
            }) => shared.restored(),
            Ok(Frame {
                msg: HostMsg::Shutdown,
                ..
            })
            | Err(FrameError::Closed) => shutdown(shared, runtime_pid),
            Err(e) => {
                eprintln!("hearth-agent: bad frame from the worker: {e}");
                if let Some(pid) = runtime_pid {
                    process::signal_group(pid, libc::SIGKILL);
                }
                std::process::exit(1);
            }
        }
    }
}

/// Stop the runtime (SIGTERM, then SIGKILL after [`GRACE`]) and exit 0.
fn shutdown(shared: &Shared, runtime_pid: Option<i32>) -> ! {
    output::SHUTTING_DOWN.store(true, Ordering::SeqCst);
    if let Some(pid) = runtime_pid {
        process::signal_group(pid, libc::SIGTERM);
        if !shared.wait_runtime_exit(GRACE) {
            process::signal_group(pid, libc::SIGKILL);
            shared.wait_runtime_exit(Duration::from_secs(2));
        }
        // Whatever the runtime left behind in its group goes too.
        process::signal_group(pid, libc::SIGKILL);
    }
    // Normally the pump exits after reporting RuntimeExit; this covers the other cases.
    shared.exit(0);
    std::thread::sleep(Duration::from_secs(2));
    std::process::exit(0);
}
