"""GuardedOptimizer: the DPOptimizer-like surface, and composition with Opacus.

References: torch.func per-example gradients of the raw (unclipped) per-example losses,
plain Opacus runs with the same seeds, and unguarded PyTorch loops.
"""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.optimizer import GuardedOptimizer
from gradguard.uniqueness.gnq import gnq_from_grads
from tests.reference import ce_sum, per_example_grads

F64 = torch.float64
LAM = 1e-2

# Opacus warns about secure_mode and about its own empty batches; neither is under test.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
logging.getLogger("opacus").setLevel(logging.ERROR)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_data(n=24, d=4, classes=3, seed=0, dtype=F64):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n))


def make_mlp(seed=1, d=4, hidden=5, classes=3, dtype=F64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train_epoch(model, opt, loader, *, sched=None):
    for x, y, _ in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


# --------------------------------------------------------------------- optimizer surface
def guarded(model, opt, ds, batch_size=6, **guard_kwargs):
    guard = gg.GradGuard(**guard_kwargs)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen(4))
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    return guard, model, gopt, loader


def test_surface_is_shared_with_the_wrapped_optimizer():
    ds = make_data()
    model = make_mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    guard, model, gopt, loader = guarded(model, inner, ds)
    assert isinstance(gopt, GuardedOptimizer) and isinstance(gopt, torch.optim.Optimizer)
    assert gopt.original_optimizer is inner
    assert gopt.param_groups is inner.param_groups
    assert gopt.state is inner.state
    assert gopt.defaults is inner.defaults
    assert gopt.expected_batch_size == 6
    gopt.param_groups[0]["lr"] = 0.02  # an edit through the wrapper is the wrapped one's
    assert inner.param_groups[0]["lr"] == 0.02
    extra = nn.Parameter(torch.zeros(2, dtype=F64))
    gopt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra
    assert gopt.params[-1] is extra
    train_epoch(model, gopt, loader)
    assert len(inner.state) == 4  # Adam state for the four model parameters
    for set_to_none in (True, False):
        x, y, _ = ds[:6]
        F.cross_entropy(model(x), y).backward()
        gopt.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            assert (p.grad is None) if set_to_none else bool((p.grad == 0).all())
    guard.close()


def test_step_with_closure_returns_loss_and_is_measured():
    ds = make_data(n=12)
    model = make_mlp()
    guard, model, gopt, _ = guarded(model, torch.optim.SGD(model.parameters(), lr=0.1), ds)
    ref = make_mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y, idx = ds[[4, 7, 1]]
    calls = []

    def closure():
        calls.append(1)
        gopt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    guard.set_batch_indices(idx)
    G = per_example_grads(model, ce_sum, x, y)
    loss = gopt.step(closure)
    assert calls == [1]
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    ref_opt.step()
    assert torch.equal(loss.detach(), ref_loss.detach())
    assert params_equal(model, ref)
    torch.testing.assert_close(guard.last_gnq, gnq_from_grads(G, LAM), rtol=1e-9, atol=0)
    assert guard.ledger.steps_seen[[4, 7, 1]].tolist() == [1, 1, 1]
    assert int(guard.ledger.steps_seen.sum()) == 3
    guard.close()


def test_lr_scheduler_on_guarded_optimizer_matches_unguarded():
    ds = make_data()

    def run(guard_it):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
        loader = DataLoader(ds, batch_size=6, shuffle=True, generator=gen(4))
        guard = None
        if guard_it:
            guard = gg.GradGuard(policy="monitor")
            model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                    data_loader=loader)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        lrs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            for _ in range(2):
                for x, y, _ in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    sched.step()
                    lrs.append(opt.param_groups[0]["lr"])
        if guard is not None:
            assert opt.original_optimizer.param_groups[0]["lr"] == lrs[-1]
            guard.close()
        return model, lrs

    plain, plain_lrs = run(False)
    wrapped, wrapped_lrs = run(True)
    assert wrapped_lrs == plain_lrs == [0.4] * 2 + [0.2] * 3 + [0.1] * 3
    assert params_equal(plain, wrapped)


def test_state_dict_round_trip():
    ds = make_data()
    model = make_mlp()
    guard, model, gopt, loader = guarded(model, torch.optim.Adam(model.parameters(), lr=0.05),
                                         ds, policy="clip", threshold=5.0)
    train_epoch(model, gopt, loader)
    assert gopt.state_dict().keys() == {"state", "param_groups"}
    # Through bytes, as a checkpoint goes (in memory, the state tensors would be shared).
    buffer = io.BytesIO()
    torch.save(gopt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    twin = make_mlp()
    twin.load_state_dict(model.state_dict())
    guard2, twin, gopt2, _ = guarded(twin, torch.optim.Adam(twin.parameters(), lr=0.05), ds,
                                     policy="clip", threshold=5.0)
    gopt2.load_state_dict(sd)
    for k, v in gopt.state.items():
        k2 = dict(zip(model.parameters(), twin.parameters()))[k]
        for name in v:
            assert torch.equal(v[name], gopt2.state[k2][name]), name
    # Both continue identically on the same batch.
    x, y, idx = ds[:6]
    for g, m, o in ((guard, model, gopt), (guard2, twin, gopt2)):
        g.set_batch_indices(idx)
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert params_equal(model, twin)
    guard.close()
    guard2.close()


# --------------------------------------------------------------------- manual accumulation
@pytest.mark.parametrize("policy, kwargs", [("monitor", {}), ("drop", {"threshold": 3.0})])
def test_manual_accumulation_measures_the_union_of_micro_batches(policy, kwargs):
    """Two backward passes before one step: the logical batch is both micro-batches."""
    ds = make_data(n=16)
    model = make_mlp()
    guard = gg.GradGuard(policy=policy, **kwargs)
    model, gopt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(ds, batch_size=4, shuffle=True, generator=gen(8)))
    seen = []
    batches = iter(loader)
    for _ in range(2):
        micro = [next(batches), next(batches)]
        x = torch.cat([m[0] for m in micro])
        y = torch.cat([m[1] for m in micro])
        G = per_example_grads(model, ce_sum, x, y)
        gnq = gnq_from_grads(G, LAM)
        w = torch.ones_like(gnq) if policy == "monitor" else (gnq <= 3.0).to(F64)
        # Plain accumulation of two mean losses: Σ_micro mean = Σ g / 4 (the loader's size).
        expected = [p.detach() - 0.2 * g for p, g in zip(
            model.parameters(), unflatten((w[:, None] * G).sum(0) / 4, model))]
        gopt.zero_grad()
        for xb, yb, _ in micro:
            F.cross_entropy(model(xb), yb).backward()
        gopt.step()
        seen.extend(i for m in micro for i in m[2].tolist())
        torch.testing.assert_close(guard.last_gnq, gnq, rtol=1e-9, atol=0)
        assert guard.last_indices.tolist() == [i for m in micro for i in m[2].tolist()]
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    assert guard.ledger.steps_seen.tolist() == [seen.count(i) for i in range(len(ds))]
    guard.close()


def unflatten(flat, model):
    out, start = [], 0
    for p in model.parameters():
        out.append(flat[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out


@pytest.mark.parametrize("policy, kwargs", [("monitor", {}), ("drop", {"threshold": 3.0})])
def test_virtual_steps_without_opacus(policy, kwargs):
    """BatchMemoryManager's skip signals on a plain GuardedOptimizer: one logical batch."""
    ds = make_data(n=16)
    model = make_mlp()
    ref = make_mlp()
    guard = gg.GradGuard(policy=policy, **kwargs)
    model, gopt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(ds, batch_size=8, shuffle=True, generator=gen(8)))
    micro_idx, physical = [], []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3,
                            optimizer=gopt) as micro_loader:
        for x, y, idx in micro_loader:
            physical.append(len(x))
            micro_idx.append(idx.tolist())
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            gopt.step()
            if sum(physical) % 8:  # inside a logical batch: nothing moves
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    logical = [sum(micro_idx[:3], []), sum(micro_idx[3:], [])]
    assert physical == [3, 3, 2, 3, 3, 2]
    assert guard.step == 2
    # Replay the two logical batches on the reference model.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for step, idx in enumerate(logical):
        x, y, _ = ds[idx]
        G = per_example_grads(ref, ce_sum, x, y)
        gnq = gnq_from_grads(G, LAM)
        w = torch.ones_like(gnq) if policy == "monitor" else (gnq <= 3.0).to(F64)
        ref_opt.zero_grad()
        for p, g in zip(ref.parameters(), unflatten((w[:, None] * G).sum(0) / 8, ref)):
            p.grad = g.clone()
        ref_opt.step()
        if step == 1:
            torch.testing.assert_close(guard.last_gnq, gnq, rtol=1e-9, atol=0)
            assert guard.last_indices.tolist() == idx
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert guard.ledger.steps_seen.tolist() == [1] * len(ds)
    guard.close()


# --------------------------------------------------------------------- Opacus
def private(ds, *, batch_size=6, noise=1.0, seed=0, reduction="mean", dtype=F64):
    model = make_mlp(dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loader = DataLoader(ds, batch_size=batch_size, generator=gen(100 + seed))
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=1.0, grad_sample_mode="hooks", loss_reduction=reduction,
        noise_generator=gen(200 + seed))
    return engine, model, opt, loader


def raw_grads(grad_sample_module, x, y):
    """torch.func per-example gradients at the parameters of the module Opacus wraps.

    Computed on a hook-free copy: Opacus's backward hooks do not compose with torch.func.
    """
    copy = make_mlp(dtype=next(grad_sample_module.parameters()).dtype)
    copy.load_state_dict(grad_sample_module._module.state_dict())
    return per_example_grads(copy, ce_sum, x, y)


@pytest.mark.parametrize("bmm", [False, True], ids=["plain", "batch_memory_manager"])
def test_opacus_monitor_equals_plain_opacus(bmm):
    """noise_multiplier=1 with seeded noise and Poisson generators: bit-identical runs.

    GNQ is that of the released update of the *logical* batch (per-example gradients
    clipped to C = 1, noise σ²C² = 1 in the ridge); the raw GNQ (before clipping and noise)
    is kept beside it; the ledger counts exactly the examples of each logical batch.
    """
    ds = make_data(n=30)

    def run(guard_it):
        engine, model, opt, loader = private(ds)
        guard = None
        if guard_it:
            guard = gg.GradGuard(policy="monitor")
            model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                    data_loader=loader)
        logical_idx, logical_gnq, counts = [], [], torch.zeros(len(ds), dtype=torch.long)
        checked = []
        current = []
        for _ in range(2):
            if bmm:
                ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                                         optimizer=opt)
            else:
                ctx = _Null(loader)
            with ctx as batches:
                for x, y, idx in batches:
                    # BatchSplittingSampler queued this micro-batch's skip flag already.
                    will_step = not (bmm and opt._step_skip_queue[0])
                    current.append((x, y, idx))
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    if will_step:
                        xs = torch.cat([c[0] for c in current])
                        ys = torch.cat([c[1] for c in current])
                        ids = torch.cat([c[2] for c in current])
                        G = raw_grads(model, xs, ys) if len(xs) else None
                        logical_idx.append(ids)
                        if G is None:
                            logical_gnq.append(None)
                        else:
                            clip = (1.0 / (G.norm(dim=1) + 1e-6)).clamp(max=1.0)
                            logical_gnq.append((gnq_from_grads(clip[:, None] * G, LAM + 1.0),
                                                gnq_from_grads(G, LAM)))
                        counts.index_add_(0, ids, torch.ones_like(ids))
                        current = []
                    opt.step()
                    if guard_it and will_step:
                        assert torch.equal(guard.last_indices, logical_idx[-1]) or (
                            len(logical_idx[-1]) == 0)
                        if logical_gnq[-1] is not None:
                            released, raw = logical_gnq[-1]
                            torch.testing.assert_close(guard.last_gnq, released,
                                                       rtol=1e-9, atol=0)
                            torch.testing.assert_close(guard.last_gnq_raw, raw,
                                                       rtol=1e-9, atol=0)
                            checked.append(len(raw))
        if guard is not None:
            assert torch.equal(guard.ledger.steps_seen, counts)
            # Every non-empty logical batch was compared, some spanning several micro-batches.
            assert len(checked) == sum(1 for i in logical_idx if len(i)) > 5
            assert max(checked) > 2
            guard.close()
        return model, engine.get_epsilon(1e-5), [len(i) for i in logical_idx]

    plain, eps_plain, sizes_plain = run(False)
    wrapped, eps_wrapped, sizes_wrapped = run(True)
    assert sizes_plain == sizes_wrapped and len(set(sizes_plain)) > 1  # Poisson: sizes vary
    assert params_equal(plain, wrapped)
    assert eps_plain == eps_wrapped > 0


class _Null:
    def __init__(self, loader):
        self.loader = loader

    def __enter__(self):
        return self.loader

    def __exit__(self, *exc):
        return False


def test_opacus_drop_zeroes_rows_before_clipping():
    ds = make_data(n=30)
    engine, model, opt, loader = private(ds, noise=0.0)
    guard = gg.GradGuard(policy="drop", threshold=5.0)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    seen = []
    original_clip = DPOptimizer.clip_and_accumulate

    def spy(self):
        seen.append(torch.cat([g.reshape(len(g), -1) for g in self.grad_samples], 1).clone())
        return original_clip(self)

    acted = 0
    try:
        DPOptimizer.clip_and_accumulate = spy
        for x, y, _ in loader:
            if len(x) == 0:
                continue
            G = raw_grads(model, x, y)
            w = (gnq_from_grads(G, LAM) <= 5.0).to(F64)
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
            torch.testing.assert_close(seen[-1], w[:, None] * G, rtol=1e-10, atol=1e-12)
            assert torch.equal(guard.last_weights, w)
            acted += int((w == 0).sum())
    finally:
        DPOptimizer.clip_and_accumulate = original_clip
    assert acted > 0
    guard.close()


def test_opacus_bmm_with_a_policy_is_refused():
    ds = make_data(n=30)
    engine, model, opt, loader = private(ds, batch_size=10)
    guard = gg.GradGuard(policy="drop", threshold=5.0)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    refused = pytest.raises(NotImplementedError, match="policy='monitor' with BatchMemoryManager")
    with refused, BatchMemoryManager(data_loader=loader, max_physical_batch_size=2,
                                     optimizer=gopt) as batches:
        for x, y, _ in batches:
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
    guard.close()


def test_opacus_loss_reduction_must_agree():
    ds = make_data()
    engine, model, opt, loader = private(ds, reduction="sum")
    with pytest.raises(ValueError, match=r"loss_reduction='mean' contradicts.*'sum'"):
        gg.GradGuard().make_guarded(module=model, optimizer=opt, data_loader=loader)


def test_opacus_bmm_nonfinite_skip_keeps_the_logical_batches_in_step():
    """A logical batch with a NaN is skipped whole; the next one is one clipped DP step."""
    ds = make_data(n=30)
    ds.tensors[0][7, 1] = float("nan")
    engine, model, opt, loader = private(ds, batch_size=10, noise=0.0)
    guard = gg.GradGuard(on_nonfinite="skip")
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    logical, moved = [], []
    skipped_before, checked_after_skip = False, 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3,
                            optimizer=gopt) as batches:
        for x, y, _ in batches:
            last = not gopt._step_skip_queue[0]
            if not logical or logical[-1][3]:
                logical.append([[], [], [p.detach().clone() for p in model.parameters()], False])
            logical[-1][0].append(x)
            logical[-1][1].append(y)
            logical[-1][3] = last
            before = [p.detach().clone() for p in model.parameters()]
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
            moved.append(not all(torch.equal(p, b) for p, b in zip(model.parameters(), before)))
            if last:
                xs, ys = torch.cat(logical[-1][0]), torch.cat(logical[-1][1])
                if torch.isnan(xs).any():
                    assert not moved[-1]
                    skipped_before = True
                    continue
                checked_after_skip += skipped_before
                # Reference: DP-SGD's clipped mean of the raw gradients at the batch's start.
                start = logical[-1][2]
                copy = make_mlp()
                with torch.no_grad():
                    for p, s in zip(copy.parameters(), start, strict=True):
                        p.copy_(s)
                G = per_example_grads(copy, ce_sum, xs, ys)
                clip = (1.0 / (G.norm(dim=1) + 1e-6)).clamp(max=1.0)
                update = (clip[:, None] * G).sum(0) / opt.expected_batch_size
                for p, s, u in zip(model.parameters(), start, unflatten(update, copy),
                                   strict=True):
                    torch.testing.assert_close(p.detach(), s - 0.3 * u, rtol=1e-10,
                                               atol=1e-12)
    with_nan = sum(bool(torch.isnan(torch.cat(b[0])).any()) for b in logical)
    assert guard.skipped_nonfinite == with_nan >= 1
    assert sum(moved) == len(logical) - with_nan  # one real step per clean logical batch
    assert checked_after_skip > 0  # the desynchronisation scenario was exercised
    assert not any(torch.isnan(p).any() for p in model.parameters())
    guard.close()
