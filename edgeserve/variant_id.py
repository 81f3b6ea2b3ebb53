"""`VariantId`: which variant of which family, as a value (never a string built or split by hand).

On the wire — headers, JSON bodies, log lines, metric labels, the keys of profile files — a
variant id is the string ``family:name`` (``smollm2-135m:q8_0``): ``str(vid)`` writes it and
``VariantId.parse`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = ":"


@dataclass(frozen=True, slots=True, order=True)
class VariantId:
    family: str
    name: str

    def __post_init__(self) -> None:
        if not self.family or not self.name or SEPARATOR in self.family or SEPARATOR in self.name:
            raise ValueError(f"not a variant id: family {self.family!r}, variant {self.name!r} "
                             f"(both non-empty, without '{SEPARATOR}')")

    def __str__(self) -> str:
        return f"{self.family}{SEPARATOR}{self.name}"

    @classmethod
    def parse(cls, text: str) -> VariantId:
        """``"family:name"`` → VariantId; anything else is a ValueError that says what was expected."""
        family, sep, name = text.partition(SEPARATOR)
        if not sep or not family or not name or SEPARATOR in name:
            raise ValueError(f"{text!r} is not a variant id: expected 'family{SEPARATOR}variant', "
                             f"for example 'smollm2-135m{SEPARATOR}q8_0'")
        return cls(family, name)
