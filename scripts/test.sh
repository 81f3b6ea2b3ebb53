#!/usr/bin/env bash
# Install edgeserve with its test tools, then lint, type-check and run the whole test suite
# (unit, integration on the real models, end-to-end against a real server process).
# pytest exits non-zero when it collects no test, so an empty run fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# The unit-file test needs systemd-analyze (Debian package systemd); install it where we can.
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq systemd >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
