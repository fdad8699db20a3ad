"""LoRA fine-tuning of a tiny GPT-2 under the guard, in a plain PyTorch loop.

Needs the ``huggingface`` extra (transformers, peft): ``pip install -e ".[huggingface]"``.

Builds a 2-layer GPT-2 from a ``GPT2Config`` (no download), wraps it with peft LoRA
(r = 8 on the attention and MLP projections; the base weights stay frozen), and trains it
on synthetic token sequences: counting sequences (start, start + step, ...) mod the
vocabulary, with a few uniformly random sequences planted among them. GNQ is measured
exactly over the adapters (gradguard's ghost kernels for the LoRA ``nn.Linear`` layers)
under ``policy="monitor"``: training is exactly what it would be without the guard. At
the end it prints the most-disclosing sequences' dataset indices; the planted random
sequences, which the model cannot predict from the others, should lead the table.

Run:  python examples/llm_finetune_lora.py [--epochs 3] [--strategy sketch]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built in code

try:
    import peft
    import transformers
except ImportError as exc:
    sys.exit(f"this example needs transformers and peft ({exc.name} is missing): "
             'pip install -e ".[huggingface]"')

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradguard as gg  # noqa: E402

VOCAB, SEQ_LEN, N_COUNTING, N_RANDOM = 64, 24, 184, 8


def make_data(generator: torch.Generator) -> tuple[TensorDataset, list[int]]:
    """Counting sequences plus a few random ones (their indices returned)."""
    start = torch.randint(0, VOCAB, (N_COUNTING, 1), generator=generator)
    step = torch.randint(1, 3, (N_COUNTING, 1), generator=generator)
    counting = (start + step * torch.arange(SEQ_LEN)) % VOCAB
    random = torch.randint(0, VOCAB, (N_RANDOM, SEQ_LEN), generator=generator)
    ids = torch.cat([counting, random])
    order = torch.randperm(ids.shape[0], generator=generator)
    planted = sorted(int(i) for i in torch.nonzero(order >= N_COUNTING).squeeze(1))
    return TensorDataset(ids[order]), planted


def per_example_causal_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token loss, ``[B]``."""
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return tokens.mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strategy", default="auto", choices=["auto", "ghost", "sketch"])
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64,
                                     n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)

    data, planted = make_data(torch.Generator().manual_seed(0))
    guard = gg.GradGuard(policy="monitor", strategy=args.strategy)
    model, optimizer, loader = guard.make_guarded(
        module=model, data_loader=DataLoader(data, batch_size=16, shuffle=True),
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3))

    for epoch in range(args.epochs):
        total = 0.0
        for (ids,) in loader:
            optimizer.zero_grad()
            # positions spelled out per example: one [1, T] row broadcast over the batch
            # would merge the examples' gradients in the position embedding
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            logits = model(input_ids=ids, position_ids=positions).logits
            loss = per_example_causal_loss(logits, ids).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * ids.shape[0]
        print(f"epoch {epoch + 1}: mean loss {total / len(data):.3f}")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{guard.step} steps, GNQ over {trainable} LoRA parameters (strategy "
          f"{args.strategy!r}); planted random sequences: {planted}")
    print("most-disclosing sequences (bound: gradguard's Gaussian-channel bound in nats, "
          "not a DP guarantee)")
    print(f"{'rank':>4}  {'index':>5}  {'planted':>7}  {'max GNQ':>10}  {'bound':>7}")
    for rank, row in enumerate(guard.ledger.top(8), 1):
        mark = "yes" if row["index"] in planted else ""
        print(f"{rank:>4}  {row['index']:>5}  {mark:>7}  {row['max_gnq']:>10.1f}  "
              f"{row['cum_bound']:>7.3f}")
    guard.close()


if __name__ == "__main__":
    main()
