"""edgeserve/variant_id.py: the value type behind every "family:name" on the wire."""

from __future__ import annotations

import pytest

from edgeserve.variant_id import VariantId


def test_it_prints_and_parses_as_the_wire_string() -> None:
    vid = VariantId("smollm2-135m", "q8_0")
    assert str(vid) == "smollm2-135m:q8_0" and f"{vid}" == "smollm2-135m:q8_0"
    assert VariantId.parse("smollm2-135m:q8_0") == vid
    assert VariantId.parse(str(vid)) is not vid and VariantId.parse(str(vid)) == vid


def test_it_is_a_hashable_value() -> None:
    table = {VariantId("fam", "q2_k"): 1}
    assert table[VariantId.parse("fam:q2_k")] == 1
    assert VariantId("a", "q8_0") != VariantId("b", "q8_0")  # two families may share a variant name
    assert sorted([VariantId("b", "x"), VariantId("a", "y")])[0].family == "a"
    with pytest.raises(AttributeError):
        vid = VariantId("fam", "q2_k")
        vid.name = "q8_0"  # type: ignore[misc]


@pytest.mark.parametrize("text", ["fam", "fam:", ":q2_k", "fam:q2_k:x", ""])
def test_anything_else_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="expected 'family:variant'"):
        VariantId.parse(text)


def test_the_parts_cannot_hold_the_separator() -> None:
    with pytest.raises(ValueError, match="not a variant id"):
        VariantId("fam:x", "q2_k")
    with pytest.raises(ValueError, match="not a variant id"):
        VariantId("fam", "")
