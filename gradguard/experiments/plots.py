"""Audit figures: ROC curves (linear and log-log) and privacy-vs-utility scatter plots.

Figures are built with ``matplotlib.figure.Figure`` and written by its own Agg canvas, so
nothing here touches pyplot's global state or the process-wide backend choice.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradguard._io import atomic_write_bytes
from gradguard.audit.metrics import roc_auc, roc_curve, tpr_at_fpr

__all__ = ["plot_privacy_utility", "plot_roc", "roc_figure"]

_PRIVACY_UTILITY_KEYS = ("name", "test_accuracy", "auc", "tpr_at_1pct_fpr")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(target)!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(target, buffer.getvalue())


def plot_roc(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike[str],
    *,
    log_scale: bool = False,
    title: str | None = None,
) -> Path:
    """Plot the ROC curves of one or more attacks, with the chance diagonal.

    Args:
        curves: attack name -> ``(member_scores, nonmember_scores)`` (higher = member).
        path: where to write the PNG (parent folders are created).
        log_scale: False for a linear ROC; True for a log-log ROC, which shows the low-FPR
            regime that matters for membership inference (Carlini et al., 2022). Points
            with FPR or TPR equal to 0 cannot appear on log axes; both axes start at half
            the smallest non-zero FPR of any curve (about 1/(2·n_nonmembers)).
        title: figure title; a default names the scale.

    Returns:
        The path written.

    Raises:
        ValueError: if ``curves`` is empty, a score set is empty/non-finite, or ``path``
            is not a ``.png``.
    """
    return _save(roc_figure(curves, log_scale=log_scale, title=title), path)


def roc_figure(curves: Mapping[str, tuple[Any, Any]], *, log_scale: bool = False,
               title: str | None = None) -> Any:
    """The figure :func:`plot_roc` writes (a ``matplotlib.figure.Figure``); same arguments.

    The legend sits below the axes, so it never covers a curve.
    """
    if not curves:
        raise ValueError("curves is empty: pass {attack name: (member_scores, nonmember_scores)}")
    figure = _new_figure(5.5, 5.6 + 0.2 * len(curves))
    axes = figure.subplots()
    smallest_fpr = 1.0
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curves[{name!r}] must be a (member_scores, nonmember_scores) pair")
        members, nonmembers = pair
        fpr, tpr, _ = roc_curve(members, nonmembers)
        label = (
            f"{name} (AUC {roc_auc(members, nonmembers):.3f}, "
            f"TPR@1%FPR {tpr_at_fpr(fpr, tpr, 0.01):.3f})"
        )
        if log_scale:
            shown = (fpr > 0) & (tpr > 0)
            smallest_fpr = min(smallest_fpr, float(fpr[fpr > 0].min()))
            axes.plot(fpr[shown], tpr[shown], label=label)
        else:
            axes.plot(fpr, tpr, label=label)
    if log_scale:
        low = smallest_fpr / 2
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlim(low, 1.0)
        axes.set_ylim(low, 1.0)
        chance = np.logspace(math.log10(low), 0.0, 100)
        axes.plot(chance, chance, linestyle="--", color="gray", label="chance")
    else:
        axes.set_xlim(0.0, 1.0)
        axes.set_ylim(0.0, 1.0)
        axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="chance")
        axes.set_aspect("equal")
    axes.set_xlabel("false positive rate (non-members flagged)")
    axes.set_ylabel("true positive rate (members found)")
    axes.set_title(title or f"Membership inference ROC ({'log-log' if log_scale else 'linear'})")
    axes.grid(True, which="major", alpha=0.3)
    # Below the axes, never on them: inside, a legend of several rows hides the curves.
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center",
                  fontsize="small")
    return figure


def plot_privacy_utility(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Privacy-vs-utility scatter: test accuracy against attack success, one point per run.

    Two panels share the accuracy axis: TPR at 1% FPR (left; chance is 0.01) and AUC
    (right; chance is 0.5). Up and to the left is better: accurate and hard to attack.

    Args:
        rows: one mapping per run/defence with keys ``name``, ``test_accuracy``, ``auc``,
            ``tpr_at_1pct_fpr`` (e.g. a ``mia_metrics`` dict plus name and accuracy).
        path: where to write the PNG.
        title: figure title.

    Returns:
        The path written.

    Raises:
        ValueError: if ``rows`` is empty, a row lacks a key, or a value is not a finite number.
    """
    if not rows:
        raise ValueError(
            "rows is empty: pass one dict per run with " + ", ".join(_PRIVACY_UTILITY_KEYS)
        )
    names, accuracy, auc, tpr = [], [], [], []
    for index, row in enumerate(rows):
        missing = [key for key in _PRIVACY_UTILITY_KEYS if key not in row]
        if missing:
            raise ValueError(
                f"rows[{index}] lacks {missing}; each row needs {_PRIVACY_UTILITY_KEYS}"
            )
        values = []
        for key in _PRIVACY_UTILITY_KEYS[1:]:
            value = float(row[key])
            if not math.isfinite(value):
                raise ValueError(
                    f"rows[{index}][{key!r}] must be a finite number, got {row[key]!r}"
                )
            values.append(value)
        names.append(str(row["name"]))
        accuracy.append(values[0])
        auc.append(values[1])
        tpr.append(values[2])

    figure = _new_figure(10.0, 4.5)
    left, right = figure.subplots(1, 2, sharey=True)
    panels = (
        (left, tpr, "TPR at 1% FPR (membership attack)", 0.01),
        (right, auc, "attack AUC", 0.5),
    )
    for axes, attack, xlabel, chance in panels:
        axes.scatter(attack, accuracy, s=40, zorder=3)
        for name, x, y in zip(names, attack, accuracy):
            axes.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
        axes.axvline(chance, linestyle="--", color="gray", label=f"chance ({chance:g})")
        axes.set_xlabel(xlabel)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize="small")
        # Leave room on the right so the labels of the rightmost points stay inside.
        low, high = min(min(attack), chance), max(max(attack), chance)
        pad = 0.08 * (high - low) if high > low else 0.05
        axes.set_xlim(low - pad, high + 2.5 * pad)
    left.set_ylabel("test accuracy")
    figure.suptitle(title or "Privacy vs utility (up and left is better)")
    return _save(figure, path)
