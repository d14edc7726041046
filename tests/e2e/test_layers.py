"""Layers end to end, through boto3 and the AWS CLI against `hearth up`: publish / get / get by
ARN / list / list versions / delete, the download URL, a function's Layers; deleting a layer
version in use leaves the function's configuration as it was; a bad layer zip is refused as a
bad code zip is."""
import base64
import hashlib
import json
import urllib.request
import uuid

import botocore.exceptions
import pytest

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"
APP = "def handler(event, context):\n    return 1\n"

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


def test_layer_operations_and_a_functions_layers(hearth, tmp_path):
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
    assert [l["Arn"] for l in lam.get_function(FunctionName=name)["Configuration"]["Layers"]] == arns

    # Deleting the layer versions in use leaves the function's configuration as it was.
    lam.delete_layer_version(LayerName=one, VersionNumber=1)
    lam.delete_layer_version(LayerName=two, VersionNumber=1)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        lam.get_layer_version(LayerName=one, VersionNumber=1)
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert [l["Arn"] for l in lam.get_function(FunctionName=name)["Configuration"]["Layers"]] == arns
    # The deleted version cannot be given to a function anew; the remaining one can.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        lam.update_function_configuration(FunctionName=name, Layers=[v1["LayerVersionArn"]])
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    c = lam.update_function_configuration(FunctionName=name, Layers=[again["LayerVersionArn"]])
    assert [l["Arn"] for l in c["Layers"]] == [again["LayerVersionArn"]]
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
