//! `hearth assignment`: run one node of the replicated assignment service; `hearth status`:
//! what the cluster's nodes say about their partitions.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hearth_assign::client::Client;
use hearth_assign::net::Secret;
use hearth_assign::node::{Node, NodeConfig, NodeStatus, Timing};

/// How a process learns the cluster secret.
#[derive(Args, Clone, Debug)]
pub struct SecretArgs {
    /// A file holding the cluster secret (every node, worker and front end of one cluster
    /// shares it; at least 16 bytes). Else `$HEARTH_CLUSTER_SECRET`.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret's bytes (trimmed; at least 16).
    pub fn material(&self) -> anyhow::Result<Vec<u8>> {
        let material = match &self.secret_file {
            Some(f) => std::fs::read(f)
                .with_context(|| format!("reading the cluster secret {}", f.display()))?,
            None => match std::env::var("HEARTH_CLUSTER_SECRET") {
                Ok(s) => s.into_bytes(),
                Err(_) => bail!(
                    "no cluster secret: pass --secret-file FILE or set HEARTH_CLUSTER_SECRET \
                     (the same on every node; e.g. `head -c 32 /dev/urandom | base64 > cluster.secret`)"
                ),
            },
        };
        let material = material.trim_ascii();
        if material.len() < 16 {
            bail!(
                "the cluster secret is {} bytes; use at least 16",
                material.len()
            );
        }
        Ok(material.to_vec())
    }

    pub fn load(&self) -> anyhow::Result<Secret> {
        Ok(Secret::new(&self.material()?))
    }
}

/// Parses `1=10.0.0.1:7100,2=10.0.0.2:7100,...`.
pub fn parse_members(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("member {part:?}: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("member {part:?}: the id must be a number"))?;
        if id == 0 {
            bail!("member {part:?}: node ids start at 1");
        }
        if out.insert(id, addr.to_string()).is_some() {
            bail!("member id {id} given twice");
        }
    }
    if out.is_empty() {
        bail!("no members given");
    }
    Ok(out)
}

#[derive(Args, Debug)]
pub struct AssignmentArgs {
    /// This node's id (1, 2, 3, ...; unique in the cluster).
    #[arg(long)]
    pub id: u64,
    /// Where to listen for peers and clients.
    #[arg(long, default_value = "0.0.0.0:7100")]
    pub listen: String,
    /// The address the others reach this node at (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where this node keeps its partitions' journals.
    #[arg(long, default_value = ".hearth-assignment")]
    pub data_dir: PathBuf,
    /// Number of partitions (the same on every node).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Form a new cluster of these voters (`1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`); give it to
    /// one node of a new cluster. Partitions already formed are left as they are.
    #[arg(long)]
    pub initialize: Option<String>,
    /// Raft heartbeat interval (ms); elections time out after 3–6 heartbeats.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// A worker not heard from for this long (ms) is dead: its sandboxes are removed and
    /// invocations on it fail.
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub worker_dead_ms: u64,
    /// Capacity manager: start `hearth worker` processes on this machine to keep at least this
    /// many workers (while this node leads partition 0). 0: this node starts none.
    #[arg(long, default_value_t = 0)]
    pub workers_min: u32,
    /// Capacity manager: the most workers it lets the fleet grow to under load.
    #[arg(long, default_value_t = 4)]
    pub workers_max: u32,
    /// Capacity manager: the arguments of each `hearth worker` it starts, besides `--name`,
    /// `--listen` and `--data-dir` (e.g. `--assignment ... --store ...`; split at spaces).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub worker_args: String,
    #[command(flatten)]
    pub secret: SecretArgs,
}

pub fn run_assignment(args: AssignmentArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.id == 0 {
        bail!("--id: node ids start at 1");
    }
    if !(1..=256).contains(&args.partitions) {
        bail!("--partitions must be between 1 and 256");
    }
    if args.heartbeat_ms < 10 {
        bail!("--heartbeat-ms must be at least 10");
    }
    let members = args.initialize.as_deref().map(parse_members).transpose()?;
    if let Some(m) = &members
        && !m.contains_key(&args.id)
    {
        bail!("--initialize does not name this node (id {})", args.id);
    }
    if args.workers_min > args.workers_max {
        bail!("--workers-min is above --workers-max");
    }
    if args.workers_min > 0 && args.worker_args.trim().is_empty() {
        bail!("--workers-min needs --worker-args (at least --assignment and --store)");
    }
    let secret = args.secret.load()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let hb = args.heartbeat_ms;
        let node = Node::start(NodeConfig {
            id: args.id,
            listen: args.listen.clone(),
            advertise: args.advertise.clone(),
            data_dir: args.data_dir.clone(),
            partitions: args.partitions,
            secret,
            timing: Timing {
                heartbeat_ms: hb,
                election_min_ms: hb * 3,
                election_max_ms: hb * 6,
                tick_ms: (hb * 5).max(100),
                worker_dead_ms: args.worker_dead_ms,
            },
        })
        .await?;
        if let Some(m) = &members {
            node.initialize(m).await?;
        }
        if args.workers_min > 0 {
            let mut worker_args = vec!["worker".to_string()];
            worker_args.extend(args.worker_args.split_whitespace().map(String::from));
            let provisioner = hearth_assign::capacity::LocalProvisioner::new(
                std::env::current_exe().context("finding this executable")?,
                worker_args,
                args.data_dir.join("workers"),
                &format!("n{}", args.id),
            );
            node.manage_capacity(
                hearth_assign::fleet::ScalePolicy {
                    min_workers: args.workers_min,
                    max_workers: args.workers_max,
                    ..Default::default()
                },
                Box::new(provisioner),
            );
        }
        println!(
            "hearth assignment node {} listening on {} ({} partitions, journals in {})",
            node.id(),
            node.addr(),
            node.partitions(),
            args.data_dir.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("stopping");
        node.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The assignment nodes, comma separated (HOST:PORT,...).
    #[arg(long, env = "HEARTH_ASSIGNMENT")]
    pub assignment: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Print JSON (one object per node, `error` for unreachable ones).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
}

pub fn split_addrs(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let addrs = split_addrs(&args.assignment);
    if addrs.is_empty() {
        bail!("--assignment: no addresses");
    }
    let client = Client::new(
        &addrs,
        args.partitions,
        args.secret.load()?,
        Duration::from_secs(3),
    );
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let results = rt.block_on(client.status());
    if args.json {
        let out: Vec<serde_json::Value> = addrs
            .iter()
            .zip(&results)
            .map(|(a, r)| match r {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({"addr": a, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_status(&addrs, &results);
    }
    let up = results.iter().filter(|r| r.is_ok()).count();
    Ok(if up * 2 > addrs.len() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

fn print_status(
    addrs: &[String],
    results: &[Result<NodeStatus, hearth_assign::client::ClientError>],
) {
    println!("NODE  ADDRESS               STATE");
    let mut by_partition: BTreeMap<u32, Vec<(u64, &hearth_assign::node::PartitionStatus)>> =
        BTreeMap::new();
    for (a, r) in addrs.iter().zip(results) {
        match r {
            Ok(s) => {
                let leads = s
                    .partitions
                    .iter()
                    .filter(|p| p.leader == Some(s.id))
                    .count();
                println!(
                    "{:<5} {:<21} up, leads {leads} of {} partitions",
                    s.id,
                    s.addr,
                    s.partitions.len()
                );
                for p in &s.partitions {
                    by_partition.entry(p.partition).or_default().push((s.id, p));
                }
            }
            Err(e) => println!("{:<5} {a:<21} unreachable: {e}", "?"),
        }
    }
    println!();
    println!("PARTITION  LEADER  TERM  APPLIED  INIT  IDLE  BUSY  DEAD  LEASES  EVENTS");
    for (p, views) in by_partition {
        // The leader's own view is the freshest.
        let best = views
            .iter()
            .find(|(id, v)| v.leader == Some(*id))
            .or_else(|| views.first());
        if let Some((_, v)) = best {
            let leader = v.leader.map_or("none".to_string(), |l| l.to_string());
            println!(
                "{p:<10} {leader:<7} {:<5} {:<8} {:<5} {:<5} {:<5} {:<5} {:<7} {} ({} KiB)",
                v.term,
                v.last_applied.unwrap_or(0),
                v.stats.initializing,
                v.stats.idle,
                v.stats.busy,
                v.stats.dead,
                v.stats.leases,
                v.stats.events,
                v.stats.event_bytes.div_ceil(1024)
            );
        }
    }
    // Every node hears every worker; the first node that answered speaks for the fleet.
    if let Some(s) = results.iter().flatten().next() {
        println!();
        println!(
            "WORKER                          ADDRESS               MEMORY USED       BUSY  SANDBOXES"
        );
        if s.workers.is_empty() {
            println!("(no worker has registered)");
        }
        for w in &s.workers {
            let used = w.memory_mb.saturating_sub(w.memory_free_mb);
            println!(
                "{:<31} {:<21} {:>6} / {:<6} MiB {:<5} {}",
                w.id, w.addr, used, w.memory_mb, w.busy, w.sandboxes
            );
        }
    }
}
