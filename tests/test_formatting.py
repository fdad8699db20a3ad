"""Terminal formatting: numbers to 3 significant digits, aligned tables, the printed top-k."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.formatting import (
    MISSING,
    TOP_COLUMNS,
    TopTable,
    format_legend,
    format_number,
    format_run_summary,
    format_table,
)
from gradguard.ledger import DisclosureLedger


@pytest.mark.parametrize("seed", range(5))
def test_format_number_keeps_three_significant_digits(seed):
    rng = np.random.default_rng(seed)
    for value in rng.lognormal(0.0, 6.0, size=200) * rng.choice([-1, 1], size=200):
        text = format_number(float(value))
        assert "nan" not in text and len(text) <= 9, text
        parsed = float(text)
        # Whole-number display (1000 ≤ |x| < 1e6) rounds to the unit; otherwise 3 digits.
        tolerance = 0.5 if 1e3 <= abs(value) < 1e6 else 5e-3 * abs(value) * 1.0001
        assert abs(parsed - value) <= tolerance, (value, text)


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_missing_values_print_as_a_dash(value):
    assert format_number(value) == MISSING


def test_format_number_whole_numbers_bools_and_tensors():
    assert format_number(12) == "12"
    assert format_number(3.0) == "3"
    assert format_number(True) == "yes"
    assert format_number(torch.tensor(0.123456)) == "0.123"
    assert format_number(np.float64(2.5e-7)) == "2.50e-07"
    assert format_number(10.96) == "11.0"  # 3 significant digits, trailing zero kept


def test_format_table_aligns_columns():
    text = format_table(["name", "value"], [["a", 1.0], ["longer", 123.456], ["c", None]])
    lines = text.splitlines()
    assert len(lines) == 5
    # Every line of a numeric column ends at the same position: right-aligned.
    ends = {len(line) for line in lines}
    assert len(ends) == 1
    assert lines[3].startswith("longer") and lines[3].endswith("123")
    assert lines[4].endswith(MISSING)


def test_format_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table(["a", "b"], [[1]])


def test_printed_top_matches_an_independent_ranking():
    torch.manual_seed(0)
    n = 30
    ledger = DisclosureLedger(n)
    gnq_all = []
    for step in range(6):
        idx = torch.randperm(n)[:10]
        gnq = torch.rand(10, dtype=torch.float64) * 10.0 ** torch.randint(-2, 5, (10,))
        ledger.update(idx, gnq, step)
        gnq_all.append((idx, gnq))
    ledger.add_curvature(torch.tensor([0, 1]), torch.tensor([0.5, 0.25]))
    # Independent reference: per-index sums of ½ln(1+GNQ) with numpy.
    bound = np.zeros(n)
    seen = np.zeros(n, dtype=int)
    for idx, gnq in gnq_all:
        np.add.at(bound, idx.numpy(), 0.5 * np.log1p(gnq.numpy()))
        np.add.at(seen, idx.numpy(), 1)
    order = [i for i in np.argsort(-bound, kind="stable") if seen[i] > 0][:5]

    top = ledger.top(5)
    assert isinstance(top, TopTable) and isinstance(top, list)
    assert [row["index"] for row in top] == order  # still a list of dicts, same keys
    lines = str(top).splitlines()
    assert lines[0].split()[:3] == ["index", "steps", "bound"]
    for line, i in zip(lines[2:], order):
        cells = line.split()
        assert int(cells[0]) == i and int(cells[1]) == seen[i]
        assert float(cells[2]) == pytest.approx(bound[i], rel=5e-3, abs=0.5)
    assert "nan" not in str(top) and "curv_sum" not in str(top)
    assert repr(top) == str(top)
    assert all(name in top.legend() for name in TOP_COLUMNS)


def test_empty_top_prints_a_sentence():
    assert "no example" in str(DisclosureLedger(3).top(5))


def test_legend_lists_every_column():
    text = format_legend({"AUC": "area under the ROC curve", "ε": "privacy budget"})
    assert text.splitlines() == ["AUC: area under the ROC curve", "ε: privacy budget"]


def test_run_summary_states_numbers_and_where_the_logs_are():
    summary = {"step": 96, "examples_seen": 1437.0, "max_bound": 185.77777, "mean_bound": 24.1234,
               "max_gnq": 77312.4, "dropped_total": 150.0, "clipped_total": 0.0,
               "censored_total": 3.0}
    text = format_run_summary(summary, log_dir="runs/x")
    assert "96 optimizer steps" in text and "1437 examples seen" in text
    assert "186 nats" in text and "24.1 nats" in text
    assert "150 example-steps dropped" in text and "3 examples censored" in text
    assert "clipped" not in text  # nothing clipped: not worth a line
    assert "tensorboard --logdir runs/x" in text and "gradguard report runs/x" in text
    assert "No logs" in format_run_summary(summary, log_dir=None)
