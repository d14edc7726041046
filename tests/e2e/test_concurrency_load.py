"""Concurrency through the real server: parallel sandboxes, throttling with Lambda's 429, and a
bounded load test (loopback only) in which no request may fail."""
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions

from conftest import Hearth, make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
SLEEPER = """
import time, uuid
SANDBOX = str(uuid.uuid4())
def handler(event, context):
    start = time.time()
    time.sleep(event.get("sleep", 0))
    return {"sandbox": SANDBOX, "start": start, "end": time.time(), "echo": event.get("echo")}
"""


def _create(lam, name):
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        Timeout=30, Code={"ZipFile": make_zip({"app.py": SLEEPER})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _invoke(lam, name, payload):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload))
    assert r["StatusCode"] == 200 and "FunctionError" not in r
    return json.load(r["Payload"])


def _expect_throttle(lam, name, reason):
    """An invoke of `name` is refused with Lambda's 429, a Retry-After and this Reason."""
    try:
        lam.invoke(FunctionName=name, Payload=b"{}")
        raise AssertionError("expected TooManyRequestsException")
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "TooManyRequestsException"
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert int(e.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"]) >= 1
        assert e.response.get("Reason") == reason


def test_concurrent_invokes_run_in_parallel_in_separate_sandboxes(hearth):
    lam = hearth.client()
    name = "par-" + uuid.uuid4().hex[:8]
    _create(lam, name)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: _invoke(hearth.client(), name, {"sleep": 3, "echo": i}), range(3)))
    assert sorted(r["echo"] for r in results) == [0, 1, 2]
    assert len({r["sandbox"] for r in results}) == 3, "each concurrent invoke has its own sandbox"
    latest_start = max(r["start"] for r in results)
    earliest_end = min(r["end"] for r in results)
    assert latest_start < earliest_end, "the three invocations overlapped in time"
    lam.delete_function(FunctionName=name)


def test_reserved_concurrency_throttles_with_429_retry_after_and_reason(hearth):
    lam = hearth.client()
    name = "thr-" + uuid.uuid4().hex[:8]
    _create(lam, name)
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=1)
    slow = threading.Thread(target=lambda: _invoke(hearth.client(), name, {"sleep": 3}))
    slow.start()
    try:
        time.sleep(1.0)  # the first invocation holds the only reserved slot
        _expect_throttle(lam, name, "ReservedFunctionConcurrentInvocationLimitExceeded")
    finally:
        slow.join()
    # Reserved concurrency 0 disables the function entirely.
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    try:
        lam.invoke(FunctionName=name, Payload=b"{}")
        raise AssertionError("expected TooManyRequestsException")
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "TooManyRequestsException"
    lam.delete_function_concurrency(FunctionName=name)
    assert _invoke(lam, name, {"echo": "back"})["echo"] == "back"
    lam.delete_function(FunctionName=name)


def test_account_concurrency_limit(tmp_path):
    h = Hearth(tmp_path / "data", extra_args=["--account-concurrency", "1"]).start()
    try:
        lam = h.client()
        _create(lam, "acct")
        slow = threading.Thread(target=lambda: _invoke(h.client(), "acct", {"sleep": 3}))
        slow.start()
        try:
            time.sleep(1.0)
            try:
                lam.invoke(FunctionName="acct", Payload=b"{}")
                raise AssertionError("expected TooManyRequestsException")
            except botocore.exceptions.ClientError as e:
                assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 429
                assert e.response.get("Reason") == "ConcurrentInvocationLimitExceeded"
        finally:
            slow.join()
        assert lam.get_account_settings()["AccountLimit"]["ConcurrentExecutions"] == 1
    finally:
        h.stop()


def test_load_no_request_fails(hearth):
    """4 clients x 40 invokes, each answer checked; bounded in count and time."""
    lam = hearth.client()
    name = "load-" + uuid.uuid4().hex[:8]
    _create(lam, name)
    failures = []

    def client(k):
        c = hearth.client()
        for i in range(40):
            try:
                out = _invoke(c, name, {"echo": f"{k}-{i}"})
                if out["echo"] != f"{k}-{i}":
                    failures.append(("wrong answer", k, i, out))
            except Exception as e:  # noqa: BLE001 - every failure is recorded and reported
                failures.append(("error", k, i, repr(e)))

    deadline = time.time() + 240
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, deadline - time.time()))
    assert not any(t.is_alive() for t in threads), "load test ran past its time bound"
    assert failures == []
    lam.delete_function(FunctionName=name)


def test_scaling_rate_throttles_new_sandboxes_with_429(tmp_path):
    """`--scaling-rate 1`: one new sandbox per function per 10 s. A configuration change needs
    a new sandbox at once: 429 with Lambda's Reason, then it works once the rate allows."""
    h = Hearth(tmp_path / "data", extra_args=["--scaling-rate", "1", "--prewarm-total", "0"]).start()
    try:
        lam = h.client()
        _create(lam, "rate")
        started = time.monotonic()
        assert _invoke(lam, "rate", {"echo": 1})["echo"] == 1
        assert _invoke(lam, "rate", {"echo": 2})["echo"] == 2  # warm: no new sandbox
        lam.update_function_configuration(FunctionName="rate", Environment={"Variables": {"V": "2"}})
        lam.get_waiter("function_updated_v2").wait(FunctionName="rate")
        assert time.monotonic() - started < 10, "too slow to see the throttle"
        _expect_throttle(lam, "rate", "FunctionInvocationRateLimitExceeded")
        # Another function has its own allowance.
        _create(lam, "rate-other")
        assert _invoke(lam, "rate-other", {"echo": 3})["echo"] == 3
        # Ten seconds after the first start the function may add a sandbox again.
        time.sleep(max(0.0, started + 10.5 - time.monotonic()))
        assert _invoke(lam, "rate", {"echo": 4})["echo"] == 4
    finally:
        h.stop()


def test_a_lease_held_by_a_killed_server_does_not_throttle_after_restart(fresh_hearth):
    """The assignment service's journal outlives a SIGKILL: the lease of the invocation that
    was running must not count against reserved concurrency 1 after the restart."""
    lam = fresh_hearth.client()
    _create(lam, "kept")
    lam.put_function_concurrency(FunctionName="kept", ReservedConcurrentExecutions=1)
    t = threading.Thread(target=lambda: _try(lambda: _invoke(lam, "kept", {"sleep": 20})))
    t.start()
    time.sleep(3)  # the invocation holds the only lease
    _expect_throttle(lam, "kept", "ReservedFunctionConcurrentInvocationLimitExceeded")
    fresh_hearth.proc.kill()
    fresh_hearth.proc.wait()
    fresh_hearth.proc = None
    t.join(timeout=30)
    fresh_hearth.start()
    lam = fresh_hearth.client()
    assert _invoke(lam, "kept", {"echo": 1})["echo"] == 1


def _try(f):
    try:
        f()
    except Exception:
        pass  # the server was killed under it
