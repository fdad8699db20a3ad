"""``gradguard report`` on untrusted run directories: links, broken JSON, hostile names."""

from __future__ import annotations

import base64
import json
import re
import warnings

import pytest
import torch

from gradguard.cli import main
from gradguard.experiments.report import write_report
from gradguard.ledger import DisclosureLedger
from gradguard.tensorboard import TensorBoardSink

SECRET = b"\x89PNG\r\n\x1a\n top secret: not part of any run " * 4


def make_run(run_dir, *, seed=0, n=20, steps=4):
    """A run directory as GradGuard.close() leaves it, built from a real ledger and sink."""
    gen = torch.Generator().manual_seed(seed)
    ledger = DisclosureLedger(n)
    with TensorBoardSink(run_dir) as sink:
        for step in range(steps):
            idx = torch.randperm(n, generator=gen)[:8]
            gnq = torch.exp(torch.randn(8, generator=gen, dtype=torch.float64))
            ledger.update(idx, gnq, step)
            sink.log_step(step, gnq=gnq, weights=None, ledger=ledger, lam=0.01)
    summary = {k: float(v) for k, v in ledger.summary().items()}
    summary["step"] = steps
    torch.save({"ledger": ledger.state_dict()}, run_dir / "gradguard_state.pt")
    (run_dir / "summary.json").write_text(json.dumps(
        {"config": {"policy": "monitor", "budget": None}, "summary": summary}))
    return ledger, summary


def make_comparison(root, names=("none",), row_names=("no defence",)):
    rows = []
    for name, row_name in zip(names, row_names, strict=True):
        make_run(root / "tb" / name)
        rows.append({"name": row_name, "defence": "none", "run_dir": str(root / "tb" / name),
                     "test_accuracy": 0.9})
    (root / "results.json").write_text(json.dumps({"rows": rows, "attacks": []}))


def embedded(html_text):
    return [base64.b64decode(m) for m in re.findall(r'base64,([^"]+)"', html_text)]


def test_a_linked_figure_is_never_embedded(tmp_path):
    root = tmp_path / "cmp"
    make_comparison(root)
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET)
    (root / "privacy_utility.png").symlink_to(secret)
    with pytest.warns(RuntimeWarning, match="privacy_utility.png.*symbolic link"):
        paths = write_report(root)
    html_text = paths["html"].read_text()
    assert SECRET not in embedded(html_text)
    assert base64.b64encode(SECRET).decode() not in html_text
    assert len(embedded(html_text)) >= 2  # the run's own figures are still there


def test_a_linked_report_md_is_replaced_not_written_through(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / "report.md").symlink_to(victim)
    (run / "report.html").symlink_to(victim)
    write_report(run)
    assert victim.read_text() == "keep me"
    assert not (run / "report.md").is_symlink() and "Most-disclosing" in (
        run / "report.md").read_text()
    assert not (run / "report.html").is_symlink()


def test_linked_run_files_are_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "gradguard_state.pt").rename(elsewhere / "state.pt")
    (run / "gradguard_state.pt").symlink_to(elsewhere / "state.pt")
    with pytest.warns(RuntimeWarning, match="gradguard_state.pt.*symbolic link"):
        paths = write_report(run)
    assert "No gradguard_state.pt" in paths["markdown"].read_text()

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "summary.json").symlink_to(run / "summary.json")
    with pytest.warns(RuntimeWarning, match="summary.json"), \
            pytest.raises(FileNotFoundError, match="no guarded run"):
        write_report(linked)


def test_a_linked_run_directory_of_a_comparison_is_skipped(tmp_path):
    root = tmp_path / "cmp"
    make_comparison(root)
    outside = tmp_path / "outside"
    make_run(outside, seed=1)
    (root / "tb" / "intruder").symlink_to(outside)
    with pytest.warns(RuntimeWarning, match="intruder"):
        paths = write_report(root)
    md = paths["markdown"].read_text()
    assert "Run `none`" in md and "intruder" not in md


@pytest.mark.parametrize(("content", "reason"), [
    (b"[1, 2, 3]", "JSON list, not the JSON object"),
    (b'"text"', "JSON str, not the JSON object"),
    (b"\xff\xfe{\x00}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
])
def test_a_bad_summary_json_names_the_file_and_why(tmp_path, capsys, content, reason):
    run = tmp_path / "run"
    make_run(run)
    (run / "summary.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(reason)) as info:
        write_report(run)
    assert str(run / "summary.json") in str(info.value)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert "summary.json" in err and reason in err and "Traceback" not in err


def test_a_bad_results_json_names_the_file(tmp_path):
    root = tmp_path / "cmp"
    make_comparison(root)
    (root / "results.json").write_text("[]")
    with pytest.raises(ValueError, match=r"results\.json.*JSON list"):
        write_report(root)


def test_raw_html_and_pipes_in_names_are_escaped(tmp_path):
    root = tmp_path / "cmp"
    hostile = "<img src=x onerror=alert(1)> a|b"
    make_comparison(root, names=("none",), row_names=(hostile,))
    paths = write_report(root)
    md = paths["markdown"].read_text()
    html_text = paths["html"].read_text()
    assert "<img src=x" not in md and "&lt;img src=x onerror=alert(1)&gt; a\\|b" in md
    assert "<img src=x" not in html_text and "&lt;img src=x onerror=alert(1)&gt; a|b" in html_text
    # The row still has as many cells as the header: the pipe did not split it.
    header, row = [line for line in md.splitlines() if line.startswith("| ")][:2]
    assert hostile.split("|")[0][5:] in html_text.replace("&lt;", "<").replace("&gt;", ">")
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", header))


def test_cli_report_prints_its_table_and_the_html_path(tmp_path, capsys):
    run = tmp_path / "run"
    ledger, summary = make_run(run)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "report.html") in out
    header, rule, row = out.splitlines()[:3]
    assert header.split()[:3] == ["run", "steps", "examples"]
    cells = row.split()
    assert cells[0] == "run" and int(cells[1]) == 4 and int(cells[2]) == int(
        (ledger.steps_seen > 0).sum())
    assert float(cells[3]) == pytest.approx(float(ledger.cum_bound.max()), rel=5e-3)
    assert "max bound" in out and "nats" in out  # the legend under the table


def test_report_outputs_leave_no_temporary_files(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run directory warns about nothing
        write_report(run)
    leftovers = [p.name for p in run.rglob(".*.tmp")]
    assert leftovers == []


@pytest.mark.parametrize("log_scale", [False, True])
def test_the_roc_legend_never_covers_the_curves(log_scale):
    import numpy as np

    from gradguard.experiments.plots import roc_figure

    rng = np.random.default_rng(0)
    curves = {f"defence {i} with a long name": (rng.normal(0.3, 1, 200), rng.normal(0, 1, 200))
              for i in range(5)}
    figure = roc_figure(curves, log_scale=log_scale)
    figure.canvas.draw()
    (axes,) = figure.axes
    assert axes.get_legend() is None and len(figure.legends) == 1
    box = figure.legends[0].get_window_extent()
    plot_area = axes.get_window_extent()
    assert box.y1 <= plot_area.y0  # entirely below the plotting area
    assert len(figure.legends[0].get_texts()) == len(curves) + 1  # every curve and chance


def test_summary_sections_of_the_wrong_type_are_ignored_not_fatal(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    (run / "summary.json").write_text(json.dumps(
        {"config": ["not", "a", "dict"], "summary": 3, "curvature_history": {"step": 1}}))
    md = write_report(run)["markdown"].read_text()
    assert "Most-disclosing" in md and "Settings:" not in md


def test_settings_are_shown_to_three_significant_digits(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    doc = json.loads((run / "summary.json").read_text())
    doc["config"]["budget"] = 75.59935312428482
    (run / "summary.json").write_text(json.dumps(doc))
    md = write_report(run)["markdown"].read_text()
    assert "budget = 75.6" in md and "75.599" not in md
