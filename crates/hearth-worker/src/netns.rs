//! Function networking: a network namespace per sandbox, a veth pair to the worker host, NAT out
//! of the host's routes, and nftables rules that keep a sandbox away from the worker host itself,
//! from other sandboxes and from link-local (metadata) addresses.
//!
//! # Why this shape
//!
//! gVisor's own network stack (`runsc --network=sandbox`) fails with the runsc builds hearth runs
//! on 6.x kernels (`../shared/research/gvisor.md`, "Networking on this kernel"), while
//! `runsc --network=host` works when the OCI spec names an existing network namespace
//! (`{"type": "network", "path": SandboxNet::netns_path}`): the sentry then uses the host
//! kernel's stack, but only inside that namespace, whose single way out is a veth pair into the
//! worker's namespace, where the rules below see every packet. Alternatives weighed:
//! - one bridge for all sandboxes: one interface to police, but sandboxes would share a layer-2
//!   segment and need bridge filtering to keep them apart;
//! - macvlan/ipvlan: packets bypass the host's forward hook, so the host cannot police them;
//! - user-mode networking (slirp4netns, pasta): a helper process per sandbox and another
//!   userspace TCP/IP stack on the data path.
//!
//! A routed /30 per sandbox shares nothing between sandboxes and costs two `ip` runs and one
//! `nft` run per sandbox (a few milliseconds).
//!
//! # Names, addresses, slots
//!
//! Slot `N` (0 ≤ N < [`SLOTS`]) is the `N`th /30 of 10.200.0.0/16: the host side `hvNNNNN`
//! holds `.1` (the sandbox's gateway), the sandbox's `eth0` in the namespace `hnNNNNN` (bind
//! mounted at `/run/netns/hnNNNNN` by `ip netns`) holds `.2`. Names have a fixed length (≤ 15
//! bytes, the kernel's limit for interfaces). Slots are shared by every worker on the machine and
//! claimed with `flock` on `/run/hearth/net/slot-NNNNN`: a lock dies with its process, so the
//! slot of a crashed worker is free again, and whoever claims a slot first removes whatever
//! namespace or veth its previous owner left. A lock file is unlinked while still locked, and a
//! lock only counts if the path still names the locked file afterwards, so a slot never has two
//! owners.
//!
//! # Rules
//!
//! One table per worker instance, `table inet hearth_<instance>` (see [`ruleset`]), with base
//! chains of its own at priorities just before the standard ones. Every rule that protects
//! something matches all hearth sandbox interfaces by the common prefix [`HOST_IF_PREFIX`], so
//! each worker's table enforces the same isolation for every sandbox on the machine, and a drop
//! or reject in any table is final whatever the order of the tables. From a sandbox interface:
//! - IPv6 is dropped (and switched off inside the namespace); a source address the interface
//!   could not have (a reverse-path lookup, `fib saddr . iif`) is dropped;
//! - everything addressed to the host itself (any of its addresses on any interface, broadcast,
//!   the gateway address) is rejected in the input hook: no host service, no loopback service
//!   (127/8 inside the namespace is the namespace's own), not the hearth API;
//! - forwarding to another hearth sandbox interface, to 10.200.0.0/16 or to 169.254.0.0/16 is
//!   rejected; invalid connection-tracking state is dropped;
//! - everything else is forwarded and masqueraded out of the host's routes. The NAT rule matches
//!   this worker's sandbox addresses, a set with one element per sandbox: the postrouting hook
//!   knows no input interface, and the reverse-path check ties each address to its interface.
//!
//! Towards a sandbox interface only replies (`ct state established,related`) are forwarded.
//! Rejects answer with ICMP "administratively prohibited", so a function's connect fails at once
//! (`EHOSTUNREACH`) instead of hanging until its timeout.
//!
//! # Lifetimes and crashes
//!
//! [`Network::destroy`] and [`Network::shutdown`] remove what they own. Dropping a [`Network`]
//! without `shutdown` only releases its locks (and those of its sandboxes), exactly like a crash.
//! The next [`Network::new`] on the machine (of any instance) removes the namespaces and veths of
//! every slot nobody holds, and the tables of instances no live process holds; a new run of the
//! same instance also replaces its own table and removes the files in its state directory.
//!
//! # Limits
//!
//! - Another firewall whose forward chain drops by default (Docker's iptables `FORWARD` policy,
//!   ufw) also drops sandbox traffic: an accept in one table cannot override a drop in another.
//! - `net.ipv4.ip_forward` is switched on for the whole machine and left on.
//! - "Other hosts" include the host's own LAN neighbours and any address its routes reach;
//!   metadata services outside 169.254.0.0/16 (e.g. Azure's 168.63.129.16) are not blocked.
//! - A host that already uses 10.200.0.0/16 collides with the sandbox range.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Prefix of the host-side interface of every hearth sandbox on the machine (all workers). The
/// rules treat every interface with this prefix as a sandbox's: do not name anything else so.
pub const HOST_IF_PREFIX: &str = "hv";
/// Prefix of every hearth sandbox's network namespace name.
pub const NETNS_PREFIX: &str = "hn";
/// The range sandbox addresses come from, split into /30s (one per slot).
pub const SANDBOX_RANGE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Prefix length of [`SANDBOX_RANGE`].
pub const SANDBOX_RANGE_PREFIX: u8 = 16;
/// Prefix length of one sandbox's link.
pub const SANDBOX_PREFIX: u8 = 30;
/// Number of slots (/30s in [`SANDBOX_RANGE`]) shared by all workers on a machine.
pub const SLOTS: u32 = 1 << (SANDBOX_PREFIX - SANDBOX_RANGE_PREFIX);
/// Where slot and instance locks live (machine-wide).
pub const LOCK_DIR: &str = "/run/hearth/net";
/// The global runsc flag that makes a sandbox use the namespace named in its spec. It must be
/// passed to `runsc create` **and** `runsc start` (and `run`): `start` without it fails with
/// "cannot run with network enabled in root network namespace".
pub const RUNSC_NETWORK_FLAG: &str = "--network=host";

/// Where `ip netns` keeps its bind mounts (the first that exists wins).
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];
/// How long [`Network::new`] waits for an instance lock someone else holds (another worker
/// sweeping a dead run of this instance holds it for milliseconds).
const INSTANCE_WAIT: Duration = Duration::from_secs(3);
/// Host resolver files, in order of preference (the second is systemd-resolved's list of
/// upstream servers, used when the first names only its loopback stub).
const HOST_RESOLV: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];
/// glibc reads at most this many nameservers.
const MAX_NAMESERVERS: usize = 3;

/// Whether a sandbox gets a network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NetPolicy {
    /// Its own namespace with outbound access to other hosts (Lambda's default).
    #[default]
    Egress,
    /// Loopback only (`runsc --network=none`); needed for snapshots on this runsc.
    None,
}

impl NetPolicy {
    /// The policy's name as the server option spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            NetPolicy::Egress => "egress",
            NetPolicy::None => "none",
        }
    }
}

impl fmt::Display for NetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetPolicy {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "egress" => Ok(NetPolicy::Egress),
            "none" => Ok(NetPolicy::None),
            _ => Err(NetError::UnknownPolicy(s.to_string())),
        }
    }
}

/// What can go wrong with sandbox networking.
///
/// What the caller should do: [`NetError::MissingTool`], [`NetError::NotRoot`],
/// [`NetError::BadInstance`], [`NetError::UnknownPolicy`] and [`NetError::InstanceInUse`] are
/// final (fix the host or the configuration); [`NetError::NoFreeSlot`] is worth a retry once
/// sandboxes are destroyed; [`NetError::Command`] and [`NetError::Io`] come from the host (a
/// retry may help once; a repeated failure means the host lacks something, e.g. nf_tables);
/// [`NetError::ShutDown`] means the worker is stopping.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A program the module needs is not installed.
    #[error(
        "`{tool}` not found (looked on PATH, /usr/sbin, /sbin): install it with `apt-get install -y {package}`"
    )]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// Namespaces, veth pairs and nftables need root.
    #[error("sandbox networking needs root (network namespaces, veth pairs, nftables)")]
    NotRoot,
    /// The instance id cannot name a table and lock files.
    #[error("invalid network instance id {0:?}: 1 to 32 characters of a-z, A-Z, 0-9 and _")]
    BadInstance(String),
    /// A network policy other than `egress` or `none`.
    #[error("unknown network policy {0:?}: expected `egress` or `none`")]
    UnknownPolicy(String),
    /// Another live process holds this instance.
    #[error("network instance {instance} is in use by another live process (it holds {})", lock.display())]
    InstanceInUse {
        /// The instance id.
        instance: String,
        /// Its lock file.
        lock: PathBuf,
    },
    /// Every slot of the machine is taken.
    #[error("no free sandbox network slot: all {0} slots of 10.200.0.0/16 are in use")]
    NoFreeSlot(u32),
    /// [`Network::shutdown`] ran.
    #[error("the network of instance {0} is shut down")]
    ShutDown(String),
    /// A command (`ip`, `nft`) failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// A file or system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetError + 'a {
    move |source| NetError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One slot: a /30 and the names that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Slot(u32);

impl Slot {
    fn host_if(self) -> String {
        format!("{HOST_IF_PREFIX}{:05}", self.0)
    }
    fn netns(self) -> String {
        format!("{NETNS_PREFIX}{:05}", self.0)
    }
    fn base(self) -> u32 {
        u32::from(SANDBOX_RANGE) + 4 * self.0
    }
    fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }
    fn addr(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }
    fn lock_path(self) -> PathBuf {
        Path::new(LOCK_DIR).join(format!("slot-{:05}", self.0))
    }
    /// The slot a name like `hv00042`, `hn00042` or `slot-00042` stands for.
    fn parse(name: &str, prefix: &str) -> Option<Slot> {
        let digits = name.strip_prefix(prefix)?;
        if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u32 = digits.parse().ok()?;
        (n < SLOTS).then_some(Slot(n))
    }
}

/// The lock of one claimed slot, shared between the [`SandboxNet`] and its [`Network`] so that
/// whichever of `destroy` and `shutdown` comes first tears the slot down, and the other does
/// nothing (after the lock is gone another worker may own the slot).
struct SlotState {
    instance: String,
    lock: Mutex<Option<Flock<File>>>,
}

/// One sandbox's network. Dropping it removes nothing: its [`Network`] keeps the slot until
/// [`Network::destroy`] or [`Network::shutdown`].
pub struct SandboxNet {
    /// The namespace's bind mount: put it in the OCI spec as
    /// `{"type": "network", "path": ...}` and run runsc with [`RUNSC_NETWORK_FLAG`].
    pub netns_path: PathBuf,
    /// The namespace's name (`ip netns` / `nsenter --net=` take it or the path).
    pub netns: String,
    /// The host side of the veth pair (in the worker's namespace).
    pub host_if: String,
    /// The sandbox's address (on `eth0` inside the namespace).
    pub addr: Ipv4Addr,
    /// The host side's address, the sandbox's default route.
    pub gateway: Ipv4Addr,
    /// Prefix length of the link between them.
    pub prefix_len: u8,
    /// A resolver configuration for the sandbox: bind-mount it read-only at `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    slot: Slot,
    state: Arc<SlotState>,
}

impl SandboxNet {
    /// The slot number (stable for the sandbox's life; unique on the machine while it lives).
    pub fn slot(&self) -> u32 {
        self.slot.0
    }

    /// The OCI `linux.namespaces` entry that puts a sandbox into this namespace.
    pub fn oci_namespace(&self) -> serde_json::Value {
        serde_json::json!({ "type": "network", "path": self.netns_path })
    }
}

impl fmt::Debug for SandboxNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxNet")
            .field("netns_path", &self.netns_path)
            .field("host_if", &self.host_if)
            .field("addr", &self.addr)
            .field("gateway", &self.gateway)
            .field("resolv_conf", &self.resolv_conf)
            .finish_non_exhaustive()
    }
}

/// Sandbox networking of one worker: its nftables table and the slots it holds.
///
/// All methods are blocking (they run `ip` and `nft`; call them from `spawn_blocking` in async
/// code) and safe to call from several threads at once.
pub struct Network {
    instance: String,
    table: String,
    state_dir: PathBuf,
    ip: PathBuf,
    nft: PathBuf,
    /// Where the next slot search starts (spreads workers over the range).
    next: AtomicU32,
    /// Slots this worker holds, by number.
    live: Mutex<HashMap<u32, Arc<SlotState>>>,
    /// Set by `shutdown` (under `live`'s lock).
    closed: AtomicBool,
    instance_lock: Mutex<Option<Flock<File>>>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network")
            .field("instance", &self.instance)
            .field("table", &self.table)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Set up sandbox networking for the worker `instance` (a short id unique to the worker and
    /// stable across its restarts, e.g. `w1a2b3c4d5e6`); `state_dir` is a directory of the
    /// worker's own for the sandboxes' resolver files (created if missing).
    ///
    /// Checks that `ip` and `nft` exist, enables `net.ipv4.ip_forward` (machine-wide, and left
    /// on), removes what dead workers left (see the module docs), and installs this worker's
    /// table, replacing one an earlier run left.
    pub fn new(instance: &str, state_dir: &Path) -> Result<Network, NetError> {
        validate_instance(instance)?;
        let ip = find_tool("ip", "iproute2")?;
        let nft = find_tool("nft", "nftables")?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetError::NotRoot);
        }
        fs::create_dir_all(LOCK_DIR).map_err(io_err("create", Path::new(LOCK_DIR)))?;
        fs::create_dir_all(state_dir).map_err(io_err("create", state_dir))?;
        let instance_lock = lock_instance(instance)?;
        let net = Network {
            instance: instance.to_string(),
            table: format!("hearth_{instance}"),
            state_dir: state_dir.to_path_buf(),
            ip,
            nft,
            next: AtomicU32::new(rand::random::<u32>() % SLOTS),
            live: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            instance_lock: Mutex::new(Some(instance_lock)),
        };
        net.sweep_slots();
        net.remove_state_files();
        net.sweep_dead_tables();
        enable_forwarding()?;
        let script = format!(
            "table inet {t}\ndelete table inet {t}\n{}",
            ruleset(&net.table),
            t = net.table
        );
        run(&net.nft, &["-f", "-"], Some(&script))?;
        tracing::info!(instance, table = %net.table, "sandbox networking ready");
        Ok(net)
    }

    /// The worker instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The worker's nftables table (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Create one sandbox's network: a namespace with `lo` up and `eth0` holding the sandbox's
    /// address and a default route through the host side of a veth pair; the sandbox's address
    /// in this worker's NAT set; its resolver file. Takes a few milliseconds. On failure nothing
    /// of it is left.
    pub fn create(&self) -> Result<SandboxNet, NetError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(NetError::ShutDown(self.instance.clone()));
        }
        let started = Instant::now();
        let (slot, lock) = self.claim_slot()?;
        let setup = self.setup(slot);
        let (netns_path, resolv_conf) = match setup {
            Ok(paths) => paths,
            Err(e) => {
                self.teardown(&[slot], true);
                release(&slot.lock_path(), lock);
                return Err(e);
            }
        };
        let state = Arc::new(SlotState {
            instance: self.instance.clone(),
            lock: Mutex::new(Some(lock)),
        });
        {
            let mut live = locked(&self.live);
            if self.closed.load(Ordering::SeqCst) {
                drop(live);
                self.teardown(&[slot], true);
                if let Some(lock) = locked(&state.lock).take() {
                    release(&slot.lock_path(), lock);
                }
                return Err(NetError::ShutDown(self.instance.clone()));
            }
            live.insert(slot.0, state.clone());
        }
        tracing::debug!(
            instance = %self.instance,
            host_if = %slot.host_if(),
            addr = %slot.addr(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "sandbox network created"
        );
        Ok(SandboxNet {
            netns_path,
            netns: slot.netns(),
            host_if: slot.host_if(),
            addr: slot.addr(),
            gateway: slot.gateway(),
            prefix_len: SANDBOX_PREFIX,
            resolv_conf,
            slot,
            state,
        })
    }

    /// Remove a sandbox's network: veth pair, namespace, NAT set element, resolver file, slot.
    /// Idempotent; a network of another [`Network`] is left alone. Processes still inside the
    /// namespace keep it alive but lose its interfaces.
    pub fn destroy(&self, net: &SandboxNet) {
        if net.state.instance != self.instance {
            tracing::warn!(
                instance = %self.instance,
                owner = %net.state.instance,
                host_if = %net.host_if,
                "not destroying another instance's sandbox network"
            );
            return;
        }
        let Some(lock) = locked(&net.state.lock).take() else {
            return;
        };
        let started = Instant::now();
        self.teardown(&[net.slot], true);
        locked(&self.live).remove(&net.slot.0);
        release(&net.slot.lock_path(), lock);
        tracing::debug!(
            host_if = %net.host_if,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "sandbox network destroyed"
        );
    }

    /// Remove everything of this instance: every sandbox network it still holds, its table, its
    /// resolver files and its instance lock. Later `create` calls fail with
    /// [`NetError::ShutDown`]. Idempotent.
    pub fn shutdown(&self) {
        let states: Vec<(u32, Arc<SlotState>)> = {
            let mut live = locked(&self.live);
            self.closed.store(true, Ordering::SeqCst);
            live.drain().collect()
        };
        let mut owned = Vec::new();
        for (n, state) in states {
            if let Some(lock) = locked(&state.lock).take() {
                owned.push((Slot(n), lock));
            }
        }
        let slots: Vec<Slot> = owned.iter().map(|(s, _)| *s).collect();
        // The table goes as a whole: no need to remove set elements one by one.
        self.teardown(&slots, false);
        for (slot, lock) in owned {
            release(&slot.lock_path(), lock);
        }
        match run(&self.nft, &["delete", "table", "inet", &self.table], None) {
            Err(e) if !is_missing(&e) => {
                tracing::warn!(table = %self.table, "removing the nftables table: {e}");
            }
            _ => {}
        }
        self.remove_state_files();
        if let Some(lock) = locked(&self.instance_lock).take() {
            release(&instance_lock_path(&self.instance), lock);
        }
        tracing::info!(instance = %self.instance, "sandbox networking shut down");
    }

    /// Claim a free slot machine-wide and remove whatever a dead previous owner left in it.
    fn claim_slot(&self) -> Result<(Slot, Flock<File>), NetError> {
        let start = self.next.load(Ordering::Relaxed);
        for i in 0..SLOTS {
            let slot = Slot((start + i) % SLOTS);
            let path = slot.lock_path();
            let Some(mut lock) = try_lock(&path, true)? else {
                continue;
            };
            self.next.store((slot.0 + 1) % SLOTS, Ordering::Relaxed);
            if slot_resources_exist(slot) {
                tracing::info!(host_if = %slot.host_if(), "removing a dead worker's leftovers");
                self.teardown(&[slot], false);
            }
            let owner = format!("{} {}\n", self.instance, std::process::id());
            let written = lock
                .set_len(0)
                .and_then(|()| lock.rewind())
                .and_then(|()| lock.write_all(owner.as_bytes()));
            if let Err(source) = written {
                release(&path, lock);
                return Err(NetError::Io {
                    what: "write",
                    path,
                    source,
                });
            }
            return Ok((slot, lock));
        }
        Err(NetError::NoFreeSlot(SLOTS))
    }

    /// Namespace, veth pair, addresses, routes, NAT set element, resolver file.
    fn setup(&self, slot: Slot) -> Result<(PathBuf, PathBuf), NetError> {
        let (host_if, netns) = (slot.host_if(), slot.netns());
        run(&self.ip, &["-batch", "-"], Some(&host_script(slot)))?;
        let netns_path = netns_path(&netns).ok_or_else(|| NetError::Command {
            cmd: format!("ip netns add {netns}"),
            detail: format!("no bind mount of {netns} appeared under {NETNS_DIRS:?}"),
        })?;
        // The NAT element goes in while the namespace side is configured.
        let element = spawn(
            &self.nft,
            &[
                "add",
                "element",
                "inet",
                &self.table,
                "sandboxes",
                &format!("{{ {} }}", slot.addr()),
            ],
            None,
        )?;
        let inside = (|| {
            // The host side needs no IPv6 either (best effort: the rules drop it anyway).
            let _ = write_sysctl(
                &format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6"),
                "1",
            );
            in_netns(&netns_path, disable_ipv6)?;
            run(
                &self.ip,
                &["-n", &netns, "-batch", "-"],
                Some(&netns_script(slot)),
            )
        })();
        let added = element.wait();
        inside?;
        added?;
        let resolv_conf = self.state_dir.join(format!("resolv-{:05}.conf", slot.0));
        let (text, source) = host_resolv_conf();
        write_file(&resolv_conf, &sandbox_resolv_conf(&text, &source))?;
        Ok((netns_path, resolv_conf))
    }

    /// Remove slots' veth pairs and namespaces (one `ip` run), and optionally their NAT set
    /// elements, and their resolver files. Failures are logged: there is nobody to hand them
    /// to, and the next claim or sweep of the slot tries again.
    fn teardown(&self, slots: &[Slot], elements: bool) {
        if slots.is_empty() {
            return;
        }
        let script: String = slots
            .iter()
            .map(|s| format!("link del {}\nnetns del {}\n", s.host_if(), s.netns()))
            .collect();
        // The set elements go in parallel with the interfaces (one nft run each: a run that
        // names a missing element removes none).
        let mut removals = Vec::new();
        if elements {
            for slot in slots {
                let element = format!("{{ {} }}", slot.addr());
                let args = [
                    "delete",
                    "element",
                    "inet",
                    &self.table,
                    "sandboxes",
                    &element,
                ];
                match spawn(&self.nft, &args, None) {
                    Ok(running) => removals.push((*slot, running)),
                    Err(e) => {
                        tracing::warn!(addr = %slot.addr(), "removing the NAT set element: {e}")
                    }
                }
            }
        }
        // -force: carry on past objects that are already gone; what is left is checked below.
        let _ = run(&self.ip, &["-force", "-batch", "-"], Some(&script));
        for (slot, running) in removals {
            match running.wait() {
                Err(e) if !is_missing(&e) => {
                    tracing::warn!(addr = %slot.addr(), "removing the NAT set element: {e}");
                }
                _ => {}
            }
        }
        for &slot in slots {
            if slot_resources_exist(slot) {
                tracing::warn!(
                    host_if = %slot.host_if(),
                    netns = %slot.netns(),
                    "sandbox network not fully removed"
                );
            }
            let resolv = self.state_dir.join(format!("resolv-{:05}.conf", slot.0));
            match fs::remove_file(&resolv) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(path = %resolv.display(), "removing a resolver file: {e}");
                }
                _ => {}
            }
        }
    }

    /// Remove the namespace and veth of every slot nobody holds: what dead workers left (slot
    /// files, and namespaces or interfaces with a hearth name but no slot file).
    fn sweep_slots(&self) {
        let mut slots = BTreeSet::new();
        for (dir, prefix) in [
            (LOCK_DIR, "slot-"),
            (NETNS_DIRS[0], NETNS_PREFIX),
            (NETNS_DIRS[1], NETNS_PREFIX),
            ("/sys/class/net", HOST_IF_PREFIX),
        ] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Some(slot) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| Slot::parse(n, prefix))
                {
                    slots.insert(slot);
                }
            }
        }
        let mut claimed = Vec::new();
        for slot in slots {
            match try_lock(&slot.lock_path(), true) {
                Ok(Some(lock)) => claimed.push((slot, lock)),
                Ok(None) => {} // held: a live sandbox
                Err(e) => tracing::warn!("sweeping slot {}: {e}", slot.0),
            }
        }
        let stale: Vec<Slot> = claimed
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| slot_resources_exist(*s))
            .collect();
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                "removing dead workers' sandbox networks"
            );
        }
        self.teardown(&stale, false);
        for (slot, lock) in claimed {
            release(&slot.lock_path(), lock);
        }
    }

    /// Remove the tables of hearth instances whose lock no live process holds.
    fn sweep_dead_tables(&self) {
        let out = match run(&self.nft, &["list", "tables", "inet"], None) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!("listing nftables tables: {e}");
                return;
            }
        };
        for line in out.lines() {
            let Some(instance) = line
                .trim()
                .strip_prefix("table inet hearth_")
                .map(str::trim)
            else {
                continue;
            };
            if instance == self.instance || validate_instance(instance).is_err() {
                continue;
            }
            let path = instance_lock_path(instance);
            match try_lock(&path, true) {
                Ok(Some(lock)) => {
                    tracing::info!(instance, "removing a dead worker's nftables table");
                    let table = format!("hearth_{instance}");
                    match run(&self.nft, &["delete", "table", "inet", &table], None) {
                        Err(e) if !is_missing(&e) => {
                            tracing::warn!(%table, "removing a dead worker's table: {e}");
                        }
                        _ => {}
                    }
                    release(&path, lock);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(instance, "checking a worker's lock: {e}"),
            }
        }
    }

    /// Remove this instance's resolver files (all stale when no slot is held).
    fn remove_state_files(&self) {
        let Ok(entries) = fs::read_dir(&self.state_dir) else {
            return;
        };
        let live: BTreeSet<u32> = locked(&self.live).keys().copied().collect();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(slot) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".conf"))
                .and_then(|n| Slot::parse(n, "resolv-"))
            else {
                continue;
            };
            if !live.contains(&slot.0) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The worker's nftables table (without the commands that replace an old one).
pub fn ruleset(table: &str) -> String {
    let hv = format!("\"{HOST_IF_PREFIX}*\"");
    let range = format!("{SANDBOX_RANGE}/{SANDBOX_RANGE_PREFIX}");
    format!(
        r#"table inet {table} {{
    # This worker's sandbox addresses (one element per sandbox): what its NAT rule covers.
    set sandboxes {{
        type ipv4_addr
    }}

    chain prerouting {{
        type filter hook prerouting priority raw - 10; policy accept;
        iifname {hv} meta nfproto ipv6 drop
        iifname {hv} fib saddr . iif oif missing drop
    }}

    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname {hv} reject with icmpx type admin-prohibited
    }}

    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname {hv} ct state invalid drop
        iifname {hv} oifname {hv} reject with icmpx type admin-prohibited
        iifname {hv} ip daddr {{ {range}, 169.254.0.0/16 }} reject with icmpx type admin-prohibited
        oifname {hv} ct state established,related accept
        oifname {hv} drop
    }}

    chain postrouting {{
        type nat hook postrouting priority srcnat - 10; policy accept;
        ip saddr @sandboxes oifname != {hv} masquerade
    }}
}}
"#
    )
}

/// The host-namespace half of a sandbox's network (one `ip -batch`).
fn host_script(slot: Slot) -> String {
    let (hv, hn) = (slot.host_if(), slot.netns());
    format!(
        "netns add {hn}\n\
         link add {hv} type veth peer name eth0 netns {hn}\n\
         addr add {gw}/{SANDBOX_PREFIX} dev {hv}\n\
         link set {hv} up\n",
        gw = slot.gateway()
    )
}

/// The sandbox-namespace half (one `ip -n NS -batch`).
fn netns_script(slot: Slot) -> String {
    format!(
        "link set lo up\n\
         addr add {addr}/{SANDBOX_PREFIX} dev eth0\n\
         link set eth0 up\n\
         route add default via {gw}\n",
        addr = slot.addr(),
        gw = slot.gateway()
    )
}

/// A resolver configuration for a sandbox, from the host's: nameservers a sandbox cannot reach
/// are left out (loopback, link-local, unspecified, in the sandbox range, and IPv6, which is off
/// in sandboxes); at most three are kept (glibc's limit). With none left, only `options` lines
/// remain and a comment says that DNS is unavailable (glibc then tries 127.0.0.1 inside the
/// namespace, which fails at once).
pub fn sandbox_resolv_conf(host: &str, source: &str) -> String {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    let mut options = Vec::new();
    for line in host.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let ip = words.next().and_then(|w| w.parse::<Ipv4Addr>().ok());
                if let Some(ip) =
                    ip.filter(|ip| usable_nameserver(*ip) && servers.len() < MAX_NAMESERVERS)
                {
                    servers.push(ip);
                }
            }
            Some("search" | "domain") => search.push(line),
            Some("options") => options.push(line),
            _ => {}
        }
    }
    let mut out = String::new();
    if servers.is_empty() {
        out.push_str(&format!(
            "# hearth: {source} names no nameserver a sandbox can reach (loopback, link-local and \
             IPv6 ones are unreachable from sandboxes): DNS is unavailable to functions\n"
        ));
    } else {
        out.push_str(&format!(
            "# hearth: from {source} without the nameservers sandboxes cannot reach\n"
        ));
        for ip in &servers {
            out.push_str(&format!("nameserver {ip}\n"));
        }
        for line in &search {
            out.push_str(line);
            out.push('\n');
        }
    }
    for line in &options {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn usable_nameserver(ip: Ipv4Addr) -> bool {
    let in_range = u32::from(ip) >> (32 - SANDBOX_RANGE_PREFIX)
        == u32::from(SANDBOX_RANGE) >> (32 - SANDBOX_RANGE_PREFIX);
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || in_range)
}

/// The host's resolver file to derive from, and its path: `/etc/resolv.conf`, unless it names
/// no usable nameserver (e.g. only systemd-resolved's 127.0.0.53) and systemd-resolved's upstream
/// list does.
fn host_resolv_conf() -> (String, String) {
    let mut first = None;
    for path in HOST_RESOLV {
        let Ok(text) = fs::read_to_string(path) else {
            continue;
        };
        let usable = text.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("nameserver")
                && w.next()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
                    .is_some_and(usable_nameserver)
        });
        if usable {
            return (text, path.to_string());
        }
        first.get_or_insert((text, path.to_string()));
    }
    first.unwrap_or_else(|| (String::new(), HOST_RESOLV[0].to_string()))
}

fn validate_instance(instance: &str) -> Result<(), NetError> {
    let ok = !instance.is_empty()
        && instance.len() <= 32
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetError::BadInstance(instance.to_string()))
    }
}

fn instance_lock_path(instance: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("instance-{instance}"))
}

/// Hold the instance's lock; wait a little if a sweeper of a dead run holds it.
fn lock_instance(instance: &str) -> Result<Flock<File>, NetError> {
    let path = instance_lock_path(instance);
    let deadline = Instant::now() + INSTANCE_WAIT;
    loop {
        if let Some(mut lock) = try_lock(&path, true)? {
            let owner = format!("{}\n", std::process::id());
            lock.set_len(0)
                .and_then(|()| lock.rewind())
                .and_then(|()| lock.write_all(owner.as_bytes()))
                .map_err(io_err("write", &path))?;
            return Ok(lock);
        }
        if Instant::now() >= deadline {
            return Err(NetError::InstanceInUse {
                instance: instance.to_string(),
                lock: path,
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Lock `path` exclusively without waiting. `None`: someone holds it (or, without `create`, it
/// does not exist). Also the workers' liveness locks (`cgroup.rs`).
pub(crate) fn try_lock(path: &Path, create: bool) -> Result<Option<Flock<File>>, NetError> {
    loop {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_err("open", path)(source)),
        };
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(io_err("lock", path)(errno.into())),
        };
        // The previous holder unlinks the file before it lets go: a lock on a file the path no
        // longer names protects nothing. Only a lock on the current file counts.
        let ours = lock.metadata().map_err(io_err("stat", path))?;
        match fs::symlink_metadata(path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => return Ok(Some(lock)),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if create {
                    continue;
                }
                return Ok(None);
            }
            Err(source) => return Err(io_err("stat", path)(source)),
        }
    }
}

/// Give a lock up: unlink its file first, while it still holds, so nobody locks the file and
/// takes it for the live one.
pub(crate) fn release(path: &Path, lock: Flock<File>) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), "removing a lock file: {e}");
        }
        _ => {}
    }
    drop(lock);
}

fn slot_resources_exist(slot: Slot) -> bool {
    Path::new("/sys/class/net").join(slot.host_if()).exists() || netns_path(&slot.netns()).is_some()
}

fn netns_path(name: &str) -> Option<PathBuf> {
    NETNS_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Run `f` on a thread of its own that has joined the network namespace at `netns` (setns
/// affects only the calling thread; the thread ends with `f`).
fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let ns = File::open(netns).map_err(io_err("open", netns))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `ns` is an open namespace file for the whole call; setns changes only
                // this thread's network namespace, and this thread runs nothing but `f`.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io_err("setns", netns)(io::Error::last_os_error()));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetError::Io {
                    what: "configure (thread panicked)",
                    path: netns.to_path_buf(),
                    source: io::Error::other("panic"),
                })
            })
    })
}

/// Switch IPv6 off in the calling thread's network namespace (nothing to do on a host without
/// IPv6).
fn disable_ipv6() -> Result<(), NetError> {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    // `all` applies to the interfaces there now (lo, eth0), `default` to later ones.
    for conf in ["all", "default"] {
        write_sysctl(&format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
    }
    Ok(())
}

fn enable_forwarding() -> Result<(), NetError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    write_sysctl(path, "1")?;
    tracing::info!("enabled net.ipv4.ip_forward for sandbox networking");
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    fs::write(path, value).map_err(io_err("write", Path::new(path)))
}

fn write_file(path: &Path, text: &str) -> Result<(), NetError> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("write", path))?;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err("chmod", path))
}

fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, NetError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(NetError::MissingTool { tool, package })
}

/// Run a command (with `stdin` as its input); its stdout, or an error with its stderr.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    spawn(program, args, stdin)?.wait()
}

/// A command started by [`spawn`]; [`Running::wait`] must be called (it reaps the child).
struct Running {
    child: std::process::Child,
    cmd: String,
    program: PathBuf,
}

/// Start a command with `stdin` as its input, to overlap it with other work.
fn spawn(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Running, NetError> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("run", program))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A failed write shows up as the command's failure; scripts are far below a pipe's
        // capacity, so this does not wait on the child.
        let _ = pipe.write_all(input.as_bytes());
    }
    Ok(Running {
        child,
        cmd: format!("{} {}", program.display(), args.join(" ")),
        program: program.to_path_buf(),
    })
}

impl Running {
    /// Wait for the command: its stdout, or an error with its stderr.
    fn wait(self) -> Result<String, NetError> {
        let out = self
            .child
            .wait_with_output()
            .map_err(io_err("wait for", &self.program))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(NetError::Command {
            cmd: self.cmd,
            detail: format!("{}: {}", out.status, stderr.trim()),
        })
    }
}

/// Whether a command failed only because what it should remove is already gone.
fn is_missing(e: &NetError) -> bool {
    matches!(e, NetError::Command { detail, .. }
        if detail.contains("No such file or directory") || detail.contains("Cannot find device"))
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_and_prints() {
        assert_eq!("egress".parse::<NetPolicy>().unwrap(), NetPolicy::Egress);
        assert_eq!(" None ".parse::<NetPolicy>().unwrap(), NetPolicy::None);
        assert_eq!(NetPolicy::default(), NetPolicy::Egress);
        assert_eq!(NetPolicy::None.to_string(), "none");
        let err = "sandbox".parse::<NetPolicy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown network policy \"sandbox\": expected `egress` or `none`"
        );
        assert_eq!(
            serde_json::to_string(&NetPolicy::Egress).unwrap(),
            "\"egress\""
        );
    }

    #[test]
    fn slots_have_fixed_names_and_a_30_each() {
        let s = Slot(0);
        assert_eq!(
            (s.host_if(), s.netns()),
            ("hv00000".into(), "hn00000".into())
        );
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(s.addr(), Ipv4Addr::new(10, 200, 0, 2));
        let last = Slot(SLOTS - 1);
        assert_eq!(last.host_if(), "hv16383");
        assert!(last.host_if().len() <= 15);
        assert_eq!(last.gateway(), Ipv4Addr::new(10, 200, 255, 253));
        assert_eq!(last.addr(), Ipv4Addr::new(10, 200, 255, 254));
        assert_eq!(Slot::parse("hv00042", "hv"), Some(Slot(42)));
        assert_eq!(Slot::parse("slot-16383", "slot-"), Some(Slot(16383)));
        assert_eq!(Slot::parse("hv16384", "hv"), None);
        assert_eq!(Slot::parse("hv0042", "hv"), None);
        assert_eq!(Slot::parse("hvx0042", "hv"), None);
    }

    #[test]
    fn instance_ids() {
        assert!(validate_instance("w1a2b3c4d5e6").is_ok());
        assert!(validate_instance("a_B9").is_ok());
        for bad in ["", "has-dash", "sp ace", "x;flush ruleset", &"a".repeat(33)] {
            assert!(validate_instance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolv_conf_keeps_reachable_nameservers() {
        let host = "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n\
                    nameserver ::1\nnameserver fd00::1\nnameserver 169.254.169.253\n\
                    nameserver 0.0.0.0\nnameserver 10.200.0.1\nsearch example.internal\n\
                    options edns0 trust-ad\n";
        let out = sandbox_resolv_conf(host, "/etc/resolv.conf");
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "nameserver 10.255.255.53",
                "search example.internal",
                "options edns0 trust-ad"
            ]
        );
    }

    #[test]
    fn resolv_conf_without_reachable_nameservers_keeps_only_options() {
        let host = "nameserver 127.0.0.53\nnameserver ::1\nsearch lan\noptions edns0\n";
        let out = sandbox_resolv_conf(host, "/etc/resolv.conf");
        assert!(out.starts_with('#') && out.contains("DNS is unavailable"));
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["options edns0"]);
        assert!(sandbox_resolv_conf("", "/etc/resolv.conf").contains("DNS is unavailable"));
    }

    #[test]
    fn resolv_conf_keeps_at_most_three() {
        let host: String = (1..=5)
            .map(|i| format!("nameserver 192.0.2.{i}\n"))
            .collect();
        let out = sandbox_resolv_conf(&host, "x");
        assert_eq!(
            out.lines().filter(|l| l.starts_with("nameserver ")).count(),
            3
        );
    }

    #[test]
    fn ruleset_polices_every_sandbox_interface() {
        let r = ruleset("hearth_w1");
        assert!(r.starts_with("table inet hearth_w1 {"));
        for needle in [
            "type filter hook input priority filter - 10; policy accept;",
            "iifname \"hv*\" reject with icmpx type admin-prohibited",
            "iifname \"hv*\" oifname \"hv*\" reject",
            "ip daddr { 10.200.0.0/16, 169.254.0.0/16 } reject",
            "oifname \"hv*\" ct state established,related accept",
            "iifname \"hv*\" meta nfproto ipv6 drop",
            "ip saddr @sandboxes oifname != \"hv*\" masquerade",
        ] {
            assert!(r.contains(needle), "missing {needle:?} in\n{r}");
        }
    }

    #[test]
    fn scripts() {
        let s = Slot(3);
        assert_eq!(
            host_script(s),
            "netns add hn00003\nlink add hv00003 type veth peer name eth0 netns hn00003\n\
             addr add 10.200.0.13/30 dev hv00003\nlink set hv00003 up\n"
        );
        assert_eq!(
            netns_script(s),
            "link set lo up\naddr add 10.200.0.14/30 dev eth0\nlink set eth0 up\n\
             route add default via 10.200.0.13\n"
        );
    }
}
