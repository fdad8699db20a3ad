"""Kernels for transformer language models: GPT-2's ``Conv1D`` and a weight tied between an
embedding and an output projection.

``transformers.pytorch_utils.Conv1D`` is a transposed ``nn.Linear`` (y = x W + b with W of
shape ``[d_in, d_out]``): the same ghost Gram Σ_{t,s}(a_it·a_js)(δ_it·δ_js), its weight
gradients transposed. It is registered lazily, the first time a kernel is looked up while
``transformers`` is already imported, so ``import gradguard`` never imports transformers.

A weight shared by an ``nn.Embedding`` (rows picked by token id) and an ``nn.Linear``
output projection (``lm_head.weight is wte.weight``) receives the sum of both uses'
gradients, g_j = E_j + H_j. Its Gram, K = C_EE + C_HH + X + Xᵀ, takes each use's ghost
Gram and the cross term X_ij = ⟨E_i, H_j⟩ = Σ_{t,s} δᴴ_js[id_it] (δᴱ_it · a_js), the head's
output gradients gathered at example i's token ids: no V × d matrix per example.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from .base import _CHUNK_ELEMENTS, LayerCall, LayerKernel, _Segment
from .embedding import EmbeddingKernel
from .functional import GradSamplerKernel
from .linear import LinearKernel

__all__ = ["Conv1DKernel", "register_transformers_kernels", "tied_embedding_head_gram",
           "tied_embedding_head_costs", "llama_rms_norm_kernel"]


class Conv1DKernel(LinearKernel):
    """``transformers.pytorch_utils.Conv1D``: a Linear whose weight is stored ``[d_in, d_out]``.

    Example:
        >>> import torch
        >>> from transformers.pytorch_utils import Conv1D
        >>> from gradguard.uniqueness.hooks import GramHooks
        >>> layer = Conv1D(3, 4)  # nf=3 outputs, nx=4 inputs
        >>> hooks = GramHooks(layer, loss_reduction="sum", strategy="ghost")
        >>> layer(torch.randn(5, 7, 4)).square().sum().backward()
        >>> hooks.layer_routes(), hooks.gram().shape
        ({'Conv1D': 'ghost'}, torch.Size([5, 5]))
        >>> hooks.remove()
    """

    def weight_shape(self, module):
        return module.weight.shape[::-1]  # the [d_out, d_in] layout of the shared algebra

    def per_example_grads(self, module, calls, batch_size, names):
        out = super().per_example_grads(module, calls, batch_size, names)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)
        return out

    def weighted_grads(self, module, calls, weights, names):
        out = super().weighted_grads(module, calls, weights, names)
        if "weight" in out:
            out["weight"] = out["weight"].T
        return out

    def from_rows(self, module, name, rows):
        out = super().from_rows(module, name, rows)
        return out.transpose(1, 2) if name == "weight" else out



def _llama_rms_norm_grad_sample(layer: nn.Module, activations: list,
                                backprops: torch.Tensor) -> dict:
    """Per-example gradient of a Llama-style RMSNorm's weight: Σ over positions of δ ∘ x̂,
    with x̂ normalised in float32 and cast back to the input's dtype, as the layer does."""
    x = activations[0]
    xf = x.to(torch.float32)
    xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(
        x.dtype)
    g = backprops * xhat
    return {layer.weight: g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)}


def llama_rms_norm_kernel(layer_type: type) -> LayerKernel | None:
    """A kernel for a ``transformers`` RMSNorm whose ``forward`` is Llama's, compiled to the
    same bytecode (Mistral, Qwen2/3, Phi-3, Mixtral, ... copy it), else ``None`` (Gemma's
    ``1 + weight`` and other variants keep the torch.func fallback).

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> llama_rms_norm_kernel(LlamaRMSNorm) is not None, llama_rms_norm_kernel(nn.Linear)
        (True, None)
    """
    if not layer_type.__module__.startswith("transformers.") or \
            not layer_type.__name__.endswith("RMSNorm") or "transformers" not in sys.modules:
        return None
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def signature(code):
        return code.co_code, code.co_names, code.co_consts, code.co_varnames

    forward = getattr(layer_type, "forward", None)
    if forward is None or signature(forward.__code__) != signature(LlamaRMSNorm.forward.__code__):
        return None
    return GradSamplerKernel(_llama_rms_norm_grad_sample, reads_parameters=False)


_registered = False


def register_transformers_kernels(kernels: dict) -> None:
    """Add the kernels for ``transformers`` layers to ``kernels`` if transformers is imported
    (a model containing its layers was built); user-registered kernels win."""
    global _registered
    if _registered or "transformers.pytorch_utils" not in sys.modules:
        return
    _registered = True
    kernels.setdefault(sys.modules["transformers.pytorch_utils"].Conv1D, Conv1DKernel())


# --------------------------------------------------------------------------- tied weights
def _tied_pair(uses: Sequence[tuple[nn.Module, LayerKernel, list[LayerCall]]]):
    """(embedding use, head use) when the uses are exactly one ``nn.Embedding`` and one
    ``nn.Linear`` without bias on its tied weight (the LM-head layout); else ``None``."""
    if len(uses) != 2:
        return None
    emb = [u for u in uses if isinstance(u[1], EmbeddingKernel)]
    head = [u for u in uses if type(u[1]) is LinearKernel]
    if len(emb) != 1 or len(head) != 1:
        return None
    return emb[0], head[0]


def tied_embedding_head_costs(uses, batch_size: int) -> tuple[float, float]:
    """(ghost, materialise) flop estimates for a tied embedding/head weight; ``inf`` ghost
    cost when the uses are not an embedding and a bias-free linear head."""
    pair = _tied_pair(uses)
    materialise = 0.0
    for module, kernel, calls in uses:
        materialise += kernel.costs(module, calls, batch_size, ["weight"])[1]
    if pair is None:
        return math.inf, materialise
    (emb, ek, ec), (head, hk, hc) = pair
    ghost = ek.costs(emb, ec, batch_size, ["weight"])[0] + hk.costs(head, hc, batch_size,
                                                                    ["weight"])[0]
    T_e = sum(c.activation.reshape(c.batch_size, -1).shape[1] for c in ec)
    T_h = sum(s.A.shape[1] for s in hk._segs(head, hc))
    ghost += 2.0 * batch_size * batch_size * T_e * T_h * emb.embedding_dim  # cross term
    return float(ghost), float(materialise)


def tied_embedding_head_gram(uses, batch_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Ghost Gram of a weight tied between an ``nn.Embedding`` and a bias-free ``nn.Linear``.

    Args:
        uses: ``(module, kernel, calls)`` for each module that uses the weight.
        batch_size: examples in the logical batch.
        dtype: dtype of the result.

    Returns:
        ``[B, B]`` Gram of the per-example gradients of the shared weight (both uses
        summed), or ``None`` when the uses are not that pair.
    """
    pair = _tied_pair(uses)
    if pair is None:
        return None
    (emb, ek, ec), (head, hk, hc) = pair
    K = ek.gram(emb, ec, batch_size, ["weight"], dtype)
    K = K + hk.gram(head, hc, batch_size, ["weight"], dtype)
    X = torch.zeros_like(K)
    for ids, De, o1 in ek._segments(emb, ec):
        for s in hk._segs(head, hc):
            block = _cross_block(ids, De, s).to(dtype)
            X[o1:o1 + ids.shape[0], s.offset:s.offset + s.A.shape[0]] += block
    return K + X + X.T


def _cross_block(ids: torch.Tensor, De: torch.Tensor, s: _Segment) -> torch.Tensor:
    """X_ij = Σ_{t,s} δᴴ_js[id_it] (δᴱ_it · a_js) for one embedding call and one head call.

    ``ids`` [B1, T1] token ids, ``De`` [B1, T1, E] the embedding's output gradients;
    ``s`` the head's segment (A [B2, T2, 1, E], D [B2, T2, 1, V]).
    """
    A, Dh = s.A[:, :, 0], s.D[:, :, 0]
    B1, T1 = ids.shape
    B2, T2 = A.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B2 * T2 * T1))
    rows = []
    for start in range(0, B1, chunk):
        idc, Dc = ids[start:start + chunk], De[start:start + chunk]
        gathered = Dh[:, :, idc.reshape(-1)].reshape(B2, T2, *idc.shape)  # [j, s, i, t]
        dots = torch.einsum("ite,jse->jsit", Dc.to(A.dtype), A)
        rows.append((gathered * dots).sum((1, 3)).T)
    return torch.cat(rows)
