"""examples/llm_finetune_lora.py runs end to end and ranks the planted random sequences first."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "llm_finetune_lora.py")


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, EXAMPLE, *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_lora_example_prints_the_planted_sequences_first():
    pytest.importorskip("peft")
    out = _run()
    assert out.returncode == 0, out.stderr[-2000:]
    planted = {int(i) for i in re.search(r"planted random sequences: \[([\d, ]+)\]",
                                         out.stdout).group(1).split(",")}
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(yes)?\s+[\d.]+\s+[\d.]+$", out.stdout, re.M)
    assert len(rows) == 8
    top = [int(index) for _, index, _ in rows]
    assert all((i in planted) == bool(mark) for i, (_, _, mark) in zip(top, rows))
    # 8 planted among 192: by chance about 0.3 of them would reach the top 8
    assert len(planted & set(top)) >= 3


def test_lora_example_names_the_extra_when_peft_is_missing():
    code = ("import sys, runpy; sys.modules['peft'] = None; sys.argv = ['x'];"
            f"runpy.run_path({EXAMPLE!r}, run_name='__main__')")
    out = _run(code=code)
    assert out.returncode != 0
    assert 'pip install -e ".[huggingface]"' in out.stderr and "peft" in out.stderr
