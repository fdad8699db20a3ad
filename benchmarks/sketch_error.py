"""Sketched GNQ against exact GNQ: median relative error and Spearman per model.

Usage::

    python benchmarks/sketch_error.py MODEL [seed] [batch size]

MODEL: mlp, cnn, single, gpt2, llama, gpt2_bench or gpt2_long.

Random data, models at initialisation, exact GNQ from materialised per-example gradients
(``strategy="auto"`` may itself sketch at large B); ``sketch_seed=1``; sketch sizes 4096, 16384
(the default) and 65536. The GPT-2 and Llama shapes need the ``huggingface`` extra.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from gradguard.uniqueness.hooks import per_example_gnq


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def report(name, model, x, y, B, dims=(4096, 16384, 65536)):
    exact = per_example_gnq(model, ce, x, y, strategy="materialise")  # exact everywhere
    # How far apart the exact values are: errors much smaller than this keep the ranking.
    spread = (exact.std() / exact.mean()).item()
    print(f"{name} B={B}: exact GNQ spread (std/mean) {spread:.4f}", flush=True)
    for m in dims:
        sk = per_example_gnq(model, ce, x, y, strategy="sketch", sketch_dim=m, sketch_seed=1)
        rel = ((sk - exact).abs() / exact).median().item()
        signed = ((sk - exact) / exact).median().item()
        rho = spearmanr(sk.numpy(), exact.numpy()).statistic
        print(f"{name} B={B} sketch_dim={m}: median rel err {rel:.4f} (median signed "
              f"{signed:+.4f}), spearman {rho:.4f}", flush=True)


class PlainLM(nn.Module):
    def __init__(self, model, positions):
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, ids):
        return self.model(input_ids=ids, position_ids=self.positions).logits[:, :-1]


def main() -> None:
    which = sys.argv[1]
    torch.manual_seed(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    if which == "mlp":
        for B in (32, 128):
            model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                                  nn.Linear(512, 10))
            report("MLP", model, torch.randn(B, 256), torch.randint(0, 10, (B,)), B)
    elif which == "cnn":
        for B in (32, 128):
            model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(16 * 6 * 6, 256), nn.ReLU(), nn.Linear(256, 10))
            report("CNN", model, torch.randn(B, 1, 8, 8), torch.randint(0, 10, (B,)), B)
    elif which == "single":
        for B in (32, 128):
            model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10, bias=False))
            report("one-big-layer", model, torch.randn(B, 512), torch.randint(0, 10, (B,)), B)
    elif which in ("gpt2_bench", "gpt2_long"):  # benchmarks/run.py's rows: d = 256, T = 64, 512
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        B, T, V = int(sys.argv[3]) if len(sys.argv) > 3 else 16, \
            512 if which == "gpt2_long" else 64, 2000
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=V,
                                           n_positions=T, resid_pdrop=0, embd_pdrop=0,
                                           attn_pdrop=0))
        ids = torch.randint(0, V, (B, T))
        report(which, PlainLM(model, torch.arange(T).expand(B, T)), ids, ids[:, 1:], B,
               dims=(16384, 65536))
    elif which in ("gpt2", "llama"):
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        transformers.logging.set_verbosity_error()
        B, T, V = int(sys.argv[3]) if len(sys.argv) > 3 else 32, 16, 500
        if which == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=V,
                                               n_positions=T, resid_pdrop=0, embd_pdrop=0,
                                               attn_pdrop=0))
        else:
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=128,
                                                 intermediate_size=344, num_attention_heads=4,
                                                 num_key_value_heads=2, vocab_size=V,
                                                 max_position_embeddings=T))
        ids = torch.randint(0, V, (B, T))
        report(which, PlainLM(model, torch.arange(T).expand(B, T)), ids, ids[:, 1:], B)
    else:
        raise SystemExit(f"unknown model {which!r}: mlp, cnn, single, gpt2, llama, gpt2_bench "
                         "or gpt2_long")


if __name__ == "__main__":
    main()
