"""Canaries for one-run privacy auditing (Steinke, Nasr & Jagielski, 2023), torch only.

:class:`Canaries` holds m canary examples and one fair coin per canary (seeded). The
included ones are appended to a training set by :meth:`Canaries.training_set`; after
training (or every ``every`` steps, as a probe) :meth:`Canaries.audit` scores all m
canaries from the released model and turns the guesses into an ε lower bound with
:func:`~gradguard.audit.one_run.one_run_epsilon`. No shadow models are needed.

Scores must be computed from what training released (the model), never from the coins or
from training-time records: the ledger's GNQ, for example, exists only for examples that
were trained on, so "has a GNQ record" would reveal the coin itself and the bound would
certify nothing. That is why the scores here are black-box losses (optionally calibrated
by a reference model that never saw the canaries, such as the initial weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradguard.audit.one_run import one_run_epsilon

__all__ = ["CanaryDataset", "Canaries"]

EPS_TAG = "gradguard/audit/eps_lower_bound"


class CanaryDataset(Dataset):
    """A training set followed by the included canaries.

    Index ``i < len(base)`` is ``base[i]`` unchanged (so ledger and sampler indices of the
    original examples stay what they were); index ``len(base) + j`` is the j-th *included*
    canary, in canary order (:attr:`Canaries.train_indices` maps canaries to these indices).
    Canary items are ``(x, y)`` pairs, so ``base`` must yield ``(x, y)`` too.
    """

    def __init__(self, base: Dataset, inputs: Tensor, labels: Tensor) -> None:
        self.base = base
        self.inputs = inputs
        self.labels = labels
        self.base_length = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.base_length + self.inputs.shape[0]

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        if index < self.base_length:
            return self.base[index]
        j = index - self.base_length
        return self.inputs[j], self.labels[j]


class Canaries:
    """m canaries, each included in training by a seeded fair coin, and their audit.

    Build them with :meth:`mislabelled` (copies of real examples with a wrong label) or
    :meth:`out_of_distribution` (uniform-noise inputs with random labels), or pass your
    own inputs and labels. Gradient canaries are not offered.

    Args:
        inputs: ``[m, ...]`` canary inputs (floating point).
        labels: ``[m]`` canary labels (integers).
        seed: seeds the fair coins (a ``torch.Generator`` of its own, never the global RNG).
        k_plus: canaries guessed "in" (top scores); default ``max(1, m // 10)``. Fixed in
            advance, before any score is seen, or a grid (Bonferroni-corrected).
        k_minus: canaries guessed "out" (bottom scores); default ``max(1, m // 10)``.
        every: for :meth:`maybe_audit`, audit when ``step % every == 0`` (None: never).

    Attributes:
        included: ``[m]`` bool tensor, the coins (True = added to training).
        train_indices: ``[m]`` long tensor, the index of each canary in the dataset made
            by :meth:`training_set` (``-1`` for excluded ones).
        history: the results of every audit so far.

    Example:
        >>> x, y = torch.rand(40, 3), torch.randint(0, 4, (40,))
        >>> canaries = Canaries.mislabelled(x, y, m=20, num_classes=4, seed=0)
        >>> train = canaries.training_set(torch.utils.data.TensorDataset(x, y))
        >>> len(train) == 40 + int(canaries.included.sum())
        True
        >>> model = nn.Linear(3, 4)
        >>> sorted(canaries.audit(model))[:3]
        ['confidence', 'correct', 'delta']
    """

    def __init__(self, inputs: Tensor, labels: Tensor, *, seed: int = 0,
                 k_plus: int | Sequence[int] | None = None,
                 k_minus: int | Sequence[int] | None = None, every: int | None = None) -> None:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError("inputs must be a floating-point tensor [m, ...]")
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
            raise TypeError("labels must be a 1-D integer tensor [m]")
        if inputs.shape[0] != labels.shape[0] or inputs.shape[0] < 2:
            raise ValueError(f"need at least 2 canaries and one label each, got "
                             f"{inputs.shape[0]} inputs and {labels.shape[0]} labels")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"every must be None or an int >= 1, got {every!r}")
        self.inputs = inputs.detach().clone()
        self.labels = labels.detach().to(torch.long).clone()
        m = self.m
        default_k = max(1, m // 10)
        self.k_plus = default_k if k_plus is None else k_plus
        self.k_minus = default_k if k_minus is None else k_minus
        self.every = every
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.included = torch.randint(0, 2, (m,), generator=generator).bool()
        self.train_indices = torch.full((m,), -1, dtype=torch.long)
        self.history: list[dict[str, Any]] = []

    @property
    def m(self) -> int:
        """Number of canaries."""
        return int(self.inputs.shape[0])

    @classmethod
    def mislabelled(cls, x: Tensor, y: Tensor, *, m: int, num_classes: int, seed: int = 0,
                    **kwargs: Any) -> Canaries:
        """m copies of randomly chosen rows of ``(x, y)``, each with a uniformly drawn wrong label.

        Args:
            x: ``[N, ...]`` inputs to copy from (ideally examples *not* in the training set).
            y: ``[N]`` their labels.
            m: number of canaries (<= N).
            num_classes: number of classes (>= 2).
            seed: seeds the choice of rows, the wrong labels and the coins.
            **kwargs: ``k_plus``, ``k_minus``, ``every`` (see :class:`Canaries`).

        Returns:
            The canaries.
        """
        if not 2 <= m <= x.shape[0]:
            raise ValueError(f"m must be in [2, {x.shape[0]}] (rows available), got {m}")
        if num_classes < 2:
            raise ValueError("mislabelled canaries need num_classes >= 2")
        generator = torch.Generator().manual_seed(seed + 1)
        rows = torch.randperm(x.shape[0], generator=generator)[:m]
        # Adding 1..C-1 modulo C moves every label to a uniformly drawn *other* class.
        shift = torch.randint(1, num_classes, (m,), generator=generator)
        labels = (y[rows].to(torch.long).cpu() + shift) % num_classes
        return cls(x[rows].detach().cpu().float(), labels, seed=seed, **kwargs)

    @classmethod
    def out_of_distribution(cls, *, m: int, input_shape: Sequence[int], num_classes: int,
                            low: float = 0.0, high: float = 1.0, seed: int = 0,
                            **kwargs: Any) -> Canaries:
        """m uniform-noise inputs in ``[low, high)`` with uniformly random labels.

        Args:
            m: number of canaries.
            input_shape: shape of one input.
            num_classes: number of classes.
            low: smallest input value.
            high: largest input value.
            seed: seeds the inputs, the labels and the coins.
            **kwargs: ``k_plus``, ``k_minus``, ``every`` (see :class:`Canaries`).

        Returns:
            The canaries.
        """
        if not high > low:
            raise ValueError(f"need high > low, got low={low}, high={high}")
        generator = torch.Generator().manual_seed(seed + 1)
        inputs = torch.rand((m, *input_shape), generator=generator) * (high - low) + low
        labels = torch.randint(0, num_classes, (m,), generator=generator)
        return cls(inputs, labels, seed=seed, **kwargs)

    def training_set(self, dataset: Dataset) -> CanaryDataset:
        """``dataset`` followed by the included canaries (see :class:`CanaryDataset`).

        Args:
            dataset: the training set, yielding ``(x, y)``.

        Returns:
            The wrapped dataset; :attr:`train_indices` is updated to index into it.
        """
        chosen = torch.nonzero(self.included).flatten()
        wrapped = CanaryDataset(dataset, self.inputs[chosen], self.labels[chosen])
        self.train_indices = torch.full((self.m,), -1, dtype=torch.long)
        self.train_indices[chosen] = wrapped.base_length + torch.arange(chosen.numel())
        return wrapped

    def included_data(self) -> tuple[Tensor, Tensor]:
        """The included canaries' ``(inputs, labels)``, e.g. to append to tensors directly."""
        return self.inputs[self.included], self.labels[self.included]

    @torch.no_grad()
    def scores(self, model: nn.Module, *, reference: nn.Module | None = None,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
               batch_size: int = 256) -> Tensor:
        """Black-box membership scores of all m canaries: higher = more likely included.

        The score is −loss under ``model``; with ``reference`` (a model that never saw the
        canaries, e.g. the initial weights) it is the loss *decrease* reference − model,
        which removes how hard each canary is to begin with.

        Args:
            model: the trained model (evaluated in eval mode, restored after).
            reference: optional model whose per-canary loss is subtracted.
            loss_fn: per-example loss ``loss_fn(logits, y) -> [B]``; default cross-entropy.
            batch_size: canaries per forward pass.

        Returns:
            ``[m]`` float64 scores on the CPU.
        """
        scores = -self._losses(model, loss_fn, batch_size)
        if reference is not None:
            scores += self._losses(reference, loss_fn, batch_size)
        return scores

    def _losses(self, model: nn.Module, loss_fn, batch_size: int) -> Tensor:
        loss_fn = loss_fn or (lambda out, y: nn.functional.cross_entropy(out, y,
                                                                         reduction="none"))
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        was_training = model.training
        model.eval()
        try:
            losses = []
            for start in range(0, self.m, batch_size):
                x = self.inputs[start:start + batch_size].to(device, dtype)
                y = self.labels[start:start + batch_size].to(device)
                losses.append(loss_fn(model(x), y).detach().to("cpu", torch.float64))
        finally:
            model.train(was_training)
        return torch.cat(losses)

    def audit(self, model: nn.Module, *, reference: nn.Module | None = None,
              delta: float = 0.0, confidence: float = 0.95, writer: Any = None,
              step: int = 0, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
              ) -> dict[str, Any]:
        """Score the canaries and return the one-run ε lower bound.

        Args:
            model: the trained model.
            reference: optional reference model for calibrated scores (see :meth:`scores`).
            delta: δ of the audited (ε, δ) statement.
            confidence: probability that the bound holds.
            writer: optional TensorBoard ``SummaryWriter``; gets
                ``gradguard/audit/eps_lower_bound`` (and ``.../guesses``, ``.../correct``).
            step: the global step for the writer.
            loss_fn: per-example loss (default cross-entropy).

        Returns:
            :func:`~gradguard.audit.one_run.one_run_epsilon`'s dict plus ``step``.
        """
        result = one_run_epsilon(self.scores(model, reference=reference, loss_fn=loss_fn),
                                 self.included, k_plus=self.k_plus, k_minus=self.k_minus,
                                 delta=delta, confidence=confidence)
        result["step"] = int(step)
        if writer is not None:
            writer.add_scalar(EPS_TAG, result["eps_lower_bound"], step)
            writer.add_scalar("gradguard/audit/guesses", result["guesses"], step)
            writer.add_scalar("gradguard/audit/correct", result["correct"], step)
        self.history.append(result)
        return result

    def maybe_audit(self, step: int, model: nn.Module, **kwargs: Any) -> dict[str, Any] | None:
        """:meth:`audit` when ``every`` is set and ``step % every == 0``, else None.

        Each audit is a valid bound for the model released at that step; a reader who
        takes the largest over many steps must correct for that choice.
        """
        if self.every is None or step % self.every != 0:
            return None
        return self.audit(model, step=step, **kwargs)
