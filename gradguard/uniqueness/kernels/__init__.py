"""Per-layer kernels: per-example-gradient Grams and weighted gradient sums from A and Δ.

A kernel turns what the hooks captured for one layer during a step (its inputs A and
the gradients Δ of the loss w.r.t. its outputs, for every call of the layer) into

- ``gram``: the layer's contribution Σ_p G_p G_pᵀ to the B×B Gram of per-example
  gradients, from a "ghost" formula where one exists;
- ``per_example_grads``: the materialised per-example gradients [B, *p.shape];
- ``weighted_grads``: Σ_j w_j g_j, the gradient of a reweighted loss, without
  materialising anything where the layer is linear in its parameters;
- ``costs``: rough flop counts of the ghost and materialised routes, so the engine can
  take the cheaper one per layer and per step.

Kernels live in a registry keyed by module type, as Opacus keeps its grad samplers
(one module per layer family, as Opacus's ``grad_sample/``). Users add one for a
custom layer with :func:`register_kernel`. Opacus's samplers for normalisation layers
are borrowed lazily, on the first lookup, so importing gradguard does not import Opacus.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from .attention import MultiheadAttentionKernel
from .base import LayerCall, LayerKernel
from .conv import ConvKernel
from .embedding import EmbeddingBagKernel, EmbeddingKernel
from .functional import FunctionalKernel, GradSamplerKernel
from .linear import LinearKernel
from .recurrent import RecurrentKernel
from .transformers import (
    Conv1DKernel,
    llama_rms_norm_kernel,
    register_transformers_kernels,
    tied_embedding_head_costs,
    tied_embedding_head_gram,
)

__all__ = [
    "LayerCall",
    "LayerKernel",
    "LinearKernel",
    "Conv1DKernel",
    "tied_embedding_head_gram",
    "tied_embedding_head_costs",
    "ConvKernel",
    "EmbeddingKernel",
    "EmbeddingBagKernel",
    "RecurrentKernel",
    "MultiheadAttentionKernel",
    "FunctionalKernel",
    "GradSamplerKernel",
    "register_kernel",
    "is_sharded",
    "kernel_for",
    "layer_type",
    "KERNELS",
]

KERNELS: dict[type, LayerKernel] = {
    nn.Linear: LinearKernel(),
    nn.Conv1d: ConvKernel(),
    nn.Conv2d: ConvKernel(),
    nn.Conv3d: ConvKernel(),
    nn.Embedding: EmbeddingKernel(),
    nn.EmbeddingBag: EmbeddingBagKernel(),
    nn.MultiheadAttention: MultiheadAttentionKernel(),
    nn.RNN: RecurrentKernel(),
    nn.LSTM: RecurrentKernel(),
    nn.GRU: RecurrentKernel(),
}


_NORM_LAYERS = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
                                  nn.InstanceNorm2d, nn.InstanceNorm3d,
                                  getattr(nn, "RMSNorm", None)) if t is not None)
_opacus_borrowed = False


def _register_opacus_samplers() -> None:
    global _opacus_borrowed
    _opacus_borrowed = True
    try:
        from opacus.grad_sample.grad_sample_module import GradSampleModule
    except ImportError:  # pragma: no cover - opacus is a dependency
        return
    for layer_type in _NORM_LAYERS:
        fn = GradSampleModule.GRAD_SAMPLERS.get(layer_type)
        if fn is not None:
            # a user's kernel wins; Opacus's norm samplers read the inputs and Δ only
            KERNELS.setdefault(layer_type, GradSamplerKernel(fn, reads_parameters=False))
    try:  # Opacus's DP RNNs alias their RNNLinear children's weights: replay them whole
        from opacus.layers import DPGRU, DPLSTM, DPRNN
    except ImportError:  # pragma: no cover
        return
    for layer_type in (DPRNN, DPLSTM, DPGRU):
        KERNELS.setdefault(layer_type, RecurrentKernel())


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


def layer_type(module: nn.Module) -> type:
    """``module``'s own layer class: the class ``fully_shard`` replaced, for a module it
    sharded (FSDP2 swaps the class for a subclass ``FSDP<Layer>(FSDPModule, Layer)``).

    Example:
        >>> layer_type(nn.Linear(2, 3)) is nn.Linear
        True
    """
    t = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if fsdp_module is not None and issubclass(t, fsdp_module):
        return next(b for b in t.__mro__[1:] if not issubclass(b, fsdp_module))
    return t


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2-sharded parameter between steps).

    Example:
        >>> is_sharded(nn.Linear(2, 3).weight)
        False
    """
    dt = sys.modules.get("torch.distributed.tensor")
    kind = getattr(dt, "DTensor", None) if dt is not None else None
    return kind is not None and isinstance(tensor, kind)


def kernel_for(module: nn.Module) -> LayerKernel:
    """The registered kernel for ``module``'s exact layer type (seen through FSDP's class
    swap, :func:`layer_type`), else the torch.func fallback."""
    kind = layer_type(module)
    if not _opacus_borrowed and (issubclass(kind, _NORM_LAYERS)
                                 or kind.__module__.startswith("opacus.")):
        _register_opacus_samplers()
    register_transformers_kernels(KERNELS)  # only once transformers is imported
    kernel = KERNELS.get(kind)
    if kernel is None:
        kernel = llama_rms_norm_kernel(kind)
        if kernel is not None:
            KERNELS[kind] = kernel
    return kernel if kernel is not None else _FALLBACK
