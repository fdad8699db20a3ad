"""Peak memory of one training step of a GPT-2 with gradient checkpointing, with and without
gradguard (issue 12: captures held until ``step()`` cancelled checkpointing's saving).

Usage::

    PYTHONPATH=$PWD python benchmarks/checkpoint_memory.py [--seq-len 128] [--batch-size 8]

A ``transformers`` GPT-2 built from config (4 layers, d = 256, vocab 2000) trains one step
with ``model.gradient_checkpointing_enable()``; peak bytes are measured as in
``benchmarks/run.py`` (every tensor torch allocates during the step: CPU allocator events,
or ``torch.cuda.max_memory_allocated``). Rows: plain training with and without
checkpointing, gradguard ``monitor`` exact (``strategy="auto"``) and sketched, with
checkpointing. Needs the ``huggingface`` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def build(checkpointing: bool, T: int) -> torch.nn.Module:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2000,
                                       n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return bench.CausalLM(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    B, T = args.batch_size, args.seq_len
    ids = torch.randint(0, 2000, (B, T), generator=torch.Generator().manual_seed(1))
    batch = (ids.to(device), ids[:, 1:].to(device), torch.arange(B, device=device))
    rows = [("plain, no checkpointing", "plain", False), ("plain", "plain", True),
            ("gradguard monitor, exact (auto)", "gg_monitor", True),
            ("gradguard monitor, sketch", "gg_sketch", True)]
    print(f"GPT-2 4 layers, d=256, vocab 2000, B={B}, T={T}, gradient checkpointing "
          f"(peak MiB of one step, {device})")
    for label, name, ckpt in rows:
        variant = bench.make_variant(name)
        variant.setup(build(ckpt, T).to(device), num_examples=1000, batch_size=B)
        for _ in range(2):  # warm-up: optimizer state, workspaces, projections
            variant.step(*batch)
        peak = bench.peak_step_bytes(variant, batch, device)["peak_bytes"] / 2**20
        print(f"  {label:34s} {peak:8.1f}")
        variant.close()


if __name__ == "__main__":
    main()
