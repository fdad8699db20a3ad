"""``nn.Conv1d/2d/3d``: the linear kernel on unfolded patches, per group."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .base import _AffineKernel, _nonzero_rows, _Segment


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
