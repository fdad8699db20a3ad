"""Materialised per-example gradients: Opacus-style grad samplers and the torch.func
fallback for any other layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .base import LayerCall, LayerKernel


class GradSamplerKernel(LayerKernel):
    """Materialises through an Opacus-style grad sampler ``fn(layer, activations, backprops)``.

    ``fn`` returns ``{parameter: per-example gradient [B, *p.shape]}`` for one call, with
    ``activations`` the list of the call's positional tensor inputs: the signature of
    Opacus's ``register_grad_sampler`` functions, so existing ones can be reused.
    """

    def __init__(self, fn: Callable[[nn.Module, list, torch.Tensor], dict], *,
                 reads_parameters: bool = True):
        self.fn = fn
        # (a sampler of unknown code may read the parameters' values: assume it does)
        self.reads_parameters = reads_parameters

    def per_example_grads(self, module, calls, batch_size, names):
        by_param = {id(getattr(module, n)): n for n in names}
        out: dict[str, torch.Tensor] = {}
        for c in calls:
            acts = [a for a in c.args if isinstance(a, torch.Tensor)]
            backprop = c.backprop
            d = c.batch_dims[0][0] if c.batch_dims and c.batch_dims[0] else 0
            if d:  # a layer on trailing dimensions (LayerNorm) fed time-first: batch first
                acts, backprop = [acts[0].movedim(d, 0), *acts[1:]], backprop.movedim(d, 0)
            result = self.fn(module, acts, backprop)
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
    vectorised with ``vmap``. Which inputs are batched, and along which dimension, comes
    from the hooks' trace of the model's inputs (:mod:`gradguard.uniqueness.provenance`);
    for a call outside a traced forward, tensors whose leading dimension equals the call's
    batch size are taken as batched.
    """

    def __init__(self, *, covers_submodules: bool = False,
                 batch_dims: Callable[[nn.Module, LayerCall], tuple] | None = None):
        self.covers_submodules = covers_submodules
        self._batch_dims = batch_dims

    def _dims(self, module: nn.Module, call: LayerCall):
        if self._batch_dims is not None:
            return self._batch_dims(module, call)
        if call.batch_dims is not None:  # traced from the model's inputs
            return call.batch_dims

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
