"""Policies as pure functions, against explicit float64 P×P references; Quantile in the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.policies import budget_thresholds, effective_gnq, policy_weights
from gradguard.uniqueness.gnq import gnq_from_grads, gnq_from_gram
from tests.reference import ce_sum, gnq_explicit, per_example_grads

F64 = torch.float64
LAM = 1e-2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_grads(seed, B=9, P=6):
    """Per-example gradients of very different sizes (so thresholds bite unevenly)."""
    g = gen(seed)
    scale = torch.rand(B, 1, generator=g, dtype=F64).pow(3) * 10
    return torch.randn(B, P, generator=g, dtype=F64) * scale


def test_effective_gnq_is_gnq_of_the_reweighted_gradients():
    G = random_grads(0)
    w = torch.rand(G.shape[0], generator=gen(1), dtype=F64)
    w[2] = 0.0
    eff = effective_gnq(G @ G.T, w, LAM)
    torch.testing.assert_close(eff, gnq_explicit(w[:, None] * G, LAM), rtol=1e-8, atol=1e-12)
    assert eff[2] == 0


def test_monitor_returns_ones_and_the_raw_gnq():
    G = random_grads(2)
    gnq = gnq_from_grads(G, LAM)
    w, eff = policy_weights("monitor", G @ G.T, gnq, LAM)
    assert torch.equal(w, torch.ones_like(gnq))
    assert torch.equal(eff, gnq)


@pytest.mark.parametrize("seed", range(4))
def test_drop_is_one_shot_and_equals_the_batch_without_the_dropped(seed):
    G = random_grads(seed)
    gnq = gnq_explicit(G, LAM)
    tau = float(gnq.sort().values[4:6].mean())  # between two values: no tie at the boundary
    w, eff = policy_weights("drop", G @ G.T, gnq_from_grads(G, LAM), LAM, tau=tau)
    keep = gnq <= tau
    assert torch.equal(w, keep.to(F64))
    expected = torch.zeros_like(gnq)
    expected[keep] = gnq_explicit(G[keep], LAM)  # the batch as if they were never drawn
    torch.testing.assert_close(eff, expected, rtol=1e-8, atol=1e-12)
    # One-shot: dropping raises the kept examples' GNQ, possibly past τ, and that is kept.
    assert bool((eff[keep] >= gnq[keep] * (1 - 1e-9)).all())


def test_blocked_examples_are_removed_before_the_threshold():
    G = random_grads(5)
    gnq = gnq_from_grads(G, LAM)
    blocked = torch.zeros(len(gnq), dtype=torch.bool)
    blocked[[0, 4]] = True
    rest = ~blocked
    tau = float(gnq_explicit(G[rest], LAM).sort().values[3:5].mean())
    w, eff = policy_weights("drop", G @ G.T, gnq, LAM, tau=tau, blocked=blocked)
    without = gnq_explicit(G[rest], LAM)  # GNQ of the batch without the blocked ones
    expected_w = torch.zeros_like(gnq)
    expected_w[rest] = (without <= tau).to(F64)
    assert torch.equal(w, expected_w)
    for policy in ("monitor", "clip"):
        w, eff = policy_weights(policy, G @ G.T, gnq, LAM, tau=math.inf, blocked=blocked)
        assert torch.equal(w, rest.to(F64))
        torch.testing.assert_close(eff[rest], without, rtol=1e-8, atol=1e-12)
        assert bool((eff[blocked] == 0).all())


@pytest.mark.parametrize("seed", range(12))
def test_clip_keeps_every_effective_gnq_within_tau(seed):
    g = gen(100 + seed)
    B = int(torch.randint(2, 40, (1,), generator=g))
    P = int(torch.randint(1, 30, (1,), generator=g))
    G = random_grads(seed, B, P)
    gnq = gnq_from_grads(G, LAM)
    tau = float(gnq.quantile(0.3))
    w, eff = policy_weights("clip", G @ G.T, gnq, LAM, tau=tau)
    explicit = gnq_explicit(w[:, None] * G, LAM)
    torch.testing.assert_close(eff, explicit, rtol=1e-7, atol=1e-10)
    assert bool((explicit <= tau * (1 + 1e-7)).all())
    assert bool(((w > 0) & (w <= 1)).all())
    assert bool((w[gnq > tau * (1 + 1e-9)] < 1).all())  # every example over τ was scaled


def test_one_shot_clip_is_not_enough_and_the_fallback_guarantees_tau():
    G = random_grads(0, B=6, P=4)
    gnq = gnq_from_grads(G, LAM)
    tau = float(gnq.median())
    one_shot = torch.sqrt(tau / gnq).clamp(max=1.0)
    assert bool((gnq_explicit(one_shot[:, None] * G, LAM) > tau * 1.01).any())
    for max_iter in (0, 1, 2):  # too few passes: the common down-scaling must step in
        w, eff = policy_weights("clip", G @ G.T, gnq, LAM, tau=tau, max_iter=max_iter)
        assert bool((gnq_explicit(w[:, None] * G, LAM) <= tau * (1 + 1e-7)).all())
        assert bool((w > 0).all())


def test_per_example_tau_and_zero_tau():
    G = random_grads(7)
    gnq = gnq_from_grads(G, LAM)
    tau = torch.full_like(gnq, math.inf)
    tau[1] = 0.0
    tau[3] = float(gnq[3]) / 4
    w, eff = policy_weights("clip", G @ G.T, gnq, LAM, tau=tau)
    assert w[1] == 0 and eff[1] == 0
    assert eff[3] <= tau[3] * (1 + 1e-9)
    assert w[3] < 0.6


def test_budget_thresholds_spend_exactly_the_remaining_nats():
    remaining = torch.tensor([0.0, 0.3, 2.0, -1.0], dtype=F64)
    allowed = budget_thresholds(remaining)
    np.testing.assert_allclose(0.5 * np.log1p(allowed.numpy()),
                               np.clip(remaining.numpy(), 0, None), rtol=1e-12, atol=1e-15)


def test_bad_policy_name():
    K = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match=r"policy must be one of .*'clip'"):
        policy_weights("censor", K, gnq_from_gram(K, LAM), LAM)


def test_empty_batch():
    K = torch.zeros(0, 0, dtype=F64)
    for policy in ("monitor", "clip", "drop"):
        w, eff = policy_weights(policy, K, gnq_from_gram(K, LAM), LAM, tau=1.0)
        assert w.shape == eff.shape == (0,)


def test_quantile_threshold_is_calibrated_on_the_recent_window():
    g = gen(3)
    n = 24
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    ds = TensorDataset(x, y, torch.arange(n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    q, window = 0.7, 2
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(q, window=window))
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        data_loader=DataLoader(ds, batch_size=6, shuffle=True, generator=gen(4)))
    history = []
    for _ in range(2):
        for xb, yb, _ in loader:
            gnq = gnq_from_grads(per_example_grads(model, ce_sum, xb, yb), LAM)
            history.append(gnq)
            tau = np.quantile(torch.cat(history[-window:]).numpy(), q)  # linear interpolation
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            assert torch.equal(guard.last_weights, (gnq <= tau).to(F64))
    assert len(guard.state_dict()["window"]) == window
    guard.close()
