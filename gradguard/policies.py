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
from typing import Any

import torch

from .uniqueness.gnq import gnq_from_gram
from .validation import check_int, check_real

__all__ = ["POLICIES", "Quantile", "Monitor", "Clip", "Drop", "Policy", "Decision", "make_policy",
           "effective_gnq", "policy_weights", "budget_thresholds", "budget_hard_cap"]

POLICIES = ("monitor", "clip", "drop")


@dataclass(frozen=True)
class Quantile:
    """A threshold that acts on about the top ``1 - q`` of each step's examples.

    Default (``window=1``): τ is the ``q``-quantile (linear interpolation) of this step's
    own GNQ values, so ``drop`` drops (``clip`` clips) about the top ``1 - q`` of every
    batch, as the name says, whatever the GNQ distribution does over training.

    Rolling variant (``window > 1``): τ is the ``q``-quantile of the GNQ values of the last
    ``window`` steps, the current one included. It smooths τ over noisy small batches but
    lags a distribution that moves as training goes on, so its realised rate can be far
    from ``1 - q`` (e.g. 34% instead of 10% while GNQ grows). The realised rate is logged
    every step as ``gradguard/policy/realised_rate`` and kept in the summary, whichever
    variant is used; check it when using a window.

    Example:
        >>> Quantile(0.95)
        Quantile(q=0.95, window=1)
        >>> Quantile(0.9, window=2.5)
        Traceback (most recent call last):
        ...
        ValueError: Quantile window must be an integer, got 2.5 (float)
    """

    q: float
    window: int = 1

    def __post_init__(self):
        check_real("Quantile q", self.q, open_unit=True)
        check_int("Quantile window", self.window, minimum=1)


def effective_gnq(K: torch.Tensor, weights: torch.Tensor, lam) -> torch.Tensor:
    """GNQ of the reweighted update: the Gram of w_j g_j is diag(w) K diag(w)."""
    w = weights.to(torch.float64)
    return gnq_from_gram(w[:, None] * K.to(torch.float64) * w[None, :], lam, validate=False)


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


def budget_hard_cap(K: torch.Tensor, weights: torch.Tensor, effective: torch.Tensor, lam,
                    allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop every kept example whose effective GNQ exceeds its budget allowance.

    Dropping an example raises the others' effective GNQ (their S_{-j} shrinks), so one
    pass is not enough for a hard cap: repeat until every kept example is within its
    allowance. Each pass drops at least one example, so it ends after at most B passes.

    Returns:
        ``(weights, effective GNQ, over)`` where ``over`` marks the examples this cap
        dropped (they exhausted their budget).

    Example:
        >>> K = torch.tensor([[4.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
        >>> w, e, over = budget_hard_cap(K, torch.ones(2, dtype=torch.float64),
        ...     gnq_from_gram(K, 1.0), 1.0, torch.tensor([10.0, 1.0], dtype=torch.float64))
        >>> w.tolist(), over.tolist()
        ([1.0, 0.0], [False, True])
    """
    over = torch.zeros_like(weights, dtype=torch.bool)
    while True:
        now = (weights > 0) & (effective > allowed)
        if not bool(now.any()):
            return weights, effective, over
        over |= now
        weights = weights.masked_fill(now, 0.0)
        effective = effective_gnq(K, weights, lam)


@dataclass
class Decision:
    """What a policy decided for one step (nothing is applied or recorded yet).

    Attributes:
        weights: ``[R]`` float64 weight of each example the Gram covers.
        effective: ``[R]`` GNQ of the update those weights give.
        censor: ``[B]`` bool over the step's examples, to censor for the rest of training
            (budget exhausted), or ``None``.
    """

    weights: torch.Tensor
    effective: torch.Tensor
    censor: torch.Tensor | None = None


def check_threshold(threshold: float | Quantile | None) -> float | Quantile | None:
    """A policy threshold: ``None``, a :class:`Quantile`, or a finite number > 0 (as float).

    Example:
        >>> check_threshold(3)
        3.0
    """
    if threshold is None or isinstance(threshold, Quantile):
        return threshold
    try:
        return check_real("threshold", threshold, positive=True)
    except ValueError:
        raise ValueError(f"threshold must be a number > 0 or gradguard.Quantile(q), got "
                         f"{threshold!r}") from None


def check_budget(budget: float | None) -> float | None:
    """A disclosure budget: ``None`` or a finite number of nats > 0 (as float).

    Example:
        >>> check_budget(2)
        2.0
    """
    if budget is None:
        return None
    try:
        return check_real("budget", budget, positive=True)
    except ValueError:
        raise ValueError(f"budget must be a number of nats > 0, got {budget!r}") from None


class Policy:
    """Base of the policies: what to do with a step's examples given their GNQ.

    A policy owns its state (threshold calibration window, counters); :meth:`decide`
    is side-effect free, :meth:`commit` records a decision once the step is taken, so a
    step skipped after deciding (non-finite gradients) leaves no trace.
    """

    name = "monitor"

    def __init__(self, *, threshold: float | Quantile | None = None,
                 budget: float | None = None):
        self.threshold = check_threshold(threshold)
        self.budget = check_budget(budget)
        self._window: list[torch.Tensor] = []
        self.dropped_total: torch.Tensor | float = 0.0
        self.clipped_total: torch.Tensor | float = 0.0
        self.examples_total = 0
        self.last_rate: torch.Tensor | float = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold!r}, budget={self.budget!r})"

    @property
    def acts(self) -> bool:
        """Whether the policy can change the update."""
        return self.name != "monitor"

    # ------------------------------------------------------------------ deciding
    def thresholds(self, gnq: torch.Tensor) -> torch.Tensor:
        """Per-example τ of this step from ``threshold`` (inf when there is none)."""
        tau = torch.full_like(gnq, math.inf)
        if isinstance(self.threshold, Quantile):
            pooled = torch.cat([*self._window[-(self.threshold.window - 1):], gnq.detach()]) \
                if self.threshold.window > 1 else gnq.detach()
            if pooled.numel():
                tau = tau.clamp(max=torch.quantile(pooled, self.threshold.q))
        elif self.threshold is not None:
            tau = tau.clamp(max=float(self.threshold))
        return tau

    def decide(self, *, K: torch.Tensor, gnq: torch.Tensor, lam, indices: torch.Tensor,
               ledger, rows: slice = slice(None)) -> Decision:
        """Weights for the examples ``rows`` of the step (the ones ``K`` covers).

        Args:
            K: ``[R, R]`` Gram of the covered examples.
            gnq: ``[B]`` GNQ of every example of the step.
            lam: the ridge of ``gnq``.
            indices: ``[B]`` dataset indices of the step's examples.
            ledger: the run's :class:`~gradguard.ledger.DisclosureLedger` (read only).
            rows: the examples ``K`` covers, within the step's.
        """
        return Decision(torch.ones_like(gnq[rows]), gnq[rows])

    def commit(self, decision: Decision, gnq: torch.Tensor, weights: torch.Tensor) -> None:
        """Record a decision of a step that was taken (``weights`` over all B examples)."""
        if isinstance(self.threshold, Quantile):
            self._window.append(gnq.detach())
            self._window = self._window[-self.threshold.window:]
        dropped = (weights == 0).sum()
        clipped = ((weights > 0) & (weights < 1)).sum()
        self.dropped_total = self.dropped_total + dropped
        self.clipped_total = self.clipped_total + clipped
        self.examples_total += int(weights.shape[0])
        acted = dropped if self.name == "drop" else clipped + dropped
        self.last_rate = acted / max(1, weights.shape[0])

    @property
    def realised_rate(self) -> float:
        """Share of all examples seen so far that the policy dropped (``clip``: clipped or
        dropped)."""
        acted = self.dropped_total if self.name == "drop" else \
            self.dropped_total + self.clipped_total
        return float(acted) / max(1, self.examples_total)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors only: the calibration window and the counters."""
        return {"window": [w.clone() for w in self._window],
                "dropped_total": torch.as_tensor(self.dropped_total).detach().clone(),
                "clipped_total": torch.as_tensor(self.clipped_total).detach().clone(),
                "examples_total": torch.tensor(self.examples_total)}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise a clear error if ``state`` is not a valid :meth:`state_dict` (applies nothing)."""
        window = state.get("window", [])
        if not isinstance(window, list) or not all(
                isinstance(w, torch.Tensor) and w.dim() == 1 and w.is_floating_point()
                and bool(torch.isfinite(w).all()) and bool((w >= 0).all()) for w in window):
            raise ValueError("state 'window' must be a list of 1-D tensors of finite GNQ >= 0")
        for key in ("dropped_total", "clipped_total", "examples_total"):
            if key not in state:
                continue
            v = state[key]
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or not bool(
                    torch.isfinite(v.double()).all()) or float(v) < 0:
                raise ValueError(f"state {key!r} must be a finite count >= 0, got {v!r}")

    def load_state_dict(self, state: dict[str, Any], *, device=None) -> None:
        """Restore :meth:`state_dict` (validated first)."""
        self.check_state_dict(state)
        self._window = [w.to(device) for w in state.get("window", [])]
        if isinstance(self.threshold, Quantile):
            self._window = self._window[-self.threshold.window:]
        self.dropped_total = state.get("dropped_total", torch.tensor(0.0)).to(device)
        self.clipped_total = state.get("clipped_total", torch.tensor(0.0)).to(device)
        self.examples_total = int(state.get("examples_total", torch.tensor(0)))


class Monitor(Policy):
    """Measure and log only: the update is untouched.

    Example:
        >>> Monitor()
        Monitor(threshold=None, budget=None)
    """

    name = "monitor"

    def __init__(self):
        super().__init__()


class _Acting(Policy):
    def __init__(self, *, threshold: float | Quantile | None = None,
                 budget: float | None = None):
        if threshold is None and budget is None:
            raise ValueError(f"policy='{self.name}' needs threshold= (a GNQ value or "
                             "gradguard.Quantile(q)) or budget= (nats)")
        super().__init__(threshold=threshold, budget=budget)

    def decide(self, *, K, gnq, lam, indices, ledger, rows=slice(None)) -> Decision:
        tau = self.thresholds(gnq)
        blocked = ledger.is_censored(indices)
        allowed = exhausted = None
        if self.budget is not None:
            remaining = self.budget - ledger.bound(indices)
            # Shrunk by the rounding margin policy_weights allows above τ, so the bound
            # never passes the budget: it is a hard cap.
            allowed = budget_thresholds(remaining) / (1 + 1e-9)
            exhausted = gnq > allowed if self.name == "drop" else remaining <= 0
            blocked = blocked | exhausted
            tau = torch.minimum(tau, allowed)
        blocked = blocked[rows]
        if blocked.device.type == "cpu" and not bool(blocked.any()):
            blocked = None  # nothing censored: spares policy_weights a B³ re-solve
        weights, effective = policy_weights(self.name, K, gnq[rows], lam, tau=tau[rows],
                                            blocked=blocked)
        if allowed is not None and self.name == "drop":
            weights, effective, over = budget_hard_cap(K, weights, effective, lam,
                                                       allowed[rows])
            exhausted = exhausted.clone()
            exhausted[rows] |= over
        return Decision(weights, effective, exhausted)


class Clip(_Acting):
    """Scale example j by c_j so that its effective GNQ stays within τ (and its budget).

    Args:
        threshold: τ, a GNQ value, or :class:`Quantile` (about the top ``1 - q`` of each
            step clipped).
        budget: cumulative disclosure budget in nats: examples are scaled to fit what is
            left of it; an example with nothing left is censored. A hard cap.

    Example:
        >>> Clip(threshold=Quantile(0.9))
        Clip(threshold=Quantile(q=0.9, window=1), budget=None)
    """

    name = "clip"


class Drop(_Acting):
    """Give weight 0 to examples with GNQ_j > τ, or whose bound would pass the budget.

    Args:
        threshold: τ, a GNQ value, or :class:`Quantile` (about the top ``1 - q`` of each
            step dropped). One-shot on the measured GNQ.
        budget: cumulative disclosure budget in nats, a hard cap: a kept example whose
            effective GNQ would take its bound past the budget is dropped too (iterated,
            since each drop raises the others' effective GNQ) and censored for the rest of
            training.

    Example:
        >>> Drop(budget=2.0)
        Drop(threshold=None, budget=2.0)
    """

    name = "drop"


def make_policy(policy: str | Policy, *, threshold=None, budget=None) -> Policy:
    """A policy object from ``GradGuard``'s ``policy=`` argument.

    Example:
        >>> make_policy("drop", threshold=5.0)
        Drop(threshold=5.0, budget=None)
    """
    if isinstance(policy, Policy):
        if threshold is not None or budget is not None:
            raise ValueError("pass threshold= and budget= to the policy object "
                             f"({type(policy).__name__}(threshold=..., budget=...)), not to "
                             "GradGuard as well")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES} or a gradguard.Monitor/Clip/Drop "
                         f"object, got {policy!r}")
    if policy == "monitor":
        if threshold is not None or budget is not None:
            raise ValueError("policy='monitor' never acts on GNQ; threshold/budget need "
                             "policy='clip' or 'drop'")
        return Monitor()
    return {"clip": Clip, "drop": Drop}[policy](threshold=threshold, budget=budget)
