"""The maths of speculative sampling: llama.cpp's sampling distribution, and the acceptance rule
whose emitted text must have exactly the target's distribution (checked by chi-square)."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from edgeserve.runtime.sequence import SamplingParams
from edgeserve.runtime.speculative_sampling import accept_drafted, draw, probabilities


def params(**overrides: float) -> SamplingParams:
    """Every filter off (top-k 0, top-p 1, min-p 0) at temperature 1, unless overridden."""
    fields: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0} | overrides
    return SamplingParams(**fields)  # type: ignore[arg-type]


def log_of(*probs: float) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float32))


# ---- probabilities -------------------------------------------------------------------------


def test_without_filters_it_is_the_softmax() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.0], dtype=np.float32)
    expected = np.exp(logits) / np.exp(logits).sum()
    for top_k in (0, -1, 4, 1000):  # k <= 0 is off, k >= n_vocab keeps everything
        out = probabilities(logits, params(top_k=top_k))
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        assert out.sum() == pytest.approx(1.0, abs=1e-12)


def test_top_k_keeps_the_k_largest() -> None:
    out = probabilities(np.array([1.0, 3.0, 2.0, 0.0], dtype=np.float32), params(top_k=2))
    e3, e2 = math.exp(3), math.exp(2)
    np.testing.assert_allclose(out, [0, e3 / (e3 + e2), e2 / (e3 + e2), 0], rtol=1e-6)


def test_equal_logits_at_the_cut_keep_the_lower_token_id() -> None:
    out = probabilities(np.array([0.0, 2.0, 1.0, 2.0], dtype=np.float32), params(top_k=1))
    np.testing.assert_array_equal(out, [0, 1, 0, 0])


def test_top_p_keeps_the_shortest_prefix_reaching_p() -> None:
    logits = log_of(0.1, 0.4, 0.2, 0.3)
    for top_p, kept in [(0.39, [1]), (0.69, [1, 3]), (0.71, [1, 3, 2]), (0.99, [0, 1, 2, 3])]:
        out = probabilities(logits, params(top_p=top_p))
        assert sorted(np.flatnonzero(out)) == sorted(kept), top_p
        np.testing.assert_allclose(out[kept], np.exp(logits[kept]) / np.exp(logits[kept]).sum(), rtol=1e-6)


def test_top_p_applies_to_the_top_k_renormalized_distribution() -> None:
    logits = log_of(0.4, 0.3, 0.2, 0.1)
    # alone, top-p 0.5 needs 0.4 + 0.3; after top-k 2 the first token holds 4/7 >= 0.5
    assert np.count_nonzero(probabilities(logits, params(top_p=0.5))) == 2
    np.testing.assert_array_equal(probabilities(logits, params(top_k=2, top_p=0.5)), [1, 0, 0, 0])


def test_min_p_is_relative_to_the_largest_and_applied_before_temperature() -> None:
    logits = log_of(0.5, 0.3, 0.15, 0.05)  # min-p 0.2: keep p >= 0.1
    for temperature in (0.5, 1.0, 2.0):
        out = probabilities(logits, params(min_p=0.2, temperature=temperature))
        # after temperature 2 the last token would hold sqrt(0.1) = 0.32 of the largest, and
        # after 0.5 the third only 0.09: the set must not move
        np.testing.assert_array_equal(np.flatnonzero(out), [0, 1, 2])
        weights = np.array([0.5, 0.3, 0.15]) ** (1 / temperature)
        np.testing.assert_allclose(out[:3], weights / weights.sum(), rtol=1e-5)
    np.testing.assert_array_equal(probabilities(logits, params(min_p=2.0)), [1, 0, 0, 0])  # keeps one


def test_temperature_sharpens_and_flattens() -> None:
    p = np.array([0.6, 0.3, 0.1])
    logits = np.log(p).astype(np.float32)
    np.testing.assert_allclose(probabilities(logits, params(temperature=0.5)), p**2 / (p**2).sum(), rtol=1e-5)
    np.testing.assert_allclose(probabilities(logits, params(temperature=2.0)), p**0.5 / (p**0.5).sum(), rtol=1e-5)


@pytest.mark.parametrize("bad", [
    {"temperature": 0.0}, {"temperature": -1.0}, {"repeat_penalty": 1.1},
    {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
])
def test_greedy_and_penalties_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        probabilities(np.zeros(4, dtype=np.float32), params(**bad))


@pytest.mark.parametrize("logits", [np.zeros((2, 3)), np.zeros(0), np.array([0.0, np.nan])])
def test_logits_must_be_one_row_of_numbers(logits: np.ndarray) -> None:
    with pytest.raises(ValueError):
        probabilities(logits, params())


def test_matches_the_llama_cpp_sampler_chain() -> None:
    """The installed llama.cpp chain (decoder.py `_sampler_chain`, no model needed) applied to
    random logits: after `dist`, its candidates carry the probabilities it drew from."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def chain_probs(logits: np.ndarray, s: SamplingParams) -> np.ndarray:
        n = logits.size
        data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, float(x), 0.0)
                                                   for i, x in enumerate(logits)])
        cur = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for link in (llama_cpp.llama_sampler_init_top_k(s.top_k), llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
                     llama_cpp.llama_sampler_init_min_p(s.min_p, 1), llama_cpp.llama_sampler_init_temp(s.temperature),
                     llama_cpp.llama_sampler_init_dist(1)):
            llama_cpp.llama_sampler_chain_add(chain, link)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        out = np.zeros(n)
        for i in range(cur.size):
            out[data[i].id] = data[i].p
        llama_cpp.llama_sampler_free(chain)
        return out

    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.choice([5, 60, 2000]))
        logits = (rng.normal(size=n) * rng.choice([1.0, 4.0])).astype(np.float32)  # no exact ties
        s = params(temperature=float(rng.choice([0.3, 0.8, 1.5])), top_p=float(rng.choice([1.0, 0.9, 0.5])),
                   top_k=int(rng.choice([0, 1, 3, 40])), min_p=float(rng.choice([0.0, 0.05, 0.3])))
        ours, theirs = probabilities(logits, s), chain_probs(logits, s)
        np.testing.assert_array_equal(ours > 0, theirs > 0, err_msg=str(s))
        np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=str(s))


# ---- draw ----------------------------------------------------------------------------------


def test_draw_never_picks_a_zero_weight_token_and_needs_a_row_with_mass() -> None:
    rng = np.random.default_rng(0)
    assert {draw(np.array([0.0, 2.0, 0.0, 1.0, 0.0]), rng) for _ in range(2000)} == {1, 3}
    for bad in (np.zeros(3), np.array([0.5, -0.1, 0.6]), np.ones((2, 2)), np.array([np.inf, 1.0])):
        with pytest.raises(ValueError):
            draw(bad, rng)


# ---- accept_drafted: exact cases -----------------------------------------------------------


def test_a_draft_equal_to_the_target_is_always_accepted() -> None:
    rng = np.random.default_rng(1)
    rows = rng.dirichlet(np.ones(6), size=4)
    for _ in range(2000):
        drafted = [draw(rows[i], rng) for i in range(3)]
        out = accept_drafted(rows, rows[:3], drafted, rng)
        assert len(out) == 4 and out[:3] == drafted


def test_a_draft_the_target_never_samples_is_always_rejected() -> None:
    rng = np.random.default_rng(2)
    target = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    draft = np.array([[0.0, 0.0, 1.0]])
    outs = [accept_drafted(target, draft, [2], rng) for _ in range(2000)]
    assert all(len(out) == 1 and out[0] in (0, 1) for out in outs)


def test_a_draft_with_no_draft_probability_is_rejected() -> None:
    rng = np.random.default_rng(3)
    target = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token 1 could not have come from q = [1, 0, 0]: rejected, and its replacement (the
    # residual is the target's row) happens to be 1; the bonus token 0 must not follow
    assert accept_drafted(target, np.array([[1.0, 0.0, 0.0]]), [1], rng) == [1]
    # p == q with the draft outside both: the residual is zero, the replacement comes from p
    same = np.array([[0.5, 0.5, 0.0]])
    outs = {tuple(accept_drafted(np.vstack([same, same]), same, [2], rng)) for _ in range(200)}
    assert outs == {(0,), (1,)}


def test_after_all_drafts_one_more_token_comes_from_the_last_target_row() -> None:
    rng = np.random.default_rng(4)
    assert accept_drafted(np.array([[0.0, 0.0, 1.0]]), np.zeros((0, 3)), [], rng) == [2]
    target = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert accept_drafted(target, target[:2], [0, 1], rng) == [0, 1, 2]


@pytest.mark.parametrize(("target", "draft", "drafted"), [
    (np.full((2, 3), 1 / 3), np.full((2, 3), 1 / 3), [0]),  # target needs k + 1 rows
    (np.full((3, 3), 1 / 3), np.full((1, 3), 1 / 3), [0, 1]),  # draft needs k rows
    (np.full((2, 3), 1 / 3), np.full((1, 4), 1 / 3), [0]),  # vocabularies differ
    (np.full((2, 3), 1 / 3), np.full((1, 3), 1 / 3), [3]),  # token outside the vocabulary
    (np.full((3, 3), [1, 0, 0]), np.full((2, 3), [0, 0, 1]), [2, -1]),  # even after a rejection
    (np.full(3, 1 / 3), np.full((0, 3), 1 / 3), []),  # target is not 2-D
])
def test_shapes_are_checked(target: np.ndarray, draft: np.ndarray, drafted: list[int]) -> None:
    with pytest.raises(ValueError):
        accept_drafted(target, draft, drafted, np.random.default_rng(0))


# ---- accept_drafted: losslessness, statistically -------------------------------------------
#
# The target's distribution at each position does not depend on the tokens before it (rows
# TARGET[0], TARGET[1], ...), so sampling from the target alone gives independent tokens
# x1 ~ TARGET[0], x2 ~ TARGET[1], ... Speculative decoding must give the same sequence. A round
# may stop early, so the test does what the decoder does: it runs rounds from the position
# reached (drafts drawn from the draft's rows at those positions) until the sequence holds
# K + 1 tokens (so the token drawn after K accepted drafts is covered too), then compares every
# position's counts with its row, and every pair of neighbours' joint counts with the product
# of their rows. (Looking only at rounds that emitted two tokens would be wrong: whether d1 is
# accepted depends on d1, so that subset is biased.)
#
# Chi-square critical values at p = 0.001 (the 0.999 quantile), as scipy is not installed:
# 4 degrees of freedom (V - 1) 18.467, 24 degrees of freedom (V * V - 1) 51.179. The rng is
# seeded, so the test is deterministic; a correct rule lands far below these, a wrong one far
# above (see the last test).

V, K, TRIALS = 5, 3, 40_000
CHI2_999 = {4: 18.467, 24: 51.179}


def _rows(seed: int, n: int) -> np.ndarray:
    """n random distributions over V tokens, each at least 0.2 / V (every cell is expected)."""
    return 0.8 * np.random.default_rng(seed).dirichlet(np.ones(V), size=n) + 0.2 / V


TARGET = _rows(11, 2 * K + 1)  # a round starts at position K at the latest and reads K + 1 rows
DRAFT = _rows(12, 2 * K)
DRAFT[0, 2] = 0.0  # a token the draft never proposes first, so only the residual can emit it
DRAFT[0] /= DRAFT[0].sum()

Accept = Callable[[np.ndarray, np.ndarray, Sequence[int], np.random.Generator], list[int]]


def _sequences(accept: Accept, seed: int, trials: int = TRIALS) -> tuple[np.ndarray, int]:
    """The first K + 1 tokens of `trials` sequences, and how many first rounds emitted >= 2."""
    rng = np.random.default_rng(seed)
    out = np.zeros((trials, K + 1), dtype=np.int64)
    long_first_rounds = 0
    for n in range(trials):
        tokens: list[int] = []
        while len(tokens) < K + 1:
            pos = len(tokens)
            drafted = [draw(DRAFT[pos + i], rng) for i in range(K)]
            emitted = accept(TARGET[pos:pos + K + 1], DRAFT[pos:pos + K], drafted, rng)
            assert 1 <= len(emitted) <= K + 1
            long_first_rounds += pos == 0 and len(emitted) >= 2
            tokens += emitted
        out[n] = tokens[:K + 1]
    return out, long_first_rounds


def _chi2(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = observed.sum() * probs
    return float(((observed - expected) ** 2 / expected).sum())


def _position_chi2(tokens: np.ndarray, j: int) -> float:
    return _chi2(np.bincount(tokens[:, j], minlength=V), TARGET[j])


def _pair_chi2(tokens: np.ndarray, j: int) -> float:
    """Positions j and j + 1 together, against TARGET[j] ⊗ TARGET[j + 1]."""
    counts = np.bincount(tokens[:, j] * V + tokens[:, j + 1], minlength=V * V)
    return _chi2(counts, np.outer(TARGET[j], TARGET[j + 1]).ravel())


@pytest.fixture(scope="module")
def speculative() -> tuple[np.ndarray, int]:
    return _sequences(accept_drafted, seed=2023)


def test_the_rows_differ_enough_to_matter() -> None:
    assert all(0.5 * np.abs(TARGET[i] - DRAFT[i]).sum() > 0.1 for i in range(K + 1))  # total variation


@pytest.mark.parametrize("j", range(K + 1))
def test_each_token_has_the_targets_distribution(speculative: tuple[np.ndarray, int], j: int) -> None:
    assert _position_chi2(speculative[0], j) < CHI2_999[4]


@pytest.mark.parametrize("j", range(K))
def test_neighbouring_tokens_have_the_targets_joint_distribution(speculative: tuple[np.ndarray, int],
                                                                  j: int) -> None:
    assert _pair_chi2(speculative[0], j) < CHI2_999[24]


def test_drafts_are_accepted_as_often_as_the_theory_says(speculative: tuple[np.ndarray, int]) -> None:
    """Losslessness alone would also hold for ignoring the drafts: the first draft must be
    accepted with probability sum(min(p, q)) (within 5 standard deviations)."""
    rate = np.minimum(TARGET[0], DRAFT[0]).sum()
    assert abs(speculative[1] / TRIALS - rate) < 5 * math.sqrt(rate * (1 - rate) / TRIALS)


def test_the_chi_square_test_catches_a_replacement_drawn_from_p() -> None:
    """The same test fails a plausible mistake: replacing a rejected draft with a draw from p
    instead of the residual max(0, p - q) (too few of the tokens the draft under-proposes)."""

    def wrong(target: np.ndarray, draft: np.ndarray, drafted: Sequence[int], rng: np.random.Generator) -> list[int]:
        for i, token in enumerate(drafted):
            if rng.random() * draft[i][token] >= target[i][token]:
                return [*drafted[:i], draw(target[i], rng)]
        return [*drafted, draw(target[len(drafted)], rng)]

    tokens, _ = _sequences(wrong, seed=2023, trials=10_000)
    assert _position_chi2(tokens, 0) > CHI2_999[4]
    assert _pair_chi2(tokens, 0) > CHI2_999[24]
