"""The maths of lossless speculative SAMPLING (temperature > 0), apart from any model.

Greedy speculative decoding only has to compare argmaxes. When the target samples, a draft
token cannot simply be compared with "the" target token: the rule of Leviathan et al. (2023)
and Chen et al. (2023) accepts draft token d, drawn from the draft's distribution q, with
probability min(1, p(d) / q(d)) and on rejection draws a replacement from
normalize(max(0, p - q)). Whatever q is, every emitted token is then distributed exactly as
if the target had sampled it alone, so the text has the target's distribution.

That needs p exactly as the target's sampler draws from it: `probabilities` rebuilds the
distribution of our llama.cpp chain (decoder.py `_sampler_chain`: top-k, top-p, min-p,
temperature, dist) from one row of raw logits, following llama.cpp's src/llama-sampling.cpp
(CPU samplers), in float32 where llama.cpp computes in float32.

Ties: llama.cpp orders candidates with std::partial_sort / std::sort, which are not stable, so
when tokens with exactly equal logits straddle the top-k or top-p cut, which of them it keeps
is unspecified. Here equal logits are ordered by token id (the lower id is kept). Exactly
equal float32 logits at the cut are rare in a real model, and only they can make the two differ.

Nothing here imports llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgeserve.runtime.sequence import SamplingParams


def _softmax32(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """llama.cpp's softmax (llama_sampler_softmax_impl): expf(l - max), a float32 sum taken in
    array order (cumsum, unlike np.sum, adds sequentially), then a division."""
    e: npt.NDArray[np.float32] = np.exp(logits - logits.max(), dtype=np.float32)
    total = np.float32(np.cumsum(e, dtype=np.float32)[-1])
    return e / total


def probabilities(logits: np.ndarray, params: SamplingParams) -> npt.NDArray[np.float64]:
    """The distribution our llama.cpp chain draws the next token from, for one row of raw
    logits (length n_vocab): float64, summing to 1, zero outside the tokens the chain keeps.

    Each filter keeps at least one token (min_keep = 1), as the chain is built with:
    - top-k (k <= 0: off): the k largest logits;
    - top-p (p >= 1: off): softmax of what is left, then the shortest prefix in descending
      order whose cumulative probability reaches p (all of it if rounding never gets there);
    - min-p (p <= 0: off): logits >= max logit + log(min_p), i.e. probability >= min_p times
      the largest, BEFORE temperature (the chain puts temperature after it);
    - temperature divides the logits, and dist draws from their softmax.
    Penalties depend on the history and are not modelled: they raise ValueError, as does
    temperature <= 0 (greedy is compared by argmax, elsewhere).
    """
    if params.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, not {params.temperature}")
    if params.repeat_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        raise ValueError("repetition penalties are not supported by speculative sampling")
    row = np.asarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"logits must be one non-empty row, not shape {row.shape}")
    if np.isnan(row).any():
        raise ValueError("logits contain NaN")

    # Candidates by descending logit, equal logits by token id (see the module docstring).
    order = np.lexsort((np.arange(row.size), -row))
    if params.top_k > 0:
        order = order[: params.top_k]
    if params.top_p < 1.0:
        # llama.cpp normalizes in array order: sorted after top-k, token order without it.
        soft = _softmax32(row[order]) if params.top_k > 0 else _softmax32(row)[order]
        cum = np.cumsum(soft, dtype=np.float32)
        reached = np.flatnonzero(cum >= np.float32(params.top_p))
        if reached.size:
            order = order[: reached[0] + 1]
    if params.min_p > 0.0:
        kept = row[order]
        min_logit = kept[0] + np.log(np.float32(params.min_p))  # kept[0] is the largest
        order = order[: max(1, int(np.count_nonzero(kept >= min_logit)))]  # sorted: a prefix

    # dist: float32 expf of the scaled logits, summed and divided in double.
    scaled = row[order] / np.float32(params.temperature)
    e = np.exp(scaled - scaled.max(), dtype=np.float32).astype(np.float64)
    probs = np.zeros(row.size, dtype=np.float64)
    probs[order] = e / e.sum()
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token drawn from `probs` (non-negative weights, normalized here). Used to draw the
    drafts from q and every token the rule below emits; a zero-weight token is never drawn."""
    weights = np.asarray(probs, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"probabilities must be one non-empty row, not shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    cdf = np.cumsum(weights)
    if cdf[-1] <= 0:
        raise ValueError("probabilities sum to zero")
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    # u * total can round up to total: fall back to the last token with weight.
    return min(token, int(np.flatnonzero(weights)[-1]))


def accept_drafted(target_probs: np.ndarray, draft_probs: np.ndarray, drafted: Sequence[int],
                   rng: np.random.Generator) -> list[int]:
    """The tokens to emit after checking k drafted tokens: the accepted drafts, then one token
    the target draws (a replacement for the first rejected draft, or, when all k were accepted,
    a token after them). Always at least one token, at most k + 1.

    `target_probs` (k + 1 rows): the target's distribution after the prefix, after d1, ...,
    after dk; `draft_probs` (k rows): the distribution the draft drew each d_i from.

    Draft d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first rejection is
    replaced by a draw from normalize(max(0, p_i - q_i)), which adds exactly the probability
    mass p_i has beyond q_i, so the emitted token is distributed as p_i. A draft with
    q_i(d_i) == 0 cannot have been drawn from q_i and is rejected. If the residual is all zero
    (p_i == q_i up to rounding, where a rejection should not happen at all) the replacement is
    drawn from p_i itself.
    """
    target = np.asarray(target_probs, dtype=np.float64)
    draft = np.asarray(draft_probs, dtype=np.float64)
    k = len(drafted)
    if target.ndim != 2 or target.shape[0] != k + 1 or target.shape[1] == 0:
        raise ValueError(f"target_probs must have k + 1 = {k + 1} rows, not shape {target.shape}")
    if draft.shape != (k, target.shape[1]):
        raise ValueError(f"draft_probs must have shape {(k, target.shape[1])}, not {draft.shape}")
    n_vocab = target.shape[1]
    if any(not 0 <= token < n_vocab for token in drafted):
        raise ValueError(f"drafted tokens {list(drafted)} are not all in the vocabulary of {n_vocab}")
    for i, token in enumerate(drafted):
        p, q = target[i], draft[i]
        # u < p/q with u uniform in [0, 1), written without dividing (q(d) == 0 is rejected).
        if q[token] > 0 and rng.random() * q[token] < p[token]:
            continue
        residual = np.maximum(p - q, 0.0)
        return [int(t) for t in drafted[:i]] + [draw(residual if residual.sum() > 0 else p, rng)]
    return [int(t) for t in drafted] + [draw(target[k], rng)]
