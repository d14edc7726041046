"""Time to first byte of a streamed response against the buffered response of the same
function, end to end through `hearth up` and boto3 (not a test: run it by hand).

    HEARTH_BIN=... HEARTH_AGENT=... HEARTH_IMAGE_CACHE=... python3 tests/e2e/bench_streaming.py [N]

Each function writes its first bytes at once, then two more pieces 500 ms apart. Streamed:
`invoke_with_response_stream`, from sending the request to the first `PayloadChunk`.
Buffered: `invoke` of the same function (the stream gathered), from sending to the whole
response. Warm sandboxes only (one untimed call first); a markdown table at the end."""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Hearth, make_zip  # noqa: E402

ROLE = "arn:aws:iam::000000000000:role/lambda"

SHELL = r"""#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS="$(mktemp)"
  curl -sS --noproxy '*' -D "$HEADERS" -o /dev/null "$API/invocation/next"
  ID="$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | cut -d' ' -f2 | tr -d '\r\n')"
  rm -f "$HEADERS"
  { printf 'first '; sleep 0.5; printf 'second '; sleep 0.5; printf 'third'; } |
    curl -sS --noproxy '*' -o /dev/null -X POST -T - -H 'Expect:' \
      -H 'Lambda-Runtime-Function-Response-Mode: streaming' -H 'Content-Type: text/plain' \
      "$API/invocation/$ID/response"
done
"""

NODE = r"""
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
exports.handler = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.write("first ");
  await sleep(500);
  responseStream.write("second ");
  await sleep(500);
  responseStream.end("third");
});
"""


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def streamed(lam, name):
    start = time.perf_counter()
    r = lam.invoke_with_response_stream(FunctionName=name, Payload=b"{}")
    first = None
    body = b""
    for ev in r["EventStream"]:
        if "PayloadChunk" in ev:
            first = first or time.perf_counter() - start
            body += ev["PayloadChunk"]["Payload"]
    assert body == b"first second third", body
    return first * 1000, (time.perf_counter() - start) * 1000


def buffered(lam, name):
    start = time.perf_counter()
    r = lam.invoke(FunctionName=name, Payload=b"{}")
    body = r["Payload"].read()
    assert body == b"first second third" and "FunctionError" not in r, body
    return (time.perf_counter() - start) * 1000


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    functions = [("provided.al2023 (shell + curl)", "ttfb-sh", "provided.al2023",
                  {"bootstrap": SHELL}, "function.handler")]
    image_cache = Path(__import__("os").environ.get("HEARTH_IMAGE_CACHE", ""))
    if (image_cache / "nodejs22.x").exists():
        functions.append(("nodejs22.x (streamifyResponse)", "ttfb-node", "nodejs22.x",
                          {"index.js": NODE}, "index.handler"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-stream-") as d:
        h = Hearth(d).start()
        try:
            lam = h.client()
            for label, name, runtime, files, handler in functions:
                lam.create_function(FunctionName=name, Runtime=runtime, Handler=handler,
                                    Role=ROLE, Code={"ZipFile": make_zip(files)}, Timeout=10,
                                    MemorySize=256)
                lam.get_waiter("function_active_v2").wait(FunctionName=name)
                streamed(lam, name)  # warm up
                ttfb, total, buf = [], [], []
                for _ in range(n):
                    f, t = streamed(lam, name)
                    ttfb.append(f)
                    total.append(t)
                    buf.append(buffered(lam, name))
                rows.append((label, ttfb, total, buf))
        finally:
            h.stop()
    print(f"\n{n} warm calls each, interleaved (streamed, buffered, streamed, ...)\n")
    print("| function | streamed: first byte (p50 / p90) | streamed: last byte (p50) "
          "| buffered: whole response = first byte (p50 / p90) |")
    print("|---|---|---|---|")
    for label, ttfb, total, buf in rows:
        print(f"| {label} | {statistics.median(ttfb):.0f} / {pct(ttfb, 90):.0f} ms "
              f"| {statistics.median(total):.0f} ms "
              f"| {statistics.median(buf):.0f} / {pct(buf, 90):.0f} ms |")
    print(json.dumps({label: {"ttfb": ttfb, "buffered": buf} for label, ttfb, _, buf in rows}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
