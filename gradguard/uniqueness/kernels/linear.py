"""``nn.Linear`` (any leading dimensions): ghost Gram (AAᵀ)⊙(ΔΔᵀ), exact on sequences."""

from __future__ import annotations

import torch

from .base import (
    _AffineKernel,
    _per_example_weight_grad,
    _Segment,
    _segments_bias_grads,
    _segments_materialised_gram,
)


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
            d = c.batch_dims[0][0] if c.batch_dims and c.batch_dims[0] else 0
            x, delta = c.activation, c.backprop
            if d:  # traced batch dimension not first (time-first input): move it first
                x, delta = x.movedim(d, 0), delta.movedim(d, 0)
            A = _batch_first_3d(x, c.batch_size, type(module).__name__)
            D = delta.reshape(A.shape[0], A.shape[1], -1)
            segs.append(_Segment(A.unsqueeze(2), D.unsqueeze(2), c.offset))
        return segs

    def materialised_gram(self, module, calls, batch_size, names, dtype):
        # From the segments in their own [d_out, d_in] layout, a block of output features
        # at a time: a transposed weight (GPT-2's Conv1D) needs no copy.
        segs = self._segs(module, calls)
        K = torch.zeros(batch_size, batch_size, dtype=dtype, device=segs[0].A.device)
        if "weight" in names:
            K += _segments_materialised_gram(segs, batch_size, dtype)
        if "bias" in names:
            b = _segments_bias_grads(segs, batch_size).reshape(batch_size, -1).to(dtype)
            K.addmm_(b, b.T)
        return K

    def from_rows(self, module, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Per-example gradients ``[B, *param.shape]`` from the flat rows of
        :func:`condensed_rows` (weights in the ``[d_out, d_in]`` layout)."""
        if name == "weight":
            return rows.reshape(rows.shape[0], *self.weight_shape(module))
        return rows.reshape(rows.shape[0], -1)


def condensed_rows(seg: _Segment, names, *, sketch=None) -> dict[str, torch.Tensor]:
    """One call's per-example rows, ``{name: [b, n]}``: the weight gradients flattened in the
    ``[d_out, d_in]`` layout, or their sketch (``sketch(seg)``), and the bias gradients."""
    b = seg.A.shape[0]
    out = {}
    if "weight" in names:
        out["weight"] = (_per_example_weight_grad(seg).reshape(b, -1) if sketch is None
                         else sketch(seg))
    if "bias" in names:
        out["bias"] = seg.D.sum(1).reshape(b, -1)
    return out
