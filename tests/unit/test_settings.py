"""edgeserve/settings.py: one ServerSettings from flags and environment, checked in one place."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edgeserve.settings import ServerSettings, SettingsError, add_serve_arguments, build_settings


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_defaults() -> None:
    settings = build_settings(flags(), {"EDGESERVE_MEMORY_BUDGET": "1GiB"})
    assert settings == ServerSettings(models_path=Path("models.toml"), cache_dir=settings.cache_dir,
                                      memory_budget_bytes=2**30)
    assert settings.host == "127.0.0.1" and settings.port == 8080 and settings.prefill_chunk == 64
    assert settings.max_queue == 64 and settings.default_deadline_ms is None and settings.api_keys == ()
    assert settings.max_body_bytes == 1024 * 1024 and settings.grace_s == 30.0 and settings.min_residency_s == 5.0
    assert settings.log_format == "auto" and settings.memory_check == "warn" and settings.calibration == "quick"


def test_a_flag_beats_the_environment_which_beats_the_default(tmp_path: Path) -> None:
    environ = {"EDGESERVE_PORT": "9000", "EDGESERVE_PREFILL_CHUNK": "32", "EDGESERVE_HOST": "0.0.0.0",
               "EDGESERVE_DEFAULT_DEADLINE_MS": "5000", "EDGESERVE_MODELS": str(tmp_path / "m.toml"),
               "EDGESERVE_CACHE_DIR": str(tmp_path / "cache"), "EDGESERVE_METRICS_PUBLIC": "1",
               "EDGESERVE_API_KEYS": "env-key", "EDGESERVE_POLICY": "p.toml", "EDGESERVE_GRACE_S": "7.5",
               "EDGESERVE_MEMORY_BUDGET": "600MiB", "EDGESERVE_MIN_RESIDENCY_S": "0"}
    settings = build_settings(flags("--port", "9100", "--api-key", "flag-key", "--log-format", "json"), environ)
    assert settings.port == 9100 and settings.prefill_chunk == 32 and settings.host == "0.0.0.0"
    assert settings.default_deadline_ms == 5000 and settings.metrics_public
    assert settings.models_path == tmp_path / "m.toml" and settings.cache_dir == tmp_path / "cache"
    assert settings.api_keys == ("flag-key", "env-key") and settings.log_format == "json"
    assert settings.policy_path == Path("p.toml") and settings.grace_s == 7.5
    assert settings.memory_budget_bytes == 600 * 2**20 and settings.min_residency_s == 0.0


def test_keys_from_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the team\nfile-key\n")
    assert build_settings(flags("--api-key-file", str(keys)), {}).api_keys == ("file-key",)


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (("--prefill-chunk", "0"), {}, "--prefill-chunk must be at least 1"),
    (("--default-deadline-ms", "3600001"), {}, "--default-deadline-ms must be from 1 to 3600000"),
    (("--max-body-bytes", "0"), {}, "--max-body-bytes must be at least 1"),
    (("--min-residency-s", "-1"), {}, "--min-residency-s must not be negative"),
    (("--port", "70000"), {}, "is not a TCP port"),
    (("--memory-budget", "lots"), {}, "--memory-budget"),
    ((), {"EDGESERVE_PORT": "eighty"}, "EDGESERVE_PORT='eighty' is not a valid value"),
    ((), {"EDGESERVE_LOG_FORMAT": "xml"}, "--log-format 'xml'"),
    ((), {"EDGESERVE_API_KEYS": "ok,caf\u00e9"}, "EDGESERVE_API_KEYS: an API key must be printable ASCII"),
    (("--api-key-file", "/nonexistent/keys"), {}, "--api-key-file"),
])
def test_a_value_that_cannot_work_is_named(argv: tuple[str, ...], environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        build_settings(flags(*argv), {"EDGESERVE_MEMORY_BUDGET": "1GiB", **environ})
