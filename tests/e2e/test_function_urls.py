"""Function URLs against a real `hearth up`: configured with boto3 and the AWS CLI, called with
Python's urllib exactly as the returned FunctionUrl says (no DNS set-up, no hearth client)."""
import base64
import json
import urllib.error
import urllib.request
import uuid

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda-role"

APP = r"""
import base64, json

def handler(event, context):
    path = event.get("rawPath")
    if path == "/plain":
        return "just text"
    if path == "/fail":
        raise RuntimeError("boom")
    if path == "/bin":
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    return {
        "statusCode": 207,
        "headers": {"content-type": "application/json", "x-echo": "yes"},
        "cookies": ["session=abc; Path=/", "theme=dark"],
        "body": json.dumps(event),
    }
"""


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def fetch(url, method="GET", headers=None, data=None):
    """(status, headers, body) of a request, errors included."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def signed_headers(hearth, url, secret=None):
    creds = Credentials(hearth.env["AWS_ACCESS_KEY_ID"], secret or hearth.env["AWS_SECRET_ACCESS_KEY"])
    req = AWSRequest(method="GET", url=url)
    SigV4Auth(creds, "lambda", hearth.env["AWS_DEFAULT_REGION"]).add_auth(req)
    return dict(req.headers.items())


@pytest.fixture(scope="module")
def fn(hearth):
    lam = hearth.client()
    name = uniq("url")
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler", Role=ROLE,
                        Code={"ZipFile": make_zip({"app.py": APP})})
    lam.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    yield name
    lam.delete_function(FunctionName=name)


def test_none_url_event_and_response(hearth, fn):
    lam = hearth.client()
    cors = {"AllowOrigins": ["https://app.example"], "AllowMethods": ["GET", "POST"],
            "AllowHeaders": ["x-custom"], "ExposeHeaders": ["x-echo"], "MaxAge": 120}
    created = lam.create_function_url_config(FunctionName=fn, AuthType="NONE", Cors=cors)
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    url = created["FunctionUrl"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/"), url
    assert created["FunctionArn"].endswith(f":function:{fn}")
    assert created["AuthType"] == "NONE"
    assert lam.get_function_url_config(FunctionName=fn)["FunctionUrl"] == url
    # The resource-policy statement that Lambda's documentation pairs with a NONE URL.
    lam.add_permission(FunctionName=fn, StatementId="FunctionURLAllowPublicAccess",
                       Action="lambda:InvokeFunctionUrl", Principal="*", FunctionUrlAuthType="NONE")
    policy = json.loads(lam.get_policy(FunctionName=fn)["Policy"])
    assert [s["Sid"] for s in policy["Statement"]] == ["FunctionURLAllowPublicAccess"]
    assert policy["Statement"][0]["Condition"] == {"StringEquals": {"lambda:FunctionUrlAuthType": "NONE"}}
    listed = lam.list_function_url_configs(FunctionName=fn)["FunctionUrlConfigs"]
    assert [c["FunctionUrl"] for c in listed] == [url]
    with pytest.raises(ClientError) as e:
        lam.create_function_url_config(FunctionName=fn, AuthType="NONE")
    assert e.value.response["Error"]["Code"] == "ResourceConflictException"
    with pytest.raises(ClientError) as e:
        lam.update_function_url_config(FunctionName=fn, InvokeMode="STREAMING")
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"

    # GET with a query, cookies and a repeated header.
    status, headers, body = fetch(
        url + "hello/world?a=1&a=2&b=x%20y",
        headers={"Cookie": "c1=v1; c2=v2", "User-Agent": "e2e-urllib", "X-Custom": "one"},
    )
    assert status == 207, body
    assert headers["x-echo"] == "yes"
    assert headers.get_all("Set-Cookie") == ["session=abc; Path=/", "theme=dark"]
    event = json.loads(body)
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/hello/world"
    assert event["rawQueryString"] == "a=1&a=2&b=x%20y"
    assert event["queryStringParameters"] == {"a": "1,2", "b": "x y"}
    assert event["cookies"] == ["c1=v1", "c2=v2"]
    assert event["headers"]["user-agent"] == "e2e-urllib"
    assert event["headers"]["x-custom"] == "one"
    assert "cookie" not in event["headers"]
    assert event["isBase64Encoded"] is False
    ctx = event["requestContext"]
    assert ctx["http"]["method"] == "GET"
    assert ctx["http"]["path"] == "/hello/world"
    assert ctx["http"]["sourceIp"] == "127.0.0.1"
    assert ctx["http"]["userAgent"] == "e2e-urllib"
    assert ctx["stage"] == "$default" and ctx["routeKey"] == "$default"
    assert ctx["accountId"] == "000000000000"
    assert len(ctx["apiId"]) == 32 and ctx["apiId"] in url
    assert ctx["requestId"] == headers["x-amzn-RequestId"]

    # POST with a binary body: base64 in the event.
    blob = bytes([0, 1, 2, 200, 255]) * 10
    status, _, body = fetch(url + "upload", method="POST", data=blob,
                            headers={"Content-Type": "application/octet-stream"})
    assert status == 207
    event = json.loads(body)
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == blob
    assert event["requestContext"]["http"]["method"] == "POST"

    # A binary response, the plain-string shortcut, a function error.
    status, headers, body = fetch(url + "bin")
    assert (status, body) == (200, bytes(range(256)))
    assert headers["content-type"] == "application/octet-stream"
    status, headers, body = fetch(url + "plain")
    assert (status, body) == (200, b"just text")
    status, _, _ = fetch(url + "fail")
    assert status == 502

    # CORS: the preflight is answered from the configuration; responses carry the headers.
    status, headers, _ = fetch(url, method="OPTIONS", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-custom"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "GET,POST"
    assert headers["access-control-allow-headers"] == "x-custom"
    assert headers["access-control-max-age"] == "120"
    status, headers, _ = fetch(url, headers={"Origin": "https://app.example"})
    assert status == 207
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-expose-headers"] == "x-echo"

    lam.delete_function_url_config(FunctionName=fn)
    status, _, _ = fetch(url)
    assert status == 403
    lam.remove_permission(FunctionName=fn, StatementId="FunctionURLAllowPublicAccess")
    with pytest.raises(ClientError) as e:
        lam.get_policy(FunctionName=fn)
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_aws_iam_url_on_an_alias(hearth, fn):
    lam = hearth.client()
    version = lam.publish_version(FunctionName=fn)["Version"]
    lam.create_alias(FunctionName=fn, Name="live", FunctionVersion=version)
    created = lam.create_function_url_config(FunctionName=fn, Qualifier="live", AuthType="AWS_IAM")
    url = created["FunctionUrl"]
    assert created["FunctionArn"].endswith(f":function:{fn}:live")
    target = url + "private?x=1"

    status, _, body = fetch(target)
    assert (status, json.loads(body)) == (403, {"Message": "Forbidden"})
    status, _, _ = fetch(target, headers=signed_headers(hearth, target, secret="not-the-secret"))
    assert status == 403

    status, _, body = fetch(target, headers=signed_headers(hearth, target))
    assert status == 207, body
    event = json.loads(body)
    assert event["rawPath"] == "/private"
    assert event["requestContext"]["authorizer"]["iam"]["accessKey"] == hearth.env["AWS_ACCESS_KEY_ID"]
    lam.delete_alias(FunctionName=fn, Name="live")
    status, _, _ = fetch(target, headers=signed_headers(hearth, target))
    assert status == 403


def test_aws_cli(hearth, fn):
    out = json.loads(hearth.cli("create-function-url-config", "--function-name", fn,
                                "--auth-type", "NONE").stdout)
    url = out["FunctionUrl"]
    got = json.loads(hearth.cli("get-function-url-config", "--function-name", fn).stdout)
    assert got["FunctionUrl"] == url and got["AuthType"] == "NONE"
    status, _, body = fetch(url + "plain")
    assert (status, body) == (200, b"just text")
    hearth.cli("delete-function-url-config", "--function-name", fn)
    cp = hearth.cli("get-function-url-config", "--function-name", fn, check=False)
    assert cp.returncode != 0 and "ResourceNotFoundException" in cp.stderr
