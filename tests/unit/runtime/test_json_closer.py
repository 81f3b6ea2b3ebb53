"""Every prefix of a JSON document, finished with `closing`, parses."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from edgeserve.runtime.json_closer import closing

DOCS = [
    '{"name": "Ada", "age": 36, "langs": ["en", "fr"], "ok": true, "x": null, "f": false}',
    '{"a": {"b": [1, -2.5e+3, {"c": "q\\"uote\\\\ \\u00e9 \\n"}], "d": []}, "e": {}}',
    '{ "k" : [ 0.125 , 1E-7 , -0 , "" ] , "t":true }',
    "{}",
]


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["num", "str", "lit", "list", "obj"] if depth < 3 else ["num", "str", "lit"])
    if kind == "num":
        return rng.choice([0, -1, 3.25, 1e-9, -2.5e12, 42])
    if kind == "str":
        return "".join(rng.choice('ab"\\\n é\t/') for _ in range(rng.randint(0, 5)))
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}" + rng.choice(["", "é", '"']): random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("doc", DOCS)
def test_every_prefix_of_a_document_closes_into_json(doc: str) -> None:
    for end in range(len(doc) + 1):
        prefix = doc[:end]
        json.loads(prefix + closing(prefix))


def test_random_documents_close_at_every_prefix() -> None:
    rng = random.Random(7)
    for _ in range(300):
        doc = json.dumps({"root": random_value(rng)}, ensure_ascii=rng.random() < 0.5,
                         indent=rng.choice([None, 1]))
        for end in range(len(doc) + 1):
            prefix = doc[:end]
            json.loads(prefix + closing(prefix))


@pytest.mark.parametrize("prefix,suffix", [
    ("", "{}"), ("{", "}"), ('{"a', '":null}'), ('{"a":', "null}"), ('{"a": [1,', "null]}"),
    ('{"a": tr', "ue}"), ('{"a": nu', "ll}"), ('{"a": -', "0}"), ('{"a": 1e', "0}"), ('{"a": 12', "}"),
    ('{"a": "x\\', 'n"}'), ('{"a": "\\u12', '00"}'), ('{"a": 1,', '"":null}'), ('{"a": {}}', ""),
])
def test_the_closing_is_the_short_one(prefix: str, suffix: str) -> None:
    assert closing(prefix) == suffix


# ---- with a schema: every prefix closes into JSON that validates ---------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "age": {"type": "integer", "minimum": 18},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "pet": {"$ref": "#/$defs/Pet"},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "tags", "pet", "ok"],
    "additionalProperties": False,
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "legs": {"type": "number"}},
                      "required": ["kind", "legs"]}},
}
PERSON_DOCS = [
    '{"name": "Ada \\"L\\"", "age": 36, "colour": "green", "tags": ["a", "b", "c"], '
    '"pet": {"kind": "cat", "legs": 4.5}, "nick": null, "ok": true}',
    '{"name":"Bo","age":18,"colour":"red","tags":["x","y"],"pet":{"kind":"cat","legs":-1e3},"ok":false}',
]


@pytest.mark.parametrize("doc", PERSON_DOCS)
def test_every_prefix_closes_into_json_valid_for_the_schema(doc: str) -> None:
    jsonschema.validate(json.loads(doc), PERSON)  # the documents themselves are valid
    for end in range(len(doc) + 1):
        prefix = doc[:end]
        jsonschema.validate(json.loads(prefix + closing(prefix, PERSON)), PERSON)


@pytest.mark.parametrize("prefix,suffix", [
    ("", '{"name":"aa","age":18,"colour":"red","tags":["",""],"pet":{"kind":"cat","legs":0},"ok":false}'),
    ('{"name": "A', 'a","age":18,"colour":"red","tags":["",""],"pet":{"kind":"cat","legs":0},"ok":false}'),
    ('{"name": "Ann", "age": 40, "colour": "gr', 'een","tags":["",""],"pet":{"kind":"cat","legs":0},"ok":false}'),
    ('{"name": "Ann", "age": 40, "colour": "red", "tags": ["q"', ',""],"pet":{"kind":"cat","legs":0},"ok":false}'),
])
def test_missing_required_properties_get_their_shortest_values(prefix: str, suffix: str) -> None:
    assert closing(prefix, PERSON) == suffix
