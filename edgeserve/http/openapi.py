"""Request-body schemas in the OpenAPI document.

The completion handlers decode their bodies themselves (strictly, with msgspec), so litestar
sees no `data` parameter to document. This adds what msgspec says the bodies are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.spec import (
    Discriminator,
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)

from edgeserve.http.schemas import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{name}"
_RENAMES = {
    "anyOf": "any_of", "oneOf": "one_of", "allOf": "all_of", "minLength": "min_length",
    "maxLength": "max_length", "minItems": "min_items", "maxItems": "max_items",
    "exclusiveMinimum": "exclusive_minimum", "exclusiveMaximum": "exclusive_maximum",
    "additionalProperties": "additional_properties",
}


def _to_spec(node: dict[str, Any]) -> Schema | Reference:
    """msgspec's JSON Schema (a dict) as litestar's OpenAPI spec objects."""
    if "$ref" in node:
        return Reference(ref=node["$ref"])
    fields: dict[str, Any] = {}
    for key, value in node.items():
        name = _RENAMES.get(key, key)
        if name in ("any_of", "one_of", "all_of"):
            value = [_to_spec(item) for item in value]
        elif name == "items":
            value = _to_spec(value)
        elif name == "properties":
            value = {prop: _to_spec(schema) for prop, schema in value.items()}
        elif name == "type":
            value = [OpenAPIType(t) for t in value] if isinstance(value, list) else OpenAPIType(value)
        elif name == "discriminator":
            value = Discriminator(property_name=value["propertyName"], mapping=value.get("mapping"))
        fields[name] = value
    return Schema(**fields)


def add_request_schemas(document: OpenAPI) -> None:
    """Add the request-body schemas to a built document (litestar regenerates `components` from
    what it documented itself, so they cannot go into OpenAPIConfig)."""
    _, components = msgspec.json.schema_components([ChatCompletionRequest, CompletionRequest],
                                                   ref_template=REF)
    if document.components.schemas is None:
        document.components.schemas = {}
    for name, schema in components.items():
        spec = _to_spec(schema)
        assert isinstance(spec, Schema)
        document.components.schemas[name] = spec


def operation_with_body(schema_name: str) -> type[Operation]:
    """An Operation class for a route decorator's `operation_class`: it documents the body."""

    @dataclass
    class WithRequestBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=Reference(ref=REF.format(name=schema_name)))},
                required=True,
            )

    return WithRequestBody
