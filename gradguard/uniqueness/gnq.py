"""Gradient uniqueness (GNQ) from a batch Gram matrix: pure functions, no state.

For per-example gradients g_1..g_B stacked as the rows of G, the leave-one-out
uniqueness of example j is

    GNQ_j = g_jᵀ (λI + Σ_{k≠j} g_k g_kᵀ)⁻¹ g_j.

Everything is computed in batch space from the B×B Gram K = G Gᵀ. With
M = (K + λI)⁻¹ the push-through identity gives h_j = g_jᵀ(λI + GᵀG)⁻¹g_j = [MK]_jj
= 1 − λM_jj, and Sherman–Morrison gives GNQ_j = h_j / (1 − h_j). We evaluate it as
[MK]_jj / (λ M_jj) rather than 1/(λM_jj) − 1, which cancels catastrophically when
GNQ_j is small.

Precision: the Gram is summed and solved in float64, except on a device without float64
(Apple's MPS, see :func:`float64_supported`), where both are float32: then GNQ's relative
error is below B·ε₃₂·λ_max(K)/λ (ε₃₂ = 1.2e-7; measured at most 0.2 of that on random and
near-duplicate batches, B = 4..128), e.g. 1e-3 at B = 64 with λ_max(K)/λ = 1.3e2, and no
digit is left once that number nears 1 (raise λ, or use ``relative_lam``).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["gnq_from_gram", "gnq_from_grads", "resolve_lam", "disclosure_bound",
           "float64_supported", "solve_dtype"]

_TINY = torch.finfo(torch.float64).tiny  # smallest normal float64
_PSD_RTOL = 1e-4  # per example, relative to max diag(K): see gnq_from_gram


def float64_supported(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` can hold float64 (Apple's MPS cannot).

    Example:
        >>> float64_supported("cpu")
        True
    """
    return _float64_on(torch.device(device).type)


@functools.cache
def _float64_on(device_type: str) -> bool:
    try:
        torch.zeros((), dtype=torch.float64, device=device_type)
    except (RuntimeError, TypeError):  # MPS: TypeError "MPS framework doesn't support float64"
        return False
    return True


def solve_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype Grams are summed and solved in on ``device``: float64, or float32 where
    :func:`float64_supported` says there is none (precision: see the module docstring).

    Example:
        >>> solve_dtype("cpu")
        torch.float64
    """
    return torch.float64 if float64_supported(device) else torch.float32


def _check_lam_value(lam) -> None:
    """A Python λ must be a real number, finite, > 0 and not subnormal (bools refused)."""
    if (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam)
            or lam < _TINY):
        raise ValueError(
            f"lam must be a finite number > 0 (and at least {_TINY:.3g}: a subnormal λ makes "
            f"every GNQ overflow), got {lam!r}"
        )


def resolve_lam(K: torch.Tensor, lam: float, *, relative: bool = False) -> float | torch.Tensor:
    """Return the ridge λ to use for Gram ``K``.

    Args:
        K: the B×B Gram matrix.
        lam: the absolute ridge, or with ``relative=True`` the factor ρ in
            λ = ρ·trace(K)/B (a ridge that follows the gradients' scale).
        relative: interpret ``lam`` as ρ.

    Returns:
        λ as a Python float (absolute) or a 0-d tensor on ``K``'s device (relative, in
        :func:`solve_dtype`), so the relative case costs no host round trip. A zero Gram
        under ``relative=True`` gives the dtype's smallest normal number (its GNQ is 0
        whatever λ is).

    Raises:
        ValueError: ``lam`` is not a finite number > 0 (bools, NaN, subnormals refused).
    """
    _check_lam_value(lam)
    if not relative:
        return float(lam)
    B = K.shape[0]
    # A batch of all-zero gradients has trace 0: keep λ strictly positive.
    dtype = solve_dtype(K.device)
    trace = torch.diagonal(K).sum().to(dtype) / max(B, 1)
    return torch.clamp(lam * trace, min=torch.finfo(dtype).tiny)


def _as_float_gram(K) -> torch.Tensor:
    """K as a float tensor: integer Grams are converted to float64 (exact below 2**53;
    float32 on a device without float64);
    bool and complex Grams are refused (they are no Gram of real gradients)."""
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"K must be a torch.Tensor, got {type(K).__name__}")
    if K.dtype == torch.bool or K.is_complex():
        raise TypeError(
            f"K must be a real Gram matrix (float, or integer converted to float64), got "
            f"dtype {K.dtype}: GNQ is defined for inner products of real gradients"
        )
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square [B, B] matrix, got shape {tuple(K.shape)}")
    return K if K.is_floating_point() else K.to(solve_dtype(K.device))


def _check_finite(K: torch.Tensor) -> None:
    if bool(torch.isfinite(K).all()):
        return
    if bool(torch.isnan(K).any()):
        raise ValueError(
            "the per-example gradient Gram contains NaN or Inf: some example's loss or "
            "gradient is not finite (NaN). Check the loss for this batch (GradGuard's "
            "on_nonfinite='skip' skips such steps)."
        )
    raise ValueError(
        f"the per-example gradient Gram overflowed {K.dtype} (it holds Inf, no NaN): the "
        "gradients are too large for that dtype, or a loss is infinite. Use "
        "gram_dtype=torch.float64 (or scale the loss down); GradGuard's on_nonfinite='skip' "
        "skips such steps."
    )


def _check_lam_tensor(lam: torch.Tensor) -> torch.Tensor:
    if lam.numel() != 1 or lam.dtype == torch.bool or lam.is_complex():
        raise ValueError(f"a tensor lam must be one real number, got shape {tuple(lam.shape)} "
                         f"and dtype {lam.dtype}")
    lam = lam.reshape(()).to(solve_dtype(lam.device))
    if not bool(torch.isfinite(lam) & (lam >= _TINY)):
        raise ValueError(f"lam must be a finite number > 0 (and at least {_TINY:.3g}), got "
                         f"{float(lam)!r}")
    return lam


def gnq_from_gram(K: torch.Tensor, lam: float | torch.Tensor = 1e-2, *,
                  relative: bool = False, validate: bool = True) -> torch.Tensor:
    """Leave-one-out gradient uniqueness of every example from the batch Gram.

    Precision: everything is solved in float64 (float32 on a device without float64: see
    the module docstring for that bound) on K and λ scaled by K's largest diagonal
    entry (GNQ is invariant under (K, λ) → (cK, cλ), so no scale overflows). The relative
    error is below ε·λ_max(K)/λ, with ε the unit roundoff of the dtype K was *formed* in
    (2.2e-16 for a float64 Gram, 1.2e-7 for float32 layer Grams): the rounding of K's
    entries bounds any batch-space method, and near-duplicate examples at small λ
    (GNQ driven by the small difference of two large gradients) come closest to it.
    An explicit P×P solve on the gradients themselves is not limited by K's rounding.

    Args:
        K: ``[B, B]`` Gram matrix of per-example gradients (K_ij = ⟨g_i, g_j⟩): real,
            symmetric up to rounding (relative max(1e-6, 16ε) of its largest entry) and
            positive semi-definite up to B·max(1e-4, 16ε) of its largest diagonal entry.
            Integer Grams are converted to float64.
        lam: ridge λ > 0 (absolute, a number or a one-element tensor), or ρ when
            ``relative=True``.
        relative: use λ = ρ·trace(K)/B.
        validate: check that K is finite, symmetric and positive semi-definite and that
            λ is valid (host synchronisations and a second Cholesky factorisation).
            ``False`` is for Grams gradguard formed itself from per-example gradients:
            nothing is read back to the host (no synchronisation on an accelerator) and
            nothing is raised; a K that is not finite, or for which K + λI does not
            factorise, gives NaN GNQ, so check ``torch.isfinite`` of the result before
            using it (GradGuard folds that into its one finiteness check per step).

    Returns:
        ``[B]`` float64 tensor (:func:`solve_dtype`) on ``K``'s device, ≥ 0 (NaN only as
        said under ``validate=False``). A zero Gram gives exactly 0.

    Raises:
        TypeError: ``K`` is not a tensor, or is bool or complex.
        ValueError: ``K`` is not square, holds NaN or Inf (the message says which: an
            overflow names ``gram_dtype``), is not symmetric, or has a negative eigenvalue
            beyond rounding; or λ is not finite and > 0.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> gnq_from_gram(G @ G.T, lam=1.0)
        tensor([1., 4.], dtype=torch.float64)
        >>> gnq_from_gram(torch.zeros(3, 3), lam=0.1, relative=True)  # no gradient, no GNQ
        tensor([0., 0., 0.], dtype=torch.float64)
    """
    K = _as_float_gram(K)
    dtype = solve_dtype(K.device)
    if isinstance(lam, torch.Tensor):
        lam_value = _check_lam_tensor(lam) if validate else lam.reshape(()).to(dtype)
    else:
        lam_value = resolve_lam(K, lam, relative=relative)
    B = K.shape[0]
    if B == 0:
        return torch.zeros(0, dtype=dtype, device=K.device)
    if validate:
        _check_finite(K)
    source_eps = torch.finfo(K.dtype).eps
    K = K.to(dtype)
    scale = torch.diagonal(K).max()
    if validate and not bool(scale > 0):
        if bool(K.abs().max() > 0):
            raise ValueError("K has no positive diagonal entry but non-zero entries: it is not "
                             "positive semi-definite, so no Gram matrix of real gradients")
        return torch.zeros(B, dtype=dtype, device=K.device)  # no gradient: GNQ 0
    # Unvalidated, a zero Gram (scale 0) is solved unscaled, without reading the scale
    # back: M = I/λ and MK = 0 give exactly 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rel_tol = max(1e-6, 16 * source_eps)
    asym = (K - K.T).abs().max() / K.abs().max() if validate else 0.0
    if validate and bool(asym > rel_tol):
        raise ValueError(
            f"K is not symmetric (max |K - Kᵀ| is {float(asym):.3g} of its largest entry, beyond "
            f"rounding {rel_tol:.1g}): it is not a Gram matrix G Gᵀ. Pass the full Gram, not a "
            "triangle or a product of different gradients."
        )
    # Scaled so that max diag(K) = 1; symmetrised: Grams summed from float32 pieces are
    # symmetric only to rounding.
    K = (K + K.T) / (2 * scale)
    lam_scaled = lam_value / scale
    eye = torch.eye(B, dtype=dtype, device=K.device)
    # Positive semi-definite up to rounding: K + τI must factorise. τ allows for Grams
    # formed in float32 and handed over in float64 (long float32 dot products err by
    # ~1e-5 relative), far below the negative eigenvalues of a matrix that is no Gram.
    psd_tol = B * max(_PSD_RTOL, 16 * source_eps)
    L, info = torch.linalg.cholesky_ex(K + lam_scaled * eye)
    if validate and (int(torch.linalg.cholesky_ex(K + psd_tol * eye)[1]) != 0
                     or int(info) != 0):
        raise ValueError(
            f"K is not positive semi-definite (an eigenvalue below -{psd_tol:.1g} of its "
            "largest diagonal entry): it is not a Gram matrix of real gradients, and GNQ would "
            "come out negative or infinite. Check how K was formed."
        )
    M = torch.cholesky_inverse(L)
    h = (M * K).sum(dim=0)  # diag(MK) without forming MK: M and K are symmetric
    # Rounding can leave h a few ulps below 0 where it is 0: GNQ is ≥ 0 by definition.
    gnq = (h / (lam_scaled * torch.diagonal(M))).clamp_min(0.0)
    # (validated, a failed factorisation raised above; unvalidated it must not pass as a
    # number: cholesky_ex leaves a partial factor that can give finite nonsense)
    return gnq if validate else torch.where(info == 0, gnq, torch.nan)


def gnq_from_grads(G: torch.Tensor, lam: float | torch.Tensor = 1e-2, *,
                   relative: bool = False) -> torch.Tensor:
    """GNQ from materialised per-example gradients.

    Args:
        G: ``[B, P]`` per-example gradients, one row per example (any trailing shape
            ``[B, *param_shape]`` is flattened). One example's gradient is ``g[None]``.
        lam: ridge λ > 0 (absolute), or ρ when ``relative=True``.
        relative: use λ = ρ·trace(K)/B.

    Returns:
        ``[B]`` float64 tensor (empty for B = 0).

    Raises:
        ValueError: ``G`` has fewer than 2 dimensions (see :func:`gnq_from_gram` for the rest).

    Example:
        >>> gnq_from_grads(torch.tensor([[3.0, 4.0]]), lam=1.0)  # B = 1: ‖g‖²/λ
        tensor([25.], dtype=torch.float64)
    """
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(
            f"G must be [B, P] per-example gradients (one row per example), got {shape}; for "
            "a single example's gradient g pass g[None]"
        )
    if G.dtype == torch.bool or G.is_complex():
        raise TypeError(f"G must hold real gradients, got dtype {G.dtype}")
    G = G.reshape(G.shape[0], math.prod(G.shape[1:])).to(solve_dtype(G.device))
    return gnq_from_gram(G @ G.T, lam, relative=relative)


def disclosure_bound(gnq: torch.Tensor) -> torch.Tensor:
    """Per-step disclosure bound ½·ln(1 + GNQ) in nats.

    gradguard's own accounting, not the paper's formula: treating the other examples'
    contributions plus λI as Gaussian noise on the update, one step's update is a
    Gaussian channel whose capacity for example j is ½·ln(1 + GNQ_j). Summing over
    steps further assumes the steps leak independently.
    """
    return 0.5 * torch.log1p(gnq.to(torch.float64))
