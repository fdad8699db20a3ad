"""The hooks engine (per_example_gnq, GramHooks) against torch.func per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.uniqueness.gnq import gnq_from_grads
from gradguard.uniqueness.hooks import GramHooks, UnsupportedLayerError, per_example_gnq
from gradguard.uniqueness.kernels import KERNELS
from tests.reference import ce_sum, gen, gnq_explicit, per_example_grads, rel_err

F64 = torch.float64
STRATEGIES = ("auto", "ghost", "materialise")


class SeqClassifier(nn.Module):
    """Embedding (with padding_idx) + transformer encoder layer (LayerNorm, MHA) + head."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


class TiedLM(nn.Module):
    """Output projection tied to the embedding, and one Linear used twice per forward."""

    def __init__(self, vocab=15, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mid(self.emb(ids)))
        return self.out(torch.tanh(self.mid(h)))


class SeqFirstMHA(nn.Module):
    """MultiheadAttention with batch_first=False inside a batch-first model."""

    def __init__(self, dim=6):
        super().__init__()
        self.proj = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.proj(x).transpose(0, 1)
        a, _ = self.attn(h, h, h)
        return self.head(a.transpose(0, 1).mean(1))


class CrossAttention(nn.Module):
    """Queries attend to a second half of the input: MHA with distinct query and key/value
    inputs, once with the packed in_proj and once with kdim/vdim ≠ embed_dim."""

    def __init__(self, dim=6):
        super().__init__()
        self.q, self.kv = nn.Linear(4, dim), nn.Linear(4, 5)
        self.packed = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.split = nn.MultiheadAttention(dim, 3, kdim=5, vdim=5, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        q, kv = self.q(x[:, :3]), self.kv(x[:, 3:])
        a, _ = self.packed(q, self.q(x[:, 3:]), self.q(x[:, 3:]), need_weights=False)
        b, _ = self.split(a, kv, kv, need_weights=False)
        return self.head(b.mean(1))


def _lazy(model, x):
    model(x)  # materialise LazyLinear shapes
    return model


def cases():
    """(name, model factory, x, y) on fresh random inputs, float64."""
    yield "mlp", lambda: nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5)), \
        torch.randn(7, 10, generator=gen(1), dtype=F64), torch.randint(0, 5, (7,), generator=gen(2))
    x = torch.randn(5, 4, 9, 9, generator=gen(3), dtype=F64)
    yield "cnn", lambda x=x: _lazy(nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, padding_mode="reflect"),
        nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding="same", padding_mode="circular"), nn.Flatten(),
        nn.LazyLinear(3)).to(F64), x), x, torch.randint(0, 3, (5,), generator=gen(4))
    x = torch.randn(4, 3, 9, 9, generator=gen(42), dtype=F64)
    # ≥ 8 input channels per group: per-example gradients from the conv's own
    # weight-backward kernel (zero padding passed through, "same" padded first).
    yield "cnn_wide", lambda x=x: _lazy(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Tanh(),
        nn.Conv2d(16, 4, 3, padding="same"), nn.Flatten(),
        nn.LazyLinear(3)).to(F64), x), x, torch.randint(0, 3, (4,), generator=gen(43))
    x = torch.randn(6, 3, 12, generator=gen(5), dtype=F64)
    yield "conv1d", lambda x=x: _lazy(nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv1d(4, 2, 2, dilation=2), nn.Flatten(),
        nn.LazyLinear(3)).to(F64), x), x, torch.randint(0, 3, (6,), generator=gen(6))
    x = torch.randn(4, 2, 4, 5, 4, generator=gen(7), dtype=F64)
    yield "conv3d", lambda x=x: _lazy(nn.Sequential(
        nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), nn.Flatten(), nn.LazyLinear(3)).to(F64),
        x), x, torch.randint(0, 3, (4,), generator=gen(8))
    ids = torch.randint(0, 20, (5, 6), generator=gen(9))
    ids[:, -2:] = 0  # padding positions
    yield "transformer", SeqClassifier, ids, torch.randint(0, 3, (5,), generator=gen(10))
    yield "tied", TiedLM, torch.randint(0, 15, (4, 5), generator=gen(11)), \
        torch.randint(0, 15, (4, 5), generator=gen(12))
    yield "seq_linear", lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)), \
        torch.randn(5, 4, 6, generator=gen(13), dtype=F64), \
        torch.randint(0, 3, (5, 4), generator=gen(14))
    yield "mha_seq_first", SeqFirstMHA, torch.randn(4, 5, 4, generator=gen(15), dtype=F64), \
        torch.randint(0, 3, (4,), generator=gen(16))
    yield "cross_attention", CrossAttention, torch.randn(4, 7, 4, generator=gen(40), dtype=F64), \
        torch.randint(0, 3, (4,), generator=gen(41))
    yield "norms", lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(),
                                         nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3)), \
        torch.randn(6, 5, generator=gen(17), dtype=F64), \
        torch.randint(0, 3, (6,), generator=gen(18))
    yield "batch_of_one", lambda: nn.Sequential(nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3)), \
        torch.randn(1, 10, generator=gen(19), dtype=F64), torch.tensor([2])


CASES = list(cases())


@pytest.mark.parametrize("name,factory,x,y", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float64_matches_torch_func(name, factory, x, y, strategy, device):
    torch.manual_seed(0)
    model = factory().to(F64).to(device)
    x, y = x.to(device), y.to(device)
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    got = per_example_gnq(model, ce_sum, x, y, 1e-2, strategy=strategy)
    assert rel_err(got, ref) <= 1e-6


def test_float32_model_within_1e3(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 5)).to(device)
    x, y = torch.randn(8, 3, 6, 6, generator=gen(20)), torch.randint(0, 5, (8,), generator=gen(21))
    x, y = x.to(device), y.to(device)
    ref = gnq_from_grads(per_example_grads(model.double(), ce_sum, x.double(), y), 1e-2)
    got = per_example_gnq(model.float(), ce_sum, x, y, 1e-2)
    assert rel_err(got, ref) <= 1e-3


def test_explicit_solve_on_small_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64).to(device)
    x, y = torch.randn(5, 3, generator=gen(22), dtype=F64), torch.randint(0, 2, (5,))
    x, y = x.to(device), y.to(device)
    G = per_example_grads(model, ce_sum, x, y)
    assert rel_err(per_example_gnq(model, ce_sum, x, y, 0.3), gnq_explicit(G, 0.3)) <= 1e-9


def test_sequence_kernel_is_not_the_flattened_approximation():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(F64)
    x = torch.randn(5, 7, 6, generator=gen(23), dtype=F64)
    y = torch.randint(0, 4, (5, 7), generator=gen(24))
    exact = per_example_gnq(model, ce_sum, x, y, 1e-2, strategy="ghost")
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(exact, ref) <= 1e-9
    # The GNQ authors' flattening treats tokens as separate rows of one example's (A, Δ),
    # giving Σ_t (a_it·a_jt)(δ_it·δ_jt): it drops the cross terms t ≠ s.
    out = model(x)
    delta = torch.autograd.grad(ce_sum(out, y), out)[0]
    K_flat = torch.einsum("itd,jtd->ijt", x, x).mul(torch.einsum("ite,jte->ijt", delta, delta))
    K_flat = K_flat.sum(-1) + torch.einsum("ite,jte->ij", delta, delta)
    flat = gg.gnq_from_gram(K_flat, 1e-2)
    assert rel_err(flat, ref) > 1e-2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduction_gives_each_examples_own_gradient(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x, y = torch.randn(6, 4, generator=gen(25), dtype=F64), torch.randint(0, 3, (6,))
    hooks = GramHooks(model, loss_reduction=reduction)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(gg.gnq_from_gram(hooks.gram(), 1e-2), ref) <= 1e-9
    hooks.remove()


def test_frozen_parameters_are_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 4, generator=gen(26), dtype=F64), torch.randint(0, 3, (5,))
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, x, y), ref) <= 1e-9


def test_fully_frozen_layers_capture_nothing():
    """A LoRA-style frozen base layer next to a trainable adapter: GNQ is the adapter's, and
    the frozen layer's inputs and output gradients are not held until the step."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))

    class Adapted(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.down, self.up = nn.Linear(5, 7), nn.Linear(5, 2), nn.Linear(2, 7)
            self.base.requires_grad_(False)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    # the first layer is trainable, so the frozen layer's input and output carry gradient
    model = nn.Sequential(nn.Linear(5, 5), Adapted(), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    x, y = torch.randn(6, 4, 5, dtype=F64), torch.randint(0, 3, (6, 4))
    hooks = GramHooks(model, loss_reduction="sum")
    ce_sum(model(x), y).backward()
    paths = {hooks._owners[idx].path for idx in hooks._calls}
    assert paths == {"0", "1.down", "1.up", "3"}
    G = per_example_grads(model, ce_sum, x, y)
    torch.testing.assert_close(hooks.gram(), G @ G.T, rtol=1e-9, atol=1e-10)
    hooks.remove()


def test_gradient_accumulation_over_micro_batches_is_one_logical_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x, y = torch.randn(8, 4, generator=gen(27), dtype=F64), torch.randint(0, 3, (8,))
    hooks = GramHooks(model, loss_reduction="mean")
    for sl in (slice(0, 3), slice(3, 8)):
        F.cross_entropy(model(x[sl]), y[sl]).backward()
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(gg.gnq_from_gram(hooks.gram(), 1e-2), ref) <= 1e-9
    hooks.remove()


WEIGHTS = {
    "dense": lambda B: torch.rand(B, generator=gen(29), dtype=F64),
    # a policy's correction: few non-zero weights (kernels then pick those rows)
    "sparse": lambda B: torch.zeros(B, dtype=F64).index_fill_(0, torch.tensor([B - 1]), -0.7),
    "zero": lambda B: torch.zeros(B, dtype=F64),
}


@pytest.mark.parametrize("name,factory,x,y", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pattern", list(WEIGHTS))
def test_weighted_grads_match_reference(name, factory, x, y, pattern, device):
    torch.manual_seed(0)
    model = factory().to(F64).to(device)
    x, y = x.to(device), y.to(device)
    B = x.shape[0]
    hooks = GramHooks(model, loss_reduction="sum")
    ce_sum(model(x), y).backward()
    w = WEIGHTS[pattern](B).to(device)
    got = hooks.weighted_grads(w)
    G = per_example_grads(model, ce_sum, x, y)
    expected = (w[:, None] * G).sum(0)
    flat = torch.cat([got[p].reshape(-1) if p in got
                      else torch.zeros(p.numel(), dtype=F64, device=device)
                      for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(flat, expected, rtol=1e-9, atol=1e-12)
    hooks.remove()


def test_workspace_is_reused_across_steps_without_stale_values():
    """The conv unfold buffer outlives the step; Grams stay exact as batches change size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 3)).to(F64)
    hooks = GramHooks(model, loss_reduction="sum", strategy="materialise")
    buffers = set()
    for step, B in enumerate([5, 3, 5, 4]):
        x = torch.randn(B, 3, 5, 5, generator=gen(50 + step), dtype=F64)
        y = torch.randint(0, 3, (B,), generator=gen(60 + step))
        ce_sum(model(x), y).backward()
        ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
        assert rel_err(gg.gnq_from_gram(hooks.gram(), 1e-2), ref) <= 1e-9
        buffers |= {ws["unfold"].data_ptr() for ws in hooks._workspaces.values() if ws}
        hooks.clear()
        model.zero_grad(set_to_none=True)
    assert len(buffers) == 1, "the unfold buffer was reallocated instead of reused"
    hooks.remove()
    assert not hooks._workspaces


def test_remove_leaves_model_as_before():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model.eval()
    hooks = GramHooks(model)
    model(torch.randn(3, 4))
    hooks.remove()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*GroupNorm.*ModuleValidator.fix"):
        per_example_gnq(model, ce_sum, torch.randn(4, 4), torch.randint(0, 3, (4,)))


def test_batchnorm_in_eval_mode_is_per_example_safe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    model[1].running_mean.normal_()
    model.eval()
    x, y = torch.randn(5, 4, generator=gen(30), dtype=F64), torch.randint(0, 3, (5,))
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, x, y), ref) <= 1e-9


def test_parameter_used_outside_its_module_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, self.inner.weight, self.inner.bias)

    with pytest.raises(UnsupportedLayerError, match="never called.*register_kernel"):
        per_example_gnq(Sneaky(), ce_sum, torch.randn(3, 4), torch.randint(0, 3, (3,)))


def test_unvmappable_layer_names_the_layer_and_the_fix():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            if float(x.sum()) > 1e9:  # data-dependent control flow: vmap cannot trace it
                return x
            return x * self.w

    model = nn.Sequential(Stateful(), nn.Linear(4, 3))
    with pytest.raises(NotImplementedError, match="Stateful.*register_kernel"):
        per_example_gnq(model, ce_sum, torch.randn(3, 4), torch.randint(0, 3, (3,)))


def test_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(),
                          nn.Linear(8, 3))
    with pytest.raises(ValueError, match="scale_grad_by_freq=False"):
        per_example_gnq(model, ce_sum, torch.randint(0, 10, (3, 2)), torch.randint(0, 3, (3,)))


def test_registered_kernel_for_custom_layer():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=F64))

        def forward(self, x):
            return x * self.w

    calls = []

    @gg.register_kernel(Scale)
    def scale_grad_sample(layer, activations, backprops):
        calls.append(1)
        return {layer.w: activations[0] * backprops}

    try:
        model = nn.Sequential(Scale(), nn.Tanh(), nn.Linear(4, 3)).to(F64)
        x, y = torch.randn(5, 4, generator=gen(31), dtype=F64), torch.randint(0, 3, (5,))
        ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
        assert rel_err(per_example_gnq(model, ce_sum, x, y), ref) <= 1e-9
        assert calls, "the registered kernel was not used"
    finally:
        KERNELS.pop(Scale)


def test_model_grads_untouched_by_per_example_gnq():
    model = nn.Linear(4, 3)
    model.weight.grad = torch.full_like(model.weight, 7.0)
    per_example_gnq(model, ce_sum, torch.randn(3, 4), torch.randint(0, 3, (3,)))
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 7.0))
    assert model.bias.grad is None


def test_routes_pick_ghost_for_linear_and_materialise_for_long_sequences():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    hooks = GramHooks(model, loss_reduction="sum")
    ce_sum(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    assert set(hooks.layer_routes().values()) == {"ghost"}
    hooks.clear()
    ce_sum(model(torch.randn(4, 50, 3)), torch.randint(0, 2, (4, 50))).backward()
    assert set(hooks.layer_routes().values()) == {"materialise"}  # T² = 2500 > d_in·d_out
    hooks.remove()


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 5), d_in=st.integers(1, 6), d_out=st.integers(2, 5),
       seq=st.booleans(), seed=st.integers(0, 1000))
def test_property_linear_shapes(B, T, d_in, d_out, seq, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).to(F64)
    shape = (B, T, d_in) if seq else (B, d_in)
    x = torch.randn(*shape, generator=gen(seed), dtype=F64)
    y = torch.randint(0, d_out, shape[:-1], generator=gen(seed + 1))
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    for strategy in ("ghost", "materialise"):
        assert rel_err(per_example_gnq(model, ce_sum, x, y, strategy=strategy), ref) <= 1e-6


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 4), c_in=st.sampled_from([2, 4]), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), size=st.integers(5, 8), seed=st.integers(0, 1000))
def test_property_conv2d_shapes(B, c_in, groups, k, stride, padding, dilation, size, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, 4, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(B, c_in, size, size, generator=gen(seed), dtype=F64)
    n_out = conv.to(F64)(x).numel() // B
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3)).to(F64)
    y = torch.randint(0, 3, (B,), generator=gen(seed + 1))
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    for strategy in ("ghost", "materialise"):
        assert rel_err(per_example_gnq(model, ce_sum, x, y, strategy=strategy), ref) <= 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        GramHooks(nn.Linear(2, 2), loss_reduction="avg")
    with pytest.raises(ValueError, match="strategy must be one of"):
        GramHooks(nn.Linear(2, 2), strategy="fast")


def test_input_broadcast_over_the_batch_is_attributed_exactly():
    # Was refused ("leading dimension 1"); the broadcast sum's gradient now gives the
    # per-example Δ of the [1, T] positions (issue 12 §1; see test_uniqueness_provenance).
    class PositionalModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, T], broadcast over B
            return self.head((self.tok(ids) + self.pos(positions)).mean(1))

    model = PositionalModel().to(F64)
    ids, y = torch.randint(0, 10, (3, 5), generator=gen(50)), torch.randint(0, 3, (3,))
    ref = gnq_from_grads(per_example_grads(model, ce_sum, ids, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, ids, y), ref) < 1e-9
