//! `hearth bench`: measurements for `docs/perf.md`, each beside a baseline taken in the same run.
//!
//! - `hearth bench sandbox`: warm invoke latency through worker + agent against the same
//!   Python handler called in a plain host process; cold start (boot + init + first response)
//!   against a plain `runsc run` of python3 on the same image; density (idle sandboxes per GiB).
//! - `hearth bench api`: concurrent signed `Invoke` calls against a running `hearth up`:
//!   throughput and latency percentiles, failures counted.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hearth_api::invoker::{FunctionSpec, InvokeRequest, Invoker};
use hearth_worker::engine::default_runsc;
use hearth_worker::{EngineConfig, ImageStore, RunscEngine, Worker, WorkerConfig};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Warm invoke, cold start and density of sandboxes (needs root, runsc, images, agent).
    Sandbox(SandboxArgs),
    /// Concurrent invokes through the Lambda API of a running `hearth up`.
    Api(super::client::ApiBenchArgs),
    /// Cold starts by boot versus by snapshot restore, and restore time by snapshot size.
    Snapstart(SnapArgs),
    /// Chunk store: bytes stored for N functions on one runtime against the naive sum.
    Store(StoreArgs),
}

#[derive(Args)]
pub struct StoreArgs {
    /// Functions to deploy.
    #[arg(long, default_value_t = 20)]
    functions: usize,
    /// Runtime image they share.
    #[arg(long, default_value = "python3.11")]
    runtime: String,
    /// Image cache directory.
    #[arg(long, env = "HEARTH_IMAGE_CACHE", default_value = ".hearth/images")]
    image_cache: PathBuf,
}

#[derive(Args)]
pub struct SnapArgs {
    /// Cold starts to time per function and mode.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Snapshot state sizes (MB) for the size sweep.
    #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
    sizes: Vec<usize>,
    /// Image cache directory.
    #[arg(long, env = "HEARTH_IMAGE_CACHE", default_value = ".hearth/images")]
    image_cache: PathBuf,
    /// The static agent binary.
    #[arg(long, env = "HEARTH_AGENT")]
    agent: Option<PathBuf>,
}

/// A Python handler whose init imports modules, works `busy_s` seconds and builds `state_mb`
/// MB of state; the response proves the state is there.
fn heavy_handler(state_mb: usize, busy_s: f64) -> String {
    [
        "import os, time, hashlib".to_string(),
        "t0 = time.time()".to_string(),
        "import json, decimal, email.message, http.client, xml.dom.minidom, argparse, logging, csv, sqlite3, asyncio, unittest".to_string(),
        format!("STATE = [os.urandom(1024 * 1024) for _ in range({state_mb})]"),
        format!("while time.time() - t0 < {busy_s}:"),
        "    pass".to_string(),
        "def handler(event, context):".to_string(),
        "    return {'init_type': os.environ['AWS_LAMBDA_INITIALIZATION_TYPE'], 'state_mb': len(STATE)}".to_string(),
    ]
    .join("\n")
        + "\n"
}

#[derive(Args)]
pub struct SandboxArgs {
    /// Warm invocations to time.
    #[arg(long, default_value_t = 300)]
    warm: usize,
    /// Cold starts to time.
    #[arg(long, default_value_t = 10)]
    cold: usize,
    /// Idle sandboxes to start for the density figure.
    #[arg(long, default_value_t = 10)]
    density: usize,
    /// Image cache directory.
    #[arg(long, env = "HEARTH_IMAGE_CACHE", default_value = ".hearth/images")]
    image_cache: PathBuf,
    /// The static agent binary.
    #[arg(long, env = "HEARTH_AGENT")]
    agent: Option<PathBuf>,
    /// Do not pin sandboxes to a core (to measure what pinning gives).
    #[arg(long)]
    no_pin: bool,
}

const HANDLER: &str =
    "def handler(event, context):\n    return {\"ok\": True, \"n\": event.get(\"n\")}\n";

/// Host-side harness: the same handler, called in a plain process over a pipe.
const NATIVE_HARNESS: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import app
class Ctx: aws_request_id = "native"
for line in sys.stdin:
    out = app.handler(json.loads(line), Ctx())
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"#;

/// Percentile of sorted durations, in milliseconds.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn summary(name: &str, mut d: Vec<Duration>) {
    d.sort();
    println!(
        "{name:<44} n={:<4} p50={:>9.2} ms  p90={:>9.2} ms  p99={:>9.2} ms",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.9),
        pct(&d, 0.99)
    );
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Sandbox(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(sandbox(a))
        }
        BenchCmd::Api(a) => super::client::api_bench(a),
        BenchCmd::Store(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(store_bench(a))
        }
        BenchCmd::Snapstart(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(snapstart(a))
        }
    }
}

async fn sandbox(a: SandboxArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code)?;
    std::fs::write(code.join("app.py"), HANDLER)?;
    let images = ImageStore::new(&a.image_cache);
    let rootfs = images
        .rootfs("python3.11")
        .context("python3.11 image (hearth image build)")?;
    let engine = Arc::new(RunscEngine::new(EngineConfig {
        pin_cores: !a.no_pin,
        ..EngineConfig::under(
            dir.path(),
            default_runsc(),
            super::find_agent(a.agent.clone()),
        )
    })?);
    let worker = Worker::new(
        engine.clone(),
        images,
        WorkerConfig {
            keep_alive: Duration::from_secs(600),
            memory_budget_mb: 16 * 1024,
            ..WorkerConfig::default()
        },
    );
    let spec = |rev: String| FunctionSpec {
        name: "bench".into(),
        version: "$LATEST".into(),
        arn: "arn:aws:lambda:us-east-1:000000000000:function:bench".into(),
        runtime: "python3.11".into(),
        handler: "app.handler".into(),
        memory_mb: 128,
        timeout_s: 30,
        env: BTreeMap::new(),
        code_dir: code.clone(),
        code_sha256: String::new(),
        revision_id: rev,
        snap_start: false,
        ephemeral_storage_mb: 512,
        egress: true,
    };
    let req = |spec: FunctionSpec, n: usize| InvokeRequest {
        request_id: format!("bench-{n}-{:016x}", rand::random::<u64>()),
        invoked_arn: spec.arn.clone(),
        spec,
        payload: format!("{{\"n\":{n}}}").into_bytes().into(),
        client_context: None,
        reserved_concurrency: None,
        unreserved_limit: 1000,
        log: None,
    };
    println!(
        "hearth bench sandbox (runsc {}, pinned: {})",
        runsc_version(),
        !a.no_pin
    );

    // Native baseline: the same handler in a plain host process, request/response over a pipe.
    let mut child = Command::new("python3")
        .args(["-c", NATIVE_HARNESS])
        .arg(&code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 for the native baseline")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut native = Vec::new();
    let mut line = String::new();
    for n in 0..a.warm + 20 {
        let t = Instant::now();
        writeln!(stdin, "{{\"n\":{n}}}")?;
        line.clear();
        stdout.read_line(&mut line)?;
        if n >= 20 {
            native.push(t.elapsed());
        }
    }
    drop(stdin);
    let _ = child.wait();
    summary("warm invoke, native process (baseline)", native);

    // Warm invokes through worker + agent + awslambdaric.
    let warm_spec = spec("warm".into());
    let r = worker.invoke(req(warm_spec.clone(), 0)).await?;
    if r.function_error {
        bail!(
            "bench function failed: {}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    let mut warm = Vec::new();
    for n in 0..a.warm + 20 {
        let t = Instant::now();
        let r = worker.invoke(req(warm_spec.clone(), n)).await?;
        if r.function_error {
            bail!(
                "bench function failed: {}",
                String::from_utf8_lossy(&r.payload)
            );
        }
        if n >= 20 {
            warm.push(t.elapsed());
        }
    }
    summary("warm invoke, hearth worker + agent (runsc)", warm);

    // Cold start baseline: plain `runsc run` of python3 printing one line, same image.
    let mut plain = Vec::new();
    for i in 0..a.cold {
        plain.push(plain_runsc(&rootfs, dir.path(), i)?);
    }
    summary("cold: plain `runsc run python3 -c print` (baseline)", plain);

    // Cold starts: a new revision each time forces a new sandbox (boot + init + invoke).
    let mut cold = Vec::new();
    for i in 0..a.cold {
        let t = Instant::now();
        let r = worker.invoke(req(spec(format!("cold{i}")), i)).await?;
        if r.function_error {
            bail!(
                "bench function failed: {}",
                String::from_utf8_lossy(&r.payload)
            );
        }
        cold.push(t.elapsed());
        worker.retire("bench");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    summary("cold start by boot, request in -> response out", cold);

    // Density: idle sandboxes of a 128 MB function, memory charged to their cgroups.
    worker.retire("bench");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut handles = Vec::new();
    for i in 0..a.density {
        let w = worker.clone();
        let s = spec(format!("dense{i}"));
        handles.push(tokio::spawn(async move { w.invoke(req(s, i)).await }));
        if handles.len() == 2 {
            for h in handles.drain(..) {
                h.await??;
            }
        }
    }
    for h in handles {
        h.await??;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut total = 0u64;
    let dirs = engine.cgroups().sandbox_dirs();
    for d in &dirs {
        for f in ["memory.usage_in_bytes", "memory.current"] {
            if let Ok(t) = std::fs::read_to_string(d.join(f)) {
                total += t.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    let n = worker.stats().idle.max(1);
    let per = total as f64 / n as f64 / (1024.0 * 1024.0);
    println!(
        "density: {n} idle python sandboxes, {per:.1} MiB each (cgroup memory) -> {:.1} idle sandboxes per GiB",
        1024.0 / per
    );
    worker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn runsc_version() -> String {
    Command::new(default_runsc())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.replace("runsc version ", "")))
        .unwrap_or_default()
}

/// One `runsc run` (foreground) of python3 printing a line, on a bundle like hearth's.
fn plain_runsc(
    rootfs: &std::path::Path,
    dir: &std::path::Path,
    i: usize,
) -> anyhow::Result<Duration> {
    let bundle = dir.join(format!("plain{i}"));
    std::fs::create_dir_all(&bundle)?;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "user": {"uid": 0, "gid": 0}, "args": ["/usr/bin/python3", "-c", "print('ready')"],
                     "env": ["PATH=/usr/bin:/bin"], "cwd": "/" },
        "root": { "path": rootfs, "readonly": true },
        "mounts": [ { "destination": "/proc", "type": "proc", "source": "proc" } ],
        "linux": { "namespaces": [ {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"} ] }
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    let id = format!("pl{:014x}", rand::random::<u64>() >> 8);
    let t = Instant::now();
    let out = Command::new(default_runsc())
        .arg(format!("--root={}", dir.join("plain-root").display()))
        .args(["--network=none", "run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()?;
    let elapsed = t.elapsed();
    if !String::from_utf8_lossy(&out.stdout).contains("ready") {
        bail!(
            "plain runsc run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// Wait until the worker has destroyed every sandbox (so cold starts do not overlap teardown).
async fn drained(worker: &Worker, name: &str) {
    worker.retire(name);
    for _ in 0..200 {
        if worker.stats().live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn snapstart(a: SnapArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let engine = Arc::new(RunscEngine::new(EngineConfig {
        pin_cores: true,
        ..EngineConfig::under(
            dir.path(),
            default_runsc(),
            super::find_agent(a.agent.clone()),
        )
    })?);
    let worker = Worker::new(
        engine,
        ImageStore::new(&a.image_cache),
        WorkerConfig {
            keep_alive: Duration::from_secs(600),
            memory_budget_mb: 16 * 1024,
            snapshot_dir: Some(dir.path().join("snapshots")),
            ..WorkerConfig::default()
        },
    );
    let make = |name: &str, code: &str, memory_mb: u32| -> anyhow::Result<FunctionSpec> {
        let code_dir = dir.path().join("code").join(name);
        std::fs::create_dir_all(&code_dir)?;
        std::fs::write(code_dir.join("app.py"), code)?;
        Ok(FunctionSpec {
            name: name.into(),
            version: "1".into(),
            arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            runtime: "python3.11".into(),
            handler: "app.handler".into(),
            memory_mb,
            timeout_s: 60,
            env: BTreeMap::new(),
            code_dir,
            code_sha256: name.into(),
            revision_id: "r1".into(),
            snap_start: true,
            ephemeral_storage_mb: 512,
            egress: true,
        })
    };
    let invoke = |spec: FunctionSpec| {
        let w = worker.clone();
        async move {
            let t = Instant::now();
            let r = w
                .invoke(InvokeRequest {
                    request_id: format!("bench-{:016x}", rand::random::<u64>()),
                    invoked_arn: spec.arn.clone(),
                    payload: b"{}".to_vec().into(),
                    client_context: None,
                    reserved_concurrency: None,
                    unreserved_limit: 1000,
                    log: None,
                    spec,
                })
                .await?;
            let elapsed = t.elapsed();
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
            if r.function_error {
                bail!(
                    "bench function failed: {}",
                    String::from_utf8_lossy(&r.payload)
                );
            }
            Ok::<_, anyhow::Error>((elapsed, v["init_type"].as_str().unwrap_or("").to_string()))
        }
    };
    println!(
        "hearth bench snapstart (runsc {}), {} cold starts each",
        runsc_version(),
        a.starts
    );
    for (name, code, mem) in [
        ("trivial", heavy_handler(0, 0.0), 256u32),
        ("heavy", heavy_handler(100, 1.0), 1024),
    ] {
        let spec = make(name, &code, mem)?;
        let meta = worker.create_snapshot(&spec).await?;
        println!(
            "{name}: snapshot {:.1} MB, init {:.0} ms, checkpoint {:.0} ms",
            meta.image_bytes as f64 / 1e6,
            meta.init_ms,
            meta.checkpoint_ms
        );
        let (mut boot, mut restore) = (Vec::new(), Vec::new());
        for _ in 0..a.starts {
            let mut b = spec.clone();
            b.snap_start = false;
            let (d, kind) = invoke(b).await?;
            if kind != "on-demand" {
                bail!("expected a boot, got {kind}");
            }
            boot.push(d);
            drained(&worker, name).await;
            let (d, kind) = invoke(spec.clone()).await?;
            if kind != "snap-start" {
                bail!("expected a restore, got {kind}");
            }
            restore.push(d);
            drained(&worker, name).await;
        }
        boot.sort();
        restore.sort();
        let ratio = pct(&boot, 0.5) / pct(&restore, 0.5);
        summary(&format!("{name}: cold start by boot"), boot);
        summary(&format!("{name}: cold start by restore"), restore);
        println!("{name}: restore is {ratio:.1}x faster than boot (p50)");
    }
    for mb in &a.sizes {
        let name = format!("state{mb}");
        let spec = make(&name, &heavy_handler(*mb, 0.0), (*mb as u32 + 256).max(512))?;
        let meta = worker.create_snapshot(&spec).await?;
        let mut restore = Vec::new();
        for _ in 0..a.starts.min(5) {
            let (d, kind) = invoke(spec.clone()).await?;
            if kind != "snap-start" {
                bail!("expected a restore, got {kind}");
            }
            restore.push(d);
            drained(&worker, &name).await;
        }
        summary(
            &format!(
                "restore, {mb} MB state ({:.0} MB image)",
                meta.image_bytes as f64 / 1e6
            ),
            restore,
        );
    }
    worker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// What deploying `functions` functions on one runtime stores, against the naive sum of
/// every function's image and code.
async fn store_bench(a: StoreArgs) -> anyhow::Result<ExitCode> {
    use hearth_store::{ChunkStore, Scope, Secrets};
    let dir = tempfile::tempdir()?;
    let chunks = ChunkStore::local(&dir.path().join("origin"), None, Secrets::generate()?)?;
    let images = ImageStore::new(&a.image_cache);
    let name = hearth_worker::images::recipe_for(&a.runtime)?.name;
    let tar = dir.path().join("image.tar");
    hearth_worker::artifacts::flatten(&images.rootfs(name)?, &tar)?;
    let image_bytes = std::fs::metadata(&tar)?.len();
    let owner = Scope::Owner("000000000000".into());
    let (mut naive, mut code_total) = (0u64, 0u64);
    let t = Instant::now();
    for i in 0..a.functions {
        // Every function's deployment carries the runtime image (what a naive store keeps per
        // function) and its own code.
        let info = chunks
            .put_file(
                &Scope::Shared,
                &format!("image/{name}-for-fn{i}"),
                &tar,
                Default::default(),
            )
            .await?;
        let mut zip = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut zip);
            z.start_file("app.py", zip::write::SimpleFileOptions::default())?;
            std::io::Write::write_all(
                &mut z,
                format!("def handler(event, context):\n    return {{'fn': {i}}}\n").as_bytes(),
            )?;
            z.finish()?;
        }
        let zip = zip.into_inner();
        chunks
            .put_bytes(&owner, &format!("code/fn{i}"), &zip, Default::default())
            .await?;
        naive += image_bytes + zip.len() as u64;
        code_total += zip.len() as u64;
        if i == 0 || i + 1 == a.functions {
            println!(
                "function {:>2}: image upload added {} new bytes",
                i + 1,
                info.new_bytes
            );
        }
    }
    let usage = chunks.usage().await?;
    println!(
        "hearth bench store: {} functions on {name} ({:.1} MB image tar, {code_total} B of code) in {:.1} s",
        a.functions,
        image_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    println!(
        "naive sum {:.1} MB, stored {:.1} MB in {} chunks -> dedup ratio {:.1}x",
        naive as f64 / 1e6,
        usage.bytes as f64 / 1e6,
        usage.chunks,
        naive as f64 / usage.bytes.max(1) as f64
    );
    // Scope separation: the same code under another owner is stored again, unlinkably.
    let before = chunks.usage().await?.bytes;
    let zip = chunks.get_bytes(&owner, "code/fn0").await?;
    chunks
        .put_bytes(
            &Scope::Owner("111111111111".into()),
            "code/fn0",
            &zip,
            Default::default(),
        )
        .await?;
    println!(
        "same code under another owner adds {} bytes (per-owner key scope: not deduplicated)",
        chunks.usage().await?.bytes - before
    );
    Ok(ExitCode::SUCCESS)
}
