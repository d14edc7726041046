//! End-to-end tests of the worker with real runsc sandboxes, the real agent and real runtime
//! images. Needs root, runsc, the images (`hearth image build`) and the static agent; the
//! README's test command prepares all of them. Paths come from `HEARTH_IMAGE_CACHE` and
//! `HEARTH_AGENT` (defaults: `target/hearth-images`, the static agent build).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_core::invoker::{FunctionSpec, InvokeError, InvokeRequest, InvokeResult, Invoker};
use hearth_worker::affinity::{self, Pinning};
use hearth_worker::engine::default_runsc;
use hearth_worker::ksm;
use hearth_worker::{EngineConfig, ImageStore, RunscEngine, Worker, WorkerConfig};
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn agent_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_AGENT") {
        return p.into();
    }
    let p = static_build("hearth-agent");
    assert!(
        p.is_file(),
        "static agent missing at {}: build it with the README's test command or set HEARTH_AGENT",
        p.display()
    );
    p
}

/// A binary of the static build (`--target x86_64-unknown-linux-gnu`), debug or release.
fn static_build(name: &str) -> PathBuf {
    let base = workspace().join("target/x86_64-unknown-linux-gnu");
    let debug = base.join("debug").join(name);
    let release = base.join("release").join(name);
    match (debug.is_file(), release.is_file()) {
        (true, true) => {
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if modified(&release) > modified(&debug) {
                release
            } else {
                debug
            }
        }
        (false, true) => release,
        _ => debug,
    }
}

fn image_cache() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/hearth-images"))
}

/// A runsc engine with its state and bundles under `dir`.
fn engine_in(dir: &Path) -> RunscEngine {
    engine_with(dir, |_| {})
}

fn engine_with(dir: &Path, adjust: impl FnOnce(&mut EngineConfig)) -> RunscEngine {
    let mut cfg = EngineConfig {
        pinning: Pinning::Split,
        ..EngineConfig::under(dir, default_runsc(), agent_path())
    };
    adjust(&mut cfg);
    RunscEngine::new(cfg).expect("runsc engine (is runsc installed?)")
}

/// The worker's code cache in a test directory.
fn code_root(dir: &Path) -> PathBuf {
    dir.join("code")
}

struct Harness {
    worker: Worker,
    /// The worker's engine, for what only runsc can tell (containers, cgroups).
    engine: Arc<RunscEngine>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new(keep_alive: Duration) -> Self {
        Self::with_engine(keep_alive, |_| {})
    }

    fn with_engine(keep_alive: Duration, adjust: impl FnOnce(&mut EngineConfig)) -> Self {
        Self::with_configs(keep_alive, adjust, |_| {})
    }

    fn with_configs(
        keep_alive: Duration,
        adjust: impl FnOnce(&mut EngineConfig),
        adjust_worker: impl FnOnce(&mut WorkerConfig),
    ) -> Self {
        // `RUST_LOG=hearth_worker=debug` shows what the worker does.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine_with(dir.path(), adjust);
        let images = ImageStore::new(image_cache());
        images
            .rootfs("python3.11")
            .expect("python3.11 image missing: run `hearth image build`");
        let mut cfg = WorkerConfig {
            keep_alive,
            memory_budget_mb: 8192,
            code_cache: Some(code_root(dir.path())),
            ..WorkerConfig::default()
        };
        adjust_worker(&mut cfg);
        let engine = Arc::new(engine);
        let worker = Worker::new(engine.clone(), images, cfg);
        Harness {
            worker,
            engine,
            dir,
        }
    }

    /// Unpack a "package" into the worker's code cache, as the chunk store fetch would: under
    /// the hex of its id (derived from `name` and `files`); returns the id (`CodeSha256`).
    fn code(&self, name: &str, files: &[(&str, &str)]) -> String {
        let mut id = name.as_bytes().to_vec();
        for (path, text) in files {
            id.extend_from_slice(format!("\0{path}\0{text}").as_bytes());
        }
        let code = hearth_core::code::CodeRef::of(&id);
        let dir = code_root(self.dir.path()).join(&code.sha256_hex);
        std::fs::create_dir_all(&dir).expect("code dir");
        for (path, text) in files {
            let p = dir.join(path);
            if let Some(parent) = p.parent().filter(|d| *d != dir) {
                std::fs::create_dir_all(parent).expect("code subdirectory");
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
            std::fs::write(&p, text).expect("write code");
            let mode = if *path == "bootstrap" { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        code.sha256_b64
    }

    /// Where the worker finds `spec`'s code.
    fn code_path(&self, spec: &FunctionSpec) -> PathBuf {
        let hex = hearth_core::code::CodeRef::hex_of(&spec.code_sha256).expect("a code id");
        code_root(self.dir.path()).join(hex)
    }

    fn spec(
        &self,
        name: &str,
        runtime: &str,
        handler: &str,
        files: &[(&str, &str)],
    ) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            version: "$LATEST".into(),
            arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            runtime: runtime.into(),
            handler: handler.into(),
            memory_mb: 256,
            timeout_s: 10,
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            code_sha256: self.code(name, files),
            layers: Vec::new(),
            revision_id: "r1".into(),
            snap_start: false,
            ephemeral_storage_mb: 512,
            egress: true,
        }
    }

    async fn invoke(
        &self,
        spec: &FunctionSpec,
        payload: Value,
    ) -> Result<InvokeResult, InvokeError> {
        self.worker
            .invoke(InvokeRequest::new(
                spec.clone(),
                payload.to_string().into_bytes(),
            ))
            .await
    }

    /// Shut down and check nothing is left: no containers, no cgroups.
    async fn finish(self) {
        self.worker.shutdown().await;
        let engine = &self.engine;
        assert_eq!(
            engine.list(),
            Vec::<String>::new(),
            "runsc containers leaked"
        );
        assert_eq!(
            engine.cgroups().sandbox_dirs(),
            Vec::<PathBuf>::new(),
            "cgroups leaked"
        );
        let bundles: Vec<_> = std::fs::read_dir(self.dir.path().join("bundles"))
            .map(|r| r.flatten().collect())
            .unwrap_or_default();
        assert!(bundles.is_empty(), "bundles leaked");
    }
}

fn json_of(r: &InvokeResult) -> Value {
    serde_json::from_slice(&r.payload)
        .unwrap_or_else(|_| panic!("not json: {}", String::from_utf8_lossy(&r.payload)))
}

const PY_APP: &str = r#"
import os, time, json
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    print("handling", json.dumps(event))
    if event.get("raise"):
        raise ValueError("bad input: " + str(event["raise"]))
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("exit") is not None:
        os._exit(event["exit"])
    if event.get("alloc_mb"):
        blocks = [bytearray(1024 * 1024) for _ in range(event["alloc_mb"])]
        for b in blocks:
            b[::4096] = b"x" * len(b[::4096])
    if event.get("net"):
        import socket
        out = {}
        for host, port in (("1.1.1.1", 53), ("8.8.8.8", 53)):
            try:
                socket.create_connection((host, port), timeout=1).close()
                out[host] = "connected"
            except OSError as e:
                out[host] = "blocked"
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        c = socket.create_connection(srv.getsockname(), timeout=1)
        out["loopback"] = "ok"
        c.close(); srv.close()
        import os as _os
        out["ifaces"] = sorted(_os.listdir("/sys/class/net")) if _os.path.isdir("/sys/class/net") else []
        return out
    return {
        "event": event,
        "count": COUNT,
        "pid": os.getpid(),
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "memory": context.memory_limit_in_mb,
        "version": context.function_version,
        "arn": context.invoked_function_arn,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "greeting": os.environ.get("GREETING"),
        "region": os.environ.get("AWS_REGION"),
        "init_type": os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE"),
        "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
        "cwd": os.getcwd(),
        "tmp_writable": os.access("/tmp", os.W_OK),
        "task_writable": os.access("/var/task", os.W_OK),
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handler_sees_event_context_and_environment_and_is_reused_warm() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec("pyecho", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let r = h
        .invoke(&spec, json!({"hello": "world"}))
        .await
        .expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["event"], json!({"hello": "world"}));
    assert_eq!(v["count"], 1);
    assert_eq!(v["function_name"], "pyecho");
    assert_eq!(v["memory"], "256");
    assert_eq!(v["version"], "$LATEST");
    assert_eq!(v["arn"], spec.arn.as_str());
    assert_eq!(v["greeting"], "hello");
    assert_eq!(v["region"], "us-east-1");
    assert_eq!(v["init_type"], "on-demand");
    assert_eq!(v["task_root"], "/var/task");
    assert_eq!(v["cwd"], "/var/task");
    assert_eq!(v["tmp_writable"], true);
    assert_eq!(v["task_writable"], false);
    let remaining = v["remaining_ms"].as_i64().expect("remaining");
    assert!(
        remaining > 5_000 && remaining <= 10_000,
        "remaining {remaining}"
    );
    let rid = v["request_id"].as_str().expect("rid").to_string();
    // The log: the handler's output between START and END, then REPORT with an init duration.
    assert!(
        r.log
            .contains(&format!("START RequestId: {rid} Version: $LATEST")),
        "{}",
        r.log
    );
    assert!(
        r.log.contains("handling {\"hello\": \"world\"}"),
        "{}",
        r.log
    );
    assert!(
        r.log.contains(&format!("END RequestId: {rid}")),
        "{}",
        r.log
    );
    assert!(r.log.contains("Memory Size: 256 MB"), "{}", r.log);
    assert!(r.log.contains("Init Duration:"), "{}", r.log);
    let start = r.log.find("START").unwrap_or(0);
    let handling = r.log.find("handling").unwrap_or(0);
    let end = r.log.find("END RequestId").unwrap_or(0);
    assert!(start < handling && handling < end, "{}", r.log);

    // Second call: same sandbox (module state kept), no init.
    let r2 = h.invoke(&spec, json!({"n": 2})).await.expect("invoke");
    let v2 = json_of(&r2);
    assert_eq!(v2["count"], 2);
    assert_ne!(v2["request_id"], v["request_id"]);
    assert!(!r2.log.contains("Init Duration"), "{}", r2.log);
    let stats = h.worker.stats();
    assert_eq!(
        (stats.cold_starts, stats.warm_starts, stats.live),
        (1, 1, 1)
    );
    h.finish().await;
}

/// A handler that starts a process (a new address space, so a new stub process) each call.
const PY_SPAWN_APP: &str = r#"
import subprocess
def handler(event, context):
    return {"out": subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_sandbox_runs_its_sentry_and_its_application_on_two_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "splitting a sandbox needs two cores; this machine has {cores}"
    );
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec(
        "split",
        "python3.11",
        "app.handler",
        &[("app.py", PY_SPAWN_APP)],
    );
    for _ in 0..2 {
        let r = h.invoke(&spec, json!({})).await.expect("invoke");
        assert_eq!(json_of(&r)["out"], "hi\n");
    }
    // The invoked sandbox is the one whose threads are placed (the pool's are not yet).
    let mut split = Vec::new();
    for id in h.engine.list() {
        let mut sides: Vec<(affinity::Side, Vec<usize>)> = Vec::new();
        for pid in h.engine.cgroups().procs(&id) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                if let Some(tid) = t.file_name().to_str().and_then(|t| t.parse().ok()) {
                    sides.push((affinity::side(&cmdline), affinity::cores_of(tid)));
                }
            }
        }
        let on = |side| -> Vec<Vec<usize>> {
            let mut c: Vec<Vec<usize>> = sides
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, c)| c.clone())
                .collect();
            c.sort();
            c.dedup();
            c
        };
        let (sentry, app) = (on(affinity::Side::Sentry), on(affinity::Side::Application));
        if sentry.len() == 1 && sentry[0].len() == 1 {
            split.push((id, sentry, app));
        }
    }
    assert_eq!(split.len(), 1, "{split:?}");
    let (_, sentry, app) = &split[0];
    let (s, a) = (sentry[0][0], app.first().cloned());
    assert_eq!(a, Some(vec![(s + 1) % cores]), "{split:?}");
    assert_eq!(
        app.len(),
        1,
        "every application thread on one core: {split:?}"
    );
    h.finish().await;
}

/// Same-page merging state of the sentry and gofer processes of every sandbox `engine` has.
fn runsc_merging(engine: &RunscEngine) -> Vec<(i32, ksm::ProcessStat)> {
    let mut out = Vec::new();
    for id in engine.list() {
        for pid in engine.cgroups().procs(&id) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if affinity::side(&cmdline) != affinity::Side::Sentry {
                continue;
            }
            if let Some(stat) = ksm::process_stat(pid) {
                out.push((pid, stat));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_merges_the_sandboxes_runsc_pages_and_nothing_of_the_worker() {
    // Off: no sandbox process is mergeable.
    let off = Harness::with_engine(Duration::from_secs(60), |c| c.merge_pages = false);
    assert!(!off.engine.merging());
    let spec = off.spec(
        "unmerged",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    off.invoke(&spec, json!({"n": 1})).await.expect("invoke");
    let procs = runsc_merging(&off.engine);
    assert!(procs.len() >= 2, "a sentry and a gofer at least: {procs:?}");
    assert!(procs.iter().all(|(_, s)| !s.merge_any), "{procs:?}");
    off.finish().await;

    // On (the default): every sentry and gofer is mergeable, the worker itself is not, and
    // the kernel's scanner (started if it was off) merges their pages.
    let on = Harness::new(Duration::from_secs(60));
    assert!(
        on.engine.merging(),
        "this kernel can merge pages (Linux 6.4+ with KSM, as root): see the worker's log"
    );
    assert_eq!(
        std::fs::read_to_string(Path::new(ksm::SYSFS).join("run"))
            .expect("ksm run")
            .trim(),
        "1"
    );
    for name in ["merged-a", "merged-b"] {
        let spec = on.spec(name, "python3.11", "app.handler", &[("app.py", PY_APP)]);
        on.invoke(&spec, json!({"n": 1})).await.expect("invoke");
    }
    let procs = runsc_merging(&on.engine);
    assert!(
        procs.len() >= 4,
        "two sandboxes' sentry and gofer at least: {procs:?}"
    );
    assert!(procs.iter().all(|(_, s)| s.merge_any), "{procs:?}");
    // With directfs the gofer runs on one Go processor (the sentry's environment is empty).
    if on.engine.caps().directfs {
        let gofers: Vec<i32> = procs
            .iter()
            .map(|(pid, _)| *pid)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"runsc-gofer"))
            })
            .collect();
        assert!(gofers.len() >= 2, "{procs:?}");
        for pid in gofers {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            assert!(
                env.split(|b| *b == 0).any(|e| e == b"GOMAXPROCS=1"),
                "gofer {pid} without GOMAXPROCS=1"
            );
        }
    }
    let me = ksm::process_stat(std::process::id() as i32).expect("own ksm_stat");
    assert!(!me.merge_any, "the worker must not make itself mergeable");
    let until = std::time::Instant::now() + Duration::from_secs(90);
    let merged = loop {
        let merged: u64 = runsc_merging(&on.engine)
            .iter()
            .map(|(_, s)| s.merging_pages + s.zero_pages)
            .sum();
        if merged > 0 || std::time::Instant::now() > until {
            break merged;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        merged > 0,
        "no page of the sandboxes' runsc processes merged in 90 s"
    );
    // Merged sandboxes still serve.
    let spec = on.spec(
        "merged-a",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    let r = on
        .invoke(&spec, json!({"n": 2}))
        .await
        .expect("invoke after merging");
    assert_eq!(json_of(&r)["event"]["n"], 2, "{}", json_of(&r));
    on.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_worker_removes_the_cgroups_of_workers_that_are_gone_and_no_others() {
    use hearth_worker::cgroup::{Cgroups, WORKER_LOCK_DIR};
    let lock_dir = Path::new(WORKER_LOCK_DIR);
    let (gone, live) = (
        format!("wgone{}", std::process::id()),
        format!("wlive{}", std::process::id()),
    );
    // A live worker: its liveness lock held (here, by this test).
    let live_lock = Cgroups::discover(&live).lock_instance(lock_dir);
    assert!(live_lock.held());
    // Both left a sandbox directory in every hierarchy; the gone one holds no lock.
    let mut made = Vec::new();
    for root in Cgroups::discover(&gone).roots() {
        for name in [&gone, &live] {
            let d = root.join(name).join("hs00000000000000aa");
            if std::fs::create_dir_all(&d).is_ok() {
                made.push((name.clone(), d));
            }
        }
    }
    assert!(made.len() >= 2, "{made:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine_in(dir.path());
    for (name, d) in &made {
        let parent = d.parent().expect("parent");
        if *name == gone {
            assert!(!d.exists() && !parent.exists(), "{} was left", d.display());
        } else {
            assert!(d.exists(), "{} of a live worker was removed", d.display());
        }
    }
    // Once the live one is gone too, the next worker removes its directories as well.
    drop(live_lock);
    drop(engine);
    let engine = engine_in(dir.path());
    for (name, d) in &made {
        if *name == live {
            assert!(!d.exists(), "{} was left", d.display());
        }
    }
    drop(engine);
}

const NODE_APP: &str = r#"
let count = 0;
export const handler = async (event, context) => {
  count += 1;
  console.log("handling", JSON.stringify(event));
  return { event, count, version: process.version, requestId: context.awsRequestId,
           functionName: context.functionName, memory: context.memoryLimitInMB,
           remainingMs: context.getRemainingTimeInMillis(), cwd: process.cwd() };
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_handlers_run_on_the_major_their_runtime_names_and_are_reused_warm() {
    let h = Harness::new(Duration::from_secs(60));
    for (runtime, major) in [("nodejs22.x", "v22."), ("nodejs24.x", "v24.")] {
        let name = format!("node{}", &major[1..3]);
        let spec = h.spec(&name, runtime, "index.handler", &[("index.mjs", NODE_APP)]);
        let r = h
            .invoke(&spec, json!({"hello": runtime}))
            .await
            .expect("invoke");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
        let v = json_of(&r);
        assert_eq!(v["event"], json!({"hello": runtime}));
        assert_eq!(v["count"], 1);
        assert!(
            v["version"].as_str().is_some_and(|s| s.starts_with(major)),
            "{v}"
        );
        assert_eq!(v["functionName"], name.as_str());
        assert_eq!(v["memory"], "256");
        assert_eq!(v["cwd"], "/var/task");
        let remaining = v["remainingMs"].as_i64().expect("remaining");
        assert!(
            remaining > 5_000 && remaining <= 10_000,
            "remaining {remaining}"
        );
        let rid = v["requestId"].as_str().expect("rid").to_string();
        let (start, handling, end) = (
            r.log.find(&format!("START RequestId: {rid}")),
            r.log.find("handling"),
            r.log.find(&format!("END RequestId: {rid}")),
        );
        assert!(
            start < handling && handling < end && start.is_some(),
            "{}",
            r.log
        );
        assert!(r.log.contains("Init Duration:"), "{}", r.log);
        // Second call: the same process, module state kept, no init.
        let r2 = h.invoke(&spec, json!({"n": 2})).await.expect("invoke");
        let v2 = json_of(&r2);
        assert_eq!(v2["count"], 2, "{v2}");
        assert!(!r2.log.contains("Init Duration"), "{}", r2.log);
    }
    let stats = h.worker.stats();
    assert_eq!((stats.cold_starts, stats.warm_starts), (2, 2));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_opts_out_has_no_network_but_loopback() {
    let h = Harness::new(Duration::from_secs(60));
    let mut spec = h.spec("pynet", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    spec.env.insert("HEARTH_NETWORK".into(), "none".into());
    spec.egress = hearth_core::invoker::egress_wanted(&spec.env);
    let r = h.invoke(&spec, json!({"net": true})).await.expect("invoke");
    let v = json_of(&r);
    assert_eq!(v["1.1.1.1"], "blocked", "{v}");
    assert_eq!(v["8.8.8.8"], "blocked", "{v}");
    assert_eq!(v["loopback"], "ok", "{v}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_exception_is_a_function_error_and_keeps_the_sandbox() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec("pyerr", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let r = h
        .invoke(&spec, json!({"raise": "nope"}))
        .await
        .expect("invoke");
    assert!(r.function_error);
    let v = json_of(&r);
    assert_eq!(v["errorType"], "ValueError");
    assert_eq!(v["errorMessage"], "bad input: nope");
    assert!(v["stackTrace"].is_array());
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(
        json_of(&r)["count"],
        2,
        "the sandbox survives a handled error"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_the_sandbox_and_the_next_call_starts_fresh() {
    let h = Harness::new(Duration::from_secs(60));
    let mut spec = h.spec("pyslow", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    spec.timeout_s = 1;
    let warm = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(json_of(&warm)["count"], 1);
    let r = h.invoke(&spec, json!({"sleep": 5})).await.expect("invoke");
    assert!(r.function_error);
    let v = json_of(&r);
    let msg = v["errorMessage"].as_str().expect("message");
    assert!(msg.ends_with("Task timed out after 1.00 seconds"), "{msg}");
    assert_eq!(v["errorType"], "Sandbox.Timedout");
    assert!(
        r.log.contains("Task timed out after 1.00 seconds"),
        "{}",
        r.log
    );
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(
        json_of(&r)["count"],
        1,
        "a timed-out sandbox is replaced, init runs again"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_exit_mid_invocation_is_runtime_exit_error() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec(
        "pycrash",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    let r = h.invoke(&spec, json!({"exit": 3})).await.expect("invoke");
    assert!(r.function_error);
    let v = json_of(&r);
    assert_eq!(v["errorType"], "Runtime.ExitError");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("exit status 3"),
        "{v}"
    );
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(json_of(&r)["count"], 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_memory_kills_only_the_sandbox() {
    let h = Harness::new(Duration::from_secs(60));
    let mut spec = h.spec("pymem", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    spec.memory_mb = 128;
    let r = h
        .invoke(&spec, json!({"alloc_mb": 600}))
        .await
        .expect("invoke");
    assert!(r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
    assert!(r.log.contains("Status: error"), "{}", r.log);
    // The worker is fine and the next call works in a fresh sandbox.
    let r = h
        .invoke(&spec, json!({"alloc_mb": 10}))
        .await
        .expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_failure_is_the_first_invocations_error() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec(
        "pyinit",
        "python3.11",
        "app.handler",
        &[("app.py", "raise RuntimeError('boom at import')\n")],
    );
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(r.function_error);
    let v = json_of(&r);
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("boom at import"),
        "{v}"
    );
    let spec = h.spec(
        "pymissing",
        "python3.11",
        "nothere.handler",
        &[("app.py", PY_APP)],
    );
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(r.function_error);
    assert_eq!(json_of(&r)["errorType"], "Runtime.ImportModuleError");
    h.finish().await;
}

const SHELL_BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
echo "init from shell bootstrap"
while true; do
  HEADERS=$(mktemp)
  EVENT=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  echo "got $REQUEST_ID"
  RESPONSE="{\"echo\": $EVENT, \"handler\": \"$_HANDLER\", \"fn\": \"$AWS_LAMBDA_FUNCTION_NAME\"}"
  curl -sS -X POST "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" -d "$RESPONSE" >/dev/null
done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_bootstrap_with_curl_on_provided_runtime() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec(
        "shell",
        "provided.al2023",
        "function.handler",
        &[("bootstrap", SHELL_BOOTSTRAP)],
    );
    for i in 0..3 {
        let r = h.invoke(&spec, json!({"i": i})).await.expect("invoke");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
        let v = json_of(&r);
        assert_eq!(
            v,
            json!({"echo": {"i": i}, "handler": "function.handler", "fn": "shell"})
        );
        if i == 0 {
            assert!(r.log.contains("init from shell bootstrap"), "{}", r.log);
        }
    }
    assert_eq!(h.worker.stats().cold_starts, 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_lambda_runtime_bootstrap() {
    let bin = std::env::var_os("HEARTH_RUST_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| static_build("rust-echo"));
    assert!(
        bin.is_file(),
        "Rust fixture missing at {}: build it with the README's test command",
        bin.display()
    );
    let h = Harness::new(Duration::from_secs(60));
    let mut spec = h.spec("rusty", "provided.al2023", "bootstrap", &[]);
    std::fs::copy(&bin, h.code_path(&spec).join("bootstrap")).expect("copy fixture");
    spec.memory_mb = 128;
    let r = h
        .invoke(&spec, json!({"name": "ferris"}))
        .await
        .expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["message"], "hello ferris");
    assert_eq!(v["function_name"], "rusty");
    assert!(
        v["request_id"]
            .as_str()
            .map(|s| s.len() == 36)
            .unwrap_or(false),
        "{v}"
    );
    let r = h
        .invoke(&spec, json!({"fail": true}))
        .await
        .expect("invoke");
    assert!(r.function_error);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_destroys_idle_sandboxes() {
    let h = Harness::new(Duration::from_millis(800));
    let spec = h.spec(
        "pyexpire",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    assert_eq!(
        json_of(&h.invoke(&spec, json!({})).await.expect("invoke"))["count"],
        1
    );
    assert_eq!(h.worker.stats().live, 1);
    let mut waited = 0;
    while h.worker.stats().live > 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(
        h.worker.stats().live,
        0,
        "idle sandbox outlived its keep-alive"
    );
    assert_eq!(
        json_of(&h.invoke(&spec, json!({})).await.expect("invoke"))["count"],
        1
    );
    assert_eq!(h.worker.stats().cold_starts, 2);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_beyond_the_predicted_demand_expire_after_the_grace() {
    // A burst of 3 with at most 2 predicted: one goes after the 1 s grace, two stay while the
    // burst is within the 8 s window, then one (the function was used within the keep-alive)
    // stays for the keep-alive.
    let h = Arc::new(Harness::with_configs(
        Duration::from_secs(60),
        |_| {},
        |w| {
            w.start_limit = 3;
            w.demand = hearth_worker::demand::DemandConfig {
                window: Duration::from_secs(8),
                idle_grace: Duration::from_secs(1),
                max_per_revision: 2,
            };
        },
    ));
    let spec = h.spec(
        "pydemand",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    let (a, b, c) = tokio::join!(
        h.invoke(&spec, json!({"sleep": 3})),
        h.invoke(&spec, json!({"sleep": 3})),
        h.invoke(&spec, json!({"sleep": 3}))
    );
    for r in [a, b, c] {
        let r = r.expect("burst call");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    }
    let ended = std::time::Instant::now();
    let s = h.worker.stats();
    assert_eq!((s.cold_starts, s.live), (3, 3), "{s:?}");

    let until = |want: usize, limit: Duration| {
        let h = h.clone();
        async move {
            let t = std::time::Instant::now();
            while h.worker.stats().live != want && t.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            h.worker.stats()
        }
    };
    // The one beyond the prediction goes after the grace, long before the window ends.
    let s = until(2, Duration::from_secs(5)).await;
    assert_eq!((s.live, s.expired_beyond_demand), (2, 1), "{s:?}");
    assert!(
        ended.elapsed() < Duration::from_secs(6),
        "took {:?}",
        ended.elapsed()
    );
    // The predicted two stay past the grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.worker.stats().live, 2);
    // Once the burst is out of the window, one is predicted: the other goes.
    let s = until(1, Duration::from_secs(30)).await;
    assert_eq!((s.live, s.expired_beyond_demand), (1, 2), "{s:?}");
    // The last one keeps the keep-alive and serves warm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.worker.stats().live, 1);
    let r = h.invoke(&spec, json!({})).await.expect("warm call");
    assert_eq!(json_of(&r)["count"], 2);
    let s = h.worker.stats();
    assert_eq!((s.cold_starts, s.warm_starts, s.live), (3, 1, 1), "{s:?}");
    match Arc::try_unwrap(h) {
        Ok(h) => h.finish().await,
        Err(_) => panic!("harness still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invocations_run_in_separate_sandboxes_and_limits_apply() {
    let h = Arc::new(Harness::new(Duration::from_secs(60)));
    let spec = h.spec("pypar", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let (a, b) = tokio::join!(
        h.invoke(&spec, json!({"sleep": 1})),
        h.invoke(&spec, json!({"sleep": 1}))
    );
    let (a, b) = (json_of(&a.expect("a")), json_of(&b.expect("b")));
    assert_eq!(
        (a["count"].clone(), b["count"].clone()),
        (json!(1), json!(1)),
        "two sandboxes, each ran once"
    );
    assert_eq!(h.worker.stats().live, 2);
    // Reserved concurrency 1: a second concurrent call is throttled.
    let req = |p: Value| InvokeRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        spec: spec.clone(),
        invoked_arn: spec.arn.clone(),
        payload: serde_json::to_vec(&p).unwrap_or_default().into(),
        client_context: None,
        reserved_concurrency: Some(1),
        unreserved_limit: 100,
        log: None,
        response: None,
    };
    let (x, y) = tokio::join!(h.worker.invoke(req(json!({"sleep": 1}))), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.worker.invoke(req(json!({}))).await
    });
    assert!(x.is_ok());
    match y {
        Err(InvokeError::TooManyRequests { reason }) => {
            assert_eq!(reason, "ReservedFunctionConcurrentInvocationLimitExceeded")
        }
        other => panic!("expected throttle, got {other:?}"),
    }
    match Arc::try_unwrap(h) {
        Ok(h) => h.finish().await,
        Err(_) => panic!("harness still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_removes_what_a_killed_one_left() {
    // Without networking: the network's own crash cleanup is tested in tests/netns.rs (a live
    // worker holds its network instance, and this "crashed" one is still alive).
    let h = Harness::with_engine(Duration::from_secs(60), |cfg| {
        cfg.network = hearth_worker::netns::NetPolicy::None
    });
    let spec = h.spec("pyleft", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    h.invoke(&spec, json!({})).await.expect("invoke");
    // The idle sandbox frozen, as an idle one is when the worker dies: it must still go.
    assert_eq!(h.worker.freeze_idle(Duration::ZERO), 1);
    let engine = h.engine.clone();
    // The sandbox that ran, and maybe ready ones the pool created.
    assert!(!engine.list().is_empty());
    // Simulate a crash: a new engine on the same state root, without shutting the old one down.
    let cfg = engine.config().clone();
    let engine2 = Arc::new(RunscEngine::new(cfg).expect("engine"));
    let started = std::time::Instant::now();
    let worker2 = Worker::new(
        engine2.clone(),
        ImageStore::new(image_cache()),
        WorkerConfig::default(),
    );
    // A frozen sandbox does not answer runsc: not thawed first, runsc waits for it (a minute).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "cleaning up took {:?}",
        started.elapsed()
    );
    assert_eq!(engine2.list(), Vec::<String>::new());
    assert_eq!(engine2.cgroups().sandbox_dirs(), Vec::<PathBuf>::new());
    worker2.shutdown().await;
    // The old worker's pool still holds the (now deleted) sandbox; shutting it down is harmless.
    h.worker.shutdown().await;
}

/// A handler whose init is heavy: imports, CPU work, and `STATE_MB` of random state, with
/// SnapStart hooks from the official `snapshot_restore_py` package.
fn heavy_app(state_mb: usize, busy_s: f64, failing_hook: bool) -> String {
    format!(
        r#"
import os, time, hashlib, uuid
t0 = time.time()
import json, decimal, email.message, http.client, xml.dom.minidom, argparse, logging, csv
from snapshot_restore_py import register_before_snapshot, register_after_restore
STATE = [os.urandom(1024 * 1024) for _ in range({state_mb})]
DIGEST = hashlib.sha256(b"".join(STATE)).hexdigest()
while time.time() - t0 < {busy_s}:
    pass
BEFORE = []
RESTORED = []

@register_before_snapshot
def before():
    BEFORE.append(1)

@register_after_restore
def after():
    if {failing_hook}:
        raise RuntimeError("after-restore hook refused")
    RESTORED.append(str(uuid.uuid4()))

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {{
        "init_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"],
        "before": len(BEFORE),
        "restored": RESTORED,
        "state_mb": len(STATE),
        "digest_ok": hashlib.sha256(b"".join(STATE)).hexdigest() == DIGEST,
    }}
"#,
        failing_hook = if failing_hook { "True" } else { "False" }
    )
}

fn chunk_store(origin: &Path) -> hearth_store::ChunkStore {
    let secrets =
        hearth_store::Secrets::load_or_create(&origin.join("store.key")).expect("secrets");
    hearth_store::ChunkStore::local(&origin.join("origin"), None, secrets).expect("chunk store")
}

fn snap_harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    snap_worker(dir, None)
}

/// A worker with snapshots in a chunk store; `shared` is the directory holding the chunk
/// store's origin and key (default: inside the worker's own directory).
fn snap_worker(dir: tempfile::TempDir, shared: Option<&Path>) -> Harness {
    let origin = shared
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.path().join("store"));
    let engine = Arc::new(engine_in(dir.path()));
    let worker = Worker::new(
        engine.clone(),
        ImageStore::new(image_cache()),
        WorkerConfig {
            keep_alive: Duration::from_secs(60),
            memory_budget_mb: 8192,
            snapshot_dir: Some(dir.path().join("snapshots")),
            chunk_store: Some(chunk_store(&origin)),
            code_cache: Some(code_root(dir.path())),
            ..WorkerConfig::default()
        },
    );
    Harness {
        worker,
        engine,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_worker_restores_from_the_chunk_store_and_corrupt_chunks_mean_boot() {
    let shared = tempfile::tempdir().expect("tempdir");
    let a = snap_worker(tempfile::tempdir().expect("tempdir"), Some(shared.path()));
    let app = heavy_app(4, 0.0, false);
    let mut spec = a.spec(
        "snapshare",
        "python3.11",
        "app.handler",
        &[("app.py", &app)],
    );
    spec.snap_start = true;
    let meta = a.worker.create_snapshot(&spec).await.expect("snapshot");
    a.finish().await;

    // A second worker with nothing local but the same chunk store restores the snapshot.
    let b = snap_worker(tempfile::tempdir().expect("tempdir"), Some(shared.path()));
    let mut spec_b = b.spec(
        "snapshare",
        "python3.11",
        "app.handler",
        &[("app.py", &app)],
    );
    spec_b.snap_start = true;
    let r = b.invoke(&spec_b, json!({})).await.expect("invoke");
    assert_eq!(
        json_of(&r)["init_type"],
        "snap-start",
        "{}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_eq!(b.worker.stats().restores, 1);
    b.finish().await;

    // Corrupt one stored chunk; a third worker (no local copy) detects it and boots cleanly.
    let mut chunks = Vec::new();
    let mut stack = vec![shared.path().join("origin/chunks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("chunks").flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                chunks.push(e.path());
            }
        }
    }
    assert!(
        chunks.len() as u64 >= meta.image_bytes / (512 * 1024),
        "image stored as 512 KiB chunks"
    );
    chunks.sort();
    let victim = &chunks[chunks.len() / 2];
    let mut bytes = std::fs::read(victim).expect("chunk");
    bytes[100] ^= 0xff;
    std::fs::write(victim, bytes).expect("corrupt");
    let c = snap_worker(tempfile::tempdir().expect("tempdir"), Some(shared.path()));
    let mut spec_c = c.spec(
        "snapshare",
        "python3.11",
        "app.handler",
        &[("app.py", &app)],
    );
    spec_c.snap_start = true;
    let r = c.invoke(&spec_c, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(
        json_of(&r)["init_type"],
        "on-demand",
        "a corrupt snapshot is never restored"
    );
    assert_eq!(c.worker.stats().restores, 0);
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_init_state_runs_hooks_and_serves_two_clones() {
    let h = snap_harness();
    // A heavy init: imports, ~1 s of work, 100 MB of state.
    let mut spec = h.spec(
        "snappy",
        "python3.11",
        "app.handler",
        &[("app.py", &heavy_app(100, 1.0, false))],
    );
    spec.memory_mb = 512;
    spec.snap_start = true;
    let meta = h.worker.create_snapshot(&spec).await.expect("snapshot");
    assert_eq!(
        meta.point,
        hearth_worker::snapshots::RestorePoint::RestoreNext
    );
    assert!(
        meta.image_bytes > 100 * 1024 * 1024,
        "image holds the state: {}",
        meta.image_bytes
    );
    assert_eq!(h.worker.stats().live, 0, "the checkpointed sandbox is gone");

    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["init_type"], "snap-start");
    assert_eq!(
        v["before"], 1,
        "before-snapshot hook ran once, before the checkpoint"
    );
    assert_eq!(
        v["restored"].as_array().map(Vec::len),
        Some(1),
        "after-restore hook ran"
    );
    assert_eq!(v["state_mb"], 100);
    assert_eq!(
        v["digest_ok"], true,
        "init's state survived the restore intact"
    );
    assert!(r.log.contains("Restore Duration:"), "{}", r.log);
    assert!(!r.log.contains("Init Duration:"), "{}", r.log);
    let s = h.worker.stats();
    assert_eq!((s.restores, s.cold_starts), (1, 0));

    // Two more clones at once (one may reuse the warm sandbox; retire it first).
    h.worker.retire("snappy");
    let (a, b) = tokio::join!(
        h.invoke(&spec, json!({"sleep": 1})),
        h.invoke(&spec, json!({"sleep": 1}))
    );
    let (a, b) = (json_of(&a.expect("a")), json_of(&b.expect("b")));
    assert_eq!(
        (a["digest_ok"].clone(), b["digest_ok"].clone()),
        (json!(true), json!(true))
    );
    assert_ne!(
        a["restored"], b["restored"],
        "each clone ran its own after-restore hook"
    );
    assert_eq!(h.worker.stats().restores, 3);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_after_restore_hook_falls_back_to_boot() {
    let h = snap_harness();
    let mut spec = h.spec(
        "snaphook",
        "python3.11",
        "app.handler",
        &[("app.py", &heavy_app(1, 0.0, true))],
    );
    spec.snap_start = true;
    h.worker.create_snapshot(&spec).await.expect("snapshot");
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(
        json_of(&r)["init_type"],
        "on-demand",
        "booted after the hook failed"
    );
    assert!(r.log.contains("RESTORE_ERROR"), "{}", r.log);
    assert!(r.log.contains("after-restore hook refused"), "{}", r.log);
    let s = h.worker.stats();
    assert_eq!((s.restores, s.cold_starts), (0, 1));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_corrupt_snapshots_mean_a_clean_boot() {
    let h = snap_harness();
    let mut spec = h.spec(
        "snapstale",
        "python3.11",
        "app.handler",
        &[("app.py", &heavy_app(1, 0.0, false))],
    );
    spec.snap_start = true;
    h.worker.create_snapshot(&spec).await.expect("snapshot");
    // Different code than the snapshot was taken with: boot, never restore.
    let mut changed = spec.clone();
    let app = heavy_app(1, 0.0, false);
    changed.code_sha256 = h.code("snapstale", &[("app.py", &app), ("other.py", "X = 1\n")]);
    let r = h.invoke(&changed, json!({})).await.expect("invoke");
    assert_eq!(json_of(&r)["init_type"], "on-demand");
    h.worker.retire("snapstale");
    // Corrupt the image: the restore fails and the worker boots instead.
    let img = h
        .dir
        .path()
        .join("snapshots/snapstale")
        .read_dir()
        .expect("dir")
        .flatten()
        .next()
        .expect("snap")
        .path();
    let img = img.join("checkpoint.img");
    let len = std::fs::metadata(&img).expect("img").len() as usize;
    let mut bytes = std::fs::read(&img).expect("read");
    for b in bytes.iter_mut().skip(len / 3).take(len / 3) {
        *b ^= 0x5a;
    }
    std::fs::write(&img, bytes).expect("write");
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(json_of(&r)["init_type"], "on-demand");
    assert_eq!(h.worker.stats().restores, 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_image_fetches_it_from_the_chunk_store() {
    let shared = tempfile::tempdir().expect("tempdir");
    let chunks = chunk_store(shared.path());
    let built = ImageStore::new(image_cache());
    let stored = hearth_worker::artifacts::publish_image(&built, &chunks, "provided")
        .await
        .expect("publish");
    assert!(stored > 0);
    // Publishing again stores nothing new.
    assert_eq!(
        hearth_worker::artifacts::publish_image(&built, &chunks, "provided")
            .await
            .expect("publish"),
        0
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_cache = dir.path().join("images");
    let engine = Arc::new(engine_in(dir.path()));
    let worker = Worker::new(
        engine.clone(),
        ImageStore::new(&empty_cache),
        WorkerConfig {
            chunk_store: Some(chunks),
            memory_budget_mb: 4096,
            code_cache: Some(code_root(dir.path())),
            ..WorkerConfig::default()
        },
    );
    let h = Harness {
        worker,
        engine,
        dir,
    };
    let spec = h.spec(
        "fetched",
        "provided",
        "x",
        &[("bootstrap", SHELL_BOOTSTRAP)],
    );
    let r = h.invoke(&spec, json!({"a": 1})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(json_of(&r)["echo"], json!({"a": 1}));
    assert_eq!(
        ImageStore::new(&empty_cache).image_id("provided"),
        built.image_id("provided"),
        "the fetched image keeps its identity"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sandbox_that_died_is_replaced_not_invoked() {
    let h = Harness::new(Duration::from_secs(60));
    let app = r#"
import os, threading, time
def handler(event, context):
    if event.get("die_later"):
        threading.Thread(target=lambda: (time.sleep(0.3), os._exit(7))).start()
    return {"pid": os.getpid(), "ok": True}
"#;
    let spec = h.spec("pydies", "python3.11", "app.handler", &[("app.py", app)]);
    let r = h
        .invoke(&spec, json!({"die_later": true}))
        .await
        .expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(
        !r.function_error,
        "a dead idle sandbox must not fail the next call: {}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_eq!(h.worker.stats().cold_starts, 2);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_leaks_nothing() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec("pygone", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    // The caller gives up (as an HTTP client timing out does) while the function runs.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        h.invoke(&spec, json!({"sleep": 1.5})),
    )
    .await;
    assert!(gave_up.is_err());
    let mut waited = 0;
    while h.worker.stats().idle == 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let s = h.worker.stats();
    assert_eq!(
        (s.live, s.idle),
        (1, 1),
        "the invocation finished and its sandbox is back in the pool"
    );
    assert_eq!(
        json_of(&h.invoke(&spec, json!({})).await.expect("invoke"))["count"],
        2
    );
    h.finish().await;
}

/// Wait until the pool holds at least `n` ready sandboxes (bounded).
async fn wait_ready(h: &Harness, n: usize) {
    for _ in 0..200 {
        if h.worker.stats().ready >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the pool never had {n} ready sandboxes: {:?}",
        h.worker.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_with_different_code_environment_and_memory_are_served_from_one_pool() {
    let h = Harness::new(Duration::from_secs(60));
    h.worker.prewarm("python3.11");
    let mut a = h.spec("poola", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    a.env.insert("GREETING".into(), "from a".into());
    a.memory_mb = 256;
    let mut b = h.spec(
        "poolb",
        "python3.11",
        "other.handler",
        &[(
            "other.py",
            "import os\ndef handler(event, context):\n    blocks = [bytearray(1024 * 1024) for _ in range(event.get('alloc_mb', 0))]\n    for x in blocks:\n        x[::4096] = b'x' * len(x[::4096])\n    return {'code': 'b', 'greeting': os.environ.get('GREETING'), 'memory': context.memory_limit_in_mb, 'files': sorted(os.listdir('/var/task'))}\n",
        )],
    );
    b.env.insert("GREETING".into(), "from b".into());
    b.memory_mb = 1024;

    wait_ready(&h, 1).await;
    let r = h.invoke(&a, json!({})).await.expect("invoke a");
    let v = json_of(&r);
    assert_eq!(v["greeting"], "from a", "{v}");
    assert_eq!(v["memory"], "256", "{v}");
    assert_eq!(h.worker.stats().claimed_ready, 1);

    // The pool refills; the next function claims a sandbox created before it was known, gets
    // its own code and environment, and a memory limit written at claim time: 600 MB fit in
    // a 1024 MB function although the sandbox was created with the smallest limit.
    wait_ready(&h, 1).await;
    let r = h
        .invoke(&b, json!({"alloc_mb": 600}))
        .await
        .expect("invoke b");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["code"], "b", "{v}");
    assert_eq!(v["greeting"], "from b", "{v}");
    assert_eq!(v["memory"], "1024", "{v}");
    assert_eq!(v["files"], json!(["other.py"]), "only b's code: {v}");
    assert_eq!(h.worker.stats().claimed_ready, 2);
    assert!(
        r.log.contains("Init Duration"),
        "a cold start that ran init: {}",
        r.log
    );
    // And a's limit stayed its own: 600 MB is too much for 256 MB.
    let r = h
        .invoke(&a, json!({"alloc_mb": 600}))
        .await
        .expect("invoke a");
    assert!(r.function_error);
    assert_eq!(json_of(&r)["errorType"], "Runtime.OutOfMemory");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_still_serves_cold_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(engine_in(dir.path()));
    let worker = Worker::new(
        engine.clone(),
        ImageStore::new(image_cache()),
        WorkerConfig {
            memory_budget_mb: 8192,
            prewarm: hearth_worker::prewarm::PrewarmConfig::disabled(),
            code_cache: Some(code_root(dir.path())),
            ..WorkerConfig::default()
        },
    );
    let h = Harness {
        worker,
        engine,
        dir,
    };
    h.worker.prewarm("python3.11");
    let spec = h.spec("nopool", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let s = h.worker.stats();
    assert_eq!(
        (s.cold_starts, s.claimed_ready, s.ready),
        (1, 0, 0),
        "{s:?}"
    );
    h.finish().await;
}

const TMP_APP: &str = r#"
import os
def handler(event, context):
    path = "/tmp/fill"
    if event.get("check"):
        return {"entries": sorted(os.listdir("/tmp"))}
    if event.get("mark"):
        open("/tmp/marker", "w").write("x")
        return {"entries": sorted(os.listdir("/tmp"))}
    chunk = b"z" * (1024 * 1024)
    with open(path, "wb") as f:
        for _ in range(event["mb"]):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    size = os.path.getsize(path)
    os.remove(path)
    st = os.statvfs("/tmp")
    return {"written_mb": size // (1024 * 1024), "tmp_total_mb": st.f_blocks * st.f_frsize // (1024 * 1024)}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmp_is_disk_of_the_ephemeral_storage_size_not_memory() {
    let h = Harness::new(Duration::from_secs(60));
    let mut big = h.spec(
        "tmpbig",
        "python3.11",
        "app.handler",
        &[("app.py", TMP_APP)],
    );
    big.memory_mb = 256;
    big.timeout_s = 60;
    big.ephemeral_storage_mb = 1024;
    let r = h.invoke(&big, json!({"mb": 600})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["written_mb"], 600, "{v}");
    assert!(v["tmp_total_mb"].as_u64().unwrap_or(0) >= 1024, "{v}");
    let peak: u64 = r
        .log
        .split("Max Memory Used: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("REPORT line with Max Memory Used");
    // 600 MB written with a 256 MB function: /tmp is not memory, and the page cache of the
    // writes is not reported as the function's memory.
    assert!(peak < 256, "writing /tmp does not use memory: {peak} MB");

    // Past its size the function sees ENOSPC: a function error, and the sandbox still works.
    let mut small = big.clone();
    small.name = "tmpsmall".into();
    small.arn = small.arn.replace("tmpbig", "tmpsmall");
    small.ephemeral_storage_mb = 512;
    let r = h.invoke(&small, json!({"mb": 600})).await.expect("invoke");
    assert!(r.function_error);
    let text = String::from_utf8_lossy(&r.payload).into_owned();
    assert!(text.contains("No space left on device"), "{text}");
    let r = h
        .invoke(&small, json!({"mark": true}))
        .await
        .expect("invoke");
    // The same sandbox: its /tmp still holds the partial file and now the marker.
    assert_eq!(json_of(&r)["entries"], json!(["fill", "marker"]));

    // A new sandbox starts with an empty /tmp.
    let mut next = small.clone();
    next.revision_id = "r2".into();
    let r = h
        .invoke(&next, json!({"check": true}))
        .await
        .expect("invoke");
    assert_eq!(json_of(&r)["entries"], json!([]), "fresh /tmp");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_go_into_pre_created_sandboxes_and_other_engines_snapshots_mean_boot() {
    let h = snap_harness();
    let mut spec = h.spec(
        "snappool",
        "python3.11",
        "app.handler",
        &[("app.py", &heavy_app(10, 0.1, false))],
    );
    spec.snap_start = true;
    h.worker.create_snapshot(&spec).await.expect("snapshot");
    // A cold start registers demand for the snapshot's kind; wait for a ready one, then
    // the next cold start restores into it.
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(h.worker.stats().restores, 1);
    wait_ready(&h, 1).await;
    h.worker.retire("snappool");
    let before = h.worker.stats().claimed_ready;
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert!(r.log.contains("Restore Duration"), "{}", r.log);
    let s = h.worker.stats();
    assert_eq!(s.restores, 2, "{s:?}");
    assert_eq!(
        s.claimed_ready,
        before + 1,
        "restored into a ready sandbox: {s:?}"
    );

    // A snapshot taken by another engine (version, platform or checkpoint format) is never
    // restored: the cold start boots, and a new snapshot replaces it.
    let meta_path = h
        .dir
        .path()
        .join("snapshots/snappool")
        .read_dir()
        .expect("snapshot dir")
        .flatten()
        .next()
        .expect("one snapshot")
        .path()
        .join("snapshot.json");
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("read")).expect("json");
    let current = meta["deps"]["engine"].clone();
    meta["deps"]["engine"] =
        json!("runsc version 0.0~20221219.0 platform=ptrace compression=flate");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write");
    h.worker.retire("snappool");
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert!(r.log.contains("Init Duration"), "booted: {}", r.log);
    assert_eq!(h.worker.stats().restores, 2);
    let mut replaced = false;
    for _ in 0..300 {
        let text = std::fs::read(&meta_path).unwrap_or_default();
        if let Ok(m) = serde_json::from_slice::<Value>(&text)
            && m["deps"]["engine"] == current
        {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replaced, "a new snapshot with the current engine was taken");
    h.worker.retire("snappool");
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert!(r.log.contains("Restore Duration"), "{}", r.log);
    assert_eq!(h.worker.stats().restores, 3);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_boots_take_over_the_prestarted_interpreter_unless_startup_variables_differ() {
    let h = Harness::new(Duration::from_secs(60));
    h.worker.prewarm("python3.11");
    let app = "import os, sys, time\n\
               def handler(event, context):\n    \
                   import helper\n    \
                   return {'argv': sys.orig_argv, 'path': sys.path[:2], 'pythonpath': os.environ.get('PYTHONPATH'), \
                           'greeting': os.environ.get('GREETING'), 'home': os.environ.get('HOME'), \
                           'helper': helper.WHERE, 'cwd': os.getcwd(), 'gmtoff': time.localtime(0).tm_gmtoff}\n";
    let files = [("app.py", app), ("helper.py", "WHERE = 'task'\n")];
    let mut a = h.spec("prestarted", "python3.11", "app.handler", &files);
    a.env.insert("GREETING".into(), "hi".into());
    // The function's own time zone, which the prestarted interpreter reads at the hand-over.
    a.env.insert("TZ".into(), "America/New_York".into());
    wait_ready(&h, 1).await;
    let r = h.invoke(&a, json!({})).await.expect("invoke");
    let v = json_of(&r);
    assert_eq!(v["gmtoff"], -5 * 3600, "{v}");
    // The interpreter the pool had started, with exactly what a fresh one would see.
    assert_eq!(
        v["argv"],
        json!(["/usr/bin/python3", "/var/runtime/prestart"]),
        "{v}"
    );
    assert_eq!(v["path"], json!(["/var/task", "/var/runtime"]), "{v}");
    assert_eq!(v["pythonpath"], "/var/runtime", "{v}");
    assert_eq!(v["greeting"], "hi", "{v}");
    assert_eq!(v["home"], Value::Null, "{v}");
    assert_eq!(v["helper"], "task", "{v}");
    assert_eq!(v["cwd"], "/var/task", "{v}");
    assert_eq!(h.worker.stats().claimed_ready, 1);

    // PYTHONPATH is read when Python starts: a fresh interpreter, which honours it.
    let mut b = h.spec(
        "fresh",
        "python3.11",
        "app.handler",
        &[
            ("app.py", app),
            ("helper.py", "WHERE = 'task'\n"),
            ("extra/helper.py", "WHERE = 'extra'\n"),
        ],
    );
    b.env.insert("PYTHONPATH".into(), "/var/task/extra".into());
    wait_ready(&h, 1).await;
    let r = h.invoke(&b, json!({})).await.expect("invoke");
    let v = json_of(&r);
    assert_eq!(
        v["argv"],
        json!(["/usr/bin/python3", "-m", "awslambdaric", "app.handler"]),
        "{v}"
    );
    assert_eq!(v["pythonpath"], "/var/runtime:/var/task/extra", "{v}");
    assert_eq!(v["helper"], "task", "the task root still comes first: {v}");
    assert_eq!(h.worker.stats().claimed_ready, 2);
    h.finish().await;
}

/// What a Node.js handler sees of how it was started: `/proc/self/cmdline` tells a prestarted
/// node (`... /var/runtime/prestart.mjs <client>`) from one the bootstrap started.
const NODE_START_APP: &str = r#"
import fs from "node:fs";
import v8 from "node:v8";
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
export const handler = async () => ({
  cmdline: fs.readFileSync("/proc/self/cmdline", "utf8").split("\0").filter(Boolean),
  argv: process.argv, execArgv: process.execArgv,
  heapMb: Math.round(v8.getHeapStatistics().heap_size_limit / 1048576),
  nodePath: process.env.NODE_PATH, greeting: process.env.GREETING ?? null,
  home: process.env.HOME ?? null, options: process.env.NODE_OPTIONS ?? null,
  helper: require("helper").where, cwd: process.cwd(),
  tzOffset: new Date(0).getTimezoneOffset(), env: process.env,
});
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_boots_take_over_a_node_prestarted_for_their_memory_size_unless_startup_variables_differ()
 {
    let h = Harness::new(Duration::from_secs(60));
    h.worker.prewarm("nodejs22.x");
    let files = [
        ("index.mjs", NODE_START_APP),
        // Found only through NODE_PATH (its last entry is /var/task), as a fresh node finds it.
        ("helper.js", "exports.where = 'task';\n"),
    ];
    let started_as = |v: &Value| -> Vec<String> {
        v["cmdline"]
            .as_array()
            .expect("cmdline")
            .iter()
            .map(|a| a.as_str().unwrap_or_default().to_string())
            .collect()
    };
    let client22 = "/var/runtime/node_modules/aws-lambda-ric/bin/index.mjs";
    let heap_flags = |mb: u32| {
        let young = mb / 10;
        vec![
            "--expose-gc".to_string(),
            "--max-http-header-size".into(),
            "81920".into(),
            format!("--max-semi-space-size={}", young / 2),
            format!("--max-old-space-size={}", mb - young),
        ]
    };

    // Lambda's default size: the prewarmed sandbox's node, with what a fresh one would have.
    let mut a = h.spec("nodepre", "nodejs22.x", "index.handler", &files);
    a.memory_mb = 128;
    a.env.insert("GREETING".into(), "hi".into());
    // Node follows TZ when it changes: a prestarted node takes a function's own.
    a.env.insert("TZ".into(), "America/New_York".into());
    wait_ready(&h, 1).await;
    let r = h.invoke(&a, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    let mut want = vec!["/var/lang/bin/node".to_string()];
    want.extend(heap_flags(128));
    want.extend([
        "/var/runtime/prestart.mjs".to_string(),
        client22.to_string(),
    ]);
    assert_eq!(started_as(&v), want, "{v}\n{}", r.log);
    assert_eq!(v["tzOffset"], 300, "{v}");
    let prestarted = v.clone();
    assert_eq!(
        v["argv"],
        json!(["/var/lang/bin/node", client22, "index.handler"]),
        "{v}"
    );
    assert_eq!(v["execArgv"], json!(heap_flags(128)), "{v}");
    assert_eq!(v["greeting"], "hi", "{v}");
    assert_eq!(v["home"], Value::Null, "{v}");
    assert_eq!(v["helper"], "task", "{v}");
    assert_eq!(v["cwd"], "/var/task", "{v}");
    assert_eq!(
        v["nodePath"],
        "/opt/nodejs/node22/node_modules:/opt/nodejs/node_modules:/var/runtime/node_modules:/var/runtime:/var/task",
        "{v}"
    );
    assert_eq!(h.worker.stats().claimed_ready, 1);

    // NODE_OPTIONS is read when node starts: a fresh node from the bootstrap, which honours it.
    // (Before any other kind has demand: the sandbox that comes ready is one of Node.js 22's.)
    let mut c = h.spec("nodefresh", "nodejs22.x", "index.handler", &files);
    c.memory_mb = 128;
    c.env
        .insert("NODE_OPTIONS".into(), "--no-deprecation".into());
    c.env.insert("GREETING".into(), "hi".into());
    c.env.insert("TZ".into(), "America/New_York".into());
    wait_ready(&h, 1).await;
    let before = h.worker.stats().claimed_ready;
    let r = h.invoke(&c, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    let mut want = vec!["/var/lang/bin/node".to_string()];
    want.extend(heap_flags(128));
    want.extend([client22.to_string(), "index.handler".to_string()]);
    assert_eq!(started_as(&v), want, "{v}");
    assert_eq!(v["options"], "--no-deprecation", "{v}");
    assert_eq!(
        h.worker.stats().claimed_ready,
        before + 1,
        "a ready sandbox, declined"
    );
    assert_eq!(v["helper"], "task", "{v}");
    // The prestarted node's environment is the one the bootstrap gives a fresh node (what the
    // shell adds included), but for what differs between the two functions.
    let differ = [
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "_X_AMZN_TRACE_ID",
        "NODE_OPTIONS",
    ];
    let env_of = |v: &Value| -> BTreeMap<String, Value> {
        v["env"]
            .as_object()
            .expect("env")
            .iter()
            .filter(|(k, _)| !differ.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(env_of(&prestarted), env_of(&v));
    assert_eq!(v["env"]["PWD"], "/var/task", "{v}");

    // Another size on Node.js 24: its sandbox is made for 512 MiB, and its node sized so.
    let mut b = h.spec("nodepre24", "nodejs24.x", "index.handler", &files);
    b.memory_mb = 512;
    let r = h.invoke(&b, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    let client24 = "/var/runtime/node_modules/aws-lambda-ric/index.mjs";
    let mut want = vec!["/var/lang/bin/node".to_string()];
    want.extend(heap_flags(512));
    want.extend([
        "/var/runtime/prestart.mjs".to_string(),
        client24.to_string(),
    ]);
    assert_eq!(started_as(&v), want, "{v}");
    assert_eq!(v["execArgv"], json!(heap_flags(512)), "{v}");
    let heap = v["heapMb"].as_u64().expect("heap");
    assert!(
        (460..=560).contains(&heap),
        "V8's heap is sized for 512 MiB: {v}"
    );

    // A size with no sandbox made for it may take one made for 128 MB (then its prestart
    // declines and the bootstrap starts node) or a new one: node's heap is 256 MB's either way.
    let mut d = h.spec("noderesized", "nodejs22.x", "index.handler", &files);
    d.memory_mb = 256;
    let r = h.invoke(&d, json!({})).await.expect("invoke");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let v = json_of(&r);
    assert_eq!(v["execArgv"], json!(heap_flags(256)), "{v}");
    assert_eq!(started_as(&v)[1..6], heap_flags(256)[..], "{v}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_waits_for_sandboxes_that_come_free_instead_of_starting_one_each() {
    let h = Arc::new(Harness::with_configs(
        Duration::from_secs(60),
        |_| {},
        |w| w.start_limit = 1,
    ));
    let spec = h.spec("burst", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    // One call first: the pool learns how long a call and a cold start take.
    h.invoke(&spec, json!({})).await.expect("first call");
    let before = h.worker.stats();
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let (h, spec) = (h.clone(), spec.clone());
            tokio::spawn(async move { h.invoke(&spec, json!({ "n": i })).await })
        })
        .collect();
    for c in calls {
        let r = c.await.expect("task").expect("invoke");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    }
    let after = h.worker.stats();
    // Every call ran; most waited for a sandbox of the burst rather than starting their own.
    assert_eq!(after.warm_starts + after.cold_starts, 25, "{after:?}");
    let new_sandboxes = after.cold_starts - before.cold_starts;
    assert!(
        new_sandboxes < 12,
        "{new_sandboxes} cold starts for 24 short calls: {after:?}"
    );
    assert!(after.paced >= 12, "{after:?}");

    // Slow calls are not waited for: concurrent 3 s calls each get a sandbox, the start limit
    // only takes them one at a time. (3 s: longer than any cold start on a loaded machine, so
    // waiting for the busy sandbox is never the faster choice.)
    let slow = h.spec(
        "slowburst",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    h.invoke(&slow, json!({"sleep": 3}))
        .await
        .expect("slow call");
    let before = h.worker.stats();
    let (a, b, c) = tokio::join!(
        h.invoke(&slow, json!({"sleep": 3})),
        h.invoke(&slow, json!({"sleep": 3})),
        h.invoke(&slow, json!({"sleep": 3}))
    );
    for r in [a, b, c] {
        assert!(!r.expect("slow").function_error);
    }
    let after = h.worker.stats();
    assert_eq!(
        after.cold_starts - before.cold_starts,
        2,
        "one warm, two new: {after:?}"
    );
    match Arc::try_unwrap(h) {
        Ok(h) => h.finish().await,
        Err(_) => panic!("harness still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_past_its_scaling_rate_is_throttled_and_others_are_not() {
    // One new sandbox per function per hour: the function's second sandbox is refused.
    let h = Harness::with_configs(
        Duration::from_secs(60),
        |_| {},
        |w| {
            w.burst = hearth_worker::scaling::BurstRule {
                per_window: 1,
                window: Duration::from_secs(3600),
            }
        },
    );
    let spec = h.spec("rate", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let r = h.invoke(&spec, json!({})).await.expect("first cold start");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    // Its warm sandbox still serves: warm starts are not new sandboxes.
    h.invoke(&spec, json!({})).await.expect("warm call");
    // A new revision of the same function needs a new sandbox: past the rate.
    let mut changed = spec.clone();
    changed.revision_id = "r2".into();
    changed.env.insert("GREETING".into(), "changed".into());
    match h.invoke(&changed, json!({})).await {
        Err(InvokeError::TooManyRequests { reason }) => {
            assert_eq!(reason, "FunctionInvocationRateLimitExceeded")
        }
        other => panic!("expected a throttle, got {other:?}"),
    }
    // Another function has its own allowance.
    let other = h.spec(
        "rate-other",
        "python3.11",
        "app.handler",
        &[("app.py", PY_APP)],
    );
    let r = h.invoke(&other, json!({})).await.expect("another function");
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    let s = h.worker.stats();
    assert_eq!(
        (s.cold_starts, s.warm_starts, s.burst_throttled),
        (2, 1, 1),
        "{s:?}"
    );
    h.finish().await;
}

/// The memory budget holds two 256 MB sandboxes: a third function evicts the least recently
/// used idle one (the others stay warm), and a function too big for the budget is refused
/// without evicting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_evicts_the_least_recently_used_idle_sandbox() {
    let budget = 2 * (256 + hearth_worker::engine::SENTRY_OVERHEAD_MB) + 60;
    let h = Harness::with_configs(
        Duration::from_secs(600),
        |_| {},
        |cfg| {
            cfg.memory_budget_mb = budget;
            cfg.prewarm = hearth_worker::prewarm::PrewarmConfig::disabled();
            cfg.demand = hearth_worker::demand::DemandConfig::disabled();
        },
    );
    let spec = |name: &str| h.spec(name, "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let (a, b, c) = (spec("lru-a"), spec("lru-b"), spec("lru-c"));
    let count = |r: Result<InvokeResult, InvokeError>| {
        let r = r.expect("invoke");
        assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
        json_of(&r)["count"].as_u64().expect("count")
    };
    assert_eq!(count(h.invoke(&a, json!({})).await), 1);
    assert_eq!(count(h.invoke(&b, json!({})).await), 1);
    // c needs room: a, used longest ago, goes.
    assert_eq!(count(h.invoke(&c, json!({})).await), 1);
    assert_eq!(count(h.invoke(&b, json!({})).await), 2, "b stayed warm");
    assert_eq!(count(h.invoke(&a, json!({})).await), 1, "a was evicted");
    // That evicted c (b was used after it).
    assert_eq!(count(h.invoke(&b, json!({})).await), 3, "b stayed warm");
    let mut big = spec("lru-big");
    big.memory_mb = 1024;
    match h.invoke(&big, json!({})).await {
        Err(InvokeError::TooManyRequests { .. }) => {}
        other => panic!("a function bigger than the budget: {other:?}"),
    }
    // The refused one evicted nothing.
    assert_eq!(count(h.invoke(&a, json!({})).await), 2, "a stayed warm");
    assert_eq!(count(h.invoke(&b, json!({})).await), 4, "b stayed warm");
    h.finish().await;
}

/// Streams `one `, `two `, `three` a second apart (curl's chunked upload from a pipe), or, for
/// `{"cut": true}`, `partial` and then breaks the stream off.
const STREAMING_BOOTSTRAP: &str = r#"#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
post() {
  curl -sS --noproxy '*' -o /dev/null -X POST -T - -H 'Expect:' \
    -H 'Lambda-Runtime-Function-Response-Mode: streaming' -H 'Content-Type: text/plain' \
    "$API/invocation/$ID/response"
}
while true; do
  HEADERS="$(mktemp)"
  EVENT="$(curl -sS --noproxy '*' -D "$HEADERS" "$API/invocation/next")"
  ID="$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | cut -d' ' -f2 | tr -d '\r\n')"
  rm -f "$HEADERS"
  case "$EVENT" in
    *'"cut":true'*) ( printf 'partial'; sleep 3 ) | timeout -s KILL 1 sh -c "$(declare -f post); ID=$ID API=$API post" ;;
    *) { printf 'one '; sleep 1; printf 'two '; sleep 1; printf 'three'; } | post ;;
  esac
done
"#;

/// A response sink that records what arrived and when.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(std::time::Instant, String)>>);

impl hearth_core::invoker::ResponseSink for Recorded {
    fn start(&self, content_type: Option<&str>) {
        if let Ok(mut v) = self.0.lock() {
            v.push((std::time::Instant::now(), format!("start {content_type:?}")));
        }
    }
    fn chunk(&self, bytes: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.push((
                std::time::Instant::now(),
                String::from_utf8_lossy(bytes).into_owned(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_reaches_the_sink_as_the_function_writes_it() {
    let h = Harness::new(Duration::from_secs(60));
    let spec = h.spec(
        "streamer",
        "provided.al2023",
        "function.handler",
        &[("bootstrap", STREAMING_BOOTSTRAP)],
    );
    let request = |payload: Value, sink: Option<Arc<Recorded>>| InvokeRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        spec: spec.clone(),
        invoked_arn: spec.arn.clone(),
        payload: serde_json::to_vec(&payload).expect("json").into(),
        client_context: None,
        reserved_concurrency: None,
        unreserved_limit: 100,
        log: None,
        response: sink.map(|s| hearth_core::invoker::ResponseTarget(s)),
    };
    let sink = Arc::new(Recorded::default());
    let r = h
        .worker
        .invoke(request(json!({}), Some(sink.clone())))
        .await
        .expect("invoke");
    let ended = std::time::Instant::now();
    assert!(!r.function_error, "{}", String::from_utf8_lossy(&r.payload));
    assert!(r.payload.is_empty(), "the stream went to the sink");
    let got = sink.0.lock().expect("lock").clone();
    assert_eq!(got[0].1, "start Some(\"text/plain\")");
    let body: String = got[1..].iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(body, "one two three");
    assert!(
        ended.duration_since(got[1].0) > Duration::from_millis(1500),
        "the first chunk came before the function's last one"
    );

    // Without a sink the same stream is the payload.
    let r = h
        .worker
        .invoke(request(json!({}), None))
        .await
        .expect("invoke");
    assert_eq!(r.payload, b"one two three");

    // Broken off mid-stream: a function error after the bytes already sent; the sandbox stays.
    let sink = Arc::new(Recorded::default());
    let r = h
        .worker
        .invoke(request(json!({"cut": true}), Some(sink.clone())))
        .await
        .expect("invoke");
    assert!(r.function_error);
    let doc: Value = serde_json::from_slice(&r.payload).expect("error document");
    assert_eq!(doc["errorType"], "Runtime.TruncatedResponse");
    let got = sink.0.lock().expect("lock").clone();
    let body: String = got[1..].iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(body, "partial");
    assert_eq!(h.worker.stats().cold_starts, 1);
    h.finish().await;
}

/// An idle sandbox is frozen after a while (it then uses no CPU at all) and thawed when an
/// invocation takes it: the same sandbox serves warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_are_frozen_and_thawed_when_taken() {
    let h = Harness::with_configs(
        Duration::from_secs(60),
        |_| {},
        |cfg| {
            cfg.prewarm = hearth_worker::prewarm::PrewarmConfig::disabled();
            cfg.demand = hearth_worker::demand::DemandConfig::disabled();
            cfg.freeze_idle_after = Some(Duration::from_millis(300));
        },
    );
    let spec = h.spec("frozen", "python3.11", "app.handler", &[("app.py", PY_APP)]);
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(json_of(&r)["count"], 1);
    let engine = h.engine.clone();
    let ids = engine.list();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let cgroups = engine.cgroups();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while cgroups.is_frozen(&ids[0]) != Some(true) {
        assert!(
            std::time::Instant::now() < until,
            "the idle sandbox was never frozen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cgroups.cpu_usage_ns().expect("cpu usage");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cgroups.cpu_usage_ns().expect("cpu usage") - before;
    assert!(
        used < 2_000_000,
        "a frozen sandbox used {used} ns of CPU in 1 s"
    );
    let r = h.invoke(&spec, json!({})).await.expect("invoke");
    assert_eq!(json_of(&r)["count"], 2, "the same sandbox, thawed");
    assert_eq!(cgroups.is_frozen(&ids[0]), Some(false));
    h.finish().await;
}
