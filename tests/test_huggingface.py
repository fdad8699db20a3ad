"""GradGuardTrainer on a real transformers.Trainer: tiny BERT / GPT-2 built from configs, CPU.

No hub access (HF_HUB_OFFLINE=1, models from configs). Compared: the trainer's GNQ at its
first step against per-example gradients from one autograd pass per example and a
push-through GNQ formula with explicit solves (not gradguard's Cholesky route); a drop
policy run against GradGuard in a plain loop over the same batches (read off the inputs
the model received); monitor against the stock Trainer; checkpoint save and resume;
the per-example loss against the models' own losses.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradguard as gg  # noqa: E402
from gradguard.integrations.huggingface import (  # noqa: E402
    STATE_FILE,
    GradGuardTrainer,
    per_example_loss,
)
from tests.reference import assert_same_run, gnq_push_through  # noqa: E402

transformers.logging.set_verbosity_error()

N, T, VOCAB, BATCH, LR, LAM = 24, 10, 30, 8, 0.5, 1e-2


class TokenData(Dataset):
    """Random token sequences of different lengths, right-padded, as dicts of tensors."""

    def __init__(self, *, causal: bool = False):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(4, T + 1, (N,), generator=g)
        self.ids = torch.randint(1, VOCAB, (N, T), generator=g)
        self.mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        if causal:
            self.labels = self.ids.masked_fill(self.mask == 0, -100)
        else:
            self.labels = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _bert():
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)


def _gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=LR,
                optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                dataloader_pin_memory=False, seed=0, num_train_epochs=2)
    base.update(kwargs)
    return TrainingArguments(**base)


# ----------------------------------------------------------------------------- references
def _per_example_grads(model, data, indices, *, causal) -> torch.Tensor:
    """[B, P] float64: one forward/backward per example on its own."""
    model = copy.deepcopy(model).double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in indices.tolist():
        item = data[i]
        out = model(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None])
        loss = per_example_loss(out.logits, item["labels"][None], causal_lm=causal)[0]
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)




class RoutesAtFirstStep(TrainerCallback):
    """Reads each layer's Gram route while the first step's captures exist."""

    def __init__(self):
        self.trainer = None
        self.routes = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.routes is None:
            self.routes = self.trainer.guard.hooks.layer_routes()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch, strategy", [("bert", "auto"), ("bert", "ghost"),
                                            ("gpt2", "auto")])
def test_first_step_gnq_matches_independent_reference(tmp_path, arch, strategy):
    causal = arch == "gpt2"
    model = _gpt2() if causal else _bert()
    initial = copy.deepcopy(model)
    data = TokenData(causal=causal)
    routes = RoutesAtFirstStep()
    trainer = GradGuardTrainer(model=model, args=_args(tmp_path, max_steps=1),
                               train_dataset=data, guard=gg.GradGuard(lam=LAM, strategy=strategy),
                               callbacks=[routes])
    routes.trainer = trainer
    trainer.train()
    idx = trainer.guard.last_indices
    assert idx.shape == (BATCH,)
    G = _per_example_grads(initial, data, idx, causal=causal)
    torch.testing.assert_close(trainer.guard.last_gnq, gnq_push_through(G, LAM),
                               rtol=2e-4, atol=1e-6)
    # Which layers ran a ghost kernel (sequence Linear, Embedding) and which materialised.
    # At this toy size "auto" finds materialising cheaper for most layers; "ghost" forces
    # the sequence kernels wherever one exists.
    if causal:  # GPT-2: Conv1D has no ghost kernel, the head is tied to the embedding
        assert routes.routes["transformer.h.0.attn.c_attn"] == "materialise"
        assert routes.routes["lm_head.weight (tied)"] == "materialise"
    else:
        assert routes.routes["bert.embeddings.LayerNorm"] == "materialise"
        assert routes.routes["classifier"] == "ghost"
        if strategy == "ghost":
            for layer in ("encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense",
                          "embeddings.word_embeddings", "embeddings.position_embeddings"):
                assert routes.routes[f"bert.{layer}"] == "ghost", layer


def test_drop_policy_matches_plain_loop(tmp_path):
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    model = _bert()
    initial = copy.deepcopy(model)
    seen = []  # the input_ids of every training forward pass, to recover the batches

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append(kwargs["input_ids"].detach().clone())

    model.register_forward_pre_hook(record, with_kwargs=True)
    data = TokenData()
    trainer = GradGuardTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                               guard=gg.GradGuard(**kwargs))
    trainer.train()
    # The examples of each batch, read off the input_ids the model received.
    batches = [[int((data.ids == row).all(1).nonzero()) for row in ids] for ids in seen]
    assert sorted(i for b in batches for i in b) == sorted(list(range(N)) * 2)

    net = initial.train()
    guard = gg.GradGuard(**kwargs)
    net, opt, loader = guard.make_guarded(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(data, batch_sampler=batches))
    for batch in loader:
        opt.zero_grad()
        ids = batch["input_ids"]
        # positions spelled out per example, as GradGuardTrainer passes them
        out = net(input_ids=ids, attention_mask=batch["attention_mask"],
                  position_ids=torch.arange(ids.shape[1]).expand_as(ids))
        per_example_loss(out.logits, batch["labels"]).mean().backward()
        opt.step()
    assert float(guard.summary()["dropped_total"]) > 0
    assert_same_run(trainer.guard.ledger, guard.ledger, model.parameters(), net.parameters(),
                    rtol=1e-4, atol=1e-6)
    guard.close()


def test_monitor_trains_like_the_stock_trainer(tmp_path):
    guarded, plain = _bert(), _bert()
    trainer = GradGuardTrainer(model=guarded, args=_args(tmp_path / "g", num_train_epochs=1),
                               train_dataset=TokenData(), guard=gg.GradGuard(lam=LAM))
    trainer.train()
    Trainer(model=plain, args=_args(tmp_path / "p", num_train_epochs=1),
            train_dataset=TokenData()).train()
    for a, b in zip(guarded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the dataset size the trainer filled in is the guard's config too
    assert trainer.guard.config.num_examples == trainer.guard.num_examples == N
    # evaluation goes through the same compute_loss, without indices or a guarded step
    assert torch.isfinite(torch.tensor(trainer.evaluate(eval_dataset=TokenData())["eval_loss"]))


def test_policy_gradients_are_clipped_again(tmp_path):
    """max_grad_norm applies to the gradients the policy rewrote, not only to DDP's."""
    model = _bert()
    before = [p.detach().clone() for p in model.parameters()]
    max_norm = 1e-3
    GradGuardTrainer(model=model, args=_args(tmp_path, max_steps=1, max_grad_norm=max_norm),
                     train_dataset=TokenData(),
                     guard=gg.GradGuard(policy="clip", threshold=gg.Quantile(0.5), lam=LAM)).train()
    step = torch.cat([(a.detach() - b).reshape(-1) for a, b in zip(model.parameters(), before)])
    # SGD with a constant learning rate: the step is lr × the applied gradient
    assert float(step.norm()) <= LR * max_norm * (1 + 1e-4)
    assert float(step.norm()) > 0.5 * LR * max_norm


def test_checkpoint_saves_and_resumes_the_guard(tmp_path):
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    first = GradGuardTrainer(model=_bert(), args=args, train_dataset=TokenData(),
                             guard=gg.GradGuard(lam=LAM))
    first.train()
    ckpt = os.path.join(str(tmp_path), "checkpoint-3")
    saved = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    assert int(saved["step"]) == 3
    assert torch.equal(saved["ledger"]["cum_gnq"], first.guard.ledger.cum_gnq)

    resumed = GradGuardTrainer(model=_bert(), args=_args(tmp_path, max_steps=6),
                               train_dataset=TokenData(), guard=gg.GradGuard(lam=LAM))
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.guard.step == 6
    assert int(resumed.guard.ledger.steps_seen.sum()) == 6 * BATCH


def test_per_example_loss_matches_the_models_own_loss():
    data = TokenData(causal=True)
    gpt2 = _gpt2()
    for i in range(3):  # one example alone: its own loss is the model's loss
        item = data[i]
        out = gpt2(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None],
                   labels=item["labels"][None])
        mine = per_example_loss(out.logits, item["labels"][None], causal_lm=True)
        torch.testing.assert_close(mine[0], out.loss)
    bert, data = _bert(), TokenData()
    batch = {k: torch.stack([data[i][k] for i in range(5)]) for k in data[0]}
    out = bert(**batch)
    torch.testing.assert_close(per_example_loss(out.logits, batch["labels"]).mean(), out.loss)
    with pytest.raises(ValueError, match="logits"):
        per_example_loss(torch.zeros(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))


def _recording(model) -> list[torch.Tensor]:
    """The input_ids of every training forward pass of ``model``, in order."""
    seen = []

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append(kwargs["input_ids"].detach().clone())

    model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def _examples(data, seen) -> list[list[int]]:
    return [[int((data.ids == row).all(1).nonzero()) for row in ids] for ids in seen]


def test_accumulation_first_window_gnq_matches_independent_reference(tmp_path):
    """gradient_accumulation_steps=2: two micro-batches of 8 are one logical batch of 16,
    GNQ in the per-example scale (the Trainer divides each micro-batch's loss by 2)."""
    model = _gpt2()
    initial = copy.deepcopy(model)
    seen = _recording(model)
    data = TokenData(causal=True)
    trainer = GradGuardTrainer(model=model,
                               args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=2),
                               train_dataset=data, guard=gg.GradGuard(lam=LAM))
    trainer.train()
    window = [i for b in _examples(data, seen)[:2] for i in b]
    assert trainer.guard.last_indices.tolist() == window and len(window) == 2 * BATCH
    G = _per_example_grads(initial, data, torch.tensor(window), causal=True)
    torch.testing.assert_close(trainer.guard.last_gnq, gnq_push_through(G, LAM),
                               rtol=2e-4, atol=1e-6)


def test_accumulation_monitor_trains_like_the_stock_trainer(tmp_path):
    """3 batches per epoch, windows of 2 and 1: the guard changes nothing."""
    guarded, plain = _bert(), _bert()
    args = dict(num_train_epochs=2, gradient_accumulation_steps=2)
    trainer = GradGuardTrainer(model=guarded, args=_args(tmp_path / "g", **args),
                               train_dataset=TokenData(), guard=gg.GradGuard(lam=LAM))
    trainer.train()
    stock = Trainer(model=plain, args=_args(tmp_path / "p", **args), train_dataset=TokenData())
    # BERT's forward takes **kwargs, so the stock Trainer would expect the model to normalise
    # by num_items_in_batch (which this head ignores) and not divide by the window's size.
    # GradGuardTrainer divides (its loss is a plain per-batch mean): compare like with like.
    stock.model_accepts_loss_kwargs = False
    stock.train()
    for a, b in zip(guarded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert trainer.guard.step == 4
    assert int(trainer.guard.ledger.steps_seen.sum()) == 2 * N


def test_accumulation_drop_policy_matches_plain_loop(tmp_path):
    """gradient_accumulation_steps=2 equals the plain-loop guard with (loss / 2).backward()
    and accumulation_steps=2 over the same micro-batches."""
    kwargs = dict(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    micro = 6  # 4 micro-batches per epoch: two full windows
    model = _bert()
    initial = copy.deepcopy(model)
    seen = _recording(model)
    data = TokenData()
    trainer = GradGuardTrainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=2,
                                per_device_train_batch_size=micro),
        train_dataset=data, guard=gg.GradGuard(**kwargs))
    trainer.train()
    batches = _examples(data, seen)
    assert len(batches) == 2 * N // micro

    net = initial.train()
    guard = gg.GradGuard(**kwargs)
    net, opt, loader = guard.make_guarded(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        data_loader=DataLoader(data, batch_sampler=batches), accumulation_steps=2)
    for k, batch in enumerate(loader):
        if k % 2 == 0:
            opt.zero_grad()
        ids = batch["input_ids"]
        out = net(input_ids=ids, attention_mask=batch["attention_mask"],
                  position_ids=torch.arange(ids.shape[1]).expand_as(ids))
        (per_example_loss(out.logits, batch["labels"]).mean() / 2).backward()
        if k % 2 == 1:
            opt.step()
    assert guard.step == trainer.guard.step == N // micro
    assert float(guard.summary()["dropped_total"]) > 0
    assert_same_run(trainer.guard.ledger, guard.ledger, model.parameters(), net.parameters(),
                    rtol=1e-4, atol=1e-6)
    guard.close()


def test_metrics_reach_the_log_history(tmp_path):
    guard = gg.GradGuard(policy="drop", threshold=gg.Quantile(0.7, window=2), lam=LAM)
    trainer = GradGuardTrainer(model=_bert(), args=_args(tmp_path, logging_strategy="steps",
                                                         logging_steps=1),
                               train_dataset=TokenData(), guard=guard)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "gradguard/gnq/mean" in h]
    assert [h["step"] for h in logged] == list(range(1, guard.step + 1))
    last = logged[-1]
    # the values of the run's last step, as the guard itself holds them
    assert last["gradguard/gnq/mean"] == pytest.approx(float(guard.last_gnq.double().mean()))
    assert last["gradguard/gnq/max"] == pytest.approx(float(guard.last_gnq.max()))
    summary = guard.summary()
    assert last["gradguard/disclosure/max"] == pytest.approx(summary["max_bound"])
    assert last["gradguard/disclosure/mean"] == pytest.approx(summary["mean_bound"])
    assert last["gradguard/policy/dropped_total"] == summary["dropped_total"] > 0
    # the disclosure bound only grows
    maxima = [h["gradguard/disclosure/max"] for h in logged]
    assert maxima == sorted(maxima)


def test_bf16_gnq_matches_independent_reference(tmp_path):
    """bf16 autocast on CPU: GNQ against float64 per-example gradients, within bf16
    rounding (the layers do run in bf16)."""
    model = _gpt2()
    initial = copy.deepcopy(model)
    dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    data = TokenData(causal=True)
    trainer = GradGuardTrainer(model=model, args=_args(tmp_path, max_steps=1, bf16=True),
                               train_dataset=data, guard=gg.GradGuard(lam=LAM))
    trainer.train()
    assert dtypes == [torch.bfloat16]
    G = _per_example_grads(initial, data, trainer.guard.last_indices, causal=True)
    torch.testing.assert_close(trainer.guard.last_gnq, gnq_push_through(G, LAM),
                               rtol=5e-2, atol=0)


def test_unsupported_setups_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="loss_reduction"):
        GradGuardTrainer(model=_bert(), args=_args(tmp_path), train_dataset=TokenData(),
                         loss_reduction="none")
    with pytest.raises(ValueError, match="fp16"):
        GradGuardTrainer(model=_bert(), args=_args(tmp_path, fp16=True), train_dataset=TokenData())


@pytest.mark.parametrize("wrap", ["plain", "peft", "peft_causal_lm"])
def test_trainer_loss_is_the_causal_lm_loss_through_wrappers(tmp_path, wrap):
    """The trainer trains the model's own objective, also when peft wraps the model
    (PeftModelForCausalLM used to be taken for a token classifier: no label shift)."""
    peft = pytest.importorskip("peft")
    model = _gpt2()
    if wrap != "plain":
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                 task_type="CAUSAL_LM" if wrap == "peft_causal_lm" else None)
        model = peft.get_peft_model(model, config)
    assert gg.integrations.huggingface.is_causal_lm(model)
    assert gg.integrations.huggingface.is_causal_lm(torch.compile(model))  # wraps, compiles lazily
    trainer = GradGuardTrainer(model=model, args=_args(tmp_path), train_dataset=TokenData(),
                               guard=gg.GradGuard(lam=LAM))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids = torch.randint(0, VOCAB, (5, T), generator=g)  # no padding: every token counts
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    own = model(**batch).loss
    with torch.no_grad():
        mine = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(mine, own.detach())
