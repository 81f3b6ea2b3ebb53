"""edgeserve.pipeline against fake variants: admission and the routing decision, the run, the
remote fallback, and the one record (cost update → metrics → one log line) of every request."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edgeserve.errors import (
    EdgeserveError,
    GenerationFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    RefusedError,
    RemoteUnavailableError,
    ShuttingDownError,
)
from edgeserve.pipeline import InferenceRequest, Pipeline
from edgeserve.pipeline.record import log_fields
from edgeserve.routing.batching import SeqLoad
from edgeserve.routing.policy_file import PolicyFile, parse_policy
from edgeserve.runtime.sequence import SamplingParams
from edgeserve.variant_id import VariantId
from tests.unit.pipeline.fakes import FakeLoop, FakeVariant, Script, Sink, catalog, models

POLICY = b"""
name = "%s"
[routing]
min_useful_tokens = 16
safety_margin_ms = 0
safety_margin_ratio = 0
default_max_tokens = 256

[curves.q2_k.boxed]
budgets = [32, 256]
accuracy = [%s, %s]

[curves.q8_0.boxed]
budgets = [32, 256]
accuracy = [%s, %s]
"""
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
LOG_FIELDS = ["request_id", "family", "variant", "deadline_ms", "predicted_ms", "budget_tokens", "hint_tokens",
              "queue_ms", "actual_ms", "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "batch_width",
              "drafted_tokens", "accepted_tokens", "finish", "outcome", "code", "client"]


def policy(name: str, q2: tuple[float, float], q8: tuple[float, float]) -> PolicyFile:
    return parse_policy(POLICY % (name.encode(), *(str(a).encode() for a in (*q2, *q8))), f"{name}.toml")


BETTER_Q8 = policy("fam", (0.1, 0.3), (0.2, 0.8))  # q8_0 wins when it has the time


def world(tmp_path: Path, *, remote: bool = False, queue: FakeLoop | None = None,
          policies: dict[str, PolicyFile] | None = None) -> tuple[Pipeline, Sink]:
    """fam: q2_k at 2 ms/token, q8_0 at 10 ms/token (and a remote `cloud` at 1 ms/token)."""
    speeds = {"fam:q2_k": 2.0, "fam:q8_0": 10.0, "fam:cloud": 1.0}
    files = models(("fam", ["q2_k", "q8_0"], ["cloud"] if remote else []))
    sink = Sink()
    pipeline = Pipeline(catalog(tmp_path, files, speeds), queue or FakeLoop(), policies or {"fam": BETTER_Q8},
                        sink)
    return pipeline, sink


def ask(model: str = "fam", **kwargs: object) -> InferenceRequest:
    return InferenceRequest(model=model, messages=QUESTION, **kwargs)  # type: ignore[arg-type]


def variant(pipeline: Pipeline, vid: str) -> FakeVariant:
    found = pipeline.catalog[VariantId.parse(vid)]
    assert isinstance(found, FakeVariant)
    return found


# ---- admission: where the routing decision is made ---------------------------------------------


async def test_a_tight_deadline_goes_to_the_fast_variant_and_a_loose_one_to_the_better(tmp_path: Path) -> None:
    pipeline, _ = world(tmp_path)
    tight = await pipeline.admit(ask(max_tokens=200, deadline_ms=500))
    loose = await pipeline.admit(ask(max_tokens=200, deadline_ms=60_000))
    assert str(tight.variant_id) == "fam:q2_k" and str(loose.variant_id) == "fam:q8_0"
    assert tight.decision.predicted_ms <= 500
    assert pipeline.in_flight == 2


async def test_the_job_carries_the_absolute_deadline_and_the_decided_budget(tmp_path: Path) -> None:
    pipeline, _ = world(tmp_path)
    request = ask(max_tokens=40, deadline_ms=60_000)
    admission = await pipeline.admit(request)
    assert admission.job.deadline_at == pytest.approx(request.arrived + 60.0)
    assert admission.job.max_tokens == admission.decision.max_tokens == admission.budget_tokens == 40


async def test_the_prompt_carries_the_hint_the_decision_chose(tmp_path: Path) -> None:
    pipeline, _ = world(tmp_path)
    admission = await pipeline.admit(ask(max_tokens=64, deadline_ms=60_000))
    assert admission.decision.hint_tokens == 32 and admission.prompt.hint_tokens == 32
    assert "UNDER 32 tokens" in admission.prompt.text
    plain = await pipeline.admit(ask(max_tokens=64))  # no deadline: the prompt as the client sent it
    assert plain.decision.hint_tokens is None and plain.prompt.text == QUESTION[0]["content"]


async def test_each_family_routes_with_its_own_curves(tmp_path: Path) -> None:
    """Two families with the same variant names and speeds: the curves of each decide."""
    files = models(("one", ["q2_k", "q8_0"], []), ("two", ["q2_k", "q8_0"], []))
    speeds = {"one:q2_k": 2.0, "one:q8_0": 10.0, "two:q2_k": 2.0, "two:q8_0": 10.0}
    policies = {"one": policy("one", (0.1, 0.3), (0.2, 0.8)), "two": policy("two", (0.5, 0.9), (0.2, 0.4))}
    pipeline = Pipeline(catalog(tmp_path, files, speeds), FakeLoop(), policies, Sink())
    one = await pipeline.admit(ask("one", max_tokens=200))
    two = await pipeline.admit(ask("two", max_tokens=200))
    assert str(one.variant_id) == "one:q8_0" and str(two.variant_id) == "two:q2_k"


async def test_a_pinned_variant_runs_even_when_another_would_be_better(tmp_path: Path) -> None:
    pipeline, _ = world(tmp_path)
    admission = await pipeline.admit(ask("fam:q2_k", max_tokens=200))
    assert str(admission.variant_id) == "fam:q2_k" and "pinned" in admission.decision.reason


async def test_what_already_runs_counts_against_the_deadline(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, _ = world(tmp_path)
    board = pipeline.catalog.board()
    # every variant (one place each) runs a request with 90 tokens left and no deadline
    busy = tuple(SeqLoad(k, vid, tokens_left=90, context=10) for k, vid in enumerate(board.variants))
    monkeypatch.setattr(pipeline.catalog, "board", lambda: replace(board, sequences=busy))
    admission = await pipeline.admit(ask(max_tokens=200, deadline_ms=1500))
    wait = admission.decision.queue_wait_ms
    assert wait == pytest.approx(90 * 2.0 if admission.variant_id.name == "q2_k" else 90 * 10.0)
    assert admission.decision.predicted_ms + wait <= 1500


async def test_requests_that_arrive_together_are_judged_one_after_the_other(tmp_path: Path) -> None:
    """The response starts an admitted job a few event-loop turns later; meanwhile its
    reservation holds its place on the board, so the next decision does not count on a free
    variant that the first request is about to take."""
    pipeline, _ = world(tmp_path)
    first, second = await asyncio.gather(*(
        pipeline.open(ask("fam:q2_k", max_tokens=200, deadline_ms=700), request_id=f"r{i}", client="c")
        for i in range(2)))
    assert first.admission.budget_tokens == 200 and first.admission.decision.queue_wait_ms == 0
    later = second.admission.decision
    assert later.queue_wait_ms > 0 and later.max_tokens < 200  # behind the first, in its one place
    assert later.predicted_ms + later.queue_wait_ms <= 700
    waiting = [(s.key, s.running) for s in pipeline.catalog.board().sequences]
    assert waiting == [(first.admission.reservation, False), (second.admission.reservation, False)]
    first.close()  # never started (the client left): off the board
    await second.start()  # started: the loop holds it now, not the reservation
    assert pipeline.catalog.board().sequences == ()
    second.close()


@pytest.mark.parametrize(("model", "headers", "error"), [
    ("gpt-4o", {}, ModelNotFoundError),
    ("fam:q5_k", {}, ModelNotFoundError),
    ("fam", {"style": "sonnet"}, InvalidRequestError),
    ("fam", {"deadline_ms": 1}, RefusedError),
])
async def test_what_admission_turns_away(tmp_path: Path, model: str, headers: dict[str, object],
                                         error: type[Exception]) -> None:
    pipeline, sink = world(tmp_path)
    with capture_logs() as logs, pytest.raises(error):
        await pipeline.open(ask(model, max_tokens=64, **headers), request_id="r1", client="c")
    [record] = sink.records
    assert record.turned_away and record.variant is None and pipeline.in_flight == 0
    if error is RefusedError:
        assert record.outcome == "refused" and record.code == "deadline_infeasible" and record.family == "fam"
        assert [line["event"] for line in logs] == ["completion"]
    else:  # bad input is counted, and its answer says it all: no log line
        assert record.outcome == "rejected" and logs == []


async def test_a_draining_server_admits_nothing(tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    pipeline.draining = True
    with pytest.raises(ShuttingDownError):
        await pipeline.open(ask(), request_id="r1", client="c")
    assert sink.records[0].outcome == "refused" and sink.records[0].code == "shutting_down"


# ---- the run and its record ---------------------------------------------------------------------


async def test_a_finished_request_is_recorded_once_with_every_field(tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    with capture_logs() as logs:
        run = await pipeline.open(ask(max_tokens=64, deadline_ms=60_000), request_id="r1", client="127.0.0.1:5")
        text = await run.text()
        run.close()
    assert text == "The answer is 4."
    [record] = sink.records
    assert record.outcome == "met" and record.finish == "stop" and record.variant == "fam:q8_0"
    assert record.family == "fam" and record.queue_ms == 1.5 and record.completion_tokens == 2
    assert record.cached_prompt_tokens == 0 and record.batch_width == 1.0
    [line] = logs
    assert line["event"] == "completion" and list(line)[:len(LOG_FIELDS)] == LOG_FIELDS
    assert {k: line[k] for k in LOG_FIELDS} == log_fields(record)
    assert len(variant(pipeline, "fam:q8_0").observed) == 1  # the cost update came first
    assert pipeline.in_flight == 0


async def test_a_stream_is_recorded_when_it_is_closed(tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    run = await pipeline.open(ask(max_tokens=64), request_id="r1", client="c")
    await run.start()
    pieces = [piece async for piece in run]
    assert pieces == ["The answer", " is 4."] and sink.records == []
    run.close()
    run.close()  # idempotent
    assert [r.outcome for r in sink.records] == ["completed"] and pipeline.in_flight == 0


async def test_a_client_that_leaves_mid_stream_cancels_and_is_recorded_when_the_generation_stops(
        tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    variant(pipeline, "fam:q8_0").script = Script(wait_for_cancel=True)
    run = await pipeline.open(ask(max_tokens=64), request_id="r1", client="c")
    await run.start()
    assert run.generation is not None
    run.close()  # the client left before the end
    assert run.generation.cancelled and pipeline.in_flight == 0
    for _ in range(200):
        if sink.records:
            break
        await asyncio.sleep(0.005)
    [record] = sink.records
    assert record.outcome == "cancelled" and record.finish == "cancelled"


async def test_a_failed_generation_is_recorded_as_failed(tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    variant(pipeline, "fam:q8_0").script = Script(fail=True)
    run = await pipeline.open(ask(max_tokens=64), request_id="r1", client="c")
    with pytest.raises(GenerationFailedError):
        await run.text()
    run.close()
    [record] = sink.records
    assert record.outcome == "failed" and record.finish is None and not record.turned_away


async def test_a_request_turned_away_at_its_start_is_recorded_with_its_decision(tmp_path: Path) -> None:
    pipeline, sink = world(tmp_path)
    variant(pipeline, "fam:q8_0").refuse_start = RefusedError("full", code="queue_full", retry_after_s=1)
    run = await pipeline.open(ask(max_tokens=64, deadline_ms=60_000), request_id="r1", client="c")
    with pytest.raises(RefusedError):
        await run.start()
    run.close()
    [record] = sink.records
    assert record.turned_away and record.outcome == "refused" and record.code == "queue_full"
    assert record.variant == "fam:q8_0" and record.deadline_ms == 60_000 and record.queue_ms is None
    assert pipeline.in_flight == 0


# ---- a remote variant: started at admission, routed again when it refuses ------------------------


async def test_a_remote_that_refuses_is_routed_around(tmp_path: Path) -> None:
    with_cloud = (POLICY % (b"fam", b"0.1", b"0.3", b"0.2", b"0.5")
                  + b"[curves.cloud.boxed]\nbudgets = [32, 256]\naccuracy = [0.6, 0.9]\n")
    pipeline, sink = world(tmp_path, remote=True, policies={"fam": parse_policy(with_cloud, "fam.toml")})
    cloud = variant(pipeline, "fam:cloud")
    first = await pipeline.open(ask(max_tokens=64), request_id="r1", client="c")
    assert str(first.admission.variant_id) == "fam:cloud" and first.generation is not None  # started already
    assert first.admission.prompt.shaped_by == VariantId("fam", "q2_k")  # counted by the family's default
    assert first.admission.job.forcing is None
    await first.text()
    first.close()
    cloud.refuse_start = RemoteUnavailableError("remote fam:cloud: connection refused")
    with capture_logs() as logs:
        second = await pipeline.open(ask(max_tokens=64), request_id="r2", client="c")
    assert str(second.admission.variant_id) == "fam:q8_0" and second.generation is None
    assert [line["event"] for line in logs] == ["remote_fallback"]
    assert pipeline.in_flight == 1
    await second.text()
    second.close()
    assert [r.variant for r in sink.records] == ["fam:cloud", "fam:q8_0"] and pipeline.in_flight == 0


async def test_cut_short_stops_what_runs_and_refuses_what_waits(tmp_path: Path) -> None:
    queue = FakeLoop()
    pipeline, _ = world(tmp_path, queue=queue)
    variant(pipeline, "fam:q8_0").script = Script(wait_for_cancel=True)
    run = await pipeline.open(ask(max_tokens=64), request_id="r1", client="c")
    await run.start()
    assert pipeline.cut_short() == 1
    assert run.generation is not None and run.generation.cancelled
    assert isinstance(queue.refused[0], ShuttingDownError)
    run.close()
    started = time.perf_counter()
    while run.result is None and time.perf_counter() - started < 1:
        await asyncio.sleep(0.005)
    assert run.result is not None and run.result.finish == "cancelled"


async def test_a_request_for_logprobs_is_not_routed_to_a_remote(tmp_path: Path) -> None:
    with_cloud = (POLICY % (b"fam", b"0.1", b"0.3", b"0.2", b"0.5")
                  + b"[curves.cloud.boxed]\nbudgets = [32, 256]\naccuracy = [0.6, 0.9]\n")
    pipeline, _ = world(tmp_path, remote=True, policies={"fam": parse_policy(with_cloud, "fam.toml")})
    plain = await pipeline.admit(ask(max_tokens=64))
    assert str(plain.variant_id) == "fam:cloud"  # the best curve
    wanting = await pipeline.admit(ask(max_tokens=64, sampling=SamplingParams(temperature=0.0, logprobs=2)))
    assert str(wanting.variant_id) == "fam:q8_0"
    with pytest.raises(EdgeserveError) as refused:  # pinned to the remote: refused, not answered without them
        await pipeline.admit(ask(model="fam:cloud", max_tokens=64, sampling=SamplingParams(logprobs=0)))
    assert "log-probabilities" in refused.value.message
