"""What a speculative pair would cost, projected from its two variants' profiles (no measurement).

A pair (the target, e.g. Q8_0, verifies what a cheaper draft of the same model, e.g. Q2_K,
proposes) decodes in steps: the draft proposes ``k`` tokens one after the other, then the target
evaluates all ``k + 1`` positions in ONE pass and keeps the drafts it agrees with plus one token of
its own. A step therefore costs ``k`` draft decode steps and one verify pass, and yields between
1 and ``k + 1`` tokens. The server calibrates a real pair (runtime.calibrate); this module answers
"would a pair pay on that board?" before one exists, for `edgeserve simulate --speculative`.

Two numbers drive the answer and neither is in the variants' own profiles:

* ``acceptance``: the probability that the target agrees with a drafted token. Measured greedy
  agreement of Q2_K drafts with Q8_0 (scripts/draft_acceptance.py; docs/benchmarks.md, "Draft
  acceptance"): 81.8 % for SmolLM2-135M, 94.8 % for Qwen2.5-Coder-0.5B. Nothing was measured
  for Llama-3.1-8B.
* ``verify_factor``: a target pass over ``k + 1`` tokens relative to a one-token step. Where decode
  is bound by memory bandwidth (the study's RK3568 streams every weight once per pass) a pass over
  a few tokens costs little more than one: ~1.0-1.2 (1.1 is an assumption, not a measurement). On
  the 2-core x86 VM this project is developed on, decode is compute-bound and the pass was
  measured at 2.3-4x (same section), which is why pairs do not pay there.
"""

from __future__ import annotations

import math

from edgeserve.routing.costs import CostProfile


def expected_tokens_per_step(acceptance: float, draft_len: int) -> float:
    """Mean tokens one verify step yields when ``draft_len`` (k) tokens are drafted and each is
    accepted with probability ``acceptance`` (a), independently of the others.

    The step keeps the run of accepted drafts up to the first rejection, plus the target's own
    token: E = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a), and k + 1 when a = 1.
    Real disagreements cluster a little: SmolLM2's measured 81.8 % gave 3.41 tokens per step at
    k = 4 where this formula says 3.48 (about 2 % optimistic at k = 2...6).
    """
    _check_acceptance(acceptance)
    _check_draft_len(draft_len)
    if acceptance == 1.0:
        return float(draft_len + 1)
    return (1.0 - acceptance ** (draft_len + 1)) / (1.0 - acceptance)


def speculative_profile(
    target: CostProfile,
    draft: CostProfile,
    *,
    acceptance: float,
    draft_len: int,
    verify_factor: float,
    variant_id: str,
) -> CostProfile:
    """The projected cost profile of the pair ``target`` + ``draft`` (see the module docstring).

    Decode: one step costs ``draft_len`` draft decode steps plus one verify pass of
    ``verify_factor`` target decode steps, and yields ``expected_tokens_per_step`` tokens; the
    profile's per-token costs are that step's cost over its tokens (effective ones, as the
    runtime's calibration of a real pair measures them), the growth terms likewise. The whole
    step is priced at the context it starts from (its ``k`` further positions are a rounding
    error next to the hundreds of tokens of the context).

    Prefill: the target's (fixed, per token, growth) plus the draft's per-token and growth terms,
    since the draft must read the prompt too. The draft's fixed part is left out (the target
    samples the first token); on a board whose fixed part is one pass over the weights, that
    under-charges each request by less than one draft step.

    Batching: the target's ``batch_step_factors``, an assumption: a batched pair step is dominated
    by the target's verify pass over every sequence's drafts, and the draft's steps are assumed to
    batch as well as the target's (nothing measured a pair at several widths).

    ``load_ms`` is 0: a pair loads nothing of its own (it composes two resident variants).
    """
    _check_acceptance(acceptance)
    _check_draft_len(draft_len)
    if not verify_factor >= 1.0 or math.isinf(verify_factor):  # also rejects NaN
        raise ValueError(f"verify_factor must be a finite number of at least 1 (a target pass over "
                         f"k + 1 tokens costs at least one one-token step; ~1.1 on a memory-bound "
                         f"board, 2.3-4 on the x86 VM); got {verify_factor}")
    tokens = expected_tokens_per_step(acceptance, draft_len)

    def per_token(draft_term: float, target_term: float) -> float:
        return (draft_len * draft_term + verify_factor * target_term) / tokens

    return CostProfile(
        variant_id=variant_id,
        n_threads=target.n_threads,
        host=target.host,
        prefill_fixed_ms=target.prefill_fixed_ms,
        prefill_ms_per_token=target.prefill_ms_per_token + draft.prefill_ms_per_token,
        prefill_growth_ms_per_token_per_1k_ctx=(target.prefill_growth_ms_per_token_per_1k_ctx
                                                + draft.prefill_growth_ms_per_token_per_1k_ctx),
        decode_ms_per_token=per_token(draft.decode_ms_per_token, target.decode_ms_per_token),
        decode_growth_ms_per_token_per_1k_ctx=per_token(
            draft.decode_growth_ms_per_token_per_1k_ctx,
            target.decode_growth_ms_per_token_per_1k_ctx),
        batch_step_factors=dict(target.batch_step_factors),
        tokens_per_step=tokens,
    )


def _check_acceptance(acceptance: float) -> None:
    if not 0.0 <= acceptance <= 1.0:  # also rejects NaN
        raise ValueError(f"acceptance must be a probability between 0 and 1 (the share of drafted "
                         f"tokens the target agrees with, e.g. 0.8); got {acceptance}")


def _check_draft_len(draft_len: int) -> None:
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be a whole number of at least 1 (the tokens the draft "
                         f"proposes per step, e.g. 4); got {draft_len!r}")
