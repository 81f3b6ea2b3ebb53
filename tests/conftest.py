"""Shared fixtures: the default models are prepared once per test session into a temp cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeserve.config import ModelsFile, load_models_file
from edgeserve.runtime.prepare import PreparedVariant, prepare_models

ROOT = Path(__file__).resolve().parent.parent
MODELS_TOML = ROOT / "models.toml"


@pytest.fixture(scope="session")
def models_file() -> ModelsFile:
    return load_models_file(MODELS_TOML)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EDGESERVE_TEST_CACHE_DIR reuses prepared models between local runs; CI starts empty."""
    given = os.environ.get("EDGESERVE_TEST_CACHE_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("edgeserve-cache")


@pytest.fixture(scope="session")
def prepared(models_file: ModelsFile, cache_dir: Path) -> dict[str, PreparedVariant]:
    return prepare_models(models_file, ROOT, cache_dir, lambda _line: None)
