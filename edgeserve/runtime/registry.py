"""Which variants exist, which are loaded, and what a `model` name refers to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeserve.config import FamilyConfig, ModelsFile, VariantConfig
from edgeserve.errors import ModelNotFoundError, NotReadyError
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.remote import RemoteVariant
from edgeserve.runtime.runner import LlamaRunner


@dataclass(frozen=True)
class Target:
    """What a request's `model` field resolved to: a family, and a variant if pinned."""

    family: FamilyConfig
    pinned: VariantConfig | None

    def variant_id(self, variant: VariantConfig) -> str:
        return f"{self.family.name}:{variant.name}"


class ModelRegistry:
    def __init__(self, models: ModelsFile, prepared: dict[str, PreparedVariant]) -> None:
        self.models = models
        self.runners: dict[str, LlamaRunner] = {}
        self.remotes: dict[str, RemoteVariant] = {}  # created on the event loop: see open_remotes
        for family in models.families:
            for variant in family.local_variants:
                variant_id = f"{family.name}:{variant.name}"
                self.runners[variant_id] = LlamaRunner(variant_id, prepared[variant_id].path, variant)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.models.families] + [
            f"{f.name}:{v.name}" for f in self.models.families for v in f.variants]

    def open_remotes(self) -> dict[str, RemoteVariant]:
        """The remote variants, with their HTTP clients (call on the serving event loop)."""
        for family in self.models.families:
            for variant in family.variants:
                variant_id = f"{family.name}:{variant.name}"
                if variant.remote and variant_id not in self.remotes:
                    self.remotes[variant_id] = RemoteVariant(variant_id, variant)
        return self.remotes

    def resolve(self, name: str) -> Target:
        """A family name routes; `family:variant` pins. Unknown names are an error, never a fallback."""
        family_name, _, variant_name = name.partition(":")
        family = next((f for f in self.models.families if f.name == family_name), None)
        if family is None:
            raise ModelNotFoundError(name, self.names)
        if not variant_name:
            return Target(family, None)
        variant = family.variant(variant_name)
        if variant is None:
            raise ModelNotFoundError(name, self.names)
        return Target(family, variant)

    def runner(self, variant_id: str) -> LlamaRunner:
        runner = self.runners[variant_id]
        if not runner.usable:  # usable: loaded, or parked by the memory budget (issue 7)
            raise NotReadyError(f"{variant_id} is not loaded yet")
        return runner

    @property
    def ready(self) -> bool:
        return all(r.usable for r in self.runners.values())

    def loading_status(self) -> str:
        done = sum(r.usable for r in self.runners.values())
        resident = sum(r.loaded for r in self.runners.values())
        parked = f" ({resident} resident)" if resident != done else ""
        return f"{done}/{len(self.runners)} variants loaded{parked}"

    async def load_all(self, on_loaded: Callable[[LlamaRunner], None] | None = None) -> None:
        """Load one variant after another: on a small board, parallel loads only thrash storage."""
        for runner in self.runners.values():
            await runner.load()
            if on_loaded is not None:
                on_loaded(runner)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
