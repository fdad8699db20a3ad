"""Layers reduced to their per-example rows as their output gradient arrives (long sequences,
LoRA adapters, sketches under gram_only): the Gram, the per-example gradients and the
reweighted update equal brute force, and the captures are released."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.uniqueness.hooks import GramHooks, UnsupportedLayerError
from tests.reference import ce_sum, per_example_grads

F64 = torch.float64


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def seq_model(conv1d: bool) -> nn.Module:
    layers = [nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)]
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layers[0] = Conv1D(3, 4)  # GPT-2's transposed Linear: [d_in, d_out] weight
    return nn.Sequential(*layers).to(F64)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_long_sequences_keep_per_example_gradients_and_release_the_captures(conv1d):
    if conv1d:
        pytest.importorskip("transformers")
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = seq_model(conv1d)
    B, T = 7, 30  # B·d_in·d_out = 12·B floats per layer against B·T·(d_in + d_out) captured
    x, y = torch.randn(B, T, 4, dtype=F64), torch.randint(0, 5, (B, T))
    hooks = GramHooks(model, loss_reduction="mean")
    parts = (slice(0, 3), slice(3, B))
    for p in parts:  # micro-batches of different sizes, each loss its mean over examples
        (ce_sum(model(x[p]), y[p]) / x[p].shape[0]).backward()
    calls = [c for calls in hooks._calls.values() for _, c in calls]
    assert calls and all(c.condensed is not None and c.args == () and c.out_template is None
                         and all(b is None for b in c.backprops) for c in calls)
    assert set(hooks.layer_routes().values()) == {"materialise"}
    G = per_example_grads(model, ce_sum, x, y)
    torch.testing.assert_close(hooks.gram(), G @ G.T, rtol=1e-9, atol=1e-10)
    per = hooks.per_example_grads()
    flat = torch.cat([per[p].reshape(B, -1) for p in model.parameters()], 1)
    torch.testing.assert_close(flat, G, rtol=1e-9, atol=1e-12)
    w = torch.rand(B, dtype=F64, generator=torch.Generator().manual_seed(seed))
    out = hooks.weighted_grads(w)
    rebuilt = torch.cat([out[p].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(rebuilt, w @ G, rtol=1e-9, atol=1e-12)
    hooks.remove()


def test_short_sequences_keep_the_captures():
    """T = 2: the captures (2·(d_in + d_out) per example) are smaller than the per-example
    gradients (d_in·d_out), so they are kept."""
    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).to(F64)
    x, y = torch.randn(6, 2, 4, dtype=F64), torch.randint(0, 5, (6, 2))
    hooks = GramHooks(model, loss_reduction="sum")
    ce_sum(model(x), y).backward()
    assert all(c.condensed is None for calls in hooks._calls.values() for _, c in calls)
    G = per_example_grads(model, ce_sum, x, y)
    torch.testing.assert_close(hooks.gram(), G @ G.T, rtol=1e-9, atol=1e-10)
    hooks.remove()


def test_sketch_rows_under_gram_only_are_unbiased_and_refuse_rebuilds():
    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)).to(F64)
    x, y = torch.randn(6, 5, 24, dtype=F64), torch.randint(0, 4, (6, 5))
    G = per_example_grads(model, ce_sum, x, y)
    exact = G @ G.T
    base, draws = fresh_seed(), []
    for k in range(300):
        hooks = GramHooks(model, loss_reduction="sum", strategy="sketch", sketch_dim=64,
                          sketch_seed=base + k, gram_only=True)
        ce_sum(model(x), y).backward()
        condensed = [c.condensed["kind"] for _, c in hooks._calls[0]]
        draws.append(hooks.gram())
        if k == 0:
            assert condensed == ["sketch"]
            with pytest.raises(RuntimeError, match="kept only its sketch"):
                hooks.weighted_grads(torch.ones(6, dtype=F64))
            with pytest.raises(RuntimeError, match="kept only its sketch"):
                hooks.per_example_grads()
        hooks.remove()
        model.zero_grad(set_to_none=True)
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert float(draws.std(0).max()) > 0
    assert bool(((mean - exact).abs() <= 5 * stderr + 1e-9 * exact.abs().max()).all())


def test_a_second_backward_through_a_condensed_forward_is_refused():
    torch.manual_seed(fresh_seed())
    model = seq_model(False)
    x, y = torch.randn(3, 30, 4, dtype=F64), torch.randint(0, 5, (3, 30))
    hooks = GramHooks(model, loss_reduction="sum")
    loss = ce_sum(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(UnsupportedLayerError, match="second backward pass.*strategy='ghost'"):
        loss.backward()
    hooks.remove()
    # strategy="ghost" keeps every capture: two backward passes are one doubled gradient
    hooks = GramHooks(model, loss_reduction="sum", strategy="ghost")
    loss = ce_sum(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    G = 2 * per_example_grads(model, ce_sum, x, y)
    torch.testing.assert_close(hooks.gram(), G @ G.T, rtol=1e-9, atol=1e-10)
    hooks.remove()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(6), nn.Linear(6, 12), nn.Linear(12, 6)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(self.norm(x))))


class _Checkpointed(nn.Module):
    """A Linear, two residual blocks run under torch.utils.checkpoint, a head."""

    def __init__(self, mode: str | None):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.mode = mode

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = self.inp(x)
        for block in self.blocks:
            x = block(x) if self.mode is None else \
                checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant", "save_on_cpu"])
def test_gradient_checkpointing_is_exact_and_inputs_are_not_held_through_the_forward(mode):
    import gc

    from gradguard.uniqueness.kernels import LayerCall

    seed = fresh_seed()
    torch.manual_seed(seed)
    model = _Checkpointed(None if mode == "save_on_cpu" else mode).to(F64)
    x, y = torch.randn(5, 7, 6, dtype=F64), torch.randint(0, 3, (5, 7))
    hooks = GramHooks(model, loss_reduction="sum", strategy="ghost")
    if mode == "save_on_cpu":  # a user's own saved-tensor hooks are left alone
        with torch.autograd.graph.save_on_cpu():
            loss = ce_sum(model(x), y)
    else:
        loss = ce_sum(model(x), y)
    if mode == "non-reentrant":
        # the blocks' linear and norm inputs are packed with the checkpoint, not held by
        # gradguard
        # (type(), not isinstance(): gc also lists dead weak proxies, which raise on access)
        held = [c for c in gc.get_objects() if type(c) is LayerCall and c.args]
        block_layers = [m for b in model.blocks for m in (b.norm, b.a, b.b)]
        assert not any(c.args[0].shape[-1] in (6, 12) and c.batch_size == 5
                       and c.hook_state.get("owner") is not None
                       and c.hook_state["owner"].module in block_layers for c in held)
    loss.backward()
    K = hooks.gram()
    w = torch.rand(5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    out = hooks.weighted_grads(w)
    hooks.remove()
    model.mode = None
    G = per_example_grads(model, ce_sum, x, y)
    torch.testing.assert_close(K, G @ G.T, rtol=1e-9, atol=1e-10)
    rebuilt = torch.cat([out[p].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(rebuilt, w @ G, rtol=1e-9, atol=1e-12)
