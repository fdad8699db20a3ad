"""Sketched GNQ (strategy="sketch"): unbiased Grams, seeded projections, error against exact GNQ.

References: torch.func per-example gradients (the exact Gram G Gᵀ) and gradguard's exact
routes (themselves tested against brute force elsewhere) on models the default sketch size
was not chosen on.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.uniqueness.hooks import GramHooks, per_example_gnq
from gradguard.uniqueness.kernels.sketch import sketch_projection, sketch_sides
from tests.reference import ce_sum, per_example_grads

F64 = torch.float64


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def sketched_gram(model, x, y, *, sketch_dim, seed, gram_only=False):
    hooks = GramHooks(model, loss_reduction="sum", strategy="sketch", sketch_dim=sketch_dim,
                      sketch_seed=seed, gram_only=gram_only)
    try:
        ce_sum(model(x), y).backward()
        if gram_only:  # every call kept only its sketch rows
            assert all(c.condensed is not None and c.args == ()
                       for calls in hooks._calls.values() for _, c in calls)
        return hooks.gram(), hooks.layer_routes()
    finally:
        hooks.remove()
        model.zero_grad(set_to_none=True)


def _models():
    return {
        # one Kronecker side kept whole (d_in = 3 is small), the other projected
        "linear-narrow-input": (lambda: nn.Sequential(nn.Linear(3, 40), nn.Tanh(),
                                                      nn.Linear(40, 4)), (6, 5, 3)),
        # both sides projected, in several blocks; sequences
        "linear-blocks": (lambda: nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)),
                          (6, 5, 24)),
        # a grouped convolution on unfolded patches
        "conv-groups": (lambda: nn.Sequential(nn.Conv1d(8, 16, 3, groups=2), nn.Tanh(),
                                              nn.Flatten(), nn.Linear(16 * 4, 3)), (6, 8, 6)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_sketched_gram_is_unbiased(name, device):
    """The mean over independent seeds converges to the exact Gram G Gᵀ (each entry within
    5 standard errors of its mean)."""
    factory, shape = _models()[name]
    torch.manual_seed(fresh_seed())
    model = factory().to(F64).to(device)
    x = torch.randn(*shape, dtype=F64).to(device)
    out_shape = model(x).shape
    y = torch.randint(0, out_shape[-1], out_shape[:-1]).to(device)
    G = per_example_grads(model, ce_sum, x, y)
    exact = G @ G.T
    draws = []
    base = fresh_seed()
    for k in range(300):
        K, routes = sketched_gram(model, x, y, sketch_dim=64, seed=base + k)
        draws.append(K)
    assert "sketch" in routes.values()
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert float(draws.std(0).max()) > 0  # it is a random estimate, not the exact route
    assert bool(((mean - exact).abs() <= 5 * stderr + 1e-9 * exact.abs().max()).all())


class _TiedLM(nn.Module):
    """Embedding → tanh → LM head tied to the embedding, with a padding id."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("gram_only", [False, True], ids=["captures", "rows-as-Δ-arrives"])
def test_sketched_tied_embedding_head_gram_is_unbiased(gram_only):
    """The tied weight is sketched as one matrix (head and embedding in one projected space);
    the mean over seeds converges to the exact Gram of the summed per-example gradients,
    also when each use keeps only its sketch rows from the moment its Δ arrives."""
    torch.manual_seed(fresh_seed())
    model = _TiedLM(13, 6).to(F64)
    ids, y = torch.randint(0, 13, (5, 4)), torch.randint(0, 13, (5, 4))
    G = per_example_grads(model, ce_sum, ids, y)
    exact = G @ G.T
    draws = []
    base = fresh_seed()
    for k in range(300):
        K, routes = sketched_gram(model, ids, y, sketch_dim=40, seed=base + k,
                                  gram_only=gram_only)
        draws.append(K)
    assert routes == {"emb.weight (tied)": "sketch", "head.weight (tied)": "sketch"}
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert float(draws.std(0).max()) > 0
    assert bool(((mean - exact).abs() <= 5 * stderr + 1e-9 * exact.abs().max()).all())


def test_sketch_sides_respect_the_budget():
    @settings(max_examples=200, deadline=None)
    @given(d_in=st.integers(1, 5000), d_out=st.integers(1, 5000), m=st.integers(1, 70000))
    def check(d_in, d_out, m):
        for positions in (1, 5, 64, 700):
            k_in, k_out, r = sketch_sides(d_in, d_out, m, positions)
            assert 1 <= k_in <= d_in and 1 <= k_out <= d_out and r >= 1
            assert k_in * k_out * r <= max(m, 1)
    check()


def test_projections_are_seeded_by_seed_layer_and_shape_in_any_process():
    kw = dict(rows=8, cols=5, device="cpu", dtype=F64)
    a = sketch_projection(seed=3, key="h.0.mlp", **kw)
    assert torch.equal(a, sketch_projection(seed=3, key="h.0.mlp", **kw))
    assert not torch.equal(a, sketch_projection(seed=4, key="h.0.mlp", **kw))
    assert not torch.equal(a, sketch_projection(seed=3, key="h.1.mlp", **kw))
    code = ("import torch; from gradguard.uniqueness.kernels.sketch import sketch_projection;"
            "print(sketch_projection(rows=8, cols=5, seed=3, key='h.0.mlp', device='cpu',"
            " dtype=torch.float64).sum().item().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float.fromhex(out.stdout.strip()) == float(a.sum())


def test_same_seed_same_gnq_and_small_layers_stay_exact(device):
    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(30, 40), nn.LayerNorm(40), nn.Tanh(), nn.Linear(40, 3))
    model = model.to(F64).to(device)
    x, y = torch.randn(7, 30, dtype=F64).to(device), torch.randint(0, 3, (7,)).to(device)
    a = per_example_gnq(model, ce_sum, x, y, strategy="sketch", sketch_dim=256, sketch_seed=1)
    b = per_example_gnq(model, ce_sum, x, y, strategy="sketch", sketch_dim=256, sketch_seed=1)
    c = per_example_gnq(model, ce_sum, x, y, strategy="sketch", sketch_dim=256, sketch_seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, routes = sketched_gram(model, x, y, sketch_dim=256, seed=0)
    # the 30×40 layer is sketched; the norm and the 40×3 head (≤ 256 weights) stay exact
    assert routes == {"0": "sketch", "1": "materialise", "3": "ghost"}
    # a sketch as large as every layer: every route exact, GNQ equal to the reference
    exact = gg.gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    big = per_example_gnq(model, ce_sum, x, y, strategy="sketch", sketch_dim=10_000)
    torch.testing.assert_close(big, exact, rtol=1e-8, atol=1e-10)


def test_bad_sketch_dim_is_refused():
    with pytest.raises(ValueError, match="sketch_dim must be a positive integer"):
        GramHooks(nn.Linear(2, 2), strategy="sketch", sketch_dim=0)


def test_guard_in_a_plain_loop_with_sketch(device):
    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4)).to(device)
    data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randint(0, 4, (32,)))
    guard = gg.GradGuard(strategy="sketch", sketch_dim=1024, sketch_seed=5)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=16))
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert guard.hooks.layer_routes()["0"] == "sketch"
        opt.step()
    assert guard.step == 2 and bool(torch.isfinite(guard.last_gnq).all())
    # the run says its GNQ is (partly) an estimate: layer "0" was sketched, "2" was not
    assert guard.summary()["sketched_layers"] == 1
    assert "1 layers whose GNQ is a sketch estimate" in guard._closing_summary()
    guard.close()


def _gpt2_tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=96, n_head=4, vocab_size=100,
                                      n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def _llama_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=96,
                                        intermediate_size=256, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=8))


class _PlainLM(nn.Module):
    """model(ids) → next-token logits, positions spelled out per example."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.model(input_ids=ids, position_ids=positions).logits[:, :-1]


@pytest.mark.parametrize("factory", [_gpt2_tiny, _llama_tiny], ids=["gpt2", "llama"])
def test_default_sketch_meets_the_error_target_on_models_it_was_not_tuned_on(factory, device):
    """Default sketch_dim (chosen on an MLP and a CNN): median relative GNQ error ≤ 5% and
    Spearman ≥ 0.95 against exact GNQ, at B = 32."""
    pytest.importorskip("transformers")
    from scipy.stats import spearmanr

    seed = fresh_seed()
    torch.manual_seed(seed)
    model = _PlainLM(factory()).to(device)
    ids = torch.randint(0, 100, (32, 8)).to(device)
    loss = lambda logits, ids: ce_sum(logits, ids[:, 1:])  # noqa: E731
    exact = per_example_gnq(model, loss, ids, ids, strategy="auto")
    hooks = GramHooks(model, loss_reduction="sum", strategy="sketch")
    loss(model(ids), ids).backward()
    assert "sketch" in hooks.layer_routes().values()
    hooks.remove()
    sketched = per_example_gnq(model, loss, ids, ids, strategy="sketch", sketch_seed=seed)
    rel = ((sketched - exact).abs() / exact).median()
    assert float(rel) <= 0.05, float(rel)
    assert spearmanr(sketched.cpu().numpy(), exact.cpu().numpy()).statistic >= 0.95


def test_gpt2_rows_kept_as_each_delta_arrives_give_the_same_sketch():
    """Under a monitor every sketched GPT-2 layer (Conv1D, tied embedding/LM head) keeps only
    its sketch rows from the moment its output gradient arrives: the same projections, so
    the same Gram as sketching the held captures at the step (to rounding)."""
    pytest.importorskip("transformers")
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = _PlainLM(_gpt2_tiny()).to(F64)
    ids = torch.randint(0, 100, (6, 8))
    loss = lambda logits, ids: ce_sum(logits, ids[:, 1:])  # noqa: E731
    grams = []
    for gram_only in (False, True):
        hooks = GramHooks(model, loss_reduction="sum", strategy="sketch", sketch_dim=1024,
                          sketch_seed=seed, gram_only=gram_only)
        loss(model(ids), ids).backward()
        routes = hooks.layer_routes()
        grams.append(hooks.gram())
        hooks.remove()
        model.zero_grad(set_to_none=True)
    assert routes["model.lm_head.weight (tied)"] == "sketch"
    assert routes["model.transformer.h.0.mlp.c_fc"] == "sketch"
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-10, atol=1e-12)
