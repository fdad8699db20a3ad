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
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gradguard.formatting import format_number
from gradguard.ledger import BOUND_ASSUMPTIONS, DisclosureLedger

__all__ = ["TensorBoardSink", "LAYOUT", "TAGS", "TAG_PREFIX", "log_comparison"]

TAG_PREFIX = "gradguard/"

#: Every tag gradguard writes, in one place (the sink, the report and tests read it).
#: Scalars unless the name says otherwise (``*_hist``: histogram, ``*_pr``: PR curve,
#: ``*_text``: markdown text).
TAGS: dict[str, str] = {name: TAG_PREFIX + tag for name, tag in {
    # what matters most: GNQ, disclosure, policy actions
    "gnq_mean": "gnq/mean", "gnq_p50": "gnq/p50", "gnq_p95": "gnq/p95", "gnq_max": "gnq/max",
    "gnq_nonfinite": "gnq/nonfinite",
    # log10 of the positive GNQ values: GNQ spans orders of magnitude in one batch.
    "gnq_log10_hist": "gnq/log10_GNQ",
    "disclosure_max": "disclosure/max", "disclosure_mean": "disclosure/mean",
    "dropped": "policy/dropped", "clipped": "policy/clipped",
    "censored_total": "policy/censored_total",
    "realised_rate": "policy/realised_rate", "skipped_nonfinite": "policy/skipped_nonfinite",
    # cumulative counts of example-steps, as the engine passes them in policy_stats
    "dropped_total": "policy/dropped_total", "clipped_total": "policy/clipped_total",
    "top_disclosing_text": "top_disclosing",
    "lam": "lam", "guard_seconds": "time/guard_seconds",
    # under DP-SGD: what an unprotected update would disclose, and individual ε
    "gnq_raw_mean": "gnq_raw/mean", "gnq_raw_p50": "gnq_raw/p50", "gnq_raw_p95": "gnq_raw/p95",
    "gnq_raw_max": "gnq_raw/max", "eps_max": "dp/eps_max", "eps_mean": "dp/eps_mean",
    "eps_run_rdp": "dp/eps_run_rdp",
    # then the curvature probe: DESIGN §6's three scalars, and the probe's details under
    # probe/, which TensorBoard's alphabetical Time Series puts after gnq/ and policy/
    # (histograms come one card per run, and led the page when they were curvature/*).
    "curvature_members_mean": "curvature/members_mean",
    "curvature_nonmembers_mean": "curvature/nonmembers_mean",
    "curvature_auc": "curvature/auc", "curvature_seconds": "probe/seconds",
    "curvature_members_hist": "probe/curvature_members",
    "curvature_nonmembers_hist": "probe/curvature_nonmembers",
    "curvature_pr": "probe/curvature_pr", "curvature_attack_text": "probe/curvature_attack",
}.items()}

#: Custom-scalars layout written once per run: category -> chart -> [kind, tags]. Categories
#: are numbered in reading order (GNQ, disclosure, policy, then curvature). A chart holds one
#: quantity, so that with several runs (a comparison) it has one line per run, and quantities
#: of different scales (median vs max GNQ, per-step vs cumulative counts) never share an axis.
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "gradguard 1 · GNQ per step": {
        "GNQ: median of the batch": ["Multiline", [TAGS["gnq_p50"]]],
        "GNQ: 95th percentile of the batch": ["Multiline", [TAGS["gnq_p95"]]],
        "GNQ: largest in the batch": ["Multiline", [TAGS["gnq_max"]]],
        "GNQ: mean of the batch": ["Multiline", [TAGS["gnq_mean"]]],
    },
    "gradguard 2 · disclosure": {
        "largest cumulative bound Σ½ln(1+GNQ) (nats)": ["Multiline", [TAGS["disclosure_max"]]],
        "mean cumulative bound over examples seen (nats)": [
            "Multiline", [TAGS["disclosure_mean"]]],
    },
    "gradguard 3 · policy actions": {
        "examples dropped in the logged step": ["Multiline", [TAGS["dropped"]]],
        "examples clipped in the logged step": ["Multiline", [TAGS["clipped"]]],
        "example-steps dropped so far (cumulative)": ["Multiline", [TAGS["dropped_total"]]],
        "example-steps clipped so far (cumulative)": ["Multiline", [TAGS["clipped_total"]]],
        "examples censored so far (cumulative)": ["Multiline", [TAGS["censored_total"]]],
    },
    "gradguard 4 · curvature probe": {
        "mean input-loss curvature: members vs held out": [
            "Multiline", [TAGS["curvature_members_mean"], TAGS["curvature_nonmembers_mean"]]],
        "curvature attack AUC (0.5 = chance)": ["Multiline", [TAGS["curvature_auc"]]],
    },
    "gradguard 5 · ridge λ": {
        "λ used at each logged step": ["Multiline", [TAGS["lam"]]],
    },
}

# Custom scalars reads each tag as a regular expression: anchor it, or "policy/dropped" also
# matches "policy/dropped_total" and a per-step chart gets the cumulative line too.
for _charts in LAYOUT.values():
    for _kind, _tags in _charts.values():
        _tags[:] = [f"^{re.escape(tag)}$" for tag in _tags]
del _charts, _kind, _tags

# Scalars that, once logged, serve as the hparams dashboard's metrics when close() gets none.
_DEFAULT_METRIC_TAGS = (
    TAGS["disclosure_max"],
    TAGS["disclosure_mean"],
    TAGS["gnq_p95"],
    TAGS["censored_total"],
    TAGS["curvature_auc"],
)

#: How an unset setting (None) appears in the hparams dashboard, for every run alike.
UNSET = "none"


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


def _attack_sign(result: Any) -> int:
    """The probe's own attack direction: +1 when members score higher curvature, −1 lower.

    Taken from the result (:attr:`ProbeResult.sign`, or its ``direction`` ``"higher"`` /
    ``"lower"``), never re-derived here.
    """
    sign = getattr(result, "sign", None)
    if sign in (1, -1):
        return int(sign)
    direction = getattr(result, "direction", None)
    if direction in ("higher", "lower"):
        return 1 if direction == "higher" else -1
    raise ValueError(
        f"the curvature result's direction must be 'higher' or 'lower' (as ProbeResult "
        f"states it), got {direction!r}"
    )


def _rank_to_unit(scores: np.ndarray) -> np.ndarray:
    """Map scores to [0, 1] by their average rank: monotone, ties share a value."""
    from scipy.stats import rankdata

    n = scores.shape[0]
    if n == 1:
        return np.full(1, 0.5)
    return (rankdata(scores, method="average") - 1.0) / (n - 1.0)


def _hparam_value(value: Any) -> bool | int | float | str:
    if value is None:
        return UNSET
    if isinstance(value, (bool, int, float, str)):
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


# Writer threads whose failures the sink reports itself (see _silence_writer_thread).
_QUIET_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_previous_excepthook: Callable[[Any], Any] | None = None


def _excepthook(args: Any) -> None:
    if args.thread in _QUIET_THREADS and isinstance(args.exc_value, Exception):
        return  # the writer keeps the exception and raises it on the sink's next call
    (_previous_excepthook or threading.__excepthook__)(args)


def _silence_writer_thread(writer: Any) -> None:
    """Keep a failing event-writer thread (full disk, lost mount) from printing a traceback.

    TensorBoard's background writer thread stores its exception and re-raises it on the
    next write or flush from the training thread, where the sink turns it into one warning;
    but it also lets the exception escape the thread, and Python prints that traceback on
    stderr. This hook drops exactly those, for this sink's own thread; every other thread's
    exceptions go to the previous hook.
    """
    global _previous_excepthook
    worker = getattr(getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None),
                             "_async_writer", None), "_worker", None)
    if not isinstance(worker, threading.Thread):
        return  # another TensorBoard version: nothing to silence, nothing breaks
    if threading.excepthook is not _excepthook:
        _previous_excepthook = threading.excepthook
        threading.excepthook = _excepthook
    _QUIET_THREADS.add(worker)


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
            _silence_writer_thread(self._writer)
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
        weight-derived ``dropped``/``clipped`` if it has them). Histogram ``gnq/log10_GNQ``
        of log10(GNQ) over the step's positive finite GNQ values (GNQ spans several orders
        of magnitude, so a linear histogram puts all mass in its first bin).

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
            scalars[TAGS["gnq_mean"]] = float(finite.mean())
            scalars[TAGS["gnq_p50"]] = float(q[0])
            scalars[TAGS["gnq_p95"]] = float(q[1])
            scalars[TAGS["gnq_max"]] = float(finite.max())
        if finite.numel() != g.numel():
            scalars[TAGS["gnq_nonfinite"]] = float(g.numel() - finite.numel())

        summary = ledger.summary()
        scalars[TAGS["disclosure_max"]] = float(summary["max_bound"])
        scalars[TAGS["disclosure_mean"]] = float(summary["mean_bound"])

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
        scalars[TAGS["dropped"]] = dropped
        scalars[TAGS["clipped"]] = clipped
        scalars[TAGS["censored_total"]] = float(summary["censored_total"])
        for name, value in (policy_stats or {}).items():
            scalars[f"{TAG_PREFIX}policy/{name}"] = _as_float(value, f"policy_stats[{name!r}]")
        scalars[TAGS["lam"]] = _as_float(lam, "lam")

        positive = finite[finite > 0]

        def write() -> None:
            self._write_scalars(scalars, step)
            if positive.numel():
                self._writer.add_histogram(TAGS["gnq_log10_hist"],
                                           torch.log10(positive).numpy(), step)

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
                scalars[TAGS[f"curvature_{name}"]] = _as_float(value, name)
        members = _as_vector(result.member_scores, "member_scores")
        nonmembers = _as_vector(result.nonmember_scores, "nonmember_scores")
        members = members[torch.isfinite(members)].numpy()
        nonmembers = nonmembers[torch.isfinite(nonmembers)].numpy()

        estimator = str(getattr(result, "estimator", "unknown"))
        sign = _attack_sign(result)
        pr = None
        if members.size and nonmembers.size:
            labels = np.concatenate([np.ones(members.size, dtype=np.int64),
                                     np.zeros(nonmembers.size, dtype=np.int64)])
            predictions = _rank_to_unit(sign * np.concatenate([members, nonmembers]))
            pr = (labels, predictions)
        note = None
        if (sign, estimator) not in self._directions_stated:
            note = (
                f"Curvature attack (estimator: {estimator}). Direction fixed by the probe: "
                f"members are "
                f"expected to have {'higher' if sign > 0 else 'lower'} curvature, so the attack "
                f"score is {'+' if sign > 0 else '−'}curvature. PR curve "
                f"`{TAGS['curvature_pr']}`: label 1 = training member, 0 = held-out "
                "non-member; prediction = the attack score's rank scaled to [0, 1] "
                "(monotone, ties averaged), so thresholds are score quantiles, not scores."
            )

        def write() -> None:
            self._write_scalars(scalars, step)
            if members.size:
                self._writer.add_histogram(TAGS["curvature_members_hist"], members, step)
            if nonmembers.size:
                self._writer.add_histogram(TAGS["curvature_nonmembers_hist"], nonmembers,
                                           step)
            if pr is not None:
                self._writer.add_pr_curve(TAGS["curvature_pr"], pr[0], pr[1], step)
            if note is not None:
                self._writer.add_text(TAGS["curvature_attack_text"], note, step)
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
                f"| {rank} | {row['index']} | {row['steps_seen']} | "
                f"{format_number(row['cum_bound'])} | {format_number(row['max_gnq'])} | "
                f"{format_number(bool(row['censored']))} |"
            )
        if not rows:
            lines.append("| – | no example seen yet | | | | |")
        table = "\n".join(lines) + (
            f"\n\n{BOUND_ASSUMPTIONS} Dataset indices only; no example contents are logged."
        )
        self._guarded(lambda: self._writer.add_text(TAGS["top_disclosing_text"], table, step))

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
            hparams: hyperparameters (bool, int, float, str; None is written as ``"none"``
                so unset settings read the same in every run; anything else as its ``str``).
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


def log_comparison(log_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *,
                   hparams: Sequence[str], metrics: Sequence[str],
                   name_key: str = "name") -> list[str]:
    """Write a comparison where TensorBoard reads it well: one HParams session per row.

    Each row becomes its own run ``<log_dir>/<row name>`` holding an hparams session with
    the row's ``hparams`` values (None as ``"none"``) and its ``metrics`` as the session's
    metrics (scalars ``gradguard/compare/<metric>`` at step 0), so the HParams tab's table
    and parallel-coordinates views compare rows side by side. ``log_dir`` itself gets a
    markdown table of every row (text ``gradguard/compare/table``, 3 significant digits).
    Write it to a directory of its own, not into a run that already has an hparams session.

    Args:
        log_dir: directory for the comparison's runs.
        rows: one mapping per row; must hold ``name_key``; missing hparams/metrics are
            written as ``"none"`` / left out.
        hparams: keys of the settings that tell rows apart (e.g. ``["defence", "threshold",
            "budget"]``).
        metrics: keys of the results (e.g. ``["test_accuracy", "eps_spent", "best_auc"]``);
            a non-finite or missing value is left out of that row.
        name_key: the key of each row's name.

    Returns:
        The run directories written, one per row.

    Raises:
        ValueError: no rows, a row without a name, duplicate names, or no metrics.

    Example:
        >>> import tempfile
        >>> log_comparison(tempfile.mkdtemp(), [{"name": "dp-sgd ε=8", "eps": 8.0, "acc": 0.9}],
        ...                hparams=["eps"], metrics=["acc"])[0].endswith("dp-sgd_ε_8")
        True
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    if not rows:
        raise ValueError("rows is empty: pass one mapping per compared run")
    if not metrics:
        raise ValueError("metrics is empty: name the result keys to compare, e.g. "
                         "['test_accuracy', 'best_auc']")
    names = []
    for i, row in enumerate(rows):
        if not row.get(name_key):
            raise ValueError(f"rows[{i}] has no {name_key!r}: every row needs a name")
        names.append(re.sub(r"[^\w.+-]+", "_", str(row[name_key])).strip("_") or f"row{i}")
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be distinct as directory names, got {names}")
    metric_tags = {key: f"{TAG_PREFIX}compare/{key}" for key in metrics}
    written = []
    for name, row in zip(names, rows):
        run_dir = os.path.join(os.fspath(log_dir), name)
        values = {key: _finite_or_none(row.get(key)) for key in metrics}
        hp = {key: _hparam_value(row.get(key)) for key in hparams}
        with SummaryWriter(log_dir=run_dir) as writer:
            summaries = hparams_summaries(hp, {metric_tags[k]: 0.0 for k in metrics})
            for summary in _restore_bools(summaries, hp):
                writer.file_writer.add_summary(summary, 0)
            for key, value in values.items():
                if value is not None:
                    writer.add_scalar(metric_tags[key], value, 0)
        written.append(run_dir)
    header = [name_key, *hparams, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (
        len(header) - 1)) + "|"]
    for row in rows:
        cells = [format_number(row.get(k)) for k in header]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    with SummaryWriter(log_dir=os.fspath(log_dir)) as writer:
        writer.add_text(f"{TAG_PREFIX}compare/table", "\n".join(lines), 0)
    return written


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = _as_float(value, "metric")
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
