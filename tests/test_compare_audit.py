"""compare's statistics: one-run audit per row, intervals, chance level, paired differences,
ranking baselines, DP-SGD search and presets, each checked against an independent reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, binomtest
from scipy.stats import t as scipy_t
from sklearn.metrics import roc_auc_score

from gradguard.audit.metrics import roc_auc_standard_error
from gradguard.experiments.compare import (
    PRESETS,
    ComparisonConfig,
    chance_best_tpr,
    clopper_pearson,
    paired_differences,
    preset_config,
    run_comparison,
)

TINY_AUDIT = dict(accountant="rdp", max_examples=300, epochs=2, batch_size=32, canaries=6,
                  n_shadows=4, epsilons=(8.0,), drop=("q=0.9",), clip=(), probes=1,
                  probe_examples=16, curvature_vectors=2, audit_canaries=100, bootstrap=50,
                  chance_permutations=20)


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_audit")
    config = ComparisonConfig(out_dir=str(out), **TINY_AUDIT)
    rows = run_comparison(config, progress=False)
    return config, rows, out


def _reference_eps(scores, included, k, level=0.05):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    v = sum(bool(included[i]) for i in order[:k]) + sum(not included[i] for i in order[-k:])
    r = 2 * k

    def excess(eps):
        return binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - level

    return (0.0 if excess(0.0) > 0 else brentq(excess, 0.0, 50.0, xtol=1e-10)), v


def test_every_row_has_a_one_run_bound_matching_scipy(audit_run):
    config, rows, out = audit_run
    saved = np.load(out / "scores.npz")
    coins = None
    for row in rows:
        slug = row["run_dir"].rsplit("/", 1)[-1]
        scores = saved[f"{slug}__canaries__scores"]
        included = saved[f"{slug}__canaries__included"]
        coins = included if coins is None else coins
        assert np.array_equal(included, coins)  # every row of a seed: the same coins
        assert len(scores) == config.audit_canaries == row["audit_canaries"]
        # δ > 0 gives at most the δ = 0 bound; with 2mδ = 2e-3 they are close.
        eps, correct = _reference_eps(scores, included, config.audit_canaries // 10)
        assert row["one_run_correct"] == correct and row["one_run_guesses"] == 20
        assert row["one_run_eps_lb"] <= eps + 1e-9
        assert row["one_run_eps_lb"] >= eps - 0.1 or eps == 0


def test_tpr_interval_is_clopper_pearson_and_chance_is_reported(audit_run):
    _, rows, _ = audit_run
    for row in rows:
        n, hits = row["best_tpr_at_1pct_fpr_n"], row["best_tpr_at_1pct_fpr_hits"]
        assert hits == round(row["best_tpr_at_1pct_fpr"] * n)
        ci = binomtest(hits, n).proportion_ci(0.95, method="exact")
        assert row["best_tpr_at_1pct_fpr_cp_low"] == pytest.approx(ci.low, abs=1e-9)
        assert row["best_tpr_at_1pct_fpr_cp_high"] == pytest.approx(ci.high, abs=1e-9)
        assert 0 <= row["chance_best_tpr_at_1pct_fpr"] <= row[
            "chance_best_tpr_at_1pct_fpr_p95"] <= 1


def test_dp_row_used_its_own_search(audit_run):
    from opacus.accountants.utils import get_noise_multiplier

    config, rows, _ = audit_run
    dp = next(r for r in rows if r["defence"] == "dp-sgd")
    grid = {(config.lr * a, config.max_grad_norm * b, max(1, round(config.epochs * c)))
            for a, b, c in itertools.product((0.5, 2.0), (0.5, 2.0), (0.5, 1.0))}
    assert (dp["lr"], dp["max_grad_norm"], dp["epochs"]) in grid
    assert 0.0 <= dp["dp_search_val_accuracy"] <= 1.0
    # The row trains on the members plus the included audit canaries.
    n = 120 + dp["audit_canaries_included"]
    expected = get_noise_multiplier(target_epsilon=8.0, target_delta=config.delta,
                                    sample_rate=1 / math.ceil(n / config.batch_size),
                                    epochs=dp["epochs"], accountant=config.accountant)
    assert dp["noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    undefended = rows[0]
    assert undefended["lr"] == config.lr and undefended["dp_search_val_accuracy"] is None


def test_ranking_and_curvature_columns_and_tables(audit_run):
    _, rows, out = audit_run
    for row in rows:
        for key in ("rank_auc_gnq", "rank_auc_mean_loss", "rank_auc_final_loss",
                    "rank_auc_grad_norm", "curvature_auc_typical", "curvature_auc_mislabelled"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
        low, high = row["rank_gnq_minus_mean_loss_low"], row["rank_gnq_minus_mean_loss_high"]
        assert (low is None) == (high is None) and (low is None or low <= high)
    md = (out / "results.md").read_text()
    for text in ("chance best-of-k", "one-run ε_lb", "GNQ − mean loss", "curv. AUC typical"):
        assert text in md


def test_chance_level_matches_the_order_statistic_under_the_null():
    """One attack, continuous scores: E[TPR at the j-th largest non-member] = j / (n + 1)."""
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(size=500), rng.normal(size=500)
    mean, p95 = chance_best_tpr({"a": (members, nonmembers)}, permutations=2000, seed=1)
    j = math.floor(0.01 * 500)  # at most 5 false positives: members above the 6th largest
    assert mean == pytest.approx((j + 1) / 501, abs=0.0015)
    assert p95 > mean
    # A second copy of the same attack adds nothing; an independent one raises the level.
    same, _ = chance_best_tpr({"a": (members, nonmembers), "b": (members, nonmembers)},
                              permutations=2000, seed=1)
    assert same == pytest.approx(mean, abs=1e-12)
    other = (rng.normal(size=500), rng.normal(size=500))
    more, _ = chance_best_tpr({"a": (members, nonmembers), "b": other}, permutations=2000,
                              seed=1)
    assert more > mean + 0.002


@pytest.mark.parametrize("k, n", [(0, 50), (3, 50), (50, 50), (17, 719)])
def test_clopper_pearson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_paired_differences_pick_the_dp_row_of_closest_accuracy():
    rng = np.random.default_rng(2)
    names = [("no defence", "none"), ("dp-sgd ε=1", "dp-sgd"), ("dp-sgd ε=8", "dp-sgd"),
             ("gnq-drop", "gnq-drop")]
    accuracy = {"no defence": 0.95, "dp-sgd ε=1": 0.6, "dp-sgd ε=8": 0.9, "gnq-drop": 0.7}
    per_seed = [[{"name": n, "defence": d, "test_accuracy": accuracy[n] + rng.normal(0, 0.01),
                  "best_tpr_at_1pct_fpr": rng.uniform(), "best_auc": rng.uniform(),
                  "one_run_eps_lb": rng.uniform()} for n, d in names] for _ in range(4)]
    diffs = {d["name"]: d for d in paired_differences(per_seed)}
    assert set(diffs) == {"no defence", "gnq-drop"}
    assert diffs["no defence"]["versus"] == "dp-sgd ε=8"
    assert diffs["gnq-drop"]["versus"] == "dp-sgd ε=1"
    values = [s[3]["best_auc"] - s[1]["best_auc"] for s in per_seed]
    sem = np.std(values, ddof=1) / 2
    assert diffs["gnq-drop"]["best_auc"] == pytest.approx(np.mean(values))
    assert diffs["gnq-drop"]["best_auc_ci95"] == pytest.approx(scipy_t.ppf(0.975, 3) * sem)
    assert paired_differences(per_seed[:1]) == []


def _delong_reference(members, nonmembers):
    psi = (members[:, None] > nonmembers[None, :]) + 0.5 * (members[:, None] == nonmembers[None, :])
    v, w = psi.mean(1), psi.mean(0)
    return math.sqrt(v.var(ddof=1) / len(members) + w.var(ddof=1) / len(nonmembers))


def test_auc_standard_error_matches_explicit_delong_and_the_spread_of_auc():
    rng = np.random.default_rng(3)
    members = np.round(rng.normal(0.5, 1, size=60), 1)  # rounding makes ties
    nonmembers = np.round(rng.normal(0, 1, size=45), 1)
    assert roc_auc_standard_error(members, nonmembers) == pytest.approx(
        _delong_reference(members, nonmembers), rel=1e-12)
    aucs, ses = [], []
    for _ in range(400):
        m, n = rng.normal(0.5, 1, size=80), rng.normal(0, 1, size=80)
        aucs.append(roc_auc_score(np.r_[np.ones(80), np.zeros(80)], np.r_[m, n]))
        ses.append(roc_auc_standard_error(m, n))
    assert np.mean(ses) == pytest.approx(np.std(aucs, ddof=1), rel=0.15)


def test_presets_and_cli_plumbing():
    from gradguard.cli import _config_from_args, build_parser

    assert set(PRESETS) == {"standard", "clean", "memorisation", "memorisation-clean"}
    assert preset_config("clean").canaries == 0
    memo = preset_config("memorisation")
    memo.validate()
    assert (memo.epochs, memo.hidden, memo.canaries) == (100, (512,), 58)
    parser = build_parser()
    args = parser.parse_args(["compare", "--preset", "memorisation", "--epochs", "7"])
    config = _config_from_args(args, parser)
    assert config.epochs == 7 and config.hidden == (512,) and config.max_examples == 900
    args = parser.parse_args(["compare"])
    assert args.seeds == [0, 1, 2]  # three seeds by default
    assert _config_from_args(args, parser).audit_canaries == 500
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("noisy")


def test_probe_can_score_every_example_and_reports_delong_se():
    from torch import nn
    from torch.utils.data import TensorDataset

    from gradguard.curvature.probe import CurvatureProbe

    torch.manual_seed(0)
    members = TensorDataset(torch.randn(37, 5), torch.randint(0, 3, (37,)))
    nonmembers = TensorDataset(torch.randn(29, 5), torch.randint(0, 3, (29,)))
    probe = CurvatureProbe(members, nonmembers, n_examples=None, n_vectors=2)
    result = probe.run(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), step=0)
    assert len(result.member_scores) == 37 and len(result.nonmember_scores) == 29
    m, n = (-result.member_scores).double().numpy(), (-result.nonmember_scores).double().numpy()
    assert result.auc_se == pytest.approx(_delong_reference(m, n), rel=1e-10)
    assert probe.history[-1]["auc_se"] == result.auc_se
    state = probe.state_dict()
    again = CurvatureProbe(members, nonmembers, n_examples=None, n_vectors=2)
    again.load_state_dict(state)
    assert again.history[0]["auc_se"] == pytest.approx(result.auc_se)
    del state["history_auc_se"]  # a state saved before the field existed still loads
    again.load_state_dict(state)
    assert math.isnan(again.history[0]["auc_se"])
