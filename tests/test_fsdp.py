"""FSDP is refused with a message naming what works (DDP), in a real gloo process group
(FSDP2 ``fully_shard`` runs on CPU; a subprocess keeps the group out of the test process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]

SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
import gradguard as gg
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
fully_shard(net[0])
fully_shard(net)
try:
    gg.GradGuard().make_guarded(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
except ValueError as exc:
    print("REFUSED:", exc)
finally:
    dist.destroy_process_group()
"""


def test_fsdp_is_refused_naming_ddp(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED:" in out.stdout, out.stdout
    assert "FSDP" in out.stdout and "DDP" in out.stdout
