"""Host synchronisations per step on the monitor path (issue 12 §3), counted with
:class:`tests.sync_counter.SyncCounter` (every ``.item()``/``bool()``/``float()``, data-
dependent shape and device-to-host copy, attributed to the gradguard line that asked).

Under ``policy="monitor"`` a step reads back exactly one value: whether the Gram, GNQ and
the gradients about to be applied are finite, so that a NaN step is skipped or raised
*before* the optimizer applies it (tested in test_engine.py's non-finite tests). Steps
that write logs (every ``log_every``) read back what they log.

On the CPU two routes read host data on purpose and are not counted there: the ledger's
range check of dataset indices that are on the host anyway (on an accelerator it is an
asynchronous device assert) and the embedding Gram grouped by token id, which the kernel
picks on the CPU only. With ``--device cuda`` nothing is left out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.uniqueness.gnq import gnq_from_gram
from tests.reference import gen
from tests.sync_counter import SyncCounter

# (function) of the routes that read host data on the CPU only (see the module docstring)
CPU_ONLY = ("(_prepare_indices)", "(_embedding_gram_grouped)")
STEPS = 4


def mlp_case(device):
    ds = TensorDataset(torch.randn(32, 6, generator=gen(0)),
                       torch.randint(0, 3, (32,), generator=gen(1)))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    return model, ds, lambda m, x, y: F.cross_entropy(m(x), y)


def gpt2_case(device):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device)
    ids = torch.randint(0, 23, (32, 8), generator=gen(2))

    def loss(m, x, y):
        logits = m(x).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    return model, TensorDataset(ids, ids), loss


def syncs_per_step(case, device, *, log_dir=None, log_every=10, **guard_kwargs):
    """The gradguard syncs of each of STEPS training steps (zero_grad, backward, step)."""
    torch.manual_seed(0)
    model, ds, loss_fn = case(device)
    guard = gg.GradGuard(log_dir=log_dir, log_every=log_every, **guard_kwargs)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    steps = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with SyncCounter(device=device.type) as syncs:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        steps.append(ours(syncs, device))
    guard.close()
    assert guard.step == STEPS
    return steps


def ours(syncs: SyncCounter, device: torch.device) -> list[tuple[str, str]]:
    """gradguard's syncs (not the model's or torch's own), less the CPU-only routes."""
    return [(op, where) for op, where in syncs.events if not where.startswith("outside")
            and not (device.type == "cpu" and where.endswith(CPU_ONLY))]


@pytest.mark.parametrize("case", [mlp_case, gpt2_case], ids=["mlp", "gpt2"])
@pytest.mark.parametrize("guard_kwargs", [{}, {"relative_lam": True},
                                          {"strategy": "sketch", "sketch_dim": 64}],
                         ids=["default", "relative_lam", "sketch"])
def test_monitor_reads_back_one_value_per_step(case, guard_kwargs, device):
    steps = syncs_per_step(case, device, **guard_kwargs)
    for events in steps:
        assert len(events) == 1, events
        op, where = events[0]
        assert op == "_local_scalar_dense" and "gradguard/engine.py" in where \
            and where.endswith("(_nonfinite)"), events


@pytest.mark.parametrize("case", [mlp_case, gpt2_case], ids=["mlp", "gpt2"])
def test_monitor_with_logging_syncs_only_on_logging_steps(case, device, tmp_path):
    steps = syncs_per_step(case, device, log_dir=str(tmp_path), log_every=3)
    for step, events in enumerate(steps, start=1):
        if step % 3:
            assert len(events) == 1, (step, events)
        else:  # what TensorBoard is given is read back, once per log_every steps
            assert len(events) > 1 and any("tensorboard.py" in w for _, w in events)


def test_monitor_under_autocast_and_a_grad_scaler_reads_back_one_value_per_step(device):
    """The loss scale is read as the scaler's own tensor (GradScaler.get_scale() would read
    it back); the scaler's own inf check in scaler.step() is torch's, not counted."""
    model, ds, loss_fn = mlp_case(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)
    guard = gg.GradGuard()
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8), grad_scaler=scaler)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with SyncCounter(device=device.type) as syncs:
            opt.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(x)
            scaler.scale(F.cross_entropy(out.float(), y)).backward()
            scaler.step(opt)
            scaler.update()
        events = ours(syncs, device)
        assert len(events) == 1 and events[0][1].endswith("(_nonfinite)"), events
    assert guard.step == STEPS
    guard.close()


def test_unvalidated_solve_reads_nothing_back_and_says_nan_when_it_fails(device):
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64, device=device)  # λ < 0
    G = torch.randn(4, 3, generator=gen(3), dtype=torch.float64).to(device)
    with SyncCounter() as syncs:
        failed = gnq_from_gram(bad, 1e-3, validate=False)
        zero = gnq_from_gram(torch.zeros(3, 3, device=device), 1e-2, relative=True,
                             validate=False)
        good = gnq_from_gram(G @ G.T, 1e-2, validate=False)
    assert syncs.count == 0, syncs.events
    assert torch.isnan(failed).all()  # a partial factor must not pass as a number
    assert torch.equal(zero, torch.zeros(3, dtype=torch.float64, device=device))
    torch.testing.assert_close(good, gnq_from_gram(G @ G.T, 1e-2), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        gnq_from_gram(bad, 1e-3)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_gram_that_does_not_factorise_is_still_refused_before_the_update(on_nonfinite):
    """The solve no longer raises by itself (no host read): the step's one check does,
    before anything is applied or recorded, whatever on_nonfinite says (it is no NaN)."""
    model, ds, loss_fn = mlp_case(torch.device("cpu"))
    guard = gg.GradGuard(on_nonfinite=on_nonfinite)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    x, y = next(iter(loader))
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    indefinite = torch.eye(8, dtype=torch.float64)
    indefinite[0, 0] = -1.0  # finite, but no Gram of real gradients
    guard.source.gram = lambda: indefinite
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="does not factorise"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert guard.step == 0 and int(guard.ledger.steps_seen.sum()) == 0
    guard.close()
