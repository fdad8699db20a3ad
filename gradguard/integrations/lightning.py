"""PyTorch Lightning: guard a ``Trainer``'s training by adding one callback.

``Trainer(callbacks=[GradGuardCallback(policy="monitor")])`` guards training with no
change to the LightningModule:

- the hooks attach to the LightningModule's layers (under the DDP strategy too: DDP's
  forward reaches the same layers);
- the training DataLoader Lightning builds (after it injected a ``DistributedSampler``)
  is rebuilt around gradguard's recording batch sampler, so each batch's dataset indices
  are known; the batches themselves, their order and the sampler's RNG are unchanged;
- the strategy's optimizer is wrapped so every optimizer step is measured and shaped;
  ``gradient_clip_val`` is applied again to the gradients ``clip``/``drop`` rebuilt;
- the callback's state (ledger, counters, threshold window) goes into Lightning
  checkpoints and comes back with ``fit(ckpt_path=...)``;
- with a ``TensorBoardLogger``, gradguard writes into the logger's run directory
  (``trainer.logger.log_dir``), so its ``gradguard/`` tags show up in the same
  TensorBoard run as the Trainer's metrics.

Gradient accumulation (``accumulate_grad_batches=N``): the N batches of one optimizer step
form one logical batch, GNQ in the per-example scale (Lightning's ``loss / N`` is undone).
fp16 mixed precision (``"16-mixed"``): GNQ in the loss's true scale, read from the
precision plugin's ``GradScaler``; steps the scaler skips for inf/NaN are not steps.
bf16 (``"bf16-mixed"``) needs nothing special. Metrics: after each optimizer step the
callback logs ``gradguard/gnq/{mean,max}``, ``gradguard/disclosure/{max,mean}`` and the
policy's cumulative counts with ``pl_module.log_dict``, so every Lightning logger (CSV,
W&B, MLflow, TensorBoard) receives them at the Trainer's ``log_every_n_steps``.

Supported: automatic optimisation, or manual optimisation with one optimizer step per
batch; one optimizer; 32/64-bit, bf16 or fp16-mixed precision; single
device or the DDP strategies (``"ddp"``, ``"ddp_spawn"``, ...), where the ranks agree as
described in :mod:`gradguard.distributed`.

Requires ``pip install -e ".[lightning]" from a gradguard checkout``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradguard.integrations.lightning needs Lightning: "
                      "pip install -e '.[lightning]' from a gradguard checkout") from exc

from ..engine import GradGuard
from ..loader import RecordingBatchSampler, track_indices
from ..optimizer import GuardedOptimizer
from ._common import IndexedGuardedOptimizer, step_metrics

__all__ = ["GradGuardCallback"]


def _clip_rewritten(optimizer: GuardedOptimizer, *, value: float, by_value: bool) -> None:
    if by_value:
        torch.nn.utils.clip_grad_value_(optimizer.params, value)
    else:
        torch.nn.utils.clip_grad_norm_(optimizer.params, value)


def _loss_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of Lightning's fp16 mixed-precision plugin (``None`` without one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


class _LightningGuardedOptimizer(IndexedGuardedOptimizer):
    """GuardedOptimizer fitted to Lightning's closure.

    Lightning zeroes gradients *inside* the closure, between ``training_step``'s forward
    and the backward pass, so ``zero_grad`` must not drop the forward's captures (the
    guard clears them after every step itself). A ``training_step`` that returns ``None``
    skips the backward pass: that step leaves the guard out. Under
    ``accumulate_grad_batches=N`` the closures of the first N - 1 batches run outside
    ``step``; their captures and indices join the step's logical batch.
    """

    def __init__(self, optimizer, *, guard: GradGuard, expected_batch_size: int | None,
                 loss_reduction: str, automatic: bool):
        super().__init__(optimizer, guard=guard, expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction)
        self.automatic = automatic

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is None and self.automatic:  # training_step returned None: no backward
                self.forget_indices()
                self.guard.on_zero_grad(self)
                return self.original_optimizer.step()
        out = super().step()
        return loss if out is None else out


class GradGuardCallback(Callback):
    """Guards a Lightning ``Trainer``'s training with a :class:`~gradguard.GradGuard`.

    Args:
        loss_reduction: how ``training_step``'s loss reduces over the batch, ``"mean"``
            (default) or ``"sum"``.
        params: restrict the guarded parameters (default: every trainable one).
        batch_first: whether model inputs are batch first.
        **guard_kwargs: :class:`~gradguard.GradGuard` arguments (``policy``, ``lam``,
            ``threshold``, ``budget``, ``curvature``, ``log_dir``, ...). Without
            ``log_dir``, gradguard logs into the Trainer's ``TensorBoardLogger`` run
            directory when there is one. Under a multi-rank DDP strategy ``distributed``
            defaults to ``True``.

    Attributes:
        guard: the :class:`~gradguard.GradGuard` (its ``ledger`` is filled during ``fit``).

    Raises:
        ValueError: bad GradGuard arguments (at construction), or a Trainer setup
            gradguard cannot measure (at ``fit``): several optimizers, fp16 without a
            GradScaler (``"16-true"``), a non-DDP multi-device strategy, or an
            iterable-style training dataset.

    Example:
        >>> trainer = lightning.pytorch.Trainer(            # doctest: +SKIP
        ...     max_epochs=3, callbacks=[GradGuardCallback(policy="monitor")])
        >>> trainer.fit(lit_module, train_loader)           # doctest: +SKIP
        >>> trainer.callbacks[0].guard.ledger.top(5)        # doctest: +SKIP
    """

    def __init__(self, *, loss_reduction: str = "mean",
                 params: Iterable[nn.Parameter] | None = None, batch_first: bool = True,
                 **guard_kwargs: Any):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how training_step's "
                             f"loss reduces over the batch), got {loss_reduction!r}")
        self.guard = GradGuard(**guard_kwargs)
        self.loss_reduction = loss_reduction
        self.params = None if params is None else list(params)
        self.batch_first = batch_first
        self._recorder: RecordingBatchSampler | None = None
        self._train_loader: DataLoader | None = None
        self._optimizer: _LightningGuardedOptimizer | None = None
        self._raw_optimizer = None
        self._restore_process: Callable[[], None] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._logged_step = 0

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard.module is not None:
            raise RuntimeError("this GradGuardCallback already guarded a fit; create a new "
                               "one for each Trainer.fit")
        if str(trainer.precision).startswith("16") and _loss_scaler(trainer) is None:
            raise ValueError(
                f"GradGuardCallback does not support precision={trainer.precision!r} without a "
                "GradScaler it can read (the loss scale must be known to put GNQ in the "
                "loss's true scale). Use '16-mixed', '32-true' or 'bf16-mixed'.")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradGuardCallback guards exactly one optimizer; "
                             f"configure_optimizers returned {len(trainer.optimizers)}")
        multi = trainer.world_size > 1
        if multi and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(
                f"GradGuardCallback supports single-device and DDP strategies, not "
                f"{type(trainer.strategy).__name__}")
        if not multi and not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"GradGuardCallback does not support the "
                             f"{type(trainer.strategy).__name__} strategy")
        self._wrap_train_dataloaders(trainer)

    def _wrap_train_dataloaders(self, trainer: pl.Trainer) -> None:
        # The fit loop builds the training DataLoader and starts iterating it before
        # on_train_start; the strategy's process_dataloader is the one step between the
        # final DataLoader and its first iterator, so the recorder goes in there.
        strategy = trainer.strategy
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            if not trainer.training or not isinstance(dataloader, DataLoader):
                return dataloader
            if dataloader.batch_sampler is None:
                raise TypeError(
                    "GradGuardCallback tracks examples by dataset index, which needs a "
                    "map-style training dataset with a batch sampler; this DataLoader has "
                    "none (iterable-style dataset or batch_size=None).")
            tracked = track_indices(dataloader)  # also when Lightning reloads the loader
            self._recorder, self._train_loader = tracked.recorder, tracked.loader
            return tracked.loader

        strategy.process_dataloader = process_dataloader

        def restore() -> None:
            if strategy.__dict__.get("process_dataloader") is process_dataloader:
                del strategy.process_dataloader

        self._restore_process = restore

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard.module is not None:
            return
        if self._train_loader is None:
            raise RuntimeError("GradGuardCallback did not see the training DataLoader; pass "
                               "train_dataloaders (or a datamodule) to Trainer.fit")
        if not isinstance(trainer.train_dataloader, DataLoader):
            raise ValueError("GradGuardCallback supports one training DataLoader (a batch's "
                             "examples must come from one dataset); got "
                             f"{type(trainer.train_dataloader).__name__}")
        guard = self.guard
        changes = {}
        if guard.num_examples is None:
            changes["num_examples"] = len(self._train_loader.dataset)
        if guard.distributed is None and trainer.world_size > 1:
            changes["distributed"] = True  # DDP wraps the LightningModule out of our sight
        if guard.log_dir is None:
            logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)),
                          None)
            if logger is not None and trainer.is_global_zero:
                changes["log_dir"] = logger.log_dir
        guard.replace_config(**changes)
        raw = trainer.strategy.optimizers[0]
        # Lightning divides every micro-batch's loss by accumulate_grad_batches (the last,
        # shorter window of an epoch too), and scales it by the fp16 plugin's GradScaler.
        guard.make_guarded(module=pl_module, optimizer=raw, loss_reduction=self.loss_reduction,
                           params=self.params, batch_first=self.batch_first,
                           accumulation_steps=trainer.accumulate_grad_batches,
                           grad_scaler=_loss_scaler(trainer))
        expected = self._train_loader.batch_size or getattr(self._recorder, "batch_size", None)
        self._optimizer = _LightningGuardedOptimizer(
            raw, guard=guard, expected_batch_size=expected, loss_reduction=self.loss_reduction,
            automatic=pl_module.automatic_optimization)
        guard.attach_optimizer(self._optimizer)
        if trainer.gradient_clip_val and guard.policy != "monitor":
            # Lightning clips before the guarded step, whose policy then rebuilds the
            # gradients: clip what will actually be applied.
            self._optimizer.step_hook = functools.partial(
                _clip_rewritten, value=float(trainer.gradient_clip_val),
                by_value=trainer.gradient_clip_algorithm == "value")
        self._raw_optimizer = raw
        trainer.strategy.optimizers = [self._optimizer]
        if self._pending_state:
            guard.load_state_dict(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._optimizer is None or self._recorder is None:
            return
        if not self._recorder.drawn:
            raise RuntimeError("GradGuardCallback lost track of the batches' dataset indices "
                               "(the training DataLoader was iterated outside the fit loop?)")
        # Batches arrive in the order their index lists were drawn (prefetching included).
        if batch_idx % trainer.accumulate_grad_batches == 0:
            # A new window (Lightning zeroes the gradients in its first closure). Anything
            # still pending belongs to a step the fp16 GradScaler skipped for inf/NaN
            # (scaler.step never called ours): not a step, so forget its examples.
            self._optimizer.forget_indices()
            self.guard.on_zero_grad(self._optimizer)
        # Under accumulate_grad_batches=N, the N batches of a window form one logical batch.
        self._optimizer.add_indices(torch.tensor(self._recorder.drawn.popleft(),
                                                 dtype=torch.long))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # After a guarded step, its GNQ and the run's disclosure go to the Trainer's loggers
        # (CSV, W&B, MLflow, ...) at the Trainer's log_every_n_steps, like any metric.
        if self._optimizer is None or self.guard.step == self._logged_step:
            return
        self._logged_step = self.guard.step
        metrics = step_metrics(self.guard)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False,
                               logger=True, batch_size=len(self.guard.last_indices))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.guard.ledger is not None:
            return self.guard.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.guard.ledger is not None:
            self.guard.load_state_dict(state_dict)
        else:  # Lightning restores callbacks before training starts: apply on attach
            self._pending_state = dict(state_dict)

    # ------------------------------------------------------------------ the end
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        if self._restore_process is not None:
            self._restore_process()
            self._restore_process = None
        if self._optimizer is not None and trainer.strategy.optimizers \
                and trainer.strategy.optimizers[0] is self._optimizer:
            trainer.strategy.optimizers = [self._raw_optimizer]
        if self.guard.module is not None:
            self.guard.close()
