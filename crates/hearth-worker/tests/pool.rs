//! The pool's decisions against a fake engine ([`hearth_worker::fake`]) on tokio's paused
//! clock: which sandbox serves, when to wait instead of starting one, what to evict, when to
//! expire and freeze, how failures end. Fast and repeatable; the same behaviour with real runsc
//! is tested end to end in `sandboxes.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use hearth_core::invoker::{FunctionSpec, InvokeError, InvokeRequest, InvokeResult, Invoker};
use hearth_worker::fake::{FakeEngine, FakeTimings};
use hearth_worker::prewarm::PrewarmConfig;
use hearth_worker::{ImageStore, Worker, WorkerConfig};
use serde_json::{Value, json};

struct Pool {
    worker: Worker,
    engine: Arc<FakeEngine>,
    dir: tempfile::TempDir,
}

impl Pool {
    fn new(adjust: impl FnOnce(&mut WorkerConfig)) -> Self {
        Self::with_timings(FakeTimings::default(), adjust)
    }

    fn with_timings(timings: FakeTimings, adjust: impl FnOnce(&mut WorkerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // An image the store counts as built (the fake engine never reads the root).
        let image = dir.path().join("images/python3.11");
        std::fs::create_dir_all(image.join("rootfs")).expect("image dir");
        std::fs::write(image.join("image.json"), b"{}").expect("image.json");
        let engine = Arc::new(FakeEngine::new(&dir.path().join("slots"), timings));
        let mut cfg = WorkerConfig {
            keep_alive: Duration::from_secs(300),
            memory_budget_mb: 8192,
            code_cache: Some(dir.path().join("code")),
            prewarm: PrewarmConfig::disabled(),
            start_limit: 2,
            ..WorkerConfig::default()
        };
        adjust(&mut cfg);
        let worker = Worker::new(
            engine.clone(),
            ImageStore::new(dir.path().join("images")),
            cfg,
        );
        Pool {
            worker,
            engine,
            dir,
        }
    }

    /// A function whose code is in the worker's code cache.
    fn spec(&self, name: &str) -> FunctionSpec {
        let code = hearth_core::code::CodeRef::of(name.as_bytes());
        let dir = self.dir.path().join("code").join(&code.sha256_hex);
        std::fs::create_dir_all(&dir).expect("code dir");
        std::fs::write(dir.join("app.py"), name).expect("code");
        FunctionSpec {
            name: name.into(),
            version: "$LATEST".into(),
            arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            runtime: "python3.11".into(),
            handler: "app.handler".into(),
            memory_mb: 128,
            timeout_s: 3,
            env: BTreeMap::new(),
            code_sha256: code.sha256_b64,
            layers: Vec::new(),
            revision_id: "r1".into(),
            snap_start: false,
            ephemeral_storage_mb: 512,
            egress: false,
        }
    }

    async fn call(&self, spec: &FunctionSpec, payload: Value) -> Result<InvokeResult, InvokeError> {
        self.call_limited(spec, payload, None).await
    }

    async fn call_limited(
        &self,
        spec: &FunctionSpec,
        payload: Value,
        reserved: Option<u32>,
    ) -> Result<InvokeResult, InvokeError> {
        let mut req = InvokeRequest::new(spec.clone(), payload.to_string().into_bytes());
        req.reserved_concurrency = reserved;
        self.worker.invoke(req).await
    }
}

fn body(r: &InvokeResult) -> Value {
    serde_json::from_slice(&r.payload).expect("a JSON payload")
}

fn error_type(r: &InvokeResult) -> String {
    assert!(r.function_error, "expected a function error");
    body(r)["errorType"].as_str().unwrap_or("").to_string()
}

#[tokio::test(start_paused = true)]
async fn a_second_call_reuses_the_idle_sandbox() {
    let p = Pool::new(|_| {});
    let spec = p.spec("reuse");
    let a = body(&p.call(&spec, json!({})).await.expect("first call"));
    let b = body(&p.call(&spec, json!({})).await.expect("second call"));
    assert_eq!(a["sandbox"], b["sandbox"]);
    assert_eq!(
        (a["served"].as_u64(), b["served"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(a["function"], "reuse");
    let stats = p.worker.stats();
    assert_eq!((stats.cold_starts, stats.warm_starts), (1, 1));
    assert_eq!(p.engine.counts().created, 1);
}

#[tokio::test(start_paused = true)]
async fn revisions_never_share_sandboxes() {
    let p = Pool::new(|_| {});
    let one = p.spec("one");
    let mut one_r2 = one.clone();
    one_r2.revision_id = "r2".into();
    let two = p.spec("two");
    let a = body(&p.call(&one, json!({})).await.expect("one"));
    let b = body(&p.call(&one_r2, json!({})).await.expect("one, new revision"));
    let c = body(&p.call(&two, json!({})).await.expect("two"));
    let ids: BTreeSet<_> = [&a, &b, &c]
        .iter()
        .map(|v| v["sandbox"].to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{a} {b} {c}");
    assert_eq!(c["function"], "two");
}

#[tokio::test(start_paused = true)]
async fn concurrent_calls_never_share_a_sandbox() {
    let p = Arc::new(Pool::new(|_| {}));
    let spec = p.spec("busy");
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move { p.call(&spec, json!({"sleep_ms": 50 + i})).await })
        })
        .collect();
    for c in calls {
        let r = c.await.expect("task").expect("call");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    }
    let counts = p.engine.counts();
    assert_eq!(counts.double_leases, 0);
    assert!(counts.max_running >= 2, "{counts:?}");
    assert_eq!(p.worker.stats().live, counts.live);
}

/// Issue 10's burst: 64 clients of one function must not start a sandbox per call. A call
/// waits for one of the function's sandboxes when that comes free sooner than a new one would
/// be ready, so no call waits much longer than a cold start.
#[tokio::test(start_paused = true)]
async fn a_burst_waits_for_sandboxes_instead_of_starting_one_per_call() {
    let p = Arc::new(Pool::new(|_| {}));
    let spec = p.spec("burst");
    // The function's first call: the pool learns how long a call and a cold start take.
    p.call(&spec, json!({})).await.expect("first call");
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                for _ in 0..10 {
                    let t = tokio::time::Instant::now();
                    let r = p.call(&spec, json!({"sleep_ms": 5})).await.expect("call");
                    assert!(!r.function_error);
                    worst = worst.max(t.elapsed());
                }
                worst
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for c in clients {
        worst = worst.max(c.await.expect("client"));
    }
    let counts = p.engine.counts();
    assert!(
        counts.created <= 4,
        "{} sandboxes for 64 clients",
        counts.created
    );
    assert!(p.worker.stats().paced >= 64 * 9, "{:?}", p.worker.stats());
    assert_eq!(counts.double_leases, 0);
    // A cold start takes 450 ms here (create 400, init 50).
    assert!(worst < Duration::from_millis(600), "slowest call {worst:?}");
}

/// The same burst with sandboxes ready: the first calls claim them, later ones wait rather than
/// create (a create takes far longer than the queue), and the ready pool is refilled only once
/// nothing waits: a create during the burst would take cores from the calls.
#[tokio::test(start_paused = true)]
async fn a_burst_claims_ready_sandboxes_and_refills_after_it() {
    let p = Arc::new(Pool::new(|cfg| {
        cfg.prewarm = PrewarmConfig::default();
    }));
    p.worker.prewarm("python3.11");
    settle(&p, |c| c.created >= 1).await;
    let spec = p.spec("ready-burst");
    p.call(&spec, json!({})).await.expect("first call");
    // The claim is replaced: demand now keeps two ready.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = p.engine.counts().created;
    assert!(p.worker.stats().ready >= 1, "{:?}", p.worker.stats());
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move {
                for _ in 0..10 {
                    let r = p.call(&spec, json!({"sleep_ms": 5})).await.expect("call");
                    assert!(!r.function_error);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    let during = p.engine.counts().created - before;
    let stats = p.worker.stats();
    assert_eq!(during, 0, "created {during} during the burst; {stats:?}");
    assert!(stats.claimed_ready >= 2, "{stats:?}");
    // Nothing waits now: the pool refills.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(p.engine.counts().created > before, "never refilled");
    assert_eq!(p.engine.counts().double_leases, 0);
}

/// A function that keeps the worker saturated for long does not stop the ready pool for good:
/// while calls wait it gets at most one new sandbox per 5 s.
#[tokio::test(start_paused = true)]
async fn sustained_waiting_refills_the_ready_pool_slowly() {
    let p = Arc::new(Pool::new(|cfg| {
        cfg.prewarm = PrewarmConfig::default();
    }));
    p.worker.prewarm("python3.11");
    settle(&p, |c| c.created >= 1).await;
    let spec = p.spec("saturating");
    p.call(&spec, json!({})).await.expect("first call");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = p.engine.counts().created;
    let t = tokio::time::Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move {
                for _ in 0..150 {
                    let r = p.call(&spec, json!({"sleep_ms": 5})).await.expect("call");
                    assert!(!r.function_error);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    let took = t.elapsed();
    let during = p.engine.counts().created - before;
    let stats = p.worker.stats();
    assert!(
        took > Duration::from_secs(11),
        "the load lasted only {took:?}"
    );
    // The burst's own starts claim ready sandboxes; the pool then gets one per 5 s.
    let refills = (took.as_secs() / 5) as usize;
    assert!(
        during >= 1 && during <= refills + 1,
        "created {during} in {took:?}; {stats:?}"
    );
}

/// Calls of a function that runs long do not wait behind each other: 16 calls of 2 s each
/// start their own sandboxes, at most `start_limit` (2) at a time; the last ones wait for a
/// sandbox that comes free sooner than a new one would.
#[tokio::test(start_paused = true)]
async fn long_calls_start_their_own_sandboxes_two_at_a_time() {
    let p = Arc::new(Pool::new(|_| {}));
    let spec = p.spec("long");
    p.call(&spec, json!({"sleep_ms": 2000}))
        .await
        .expect("first call");
    let t = tokio::time::Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move { p.call(&spec, json!({"sleep_ms": 2000})).await })
        })
        .collect();
    for c in calls {
        assert!(!c.await.expect("task").expect("call").function_error);
    }
    let took = t.elapsed();
    let counts = p.engine.counts();
    assert!((8..=16).contains(&counts.created), "{counts:?}");
    assert_eq!(counts.double_leases, 0);
    // Starts two at a time at 450 ms each, then 2 s of work; one sandbox alone: 32 s.
    assert!(took < Duration::from_millis(6500), "took {took:?}");
}

#[tokio::test(start_paused = true)]
async fn reserved_concurrency_throttles_past_the_limit() {
    let p = Arc::new(Pool::new(|_| {}));
    let spec = p.spec("reserved");
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (p, spec) = (p.clone(), spec.clone());
            tokio::spawn(async move {
                p.call_limited(&spec, json!({"sleep_ms": 500}), Some(2))
                    .await
            })
        })
        .collect();
    let mut throttled = 0;
    let mut ok = 0;
    for c in calls {
        match c.await.expect("task") {
            Ok(r) if !r.function_error => ok += 1,
            Err(InvokeError::TooManyRequests { reason }) => {
                assert_eq!(reason, "ReservedFunctionConcurrentInvocationLimitExceeded");
                throttled += 1
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, throttled), (2, 4));
    assert_eq!(p.engine.counts().max_running_by_function["reserved"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_destroys_the_sandbox_and_the_next_call_starts_anew() {
    let p = Pool::new(|_| {});
    let mut spec = p.spec("slow");
    spec.timeout_s = 1;
    let r = p
        .call(&spec, json!({"sleep_ms": 5000}))
        .await
        .expect("call");
    assert_eq!(error_type(&r), "Sandbox.Timedout");
    assert!(String::from_utf8_lossy(&r.payload).contains("Task timed out after 1.00 seconds"));
    let again = body(&p.call(&spec, json!({})).await.expect("call after"));
    assert_eq!(again["served"], 1, "a new sandbox serves after a timeout");
    assert_eq!(p.engine.counts().created, 2);
}

#[tokio::test(start_paused = true)]
async fn a_function_error_keeps_the_sandbox() {
    let p = Pool::new(|_| {});
    let spec = p.spec("oops");
    let r = p.call(&spec, json!({"fail": "no"})).await.expect("call");
    assert_eq!(error_type(&r), "Fake");
    let b = body(&p.call(&spec, json!({})).await.expect("call after"));
    assert_eq!(b["served"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_exits_or_dies_is_replaced() {
    let p = Pool::new(|_| {});
    let spec = p.spec("crash");
    let r = p
        .call(&spec, json!({"exit": "exit status 3"}))
        .await
        .expect("call");
    assert_eq!(error_type(&r), "Runtime.ExitError");
    assert!(String::from_utf8_lossy(&r.payload).contains("exit status 3"));
    let r = p
        .call(&spec, json!({"die": true, "oom": true}))
        .await
        .expect("call");
    assert_eq!(error_type(&r), "Runtime.OutOfMemory");
    let r = p.call(&spec, json!({"die": true})).await.expect("call");
    assert_eq!(error_type(&r), "Runtime.ExitError");
    let b = body(&p.call(&spec, json!({})).await.expect("call after"));
    assert_eq!(b["served"], 1);
    let counts = p.engine.counts();
    assert_eq!((counts.created, counts.live), (4, 1), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_fails_the_call_and_holds_nothing() {
    let p = Pool::new(|_| {});
    let spec = p.spec("unlucky");
    let before = p.worker.load().memory_committed_mb;
    p.engine.fail_next_creates(1);
    match p.call(&spec, json!({})).await {
        Err(InvokeError::Service(msg)) => assert!(msg.contains("told to fail"), "{msg}"),
        other => panic!("expected a service error, got {other:?}"),
    }
    assert_eq!(p.worker.load().memory_committed_mb, before);
    assert_eq!(p.worker.stats().live, 0);
    p.call(&spec, json!({})).await.expect("the next call works");
}

#[tokio::test(start_paused = true)]
async fn idle_sandboxes_expire_after_the_keep_alive() {
    let p = Pool::new(|cfg| {
        cfg.keep_alive = Duration::from_secs(60);
    });
    let spec = p.spec("brief");
    p.call(&spec, json!({})).await.expect("call");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(p.engine.counts().live, 1, "expired before its keep-alive");
    tokio::time::sleep(Duration::from_secs(40)).await;
    // Destroys run on the blocking pool: give them a moment of real time.
    settle(&p, |c| c.live == 0).await;
}

#[tokio::test(start_paused = true)]
async fn idle_sandboxes_are_frozen_and_thawed_when_taken() {
    let p = Pool::new(|cfg| {
        cfg.freeze_idle_after = Some(Duration::from_secs(2));
    });
    let spec = p.spec("cold");
    let first = body(&p.call(&spec, json!({})).await.expect("call"));
    let id = first["sandbox"].as_str().expect("sandbox id").to_string();
    assert!(!p.engine.is_frozen(&id));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(p.engine.is_frozen(&id), "idle for 3 s and not frozen");
    let again = body(&p.call(&spec, json!({})).await.expect("call"));
    assert_eq!(again["sandbox"], first["sandbox"]);
    assert!(!p.engine.is_frozen(&id), "taken and still frozen");
}

#[tokio::test(start_paused = true)]
async fn a_full_budget_evicts_the_least_recently_used_idle_sandbox() {
    // Room for two sandboxes of 128 MB + the sentry's 64.
    let p = Pool::new(|cfg| {
        cfg.memory_budget_mb = 2 * 192;
    });
    let (a, b, c) = (p.spec("a"), p.spec("b"), p.spec("c"));
    let first_a = body(&p.call(&a, json!({})).await.expect("a"));
    p.call(&b, json!({})).await.expect("b");
    // `a` is used again: `b` is now the least recently used.
    p.call(&a, json!({})).await.expect("a again");
    p.call(&c, json!({})).await.expect("c evicts b");
    settle(&p, |k| k.live == 2).await;
    let again = body(&p.call(&a, json!({})).await.expect("a, warm"));
    assert_eq!(
        again["sandbox"], first_a["sandbox"],
        "a was evicted instead of b"
    );
    let b2 = body(&p.call(&b, json!({})).await.expect("b, cold again"));
    assert_eq!(b2["served"], 1);
}

#[tokio::test(start_paused = true)]
async fn the_ready_pool_takes_creation_off_the_request_path() {
    let p = Pool::new(|cfg| {
        cfg.prewarm = PrewarmConfig::default();
    });
    p.worker.prewarm("python3.11");
    settle(&p, |c| c.created >= 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spec = p.spec("quick");
    let t = tokio::time::Instant::now();
    p.call(&spec, json!({})).await.expect("call");
    let took = t.elapsed();
    // A claim of a ready sandbox pays init (50 ms) and the call, not creation (400 ms).
    assert!(
        took < Duration::from_millis(200),
        "cold start took {took:?}"
    );
    assert_eq!(p.worker.stats().claimed_ready, 1);
}

#[tokio::test(start_paused = true)]
async fn node_ready_sandboxes_are_made_per_memory_size_and_python_ones_serve_any() {
    let p = Pool::new(|cfg| {
        cfg.prewarm = PrewarmConfig::default();
    });
    let image = p.dir.path().join("images/nodejs22.x");
    std::fs::create_dir_all(image.join("rootfs")).expect("image dir");
    std::fs::write(image.join("image.json"), b"{}").expect("image.json");
    let node = |name: &str, memory_mb: u32| {
        let mut spec = p.spec(name);
        spec.runtime = "nodejs22.x".into();
        spec.handler = "index.handler".into();
        spec.memory_mb = memory_mb;
        spec
    };
    // Prewarmed for Lambda's default size.
    p.worker.prewarm("nodejs22.x");
    settle(&p, |c| c.created >= 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        p.engine.counts().created_for_memory,
        BTreeMap::from([(128, 1)])
    );
    // A 512 MB function with none of its size ready takes that one (its prestart will decline,
    // a fresh runtime boots: still faster than creating one), and the pool makes its size.
    p.call(&node("big", 512), json!({})).await.expect("call");
    assert_eq!(p.worker.stats().claimed_ready, 1);
    settle(&p, |c| {
        c.created_for_memory.get(&512).is_some_and(|n| *n >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = p.engine.counts().created;
    // The next one of that size takes one made for it.
    p.call(&node("big2", 512), json!({})).await.expect("call");
    assert_eq!(p.worker.stats().claimed_ready, 2);
    assert_eq!(
        p.engine.counts().created,
        made,
        "nothing created on its way"
    );
    assert_eq!(p.engine.counts().created_for_memory.get(&512), Some(&1));
    // Python's prestart does not depend on the size: any size takes its ready sandbox.
    let p = Pool::new(|cfg| {
        cfg.prewarm = PrewarmConfig::default();
    });
    p.worker.prewarm("python3.11");
    settle(&p, |c| c.created >= 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut py = p.spec("py");
    py.memory_mb = 1024;
    p.call(&py, json!({})).await.expect("call");
    assert_eq!(p.worker.stats().claimed_ready, 1);
}

#[tokio::test(start_paused = true)]
async fn snapstart_restores_the_checkpointed_function() {
    let p = Pool::new(|cfg| {
        cfg.snapshot_dir = Some(std::env::temp_dir().join(format!(
            "hearth-fake-snapshots-{}",
            uuid::Uuid::new_v4().simple()
        )));
    });
    let mut spec = p.spec("snappy");
    spec.snap_start = true;
    p.worker.prepare(spec.clone()).await.expect("snapshot");
    assert_eq!(p.engine.counts().checkpoints, 1);
    let r = body(&p.call(&spec, json!({})).await.expect("call"));
    assert_eq!(
        r["function"], "snappy",
        "the restored sandbox knows its function"
    );
    assert_eq!(p.worker.stats().restores, 1);
    assert_eq!(p.engine.counts().restores, 1);
}

/// Wait (real time: destroys run on the blocking pool) until the engine's counts pass `ok`.
async fn settle(p: &Pool, ok: impl Fn(&hearth_worker::fake::FakeCounts) -> bool) {
    for _ in 0..200 {
        if ok(&p.engine.counts()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("counts never settled: {:?}", p.engine.counts());
}
