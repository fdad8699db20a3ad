"""Exact semantics of a guarded step (issue 13, items 1-8 and 14-16).

References are plain PyTorch training on the kept examples, torch.func per-example
gradients and explicit solves, never gradguard's own output.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.engine import NonFiniteGradientError
from tests.reference import ce_sum, gnq_explicit, per_example_grads

F64 = torch.float64
LAM = 1e-2


def make_data(n=24, d=5, classes=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=dtype),
                         torch.randint(0, classes, (n,), generator=g))


def make_mlp(seed=1, d=5, hidden=6, classes=3, dtype=F64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
}


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------- item 1
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_everything_dropped_leaves_parameters_bit_identical(opt_name):
    """float32, several steps, every example dropped: not one bit of the model moves (the
    old .grad correction left a residue Adam normalised into 5e-2 steps)."""
    # Wide enough that a correction .grad − Σ_dropped g_j leaves a rounding residue.
    ds = make_data(n=96, d=20, classes=10, dtype=torch.float32)
    model = make_mlp(d=20, hidden=64, classes=10, dtype=torch.float32)
    start = flat(model).clone()
    guard = gg.GradGuard(policy=gg.Drop(threshold=1e-30), lam=LAM)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=OPTIMIZERS[opt_name](model.parameters()),
        data_loader=DataLoader(ds, batch_size=32))
    for _ in range(2):
        for x, y, in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert guard.step == 6 and int(guard.rule.dropped_total) == 2 * len(ds)
    assert torch.equal(flat(model), start)
    guard.close()


def _censored_run(opt_name, ds, dropped: list[int], *, dtype=F64, seed=1):
    """Train 2 epochs with the examples ``dropped`` censored (weight 0 at every step)."""
    model = make_mlp(dtype=dtype, seed=seed)
    guard = gg.GradGuard(policy=gg.Drop(threshold=1e30), lam=LAM)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=OPTIMIZERS[opt_name](model.parameters()),
        data_loader=DataLoader(ds, batch_size=6, shuffle=True,
                               generator=torch.Generator().manual_seed(3)))
    guard.ledger.censor(torch.tensor(dropped, dtype=torch.long))
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    guard.close()
    return model


def _reference_run(opt_name, ds, dropped: list[int], *, seed=1):
    """Plain PyTorch: each batch without the dropped examples, loss Σ_kept ℓ_j / B; no
    step at all for a batch with nothing kept."""
    model = make_mlp(seed=seed)
    opt = OPTIMIZERS[opt_name](model.parameters())
    loader = DataLoader(TensorDataset(*ds.tensors, torch.arange(len(ds))), batch_size=6,
                        shuffle=True, generator=torch.Generator().manual_seed(3))
    gone = set(dropped)
    for _ in range(2):
        for x, y, idx in loader:
            keep = torch.tensor([int(i) not in gone for i in idx])
            if not keep.any():
                continue
            opt.zero_grad()
            (F.cross_entropy(model(x[keep]), y[keep], reduction="sum") / len(x)).backward()
            opt.step()
    return model


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opt_name=st.sampled_from(list(OPTIMIZERS)),
       dropped=st.lists(st.integers(0, 23), max_size=12, unique=True))
def test_drop_equals_training_without_the_dropped_examples(opt_name, dropped):
    """float64: a guarded run equals plain training on the kept examples of each batch."""
    ds = make_data()
    got = _censored_run(opt_name, ds, dropped)
    want = _reference_run(opt_name, ds, dropped)
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
def test_dropped_examples_labels_have_no_influence(opt_name):
    """Two float32 runs differing only in the dropped examples' labels end bit-identical."""
    ds = make_data(dtype=torch.float32)
    dropped = [0, 3, 7, 11, 19]
    y2 = ds.tensors[1].clone()
    y2[dropped] = (y2[dropped] + 1) % 3
    a = _censored_run(opt_name, ds, dropped, dtype=torch.float32)
    b = _censored_run(opt_name, TensorDataset(ds.tensors[0], y2), dropped, dtype=torch.float32)
    assert torch.equal(flat(a), flat(b))
    c = _censored_run(opt_name, TensorDataset(ds.tensors[0], y2), [], dtype=torch.float32)
    assert not torch.equal(flat(a), flat(c))  # the labels do matter when kept


# --------------------------------------------------------------------- item 2
def test_quantile_drops_the_top_of_each_step_and_logs_the_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds = make_data(n=60)
    model = make_mlp()
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.9), lam=LAM,
                         log_dir=str(tmp_path), log_every=1)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(ds, batch_size=20))
    for _ in range(3):
        for x, y in loader:
            gnq = gnq_explicit(per_example_grads(model, ce_sum, x, y), LAM)
            expected = int((gnq > torch.quantile(gnq, 0.9)).sum())  # the top 10%: 2 of 20
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert int((guard.last_weights == 0).sum()) == expected == 2
    assert guard.summary()["realised_rate"] == pytest.approx(0.1)
    guard.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    rates = [e.value for e in acc.Scalars("gradguard/policy/realised_rate")]
    assert len(rates) == 9 and all(r == pytest.approx(0.1) for r in rates)


# --------------------------------------------------------------------- item 4
def test_zero_gradient_batch_under_relative_lam_keeps_everything_finite(tmp_path):
    ds = make_data(n=16)
    model = make_mlp()
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.75), lam=0.1,
                         relative_lam=True, log_dir=str(tmp_path))
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    kept = []
    batches = ((x, y) for _ in range(2) for x, y in loader)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss * 0.0 if step == 0 else loss).backward()  # an all-zero-gradient batch first
        opt.step()
        assert bool(torch.isfinite(guard.last_gnq).all())
        kept.append(int((guard.last_weights > 0).sum()))
    assert all(k >= 6 for k in kept[1:]), kept  # training did not stall
    for name, t in guard.ledger.state_dict().items():
        if name == "eps":  # individual ε: +∞ = no DP guarantee (no DP-SGD here), never NaN
            assert bool((t == float("inf")).all()), name
        elif t.is_floating_point():
            assert bool(torch.isfinite(t).all()), name
    guard.close()

    def no_constants(name):
        raise AssertionError(f"summary.json holds {name}")

    json.loads((tmp_path / "summary.json").read_text(), parse_constant=no_constants)


# --------------------------------------------------------------------- item 5
@pytest.mark.parametrize("policy", ["drop", "clip"])
def test_budget_is_a_hard_cap_with_a_threshold(policy):
    ds = make_data(n=24, seed=4)
    model = make_mlp(seed=5)
    budget = 2.0
    guard = gg.GradGuard(policy=policy, threshold=gg.Quantile(0.5), budget=budget, lam=1.0)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        data_loader=DataLoader(ds, batch_size=6, shuffle=True,
                               generator=torch.Generator().manual_seed(0)))
    for _ in range(8):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    bound = guard.ledger.cum_bound
    assert float(bound.max()) <= budget * (1 + 1e-12)
    assert float(bound.max()) > 0.95 * budget  # the cap was reached: not vacuous
    guard.close()


# --------------------------------------------------------------------- item 6
@pytest.mark.parametrize("policy", ["drop", "clip"])
def test_short_last_batch_with_nothing_dropped_equals_plain_training(policy):
    ds = make_data(n=20, dtype=torch.float32)  # batches 8, 8, 4
    plain = make_mlp(dtype=torch.float32)
    model = copy.deepcopy(plain)
    guard = gg.GradGuard(policy=policy, threshold=1e30, lam=LAM)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        data_loader=DataLoader(ds, batch_size=8))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.3)
    for x, y in loader:
        for m, o in ((model, opt), (plain, plain_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert torch.equal(flat(model), flat(plain))
    guard.close()


# --------------------------------------------------------------------- item 7
def _penalty_run(on_nonfinite):
    ds = make_data(n=24)
    model = make_mlp()
    guard = gg.GradGuard(policy="monitor", lam=LAM, on_nonfinite=on_nonfinite)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    history = []
    for step, (x, y) in enumerate(loader):
        before = flat(model).clone()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if step == 1:  # a penalty outside the guarded layers' outputs goes NaN
            loss = loss + torch.tensor(math.nan, dtype=F64) * model[2].bias.sum()
        loss.backward()
        opt.step()
        history.append((before, flat(model).clone()))
    return guard, history


def test_nonfinite_penalty_outside_guarded_layers_is_skipped():
    guard, history = _penalty_run("skip")
    assert torch.equal(history[1][0], history[1][1])  # the NaN step left the model alone
    assert bool(torch.isfinite(history[2][1]).all())
    assert guard.skipped_nonfinite == 1 and guard.step == 2
    assert int(guard.ledger.steps_seen.sum()) == 16  # the skipped step is not recorded
    guard.close()


def test_nonfinite_penalty_raises_on_its_own_step_naming_the_cause():
    with pytest.raises(NonFiniteGradientError, match=r"step 2: .*'2.bias'.*outside the guarded"):
        _penalty_run("raise")


# --------------------------------------------------------------------- item 8, 15, 16
def test_optimizer_must_update_only_guarded_parameters():
    body = make_mlp()
    head = nn.Linear(3, 2).to(F64)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="not the model's.*head outside the module"):
        gg.GradGuard().make_guarded(module=body, optimizer=opt)
    other = make_mlp(seed=2)
    with pytest.raises(ValueError, match="not the model's"):
        gg.GradGuard().make_guarded(module=body, optimizer=torch.optim.SGD(
            other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        gg.GradGuard().make_guarded(module=body, optimizer=None)
    with pytest.raises(ValueError, match=r"does not guard: \['0.weight', '0.bias'\]"):
        gg.GradGuard().make_guarded(module=body, optimizer=torch.optim.SGD(
            body.parameters(), lr=0.1), params=list(body[2].parameters()))
    # The refusals left no hooks behind: a guard can still attach.
    guard = gg.GradGuard()
    guard.make_guarded(module=body, optimizer=torch.optim.SGD(body.parameters(), lr=0.1))
    guard.close()


def test_frozen_parameters_may_sit_in_the_optimizer():
    """LoRA-style: frozen base weights in the optimizer are accepted and stay put."""
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.5))
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(make_data(n=8), batch_size=4))
    frozen_before = model[0].weight.detach().clone()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model[0].weight, frozen_before)
    assert not torch.equal(model[2].weight, make_mlp()[2].weight)
    guard.close()


def test_second_guard_on_the_same_model_is_refused():
    model = make_mlp()
    first = gg.GradGuard()
    first.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="another GradGuard is already attached"):
        gg.GradGuard().make_guarded(module=model,
                                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    first.close()
    second = gg.GradGuard()  # once the first is closed, a new one may attach
    second.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    second.close()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lam": True}, r"lam must be a finite number > 0, got True \(bool\)"),
    ({"policy": "drop", "budget": True}, r"budget must be a number of nats > 0"),
    ({"policy": "drop", "threshold": True}, r"threshold must be a number > 0"),
    ({"lam": 1e-310}, r"denormal"),
    ({"log_every": math.nan}, r"log_every must be an integer"),
    ({"log_every": 2.5}, r"log_every must be an integer"),
    ({"relative_lam": 1}, r"relative_lam must be True or False"),
    ({"save_every": 10}, r"save_every= writes the run directory: pass log_dir="),
    ({"save_every": 0, "log_dir": "x"}, r"save_every must be >= 1"),
    ({"policy": gg.Drop(threshold=1.0), "threshold": 2.0}, r"not to GradGuard as well"),
])
def test_bad_arguments_are_refused_clearly(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        gg.GradGuard(**kwargs)


@pytest.mark.parametrize("window", [2.5, math.nan, True])
def test_bad_quantile_window(window):
    with pytest.raises(ValueError, match="Quantile window must be an integer"):
        gg.Quantile(0.9, window=window)


def test_policy_objects_are_accepted():
    guard = gg.GradGuard(policy=gg.Clip(threshold=gg.Quantile(0.8), budget=3.0))
    assert guard.policy == "clip" and guard.budget == 3.0
    assert isinstance(guard.rule, gg.Clip)


# --------------------------------------------------------------------- item 14
def _trained_guard(n_steps=2):
    ds = make_data(n=16)
    model = make_mlp()
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.5, window=3), lam=LAM)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return guard


@pytest.mark.parametrize("corrupt, pattern", [
    (lambda s: s.update(step=torch.tensor(-3)), "'step' must be an integer tensor >= 0"),
    (lambda s: s.update(step=torch.tensor(2.5)), "'step' must be an integer tensor >= 0"),
    (lambda s: s["window"].append(torch.tensor([math.nan], dtype=F64)), "window"),
    (lambda s: s.update(dropped_total=torch.tensor(-1.0)), "dropped_total"),
    (lambda s: s["ledger"].update(cum_bound=s["ledger"]["cum_bound"] * math.nan),
     "cum_bound"),
    (lambda s: s["ledger"].pop("max_gnq"), "missing keys"),
])
def test_failed_load_leaves_the_guard_untouched(corrupt, pattern):
    source = _trained_guard()
    state = source.state_dict()
    state["step"] = torch.tensor(999)
    corrupt(state)
    target = _trained_guard()
    before = target.state_dict()
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(state)
    after = target.state_dict()
    assert target.step == 2
    for name, t in before["ledger"].items():
        assert torch.equal(t, after["ledger"][name]), name
    assert len(after["window"]) == len(before["window"])
    source.close()
    target.close()


# --------------------------------------------------------------------- close()
def test_close_logs_a_summary(tmp_path, caplog):
    guard = _trained_guard()
    guard.log_dir = None
    with caplog.at_level(logging.INFO, logger="gradguard"):
        guard.close()
    text = caplog.text
    assert "2 optimizer steps" in text and "16 examples seen" in text
    assert f"{guard.rule.realised_rate:.3g} realised rate" in text


# --------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("policy", ["monitor", "drop"])
def test_accumulation_with_divided_losses(policy):
    """(loss / N).backward() over N micro-batches with accumulation_steps=N: GNQ of the
    logical batch in the true scale; the update is plain accumulation over the kept ones."""
    ds = make_data(n=24)
    model = make_mlp()
    kwargs = {} if policy == "monitor" else {"threshold": gg.Quantile(0.7)}
    guard = gg.GradGuard(policy=policy, lam=LAM, **kwargs)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(ds, batch_size=4), accumulation_steps=3)
    inner = opt.original_optimizer
    applied, original_step = [], inner.step

    def step(*args, **kwargs):
        applied.append(flat_grads(model))
        return original_step(*args, **kwargs)

    inner.step = step
    batches = iter(loader)
    for _ in range(2):
        micro = [next(batches) for _ in range(3)]
        x = torch.cat([m[0] for m in micro])
        y = torch.cat([m[1] for m in micro])
        G = per_example_grads(model, ce_sum, x, y)
        want = gnq_explicit(G, LAM)
        opt.zero_grad()
        for xb, yb in micro:
            (F.cross_entropy(model(xb), yb) / 3).backward()
        opt.step()
        torch.testing.assert_close(guard.last_gnq, want, rtol=1e-9, atol=1e-12)
        w = guard.last_weights
        if policy == "drop":
            assert 0 < int((w == 0).sum()) < 12
        torch.testing.assert_close(applied[-1], (w[:, None] * G).sum(0) / 12, rtol=1e-9,
                                   atol=1e-12)
    guard.close()


def flat_grads(model):
    return torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()])


def test_accumulation_without_declaring_it_warns():
    ds = make_data(n=16)
    model = make_mlp()
    guard = gg.GradGuard(lam=LAM)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(ds, batch_size=4))
    batches = iter(loader)
    opt.zero_grad()
    for _ in range(2):
        xb, yb = next(batches)
        (F.cross_entropy(model(xb), yb) / 2).backward()
    with pytest.warns(UserWarning, match="pass accumulation_steps=N"):
        opt.step()
    guard.close()


def test_raw_gnq_is_the_gnq_before_the_policy_acted():
    """cum_gnq_raw / max_gnq_raw are 'what an unprotected update would disclose': under
    drop they keep the dropped examples' GNQ, while cum_gnq records the update applied."""
    ds = make_data(n=8, seed=5)
    model = make_mlp(seed=6)
    reference = copy.deepcopy(model)
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.5), lam=LAM)
    model, opt, _ = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    x, y = ds.tensors
    guard.set_batch_indices(torch.arange(8))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    G = per_example_grads(reference, ce_sum, x, y)
    raw = gnq_explicit(G, LAM)
    torch.testing.assert_close(guard.ledger.cum_gnq_raw[:8], raw, rtol=1e-8, atol=0)
    torch.testing.assert_close(guard.ledger.max_gnq_raw[:8], raw, rtol=1e-8, atol=0)
    dropped = guard.last_weights == 0
    assert bool(dropped.any())
    assert bool((guard.ledger.cum_gnq[:8][dropped] == 0).all())
    guard.close()
