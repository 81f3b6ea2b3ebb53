"""The stepping loop: one thread owns the CPU and runs one variant's batch per step.

The shape of llama-server's `update_slots`, with deadlines:

* every local variant is a *lane*: its Decoder and ``parallel`` *places* (sequence ids in its
  llama.cpp context). A request waits in its lane until a place is free; places are handed out
  earliest deadline first, and a request whose deadline can no longer fit its shortest useful
  run by then is refused (429) instead of started to miss;
* each step picks the lane whose running sequences hold the most urgent deadline (no deadline
  sorts last; among equals the earliest arrival), and decodes in ONE `llama_decode` the next
  token of each of its sequences plus at most one chunk (``chunk_tokens``) of one sequence
  still evaluating its prompt (or a forced answer prefix), so a long newcomer never stalls
  running streams by more than one chunk;
* before every step each sequence applies its rules (runtime.sequence: cancel, deadline); a
  prefill is checked at every chunk boundary, so a client that leaves or a deadline that can no
  longer be met stops it there;
* a place keeps its KV after its sequence leaves: a newcomer whose prompt starts like what a
  place holds (the same system prompt and template) keeps or copies (`llama_memory_seq_cp`)
  that prefix instead of evaluating it again; a free place is reused least recently used first.

routing.batching.Timeline models exactly these rules, and `board()` hands admission the state
it needs to predict every sequence's finish. The lock guards the lanes; it is released while
llama.cpp decodes, so the event loop can submit, cancel and read the board meanwhile.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from edgeserve.errors import InvalidRequestError, RefusedError, ShuttingDownError
from edgeserve.logging import get_logger
from edgeserve.routing.batching import (
    Board,
    LoadMeter,
    SeqLoad,
    UnservedDemand,
    Urgency,
    VariantLoad,
    most_urgent,
)
from edgeserve.routing.costs import CostProfile, prefill_ms, step_ms
from edgeserve.runtime.decoder import BatchEntry, GrammarError
from edgeserve.runtime.faults import InjectedFault
from edgeserve.runtime.generation import Generation, batched_handoffs
from edgeserve.runtime.sequence import (
    TAIL_RESERVE_S,
    GenerationJob,
    GenerationResult,
    SamplingParams,
    Sequence,
    TokenLogprob,
    check_prompt,
    common_prefix,
)

log = get_logger("edgeserve.stepper")

IDLE_WAIT_S = 0.5  # an idle loop wakes this often anyway (a missed wake-up costs no more)
RECENT_STEPS = 64  # pure decode steps kept per batch width (StepStats.recent_decode_ms)
RESERVATION_TTL_S = 30.0  # a reservation not submitted by then was abandoned: the board forgets it


class StepDecoder(Protocol):
    """What the loop needs of a variant's decoder (runtime.decoder.Decoder; a fake in tests)."""

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    def new_sequence(self, seq_id: int, sampling: SamplingParams, *, keep: int = 0) -> None: ...
    def free_sequence(self, seq_id: int) -> None: ...
    def copy_prefix(self, src: int, dst: int, n_tokens: int) -> None: ...
    def accept(self, seq_id: int, tokens: Iterable[int]) -> None: ...
    def step(self, entries: Seq[BatchEntry]) -> dict[int, list[int]]: ...
    def keep(self, seq_id: int, n_tokens: int) -> None: ...
    def drafted(self, seq_id: int) -> int: ...
    def logprobs(self, seq_id: int) -> tuple[float, list[tuple[int, float]]] | None: ...
    def token_piece(self, token: int, *, special: bool = False) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


@dataclass
class Work:
    """One submitted request: waiting for a place, then running as a Sequence."""

    key: int
    job: GenerationJob
    generation: Generation
    min_run_s: float  # shortest useful run (prompt + a few tokens): refused at join if it no longer fits
    submitted: float
    fail_after_first: bool = False  # fault injection (runtime.faults), tests only
    sequence: Sequence | None = None
    place: Place | None = None
    joined: float | None = None
    step_s: float = 0.0  # llama.cpp time of the decode steps it took part in
    prefill_s: float = 0.0  # llama.cpp time of its prompt chunks (their share of the steps)
    drafted: int = 0  # speculative decoding: tokens drafted for it, and accepted by the target
    accepted: int = 0

    @property
    def urgency(self) -> Urgency:
        """Earliest deadline first (none: last); among equals, the earlier arrival."""
        return (math.inf if self.job.deadline_at is None else self.job.deadline_at, self.key)


@dataclass(frozen=True)
class Reservation:
    """A job admission has decided on that the loop does not hold yet (the response starts it a
    few event-loop turns later, or after its variant is loaded): the board counts it as waiting,
    so a decision made meanwhile sees it instead of an emptier board than there will be."""

    variant_id: str
    job: GenerationJob
    made: float


@dataclass
class Place:
    """A sequence id of a lane's context and the tokens its KV cache holds (positions 0..n-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    work: Work | None = None
    last_used: float = 0.0


@dataclass
class StepStats:
    """What the loop did, for /metrics (read without the lock: counters only grow)."""

    steps: int = 0
    step_seconds: float = 0.0
    tokens_decoded: int = 0  # sequences × steps: the sum of batch widths
    prefill_chunks: int = 0
    cached_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: proposed by the draft
    accepted_tokens: int = 0  # of which the target agreed with
    widths: dict[int, int] = field(default_factory=dict)  # batch width → steps
    # the last few pure decode steps (no prompt chunk) per batch width, in ms: calibration reads
    # its batching factors from them; bounded, so a long-running server does not grow
    recent_decode_ms: dict[int, deque[float]] = field(default_factory=dict)

    def decode_ms(self, width: int) -> float | None:
        """The median of the recent pure decode steps of this width (None: none seen)."""
        recent = self.recent_decode_ms.get(width)
        return statistics.median(recent) if recent else None


class Lane:
    """One variant in the loop."""

    def __init__(self, variant_id: str, decoder: StepDecoder, parallel: int,
                 profile: Callable[[], CostProfile | None]) -> None:
        self.variant_id = variant_id
        self.decoder = decoder
        self.parallel = parallel
        self.profile = profile
        self.places = [Place(seq_id) for seq_id in range(parallel)]
        self.waiting: list[Work] = []
        self.stats = StepStats()
        self.meter = LoadMeter()  # how many sequences it has been running lately (admission)

    @property
    def running(self) -> list[Work]:
        return [p.work for p in self.places if p.work is not None]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(p.work is not None for p in self.places)


def _free_places(lane: Lane) -> int:
    return sum(p.work is None for p in lane.places)


class Stepper:
    def __init__(self, chunk_tokens: int = 64, max_queue: int = 64,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.chunk_tokens = chunk_tokens
        self.max_queue = max_queue
        self._clock = clock
        self._lanes: dict[str, Lane] = {}
        self._cond = threading.Condition()
        self._keys = itertools.count()
        self._reserved: dict[int, Reservation] = {}
        self._unserved = UnservedDemand()  # requests turned away because a variant was busy
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lanes (any thread) -------------------------------------------------------------------

    def attach(self, variant_id: str, decoder: StepDecoder, parallel: int,
               profile: Callable[[], CostProfile | None] = lambda: None) -> None:
        with self._cond:
            if variant_id in self._lanes:
                raise ValueError(f"{variant_id} is in the loop already")
            self._lanes[variant_id] = Lane(variant_id, decoder, parallel, profile)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stepper", daemon=True)
                self._thread.start()

    def detach(self, variant_id: str) -> StepDecoder | None:
        """Take an idle lane out of the loop (to unload its variant); its decoder is returned,
        still open. Raises RuntimeError while the lane has work."""
        with self._cond:
            lane = self._lanes.get(variant_id)
            if lane is None:
                return None
            if lane.busy:
                raise RuntimeError(f"{variant_id} still has requests in the loop")
            del self._lanes[variant_id]
            return lane.decoder

    def busy(self, variant_id: str) -> bool:
        with self._cond:
            lane = self._lanes.get(variant_id)
            return lane is not None and lane.busy

    def stats(self, variant_id: str) -> StepStats | None:
        lane = self._lanes.get(variant_id)
        return None if lane is None else lane.stats

    def running_in(self, variant_id: str) -> int:
        with self._cond:
            lane = self._lanes.get(variant_id)
            return 0 if lane is None else len(lane.running)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in their variant's batch."""
        with self._cond:
            return sum(len(lane.waiting) for lane in self._lanes.values())

    @property
    def running(self) -> int:
        """Sequences in a batch now, across the variants."""
        with self._cond:
            return sum(len(lane.running) for lane in self._lanes.values())

    def reserve(self, variant_id: str, job: GenerationJob) -> int:
        """Count an admitted job on the board until it is submitted (with the key returned
        here, which keeps its place among equal deadlines) or released."""
        with self._cond:
            key = next(self._keys)
            self._reserved[key] = Reservation(variant_id, job, self._clock())
            return key

    def release(self, key: int | None) -> None:
        """Forget a reservation (the request was turned away or abandoned before it started);
        a key already submitted or released is ignored."""
        if key is None:
            return
        with self._cond:
            self._reserved.pop(key, None)

    def note_unserved(self, variant_ids: Iterable[str], until: float) -> None:
        """A request was turned away only because these variants were busy: it counts in their
        load until `until` (its deadline; see routing.batching.UnservedDemand)."""
        with self._cond:
            known = [v for v in variant_ids if v in self._lanes]
            self._unserved.note(known, until * 1000, lambda v: self._lanes[v].parallel)

    def submit(self, variant_id: str, job: GenerationJob, generation: Generation, *,
               min_run_s: float = 0.0, fail_after_first: bool = False, reservation: int | None = None) -> None:
        """Queue a job in its lane; `generation.joined` resolves when it takes a place.
        ``reservation``: the key `reserve` gave it at admission (it now waits in its lane)."""
        with self._cond:
            reserved = self._reserved.pop(reservation, None) if reservation is not None else None
            lane = self._lanes.get(variant_id)
            if lane is None:
                raise RuntimeError(f"{variant_id} is not loaded")
            # Only requests that must wait for a place count against max_queue: a request that
            # finds a free place sits in `waiting` only until the loop's next iteration seats it,
            # so counting those refused (429) concurrent requests to an idle variant with places
            # to spare, and every request with --max-queue 0.
            must_wait = len(lane.waiting) >= _free_places(lane)
            waiting = sum(max(0, len(other.waiting) - _free_places(other)) for other in self._lanes.values())
            if must_wait and waiting >= self.max_queue:
                raise RefusedError(f"The queue is full ({self.max_queue} requests waiting); retry shortly.",
                                   code="queue_full", retry_after_s=1)
            key = reservation if reserved is not None and reservation is not None else next(self._keys)
            work = Work(key, job, generation, min_run_s, self._clock(), fail_after_first)
            lane.waiting.append(work)
            generation.on_cancel = self._wake
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def refuse_waiting(self, error: Exception) -> int:
        """Every request still waiting for a place gets this error (a stop); returns how many."""
        with self._cond:
            count = 0
            for lane in self._lanes.values():
                for work in lane.waiting:
                    work.generation._emit_joined(error)
                    work.generation._emit_end(error)
                    count += 1
                lane.waiting.clear()
            return count

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---- the board (admission) ----------------------------------------------------------------

    def board(self, profiles: dict[str, CostProfile], parallel: dict[str, int], now: float) -> Board:
        """What runs and waits, as routing.batching sees it: every variant in `profiles` (a
        lane that is not loaded is an empty one), times in ms from `now`."""
        sequences: list[SeqLoad] = []
        with self._cond:
            for variant_id, lane in self._lanes.items():
                if variant_id not in profiles:
                    continue
                for work in lane.running:
                    seq = work.sequence
                    assert seq is not None
                    if seq.finished:
                        continue
                    sequences.append(SeqLoad(
                        work.key, variant_id, tokens_left=max(seq.max_tokens - seq.n_generated, 1),
                        prompt_left=len(seq.pending) if seq.prefilling else 0, context=seq.n_past,
                        deadline_ms=_deadline_ms(work.job, now), running=True))
                sequences += [_waiting_load(work.key, variant_id, work.job, now) for work in lane.waiting]
            sequences.extend(self._reserved_loads(profiles, now))
            loads = {v: lane.meter.value(now * 1000) + self._unserved.count(v, now * 1000)
                     for v, lane in self._lanes.items()}
        variants = {v: VariantLoad(p, parallel.get(v, 1), loads.get(v, 0.0)) for v, p in profiles.items()}
        return Board(variants, tuple(sequences), self.chunk_tokens)

    def _reserved_loads(self, profiles: dict[str, CostProfile], now: float) -> list[SeqLoad]:
        """The reservations as waiting sequences (under the lock); stale ones are dropped."""
        loads: list[SeqLoad] = []
        for key, reservation in list(self._reserved.items()):
            job = reservation.job
            expired = job.deadline_at is not None and job.deadline_at <= now
            if expired or now - reservation.made > RESERVATION_TTL_S:
                del self._reserved[key]
                continue
            if reservation.variant_id in profiles:
                loads.append(_waiting_load(key, reservation.variant_id, job, now))
        return loads

    # ---- the loop (its own thread) ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped():
            try:
                self._iteration()
            except Exception as exc:  # a bug must not leave every request hanging: fail them all
                log.exception("stepper_failed", error=str(exc))
                with self._cond:
                    for lane in self._lanes.values():
                        for work in [*lane.waiting, *lane.running]:
                            work.generation._emit_joined(exc)
                            self._leave(lane, work, exc, keep_kv=False)
                        lane.waiting.clear()

    def _stopped(self) -> bool:
        with self._cond:
            if self._stopping:
                self._end_all()
            return self._stopping

    def _iteration(self) -> None:
        """Seat waiting requests, pick a lane, build its batch, decode it, hand out the tokens.

        What the loop tells the event loop (seats, refusals, text, ends) goes out in one
        hand-off before the decode and one after it (`batched_handoffs`)."""
        with batched_handoffs(), self._cond:
            now = self._clock()
            for lane in self._lanes.values():
                self._sweep(lane, now)
                self._join(lane, now)
                lane.meter.observe(now * 1000, len(lane.running))
            chosen = self._next_lane()
            if chosen is not None:
                entries, members = self._batch(chosen)
        if chosen is None:
            self._idle()
            return
        if not entries:
            return
        started = self._clock()
        try:
            sampled = chosen.decoder.step(entries)
        except Exception as exc:  # a failed llama_decode: these sequences fail, the loop goes on
            log.error("step_failed", variant=chosen.variant_id, error=str(exc))
            with batched_handoffs(), self._cond:
                for work in members:
                    self._leave(chosen, work, exc, keep_kv=False)
            return
        now = self._clock()
        with batched_handoffs(), self._cond:
            self._apply(chosen, members, sampled, now, now - started)

    def _idle(self) -> None:
        """Nothing to run: sleep until a submit, a cancel or a stop wakes the loop (checked again
        under the lock, so a wake-up since the last look is not lost)."""
        with self._cond:
            if not self._stopping and self._next_lane() is None \
                    and not any(lane.waiting for lane in self._lanes.values()):
                self._cond.wait(IDLE_WAIT_S)

    def _end_all(self) -> None:
        for lane in self._lanes.values():
            for work in lane.waiting:
                work.generation._emit_joined(ShuttingDownError())
                work.generation._emit_end(ShuttingDownError())
            lane.waiting.clear()
            for work in lane.running:
                assert work.sequence is not None
                work.sequence.end("cancelled")
                self._leave(lane, work, None)

    def _sweep(self, lane: Lane, now: float) -> None:
        """Drop waiting requests whose client left, and refuse those whose deadline can no
        longer fit their shortest useful run (their client should not wait for a place only to
        be refused when it frees)."""
        for work in list(lane.waiting):
            if work.generation.cancelled:
                lane.waiting.remove(work)
                work.generation._emit_joined((now - work.submitted) * 1000)
                work.generation._emit_end(GenerationResult("cancelled", len(work.job.prompt_tokens), 0.0, 0, 0.0))
            elif self._too_late(work, now):
                lane.waiting.remove(work)
                self._refuse_late(work, now)

    @staticmethod
    def _too_late(work: Work, now: float) -> bool:
        return work.job.deadline_at is not None and now + work.min_run_s > work.job.deadline_at

    @staticmethod
    def _refuse_late(work: Work, now: float) -> None:
        assert work.job.deadline_at is not None
        left_ms = (work.job.deadline_at - now) * 1000
        error = RefusedError(
            f"Cannot answer within the deadline: after waiting for a place in a batch, the "
            f"{max(left_ms, 0):.0f} ms left are less than the {work.min_run_s * 1000:.0f} ms the "
            "shortest useful answer needs; retry with a longer deadline.",
            code="deadline_infeasible", retry_after_s=1)
        work.generation._emit_joined(error)
        work.generation._emit_end(error)

    def _join(self, lane: Lane, now: float) -> None:
        """Give free places to waiting requests, earliest deadline first."""
        lane.waiting.sort(key=lambda w: w.urgency)
        while lane.waiting:
            free = [p for p in lane.places if p.work is None]
            width = lane.waiting[0].job.join_width  # it joins only a batch narrower than this
            if not free or (width is not None and len(lane.running) >= width):
                return
            work = lane.waiting.pop(0)
            if self._too_late(work, now):
                self._refuse_late(work, now)
                continue
            self._place(lane, work, free, now)

    def _place(self, lane: Lane, work: Work, free: list[Place], now: float) -> None:
        """Seat `work` in the free place whose KV shares the longest prefix with its prompt, or
        copy a longer prefix from any other place; else the least recently used free place."""
        prompt = work.job.prompt_tokens
        try:
            check_prompt(work.job, lane.decoder.n_ctx)  # before any KV moves
        except ValueError as exc:
            work.generation._emit_joined(exc)
            work.generation._emit_end(exc)
            return
        usable = len(prompt) - 1  # the last prompt token is always evaluated (its logits)
        own = max(free, key=lambda p: (min(common_prefix(p.tokens, prompt), usable), -p.last_used))
        own_n = min(common_prefix(own.tokens, prompt), usable)
        if own_n == 0:
            own = min(free, key=lambda p: p.last_used)
        donor, donor_n = None, own_n
        for place in lane.places:
            if place is own:
                continue
            n = min(common_prefix(place.tokens, prompt), usable)
            if n > donor_n:
                donor, donor_n = place, n
        decoder = lane.decoder
        try:
            decoder.new_sequence(own.seq_id, work.job.sampling, keep=own_n)
        except GrammarError as exc:  # this request fails, not the loop and the others
            error = InvalidRequestError(f"The answer's structure cannot be enforced: {exc}; simplify the "
                                        "JSON schema.", param="response_format")
            work.generation._emit_joined(error)
            work.generation._emit_end(error)
            return
        cached = own_n
        if donor is not None:
            decoder.copy_prefix(donor.seq_id, own.seq_id, donor_n)
            cached = donor_n
        own.tokens = list(prompt[:cached])
        own.work, own.last_used = work, now
        work.place, work.joined = own, now
        work.sequence = Sequence(work.job, decoder.n_ctx, cache_n=cached)
        lane.stats.cached_tokens += cached
        work.generation._emit_joined((now - work.submitted) * 1000)

    def _next_lane(self) -> Lane | None:
        return most_urgent((lane, [w.urgency for w in lane.running]) for lane in self._lanes.values())

    def _batch(self, lane: Lane) -> tuple[list[BatchEntry], list[Work]]:
        """The next step of `lane`: one token of every decoding sequence and one chunk of the
        most urgent multi-token input (a prompt, or a forced answer prefix).

        Each sequence's rules run first (cancel, deadline) with the predicted cost of the step
        it would take part in: a chunk riding along makes the step slower than the decode
        steps before it. A chunk that would push a decoding sequence past its deadline, when a
        step without it would not, waits for the next step instead."""
        now = self._clock()
        profile = lane.profile()
        decoding: list[Work] = []
        chunked: list[Work] = []
        for work in lane.running:
            seq = work.sequence
            assert seq is not None
            if work.generation.cancelled:
                seq.cancel()
            if seq.cancelled or seq.finished:
                seq.before_step(now)  # ends it (cancelled)
                self._leave(lane, work, None)
            elif len(seq.pending) > 1:  # its prompt or a forced prefix
                chunked.append(work)
            else:
                decoding.append(work)
        chunk = self._chunk(lane, chunked, now, profile)
        decode_s = self._decode_s(profile, decoding)
        chunk_s = 0.0
        if chunk is not None and profile is not None:
            assert chunk.sequence is not None
            chunk_s = _input_s(profile, chunk.sequence, min(self.chunk_tokens, len(chunk.sequence.pending)))
            if any(w.sequence is not None and w.sequence.fits(now, decode_s)
                   and not w.sequence.fits(now, decode_s, chunk_s) for w in decoding):
                chunk = None  # it waits one step; the stream near its deadline gets its token
        extra_s = chunk_s if chunk is not None else 0.0
        entries: list[BatchEntry] = []
        members: list[Work] = []
        for work in decoding:
            assert work.sequence is not None
            if not work.sequence.before_step(now, decode_s, extra_s):
                self._leave(lane, work, None)
                continue
            entries.append(self._take(work, 1))
            members.append(work)
        if chunk is not None:
            room = max(1, min(self.chunk_tokens, lane.decoder.n_batch - len(entries)))
            entries.append(self._take(chunk, room))
            members.append(chunk)
            lane.stats.prefill_chunks += 1
        return entries, members

    def _chunk(self, lane: Lane, chunked: list[Work], now: float, profile: CostProfile | None) -> Work | None:
        """The most urgent sequence with a multi-token input whose rules let it go on (the
        others' checks run too: an input that cannot be evaluated before its deadline stops
        at this chunk boundary instead of holding its place)."""
        going: list[Work] = []
        for work in chunked:
            seq = work.sequence
            assert seq is not None
            left_s = None if profile is None else _input_s(profile, seq, len(seq.pending))
            if seq.before_step(now, left_s):
                going.append(work)
            else:
                self._leave(lane, work, None)
        return min(going, key=lambda w: w.urgency) if going else None

    @staticmethod
    def _decode_s(profile: CostProfile | None, decoding: list[Work]) -> float | None:
        """The predicted cost of one decode step of these sequences (None: no profile)."""
        if profile is None or not decoding:
            return None
        return _decoding_step_s(profile, decoding)

    @staticmethod
    def _take(work: Work, limit: int) -> BatchEntry:
        """The sequence's next input as a batch entry; a decoding sequence may have up to its
        tokens left (less the one this step samples) drafted after it."""
        seq, place = work.sequence, work.place
        assert seq is not None and place is not None
        step = seq.take_input(limit)
        place.tokens.extend(step.tokens)
        draft_limit = max(seq.max_tokens - seq.n_generated - 1, 0) if not seq.prefilling else 0
        return BatchEntry(place.seq_id, step.tokens, step.pos, step.logits, draft_limit=draft_limit)

    def _apply(self, lane: Lane, members: list[Work], sampled: dict[int, list[int]], now: float,
               elapsed_s: float) -> None:
        width = len(members)
        stats = lane.stats
        stats.steps += 1
        stats.step_seconds += elapsed_s
        stats.tokens_decoded += width
        stats.widths[width] = stats.widths.get(width, 0) + 1
        if all(work.sequence is not None and not work.sequence.prefilling and len(work.sequence.pending) <= 1
               for work in members) and all(work.place is not None and work.place.seq_id in sampled
                                            for work in members):
            stats.recent_decode_ms.setdefault(width, deque(maxlen=RECENT_STEPS)).append(elapsed_s * 1000)
        decoder = lane.decoder
        decoding = [w for w in members if w.sequence is not None and not w.sequence.prefilling]
        # a step that carried a prompt chunk: the chunk's share is charged to its sequence, the
        # rest to the decoding ones (what the cost profile's two parts each describe)
        chunk_s = self._chunk_share_s(lane, decoding, elapsed_s) if len(decoding) < width else 0.0
        for work in members:
            seq, place = work.sequence, work.place
            assert seq is not None and place is not None
            if seq.prefilling:
                work.prefill_s += chunk_s
            else:
                work.step_s += elapsed_s - chunk_s
            if place.seq_id not in sampled:
                continue  # a prompt chunk that is not its last: nothing sampled yet
            self._hand_tokens(lane, work, sampled[place.seq_id], now, width)
            if seq.forced:
                decoder.accept(place.seq_id, seq.forced)
            work.generation._emit_logprobs(seq.drain_logprobs())
            for piece in seq.drain():
                work.generation._emit_text(piece)
            if work.fail_after_first:
                self._leave(lane, work, InjectedFault(f"injected fault after the first token ({lane.variant_id})"),
                            keep_kv=False)
            elif seq.finished:
                self._leave(lane, work, None)

    @staticmethod
    def _hand_tokens(lane: Lane, work: Work, tokens: list[int], now: float, width: int) -> None:
        """Give the sequence what the step sampled for it: one token, or with speculative
        decoding the drafted tokens the target accepted and the target's own next one. Those
        accepted ones are in the KV cache already; each counts as fed once the sequence takes
        it. Its rules may stop earlier (a stop string, max tokens, answer forcing starting):
        then the KV is cut back to what the sequence took, so it holds exactly `place.tokens`."""
        seq, place, decoder = work.sequence, work.place, lane.decoder
        assert seq is not None and place is not None
        drafted = decoder.drafted(place.seq_id)
        if drafted:
            accepted = len(tokens) - 1
            work.drafted += drafted
            work.accepted += accepted
            lane.stats.drafted_tokens += drafted
            lane.stats.accepted_tokens += accepted
        for i, token in enumerate(tokens):
            if i > 0:
                if seq.finished or len(seq.pending) != 1:
                    break  # ended, or a forced prefix comes next: the rest is not used
                step = seq.take_input(1)  # the previous token, fed already in this step
                place.tokens.extend(step.tokens)
            seq.on_token(token, decoder.token_piece(token), eog=decoder.is_eog(token), now=now, batch=width,
                         same_step=i > 0, logprob=_logprob(decoder, place.seq_id, token) if i == 0 else None)
        if len(tokens) > 1:
            decoder.keep(place.seq_id, len(place.tokens))

    @staticmethod
    def _chunk_share_s(lane: Lane, decoding: list[Work], elapsed_s: float) -> float:
        """The part of a step's time that its prompt chunk took: the step less what its decoding
        sequences' tokens cost by the variant's profile (the whole step when none decoded)."""
        profile = lane.profile()
        if not decoding or profile is None:
            return elapsed_s
        return max(elapsed_s - _decoding_step_s(profile, decoding), 0.0)

    def _leave(self, lane: Lane, work: Work, error: BaseException | None, *, keep_kv: bool = True) -> None:
        """The sequence is done: its place is free (its KV kept for prefix reuse, unless it
        failed), and its generation gets the result or the error."""
        place = work.place
        if place is not None:
            place.work = None
            place.last_used = self._clock()
            if not keep_kv:
                lane.decoder.free_sequence(place.seq_id)
                place.tokens = []
        seq = work.sequence
        if error is not None or seq is None:
            work.generation._emit_end(error or RuntimeError("the sequence never started"))
            return
        work.generation._emit_logprobs(seq.drain_logprobs())
        for piece in seq.drain():
            work.generation._emit_text(piece)
        result = seq.result()
        result.step_ms = work.step_s * 1000
        result.prefill_step_ms = work.prefill_s * 1000
        result.drafted_n, result.accepted_n = work.drafted, work.accepted
        if work.joined is not None:
            result.queue_ms = (work.joined - work.submitted) * 1000
        work.generation._emit_end(result)


def _logprob(decoder: StepDecoder, seq_id: int, token: int) -> TokenLogprob | None:
    """The sampled token's log-probabilities, if its request asked for them, with tokens as bytes."""
    found = decoder.logprobs(seq_id)
    if found is None:
        return None
    logprob, top = found
    return TokenLogprob(decoder.token_piece(token, special=True), logprob,
                        tuple((decoder.token_piece(t, special=True), lp) for t, lp in top))


def _decoding_step_s(profile: CostProfile, decoding: list[Work]) -> float:
    """The predicted cost of one decode step of these sequences: per token, times the tokens a
    step yields (more than one for a speculative pair, whose per-token costs are effective ones)."""
    context = sum(w.sequence.n_past for w in decoding if w.sequence is not None) / len(decoding)
    return step_ms(profile, len(decoding), context) * profile.tokens_per_step / 1000


def _input_s(profile: CostProfile, seq: Sequence, n_tokens: int) -> float:
    """The predicted cost of evaluating the next `n_tokens` of a sequence's pending input."""
    return (prefill_ms(profile, seq.n_past + n_tokens) - prefill_ms(profile, seq.n_past)) / 1000


def _deadline_ms(job: GenerationJob, now: float) -> float | None:
    """What the timeline must respect: the deadline less the tail reserve, from `now`."""
    if job.deadline_at is None:
        return None
    return (job.deadline_at - now - TAIL_RESERVE_S) * 1000


def _waiting_load(key: int, variant_id: str, job: GenerationJob, now: float) -> SeqLoad:
    """A job not yet in a batch (waiting for a place, or reserved by admission) as the board shows it."""
    return SeqLoad(key, variant_id, tokens_left=job.max_tokens, prompt_left=len(job.prompt_tokens),
                   deadline_ms=_deadline_ms(job, now), running=False, join_width=job.join_width)
