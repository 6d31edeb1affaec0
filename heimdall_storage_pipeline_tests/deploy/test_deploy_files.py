"""The image and compose definitions: hadolint, Docker Compose's own validation, and what ties the files together.

No container engine runs here: the Dockerfile is linted, compose.yaml is loaded by the real Docker Compose
(`config`), and test_topology.py runs the services' commands as processes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from heimdall_storage_pipeline.local.seaweedfs import free_ports
from heimdall_storage_pipeline_tests.deploy.support import (
    COMPOSE_FILE,
    DOCKER_DIR,
    DOCKERFILE,
    ENV_EXAMPLE,
    HEALTHCHECK,
    HEIMDALL_OVERRIDE,
    REPO,
    WORKSPACE_FILE,
    compose,
    compose_services,
    option,
    tool,
)

TOPOLOGY = {"code-server", "webserver", "daemon", "exporter"}
PROFILES = {"celery": "celery-worker", "events": "events"}  # the opt-in services
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
REQUIRED_VARIABLES = ("DAGSTER_PG_URL", "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
                      "HEIMDALL_DATABASE_URL")


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final_stage(dockerfile: str) -> list[str]:
    """The instructions of the last build stage, continuation lines joined."""
    lines = re.sub(r"\\\n\s*", " ", dockerfile).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.startswith("FROM "))
    return instructions[last_from:]


def _example_services(*profiles: str) -> dict[str, dict]:
    return compose_services({}, files=(COMPOSE_FILE, HEIMDALL_OVERRIDE), profiles=profiles, env_file=ENV_EXAMPLE)


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_image_runs_unprivileged_with_the_package_alone_and_the_shipped_instance() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2, "a build stage and a runtime stage"
    stage = _final_stage(dockerfile)
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, users
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    # `pip install .`: no extras, so none of the demo servers (SeaweedFS, embedded PostgreSQL) in production.
    assert installs and all(re.search(r"\s\.$", line) and "[" not in line for line in installs), installs
    env = " ".join(line for line in stage if line.startswith("ENV "))
    home = re.search(r"DAGSTER_HOME=(\S+)", env)
    assert home is not None, env
    assert any(line.startswith("COPY ") and " dagster.yaml " in line and line.rstrip("/").endswith(home.group(1))
               for line in stage), "the shipped dagster.yaml goes into DAGSTER_HOME"
    healthcheck = next(line for line in stage if line.startswith("HEALTHCHECK "))
    assert HEALTHCHECK.name in healthcheck
    services = _example_services(*PROFILES)
    assert {service["environment"]["DAGSTER_HOME"] for service in services.values()} == {home.group(1)}


def test_the_build_context_holds_every_file_the_image_copies() -> None:
    """Dockerfile.dockerignore lets through exactly what COPY needs (the context is the repository root)."""
    ignore = (DOCKER_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded from the build context by the .dockerignore"


def test_compose_file_is_valid_for_heimdalls_stack() -> None:
    for profiles in ((), *((profile,) for profile in PROFILES), tuple(PROFILES)):
        args = [arg for profile in profiles for arg in ("--profile", profile)]
        result = compose([*args, "config", "--quiet"], {}, (COMPOSE_FILE, HEIMDALL_OVERRIDE), ENV_EXAMPLE)
        assert result.returncode == 0, result.stderr
    assert set(_example_services()) == TOPOLOGY  # Celery workers and the event receiver only in their profile
    for profile, service in PROFILES.items():
        assert set(_example_services(profile)) == TOPOLOGY | {service}
    services = _example_services(*PROFILES)
    assert set(services) == TOPOLOGY | set(PROFILES.values())
    assert len({service["image"] for service in services.values()}) == 1, "one image for every role"
    assert [name for name, service in services.items() if "build" in service] == ["code-server"]
    for name, service in services.items():
        assert set(service["networks"]) == {"default", "heimdall"}, f"{name} does not join Heimdall's network"


def test_compose_names_each_missing_variable() -> None:
    result = compose(["config", "--quiet"], {})
    assert result.returncode != 0
    for name in REQUIRED_VARIABLES:
        assert f"required variable {name} is missing a value: set {name}" in result.stderr, result.stderr


def test_every_variable_of_the_deployment_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    names = set()
    for path in (COMPOSE_FILE, HEIMDALL_OVERRIDE):
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()))
    for service in _example_services(*PROFILES).values():
        names |= set(service["environment"])
    names |= {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"[A-Z]", line)}
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert missing == [], f"not in README.md: {missing}"


def test_each_role_listens_where_its_health_check_and_the_workspace_look() -> None:
    healthcheck = _healthcheck_module()
    services = _example_services(*PROFILES)
    exposed = set(re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1).split())  # type: ignore[union-attr]
    for name, service in services.items():
        assert service["environment"]["HEIMDALL_ROLE"] == name and name in healthcheck.ROLES
        if name in healthcheck.DEFAULT_PORTS:
            port = option(service["command"], "--port")
            assert port == str(healthcheck.DEFAULT_PORTS[name]) and port in exposed, (name, port, exposed)
    (entry,) = yaml.safe_load(WORKSPACE_FILE.read_text())["load_from"]
    server = entry["grpc_server"]
    assert server["host"] == "code-server" and str(server["port"]) == option(services["code-server"]["command"],
                                                                             "--port")
    assert server["location_name"] == option(services["code-server"]["command"], "--location-name")


@pytest.mark.parametrize(("env", "code", "says"), [
    ({}, 0, ""),  # a one-off command: nothing to check
    ({"HEIMDALL_ROLE": "webserver"}, 1, "webserver: unhealthy: http://127.0.0.1:{port}/server_info"),
    ({"HEIMDALL_ROLE": "exporter"}, 1, "exporter: unhealthy: http://127.0.0.1:{port}/healthz"),
    ({"HEIMDALL_ROLE": "events"}, 1, "events: unhealthy: http://127.0.0.1:{port}/:"),
    ({"HEIMDALL_ROLE": "scheduler"}, 1, "scheduler: unhealthy: HEIMDALL_ROLE='scheduler' is not a role; use one of"),
])
def test_health_check_answers_in_one_line(env: dict[str, str], code: int, says: str) -> None:
    (port,) = free_ports(1)  # nothing listens there
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env={**env, "HEIMDALL_HEALTHCHECK_PORT": str(port)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == code
    assert result.stdout.startswith(says.format(port=port)) and result.stdout.count("\n") == (1 if says else 0)


def test_dockerfile_path_is_where_compose_builds_from() -> None:
    build = _example_services()["code-server"]["build"]
    assert Path(build["context"]) / build["dockerfile"] == DOCKERFILE


def test_no_secret_reaches_a_command_line() -> None:
    """Passwords, keys and tokens go through the environment: a command line shows in ps and docker inspect."""
    secrets = {"MINIO_SECRET_KEY": "minio-secret-marker",
               "DAGSTER_PG_URL": "postgresql+psycopg2://dagster:dagster-pg-marker@postgres:5432/dagster",
               "HEIMDALL_AUDIT_DB_URL": "postgresql+psycopg2://audit:audit-marker@postgres:5432/audit",
               "HEIMDALL_EVENTS_TOKEN": "events-token-marker",
               "HEIMDALL_EVENTS_AMQP_URL": "amqp://heimdall:amqp-marker@rabbitmq:5672//"}
    services = compose_services(secrets, files=(COMPOSE_FILE, HEIMDALL_OVERRIDE), profiles=tuple(PROFILES),
                                env_file=ENV_EXAMPLE)
    for name, service in services.items():
        command = " ".join(map(str, service["command"]))
        assert "marker" not in command and "change-me" not in command, (name, command)
    receiver = services["events"]["environment"]
    assert {key: receiver[key] for key in ("HEIMDALL_AUDIT_DB_URL", "HEIMDALL_EVENTS_TOKEN",
                                            "HEIMDALL_EVENTS_AMQP_URL")} == {
        key: secrets[key] for key in ("HEIMDALL_AUDIT_DB_URL", "HEIMDALL_EVENTS_TOKEN", "HEIMDALL_EVENTS_AMQP_URL")}
    assert receiver["DAGSTER_PG_URL"] == secrets["DAGSTER_PG_URL"]  # the receiver's fallback database


def _published(service: dict) -> tuple[str, str, int]:
    """The service's one published port: (host address, host port, container port)."""
    (port,) = service["ports"]
    return port["host_ip"], str(port["published"]), int(port["target"])


def test_prometheus_scrapes_the_exporter_where_compose_publishes_it() -> None:
    """prometheus.yml's target is compose's exporter on the host; alerts_test.yml's instance is that target."""
    exporter = _example_services()["exporter"]
    host, published, container_port = _published(exporter)
    assert container_port == int(option(exporter["command"], "--port"))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"{host}:{published}"]
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    series = [item["series"] for test in tests for item in test["input_series"]]
    instances = {re.search(r'instance="([^"]+)"', line).group(1)  # type: ignore[union-attr]
                 for line in series if f'job="{job["job_name"]}"' in line}
    assert instances == {f"{host}:{published}"}
    # The documented target for a Prometheus on Heimdall's network: the exporter's alias there.
    aliases = exporter["networks"]["heimdall"]["aliases"]
    assert any(f"{alias}:{container_port}" in (PROMETHEUS_DIR / "prometheus.yml").read_text() for alias in aliases)


def test_the_event_receiver_is_reached_where_the_readme_sends_notifications() -> None:
    """Heimdall's MinIO notifies the receiver by its alias on Heimdall's network, at the port it listens on."""
    receiver = _example_services("events")["events"]
    host, _, container_port = _published(receiver)
    assert host == "127.0.0.1" and container_port == int(option(receiver["command"], "--port"))
    assert option(receiver["command"], "--host") == "0.0.0.0"  # hence HEIMDALL_EVENTS_TOKEN is required
    readme = (REPO / "README.md").read_text()
    (alias,) = receiver["networks"]["heimdall"]["aliases"]
    assert f"http://{alias}:{container_port}/minio" in readme
