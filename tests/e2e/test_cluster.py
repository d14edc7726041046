"""hearth as separate processes on this machine (loopback): three `hearth assignment` nodes, two
`hearth worker`s with real runsc sandboxes, one `hearth frontend`, and an S3-compatible server
(moto) as the chunk store's origin, driven by boto3. Invocations
run on the workers under leases; reserved concurrency holds across both workers; a worker
SIGKILLed during an invocation gives its caller a clean function error and its work moves to
the other worker; the partition leader SIGKILLed, invocations go on and the node catches up
after a restart. Every process is stopped and every sandbox removed at the end."""
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


class Cluster:
    def __init__(self, root):
        self.root = Path(root)
        self.node_ports = [free_port() for _ in range(3)]
        self.assignment = ",".join(f"127.0.0.1:{p}" for p in self.node_ports)
        self.s3_port = free_port()
        self.s3 = None
        self.nodes = {}
        self.workers = {}
        self.frontend = None
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
        port = self.node_ports[i - 1]
        args = [_bin(), "assignment", "--id", str(i), "--listen", f"127.0.0.1:{port}",
                "--data-dir", str(self.root / f"node{i}"), "--partitions", "1",
                "--heartbeat-ms", "50", "--worker-dead-ms", "2000"]
        if i == 1 and not (self.root / "node1").exists():
            members = ",".join(f"{j}=127.0.0.1:{p}" for j, p in enumerate(self.node_ports, 1))
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
                "--partitions", "1", "--keep-alive", "60"]
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

    def status(self):
        cp = subprocess.run([_bin(), "status", "--assignment", self.assignment, "--partitions", "1",
                             "--json"], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, HEARTH_CLUSTER_SECRET=SECRET))
        return [s for s in json.loads(cp.stdout) if "error" not in s]

    def live_workers(self):
        for s in self.status():
            return {w["id"].split("/")[0]: w for w in s["workers"]}
        return {}

    def leader(self):
        for s in self.status():
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
