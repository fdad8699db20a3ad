"""GradGuard under FSDP2 (``fully_shard``): 2 CPU processes, gloo, loopback.

Under ``fully_shard`` each rank's hooks capture the whole inputs and output gradients of
its own examples (FSDP gathers the weights for forward and backward), so per-rank GNQ is
exact as under DDP, while parameters and ``.grad`` are DTensor shards between steps.

One spawn runs every scenario on both ranks and saves what each rank saw: each step's
local batch, the full parameters the step's GNQ was measured at, and the GNQ the guard
recorded. The tests compare that GNQ (per rank, global, with gradient accumulation) and
each clip/drop update with references built here on unsharded copies (torch.func
per-example gradients or a per-example backward loop, explicit float64 solves), check
that ``monitor`` leaves training bit for bit as FSDP alone, and check the refusals'
messages. (Before this, gradguard refused FSDP outright; this file asserted that
refusal.)
"""

from __future__ import annotations

import datetime
import importlib.util
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradguard as gg
from gradguard.uniqueness.losses import causal_lm_loss
from tests.reference import (
    ce_sum,
    gnq_explicit,
    gnq_push_through,
    per_example_grads,
    per_example_loop_grads,
    rel_err,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]

# GPT-2 scenarios need the huggingface extra; the rest runs without it.
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="needs transformers (the huggingface extra)")

WORLD = 2
LAM = 1e-2
LR = 0.3
TAU = {"drop": 300.0, "clip": 200.0}  # absolute thresholds that act on a few examples per step
MLP_N, MLP_BATCH = 22, 4  # per rank; 22 / (2·4): the last batch is short
LM_N, LM_BATCH, LM_T, VOCAB = 12, 3, 6, 23
CNN_N, CNN_BATCH = 10, 5
REFUSALS = ("fsdp1", "attention", "root_not_sharded", "probe", "save_every", "drop_hsdp",
            "opacus", "optimizer_before_sharding", "unguarded")


# ----------------------------------------------------------------------------- models, data
def _mlp() -> nn.Module:
    """Odd widths, so FSDP's dim-0 shards are uneven (4 + 3 rows)."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _mlp_data() -> TensorDataset:
    g = torch.Generator().manual_seed(12)
    return TensorDataset(torch.randn(MLP_N, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (MLP_N,), generator=g))


def _gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(13)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(torch.float64)  # lm_head tied to wte


def _lm_data() -> TensorDataset:
    g = torch.Generator().manual_seed(14)
    return TensorDataset(torch.randint(1, VOCAB, (LM_N, LM_T), generator=g))


def _shard_mlp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])  # a LayerNorm: its class becomes FSDPLayerNorm
    return fully_shard(model)


def _cnn() -> nn.Module:
    torch.manual_seed(15)
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.GroupNorm(1, 5), nn.Tanh(), nn.Flatten(),
                         nn.Linear(30, 3)).double()


def _cnn_data() -> TensorDataset:
    g = torch.Generator().manual_seed(16)
    return TensorDataset(torch.randn(CNN_N, 3, 8, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (CNN_N,), generator=g))


def _shard_cnn(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    return fully_shard(model)


def _shard_gpt2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (every rank all-gathers its shards: a collective)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- the workers
def _train(rank: int, kind: str, guard_kwargs: dict | None, momentum: float = 0.5,
           accumulate: int = 1, world: int = WORLD) -> dict:
    """FSDP training, with a GradGuard when ``guard_kwargs`` is given; ``accumulate``
    micro-batches per step, each loss divided by it (the usual accumulation)."""
    if kind in ("mlp", "cnn"):
        model, ds, batch, epochs = (_shard_mlp(_mlp()), _mlp_data(), MLP_BATCH, 2) \
            if kind == "mlp" else (_shard_cnn(_cnn()), _cnn_data(), CNN_BATCH, 1)
        reduction = "mean"

        def loss_of(batch_):
            x, y = batch_
            return F.cross_entropy(model(x), y)
    else:
        model, ds, batch, epochs = _shard_gpt2(_gpt2()), _lm_data(), LM_BATCH, 1
        reduction = "sum"

        def loss_of(batch_):
            (ids,) = batch_
            return causal_lm_loss(model(input_ids=ids).logits, ids)  # called the plain way
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler)
    guard = None
    if guard_kwargs is not None:
        guard = gg.GradGuard(lam=LAM, **guard_kwargs)
        model, opt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader,
                                                loss_reduction=reduction,
                                                accumulation_steps=accumulate)
    steps = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)  # lazily: the guard tracks what the loader hands out
        while group := list(itertools.islice(batches, accumulate)):
            opt.zero_grad()
            for b in group:
                (loss_of(b) / accumulate).backward()
            params = _full(model)  # what this step's GNQ is measured at
            opt.step()
            if guard is not None:
                b = [torch.cat(parts) for parts in zip(*group)]
                steps.append({"batch": [t.clone() for t in b], "params": params,
                              "gnq": guard.last_gnq.clone(),
                              "weights": guard.last_weights.clone(),
                              "indices": guard.last_indices.clone()})
    out = {"final": _full(model), "steps": steps}
    if guard is not None:
        out["synced"] = guard.source.distributed
        out["ledger_steps_seen"] = guard.ledger.steps_seen.clone()
        guard.close()
    return out


def _refusal(rank: int, name: str, out_dir: str) -> str:
    """The message make_guarded refuses ``name`` with (rank-local: no collective runs)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    kwargs, attach = {}, {}
    model = _mlp()
    make_optimizer = torch.optim.SGD
    if name == "unguarded":  # the sharded parameters' bookkeeping: params= leaves some out
        model = _shard_mlp(model)
        attach = {"params": list(model[3].parameters())}
    elif name == "optimizer_before_sharding":
        early = torch.optim.SGD(model.parameters(), lr=0.1)
        model = _shard_mlp(model)

        def make_optimizer(params, lr):
            return early
    elif name == "opacus":
        from opacus.optimizers import DPOptimizer

        model = _shard_mlp(model)

        def make_optimizer(params, lr):
            return DPOptimizer(torch.optim.SGD(params, lr=lr), noise_multiplier=0.0,
                               max_grad_norm=1.0, expected_batch_size=4)
    elif name == "fsdp1":
        model = FullyShardedDataParallel(model, use_orig_params=True,
                                         device_id=torch.device("cpu"))
    elif name == "drop_hsdp":  # a 2-D mesh (replicate × shard): FSDP does not average
        from torch.distributed.device_mesh import init_device_mesh  # over one group

        kwargs = {"policy": "drop", "threshold": 1.0}
        model = fully_shard(model, mesh=init_device_mesh("cpu", (1, WORLD),
                                                          mesh_dim_names=("replicate", "shard")))
    elif name == "attention":
        model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                           batch_first=True).double()
        fully_shard(model.self_attn)
        fully_shard(model)
    elif name == "root_not_sharded":
        fully_shard(model[0])
    elif name == "probe":
        ds = _mlp_data()
        kwargs = {"curvature": gg.CurvatureProbe(ds, ds, every=1, n_examples=2)}
        model = _shard_mlp(model)
    elif name == "save_every":
        kwargs = {"save_every": 1, "log_dir": os.path.join(out_dir, f"run{rank}")}
        model = _shard_mlp(model)
    try:
        gg.GradGuard(**kwargs).make_guarded(
            module=model, optimizer=make_optimizer(model.parameters(), lr=0.1), **attach)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        return f"{type(exc).__name__}: {exc}"
    return "NOT REFUSED"


def _worker(rank: int, port: int, out_dir: str, world: int = WORLD) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if world == 1:  # FSDP on one rank: gradients are still DTensors
            results = {"mlp_drop": _train(rank, "mlp", {"policy": "drop",
                                                        "threshold": TAU["drop"]},
                                          momentum=0.0, world=1)}
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        results = {
            "mlp_plain": _train(rank, "mlp", None),
            "mlp_monitor": _train(rank, "mlp", {"policy": "monitor"}),
            "mlp_global": _train(rank, "mlp", {"policy": "monitor", "distributed_gnq": "global"}),
            **{f"mlp_{policy}": _train(rank, "mlp", {"policy": policy, "threshold": tau},
                                       momentum=0.0) for policy, tau in TAU.items()},
            "cnn_monitor": _train(rank, "cnn", {"policy": "monitor"}),
            "mlp_accumulate": _train(rank, "mlp", {"policy": "monitor"}, accumulate=2),
            "refusals": {name: _refusal(rank, name, out_dir) for name in REFUSALS},
        }
        if HAS_TRANSFORMERS:
            results["gpt2_plain"] = _train(rank, "gpt2", None)
            results["gpt2_monitor"] = _train(rank, "gpt2", {"policy": "monitor"})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: str, world: int) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), out_dir, world), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _spawn(str(tmp_path_factory.mktemp("fsdp")), WORLD)


# ----------------------------------------------------------------------------- references
def _own(rank: int, sizes: list[int]) -> slice:
    """Rank ``rank``'s examples in the global batch (rank order)."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _mlp_rows(params: dict, x: torch.Tensor, y: torch.Tensor, factory=_mlp) -> torch.Tensor:
    """[B, P] per-example gradients of an unsharded MLP (or ``factory()``) at ``params``
    (torch.func)."""
    model = factory()
    model.load_state_dict(params)
    return per_example_grads(model, ce_sum, x, y)


def _lm_rows(params: dict, ids: torch.Tensor) -> torch.Tensor:
    """[B, P] per-example gradients of an unsharded GPT-2 at ``params`` (one backward per
    example, the model called on that example alone)."""
    model = _gpt2()
    model.load_state_dict(params, strict=False)  # lm_head.weight is wte.weight
    return per_example_loop_grads(
        model, lambda i: causal_lm_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]),
        ids.shape[0])


# ----------------------------------------------------------------------------- tests
def test_fsdp_is_synchronised_like_ddp(runs):
    for r in runs:
        for name in ("mlp_monitor", "mlp_global", "cnn_monitor", "mlp_drop"):
            assert r[name]["synced"], name
    # one ledger: every example of the global batch counted on every rank
    for name in ("mlp_monitor", "cnn_monitor"):
        assert torch.equal(runs[0][name]["ledger_steps_seen"], runs[1][name]["ledger_steps_seen"])
        assert int(runs[0][name]["ledger_steps_seen"].sum()) == sum(
            s["batch"][0].shape[0] for r in runs for s in r[name]["steps"])


@pytest.mark.parametrize("name", ["mlp_monitor", "cnn_monitor", "mlp_accumulate",
                                  pytest.param("gpt2_monitor", marks=needs_transformers)])
def test_per_rank_gnq_matches_per_example_reference(runs, name):
    """Each rank's GNQ is that of its own batch, as under DDP (distributed_gnq='local');
    with gradient accumulation, of all its micro-batches of the step."""
    kind = name.split("_")[0]
    for step in range(len(runs[0][name]["steps"])):
        sizes = [r[name]["steps"][step]["batch"][0].shape[0] for r in runs]
        for rank, r in enumerate(runs):
            s = r[name]["steps"][step]
            if kind in ("mlp", "cnn"):
                factory = _mlp if kind == "mlp" else _cnn
                ref = gnq_explicit(_mlp_rows(s["params"], *s["batch"], factory=factory), LAM)
            else:
                ref = gnq_push_through(_lm_rows(s["params"], s["batch"][0]), LAM)
            got = s["gnq"][_own(rank, sizes)]
            assert rel_err(got, ref) < 1e-8, (kind, step, rank)
        # the ranks hold the same global-batch vector
        assert torch.equal(runs[0][name]["steps"][step]["gnq"], runs[1][name]["steps"][step]["gnq"])


def test_global_gnq_matches_reference_over_both_ranks_batches(runs):
    """distributed_gnq='global' works under FSDP too: per-example gradients are whole on
    each rank (from whole captures), so they are gathered exactly as under DDP."""
    for step in range(len(runs[0]["mlp_global"]["steps"])):
        rows = torch.cat([_mlp_rows(r["mlp_global"]["steps"][step]["params"],
                                    *r["mlp_global"]["steps"][step]["batch"]) for r in runs])
        ref = gnq_explicit(rows, LAM)
        for r in runs:
            assert rel_err(r["mlp_global"]["steps"][step]["gnq"], ref) < 1e-8, step


@pytest.mark.parametrize("kind", ["mlp", pytest.param("gpt2", marks=needs_transformers)])
def test_monitor_trains_bit_for_bit_as_fsdp_alone(runs, kind):
    for r in runs:
        plain, guarded = r[f"{kind}_plain"]["final"], r[f"{kind}_monitor"]["final"]
        assert plain.keys() == guarded.keys()
        for n in plain:
            assert torch.equal(plain[n], guarded[n]), n
        init = _full_init(kind)
        assert any(not torch.equal(plain[n], init[n]) for n in plain)  # it did train


def _full_init(kind: str) -> dict[str, torch.Tensor]:
    model = _mlp() if kind == "mlp" else _gpt2()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,kind,words", [
    ("fsdp1", "ValueError", ["FullyShardedDataParallel", "fully_shard", "DDP"]),
    ("drop_hsdp", "NotImplementedError", ["policy='drop'", "1-D mesh", "(2, 2)",
                                          "policy='monitor'"]),
    ("attention", "UnsupportedLayerError", ["self_attn", "MultiheadAttention", "DDP"]),
    ("root_not_sharded", "ValueError", ["fully_shard on the root", "3.weight"]),
    ("probe", "NotImplementedError", ["curvature probe", "DDP"]),
    ("save_every", "NotImplementedError", ["save_every", "torch.distributed.checkpoint"]),
    ("opacus", "NotImplementedError", ["DPOptimizer", "DPDDP"]),
    ("unguarded", "ValueError", ["does not guard: ['0.weight', '0.bias', '2.weight', "
                                 "'2.bias']"]),
    ("optimizer_before_sharding", "ValueError", ["not the model's",
                                                 "build the optimizer after sharding"]),
])
def test_refusals_name_what_works(runs, name, kind, words):
    for r in runs:
        message = r["refusals"][name]
        assert message.startswith(kind + ":"), message
        for w in words:
            assert w in message, (w, message)


@pytest.mark.parametrize("policy", ["drop", "clip"])
def test_policy_update_is_the_ranks_average_of_the_weighted_examples(runs, policy):
    """clip/drop under FSDP: each rank's sharded ``.grad`` is its shard of
    Σ_ranks Σ_j w_j g_j / (B · ranks), as under DDP; checked step by step on plain SGD
    against torch.func per-example gradients at the step's full parameters."""
    _check_policy_updates(runs, policy)


def test_drop_on_a_one_rank_fsdp_group(tmp_path):
    """FSDP on one rank still holds DTensor gradients: the rewrite goes through the same
    collective steps (a one-rank group), not refused, not wrong."""
    _check_policy_updates(_spawn(str(tmp_path), 1), "drop")


def _check_policy_updates(runs: list[dict], policy: str) -> None:
    name = f"mlp_{policy}"
    names = [n for n, _ in _mlp().named_parameters()]
    steps = runs[0][name]["steps"]
    acted = 0
    for t, s in enumerate(steps):
        G = [_mlp_rows(r[name]["steps"][t]["params"], *r[name]["steps"][t]["batch"])
             for r in runs]
        torch.testing.assert_close(s["gnq"], torch.cat([gnq_explicit(g, LAM) for g in G]),
                                   rtol=1e-8, atol=0)
        w = s["weights"]
        if policy == "drop":
            assert torch.equal(w, (s["gnq"] <= TAU["drop"]).to(w.dtype))
        else:  # no example's effective GNQ (its weighted rank batch's) exceeds τ
            start = 0
            for g in G:
                wg = w[start:start + g.shape[0], None] * g
                start += g.shape[0]
                assert float(gnq_explicit(wg, LAM).max()) <= TAU["clip"] * (1 + 1e-6)
        acted += int((w < 1).sum())
        update = (w[:, None] * torch.cat(G)).sum(0) / (MLP_BATCH * len(runs))
        after = steps[t + 1]["params"] if t + 1 < len(steps) else runs[0][name]["final"]
        before = torch.cat([s["params"][n].reshape(-1) for n in names])
        torch.testing.assert_close(torch.cat([after[n].reshape(-1) for n in names]),
                                   before - LR * update, rtol=1e-10, atol=1e-12)
    assert acted > 0, "the policy never acted: the test would not see a wrong rewrite"
    for r in runs[1:]:  # one model on every rank
        for n in names:
            assert torch.equal(runs[0][name]["final"][n], r[name]["final"][n]), n
