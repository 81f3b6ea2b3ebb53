"""systemd/edgeserve.service passes `systemd-analyze verify` (with ExecStart pointed here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edgeserve.service"


def test_the_unit_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: scripts/test.sh installs it (package systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    edgeserve = Path(sys.executable).parent / "edgeserve"
    text = UNIT.read_text().replace("/opt/edgeserve/.venv/bin/edgeserve", str(edgeserve))
    text = text.replace("WorkingDirectory=/opt/edgeserve", f"WorkingDirectory={ROOT}")
    unit = tmp_path / "edgeserve.service"
    unit.write_text(text)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "edgeserve.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_the_unit_is_a_notify_service_with_a_watchdog() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"]
    assert settings["Restart"] == "on-failure"
    for hardening in ("DynamicUser", "ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert hardening in settings
