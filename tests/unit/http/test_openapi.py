"""The OpenAPI document litestar generates documents the completion request bodies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeserve.config import load_models_file
from edgeserve.routing.policy_file import default_policy
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.sdnotify import Notifier
from edgeserve.server import assemble
from edgeserve.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[3]


def openapi_document(tmp_path: Path) -> dict[str, Any]:
    """Assembled by the composition root without starting the app (its lifespan would load the
    models)."""
    models = load_models_file(ROOT / "models.toml")
    unused = tmp_path / "unused.gguf"
    unused.write_bytes(b"")
    prepared = {f"{f.name}:{v.name}": PreparedVariant(f"{f.name}:{v.name}", unused, "explicit")
                for f in models.families for v in f.variants}
    settings = ServerSettings(models_path=ROOT / "models.toml", cache_dir=tmp_path)
    server = assemble(settings, models, prepared, {f.name: default_policy() for f in models.families}, Notifier({}))
    document: dict[str, Any] = server.app.openapi_schema.to_schema()
    return document


def test_both_completion_bodies_are_documented(tmp_path: Path) -> None:
    document = openapi_document(tmp_path)
    schemas = document["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert name in schemas
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert chat["properties"]["temperature"]["maximum"] == 2.0
    assert chat["properties"]["messages"]["minItems"] == 1
    role = schemas["ChatMessage"]["properties"]["role"]
    assert set(role["enum"]) == {"system", "developer", "user", "assistant"}
