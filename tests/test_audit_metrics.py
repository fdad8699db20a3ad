"""Membership-inference metrics against scikit-learn, brute force and closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from gradguard.audit.metrics import (
    EmpiricalEpsilon,
    empirical_epsilon,
    mia_metrics,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)

# Small integer scores produce many ties, the case that breaks naive ROC code.
tied_scores = st.lists(st.integers(min_value=-4, max_value=4), min_size=1, max_size=40)
real_scores = st.lists(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=1, max_size=40
)


def _random_scores(seed: int, *, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 200, size=2)
    if ties:
        return rng.integers(0, 6, m).astype(float), rng.integers(-1, 5, n).astype(float)
    return rng.normal(0.5, 1.0, m), rng.normal(0.0, 1.0, n)


def _sklearn_roc(members, nonmembers):
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return sk_roc_curve(labels, np.r_[members, nonmembers], drop_intermediate=False)


def _brute_force_rates(members, nonmembers):
    """TPR/FPR of "member if score >= t" at every distinct score and +inf, by direct counting."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    thresholds = np.unique(np.r_[members, nonmembers, np.inf])
    tpr = np.array([(members >= t).mean() for t in thresholds])
    fpr = np.array([(nonmembers >= t).mean() for t in thresholds])
    return fpr, tpr


def _brute_force_point_epsilon(members, nonmembers, delta):
    """max over thresholds of the observed-rate log ratios (inf where a denominator is 0)."""
    fpr, tpr = _brute_force_rates(members, nonmembers)
    best = 0.0
    for f, t in zip(fpr, tpr):
        for num, den in ((t - delta, f), ((1 - f) - delta, 1 - t)):
            if num > 0:
                best = max(best, math.inf if den == 0 else math.log(num / den))
    return best


# ---------------------------------------------------------------------------------------
# ROC, AUC, TPR at FPR
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_roc_curve_matches_sklearn(seed, ties):
    members, nonmembers = _random_scores(seed, ties=ties)
    fpr, tpr, thresholds = roc_curve(members, nonmembers)
    sk_fpr, sk_tpr, sk_thresholds = _sklearn_roc(members, nonmembers)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_roc_auc_matches_sklearn_and_curve_area(seed, ties):
    members, nonmembers = _random_scores(seed, ties=ties)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    expected = roc_auc_score(labels, np.r_[members, nonmembers])
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = roc_curve(members, nonmembers)
    # Trapezoids over the tie-exact curve give the ties-count-half AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(members=tied_scores, nonmembers=tied_scores)
def test_roc_and_auc_property_against_sklearn(members, nonmembers):
    fpr, tpr, thresholds = roc_curve(members, nonmembers)
    sk_fpr, sk_tpr, sk_thresholds = _sklearn_roc(members, nonmembers)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    assert roc_auc(members, nonmembers) == pytest.approx(
        roc_auc_score(labels, np.r_[members, nonmembers]), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(10))
def test_tpr_at_fpr_matches_brute_force(seed):
    members, nonmembers = _random_scores(seed, ties=seed % 2 == 0)
    fpr, tpr, _ = roc_curve(members, nonmembers)
    bf_fpr, bf_tpr = _brute_force_rates(members, nonmembers)
    n = len(nonmembers)
    # Exact multiples of 1/n sit on achievable points: the boundary must count as allowed.
    targets = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0, 1 / n, 3 / n, min(1.0, 7 / n)]
    for target in targets:
        expected = bf_tpr[bf_fpr <= target].max()
        assert tpr_at_fpr(fpr, tpr, target) == expected
        sk_fpr, sk_tpr, _ = _sklearn_roc(members, nonmembers)
        assert tpr_at_fpr(sk_fpr, sk_tpr, target) == expected


def test_tpr_at_fpr_uses_achievable_points_only():
    # Points (0, 0), (0.5, 0.5), (1, 1): at FPR 0.25 interpolation would claim 0.25.
    assert tpr_at_fpr([0.0, 0.5, 1.0], [0.0, 0.5, 1.0], 0.25) == 0.0
    assert tpr_at_fpr([0.0, 0.5, 1.0], [0.0, 0.5, 1.0], 0.5) == 0.5


def test_tpr_at_fpr_rejects_bad_input():
    with pytest.raises(ValueError, match="target"):
        tpr_at_fpr([0.0, 1.0], [0.0, 1.0], 1.5)
    with pytest.raises(ValueError, match="equal length"):
        tpr_at_fpr([0.0, 1.0], [0.0], 0.1)


@pytest.mark.parametrize("seed", range(10))
def test_balanced_accuracy_and_advantage_match_brute_force(seed):
    members, nonmembers = _random_scores(seed, ties=seed % 2 == 1)
    fpr, tpr = _brute_force_rates(members, nonmembers)
    report = mia_metrics(members, nonmembers)
    assert report["balanced_accuracy"] == pytest.approx(np.max((tpr + 1 - fpr) / 2), abs=1e-12)
    assert report["advantage"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert report["tpr_at_1pct_fpr"] == bf_max(fpr, tpr, 0.01)
    assert report["tpr_at_01pct_fpr"] == bf_max(fpr, tpr, 0.001)


def bf_max(fpr, tpr, target):
    return tpr[fpr <= target].max()


# ---------------------------------------------------------------------------------------
# Empirical epsilon
# ---------------------------------------------------------------------------------------


def test_empirical_epsilon_matches_hand_computed_clopper_pearson():
    # Overlapping integer scores: ties within and across the groups.
    rng = np.random.default_rng(7)
    members = rng.integers(3, 12, size=40).tolist()
    nonmembers = rng.integers(0, 6, size=35).tolist()
    confidence, delta = 0.9, 0.01
    m, n = len(members), len(nonmembers)
    a_m = (1 - confidence) / (2 * m)
    a_n = (1 - confidence) / (2 * n)
    best = 0.0
    for t in [math.inf, *sorted(set(members) | set(nonmembers))]:
        tp = sum(s >= t for s in members)
        fp = sum(s >= t for s in nonmembers)
        tpr_lo = beta.ppf(a_m, tp, m - tp + 1) if tp > 0 else 0.0
        fpr_hi = beta.ppf(1 - a_n, fp + 1, n - fp) if fp < n else 1.0
        for num, den in ((tpr_lo - delta, fpr_hi), ((1 - fpr_hi) - delta, 1 - tpr_lo)):
            if num > 0:
                best = max(best, math.log(num / den))
    result = empirical_epsilon(members, nonmembers, delta=delta, confidence=confidence)
    assert best > 0  # the example is chosen so the bound is informative
    assert result.epsilon == pytest.approx(best, rel=1e-9)
    assert result.confidence == confidence and result.delta == delta
    assert "Clopper-Pearson" in result.method and "Bonferroni" in result.method


def test_empirical_epsilon_closed_form_for_perfect_separation():
    # Separating threshold: TP = m, FP = 0. Beta(m, 1) has quantile q^(1/m) and Beta(1, n)
    # upper quantile 1 − q^(1/n), so eps = log(q_m^(1/m) / (1 − q_n^(1/n))) with no scipy.
    m, n, confidence = 500, 300, 0.95
    q_m, q_n = (1 - confidence) / (2 * m), (1 - confidence) / (2 * n)
    expected = max(
        math.log(q_m ** (1 / m) / -math.expm1(math.log(q_n) / n)),
        math.log(q_n ** (1 / n) / -math.expm1(math.log(q_m) / m)),
    )
    result = empirical_epsilon(np.full(m, 3.0), np.full(n, -1.0), delta=0.0)
    assert result.epsilon == pytest.approx(expected, rel=1e-9)
    assert result.point_estimate == math.inf and result.threshold == 3.0


@pytest.mark.parametrize("delta", [0.0, 1e-5, 0.1])
@pytest.mark.parametrize("seed", range(8))
def test_empirical_epsilon_never_exceeds_point_estimate(seed, delta):
    members, nonmembers = _random_scores(seed, ties=seed % 2 == 0)
    point = _brute_force_point_epsilon(members, nonmembers, delta)
    result = empirical_epsilon(members, nonmembers, delta=delta)
    assert 0.0 <= result.epsilon <= point
    assert result.point_estimate == pytest.approx(point, rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    members=st.one_of(tied_scores, real_scores),
    nonmembers=st.one_of(tied_scores, real_scores),
    delta=st.sampled_from([0.0, 1e-5, 0.2]),
    confidence=st.sampled_from([0.5, 0.9, 0.95, 0.999]),
)
def test_empirical_epsilon_below_point_estimate_property(members, nonmembers, delta, confidence):
    point = _brute_force_point_epsilon(members, nonmembers, delta)
    result = empirical_epsilon(members, nonmembers, delta=delta, confidence=confidence)
    assert 0.0 <= result.epsilon <= point
    assert math.isfinite(result.epsilon)


def test_empirical_epsilon_grows_with_separation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=2000)
    noise = rng.normal(size=2000)
    bounds = [
        empirical_epsilon(noise + shift, base, delta=0.0).epsilon for shift in (0.5, 1.5, 3.0, 5.0)
    ]
    assert all(b < a for b, a in zip(bounds, bounds[1:])), bounds
    assert bounds[0] > 0


def test_empirical_epsilon_is_zero_for_identical_distributions():
    # Under the null the true eps is 0, so the bound may be > 0 in at most 5% of draws.
    positives = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        result = empirical_epsilon(rng.normal(size=300), rng.normal(size=250), delta=0.0)
        positives += result.epsilon > 0
    assert positives <= 5


def test_empirical_epsilon_covers_a_known_epsilon():
    # Laplace(1, 1) vs Laplace(0, 1) scores: the likelihood ratio is bounded by e, so every
    # threshold test satisfies TPR <= e·FPR and TNR <= e·FNR (true eps = 1 exactly).
    true_eps = 1.0
    above = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        eps = empirical_epsilon(rng.laplace(1, 1, 1000), rng.laplace(0, 1, 1000), delta=0.0)
        above += eps.epsilon > true_eps
    assert above <= 3  # nominal 5% of 60
    rng = np.random.default_rng(123)
    tight = empirical_epsilon(rng.laplace(1, 1, 5000), rng.laplace(0, 1, 5000), delta=0.0)
    assert 0.6 < tight.epsilon <= true_eps


def test_empirical_epsilon_rejects_bad_parameters():
    with pytest.raises(ValueError, match="delta"):
        empirical_epsilon([1.0], [0.0], delta=1.0)
    with pytest.raises(ValueError, match="confidence"):
        empirical_epsilon([1.0], [0.0], confidence=1.0)


# ---------------------------------------------------------------------------------------
# mia_metrics report
# ---------------------------------------------------------------------------------------


def test_mia_metrics_is_plain_json_and_consistent():
    rng = np.random.default_rng(1)
    members = torch.tensor(rng.normal(1.0, 1.0, 400), dtype=torch.float32)
    nonmembers = torch.tensor(rng.normal(0.0, 1.0, 300), dtype=torch.float32)
    report = mia_metrics(members, nonmembers, delta=1e-5, confidence=0.9)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    expected_keys = {
        "auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "advantage",
        "eps_lower_bound", "eps_confidence", "eps_delta", "eps_method", "n_members",
        "n_nonmembers",
    }  # fmt: skip
    assert set(report) == expected_keys
    for key, value in report.items():
        expected_type = {"n_members": int, "n_nonmembers": int, "eps_method": str}.get(key, float)
        assert type(value) is expected_type, key
    assert report["n_members"] == 400 and report["n_nonmembers"] == 300
    assert report["eps_confidence"] == 0.9 and report["eps_delta"] == 1e-5
    assert report["advantage"] == pytest.approx(2 * report["balanced_accuracy"] - 1, abs=1e-12)
    numpy_report = mia_metrics(
        members.double().numpy(), nonmembers.double().numpy(), confidence=0.9
    )
    assert numpy_report == report
    eps = empirical_epsilon(members, nonmembers, delta=1e-5, confidence=0.9)
    assert isinstance(eps, EmpiricalEpsilon) and report["eps_lower_bound"] == eps.epsilon


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_bad_scores_raise_clear_errors(bad):
    for func in (roc_auc, roc_curve, mia_metrics, empirical_epsilon):
        with pytest.raises(ValueError, match="member_scores"):
            func(bad, [0.0, 1.0])
        with pytest.raises(ValueError, match="nonmember_scores"):
            func([0.0, 1.0], bad)


def test_non_numeric_scores_raise_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        roc_auc(["a", "b"], [0.0])


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def test_plots_write_pngs_without_touching_pyplot_state(tmp_path):
    import matplotlib

    from gradguard.experiments.plots import plot_privacy_utility, plot_roc

    backend = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    curves = {
        "strong": (rng.normal(2, 1, 300), rng.normal(0, 1, 300)),
        "tied": (rng.integers(0, 3, 200), rng.integers(0, 3, 250)),
    }
    written = [
        plot_roc(curves, tmp_path / "roc.png"),
        plot_roc(curves, tmp_path / "sub" / "roc_log.png", log_scale=True),
        plot_privacy_utility(
            [
                {"name": "baseline", "test_accuracy": 0.97, "auc": 0.7, "tpr_at_1pct_fpr": 0.08},
                {"name": "dp-sgd", "test_accuracy": 0.9, "auc": 0.52, "tpr_at_1pct_fpr": 0.011},
            ],
            tmp_path / "pu.png",
        ),
    ]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert matplotlib.get_backend() == backend


def test_plots_reject_bad_input(tmp_path):
    from gradguard.experiments.plots import plot_privacy_utility, plot_roc

    with pytest.raises(ValueError, match="curves is empty"):
        plot_roc({}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match=".png"):
        plot_roc({"a": ([1.0], [0.0])}, tmp_path / "roc.pdf")
    with pytest.raises(ValueError, match="pair"):
        plot_roc({"a": [1.0, 0.0, 2.0]}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="lacks"):
        plot_privacy_utility([{"name": "x", "auc": 0.5}], tmp_path / "pu.png")
    with pytest.raises(ValueError, match="finite"):
        row = {"name": "x", "test_accuracy": float("nan"), "auc": 0.5, "tpr_at_1pct_fpr": 0.0}
        plot_privacy_utility([row], tmp_path / "pu.png")
