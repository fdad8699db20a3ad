"""GradGuard under DistributedDataParallel and Opacus's DPDDP: 2 CPU processes, gloo, loopback.

One spawn runs every scenario on both ranks (a tiny float64 MLP, 34 examples sharded by
DistributedSampler, so the sampler pads and the last batch is short) and saves what each
rank saw. The tests then compare:

- the ranks with each other: ledgers, per-step indices, GNQ and policy weights bit for bit
  (one ledger, one decision per example), and parameters;
- the ranks with single-process references built here from torch.func per-example
  gradients and explicit P×P solves (``tests.reference``): ledger fields, weights and
  parameters, for local-batch GNQ (each rank's batch) and exact global-batch GNQ;
- a budgeted drop run with global GNQ against one process running GradGuard on the same
  global batches;
- ``policy="monitor"`` against DDP alone, bit for bit; TensorBoard written by rank 0 only.
"""

from __future__ import annotations

import datetime
import glob
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradguard as gg
from gradguard.distributed import DistributedSync, all_gather_rows, resolve_sync
from gradguard.ledger import DisclosureLedger
from gradguard.policies import Quantile, policy_weights
from gradguard.uniqueness.gnq import gnq_from_grads
from tests.reference import ce_sum, gnq_explicit, per_example_grads
from tests.spawn import spawn

# End to end: two gloo processes (kept in CI; deselect with -m "not slow").
pytestmark = pytest.mark.slow

WORLD = 2
N = 34  # not a multiple of WORLD * BATCH: DistributedSampler pads, the last batch is short
BATCH = 4  # per rank
EPOCHS = 2
LR = 0.5
LAM = 1e-2
FIELDS = ("steps_seen", "cum_gnq", "max_gnq", "cum_bound", "censored", "last_step")

SCENARIOS = {
    # name: GradGuard kwargs (None: DDP without gradguard)
    "plain": None,
    "monitor_local": dict(policy="monitor"),
    "monitor_probe": dict(policy="monitor", probe=True),
    "drop_local": dict(policy="drop", threshold=Quantile(0.7, window=3)),
    "clip_global": dict(policy="clip", threshold=Quantile(0.6, window=2),
                        distributed_gnq="global"),
    "budget_global": dict(policy="drop", budget=2.5, distributed_gnq="global"),
}


# ----------------------------------------------------------------------------- shared setup
def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return TensorDataset(x, y)


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _shards(epoch: int) -> list[list[list[int]]]:
    """Per step, each rank's dataset indices (what DistributedSampler + DataLoader give)."""
    ds = _data()
    per_rank = []
    for r in range(WORLD):
        s = DistributedSampler(ds, num_replicas=WORLD, rank=r, shuffle=True, seed=0)
        s.set_epoch(epoch)
        order = list(s)
        per_rank.append([order[i:i + BATCH] for i in range(0, len(order), BATCH)])
    return [list(step) for step in zip(*per_rank)]


def _all_steps() -> list[list[list[int]]]:
    return [step for e in range(EPOCHS) for step in _shards(e)]


# ----------------------------------------------------------------------------- the workers
def _run_ddp(rank: int, kwargs: dict | None, log_dir: str | None) -> dict:
    ds = _data()
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    guard = None
    if kwargs is not None:
        kwargs = dict(kwargs)
        if kwargs.pop("probe", False):  # curvature probe runs on every rank, outside DDP
            g = torch.Generator().manual_seed(5)
            others = TensorDataset(torch.randn(10, 6, generator=g, dtype=torch.float64),
                                   torch.randint(0, 3, (10,), generator=g))
            kwargs["curvature"] = gg.CurvatureProbe(ds, others, every=3, n_examples=8,
                                                    estimator="hutchinson", n_vectors=2)
        guard = gg.GradGuard(lam=LAM, log_dir=log_dir, log_every=3, **kwargs)
        ddp, opt, loader = guard.make_guarded(module=ddp, optimizer=opt, data_loader=loader)
    steps = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            if guard is not None:
                steps.append({"indices": guard.last_indices.clone(),
                              "gnq": guard.last_gnq.clone(),
                              "weights": guard.last_weights.clone()})
    out = {"params": [p.detach().clone() for p in model.parameters()], "steps": steps}
    if guard is not None:
        out["ledger"] = guard.ledger.state_dict()
        out["curvature_mean"] = guard.ledger.curvature_mean()
        out["dropped_total"] = float(guard.summary()["dropped_total"])
        out["is_synced"] = guard.source.distributed
        guard.close()
    return out


def _run_dpddp(rank: int, with_guard: bool) -> dict:
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    ds = _data()
    model = _model()
    opt = torch.optim.SGD(DPDDP(model).parameters(), lr=LR)
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    module, opt, loader = PrivacyEngine().make_private(
        module=DPDDP(model), optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1e6, poisson_sampling=False, grad_sample_mode="hooks")
    guard = None
    if with_guard:
        guard = gg.GradGuard(policy="monitor", lam=LAM)
        module, opt, loader = guard.make_guarded(module=module, optimizer=opt,
                                                 data_loader=loader)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(module(x), y).backward()
            opt.step()
    out = {"params": [p.detach().clone() for p in model.parameters()],
           "expected_batch_size": opt.expected_batch_size}
    if guard is not None:
        out["ledger"] = guard.ledger.state_dict()
        out["is_synced"] = guard.source.distributed
        guard.close()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, kwargs in SCENARIOS.items():
            log_dir = os.path.join(out_dir, "tb") if name == "monitor_local" else None
            results[name] = _run_ddp(rank, kwargs, log_dir)
        results["dpddp_plain"] = _run_dpddp(rank, with_guard=False)
        results["dpddp_monitor"] = _run_dpddp(rank, with_guard=True)
        # uneven rows: rank r sends r + 1 rows
        rows = torch.full((rank + 1, 2), float(rank), dtype=torch.float64)
        results["gathered"] = all_gather_rows(rows)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    spawn(_worker, out_dir, nprocs=WORLD)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
             for r in range(WORLD)]
    return ranks, out_dir


# ----------------------------------------------------------------------------- references
def _reference(policy: str, mode: str, threshold=None, *, denom: float | None = None) -> dict:
    """One process, torch.func per-example gradients, explicit P×P GNQ solves.

    Each global step is each rank's local batch; ``mode="local"`` computes GNQ per rank's
    batch, ``"global"`` over their union. The update is DDP's: the mean over the global
    batch (monitor), or Σ_j w_j g_j / (expected batch per rank × ranks) (policies), or
    Σ_j w_j g_j / ``denom`` when given (Opacus's DPOptimizer).
    """
    ds = _data()
    model = _model()
    ledger = DisclosureLedger(N)
    window: list[torch.Tensor] = []
    steps = []
    for t, shards in enumerate(_all_steps(), start=1):
        G = [per_example_grads(model, ce_sum, ds.tensors[0][s], ds.tensors[1][s]) for s in shards]
        blocks = G if mode == "local" else [torch.cat(G)]
        gnq = torch.cat([gnq_explicit(b, LAM) for b in blocks])
        if policy == "monitor":
            weights, effective = torch.ones_like(gnq), gnq
        else:
            window = (window + [gnq])[-threshold.window:]
            tau = torch.quantile(torch.cat(window), threshold.q)
            weights, effective, start = [], [], 0
            for b in blocks:
                g = gnq[start:start + b.shape[0]]
                start += b.shape[0]
                if policy == "drop":  # one pass; a dropped example's effective GNQ is 0
                    w = (g <= tau).to(torch.float64)
                    eff = gnq_explicit(w[:, None] * b, LAM)
                else:
                    w, eff = policy_weights("clip", b @ b.T, g, LAM, tau=tau)
                weights.append(w)
                effective.append(eff)
            weights, effective = torch.cat(weights), torch.cat(effective)
        all_G = torch.cat(G)
        scale = denom or (all_G.shape[0] if policy == "monitor" else BATCH * WORLD)
        update = (weights[:, None] * all_G).sum(0) / scale
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p -= LR * update[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        indices = torch.tensor([i for s in shards for i in s])
        ledger.update(indices, effective, t)
        steps.append({"indices": indices, "gnq": gnq, "weights": weights})
    return {"params": [p.detach() for p in model.parameters()], "ledger": ledger.state_dict(),
            "steps": steps}


def _assert_ledger_close(got: dict, want: dict, rtol: float = 1e-7) -> None:
    for f in FIELDS:
        a, b = got[f], want[f]
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-9, msg=f"ledger field {f}")
        else:
            assert torch.equal(a, b), f"ledger field {f}: {a} != {b}"


# ----------------------------------------------------------------------------- tests
def test_every_scenario_synchronised(runs):
    ranks, _ = runs
    for name in [*SCENARIOS, "dpddp_monitor"]:
        if name != "plain":
            assert all(r[name]["is_synced"] for r in ranks), name


def test_monitor_is_bit_for_bit_ddp(runs):
    ranks, _ = runs
    for r in ranks:
        for name in ("monitor_local", "monitor_probe"):
            for a, b in zip(r[name]["params"], r["plain"]["params"]):
                assert torch.equal(a, b)
        for a, b in zip(r["dpddp_monitor"]["params"], r["dpddp_plain"]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["monitor_local", "monitor_probe", "drop_local", "clip_global",
                                  "budget_global", "dpddp_monitor"])
def test_ranks_agree_bit_for_bit(runs, name):
    """One ledger, one decision per example, one model on every rank."""
    ranks, _ = runs
    first, second = ranks[0][name], ranks[1][name]
    for f in FIELDS:
        assert torch.equal(first["ledger"][f], second["ledger"][f]), f
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    for s0, s1 in zip(first.get("steps", []), second.get("steps", [])):
        for key in ("indices", "gnq", "weights"):
            assert torch.equal(s0[key], s1[key]), key


def test_curvature_probe_under_ddp(runs):
    """The probe runs on every rank (on the module inside DDP) and the ranks agree on it."""
    ranks, _ = runs
    first, second = ranks[0]["monitor_probe"], ranks[1]["monitor_probe"]
    assert int((first["ledger"]["curv_count"] > 0).sum()) == 8
    torch.testing.assert_close(first["curvature_mean"], second["curvature_mean"],
                               equal_nan=True, rtol=0, atol=0)


def test_steps_cover_the_global_batch_in_rank_order(runs):
    ranks, _ = runs
    want = [torch.tensor([i for s in step for i in s]) for step in _all_steps()]
    got = [s["indices"] for s in ranks[0]["monitor_local"]["steps"]]
    assert len(got) == len(want) == EPOCHS * math.ceil(math.ceil(N / WORLD) / BATCH)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, policy, mode, threshold", [
    ("monitor_local", "monitor", "local", None),
    ("drop_local", "drop", "local", SCENARIOS["drop_local"]["threshold"]),
    ("clip_global", "clip", "global", SCENARIOS["clip_global"]["threshold"]),
])
def test_matches_single_process_reference(runs, name, policy, mode, threshold):
    ranks, _ = runs
    ref = _reference(policy, mode, threshold)
    got = ranks[0][name]
    _assert_ledger_close(got["ledger"], ref["ledger"])
    for a, b in zip(got["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    acted = 0
    for s, r in zip(got["steps"], ref["steps"]):
        torch.testing.assert_close(s["gnq"], r["gnq"], rtol=1e-7, atol=0)
        torch.testing.assert_close(s["weights"], r["weights"], rtol=1e-7, atol=1e-12)
        acted += int((r["weights"] < 1).sum())
    if policy != "monitor":
        assert acted > 0, "the policy never acted: the test would not see a wrong rewrite"


def test_budget_drop_global_matches_one_process_guard(runs):
    """DDP with exact global GNQ equals one process guarding the same global batches."""
    ranks, _ = runs
    ds = _data()
    steps = _all_steps()

    class GlobalBatches:
        batch_size = BATCH * WORLD  # DDP's guarded update divides by this

        def __iter__(self):
            return iter([[i for s in step for i in s] for step in steps])

        def __len__(self):
            return len(steps)

    model = _model()
    guard = gg.GradGuard(lam=LAM, **SCENARIOS["budget_global"])
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(ds, batch_sampler=GlobalBatches()))
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = guard.ledger.state_dict()
    guard.close()
    got = ranks[0]["budget_global"]
    assert int(want["censored"].sum()) > 0, "no example reached the budget"
    _assert_ledger_close(got["ledger"], want, rtol=1e-6)
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-8, atol=1e-10)


def test_dpddp_monitor_ledger_is_local_gnq(runs):
    ranks, _ = runs
    got = ranks[0]["dpddp_monitor"]
    # DPOptimizer divides the summed (here unclipped, noiseless) gradients by its expected
    # batch size, then the ranks average.
    ref = _reference("monitor", "local", denom=got["expected_batch_size"] * WORLD)
    _assert_ledger_close(got["ledger"], ref["ledger"], rtol=1e-6)
    for a, b in zip(got["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_tensorboard_written_by_rank_zero_only(runs):
    _, out_dir = runs
    events = glob.glob(os.path.join(out_dir, "tb", "**", "events.out.tfevents.*"),
                       recursive=True)
    assert len(events) == 1, events
    assert os.path.exists(os.path.join(out_dir, "tb", "summary.json"))


def test_all_gather_rows_uneven(runs):
    ranks, _ = runs
    for r in ranks:
        rows, sizes = r["gathered"]
        assert sizes == [1, 2]
        assert torch.equal(rows, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]],
                                              dtype=torch.float64))


# ----------------------------------------------------------------------------- no processes
def test_local_gnq_upper_bounds_global_gnq():
    """The documented guarantee: a sub-batch's GNQ is at least the whole batch's."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        G = torch.randn(12, 7, generator=g, dtype=torch.float64)
        whole = gnq_from_grads(G, 0.1)
        for part in (slice(0, 6), slice(6, 12), slice(0, 3)):
            local = gnq_from_grads(G[part], 0.1)
            assert bool((local >= whole[part] * (1 - 1e-12)).all())


def test_single_process_needs_no_sync():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert resolve_sync(module=model, optimizer=opt, enabled=None) is None
    assert resolve_sync(module=model, optimizer=opt, enabled=False) is None


def test_bad_distributed_arguments():
    with pytest.raises(ValueError, match="distributed_gnq"):
        gg.GradGuard(distributed_gnq="exact")
    model = nn.Linear(3, 2)
    guard = gg.GradGuard(distributed=True)
    with pytest.raises(ValueError, match="init_process_group"):
        guard.make_guarded(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="distributed_gnq"):
        DistributedSync(gnq_mode="exact")
