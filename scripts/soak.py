"""Soak test (issue 8), on demand, not in CI: see edgeserve/tools/soak/run.py and docs/benchmarks.md."""

import sys

from edgeserve.tools.soak.run import main

if __name__ == "__main__":
    sys.exit(main())
