"""Recurrent layers and EmbeddingBag against brute-force per-example gradients (a loop of
single-example backward passes in float64: torch.func cannot vmap the fused RNN kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.uniqueness.gnq import gnq_from_grads
from gradguard.uniqueness.hooks import GramHooks, per_example_gnq
from tests.reference import ce_sum, gen, per_example_loop_grads, rel_err

F64 = torch.float64


class RNNClassifier(nn.Module):
    def __init__(self, cell, batch_first, layers, bidirectional, init_state, dim=3, hidden=4):
        super().__init__()
        self.batch_first, self.init_state = batch_first, init_state
        self.inp = nn.Linear(dim, dim)
        self.rnn = cell(dim, hidden, num_layers=layers, batch_first=batch_first,
                        bidirectional=bidirectional)
        directions = 2 if bidirectional else 1
        self.state = nn.Linear(dim, layers * directions * hidden)  # per-example h_0
        self.head = nn.Linear(hidden * directions, 3)
        self.shape = (layers * directions, hidden)

    def forward(self, x):  # x: [B, T, dim] always
        h = torch.tanh(self.inp(x))
        seq = h if self.batch_first else h.transpose(0, 1)
        if self.init_state:
            h0 = self.state(x.mean(1)).view(x.shape[0], *self.shape).transpose(0, 1)
            h0 = h0.contiguous()
            hx = (h0, torch.tanh(h0)) if isinstance(self.rnn, (nn.LSTM,)) or \
                type(self.rnn).__name__ == "DPLSTM" else h0
            out, _ = self.rnn(seq, hx)
        else:
            out, _ = self.rnn(seq)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, -1])


def brute_force(model, x, y):
    return per_example_loop_grads(model, lambda i: ce_sum(model(x[i:i + 1]), y[i:i + 1]),
                                  x.shape[0])


CONFIGS = [(cell, bf, layers, bi, init)
           for cell in (nn.LSTM, nn.GRU, nn.RNN)
           for bf, layers, bi, init in ((True, 1, False, False), (False, 2, True, True),
                                        (True, 2, False, True), (False, 1, True, False))]


@pytest.mark.parametrize("cell,batch_first,layers,bidirectional,init_state", CONFIGS)
@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_torch_rnns_are_exact(cell, batch_first, layers, bidirectional, init_state, B, T):
    torch.manual_seed(B + T + layers)
    model = RNNClassifier(cell, batch_first, layers, bidirectional, init_state).to(F64)
    x = torch.randn(B, T, 3, generator=gen(B * T), dtype=F64)
    y = torch.randint(0, 3, (B,), generator=gen(T))
    ref = gnq_from_grads(brute_force(model, x, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, x, y, 1e-2), ref) < 1e-8


@pytest.mark.parametrize("name", ["DPLSTM", "DPGRU", "DPRNN"])
@pytest.mark.parametrize("batch_first,init_state", [(True, False), (False, True)])
def test_opacus_dp_rnns_are_exact(name, batch_first, init_state):
    # Were 8–460% off: the parent's aliases of its cells' weights counted twice, and
    # h_n [L, B, H] read as unbatched.
    layers = pytest.importorskip("opacus.layers")
    torch.manual_seed(5)
    model = RNNClassifier(getattr(layers, name), batch_first, 2, False, init_state).to(F64)
    x = torch.randn(4, 4, 3, generator=gen(6), dtype=F64)
    y = torch.randint(0, 3, (4,), generator=gen(7))
    ref = brute_force(model, x, y)
    hooks = GramHooks(model, loss_reduction="mean")
    F.cross_entropy(model(x), y).backward()
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-8
    hooks.remove()


class BagClassifier(nn.Module):
    def __init__(self, mode, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(13, 4, mode=mode, padding_idx=padding_idx)
        self.fc = nn.Linear(4, 3)

    def forward(self, text, offsets=None, per_sample_weights=None):
        return self.fc(self.bag(text, offsets, per_sample_weights=per_sample_weights))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_bag_with_offsets(mode, padding_idx):
    # 1-D text of 17 tokens in 4 bags: was refused blaming `fc`, reading the batch as 17.
    torch.manual_seed(8)
    model = BagClassifier(mode, padding_idx).to(F64)
    text = torch.randint(0, 13, (17,), generator=gen(9))
    text[3] = 0
    offsets = torch.tensor([0, 5, 6, 12])
    y = torch.randint(0, 3, (4,), generator=gen(10))
    bounds = [*offsets.tolist(), 17]

    def loss_of(i):
        return ce_sum(model(text[bounds[i]:bounds[i + 1]], torch.tensor([0])), y[i:i + 1])

    ref = per_example_loop_grads(model, loss_of, 4)
    for strategy in ("auto", "materialise"):
        hooks = GramHooks(model, loss_reduction="sum", strategy=strategy)
        ce_sum(model(text, offsets), y).backward()
        assert rel_err(hooks.gram(), ref @ ref.T) < 1e-9
        w = torch.rand(4, generator=gen(11), dtype=F64)
        got = torch.cat([hooks.weighted_grads(w)[p].reshape(-1) for p in model.parameters()])
        assert rel_err(got, w @ ref) < 1e-9
        hooks.remove()
        model.zero_grad()


def test_embedding_bag_2d_with_per_sample_weights():
    torch.manual_seed(12)
    model = BagClassifier("sum").to(F64)
    text = torch.randint(0, 13, (5, 3), generator=gen(13))
    psw = torch.rand(5, 3, generator=gen(14), dtype=F64)
    y = torch.randint(0, 3, (5,), generator=gen(15))

    def loss_of(i):
        return ce_sum(model(text[i:i + 1], per_sample_weights=psw[i:i + 1]), y[i:i + 1])

    ref = per_example_loop_grads(model, loss_of, 5)
    hooks = GramHooks(model, loss_reduction="sum")
    ce_sum(model(text, per_sample_weights=psw), y).backward()
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-9
    hooks.remove()


def test_embedding_bag_max_mode_is_refused_with_its_cause():
    model = BagClassifier("max").to(F64)
    with pytest.raises(ValueError, match=r"mode='max'.*use mode='sum' or 'mean'"):
        per_example_gnq(model, ce_sum, torch.randint(0, 13, (4, 3)), torch.randint(0, 3, (4,)))


def test_packed_sequences_are_refused_with_their_cause():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [3] * x.shape[0], batch_first=True)
            return self.rnn(packed)[1][0]

    with pytest.raises(ValueError, match=r"GRU.*PackedSequence.*padded batch"):
        per_example_gnq(Packed().to(F64), ce_sum, torch.randn(2, 3, 3, dtype=F64),
                        torch.randint(0, 4, (2,)))
