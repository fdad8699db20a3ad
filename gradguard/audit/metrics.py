"""Membership-inference metrics. Score convention: higher = more likely a member.

Every function here is a pure function of two score collections: the scores an attack gave
to examples that were trained on (members) and to held-out examples (non-members). Scores
may be Python sequences, NumPy arrays or torch tensors on any device; they are copied to
host float64 because this is reporting code, not a per-step path.

A threshold ``t`` predicts "member" for every score ``>= t``. Sweeping ``t`` over the
distinct observed scores (plus ``+inf``, which predicts nobody) gives every deterministic
threshold attack; no metric here interpolates between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "EmpiricalEpsilon",
    "empirical_epsilon",
    "mia_metrics",
    "roc_auc",
    "roc_auc_standard_error",
    "roc_curve",
    "tpr_at_fpr",
]


def _as_numpy(scores: Any, name: str = "scores") -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        if scores.is_complex():
            raise TypeError(f"{name} must be real-valued, got a complex tensor")
        scores = scores.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a 1-D tensor, array or sequence of real numbers; "
            f"could not convert {type(scores).__name__} ({err})"
        ) from err
    return array.reshape(-1)


def _validated(scores: Any, name: str) -> np.ndarray:
    array = _as_numpy(scores, name)
    if array.size == 0:
        raise ValueError(f"{name} is empty: pass at least one score")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf) out of {array.size}; "
            "find where the attack produced them, or drop/clip them before calling "
            "(e.g. torch.nan_to_num)"
        )
    return array


def _roc_counts(
    member_scores: np.ndarray, nonmember_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true-positive counts at every distinct threshold, starting with ``+inf``.

    Returns:
        ``(fps, tps, thresholds)``: ``fps[i]``/``tps[i]`` count non-members/members with
        score ``>= thresholds[i]``; ``thresholds`` decreases strictly, ``thresholds[0]`` is
        ``+inf`` (nobody predicted member) and the last is the minimum score (everybody).
    """
    scores = np.concatenate([member_scores, nonmember_scores])
    is_member = np.concatenate(
        [np.ones(member_scores.size, dtype=np.int64), np.zeros(nonmember_scores.size, np.int64)]
    )
    # Stable sort keeps the result independent of how ties were ordered in the input.
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    # Last position of each run of equal scores: a threshold admits a whole tie group at once.
    ends = np.flatnonzero(np.diff(sorted_scores) != 0)
    ends = np.append(ends, scores.size - 1)
    tps = np.cumsum(is_member[order])[ends]
    fps = (ends + 1) - tps
    return (
        np.concatenate([[0], fps]),
        np.concatenate([[0], tps]),
        np.concatenate([[np.inf], sorted_scores[ends]]),
    )


def roc_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """Area under the ROC curve: P(member score > non-member score), ties counted half.

    Args:
        member_scores: scores of examples that were trained on.
        nonmember_scores: scores of held-out examples.

    Returns:
        AUC in [0, 1]; 0.5 is chance.

    Raises:
        ValueError: if either collection is empty or holds NaN/inf.
    """
    m = _validated(member_scores, "member_scores")
    n = _validated(nonmember_scores, "nonmember_scores")
    # Mann–Whitney U from average ranks handles ties exactly.
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([m, n]))
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2
    return float(u / (m.size * n.size))


def roc_auc_standard_error(member_scores: Any, nonmember_scores: Any) -> float:
    """DeLong et al. (1988) standard error of the empirical AUC (:func:`roc_auc`).

    With placements V_i = P̂[member i outscores a random non-member] and
    W_j = P̂[a random member outscores non-member j] (ties count one half),
    SE² = var(V)/m + var(W)/n (sample variances). NaN with fewer than two scores per side.

    Args:
        member_scores: scores of members (higher = more likely member).
        nonmember_scores: scores of non-members.

    Returns:
        The standard error.

    Example:
        >>> round(roc_auc_standard_error([0.2, 0.9, 0.7, 0.4], [0.1, 0.5, 0.3, 0.0]), 4)
        0.1693
    """
    members = np.sort(_validated(member_scores, "member_scores"))
    nonmembers = np.sort(_validated(nonmember_scores, "nonmember_scores"))
    m, n = members.size, nonmembers.size
    if m < 2 or n < 2:
        return math.nan
    below = np.searchsorted(nonmembers, members, side="left")
    below_or_tied = np.searchsorted(nonmembers, members, side="right")
    v = (below + below_or_tied) / (2.0 * n)
    above = m - np.searchsorted(members, nonmembers, side="right")
    above_or_tied = m - np.searchsorted(members, nonmembers, side="left")
    w = (above + above_or_tied) / (2.0 * m)
    return float(math.sqrt(v.var(ddof=1) / m + w.var(ddof=1) / n))


def roc_curve(
    member_scores: Any, nonmember_scores: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the threshold attack "member if score >= t", over every distinct t.

    Ties are handled exactly: all examples sharing a score enter together, so each point is
    an achievable (FPR, TPR) pair. Nothing is dropped (like scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``).

    Args:
        member_scores: scores of examples that were trained on.
        nonmember_scores: scores of held-out examples.

    Returns:
        ``(fpr, tpr, thresholds)`` as float64 arrays of equal length. The first point is
        ``(0, 0)`` at threshold ``+inf``; the last is ``(1, 1)`` at the minimum score.
        ``fpr`` and ``tpr`` are non-decreasing, ``thresholds`` strictly decreasing.

    Raises:
        ValueError: if either collection is empty or holds NaN/inf.

    Example:
        >>> fpr, tpr, thr = roc_curve([0.9, 0.4], [0.4, 0.1])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    m = _validated(member_scores, "member_scores")
    n = _validated(nonmember_scores, "nonmember_scores")
    fps, tps, thresholds = _roc_counts(m, n)
    return fps / n.size, tps / m.size, thresholds


def tpr_at_fpr(fpr: Any, tpr: Any, target: float) -> float:
    """The largest TPR among ROC points whose FPR is at most ``target``.

    Convention: only achievable points count (``fpr <= target``, compared exactly), with no
    interpolation and no randomised mixing of thresholds. With ``n`` non-members the
    achievable FPRs are multiples of ``1/n``, so when ``target < 1/n`` this is the TPR at
    FPR = 0; such low-FPR numbers need ``n`` well above ``1/target`` to mean much.

    Args:
        fpr: false-positive rates of the ROC points, as returned by :func:`roc_curve`.
        tpr: true-positive rates of the same points.
        target: the FPR budget, in [0, 1].

    Returns:
        The TPR as a float; 0.0 if no point has FPR <= target.

    Raises:
        ValueError: if the arrays are empty, differ in length, or ``target`` is outside [0, 1].
    """
    fpr_arr = _as_numpy(fpr, "fpr")
    tpr_arr = _as_numpy(tpr, "tpr")
    if fpr_arr.size == 0 or fpr_arr.shape != tpr_arr.shape:
        raise ValueError(
            f"fpr and tpr must be non-empty and of equal length (got {fpr_arr.size} and "
            f"{tpr_arr.size}); pass the first two outputs of roc_curve"
        )
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target must be an FPR in [0, 1], got {target}")
    allowed = fpr_arr <= target
    return float(tpr_arr[allowed].max()) if allowed.any() else 0.0


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """An empirical lower bound on ε, with what it took to get it.

    Attributes:
        epsilon: the lower bound (>= 0, finite).
        confidence: probability that the bound holds simultaneously over all thresholds.
        delta: the δ of the (ε, δ) statement.
        method: how the bound was computed, in words.
        point_estimate: the same maximum computed from observed rates, without confidence
            bounds (can be ``inf`` when some threshold has zero false positives); the bound
            never exceeds it.
        threshold: the score threshold at which the bound is attained (``nan`` if it is 0).
    """

    epsilon: float
    confidence: float
    delta: float
    method: str
    point_estimate: float
    threshold: float


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, -np.inf)
    ok = (numerator > 0) & (denominator > 0)
    out[ok] = np.log(numerator[ok] / denominator[ok])
    out[(numerator > 0) & (denominator == 0)] = np.inf
    return out


def empirical_epsilon(
    member_scores: Any,
    nonmember_scores: Any,
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> EmpiricalEpsilon:
    """Lower-bound ε from a membership attack's error rates, with stated confidence.

    An (ε, δ)-DP mechanism forces every test to satisfy TPR <= e^ε·FPR + δ and
    TNR <= e^ε·FNR + δ. At each threshold t we take one-sided Clopper–Pearson bounds
    (exact binomial, via ``scipy.stats.beta``): a lower bound on TPR(t) (equivalently an
    upper bound on FNR(t)) and an upper bound on FPR(t) (equivalently a lower bound on
    TNR(t)), and report

        ε_lb = max(0, max_t max(log((TPR_lo − δ)/FPR_hi), log((TNR_lo − δ)/FNR_hi))).

    Multiple comparisons: taking the best threshold after seeing the data is accounted for.
    The bounds at a threshold admitting k members are statements about the k-th largest
    member score (an order statistic), so there are only m member statements and n
    non-member statements in all. Each is made at level (1 − confidence)/(2m) resp.
    (1 − confidence)/(2n) (Bonferroni), so with probability >= ``confidence`` all bounds
    hold at every threshold at once and ε_lb is a valid lower bound. This is conservative.

    Assumptions: member scores are i.i.d. draws from the members' score distribution and
    non-member scores likewise, so the bound is on the ε of "random member vs random
    non-member" under this attack. It certifies that a training *algorithm* is not
    (ε_lb, δ)-DP only if each score came from its own independent training run; scores of
    many examples from one run need a one-run analysis (Steinke et al., 2023) for that.

    Args:
        member_scores: attack scores of members (higher = more likely member).
        nonmember_scores: attack scores of non-members.
        delta: the δ in (ε, δ), in [0, 1).
        confidence: probability, in (0, 1), that the bound holds.

    Returns:
        An :class:`EmpiricalEpsilon` with the bound, its confidence, δ and the method.

    Raises:
        ValueError: on empty or non-finite scores, or ``delta``/``confidence`` out of range.

    Example:
        >>> result = empirical_epsilon([3.0] * 500, [0.0] * 500, delta=0.0)
        >>> round(result.epsilon, 2) > 3
        True
    """
    from scipy.stats import beta

    if not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    m_scores = _validated(member_scores, "member_scores")
    n_scores = _validated(nonmember_scores, "nonmember_scores")
    m, n = m_scores.size, n_scores.size
    fps, tps, thresholds = _roc_counts(m_scores, n_scores)
    alpha = 1.0 - float(confidence)
    alpha_members = alpha / (2 * m)
    alpha_nonmembers = alpha / (2 * n)

    fns, tns = m - tps, n - fps
    with np.errstate(invalid="ignore", divide="ignore"):
        # Lower CP bound on a rate with k successes out of N: Beta(k, N-k+1) quantile (0 at k=0).
        # Upper CP bound with k out of N: Beta(k+1, N-k) upper quantile (1 at k=N). The
        # complementary rates use the mirrored Beta so tiny probabilities keep their precision.
        tpr_lo = np.where(tps > 0, beta.ppf(alpha_members, tps, fns + 1), 0.0)
        fnr_hi = np.where(tps > 0, beta.isf(alpha_members, fns + 1, tps), 1.0)
        fpr_hi = np.where(tns > 0, beta.isf(alpha_nonmembers, fps + 1, tns), 1.0)
        tnr_lo = np.where(tns > 0, beta.ppf(alpha_nonmembers, tns, fps + 1), 0.0)

    delta = float(delta)
    lower = np.maximum(_log_ratio(tpr_lo - delta, fpr_hi), _log_ratio(tnr_lo - delta, fnr_hi))
    point = np.maximum(_log_ratio(tps / m - delta, fps / n), _log_ratio(tns / n - delta, fns / m))
    best = int(np.argmax(lower))
    epsilon = max(0.0, float(lower[best]))
    method = (
        "one-sided Clopper-Pearson bounds on TPR/FNR and FPR/TNR at every score threshold, "
        f"Bonferroni over the {m} member and {n} non-member order statistics "
        f"(simultaneous over thresholds); eps = max over thresholds of "
        f"max(log((TPR_lo-delta)/FPR_hi), log((TNR_lo-delta)/FNR_hi)), clipped at 0; "
        f"delta={delta:g}, confidence={float(confidence):g}"
    )
    return EmpiricalEpsilon(
        epsilon=epsilon,
        confidence=float(confidence),
        delta=delta,
        method=method,
        point_estimate=max(0.0, float(point.max())),
        threshold=float(thresholds[best]) if epsilon > 0 else math.nan,
    )


def mia_metrics(
    member_scores: Any,
    nonmember_scores: Any,
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> dict[str, float | int | str]:
    """Standard membership-inference report for one attack.

    Args:
        member_scores: attack scores of members (higher = more likely member).
        nonmember_scores: attack scores of non-members.
        delta: δ for the empirical ε lower bound.
        confidence: confidence level of the empirical ε lower bound.

    Returns:
        A JSON-serialisable dict of plain Python values:

        - ``auc``: area under the ROC curve (ties half).
        - ``balanced_accuracy``: best threshold's (TPR + 1 − FPR)/2; 0.5 is chance.
        - ``tpr_at_1pct_fpr``, ``tpr_at_01pct_fpr``: TPR at FPR <= 1% and <= 0.1%
          (see :func:`tpr_at_fpr`: achievable points only).
        - ``advantage``: max over thresholds of TPR − FPR (attacker advantage, >= 0).
        - ``eps_lower_bound``, ``eps_confidence``, ``eps_delta``, ``eps_method``: see
          :func:`empirical_epsilon`.
        - ``n_members``, ``n_nonmembers``: sample sizes.

        Only the "higher = member" direction is scored: an attack whose scores run the
        wrong way gets AUC below 0.5 and advantage near 0.

    Raises:
        ValueError: on empty or non-finite scores.

    Example:
        >>> report = mia_metrics([0.9, 0.8, 0.3], [0.2, 0.4, 0.1])
        >>> report["auc"], report["n_members"]
        (0.8888888888888888, 3)
    """
    m = _validated(member_scores, "member_scores")
    n = _validated(nonmember_scores, "nonmember_scores")
    fps, tps, _ = _roc_counts(m, n)
    fpr, tpr = fps / n.size, tps / m.size
    advantage = float(np.max(tpr - fpr))
    eps = empirical_epsilon(m, n, delta=delta, confidence=confidence)
    return {
        "auc": roc_auc(m, n),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_01pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "advantage": advantage,
        "eps_lower_bound": eps.epsilon,
        "eps_confidence": eps.confidence,
        "eps_delta": eps.delta,
        "eps_method": eps.method,
        "n_members": int(m.size),
        "n_nonmembers": int(n.size),
    }
