"""Asynchronous invocation through the real server: boto3's `InvocationType="Event"`, the
event-invoke configuration, retries with back-off, destinations with Lambda's record, the
failed-events store and its re-drive from the CLI, age expiry, throttled events, and a server
SIGKILLed repeatedly while events flow (every acknowledged event must run)."""
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import botocore.exceptions
import pytest

from conftest import Hearth, _bin, make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
ARN = "arn:aws:lambda:us-east-1:000000000000:function:"

# Prints one line per attempt; fails while FAIL=1 in its environment.
WORKER = """
import json, os, time
def handler(event, context):
    print("ATTEMPT " + json.dumps({"id": context.aws_request_id, "t": time.time(), "event": event}))
    time.sleep(event.get("sleep", 0))
    if os.environ.get("FAIL") == "1":
        raise RuntimeError("asked to fail")
    return {"done": event.get("n")}
"""
# Prints every record it receives.
SINK = """
import json
def handler(event, context):
    print("RECORD " + json.dumps(event))
    return "ok"
"""

RETRY_DELAY = 2


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="hearth-e2e-async-") as d:
        h = Hearth(d, extra_args=["--async-retry-delay", str(RETRY_DELAY)]).start()
        try:
            yield h
        finally:
            h.stop()


def _create(lam, name, code, env=None):
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE, Timeout=30,
                        Code={"ZipFile": make_zip({"app.py": code})},
                        Environment={"Variables": env or {}})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _lines(h, name, tag):
    path = Path(h.data_dir, "logs", f"{name}.log")
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        i = line.find(tag + " ")
        if i >= 0:
            try:
                out.append(json.loads(line[i + len(tag) + 1:]))
            except ValueError:
                pass
    return out


def _wait(what, f, timeout=90):
    deadline = time.time() + timeout
    while True:
        v = f()
        if v:
            return v
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _cli(h, *args):
    env = dict(os.environ)
    env.update(h.env)
    return subprocess.run([_bin(), *args], env=env, capture_output=True, text=True, timeout=120)


def _event(lam, name, payload, **kw):
    r = lam.invoke(FunctionName=name, InvocationType="Event", Payload=json.dumps(payload), **kw)
    assert r["StatusCode"] == 202, r
    assert r["Payload"].read() == b""
    return r["ResponseMetadata"]["RequestId"]


def test_event_is_202_runs_once_with_its_request_id_and_413_past_1mb(server, tmp_path):
    lam = server.client()
    name = "ev-" + uuid.uuid4().hex[:8]
    _create(lam, name, WORKER)
    rid = _event(lam, name, {"n": 1})
    runs = _wait("the event to run", lambda: [a for a in _lines(server, name, "ATTEMPT") if a["id"] == rid])
    assert runs[0]["event"] == {"n": 1}
    try:
        lam.invoke(FunctionName=name, InvocationType="Event", Payload=json.dumps({"a": "x" * 1_048_576}))
        raise AssertionError("expected RequestTooLargeException")
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "RequestTooLargeException"
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    # The AWS CLI's async invoke works unmodified.
    payload = tmp_path / "event.json"
    payload.write_text('{"n": 2}')
    cp = server.cli("invoke", "--function-name", name, "--invocation-type", "Event",
                    "--payload", f"fileb://{payload}", str(tmp_path / "out"))
    assert json.loads(cp.stdout)["StatusCode"] == 202
    _wait("the CLI's event", lambda: [a for a in _lines(server, name, "ATTEMPT") if a["event"] == {"n": 2}])
    time.sleep(1)
    assert len(_lines(server, name, "ATTEMPT")) == 2, "each event ran once"
    cp = _cli(server, "fn", "status", name, "--json")
    assert cp.returncode == 0, cp.stderr
    status = json.loads(cp.stdout)["Async"]
    assert status["Succeeded"] == 2 and status["Depth"] == 0, status


def test_event_invoke_config_round_trip_and_validation(server):
    lam = server.client()
    name = "cfg-" + uuid.uuid4().hex[:8]
    _create(lam, name, WORKER)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_event_invoke_config(FunctionName=name)
    sink = ARN + "some-sink"
    put = lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=1, MaximumEventAgeInSeconds=300,
        DestinationConfig={"OnFailure": {"Destination": sink}})
    assert put["FunctionArn"] == ARN + name + ":$LATEST"
    assert (put["MaximumRetryAttempts"], put["MaximumEventAgeInSeconds"]) == (1, 300)
    assert put["DestinationConfig"]["OnFailure"]["Destination"] == sink
    assert put["LastModified"].year >= 2024
    up = lam.update_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0)
    assert (up["MaximumRetryAttempts"], up["MaximumEventAgeInSeconds"]) == (0, 300)
    got = lam.get_function_event_invoke_config(FunctionName=name)
    assert got["MaximumRetryAttempts"] == 0 and got["DestinationConfig"]["OnFailure"]["Destination"] == sink
    for kw in ({"MaximumRetryAttempts": 3}, {"MaximumEventAgeInSeconds": 21601},
               {"DestinationConfig": {"OnSuccess": {"Destination": "arn:aws:sns:us-east-1:000000000000:t"}}}):
        with pytest.raises(lam.exceptions.InvalidParameterValueException):
            lam.put_function_event_invoke_config(FunctionName=name, **kw)
    assert lam.get_function_event_invoke_config(FunctionName=name)["MaximumRetryAttempts"] == 0
    lam.publish_version(FunctionName=name)
    lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1")
    lam.put_function_event_invoke_config(FunctionName=name, Qualifier="live", MaximumRetryAttempts=2)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.put_function_event_invoke_config(FunctionName=name, Qualifier="9", MaximumRetryAttempts=2)
    listed = lam.list_function_event_invoke_configs(FunctionName=name)["FunctionEventInvokeConfigs"]
    assert sorted(c["FunctionArn"] for c in listed) == [ARN + name + ":$LATEST", ARN + name + ":live"]
    # The AWS CLI speaks it too.
    cp = server.cli("get-function-event-invoke-config", "--function-name", name, "--qualifier", "live")
    assert json.loads(cp.stdout)["MaximumRetryAttempts"] == 2
    lam.delete_function_event_invoke_config(FunctionName=name)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_event_invoke_config(FunctionName=name)
    # DeadLetterConfig: an SQS queue ARN (a queue of the failed-events store); SNS is refused.
    dlq = "arn:aws:sqs:us-east-1:000000000000:dlq"
    conf = lam.update_function_configuration(FunctionName=name, DeadLetterConfig={"TargetArn": dlq})
    assert conf["DeadLetterConfig"]["TargetArn"] == dlq
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.update_function_configuration(FunctionName=name,
                                          DeadLetterConfig={"TargetArn": "arn:aws:sns:us-east-1:000000000000:t"})
    assert lam.get_function_configuration(FunctionName=name)["DeadLetterConfig"]["TargetArn"] == dlq


def test_retries_back_off_then_on_failure_gets_the_record_and_redrive_runs_it_again(server):
    lam = server.client()
    name = "retry-" + uuid.uuid4().hex[:8]
    sink = "sink-" + uuid.uuid4().hex[:8]
    _create(lam, name, WORKER, env={"FAIL": "1"})
    _create(lam, sink, SINK)
    lam.put_function_event_invoke_config(FunctionName=name,
                                         DestinationConfig={"OnFailure": {"Destination": ARN + sink}})
    rid = _event(lam, name, {"n": 7})
    records = _wait("the failure record", lambda: _lines(server, sink, "RECORD"), timeout=120)
    attempts = [a for a in _lines(server, name, "ATTEMPT") if a["id"] == rid]
    assert len(attempts) == 3, "the first attempt and Lambda's default two retries"
    gaps = [b["t"] - a["t"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= RETRY_DELAY * 0.9 and gaps[1] >= 2 * RETRY_DELAY * 0.9, gaps
    rec = records[0]
    assert set(rec) == {"version", "timestamp", "requestContext", "requestPayload", "responseContext",
                        "responsePayload"}, rec
    assert rec["version"] == "1.0"
    assert rec["requestContext"] == {"requestId": rid, "functionArn": ARN + name + ":$LATEST",
                                     "condition": "RetriesExhausted", "approximateInvokeCount": 3}
    assert rec["requestPayload"] == {"n": 7}
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                      "functionError": "Unhandled"}
    assert rec["responsePayload"]["errorMessage"] == "asked to fail"
    assert rec["responsePayload"]["errorType"] == "RuntimeError"

    # The failed-events store has it; the CLI lists, shows and re-drives it.
    cp = _cli(server, "events", "list", "--function", name)
    assert cp.returncode == 0 and rid in cp.stdout and "RetriesExhausted" in cp.stdout, cp.stdout + cp.stderr
    cp = _cli(server, "events", "show", rid)
    shown = json.loads(cp.stdout)
    assert shown["Record"]["requestContext"]["requestId"] == rid and shown["Attempts"] == 3
    status = json.loads(_cli(server, "fn", "status", name, "--json").stdout)["Async"]
    assert status["Retried"] == 2 and status["Failed"] == 1 and status["FailedEventsStored"] == 1, status
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"FAIL": "0"}})
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)
    cp = _cli(server, "events", "redrive", rid)
    assert cp.returncode == 0, cp.stderr
    new_id = cp.stdout.split("->")[1].strip()
    runs = _wait("the re-driven event", lambda: [a for a in _lines(server, name, "ATTEMPT") if a["id"] == new_id])
    assert runs[0]["event"] == {"n": 7}
    cp = _cli(server, "events", "list", "--function", name)
    assert rid not in cp.stdout


def test_on_success_record_and_throttled_events_all_run(server):
    lam = server.client()
    name = "thr-" + uuid.uuid4().hex[:8]
    sink = "sink-" + uuid.uuid4().hex[:8]
    _create(lam, name, WORKER)
    _create(lam, sink, SINK)
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=1)
    lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0,
                                         DestinationConfig={"OnSuccess": {"Destination": ARN + sink}})
    ids = [_event(lam, name, {"n": i, "sleep": 0.3}) for i in range(12)]
    status = json.loads(_cli(server, "fn", "status", name, "--json").stdout)["Async"]
    assert status["Depth"] > 0, status
    records = _wait("every success record", lambda: (lambda r: r if len(r) >= 12 else None)(
        _lines(server, sink, "RECORD")), timeout=120)
    assert sorted(r["requestContext"]["requestId"] for r in records) == sorted(ids)
    rec = next(r for r in records if r["requestContext"]["requestId"] == ids[0])
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["requestContext"]["approximateInvokeCount"] == 1
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert rec["responsePayload"] == {"done": 0}
    # One at a time (reserved concurrency 1): attempts never overlapped.
    starts = sorted(a["t"] for a in _lines(server, name, "ATTEMPT"))
    assert len(starts) == 12, "throttled events were retried, never dropped or duplicated"
    assert all(b - a >= 0.29 for a, b in zip(starts, starts[1:])), starts
    status = json.loads(_cli(server, "fn", "status", name, "--json").stdout)["Async"]
    assert status["Throttled"] > 0 and status["Failed"] == 0 and status["Depth"] == 0, status


def test_an_event_older_than_its_maximum_age_goes_to_on_failure_unrun(server):
    lam = server.client()
    name = "age-" + uuid.uuid4().hex[:8]
    sink = "sink-" + uuid.uuid4().hex[:8]
    _create(lam, name, WORKER)
    _create(lam, sink, SINK)
    # Reserved concurrency 0: every attempt is throttled, so the event only ages.
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    lam.put_function_event_invoke_config(FunctionName=name, MaximumEventAgeInSeconds=60,
                                         DestinationConfig={"OnFailure": {"Destination": ARN + sink}})
    sent = time.time()
    rid = _event(lam, name, {"n": 1})
    records = _wait("the age record", lambda: _lines(server, sink, "RECORD"), timeout=120)
    assert time.time() - sent >= 60
    rec = records[0]
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestContext"]["condition"] == "EventAgeExceeded"
    assert rec["requestContext"]["approximateInvokeCount"] == 0
    assert rec["requestPayload"] == {"n": 1}
    assert not _lines(server, name, "ATTEMPT"), "it never ran"


def test_every_acknowledged_event_runs_although_the_server_is_killed_repeatedly(tmp_path):
    h = Hearth(tmp_path / "data").start()
    try:
        lam = h.client()
        name = "crash-" + uuid.uuid4().hex[:8]
        _create(lam, name, WORKER)
        acked, stop = [], threading.Event()

        def send():
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    acked.append(_event(h.client(), name, {"n": n}))
                except Exception:  # the server is down: not acknowledged, so not owed
                    time.sleep(0.1)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            for _ in range(3):
                time.sleep(3)
                h.proc.kill()
                h.proc.wait()
                h.start()
            time.sleep(2)
        finally:
            stop.set()
            sender.join(timeout=60)
        assert len(acked) >= 20, f"only {len(acked)} events were acknowledged"
        missing = lambda: set(acked) - {a["id"] for a in _lines(h, name, "ATTEMPT")}
        _wait(f"every acknowledged event to run ({len(acked)})", lambda: not missing(), timeout=180)
        ran = [a["id"] for a in _lines(h, name, "ATTEMPT")]
        dupes = len(ran) - len(set(ran))
        assert dupes <= 3 * 32, f"{dupes} duplicates: at most the attempts in flight at each kill"
    finally:
        h.stop()


def test_metrics_show_queue_depth_age_and_outcomes_per_function(tmp_path):
    """`--metrics-listen` serves Prometheus text without authentication; the API's
    `/hearth/v1/metrics` (and `hearth metrics`) serves the same behind SigV4 only."""
    import socket
    import urllib.error
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = Hearth(tmp_path / "data", extra_args=["--metrics-listen", f"127.0.0.1:{port}",
                                              "--async-retry-delay", "1"]).start()
    try:
        lam = h.client()
        _create(lam, "metered", WORKER)
        _create(lam, "failing", WORKER, env={"FAIL": "1"})
        lam.put_function_concurrency(FunctionName="metered", ReservedConcurrentExecutions=1)
        lam.put_function_event_invoke_config(FunctionName="failing", MaximumRetryAttempts=0)
        for n in range(4):
            _event(lam, "metered", {"n": n, "sleep": 1})
        _event(lam, "failing", {"n": 0})

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = r.read().decode()
            values = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    k, v = line.rsplit(" ", 1)
                    values[k] = float(v)
            return values

        # While the reserved function works through its backlog: a queue, and an age.
        m = _wait("a backlog", lambda: (lambda v: v if v.get('hearth_async_queue_depth{function="metered"}', 0) >= 2 else None)(scrape()))
        assert m['hearth_async_oldest_event_age_seconds{function="metered"}'] > 0
        m = _wait("all done", lambda: (lambda v: v if v.get('hearth_async_succeeded_total{function="metered"}') == 4
                                       and v.get('hearth_async_failed_total{function="failing"}') == 1 else None)(scrape()))
        assert m['hearth_async_queue_depth{function="metered"}'] == 0
        assert m['hearth_async_oldest_event_age_seconds{function="metered"}'] == 0
        assert m['hearth_async_retried_total{function="failing"}'] == 0
        # Behind SigV4 on the API's address: the CLI signs; an unsigned request is refused.
        cp = _cli(h, "metrics", "--data-dir", str(h.data_dir))
        assert cp.returncode == 0, cp.stderr
        assert 'hearth_async_succeeded_total{function="metered"} 4' in cp.stdout
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{h.endpoint}/hearth/v1/metrics", timeout=10)
        assert e.value.code == 403
    finally:
        h.stop()
