"""gradguard: a training-time privacy monitor for PyTorch.

Per-example gradient uniqueness (GNQ) every step, input-loss-curvature probes,
TensorBoard logging, and GNQ-based clipping or censorship as a lighter alternative
to DP-SGD.
"""

from . import audit
from .audit.canaries import Canaries
from .curvature import CurvatureProbe, ProbeResult, input_curvature
from .engine import GradGuard, NonFiniteGradientError
from .ledger import DisclosureLedger
from .optimizer import GuardedOptimizer
from .policies import Quantile
from .uniqueness.gnq import disclosure_bound, gnq_from_grads, gnq_from_gram
from .uniqueness.hooks import GramHooks, UnsupportedLayerError, per_example_gnq
from .uniqueness.kernels import LayerKernel, register_kernel

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
    "gnq_from_gram",
    "gnq_from_grads",
    "disclosure_bound",
    "per_example_gnq",
    "GramHooks",
    "UnsupportedLayerError",
    "LayerKernel",
    "register_kernel",
]
