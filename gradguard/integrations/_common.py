"""Plumbing shared by the framework integrations (imports no framework)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..engine import GradGuard
from ..optimizer import GuardedOptimizer
from ..tensorboard import TAGS

__all__ = ["IndexedGuardedOptimizer", "step_metrics"]


class IndexedGuardedOptimizer(GuardedOptimizer):
    """A GuardedOptimizer that collects the dataset indices of every micro-batch behind a
    step (gradient accumulation: several forward/backward passes, one step) and hands them
    to the guard, in micro-batch order, when the step comes."""

    def __init__(self, optimizer, *, guard: GradGuard, expected_batch_size: int | None,
                 loss_reduction: str = "mean"):
        super().__init__(optimizer, guard=guard, expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction)
        self.pending_indices: list[torch.Tensor] = []

    def add_indices(self, indices: torch.Tensor) -> None:
        """The dataset indices of one micro-batch that goes into the coming step."""
        self.pending_indices.append(torch.as_tensor(indices, dtype=torch.long).reshape(-1))

    def forget_indices(self) -> None:
        self.pending_indices = []

    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pending_indices:
            self.guard.set_batch_indices(torch.cat(self.pending_indices))
            self.pending_indices = []
        out = super().step()
        return loss if out is None else out


def step_metrics(guard: GradGuard) -> dict[str, float]:
    """The last guarded step's GNQ and the run's disclosure as plain numbers, named as the
    TensorBoard tags (``gradguard/gnq/mean``, ``gradguard/disclosure/max``, ...), for
    a framework's own loggers (W&B, MLflow, CSV). Empty before the first step.

    ``gnq/*`` are over the last step's examples (the logical batch under gradient
    accumulation); ``disclosure/{max,mean}`` the cumulative bound in nats over the examples
    seen so far; ``policy/{dropped,clipped}_total`` cumulative example-steps the policy
    dropped or clipped; ``policy/censored_total`` examples censored.

    Example:
        >>> step_metrics(GradGuard())  # nothing measured yet
        {}
    """
    if guard.ledger is None or guard.last_gnq is None or guard.step == 0:
        return {}
    gnq = guard.last_gnq.detach().double()
    finite = gnq[torch.isfinite(gnq)]
    out: dict[str, float] = {}
    if finite.numel():
        out[TAGS["gnq_mean"]] = float(finite.mean())
        out[TAGS["gnq_max"]] = float(finite.max())
    summary = guard.ledger.summary()
    out[TAGS["disclosure_max"]] = float(summary["max_bound"])
    out[TAGS["disclosure_mean"]] = float(summary["mean_bound"])
    out[TAGS["dropped_total"]] = float(guard.rule.dropped_total)
    out[TAGS["clipped_total"]] = float(guard.rule.clipped_total)
    out[TAGS["censored_total"]] = float(summary["censored_total"])
    return out
