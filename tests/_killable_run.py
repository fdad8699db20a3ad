"""A small guarded training run, killable at any moment (used by test_crash_safety.py).

``python -m tests._killable_run RUN_DIR`` trains with ``save_every=1`` and prints
``ready`` once the guard is attached.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg

N, BATCH, EPOCHS = 36, 6, 4  # 6 steps per epoch, 24 steps


def build(run_dir: str | None):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(N, 5, generator=g, dtype=torch.float64),
                       torch.randint(0, 3, (N,), generator=g))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.7, window=3), budget=4.0,
                         lam=0.1, log_dir=run_dir, log_every=1,
                         save_every=1 if run_dir else None)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        data_loader=DataLoader(ds, batch_size=BATCH))
    return guard, model, opt, loader


def train(guard, model, opt, loader, *, skip: int = 0, pause: float = 0.0) -> None:
    done = 0
    for _ in range(EPOCHS):
        for x, y in loader:
            done += 1
            if done <= skip:
                loader.discard()  # already trained on before the kill
                continue
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            time.sleep(pause)


if __name__ == "__main__":
    guard, model, opt, loader = build(sys.argv[1])
    print("ready", flush=True)
    train(guard, model, opt, loader, pause=0.02)
    guard.close()
    print("done", flush=True)
