"""Membership-inference attack scores. Convention: higher score = "more likely a member".

Three families, matching DESIGN §4:

- loss threshold: ``loss_attack_scores`` = −per-example loss (members are fit better);
- input-loss curvature: ``curvature_attack_scores`` / ``curvature_attack`` (members sit in
  flatter regions, so lower curvature means member by default);
- LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022):
  ``logit_confidence`` of the target and shadow models, ``shadow_masks`` to pick each
  shadow model's training half, and ``lira_online`` / ``lira_offline`` to turn the
  confidences into per-example likelihood-ratio scores.

Model-facing functions run in eval mode under ``torch.no_grad()``, in batches, on the
device of the model, and restore every submodule's train/eval flag afterwards. Training
shadow models is the caller's job (``gradguard.experiments.compare`` does it).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "curvature_attack",
    "curvature_attack_scores",
    "lira_offline",
    "lira_online",
    "logit_confidence",
    "logit_confidence_from_logits",
    "loss_attack_scores",
    "per_example_loss",
    "shadow_masks",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Below this many shadow models LiRA's per-example variances are too noisy; the paper
# switches to one global variance there.
_GLOBAL_VARIANCE_BELOW = 64
# Keeps a Gaussian with (numerically) zero spread finite; LiRA's code adds 1e-30.
_MIN_STD = 1e-12
_VARIANCE_MODES = ("auto", "global", "per_example")


# ---------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; each submodule gets its own flag back (mixed modes too)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return fallback


def _check_batch_args(x: Any, y: Any, batch_size: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}; "
            "convert with torch.as_tensor"
        )
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must share their first (batch) dimension, got shapes {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _per_example_from_loss_fn(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    batch = targets.shape[0]
    loss = loss_fn(outputs, targets)
    if loss.dim() == 1 and loss.shape[0] == batch:
        return loss
    if loss.dim() == 0:
        if batch == 1:
            return loss.reshape(1)

        # A reducing loss ("sum" or "mean"): a batch of one gives that example's loss under
        # either reduction.
        def one(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_fn(output.unsqueeze(0), target.unsqueeze(0))

        try:
            return torch.func.vmap(one)(outputs, targets)
        except Exception:  # vmap rejects some custom losses; a plain loop always works
            return torch.stack([one(outputs[i], targets[i]) for i in range(batch)])
    raise ValueError(
        f"loss_fn returned shape {tuple(loss.shape)} for a batch of {batch}; it must return "
        "per-example losses of shape [B] (reduction='none') or a scalar (reduction='sum')"
    )


def _batched_forward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    device = _model_device(model, x.device)
    chunks = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            chunks.append(per_batch(model(xb), yb))
    if not chunks:
        return torch.empty(0, device=device)
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------
# Loss and curvature attacks
# ---------------------------------------------------------------------------------------


def per_example_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Each example's own loss under the model in eval mode.

    Args:
        model: the model to query; its train/eval flags are restored afterwards.
        x: inputs ``[N, ...]`` on any device (moved batch by batch to the model's device).
        y: targets ``[N, ...]``.
        loss_fn: ``loss_fn(outputs, targets)``; per-example (``reduction="none"``, shape
            ``[B]``) or reducing (scalar; then each example is evaluated as a batch of one).
            Default: cross-entropy.
        batch_size: examples per forward pass.

    Returns:
        Losses ``[N]`` on the model's device.

    Raises:
        TypeError: if x or y is not a tensor.
        ValueError: on mismatched lengths, a bad ``batch_size`` or an unusable loss shape.
    """
    _check_batch_args(x, y, batch_size)
    fn = loss_fn if loss_fn is not None else _default_loss

    def per_batch(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _per_example_from_loss_fn(fn, outputs, targets)

    return _batched_forward(model, x, y, batch_size, per_batch)


def loss_attack_scores(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Loss-threshold attack (Yeom et al., 2018): score = −loss, so well-fit examples rank as
    members. Arguments as in :func:`per_example_loss`.

    Returns:
        Scores ``[N]`` on the model's device.
    """
    return -per_example_loss(model, x, y, loss_fn=loss_fn, batch_size=batch_size)


def curvature_attack_scores(curvature: Any, *, direction: str = "lower") -> torch.Tensor:
    """Turn input-loss-curvature values into attack scores.

    Curvature Clues (Ravikumar et al., 2024) find training examples sit in flatter regions
    of the input loss landscape than unseen ones, so by default *lower* curvature means
    member and the score is ``−curvature``. ``direction="higher"`` uses ``+curvature``
    (e.g. for a quantity that grows with memorisation).

    Args:
        curvature: per-example curvature values ``[N]`` (tensor or array).
        direction: ``"lower"`` (lower curvature = member) or ``"higher"``.

    Returns:
        Scores ``[N]`` (a tensor on the input's device).

    Raises:
        ValueError: if ``direction`` is neither ``"lower"`` nor ``"higher"``.
    """
    if direction not in ("lower", "higher"):
        raise ValueError(
            f"direction must be 'lower' (lower curvature = member, the published finding) "
            f"or 'higher', got {direction!r}"
        )
    values = torch.as_tensor(curvature)
    return -values if direction == "lower" else values.clone()


def curvature_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    estimator: str = "zo",
    n_vectors: int = 10,
    h: float = 1e-3,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    direction: str = "lower",
    batch_size: int | None = None,
    example_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Curvature attack scores straight from a model.

    Calls ``gradguard.curvature.estimators.input_curvature`` (default: the black-box
    zero-order estimator of Curvature Clues) and then :func:`curvature_attack_scores`.

    Args:
        model: the target model.
        x: inputs ``[N, ...]`` (moved to the model's device).
        y: true labels ``[N]``.
        estimator: ``"zo"``, ``"fd"`` or ``"hutchinson"`` (see DESIGN §3).
        n_vectors: random probe vectors per example.
        h: finite-difference step.
        loss_fn: passed through to ``input_curvature`` when given (sum semantics).
        generator: source of the probe vectors (see ``input_curvature``).
        direction: see :func:`curvature_attack_scores`.
        batch_size: examples scored at a time (``input_curvature``'s ``chunk_size``; the
            scores do not depend on it); ``None`` = all at once.
        example_ids: optional dataset indices ``[N]`` keying each example's probe vectors.

    Returns:
        Scores ``[N]`` (higher = member) on the model's device.
    """
    from gradguard.curvature.estimators import input_curvature

    _check_batch_args(x, y, batch_size if batch_size is not None else 1)
    device = _model_device(model, x.device)
    optional = {"loss_fn": loss_fn, "chunk_size": batch_size, "example_ids": example_ids}
    curvature = input_curvature(
        model,
        x.to(device),
        y.to(device),
        estimator=estimator,
        n_vectors=n_vectors,
        h=h,
        generator=generator,
        **{name: value for name, value in optional.items() if value is not None},
    )
    return curvature_attack_scores(curvature, direction=direction)


# ---------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------


def logit_confidence_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence ``log p_y − log(1 − p_y)``, computed stably.

    With logits z, ``p_y/(1 − p_y) = exp(z_y) / Σ_{k≠y} exp(z_k)``, so the value is
    ``z_y − logsumexp_{k≠y} z_k``: no softmax, no ``log(1 − p)`` cancellation, finite for
    finite logits even when p_y rounds to 1.

    Args:
        logits: ``[N, C]`` with C >= 2.
        targets: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        ``[N]`` confidences, in the logits' dtype promoted to at least float32.

    Raises:
        ValueError: on bad shapes or out-of-range labels.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must have shape [N, C] with C >= 2 classes, got {tuple(logits.shape)}"
        )
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer class labels of shape [{logits.shape[0]}], got "
            f"{tuple(targets.shape)} {targets.dtype}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes; "
            "check the label encoding"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    targets = targets.to(device=z.device, dtype=torch.long)
    true_logit = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    is_true = F.one_hot(targets, z.shape[1]).bool()
    others = z.masked_fill(is_true, float("-inf"))
    return true_logit - torch.logsumexp(others, dim=1)


def logit_confidence(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> torch.Tensor:
    """The model's logit-scaled confidence on the true label, per example (eval mode).

    See :func:`logit_confidence_from_logits`. Call it on the target model and on every
    shadow model over the same N examples to feed :func:`lira_online` /
    :func:`lira_offline`.

    Args:
        model: a classifier producing ``[B, C]`` logits.
        x: inputs ``[N, ...]``.
        y: integer labels ``[N]``.
        batch_size: examples per forward pass.

    Returns:
        ``[N]`` confidences on the model's device.
    """
    _check_batch_args(x, y, batch_size)
    return _batched_forward(model, x, y, batch_size, logit_confidence_from_logits)


def shadow_masks(
    n_examples: int, n_shadows: int, *, generator: torch.Generator | int
) -> torch.Tensor:
    """Which examples each shadow model trains on, as in LiRA's code.

    Every example is put in a uniformly random subset of exactly ``n_shadows // 2`` shadow
    models when ``n_shadows`` is even, so each example has as many "in" as "out" models and
    each shadow trains on about half the population. For odd ``n_shadows`` each example
    gets ``n_shadows // 2`` or ``n_shadows // 2 + 1`` (a fair coin per example).

    Args:
        n_examples: population size N.
        n_shadows: number of shadow models S (>= 1).
        generator: a ``torch.Generator`` or an int seed; the global RNG is not touched.

    Returns:
        Bool tensor ``[S, N]``; entry ``[s, n]`` is True if shadow ``s`` trains on example
        ``n``. On the generator's device.

    Raises:
        ValueError: on non-positive sizes.
        TypeError: if ``generator`` is neither a ``torch.Generator`` nor an int.
    """
    for name, value in (("n_examples", n_examples), ("n_shadows", n_shadows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}"
        )
    device = generator.device
    # A random permutation of shadow slots per example; the slots numbered below k are "in".
    permutation = torch.rand(n_shadows, n_examples, generator=generator, device=device).argsort(0)
    n_in = torch.full((n_examples,), n_shadows // 2, device=device)
    if n_shadows % 2:
        coin = torch.rand(n_examples, generator=generator, device=device) < 0.5
        n_in = n_in + coin.long()
    return permutation < n_in.unsqueeze(0)


def _as_float64(values: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(device=device if device is not None else tensor.device, dtype=torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"{name} holds NaN or inf; compute confidences with logit_confidence, which is "
            "finite for finite logits"
        )
    return tensor


def _as_mask(mask: Any, shape: torch.Size, device: torch.device) -> torch.Tensor:
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
            raise TypeError(
                f"in_mask must be boolean (True = example in that shadow's training set), "
                f"got dtype {mask.dtype}"
            )
        mask = mask.bool()
    if mask.shape != shape:
        raise ValueError(
            f"in_mask must have the shape of the shadow confidences {tuple(shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return mask


def _check_lira_shapes(target: torch.Tensor, shadow: torch.Tensor) -> None:
    if shadow.dim() != 2 or target.dim() != 1 or shadow.shape[1] != target.shape[0]:
        raise ValueError(
            "expected target confidences [N] and shadow confidences [S, N], got "
            f"{tuple(target.shape)} and {tuple(shadow.shape)}"
        )
    if target.shape[0] == 0 or shadow.shape[0] == 0:
        raise ValueError("LiRA needs at least one example and one shadow model")


def _resolve_variance(variance: str, n_shadows: int) -> str:
    if variance not in _VARIANCE_MODES:
        raise ValueError(f"variance must be one of {_VARIANCE_MODES}, got {variance!r}")
    if variance == "auto":
        return "global" if n_shadows < _GLOBAL_VARIANCE_BELOW else "per_example"
    return variance


class _GaussianFit:
    """Per-example Gaussian fits to the masked entries of a [S, N] confidence matrix."""

    def __init__(self, confs: torch.Tensor, mask: torch.Tensor, what: str) -> None:
        weights = mask.to(confs.dtype)
        self.count = weights.sum(0)
        self.mean = (confs * weights).sum(0) / self.count.clamp_min(1)
        squares = ((confs - self.mean) ** 2 * weights).sum(0)
        dof = (self.count - 1).clamp_min(0)
        self.per_example_var = squares / dof.clamp_min(1)
        total_dof = dof.sum()
        if total_dof == 0:
            raise ValueError(
                f"cannot estimate the spread of {what} confidences: no example has at least "
                f"two {what} shadow models; train more shadow models (>= 4, see shadow_masks)"
            )
        # Pooled within-example variance: differences between examples' means are not noise.
        self.global_var = squares.sum() / total_dof
        self.what = what

    def std(self, mode: str) -> torch.Tensor:
        if mode == "global":
            var = self.global_var.expand_as(self.mean)
        else:
            # Examples with < 2 shadow values of this kind fall back to the pooled variance.
            var = torch.where(self.count >= 2, self.per_example_var, self.global_var)
        return var.sqrt().clamp_min(_MIN_STD)


def _normal_logpdf(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    z = (x - mean) / std
    return -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)


def lira_online(
    target_conf: Any,
    shadow_confs: Any,
    in_mask: Any,
    *,
    variance: str = "auto",
) -> torch.Tensor:
    """LiRA online: per-example Gaussian likelihood ratio of "in" vs "out" confidences.

    For each example n, fit N(μ_in, σ_in²) to the confidences of the shadow models that
    trained on n and N(μ_out, σ_out²) to those of the ones that did not (sample means;
    sample variances with ddof=1), and score

        score_n = log N(c_n; μ_in, σ_in²) − log N(c_n; μ_out, σ_out²)

    where c_n is the target model's confidence. Higher = member.

    Fallbacks, so every example gets a finite score:

    - ``variance="global"`` (the paper's choice for fewer than 64 shadow models, and what
      ``"auto"`` picks then): σ_in² and σ_out² are pooled within-example variances over all
      examples. With ``"per_example"``, an example with fewer than two in (out) values uses
      the pooled σ_in² (σ_out²).
    - An example with no in shadow gets μ_in = μ_out + Δ, where Δ is the average of
      μ_in − μ_out over examples that have both; symmetrically μ_out = μ_in − Δ with no out
      shadow.

    Args:
        target_conf: target model confidences ``[N]`` (e.g. :func:`logit_confidence`).
        shadow_confs: shadow model confidences ``[S, N]`` on the same examples.
        in_mask: bool ``[S, N]``, True where example n was in shadow s's training set.
        variance: ``"auto"``, ``"global"`` or ``"per_example"``.

    Returns:
        Float64 scores ``[N]`` on the device of ``shadow_confs``.

    Raises:
        ValueError: on shape mismatches, non-finite confidences, or too few shadows to fit
            (no example with both in and out shadows, or no variance estimable).
    """
    shadow = _as_float64(shadow_confs, "shadow_confs")
    target = _as_float64(target_conf, "target_conf", shadow.device)
    _check_lira_shapes(target, shadow)
    mask = _as_mask(in_mask, shadow.shape, shadow.device)
    mode = _resolve_variance(variance, shadow.shape[0])
    fit_in = _GaussianFit(shadow, mask, "in")
    fit_out = _GaussianFit(shadow, ~mask, "out")
    both = (fit_in.count > 0) & (fit_out.count > 0)
    if not both.any():
        raise ValueError(
            "no example has both in and out shadow models; build in_mask with shadow_masks"
        )
    shift = (fit_in.mean - fit_out.mean)[both].mean()
    mean_in = torch.where(fit_in.count > 0, fit_in.mean, fit_out.mean + shift)
    mean_out = torch.where(fit_out.count > 0, fit_out.mean, fit_in.mean - shift)
    return _normal_logpdf(target, mean_in, fit_in.std(mode)) - _normal_logpdf(
        target, mean_out, fit_out.std(mode)
    )


def lira_offline(
    target_conf: Any,
    out_confs: Any,
    *,
    in_mask: Any = None,
    variance: str = "auto",
) -> torch.Tensor:
    """LiRA offline: how far above the "out" distribution the target's confidence lies.

    Fit N(μ_out, σ_out²) per example to the confidences of shadow models that did not train
    on it and score the one-sided tail (the paper's offline test):

        score_n = −log P(Z ≥ c_n),  Z ~ N(μ_out, σ_out²),

    computed as ``−log Φ(−z)`` with ``z = (c_n − μ_out)/σ_out`` via ``log_ndtr``, so it is
    accurate far into the tail. It is an increasing function of the z-score, so it ranks
    examples exactly as z does. Higher = member.

    Fallbacks: ``variance`` as in :func:`lira_online`; an example with no out value (only
    possible with ``in_mask``) uses the mean of all out values and the pooled variance.

    Args:
        target_conf: target model confidences ``[N]``.
        out_confs: shadow confidences ``[S, N]``.
        in_mask: optional bool ``[S, N]``; entries that are True (example in that shadow's
            training set) are ignored, so an online shadow set can be reused offline.
        variance: ``"auto"``, ``"global"`` or ``"per_example"``.

    Returns:
        Float64 scores ``[N]`` on the device of ``out_confs``.

    Raises:
        ValueError: on shape mismatches, non-finite confidences, or fewer than two out
            values for every example.
    """
    shadow = _as_float64(out_confs, "out_confs")
    target = _as_float64(target_conf, "target_conf", shadow.device)
    _check_lira_shapes(target, shadow)
    if in_mask is None:
        out_mask = torch.ones_like(shadow, dtype=torch.bool)
    else:
        out_mask = ~_as_mask(in_mask, shadow.shape, shadow.device)
    mode = _resolve_variance(variance, shadow.shape[0])
    fit = _GaussianFit(shadow, out_mask, "out")
    overall_mean = shadow[out_mask].mean()
    mean = torch.where(fit.count > 0, fit.mean, overall_mean)
    z = (target - mean) / fit.std(mode)
    return -torch.special.log_ndtr(-z)
