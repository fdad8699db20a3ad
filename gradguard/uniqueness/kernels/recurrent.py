"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and Opacus's ``DPRNN``,
``DPLSTM``, ``DPGRU``): exact per-example gradients by replaying the layer on each
example's captured input and initial state, with the captured output gradients.

``torch.func.vmap`` has no batching rule for the fused RNN kernels, and an RNN's
weights enter every time step, so there is no ghost formula; the replay costs one
forward and backward of the layer per example. The batch dimension of every input and
output comes from the layer's own convention: input and ``output`` along ``batch_first``,
``h_0``/``c_0`` and ``h_n``/``c_n`` along dimension 1 (``[layers·directions, B, H]``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from .base import LayerKernel


def _refuse(module: nn.Module, cause: str, fix: str):
    raise ValueError(f"{type(module).__name__} layer: {cause}. {fix}")


class RecurrentKernel(LayerKernel):
    """Per-example replay of a recurrent layer (see the module doc)."""

    covers_submodules = True  # Opacus's DP RNNs keep their weights in RNNLinear children
    own_batch_dims = True

    def per_example_grads(self, module, calls, batch_size, names):
        params = dict(module.named_parameters())
        out: dict[str, torch.Tensor] = {n: params[n].new_zeros(batch_size, *params[n].shape)
                                        for n in names}
        for c in calls:
            x = c.args[0] if c.args else c.kwargs.get("input")
            hx = c.args[1] if len(c.args) > 1 else c.kwargs.get("hx")
            if not isinstance(x, torch.Tensor):
                _refuse(module, f"input of type {type(x).__name__} (a PackedSequence?)",
                        "gradguard replays recurrent layers on padded tensors: pass a padded "
                        "batch (and mask the loss) instead of a PackedSequence")
            if x.dim() != 3:
                _refuse(module, f"unbatched input of shape {tuple(x.shape)}",
                        "pass a batch [B, T, H] (batch_first=True) or [T, B, H]")
            bd = 0 if getattr(module, "batch_first", False) else 1
            outs = tree_flatten(c.out_template)[0]
            out_dims = [bd] + [1] * (len(outs) - 1)  # output, then h_n (and c_n)
            for i in range(x.shape[bd]):
                xi = x.narrow(bd, i, 1)
                hi = None if hx is None else tuple(h.narrow(1, i, 1) for h in (
                    hx if isinstance(hx, (tuple, list)) else (hx,)))
                if hi is not None and not isinstance(hx, (tuple, list)):
                    hi = hi[0]
                with torch.enable_grad():
                    p = {n: params[n].detach().requires_grad_(n in names) for n in params}
                    res = tree_flatten(functional_call(module, p, (xi,) if hi is None
                                                       else (xi, hi)))[0]
                    total = sum((o * bp.narrow(d, i, 1)).sum()
                                for o, bp, d in zip(res, c.backprops, out_dims)
                                if bp is not None)
                    if not isinstance(total, torch.Tensor):
                        continue
                    grads = torch.autograd.grad(total, [p[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        out[n][c.offset + i] += g
        return out

    def costs(self, module, calls, batch_size, names):
        return math.inf, 0.0
