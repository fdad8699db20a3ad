"""Acting on GNQ: per-example weights for the ``monitor``, ``clip`` and ``drop`` policies.

Pure functions on tensors. A weight w_j scales example j's gradient in the update
Σ_j w_j g_j. Scaling example j by c changes GNQ_j by c² (GNQ is quadratic in g_j with
the others fixed), but it also shrinks everyone else's S_{-k}, which raises their GNQ.
So the one-shot rule c_j = min(1, sqrt(τ/GNQ_j)) can leave an example above τ;
``clip`` therefore iterates it on the *effective* GNQ of the update actually applied
(the GNQ of the Gram diag(w) K diag(w)) until no example exceeds τ. The iteration only
ever lowers weights and converges to the largest feasible weights, but its tail is slow,
so each pass aims 0.1% below τ; should it still not have converged after ``max_iter``
passes, all weights are scaled down together (which lowers every GNQ) until none exceeds
τ, so the guarantee holds unconditionally. ``drop`` stays
one-shot, as specified: iterating it cascades (each drop raises the others' GNQ) and
can empty the batch. The engine records the effective GNQ in the ledger either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .uniqueness.gnq import gnq_from_gram

__all__ = ["POLICIES", "Quantile", "effective_gnq", "policy_weights", "budget_thresholds"]

POLICIES = ("monitor", "clip", "drop")


@dataclass(frozen=True)
class Quantile:
    """A threshold calibrated on the run's own recent GNQ values.

    τ is the ``q``-quantile of the GNQ values of the last ``window`` steps, the
    current step included (so the first step is calibrated on its own batch).

    Example:
        >>> Quantile(0.95, window=50)
        Quantile(q=0.95, window=50)
    """

    q: float
    window: int = 50

    def __post_init__(self):
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"Quantile q must be in (0, 1), got {self.q}")
        if self.window < 1:
            raise ValueError(f"Quantile window must be >= 1 step, got {self.window}")


def effective_gnq(K: torch.Tensor, weights: torch.Tensor, lam) -> torch.Tensor:
    """GNQ of the reweighted update: the Gram of w_j g_j is diag(w) K diag(w)."""
    w = weights.to(torch.float64)
    return gnq_from_gram(w[:, None] * K.to(torch.float64) * w[None, :], lam)


def budget_thresholds(remaining: torch.Tensor) -> torch.Tensor:
    """Largest per-step GNQ that keeps ½·ln(1 + GNQ) within the remaining budget (nats)."""
    return torch.expm1(2.0 * remaining.clamp(min=0.0).to(torch.float64))


def policy_weights(policy: str, K: torch.Tensor, gnq: torch.Tensor, lam, *,
                   tau: torch.Tensor | float = math.inf,
                   blocked: torch.Tensor | None = None,
                   max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example weights of a policy and the effective GNQ they leave.

    Args:
        policy: ``"monitor"``, ``"clip"`` or ``"drop"``.
        K: ``[B, B]`` Gram of per-example gradients.
        gnq: ``[B]`` GNQ of the unweighted batch (``gnq_from_gram(K, lam)``).
        lam: the ridge used for ``gnq`` (kept fixed while reweighting).
        tau: threshold, a scalar or ``[B]`` (per example, e.g. from a budget).
        blocked: ``[B]`` bool, examples that get weight 0 regardless (censored).
        max_iter: fixed-point passes of ``clip`` before its fallback (``drop`` is one
            pass).

    Returns:
        ``(weights [B], effective GNQ [B])``, both float64.

    Example:
        >>> K = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
        >>> w, g = policy_weights("drop", K, gnq_from_gram(K, 1.0), 1.0, tau=10.0)
        >>> w.tolist()
        [1.0, 0.0]
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    B = gnq.shape[0]
    w = torch.ones(B, dtype=torch.float64, device=gnq.device)
    if blocked is not None:
        w = w.masked_fill(blocked, 0.0)
    if policy == "monitor" or B == 0:
        return w, (gnq if blocked is None else effective_gnq(K, w, lam))
    tau = torch.as_tensor(tau, dtype=torch.float64, device=gnq.device).expand(B)
    current = gnq if blocked is None else effective_gnq(K, w, lam)
    # rtol absorbs the rounding of the reweighted solve at the boundary.
    limit = tau * (1 + 1e-9)
    if policy == "drop":
        w = w * (current <= tau).to(torch.float64)
        return w, effective_gnq(K, w, lam)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(max_iter):
        if bool((current <= limit).all()):
            return w, current
        # Aiming slightly below τ turns the slow geometric tail into a few passes.
        w = w * torch.sqrt(tau * (1 - 1e-3) / current.clamp(min=tiny)).clamp(max=1.0)
        current = effective_gnq(K, w, lam)
    if bool((current <= limit).all()):
        return w, current
    # Not converged: GNQ_j(c·w) rises monotonically with c and vanishes as c → 0, so a
    # bisection on a common scale c finds feasible weights.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if bool((effective_gnq(K, mid * w, lam) <= limit).all()):
            lo = mid
        else:
            hi = mid
    w = lo * w
    return w, effective_gnq(K, w, lam)
