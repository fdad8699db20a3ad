"""GradGuard: the plugin a training loop is wrapped with.

``make_guarded`` attaches the GNQ hooks to the model, wraps the optimizer in a
:class:`~gradguard.optimizer.GuardedOptimizer` and rebuilds the data loader so the
dataset index of every example in a batch is known. The loop itself is unchanged:
on every ``optimizer.step()`` the guard measures per-example gradient uniqueness,
applies the policy, records the ledger, logs to TensorBoard and runs the curvature
probe on its schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .distributed import (
    GNQ_MODES,
    DistributedSync,
    flatten_per_example,
    gram_from_rows,
    resolve_sync,
    unwrap_ddp,
)
from .ledger import BOUND_ASSUMPTIONS, DisclosureLedger
from .loader import IndexTrackingLoader, track_indices
from .optimizer import GuardedOptimizer
from .policies import POLICIES, Quantile, budget_thresholds, policy_weights
from .uniqueness.gnq import gnq_from_gram, resolve_lam
from .uniqueness.hooks import GramHooks

__all__ = ["GradGuard", "NonFiniteGradientError"]

_STATE_VERSION = 1


class NonFiniteGradientError(FloatingPointError):
    """A step's loss or per-example gradients are NaN or Inf."""


def _owns_layout(g: torch.Tensor, p: torch.Tensor) -> bool:
    """``g`` can become ``p.grad`` as is: p's strides, and a storage of its own."""
    return (g.stride() == p.stride() and g.storage_offset() == 0
            and g.untyped_storage().nbytes() == g.numel() * g.element_size())


def _is_dp_optimizer(optimizer: Optimizer) -> bool:
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(optimizer, DPOptimizer)


class GradGuard:
    """Per-example privacy monitor (and optional censor) for an existing training loop.

    Args:
        policy: ``"monitor"`` (measure only; the update is bit-for-bit unchanged, except
            with virtual steps (``signal_skip_step``) on a plain optimizer, where the
            logical batch's Σ_j g_j / expected batch size is rebuilt from the captures),
            ``"clip"`` (scale example j by min(1, sqrt(τ/GNQ_j)), iterated until no
            example's effective GNQ exceeds τ) or ``"drop"`` (weight 0 when GNQ_j > τ).
        lam: ridge λ > 0 of GNQ (default 1e-2, the GNQ authors' value), or the factor ρ
            of λ = ρ·trace(K)/B with ``relative_lam=True``.
        relative_lam: make λ follow the gradients' scale.
        threshold: τ, a number, or :class:`~gradguard.policies.Quantile` to calibrate it
            on the run's own recent GNQ values. Required by ``clip``; ``drop`` needs a
            threshold, a budget or both.
        budget: cumulative disclosure budget in nats (of the ledger's bound). With
            ``clip`` or ``drop``: an example whose GNQ this step would take its bound past
            the budget is dropped (``clip``: scaled to fit), and an example whose bound
            reaches the budget is censored for the rest of training.
        log_dir: TensorBoard run directory (``None``: no logging).
        log_every: log scalars every this many steps.
        curvature: a :class:`~gradguard.curvature.CurvatureProbe`, run after the steps
            its schedule names.
        on_nonfinite: ``"raise"`` (default, an error naming the step and examples) or
            ``"skip"`` (the step is skipped, the ledger untouched, the skip counted).
        strategy: ``"auto"``, ``"ghost"``, ``"materialise"`` or ``"sketch"`` per-layer Gram
            route (see :class:`~gradguard.uniqueness.hooks.GramHooks`).
        sketch_dim: per-layer sketch size under ``"sketch"`` (default 16384).
        sketch_seed: seed of the sketch projections.
        gram_dtype: dtype of layer Grams (default float32; float64 for float64 models).
        top_k: rows of the most-disclosing-examples table.
        num_examples: size of the training set (default: ``len(data_loader.dataset)``).
        distributed: under ``torch.distributed``, make the ranks agree (one ledger, one
            policy decision per example, gradients rewritten by a policy averaged across
            ranks, logs from the first rank only). ``None`` (default): on when the process
            group has more than one rank and the model is DDP-wrapped (or the optimizer is
            Opacus's distributed DPOptimizer); ``True`` for wrappers gradguard does not see
            (Lightning, HF Trainer); ``False``: each rank on its own.
        distributed_gnq: ``"local"`` (GNQ over each rank's batch: an upper bound of the
            global-batch GNQ, since more examples only lower it) or ``"global"`` (exact
            global-batch GNQ by all-gathering per-example gradients: B_global × P memory
            per rank). See :mod:`gradguard.distributed`.
        process_group: the ``torch.distributed`` group to agree within (default: world).

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=8)
        >>> guard = gg.GradGuard(policy="monitor")
        >>> model, opt, loader = guard.make_guarded(module=model,
        ...     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
        >>> guard.ledger.steps_seen.sum().item()
        16
        >>> guard.close()
    """

    def __init__(self, *, policy: str = "monitor", lam: float = 1e-2, relative_lam: bool = False,
                 threshold: float | Quantile | None = None, budget: float | None = None,
                 log_dir: str | None = None, log_every: int = 10, curvature=None,
                 on_nonfinite: str = "raise", strategy: str = "auto",
                 gram_dtype: torch.dtype | None = None, top_k: int = 10,
                 num_examples: int | None = None, distributed: bool | None = None,
                 distributed_gnq: str = "local", process_group=None,
                 sketch_dim: int | None = None, sketch_seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        resolve_lam(torch.zeros(1, 1), lam)  # validates lam
        if threshold is not None and not isinstance(threshold, Quantile) and not (
                isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(
                f"threshold must be a number > 0 or gradguard.Quantile(q), got {threshold!r}")
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"budget must be a number of nats > 0, got {budget!r}")
        if policy == "clip" and threshold is None and budget is None:
            raise ValueError("policy='clip' needs threshold= (a GNQ value or "
                             "gradguard.Quantile(q)) or budget= (nats)")
        if policy == "drop" and threshold is None and budget is None:
            raise ValueError("policy='drop' needs threshold= (a GNQ value or "
                             "gradguard.Quantile(q)) or budget= (nats)")
        if policy == "monitor" and (threshold is not None or budget is not None):
            raise ValueError("policy='monitor' never acts on GNQ; threshold/budget need "
                             "policy='clip' or 'drop'")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if distributed_gnq not in GNQ_MODES:
            raise ValueError(f"distributed_gnq must be one of {GNQ_MODES} (GNQ over each rank's "
                             f"batch, or exact over the global batch), got {distributed_gnq!r}")
        self.policy = policy
        self.lam = float(lam)
        self.relative_lam = relative_lam
        self.threshold = threshold
        self.budget = budget
        self.log_dir = log_dir
        self.log_every = log_every
        self.curvature = curvature
        self.on_nonfinite = on_nonfinite
        self.strategy = strategy
        self.sketch = {"sketch_dim": sketch_dim, "sketch_seed": sketch_seed}
        self.gram_dtype = gram_dtype
        self.top_k = top_k
        self.num_examples = num_examples
        self.distributed = distributed
        self.distributed_gnq = distributed_gnq
        self.process_group = process_group

        self.ledger: DisclosureLedger | None = None
        self.module: nn.Module | None = None
        self.optimizer: GuardedOptimizer | None = None
        self.loader: IndexTrackingLoader | None = None
        self.sink = None
        self.hooks: GramHooks | None = None
        self.step = 0  # real (not skipped) optimizer steps taken
        self.skipped_nonfinite = 0
        self.last_gnq: torch.Tensor | None = None  # GNQ measured at the last step
        self.last_weights: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_lam: float | torch.Tensor = self.lam
        self.guard_seconds = 0.0
        self.probe_seconds = 0.0
        self._dropped_total: torch.Tensor | float = 0.0
        self._clipped_total: torch.Tensor | float = 0.0
        self._window: list[torch.Tensor] = []
        self._manual_indices: torch.Tensor | None = None
        self._dp = False
        self._stash: list[torch.Tensor] = []
        self._dist: DistributedSync | None = None  # set by make_guarded under DDP
        self._closed = False
        self._warned_modified = False

    # ------------------------------------------------------------------ wiring
    def make_guarded(self, *, module: nn.Module, optimizer: Optimizer,
                     data_loader: DataLoader | None = None, loss_reduction: str = "mean",
                     params: Iterable[nn.Parameter] | None = None, batch_first: bool = True):
        """Attach to a model, optimizer and data loader; the loop stays as it was.

        Args:
            module: the model (or Opacus's ``GradSampleModule`` from ``make_private``).
            optimizer: its optimizer (or Opacus's ``DPOptimizer``).
            data_loader: the training loader; rebuilt so each batch's dataset indices are
                known (the batches it yields are unchanged). Without one, call
                :meth:`set_batch_indices` before each step.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over the batch.
            params: restrict the guarded parameters (default: all trainable ones).
            batch_first: whether model inputs are batch first.

        Returns:
            ``(module, optimizer, data_loader)`` to use in the loop.

        Raises:
            ValueError: bad ``loss_reduction``, or a ``loss_reduction`` contradicting the
                wrapped Opacus optimizer's.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how your loss reduces "
                             f"over the batch), got {loss_reduction!r}")
        if self.module is not None:
            raise RuntimeError("this GradGuard is already attached; create one per model")
        self._dp = _is_dp_optimizer(optimizer)
        if self._dp:
            self._check_opacus(optimizer, loss_reduction)
        else:
            self.hooks = GramHooks(unwrap_ddp(module), loss_reduction=loss_reduction,
                                   batch_first=batch_first, strategy=self.strategy,
                                   gram_dtype=self.gram_dtype, params=params, **self.sketch)
        self.loss_reduction = loss_reduction
        expected = self._expected_batch_size(optimizer, data_loader)
        self.optimizer = GuardedOptimizer(optimizer, guard=self, expected_batch_size=expected,
                                          loss_reduction=loss_reduction)
        self.module = module
        if data_loader is not None:
            self.loader = track_indices(data_loader)
            if self.num_examples is None:
                self.num_examples = len(data_loader.dataset)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.ledger = DisclosureLedger(self.num_examples, device=device)
        self._dist = resolve_sync(module=module, optimizer=optimizer, enabled=self.distributed,
                                  gnq_mode=self.distributed_gnq, group=self.process_group,
                                  device=device)
        if self.log_dir is not None and (self._dist is None or self._dist.is_main):
            from .tensorboard import TensorBoardSink

            self.sink = TensorBoardSink(self.log_dir, top_k=self.top_k)
            lam_text = (f"relative: λ = {self.lam:g}·trace(K)/B" if self.relative_lam
                        else f"absolute: λ = {self.lam:g}")
            self.sink.log_text("config", f"policy={self.policy}; {lam_text}; threshold="
                               f"{self.threshold}; budget={self.budget}; "
                               f"loss_reduction={loss_reduction}. {BOUND_ASSUMPTIONS}", 0)
        self._run_probe()  # the step-0 baseline, before any update
        return module, self.optimizer, (self.loader if self.loader is not None else data_loader)

    @staticmethod
    def _check_opacus(optimizer, loss_reduction: str) -> None:
        if optimizer.loss_reduction != loss_reduction:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} contradicts the Opacus optimizer's "
                f"loss_reduction={optimizer.loss_reduction!r}; pass the same value to both.")
        if not hasattr(type(optimizer), "grad_samples") or type(optimizer).__name__.endswith(
                "FastGradientClipping"):
            raise ValueError(
                "gradguard reads Opacus's per-example gradients (grad_sample), which ghost "
                "clipping never materialises. Use make_private(..., grad_sample_mode='hooks').")

    @staticmethod
    def _expected_batch_size(optimizer, data_loader) -> int | None:
        if getattr(optimizer, "expected_batch_size", None):
            return int(optimizer.expected_batch_size)
        if data_loader is None:
            return None
        sampler = data_loader.batch_sampler
        if getattr(sampler, "sample_rate", None) is not None:  # Opacus Poisson sampling
            return max(1, round(sampler.sample_rate * len(data_loader.dataset)))
        return data_loader.batch_size or getattr(sampler, "batch_size", None)

    def set_batch_indices(self, indices) -> None:
        """Dataset indices of the examples behind the next step (when there is no loader)."""
        self._manual_indices = torch.as_tensor(indices, dtype=torch.long)

    # ------------------------------------------------------------------ per step
    def _clear_step(self) -> None:
        if self.hooks is not None:
            self.hooks.clear()
        self._stash.clear()

    def _on_micro_step(self, optimizer: GuardedOptimizer) -> None:
        """A virtual (skipped) step: keep what is needed for the logical batch's GNQ."""
        if self._dp:
            if self.policy != "monitor":
                raise NotImplementedError(
                    "policy weights must be applied before DP clipping, but with Opacus's "
                    "BatchMemoryManager the logical batch's GNQ is known only after its last "
                    "micro-batch, when earlier ones are already clipped. Use policy='monitor' "
                    "with BatchMemoryManager, or physical batch = logical batch.")
            self._stash.append(self._opacus_rows(optimizer.original_optimizer))

    def _opacus_rows(self, dp_optimizer) -> torch.Tensor:
        rows = []
        for p in dp_optimizer.params:
            gs = p.grad_sample
            if isinstance(gs, list):  # opacus keeps a list when a module ran twice
                gs = torch.stack(gs).sum(0)
            if gs is not None:
                # explicit width: reshape(0, -1) is ambiguous for an empty (Poisson) batch
                rows.append(gs.reshape(gs.shape[0], math.prod(gs.shape[1:])).to(torch.float64))
        return torch.cat(rows, 1) if rows else torch.zeros(0, 0, dtype=torch.float64)

    def _indices_for(self, batch: int, device) -> torch.Tensor:
        if self._manual_indices is not None:
            idx, self._manual_indices = self._manual_indices.to(device), None
            if idx.numel() != batch:
                raise RuntimeError(f"set_batch_indices got {idx.numel()} indices for a step "
                                   f"with {batch} examples")
            return idx
        if self.loader is None:
            raise RuntimeError("gradguard does not know which examples are in this batch: pass "
                               "data_loader= to make_guarded or call guard.set_batch_indices().")
        return self.loader.take(batch, device=device)

    def _gram(self, optimizer: GuardedOptimizer) -> torch.Tensor:
        if self._dp:
            G = torch.cat([*self._stash, self._opacus_rows(optimizer.original_optimizer)])
            self._stash.clear()
            if self._dist is not None:
                self._dist.keep_rows(G)
            return G @ G.T
        if self._dist is not None and self._dist.gnq_mode == "global":
            # Exact global-batch GNQ needs the rows themselves, not just this rank's Gram.
            params = [p for p in self.hooks._all_params() if self.hooks._guarded(p)]
            rows, spans = flatten_per_example(self.hooks.per_example_grads(), params,
                                              self.hooks.batch_size)
            self._dist.keep_rows(rows, spans)
            return gram_from_rows(rows, spans, self.hooks.gram_dtype)
        return self.hooks.gram()

    def _thresholds(self, gnq: torch.Tensor, indices: torch.Tensor):
        tau = torch.full_like(gnq, math.inf)
        if isinstance(self.threshold, Quantile):
            self._window.append(gnq.detach())
            self._window = self._window[-self.threshold.window:]
            pooled = torch.cat(self._window)
            if pooled.numel():
                tau = tau.clamp(max=torch.quantile(pooled, self.threshold.q))
        elif self.threshold is not None:
            tau = tau.clamp(max=float(self.threshold))
        exhausted = None
        if self.budget is not None:
            remaining = self.budget - self.ledger.bound(indices)
            allowed = budget_thresholds(remaining)
            exhausted = gnq > allowed if self.policy == "drop" else remaining <= 0
            tau = torch.minimum(tau, allowed)
        return tau, exhausted

    def _nonfinite(self, K: torch.Tensor, indices: torch.Tensor) -> bool:
        finite = torch.isfinite(torch.diagonal(K))
        ok = bool(finite.all()) and bool(torch.isfinite(K).all())
        if self._dist is not None:
            ok = self._dist.agree(ok)  # every rank skips (or raises) together
        if ok:
            return False
        bad = indices[~finite].tolist()[:20]
        if self.on_nonfinite == "skip":
            self.skipped_nonfinite += 1
            if self.sink is not None:
                self.sink.log_scalars({"policy/skipped_nonfinite": self.skipped_nonfinite},
                                      self.step)
            return True
        empty = " The batch was empty: the mean loss of an empty batch is NaN (Poisson " \
                "sampling draws empty batches); skip empty batches in the loop or use " \
                "loss_reduction='sum'." if K.shape[0] == 0 else ""
        raise NonFiniteGradientError(
            f"step {self.step + 1}: the loss or per-example gradients are NaN/Inf "
            f"(dataset indices {bad}).{empty} Lower the learning rate or fix the data, or "
            "pass on_nonfinite='skip' to GradGuard to skip such steps.")

    @torch.no_grad()
    def _on_step(self, optimizer: GuardedOptimizer) -> bool:
        """Measure GNQ, apply the policy to the gradients and update the ledger."""
        start = time.perf_counter()
        K = self._gram(optimizer)
        B = K.shape[0]
        device = self.ledger.device
        indices = self._indices_for(B, device)
        if B == 0 and self._dist is None:  # under DDP the other ranks still need this one
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                               for p in optimizer.params)
            if not grads_finite:
                if self.on_nonfinite == "skip":
                    self.skipped_nonfinite += 1
                    optimizer.original_optimizer.zero_grad(set_to_none=True)
                    return False
                # (a 0×0 Gram cannot show it, so _nonfinite would wave it through)
                raise NonFiniteGradientError(
                    f"step {self.step + 1}: the batch was empty but the gradients are NaN/Inf "
                    "(a term divided by the batch size is 0/0 on an empty batch; Poisson "
                    "sampling draws empty batches). Skip empty batches in the loop, use "
                    "loss_reduction='sum' semantics, or pass on_nonfinite='skip' to GradGuard.")
            if self.policy != "monitor":
                self._apply_weights(optimizer, torch.zeros(0, dtype=torch.float64, device=device))
            self.step += 1
            return True
        if self._nonfinite(K, indices):
            optimizer.original_optimizer.zero_grad(set_to_none=True)
            self._clear_step()
            return False
        # own: this rank's examples in the global batch; rows: those K (hence the policy)
        # covers. From here on gnq, indices, weights span the global batch on every rank.
        own = rows = slice(None)
        if self._dist is not None:
            K, indices, own, rows = self._dist.share_batch(K, indices, gram_dtype=(
                self.hooks.gram_dtype if self.hooks is not None else torch.float64))
        lam = resolve_lam(K, self.lam, relative=self.relative_lam)
        gnq = gnq_from_gram(K, lam)
        if self._dist is not None:
            gnq = self._dist.share_rows(gnq, rows)
        blocked = self.ledger.is_censored(indices) if self.policy != "monitor" else None
        if self.policy == "monitor":
            weights, effective = torch.ones_like(gnq), gnq
            if not self._dp and optimizer.accumulated_iterations > 1:
                # Virtual steps: the loop's zero_grad() cleared .grad between micro-batches,
                # so rebuild the logical batch's mean gradient from the captures.
                self._apply_weights(optimizer, weights[own])
        else:
            tau, exhausted = self._thresholds(gnq, indices)
            if exhausted is not None:
                self.ledger.censor(indices, where=exhausted)
                blocked = blocked | exhausted
            blocked = blocked[rows]
            if blocked.device.type == "cpu" and not bool(blocked.any()):
                blocked = None  # nothing censored: spares policy_weights a B³ re-solve
            weights, effective = policy_weights(self.policy, K, gnq[rows], lam, tau=tau[rows],
                                                blocked=blocked)
            if self._dist is not None:
                weights = self._dist.share_rows(weights, rows)
                effective = self._dist.share_rows(effective, rows)
            self._apply_weights(optimizer, weights[own])
            self._dropped_total = self._dropped_total + (weights == 0).sum()
            self._clipped_total = self._clipped_total + ((weights > 0) & (weights < 1)).sum()
        self.step += 1
        self.ledger.update(indices, effective, self.step)
        if self.budget is not None and self.policy != "monitor":
            # Dropping others can raise a kept example's effective GNQ past its budget.
            self.ledger.censor(indices, where=self.ledger.bound(indices) >= self.budget)
        self.last_gnq, self.last_weights, self.last_indices = gnq, weights, indices
        self.last_lam = lam
        if self.sink is not None and self.step % self.log_every == 0:
            self._log_step()
        self.guard_seconds += time.perf_counter() - start
        return True

    def _apply_weights(self, optimizer: GuardedOptimizer, weights: torch.Tensor) -> None:
        """Replace the guarded gradients by Σ_j w_j g_j / expected batch size."""
        if self._dp:
            for p in optimizer.original_optimizer.params:
                gs = p.grad_sample
                if isinstance(gs, list):
                    raise NotImplementedError("policies with a module used twice under Opacus")
                if gs is not None:
                    w = weights.to(device=gs.device, dtype=gs.dtype)
                    p.grad_sample = gs * w.view(-1, *([1] * (gs.dim() - 1)))
            return
        denom = 1.0
        if self.loss_reduction == "mean":
            # The captures already span the whole logical batch (virtual steps included)
            # and each example's gradient is its own loss's, so the mean is over the
            # expected logical batch size alone, as DPOptimizer's clipped sum is.
            denom = optimizer.expected_batch_size or max(1, weights.shape[0])
        guarded = [p for p in self.hooks._all_params() if self.hooks._guarded(p)]
        scale = None
        if self._dist is None and optimizer.accumulated_iterations == 1 and weights.shape[0]:
            scale = self.hooks.backward_scale()
            if (scale is None and optimizer.step_hook is None and not self._warned_modified
                    and self.hooks.grads_modified()):
                self._warned_modified = True
                warnings.warn(
                    "the gradients were modified between backward() and step() (e.g. by "
                    "clip_grad_norm_ or GradScaler.unscale_). Under policy="
                    f"{self.policy!r} gradguard rebuilds them from the captured per-example "
                    "gradients, so that modification is not applied. Re-apply it to the "
                    "rewritten gradients in optimizer.step_hook (called after the policy, "
                    "before the step), or use Opacus for a bounded update norm (make_guarded "
                    "accepts a DPOptimizer).", stacklevel=4)
        if scale is not None:
            # .grad already holds Σ_j g_j / scale: rescale it and correct it over the examples
            # whose weight is not 1, which a policy leaves few of. This skips rebuilding
            # every layer's gradient and keeps loss terms gradguard does not capture
            # (regularisers on the parameters).
            if scale != denom:
                for p in guarded:
                    if p.grad is not None:
                        p.grad.mul_(scale / denom)
            residual = (weights - 1) / denom
            if bool(residual.any()):
                self.hooks.add_weighted_grads_(residual)
            return
        # 1/denom goes into the B weights, not over every gradient entry.
        new = self.hooks.weighted_grads(weights / denom) if weights.shape[0] else {}
        for p in guarded:
            g = new.get(p)
            if g is None:
                if p.grad is not None:
                    p.grad.zero_()
                continue
            # In the parameter's own layout (einsum results may be transposed): what
            # autograd would have produced, so later accumulation keeps its fast path.
            p.grad = g if _owns_layout(g, p) else torch.empty_like(p).copy_(g)
        if self._dist is not None:
            # DDP averaged the gradients during backward, before this rewrite.
            self._dist.average_gradients(guarded)

    def _log_step(self) -> None:
        stats = {"dropped_total": self._dropped_total, "clipped_total": self._clipped_total}
        weights = None if self.policy == "monitor" else self.last_weights
        self.sink.log_step(self.step, gnq=self.last_gnq, weights=weights, ledger=self.ledger,
                           lam=self.last_lam, policy_stats=stats)
        self.sink.log_scalars({"time/guard_seconds": self.guard_seconds}, self.step)
        self.sink.log_top_table(self.step, self.ledger)

    def _after_step(self, optimizer: GuardedOptimizer) -> None:
        self._clear_step()
        self._run_probe()

    def _run_probe(self) -> None:
        if self.curvature is None:
            return
        # The probe's own forward and backward passes are not training steps.
        with self.hooks.paused() if self.hooks is not None else contextlib.nullcontext():
            # Not through DDP: probe passes are not training passes (no buffer broadcasts,
            # no gradient-sync bookkeeping for a backward that never reaches the parameters).
            result = self.curvature.maybe_run(self.step, unwrap_ddp(self.module))
        if result is None:
            return
        self.probe_seconds += result.seconds
        self.ledger.add_curvature(result.member_indices.to(self.ledger.device),
                                  result.member_scores.to(self.ledger.device))
        if self.sink is not None:
            self.sink.log_curvature(self.step, result)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors only (loads with ``weights_only=True``)."""
        state = {
            "version": torch.tensor(_STATE_VERSION),
            "step": torch.tensor(self.step),
            "skipped_nonfinite": torch.tensor(self.skipped_nonfinite),
            "dropped_total": torch.as_tensor(self._dropped_total).detach().clone(),
            "clipped_total": torch.as_tensor(self._clipped_total).detach().clone(),
            "ledger": self.ledger.state_dict(),
            "window": [w.clone() for w in self._window],
        }
        if self.curvature is not None and hasattr(self.curvature, "state_dict"):
            state["curvature"] = self.curvature.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after ``make_guarded``)."""
        if self.ledger is None:
            raise RuntimeError("call make_guarded before load_state_dict")
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"unknown GradGuard state version {state.get('version')!r}")
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self._dropped_total = state["dropped_total"].to(self.ledger.device)
        self._clipped_total = state["clipped_total"].to(self.ledger.device)
        self.ledger.load_state_dict(state["ledger"])
        self._window = [w.to(self.ledger.device) for w in state["window"]]
        if "curvature" in state and self.curvature is not None:
            self.curvature.load_state_dict(state["curvature"])

    def summary(self) -> dict[str, Any]:
        """Plain-number summary of the run so far."""
        s = {k: float(v) for k, v in self.ledger.summary().items()}
        s.update(step=self.step, skipped_nonfinite=self.skipped_nonfinite,
                 dropped_total=float(self._dropped_total), clipped_total=float(self._clipped_total),
                 guard_seconds=self.guard_seconds, probe_seconds=self.probe_seconds)
        return s

    def close(self) -> None:
        """Remove every hook, write hparams and flush the logs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.hooks is not None:
            self.hooks.remove()
        if self.sink is not None:
            if self.last_gnq is not None and self.step % self.log_every != 0:
                self._log_step()
            hparams = {"policy": self.policy, "lam": self.lam,
                       "lam_mode": "relative" if self.relative_lam else "absolute",
                       "threshold": str(self.threshold), "budget": self.budget or 0.0,
                       "strategy": self.strategy}
            try:
                self.sink.close(hparams=hparams)
                self.save_run(self.log_dir, hparams=hparams)
            except Exception as exc:  # noqa: BLE001 - never fail training at close
                warnings.warn(f"gradguard could not finish its run directory {self.log_dir}: "
                              f"{exc}", stacklevel=2)

    def save_run(self, run_dir: str, *, hparams: dict[str, Any] | None = None) -> None:
        """Write what ``gradguard report`` reads: ``gradguard_state.pt`` and ``summary.json``.

        Only indices and numbers are written, never training examples.
        """
        import json
        import os

        os.makedirs(run_dir, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(run_dir, "gradguard_state.pt"))
        history = [r.to_dict() if hasattr(r, "to_dict") else dict(r)
                   for r in getattr(self.curvature, "history", [])]
        doc = {"config": hparams or {}, "summary": self.summary(),
               "bound_assumptions": BOUND_ASSUMPTIONS, "curvature_history": history}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(doc, f, indent=2, default=float)

    def __enter__(self) -> GradGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
