"""GradGuard under ``torch.distributed``: DDP, FSDP2, Opacus's DPDDP, Lightning and HF on
several ranks.

Each rank captures the per-example gradients of its own local batch (DDP's all-reduce runs
on the summed gradient, not on the hooks' captures), so each rank can compute GNQ over its
local batch on its own. This module holds the few collective steps that make the ranks
agree; :class:`~gradguard.sources.DistributedGramSource` wraps a rank's Gram source with
them, so the engine's step is the same code with one process or many.

Two ways to compute GNQ (``GradGuard(distributed_gnq=...)``):

- ``"local"`` (default): GNQ_j over the rank's local batch. Adding examples to the batch
  adds positive semi-definite terms g_k g_kᵀ to S_{-j} = λI + Σ_{k≠j} g_k g_kᵀ, and
  GNQ_j = g_jᵀ S_{-j}⁻¹ g_j can only fall when S_{-j} grows (in the PSD order), so a
  local-batch GNQ is an upper bound of the global-batch GNQ: a conservative number.
  Costs as much as one process, plus gathering a few ``[B]`` vectors per step.
- ``"global"``: the exact global-batch GNQ. Every rank materialises its per-example
  gradients and all-gathers them, so each rank holds a ``[B_global, P]`` matrix
  (B_global × P × 4 bytes for float32, e.g. 256 examples × 10M parameters = 10 GB) and
  sends B_local × P numbers per step; the Gram costs B_global² × P. Affordable for small
  models or a few ranks only.

Consistency, whatever the mode: after GNQ is known, every rank all-gathers the dataset
indices, GNQ values, policy weights and effective GNQ of the whole global batch (in rank
order), so every rank applies the same ledger updates, calibrates a
:class:`~gradguard.policies.Quantile` threshold on the same pooled values, checks the same
budgets and counts the same drops and clips: every rank agrees on what is dropped. A
policy rewrites ``p.grad`` after DDP's own all-reduce (which happened during backward),
from the rank's own captures, so the rewritten gradients are averaged across ranks again
(all-reduce sum / world size: DDP's averaging). Under ``policy="monitor"`` gradients are
never touched, so the update is bit-for-bit what DDP alone does. Only the first rank of
the group writes TensorBoard logs and the run directory.

FSDP2 (``torch.distributed.fsdp.fully_shard``) works the same way. FSDP gathers each
layer's weights for its forward and backward, so a rank's hooks capture the whole inputs
and output gradients of its own examples, and its local Gram is exact as under DDP (both
GNQ modes; ``"global"`` gathers whole per-example gradients). Between steps parameters and
``.grad`` are DTensor shards, which decides what works:

- kernels that need only the captures and the parameters' shapes work on the shards as
  they are (nn.Linear, nn.Conv*, nn.Embedding, GPT-2's Conv1D and its tied LM head, the
  norm layers); kernels that re-run the layer with its parameter values (the torch.func
  fallback, e.g. Gemma's RMSNorm; MultiheadAttention; RNNs; custom grad samplers) get those
  parameters all-gathered whole while they run, on every rank in the same order: one
  all-gather per such parameter per step, and that layer's full weights in memory for
  the moment. Such a layer sharded by ``fully_shard`` itself is refused (re-running it
  would run FSDP's hooks): shard the block that contains it;
- ``clip``/``drop`` rebuild Σ_j w_j g_j / B whole from the rank's captures, average it
  over the ranks and keep the rank's shard (:func:`average_into_shards`): what FSDP's
  reduce-scatter gives for a backward over the weighted examples. That needs FSDP to
  average over the guard's group: a 1-D mesh of all its ranks (HSDP's 2-D meshes are
  refused for policies; ``monitor`` never touches gradients, so it does not depend on
  how FSDP reduces them);
- ``monitor`` leaves training bit for bit as FSDP alone;
- refused: FSDP1 (``FullyShardedDataParallel``: flat parameters give each original
  parameter a flattened shard), a model whose root is not sharded (its plain parameters'
  gradients are not averaged), the curvature probe (its double backward would run through
  FSDP's collectives) and ``save_every`` (the state file would hold one rank's shards).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GNQ_MODES",
    "DistributedSync",
    "all_gather_rows",
    "all_ranks_agree",
    "average_gradients",
    "average_into_shards",
    "average_tensors",
    "broadcast_from_first",
    "flatten_per_example",
    "fsdp_kind",
    "gram_from_rows",
    "is_ddp_module",
    "resolve_sync",
    "unwrap_ddp",
]

GNQ_MODES = ("local", "global")


def is_ddp_module(module: nn.Module) -> bool:
    """Whether ``module`` is a DDP wrapper (``torch``'s or Opacus's DPDDP)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return True
    try:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    except ImportError:  # pragma: no cover - opacus is a dependency
        return False
    return isinstance(module, DPDDP)


def fsdp_kind(module: nn.Module) -> str | None:
    """How FSDP shards ``module``: ``"fully_shard"`` (FSDP2, any submodule sharded),
    ``"FullyShardedDataParallel"`` (FSDP1, any wrapper inside), or ``None``.

    Example:
        >>> fsdp_kind(nn.Linear(2, 3)) is None
        True
    """
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = list(module.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        return "FullyShardedDataParallel"
    if any(isinstance(m, FSDPModule) for m in modules):
        return "fully_shard"
    return None


def unwrap_ddp(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``module`` itself when not wrapped).

    Hooks go on the wrapped module: DDP's forward calls it with the same batch, and its
    parameter names carry no ``module.`` prefix.
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _is_distributed_dp_optimizer(optimizer) -> bool:
    try:
        import opacus.optimizers as opacus_optimizers
    except ImportError:  # pragma: no cover
        return False
    # Opacus's distributed optimizers (flat, per-layer, ...) share this prefix.
    kinds = tuple(getattr(opacus_optimizers, name) for name in dir(opacus_optimizers)
                  if "Distributed" in name and isinstance(getattr(opacus_optimizers, name), type))
    return bool(kinds) and isinstance(optimizer, kinds)


def all_gather_rows(tensor: torch.Tensor, *, group=None,
                    sizes: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (padded for the collective, trimmed after).

    Args:
        tensor: ``[n_rank, *rest]``; ``rest`` and the dtype must match across ranks.
        group: the process group (default: the world).
        sizes: every rank's row count when already known (saves one collective and a
            host read).

    Returns:
        ``([Σ n_rank, *rest], sizes)``.
    """
    world = dist.get_world_size(group)
    if sizes is None:
        n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=group)
        sizes = [int(c) for c in torch.cat(counts).tolist()]
    elif len(sizes) != world:
        raise ValueError(f"sizes must have one entry per rank ({world}), got {len(sizes)}")
    largest = max(sizes) if sizes else 0
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), list(sizes)


def broadcast_from_first(tensor: torch.Tensor, *, group=None) -> torch.Tensor:
    """The first rank's ``tensor`` on every rank (same shape and dtype everywhere)."""
    out = tensor.contiguous().clone()
    dist.broadcast(out, group=group, group_src=0)
    return out


def all_ranks_agree(flag: bool, *, group=None, device: torch.device | str = "cpu") -> bool:
    """``True`` on every rank when ``flag`` is true on every rank (a logical AND)."""
    bad = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return int(bad) == 0


def average_tensors(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], *,
                    group=None) -> list[torch.Tensor | None]:
    """Every rank's ``tensors`` averaged across ranks (all-reduce sum / world size).

    One collective per dtype over a flat buffer. ``tensors[i]`` is shaped like ``like[i]``
    (whose global shape counts for a sharded DTensor); a rank's ``None`` takes part as
    zeros, and the result is ``None`` only where every rank had ``None``.
    """
    world = dist.get_world_size(group)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, t in enumerate(like):
        by_dtype[(t.dtype, t.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(like)
    for (dtype, device), items in by_dtype.items():
        flat = torch.cat([(tensors[i] if tensors[i] is not None else
                           torch.zeros(like[i].shape, dtype=dtype, device=device)).reshape(-1)
                          for i in items]
                         + [torch.tensor([float(tensors[i] is not None) for i in items],
                                         dtype=dtype, device=device)])
        dist.all_reduce(flat, group=group)
        n_values = flat.numel() - len(items)
        had = flat[n_values:].tolist()
        offset = 0
        for i, present in zip(items, had):
            n = like[i].numel()
            if present > 0:
                out[i] = (flat[offset: offset + n] / world).view(like[i].shape)
            offset += n
    return out


def average_gradients(params: Iterable[nn.Parameter], *, group=None) -> None:
    """Replace ``p.grad`` by its average across ranks (all-reduce sum / world size), as DDP does.

    A rank whose ``p.grad`` is ``None`` takes part with zeros; the parameter gets the
    averaged gradient when any rank had one and stays ``None`` when none had.
    """
    params = list(params)
    averaged = average_tensors([p.grad for p in params], params, group=group)
    for p, g in zip(params, averaged):
        if g is not None:
            p.grad = g


def average_into_shards(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None], *,
                        group=None) -> None:
    """Set each FSDP-sharded ``p.grad`` to this rank's shard of the ranks' average of
    ``grads`` (whole, unsharded gradients), as FSDP's reduce-scatter would.

    Where no rank has a gradient for ``p``, an existing ``p.grad`` is zeroed.
    """
    from torch.distributed.tensor import distribute_tensor

    for p, g in zip(params, average_tensors(grads, params, group=group)):
        if g is None:
            if p.grad is not None:
                p.grad.zero_()
            continue
        # Every rank holds the same average: each keeps its own shard, no communication.
        p.grad = distribute_tensor(g.to(p.dtype), p.device_mesh, p.placements,
                                   src_data_rank=None)


def flatten_per_example(grads: dict[nn.Parameter, torch.Tensor], params: Sequence[nn.Parameter],
                        batch: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack per-example gradients ``{p: [B, *p.shape]}`` as rows ``[B, P]``, in ``params`` order.

    A parameter missing from ``grads`` (it took no part in the step) gets zero columns,
    so every rank's rows have the same layout.

    Returns:
        ``(rows, spans)``: spans are each parameter's ``(start, stop)`` columns.
    """
    cols, spans, start = [], [], 0
    first = next(iter(grads.values()), None)
    for p in params:
        g = grads.get(p)
        if g is None:
            dtype = first.dtype if first is not None else p.dtype
            g = torch.zeros(batch, p.numel(), dtype=dtype, device=p.device)
        cols.append(g.reshape(batch, -1))
        spans.append((start, start + cols[-1].shape[1]))
        start += cols[-1].shape[1]
    if not cols:
        return torch.zeros(batch, 0, dtype=torch.float64), []
    dtype = cols[0].dtype
    for c in cols[1:]:
        dtype = torch.promote_types(dtype, c.dtype)
    return torch.cat([c.to(dtype) for c in cols], 1), spans


def gram_from_rows(rows: torch.Tensor, spans: Sequence[tuple[int, int]] | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """``Σ_spans R_s R_sᵀ``: each parameter's Gram in ``dtype``, summed in float64.

    The same precision as the engine's per-layer Grams (a float32 dot product over all P
    columns at once would lose more).
    """
    B = rows.shape[0]
    K = torch.zeros(B, B, dtype=torch.float64, device=rows.device)
    for start, stop in (spans if spans is not None else [(0, rows.shape[1])]):
        block = rows[:, start:stop].to(dtype)
        K += (block @ block.T).to(torch.float64)
    return K


class DistributedSync:
    """The collective steps of a distributed GradGuard step (built by :func:`resolve_sync`).

    Args:
        gnq_mode: ``"local"`` or ``"global"`` (see the module docstring).
        group: the process group (default: the world).
        device: device of the small tensors exchanged (the model's).

    Attributes:
        rank: this process's rank in ``group``.
        world_size: ranks in ``group``.
        is_main: whether this is the group's first rank (the one that logs).
    """

    def __init__(self, *, gnq_mode: str = "local", group=None,
                 device: torch.device | str = "cpu"):
        if gnq_mode not in GNQ_MODES:
            raise ValueError(f"distributed_gnq must be one of {GNQ_MODES}, got {gnq_mode!r}")
        self.gnq_mode = gnq_mode
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_main = self.rank == 0
        self._rows: torch.Tensor | None = None
        self._spans: list[tuple[int, int]] | None = None
        self._sizes: list[int] | None = None

    def __repr__(self) -> str:
        return (f"DistributedSync(gnq_mode={self.gnq_mode!r}, rank={self.rank}, "
                f"world_size={self.world_size})")

    def keep_rows(self, rows: torch.Tensor, spans: Sequence[tuple[int, int]] | None = None) -> None:
        """Hold this rank's materialised per-example gradient rows for :meth:`share_batch`.

        A no-op in ``"local"`` mode.
        """
        if self.gnq_mode == "global":
            self._rows, self._spans = rows, (list(spans) if spans is not None else None)

    def share_batch(self, K: torch.Tensor, indices: torch.Tensor, *,
                    gram_dtype: torch.dtype = torch.float32):
        """Gather the global batch's dataset indices (and, in ``"global"`` mode, its Gram).

        Args:
            K: this rank's ``[b, b]`` Gram.
            indices: this rank's ``[b]`` dataset indices.
            gram_dtype: dtype of the per-parameter Grams in ``"global"`` mode.

        Returns:
            ``(K, indices, own, rows)``: the Gram GNQ is computed from (local, or global in
            ``"global"`` mode), the ``[B_global]`` indices in rank order, the slice of the
            global batch that is this rank's, and the slice of the global batch ``K``
            covers.
        """
        indices, self._sizes = all_gather_rows(indices, group=self.group)
        start = sum(self._sizes[: self.rank])
        own = slice(start, start + self._sizes[self.rank])
        if self.gnq_mode == "local":
            return K, indices, own, own
        if self._rows is None:
            raise RuntimeError("distributed_gnq='global' needs this rank's per-example "
                               "gradient rows (keep_rows) before share_batch")
        rows, _ = all_gather_rows(self._rows, group=self.group, sizes=self._sizes)
        K_global = gram_from_rows(rows, self._spans, gram_dtype if rows.dtype != torch.float64
                                  else torch.float64)
        self._rows = self._spans = None
        return K_global, indices, own, slice(None)

    def share_rows(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-example values of the rows ``K`` covers, for the whole global batch, on every rank.

        ``"local"``: each rank's values are gathered. ``"global"``: every rank computed all
        of them from the same gathered Gram; the first rank's copy is broadcast so the ranks
        agree to the last bit whatever the device's reduction order.
        """
        if rows == slice(None):
            return broadcast_from_first(values, group=self.group)
        return all_gather_rows(values, group=self.group, sizes=self._sizes)[0]

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """All-reduce the rewritten gradients (see :func:`average_gradients`)."""
        average_gradients(params, group=self.group)

    def average_into_shards(self, params: Sequence[nn.Parameter],
                            grads: Sequence[torch.Tensor | None]) -> None:
        """Average whole gradients into FSDP shards (see :func:`average_into_shards`)."""
        average_into_shards(params, grads, group=self.group)

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank."""
        return all_ranks_agree(ok, group=self.group, device=self.device)


def resolve_sync(*, module: nn.Module, optimizer, enabled: bool | None, gnq_mode: str = "local",
                 group=None, device: torch.device | str = "cpu") -> DistributedSync | None:
    """The :class:`DistributedSync` a GradGuard needs, or ``None`` for one process.

    Args:
        module: the model handed to ``make_guarded``.
        optimizer: the optimizer handed to ``make_guarded``.
        enabled: ``True`` (the ranks train one model together, e.g. Lightning's or the HF
            Trainer's DDP), ``False`` (never synchronise), or ``None``: on when the
            default process group is initialised with more than one rank and the model
            is DDP-wrapped or sharded by ``fully_shard`` (or the optimizer is Opacus's
            distributed DPOptimizer).
        gnq_mode: ``"local"`` or ``"global"``.
        group: the process group (default: the world).
        device: device of the exchanged tensors.

    Raises:
        ValueError: ``enabled=True`` without an initialised process group, or a bad mode.
    """
    if gnq_mode not in GNQ_MODES:
        raise ValueError(f"distributed_gnq must be one of {GNQ_MODES}, got {gnq_mode!r}")
    if enabled is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if enabled and not ready:
        raise ValueError("distributed=True needs torch.distributed.init_process_group(...) to "
                         "run before make_guarded; pass distributed=None to detect it.")
    if not ready:
        return None
    sharded = fsdp_kind(module) is not None
    # (FSDP's gradients are DTensor shards even on one rank: only the collective steps
    # write them, so a one-rank group keeps them)
    if dist.get_world_size(group) < 2 and not sharded:
        return None
    if enabled is None and not (is_ddp_module(module) or sharded
                                or _is_distributed_dp_optimizer(optimizer)):
        return None
    return DistributedSync(gnq_mode=gnq_mode, group=group, device=device)
