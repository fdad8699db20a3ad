"""Gradient uniqueness (GNQ) from a batch Gram matrix: pure functions, no state.

For per-example gradients g_1..g_B stacked as the rows of G, the leave-one-out
uniqueness of example j is

    GNQ_j = g_jᵀ (λI + Σ_{k≠j} g_k g_kᵀ)⁻¹ g_j.

Everything is computed in batch space from the B×B Gram K = G Gᵀ. With
M = (K + λI)⁻¹ the push-through identity gives h_j = g_jᵀ(λI + GᵀG)⁻¹g_j = [MK]_jj
= 1 − λM_jj, and Sherman–Morrison gives GNQ_j = h_j / (1 − h_j). We evaluate it as
[MK]_jj / (λ M_jj) rather than 1/(λM_jj) − 1, which cancels catastrophically when
GNQ_j is small.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gnq_from_gram", "gnq_from_grads", "resolve_lam", "disclosure_bound"]


def resolve_lam(K: torch.Tensor, lam: float, *, relative: bool = False) -> float | torch.Tensor:
    """Return the ridge λ to use for Gram ``K``.

    Args:
        K: the B×B Gram matrix.
        lam: the absolute ridge, or with ``relative=True`` the factor ρ in
            λ = ρ·trace(K)/B (a ridge that follows the gradients' scale).
        relative: interpret ``lam`` as ρ.

    Returns:
        λ as a Python float (absolute) or a 0-d tensor on ``K``'s device (relative), so
        the relative case costs no host round trip.
    """
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if not relative:
        return float(lam)
    B = K.shape[0]
    # A batch of all-zero gradients has trace 0: keep λ strictly positive.
    trace = torch.diagonal(K).sum().to(torch.float64) / max(B, 1)
    return lam * torch.clamp(trace, min=torch.finfo(torch.float64).tiny)


def gnq_from_gram(K: torch.Tensor, lam: float | torch.Tensor = 1e-2, *,
                  relative: bool = False) -> torch.Tensor:
    """Leave-one-out gradient uniqueness of every example from the batch Gram.

    Args:
        K: ``[B, B]`` Gram matrix of per-example gradients (K_ij = ⟨g_i, g_j⟩).
        lam: ridge λ > 0 (absolute), or ρ when ``relative=True``.
        relative: use λ = ρ·trace(K)/B.

    Returns:
        ``[B]`` float64 tensor on ``K``'s device.

    Raises:
        ValueError: ``K`` is not square, holds NaN/Inf, or is not positive
            semi-definite enough for ``K + λI`` to be factorised.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> gnq_from_gram(G @ G.T, lam=1.0)
        tensor([1., 4.], dtype=torch.float64)
    """
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square [B, B] matrix, got shape {tuple(K.shape)}")
    B = K.shape[0]
    if B == 0:
        return torch.zeros(0, dtype=torch.float64, device=K.device)
    K = K.to(torch.float64)
    if not bool(torch.isfinite(K).all()):
        raise ValueError(
            "the per-example gradient Gram contains NaN or Inf: some example's loss or "
            "gradient is not finite. Check the loss for this batch (GradGuard's "
            "on_nonfinite='skip' skips such steps)."
        )
    lam_value = resolve_lam(K, lam, relative=relative) if not isinstance(lam, torch.Tensor) \
        else lam.to(torch.float64)
    K = 0.5 * (K + K.T)  # Grams summed from float32 pieces are symmetric only to rounding
    A = K + lam_value * torch.eye(B, dtype=torch.float64, device=K.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(
            f"K + λI is not positive definite (λ={float(lam_value):.3g}); K is not a Gram "
            "matrix of real gradients. Use a larger lam, or relative=True."
        )
    M = torch.cholesky_inverse(L)
    h = (M * K).sum(dim=0)  # diag(MK) without forming MK: M and K are symmetric
    return h / (lam_value * torch.diagonal(M))


def gnq_from_grads(G: torch.Tensor, lam: float = 1e-2, *, relative: bool = False) -> torch.Tensor:
    """GNQ from materialised per-example gradients.

    Args:
        G: ``[B, P]`` per-example gradients (any trailing shape is flattened).
        lam: ridge λ > 0 (absolute), or ρ when ``relative=True``.
        relative: use λ = ρ·trace(K)/B.

    Returns:
        ``[B]`` float64 tensor.

    Example:
        >>> gnq_from_grads(torch.tensor([[3.0, 4.0]]), lam=1.0)  # B = 1: ‖g‖²/λ
        tensor([25.], dtype=torch.float64)
    """
    G = G.reshape(G.shape[0], -1).to(torch.float64)
    return gnq_from_gram(G @ G.T, lam, relative=relative)


def disclosure_bound(gnq: torch.Tensor) -> torch.Tensor:
    """Per-step disclosure bound ½·ln(1 + GNQ) in nats.

    gradguard's own accounting, not the paper's formula: treating the other examples'
    contributions plus λI as Gaussian noise on the update, one step's update is a
    Gaussian channel whose capacity for example j is ½·ln(1 + GNQ_j). Summing over
    steps further assumes the steps leak independently.
    """
    return 0.5 * torch.log1p(gnq.to(torch.float64))
