"""Which executor the scan and cleanup jobs run on: Dagster's default, or Celery workers.

``HEIMDALL_EXECUTOR`` selects it (``default`` when unset: every step of a run in the run's own process,
Dagster's in-process executor). ``celery`` attaches ``dagster_celery.celery_executor`` to
``storage_scan_job`` and ``delete_orphans_job``; the broker, result backend and queue come from
``HEIMDALL_CELERY_BROKER``, ``HEIMDALL_CELERY_BACKEND`` and ``HEIMDALL_CELERY_QUEUE``. The run process
and the workers (``celery -A heimdall_storage_pipeline.defs.celery_worker worker -Q <queue>``) read the
same variables, so both sides agree on where steps go. Steps pass nothing through IO managers: bulk data
lives in the manifest store (use ``HEIMDALL_MANIFEST_ROOT=s3://...`` with workers on several machines)
and the rest in the instance's event log, which must be PostgreSQL-backed and shared by every worker.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Any

import dagster as dg

EXECUTOR_ENV = "HEIMDALL_EXECUTOR"
CELERY_BROKER_ENV = "HEIMDALL_CELERY_BROKER"
CELERY_BACKEND_ENV = "HEIMDALL_CELERY_BACKEND"
CELERY_QUEUE_ENV = "HEIMDALL_CELERY_QUEUE"

DEFAULT_EXECUTOR = "default"
CELERY_EXECUTOR = "celery"
DEFAULT_CELERY_BROKER = "pyamqp://guest@127.0.0.1:5672//"
DEFAULT_CELERY_BACKEND = "rpc://"
DEFAULT_CELERY_QUEUE = "dagster"  # dagster-celery's own default queue
# The rpc:// backend gives every run a reply queue that it polls (basic.get, never consuming), so RabbitMQ's
# auto-delete never fires; the queue expires this long after the run stops polling (Celery's default: a day).
RESULT_QUEUE_EXPIRES_SECONDS = 3600


class ExecutorSelectionError(ValueError):
    pass


@dataclass(frozen=True)
class CelerySettings:
    """Where the Celery executor sends steps; shared by the run process and the workers."""

    broker: str = DEFAULT_CELERY_BROKER
    backend: str = DEFAULT_CELERY_BACKEND
    queue: str = DEFAULT_CELERY_QUEUE

    @classmethod
    def from_env(cls) -> "CelerySettings":
        return cls(
            broker=os.environ.get(CELERY_BROKER_ENV) or DEFAULT_CELERY_BROKER,
            backend=os.environ.get(CELERY_BACKEND_ENV) or DEFAULT_CELERY_BACKEND,
            queue=os.environ.get(CELERY_QUEUE_ENV) or DEFAULT_CELERY_QUEUE,
        )

    def config_source(self) -> dict[str, Any]:
        # Steps without a dagster-celery/queue tag go to the default queue; workers consume it with -Q.
        return {"task_default_queue": self.queue, "result_expires": RESULT_QUEUE_EXPIRES_SECONDS}

    def executor_config(self) -> dict[str, Any]:
        """``celery_executor`` config; set variables are read at run time so secrets stay out of snapshots."""
        return {
            "broker": _env_or_value(CELERY_BROKER_ENV, self.broker),
            "backend": _env_or_value(CELERY_BACKEND_ENV, self.backend),
            "config_source": self.config_source(),
        }

    def worker_app_args(self) -> dict[str, Any]:
        """The arguments ``dagster_celery.make_app.make_app`` takes, matching ``executor_config``."""
        from dagster_celery.executor import CeleryExecutor

        return CeleryExecutor.for_cli(
            broker=self.broker, backend=self.backend, config_source=self.config_source()
        ).app_args()


def _env_or_value(name: str, value: str) -> str | dict[str, str]:
    return {"env": name} if os.environ.get(name) else value


def executor_kind() -> str:
    kind = (os.environ.get(EXECUTOR_ENV) or DEFAULT_EXECUTOR).strip().lower()
    if kind not in (DEFAULT_EXECUTOR, CELERY_EXECUTOR):
        raise ExecutorSelectionError(
            f"{EXECUTOR_ENV}={kind!r} is not supported; use {DEFAULT_EXECUTOR!r} or {CELERY_EXECUTOR!r}"
        )
    return kind


def scale_out_executor() -> dg.ExecutorDefinition | None:
    """The executor for storage_scan_job and delete_orphans_job; None keeps the code location's default."""
    if executor_kind() != CELERY_EXECUTOR:
        return None
    try:
        from celery.exceptions import DuplicateTaskNameWarning
        from dagster_celery import celery_executor
    except ImportError as exc:  # an optional dependency until every deployment installs it
        raise ExecutorSelectionError(
            f"{EXECUTOR_ENV}=celery needs the dagster-celery package (pinned to Dagster's version)"
        ) from exc
    # dagster-celery registers its execute_plan task again, the same callable, for every step it submits;
    # Celery 5.5+ warns at each re-registration. The first registration serves them all.
    warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered",
                            category=DuplicateTaskNameWarning)
    return celery_executor.configured(
        CelerySettings.from_env().executor_config(),
        name="heimdall_celery",
        description="dagster-celery, configured from HEIMDALL_CELERY_* variables",
    )


def job_from_env(name: str) -> dg.JobDefinition:
    """A job of the code location built from the environment, for ``dg.build_reconstructable_job``.

    Celery workers rebuild the job from this target in their own process, with their own environment.
    """
    from heimdall_storage_pipeline.core.policy import load_policy
    from heimdall_storage_pipeline.defs.build import build_definitions

    return build_definitions(load_policy()).resolve_job_def(name)
