"""AWS's custom-runtime tutorial, deployed unmodified: a shell `bootstrap` under `#!/bin/sh`
that uses bash (`set -o pipefail`, `source`) and the usual Amazon Linux tools (curl, grep, tr,
cut, mktemp). On Debian's dash it fails at its second line; hearth's images make `/bin/sh`
bash, as on Amazon Linux."""
import json

from conftest import make_zip

ROLE = "arn:aws:iam::000000000000:role/lambda"

# The tutorial's runtime: load the handler script named by the first part of _HANDLER, then
# loop: fetch an event, take the request id from the saved headers, call the shell function
# named by the second part of _HANDLER, post what it printed.
BOOTSTRAP = r"""#!/bin/sh

set -euo pipefail

# Initialization - load function handler
source $LAMBDA_TASK_ROOT/"$(echo $_HANDLER | cut -d. -f1).sh"

# Processing
while true
do
  HEADERS="$(mktemp)"
  # Get an event. The HTTP request will block until one is received
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")

  # Extract request ID by scraping response headers received above
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)

  # Run the function handler
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA")

  # Send the response
  curl "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response"  -d "$RESPONSE"
done
"""

# The tutorial's function, plus a second handler (same bootstrap, `function.userland`) that
# reports what a function sees of the userland.
FUNCTION_SH = r"""function handler () {
  EVENT_DATA=$1

  RESPONSE="Echoing request: '$EVENT_DATA'"
  echo $RESPONSE
}

function userland () {
  dirs=""
  for d in /var/task /var/runtime /opt /tmp /var/lang/bin; do
    [[ -d $d ]] && dirs="$dirs $d"
  done
  files=""
  for f in /etc/resolv.conf /etc/hosts; do
    [[ -f $f && ! -L $f ]] && files="$files $f"
  done
  tools=""
  for t in bash curl tar gzip find xargs which cut tr; do
    tools="$tools $(basename "$(command -v $t)")"
  done
  printf '{"sh": "%s", "tools": "%s", "dirs": "%s", "files": "%s", "task_root": "%s", "runtime_dir": "%s", "path": "%s", "ld_library_path": "%s"}' \
    "$(readlink -f /bin/sh)" "${tools# }" "${dirs# }" "${files# }" \
    "$LAMBDA_TASK_ROOT" "$LAMBDA_RUNTIME_DIR" "$PATH" "$LD_LIBRARY_PATH"
}
"""


def _deploy(lam, name, handler):
    lam.create_function(
        FunctionName=name, Runtime="provided.al2023", Handler=handler, Role=ROLE,
        Code={"ZipFile": make_zip({"bootstrap": BOOTSTRAP, "function.sh": FUNCTION_SH})},
    )
    lam.get_waiter("function_active_v2").wait(FunctionName=name)


def _invoke(lam, name, payload):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload))
    body = r["Payload"].read()
    assert r["StatusCode"] == 200
    assert "FunctionError" not in r, body
    return body.decode()


def test_tutorial_shell_runtime_works_unmodified(hearth):
    lam = hearth.client()
    _deploy(lam, "tutorial", "function.handler")
    event = {"payload": "hello"}
    assert _invoke(lam, "tutorial", event) == "Echoing request: '%s'" % json.dumps(event)
    # The bootstrap's loop serves the next event from the same (warm) sandbox.
    event = {"second": "call"}
    assert _invoke(lam, "tutorial", event) == "Echoing request: '%s'" % json.dumps(event)


def test_userland_looks_like_amazon_linux(hearth):
    lam = hearth.client()
    _deploy(lam, "tutorial-userland", "function.userland")
    seen = json.loads(_invoke(lam, "tutorial-userland", {}))
    assert seen["sh"].endswith("/bash"), seen
    assert seen["tools"] == "bash curl tar gzip find xargs which cut tr", seen
    assert seen["dirs"] == "/var/task /var/runtime /opt /tmp /var/lang/bin", seen
    assert seen["files"] == "/etc/resolv.conf /etc/hosts", seen
    assert seen["task_root"] == "/var/task" and seen["runtime_dir"] == "/var/runtime", seen
    assert seen["path"] == "/var/lang/bin:/usr/local/bin:/usr/bin:/bin:/opt/bin", seen
    assert seen["ld_library_path"] == (
        "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
    ), seen
