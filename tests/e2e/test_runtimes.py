"""Runtimes beyond python3.11: python3.13 runs Python 3.13 (Debian trixie's, in the image
only) with AWS's runtime interface client, boots and restores from a SnapStart snapshot."""
import json
import uuid

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
APP = """
import os, sys, time, uuid
from snapshot_restore_py import register_after_restore
INIT_ID = str(uuid.uuid4())
RESTORES = []

@register_after_restore
def after():
    RESTORES.append(time.time())

def handler(event, context):
    return {"version": list(sys.version_info[:2]), "env": os.environ["AWS_EXECUTION_ENV"],
            "init_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"], "init_id": INIT_ID,
            "restores": len(RESTORES), "request_id": context.aws_request_id,
            "echo": event.get("echo")}
"""


def test_python313_runs_python_313_and_restores_from_a_snapshot(hearth):
    lam = hearth.client()
    name = "py313-" + uuid.uuid4().hex[:8]
    lam.create_function(FunctionName=name, Runtime="python3.13", Handler="app.handler", Role=ROLE,
                        MemorySize=256, Code={"ZipFile": make_zip({"app.py": APP})},
                        SnapStart={"ApplyOn": "PublishedVersions"})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    r = lam.invoke(FunctionName=name, Payload=json.dumps({"echo": "hi"}))
    assert "FunctionError" not in r, r["Payload"].read()
    out = json.load(r["Payload"])
    assert out["version"] == [3, 13]
    assert out["env"] == "AWS_Lambda_python3.13"
    assert out["init_type"] == "on-demand" and out["echo"] == "hi"
    assert out["request_id"] == r["ResponseMetadata"]["RequestId"]

    v = lam.publish_version(FunctionName=name)["Version"]
    lam.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=v,
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 90})
    r = lam.invoke(FunctionName=name, Qualifier=v, Payload=b"{}")
    assert "FunctionError" not in r, r["Payload"].read()
    snap = json.load(r["Payload"])
    assert snap["version"] == [3, 13]
    assert snap["init_type"] == "snap-start" and snap["restores"] == 1, snap
    lam.delete_function(FunctionName=name)
