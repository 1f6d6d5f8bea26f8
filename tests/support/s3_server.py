"""A real S3 HTTP server for tests: `moto[server]` in a subprocess on a free port, stoppable and restartable on
the same port (a restarted moto starts empty: re-create buckets after `start()`).

    with S3Server() as s3:
        client = s3.client()          # a real boto3 client pointed at it, short timeouts, no retries
        client.create_bucket(Bucket="b")
        s3.stop(); ...; s3.start()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ACCESS_KEY = "AKIATESTONLY00000000"  # fake, but distinctive: tests grep logs for them
SECRET_KEY = "test-secret-never-logged-0123456789abcdef"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, port: int | None = None, start_timeout: float = 20.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)

    def start(self) -> "S3Server":
        if self.running:
            return self
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION=REGION)
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break  # could not bind (port still held): retry the start below
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        code = self._proc.poll()
        self.stop()
        if code is not None and time.monotonic() < deadline:
            time.sleep(0.2)
            return self.start()
        raise RuntimeError(f"moto server did not start on {self.url}; log: {self._log.name}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> "S3Server":
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **config):
        """A boto3 S3 client for this server; fails fast (tests stop the server on purpose)."""
        import boto3
        from botocore.config import Config
        settings = dict(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"})
        settings.update(config)
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, config=Config(**settings))

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
