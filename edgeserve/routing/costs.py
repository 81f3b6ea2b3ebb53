"""What a generation costs on this board: a small linear model fitted from calibration, kept fresh
by an EWMA over finished requests, and inverted to answer "how many tokens fit in this time?".

The model follows the runner's timings (GenerationResult) exactly:

* prefill (prompt evaluation + sampling of the first new token):
  ``prefill_fixed_ms + prefill_ms_per_token * p + prefill_growth * p * (p + 1) / 2000`` for a
  prompt of ``p`` tokens: prompt token ``i`` attends to ``i`` tokens, so like a decode step it costs
  a little more the longer the context (``prefill_growth`` per 1k tokens of context; 0 when the
  calibration had fewer than three prompt lengths to tell a curve from a line);
* every further new token is one decode step; step ``j`` (1-based) runs with ``prompt_tokens + j``
  tokens in the context and costs ``decode_ms_per_token + growth * (prompt_tokens + j) / 1000``.

So ``n`` new tokens cost one prefill plus ``n - 1`` decode steps, and ``n = 0`` costs nothing.
The load time is recorded but never charged to a request: variants stay loaded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec

NonNegative = Annotated[float, msgspec.Meta(ge=0)]

#: One observation may move a rate by at most this factor (before the EWMA weight): a request that
#: ran while the board was suspended or swapping should nudge the profile, not rewrite it.
MAX_OBSERVED_RATIO = 4.0


class CostProfile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Measured costs of one variant at one thread count on one host (JSON-serialisable).

    Residual statistics describe the calibration fit (``*_mape`` are fractions, 0.05 = 5 %);
    ``recent_ape`` is an EWMA of the absolute percentage error of total-latency predictions made
    for finished requests, i.e. how well the profile predicts real traffic right now.
    """

    variant_id: str
    prefill_ms_per_token: NonNegative
    decode_ms_per_token: NonNegative
    gguf_sha256: str = ""
    n_threads: int = 1
    host: str = ""
    load_ms: NonNegative = 0.0
    prefill_fixed_ms: NonNegative = 0.0
    prefill_growth_ms_per_token_per_1k_ctx: NonNegative = 0.0
    decode_growth_ms_per_token_per_1k_ctx: NonNegative = 0.0
    prefill_mape: float | None = None
    decode_mape: float | None = None
    n_prefill_samples: int = 0
    n_decode_samples: int = 0
    recent_ape: float | None = None
    updated_count: int = 0
    # Batching: one decode step of ``w`` sequences together costs ``batch_step_factors[w]`` times
    # a step of one (measured by calibration at a few widths, interpolated between them).
    # Empty: nothing measured, and a step of ``w`` is assumed to cost ``w`` steps (no gain).
    batch_step_factors: dict[int, float] = {}
    # Speculative pairs (a draft variant proposes, the target verifies): the mean tokens one
    # decode step yields. The per-token costs above are then effective ones (a step's time over
    # its tokens), and a step takes ``tokens_per_step`` times the per-token cost. 1 otherwise.
    tokens_per_step: Annotated[float, msgspec.Meta(ge=1)] = 1.0

    def __post_init__(self) -> None:
        if self.decode_ms_per_token <= 0 and self.decode_growth_ms_per_token_per_1k_ctx <= 0:
            raise ValueError("decode_ms_per_token must be positive (a token cannot be free)")


# ---- prediction -----------------------------------------------------------------------------


def prefill_ms(profile: CostProfile, prompt_tokens: int) -> float:
    """Time to evaluate the prompt and sample the first new token."""
    p = max(prompt_tokens, 0)
    growth = profile.prefill_growth_ms_per_token_per_1k_ctx / 1000.0
    return profile.prefill_fixed_ms + profile.prefill_ms_per_token * p + growth * p * (p + 1) / 2


def decode_steps_ms(profile: CostProfile, prompt_tokens: int, steps: int) -> float:
    """Time of ``steps`` decode steps after a prompt of ``prompt_tokens`` (closed form)."""
    if steps <= 0:
        return 0.0
    p = max(prompt_tokens, 0)
    growth = profile.decode_growth_ms_per_token_per_1k_ctx / 1000.0
    # sum_{j=1..s} (d0 + g * (p + j)) = s*d0 + g*(s*p + s(s+1)/2)
    return steps * profile.decode_ms_per_token + growth * (steps * p + steps * (steps + 1) / 2)


def width_factor(profile: CostProfile, width: float) -> float:
    """Cost of one decode step of ``width`` sequences relative to a step of one sequence:
    linear between measured widths, extended by the last measured slope beyond them, never
    below the measured ones (a wider batch is never cheaper per step) and ``width`` itself when
    nothing was measured."""
    if width <= 1:
        return 1.0
    points = sorted({1: 1.0, **profile.batch_step_factors}.items())
    if len(points) == 1:
        return float(width)
    for (w0, f0), (w1, f1) in itertools.pairwise(points):
        if w0 <= width <= w1:
            return f0 + (f1 - f0) * (width - w0) / (w1 - w0)
    (w0, f0), (w1, f1) = points[-2], points[-1]
    slope = max((f1 - f0) / (w1 - w0), 0.0)
    return f1 + slope * (width - w1)


def step_ms(profile: CostProfile, width: float, context: float) -> float:
    """One decode step of ``width`` sequences whose mean context is ``context`` tokens."""
    growth = profile.decode_growth_ms_per_token_per_1k_ctx / 1000.0
    return (profile.decode_ms_per_token + growth * max(context, 0.0)) * width_factor(profile, width)


def predict_ms(profile: CostProfile, prompt_tokens: int, new_tokens: int) -> float:
    """Predicted wall time (ms) of a generation: prefill, then ``new_tokens - 1`` decode steps."""
    if new_tokens <= 0:
        return 0.0
    return prefill_ms(profile, prompt_tokens) + decode_steps_ms(profile, prompt_tokens, new_tokens - 1)


def max_new_tokens_within(
    profile: CostProfile, prompt_tokens: int, budget_ms: float, *, limit: int | None = None
) -> int:
    """The largest ``n`` with ``predict_ms(profile, prompt_tokens, n) <= budget_ms`` (0 if none),
    capped at ``limit`` when given. Closed form, then a galloping/bisection check so the answer
    agrees exactly with ``predict_ms`` despite rounding (a few steps; never a long walk)."""
    if not budget_ms >= 0 or (limit is not None and limit <= 0):  # also rejects NaN
        return 0
    rest = budget_ms - prefill_ms(profile, prompt_tokens)
    if rest < 0:
        return 0
    if math.isinf(rest):
        if limit is None:
            raise ValueError("an infinite budget needs a limit")
        return limit
    p = max(prompt_tokens, 0)
    g = profile.decode_growth_ms_per_token_per_1k_ctx / 1000.0
    a = g / 2.0
    b = profile.decode_ms_per_token + g * (p + 0.5)
    # a*s^2 + b*s <= rest, s = decode steps = n - 1; the root in its cancellation-free form
    steps = 2 * rest / (b + math.sqrt(b * b + 4 * a * rest))
    ceiling = limit if limit is not None else 2**62
    n = min(int(min(steps, float(ceiling))) + 1, ceiling)

    def fits(k: int) -> bool:
        return predict_ms(profile, prompt_tokens, k) <= budget_ms

    if fits(n):  # search up: the estimate may be a little low
        step = 1
        while n < ceiling and fits(min(n + step, ceiling)):
            n = min(n + step, ceiling)
            step *= 2
        high = min(n + step, ceiling + 1)  # fits(n), not fits(high) (or beyond the ceiling)
        low = n
    else:  # search down
        low, high = 0, n
    while high - low > 1:  # invariant: fits(low) (or low == 0), not fits(high)
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# ---- fitting --------------------------------------------------------------------------------


def _line_fit(
    points: Sequence[tuple[float, float]], *, proportional: bool
) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x`` with both coefficients kept >= 0.

    Costs cannot be negative. A negative slope becomes a flat line at the mean. A negative
    intercept (noise on few points) makes prefill proportional to the prompt (through the origin)
    but decode flat in the context: a decode line through the origin would call a step at a short
    context nearly free, and every short prompt would then overrun its deadline. When all samples
    share one x the line is underdetermined and the same two fallbacks apply.
    """
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        if proportional and mean_x > 0:
            return 0.0, max(mean_y / mean_x, 0.0)
        return max(mean_y, 0.0), 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    intercept = mean_y - slope * mean_x
    if slope < 0:
        return max(mean_y, 0.0), 0.0
    if intercept < 0:
        if not proportional:
            return max(mean_y, 0.0), 0.0
        sx2 = sum(x * x for x, _ in points)
        return 0.0, max(sum(x * y for x, y in points) / sx2, 0.0)
    return intercept, slope


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a tiny square system; None if singular."""
    size = len(rhs)
    rows = [[*row, value] for row, value in zip(matrix, rhs, strict=True)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-12:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(size):
            if r != col:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [rows[i][size] / rows[i][i] for i in range(size)]


#: The prefill terms: fixed, per token, growth (prompt token i costs growth * i / 1000 more).
_PREFILL_TERMS: tuple[Callable[[float], float], ...] = (
    lambda p: 1.0, lambda p: p, lambda p: p * (p + 1) / 2000)


def _prefill_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """(fixed, per token, growth per 1k ctx) by non-negative least squares.

    With fewer than three distinct prompt lengths a curve cannot be told from a line: the line
    fit (``_line_fit``, proportional fallback) and no growth. Otherwise every subset of the three
    terms that depends on the prompt length is fitted and the best one with no negative
    coefficient wins, the smaller subset on a tie (exactly linear samples give growth 0).
    """
    if len({x for x, _ in points}) < 3:
        fixed, per_token = _line_fit(points, proportional=True)
        return fixed, per_token, 0.0
    best: tuple[float, list[float]] | None = None
    for size in (1, 2, 3):
        for subset in itertools.combinations(range(3), size):
            if subset == (0,):
                continue  # a prefill that ignores the prompt length
            columns = [[_PREFILL_TERMS[i](x) for x, _ in points] for i in subset]
            gram = [[sum(a * b for a, b in zip(u, v, strict=True)) for v in columns] for u in columns]
            moments = [sum(a * y for a, (_, y) in zip(u, points, strict=True)) for u in columns]
            solution = _solve(gram, moments)
            if solution is None or min(solution) < 0:
                continue
            coefficients = [0.0, 0.0, 0.0]
            for i, value in zip(subset, solution, strict=True):
                coefficients[i] = value
            sse = sum((_prefill_at(coefficients, x) - y) ** 2 for x, y in points)
            if best is None or sse < best[0] * (1 - 1e-9) - 1e-12:
                best = (sse, coefficients)
    if best is None:  # cannot happen: a single non-negative term always fits non-negatively
        fixed, per_token = _line_fit(points, proportional=True)
        return fixed, per_token, 0.0
    fixed, per_token, growth = best[1]
    return fixed, per_token, growth


def _prefill_at(coefficients: Sequence[float], prompt_tokens: float) -> float:
    return sum(c * term(prompt_tokens) for c, term in zip(coefficients, _PREFILL_TERMS, strict=True))


def _mape(points: Sequence[tuple[float, float]], predict: Callable[[float], float]) -> float | None:
    errors = [abs(predict(x) - y) / y for x, y in points if y > 0]
    return sum(errors) / len(errors) if errors else None


def fit_profile(
    prefill_samples: Sequence[tuple[int, float]],
    decode_samples: Sequence[tuple[int, float]],
    *,
    variant_id: str,
    gguf_sha256: str = "",
    n_threads: int = 1,
    host: str = "",
    load_ms: float = 0.0,
    batch_step_factors: dict[int, float] | None = None,
) -> CostProfile:
    """Fit a profile by least squares from calibration samples.

    ``prefill_samples``: (prompt tokens, ms for prefill + first token), e.g. GenerationResult's
    (prompt_n, prompt_ms). ``decode_samples``: (context position, ms of that decode step), the
    position being the number of tokens in the context after the step (prompt_n + i + 1 for
    ``token_ms[i]``). Samples with non-positive values are dropped; at least one of each kind must
    remain (ValueError otherwise).
    """
    prefill = [(float(p), float(ms)) for p, ms in prefill_samples if p > 0 and ms > 0]
    decode = [(c / 1000.0, float(ms)) for c, ms in decode_samples if c > 0 and ms > 0]
    if not prefill:
        raise ValueError(f"{variant_id}: no usable prefill samples (need prompt tokens and ms > 0)")
    if not decode:
        raise ValueError(f"{variant_id}: no usable decode samples (need context and ms > 0)")
    fixed, per_token, prefill_growth = _prefill_fit(prefill)
    d0, growth = _line_fit(decode, proportional=False)
    if d0 <= 0 and growth <= 0:
        raise ValueError(f"{variant_id}: decode samples fit a zero cost per token")
    return CostProfile(
        variant_id=variant_id,
        gguf_sha256=gguf_sha256,
        n_threads=n_threads,
        host=host,
        load_ms=max(load_ms, 0.0),
        prefill_fixed_ms=fixed,
        prefill_ms_per_token=per_token,
        prefill_growth_ms_per_token_per_1k_ctx=prefill_growth,
        decode_ms_per_token=d0,
        decode_growth_ms_per_token_per_1k_ctx=growth,
        prefill_mape=_mape(prefill, lambda p: _prefill_at((fixed, per_token, prefill_growth), p)),
        decode_mape=_mape(decode, lambda c: d0 + growth * c),
        n_prefill_samples=len(prefill),
        n_decode_samples=len(decode),
        batch_step_factors=dict(batch_step_factors or {}),
    )


# ---- online update --------------------------------------------------------------------------


def _blend(observed: float, predicted: float, alpha: float) -> float:
    """The factor that moves a prediction a fraction ``alpha`` of the way toward an observation."""
    ratio = min(max(observed / predicted, 1 / MAX_OBSERVED_RATIO), MAX_OBSERVED_RATIO)
    return (1 - alpha) + alpha * ratio


def observe(
    profile: CostProfile,
    prompt_tokens: int,
    prompt_ms: float,
    new_tokens: int,
    decode_ms: float,
    alpha: float = 0.2,
) -> CostProfile:
    """EWMA update from one finished request; returns a new profile.

    Pass the runner's timings: ``prompt_tokens``/``prompt_ms`` = (prompt_n, prompt_ms) — the
    tokens actually evaluated, so a prompt served from llama.cpp's prefix cache should pass only
    the uncached part — and ``new_tokens``/``decode_ms`` = (len(token_ms), sum(token_ms)),
    the decode steps and their time. The prefill curve (fixed + per token + growth) and the decode
    line (base + growth) are each scaled by one factor so that the prediction for this request moves
    ``alpha`` of the way toward what was observed (ratio clamped to [1/4, 4]); keeping the shape
    of each line and only rescaling it is what a slower CPU (throttling, a busy neighbour) does.
    A part with no tokens or no time is ignored; if both are, the profile comes back unchanged.
    """
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    changes: dict[str, float] = {}
    predicted_total = 0.0
    observed_total = 0.0
    predicted_prefill = prefill_ms(profile, prompt_tokens)
    if prompt_tokens > 0 and prompt_ms > 0 and predicted_prefill > 0:
        factor = _blend(prompt_ms, predicted_prefill, alpha)
        changes["prefill_fixed_ms"] = profile.prefill_fixed_ms * factor
        changes["prefill_ms_per_token"] = profile.prefill_ms_per_token * factor
        changes["prefill_growth_ms_per_token_per_1k_ctx"] = (
            profile.prefill_growth_ms_per_token_per_1k_ctx * factor
        )
        predicted_total += predicted_prefill
        observed_total += prompt_ms
    predicted_decode = decode_steps_ms(profile, prompt_tokens, new_tokens)
    if new_tokens > 0 and decode_ms > 0 and predicted_decode > 0:
        factor = _blend(decode_ms, predicted_decode, alpha)
        changes["decode_ms_per_token"] = profile.decode_ms_per_token * factor
        changes["decode_growth_ms_per_token_per_1k_ctx"] = (
            profile.decode_growth_ms_per_token_per_1k_ctx * factor
        )
        predicted_total += predicted_decode
        observed_total += decode_ms
    if not changes:
        return profile
    ape = abs(predicted_total - observed_total) / observed_total
    recent = ape if profile.recent_ape is None else (1 - alpha) * profile.recent_ape + alpha * ape
    return msgspec.structs.replace(
        profile, **changes, recent_ape=recent, updated_count=profile.updated_count + 1
    )
