"""hearth as separate processes on this machine: three `hearth assignment` nodes, each in a network
namespace of its own on a bridge (so a test can cut a node's link), two
`hearth worker`s with real runsc sandboxes, one `hearth frontend`, and an S3-compatible server
(moto) as the chunk store's origin, driven by boto3. Invocations
run on the workers under leases; reserved concurrency holds across both workers; a worker
SIGKILLed during an invocation gives its caller a clean function error and its work moves to
the other worker; the partition leader SIGKILLed, invocations go on and the node catches up
after a restart; the leader's link cut, the majority elects a leader and serves while a front end
that reaches only the isolated node gets no lease. Every process is stopped, every sandbox,
namespace and link removed at the end."""
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest

from conftest import _bin, make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
SECRET = "e2e cluster secret, 32 bytes long!"
CODE = """
import time
def handler(event, context):
    start = time.time()
    time.sleep(event.get("sleep", 0))
    return {"echo": event.get("echo"), "start": start, "end": time.time()}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


class Proc:
    def __init__(self, name, args, log, env=None):
        self.name, self.args, self.log = name, args, Path(log)
        self.extra_env = env or {}
        self.proc = None

    def start(self):
        # wait_for reads only what this run writes.
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        env = dict(os.environ, HEARTH_CLUSTER_SECRET=SECRET, **self.extra_env)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        return self

    def wait_for(self, text, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log.exists() and text in self.log.read_text(errors="replace")[self.offset:]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no {text!r} within {timeout} s: {self.tail()}")

    def tail(self):
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Net:
    """A bridge in this namespace and one namespace per assignment node, linked to the bridge by
    a veth pair: node i is 10.231.0.i, this namespace 10.231.0.254."""

    def __init__(self):
        self.tag = os.getpid() % 100000
        self.bridge = f"hcb{self.tag}"
        self.spaces = []
        self.links = []

    def setup(self):
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", "10.231.0.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def ns(self, i):
        return f"hcl{self.tag}n{i}"

    def host_side(self, i):
        return f"hcl{self.tag}h{i}"

    def add(self, i):
        ns = self.ns(i)
        ip("netns", "add", ns)
        self.spaces.append(ns)
        ip("link", "add", self.host_side(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(self.host_side(i))
        ip("link", "set", self.host_side(i), "master", self.bridge, "up")
        ip("-n", ns, "addr", "add", f"10.231.0.{i}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")

    def add_client_link(self, i):
        """A second link into node i's namespace, to this namespace only (10.232.0.4i+1/30 here,
        +2 there, no route beyond it): a client can reach a process there while the node's
        bridge link is cut."""
        ns, host = self.ns(i), f"hcl{self.tag}c{i}"
        ip("link", "add", host, "type", "veth", "peer", "name", "cli0", "netns", ns)
        self.links.append(host)
        ip("addr", "add", f"10.232.0.{4 * i + 1}/30", "dev", host)
        ip("link", "set", host, "up")
        ip("-n", ns, "addr", "add", f"10.232.0.{4 * i + 2}/30", "dev", "cli0")
        ip("-n", ns, "link", "set", "cli0", "up")
        return f"10.232.0.{4 * i + 2}"

    def cut(self, i):
        ip("link", "set", self.host_side(i), "down")

    def heal(self, i):
        ip("link", "set", self.host_side(i), "up")

    def teardown(self):
        for link in self.links:  # both ends of a veth go at once
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in self.spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def leftovers(self):
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return [l for l in (spaces + links).splitlines() if f"hcl{self.tag}" in l or self.bridge in l]


class Cluster:
    def __init__(self, root):
        self.root = Path(root)
        self.net = Net()
        self.node_addrs = [f"10.231.0.{i}:7100" for i in (1, 2, 3)]
        self.assignment = ",".join(self.node_addrs)
        self.s3_port = free_port()
        self.s3 = None
        self.nodes = {}
        self.workers = {}
        self.frontend = None
        self.extra = []
        self.env = {}

    def start_s3(self):
        """moto's S3 server on loopback, with the bucket the cluster's chunk store lives in."""
        self.s3 = Proc("s3", ["python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
                       self.root / "s3.log").start()
        deadline = time.time() + 30
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint(), **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"})
        while True:
            try:
                s3.create_bucket(Bucket="hearth-e2e")
                return s3
            except Exception:
                if time.time() > deadline or self.s3.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def s3_endpoint(self):
        return f"http://127.0.0.1:{self.s3_port}"

    def store_args(self):
        return ["--store", "s3://hearth-e2e/chunks", "--store-endpoint", self.s3_endpoint()]

    def node(self, i):
        args = ["ip", "netns", "exec", self.net.ns(i),
                _bin(), "assignment", "--id", str(i), "--listen", self.node_addrs[i - 1],
                "--data-dir", str(self.root / f"node{i}"), "--partitions", "1",
                "--heartbeat-ms", "50", "--worker-dead-ms", "2000"]
        if i == 1 and not (self.root / "node1").exists():
            members = ",".join(f"{j}={a}" for j, a in enumerate(self.node_addrs, 1))
            args += ["--initialize", members]
        p = Proc(f"node{i}", args, self.root / f"node{i}.log").start()
        self.nodes[i] = p
        return p

    def worker(self, name):
        args = [_bin(), "worker", "--name", name, "--listen", f"127.0.0.1:{free_port()}",
                "--data-dir", str(self.root / name), "--assignment", self.assignment,
                *self.store_args(), "--heartbeat-ms", "300",
                "--no-build-images", "--no-image-artifacts", "--keep-alive", "60",
                "--memory-budget-mb", "2048", "--prewarm-per-kind", "1", "--prewarm-total", "1"]
        if os.environ.get("HEARTH_IMAGE_CACHE"):
            args += ["--image-cache", os.environ["HEARTH_IMAGE_CACHE"]]
        if os.environ.get("HEARTH_AGENT"):
            args += ["--agent", os.environ["HEARTH_AGENT"]]
        p = Proc(name, args, self.root / f"{name}.log", env=S3_ENV).start()
        self.workers[name] = p
        return p

    def start_frontend(self):
        data = self.root / "frontend"
        args = [_bin(), "frontend", "--listen", "127.0.0.1:0", "--data-dir", str(data),
                "--assignment", self.assignment, *self.store_args(),
                "--partitions", "1", "--keep-alive", "60",
                # Every invocation takes and returns its lease (the failover tests need the
                # assignment service on every call; holding is tested in tests/remote.rs).
                "--lease-hold-ms", "0"]
        self.frontend = Proc("frontend", args, self.root / "frontend.log", env=S3_ENV).start()
        self.frontend.wait_for("hearth is up")
        for line in (data / "client.env").read_text().splitlines():
            k, v = line[len("export "):].split("=", 1)
            self.env[k] = v

    def client(self, read_timeout=60):
        return boto3.client(
            "lambda", endpoint_url=self.env["AWS_ENDPOINT_URL"],
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(retries={"total_max_attempts": 1},
                                          read_timeout=read_timeout, max_pool_connections=16))

    def status(self, assignment=None):
        cp = subprocess.run([_bin(), "status", "--assignment", assignment or self.assignment, "--partitions", "1",
                             "--json"], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, HEARTH_CLUSTER_SECRET=SECRET))
        return [s for s in json.loads(cp.stdout) if "error" not in s]

    def live_workers(self):
        for s in self.status():
            return {w["id"].split("/")[0]: w for w in s["workers"]}
        return {}

    def leader(self, assignment=None):
        for s in self.status(assignment):
            for p in s["partitions"]:
                if p["leader"] == s["id"]:
                    return s["id"]
        return None

    def containers(self, name):
        cp = subprocess.run(["runsc", "--root", str(self.root / name / "runsc"), "list", "-quiet"],
                            capture_output=True, text=True)
        return [c for c in cp.stdout.split() if c]


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="hearth-cluster-") as d:
        if os.environ.get("HEARTH_E2E_KEEP"):
            d = tempfile.mkdtemp(prefix="hearth-cluster-kept-")
        c = Cluster(d)
        try:
            c.net.setup()
            for i in (1, 2, 3):
                c.net.add(i)
            c.start_s3()
            for i in (1, 2, 3):
                c.node(i)
            for name in ("wa", "wb"):
                c.worker(name)
            for name in ("wa", "wb"):
                c.workers[name].wait_for("registered")
            c.start_frontend()
            yield c
        finally:
            if c.frontend:
                c.frontend.stop()
            for name, w in list(c.workers.items()):
                if w.proc and w.proc.poll() is not None and w.proc.returncode == -9:
                    # Killed by a test: a new run on its data directory removes what it left.
                    c.worker(name).wait_for("registered")
            for w in c.workers.values():
                w.stop()
            for n in c.nodes.values():
                n.stop()
            if c.s3:
                c.s3.stop()
            for p in c.extra:
                p.stop()
            c.net.teardown()
            deadline = time.time() + 10
            while c.net.leftovers() and time.time() < deadline:
                time.sleep(0.2)
            assert c.net.leftovers() == []
            for name in c.workers:
                assert c.containers(name) == [], f"sandboxes left by {name}"


def create(lam, name, **extra):
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        Timeout=30, Code={"ZipFile": make_zip({"app.py": CODE})}, **extra)
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def invoke(lam, name, payload):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload))
    body = json.load(r["Payload"])
    return r, body


def test_invocations_run_on_the_workers_and_status_shows_the_cluster(cluster):
    lam = cluster.client()
    create(lam, "hello")
    for i in range(5):
        r, body = invoke(lam, "hello", {"echo": i})
        assert r["StatusCode"] == 200 and "FunctionError" not in r, body
        assert body["echo"] == i
    workers = cluster.live_workers()
    assert set(workers) == {"wa", "wb"}
    # The package reached the workers through the S3 server: its chunks and manifests are there.
    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint(), region_name="us-east-1",
                      aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="hearth-e2e").get("Contents", [])]
    assert keys and all(k.startswith("chunks/") for k in keys), keys
    status = cluster.status()
    assert len(status) == 3
    part = next(p for s in status for p in s["partitions"] if p["leader"] == s["id"])
    assert part["stats"]["idle"] >= 1, part
    text = subprocess.run([_bin(), "status", "--assignment", cluster.assignment, "--partitions", "1"],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, HEARTH_CLUSTER_SECRET=SECRET)).stdout
    assert "WORKER" in text and "wa/" in text and "wb/" in text, text


def create_printer(lam, name):
    """A function that prints `RAN n` for its event's n."""
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler",
                        Role=ROLE, Timeout=30, Code={"ZipFile": make_zip({"app.py": """
def handler(event, context):
    print("RAN", event["n"])
    return event
"""})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def wait_ran(cluster, name, want, timeout):
    """Until the function's log shows every n in `want` ran."""
    log = cluster.root / "frontend" / "logs" / f"{name}.log"
    deadline = time.time() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        missing = set(want) - {int(l.split()[-1]) for l in text.splitlines() if "RAN " in l}
        if not missing:
            return
        assert time.time() < deadline, f"{len(missing)} never ran: {sorted(missing)[:20]}"
        time.sleep(0.3)


def test_asynchronous_invocations_run_on_the_workers(cluster):
    """Events accepted by the front end (202) run through the same leases on the workers."""
    lam = cluster.client()
    create_printer(lam, "events")
    for n in range(5):
        r = lam.invoke(FunctionName="events", InvocationType="Event", Payload=json.dumps({"n": n}))
        assert r["StatusCode"] == 202
    wait_ran(cluster, "events", range(5), 60)


def test_reserved_concurrency_holds_across_workers(cluster):
    lam = cluster.client()
    create(lam, "reserved")
    lam.put_function_concurrency(FunctionName="reserved", ReservedConcurrentExecutions=2)

    def call(i):
        try:
            r, body = invoke(lam, "reserved", {"sleep": 2, "echo": i})
            assert "FunctionError" not in r, body
            return ("ok", body)
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "TooManyRequestsException", e.response
            return ("throttled", None)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    ran = [b for k, b in results if k == "ok"]
    assert 1 <= len(ran) <= 2 and len(ran) + sum(k == "throttled" for k, _ in results) == 6
    # Never three at once: no instant is inside more than two runs.
    for b in ran:
        inside = sum(1 for o in ran if o["start"] <= b["start"] < o["end"])
        assert inside <= 2


SNAP_APP = """
import os, time, uuid
from snapshot_restore_py import register_after_restore
INIT_ID = str(uuid.uuid4())
RESTORES = []

@register_after_restore
def after():
    RESTORES.append(time.time())

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"init_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"], "init_id": INIT_ID,
            "restores": len(RESTORES)}
"""


def test_a_snapstart_version_restores_on_every_worker(cluster):
    """The snapshot is taken on one worker and stored in the S3 bucket; cold starts on both
    workers restore it (the same init, so the same INIT_ID)."""
    lam = cluster.client()
    lam.create_function(FunctionName="snappy", Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        MemorySize=256, Timeout=30, Code={"ZipFile": make_zip({"app.py": SNAP_APP})},
                        SnapStart={"ApplyOn": "PublishedVersions"})
    lam.get_waiter("function_active_v2").wait(FunctionName="snappy")
    v = lam.publish_version(FunctionName="snappy")["Version"]
    lam.get_waiter("published_version_active").wait(FunctionName="snappy", Qualifier=v,
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 90})
    conf = lam.get_function_configuration(FunctionName="snappy", Qualifier=v)
    assert conf["SnapStart"]["OptimizationStatus"] == "On", conf

    def call(_):
        r = lam.invoke(FunctionName="snappy", Qualifier=v, Payload=json.dumps({"sleep": 2}))
        assert "FunctionError" not in r, r["Payload"].read()
        return json.load(r["Payload"])

    busy = set()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(call, i) for i in range(2)]
        deadline = time.time() + 20
        while len(busy) < 2 and time.time() < deadline and not all(f.done() for f in futures):
            busy |= {n for n, w in cluster.live_workers().items() if w["busy"] > 0}
            time.sleep(0.2)
        outs = [f.result() for f in futures]
    assert busy == {"wa", "wb"}, f"the two cold starts ran on {busy}"
    for out in outs:
        assert out["init_type"] == "snap-start" and out["restores"] == 1, out
    assert outs[0]["init_id"] == outs[1]["init_id"], "both restored the one snapshot"


def test_a_worker_killed_mid_invocation_fails_its_caller_cleanly(cluster):
    lam = cluster.client()
    create(lam, "victim")
    invoke(lam, "victim", {})  # a warm sandbox somewhere
    # Until every worker's heartbeat says it runs nothing (reports lag by a heartbeat).
    deadline = time.time() + 10
    while any(w["busy"] for w in cluster.live_workers().values()):
        assert time.time() < deadline, cluster.live_workers()
        time.sleep(0.2)
    result = {}

    def slow():
        t = time.time()
        result["r"] = invoke(lam, "victim", {"sleep": 8})
        result["took"] = time.time() - t

    th = threading.Thread(target=slow)
    th.start()
    victim = None
    deadline = time.time() + 10
    while victim is None and time.time() < deadline:
        busy = [name for name, w in cluster.live_workers().items() if w["busy"] > 0]
        assert len(busy) <= 1, busy
        victim = busy[0] if busy else None
        time.sleep(0.1)
    assert victim, "no worker reported the invocation as busy"
    cluster.workers[victim].kill()
    th.join(timeout=30)
    assert not th.is_alive(), "the caller hangs"
    r, body = result["r"]
    assert r.get("FunctionError") == "Unhandled", body
    assert body["errorType"] == "Runtime.WorkerLost", body
    assert result["took"] < 7, "answered when the worker died, not at the invocation's end"
    # The function keeps working, on the other worker.
    for i in range(3):
        r, body = invoke(lam, "victim", {"echo": i})
        assert "FunctionError" not in r, body
    deadline = time.time() + 10
    while victim in cluster.live_workers():
        assert time.time() < deadline, "the killed worker was never declared dead"
        time.sleep(0.2)


def test_killing_the_partition_leader_loses_no_invocation(cluster):
    lam = cluster.client(read_timeout=60)
    create(lam, "steady")
    invoke(lam, "steady", {})
    leader = cluster.leader()
    assert leader
    stop = threading.Event()
    outcomes = []

    def load():
        i = 0
        while not stop.is_set():
            r, body = invoke(lam, "steady", {"echo": i})
            outcomes.append(("FunctionError" not in r) and body.get("echo") == i)
            i += 1

    th = threading.Thread(target=load)
    th.start()
    time.sleep(1)
    cluster.nodes[leader].kill()
    time.sleep(4)
    stop.set()
    th.join(timeout=60)
    assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed"
    new = cluster.leader()
    assert new and new != leader
    # The killed node restarts on its journal and catches up.
    cluster.node(leader)
    deadline = time.time() + 20
    while True:
        by_id = {s["id"]: s["partitions"][0]["last_applied"] for s in cluster.status()}
        if leader in by_id and by_id[leader] is not None and by_id[new] - by_id[leader] <= 8:
            break
        assert time.time() < deadline, f"node {leader} did not catch up: {by_id}"
        time.sleep(0.2)


def test_acknowledged_events_survive_the_leader_and_the_front_end(cluster):
    """The front end's queue of Event invocations lives in the assignment service, replicated
    with its partition: events acknowledged (202) while the partition's leader is SIGKILLed and
    then the front end itself is SIGKILLed all run once the function may run again, and the
    front end keeps no queue of its own on its disk."""
    lam = cluster.client(read_timeout=60)
    create_printer(lam, "durable")
    # Reserved concurrency 0: every attempt is throttled, so the events stay queued (throttled
    # events wait; they are never dropped).
    lam.put_function_concurrency(FunctionName="durable", ReservedConcurrentExecutions=0)
    acked, refused = [], []
    stop = threading.Event()

    def send():
        n = 0
        while not stop.is_set():
            try:
                r = lam.invoke(FunctionName="durable", InvocationType="Event",
                               Payload=json.dumps({"n": n}))
                (acked if r["StatusCode"] == 202 else refused).append(n)
            except Exception as e:  # not acknowledged: the caller would retry
                refused.append((n, str(e)))
            n += 1
            time.sleep(0.02)

    leader = cluster.leader()
    assert leader
    th = threading.Thread(target=send)
    th.start()
    time.sleep(1.5)
    cluster.nodes[leader].kill()
    time.sleep(3)
    stop.set()
    th.join(timeout=90)
    assert len(acked) >= 20, (acked, refused)
    assert not (cluster.root / "frontend" / "events.redb").exists()
    # The front end dies with every event still queued; a new one on the same data directory
    # (so the same queue name) reads the queue back from the assignment service.
    cluster.frontend.kill()
    cluster.node(leader)
    cluster.start_frontend()
    lam = cluster.client(read_timeout=60)
    lam.delete_function_concurrency(FunctionName="durable")
    wait_ran(cluster, "durable", acked, 120)


def test_the_leader_cut_off_grants_nothing_and_the_majority_serves(cluster):
    lam = cluster.client(read_timeout=60)
    create(lam, "cut")
    invoke(lam, "cut", {})
    old = cluster.leader()
    assert old
    # A second front end inside the leader's namespace: it can reach only that node.
    lone_dir = cluster.root / "lone"
    lone_ip = cluster.net.add_client_link(old)
    args = ["ip", "netns", "exec", cluster.net.ns(old), _bin(), "frontend",
            "--listen", f"{lone_ip}:9000", "--data-dir", str(lone_dir),
            "--assignment", cluster.node_addrs[old - 1], "--store", str(cluster.root / "lone-store"),
            "--partitions", "1"]
    lone = Proc("lone", args, cluster.root / "lone.log").start()
    cluster.extra.append(lone)
    lone.wait_for("hearth is up")
    env = {}
    for line in (lone_dir / "client.env").read_text().splitlines():
        k, v = line[len("export "):].split("=", 1)
        env[k] = v
    lone_lam = boto3.client(
        "lambda", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=60))
    create(lone_lam, "cut")

    cluster.net.cut(old)
    try:
        # The majority elects a new leader and serves the function.
        majority = ",".join(a for i, a in enumerate(cluster.node_addrs, 1) if i != old)
        deadline = time.time() + 15
        while True:
            new = cluster.leader(majority)
            if new and new != old:
                break
            assert time.time() < deadline, "the majority elected no leader"
            time.sleep(0.2)
        for i in range(5):
            r, body = invoke(lam, "cut", {"echo": i})
            assert "FunctionError" not in r and body["echo"] == i, body
        # The isolated node cannot commit: the front end that reaches only it gets no lease
        # (a retryable 5xx after its client's timeout, never an invocation).
        t = time.time()
        with pytest.raises(botocore.exceptions.ClientError) as err:
            lone_lam.invoke(FunctionName="cut", Payload=b"{}")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] >= 500, err.value.response
        assert time.time() - t >= 5
    finally:
        cluster.net.heal(old)
    # Healed, the old leader rejoins as a follower and catches up.
    deadline = time.time() + 20
    while True:
        by_id = {s["id"]: s["partitions"][0] for s in cluster.status()}
        if old in by_id and by_id[old]["leader"] == new and by_id[old]["last_applied"] is not None \
                and by_id[new]["last_applied"] - by_id[old]["last_applied"] <= 8:
            break
        assert time.time() < deadline, f"node {old} did not rejoin: {by_id}"
        time.sleep(0.2)


def test_the_capacity_manager_keeps_the_fleet_at_its_minimum(tmp_path):
    """One assignment node (on loopback) that starts its own workers: `--workers-min 1`
    starts one; SIGKILLed, it is declared dead and replaced; a front end invokes through it."""
    port = free_port()
    store = tmp_path / "store"
    worker_args = ["--assignment", f"127.0.0.1:{port}", "--store", str(store),
                   "--heartbeat-ms", "300", "--no-build-images", "--no-image-artifacts",
                   "--keep-alive", "30", "--memory-budget-mb", "1024", "--prewarm-per-kind", "0"]
    if os.environ.get("HEARTH_IMAGE_CACHE"):
        worker_args += ["--image-cache", os.environ["HEARTH_IMAGE_CACHE"]]
    if os.environ.get("HEARTH_AGENT"):
        worker_args += ["--agent", os.environ["HEARTH_AGENT"]]
    node = Proc("node", [_bin(), "assignment", "--id", "1", "--listen", f"127.0.0.1:{port}",
                         "--data-dir", str(tmp_path / "node"), "--partitions", "1",
                         "--initialize", f"1=127.0.0.1:{port}", "--heartbeat-ms", "50",
                         "--worker-dead-ms", "1500", "--workers-min", "1", "--workers-max", "1",
                         "--worker-args", " ".join(worker_args)],
                tmp_path / "node.log").start()
    fe_dir = tmp_path / "fe"
    fe = Proc("frontend", [_bin(), "frontend", "--listen", "127.0.0.1:0", "--data-dir", str(fe_dir),
                           "--assignment", f"127.0.0.1:{port}", "--store", str(store),
                           "--partitions", "1"], tmp_path / "fe.log")
    assignment = f"127.0.0.1:{port}"

    def workers():
        cp = subprocess.run([_bin(), "status", "--assignment", assignment, "--partitions", "1", "--json"],
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, HEARTH_CLUSTER_SECRET=SECRET))
        try:
            return [w["id"] for s in json.loads(cp.stdout) if "error" not in s for w in s["workers"]]
        except ValueError:
            return []

    def wait_workers(pred, what, timeout=60):
        deadline = time.time() + timeout
        while True:
            ids = workers()
            if pred(ids):
                return ids
            assert time.time() < deadline, f"{what}: {ids}; {node.tail()}"
            time.sleep(0.3)

    try:
        first = wait_workers(lambda ids: len(ids) == 1, "the first worker")[0]
        assert first.startswith("n1-1/")
        fe.start()
        fe.wait_for("hearth is up")
        env = dict(l[len("export "):].split("=", 1) for l in (fe_dir / "client.env").read_text().splitlines())
        lam = boto3.client("lambda", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                           aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                           config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=60))
        create(lam, "managed")
        r, body = invoke(lam, "managed", {"echo": 1})
        assert "FunctionError" not in r and body["echo"] == 1, body
        # Kill the managed worker: the manager notices it exited or was declared dead, and
        # starts another (at most --workers-max at any time).
        pid = int(subprocess.run(["pgrep", "-f", "--", "--name n1-1 "], capture_output=True,
                                 text=True).stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        second = wait_workers(lambda ids: len(ids) == 1 and ids[0].startswith("n1-2/"), "a replacement")
        assert second
        r, body = invoke(lam, "managed", {"echo": 2})
        assert "FunctionError" not in r and body["echo"] == 2, body
    finally:
        fe.stop()
        node.stop()  # stops the workers it started (SIGTERM: each removes its sandboxes)
        deadline = time.time() + 60
        while subprocess.run(["pgrep", "-f", f"--data-dir {tmp_path}/node/workers/"],
                             capture_output=True).returncode == 0:
            assert time.time() < deadline, "managed workers left running"
            time.sleep(0.2)
        # The SIGKILLed worker's sandboxes: a worker run on its data directory removes them.
        killed = tmp_path / "node" / "workers" / "n1-1"
        cleanup = Proc("cleanup", [_bin(), "worker", "--name", "cleanup", "--data-dir", str(killed),
                                   "--listen", f"127.0.0.1:{free_port()}", *worker_args[:2],
                                   *worker_args[2:]], tmp_path / "cleanup.log").start()
        cleanup.wait_for("sandboxes ready", timeout=60)  # the clean-up at start has run
        cleanup.stop()
        for d in (tmp_path / "node" / "workers").iterdir():
            if d.is_dir():
                cp = subprocess.run(["runsc", "--root", str(d / "runsc"), "list", "-quiet"],
                                    capture_output=True, text=True)
                assert cp.stdout.split() == [], f"sandboxes left in {d}"
