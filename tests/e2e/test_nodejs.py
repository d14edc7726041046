"""The Node.js runtimes: nodejs22.x and nodejs24.x run that major version of Node.js with AWS's
runtime interface client (aws-lambda-ric), with Lambda's handler conventions (`index.handler`
in CommonJS or an ES module, async and callback handlers), context object, errors, timeouts and
SnapStart; a Node.js runtime hearth has no image for is refused."""
import base64
import json
import uuid

import botocore.exceptions
import pytest

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
NODE = ["nodejs22.x", "nodejs24.x"]

# What a handler reports about itself, shared by the CommonJS and ES module functions.
REPORT = """
  version: process.version,
  env: process.env.AWS_EXECUTION_ENV,
  nodePath: process.env.NODE_PATH,
  taskRoot: process.env.LAMBDA_TASK_ROOT,
  initType: process.env.AWS_LAMBDA_INITIALIZATION_TYPE,
  functionName: context.functionName,
  functionVersion: context.functionVersion,
  invokedFunctionArn: context.invokedFunctionArn,
  awsRequestId: context.awsRequestId,
  memoryLimitInMB: context.memoryLimitInMB,
  logGroupName: context.logGroupName,
  logStreamName: context.logStreamName,
  remaining: context.getRemainingTimeInMillis(),
  event,
"""

COMMONJS = """
const os = require("node:os");
let calls = 0;
exports.handler = async (event, context) => {
  calls += 1;
  console.log("commonjs handler", event.echo);
  return { module: typeof require, calls, %s };
};
""" % REPORT

ESM = """
import { setTimeout as sleep } from "node:timers/promises";
const loadedAt = await sleep(1, Date.now());  // top-level await: only an ES module can
export const handler = async (event, context) => {
  return { module: typeof require, loadedAt, %s };
};
""" % REPORT

CALLBACK = """
exports.handler = (event, context, callback) => {
  setTimeout(() => callback(null, { via: "callback", echo: event.echo,
                                    requestId: context.awsRequestId }), 20);
};
"""

ERRORS = """
exports.handler = async (event) => {
  if (event.kind === "throw") {
    throw new TypeError("the input is bad: " + event.why);
  }
  if (event.kind === "sleep") {
    await new Promise((resolve) => setTimeout(resolve, event.ms));
    return "woke up";
  }
  return "fine";
};
"""


def _create(lam, name, runtime, files, handler="index.handler", **kw):
    lam.create_function(FunctionName=name, Runtime=runtime, Handler=handler, Role=ROLE,
                        Code={"ZipFile": make_zip(files)}, **kw)
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _invoke(lam, name, event, qualifier=None):
    kw = {"Qualifier": qualifier} if qualifier else {}
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event), LogType="Tail", **kw)
    return r, json.load(r["Payload"]), base64.b64decode(r["LogResult"]).decode()


def _check_report(out, r, runtime, name, memory, timeout):
    major = runtime[len("nodejs"):-len(".x")]
    assert out["version"].startswith(f"v{major}."), out["version"]
    assert out["env"] == f"AWS_Lambda_{runtime}"
    assert out["nodePath"] == (f"/opt/nodejs/node{major}/node_modules:/opt/nodejs/node_modules:"
                               "/var/runtime/node_modules:/var/runtime:/var/task")
    assert out["taskRoot"] == "/var/task"
    assert out["initType"] == "on-demand"
    assert out["functionName"] == name and out["functionVersion"] == "$LATEST"
    assert out["invokedFunctionArn"].endswith(f":function:{name}")
    assert out["awsRequestId"] == r["ResponseMetadata"]["RequestId"]
    assert str(out["memoryLimitInMB"]) == str(memory)
    assert out["logGroupName"] == f"/aws/lambda/{name}" and out["logStreamName"]
    assert 0 < out["remaining"] <= timeout * 1000, out["remaining"]


@pytest.mark.parametrize("runtime", NODE)
def test_commonjs_async_handler_with_the_context(hearth, runtime):
    lam = hearth.client()
    name = f"node-cjs-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
    _create(lam, name, runtime, {"index.js": COMMONJS}, MemorySize=256, Timeout=7)
    r, out, log = _invoke(lam, name, {"echo": "hi"})
    assert "FunctionError" not in r, out
    _check_report(out, r, runtime, name, 256, 7)
    assert out["module"] == "function" and out["calls"] == 1 and out["event"] == {"echo": "hi"}
    assert "commonjs handler hi" in log and "Init Duration:" in log
    # Warm: the same process, module state kept.
    r, out, log = _invoke(lam, name, {"echo": "again"})
    assert out["calls"] == 2 and "Init Duration:" not in log
    lam.delete_function(FunctionName=name)


@pytest.mark.parametrize("runtime", NODE)
def test_es_module_handlers_in_index_mjs_and_a_module_package(hearth, runtime):
    lam = hearth.client()
    for files in ({"index.mjs": ESM},
                  {"index.js": ESM, "package.json": json.dumps({"type": "module"})}):
        name = f"node-esm-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
        _create(lam, name, runtime, files, MemorySize=192, Timeout=5)
        r, out, _ = _invoke(lam, name, {"n": 1})
        assert "FunctionError" not in r, out
        _check_report(out, r, runtime, name, 192, 5)
        assert out["module"] == "undefined", "an ES module has no require"
        assert isinstance(out["loadedAt"], int)
        lam.delete_function(FunctionName=name)


@pytest.mark.parametrize("runtime", NODE)
def test_commonjs_in_index_cjs(hearth, runtime):
    lam = hearth.client()
    name = f"node-cjs2-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
    _create(lam, name, runtime, {"index.cjs": COMMONJS, "package.json": json.dumps({"type": "module"})})
    r, out, _ = _invoke(lam, name, {})
    assert "FunctionError" not in r, out
    assert out["module"] == "function" and out["version"].startswith(f"v{runtime[6:8]}.")
    lam.delete_function(FunctionName=name)


@pytest.mark.parametrize("runtime", NODE)
def test_node_path_finds_modules_where_lambdas_does(hearth, runtime):
    # `greet` is at /var/task/greet: not on lib/index.js's node_modules path, only on NODE_PATH
    # (whose last entry is /var/task); /opt/nodejs/... is where layers put theirs.
    lam = hearth.client()
    name = f"node-path-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
    app = ("const greet = require('greet');\n"
           "exports.handler = async () => ({ greeting: greet('node'), paths: require.resolve.paths('x') });\n")
    _create(lam, name, runtime, {"lib/index.js": app,
                                 "greet/index.js": "module.exports = (n) => `hello ${n}`;\n"},
            handler="lib/index.handler")
    r, out, _ = _invoke(lam, name, {})
    assert "FunctionError" not in r, out
    assert out["greeting"] == "hello node"
    major = runtime[6:8]
    paths = out["paths"]
    at = paths.index(f"/opt/nodejs/node{major}/node_modules")
    assert paths[at:at + 5] == [f"/opt/nodejs/node{major}/node_modules", "/opt/nodejs/node_modules",
                                "/var/runtime/node_modules", "/var/runtime", "/var/task"], paths
    lam.delete_function(FunctionName=name)


def test_callback_handlers_run_on_nodejs22_and_are_refused_on_nodejs24(hearth):
    lam = hearth.client()
    name = "node-cb22-" + uuid.uuid4().hex[:6]
    _create(lam, name, "nodejs22.x", {"index.js": CALLBACK})
    r, out, _ = _invoke(lam, name, {"echo": 42})
    assert "FunctionError" not in r, out
    assert out == {"via": "callback", "echo": 42, "requestId": r["ResponseMetadata"]["RequestId"]}
    lam.delete_function(FunctionName=name)

    # Lambda removed callback handlers in Node.js 24: its runtime client refuses them at init.
    name = "node-cb24-" + uuid.uuid4().hex[:6]
    _create(lam, name, "nodejs24.x", {"index.js": CALLBACK})
    r, out, _ = _invoke(lam, name, {"echo": 42})
    assert r["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Runtime.CallbackHandlerDeprecated", out
    assert "Node.js 24" in out["errorMessage"]
    lam.delete_function(FunctionName=name)


@pytest.mark.parametrize("runtime", NODE)
def test_an_error_and_a_timeout(hearth, runtime):
    lam = hearth.client()
    name = f"node-err-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
    _create(lam, name, runtime, {"index.js": ERRORS}, Timeout=1)
    r, out, log = _invoke(lam, name, {"kind": "throw", "why": "too short"})
    assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled"
    assert out["errorType"] == "TypeError"
    assert out["errorMessage"] == "the input is bad: too short"
    assert out["trace"][0] == "TypeError: the input is bad: too short"
    assert any("/var/task/index.js" in line for line in out["trace"][1:]), out["trace"]
    assert "the input is bad" in log
    # The error left the runtime running: the next call is warm.
    r, out, log = _invoke(lam, name, {})
    assert out == "fine" and "Init Duration:" not in log

    r, out, log = _invoke(lam, name, {"kind": "sleep", "ms": 3000})
    assert r["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in out["errorMessage"]
    # After a timeout the environment starts again.
    r, out, log = _invoke(lam, name, {"kind": "sleep", "ms": 10})
    assert out == "woke up" and "Init Duration:" in log
    lam.delete_function(FunctionName=name)


def test_an_exec_wrapper_starts_the_runtime(hearth):
    lam = hearth.client()
    name = "node-wrap-" + uuid.uuid4().hex[:6]
    wrapper = '#!/bin/bash\nexport WRAPPED="$1 ${#@}"\nexec "$@"\n'
    app = "exports.handler = async () => ({ wrapped: process.env.WRAPPED, argv: process.execArgv });\n"
    lam.create_function(FunctionName=name, Runtime="nodejs24.x", Handler="index.handler", Role=ROLE,
                        MemorySize=256,
                        Environment={"Variables": {"AWS_LAMBDA_EXEC_WRAPPER": "/var/task/wrapper.sh"}},
                        Code={"ZipFile": make_zip({"index.js": app, "wrapper.sh": wrapper},
                                                  modes={"wrapper.sh": 0o755})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    r, out, _ = _invoke(lam, name, {})
    assert "FunctionError" not in r, out
    # The wrapper got node and its arguments: V8's heap sized from the 256 MB.
    assert out["wrapped"] == "/var/lang/bin/node 8", out
    assert "--max-old-space-size=231" in out["argv"] and "--max-semi-space-size=12" in out["argv"]
    lam.delete_function(FunctionName=name)


def test_aws_cli_deploys_and_invokes_a_node_function(hearth, tmp_path):
    name = "node-cli-" + uuid.uuid4().hex[:6]
    pkg = tmp_path / "fn.zip"
    pkg.write_bytes(make_zip({"index.mjs": ESM}))
    conf = json.loads(hearth.cli("create-function", "--function-name", name, "--runtime", "nodejs24.x",
                                 "--handler", "index.handler", "--role", ROLE,
                                 "--zip-file", f"fileb://{pkg}").stdout)
    assert conf["Runtime"] == "nodejs24.x" and conf["Handler"] == "index.handler"
    hearth.cli("wait", "function-active-v2", "--function-name", name)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"from": "cli"}))
    out = tmp_path / "out.json"
    meta = json.loads(hearth.cli("invoke", "--function-name", name, "--payload", f"fileb://{event}",
                                 str(out)).stdout)
    assert meta["StatusCode"] == 200 and "FunctionError" not in meta
    result = json.loads(out.read_text())
    assert result["version"].startswith("v24.") and result["event"] == {"from": "cli"}
    hearth.cli("delete-function", "--function-name", name)


@pytest.mark.parametrize("runtime", NODE)
def test_snapstart_version_of_a_node_function_restores(hearth, runtime):
    lam = hearth.client()
    name = f"node-snap-{runtime[6:8]}-" + uuid.uuid4().hex[:6]
    app = """
const crypto = require("node:crypto");
const INIT_ID = crypto.randomUUID();
const STATE = Array.from({ length: 4 }, () => crypto.randomBytes(1 << 20));
exports.handler = async (event, context) => ({
  version: process.version, initId: INIT_ID, state: STATE.length,
  initType: process.env.AWS_LAMBDA_INITIALIZATION_TYPE, requestId: context.awsRequestId,
});
"""
    _create(lam, name, runtime, {"index.js": app}, MemorySize=256,
            SnapStart={"ApplyOn": "PublishedVersions"})
    v = lam.publish_version(FunctionName=name)["Version"]
    lam.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=v,
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    conf = lam.get_function_configuration(FunctionName=name, Qualifier=v)
    assert conf["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "On"}
    r, out, log = _invoke(lam, name, {}, qualifier=v)
    assert "FunctionError" not in r, out
    assert out["version"].startswith(f"v{runtime[6:8]}.") and out["state"] == 4
    assert out["initType"] == "snap-start"
    assert out["requestId"] == r["ResponseMetadata"]["RequestId"]
    assert "Restore Duration:" in log and "Init Duration:" not in log
    # Warm after the restore: the same restored process answers again.
    r, out2, log = _invoke(lam, name, {}, qualifier=v)
    assert out2["initId"] == out["initId"] and "Restore Duration:" not in log
    lam.delete_function(FunctionName=name)


def test_a_node_runtime_without_an_image_is_refused(hearth, tmp_path):
    lam = hearth.client()
    for runtime in ("nodejs99.x", "nodejs20.x"):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            lam.create_function(FunctionName="node-nope", Runtime=runtime, Handler="index.handler",
                                Role=ROLE, Code={"ZipFile": make_zip({"index.js": ERRORS})})
        err = e.value.response["Error"]
        assert err["Code"] == "InvalidParameterValueException"
        assert f"Value {runtime} at 'runtime' failed to satisfy constraint" in err["Message"]
        assert "nodejs22.x" in err["Message"] and "nodejs24.x" in err["Message"]
    pkg = tmp_path / "fn.zip"
    pkg.write_bytes(make_zip({"index.js": ERRORS}))
    cp = hearth.cli("create-function", "--function-name", "node-nope", "--runtime", "nodejs99.x",
                    "--handler", "index.handler", "--role", ROLE, "--zip-file", f"fileb://{pkg}",
                    check=False)
    assert cp.returncode != 0
    assert "InvalidParameterValueException" in cp.stderr and "nodejs99.x" in cp.stderr
