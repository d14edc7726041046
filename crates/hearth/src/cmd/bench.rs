//! `hearth bench`: measurements for `docs/perf.md`, each beside a baseline taken in the same run.
//!
//! - `hearth bench sandbox`: warm invoke latency through worker + agent against the same
//!   Python handler called in a plain host process; cold start by boot (request in → response
//!   out) with the ready pool and with an empty pool, against a plain `runsc run` of python3
//!   on the same image with the engine's runsc flags; density (idle sandboxes per GiB, the
//!   ready pool counted).
//! - `hearth bench snapstart`: cold starts by boot against restores of a snapshot (trivial and
//!   heavy functions), how many chunks two snapshots on one runtime share, restore time by
//!   snapshot size.
//! - `hearth bench api`: concurrent signed `Invoke` calls against a running `hearth up`:
//!   throughput and latency percentiles, failures counted.
//! - `hearth bench store`: what the chunk store keeps for N functions on one runtime.
//! - `hearth bench runtimes`: cold start from the ready pool and warm invoke of the same small
//!   handler on several runtimes (python3.11 beside nodejs22.x by default), interleaved.
//!
//! `sandbox` and `snapstart` measure each engine configuration in turn in one run
//! (`--runsc PATH` repeated, `--pin on|off|both`) and end with a side-by-side table.
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hearth_api::invoker::{FunctionSpec, InvokeRequest, Invoker};
use hearth_worker::affinity::Pinning;
use hearth_worker::engine::default_runsc;
use hearth_worker::netns::NetPolicy;
use hearth_worker::pool::PoolStats;
use hearth_worker::prewarm::PrewarmConfig;
use hearth_worker::snapshots::SnapshotMeta;
use hearth_worker::{EngineConfig, ImageStore, RunscEngine, Worker, WorkerConfig};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Warm invoke, cold start (ready pool and empty pool) and density of sandboxes (needs
    /// root, runsc, images, agent).
    Sandbox(SandboxArgs),
    /// Concurrent invokes through the Lambda API of a running `hearth up`.
    Api(super::client::ApiBenchArgs),
    /// Warm invokes through `hearth up` beside the same through a cluster of processes on
    /// loopback (three assignment nodes, a worker, a front end): what the distributed path adds.
    Cluster(super::bench_cluster::ClusterBenchArgs),
    /// Asynchronous invocations against a running `hearth up`: accepted events/s, drain rate,
    /// and the delay from acknowledgement to execution, beside sync invokes/s.
    Async(super::client::AsyncBenchArgs),
    /// Cold starts by boot versus by snapshot restore, snapshot chunk sharing, and restore
    /// time by snapshot size.
    Snapstart(SnapArgs),
    /// Chunk store: bytes stored for N functions on one runtime against the naive sum.
    Store(StoreArgs),
    /// Cold start (ready pool) and warm invoke of one small handler on several runtimes, side
    /// by side in one run (needs root, runsc, their images, agent).
    Runtimes(RuntimesArgs),
    /// The replicated assignment service: lease throughput and latency by partition count
    /// (three nodes over loopback TCP in this process) and failover time.
    Assign(super::bench_assign::AssignBenchArgs),
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

/// How sandboxes are placed on cores.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PinSel {
    /// As `hearth up` places them: split (sentry on one core, application on the next).
    On,
    /// Each sandbox wholly on one core.
    Core,
    /// Not pinned.
    Off,
    /// Each engine measured split, then unpinned.
    Both,
    /// Each engine measured split, on one core, then unpinned.
    All,
}

/// Whether the sandboxes' sentry and gofer are made mergeable (KSM).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MergeSel {
    /// As `hearth up` does by default.
    On,
    Off,
    /// Each engine measured with merging, then without.
    Both,
}

/// How restores reach the sentry.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestoreSel {
    /// Through its control socket where the probe found that works (as `hearth up` does).
    Control,
    /// By executing `runsc restore`.
    Runsc,
    /// Each engine measured both ways.
    Both,
}

/// The engines to measure (one after the other, in one run) and what they need.
#[derive(Args)]
pub struct EngineSel {
    /// A runsc binary to measure; repeat the option to compare engines side by side in one
    /// run (default: $HEARTH_RUNSC, else runsc on PATH). Each is probed as `hearth up` does.
    #[arg(long = "runsc", value_name = "PATH")]
    runsc: Vec<PathBuf>,
    /// Place sandboxes on cores: on (as `hearth up` does: sentry and application split over
    /// two cores), core (one core each), off, both (on, then off) or all (on, core, off).
    #[arg(long, value_enum, default_value_t = PinSel::On)]
    pin: PinSel,
    /// Do not pin sandboxes to a core (the same as `--pin off`).
    #[arg(long)]
    no_pin: bool,
    /// Same-page merging of the sandboxes' sentry and gofer: on (as `hearth up` does), off,
    /// or both (on, then off).
    #[arg(long, value_enum, default_value_t = MergeSel::On)]
    merge_pages: MergeSel,
    /// Restore through the sentry's control socket, with `runsc restore`, or both.
    #[arg(long, value_enum, default_value_t = RestoreSel::Control)]
    restore_via: RestoreSel,
    /// Image cache directory.
    #[arg(long, env = "HEARTH_IMAGE_CACHE", default_value = ".hearth/images")]
    image_cache: PathBuf,
    /// The static agent binary.
    #[arg(long, env = "HEARTH_AGENT")]
    agent: Option<PathBuf>,
}

/// One engine configuration to measure.
struct Choice {
    runsc: PathBuf,
    pin: Pinning,
    control: bool,
    merge: bool,
}

impl EngineSel {
    fn choices(&self) -> Vec<Choice> {
        let binaries = if self.runsc.is_empty() {
            vec![default_runsc()]
        } else {
            self.runsc.clone()
        };
        let pins: &[Pinning] = match (self.no_pin, self.pin) {
            (true, _) | (false, PinSel::Off) => &[Pinning::Off],
            (false, PinSel::On) => &[Pinning::Split],
            (false, PinSel::Core) => &[Pinning::Core],
            (false, PinSel::Both) => &[Pinning::Split, Pinning::Off],
            (false, PinSel::All) => &[Pinning::Split, Pinning::Core, Pinning::Off],
        };
        let controls: &[bool] = match self.restore_via {
            RestoreSel::Control => &[true],
            RestoreSel::Runsc => &[false],
            RestoreSel::Both => &[true, false],
        };
        let merges: &[bool] = match self.merge_pages {
            MergeSel::On => &[true],
            MergeSel::Off => &[false],
            MergeSel::Both => &[true, false],
        };
        let mut out = Vec::new();
        for r in &binaries {
            for &pin in pins {
                for &control in controls {
                    for &merge in merges {
                        out.push(Choice {
                            runsc: r.clone(),
                            pin,
                            control,
                            merge,
                        });
                    }
                }
            }
        }
        out
    }

    fn agent(&self) -> PathBuf {
        super::find_agent(self.agent.clone())
    }
}

/// The bench's working directory, `$TMPDIR/hearth-bench-*`, holding this process's pid. What
/// benches that were killed left (their sandboxes, and the mounts of their `/tmp` disks) is
/// removed first: unlike `hearth up`, a bench starts in a new directory each time, so its
/// engine's own clean-up of an earlier run never sees theirs.
pub(crate) fn work_dir() -> anyhow::Result<tempfile::TempDir> {
    reap_killed_benches(&std::env::temp_dir());
    let dir = tempfile::Builder::new().prefix(BENCH_PREFIX).tempdir()?;
    std::fs::write(dir.path().join("pid"), std::process::id().to_string())?;
    Ok(dir)
}

const BENCH_PREFIX: &str = "hearth-bench-";

/// Remove the working directories under `tmp` of benches whose process is gone.
fn reap_killed_benches(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with(BENCH_PREFIX) {
            continue;
        }
        // No pid yet: a bench just starting; a live pid: a bench running.
        let Some(pid) = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let runsc = default_runsc();
        for root in runsc_roots(&dir, 3) {
            let ids = Command::new(&runsc)
                .arg(format!("--root={}", root.display()))
                .args(["list", "-quiet"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                for args in [vec!["kill", id, "KILL"], vec!["delete", "--force", id]] {
                    run_bounded(
                        Command::new(&runsc)
                            .arg(format!("--root={}", root.display()))
                            .args(&args),
                        Duration::from_secs(5),
                    );
                }
            }
        }
        for m in hearth_worker::tmpdisk::mounts_under(&dir) {
            hearth_worker::tmpdisk::unmount(&m);
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => eprintln!(
                "hearth bench: removed what a killed bench (pid {pid}) left in {}",
                dir.display()
            ),
            Err(e) => eprintln!("hearth bench: cannot remove {}: {e}", dir.display()),
        }
    }
}

/// Directories named `runsc` (engines' state roots) under `dir`, at most `depth` levels down.
fn runsc_roots(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if e.file_name() == "runsc" {
            found.push(path);
        } else if depth > 1 {
            found.extend(runsc_roots(&path, depth - 1));
        }
    }
    found
}

/// Run `cmd`, killing it after `limit` (a frozen sandbox does not answer runsc).
fn run_bounded(cmd: &mut Command, limit: Duration) {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return;
    };
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// An engine for `choice` with everything under `dir` (its own runsc root, cgroups and
/// network table, so engines in one run never see each other's sandboxes).
fn make_engine(
    dir: &Path,
    choice: &Choice,
    agent: &Path,
    network: NetPolicy,
) -> anyhow::Result<Arc<RunscEngine>> {
    std::fs::create_dir_all(dir)?;
    Ok(Arc::new(RunscEngine::new(EngineConfig {
        pinning: choice.pin,
        control_restore: choice.control,
        network,
        merge_pages: choice.merge,
        ..EngineConfig::under(dir, choice.runsc.clone(), agent.to_path_buf())
    })?))
}

/// A column heading: runsc version, platform, pinning.
fn engine_label(engine: &RunscEngine, choice: &Choice) -> String {
    let caps = engine.caps();
    format!(
        "{} {}{}{}{}",
        caps.version.replace("runsc version ", ""),
        caps.platform,
        pin_label(choice.pin),
        if caps.control_restore && !choice.control {
            ", `runsc restore`"
        } else {
            ""
        },
        merge_label(engine, choice)
    )
}

fn merge_label(engine: &RunscEngine, choice: &Choice) -> &'static str {
    match (choice.merge, engine.merging()) {
        (true, true) => ", pages merged",
        (true, false) => ", pages not merged (the kernel cannot)",
        (false, _) => ", pages not merged",
    }
}

fn print_caps(engine: &RunscEngine, choice: &Choice) {
    let c = engine.caps();
    println!(
        "== engine: {} ({}): platform {}, uncompressed checkpoints {}, zero-page exclusion {}, restore into created {}, control-socket restore {} (used: {}), netstack {}, directfs {}{}{}",
        c.version.replace("runsc version ", ""),
        engine.config().runsc.display(),
        c.platform,
        c.uncompressed,
        c.zero_pages,
        c.restore_into_created,
        c.control_restore,
        c.control_restore && choice.control,
        c.netstack,
        c.directfs,
        pin_label(choice.pin),
        merge_label(engine, choice)
    );
}

fn pin_label(p: Pinning) -> &'static str {
    match p {
        Pinning::Split => ", split over two cores",
        Pinning::Core => ", pinned to one core",
        Pinning::Off => ", unpinned",
    }
}

/// Measures (rows) by engine configuration (columns), printed as a markdown table.
#[derive(Default)]
struct Table {
    cols: Vec<String>,
    rows: Vec<(String, Vec<String>)>,
}

impl Table {
    fn col(&mut self, label: String) -> usize {
        self.cols.push(label);
        self.cols.len() - 1
    }

    fn set(&mut self, row: &str, col: usize, value: String) {
        let i = match self.rows.iter().position(|(r, _)| r == row) {
            Some(i) => i,
            None => {
                self.rows.push((row.to_string(), Vec::new()));
                self.rows.len() - 1
            }
        };
        let cells = &mut self.rows[i].1;
        if cells.len() <= col {
            cells.resize(col + 1, String::new());
        }
        cells[col] = value;
    }

    fn print(&self) {
        println!();
        println!("| measurement | {} |", self.cols.join(" | "));
        println!("|---|{}", "---|".repeat(self.cols.len()));
        for (row, cells) in &self.rows {
            let mut cells = cells.clone();
            cells.resize(self.cols.len(), "–".into());
            for c in &mut cells {
                if c.is_empty() {
                    *c = "–".into();
                }
            }
            println!("| {row} | {} |", cells.join(" | "));
        }
    }
}

/// A Python handler whose init imports modules, works `busy_s` seconds and builds `state_mb`
/// MB of state; the response proves the state is there. `tag` makes functions with otherwise
/// equal code differ.
fn heavy_handler(state_mb: usize, busy_s: f64, tag: &str) -> String {
    [
        "import os, time, hashlib".to_string(),
        "t0 = time.time()".to_string(),
        "import json, decimal, email.message, http.client, xml.dom.minidom, argparse, logging, csv, sqlite3, asyncio, unittest".to_string(),
        format!("STATE = [os.urandom(1024 * 1024) for _ in range({state_mb})]"),
        format!("while time.time() - t0 < {busy_s}:"),
        "    pass".to_string(),
        format!("TAG = {tag:?}"),
        "def handler(event, context):".to_string(),
        "    return {'init_type': os.environ['AWS_LAMBDA_INITIALIZATION_TYPE'], 'state_mb': len(STATE), 'tag': TAG}".to_string(),
    ]
    .join("\n")
        + "\n"
}

#[derive(Args)]
pub struct SandboxArgs {
    /// Warm invocations to time.
    #[arg(long, default_value_t = 300)]
    warm: usize,
    /// Cold starts to time (each of: ready pool, empty pool, plain runsc baselines).
    #[arg(long, default_value_t = 10)]
    cold: usize,
    /// Idle sandboxes to start for the density figure.
    #[arg(long, default_value_t = 10)]
    density: usize,
    /// Network policy of the engine (`egress`, hearth's default, or `none`).
    #[arg(long, default_value = "egress")]
    network: NetPolicy,
    #[command(flatten)]
    engines: EngineSel,
}

#[derive(Args)]
pub struct RuntimesArgs {
    /// Runtimes to compare, comma-separated (each needs its image). `<runtime>:bootstrap`
    /// times the runtime started by its bootstrap: the function sets an empty `LD_PRELOAD`,
    /// which changes nothing but makes a prestarted runtime decline it.
    #[arg(long, default_value = "python3.11,nodejs22.x")]
    runtimes: String,
    /// Warm invocations to time per runtime.
    #[arg(long, default_value_t = 200)]
    warm: usize,
    /// Cold starts to time per runtime (from the ready pool; the runtimes take turns).
    #[arg(long, default_value_t = 10)]
    cold: usize,
    /// Network policy of the engine (`egress`, hearth's default, or `none`).
    #[arg(long, default_value = "egress")]
    network: NetPolicy,
    #[command(flatten)]
    engines: EngineSel,
}

#[derive(Args)]
pub struct SnapArgs {
    /// Cold starts to time per function and mode.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Snapshot state sizes (MB) for the size sweep, comma-separated (measured with the first
    /// engine only; "" for none).
    #[arg(long, default_value = "10,100,500")]
    sizes: String,
    #[command(flatten)]
    engines: EngineSel,
}

/// How long warm invokes run untimed first (see the warm section of [`sandbox`]).
const WARM_UP: Duration = Duration::from_secs(2);

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

/// Print one line of percentiles; returns the table cell (p50 / p90 / p99).
fn summary(name: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    println!(
        "{name:<52} n={:<4} p50={:>9.2} ms  p90={:>9.2} ms  p99={:>9.2} ms",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.9),
        pct(&d, 0.99)
    );
    let f = |v: f64| {
        if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.0}")
        }
    };
    if d.len() >= 50 {
        format!(
            "p50 {} / p90 {} / p99 {} ms",
            f(pct(&d, 0.5)),
            f(pct(&d, 0.9)),
            f(pct(&d, 0.99))
        )
    } else {
        format!("p50 {} / p90 {} ms", f(pct(&d, 0.5)), f(pct(&d, 0.9)))
    }
}

fn p50(d: &[Duration]) -> f64 {
    let mut d = d.to_vec();
    d.sort();
    pct(&d, 0.5)
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cmd {
        BenchCmd::Sandbox(a) => rt()?.block_on(sandbox(a)),
        BenchCmd::Api(a) => super::client::api_bench(a),
        BenchCmd::Cluster(a) => super::bench_cluster::run(a),
        BenchCmd::Async(a) => super::client::async_bench(a),
        BenchCmd::Store(a) => rt()?.block_on(store_bench(a)),
        BenchCmd::Assign(a) => rt()?
            .block_on(super::bench_assign::run(a))
            .map(|()| ExitCode::SUCCESS),
        BenchCmd::Snapstart(a) => rt()?.block_on(snapstart(a)),
        BenchCmd::Runtimes(a) => rt()?.block_on(runtimes_bench(a)),
    }
}

/// Put a one-file (`app.py`) package into a worker's code cache at `root`, as a fetch from the
/// chunk store would; returns its `CodeSha256`.
fn cache_code(root: &Path, app: &str) -> anyhow::Result<String> {
    cache_file(root, "app.py", app)
}

/// [`cache_code`] with another file name.
fn cache_file(root: &Path, file: &str, app: &str) -> anyhow::Result<String> {
    let code = hearth_core::code::CodeRef::of(app.as_bytes());
    let dir = root.join(&code.sha256_hex);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(file), app)?;
    Ok(code.sha256_b64)
}

/// A function of the benchmarks: python3.11, its package named by `code_sha256`.
fn bench_spec(name: &str, code_sha256: &str, revision: String, memory_mb: u32) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        version: "1".into(),
        arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
        runtime: "python3.11".into(),
        handler: "app.handler".into(),
        memory_mb,
        timeout_s: 60,
        env: BTreeMap::new(),
        code_sha256: code_sha256.into(),
        layers: Vec::new(),
        revision_id: revision,
        snap_start: false,
        ephemeral_storage_mb: 512,
        egress: true,
    }
}

/// One timed invocation.
struct Timed {
    /// Request in → response out, through the worker.
    elapsed: Duration,
    /// The response document.
    doc: serde_json::Value,
    /// The `Init Duration` (boot) or `Restore Duration` of the `REPORT` line, on cold starts.
    init_ms: Option<f64>,
}

/// The init or restore duration a `REPORT` line gives.
fn report_init_ms(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.starts_with("REPORT "))?;
    line.split('\t').find_map(|f| {
        let f = f.trim();
        f.strip_prefix("Init Duration: ")
            .or_else(|| f.strip_prefix("Restore Duration: "))
            .and_then(|v| v.trim_end_matches(" ms").parse().ok())
    })
}

/// One invocation through the worker, timed request in → response out; fails on a function
/// error.
async fn timed_invoke(worker: &Worker, spec: FunctionSpec, n: usize) -> anyhow::Result<Timed> {
    let mut req = InvokeRequest::new(spec, format!("{{\"n\":{n}}}").into_bytes());
    req.request_id = format!("bench-{n}-{:016x}", rand::random::<u64>());
    let t = Instant::now();
    let r = worker.invoke(req).await?;
    let elapsed = t.elapsed();
    if r.function_error {
        bail!(
            "bench function failed: {}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    Ok(Timed {
        elapsed,
        doc: serde_json::from_slice(&r.payload).unwrap_or_default(),
        init_ms: report_init_ms(&r.log),
    })
}

/// p50 of the worker's own init/restore durations, as a note for a cold-start cell.
fn init_note(what: &str, ms: &[f64]) -> String {
    if ms.is_empty() {
        return String::new();
    }
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    let p = v[(v.len() - 1) / 2];
    println!("  (worker's {what} duration, p50: {p:.0} ms)");
    format!("; {what} {p:.0}")
}

/// Wait (at most `limit`) until the ready pool holds `want` sandboxes, then a little longer so
/// the last `runsc create` has settled; returns how many are ready.
async fn wait_ready(worker: &Worker, want: usize, limit: Duration) -> usize {
    let end = Instant::now() + limit;
    loop {
        let ready = worker.stats().ready;
        if ready >= want || Instant::now() >= end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return worker.stats().ready;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the worker has destroyed every sandbox of `name` (so cold starts do not overlap
/// teardown). Ready sandboxes are not live and stay.
async fn drained(worker: &Worker, name: &str) {
    worker.retire(name);
    for _ in 0..400 {
        if worker.stats().live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn delta(after: PoolStats, before: PoolStats) -> (usize, usize, usize) {
    (
        after.cold_starts - before.cold_starts,
        after.restores - before.restores,
        after.claimed_ready - before.claimed_ready,
    )
}

/// Native baseline: the handler in a plain host process, request/response over a pipe.
fn native_baseline(code: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut child = Command::new("python3")
        .args(["-c", NATIVE_HARNESS])
        .arg(code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 for the native baseline")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut native = Vec::new();
    let mut line = String::new();
    for i in 0..n + 20 {
        let t = Instant::now();
        writeln!(stdin, "{{\"n\":{i}}}")?;
        line.clear();
        stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the native baseline process ended");
        }
        if i >= 20 {
            native.push(t.elapsed());
        }
    }
    drop(stdin);
    let _ = child.wait();
    Ok(native)
}

async fn sandbox(a: SandboxArgs) -> anyhow::Result<ExitCode> {
    let dir = work_dir()?;
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code)?;
    std::fs::write(code.join("app.py"), HANDLER)?;
    let code_cache = dir.path().join("code-cache");
    let code_sha256 = cache_code(&code_cache, HANDLER)?;
    let images = ImageStore::new(&a.engines.image_cache);
    let rootfs = images
        .rootfs("python3.11")
        .context("python3.11 image (hearth image build)")?;
    let agent = a.engines.agent();
    println!(
        "hearth bench sandbox: {} warm invokes, {} cold starts per mode, {} idle sandboxes; network {}; load average {}",
        a.warm,
        a.cold,
        a.density,
        a.network,
        load_average()
    );
    let mut table = Table::default();
    let native = native_baseline(&code, a.warm)?;
    let native_cell = summary("warm invoke, native process (baseline)", native);

    for (ci, choice) in a.engines.choices().iter().enumerate() {
        let cdir = dir.path().join(format!("engine{ci}"));
        let engine = make_engine(&cdir.join("pool"), choice, &agent, a.network)?;
        print_caps(&engine, choice);
        let col = table.col(engine_label(&engine, choice));
        table.set(
            "warm invoke, native python process, same handler over a pipe (baseline)",
            col,
            native_cell.clone(),
        );
        let prewarm = PrewarmConfig::default();
        let worker = Worker::new(
            engine.clone(),
            images.clone(),
            WorkerConfig {
                keep_alive: Duration::from_secs(600),
                memory_budget_mb: 16 * 1024,
                prewarm,
                code_cache: Some(code_cache.clone()),
                // Idle sandboxes are frozen by hand below, after they are measured unfrozen.
                freeze_idle_after: None,
                ..WorkerConfig::default()
            },
        );
        worker.prewarm("python3.11");
        let want = prewarm.per_kind_max;
        let spec = |rev: String| bench_spec("bench", &code_sha256, rev, 128);
        // Whatever happens, the worker is shut down (no sandbox outlives the bench).
        let measured = async {
            // Warm invokes through worker + agent + awslambdaric, once the pool has settled.
            // gVisor calibrates its clock against the host's in about a second after the
            // sandbox starts; until then every clock read in the sandbox is a trap to the
            // sentry. A warm sandbox is past that, so the timed invokes start after a warm-up
            // of at least WARM_UP (and 20 invokes).
            let first = Instant::now();
            timed_invoke(&worker, spec("warm".into()), 0).await?;
            wait_ready(&worker, want, Duration::from_secs(10)).await;
            let mut n = 1;
            while n <= 20 || first.elapsed() < WARM_UP {
                timed_invoke(&worker, spec("warm".into()), n).await?;
                n += 1;
            }
            let mut warm = Vec::new();
            for _ in 0..a.warm {
                warm.push(timed_invoke(&worker, spec("warm".into()), n).await?.elapsed);
                n += 1;
            }
            table.set(
                "warm invoke through worker + agent + awslambdaric in runsc",
                col,
                summary("warm invoke, hearth worker + agent (runsc)", warm),
            );
            drained(&worker, "bench").await;

            // Cold start baselines: plain `runsc run` of python3, same image and runsc flags.
            let (mut truth, mut pass, mut print) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..a.cold {
                truth.push(plain_runsc(&engine, &rootfs, &cdir, i, None)?);
                pass.push(plain_runsc(&engine, &rootfs, &cdir, i, Some("pass"))?);
                print.push(plain_runsc(
                    &engine,
                    &rootfs,
                    &cdir,
                    i,
                    Some("print('ready')"),
                )?);
            }
            table.set(
                "cold: plain `runsc run /bin/true` (sandbox alone)",
                col,
                summary("cold: plain `runsc run /bin/true` (sandbox alone)", truth),
            );
            table.set(
                "cold: plain `runsc run python3 -c pass` (baseline)",
                col,
                summary("cold: plain `runsc run python3 -c pass` (baseline)", pass),
            );
            table.set(
                "cold: plain `runsc run python3 -c print` (baseline)",
                col,
                summary("cold: plain `runsc run python3 -c print` (baseline)", print),
            );

            // Idle CPU of ready (created, never started) sandboxes alone.
            let ready = wait_ready(&worker, want, Duration::from_secs(10)).await;
            let ready_cpu = idle_cpu(&engine, ready).await;
            println!("idle CPU: {ready} ready sandboxes, {ready_cpu:.2} % of a core each");
            table.set(
                "idle CPU of a ready (created, unstarted) sandbox",
                col,
                format!("{ready_cpu:.2} % of a core"),
            );

            // Cold starts from the ready pool: a new revision each time forces a new sandbox; the
            // pool is refilled (`want` ready) before each, so each start measures a claim.
            let before = worker.stats();
            let (mut cold, mut inits, mut min_ready) = (Vec::new(), Vec::new(), usize::MAX);
            for i in 0..a.cold {
                let ready = wait_ready(&worker, want, Duration::from_secs(10)).await;
                min_ready = min_ready.min(ready);
                let t = timed_invoke(&worker, spec(format!("cold{i}")), i).await?;
                cold.push(t.elapsed);
                inits.extend(t.init_ms);
                drained(&worker, "bench").await;
            }
            let (_, _, claimed) = delta(worker.stats(), before);
            println!(
                "  (ready pool held >= {min_ready} before each start; {claimed} of {} starts claimed a ready sandbox)",
                a.cold
            );
            table.set(
                "cold start by boot from the ready pool, request in → response out",
                col,
                format!(
                    "{} ({claimed}/{} claimed{})",
                    summary("cold start by boot, ready pool", cold),
                    a.cold,
                    init_note("init", &inits)
                ),
            );

            // Density: idle sandboxes of a 128 MB function plus the refilled ready pool, memory
            // charged to their cgroups.
            wait_ready(&worker, want, Duration::from_secs(10)).await;
            let mut handles = Vec::new();
            for i in 0..a.density {
                let w = worker.clone();
                let s = spec(format!("dense{i}"));
                handles.push(tokio::spawn(async move { timed_invoke(&w, s, i).await }));
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
            wait_ready(&worker, want, Duration::from_secs(10)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if engine.merging() {
                // The kernel merges a page once it has seen it unchanged twice: wait until a
                // full pass over every mergeable page saves nothing more (at least three
                // passes after the last sandbox came up, two minutes at most).
                let ksm = Path::new(hearth_worker::ksm::SYSFS);
                let t = Instant::now();
                let (mut passes, mut last_scan) = (0, hearth_worker::ksm::full_scans(ksm));
                let mut saved = hearth_worker::ksm::saved_pages(ksm);
                while t.elapsed() < Duration::from_secs(120) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let scan = hearth_worker::ksm::full_scans(ksm);
                    if scan == last_scan {
                        continue;
                    }
                    last_scan = scan;
                    passes += 1;
                    let now = hearth_worker::ksm::saved_pages(ksm);
                    if passes >= 3 && now == saved {
                        break;
                    }
                    saved = now;
                }
                println!(
                    "same-page merging: settled after {passes} full scans, {:.1} s ({} pages saved host-wide)",
                    t.elapsed().as_secs_f64(),
                    saved.unwrap_or(0)
                );
            }
            let stats = worker.stats();
            let usage: Vec<u64> = sandbox_memory(engine.cgroups()).into_values().collect();
            let n = usage.len().max(1);
            let ksmd0 = ksmd_ticks();
            let idle_pct = idle_cpu(&engine, n).await;
            let ksmd_pct = ksmd_ticks().saturating_sub(ksmd0) as f64 * 10.0 / 5000.0 * 100.0;
            println!("idle CPU: {n} idle + ready sandboxes, {idle_pct:.2} % of a core each");
            println!("the kernel's page-merging scanner (ksmd) meanwhile: {ksmd_pct:.2} % of a core");
            // The same idle sandboxes frozen, as the pool freezes them after
            // `--freeze-idle-ms` (the ready ones stay as they are).
            let frozen = worker.freeze_idle(Duration::ZERO);
            let frozen_cpu = idle_cpu(&engine, n).await;
            println!(
                "idle CPU with the {frozen} idle ones frozen: {frozen_cpu:.2} % of a core per sandbox"
            );
            table.set(
                "idle CPU per sandbox, the idle ones frozen (`--freeze-idle-ms`), ready ones not",
                col,
                format!("{frozen_cpu:.2} % of a core each ({frozen} frozen)"),
            );
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let per = mib(usage.iter().sum::<u64>()) / n as f64;
            let (lo, hi) = (
                mib(usage.iter().copied().min().unwrap_or(0)),
                mib(usage.iter().copied().max().unwrap_or(0)),
            );
            println!(
                "density: {} sandboxes ({} idle + {} ready), {per:.1} MiB each on average (cgroup memory; {lo:.1}..{hi:.1}) -> {:.1} sandboxes per GiB",
                usage.len(),
                stats.idle,
                stats.ready,
                1024.0 / per
            );
            table.set(
                "density: idle + ready sandboxes (cgroup memory, sentry included)",
                col,
                format!(
                    "{} + {} ready: {per:.1} MiB each → **{:.0} per GiB**",
                    stats.idle,
                    stats.ready,
                    1024.0 / per
                ),
            );
            table.set(
                "idle CPU per sandbox, idle + ready (sentry + gofer)",
                col,
                format!("{idle_pct:.2} % of a core each"),
            );
            table.set(
                "the kernel's page-merging scanner (ksmd) meanwhile, all sandboxes together",
                col,
                format!("{ksmd_pct:.2} % of a core"),
            );
            Ok::<(), anyhow::Error>(())
        }
        .await;
        worker.shutdown().await;
        measured?;

        // Cold starts with an empty pool: every start creates its sandbox inline.
        let engine = make_engine(&cdir.join("empty"), choice, &agent, a.network)?;
        let worker = Worker::new(
            engine,
            images.clone(),
            WorkerConfig {
                keep_alive: Duration::from_secs(600),
                memory_budget_mb: 16 * 1024,
                prewarm: PrewarmConfig::disabled(),
                code_cache: Some(code_cache.clone()),
                ..WorkerConfig::default()
            },
        );
        let measured = async {
            let before = worker.stats();
            let (mut empty, mut inits) = (Vec::new(), Vec::new());
            for i in 0..a.cold {
                let t = timed_invoke(&worker, spec(format!("empty{i}")), i).await?;
                empty.push(t.elapsed);
                inits.extend(t.init_ms);
                drained(&worker, "bench").await;
            }
            let (_, _, claimed) = delta(worker.stats(), before);
            table.set(
                "cold start by boot, empty pool (PrewarmConfig::disabled())",
                col,
                format!(
                    "{} ({claimed} claimed{})",
                    summary("cold start by boot, empty pool", empty),
                    init_note("init", &inits)
                ),
            );
            Ok::<(), anyhow::Error>(())
        }
        .await;
        worker.shutdown().await;
        measured?;
    }
    table.print();
    println!("\nload average at the end: {}", load_average());
    Ok(ExitCode::SUCCESS)
}

/// CPU used over 5 s by the engine's sandbox and gofer processes, in % of a core per sandbox
/// (`sandboxes` of them; USER_HZ is 100, so a tick is 10 ms).
async fn idle_cpu(engine: &RunscEngine, sandboxes: usize) -> f64 {
    let root = engine.config().state_root.display().to_string();
    let (_, t0) = cpu_ticks(&root);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, t1) = cpu_ticks(&root);
    t1.saturating_sub(t0) as f64 * 10.0 / 5000.0 * 100.0 / sandboxes.max(1) as f64
}

/// CPU time (ticks) of the kernel's page-merging thread so far; 0 where there is none.
fn ksmd_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in entries.flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "ksmd") {
            return stat_ticks(&std::fs::read_to_string(p.join("stat")).unwrap_or_default());
        }
    }
    0
}

/// User + system ticks from a `/proc/PID/stat` line (0 if it does not parse).
fn stat_ticks(stat: &str) -> u64 {
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Processes whose command line contains `needle` (a runsc state root), and their CPU time
/// so far in ticks (user + system).
fn cpu_ticks(needle: &str) -> (usize, u64) {
    let (mut n, mut ticks) = (0, 0u64);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains(needle) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        ticks += stat_ticks(&stat);
        n += 1;
    }
    (n, ticks)
}

/// `/proc/loadavg`'s three averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One `runsc run` (foreground) of `python3 -c CODE` (`None`: `/bin/true`), on a bundle like
/// hearth's, with the engine's runsc binary and the platform its probe chose.
fn plain_runsc(
    engine: &RunscEngine,
    rootfs: &Path,
    dir: &Path,
    i: usize,
    code: Option<&str>,
) -> anyhow::Result<Duration> {
    let bundle = dir.join(format!("plain{i}-{}", code.map_or(0, str::len)));
    std::fs::create_dir_all(&bundle)?;
    let args = match code {
        Some(c) => vec!["/usr/bin/python3", "-c", c],
        None => vec!["/bin/true"],
    };
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "user": {"uid": 0, "gid": 0}, "args": args,
                     "env": ["PATH=/usr/bin:/bin"], "cwd": "/" },
        "root": { "path": rootfs, "readonly": true },
        "mounts": [ { "destination": "/proc", "type": "proc", "source": "proc" } ],
        "linux": { "namespaces": [ {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"} ] }
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    let id = format!("pl{:014x}", rand::random::<u64>() >> 8);
    let t = Instant::now();
    let out = Command::new(&engine.config().runsc)
        .arg(format!("--root={}", dir.join("plain-root").display()))
        .arg(format!("--platform={}", engine.caps().platform))
        .args(["--network=none", "run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()?;
    let elapsed = t.elapsed();
    let _ = std::fs::remove_dir_all(&bundle);
    let printed = String::from_utf8_lossy(&out.stdout);
    if !out.status.success()
        || (code.is_some_and(|c| c.contains("print")) && !printed.contains("ready"))
    {
        bail!(
            "plain runsc run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// The chunk store artifact of one version's snapshot (as the worker names it).
fn snapshot_artifact(spec: &FunctionSpec) -> String {
    format!(
        "snapshot/{}/{}-{}",
        spec.name, spec.version, spec.revision_id
    )
}

/// How many chunks of one snapshot were already stored by others.
struct Shared {
    /// Chunks of the page file (`pages.img`; the whole image for compressed checkpoints).
    pages: usize,
    /// Of those, chunks whose id an earlier snapshot's artifact already has.
    pages_stored: usize,
    /// Of those, all-zero chunks (shared trivially).
    zero_stored: usize,
    /// The whole artifact: chunks, and chunks already stored.
    all: usize,
    all_stored: usize,
    file: String,
    /// The same file by 4 KiB page (what page-sized chunks could share): non-zero pages, and
    /// those whose contents an earlier snapshot's file also has.
    pages_4k: usize,
    pages_4k_found: usize,
}

/// 64-bit hashes of the non-zero 4 KiB pages of `bytes`.
fn page_hashes(bytes: &[u8]) -> Vec<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    bytes
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| {
            let mut h = DefaultHasher::new();
            p.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// Compare the chunk ids of `spec`'s snapshot artifact with those of the artifacts of
/// `earlier` (snapshots stored before it), by reading the manifests; and the page file's
/// 4 KiB pages with the earlier snapshots' local page files.
async fn shared_chunks(
    chunks: &hearth_store::ChunkStore,
    earlier: &[&FunctionSpec],
    spec: &FunctionSpec,
    snapshot_dir: &Path,
) -> anyhow::Result<Shared> {
    let local_dir = |s: &FunctionSpec| {
        snapshot_dir
            .join(&s.name)
            .join(format!("{}-{}", s.version, s.revision_id))
    };
    let scope = hearth_store::Scope::Owner("000000000000".into());
    let mut stored = HashSet::new();
    for e in earlier {
        let m = chunks.manifest(&scope, &snapshot_artifact(e)).await?;
        stored.extend(m.chunks.iter().map(|c| c.id));
    }
    let m = chunks.manifest(&scope, &snapshot_artifact(spec)).await?;
    let meta: SnapshotMeta = serde_json::from_str(
        m.meta
            .get("snapshot")
            .context("snapshot manifest without metadata")?,
    )?;
    let cs = hearth_store::CHUNK_SIZE as u64;
    let file = meta
        .files
        .iter()
        .find(|f| f.name == "pages.img")
        .or_else(|| meta.files.iter().find(|f| f.name == "checkpoint.img"))
        .context("snapshot manifest lists no image files")?;
    let first = (file.offset / cs) as usize;
    let end = ((file.offset + file.len).div_ceil(cs) as usize).min(m.chunks.len());
    let region = &m.chunks[first.min(end)..end];
    let local = std::fs::read(local_dir(spec).join(&file.name)).unwrap_or_default();
    let mut seen = HashSet::new();
    for e in earlier {
        let bytes = std::fs::read(local_dir(e).join(&file.name)).unwrap_or_default();
        seen.extend(page_hashes(&bytes));
    }
    let mine = page_hashes(&local);
    let pages_4k_found = mine.iter().filter(|h| seen.contains(h)).count();
    let mut pages_stored = 0;
    let mut zero_stored = 0;
    for (i, c) in region.iter().enumerate() {
        if stored.contains(&c.id) {
            pages_stored += 1;
            let at = i * cs as usize;
            let bytes = local.get(at..(at + cs as usize).min(local.len()));
            if bytes.is_some_and(|b| b.iter().all(|&x| x == 0)) {
                zero_stored += 1;
            }
        }
    }
    Ok(Shared {
        pages: region.len(),
        pages_stored,
        zero_stored,
        all: m.chunks.len(),
        all_stored: m.chunks.iter().filter(|c| stored.contains(&c.id)).count(),
        file: file.name.clone(),
        pages_4k: mine.len(),
        pages_4k_found,
    })
}

fn pct_of(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

async fn snapstart(a: SnapArgs) -> anyhow::Result<ExitCode> {
    use hearth_store::{ChunkStore, Secrets};
    let dir = work_dir()?;
    let agent = a.engines.agent();
    let images = ImageStore::new(&a.engines.image_cache);
    println!(
        "hearth bench snapstart: {} cold starts per function and mode; load average {}",
        a.starts,
        load_average()
    );
    let mut table = Table::default();
    for (ci, choice) in a.engines.choices().iter().enumerate() {
        let cdir = dir.path().join(format!("engine{ci}"));
        let engine = make_engine(&cdir, choice, &agent, NetPolicy::Egress)?;
        print_caps(&engine, choice);
        let col = table.col(engine_label(&engine, choice));
        let chunks = ChunkStore::local(&cdir.join("origin"), None, Secrets::generate()?)?;
        let snapshot_dir = cdir.join("snapshots");
        let prewarm = PrewarmConfig::default();
        let want = prewarm.per_kind_max;
        let worker = Worker::new(
            engine,
            images.clone(),
            WorkerConfig {
                keep_alive: Duration::from_secs(600),
                memory_budget_mb: 16 * 1024,
                snapshot_dir: Some(snapshot_dir.clone()),
                chunk_store: Some(chunks.clone()),
                prewarm,
                code_cache: Some(cdir.join("code")),
                ..WorkerConfig::default()
            },
        );
        let measured = async {
            let make = |name: &str, code: &str, memory_mb: u32| -> anyhow::Result<FunctionSpec> {
                let code_sha256 = cache_code(&cdir.join("code"), code)?;
                let mut spec = bench_spec(name, &code_sha256, "r1".into(), memory_mb);
                // Boots and restores use the same kind of sandbox (a snapshot sandbox has no
                // network on an engine without netstack).
                spec.snap_start = true;
                spec.egress = false;
                Ok(spec)
            };
            let trivial = make("trivial", &heavy_handler(0, 0.0, "a"), 256)?;
            let trivial_b = make("trivialb", &heavy_handler(0, 0.0, "b"), 256)?;
            let heavy = make("heavy", &heavy_handler(100, 1.0, "h"), 1024)?;

            // Snapshots, and what each adds to the chunk store.
            let mut taken: Vec<&FunctionSpec> = Vec::new();
            for spec in [&trivial, &trivial_b, &heavy] {
                let before = chunks.usage().await?.chunks;
                let meta = worker.create_snapshot(spec).await?;
                let added = chunks.usage().await?.chunks - before;
                println!(
                    "{}: snapshot {:.1} MB, init {:.0} ms, checkpoint {:.0} ms, {added} new chunks stored",
                    spec.name,
                    meta.image_bytes as f64 / 1e6,
                    meta.init_ms,
                    meta.checkpoint_ms
                );
                if spec.name != "trivialb" {
                    table.set(
                        &format!("{}: snapshot image, checkpoint time", spec.name),
                        col,
                        format!(
                            "{:.1} MB, {:.0} ms",
                            meta.image_bytes as f64 / 1e6,
                            meta.checkpoint_ms
                        ),
                    );
                }
                if !taken.is_empty() {
                    let s = shared_chunks(&chunks, &taken, spec, &snapshot_dir).await?;
                    let earlier: Vec<&str> = taken.iter().map(|t| t.name.as_str()).collect();
                    println!(
                        "  dedup: {} of {} chunks of {}'s {} ({:.1} %) were already stored by {} ({} of them all-zero); whole image {} of {} ({:.1} %); by 4 KiB page: {} of {} non-zero pages ({:.1} %) also in the earlier",
                        s.pages_stored,
                        s.pages,
                        spec.name,
                        s.file,
                        pct_of(s.pages_stored, s.pages),
                        earlier.join(" + "),
                        s.zero_stored,
                        s.all_stored,
                        s.all,
                        pct_of(s.all_stored, s.all),
                        s.pages_4k_found,
                        s.pages_4k,
                        pct_of(s.pages_4k_found, s.pages_4k)
                    );
                    table.set(
                        &format!(
                            "dedup: chunks of {}'s page file already stored by {}",
                            spec.name,
                            earlier.join(" + ")
                        ),
                        col,
                        format!(
                            "{} of {} chunks ({:.0} %; {} all-zero) of {}; by 4 KiB page {:.0} %",
                            s.pages_stored,
                            s.pages,
                            pct_of(s.pages_stored, s.pages),
                            s.zero_stored,
                            s.file,
                            pct_of(s.pages_4k_found, s.pages_4k)
                        ),
                    );
                }
                taken.push(spec);
            }

            // Boots and restores alternate; the ready pool is refilled before each start. A
            // restore the worker could not do (it boots instead) is counted, not timed.
            for spec in [&trivial, &heavy] {
                let name = spec.name.as_str();
                let (mut boot, mut restore) = (Vec::new(), Vec::new());
                let (mut boot_ms, mut restore_ms) = (Vec::new(), Vec::new());
                let (mut boot_claimed, mut restore_claimed, mut fell_back) = (0, 0, 0);
                let mut min_ready = usize::MAX;
                for i in 0..a.starts {
                    let mut b = spec.clone();
                    b.snap_start = false;
                    let ready = wait_ready(&worker, want, Duration::from_secs(10)).await;
                    min_ready = min_ready.min(ready);
                    let before = worker.stats();
                    let t = timed_invoke(&worker, b, i).await?;
                    if t.doc["init_type"] != "on-demand" {
                        bail!("expected a boot, got {}", t.doc["init_type"]);
                    }
                    boot_claimed += delta(worker.stats(), before).2;
                    boot.push(t.elapsed);
                    boot_ms.extend(t.init_ms);
                    drained(&worker, name).await;
                    let ready = wait_ready(&worker, want, Duration::from_secs(10)).await;
                    min_ready = min_ready.min(ready);
                    let before = worker.stats();
                    let t = timed_invoke(&worker, spec.clone(), i).await?;
                    let (_, restores, claimed) = delta(worker.stats(), before);
                    if t.doc["init_type"] != "snap-start" || restores != 1 {
                        fell_back += 1;
                    } else {
                        restore_claimed += claimed;
                        restore.push(t.elapsed);
                        restore_ms.extend(t.init_ms);
                    }
                    drained(&worker, name).await;
                }
                println!(
                    "  (ready pool held >= {min_ready} before each start; claimed: {boot_claimed}/{} boots, {restore_claimed}/{} restores; {fell_back} restores failed and booted)",
                    a.starts,
                    restore.len()
                );
                let ratio = p50(&boot) / p50(&restore);
                let cell = summary(&format!("{name}: cold start by boot"), boot);
                table.set(
                    &format!("{name}: cold start by boot"),
                    col,
                    format!(
                        "{cell} ({boot_claimed}/{} claimed{})",
                        a.starts,
                        init_note("init", &boot_ms)
                    ),
                );
                let cell = if restore.is_empty() {
                    println!("{name}: no restore succeeded");
                    format!("all {fell_back} restores failed (booted instead)")
                } else {
                    let cell = summary(&format!("{name}: cold start by restore"), restore.clone());
                    format!(
                        "{cell} ({restore_claimed}/{} claimed{}{})",
                        restore.len(),
                        init_note("restore", &restore_ms),
                        if fell_back > 0 {
                            format!("; {fell_back} of {} failed and booted", a.starts)
                        } else {
                            String::new()
                        }
                    )
                };
                table.set(&format!("{name}: cold start by restore"), col, cell);
                if !restore.is_empty() {
                    println!("{name}: restore is {ratio:.1}x faster than boot (p50)");
                    table.set(
                        &format!("{name}: restore speed-up over boot (p50)"),
                        col,
                        format!("{ratio:.1}×"),
                    );
                }
            }

            if ci == 0 {
                let sizes = a
                    .sizes
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        t.parse::<usize>()
                            .with_context(|| format!("--sizes: {t:?}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for mb in &sizes {
                    let spec = make(
                        &format!("state{mb}"),
                        &heavy_handler(*mb, 0.0, "s"),
                        (*mb as u32 + 256).max(512),
                    )?;
                    let meta = worker.create_snapshot(&spec).await?;
                    let mut restore = Vec::new();
                    for i in 0..a.starts.min(5) {
                        wait_ready(&worker, want, Duration::from_secs(10)).await;
                        let t = timed_invoke(&worker, spec.clone(), i).await?;
                        if t.doc["init_type"] == "snap-start" {
                            restore.push(t.elapsed);
                        }
                        drained(&worker, &spec.name).await;
                    }
                    let cell = summary(
                        &format!(
                            "restore, {mb} MB state ({:.0} MB image)",
                            meta.image_bytes as f64 / 1e6
                        ),
                        restore,
                    );
                    table.set(
                        &format!("restore, {mb} MB state"),
                        col,
                        format!("{cell} ({:.0} MB image)", meta.image_bytes as f64 / 1e6),
                    );
                }
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        worker.shutdown().await;
        measured?;
    }
    table.print();
    println!("\nload average at the end: {}", load_average());
    Ok(ExitCode::SUCCESS)
}

/// What deploying `functions` functions on one runtime stores, against the naive sum of
/// every function's image and code.
async fn store_bench(a: StoreArgs) -> anyhow::Result<ExitCode> {
    use hearth_store::{ChunkStore, Scope, Secrets};
    let dir = work_dir()?;
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

/// Wait until the ready pool holds `want` sandboxes or has not grown for 2 s (at most 20 s),
/// then a little longer for the last `runsc create` to settle; returns how many are ready.
async fn wait_settled(worker: &Worker, want: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(20);
    let (mut seen, mut since) = (worker.stats().ready, Instant::now());
    loop {
        let ready = worker.stats().ready;
        if ready != seen {
            (seen, since) = (ready, Instant::now());
        }
        if ready >= want || since.elapsed() >= Duration::from_secs(2) || Instant::now() >= end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return worker.stats().ready;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The memory charged to each sandbox's cgroup (v1 `memory.usage_in_bytes`, v2
/// `memory.current`), by cgroup directory.
fn sandbox_memory(
    cgroups: &hearth_worker::cgroup::Cgroups,
) -> std::collections::BTreeMap<PathBuf, u64> {
    cgroups
        .sandbox_dirs()
        .into_iter()
        .filter_map(|d| {
            let bytes = ["memory.usage_in_bytes", "memory.current"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok())?;
            Some((d, bytes.trim().parse::<u64>().ok()?))
        })
        .collect()
}

/// The small handler `hearth bench runtimes` runs: (file, handler, code) for a runtime.
fn runtime_handler(runtime: &str) -> anyhow::Result<(&'static str, &'static str, &'static str)> {
    let image = hearth_worker::images::recipe_for(runtime)?;
    Ok(if image.python.is_some() {
        (
            "app.py",
            "app.handler",
            "def handler(event, context):\n    return {'n': event.get('n'), 'id': context.aws_request_id}\n",
        )
    } else if image.node.is_some() {
        (
            "index.mjs",
            "index.handler",
            "export const handler = async (event, context) => ({ n: event.n, id: context.awsRequestId });\n",
        )
    } else {
        bail!("hearth bench runtimes has a handler for Python and Node.js runtimes, not {runtime}")
    })
}

async fn runtimes_bench(a: RuntimesArgs) -> anyhow::Result<ExitCode> {
    let runtimes: Vec<String> = a
        .runtimes
        .split(',')
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    let dir = work_dir()?;
    let code_cache = dir.path().join("code-cache");
    let images = ImageStore::new(&a.engines.image_cache);
    let mut fns = Vec::new();
    for name in &runtimes {
        let (rt, bootstrap) = match name.split_once(':') {
            None => (name.as_str(), false),
            Some((rt, "bootstrap")) => (rt, true),
            Some(_) => bail!("{name}: a runtime, or a runtime and :bootstrap"),
        };
        let (file, handler, code) = runtime_handler(rt)?;
        images
            .rootfs_for_runtime(rt)
            .with_context(|| format!("{rt} image (hearth image build {rt})"))?;
        let sha = cache_file(&code_cache, file, code)?;
        fns.push((rt.to_string(), handler, sha, bootstrap));
    }
    let agent = a.engines.agent();
    println!(
        "hearth bench runtimes: {}; {} cold starts (ready pool) and {} warm invokes each; network {}; load average {}",
        runtimes.join(", "),
        a.cold,
        a.warm,
        a.network,
        load_average()
    );
    let mut table = Table::default();
    for (ci, choice) in a.engines.choices().iter().enumerate() {
        let engine = make_engine(
            &dir.path().join(format!("engine{ci}")),
            choice,
            &agent,
            a.network,
        )?;
        print_caps(&engine, choice);
        let label = engine_label(&engine, choice);
        let cols: Vec<usize> = runtimes
            .iter()
            .map(|rt| table.col(format!("{rt} ({label})")))
            .collect();
        // Room for every runtime's ready sandboxes.
        let prewarm = PrewarmConfig {
            per_kind_max: 2,
            total_max: 2 * runtimes.len(),
            ..PrewarmConfig::default()
        };
        let worker = Worker::new(
            engine.clone(),
            images.clone(),
            WorkerConfig {
                keep_alive: Duration::from_secs(600),
                memory_budget_mb: 16 * 1024,
                prewarm,
                code_cache: Some(code_cache.clone()),
                ..WorkerConfig::default()
            },
        );
        // Each runtime's ready sandboxes in turn, to read what one holds (a prestarted runtime
        // included) once its memory has settled; a `:bootstrap` variant shares its runtime's.
        let memory_dirs = || sandbox_memory(engine.cgroups());
        let mut kinds = 0;
        for (i, (rt, ..)) in fns.iter().enumerate() {
            if fns[..i].iter().any(|(other, ..)| other == rt) {
                continue;
            }
            let before = memory_dirs();
            worker.prewarm(rt);
            kinds += 1;
            wait_settled(&worker, kinds).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let new: Vec<u64> = memory_dirs()
                .into_iter()
                .filter(|(d, _)| !before.contains_key(d))
                .map(|(_, b)| b)
                .collect();
            if !new.is_empty() {
                let mib = new.iter().sum::<u64>() as f64 / new.len() as f64 / 1048576.0;
                println!(
                    "{rt}: a ready sandbox holds {mib:.1} MiB (cgroup memory, {} measured)",
                    new.len()
                );
                table.set(
                    "memory of a ready sandbox (cgroup, sentry and prestarted runtime included)",
                    cols[i],
                    format!("{mib:.1} MiB"),
                );
            }
        }
        let spec = |i: usize, rev: String| {
            let (rt, handler, sha, bootstrap) = &fns[i];
            let mut spec = FunctionSpec {
                runtime: rt.clone(),
                handler: handler.to_string(),
                ..bench_spec(&format!("bench{i}"), sha, rev, 128)
            };
            if *bootstrap {
                spec.env.insert("LD_PRELOAD".into(), String::new());
            }
            spec
        };
        let measured = async {
            // Cold starts: the runtimes take turns, each from a refilled ready pool.
            let (mut cold, mut inits) = (vec![Vec::new(); fns.len()], vec![Vec::new(); fns.len()]);
            let mut min_ready = usize::MAX;
            let before = worker.stats();
            for n in 0..a.cold {
                for i in 0..fns.len() {
                    min_ready = min_ready.min(wait_settled(&worker, prewarm.total_max).await);
                    let t = timed_invoke(&worker, spec(i, format!("cold{n}")), n).await?;
                    cold[i].push(t.elapsed);
                    inits[i].extend(t.init_ms);
                    drained(&worker, &format!("bench{i}")).await;
                }
            }
            let (_, _, claimed) = delta(worker.stats(), before);
            println!(
                "  (ready pool held >= {min_ready} sandboxes before each start; {claimed} of {} starts claimed a ready sandbox)",
                a.cold * fns.len()
            );
            for (i, rt) in runtimes.iter().enumerate() {
                let cell = summary(&format!("{rt}: cold start, ready pool"), cold[i].clone());
                let note = init_note("init", &inits[i]);
                table.set(
                    "cold start by boot from the ready pool, request in → response out",
                    cols[i],
                    format!("{cell}{note}"),
                );
            }
            // Warm invokes, after 20 untimed ones each.
            for (i, rt) in runtimes.iter().enumerate() {
                let mut warm = Vec::new();
                for n in 0..a.warm + 20 {
                    let t = timed_invoke(&worker, spec(i, "warm".into()), n).await?;
                    if n >= 20 {
                        warm.push(t.elapsed);
                    }
                }
                table.set(
                    "warm invoke through worker + agent + runtime client in runsc",
                    cols[i],
                    summary(&format!("{rt}: warm invoke"), warm),
                );
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        worker.shutdown().await;
        measured?;
    }
    table.print();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_benchs_directory_goes_and_a_running_ones_stays() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dead = tmp.path().join(format!("{BENCH_PREFIX}dead"));
        std::fs::create_dir_all(dead.join("engine/runsc")).expect("dead dir");
        // Pids never go this high here (`/proc/sys/kernel/pid_max` is at most 4194304).
        std::fs::write(dead.join("pid"), "4999999").expect("pid");
        let live = tmp.path().join(format!("{BENCH_PREFIX}live"));
        std::fs::create_dir_all(&live).expect("live dir");
        std::fs::write(live.join("pid"), std::process::id().to_string()).expect("pid");
        let starting = tmp.path().join(format!("{BENCH_PREFIX}starting"));
        std::fs::create_dir_all(&starting).expect("starting dir");
        let other = tmp.path().join("something-else");
        std::fs::create_dir_all(&other).expect("other dir");
        std::fs::write(other.join("pid"), "4999999").expect("pid");
        assert_eq!(runsc_roots(&dead, 3), vec![dead.join("engine/runsc")]);
        reap_killed_benches(tmp.path());
        assert!(!dead.exists());
        assert!(live.exists() && starting.exists() && other.exists());
    }
}
