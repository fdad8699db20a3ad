"""GradGuard: the plugin a training loop is wrapped with.

``make_guarded`` attaches a Gram source (GNQ hooks on the model, or Opacus's per-sample
gradients) and wraps the optimizer in a :class:`~gradguard.optimizer.GuardedOptimizer`,
whose step observer the guard is, and rebuilds the data loader so the dataset index of
every example in a batch is known. The loop itself is unchanged. One optimizer step is a
pipeline:

1. **measure**: the Gram source gives the B×B Gram K of per-example gradients;
   λ and GNQ follow from it (:func:`~gradguard.uniqueness.gnq.gnq_from_gram`);
2. **decide**: the policy object (:class:`~gradguard.policies.Monitor`, ``Clip``,
   ``Drop``) turns GNQ into per-example weights (nothing is recorded yet);
3. **apply**: the Gram source makes the update Σ_j w_j g_j / B, and the gradients about
   to be applied are checked for NaN/Inf;
4. **record**: the policy commits its decision, the ledger is updated, sinks log, the
   run directory is refreshed every ``save_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import rundir
from .config import GuardConfig
from .distributed import fsdp_kind, resolve_sync, unwrap_ddp
from .ledger import BOUND_ASSUMPTIONS, DisclosureLedger
from .loader import IndexTrackingLoader, track_indices
from .optimizer import GuardedOptimizer
from .policies import Policy, Quantile, make_policy
from .sources import DistributedGramSource, GramSource, gram_source_for, is_dp_optimizer
from .tensorboard import TAGS
from .uniqueness import gnq as gnq_math
from .uniqueness.gnq import gnq_from_gram, resolve_lam
from .uniqueness.kernels import is_sharded
from .validation import check_int

__all__ = ["GradGuard", "NonFiniteGradientError"]

_STATE_VERSION = 1
_LOG = logging.getLogger("gradguard")
# Models a live GradGuard is attached to: a second one on the same model is refused.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NonFiniteGradientError(FloatingPointError):
    """A step's loss or per-example gradients are NaN or Inf."""


class GradGuard:
    """Per-example privacy monitor (and optional censor) for an existing training loop.

    Args:
        policy: ``"monitor"`` (measure only; the update is bit-for-bit unchanged, except
            with virtual steps (``signal_skip_step``) on a plain optimizer, where the
            logical batch's Σ_j g_j / expected batch size is rebuilt from the captures),
            ``"clip"`` (scale example j by min(1, sqrt(τ/GNQ_j)), iterated until no
            example's effective GNQ exceeds τ) or ``"drop"`` (weight 0 when GNQ_j > τ);
            or a policy object, :class:`~gradguard.policies.Monitor`, ``Clip(...)`` or
            ``Drop(...)`` (then threshold and budget go to the object).
        lam: ridge λ > 0 of GNQ (default 1e-2, the GNQ authors' value), or the factor ρ
            of λ = ρ·trace(K)/B with ``relative_lam=True``.
        relative_lam: make λ follow the gradients' scale. A batch whose gradients are
            all zero has GNQ 0.
        threshold: τ, a number, or :class:`~gradguard.policies.Quantile` (about the top
            ``1 - q`` of each step's examples; the realised rate is logged as
            ``policy/realised_rate``). Required by ``clip``; ``drop`` needs a threshold,
            a budget or both.
        budget: cumulative disclosure budget in nats (of the ledger's bound), a hard cap.
            With ``clip`` or ``drop``: an example whose effective GNQ this step would take
            its bound past the budget is dropped (``clip``: scaled to fit), and an example
            whose budget is exhausted is censored for the rest of training.
        log_dir: run directory: TensorBoard logs, ``gradguard_state.pt`` and
            ``summary.json`` (``None``: no logging).
        log_every: log scalars every this many steps.
        curvature: a :class:`~gradguard.curvature.CurvatureProbe`, run after the steps
            its schedule names.
        on_nonfinite: ``"raise"`` (default, an error naming the step and examples) or
            ``"skip"`` (the step is skipped, the ledger untouched, the skip counted). The
            check covers the per-example gradients (their Gram and the GNQ solved from it)
            and the final gradient of every parameter the optimizer is about to update. It
            is one read-back per step (one host synchronisation on an accelerator, the only
            one of a ``monitor`` step that does not log), made after GNQ is computed and
            before anything is applied or recorded: a NaN step is never trained on and
            never reaches the ledger. It is not deferred to a later step, which would let
            the optimizer apply the NaN first. A finite Gram for which K + λI does not
            factorise raises ValueError whatever this setting.
        strategy: ``"auto"``, ``"ghost"``, ``"materialise"`` or ``"sketch"`` per-layer Gram
            route (see :class:`~gradguard.uniqueness.hooks.GramHooks`). Where a layer is
            sketched (``"sketch"``, or ``"auto"`` where exact routes cost more than
            ``AUTO_SKETCH_MULTIPLE`` × its backward) GNQ is an estimate; ``summary()`` and
            the closing summary count such layers (``sketched_layers``).
        sketch_dim: per-layer sketch size under ``"sketch"`` (default 16384).
        sketch_seed: seed of the sketch projections.
        gram_dtype: dtype of layer Grams (default float32; float64 for float64 models). They
            are summed and solved in float64 (GNQ's relative error below ε·λ_max(K)/λ, ε
            the roundoff of ``gram_dtype``: 1.2e-7 for float32, 2.2e-16 for float64). On a
            device without float64 (Apple's MPS, see
            :func:`~gradguard.uniqueness.gnq.float64_supported`) the Grams, their sum and
            the solve are float32, with one warning when the guard is attached: the error
            bound becomes B·1.2e-7·λ_max(K)/λ (no digit is left once it nears 1: raise λ or
            use ``relative_lam``), and only ``policy="monitor"`` is supported there.
        top_k: rows of the most-disclosing-examples table.
        num_examples: size of the training set (default: ``len(data_loader.dataset)``).
        distributed: under ``torch.distributed``, make the ranks agree (one ledger, one
            policy decision per example, gradients rewritten by a policy averaged across
            ranks, logs from the first rank only). ``None`` (default): on when the process
            group has more than one rank and the model is DDP-wrapped or sharded by FSDP2's
            ``fully_shard`` (or the optimizer is Opacus's distributed DPOptimizer); ``True``
            for wrappers gradguard does not see (Lightning, HF Trainer); ``False``: each
            rank on its own.
        distributed_gnq: ``"local"`` (GNQ over each rank's batch: an upper bound of the
            global-batch GNQ, since more examples only lower it) or ``"global"`` (exact
            global-batch GNQ by all-gathering per-example gradients: B_global × P memory
            per rank, whole gradients also under FSDP). See :mod:`gradguard.distributed`.
        process_group: the ``torch.distributed`` group to agree within (default: world).
        save_every: write ``gradguard_state.pt`` and ``summary.json`` into ``log_dir``
            every this many steps (atomically), so a killed run resumes from its last
            complete state (see :meth:`resume`).
        delta: δ of the individual ε recorded under DP-SGD (``ledger.eps``); use the δ
            the run's own ε is stated at.

    Under Opacus (``make_guarded`` given a ``DPOptimizer``) GNQ, the ledger and the policy
    describe the *released* update: per-example gradients clipped as Opacus clips them,
    with the Gaussian noise in the ridge (λ + σ²C²); see :mod:`gradguard.dp`. Without
    Opacus, under ``clip``/``drop`` the ledger records the GNQ of the update actually
    applied (the effective GNQ after the policy's weights). Either way ``cum_gnq_raw`` /
    ``max_gnq_raw`` keep what an unprotected update would have disclosed.

    What a dropped example's influence is: none. When some weight is not 1 the guarded
    gradients are rebuilt from the captured per-example gradients as Σ_j w_j g_j / B, so
    a dropped example adds an exact 0; when no example is kept, the wrapped optimizer
    does not step at all (no momentum, no Adam moment update, no decoupled weight decay:
    the step is as if the batch had not been drawn). A rebuilt update leaves out loss
    terms that no guarded layer sees (e.g. a penalty on the parameters added to the
    loss): use the optimizer's ``weight_decay`` instead. When every weight is 1, ``.grad``
    is left as the loop computed it. B is the batch's own size (a short last batch too),
    or the expected batch size under Poisson sampling (as Opacus's DPOptimizer).

    Gradient accumulation: several ``backward()`` calls before one ``step()`` form one
    logical batch. Under ``loss_reduction="mean"``, by default each micro-batch's loss is
    the mean over that micro-batch (as Opacus's virtual steps); with the usual
    ``(loss / N).backward()`` pass ``accumulation_steps=N`` to ``make_guarded``. Either
    way the update applied is the plain accumulated one, Σ_j w_j g_j over the same
    denominator. A step with several micro-batches under the default warns once.

    Resume recipe (a run killed at any moment): build the model, optimizer, loader and
    a guard with the same settings, ``make_guarded``, restore your own model/optimizer
    checkpoint, then ``guard.resume(log_dir)`` (the state written by ``save_every`` or
    ``close()``); TensorBoard steps logged after that state are purged.

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

    def __init__(self, *, policy: str | Policy = "monitor", lam: float = 1e-2,
                 relative_lam: bool = False, threshold: float | Quantile | None = None,
                 budget: float | None = None, log_dir: str | None = None, log_every: int = 10,
                 curvature=None, on_nonfinite: str = "raise", strategy: str = "auto",
                 gram_dtype: torch.dtype | None = None, top_k: int = 10,
                 num_examples: int | None = None, distributed: bool | None = None,
                 distributed_gnq: str = "local", process_group=None,
                 save_every: int | None = None, delta: float = 1e-5,
                 sketch_dim: int | None = None, sketch_seed: int = 0):
        rule = make_policy(policy, threshold=threshold, budget=budget)
        self.config = GuardConfig(
            policy=rule.name, lam=lam, relative_lam=relative_lam, threshold=rule.threshold,
            budget=rule.budget, log_dir=log_dir, log_every=log_every,
            on_nonfinite=on_nonfinite, strategy=strategy, gram_dtype=gram_dtype, top_k=top_k,
            num_examples=num_examples, distributed=distributed,
            distributed_gnq=distributed_gnq, save_every=save_every, delta=delta,
            sketch_dim=sketch_dim, sketch_seed=sketch_seed)
        #: The policy object: decides each step's weights and owns its state.
        self.rule: Policy = rule
        self._use_config(self.config)
        self.curvature = curvature
        self.process_group = process_group

        self.ledger: DisclosureLedger | None = None
        self.module: nn.Module | None = None
        self.optimizer: GuardedOptimizer | None = None
        self.loader: IndexTrackingLoader | None = None
        self.sink = None
        self.source: GramSource | None = None
        self.hooks = None  # the GramHooks of a hook source (None under Opacus)
        self.loss_reduction = "mean"
        self.step = 0  # real (not skipped) optimizer steps taken
        self.skipped_nonfinite = 0
        self.last_gnq: torch.Tensor | None = None  # GNQ measured at the last step
        self.last_weights: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_lam: float | torch.Tensor = self.lam
        self.last_gnq_raw: torch.Tensor | None = None  # before DP clipping, noise, policy
        self._accountant = None  # gradguard.dp.IndividualAccountant under DP-SGD
        self.guard_seconds = 0.0
        self.probe_seconds = 0.0
        self._manual_indices: torch.Tensor | None = None
        self.grad_scaler = None
        self.accumulation_steps = 1
        self._warned_accumulation = False
        # the GradScaler's scale of the step being measured (a 0-d tensor when read from it)
        self._loss_scale: float | torch.Tensor = 1.0
        self._closed = False
        self._warned_modified = False

    def _use_config(self, config: GuardConfig) -> None:
        """Make ``config`` the guard's settings (the attributes are read from it)."""
        self.config = c = config
        self.policy = c.policy
        self.lam, self.relative_lam = c.lam, c.relative_lam
        self.threshold, self.budget = c.threshold, c.budget
        self.log_dir, self.log_every, self.save_every = c.log_dir, c.log_every, c.save_every
        self.on_nonfinite, self.strategy, self.gram_dtype = c.on_nonfinite, c.strategy, \
            c.gram_dtype
        self.top_k, self.num_examples = c.top_k, c.num_examples
        self.distributed, self.distributed_gnq = c.distributed, c.distributed_gnq
        self.delta = c.delta

    def replace_config(self, **changes: Any) -> GuardConfig:
        """Change settings before :meth:`make_guarded` (integrations fill in what the
        trainer knows: the run's log directory, dataset size, whether it is distributed).

        ``guard.config`` and the attributes read from it (``guard.log_dir``, ...) change
        together, validated as in the constructor.

        Args:
            **changes: :class:`~gradguard.config.GuardConfig` fields and their new values,
                except ``policy``, ``threshold`` and ``budget`` (the policy object is built
                from them: construct a new GradGuard instead).

        Returns:
            The new ``guard.config``.

        Raises:
            RuntimeError: the guard is already attached.
            TypeError: a name that is not a settable field.
            ValueError: a bad value (as the constructor would raise).

        Example:
            >>> guard = GradGuard(lam=0.1)
            >>> guard.replace_config(num_examples=100, log_every=5).num_examples
            100
            >>> guard.num_examples, guard.log_every, guard.lam
            (100, 5, 0.1)
        """
        if self.module is not None:
            raise RuntimeError("replace_config changes settings before make_guarded; this "
                               "guard is already attached. Create a new GradGuard instead.")
        fields = {f.name for f in dataclasses.fields(GuardConfig)} - {"policy", "threshold",
                                                                      "budget"}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"replace_config cannot set {unknown}: settable fields are "
                            f"{sorted(fields)} (policy, threshold and budget: construct a "
                            "new GradGuard)")
        self._use_config(dataclasses.replace(self.config, **changes))
        return self.config

    # ------------------------------------------------------------------ wiring
    def make_guarded(self, *, module: nn.Module, optimizer: Optimizer,
                     data_loader: DataLoader | None = None, loss_reduction: str = "mean",
                     params: Iterable[nn.Parameter] | None = None, batch_first: bool = True,
                     grad_scaler=None, accumulation_steps: int = 1):
        """Attach to a model, optimizer and data loader; the loop stays as it was.

        Args:
            module: the model (or Opacus's ``GradSampleModule`` from ``make_private``).
            optimizer: its optimizer (or Opacus's ``DPOptimizer``). Every parameter it
                updates must be one of the model's guarded parameters.
            data_loader: the training loader; rebuilt so each batch's dataset indices are
                known (the batches it yields are unchanged). Without one, call
                :meth:`set_batch_indices` before each step.
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over the batch.
            params: restrict the guarded parameters (default: all trainable ones).
            batch_first: whether model inputs are batch first.
            grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop
                (``scaler.scale(loss).backward(); scaler.step(optimizer)``). Its scale is
                read at every step, so GNQ is in the loss's true scale and rebuilt
                gradients are unscaled like the ones the scaler unscaled; steps the scaler
                skips for inf/NaN never reach the guard and are not counted. Without it a
                scaled loss inflates GNQ by the scale squared.
            accumulation_steps: with gradient accumulation in a plain loop (several
                ``backward()`` per ``step()``), the N each micro-batch's loss is divided by
                (``(loss / N).backward()``, the usual convention). Each example's gradient
                is then N × micro-batch size × its captured gradient. Default 1: each
                micro-batch's loss is its own mean, undivided; a step with several
                micro-batches and ``accumulation_steps=1`` warns once, since a loss divided
                by N would make GNQ N² too large.

        Returns:
            ``(module, optimizer, data_loader)`` to use in the loop.

        Raises:
            TypeError: ``module`` or ``optimizer`` is missing or of the wrong kind.
            ValueError: bad ``loss_reduction``, a ``loss_reduction`` contradicting the
                wrapped Opacus optimizer's, or an optimizer updating parameters gradguard
                does not guard (they would learn from dropped examples).
            RuntimeError: this guard is already attached, or another live GradGuard is
                attached to the model.
            ValueError: FSDP1 (``FullyShardedDataParallel``: use ``fully_shard``), or a
                ``fully_shard`` model whose root is not sharded.
            NotImplementedError: under ``fully_shard``: clip/drop on a 2-D (HSDP) mesh, the
                curvature probe, ``save_every``.
            UnsupportedLayerError: under ``fully_shard``, a layer sharded by
                ``fully_shard`` itself whose kernel re-runs it with its parameters' values
                (MultiheadAttention, RNNs, torch.func layers: shard their block instead);
                see :mod:`gradguard.distributed`.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how your loss reduces "
                             f"over the batch), got {loss_reduction!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer over the model's parameters, got "
                f"{type(optimizer).__name__}: gradguard shapes each step in optimizer.step()")
        if self.module is not None:
            raise RuntimeError("this GradGuard is already attached; create one per model")
        core = unwrap_ddp(module)
        sharding = fsdp_kind(core)
        if sharding is not None:
            self._check_fsdp(core, optimizer, sharding)
        other = _ATTACHED.get(core)
        if other is not None and other() is not None and not other()._closed:
            raise RuntimeError(
                "another GradGuard is already attached to this model: two guards would both "
                "rewrite its gradients and each miss the other's decisions. close() the first "
                "one, or use a single guard.")
        dp = is_dp_optimizer(optimizer)
        if dp:
            self._check_opacus(optimizer, loss_reduction)
        if grad_scaler is not None and not (callable(getattr(grad_scaler, "get_scale", None))
                                            and callable(getattr(grad_scaler, "is_enabled",
                                                                 None))):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(grad_scaler).__name__}")
        check_int("accumulation_steps", accumulation_steps, minimum=1)
        if grad_scaler is not None and dp:
            raise ValueError("grad_scaler with an Opacus DPOptimizer is not supported: Opacus "
                             "clips the scaled per-example gradients itself")
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        gram_dtype = self._gram_dtype_on(device, dp=dp)
        source = gram_source_for(core, optimizer, policy_acts=self.rule.acts,
                                 loss_reduction=loss_reduction, batch_first=batch_first,
                                 strategy=self.strategy, gram_dtype=gram_dtype,
                                 params=params, sketch_dim=self.config.sketch_dim,
                                 sketch_seed=self.config.sketch_seed)
        try:
            if not dp:
                self._check_coverage(core, optimizer, source.guarded_params())
        except Exception:
            source.remove()
            raise
        self.source = source
        self.hooks = getattr(source, "hooks", None)
        _ATTACHED[core] = weakref.ref(self)
        self.loss_reduction = loss_reduction
        self.grad_scaler = grad_scaler
        self.accumulation_steps = accumulation_steps
        expected, poisson = self._expected_batch_size(optimizer, data_loader)
        self.optimizer = GuardedOptimizer(optimizer, guard=self, expected_batch_size=expected,
                                          loss_reduction=loss_reduction)
        self.optimizer.poisson_sampling = poisson
        self.module = module
        if data_loader is not None:
            self.loader = track_indices(data_loader)
            if self.num_examples is None:
                self._use_config(dataclasses.replace(self.config,
                                                     num_examples=len(data_loader.dataset)))
        # The ledger's sums are float64: on a device without it they live on the CPU.
        self.ledger = DisclosureLedger(
            self.num_examples, device=device if gnq_math.float64_supported(device) else "cpu")
        sync = resolve_sync(module=module, optimizer=optimizer, enabled=self.distributed,
                            gnq_mode=self.distributed_gnq, group=self.process_group,
                            device=device)
        if sync is not None:
            self.source = DistributedGramSource(self.source, sync)
        if dp:
            self._start_dp_accounting(optimizer, data_loader, expected, device)
        self._open_sink()
        self._run_probe()  # the step-0 baseline, before any update
        return module, self.optimizer, (self.loader if self.loader is not None else data_loader)

    def _gram_dtype_on(self, device: torch.device, *, dp: bool) -> torch.dtype | None:
        """``gram_dtype``, or float32 where ``device`` has no float64 (MPS), said once."""
        if gnq_math.float64_supported(device):
            return self.gram_dtype
        if self.rule.acts or dp:
            raise NotImplementedError(
                f"policy={self.policy!r}{' under Opacus' if dp else ''} on a {device.type} "
                "device, which has no float64: the policies' and the DP accounting's float64 "
                "arithmetic is not ported to float32. Use policy='monitor' there, or train on "
                "the CPU or CUDA.")
        warnings.warn(
            f"the {device.type} device has no float64: gradguard sums and solves the Gram in "
            "float32 there, so GNQ's relative error reaches B·1.2e-7·λ_max(K)/λ (float64: "
            "the rounding of float32 layer Grams alone, 1.2e-7·λ_max(K)/λ; see "
            "gradguard.uniqueness.gnq), and keeps the ledger's float64 sums on the CPU (B "
            "values copied to the host per step).", stacklevel=3)
        return torch.float32

    def attach_optimizer(self, optimizer: GuardedOptimizer, *,
                         expected_batch_size: int | None = None) -> None:
        """Use ``optimizer`` (a GuardedOptimizer built for this guard by an integration)
        as the guarded optimizer, and set the batch size the update is divided by.

        Raises:
            TypeError: not a GuardedOptimizer observed by this guard.
        """
        if not isinstance(optimizer, GuardedOptimizer) or optimizer.guard is not self:
            raise TypeError("attach_optimizer needs a GuardedOptimizer built with guard=this "
                            "GradGuard")
        if not is_dp_optimizer(optimizer.original_optimizer) and self.source is not None:
            self._check_coverage(unwrap_ddp(self.module), optimizer.original_optimizer,
                                 self.source.guarded_params())
        if expected_batch_size is not None:
            optimizer.expected_batch_size = int(expected_batch_size)
        self.optimizer = optimizer

    def _check_fsdp(self, module: nn.Module, optimizer: Optimizer, sharding: str) -> None:
        """What works under FSDP, or a refusal naming what does.

        Under ``fully_shard`` each rank's hooks capture whole inputs and output gradients
        of its own examples (FSDP gathers the weights for forward and backward), so its
        local-batch Gram is exact, as under DDP. Parameters and ``.grad`` are DTensor
        shards between steps: the checks below keep gradguard to what reads no more.
        """
        if sharding == "FullyShardedDataParallel":
            raise ValueError(
                "gradguard does not support FSDP1 (FullyShardedDataParallel): its flat "
                "parameters give each original parameter a flattened shard of its gradient, "
                "which cannot be matched to per-example captures. Shard with FSDP2's "
                "torch.distributed.fsdp.fully_shard (supported), or use DDP "
                "(DistributedDataParallel).")
        if is_dp_optimizer(optimizer):
            raise NotImplementedError(
                "Opacus's DPOptimizer on a fully_shard model is not supported by gradguard "
                "(the released update would be measured from sharded per-sample gradients). "
                "Use Opacus with DPDDP, or GradGuard's own policies under fully_shard.")
        unsharded = [n for n, p in module.named_parameters()
                     if p.requires_grad and not is_sharded(p)]
        if unsharded:
            raise ValueError(
                f"under fully_shard every trainable parameter must be sharded, but "
                f"{unsharded[:10]} are plain tensors (their gradients are not averaged across "
                "ranks). Call fully_shard on the root model too, after its submodules.")
        if self.rule.acts:
            # The rebuilt update is averaged over the guard's process group and cut into
            # FSDP's shards: FSDP must average over exactly that group.
            world = torch.distributed.get_world_size(self.process_group)
            meshes = {(p.device_mesh.ndim, p.device_mesh.size()) for p in module.parameters()
                      if p.requires_grad}
            if self.distributed is False or meshes != {(1, world)}:
                raise NotImplementedError(
                    f"policy={self.policy!r} under FSDP needs fully_shard over a 1-D mesh of "
                    f"all {world} ranks of the guard's process group, with distributed "
                    f"synchronisation on (got meshes (ndim, size) {sorted(meshes)}, "
                    f"distributed={self.distributed}): the rebuilt update is averaged over "
                    "that group. HSDP (2-D meshes) is not supported with clip/drop; use "
                    "policy='monitor' there, or DDP (DistributedDataParallel).")
        if self.curvature is not None:
            raise NotImplementedError(
                "the curvature probe under FSDP (fully_shard) is not supported: its passes "
                "(double backward on a subset of examples) would run through FSDP's "
                "collectives. Probe a DDP or single-device copy of the model instead.")
        if self.save_every is not None:
            raise NotImplementedError(
                "save_every under FSDP (fully_shard) is not supported: the run directory "
                "would hold only the first rank's parameter shards. Checkpoint the model with "
                "torch.distributed.checkpoint and call guard.save_run(dir) on the first rank.")

    @staticmethod
    def _check_coverage(module: nn.Module, optimizer: Optimizer,
                        guarded: list[nn.Parameter]) -> None:
        """Every parameter the optimizer updates is guarded, or say why not."""
        names = {id(p): n for n, p in module.named_parameters()}
        covered = {id(p) for p in guarded}
        foreign, unguarded = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    foreign.append(tuple(p.shape))
                elif id(p) not in covered and p.requires_grad:
                    # (frozen ones get no gradient: the optimizer leaves them alone)
                    unguarded.append(names[id(p)])
        if foreign:
            sharded = any(is_sharded(p) for p in module.parameters())
            raise ValueError(
                f"the optimizer updates {len(foreign)} parameter(s) that are not the model's "
                f"(shapes {foreign[:5]}): an optimizer over a different model, or a head "
                "outside the module passed to make_guarded. Pass the whole model as module= "
                "and an optimizer over its parameters."
                + (" Under fully_shard, build the optimizer after sharding (fully_shard "
                   "replaces the parameters)." if sharded else ""))
        if unguarded:
            raise ValueError(
                f"the optimizer updates parameters gradguard does not guard: {unguarded[:10]} "
                "(frozen when the guard was attached, or left out by params=). They would "
                "keep learning from dropped examples. Guard them (drop params=, unfreeze "
                "before make_guarded) or leave them out of the optimizer.")

    def _open_sink(self) -> None:
        if self.log_dir is None or not self.source.is_main:
            return
        from .tensorboard import TensorBoardSink

        self.sink = TensorBoardSink(self.log_dir, top_k=self.top_k)
        lam_text = (f"relative: λ = {self.lam:g}·trace(K)/B" if self.relative_lam
                    else f"absolute: λ = {self.lam:g}")
        self.sink.log_text("config", f"policy={self.policy}; {lam_text}; threshold="
                           f"{self.threshold}; budget={self.budget}; "
                           f"loss_reduction={self.loss_reduction}. {BOUND_ASSUMPTIONS}"
                           + self._dp_note(), 0)

    @staticmethod
    def _check_opacus(optimizer, loss_reduction: str) -> None:
        if optimizer.loss_reduction != loss_reduction:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} contradicts the Opacus optimizer's "
                f"loss_reduction={optimizer.loss_reduction!r}; pass the same value to both.")

    @staticmethod
    def _expected_batch_size(optimizer, data_loader) -> tuple[int | None, bool]:
        """The loader's batch size, and whether batches are Poisson-sampled."""
        if getattr(optimizer, "expected_batch_size", None):
            return int(optimizer.expected_batch_size), True
        if data_loader is None:
            return None, False
        sampler = data_loader.batch_sampler
        if getattr(sampler, "sample_rate", None) is not None:  # Opacus Poisson sampling
            return max(1, round(sampler.sample_rate * len(data_loader.dataset))), True
        return data_loader.batch_size or getattr(sampler, "batch_size", None), False

    def set_batch_indices(self, indices) -> None:
        """Dataset indices of the examples behind the next step (when there is no loader)."""
        self._manual_indices = torch.as_tensor(indices, dtype=torch.long)

    # ------------------------------------------------------------------ step observer
    def on_zero_grad(self, optimizer: GuardedOptimizer) -> None:
        """The loop cleared the gradients: forget the captures of the last step."""
        if self.source is not None:
            self.source.clear()

    def on_micro_step(self, optimizer: GuardedOptimizer) -> None:
        """A virtual (skipped) step: keep what is needed for the logical batch's GNQ."""
        self.source.micro_step()

    def after_step(self, optimizer: GuardedOptimizer) -> None:
        """The wrapped optimizer stepped (or the guard took the step without it)."""
        self.source.clear()
        self._run_probe()
        if self.save_every is not None and self.step % self.save_every == 0 and \
                self.source.is_main:
            # After the optimizer's step: the saved model is the one this step produced.
            self.save_run(self.log_dir, hparams=self.hparams())

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
        if self.grad_scaler is not None:
            # Batches whose step the GradScaler skipped (inf/NaN) never reached the guard;
            # their gradients were cleared by zero_grad(). Forget them: oldest first.
            extra = sum(len(b) for b in self.loader.consumed) - batch
            if extra > 0:
                self.loader.discard_oldest(extra)
        return self.loader.take(batch, device=device)

    def _check_accumulation(self, optimizer: GuardedOptimizer) -> None:
        """Warn once when several micro-batches reach one step with accumulation_steps=1
        (virtual steps, ``signal_skip_step``, declare their convention themselves)."""
        if (self.accumulation_steps == 1 and not self._warned_accumulation
                and optimizer.accumulated_iterations == 1
                and self.loader is not None and len(self.loader.consumed) > 1
                and self.source.name == "hooks"):
            self._warned_accumulation = True
            warnings.warn(
                f"{len(self.loader.consumed)} batches reached one optimizer step (gradient "
                "accumulation): gradguard takes each micro-batch's loss to be its own mean "
                f"(loss_reduction={self.loss_reduction!r}). If you divide each micro-batch's "
                "loss by the number of accumulation steps N, pass accumulation_steps=N to "
                "make_guarded, or GNQ is N² too large.", stacklevel=5)

    def _skip_or_raise(self, optimizer: GuardedOptimizer, message: str) -> bool:
        """``on_nonfinite``: skip the step (returns False) or raise ``message``."""
        if self.on_nonfinite == "skip":
            self.skipped_nonfinite += 1
            if self.sink is not None:
                self.sink.log_scalars({TAGS["skipped_nonfinite"]: self.skipped_nonfinite},
                                      self.step)
            optimizer.original_optimizer.zero_grad(set_to_none=True)
            self.source.clear()
            return False
        raise NonFiniteGradientError(
            f"step {self.step + 1}: {message} Lower the learning rate or fix the data, or "
            "pass on_nonfinite='skip' to GradGuard to skip such steps.")

    def _nonfinite(self, K: torch.Tensor, indices: torch.Tensor, *,
                   values: tuple[torch.Tensor, ...] = (),
                   optimizer: GuardedOptimizer | None = None) -> str | None:
        """``None`` when the step is finite, else what is not (or raise, see below).

        One host synchronisation when all is well: a single read-back of whether the Gram
        ``K``, the ``values`` solved from it (GNQ, NaN where K + λI did not factorise) and,
        with ``optimizer``, the gradients about to be applied are all finite. Only a step
        that fails reads more back, to say what failed.

        Raises:
            ValueError: K is finite but the values solved from it are not: K + λI did not
                factorise (K is no positive semi-definite Gram).
        """
        params = [p for p in optimizer.params if p.grad is not None] \
            if optimizer is not None else []
        flags = [torch.isfinite(K).all(), *(torch.isfinite(v).all() for v in values)]
        if params:
            # A tensor's sum is NaN/Inf when any entry is (or when finite entries sum past
            # the dtype's range, which such an update would be no better off with); a sum
            # is 20× cheaper than isfinite(g).all() or an inf-norm on CPU.
            # (each rank checks its own shard of a sharded gradient; agree() pools them)
            sums = torch.isfinite(torch.stack([_local(p.grad).sum().to(K.device)
                                               for p in params]))
            flags.append(sums.all())
        if self.source.agree(bool(torch.stack(flags).all())):
            return None
        # ---- a failed step: every rank gets here together and asks the same questions.
        if not self.source.agree(bool(flags[0])):
            bad = indices[~torch.isfinite(torch.diagonal(K)).to(indices.device)].tolist()[:20]
            empty = " The batch was empty: the mean loss of an empty batch is NaN (Poisson " \
                    "sampling draws empty batches); skip empty batches in the loop or use " \
                    "loss_reduction='sum'." if K.shape[0] == 0 else ""
            return (f"the loss or per-example gradients are NaN/Inf (dataset indices {bad})."
                    f"{empty}")
        if not self.source.agree(all(bool(f) for f in flags[1:1 + len(values)])):
            raise ValueError(
                "the per-example gradient Gram K is finite but K + λI does not factorise: K is "
                "not positive semi-definite beyond rounding, so GNQ would come out negative "
                "or infinite. Check how K was formed, raise λ, or use gram_dtype=torch.float64.")
        names = {id(p): n for n, p in unwrap_ddp(self.module).named_parameters()}
        where = [names.get(id(p), f"param {i}") for i, p in enumerate(params)
                 if not bool(sums[i])][:10]
        return (f"the gradients about to be applied are NaN/Inf in {where}, while every "
                "guarded per-example gradient is finite: the NaN/Inf comes from a loss term "
                "outside the guarded layers (e.g. a penalty on the parameters) or from a "
                "change to .grad between backward() and step().")

    def _denominator(self, optimizer: GuardedOptimizer, batch: int) -> float:
        """B of the update Σ_j w_j g_j / B: 1 for sum losses; else the scale ``.grad``
        already has (a short last batch: its own size), the expected size under Poisson
        sampling, virtual steps or DDP."""
        if self.loss_reduction == "sum":
            return 1.0
        expected = optimizer.expected_batch_size
        if getattr(optimizer, "poisson_sampling", False) or optimizer.accumulated_iterations > 1 \
                or self.source.distributed:
            # (under DDP each rank's update is averaged over the ranks afterwards: every
            # rank divides by the same expected size, as the single-process reference)
            return float(expected or max(1, batch))
        scale = self.source.backward_scale() if self.source.name == "hooks" \
            else None
        if scale is not None:
            return float(scale)
        if expected is None or batch < expected:
            return float(max(1, batch))
        return float(expected)

    @torch.no_grad()
    def on_step(self, optimizer: GuardedOptimizer) -> bool:
        """Measure, decide, apply; record when the step goes ahead.

        Returns:
            Whether the wrapped optimizer should step (``False``: the step is skipped for
            NaN/Inf, or no example is kept).
        """
        start = time.perf_counter()
        # ---- measure
        K = self.source.gram()
        B = K.shape[0]
        device = self.ledger.device
        self._check_accumulation(optimizer)
        indices = self._indices_for(B, device)
        if B == 0 and not self.source.distributed:  # under DDP the other ranks still need this one
            return self._empty_step(optimizer, device)
        # The finiteness of K is read back once per step: under monitor together with GNQ
        # and the gradients, at the end (no host sync before it); a policy, or Opacus's
        # validated raw-Gram solve, reads GNQ on the host, so K is checked before.
        checked_early = self.rule.acts or self.source.name == "opacus"
        if checked_early:
            message = self._nonfinite(K, indices)
            if message is not None:
                return self._skip_or_raise(optimizer, message)
        K_local, local_indices = K, indices
        # own: this rank's examples in the global batch; rows: those K (hence the policy)
        # covers. From here on gnq, indices, weights span the global batch on every rank.
        shared = self.source.share_batch(K, indices)
        K, indices, own, rows = shared.K, shared.indices, shared.own, shared.rows
        self._loss_scale = 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            # The captures carry the loss scale S (scaler.scale(loss).backward()): K is S²
            # too large. Read the scale this backward used, never guess it: as the scaler's
            # own tensor where it has one (get_scale() reads it back to the host).
            scale = getattr(self.grad_scaler, "_get_scale_async", lambda: None)()
            self._loss_scale = float(self.grad_scaler.get_scale()) if scale is None \
                else scale.to(device=K.device, dtype=K.dtype)
            K = K / self._loss_scale ** 2
        if self.accumulation_steps > 1:
            # Micro-batch losses divided by N: the captures are g_j / N. (The rebuilt
            # update needs no factor: Σ_j w_j g_j / (N · micro-batch size) is what the
            # plain accumulated .grad holds.)
            K = K * float(self.accumulation_steps) ** 2
        lam, lam_logged = _ridge(K, self.lam, relative=self.relative_lam)
        gnq_raw = None
        if self.source.name == "opacus":
            # What is released: the clipped rows, with the Gaussian noise in the ridge.
            gnq_raw = gnq_from_gram(self.source.raw_gram,
                                    _ridge(self.source.raw_gram, self.lam,
                                           relative=self.relative_lam)[0])
            gnq_raw = self.source.share_rows(gnq_raw, own)
            noise_ridge = self.source.noise_ridge()
            lam, lam_logged = lam + noise_ridge, lam_logged + noise_ridge
        # (K was formed here from per-example gradients: a Gram by construction. GNQ is NaN
        # where K is not finite or K + λI does not factorise; checked before recording.)
        gnq = self.source.share_rows(gnq_from_gram(K, lam, validate=False), rows)
        if gnq_raw is None:  # nothing clipped: the raw GNQ is the one before the policy acts
            gnq_raw = gnq
        # ---- decide
        decision = self.rule.decide(K=K, gnq=gnq, lam=lam, indices=indices, ledger=self.ledger,
                                    rows=rows)
        weights, effective = decision.weights, decision.effective
        if self.source.name == "opacus" and self.rule.acts:
            # Exactly what Opacus releases once it clips the reweighted rows.
            effective = self.source.effective_gnq(weights, lam)
        weights = self.source.share_rows(weights, rows)
        effective = self.source.share_rows(effective, rows)
        # ---- apply
        kept_any = True
        # Virtual steps on a plain optimizer: the loop's zero_grad() cleared .grad between
        # micro-batches, so the logical batch's update is rebuilt from the captures.
        if self.rule.acts or (optimizer.accumulated_iterations > 1
                              and self.source.name == "hooks"):
            kept_any = self._apply(optimizer, weights[own])
        message = self._nonfinite(K_local, local_indices, values=(gnq, effective),
                                  optimizer=optimizer)
        if message is not None:
            return self._skip_or_raise(optimizer, message)
        # ---- record
        if decision.censor is not None:
            self.ledger.censor(indices, where=decision.censor)
        self.rule.commit(decision, gnq, weights)
        self.step += 1
        self.ledger.update(indices, effective, self.step, gnq_raw=gnq_raw)
        self._account(indices, weights, own)
        if self.budget is not None and self.rule.acts:
            # A hard cap: an example whose bound reached the budget is censored.
            self.ledger.censor(indices, where=self.ledger.bound(indices) >= self.budget)
        self.last_gnq, self.last_weights, self.last_indices = gnq, weights, indices
        self.last_gnq_raw = gnq_raw
        self.last_lam = lam_logged
        if self.sink is not None and self.step % self.log_every == 0:
            self._log_step()
        self.guard_seconds += time.perf_counter() - start
        if not kept_any:
            # Nothing kept: no optimizer step at all (no momentum, no Adam moments, no
            # decoupled weight decay), as if this batch had not been drawn.
            optimizer.original_optimizer.zero_grad(set_to_none=True)
            self.after_step(optimizer)
            return False
        return True

    def _empty_step(self, optimizer: GuardedOptimizer, device) -> bool:
        grads_finite = all(p.grad is None or bool(torch.isfinite(_local(p.grad)).all())
                           for p in optimizer.params)
        if not grads_finite:
            # (a 0×0 Gram cannot show it)
            return self._skip_or_raise(
                optimizer, "the batch was empty but the gradients are NaN/Inf (a term divided "
                "by the batch size is 0/0 on an empty batch; Poisson sampling draws empty "
                "batches). Skip empty batches in the loop, use loss_reduction='sum' "
                "semantics.")
        if self.rule.acts:
            self._apply(optimizer, torch.zeros(0, dtype=torch.float64, device=device))
        self.step += 1
        self._account(torch.zeros(0, dtype=torch.long, device=device), None)
        return True

    def _apply(self, optimizer: GuardedOptimizer, weights: torch.Tensor) -> bool:
        """Make the update Σ_j w_j g_j / B; returns whether any example is kept."""
        if self.source.name == "opacus":
            self.source.apply(weights, denom=1.0)
            return True
        denom = self._denominator(optimizer, weights.shape[0])
        if weights.shape[0] and bool((weights == 1).all()) and \
                optimizer.accumulated_iterations == 1 and not self.source.distributed:
            # Nothing reweighted: .grad already is the update, exactly (a short batch is
            # divided by its own size). Under Poisson sampling only the scale changes.
            scale = self.source.backward_scale()
            if scale is not None and scale != denom:
                for p in self.source.guarded_params():
                    if p.grad is not None:
                        p.grad.mul_(scale / denom)
            return True
        if (optimizer.step_hook is None and not self._warned_modified
                and self.grad_scaler is None  # its unscale_ is accounted for below
                and not self.source.distributed  # DDP's reducer writes .grad itself
                and optimizer.accumulated_iterations == 1 and self.source.grads_modified()):
            self._warned_modified = True
            warnings.warn(
                "the gradients were modified between backward() and step() (e.g. by "
                "clip_grad_norm_ or GradScaler.unscale_). Under policy="
                f"{self.policy!r} gradguard rebuilds them from the captured per-example "
                "gradients, so that modification is not applied. Re-apply it to the "
                "rewritten gradients in optimizer.step_hook (called after the policy, "
                "before the step), or use Opacus for a bounded update norm (make_guarded "
                "accepts a DPOptimizer).", stacklevel=5)
        # Rebuilt from the scaled captures, divided by the loss scale: unscaled, as the
        # gradients the scaler unscaled (never a mix of the two).
        self.source.apply(weights, denom=denom * self._loss_scale)
        if self.source.distributed:
            return True  # the ranks step together, whatever this rank's share kept
        return not weights.shape[0] or bool((weights != 0).any())

    def _dp_note(self) -> str:
        if self.source.name != "opacus":
            return ""
        from .dp import INDIVIDUAL_EPS_NOTE, RELEASED_GNQ_NOTE

        return f" {RELEASED_GNQ_NOTE} {INDIVIDUAL_EPS_NOTE} δ={self.delta:g}."

    def _start_dp_accounting(self, optimizer, data_loader, expected, device) -> None:
        """Individual ε under DP-SGD (see :mod:`gradguard.dp`)."""
        from .dp import start_individual_accounting

        if self.source.distributed and self.rule.acts:
            raise NotImplementedError(
                "policies under Opacus with distributed training: the released GNQ of a "
                "reweighted, re-clipped batch is computed per rank only. Use "
                "policy='monitor', or a single process.")
        if self.source.distributed and self.source.sync.gnq_mode == "global":
            raise NotImplementedError(
                "distributed_gnq='global' under Opacus: the released GNQ is measured from each "
                "rank's clipped rows; use distributed_gnq='local' (an upper bound of the "
                "global-batch GNQ).")
        self._accountant = start_individual_accounting(
            self.source.release, num_examples=self.num_examples, data_loader=data_loader,
            expected_batch_size=expected, device=device)
        if float(optimizer.noise_multiplier) == 0:
            self.ledger.eps.fill_(math.inf)  # the clipped sum in the clear: no guarantee

    def _account(self, indices: torch.Tensor, weights: torch.Tensor | None,
                 own: slice = slice(None)) -> None:
        """Individual ε under DP-SGD: this step's released norms into the accountant."""
        if self._accountant is None:
            return
        ratios = None
        if indices.numel():
            ratios = self.source.release.released_ratios(
                None if weights is None else weights[own])
            # every rank accounts the global batch alike
            ratios = self.source.share_rows(ratios, own)
        self._accountant.step(indices, ratios)
        self.ledger.set_epsilon(self._accountant.epsilon(self.delta))

    def _log_step(self) -> None:
        stats = {"dropped_total": self.rule.dropped_total,
                 "clipped_total": self.rule.clipped_total}
        weights = None if self.policy == "monitor" else self.last_weights
        self.sink.log_step(self.step, gnq=self.last_gnq, weights=weights, ledger=self.ledger,
                           lam=self.last_lam, policy_stats=stats)
        from .dp import dp_scalars

        scalars = {TAGS["guard_seconds"]: self.guard_seconds}
        if self.rule.acts:
            scalars[TAGS["realised_rate"]] = self.rule.last_rate
        if self.source.name == "opacus":
            accountant = self._accountant
            scalars.update(dp_scalars(
                gnq_raw=self.last_gnq_raw,
                eps=self.ledger.eps if accountant is not None else None,
                eps_run=accountant.run_epsilon(self.delta) if accountant is not None else None))
        self.sink.log_scalars(scalars, self.step)
        self.sink.log_top_table(self.step, self.ledger)

    def _run_probe(self) -> None:
        if self.curvature is None:
            return
        # The probe's own forward and backward passes are not training steps.
        with self.source.paused() if self.source is not None else contextlib.nullcontext():
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
        rule = self.rule.state_dict()
        state = {
            "version": torch.tensor(_STATE_VERSION),
            "step": torch.tensor(self.step),
            "skipped_nonfinite": torch.tensor(self.skipped_nonfinite),
            "dropped_total": rule["dropped_total"],
            "clipped_total": rule["clipped_total"],
            "examples_total": rule["examples_total"],
            "ledger": self.ledger.state_dict(),
            "window": rule["window"],
        }
        if self.curvature is not None and hasattr(self.curvature, "state_dict"):
            state["curvature"] = self.curvature.state_dict()
        if self._accountant is not None:
            state["individual_rdp"] = self._accountant.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after ``make_guarded``).

        Everything is validated before anything is applied: a failed load leaves the guard
        as it was.

        Raises:
            RuntimeError: called before ``make_guarded``.
            TypeError / ValueError: the state is not a valid GradGuard state (names what).
        """
        if self.ledger is None:
            raise RuntimeError("call make_guarded before load_state_dict")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradGuard.state_dict(), got "
                            f"{type(state).__name__}")
        version = state.get("version")
        if not isinstance(version, torch.Tensor) or version.numel() != 1 or \
                int(version) != _STATE_VERSION:
            raise ValueError(f"unknown GradGuard state version {version!r}")
        counts = {}
        for key in ("step", "skipped_nonfinite"):
            v = state.get(key)
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.is_floating_point() \
                    or v.dtype == torch.bool or int(v) < 0:
                raise ValueError(f"state {key!r} must be an integer tensor >= 0, got {v!r}")
            counts[key] = int(v)
        for key in ("ledger", "window", "dropped_total", "clipped_total"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}: pass GradGuard.state_dict()")
        self.rule.check_state_dict(state)
        # The ledger validates itself into a scratch copy; applied only if all is well.
        scratch = DisclosureLedger(self.ledger.num_examples, device=self.ledger.device)
        scratch.load_state_dict(state["ledger"])
        for name, t in state["ledger"].items():
            # ε = +∞ is a value (no DP guarantee accounted); nothing else may be non-finite.
            bad = torch.isnan(t) | (t < 0) if name == "eps" else ~torch.isfinite(t)
            if t.is_floating_point() and bool(bad.any()):
                raise ValueError(f"state ledger field {name!r} holds NaN/Inf")
        # ---- apply: the probe first (it validates its own state and may refuse it),
        # then what was validated above, which cannot fail.
        rdp = state.get("individual_rdp")
        if rdp is not None and self._accountant is not None:
            self._accountant.check_state_dict(rdp)
        curvature = state.get("curvature")
        if curvature is not None and self.curvature is not None:
            self.curvature.load_state_dict(curvature)
        if rdp is not None and self._accountant is not None:
            self._accountant.load_state_dict(rdp)
        self.step = counts["step"]
        self.skipped_nonfinite = counts["skipped_nonfinite"]
        self.rule.load_state_dict(state, device=self.ledger.device)
        self.ledger.load_state_dict(state["ledger"])

    def resume(self, run_dir: str | None = None) -> int:
        """Load the run directory's last complete state (``save_every`` / ``close()``).

        Call after ``make_guarded``. With ``save_every`` the state file also holds the
        model's and the optimizer's state at the same step (one atomic file, so they
        always agree), and both are restored here; otherwise restore them yourself from a
        checkpoint of the same step. Then skip the batches of the steps already taken
        (:attr:`step` of them). TensorBoard steps logged after that state are purged, so a
        resumed run shows each step once.

        A run killed before its first save has no state: then nothing is loaded, the
        events it logged are purged, and 0 is returned (start from scratch).

        Raises:
            ValueError: the saved state is not valid (the guard is left untouched).

        Returns:
            The step resumed at.
        """
        run_dir = run_dir or self.log_dir
        if run_dir is None:
            raise ValueError("resume needs run_dir= (or log_dir= on the GradGuard)")
        try:
            state = rundir.load_state(run_dir)
        except FileNotFoundError:
            self._reopen_sink()
            return 0
        training = state.get("training")
        if training is not None:
            # Validated as a whole first (a scratch load), so a bad file changes nothing.
            scratch = self.state_dict()
            self.load_state_dict(state)
            try:
                unwrap_ddp(self.module).load_state_dict(training["model"])
                self.optimizer.original_optimizer.load_state_dict(training["optimizer"])
            except Exception:
                self.load_state_dict(scratch)
                raise
        else:
            self.load_state_dict(state)
        self._reopen_sink()
        return self.step

    def _reopen_sink(self) -> None:
        """Reopen TensorBoard purging the events logged after :attr:`step`."""
        if self.sink is not None:
            from .tensorboard import TensorBoardSink

            self.sink.close()
            self.sink = TensorBoardSink(self.log_dir, top_k=self.top_k,
                                        purge_step=self.step + 1)

    def summary(self) -> dict[str, Any]:
        """Plain-number summary of the run so far."""
        s = {k: float(v) for k, v in self.ledger.summary().items()}
        s.update(step=self.step, skipped_nonfinite=self.skipped_nonfinite,
                 dropped_total=float(self.rule.dropped_total),
                 clipped_total=float(self.rule.clipped_total),
                 realised_rate=self.rule.realised_rate,
                 guard_seconds=self.guard_seconds, probe_seconds=self.probe_seconds)
        if self._accountant is not None:
            s["eps_run_rdp"] = self._accountant.run_epsilon(self.delta)
        hooks = getattr(self.source, "hooks", None)
        if hooks is not None:  # GNQ of sketched layers is an estimate: say so with the numbers
            s["sketched_layers"] = len(hooks.sketched_layers)
        return s

    def hparams(self) -> dict[str, Any]:
        """The settings as plain values (TensorBoard hparams, ``summary.json``)."""
        return {"policy": self.policy, "lam": self.lam,
                "lam_mode": "relative" if self.relative_lam else "absolute",
                "threshold": None if self.threshold is None else str(self.threshold),
                "budget": self.budget,
                "strategy": self.strategy}

    def close(self) -> None:
        """Remove every hook, write the run directory, flush the logs. Idempotent.

        Logs a short summary to ``logging.getLogger("gradguard")`` at INFO.
        """
        if self._closed:
            return
        self._closed = True
        if self.source is not None:
            self.source.remove()
        if self.sink is not None:
            if self.last_gnq is not None and self.step % self.log_every != 0:
                self._log_step()
            hparams = self.hparams()
            try:
                self.sink.close(hparams=hparams)
                self.save_run(self.log_dir, hparams=hparams)
            except Exception as exc:  # noqa: BLE001 - never fail training at close
                warnings.warn(f"gradguard could not finish its run directory {self.log_dir}: "
                              f"{exc}", stacklevel=2)
        if self.ledger is not None:
            _LOG.info("%s", self._closing_summary())

    def _closing_summary(self) -> str:
        from .formatting import format_run_summary

        return format_run_summary(self.summary(), log_dir=self.log_dir)

    def save_run(self, run_dir: str, *, hparams: dict[str, Any] | None = None) -> None:
        """Write what ``gradguard report`` reads: ``gradguard_state.pt`` and ``summary.json``,
        each atomically (see :mod:`gradguard.rundir`).

        Only indices and numbers are written, never training examples.
        """
        history = [r.to_dict() if hasattr(r, "to_dict") else dict(r)
                   for r in getattr(self.curvature, "history", [])]
        doc = {"config": hparams or {}, "summary": self.summary(),
               "bound_assumptions": BOUND_ASSUMPTIONS, "curvature_history": history}
        state = self.state_dict()
        if self.save_every is not None:
            # Model and optimizer at the same step, in the same atomic file: a run killed
            # at any moment resumes from one consistent state (see resume()).
            state["training"] = {"model": unwrap_ddp(self.module).state_dict(),
                                 "optimizer": self.optimizer.original_optimizer.state_dict()}
        rundir.save_run(run_dir, state=state, summary=doc)

    def __enter__(self) -> GradGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the local shard of an FSDP DTensor gradient)."""
    return t.to_local() if is_sharded(t) else t


def _ridge(K: torch.Tensor, lam: float, *, relative: bool):
    """λ for Gram K, and the λ to report.

    Under relative λ a batch whose gradients are all zero has trace(K) = 0, hence λ = 0,
    and 0/0 GNQ. Such a batch discloses nothing: with K = 0 every λ > 0 gives GNQ 0 (and
    effective GNQ 0 whatever the policy's weights), so λ = 1 stands in for the solve,
    while the reported λ is the formula's 0.
    """
    resolved = resolve_lam(K, lam, relative=relative)
    if not relative:
        return resolved, resolved
    # On the device, without reading trace(K) back (no host sync).
    some = torch.diagonal(K).sum() > 0
    return torch.where(some, resolved, 1.0), torch.where(some, resolved, 0.0)
