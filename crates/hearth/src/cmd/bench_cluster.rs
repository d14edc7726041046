//! `hearth bench cluster`: warm invocations through `hearth up` (everything in one process,
//! with and without its in-process assignment service) beside the same through a cluster of processes on loopback (three assignment nodes, one
//! worker, one front end), in one run, so the difference is what the distributed path adds:
//! two journaled lease commands (acquire, release) replicated to a majority, and a hop from
//! the front end to the worker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::client::{Conn, LoadResult, run_load};

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Runtime image cache (built beforehand: `hearth image build`).
    #[arg(long, env = "HEARTH_IMAGE_CACHE")]
    pub image_cache: PathBuf,
    /// The static agent binary.
    #[arg(long, env = "HEARTH_AGENT")]
    pub agent: Option<PathBuf>,
    /// Warm invocations per measurement.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Measurements of each setup, alternating (embedded, cluster, embedded, ...).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The front end's lease hold (ms) of the second cluster measurement of each round (the
    /// first always journals every lease: hold 0).
    #[arg(long, default_value_t = 200)]
    pub lease_hold_ms: u64,
}

/// Child processes that are stopped (SIGTERM, then SIGKILL) when dropped.
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, args: &[String], dir: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .env("HEARTH_CLUSTER_SECRET", "hearth bench cluster secret, 32 b")
            .env("HEARTH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    fn stop(&mut self) {
        for (_, c) in &self.0 {
            // SIGTERM, so each process shuts down cleanly (std's kill sends SIGKILL).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        let until = Instant::now() + Duration::from_secs(30);
        for (name, c) in &mut self.0 {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{name} did not stop: killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_file(path: &Path, procs: &mut Procs, what: &str) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(90);
    while !path.exists() {
        for (name, c) in &mut procs.0 {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("{name} exited ({st}) before {what}");
            }
        }
        if Instant::now() > until {
            bail!("{what}: nothing within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn worker_flags(a: &ClusterBenchArgs) -> Vec<String> {
    let mut v = vec![
        "--no-build-images".into(),
        "--no-image-artifacts".into(),
        "--image-cache".into(),
        a.image_cache.display().to_string(),
    ];
    if let Some(agent) = &a.agent {
        v.push("--agent".into());
        v.push(agent.display().to_string());
    }
    v
}

fn embedded(a: &ClusterBenchArgs, dir: &Path, service: bool) -> anyhow::Result<LoadResult> {
    let data = dir.join(format!("up-{service}-{}", free_port()?));
    let _ = std::fs::remove_file(data.join("client.env"));
    let mut procs = Procs(Vec::new());
    let mut args: Vec<String> = vec![
        "up".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        format!("--assignment-service={service}"),
        "--lease-hold-ms".into(),
        a.lease_hold_ms.to_string(),
    ];
    args.extend(worker_flags(a));
    procs.spawn("up", &args, dir)?;
    wait_for_file(
        &data.join("client.env"),
        &mut procs,
        "hearth up's client.env",
    )?;
    let r = run_load(
        &Conn::for_data_dir(&data),
        "bench-warm",
        a.clients,
        a.requests,
        300,
    );
    procs.stop();
    r
}

fn cluster(a: &ClusterBenchArgs, dir: &Path, hold_ms: u64) -> anyhow::Result<LoadResult> {
    // Every cluster starts afresh: journals of an earlier one name other ports.
    let dir = &dir.join(format!("cluster-{hold_ms}-{}", free_port()?));
    std::fs::create_dir_all(dir)?;
    let mut procs = Procs(Vec::new());
    let ports = [free_port()?, free_port()?, free_port()?];
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let members: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let node_dir = dir.join(format!("node{id}"));
        let mut args: Vec<String> = vec![
            "assignment".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            node_dir.display().to_string(),
            "--partitions".into(),
            "1".into(),
        ];
        if id == 1 && !node_dir.exists() {
            args.push("--initialize".into());
            args.push(members.join(","));
        }
        procs.spawn(&format!("node{id}"), &args, dir)?;
    }
    let store = dir.join("store");
    let assignment = addrs.join(",");
    let mut wargs: Vec<String> = vec![
        "worker".into(),
        "--name".into(),
        "bench".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--data-dir".into(),
        dir.join("worker").display().to_string(),
        "--assignment".into(),
        assignment.clone(),
        "--store".into(),
        store.display().to_string(),
    ];
    wargs.extend(worker_flags(a));
    procs.spawn("worker", &wargs, dir)?;
    let fe = dir.join("frontend");
    let _ = std::fs::remove_file(fe.join("client.env"));
    let fargs: Vec<String> = vec![
        "frontend".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        fe.display().to_string(),
        "--assignment".into(),
        assignment,
        "--store".into(),
        store.display().to_string(),
        "--partitions".into(),
        "1".into(),
        "--lease-hold-ms".into(),
        hold_ms.to_string(),
    ];
    procs.spawn("frontend", &fargs, dir)?;
    wait_for_file(
        &fe.join("client.env"),
        &mut procs,
        "the front end's client.env",
    )?;
    // Until the worker has registered (the warm-up call in run_load needs one).
    let conn = Conn::for_data_dir(&fe);
    let until = Instant::now() + Duration::from_secs(60);
    let r = loop {
        match run_load(&conn, "bench-warm", a.clients, a.requests, 300) {
            Ok(r) => break Ok(r),
            Err(e) if Instant::now() < until => {
                tracing::debug!("cluster not ready yet: {e:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => break Err(e),
        }
    };
    procs.stop();
    r
}

fn row(name: &str, r: &LoadResult) -> String {
    format!(
        "| {name} | {:.2} / {:.2} / {:.2} ms | {:.0} invokes/s | {} ok, {} failed |",
        super::bench::pct(&r.lat, 0.5),
        super::bench::pct(&r.lat, 0.9),
        super::bench::pct(&r.lat, 0.99),
        r.throughput(),
        r.lat.len(),
        r.failed
    )
}

pub fn run(a: ClusterBenchArgs) -> anyhow::Result<ExitCode> {
    let dir = super::bench::work_dir()?;
    let mut rows = Vec::new();
    let mut failed = 0;
    let mut added = Vec::new();
    for round in 1..=a.rounds.max(1) {
        let e = embedded(&a, dir.path(), false)?;
        eprintln!("round {round}: {}", row("embedded, pool alone", &e));
        let es = embedded(&a, dir.path(), true)?;
        eprintln!(
            "round {round}: {}",
            row("embedded, assignment service", &es)
        );
        let c0 = cluster(&a, dir.path(), 0)?;
        eprintln!("round {round}: {}", row("cluster, hold 0", &c0));
        let ch = cluster(&a, dir.path(), a.lease_hold_ms)?;
        eprintln!("round {round}: {}", row("cluster, hold", &ch));
        failed += e.failed + es.failed + c0.failed + ch.failed;
        let p50 = |r: &LoadResult| super::bench::pct(&r.lat, 0.5);
        added.push(format!(
            "round {round}: {:.2} ms (every lease journaled), {:.2} ms (leases held {} ms); \
             `hearth up` with its in-process assignment service: {:.2} ms",
            p50(&c0) - p50(&e),
            p50(&ch) - p50(&e),
            a.lease_hold_ms,
            p50(&es) - p50(&e),
        ));
        rows.push(row(
            &format!("round {round}: `hearth up`, the pool decides alone"),
            &e,
        ));
        rows.push(row(
            &format!("round {round}: `hearth up`, in-process assignment service"),
            &es,
        ));
        rows.push(row(
            &format!("round {round}: cluster, every invocation acquires and releases"),
            &c0,
        ));
        rows.push(row(
            &format!(
                "round {round}: cluster, front end holds leases {} ms",
                a.lease_hold_ms
            ),
            &ch,
        ));
    }
    println!(
        "\n{} warm invocations per measurement, {} client(s), trivial python3.11 echo; the \
         cluster is three assignment nodes (one partition), one worker and one front end on \
         loopback\n",
        a.requests, a.clients
    );
    println!("| setup | p50 / p90 / p99 | throughput | requests |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!("\nadded by the distributed path at p50:");
    for line in added {
        println!("- {line}");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
