#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install edgeserve into it; "dev" adds the test tools.
# llama-cpp-python builds from source the first time (about 5 minutes on 2 cores);
# pip caches the wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "dev" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
