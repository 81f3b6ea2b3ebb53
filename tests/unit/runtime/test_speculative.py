"""SpeculativeDecoder in the stepping loop, over fake decoders whose next token is a known rule.

The target's greedy token after a KV is (sum of the KV) % 97 + 1 (tests.unit.runtime.test_stepper's
FakeDecoder); a draft follows the same rule except where `wrong(kv)` says it guesses + 1. So every
test knows the target's own text and which drafts must be rejected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pytest

from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.decoder import BatchEntry
from edgeserve.runtime.sequence import TAIL_RESERVE_S, AnswerForcing, GenerationJob, SamplingParams, common_prefix
from edgeserve.runtime.speculative import SpeculativeDecoder, lossless_greedy
from edgeserve.runtime.stepper import Stepper
from tests.unit.runtime.test_stepper import FakeDecoder, expected_text, job, submit

VOCAB = 98  # the rule's tokens are 1..97


class FakeModel(FakeDecoder):
    """A fake decoder with `n_seq_max` places whose greedy rule may be wrong where `wrong` says."""

    def __init__(self, n_seq_max: int = 8, wrong: Callable[[list[int]], bool] = lambda kv: False,
                 n_ctx: int = 512, n_batch: int = 128, step_s: float = 0.0) -> None:
        super().__init__(n_ctx=n_ctx, n_batch=n_batch, step_s=step_s)
        self.n_seq_max = n_seq_max
        self.wrong = wrong

    def next_after(self, kv: list[int]) -> int:  # type: ignore[override]
        token = sum(kv) % 97 + 1
        return token % 97 + 1 if self.wrong(kv) else token

    def step(self, entries: Sequence[BatchEntry]) -> dict[int, list[int]]:
        for entry in entries:
            assert 0 <= entry.seq_id < self.n_seq_max
        out = super().step(entries)
        self.rows = dict(out)
        return out

    def logits_of(self, seq_id: int) -> np.ndarray:
        """Logits so peaked at the rule's token (50 against -50) that sampling picks it: the
        sampled path must then give the rule's text too."""
        rows = np.full((len(self.rows[seq_id]), VOCAB), -50.0, dtype=np.float32)
        rows[np.arange(len(self.rows[seq_id])), self.rows[seq_id]] = 50.0
        return rows

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [int(t) for t in text.split()]


def pair(draft_wrong: Callable[[list[int]], bool] = lambda kv: False, draft_max: int = 4,
         parallel: int = 2, step_s: float = 0.0) -> tuple[SpeculativeDecoder, FakeModel, FakeModel]:
    target = FakeModel(n_seq_max=2 * parallel, step_s=step_s)
    draft = FakeModel(n_seq_max=2 * parallel, wrong=draft_wrong)
    decoder = SpeculativeDecoder(target, draft, parallel=parallel, target_first=parallel,  # type: ignore[arg-type]
                                 draft_first=parallel, draft_max=draft_max)
    return decoder, target, draft


@pytest.fixture
def stepper() -> Iterable[Stepper]:
    s = Stepper(chunk_tokens=8)
    yield s
    s.close()


def test_common_prefix_counts_the_leading_drafts_the_target_chose_too() -> None:
    assert common_prefix([5, 6, 7], [5, 6, 9, 1]) == 2
    assert common_prefix([5, 6], [4, 6, 1]) == 0
    assert common_prefix([5, 6], [5, 6, 3]) == 2


def test_only_greedy_decoding_without_penalties_is_verified_by_argmax() -> None:
    assert lossless_greedy(SamplingParams(temperature=0.0))
    assert not lossless_greedy(SamplingParams(temperature=0.7))
    assert not lossless_greedy(SamplingParams(temperature=0.0, repeat_penalty=1.1))


async def test_the_text_is_the_targets_own_greedy_text(stepper: Stepper) -> None:
    decoder, _, _ = pair(draft_wrong=lambda kv: sum(kv) % 3 == 0)
    stepper.attach("f:q8+q2", decoder, parallel=2)
    prompts = [[5, 6, 7], [11, 12]]
    generations = [submit(stepper, "f:q8+q2", job(p, 50)) for p in prompts]
    texts = await asyncio.gather(*(g.text() for g in generations))
    assert texts == [expected_text(p, 50) for p in prompts]
    stats = stepper.stats("f:q8+q2")
    assert stats is not None and 0 < stats.accepted_tokens < stats.drafted_tokens
    for g in generations:
        assert g.result is not None and g.result.predicted_n == 50
        assert g.result.drafted_n > 0 and 0 < g.result.accepted_n < g.result.drafted_n
        assert len(g.result.token_ms) == 49  # one interval per token, accepted ones 0 ms


async def test_all_drafts_accepted_give_draft_max_plus_one_tokens_a_step(stepper: Stepper) -> None:
    decoder, target, _ = pair(draft_max=3)
    stepper.attach("f:p", decoder, parallel=2)
    generation = submit(stepper, "f:p", job([1, 2, 3], 41))
    assert await generation.text() == expected_text([1, 2, 3], 41)
    verify_steps = [e for s in target.steps for e in s if e.verify]
    assert len(verify_steps) == 10  # 1 token from the prompt's step, then 40 in steps of 4
    assert all(len(e.tokens) == 4 for e in verify_steps)
    assert generation.result is not None and generation.result.accepted_n == generation.result.drafted_n == 30


async def test_a_rejected_first_draft_rolls_both_caches_back(stepper: Stepper) -> None:
    decoder, target, draft = pair(draft_wrong=lambda kv: True)
    stepper.attach("f:p", decoder, parallel=2)
    generation = submit(stepper, "f:p", job([4, 4], 20))
    assert await generation.text() == expected_text([4, 4], 20)
    assert generation.result is not None and generation.result.accepted_n == 0
    # the target's KV holds exactly the prompt and the tokens fed (the last sampled one is not)
    text_tokens = [int(t) for t in expected_text([4, 4], 20).split()]
    assert target.kv[2] == [4, 4, *text_tokens[:-1]]
    assert draft.kv[2][:3] == [4, 4, text_tokens[0]]  # cut past the first disagreement when it catches up


async def test_drafts_never_run_past_the_tokens_left(stepper: Stepper) -> None:
    decoder, target, _ = pair(draft_max=6)
    stepper.attach("f:p", decoder, parallel=2)
    generation = submit(stepper, "f:p", job([9], 10))
    assert await generation.text() == expected_text([9], 10)
    verified = [len(e.tokens) for s in target.steps for e in s if e.verify]
    assert verified == [7, 2]  # 1 + 6 drafts, then 1 + the 1 draft that was left room for
    assert target.kv[2][-1] != 0 and len(target.kv[2]) == 1 + 9


async def test_a_stop_string_inside_accepted_drafts_ends_the_text_there(stepper: Stepper) -> None:
    decoder, target, _ = pair(draft_max=6)
    stepper.attach("f:p", decoder, parallel=2)
    full_text = expected_text([3, 1], 30)
    stop = f" {full_text.split()[4]} "  # the fifth token, with the spaces around it
    j = GenerationJob([3, 1], 30, SamplingParams(temperature=0.0), stop=(stop,), ignore_eos=True)
    generation = submit(stepper, "f:p", j)
    text = await generation.text()
    assert text == full_text[: full_text.index(stop)]
    assert generation.result is not None and generation.result.finish == "stop"
    if full_text.index(stop) == len(" ".join(full_text.split()[:4])):  # the stop is the fifth token
        assert len(target.kv[2]) == 2 + 4  # the KV was cut back to the tokens the sequence used


async def test_a_cancelled_request_leaves_its_place_to_the_next_one(stepper: Stepper) -> None:
    decoder, target, draft = pair(draft_wrong=lambda kv: sum(kv) % 4 == 0, parallel=1, step_s=0.002)
    stepper.attach("f:p", decoder, parallel=1)
    first = submit(stepper, "f:p", job([2, 3], 400))
    await first.joined
    await asyncio.sleep(0.01)
    first.cancel()
    await first.text()
    assert first.result is not None and first.result.finish == "cancelled" and first.result.predicted_n < 400
    second = submit(stepper, "f:p", job([2, 5], 30))
    assert await second.text() == expected_text([2, 5], 30)
    decoder.free_sequence(0)
    assert 1 not in target.kv and 1 not in draft.kv


async def test_a_sampled_request_speculates_by_the_rejection_rule(stepper: Stepper) -> None:
    decoder, target, _ = pair(draft_wrong=lambda kv: sum(kv) % 3 == 0)
    stepper.attach("f:p", decoder, parallel=2)
    j = GenerationJob([1, 2], 40, SamplingParams(temperature=0.8, seed=1), ignore_eos=True)
    generation = submit(stepper, "f:p", j)
    # the distributions are one-hot in effect: a rejected draft is replaced by the target's token
    assert await generation.text() == expected_text([1, 2], 40)
    result = generation.result
    assert result is not None and 0 < result.accepted_n < result.drafted_n
    assert any(e.verify for s in target.steps for e in s)


async def test_a_request_with_repetition_penalties_is_decoded_by_the_target_alone(stepper: Stepper) -> None:
    decoder, target, draft = pair()
    stepper.attach("f:p", decoder, parallel=2)
    j = GenerationJob([1, 2], 12, SamplingParams(temperature=0.0, presence_penalty=0.5), ignore_eos=True)
    generation = submit(stepper, "f:p", j)
    await generation.text()
    assert generation.result is not None and generation.result.drafted_n == 0
    assert not any(e.verify for s in target.steps for e in s) and not draft.steps


def test_a_pair_needs_room_in_both_contexts() -> None:
    target, draft = FakeModel(n_seq_max=2), FakeModel(n_seq_max=4)
    with pytest.raises(ValueError, match="room"):
        SpeculativeDecoder(target, draft, parallel=2, target_first=1, draft_first=2, draft_max=4)  # type: ignore[arg-type]


class ClockedModel(FakeModel):
    """A target whose every step (a verify pass, drafts included) takes 30 ms of a fake clock."""

    def __init__(self, n_seq_max: int) -> None:
        super().__init__(n_seq_max=n_seq_max)
        self.ms = 0

    def clock(self) -> float:
        return self.ms / 1000

    def step(self, entries: Sequence[BatchEntry]) -> dict[int, list[int]]:
        out = super().step(entries)
        self.ms += 30
        return out


async def test_speculative_steps_stop_before_the_deadline() -> None:
    target, draft = ClockedModel(n_seq_max=2), FakeModel(n_seq_max=2)
    decoder = SpeculativeDecoder(target, draft, parallel=1, target_first=1, draft_first=1,  # type: ignore[arg-type]
                                 draft_max=3)
    stepper = Stepper(chunk_tokens=8, clock=target.clock)
    # a step yields 4 tokens at 7.5 ms each: 30 ms a step, as the fake clock runs
    profile = CostProfile(variant_id="f:p", prefill_ms_per_token=1.0, decode_ms_per_token=7.5, tokens_per_step=4.0)
    stepper.attach("f:p", decoder, parallel=1, profile=lambda: profile)
    try:
        generation = submit(stepper, "f:p", job([1, 2], 10_000, deadline_at=0.5))
        await generation.text()
        assert generation.result is not None and generation.result.finish == "deadline"
        assert target.ms <= 500 - TAIL_RESERVE_S * 1000  # its last step ended in time, with the tail kept
        assert generation.result.predicted_n > 40  # 4 tokens a step, not 1
    finally:
        stepper.close()


async def test_adaptive_drafts_shrink_where_the_draft_is_wrong_and_grow_back(stepper: Stepper) -> None:
    target = FakeModel(n_seq_max=2)
    draft = FakeModel(n_seq_max=2, wrong=lambda kv: len(kv) < 20)  # wrong early, right later
    decoder = SpeculativeDecoder(target, draft, parallel=1, target_first=1, draft_first=1,  # type: ignore[arg-type]
                                 draft_max=6, adaptive=True)
    stepper.attach("f:p", decoder, parallel=1)
    generation = submit(stepper, "f:p", job([1, 2], 60))
    assert await generation.text() == expected_text([1, 2], 60)
    lengths = [len(e.tokens) - 1 for s in target.steps for e in s if e.verify]
    assert lengths[:6] == [6, 5, 4, 3, 2, 1]  # one fewer after each rejection
    assert 6 in lengths[6:]  # then back up to draft_max while everything is accepted


async def test_a_forced_answer_prefix_gives_the_same_text_as_the_target_alone(stepper: Stepper) -> None:
    # prefix tokens the rule never makes, so the KV shows where they went
    forcing = AnswerForcing(prefix_tokens=(500, 501, 502), prefix_text=" {", reserve=4, marker="}}")
    j = GenerationJob([7, 8], 30, SamplingParams(temperature=0.0), ignore_eos=True, forcing=forcing)
    stepper.attach("f:plain", FakeModel(n_seq_max=1), parallel=1)
    decoder, target, _ = pair(draft_wrong=lambda kv: sum(kv) % 5 == 0, draft_max=4)
    stepper.attach("f:pair", decoder, parallel=2)
    plain = await submit(stepper, "f:plain", j).text()
    speculative = submit(stepper, "f:pair", j)
    assert await speculative.text() == plain and " {" in plain
    assert speculative.result is not None and speculative.result.drafted_n > 0
    fed = target.kv[2]
    assert fed[:2] == [7, 8] and fed[fed.index(500):][:3] == [500, 501, 502] and fed.count(500) == 1
