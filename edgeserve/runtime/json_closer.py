"""The shortest text that turns a prefix of a JSON value into a complete one, valid for a schema.

A structured answer (`response_format` `json_object` or `json_schema`) is sampled under a
llama.cpp grammar, so whatever has been generated is always a prefix of valid JSON (of the
schema's JSON). When its token budget or its deadline runs out, the answer is finished with
`closing(prefix, schema)` instead of being cut:
- open strings, escapes, numbers and literals are completed (a string the schema restricts to an
  enum or a const, or a property name, to the shortest allowed one that starts that way);
- a value a key or an array is waiting for becomes the schema's shortest valid value;
- open objects get their missing required properties (shortest valid values), arrays their
  minimum number of items, and both are closed.
The client gets JSON that parses and validates, and the `edgeserve` object says it was closed
early. Schemas: type, properties, required, items, minItems, enum, const, anyOf/oneOf,
$ref into $defs/definitions, minLength, minimum; without a schema any JSON object. Pure: no
model, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_LITERALS = ("true", "false", "null")
Schema = dict[str, Any]


def json_object_grammar() -> str:
    """llama.cpp's JSON grammar (its root is an object), as llama-cpp-python ships it."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def json_schema_grammar(schema: Schema) -> str:
    """The GBNF of a JSON schema, by llama-cpp-python's converter (ValueError if it cannot)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises plain exceptions for what it cannot express
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {exc}") from exc


# ---- schemas --------------------------------------------------------------------------------


class _Schemas:
    """Resolves `$ref` against the root schema's `$defs` / `definitions`."""

    def __init__(self, root: Schema) -> None:
        self.root = root

    def resolve(self, schema: Any) -> Schema:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 32:
            node: Any = self.root
            for part in str(schema["$ref"]).lstrip("#/").split("/"):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            schema, seen = node, seen + 1
        return schema if isinstance(schema, dict) else {}

    def property(self, schema: Schema, key: str) -> Schema:
        schema = self.resolve(schema)
        return self.resolve(schema.get("properties", {}).get(key, schema.get("additionalProperties", {})))

    def items(self, schema: Schema) -> Schema:
        items = self.resolve(schema).get("items", {})
        return self.resolve(items if isinstance(items, dict) else {})

    def minimal(self, schema: Any, depth: int = 0) -> str:
        """The shortest JSON text valid for `schema`."""
        schema = self.resolve(schema)
        if depth > 16:
            return "null"
        if "const" in schema:
            return json.dumps(schema["const"])
        if schema.get("enum"):
            return min((json.dumps(v) for v in schema["enum"]), key=len)
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return min((self.minimal(a, depth + 1) for a in alternatives), key=len)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = "null" if "null" in kind else (kind[0] if kind else None)
        if kind == "object" or (kind is None and "properties" in schema):
            return "{" + ",".join(f"{json.dumps(key)}:{self.minimal(self.property(schema, key), depth + 1)}"
                                  for key in schema.get("required", [])) + "}"
        if kind == "array":
            return "[" + ",".join([self.minimal(self.items(schema), depth + 1)] * int(schema.get("minItems", 0))) + "]"
        if kind == "string":
            return json.dumps("a" * int(schema.get("minLength", 0)))
        if kind in ("integer", "number"):
            low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
            value = max(0, int(low) + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0))
            return str(value)
        if kind == "boolean":
            return "false"
        return "null"

    def allowed_strings(self, schema: Schema) -> list[str] | None:
        """The strings a value may be when the schema lists them (enum, const); None: any."""
        schema = self.resolve(schema)
        if "const" in schema:
            return [schema["const"]] if isinstance(schema["const"], str) else []
        if "enum" in schema:
            return [v for v in schema["enum"] if isinstance(v, str)]
        return None


# ---- scanning the prefix ----------------------------------------------------------------------


@dataclass
class _Frame:
    opener: str  # "{" or "["
    schema: Schema
    keys: list[str] = field(default_factory=list)  # objects: the keys written so far
    members: int = 0  # keys (objects) or items (arrays) begun so far


@dataclass
class _State:
    frames: list[_Frame] = field(default_factory=list)
    in_string: bool = False
    string: str = ""  # the raw text of the open string so far (after its opening quote)
    escape: int = 0  # 0: none; 1: after a backslash; 2..5: inside \uXXXX (hex digits to come + 1)
    is_key: bool = False  # the open string is an object key
    expect: str = "value"  # value | value_or_end | key_or_end | key | colon | comma_or_end | done
    token: str = ""  # a number or literal being written
    last_key: str = ""  # the key whose value comes next (objects)


def _scan(prefix: str, schemas: _Schemas) -> _State:
    state = _State()
    for char in prefix:
        if state.in_string:
            _string_char(state, char)
        elif state.token and (char.isalnum() or char in "+-."):
            state.token += char
        else:
            if state.token:
                state.token = ""
                state.expect = "comma_or_end" if state.frames else "done"
            _structural(state, char, schemas)
    return state


def _string_char(state: _State, char: str) -> None:
    if state.escape == 1:
        state.escape = 5 if char == "u" else 0
    elif state.escape > 1:
        state.escape = 0 if state.escape == 2 else state.escape - 1
    elif char == "\\":
        state.escape = 1
    elif char == '"':
        state.in_string = False
        if state.is_key:
            state.last_key = json.loads(f'"{state.string}"')
            state.frames[-1].keys.append(state.last_key)
        state.expect = "colon" if state.is_key else ("comma_or_end" if state.frames else "done")
        return
    state.string += char


def _value_schema(state: _State, schemas: _Schemas, root: Schema) -> Schema:
    """The schema of the value that comes next (or is being written)."""
    if not state.frames:
        return root
    frame = state.frames[-1]
    if frame.opener == "{":
        return schemas.property(frame.schema, state.last_key)
    return schemas.items(frame.schema)


def _structural(state: _State, char: str, schemas: _Schemas) -> None:
    if char.isspace():
        return
    if char in "{[":
        schema = _value_schema(state, schemas, schemas.root)
        if state.frames and state.frames[-1].opener == "[":
            state.frames[-1].members += 1
        state.frames.append(_Frame(char, schemas.resolve(schema)))
        state.expect = "key_or_end" if char == "{" else "value_or_end"
    elif char in "}]":
        state.frames.pop()
        state.expect = "comma_or_end" if state.frames else "done"
    elif char == '"':
        state.in_string, state.string, state.escape = True, "", 0
        state.is_key = state.expect in ("key", "key_or_end")
        if state.is_key or (state.frames and state.frames[-1].opener == "["):
            state.frames[-1].members += 1
    elif char == ":":
        state.expect = "value"
    elif char == ",":
        state.expect = "key" if state.frames[-1].opener == "{" else "value"
    else:  # the first character of a number or a literal
        state.token = char
        if state.frames and state.frames[-1].opener == "[":
            state.frames[-1].members += 1


# ---- closing ------------------------------------------------------------------------------------


def _complete(prefix: str, options: list[str]) -> str | None:
    """The rest of the shortest option that starts with `prefix` (None: none does)."""
    fitting = [o for o in options if o.startswith(prefix)]
    return min(fitting, key=len)[len(prefix):] if fitting else None


def _finish_token(token: str, schema: Schema) -> str:
    """What a number or literal in progress still needs: a literal's rest, a digit after a sign,
    point or exponent, and zeros while a positive number is below the schema's minimum (its
    grammar lets "3" begin "36")."""
    for literal in _LITERALS:
        if literal.startswith(token):
            return literal[len(token):]
    out = "0" if token[-1] in "-+.eE" else ""
    minimum = schema.get("minimum", schema.get("exclusiveMinimum"))
    if isinstance(minimum, int | float) and not token.startswith("-") and "e" not in token.lower():
        while float(token + out) < minimum or (float(token + out) == minimum and "exclusiveMinimum" in schema):
            if len(out) > 20:
                break
            out += "0"
    return out


def _next_key(frame: _Frame, schemas: _Schemas) -> str:
    """A key to write after a comma: a missing required one, else any declared one not yet used."""
    schema = schemas.resolve(frame.schema)
    for key in [*schema.get("required", []), *schema.get("properties", {})]:
        if key not in frame.keys:
            return str(key)
    return ""


def closing(prefix: str, schema: Schema | None = None) -> str:
    """The shortest suffix that makes `prefix` (a prefix of a JSON value, as the grammar of
    `schema` — or of any JSON object — lets a model write it) one complete JSON value valid for
    `schema`; "" when it already is one. An empty prefix gets the schema's shortest value (`{}`
    without one: the JSON grammar's root is an object)."""
    schemas = _Schemas(schema or {"type": "object"})
    if not prefix.strip():
        return schemas.minimal(schemas.root)
    state = _scan(prefix, schemas)
    out = ""
    if state.in_string:
        if state.escape == 1:
            out += "n"
        elif state.escape > 1:
            out += "0" * (state.escape - 1)
        text = state.string + out
        if state.is_key:
            frame_schema = schemas.resolve(state.frames[-1].schema)
            names = [*frame_schema.get("required", []), *frame_schema.get("properties", {})]
            rest = _complete(text, [str(n) for n in names if n not in state.frames[-1].keys]) if names else ""
            out += (rest or "") + '"'
            state.last_key = text + (rest or "")
            state.frames[-1].keys.append(state.last_key)
            state.expect = "colon"
        else:
            allowed = schemas.allowed_strings(_value_schema(state, schemas, schemas.root))
            rest = _complete(text, allowed) if allowed else None
            minimum = int(_value_schema(state, schemas, schemas.root).get("minLength", 0))
            out += (rest or "a" * max(0, minimum - len(text))) + '"'
            state.expect = "comma_or_end"
    elif state.token:
        out += _finish_token(state.token, schemas.resolve(_value_schema(state, schemas, schemas.root)))
        state.expect = "comma_or_end"
    if state.expect == "colon":
        out += ":" + schemas.minimal(_value_schema(state, schemas, schemas.root))
    elif state.expect == "key":
        key = _next_key(state.frames[-1], schemas)
        state.frames[-1].keys.append(key)
        state.last_key = key
        out += f"{json.dumps(key)}:{schemas.minimal(_value_schema(state, schemas, schemas.root))}"
    elif state.expect == "value":
        out += schemas.minimal(_value_schema(state, schemas, schemas.root))
        if state.frames and state.frames[-1].opener == "[":
            state.frames[-1].members += 1
    for frame in reversed(state.frames):
        out += _close(frame, schemas)
    return out


def _close(frame: _Frame, schemas: _Schemas) -> str:
    """What an open object still needs (its missing required properties) or an open array (its
    minimum number of items), and its closing bracket."""
    schema = schemas.resolve(frame.schema)
    out = ""
    if frame.opener == "{":
        for key in schema.get("required", []):
            if key not in frame.keys:
                value = schemas.minimal(schemas.property(schema, key))
                out += ("," if frame.members else "") + f"{json.dumps(key)}:{value}"
                frame.members += 1
                frame.keys.append(key)
        return out + "}"
    for _ in range(max(0, int(schema.get("minItems", 0)) - frame.members)):
        out += ("," if frame.members else "") + schemas.minimal(schemas.items(schema))
        frame.members += 1
    return out + "]"
