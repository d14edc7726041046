//! Front end and workers over the network, with fake sandboxes: a one-node assignment service,
//! two workers serving a fake invoker over real TCP, and a RemoteInvoker. Leases and placement
//! are the real ones; what runs on the workers is a stand-in that records what it saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_assign::client::Client;
use hearth_assign::fleet::WorkerReport;
use hearth_assign::net::Secret;
use hearth_assign::node::{Node, NodeConfig, Timing};
use hearth_assign::remote::{RemoteConfig, RemoteInvoker, serve_worker};
use hearth_core::invoker::{
    FunctionSpec, InvokeError, InvokeRequest, InvokeResult, Invoker, LogSink, LogTarget,
    ResponseSink, ResponseTarget,
};
use tokio::net::TcpListener;

const SECRET: &[u8] = b"remote test cluster secret";

/// A worker that answers `{"worker": NAME, "payload": ...}` after `delay_ms` from the payload,
/// logging two lines, and records the most invocations it ran at once per function.
struct FakeWorker {
    name: String,
    running: AtomicU32,
    most: AtomicU32,
    calls: AtomicUsize,
    retired: Mutex<Vec<String>>,
}

impl FakeWorker {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(FakeWorker {
            name: name.into(),
            running: AtomicU32::new(0),
            most: AtomicU32::new(0),
            calls: AtomicUsize::new(0),
            retired: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait::async_trait]
impl Invoker for FakeWorker {
    async fn invoke(&self, req: InvokeRequest) -> Result<InvokeResult, InvokeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        if let Some(log) = &req.log {
            log.0
                .write(format!("START {}\n", req.request_id).as_bytes());
        }
        let v: serde_json::Value = serde_json::from_slice(&req.payload).unwrap_or_default();
        let delay = v["delay_ms"].as_u64().unwrap_or(0);
        // `"stream": [...]`: the strings as a streamed response, to the sink when there is one.
        if let (Some(chunks), Some(sink)) = (v["stream"].as_array(), &req.response) {
            sink.0.start(Some("text/plain"));
            for c in chunks {
                sink.0.chunk(c.as_str().unwrap_or_default().as_bytes());
            }
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if let Some(log) = &req.log {
            log.0.write(format!("END {}\n", req.request_id).as_bytes());
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        let body = serde_json::json!({"worker": self.name, "payload": v});
        Ok(InvokeResult {
            payload: body.to_string().into_bytes(),
            function_error: false,
            log: String::new(),
        })
    }

    fn retire(&self, function_name: &str) {
        if let Ok(mut r) = self.retired.lock() {
            r.push(function_name.to_string());
        }
    }
}

/// What a response sink received, in order.
#[derive(Default)]
struct Chunks(Mutex<Vec<String>>);

impl ResponseSink for Chunks {
    fn start(&self, content_type: Option<&str>) {
        if let Ok(mut v) = self.0.lock() {
            v.push(format!("start {}", content_type.unwrap_or("-")));
        }
    }
    fn chunk(&self, bytes: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.push(String::from_utf8_lossy(bytes).into_owned());
        }
    }
}

struct Sink(Mutex<Vec<u8>>);

impl LogSink for Sink {
    fn write(&self, bytes: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(bytes);
        }
    }
}

fn spec(name: &str) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        version: "$LATEST".into(),
        arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
        runtime: "python3.11".into(),
        handler: "app.handler".into(),
        memory_mb: 128,
        timeout_s: 3,
        env: BTreeMap::new(),
        code_sha256: "c2hh".into(),
        layers: Vec::new(),
        revision_id: "r1".into(),
        snap_start: false,
        ephemeral_storage_mb: 512,
        egress: false,
    }
}

fn request(name: &str, payload: serde_json::Value, reserved: Option<u32>) -> InvokeRequest {
    let mut req = InvokeRequest::new(spec(name), payload.to_string().into_bytes());
    req.request_id = format!("req-{}", rand_id());
    req.reserved_concurrency = reserved;
    req
}

fn rand_id() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst) as u64
}

/// A TCP relay in front of a worker that a test can cut, as a crash or a broken link would:
/// every relayed connection closes and new ones are refused.
struct Relay {
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(to: String) -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                let to = to.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                t.lock().expect("lock").push(conn);
            }
        });
        tasks.lock().expect("lock").push(accept);
        (Self { tasks }, addr)
    }

    fn cut(&self) {
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    client: Arc<Client>,
    workers: Vec<(Arc<FakeWorker>, String, Relay)>,
    beats: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(NodeConfig {
        id: 1,
        listen: "127.0.0.1:0".into(),
        advertise: None,
        data_dir: dir.path().join("node"),
        partitions: 2,
        secret: Secret::new(SECRET),
        timing: Timing {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
            tick_ms: 100,
            worker_dead_ms: 1_000,
        },
    })
    .await
    .expect("node");
    let members = BTreeMap::from([(1, node.addr().to_string())]);
    node.initialize(&members).await.expect("initialize");
    let client = Arc::new(Client::new(
        &[node.addr().to_string()],
        2,
        Secret::new(SECRET),
        Duration::from_secs(5),
    ));
    let mut workers = Vec::new();
    for name in ["wa", "wb"] {
        let fake = FakeWorker::new(name);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(serve_worker(listener, Secret::new(SECRET), fake.clone()));
        let (relay, relayed) = Relay::start(addr).await;
        workers.push((fake, relayed, relay));
    }
    let reports: Vec<WorkerReport> = workers
        .iter()
        .map(|(w, addr, _)| WorkerReport {
            id: format!("{}/1", w.name),
            addr: addr.clone(),
            memory_mb: 4096,
            memory_free_mb: 4096,
            memory_idle_mb: 0,
            cores: 2,
            busy: 0,
            sandboxes: 0,
            cached: Default::default(),
            idle: None,
        })
        .collect();
    let beats = {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                for r in &reports {
                    client.heartbeat(r, Duration::from_secs(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Until the leader is up and both workers are registered.
    for _ in 0..100 {
        if client.fleet().await.map(|f| f.len()).unwrap_or(0) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Setup {
        _dir: dir,
        node,
        client,
        workers,
        beats,
    }
}

fn invoker(s: &Setup) -> RemoteInvoker {
    RemoteInvoker::new(
        s.client.clone(),
        Secret::new(SECRET),
        RemoteConfig {
            holder: "fe-test".into(),
            ..Default::default()
        },
    )
}

fn worker_of(r: &InvokeResult) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
    v["worker"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_run_on_workers_warm_reuse_the_same_worker_and_logs_stream_back() {
    let s = setup().await;
    let inv = invoker(&s);
    let sink = Arc::new(Sink(Mutex::new(Vec::new())));
    let mut req = request("f", serde_json::json!({"n": 1}), None);
    req.log = Some(LogTarget(sink.clone()));
    let id = req.request_id.clone();
    let first = inv.invoke(req).await.expect("invoke");
    assert!(!first.function_error);
    let v: serde_json::Value = serde_json::from_slice(&first.payload).expect("json");
    assert_eq!(v["payload"]["n"], 1);
    let log = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf8");
    assert_eq!(log, format!("START {id}\nEND {id}\n"));
    // Warm: the sandbox is idle on the same worker, so the lease sends us there again.
    let w = worker_of(&first);
    for _ in 0..5 {
        let r = inv
            .invoke(request("f", serde_json::json!({}), None))
            .await
            .expect("invoke");
        assert_eq!(worker_of(&r), w);
    }
    let stats = s.node.status().await;
    let idle: u32 = stats.partitions.iter().map(|p| p.stats.idle).sum();
    assert_eq!(idle, 1, "one sandbox, idle again: {stats:?}");
    // Retire reaches every worker.
    inv.retire("f");
    for _ in 0..50 {
        if s.workers
            .iter()
            .all(|(w, ..)| !w.retired.lock().expect("lock").is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (w, ..) in &s.workers {
        assert_eq!(*w.retired.lock().expect("lock"), vec!["f".to_string()]);
    }
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_concurrency_holds_across_workers_and_concurrent_sandboxes_spread() {
    let s = setup().await;
    let inv = Arc::new(invoker(&s));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let inv = inv.clone();
        tasks.push(tokio::spawn(async move {
            inv.invoke(request("g", serde_json::json!({"delay_ms": 400}), Some(2)))
                .await
        }));
    }
    let (mut ok, mut throttled) = (0, 0);
    let mut on = std::collections::BTreeSet::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => {
                ok += 1;
                on.insert(worker_of(&r));
            }
            Err(InvokeError::TooManyRequests { reason }) => {
                assert_eq!(reason, "ReservedFunctionConcurrentInvocationLimitExceeded");
                throttled += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok, 2, "two leases at once, no more");
    assert_eq!(throttled, 6);
    assert_eq!(
        on.len(),
        2,
        "the two sandboxes went to different workers: {on:?}"
    );
    let most: u32 = s
        .workers
        .iter()
        .map(|(w, ..)| w.most.load(Ordering::SeqCst))
        .sum();
    assert!(
        most <= 2,
        "at most two ran at once over both workers ({most})"
    );
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_mid_invocation_is_a_clean_function_error_and_is_not_rerun() {
    let s = setup().await;
    let inv = Arc::new(invoker(&s));
    let slow = {
        let inv = inv.clone();
        tokio::spawn(async move {
            inv.invoke(request("h", serde_json::json!({"delay_ms": 2000}), None))
                .await
        })
    };
    // Wait until one worker runs it, then cut that worker off (as if it crashed).
    let victim = loop {
        if let Some(i) = s
            .workers
            .iter()
            .position(|(w, ..)| w.running.load(Ordering::SeqCst) > 0)
        {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    s.workers[victim].2.cut();
    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the caller is answered at once, not after the invocation's end")
        .expect("task")
        .expect("invoke");
    assert!(r.function_error);
    let doc: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
    assert_eq!(doc["errorType"], "Runtime.WorkerLost");
    assert!(
        doc["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("was not retried"),
        "{doc}"
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let calls: usize = s
        .workers
        .iter()
        .map(|(w, ..)| w.calls.load(Ordering::SeqCst))
        .sum();
    assert_eq!(calls, 1, "never re-run");
    // The victim cannot be reached: new cold starts (placed there or not, until it is declared
    // dead) end on the other worker.
    let other = 1 - victim;
    for _ in 0..3 {
        let r = inv
            .invoke(request("h2", serde_json::json!({}), None))
            .await
            .expect("invoke");
        assert_eq!(worker_of(&r), s.workers[other].0.name);
    }
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_serves_the_next_invocation_without_journal_writes_and_is_then_returned() {
    let s = setup().await;
    let inv = RemoteInvoker::new(
        s.client.clone(),
        Secret::new(SECRET),
        RemoteConfig {
            holder: "fe-hold".into(),
            lease_hold: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let applied = |st: &hearth_assign::node::NodeStatus| -> u64 {
        st.partitions.iter().filter_map(|p| p.last_applied).sum()
    };
    let first = inv
        .invoke(request("held", serde_json::json!({}), None))
        .await
        .expect("invoke");
    let w = worker_of(&first);
    let before = s.node.status().await;
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let r = inv
            .invoke(request("held", serde_json::json!({}), None))
            .await
            .expect("invoke");
        assert_eq!(worker_of(&r), w, "the same sandbox's worker");
    }
    let after = s.node.status().await;
    // Ticks are journaled too: one per partition every 100 ms while the loop ran (two
    // partitions here). Beyond those, ten invocations without the hold would add at least
    // twenty lease commands; with it, none.
    let periods = started.elapsed().as_millis() as u64 / 100 + 2;
    let ticks_allowed = periods * after.partitions.len() as u64;
    assert!(
        applied(&after) - applied(&before) <= ticks_allowed,
        "{} entries for ten held invocations",
        applied(&after) - applied(&before)
    );
    let leases: u32 = after.partitions.iter().map(|p| p.stats.leases).sum();
    assert_eq!(leases, 1, "the held lease counts");
    // Idle past the hold period, it is returned: the sandbox is idle in the service.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = s.node.status().await;
    let leases: u32 = later.partitions.iter().map(|p| p.stats.leases).sum();
    let idle: u32 = later.partitions.iter().map(|p| p.stats.idle).sum();
    assert_eq!((leases, idle), (0, 1), "{later:?}");
    // Functions with reserved concurrency never hold.
    inv.invoke(request("held-reserved", serde_json::json!({}), Some(1)))
        .await
        .expect("invoke");
    let st = s.node.status().await;
    let leases: u32 = st.partitions.iter().map(|p| p.stats.leases).sum();
    assert_eq!(leases, 0);
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaling_rate_holds_across_front_ends() {
    let s = setup().await;
    let cfg = RemoteConfig {
        burst: Some(hearth_assign::partition::BurstLimit {
            per_window: 2,
            window_ms: 60_000,
        }),
        ..Default::default()
    };
    // Two front ends, four concurrent calls that each need a new sandbox: two start, two are
    // refused with Lambda's reason.
    let fronts = [
        Arc::new(RemoteInvoker::new(
            s.client.clone(),
            Secret::new(SECRET),
            cfg.clone(),
        )),
        Arc::new(RemoteInvoker::new(
            s.client.clone(),
            Secret::new(SECRET),
            cfg,
        )),
    ];
    let mut tasks = Vec::new();
    for i in 0..4 {
        let inv = fronts[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            inv.invoke(request("burst", serde_json::json!({"delay_ms": 300}), None))
                .await
        }));
    }
    let mut reasons = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => reasons.push("ok".to_string()),
            Err(InvokeError::TooManyRequests { reason }) => reasons.push(reason),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "FunctionInvocationRateLimitExceeded",
            "FunctionInvocationRateLimitExceeded",
            "ok",
            "ok"
        ]
    );
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_invoker_leases_through_the_node_and_calls_its_worker_directly() {
    let s = setup().await;
    // The embedded form: the node itself is the assignment service, the fake its worker.
    let local = FakeWorker::new("local");
    // Only the local worker may be placed on: the network workers stop heartbeating.
    s.beats.abort();
    assert!(s.node.heartbeat(WorkerReport {
        id: "local/1".into(),
        addr: "in-process".into(),
        memory_mb: 4096,
        memory_free_mb: 4096,
        memory_idle_mb: 0,
        cores: 2,
        busy: 0,
        sandboxes: 0,
        cached: Default::default(),
        idle: None,
    }));
    let inv = RemoteInvoker::embedded(s.node.clone(), local.clone(), RemoteConfig::default());
    let r = inv
        .invoke(request("emb", serde_json::json!({"n": 7}), Some(1)))
        .await
        .expect("invoke");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
    assert_eq!(
        (v["worker"].as_str(), v["payload"]["n"].as_u64()),
        (Some("local"), Some(7))
    );
    assert_eq!(local.calls.load(Ordering::SeqCst), 1);
    assert!(
        s.workers
            .iter()
            .all(|(w, ..)| w.calls.load(Ordering::SeqCst) == 0),
        "nothing went over the network"
    );
    // The limit is the partition's: with reserved concurrency 1, a second concurrent call is
    // throttled although the fake would run it.
    let inv = Arc::new(inv);
    let slow = {
        let inv = inv.clone();
        tokio::spawn(async move {
            inv.invoke(request(
                "emb",
                serde_json::json!({"delay_ms": 500}),
                Some(1),
            ))
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = inv
        .invoke(request("emb", serde_json::json!({}), Some(1)))
        .await;
    assert!(
        matches!(&second, Err(InvokeError::TooManyRequests { reason }) if reason == "ReservedFunctionConcurrentInvocationLimitExceeded"),
        "{second:?}"
    );
    slow.await.expect("task").expect("invoke");
    inv.retire("emb");
    assert_eq!(
        *local.retired.lock().expect("lock"),
        vec!["emb".to_string()]
    );
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_first_returns_the_front_ends_own_held_leases() {
    let s = setup().await;
    let inv = RemoteInvoker::new(
        s.client.clone(),
        Secret::new(SECRET),
        RemoteConfig {
            lease_hold: Duration::from_secs(5),
            hold_reserved: true,
            ..Default::default()
        },
    );
    // Version 1 of a function with reserved concurrency 1 runs; its lease is held.
    inv.invoke(request("one", serde_json::json!({}), Some(1)))
        .await
        .expect("invoke");
    let leases: u32 = s
        .node
        .status()
        .await
        .partitions
        .iter()
        .map(|p| p.stats.leases)
        .sum();
    assert_eq!(leases, 1, "held");
    // Another version of it (another revision) needs the function's only lease: the held one
    // is returned and the call runs instead of being throttled.
    let mut other = request("one", serde_json::json!({"v": 2}), Some(1));
    other.spec.revision_id = "r2".into();
    other.spec.version = "2".into();
    let r = inv.invoke(other).await.expect("not throttled");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
    assert_eq!(v["payload"]["v"], 2);
    // A changed reservation is the assignment service's to check, never the held lease's:
    // reserved concurrency 0 stops the function although a lease of it is held.
    let mut zero = request("one", serde_json::json!({}), Some(0));
    zero.spec.revision_id = "r2".into();
    assert!(matches!(
        inv.invoke(zero).await,
        Err(InvokeError::TooManyRequests { .. })
    ));
    s.beats.abort();
    s.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_reaches_the_front_ends_sink_chunk_by_chunk() {
    let s = setup().await;
    let inv = invoker(&s);
    let chunks = Arc::new(Chunks::default());
    let mut req = request("f", serde_json::json!({"stream": ["a", "bc", "d"]}), None);
    req.response = Some(ResponseTarget(chunks.clone()));
    let r = inv.invoke(req).await.expect("invoke");
    assert!(!r.function_error);
    assert_eq!(
        *chunks.0.lock().expect("lock"),
        vec!["start text/plain", "a", "bc", "d"]
    );
    // Without a sink the worker is not asked to stream: nothing streams.
    let r = inv
        .invoke(request("f", serde_json::json!({"stream": ["x"]}), None))
        .await
        .expect("invoke");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
    assert_eq!(v["payload"]["stream"][0], "x");
    assert_eq!(chunks.0.lock().expect("lock").len(), 4);
    s.beats.abort();
    s.node.shutdown().await;
}
