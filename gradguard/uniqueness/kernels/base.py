"""The kernel interface (:class:`LayerKernel`, :class:`LayerCall`) and the algebra shared
by layers that are affine in their parameters (Linear, Conv): segments of captured
inputs and output gradients, their Grams and weighted sums."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

# Ghost Grams on sequences form [chunk, B, T, T] intermediates; keep each under this
# many elements so memory stays bounded for long sequences.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerCall:
    """One call of a layer in a step, as the hooks captured it.

    Attributes:
        args: the positional inputs of the call (detached).
        kwargs: the keyword inputs of the call (detached).
        backprops: gradients of the loss w.r.t. the call's flattened tensor outputs;
            ``None`` for an output that did not reach the loss. Under
            ``loss_reduction="mean"`` the hooks may hand them over unscaled and multiply
            the kernel's results by the batch size instead (one scale for the whole
            step), so a kernel must be linear in them, as every gradient is.
        offset: position of this call's first example in the step's logical batch
            (micro-batches of a virtual step follow each other).
        batch_size: examples in this call.
        out_template: the call's outputs (detached), to rebuild shapes.
        extra: per-step scratch space (kernels cache derived tensors here).
        captures: gradients of the layer's internal tensors that a kernel's
            :meth:`LayerKernel.on_forward` hooks recorded during backward: lists of
            tensors, accumulated over backward passes and scaled like ``backprops``.
        saved: forward values such a kernel kept (not scaled).
        workspace: scratch buffers that outlive the step: the hooks hand the same dict to
            the same call of the same layer every step, so a kernel can reuse a large
            temporary instead of allocating (and, on CPU, page-faulting) it again. Its
            contents are overwritten the next step: never return a view of them.
        batch_dims: ``(arg_dims, kwarg_dims, output_dims)``, the batch dimension of every
            input and output (None: shared by the batch), traced from the model's inputs
            (:mod:`gradguard.uniqueness.provenance`); None outside a traced forward.
        shared: the call's outputs that do not depend on the batch
            (:class:`~gradguard.uniqueness.provenance.SharedOutput`); empty for the usual
            per-example call.
    """

    args: tuple
    kwargs: dict
    backprops: list[torch.Tensor | None]
    offset: int
    batch_size: int
    out_template: Any = None
    extra: dict = field(default_factory=dict)
    captures: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    workspace: dict = field(default_factory=dict)
    batch_dims: tuple | None = None
    shared: list = field(default_factory=list)
    hook_state: dict = field(default_factory=dict)  # the hooks' bookkeeping, not the kernels'
    #: set by the hooks when they reduced the call, as its output gradient arrived, to what
    #: its Gram needs (``{"kind": "materialise" | "sketch", "rows": {name: [b, n]}}``) and
    #: released its inputs and output gradients; kernels never see such a call.
    condensed: dict | None = None

    @property
    def activation(self) -> torch.Tensor:
        return self.args[0]

    @property
    def backprop(self) -> torch.Tensor:
        bp = self.backprops[0]
        if bp is None:
            out = tree_flatten(self.out_template)[0][0]
            bp = torch.zeros_like(out)
        return bp


class LayerKernel:
    """Base class: a kernel that only knows how to materialise per-example gradients.

    Subclasses override :meth:`per_example_grads`; ghost kernels also override
    :meth:`gram`, :meth:`weighted_grads` and :meth:`costs`.
    """

    #: the kernel computes gradients for every parameter of the module's subtree
    #: (e.g. MultiheadAttention uses ``out_proj.weight`` without calling ``out_proj``).
    covers_submodules: bool = False
    #: the kernel reads each input's batch dimension from the layer's own convention
    #: (MultiheadAttention, RNNs), not from the hooks' trace of the model's inputs.
    own_batch_dims: bool = False
    #: the kernel reads the values of the layer's parameters (re-running the layer, as
    #: torch.func or an RNN replay does), not only their shapes. Under FSDP the hooks
    #: all-gather such a layer's sharded parameters whole while the kernel runs.
    reads_parameters: bool = True

    def per_example_grads(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
                          names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def gram(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
             names: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
        return self.materialised_gram(module, calls, batch_size, names, dtype)

    def materialised_gram(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
                          names: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
        """The Gram of the materialised per-example gradients (the non-ghost route)."""
        grads = self.per_example_grads(module, calls, batch_size, names)
        return _gram_of(grads.values(), batch_size, dtype)

    def weighted_grads(self, module: nn.Module, calls: Sequence[LayerCall], weights: torch.Tensor,
                       names: Sequence[str]) -> dict[str, torch.Tensor]:
        grads = self.per_example_grads(module, calls, weights.shape[0], names)
        return {n: torch.einsum("b,b...->...", weights.to(g.dtype), g) for n, g in grads.items()}

    def costs(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
              names: Sequence[str]) -> tuple[float, float]:
        """(ghost cost, materialise cost); ``math.inf`` ghost cost means no ghost route."""
        return math.inf, 0.0

    def call_batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> int | None:
        """The number of examples in a call, where the layer defines it differently from
        its first input's leading dimension (``EmbeddingBag`` with offsets); else None."""
        return None

    def on_forward(self, module: nn.Module, call: LayerCall, output: Any) -> None:
        """Called by the hooks right after each captured forward call of ``module``.

        A kernel may register autograd hooks here to record internal gradients into
        ``call.captures`` (and forward values into ``call.saved``). Default: nothing.
        """


def _gram_of(grads, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    K = None
    for g in grads:
        g = g.reshape(batch_size, -1).to(dtype)
        K = g @ g.T if K is None else K + g @ g.T
    return K


# --------------------------------------------------------------------------- linear algebra
# Everything below works on "segments": per call, A of shape [B, T, Gr, d_in] and Δ of
# shape [B, T, Gr, d_out] (T positions: sequence steps or conv patches; Gr groups), plus
# the call's offset in the logical batch. A layer's per-example gradient is
# g_i = Σ over its segments' rows of Δ_itᵀ A_it.

@dataclass
class _Segment:
    A: torch.Tensor  # [B, T, Gr, d_in]
    D: torch.Tensor  # [B, T, Gr, d_out]
    offset: int


def _seg_gram(s1: _Segment, s2: _Segment) -> torch.Tensor:
    """Σ_{t,u,g} (a_it·a_ju)(δ_it·δ_ju) between two segments: a [B1, B2] block."""
    B1, T1, Gr = s1.A.shape[:3]
    B2, T2 = s2.A.shape[:2]
    if T1 == 1 and T2 == 1 and Gr == 1:  # a plain Linear on vectors: two matmuls
        return (s1.A[:, 0, 0] @ s2.A[:, 0, 0].T).mul_(s1.D[:, 0, 0] @ s2.D[:, 0, 0].T)
    if T1 == 1 and T2 == 1:
        AA = torch.einsum("igd,jgd->gij", s1.A[:, 0], s2.A[:, 0])
        DD = torch.einsum("igd,jgd->gij", s1.D[:, 0], s2.D[:, 0])
        return (AA * DD).sum(0)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B2 * T1 * T2 * Gr))
    blocks = []
    for start in range(0, B1, chunk):
        A1, D1 = s1.A[start:start + chunk], s1.D[start:start + chunk]
        AA = torch.einsum("itgd,jugd->ijgtu", A1, s2.A)
        DD = torch.einsum("itgd,jugd->ijgtu", D1, s2.D)
        blocks.append((AA * DD).sum((2, 3, 4)))
    return torch.cat(blocks)


def _segments_gram(segs: Sequence[_Segment], batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    if len(segs) == 1 and segs[0].A.shape[0] == batch_size:
        return _seg_gram(segs[0], segs[0]).to(dtype)
    K = torch.zeros(batch_size, batch_size, dtype=dtype, device=segs[0].A.device)
    for i, s1 in enumerate(segs):
        for s2 in segs[i:]:
            block = _seg_gram(s1, s2).to(dtype)
            r = slice(s1.offset, s1.offset + s1.A.shape[0])
            c = slice(s2.offset, s2.offset + s2.A.shape[0])
            K[r, c] += block
            if s2 is not s1:
                K[c, r] += block.T
    return K


def _segments_weight_grads(segs: Sequence[_Segment], batch_size: int) -> torch.Tensor:
    """Per-example Δᵀ A: [B, Gr, d_out, d_in]."""
    s0 = segs[0]
    if len(segs) == 1 and s0.A.shape[0] == batch_size:  # one call: no zero-filled buffer
        return _per_example_weight_grad(s0)
    G = s0.A.new_zeros(batch_size, s0.A.shape[2], s0.D.shape[3], s0.A.shape[3])
    for s in segs:
        G[s.offset:s.offset + s.A.shape[0]] += _per_example_weight_grad(s)
    return G


def _per_example_weight_grad(s: _Segment) -> torch.Tensor:
    # One batched matmul over (example, group) on views of A and Δ: about 2× faster
    # than the equivalent einsum, which copies its operands into its own layout first.
    if s.A.shape[2] == 1:
        return torch.bmm(s.D[:, :, 0].transpose(1, 2), s.A[:, :, 0]).unsqueeze(1)
    return torch.matmul(s.D.permute(0, 2, 3, 1), s.A.permute(0, 2, 1, 3))


# Materialised Grams form the per-example gradients a block of output features at a time,
# each block about this many elements (4 MiB in float32): the whole [B, d_out, d_in] tensor
# is memory-bound to write and read back, and on CPU a fresh allocation of it page-faults
# every step; a block stays in cache and its allocation is reused.
_MATERIALISE_BLOCK_ELEMENTS = 1 << 20


def _segments_materialised_gram(segs: Sequence[_Segment], batch_size: int,
                                dtype: torch.dtype) -> torch.Tensor:
    """Σ over output-feature blocks of G_blk G_blkᵀ, G_blk the per-example weight gradients
    restricted to the block's output features: the weight's Gram, ``[B, B]``."""
    s0 = segs[0]
    groups, d_in, d_out = s0.A.shape[2], s0.A.shape[3], s0.D.shape[3]
    K = torch.zeros(batch_size, batch_size, dtype=dtype, device=s0.A.device)
    step = max(1, _MATERIALISE_BLOCK_ELEMENTS // (batch_size * groups * d_in))
    for start in range(0, d_out, step):
        block = [_Segment(s.A, s.D[..., start:start + step], s.offset) for s in segs]
        G = _segments_weight_grads(block, batch_size).reshape(batch_size, -1).to(dtype)
        K.addmm_(G, G.T)
    return K


def _segments_bias_grads(segs: Sequence[_Segment], batch_size: int) -> torch.Tensor:
    """Per-example Σ_t Δ: [B, Gr, d_out]."""
    s0 = segs[0]
    if len(segs) == 1 and s0.D.shape[0] == batch_size:
        return s0.D.sum(1)
    b = s0.D.new_zeros(batch_size, s0.D.shape[2], s0.D.shape[3])
    for s in segs:
        b[s.offset:s.offset + s.D.shape[0]] += s.D.sum(1)
    return b


def _nonzero_rows(w: torch.Tensor) -> torch.Tensor | None:
    """Positions of the non-zero weights, when they are few enough that picking those
    rows beats weighting all of them (a policy's correction touches few examples)."""
    rows = torch.nonzero(w).squeeze(1)
    return rows if rows.numel() <= w.numel() // 2 else None


def _weighted_rows(s: _Segment, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment's A and w-scaled Δ, restricted to the examples with w ≠ 0."""
    ws = w[s.offset:s.offset + s.A.shape[0]].to(s.D.dtype)
    A, D = s.A, s.D
    rows = _nonzero_rows(ws)
    if rows is not None:
        A, D, ws = A[rows], D[rows], ws[rows]
    return A, D * ws.view(-1, 1, 1, 1)


def _segments_weighted(segs: Sequence[_Segment], w: torch.Tensor, *, weight: bool = True,
                       bias: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Σ_j w_j Δ_jᵀ A_j [Gr, d_out, d_in], Σ_j w_j Σ_t Δ_jt [Gr, d_out]) by book-keeping:
    one matmul per segment over the rows with w_j ≠ 0."""
    W = b = None
    for s in segs:
        A, D = _weighted_rows(s, w)
        if weight:
            if A.shape[2] == 1:  # one group: a plain GEMM over (example, position) rows
                part = (D.reshape(-1, D.shape[3]).T @ A.reshape(-1, A.shape[3])).unsqueeze(0)
            else:
                part = torch.einsum("btgo,btgi->goi", D, A)
            W = part if W is None else W + part
        if bias:
            part = D.sum((0, 1))
            b = part if b is None else b + part
    return W, b


def _seg_rows(segs: Sequence[_Segment]) -> int:
    return sum(s.A.shape[0] * s.A.shape[1] for s in segs)


class _AffineKernel(LayerKernel):
    """Shared logic of layers whose weight gradient is Δᵀ A over positions (Linear, Conv)."""

    reads_parameters = False  # Δᵀ A needs the weight's shape only

    def segments(self, module: nn.Module, calls: Sequence[LayerCall]) -> list[_Segment]:
        raise NotImplementedError

    def _segs(self, module: nn.Module, calls: Sequence[LayerCall]) -> list[_Segment]:
        """``segments`` built once per call and step (gram, then weighted_grads reuse them)."""
        out = []
        for c in calls:
            seg = c.extra.get("affine_segment")
            if seg is None:
                seg = self.segments(module, [c])[0]
                c.extra["affine_segment"] = seg
            out.append(seg)
        return out

    def shapes(self, module: nn.Module, calls: Sequence[LayerCall]) -> list[tuple[int, ...]]:
        """Per call (B, T, groups, d_in, d_out), for the cost model."""
        return [(*s.A.shape[:3], s.A.shape[3], s.D.shape[3]) for s in self._segs(module, calls)]

    def weight_shape(self, module: nn.Module) -> torch.Size:
        return module.weight.shape

    def per_example_grads(self, module, calls, batch_size, names):
        segs = self._segs(module, calls)
        out = {}
        if "weight" in names:
            out["weight"] = _segments_weight_grads(segs, batch_size).reshape(
                batch_size, *self.weight_shape(module))
        if "bias" in names:
            out["bias"] = _segments_bias_grads(segs, batch_size).reshape(batch_size, -1)
        return out

    def gram(self, module, calls, batch_size, names, dtype):
        segs = self._segs(module, calls)
        s = segs[0]
        if ("weight" in names and "bias" in names and len(segs) == 1
                and s.A.shape[:3] == (batch_size, 1, 1)):
            # A linear layer on vectors: its bias is a weight on a constant input 1, so
            # K = (A Aᵀ + 1) ⊙ (D Dᵀ) in one pass.
            A, D = s.A[:, 0, 0], s.D[:, 0, 0]
            return (A @ A.T).add_(1.0).mul_(D @ D.T).to(dtype)
        K = torch.zeros(batch_size, batch_size, dtype=dtype, device=segs[0].A.device)
        if "weight" in names:
            K += _segments_gram(segs, batch_size, dtype)
        if "bias" in names:
            b = _segments_bias_grads(segs, batch_size).reshape(batch_size, -1).to(dtype)
            K += b @ b.T
        return K

    def weighted_grads(self, module, calls, weights, names):
        W, b = _segments_weighted(self._segs(module, calls), weights, weight="weight" in names,
                                  bias="bias" in names)
        out = {}
        if W is not None:
            out["weight"] = W.reshape(self.weight_shape(module))
        if b is not None:
            out["bias"] = b.reshape(-1)
        return out

    def costs(self, module, calls, batch_size, names):
        shapes = self.shapes(module, calls)
        _, _, Gr, di, do = shapes[0]
        T = sum(sh[1] for sh in shapes)
        ghost = batch_size * batch_size * T * T * Gr * (di + do)
        if all(sh[1] == 1 for sh in shapes):
            ghost = batch_size * batch_size * Gr * (di + do) * len(shapes) ** 2
        rows = sum(sh[0] * sh[1] for sh in shapes)
        materialise = rows * Gr * di * do + batch_size * batch_size * Gr * di * do
        return float(ghost), float(materialise)
