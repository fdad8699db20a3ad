"""Disclosure of what DP-SGD releases, and individual ε (gradguard.dp).

References: torch.func per-example gradients on hook-free copies of the model, Opacus's
clipping formula re-done in float64, explicit P×P float64 solves with ridge λ + σ²C², and
Opacus's own RDP accountant and conversion.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.dp import IndividualAccountant, clip_factors, rdp_to_epsilon
from tests.reference import ce_sum, gnq_explicit, per_example_grads

F64 = torch.float64
LAM = 1e-2
DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
logging.getLogger("opacus").setLevel(logging.ERROR)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_data(n=32, d=5, classes=3, seed=0):
    g = gen(seed)
    x = 2 * torch.randn(n, d, generator=g, dtype=F64)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def make_mlp(seed=1, d=5, hidden=6, classes=3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(),
                             nn.Linear(hidden, classes)).to(F64)


def private(ds, *, mode="hooks", clipping="flat", noise=1.0, max_grad_norm=0.5,
            batch_size=8, seed=0, poisson=True, accountant="rdp"):
    model = make_mlp(seed=seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(ds, batch_size=batch_size, generator=gen(100 + seed))
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=max_grad_norm, grad_sample_mode=mode, clipping=clipping,
        poisson_sampling=poisson, noise_generator=gen(200 + seed))
    return engine, model, opt, loader


def raw_grads(gsm, x, y, seed):
    """torch.func per-example gradients at the parameters of the module Opacus wraps."""
    copy = make_mlp(seed=seed + 1)
    copy.load_state_dict(gsm._module.state_dict())
    return per_example_grads(copy, ce_sum, x, y)


def param_spans(model):
    out, start = [], 0
    for p in model.parameters():
        out.append((start, start + p.numel()))
        start += p.numel()
    return out


def opacus_clip(G, spans, max_norms, *, per_layer):
    """Opacus's clipping of the rows of G, in float64: (clipped rows, factor per column)."""
    if not per_layer:
        f = (max_norms / (G.norm(dim=1) + 1e-6)).clamp(max=1.0)
        return f[:, None] * G
    cols = [(c / (G[:, a:b].norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None] * G[:, a:b]
            for (a, b), c in zip(spans, max_norms, strict=True)]
    return torch.cat(cols, 1)


# ------------------------------------------------------------------ released-update GNQ
CASES = [("hooks", "flat", 1.0), ("hooks", "flat", 0.0), ("functorch", "flat", 1.0),
         ("ew", "flat", 1.0), ("hooks", "per_layer", 0.7), ("functorch", "per_layer", 1.0)]


@pytest.mark.parametrize("mode, clipping, noise", CASES,
                         ids=[f"{m}-{c}-sigma{s}" for m, c, s in CASES])
def test_released_gnq_matches_explicit_reference(mode, clipping, noise):
    """GNQ of clipped rows with the noise as ridge λ + σ²C² (σ = 0: plain clipped GNQ)."""
    ds = make_data(seed=3)
    # Clipping norms at the first batch's median norms: some rows clipped, some not.
    G0 = per_example_grads(make_mlp(), ce_sum, *ds[:8])
    max_norms = ([float(G0[:, a:b].norm(dim=1).median()) for a, b in param_spans(make_mlp())]
                 if clipping == "per_layer" else float(G0.norm(dim=1).median()))
    engine, model, opt, loader = private(ds, mode=mode, clipping=clipping, noise=noise,
                                         max_grad_norm=max_norms, poisson=False)
    # Per-layer: noise of std σ·‖(C_p)‖₂ on every coordinate, that norm taken in float32 by
    # Opacus (torch.norm(torch.Tensor(...))): the noise actually drawn.
    C = (torch.norm(torch.Tensor(max_norms)).item() if clipping == "per_layer" else max_norms)
    guard = gg.GradGuard(policy="monitor", lam=LAM, delta=DELTA)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    spans = param_spans(make_mlp())
    clipped_some = unclipped_some = False
    for step, (x, y) in enumerate(loader):
        G = raw_grads(model, x, y, 0)
        Gc = opacus_clip(G, spans, torch.tensor(max_norms, dtype=F64) if clipping ==
                         "per_layer" else max_norms, per_layer=clipping == "per_layer")
        shrunk = torch.stack([Gc[:, a:b].norm(dim=1) < G[:, a:b].norm(dim=1) * (1 - 1e-9)
                              for a, b in spans])
        clipped_some |= bool(shrunk.any())
        unclipped_some |= bool((~shrunk).any())
        gopt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gopt.step()
        torch.testing.assert_close(guard.last_gnq, gnq_explicit(Gc, LAM + (noise * C) ** 2),
                                   rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(guard.last_gnq_raw, gnq_explicit(G, LAM), rtol=1e-8, atol=0)
        if step == 1:
            break
    assert clipped_some and unclipped_some  # both regimes exercised
    # The first step saw examples 0..7 once: the ledger holds that step's released GNQ.
    guard.close()
    if noise == 0:
        assert torch.isinf(guard.ledger.eps).all()  # σ = 0: no guarantee
    else:
        assert torch.isfinite(guard.ledger.eps).all()


def test_adaptive_clipping_uses_the_steps_bound_and_the_noise_actually_drawn():
    """AdaClip: C of each step (it moves between steps), noise std σ_adj·C; no individual ε."""
    ds = make_data(seed=4)
    model = make_mlp()
    loader = DataLoader(ds, batch_size=8)
    sigma, sigma_u = 1.0, 4.0
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader, noise_multiplier=sigma, max_grad_norm=2.0, clipping="adaptive",
        poisson_sampling=False, target_unclipped_quantile=0.5, clipbound_learning_rate=0.5,
        max_clipbound=10.0, min_clipbound=0.1, unclipped_num_std=sigma_u,
        noise_generator=gen(1))
    guard = gg.GradGuard(policy="monitor", lam=LAM)
    with pytest.warns(UserWarning, match="no individual ε.*adaptive clipping"):
        model, gopt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                 data_loader=loader)
    sigma_adj = (sigma ** -2 - (2 * sigma_u) ** -2) ** -0.5
    bounds = []
    for step, (x, y) in enumerate(loader):
        C = float(opt.max_grad_norm)
        bounds.append(C)
        G = raw_grads(model, x, y, 0)
        Gc = (C / (G.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None] * G
        gopt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gopt.step()
        torch.testing.assert_close(guard.last_gnq, gnq_explicit(Gc, LAM + (sigma_adj * C) ** 2),
                                   rtol=1e-8, atol=1e-12)
        if step == 2:
            break
    assert len(set(bounds)) == 3  # the bound moved
    assert torch.isinf(guard.ledger.eps).all()
    guard.close()


def test_ledger_under_dp_sums_released_and_raw_gnq():
    ds = make_data(n=24, seed=5)
    engine, model, opt, loader = private(ds, noise=1.2, max_grad_norm=0.3, poisson=False)
    guard = gg.GradGuard(policy="monitor", lam=LAM)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    cum = torch.zeros(len(ds), dtype=F64)
    cum_raw, max_raw = torch.zeros_like(cum), torch.zeros_like(cum)
    order = torch.arange(len(ds))
    for _ in range(2):
        for i, (x, y) in enumerate(loader):
            idx = order[8 * i: 8 * i + 8]
            G = raw_grads(model, x, y, 0)
            Gc = (0.3 / (G.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None] * G
            cum[idx] += gnq_explicit(Gc, LAM + (1.2 * 0.3) ** 2)
            raw = gnq_explicit(G, LAM)
            cum_raw[idx] += raw
            max_raw[idx] = torch.maximum(max_raw[idx], raw)
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
    torch.testing.assert_close(guard.ledger.cum_gnq, cum, rtol=1e-8, atol=0)
    torch.testing.assert_close(guard.ledger.cum_gnq_raw, cum_raw, rtol=1e-8, atol=0)
    torch.testing.assert_close(guard.ledger.max_gnq_raw, max_raw, rtol=1e-8, atol=0)
    assert bool((guard.ledger.cum_gnq < guard.ledger.cum_gnq_raw).all())
    guard.close()


def test_ghost_clipping_is_refused_with_the_modes_that_work():
    ds = make_data()
    model = make_mlp()
    loader = DataLoader(ds, batch_size=8)
    model, opt, criterion, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, criterion=nn.CrossEntropyLoss(), noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode="ghost")
    with pytest.raises(ValueError, match=r"grad_sample_mode='ghost'.*'hooks', 'functorch', "
                                         r"'ew'"):
        gg.GradGuard().make_guarded(module=model, optimizer=opt, data_loader=loader)


@pytest.mark.parametrize("policy, kwargs", [("drop", {"threshold": 120.0}),
                                            ("clip", {"threshold": 100.0})])
def test_policy_under_dp_releases_what_the_ledger_records(policy, kwargs):
    """The released sum is Σ_j a_j g_j with Opacus's clip of the reweighted rows, and the
    ledger's GNQ is that of exactly those rows (σ = 0 so the update can be read back)."""
    ds = make_data(n=24, seed=7)
    C = 8.0
    engine, model, opt, loader = private(ds, noise=0.0, max_grad_norm=C, poisson=False)
    guard = gg.GradGuard(policy=policy, lam=LAM, **kwargs)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    x, y = next(iter(loader))
    G = raw_grads(model, x, y, 0)
    gopt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gopt.step()
    w = guard.last_weights
    assert bool((w < 1).any()) and bool((w == 1).any())
    norms = G.norm(dim=1)
    f = clip_factors(norms, C)
    s = torch.where((w > 0) & (w < 1), w * f, w)  # w·(clipped row) for 0 < w < 1
    a = s * (C / (s * norms + 1e-6)).clamp(max=1.0)
    released = a[:, None] * G
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grad * opt.expected_batch_size, released.sum(0),
                               rtol=1e-9, atol=1e-12)
    effective = gnq_explicit(released, LAM)
    torch.testing.assert_close(guard.ledger.max_gnq[:8], effective, rtol=1e-8, atol=1e-12)
    if policy == "clip":  # rows scaled after clipping: τ holds to Opacus's 1e-6 margin
        assert float(effective.max()) <= kwargs["threshold"] * (1 + 1e-5)
    else:
        assert torch.equal(effective == 0, w == 0)
    guard.close()


# ------------------------------------------------------------------ individual ε
def opacus_eps(sigma, q, steps, delta=DELTA):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def test_rdp_to_epsilon_matches_opacus_conversion():
    rng = np.random.default_rng(0)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rng.exponential(2.0, size=(5, len(orders))).cumsum(1)
    ours = rdp_to_epsilon(torch.tensor(rdp), orders, 1e-6)
    for row, e in zip(rdp, ours, strict=True):
        assert float(e) == pytest.approx(get_privacy_spent(orders=orders, rdp=row,
                                                           delta=1e-6)[0], rel=1e-12)


def test_clipped_at_every_step_gets_the_runs_epsilon_and_nobody_more():
    sigma, q, steps, n = 0.9, 0.05, 40, 30
    acc = IndividualAccountant(n, noise_multiplier=sigma, sample_rate=q)
    g = gen(0)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:6]
        ratios = torch.rand(6, generator=g, dtype=F64)
        ratios[idx < 5] = 1 - 1e-7  # examples 0..4: clipped whenever sampled
        acc.step(idx, ratios)
    eps = acc.epsilon(DELTA)
    run = opacus_eps(sigma, q, steps)
    assert torch.allclose(eps[:5], torch.full((5,), run, dtype=F64), rtol=1e-9, atol=0)
    assert bool((eps <= run * (1 + 1e-12)).all())
    assert bool((eps[5:] < run).any())


def test_half_the_norm_at_every_step_gets_the_epsilon_of_twice_the_noise():
    sigma, q, steps, n = 1.1, 0.02, 50, 4
    acc = IndividualAccountant(n, noise_multiplier=sigma, sample_rate=q)
    for _ in range(steps):
        acc.step(torch.arange(n), torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=F64))
    eps = acc.epsilon(DELTA)
    at_2sigma = opacus_eps(2 * sigma, q, steps)
    # rounded up to the next grid value r⁺ ≥ 0.5: between ε(2σ) and ε(σ/r⁺)
    r_up = float(acc.edges[torch.searchsorted(acc.edges, torch.tensor(0.5, dtype=F64))])
    assert at_2sigma <= float(eps[0]) <= opacus_eps(sigma / r_up, q, steps) * (1 + 1e-12)
    assert float(eps[2]) == pytest.approx(opacus_eps(sigma, q, steps), rel=1e-9)
    assert float(eps[1]) == float(eps[0])
    assert float(acc.rdp[3].abs().max()) == 0.0  # a zero gradient costs nothing
    # A norm on the grid is not rounded: exactly the ε of noise multiplier σ / r.
    exact = IndividualAccountant(1, noise_multiplier=sigma, sample_rate=q)
    for _ in range(steps):
        exact.step(torch.tensor([0]), torch.tensor([r_up], dtype=F64))
    assert float(exact.epsilon(DELTA)[0]) == pytest.approx(opacus_eps(sigma / r_up, q, steps),
                                                           rel=1e-9)


def test_unsampled_examples_are_charged_the_clipping_norm():
    sigma, q = 1.0, 0.1
    acc = IndividualAccountant(3, noise_multiplier=sigma, sample_rate=q)
    acc.step(torch.tensor([0]), torch.tensor([0.0], dtype=F64))
    per_step = compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                           orders=RDPAccountant.DEFAULT_ALPHAS)
    assert float(acc.rdp[0].abs().max()) == 0.0
    np.testing.assert_allclose(acc.rdp[1].numpy(), per_step, rtol=1e-12)
    np.testing.assert_allclose(acc.rdp[2].numpy(), per_step, rtol=1e-12)


def test_accountant_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        IndividualAccountant(3, noise_multiplier=0.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"sample_rate must lie in \(0, 1\]"):
        IndividualAccountant(3, noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        gg.GradGuard(delta=0.0)


@pytest.mark.parametrize("max_grad_norm", [1e-4, 2.0], ids=["always_clipped", "some_not"])
def test_training_run_individual_eps_against_opacus_accountant(max_grad_norm, tmp_path):
    """A real Poisson-sampled DP-SGD run: ledger.eps never above Opacus's ε, equal to it
    when every gradient is clipped at every step; ε and raw GNQ reach TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds = make_data(n=40, seed=11)
    engine, model, opt, loader = private(ds, noise=0.8, max_grad_norm=max_grad_norm,
                                         batch_size=10)
    guard = gg.GradGuard(policy="monitor", delta=DELTA, log_dir=str(tmp_path), log_every=1)
    model, gopt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    for _ in range(3):
        for x, y in loader:
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
    run = engine.get_epsilon(DELTA)
    eps = guard.ledger.eps
    assert guard.step == 12 and run > 0
    assert bool((eps <= run * (1 + 1e-12)).all())
    if max_grad_norm < 1:
        torch.testing.assert_close(eps, torch.full_like(eps, run), rtol=1e-9, atol=0)
    else:
        assert float(eps.min()) < 0.99 * run
    summary = guard.summary()
    assert summary["eps_max"] == pytest.approx(float(eps.max()), rel=1e-12)
    assert summary["eps_run_rdp"] == pytest.approx(run, rel=1e-9)
    guard.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"gradguard/dp/eps_max", "gradguard/dp/eps_mean", "gradguard/dp/eps_run_rdp",
            "gradguard/gnq_raw/max", "gradguard/gnq_raw/mean"} <= tags
    assert acc.Scalars("gradguard/dp/eps_max")[-1].value == pytest.approx(
        float(eps.max()), rel=1e-6)


def test_resume_restores_individual_rdp(tmp_path):
    ds = make_data(n=24, seed=2)

    def run(steps, state=None):
        engine, model, opt, loader = private(ds, noise=1.0, max_grad_norm=0.3, batch_size=8)
        guard = gg.GradGuard(policy="monitor")
        model, gopt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                 data_loader=loader)
        if state is not None:
            guard.load_state_dict(state)
        for i, (x, y) in enumerate(loader):
            if i == steps:
                break
            gopt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            gopt.step()
        return guard

    path = tmp_path / "state.pt"
    torch.save(run(2).state_dict(), path)
    resumed = run(0, torch.load(path, weights_only=True))
    fresh = run(2)
    assert resumed._accountant.steps == 2
    torch.testing.assert_close(resumed._accountant.rdp, fresh._accountant.rdp, rtol=0, atol=0)


def test_small_digits_run_dp_ledger_far_below_undefended():
    """benchmarks/dp_ledger.py at a small size: the ledger of a DP-SGD run (σ = 1, C = 1)
    comes out far below the undefended run's, while its raw GNQ does not."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "dp_ledger.py"
    spec = importlib.util.spec_from_file_location("gradguard_dp_ledger", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    none = bench.run(dp=False, epochs=2, seed=0, n_train=400)
    dp = bench.run(dp=True, epochs=2, seed=0, n_train=400)
    print(none, dp)
    assert dp["bound_mean_nats"] < 0.2 * none["bound_mean_nats"]
    assert dp["bound_max_nats"] < 0.5 * none["bound_max_nats"]
    assert dp["max_gnq_raw_mean"] > 0.2 * none["max_gnq_raw_mean"]
    assert dp["eps_individual_max"] <= dp["eps_run_opacus"] * (1 + 1e-9)
