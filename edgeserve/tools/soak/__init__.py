"""A bounded soak test on loopback (issue 8): mixed load for minutes, memory and descriptors
watched, every request accounted for. On demand, not in CI: `python scripts/soak.py`."""
