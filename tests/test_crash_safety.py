"""Crash safety (issue 13, items 12-13): SIGKILL a run at random moments, resume it from
its run directory, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradguard as gg
from tests._killable_run import BATCH, EPOCHS, N, build, train

# End to end: real subprocesses (kept in CI; deselect with -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = EPOCHS * N // BATCH


def _kill_at_random(run_dir: str, delay: float) -> bool:
    """Start a run, SIGKILL it ``delay`` s after it is ready; whether it was still running."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "tests._killable_run", run_dir], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.fixture(scope="module")
def uninterrupted():
    guard, model, opt, loader = build(None)
    train(guard, model, opt, loader)
    guard.close()
    return guard.ledger.state_dict(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path, seed,
                                                                     uninterrupted):
    run_dir = str(tmp_path / "run")
    delay = random.Random(seed).uniform(0.0, 0.4)
    killed_while_running = _kill_at_random(run_dir, delay)
    # TensorBoard orders event files by the whole seconds in their names (then host, pid):
    # a writer opened in the same second as the killed run's could sort before it.
    time.sleep(1.1)
    guard, model, opt, loader = build(run_dir)
    start = guard.resume()  # 0 when killed before the first save
    assert 0 <= start <= TOTAL
    print(f"killed while running: {killed_while_running}; resumed at step {start}")
    train(guard, model, opt, loader, skip=start)
    guard.close()
    ledger, params = uninterrupted
    resumed = guard.ledger.state_dict()
    for key in ledger:
        assert torch.equal(ledger[key], resumed[key]), key
    for p, q in zip(params, model.parameters(), strict=True):
        assert torch.equal(p, q)
    # Steps logged by the killed run after its last saved state are purged: each step once.
    acc = EventAccumulator(run_dir)
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradguard/gnq/mean")]
    assert sorted(steps) == list(range(1, TOTAL + 1)), (killed_while_running, start, steps)


def test_resume_refuses_a_corrupt_state_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "gradguard_state.pt").write_bytes(b"\x80\x04not a checkpoint")
    guard, model, opt, loader = build(str(run_dir))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="not a readable GradGuard state"):
        guard.resume()
    assert guard.step == 0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    guard.close()


def test_load_state_never_unpickles_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "gradguard_state.pt"
    torch.save({"version": torch.tensor(1), "step": torch.tensor(0), "x": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable GradGuard state"):
        gg.load_state(tmp_path)
