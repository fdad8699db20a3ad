"""TensorBoard sink for gradguard: GNQ, disclosure, policy, curvature probe, hparams.

Every tag lives under ``gradguard/``. The sink only ever receives numbers (GNQ values,
weights, curvature scores, ledger statistics and dataset *indices*); it has no API that takes
training inputs, so raw examples cannot reach the logs through it.

Logging is a side channel of training and must never stop it: if the log directory cannot be
created or written (or the writer fails in any other way), the sink warns once, naming the
directory, and silently drops everything logged after that. Bad *arguments* (wrong shapes,
unknown directions) still raise, since they are programming errors.

The engine calls the sink every ``log_every`` steps, so reading values back to the host here
(``.cpu()``, ``.item()``) is intended.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from gradguard.ledger import BOUND_ASSUMPTIONS, DisclosureLedger

__all__ = ["TensorBoardSink", "LAYOUT", "TAG_PREFIX"]

TAG_PREFIX = "gradguard/"

#: Custom-scalars layout written once per run: category -> chart -> [kind, tags].
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "gradguard: GNQ": {
        "GNQ per step": ["Multiline", [f"{TAG_PREFIX}gnq/mean", f"{TAG_PREFIX}gnq/p50",
                                       f"{TAG_PREFIX}gnq/p95", f"{TAG_PREFIX}gnq/max"]],
        "ridge λ used": ["Multiline", [f"{TAG_PREFIX}lam"]],
    },
    "gradguard: disclosure": {
        "cumulative bound Σ½ln(1+GNQ) (nats)": [
            "Multiline", [f"{TAG_PREFIX}disclosure/max", f"{TAG_PREFIX}disclosure/mean"]],
    },
    "gradguard: policy": {
        "examples acted on": ["Multiline", [f"{TAG_PREFIX}policy/dropped",
                                            f"{TAG_PREFIX}policy/clipped",
                                            f"{TAG_PREFIX}policy/censored_total"]],
    },
    "gradguard: curvature": {
        "mean input-loss curvature": ["Multiline", [f"{TAG_PREFIX}curvature/members_mean",
                                                    f"{TAG_PREFIX}curvature/nonmembers_mean"]],
        "curvature attack AUC": ["Multiline", [f"{TAG_PREFIX}curvature/auc"]],
    },
}

# Scalars that, once logged, serve as the hparams dashboard's metrics when close() gets none.
_DEFAULT_METRIC_TAGS = (
    f"{TAG_PREFIX}disclosure/max",
    f"{TAG_PREFIX}disclosure/mean",
    f"{TAG_PREFIX}gnq/p95",
    f"{TAG_PREFIX}policy/censored_total",
    f"{TAG_PREFIX}curvature/auc",
)


def _tag(name: str) -> str:
    """Prefix ``name`` with ``gradguard/`` unless it already is."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a tag must be a non-empty str, got {name!r}")
    return name if name.startswith(TAG_PREFIX) else TAG_PREFIX + name.lstrip("/")


def _as_float(value: float | torch.Tensor | np.ndarray, what: str) -> float:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        size = value.numel() if isinstance(value, torch.Tensor) else np.size(value)
        if size != 1:
            raise ValueError(f"{what} must be a scalar, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{what} must be a number or a one-element tensor, got {type(value).__name__}")


def _as_vector(values: Any, what: str) -> torch.Tensor:
    """Any 1-D array-like of numbers as a float64 CPU tensor."""
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(
        np.asarray(values, dtype=np.float64))
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one value per example), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float64)


def _direction_sign(direction: Any) -> int:
    """+1 when members are expected to score higher, −1 when lower.

    Accepts a number (its sign) or a phrase such as ``"higher"``, ``"members_higher"``,
    ``"lower"``, ``"nonmembers_higher"``, ``"+"`` or ``"-"``.
    """
    if direction is None:
        return 1
    if isinstance(direction, (int, float)) and not isinstance(direction, bool):
        if direction == 0 or math.isnan(direction):
            raise ValueError(f"direction must be positive or negative, got {direction!r}")
        return 1 if direction > 0 else -1
    if isinstance(direction, str):
        s = direction.strip().lower()
        if s in {"+", "+1", "1"}:
            return 1
        if s in {"-", "-1"}:
            return -1
        flip = s.startswith(("nonmember", "non-member", "non_member", "non member"))
        if any(w in s for w in ("low", "less", "small", "neg")):
            base = -1
        elif any(w in s for w in ("high", "great", "larg", "pos")):
            base = 1
        else:
            base = 0
        if base:
            return -base if flip else base
    raise ValueError(
        f"cannot read the curvature attack direction {direction!r}: use 'higher' (members "
        "have higher curvature), 'lower', or a signed number"
    )


def _rank_to_unit(scores: np.ndarray) -> np.ndarray:
    """Map scores to [0, 1] by their average rank: monotone, ties share a value."""
    from scipy.stats import rankdata

    n = scores.shape[0]
    if n == 1:
        return np.full(1, 0.5)
    return (rankdata(scores, method="average") - 1.0) / (n - 1.0)


def _hparam_value(value: Any) -> bool | int | float | str | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _restore_bools(summaries: tuple[Any, ...], hp: Mapping[str, Any]) -> tuple[Any, ...]:
    """Make bool hparams bools again: torch's ``hparams`` writes them as numbers (0/1)."""
    bools = {k: v for k, v in hp.items() if isinstance(v, bool)}
    if not bools:
        return summaries
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    for summary in summaries:
        for value in summary.value:
            data = plugin_data_pb2.HParamsPluginData.FromString(
                value.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                for name, flag in bools.items():
                    data.session_start_info.hparams[name].bool_value = flag
            elif data.HasField("experiment"):
                for info in data.experiment.hparam_infos:
                    if info.name in bools:
                        info.type = api_pb2.DataType.DATA_TYPE_BOOL
            else:
                continue
            value.metadata.plugin_data.content = data.SerializeToString()
    return summaries


class TensorBoardSink:
    """Writes gradguard's per-step and periodic statistics to TensorBoard.

    Args:
        log_dir: the run directory (created if missing). Everything, hparams included,
            lands in this one directory so TensorBoard shows it as one run.
        top_k: default number of rows of the most-disclosing-examples table.
        flush_secs: how often the writer flushes to disk, in seconds.
        purge_step: on resuming a run, the first step to log again: events at or after
            it in ``log_dir`` are purged (``SummaryWriter(purge_step=...)``).

    Raises:
        ValueError: ``top_k`` < 1 or ``flush_secs`` <= 0.

    Example:
        >>> sink = TensorBoardSink(tmp_dir)                                   # doctest: +SKIP
        >>> sink.log_step(step, gnq=gnq, weights=None, ledger=ledger, lam=1e-2)  # doctest: +SKIP
        >>> sink.close(hparams={"policy": "monitor", "lam": 1e-2})           # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, top_k: int = 10,
                 flush_secs: float = 30, purge_step: int | None = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if not isinstance(flush_secs, (int, float)) or not flush_secs > 0:
            raise ValueError(f"flush_secs must be a number > 0, got {flush_secs!r}")
        self.log_dir = os.fspath(log_dir)
        self.top_k = top_k
        #: The exception that disabled the sink, if any.
        self.error: BaseException | None = None
        self._writer: Any = None
        self._closed = False
        self._last_step = 0
        self._logged_tags: set[str] = set()
        self._directions_stated: set[tuple[int, str]] = set()

        from torch.utils.tensorboard import SummaryWriter

        def open_writer() -> None:
            # purge_step: after a resume, events logged at or after it (by the run that
            # was killed after its last saved state) are hidden, so no step shows twice.
            self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs,
                                         purge_step=purge_step)
            self._writer.add_custom_scalars(LAYOUT)

        self._guarded(open_writer, opening=True)

    # ------------------------------------------------------------------ plumbing
    @property
    def active(self) -> bool:
        """Whether the sink still writes (not closed, no writer failure)."""
        return self._writer is not None and self.error is None and not self._closed

    def _guarded(self, write: Callable[[], None], *, opening: bool = False) -> None:
        """Run ``write``; on the first failure warn once and disable the sink."""
        if not opening and not self.active:
            return
        try:
            write()
        except Exception as exc:  # logging must never stop training
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        self.error = exc
        warnings.warn(
            f"gradguard: writing TensorBoard logs to {self.log_dir!r} failed "
            f"({type(exc).__name__}: {exc}). TensorBoard logging is off for the rest of this "
            "run; training continues. Check that the directory is writable and the disk is "
            "not full.",
            RuntimeWarning,
            stacklevel=4,
        )
        writer, self._writer = self._writer, None
        if writer is not None:
            # Already failing: release what we can and report only the first error.
            with contextlib.suppress(Exception):
                writer.close()

    def _write_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
            self._logged_tags.add(tag)

    def _note_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            step = int(_as_float(step, "step"))
        step = int(step)
        self._last_step = max(self._last_step, step)
        return step

    # ------------------------------------------------------------------ per step
    def log_step(self, step: int, *, gnq: torch.Tensor, weights: torch.Tensor | None,
                 ledger: DisclosureLedger, lam: float | torch.Tensor,
                 policy_stats: Mapping[str, float | torch.Tensor] | None = None) -> None:
        """Log one step's GNQ distribution, the ledger's disclosure, policy actions and λ.

        Scalars: ``gnq/{mean,p50,p95,max}`` over this step's finite GNQ values (skipped for
        an empty batch; ``gnq/nonfinite`` counts non-finite values when there are any),
        ``disclosure/{max,mean}`` (cumulative bound in nats over examples seen so far),
        ``policy/{dropped,clipped}`` (counts of weights == 0 and 0 < weights < 1; 0 when
        ``weights`` is None), ``policy/censored_total``, ``lam``; plus
        ``policy/<name>`` for every entry of ``policy_stats`` (which overrides the
        weight-derived ``dropped``/``clipped`` if it has them). Histogram ``gnq``.

        Args:
            step: global step.
            gnq: ``[B]`` GNQ values of this step.
            weights: ``[B]`` per-example weights the policy applied, or None (monitor).
            ledger: the run's disclosure ledger.
            lam: the λ actually used this step (relative λ varies per step).
            policy_stats: extra policy numbers to log.

        Raises:
            ValueError: ``gnq`` and ``weights`` disagree in shape.
        """
        if not self.active:
            return
        step = self._note_step(step)
        g = _as_vector(gnq, "gnq")
        finite = g[torch.isfinite(g)]
        scalars: dict[str, float] = {}
        if finite.numel():
            q = torch.quantile(finite, torch.tensor([0.5, 0.95], dtype=torch.float64))
            scalars[f"{TAG_PREFIX}gnq/mean"] = float(finite.mean())
            scalars[f"{TAG_PREFIX}gnq/p50"] = float(q[0])
            scalars[f"{TAG_PREFIX}gnq/p95"] = float(q[1])
            scalars[f"{TAG_PREFIX}gnq/max"] = float(finite.max())
        if finite.numel() != g.numel():
            scalars[f"{TAG_PREFIX}gnq/nonfinite"] = float(g.numel() - finite.numel())

        summary = ledger.summary()
        scalars[f"{TAG_PREFIX}disclosure/max"] = float(summary["max_bound"])
        scalars[f"{TAG_PREFIX}disclosure/mean"] = float(summary["mean_bound"])

        dropped = clipped = 0.0
        if weights is not None:
            w = _as_vector(weights, "weights")
            if w.shape != g.shape:
                raise ValueError(
                    f"weights must have one value per GNQ value: got {tuple(w.shape)} weights "
                    f"for {tuple(g.shape)} GNQ values"
                )
            dropped = float((w == 0).sum())
            clipped = float(((w > 0) & (w < 1)).sum())
        scalars[f"{TAG_PREFIX}policy/dropped"] = dropped
        scalars[f"{TAG_PREFIX}policy/clipped"] = clipped
        scalars[f"{TAG_PREFIX}policy/censored_total"] = float(summary["censored_total"])
        for name, value in (policy_stats or {}).items():
            scalars[f"{TAG_PREFIX}policy/{name}"] = _as_float(value, f"policy_stats[{name!r}]")
        scalars[f"{TAG_PREFIX}lam"] = _as_float(lam, "lam")

        def write() -> None:
            self._write_scalars(scalars, step)
            if finite.numel():
                self._writer.add_histogram(f"{TAG_PREFIX}gnq", finite.numpy(), step)

        self._guarded(write)

    # ------------------------------------------------------------------ curvature
    def log_curvature(self, step: int, result: Any) -> None:
        """Log a curvature-probe result: means, AUC, timing, histograms and a PR curve.

        ``result`` is duck-typed: it needs ``members_mean``, ``nonmembers_mean``, ``auc``,
        ``member_scores`` and ``nonmember_scores``; ``seconds``, ``direction`` and
        ``estimator`` are used when present. The PR curve ``curvature/pr`` labels members 1
        and non-members 0; its predictions are the attack score (curvature signed by
        ``direction`` so that higher means "member") mapped to [0, 1] by rank. A text entry
        ``curvature/attack`` states that mapping once per direction and estimator.

        Args:
            step: global step.
            result: the probe's result.

        Raises:
            ValueError: the direction cannot be read.
        """
        if not self.active:
            return
        step = self._note_step(step)
        scalars: dict[str, float] = {}
        for name in ("members_mean", "nonmembers_mean", "auc", "seconds"):
            value = getattr(result, name, None)
            if value is not None:
                scalars[f"{TAG_PREFIX}curvature/{name}"] = _as_float(value, name)
        members = _as_vector(result.member_scores, "member_scores")
        nonmembers = _as_vector(result.nonmember_scores, "nonmember_scores")
        members = members[torch.isfinite(members)].numpy()
        nonmembers = nonmembers[torch.isfinite(nonmembers)].numpy()

        direction = getattr(result, "direction", None)
        estimator = str(getattr(result, "estimator", "unknown"))
        sign = _direction_sign(direction)
        pr = None
        if members.size and nonmembers.size:
            labels = np.concatenate([np.ones(members.size, dtype=np.int64),
                                     np.zeros(nonmembers.size, dtype=np.int64)])
            predictions = _rank_to_unit(sign * np.concatenate([members, nonmembers]))
            pr = (labels, predictions)
        note = None
        if (sign, estimator) not in self._directions_stated:
            stated = "stated" if direction is not None else "not stated, assumed"
            note = (
                f"Curvature attack (estimator: {estimator}). Direction {stated}: members are "
                f"expected to have {'higher' if sign > 0 else 'lower'} curvature, so the attack "
                f"score is {'+' if sign > 0 else '−'}curvature. PR curve "
                f"`{TAG_PREFIX}curvature/pr`: label 1 = training member, 0 = held-out "
                "non-member; prediction = the attack score's rank scaled to [0, 1] "
                "(monotone, ties averaged), so thresholds are score quantiles, not scores."
            )

        def write() -> None:
            self._write_scalars(scalars, step)
            if members.size:
                self._writer.add_histogram(f"{TAG_PREFIX}curvature/members", members, step)
            if nonmembers.size:
                self._writer.add_histogram(f"{TAG_PREFIX}curvature/nonmembers", nonmembers,
                                           step)
            if pr is not None:
                self._writer.add_pr_curve(f"{TAG_PREFIX}curvature/pr", pr[0], pr[1], step)
            if note is not None:
                self._writer.add_text(f"{TAG_PREFIX}curvature/attack", note, step)
                self._directions_stated.add((sign, estimator))

        self._guarded(write)

    # ------------------------------------------------------------------ ledger table
    def log_top_table(self, step: int, ledger: DisclosureLedger, *, k: int | None = None) -> None:
        """Log a markdown table of the ``k`` most-disclosing dataset indices.

        Columns: rank, dataset index, steps seen, cumulative bound (nats), max GNQ,
        censored; followed by the bound's assumptions. Indices and numbers only.

        Args:
            step: global step.
            ledger: the run's disclosure ledger.
            k: rows (default: the sink's ``top_k``).
        """
        if not self.active:
            return
        step = self._note_step(step)
        rows = ledger.top(self.top_k if k is None else k, by="cum_bound")
        lines = [
            "| rank | dataset index | steps seen | cum. bound (nats) | max GNQ | censored |",
            "|---:|---:|---:|---:|---:|:---:|",
        ]
        for rank, row in enumerate(rows, start=1):
            lines.append(
                f"| {rank} | {row['index']} | {row['steps_seen']} | {row['cum_bound']:.6g} | "
                f"{row['max_gnq']:.6g} | {'yes' if row['censored'] else 'no'} |"
            )
        if not rows:
            lines.append("| – | no example seen yet | | | | |")
        table = "\n".join(lines) + (
            f"\n\n{BOUND_ASSUMPTIONS} Dataset indices only; no example contents are logged."
        )
        self._guarded(lambda: self._writer.add_text(f"{TAG_PREFIX}top_disclosing", table, step))

    # ------------------------------------------------------------------ generic
    def log_text(self, tag: str, text: str, step: int) -> None:
        """Log a markdown text entry under ``gradguard/<tag>``."""
        if not self.active:
            return
        step = self._note_step(step)
        full = _tag(tag)
        self._guarded(lambda: self._writer.add_text(full, str(text), step))

    def log_scalars(self, scalars: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Log each ``name: value`` as scalar ``gradguard/<name>``."""
        if not self.active:
            return
        step = self._note_step(step)
        values = {_tag(name): _as_float(v, name) for name, v in scalars.items()}
        self._guarded(lambda: self._write_scalars(values, step))

    def flush(self) -> None:
        """Flush pending events to disk."""
        self._guarded(lambda: self._writer.flush())

    # ------------------------------------------------------------------ end of run
    def close(self, *, hparams: Mapping[str, Any] | None = None,
              metrics: Mapping[str, float | torch.Tensor] | None = None) -> None:
        """Write the run's hparams (if given) into the run directory, then flush and close.

        The hparams summary goes into this sink's own event file, so the HParams dashboard
        shows it for the same run as the scalars (``SummaryWriter.add_hparams`` would put it
        in a new sub-directory, i.e. a separate run). ``metrics`` are logged as scalars
        ``gradguard/<name>`` at the last step and listed as the dashboard's metrics; when
        omitted, the already logged ``disclosure/{max,mean}``, ``gnq/p95``,
        ``policy/censored_total`` and ``curvature/auc`` serve as metrics. Calling ``close``
        again does nothing.

        Args:
            hparams: hyperparameters (bool, int, float, str; None entries are skipped,
                anything else is written as its ``str``).
            metrics: final metric values.
        """
        if self._closed:
            return
        if self.active and (hparams is not None or metrics is not None):
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            hp = {str(k): _hparam_value(v) for k, v in (hparams or {}).items()}
            metric_values = {_tag(k): _as_float(v, k) for k, v in (metrics or {}).items()}
            if metrics is None:
                metric_tags = [t for t in _DEFAULT_METRIC_TAGS if t in self._logged_tags]
            else:
                metric_tags = list(metric_values)
            step = self._last_step

            def write_hparams() -> None:
                summaries = hparams_summaries(hp, dict.fromkeys(metric_tags, 0.0))
                for summary in _restore_bools(summaries, hp):
                    self._writer.file_writer.add_summary(summary, step)
                self._write_scalars(metric_values, step)

            self._guarded(write_hparams)

        def close_writer() -> None:
            self._writer.flush()
            self._writer.close()

        self._guarded(close_writer)
        self._closed = True

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
