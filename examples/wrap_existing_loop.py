"""Guard an existing PyTorch training loop with three added lines.

A plain loop trains an MLP on scikit-learn's embedded 8×8 digits (no download). The
lines marked ``# gradguard`` are all that was added to it, plus ``guard.close()``:
the loop itself (zero_grad, forward, backward, step) is unchanged. At the end it prints
the test accuracy and the five training examples (by dataset index) whose cumulative
disclosure bound is largest; no training example itself is ever printed or logged.

Needs the extra ``experiments`` (scikit-learn's digits); from this checkout:
    pip install -e ".[experiments]"
Run:  python examples/wrap_existing_loop.py [--epochs 15] [--log-dir runs/wrap_existing_loop]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import gradguard  # gradguard
from gradguard.experiments.data import load_dataset
from gradguard.experiments.models import make_model
from gradguard.formatting import format_run_summary
from gradguard.ledger import BOUND_ASSUMPTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/wrap_existing_loop")
    args = parser.parse_args()
    torch.set_num_threads(1)  # fastest for a model this small

    split = load_dataset("digits", seed=args.seed)
    torch.manual_seed(args.seed)  # shuffling
    model = make_model("mlp", split.input_shape, split.num_classes, seed=args.seed,
                       hidden=(128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(split.train, batch_size=64, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    guard = gradguard.GradGuard(policy="monitor", log_dir=args.log_dir, log_every=5)  # gradguard
    model, optimizer, loader = guard.make_guarded(module=model, optimizer=optimizer,  # gradguard
                                                  data_loader=loader)  # gradguard

    # ---- the existing loop, unchanged ----
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  train loss {total / count:.4f}")

    guard.close()  # gradguard: removes every hook; writes hparams, summary.json, state

    model.eval()
    with torch.no_grad():
        x_test, y_test = split.test.tensors
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    summary = guard.summary()
    print(f"\ntest accuracy {accuracy:.3f} ({len(split.test)} examples); "
          f"{guard.step} guarded steps, guard time {summary['guard_seconds']:.2f} s")
    print(format_run_summary(summary, log_dir=args.log_dir))
    print("\ntop-5 most-disclosing training examples (dataset index into split.train):")
    top = guard.ledger.top(5)
    print(top)
    print(f"\n{top.legend()}\n({BOUND_ASSUMPTIONS})")


if __name__ == "__main__":
    main()
