"""Hugging Face models in a plain loop, called the plain way (no hand-made position_ids),
against a per-example brute-force loop in float64 (tiny configs, fresh seeds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradguard.uniqueness.gnq import gnq_from_grads, gnq_from_gram
from gradguard.uniqueness.hooks import GramHooks, per_example_gnq
from gradguard.uniqueness.losses import causal_lm_loss
from tests.reference import per_example_loop_grads, rel_err

transformers = pytest.importorskip("transformers")
F64 = torch.float64


def gpt2(seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(F64)


def llama(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=29, hidden_size=8, intermediate_size=12,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(F64)


def bert(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=31, hidden_size=8, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=12,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  pad_token_id=0)
    return transformers.BertForSequenceClassification(cfg).to(F64)


def padded_batch(B, T, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("factory,vocab", [(gpt2, 23), (llama, 29)], ids=["gpt2", "llama"])
@pytest.mark.parametrize("B,T", [(3, 5), (4, 4)])
def test_causal_lm_called_the_plain_way(factory, vocab, B, T, device):
    model = factory(B * 7 + T).to(device)
    ids, mask = (t.to(device) for t in padded_batch(B, T, vocab, seed=B + T))
    labels = ids.masked_fill(mask == 0, -100)

    def loss_of(i):
        out = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        return causal_lm_loss(out.logits, labels[i:i + 1])

    ref = gnq_from_grads(per_example_loop_grads(model, loss_of, B), 1e-2)
    for strategy in ("auto", "materialise"):
        hooks = GramHooks(model, loss_reduction="sum", strategy=strategy)
        out = model(input_ids=ids, attention_mask=mask)
        causal_lm_loss(out.logits, labels).backward()
        K = hooks.gram()
        hooks.remove()
        model.zero_grad()
        assert rel_err(gnq_from_gram(K, 1e-2), ref) < 1e-8, strategy
    # model(input_ids) with no mask at all: right padding is invisible to a causal LM's
    # real tokens, and the padded labels are ignored, so the same GNQ.
    got = per_example_gnq(model, lambda out, y: causal_lm_loss(out.logits, y), ids, labels)
    assert rel_err(got, ref) < 1e-8


def test_gpt2_with_labels_and_its_own_mean_loss():
    # model(input_ids=..., labels=...).loss is the mean over B·(T-1) tokens: with
    # loss_reduction="mean" each example's gradient is that of its mean token loss.
    B, T = 4, 4
    model = gpt2(11)
    ids = torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(12))

    def loss_of(i):
        return model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss

    ref = per_example_loop_grads(model, loss_of, B)
    hooks = GramHooks(model, loss_reduction="mean")
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-8
    # The helper's sum is the HF mean times the token count (HF computes its loss in
    # float32 even for a float64 model: hence float32's precision here).
    assert rel_err(causal_lm_loss(out.logits, ids).detach(), out.loss.detach() * B * (T - 1)) < 1e-6
    hooks.remove()


@pytest.mark.parametrize("B,T", [(3, 6), (5, 5)])
def test_bert_classifier_with_padding(B, T, device):
    model = bert(B + T).to(device)
    ids, mask = (t.to(device) for t in padded_batch(B, T, 31, seed=3 * B + T))
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(B)).to(device)

    def loss_of(i):
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        return F.cross_entropy(logits, y[i:i + 1], reduction="sum")

    ref = per_example_loop_grads(model, loss_of, B)
    hooks = GramHooks(model, loss_reduction="sum")
    F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y,
                    reduction="sum").backward()
    assert rel_err(hooks.gram(), ref @ ref.T) < 1e-8
    hooks.remove()


def test_llama_style_rms_norms_get_their_own_kernel_gemma_style_do_not():
    """Llama's RMSNorm (and the copies of its forward: Mistral, Qwen2, ...) gets a kernel from
    its input and Δ alone; the per-example gradients of the norm weights equal brute force.
    Gemma's RMSNorm (``1 + weight``) is a different function and keeps torch.func."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from gradguard.uniqueness.kernels import FunctionalKernel, GradSamplerKernel, kernel_for

    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = llama(seed)
    assert type(kernel_for(model.model.norm)) is GradSamplerKernel
    assert type(kernel_for(MistralRMSNorm(4))) is GradSamplerKernel
    assert type(kernel_for(GemmaRMSNorm(4))) is FunctionalKernel
    ids = torch.randint(0, 29, (5, 6), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()

    def loss_of(i):
        return causal_lm_loss(model(input_ids=ids[i:i + 1]).logits, labels[i:i + 1])

    G = per_example_loop_grads(model, loss_of, 5)
    hooks = GramHooks(model, loss_reduction="sum")
    causal_lm_loss(model(input_ids=ids).logits, labels).backward()
    per = hooks.per_example_grads()
    hooks.remove()
    assert all(p in per for p in model.parameters())
    flat = torch.cat([per[p].reshape(5, -1) for p in model.parameters()], 1)
    torch.testing.assert_close(flat, G, rtol=1e-9, atol=1e-12)
