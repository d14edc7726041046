//! A fake sandbox engine, for tests of the pool's decisions without runsc.
//!
//! [`FakeEngine`] implements [`Engine`]: each sandbox it creates is an in-process agent on a
//! pair of in-memory pipes, speaking the same frames as `hearth-agent` (`Configure`, `Invoke`,
//! `Restore` in; `InitDone`, `Response`, `FunctionError`, `Log`, `RestoreReady`, `RuntimeExit`
//! out). Every delay (create, start, init, restore, an invocation's run) is a tokio sleep, so
//! a test that pauses tokio's clock (`#[tokio::test(start_paused = true)]`) runs the pool's
//! timing decisions on virtual time, fast and repeatable; the pool reads the same clock.
//!
//! What the fake function does is read from the invocation's payload, a JSON object:
//! `sleep_ms` (run this long), `fail` (a function error with this message), `exit` (the
//! runtime exits with this status), `die` (the sandbox ends without a word), `oom` (with
//! `die`: the kernel killed it for memory), `log` (a line to the function's log). The response
//! names the sandbox, the function (from the environment `Configure` gave it) and how many
//! invocations that sandbox has served. The engine counts what a test asserts on: sandboxes
//! created, live and destroyed; invocations running at once (in all, and per sandbox:
//! a sandbox handed a second invocation while one runs is counted as a double lease).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hearth_proto::{AgentMsg, Frame, HostMsg};
use serde_json::{Value, json};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

use crate::engine::{Claim, Engine, EngineError, Sandbox, SlotSpec};
use crate::frames;

/// How long the fake's steps take (on tokio's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeTimings {
    /// `create` (for a started sandbox, including its prestarted runtime's load).
    pub create: Duration,
    /// `start` of a created-only sandbox.
    pub start: Duration,
    /// From `Configure` to the runtime's first `next` (the function's init).
    pub init: Duration,
    /// `restore` of a checkpoint.
    pub restore: Duration,
    /// An invocation that asks for no `sleep_ms`.
    pub invoke: Duration,
}

impl Default for FakeTimings {
    fn default() -> Self {
        FakeTimings {
            create: Duration::from_millis(400),
            start: Duration::from_millis(80),
            init: Duration::from_millis(50),
            restore: Duration::from_millis(120),
            invoke: Duration::from_millis(2),
        }
    }
}

/// What the fake engine counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeCounts {
    pub created: usize,
    /// Sandboxes created for a memory size ([`SlotSpec::memory_mb`]), by size.
    pub created_for_memory: BTreeMap<u32, usize>,
    pub destroyed: usize,
    /// Sandboxes created and not destroyed.
    pub live: usize,
    /// Invocations running now, and the most that ever ran at once.
    pub running: usize,
    pub max_running: usize,
    /// Most invocations running at once per function name.
    pub max_running_by_function: BTreeMap<String, usize>,
    /// Invocations a sandbox received while it was running another.
    pub double_leases: usize,
    pub restores: usize,
    pub checkpoints: usize,
    /// Sandboxes frozen now.
    pub frozen: usize,
}

/// One fake sandbox's agent state, shared by the engine and the agent's task.
#[derive(Default)]
struct AgentState {
    /// The function's environment, from `Configure` or a restored checkpoint.
    env: Vec<String>,
    busy: bool,
    served: u64,
    memory_mb: u32,
    oom: bool,
}

impl AgentState {
    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
    }
}

#[derive(Default)]
struct Books {
    counts: FakeCounts,
    agents: BTreeMap<String, Arc<Mutex<AgentState>>>,
    frozen: BTreeSet<String>,
    running_by_function: BTreeMap<String, usize>,
    /// Creates still to fail.
    fail_creates: usize,
}

/// The fake engine. Cheap to create; keep an `Arc` to read its counts while the pool runs.
pub struct FakeEngine {
    timings: FakeTimings,
    dir: PathBuf,
    books: Arc<Mutex<Books>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeEngine {
    /// A fake engine whose sandboxes' directories go under `dir`.
    pub fn new(dir: &Path, timings: FakeTimings) -> Self {
        FakeEngine {
            timings,
            dir: dir.to_path_buf(),
            books: Arc::new(Mutex::new(Books::default())),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn counts(&self) -> FakeCounts {
        let b = lock(&self.books);
        let mut c = b.counts.clone();
        c.frozen = b.frozen.len();
        c
    }

    /// Make the next `n` creates fail.
    pub fn fail_next_creates(&self, n: usize) {
        lock(&self.books).fail_creates = n;
    }

    /// Whether sandbox `id` is frozen.
    pub fn is_frozen(&self, id: &str) -> bool {
        lock(&self.books).frozen.contains(id)
    }

    /// The ids of the live sandboxes.
    pub fn live(&self) -> Vec<String> {
        lock(&self.books).agents.keys().cloned().collect()
    }

    fn agent(&self, id: &str) -> Option<Arc<Mutex<AgentState>>> {
        lock(&self.books).agents.get(id).cloned()
    }

    fn claim(&self, sandbox: &Sandbox, claim: &Claim) -> Result<(), EngineError> {
        if !claim.code_dir.is_dir() {
            return Err(EngineError::Runsc {
                op: "claim",
                id: sandbox.id.clone(),
                detail: format!("no code at {}", claim.code_dir.display()),
            });
        }
        if let Some(a) = self.agent(&sandbox.id) {
            lock(&a).memory_mb = claim.memory_mb;
        }
        Ok(())
    }
}

/// The image file a fake checkpoint writes.
const IMAGE: &str = "checkpoint.img";

#[async_trait::async_trait]
impl Engine for FakeEngine {
    fn cleanup_stale(&self) -> Vec<String> {
        Vec::new()
    }
    fn egress_allowed(&self) -> bool {
        false
    }
    fn egress_with_snapshots(&self) -> bool {
        false
    }
    fn agent_digest(&self) -> &str {
        "fake-agent"
    }
    fn engine_id(&self) -> String {
        "fake-engine".into()
    }

    async fn create(&self, spec: &SlotSpec) -> Result<Sandbox, EngineError> {
        let id = format!("fake{:08}", self.next_id.fetch_add(1, Ordering::Relaxed));
        tokio::time::sleep(self.timings.create).await;
        {
            let mut b = lock(&self.books);
            if b.fail_creates > 0 {
                b.fail_creates -= 1;
                return Err(EngineError::Runsc {
                    op: "create",
                    id,
                    detail: "the fake engine was told to fail".into(),
                });
            }
        }
        let dir = self.dir.join(&id);
        for sub in ["task", "opt"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| EngineError::Runsc {
                op: "create",
                id: id.clone(),
                detail: format!("{}: {e}", d.display()),
            })?;
        }
        let (host_in, agent_in) = tokio::io::duplex(256 * 1024);
        let (agent_out, host_out) = tokio::io::duplex(256 * 1024);
        let state = Arc::new(Mutex::new(AgentState::default()));
        {
            let mut b = lock(&self.books);
            b.counts.created += 1;
            if let Some(mb) = spec.memory_mb {
                *b.counts.created_for_memory.entry(mb).or_default() += 1;
            }
            b.counts.live += 1;
            b.agents.insert(id.clone(), state.clone());
        }
        tokio::spawn(run_agent(
            id.clone(),
            agent_in,
            agent_out,
            state,
            self.books.clone(),
            self.timings,
        ));
        Ok(Sandbox::detached(
            id,
            spec.clone(),
            dir,
            Box::new(host_in),
            Box::new(host_out),
        ))
    }

    async fn start(&self, sandbox: &mut Sandbox, claim: &Claim) -> Result<(), EngineError> {
        self.claim(sandbox, claim)?;
        if sandbox.phase == crate::engine::Phase::Created {
            tokio::time::sleep(self.timings.start).await;
            sandbox.phase = crate::engine::Phase::Running;
        }
        Ok(())
    }

    async fn restore(
        &self,
        sandbox: &mut Sandbox,
        claim: &Claim,
        image_dir: &Path,
    ) -> Result<(), EngineError> {
        let fail = |detail: String| EngineError::Runsc {
            op: "restore",
            id: sandbox.id.clone(),
            detail,
        };
        if sandbox.phase != crate::engine::Phase::Created {
            return Err(fail("the sandbox was started already".into()));
        }
        let image = std::fs::read(image_dir.join(IMAGE)).map_err(|e| fail(e.to_string()))?;
        let env: Vec<String> = serde_json::from_slice(&image).map_err(|e| fail(e.to_string()))?;
        self.claim(sandbox, claim)?;
        tokio::time::sleep(self.timings.restore).await;
        if let Some(a) = self.agent(&sandbox.id) {
            lock(&a).env = env;
        }
        lock(&self.books).counts.restores += 1;
        sandbox.phase = crate::engine::Phase::Running;
        Ok(())
    }

    async fn checkpoint(&self, sandbox: &Sandbox, image_dir: &Path) -> Result<(), EngineError> {
        let fail = |detail: String| EngineError::Runsc {
            op: "checkpoint",
            id: sandbox.id.clone(),
            detail,
        };
        let agent = self
            .agent(&sandbox.id)
            .ok_or_else(|| fail("no such sandbox".into()))?;
        let env = lock(&agent).env.clone();
        std::fs::create_dir_all(image_dir).map_err(|e| fail(e.to_string()))?;
        let bytes = serde_json::to_vec(&env).map_err(|e| fail(e.to_string()))?;
        std::fs::write(image_dir.join(IMAGE), bytes).map_err(|e| fail(e.to_string()))?;
        lock(&self.books).counts.checkpoints += 1;
        Ok(())
    }

    fn destroy(&self, sandbox: Sandbox) {
        let mut b = lock(&self.books);
        if b.agents.remove(&sandbox.id).is_some() {
            b.counts.live -= 1;
            b.counts.destroyed += 1;
        }
        b.frozen.remove(&sandbox.id);
        drop(b);
        let dir = self.dir.join(&sandbox.id);
        // Dropping the pipes ends the agent.
        drop(sandbox);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn set_frozen(&self, id: &str, frozen: bool) -> bool {
        let mut b = lock(&self.books);
        if !b.agents.contains_key(id) {
            return false;
        }
        if frozen {
            b.frozen.insert(id.to_string());
        } else {
            b.frozen.remove(id);
        }
        true
    }

    fn resident(&self, id: &str) -> Option<u64> {
        self.agent(id).map(|_| 20 * 1024 * 1024)
    }

    fn out_of_memory(&self, id: &str, _peak: u64) -> bool {
        self.oom_killed(id)
    }

    fn oom_killed(&self, id: &str) -> bool {
        let b = lock(&self.books);
        // A destroyed sandbox's state is gone; the pool asks before it destroys.
        b.agents.get(id).is_some_and(|a| lock(a).oom)
    }

    fn shutdown(&self) {}
}

type Out = Arc<tokio::sync::Mutex<WriteHalf<DuplexStream>>>;

async fn send(out: &Out, msg: &AgentMsg, body: &[u8]) -> bool {
    let mut w = out.lock().await;
    frames::write_frame(&mut *w, msg, body).await.is_ok()
}

/// The fake agent: answers the worker's frames until the pipes close or the runtime "exits".
async fn run_agent(
    id: String,
    agent_in: DuplexStream,
    agent_out: DuplexStream,
    state: Arc<Mutex<AgentState>>,
    books: Arc<Mutex<Books>>,
    timings: FakeTimings,
) {
    let (mut rx, _unused): (ReadHalf<DuplexStream>, _) = tokio::io::split(agent_in);
    let (_unused_rx, tx) = tokio::io::split(agent_out);
    let out: Out = Arc::new(tokio::sync::Mutex::new(tx));
    let (end_tx, mut end_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let frame = tokio::select! {
            f = frames::read_frame::<_, HostMsg>(&mut rx) => f,
            _ = end_rx.recv() => break,
        };
        let Ok(Frame { msg, body }) = frame else {
            break;
        };
        match msg {
            HostMsg::Configure(cfg) => {
                tokio::time::sleep(timings.init).await;
                let snap = {
                    let mut s = lock(&state);
                    s.env = cfg.env;
                    s.var("AWS_LAMBDA_INITIALIZATION_TYPE") == Some("snap-start")
                };
                let msg = if snap {
                    AgentMsg::RestoreReady
                } else {
                    AgentMsg::InitDone {
                        init_ms: timings.init.as_secs_f64() * 1000.0,
                    }
                };
                if !send(&out, &msg, b"").await {
                    break;
                }
            }
            HostMsg::Restore => {
                if !send(&out, &AgentMsg::RestoreReady, b"").await {
                    break;
                }
            }
            HostMsg::Invoke(meta) => {
                let (function, served) = {
                    let mut s = lock(&state);
                    let double = s.busy;
                    s.busy = true;
                    s.served += 1;
                    let f = s.var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or("").to_string();
                    let mut b = lock(&books);
                    b.counts.double_leases += usize::from(double);
                    b.counts.running += 1;
                    b.counts.max_running = b.counts.max_running.max(b.counts.running);
                    let n = {
                        let n = b.running_by_function.entry(f.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let m = b
                        .counts
                        .max_running_by_function
                        .entry(f.clone())
                        .or_insert(0);
                    *m = (*m).max(n);
                    (f, s.served)
                };
                let task = Invocation {
                    id: id.clone(),
                    function,
                    served,
                    request_id: meta.request_id,
                    payload: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    out: out.clone(),
                    state: state.clone(),
                    books: books.clone(),
                    end: end_tx.clone(),
                    default_run: timings.invoke,
                };
                tokio::spawn(task.run());
            }
            HostMsg::Shutdown => break,
        }
    }
}

/// One invocation in a fake sandbox.
struct Invocation {
    id: String,
    function: String,
    served: u64,
    request_id: String,
    payload: Value,
    out: Out,
    state: Arc<Mutex<AgentState>>,
    books: Arc<Mutex<Books>>,
    end: tokio::sync::mpsc::Sender<()>,
    default_run: Duration,
}

impl Invocation {
    async fn run(self) {
        let p = &self.payload;
        let run = p
            .get("sleep_ms")
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .unwrap_or(self.default_run);
        if let Some(line) = p.get("log").and_then(Value::as_str) {
            send(&self.out, &AgentMsg::Log, format!("{line}\n").as_bytes()).await;
        }
        tokio::time::sleep(run).await;
        self.done();
        if p.get("die").and_then(Value::as_bool) == Some(true) {
            lock(&self.state).oom = p.get("oom").and_then(Value::as_bool) == Some(true);
            let _ = self.end.send(()).await;
            close(&self.out).await;
            return;
        }
        if let Some(status) = p.get("exit").and_then(Value::as_str) {
            send(
                &self.out,
                &AgentMsg::RuntimeExit {
                    status: status.to_string(),
                },
                b"",
            )
            .await;
            let _ = self.end.send(()).await;
            close(&self.out).await;
            return;
        }
        if let Some(msg) = p.get("fail").and_then(Value::as_str) {
            let doc = json!({"errorMessage": msg, "errorType": "Fake"}).to_string();
            send(
                &self.out,
                &AgentMsg::FunctionError {
                    request_id: self.request_id.clone(),
                    error_type: "Fake".into(),
                },
                doc.as_bytes(),
            )
            .await;
            return;
        }
        let body = json!({
            "sandbox": self.id,
            "function": self.function,
            "served": self.served,
        })
        .to_string();
        send(
            &self.out,
            &AgentMsg::Response {
                request_id: self.request_id.clone(),
            },
            body.as_bytes(),
        )
        .await;
    }

    /// The invocation stopped running (before its answer is written: the pool may hand the
    /// sandbox to the next invocation as soon as it reads the answer).
    fn done(&self) {
        lock(&self.state).busy = false;
        let mut b = lock(&self.books);
        b.counts.running -= 1;
        if let Some(n) = b.running_by_function.get_mut(&self.function) {
            *n -= 1;
        }
    }
}

async fn close(out: &Out) {
    let mut w = out.lock().await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut *w).await;
}
