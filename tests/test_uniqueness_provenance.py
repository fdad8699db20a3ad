"""Batch dimensions traced from the model's inputs, not guessed from sizes (T == B cases
included: that is where guessing was silently wrong), against torch.func per-example
gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard.uniqueness.gnq import gnq_from_grads
from gradguard.uniqueness.hooks import GramHooks, UnsupportedLayerError, per_example_gnq
from tests.reference import ce_sum, gen, per_example_grads, per_example_loop_grads, rel_err

F64 = torch.float64
STRATEGIES = ("auto", "ghost", "materialise")


class BroadcastPositions(nn.Module):
    """Hugging Face style: positions [1, T] (or nanoGPT style [T]) broadcast over the batch."""

    def __init__(self, nanogpt=False, vocab=11, dim=5, max_len=8):
        super().__init__()
        self.nanogpt = nanogpt
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.pos_proj = nn.Linear(dim, dim)  # a shared Linear, broadcast-added too
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        T = ids.shape[1]
        positions = torch.arange(T) if self.nanogpt else torch.arange(T).unsqueeze(0)
        h = self.tok(ids) + self.pos(positions)
        h = torch.tanh(h) - self.pos_proj(torch.linspace(0, 1, T * 5, dtype=h.dtype).view(T, 5))
        return self.head(torch.tanh(h).mean(1))


class TableMix(nn.Module):
    """A custom layer (torch.func fallback) that takes a table shared by the batch."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, generator=gen(0)))

    def forward(self, x, table):
        return torch.tanh(x * self.w + table)


class SharedTableModel(nn.Module):
    def __init__(self, T, dim=4):
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.mix = TableMix(dim)
        self.register_buffer("table", torch.randn(T, dim, generator=gen(1)))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.mix(self.inp(x), self.table).mean(1))


class Elementwise(nn.Module):
    """A custom per-position layer (torch.func fallback)."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, generator=gen(2)))

    def forward(self, x):
        return torch.tanh(x * self.w)


class TimeFirstModel(nn.Module):
    """Batch-first inputs, time-first layers inside: the batch is dimension 1 there."""

    def __init__(self, dim=4):
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.elem = Elementwise(dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.elem(self.inp(x).transpose(0, 1))  # [T, B, d]
        h = torch.tanh(self.mid(h))
        return self.head(h.transpose(0, 1).mean(1))


def check_exact(model, x, y, tol=1e-9):
    model = model.to(F64)
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    for strategy in STRATEGIES:
        got = per_example_gnq(model, ce_sum, x, y, 1e-2, strategy=strategy)
        assert rel_err(got, ref) < tol, strategy


@pytest.mark.parametrize("nanogpt", [False, True])
@pytest.mark.parametrize("B,T", [(4, 4), (3, 6), (5, 2)])
def test_positions_broadcast_over_the_batch_are_attributed_exactly(nanogpt, B, T):
    torch.manual_seed(B * 10 + T)
    ids = torch.randint(0, 11, (B, T), generator=gen(B + T))
    check_exact(BroadcastPositions(nanogpt=nanogpt), ids, torch.randint(0, 3, (B,)))


@pytest.mark.parametrize("B,T", [(5, 5), (4, 6)])
def test_table_shared_by_the_batch_is_not_read_as_batched(B, T):
    # T == B: the old size rule read the [T, d] table as one row per example (157–216% off).
    torch.manual_seed(0)
    x = torch.randn(B, T, 3, generator=gen(3), dtype=F64)
    check_exact(SharedTableModel(T), x, torch.randint(0, 3, (B,), generator=gen(4)))


@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_time_first_layers_use_the_traced_batch_dimension(B, T):
    # T == B: [T, B, d] read as batch-first was 23% off; T != B failed inside vmap.
    torch.manual_seed(1)
    x = torch.randn(B, T, 3, generator=gen(5), dtype=F64)
    check_exact(TimeFirstModel(), x, torch.randint(0, 3, (B,), generator=gen(6)))


def test_gramhooks_in_a_training_step_with_mean_loss():
    torch.manual_seed(2)
    model = BroadcastPositions(nanogpt=True).to(F64)
    ids = torch.randint(0, 11, (4, 4), generator=gen(7))
    y = torch.randint(0, 3, (4,), generator=gen(8))
    ref = per_example_grads(model, ce_sum, ids, y)
    hooks = GramHooks(model, loss_reduction="mean")
    torch.nn.functional.cross_entropy(model(ids), y).backward()
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-9
    w = torch.rand(4, generator=gen(9), dtype=F64)
    got = torch.cat([hooks.weighted_grads(w)[p].reshape(-1) for p in model.parameters()])
    assert rel_err(got, w @ ref) < 1e-9
    hooks.remove()


class MatmulTable(nn.Module):
    def __init__(self, T=4, dim=4):
        super().__init__()
        self.table = nn.Linear(T, dim)  # its output [T, dim] is used as a matrix
        self.inp = nn.Linear(3, T)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.inp(x) @ self.table(torch.eye(4, dtype=x.dtype)))


class Regularised(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.prior = nn.Linear(2, 1)

    def forward(self, x):
        return self.body(x) + 0 * x.sum(), self.prior(torch.ones(1, 2, dtype=x.dtype))


def test_shared_output_without_per_example_attribution_is_refused():
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(UnsupportedLayerError, match=r"'table'.*does not depend on the batch.*"
                                                    r"`matmul`.*Fix"):
        per_example_gnq(MatmulTable().to(F64), ce_sum, x, torch.randint(0, 3, (4,)))

    class Chain(BroadcastPositions):
        def forward(self, ids):  # positions through a second shared layer, then added
            pos = self.pos_proj(self.pos(torch.arange(ids.shape[1])))
            return self.head(torch.tanh(self.tok(ids) + pos).mean(1))

    with pytest.raises(UnsupportedLayerError, match=r"'pos'.*only through other operations"):
        per_example_gnq(Chain().to(F64), ce_sum, torch.randint(0, 11, (3, 4)),
                        torch.randint(0, 3, (3,)))

    def loss(out, y):  # a batch-level term that is no example's own
        logits, prior = out
        return ce_sum(logits, y) + prior.sum()

    with pytest.raises(UnsupportedLayerError, match=r"'prior'.*reaches the loss without"):
        per_example_gnq(Regularised().to(F64), loss, x, torch.randint(0, 3, (4,)))


def _live_calls() -> int:
    import gc

    from gradguard.uniqueness.kernels import LayerCall

    gc.collect()
    return sum(type(o) is LayerCall for o in gc.get_objects())


def test_forwards_that_never_reach_backward_do_not_accumulate():
    # An eval loop with grad enabled (model.eval() does not disable it) used to keep every
    # forward's captures until the next optimizer step: 744 → 1048 MB in 300 passes.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Elementwise(4), nn.Linear(4, 3)).to(F64)
    hooks = GramHooks(model, loss_reduction="sum")
    before = _live_calls()
    model.eval()
    for _ in range(50):
        model(torch.randn(4, 3, dtype=F64))
    assert _live_calls() <= before  # (an earlier test's traceback may still hold one)
    assert sum(len(v) for v in hooks._calls.values()) == 0 and not hooks._workspaces
    model.train()
    ids, y = torch.randn(4, 3, generator=gen(10), dtype=F64), torch.randint(0, 3, (4,))
    ce_sum(model(ids), y).backward()
    ref = per_example_grads(model, ce_sum, ids, y)
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-9
    hooks.remove()


def test_a_refused_forward_leaves_no_tracing_behind():
    model = MatmulTable().to(F64)
    hooks = GramHooks(model, loss_reduction="sum")
    with pytest.raises(UnsupportedLayerError):
        model(torch.randn(4, 3, dtype=F64))
    assert not torch.overrides._get_current_function_mode_stack()
    hooks.remove()


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 5), nanogpt=st.booleans(), seed=st.integers(0, 999))
def test_property_positions_and_tables_any_sizes(B, T, nanogpt, seed):
    # Random B and T, T == B among them: exact, never a size-based guess.
    torch.manual_seed(seed)
    ids = torch.randint(0, 11, (B, T), generator=gen(seed))
    y = torch.randint(0, 3, (B,), generator=gen(seed + 1))
    model = BroadcastPositions(nanogpt=nanogpt).to(F64)
    ref = gnq_from_grads(per_example_grads(model, ce_sum, ids, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, ids, y, 1e-2), ref) < 1e-9
    x = torch.randn(B, T, 3, generator=gen(seed + 2), dtype=F64)
    model = SharedTableModel(T).to(F64)
    ref = gnq_from_grads(per_example_grads(model, ce_sum, x, y), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, x, y, 1e-2), ref) < 1e-9


def test_a_shared_model_argument_without_b_rows_is_not_batched():
    class TableArg(nn.Module):
        def __init__(self, dim=4):
            super().__init__()
            self.inp = nn.Linear(3, dim)
            self.mix = TableMix(dim)
            self.head = nn.Linear(dim, 3)

        def forward(self, x, table):
            return self.head(self.mix(self.inp(x), table).mean(1))

    torch.manual_seed(4)
    model = TableArg().to(F64)
    x = torch.randn(3, 5, 3, generator=gen(16), dtype=F64)
    table = torch.randn(5, 4, generator=gen(17), dtype=F64)  # [T, d], shared, T != B
    y = torch.randint(0, 3, (3,), generator=gen(18))

    def loss_of(i):
        return ce_sum(model(x[i:i + 1], table), y[i:i + 1])

    ref = gnq_from_grads(per_example_loop_grads(model, loss_of, 3), 1e-2)
    assert rel_err(per_example_gnq(model, ce_sum, (x, table), y, 1e-2), ref) < 1e-9


@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_sequence_first_transformer_encoder(B, T):
    # nn.TransformerEncoderLayer defaults to batch_first=False: its LayerNorms and Linears
    # see [T, B, d]; with T == B only the trace tells the batch dimension.
    class SeqFirst(nn.Module):
        def __init__(self, vocab=12, dim=6):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.enc = nn.TransformerEncoderLayer(dim, 2, 8, dropout=0.0)
            self.head = nn.Linear(dim, 3)

        def forward(self, ids):
            h = self.enc(self.emb(ids).transpose(0, 1))  # [T, B, d]
            return self.head(h.mean(0))

    torch.manual_seed(B * T)
    ids = torch.randint(0, 12, (B, T), generator=gen(19))
    check_exact(SeqFirst(), ids, torch.randint(0, 3, (B,), generator=gen(20)))


@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_sequence_first_model_inputs(B, T):
    # GramHooks(batch_first=False): the model takes ids [T, B]; every layer is sequence-first.
    class SeqFirstIds(nn.Module):
        def __init__(self, vocab=12, dim=6):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim, padding_idx=0)
            self.enc = nn.TransformerEncoderLayer(dim, 2, 8, dropout=0.0)
            self.head = nn.Linear(dim, 3)

        def forward(self, ids):  # [T, B]
            return self.head(self.enc(self.emb(ids)).mean(0))

    torch.manual_seed(B + 2 * T)
    model = SeqFirstIds().to(F64)
    ids = torch.randint(0, 12, (T, B), generator=gen(21))
    y = torch.randint(0, 3, (B,), generator=gen(22))
    ref = gnq_from_grads(per_example_loop_grads(
        model, lambda i: ce_sum(model(ids[:, i:i + 1]), y[i:i + 1]), B), 1e-2)
    for strategy in STRATEGIES:
        got = per_example_gnq(model, ce_sum, ids, y, 1e-2, strategy=strategy, batch_first=False)
        assert rel_err(got, ref) < 1e-9, strategy
