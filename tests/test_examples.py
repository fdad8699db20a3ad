"""Every example runs end to end at a tiny size and prints its table the shared way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.spawn import GLOO_ABORT

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, *args, cwd, prelude="", timeout=600):
    """Run ``examples/<name>`` in a fresh interpreter (optionally after ``prelude``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    script = EXAMPLES / name
    code = (f"import runpy, sys\n{prelude}\nsys.path.insert(0, {str(EXAMPLES)!r})\n"
            f"sys.argv = [{str(script)!r}, *{list(args)!r}]\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_top_table(stdout):
    """The shared top-k table (gradguard.formatting.TopTable) is printed, without nan."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["index", "steps",
                                                                            "bound"])
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    assert lines[header + 2].split()[0].isdigit()
    assert "nan" not in stdout


FAST = [
    ("wrap_existing_loop.py", ["--epochs", "1"], "--log-dir"),
]
SLOW = [  # about 10 s or more each on 2 busy cores
    ("with_opacus.py", ["--epochs", "1"], "--log-dir"),
    ("curvature_probe.py", ["--epochs", "1", "--every", "20", "--n-examples", "16"],
     "--log-dir"),
    ("ddp.py", ["--world", "2", "--epochs", "1"], "--log-dir"),
    ("ddp.py", ["--world", "2", "--epochs", "1", "--fsdp"], "--log-dir"),
    ("lightning_callback.py", ["--epochs", "1"], "--root"),
    ("huggingface_trainer.py", ["--epochs", "1"], "--output-dir"),
]


@pytest.mark.parametrize(("name", "args", "out_flag"), [
    *FAST, *[pytest.param(*case, marks=pytest.mark.slow) for case in SLOW]])
def test_example_runs(tmp_path, name, args, out_flag):
    if name == "lightning_callback.py":
        pytest.importorskip("lightning")
    if name == "huggingface_trainer.py":
        pytest.importorskip("transformers")
    result = run_example(name, *args, out_flag, str(tmp_path / "out"), cwd=tmp_path)
    if result.returncode != 0 and GLOO_ABORT in result.stderr:  # see tests/spawn.py
        result = run_example(name, *args, out_flag, str(tmp_path / "out2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if name != "curvature_probe.py":
        assert_top_table(result.stdout)
    else:
        assert "members mean" in result.stdout and "AUC:" in result.stdout
    assert any((tmp_path / "out").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(("name", "blocked", "extras"), [
    ("lightning_callback.py", "lightning", "lightning"),
    ("huggingface_trainer.py", "transformers", "huggingface"),
])
def test_an_example_without_its_extra_names_the_install_command(tmp_path, name, blocked,
                                                                 extras):
    # None in sys.modules is Python's own way to make an import fail as if not installed.
    result = run_example(name, cwd=tmp_path, prelude=f"sys.modules[{blocked!r}] = None")
    assert result.returncode == 1
    assert "ModuleNotFoundError" not in result.stderr and "Traceback" not in result.stderr
    assert f"[{extras}]" in result.stderr and blocked in result.stderr
    assert f'pip install -e ".[{extras}]"' in result.stderr


def test_docstrings_never_install_from_the_index():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "pip install gradguard" not in text, path.name
