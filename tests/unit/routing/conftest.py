"""Small hand-computable profiles and policies, and the study's shipped policy + profiles."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy import VariantCandidate
from edgeserve.routing.policy_file import PolicyFile, parse_policy
from edgeserve.tools.simulate import candidates_from

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "policies"


def flat_profile(variant_id: str, ms_per_token: float) -> CostProfile:
    """predict_ms(p, n) == n * ms_per_token exactly: prefill costs one token, no growth."""
    return CostProfile(variant_id=variant_id, prefill_fixed_ms=ms_per_token,
                       prefill_ms_per_token=0.0, decode_ms_per_token=ms_per_token)


def candidate(name: str, ms_per_token: float, *, n_ctx: int = 4096,
              available: bool = True) -> VariantCandidate:
    return VariantCandidate(variant_id=f"fam:{name}", name=name,
                            profile=flat_profile(f"fam:{name}", ms_per_token), n_ctx=n_ctx,
                            available=available)


SIMPLE_POLICY = b"""
name = "simple"
[routing]
min_useful_tokens = 16
safety_margin_ms = 0
safety_margin_ratio = 0
default_max_tokens = 256

[curves.fast.boxed]
budgets = [100, 200]
accuracy = [0.3, 0.4]

[curves.slow.boxed]
budgets = [100, 200]
accuracy = [0.2, 0.8]
"""


@pytest.fixture
def simple_policy() -> PolicyFile:
    """fast: 10 ms/token, 0.3 @100, 0.4 @200; slow: 30 ms/token, 0.2 @100, 0.8 @200; no margin."""
    return parse_policy(SIMPLE_POLICY, "simple.toml")


@pytest.fixture
def fast_slow() -> list[VariantCandidate]:
    return [candidate("fast", 10.0), candidate("slow", 30.0)]


@pytest.fixture(scope="session")
def study_policy() -> PolicyFile:
    path = POLICIES / "llama31-8b-rk3568.toml"
    return parse_policy(path.read_bytes(), str(path))


@pytest.fixture(scope="session")
def study_candidates() -> list[VariantCandidate]:
    raw = (POLICIES / "llama31-8b-rk3568.profile.json").read_bytes()
    return candidates_from(msgspec.json.decode(raw, type=list[CostProfile]), 4096)
