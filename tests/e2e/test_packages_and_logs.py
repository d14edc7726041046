"""Deployment packages as boto3 sees them, and the server's own log (issue 7, items 1, 2, 6, 7).

- A package hearth will not unpack is a 400 `InvalidParameterValueException` with Lambda's
  message, on the first attempt: boto3 retries 5xx, so a 5xx meant four more uploads.
- `GetFunction`'s `Code.Location` downloads the zip with no credentials at all (plain urllib),
  its bytes hash to `CodeSha256`; an altered or expired URL is refused with 403.
- `UpdateFunctionCode` with `DryRun` changes nothing.
- The server log written to a file carries no ANSI colour codes.

None of this runs a function, so no sandbox is needed."""
import base64
import hashlib
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError

from conftest import Hearth, make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda-role"
HANDLER = "def handler(event, context):\n    return event\n"
UNZIP = "Could not unzip uploaded file. Please check your file, then try to upload again."


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def retrying_client(hearth, attempts=5):
    """A client that retries as boto3 does by default (5xx and throttles), counting the HTTP
    requests it sends."""
    lam = boto3.client(
        "lambda",
        endpoint_url=hearth.endpoint,
        region_name=hearth.env["AWS_DEFAULT_REGION"],
        aws_access_key_id=hearth.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=hearth.env["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(retries={"max_attempts": attempts, "mode": "standard"}),
    )
    sent = []
    lam.meta.events.register("before-send.lambda", lambda request, **_: sent.append(request.url))
    return lam, sent


def zip_with(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info, data in entries:
            z.writestr(info, data)
    return buf.getvalue()


def symlink_info(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


BROKEN = {
    "not a zip": b"this is not a zip file",
    "truncated": make_zip({"app.py": HANDLER})[:40],
    "parent escape": zip_with([("app.py", HANDLER), ("../evil.py", "pwned")]),
    "absolute path": zip_with([("app.py", HANDLER), ("/abs/evil.py", "pwned")]),
    "link out of the tree": zip_with([("app.py", HANDLER), (symlink_info("link"), "/etc/passwd")]),
    "file and directory": zip_with([("app.py", HANDLER), ("lib", "x"), ("lib/mod.py", "y")]),
}


def create_args(name, zip_bytes):
    return dict(FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                Code={"ZipFile": zip_bytes})


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_bad_package_is_400_on_the_first_attempt(hearth, what):
    lam, sent = retrying_client(hearth)
    name = uniq("badzip")
    with pytest.raises(ClientError) as e:
        lam.create_function(**create_args(name, BROKEN[what]))
    err = e.value.response
    assert err["Error"]["Code"] == "InvalidParameterValueException", err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 400, err
    assert err["Error"]["Message"] == UNZIP, err
    assert len(sent) == 1, f"{what}: boto3 sent {len(sent)} requests"
    assert err["ResponseMetadata"].get("RetryAttempts", 0) == 0, err
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName=name)


def test_bad_package_on_update_is_400_and_changes_nothing(hearth):
    lam, sent = retrying_client(hearth)
    name = uniq("badupd")
    lam.create_function(**create_args(name, make_zip({"app.py": HANDLER})))
    before = lam.get_function_configuration(FunctionName=name)
    sent.clear()
    with pytest.raises(ClientError) as e:
        lam.update_function_code(FunctionName=name, ZipFile=BROKEN["link out of the tree"])
    err = e.value.response
    assert (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]) == \
        ("InvalidParameterValueException", 400), err
    assert len(sent) == 1
    after = lam.get_function_configuration(FunctionName=name)
    assert after["CodeSha256"] == before["CodeSha256"]
    assert after["RevisionId"] == before["RevisionId"]
    lam.delete_function(FunctionName=name)


def b64_sha256(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def fetch(url):
    """GET with nothing but the URL: no credentials, no signing. Returns (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def with_param(url, key, value):
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query[key] = value
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def test_code_location_downloads_the_package_without_credentials(hearth):
    lam = hearth.client()
    name = uniq("dl")
    # Incompressible bytes: a package of several chunk-store chunks.
    blob = hashlib.shake_256(name.encode()).digest(1_300_000)
    v1 = make_zip({"app.py": HANDLER, "blob.bin": blob})
    created = lam.create_function(**create_args(name, v1), Publish=True)
    assert created["CodeSha256"] == b64_sha256(v1)
    v2 = make_zip({"app.py": HANDLER + "# v2\n"})
    lam.update_function_code(FunctionName=name, ZipFile=v2)

    for qualifier, zip_bytes in ((None, v2), ("1", v1)):
        g = lam.get_function(FunctionName=name, **({"Qualifier": qualifier} if qualifier else {}))
        code = g["Code"]
        assert code["RepositoryType"] == "S3"
        url = code["Location"]
        assert url.startswith(hearth.endpoint + "/"), url
        assert str(hearth.data_dir) not in url and not url.startswith("file:"), url
        status, body = fetch(url)
        assert status == 200, body[:300]
        assert b64_sha256(body) == g["Configuration"]["CodeSha256"]
        assert body == zip_bytes

    # Any change to the URL is refused, and serves nothing.
    url = lam.get_function(FunctionName=name)["Code"]["Location"]
    signature = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["Signature"]
    expires = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["Expires"]
    other_hex = hashlib.sha256(v1).hexdigest()
    tampered = [
        with_param(url, "Signature", ("0" if signature[0] != "0" else "1") + signature[1:]),
        with_param(url, "Expires", str(int(expires) + 86400)),
        url.replace(hashlib.sha256(v2).hexdigest(), other_hex),
        url.split("?")[0],
    ]
    for bad in tampered:
        status, body = fetch(bad)
        assert status == 403, (bad, body[:300])
        assert json.loads(body)["Type"] == "User"
        assert body != v1 and body != v2
    lam.delete_function(FunctionName=name)


def test_an_expired_code_url_is_refused(tmp_path):
    h = Hearth(tmp_path / "data", extra_args=["--code-url-ttl", "1"]).start()
    try:
        lam = h.client()
        name = uniq("exp")
        zip_bytes = make_zip({"app.py": HANDLER})
        lam.create_function(**create_args(name, zip_bytes))
        url = lam.get_function(FunctionName=name)["Code"]["Location"]
        status, body = fetch(url)
        assert (status, body) == (200, zip_bytes)
        time.sleep(2.5)
        status, body = fetch(url)
        assert status == 403, body[:300]
        assert json.loads(body)["message"] == "Request has expired"
    finally:
        h.stop()


def test_dry_run_update_changes_nothing(hearth):
    lam = hearth.client()
    name = uniq("dry")
    zip_bytes = make_zip({"app.py": HANDLER})
    lam.create_function(**create_args(name, zip_bytes))
    before = lam.get_function(FunctionName=name)
    new = make_zip({"app.py": HANDLER + "# new\n"})
    r = lam.update_function_code(FunctionName=name, ZipFile=new, DryRun=True)
    assert r["CodeSha256"] == b64_sha256(new)
    after = lam.get_function(FunctionName=name)
    assert after["Configuration"] == before["Configuration"]
    assert fetch(after["Code"]["Location"])[1] == zip_bytes
    # The dry-run package was not stored: nothing unpacked under its digest.
    assert not (hearth.data_dir / "code" / hashlib.sha256(new).hexdigest()).exists()
    lam.delete_function(FunctionName=name)


def test_server_log_in_a_file_has_no_colour_codes(hearth):
    lam = hearth.client()
    lam.list_functions()
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName=uniq("nothing"))
    deadline = time.time() + 10
    text = ""
    while time.time() < deadline:
        text = hearth.log_path.read_text(errors="replace")
        if "request done" in text:
            break
        time.sleep(0.1)
    assert "request done" in text, text[-2000:]
    assert "\x1b[" not in text, repr(text[-500:])
