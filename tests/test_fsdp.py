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

import pytest
import torch
import torch.distributed as dist
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
from tests.spawn import spawn

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
# (kind, policy): absolute thresholds that act on a few examples per step
TAU = {("mlp", "drop"): 300.0, ("mlp", "clip"): 200.0, ("encoder", "drop"): 300.0}
MLP_N, MLP_BATCH = 22, 4  # per rank; 22 / (2·4): the last batch is short
LM_N, LM_BATCH, LM_T, VOCAB = 12, 3, 6, 23
CNN_N, CNN_BATCH = 10, 5
REFUSALS = ("fsdp1", "attention", "root_not_sharded", "probe", "save_every", "drop_hsdp",
            "opacus", "optimizer_before_sharding", "unguarded")


# ----------------------------------------------------------------------------- models, data
def _sharded(blocks_of):
    """fully_shard each block ``blocks_of(model)`` names, then the root."""
    def shard(model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for block in blocks_of(model):
            fully_shard(block)
        return fully_shard(model)
    return shard


def _mlp() -> nn.Module:
    """Odd widths, so FSDP's dim-0 shards are uneven (4 + 3 rows)."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _cnn() -> nn.Module:
    torch.manual_seed(15)
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.GroupNorm(1, 5), nn.Tanh(), nn.Flatten(),
                         nn.Linear(30, 3)).double()


class _Encoder(nn.Module):
    """A transformer layer (nn.MultiheadAttention, whose kernel reads its weights' values)
    and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(17)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                                batch_first=True).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def _gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(13)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(torch.float64)  # lm_head tied to wte


def _llama() -> nn.Module:
    """Rotary positions, no biases, and LlamaRMSNorm (torch.func: reads its weight)."""
    import transformers

    torch.manual_seed(18)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(torch.float64)


def _data(kind: str) -> TensorDataset:
    g = torch.Generator().manual_seed(12)
    if kind in ("gpt2", "llama"):
        return TensorDataset(torch.randint(1, VOCAB, (LM_N, LM_T), generator=g))
    n, shape = {"mlp": (MLP_N, (6,)), "cnn": (CNN_N, (3, 8)), "encoder": (CNN_N, (5, 8))}[kind]
    return TensorDataset(torch.randn(n, *shape, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


# kind: (model factory, sharding, per-rank batch, epochs)
KINDS = {
    "mlp": (_mlp, _sharded(lambda m: [m[0], m[2]]), MLP_BATCH, 2),  # m[2]: FSDPLayerNorm
    "cnn": (_cnn, _sharded(lambda m: [m[0]]), CNN_BATCH, 1),
    "encoder": (_Encoder, _sharded(lambda m: [m.layer]), CNN_BATCH, 1),
    "gpt2": (_gpt2, _sharded(lambda m: m.transformer.h), LM_BATCH, 1),
    "llama": (_llama, _sharded(lambda m: m.model.layers), LM_BATCH, 1),
}
LANGUAGE_MODELS = ("gpt2", "llama")


def _shard_mlp(model: nn.Module) -> nn.Module:
    return KINDS["mlp"][1](model)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (every rank all-gathers its shards: a collective)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- the workers
def _train(rank: int, kind: str, guard_kwargs: dict | None, momentum: float = 0.5,
           accumulate: int = 1, world: int = WORLD) -> dict:
    """FSDP training, with a GradGuard when ``guard_kwargs`` is given; ``accumulate``
    micro-batches per step, each loss divided by it (the usual accumulation)."""
    factory, shard, batch, epochs = KINDS[kind]
    model, ds = shard(factory()), _data(kind)
    reduction = "sum" if kind in LANGUAGE_MODELS else "mean"

    def loss_of(batch_):
        if kind in LANGUAGE_MODELS:
            (ids,) = batch_
            return causal_lm_loss(model(input_ids=ids).logits, ids)  # called the plain way
        x, y = batch_
        return F.cross_entropy(model(x), y)

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
        ds = _data("mlp")
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
                                                        "threshold": TAU["mlp", "drop"]},
                                          momentum=0.0, world=1)}
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        results = {
            "mlp_plain": _train(rank, "mlp", None),
            "mlp_monitor": _train(rank, "mlp", {"policy": "monitor"}),
            "mlp_global": _train(rank, "mlp", {"policy": "monitor", "distributed_gnq": "global"}),
            **{f"{kind}_{policy}": _train(rank, kind, {"policy": policy, "threshold": tau},
                                          momentum=0.0) for (kind, policy), tau in TAU.items()},
            "cnn_monitor": _train(rank, "cnn", {"policy": "monitor"}),
            "encoder_plain": _train(rank, "encoder", None),
            "encoder_monitor": _train(rank, "encoder", {"policy": "monitor"}),
            "mlp_accumulate": _train(rank, "mlp", {"policy": "monitor"}, accumulate=2),
            "refusals": {name: _refusal(rank, name, out_dir) for name in REFUSALS},
        }
        if HAS_TRANSFORMERS:
            results["gpt2_plain"] = _train(rank, "gpt2", None)
            results["gpt2_monitor"] = _train(rank, "gpt2", {"policy": "monitor"})
            results["llama_plain"] = _train(rank, "llama", None)
            results["llama_monitor"] = _train(rank, "llama", {"policy": "monitor"})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def _spawn(out_dir: str, world: int) -> list[dict]:
    spawn(_worker, out_dir, world, nprocs=world)
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


def _rows(kind: str, params: dict, batch: list[torch.Tensor]) -> torch.Tensor:
    """[B, P] per-example gradients of an unsharded ``kind`` model at ``params``: by
    torch.func, or for language models one backward per example, called on it alone."""
    model = KINDS[kind][0]()
    model.load_state_dict(params, strict=kind != "gpt2")  # GPT-2: lm_head.weight is wte's
    if kind not in LANGUAGE_MODELS:
        return per_example_grads(model, ce_sum, *batch)
    (ids,) = batch
    return per_example_loop_grads(
        model, lambda i: causal_lm_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]),
        ids.shape[0])


def _gnq(kind: str, G: torch.Tensor) -> torch.Tensor:
    """Explicit float64 solves: P × P where P is small, else one batch-space solve per
    example (push-through)."""
    return gnq_push_through(G, LAM) if kind in LANGUAGE_MODELS else gnq_explicit(G, LAM)


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


@pytest.mark.parametrize("name", [
    "mlp_monitor", "cnn_monitor", "encoder_monitor", "mlp_accumulate",
    pytest.param("gpt2_monitor", marks=needs_transformers),
    pytest.param("llama_monitor", marks=needs_transformers)])
def test_per_rank_gnq_matches_per_example_reference(runs, name):
    """Each rank's GNQ is that of its own batch, as under DDP (distributed_gnq='local');
    with gradient accumulation, of all its micro-batches of the step. (encoder, llama:
    layers whose kernels read their sharded weights' values, gathered whole.)"""
    kind = name.split("_")[0]
    for step in range(len(runs[0][name]["steps"])):
        sizes = [r[name]["steps"][step]["batch"][0].shape[0] for r in runs]
        for rank, r in enumerate(runs):
            s = r[name]["steps"][step]
            ref = _gnq(kind, _rows(kind, s["params"], s["batch"]))
            got = s["gnq"][_own(rank, sizes)]
            assert rel_err(got, ref) < 1e-8, (kind, step, rank)
        # the ranks hold the same global-batch vector
        assert torch.equal(runs[0][name]["steps"][step]["gnq"], runs[1][name]["steps"][step]["gnq"])


def test_global_gnq_matches_reference_over_both_ranks_batches(runs):
    """distributed_gnq='global' works under FSDP too: per-example gradients are whole on
    each rank (from whole captures), so they are gathered exactly as under DDP."""
    for step in range(len(runs[0]["mlp_global"]["steps"])):
        rows = torch.cat([_rows("mlp", r["mlp_global"]["steps"][step]["params"],
                                r["mlp_global"]["steps"][step]["batch"]) for r in runs])
        ref = gnq_explicit(rows, LAM)
        for r in runs:
            assert rel_err(r["mlp_global"]["steps"][step]["gnq"], ref) < 1e-8, step


@pytest.mark.parametrize("kind", ["mlp", "encoder",
                                  pytest.param("gpt2", marks=needs_transformers),
                                  pytest.param("llama", marks=needs_transformers)])
def test_monitor_trains_bit_for_bit_as_fsdp_alone(runs, kind):
    """(encoder, llama: with sharded parameters gathered whole and put back each step)"""
    for r in runs:
        plain, guarded = r[f"{kind}_plain"]["final"], r[f"{kind}_monitor"]["final"]
        assert plain.keys() == guarded.keys()
        for n in plain:
            assert torch.equal(plain[n], guarded[n]), n
        init = _full_init(kind)
        assert any(not torch.equal(plain[n], init[n]) for n in plain)  # it did train


def _full_init(kind: str) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in KINDS[kind][0]().named_parameters()}


@pytest.mark.parametrize("name,kind,words", [
    ("fsdp1", "ValueError", ["FullyShardedDataParallel", "fully_shard", "DDP"]),
    ("drop_hsdp", "NotImplementedError", ["policy='drop'", "1-D mesh", "(2, 2)",
                                          "policy='monitor'"]),
    ("attention", "UnsupportedLayerError", ["self_attn", "MultiheadAttention",
                                            "fully_shard on the block"]),
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


@pytest.mark.parametrize("name", ["mlp_drop", "mlp_clip", "encoder_drop"])
def test_policy_update_is_the_ranks_average_of_the_weighted_examples(runs, name):
    """clip/drop under FSDP: each rank's sharded ``.grad`` is its shard of
    Σ_ranks Σ_j w_j g_j / (B · ranks), as under DDP; checked step by step on plain SGD
    against torch.func per-example gradients at the step's full parameters."""
    _check_policy_updates(runs, name)


def test_drop_on_a_one_rank_fsdp_group(tmp_path):
    """FSDP on one rank still holds DTensor gradients: the rewrite goes through the same
    collective steps (a one-rank group), not refused, not wrong."""
    _check_policy_updates(_spawn(str(tmp_path), 1), "mlp_drop")


def _check_policy_updates(runs: list[dict], name: str) -> None:
    kind, policy = name.split("_")
    names = list(_full_init(kind))
    steps = runs[0][name]["steps"]
    acted = 0
    for t, s in enumerate(steps):
        G = [_rows(kind, r[name]["steps"][t]["params"], r[name]["steps"][t]["batch"])
             for r in runs]
        torch.testing.assert_close(s["gnq"], torch.cat([_gnq(kind, g) for g in G]),
                                   rtol=1e-8, atol=0)
        w = s["weights"]
        if policy == "drop":
            assert torch.equal(w, (s["gnq"] <= TAU[kind, "drop"]).to(w.dtype))
        else:  # no example's effective GNQ (its weighted rank batch's) exceeds τ
            start = 0
            for g in G:
                wg = w[start:start + g.shape[0], None] * g
                start += g.shape[0]
                assert float(_gnq(kind, wg).max()) <= TAU[kind, "clip"] * (1 + 1e-6)
        acted += int((w < 1).sum())
        update = (w[:, None] * torch.cat(G)).sum(0) / (KINDS[kind][2] * len(runs))
        after = steps[t + 1]["params"] if t + 1 < len(steps) else runs[0][name]["final"]
        before = torch.cat([s["params"][n].reshape(-1) for n in names])
        torch.testing.assert_close(torch.cat([after[n].reshape(-1) for n in names]),
                                   before - LR * update, rtol=1e-10, atol=1e-12)
    assert acted > 0, "the policy never acted: the test would not see a wrong rewrite"
    for r in runs[1:]:  # one model on every rank
        for n in names:
            assert torch.equal(runs[0][name]["final"][n], r[name]["final"][n]), n
