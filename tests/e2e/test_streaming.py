"""Response streaming end to end: a custom runtime (a shell `bootstrap` that streams with curl's
chunked upload from a pipe, three chunks a second apart) and Node.js's
`awslambda.streamifyResponse`, read through boto3's `invoke_with_response_stream` (whose
event-stream parser checks every CRC) and through a `RESPONSE_STREAM` function URL. The first
bytes must arrive while the function is still running."""
import base64
import http.client
import json
import os
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"

# Streams what the event asks for: the body comes from a pipe, so curl sends each piece as a
# chunk as soon as it is written (`-T -`: chunked upload of unknown length).
BOOTSTRAP = r"""#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
stream() {
  curl -sS --noproxy '*' -o /dev/null -X POST -T - -H 'Expect:' \
    -H 'Lambda-Runtime-Function-Response-Mode: streaming' -H "Content-Type: $1" \
    "$API/invocation/$ID/response"
}
three() { printf 'one '; sleep 1; printf 'two '; sleep 1; printf 'three'; }
while true; do
  HEADERS="$(mktemp)"
  EVENT="$(curl -sS --noproxy '*' -D "$HEADERS" "$API/invocation/next")"
  ID="$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | cut -d' ' -f2 | tr -d '\r\n')"
  rm -f "$HEADERS"
  echo "streaming for $ID"
  case "$EVENT" in
    *'"mode":"truncate"'*)
      # curl is killed mid-body: the stream breaks off after its first bytes.
      ( printf 'partial'; sleep 3 ) | timeout -s KILL 1 curl -sS --noproxy '*' -o /dev/null \
        -X POST -T - -H 'Expect:' -H 'Lambda-Runtime-Function-Response-Mode: streaming' \
        "$API/invocation/$ID/response" ;;
    *'"mode":"slow"'*)
      { printf 'started '; sleep 30; } | stream text/plain ;;
    *'"rawPath":"/plain"'*)
      three | stream text/plain ;;
    *'"rawPath"'*)
      { printf '{"statusCode":201,"headers":{"x-streamed":"yes","content-type":"text/plain"},"cookies":["a=1","b=2"]}'
        printf '\0\0\0\0\0\0\0\0'; three; } | stream application/vnd.awslambda.http-integration-response ;;
    *)
      three | stream text/plain ;;
  esac
done
"""

NODE = r"""
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
exports.handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
  if (event.rawPath !== undefined) {
    responseStream = awslambda.HttpResponseStream.from(responseStream, {
      statusCode: 202, headers: {"x-node": "streamed"}, cookies: ["n=1"],
    });
  }
  if (event.mode === "throw") {
    responseStream.write("before the error ");
    await sleep(300);
    throw new Error("node broke mid-stream");
  }
  responseStream.write("one ");
  await sleep(1000);
  responseStream.write("two ");
  await sleep(1000);
  responseStream.end("three");
});
"""


def _create(lam, name, runtime, files, handler):
    lam.create_function(FunctionName=name, Runtime=runtime, Handler=handler, Role=ROLE,
                        Code={"ZipFile": make_zip(files)}, Timeout=20, MemorySize=256)
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _stream(lam, name, event, **kw):
    """Invoke with a streamed response: (chunks with their arrival times, InvokeComplete, start)."""
    start = time.monotonic()
    payload = json.dumps(event, separators=(",", ":"))
    r = lam.invoke_with_response_stream(FunctionName=name, Payload=payload, **kw)
    assert r["StatusCode"] == 200
    chunks, complete = [], None
    for ev in r["EventStream"]:
        if "PayloadChunk" in ev:
            chunks.append((time.monotonic() - start, ev["PayloadChunk"]["Payload"]))
        elif "InvokeComplete" in ev:
            complete = (time.monotonic() - start, ev["InvokeComplete"])
    assert complete is not None, "the stream ends with InvokeComplete"
    return r, chunks, complete


def _assert_streamed(chunks, complete, body):
    assert b"".join(c for _, c in chunks) == body
    first, (end, _) = chunks[0][0], complete
    # The function sleeps 2 s between its first and last bytes: the first reached the caller
    # long before the end.
    assert end - first > 1.5, (first, end)


def _url_get(url, path):
    """GET a URL path: status, headers, and (arrival time, bytes) as the body arrives."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    start = time.monotonic()
    conn.request("GET", parsed.path.rstrip("/") + path)
    resp = conn.getresponse()
    pieces = []
    while True:
        data = resp.read1(65536)
        if not data:
            break
        pieces.append((time.monotonic() - start, data))
    end = time.monotonic() - start
    conn.close()
    return resp.status, resp.headers, pieces, end


def test_a_custom_runtime_streams_through_boto3(hearth):
    lam = hearth.client()
    _create(lam, "stream-sh", "provided.al2023", {"bootstrap": BOOTSTRAP}, "function.handler")
    r, chunks, complete = _stream(lam, "stream-sh", {"mode": "three"}, LogType="Tail")
    assert r["ExecutedVersion"] == "$LATEST"
    _assert_streamed(chunks, complete, b"one two three")
    assert len(chunks) >= 3, chunks
    done = complete[1]
    assert "ErrorCode" not in done, done
    log = base64.b64decode(done["LogResult"]).decode()
    assert "streaming for" in log and "REPORT RequestId" in log

    # The same function through plain Invoke: the whole stream, buffered.
    out = lam.invoke(FunctionName="stream-sh", Payload=b"{}")
    assert "FunctionError" not in out
    assert out["Payload"].read() == b"one two three"


def test_a_stream_broken_off_ends_in_invoke_complete_with_the_error(hearth):
    lam = hearth.client()
    _create(lam, "stream-cut", "provided.al2023", {"bootstrap": BOOTSTRAP}, "function.handler")
    _, chunks, (_, done) = _stream(lam, "stream-cut", {"mode": "truncate"})
    assert b"".join(c for _, c in chunks) == b"partial"
    assert done["ErrorCode"] == "Runtime.TruncatedResponse", done
    assert json.loads(done["ErrorDetails"])["errorType"] == "Runtime.TruncatedResponse"
    # The function keeps working afterwards.
    _, chunks, (_, done) = _stream(lam, "stream-cut", {"mode": "three"})
    assert b"".join(c for _, c in chunks) == b"one two three" and "ErrorCode" not in done


def test_a_timeout_mid_stream_ends_in_invoke_complete(hearth):
    lam = hearth.client()
    lam.create_function(FunctionName="stream-slow", Runtime="provided.al2023",
                        Handler="function.handler", Role=ROLE, Timeout=2,
                        Code={"ZipFile": make_zip({"bootstrap": BOOTSTRAP})})
    lam.get_waiter("function_active_v2").wait(FunctionName="stream-slow")
    _, chunks, (end, done) = _stream(lam, "stream-slow", {"mode": "slow"})
    assert b"".join(c for _, c in chunks) == b"started "
    assert chunks[0][0] < end - 1.0, (chunks, end)
    assert done["ErrorCode"] == "Sandbox.Timedout", done
    assert "Task timed out after 2.00 seconds" in done["ErrorDetails"]


def test_errors_before_the_stream_are_lambda_errors(hearth):
    lam = hearth.client()
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke_with_response_stream(FunctionName="stream-missing", Payload=b"{}")
    _create(lam, "stream-err", "provided.al2023", {"bootstrap": BOOTSTRAP}, "function.handler")
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke_with_response_stream(FunctionName="stream-err", Payload=b"not json")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke_with_response_stream(FunctionName="stream-err", Payload=b"{}",
                                        InvocationType="Event")
    r = lam.invoke_with_response_stream(FunctionName="stream-err", Payload=b"{}",
                                        InvocationType="DryRun")
    assert r["StatusCode"] == 204


def test_a_streaming_url_sends_its_first_bytes_early(hearth):
    lam = hearth.client()
    _create(lam, "stream-url", "provided.al2023", {"bootstrap": BOOTSTRAP}, "function.handler")
    url = lam.create_function_url_config(FunctionName="stream-url", AuthType="NONE",
                                         InvokeMode="RESPONSE_STREAM")["FunctionUrl"]
    assert lam.get_function_url_config(FunctionName="stream-url")["InvokeMode"] == "RESPONSE_STREAM"
    status, headers, pieces, end = _url_get(url, "/prelude")
    assert status == 201
    assert headers["x-streamed"] == "yes" and headers["content-type"] == "text/plain"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers["transfer-encoding"] == "chunked"
    assert b"".join(p for _, p in pieces) == b"one two three"
    assert end - pieces[0][0] > 1.5, (pieces, end)

    # Without a prelude: status 200, the whole stream is the body.
    status, headers, pieces, end = _url_get(url, "/plain")
    assert status == 200 and headers["content-type"] == "text/plain"
    assert b"".join(p for _, p in pieces) == b"one two three"
    assert end - pieces[0][0] > 1.5, (pieces, end)


NODE_IMAGE = Path(os.environ.get("HEARTH_IMAGE_CACHE", "")) / "nodejs22.x"


@pytest.mark.skipif(not NODE_IMAGE.exists(), reason="the nodejs22.x image is not built")
def test_node_streamify_response(hearth):
    lam = hearth.client()
    _create(lam, "stream-node", "nodejs22.x", {"index.js": NODE}, "index.handler")
    _, chunks, complete = _stream(lam, "stream-node", {})
    _assert_streamed(chunks, complete, b"one two three")
    assert "ErrorCode" not in complete[1]

    # An exception after the first bytes: they arrive, then InvokeComplete carries the error.
    _, chunks, (_, done) = _stream(lam, "stream-node", {"mode": "throw"})
    assert b"".join(c for _, c in chunks) == b"before the error "
    assert done["ErrorCode"] == "Error", done
    assert "node broke mid-stream" in done["ErrorDetails"]

    # Through a streaming URL, with HttpResponseStream.from's prelude.
    url = lam.create_function_url_config(FunctionName="stream-node", AuthType="NONE",
                                         InvokeMode="RESPONSE_STREAM")["FunctionUrl"]
    status, headers, pieces, end = _url_get(url, "/node")
    assert status == 202 and headers["x-node"] == "streamed"
    assert headers.get_all("Set-Cookie") == ["n=1"]
    assert b"".join(p for _, p in pieces) == b"one two three"
    assert end - pieces[0][0] > 1.5, (pieces, end)
