"""Guard a PyTorch Lightning Trainer with one callback; the LightningModule is unchanged.

Trains a small MLP on scikit-learn's embedded digits with ``lightning.pytorch.Trainer``
and ``GradGuardCallback``. gradguard finds the dataset indices of each batch, wraps the
optimizer Lightning steps, writes its ``gradguard/`` TensorBoard tags into the Trainer's
``TensorBoardLogger`` run (``runs/lightning/version_N``), and stores its ledger in the
Lightning checkpoint, from which a second ``fit`` resumes it.

Needs the extras ``lightning`` and ``experiments``; from this checkout:
    pip install -e ".[lightning,experiments]"
Run:  python examples/lightning_callback.py [--epochs 4] [--policy clip]
"""

from __future__ import annotations

import argparse
import os

from _extras import require

require(lightning="lightning", experiments="sklearn")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.experiments.data import load_dataset  # noqa: E402
from gradguard.experiments.models import mlp  # noqa: E402
from gradguard.formatting import format_run_summary  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402


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
    print(format_run_summary(guard.summary(), log_dir=logger.log_dir))
    print(guard.ledger.top(5))

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
