#!/usr/bin/env bash
# Install Debian's `chromium` (headless screenshots of the UI and the UI test) when it is missing.
# Idempotent: returns at once when chromium is on PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# No recommends (desktop integration, a second browser profile tool); a font so that text renders.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

command -v chromium >/dev/null
