//! `hearth bench assign`: the replicated assignment service on this machine. Three nodes run
//! in this process, each with its own listener, journals and Raft groups, talking over
//! loopback TCP with the authenticated wire; callers use the same client a front end uses.
//! Measured: lease cycles (acquire + release) per second and their latency for one and for
//! several partitions, beside the same commands applied to an in-process partition (the
//! embedded path's state machine, no journal or network) in the same run; then failover: the
//! leader of partition 0 is shut down under load and the time to the next lease is timed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hearth_assign::client::Client;
use hearth_assign::net::Secret;
use hearth_assign::node::{Node, NodeConfig, Timing};
use hearth_assign::partition::{Command, FnKey, Limits, Partition, Response};

#[derive(Args)]
pub struct AssignBenchArgs {
    /// Partition counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    partitions: Vec<u32>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of load per partition count.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Functions the callers spread over (they hash to partitions).
    #[arg(long, default_value_t = 32)]
    functions: usize,
    /// Failover rounds (leader of partition 0 shut down under load, then restarted).
    #[arg(long, default_value_t = 3)]
    failovers: usize,
}

const SECRET: &[u8] = b"hearth bench assign: loopback only";

fn timing() -> Timing {
    Timing {
        heartbeat_ms: 50,
        election_min_ms: 200,
        election_max_ms: 400,
        tick_ms: 200,
        worker_dead_ms: 3_000,
    }
}

fn acquire(function: &str, now_ms: u64) -> Command {
    Command::Acquire {
        key: FnKey {
            function: function.to_string(),
            revision: "1".into(),
        },
        memory_mb: 128,
        holder: "bench".into(),
        limits: Limits {
            reserved: None,
            unreserved: 100_000,
            burst: None,
        },
        now_ms,
        lease_ttl_ms: 30_000,
        request: None,
    }
}

fn release(lease: hearth_assign::partition::LeaseId, now_ms: u64) -> Command {
    Command::Release {
        lease,
        healthy: true,
        keep_alive_ms: 600_000,
        now_ms,
    }
}

struct Cluster {
    dir: PathBuf,
    partitions: u32,
    nodes: Vec<Option<Arc<Node>>>,
    addrs: Vec<String>,
}

async fn start_node(
    dir: &Path,
    id: u64,
    listen: &str,
    partitions: u32,
) -> anyhow::Result<Arc<Node>> {
    Ok(Node::start(NodeConfig {
        id,
        listen: listen.to_string(),
        advertise: None,
        data_dir: dir.join(format!("node-{id}")),
        partitions,
        secret: Secret::new(SECRET),
        timing: timing(),
    })
    .await?)
}

impl Cluster {
    async fn new(partitions: u32) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "hearth-bench-assign-{}-{partitions}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for id in 1..=3 {
            let n = start_node(&dir, id, "127.0.0.1:0", partitions).await?;
            addrs.push(n.addr().to_string());
            nodes.push(Some(n));
        }
        let members: BTreeMap<u64, String> = (1..=3u64).zip(addrs.iter().cloned()).collect();
        if let Some(first) = &nodes[0] {
            first.initialize(&members).await?;
        }
        let c = Cluster {
            dir,
            partitions,
            nodes,
            addrs,
        };
        for p in 0..partitions {
            c.leader(p, None, Duration::from_secs(15)).await?;
        }
        Ok(c)
    }

    fn client(&self) -> Client {
        Client::new(
            &self.addrs,
            self.partitions,
            Secret::new(SECRET),
            Duration::from_secs(10),
        )
    }

    async fn leader(&self, p: u32, not: Option<u64>, within: Duration) -> anyhow::Result<u64> {
        let until = Instant::now() + within;
        loop {
            // A deposed leader may still say Leader for a moment: the claim of the highest
            // term is the real one.
            let mut best: Option<(u64, u64)> = None;
            for n in self.nodes.iter().flatten() {
                let status = n.status().await;
                for s in &status.partitions {
                    if s.partition == p
                        && s.state == "Leader"
                        && best.is_none_or(|(term, _)| s.term > term)
                    {
                        best = Some((s.term, n.id()));
                    }
                }
            }
            if let Some((_, id)) = best
                && Some(id) != not
            {
                return Ok(id);
            }
            anyhow::ensure!(Instant::now() < until, "no leader for partition {p}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                n.shutdown().await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Default)]
struct Lat(Vec<f64>);

impl Lat {
    fn pct(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_by(|a, b| a.total_cmp(b));
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i]
    }
}

/// One caller's loop: acquire and release leases on its functions until `stop`; returns the
/// latency of each full cycle (ms) and the number of failed cycles.
async fn caller(
    client: Arc<Client>,
    functions: Vec<String>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> (Vec<f64>, u64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let f = &functions[i % functions.len()];
        i += 1;
        let p = client.partition_of(f);
        let t = Instant::now();
        let lease = match client.call(p, acquire(f, 0)).await {
            Ok(Response::Leased { lease, .. }) => lease,
            Ok(Response::Place { lease, .. }) => {
                place(&client, p, lease).await;
                lease
            }
            _ => {
                failed += 1;
                continue;
            }
        };
        match client.call(p, release(lease, 0)).await {
            Ok(Response::Ok) => {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                done.fetch_add(1, Ordering::Relaxed);
            }
            _ => failed += 1,
        }
    }
    (lat, failed)
}

/// A cold sandbox: place it on a worker and start it, as a front end would.
async fn place(client: &Client, p: u32, lease: hearth_assign::partition::LeaseId) {
    let assign = Command::Assign {
        lease,
        worker: "w1".into(),
        now_ms: 0,
    };
    let _ = client.call(p, assign).await;
    let _ = client.call(p, Command::Started { lease, now_ms: 0 }).await;
}

fn function_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bench-fn-{i}")).collect()
}

/// The embedded baseline: the same cycles applied to one in-process partition.
fn embedded_rate(functions: &[String], cycles: usize) -> (f64, f64) {
    let mut part = Partition::new();
    let t = Instant::now();
    let mut lat = Lat::default();
    for i in 0..cycles {
        let s = Instant::now();
        let f = &functions[i % functions.len()];
        let lease = match part.apply(acquire(f, i as u64)) {
            Response::Leased { lease, .. } => lease,
            Response::Place { lease, .. } => {
                part.apply(Command::Assign {
                    lease,
                    worker: "w1".into(),
                    now_ms: i as u64,
                });
                part.apply(Command::Started {
                    lease,
                    now_ms: i as u64,
                });
                lease
            }
            _ => continue,
        };
        part.apply(release(lease, i as u64));
        lat.0.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    (cycles as f64 / t.elapsed().as_secs_f64(), lat.pct(0.5))
}

pub async fn run(args: AssignBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.functions > 0,
        "--clients and --functions must be > 0"
    );
    let functions = function_names(args.functions);
    let mut rows: Vec<(String, String)> = Vec::new();
    let (rate, p50) = embedded_rate(&functions, 200_000);
    println!(
        "embedded partition (no journal, no network): {rate:.0} cycles/s, p50 {:.4} ms",
        p50
    );
    rows.push((
        "lease cycle (acquire + release), one in-process partition, no journal or network (baseline)".into(),
        format!("{rate:.0}/s, p50 {:.4} ms", p50),
    ));
    for &partitions in &args.partitions {
        anyhow::ensure!(partitions > 0, "--partitions must be > 0");
        let mut cluster = Cluster::new(partitions).await?;
        let client = Arc::new(cluster.client());
        // Warm up: every function has an idle sandbox, connections are open.
        for f in &functions {
            let p = client.partition_of(f);
            if let Ok(Response::Place { lease, .. }) = client.call(p, acquire(f, 0)).await {
                place(&client, p, lease).await;
                let _ = client.call(p, release(lease, 0)).await;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..args.clients {
            // Each caller has its own functions, so its leases are always warm.
            let mine: Vec<String> = functions
                .iter()
                .skip(c % functions.len())
                .step_by(args.clients.min(functions.len()))
                .cloned()
                .collect();
            tasks.push(tokio::spawn(caller(
                client.clone(),
                mine,
                stop.clone(),
                done.clone(),
            )));
        }
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Lat::default();
        let mut failed = 0;
        for task in tasks {
            let (l, f) = task.await?;
            lat.0.extend(l);
            failed += f;
        }
        let secs = t.elapsed().as_secs_f64();
        let n = lat.0.len();
        let line = format!(
            "{:.0}/s, p50 {:.2} / p90 {:.2} / p99 {:.2} ms ({n} cycles, {failed} failed)",
            n as f64 / secs,
            lat.pct(0.5),
            lat.pct(0.9),
            lat.pct(0.99)
        );
        println!(
            "{partitions} partition(s), 3 replicas, {} callers: {line}",
            args.clients
        );
        rows.push((
            format!(
                "lease cycle through the replicated service, {partitions} partition(s) × 3 replicas, {} callers",
                args.clients
            ),
            line,
        ));
        if partitions == *args.partitions.last().unwrap_or(&1) && args.failovers > 0 {
            let f = failover(&mut cluster, client.clone(), &functions, &args).await?;
            rows.push(("failover: leader of partition 0 shut down under load → first lease on partition 0 granted (per round)".into(), f));
        }
        cluster.shutdown().await;
    }
    println!();
    println!("| measurement | result |");
    println!("|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}

/// Rounds of: load on every partition, shut down the leader of partition 0, time the first
/// lease granted on partition 0 afterwards, count cycles that failed, restart the node.
async fn failover(
    cluster: &mut Cluster,
    client: Arc<Client>,
    functions: &[String],
    args: &AssignBenchArgs,
) -> anyhow::Result<String> {
    let on_p0: Vec<String> = functions
        .iter()
        .filter(|f| client.partition_of(f) == 0)
        .cloned()
        .collect();
    anyhow::ensure!(!on_p0.is_empty(), "no function hashes to partition 0");
    let mut results = Vec::new();
    for round in 0..args.failovers {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..args.clients.min(8) {
            let mine = vec![on_p0[c % on_p0.len()].clone()];
            tasks.push(tokio::spawn(caller(
                client.clone(),
                mine,
                stop.clone(),
                done.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = cluster.leader(0, None, Duration::from_secs(10)).await?;
        let t = Instant::now();
        if let Some(n) = cluster.nodes[(leader - 1) as usize].take() {
            n.shutdown().await;
        }
        // Cycles the old leader committed before it stopped do not count: the first cycle
        // completed after the shutdown is a lease granted by the new leader.
        let before = done.load(Ordering::Relaxed);
        let until = t + Duration::from_secs(20);
        while done.load(Ordering::Relaxed) == before && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let new_leader = cluster
            .leader(0, Some(leader), Duration::from_secs(10))
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let mut failed = 0;
        for task in tasks {
            failed += task.await?.1;
        }
        println!(
            "failover round {round}: node {leader} shut down, node {new_leader} leads; first lease after {ms:.0} ms; {failed} cycles failed"
        );
        results.push(format!("{ms:.0} ms ({failed} failed cycles)"));
        // Bring the node back on its journal (its port may take a moment to free).
        let addr = cluster.addrs[(leader - 1) as usize].clone();
        let mut tries = 0;
        let node = loop {
            match start_node(&cluster.dir, leader, &addr, cluster.partitions).await {
                Ok(n) => break n,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        cluster.nodes[(leader - 1) as usize] = Some(node);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(results.join(", "))
}
