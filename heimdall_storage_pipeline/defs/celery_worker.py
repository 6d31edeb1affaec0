"""The Celery app Heimdall's workers run, configured from the same HEIMDALL_CELERY_* variables as the runs.

    celery -A heimdall_storage_pipeline.defs.celery_worker worker -Q "$HEIMDALL_CELERY_QUEUE" --prefetch-multiplier=1

Workers also need the run's environment (MINIO_*, HEIMDALL_DATABASE_URL, HEIMDALL_MANIFEST_ROOT=s3://...,
HEIMDALL_STORAGE_POLICY, DAGSTER_HOME with the shared PostgreSQL instance): each step rebuilds the job
from the code location in the worker and reads its inputs from the instance and the manifest store.
"""

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from heimdall_storage_pipeline.defs.executors import CelerySettings

settings = CelerySettings.from_env()
app = make_app(settings.worker_app_args())
execute_plan = create_task(app)
