"""Attack scores: loss, curvature and LiRA, against direct computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from gradguard.audit.attacks import (
    curvature_attack,
    curvature_attack_scores,
    lira_offline,
    lira_online,
    logit_confidence,
    logit_confidence_from_logits,
    loss_attack_scores,
    per_example_loss,
    shadow_masks,
)
from gradguard.audit.metrics import empirical_epsilon, mia_metrics, roc_auc


def _seeded_model(seed: int, *modules_factory) -> nn.Module:
    # nn.Linear draws its init from the global RNG; fork it so tests leave it as found.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*(factory() for factory in modules_factory))


def _mlp_with_dropout(seed: int = 0) -> nn.Module:
    return _seeded_model(
        seed,
        lambda: nn.Linear(6, 16),
        nn.Tanh,
        lambda: nn.Dropout(0.5),
        lambda: nn.Linear(16, 4),
    )


def _data(n: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------------------
# Loss attack
# ---------------------------------------------------------------------------------------


def test_per_example_loss_matches_direct_eval_and_restores_modes():
    model = _mlp_with_dropout()
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    x, y = _data()
    losses = per_example_loss(model, x, y, batch_size=8)  # several uneven batches
    assert model.training and not model[2].training and model[0].training
    assert not losses.requires_grad
    with torch.no_grad():
        model.eval()
        expected = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(losses, expected)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(loss_attack_scores(model, x, y, batch_size=5), -expected)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_example_loss_with_reducing_loss_fn(reduction):
    model = _mlp_with_dropout()
    x, y = _data()

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction=reduction)

    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x), y, reduction="none")
    torch.testing.assert_close(per_example_loss(model, x, y, loss_fn=loss_fn), expected)


def test_per_example_loss_falls_back_when_vmap_cannot_run_the_loss():
    model = _mlp_with_dropout()
    x, y = _data(9)

    def loss_fn(outputs, targets):
        # .item() is not vmappable: exercises the per-example loop.
        return F.cross_entropy(outputs, targets, reduction="sum") * float(outputs.sum().item() != 0)

    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x), y, reduction="none")
    torch.testing.assert_close(per_example_loss(model, x, y, loss_fn=loss_fn), expected)


def test_per_example_loss_rejects_bad_input():
    model = _mlp_with_dropout()
    x, y = _data()
    with pytest.raises(ValueError, match="first"):
        per_example_loss(model, x, y[:-1])
    with pytest.raises(TypeError, match="tensors"):
        per_example_loss(model, x.numpy(), y)
    with pytest.raises(ValueError, match="batch_size"):
        per_example_loss(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="reduction='none'"):
        per_example_loss(model, x, y, loss_fn=lambda o, t: o)


# ---------------------------------------------------------------------------------------
# Curvature attack
# ---------------------------------------------------------------------------------------


def test_curvature_attack_scores_direction():
    curvature = torch.tensor([0.1, 2.0, 0.5])
    torch.testing.assert_close(curvature_attack_scores(curvature), -curvature)
    torch.testing.assert_close(curvature_attack_scores(curvature, direction="higher"), curvature)
    # Flat (low-curvature) examples must rank as members by default.
    assert roc_auc(curvature_attack_scores([0.1, 0.2]), curvature_attack_scores([1.0, 2.0])) == 1.0
    with pytest.raises(ValueError, match="direction"):
        curvature_attack_scores(curvature, direction="up")


def test_curvature_attack_uses_input_curvature():
    estimators = pytest.importorskip("gradguard.curvature.estimators")
    # float64: in float32 the zo differences at h=1e-3 are rounding noise for this tiny
    # model, and rounding changes with the batch shape.
    model = _seeded_model(1, lambda: nn.Linear(6, 8), nn.Softplus, lambda: nn.Linear(8, 4))
    model.double()
    x, y = _data(10)
    x = x.double()
    expected = estimators.input_curvature(
        model, x, y, estimator="zo", n_vectors=4, h=1e-3, generator=torch.Generator().manual_seed(3)
    )
    for batch_size in (None, 3):
        scores = curvature_attack(
            model,
            x,
            y,
            estimator="zo",
            n_vectors=4,
            h=1e-3,
            generator=torch.Generator().manual_seed(3),
            batch_size=batch_size,
        )
        torch.testing.assert_close(scores, -expected)


# ---------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------


def test_logit_confidence_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 7, generator=g)
    targets = torch.randint(0, 7, (50,), generator=g)
    p = torch.softmax(logits.double(), dim=1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.log(p) - torch.log1p(-p)
    got = logit_confidence_from_logits(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_logit_confidence_is_finite_when_probability_rounds_to_one():
    # p_y/(1 − p_y) = e^z / (C − 1) exactly when the other C − 1 logits are 0.
    for z in (30.0, 80.0, 500.0):
        logits = torch.zeros(2, 5)
        logits[:, 1] = z
        got = logit_confidence_from_logits(logits, torch.tensor([1, 1]))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(
            got.double(), torch.full((2,), z - math.log(4.0), dtype=torch.float64)
        )


def test_logit_confidence_of_model_matches_logits_and_validates():
    model = _mlp_with_dropout()
    x, y = _data()
    with torch.no_grad():
        expected = logit_confidence_from_logits(model.eval()(x), y)
    model.train()
    torch.testing.assert_close(logit_confidence(model, x, y, batch_size=6), expected)
    assert model.training
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        logit_confidence_from_logits(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="C >= 2"):
        logit_confidence_from_logits(torch.zeros(2, 1), torch.tensor([0, 0]))


@pytest.mark.parametrize("n_shadows", [2, 8, 16, 7])
def test_shadow_masks_balance_and_determinism(n_shadows):
    state = torch.get_rng_state()
    masks = shadow_masks(1000, n_shadows, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert masks.shape == (n_shadows, 1000) and masks.dtype == torch.bool
    per_example = masks.sum(0)
    if n_shadows % 2 == 0:
        assert (per_example == n_shadows // 2).all()
    else:
        assert set(per_example.unique().tolist()) == {n_shadows // 2, n_shadows // 2 + 1}
    # Each shadow trains on about half: Binomial(1000, 1/2) has sd ~16.
    assert ((masks.sum(1) - 500).abs() < 80).all()
    assert torch.equal(masks, shadow_masks(1000, n_shadows, generator=5))
    assert not torch.equal(masks, shadow_masks(1000, n_shadows, generator=6))


def test_shadow_masks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_shadows"):
        shadow_masks(10, 0, generator=0)
    with pytest.raises(TypeError, match="generator"):
        shadow_masks(10, 4, generator=None)


def _random_lira_inputs(n_shadows: int, n_examples: int, seed: int):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_shadows, n_examples)) < 0.5
    confs = (
        rng.normal(0.0, 1.0, (n_shadows, n_examples)) + 2.0 * mask + rng.normal(0, 2, n_examples)
    )
    target = rng.normal(1.0, 2.0, n_examples)
    return target, confs, mask


def _numpy_fits(confs, mask):
    """Per-example means, ddof=1 variances and the pooled within-example variance, by loops."""
    means, variances, squares, dof = [], [], 0.0, 0
    for n in range(confs.shape[1]):
        values = confs[mask[:, n], n]
        means.append(values.mean() if values.size else np.nan)
        variances.append(values.var(ddof=1) if values.size >= 2 else np.nan)
        if values.size:
            squares += ((values - values.mean()) ** 2).sum()
            dof += values.size - 1
    return np.array(means), np.array(variances), squares / dof


def test_lira_online_per_example_matches_scipy():
    target, confs, mask = _random_lira_inputs(12, 40, seed=0)
    mean_in, var_in, pooled_in = _numpy_fits(confs, mask)
    mean_out, var_out, pooled_out = _numpy_fits(confs, ~mask)
    var_in = np.where(np.isnan(var_in), pooled_in, var_in)
    var_out = np.where(np.isnan(var_out), pooled_out, var_out)
    assert not np.isnan(mean_in).any() and not np.isnan(mean_out).any()
    expected = norm.logpdf(target, mean_in, np.sqrt(var_in)) - norm.logpdf(
        target, mean_out, np.sqrt(var_out)
    )
    got = lira_online(
        torch.tensor(target), torch.tensor(confs), torch.tensor(mask), variance="per_example"
    )
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_lira_online_global_variance_and_auto():
    target, confs, mask = _random_lira_inputs(10, 30, seed=1)
    mean_in, _, pooled_in = _numpy_fits(confs, mask)
    mean_out, _, pooled_out = _numpy_fits(confs, ~mask)
    expected = norm.logpdf(target, mean_in, math.sqrt(pooled_in)) - norm.logpdf(
        target, mean_out, math.sqrt(pooled_out)
    )
    got = lira_online(target, confs, mask, variance="global")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    # The paper's rule: global variance below 64 shadow models, per-example from 64 on.
    torch.testing.assert_close(lira_online(target, confs, mask), got)
    target, confs, mask = _random_lira_inputs(64, 20, seed=2)
    torch.testing.assert_close(
        lira_online(target, confs, mask), lira_online(target, confs, mask, variance="per_example")
    )


def test_lira_online_fallback_for_example_without_in_shadows():
    target, confs, mask = _random_lira_inputs(8, 25, seed=3)
    mask[:, 0] = False  # example 0: no in shadow
    mask[:, 1] = True  # example 1: no out shadow
    mean_in, _, pooled_in = _numpy_fits(confs, mask)
    mean_out, _, pooled_out = _numpy_fits(confs, ~mask)
    both = ~np.isnan(mean_in) & ~np.isnan(mean_out)
    shift = (mean_in[both] - mean_out[both]).mean()
    mean_in[0] = mean_out[0] + shift
    mean_out[1] = mean_in[1] - shift
    expected = norm.logpdf(target, mean_in, math.sqrt(pooled_in)) - norm.logpdf(
        target, mean_out, math.sqrt(pooled_out)
    )
    got = lira_online(target, confs, mask, variance="global")
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_lira_offline_matches_scipy_tail():
    target, confs, mask = _random_lira_inputs(16, 30, seed=4)
    mean_out, var_out, pooled_out = _numpy_fits(confs, ~mask)
    var_out = np.where(np.isnan(var_out), pooled_out, var_out)
    expected = -norm.logsf(target, mean_out, np.sqrt(var_out))
    got = lira_offline(target, confs, in_mask=mask, variance="per_example")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    # Without a mask every shadow counts as "out".
    all_mean, _, all_pooled = _numpy_fits(confs, np.ones_like(mask))
    expected_all = -norm.logsf(target, all_mean, math.sqrt(all_pooled))
    np.testing.assert_allclose(lira_offline(target, confs).numpy(), expected_all, rtol=1e-10)


def test_lira_offline_is_accurate_far_in_the_tail():
    confs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.5, -0.5]], dtype=torch.float64)
    target = torch.tensor([60.0, -60.0])
    got = lira_offline(target, confs, variance="global")
    std = math.sqrt(((confs - confs.mean(0)) ** 2).sum().item() / 6)
    expected = -norm.logsf(target.numpy(), confs.mean(0).numpy(), std)
    assert np.isfinite(got.numpy()).all() and got[0] > 1000
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_lira_rejects_bad_input():
    target, confs, mask = _random_lira_inputs(8, 10, seed=5)
    with pytest.raises(ValueError, match="shape"):
        lira_online(target, confs, mask[:, :5])
    with pytest.raises(TypeError, match="boolean"):
        lira_online(target, confs, mask.astype(float) * 0.5)
    with pytest.raises(ValueError, match=r"\[S, N\]"):
        lira_online(target[:5], confs, mask)
    bad = confs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lira_online(target, bad, mask)
    with pytest.raises(ValueError, match="variance"):
        lira_online(target, confs, mask, variance="median")
    # Two shadows, one in and one out per example: no spread can be estimated.
    two = shadow_masks(10, 2, generator=0)
    with pytest.raises(ValueError, match="more shadow models"):
        lira_online(target, confs[:2], two)


# ---------------------------------------------------------------------------------------
# LiRA end to end with real shadow models
# ---------------------------------------------------------------------------------------


def _train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 150) -> nn.Module:
    model = _seeded_model(seed, lambda: nn.Linear(64, 128), nn.ReLU, lambda: nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # full batch, no regularisation: memorises its training set
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@pytest.fixture
def one_thread():
    # Tiny matmuls gain nothing from threads and stall badly when the cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lira_online_detects_an_overfit_model_and_not_an_unrelated_one(one_thread):
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    features = torch.tensor(features / 16.0, dtype=torch.float32)
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)
    n = 400
    population, outside = order[:n], order[n : 2 * n]
    x, y = features[population], labels[population].clone()
    # 10% wrong labels: only a model that trained on them can be confident about them.
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = (y[noisy] + torch.randint(1, 10, (int(noisy.sum()),), generator=g)) % 10

    masks = shadow_masks(n, 8, generator=g)
    shadow_confs = torch.stack(
        [
            logit_confidence(_train_mlp(x[keep], y[keep], seed), x, y)
            for seed, keep in enumerate(masks)
        ]
    )
    target_members = torch.randperm(n, generator=g) < n // 2
    target = _train_mlp(x[target_members], y[target_members], seed=100)
    scores = lira_online(logit_confidence(target, x, y), shadow_confs, masks)
    report = mia_metrics(scores[target_members], scores[~target_members])
    assert report["auc"] > 0.65
    assert report["tpr_at_1pct_fpr"] > 0.05  # chance is 0.01

    # A model trained on other data: membership labels are arbitrary, so nothing to find.
    unrelated = _train_mlp(features[outside], labels[outside], seed=200)
    null_scores = lira_online(logit_confidence(unrelated, x, y), shadow_confs, masks)
    members, nonmembers = null_scores[target_members], null_scores[~target_members]
    assert abs(roc_auc(members, nonmembers) - 0.5) < 0.1  # ~3.4 sd of the null AUC
    assert empirical_epsilon(members, nonmembers).epsilon == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attacks_run_on_cuda_and_match_cpu():
    model = _mlp_with_dropout()
    x, y = _data()
    cpu_loss = per_example_loss(model, x, y)
    cpu_conf = logit_confidence(model, x, y)
    model.cuda()
    cuda_loss = per_example_loss(model, x, y)  # CPU data, CUDA model: batches move over
    assert cuda_loss.device.type == "cuda"
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-5)
    cuda_conf = logit_confidence(model, x.cuda(), y.cuda())
    torch.testing.assert_close(cuda_conf.cpu(), cpu_conf, rtol=1e-4, atol=1e-5)

    masks = shadow_masks(40, 8, generator=torch.Generator("cuda").manual_seed(0))
    assert masks.device.type == "cuda" and (masks.sum(0) == 4).all()
    target, confs, mask = _random_lira_inputs(8, 40, seed=6)
    for fn, args in ((lira_online, (confs, mask)), (lira_offline, (confs,))):
        on_cpu = fn(torch.tensor(target), *(torch.as_tensor(a) for a in args))
        on_cuda = fn(torch.tensor(target).cuda(), *(torch.as_tensor(a).cuda() for a in args))
        assert on_cuda.device.type == "cuda"
        torch.testing.assert_close(on_cuda.cpu(), on_cpu)
