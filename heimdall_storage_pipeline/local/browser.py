"""The Dagster UI in headless Chromium (Debian's ``chromium``): screenshots and rendered pages.

Used by ``scripts/ui_screenshots.py`` and the UI test. ``scripts/install_chromium.sh`` installs it.
Each call starts a fresh browser with a throw-away profile; ``--virtual-time-budget`` lets the page
run its requests and scripts before the DOM is dumped or the screenshot taken.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

RENDER_BUDGET_MS = 20_000  # virtual time the page gets to load its data and settle
BROWSER_TIMEOUT_SECONDS = 180
# What the UI shows when a query or the code location failed.
ERROR_MARKERS = ("Unexpected GraphQL error", "An unexpected error", "Error loading", "PythonError")


def chromium_binary() -> str:
    found = shutil.which("chromium")
    if not found:
        raise FileNotFoundError("chromium is missing; run scripts/install_chromium.sh (Debian's chromium package)")
    return found


def _chromium(url: str, *action: str, window: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="heimdall-chromium-") as profile:
        # As root Chromium needs --no-sandbox; the other flags keep it from phoning home or updating.
        command = [
            chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={RENDER_BUDGET_MS}", *action, url,
        ]
        # Times in the UI read in the browser's zone: UTC, like everything else here.
        done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_SECONDS,
                              check=False, env={**os.environ, "TZ": "UTC"})
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed on {url} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def screenshot(url: str, path: Path, window: tuple[int, int] = (1400, 900)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, f"--screenshot={path}", window=window)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return path


def rendered_text(url: str, window: tuple[int, int] = (1400, 2000)) -> str:
    """The page's visible text once rendered, cells separated by `` | ``."""
    dom = _chromium(url, "--dump-dom", window=window).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " | ", dom))
    return re.sub(r"(\s*\|\s*)+", " | ", text)


def graphql(base_url: str, query: str, timeout: float = 30) -> dict:
    request = urllib.request.Request(f"{base_url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return dict(json.loads(response.read()))


def wait_for_assets(base_url: str, assets: tuple[str, ...], deadline_seconds: float) -> None:
    """Poll the webserver until its code location serves ``assets``; fail at the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            nodes = graphql(base_url, "{ assetNodes { assetKey { path } } }")["data"]["assetNodes"]
            if set(assets) <= {"/".join(node["assetKey"]["path"]) for node in nodes}:
                return
        except (OSError, KeyError, TypeError, ValueError):
            pass  # not up yet, or the code location is still loading
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Dagster UI at {base_url} did not serve {', '.join(assets)} "
                               f"within {deadline_seconds:.0f} s")
        time.sleep(0.5)  # poll interval, not synchronisation


def dismiss_first_visit(base_url: str) -> None:
    """Mark the UI's first-visit pop-up as seen, so that it covers no page."""
    graphql(base_url, "mutation { setNuxSeen }")
