"""HTTP server: ``/metrics`` (Prometheus text), ``/metrics/storage`` (JSON), ``/healthz``."""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from heimdall_storage_pipeline.exporter.collector import (
    InstanceProvider,
    InstanceUnavailable,
    SnapshotSource,
    StorageCollector,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


class ExporterServer:
    """Serves the exporter's endpoints; ``port=0`` picks a free port (see ``url``)."""

    def __init__(
        self,
        provider: InstanceProvider,
        source: SnapshotSource,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
    ) -> None:
        registry = CollectorRegistry()
        registry.register(StorageCollector(source))
        handler = _handler_class(provider, source, registry)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def start(self) -> ExporterServer:
        """Serve from a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="heimdall-exporter", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> ExporterServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


def _handler_class(
    provider: InstanceProvider, source: SnapshotSource, registry: CollectorRegistry
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "heimdall-storage-exporter"

        def do_GET(self) -> None:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            try:
                if path == "/metrics":
                    self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/metrics/storage":
                    self._send_json(HTTPStatus.OK, source.get().to_json())
                elif path == "/healthz":
                    provider.check()
                    self._send_json(HTTPStatus.OK, {"status": "ok"})
                else:
                    self._send_json(
                        HTTPStatus.NOT_FOUND,
                        {"error": "not found", "endpoints": ["/metrics", "/metrics/storage", "/healthz"]},
                    )
            except InstanceUnavailable as exc:
                # Redacted already, and the cause is logged where it happened; a 503 makes
                # Prometheus record up == 0.
                log.debug("%s %s: %s", self.command, path, exc)
                if path == "/metrics":
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, f"{exc}\n".encode())
                else:
                    self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable", "reason": str(exc)})

        def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            self._send(status, _JSON, json.dumps(body, indent=2, sort_keys=False).encode())

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # One line per scrape would drown the real messages; keep it at debug.
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
