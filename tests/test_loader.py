"""Index tracking: the ledger counts exactly the examples of the batches the loop received.

The dataset returns each example's index as an extra tensor, so the test knows
independently which examples every batch held; the loop never tells the guard.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import gradguard as gg
from gradguard.engine import NonFiniteGradientError
from gradguard.loader import IndexTrackingLoader, track_indices
from gradguard.uniqueness.gnq import gnq_from_grads
from tests.reference import ce_sum, per_example_grads

F64 = torch.float64
logging.getLogger("opacus").setLevel(logging.ERROR)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_data(n=30, d=4, classes=3, seed=0):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n))


def make_model(seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def run_loop(loader, *, epochs=2, reduction="mean", policy="monitor", check_gnq=False,
              **guard_kwargs):
    """Train through a guarded loader; return the guard and the index batches received."""
    model = make_model()
    guard = gg.GradGuard(policy=policy, **guard_kwargs)
    model, opt, tracked = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, loss_reduction=reduction)
    received = []
    for _ in range(epochs):
        for x, y, idx in tracked:
            received.append(idx.clone())
            G = per_example_grads(model, ce_sum, x, y) if check_gnq and len(x) else None
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            opt.step()
            if G is not None:
                assert torch.equal(guard.last_indices, idx)
                torch.testing.assert_close(guard.last_gnq, gnq_from_grads(G, 1e-2),
                                           rtol=1e-9, atol=0)
    guard.close()
    return guard, received


def counts(received, n):
    c = torch.zeros(n, dtype=torch.long)
    for idx in received:
        c.index_add_(0, idx, torch.ones_like(idx))
    return c


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffle_drop_last_workers(drop_last, num_workers):
    ds = make_data(n=30)
    loader = DataLoader(ds, batch_size=8, shuffle=True, drop_last=drop_last,
                        num_workers=num_workers, generator=gen(7))
    guard, received = run_loop(loader, check_gnq=num_workers == 0)
    assert [len(r) for r in received] == ([8, 8, 8] if drop_last else [8, 8, 8, 6]) * 2
    assert torch.equal(guard.ledger.steps_seen, counts(received, len(ds)))
    # Examples cut by drop_last are not counted.
    assert int(guard.ledger.steps_seen.sum()) == (48 if drop_last else 60)
    assert guard.step == len(received)


def test_tracked_loader_yields_exactly_what_the_original_yields():
    ds = make_data(n=30)
    original = DataLoader(ds, batch_size=7, shuffle=True, generator=gen(3))
    plain = [b for _ in range(2) for b in original]
    tracked = track_indices(DataLoader(ds, batch_size=7, shuffle=True, generator=gen(3)))
    assert isinstance(tracked, IndexTrackingLoader)
    assert len(tracked) == 5
    got = [b for _ in range(2) for b in tracked]
    assert len(got) == len(plain)
    for a, b in zip(plain, got, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # What it recorded is what the batches hold.
    tracked.consumed.clear()
    for *_, idx in tracked:
        assert tracked.consumed[-1] == idx.tolist()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_poisson_loader_with_empty_batches(reduction):
    """Opacus's DPDataLoader: variable sizes and (forced by a tiny rate) empty batches.

    An empty batch's mean loss is NaN (0/0), but its parameter gradients are exact zeros,
    so the step is a harmless no-op for the ledger under either reduction.
    """
    ds = make_data(n=30)
    loader = DPDataLoader(ds, sample_rate=0.04, generator=gen(11))
    guard, received = run_loop(loader, epochs=3, reduction=reduction, check_gnq=True)
    sizes = [len(r) for r in received]
    assert sizes.count(0) >= 10 and max(sizes) >= 2  # empties and varying sizes
    assert torch.equal(guard.ledger.steps_seen, counts(received, len(ds)))
    assert guard.step == len(received)  # empty batches are real (no-op) steps
    assert guard.skipped_nonfinite == 0
    assert guard.optimizer.expected_batch_size == 1  # round(0.04 · 30)


def test_poisson_loader_with_drop_policy_and_empty_batches():
    ds = make_data(n=30)
    loader = DPDataLoader(ds, sample_rate=0.05, generator=gen(12))
    guard, received = run_loop(loader, epochs=2, reduction="sum", policy="drop",
                               threshold=2.0, check_gnq=True)
    assert [len(r) for r in received].count(0) >= 1
    assert torch.equal(guard.ledger.steps_seen, counts(received, len(ds)))


def nan_on_empty_loss(model, x, y):
    """Mean loss plus an L2 term scaled by 1/B: Inf gradients when the batch is empty."""
    l2 = sum(p.pow(2).sum() for p in model.parameters())
    return F.cross_entropy(model(x), y) + 1e-3 * l2 / x.shape[0]


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_empty_batch_with_nonfinite_gradients(on_nonfinite):
    ds = make_data(n=30)
    loader = DPDataLoader(ds, sample_rate=0.04, generator=gen(11))
    model = make_model()
    guard = gg.GradGuard(on_nonfinite=on_nonfinite)
    model, opt, tracked = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader)
    received, empties = [], 0
    for x, y, idx in tracked:
        received.append(idx)
        opt.zero_grad()
        nan_on_empty_loss(model, x, y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        if len(x) == 0 and on_nonfinite == "raise":
            with pytest.raises(NonFiniteGradientError, match=r"batch was empty.*'sum'"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            break
        opt.step()
        if len(x) == 0:
            empties += 1
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if on_nonfinite == "skip":
        assert empties >= 10 and guard.skipped_nonfinite == empties
        assert guard.step == len(received) - empties
    assert torch.equal(guard.ledger.steps_seen, counts(received, len(ds)))
    guard.close()


# --------------------------------------------------------------------- misuse
def test_iterating_the_original_loader_is_caught():
    ds = make_data(n=16)
    original = DataLoader(ds, batch_size=4)
    model = make_model()
    guard = gg.GradGuard()
    model, opt, tracked = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=original)
    x, y, _ = next(iter(original))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"Iterate the loader returned by make_guarded.*"
                                           r"set_batch_indices"):
        opt.step()
    guard.close()


def test_set_batch_indices_without_a_loader():
    ds = make_data(n=16)
    model = make_model()
    guard = gg.GradGuard()
    model, opt, none = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert none is None
    x, y, idx = ds[[2, 9, 5]]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"pass data_loader=.*set_batch_indices"):
        opt.step()
    guard.set_batch_indices([2, 9])
    with pytest.raises(RuntimeError, match=r"got 2 indices for a step with 3 examples"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    guard.set_batch_indices(idx)
    opt.step()
    assert guard.ledger.steps_seen[[2, 9, 5]].tolist() == [1, 1, 1]
    assert int(guard.ledger.steps_seen.sum()) == 3
    guard.close()


def test_iterable_dataset_is_refused_with_the_fix():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.zeros(4), 0) for _ in range(3))

    with pytest.raises(TypeError, match=r"map-style dataset.*set_batch_indices"):
        track_indices(DataLoader(Stream(), batch_size=2))

