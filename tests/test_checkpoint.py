"""Checkpoint and resume: N steps, save, load into fresh objects, N more == 2N uninterrupted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg

F64 = torch.float64
N_DATA, BATCH = 24, 6  # 4 steps per epoch
STEPS_PER_EPOCH = N_DATA // BATCH


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_DATA, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (N_DATA,), generator=g)
    return TensorDataset(x, y)


def build(ds, guard_kwargs, *, model_seed=1):
    """Fresh model, Adam, shuffling loader (own generator) and guard, all wired up."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    loader_gen = torch.Generator().manual_seed(5)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=loader_gen)
    guard = gg.GradGuard(**guard_kwargs)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    return guard, model, opt, loader, loader_gen


def train(model, opt, loader, epochs):
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


GUARDS = {
    # The calibration window is state: a resumed run must calibrate on the saved steps.
    "drop_quantile_budget": dict(policy="drop", threshold=gg.Quantile(0.8, window=3),
                                 budget=6.0),
    "clip_quantile": dict(policy="clip", threshold=gg.Quantile(0.5, window=5)),
}


@pytest.mark.parametrize("name", list(GUARDS))
def test_resume_equals_uninterrupted_run(tmp_path, name):
    kwargs = GUARDS[name]
    ds = make_data()
    epochs = 3  # N = 12 steps, then 12 more

    full_guard, full_model, full_opt, full_loader, _ = build(ds, kwargs)
    train(full_model, full_opt, full_loader, 2 * epochs)

    guard, model, opt, loader, loader_gen = build(ds, kwargs)
    train(model, opt, loader, epochs)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "guard": guard.state_dict(), "loader_rng": loader_gen.get_state()}, path)
    guard.close()
    del guard, model, opt, loader

    ckpt = torch.load(path, weights_only=True)
    guard2, model2, opt2, loader2, loader_gen2 = build(ds, kwargs, model_seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    guard2.load_state_dict(ckpt["guard"])
    loader_gen2.set_state(ckpt["loader_rng"])
    assert guard2.step == epochs * STEPS_PER_EPOCH
    assert len(guard2.rule.state_dict()["window"]) == kwargs["threshold"].window
    train(model2, opt2, loader2, epochs)

    for p, q in zip(full_model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    full_state, resumed = full_guard.ledger.state_dict(), guard2.ledger.state_dict()
    for key in full_state:
        assert torch.equal(full_state[key], resumed[key]), key
    assert guard2.step == full_guard.step == 2 * epochs * STEPS_PER_EPOCH
    s_full, s_res = full_guard.summary(), guard2.summary()
    for key in ("dropped_total", "clipped_total", "max_bound", "censored_total"):
        assert s_full[key] == s_res[key], key
    assert s_full["dropped_total"] + s_full["clipped_total"] > 0  # the policy acted
    if "budget" in kwargs:
        assert s_full["censored_total"] > 0  # censorship carried across the checkpoint
    full_guard.close()
    guard2.close()


def test_resume_without_the_window_diverges(tmp_path):
    """The window really matters: dropping it from the state changes the resumed run."""
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.5, window=4))
    ds = make_data()
    full_guard, full_model, full_opt, full_loader, _ = build(ds, kwargs)
    train(full_model, full_opt, full_loader, 2)

    guard, model, opt, loader, loader_gen = build(ds, kwargs)
    train(model, opt, loader, 1)
    state = guard.state_dict()
    state["window"] = []
    guard2, model2, opt2, loader2, loader_gen2 = build(ds, kwargs)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    guard2.load_state_dict(state)
    loader_gen2.set_state(loader_gen.get_state())
    train(model2, opt2, loader2, 1)
    assert not torch.equal(full_guard.ledger.cum_bound, guard2.ledger.cum_bound)


def test_load_state_dict_errors():
    ds = make_data()
    guard = gg.GradGuard()
    with pytest.raises(RuntimeError, match="call make_guarded before load_state_dict"):
        guard.load_state_dict({})
    guard, *_ = build(ds, {})
    state = guard.state_dict()
    state["version"] = torch.tensor(99)
    with pytest.raises(ValueError, match="unknown GradGuard state version"):
        guard.load_state_dict(state)
    guard.close()
