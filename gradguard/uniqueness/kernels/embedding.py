"""``nn.Embedding``: token equality times output-gradient products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import _CHUNK_ELEMENTS, LayerCall, LayerKernel, _nonzero_rows


def _scatter_per_example(weight: torch.Tensor, batch_size: int, entries,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example gradients ``[B, V, E]`` of an embedding table from (example, token id,
    output gradient) entries: one scatter per call into row (example, id) of a [B·V, E] view
    (of ``out`` when given, added in place: a tied LM head's gradients, without a second
    B × V × E buffer)."""
    V = weight.shape[0]
    # A plain tensor even when the table is an FSDP-sharded DTensor: the captured output
    # gradients are whole on each rank, and so is each example's gradient.
    G = torch.zeros(batch_size, *weight.shape, dtype=weight.dtype, device=weight.device) \
        if out is None else out
    flat = G.view(batch_size * V, -1)
    for ex, ids, D in entries:
        flat.index_add_(0, ex * V + ids, D.to(G.dtype))
    return G

class EmbeddingKernel(LayerKernel):
    """``nn.Embedding``: K_ij = Σ_{t,s} [id_it = id_js] (δ_it·δ_js).

    Positions holding ``padding_idx`` contribute nothing, as in the layer's backward.
    """

    reads_parameters = False  # token ids and Δ; the table's shape only

    def _segments(self, module, calls):
        if module.scale_grad_by_freq:
            raise ValueError(
                "Embedding(scale_grad_by_freq=True) scales gradients by token counts over the "
                "whole batch, which mixes examples: per-example gradients are undefined. "
                "Set scale_grad_by_freq=False to guard this model."
            )
        segs = []
        for c in calls:
            ids, D = c.activation, c.backprop
            d = c.batch_dims[0][0] if c.batch_dims and c.batch_dims[0] else 0
            if d:  # traced batch dimension not first (sequence-first ids): move it first
                ids, D = ids.movedim(d, 0), D.movedim(d, 0)
            ids = ids.reshape(c.batch_size, -1)
            D = D.reshape(c.batch_size, ids.shape[1], -1)
            if module.padding_idx is not None:
                D = D * (ids != module.padding_idx).unsqueeze(-1).to(D.dtype)
            segs.append((ids, D, c.offset))
        return segs

    def per_example_grads(self, module, calls, batch_size, names):
        if "weight" not in names:
            return {}
        return {"weight": self.add_per_example_grads(module, calls, batch_size)}

    def add_per_example_grads(self, module: nn.Module, calls: Sequence[LayerCall],
                              batch_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The per-example weight gradients ``[B, V, E]``, added in place to ``out`` if given
        (a contiguous ``[B, V, E]`` tensor: the other use of a tied weight)."""
        entries = []
        for ids, D, off in self._segments(module, calls):
            ex = torch.arange(off, off + ids.shape[0], device=ids.device)[:, None].expand_as(ids)
            entries.append((ex.reshape(-1), ids.reshape(-1), D.reshape(-1, D.shape[-1])))
        return _scatter_per_example(module.weight, batch_size, entries, out)

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
        g = torch.zeros(module.weight.shape, dtype=module.weight.dtype,
                        device=module.weight.device)  # plain, as in _scatter_per_example
        for ids, D, off in self._segments(module, calls):
            w = weights[off:off + ids.shape[0]].to(D.dtype)
            rows = _nonzero_rows(w)
            if rows is not None:
                ids, D, w = ids[rows], D[rows], w[rows]
            g.index_add_(0, ids.reshape(-1),
                         (D * w[:, None, None]).reshape(-1, D.shape[-1]).to(g.dtype))
        return {"weight": g}

    def costs(self, module, calls, batch_size, names):
        T = sum(c.activation.numel() // c.batch_size for c in calls)
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


class EmbeddingBagKernel(LayerKernel):
    """``nn.EmbeddingBag`` in ``"sum"`` or ``"mean"`` mode, 2-D input or 1-D input with
    ``offsets``: each bag is one example (its batch size is the number of bags).

    Example b's gradient puts w_n·δ_b (÷ the bag's size for ``"mean"``) on row ``ids[n]``
    for every entry n of its bag: the embedding Gram over (bag, id) rows, grouped by id
    as for ``nn.Embedding``. Entries equal to ``padding_idx`` contribute nothing.
    """

    reads_parameters = False  # token ids and Δ; the table's shape only

    def call_batch_size(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return x.shape[0]
        if isinstance(offsets, torch.Tensor):
            return offsets.shape[0] - (1 if module.include_last_offset else 0)
        return None

    def _entries(self, module, c):
        """(example of every entry, its id, its output-gradient row [N, E])."""
        if module.mode == "max":
            raise ValueError(
                "EmbeddingBag(mode='max') sends each bag's gradient to the rows that won the "
                "max, which gradguard does not attribute; use mode='sum' or 'mean'."
            )
        x = c.args[0] if c.args else c.kwargs["input"]
        args = dict(zip(("input", "offsets", "per_sample_weights"), c.args))
        args.update(c.kwargs)
        weights = args.get("per_sample_weights")
        B = c.batch_size
        if x.dim() == 2:
            bag = torch.arange(B, device=x.device)[:, None].expand_as(x).reshape(-1)
            ids = x.reshape(-1)
        else:
            offsets = args["offsets"][:B]
            ids = x
            bag = torch.bucketize(torch.arange(x.shape[0], device=x.device), offsets,
                                  right=True) - 1
        keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None \
            else ids != module.padding_idx
        D = c.backprop.reshape(B, -1)[bag]
        scale = keep.to(D.dtype)
        if weights is not None:
            scale = scale * weights.reshape(-1).to(D.dtype)
        if module.mode == "mean":
            counts = torch.zeros(B, dtype=D.dtype, device=D.device).index_add_(
                0, bag, keep.to(D.dtype))
            scale = scale / counts.clamp_min(1)[bag]
        return bag + c.offset, ids, D * scale[:, None]

    def per_example_grads(self, module, calls, batch_size, names):
        if "weight" not in names:
            return {}
        entries = [self._entries(module, c) for c in calls]
        return {"weight": _scatter_per_example(module.weight, batch_size, entries)}

    def gram(self, module, calls, batch_size, names, dtype):
        if "weight" not in names or module.weight.device.type != "cpu":
            return super().gram(module, calls, batch_size, names, dtype)
        parts = [self._entries(module, c) for c in calls]
        ex, ids, D = (torch.cat(t) for t in zip(*parts))
        return _embedding_gram_grouped(ex, ids, D, batch_size, dtype)

    def costs(self, module, calls, batch_size, names):
        if module.weight.device.type != "cpu":
            return math.inf, 0.0
        return 0.0, float(batch_size * module.weight.numel())
