//! Front ends and workers as separate processes.
//!
//! A worker process serves its [`Invoker`] (the sandbox pool) to front ends over the cluster's
//! authenticated frames ([`serve_worker`]). A front end's invoker is a [`RemoteInvoker`]: it
//! takes a lease from the assignment service (warm: a sandbox on a known worker; cold: the
//! partition's leader places a new one), runs the invocation on that worker, streaming its log
//! back, and returns the lease. Concurrency limits are therefore the assignment service's,
//! across every front end and worker.
//!
//! Failures are explicit. A worker that cannot be reached before the invocation was sent is
//! skipped (the lease is returned as dead and placement avoids that worker; at most
//! [`ATTEMPTS`] tries). A worker that fails while the invocation runs ends it with a function
//! error that says so: it is never run again behind the caller's back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hearth_core::invoker::{
    FunctionSpec, InvokeError, InvokeRequest, InvokeResult, Invoker, LogSink, LogTarget,
    ResponseSink, ResponseTarget,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::client::{Client, ClientError, Placed};
use crate::net::{Conn, NetError, Secret};
use crate::partition::{Command, FnKey, LeaseId, Limits, Response, ThrottleReason};

/// What the front end's invoker needs of the assignment service: over the network
/// ([`Client`]), or in the same process ([`crate::node::Node`], for `hearth up`).
#[async_trait::async_trait]
pub trait Assignment: Send + Sync + 'static {
    fn partitions(&self) -> u32;
    fn partition_of(&self, function: &str) -> u32 {
        crate::partition_of(function, self.partitions())
    }
    async fn call(&self, p: u32, cmd: Command) -> Result<Response, ClientError>;
    async fn place(
        &self,
        p: u32,
        lease: LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    ) -> Result<Placed, ClientError>;
    async fn fleet(&self) -> Result<Vec<crate::fleet::WorkerReport>, ClientError>;
}

#[async_trait::async_trait]
impl Assignment for Client {
    fn partitions(&self) -> u32 {
        Client::partitions(self)
    }
    async fn call(&self, p: u32, cmd: Command) -> Result<Response, ClientError> {
        Client::call(self, p, cmd).await
    }
    async fn place(
        &self,
        p: u32,
        lease: LeaseId,
        memory_mb: u32,
        locality: Vec<String>,
        avoid: Vec<String>,
    ) -> Result<Placed, ClientError> {
        Client::place(self, p, lease, memory_mb, locality, avoid).await
    }
    async fn fleet(&self) -> Result<Vec<crate::fleet::WorkerReport>, ClientError> {
        Client::fleet(self).await
    }
}

/// Tries of one invocation when the worker cannot be reached before it was sent.
pub const ATTEMPTS: usize = 3;

/// A front end's request to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerCall {
    Invoke(Box<RemoteInvoke>),
    Retire {
        function: String,
    },
    Forget {
        function_arn: String,
    },
    ForgetVersion {
        function_arn: String,
        version: String,
    },
    Prepare(Box<FunctionSpec>),
}

/// One invocation, as sent to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoteInvoke {
    pub request_id: String,
    pub spec: FunctionSpec,
    pub invoked_arn: String,
    /// Base64.
    pub payload: String,
    pub client_context: Option<String>,
    /// The caller takes a streamed response as it arrives (`StreamStart` and `Chunk` answers).
    #[serde(default)]
    pub stream: bool,
}

/// A worker's answers: for an invocation, any number of `Log` frames (and, when the front end
/// asked for a stream and the function streams, one `StreamStart` and `Chunk`s), then `Done`
/// or `Failed`.
#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerAnswer {
    /// A piece of the invocation's log (base64), as the worker produced it.
    Log(String),
    /// The function started a streamed response with this `Content-Type`.
    StreamStart(Option<String>),
    /// The next bytes of a streamed response (base64).
    Chunk(String),
    Done {
        /// Base64.
        payload: String,
        function_error: bool,
        log: String,
    },
    Failed(WireError),
    Prepared(Result<(), String>),
    Ok,
}

/// An [`InvokeError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireError {
    TooManyRequests(String),
    NotReady(String),
    Service(String),
}

impl From<InvokeError> for WireError {
    fn from(e: InvokeError) -> Self {
        match e {
            InvokeError::TooManyRequests { reason } => WireError::TooManyRequests(reason),
            InvokeError::NotReady(m) => WireError::NotReady(m),
            InvokeError::NotLeader { .. } => WireError::Service(e.to_string()),
            InvokeError::Service(m) => WireError::Service(m),
        }
    }
}

impl From<WireError> for InvokeError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::TooManyRequests(reason) => InvokeError::TooManyRequests { reason },
            WireError::NotReady(m) => InvokeError::NotReady(m),
            WireError::Service(m) => InvokeError::Service(m),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("bad base64 from the peer: {e}"))
}

/// Log pieces of one invocation, from the pool's sink to the connection.
struct ChannelSink(mpsc::UnboundedSender<Vec<u8>>);

impl LogSink for ChannelSink {
    fn write(&self, bytes: &[u8]) {
        let _ = self.0.send(bytes.to_vec());
    }
}

/// A streamed response's pieces, from the pool's sink to the connection.
enum StreamPiece {
    Start(Option<String>),
    Chunk(Vec<u8>),
}

struct ChannelResponse(mpsc::UnboundedSender<StreamPiece>);

impl ResponseSink for ChannelResponse {
    fn start(&self, content_type: Option<&str>) {
        let _ = self
            .0
            .send(StreamPiece::Start(content_type.map(str::to_string)));
    }
    fn chunk(&self, bytes: &[u8]) {
        let _ = self.0.send(StreamPiece::Chunk(bytes.to_vec()));
    }
}

impl StreamPiece {
    fn answer(self) -> WorkerAnswer {
        match self {
            StreamPiece::Start(content_type) => WorkerAnswer::StreamStart(content_type),
            StreamPiece::Chunk(bytes) => WorkerAnswer::Chunk(b64(&bytes)),
        }
    }
}

/// Serves `invoker` to front ends on `listener` (each connection authenticated with the
/// cluster secret). Runs until the task is dropped.
pub async fn serve_worker(listener: TcpListener, secret: Secret, invoker: Arc<dyn Invoker>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a front end: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (secret, invoker) = (secret.clone(), invoker.clone());
        tokio::spawn(async move {
            let mut conn = match Conn::accept(stream, &secret).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("a connection was refused: {e}");
                    return;
                }
            };
            while let Ok(call) = conn.recv::<WorkerCall>().await {
                if answer(&mut conn, call, &invoker).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn answer(
    conn: &mut Conn,
    call: WorkerCall,
    invoker: &Arc<dyn Invoker>,
) -> Result<(), NetError> {
    match call {
        WorkerCall::Invoke(ri) => {
            let payload = match unb64(&ri.payload) {
                Ok(p) => p,
                Err(m) => {
                    return conn
                        .send(&WorkerAnswer::Failed(WireError::Service(m)))
                        .await;
                }
            };
            let (tx, mut logs) = mpsc::unbounded_channel();
            let (stream_tx, mut stream) = mpsc::unbounded_channel();
            let response = ri
                .stream
                .then(|| ResponseTarget(Arc::new(ChannelResponse(stream_tx))));
            let req = InvokeRequest {
                request_id: ri.request_id,
                spec: ri.spec,
                invoked_arn: ri.invoked_arn,
                payload: payload.into(),
                client_context: ri.client_context,
                // Limits were enforced by the assignment service when the lease was taken.
                reserved_concurrency: None,
                unreserved_limit: u32::MAX,
                log: Some(LogTarget(Arc::new(ChannelSink(tx)))),
                response,
            };
            // The invocation runs to its end even if the front end goes away.
            let (done_tx, mut done) = oneshot::channel();
            let inv = invoker.clone();
            tokio::spawn(async move {
                let _ = done_tx.send(inv.invoke(req).await);
            });
            let result = loop {
                tokio::select! {
                    biased;
                    Some(piece) = logs.recv() => conn.send(&WorkerAnswer::Log(b64(&piece))).await?,
                    Some(piece) = stream.recv() => conn.send(&piece.answer()).await?,
                    r = &mut done => break r,
                }
            };
            while let Ok(piece) = logs.try_recv() {
                conn.send(&WorkerAnswer::Log(b64(&piece))).await?;
            }
            while let Ok(piece) = stream.try_recv() {
                conn.send(&piece.answer()).await?;
            }
            let answer = match result {
                Ok(Ok(r)) => WorkerAnswer::Done {
                    payload: b64(&r.payload),
                    function_error: r.function_error,
                    log: r.log,
                },
                Ok(Err(e)) => WorkerAnswer::Failed(e.into()),
                Err(_) => {
                    WorkerAnswer::Failed(WireError::Service("the invocation task ended".into()))
                }
            };
            conn.send(&answer).await
        }
        WorkerCall::Retire { function } => {
            invoker.retire(&function);
            conn.send(&WorkerAnswer::Ok).await
        }
        WorkerCall::Forget { function_arn } => {
            invoker.forget(&function_arn);
            conn.send(&WorkerAnswer::Ok).await
        }
        WorkerCall::ForgetVersion {
            function_arn,
            version,
        } => {
            invoker.forget_version(&function_arn, &version);
            conn.send(&WorkerAnswer::Ok).await
        }
        WorkerCall::Prepare(spec) => {
            let r = invoker.prepare(*spec).await;
            conn.send(&WorkerAnswer::Prepared(r)).await
        }
    }
}

/// How a front end's [`RemoteInvoker`] behaves.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Names this front end in leases.
    pub holder: String,
    /// How long an idle sandbox stays leasable after an invocation (the workers' keep-alive).
    pub keep_alive: Duration,
    /// Connecting to a worker (handshake included).
    pub connect_timeout: Duration,
    /// Whether sandboxes restored from snapshots keep network access (as the workers' engine
    /// reports; the front end states it in SnapStart versions' configuration).
    pub snapshots_keep_network: bool,
    /// How long the front end keeps a lease after an invocation for the next invocation of the
    /// same function version, which then journals nothing (zero: every invocation acquires and
    /// releases). A held lease counts against the function's concurrency; functions with
    /// reserved concurrency never hold.
    pub lease_hold: Duration,
    /// Each function's scaling rate, enforced by its partition across every front end.
    pub burst: Option<crate::partition::BurstLimit>,
    /// Hold leases of functions with reserved concurrency too: right for the only front end
    /// (`hearth up`), where a throttle first returns this front end's held leases of the
    /// function; with several front ends one's held lease could throttle another's call.
    pub hold_reserved: bool,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            holder: "frontend".into(),
            keep_alive: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(2),
            snapshots_keep_network: false,
            lease_hold: Duration::ZERO,
            burst: None,
            hold_reserved: false,
        }
    }
}

/// A lease the front end holds between invocations (see [`RemoteConfig::lease_hold`]).
struct Held {
    p: u32,
    lease: LeaseId,
    worker: String,
    addr: String,
    /// When the lease expires, by this process's clock (conservative: from before the acquire).
    expires: Instant,
    idle_since: Instant,
    /// Counted against the account's unreserved pool (the function had no reservation).
    unreserved: bool,
    /// The limits it was taken under: a held lease serves only calls under the same limits
    /// (a changed reservation goes through the assignment service again).
    limits: Limits,
}

type HeldMap = HashMap<(String, String), Vec<Held>>;

/// A front end's invoker over the assignment service and remote workers.
pub struct RemoteInvoker {
    client: Arc<dyn Assignment>,
    /// `hearth up`: the one worker is this process's pool, called directly.
    local: Option<Arc<dyn Invoker>>,
    secret: Secret,
    cfg: RemoteConfig,
    /// Worker id -> address, from the fleet; refreshed when a lease names an unknown worker.
    workers: Mutex<(BTreeMap<String, String>, Option<Instant>)>,
    /// Idle connections per worker id (a restarted worker has a new id, so none of these
    /// belongs to an earlier run of a process).
    conns: Mutex<HashMap<String, Vec<Conn>>>,
    /// Leases held between invocations, per (function, revision), most recent last.
    held: Arc<Mutex<HeldMap>>,
    reaper: std::sync::atomic::AtomicBool,
}

/// How an attempt on a worker ended.
enum Attempt {
    Finished(Result<InvokeResult, InvokeError>),
    /// Nothing was sent: the worker could not be reached.
    Unreachable(String),
}

fn assignment_down(e: ClientError) -> InvokeError {
    InvokeError::NotReady(format!("the assignment service is unavailable: {e}"))
}

fn throttle_reason(r: ThrottleReason) -> &'static str {
    match r {
        ThrottleReason::ReservedFunctionConcurrency
        | ThrottleReason::ReservedFunctionConcurrencyZero => {
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        }
        ThrottleReason::AccountConcurrency => "ConcurrentInvocationLimitExceeded",
        ThrottleReason::FunctionScalingRate => "FunctionInvocationRateLimitExceeded",
    }
}

/// The function error a caller gets when the worker running its invocation is lost.
pub fn worker_lost(worker: &str, why: &str) -> InvokeResult {
    let doc = serde_json::json!({
        "errorType": "Runtime.WorkerLost",
        "errorMessage": format!(
            "the worker running this invocation ({worker}) stopped answering ({why}); \
             the invocation may or may not have completed and was not retried"
        ),
    });
    InvokeResult {
        payload: doc.to_string().into_bytes(),
        function_error: true,
        log: String::new(),
    }
}

/// Journals `Started` (when the sandbox was new) and `Release`.
async fn release_lease(
    client: &dyn Assignment,
    p: u32,
    lease: LeaseId,
    started: bool,
    healthy: bool,
    keep_alive_ms: u64,
) {
    let now_ms = 0;
    if started && let Err(e) = client.call(p, Command::Started { lease, now_ms }).await {
        tracing::warn!(lease = lease.0, "recording a started sandbox: {e}");
    }
    let cmd = Command::Release {
        lease,
        healthy,
        keep_alive_ms,
        now_ms,
    };
    match client.call(p, cmd).await {
        Ok(Response::Ok) => {}
        // The lease ended meanwhile (its worker was declared dead, or it expired).
        Ok(other) => tracing::info!(lease = lease.0, "release: {other:?}"),
        Err(e) => tracing::warn!(lease = lease.0, "release (the lease will expire): {e}"),
    }
}

/// The locality keys of a spec (see [`crate::placement::locality_keys`]).
pub fn spec_locality(spec: &FunctionSpec) -> Vec<String> {
    let image = hearth_core::runtimes::lookup(&spec.runtime)
        .map(|r| r.image)
        .unwrap_or(spec.runtime.as_str());
    crate::placement::locality_keys(&spec.code_sha256, image, None)
}

impl RemoteInvoker {
    pub fn new(client: Arc<Client>, secret: Secret, cfg: RemoteConfig) -> Self {
        Self::with_assignment(client, None, secret, cfg)
    }

    /// The invoker of `hearth up`: the assignment service's node and the worker pool both in
    /// this process, no network in between.
    pub fn embedded(
        node: Arc<crate::node::Node>,
        worker: Arc<dyn Invoker>,
        cfg: RemoteConfig,
    ) -> Self {
        Self::with_assignment(node, Some(worker), Secret::new(b"embedded: no peers"), cfg)
    }

    fn with_assignment(
        client: Arc<dyn Assignment>,
        local: Option<Arc<dyn Invoker>>,
        secret: Secret,
        cfg: RemoteConfig,
    ) -> Self {
        Self {
            client,
            local,
            secret,
            cfg,
            workers: Mutex::new((BTreeMap::new(), None)),
            conns: Mutex::new(HashMap::new()),
            held: Arc::new(Mutex::new(HashMap::new())),
            reaper: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A held lease of this revision that has at least half its time to live left.
    fn take_held(&self, key: &(String, String), ttl: Duration) -> Option<Held> {
        let mut map = self.held.lock().ok()?;
        let list = map.get_mut(key)?;
        let now = Instant::now();
        // Leases too close to expiry are released; the most recent usable one is taken.
        let mut stale = Vec::new();
        let mut found = None;
        while let Some(h) = list.pop() {
            if h.expires.saturating_duration_since(now) > ttl / 2 {
                found = Some(h);
                break;
            }
            stale.push(h);
        }
        if list.is_empty() {
            map.remove(key);
        }
        drop(map);
        for h in stale {
            self.release_later(h);
        }
        found
    }

    /// Returns every held lease (at shutdown: a lease left held would count against its
    /// function's concurrency until it expires).
    pub async fn release_held(&self) {
        self.release_held_where(|_, _| true).await;
    }

    /// Returns the held leases `pick` chooses (by (function, revision) and lease); answers how
    /// many.
    async fn release_held_where(&self, pick: impl Fn(&(String, String), &Held) -> bool) -> usize {
        let chosen: Vec<Held> = match self.held.lock() {
            Ok(mut map) => {
                let mut chosen = Vec::new();
                for (k, list) in map.iter_mut() {
                    let (take, keep): (Vec<Held>, Vec<Held>) =
                        std::mem::take(list).into_iter().partition(|h| pick(k, h));
                    *list = keep;
                    chosen.extend(take);
                }
                map.retain(|_, l| !l.is_empty());
                chosen
            }
            Err(_) => return 0,
        };
        let n = chosen.len();
        for h in chosen {
            self.release(h.p, h.lease, false, true).await;
        }
        n
    }

    /// Keeps a lease for the next invocation of the revision; starts the reaper that releases
    /// leases held longer than the hold period.
    fn hold(&self, key: (String, String), h: Held) {
        if let Ok(mut map) = self.held.lock() {
            map.entry(key).or_default().push(h);
        }
        if self.reaper.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let held = Arc::downgrade(&self.held);
        let (client, hold) = (self.client.clone(), self.cfg.lease_hold);
        let keep_alive_ms = self.cfg.keep_alive.as_millis() as u64;
        tokio::spawn(async move {
            let every = (hold / 2).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(every).await;
                let Some(held) = held.upgrade() else { return };
                let due: Vec<Held> = match held.lock() {
                    Ok(mut map) => {
                        let mut due = Vec::new();
                        for list in map.values_mut() {
                            let (old, keep): (Vec<Held>, Vec<Held>) = std::mem::take(list)
                                .into_iter()
                                .partition(|h| h.idle_since.elapsed() >= hold);
                            *list = keep;
                            due.extend(old);
                        }
                        map.retain(|_, l| !l.is_empty());
                        due
                    }
                    Err(_) => return,
                };
                for h in due {
                    release_lease(client.as_ref(), h.p, h.lease, false, true, keep_alive_ms).await;
                }
            }
        });
    }

    fn release_later(&self, h: Held) {
        let client = self.client.clone();
        let keep_alive_ms = self.cfg.keep_alive.as_millis() as u64;
        tokio::spawn(async move {
            release_lease(client.as_ref(), h.p, h.lease, false, true, keep_alive_ms).await;
        });
    }

    /// The address of worker `id`, asking the fleet when it is not known.
    async fn worker_addr(&self, id: &str) -> Option<String> {
        let stale = {
            let w = self.workers.lock().ok()?;
            if let Some(a) = w.0.get(id) {
                return Some(a.clone());
            }
            w.1.is_none_or(|t| t.elapsed() > Duration::from_millis(200))
        };
        if stale && let Ok(fleet) = self.client.fleet().await {
            let mut w = self.workers.lock().ok()?;
            w.0 = fleet.into_iter().map(|r| (r.id, r.addr)).collect();
            w.1 = Some(Instant::now());
        }
        self.workers.lock().ok()?.0.get(id).cloned()
    }

    async fn conn(&self, worker: &str, addr: &str) -> Result<Conn, NetError> {
        let pooled = self
            .conns
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(worker).and_then(Vec::pop));
        match pooled {
            Some(c) => Ok(c),
            None => Conn::connect(addr, &self.secret, self.cfg.connect_timeout).await,
        }
    }

    fn put_back(&self, worker: &str, conn: Conn) {
        if let Ok(mut m) = self.conns.lock() {
            let v = m.entry(worker.to_string()).or_default();
            if v.len() < 32 {
                v.push(conn);
            }
        }
    }

    /// Runs `req` on `worker`, streaming its log into the request's sink.
    async fn run_on(&self, worker: &str, addr: &str, req: &InvokeRequest) -> Attempt {
        if let Some(local) = &self.local {
            let mut req = req.clone();
            // The lease was the admission.
            req.reserved_concurrency = None;
            req.unreserved_limit = u32::MAX;
            return Attempt::Finished(local.invoke(req).await);
        }
        let mut conn = match self.conn(worker, addr).await {
            Ok(c) => c,
            Err(e) => return Attempt::Unreachable(e.to_string()),
        };
        let call = WorkerCall::Invoke(Box::new(RemoteInvoke {
            request_id: req.request_id.clone(),
            spec: req.spec.clone(),
            invoked_arn: req.invoked_arn.clone(),
            payload: b64(&req.payload),
            client_context: req.client_context.clone(),
            stream: req.response.is_some(),
        }));
        if let Err(e) = conn.send(&call).await {
            return Attempt::Finished(Ok(worker_lost(worker, &e.to_string())));
        }
        // The worker enforces the function's timeout; this bound only catches a worker that
        // hangs (init, the timeout and a margin).
        let bound = Duration::from_secs(u64::from(req.spec.timeout_s) + 10 + 30);
        let until = Instant::now() + bound;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let got = tokio::time::timeout(left, conn.recv::<WorkerAnswer>()).await;
            let answer = match got {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return Attempt::Finished(Ok(worker_lost(worker, &e.to_string()))),
                Err(_) => {
                    return Attempt::Finished(Ok(worker_lost(
                        worker,
                        &format!("no answer within {}s", bound.as_secs()),
                    )));
                }
            };
            match answer {
                WorkerAnswer::Log(piece) => {
                    if let (Some(sink), Ok(bytes)) = (&req.log, unb64(&piece)) {
                        sink.0.write(&bytes);
                    }
                }
                WorkerAnswer::StreamStart(content_type) => {
                    if let Some(sink) = &req.response {
                        sink.0.start(content_type.as_deref());
                    }
                }
                WorkerAnswer::Chunk(piece) => match (&req.response, unb64(&piece)) {
                    (Some(sink), Ok(bytes)) => sink.0.chunk(&bytes),
                    // Bytes the caller cannot get: the response is broken.
                    (_, Err(m)) => return Attempt::Finished(Ok(worker_lost(worker, &m))),
                    (None, Ok(_)) => {}
                },
                WorkerAnswer::Done {
                    payload,
                    function_error,
                    log,
                } => {
                    self.put_back(worker, conn);
                    return Attempt::Finished(match unb64(&payload) {
                        Ok(payload) => Ok(InvokeResult {
                            payload,
                            function_error,
                            log,
                        }),
                        Err(m) => Err(InvokeError::Service(m)),
                    });
                }
                WorkerAnswer::Failed(e) => {
                    self.put_back(worker, conn);
                    return Attempt::Finished(Err(e.into()));
                }
                other => {
                    return Attempt::Finished(Err(InvokeError::Service(format!(
                        "unexpected answer from worker {worker}: {other:?}"
                    ))));
                }
            }
        }
    }

    async fn release(&self, p: u32, lease: LeaseId, started: bool, healthy: bool) {
        let keep_alive_ms = self.cfg.keep_alive.as_millis() as u64;
        release_lease(
            self.client.as_ref(),
            p,
            lease,
            started,
            healthy,
            keep_alive_ms,
        )
        .await;
    }

    /// Sends `call` to every live worker, in the background.
    fn broadcast(&self, call: impl Fn() -> WorkerCall + Send + 'static) {
        if let Some(local) = &self.local {
            match call() {
                WorkerCall::Retire { function } => local.retire(&function),
                WorkerCall::Forget { function_arn } => local.forget(&function_arn),
                WorkerCall::ForgetVersion {
                    function_arn,
                    version,
                } => local.forget_version(&function_arn, &version),
                WorkerCall::Invoke(_) | WorkerCall::Prepare(_) => {}
            }
            return;
        }
        let (client, secret, timeout) = (
            self.client.clone(),
            self.secret.clone(),
            self.cfg.connect_timeout,
        );
        tokio::spawn(async move {
            let Ok(fleet) = client.fleet().await else {
                return;
            };
            for w in fleet {
                match Conn::connect(&w.addr, &secret, timeout).await {
                    Ok(mut c) => {
                        let r: Result<WorkerAnswer, _> = c.call(&call(), timeout * 5).await;
                        if let Err(e) = r {
                            tracing::warn!(worker = %w.id, "telling the worker: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(worker = %w.id, "telling the worker: {e}"),
                }
            }
        });
    }
}

#[async_trait::async_trait]
impl Invoker for RemoteInvoker {
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        let spec = &req.spec;
        let p = self.client.partition_of(&spec.name);
        let limits = Limits {
            reserved: req.reserved_concurrency,
            unreserved: req
                .unreserved_limit
                .div_ceil(self.client.partitions().max(1)),
            burst: self.cfg.burst,
        };
        // Init (at most 10 s), the timeout, and a margin: the lease outlives the invocation.
        let lease_ttl_ms = (u64::from(spec.timeout_s) + 10 + 30) * 1000;
        let ttl = Duration::from_millis(lease_ttl_ms);
        let unreserved = req.reserved_concurrency.is_none();
        let holding = !self.cfg.lease_hold.is_zero() && (unreserved || self.cfg.hold_reserved);
        let mut freed_held = false;
        let key = (spec.name.clone(), spec.revision_id.clone());
        let mut avoid: Vec<String> = Vec::new();
        let mut last = String::new();
        // A lease this front end held since the last invocation: no journal write at all.
        let held = if holding {
            self.take_held(&key, ttl)
        } else {
            None
        };
        let held = match held {
            Some(h) if h.limits != limits => {
                self.release(h.p, h.lease, false, true).await;
                None
            }
            other => other,
        };
        if let Some(h) = held {
            match self.run_on(&h.worker, &h.addr, &req).await {
                Attempt::Finished(Ok(res)) if !res.function_error => {
                    self.hold(
                        key,
                        Held {
                            idle_since: Instant::now(),
                            ..h
                        },
                    );
                    return Ok(res);
                }
                Attempt::Finished(r) => {
                    self.release(h.p, h.lease, false, false).await;
                    return r;
                }
                Attempt::Unreachable(why) => {
                    self.release(h.p, h.lease, false, false).await;
                    last = format!("worker {} at {}: {why}", h.worker, h.addr);
                    avoid.push(h.worker);
                }
            }
        }
        for _ in 0..ATTEMPTS {
            let asked = Instant::now();
            let acquire = Command::Acquire {
                key: FnKey {
                    function: spec.name.clone(),
                    revision: spec.revision_id.clone(),
                },
                memory_mb: spec.memory_mb,
                holder: self.cfg.holder.clone(),
                limits,
                now_ms: 0,
                lease_ttl_ms,
                // The client may send it twice (a lost reply, a new leader): one lease.
                request: Some(format!("{:032x}", rand::random::<u128>())),
            };
            let (lease, worker, addr, cold) = match self
                .client
                .call(p, acquire)
                .await
                .map_err(assignment_down)?
            {
                Response::Throttled { reason } => {
                    // Leases this front end holds idle may be what is in the way: return
                    // them and ask once more.
                    if !freed_held {
                        freed_held = true;
                        let function = spec.name.clone();
                        let freed = self
                            .release_held_where(|k, h| match reason {
                                ThrottleReason::ReservedFunctionConcurrency
                                | ThrottleReason::ReservedFunctionConcurrencyZero => {
                                    k.0 == function
                                }
                                ThrottleReason::AccountConcurrency => h.unreserved,
                                ThrottleReason::FunctionScalingRate => false,
                            })
                            .await;
                        if freed > 0 {
                            continue;
                        }
                    }
                    return Err(InvokeError::TooManyRequests {
                        reason: throttle_reason(reason).into(),
                    });
                }
                Response::Leased { lease, worker, .. } => match self.worker_addr(&worker).await {
                    Some(addr) => (lease, worker, addr, false),
                    None => {
                        // Not in the fleet any more: that sandbox is gone.
                        self.release(p, lease, false, false).await;
                        last = format!("worker {worker} is not in the fleet");
                        continue;
                    }
                },
                Response::Place { lease, .. } => {
                    let placed = self
                        .client
                        .place(p, lease, spec.memory_mb, spec_locality(spec), avoid.clone())
                        .await;
                    match placed {
                        Ok(Placed::Worker { id, addr }) => (lease, id, addr, true),
                        Ok(Placed::NoWorker(why)) => {
                            self.release(p, lease, false, false).await;
                            return Err(InvokeError::NotReady(format!(
                                "no worker can start this function now: {why}"
                            )));
                        }
                        Ok(Placed::Rejected(why)) => {
                            last = why;
                            continue;
                        }
                        Err(e) => {
                            self.release(p, lease, false, false).await;
                            return Err(assignment_down(e));
                        }
                    }
                }
                other => {
                    return Err(InvokeError::Service(format!(
                        "unexpected answer to a lease request: {other:?}"
                    )));
                }
            };
            match self.run_on(&worker, &addr, &req).await {
                Attempt::Unreachable(why) => {
                    tracing::warn!(%worker, %addr, "worker unreachable, trying another: {why}");
                    self.release(p, lease, cold, false).await;
                    last = format!("worker {worker} at {addr}: {why}");
                    avoid.push(worker);
                }
                Attempt::Finished(r) => {
                    let healthy = matches!(&r, Ok(res) if !res.function_error);
                    if healthy && holding {
                        if cold {
                            let _ = self
                                .client
                                .call(p, Command::Started { lease, now_ms: 0 })
                                .await;
                        }
                        self.hold(
                            key,
                            Held {
                                p,
                                lease,
                                worker,
                                addr,
                                expires: asked + ttl,
                                idle_since: Instant::now(),
                                unreserved,
                                limits,
                            },
                        );
                        return r;
                    }
                    self.release(p, lease, cold && r.is_ok(), healthy).await;
                    return r;
                }
            }
        }
        Err(InvokeError::NotReady(format!(
            "no worker could take the invocation after {ATTEMPTS} tries (last: {last})"
        )))
    }

    fn retire(&self, function_name: &str) {
        let function = function_name.to_string();
        self.broadcast(move || WorkerCall::Retire {
            function: function.clone(),
        });
    }

    fn forget(&self, function_arn: &str) {
        let arn = function_arn.to_string();
        self.broadcast(move || WorkerCall::Forget {
            function_arn: arn.clone(),
        });
    }

    fn forget_version(&self, function_arn: &str, version: &str) {
        let (arn, version) = (function_arn.to_string(), version.to_string());
        self.broadcast(move || WorkerCall::ForgetVersion {
            function_arn: arn.clone(),
            version: version.clone(),
        });
    }

    fn snapshots_keep_network(&self) -> bool {
        self.cfg.snapshots_keep_network
    }

    /// A snapshot is taken on the live worker with the most free memory; it goes to the chunk
    /// store, from which every worker restores.
    async fn prepare(&self, spec: FunctionSpec) -> Result<(), String> {
        if let Some(local) = &self.local {
            return local.prepare(spec).await;
        }
        let fleet = self
            .client
            .fleet()
            .await
            .map_err(|e| format!("the assignment service is unavailable: {e}"))?;
        let Some(w) = fleet.iter().max_by_key(|w| w.memory_free_mb) else {
            return Err("no worker is registered".into());
        };
        let mut conn = Conn::connect(&w.addr, &self.secret, self.cfg.connect_timeout)
            .await
            .map_err(|e| format!("worker {}: {e}", w.id))?;
        let answer: WorkerAnswer = conn
            .call(
                &WorkerCall::Prepare(Box::new(spec)),
                Duration::from_secs(600),
            )
            .await
            .map_err(|e| format!("worker {}: {e}", w.id))?;
        match answer {
            WorkerAnswer::Prepared(r) => r,
            other => Err(format!("unexpected answer from worker {}: {other:?}", w.id)),
        }
    }
}
