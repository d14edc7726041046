"""The sandbox engine seen through boto3 against a real `hearth up` (issue 7 items 3 and 4,
issue 8 item 4 and its crash-cleanup proof).

- `/tmp` is a disk of `EphemeralStorage` size, not memory: a 256 MB function with 1024 MB of
  `/tmp` writes 600 MB there (and its REPORT line's Max Memory Used does not count it); with the
  default 512 MB the same write is ENOSPC, a function error the next invocation does not feel; a
  new sandbox starts with an empty `/tmp`; a runtime exit after a big write is no OutOfMemory.
- A function printing ~300 MB does not grow the server's memory (its peak RSS, VmHWM), and the
  log still ends where the output ended (`Tail`, `hearth logs`).
- Function networking: a function reaches a test host (a network namespace this test creates,
  with an HTTP server in it), but not the hearth API on any of the worker host's addresses, not
  another sandbox, not 169.254.169.254; with `HEARTH_NETWORK=none` it reaches nothing; it has a
  resolver configuration.
- After SIGKILL of `hearth up`, a restart on the same data directory removes every namespace,
  veth, nftables table, `/tmp` loop mount and runsc container the killed run left, and a clean
  stop removes the new run's.

Every test bounds its own time; the network namespaces and veths a test creates itself are
removed by fixture finalizers; traffic goes only to loopback and to namespaces the tests (or
their servers) create."""
import base64
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import Hearth, make_zip, _bin

ROLE = "arn:aws:iam::000000000000:role/lambda"


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(lam, name, code, **kw):
    args = dict(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                Code={"ZipFile": make_zip({"app.py": code})})
    args.update(kw)
    lam.create_function(**args)
    lam.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 150})


def update_config(lam, name, **kw):
    lam.update_function_configuration(FunctionName=name, **kw)
    lam.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 150})


class Result:
    def __init__(self, r):
        self.raw = r
        self.error = r.get("FunctionError")
        body = r["Payload"].read()
        self.body = json.loads(body) if body else None
        self.log = base64.b64decode(r["LogResult"]) if "LogResult" in r else None

    def ok(self):
        assert self.error is None, f"function error {self.error}: {self.body}\n{self.log_text()}"
        return self.body

    def log_text(self):
        return (self.log or b"").decode(errors="replace")

    def report(self):
        """The REPORT line's fields: {"Max Memory Used": "123 MB", ...}."""
        lines = [l for l in self.log_text().splitlines() if l.startswith("REPORT RequestId:")]
        assert lines, f"no REPORT line in the tail:\n{self.log_text()}"
        return dict(f.split(": ", 1) for f in lines[-1].split("\t") if ": " in f)


def invoke(lam, name, payload=None, tail=True):
    kw = {"LogType": "Tail"} if tail else {}
    return Result(lam.invoke(FunctionName=name, Payload=json.dumps(payload or {}), **kw))


def sh(*args, check=True, timeout=30):
    cp = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


# --- /tmp follows EphemeralStorage (issue 7, item 3) ----------------------------------------

TMP_APP = r"""
import os

def handler(event, context):
    op = event["op"]
    st = os.statvfs("/tmp")
    info = {"tmp_total_mb": st.f_blocks * st.f_frsize // 2**20,
            "tmp_free_mb": st.f_bavail * st.f_frsize // 2**20,
            "marker": os.path.exists("/tmp/marker"),
            "entries": sorted(os.listdir("/tmp"))}
    if op == "write":
        chunk = os.urandom(2**20)
        path = "/tmp/big-" + context.aws_request_id
        with open(path, "wb") as f:
            for _ in range(event["mb"]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        info["written_mb"] = os.path.getsize(path) // 2**20
        os.remove(path)
    elif op == "exit":
        os._exit(3)
    elif op == "mark":
        with open("/tmp/marker", "w") as f:
            f.write(context.aws_request_id)
    return info
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that share it (each uses functions of its own)."""
    h = Hearth(tmp_path_factory.mktemp("engine") / "data").start()
    try:
        yield h
    finally:
        h.stop()


def test_tmp_is_a_disk_of_ephemeral_storage_size(server):
    lam = server.client(read_timeout=150)
    name = uniq("tmpdisk")
    create(lam, name, TMP_APP, MemorySize=256, Timeout=90, EphemeralStorage={"Size": 1024})
    r = invoke(lam, name, {"op": "stat"})
    body = r.ok()
    assert 1024 <= body["tmp_total_mb"] < 1024 * 1.1, f"/tmp is sized by EphemeralStorage: {body}"
    baseline = int(r.report()["Max Memory Used"].split()[0])

    # 600 MB into /tmp of a 256 MB function: /tmp is disk, not the function's memory.
    started = time.time()
    r = invoke(lam, name, {"op": "write", "mb": 600})
    assert r.ok()["written_mb"] == 600, r.body
    assert time.time() - started < 90
    used = int(r.report()["Max Memory Used"].split()[0])

    # The same function with the default 512 MB: the write is ENOSPC, a function error.
    update_config(lam, name, EphemeralStorage={"Size": 512})
    assert lam.get_function_configuration(FunctionName=name)["EphemeralStorage"] == {"Size": 512}
    r = invoke(lam, name, {"op": "write", "mb": 600})
    assert r.raw["StatusCode"] == 200
    assert r.error == "Unhandled", (r.body, r.log_text())
    assert "No space left on device" in r.body["errorMessage"], r.body
    # ... which neither the next invocation nor the platform feels.
    body = invoke(lam, name, {"op": "stat"}).ok()
    assert 512 <= body["tmp_total_mb"] < 512 * 1.1, body
    assert body["tmp_free_mb"] < 16, f"the failed write's file is still in this sandbox's /tmp: {body}"

    # A warm sandbox keeps its /tmp; a new sandbox starts with an empty one.
    invoke(lam, name, {"op": "mark"}).ok()
    assert invoke(lam, name, {"op": "stat"}).ok()["marker"], "the warm sandbox keeps /tmp"
    update_config(lam, name, Environment={"Variables": {"NEW_SANDBOX": "1"}})
    body = invoke(lam, name, {"op": "stat"}).ok()
    assert not body["marker"] and body["entries"] == [], f"a new sandbox's /tmp is empty: {body}"
    assert body["tmp_free_mb"] >= 500, body
    lam.delete_function(FunctionName=name)

    # Last (the rest above holds either way): what /tmp holds is not reported as memory.
    assert used < 256 and used - baseline < 64, (
        f"writing 600 MB to /tmp must not count as the function's memory: Max Memory Used "
        f"{baseline} MB before the write, {used} MB after it (Memory Size 256 MB)")


def test_runtime_exit_after_a_big_tmp_write_is_not_out_of_memory(server):
    """A runtime that exits on its own after filling /tmp is `Runtime.ExitError`, as without
    the write: /tmp's data is no memory the sandbox ran out of."""
    lam = server.client(read_timeout=150)
    name = uniq("tmpexit")
    create(lam, name, TMP_APP, MemorySize=256, Timeout=90, EphemeralStorage={"Size": 1024})
    assert invoke(lam, name, {"op": "write", "mb": 600}).ok()["written_mb"] == 600
    r = invoke(lam, name, {"op": "exit"})
    assert r.error == "Unhandled", r.body
    assert "exit status 3" in r.body["errorMessage"], r.body
    assert r.body["errorType"] == "Runtime.ExitError", (r.body, r.log_text())
    # A new sandbox serves the next invocation.
    assert invoke(lam, name, {"op": "stat"}).ok()["entries"] == []
    lam.delete_function(FunctionName=name)


# --- bounded memory under a log flood (issue 7, item 4) -------------------------------------

FLOOD_APP = r"""
import sys

def handler(event, context):
    line = "x" * (2**20 - 16)
    for i in range(event["lines"]):
        sys.stdout.write("flood %06d %s\n" % (i, line))
    sys.stdout.flush()
    print("FLOOD-DONE", event["lines"], flush=True)
    return {"printed_mb": event["lines"]}
"""


def vm_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_log_flood_keeps_server_memory_bounded(fresh_hearth):
    lam = fresh_hearth.client(read_timeout=150)
    name = uniq("flood")
    create(lam, name, FLOOD_APP, MemorySize=256, Timeout=120)
    invoke(lam, name, {"lines": 1}).ok()        # cold start and warm-up done before measuring
    pid = fresh_hearth.proc.pid
    before = vm_kb(pid, "VmHWM")

    started = time.time()
    r = invoke(lam, name, {"lines": 300})
    elapsed = time.time() - started
    assert r.ok() == {"printed_mb": 300}
    after = vm_kb(pid, "VmHWM")
    growth_mb = (after - before) / 1024
    assert growth_mb < 100, f"server peak RSS grew {growth_mb:.0f} MB ({before} -> {after} kB) for 300 MB of output"
    assert elapsed < 120, f"printing 300 MB took {elapsed:.0f} s"
    print(f"log flood: 300 MB in {elapsed:.1f} s, server VmHWM {before} -> {after} kB")

    # Tail: the last 4 KB, ending with this invocation's REPORT line.
    assert 0 < len(r.log) <= 4096, len(r.log)
    last = r.log_text().rstrip("\n").splitlines()[-1]
    assert last.startswith(f"REPORT RequestId: {r.raw['ResponseMetadata']['RequestId']}"), last
    assert "FLOOD-DONE 300" in r.log_text()

    # The log store has the end of the output (`hearth logs` shows the last 16 KB, from a line
    # start: the 1 MB flood lines do not fit).
    env = dict(os.environ)
    env.update(fresh_hearth.env)
    cp = subprocess.run([_bin(), "logs", name], env=env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    rid = r.raw["ResponseMetadata"]["RequestId"]
    lines = cp.stdout.rstrip("\n").splitlines()
    assert len(cp.stdout) <= 16384 and len(lines) >= 3, cp.stdout[-500:]
    assert lines[-3] == "FLOOD-DONE 300", lines[-3][:200]
    assert lines[-2].startswith(f"END RequestId: {rid}"), lines[-2][:200]
    assert lines[-1].startswith(f"REPORT RequestId: {rid}"), lines[-1][:200]
    log_file = fresh_hearth.data_dir / "logs" / f"{name}.log"
    assert log_file.stat().st_size < 8 * 2**20, f"the log file is bounded: {log_file.stat().st_size}"
    # The server still serves.
    assert invoke(lam, name, {"lines": 0}).ok() == {"printed_mb": 0}
    lam.delete_function(FunctionName=name)


# --- function networking (issue 8, item 4) --------------------------------------------------

NET_APP = r"""
import json, os, socket, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

SERVER = None

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ.get("PEER_TOKEN", "sandbox").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def fetch(url, timeout):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            out = {"reached": True, "status": r.status, "body": r.read(4096).decode(errors="replace")}
    except urllib.error.HTTPError as e:       # an HTTP answer: the server was reached
        out = {"reached": True, "status": e.code, "body": ""}
    except Exception as e:
        out = {"reached": False, "error": "%s: %s" % (type(e).__name__, e)}
    out["seconds"] = round(time.monotonic() - t, 3)
    return out

def addresses():
    # This sandbox's IPv4 address and its default gateway (the worker's side of the veth).
    gw = None
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            gw = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
    addr = None
    if gw:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((gw, 9))
            addr = s.getsockname()[0]
        finally:
            s.close()
    return addr, gw

def handler(event, context):
    global SERVER
    out = {"resolv_conf": open("/etc/resolv.conf").read()}
    out["addr"], out["gateway"] = addresses()
    if event.get("serve") and SERVER is None:
        SERVER = HTTPServer(("0.0.0.0", event["serve"]), Hello)
        threading.Thread(target=SERVER.serve_forever, daemon=True).start()
    for key, url in event.get("urls", {}).items():
        url = url.replace("{gateway}", out["gateway"] or "0.0.0.0")
        out[key] = fetch(url, event.get("timeout", 2))
    return out
"""


def _ip_in_use(prefix):
    return prefix in sh("ip", "-o", "-4", "addr", "show")


@pytest.fixture
def test_host(tmp_path):
    """A network namespace with a veth pair to the host namespace (10.199.N.0/30: the host side
    .1, the namespace side .2) and a python3 http.server inside serving a random token. Names
    avoid hearth's prefixes (hv*, hn*). Everything is removed in the finalizer."""
    tag = uuid.uuid4().hex[:6]
    netns, host_if, peer_if = f"htest{tag}", f"ht{tag}", f"hp{tag}"
    for _ in range(50):
        n = random.randrange(1, 255)
        if not _ip_in_use(f"10.199.{n}."):
            break
    host_ip, ns_ip = f"10.199.{n}.1", f"10.199.{n}.2"
    token = uuid.uuid4().hex
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text(token)
    port = random.randrange(20000, 30000)
    server = None
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", netns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "addr", "add", f"{ns_ip}/30", "dev", peer_if)
        sh("ip", "-n", netns, "link", "set", peer_if, "up")
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "python3", "-m", "http.server", str(port),
             "--bind", ns_ip, "--directory", str(www)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        url = f"http://{ns_ip}:{port}/index.html"
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    assert r.read().decode() == token
                break
            except (OSError, urllib.error.URLError):
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("the test host's http.server did not come up")
                time.sleep(0.1)
        yield {"netns": netns, "host_if": host_if, "host_ip": host_ip, "ip": ns_ip, "port": port,
               "url": url, "token": token}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", netns, check=False)
        assert netns not in sh("ip", "netns", "list"), f"test namespace {netns} left behind"


def host_primary_ip():
    """The address of the host's default-route interface (read from the routing table; no
    traffic is sent)."""
    out = sh("ip", "-o", "-4", "route", "get", "192.0.2.1")
    m = re.search(r"\bsrc (\S+)", out)
    return m.group(1) if m else None


def test_function_network_reaches_test_host_but_not_the_worker(tmp_path, test_host):
    h = Hearth(tmp_path / "data", listen_host="0.0.0.0").start()    # the API on every address
    try:
        lam = h.client()
        api = h.port
        # Control: from the test host's namespace the API answers on the host side of its veth.
        cp = subprocess.run(
            ["nsenter", f"--net=/run/netns/{test_host['netns']}", "python3", "-c",
             "import sys, urllib.request, urllib.error\n"
             "try:\n urllib.request.urlopen(sys.argv[1], timeout=3)\n"
             "except urllib.error.HTTPError as e:\n print('http', e.code)\n"
             "else:\n print('http 200')\n",
             f"http://{test_host['host_ip']}:{api}/2015-03-31/functions/"],
            capture_output=True, text=True, timeout=20)
        assert cp.stdout.startswith("http "), f"control: the API is reachable from outside sandboxes: {cp.stderr}"

        name = uniq("net")
        create(lam, name, NET_APP, Timeout=30)
        urls = {
            "test_host": test_host["url"],
            "api_via_test_veth": f"http://{test_host['host_ip']}:{api}/2015-03-31/functions/",
            "api_loopback": f"http://127.0.0.1:{api}/2015-03-31/functions/",
            "api_via_gateway": f"http://{{gateway}}:{api}/2015-03-31/functions/",
            "metadata": "http://169.254.169.254/latest/meta-data/",
        }
        primary = host_primary_ip()
        if primary:
            urls["api_via_host_ip"] = f"http://{primary}:{api}/2015-03-31/functions/"
        out = invoke(lam, name, {"urls": urls, "timeout": 2}).ok()
        print("function network:", json.dumps(out))
        assert out["test_host"]["reached"] and out["test_host"]["body"] == test_host["token"], out["test_host"]
        for key in urls:
            if key != "test_host":
                assert not out[key]["reached"], f"{key} must be unreachable from a function: {out[key]}"
                assert out[key]["seconds"] < 1.9, f"{key}: refused at once, not a timeout: {out[key]}"
        assert out["addr"] and out["addr"].startswith("10.200."), out
        assert re.search(r"(?m)^nameserver \S+", out["resolv_conf"]), out["resolv_conf"]
        # 127.0.0.1 is the sandbox's own loopback: a server the function starts there on the
        # API's port answers, not hearth.
        own = invoke(lam, name, {"serve": api, "urls": {"loopback": f"http://127.0.0.1:{api}/"}}).ok()
        assert own["loopback"]["reached"] and own["loopback"]["body"] == "sandbox", own["loopback"]

        # Another sandbox is out of reach: a second function serves HTTP from its sandbox.
        peer = uniq("netpeer")
        create(lam, peer, NET_APP, Timeout=30, Environment={"Variables": {"PEER_TOKEN": "peer"}})
        served = invoke(lam, peer, {"serve": 8080}).ok()
        assert served["addr"] and served["addr"] != out["addr"], served
        out = invoke(lam, name, {"urls": {"peer": f"http://{served['addr']}:8080/"}}).ok()
        print("another sandbox:", out["peer"])
        assert not out["peer"]["reached"], f"another sandbox must be unreachable: {out['peer']}"
        assert out["peer"]["seconds"] < 1.9, out["peer"]
        again = invoke(lam, peer, {"urls": {"self": "http://127.0.0.1:8080/"}}).ok()
        assert again["self"]["reached"] and again["self"]["body"] == "peer", \
            f"control: the peer's server is up in its own sandbox: {again}"

        # HEARTH_NETWORK=none: no way out at all, not even to the test host.
        update_config(lam, name, Environment={"Variables": {"HEARTH_NETWORK": "none"}})
        out = invoke(lam, name, {"urls": {"test_host": test_host["url"]}}).ok()
        assert not out["test_host"]["reached"], out["test_host"]
        assert out["gateway"] is None, f"no default route without a network: {out}"
        for fn in (name, peer):
            lam.delete_function(FunctionName=fn)
    finally:
        h.stop()


def test_server_network_none(tmp_path, test_host):
    """`hearth up --network none`: functions run, but reach nothing."""
    h = Hearth(tmp_path / "data", extra_args=["--network", "none"]).start()
    try:
        lam = h.client()
        name = uniq("nonet")
        create(lam, name, NET_APP, Timeout=30)
        out = invoke(lam, name, {"urls": {"test_host": test_host["url"]}}).ok()
        assert not out["test_host"]["reached"], out["test_host"]
        assert out["gateway"] is None, out
        assert _my_slots(h) == {}, "no sandbox network was made"
        assert f"hearth_{instance_of(h)}" not in _tables(), "no nftables table without egress"
    finally:
        h.stop()


# --- crash cleanup (issue 8, proof) ---------------------------------------------------------

LOCK_DIR = Path("/run/hearth/net")


def instance_of(h):
    """The network instance id hearth derives from its runsc state root (engine.rs)."""
    root = os.path.abspath(os.path.realpath(h.data_dir) + "/runsc")
    return "w" + hashlib.sha256(root.encode()).hexdigest()[:10]


def _my_slots(h):
    """{slot number: lock file text} of the slots the server's network instance recorded."""
    inst = instance_of(h)
    out = {}
    for p in LOCK_DIR.glob("slot-*"):
        try:
            text = p.read_text()
        except OSError:
            continue
        if text.split()[:1] == [inst]:
            out[int(p.name[len("slot-"):])] = text.strip()
    return out


def _netns_names():
    return {l.split()[0] for l in sh("ip", "netns", "list").splitlines() if l.strip()}


def _links():
    return {l.split(":")[1].strip().split("@")[0] for l in sh("ip", "-o", "link").splitlines()}


def _tables():
    return {l.split()[-1] for l in sh("nft", "list", "tables").splitlines() if l.startswith("table inet hearth_")}


def _set_elements(table):
    data = json.loads(sh("nft", "-j", "list", "set", "inet", table, "sandboxes"))
    for item in data["nftables"]:
        if "set" in item:
            return item["set"].get("elem", [])
    return []


def _loops(h):
    """Loop mounts and loop devices backed by files under the server's data directory."""
    data = os.path.realpath(h.data_dir)
    mounts = [l.split()[1] for l in Path("/proc/self/mounts").read_text().splitlines()
              if l.split()[1].startswith(data + "/")]
    devices = [l for l in sh("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").splitlines()
               if data + "/" in l]
    return mounts, devices


def _sandbox_processes(h):
    root = f"--root={os.path.realpath(h.data_dir)}/runsc"
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if root.encode() in cmd:
                pids.append(int(p.name))
    return pids


def _sandbox_cgroups(h):
    """Sandbox cgroup directories of the server's instance (`hearth/<instance>/<id>` under the
    cgroups this process and its children are in; cgroup v1 and v2)."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, rel = line.split(":", 2)
        if ctrls:
            base = Path("/sys/fs/cgroup") / ctrls.removeprefix("name=")
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            base = Path("/sys/fs/cgroup")
        else:
            base = Path("/sys/fs/cgroup/unified")
        parent = base / rel.lstrip("/") / "hearth" / instance_of(h)
        if parent.is_dir():
            found += [str(d) for d in parent.iterdir() if d.is_dir() and d.name.startswith("hs")]
    return found


def _hold_locks(h, slots):
    """Hold the lock files of a dead run (its instance and its slots) as a live process would:
    other servers on the machine (parallel tests) then leave its leftovers alone, so the restart
    under test is the one that removes them. Returns the open files; closing them lets go."""
    held = []
    for p in [LOCK_DIR / f"instance-{instance_of(h)}"] + [LOCK_DIR / f"slot-{n:05d}" for n in slots]:
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append(f)
    return held


def leftovers(h, old_slots):
    """What of the old run is still on the machine."""
    left = {}
    slot_files = {}
    for n in old_slots:
        p = LOCK_DIR / f"slot-{n:05d}"
        slot_files[n] = p.read_text().strip() if p.exists() else None
    names_ns, names_if = _netns_names(), _links()
    for n in old_slots:
        owner = (slot_files[n] or "").split()[:1]
        if owner and owner != [instance_of(h)]:
            continue        # another server on the machine took the slot since
        if f"hn{n:05d}" in names_ns:
            left.setdefault("netns", []).append(f"hn{n:05d}")
        if f"hv{n:05d}" in names_if:
            left.setdefault("veth", []).append(f"hv{n:05d}")
    mounts, devices = _loops(h)
    if mounts:
        left["mounts"] = mounts
    if devices:
        left["loop devices"] = devices
    cgroups = _sandbox_cgroups(h)
    if cgroups:
        left["cgroups"] = cgroups
    return left


def test_restart_after_sigkill_removes_every_leftover(tmp_path):
    h = Hearth(tmp_path / "data")
    h.start()
    held = []
    try:
        lam = h.client()
        name = uniq("crash")
        create(lam, name, TMP_APP, Timeout=30)
        invoke(lam, name, {"op": "mark"}).ok()
        # Let the ready pool refill behind the cold start (bounded), then kill the server.
        deadline, last, stable_since = time.time() + 30, None, time.time()
        while time.time() < deadline:
            now = sorted(h.runsc_containers())
            if now != last:
                last, stable_since = now, time.time()
            elif len(now) >= 2 and time.time() - stable_since > 2:
                break
            time.sleep(0.2)
        old_pids = _sandbox_processes(h)
        assert old_pids, "the sandboxes' runsc processes run"
        h.proc.send_signal(signal.SIGKILL)
        h.proc.wait()
        h.proc = None
        held = _hold_locks(h, _my_slots(h))
        time.sleep(1)       # runsc commands the server had started finish on their own
        held += _hold_locks(h, [n for n in _my_slots(h) if all(
            f.name != str(LOCK_DIR / f"slot-{n:05d}") for f in held)])

        # A killed server leaves everything behind: record what is there.
        containers = h.runsc_containers()
        slots = _my_slots(h)
        table = f"hearth_{instance_of(h)}"
        assert len(containers) >= 2, f"a warm sandbox and a ready one: {containers}"
        assert len(slots) >= len(containers), f"one network slot per sandbox: {slots} {containers}"
        assert {f"hn{n:05d}" for n in slots} <= _netns_names()
        assert {f"hv{n:05d}" for n in slots} <= _links()
        assert table in _tables()
        assert len(_set_elements(table)) == len(slots)
        mounts, devices = _loops(h)
        assert len(mounts) >= len(containers) and len(devices) >= len(containers), (mounts, devices)
        assert len(_sandbox_cgroups(h)) >= len(containers)
        assert leftovers(h, slots), "the killed run's namespaces, veths and mounts are still there"
        print(f"killed run left: {len(containers)} containers, slots {sorted(slots)}, "
              f"{len(mounts)} mounts, {len(_sandbox_cgroups(h))} cgroup dirs")

        # ... and a restart on the same data directory removes all of it.
        for f in held:
            f.close()
        held = []
        h.extra_args = ["--prewarm-per-kind", "0"]
        h.start()
        assert h.runsc_containers() == [], "the restart removed the old containers"
        left = leftovers(h, slots)
        assert left == {}, f"the restart left the killed run's resources: {left}"
        assert _my_slots(h) == {}, "no slot of the old run is recorded any more"
        assert table in _tables(), "the new run has its own table"
        assert _set_elements(table) == [], "the new table knows none of the old sandboxes"
        alive = [p for p in old_pids if Path(f"/proc/{p}").exists()]
        assert alive == [], f"the old sandboxes' processes are gone: {alive}"
        assert not any(h.data_dir.joinpath("slots").iterdir()), "old slot directories removed"

        # The function survives and starts with an empty /tmp.
        lam = h.client()
        body = invoke(lam, name, {"op": "stat"}).ok()
        assert body["marker"] is False and body["entries"] == [], body
        new_slots = _my_slots(h)
        assert len(new_slots) == 1 and len(h.runsc_containers()) == 1, (new_slots, h.runsc_containers())

        # A clean stop removes everything of this data directory.
        h.stop()
        assert h.runsc_containers() == []
        assert leftovers(h, list(slots) + list(new_slots)) == {}
        assert _my_slots(h) == {}
        assert table not in _tables(), "the table goes with a clean stop"
        assert not (LOCK_DIR / f"instance-{instance_of(h)}").exists()
        assert _sandbox_processes(h) == []
    finally:
        for f in held:
            f.close()
        h.stop()
        # A failure above may leave a killed run's sandboxes: let hearth itself remove them.
        if h.runsc_containers() or _my_slots(h) or _loops(h) != ([], []):
            try:
                h.extra_args = ["--prewarm-per-kind", "0"]
                h.start()
            finally:
                h.stop()
