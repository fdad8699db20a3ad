"""The disclosure ledger under DP-SGD against the undefended run (issue 11, §1–§2).

Trains the same MLP from the same initial weights on scikit-learn's digits (1,200
training examples, the rest held out for accuracy) twice: undefended (plain SGD) and with
Opacus DP-SGD (σ = 1, C = 1, Poisson sampling), a GradGuard in ``monitor`` mode on both.
Under DP-SGD the ledger describes the released update (clipped gradients, noise in the
ridge), so its disclosure bound should come out far below the undefended run's; the raw
GNQ (what an unprotected update would disclose) is printed beside it, and the individual ε
of every example beside Opacus's ε for the run.

    PYTHONPATH=$PWD python benchmarks/dp_ledger.py [--epochs 5] [--out results_dp.json]

Only numbers are printed; never training examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard._io import atomic_write_json
from gradguard.experiments.data import load_digits_tensors
from gradguard.experiments.models import mlp

DELTA = 1e-5


def run(*, dp: bool, epochs: int, seed: int, n_train: int = 1200, batch_size: int = 64,
        lr: float = 0.5, sigma: float = 1.0, max_grad_norm: float = 1.0) -> dict:
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:n_train], perm[n_train:]
    ds = TensorDataset(x[train], y[train])
    torch.manual_seed(seed)
    model = mlp((1, 8, 8), 10, hidden=(64,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed + 1))
    engine = None
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=max_grad_norm, grad_sample_mode="hooks",
            noise_generator=torch.Generator().manual_seed(seed + 2))
    guard = gg.GradGuard(policy="monitor", delta=DELTA)
    model, opt, loader = guard.make_guarded(module=model, optimizer=opt, data_loader=loader)
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = float((model(x[test]).argmax(1) == y[test]).double().mean())
    led = guard.ledger
    seen = led.steps_seen > 0
    row = {
        "defence": f"dp-sgd (sigma={sigma}, C={max_grad_norm})" if dp else "none",
        "steps": guard.step, "test_accuracy": acc, "seconds": round(seconds, 1),
        "bound_mean_nats": float(led.cum_bound[seen].mean()),
        "bound_max_nats": float(led.cum_bound[seen].max()),
        "max_gnq_mean": float(led.max_gnq[seen].mean()),
        "max_gnq_raw_mean": float(led.max_gnq_raw[seen].mean()),
        "max_gnq_raw_max": float(led.max_gnq_raw[seen].max()),
    }
    if dp:
        eps = led.eps
        row.update(eps_run_opacus=engine.get_epsilon(DELTA), delta=DELTA,
                   eps_individual_min=float(eps.min()),
                   eps_individual_median=float(eps.median()),
                   eps_individual_max=float(eps.max()))
    guard.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("opacus").setLevel(logging.ERROR)
    rows = [run(dp=False, epochs=args.epochs, seed=args.seed),
            run(dp=True, epochs=args.epochs, seed=args.seed)]
    print(json.dumps(rows, indent=2))
    none, dp = rows
    print(f"\nmean bound: undefended {none['bound_mean_nats']:.3g} nats, DP-SGD "
          f"{dp['bound_mean_nats']:.3g} nats ({none['bound_mean_nats'] / dp['bound_mean_nats']:.0f}"
          f"x lower); max bound: {none['bound_max_nats']:.3g} vs {dp['bound_max_nats']:.3g}")
    if args.out:
        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
