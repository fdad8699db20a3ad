"""gradguard: a training-time privacy monitor for PyTorch.

Per-example gradient uniqueness (GNQ) every step, input-loss-curvature probes,
TensorBoard logging, and GNQ-based clipping or censorship as a lighter alternative
to DP-SGD.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> the submodule that defines them. Imported on first use (PEP 562), so that
# `gradguard --help` and `import gradguard.formatting` do not pay for torch.
_EXPORTS = {
    "Canaries": ".audit.canaries",
    "CurvatureProbe": ".curvature", "ProbeResult": ".curvature",
    "input_curvature": ".curvature",
    "GradGuard": ".engine", "NonFiniteGradientError": ".engine",
    "DisclosureLedger": ".ledger",
    "GuardConfig": ".config",
    "GuardedOptimizer": ".optimizer", "StepObserver": ".optimizer",
    "Clip": ".policies", "Drop": ".policies", "Monitor": ".policies", "Quantile": ".policies",
    "load_state": ".rundir",
    "disclosure_bound": ".uniqueness.gnq", "gnq_from_grads": ".uniqueness.gnq",
    "gnq_from_gram": ".uniqueness.gnq",
    "GramHooks": ".uniqueness.hooks", "UnsupportedLayerError": ".uniqueness.hooks",
    "per_example_gnq": ".uniqueness.hooks",
    "LayerKernel": ".uniqueness.kernels", "register_kernel": ".uniqueness.kernels",
}

if TYPE_CHECKING:
    from . import audit
    from .audit.canaries import Canaries
    from .config import GuardConfig
    from .curvature import CurvatureProbe, ProbeResult, input_curvature
    from .engine import GradGuard, NonFiniteGradientError
    from .ledger import DisclosureLedger
    from .optimizer import GuardedOptimizer, StepObserver
    from .policies import Clip, Drop, Monitor, Quantile
    from .rundir import load_state
    from .uniqueness.gnq import disclosure_bound, gnq_from_grads, gnq_from_gram
    from .uniqueness.hooks import GramHooks, UnsupportedLayerError, per_example_gnq
    from .uniqueness.kernels import LayerKernel, register_kernel


def __getattr__(name: str) -> Any:
    if name == "audit":
        return importlib.import_module(".audit", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "audit"])


__version__ = "0.1.0"

__all__ = [
    "GradGuard",
    "CurvatureProbe",
    "ProbeResult",
    "input_curvature",
    "audit",
    "Canaries",
    "GuardedOptimizer",
    "NonFiniteGradientError",
    "DisclosureLedger",
    "Quantile",
    "Monitor",
    "Clip",
    "Drop",
    "GuardConfig",
    "StepObserver",
    "load_state",
    "gnq_from_gram",
    "gnq_from_grads",
    "disclosure_bound",
    "per_example_gnq",
    "GramHooks",
    "UnsupportedLayerError",
    "LayerKernel",
    "register_kernel",
]
