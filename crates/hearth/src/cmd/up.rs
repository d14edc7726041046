//! `hearth up`: every part in one process on one data directory (the single-machine default).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hearth_worker::affinity::Pinning;
use hearth_worker::engine::default_runsc;
use hearth_worker::{EngineConfig, RunscEngine, Worker, WorkerConfig};
use serde::{Deserialize, Serialize};

/// What every hearth server process takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Data directory: metadata, code, logs, images, sandbox state.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value_os_t = super::default_data_dir())]
    pub data_dir: PathBuf,
    /// Region reported in ARNs and to functions.
    #[arg(long, env = "HEARTH_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Seconds an idle sandbox is kept warm for reuse.
    #[arg(long, env = "HEARTH_KEEP_ALIVE", default_value_t = 300)]
    pub keep_alive: u64,
}

/// The Lambda API (front end) settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address the Lambda API listens on (port 0 picks a free port).
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Access key id clients sign with (generated and kept in <data-dir>/credentials.json if unset).
    #[arg(long, env = "HEARTH_ACCESS_KEY_ID", requires = "secret_access_key")]
    pub access_key_id: Option<String>,
    /// Secret access key clients sign with.
    #[arg(long, env = "HEARTH_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_access_key: Option<String>,
    /// Account concurrency limit.
    #[arg(long, env = "HEARTH_ACCOUNT_CONCURRENCY", default_value_t = 1000)]
    pub account_concurrency: u32,
    /// Also snapshot `$LATEST` of functions with SnapStart (Lambda snapshots only published
    /// versions).
    #[arg(long, env = "HEARTH_SNAPSTART_LATEST")]
    pub snap_start_latest: bool,
    /// Seconds the download URL in GetFunction's Code.Location works.
    #[arg(long, env = "HEARTH_CODE_URL_TTL", default_value_t = hearth_api::download::DEFAULT_TTL.as_secs())]
    pub code_url_ttl: u64,
    /// Asynchronous (`Event`) invocations running at once, over all functions.
    #[arg(long, env = "HEARTH_ASYNC_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub async_concurrency: u32,
    /// Seconds before the first retry of an asynchronous invocation that failed (the second
    /// waits twice as long); Lambda waits about a minute.
    #[arg(long, env = "HEARTH_ASYNC_RETRY_DELAY", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub async_retry_delay: u64,
    /// Also serve the metrics (`GET /metrics`, Prometheus' text format) without
    /// authentication on this address, for a scraper (they are behind SigV4 at
    /// `/hearth/v1/metrics` on the API's address).
    #[arg(long, env = "HEARTH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Domain of function URLs, for a deployment whose DNS sends `*.lambda-url.<region>.<domain>`
    /// here: `FunctionUrl` is then `https://<url-id>.lambda-url.<region>.<domain>/` (give
    /// `http://domain[:port]` for plain HTTP). Unset, it is a path on this listener
    /// (`http://<listen>/lambda-url/<url-id>/`), which works with no DNS set-up. Both forms are
    /// served either way.
    #[arg(long, env = "HEARTH_URL_DOMAIN", value_parser = parse_url_domain)]
    pub url_domain: Option<hearth_api::urls::UrlBase>,
}

fn parse_url_domain(raw: &str) -> Result<hearth_api::urls::UrlBase, String> {
    hearth_api::urls::UrlBase::domain(raw).map_err(|e| e.to_string())
}

/// The worker (sandboxes) settings.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Memory (MiB) all sandboxes together may use (default: 80 % of the machine).
    #[arg(long, env = "HEARTH_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<u64>,
    /// Image cache directory (default: <data-dir>/images).
    #[arg(long, env = "HEARTH_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,
    /// Do not build missing runtime images at start (functions of a missing runtime fail with
    /// ResourceNotReadyException).
    #[arg(long)]
    pub no_build_images: bool,
    /// The static agent binary.
    #[arg(long, env = "HEARTH_AGENT")]
    pub agent: Option<PathBuf>,
    /// The runsc binary.
    #[arg(long, env = "HEARTH_RUNSC")]
    pub runsc: Option<PathBuf>,
    /// Do not store runtime images in the chunk store (test servers that share one image cache).
    #[arg(long, env = "HEARTH_NO_IMAGE_ARTIFACTS")]
    pub no_image_artifacts: bool,
    /// Size bound (MiB) of the worker's disk cache of chunks.
    #[arg(long, env = "HEARTH_CHUNK_CACHE_MB", default_value_t = 4096)]
    pub chunk_cache_mb: u64,
    /// How sandboxes are placed on cores: `split` (each sandbox's sentry on one core, its
    /// application on the next; the fastest here, see docs/perf.md), `core` (each sandbox on
    /// one core) or `off`.
    #[arg(long, env = "HEARTH_PIN", value_enum, default_value_t = PinMode::Split)]
    pub pin: PinMode,
    /// Do not pin sandboxes to cores (the same as `--pin off`).
    #[arg(long, env = "HEARTH_NO_PIN")]
    pub no_pin: bool,
    /// Let the kernel merge identical pages of the sandboxes' sentry and gofer processes (KSM:
    /// Linux 6.4+, root; started if off). A function's own memory is never merged. About
    /// 1.8 MiB less per idle sandbox, for ≈ 3 % of a core while the kernel scans (see
    /// docs/perf.md); `--merge-pages=false` turns it off.
    #[arg(long, env = "HEARTH_MERGE_PAGES", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub merge_pages: bool,
    /// Network policy for functions: `egress` (outbound access through NAT, never to this
    /// host; a function opts out with the environment variable HEARTH_NETWORK=none) or `none`.
    #[arg(long, env = "HEARTH_NETWORK_POLICY", default_value = "egress")]
    pub network: hearth_worker::netns::NetPolicy,
    /// Disk (MiB) all sandboxes' /tmp disks together may be given.
    #[arg(long, env = "HEARTH_DISK_BUDGET_MB", default_value_t = 64 * 1024)]
    pub disk_budget_mb: u64,
    /// Most sandboxes of one kind (runtime, network, /tmp size) kept created ahead of demand;
    /// 0 turns pre-creation off.
    #[arg(long, env = "HEARTH_PREWARM_PER_KIND", default_value_t = 2)]
    pub prewarm_per_kind: usize,
    /// Most sandboxes kept created ahead of demand in all.
    #[arg(long, env = "HEARTH_PREWARM_TOTAL", default_value_t = 4)]
    pub prewarm_total: usize,
    /// Cold starts run at once (default: the number of cores); further invocations that find
    /// no idle sandbox wait for one to come free or for a start to finish.
    #[arg(long, env = "HEARTH_START_LIMIT", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub start_limit: Option<u64>,
    /// New sandboxes one function may add per 10 seconds (Lambda's scaling rate: 1,000); a
    /// cold start past it gets 429 `FunctionInvocationRateLimitExceeded`.
    #[arg(long, env = "HEARTH_SCALING_RATE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub scaling_rate: u32,
    /// Seconds an idle sandbox beyond its function version's predicted demand is kept (the
    /// predicted ones keep --keep-alive); at or above --keep-alive every idle sandbox keeps
    /// the keep-alive.
    #[arg(long, env = "HEARTH_IDLE_GRACE", default_value_t = 30)]
    pub idle_grace: u64,
    /// Milliseconds after which an idle sandbox is frozen (no CPU at all until an invocation
    /// takes it; thawing costs well under a millisecond); 0: never freeze.
    #[arg(long, env = "HEARTH_FREEZE_IDLE_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub freeze_idle_ms: u64,
    /// Seconds of recent invocations (peak concurrency, arrival rate times mean duration) that
    /// predict how many sandboxes of a function version to keep warm.
    #[arg(long, env = "HEARTH_DEMAND_WINDOW", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub demand_window: u64,
    /// Most sandboxes of one function version its predicted demand keeps warm.
    #[arg(long, env = "HEARTH_KEEP_WARM_MAX", default_value_t = 100)]
    pub keep_warm_max: usize,
}

/// The chunk store's collector settings.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Seconds between runs of the chunk store's garbage collector.
    #[arg(long, env = "HEARTH_GC_INTERVAL", default_value_t = 600)]
    pub gc_interval: u64,
    /// Seconds an unreferenced chunk is kept before the collector may delete it (reused
    /// chunks are refreshed by puts past half of it). Run `hearth store gc` next to this server
    /// with at least the same grace.
    #[arg(long, env = "HEARTH_GC_GRACE", default_value_t = hearth_store::DEFAULT_GC_GRACE.as_secs())]
    pub gc_grace: u64,
}

/// How `hearth up` places sandboxes on cores.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMode {
    Split,
    Core,
    Off,
}

impl From<PinMode> for Pinning {
    fn from(m: PinMode) -> Self {
        match m {
            PinMode::Split => Pinning::Split,
            PinMode::Core => Pinning::Core,
            PinMode::Off => Pinning::Off,
        }
    }
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// Decide assignment (leases, concurrency limits, the scaling rate, placement) in an
    /// in-process member of the assignment service, journaled in <data-dir>/assignment, as a
    /// cluster does; `--assignment-service=false`: the worker's pool decides alone.
    #[arg(long, env = "HEARTH_ASSIGNMENT_SERVICE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub assignment_service: bool,
    /// With --assignment-service: milliseconds a lease is kept after an invocation for the
    /// next one of the same version (as `hearth frontend --lease-hold-ms`).
    #[arg(long, env = "HEARTH_LEASE_HOLD_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub lease_hold_ms: u64,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Credentials kept in the data directory so restarts keep working clients.
#[derive(Serialize, Deserialize)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    (0..len)
        .map(|_| alphabet[rand::random_range(0..alphabet.len())] as char)
        .collect()
}

fn load_or_create_credentials(data_dir: &Path, args: &ApiArgs) -> anyhow::Result<Credentials> {
    if let (Some(a), Some(s)) = (&args.access_key_id, &args.secret_access_key) {
        return Ok(Credentials {
            access_key_id: a.clone(),
            secret_access_key: s.clone(),
        });
    }
    let path = data_dir.join("credentials.json");
    if let Ok(bytes) = std::fs::read(&path) {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", path.display()));
    }
    let creds = Credentials {
        access_key_id: format!(
            "HEARTH{}",
            random_string(14, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        ),
        secret_access_key: random_string(
            40,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        ),
    };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    Ok(creds)
}

pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(up(args))
}

/// Creates the data directory and answers its absolute path.
pub fn data_dir(common: &CommonArgs) -> anyhow::Result<PathBuf> {
    let dir = &common.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// The chunk store over `origin`, with this process's verified chunk cache
/// under `data_dir`, and the collector running every `gc_interval`.
pub fn open_chunks(
    data_dir: &Path,
    origin: Arc<dyn object_store::ObjectStore>,
    secrets: hearth_store::Secrets,
    cache_mb: u64,
    store: &StoreArgs,
) -> anyhow::Result<hearth_store::ChunkStore> {
    let cache = hearth_store::ChunkCache::open(
        &data_dir.join("cache").join("chunks"),
        cache_mb * 1024 * 1024,
    )
    .context("opening the chunk cache")?;
    let chunks = hearth_store::ChunkStore::with_object_store(origin, Some(cache), secrets)
        .with_gc_grace(Duration::from_secs(store.gc_grace));
    // The collector frees chunks no manifest uses; this process's uploads in flight pin their
    // chunks, the grace period protects other processes' uploads.
    let gc = chunks.clone();
    let every = Duration::from_secs(store.gc_interval.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match gc.collect_garbage().await {
                Ok(r) => tracing::info!(
                    deleted = r.deleted,
                    bytes_freed = r.bytes_freed,
                    "chunk store collected"
                ),
                Err(e) => tracing::warn!("chunk store collection: {e}"),
            }
        }
    });
    Ok(chunks)
}

/// Builds missing runtime images (unless told not to), probes runsc and starts the sandbox pool.
pub async fn start_worker(
    common: &CommonArgs,
    args: &WorkerArgs,
    data_dir: &Path,
    chunks: &hearth_store::ChunkStore,
) -> anyhow::Result<Worker> {
    let images = hearth_worker::ImageStore::new(
        args.image_cache
            .clone()
            .unwrap_or_else(|| data_dir.join("images")),
    );
    if !args.no_build_images {
        let store = images.clone();
        let built = tokio::task::spawn_blocking(move || {
            store.ensure_all(&mut super::image::progress_printer())
        })
        .await?;
        match built {
            Ok(()) => {}
            // Some runtimes' images could not be built (the npm registry out of reach, say):
            // the others serve; those runtimes' functions fail until the image is built.
            Err(e) if e.failed_images().len() < hearth_worker::images::RECIPES.len() => {
                let failed = e.failed_images().join(", ");
                tracing::warn!(
                    "{e}; starting without them (functions on {failed} fail until `hearth image build NAME` succeeds)"
                );
            }
            Err(e) => {
                return Err(e).context("building runtime images (or start with --no-build-images)");
            }
        }
    }
    // Runtime images go to the chunk store (shared scope) in the background: this worker runs
    // them from its local cache meanwhile; other workers fetch them from the store.
    if !args.no_image_artifacts {
        let (images, chunks) = (images.clone(), chunks.clone());
        tokio::spawn(async move {
            for recipe in hearth_worker::images::RECIPES {
                if images.rootfs(recipe.name).is_err() {
                    continue;
                }
                match hearth_worker::artifacts::publish_image(&images, &chunks, recipe.name).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        image = recipe.name,
                        new_bytes = n,
                        "image stored in the chunk store"
                    ),
                    Err(e) => tracing::warn!(
                        image = recipe.name,
                        "storing the image in the chunk store: {e}"
                    ),
                }
            }
        });
    }
    let engine = RunscEngine::new(EngineConfig {
        runsc: args.runsc.clone().unwrap_or_else(default_runsc),
        state_root: data_dir.join("runsc"),
        bundles: data_dir.join("sandboxes"),
        slots: data_dir.join("slots"),
        agent: super::find_agent(args.agent.clone()),
        pinning: if args.no_pin {
            Pinning::Off
        } else {
            args.pin.into()
        },
        control_restore: true,
        extra_flags: vec![],
        network: args.network,
        probe_cache: hearth_worker::engine::default_probe_cache(),
        merge_pages: args.merge_pages,
    })?;
    let worker = Worker::new(
        Arc::new(engine),
        images,
        WorkerConfig {
            region: common.region.clone(),
            keep_alive: Duration::from_secs(common.keep_alive),
            demand: hearth_worker::demand::DemandConfig {
                window: Duration::from_secs(args.demand_window),
                idle_grace: Duration::from_secs(args.idle_grace),
                max_per_revision: args.keep_warm_max,
            },
            memory_budget_mb: args
                .memory_budget_mb
                .unwrap_or_else(hearth_worker::pool::default_memory_budget_mb),
            snapshot_dir: Some(data_dir.join("snapshots")),
            chunk_store: Some(chunks.clone()),
            code_cache: Some(data_dir.join("cache").join("code")),
            disk_budget_mb: args.disk_budget_mb,
            prewarm: hearth_worker::prewarm::PrewarmConfig {
                per_kind_max: args.prewarm_per_kind,
                total_max: if args.prewarm_per_kind == 0 {
                    0
                } else {
                    args.prewarm_total
                },
                ..Default::default()
            },
            start_limit: args
                .start_limit
                .map(|n| n as usize)
                .unwrap_or(WorkerConfig::default().start_limit),
            burst: hearth_worker::scaling::BurstRule {
                per_window: args.scaling_rate,
                window: Duration::from_secs(10),
            },
            freeze_idle_after: (args.freeze_idle_ms > 0)
                .then(|| Duration::from_millis(args.freeze_idle_ms)),
            ..WorkerConfig::default()
        },
    );
    for runtime in ["python3.11", "provided"] {
        worker.prewarm(runtime);
    }
    Ok(worker)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
    }
    tracing::info!("shutting down");
}

/// Serves the Lambda API over `invoker` until SIGINT or SIGTERM, printing the endpoint and
/// credentials (also written to `<data-dir>/client.env`).
pub async fn serve_api(
    common: &CommonArgs,
    args: &ApiArgs,
    data_dir: &Path,
    invoker: Arc<dyn hearth_core::invoker::Invoker>,
    chunks: &hearth_store::ChunkStore,
    event_log: Option<Arc<dyn hearth_core::eventlog::EventLog>>,
) -> anyhow::Result<()> {
    let creds = load_or_create_credentials(data_dir, args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let endpoint = format!("http://{addr}");
    let function_urls = match &args.url_domain {
        Some(base) => base.clone(),
        None => {
            // A wildcard listen address is reached on loopback from this machine.
            let mut local = addr;
            if local.ip().is_unspecified() {
                local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            hearth_api::urls::UrlBase::Path {
                endpoint: format!("http://{local}"),
            }
        }
    };
    let config = hearth_api::ApiConfig {
        data_dir: data_dir.to_path_buf(),
        region: common.region.clone(),
        account_id: "000000000000".into(),
        credentials: vec![(creds.access_key_id.clone(), creds.secret_access_key.clone())],
        account_concurrency: args.account_concurrency,
        snap_start_latest: args.snap_start_latest,
        chunk_store: Some(chunks.clone()),
        code_url_ttl: Duration::from_secs(args.code_url_ttl),
        async_config: hearth_api::events::AsyncConfig {
            policy: hearth_api::events::sched::Policy {
                retry_base_ms: args.async_retry_delay * 1000,
                ..Default::default()
            },
            concurrency: args.async_concurrency as usize,
        },
        event_log,
        function_urls,
    };
    let state = hearth_api::AppState::new(config, invoker)
        .await
        .context("opening metadata")?;
    let env_file = data_dir.join("client.env");
    let env_text = format!(
        "export AWS_ENDPOINT_URL={endpoint}\nexport AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\nexport AWS_DEFAULT_REGION={}\n",
        creds.access_key_id, creds.secret_access_key, common.region
    );
    write_private(&env_file, env_text.as_bytes())?;
    println!("hearth is up");
    println!("  endpoint:          {endpoint}");
    println!("  access key id:     {}", creds.access_key_id);
    println!("  secret access key: {}", creds.secret_access_key);
    println!("  region:            {}", common.region);
    println!("  data directory:    {}", data_dir.display());
    println!(
        "point boto3 and the AWS CLI at it with:  source {}",
        env_file.display()
    );
    if let Some(at) = args.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("binding the metrics listener {at}"))?;
        println!(
            "  metrics:           http://{}/metrics",
            metrics.local_addr()?
        );
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = hearth_api::serve_metrics(metrics, state).await {
                tracing::warn!("metrics listener: {e}");
            }
        });
    }
    let events = state.events().clone();
    hearth_api::serve(listener, state, shutdown_signal()).await?;
    // Queued events stay in the queue for the next start.
    events.stop();
    Ok(())
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir(&args.common)?;
    // The chunk store: every artifact's origin, with the worker's verified chunk cache.
    let secrets = hearth_store::Secrets::load_or_create(&data_dir.join("store.key"))
        .context("loading the chunk store's key")?;
    let chunks = open_chunks(
        &data_dir,
        hearth_store::local_origin(&data_dir.join("store")).context("opening the chunk store")?,
        secrets,
        args.worker.chunk_cache_mb,
        &args.store,
    )?;
    let worker = start_worker(&args.common, &args.worker, &data_dir, &chunks).await?;
    let (invoker, node): (Arc<dyn hearth_core::invoker::Invoker>, _) = if args.assignment_service {
        let node = embedded_assignment(&args, &data_dir, &worker).await?;
        let invoker = hearth_assign::remote::RemoteInvoker::embedded(
            node.clone(),
            Arc::new(worker.clone()),
            hearth_assign::remote::RemoteConfig {
                holder: "hearth up".into(),
                keep_alive: Duration::from_secs(args.common.keep_alive),
                snapshots_keep_network: hearth_core::invoker::Invoker::snapshots_keep_network(
                    &worker,
                ),
                lease_hold: Duration::from_millis(args.lease_hold_ms),
                burst: Some(hearth_assign::partition::BurstLimit {
                    per_window: args.worker.scaling_rate,
                    window_ms: 10_000,
                }),
                // The only front end: a throttle returns its own held leases first.
                hold_reserved: true,
                ..Default::default()
            },
        );
        let invoker = Arc::new(invoker);
        (
            invoker.clone() as Arc<dyn hearth_core::invoker::Invoker>,
            Some((node, invoker)),
        )
    } else {
        (Arc::new(worker.clone()), None)
    };
    serve_api(&args.common, &args.api, &data_dir, invoker, &chunks, None).await?;
    if let Some((node, invoker)) = node {
        invoker.release_held().await;
        node.shutdown().await;
    }
    worker.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// A one-member assignment service in this process (one partition, its journal in
/// `<data-dir>/assignment`), with this process's worker registered and heartbeating directly.
async fn embedded_assignment(
    args: &UpArgs,
    data_dir: &Path,
    worker: &Worker,
) -> anyhow::Result<Arc<hearth_assign::node::Node>> {
    use hearth_assign::node::{Node, NodeConfig, Timing};
    // Peers would need this secret; the node listens on loopback and has none.
    let secret = hearth_assign::net::Secret::new(random_string(32, b"0123456789abcdef").as_bytes());
    let node = Node::start(NodeConfig {
        id: 1,
        listen: "127.0.0.1:0".into(),
        advertise: None,
        data_dir: data_dir.join("assignment"),
        partitions: 1,
        secret,
        timing: Timing {
            // Only this process's own worker: it is dead only if this process stalls.
            worker_dead_ms: 60_000,
            ..Timing::default()
        },
    })
    .await
    .context("starting the embedded assignment service")?;
    let members = std::collections::BTreeMap::from([(1, node.addr().to_string())]);
    node.initialize(&members)
        .await
        .context("forming the embedded assignment service")?;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !node.leads(0) {
        if std::time::Instant::now() > until {
            anyhow::bail!("the embedded assignment service elected no leader within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every worker the journal names is an earlier run of this process: its sandboxes and
    // leases (a crash leaves some) are gone.
    let removed = node.forget_all_workers().await;
    if removed > 0 {
        tracing::info!(
            removed,
            "earlier runs' sandboxes removed from the assignment service"
        );
    }
    let images = hearth_worker::ImageStore::new(
        args.worker
            .image_cache
            .clone()
            .unwrap_or_else(|| data_dir.join("images")),
    );
    let beat_node = node.clone();
    tokio::spawn(super::cluster::heartbeats(
        worker.clone(),
        "local".into(),
        "in-process".into(),
        data_dir.to_path_buf(),
        images,
        Duration::from_millis(500),
        move |report| {
            let node = beat_node.clone();
            async move {
                if node.heartbeat(report) {
                    (1, false)
                } else {
                    (0, true)
                }
            }
        },
    ));
    // Until the worker is registered, placement has nowhere to go.
    while node.workers().is_empty() {
        if std::time::Instant::now() > until {
            anyhow::bail!("the worker did not register with the embedded assignment service");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(node)
}
