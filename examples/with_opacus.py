"""DP-SGD with Opacus, monitored by gradguard.

Opacus's ``PrivacyEngine.make_private`` turns an MLP on scikit-learn's embedded 8×8
digits into a DP-SGD run (Poisson sampling, per-example clipping, Gaussian noise);
``GradGuard(policy="monitor").make_guarded`` then wraps the triple Opacus returned. The
guard measures the update DP-SGD releases (per-example gradients clipped as Opacus clips
them, the Gaussian noise in the ridge), keeps the raw GNQ (what an unprotected update would
disclose) beside it, and accounts each example's individual ε; the update itself stays
exactly the DP-SGD update (monitor never changes it). Prints the ε Opacus's accountant
spent, the test accuracy and a GNQ summary; dataset indices and numbers only, never
training examples.

Needs the extra ``experiments`` (scikit-learn's digits); from this checkout:
    pip install -e ".[experiments]"
Run:  python examples/with_opacus.py [--epochs 15] [--noise 1.0] [--log-dir runs/with_opacus]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

import gradguard
from gradguard.experiments.data import load_dataset
from gradguard.experiments.models import make_model
from gradguard.formatting import format_number, format_run_summary
from gradguard.ledger import BOUND_ASSUMPTIONS

DELTA = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier σ")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/with_opacus")
    args = parser.parse_args()
    torch.set_num_threads(1)  # fastest for a model this small
    # Opacus warns that secure_mode is off (fine for an example), and torch that Opacus's
    # backward hooks fire on the first layer, whose input needs no gradient.
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    logging.getLogger("opacus").setLevel(logging.ERROR)

    split = load_dataset("digits", seed=args.seed)
    model = make_model("mlp", split.input_shape, split.num_classes, seed=args.seed,
                       hidden=(128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(split.train, batch_size=64,
                        generator=torch.Generator().manual_seed(args.seed))

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=args.noise,
        max_grad_norm=args.max_grad_norm, grad_sample_mode="hooks",
        noise_generator=torch.Generator().manual_seed(args.seed + 1))
    guard = gradguard.GradGuard(policy="monitor", log_dir=args.log_dir, log_every=5,
                                delta=DELTA)
    model, optimizer, loader = guard.make_guarded(module=model, optimizer=optimizer,
                                                  data_loader=loader)

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()  # a Poisson batch may be empty: zero gradients
            optimizer.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  ε = {engine.get_epsilon(DELTA):.3f} (δ = {DELTA:g})")
    guard.close()

    model.eval()
    with torch.no_grad():
        x_test, y_test = split.test.tensors
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"\nDP-SGD (σ = {args.noise}, C = {args.max_grad_norm}, expected batch "
          f"{optimizer.expected_batch_size}): ε = {engine.get_epsilon(DELTA):.3f} at "
          f"δ = {DELTA:g}, test accuracy {accuracy:.3f} ({len(split.test)} examples)")

    ledger = guard.ledger
    seen = ledger.steps_seen > 0
    mean_gnq = (ledger.cum_gnq[seen] / ledger.steps_seen[seen]).to(torch.float64)
    q = torch.quantile(mean_gnq, torch.tensor([0.5, 0.95], dtype=torch.float64))
    summary = guard.summary()
    print(f"\nGNQ of the released DP-SGD update (clipped gradients, noise in the ridge), "
          f"{guard.step} steps, {int(seen.sum())} of {len(split.train)} examples seen:")
    print(f"  per-example mean GNQ: median {format_number(q[0])}, p95 {format_number(q[1])}; "
          f"largest single-step GNQ {format_number(summary['max_gnq'])} (raw, what an "
          f"unprotected update would disclose: {format_number(summary['max_gnq_raw'])})")
    print(f"  individual ε at δ = {DELTA:g}: max {format_number(summary['eps_max'])}, mean "
          f"{format_number(summary['eps_mean'])}; the run's ε by the same RDP accounting "
          f"{format_number(summary['eps_run_rdp'])} (Opacus's PRV accountant above is tighter)")
    print(format_run_summary(summary, log_dir=args.log_dir))
    print(ledger.top(5))
    print(f"\n({BOUND_ASSUMPTIONS})")


if __name__ == "__main__":
    main()
