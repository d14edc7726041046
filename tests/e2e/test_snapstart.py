"""SnapStart through the Lambda API: publishing a version with SnapStart makes it Pending
until its snapshot exists, then Active; cold starts of that version restore the snapshot and
run the runtime's after-restore hooks; an init that fails leaves the version Failed."""
import base64
import json
import uuid

import botocore.exceptions
import pytest

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
APP = """
import os, time, uuid
from snapshot_restore_py import register_after_restore
STATE = [os.urandom(1024 * 1024) for _ in range(8)]
INIT_ID = str(uuid.uuid4())
RESTORES = []

@register_after_restore
def after():
    RESTORES.append(time.time())

def handler(event, context):
    return {"init_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"], "init_id": INIT_ID,
            "restores": len(RESTORES), "state": len(STATE)}
"""


def _create(lam, name, code=APP):
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        MemorySize=256, Code={"ZipFile": make_zip({"app.py": code})},
                        SnapStart={"ApplyOn": "PublishedVersions"})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _invoke(lam, name, qualifier):
    r = lam.invoke(FunctionName=name, Qualifier=qualifier, Payload=b"{}", LogType="Tail")
    assert "FunctionError" not in r, r["Payload"].read()
    return json.load(r["Payload"]), base64.b64decode(r["LogResult"]).decode()


def test_published_version_restores_from_its_snapshot(fresh_hearth):
    lam = fresh_hearth.client()
    name = "snap-" + uuid.uuid4().hex[:8]
    _create(lam, name)
    latest = lam.get_function_configuration(FunctionName=name)
    assert latest["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "Off"}
    v = lam.publish_version(FunctionName=name)
    assert v["State"] in ("Pending", "Active")
    lam.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=v["Version"],
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    conf = lam.get_function_configuration(FunctionName=name, Qualifier=v["Version"])
    assert conf["State"] == "Active"
    assert conf["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "On"}
    # This engine checkpoints only sandboxes without network access: the version says so.
    assert "network" in conf.get("StateReason", ""), conf
    assert "StateReason" not in latest or "network" not in latest["StateReason"]

    out, log = _invoke(lam, name, v["Version"])
    assert out["init_type"] == "snap-start" and out["restores"] == 1 and out["state"] == 8
    assert "Restore Duration:" in log and "Init Duration:" not in log
    # $LATEST is not snapshotted (Lambda's rule): it boots.
    out_latest, log_latest = _invoke(lam, name, "$LATEST")
    assert out_latest["init_type"] == "on-demand" and "Init Duration:" in log_latest

    # The snapshot survives a restart of the server.
    fresh_hearth.restart()
    lam = fresh_hearth.client()
    out2, log2 = _invoke(lam, name, v["Version"])
    assert out2["init_type"] == "snap-start" and "Restore Duration:" in log2
    assert out2["init_id"] == out["init_id"], "both restored from the same snapshot"

    # Deleting the function releases its snapshots.
    lam.delete_function(FunctionName=name)
    assert not (fresh_hearth.data_dir / "snapshots" / name).exists()


def test_failed_init_marks_the_version_failed(fresh_hearth):
    lam = fresh_hearth.client()
    name = "snapfail-" + uuid.uuid4().hex[:8]
    _create(lam, name, code="import os\nif os.environ.get('AWS_LAMBDA_INITIALIZATION_TYPE') == 'snap-start':\n"
                             "    raise RuntimeError('no snapshots for me')\n"
                             "def handler(e, c):\n    return 1\n")
    v = lam.publish_version(FunctionName=name)
    with pytest.raises(botocore.exceptions.WaiterError):
        lam.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=v["Version"],
                                                         WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    conf = lam.get_function_configuration(FunctionName=name, Qualifier=v["Version"])
    assert conf["State"] == "Failed"
    assert "no snapshots for me" in conf["StateReason"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        lam.invoke(FunctionName=name, Qualifier=v["Version"], Payload=b"{}")
    assert e.value.response["Error"]["Code"] == "ResourceConflictException"
    # $LATEST still works.
    r = lam.invoke(FunctionName=name, Payload=b"{}")
    assert json.load(r["Payload"]) == 1


def test_snapstart_latest_server_option(tmp_path):
    from conftest import Hearth
    h = Hearth(tmp_path / "data", extra_args=["--snap-start-latest"]).start()
    try:
        lam = h.client()
        name = "snaplatest"
        lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                            Code={"ZipFile": make_zip({"app.py": APP})},
                            SnapStart={"ApplyOn": "PublishedVersions"})
        lam.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        out, log = _invoke(lam, name, "$LATEST")
        assert out["init_type"] == "snap-start" and "Restore Duration:" in log
    finally:
        h.stop()
