"""The Lambda REST API as boto3 and the AWS CLI see it, against a real `hearth up`.

Every call here is an unmodified client call: boto3's serializers, signers, waiters and
paginators, and `aws lambda ...` in a subprocess. Function names carry a random suffix because
the `hearth` server is shared by the whole session."""
import base64
import io
import json
import os
import subprocess
import uuid
import zipfile

import boto3
import botocore
import botocore.config
import pytest
from botocore.exceptions import ClientError

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda-role"

ECHO = """
import json, os
def handler(event, context):
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError(event["fail"])
    print("event", json.dumps(event))
    return event
"""

V2 = """
import os
def handler(event, context):
    return {"v": 2, "greeting": os.environ.get("GREETING"), "event": event}
"""

SHELL_BOOTSTRAP = r"""#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS=$(mktemp)
  EVENT=$(curl -sS --noproxy '*' -D "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  echo "shell got $REQUEST_ID"
  curl -sS --noproxy '*' -X POST "$API/invocation/$REQUEST_ID/response" \
    -d "{\"echo\": $EVENT, \"fn\": \"$AWS_LAMBDA_FUNCTION_NAME\"}" >/dev/null
done
"""


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create(lam, name, code=ECHO, **kw):
    args = dict(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                Code={"ZipFile": make_zip({"app.py": code})})
    args.update(kw)
    out = lam.create_function(**args)
    lam.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return out


def invoke(lam, name, payload, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload).encode(), **kw)
    body = r["Payload"].read()
    return r, (json.loads(body) if body else None)


def code_of(err):
    return err.response["Error"]["Code"], err.response["ResponseMetadata"]["HTTPStatusCode"]


def expect_error(code, status, fn, *args, **kw):
    with pytest.raises(ClientError) as e:
        fn(*args, **kw)
    assert code_of(e.value) == (code, status), e.value.response
    return e.value


def raw_client(hearth, key=None, secret=None, unsigned=False):
    cfg = dict(retries={"total_max_attempts": 1})
    if unsigned:
        cfg["signature_version"] = botocore.UNSIGNED
    return boto3.client(
        "lambda",
        endpoint_url=hearth.endpoint,
        region_name=hearth.env["AWS_DEFAULT_REGION"],
        aws_access_key_id=key or hearth.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or hearth.env["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(**cfg),
    )


def symlink_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", ECHO)
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def evil_zip(name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", ECHO)
        z.writestr(zipfile.ZipInfo(name), "pwned")
    return buf.getvalue()


# ---- functions ---------------------------------------------------------------------------------

def test_create_get_and_configuration(hearth):
    lam = hearth.client()
    name = uniq("cfg")
    zip_bytes = make_zip({"app.py": ECHO})
    out = lam.create_function(
        FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
        Code={"ZipFile": zip_bytes}, Description="first", Timeout=30, MemorySize=256,
        Environment={"Variables": {"GREETING": "hello"}}, Tags={"team": "core"},
    )
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert out["FunctionName"] == name
    assert out["FunctionArn"].endswith(f":function:{name}")
    assert out["FunctionArn"].startswith("arn:aws:lambda:")
    assert out["Runtime"] == "python3.11" and out["Handler"] == "app.handler" and out["Role"] == ROLE
    assert (out["Timeout"], out["MemorySize"], out["Description"]) == (30, 256, "first")
    assert out["Version"] == "$LATEST"
    assert out["CodeSize"] == len(zip_bytes)
    import hashlib
    assert out["CodeSha256"] == base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()
    assert out["Environment"]["Variables"] == {"GREETING": "hello"}
    assert out["State"] == "Active" and out["LastUpdateStatus"] == "Successful"
    assert out["PackageType"] == "Zip" and out["Architectures"] == ["x86_64"]
    assert out["LoggingConfig"]["LogGroup"] == f"/aws/lambda/{name}"
    assert out["RevisionId"]

    lam.get_waiter("function_exists").wait(FunctionName=name)
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    g = lam.get_function(FunctionName=name)
    assert g["Configuration"]["RevisionId"] == out["RevisionId"]
    assert g["Configuration"]["CodeSha256"] == out["CodeSha256"]
    assert g["Code"]["RepositoryType"] == "S3" and g["Code"]["Location"]
    assert g["Tags"] == {"team": "core"}
    c = lam.get_function_configuration(FunctionName=name)
    assert c["MemorySize"] == 256 and c["FunctionArn"] == out["FunctionArn"]
    # The function can be named by its ARN too.
    assert lam.get_function_configuration(FunctionName=out["FunctionArn"])["FunctionName"] == name
    lam.delete_function(FunctionName=name)
    expect_error("ResourceNotFoundException", 404, lam.get_function, FunctionName=name)


def test_list_functions_paginates(hearth):
    lam = hearth.client()
    prefix = uniq("page")
    names = [f"{prefix}-{i:02d}" for i in range(55)]
    zip_bytes = make_zip({"app.py": ECHO})
    for n in names:
        lam.create_function(FunctionName=n, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                            Code={"ZipFile": zip_bytes})
    try:
        pages = list(lam.get_paginator("list_functions").paginate())
        assert all(len(p["Functions"]) <= 50 for p in pages)
        assert len(pages) >= 2
        seen = [f["FunctionName"] for p in pages for f in p["Functions"] if f["FunctionName"].startswith(prefix)]
        assert sorted(seen) == names, "every function exactly once"
        assert "NextMarker" not in pages[-1]

        small = list(lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 10}))
        assert all(len(p["Functions"]) <= 10 for p in small)
        seen = [f["FunctionName"] for p in small for f in p["Functions"] if f["FunctionName"].startswith(prefix)]
        assert sorted(seen) == names

        first = lam.list_functions(MaxItems=5)
        assert len(first["Functions"]) == 5 and first["NextMarker"]
        second = lam.list_functions(MaxItems=5, Marker=first["NextMarker"])
        assert {f["FunctionName"] for f in first["Functions"]}.isdisjoint(f["FunctionName"] for f in second["Functions"])
    finally:
        for n in names:
            lam.delete_function(FunctionName=n)


def test_update_code_and_configuration_with_waiters(hearth):
    lam = hearth.client()
    name = uniq("upd")
    created = create(lam, name)
    r, body = invoke(lam, name, {"k": 1})
    assert body == {"k": 1}

    up = lam.update_function_code(FunctionName=name, ZipFile=make_zip({"app.py": V2}))
    assert up["CodeSha256"] != created["CodeSha256"]
    assert up["RevisionId"] != created["RevisionId"]
    lam.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    r, body = invoke(lam, name, {"k": 2})
    assert body == {"v": 2, "greeting": None, "event": {"k": 2}}, "new code runs after the update"

    conf = lam.update_function_configuration(
        FunctionName=name, RevisionId=up["RevisionId"], Timeout=20, MemorySize=512,
        Description="second", Environment={"Variables": {"GREETING": "hi"}},
    )
    assert (conf["Timeout"], conf["MemorySize"], conf["Description"]) == (20, 512, "second")
    lam.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    got = lam.get_function_configuration(FunctionName=name)
    assert got["Environment"]["Variables"] == {"GREETING": "hi"} and got["RevisionId"] == conf["RevisionId"]
    r, body = invoke(lam, name, {})
    assert body["greeting"] == "hi", "new configuration reaches the function"

    # Stale revisions are refused and change nothing.
    expect_error("PreconditionFailedException", 412, lam.update_function_configuration,
                 FunctionName=name, RevisionId=created["RevisionId"], Timeout=5)
    expect_error("PreconditionFailedException", 412, lam.update_function_code,
                 FunctionName=name, RevisionId=created["RevisionId"], ZipFile=make_zip({"app.py": ECHO}))
    assert lam.get_function_configuration(FunctionName=name)["Timeout"] == 20
    # Invalid configuration is refused.
    expect_error("InvalidParameterValueException", 400, lam.update_function_configuration,
                 FunctionName=name, MemorySize=20000)
    expect_error("InvalidParameterValueException", 400, lam.update_function_configuration,
                 FunctionName=name, Environment={"Variables": {"AWS_REGION": "x"}})
    lam.delete_function(FunctionName=name)


# ---- versions and aliases -------------------------------------------------------------------------

def test_versions_and_weighted_aliases(hearth):
    lam = hearth.client()
    name = uniq("ver")
    create(lam, name)
    v1 = lam.publish_version(FunctionName=name, Description="one")
    assert v1["Version"] == "1" and v1["FunctionArn"].endswith(f"{name}:1")
    assert lam.publish_version(FunctionName=name)["Version"] == "1", "nothing changed: same version"
    lam.update_function_code(FunctionName=name, ZipFile=make_zip({"app.py": V2}))
    lam.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    v2 = lam.publish_version(FunctionName=name)
    assert v2["Version"] == "2"

    versions = [v["Version"] for p in lam.get_paginator("list_versions_by_function").paginate(FunctionName=name)
                for v in p["Versions"]]
    assert versions == ["$LATEST", "1", "2"]

    r, body = invoke(lam, name, {"x": 1}, Qualifier="1")
    assert r["ExecutedVersion"] == "1" and body == {"x": 1}
    r, body = invoke(lam, f"{name}:2", {"x": 1})
    assert r["ExecutedVersion"] == "2" and body["v"] == 2

    alias = lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1",
                             RoutingConfig={"AdditionalVersionWeights": {"2": 0.5}})
    assert alias["AliasArn"].endswith(f"{name}:live")
    assert alias["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.5}
    expect_error("ResourceConflictException", 409, lam.create_alias, FunctionName=name, Name="live",
                 FunctionVersion="2")
    executed = set()
    for _ in range(40):
        r, _ = invoke(lam, name, {}, Qualifier="live")
        executed.add(r["ExecutedVersion"])
    assert executed == {"1", "2"}, "a 50/50 alias runs both versions"

    got = lam.get_alias(FunctionName=name, Name="live")
    assert got["FunctionVersion"] == "1"
    updated = lam.update_alias(FunctionName=name, Name="live", FunctionVersion="2",
                               RoutingConfig={"AdditionalVersionWeights": {}}, RevisionId=got["RevisionId"])
    assert updated["FunctionVersion"] == "2" and "RoutingConfig" not in updated
    expect_error("PreconditionFailedException", 412, lam.update_alias, FunctionName=name, Name="live",
                 FunctionVersion="1", RevisionId=got["RevisionId"])
    r, _ = invoke(lam, name, {}, Qualifier="live")
    assert r["ExecutedVersion"] == "2"
    names = [a["Name"] for p in lam.get_paginator("list_aliases").paginate(FunctionName=name) for a in p["Aliases"]]
    assert names == ["live"]

    expect_error("ResourceConflictException", 409, lam.delete_function, FunctionName=name, Qualifier="2")
    lam.delete_alias(FunctionName=name, Name="live")
    expect_error("ResourceNotFoundException", 404, lam.get_alias, FunctionName=name, Name="live")
    lam.delete_function(FunctionName=name, Qualifier="2")
    expect_error("ResourceNotFoundException", 404, lam.get_function, FunctionName=name, Qualifier="2")
    expect_error("ResourceNotFoundException", 404, lam.invoke, FunctionName=name, Qualifier="2", Payload=b"{}")
    lam.delete_function(FunctionName=name)


# ---- concurrency and account -----------------------------------------------------------------------

def test_concurrency_and_account_settings(hearth):
    lam = hearth.client()
    name = uniq("conc")
    before = lam.get_account_settings()
    limit = before["AccountLimit"]
    assert limit["CodeSizeUnzipped"] == 262144000 and limit["CodeSizeZipped"] == 52428800
    assert limit["ConcurrentExecutions"] >= 1
    zip_bytes = make_zip({"app.py": ECHO})
    create(lam, name, Code={"ZipFile": zip_bytes})
    after = lam.get_account_settings()
    assert after["AccountUsage"]["FunctionCount"] == before["AccountUsage"]["FunctionCount"] + 1
    assert after["AccountUsage"]["TotalCodeSize"] == before["AccountUsage"]["TotalCodeSize"] + len(zip_bytes)

    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName=name)
    put = lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=5)
    assert put["ReservedConcurrentExecutions"] == 5
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 5
    assert lam.get_function(FunctionName=name)["Concurrency"] == {"ReservedConcurrentExecutions": 5}
    reserved = lam.get_account_settings()["AccountLimit"]["UnreservedConcurrentExecutions"]
    assert reserved == before["AccountLimit"]["UnreservedConcurrentExecutions"] - 5
    expect_error("InvalidParameterValueException", 400, lam.put_function_concurrency, FunctionName=name,
                 ReservedConcurrentExecutions=limit["ConcurrentExecutions"])
    r, body = invoke(lam, name, {"reserved": True})
    assert body == {"reserved": True}
    lam.delete_function_concurrency(FunctionName=name)
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName=name)
    assert lam.get_account_settings()["AccountLimit"]["UnreservedConcurrentExecutions"] == \
        before["AccountLimit"]["UnreservedConcurrentExecutions"]
    lam.delete_function(FunctionName=name)


# ---- invoke ------------------------------------------------------------------------------------------

def test_invoke_request_response_dry_run_tail(hearth):
    lam = hearth.client()
    name = uniq("inv")
    create(lam, name)
    r, body = invoke(lam, name, {"hello": "world"})
    assert r["StatusCode"] == 200 and r["ExecutedVersion"] == "$LATEST"
    assert body == {"hello": "world"}
    assert "FunctionError" not in r and "LogResult" not in r
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]

    r, body = invoke(lam, name, {"tail": 1}, LogType="Tail")
    log = base64.b64decode(r["LogResult"]).decode()
    assert "START RequestId" in log and "END RequestId" in log and "REPORT RequestId" in log, log

    dry = lam.invoke(FunctionName=name, InvocationType="DryRun", Payload=b"{}")
    assert dry["StatusCode"] == 204 and dry["Payload"].read() == b""

    ctx = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    r, body = invoke(lam, name, {"ctx": True}, ClientContext=ctx)
    assert r["StatusCode"] == 200
    expect_error("InvalidRequestContentException", 400, lam.invoke, FunctionName=name, Payload=b"{}",
                 ClientContext="not base64 json!")
    expect_error("InvalidRequestContentException", 400, lam.invoke, FunctionName=name, Payload=b"not json")
    # Asynchronous invocation checks the payload the same way before it queues anything.
    expect_error("InvalidRequestContentException", 400, lam.invoke, FunctionName=name,
                 InvocationType="Event", Payload=b"not json")
    big = b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"'
    expect_error("RequestTooLargeException", 413, lam.invoke, FunctionName=name, Payload=big)
    lam.delete_function(FunctionName=name)


def test_function_error_is_http_200_with_header(hearth):
    lam = hearth.client()
    name = uniq("err")
    create(lam, name)
    r, body = invoke(lam, name, {"fail": "boom"})
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    assert "boom" in body["errorMessage"] and body["errorType"]
    lam.delete_function(FunctionName=name)


def test_provided_runtime_with_shell_bootstrap(hearth):
    lam = hearth.client()
    name = uniq("sh")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE, Handler="unused",
                        Code={"ZipFile": make_zip({"bootstrap": SHELL_BOOTSTRAP})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    r, body = invoke(lam, name, {"n": 7})
    assert "FunctionError" not in r, body
    assert body == {"echo": {"n": 7}, "fn": name}
    lam.delete_function(FunctionName=name)


# ---- errors ------------------------------------------------------------------------------------------

def test_client_errors(hearth):
    lam = hearth.client()
    name = uniq("bad")
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as e:
        lam.get_function(FunctionName=name)
    assert "Function not found" in e.value.response["Error"]["Message"]
    expect_error("ResourceNotFoundException", 404, lam.invoke, FunctionName=name, Payload=b"{}")
    expect_error("ResourceNotFoundException", 404, lam.update_function_configuration, FunctionName=name, Timeout=5)

    zip_bytes = make_zip({"app.py": ECHO})
    base = dict(FunctionName=name, Role=ROLE, Handler="app.handler", Code={"ZipFile": zip_bytes})
    for bad in (dict(Runtime="nodejs20.x"), dict(Runtime="python3.11", MemorySize=20000),
                dict(Runtime="python3.11", Timeout=901), dict(Runtime="python3.11", Role="not-a-role"),
                dict(Runtime="python3.11", Architectures=["arm64"]),
                dict(Runtime="python3.11", Environment={"Variables": {"1BAD": "x"}})):
        expect_error("InvalidParameterValueException", 400, lam.create_function, **{**base, **bad})
    expect_error("InvalidParameterValueException", 400, lam.create_function,
                 **{**base, "Runtime": "python3.11", "Code": {"S3Bucket": "bucket", "S3Key": "key.zip"}})
    for broken in (b"this is not a zip", symlink_zip(), evil_zip("../evil.py"), evil_zip("/abs/evil.py")):
        expect_error("InvalidParameterValueException", 400, lam.create_function,
                     **{**base, "Runtime": "python3.11", "Code": {"ZipFile": broken}})
    expect_error("ResourceNotFoundException", 404, lam.get_function, FunctionName=name)

    create(lam, name)
    expect_error("ResourceConflictException", 409, lam.create_function, **{**base, "Runtime": "python3.11"})
    lam.delete_function(FunctionName=name)


def test_bad_credentials_are_refused_and_change_nothing(hearth):
    name = uniq("auth")
    good = hearth.client()
    cases = [
        (hearth.client(secret="not-the-secret"), "InvalidSignatureException"),
        (raw_client(hearth, key="AKIDNOTKNOWN"), "UnrecognizedClientException"),
        (raw_client(hearth, unsigned=True), "MissingAuthenticationTokenException"),
    ]
    for client, code in cases:
        expect_error(code, 403, client.create_function, FunctionName=name, Runtime="python3.11",
                     Handler="app.handler", Role=ROLE, Code={"ZipFile": make_zip({"app.py": ECHO})})
        expect_error(code, 403, client.list_functions)
    expect_error("ResourceNotFoundException", 404, good.get_function, FunctionName=name)
    create(good, name)
    expect_error("InvalidSignatureException", 403, cases[0][0].delete_function, FunctionName=name)
    assert good.get_function(FunctionName=name)["Configuration"]["FunctionName"] == name
    good.delete_function(FunctionName=name)


# ---- persistence --------------------------------------------------------------------------------------

def test_restart_keeps_functions(fresh_hearth):
    lam = fresh_hearth.client()
    name = uniq("keep")
    create(lam, name, Environment={"Variables": {"GREETING": "kept"}})
    lam.publish_version(FunctionName=name)
    lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1")
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=3)
    before = lam.get_function(FunctionName=name)["Configuration"]

    fresh_hearth.restart()
    lam = fresh_hearth.client()
    after = lam.get_function(FunctionName=name)["Configuration"]
    for key in ("FunctionArn", "CodeSha256", "CodeSize", "RevisionId", "LastModified", "Environment", "Handler"):
        assert after[key] == before[key], key
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]] == ["$LATEST", "1"]
    assert lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"] == "1"
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 3
    r, body = invoke(lam, name, {"after": "restart"}, Qualifier="live")
    assert r["ExecutedVersion"] == "1" and body == {"after": "restart"}


# ---- the AWS CLI ----------------------------------------------------------------------------------------

def test_aws_cli_flows(hearth, tmp_path):
    name = uniq("cli")
    zpath = tmp_path / "fn.zip"
    zpath.write_bytes(make_zip({"app.py": ECHO}))
    cp = hearth.cli("create-function", "--function-name", name, "--runtime", "python3.11",
                    "--handler", "app.handler", "--role", ROLE, "--zip-file", f"fileb://{zpath}",
                    "--memory-size", "256")
    created = json.loads(cp.stdout)
    assert created["FunctionName"] == name and created["MemorySize"] == 256
    hearth.cli("wait", "function-active-v2", "--function-name", name)

    got = json.loads(hearth.cli("get-function", "--function-name", name).stdout)
    assert got["Configuration"]["CodeSha256"] == created["CodeSha256"]
    listed = json.loads(hearth.cli("list-functions").stdout)
    assert name in [f["FunctionName"] for f in listed["Functions"]]

    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"from": "cli"}))
    out = tmp_path / "out.json"
    cp = hearth.cli("invoke", "--function-name", name, "--payload", f"fileb://{payload}",
                    "--log-type", "Tail", str(out))
    meta = json.loads(cp.stdout)
    assert meta["StatusCode"] == 200 and meta["ExecutedVersion"] == "$LATEST"
    assert "START RequestId" in base64.b64decode(meta["LogResult"]).decode()
    assert json.loads(out.read_text()) == {"from": "cli"}

    payload.write_text(json.dumps({"fail": "cli boom"}))
    cp = hearth.cli("invoke", "--function-name", name, "--payload", f"fileb://{payload}", str(out))
    assert json.loads(cp.stdout)["FunctionError"] == "Unhandled"
    assert "cli boom" in json.loads(out.read_text())["errorMessage"]

    upd = json.loads(hearth.cli("update-function-configuration", "--function-name", name,
                                "--timeout", "10").stdout)
    assert upd["Timeout"] == 10
    hearth.cli("wait", "function-updated-v2", "--function-name", name)
    assert json.loads(hearth.cli("publish-version", "--function-name", name).stdout)["Version"] == "1"
    alias = json.loads(hearth.cli("create-alias", "--function-name", name, "--name", "prod",
                                  "--function-version", "1").stdout)
    assert alias["FunctionVersion"] == "1"
    conc = json.loads(hearth.cli("put-function-concurrency", "--function-name", name,
                                 "--reserved-concurrent-executions", "2").stdout)
    assert conc["ReservedConcurrentExecutions"] == 2
    settings = json.loads(hearth.cli("get-account-settings").stdout)
    assert settings["AccountLimit"]["ConcurrentExecutions"] >= 2

    cp = hearth.cli("get-function", "--function-name", name + "-missing", check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr
    cp = hearth.cli("create-function", "--function-name", name, "--runtime", "python3.11",
                    "--handler", "app.handler", "--role", ROLE, "--zip-file", f"fileb://{zpath}", check=False)
    assert cp.returncode != 0 and "ResourceConflictException" in cp.stderr

    env = dict(os.environ)
    env.update(hearth.env)
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    env.pop("AWS_PROFILE", None)
    cp = subprocess.run(["aws", "lambda", "delete-function", "--function-name", name,
                         "--endpoint-url", hearth.endpoint], env=env, capture_output=True, text=True, timeout=120)
    assert cp.returncode != 0 and "InvalidSignatureException" in cp.stderr
    hearth.cli("get-function", "--function-name", name)  # still there

    hearth.cli("delete-function", "--function-name", name)
    cp = hearth.cli("get-function", "--function-name", name, check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr
