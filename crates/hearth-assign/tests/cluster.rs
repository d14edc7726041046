//! Three assignment nodes in one process, over real TCP on loopback: leader election, writes
//! through any node, failover with no acknowledged command lost and no sandbox leased twice,
//! catching up after a restart, lease expiry, and peers without the cluster secret refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hearth_assign::client::Client;
use hearth_assign::net::Secret;
use hearth_assign::node::{Node, NodeConfig, Timing};
use hearth_assign::partition::{Command, FnKey, LeaseId, Limits, Response, SandboxId};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::Mutex;

const PARTITIONS: u32 = 2;

fn timing() -> Timing {
    Timing {
        heartbeat_ms: 50,
        election_min_ms: 200,
        election_max_ms: 400,
        tick_ms: 100,
        worker_dead_ms: 3_000,
    }
}

async fn start(id: u64, listen: &str, dir: &Path) -> Arc<Node> {
    Node::start(NodeConfig {
        id,
        listen: listen.to_string(),
        advertise: None,
        data_dir: dir.join(format!("node-{id}")),
        partitions: PARTITIONS,
        secret: Secret::new(b"test cluster secret"),
        timing: timing(),
    })
    .await
    .expect("node starts")
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Option<Arc<Node>>>,
    addrs: Vec<String>,
}

impl Cluster {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for id in 1..=3 {
            let n = start(id, "127.0.0.1:0", dir.path()).await;
            addrs.push(n.addr().to_string());
            nodes.push(Some(n));
        }
        let members: BTreeMap<u64, String> = (1..=3u64).zip(addrs.iter().cloned()).collect();
        nodes[0]
            .as_ref()
            .expect("node 1")
            .initialize(&members)
            .await
            .expect("initialize");
        let c = Self {
            _dir: dir,
            nodes,
            addrs,
        };
        for p in 0..PARTITIONS {
            c.wait_leader(p, None, Duration::from_secs(10)).await;
        }
        c
    }

    fn client(&self) -> Client {
        Client::new(
            &self.addrs,
            PARTITIONS,
            Secret::new(b"test cluster secret"),
            Duration::from_secs(10),
        )
    }

    /// Waits until a running node other than `not` leads partition `p`; returns its id.
    async fn wait_leader(&self, p: u32, not: Option<u64>, within: Duration) -> u64 {
        let until = Instant::now() + within;
        loop {
            for n in self.nodes.iter().flatten() {
                let m = n
                    .raft(p)
                    .expect("partition")
                    .metrics()
                    .borrow_watched()
                    .clone();
                if m.state == openraft::ServerState::Leader && Some(n.id()) != not {
                    return n.id();
                }
            }
            assert!(
                Instant::now() < until,
                "no leader for partition {p} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self, id: u64) {
        if let Some(n) = self.nodes[(id - 1) as usize].take() {
            n.shutdown().await;
        }
    }

    async fn restart(&mut self, id: u64) {
        let addr = self.addrs[(id - 1) as usize].clone();
        let mut tries = 0;
        let node = loop {
            match Node::start(NodeConfig {
                id,
                listen: addr.clone(),
                advertise: None,
                data_dir: self._dir.path().join(format!("node-{id}")),
                partitions: PARTITIONS,
                secret: Secret::new(b"test cluster secret"),
                timing: timing(),
            })
            .await
            {
                Ok(n) => break n,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("restart {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart {id}: {e}"),
            }
        };
        self.nodes[(id - 1) as usize] = Some(node);
    }

    async fn shutdown(&mut self) {
        for id in 1..=3 {
            self.stop(id).await;
        }
    }
}

fn limits() -> Limits {
    Limits {
        reserved: None,
        unreserved: 1_000,
        burst: None,
    }
}

fn acquire(function: &str, ttl_ms: u64) -> Command {
    Command::Acquire {
        key: FnKey {
            function: function.into(),
            revision: "r1".into(),
        },
        memory_mb: 128,
        holder: "test".into(),
        limits: limits(),
        now_ms: 0,
        lease_ttl_ms: ttl_ms,
        request: None,
    }
}

/// One invocation's assignment commands: take a lease (warm or cold), run, release.
/// Records which sandbox each live lease holds and fails on any sandbox held twice.
async fn invoke_once(
    client: &Client,
    function: &str,
    held: &Mutex<HashMap<(u32, SandboxId), LeaseId>>,
    granted: &Mutex<HashSet<(u32, LeaseId)>>,
) -> Result<(), String> {
    let p = client.partition_of(function);
    let resp = client
        .call(p, acquire(function, 30_000))
        .await
        .map_err(|e| e.to_string())?;
    let (lease, sandbox, cold) = match resp {
        Response::Leased { lease, sandbox, .. } => (lease, sandbox, false),
        Response::Place { lease, sandbox, .. } => (lease, sandbox, true),
        other => return Err(format!("acquire: {other:?}")),
    };
    // Lease ids are never reused: a new leader that lost a committed acquisition would hand
    // its id out again.
    assert!(
        granted.lock().await.insert((p, lease)),
        "lease {lease:?} of partition {p} granted twice"
    );
    {
        let mut h = held.lock().await;
        if let Some(other) = h.insert((p, sandbox), lease) {
            panic!("sandbox {sandbox:?} leased to {lease:?} while {other:?} holds it");
        }
    }
    if cold {
        let r = client
            .call(
                p,
                Command::Assign {
                    lease,
                    worker: "w1".into(),
                    now_ms: 0,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if r != Response::Ok {
            return Err(format!("assign: {r:?}"));
        }
        let r = client
            .call(p, Command::Started { lease, now_ms: 0 })
            .await
            .map_err(|e| e.to_string())?;
        if r != Response::Ok {
            return Err(format!("started: {r:?}"));
        }
    }
    // Forget the lease before releasing it: once the release is sent, another caller may be
    // handed the sandbox.
    held.lock().await.remove(&(p, sandbox));
    let r = client
        .call(
            p,
            Command::Release {
                lease,
                healthy: true,
                keep_alive_ms: 60_000,
                now_ms: 0,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    if r != Response::Ok {
        return Err(format!("release: {r:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_loses_nothing_and_never_leases_twice() {
    let mut cluster = Cluster::new().await;
    let client = Arc::new(cluster.client());
    let held = Arc::new(Mutex::new(HashMap::new()));
    let granted = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_ok = Arc::new(std::sync::Mutex::new(Instant::now()));

    let functions: Vec<String> = (0..6).map(|i| format!("fn-{i}")).collect();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, held, granted, stop, ok, failed, last_ok) = (
            client.clone(),
            held.clone(),
            granted.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            last_ok.clone(),
        );
        let function = functions[w % functions.len()].clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match invoke_once(&client, &function, &held, &granted).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut t) = last_ok.lock() {
                            *t = Instant::now();
                        }
                    }
                    Err(e) => {
                        eprintln!("invocation failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        // A lost reply may leave a lease behind; it is the service's to expire.
                        held.lock().await.clear();
                    }
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 50, "only {before} invocations before the failover");

    // Kill partition 0's leader.
    let leader = cluster.wait_leader(0, None, Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    cluster.stop(leader).await;
    let new_leader = cluster
        .wait_leader(0, Some(leader), Duration::from_secs(10))
        .await;
    let elected = killed_at.elapsed();
    // Invocations resume.
    let resumed_from = ok.load(Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < resumed_from + 50 {
        assert!(
            Instant::now() < until,
            "invocations did not resume after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "leader {leader} killed; {new_leader} elected after {elected:?}; {} failed calls",
        failed.load(Ordering::Relaxed)
    );

    // The killed node comes back and catches up.
    cluster.restart(leader).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }

    // Every replica converges on the same partitions, and each is consistent.
    let until = Instant::now() + Duration::from_secs(10);
    for p in 0..PARTITIONS {
        loop {
            let mut states = Vec::new();
            for n in cluster.nodes.iter().flatten() {
                let s = n
                    .read(p, |part| {
                        part.check_invariants().expect("invariants hold");
                        serde_json::to_string(part).expect("serialize")
                    })
                    .await
                    .expect("partition");
                states.push(s);
            }
            if states.len() == 3 && states.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            assert!(
                Instant::now() < until,
                "replicas of partition {p} did not converge"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Nothing acknowledged was lost: every lease granted is in the journal (ids below the
    // partition's next id) and none was granted twice (checked as they were granted).
    let granted = granted.lock().await;
    assert!(granted.len() as u64 >= ok.load(Ordering::Relaxed));
    let n = cluster.nodes.iter().flatten().next().expect("a node");
    for p in 0..PARTITIONS {
        let next = n
            .read(p, |part| part.next_lease_id())
            .await
            .expect("partition");
        let top = granted
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, l)| *l)
            .max();
        assert!(
            top.is_none_or(|t| t < next),
            "partition {p} forgot lease {top:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_died_expires() {
    let mut cluster = Cluster::new().await;
    let client = cluster.client();
    let p = client.partition_of("lonely");
    let Response::Place { lease, .. } = client
        .call(p, acquire("lonely", 300))
        .await
        .expect("acquire")
    else {
        panic!("expected a cold placement");
    };
    // The holder never renews nor releases; the leader's ticker ends the lease.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = client
        .call(
            p,
            Command::Renew {
                lease,
                now_ms: 0,
                lease_ttl_ms: 300,
            },
        )
        .await
        .expect("renew answered");
    assert!(
        matches!(r, Response::Rejected { .. }),
        "renewed a dead lease: {r:?}"
    );
    let running = cluster.nodes[0]
        .as_ref()
        .expect("node")
        .read(p, |part| part.running("lonely"))
        .await
        .expect("partition");
    // Followers apply shortly after the leader.
    let until = Instant::now() + Duration::from_secs(5);
    let mut running = running;
    while running != 0 {
        assert!(Instant::now() < until, "the dead lease still counts");
        tokio::time::sleep(Duration::from_millis(50)).await;
        running = cluster.nodes[0]
            .as_ref()
            .expect("node")
            .read(p, |part| part.running("lonely"))
            .await
            .expect("partition");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_secret_is_refused() {
    let mut cluster = Cluster::new().await;
    let bad = Client::new(
        &cluster.addrs,
        PARTITIONS,
        Secret::new(b"wrong"),
        Duration::from_secs(1),
    );
    let err = bad.call(0, acquire("x", 1_000)).await.expect_err("refused");
    assert!(err.to_string().contains("secret"), "{err}");
    // And nothing was written.
    let n = cluster.nodes[0].as_ref().expect("node");
    assert_eq!(n.read(0, |part| part.leases().count()).await, Some(0));
    cluster.shutdown().await;
}

fn report(id: &str, free_mb: u64, cached: &[&str]) -> hearth_assign::fleet::WorkerReport {
    hearth_assign::fleet::WorkerReport {
        id: id.into(),
        addr: format!("{id}.invalid:7200"),
        memory_mb: 4096,
        memory_free_mb: free_mb,
        memory_idle_mb: 0,
        cores: 2,
        busy: 0,
        sandboxes: 0,
        cached: cached.iter().map(|s| s.to_string()).collect(),
        idle: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_uses_the_fleet_and_a_silent_worker_loses_its_sandboxes() {
    use hearth_assign::client::Placed;
    let mut cluster = Cluster::new().await;
    let client = cluster.client();
    let p = client.partition_of("placed");
    let beat = |free: u64| {
        let client = &client;
        async move {
            let a = report("w-a/1", free, &[]);
            let b = report("w-b/1", free, &["code:c1"]);
            let (ta, _) = client.heartbeat(&a, Duration::from_secs(2)).await;
            let (tb, _) = client.heartbeat(&b, Duration::from_secs(2)).await;
            assert_eq!((ta, tb), (3, 3), "every node takes every heartbeat");
        }
    };
    beat(4096).await;
    assert_eq!(client.fleet().await.expect("fleet").len(), 2);

    // Cold: placement prefers the worker that holds the code, then spreads.
    let mut leases = Vec::new();
    for expect in ["w-b/1", "w-a/1"] {
        let Response::Place { lease, sandbox, .. } = client
            .call(p, acquire("placed", 60_000))
            .await
            .expect("acquire")
        else {
            panic!("expected a cold lease");
        };
        let placed = client
            .place(p, lease, 128, vec!["code:c1".into()], vec![])
            .await
            .expect("place");
        assert_eq!(
            placed,
            Placed::Worker {
                id: expect.into(),
                addr: format!("{expect}.invalid:7200")
            }
        );
        leases.push((lease, sandbox));
    }
    // A lease that is not live cannot be placed; a sandbox too big for every worker is refused.
    let placed = client
        .place(p, LeaseId(9_999), 128, vec![], vec![])
        .await
        .expect("place");
    assert!(matches!(placed, Placed::Rejected(_)), "{placed:?}");
    let Response::Place { lease: big, .. } = client
        .call(p, acquire("placed", 60_000))
        .await
        .expect("acquire")
    else {
        panic!("expected a cold lease");
    };
    let placed = client
        .place(p, big, 8192, vec![], vec![])
        .await
        .expect("place");
    assert!(matches!(placed, Placed::NoWorker(_)), "{placed:?}");

    // w-a stops heartbeating; w-b keeps on. Within the dead-after period (3 s) plus a tick,
    // the leader removes w-a's sandbox (and ends its lease); w-b's stays.
    let until = Instant::now() + Duration::from_secs(10);
    let leader = cluster.wait_leader(p, None, Duration::from_secs(5)).await;
    let node = cluster.nodes[(leader - 1) as usize]
        .clone()
        .expect("leader");
    loop {
        client
            .heartbeat(&report("w-b/1", 4000, &["code:c1"]), Duration::from_secs(2))
            .await;
        let workers: Vec<Option<String>> = node
            .read(p, |part| {
                part.sandboxes().map(|s| s.worker.clone()).collect()
            })
            .await
            .expect("partition");
        if !workers.contains(&Some("w-a/1".to_string())) {
            assert!(workers.contains(&Some("w-b/1".to_string())), "{workers:?}");
            let lease = node
                .read(p, |part| part.lease(leases[1].0).cloned())
                .await
                .expect("partition");
            assert!(lease.is_none(), "the dead worker's lease ended");
            break;
        }
        assert!(Instant::now() < until, "w-a was never marked dead");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fleet = client.fleet().await.expect("fleet");
    assert_eq!(fleet.len(), 1);
    assert_eq!(fleet[0].id, "w-b/1");
    // The dead run's late heartbeat is refused: it must come back under a new id.
    let (_, dead) = client
        .heartbeat(&report("w-a/1", 4096, &[]), Duration::from_secs(2))
        .await;
    assert!(dead);
    cluster.shutdown().await;
}

/// A front end's asynchronous queue in the assignment service: events committed while the
/// partition's leader is shut down are all kept (commits wait for the new leader), a queue
/// opened again (a restarted front end, anywhere) sees exactly what was acknowledged, a full
/// partition refuses new events and changes nothing, and the stopped node catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_queue_keeps_every_acknowledged_event_across_a_failover() {
    use hearth_assign::eventlog::ReplicatedLog;
    use hearth_assign::remote::Assignment;
    use hearth_core::eventlog::{EventLog, EventLogError, LogOp};

    let mut c = Cluster::new().await;
    let client: Arc<dyn Assignment> = Arc::new(c.client());
    let log = Arc::new(
        ReplicatedLog::open(client, "fe-test", 1 << 20, Duration::from_secs(15))
            .await
            .expect("open"),
    );
    assert!(log.events().expect("events").is_empty());
    let p = log.partition();
    let payload = |seq: u64| format!("event {seq}").into_bytes();

    let done = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (log, done, acked) = (log.clone(), done.clone(), acked.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut failed = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seq += 1;
                match log.commit(vec![LogOp::Put(seq, payload(seq))]).await {
                    Ok(()) => acked.lock().await.push(seq),
                    Err(e) => failed.push((seq, e)),
                }
            }
            failed
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let leader = c.wait_leader(p, None, Duration::from_secs(5)).await;
    let before = acked.lock().await.len();
    c.stop(leader).await;
    let new = c
        .wait_leader(p, Some(leader), Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    done.store(true, Ordering::Relaxed);
    let failed = writer.await.expect("writer");
    let acked = acked.lock().await.clone();
    assert!(
        before > 0 && acked.len() > before,
        "{before} then {}",
        acked.len()
    );
    assert!(
        failed.is_empty(),
        "commits failed across the failover: {failed:?}"
    );

    // Finishing an event: its deletion and its failed record commit together.
    log.commit(vec![
        LogOp::Delete(1),
        LogOp::PutFailed("id-1".into(), b"record".to_vec()),
    ])
    .await
    .expect("finish");
    assert_eq!(log.get(1).expect("get"), None);

    // Another opening of the queue, over a new client, sees every acknowledged event.
    let reopened = ReplicatedLog::open(
        Arc::new(c.client()),
        "fe-test",
        1 << 20,
        Duration::from_secs(15),
    )
    .await
    .expect("reopen");
    let seen: Vec<u64> = reopened
        .events()
        .expect("events")
        .into_iter()
        .map(|(seq, bytes)| {
            assert_eq!(bytes, payload(seq));
            seq
        })
        .collect();
    assert_eq!(seen, acked[1..].to_vec());
    assert_eq!(
        reopened.failed().expect("failed"),
        vec![("id-1".to_string(), b"record".to_vec())]
    );
    let other = ReplicatedLog::open(
        Arc::new(c.client()),
        "fe-other",
        1 << 20,
        Duration::from_secs(15),
    )
    .await
    .expect("other queue");
    assert!(other.events().expect("events").is_empty());

    // Past the bound a new event is refused and nothing changes.
    let small = ReplicatedLog::open(Arc::new(c.client()), "fe-test", 64, Duration::from_secs(15))
        .await
        .expect("small");
    let big = LogOp::Put(1_000_000, vec![0u8; 100]);
    match small.commit(vec![big]).await {
        Err(EventLogError::Full(why)) => assert!(why.contains("bound"), "{why}"),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(small.get(1_000_000).expect("get"), None);
    assert_eq!(small.events().expect("events").len(), seen.len());

    // The stopped node restarts on its journal and holds the same queue.
    c.restart(leader).await;
    let want = c.nodes[(new - 1) as usize]
        .as_ref()
        .expect("new leader")
        .read(p, |part| part.stats())
        .await
        .expect("stats");
    assert_eq!(want.events, seen.len() as u64);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = c.nodes[(leader - 1) as usize]
            .as_ref()
            .expect("restarted")
            .read(p, |part| part.stats())
            .await
            .expect("stats");
        if got.events == want.events && got.event_bytes == want.event_bytes {
            break;
        }
        assert!(
            Instant::now() < until,
            "restarted node at {got:?}, leader at {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// A worker destroys idle sandboxes on its own (keep-alive, demand, memory): its heartbeat
/// tells which it still holds, and the leader drops the rest from the partition, so warm
/// leases go only where a warm sandbox is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_a_worker_no_longer_holds_leave_the_partition() {
    let mut cluster = Cluster::new().await;
    let client = cluster.client();
    let p = client.partition_of("trimmed");
    let holding = |n: u32| {
        let mut r = report("w-a/1", 4096, &[]);
        r.idle = Some(BTreeMap::from([(
            "trimmed".to_string(),
            BTreeMap::from([("r1".to_string(), n)]),
        )]));
        r
    };
    client.heartbeat(&holding(0), Duration::from_secs(2)).await;
    // Three sandboxes of the function on w-a, run and released: Idle in the partition.
    let mut leases = Vec::new();
    for _ in 0..3 {
        let Response::Place { lease, .. } = client
            .call(p, acquire("trimmed", 60_000))
            .await
            .expect("acquire")
        else {
            panic!("expected a cold lease");
        };
        client
            .place(p, lease, 128, vec![], vec![])
            .await
            .expect("place");
        let started = Command::Started { lease, now_ms: 0 };
        assert_eq!(
            client.call(p, started).await.expect("started"),
            Response::Ok
        );
        leases.push(lease);
    }
    for lease in leases {
        let release = Command::Release {
            lease,
            healthy: true,
            keep_alive_ms: 600_000,
            now_ms: 0,
        };
        assert_eq!(
            client.call(p, release).await.expect("release"),
            Response::Ok
        );
    }
    let leader = cluster.wait_leader(p, None, Duration::from_secs(5)).await;
    let node = cluster.nodes[(leader - 1) as usize]
        .clone()
        .expect("leader");
    let idle = || async { node.read(p, |part| part.stats().idle).await.expect("stats") };
    assert_eq!(idle().await, 3);
    // The worker says it holds one (it expired two): once the heartbeat is later than the
    // sandboxes' idle times by the margin, the leader drops two and keeps one.
    let until = Instant::now() + Duration::from_secs(10);
    while idle().await != 1 {
        assert!(Instant::now() < until, "idle sandboxes: {}", idle().await);
        client.heartbeat(&holding(1), Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And it stays at one while the worker keeps holding one.
    for _ in 0..5 {
        client.heartbeat(&holding(1), Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(idle().await, 1);
    // The one left is leased warm.
    let r = client
        .call(p, acquire("trimmed", 60_000))
        .await
        .expect("acquire");
    assert!(matches!(r, Response::Leased { .. }), "{r:?}");
    cluster.shutdown().await;
}
