"""Screenshots of the real Dagster UI for the README, re-runnable by anyone.

Starts the demo (`heimdall-storage demo --ui`: embedded PostgreSQL, SeaweedFS, a seeded Heimdall,
a scan and a dry-run plan of every bucket, then `dagster dev`) in a fresh work directory on a free
port, waits until the UI serves the assets, marks the first-visit pop-up as seen, shoots each page
with headless Chromium (scripts/install_chromium.sh installs it) and stops everything.

    .venv/bin/python scripts/ui_screenshots.py [--out docs/screenshots] [--bucket heimdall-raw-iq]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from anywhere

from heimdall_storage_pipeline.local.browser import (  # noqa: E402
    chromium_binary,
    dismiss_first_visit,
    screenshot,
    wait_for_assets,
)
from heimdall_storage_pipeline.local.seaweedfs import free_ports  # noqa: E402

DEMO_SECONDS = 900  # seeding, three scans, the dry run and dagster dev's start, on a busy machine


def pages(bucket: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """File name -> (UI path, window size)."""
    return {
        "lineage.png": ("/assets/orphan_deletions?view=lineage&lineageScope=upstream&lineageDepth=4", (1280, 640)),
        "orphan_diff_metadata.png": (f"/assets/orphan_diff?partition={bucket}", (1600, 2250)),
        "orphan_diff_checks.png": (
            f"/assets/orphan_diff?view=checks&partition={bucket}&checkDetail=orphan_ratio_health", (1280, 700)),
        "plan.png": (f"/assets/orphan_deletions?partition={bucket}", (1600, 2700)),
        # The demo records today's storage history (UTC).
        "storage_history.png": (f"/assets/storage_history?partition={datetime.now(UTC).date()}", (1600, 2400)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    parser.add_argument("--bucket", default="heimdall-raw-iq", help="the partition whose pages are shot")
    args = parser.parse_args()
    chromium_binary()  # fail before the demo starts if it is missing
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="heimdall-screenshots-") as tmp:
        log = Path(tmp) / "demo.out"
        with log.open("wb") as out:
            demo = subprocess.Popen(
                [str(Path(sys.executable).parent / "heimdall-storage"), "demo", "--ui", "--workdir",
                 str(Path(tmp) / "demo"), "--ui-port", str(port)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "HEIMDALL_AUTOMATION_STATUS": "stopped"},
            )
        try:
            wait_for_assets(base, ("bucket_inventory", "orphan_diff", "orphan_deletions"), DEMO_SECONDS)
            dismiss_first_visit(base)
            for name, (path, window) in pages(args.bucket).items():
                shot = screenshot(base + path, args.out / name, window)
                print(f"{shot.relative_to(REPO) if shot.is_relative_to(REPO) else shot}: "
                      f"{shot.stat().st_size // 1024} KiB")
        except (TimeoutError, RuntimeError) as exc:
            print(f"{exc}; the demo's output:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            return 1
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGTERM)  # the demo stops dagster dev and its servers
            demo.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
