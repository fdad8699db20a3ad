"""Hugging Face ``transformers.Trainer``: guard training with a Trainer subclass.

A ``TrainerCallback`` cannot change the loss or see the batch's dataset indices, so the
integration is a subclass, :class:`GradGuardTrainer`, used exactly like ``Trainer``:

- **loss**: GNQ needs each example's own loss, but most language-model losses average
  over all tokens of the batch (an example with more tokens weighs more). The trainer
  computes a per-example loss (:func:`per_example_loss`: an example's own mean token loss,
  or its classification/regression loss) and averages it over examples. For sequence
  classification this is the model's usual loss; for token-level heads it weighs every
  example equally, as DP-SGD does.
- **dataset indices** travel with the examples: the training dataset is wrapped so that
  each example carries its index under ``"gradguard_index"``, which the collator stacks
  and ``compute_loss`` removes before the forward pass. Any sampler, Accelerate's
  per-process sharding or ``even_batches`` padding keeps them right.
- **optimizer**: ``create_optimizer`` wraps the Trainer's optimizer (before Accelerate
  prepares it), so each optimizer step is measured and shaped. With a policy, HF's
  gradient-norm clipping (``max_grad_norm``) is applied again to the rewritten gradients.
- **checkpoints**: the guard's state is saved as ``gradguard_state.pt`` in every
  checkpoint directory and restored by ``train(resume_from_checkpoint=...)``.
- **logging**: TensorBoard, when ``log_dir`` is given to the guard (default: none;
  ``"auto"``: ``<output_dir>/gradguard``), from the main process only.

GNQ runs on gradguard's exact sequence kernels: ``nn.Linear`` over ``[B, T, d]`` uses the
sequence ghost kernel Σ_{t,s}(a_it·a_js)(δ_it·δ_js) (or materialises, whichever is
cheaper), ``nn.Embedding`` its index kernel, GPT-2's ``Conv1D`` the Linear kernel, and a
weight tied between the embedding and the LM head the ghost Gram of both uses with their
cross terms (or materialises, whichever is cheaper); layers with no ghost kernel
(LayerNorm) materialise their per-example gradients. ``trainer.guard.hooks.layer_routes()``
says which route each layer took.

Causal language models are recognised through their wrappers (peft, DDP,
``torch.compile``; :func:`is_causal_lm`), so their labels are shifted as the model's own
loss shifts them.

Gradient accumulation (``gradient_accumulation_steps=N``): the micro-batches of one
optimizer step form one logical batch, as in a plain loop with ``accumulation_steps=N``;
the Trainer's ``loss / N`` is undone in GNQ (for the shorter last window of an epoch,
with that window's own N).

Metrics: every training log of the Trainer (``logging_steps``) also carries the last
guarded step's ``gradguard/gnq/{mean,max}``, the run's ``gradguard/disclosure/{max,mean}``
and the policy's cumulative counts, so ``trainer.state.log_history`` and every
``report_to`` integration (W&B, MLflow, TensorBoard, ...) receive them.

Supported: fp32 or bf16 (``fp16=True`` is refused until its GradScaler path is
verified on a GPU);
single process or DDP (``torchrun``), where the ranks agree as described in
:mod:`gradguard.distributed`.

Requires ``pip install -e ".[huggingface]" from a gradguard checkout``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradguard.integrations.huggingface needs transformers: "
                      "pip install -e '.[huggingface]' from a gradguard checkout") from exc

from .._io import atomic_torch_save
from ..engine import GradGuard
from ..optimizer import GuardedOptimizer
from ..rundir import STATE_FILE, load_state
from ._common import IndexedGuardedOptimizer, step_metrics

__all__ = ["GradGuardTrainer", "per_example_loss", "base_model", "is_causal_lm", "INDEX_KEY",
           "STATE_FILE"]

#: Key under which each training example carries its dataset index through the collator.
INDEX_KEY = "gradguard_index"
#: File the guard's state is saved to in each checkpoint directory.


def base_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: DDP / DataParallel (``.module``), ``torch.compile``
    (``._orig_mod``) and peft (``get_base_model()``), in any nesting.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> base_model(torch.nn.DataParallel(net)) is net
        True
    """
    for _ in range(16):  # wrappers nest a few levels at most; never loop forever
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (through its wrappers, see :func:`base_model`) is a causal language
    model of ``transformers``, whose labels must be shifted by one position.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
        >>> is_causal_lm(torch.nn.DataParallel(gpt2)), is_causal_lm(torch.nn.Linear(2, 2))
        (True, False)
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(base_model(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, causal_lm: bool = False,
                     problem_type: str | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Each example's own loss, ``[B]``, for the common Hugging Face heads.

    Args:
        logits: ``[B, C]`` (sequence classification / regression) or ``[B, T, V]``
            (token classification, language modelling).
        labels: ``[B]`` / ``[B, C]`` (multi-label) or ``[B, T]``.
        causal_lm: shift so position t predicts token t + 1 (causal language models).
        problem_type: the config's ``problem_type`` (``"regression"``,
            ``"single_label_classification"``, ``"multi_label_classification"``);
            ``None`` infers it as ``transformers`` does.
        ignore_index: label value of positions that do not count (padding).

    Returns:
        ``[B]`` per-example losses: cross-entropy, mean squared error, or the mean of the
        example's own token losses over its counted tokens.

    Raises:
        ValueError: shapes that match none of these heads.

    Example:
        >>> per_example_loss(torch.zeros(2, 3), torch.tensor([0, 2]))
        tensor([1.0986, 1.0986])
    """
    if logits.dim() == 3:
        if causal_lm:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"token-level labels must be [B, T] like logits {tuple(logits.shape)}"
                             f", got {tuple(labels.shape)}")
        tokens = F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none",
                                 ignore_index=ignore_index)
        counted = (labels != ignore_index).sum(1).clamp(min=1)
        return tokens.sum(1) / counted
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C] or [B, T, V], got {tuple(logits.shape)}; pass "
                         "GradGuardTrainer(per_example_loss_fn=...) for this head")
    if problem_type is None:
        if logits.shape[1] == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return F.mse_loss(logits.float().reshape(labels.shape[0], -1),
                          labels.float().reshape(labels.shape[0], -1),
                          reduction="none").mean(1)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.reshape(-1), reduction="none")
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                                  reduction="none").mean(1)
    raise ValueError(f"unknown problem_type {problem_type!r}")


class _IndexedDataset(Dataset):
    """A map-style dataset of dict examples whose examples also carry their index."""

    def __init__(self, dataset, key: str):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"GradGuardTrainer needs training examples that are dicts (as Trainer "
                f"datasets usually are), got {type(item).__name__}; wrap the dataset so "
                "__getitem__ returns {'input_ids': ..., 'labels': ...}")
        if self.key in item:
            raise ValueError(f"the training examples already have a {self.key!r} key")
        return {**item, self.key: int(index)}


class _IndexCollator:
    """Takes the indices out of the features, collates the rest, adds them back stacked."""

    def __init__(self, collator: Callable, key: str):
        self.collator = collator
        self.key = key

    def __call__(self, features: list[dict]) -> dict:
        indices = [f[self.key] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch[self.key] = torch.tensor(indices, dtype=torch.long)
        return batch


class GradGuardTrainer(Trainer):
    """A ``transformers.Trainer`` whose training is guarded by a :class:`~gradguard.GradGuard`.

    Args:
        *args: ``Trainer`` arguments.
        guard: the GradGuard (default: ``GradGuard(policy="monitor")``). Under a
            multi-process run its ``distributed`` defaults to ``True``; ``log_dir="auto"``
            logs to ``<args.output_dir>/gradguard``.
        per_example_loss_fn: ``fn(outputs, labels) -> [B]`` each example's own loss
            (default: :func:`per_example_loss` on ``outputs.logits``).
        loss_reduction: how the per-example losses reduce into the training loss,
            ``"mean"`` (default) or ``"sum"``.
        guarded_params: restrict the guarded parameters (default: every trainable one).
        **kwargs: ``Trainer`` keyword arguments.

    Attributes:
        guard: the GradGuard; ``trainer.guard.ledger`` fills during ``train()``.

    Raises:
        ValueError: fp16 training, FSDP, or a bad ``loss_reduction``.

    Example:
        >>> trainer = GradGuardTrainer(model=model, args=args,            # doctest: +SKIP
        ...                            train_dataset=train, guard=gg.GradGuard(policy="monitor"))
        >>> trainer.train()                                               # doctest: +SKIP
        >>> trainer.guard.ledger.top(5)                                   # doctest: +SKIP
    """

    def __init__(self, *args, guard: GradGuard | None = None,
                 per_example_loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
                 loss_reduction: str = "mean",
                 guarded_params: Iterable[nn.Parameter] | None = None, **kwargs):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how the per-example "
                             f"losses reduce), got {loss_reduction!r}")
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError("GradGuardTrainer does not support FSDP (its sharded gradients "
                             "cannot be measured per example yet). Use DDP (torchrun without "
                             "--fsdp) or one device.")
        if self.args.fp16:
            # On a GPU Accelerate scales the loss with a GradScaler (accelerator.scaler),
            # which the engine could read (make_guarded(grad_scaler=...)) as in a plain
            # loop; that path is unverified (no GPU here; on CPU Accelerate runs fp16=True
            # in fp32), so it is refused rather than trusted.
            raise ValueError("GradGuardTrainer does not support fp16=True yet (its GradScaler "
                             "path is unverified on GPU). Use bf16=True or fp32, or GradGuard "
                             "in a plain loop with make_guarded(grad_scaler=...).")
        self.guard = guard if guard is not None else GradGuard(policy="monitor")
        self.per_example_loss_fn = per_example_loss_fn
        self.loss_reduction = loss_reduction
        self.guarded_params = None if guarded_params is None else list(guarded_params)
        self._guarded_optimizer: IndexedGuardedOptimizer | None = None
        # compute_loss below returns a plain per-batch mean of per-example losses.
        self.model_accepts_loss_kwargs = False

    # ------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_KEY not in self._signature_columns:
            self._signature_columns.append(INDEX_KEY)  # survive unused-column removal

    def get_train_dataloader(self):
        dataset, collator = self.train_dataset, self.data_collator
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or \
                not hasattr(dataset, "__getitem__"):
            raise TypeError("GradGuardTrainer tracks examples by dataset index and needs a "
                            "map-style train_dataset (with __len__ and __getitem__)")
        self.train_dataset = _IndexedDataset(dataset, INDEX_KEY)
        self.data_collator = _IndexCollator(collator, INDEX_KEY)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.guard.module is not None:  # a later train() call: already guarded
            return optimizer
        guard = self.guard
        changes = {}
        if guard.distributed is None and self.args.world_size > 1:
            changes["distributed"] = True  # Accelerate wraps the model after this point
        log_dir = guard.log_dir
        if log_dir == "auto":
            base = getattr(self.args, "logging_dir", None) or self.args.output_dir
            log_dir = os.path.join(base, "gradguard")
        if log_dir is not None and not self.args.should_log:
            log_dir = None
        if log_dir != guard.log_dir:
            changes["log_dir"] = log_dir
        if guard.num_examples is None:
            changes["num_examples"] = len(self.train_dataset)
        guard.replace_config(**changes)
        guard.make_guarded(module=self.model, optimizer=optimizer,
                           loss_reduction=self.loss_reduction, params=self.guarded_params)
        # Collects the indices of every micro-batch of a gradient-accumulation window.
        guarded = IndexedGuardedOptimizer(optimizer, guard=guard, expected_batch_size=None,
                                          loss_reduction=self.loss_reduction)
        guard.attach_optimizer(guarded, expected_batch_size=self._train_batch_size)
        self._guarded_optimizer = guarded
        if self.args.max_grad_norm and self.args.max_grad_norm > 0 and guard.policy != "monitor":
            guarded.step_hook = self._clip_rewritten
        self.optimizer = guarded
        return guarded

    def _clip_rewritten(self, optimizer: GuardedOptimizer) -> None:
        # The Trainer clipped the gradient norm before optimizer.step(); the policy then
        # replaced the gradients, so clip what will actually be applied.
        torch.nn.utils.clip_grad_norm_(optimizer.params, self.args.max_grad_norm)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        indices = inputs.pop(INDEX_KEY, None)
        labels = None
        for name in self.label_names or ["labels"]:
            if name in inputs:
                labels = inputs.pop(name)
                break
        if labels is None:
            raise ValueError("GradGuardTrainer computes each example's loss from the labels; "
                             f"the batch has none (keys: {sorted(inputs)})")
        self._expand_positions(model, inputs)
        outputs = model(**inputs)
        if self.per_example_loss_fn is not None:
            losses = self.per_example_loss_fn(outputs, labels)
        else:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            losses = per_example_loss(logits, labels, causal_lm=self._is_causal_lm(model),
                                      problem_type=self._problem_type(model))
        if indices is not None and model.training and torch.is_grad_enabled() \
                and self._guarded_optimizer is not None:
            self._guarded_optimizer.add_indices(indices)
            self.guard.accumulation_steps = self._loss_divisor()
        loss = losses.mean() if self.loss_reduction == "mean" else losses.sum()
        return (loss, outputs) if return_outputs else loss

    def _loss_divisor(self) -> int:
        """N in the ``loss / N`` the Trainer's training_step applies under gradient
        accumulation (the number of micro-batches of this window; the last window of an
        epoch may be shorter), or 1 where it does not divide."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # as training_step decides (model_accepts_loss_kwargs is False)
            scaled = getattr(self, "compute_loss_func", None) is not None
        return 1 if scaled else int(getattr(self, "current_gradient_accumulation_steps", 1))

    def _unwrapped(self, model) -> nn.Module:
        return base_model(self.accelerator.unwrap_model(model))

    def _expand_positions(self, model, inputs: dict) -> None:
        # Left to themselves, most models build position_ids as [1, T] and let the position
        # embedding's output broadcast over the batch: its gradient then arrives already
        # summed over examples, and per-example gradients are lost. The same positions,
        # spelled out per example, keep them apart (the forward pass is unchanged).
        ids = inputs.get("input_ids")
        if ids is None or ids.dim() != 2 or "position_ids" in inputs:
            return
        if "position_ids" not in inspect.signature(self._unwrapped(model).forward).parameters:
            return
        inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def _is_causal_lm(self, model) -> bool:
        return is_causal_lm(self._unwrapped(model))

    def _problem_type(self, model) -> str | None:
        config = getattr(self._unwrapped(model), "config", None)
        return getattr(config, "problem_type", None)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """``Trainer.log``; the training logs (those with ``"loss"``) also carry the last
        guarded step's GNQ and the run's disclosure (:func:`step_metrics` of
        :mod:`gradguard.integrations._common`: ``gradguard/gnq/mean``, ``gnq/max``,
        ``disclosure/{max,mean}``, ``policy/{dropped,clipped,censored}_total``), so
        ``state.log_history`` and every ``report_to`` logger (W&B, MLflow, ...) get them."""
        if "loss" in logs and self.guard.ledger is not None:
            logs = {**logs, **step_metrics(self.guard)}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.guard.ledger is not None and self.args.should_save:
            atomic_torch_save(self.guard.state_dict(), os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.guard.ledger is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            self.guard.load_state_dict(load_state(path))

    # ------------------------------------------------------------------ the end
    def train(self, *args, **kwargs):
        """``Trainer.train``; afterwards the guard is closed (hooks removed, logs flushed)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.guard.module is not None:
                self.guard.close()
