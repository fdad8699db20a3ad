"""Guard a PyTorch Lightning Trainer with one callback; the LightningModule is unchanged.

Trains a small MLP on scikit-learn's embedded digits with ``lightning.pytorch.Trainer``
and ``GradGuardCallback``. gradguard finds the dataset indices of each batch, wraps the
optimizer Lightning steps, writes its ``gradguard/`` TensorBoard tags into the Trainer's
``TensorBoardLogger`` run (``runs/lightning/version_N``), and stores its ledger in the
Lightning checkpoint, from which a second ``fit`` resumes it.

Run:  python examples/lightning_callback.py [--epochs 4] [--policy clip]
Needs: pip install gradguard[lightning]
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import gradguard as gg
from gradguard.experiments.data import load_dataset
from gradguard.experiments.models import mlp
from gradguard.integrations.lightning import GradGuardCallback


class DigitsClassifier(pl.LightningModule):
    """An ordinary LightningModule: nothing here knows about gradguard."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = mlp(input_shape, num_classes, hidden=(128,))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--policy", choices=("monitor", "clip"), default="monitor")
    parser.add_argument("--root", default="runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    split = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    module = DigitsClassifier(split.input_shape, split.num_classes)
    loader = DataLoader(split.train, batch_size=32, shuffle=True)
    guard_args = dict(policy="clip", threshold=gg.Quantile(0.9)) if args.policy == "clip" \
        else dict(policy="monitor")

    callback = GradGuardCallback(log_every=5, **guard_args)
    logger = TensorBoardLogger(args.root, name="lightning")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=5)
    trainer.fit(module, loader)
    ckpt = os.path.join(logger.log_dir, "gradguard_example.ckpt")
    trainer.save_checkpoint(ckpt)

    guard = callback.guard
    s = guard.summary()
    print(f"{guard.step} steps; TensorBoard run: {logger.log_dir}")
    print(f"examples seen {s['examples_seen']:.0f}, clipped {s['clipped_total']:.0f}, "
          f"max bound {s['max_bound']:.3f} nats (gradguard's Gaussian-channel bound, "
          "not a DP guarantee)")
    for row in guard.ledger.top(5):
        print(f"  example {row['index']:4d}: max GNQ {row['max_gnq']:9.2f}, "
              f"bound {row['cum_bound']:.3f} nats")

    # Resume from the checkpoint for one more epoch: the ledger continues.
    resumed = GradGuardCallback(log_every=5, **guard_args)
    trainer = pl.Trainer(max_epochs=args.epochs + 1, accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(args.root, name="lightning"),
                         callbacks=[resumed], enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=5)
    trainer.fit(DigitsClassifier(split.input_shape, split.num_classes), loader, ckpt_path=ckpt)
    print(f"resumed: {guard.step} -> {resumed.guard.step} steps; examples' mean steps seen "
          f"{guard.ledger.steps_seen.double().mean():.1f} -> "
          f"{resumed.guard.ledger.steps_seen.double().mean():.1f}")


if __name__ == "__main__":
    main()
