"""The stepping loop against a small fake decoder: batching, chunked prefill, prefix reuse,
earliest deadline first across variants, places, cancellation, refusals and failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Sequence

import pytest

from edgeserve.errors import GenerationFailedError, InvalidRequestError, RefusedError
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.decoder import BatchEntry, GrammarError
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.runtime.stepper import Stepper

EOG = 0


class FakeDecoder:
    """Next token = (sum of the sequence's KV tokens) % 97 + 1 (never EOG, unless `eog_after`),
    each token's text is its number and a space. It checks positions like llama.cpp does, and
    records every step's entries. `step_s` makes a step take time; `fail_on` raises."""

    def __init__(self, n_ctx: int = 512, n_batch: int = 128, step_s: float = 0.0) -> None:
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.step_s = step_s
        self.kv: dict[int, list[int]] = {}
        self.steps: list[list[BatchEntry]] = []
        self.copies: list[tuple[int, int, int]] = []
        self.fail_on: int | None = None  # a token whose presence in a step makes it fail
        self.lock = threading.Lock()

    def new_sequence(self, seq_id: int, sampling: SamplingParams, *, keep: int = 0) -> None:
        self.kv[seq_id] = self.kv.get(seq_id, [])[:keep]

    def free_sequence(self, seq_id: int) -> None:
        self.kv.pop(seq_id, None)

    def copy_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        self.copies.append((src, dst, n_tokens))
        self.kv[dst] = list(self.kv[src][:n_tokens])

    def accept(self, seq_id: int, tokens: Iterable[int]) -> None:
        pass

    def step(self, entries: Sequence[BatchEntry]) -> dict[int, list[int]]:
        with self.lock:
            self.steps.append(list(entries))
        if self.step_s:
            time.sleep(self.step_s)
        out = {}
        for entry in entries:
            kv = self.kv.setdefault(entry.seq_id, [])
            assert entry.pos == len(kv), f"sequence {entry.seq_id}: position {entry.pos}, KV holds {len(kv)}"
            if self.fail_on is not None and self.fail_on in entry.tokens:
                raise RuntimeError("llama_decode failed")
            if entry.verify:  # the greedy token after each of them
                out[entry.seq_id] = [self.next_after(kv + list(entry.tokens[: i + 1]))
                                     for i in range(len(entry.tokens))]
            kv.extend(entry.tokens)
            if entry.logits and not entry.verify:
                out[entry.seq_id] = [self.next_after(kv)]
        return out

    @staticmethod
    def next_after(kv: list[int]) -> int:
        return sum(kv) % 97 + 1

    def keep(self, seq_id: int, n_tokens: int) -> None:
        del self.kv[seq_id][n_tokens:]

    def drafted(self, seq_id: int) -> int:
        return 0

    def logprobs(self, seq_id: int) -> tuple[float, list[tuple[int, float]]] | None:
        return None

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        return f"{token} ".encode()

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def widths(self) -> list[int]:
        return [len(entries) for entries in self.steps]


def expected_text(prompt: list[int], n: int) -> str:
    kv = list(prompt)
    out = []
    for _ in range(n):
        token = sum(kv) % 97 + 1
        out.append(f"{token} ")
        kv.append(token)
    return "".join(out)


def job(prompt: list[int], n: int, deadline_at: float | None = None) -> GenerationJob:
    return GenerationJob(prompt, n, SamplingParams(temperature=0.0), ignore_eos=True, deadline_at=deadline_at)


@pytest.fixture
def stepper() -> Iterable[Stepper]:
    s = Stepper(chunk_tokens=8)
    yield s
    s.close()


def submit(stepper: Stepper, variant: str, j: GenerationJob, min_run_s: float = 0.0) -> Generation:
    generation = Generation(asyncio.get_running_loop(), flush_interval_s=0.0)
    stepper.submit(variant, j, generation, min_run_s=min_run_s)
    return generation


async def test_one_sequence_alone(stepper: Stepper) -> None:
    decoder = FakeDecoder()
    stepper.attach("f:a", decoder, parallel=2)
    generation = submit(stepper, "f:a", job([5, 6, 7], 10))
    assert await generation.joined >= 0
    assert await generation.text() == expected_text([5, 6, 7], 10)
    assert generation.result is not None
    assert generation.result.finish == "length" and generation.result.predicted_n == 10


async def test_concurrent_sequences_share_steps_and_keep_their_own_text(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=4)
    prompts = [[1, 2, 3], [10, 20], [7] * 5, [42, 43, 44, 45]]
    generations = [submit(stepper, "f:a", job(p, 30)) for p in prompts]
    texts = await asyncio.gather(*(g.text() for g in generations))
    assert texts == [expected_text(p, 30) for p in prompts]
    assert max(decoder.widths()) == 4
    assert all(g.result is not None and g.result.mean_batch > 2 for g in generations)


async def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_goes_on(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.001)
    stepper.attach("f:a", decoder, parallel=2)
    running = submit(stepper, "f:a", job([1, 2], 60))
    await running.joined
    long_prompt = list(range(1, 41))
    newcomer = submit(stepper, "f:a", job(long_prompt, 5))
    texts = await asyncio.gather(running.text(), newcomer.text())
    assert texts == [expected_text([1, 2], 60), expected_text(long_prompt, 5)]
    chunk_steps = [s for s in decoder.steps if any(len(e.tokens) > 1 for e in s)]
    assert all(len(e.tokens) <= 8 for s in decoder.steps for e in s)  # never more than one chunk
    assert len(chunk_steps) >= 5  # 40 prompt tokens in chunks of 8
    # every chunk step also decoded the running stream's next token
    assert all(any(len(e.tokens) == 1 for e in s) for s in chunk_steps if len(s) > 1)


async def test_the_same_prefix_is_reused_not_evaluated_again(stepper: Stepper) -> None:
    decoder = FakeDecoder()
    stepper.attach("f:a", decoder, parallel=2)
    system = list(range(1, 21))
    first = submit(stepper, "f:a", job([*system, 50, 51], 4))
    assert await first.text() == expected_text([*system, 50, 51], 4)
    second = submit(stepper, "f:a", job([*system, 60], 4))
    assert await second.text() == expected_text([*system, 60], 4)
    assert second.result is not None
    assert second.result.cache_n == 20
    assert second.result.prompt_evaluated == 1


async def test_a_prefix_is_copied_from_a_running_sequence(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=2)
    system = list(range(1, 21))
    first = submit(stepper, "f:a", job([*system, 50], 200))
    await first.joined
    while len(decoder.steps) < 4:  # its prompt (21 tokens, chunks of 8) is in the KV cache
        await asyncio.sleep(0.001)
    second = submit(stepper, "f:a", job([*system, 70, 71], 5))
    assert await second.text() == expected_text([*system, 70, 71], 5)
    assert second.result is not None and second.result.cache_n == 20
    assert decoder.copies and decoder.copies[-1][2] == 20
    first.cancel()
    await first.text()


async def test_places_are_given_earliest_deadline_first(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.001)
    stepper.attach("f:a", decoder, parallel=1)
    now = time.perf_counter()
    blocker = submit(stepper, "f:a", job([1], 20))
    await blocker.joined
    late = submit(stepper, "f:a", job([2], 3, deadline_at=now + 60))
    urgent = submit(stepper, "f:a", job([3], 3, deadline_at=now + 30))
    order: list[str] = []

    async def mark(name: str, generation: Generation) -> None:
        await generation.joined
        order.append(name)

    await asyncio.gather(mark("late", late), mark("urgent", urgent), blocker.text())
    assert order == ["urgent", "late"]
    await asyncio.gather(late.text(), urgent.text())
    assert urgent.result is not None and urgent.result.queue_ms > 0


async def test_the_lane_with_the_most_urgent_deadline_steps_first(stepper: Stepper) -> None:
    a, b = FakeDecoder(step_s=0.001), FakeDecoder(step_s=0.001)
    stepper.attach("f:a", a, parallel=1)
    stepper.attach("f:b", b, parallel=1)
    now = time.perf_counter()
    relaxed = submit(stepper, "f:a", job([1], 40, deadline_at=now + 100))
    urgent = submit(stepper, "f:b", job([2], 10, deadline_at=now + 50))
    await asyncio.gather(relaxed.text(), urgent.text())
    assert urgent.result is not None and relaxed.result is not None
    # once both were running, a's steps waited for b's: b finished long before a
    assert len(b.steps) == 10


async def test_a_cancelled_sequence_leaves_and_the_others_go_on(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=2)
    keep = submit(stepper, "f:a", job([1, 2], 40))
    leave = submit(stepper, "f:a", job([3, 4], 400))
    await leave.joined
    await asyncio.sleep(0.01)
    leave.cancel()
    assert await keep.text() == expected_text([1, 2], 40)
    await leave.text()
    assert leave.result is not None and leave.result.finish == "cancelled"
    assert leave.result.predicted_n < 400
    assert not stepper.busy("f:a")


async def test_only_requests_that_must_wait_for_a_place_count_against_the_queue() -> None:
    stepper = Stepper(chunk_tokens=8, max_queue=0)
    try:
        decoder = FakeDecoder(step_s=0.005)
        stepper.attach("f:a", decoder, parallel=2)
        # submitted together: both have a place, though the loop has not seated them yet
        together = [submit(stepper, "f:a", job([1, 2, 3], 30)), submit(stepper, "f:a", job([4, 5], 30))]
        with pytest.raises(RefusedError) as refused:  # a third must wait: a queue of 0 refuses it
            submit(stepper, "f:a", job([6], 2))
        assert refused.value.code == "queue_full"
        assert [await g.text() for g in together] == [expected_text([1, 2, 3], 30), expected_text([4, 5], 30)]
    finally:
        stepper.close()


async def test_a_waiting_request_whose_client_left_is_dropped(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=1)
    blocker = submit(stepper, "f:a", job([1], 30))
    waiting = submit(stepper, "f:a", job([2], 30))
    waiting.cancel()
    await waiting.text()
    assert waiting.result is not None and waiting.result.finish == "cancelled"
    await blocker.text()


async def test_deadline_stops_before_the_next_step(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.005)
    stepper.attach("f:a", decoder, parallel=1)
    deadline = time.perf_counter() + 0.2
    generation = submit(stepper, "f:a", job([1], 10_000, deadline_at=deadline))
    await generation.text()
    assert generation.result is not None and generation.result.finish == "deadline"
    assert time.perf_counter() <= deadline + 0.01


async def test_a_request_whose_deadline_no_longer_fits_is_refused_when_its_turn_comes(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=1)
    blocker = submit(stepper, "f:a", job([1], 50))
    await blocker.joined
    doomed = submit(stepper, "f:a", job([2], 5, deadline_at=time.perf_counter() + 0.05), min_run_s=0.04)
    with pytest.raises(RefusedError, match="shortest useful answer"):
        await doomed.joined
    await blocker.text()


async def test_a_failed_step_fails_its_sequences_and_the_loop_serves_on(stepper: Stepper) -> None:
    decoder = FakeDecoder()
    stepper.attach("f:a", decoder, parallel=2)
    decoder.fail_on = 999
    broken = submit(stepper, "f:a", job([999], 5))
    with pytest.raises(GenerationFailedError):
        await broken.text()
    decoder.fail_on = None
    fine = submit(stepper, "f:a", job([1, 2, 3], 5))
    assert await fine.text() == expected_text([1, 2, 3], 5)


class GrammarlessDecoder(FakeDecoder):
    """Cannot set up any grammar, as llama.cpp when it cannot parse one."""

    def new_sequence(self, seq_id: int, sampling: SamplingParams, *, keep: int = 0) -> None:
        if sampling.grammar is not None:
            raise GrammarError("llama.cpp cannot parse the grammar made for it")
        super().new_sequence(seq_id, sampling, keep=keep)


async def test_a_grammar_that_cannot_be_set_up_fails_its_request_only(stepper: Stepper) -> None:
    stepper.attach("f:a", GrammarlessDecoder(step_s=0.001), parallel=2)
    running = submit(stepper, "f:a", job([1, 2], 40))
    await running.joined
    bad = GenerationJob([3, 4], 5, SamplingParams(temperature=0.0, grammar="root ::= ("), ignore_eos=True)
    refused = submit(stepper, "f:a", bad)
    with pytest.raises(InvalidRequestError) as info:
        await refused.joined
    assert info.value.param == "response_format"
    assert await running.text() == expected_text([1, 2], 40)


async def test_board_reports_what_runs_and_waits(stepper: Stepper) -> None:
    from edgeserve.routing.costs import CostProfile

    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=1)
    now = time.perf_counter()
    running = submit(stepper, "f:a", job([1, 2], 100, deadline_at=now + 10))
    await running.joined
    waiting = submit(stepper, "f:a", job([3], 7))
    profile = CostProfile(variant_id="f:a", prefill_ms_per_token=1.0, decode_ms_per_token=2.0)
    board = stepper.board({"f:a": profile}, {"f:a": 1}, time.perf_counter())
    loads = sorted(board.sequences, key=lambda s: s.running, reverse=True)
    assert [s.running for s in loads] == [True, False]
    assert loads[0].deadline_ms is not None and 9000 < loads[0].deadline_ms < 10_000
    assert loads[1].tokens_left == 7 and loads[1].prompt_left == 1
    running.cancel()
    await asyncio.gather(running.text(), waiting.text())


async def test_a_reserved_job_waits_on_the_board_until_it_is_submitted_or_released(stepper: Stepper) -> None:
    """Admission reserves the job it decided on, so a decision made before the response starts
    it sees it; submitting with the key keeps that key (its place among equal deadlines)."""
    stepper.attach("f:a", FakeDecoder(step_s=0.01), parallel=1)
    profile = CostProfile(variant_id="f:a", prefill_ms_per_token=1.0, decode_ms_per_token=2.0)

    def board_keys() -> list[tuple[int, bool]]:
        board = stepper.board({"f:a": profile}, {"f:a": 1}, time.perf_counter())
        return [(s.key, s.running) for s in board.sequences]

    now = time.perf_counter()
    kept = stepper.reserve("f:a", job([1, 2, 3], 9, deadline_at=now + 10))
    dropped = stepper.reserve("f:a", job([4], 5))
    board = stepper.board({"f:a": profile}, {"f:a": 1}, time.perf_counter())
    reserved = {s.key: s for s in board.sequences}
    assert reserved[kept].tokens_left == 9 and reserved[kept].prompt_left == 3 and not reserved[kept].running
    assert reserved[kept].deadline_ms is not None and 9000 < reserved[kept].deadline_ms < 10_000
    assert reserved[dropped].deadline_ms is None
    stepper.release(dropped)
    assert board_keys() == [(kept, False)]
    generation = Generation(asyncio.get_running_loop(), flush_interval_s=0.0)
    stepper.submit("f:a", job([1, 2, 3], 9, deadline_at=now + 10), generation, reservation=kept)
    await generation.joined
    assert board_keys() == [(kept, True)]  # the same sequence, now running: counted once
    await generation.text()
    assert board_keys() == []


async def test_a_reservation_past_its_deadline_leaves_the_board(stepper: Stepper) -> None:
    stepper.attach("f:a", FakeDecoder(), parallel=1)
    profile = CostProfile(variant_id="f:a", prefill_ms_per_token=1.0, decode_ms_per_token=2.0)
    stepper.reserve("f:a", job([1], 5, deadline_at=time.perf_counter() - 0.001))
    assert stepper.board({"f:a": profile}, {"f:a": 1}, time.perf_counter()).sequences == ()


async def test_a_request_turned_away_for_room_counts_in_the_load_until_its_deadline(stepper: Stepper) -> None:
    stepper.attach("f:a", FakeDecoder(), parallel=2)
    profile = CostProfile(variant_id="f:a", prefill_ms_per_token=1.0, decode_ms_per_token=2.0)
    now = time.perf_counter()
    stepper.note_unserved(["f:a", "f:gone"], now + 0.5)  # a lane that is not in the loop is skipped
    assert stepper.board({"f:a": profile}, {"f:a": 2}, now).variants["f:a"].load == 1.0
    assert stepper.board({"f:a": profile}, {"f:a": 2}, now + 0.6).variants["f:a"].load == 0.0


async def test_detach_refuses_a_busy_lane_and_frees_an_idle_one(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=1)
    generation = submit(stepper, "f:a", job([1], 50))
    await generation.joined
    with pytest.raises(RuntimeError, match="still has requests"):
        stepper.detach("f:a")
    await generation.text()
    assert stepper.detach("f:a") is decoder
    with pytest.raises(RuntimeError, match="not loaded"):
        submit(stepper, "f:a", job([1], 5))


async def test_join_width_holds_a_request_until_the_batch_narrows(stepper: Stepper) -> None:
    decoder = FakeDecoder(step_s=0.002)
    stepper.attach("f:a", decoder, parallel=4)
    running = submit(stepper, "f:a", job([1, 2], 30))
    await running.joined
    patient = GenerationJob([3, 4], 5, SamplingParams(temperature=0.0), ignore_eos=True, join_width=1)
    held = submit(stepper, "f:a", patient)
    await held.text()
    await running.text()
    assert held.result is not None and held.result.mean_batch == 1.0  # it never shared a step
    assert max(decoder.widths()) == 1


class TimedDecoder(FakeDecoder):
    """A fake decoder on a fake clock: a step costs 10 ms plus 2 ms per token of a multi-token
    entry (a prompt chunk). When the clock first passes `pause_ms` it stops after the step until
    `release` is set (so a test can submit at a known moment)."""

    def __init__(self, pause_ms: int) -> None:
        super().__init__()
        self.ms = 0
        self.pause_ms = pause_ms
        self.reached = threading.Event()
        self.release = threading.Event()
        self.ends: list[tuple[int, list[int]]] = []  # (clock at the step's end, its sequence ids)

    def clock(self) -> float:
        return self.ms / 1000

    def step(self, entries: Sequence[BatchEntry]) -> dict[int, list[int]]:
        out = super().step(entries)
        self.ms += 10 + 2 * sum(len(e.tokens) for e in entries if len(e.tokens) > 1)
        self.ends.append((self.ms, [e.seq_id for e in entries]))
        if self.ms >= self.pause_ms and not self.reached.is_set():
            self.reached.set()
            self.release.wait(5)
        return out


async def test_a_prompt_chunk_waits_a_step_rather_than_push_a_stream_past_its_deadline() -> None:
    decoder = TimedDecoder(pause_ms=450)
    stepper = Stepper(chunk_tokens=8, clock=decoder.clock)
    profile = CostProfile(variant_id="f:a", prefill_ms_per_token=2.0, decode_ms_per_token=10.0)
    stepper.attach("f:a", decoder, parallel=2, profile=lambda: profile)
    try:
        stream = submit(stepper, "f:a", job([1], 1000, deadline_at=0.5))  # place 0
        await asyncio.to_thread(decoder.reached.wait, 5)
        paused_at = len(decoder.ends)
        newcomer = submit(stepper, "f:a", job([2] * 40, 3))  # 5 chunks of 8 prompt tokens
        decoder.release.set()
        await stream.text()
        assert await newcomer.text() == expected_text([2] * 40, 3)
    finally:
        stepper.close()
    assert stream.result is not None and stream.result.finish == "deadline"
    # every step the stream took part in ended in time for its deadline (less the tail reserve)
    assert max(end for end, ids in decoder.ends if 0 in ids) <= 500 - 25
    # near its deadline the stream stepped alone while the newcomer's prompt waited
    after = decoder.ends[paused_at:]
    alone = [end for end, ids in after if ids == [0]]
    assert alone and min(end for end, ids in after if 1 in ids) > max(alone)
