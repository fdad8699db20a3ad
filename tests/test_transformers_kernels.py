"""GPT-2's Conv1D and the tied embedding / LM head against per-example brute force (float64).

References: one autograd pass per example on its own (tiny GPT-2 configs built from
``transformers`` configs, fresh seeds) and explicit batch-space solves per example.
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

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from gradguard.uniqueness.gnq import gnq_from_gram  # noqa: E402
from gradguard.uniqueness.hooks import GramHooks  # noqa: E402
from tests.reference import ce_sum, gnq_push_through, per_example_grads  # noqa: E402

F64 = torch.float64
transformers.logging.set_verbosity_error()


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).to(F64)


def causal_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


def brute_force_grads(model, ids) -> torch.Tensor:
    """[B, P]: each example's loss differentiated on its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(ids.shape[0]):
        loss = causal_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)




def hooked_gram(model, ids, strategy) -> tuple[torch.Tensor, dict]:
    hooks = GramHooks(model, loss_reduction="sum", strategy=strategy)
    try:
        # (until HF plumbing expands them)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        causal_loss(model(input_ids=ids, position_ids=positions).logits, ids).backward()
        return hooks.gram(), hooks.layer_routes()
    finally:
        hooks.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("strategy", ["ghost", "auto", "materialise"])
def test_gpt2_gram_and_gnq_match_brute_force(strategy, device):
    seed = fresh_seed()
    model = tiny_gpt2(seed).to(device)
    ids = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    K, routes = hooked_gram(model, ids, strategy)
    G = brute_force_grads(model, ids)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gnq_from_gram(K, 1e-2), gnq_push_through(G, 1e-2), rtol=1e-6,
                               atol=1e-9)
    if strategy == "ghost":  # Conv1D and the tied head/embedding take their ghost Grams
        assert routes["transformer.h.0.attn.c_attn"] == "ghost"
        assert routes["transformer.h.1.mlp.c_proj"] == "ghost"
        assert routes["lm_head.weight (tied)"] == routes["transformer.wte.weight (tied)"] == "ghost"


def test_conv1d_weighted_grads_match_brute_force(device):
    seed = fresh_seed()
    model = tiny_gpt2(seed).to(device)
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(seed)).to(device)
    w = torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    hooks = GramHooks(model, loss_reduction="sum", strategy="ghost")
    positions = torch.arange(9, device=device).expand_as(ids)
    causal_loss(model(input_ids=ids, position_ids=positions).logits, ids).backward()
    out = hooks.weighted_grads(w)
    hooks.remove()
    G = brute_force_grads(model, ids)
    ref = w @ G
    start = 0
    for name, p in model.named_parameters():
        n = p.numel()
        expected = ref[start:start + n].reshape(p.shape)
        start += n
        if "c_attn" in name or "c_fc" in name or "c_proj" in name:
            torch.testing.assert_close(out[p], expected, rtol=1e-9, atol=1e-10)


class TiedLM(nn.Module):
    """Embedding → tanh Linear → head tied to the embedding (GPT-2's layout, any sizes)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 6), vocab=st.integers(2, 12), dim=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_property_tied_embedding_head_gram(B, T, vocab, dim, seed):
    torch.manual_seed(seed)
    model = TiedLM(vocab, dim).to(F64)
    ids = torch.randint(0, vocab, (B, T))  # small vocabularies: repeated tokens
    y = torch.randint(0, vocab, (B, T))
    hooks = GramHooks(model, loss_reduction="sum", strategy="ghost")
    ce_sum(model(ids), y).backward()
    K, routes = hooks.gram(), hooks.layer_routes()
    hooks.remove()
    assert routes["head.weight (tied)"] == "ghost"
    G = per_example_grads(model, ce_sum, ids, y)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-10)


def test_tied_gram_over_micro_batches(device):
    """Two forwards before one step: the cross terms between micro-batches are counted."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = TiedLM(11, 4).to(F64).to(device)
    ids, y = torch.randint(0, 11, (5, 4)).to(device), torch.randint(0, 11, (5, 4)).to(device)
    hooks = GramHooks(model, loss_reduction="sum", strategy="ghost")
    ce_sum(model(ids[:2]), y[:2]).backward()
    ce_sum(model(ids[2:]), y[2:]).backward()
    K = hooks.gram()
    hooks.remove()
    G = per_example_grads(model, ce_sum, ids, y)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-10)


def test_materialised_gram_in_blocks_over_micro_batches(monkeypatch):
    """The materialised route forms per-example gradients a few output features at a time
    (here 7 elements per block, so every layer takes several uneven blocks), over two
    micro-batches, GPT-2's transposed Conv1D and the tied embedding/head included."""
    from gradguard.uniqueness.kernels import base

    monkeypatch.setattr(base, "_MATERIALISE_BLOCK_ELEMENTS", 7)
    seed = fresh_seed()
    model = tiny_gpt2(seed)
    ids = torch.randint(0, 97, (5, 6), generator=torch.Generator().manual_seed(seed))
    hooks = GramHooks(model, loss_reduction="sum", strategy="materialise")
    for part in (ids[:2], ids[2:]):
        causal_loss(model(input_ids=part).logits, part).backward()
    K, routes = hooks.gram(), hooks.layer_routes()
    hooks.remove()
    assert set(routes.values()) == {"materialise"}
    G = brute_force_grads(model, ids)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-9)


def test_conv1d_alone_with_bias_on_vectors_and_sequences(device):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(6, 3), nn.Tanh(), Conv1D(4, 6)).to(F64).to(device)
    for shape in ((5, 3), (5, 7, 3)):
        x = torch.randn(*shape, dtype=F64).to(device)
        y = torch.randint(0, 4, shape[:-1]).to(device)
        G = per_example_grads(model, ce_sum, x, y)
        for strategy in ("ghost", "materialise"):
            hooks = GramHooks(model, loss_reduction="sum", strategy=strategy)
            ce_sum(model(x), y).backward()
            torch.testing.assert_close(hooks.gram(), G @ G.T, rtol=1e-9, atol=1e-10)
            hooks.remove()
            model.zero_grad(set_to_none=True)


def test_import_gradguard_does_not_import_transformers():
    code = "import sys, gradguard; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("strategy", ["auto", "materialise"])
def test_gpt2_with_gradient_checkpointing_matches_brute_force(strategy):
    """HF's gradient checkpointing (non-reentrant by default): the captured Conv1D inputs
    are recomputed by the checkpoint, and the Gram is still exact."""
    seed = fresh_seed()
    model = tiny_gpt2(seed)
    ids = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(seed))
    G = brute_force_grads(model, ids)
    model.gradient_checkpointing_enable()
    model.train()
    hooks = GramHooks(model, loss_reduction="sum", strategy=strategy)
    causal_loss(model(input_ids=ids).logits, ids).backward()
    K = hooks.gram()
    hooks.remove()
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-9)
