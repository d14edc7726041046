//! hearth-agent: the process that runs as PID 1 inside each sandbox.
//!
//! It starts the function's runtime (`bootstrap`), serves it the Lambda Runtime API on
//! loopback, and relays between the runtime and the worker outside the sandbox, which speaks
//! [`hearth_proto`] frames over the agent's stdin (worker → agent) and stdout (agent → worker).
//!
//! # Start-up
//!
//! The agent binds the Runtime API listener (`HEARTH_AGENT_LISTEN`, default `127.0.0.1:9001`)
//! and then starts in one of two ways:
//!
//! - **direct**: the sandbox was created for one function, so the agent's own environment is
//!   the function's. It starts the runtime with that environment and says `Hello`.
//! - **deferred** (`HEARTH_AGENT_DEFER=1`): the sandbox was created before its function was
//!   known, so its environment is generic. The agent says `Hello` and waits for the first
//!   frame, which must be `Configure`: it carries the function's whole environment, and the
//!   runtime is started with that one (the agent's own does not reach it). Shutdown or EOF
//!   first exits 0; any other frame first, or a `Configure` entry that is not `KEY=VALUE`, is
//!   answered with `InitError` (`Sandbox.NotConfigured`) and exit 1; a malformed frame exits 1.
//!
//! Either way the environment goes through [`config::RuntimeConfig::from_vars`] (`HEARTH_*`
//! dropped, `AWS_LAMBDA_RUNTIME_API` added; task root, runtime directory and SnapStart mode
//! read from it), and init (`InitDone.init_ms`) is timed from the runtime's start: from the
//! process start for a direct start, from the receipt of `Configure` for a deferred one. From
//! there on both behave the same. A `Configure` at any other time is a protocol error.
//!
//! # Prestarted runtimes
//!
//! In a deferred start, if the runtime directory (`LAMBDA_RUNTIME_DIR`, default `/var/runtime`)
//! holds an executable `prestart` (and `HEARTH_AGENT_PRESTART` is not `0`), the agent starts it
//! first and says `Hello` once it has loaded (it writes `r` on its fd 4; at most 10 s), with the agent's own variables (`HEARTH_*` and `HOME` dropped,
//! `AWS_LAMBDA_RUNTIME_API` added), in `/`, in a process group of its own: an interpreter that
//! loads what it can before any function is known. On `Configure`, if the bootstrap that
//! would run is the runtime directory's own, the agent writes the function's environment to
//! the prestart's fd 3 (NUL-terminated `KEY=VALUE` entries, then end of file) and reads its
//! fd 4: `y` means it became the runtime (from here on exactly as a spawned bootstrap); `n`
//! and a reason (logged on the agent's stderr), end of file, or a task or layer `bootstrap`
//! that takes precedence, and the prestart is killed and reaped and the bootstrap spawned as
//! usual. Init is timed from
//! `Configure` either way.
//!
//! # Threads
//!
//! - **main**: reads `HostMsg` frames from stdin. `Invoke` queues an invocation (or writes it
//!   straight onto the connection a `next` waits on), `Restore`
//!   releases a pending `restore/next`, `Shutdown` or EOF stops the runtime (SIGTERM to its
//!   process group, SIGKILL 500 ms later) and exits 0. A malformed frame exits 1.
//! - **pump** ([`output`]): `poll`s the runtime's stdout and stderr pipes and forwards output
//!   that no frame carried along as coalesced `Log` frames.
//! - **accept** and **one thread per connection** ([`api`], [`http`]): the Runtime API.
//!   Handlers share one state machine (a mutex and a condvar: init running / failed / done,
//!   queued invocations, the current invocation and whether it was answered).
//! - **reaper** ([`process`]): `waitpid(-1)` in a loop, reaping the runtime and, as PID 1,
//!   every orphan. When the runtime exits it reports `RuntimeExit` and the agent exits 0.
//!
//! # Ordering
//!
//! Every frame is written through one [`output::Emitter`], under its lock, on the thread that
//! has it to send (no hand-off: inside gVisor each one costs round trips through the sentry).
//! Before its frame, the writer forwards everything readable on the runtime's pipes
//! (non-blocking) as `Log` frames. A runtime writes its output before it sends the HTTP
//! request that makes a handler send `Response`, `FunctionError` or `InitDone`, so that output
//! is in the pipes by then and reaches the worker first. Frames are sent while the state lock
//! is held, so their order matches the order of state transitions. `Hello` (and a deferred
//! start's refusal) is written by the main thread before any other thread runs, so it is
//! always first.

mod api;
mod config;
mod http;
mod output;
mod process;

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hearth_proto::{AgentMsg, Frame, FrameError, HostMsg, PROTOCOL_VERSION, read_frame};

use api::Shared;
use config::RuntimeConfig;

/// How long the runtime gets between SIGTERM and SIGKILL on shutdown.
const GRACE: Duration = Duration::from_millis(500);

/// The error type of an `InitError` refusing a deferred start.
const NOT_CONFIGURED: &str = "Sandbox.NotConfigured";

/// How long `Hello` waits for a prestarted runtime to say it has loaded.
const PRESTART_LOAD_LIMIT: Duration = Duration::from_secs(10);

/// Startup failures (everything later is reported to the worker as frames).
#[derive(Debug)]
enum AgentError {
    Listen(String, io::Error),
    Setup(&'static str, io::Error),
    /// The worker's first frame to a deferred agent was not a usable `Configure`.
    NotConfigured(String),
    BadFrame(FrameError),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            AgentError::Setup(what, e) => write!(f, "cannot {what}: {e}"),
            AgentError::NotConfigured(why) => write!(f, "not configured: {why}"),
            AgentError::BadFrame(e) => write!(f, "bad frame from the worker: {e}"),
        }
    }
}

/// A variable of the agent's own environment, or `default` when unset or empty.
fn own_var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
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
    let listen = own_var("HEARTH_AGENT_LISTEN", "127.0.0.1:9001");
    let listener = TcpListener::bind(&listen).map_err(|e| AgentError::Listen(listen.clone(), e))?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| AgentError::Listen(listen.clone(), e))?
        .to_string();
    let (out, mut pump) = output::channel();
    let hello = AgentMsg::Hello {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
    };
    let mut input = io::stdin().lock();

    let deferred = std::env::var_os("HEARTH_AGENT_DEFER").is_some_and(|v| v == "1");
    let mut prestarted = None;
    let (config, started) = if deferred {
        // Hello once a prestart has loaded (or failed to): a worker counts the sandbox ready
        // from Hello on.
        prestarted = start_prestart(&api_addr);
        if let Some(p) = &prestarted {
            p.wait_loaded(PRESTART_LOAD_LIMIT);
        }
        pump.write_now(&hello, &[]);
        match await_configure(&mut input, &pump, &api_addr) {
            Ok(Some(configured)) => configured,
            other => {
                if let Some(p) = prestarted.take() {
                    p.discard();
                }
                // None: shut down before it was ever configured.
                return other.map(drop);
            }
        }
    } else {
        let started = Instant::now();
        (
            RuntimeConfig::from_vars(std::env::vars_os(), &api_addr),
            started,
        )
    };

    let candidates = process::candidates(&config.task_root, &config.runtime_dir);
    let runtime = match prestarted {
        // The prestarted runtime stands for the runtime directory's bootstrap only.
        Some(p) if process::chosen(&candidates) == Some(config.runtime_dir.join("bootstrap")) => {
            p.hand_over(&config.env).or_else(|why| {
                eprintln!("hearth-agent: {why}; starting the bootstrap");
                process::spawn(&candidates, &config.task_root, config.env)
            })
        }
        other => {
            if let Some(p) = other {
                p.discard();
            }
            process::spawn(&candidates, &config.task_root, config.env)
        }
    };
    if !deferred {
        // Written before the pump runs, so it precedes any runtime output.
        pump.write_now(&hello, &[]);
    }
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

    serve_worker(&shared, runtime_pid, input)
}

/// In a deferred start, the runtime directory's `prestart` (if the image has one), started
/// now with the agent's own platform variables so it can load before a function is known.
fn start_prestart(api_addr: &str) -> Option<process::Prestart> {
    if own_var("HEARTH_AGENT_PRESTART", "1") == "0" {
        return None;
    }
    let dir = own_var("LAMBDA_RUNTIME_DIR", "/var/runtime");
    // Without HOME: OCI runtimes (runsc too) add it when the bundle sets none, and a runtime
    // spawned with a function's environment has none.
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.as_encoded_bytes().starts_with(b"HEARTH_") && k != "HOME")
        .collect();
    env.push(("AWS_LAMBDA_RUNTIME_API".into(), api_addr.into()));
    match process::prestart(&std::path::Path::new(&dir).join("prestart"), env)? {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("hearth-agent: prestart: {e}");
            None
        }
    }
}

/// The first frame of a deferred start: the configuration a `Configure` carries and when it
/// arrived, or `None` if the worker shut the sandbox down instead. Any other frame is refused
/// with an `InitError` (written at once: the pump does not run yet).
fn await_configure(
    input: &mut impl io::Read,
    pump: &output::Pump,
    api_addr: &str,
) -> Result<Option<(RuntimeConfig, Instant)>, AgentError> {
    let why = match read_frame::<_, HostMsg>(input) {
        Ok(Frame {
            msg: HostMsg::Configure(c),
            ..
        }) => {
            let received = Instant::now();
            match config::parse_env(c.env) {
                Ok(env) => {
                    return Ok(Some((RuntimeConfig::from_vars(env, api_addr), received)));
                }
                Err(e) => e.to_string(),
            }
        }
        Ok(Frame {
            msg: HostMsg::Shutdown,
            ..
        })
        | Err(FrameError::Closed) => return Ok(None),
        Ok(Frame { msg, .. }) => format!(
            "the sandbox got {} before its configuration",
            host_msg_name(&msg)
        ),
        Err(e) => return Err(AgentError::BadFrame(e)),
    };
    let message = format!("hearth sandbox not configured: {why}");
    pump.write_now(
        &AgentMsg::InitError {
            error_type: NOT_CONFIGURED.into(),
        },
        &api::error_doc(NOT_CONFIGURED, &message),
    );
    Err(AgentError::NotConfigured(why))
}

fn host_msg_name(msg: &HostMsg) -> &'static str {
    match msg {
        HostMsg::Configure(_) => "configure",
        HostMsg::Invoke(_) => "invoke",
        HostMsg::Restore => "restore",
        HostMsg::Shutdown => "shutdown",
    }
}

/// Read the worker's frames until shutdown.
fn serve_worker(shared: &Shared, runtime_pid: Option<i32>, mut input: io::StdinLock) -> ! {
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
            // Configure comes first or never: a late one means the worker lost track.
            Ok(Frame {
                msg: HostMsg::Configure(_),
                ..
            }) => protocol_failure(runtime_pid, "configure frame for a running sandbox"),
            Err(e) => protocol_failure(runtime_pid, &format!("bad frame from the worker: {e}")),
        }
    }
}

/// The worker broke the protocol: kill the runtime and exit 1 (the worker then destroys us).
fn protocol_failure(runtime_pid: Option<i32>, why: &str) -> ! {
    eprintln!("hearth-agent: {why}");
    // Before the kill: the runtime's exit makes the pump exit, and it must exit 1 as well.
    output::PROTOCOL_FAILED.store(true, Ordering::SeqCst);
    if let Some(pid) = runtime_pid {
        process::signal_group(pid, libc::SIGKILL);
    }
    std::process::exit(1);
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
    // Normally the reaper exits after reporting RuntimeExit; this covers the other cases.
    shared.exit(0)
}
