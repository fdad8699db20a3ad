"""GradGuardCallback on a real lightning.pytorch.Trainer (CPU, tiny model built in code).

Compared: the callback's monitor run against the same Trainer without it (bit for bit);
its ledger and parameters under a drop policy against GradGuard in a plain PyTorch loop
over the same batches; its first step's GNQ against torch.func gradients with explicit
P×P solves; checkpoint round trip and resume; the TensorBoard run directory.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402
from tests.reference import assert_same_run, ce_sum, gnq_explicit, per_example_grads  # noqa: E402

N, BATCH, LR, LAM = 24, 6, 0.3, 1e-2


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g))


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return net


class LitClassifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about gradguard."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.seen: list[torch.Tensor] = []  # the inputs of every training batch, in order

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.detach().clone())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(7))


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=callbacks,
                      logger=TensorBoardLogger(str(tmp_path), name="lit"),
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path), **kwargs)


def _fit(tmp_path, callback=None, **kwargs):
    module = LitClassifier()
    trainer = _trainer(tmp_path, [callback] if callback is not None else [], **kwargs)
    trainer.fit(module, _loader())
    return module, trainer


def test_monitor_leaves_training_bit_for_bit(tmp_path):
    plain, _ = _fit(tmp_path / "plain")
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    guarded, _ = _fit(tmp_path / "guarded", cb)
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)
    assert int(cb.guard.ledger.steps_seen.sum()) == 2 * N
    assert cb.guard.step == 2 * N // BATCH


@pytest.mark.parametrize("clip", [None, 0.05])
def test_drop_policy_matches_plain_loop(tmp_path, clip):
    """Same batches, same init: the callback equals GradGuard in a hand-written loop; with
    gradient_clip_val, the norm of the update the policy rebuilt is clipped."""
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    cb = GradGuardCallback(**kwargs)
    lit, _ = _fit(tmp_path, cb, gradient_clip_val=clip)
    # Which examples each batch held, read off the inputs training_step received (the rows
    # are distinct), not from gradguard's own bookkeeping.
    X = _data().tensors[0]
    batches = [[int((row == X).all(1).nonzero()) for row in x] for x in lit.seen]
    assert len(batches) == 2 * N // BATCH

    net = _net()
    guard = gg.GradGuard(**kwargs)
    model, opt, loader = guard.make_guarded(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(_data(), batch_sampler=batches))
    norms = []  # of the rebuilt updates, before the clip in step_hook
    if clip is not None:
        opt.step_hook = lambda o: norms.append(float(torch.nn.utils.clip_grad_norm_(o.params,
                                                                                    clip)))
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:  # as Lightning does, before the step
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    assert float(guard.summary()["dropped_total"]) > 0
    assert clip is None or max(norms) > clip, "the clip never acted: the test is vacuous"
    assert_same_run(cb.guard.ledger, guard.ledger, lit.net.parameters(), net.parameters())
    guard.close()


def test_first_step_gnq_matches_torch_func(tmp_path):
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    _fit(tmp_path, cb, max_steps=1)
    idx = cb.guard.last_indices
    x, y = _data().tensors
    G = per_example_grads(_net().double(), ce_sum, x[idx].double(), y[idx])
    torch.testing.assert_close(cb.guard.last_gnq, gnq_explicit(G, LAM), rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_and_resume(tmp_path):
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    _, trainer = _fit(tmp_path, cb)
    ckpt = str(tmp_path / "guarded.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    state = next(v for k, v in saved.items() if "GradGuardCallback" in k)
    assert torch.equal(state["ledger"]["cum_gnq"], cb.guard.ledger.cum_gnq)
    assert int(state["step"]) == cb.guard.step

    resumed = GradGuardCallback(policy="monitor", lam=LAM)
    trainer = _trainer(tmp_path / "resume", [resumed], max_epochs=3)
    trainer.fit(LitClassifier(), _loader(), ckpt_path=ckpt)
    # the third epoch continues the restored ledger
    assert int(resumed.guard.ledger.steps_seen.sum()) == 3 * N
    assert resumed.guard.step == 3 * N // BATCH
    assert bool((resumed.guard.ledger.cum_gnq > cb.guard.ledger.cum_gnq).all())


def test_logs_into_the_trainers_tensorboard_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = GradGuardCallback(policy="monitor", lam=LAM, log_every=1)
    _, trainer = _fit(tmp_path, cb)
    assert cb.guard.log_dir == trainer.logger.log_dir
    # what the callback filled in is the guard's config too, not only its attributes
    assert cb.guard.config.log_dir == trainer.logger.log_dir
    assert cb.guard.config.num_examples == cb.guard.num_examples == N
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    assert "gradguard/gnq/mean" in acc.Tags()["scalars"]
    assert os.path.exists(os.path.join(trainer.logger.log_dir, "summary.json"))


def test_hooks_and_strategy_restored_after_fit(tmp_path):
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    module, trainer = _fit(tmp_path, cb)
    assert "process_dataloader" not in trainer.strategy.__dict__
    assert not isinstance(trainer.strategy.optimizers[0], gg.GuardedOptimizer)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def _batches_seen(lit) -> list[list[int]]:
    """Which examples each batch held, read off the inputs training_step received."""
    X = _data().tensors[0]
    return [[int((row == X).all(1).nonzero()) for row in x] for x in lit.seen]


ACC = 3  # 4 batches per epoch: windows of 3 batches and of 1 (the epoch's end steps early)


def test_accumulation_monitor_leaves_training_bit_for_bit(tmp_path):
    plain, _ = _fit(tmp_path / "plain", accumulate_grad_batches=ACC)
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    guarded, _ = _fit(tmp_path / "guarded", cb, accumulate_grad_batches=ACC)
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)
    assert cb.guard.step == 2 * 2  # two optimizer steps per epoch
    assert int(cb.guard.ledger.steps_seen.sum()) == 2 * N


def test_accumulation_first_window_gnq_matches_torch_func(tmp_path):
    """accumulate_grad_batches=3: the 3 micro-batches are one logical batch of 18, GNQ in
    the per-example scale (Lightning divides each micro-batch's loss by 3)."""
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    lit, _ = _fit(tmp_path, cb, max_steps=1, accumulate_grad_batches=ACC)
    window = [i for b in _batches_seen(lit)[:ACC] for i in b]
    assert cb.guard.last_indices.tolist() == window
    x, y = _data().tensors
    G = per_example_grads(_net().double(), ce_sum, x[window].double(), y[window])
    torch.testing.assert_close(cb.guard.last_gnq, gnq_explicit(G, LAM), rtol=1e-4, atol=1e-6)


def test_accumulation_drop_policy_matches_plain_loop(tmp_path):
    """The callback under accumulate_grad_batches=3 equals the plain-loop guard with
    (loss / 3).backward() and accumulation_steps=3 over the same micro-batches."""
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    cb = GradGuardCallback(**kwargs)
    lit, _ = _fit(tmp_path, cb, accumulate_grad_batches=ACC)
    batches = _batches_seen(lit)
    assert len(batches) == 2 * N // BATCH

    net = _net()
    guard = gg.GradGuard(**kwargs)
    model, opt, loader = guard.make_guarded(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(_data(), batch_sampler=batches), accumulation_steps=ACC)
    micro = iter(loader)
    per_epoch = N // BATCH
    for _ in range(2):
        for size in (ACC, per_epoch - ACC):
            opt.zero_grad()
            for _ in range(size):
                x, y = next(micro)
                (F.cross_entropy(model(x), y) / ACC).backward()
            opt.step()
    assert guard.step == cb.guard.step == 4
    assert float(guard.summary()["dropped_total"]) > 0
    assert_same_run(cb.guard.ledger, guard.ledger, lit.net.parameters(), net.parameters())
    guard.close()


def test_metrics_reach_the_trainers_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = GradGuardCallback(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    module = LitClassifier()
    trainer = _trainer(tmp_path, [cb], log_every_n_steps=1)
    trainer.loggers = [CSVLogger(str(tmp_path), name="csv")]
    trainer.fit(module, _loader())
    import csv

    with open(os.path.join(trainer.loggers[0].log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradguard/gnq/mean")]
    assert len(rows) == cb.guard.step == 2 * N // BATCH
    last = rows[-1]
    # the values of the run's last step, as the guard itself holds them
    torch.testing.assert_close(float(last["gradguard/gnq/mean"]),
                               float(cb.guard.last_gnq.double().mean()), rtol=1e-6, atol=0)
    summary = cb.guard.summary()
    assert float(last["gradguard/disclosure/max"]) == pytest.approx(summary["max_bound"])
    assert float(last["gradguard/disclosure/mean"]) == pytest.approx(summary["mean_bound"])
    assert float(last["gradguard/policy/dropped_total"]) == summary["dropped_total"] > 0


def _fp16(init_scale: float) -> dict:
    # Lightning maps precision="16-mixed" to bf16 on CPU; its plugin with a CPU GradScaler
    # runs real fp16 autocast and loss scaling.
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_gnq_in_the_losss_true_scale(tmp_path, precision):
    """fp16 with a loss scale of 2¹² (GNQ would be 2²⁴ too large unscaled) and bf16: GNQ
    against float64 torch.func gradients, within the half-precision rounding."""
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    kwargs = _fp16(2.0**12) if precision == "16-mixed" else dict(precision=precision)
    _, trainer = _fit(tmp_path, cb, max_steps=1, **kwargs)
    assert trainer.precision == precision
    idx = cb.guard.last_indices
    x, y = _data().tensors
    G = per_example_grads(_net().double(), ce_sum, x[idx].double(), y[idx])
    torch.testing.assert_close(cb.guard.last_gnq, gnq_explicit(G, LAM), rtol=5e-2, atol=0)


def test_fp16_skipped_steps_are_not_steps(tmp_path):
    """A huge initial loss scale overflows: the GradScaler skips those steps (and halves
    the scale) until it fits. The guard counts only the steps taken, each with its own
    batch's examples; training is unchanged."""
    init = 2.0**20  # fp16 overflows above 65504
    plain, _ = _fit(tmp_path / "plain", **_fp16(init), max_epochs=3)
    cb = GradGuardCallback(policy="monitor", lam=LAM)
    guarded, trainer = _fit(tmp_path / "guarded", cb, **_fp16(init), max_epochs=3)
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)
    skipped = round(math.log2(init / trainer.precision_plugin.scaler.get_scale()))
    assert skipped > 0, "no step overflowed: the test is vacuous"
    assert cb.guard.step == 3 * N // BATCH - skipped
    assert int(cb.guard.ledger.steps_seen.sum()) == BATCH * cb.guard.step


def test_fp16_drop_policy_matches_plain_loop(tmp_path):
    """fp16 under a drop policy: the callback equals the plain-loop guard with the same
    GradScaler steps (autocast, scale(loss).backward(), unscale_, step, update)."""
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    cb = GradGuardCallback(**kwargs)
    lit, _ = _fit(tmp_path, cb, **_fp16(2.0**8))
    batches = _batches_seen(lit)

    net = _net()
    guard = gg.GradGuard(**kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, opt, loader = guard.make_guarded(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(_data(), batch_sampler=batches), grad_scaler=scaler)
    for x, y in loader:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert guard.step == cb.guard.step == 2 * N // BATCH
    assert float(guard.summary()["dropped_total"]) > 0
    assert_same_run(cb.guard.ledger, guard.ledger, lit.net.parameters(), net.parameters())
    guard.close()


def test_unsupported_setups_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="16-true"):
        _fit(tmp_path, GradGuardCallback(policy="monitor"), precision="16-true")
    with pytest.raises(ValueError, match="threshold"):
        GradGuardCallback(policy="drop")
    with pytest.raises(ValueError, match="loss_reduction"):
        GradGuardCallback(loss_reduction="none")


def test_core_never_imports_the_frameworks():
    code = ("import sys, gradguard, gradguard.integrations, gradguard.distributed; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', "
            "'accelerate') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
