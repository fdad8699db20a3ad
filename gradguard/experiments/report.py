"""``gradguard report``: a readable summary of guarded runs, as markdown and HTML.

A guarded run's directory is what :meth:`GradGuard.close` leaves in its ``log_dir``:
``summary.json`` (settings, summary numbers, the curvature probe's history),
``gradguard_state.pt`` (the disclosure ledger, tensors only) and TensorBoard event files.
The report shows the run's summary, the most-disclosing examples by dataset *index* with
their bounds (never example contents), the distribution of cumulative bounds, GNQ and
disclosure over training (from the event files) and the curvature probe over training,
and states what the bound assumes.

Given the output directory of ``gradguard compare`` / ``gradguard demo``, it reports every
row's run found under ``tb/*`` (``seed_*/tb/*`` for a comparison repeated over seeds) and
puts the comparison table and its figures first.

``report.md`` references its figures as PNG files in ``report_files/``; ``report.html`` is
self-contained, with the same figures embedded as base64 PNG.

A run directory is untrusted input: the report never reads through a symbolic link (a
linked ``summary.json``, state file, event file, figure or run directory is skipped with a
warning, so nothing outside the directory can be embedded), never writes through one (every
output is written atomically, which replaces a link rather than its target), and names the
file and the reason when a JSON file is not UTF-8, not JSON or not an object. Text that comes
from the run (row names, settings) is escaped in both report.md and report.html.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradguard._io import atomic_write_bytes, atomic_write_text
from gradguard.formatting import format_number, format_table
from gradguard.tensorboard import TAGS

__all__ = ["RunRecord", "find_runs", "load_run", "runs_table", "write_report"]

_SUMMARY = "summary.json"
_STATE = "gradguard_state.pt"
_GNQ_TAGS = (TAGS["gnq_mean"], TAGS["gnq_p50"], TAGS["gnq_p95"], TAGS["gnq_max"])
_DISCLOSURE_TAGS = (TAGS["disclosure_max"], TAGS["disclosure_mean"])
_POLICY_TAGS = (TAGS["dropped"], TAGS["clipped"])


def _linked(path: Path) -> bool:
    """Whether reading ``path`` would go through a symbolic link (warns when it would).

    A run directory may come from anyone: a link could point at any file on this machine,
    which the self-contained report.html would then embed. Links are skipped, never followed.
    """
    if path.is_symlink():
        warnings.warn(f"gradguard report: skipping {str(path)!r}: it is a symbolic link, and "
                      "the report reads only regular files inside the run directory",
                      RuntimeWarning, stacklevel=3)
        return True
    return False


def _regular_file(path: Path) -> bool:
    """``path`` exists as a regular file that is not a link (links warn)."""
    return not _linked(path) and path.is_file()


@dataclass
class RunRecord:
    """What one guarded run left on disk.

    Attributes:
        name: the run's directory name.
        path: the run directory.
        summary: ``summary.json`` as a dict.
        ledger: the run's :class:`~gradguard.ledger.DisclosureLedger`, or None when the
            state file is missing.
        scalars: TensorBoard scalars, tag -> (steps, values); empty without event files.
    """

    name: str
    path: Path
    summary: dict[str, Any]
    ledger: Any = None
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """The guarded-run directories at ``path``.

    ``path`` itself when it holds ``summary.json``; else each ``tb/*`` of a comparison;
    else each ``seed_*/tb/*`` of a comparison repeated over seeds; else each ``*/``.

    Args:
        path: a run directory (holding ``summary.json``) or the output directory of
            ``gradguard compare`` / ``gradguard demo``.

    Returns:
        Run directories, in each comparison's row order (from its ``results.json``), seeds
        in numeric order.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds no guarded run.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory: pass the log_dir of a "
                                "GradGuard run or the --out directory of gradguard compare")
    if _regular_file(root / _SUMMARY):
        return [root]

    def directory(p: Path) -> bool:
        return not _linked(p) and p.is_dir()

    def is_run(p: Path) -> bool:
        return directory(p) and _regular_file(p / _SUMMARY)

    comparisons = [root] if directory(root / "tb") else sorted(
        (p for p in root.glob("seed_*") if directory(p) and directory(p / "tb")),
        key=lambda p: (int(p.name[5:]) if p.name[5:].isdigit() else math.inf, p.name))
    runs: list[Path] = []
    for comparison in comparisons:
        found = [p for p in sorted((comparison / "tb").glob("*")) if is_run(p)]
        order = _row_order(comparison)
        rank = {name: i for i, name in enumerate(order)}
        runs += sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))
    if not runs:
        runs = [p for p in sorted(root.glob("*")) if is_run(p)]
    if not runs:
        raise FileNotFoundError(
            f"no guarded run in {str(root)!r}: expected {_SUMMARY} (written by GradGuard.close() "
            f"into its log_dir) there, in tb/*/ or in seed_*/tb/*/ (gradguard compare's layouts)")
    return runs


def _comparison_of(run_dir: Path) -> Path | None:
    """The comparison directory a run belongs to (``<comparison>/tb/<row>``), if any."""
    return run_dir.parent.parent if run_dir.parent.name == "tb" else None


def _row_order(comparison: Path) -> list[str]:
    results = _read_results(comparison)
    if not results:
        return []
    return [Path(str(r.get("run_dir", ""))).name for r in results.get("rows", [])]


def _read_results(root: Path) -> dict[str, Any] | None:
    return _read_json(root / "results.json")


def load_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    """Read one guarded run's directory.

    Args:
        run_dir: the directory GradGuard wrote (its ``log_dir``).

    Returns:
        A :class:`RunRecord`.

    Raises:
        FileNotFoundError: no ``summary.json`` (or only a symbolic link by that name).
        ValueError: ``summary.json`` is not a UTF-8 JSON object, or ``gradguard_state.pt``
            cannot be parsed.
    """
    from gradguard.ledger import DisclosureLedger

    path = Path(run_dir)
    summary_path = path / _SUMMARY
    summary = _read_json(summary_path)
    if summary is None:
        raise FileNotFoundError(f"{str(summary_path)!r} not found: is {str(path)!r} the log_dir "
                                "of a GradGuard run that was closed (guard.close())?")
    ledger = None
    state_path = path / _STATE
    if _regular_file(state_path):
        try:
            # weights_only: the state is tensors only, and nothing else may be unpickled.
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            ledger = DisclosureLedger(None)
            ledger.load_state_dict(state["ledger"])
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            raise ValueError(f"cannot read the ledger in {str(state_path)!r} "
                             f"({type(err).__name__}: {err})") from err
    return RunRecord(name=path.name, path=path, summary=summary, ledger=ledger,
                     scalars=_read_scalars(path))


def _read_scalars(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    events = list(path.glob("events.out.tfevents.*"))
    if any([_linked(p) for p in events]) or not events:
        return {}  # the accumulator would follow a link: read no event file then
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=np.float64)
        order = np.argsort(steps, kind="stable")
        out[tag] = (steps[order], values[order])
    return out


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: Path) -> None:
    """Render to memory, then write atomically (replacing a link at ``path``, never its target)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _bound_histogram(run: RunRecord, path: Path) -> bool:
    if run.ledger is None:
        return False
    seen = run.ledger.steps_seen > 0
    bounds = run.ledger.cum_bound[seen].numpy()
    if bounds.size == 0:
        return False
    figure = _figure(6.0, 3.6)
    axes = figure.subplots()
    axes.hist(bounds, bins=min(50, max(5, bounds.size // 10)), color="tab:blue", alpha=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("cumulative disclosure bound Σ½ln(1+GNQ) (nats)")
    axes.set_ylabel("examples (log scale)")
    axes.set_title(f"{run.name}: per-example cumulative bounds ({bounds.size} examples)")
    axes.grid(True, alpha=0.3)
    _save_png(figure, path)
    return True


def _series_plot(run: RunRecord, tags: Sequence[str], path: Path, *, title: str, ylabel: str,
                 log_y: bool = False) -> bool:
    present = [t for t in tags if t in run.scalars and run.scalars[t][0].size]
    if not present:
        return False
    figure = _figure(6.0, 3.6)
    axes = figure.subplots()
    for tag in present:
        steps, values = run.scalars[tag]
        axes.plot(steps, values, label=tag.removeprefix("gradguard/"))
    if log_y and all((run.scalars[t][1] > 0).all() for t in present):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{run.name}: {title}")
    axes.grid(True, alpha=0.3)
    figure.legend(fontsize="small", loc="outside lower center", ncols=len(present))
    _save_png(figure, path)
    return True


def _curvature_plot(run: RunRecord, path: Path) -> bool:
    history = run.summary.get("curvature_history")
    history = [h for h in (history if isinstance(history, list) else [])
               if isinstance(h, Mapping) and "step" in h]
    if not history:
        return False
    steps = [h["step"] for h in history]
    figure = _figure(6.0, 3.6)
    axes = figure.subplots()
    for key, label in (("members_mean", "members (training set)"),
                       ("nonmembers_mean", "non-members (held out)")):
        axes.plot(steps, [_nan(h.get(key)) for h in history], marker="o", label=label)
    axes.set_xlabel("optimizer step")
    estimator = history[-1].get("estimator", "?")
    axes.set_ylabel(f"mean input-loss curvature ({estimator})")
    twin = axes.twinx()
    twin.plot(steps, [_nan(h.get("auc")) for h in history], color="black", linestyle="--",
              label="attack AUC (right)")
    twin.set_ylabel("curvature attack AUC")
    twin.set_ylim(0.0, 1.0)
    lines = axes.get_legend_handles_labels()
    twin_lines = twin.get_legend_handles_labels()
    # Below the axes: inside, the legend covers the curves.
    figure.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize="small",
                  loc="outside lower center", ncols=3)
    direction = history[-1].get("direction", "lower")
    axes.set_title(f"{run.name}: curvature probe ({direction} curvature = member)")
    axes.grid(True, alpha=0.3)
    _save_png(figure, path)
    return True


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


# --------------------------------------------------------------------------- report text


@dataclass
class _Section:
    """One block of the report, rendered to both markdown and HTML."""

    kind: str  # "h1" "h2" "h3" "p" "table" "image" "list"
    content: Any


def _run_sections(run: RunRecord, files_dir: Path, top_k: int,
                  canaries: set[int]) -> list[_Section]:
    from gradguard.ledger import BOUND_ASSUMPTIONS

    out = [_Section("h2", f"Run `{run.name}`"), _Section("p", f"Directory: `{run.path}`")]
    config = _mapping(run.summary.get("config"))
    if config:
        out.append(_Section("p", "Settings: " + ", ".join(
            f"{k} = {format_number(v)}" for k, v in config.items())))
    summary = _mapping(run.summary.get("summary"))
    if summary:
        names = {"step": "optimizer steps", "examples_seen": "examples seen",
                 "max_bound": "largest cumulative bound (nats)",
                 "mean_bound": "mean cumulative bound (nats)", "max_gnq": "largest GNQ",
                 "dropped_total": "example-steps dropped", "clipped_total": "example-steps clipped",
                 "censored_total": "examples censored", "skipped_nonfinite":
                 "steps skipped (non-finite)", "guard_seconds": "guard time (s)",
                 "probe_seconds": "curvature probe time (s)"}
        rows = [[label, _number(summary[key])] for key, label in names.items() if key in summary]
        out.append(_Section("table", (["quantity", "value"], rows)))

    out.append(_Section("h3", "Most-disclosing examples"))
    if run.ledger is None:
        out.append(_Section("p", f"No {_STATE} in this run directory: no per-example table."))
    else:
        top = run.ledger.top(top_k, by="cum_bound")
        header = ["rank", "dataset index", "steps seen", "cum. bound (nats)", "max GNQ",
                  "mean GNQ", "censored", "mean curvature"]
        if canaries:
            header.append("canary")
        rows = []
        for rank, r in enumerate(top, start=1):
            mean_gnq = r["cum_gnq"] / r["steps_seen"] if r["steps_seen"] else math.nan
            cells = [str(rank), str(r["index"]), str(r["steps_seen"]), _number(r["cum_bound"]),
                     _number(r["max_gnq"]), _number(mean_gnq), "yes" if r["censored"] else "no",
                     _number(r["curvature_mean"])]
            if canaries:
                cells.append("yes" if r["index"] in canaries else "")
            rows.append(cells)
        if rows:
            out.append(_Section("table", (header, rows)))
        else:
            out.append(_Section("p", "No example was seen in this run."))
        note = ("Dataset indices and numbers only: no example contents are shown. "
                + BOUND_ASSUMPTIONS)
        if canaries:
            in_top = sum(1 for r in top if r["index"] in canaries)
            note += (f" {in_top} of these {len(top)} are planted canaries "
                     f"({len(canaries)} canaries among the members).")
        out.append(_Section("p", note))

    out.append(_Section("h3", "Over training"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name)
    figures = [
        (f"{slug}_bounds.png", lambda p: _bound_histogram(run, p),
         "Distribution of the cumulative bounds."),
        (f"{slug}_gnq.png", lambda p: _series_plot(run, _GNQ_TAGS, p, title="GNQ per step",
                                                   ylabel="GNQ", log_y=True),
         "GNQ of each logged step's batch (mean, median, 95th percentile, max)."),
        (f"{slug}_disclosure.png",
         lambda p: _series_plot(run, _DISCLOSURE_TAGS, p, title="cumulative disclosure bound",
                                ylabel="nats"),
         "Largest and mean cumulative bound over the examples seen so far."),
        (f"{slug}_policy.png",
         lambda p: _series_plot(run, _POLICY_TAGS, p, title="examples acted on",
                                ylabel="examples"),
         "Examples dropped / clipped in the logged step, and censored so far."),
        (f"{slug}_curvature.png", lambda p: _curvature_plot(run, p),
         "Curvature probe: mean curvature of members and non-members, and the attack's AUC."),
    ]
    made = 0
    for filename, draw, caption in figures:
        if config.get("policy") == "monitor" and filename.endswith("_policy.png"):
            continue  # a monitor never acts: an all-zero chart says nothing
        target = files_dir / filename
        if draw(target):
            out.append(_Section("image", (target, caption)))
            made += 1
    if not made:
        out.append(_Section("p", "No time series in this run (no event files or probes)."))
    return out


_number = format_number


def _mapping(value: Any) -> Mapping[str, Any]:
    """A section of summary.json, or {} when the file holds something else there."""
    return value if isinstance(value, Mapping) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of the run directory, or None when absent (or a link, skipped).

    Raises:
        ValueError: the file is not UTF-8, not JSON, or not a JSON object; the message names
            the file and says which.
    """
    if not _regular_file(path):
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}): it is not a "
                         "file gradguard wrote; restore or delete it") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); restore or delete it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(value).__name__}, not the JSON object "
                         "gradguard writes; restore or delete it")
    return value


def _comparison_sections(root: Path, results: Mapping[str, Any], *,
                         title: str = "Comparison") -> list[_Section]:
    from gradguard.experiments.compare import markdown_table

    out = [_Section("h2", title)]
    rows = [r for r in results.get("rows", []) if isinstance(r, Mapping) and "name" in r]
    if rows:
        # Row names come from the run directory: escaped so they cannot inject HTML or cells.
        safe = [{**r, "name": _md_escape(str(r["name"]))} for r in rows]
        out.append(_Section("markdown_table", markdown_table(safe)))
    notes = results.get("notes", [])
    if notes:
        out.append(_Section("list", list(notes)))
    for name, caption in (("privacy_utility.png", "Privacy vs utility (strongest attack per row)."),
                          *[(f"roc_{a}_log.png", f"{a}: log-log ROC, one curve per row.")
                            for a in results.get("attacks", [])]):
        if _regular_file(root / name):
            out.append(_Section("image", (root / name, caption)))
    return out


def write_report(path: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None,
                 top_k: int = 20) -> dict[str, Any]:
    """Write ``report.md`` and ``report.html`` for a guarded run or a comparison.

    Args:
        path: a run directory or a comparison's output directory (see :func:`find_runs`).
        out_dir: where to write (default: ``path``); figures go to ``report_files/`` there.
        top_k: rows of each most-disclosing-examples table.

    Returns:
        ``{"markdown": path, "html": path, "text": summary}``: the two files written, and
        a plain-text summary (the comparison table if any, then one row per run) for the
        terminal.

    Raises:
        FileNotFoundError: no run found at ``path``.
        ValueError: ``top_k`` < 1, an unreadable run file, or ``report_files`` is a link.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    root = Path(path)
    runs = [load_run(p) for p in find_runs(root)]
    out = Path(out_dir) if out_dir is not None else root
    files_dir = out / "report_files"
    if files_dir.is_symlink():
        raise ValueError(f"{str(files_dir)!r} is a symbolic link: the report writes its figures "
                         "only into a real directory; remove the link")
    files_dir.mkdir(parents=True, exist_ok=True)

    sections = [_Section("h1", f"gradguard report: {root}")]
    summary = _read_json(root / "results_over_seeds.json")
    results = _read_results(root)
    if summary and "seeds" in summary:
        sections += _comparison_sections(root, summary, title="Comparison over seeds")
    elif results:
        sections += _comparison_sections(root, results)
    for run in runs:
        comparison = _comparison_of(run.path)
        canaries: set[int] = set()
        if comparison is not None:
            if comparison != root:
                run.name = f"{comparison.name}/{run.name}"
            info = _read_results(comparison) or {}
            canaries = set(info.get("split", {}).get("train_canary_indices", []))
        sections += _run_sections(run, files_dir, top_k, canaries)

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, _markdown(sections, out))
    atomic_write_text(html_path, _html(sections, f"gradguard report: {root}"))
    return {"markdown": md_path, "html": html_path, "text": runs_table(runs)}


_RUN_COLUMNS = (("step", "steps"), ("examples_seen", "examples"), ("max_bound", "max bound"),
                ("mean_bound", "mean bound"), ("max_gnq", "max GNQ"),
                ("dropped_total", "dropped"), ("clipped_total", "clipped"),
                ("censored_total", "censored"))

#: Meaning of each column of :func:`runs_table`.
RUNS_TABLE_LEGEND = {
    "steps": "optimizer steps",
    "examples": "training examples seen at least once",
    "max bound / mean bound": "largest / mean cumulative bound Σ½ln(1+GNQ) over examples, nats",
    "max GNQ": "largest per-example gradient uniqueness at one step",
    "dropped / clipped": "example-steps the policy dropped / down-weighted",
    "censored": "examples a budget excluded from further updates",
}


def runs_table(runs: Sequence[RunRecord]) -> str:
    """One aligned row per run of its summary numbers (3 significant digits).

    Args:
        runs: the runs, as :func:`load_run` returns them.

    Returns:
        The table, without a trailing newline.
    """
    header = ["run"] + [label for _, label in _RUN_COLUMNS]
    rows = []
    for run in runs:
        numbers = _mapping(run.summary.get("summary"))
        rows.append([run.name] + [_plain(numbers.get(key)) for key, _ in _RUN_COLUMNS])
    return format_table(header, rows)


def _plain(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _markdown(sections: Sequence[_Section], base: Path) -> str:
    lines: list[str] = []
    for s in sections:
        if s.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(s.kind[1]) + " " + _md_escape(s.content), ""]
        elif s.kind == "p":
            lines += [_md_escape(s.content), ""]
        elif s.kind == "list":
            lines += [f"- {_md_escape(item)}" for item in s.content] + [""]
        elif s.kind == "markdown_table":
            lines += [s.content, ""]
        elif s.kind == "table":
            header, rows = s.content
            lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif s.kind == "image":
            target, caption = s.content
            rel = os.path.relpath(target, base)
            caption = _md_escape(caption)
            lines += [f"![{caption}]({Path(rel).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _md_escape(text: Any) -> str:
    """Markdown text that renders as written: raw HTML escaped, ``|`` kept out of tables."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


_md_cell = _md_escape


def _html(sections: Sequence[_Section], title: str) -> str:
    body: list[str] = []
    for s in sections:
        if s.kind in ("h1", "h2", "h3"):
            body.append(f"<{s.kind}>{_inline(s.content)}</{s.kind}>")
        elif s.kind == "p":
            body.append(f"<p>{_inline(s.content)}</p>")
        elif s.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in s.content) + "</ul>")
        elif s.kind == "markdown_table":
            body.append(_markdown_table_to_html(s.content))
        elif s.kind == "table":
            header, rows = s.content
            body.append(_html_table(header, rows))
        elif s.kind == "image":
            target, caption = s.content
            if _linked(Path(target)):
                continue
            data = base64.b64encode(Path(target).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(caption)}" '
                        f'src="data:image/png;base64,{data}"/>'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
             "font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}"
             "code{background:#f3f3f3;padding:0 3px}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    escaped = html.escape(str(text))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table_to_html(table: str) -> str:
    """Markdown table to HTML; cells escaped with :func:`_md_escape` are unescaped first."""
    lines = [line.strip() for line in table.strip().splitlines()]
    cells = [[html.unescape(c.strip().replace("\\|", "|"))
              for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines]
    return _html_table(cells[0], cells[2:])
