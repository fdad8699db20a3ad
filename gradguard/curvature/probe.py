"""A periodic input-curvature membership probe for use during training.

Curvature is non-stationary: it falls for every example as a model fits, and faster for
the examples it trains on. A single reading says little; the *gap* between training
examples (members) and held-out ones (non-members), tracked over training, is the
signal. :class:`CurvatureProbe` fixes one sample of each at construction and scores the
same examples at every probe, so its readings form a comparable time series.

The probe does no logging itself. GradGuard's engine calls :meth:`CurvatureProbe.maybe_run`
after each optimizer step and sends the :class:`ProbeResult` to its TensorBoard sink and
ledger; a plain training loop can do the same (see ``examples/curvature_probe.py``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradguard.audit.metrics import roc_auc, roc_auc_standard_error
from gradguard.curvature.estimators import ESTIMATORS, LossFn, input_curvature

__all__ = ["DIRECTIONS", "CurvatureProbe", "ProbeResult", "step_seed"]

DIRECTIONS: tuple[str, ...] = ("lower", "higher")

# Scalar fields of a ProbeResult that the history (and state_dict) keeps per probe.
_HISTORY_FLOATS = ("members_mean", "nonmembers_mean", "auc", "seconds")
_STATE_VERSION = 1


def step_seed(seed: int, step: int) -> int:
    """The seed of the generator the probe uses at ``step``: a hash of ``(seed, step)``.

    NumPy's ``SeedSequence`` mixes the pair, so nearby ``(seed, step)`` pairs give
    unrelated streams and a run is reproducible probe by probe.

    Args:
        seed: the probe's seed (``>= 0``).
        step: the training step (``>= 0``).

    Returns:
        An int in ``[0, 2**63)`` for ``torch.Generator.manual_seed``.
    """
    words = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@dataclass(eq=False)
class ProbeResult:
    """One probe: the curvature of the fixed member and non-member samples at one step.

    Attributes:
        step: the training step the probe ran at.
        estimator: ``"hutchinson"``, ``"fd"`` or ``"zo"``.
        direction: ``"lower"`` (the attack calls low curvature "member") or ``"higher"``.
        member_indices: LongTensor of indices into the probe's ``members`` dataset.
        nonmember_indices: LongTensor of indices into its ``nonmembers`` dataset.
        member_scores: curvature of each sampled member (CPU tensor, same order).
        nonmember_scores: curvature of each sampled non-member (CPU tensor).
        members_mean: mean member curvature.
        nonmembers_mean: mean non-member curvature.
        auc: membership AUC of the attack score ``−curvature`` (direction ``"lower"``) or
            ``+curvature`` (``"higher"``). The direction is fixed in advance, never
            picked after seeing the data, so ``auc < 0.5`` means the *other* direction
            separates. NaN if some score was not finite.
        seconds: wall time of the probe (data transfer, scoring and the AUC).
        auc_se: DeLong standard error of ``auc`` over the sampled examples
            (:func:`~gradguard.audit.metrics.roc_auc_standard_error`); ``auc ± 1.96·auc_se``
            is an approximate 95% interval. NaN where ``auc`` is.
    """

    step: int
    estimator: str
    direction: str
    member_indices: Tensor
    nonmember_indices: Tensor
    member_scores: Tensor
    nonmember_scores: Tensor
    members_mean: float
    nonmembers_mean: float
    auc: float
    seconds: float
    auc_se: float = math.nan

    @property
    def sign(self) -> int:
        """``-1`` for direction ``"lower"``, ``+1`` for ``"higher"``."""
        return -1 if self.direction == "lower" else 1

    def attack_scores(self) -> tuple[Tensor, Tensor]:
        """Membership attack scores (higher = more likely a member), members then non-members.

        Returns:
            ``(member_attack, nonmember_attack)``: ``sign · curvature``.
        """
        return self.sign * self.member_scores, self.sign * self.nonmember_scores

    def labels_and_attack_scores(self) -> tuple[Tensor, Tensor]:
        """Labels (1 = member, 0 = non-member) and attack scores, concatenated.

        Returns:
            ``(labels, scores)``, both 1-D of length ``n_members + n_nonmembers``.
        """
        member_attack, nonmember_attack = self.attack_scores()
        labels = torch.cat([torch.ones(len(member_attack), dtype=torch.long),
                            torch.zeros(len(nonmember_attack), dtype=torch.long)])
        return labels, torch.cat([member_attack, nonmember_attack])

    def pr_curve_inputs(self) -> tuple[Tensor, Tensor]:
        """Labels and attack scores mapped to ``[0, 1]``, for ``SummaryWriter.add_pr_curve``.

        TensorBoard thresholds predictions on a grid over ``[0, 1]``; the attack scores are
        rank-normalised (average ranks for ties), a monotone map that preserves the attack's
        precision-recall trade-off whatever the curvature's scale.

        Returns:
            ``(labels, predictions)``: LongTensor of 0/1 and float64 tensor in ``[0, 1]``.
        """
        from scipy.stats import rankdata

        labels, scores = self.labels_and_attack_scores()
        ranks = rankdata(scores.to(torch.float64).numpy(), method="average")
        n = len(ranks)
        predictions = (ranks - 1) / (n - 1) if n > 1 else np.full(n, 0.5)
        return labels, torch.from_numpy(np.asarray(predictions, dtype=np.float64))

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields (plus sample sizes), for logs, tables and the history."""
        return {
            "step": self.step,
            "estimator": self.estimator,
            "direction": self.direction,
            "members_mean": self.members_mean,
            "nonmembers_mean": self.nonmembers_mean,
            "auc": self.auc,
            "auc_se": self.auc_se,
            "seconds": self.seconds,
            "n_members": len(self.member_scores),
            "n_nonmembers": len(self.nonmember_scores),
        }


class CurvatureProbe:
    """Score a fixed sample of members and non-members every ``every`` steps.

    At construction the probe draws, with its own generator seeded ``seed``, a sample of
    ``min(n_examples, len)`` indices from each dataset and reads those examples once (they
    stay in memory, never in logs or in :meth:`state_dict`). Each probe scores the same
    examples with :func:`~gradguard.curvature.estimators.input_curvature` in eval mode,
    using a fresh generator seeded :func:`step_seed` ``(seed, step)`` (never the global RNG),
    and computes the membership AUC for the chosen ``direction``.

    Pass the *training dataset itself* as ``members`` (not a shuffled copy or a subset
    built elsewhere), so that ``member_indices`` are the dataset indices GradGuard's ledger
    uses.

    The default estimator is ``"zo"``: forward passes only (``4·n_vectors`` per example,
    batched), so it needs no double-backward support from the model's ops and no autograd
    graph memory, works under any op the forward works with, and is the black-box score
    with which Ravikumar et al. report their strongest membership results. ``"hutchinson"``
    (the trace itself) costs about as many passes but keeps a double-backward graph alive.

    Args:
        members: a ``Dataset`` of training examples returning ``(x, y, ...)``; ``x`` a float
            tensor, ``y`` an int or tensor. Extra fields are ignored.
        nonmembers: held-out examples from the same distribution, same format.
        every: probe when ``step % every == 0``, step 0 included (a pre-training baseline,
            where the AUC should be near 0.5).
        n_examples: sample size per side; None scores every example of both datasets
            (each probe then costs in proportion). With the defaults (every 1000 steps,
            128 + 128 examples, ``"zo"`` with 10 vectors: 40 forward passes per example)
            probes took 3-7% of plain training time (an MLP and a CNN at batch size 128,
            2 CPU cores, benchmarks/run.py); every 500 steps would double that.
        estimator: ``"zo"`` (default), ``"hutchinson"`` or ``"fd"``.
        n_vectors: random vectors per example.
        h: perturbation size for ``"zo"`` and ``"fd"``.
        loss_fn: sum-semantics loss ``loss_fn(output, y)``; default cross-entropy.
        batch_size: examples scored at a time (bounds memory).
        seed: seeds the sample and, with the step, each probe's vectors.
        direction: ``"lower"`` (default: training points sit in flatter regions, so low
            curvature means member) or ``"higher"``. Fixed in advance.

    Raises:
        ValueError: on bad settings or an empty dataset.
        TypeError: if the datasets' inputs are not floating point.

    Example:
        >>> probe = CurvatureProbe(train_set, holdout_set, every=200)  # doctest: +SKIP
        >>> for step, (x, y) in enumerate(loader, start=1):             # doctest: +SKIP
        ...     ...; optimizer.step()
        ...     if (result := probe.maybe_run(step, model)) is not None:
        ...         print(result.to_dict())
    """

    def __init__(
        self,
        members: Dataset,
        nonmembers: Dataset,
        *,
        every: int = 1000,
        n_examples: int | None = 128,
        estimator: str = "zo",
        n_vectors: int = 10,
        h: float = 1e-3,
        loss_fn: LossFn | None = None,
        batch_size: int = 128,
        seed: int = 0,
        direction: str = "lower",
    ) -> None:
        self.every = _positive_int(every, "every")
        self.n_examples = None if n_examples is None else _positive_int(n_examples, "n_examples")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}: choose one of "
                             f"{', '.join(repr(e) for e in ESTIMATORS)}")
        self.estimator = estimator
        self.n_vectors = _positive_int(n_vectors, "n_vectors")
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) \
                or h <= 0:
            raise ValueError(f"h must be a finite number > 0, got {h!r}")
        self.h = float(h)
        self.loss_fn = loss_fn
        self.batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'lower' (low curvature means member) or "
                             f"'higher', got {direction!r}")
        self.direction = direction
        self.members = members
        self.nonmembers = nonmembers

        generator = torch.Generator().manual_seed(seed)
        self.member_indices = _sample_indices(_length(members, "members"), self.n_examples,
                                              generator)
        self.nonmember_indices = _sample_indices(_length(nonmembers, "nonmembers"),
                                                 self.n_examples, generator)
        self._load_examples()
        self.history: list[dict[str, Any]] = []
        self.last_result: ProbeResult | None = None

    def __repr__(self) -> str:
        return (f"CurvatureProbe(every={self.every}, estimator={self.estimator!r}, "
                f"n_vectors={self.n_vectors}, h={self.h}, direction={self.direction!r}, "
                f"members={len(self.member_indices)}, "
                f"nonmembers={len(self.nonmember_indices)}, probes={len(self.history)})")

    def _load_examples(self) -> None:
        mx, my = _gather(self.members, self.member_indices, "members")
        nx, ny = _gather(self.nonmembers, self.nonmember_indices, "nonmembers")
        if isinstance(mx, dict) or isinstance(nx, dict):  # token batches (Hugging Face style)
            if not (isinstance(mx, dict) and isinstance(nx, dict)) or mx.keys() != nx.keys() \
                    or any(mx[k].shape[1:] != nx[k].shape[1:] for k in mx):
                raise ValueError("members and nonmembers must both be dict examples with the "
                                 "same keys and shapes")
            self._x, self._y = {k: torch.cat([mx[k], nx[k]]) for k in mx}, None
            return
        if mx.shape[1:] != nx.shape[1:]:
            raise ValueError(f"members and nonmembers have inputs of different shapes "
                             f"{tuple(mx.shape[1:])} and {tuple(nx.shape[1:])}")
        self._x = torch.cat([mx, nx])
        self._y = torch.cat([my, ny])

    # ------------------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------------------

    def is_due(self, step: int) -> bool:
        """Whether :meth:`maybe_run` would run at ``step``."""
        step = _step(step)
        return step % self.every == 0 and all(r["step"] != step for r in self.history)

    def maybe_run(self, step: int, model: nn.Module) -> ProbeResult | None:
        """Run the probe if ``step % every == 0``, else return ``None``.

        Step 0 counts (a baseline before training). A step already in :attr:`history`
        is not probed again, so a run resumed from a checkpoint does not record its
        checkpoint step twice.

        Args:
            step: the number of optimizer steps taken so far.
            model: the model being trained (any device).

        Returns:
            The :class:`ProbeResult`, or ``None`` if no probe was due.
        """
        if not self.is_due(step):
            return None
        return self.run(model, step)

    def run(self, model: nn.Module, step: int) -> ProbeResult:
        """Score the fixed samples now and append the result to :attr:`history`.

        The examples go to the model's device (and floating dtype); the model runs in eval
        mode and its training flags, parameter ``.grad`` and the global RNG are left as
        they were.

        Args:
            model: the model to probe.
            step: the training step to record (also seeds this probe's vectors).

        Returns:
            The :class:`ProbeResult`.
        """
        step = _step(step)
        start = time.perf_counter()
        device, dtype = _model_device_dtype(model)
        if isinstance(self._x, dict):  # token ids etc.: device only, never a float cast
            x, y = {k: v.to(device) for k, v in self._x.items()}, None
        else:
            x = self._x.to(device=device, dtype=dtype or self._x.dtype)
            y = self._y.to(device)
        generator = torch.Generator(device=device).manual_seed(step_seed(self.seed, step))
        scores = input_curvature(
            model, x, y, estimator=self.estimator, n_vectors=self.n_vectors, h=self.h,
            loss_fn=self.loss_fn, generator=generator, chunk_size=self.batch_size,
        ).detach().to("cpu")
        n_members = len(self.member_indices)
        member_scores, nonmember_scores = scores[:n_members], scores[n_members:]
        sign = -1 if self.direction == "lower" else 1
        auc_se = float("nan")
        if torch.isfinite(scores).all():
            auc = roc_auc(sign * member_scores, sign * nonmember_scores)
            auc_se = roc_auc_standard_error(sign * member_scores, sign * nonmember_scores)
        else:
            warnings.warn(
                f"curvature probe at step {step}: {int((~torch.isfinite(scores)).sum())} "
                f"non-finite score(s) (is the model diverging, or h too small for the "
                f"dtype?); AUC recorded as NaN",
                RuntimeWarning, stacklevel=2,
            )
            auc = float("nan")
        result = ProbeResult(
            step=step,
            estimator=self.estimator,
            direction=self.direction,
            member_indices=self.member_indices.clone(),
            nonmember_indices=self.nonmember_indices.clone(),
            member_scores=member_scores,
            nonmember_scores=nonmember_scores,
            members_mean=float(member_scores.mean()),
            nonmembers_mean=float(nonmember_scores.mean()),
            auc=auc,
            seconds=time.perf_counter() - start,
            auc_se=auc_se,
        )
        self.history.append(result.to_dict())
        self.last_result = result
        return result

    # ------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The sample and the history's scalars, as tensors and plain numbers.

        No examples and no per-example scores are stored, only indices, so the state is
        safe to keep beside a checkpoint and loads with ``torch.load(weights_only=True)``.
        """
        def column(name: str) -> Tensor:
            return torch.tensor([r[name] for r in self.history], dtype=torch.float64)

        return {
            "version": _STATE_VERSION,
            "member_indices": self.member_indices.clone(),
            "nonmember_indices": self.nonmember_indices.clone(),
            "history_step": torch.tensor([r["step"] for r in self.history], dtype=torch.long),
            **{f"history_{name}": column(name) for name in _HISTORY_FLOATS},
            "history_auc_se": torch.tensor([r.get("auc_se", math.nan) for r in self.history],
                                           dtype=torch.float64),
            # Settings that define what the series measures, checked on load.
            "estimator_code": ESTIMATORS.index(self.estimator),
            "direction_sign": -1 if self.direction == "lower" else 1,
            "n_vectors": self.n_vectors,
            "h": self.h,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved time series: restore its sample and history.

        Raises:
            ValueError: if the state was saved by a probe with different measurement
                settings (estimator, direction, n_vectors, h, seed), or its indices do not
                fit this probe's datasets.
        """
        # auc_se is newer than the state format: older states load with it as NaN.
        missing = [k for k in self.state_dict() if k not in state and k != "history_auc_se"]
        if missing:
            raise ValueError(f"not a CurvatureProbe state: missing {', '.join(missing)}")
        saved = {
            "estimator": ESTIMATORS[int(state["estimator_code"])],
            "direction": "lower" if int(state["direction_sign"]) < 0 else "higher",
            "n_vectors": int(state["n_vectors"]),
            "h": float(state["h"]),
            "seed": int(state["seed"]),
        }
        different = {k: v for k, v in saved.items() if getattr(self, k) != v}
        if different:
            settings = ", ".join(f"{k}={v!r}" for k, v in saved.items())
            clashes = ", ".join(f"saved {k}={v!r}, this probe's {getattr(self, k)!r}"
                                for k, v in different.items())
            raise ValueError(
                f"this state was saved by a probe with different settings ({clashes}); "
                f"construct the probe with {settings} to continue its time series"
            )
        member_indices = torch.as_tensor(state["member_indices"], dtype=torch.long)
        nonmember_indices = torch.as_tensor(state["nonmember_indices"], dtype=torch.long)
        for name, indices, dataset in (("members", member_indices, self.members),
                                       ("nonmembers", nonmember_indices, self.nonmembers)):
            size = _length(dataset, name)
            if indices.dim() != 1 or len(indices) == 0 or int(indices.min()) < 0 \
                    or int(indices.max()) >= size:
                raise ValueError(f"the saved {name} indices do not fit the {name} dataset "
                                 f"(length {size}); pass the same datasets as the saved run")
        self.member_indices = member_indices.clone()
        self.nonmember_indices = nonmember_indices.clone()
        self._load_examples()
        steps = state["history_step"].tolist()
        columns = {name: state[f"history_{name}"].tolist() for name in _HISTORY_FLOATS}
        auc_se = state.get("history_auc_se", torch.full((len(steps),), math.nan)).tolist()
        self.history = [
            {
                "step": int(s),
                "estimator": self.estimator,
                "direction": self.direction,
                **{name: float(columns[name][i]) for name in _HISTORY_FLOATS},
                "auc_se": float(auc_se[i]),
                "n_members": len(self.member_indices),
                "n_nonmembers": len(self.nonmember_indices),
            }
            for i, s in enumerate(steps)
        ]
        self.last_result = None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _step(step: Any) -> int:
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0 (optimizer steps taken), got {step!r}")
    return int(step)


def _length(dataset: Any, name: str) -> int:
    try:
        size = len(dataset)
    except TypeError as err:
        raise TypeError(f"{name} must be a map-style Dataset with __len__ and __getitem__, "
                        f"got {type(dataset).__name__}") from err
    if size == 0:
        raise ValueError(f"{name} is empty: the probe needs at least one example per side")
    return size


def _sample_indices(size: int, n: int | None, generator: torch.Generator) -> Tensor:
    # Sorted so that results line up with dataset order, which is easier to read.
    return torch.randperm(size, generator=generator)[: size if n is None else min(n, size)
                                                     ].sort().values


def _gather(dataset: Any, indices: Tensor, name: str) -> tuple[Tensor | dict, Tensor | None]:
    items = [dataset[index] for index in indices.tolist()]
    if items and all(isinstance(item, Mapping) for item in items):
        # Hugging Face style examples (input_ids, attention_mask, labels): curvature is
        # taken w.r.t. the input embeddings (see input_curvature).
        try:
            return {k: torch.stack([torch.as_tensor(item[k]) for item in items])
                    for k in items[0]}, None
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{name} dict examples must all have the same keys and shapes "
                             f"to be probed together ({err!r})") from err
    xs, ys = [], []
    for index, item in zip(indices.tolist(), items):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"{name}[{index}] must be an (x, y) pair, got "
                            f"{type(item).__name__}")
        x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
        if not x.is_floating_point():
            raise TypeError(
                f"{name}[{index}] has input dtype {x.dtype}: input curvature needs "
                f"continuous inputs. For token ids, give the probe dict examples "
                f"(input_ids, attention_mask, labels) and a Hugging Face model, scored "
                f"w.r.t. the input embeddings; or datasets of embeddings and a model that "
                f"starts after the embedding"
            )
        xs.append(x)
        ys.append(y)
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as err:
        raise ValueError(f"{name} examples must all have the same shape to be probed "
                         f"together ({err})") from err


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    if floating:
        return floating[0].device, floating[0].dtype
    tensors = [*model.parameters(), *model.buffers()]
    return (tensors[0].device if tensors else torch.device("cpu")), None
