"""Tests for gradguard.curvature.probe: fixed sample, schedule, AUC, checkpointing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gradguard.curvature.estimators import input_curvature
from gradguard.curvature.probe import CurvatureProbe, ProbeResult, step_seed


def datasets(n_members: int = 30, n_nonmembers: int = 25, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # float32 data for a float64 model: the probe casts to the model's dtype.
    members = TensorDataset(torch.randn(n_members, 5, generator=gen),
                            torch.randint(0, 3, (n_members,), generator=gen))
    nonmembers = TensorDataset(torch.randn(n_nonmembers, 5, generator=gen),
                               torch.randint(0, 3, (n_nonmembers,), generator=gen))
    return members, nonmembers


def model_(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_sample_is_fixed_seeded_and_bounded_by_dataset_size():
    members, nonmembers = datasets()
    a = CurvatureProbe(members, nonmembers, n_examples=10, seed=3)
    b = CurvatureProbe(members, nonmembers, n_examples=10, seed=3)
    c = CurvatureProbe(members, nonmembers, n_examples=10, seed=4)
    assert torch.equal(a.member_indices, b.member_indices)
    assert torch.equal(a.nonmember_indices, b.nonmember_indices)
    assert not torch.equal(a.member_indices, c.member_indices)
    for indices, size in ((a.member_indices, 30), (a.nonmember_indices, 25)):
        assert indices.dtype == torch.long and len(indices) == 10
        assert len(indices.unique()) == 10 and indices.min() >= 0 and indices.max() < size
    everything = CurvatureProbe(members, nonmembers, n_examples=1000)
    assert torch.equal(everything.member_indices, torch.arange(30))
    assert torch.equal(everything.nonmember_indices, torch.arange(25))
    # The sample does not move from probe to probe.
    model = model_()
    first, second = a.run(model, 0), a.run(model, 7)
    assert torch.equal(first.member_indices, second.member_indices)


@pytest.mark.parametrize("estimator", ["zo", "hutchinson", "fd"])
def test_scores_are_input_curvature_of_the_indexed_examples(estimator):
    members, nonmembers = datasets()
    probe = CurvatureProbe(members, nonmembers, n_examples=8, estimator=estimator,
                           n_vectors=3, h=1e-2, batch_size=5, seed=1)
    model = model_()
    result = probe.run(model, 40)

    def reference(dataset, indices):
        x = dataset.tensors[0][indices].double()
        y = dataset.tensors[1][indices]
        gen = torch.Generator().manual_seed(step_seed(1, 40))
        return input_curvature(model, x, y, estimator=estimator, n_vectors=3, h=1e-2,
                               generator=gen)

    torch.testing.assert_close(result.member_scores,
                               reference(members, probe.member_indices), rtol=1e-7, atol=0)
    torch.testing.assert_close(result.nonmember_scores,
                               reference(nonmembers, probe.nonmember_indices),
                               rtol=1e-7, atol=0)
    assert result.members_mean == pytest.approx(result.member_scores.mean().item())
    assert result.nonmembers_mean == pytest.approx(result.nonmember_scores.mean().item())
    assert result.seconds > 0
    # Reproducible: the same step gives the same scores, another step other vectors.
    assert torch.equal(probe.run(model, 40).member_scores, result.member_scores)
    assert not torch.equal(probe.run(model, 41).member_scores, result.member_scores)


def test_maybe_run_schedule_includes_step_zero_and_skips_repeats():
    members, nonmembers = datasets()
    probe = CurvatureProbe(members, nonmembers, every=3, n_examples=4, n_vectors=1)
    model = model_()
    ran = [step for step in range(11) if probe.maybe_run(step, model) is not None]
    assert ran == [0, 3, 6, 9]
    assert [r["step"] for r in probe.history] == [0, 3, 6, 9]
    assert probe.maybe_run(6, model) is None  # already recorded
    assert probe.run(model, 6).step == 6  # run() always runs
    assert len(probe.history) == 5
    with pytest.raises(ValueError, match="step"):
        probe.maybe_run(-3, model)


@pytest.mark.parametrize("direction, sign", [("lower", -1), ("higher", 1)])
def test_auc_matches_sklearn_for_the_stated_direction(direction, sign):
    members, nonmembers = datasets(60, 50, seed=5)
    probe = CurvatureProbe(members, nonmembers, n_examples=40, direction=direction,
                           n_vectors=2)
    result = probe.run(model_(seed=6), 0)
    labels = np.r_[np.ones(40), np.zeros(40)]
    scores = torch.cat([result.member_scores, result.nonmember_scores]).numpy()
    assert result.auc == pytest.approx(roc_auc_score(labels, sign * scores), abs=1e-12)
    assert result.direction == direction and result.sign == sign

    got_labels, attack = result.labels_and_attack_scores()
    assert torch.equal(got_labels, torch.from_numpy(labels).long())
    assert np.allclose(attack.numpy(), sign * scores)
    # PR-curve inputs: in [0, 1] and a monotone map of the attack score.
    pr_labels, predictions = result.pr_curve_inputs()
    assert torch.equal(pr_labels, got_labels)
    assert predictions.min() == 0 and predictions.max() == 1
    assert average_precision_score(labels, predictions.numpy()) == pytest.approx(
        average_precision_score(labels, attack.numpy()))
    assert np.array_equal(np.argsort(predictions.numpy(), kind="stable"),
                          np.argsort(attack.numpy(), kind="stable"))


def test_opposite_directions_give_complementary_auc():
    members, nonmembers = datasets(seed=7)
    model = model_(seed=8)
    low = CurvatureProbe(members, nonmembers, n_examples=20, direction="lower").run(model, 5)
    high = CurvatureProbe(members, nonmembers, n_examples=20, direction="higher").run(model, 5)
    assert torch.equal(low.member_scores, high.member_scores)
    assert low.auc + high.auc == pytest.approx(1.0)


def test_to_dict_holds_scalars_only():
    members, nonmembers = datasets()
    result = CurvatureProbe(members, nonmembers, n_examples=6).run(model_(), 2)
    assert isinstance(result, ProbeResult)
    record = result.to_dict()
    assert all(isinstance(v, (int, float, str)) for v in record.values())
    assert record["n_members"] == 6 and record["step"] == 2 and record["estimator"] == "zo"


def test_state_dict_round_trip_continues_the_series():
    members, nonmembers = datasets()
    model = model_()
    probe = CurvatureProbe(members, nonmembers, every=2, n_examples=7, seed=9)
    for step in range(5):
        probe.maybe_run(step, model)
    state = probe.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    # A different n_examples draws a different sample; loading must restore the saved one.
    resumed = CurvatureProbe(members, nonmembers, every=2, n_examples=3, seed=9)
    resumed.load_state_dict(loaded)
    assert torch.equal(resumed.member_indices, probe.member_indices)
    assert torch.equal(resumed.nonmember_indices, probe.nonmember_indices)
    assert resumed.history == probe.history  # float64 round trip is exact
    assert resumed.maybe_run(4, model) is None  # the checkpoint's step is not redone
    continued, original = resumed.maybe_run(6, model), probe.maybe_run(6, model)
    assert torch.equal(continued.member_scores, original.member_scores)
    assert [r["step"] for r in resumed.history] == [0, 2, 4, 6]


def test_load_refuses_a_state_with_other_settings_or_indices():
    members, nonmembers = datasets()
    state = CurvatureProbe(members, nonmembers, n_examples=5, estimator="zo").state_dict()
    other = CurvatureProbe(members, nonmembers, n_examples=5, estimator="hutchinson")
    with pytest.raises(ValueError, match="estimator='zo'"):
        other.load_state_dict(state)
    small_members, small_nonmembers = datasets(3, 3)
    small = CurvatureProbe(small_members, small_nonmembers, n_examples=5)
    with pytest.raises(ValueError, match="same datasets"):
        small.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        small.load_state_dict({"member_indices": torch.arange(2)})


def test_probe_leaves_model_and_global_rng_alone():
    members, nonmembers = datasets()
    model = model_()
    model.train()
    rng = torch.get_rng_state()
    CurvatureProbe(members, nonmembers, n_examples=5, estimator="hutchinson").run(model, 0)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


class _TokenDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.tensor([1, 2, 3]), 0


def test_bad_datasets_and_settings_raise_clear_errors():
    members, nonmembers = datasets()
    with pytest.raises(TypeError, match="embedding"):
        CurvatureProbe(_TokenDataset(), nonmembers)
    with pytest.raises(ValueError, match="empty"):
        CurvatureProbe(TensorDataset(torch.zeros(0, 5), torch.zeros(0)), nonmembers)
    with pytest.raises(ValueError, match="every"):
        CurvatureProbe(members, nonmembers, every=0)
    with pytest.raises(ValueError, match="direction"):
        CurvatureProbe(members, nonmembers, direction="up")
    with pytest.raises(ValueError, match="unknown estimator"):
        CurvatureProbe(members, nonmembers, estimator="exact")
    with pytest.raises(ValueError, match="different shapes"):
        CurvatureProbe(members, TensorDataset(torch.zeros(4, 6), torch.zeros(4).long()))


def test_non_finite_scores_give_nan_auc_with_a_warning():
    members, nonmembers = datasets()
    model = model_()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    probe = CurvatureProbe(members, nonmembers, n_examples=4, n_vectors=1)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = probe.run(model, 0)
    assert np.isnan(result.auc)
