#!/usr/bin/env bash
# Install Debian's `prometheus` package (prometheus + promtool) when either is missing.
# Idempotent: returns at once when both are on PATH. The package's own service is kept from
# starting (and stopped/disabled if it did start): tests run their own Prometheus on loopback.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# policy-rc.d exit 101 tells invoke-rc.d not to start services during the install; keep any
# existing policy file and restore it afterwards.
POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [ -e "$POLICY" ]; then
    BACKUP="$(mktemp)"
    $SUDO cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [ -n "$BACKUP" ]; then
        $SUDO cp -p "$BACKUP" "$POLICY"
        rm -f "$BACKUP"
    else
        $SUDO rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
$SUDO chmod 755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# No recommends: they pull node-exporter and friends, which would also start as services.
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Belt and braces for hosts where the policy file is ignored (systemd as PID 1).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1; then
        $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
fi

command -v prometheus >/dev/null && command -v promtool >/dev/null
