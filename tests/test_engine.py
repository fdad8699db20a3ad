"""GradGuard wrapped around a plain training loop, against torch.func references.

Every guarded update is compared with Σ_j w_j g_j / (expected batch size) built from
torch.func per-example gradients of the same parameters, with the weights w_j recomputed
here from ``gnq_from_grads`` of those reference gradients (never read from the guard).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.engine import NonFiniteGradientError
from gradguard.uniqueness.gnq import gnq_from_grads
from gradguard.uniqueness.hooks import UnsupportedLayerError
from tests.reference import ce_sum, per_example_grads

F64 = torch.float64
LAM = 1e-2
BATCH = 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_data(n=20, d=5, classes=3, seed=0, dtype=F64):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n))


def make_mlp(seed=1, d=5, hidden=6, classes=3, dtype=F64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def loss_of(reduction):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def record_applied_grads(guarded_opt):
    """Record the flat gradient the wrapped optimizer is about to apply, at every real step."""
    inner = guarded_opt.original_optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    applied: list[torch.Tensor] = []
    original_step = inner.step

    def step(*args, **kwargs):
        applied.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).clone()
            for p in params]))
        return original_step(*args, **kwargs)

    inner.step = step
    return applied


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------- reference policies
def ref_clip_weights(G, lam, tau, max_iter=100):
    """The rule documented in policies.py, on reference gradients: passes of
    w ← w·min(1, √(0.999·τ/GNQ_eff)) until every GNQ_eff ≤ τ, else a common down-scaling."""
    w = torch.ones(G.shape[0], dtype=F64)
    eff = gnq_from_grads(G, lam)
    for _ in range(max_iter):
        if bool((eff <= tau * (1 + 1e-9)).all()):
            return w, eff
        w = w * torch.sqrt(0.999 * tau / eff.clamp_min(1e-300)).clamp(max=1.0)
        eff = gnq_from_grads(w[:, None] * G, lam)
    raise AssertionError("the clip passes did not converge here; the test expects them to")


class RefDropLedger:
    """Independent bookkeeping of ``drop`` with a threshold and/or a budget (nats)."""

    def __init__(self, n, *, tau=math.inf, budget=None):
        self.tau, self.budget = tau, budget
        self.bound = torch.zeros(n, dtype=F64)
        self.censored = torch.zeros(n, dtype=torch.bool)
        self.steps_seen = torch.zeros(n, dtype=torch.long)

    def step(self, G, idx, lam):
        """Weights of this step, with the censored / exhausted examples removed first."""
        gnq = gnq_from_grads(G, lam)
        blocked = self.censored[idx].clone()
        allowed = torch.full_like(gnq, self.tau)
        if self.budget is not None:
            remaining = (self.budget - self.bound[idx]).clamp_min(0)
            per_budget = torch.expm1(2 * remaining)
            exhausted = gnq > per_budget
            self.censored[idx[exhausted]] = True
            blocked |= exhausted
            allowed = torch.minimum(allowed, per_budget)
        keep = ~blocked
        # GNQ of the batch *without* the blocked examples, as if they had never been drawn.
        current = torch.zeros_like(gnq)
        if keep.any():
            current[keep] = gnq_from_grads(G[keep], lam)
        w = (keep & (current <= allowed)).to(F64)
        eff = torch.zeros_like(gnq)
        if w.any():
            eff[w > 0] = gnq_from_grads(G[w > 0], lam)
        self.bound.index_add_(0, idx, 0.5 * torch.log1p(eff))
        self.steps_seen.index_add_(0, idx, torch.ones_like(idx))
        if self.budget is not None:
            self.censored[idx[self.bound[idx] >= self.budget]] = True
        return gnq, w, eff, blocked


def reference_threshold(model, ds, q=0.5):
    """A threshold inside the GNQ range of the first batch at initialisation."""
    x, y, _ = ds[:BATCH]
    return float(torch.quantile(gnq_from_grads(per_example_grads(model, ce_sum, x, y), LAM), q))


# --------------------------------------------------------------------- update = Σ w g / B
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("policy", ["monitor", "clip", "drop", "drop_budget"])
def test_guarded_update_equals_weighted_reference(policy, reduction, device):
    """(With ``--device cuda`` the model trains on the GPU; the references stay on the CPU.)"""
    ds = make_data(n=20)
    model = make_mlp()
    tau = reference_threshold(model, ds)
    model = model.to(device)
    kwargs = {"monitor": {}, "clip": {"threshold": tau}, "drop": {"threshold": tau},
              "drop_budget": {"budget": 0.5 * math.log1p(tau) * 1.5}}[policy]
    guard = gg.GradGuard(policy="drop" if policy == "drop_budget" else policy, lam=LAM, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen(3))  # last batch: 4
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader,
                                            loss_reduction=reduction)
    applied = record_applied_grads(opt)
    ref = RefDropLedger(len(ds), tau=kwargs.get("threshold", math.inf),
                        budget=kwargs.get("budget"))
    acted = blocked_seen = 0
    for _ in range(3):
        for x, y, idx in loader:
            x, y = x.to(device), y.to(device)
            # References first, at the parameters of this step.
            G = per_example_grads(model, ce_sum, x, y).cpu()  # raw per-example gradients
            gnq = gnq_from_grads(G, LAM)
            # The batch's own size (the short last batch too): without Poisson sampling a
            # step that drops nothing must equal the plain step (issue 13, item 6).
            denom = len(x) if reduction == "mean" else 1
            kept = None
            if policy == "monitor":
                w, eff = torch.ones_like(gnq), gnq
                # monitor leaves the loop's own gradient alone: the mean of the actual batch
                expected = G.sum(0) / (len(x) if reduction == "mean" else 1)
            else:
                if policy == "clip":
                    w, eff = ref_clip_weights(G, LAM, tau)
                    assert bool((eff <= tau * (1 + 1e-9)).all()), "clip left GNQ above τ"
                else:
                    _, w, eff, blocked = ref.step(G, idx, LAM)
                    blocked_seen += int(blocked.sum())
                    # The update of the batch without the dropped examples, by plain autograd.
                    keep = w > 0
                    kept = torch.zeros_like(flat_params(model).cpu())
                    if keep.any():
                        grads = torch.autograd.grad(ce_sum(model(x[keep]), y[keep]),
                                                    list(model.parameters()))
                        kept = torch.cat([g.reshape(-1) for g in grads]).cpu() / denom
                acted += int((w < 1).sum())
                expected = (w[:, None] * G).sum(0) / denom

            opt.zero_grad()
            loss_of(reduction)(model(x), y).backward()
            steps_before = len(applied)
            opt.step()

            torch.testing.assert_close(guard.last_gnq.cpu(), gnq, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(guard.last_weights.cpu(), w, rtol=1e-8, atol=1e-12)
            if not bool((w > 0).any()):
                # Nothing kept: the wrapped optimizer does not step at all.
                assert len(applied) == steps_before
            else:
                if kept is not None:
                    torch.testing.assert_close(applied[-1].cpu(), kept, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(applied[-1].cpu(), expected, rtol=1e-9, atol=1e-12)
            assert torch.equal(guard.last_indices.cpu(), idx)
            if policy in ("drop", "drop_budget"):
                torch.testing.assert_close(guard.ledger.cum_bound.cpu(), ref.bound, rtol=1e-9,
                                           atol=1e-12)
                assert torch.equal(guard.ledger.censored.cpu(), ref.censored)
    assert guard.step == 9
    assert int(guard.ledger.steps_seen.sum()) == 3 * len(ds)
    if policy != "monitor":
        assert acted > 0, "the threshold never acted: the test would be vacuous"
    if policy == "drop_budget":
        assert blocked_seen > 0, "no censored example came back: the test would be vacuous"
    guard.close()


def test_monitor_is_bit_identical_to_unguarded_loop():
    ds = make_data(n=30, dtype=torch.float32)

    def train(guarded):
        torch.manual_seed(11)  # the loader's shuffling draws from the global RNG
        model = make_mlp(dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        loader = DataLoader(ds, batch_size=7, shuffle=True)
        guard = None
        if guarded:
            guard = gg.GradGuard(policy="monitor")
            model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                    data_loader=loader)
        for _ in range(4):
            for x, y, _ in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        if guard is not None:
            guard.close()
            assert int(guard.ledger.steps_seen.sum()) == 4 * len(ds)
        return model, torch.rand(3)  # the global RNG must be where it would have been

    plain, rng_plain = train(False)
    guarded, rng_guarded = train(True)
    for p, q in zip(plain.parameters(), guarded.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(rng_plain, rng_guarded)


def test_drop_equals_training_without_outliers():
    """Outliers whose GNQ is orders of magnitude above τ, ordinary examples far below it.

    A squared-error regression never saturates, so an outlier's gradient stays huge for
    the whole run (a saturated softmax could make it vanish).
    """
    g = gen(5)
    n, d = 48, 2
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0], dtype=F64) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    outliers = torch.tensor([3, 30])
    y[outliers] = torch.tensor([2000.0, -2000.0], dtype=F64)
    ds = TensorDataset(x, y[:, None], torch.arange(n))
    tau = 100.0
    is_outlier = torch.zeros(n, dtype=torch.bool)
    is_outlier[outliers] = True

    def sse(out, target):
        return (out - target).pow(2).sum()

    def train(guarded):
        model = nn.Linear(d, 1).to(F64)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.3, -0.2]]))
            model.bias.fill_(0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(ds, batch_size=16, shuffle=True, generator=gen(9))
        guard = None
        if guarded:
            guard = gg.GradGuard(policy="drop", threshold=tau)
            model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                                    data_loader=loader, loss_reduction="sum")
        for _ in range(4):
            for xb, yb, ib in loader:
                keep = torch.ones(len(xb), dtype=torch.bool) if guarded else ~is_outlier[ib]
                opt.zero_grad()
                sse(model(xb[keep]), yb[keep]).backward()
                opt.step()
                if guarded:
                    # The construction must separate: every outlier far above τ, the rest below.
                    assert bool((guard.last_gnq[is_outlier[ib]] > 10 * tau).all())
                    assert bool((guard.last_gnq[~is_outlier[ib]] < tau).all())
                    assert torch.equal(guard.last_weights == 0, is_outlier[ib])
        if guarded:
            assert torch.equal(guard.ledger.steps_seen, torch.full((n,), 4))
            guard.close()
        return model

    without = train(False)
    dropped = train(True)
    moved = (without.weight - torch.tensor([[0.3, -0.2]], dtype=F64)).abs().max()
    assert moved > 0.5  # the run is long enough to tell the two apart
    for p, q in zip(without.parameters(), dropped.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- non-finite
def nan_run(on_nonfinite):
    ds = make_data(n=16)
    ds.tensors[0][11, 2] = math.nan  # dataset index 11, in the second batch
    model = make_mlp()
    guard = gg.GradGuard(policy="monitor", on_nonfinite=on_nonfinite)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                            data_loader=DataLoader(ds, batch_size=BATCH))
    return ds, model, guard, opt, loader


def test_nan_input_raises_naming_step_and_index():
    _, model, guard, opt, loader = nan_run("raise")
    batches = iter(loader)
    for step in (1, 2):
        x, y, _ = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            opt.step()
        else:
            before = flat_params(model)
            with pytest.raises(NonFiniteGradientError, match=r"step 2\b.*\[11\]") as err:
                opt.step()
            assert "on_nonfinite='skip'" in str(err.value)
            assert torch.equal(flat_params(model), before)
    guard.close()


def test_nan_input_skip_leaves_params_and_ledger_untouched():
    ds, model, guard, opt, loader = nan_run("skip")
    ref_model = make_mlp()
    for _ in range(2):
        for x, y, idx in loader:
            before = flat_params(model)
            ledger_before = guard.ledger.state_dict()
            steps_before = guard.step
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if 11 in idx.tolist():
                assert torch.equal(flat_params(model), before)
                after = guard.ledger.state_dict()
                assert all(torch.equal(after[k], ledger_before[k]) for k in after)
                assert guard.step == steps_before
            else:
                # The next good batch is attributed to the right examples and trained on.
                assert torch.equal(guard.last_indices, idx)
                ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
                ref_opt.zero_grad()
                F.cross_entropy(ref_model(x), y).backward()
                ref_opt.step()
                assert torch.equal(flat_params(model), flat_params(ref_model))
    assert guard.skipped_nonfinite == 2
    assert guard.step == 2
    expected_seen = torch.zeros(len(ds), dtype=torch.long)
    expected_seen[:BATCH] = 2
    assert torch.equal(guard.ledger.steps_seen, expected_seen)
    assert guard.summary()["skipped_nonfinite"] == 2
    guard.close()


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, pattern", [
    ({"policy": "censor"}, r"policy must be one of .*monitor.*clip.*drop"),
    ({"policy": "drop", "threshold": -1.0}, r"threshold must be a number > 0 or .*Quantile"),
    ({"policy": "drop", "threshold": "high"}, r"threshold must be a number > 0"),
    ({"policy": "drop", "threshold": math.nan}, r"threshold must be a number > 0"),
    ({"policy": "drop", "budget": 0.0}, r"budget must be a number of nats > 0"),
    ({"policy": "clip", "budget": -2}, r"budget must be a number of nats > 0"),
    ({"policy": "drop"}, r"policy='drop' needs threshold=.*or budget="),
    ({"policy": "clip"}, r"policy='clip' needs threshold="),
    ({"policy": "monitor", "threshold": 3.0}, r"monitor.*never acts.*'clip' or 'drop'"),
    ({"lam": 0.0}, r"lam must be a finite number > 0"),
    ({"lam": math.inf}, r"lam must be a finite number > 0"),
    ({"on_nonfinite": "ignore"}, r"on_nonfinite must be 'raise' or 'skip'"),
    ({"log_every": 0}, r"log_every must be >= 1"),
])
def test_bad_arguments_give_clear_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        gg.GradGuard(**kwargs)


def test_bad_quantile_and_loss_reduction():
    with pytest.raises(ValueError, match=r"Quantile q must be in \(0, 1\)"):
        gg.Quantile(1.5)
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        gg.Quantile(0.5, window=0)
    model = make_mlp()
    guard = gg.GradGuard()
    with pytest.raises(ValueError, match=r"loss_reduction must be 'mean' or 'sum'.*'avg'"):
        guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                           loss_reduction="avg")
    guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(RuntimeError, match="already attached"):
        guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    guard.close()


def test_batchnorm_in_train_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    ds = make_data(n=16)
    guard = gg.GradGuard()
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=BATCH))
    x, y, idx = next(iter(loader))
    with pytest.raises(UnsupportedLayerError) as err:
        model(x)
    msg = str(err.value)
    assert "'1'" in msg and "BatchNorm1d" in msg
    assert "GroupNorm" in msg and "ModuleValidator.fix" in msg
    # The refused forward left nothing behind: frozen in eval mode, the same batch trains.
    model[1].eval()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(guard.last_indices, idx)
    guard.close()


def test_batchnorm_eval_gnq_matches_reference():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=gen(2))
        model[1].running_var.uniform_(0.5, 2.0, generator=gen(3))
    model[1].eval()
    ds = make_data(n=8)
    x, y, idx = ds[:]
    G = per_example_grads(model, ce_sum, x, y)
    guard = gg.GradGuard()
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    for xb, yb, _ in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    torch.testing.assert_close(guard.last_gnq, gnq_from_grads(G, LAM), rtol=1e-9, atol=0)
    guard.close()


# --------------------------------------------------------------------- hooks removed
def hook_snapshot(model):
    out = []
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks"):
            out.append((name, len(getattr(m, name))))
    for p in model.parameters():
        out.append(("post_acc", len(getattr(p, "_post_accumulate_grad_hooks", None) or {})))
        out.append(("hooks", len(p._backward_hooks or {})))
    return out


@pytest.mark.parametrize("use_context", [False, True])
def test_close_removes_every_hook_and_model_behaves_as_before(use_context):
    ds = make_data(n=16)
    model = make_mlp()
    twin = make_mlp()
    clean = hook_snapshot(model)
    assert all(count == 0 for _, count in clean)
    guard = gg.GradGuard(policy="clip", threshold=1.0)
    with guard if use_context else contextlib.nullcontext():
        model, opt, loader = guard.make_guarded(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(ds, batch_size=BATCH))
        assert hook_snapshot(model) != clean
        for x, y, _ in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    if not use_context:
        guard.close()
    guard.close()  # idempotent
    assert hook_snapshot(model) == clean
    # The model now computes exactly what an identical never-guarded model computes.
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    x, y, _ = ds[:]
    model.zero_grad()
    out_m, out_t = model(x), twin(x)
    assert torch.equal(out_m, out_t)
    F.cross_entropy(out_m, y).backward()
    F.cross_entropy(out_t, y).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert not guard.hooks._calls  # nothing captured after close


# --------------------------------------------------------------------- TensorBoard
def test_tensorboard_run_directory(tmp_path):
    ds = make_data(n=20)
    model = make_mlp()
    tau = reference_threshold(model, ds)
    log_dir = tmp_path / "run"
    guard = gg.GradGuard(policy="drop", threshold=tau, log_dir=str(log_dir), log_every=1,
                         top_k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                            data_loader=DataLoader(ds, batch_size=BATCH))
    per_step = {}
    with guard:
        for _ in range(2):
            for x, y, _ in loader:
                G = per_example_grads(model, ce_sum, x, y)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                per_step[guard.step] = (gnq_from_grads(G, LAM), guard.ledger.cum_bound.clone(),
                                        guard.ledger.steps_seen > 0)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                        "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("gnq/mean", "gnq/p50", "gnq/p95", "gnq/max", "disclosure/max",
                 "disclosure/mean", "policy/dropped", "policy/clipped",
                 "policy/censored_total"):
        events = {e.step: e.value for e in acc.Scalars(f"gradguard/{name}")}
        assert sorted(events) == sorted(per_step), name
    for step, (gnq, bound, seen) in per_step.items():
        scalars = {name: {e.step: e.value for e in acc.Scalars(f"gradguard/{name}")}[step]
                   for name in ("gnq/max", "gnq/mean", "disclosure/max", "policy/dropped")}
        assert scalars["gnq/max"] == pytest.approx(float(gnq.max()), rel=1e-6)
        assert scalars["gnq/mean"] == pytest.approx(float(gnq.mean()), rel=1e-6)
        assert scalars["disclosure/max"] == pytest.approx(float(bound[seen].max()), rel=1e-6)
        assert scalars["policy/dropped"] == float((gnq > tau).sum())
    # GNQ histograms are of log10 GNQ (issue 15: GNQ spans orders of magnitude).
    assert "gradguard/gnq/log10_GNQ" in tags["histograms"]
    assert {e.step for e in acc.Histograms("gradguard/gnq/log10_GNQ")} == set(per_step)
    assert "gradguard/top_disclosing/text_summary" in tags["tensors"]
    table = acc.Tensors("gradguard/top_disclosing/text_summary")[-1].tensor_proto
    text = table.string_val[0].decode()
    top = guard.ledger.top(4)
    for rank, row in enumerate(top, start=1):
        assert f"| {rank} | {row['index']} | {row['steps_seen']} |" in text
    assert "not a DP guarantee" in text
    assert acc.PluginTagToContent("hparams"), "no hparams summary written"
    assert "gradguard/config/text_summary" in tags["tensors"]

    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["summary"]["step"] == len(per_step)
    assert summary["config"]["policy"] == "drop"
    assert "Gaussian" in summary["bound_assumptions"]
    state = torch.load(os.path.join(log_dir, "gradguard_state.pt"), weights_only=True)
    assert int(state["step"]) == len(per_step)
    for key, value in guard.ledger.state_dict().items():
        assert torch.equal(state["ledger"][key], value), key
    # Only numbers and indices reach the logs: no input row appears in any text entry.
    for tag in tags["tensors"]:
        if tag.endswith("text_summary"):
            for e in acc.Tensors(tag):
                body = e.tensor_proto.string_val[0].decode()
                assert f"{float(ds.tensors[0][0, 0]):.4f}" not in body


# --------------------------------------------------------------------- .grad as the base
def test_drop_rebuild_leaves_out_a_regulariser_on_the_parameters():
    """A loss term on the parameters themselves reaches no captured layer output. A step
    that drops nothing keeps .grad as the loop computed it (Σ g_j / B plus that term); a
    step that drops is rebuilt from the captures, Σ_kept g_j / B exactly, without it (a
    correction of .grad would leave the dropped examples' rounding residue; issue 13,
    item 1). Changed from the old behaviour, which kept the term under drop."""
    ds = make_data(n=16)
    model = make_mlp()
    tau = reference_threshold(model, ds, q=0.6)
    guard = gg.GradGuard(policy="drop", lam=LAM, threshold=tau)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(ds, batch_size=BATCH)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    applied = record_applied_grads(opt)
    dropped = 0
    for x, y, _ in loader:
        params = list(model.parameters())
        G = per_example_grads(model, ce_sum, x, y)
        w = (gnq_from_grads(G, LAM) <= tau).to(F64)
        dropped += int((w == 0).sum())
        reg = torch.cat([(2e-3 * p).detach().reshape(-1) for p in params])  # ∇ 1e-3·‖θ‖²
        expected = (w[:, None] * G).sum(0) / BATCH + (reg if bool((w == 1).all()) else 0)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-3 * sum(p.pow(2).sum() for p in params)
        loss.backward()
        opt.step()
        torch.testing.assert_close(applied[-1], expected, rtol=1e-9, atol=1e-12)
    assert dropped > 0, "nothing was dropped: the test would be vacuous"
    guard.close()


def _drop_step_setup():
    """A drop guard on one batch that drops some but not all examples, and the update
    Σ_kept g_j / B it must apply, from torch.func references."""
    ds = make_data(n=8)
    model = make_mlp()
    tau = reference_threshold(model, ds, q=0.6)
    guard = gg.GradGuard(policy="drop", lam=LAM, threshold=tau)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt,
                                            data_loader=DataLoader(ds, batch_size=BATCH))
    x, y, _ = next(iter(loader))
    G = per_example_grads(model, ce_sum, x, y)
    w = (gnq_from_grads(G, LAM) <= tau).to(F64)
    assert 0 < int(w.sum()) < BATCH
    return guard, model, opt, record_applied_grads(opt), x, y, (w[:, None] * G).sum(0) / BATCH


def test_gradients_modified_before_step_are_rebuilt_with_a_warning():
    """clip_grad_norm_ between backward and step changes .grad in place: gradguard cannot
    correct such a gradient, so it rebuilds Σ w_j g_j / B from the captures, and says so."""
    guard, model, opt, applied, x, y, rebuilt = _drop_step_setup()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(UserWarning, match="modified between backward"):
        opt.step()
    torch.testing.assert_close(applied[-1], rebuilt, rtol=1e-9, atol=1e-12)
    guard.close()


def test_step_hook_reapplies_clipping_to_the_rewritten_gradients_without_warning():
    guard, model, opt, applied, x, y, rebuilt = _drop_step_setup()
    opt.step_hook = lambda o: torch.nn.utils.clip_grad_norm_(o.params, 1e-3)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert rebuilt.norm() > 1e-2  # the clip below does act
    clipped = rebuilt * (1e-3 / (rebuilt.norm() + 1e-6))  # clip_grad_norm_'s own rule
    torch.testing.assert_close(applied[-1], clipped, rtol=1e-9, atol=1e-12)
    guard.close()


def test_replace_config_keeps_config_and_attributes_one_truth(tmp_path):
    guard = gg.GradGuard(policy="drop", threshold=4.0, lam=0.5)
    config = guard.replace_config(log_dir=str(tmp_path), num_examples=20, distributed=False,
                                  log_every=3)
    assert config is guard.config
    assert (guard.log_dir, guard.num_examples, guard.distributed, guard.log_every) == \
        (str(tmp_path), 20, False, 3)
    # untouched settings are kept, in the config and the attributes
    assert (config.policy, config.threshold, config.lam) == ("drop", 4.0, 0.5)
    assert (guard.policy, guard.threshold, guard.lam) == ("drop", 4.0, 0.5)
    with pytest.raises(ValueError, match="log_every"):
        guard.replace_config(log_every=0)
    assert guard.config.log_every == guard.log_every == 3  # a failed change changes nothing
    with pytest.raises(TypeError, match=r"cannot set \['threshold'\]"):
        guard.replace_config(threshold=1.0)  # the policy object was built from it
    with pytest.raises(TypeError, match=r"cannot set \['logdir'\]"):
        guard.replace_config(logdir="x")
    model = make_mlp()
    guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       data_loader=DataLoader(make_data(n=20), batch_size=5))
    with pytest.raises(RuntimeError, match="already attached"):
        guard.replace_config(num_examples=30)
    guard.close()


def test_num_examples_from_the_loader_is_in_the_config():
    guard = gg.GradGuard(lam=LAM)
    model = make_mlp()
    guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       data_loader=DataLoader(make_data(n=17), batch_size=5))
    assert guard.config.num_examples == guard.num_examples == 17
    guard.close()
