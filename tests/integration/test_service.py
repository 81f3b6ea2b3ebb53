"""The pipeline on the real models: the exact prompt text the model receives, and the decision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeserve.config import ModelsFile
from edgeserve.errors import RefusedError
from edgeserve.pipeline import InferenceRequest, Pipeline
from edgeserve.pipeline.admission import Admission
from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy_file import PolicyFile, parse_policy
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.sequence import SamplingParams
from edgeserve.variant_id import VariantId

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAMILY = "smollm2-135m"
QUESTION = "A pen costs 3 dollars. How much do 4 pens cost?"


# Curves of a known shape (the shipped ones are measured and move with each sweep): q4_1 = q8_0
# above q2_k at every budget.
CURVES = """
[curves.q2_k.boxed]
budgets  = [32,    64,    128,   256,   384]
accuracy = [0.001, 0.003, 0.006, 0.009, 0.010]
[curves.q4_1.boxed]
budgets  = [32,    64,    128,   256,   384]
accuracy = [0.002, 0.006, 0.013, 0.020, 0.022]
[curves.q8_0.boxed]
budgets  = [32,    64,    128,   256,   384]
accuracy = [0.002, 0.006, 0.013, 0.020, 0.022]
"""


@pytest.fixture(scope="module")
def policy() -> PolicyFile:
    """The shipped policy of the default family: its settings with the curves above."""
    shipped = (ROOT / "policies" / "smollm2-135m.toml").read_text()
    settings = shipped[:shipped.index("[curves.")]
    return parse_policy((settings + CURVES).encode(), "policies/smollm2-135m.toml with test curves")


@pytest.fixture(scope="module")
async def pipeline(models_file: ModelsFile, prepared: dict[str, PreparedVariant],
                   policy: PolicyFile) -> AsyncIterator[Pipeline]:
    """Fixed, plausible costs (q2_k fastest): these tests are about prompts and decisions, the
    measured costs are exercised by the calibration tests and the e2e suite."""
    registry = ModelRegistry(models_file, prepared)
    await registry.load_all()
    profiles = {
        VariantId.parse(variant_id): CostProfile(variant_id=variant_id, prefill_fixed_ms=5.0,
                                                 prefill_ms_per_token=0.5, decode_ms_per_token=per_token)
        for variant_id, per_token in ((f"{FAMILY}:q2_k", 3.0), (f"{FAMILY}:q4_1", 12.0),
                                      (f"{FAMILY}:q8_0", 16.0))
    }
    yield Pipeline(Catalog.build(registry, None, profiles), registry.stepper, {FAMILY: policy})
    registry.close()


async def decided(pipeline: Pipeline, request: InferenceRequest) -> Admission:
    """Admission alone: these tests look at decisions and start nothing, so each decided job's
    reservation on the board is released (a Run does that when it is closed)."""
    admission = await pipeline.admit(request)
    admission.variant.release(admission.reservation)
    return admission


async def test_the_model_receives_the_style_and_the_budget_hint(pipeline: Pipeline) -> None:
    request = InferenceRequest(model=f"{FAMILY}:q4_1", messages=[{"role": "user", "content": QUESTION}],
                               max_tokens=64, style="boxed", hint=True)
    admission = await decided(pipeline, request)
    instruction = pipeline.policies[FAMILY].styles["boxed"].instruction
    expected_user_turn = (f"<|im_start|>user\n{QUESTION}\n\n{instruction}\n"
                          f"You MUST respond in **UNDER 32 tokens**<|im_end|>\n")
    assert expected_user_turn in admission.prompt.text
    assert admission.prompt.text.endswith("<|im_start|>assistant\n")
    assert admission.decision.hint_tokens == 32
    assert admission.job.max_tokens == 64


@pytest.mark.parametrize("max_tokens", [None, 64])
async def test_without_a_deadline_the_prompt_is_left_as_the_client_sent_it(pipeline: Pipeline,
                                                                            max_tokens: int | None) -> None:
    request = InferenceRequest(model=FAMILY, messages=[{"role": "user", "content": QUESTION}],
                               max_tokens=max_tokens)
    admission = await decided(pipeline, request)
    assert "You MUST respond" not in admission.prompt.text
    assert admission.decision.hint_tokens is None


async def test_with_a_deadline_the_hint_is_on_by_default(pipeline: Pipeline) -> None:
    request = InferenceRequest(model=FAMILY, messages=[{"role": "user", "content": QUESTION}],
                               max_tokens=64, deadline_ms=60_000)
    admission = await decided(pipeline, request)
    assert admission.decision.hint_tokens == 32
    assert "You MUST respond in **UNDER 32 tokens**" in admission.prompt.text


async def test_a_tight_deadline_goes_to_the_fast_variant_and_a_loose_one_to_the_better(pipeline: Pipeline) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    tight = await decided(pipeline, InferenceRequest(model=FAMILY, messages=messages, max_tokens=300,
                                                deadline_ms=350))
    loose = await decided(pipeline, InferenceRequest(model=FAMILY, messages=messages, max_tokens=300,
                                                deadline_ms=60_000))
    # At 350 ms q2_k (3 ms/token) fits four times the tokens of q4_1, which outweighs its lower
    # curve; with time to spare, the curves
    # rank q4_1 = q8_0 above q2_k and the tie goes to the faster q4_1.
    assert str(tight.variant_id) == f"{FAMILY}:q2_k"
    assert str(loose.variant_id) == f"{FAMILY}:q4_1"
    assert tight.decision.predicted_ms <= 350
    assert tight.job.deadline_at is not None


async def test_a_refusal_names_the_deadline(pipeline: Pipeline) -> None:
    with pytest.raises(RefusedError) as refused:
        await decided(pipeline, InferenceRequest(model=FAMILY, messages=[{"role": "user", "content": "hi"}],
                                            deadline_ms=2))
    assert refused.value.code == "deadline_infeasible"


async def test_answer_forcing_closes_a_boxed_answer_within_the_budget(pipeline: Pipeline) -> None:
    request = InferenceRequest(model=f"{FAMILY}:q4_1", messages=[{"role": "user", "content": QUESTION}],
                               max_tokens=40, answer_forcing="on", hint=False,
                               sampling=SamplingParams(temperature=0.0))
    admission = await decided(pipeline, request)
    generation, _ = await pipeline.start(admission)
    text = await generation.text()
    assert generation.result is not None
    assert "\\boxed{" in text
    assert generation.result.predicted_n <= 40
