"""The image's HEALTHCHECK: one script for every role, chosen by HEIMDALL_ROLE.

code-server: the gRPC server answers Dagster's health check; webserver: GET /server_info; exporter:
GET /healthz (200 only while the Dagster instance answers); events: the receiver answers GET / (it
serves only once its event streams are opened in the database); daemon: every daemon wrote a recent
heartbeat; celery-worker: this host's worker answers a ping through the broker. Without a role (a
one-off command such as ``heimdall-storage migrate``) there is nothing to check. Exit 0 when healthy,
else 1 with one line saying what failed. HEIMDALL_HEALTHCHECK_PORT overrides a role's port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from heimdall_storage_pipeline.core.errors import redact

ROLE_ENV = "HEIMDALL_ROLE"
PORT_ENV = "HEIMDALL_HEALTHCHECK_PORT"
# The ports compose.yaml's commands listen on (the image's EXPOSE).
DEFAULT_PORTS = {"code-server": 4000, "webserver": 3000, "exporter": 9101, "events": 8002}
HTTP_PATHS = {"webserver": "/server_info", "exporter": "/healthz", "events": "/"}
ROLES = ("code-server", "webserver", "daemon", "exporter", "events", "celery-worker")
TIMEOUT_SECONDS = 20
CELERY_APP = "heimdall_storage_pipeline.defs.celery_worker"


def _port(role: str) -> int:
    return int(os.environ.get(PORT_ENV) or DEFAULT_PORTS[role])


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except OSError as exc:
        return f"{url}: {exc}"


def _command(args: list[str]) -> str | None:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(args[:3])}` did not answer within {TIMEOUT_SECONDS} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return f"`{' '.join(args[:3])}` exited {result.returncode}: {lines[-1] if lines else 'no output'}"


def check(role: str) -> str | None:
    """None when the role's process is healthy, else what is wrong."""
    if role == "code-server":
        return _command(["dagster", "api", "grpc-health-check", "--host", "127.0.0.1", "--port", str(_port(role))])
    if role in HTTP_PATHS:
        return _http(f"http://127.0.0.1:{_port(role)}{HTTP_PATHS[role]}")
    if role == "daemon":
        return _command(["dagster-daemon", "liveness-check"])
    if role == "celery-worker":
        # A worker started without --hostname is named celery@<host name>.
        return _command(["celery", "-A", CELERY_APP, "inspect", "ping", "--timeout", "10",
                         "--destination", f"celery@{socket.gethostname()}"])
    return f"{ROLE_ENV}={role!r} is not a role; use one of {', '.join(ROLES)}"


def main() -> int:
    role = os.environ.get(ROLE_ENV, "").strip()
    if not role:
        return 0
    problem = check(role)
    if problem is None:
        print(f"{role}: healthy")
        return 0
    # Docker keeps what a health check prints: no URL password or secret of the environment in it.
    print(f"{role}: unhealthy: {redact(problem)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
