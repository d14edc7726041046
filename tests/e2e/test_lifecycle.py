"""The worker's life cycle seen from outside: warm reuse through the API, clean shutdown,
and recovery after `hearth up` is killed with sandboxes running."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import Hearth, make_zip, _bin

COUNTER = """
import os
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    return {"count": COUNT, "pid": os.getpid()}
"""

ROLE = "arn:aws:iam::000000000000:role/lambda"


def _create(lam, name, code=COUNTER):
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        Code={"ZipFile": make_zip({"app.py": code})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _invoke(lam, name, payload=None):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload or {}))
    assert "FunctionError" not in r, r["Payload"].read()
    return json.load(r["Payload"])


def test_warm_reuse_and_clean_shutdown(fresh_hearth):
    lam = fresh_hearth.client()
    _create(lam, "counter")
    assert _invoke(lam, "counter")["count"] == 1
    assert _invoke(lam, "counter")["count"] == 2, "second call reuses the warm sandbox"
    # The sandbox that ran, plus ready ones the pool created ahead of demand.
    assert len(fresh_hearth.runsc_containers()) >= 1
    fresh_hearth.stop()
    assert fresh_hearth.runsc_containers() == []


def test_restart_after_sigkill_removes_leftover_sandboxes(fresh_hearth):
    lam = fresh_hearth.client()
    _create(lam, "leftover")
    _invoke(lam, "leftover")
    before = fresh_hearth.runsc_containers()
    assert len(before) >= 1  # the sandbox that ran, and ready ones
    fresh_hearth.proc.send_signal(signal.SIGKILL)
    fresh_hearth.proc.wait()
    fresh_hearth.proc = None
    # The pool may have been creating a sandbox when the kill came: that one is left too.
    killed = set(fresh_hearth.runsc_containers())
    assert set(before) <= killed, "a killed server leaves its sandboxes behind"
    before = sorted(killed)
    fresh_hearth.start()
    left = set(before) & set(fresh_hearth.runsc_containers())
    assert not left, "restart removes what the killed run left"
    lam = fresh_hearth.client()
    assert _invoke(lam, "leftover")["count"] == 1, "the function survives and starts fresh"
    bundles = {p.name for p in Path(fresh_hearth.data_dir, "sandboxes").iterdir()}
    assert not bundles & set(before), "no bundle of the killed run is left"


def test_hearth_cli_deploy_invoke_ls_logs(fresh_hearth, tmp_path):
    src = tmp_path / "greeter"
    src.mkdir()
    (src / "app.py").write_text("def handler(event, context):\n    print('greeting', event.get('name'))\n"
                                "    return {'hello': event.get('name', 'world')}\n")
    env = dict(os.environ)
    env.update(fresh_hearth.env)
    run = lambda *a, **kw: subprocess.run([_bin(), *a], env=env, capture_output=True, text=True, timeout=120, **kw)
    cp = run("fn", "deploy", str(src), "--runtime", "python3.11", "--handler", "app.handler", "--memory", "256")
    assert cp.returncode == 0, cp.stderr
    assert "created greeter" in cp.stdout
    cp = run("invoke", "greeter", '{"name": "cli"}')
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {"hello": "cli"}
    cp = run("fn", "ls")
    assert cp.returncode == 0 and "greeter" in cp.stdout and "python3.11" in cp.stdout and "256" in cp.stdout
    cp = run("logs", "greeter")
    assert cp.returncode == 0, cp.stderr
    assert "greeting cli" in cp.stdout and "REPORT RequestId" in cp.stdout
    # Redeploy updates the code.
    (src / "app.py").write_text("def handler(event, context):\n    return 'v2'\n")
    cp = run("fn", "deploy", str(src))
    assert cp.returncode == 0 and "updated greeter" in cp.stdout, cp.stderr
    cp = run("invoke", "greeter")
    assert json.loads(cp.stdout) == "v2"
    # A failing function: exit code 1, the error document on stdout.
    (src / "app.py").write_text("def handler(event, context):\n    raise KeyError('k')\n")
    run("fn", "deploy", str(src))
    cp = run("invoke", "greeter", "--log")
    assert cp.returncode == 1 and "KeyError" in cp.stdout
    assert "START RequestId" in cp.stderr
    cp = run("invoke", "nosuchfn")
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr
    cp = run("fn", "rm", "greeter")
    assert cp.returncode == 0
    for args in (["--help"], ["up", "--help"], ["fn", "deploy", "--help"], ["invoke", "--help"], ["logs", "--help"],
                 ["image", "--help"], ["bench", "sandbox", "--help"]):
        cp = run(*args)
        assert cp.returncode == 0 and "Usage" in cp.stdout, args


def test_code_is_served_from_the_chunk_store(fresh_hearth):
    """Workers materialise code from the chunk store: with every unpacked copy gone, a cold
    start still runs the function; deleting the function releases its code artifact."""
    import shutil
    lam = fresh_hearth.client()
    _create(lam, "fromstore")
    assert _invoke(lam, "fromstore")["count"] == 1
    fresh_hearth.stop()
    for d in ("code", "cache/code"):
        shutil.rmtree(Path(fresh_hearth.data_dir, d), ignore_errors=True)
    fresh_hearth.start()
    lam = fresh_hearth.client()
    assert _invoke(lam, "fromstore")["count"] == 1
    assert any(Path(fresh_hearth.data_dir, "cache/code").iterdir()), "the worker cached the code"
    manifests = lambda: [p for p in Path(fresh_hearth.data_dir, "store/manifests").rglob("*") if p.is_file()]
    assert any("code" in str(p) for p in manifests())
    lam.delete_function(FunctionName="fromstore")
    assert not any("code" in str(p) for p in manifests()), "the code artifact is released"


def test_deleting_functions_lets_the_collector_free_their_chunks(fresh_hearth):
    """Code and snapshot artifacts are released on delete; `hearth store gc` then frees their
    chunks, but never chunks another function still uses."""
    lam = fresh_hearth.client()
    data = str(fresh_hearth.data_dir)
    usage = lambda: subprocess.run([_bin(), "store", "usage", "--data-dir", data], capture_output=True,
                                   text=True, check=True).stdout
    gc = lambda: subprocess.run([_bin(), "store", "gc", "--data-dir", data, "--grace-seconds", "0"],
                                capture_output=True, text=True, check=True).stdout
    chunks = lambda: int(usage().split()[1])
    shared_code = COUNTER
    _create(lam, "keep1", shared_code)
    _create(lam, "keep2", shared_code)            # the same package: stored once
    _create(lam, "gone", shared_code + "\n# different\n")
    lam.update_function_configuration(FunctionName="gone", SnapStart={"ApplyOn": "PublishedVersions"})
    lam.get_waiter("function_updated_v2").wait(FunctionName="gone")
    v = lam.publish_version(FunctionName="gone")
    lam.get_waiter("published_version_active").wait(FunctionName="gone", Qualifier=v["Version"],
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    before = chunks()
    assert before >= 3, usage()
    gc()
    assert chunks() == before, "nothing is collected while every artifact is in use"
    lam.delete_function(FunctionName="gone")
    deadline = time.time() + 10
    while time.time() < deadline and chunks() == before:
        gc()
        time.sleep(0.2)
    after = chunks()
    assert after < before - 1, f"code and snapshot chunks freed: {before} -> {after}"
    # The package keep1 and keep2 share is intact: a cold start fetches it from the store.
    shutil_dirs = [Path(data, "code"), Path(data, "cache/code")]
    fresh_hearth.stop()
    import shutil
    for d in shutil_dirs:
        shutil.rmtree(d, ignore_errors=True)
    fresh_hearth.start()
    assert _invoke(fresh_hearth.client(), "keep2")["count"] == 1


def test_invoke_without_payload_gives_the_function_an_empty_object(hearth):
    lam = hearth.client()
    _create(lam, "nopayload", "def handler(event, context):\n    return {'event': event}\n")
    r = lam.invoke(FunctionName="nopayload")
    assert "FunctionError" not in r
    assert json.load(r["Payload"]) == {"event": {}}
    lam.delete_function(FunctionName="nopayload")
