"""gradguard benchmark suite: step time and peak memory against plain training and Opacus.

One process measures, for each model and batch size, the median optimizer-step time
(``zero_grad`` + forward + loss + backward + ``step``) and the peak memory of a step for:

- ``plain``: ordinary training, the baseline every ratio is taken against;
- ``gg_monitor``: gradguard measuring GNQ every step (the update is untouched);
- ``gg_drop``: gradguard dropping examples above a calibrated threshold (the update is
  rebuilt from the cached activations and output gradients);
- ``gg_materialise``: gradguard with every layer's per-example gradients materialised;
- ``opacus_hooks``: Opacus DP-SGD, per-example gradients by hooks (B×P memory);
- ``opacus_ghost``: Opacus ghost clipping (norms from A and Δ, a second backward);
- ``naive_gnq``: the textbook route: torch.func per-example gradients, their Gram,
  ``gnq_from_gram``, and the mean gradient for the update.

The variants' repeats are interleaved (round r runs one step of every variant, in an
order rotated each round), so a slow phase of a noisy machine hits all of them alike;
each ratio is the median over rounds of (variant step time / plain step time in the
same round).

Peak memory (CPU): glibc's RSS does not come back down when tensors are freed and the
caching of large blocks varies from run to run, and tracemalloc does not see torch's
allocations. We therefore replay the allocation and free events of torch's CPU
allocator recorded by ``torch.profiler`` (``profile_memory=True``) over one full step
(after a profiled warm-up step, so that frees of the previous step's tensors are seen)
and report the peak of live bytes above the level at the start of the step. It counts
every tensor torch allocates (activations, gradients, per-example gradients, Grams,
workspace of ops that go through the allocator) and nothing else (interpreter, MKL
scratch). On CUDA, ``torch.cuda.max_memory_allocated`` is used instead. "Extra memory"
is a variant's peak minus plain training's peak.

Further sections: how the GNQ cost grows with the batch size (the B² Gram and the B³
solve, timed apart), and the cost of one input-curvature probe per example for each
estimator, with the probe's default schedule turned into a fraction of training time.

Usage::

    python benchmarks/run.py                      # full suite, ~10 min on 2 CPU cores
    python benchmarks/run.py --quick              # a fast pass
    python benchmarks/run.py --models mlp --batch-sizes 128
    python benchmarks/run.py --models gpt2 gpt2_lora gpt2_long   # GPT-2-shaped LM rows
"""

from __future__ import annotations

import os

# The profiler (used for peak memory) is chatty on stderr unless told otherwise.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse  # noqa: E402
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "transformer")
# GPT-2-shaped language models (issue 12), behind --models: each runs its own variants
# at B = 16 (see model_spec).
LM_MODELS = ("gpt2", "gpt2_lora", "gpt2_long")
VARIANTS = ("plain", "gg_monitor", "gg_drop", "gg_materialise", "opacus_hooks", "opacus_ghost",
            "naive_gnq")
ALL_VARIANTS = (*VARIANTS, "gg_sketch")
LM_BATCH = 16
BATCH_SIZES = (32, 128, 512)
TARGET_BATCH = 128  # the batch size of the targets
NUM_CLASSES = 10
SEQ_LEN = 64
VOCAB = 1000

# --------------------------------------------------------------------------- models


class TinyEncoder(nn.Module):
    """Token classifier: embedding, sinusoidal positions, nn.TransformerEncoder, mean pool."""

    def __init__(self, *, vocab: int, d_model: int, heads: int, ff: int, layers: int,
                 seq_len: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))
        table = torch.zeros(seq_len, d_model)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("positions", table)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.positions[: ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as the suite's ``model(x)``: next-token logits laid out
    ``[B, V, T - 1]`` for ``F.cross_entropy`` against ``ids[:, 1:]`` (each example's mean
    token loss, averaged over the batch), positions spelled out per example."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.model(input_ids=ids, position_ids=positions).logits[:, :-1].transpose(1, 2)


def _gpt2_spec(name: str, tiny: bool) -> ModelSpec:
    layers, d, vocab = (1, 16, 50) if tiny else (4, 256, 2000)
    T = (8 if tiny else 512) if name == "gpt2_long" else (8 if tiny else 64)
    lora = name == "gpt2_lora"

    def build():
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab,
                                           n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
        if lora:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                target_modules=["c_attn", "c_proj", "c_fc"]))
        return CausalLM(model)

    def batch(B, gen):
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        return ids, ids[:, 1:]

    variants = {"gpt2": ("plain", "gg_monitor", "gg_sketch"), "gpt2_lora": ("plain", "gg_monitor"),
                "gpt2_long": ("plain", "gg_sketch")}[name]
    desc = (f"GPT-2 (transformers): {layers} layers, d={d}, vocab {vocab}, T={T}"
            + (", peft LoRA r=8 on c_attn/c_proj/c_fc (GNQ over the adapters)" if lora else "")
            + (" (the long-context row: sketch only)" if name == "gpt2_long" else ""))
    return ModelSpec(name, build, batch, desc, variants=variants, batch_sizes=(LM_BATCH,))


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    description: str
    variants: tuple[str, ...] | None = None  # the variants this model runs (default: all)
    batch_sizes: tuple[int, ...] | None = None  # its batch sizes (default: the suite's)


def model_spec(name: str, *, scale: str = "full") -> ModelSpec:
    """The benchmark models; ``scale="tiny"`` shrinks them for smoke tests."""
    tiny = scale == "tiny"
    if name == "mlp":
        side, hidden = (8, (16,)) if tiny else (32, (300, 300))

        def build():
            from gradguard.experiments.models import mlp
            return mlp((3, side, side), NUM_CLASSES, hidden=hidden)

        def batch(B, gen):
            return (torch.randn(B, 3, side, side, generator=gen),
                    torch.randint(0, NUM_CLASSES, (B,), generator=gen))
        desc = f"MLP 3×{side}×{side} → {' → '.join(map(str, hidden))} → {NUM_CLASSES}, ReLU"
    elif name == "cnn":
        side, channels = (8, (4, 8)) if tiny else (32, (32, 64))

        def build():
            from gradguard.experiments.models import small_cnn
            return small_cnn((3, side, side), NUM_CLASSES, channels=channels)

        def batch(B, gen):
            return (torch.randn(B, 3, side, side, generator=gen),
                    torch.randint(0, NUM_CLASSES, (B,), generator=gen))
        desc = (f"CNN on 3×{side}×{side}: conv3×3 {channels[0]} → pool → conv3×3 "
                f"{channels[1]} → pool → linear")
    elif name in LM_MODELS:
        return _gpt2_spec(name, tiny)
    elif name == "transformer":
        d, heads, ff, layers, T, vocab = ((16, 2, 32, 1, 8, 50) if tiny
                                          else (64, 4, 256, 2, SEQ_LEN, VOCAB))

        def build():
            return TinyEncoder(vocab=vocab, d_model=d, heads=heads, ff=ff, layers=layers,
                               seq_len=T, num_classes=NUM_CLASSES)

        def batch(B, gen):
            return (torch.randint(0, vocab, (B, T), generator=gen),
                    torch.randint(0, NUM_CLASSES, (B,), generator=gen))
        desc = (f"Transformer encoder: {layers} × nn.TransformerEncoderLayer(d={d}, heads="
                f"{heads}, ff={ff}), vocab {vocab}, sequence length {T}")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS + LM_MODELS}")
    return ModelSpec(name, build, batch, desc)


def seeded_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


# --------------------------------------------------------------------------- variants

class Variant:
    """One way of training: ``setup`` once, then ``step(x, y, indices)`` per batch."""

    name = "?"
    needs_opacus_fix = False

    def setup(self, model: nn.Module, *, num_examples: int, batch_size: int) -> None:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Release the gradients the last step left (the next step starts from None)."""
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


class Plain(Variant):
    name = "plain"

    def setup(self, model, *, num_examples, batch_size):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(self, x, y, indices):
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()


class GuardVariant(Variant):
    def __init__(self, name: str, **guard_kwargs):
        self.name = name
        self.guard_kwargs = guard_kwargs

    def setup(self, model, *, num_examples, batch_size):
        from gradguard.engine import GradGuard

        self.guard = GradGuard(log_dir=None, num_examples=num_examples, **self.guard_kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.model, self.opt, _ = self.guard.make_guarded(module=model, optimizer=opt,
                                                          data_loader=None)
        self.opt.expected_batch_size = batch_size

    def step(self, x, y, indices):
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.guard.set_batch_indices(indices)
        self.opt.step()

    def close(self):
        self.guard.close()


class OpacusVariant(Variant):
    needs_opacus_fix = True

    def __init__(self, name: str, mode: str):
        self.name = name
        self.mode = mode

    def setup(self, model, *, num_examples, batch_size):
        from opacus import PrivacyEngine

        data = torch.utils.data.TensorDataset(torch.zeros(num_examples, 1),
                                              torch.zeros(num_examples, dtype=torch.long))
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        engine = PrivacyEngine(accountant="rdp")
        # Opacus draws the noise on the parameters' device: the generator must live there
        # (a CPU generator fails on CUDA).
        device = next(model.parameters()).device
        kwargs = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, poisson_sampling=False,
                      noise_generator=torch.Generator(device=device).manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.mode == "ghost":
                self.model, self.opt, self.criterion, _ = engine.make_private(
                    **kwargs, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost")
            else:
                self.model, self.opt, _ = engine.make_private(**kwargs, grad_sample_mode="hooks")
                self.criterion = nn.CrossEntropyLoss()

    def step(self, x, y, indices):
        self.opt.zero_grad(set_to_none=True)
        self.criterion(self.model(x), y).backward()
        self.opt.step()


class NaiveGNQ(Variant):
    """torch.func per-example gradients → Gram → gnq_from_gram; their mean is the update."""

    name = "naive_gnq"

    def setup(self, model, *, num_examples, batch_size):
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.params = [p for p in model.parameters() if p.requires_grad]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        buffers = dict(model.named_buffers())

        def loss_one(p, xi, yi):
            out = functional_call(model, (dict(zip(names, p)), buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

        self.per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step(self, x, y, indices):
        from gradguard.uniqueness.gnq import gnq_from_gram

        self.opt.zero_grad(set_to_none=True)
        grads = self.per_example([p.detach() for p in self.params], x, y)
        B = x.shape[0]
        K = None
        for g in grads:  # float32 Grams summed in float64, as gradguard does by default
            flat = g.reshape(B, -1)
            part = (flat @ flat.T).to(torch.float64)
            K = part if K is None else K + part
        self.gnq = gnq_from_gram(K, 1e-2)
        for p, g in zip(self.params, grads):
            p.grad = g.mean(0)
        self.opt.step()


def make_variant(name: str) -> Variant:
    from gradguard.policies import Quantile

    factories: dict[str, Callable[[], Variant]] = {
        "plain": Plain,
        "gg_monitor": lambda: GuardVariant("gg_monitor", policy="monitor"),
        "gg_drop": lambda: GuardVariant("gg_drop", policy="drop", threshold=Quantile(0.9)),
        "gg_materialise": lambda: GuardVariant("gg_materialise", policy="monitor",
                                               strategy="materialise"),
        "opacus_hooks": lambda: OpacusVariant("opacus_hooks", "hooks"),
        "opacus_ghost": lambda: OpacusVariant("opacus_ghost", "ghost"),
        "naive_gnq": NaiveGNQ,
        "gg_sketch": lambda: GuardVariant("gg_sketch", policy="monitor", strategy="sketch"),
    }
    if name not in factories:
        raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
    return factories[name]()


def prepare_variant(name: str, spec: ModelSpec, *, num_examples: int, batch_size: int,
                    device: torch.device | str = "cpu") -> Variant:
    variant = make_variant(name)
    model = seeded_model(spec).to(device)
    if variant.needs_opacus_fix:
        from opacus.validators import ModuleValidator

        # nn.MultiheadAttention → DPMultiheadAttention (Opacus cannot hook the former);
        # other models come back unchanged.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not ModuleValidator.is_valid(model):
                model = ModuleValidator.fix(model)
    variant.setup(model, num_examples=num_examples, batch_size=batch_size)
    return variant


# --------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet():
    """Silence library warnings and the profiler's C++ chatter on stderr while measuring."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(variant: Variant, batch: tuple, device: torch.device) -> dict:
    """Peak bytes of tensors allocated during one step (gradients included).

    The variant's gradients are released first (``zero_grad(set_to_none=True)``, which
    the step itself would do), so the step starts from the model, optimizer state and
    data alone. CPU: the step runs under torch.profiler with ``profile_memory=True`` and
    its allocator events (+bytes on allocation, −bytes on free, in time order) are
    replayed; the peak of the running sum is the step's working set. Frees of blocks
    allocated before the step are not reported by the profiler, so the figure can only
    err upwards, by what the step frees of older state (tiny: ledger entries, etc.).
    """
    gc.collect()
    variant.zero_grad()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        variant.step(*batch)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak - base),
                "retained_bytes": int(torch.cuda.memory_allocated(device) - base),
                "method": "torch.cuda.max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    with _quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(*batch)
    cpu = torch._C._autograd.DeviceType.CPU
    memory = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    level = peak = 0
    for _, nbytes in memory:
        level += nbytes
        peak = max(peak, level)
    return {"peak_bytes": int(peak), "retained_bytes": int(level),
            "method": "torch.profiler CPU allocator events"}


@dataclass
class CellResult:
    model: str
    batch_size: int
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


def run_cell(spec: ModelSpec, batch_size: int, variants: Sequence[str], *, warmup: int,
             repeats: int, budget_s: float, memory: bool, device: torch.device,
             log: Callable[[str], None], slow_s: float = 10.0) -> CellResult:
    """All variants of one (model, batch size): warm-up, memory, then interleaved timing.

    Round r runs one step of every variant, in an order rotated by r. Rounds go on until
    ``repeats`` or until ``budget_s`` seconds of timed rounds have passed (at least three
    rounds, or one when a single round already takes a third of the budget). A variant
    whose warm-up step took longer than ``slow_s`` is timed in the first round only.
    """
    gen = torch.Generator().manual_seed(1234 + batch_size)
    n_batches = 4
    num_examples = n_batches * batch_size
    batches = []
    for k in range(n_batches):
        x, y = spec.make_batch(batch_size, gen)
        idx = torch.arange(k * batch_size, (k + 1) * batch_size)
        batches.append((x.to(device), y.to(device), idx.to(device)))
    cell = CellResult(spec.name, batch_size)
    live: dict[str, Variant] = {}
    for name in variants:
        try:
            live[name] = prepare_variant(name, spec, num_examples=num_examples,
                                         batch_size=batch_size, device=device)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
            cell.errors[name] = _short_error(exc)
            log(f"  {name}: cannot run: {cell.errors[name]}")

    def drop(name: str, exc: BaseException) -> None:
        cell.errors[name] = _short_error(exc)
        log(f"  {name}: failed: {cell.errors[name]}")
        live.pop(name).close()

    step_s: dict[str, float] = {}
    for w in range(max(1, warmup)):  # warm-up (also catches a variant failing at once)
        for name in list(live):
            try:
                t1 = time.perf_counter()
                live[name].step(*batches[w % n_batches])
                step_s[name] = time.perf_counter() - t1
            except Exception as exc:  # noqa: BLE001
                drop(name, exc)
    slow = {n for n, t in step_s.items() if t > slow_s and n != "plain"}
    if slow:
        log(f"  timed once only (a step takes > {slow_s:g} s): {', '.join(sorted(slow))}")
    if memory:  # one more untimed step per variant, profiled
        for name in list(live):
            try:
                cell.memory[name] = peak_step_bytes(live[name], batches[1], device)
            except Exception as exc:  # noqa: BLE001
                drop(name, exc)
    order = list(live)
    for name in order:
        cell.times[name], cell.cpu_times[name] = [], []
    fast_round_s = sum(t for n, t in step_s.items() if n in live and n not in slow)
    min_rounds = 3 if fast_round_s < budget_s / 3 else 1
    started = time.perf_counter()
    for r in range(repeats):
        rotated = order[r % len(order):] + order[: r % len(order)] if order else []
        for name in rotated:
            if r and name in slow:
                continue
            xb = batches[r % n_batches]
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            live[name].step(*xb)
            _sync(device)
            cell.times[name].append(time.perf_counter() - t0)
            cell.cpu_times[name].append(time.process_time() - c0)
        if r + 1 >= min_rounds and time.perf_counter() - started > budget_s:
            break
    for v in live.values():
        v.close()
    return cell


def summarise_cell(cell: CellResult, n_params: int) -> list[dict]:
    rows = []
    plain = cell.times.get("plain")
    plain_mem = cell.memory.get("plain", {}).get("peak_bytes")
    for name in ALL_VARIANTS:
        if name in cell.errors and name not in cell.times:
            rows.append({"model": cell.model, "batch_size": cell.batch_size, "variant": name,
                         "params": n_params, "error": cell.errors[name]})
            continue
        if name not in cell.times:
            continue
        ts = cell.times[name]
        row: dict[str, Any] = {
            "model": cell.model, "batch_size": cell.batch_size, "variant": name,
            "params": n_params, "repeats": len(ts),
            "median_step_s": statistics.median(ts),
            "q25_step_s": _quantile(ts, 0.25), "q75_step_s": _quantile(ts, 0.75),
        }
        cpu = cell.cpu_times.get(name, [])
        if cpu:
            row["median_cpu_s"] = statistics.median(cpu)
        if plain:
            n = min(len(plain), len(ts))
            ratios = [a / b for a, b in zip(ts[:n], plain[:n])]
            row["ratio_vs_plain"] = statistics.median(ratios)
            row["ratio_vs_plain_q25"] = _quantile(ratios, 0.25)
            row["ratio_vs_plain_q75"] = _quantile(ratios, 0.75)
            plain_cpu = cell.cpu_times.get("plain", [])
            if cpu and plain_cpu:
                row["cpu_ratio_vs_plain"] = statistics.median(
                    [a / b for a, b in zip(cpu, plain_cpu) if b > 0] or [math.nan])
        mem = cell.memory.get(name)
        if mem is not None:
            row.update({f"memory_{k}": v for k, v in mem.items()})
            if plain_mem is not None and "peak_bytes" in mem:
                row["extra_bytes"] = mem["peak_bytes"] - plain_mem
        rows.append(row)
    return rows


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------- GNQ scaling

def gnq_scaling(spec: ModelSpec, batch_sizes: Sequence[int], *, repeats: int,
                device: torch.device) -> list[dict]:
    """Time the Gram (B² terms) and the solve (B³) apart, per batch size."""
    from gradguard.uniqueness.gnq import gnq_from_gram
    from gradguard.uniqueness.hooks import GramHooks

    rows = []
    for B in batch_sizes:
        model = seeded_model(spec).to(device)
        gen = torch.Generator().manual_seed(99 + B)
        x, y = (t.to(device) for t in spec.make_batch(B, gen))
        hooks = GramHooks(model, loss_reduction="mean")
        backward_t, gram_t, solve_t = [], [], []
        try:
            for r in range(repeats + 1):
                hooks.clear()
                model.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                _sync(device)
                t1 = time.perf_counter()
                K = hooks.gram()
                _sync(device)
                t2 = time.perf_counter()
                gnq_from_gram(K, 1e-2)
                _sync(device)
                t3 = time.perf_counter()
                if r:  # the first round is warm-up
                    backward_t.append(t1 - t0)
                    gram_t.append(t2 - t1)
                    solve_t.append(t3 - t2)
        finally:
            hooks.remove()
        rows.append({"model": spec.name, "batch_size": B,
                     "forward_backward_s": statistics.median(backward_t),
                     "gram_s": statistics.median(gram_t),
                     "solve_s": statistics.median(solve_t)})
    for key in ("gram_s", "solve_s", "forward_backward_s"):
        slope = _loglog_slope([r["batch_size"] for r in rows], [r[key] for r in rows])
        for r in rows:
            r[f"{key[:-2]}_exponent"] = slope
    return rows


def _loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y on log x over the two largest halves of the range."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(pts) < 2:
        return None
    pts = pts[len(pts) // 2 - (1 if len(pts) % 2 == 0 and len(pts) > 2 else 0):] \
        if len(pts) > 3 else pts
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


# --------------------------------------------------------------------------- curvature

def curvature_costs(specs: Sequence[ModelSpec], *, batch_size: int, repeats: int,
                    plain_step_s: dict[str, float], device: torch.device) -> dict:
    """Per estimator: seconds per example of ``input_curvature`` on a batch; and the share of
    training time of a real ``CurvatureProbe`` at its default schedule.

    The share is measured, not extrapolated: ``CurvatureProbe.run`` (default estimator,
    sample sizes, vectors, chunking) is timed on the model, and set against ``every``
    plain training steps: probe / (every · plain step + probe). For the other estimators
    the probe's time is scaled by their per-example cost relative to the default's.
    """
    try:
        from gradguard.curvature.estimators import input_curvature
        from gradguard.curvature.probe import CurvatureProbe
    except Exception as exc:  # noqa: BLE001 - another module may not exist yet
        return {"skipped": f"gradguard.curvature is not importable: {_short_error(exc)}"}
    schedule = _probe_defaults()
    estimators = ("hutchinson", "fd", "zo")
    out: dict[str, Any] = {"batch_size": batch_size, "schedule": schedule, "models": {}}
    for spec in specs:
        model = seeded_model(spec).to(device)
        gen = torch.Generator().manual_seed(7)
        x, y = (t.to(device) for t in spec.make_batch(batch_size, gen))
        if not torch.is_floating_point(x):
            out["models"][spec.name] = {
                "skipped": "integer token inputs: input curvature needs a differentiable input"}
            continue
        per_model: dict[str, Any] = {}
        for est in estimators:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                input_curvature(model, x, y, estimator=est, generator=g)  # warm-up
                ts = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    input_curvature(model, x, y, estimator=est, generator=g)
                    _sync(device)
                    ts.append(time.perf_counter() - t0)
                per_ex = statistics.median(ts) / batch_size
                per_model[est] = {"seconds_per_example": per_ex,
                                  "per_example_vs_plain_step": per_ex / plain_step_s[spec.name]
                                  if spec.name in plain_step_s else None}
            except Exception as exc:  # noqa: BLE001
                per_model[est] = {"error": _short_error(exc)}
        default = schedule.get("estimator")
        if spec.name in plain_step_s and "seconds_per_example" in per_model.get(default, {}):
            n = schedule.get("examples_per_probe", 0) // 2
            data = torch.utils.data.TensorDataset(*spec.make_batch(max(n, 1), gen))
            probe = CurvatureProbe(data, data)
            probe.run(model, 0)  # warm-up
            probe_s = statistics.median(probe.run(model, k + 1).seconds for k in range(repeats))
            train_s = schedule["every"] * plain_step_s[spec.name]
            for est, entry in per_model.items():
                if "seconds_per_example" not in entry:
                    continue
                scaled = probe_s * entry["seconds_per_example"] \
                    / per_model[default]["seconds_per_example"]
                entry["probe_s"] = scaled
                entry["probe_s_method"] = "CurvatureProbe.run timed" if est == default \
                    else f"timed {default} probe × per-example cost ratio"
                entry["fraction_of_training"] = scaled / (train_s + scaled)
        out["models"][spec.name] = per_model
    return out


def _probe_defaults() -> dict:
    """The CurvatureProbe's default schedule, read from its signature where it exists."""
    info: dict[str, Any] = {"source": "DESIGN.md (every=200)", "every": 200}
    try:
        from gradguard.curvature.probe import CurvatureProbe
    except Exception as exc:  # noqa: BLE001
        info["note"] = f"CurvatureProbe not importable ({_short_error(exc)})"
        return info
    params = inspect.signature(CurvatureProbe).parameters
    info["source"] = "CurvatureProbe signature defaults"
    for key in ("every", "max_examples", "n_examples", "num_examples", "estimator",
                "n_vectors"):
        if key in params and params[key].default is not inspect.Parameter.empty:
            info[key] = params[key].default
    for key in ("max_examples", "n_examples", "num_examples"):
        if isinstance(info.get(key), int):
            info["examples_per_probe"] = 2 * info[key]  # members and non-members
    return info


# --------------------------------------------------------------------------- reporting

def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(Exception):
        import opacus
        info["opacus"] = opacus.__version__
    return info


def _mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def format_table(rows: list[dict]) -> str:
    lines = ["| model | B | variant | median step (ms) | × plain, wall (IQR) | × plain, CPU | "
             "rounds | peak step MB | extra MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['variant']} | n/a: "
                         f"{r['error'][:90]} | | | | | |")
            continue
        ratio = r.get("ratio_vs_plain")
        rtxt = "—" if ratio is None else (f"{ratio:.2f} ({r['ratio_vs_plain_q25']:.2f}–"
                                          f"{r['ratio_vs_plain_q75']:.2f})")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['variant']} | "
                     f"{1e3 * r['median_step_s']:.1f} | {rtxt} | "
                     f"{_fmt(r.get('cpu_ratio_vs_plain'))} | {r['repeats']} | "
                     f"{_mb(r.get('memory_peak_bytes'))} | {_mb(r.get('extra_bytes'))} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], curvature: dict | None, *,
                  batch_size: int = TARGET_BATCH) -> list:
    """The issue's targets at B = 128, each with its measured value and pass/fail."""
    by = {(r["model"], r["batch_size"], r["variant"]): r for r in rows if "error" not in r}
    targets = []

    def add(name, value, ok, detail=""):
        targets.append({"target": name, "value": value, "pass": ok, "detail": detail})

    for model in ("mlp", "cnn"):
        for variant, limit in (("gg_monitor", 1.5), ("gg_drop", 1.7)):
            r = by.get((model, batch_size, variant))
            if r and "ratio_vs_plain" in r:
                add(f"{variant} ≤ {limit}× plain ({model}, B={batch_size})",
                    round(r["ratio_vs_plain"], 3), r["ratio_vs_plain"] <= limit)
    for model in MODELS:
        mon, op = by.get((model, batch_size, "gg_monitor")), by.get(
            (model, batch_size, "opacus_hooks"))
        if mon and op:
            add(f"gg_monitor faster than opacus_hooks ({model}, B={batch_size})",
                round(op["median_step_s"] / mon["median_step_s"], 3),
                mon["median_step_s"] < op["median_step_s"], "value = opacus time / monitor time")
    mon, naive = by.get(("mlp", batch_size, "gg_monitor")), by.get(("mlp", batch_size,
                                                                    "naive_gnq"))
    if mon and naive:
        speed = naive["median_step_s"] / mon["median_step_s"]
        add(f"gg_monitor ≥ 3× faster than naive_gnq (mlp, B={batch_size})", round(speed, 2),
            speed >= 3)
        em, en = mon.get("extra_bytes"), naive.get("extra_bytes")
        if em is not None and en is not None:
            factor = en / max(em, 1)
            add(f"gg_monitor ≥ 10× less extra memory than naive_gnq (mlp, B={batch_size})",
                round(factor, 1), factor >= 10,
                f"extra: monitor {_mb(em)} MB, naive {_mb(en)} MB")
    for model, variant, limit in (("gpt2", "gg_monitor", 1.35), ("gpt2", "gg_sketch", 1.15),
                                  ("gpt2_lora", "gg_monitor", 1.10),
                                  ("gpt2_long", "gg_sketch", 1.2)):
        r = by.get((model, LM_BATCH, variant))
        if r and "ratio_vs_plain" in r:
            add(f"{variant} ≤ {limit}× plain ({model}, B={LM_BATCH})",
                round(r["ratio_vs_plain"], 3), r["ratio_vs_plain"] <= limit)
    if curvature and "models" in curvature:
        for model, per in curvature["models"].items():
            if not isinstance(per, dict):
                continue
            for est, entry in per.items():
                if isinstance(entry, dict) and "fraction_of_training" in entry:
                    add(f"curvature probe ({est}) ≤ 10% of training time at the default "
                        f"schedule ({model})", round(entry["fraction_of_training"], 4),
                        entry["fraction_of_training"] <= 0.10)
    return targets


# --------------------------------------------------------------------------- driver

def count_params(spec: ModelSpec) -> int:
    return sum(p.numel() for p in seeded_model(spec).parameters())


def run_suite(*, models: Sequence[str] = MODELS, batch_sizes: Sequence[int] = BATCH_SIZES,
              variants: Sequence[str] = VARIANTS, warmup: int = 3, repeats: int = 30,
              cell_budget_s: float = 20.0, memory: bool = True,
              scaling_batch_sizes: Sequence[int] | None = (16, 32, 64, 128, 256, 512, 1024),
              scaling_model: str = "mlp", scaling_repeats: int = 5,
              curvature: bool = True, curvature_batch_size: int = TARGET_BATCH,
              scale: str = "full", threads: int | None = None, device: str = "cpu",
              time_limit_s: float | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run the suite in this process and return the JSON-able results.

    ``time_limit_s`` shrinks the timed rounds of the remaining cells when earlier ones
    ran long (each cell still gets its warm-up, memory step and at least one round).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    variants = [v for v in ALL_VARIANTS if v in variants]
    if "plain" not in variants:
        variants = ["plain", *variants]  # every ratio needs the baseline
    started = time.perf_counter()
    rows: list[dict] = []
    specs = {m: model_spec(m, scale=scale) for m in models}
    # The targets' cells (B = TARGET_BATCH) get three times the rounds and time: their
    # medians are what the targets are judged on, on a machine whose speed drifts.
    def weight(B: int) -> int:
        return 3 if B == TARGET_BATCH else 1

    def cell_sizes(m: str) -> Sequence[int]:
        return specs[m].batch_sizes or batch_sizes

    weights_left = sum(weight(B) for m in models for B in cell_sizes(m))
    reserve = (40.0 if scaling_batch_sizes else 0.0) + (20.0 if curvature else 0.0)
    for m in models:
        n_params = count_params(specs[m])
        log(f"{m}: {specs[m].description} ({n_params:,} parameters)")
        for B in cell_sizes(m):
            t0 = time.perf_counter()
            budget = cell_budget_s * weight(B)
            if time_limit_s is not None:
                left = time_limit_s - (t0 - started) - reserve
                # About half of a cell's time goes to warm-up and the memory step.
                budget = max(1.0, min(budget, 0.5 * left * weight(B) / weights_left))
            weights_left -= weight(B)
            cell = run_cell(specs[m], B, specs[m].variants or variants, warmup=warmup,
                            repeats=repeats * weight(B),
                            budget_s=budget, memory=memory, device=dev, log=log)
            rows.extend(summarise_cell(cell, n_params))
            log(f"  B={B}: done in {time.perf_counter() - t0:.1f} s")
    scaling = []
    if scaling_batch_sizes and scaling_model in specs:
        scaling = gnq_scaling(specs[scaling_model], scaling_batch_sizes,
                              repeats=scaling_repeats, device=dev)
        log(f"GNQ scaling done ({time.perf_counter() - started:.0f} s so far)")
    curv = None
    if curvature:
        plain = {r["model"]: r["median_step_s"] for r in rows
                 if r["variant"] == "plain" and r["batch_size"] == curvature_batch_size
                 and "median_step_s" in r}
        curv = curvature_costs([s for s in specs.values() if s.variants is None],
                               batch_size=curvature_batch_size,
                               repeats=max(3, scaling_repeats), plain_step_s=plain, device=dev)
        if "skipped" in curv:
            log(f"curvature section skipped: {curv['skipped']}")
    return {
        "machine": machine_info(),
        "config": {"models": list(models), "batch_sizes": list(batch_sizes),
                   "variants": list(variants), "warmup": warmup, "repeats": repeats,
                   "cell_budget_s": cell_budget_s, "scale": scale, "device": device,
                   "models_described": {m: specs[m].description for m in models},
                   "time_limit_s": time_limit_s,
                   "memory_method": "torch.profiler CPU allocator events: peak bytes of "
                                    "tensors allocated during one step, gradients included"
                   if dev.type == "cpu" else "torch.cuda.max_memory_allocated"},
        "results": rows,
        "gnq_scaling": scaling,
        "curvature": curv,
        "targets": check_targets(rows, curv),
        "wall_s": time.perf_counter() - started,
    }


def format_report(result: dict, command: str) -> str:
    m = result["machine"]
    out = [f"Command: `{command}`",
           f"Machine: {m['cpu']}, {m['cpu_count']} logical CPUs, torch {m['torch']} with "
           f"{m['torch_threads']} threads, opacus {m.get('opacus', '?')}, Python "
           f"{m['python']}; suite wall time {result['wall_s']:.0f} s.", "",
           format_table(result["results"])]
    if result["gnq_scaling"]:
        out += ["", "GNQ cost against batch size (" + result["gnq_scaling"][0]["model"]
                + "): forward+backward, Gram from captured A/Δ (B² terms), solve (B³)", "",
                "| B | fwd+bwd (ms) | Gram (ms) | solve (ms) |", "|---:|---:|---:|---:|"]
        for r in result["gnq_scaling"]:
            out.append(f"| {r['batch_size']} | {1e3 * r['forward_backward_s']:.2f} | "
                       f"{1e3 * r['gram_s']:.2f} | {1e3 * r['solve_s']:.2f} |")
        r0 = result["gnq_scaling"][0]
        out.append("")
        out.append("Log-log slopes over the larger batch sizes: fwd+bwd "
                   f"{_fmt(r0['forward_backward_exponent'])}, Gram {_fmt(r0['gram_exponent'])}, "
                   f"solve {_fmt(r0['solve_exponent'])}.")
    curv = result.get("curvature")
    if curv:
        out.append("")
        if "skipped" in curv:
            out.append(f"Curvature probe costs: skipped ({curv['skipped']}).")
        else:
            out += [f"Curvature probe cost per example (batch of {curv['batch_size']}); "
                    f"schedule: {curv['schedule']}", "",
                    "| model | estimator | ms / example | × plain step | share of training |",
                    "|---|---|---:|---:|---:|"]
            for model, per in curv["models"].items():
                if "skipped" in per:
                    out.append(f"| {model} | — | skipped: {per['skipped']} | | |")
                    continue
                for est, e in per.items():
                    if "error" in e:
                        out.append(f"| {model} | {est} | error: {e['error'][:60]} | | |")
                        continue
                    frac = e.get("fraction_of_training")
                    out.append(f"| {model} | {est} | {1e3 * e['seconds_per_example']:.3f} | "
                               f"{_fmt(e.get('per_example_vs_plain_step'))} | "
                               f"{'—' if frac is None else f'{100 * frac:.2f}%'} |")
    out += ["", "Targets (B = 128):", ""]
    for t in result["targets"]:
        out.append(f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']}: {t['value']}"
                   + (f" ({t['detail']})" if t["detail"] else ""))
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + LM_MODELS,
                   help="models to run (default: the three small ones); the GPT-2 rows "
                        f"{', '.join(LM_MODELS)} need the huggingface extra")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--quick", action="store_true",
                   help="a fast pass: fewer repeats, B in {32, 128}, smaller scaling sweep")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per cell (max)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds per cell (the memory step is one more)")
    p.add_argument("--cell-budget", type=float, default=None,
                   help="seconds of timed rounds per (model, batch size) before stopping early")
    p.add_argument("--time-limit", type=float, default=None,
                   help="overall seconds to aim for (default 540, --quick 150); later cells "
                        "get fewer rounds when earlier ones ran long")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--scaling-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes of the GNQ scaling sweep (default 16 … 1024)")
    p.add_argument("--no-curvature", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: the machine's CPU count)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (models and batches go there)")
    p.add_argument("--scale", default="full", choices=("full", "tiny"),
                   help="'tiny' shrinks every model (a smoke test of the machinery)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results.json"))
    args = p.parse_args(argv)
    # Opacus warns on every step that its full backward hooks fire without input grads.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    batch_sizes = args.batch_sizes
    if args.quick and args.batch_sizes == list(BATCH_SIZES):
        batch_sizes = [32, 128]
    repeats = args.repeats or (8 if args.quick else 40)
    budget = args.cell_budget or (6.0 if args.quick else 22.0)
    scaling_bs = None if args.no_scaling else (args.scaling_batch_sizes or (
        (32, 128, 512) if args.quick else (16, 32, 64, 128, 256, 512, 1024)))
    result = run_suite(models=args.models, batch_sizes=batch_sizes, variants=args.variants,
                       warmup=args.warmup, repeats=repeats, cell_budget_s=budget,
                       memory=not args.no_memory, scaling_batch_sizes=scaling_bs,
                       scaling_repeats=3 if args.quick else 5,
                       curvature=not args.no_curvature, threads=args.threads,
                       device=args.device, scale=args.scale, log=lambda s: print(s, flush=True),
                       time_limit_s=args.time_limit or (150.0 if args.quick else 540.0))
    command = "python benchmarks/run.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    result["command"] = command.strip()
    report = format_report(result, command.strip())
    print()
    print(report)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
