"""Layers end to end, through boto3 and the AWS CLI against `hearth up`: a python3.11 function
with two layers (a Python package from the first, an executable in /opt/bin from the second,
the second winning a path both have), /opt read-only; publish / get / get by ARN / list /
list versions / delete, the download URL; deleting a layer version in use leaves the function
working; a bad layer zip is refused as a bad code zip is; a SnapStart version with layers
restores with its /opt."""
import base64
import hashlib
import json
import urllib.request
import uuid

import botocore.exceptions
import pytest

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"

APP = """
import os, subprocess
import layerpkg
import sitepkg

def handler(event, context):
    try:
        tool = subprocess.run(["hello-tool"], capture_output=True, text=True)
        tool_out, tool_rc = tool.stdout.strip(), tool.returncode
    except FileNotFoundError:
        tool_out, tool_rc = None, None
    with open("/opt/shared.txt") as f:
        shared = f.read().strip()
    try:
        open("/opt/new-file", "w").close()
        opt_writable = True
    except OSError:
        opt_writable = False
    return {"pkg": layerpkg.WHO, "site": sitepkg.WHO, "tool": tool_out,
            "tool_rc": tool_rc, "shared": shared, "opt_writable": opt_writable}
"""

PYTHON_LAYER = {
    "python/layerpkg/__init__.py": "WHO = 'layerpkg from layer one'\n",
    "python/lib/python3.11/site-packages/sitepkg.py": "WHO = 'sitepkg from layer one'\n",
    "shared.txt": "from layer one\n",
}
BIN_LAYER = {
    "bin/hello-tool": "#!/bin/sh\necho hello from layer two\n",
    "shared.txt": "from layer two\n",
}


def _b64_sha256(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _invoke(lam, name):
    r = lam.invoke(FunctionName=name, Payload=b"{}")
    body = r["Payload"].read()
    assert "FunctionError" not in r, body
    return json.loads(body)


def test_two_layers_merge_into_opt_and_survive_deleting_a_version(hearth, tmp_path):
    lam = hearth.client()
    tag = uuid.uuid4().hex[:8]
    one, two = f"pylib-{tag}", f"tools-{tag}"
    zip_one = make_zip(PYTHON_LAYER)
    zip_two = make_zip(BIN_LAYER, modes={"bin/hello-tool": 0o755})

    # Publish (boto3 for one, the AWS CLI for the other).
    v1 = lam.publish_layer_version(LayerName=one, Description="python package",
                                   Content={"ZipFile": zip_one},
                                   CompatibleRuntimes=["python3.11"],
                                   CompatibleArchitectures=["x86_64"], LicenseInfo="MIT")
    assert v1["Version"] == 1
    assert v1["LayerVersionArn"] == f"{v1['LayerArn']}:1"
    assert v1["LayerArn"].endswith(f":layer:{one}")
    assert v1["Content"]["CodeSha256"] == _b64_sha256(zip_one)
    assert v1["Content"]["CodeSize"] == len(zip_one)
    with urllib.request.urlopen(v1["Content"]["Location"], timeout=30) as resp:
        assert resp.read() == zip_one, "Content.Location downloads the zip"
    zip_path = tmp_path / "tools.zip"
    zip_path.write_bytes(zip_two)
    cp = hearth.cli("publish-layer-version", "--layer-name", two,
                    "--zip-file", f"fileb://{zip_path}",
                    "--compatible-runtimes", "python3.11", "provided.al2023")
    v2 = json.loads(cp.stdout)
    assert v2["Version"] == 1 and v2["CompatibleRuntimes"] == ["python3.11", "provided.al2023"]

    # Get, by name and version and by ARN; list; list versions.
    got = lam.get_layer_version(LayerName=one, VersionNumber=1)
    assert got["Description"] == "python package" and got["LicenseInfo"] == "MIT"
    assert got["Content"]["CodeSha256"] == v1["Content"]["CodeSha256"]
    by_arn = lam.get_layer_version_by_arn(Arn=v1["LayerVersionArn"])
    assert by_arn["LayerVersionArn"] == v1["LayerVersionArn"]
    names = {l["LayerName"]: l for l in lam.list_layers(CompatibleRuntime="python3.11")["Layers"]}
    assert names[one]["LatestMatchingVersion"]["Version"] == 1
    assert two in names
    assert one not in {l["LayerName"] for l in lam.list_layers(CompatibleRuntime="java21")["Layers"]}
    again = lam.publish_layer_version(LayerName=one, Content={"ZipFile": zip_one},
                                      CompatibleRuntimes=["python3.11"])
    assert again["Version"] == 2
    versions = json.loads(hearth.cli("list-layer-versions", "--layer-name", one).stdout)
    assert [v["Version"] for v in versions["LayerVersions"]] == [2, 1]

    # A function with both layers, in order.
    name = f"layers-{tag}"
    arns = [v1["LayerVersionArn"], v2["LayerVersionArn"]]
    created = lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler",
                                  Role=ROLE, Code={"ZipFile": make_zip({"app.py": APP})},
                                  Layers=arns)
    assert [l["Arn"] for l in created["Layers"]] == arns
    assert [l["CodeSize"] for l in created["Layers"]] == [len(zip_one), len(zip_two)]
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    out = _invoke(lam, name)
    assert out == {
        "pkg": "layerpkg from layer one",
        "site": "sitepkg from layer one",
        "tool": "hello from layer two",
        "tool_rc": 0,
        "shared": "from layer two",
        "opt_writable": False,
    }, out

    # Deleting the layer versions in use changes nothing for the function, also on a cold start
    # (a configuration change is a new revision, hence new sandboxes).
    lam.delete_layer_version(LayerName=one, VersionNumber=1)
    lam.delete_layer_version(LayerName=two, VersionNumber=1)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        lam.get_layer_version(LayerName=one, VersionNumber=1)
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert [l["Arn"] for l in lam.get_function(FunctionName=name)["Configuration"]["Layers"]] == arns
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"COLD": "1"}})
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)
    assert _invoke(lam, name) == out
    # The deleted version cannot be given to a function anew; the remaining one can.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        lam.update_function_configuration(FunctionName=name, Layers=[v1["LayerVersionArn"]])
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    lam.update_function_configuration(FunctionName=name, Layers=[again["LayerVersionArn"]])
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)
    r = lam.invoke(FunctionName=name, Payload=b"{}")
    assert "FunctionError" not in r
    alone = json.load(r["Payload"])
    assert alone["shared"] == "from layer one" and alone["tool"] is None, alone
    lam.delete_function(FunctionName=name)
    lam.delete_layer_version(LayerName=one, VersionNumber=2)


def test_a_bad_layer_zip_is_refused_as_a_bad_code_zip(hearth):
    lam = hearth.client()
    tag = uuid.uuid4().hex[:8]
    with pytest.raises(botocore.exceptions.ClientError) as layer:
        lam.publish_layer_version(LayerName=f"bad-{tag}", Content={"ZipFile": b"not a zip at all"})
    with pytest.raises(botocore.exceptions.ClientError) as code:
        lam.create_function(FunctionName=f"bad-{tag}", Runtime="python3.11", Handler="app.handler",
                            Role=ROLE, Code={"ZipFile": b"not a zip at all"})
    assert layer.value.response["Error"]["Code"] == "InvalidParameterValueException"
    assert layer.value.response["Error"] == code.value.response["Error"]
    assert layer.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert f"bad-{tag}" not in {l["LayerName"] for l in lam.list_layers()["Layers"]}


def test_a_snapshot_of_a_function_with_layers_restores_with_its_opt(hearth):
    lam = hearth.client()
    tag = uuid.uuid4().hex[:8]
    layer = lam.publish_layer_version(LayerName=f"snaplib-{tag}",
                                      Content={"ZipFile": make_zip(PYTHON_LAYER)})
    app = ("import os, layerpkg\n"
           "def handler(event, context):\n"
           "    return {'pkg': layerpkg.WHO, 'init': os.environ['AWS_LAMBDA_INITIALIZATION_TYPE'],\n"
           "            'shared': open('/opt/shared.txt').read().strip()}\n")
    name = f"snaplayers-{tag}"
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        Code={"ZipFile": make_zip({"app.py": app})},
                        Layers=[layer["LayerVersionArn"]],
                        SnapStart={"ApplyOn": "PublishedVersions"})
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    v = lam.publish_version(FunctionName=name)["Version"]
    lam.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=v,
                                                     WaiterConfig={"Delay": 1, "MaxAttempts": 90})
    r = lam.invoke(FunctionName=name, Qualifier=v, Payload=b"{}")
    body = r["Payload"].read()
    assert "FunctionError" not in r, body
    assert json.loads(body) == {"pkg": "layerpkg from layer one", "init": "snap-start",
                                "shared": "from layer one"}
    lam.delete_function(FunctionName=name)
    lam.delete_layer_version(LayerName=f"snaplib-{tag}", VersionNumber=1)
