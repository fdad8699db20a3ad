"""Smoke test of the benchmark suite's machinery (benchmarks/run.py) at minimal sizes.

No timing assertions: only that one run produces every section with the documented
structure, that the memory figures are positive where they must be, and that the CLI
writes the same structure as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest

RUN = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gradguard_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _check_rows(bench, rows, models, batch_sizes):
    by = {(r["model"], r["batch_size"], r["variant"]): r for r in rows}
    for m in models:
        for B in batch_sizes:
            for v in bench.VARIANTS:
                row = by[(m, B, v)]
                assert "error" not in row, row
                assert row["repeats"] >= 1
                assert row["median_step_s"] > 0 and math.isfinite(row["median_step_s"])
                assert row["q25_step_s"] <= row["median_step_s"] <= row["q75_step_s"]
                assert row["ratio_vs_plain"] > 0
                assert row["memory_peak_bytes"] > 0, (m, B, v)
                assert "extra_bytes" in row
            assert by[(m, B, "plain")]["ratio_vs_plain"] == 1.0
            assert by[(m, B, "plain")]["extra_bytes"] == 0


def test_run_suite_structure(bench):
    models, batch_sizes = ["mlp"], [4]
    result = bench.run_suite(models=models, batch_sizes=batch_sizes, warmup=1, repeats=2,
                             cell_budget_s=0.0, scaling_batch_sizes=[4, 8], scaling_repeats=1,
                             curvature=True, curvature_batch_size=4, scale="tiny",
                             log=lambda s: None)
    assert set(result) >= {"machine", "config", "results", "gnq_scaling", "curvature",
                           "targets", "wall_s"}
    machine = result["machine"]
    assert machine["torch"] and machine["torch_threads"] >= 1 and machine["cpu"]
    _check_rows(bench, result["results"], models, batch_sizes)
    # GNQ scaling: one row per batch size, Gram and solve timed apart, slopes attached.
    assert [r["batch_size"] for r in result["gnq_scaling"]] == [4, 8]
    for r in result["gnq_scaling"]:
        assert r["gram_s"] > 0 and r["solve_s"] > 0 and "solve_exponent" in r
    # Curvature: either measured per estimator, or skipped with a reason.
    curv = result["curvature"]
    if "skipped" not in curv:
        mlp = curv["models"]["mlp"]
        assert set(mlp) == {"hutchinson", "fd", "zo"}
        for entry in mlp.values():
            assert entry.get("seconds_per_example", 0) > 0 or "error" in entry
    for t in result["targets"]:
        assert set(t) == {"target", "value", "pass", "detail"} and isinstance(t["pass"], bool)
    report = bench.format_report(result, "python benchmarks/run.py --scale tiny")
    assert "| model | B | variant |" in report and "Targets" in report
    json.dumps(result)  # everything is JSON-able


def test_cli_writes_json(bench, tmp_path):
    out = tmp_path / "results.json"
    rc = bench.main(["--scale", "tiny", "--models", "cnn", "--batch-sizes", "3", "--repeats",
                     "1", "--cell-budget", "0", "--scaling-batch-sizes", "3", "--no-curvature",
                     "--threads", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python benchmarks/run.py")
    assert doc["machine"]["torch_threads"] == 1
    _check_rows(bench, doc["results"], ["cnn"], [3])
    assert doc["curvature"] is None


def test_transformer_cell_and_curvature_skip(bench):
    rows = bench.summarise_cell(
        bench.run_cell(bench.model_spec("transformer", scale="tiny"), 2,
                       ["plain", "gg_monitor", "opacus_hooks"], warmup=1, repeats=1,
                       budget_s=0.0, memory=False, device=bench.torch.device("cpu"),
                       log=lambda s: None), n_params=1)
    assert [r["variant"] for r in rows] == ["plain", "gg_monitor", "opacus_hooks"]
    assert all("error" not in r and r["median_step_s"] > 0 for r in rows)
    curv = bench.curvature_costs([bench.model_spec("transformer", scale="tiny")], batch_size=2,
                                 repeats=1, plain_step_s={}, device=bench.torch.device("cpu"))
    if "skipped" not in curv:  # token ids are not differentiable inputs
        assert "skipped" in curv["models"]["transformer"]


def test_targets_are_judged_from_rows(bench):
    rows = [
        {"model": "mlp", "batch_size": 128, "variant": "gg_monitor", "ratio_vs_plain": 1.2,
         "median_step_s": 1.0, "extra_bytes": 10},
        {"model": "mlp", "batch_size": 128, "variant": "gg_drop", "ratio_vs_plain": 1.9,
         "median_step_s": 1.5},
        {"model": "mlp", "batch_size": 128, "variant": "opacus_hooks", "median_step_s": 0.5},
        {"model": "mlp", "batch_size": 128, "variant": "naive_gnq", "median_step_s": 4.0,
         "extra_bytes": 1000},
    ]
    got = {t["target"]: t for t in bench.check_targets(rows, None)}
    assert got["gg_monitor ≤ 1.5× plain (mlp, B=128)"]["pass"] is True
    assert got["gg_drop ≤ 1.7× plain (mlp, B=128)"]["pass"] is False
    assert got["gg_monitor faster than opacus_hooks (mlp, B=128)"]["pass"] is False
    assert got["gg_monitor ≥ 3× faster than naive_gnq (mlp, B=128)"]["value"] == 4.0
    assert got["gg_monitor ≥ 10× less extra memory than naive_gnq (mlp, B=128)"]["pass"]


def test_gpt2_rows_run_at_tiny_scale(bench):
    pytest.importorskip("peft")
    result = bench.run_suite(models=list(bench.LM_MODELS), scale="tiny", warmup=1, repeats=1,
                             cell_budget_s=0.1, memory=False, scaling_batch_sizes=None,
                             curvature=False, log=lambda s: None)
    rows = {(r["model"], r["variant"]): r for r in result["results"]}
    for model in bench.LM_MODELS:
        for variant in bench.model_spec(model).variants:
            row = rows[(model, variant)]
            assert "error" not in row, row
            assert row["batch_size"] == bench.LM_BATCH and row["median_step_s"] > 0
    assert {t["target"].split(" (")[1] for t in result["targets"]} >= {
        f"{m}, B={bench.LM_BATCH})" for m in bench.LM_MODELS}
