"""Track the input-curvature membership signal while a small MLP overfits digits.

Trains an MLP on scikit-learn's embedded 8×8 digits under ``gradguard.GradGuard`` with a
``CurvatureProbe``: every ``--every`` optimizer steps (and once before training) the
probe scores a fixed sample of training examples (members) and held-out examples
(non-members). It prints, per probe, their mean curvature, the membership AUC of the
attack "low curvature = member" and the probe's wall time, then the probes' share of
the run. TensorBoard logs go to ``runs/curvature_probe``.

Needs the extra ``experiments`` (scikit-learn's digits); from this checkout:
    pip install -e ".[experiments]"
Run:  python examples/curvature_probe.py [--epochs 60] [--every 300] [--estimator zo]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

import gradguard as gg
from gradguard.curvature import ESTIMATORS
from gradguard.experiments.data import load_dataset
from gradguard.formatting import format_legend, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=300, help="probe every N steps")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="zo")
    parser.add_argument("--n-examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/curvature_probe")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (one is fastest for a model this small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = load_dataset("digits", seed=args.seed)
    train_set, holdout_set = split.train, split.holdout

    torch.manual_seed(args.seed)  # model init and shuffling; the probe uses its own RNG
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256),
                          nn.Tanh(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    # Pass the training dataset itself, so member indices are the ledger's dataset indices.
    probe = gg.CurvatureProbe(train_set, holdout_set, every=args.every,
                              n_examples=args.n_examples, estimator=args.estimator,
                              seed=args.seed)
    print(f"{len(train_set)} members, {len(holdout_set)} non-members; probing "
          f"{len(probe.member_indices)} + {len(probe.nonmember_indices)} examples with "
          f"estimator={probe.estimator!r}, direction={probe.direction!r}")
    start = time.perf_counter()
    guard = gg.GradGuard(policy="monitor", curvature=probe, log_dir=args.log_dir)
    model, optimizer, loader = guard.make_guarded(module=model, optimizer=optimizer,
                                                  data_loader=loader)
    for _ in range(args.epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    guard.close()
    total = time.perf_counter() - start

    print(format_table(["step", "members mean", "non-members mean", "AUC", "probe s"],
                       [[r["step"], r["members_mean"], r["nonmembers_mean"], r["auc"],
                         r["seconds"]] for r in probe.history]))
    print(format_legend({"members mean / non-members mean": "mean input-loss curvature of the "
                         "probed training / held-out examples",
                         "AUC": "membership AUC of the curvature attack (0.5 = chance)",
                         "probe s": "seconds the probe took"}))
    model.eval()
    with torch.no_grad():
        accuracy = {name: (model(d.tensors[0]).argmax(1) == d.tensors[1]).float().mean().item()
                    for name, d in (("train", train_set), ("held-out", holdout_set))}
    print(f"accuracy: train {accuracy['train']:.3f}, held-out {accuracy['held-out']:.3f}")
    print(f"{guard.step} steps in {total:.1f} s; {len(probe.history)} probes took "
          f"{guard.probe_seconds:.1f} s = {guard.probe_seconds / total:.1%} of the run; "
          f"GNQ monitoring took {guard.guard_seconds:.1f} s")
    print(f"tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
