"""one_run_epsilon against an independent scipy binomial reference, and its validity."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom

from gradguard.audit import one_run_epsilon, one_run_p_value


def _reference_eps(r: int, v: int, level: float) -> float:
    """Largest ε with P[Bin(r, sigmoid(ε)) >= v] <= level, by root finding on scipy's tail."""
    def excess(eps):
        return binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - level

    if r == 0 or excess(0.0) > 0:
        return 0.0
    return brentq(excess, 0.0, 50.0, xtol=1e-10)


def _reference_guesses(scores, included, k_plus, k_minus):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    right_in = sum(bool(included[i]) for i in order[:k_plus])
    right_out = sum(not included[i] for i in order[len(order) - k_minus:]) if k_minus else 0
    return k_plus + k_minus, right_in + right_out


@pytest.mark.parametrize("seed", range(6))
def test_delta_zero_matches_scipy_binomial_reference(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(50, 400))
    included = rng.random(m) < 0.5
    # Scores leak membership to a random degree so the bound ranges from 0 to large.
    scores = rng.normal(size=m) + rng.uniform(0, 4) * included
    k_plus, k_minus = int(rng.integers(1, m // 3)), int(rng.integers(0, m // 3))
    result = one_run_epsilon(torch.tensor(scores), torch.tensor(included),
                             k_plus=k_plus, k_minus=k_minus)
    r, v = _reference_guesses(scores, included, k_plus, k_minus)
    assert (result["guesses"], result["correct"], result["m"]) == (r, v, m)
    assert result["eps_lower_bound"] == pytest.approx(_reference_eps(r, v, 0.05), abs=1e-6)


def test_monotone_in_correct_guesses():
    included = np.arange(100) < 60
    bounds = [one_run_epsilon(np.r_[np.ones(v), np.zeros(100 - v)], included,
                              k_plus=v)["eps_lower_bound"] for v in range(1, 61)]
    # Top v scores are all included canaries: more right guesses, larger bound.
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[0]
    p_values = [one_run_p_value(m=200, guesses=50, correct=v, epsilon=1.0, delta=1e-4)
                for v in range(51)]
    assert all(p2 <= p1 for p1, p2 in zip(p_values, p_values[1:]))


def test_bound_is_valid_for_uninformative_scores():
    """Under the null (scores independent of the coins) the bound exceeds 0 at most ~5%."""
    rng = np.random.default_rng(0)
    draws, positives = 2000, 0
    for _ in range(draws):
        included = rng.random(200) < 0.5
        result = one_run_epsilon(rng.normal(size=200), included, k_plus=40, k_minus=40)
        positives += result["eps_lower_bound"] > 0
    # 0.05 + 3 standard errors of a binomial rate over 2000 draws.
    assert positives / draws <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / draws)


def test_grid_is_bonferroni_corrected_and_valid():
    rng = np.random.default_rng(1)
    grid = [10, 20, 40, 80]
    positives = 0
    for _ in range(1000):
        included = rng.random(200) < 0.5
        result = one_run_epsilon(rng.normal(size=200), included, k_plus=grid, k_minus=grid)
        positives += result["eps_lower_bound"] > 0
        assert result["grid_size"] == 16
    assert positives / 1000 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)


@pytest.mark.parametrize("seed", range(4))
def test_positive_delta_never_exceeds_delta_zero(seed):
    rng = np.random.default_rng(seed)
    included = rng.random(500) < 0.5
    scores = rng.normal(size=500) + 3 * included
    zero = one_run_epsilon(scores, included, k_plus=60, k_minus=60)
    for delta in (1e-6, 1e-4, 1e-2):
        positive = one_run_epsilon(scores, included, k_plus=60, k_minus=60, delta=delta)
        assert positive["eps_lower_bound"] <= zero["eps_lower_bound"] + 1e-9
        # The (ε, δ) bound's defining inequality, checked with scipy directly.
        eps = positive["eps_lower_bound"]
        if eps == 0:  # nothing rejected: the δ term alone exceeds the level
            continue
        q = 1 / (1 + math.exp(-eps))
        r, v = positive["guesses"], positive["correct"]
        tail = binom.sf(v - 1, r, q)
        alpha = max((binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - i, r, q)) / i
                    for i in range(1, v + 1))
        assert tail + alpha * 2 * 500 * delta <= 0.05 + 1e-9


def test_delta_term_matches_explicit_sum():
    r, v, m, eps, delta = 30, 25, 100, 0.7, 1e-3
    q = 1 / (1 + math.exp(-eps))
    alpha = max(sum(binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    expected = binom.sf(v - 1, r, q) + alpha * 2 * m * delta
    assert one_run_p_value(m=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(
        expected, rel=1e-10)


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="equal length"):
        one_run_epsilon([1.0, 2.0], [True], k_plus=1)
    with pytest.raises(ValueError, match="k_plus \\+ k_minus"):
        one_run_epsilon([1.0, 2.0], [True, False], k_plus=2, k_minus=1)
    with pytest.raises(ValueError, match="finite"):
        one_run_epsilon([1.0, float("nan")], [True, False], k_plus=1)
    with pytest.raises(ValueError, match="booleans"):
        one_run_epsilon([1.0, 2.0], [0.3, 1.0], k_plus=1)
