"""Mixed precision in a plain loop: torch.amp.GradScaler (issue 12 §0).

GNQ must be in the loss's true scale (the scaler's scale read, not guessed), rebuilt
gradients unscaled like the ones the scaler unscaled, and steps the scaler skips for inf
not counted. References: float64 torch.func per-example gradients.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from tests.reference import ce_sum, gnq_explicit, per_example_grads

LAM = 1e-2


def setup(policy_kwargs, *, device, n=24, seed=0, seq_len=None, hidden=16):
    """A guarded MLP on vectors (or, with ``seq_len``, on sequences of that length)."""
    g = torch.Generator().manual_seed(seed)
    positions = () if seq_len is None else (seq_len,)
    ds = TensorDataset(torch.randn(n, *positions, 5, generator=g),
                       torch.randint(0, 3, (n, *positions), generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)
    guard = gg.GradGuard(lam=LAM, **policy_kwargs)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8), grad_scaler=scaler)
    return guard, model, opt, loader, scaler


def record_applied(opt, model) -> list[torch.Tensor]:
    """The flat gradients the wrapped optimizer is handed at each step."""
    inner = opt.original_optimizer
    applied, original_step = [], inner.step

    def step(*args, **kwargs):
        applied.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]))
        return original_step(*args, **kwargs)

    inner.step = step
    return applied


def reference(model, x, y):
    G = per_example_grads(copy.deepcopy(model).double(), ce_sum, x.double(), y)
    return G, gnq_explicit(G, LAM)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_gnq_is_in_the_true_loss_scale(autocast, device):
    guard, model, opt, loader, scaler = setup({}, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        _, want = reference(model, x, y)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                            enabled=autocast is not None):
            out = model(x)
        scaler.scale(F.cross_entropy(out.float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        tol = 1e-4 if autocast is None else 3e-2  # bf16 activations: ~3 significant digits
        torch.testing.assert_close(guard.last_gnq, want, rtol=tol, atol=1e-6)
    assert guard.step == 3
    guard.close()


def test_drop_rebuilds_unscaled_gradients(device):
    guard, model, opt, loader, scaler = setup({"policy": "drop",
                                               "threshold": gg.Quantile(0.7)}, device=device)
    applied = record_applied(opt, model)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        G, _ = reference(model, x, y)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        w = guard.last_weights
        assert 0 < int((w == 0).sum()) < len(x)
        want = (w[:, None] * G).sum(0) / len(x)
        torch.testing.assert_close(applied[-1], want, rtol=1e-4, atol=1e-6)
    guard.close()


def test_steps_the_scaler_skips_are_not_counted(device):
    guard, model, opt, loader, scaler = setup({"policy": "monitor"}, device=device)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if i == 1:  # inf gradients: the scaler skips optimizer.step() and lowers its scale
            loss = loss + math.inf * model[2].bias.sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert guard.step == 2
    assert int(guard.ledger.steps_seen.sum()) == 16
    assert guard.ledger.steps_seen[8:16].sum() == 0  # the skipped batch's examples
    guard.close()


def test_drop_on_long_sequences_rebuilds_unscaled_gradients_from_kept_rows(device):
    """Sequences long enough that each layer keeps its per-example gradients instead of its
    captures (formed from the scaled output gradients as they arrive): GNQ in the true
    scale and the rebuilt, unscaled update of the kept examples, under a GradScaler."""
    guard, model, opt, loader, scaler = setup(
        {"policy": "drop", "threshold": gg.Quantile(0.7)}, device=device, n=16, seed=3,
        seq_len=30, hidden=4)
    applied = record_applied(opt, model)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        G, want = reference(model, x, y)
        opt.zero_grad()
        scaler.scale(ce_sum(model(x), y) / len(x)).backward()
        assert all(c.condensed is not None
                   for calls in guard.source.hooks._calls.values() for _, c in calls)
        scaler.step(opt)
        scaler.update()
        torch.testing.assert_close(guard.last_gnq, want, rtol=1e-4, atol=1e-6)
        w = guard.last_weights
        assert 0 < int((w == 0).sum()) < len(x)
        torch.testing.assert_close(applied[-1], (w[:, None] * G).sum(0) / len(x), rtol=1e-4,
                                   atol=1e-6)
    guard.close()
