//! `hearth worker` and `hearth frontend`: hearth as separate processes. Workers run sandboxes
//! and heartbeat to every assignment node; front ends serve the Lambda API and run each
//! invocation on a worker under a lease from the assignment service (`hearth assignment`).
//! Every connection between them is authenticated with the cluster secret; all of them share
//! one chunk store origin, whose key is derived from the same secret.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::Args;
use hearth_assign::client::Client;
use hearth_assign::eventlog::ReplicatedLog;
use hearth_assign::fleet::WorkerReport;
use hearth_assign::remote::{RemoteConfig, RemoteInvoker, serve_worker};

use super::assign::SecretArgs;
use super::up::{ApiArgs, CommonArgs, StoreArgs, WorkerArgs};

/// How a process joins a cluster.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The assignment nodes, `HOST:PORT,HOST:PORT,...` (all of them).
    #[arg(
        long,
        env = "HEARTH_ASSIGNMENT",
        value_delimiter = ',',
        required = true
    )]
    pub assignment: Vec<String>,
    /// The chunk store origin every process of the cluster shares: `s3://BUCKET[/PREFIX]` (an
    /// S3-compatible server; credentials and region from the usual `AWS_*` variables of this
    /// process) or a directory (on several machines, a shared file system).
    #[arg(long, env = "HEARTH_STORE")]
    pub store: String,
    /// The S3 endpoint, for S3-compatible servers (`http://HOST:PORT`); default: AWS's.
    #[arg(long, env = "HEARTH_STORE_ENDPOINT")]
    pub store_endpoint: Option<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

impl ClusterArgs {
    /// The chunk store's origin.
    fn origin(&self) -> anyhow::Result<Arc<dyn object_store::ObjectStore>> {
        let Some(rest) = self.store.strip_prefix("s3://") else {
            if self.store_endpoint.is_some() {
                bail!("--store-endpoint is for an s3:// store");
            }
            return hearth_store::local_origin(Path::new(&self.store))
                .with_context(|| format!("opening the chunk store {}", self.store));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--store {}: no bucket", self.store);
        }
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(ep) = &self.store_endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        let s3 = b
            .build()
            .with_context(|| format!("configuring the S3 store {}", self.store))?;
        let prefix = prefix.trim_matches('/');
        Ok(if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        })
    }

    /// The chunk store's key, derived from the cluster secret (so every process agrees on it
    /// without another file to copy).
    fn store_secrets(&self) -> anyhow::Result<hearth_store::Secrets> {
        let material = self.secret.material()?;
        Ok(hearth_store::Secrets::from_master_key(blake3::derive_key(
            "hearth chunk store master key v1",
            &material,
        )))
    }
}

#[derive(Args)]
pub struct WorkerNodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// This worker's name (default: the host name); each run registers as NAME/START_MS.
    #[arg(long)]
    pub name: Option<String>,
    /// Where front ends reach this worker.
    #[arg(long, default_value = "127.0.0.1:7200")]
    pub listen: String,
    /// The address front ends use (default: the listen address; required when listening on
    /// a wildcard address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Milliseconds between heartbeats (the assignment nodes declare a worker dead after
    /// their --worker-dead-ms without one).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub heartbeat_ms: u64,
}

#[derive(Args)]
pub struct FrontendArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Number of partitions of the assignment service (as its nodes were started with).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub partitions: u32,
    /// Size bound (MiB) of this front end's cache of chunks.
    #[arg(long, default_value_t = 256)]
    pub chunk_cache_mb: u64,
    /// Milliseconds the front end keeps a lease after an invocation for the next invocation of
    /// the same version, which then needs no journal write (0: acquire and release every
    /// time). Held leases count against concurrency; functions with reserved concurrency
    /// never hold.
    #[arg(long, env = "HEARTH_LEASE_HOLD_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub lease_hold_ms: u64,
    /// New sandboxes one function may add per 10 seconds, over the whole cluster (Lambda's
    /// scaling rate: 1,000); a cold start past it gets 429 `FunctionInvocationRateLimitExceeded`.
    #[arg(long, env = "HEARTH_SCALING_RATE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub scaling_rate: u32,
    /// The name of this front end's queue of asynchronous invocations, kept in the assignment
    /// service (replicated with its partition). Default: a name made at first start and kept
    /// in `<data-dir>/events-queue`. A front end started elsewhere with the same name takes
    /// over the queue; two running front ends must never share one.
    #[arg(long, env = "HEARTH_EVENTS_QUEUE")]
    pub events_queue: Option<String>,
    /// Bound (MiB) of the asynchronous events the assignment service keeps in one partition
    /// (every front end's queue there together); past it `Event` invocations get 429.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=40))]
    pub events_queue_mb: u64,
}

/// The front end's queue name: `--events-queue`, else the one kept in the data directory
/// (made at first start).
fn events_queue_name(given: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<String> {
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= 128
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if let Some(name) = given {
        anyhow::ensure!(
            valid(name),
            "--events-queue {name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        );
        return Ok(name.to_string());
    }
    let path = data_dir.join("events-queue");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let name = text.trim().to_string();
            anyhow::ensure!(valid(&name), "{} holds no valid queue name", path.display());
            Ok(name)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = format!("frontend-{}", hex::encode(rand::random::<[u8; 8]>()));
            std::fs::write(&path, format!("{name}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(name)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// What the worker's caches hold, as placement's locality keys.
fn cached_keys(data_dir: &Path, images: &hearth_worker::ImageStore) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(data_dir.join("cache").join("code")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(raw) = hex::decode(&name)
                && raw.len() == 32
            {
                let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
                keys.insert(format!("code:{b64}"));
            }
        }
    }
    for recipe in hearth_worker::images::RECIPES {
        if images.rootfs(recipe.name).is_ok() {
            keys.insert(format!("image:{}", recipe.name));
        }
    }
    keys
}

pub fn run_worker(args: WorkerNodeArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(worker_main(args))
}

async fn worker_main(args: WorkerNodeArgs) -> anyhow::Result<ExitCode> {
    let secret = args.cluster.secret.load()?;
    let data_dir = super::up::data_dir(&args.common)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let addr = match &args.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            bail!("--listen {bound} is a wildcard address: pass --advertise HOST:PORT")
        }
        None => bound.to_string(),
    };
    let chunks = super::up::open_chunks(
        &data_dir,
        args.cluster.origin()?,
        args.cluster.store_secrets()?,
        args.worker.chunk_cache_mb,
        &args.store,
    )?;
    let worker = super::up::start_worker(&args.common, &args.worker, &data_dir, &chunks).await?;
    println!("hearth worker: sandboxes ready; registering with the assignment service");
    let images = hearth_worker::ImageStore::new(
        args.worker
            .image_cache
            .clone()
            .unwrap_or_else(|| data_dir.join("images")),
    );
    tokio::spawn(serve_worker(
        listener,
        secret.clone(),
        Arc::new(worker.clone()),
    ));

    let name = args.name.clone().unwrap_or_else(host_name);
    if name.contains('/') {
        bail!("--name must not contain '/'");
    }
    let client = Arc::new(Client::new(
        &args.cluster.assignment,
        1,
        secret,
        Duration::from_secs(5),
    ));
    let every = Duration::from_millis(args.heartbeat_ms);
    let beat = heartbeats(
        worker.clone(),
        name,
        addr,
        data_dir,
        images,
        every,
        move |report| {
            let client = client.clone();
            async move {
                client
                    .heartbeat(&report, every.max(Duration::from_secs(1)))
                    .await
            }
        },
    );
    tokio::select! {
        _ = beat => {}
        _ = super::up::shutdown_signal() => {}
    }
    worker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Heartbeats of `worker` through `send` (which answers how many nodes took the report and
/// whether one said this worker run is dead) every `every`, forever. A run declared dead
/// registers again under a new id.
pub async fn heartbeats<F, Fut>(
    worker: hearth_worker::Worker,
    name: String,
    addr: String,
    data_dir: std::path::PathBuf,
    images: hearth_worker::ImageStore,
    every: Duration,
    send: F,
) where
    F: Fn(WorkerReport) -> Fut,
    Fut: std::future::Future<Output = (usize, bool)>,
{
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut id = format!("{name}/{}", now_ms());
    let mut registered = false;
    loop {
        let load = worker.load();
        let report = WorkerReport {
            id: id.clone(),
            addr: addr.clone(),
            memory_mb: load.memory_budget_mb,
            memory_free_mb: load
                .memory_budget_mb
                .saturating_sub(load.memory_committed_mb),
            memory_idle_mb: load.memory_idle_mb,
            cores,
            busy: load.busy as u32,
            sandboxes: load.sandboxes as u32,
            cached: cached_keys(&data_dir, &images),
            idle: Some(load.idle),
        };
        let (taken, dead) = send(report).await;
        if dead {
            let old = std::mem::replace(&mut id, format!("{name}/{}", now_ms()));
            tracing::warn!(
                %old, new = %id,
                "the assignment service declared this worker dead: registering again"
            );
            continue;
        }
        if taken > 0 && !registered {
            registered = true;
            println!("hearth worker {id} registered; serving front ends at {addr}");
        } else if taken == 0 {
            tracing::warn!("no assignment node took the heartbeat");
        }
        tokio::time::sleep(every).await;
    }
}

pub fn run_frontend(args: FrontendArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(frontend_main(args))
}

async fn frontend_main(args: FrontendArgs) -> anyhow::Result<ExitCode> {
    let secret = args.cluster.secret.load()?;
    let data_dir = super::up::data_dir(&args.common)?;
    let chunks = super::up::open_chunks(
        &data_dir,
        args.cluster.origin()?,
        args.cluster.store_secrets()?,
        args.chunk_cache_mb,
        &args.store,
    )?;
    let client = Arc::new(Client::new(
        &args.cluster.assignment,
        args.partitions,
        secret.clone(),
        Duration::from_secs(10),
    ));
    let invoker = RemoteInvoker::new(
        client.clone(),
        secret,
        RemoteConfig {
            holder: format!("frontend {} pid {}", host_name(), std::process::id()),
            keep_alive: Duration::from_secs(args.common.keep_alive),
            connect_timeout: Duration::from_secs(2),
            snapshots_keep_network: false,
            lease_hold: Duration::from_millis(args.lease_hold_ms),
            burst: Some(hearth_assign::partition::BurstLimit {
                per_window: args.scaling_rate,
                window_ms: 10_000,
            }),
            // Other front ends' calls could be throttled by this one's held leases.
            hold_reserved: false,
        },
    );
    let invoker = Arc::new(invoker);
    let queue = events_queue_name(args.events_queue.as_deref(), &data_dir)?;
    let events = ReplicatedLog::open(
        client.clone(),
        &queue,
        args.events_queue_mb << 20,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("opening the event queue {queue} in the assignment service"))?;
    println!(
        "asynchronous invocations queue in the assignment service as {queue} (partition {})",
        events.partition()
    );
    super::up::serve_api(
        &args.common,
        &args.api,
        &data_dir,
        invoker.clone(),
        &chunks,
        Some(Arc::new(events)),
    )
    .await?;
    invoker.release_held().await;
    Ok(ExitCode::SUCCESS)
}
