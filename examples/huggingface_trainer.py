"""Guard Hugging Face ``Trainer`` training of a small text model, with no downloads.

Builds a 2-layer BERT from a ``BertConfig`` in code and trains it with
``GradGuardTrainer`` (a ``transformers.Trainer`` subclass) on a synthetic task: random
token sequences of random length, label = whether token 7 occurs. GNQ uses gradguard's
exact sequence kernels; the script prints which layers ran a ghost kernel and which
materialised their per-example gradients (at this toy size materialising is usually
cheaper), then the most-disclosing examples. The guard's state is saved next to the
optimizer's in every Trainer checkpoint (``runs/hf/checkpoint-*/gradguard_state.pt``).
TensorBoard: ``runs/hf/gradguard``.

Needs the extra ``huggingface``; from this checkout:
    pip install -e ".[huggingface]"
Run:  python examples/huggingface_trainer.py [--epochs 6] [--policy clip]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built in code

from _extras import require  # noqa: E402

require(huggingface="transformers,accelerate")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
)

import gradguard as gg  # noqa: E402
from gradguard.formatting import format_run_summary  # noqa: E402
from gradguard.integrations.huggingface import GradGuardTrainer  # noqa: E402

VOCAB, MAX_LEN = 40, 24


class ContainsTokenSeven(Dataset):
    """Right-padded random sequences; label 1 when token 7 occurs."""

    def __init__(self, n: int, *, seed: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(6, MAX_LEN + 1, (n,), generator=g)
        self.mask = (torch.arange(MAX_LEN)[None] < lengths[:, None]).long()
        self.ids = torch.randint(1, VOCAB, (n, MAX_LEN), generator=g) * self.mask
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


class LayerRoutes(TrainerCallback):
    """Reads the Gram route of every layer once, while the first step's captures exist."""

    def __init__(self):
        self.guard, self.routes = None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.routes is None and self.guard.hooks is not None:
            self.routes = self.guard.hooks.layer_routes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--policy", choices=("monitor", "clip"), default="monitor")
    parser.add_argument("--output-dir", default="runs/hf")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    data = ContainsTokenSeven(256, seed=0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=MAX_LEN, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)

    guard_args = dict(policy="clip", threshold=gg.Quantile(0.9)) if args.policy == "clip" \
        else dict(policy="monitor")
    guard = gg.GradGuard(log_dir="auto", log_every=5, **guard_args)
    routes = LayerRoutes()
    routes.guard = guard
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs,
        per_device_train_batch_size=32, learning_rate=3e-3, report_to=[], use_cpu=True,
        save_strategy="epoch", save_total_limit=1, logging_strategy="epoch",
        disable_tqdm=True, seed=0)
    trainer = GradGuardTrainer(model=model, args=training_args, train_dataset=data, guard=guard,
                               callbacks=[routes])
    trainer.train()

    print("layer routes at the first step (ghost: exact kernel from activations and "
          "output gradients; materialise: per-example gradients):")
    for name, route in routes.routes.items():
        print(f"  {route:11s} {name}")
    print(format_run_summary(guard.summary(),
                             log_dir=os.path.join(args.output_dir, "gradguard")))
    print("most-disclosing examples:")
    print(guard.ledger.top(5))


if __name__ == "__main__":
    main()
