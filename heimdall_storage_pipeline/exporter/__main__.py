"""``python -m heimdall_storage_pipeline.exporter``: the exporter without the console script."""

import sys

from heimdall_storage_pipeline.exporter.cli import run_exporter

sys.exit(run_exporter())
