"""Sketched per-layer Grams (``strategy="sketch"``): Kronecker-structured random projections.

For a layer affine in its weight (Linear, GPT-2 Conv1D, Conv on unfolded patches) example
i's weight gradient is G_i = Σ_t δ_it a_itᵀ (``[d_out, d_in]``). Its sketch is

    S(G_i) = P_out G_i P_inᵀ = Σ_t (P_out δ_it)(P_in a_it)ᵀ      (``[k_out, k_in]``),

computed from the captured A and Δ without ever forming G_i (the LoGra construction,
Choe et al. 2024). P_in (``[k_in, d_in]``) and P_out have i.i.d. N(0, 1/k) entries, so
E[PᵀP] = I and every entry of the sketched Gram ⟨S(G_i), S(G_j)⟩ is an unbiased estimate
of ⟨G_i, G_j⟩. A side whose dimension is already ≤ k is not projected (exact on that side).

GNQ is a non-linear function of the Gram: its sketched value is an estimate, not unbiased.
Its relative error shrinks like sqrt(d_eff/m) (d_eff ≤ B) for total sketch size m.
Measured median relative error against exact (materialised) GNQ at the default
``sketch_dim`` (16384), random data, seed 1 (``python benchmarks/sketch_error.py MODEL 1 B``),
B = 32 / 128:

- GPT-2 (2 layers, d = 128, T = 16): 0.65% / 0.93%, Spearman 0.963 / 0.967;
- Llama (2 layers, d = 128): 1.3% / 1.3%, Spearman 0.986 / 0.994;
- MLP 256-512-512-10: 2.5% / 2.4%, Spearman 0.92 / 0.94; CNN: 3.0% / 2.9%, 0.95 / 0.98;
  one 512×512 layer: 2.5% / 2.4%, 0.88 / 0.91;
- the benchmark's GPT-2 (4 layers, d = 256, vocab 2000), B = 16, seeds 1–3: T = 64,
  1.0–1.6%, Spearman 0.91–0.94; T = 512, 0.44–0.82%, Spearman 0.96–0.98.

The ≥ 0.95 Spearman target is met on the d = 128 language models (tested in
``tests/test_sketch.py``) and at T = 512; where the exact GNQs of random examples differ
by only a few percent (the MLP, the single layer, the d = 256 GPT-2 at T = 64: 5% std/mean)
a 1–2% error reorders near-equal neighbours (0.88–0.94), though the values stay within
2.5%.

Projections are drawn on the layer's device from a ``torch.Generator`` seeded by (seed,
layer path, shape), so a resumed run and every DDP rank draw the same matrices. Only the
Kronecker factors exist (k × d_in and k × d_out per layer, nothing P × m); the hooks keep
them between steps, since drawing them costs more than applying them. Biases (Σ_t δ_it,
cheap) are added exactly. A weight tied between an embedding and its LM head is sketched
as one matrix (:func:`sketched_tied_gram`). Layers without an affine structure (norms,
untied embeddings, ``nn.MultiheadAttention``) and affine layers no larger than the sketch
keep their exact routes, their Grams added exactly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from .base import LayerCall, LayerKernel, _AffineKernel, _Segment, _segments_bias_grads

__all__ = ["DEFAULT_SKETCH_DIM", "AUTO_SKETCH_MULTIPLE", "sketch_projection", "sketch_sides",
           "sketch_rows", "sketched_gram", "can_sketch", "sketch_costs", "sketched_tied_gram",
           "tied_sketch_costs", "tied_projections", "add_tied_rows_"]

#: Per-layer sketch size: 64 blocks of 16 × 16 for a layer on vectors, one block (e.g.
#: 128 × 128, or 256 × 64 for a 256 → 1024 layer) from 64 positions on. Chosen on an MLP
#: and a CNN (B = 32, 128); measured on GPT-2-/Llama-shaped models it was not tuned on
#: (tests/test_sketch.py, benchmarks/sketch_error.py).
DEFAULT_SKETCH_DIM = 16384
#: ``strategy="auto"`` sketches a layer only when its exact routes (ghost and materialised)
#: both cost more than this multiple of the layer's own backward pass (2·rows·d_in·d_out
#: flops) and the sketch costs less; otherwise GNQ stays exact. ``strategy="sketch"``
#: sketches every affine layer larger than the sketch, whatever it costs: the projection
#: costs blocks·(k_in·d_in + k_out·d_out) flops per position (for one block of the default
#: on a 256 → 1024 layer, 65k, a quarter of the layer's own d_in·d_out), plus
#: k_in·k_out·blocks for the Kronecker core.
AUTO_SKETCH_MULTIPLE = 4.0
#: Most independent Kronecker blocks a layer's sketch is split into when both of its sides
#: are projected (layers on vectors; see :func:`sketch_sides`): 64 blocks of 8 × 8 for a
#: sketch of 4096.
_BLOCKS = 64


def sketch_sides(d_in: int, d_out: int, sketch_dim: int, positions: int = 1
                 ) -> tuple[int, int, int]:
    """(k_in, k_out, blocks): ``blocks`` independent k_out × k_in sketches, k_in·k_out·blocks
    ≤ ``sketch_dim``, for a layer applied at ``positions`` positions per example (tokens,
    conv patches; 1 for a layer on vectors).

    A side no larger than a block's side is kept whole (projected by the identity, exact
    on that side) and the other side takes the whole budget; otherwise both sides are
    projected in square blocks. Why blocks: a per-example gradient of a layer on vectors
    is rank one, δ aᵀ, and one block's estimate of its norm², ‖P_out δ‖²‖P_in a‖², has
    relative variance ≈ 2/k_in + 2/k_out, which the average of r blocks divides by r. A
    gradient summed over T positions pointing different ways averages that excess itself,
    as T blocks would, so sequences take ``_BLOCKS // positions`` blocks (one from 64
    positions): for the same ``sketch_dim`` the projection then costs √blocks times less
    per token, and a single block's sides are sized for the least projection work
    (k_in/k_out = d_out/d_in), the narrow side kept whole where the budget allows.

    Example:
        >>> sketch_sides(1024, 4096, 4096), sketch_sides(8, 4096, 4096)
        ((8, 8, 64), (8, 512, 1))
        >>> sketch_sides(1024, 4096, 4096, positions=128), sketch_sides(256, 1024, 16384, 64)
        ((128, 32, 1), (256, 64, 1))
    """
    if sketch_dim < 1:
        raise ValueError(f"sketch_dim must be a positive integer, got {sketch_dim}")
    blocks = max(1, _BLOCKS // max(1, positions))
    side = max(1, math.isqrt(sketch_dim // blocks))  # block side for that many blocks
    if d_in <= side or d_out <= side:  # keep the small side whole, project the other
        if d_in <= d_out:
            return d_in, min(d_out, max(1, sketch_dim // d_in)), 1
        return min(d_in, max(1, sketch_dim // d_out)), d_out, 1
    if blocks > 1:
        return side, side, max(1, sketch_dim // (side * side))
    # One block: the projection costs k_in·d_in + k_out·d_out per position, least for
    # k_in·k_out = sketch_dim at k_in / k_out = d_out / d_in (the narrow side projected less,
    # kept whole if it fits).
    k_in = min(d_in, sketch_dim, max(1, round(math.sqrt(sketch_dim * d_out / d_in))))
    k_out = min(d_out, max(1, sketch_dim // k_in))
    if k_out == d_out:
        k_in = min(d_in, max(1, sketch_dim // d_out))
    return k_in, k_out, 1


def sketch_projection(*, rows: int, cols: int, seed: int, key: str, device: torch.device,
                      dtype: torch.dtype, scale_rows: int | None = None) -> torch.Tensor:
    """A ``[rows, cols]`` Gaussian projection with N(0, 1/``scale_rows``) entries (default
    ``rows``), so E[PᵀP] = I for a block of ``scale_rows`` rows.

    Drawn on ``device`` from a generator seeded by (``seed``, ``key``, shape) through a
    stable hash (Python's ``hash`` differs between processes), so every process and every
    resumed run gets the same matrix.

    Example:
        >>> a = sketch_projection(rows=4, cols=6, seed=0, key="fc1", device="cpu",
        ...                       dtype=torch.float64)
        >>> b = sketch_projection(rows=4, cols=6, seed=0, key="fc1", device="cpu",
        ...                       dtype=torch.float64)
        >>> a.shape, torch.equal(a, b)
        (torch.Size([4, 6]), True)
    """
    digest = zlib.crc32(f"{seed}|{key}|{rows}x{cols}".encode())
    gen = torch.Generator(device=device).manual_seed(digest)
    P = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
    return P.to(dtype).div_(math.sqrt(scale_rows or rows))


class _Projections:
    """A layer's P_in ``[r·k_in, d_in]`` and P_out ``[r·k_out, d_out]`` (``None``: a side kept
    whole), for the sides :func:`sketch_sides` picks."""

    def __init__(self, d_in: int, d_out: int, positions: int, *, sketch_dim: int, seed: int,
                 key: str, device: torch.device, dtype: torch.dtype, cache: dict | None = None):
        self.k_in, self.k_out, self.r = sketch_sides(d_in, d_out, sketch_dim, positions)

        def draw(rows, cols, side, scale):
            spec = (seed, key + side, rows, cols, scale, str(device), dtype)
            P = None if cache is None else cache.get(spec)
            if P is None:
                P = sketch_projection(rows=rows, cols=cols, seed=seed, key=key + side,
                                      device=device, dtype=dtype, scale_rows=scale)
                if cache is not None:
                    cache[spec] = P
            return P

        self.P_in = None if self.k_in == d_in else draw(self.r * self.k_in, d_in, "/in",
                                                        self.k_in)
        self.P_out = None if self.k_out == d_out else draw(self.r * self.k_out, d_out, "/out",
                                                           self.k_out)

    def project_in(self, A: torch.Tensor) -> torch.Tensor:
        return A if self.P_in is None else A @ self.P_in.T

    def project_out(self, D: torch.Tensor) -> torch.Tensor:
        return D if self.P_out is None else D @ self.P_out.T

    def add_core_(self, R: torch.Tensor, A: torch.Tensor, D: torch.Tensor, offset: int) -> None:
        """R[offset:offset + b] += Σ_t (P_out δ_t)(P_in a_t)ᵀ per block, from the projected
        ``A`` ``[b, T, Gr, r·k_in]`` and ``D`` ``[b, T, Gr, r·k_out]``."""
        b, T, groups = A.shape[:3]
        A = A.reshape(b, T, groups, self.r, self.k_in).permute(0, 2, 3, 1, 4)
        D = D.reshape(b, T, groups, self.r, self.k_out).permute(0, 2, 3, 4, 1)
        R[offset:offset + b] += torch.matmul(D, A)  # [b, Gr, r, k_out, k_in]

    def finish(self, R: torch.Tensor) -> torch.Tensor:
        """The ``[B, m]`` sketch rows, blocks averaged (each block is unbiased on its own)."""
        if self.r > 1:
            R = R / math.sqrt(self.r)
        return R.reshape(R.shape[0], -1)


def sketch_rows(segs: Sequence[_Segment], batch_size: int, *, sketch_dim: int, seed: int,
                key: str, cache: dict | None = None, positions: int | None = None
                ) -> torch.Tensor:
    """Per-example sketched weight gradients, ``[B, m]``: per block r,
    Σ_t (P_outʳ δ_it)(P_inʳ a_it)ᵀ / √blocks, flattened.

    Args:
        segs: the layer's segments (A ``[B, T, Gr, d_in]``, Δ ``[B, T, Gr, d_out]``).
        batch_size: examples in the logical batch.
        sketch_dim: sketch size per group (k_in·k_out·blocks ≤ sketch_dim).
        seed: the sketch seed.
        key: names the layer (its path), so layers get independent projections.
        cache: a dict that keeps the drawn projections between steps (they depend only on
            the seed, the key and the shapes; drawing them costs more than using them).
        positions: the positions that set the block layout (:func:`sketch_sides`); default
            the fewest of any segment. Rows sketched separately must share it.
    """
    s0 = segs[0]
    groups = s0.A.shape[2]
    if positions is None:
        positions = min(s.A.shape[1] for s in segs)
    proj = _Projections(s0.A.shape[3], s0.D.shape[3], positions,
                        sketch_dim=sketch_dim, seed=seed, key=key, device=s0.A.device,
                        dtype=s0.A.dtype, cache=cache)
    R = s0.A.new_zeros(batch_size, groups, proj.r, proj.k_out, proj.k_in)
    for s in segs:
        A = proj.project_in(s.A)
        proj.add_core_(R, A, proj.project_out(s.D.to(A.dtype)), s.offset)
    return proj.finish(R)


def can_sketch(kernel: LayerKernel, module: nn.Module, names: Sequence[str],
               sketch_dim: int) -> bool:
    """Whether the layer has a sketch route that saves anything: an affine layer whose
    weight is guarded and larger than the sketch."""
    return (isinstance(kernel, _AffineKernel) and "weight" in names
            and module.weight.numel() > sketch_dim)


def sketch_costs(kernel: _AffineKernel, module: nn.Module, calls: Sequence[LayerCall],
                 sketch_dim: int) -> tuple[float, float]:
    """(sketch cost, the layer's own backward cost) in rough flops."""
    shapes = kernel.shapes(module, calls)
    positions = min(sh[1] for sh in shapes)
    cost = backward = 0.0
    for B, T, Gr, d_in, d_out in shapes:
        k_in, k_out, r = sketch_sides(d_in, d_out, sketch_dim, positions)
        rows = B * T * Gr
        cost += rows * r * (d_in * k_in + d_out * k_out + k_in * k_out)
        backward += 2.0 * rows * d_in * d_out
    return cost, backward


def sketched_gram(kernel: _AffineKernel, module: nn.Module, calls: Sequence[LayerCall],
                  batch_size: int, names: Sequence[str], dtype: torch.dtype, *, sketch_dim: int,
                  seed: int, key: str, cache: dict | None = None) -> torch.Tensor:
    """The layer's Gram with its weight sketched and its bias exact (``[B, B]``, ``dtype``)."""
    segs = kernel._segs(module, calls)
    R = sketch_rows(segs, batch_size, sketch_dim=sketch_dim, seed=seed, key=key,
                    cache=cache).to(dtype)
    K = R @ R.T
    if "bias" in names:
        b = _segments_bias_grads(segs, batch_size).reshape(batch_size, -1).to(dtype)
        K += b @ b.T
    return K


def tied_projections(d: int, vocab: int, positions: int, *, sketch_dim: int, seed: int, key: str,
                     device: torch.device, dtype: torch.dtype,
                     cache: dict | None = None) -> _Projections:
    """The projections of a weight tied between an embedding and an LM head (``[V, d]``:
    the head's output side is the vocabulary)."""
    return _Projections(d, vocab, positions, sketch_dim=sketch_dim, seed=seed, key=key,
                        device=device, dtype=dtype, cache=cache)


def add_tied_rows_(R: torch.Tensor, proj: _Projections, *, head_segs=(), emb_segs=()) -> None:
    """Add both uses' sketches of a tied embedding/head weight to ``R``
    (``[B, 1, r, k_out, k_in]``): the head's as for any linear layer, the embedding's
    Σ_t (P_out e_{id_t})(P_in δ_t)ᵀ, where P_out e_id is column ``id`` of P_out (a gather:
    no V × d matrix per example, no V-wide product per token)."""
    for s in head_segs:
        A = proj.project_in(s.A.to(R.dtype))
        proj.add_core_(R, A, proj.project_out(s.D.to(R.dtype)), s.offset)
    for ids, D, offset in emb_segs:  # out side: one-hot e_id; in side: the output gradient
        A = proj.project_in(D.to(R.dtype)).unsqueeze(2)
        if proj.P_out is None:
            Dp = torch.nn.functional.one_hot(ids, proj.k_out).to(R.dtype)
        else:
            Dp = proj.P_out.T[ids]
        proj.add_core_(R, A, Dp.unsqueeze(2), offset)


def sketched_tied_gram(uses, batch_size: int, dtype: torch.dtype, *, sketch_dim: int, seed: int,
                       key: str, cache: dict | None = None) -> torch.Tensor | None:
    """The sketched Gram of a weight tied between an ``nn.Embedding`` and a bias-free
    ``nn.Linear`` LM head (``[V, d]``), or ``None`` for other sharings.

    The sketch is linear in the gradient, so the tied gradient's sketch is the sum of both
    uses' sketches in one projected space (:func:`add_tied_rows_`).
    """
    from .transformers import _tied_pair

    pair = _tied_pair(uses)
    if pair is None:
        return None
    (emb, ek, ec), (head, hk, hc) = pair
    head_segs = hk._segs(head, hc)
    emb_segs = ek._segments(emb, ec)
    s0 = head_segs[0]
    positions = min([s.A.shape[1] for s in head_segs] + [ids.shape[1] for ids, _, _ in emb_segs])
    proj = tied_projections(s0.A.shape[3], s0.D.shape[3], positions, sketch_dim=sketch_dim,
                            seed=seed, key=key, device=s0.A.device, dtype=s0.A.dtype,
                            cache=cache)
    R = s0.A.new_zeros(batch_size, 1, proj.r, proj.k_out, proj.k_in)
    add_tied_rows_(R, proj, head_segs=head_segs, emb_segs=emb_segs)
    R = proj.finish(R).to(dtype)
    return R @ R.T


def tied_sketch_costs(uses, sketch_dim: int) -> tuple[float, float]:
    """(sketch cost, the head's own backward cost) in rough flops for a tied embedding/head
    weight (:func:`sketched_tied_gram`)."""
    from .transformers import _tied_pair

    (emb, ek, ec), (head, hk, hc) = _tied_pair(uses)
    cost, backward = sketch_costs(hk, head, hc, sketch_dim)  # the head: a linear layer
    shapes = hk.shapes(head, hc)
    d_in, d_out = shapes[0][3:]
    k_in, k_out, r = sketch_sides(d_in, d_out, sketch_dim, min(sh[1] for sh in shapes))
    emb_rows = sum(ids.numel() for ids, _, _ in ek._segments(emb, ec))
    cost += emb_rows * r * (d_in * k_in + k_in * k_out)  # δ projected, P_out's columns gathered
    return float(cost), float(backward)
