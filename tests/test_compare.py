"""The DP-SGD comparison: settings, rows, and one tiny end-to-end run checked from outside.

The end-to-end checks do not trust the comparison's own numbers: the undefended row is
retrained here with a plain PyTorch loop (same split, seed, data order and recipe) and its
loss-attack scores recomputed; metrics are recomputed with scikit-learn from the saved
scores; the DP noise multiplier is recomputed with Opacus' calibration; the budget of a
``budget=pN`` row is recomputed from the baseline's saved ledger.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import t as scipy_t
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from gradguard.experiments.compare import (
    ATTACKS,
    ComparisonConfig,
    Progress,
    aggregate_rows,
    demo_config,
    markdown_table,
    parse_policy_spec,
    row_specs,
    run_comparison,
    run_repeated,
)
from gradguard.experiments.data import load_dataset
from gradguard.experiments.models import make_model
from gradguard.policies import Quantile

# rdp: Opacus calibrates the noise for a target ε several times faster than with prv.
# The one-run audit canaries and the DP-SGD search have their own test below; here they are
# off so the rows can be checked against a plain training loop and Opacus' calibration.
TINY = dict(accountant="rdp", max_examples=300, epochs=2, batch_size=32, canaries=6, n_shadows=4,
            epsilons=(8.0,), drop=("q=0.9", "budget=p50"), clip=("q=0.5",), probes=1,
            probe_examples=16, curvature_vectors=2, audit_canaries=0, dp_search=False,
            bootstrap=50, chance_permutations=20)


def _strict_json(path: Path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = ComparisonConfig(out_dir=str(out), **TINY)
    stream = io.StringIO()
    rows = run_comparison(config, progress=True, stream=stream)
    return config, rows, out, stream.getvalue()


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("spec, threshold, budget, percentile", [
    ("q=0.9", Quantile(0.9), None, None),
    ("q=0.75,window=20", Quantile(0.75, window=20), None, None),
    ("tau=120", 120.0, None, None),
    ("budget=20", None, 20.0, None),
    ("budget=p90", None, None, 90.0),
    (" q=0.95 , budget=12.5 ", Quantile(0.95), 12.5, None),
])
def test_policy_specs_parse(spec, threshold, budget, percentile):
    parsed = parse_policy_spec(spec)
    assert parsed == {"threshold": threshold, "budget": budget, "budget_percentile": percentile}


@pytest.mark.parametrize("spec, fragment", [
    ("q=1.5", "q must be in (0, 1)"),
    ("q=abc", "q must be a number"),
    ("tau=-1", "tau must be a finite GNQ value > 0"),
    ("budget=0", "budget must be a finite number of nats > 0"),
    ("budget=p0", "0 < P <= 100"),
    ("speed=3", "unknown key 'speed'"),
    ("q=0.9,tau=3", "both q and tau"),
    ("window=5", "window only applies"),
    ("q", "key=value"),
    ("", "non-empty"),
    ("q=0.9,q=0.8", "given twice"),
])
def test_bad_policy_specs_name_the_problem(spec, fragment):
    with pytest.raises(ValueError) as info:
        parse_policy_spec(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize("changes, fragment", [
    (dict(n_shadows=2), "n_shadows must be 0 (no LiRA) or at least 4"),
    (dict(n_shadows=0, attacks=("lira_online",)), "LiRA attacks need shadow models"),
    (dict(baseline=False, drop=("budget=p90",)), "keep the baseline row"),
    (dict(dataset="mnist"), "set data_dir"),
    (dict(dataset="imagenet"), "dataset must be one of"),
    (dict(delta=1.5), "delta must be in (0, 1)"),
    (dict(epsilons=(0.0,)), "target epsilon must be a finite number > 0"),
    (dict(model="vit"), "model must be one of"),
    (dict(attacks=("loss", "magic")), "unknown attack"),
    (dict(drop=("q=0.9", "q=0.9")), "same settings"),
    (dict(baseline=False, epsilons=(), drop=(), clip=()), "no rows"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(device="tpu"), "device"),
])
def test_invalid_configs_name_the_fix(changes, fragment):
    with pytest.raises(ValueError) as info:
        ComparisonConfig(**changes).validate()
    assert fragment in str(info.value)


def test_row_specs_order_names_and_unique_slugs():
    specs = row_specs(ComparisonConfig())
    assert [s.defence for s in specs] == (
        ["none"] + ["dp-sgd"] * 3 + ["gnq-drop"] * 3 + ["gnq-clip"])
    assert [s.epsilon for s in specs if s.defence == "dp-sgd"] == [1.0, 4.0, 8.0]
    assert len({s.slug for s in specs}) == len(specs)
    assert all(s.slug.replace("_", "").replace(".", "").isalnum() for s in specs)
    assert [s.policy for s in specs] == ["monitor"] * 4 + ["drop"] * 3 + ["clip"]


def test_demo_preset_rows_and_default_attacks():
    demo = demo_config("x")
    assert [s.name for s in row_specs(demo)] == [
        "no defence", "dp-sgd ε=8", "gnq-drop q=0.9", "gnq-drop budget=p90"]
    assert demo.resolved_attacks() == ATTACKS
    assert ComparisonConfig(n_shadows=0).resolved_attacks() == ("loss", "curvature")


def test_progress_line_writes_stages_and_can_be_silenced():
    stream = io.StringIO()
    bar = Progress(4, stream=stream)
    bar.stage("training a")
    bar.advance(2)
    bar.stage("training b")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("training a") and lines[0].startswith("[  0%]")
    assert lines[1].endswith("training b") and lines[1].startswith("[ 50%]")
    silent = io.StringIO()
    quiet = Progress(4, enabled=False, stream=silent)
    quiet.stage("x")
    quiet.advance()
    quiet.close()
    assert silent.getvalue() == ""


# --------------------------------------------------------------------------- end to end


def test_every_output_file_parses(tiny_run):
    config, rows, out, progress = tiny_run
    names = [r["name"] for r in rows]
    assert names == ["no defence", "dp-sgd ε=8", "gnq-drop q=0.9", "gnq-drop budget=p50",
                     "gnq-clip q=0.5"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == names
    for row in table:
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        for attack in ATTACKS:
            assert 0.0 <= float(row[f"{attack}_auc"]) <= 1.0
    doc = _strict_json(out / "results.json")
    assert doc["config"]["epochs"] == 2 and doc["config"]["attacks"] == list(ATTACKS)
    assert [r["name"] for r in doc["rows"]] == names
    assert {"torch", "opacus", "python", "device"} <= set(doc["environment"])
    for name in doc["files"]:
        assert (out / name).is_file(), name
    import matplotlib.image

    for png in ["privacy_utility.png"] + [f"roc_{a}{s}.png" for a in ATTACKS
                                          for s in ("", "_log")]:
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    md = (out / "results.md").read_text()
    assert md.startswith(markdown_table(rows))
    assert "training no defence" in progress and "LiRA shadow model 4/4" in progress


def test_table_has_one_line_per_row_and_every_attack_column(tiny_run):
    _, rows, _, _ = tiny_run
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for label in ("loss AUC", "curv. AUC", "LiRA-on AUC", "LiRA-off AUC", "test acc", "DP ε"):
        assert label in header
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)
    assert "∞ (none)" in lines[2] and "8.00" in lines[3]


def test_metrics_match_scikit_learn_on_the_saved_scores(tiny_run):
    _, rows, out, _ = tiny_run
    scores = np.load(out / "scores.npz")
    n_members = 120  # 40% of 300 digits rows
    for row in rows:
        slug = Path(row["run_dir"]).name
        for attack in ATTACKS:
            members = scores[f"{slug}__{attack}__members"]
            nonmembers = scores[f"{slug}__{attack}__nonmembers"]
            assert members.shape == (n_members,) and nonmembers.shape == (90,)
            labels = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
            expected = roc_auc_score(labels, np.r_[members, nonmembers])
            assert row[f"{attack}_auc"] == pytest.approx(expected, abs=1e-12)
        best = max(row[f"{a}_auc"] for a in ATTACKS)
        assert row["best_auc"] == best


def test_undefended_row_equals_a_plain_training_loop(tiny_run):
    """Same initial weights, same data order, and the monitoring guard leaves training as is."""
    config, rows, out, _ = tiny_run
    split = load_dataset("digits", seed=config.seed, canaries=config.canaries,
                         max_examples=config.max_examples)
    model = make_model("mlp", split.input_shape, 10, seed=config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    for _ in range(config.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        xt, yt = split.test.tensors
        accuracy = (model(xt).argmax(1) == yt).double().mean().item()
        xm, ym = split.train.tensors
        member_loss = F.cross_entropy(model(xm), ym, reduction="none").double().numpy()
    baseline = rows[0]
    assert baseline["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    saved = np.load(out / "scores.npz")["none__loss__members"]
    np.testing.assert_allclose(saved, -member_loss, rtol=1e-5, atol=1e-6)
    # Canary bookkeeping: ceil(6/2) canaries among the members, the rest in the holdout.
    assert baseline["canaries_members"] == 3 and baseline["canaries_holdout"] == 3
    m = split.train_canary_mask.numpy()
    assert baseline["canary_fit_members"] == pytest.approx(
        float((model(xm[m]).argmax(1) == ym[m]).double().mean()))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_dp_row_uses_opacus_calibration_and_reports_the_accountant(tiny_run):
    from opacus.accountants.utils import get_noise_multiplier

    config, rows, _, _ = tiny_run
    dp = rows[1]
    # Opacus' sample rate is 1 / (batches per epoch of the original loader).
    expected = get_noise_multiplier(target_epsilon=8.0, target_delta=config.delta,
                                    sample_rate=1 / math.ceil(120 / config.batch_size),
                                    epochs=config.epochs,
                                    accountant=config.accountant)
    assert dp["noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    assert dp["delta"] == config.delta and dp["max_grad_norm"] == config.max_grad_norm
    # The accountant's ε after the run: at most the target (a few empty Poisson batches may
    # be skipped, never added), and close to it.
    assert 0.8 * 8.0 < dp["eps_spent"] <= 8.0 * (1 + 1e-3)
    assert rows[0]["eps_spent"] is None and rows[2]["eps_target"] is None


def test_budget_percentile_comes_from_the_baseline_ledger(tiny_run):
    _, rows, out, _ = tiny_run
    state = torch.load(out / "tb" / "none" / "gradguard_state.pt", weights_only=True)
    ledger = state["ledger"]
    seen = ledger["steps_seen"] > 0
    expected = float(np.percentile(ledger["cum_bound"][seen].numpy(), 50))
    budget_row = rows[3]
    assert budget_row["budget_nats"] == pytest.approx(expected, rel=1e-12)
    # Nobody exceeds the budget by more than one step's worth (censoring happens once it
    # is reached); the undefended run's maximum was above it.
    assert rows[0]["gnq_max_bound"] > expected
    assert budget_row["censored_total"] >= 1


def test_policies_acted_and_guards_logged_every_row(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, rows, out, _ = tiny_run
    none, dp, drop_q, _, clip = rows
    assert none["dropped_total"] == 0 and none["clipped_total"] == 0
    assert drop_q["dropped_total"] > 0 and drop_q["clipped_total"] == 0
    assert clip["clipped_total"] > 0 and clip["dropped_total"] == 0
    for row in rows:
        run = Path(row["run_dir"])
        assert run.parent == out / "tb"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["summary"]["step"] == row["steps"] > 0
        assert len(row["top_indices"]) == 10
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        assert "gradguard/gnq/mean" in tags and "compare/test_accuracy" in tags
        final = accumulator.Scalars("compare/test_accuracy")[-1].value
        assert final == pytest.approx(row["test_accuracy"], abs=1e-6)


def test_nothing_written_holds_example_contents(tiny_run):
    """Scores and ledgers are one number per example; inputs never leave the process."""
    _, _, out, _ = tiny_run
    scores = np.load(out / "scores.npz")
    assert all(scores[k].ndim == 1 for k in scores.files)
    from opacus.accountants import RDPAccountant

    for state_path in (out / "tb").glob("*/gradguard_state.pt"):
        state = torch.load(state_path, weights_only=True)
        # DP-SGD rows: each example's Rényi DP at each of Opacus's orders (individual ε).
        rdp = state.pop("individual_rdp", {}).pop("rdp", None)
        if rdp is not None:
            assert rdp.shape == (state["ledger"]["steps_seen"].numel(),
                                 len(RDPAccountant.DEFAULT_ALPHAS))
        stack = [state]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                assert value.dim() <= 1, state_path
            elif isinstance(value, dict):
                stack += list(value.values())
            elif isinstance(value, list):
                stack += value


def test_rerun_refuses_to_mix_with_a_previous_comparison(tiny_run):
    config, _, out, _ = tiny_run
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_comparison(config, progress=False)


def test_overwrite_replaces_stale_rows(tmp_path):
    stale = tmp_path / "tb" / "old_row"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")
    config = ComparisonConfig(out_dir=str(tmp_path), max_examples=120, epochs=1, canaries=0,
                              n_shadows=0, epsilons=(), drop=(), clip=(), probes=0,
                              curvature_vectors=1)
    rows = run_comparison(config, progress=False, overwrite=True)
    assert [r["name"] for r in rows] == ["no defence"]
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["none"]
    assert rows[0]["canary_loss_gap"] is None and rows[0]["canaries_in_top_bound"] is None
    doc = _strict_json(tmp_path / "results.json")
    assert doc["attacks"] == ["loss", "curvature"]


# --------------------------------------------------------------------------- seeds


def test_aggregate_rows_is_mean_and_sample_sd_per_row():
    rng = np.random.default_rng(0)
    per_seed = [[{"name": n, "defence": "none", "test_accuracy": float(rng.uniform()),
                  "eps_spent": None, "top_indices": [1, 2], "steps": int(rng.integers(9))}
                 for n in ("a", "b")] for _ in range(3)]
    rows = aggregate_rows(per_seed)
    assert [r["name"] for r in rows] == ["a", "b"]
    for i, row in enumerate(rows):
        acc = [seed[i]["test_accuracy"] for seed in per_seed]
        assert row["test_accuracy"] == pytest.approx(np.mean(acc), abs=1e-15)
        assert row["test_accuracy_sd"] == pytest.approx(np.std(acc, ddof=1), abs=1e-15)
        low, high = scipy_t.interval(0.95, len(acc) - 1, loc=np.mean(acc),
                                     scale=np.std(acc, ddof=1) / np.sqrt(len(acc)))
        assert row["test_accuracy_ci95"] == pytest.approx((high - low) / 2, rel=1e-12)
        assert row["steps"] == pytest.approx(np.mean([seed[i]["steps"] for seed in per_seed]))
        assert row["eps_spent"] is None and "top_indices" not in row and row["n_seeds"] == 3
    line = markdown_table(rows).splitlines()[2]
    assert f"{rows[0]['test_accuracy']:.3f} ± {rows[0]['test_accuracy_ci95']:.3f}" in line
    with pytest.raises(ValueError, match="different rows"):
        aggregate_rows([per_seed[0], per_seed[1][:1]])


def test_run_repeated_writes_one_comparison_per_seed_and_a_summary(tmp_path):
    config = ComparisonConfig(out_dir=str(tmp_path), max_examples=120, epochs=1, canaries=2,
                              n_shadows=0, epsilons=(), drop=("q=0.9",), clip=(), probes=0,
                              curvature_vectors=1)
    rows = run_repeated(config, [3, 5], progress=False)
    for seed in (3, 5):
        doc = _strict_json(tmp_path / f"seed_{seed}" / "results.json")
        assert doc["config"]["seed"] == seed and doc["split"]["seed"] == seed
    per_seed = [_strict_json(tmp_path / f"seed_{s}" / "results.json")["rows"] for s in (3, 5)]
    summary = _strict_json(tmp_path / "results_over_seeds.json")
    assert summary["seeds"] == [3, 5] and [r["name"] for r in summary["rows"]] == [
        "no defence", "gnq-drop q=0.9"]
    for i, row in enumerate(rows):
        values = [seed[i]["test_accuracy"] for seed in per_seed]
        assert row["test_accuracy"] == pytest.approx(np.mean(values))
        assert row["test_accuracy_sd"] == pytest.approx(np.std(values, ddof=1))
    with open(tmp_path / "results_over_seeds.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "privacy_utility.png").is_file()
    with pytest.raises(ValueError, match="distinct"):
        run_repeated(config, [1, 1], overwrite=True)
    with pytest.raises(FileExistsError):
        run_repeated(config, [3, 5], progress=False)
