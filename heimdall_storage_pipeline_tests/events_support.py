"""A real ``heimdall-storage events`` process for tests, and notifications shaped as MinIO sends them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import sqlalchemy as sa

from heimdall_storage_pipeline.core.events import EventLog, StreamState

DEADLINE_SECONDS = 120.0


def wait_for(condition: Callable[[], Any], what: str, deadline: float = DEADLINE_SECONDS) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Receiver:
    """``heimdall-storage events`` in a process of its own, on a given port."""

    def __init__(self, port: int, policy: Path, database_url: str, token: str, log: Path,
                 heartbeat_seconds: float = 1.0, extra: tuple[str, ...] = ()) -> None:
        self.port, self.token, self.log = port, token, log
        self.command = [
            str(Path(sys.executable).parent / "heimdall-storage"), "events", "--port", str(port), "--policy",
            str(policy), "--database-url", database_url, "--heartbeat-seconds", str(heartbeat_seconds), *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Receiver:
        env = {**os.environ, "HEIMDALL_EVENTS_TOKEN": self.token}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self._answers() or self.process.poll() is not None, "the receiver to listen")
        assert self.process.poll() is None, self.log.read_text()
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        (self.process.kill if kill else self.process.terminate)()
        self.process.wait(timeout=30)

    def post(self, body: bytes | dict[str, Any], token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/minio/events", data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        if (token if token is not None else self.token):
            request.add_header("Authorization", f"Bearer {token if token is not None else self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def stream(database_url: str, bucket: str) -> StreamState | None:
    engine = sa.create_engine(database_url)
    try:
        return EventLog(engine).state(bucket)
    finally:
        engine.dispose()


def minio_record(bucket: str, key: str, name: str, at: datetime, size: int = 0, etag: str = "") -> dict[str, Any]:
    """One record of a MinIO S3 event notification, as MinIO's documentation shows it (key URL-encoded)."""
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    obj: dict[str, Any] = {"key": quote_plus(key), "sequencer": f"{int(at.timestamp() * 1e9):X}"}
    if name.startswith("s3:ObjectCreated"):
        obj.update({"size": size, "eTag": etag, "contentType": "application/octet-stream", "userMetadata": {}})
    return {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": stamp, "eventName": name,
        "userIdentity": {"principalId": "heimdall"},
        "requestParameters": {"principalId": "heimdall", "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "17A0F0B4C1E2D3F4", "x-minio-origin-endpoint": "http://minio:9000"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "heimdall"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": obj},
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
    }


def minio_notification(*records: dict[str, Any]) -> dict[str, Any]:
    first = records[0]
    return {"EventName": first["eventName"],
            "Key": f"{first['s3']['bucket']['name']}/{first['s3']['object']['key']}", "Records": list(records)}
