//! Sandbox networking with real network namespaces, veth pairs and nftables. Needs root, `ip`,
//! `nft`, `nsenter` and python3; the runsc test also needs runsc (skipped without it).
//!
//! "Other hosts" are network namespaces the tests create ("test hosts", with a server inside,
//! reached over a veth pair from the host namespace); no test sends traffic to an address outside
//! this machine: the one metadata address probed, 169.254.169.254, is probed only after a
//! link-local address routed to a test host was shown to be rejected. Everything a test creates
//! is removed by guards, also when an assertion fails. The tests run one at a time (they count
//! interfaces, namespaces and lock files of the whole machine).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_worker::netns::{
    LOCK_DIR, NetError, Network, RUNSC_NETWORK_FLAG, SandboxNet, sandbox_resolv_conf,
};

/// errno of a connect the rules reject (ICMP administratively prohibited).
const REJECTED: &str = "errno 113";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn instance(tag: &str) -> String {
    format!("t{}{tag}", std::process::id())
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Run a command; its stdout, or a panic with its stderr.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `Network` shut down when the guard goes.
struct NetGuard(Option<Network>);

impl NetGuard {
    fn new(instance: &str, state: &Path) -> NetGuard {
        NetGuard(Some(Network::new(instance, state).expect("network")))
    }
    /// Drop the network without shutting it down, as a crash would.
    fn crash(mut self) {
        drop(self.0.take());
    }
}

impl Deref for NetGuard {
    type Target = Network;
    fn deref(&self) -> &Network {
        self.0.as_ref().expect("network")
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        if let Some(net) = self.0.take() {
            net.shutdown();
        }
    }
}

/// A child process killed when the guard goes.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Another host: a network namespace with a veth pair to the host namespace and an HTTP server
/// on port 8080 that answers with the client's address. It also holds a link-local address
/// (169.254.x.y, one per test host so that tests in parallel processes do not collide), routed
/// to it from the host, so a sandbox reaching link-local addresses would reach it.
struct TestHost {
    netns: String,
    host_if: String,
    /// The host's address on the link.
    host_addr: Ipv4Addr,
    /// The test host's address.
    addr: Ipv4Addr,
    /// Its link-local address.
    link_local: Ipv4Addr,
    server: Option<ChildGuard>,
}

impl TestHost {
    fn new(n: u32) -> TestHost {
        let pid = std::process::id();
        let idx = (pid % 100_000 * 8 + n) % 16384;
        let base = u32::from(Ipv4Addr::new(10, 199, 0, 0)) + idx * 4;
        let th = TestHost {
            netns: format!("hearth-test-{pid}-{n}"),
            host_if: format!("ht{:05}{n}", pid % 100_000),
            host_addr: Ipv4Addr::from(base + 1),
            addr: Ipv4Addr::from(base + 2),
            link_local: Ipv4Addr::new(169, 254, (idx / 250 % 250 + 1) as u8, (idx % 250 + 1) as u8),
            server: None,
        };
        let (ns, hif) = (th.netns.as_str(), th.host_if.as_str());
        let host_cidr = format!("{}/30", th.host_addr);
        let cidr = format!("{}/30", th.addr);
        let ll = format!("{}/32", th.link_local);
        sh("ip", &["netns", "add", ns]);
        sh(
            "ip",
            &[
                "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        sh("ip", &["addr", "add", &host_cidr, "dev", hif]);
        sh("ip", &["link", "set", hif, "up"]);
        sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        sh("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
        sh("ip", &["-n", ns, "addr", "add", &ll, "dev", "eth0"]);
        sh("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        sh(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &th.host_addr.to_string(),
            ],
        );
        // Goes away with the interface.
        sh(
            "ip",
            &["route", "add", &ll, "via", &th.addr.to_string(), "dev", hif],
        );
        th
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    fn serve(&mut self) {
        const SERVER: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from the test host; you are " + self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path().display()))
            .args([python(), "-c", SERVER])
            .stdin(Stdio::null())
            .spawn()
            .expect("test host server");
        self.server = Some(ChildGuard(child));
        let target = SocketAddr::from((self.addr, 8080));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "test host server did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Connect from inside a namespace: "ok", "errno N" or "timeout".
fn probe(netns: &Path, addr: &str, port: u16) -> String {
    const PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("ok")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("errno", e.errno)
"#;
    let out = sh(
        "nsenter",
        &[
            &format!("--net={}", netns.display()),
            python(),
            "-c",
            PROBE,
            addr,
            &port.to_string(),
        ],
    );
    out.trim().to_string()
}

/// GET a URL from inside a namespace (body, or the error).
fn http_get(netns: &Path, url: &str) -> String {
    const GET: &str = r#"
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except Exception as e:
    print("failed:", e)
"#;
    sh(
        "nsenter",
        &[
            &format!("--net={}", netns.display()),
            python(),
            "-c",
            GET,
            url,
        ],
    )
    .trim()
    .to_string()
}

/// IPv4 addresses of one interface of the host (all interfaces: `None`).
fn addresses_of(dev: Option<&str>) -> Vec<Ipv4Addr> {
    let mut args = vec!["-4", "-o", "addr", "show"];
    args.extend(dev.map(|d| ["dev", d]).into_iter().flatten());
    sh("ip", &args)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The host's primary addresses: those of the interface of its default route.
fn primary_addresses() -> Vec<Ipv4Addr> {
    let route = sh("ip", &["-4", "route", "show", "default"]);
    let mut words = route.split_whitespace();
    match words.find(|w| *w == "dev").and_then(|_| words.next()) {
        Some(dev) => addresses_of(Some(dev)),
        None => Vec::new(),
    }
}

/// The owner line of a slot or instance lock file.
fn owner(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
}

fn iface_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn table_exists(instance: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", &format!("hearth_{instance}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[derive(Clone)]
struct Names {
    host_if: String,
    netns: String,
    slot: u32,
}

fn names(net: &SandboxNet) -> Names {
    Names {
        host_if: net.host_if.clone(),
        netns: net.netns.clone(),
        slot: net.slot(),
    }
}

/// What is left of an instance: its table, instance lock, slot locks, and the listed sandboxes'
/// interfaces and namespaces (unless another live owner took their slot since), resolver files.
fn leftovers(instance: &str, sandboxes: &[Names], state: &Path) -> Vec<String> {
    let mut left = Vec::new();
    if table_exists(instance) {
        left.push(format!("table inet hearth_{instance}"));
    }
    let lock_dir = Path::new(LOCK_DIR);
    if lock_dir.join(format!("instance-{instance}")).exists() {
        left.push(format!("instance lock of {instance}"));
    }
    for entry in std::fs::read_dir(lock_dir).expect("lock dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("slot-") && owner(&entry.path()).as_deref() == Some(instance) {
            left.push(format!("slot lock {name}"));
        }
    }
    for s in sandboxes {
        let slot_owner = owner(&lock_dir.join(format!("slot-{:05}", s.slot)));
        if slot_owner.is_some() && slot_owner.as_deref() != Some(instance) {
            continue; // reused by another worker since
        }
        if iface_exists(&s.host_if) {
            left.push(format!("interface {}", s.host_if));
        }
        if Path::new("/run/netns").join(&s.netns).exists() {
            left.push(format!("namespace {}", s.netns));
        }
    }
    if let Ok(entries) = std::fs::read_dir(state) {
        for e in entries.flatten() {
            left.push(format!("state file {}", e.path().display()));
        }
    }
    left
}

#[test]
fn a_sandbox_reaches_other_hosts_but_not_the_worker_host_or_other_sandboxes() {
    let _serial = serial();
    let mut test_host = TestHost::new(0);
    test_host.serve();
    let state = tempfile::tempdir().expect("tempdir");
    let net = NetGuard::new(&instance("main"), state.path());
    let a = net.create().expect("sandbox a");
    let b = net.create().expect("sandbox b");
    assert_ne!(a.addr, b.addr);
    assert!(a.netns_path.exists() && a.host_if.len() <= 15);

    // Another host: reachable, through NAT (it sees the host's address on its link).
    let url = format!("http://{}:8080/", test_host.addr);
    let body = http_get(&a.netns_path, &url);
    assert_eq!(
        body,
        format!("hello from the test host; you are {}", test_host.host_addr),
        "sandbox a → test host"
    );
    assert!(http_get(&b.netns_path, &url).starts_with("hello from the test host"));

    // The worker host: a listener on 0.0.0.0 (so on every address) and one on 127.0.0.1.
    let any = TcpListener::bind("0.0.0.0:0").expect("listener");
    let any_port = any.local_addr().expect("addr").port();
    let local = TcpListener::bind("127.0.0.1:0").expect("listener");
    let local_port = local.local_addr().expect("addr").port();
    // Control: the listener takes connections from another namespace (the test host).
    assert_eq!(
        probe(
            &test_host.netns_path(),
            &test_host.host_addr.to_string(),
            any_port
        ),
        "ok",
        "control: test host → worker host"
    );
    // Only addresses that stay local for the whole test: a probe to an address that vanished
    // meanwhile (another test's namespace) would leave the machine.
    let all = addresses_of(None);
    let mut addrs = primary_addresses();
    println!("host's primary addresses: {addrs:?}");
    addrs.extend([a.gateway, b.gateway, test_host.host_addr]);
    assert!(
        addrs.iter().all(|a| all.contains(a)),
        "{addrs:?} not all in {all:?}"
    );
    for addr in &addrs {
        assert_eq!(
            probe(&a.netns_path, &addr.to_string(), any_port),
            REJECTED,
            "sandbox → host address {addr}"
        );
    }
    // 127.0.0.1 inside the sandbox is its own loopback: the host's loopback services are not there.
    for port in [any_port, local_port] {
        let got = probe(&a.netns_path, "127.0.0.1", port);
        assert_ne!(got, "ok", "sandbox → 127.0.0.1:{port}");
    }

    // Link-local: routed to the test host from the worker host (control: the host reaches it),
    // rejected from the sandbox. Only then the metadata address.
    let ll = SocketAddr::from((test_host.link_local, 8080));
    assert!(
        TcpStream::connect_timeout(&ll, Duration::from_secs(2)).is_ok(),
        "control: worker host → {ll}"
    );
    assert_eq!(
        probe(&a.netns_path, &test_host.link_local.to_string(), 8080),
        REJECTED
    );
    assert_eq!(probe(&a.netns_path, "169.254.169.254", 80), REJECTED);

    // Another sandbox: a listener in b, reachable from b itself, not from a.
    const LISTEN: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"#;
    let mut listener = ChildGuard(
        Command::new("nsenter")
            .arg(format!("--net={}", b.netns_path.display()))
            .args([python(), "-c", LISTEN])
            .stdout(Stdio::piped())
            .spawn()
            .expect("listener in b"),
    );
    let mut line = String::new();
    BufReader::new(listener.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    assert_eq!(
        probe(&b.netns_path, &b.addr.to_string(), 9000),
        "ok",
        "control: b → b"
    );
    assert_eq!(
        probe(&a.netns_path, &b.addr.to_string(), 9000),
        REJECTED,
        "a → b"
    );

    // IPv6 is off inside.
    let v6 = sh(
        "nsenter",
        &[
            &format!("--net={}", a.netns_path.display()),
            "cat",
            "/proc/sys/net/ipv6/conf/all/disable_ipv6",
        ],
    );
    assert_eq!(v6.trim(), "1");
    assert_eq!(sh("ip", &["-n", &a.netns, "-6", "addr", "show"]).trim(), "");

    // The resolver file: the host's without unreachable nameservers.
    let resolv = std::fs::read_to_string(&a.resolv_conf).expect("resolv.conf");
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let expected = sandbox_resolv_conf(&host, "/etc/resolv.conf");
    if expected.contains("nameserver") {
        assert_eq!(resolv, expected);
    }
    for l in resolv.lines().filter(|l| l.starts_with("nameserver")) {
        let ip: Ipv4Addr = l[10..].trim().parse().expect("an IPv4 nameserver");
        assert!(!ip.is_loopback() && !ip.is_link_local(), "{l}");
    }
    if host.contains("nameserver 10.255.255.53") {
        assert!(resolv.contains("nameserver 10.255.255.53\n"), "{resolv}");
    }

    drop(listener);
    net.destroy(&a);
    net.destroy(&b);
    assert!(!a.netns_path.exists() && !iface_exists(&a.host_if));
    assert!(!a.resolv_conf.exists());
}

#[test]
fn shutdown_removes_everything_and_destroy_is_idempotent() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let inst = instance("shut");
    let net = NetGuard::new(&inst, state.path());
    let nets: Vec<SandboxNet> = (0..3).map(|_| net.create().expect("create")).collect();
    let all: Vec<Names> = nets.iter().map(names).collect();
    assert!(table_exists(&inst));
    net.destroy(&nets[0]);
    net.destroy(&nets[0]);
    assert!(!iface_exists(&nets[0].host_if));

    // A sandbox network of another worker is left alone.
    let other_state = tempfile::tempdir().expect("tempdir");
    let other = NetGuard::new(&instance("other"), other_state.path());
    other.destroy(&nets[1]);
    assert!(nets[1].netns_path.exists() && iface_exists(&nets[1].host_if));
    drop(other);

    net.shutdown();
    assert_eq!(leftovers(&inst, &all, state.path()), Vec::<String>::new());
    assert!(matches!(net.create(), Err(NetError::ShutDown(_))));
    net.destroy(&nets[2]);
    net.shutdown();
}

#[test]
fn the_next_run_cleans_up_after_a_crashed_one() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let inst = instance("crash");
    let net = NetGuard::new(&inst, state.path());
    let nets: Vec<SandboxNet> = (0..3).map(|_| net.create().expect("create")).collect();
    let all: Vec<Names> = nets.iter().map(names).collect();
    // A crash: locks released, nothing removed.
    drop(nets);
    net.crash();
    let left = leftovers(&inst, &all, state.path());
    assert!(
        left.iter().any(|l| l.starts_with("table"))
            && left.iter().any(|l| l.starts_with("namespace")),
        "a crash leaves things behind: {left:?}"
    );

    let again = NetGuard::new(&inst, state.path());
    let left = leftovers(&inst, &all, state.path());
    assert_eq!(
        left,
        [
            format!("table inet hearth_{inst}"),
            format!("instance lock of {inst}")
        ]
    );
    let fresh = again.create().expect("create after a crash");
    let fetched = fresh.netns_path.clone();
    drop(again);
    assert!(!fetched.exists());
    assert_eq!(leftovers(&inst, &all, state.path()), Vec::<String>::new());
}

/// Set in the child process of [`a_killed_worker_is_cleaned_up_by_the_next_run`].
const CHILD_INSTANCE: &str = "HEARTH_NETNS_TEST_CHILD";
const CHILD_STATE: &str = "HEARTH_NETNS_TEST_STATE";

#[test]
fn a_killed_worker_is_cleaned_up_by_the_next_run() {
    if let Ok(inst) = std::env::var(CHILD_INSTANCE) {
        // The child: a worker holding two sandbox networks until it is SIGKILLed.
        let state = PathBuf::from(std::env::var(CHILD_STATE).expect("state dir"));
        let net = Network::new(&inst, &state).expect("network");
        let nets = [net.create().expect("a"), net.create().expect("b")];
        let line: Vec<String> = nets
            .iter()
            .map(|n| format!("{} {} {}", n.host_if, n.netns, n.slot()))
            .collect();
        println!("ready {}", line.join(" "));
        // Bounded, should the parent fail to kill this process.
        std::thread::sleep(Duration::from_secs(60));
        net.shutdown();
        return;
    }
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let inst = instance("kill");
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "a_killed_worker_is_cleaned_up_by_the_next_run",
                "--nocapture",
            ])
            .env(CHILD_INSTANCE, &inst)
            .env(CHILD_STATE, state.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("child worker"),
    );
    let stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("ready "))
        .expect("the child worker's ready line");
    let words: Vec<&str> = ready.split_whitespace().skip(1).collect();
    let all: Vec<Names> = words
        .chunks(3)
        .map(|w| Names {
            host_if: w[0].to_string(),
            netns: w[1].to_string(),
            slot: w[2].parse().expect("slot"),
        })
        .collect();
    assert_eq!(all.len(), 2);
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reap");
    let left = leftovers(&inst, &all, state.path());
    for what in ["table", "namespace", "interface", "slot lock", "state file"] {
        assert!(
            left.iter().any(|l| l.starts_with(what)),
            "no {what} left by the kill: {left:?}"
        );
    }

    let again = NetGuard::new(&inst, state.path());
    let left = leftovers(&inst, &all, state.path());
    assert_eq!(
        left,
        [
            format!("table inet hearth_{inst}"),
            format!("instance lock of {inst}")
        ]
    );
    drop(again);
    assert_eq!(leftovers(&inst, &all, state.path()), Vec::<String>::new());
}

#[test]
fn a_crashed_worker_of_another_instance_is_cleaned_up_too() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let dead = instance("dead");
    let net = NetGuard::new(&dead, state.path());
    let all: Vec<Names> = (0..2)
        .map(|_| names(&net.create().expect("create")))
        .collect();
    net.crash();
    // Any worker's start removes a dead worker's slots and table.
    let other_state = tempfile::tempdir().expect("tempdir");
    let other = NetGuard::new(&instance("alive"), other_state.path());
    let left = leftovers(&dead, &all, Path::new("/nonexistent"));
    assert_eq!(left, Vec::<String>::new());
    drop(other);
}

#[test]
fn one_instance_cannot_run_twice() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let inst = instance("twice");
    let _net = NetGuard::new(&inst, state.path());
    let started = Instant::now();
    match Network::new(&inst, state.path()) {
        Err(NetError::InstanceInUse { .. }) => {}
        other => panic!("expected InstanceInUse, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        Network::new("bad-name", state.path()),
        Err(NetError::BadInstance(_))
    ));
}

#[test]
fn a_failed_create_leaves_nothing() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let inst = instance("fail");
    let net = NetGuard::new(&inst, state.path());
    let before = hearth_names();
    // Break the worker's table behind its back: adding the NAT element fails.
    sh(
        "nft",
        &["delete", "table", "inet", &format!("hearth_{inst}")],
    );
    match net.create() {
        Err(NetError::Command { cmd, .. }) => assert!(cmd.contains("nft"), "{cmd}"),
        other => panic!("expected a command error, got {other:?}"),
    }
    // Other test processes create sandboxes meanwhile: a new name counts only while it exists
    // and its slot is not held by another instance.
    let new: Vec<String> = hearth_names()
        .difference(&before)
        .filter(|n| {
            let slot_owner = n
                .get(2..)
                .and_then(|d| d.parse::<u32>().ok())
                .and_then(|slot| owner(&Path::new(LOCK_DIR).join(format!("slot-{slot:05}"))));
            slot_owner.is_none_or(|o| o == inst)
        })
        .filter(|n| iface_exists(n) || Path::new("/run/netns").join(n).exists())
        .cloned()
        .collect();
    assert_eq!(new, Vec::<String>::new(), "left by the failed create");
    let left = leftovers(&inst, &[], state.path());
    assert_eq!(left, [format!("instance lock of {inst}")]);
}

/// Interfaces and namespaces with hearth names on the machine.
fn hearth_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for dir in ["/sys/class/net", "/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("hv") || n.starts_with("hn") {
                    names.insert(n);
                }
            }
        }
    }
    names
}

#[test]
fn parallel_workers_get_distinct_slots() {
    let _serial = serial();
    const WORKERS: usize = 3;
    const PER_WORKER: usize = 8;
    let states: Vec<tempfile::TempDir> = (0..WORKERS)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let results: Vec<(Vec<SandboxNet>, Vec<Duration>, NetGuard)> = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                scope.spawn(move || {
                    let net = NetGuard::new(&instance(&format!("par{i}")), state.path());
                    let mut created = Vec::new();
                    let mut times = Vec::new();
                    for _ in 0..PER_WORKER {
                        let t = Instant::now();
                        created.push(net.create().expect("create"));
                        times.push(t.elapsed());
                    }
                    (created, times, net)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let mut addrs = BTreeSet::new();
    let mut ifs = BTreeSet::new();
    for (nets, _, _) in &results {
        for n in nets {
            assert!(addrs.insert(n.addr), "address {} twice", n.addr);
            assert!(
                ifs.insert(n.host_if.clone()),
                "interface {} twice",
                n.host_if
            );
        }
    }
    assert_eq!(addrs.len(), WORKERS * PER_WORKER);
    let mut creates = Vec::new();
    let mut destroys = Vec::new();
    for (nets, times, net) in results {
        creates.extend(times);
        for n in &nets {
            let t = Instant::now();
            net.destroy(n);
            destroys.push(t.elapsed());
        }
        drop(net);
    }
    creates.sort();
    destroys.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "create (3 workers in parallel, 2 cores): p50 {:.1} ms, max {:.1} ms; destroy p50 {:.1} ms, max {:.1} ms",
        ms(creates[creates.len() / 2]),
        ms(creates[creates.len() - 1]),
        ms(destroys[destroys.len() / 2]),
        ms(destroys[destroys.len() - 1]),
    );
    assert!(creates[creates.len() - 1] < Duration::from_secs(5));
}

#[test]
fn create_and_destroy_take_milliseconds() {
    let _serial = serial();
    let state = tempfile::tempdir().expect("tempdir");
    let net = NetGuard::new(&instance("time"), state.path());
    let (mut creates, mut destroys) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        let n = net.create().expect("create");
        creates.push(t.elapsed());
        let t = Instant::now();
        net.destroy(&n);
        destroys.push(t.elapsed());
    }
    creates.sort();
    destroys.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "create p50 {:.1} ms (min {:.1}, max {:.1}); destroy p50 {:.1} ms (min {:.1}, max {:.1})",
        ms(creates[10]),
        ms(creates[0]),
        ms(creates[19]),
        ms(destroys[10]),
        ms(destroys[0]),
        ms(destroys[19]),
    );
    assert!(creates[10] < Duration::from_millis(500));
}

/// runsc with `--network=host` and the sandbox's namespace in the spec: `create`, then `start`;
/// the function inside reaches the test host and not the worker host. The root file system is
/// the host's own, read-only (only python3 from it is used).
#[test]
fn a_runsc_sandbox_uses_its_namespace() {
    let _serial = serial();
    let runsc = std::env::var("HEARTH_RUNSC").unwrap_or_else(|_| "/usr/bin/runsc".into());
    if !Path::new(&runsc).is_file() || !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: needs {runsc} and /usr/bin/python3");
        return;
    }
    let mut test_host = TestHost::new(1);
    test_host.serve();
    let state = tempfile::tempdir().expect("tempdir");
    let net = NetGuard::new(&instance("runsc"), state.path());
    let sb = net.create().expect("sandbox");
    let work = tempfile::tempdir().expect("tempdir");
    let (root, bundle) = (work.path().join("root"), work.path().join("bundle"));
    std::fs::create_dir_all(&bundle).expect("bundle");
    let script = format!(
        r#"
import socket, urllib.request
print(urllib.request.urlopen("http://{th}:8080/", timeout=5).read().decode(), flush=True)
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("{gw}", 22)); print("worker host: ok")
except OSError as e:
    print("worker host: errno", e.errno)
print(open("/etc/resolv.conf").read().strip())
print("done", flush=True)
"#,
        th = test_host.addr,
        gw = sb.gateway
    );
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": { "uid": 993, "gid": 990 },
            "args": ["/usr/bin/python3", "-c", script],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": { "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": [] }
        },
        "root": { "path": "/", "readonly": true },
        "hostname": "hearth",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs" },
            { "destination": "/etc/resolv.conf", "type": "bind", "source": sb.resolv_conf, "options": ["bind", "ro"] }
        ],
        "linux": {
            "namespaces": [ {"type": "pid"}, sb.oci_namespace(), {"type": "ipc"}, {"type": "uts"}, {"type": "mount"} ]
        }
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).expect("config.json");
    let id = format!("hn{:014}", std::process::id());
    struct Container<'a>(&'a str, &'a Path, &'a str);
    impl Drop for Container<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0)
                .arg(format!("--root={}", self.1.display()))
                .args(["delete", "--force", self.2])
                .output();
        }
    }
    let out_path = work.path().join("out");
    let out = std::fs::File::create(&out_path).expect("out");
    let _container = Container(&runsc, &root, &id);
    let root_flag = format!("--root={}", root.display());
    let t = Instant::now();
    let status = Command::new(&runsc)
        .args([&root_flag, RUNSC_NETWORK_FLAG, "create", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("out"))
        .stderr(out)
        .status()
        .expect("runsc create");
    assert!(
        status.success(),
        "runsc create: {}",
        std::fs::read_to_string(&out_path).unwrap_or_default()
    );
    let created = t.elapsed();
    sh(&runsc, &[&root_flag, RUNSC_NETWORK_FLAG, "start", &id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let output = loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if text.contains("done") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("runsc create {created:?}, output:\n{output}");
    assert!(
        output.contains(&format!(
            "hello from the test host; you are {}",
            test_host.host_addr
        )),
        "{output}"
    );
    assert!(
        output.contains(&format!("worker host: {REJECTED}")),
        "{output}"
    );
    assert!(
        output.contains("nameserver") || output.contains("DNS is unavailable"),
        "{output}"
    );
}
