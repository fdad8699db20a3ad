"""One-run privacy auditing (Steinke, Nasr & Jagielski, 2023, arXiv:2305.08846).

m canaries are each included in training by an independent fair coin. After one training
run an auditor scores every canary (higher = more likely included) and guesses: the top
``k_plus`` scores "in", the bottom ``k_minus`` "out", the rest abstain. If training is
(ε, δ)-DP, the number of correct guesses among the r = k_plus + k_minus guesses is
stochastically dominated (up to a δ term) by Binomial(r, e^ε/(1+e^ε)): each guess is no
better than ε-randomised response. Seeing v correct guesses rejects every ε whose p-value
P[#correct >= v] is at most 1 − confidence; the largest rejected ε is a lower bound on the
ε of the training algorithm, valid with probability >= confidence over the coin flips.

The guesses must depend only on what training released (a model), never on the coins;
``k_plus``/``k_minus`` must be fixed before looking at the scores, or passed as a grid,
in which case the test at each grid point is made at level (1 − confidence)/|grid|
(Bonferroni) and the best grid point is reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradguard.audit.metrics import _as_numpy

__all__ = ["one_run_epsilon", "one_run_p_value"]

_BISECTION_STEPS = 60


def one_run_p_value(*, m: int, guesses: int, correct: int, epsilon: float,
                    delta: float = 0.0) -> float:
    """Upper bound on P[>= ``correct`` right guesses] if training is (ε, δ)-DP.

    Steinke, Nasr & Jagielski (2023), Theorem 3.1 / Proposition 5.2 and their numerical
    algorithm: with q = e^ε/(1+e^ε), β = P[Binomial(r, q) >= v] and
    α = max_{1<=i<=v} P[v − i <= Binomial(r, q) < v] / i, the p-value is
    min(1, β + α·2m·δ). At δ = 0 it is the binomial tail β alone.

    Args:
        m: number of canaries (each included by a fair coin), abstentions included.
        guesses: r, the number of non-abstaining guesses (<= m).
        correct: v, how many of the guesses were right (<= r).
        epsilon: ε >= 0 of the null hypothesis "training is (ε, δ)-DP".
        delta: δ in [0, 1] of the null hypothesis.

    Returns:
        The p-value, in [0, 1].

    Example:
        >>> round(one_run_p_value(m=100, guesses=10, correct=10, epsilon=0.0), 6)  # 2**-10
        0.000977
    """
    from scipy.stats import binom

    m, r, v = int(m), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {v}, {r}, {m}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta_tail = float(binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(1.0, beta_tail)
    # P[v - i <= Bin < v] for i = 1..v, divided by i; alpha is the largest ratio.
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta_tail + alpha * 2 * m * delta)


def _epsilon_bound(m: int, r: int, v: int, delta: float, level: float) -> float:
    """Largest ε whose p-value is <= level (0 if even ε = 0 is not rejected)."""
    if r == 0:
        return 0.0
    if delta == 0.0:
        # P[Bin(r, q) >= v] <= level  <=>  q <= Beta(v, r - v + 1).ppf(level) (Clopper-Pearson
        # lower bound on the guess accuracy), then ε = logit(q).
        from scipy.stats import beta

        if v == 0:
            return 0.0
        q_low = float(beta.ppf(level, v, r - v + 1))
        return max(0.0, math.log(q_low) - math.log1p(-q_low)) if q_low > 0.5 else 0.0
    if one_run_p_value(m=m, guesses=r, correct=v, epsilon=0.0, delta=delta) > level:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m=m, guesses=r, correct=v, epsilon=high, delta=delta) <= level:
        low, high = high, 2 * high
        if high > 1e4:
            return low
    for _ in range(_BISECTION_STEPS):  # keep p(low) <= level < p(high)
        middle = 0.5 * (low + high)
        if one_run_p_value(m=m, guesses=r, correct=v, epsilon=middle, delta=delta) <= level:
            low = middle
        else:
            high = middle
    return low


def _grid(value: int | Sequence[int], name: str) -> list[int]:
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not values or any(not isinstance(k, (int, np.integer)) or k < 0 for k in values):
        raise ValueError(f"{name} must be an int >= 0 or a non-empty sequence of them, "
                         f"got {value!r}")
    return sorted({int(k) for k in values})


def one_run_epsilon(
    scores: Any,
    included: Any,
    *,
    k_plus: int | Sequence[int],
    k_minus: int | Sequence[int] = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """ε lower bound from one training run with fair-coin canaries (Steinke et al. 2023).

    The top ``k_plus`` scores are guessed "included", the bottom ``k_minus`` "excluded"
    (ties broken by canary order, which is independent of the coins). With probability
    >= ``confidence`` over the coins, training is not (ε, δ)-DP for any ε below
    ``eps_lower_bound``. ``k_plus``/``k_minus`` may be grids: then every (k_plus, k_minus)
    pair is tested at level (1 − confidence)/(number of pairs) (Bonferroni) and the largest
    bound is returned, so choosing k after seeing the scores is accounted for.

    Args:
        scores: one real score per canary, higher = more likely included.
        included: one bool per canary, the fair coin flips (True = trained on).
        k_plus: number of top-scored canaries guessed "in", or a grid of such numbers.
        k_minus: number of bottom-scored canaries guessed "out", or a grid.
        delta: δ of the (ε, δ) statement, in [0, 1].
        confidence: probability, in (0, 1), that the bound holds.

    Returns:
        A dict with ``eps_lower_bound``, ``guesses`` (r), ``correct`` (v), ``k_plus`` and
        ``k_minus`` (the grid point attaining the bound), ``m``, ``delta``, ``confidence``,
        ``grid_size`` and ``method``.

    Raises:
        ValueError: on mismatched or non-finite inputs, or k_plus + k_minus > m.

    Example:
        >>> import torch
        >>> included = torch.arange(1000) % 2 == 0
        >>> result = one_run_epsilon(included.double(), included, k_plus=100, k_minus=100)
        >>> result["correct"], round(result["eps_lower_bound"], 2)
        (200, 4.19)
    """
    score_arr = _as_numpy(scores, "scores").reshape(-1)
    coins = _as_numpy(included, "included").reshape(-1)
    if score_arr.size != coins.size or score_arr.size == 0:
        raise ValueError(f"scores and included must be non-empty and of equal length, got "
                         f"{score_arr.size} and {coins.size}")
    if not np.isfinite(score_arr).all():
        raise ValueError("scores must be finite; drop or impute NaN/inf scores before auditing "
                         "(dropping must not depend on the coins)")
    if not np.isin(coins, (0.0, 1.0)).all():
        raise ValueError("included must hold booleans (the fair coin flips)")
    if not 0.0 <= float(delta) <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    m = score_arr.size
    pairs = list(itertools.product(_grid(k_plus, "k_plus"), _grid(k_minus, "k_minus")))
    if any(kp + km > m for kp, km in pairs):
        raise ValueError(f"k_plus + k_minus must be <= the number of canaries ({m}), got "
                         f"{pairs[-1]}")
    level = (1.0 - float(confidence)) / len(pairs)
    order = np.argsort(-score_arr, kind="stable")  # best "in" guess first
    in_sorted = coins[order].astype(bool)
    right_in = np.concatenate(([0], np.cumsum(in_sorted)))  # right "in" guesses among top k
    right_out = np.concatenate(([0], np.cumsum(~in_sorted[::-1])))  # right "out" among bottom k
    best: dict[str, Any] | None = None
    for kp, km in pairs:
        r, v = kp + km, int(right_in[kp] + right_out[km])
        eps = _epsilon_bound(m, r, v, float(delta), level)
        if best is None or eps > best["eps_lower_bound"]:
            best = {"eps_lower_bound": eps, "guesses": r, "correct": v,
                    "k_plus": kp, "k_minus": km}
    assert best is not None
    best.update(
        m=m, delta=float(delta), confidence=float(confidence), grid_size=len(pairs),
        method=("Steinke-Nasr-Jagielski 2023 one-run audit: top k_plus guessed in, bottom "
                "k_minus out; largest eps with p-value <= (1-confidence)/grid_size, p-value = "
                "P[Bin(r, e^eps/(1+e^eps)) >= v] + alpha*2m*delta"),
    )
    return best
