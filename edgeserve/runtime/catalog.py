"""Every variant requests can run on, local and remote, by VariantId, behind one contract."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from edgeserve.config import PAIR_JOIN
from edgeserve.routing.batching import Board
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.local import LocalVariant
from edgeserve.runtime.registry import ModelRegistry, Target
from edgeserve.runtime.remote import RemoteVariant
from edgeserve.runtime.variant import Variant
from edgeserve.variant_id import VariantId


class Catalog:
    """``local`` and ``remote`` hold the two implementations (start-up, metrics and the model list
    need what is particular to each); everything that serves a request goes through `variant`."""

    def __init__(self, registry: ModelRegistry, local: dict[VariantId, LocalVariant],
                 remote: dict[VariantId, RemoteVariant]) -> None:
        self.registry = registry
        self.local = local
        self.remote = remote
        self._all: dict[VariantId, Variant] = {vid: self.variant_of(vid) for vid in registry.ids}

    @classmethod
    def build(cls, registry: ModelRegistry, residency: ResidencyManager | None,
              profiles: dict[VariantId, CostProfile] | None = None,
              on_observed: Callable[[], None] | None = None) -> Catalog:
        """One LocalVariant per runner (sharing the stepping loop and the memory budget), one
        RemoteVariant per remote variant, counting its prompts with its family's default."""
        profiles = profiles or {}
        local: dict[VariantId, LocalVariant] = {}
        remote: dict[VariantId, RemoteVariant] = {}
        for family in registry.models.families:
            for variant in family.local_variants:
                vid = VariantId(family.name, variant.name)
                local[vid] = LocalVariant(vid, registry.runners[str(vid)], residency,
                                          profiles.get(vid), on_observed)
            for pair in family.speculative_variants:  # both halves stay resident (start-up checks)
                vid = VariantId(family.name, pair.name)
                target = pair.name.partition(PAIR_JOIN)[0]
                local[vid] = LocalVariant(vid, registry.runners[str(vid)], None, profiles.get(vid), on_observed,
                                          curve_name=target)
        for family in registry.models.families:
            counter = local[VariantId(family.name, family.default.name)]
            for variant in family.variants:
                if variant.remote:
                    vid = VariantId(family.name, variant.name)
                    remote[vid] = RemoteVariant(vid, variant, counter)
        return cls(registry, local, remote)

    def variant_of(self, vid: VariantId) -> Variant:
        found: Variant | None = self.local.get(vid) or self.remote.get(vid)
        if found is None:
            raise KeyError(f"{vid} is not a configured variant")
        return found

    def __getitem__(self, vid: VariantId) -> Variant:
        return self._all[vid]

    def __iter__(self) -> Iterator[Variant]:
        return iter(self._all.values())

    def __len__(self) -> int:
        return len(self._all)

    def resolve(self, name: str) -> Target:
        return self.registry.resolve(name)

    @property
    def ready(self) -> bool:
        return all(v.ready for v in self._all.values())

    def status(self) -> str:
        calibrated = sum(v.profile is not None for v in self.local.values())
        return f"{self.registry.loading_status()}, {calibrated}/{len(self.local)} calibrated"

    def set_profiles(self, profiles: dict[str, CostProfile]) -> None:
        """Start-up found (or measured) the local variants' profiles, keyed by variant id string
        as their files are."""
        for vid, variant in self.local.items():
            if str(vid) in profiles:
                variant.profile = profiles[str(vid)]

    def board(self) -> Board:
        """The stepping loop as admission sees it now: what runs and waits on every local
        variant with a profile (routing.batching predicts from it who finishes when)."""
        profiles = {str(vid): v.profile for vid, v in self.local.items() if v.profile is not None}
        parallel = {str(vid): v.parallel for vid, v in self.local.items()}
        return self.registry.stepper.board(profiles, parallel, time.perf_counter())

    def note_unserved(self, variant_ids: tuple[str, ...], until: float | None) -> None:
        """A request turned away only because these local variants were busy (unmet demand,
        see Stepper.note_unserved); without a deadline it cannot have been."""
        if until is not None and variant_ids:
            self.registry.stepper.note_unserved(variant_ids, until)

    def local_profiles(self) -> dict[str, CostProfile]:
        """The live profiles of the local variants (what start-up stored and the saver writes)."""
        return {str(vid): v.profile for vid, v in self.local.items() if v.profile is not None}
