"""GuardConfig: a GradGuard's settings, validated once.

:class:`~gradguard.engine.GradGuard` builds one from its keyword arguments; every check
lives here (with the shared helpers of :mod:`gradguard.validation`), so the engine can
trust its settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import GNQ_MODES
from .policies import POLICIES, Quantile, check_budget, check_threshold
from .validation import check_bool, check_choice, check_int, check_real

__all__ = ["GuardConfig", "STRATEGIES", "NONFINITE_ACTIONS"]

STRATEGIES = ("auto", "ghost", "materialise", "sketch")
NONFINITE_ACTIONS = ("raise", "skip")


@dataclass(frozen=True)
class GuardConfig:
    """Settings of a :class:`~gradguard.engine.GradGuard` (see its docstring for meanings).

    Raises:
        ValueError: a bool or non-number where a number belongs, a fractional count, NaN,
            inf, out of range, a denormal ``lam``, an unknown choice, or a policy without
            the threshold/budget it needs.

    Example:
        >>> GuardConfig(policy="drop", threshold=5.0).lam
        0.01
        >>> GuardConfig(log_every=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: log_every must be an integer, got nan (float)
    """

    policy: str = "monitor"
    lam: float = 1e-2
    relative_lam: bool = False
    threshold: float | Quantile | None = None
    budget: float | None = None
    log_dir: str | None = None
    log_every: int = 10
    on_nonfinite: str = "raise"
    strategy: str = "auto"
    gram_dtype: torch.dtype | None = None
    top_k: int = 10
    num_examples: int | None = None
    distributed: bool | None = None
    distributed_gnq: str = "local"
    save_every: int | None = None
    delta: float = 1e-5
    sketch_dim: int | None = None
    sketch_seed: int = 0

    def __post_init__(self):
        check_choice("policy", self.policy, POLICIES)
        set_ = object.__setattr__  # frozen: normalise numbers to float/int once
        set_(self, "lam", check_real("lam", self.lam, positive=True, normal=True))
        check_bool("relative_lam", self.relative_lam)
        set_(self, "threshold", check_threshold(self.threshold))
        set_(self, "budget", check_budget(self.budget))
        if self.policy in ("clip", "drop") and self.threshold is None and self.budget is None:
            raise ValueError(f"policy='{self.policy}' needs threshold= (a GNQ value or "
                             "gradguard.Quantile(q)) or budget= (nats)")
        if self.policy == "monitor" and (self.threshold is not None or self.budget is not None):
            raise ValueError("policy='monitor' never acts on GNQ; threshold/budget need "
                             "policy='clip' or 'drop'")
        if self.log_dir is not None and not isinstance(self.log_dir, str):
            set_(self, "log_dir", str(self.log_dir))
        check_int("log_every", self.log_every, minimum=1)
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.gram_dtype is not None and self.gram_dtype not in (torch.float32,
                                                                   torch.float64):
            raise ValueError(f"gram_dtype must be torch.float32, torch.float64 or None, got "
                             f"{self.gram_dtype!r}")
        check_int("top_k", self.top_k, minimum=1)
        if self.num_examples is not None:
            check_int("num_examples", self.num_examples, minimum=1)
        if self.distributed is not None:
            check_bool("distributed", self.distributed)
        if self.distributed_gnq not in GNQ_MODES:
            raise ValueError(f"distributed_gnq must be one of {GNQ_MODES} (GNQ over each rank's "
                             f"batch, or exact over the global batch), got "
                             f"{self.distributed_gnq!r}")
        if self.save_every is not None:
            check_int("save_every", self.save_every, minimum=1)
            if self.log_dir is None:
                raise ValueError("save_every= writes the run directory: pass log_dir= too")
        set_(self, "delta", check_real("delta", self.delta, open_unit=True))
        if self.sketch_dim is not None:
            check_int("sketch_dim", self.sketch_dim, minimum=1)
        check_int("sketch_seed", self.sketch_seed, minimum=0)
