"""`edgeserve simulate --speculative`: a projected pair beside the study's two variants.

(The rest of the command is tested with its pure core in tests/unit/routing/test_simulator.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from edgeserve.cli import build_parser
from edgeserve.errors import ConfigError
from edgeserve.policies import load_policy
from edgeserve.routing.costs import CostProfile
from edgeserve.routing.simulator import choice_spans
from edgeserve.tools.simulate import candidates_from, load_profiles, run_simulate, with_speculative_pair
from tests.unit.routing.conftest import POLICIES

POLICY = POLICIES / "llama31-8b-rk3568.toml"
PROFILE = POLICIES / "llama31-8b-rk3568.profile.json"
STUDY = ["--policy", str(POLICY), "--profile", str(PROFILE), "--requests", "5", "--rows", "4"]
HOUR = 3_600_000.0


def run(argv: list[str]) -> int:
    return run_simulate(build_parser().parse_args(["simulate", *argv]))


def spans_with_pair(acceptance: float = 0.8) -> list[tuple[str | None, float, float | None]]:
    profiles = load_profiles(PROFILE)
    pair = with_speculative_pair(profiles, "q8_0+q2_k", acceptance=acceptance, draft_len=4,
                                 verify_factor=1.1)
    candidates = candidates_from([*profiles, pair], 4096)
    spans = choice_spans(load_policy(POLICY), candidates, 150)
    return [(s.variant, s.from_ms, s.to_ms) for s in spans]


def test_the_pair_wins_the_long_deadlines_with_the_studys_costs() -> None:
    """Q2_K at 18.18 s/token, Q8_0 at 49.73 s/token; a = 0.8, k = 4, verify 1.1: the pair costs
    0.76x of Q8_0 per token and takes every deadline Q8_0 used to win, from earlier on."""
    (refused, *_), (q2, _, switch), (pair, start, end) = spans_with_pair()
    assert (refused, q2, pair) == (None, "q2_k", "q8_0+q2_k")
    assert start == switch and end is None
    assert 2 * HOUR < switch < 2.5 * HOUR  # plain Q8_0 overtakes Q2_K only at 2 h 49 min


def test_a_pair_that_costs_more_than_its_target_is_never_chosen() -> None:
    assert [variant for variant, _, _ in spans_with_pair(acceptance=0.0)] == [None, "q2_k", "q8_0"]


def test_run_prints_the_assumption_and_the_choice_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([*STUDY, "--speculative", "q8_0+q2_k"]) == 0
    out = capsys.readouterr().out
    assert "q8_0+q2_k = llama31-8b:q8_0+q2_k (curve q8_0)" in out
    assert ("speculative q8_0+q2_k (PROJECTED, not measured): q2_k drafts 4 tokens per step, q8_0 "
            "verifies them in one pass costing 1.1 one-token steps; acceptance 0.8 (assumed) → "
            "3.36 tokens per step; effective 37.9 s/token vs q8_0's 49.7 s/token (0.76×)") in out
    assert "  q8_0+q2_k  2 h 9 min" in out and "and longer" in out
    assert "crossover: q8_0+q2_k overtakes q2_k at a deadline of 2 h 9 min" in out


def test_the_options_change_the_projection(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*STUDY, "--speculative", "q8_0+q2_k", "--acceptance", "0.95", "--draft-len", "6",
            "--verify-factor", "1.0"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "drafts 6 tokens per step" in out and "acceptance 0.95 (assumed) → 6.03 tokens" in out


def test_a_profile_file_that_has_the_pair_routes_it_by_its_targets_curve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profiles = load_profiles(PROFILE)
    pair = with_speculative_pair(profiles, "q8_0+q2_k", acceptance=0.8, draft_len=4,
                                 verify_factor=1.1)
    assert [c.name for c in candidates_from([*profiles, pair], 4096)] == ["q2_k", "q8_0", "q8_0"]
    with_pair = tmp_path / "profiles.json"
    with_pair.write_text(json.dumps([*json.loads(PROFILE.read_text()),
                                     json.loads(msgspec.json.encode(pair))]))
    argv = ["--policy", str(POLICY), "--profile", str(with_pair), "--requests", "5", "--rows", "4"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    assert "crossover: q8_0+q2_k overtakes q2_k at a deadline of 2 h 9 min" in out
    assert run([*argv, "--speculative", "q8_0+q2_k"]) == 2
    assert "already has llama31-8b:q8_0+q2_k; leave out --speculative" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--speculative", "q8_0+q4_0"], "--speculative q8_0+q4_0: no variant 'q4_0' in the profile "
                                     "file (it has q2_k, q8_0)"),
    (["--speculative", "q6_k+q4_0"], "no variant 'q6_k' or 'q4_0'"),
    (["--speculative", "q8_0"], "--speculative: expected TARGET+DRAFT, for example q8_0+q2_k"),
    (["--speculative", "q8_0+q2_k", "--acceptance", "81.8"],
     "acceptance must be a probability between 0 and 1"),
    (["--speculative", "q8_0+q2_k", "--verify-factor", "0.5"],
     "verify_factor must be a finite number of at least 1"),
])
def test_bad_speculative_options_fail_with_a_message(
        capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    assert run([*STUDY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_draft_must_be_of_the_targets_family() -> None:
    profiles = load_profiles(PROFILE)
    other = [profiles[0], CostProfile(variant_id="other:q8_0", prefill_ms_per_token=1.0,
                                      decode_ms_per_token=2.0)]
    with pytest.raises(ConfigError, match="not of one family"):
        with_speculative_pair(other, "q8_0+q2_k", acceptance=0.8, draft_len=4, verify_factor=1.1)


def test_draft_len_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", *STUDY, "--draft-len", "0"])
    assert "must be at least 1" in capsys.readouterr().err
