"""edgeserve/runtime/sequence.py: one request's per-token rules, without a model."""

from __future__ import annotations

from typing import Any

import pytest

from edgeserve.runtime.sequence import (
    TAIL_RESERVE_S,
    AnswerForcing,
    GenerationJob,
    Sequence,
    StepInput,
    forcing_depth,
    until_closed,
)

PROMPT = list(range(100, 110))  # ten prompt tokens
EOS = 2


def sequence(max_tokens: int = 50, n_ctx: int = 2048, cache_n: int = 0, **job: Any) -> Sequence:
    return Sequence(GenerationJob(PROMPT, max_tokens, **job), n_ctx, cache_n=cache_n)


def run(seq: Sequence, pieces: list[bytes | None], start: float = 0.0, step_s: float = 0.01) -> str:
    """Prefill in one step, then one token per piece (None: an end-of-generation token), one
    step every `step_s` seconds, until the pieces run out or the sequence ends. Returns the text."""
    now = start
    for i, piece in enumerate(pieces):
        if not seq.before_step(now):
            break
        step = seq.take_input()
        assert step.logits
        now += step_s
        seq.on_token(1000 + i, piece or b"", eog=piece is None, now=now)
        if seq.finished:
            break
    return "".join(seq.drain())


# ---- inputs -------------------------------------------------------------------------------


def test_the_prompt_is_fed_in_chunks_with_logits_only_after_the_last() -> None:
    seq = sequence()
    assert seq.prefilling and seq.pending == tuple(PROMPT)
    assert seq.take_input(4) == StepInput(tuple(PROMPT[:4]), 0, logits=False)
    assert seq.take_input(4) == StepInput(tuple(PROMPT[4:8]), 4, logits=False)
    assert seq.take_input(4) == StepInput(tuple(PROMPT[8:]), 8, logits=True)
    seq.before_step(0.0)
    seq.on_token(7, b"a", eog=False, now=0.1)
    assert not seq.prefilling
    assert seq.take_input(4) == StepInput((7,), 10, logits=True)  # the sampled token, next position
    with pytest.raises(RuntimeError):
        seq.take_input()  # not sampled yet


def test_a_cached_prefix_is_skipped_but_the_last_prompt_token_is_always_evaluated() -> None:
    seq = sequence(cache_n=6)
    assert seq.take_input() == StepInput(tuple(PROMPT[6:]), 6, logits=True)
    whole = sequence(cache_n=len(PROMPT))  # everything cached: the logits are still needed
    assert whole.cache_n == len(PROMPT) - 1
    assert whole.take_input() == StepInput((PROMPT[-1],), len(PROMPT) - 1, logits=True)


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        sequence(n_ctx=len(PROMPT))
    with pytest.raises(ValueError):
        Sequence(GenerationJob([], 5), 2048)


# ---- text -----------------------------------------------------------------------------------


def test_a_stop_string_split_across_pieces_ends_the_text_before_it() -> None:
    seq = sequence(stop=("END",))
    text = run(seq, [b"Hel", b"lo E", b"N", b"D and more", b"never"])
    assert text == "Hello "
    assert seq.finish == "stop"
    assert seq.n_generated == 4


def test_a_held_back_stop_prefix_is_released_when_it_turns_out_not_to_be_one() -> None:
    seq = sequence(max_tokens=3, stop=("END",))
    assert run(seq, [b"Hello E", b"N", b"d"]) == "Hello ENd"
    assert seq.finish == "length"


def test_multibyte_characters_split_across_tokens_are_assembled() -> None:
    euro, e_acute = "€".encode(), "é".encode()  # 3 and 2 bytes
    seq = sequence(max_tokens=10)
    now = 0.0
    seen = []
    for piece in [b"caf" + e_acute[:1], e_acute[1:] + b" ", euro[:1], euro[1:2], euro[2:] + b"!"]:
        seq.before_step(now)
        seq.take_input()
        now += 0.01
        seq.on_token(5, piece, eog=False, now=now)
        seen.append("".join(seq.drain()))
    assert seen == ["caf", "é ", "", "", "€!"]


def test_an_unfinished_character_at_the_end_becomes_a_replacement_character() -> None:
    seq = sequence(max_tokens=2)
    assert run(seq, [b"ok", "€".encode()[:2]]) == "ok\ufffd"
    assert seq.finish == "length"


# ---- the end ----------------------------------------------------------------------------------


def test_an_end_of_generation_token_stops_and_is_not_counted() -> None:
    seq = sequence()
    assert run(seq, [b"Hi", b"!", None, b"more"]) == "Hi!"
    assert seq.finish == "stop" and seq.n_generated == 2
    result = seq.result()
    assert result.predicted_n == 2
    assert len(result.token_ms) == 2  # the step that produced the EOS took time too


def test_ignore_eos_generates_through_end_of_generation_tokens() -> None:
    seq = sequence(max_tokens=4, ignore_eos=True)
    assert run(seq, [b"Hi", None, b" again", None, b"never"]) == "Hi again"
    assert seq.finish == "length" and seq.n_generated == 4


def test_max_tokens_is_capped_by_the_context() -> None:
    seq = sequence(max_tokens=100, n_ctx=len(PROMPT) + 3)
    assert seq.max_tokens == 3
    assert run(seq, [b"a", b"b", b"c", b"d"]) == "abc"
    assert seq.finish == "length"


def test_zero_max_tokens_ends_at_once() -> None:
    seq = sequence(max_tokens=0)
    assert seq.finished and seq.finish == "length"
    assert not seq.before_step(0.0)


# ---- deadline and cancel --------------------------------------------------------------------


def steps(seq: Sequence, durations: list[float], start: float = 0.0) -> float:
    """Prefill at `start`, then one step of each duration; returns the time after the last."""
    now = start
    seq.before_step(now)
    seq.take_input()
    now += 0.2
    seq.on_token(1, b"x", eog=False, now=now)  # the prefill step does not count as a decode step
    for duration in durations:
        assert seq.before_step(now)
        seq.take_input()
        now += duration
        seq.on_token(1, b"x", eog=False, now=now)
    return now


def test_the_deadline_stops_before_a_step_that_would_overrun_it() -> None:
    # the slowest of the last four steps (30 ms) is what the next one is expected to take
    seq = sequence(deadline_at=10.0)
    now = steps(seq, [0.05, 0.03, 0.01, 0.01, 0.01])
    assert seq.expected_step_s() == pytest.approx(0.03)
    limit = 10.0 - 0.03 - TAIL_RESERVE_S
    assert seq.before_step(limit - 1e-6)
    assert not seq.before_step(limit + 1e-6)
    assert seq.finish == "deadline"
    assert "".join(seq.drain()) == "x" * 6
    assert now < limit


def test_the_callers_prediction_for_the_step_counts_when_it_is_slower_than_the_history() -> None:
    seq = sequence(deadline_at=1.0)
    steps(seq, [0.01, 0.01])
    assert seq.before_step(0.5, step_s=0.4)
    assert not seq.fits(0.5, step_s=0.48)
    assert not seq.before_step(0.5, step_s=0.48)
    assert seq.finish == "deadline"


def test_a_faster_prediction_does_not_hide_slow_recent_steps() -> None:
    # the intervals between its tokens include other variants' steps: they still count
    seq = sequence(deadline_at=1.0)
    steps(seq, [0.01, 0.2])
    assert seq.expected_step_s(0.05) == pytest.approx(0.2)
    assert not seq.before_step(1.0 - 0.2 - TAIL_RESERVE_S + 1e-6, step_s=0.05)


def test_a_deadline_already_missed_stops_before_the_prefill() -> None:
    seq = sequence(deadline_at=1.0)
    assert not seq.before_step(1.0 - TAIL_RESERVE_S / 2)
    result = seq.result()
    assert result.finish == "deadline" and result.predicted_n == 0 and result.prompt_evaluated == 0


def test_the_prefill_stops_at_a_chunk_boundary_when_the_deadline_comes_near() -> None:
    seq = sequence(deadline_at=1.0)
    assert seq.before_step(0.0, step_s=0.3)
    seq.take_input(4)
    assert seq.before_step(0.3, step_s=0.3)
    seq.take_input(4)
    assert not seq.before_step(0.7, step_s=0.3)
    result = seq.result()
    assert result.finish == "deadline" and result.prompt_evaluated == 8 and result.predicted_n == 0


def test_cancel_ends_before_the_next_step_and_drops_held_back_text() -> None:
    seq = sequence(stop=("END",))
    assert run(seq, [b"ab", b"E"]) == "ab"  # "E" held back: it might start "END"
    seq.cancel()
    assert seq.cancelled
    assert not seq.before_step(1.0)
    assert seq.finish == "cancelled"
    assert seq.drain() == []
    with pytest.raises(RuntimeError):
        seq.take_input()


def test_cancel_before_the_first_step_evaluates_nothing() -> None:
    seq = sequence()
    seq.cancel()
    assert not seq.before_step(0.0)
    assert seq.result().finish == "cancelled" and seq.result().prompt_evaluated == 0


# ---- answer forcing -------------------------------------------------------------------------

BOXED = AnswerForcing(prefix_tokens=(7, 8, 9), prefix_text="\nFinal answer: \\boxed{", reserve=2)


def test_forcing_feeds_the_prefix_when_the_reserve_is_reached_and_stops_when_the_brace_closes() -> None:
    # 10 tokens, prefix of 3, reserve 2: forced when 10 - n - 3 <= 2, i.e. after the 5th token
    seq = sequence(max_tokens=10, forcing=BOXED)
    now = 0.0
    for i in range(4):
        seq.before_step(now)
        step = seq.take_input()
        assert step.tokens == (tuple(PROMPT) if i == 0 else (50 + i - 1,))
        now += 0.01
        seq.on_token(50 + i, b"w ", eog=False, now=now)
        assert seq.forced == ()
    seq.before_step(now)
    seq.take_input()
    seq.on_token(60, b"so", eog=False, now=now + 0.01)
    assert seq.forced == (7, 8, 9)
    assert seq.pending == (60, 7, 8, 9)  # the sampled token first, then the prefix
    assert seq.n_generated == 8
    step = seq.take_input()
    assert step == StepInput((60, 7, 8, 9), len(PROMPT) + 4, logits=True)
    assert seq.forced == ()
    seq.on_token(61, b"4", eog=False, now=now + 0.02)
    seq.take_input()
    seq.on_token(62, b"2} and then", eog=False, now=now + 0.03)
    assert seq.finish == "stop"
    assert "".join(seq.drain()) == "w w w w so\nFinal answer: \\boxed{42}"


def test_forcing_in_chunks_asks_for_logits_only_after_the_last_forced_token() -> None:
    seq = sequence(max_tokens=10, forcing=BOXED)
    run(seq, [b"w"] * 5)
    assert seq.forced == (7, 8, 9)
    assert seq.take_input(2) == StepInput((1004, 7), len(PROMPT) + 4, logits=False)
    assert seq.forced == (8, 9)
    assert seq.take_input(2) == StepInput((8, 9), len(PROMPT) + 6, logits=True)


def test_no_forcing_once_the_marker_has_appeared_even_across_pieces() -> None:
    seq = sequence(max_tokens=10, forcing=BOXED)
    text = run(seq, [b"\\box", b"ed{7", b"}", b" ok", b" ok", b" ok", b"!"])
    assert seq.forced == () and seq.pending == (1006,)
    assert text == "\\boxed{7} ok ok ok!"


def test_forcing_that_overruns_the_budget_ends_with_length() -> None:
    seq = sequence(max_tokens=3, forcing=BOXED)  # the prefix alone does not fit the budget
    assert run(seq, [b"w"]) == "w\nFinal answer: \\boxed{"
    assert seq.finish == "length" and seq.n_generated == 4


def test_forcing_comes_early_when_the_deadline_is_nearer_than_the_tokens_left() -> None:
    # 100 tokens of budget, but a token every 100 ms and a deadline at 1 s: waiting for the
    # token reserve would run into the deadline. After the token at 0.6 s, one more ordinary
    # step, the prefix step (100 ms + 50 ms for the prefix) and two tokens would end past
    # 1 s - 25 ms, so the prefix goes in now and the answer closes at 0.75 s.
    forcing = AnswerForcing(prefix_tokens=(7, 8, 9), prefix_text="\\boxed{", reserve=2, prefix_s=0.05)
    seq = sequence(max_tokens=100, forcing=forcing, deadline_at=1.0)
    now, forced_at = 0.0, None
    while not seq.finished and seq.before_step(now):
        step = seq.take_input()
        now += 0.1 + (0.05 if seq.forced or len(step.tokens) == 4 else 0.0)
        seq.on_token(60, b"2}" if forced_at is not None else b" w", eog=False, now=now)
        if forced_at is None and seq.forced:
            forced_at = now
    assert forced_at == pytest.approx(0.6)
    assert seq.finish == "stop" and now == pytest.approx(0.75)
    assert "".join(seq.drain()).endswith(" w\\boxed{2}")


def test_forcing_without_a_deadline_waits_for_the_token_reserve() -> None:
    forcing = AnswerForcing(prefix_tokens=(7, 8, 9), prefix_text="\\boxed{", reserve=2, prefix_s=10.0)
    seq = sequence(max_tokens=10, forcing=forcing)
    run(seq, [b"w"] * 4, step_s=5.0)
    assert seq.forced == ()


def test_forcing_helpers() -> None:
    assert forcing_depth(None) == 0
    assert forcing_depth(BOXED) == 1
    assert until_closed("4{2}}rest", 1) == ("4{2}}", 0)
    assert until_closed("42", 1) == ("42", 1)


# ---- timings --------------------------------------------------------------------------------


def test_timings() -> None:
    seq = sequence(max_tokens=3, cache_n=4)
    assert seq.before_step(100.0)
    seq.take_input(3)  # first chunk of the six uncached tokens
    assert seq.before_step(100.2)
    seq.take_input(3)
    seq.on_token(1, b"a", eog=False, now=100.5, batch=1)
    for now, width in [(100.52, 2), (100.56, 4)]:
        assert seq.before_step(now - 0.01)
        seq.take_input()
        seq.on_token(1, b"b", eog=False, now=now, batch=width)
    result = seq.result()
    assert result.finish == "length"
    assert (result.prompt_n, result.cache_n, result.prompt_evaluated) == (10, 4, 6)
    assert result.prompt_ms == pytest.approx(500)  # from the first step to the first token
    assert result.predicted_n == 3
    assert result.token_ms == pytest.approx([20, 40])
    assert result.predicted_ms == pytest.approx(60)
    assert result.mean_batch == pytest.approx(3.0)


def test_result_before_the_end_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        sequence().result()


def test_a_single_token_answer_has_a_mean_batch_of_one() -> None:
    seq = sequence(max_tokens=1)
    run(seq, [b"a"])
    assert seq.result().mean_batch == 1.0 and seq.result().token_ms == []


def test_tokens_of_one_speculative_step_count_as_one_step_for_the_deadline_pace() -> None:
    seq = sequence(deadline_at=10.0)
    seq.before_step(0.0)
    seq.take_input()
    seq.on_token(1, b"a", eog=False, now=0.05)
    for now in (0.25, 0.45):  # two steps of 200 ms, each giving three tokens
        seq.take_input()
        seq.on_token(2, b"b", eog=False, now=now)
        for token in (3, 4):
            seq.take_input()  # the accepted draft was fed in the same step
            seq.on_token(token, b"c", eog=False, now=now, same_step=True)
    assert seq.n_generated == 7 and seq.n_past == len(PROMPT) + 6
    assert seq.expected_step_s() == pytest.approx(0.2)  # not 0: the pace is per step
    # its timings: one interval per token, the same-step ones 0 ms
    assert seq.token_ms == pytest.approx([200.0, 0.0, 0.0, 200.0, 0.0, 0.0])



def test_a_structured_answer_cut_short_is_closed_into_json() -> None:
    import json

    seq = sequence(max_tokens=4, structured=True)
    text = run(seq, [b'{"a', b'": [1', b', "x', b"y"])
    assert seq.finish == "length" and seq.closed_early
    assert json.loads(text) == {"a": [1, "xy"]}
    whole = sequence(max_tokens=10, structured=True)
    assert json.loads(run(whole, [b'{"a": 1}', None])) == {"a": 1} and not whole.closed_early
