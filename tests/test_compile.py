"""``torch.compile`` and the guard in a plain loop: GNQ of the compiled model against
torch.func per-example gradients of the uncompiled model (explicit float64 solves)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from tests.reference import ce_sum, gen, gnq_explicit, per_example_grads

LAM = 1e-2


class TinySeq(nn.Module):
    """Token model: Embedding, a Linear over [B, T, d], LayerNorm, mean pooling, a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.norm(torch.tanh(self.mix(self.emb(ids))))
        return self.head(h.mean(1))


def _data(seed: int) -> TensorDataset:
    g = gen(seed)
    return TensorDataset(torch.randint(0, 11, (12, 5), generator=g),
                         torch.randint(0, 3, (12,), generator=g))


@pytest.mark.parametrize("order", ["compile_then_guard", "guard_then_compile"])
def test_compiled_model_gnq_is_exact(order):
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    net = TinySeq().double()
    data = _data(seed)
    guard = gg.GradGuard(lam=LAM)
    compiled = torch.compile(net) if order == "compile_then_guard" else net
    model, opt, loader = guard.make_guarded(
        module=compiled, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=6))
    if order == "guard_then_compile":
        model = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on the graph breaks at the hooks
        for x, y in loader:
            # reference first: per-example gradients of the uncompiled net at these weights
            want = gnq_explicit(per_example_grads(net, ce_sum, x, y), LAM)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            torch.testing.assert_close(guard.last_gnq, want, rtol=1e-8, atol=1e-10)
    assert guard.step == 2
    guard.close()
