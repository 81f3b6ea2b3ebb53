"""`auto` log format: JSON lines when stdout is not a terminal (journald), console on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

SCRIPT = ("from edgeserve.logging import configure_logging, get_logger; configure_logging('auto'); "
          "get_logger('t').info('completion', request_id='r1', outcome='met')")


def test_auto_writes_json_lines_to_a_pipe() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    record = json.loads(out.strip())
    assert record["event"] == "completion" and record["request_id"] == "r1" and record["outcome"] == "met"
    assert record["level"] == "info" and "timestamp" in record


def test_auto_renders_for_humans_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", SCRIPT], stdout=follower, check=True, timeout=60,
                       env={**os.environ, "NO_COLOR": "1"})
        out = os.read(leader, 65536).decode(errors="replace")
    finally:
        os.close(leader)
        os.close(follower)
    assert "completion" in out and "request_id" in out
    assert not out.lstrip().startswith("{")
