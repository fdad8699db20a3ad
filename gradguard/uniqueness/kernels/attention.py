"""``nn.MultiheadAttention``: its projections as linear layers on sequences, with Δ read
from the fused attention's backward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .base import (
    LayerCall,
    LayerKernel,
    _Segment,
    _segments_bias_grads,
    _segments_gram,
    _segments_weight_grads,
    _segments_weighted,
)
from .functional import FunctionalKernel


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
    own_batch_dims = True

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
