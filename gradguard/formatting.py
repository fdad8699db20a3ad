"""Plain-text formatting shared by everything gradguard prints: numbers, tables, summaries.

Pure functions of plain Python values (no torch import), so the command line and the
examples can use them cheaply. Numbers are shown to 3 significant digits; a missing or
non-finite value is shown as ``–`` rather than ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MISSING",
    "TOP_COLUMNS",
    "TopTable",
    "format_legend",
    "format_number",
    "format_run_summary",
    "format_table",
]

#: What a missing or non-finite number prints as.
MISSING = "–"

#: Columns of a printed ``ledger.top(k)``: (header, what it means).
TOP_COLUMNS: dict[str, str] = {
    "index": "dataset index of the example (its position in the training set)",
    "steps": "optimizer steps the example took part in",
    "bound": "cumulative disclosure bound Σ½ln(1+GNQ) in nats (a monitoring signal, not DP)",
    "max GNQ": "largest gradient uniqueness of the example at one step",
    "mean GNQ": "its GNQ averaged over the steps it took part in",
    "censored": "whether a budget excluded it from later updates",
    "curvature": f"mean input-loss curvature from the probes ({MISSING}: never probed)",
}


def format_number(value: Any, *, digits: int = 3) -> str:
    """Format a number to ``digits`` significant digits for people to read.

    Integers, integral floats and numbers from 1000 to 1e6 print whole; ``None``, NaN and
    ±inf print as ``–``; bools as ``yes``/``no``; anything else as its ``str``.

    Args:
        value: the value.
        digits: significant digits of non-integral numbers.

    Returns:
        The formatted text.

    Example:
        >>> [format_number(v) for v in (0.9053803339517625, 77312.4, 12.0, None, float("nan"))]
        ['0.905', '77312', '12', '–', '–']
    """
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        if abs(value) < 1e6 and (value == int(value) or abs(value) >= 10 ** digits - 0.5):
            return f"{value:.0f}"  # whole numbers and 1000 ≤ |x| < 1e6 read best without e+
        return f"{value:#.{digits}g}".rstrip(".")  # '#': 11.0 stays "11.0", not "11"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                 indent: str = "") -> str:
    """An aligned plain-text table: text columns left-aligned, numbers right-aligned.

    Cells that are not strings go through :func:`format_number`.

    Args:
        header: column names.
        rows: one sequence of cells per row, each as long as ``header``.
        indent: text put before every line.

    Returns:
        The table, one line per row under a header and a rule, without a trailing newline.

    Raises:
        ValueError: a row's length differs from the header's.

    Example:
        >>> print(format_table(["name", "GNQ"], [["a", 0.5], ["bb", 1234.5]]))
        name    GNQ
        ----  -----
        a     0.500
        bb     1234
    """
    cells = []
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"every row needs {len(header)} cells (one per column "
                             f"{list(header)}), got {len(row)}: {list(row)!r}")
        cells.append([c if isinstance(c, str) else format_number(c) for c in row])
    # A column is numeric when every cell is a number (or missing); bools read as text.
    numeric = [all(not isinstance(row[i], (str, bool)) or row[i] == MISSING for row in rows)
               for i in range(len(header))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return (indent + "  ".join(parts)).rstrip()

    out = [line(list(header)), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def format_legend(columns: Mapping[str, str], *, indent: str = "") -> str:
    """A legend for a table's abbreviated columns: one ``name: meaning`` line each.

    Example:
        >>> print(format_legend({"AUC": "area under the ROC curve"}))
        AUC: area under the ROC curve
    """
    return "\n".join(f"{indent}{name}: {meaning}" for name, meaning in columns.items())


def _top_cells(row: Mapping[str, Any]) -> list[Any]:
    steps = row["steps_seen"]
    mean_gnq = row["cum_gnq"] / steps if steps else None
    return [row["index"], steps, row["cum_bound"], row["max_gnq"], mean_gnq,
            bool(row["censored"]), row.get("curvature_mean")]


class TopTable(list):
    """The rows of :meth:`DisclosureLedger.top`: a list of dicts that prints as a table.

    Indexing, iteration and comparison behave as for the plain list of dicts (same keys);
    only the printed form changes: an aligned table of the columns in :data:`TOP_COLUMNS`,
    numbers to 3 significant digits, ``–`` for an example never probed for curvature.

    Example:
        >>> rows = TopTable([{"index": 7, "steps_seen": 3, "cum_gnq": 3.0, "max_gnq": 2.5,
        ...                   "cum_bound": 1.2345, "censored": False,
        ...                   "curvature_mean": float("nan")}])
        >>> rows[0]["index"]
        7
        >>> print(rows)
        index  steps  bound  max GNQ  mean GNQ  censored  curvature
        -----  -----  -----  -------  --------  --------  ---------
            7      3   1.23     2.50         1  no                –
    """

    def __str__(self) -> str:
        if not self:
            return "(no example seen yet)"
        return format_table(list(TOP_COLUMNS), [_top_cells(row) for row in self])

    __repr__ = __str__

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter
        printer.text(str(self))

    def legend(self) -> str:
        """What each printed column means."""
        return format_legend(TOP_COLUMNS)


_SUMMARY_LINES = (
    ("step", "optimizer steps"),
    ("examples_seen", "examples seen"),
    ("max_bound", "largest cumulative bound (nats)"),
    ("mean_bound", "mean cumulative bound (nats)"),
    ("max_gnq", "largest GNQ"),
    ("dropped_total", "example-steps dropped"),
    ("clipped_total", "example-steps clipped"),
    ("censored_total", "examples censored"),
    ("skipped_nonfinite", "steps skipped (non-finite)"),
    ("realised_rate", "realised rate (share of examples dropped or clipped)"),
    ("sketched_layers", "layers whose GNQ is a sketch estimate (strategy='sketch')"),
)


def format_run_summary(summary: Mapping[str, Any], *, log_dir: str | None) -> str:
    """The few lines to show when a guarded run ends.

    Args:
        summary: ``GradGuard.summary()`` (plain numbers); keys it lacks are left out.
        log_dir: the run directory, or None when nothing was written.

    Returns:
        Multi-line text: the run's numbers, then where the logs are and how to open them.

    Example:
        >>> print(format_run_summary({"step": 40, "examples_seen": 1000.0,
        ...                           "max_bound": 12.3456, "mean_bound": 3.21,
        ...                           "dropped_total": 0.0}, log_dir=None))
        gradguard: 40 optimizer steps, 1000 examples seen; largest cumulative bound 12.3 nats, mean 3.21 nats
        No logs written (no log_dir).
    """  # noqa: E501
    parts = []
    if "step" in summary or "examples_seen" in summary:
        parts.append(", ".join(f"{format_number(summary[k])} {label}" for k, label in
                               (("step", "optimizer steps"), ("examples_seen", "examples seen"))
                               if k in summary))
    if "max_bound" in summary:
        text = f"largest cumulative bound {format_number(summary['max_bound'])} nats"
        if "mean_bound" in summary:
            text += f", mean {format_number(summary['mean_bound'])} nats"
        parts.append(text)
    acted = [f"{format_number(summary[k])} {label}" for k, label in _SUMMARY_LINES[5:]
             if summary.get(k)]  # a policy that never acted needs no "0 dropped"
    if acted:
        parts.append(", ".join(acted))
    lines = ["gradguard: " + "; ".join(parts)]
    if log_dir is None:
        lines.append("No logs written (no log_dir).")
    else:
        lines.append(f"Logs in {log_dir}: open with `tensorboard --logdir {log_dir}` (Custom "
                     f"Scalars tab), or `gradguard report {log_dir}` for report.html.")
    return "\n".join(lines)
