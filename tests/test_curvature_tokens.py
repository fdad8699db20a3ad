"""Input curvature of token models: w.r.t. the input embeddings, HF dict batches accepted.

Reference: torch.func.hessian of each example's own loss w.r.t. its embeddings (float64,
a tiny GPT-2 built from a config), contracted with the same Rademacher vectors.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.curvature.estimators import draw_seed, rademacher_vectors, token_loss  # noqa: E402
from gradguard.curvature.probe import step_seed  # noqa: E402

F64 = torch.float64
transformers.logging.set_verbosity_error()


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=23, n_positions=16,
                     attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).to(F64)


def batch(seed: int, B: int = 4, T: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 23, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # a right-padded example
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_hutchinson_on_embeddings_matches_torch_func_hessian():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model, b = tiny_gpt2(seed), batch(seed)
    n = 3
    scores = gg.input_curvature(model, b, None, estimator="hutchinson", n_vectors=n,
                                generator=torch.Generator().manual_seed(seed))
    # the same vectors, drawn as input_curvature documents it
    outer = draw_seed(torch.Generator().manual_seed(seed))
    inner = draw_seed(torch.Generator().manual_seed(int(outer)))
    embeds = model.get_input_embeddings()(b["input_ids"]).detach()
    V = rademacher_vectors(embeds, n, seed=inner)  # [n, B, T, E]
    model.eval()
    for i in range(embeds.shape[0]):
        def loss(e, i=i):
            out = model(inputs_embeds=e[None], attention_mask=b["attention_mask"][i:i + 1])
            return token_loss(out.logits, b["labels"][i:i + 1], causal=True)

        H = torch.func.hessian(loss)(embeds[i]).reshape(embeds[i].numel(), -1)
        v = V[:, i].reshape(n, -1)
        expected = torch.einsum("np,pq,nq->n", v, H, v).mean()
        torch.testing.assert_close(scores[i], expected, rtol=1e-7, atol=1e-10)


def test_token_batches_score_each_example_on_its_own():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model, b = tiny_gpt2(seed), batch(seed, B=5)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    whole = gg.input_curvature(model, b, None, estimator="fd", generator=g())
    chunked = gg.input_curvature(model, b, None, estimator="fd", generator=g(), chunk_size=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=1e-12)
    alone = gg.input_curvature(model, {k: v[3:4] for k, v in b.items()}, None, estimator="fd",
                               generator=g())
    torch.testing.assert_close(alone[0], whole[3], rtol=1e-9, atol=1e-12)
    # plain token ids: a causal LM predicts its own ids
    ids_only = gg.input_curvature(model, b["input_ids"][1:], None, estimator="zo",
                                  generator=g())
    via_dict = gg.input_curvature(model, {"input_ids": b["input_ids"][1:]}, None,
                                  estimator="zo", generator=g())
    torch.testing.assert_close(ids_only, via_dict)
    assert model.training  # left as it was


def test_bad_token_batches_are_refused_clearly():
    with pytest.raises(TypeError, match="input_ids"):
        gg.input_curvature(tiny_gpt2(0), {"attention_mask": torch.ones(2, 3)}, None)
    with pytest.raises(TypeError, match="continuous inputs"):
        gg.input_curvature(torch.nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.long), None)


class DictTokens(torch.utils.data.Dataset):
    def __init__(self, b: dict):
        self.b = b

    def __len__(self):
        return self.b["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.b.items()}


def test_curvature_probe_accepts_dict_token_datasets():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = tiny_gpt2(seed)
    members, nonmembers = DictTokens(batch(seed, B=4)), DictTokens(batch(seed + 1, B=3))
    probe = gg.CurvatureProbe(members, nonmembers, every=1, estimator="fd", n_vectors=2)
    result = probe.run(model, step=1)
    both = {k: torch.cat([members.b[k], nonmembers.b[k]]) for k in members.b}

    expected = gg.input_curvature(model, both, None, estimator="fd", n_vectors=2,
                                  generator=torch.Generator().manual_seed(step_seed(probe.seed, 1)))
    torch.testing.assert_close(torch.cat([result.member_scores, result.nonmember_scores]),
                               expected)
