"""GuardedOptimizer: an optimizer wrapper with the surface of Opacus's ``DPOptimizer``.

Before each real step it hands the step to its step observer (a
:class:`~gradguard.engine.GradGuard`), which measures GNQ, applies the policy to the
gradients and updates the ledger; then the wrapped optimizer steps. Wrapping Opacus's
``DPOptimizer``, the guard measures the update DP-SGD releases (clipped per-example
gradients, noise in the ridge; see :mod:`gradguard.dp`). The observer protocol
(:class:`StepObserver`) is public, as Opacus's ``attach_step_hook`` / ``pre_step`` are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch.optim import Optimizer

__all__ = ["GuardedOptimizer", "StepObserver"]


class StepObserver(Protocol):
    """What a :class:`GuardedOptimizer` calls around each step (GradGuard implements it)."""

    def on_step(self, optimizer: GuardedOptimizer) -> bool:
        """Before a real step: measure and shape the gradients; ``False`` skips the step."""

    def on_micro_step(self, optimizer: GuardedOptimizer) -> None:
        """A virtual step (``signal_skip_step``): the logical batch continues."""

    def after_step(self, optimizer: GuardedOptimizer) -> None:
        """The wrapped optimizer has stepped."""

    def on_zero_grad(self, optimizer: GuardedOptimizer) -> None:
        """The gradients were cleared for a new logical batch."""


class GuardedOptimizer(Optimizer):
    """Wraps an optimizer so that every step is measured (and shaped) by a GradGuard.

    Built by :meth:`GradGuard.make_guarded`; the training loop uses it exactly like the
    optimizer it wraps. Attribute access not defined here goes to the wrapped optimizer.

    Args:
        optimizer: the optimizer to wrap (a ``torch.optim.Optimizer`` or an Opacus
            ``DPOptimizer``).
        guard: the step observer (the GradGuard) that measures each step.
        expected_batch_size: the denominator of the guarded update Σ w_j g_j / B under
            ``loss_reduction="mean"`` (the loader's batch size, or Opacus's expected
            batch size for Poisson sampling).

    Attributes:
        step_hook: optional ``fn(optimizer)`` called after the guard applied its policy
            and before the wrapped optimizer steps, e.g. to clip the norm of the gradients
            the policy rewrote (``clip_grad_norm_`` before ``step()`` is lost under
            ``clip``/``drop``, which rebuild the gradients).
    """

    def __init__(self, optimizer: Optimizer, *, guard: StepObserver,
                 expected_batch_size: int | None,
                 loss_reduction: str = "mean"):
        # Deliberately no super().__init__: like DPOptimizer, this is a view of
        # `original_optimizer`, whose param_groups, state and defaults it shares.
        self.original_optimizer = optimizer
        self.guard = guard
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False
        self._accumulated = 0
        #: Whether batches are Poisson-sampled (the update divides by the expected size).
        self.poisson_sampling = False
        self.step_hook: Callable[[GuardedOptimizer], None] | None = None

    # -------------------------------------------------------------- Optimizer surface
    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.original_optimizer.defaults = value

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes accumulated into the coming step (virtual steps count each)."""
        return max(1, self._accumulated)

    def __getattr__(self, name):
        # Only reached for names not found normally: forward to the wrapped optimizer
        # (e.g. DPOptimizer's noise_multiplier, max_grad_norm).
        if name in ("original_optimizer", "guard"):
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.original_optimizer!r})"

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only accumulates (Opacus BatchMemoryManager virtual steps)."""
        self._step_skip_queue.append(do_skip)
        if hasattr(self.original_optimizer, "signal_skip_step"):
            self.original_optimizer.signal_skip_step(do_skip)

    def _check_skip_next_step(self) -> bool:
        return self._step_skip_queue.pop(0) if self._step_skip_queue else False

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Measure the step and apply the policy; ``False`` when the step must not happen."""
        self._accumulated += 1
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            self.guard.on_micro_step(self)
            return False
        self._is_last_step_skipped = False
        proceed = self.guard.on_step(self)
        self._accumulated = 0
        if proceed and self.step_hook is not None:
            self.step_hook(self)
        return proceed

    def step(self, closure: Callable[[], float] | None = None):
        """Measure and shape the gradients, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.pre_step():
            dp = self.original_optimizer
            if hasattr(dp, "signal_skip_step") and self._is_last_step_skipped:
                dp.step()  # DPOptimizer clips and accumulates the micro-batch
            elif hasattr(dp, "_check_skip_next_step"):
                # The guard refused a real step (non-finite): DPOptimizer never saw it, so
                # drop its skip flag for this step (else its queue runs one behind and later
                # micro-batches step) and the micro-batches it accumulated for it.
                dp._check_skip_next_step()
                dp._is_last_step_skipped = False
                dp.zero_grad(set_to_none=True)
            return loss
        result = self.original_optimizer.step()
        self.guard.after_step(self)
        return loss if result is None else result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; per-example captures are kept across skipped (virtual) steps."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._is_last_step_skipped:
            self.guard.on_zero_grad(self)

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)
