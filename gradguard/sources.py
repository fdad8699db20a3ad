"""Gram sources: where a step's per-example gradients come from, and where weights go.

A Gram source is the *measure* and *apply* ends of a guarded step. It gives the B×B Gram
of the step's per-example gradients and rewrites the update as Σ_j w_j g_j / denom.
Two exist, picked once by :func:`gram_source_for` (as Opacus picks its optimizer class):

- :class:`HookGramSource`: gradguard's own :class:`~gradguard.uniqueness.hooks.GramHooks`
  (ghost kernels or materialised per-example gradients per layer);
- :class:`OpacusGramSource`: Opacus's ``grad_sample`` when the optimizer is a
  ``DPOptimizer`` (what DP-SGD clips is what is measured).

Under ``torch.distributed``, :class:`DistributedGramSource` wraps either one: the same
interface, with the ranks' batches shared and their decisions agreed. A source also says
how its batch is seen by the whole run (:meth:`GramSource.share_batch`,
:meth:`~GramSource.share_rows`, :meth:`~GramSource.agree`); in one process these are
identities, so the engine's step is the same code with or without ranks.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .distributed import DistributedSync, flatten_per_example, gram_from_rows
from .uniqueness.hooks import GramHooks
from .uniqueness.kernels import is_sharded

__all__ = ["DistributedGramSource", "GramSource", "HookGramSource", "OpacusGramSource",
           "SharedBatch", "gram_source_for", "is_dp_optimizer"]


def is_dp_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is Opacus's ``DPOptimizer`` (without importing Opacus: if it
    is not imported, no optimizer can be one)."""
    module = sys.modules.get("opacus.optimizers")
    dp = getattr(module, "DPOptimizer", None) if module is not None else None
    return dp is not None and isinstance(optimizer, dp)


@dataclass(frozen=True)
class SharedBatch:
    """A step's batch as every rank sees it (in one process: the step's own batch).

    Attributes:
        K: the Gram GNQ is computed from (this rank's, or the global batch's).
        indices: ``[B_global]`` dataset indices, in rank order.
        own: this rank's examples in the global batch.
        rows: the examples ``K`` covers (hence the policy's decisions).
    """

    K: torch.Tensor
    indices: torch.Tensor
    own: slice
    rows: slice


class GramSource(Protocol):
    """What the engine needs from a measurement backend."""

    name: str
    #: Whether other ranks share this step (then :meth:`share_batch` and friends talk).
    distributed: bool
    #: Whether this process writes logs and run directories (the first rank).
    is_main: bool

    def gram(self) -> torch.Tensor:
        """``[B, B]`` float64 Gram of this step's per-example gradients."""

    def rows(self) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """The per-example gradients themselves ``[B, P]`` (and per-parameter column spans),
        for an exact Gram over several ranks."""

    def micro_step(self) -> None:
        """A virtual step (the logical batch continues): keep what the next step needs."""

    def apply(self, weights: torch.Tensor, *, denom: float) -> None:
        """Make the update Σ_j w_j g_j / denom (``weights`` over the step's examples)."""

    def guarded_params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient this source can attribute to examples."""

    def clear(self) -> None:
        """Forget the step's captures."""

    def paused(self) -> contextlib.AbstractContextManager:
        """Capture nothing inside this block."""

    def remove(self) -> None:
        """Detach from the model."""

    def share_batch(self, K: torch.Tensor, indices: torch.Tensor) -> SharedBatch:
        """This step's Gram and dataset indices, as the whole run sees them."""

    def share_rows(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-example ``values`` of ``rows`` of the global batch, for all of it."""

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (every rank then skips or raises together)."""


class _OneProcess:
    """The run-wide view of a step in a single process: the step's batch is the batch."""

    distributed = False
    is_main = True

    def share_batch(self, K: torch.Tensor, indices: torch.Tensor) -> SharedBatch:
        return SharedBatch(K, indices, own=slice(None), rows=slice(None))

    def share_rows(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        return values

    def agree(self, ok: bool) -> bool:
        return ok


def _owns_layout(g: torch.Tensor, p: torch.Tensor) -> bool:
    """``g`` can become ``p.grad`` as is: p's strides, and a storage of its own."""
    return (g.stride() == p.stride() and g.storage_offset() == 0
            and g.untyped_storage().nbytes() == g.numel() * g.element_size())


class HookGramSource(_OneProcess):
    """Per-example gradients captured by :class:`GramHooks` on the model's layers.

    Args:
        module: the model (DDP-unwrapped).
        **hook_kwargs: ``loss_reduction``, ``batch_first``, ``strategy``, ``gram_dtype``,
            ``params`` of :class:`GramHooks`.
    """

    name = "hooks"

    def __init__(self, module: nn.Module, **hook_kwargs):
        self.hooks = GramHooks(module, **hook_kwargs)

    def guarded_params(self) -> list[nn.Parameter]:
        return self.hooks.guarded_parameters()

    @property
    def gram_dtype(self) -> torch.dtype:
        return self.hooks.gram_dtype

    @property
    def batch_size(self) -> int:
        return self.hooks.batch_size

    def gram(self) -> torch.Tensor:
        return self.hooks.gram()

    def rows(self):
        return flatten_per_example(self.hooks.per_example_grads(), self.guarded_params(),
                                   self.hooks.batch_size)

    def micro_step(self) -> None:
        pass  # the hooks keep every micro-batch's captures until clear()

    def backward_scale(self) -> int | None:
        """s with ``s · .grad == Σ_j g_j`` (see :meth:`GramHooks.backward_scale`)."""
        return self.hooks.backward_scale()

    def grads_modified(self) -> bool:
        return self.hooks.grads_modified()

    def apply(self, weights: torch.Tensor, *, denom: float) -> None:
        """Rebuild every guarded ``.grad`` as Σ_j w_j g_j / denom from the captures.

        A rebuild, never a correction of ``.grad``: an example with weight 0 contributes
        an exact 0, so it has no influence at all (a correction ``.grad − Σ_dropped g_j``
        leaves a rounding residue that Adam normalises into a full-size step). Loss terms
        no guarded layer sees (a penalty on the parameters in the loss) are therefore not
        part of a rebuilt update.
        """
        for p, g in self.rebuilt(weights, denom=denom).items():
            if is_sharded(p):  # (DistributedGramSource writes FSDP's shards)
                raise RuntimeError(
                    "rebuilding the gradients of an FSDP-sharded model needs the ranks to "
                    "average them: pass distributed=None (or True) to GradGuard, not False.")
            if g is None:
                if p.grad is not None:
                    p.grad.zero_()
                continue
            # In the parameter's own layout (einsum results may be transposed): what
            # autograd would have produced, so later accumulation keeps its fast path.
            p.grad = g if _owns_layout(g, p) else torch.empty_like(p).copy_(g)

    def rebuilt(self, weights: torch.Tensor, *, denom: float
                ) -> dict[nn.Parameter, torch.Tensor | None]:
        """Σ_j w_j g_j / denom per guarded parameter, whole (also for an FSDP shard);
        ``None`` where no captured example reached the parameter."""
        new = self.hooks.weighted_grads(weights / denom)  # (also with no example: see there)
        return {p: new.get(p) for p in self.guarded_params()}

    def clear(self) -> None:
        self.hooks.clear()

    def paused(self):
        return self.hooks.paused()

    def remove(self) -> None:
        self.hooks.remove()


class OpacusGramSource(_OneProcess):
    """What Opacus's ``DPOptimizer`` releases, from its per-example gradients.

    :meth:`gram` is the Gram of the released rows (clipped as Opacus clips them; the
    noise enters as ridge, :meth:`noise_ridge`), :attr:`raw_gram` that of the unclipped
    ones. Weights scale ``grad_sample`` before Opacus clips, noises and averages it. The
    math is :class:`gradguard.dp.OpacusRelease`'s.
    """

    name = "opacus"
    gram_dtype = torch.float64

    def __init__(self, dp_optimizer, *, policy_acts: bool, module: nn.Module | None = None):
        from .dp import OpacusRelease

        self.optimizer = dp_optimizer
        self.policy_acts = policy_acts
        self.release = OpacusRelease(dp_optimizer, module=module)
        self._stash: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None
        self.raw_gram: torch.Tensor | None = None

    def guarded_params(self) -> list[nn.Parameter]:
        return list(self.optimizer.params)

    def rows(self):
        """The logical batch's raw per-example gradients ``[B, P]`` (no spans)."""
        if self._rows is None:
            self._rows = torch.cat([*self._stash, self.release.rows()])
            self._stash.clear()
        return self._rows, None

    def released_rows(self) -> torch.Tensor:
        """The rows Opacus releases (clipped), ``[B, P]``."""
        return self.release.released_rows(self.rows()[0])

    def gram(self) -> torch.Tensor:
        self.raw_gram, released = self.release.measure(self.rows()[0])
        return released

    def noise_ridge(self) -> float:
        """(σ·C)²: what the Gaussian noise adds to λ, in the sum-of-losses scale."""
        return self.release.noise_ridge()

    def effective_gnq(self, weights: torch.Tensor, ridge) -> torch.Tensor:
        """GNQ of the update released with ``weights`` (re-clipped by Opacus)."""
        return self.release.effective_gnq(weights, ridge)

    def micro_step(self) -> None:
        if self.policy_acts:
            raise NotImplementedError(
                "policy weights must be applied before DP clipping, but with Opacus's "
                "BatchMemoryManager the logical batch's GNQ is known only after its last "
                "micro-batch, when earlier ones are already clipped. Use policy='monitor' "
                "with BatchMemoryManager, or physical batch = logical batch.")
        self._stash.append(self.release.rows())

    def apply(self, weights: torch.Tensor, *, denom: float) -> None:
        self.release.apply_weights(weights)  # released rows: w_j·(clipped g_j)

    def clear(self) -> None:
        self._stash.clear()
        self._rows = None

    def paused(self):
        return contextlib.nullcontext()

    def remove(self) -> None:
        self.clear()


class DistributedGramSource:
    """A Gram source shared by the ranks of a ``torch.distributed`` group.

    Wraps the rank's own source (what it captures is its local batch) and adds the
    collective steps of :class:`~gradguard.distributed.DistributedSync`: the global batch
    (exact global-batch Gram in ``"global"`` mode), per-example values for all of it,
    agreement on skips, and DDP's averaging of a rewritten update. Everything else is the
    wrapped source's.

    Args:
        inner: this rank's :class:`HookGramSource` or :class:`OpacusGramSource`.
        sync: the group's collective steps (:func:`~gradguard.distributed.resolve_sync`).
    """

    distributed = True

    def __init__(self, inner: HookGramSource | OpacusGramSource, sync: DistributedSync):
        self.inner = inner
        self.sync = sync
        self.is_main = sync.is_main
        if sync.gnq_mode == "global" and isinstance(inner, HookGramSource):
            inner.hooks.gram_only = False  # global GNQ gathers the per-example rows

    def __getattr__(self, name: str):
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"DistributedGramSource({type(self.inner).__name__}, {self.sync!r})"

    def gram(self) -> torch.Tensor:
        if self.sync.gnq_mode == "global":
            # Exact global-batch GNQ needs the rows themselves, not just this rank's Gram.
            rows, spans = self.inner.rows()
            self.sync.keep_rows(rows, spans)
            return gram_from_rows(rows, spans, self.inner.gram_dtype) if spans is not None \
                else rows @ rows.T
        return self.inner.gram()

    def share_batch(self, K: torch.Tensor, indices: torch.Tensor) -> SharedBatch:
        return SharedBatch(*self.sync.share_batch(K, indices, gram_dtype=self.inner.gram_dtype))

    def share_rows(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.sync.share_rows(values, rows)

    def agree(self, ok: bool) -> bool:
        return self.sync.agree(ok)

    def apply(self, weights: torch.Tensor, *, denom: float) -> None:
        if isinstance(self.inner, OpacusGramSource):
            # (Opacus's distributed optimizer averages what it releases in its own step)
            self.inner.apply(weights, denom=denom)
            return
        params = self.inner.guarded_params()
        if any(is_sharded(p) for p in params):
            # FSDP (fully_shard): the captures give whole gradients of this rank's examples;
            # their average over the ranks, cut to this rank's shard, is what FSDP's
            # reduce-scatter makes of a backward that saw only the weighted examples.
            self.sync.average_into_shards(
                params, list(self.inner.rebuilt(weights, denom=denom).values()))
            return
        self.inner.apply(weights, denom=denom)
        # DDP averaged the gradients during backward, before this rewrite.
        self.sync.average_gradients(params)


def gram_source_for(module: nn.Module, optimizer, *, policy_acts: bool, **hook_kwargs):
    """The Gram source for this model and optimizer (Opacus's when it is a DPOptimizer)."""
    if is_dp_optimizer(optimizer):
        return OpacusGramSource(optimizer, policy_acts=policy_acts, module=module)
    # A policy that never acts never asks for the update to be rebuilt: the hooks may keep
    # only what the Gram needs (sketch rows of sketched layers).
    return HookGramSource(module, gram_only=not policy_acts, **hook_kwargs)
