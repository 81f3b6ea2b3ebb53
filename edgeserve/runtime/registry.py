"""Which local model files are configured, their runners, and what a `model` name refers to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeserve.config import FamilyConfig, ModelsFile, VariantConfig
from edgeserve.errors import ModelNotFoundError, NotReadyError
from edgeserve.runtime.pair_runner import PairRunner
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.stepper import Stepper
from edgeserve.variant_id import SEPARATOR, VariantId


@dataclass(frozen=True)
class Target:
    """What a request's `model` field resolved to: a family, and a variant if pinned."""

    family: FamilyConfig
    pinned: VariantConfig | None

    def variant_id(self, variant: VariantConfig) -> VariantId:
        return VariantId(self.family.name, variant.name)

    @property
    def ids(self) -> list[VariantId]:
        """Every variant of the family (the routing candidates), in models.toml order."""
        return [self.variant_id(v) for v in self.family.routable]

    @property
    def pinned_id(self) -> VariantId | None:
        return None if self.pinned is None else self.variant_id(self.pinned)

    @property
    def tokenizer_id(self) -> VariantId:
        """The local variant that counts this request's prompt tokens before routing: the pinned
        variant when it is local, else the family's default (remote variants have no tokenizer)."""
        local_pin = self.pinned if self.pinned is not None and not self.pinned.remote else None
        return self.variant_id(local_pin or self.family.default)


class ModelRegistry:
    """The families of models.toml and one LlamaRunner per local variant (keyed by the runner's
    own id, ``str(VariantId)``), all in one stepping loop. The variants requests run on, local
    and remote behind one contract, are in `edgeserve.runtime.catalog`."""

    def __init__(self, models: ModelsFile, prepared: dict[str, PreparedVariant],
                 stepper: Stepper | None = None) -> None:
        self.models = models
        self.stepper = stepper or Stepper()
        self.runners: dict[str, LlamaRunner] = {}
        for family in models.families:
            for variant in family.local_variants:
                variant_id = str(VariantId(family.name, variant.name))
                self.runners[variant_id] = LlamaRunner(variant_id, prepared[variant_id].path, variant, self.stepper)
        self.pairs: dict[str, PairRunner] = {}  # loaded after the variants they compose
        for family in models.families:
            for pair in family.speculative_variants:
                composed = family.pair(pair.name)
                assert composed is not None
                target, draft = composed
                pair_id = str(VariantId(family.name, pair.name))
                self.pairs[pair_id] = PairRunner(pair_id, self.runners[str(VariantId(family.name, target.name))],
                                                 self.runners[str(VariantId(family.name, draft.name))])
        self.runners.update(self.pairs)

    @property
    def file_runners(self) -> dict[str, LlamaRunner]:
        """The runners that load a GGUF file of their own (every one but the speculative pairs)."""
        return {v: r for v, r in self.runners.items() if v not in self.pairs}

    @property
    def ids(self) -> list[VariantId]:
        """Every configured variant, local and remote, in models.toml order."""
        return [VariantId(f.name, v.name) for f in self.models.families for v in f.routable]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.models.families] + [str(v) for v in self.ids]

    def family(self, name: str) -> FamilyConfig | None:
        return next((f for f in self.models.families if f.name == name), None)

    def resolve(self, name: str) -> Target:
        """A family name routes; `family:variant` pins. Unknown names are an error, never a fallback."""
        if SEPARATOR not in name:
            family = self.family(name)
            if family is None:
                raise ModelNotFoundError(name, self.names)
            return Target(family, None)
        try:
            variant_id = VariantId.parse(name)
        except ValueError:
            raise ModelNotFoundError(name, self.names) from None
        family = self.family(variant_id.family)
        variant = None if family is None else family.variant(variant_id.name)
        if family is None or variant is None:
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
        """End the loop (what still runs ends as cancelled, what waits is refused), then free
        every variant."""
        self.stepper.close()
        for runner in reversed(self.runners.values()):  # the pairs before the variants they use
            runner.close()
