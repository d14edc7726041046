"""Fixtures for end-to-end tests: a real `hearth up` process, driven over HTTP by boto3 and
the AWS CLI. Paths come from the environment the README's test command sets:
HEARTH_BIN (the hearth binary), HEARTH_AGENT (static agent), HEARTH_IMAGE_CACHE (images)."""
import io
import os
import signal
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import boto3
import botocore.config
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bin():
    return os.environ.get("HEARTH_BIN", str(ROOT / "target" / "debug" / "hearth"))


class Hearth:
    def __init__(self, data_dir, extra_args=(), listen_host="127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.listen_host = listen_host
        self.proc = None
        self.port = 0
        self.env = {}
        self.endpoint = None
        self.log_path = self.data_dir / "hearth.log"

    def start(self):
        env_file = self.data_dir / "client.env"
        if env_file.exists():
            env_file.unlink()
        args = [
            _bin(), "up",
            "--data-dir", str(self.data_dir),
            "--listen", f"{self.listen_host}:{self.port}",
            "--no-build-images",
            "--no-image-artifacts",
            "--keep-alive", "30",
        ] + self.extra_args
        if os.environ.get("HEARTH_IMAGE_CACHE"):
            args += ["--image-cache", os.environ["HEARTH_IMAGE_CACHE"]]
        if os.environ.get("HEARTH_AGENT"):
            args += ["--agent", os.environ["HEARTH_AGENT"]]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not env_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"hearth up exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError("hearth up did not write client.env in 60 s")
            time.sleep(0.05)
        self.env = {}
        for line in env_file.read_text().splitlines():
            if line.startswith("export "):
                k, v = line[len("export "):].split("=", 1)
                self.env[k] = v
        self.endpoint = self.env["AWS_ENDPOINT_URL"]
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def client(self, secret=None, retries=0, read_timeout=120):
        return boto3.client(
            "lambda",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=secret or self.env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(
                retries={"max_attempts": retries, "mode": "standard"} if retries else {"total_max_attempts": 1},
                read_timeout=read_timeout,
            ),
        )

    def cli(self, *args, check=True, input=None):
        """Run `aws lambda ...` against this server; returns CompletedProcess."""
        env = dict(os.environ)
        env.update(self.env)
        env.pop("AWS_PROFILE", None)
        cp = subprocess.run(
            ["aws", "lambda", *args, "--endpoint-url", self.endpoint, "--output", "json"],
            env=env, capture_output=True, text=True, input=input, timeout=180,
        )
        if check and cp.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed ({cp.returncode}): {cp.stderr}")
        return cp

    def runsc_containers(self):
        cp = subprocess.run(["runsc", "--root", str(self.data_dir / "runsc"), "list", "-quiet"],
                            capture_output=True, text=True)
        return [l for l in cp.stdout.split() if l]


def make_zip(files, modes=None):
    """A deployment package: {path: text or bytes}; modes {path: 0o755}."""
    modes = modes or {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            mode = modes.get(name, 0o755 if name == "bootstrap" else 0o644)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


@pytest.fixture(scope="session")
def hearth():
    with tempfile.TemporaryDirectory(prefix="hearth-e2e-") as d:
        h = Hearth(d).start()
        try:
            yield h
        finally:
            h.stop()
            left = h.runsc_containers()
            assert left == [], f"sandboxes left after shutdown: {left}"


@pytest.fixture
def fresh_hearth(tmp_path):
    """A server of its own, for tests that restart it or change account limits."""
    h = Hearth(tmp_path / "data").start()
    try:
        yield h
    finally:
        h.stop()
