"""Per-example disclosure ledger, indexed by dataset index.

The ledger keeps, for every training example (by its index in the training dataset), how
often it was in a batch, its cumulative and maximum gradient uniqueness (GNQ), and the
cumulative disclosure bound Σ_t ½·ln(1 + GNQ_t) in nats, plus a censorship flag and a running
mean of its input-loss curvature. All state lives in 1-D tensors on one device, and the
per-step update paths (:meth:`DisclosureLedger.update`, :meth:`~DisclosureLedger.censor`,
:meth:`~DisclosureLedger.add_curvature`) run without host round trips when the ledger has a
fixed size.

About the bound (gradguard's own accounting, not the GNQ paper's formula): treating the other
examples' contributions to the update plus the ridge λI as Gaussian noise, one update is a
Gaussian channel that carries at most ½·ln(1 + GNQ_j) nats about example j. Summing over steps
further assumes that steps leak independently. Neither assumption holds exactly for real
training; the number is a *monitoring* signal for ranking and tracking examples, not a formal
privacy guarantee such as DP-SGD's ε.

Under ``strategy="sketch"`` (and ``"auto"`` where a layer's exact Gram would cost more than
``AUTO_SKETCH_MULTIPLE`` times its backward) the GNQ recorded is an estimate from
random projections: median relative error 0.4–3% on the models measured in
:mod:`gradguard.uniqueness.kernels.sketch` (``benchmarks/sketch_error.py``), ranking kept
where exact GNQs differ by more than that. ``GradGuard.summary()["sketched_layers"]`` and
the closing summary count the layers estimated so.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from gradguard._io import atomic_write_text
from gradguard.formatting import TopTable
from gradguard.uniqueness.gnq import disclosure_bound

__all__ = ["DisclosureLedger", "BOUND_ASSUMPTIONS"]

#: One-line statement of what the cumulative bound assumes; shown wherever the number is.
BOUND_ASSUMPTIONS = (
    "cum_bound = Σ_t ½·ln(1+GNQ_t) nats: gradguard's own accounting (not the GNQ paper's "
    "formula), assuming the other examples' gradients plus λI act as Gaussian noise on each "
    "update and that steps leak independently; a monitoring signal, not a DP guarantee."
)

_FORMAT_VERSION = 1

# name -> (dtype, value of an untouched entry)
_FIELDS: dict[str, tuple[torch.dtype, Any]] = {
    "steps_seen": (torch.int64, 0),
    "cum_gnq": (torch.float64, 0.0),
    # GNQ ≥ 0, so 0 is the identity of the running max for examples never seen.
    "max_gnq": (torch.float64, 0.0),
    "cum_bound": (torch.float64, 0.0),
    "censored": (torch.bool, False),
    "last_step": (torch.int64, -1),
    "curv_sum": (torch.float64, 0.0),
    "curv_count": (torch.int64, 0),
    # Added after format version 1 was first written: absent from older states, which load
    # with these defaults.
    "cum_gnq_raw": (torch.float64, 0.0),
    "max_gnq_raw": (torch.float64, 0.0),
    "eps": (torch.float64, math.inf),  # ∞: no DP guarantee accounted
}
_OPTIONAL_FIELDS = ("cum_gnq_raw", "max_gnq_raw", "eps")

_TOP_KEYS = ("cum_bound", "max_gnq", "cum_gnq", "curvature")


class DisclosureLedger:
    """Per-example GNQ and disclosure-bound ledger, indexed by dataset index.

    Each field is a 1-D tensor of length :attr:`capacity` on :attr:`device`; entry ``i``
    describes dataset example ``i``.

    Attributes:
        steps_seen: ``int64``, number of updates example ``i`` took part in (a duplicate
            index within one batch counts once per occurrence).
        cum_gnq: ``float64``, Σ_t GNQ_it.
        max_gnq: ``float64``, max_t GNQ_it (0 for examples never seen).
        cum_bound: ``float64``, Σ_t ½·ln(1 + GNQ_it) in nats. gradguard's own accounting,
            not the GNQ paper's formula: it treats the other examples' contributions plus
            λI as Gaussian noise on each update (so one update is a Gaussian channel with
            capacity ½·ln(1 + GNQ) nats about the example) and assumes the steps leak
            independently. A monitoring signal, not a formal (DP) guarantee.
        censored: ``bool``, example ``i`` is excluded from updates for the rest of training.
        last_step: ``int64``, last step example ``i`` was seen at, −1 if never.
        curv_sum: ``float64``, sum of the input-loss curvature scores recorded for ``i``.
        curv_count: ``int64``, number of curvature scores recorded for ``i``.
        cum_gnq_raw: ``float64``, Σ_t of the *raw* GNQ: what an unprotected update would
            disclose (per-example gradients before DP-SGD's clipping and noise and before
            gradguard's policy). Equal to ``cum_gnq`` for an unconstrained ``monitor`` run.
        max_gnq_raw: ``float64``, max_t of the raw GNQ.
        eps: ``float64``, example ``i``'s individual ε at the run's δ under DP-SGD
            (:class:`gradguard.dp.IndividualAccountant`: an upper bound, never above the run's
            ε); ∞ where no DP guarantee is accounted (training without DP-SGD, or σ = 0).

    Args:
        num_examples: size of the training dataset. When given, the ledger is preallocated
            and updates never leave the device; indices must lie in ``[0, num_examples)``.
            When ``None`` the ledger grows (doubling) to fit the largest index seen, which
            costs one host synchronisation per call that takes indices (to read the largest
            index); pass ``num_examples`` on accelerators.
        device: device for the ledger's tensors (default: CPU).

    Raises:
        ValueError: ``num_examples`` is negative.
        TypeError: ``num_examples`` is not an int.

    Example:
        >>> ledger = DisclosureLedger(4)
        >>> ledger.update(torch.tensor([0, 2]), torch.tensor([3.0, 0.0]), step=0)
        >>> ledger.cum_bound
        tensor([0.6931, 0.0000, 0.0000, 0.0000], dtype=torch.float64)
    """

    steps_seen: torch.Tensor
    cum_gnq: torch.Tensor
    max_gnq: torch.Tensor
    cum_bound: torch.Tensor
    censored: torch.Tensor
    last_step: torch.Tensor
    curv_sum: torch.Tensor
    curv_count: torch.Tensor
    cum_gnq_raw: torch.Tensor
    max_gnq_raw: torch.Tensor
    eps: torch.Tensor

    def __init__(self, num_examples: int | None = None, *,
                 device: torch.device | str | None = None) -> None:
        if num_examples is not None:
            if isinstance(num_examples, bool) or not isinstance(num_examples, int):
                raise TypeError(
                    f"num_examples must be an int (the training dataset's length) or None to "
                    f"grow on demand, got {type(num_examples).__name__}"
                )
            if num_examples < 0:
                raise ValueError(
                    f"num_examples must be >= 0 (the training dataset's length), got "
                    f"{num_examples}"
                )
        self._fixed = num_examples is not None
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._allocate(num_examples if num_examples is not None else 0)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        """Number of dataset indices the ledger currently has room for."""
        return self.steps_seen.shape[0]

    @property
    def num_examples(self) -> int | None:
        """The fixed dataset size, or ``None`` for a growing ledger."""
        return self.capacity if self._fixed else None

    @property
    def device(self) -> torch.device:
        """Device holding the ledger's tensors."""
        return self._device

    def __repr__(self) -> str:
        mode = "fixed" if self._fixed else "growing"
        return f"DisclosureLedger(capacity={self.capacity}, {mode}, device={self._device})"

    # ------------------------------------------------------------------ storage
    def _allocate(self, n: int) -> None:
        for name, (dtype, fill) in _FIELDS.items():
            setattr(self, name, torch.full((n,), fill, dtype=dtype, device=self._device))

    def _grow_to(self, n: int) -> None:
        old = self.capacity
        if n <= old:
            return
        for name, (dtype, fill) in _FIELDS.items():
            new = torch.full((n,), fill, dtype=dtype, device=self._device)
            new[:old] = getattr(self, name)
            setattr(self, name, new)

    def _prepare_indices(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Validate ``indices``, grow if allowed, and return them as int64 on the device."""
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices)
        if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(
                f"indices must be an integer tensor of dataset indices, got dtype {idx.dtype}; "
                "wrap the dataset with gradguard's indexed dataset so batches carry their "
                "indices"
            )
        if idx.dim() != 1:
            raise ValueError(
                f"indices must be 1-D (one dataset index per example), got shape "
                f"{tuple(idx.shape)}; flatten them with indices.reshape(-1)"
            )
        if idx.numel() == 0:
            return idx.to(device=self._device, dtype=torch.int64)
        if not self._fixed:
            # The one host sync of a growing ledger: the batch's largest index.
            lo, hi = (int(v) for v in torch.aminmax(idx))
            self._check_range(lo, hi, upper=None)
            if hi >= self.capacity:
                self._grow_to(max(hi + 1, 2 * self.capacity))
        elif idx.device.type == "cpu":
            # Indices straight from the data loader are on the host: checking is free.
            lo, hi = (int(v) for v in torch.aminmax(idx))
            self._check_range(lo, hi, upper=self.capacity)
        else:
            # Reading them back would stall the device each step; assert asynchronously.
            torch._assert_async(
                ((idx >= 0) & (idx < self.capacity)).all(),
                f"DisclosureLedger: a dataset index is outside [0, {self.capacity}); build "
                "the ledger with num_examples=len(train_dataset), or num_examples=None",
            )
        return idx.to(device=self._device, dtype=torch.int64, non_blocking=True)

    def _check_range(self, lo: int, hi: int, *, upper: int | None) -> None:
        if lo < 0:
            raise ValueError(
                f"dataset indices must be >= 0, got {lo}; pass the example's position in the "
                "training dataset, not a negative or relative index"
            )
        if upper is not None and hi >= upper:
            raise ValueError(
                f"dataset index {hi} is outside the ledger's range [0, {upper}); build "
                "DisclosureLedger(num_examples=len(train_dataset)) with the whole training "
                "set's size, or num_examples=None to grow on demand"
            )

    def _prepare_values(self, values: torch.Tensor | Sequence[float], n: int,
                        what: str) -> torch.Tensor:
        v = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        if v.dtype == torch.bool or v.dtype.is_complex:
            raise TypeError(f"{what} must be a real-valued tensor, got dtype {v.dtype}")
        if v.dim() != 1 or v.shape[0] != n:
            raise ValueError(
                f"{what} must be a 1-D tensor with one value per index ({n}), got shape "
                f"{tuple(v.shape)}"
            )
        # detach: the ledger must never join the autograd graph of the training step.
        # (Non-blocking only towards a device: a non-blocking copy to the host may be read
        # before it has arrived.)
        return v.detach().to(device=self._device, dtype=torch.float64,
                             non_blocking=self._device.type != "cpu")

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def update(self, indices: torch.Tensor, gnq: torch.Tensor, step: int | torch.Tensor, *,
               gnq_raw: torch.Tensor | None = None) -> None:
        """Record one step's GNQ for the examples of a batch.

        For each example: ``steps_seen += 1``, ``cum_gnq += gnq``, ``max_gnq = max(...)``,
        ``cum_bound += ½·ln(1 + gnq)``, ``last_step = step``. An index that appears several
        times in the batch (e.g. DistributedSampler padding) accumulates once per
        occurrence. An empty batch is a no-op. Non-finite GNQ values are recorded as given
        (and poison that example's sums); skip such steps upstream.

        Args:
            indices: ``[B]`` integer dataset indices.
            gnq: ``[B]`` GNQ values (any real dtype; accumulated in float64).
            step: the global step number (an int, or a 0-d integer tensor to avoid a sync).
            gnq_raw: ``[B]`` raw GNQ (before DP clipping/noise and policy) for
                ``cum_gnq_raw``/``max_gnq_raw``; default: ``gnq``.

        Raises:
            TypeError: ``indices`` is not an integer tensor.
            ValueError: shapes disagree, or an index is out of range for a fixed ledger.
        """
        idx = self._prepare_indices(indices)
        B = idx.shape[0]
        values = self._prepare_values(gnq, B, "gnq")
        raw = values if gnq_raw is None else self._prepare_values(gnq_raw, B, "gnq_raw")
        if B == 0:
            return
        self.steps_seen.index_add_(0, idx, torch.ones_like(idx))
        self.cum_gnq.index_add_(0, idx, values)
        self.max_gnq.scatter_reduce_(0, idx, values, reduce="amax", include_self=True)
        self.cum_bound.index_add_(0, idx, disclosure_bound(values))
        self.cum_gnq_raw.index_add_(0, idx, raw)
        self.max_gnq_raw.scatter_reduce_(0, idx, raw, reduce="amax", include_self=True)
        # Every occurrence writes the same value, so duplicates cannot race.
        if isinstance(step, torch.Tensor):
            step = step.to(device=self._device, dtype=torch.int64)
        self.last_step.index_fill_(0, idx, step)

    @torch.no_grad()
    def set_epsilon(self, eps: torch.Tensor) -> None:
        """Record every example's individual ε (``[N]``, entry i for dataset index i)."""
        n = eps.shape[0]
        if n > self.capacity:
            if self._fixed:
                raise ValueError(f"got ε for {n} examples, the ledger holds {self.capacity}")
            self._grow_to(n)
        self.eps[:n] = eps.to(device=self._device, dtype=torch.float64)

    @torch.no_grad()
    def censor(self, indices: torch.Tensor, *, where: torch.Tensor | None = None) -> None:
        """Mark examples as censored (excluded from updates for the rest of training).

        Args:
            indices: ``[B]`` integer dataset indices.
            where: optional ``[B]`` bool mask; only ``indices[where]`` are censored. Lets the
                caller censor by a condition computed on the device without a host sync
                (boolean indexing would need one).

        Raises:
            ValueError: bad shapes or out-of-range indices.
        """
        idx = self._prepare_indices(indices)
        if idx.shape[0] == 0:
            return
        if where is None:
            self.censored.index_fill_(0, idx, True)
            return
        if not isinstance(where, torch.Tensor) or where.shape != idx.shape:
            raise ValueError(
                f"where must be a bool tensor shaped like indices {tuple(idx.shape)}, got "
                f"{getattr(where, 'shape', type(where).__name__)}"
            )
        # amax over uint8 is an OR that handles duplicate indices with mixed flags.
        mask = where.to(device=self._device, dtype=torch.uint8)
        self.censored.view(torch.uint8).scatter_reduce_(0, idx, mask, reduce="amax")

    @torch.no_grad()
    def is_censored(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the ``[B]`` bool censorship flags of ``indices`` (on the ledger's device)."""
        idx = self._prepare_indices(indices)
        return self.censored[idx]

    @torch.no_grad()
    def bound(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the ``[B]`` float64 cumulative bounds (nats) of ``indices``.

        See :attr:`cum_bound` for the assumptions behind the number.
        """
        idx = self._prepare_indices(indices)
        return self.cum_bound[idx]

    @torch.no_grad()
    def add_curvature(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Add input-loss curvature scores to the examples' running means.

        Args:
            indices: ``[B]`` integer dataset indices.
            scores: ``[B]`` curvature scores (accumulated in float64).
        """
        idx = self._prepare_indices(indices)
        values = self._prepare_values(scores, idx.shape[0], "scores")
        if idx.shape[0] == 0:
            return
        self.curv_sum.index_add_(0, idx, values)
        self.curv_count.index_add_(0, idx, torch.ones_like(idx))

    @torch.no_grad()
    def curvature_mean(self) -> torch.Tensor:
        """Return the per-example mean curvature, ``[capacity]`` float64, NaN where none."""
        mean = self.curv_sum / self.curv_count.clamp(min=1)
        return torch.where(self.curv_count > 0, mean, torch.full_like(mean, math.nan))

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def summary(self) -> dict[str, torch.Tensor]:
        """Aggregate statistics as 0-d tensors on the ledger's device (no host sync).

        Returns:
            ``examples_seen`` (int64), ``max_bound`` and ``mean_bound`` (float64 nats, over
            examples seen at least once; 0 when none), ``censored_total`` (int64) and
            ``max_gnq`` (float64, 0 when none), ``max_gnq_raw`` (likewise, before DP
            clipping/noise and policy), ``eps_max``/``eps_mean`` (individual ε; ∞ without
            DP-SGD accounting).
        """
        seen = self.steps_seen > 0
        n_seen = seen.sum()
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        neg_inf = torch.full((), -math.inf, dtype=torch.float64, device=self._device)
        if self.capacity == 0:
            max_bound = max_gnq = zero
        else:
            max_bound = torch.where(seen, self.cum_bound, neg_inf).amax()
            max_gnq = torch.where(seen, self.max_gnq, neg_inf).amax()
        max_raw = torch.where(seen, self.max_gnq_raw, zero).amax() if self.capacity else zero
        inf = torch.full((), math.inf, dtype=torch.float64, device=self._device)
        any_seen = n_seen > 0
        return {
            "examples_seen": n_seen,
            "max_bound": torch.where(any_seen, max_bound, zero),
            "mean_bound": torch.where(seen, self.cum_bound, zero).sum() / n_seen.clamp(min=1),
            "censored_total": self.censored.sum(),
            "max_gnq": torch.where(any_seen, max_gnq, zero),
            "max_gnq_raw": max_raw,
            "eps_max": self.eps.amax() if self.capacity else inf,
            "eps_mean": self.eps.mean() if self.capacity else inf,
        }

    def _rows(self, positions: torch.Tensor) -> list[dict[str, Any]]:
        """Plain-Python records for the given dataset indices (a CPU int64 tensor)."""
        cpu = {name: getattr(self, name).cpu() for name in _FIELDS}
        curv = self.curvature_mean().cpu()
        cols = {name: t[positions].tolist() for name, t in cpu.items()}
        cols["curvature_mean"] = curv[positions].tolist()
        out = []
        for r, index in enumerate(positions.tolist()):
            row: dict[str, Any] = {"index": index}
            for name in (*_FIELDS, "curvature_mean"):
                row[name] = cols[name][r]
            out.append(row)
        return out

    def top(self, k: int = 10, *, by: str = "cum_bound") -> TopTable:
        """The ``k`` examples with the largest ``by``, among examples seen at least once.

        Ties are broken by the smaller dataset index. With ``by="curvature"`` only examples
        that also have a curvature score take part.

        Args:
            k: how many examples to return (fewer if fewer qualify).
            by: ``"cum_bound"``, ``"max_gnq"``, ``"cum_gnq"`` or ``"curvature"``.

        Returns:
            One dict per example: ``index``, every field, and ``curvature_mean`` (NaN when
            the example has no curvature score), as plain Python numbers; a list that
            prints as an aligned table (:class:`~gradguard.formatting.TopTable`).

        Raises:
            ValueError: unknown ``by`` or negative ``k``.
        """
        if by not in _TOP_KEYS:
            raise ValueError(f"by must be one of {_TOP_KEYS}, got {by!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        with torch.no_grad():
            mask = self.steps_seen > 0
            if by == "curvature":
                score = self.curvature_mean()
                mask = mask & (self.curv_count > 0)
            else:
                score = getattr(self, by)
            positions = torch.nonzero(mask.cpu()).flatten()  # ascending index
            order = torch.argsort(score.cpu()[positions], descending=True, stable=True)
        return TopTable(self._rows(positions[order[:k]]))

    def records(self) -> list[dict[str, Any]]:
        """One plain-Python dict per example seen at least once, in index order."""
        positions = torch.nonzero((self.steps_seen > 0).cpu()).flatten()
        return self._rows(positions)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`records` as CSV (dataset indices and numbers only).

        Written atomically: a reader sees the previous file or the complete new one.

        Args:
            path: destination file; its directory must exist.
        """
        columns = ["index", *_FIELDS, "curvature_mean"]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records())
        atomic_write_text(path, buffer.getvalue())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return a copy of the ledger's state: tensors only.

        Loadable with ``torch.load(path, weights_only=True)``.
        """
        sd = {name: getattr(self, name).detach().clone() for name in _FIELDS}
        sd["format_version"] = torch.tensor(_FORMAT_VERSION, dtype=torch.int64)
        return sd

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the ledger's state with ``state_dict`` (from :meth:`state_dict`).

        A growing ledger adopts the stored capacity; a fixed-size ledger requires it to
        match ``num_examples``.

        Raises:
            TypeError: ``state_dict`` is not a dict of tensors.
            ValueError: missing or unexpected keys, wrong dtypes or shapes, or an unknown
                format version.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict must be a dict from DisclosureLedger.state_dict(), got "
                f"{type(state_dict).__name__}"
            )
        expected = set(_FIELDS) | {"format_version"}
        missing = sorted(expected - set(state_dict) - set(_OPTIONAL_FIELDS))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"not a DisclosureLedger state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected}; pass the dict saved from DisclosureLedger.state_dict()"
            )
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}"
                )
        version = state_dict["format_version"]
        if version.numel() != 1 or int(version) != _FORMAT_VERSION:
            raise ValueError(
                f"unsupported DisclosureLedger state format_version {version.tolist()}; this "
                f"gradguard reads version {_FORMAT_VERSION}"
            )
        n = state_dict["steps_seen"].shape[0] if state_dict["steps_seen"].dim() == 1 else -1
        state_dict = {**{name: torch.full((max(n, 0),), fill, dtype=dtype)
                         for name, (dtype, fill) in _FIELDS.items()
                         if name in _OPTIONAL_FIELDS}, **state_dict}
        for name, (dtype, _) in _FIELDS.items():
            t = state_dict[name]
            if t.dtype != dtype:
                raise ValueError(f"state_dict[{name!r}] must have dtype {dtype}, got {t.dtype}")
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {tuple(t.shape)}; every field must be "
                    f"1-D with the same length as steps_seen ({n})"
                )
        if self._fixed and n != self.capacity:
            raise ValueError(
                f"this ledger was built for num_examples={self.capacity} but the state holds "
                f"{n} examples; build DisclosureLedger(num_examples={n}) or num_examples=None"
            )
        for name in _FIELDS:
            setattr(self, name, state_dict[name].detach().to(self._device, copy=True))

    @torch.no_grad()
    def merge_(self, other: DisclosureLedger) -> DisclosureLedger:
        """Fold ``other``'s records into this ledger, in place, by dataset index.

        Counts and sums add, maxima take the max, censorship ORs, ``last_step`` takes the
        max. Feeding two ledgers disjoint or overlapping sets of batches and merging gives
        the ledger that saw all of them (e.g. one ledger per DDP rank).

        Returns:
            ``self``.

        Raises:
            TypeError: ``other`` is not a DisclosureLedger.
            ValueError: ``other`` is larger than this fixed-size ledger.
        """
        if not isinstance(other, DisclosureLedger):
            raise TypeError(f"can only merge a DisclosureLedger, got {type(other).__name__}")
        n = other.capacity
        if n > self.capacity:
            if self._fixed:
                raise ValueError(
                    f"cannot merge a ledger with {n} examples into a fixed ledger of "
                    f"{self.capacity}; both must be built with the same num_examples"
                )
            self._grow_to(n)

        def theirs(name: str) -> torch.Tensor:
            return getattr(other, name).to(self._device)

        for name in ("steps_seen", "cum_gnq", "cum_bound", "curv_sum", "curv_count",
                     "cum_gnq_raw"):
            getattr(self, name)[:n] += theirs(name)
        for name in ("max_gnq", "last_step", "max_gnq_raw"):
            mine = getattr(self, name)[:n]
            mine.copy_(torch.maximum(mine, theirs(name)))
        # ε is not additive over batch streams: the larger (conservative) one wins, and a
        # stream without DP accounting (∞) leaves no guarantee.
        self.eps[:n] = torch.maximum(self.eps[:n], theirs("eps"))
        self.censored[:n] |= theirs("censored")
        return self

    def to(self, device: torch.device | str) -> DisclosureLedger:
        """Move the ledger's tensors to ``device``, in place; returns ``self``."""
        self._device = torch.device(device)
        for name in _FIELDS:
            setattr(self, name, getattr(self, name).to(self._device))
        return self
