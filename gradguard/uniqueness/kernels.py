"""Per-layer kernels: per-example-gradient Grams and weighted gradient sums from A and Δ.

A kernel turns what the hooks captured for one layer during a step (its inputs A and
the gradients Δ of the loss w.r.t. its outputs, for every call of the layer) into

- ``gram``: the layer's contribution Σ_p G_p G_pᵀ to the B×B Gram of per-example
  gradients, from a "ghost" formula where one exists;
- ``per_example_grads``: the materialised per-example gradients [B, *p.shape];
- ``weighted_grads``: Σ_j w_j g_j, the gradient of a reweighted loss, without
  materialising anything where the layer is linear in its parameters
  (``add_weighted_grads`` accumulates it into ``.grad`` in place);
- ``costs``: rough flop counts of the ghost and materialised routes, so the engine can
  take the cheaper one per layer and per step.

Kernels live in a registry keyed by module type, as Opacus keeps its grad samplers.
Users add one for a custom layer with :func:`register_kernel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "LayerCall",
    "LayerKernel",
    "LinearKernel",
    "ConvKernel",
    "EmbeddingKernel",
    "MultiheadAttentionKernel",
    "FunctionalKernel",
    "GradSamplerKernel",
    "register_kernel",
    "kernel_for",
    "KERNELS",
]

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

    def per_example_grads(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
                          names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def gram(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
             names: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
        grads = self.per_example_grads(module, calls, batch_size, names)
        return _gram_of(grads.values(), batch_size, dtype)

    def weighted_grads(self, module: nn.Module, calls: Sequence[LayerCall], weights: torch.Tensor,
                       names: Sequence[str]) -> dict[str, torch.Tensor]:
        grads = self.per_example_grads(module, calls, weights.shape[0], names)
        return {n: torch.einsum("b,b...->...", weights.to(g.dtype), g) for n, g in grads.items()}

    def add_weighted_grads(self, module: nn.Module, calls: Sequence[LayerCall],
                           weights: torch.Tensor, names: Sequence[str],
                           grads: dict[str, torch.Tensor]) -> None:
        """``grads[n] += Σ_j w_j g_j`` in place (``grads``: the parameters' ``.grad``)."""
        for n, g in self.weighted_grads(module, calls, weights, names).items():
            grads[n].add_(g.reshape(grads[n].shape).to(grads[n].dtype))

    def costs(self, module: nn.Module, calls: Sequence[LayerCall], batch_size: int,
              names: Sequence[str]) -> tuple[float, float]:
        """(ghost cost, materialise cost); ``math.inf`` ghost cost means no ghost route."""
        return math.inf, 0.0

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
    return torch.matmul(s.D.permute(0, 2, 3, 1), s.A.permute(0, 2, 1, 3))


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

    def add_weighted_grads(self, module, calls, weights, names, grads):
        segs = self._segs(module, calls)
        g = grads.get("weight")
        if (g is None or not g.is_contiguous() or ("bias" in names and grads.get("bias") is None)
                or any(s.A.shape[2] != 1 or s.D.dtype != g.dtype for s in segs)):
            return super().add_weighted_grads(module, calls, weights, names, grads)
        # One group: accumulate D_wᵀ A straight into .grad (no [d_out, d_in] temporary).
        for s in segs:
            A, D = _weighted_rows(s, weights)
            g.view(D.shape[3], A.shape[3]).addmm_(D.reshape(-1, D.shape[3]).T,
                                                  A.reshape(-1, A.shape[3]))
            if "bias" in names:
                grads["bias"].add_(D.sum((0, 1, 2)))

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


def _batch_first_3d(x: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(
            f"{what} got an input of shape {tuple(x.shape)} with no batch dimension; "
            "gradguard needs batched inputs (batch first)."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LinearKernel(_AffineKernel):
    """``nn.Linear`` with any number of leading dimensions.

    Ghost Gram: K_ij = Σ_{t,s}(a_it·a_js)(δ_it·δ_js): the exact kernel on sequences
    (flattening tokens into features is not the same and is wrong).
    """

    def segments(self, module, calls):
        segs = []
        for c in calls:
            A = _batch_first_3d(c.activation, c.batch_size, type(module).__name__)
            D = c.backprop.reshape(A.shape[0], A.shape[1], -1)
            segs.append(_Segment(A.unsqueeze(2), D.unsqueeze(2), c.offset))
        return segs


def _conv_pad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pad ``x`` exactly as the conv's forward does (any padding mode, "same", "valid")."""
    nd = x.dim() - 2
    k, d = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * nd
        else:  # "same": PyTorch puts the odd element on the right
            pads = []
            for i in range(nd):
                total = d[i] * (k[i] - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    flat = []
    for left, right in reversed(pads):
        flat += [left, right]
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    return x


def _conv_backward_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input and padding to give ``convolution_backward``: zero padding is passed
    through (the kernel pads on the fly), other modes are applied to a copy first."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, list(module.padding)
    return _conv_pad(module, x), [0] * (x.dim() - 2)


def _scratch(workspace: dict, name: str, shape: tuple[int, ...], like: torch.Tensor
             ) -> torch.Tensor:
    """A ``shape`` tensor backed by ``workspace[name]``, grown when too small."""
    numel = math.prod(shape)
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def unfold_conv_input(module: nn.Module, x: torch.Tensor, *,
                      workspace: dict | None = None) -> torch.Tensor:
    """Patches of a ConvNd input: [B, L, groups, C_in/groups · prod(kernel)].

    Matches the weight layout [C_out, C_in/groups, *kernel] so per-example gradients
    are Δᵀ·patches per group. Works for any N with stride, padding (all modes),
    dilation and groups. The result is a permuted view of a [B, C·prod(kernel), L]
    buffer: copying the strided windows in that order moves whole rows of positions
    at a time, 2-5× faster on CPU than ``F.unfold`` or a position-major copy.
    """
    x = _conv_pad(module, x)
    nd = x.dim() - 2
    for i in range(nd):
        dim = 2 + i
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        x = x.unfold(dim, span, module.stride[i])
        if module.dilation[i] > 1:
            x = x[..., :: module.dilation[i]]
    # x: [B, C, L_1..L_nd, k_1..k_nd] -> [B, C, k_1..k_nd, L_1..L_nd]
    B, C = x.shape[:2]
    L = math.prod(x.shape[2:2 + nd])
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    windows = x.permute(perm)
    if workspace is None:
        cols = windows.reshape(B, module.groups, -1, L)
    else:
        cols = _scratch(workspace, "unfold", tuple(windows.shape), x).copy_(windows)
        cols = cols.view(B, module.groups, -1, L)
    return cols.permute(0, 3, 1, 2)


class ConvKernel(_AffineKernel):
    """``nn.Conv1d/2d/3d``: the linear kernel on unfolded patches, per group."""

    # The conv's own backward kernel (weighted_grads below) beats unfolding the input.
    add_weighted_grads = LayerKernel.add_weighted_grads

    def segments(self, module, calls):
        segs = []
        for c in calls:
            x = c.activation
            if x.dim() == module.weight.dim() - 1:
                raise ValueError(
                    f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}; "
                    "gradguard needs batched inputs (batch first)."
                )
            A = unfold_conv_input(module, x, workspace=c.workspace)
            per_group = module.out_channels // module.groups
            D = c.backprop.reshape(x.shape[0], module.groups, per_group, -1)
            D = D.permute(0, 3, 1, 2)
            segs.append(_Segment(A, D, c.offset))
        return segs

    def shapes(self, module, calls):
        # From shapes alone: unfolding only to price the routes costs as much as a route.
        G = module.groups
        d_in = module.in_channels // G * math.prod(module.kernel_size)
        out = []
        for c in calls:
            positions = tree_flatten(c.out_template)[0][0].shape[2:]
            out.append((c.activation.shape[0], math.prod(positions), G, d_in,
                        module.out_channels // G))
        return out

    def per_example_grads(self, module, calls, batch_size, names):
        # With the batch folded into the groups, the conv's own weight-backward kernel
        # gives every example's gradient at once: no unfolded copy of the input (which is
        # k^d times larger) and 2-4× faster than unfold + bmm on CPU. Except with very few
        # input channels per group (an RGB stem): there oneDNN's grouped kernel is 2-3×
        # slower than the im2col + bmm route, whose unfolded input is then small.
        if calls[0].activation.dim() == 4 and module.in_channels // module.groups < 8:
            return super().per_example_grads(module, calls, batch_size, names)
        out: dict[str, torch.Tensor] = {}
        for c in calls:
            x, padding = _conv_backward_input(module, c.activation)
            D = c.backprop
            B, nd = x.shape[0], x.dim() - 2
            parts = {}
            if "weight" in names:
                shape = module.weight.shape
                template = D.new_empty(1).expand(B * shape[0], *shape[1:])
                parts["weight"] = torch.ops.aten.convolution_backward(
                    D.reshape(1, B * shape[0], *D.shape[2:]),
                    x.to(D.dtype).reshape(1, B * x.shape[1], *x.shape[2:]), template, None,
                    list(module.stride), padding, list(module.dilation), False, [0] * nd,
                    B * module.groups, [False, True, False])[1].view(B, *shape)
            if "bias" in names:
                parts["bias"] = D.sum(dim=list(range(2, D.dim())))
            for n, g in parts.items():
                if len(calls) == 1 and batch_size == B:
                    out[n] = g
                    continue
                if n not in out:
                    out[n] = g.new_zeros(batch_size, *g.shape[1:])
                out[n][c.offset:c.offset + B] += g
        return out

    def weighted_grads(self, module, calls, weights, names):
        # Σ_j w_j g_j is the weight gradient of the reweighted output gradients: the conv's
        # own backward kernel does it without unfolding the input.
        out: dict[str, torch.Tensor] = {}
        for c in calls:
            x, D = c.activation, c.backprop
            w = weights[c.offset:c.offset + x.shape[0]].to(D.dtype)
            rows = _nonzero_rows(w)
            if rows is not None:
                x, D, w = x[rows], D[rows], w[rows]
            x, padding = _conv_backward_input(module, x)
            nd = x.dim() - 2
            D = D * w.view(-1, *([1] * (D.dim() - 1)))
            parts = {}
            if "weight" in names:
                template = D.new_empty(1).expand(module.weight.shape)
                parts["weight"] = torch.ops.aten.convolution_backward(
                    D, x.to(D.dtype), template, None, list(module.stride), padding,
                    list(module.dilation), False, [0] * nd, module.groups,
                    [False, True, False])[1]
            if "bias" in names:
                parts["bias"] = D.sum(dim=[0, *range(2, D.dim())])
            for n, g in parts.items():
                out[n] = g if n not in out else out[n] + g
        return out


class EmbeddingKernel(LayerKernel):
    """``nn.Embedding``: K_ij = Σ_{t,s} [id_it = id_js] (δ_it·δ_js).

    Positions holding ``padding_idx`` contribute nothing, as in the layer's backward.
    """

    def _segments(self, module, calls):
        if module.scale_grad_by_freq:
            raise ValueError(
                "Embedding(scale_grad_by_freq=True) scales gradients by token counts over the "
                "whole batch, which mixes examples: per-example gradients are undefined. "
                "Set scale_grad_by_freq=False to guard this model."
            )
        segs = []
        for c in calls:
            ids = c.activation.reshape(c.batch_size, -1)
            D = c.backprop.reshape(c.batch_size, ids.shape[1], -1)
            if module.padding_idx is not None:
                D = D * (ids != module.padding_idx).unsqueeze(-1).to(D.dtype)
            segs.append((ids, D, c.offset))
        return segs

    def per_example_grads(self, module, calls, batch_size, names):
        if "weight" not in names:
            return {}
        V = module.weight.shape[0]
        G = module.weight.new_zeros(batch_size, *module.weight.shape)
        flat = G.view(batch_size * V, -1)
        for ids, D, off in self._segments(module, calls):
            # One scatter for the whole call: row (example, token id) of the [B·V, E] view.
            rows = torch.arange(off, off + ids.shape[0], device=ids.device)[:, None] * V + ids
            flat.index_add_(0, rows.reshape(-1), D.reshape(-1, D.shape[-1]).to(G.dtype))
        return {"weight": G}

    def gram(self, module, calls, batch_size, names, dtype):
        segs = self._segments(module, calls)
        K = torch.zeros(batch_size, batch_size, dtype=dtype, device=segs[0][1].device)
        if "weight" not in names:
            return K
        if K.device.type == "cpu":
            ex = torch.cat([(off + torch.arange(ids.shape[0]))[:, None].expand_as(ids).reshape(-1)
                            for ids, _, off in segs])
            ids = torch.cat([ids.reshape(-1) for ids, _, _ in segs])
            D = torch.cat([D.reshape(-1, D.shape[-1]) for _, D, _ in segs])
            return _embedding_gram_grouped(ex, ids, D, batch_size, dtype)
        for a, (ids1, D1, o1) in enumerate(segs):
            for ids2, D2, o2 in segs[a:]:
                B1, T1 = ids1.shape
                B2, T2 = ids2.shape
                chunk = max(1, _CHUNK_ELEMENTS // max(1, B2 * T1 * T2))
                rows = []
                for s in range(0, B1, chunk):
                    eq = ids1[s:s + chunk, None, :, None] == ids2[None, :, None, :]
                    dd = torch.einsum("itd,jud->ijtu", D1[s:s + chunk], D2)
                    rows.append((dd * eq).sum((2, 3)))
                block = torch.cat(rows).to(dtype)
                K[o1:o1 + B1, o2:o2 + B2] += block
                if ids2 is not ids1:
                    K[o2:o2 + B2, o1:o1 + B1] += block.T
        return K

    def weighted_grads(self, module, calls, weights, names):
        if "weight" not in names:
            return {}
        g = torch.zeros_like(module.weight)
        for ids, D, off in self._segments(module, calls):
            w = weights[off:off + ids.shape[0]].to(D.dtype)
            rows = _nonzero_rows(w)
            if rows is not None:
                ids, D, w = ids[rows], D[rows], w[rows]
            g.index_add_(0, ids.reshape(-1),
                         (D * w[:, None, None]).reshape(-1, D.shape[-1]).to(g.dtype))
        return {"weight": g}

    def costs(self, module, calls, batch_size, names):
        T = sum(c.activation.reshape(c.batch_size, -1).shape[1] for c in calls)
        ghost = batch_size * batch_size * T * T * module.embedding_dim
        if module.weight.device.type == "cpu":
            # Grouped by token id: Σ_v n_v² E ≤ B·N·E for N tokens (n_v ≤ B examples per id),
            # padded to powers of two (≤ 2×).
            ghost = 2 * batch_size * batch_size * T * module.embedding_dim
        materialise = batch_size * module.weight.numel() * (1 + batch_size)
        return float(ghost), float(materialise)


# Token groups of up to 2**_MIN_BUCKET rows share one bucket: padding them is cheaper than
# the dozen small ops each extra bucket costs (measured on CPU, uniform and Zipf tokens).
_MIN_BUCKET = 2


def _embedding_gram_grouped(ex: torch.Tensor, ids: torch.Tensor, D: torch.Tensor,
                            batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Exact embedding Gram K = Σ_v S_v S_vᵀ, S_v [B, E] the per-example gradient rows of id v.

    Only examples that contain token v have a non-zero row in S_v, so after summing
    each example's tokens per id (rows keyed (id, example)), K is a sum of small
    n_v × n_v blocks over the ids present: Σ_v n_v²·E work instead of B²·V·E (dense
    per-example gradients) or B²·T²·E (all token pairs). Ids are grouped in buckets of
    power-of-two size so that each bucket is one batched matmul. Reads group sizes on
    the host (one sync), hence used on CPU only.

    Args:
        ex: ``[N]`` example index of every token (position in the logical batch).
        ids: ``[N]`` token ids.
        D: ``[N, E]`` output gradients of the tokens (zero for padding tokens).
    """
    B, E = batch_size, D.shape[1]
    keys, inv = torch.unique(ids.to(torch.int64) * B + ex, return_inverse=True)  # id-major
    rows = D.new_zeros(keys.shape[0], E).index_add_(0, inv, D)
    row_ex = keys % B
    _, counts = torch.unique_consecutive(keys // B, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    pos = torch.arange(keys.shape[0]) - (torch.cumsum(counts, 0) - counts)[group]
    bucket = torch.ceil(torch.log2(counts.to(torch.float64))).to(torch.int64)
    bucket.clamp_(min=_MIN_BUCKET)
    K = torch.zeros(B * B, dtype=dtype)
    for b in torch.unique(bucket).tolist():
        n = 1 << b
        in_bucket = bucket == b
        slot = torch.cumsum(in_bucket, 0) - 1  # group → its index inside the bucket
        sel = in_bucket[group]
        g, p = slot[group[sel]], pos[sel]
        P = rows.new_zeros(int(in_bucket.sum()), n, E)
        P[g, p] = rows[sel]
        X = torch.zeros(P.shape[0], n, dtype=torch.int64)  # empty slots: zero rows, any index
        X[g, p] = row_ex[sel]
        blocks = torch.bmm(P, P.transpose(1, 2)).to(dtype)
        K.index_add_(0, (X[:, :, None] * B + X[:, None, :]).reshape(-1), blocks.reshape(-1))
    return K.view(B, B)


class GradSamplerKernel(LayerKernel):
    """Materialises through an Opacus-style grad sampler ``fn(layer, activations, backprops)``.

    ``fn`` returns ``{parameter: per-example gradient [B, *p.shape]}`` for one call, with
    ``activations`` the list of the call's positional tensor inputs: the signature of
    Opacus's ``register_grad_sampler`` functions, so existing ones can be reused.
    """

    def __init__(self, fn: Callable[[nn.Module, list, torch.Tensor], dict]):
        self.fn = fn

    def per_example_grads(self, module, calls, batch_size, names):
        by_param = {id(getattr(module, n)): n for n in names}
        out: dict[str, torch.Tensor] = {}
        for c in calls:
            acts = [a for a in c.args if isinstance(a, torch.Tensor)]
            result = self.fn(module, acts, c.backprop)
            for p, g in result.items():
                n = by_param.get(id(p))
                if n is None:
                    continue
                if n not in out:
                    out[n] = g.new_zeros(batch_size, *g.shape[1:])
                out[n][c.offset:c.offset + g.shape[0]] += g
        return out

    def costs(self, module, calls, batch_size, names):
        return math.inf, 0.0


class FunctionalKernel(LayerKernel):
    """Any layer: per-example gradients of its own parameters by ``torch.func``.

    For each example, the gradient of ⟨layer(x_i), δ_i⟩ w.r.t. the layer's parameters,
    vectorised with ``vmap``. Tensors whose leading dimension equals the call's batch
    size are treated as batched; others (masks, positional tables) are shared.
    """

    def __init__(self, *, covers_submodules: bool = False,
                 batch_dims: Callable[[nn.Module, LayerCall], tuple] | None = None):
        self.covers_submodules = covers_submodules
        self._batch_dims = batch_dims

    def _dims(self, module: nn.Module, call: LayerCall):
        if self._batch_dims is not None:
            return self._batch_dims(module, call)

        def dim_of(t):
            batched = isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == call.batch_size
            return 0 if batched else None

        arg_dims = tuple(dim_of(a) for a in call.args)
        kw_dims = {k: dim_of(v) for k, v in call.kwargs.items()}
        out_dims = [dim_of(o) for o in tree_flatten(call.out_template)[0]]
        return arg_dims, kw_dims, out_dims

    def per_example_grads(self, module, calls, batch_size, names):
        from torch.func import functional_call, grad, vmap

        params = dict(module.named_parameters(recurse=self.covers_submodules))
        trainable = {n: params[n].detach() for n in names}
        frozen = {n: p.detach() for n, p in params.items() if n not in trainable}
        buffers = dict(module.named_buffers(recurse=True))
        out: dict[str, torch.Tensor] = {}
        for c in calls:
            arg_dims, kw_dims, out_dims = self._dims(module, c)
            bps = []
            for o, bp in zip(tree_flatten(c.out_template)[0], c.backprops):
                if not isinstance(o, torch.Tensor) or not o.is_floating_point():
                    bps.append(None)
                    continue
                bps.append(torch.zeros_like(o) if bp is None else bp)
            bp_dims = [d if b is not None else None for b, d in zip(bps, out_dims)]
            kw_keys = list(c.kwargs)

            def inner(p, args, kwvals, backprops, kw_keys=kw_keys, bp_dims=bp_dims,
                      arg_dims=arg_dims, kw_dims=kw_dims):
                # vmap strips the batch dimension; the layer expects it, so put it back.
                args = tuple(a.unsqueeze(d) if d is not None else a for a, d in zip(args, arg_dims))
                kw = {k: (v.unsqueeze(kw_dims[k]) if kw_dims[k] is not None else v)
                      for k, v in zip(kw_keys, kwvals)}
                res = functional_call(module, ({**p, **frozen}, buffers), args, kw)
                total = 0.0
                for o, b, d in zip(tree_flatten(res)[0], backprops, bp_dims):
                    if b is None:
                        continue
                    b = b.unsqueeze(d) if d is not None else b
                    total = total + (o * b).sum()
                return total

            in_dims = (None, arg_dims, [kw_dims[k] for k in kw_keys], bp_dims)
            try:
                g = vmap(grad(inner), in_dims=in_dims, randomness="same")(
                    trainable, c.args, [c.kwargs[k] for k in kw_keys], bps)
            except Exception as exc:  # noqa: BLE001 - re-raised with the fix
                raise NotImplementedError(
                    f"gradguard cannot compute per-example gradients of {type(module).__name__} "
                    f"with torch.func ({type(exc).__name__}: {exc}). Register a kernel for it: "
                    f"`@gradguard.register_kernel({type(module).__name__})` on a function "
                    "(layer, activations, backprops) -> {param: per-example grad}, as for "
                    "Opacus's register_grad_sampler."
                ) from exc
            for n, gn in g.items():
                if n not in out:
                    out[n] = gn.new_zeros(batch_size, *gn.shape[1:])
                out[n][c.offset:c.offset + gn.shape[0]] += gn
        return out


def _mha_batch_dims(module: nn.MultiheadAttention, call: LayerCall):
    seq_dim = 0 if module.batch_first else 1
    names = ["query", "key", "value"]
    arg_dims = tuple(seq_dim if i < 3 else None for i in range(len(call.args)))
    kw_dims = {}
    for k, v in call.kwargs.items():
        if k in names:
            kw_dims[k] = seq_dim
        elif k == "key_padding_mask" and isinstance(v, torch.Tensor):
            kw_dims[k] = 0
        elif k == "attn_mask" and isinstance(v, torch.Tensor) and v.dim() == 3:
            raise ValueError(
                "MultiheadAttention with a 3-D attn_mask (one mask per example and head) "
                "is not supported by gradguard; use a 2-D attn_mask plus key_padding_mask."
            )
        else:
            kw_dims[k] = None
    outs = tree_flatten(call.out_template)[0]
    out_dims = [seq_dim if i == 0 else (0 if isinstance(o, torch.Tensor) else None)
                for i, o in enumerate(outs)]
    return arg_dims, kw_dims, out_dims


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Views of the same memory with the same layout (detach() makes distinct objects)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


_VIEW_NODES = ("ViewBackward0", "TransposeBackward0", "PermuteBackward0", "UnsafeViewBackward0",
               "CloneBackward0", "AliasBackward0", "ReshapeAliasBackward0")


def _skip_views(fn):
    while fn is not None and type(fn).__name__ in _VIEW_NODES:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        fn = nxt[0] if len(nxt) == 1 else None
    return fn


def _find_sdpa_node(out: torch.Tensor, module: nn.MultiheadAttention):
    """The fused-attention autograd node behind ``out = MHA(...)[0]``, or None.

    Only the exact graph of ``F.multi_head_attention_forward`` is accepted: views, then
    out_proj's (add)mm whose weight operand is this module's ``out_proj.weight``, then
    views, then a ``ScaledDotProduct*Backward`` node. Anything else (the need_weights
    path, custom attention) returns None and the kernel recomputes instead.
    """
    fn = _skip_views(out.grad_fn)
    if fn is None or type(fn).__name__ not in ("AddmmBackward0", "MmBackward0"):
        return None
    try:
        weight = fn._saved_mat2
    except (AttributeError, RuntimeError):
        return None
    if weight is None or weight.data_ptr() != module.out_proj.weight.data_ptr():
        return None
    for nxt, _ in fn.next_functions:
        node = _skip_views(nxt)
        if node is not None and type(node).__name__.startswith("ScaledDotProduct"):
            return node
    return None


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")


def _mha_attention(module: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, a: dict) -> torch.Tensor:
    """The attention core of ``F.multi_head_attention_forward`` on projected, batch-first
    q [B, T, d], k, v [B, S, d], with its mask semantics; returns [B, T, d] (pre out_proj)."""
    B, T, d = q.shape
    S, h = k.shape[1], module.num_heads
    attn_mask, is_causal = a.get("attn_mask"), bool(a.get("is_causal", False))
    kpm = F._canonical_mask(mask=a.get("key_padding_mask"), mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=q.dtype)
    if is_causal and kpm is None and not a.get("need_weights", True):
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=q.dtype, check_other=False)
        is_causal = is_causal and kpm is None and attn_mask is None
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(1, 1, T, S) if attn_mask.dim() == 2 else attn_mask.view(B, h, T, S)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    heads = [t.view(B, t.shape[1], h, d // h).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*heads, attn_mask=mask, dropout_p=0.0,
                                         is_causal=is_causal and mask is None)
    return out.transpose(1, 2).reshape(B, T, d)


class MultiheadAttentionKernel(LayerKernel):
    """``nn.MultiheadAttention`` without ``vmap``: its four projections as linear layers.

    Every parameter of the layer sits in a linear map (the q, k, v input projections and
    ``out_proj``). Per call, the attention core is recomputed once, batched, from the
    captured inputs, and one backward of it gives the gradients w.r.t. each example's
    projected q, k and v (examples do not interact inside attention, so the batched
    backward holds every example's own Δ). Each projection is then a linear layer on
    sequences with known A and Δ, and the ghost / materialise kernels apply.
    Configurations this does not recompute exactly (dropout in training mode, bias_k /
    bias_v, add_zero_attn, a gradient flowing into the returned attention weights,
    unbatched inputs) go to the torch.func fallback.
    """

    covers_submodules = True

    def __init__(self):
        self.fallback = FunctionalKernel(covers_submodules=True, batch_dims=_mha_batch_dims)

    @staticmethod
    def _supported(module: nn.MultiheadAttention, calls: Sequence[LayerCall]) -> bool:
        if module.bias_k is not None or module.add_zero_attn or (
                module.training and module.dropout > 0):
            return False
        return all(c.activation.dim() == 3 and c.backprops[0] is not None
                   and all(b is None for b in c.backprops[1:]) for c in calls)

    @staticmethod
    def _params(module: nn.MultiheadAttention) -> dict[str, tuple[str, slice | None]]:
        """Block → (weight name, rows of it); biases are rows of ``in_proj_bias``."""
        d = module.embed_dim
        if module._qkv_same_embed_dim:
            return {b: ("in_proj_weight", slice(i * d, (i + 1) * d))
                    for i, b in enumerate("qkv")}
        return {b: (f"{b}_proj_weight", None) for b in "qkv"}

    def _blocks(self, module, calls) -> list[dict[str, _Segment]]:
        out = []
        for c in calls:
            blocks = c.extra.get("mha_blocks")
            if blocks is None:
                blocks = self._recompute(module, c)
                c.extra["mha_blocks"] = blocks
            out.append(blocks)
        return out

    def on_forward(self, module, call, output):
        # Record the fused attention node's input gradients during the user's own
        # backward, so that the kernel needs no recompute of the attention (which costs
        # about as much as the attention's forward and backward in training).
        out = output[0] if isinstance(output, (tuple, list)) else output
        node = _find_sdpa_node(out, module) if isinstance(out, torch.Tensor) else None
        if node is None:
            return
        try:
            call.saved["sdpa_out"] = node._saved_output.detach()
        except (AttributeError, RuntimeError):
            return

        def hook(grad_inputs, grad_outputs):
            g = [None if t is None else t.detach() for t in grad_inputs[:3]]
            prev = call.captures.get("sdpa")
            call.captures["sdpa"] = g if prev is None else [
                b if a is None else (a if b is None else a + b) for a, b in zip(prev, g)]

        node.register_hook(hook)

    def _recompute(self, module, c: LayerCall) -> dict[str, _Segment]:
        a = dict(zip(_MHA_ARGS, c.args))
        a.update(c.kwargs)
        x = {"q": a["query"], "k": a["key"], "v": a["value"]}
        delta = c.backprops[0]
        if not module.batch_first:
            x = {b: t.transpose(0, 1) for b, t in x.items()}
            delta = delta.transpose(0, 1)
        dtype = delta.dtype
        d = module.embed_dim
        bias = module.in_proj_bias
        captured = self._from_captures(module, c, x, delta)
        if captured is not None:
            return captured
        if module._qkv_same_embed_dim and all(_same_tensor(x["q"], x[b]) for b in "kv"):
            # Self-attention: one input, so the packed in_proj is one linear layer whose
            # Δ is [Δq | Δk | Δv]: one projection, one backward, one block.
            xq = x["q"].to(dtype)
            b_in = None if bias is None else bias.detach().to(dtype)
            packed = F.linear(xq, module.in_proj_weight.detach().to(dtype), b_in)
            with torch.enable_grad():
                leaf = packed.detach().requires_grad_()
                o = _mha_attention(module, *leaf.chunk(3, dim=-1), a)
                go = delta @ module.out_proj.weight.detach().to(dtype)
                (g,) = torch.autograd.grad(o, [leaf], go)
            return {"qkv": _Segment(xq.unsqueeze(2), g.unsqueeze(2), c.offset),
                    "out": _Segment(o.detach().unsqueeze(2), delta.unsqueeze(2), c.offset)}
        proj = {}
        for i, (b, (name, rows)) in enumerate(self._params(module).items()):
            W = getattr(module, name).detach()
            W = (W if rows is None else W[rows]).to(dtype)
            bb = None if bias is None else bias.detach()[i * d:(i + 1) * d].to(dtype)
            proj[b] = F.linear(x[b].to(dtype), W, bb)
        with torch.enable_grad():
            leaves = [proj[b].detach().requires_grad_() for b in "qkv"]
            o = _mha_attention(module, *leaves, a)
            go = delta @ module.out_proj.weight.detach().to(dtype)
            grads = torch.autograd.grad(o, leaves, go)
        segs = {b: _Segment(x[b].to(dtype).unsqueeze(2), g.unsqueeze(2), c.offset)
                for b, g in zip("qkv", grads)}
        segs["out"] = _Segment(o.detach().unsqueeze(2), delta.unsqueeze(2), c.offset)
        return segs

    def _from_captures(self, module, c: LayerCall, x: dict, delta: torch.Tensor):
        """Blocks from the gradients recorded in backward (see :meth:`on_forward`)."""
        grads, o = c.captures.get("sdpa"), c.saved.get("sdpa_out")
        B, T, d = delta.shape
        h = module.num_heads
        if grads is None or o is None or any(g is None for g in grads):
            return None
        S = x["k"].shape[1]
        want = [(B, h, T, d // h), (B, h, S, d // h), (B, h, S, d // h)]
        if [tuple(g.shape) for g in grads] != want or tuple(o.shape) != want[0]:
            return None

        def batch_first(t):  # [B, h, L, d/h] -> [B, L, d], heads concatenated as in MHA
            return t.permute(0, 2, 1, 3).reshape(B, t.shape[2], d).to(delta.dtype)

        segs = {"out": _Segment(batch_first(o).unsqueeze(2), delta.unsqueeze(2), c.offset)}
        if module._qkv_same_embed_dim and all(_same_tensor(x["q"], x[b]) for b in "kv"):
            # Self-attention: the packed in_proj is one linear layer with Δ = [Δq | Δk | Δv];
            # each head-major gradient is copied once, straight into its slice.
            D = delta.new_empty(B, T, 3, h, d // h)
            for i, g in enumerate(grads):
                D[:, :, i].copy_(g.transpose(1, 2))
            segs["qkv"] = _Segment(x["q"].to(delta.dtype).unsqueeze(2), D.view(B, T, 1, 3 * d),
                                   c.offset)
        else:
            for b, g in zip("qkv", grads):
                segs[b] = _Segment(x[b].to(delta.dtype).unsqueeze(2), batch_first(g).unsqueeze(2),
                                   c.offset)
        return segs

    @staticmethod
    def _unpack(module, blk: dict[str, _Segment]) -> dict[str, _Segment]:
        if "qkv" not in blk:
            return blk
        s = blk["qkv"]
        return {**{b: _Segment(s.A, D, s.offset) for b, D in zip("qkv", s.D.chunk(3, dim=-1))},
                "out": blk["out"]}

    def _jobs(self, module, names, packed: bool = False):
        """(block, weight name or None, bias name or None) per block, in parameter order."""
        params = {"qkv": ("in_proj_weight", None)} if packed else self._params(module)
        bias = "in_proj_bias" if "in_proj_bias" in names else None
        jobs = [(b, w if w in names else None, bias) for b, (w, _) in params.items()]
        jobs.append(("out", "out_proj.weight" if "out_proj.weight" in names else None,
                     "out_proj.bias" if "out_proj.bias" in names else None))
        return jobs

    def _per_block(self, module, calls, names):
        blocks = self._blocks(module, calls)
        packed = all("qkv" in blk for blk in blocks)
        if not packed and any("qkv" in blk for blk in blocks):  # mixed calls: unpack
            blocks = [self._unpack(module, blk) for blk in blocks]
        for b, w, bname in self._jobs(module, names, packed):
            yield [blk[b] for blk in blocks], w, bname

    def per_example_grads(self, module, calls, batch_size, names):
        if not self._supported(module, calls):
            return self.fallback.per_example_grads(module, calls, batch_size, names)
        parts: dict[str, list] = {}
        for segs, w, bname in self._per_block(module, calls, names):
            if w is not None:
                g = _segments_weight_grads(segs, batch_size)[:, 0]
                parts.setdefault(w, []).append(g)
            if bname is not None:
                parts.setdefault(bname, []).append(_segments_bias_grads(segs, batch_size)[:, 0])
        return {n: torch.cat(p, 1) if len(p) > 1 else p[0] for n, p in parts.items()}

    def gram(self, module, calls, batch_size, names, dtype):
        if not self._supported(module, calls):
            return self.fallback.gram(module, calls, batch_size, names, dtype)
        K = None
        for segs, w, bname in self._per_block(module, calls, names):
            if w is not None:
                part = _segments_gram(segs, batch_size, dtype)
                K = part if K is None else K + part
            if bname is not None:
                bg = _segments_bias_grads(segs, batch_size).reshape(batch_size, -1).to(dtype)
                K = bg @ bg.T if K is None else K + bg @ bg.T
        return K

    def weighted_grads(self, module, calls, weights, names):
        if not self._supported(module, calls):
            return self.fallback.weighted_grads(module, calls, weights, names)
        parts: dict[str, list] = {}
        for segs, w, bname in self._per_block(module, calls, names):
            W, b = _segments_weighted(segs, weights, weight=w is not None,
                                      bias=bname is not None)
            if w is not None:
                parts.setdefault(w, []).append(W[0])
            if bname is not None:
                parts.setdefault(bname, []).append(b[0])
        return {n: torch.cat(p, 0) if len(p) > 1 else p[0] for n, p in parts.items()}

    def costs(self, module, calls, batch_size, names):
        if not self._supported(module, calls):
            return math.inf, 0.0
        d = module.embed_dim
        seq = 0 if not module.batch_first else 1
        ghost = materialise = 0.0
        for c in calls:
            a = dict(zip(_MHA_ARGS, c.args))
            a.update(c.kwargs)
            n = a["query"].shape[1 - seq]
            for b, d_in in (("query", d), ("key", module.kdim), ("value", module.vdim),
                            ("query", d)):
                T = a[b].shape[seq]
                ghost += batch_size * batch_size * T * T * (d_in + d)
                materialise += n * T * d_in * d
        materialise += batch_size * batch_size * sum(p.numel() for p in module.parameters())
        return float(ghost), float(materialise)


KERNELS: dict[type, LayerKernel] = {
    nn.Linear: LinearKernel(),
    nn.Conv1d: ConvKernel(),
    nn.Conv2d: ConvKernel(),
    nn.Conv3d: ConvKernel(),
    nn.Embedding: EmbeddingKernel(),
    nn.MultiheadAttention: MultiheadAttentionKernel(),
}


def _register_opacus_samplers() -> None:
    try:
        from opacus.grad_sample.grad_sample_module import GradSampleModule
    except ImportError:  # pragma: no cover - opacus is a dependency
        return
    for layer_type in (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                       nn.InstanceNorm3d, getattr(nn, "RMSNorm", None)):
        fn = GradSampleModule.GRAD_SAMPLERS.get(layer_type)
        if layer_type is not None and fn is not None:
            KERNELS[layer_type] = GradSamplerKernel(fn)


_register_opacus_samplers()
_FALLBACK = FunctionalKernel()


def register_kernel(*layer_types: type) -> Callable:
    """Register a kernel for custom layer types (decorator).

    The decorated object is either a :class:`LayerKernel` instance or subclass, or an
    Opacus-style grad sampler ``fn(layer, activations, backprops) -> {param: [B, ...]}``.

    Example:
        >>> import torch
        >>> class Scale(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.w
        >>> @register_kernel(Scale)
        ... def scale_grad_sample(layer, activations, backprops):
        ...     return {layer.w: activations[0] * backprops}
    """

    def decorate(obj):
        kernel = obj
        if isinstance(obj, type) and issubclass(obj, LayerKernel):
            kernel = obj()
        elif not isinstance(obj, LayerKernel):
            kernel = GradSamplerKernel(obj)
        for t in layer_types:
            KERNELS[t] = kernel
        return obj

    return decorate


def kernel_for(module: nn.Module) -> LayerKernel:
    """The registered kernel for ``module``'s exact type, else the torch.func fallback."""
    return KERNELS.get(type(module), _FALLBACK)
