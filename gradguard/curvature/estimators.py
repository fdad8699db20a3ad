"""Input-loss-curvature estimators: pure functions, no state.

Input loss curvature is the curvature of an example's loss ``ℓ(x, y)`` as a function of
its *input* ``x`` at the current model, ``tr(∇²ₓ ℓ)`` in Ravikumar et al.'s definition.
Training points come to sit in flatter regions than unseen ones as a model memorises, so
the train-versus-held-out gap in curvature is a membership-inference signal.

Three estimators, all per example:

- ``hutchinson``: ``mean_j v_jᵀ H v_j`` with ``H = ∇²ₓℓ`` and Rademacher ``v_j``, exact
  Hessian-vector products by double backward. Unbiased for ``tr(H)``; signed. The
  papers' stated definition.
- ``fd``: ``mean_j ‖∇ₓℓ(x + h·v_j) − ∇ₓℓ(x)‖₂``, the white-box score of Garg et al. and
  Ravikumar et al.'s code (``≈ h·‖H v_j‖``). Non-negative.
- ``zo``: ``mean_j |ℓ(x+v+u) − ℓ(x−v+u) − ℓ(x+v−u) + ℓ(x−v−u)| / (4h)`` with
  ``u = h·r_u``, ``v = h·r_v`` Rademacher (``≈ h·|r_vᵀ H r_u|``): forward passes only,
  the black-box attack of "Curvature Clues". Non-negative.

Conventions shared by every function here:

- Scores are per example and never depend on the batch: the loss is the *sum* of
  per-example losses (a ``mean`` would scale every score by ``1/B``), and because no
  layer mixes examples in eval mode the input Hessian of the summed loss is
  block-diagonal, so one Hessian-vector product over the whole batch yields every
  example's term.
- The model runs in eval mode during the call; afterwards every submodule's own
  ``training`` flag is as it was. Only gradients with respect to the input are taken
  (``torch.autograd.grad(..., inputs=x)``), so parameters' ``.grad`` are never created
  or touched. The global RNG is never used.
- Random vectors come from :func:`rademacher_vectors`, a counter-based scheme: the sign
  at coordinate ``d`` of example ``i``'s ``j``-th vector is a hash of ``(seed, key_i,
  j, stream, d)``, where ``key_i`` is a hash of example ``i``'s content (the bits of
  ``x[i]``) or, if given, its ``example_id``. An example's vectors, and so its score,
  therefore depend only on the example, the seed and the settings, never on which other
  examples share its batch, on its position in the batch or on ``chunk_size``.
  :func:`input_curvature` draws the seed from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ESTIMATORS",
    "LossFn",
    "draw_seed",
    "fd_curvature",
    "hutchinson_trace",
    "input_curvature",
    "rademacher_vectors",
    "token_loss",
    "zo_curvature",
]

ESTIMATORS: tuple[str, ...] = ("hutchinson", "fd", "zo")

LossFn = Callable[[Tensor, Any], Tensor]

# Seeds are drawn below 2**62 so that they fit int64 with room to spare on every backend.
_SEED_BOUND = 2**62
_MASK32 = 0xFFFFFFFF
# Two independent vector streams per example: v (stream 0, every estimator) and u
# (stream 1, zo only). Interleaving them in the counter keeps vector j of a stream the same
# whatever n_vectors is, so raising n_vectors extends the sample instead of redrawing it.
_N_STREAMS = 2
# Domain tags so that content keys, id keys and coordinate counters never hash alike.
_TAG_CONTENT = 0x68E31DA4
_TAG_ID = 0xB5297A4D
_TAG_COUNTER = 0x1B56C4E9


def _default_loss(output: Tensor, target: Any) -> Tensor:
    return F.cross_entropy(output, target, reduction="sum")


# --------------------------------------------------------------------------------------
# Counter-based Rademacher vectors
# --------------------------------------------------------------------------------------


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow.

    Splitting ``c`` into 16-bit halves keeps every intermediate product below ``2**48``:
    signed overflow is not something to rely on across backends.
    """
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche) on int64 lanes."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _absorb64(state: Tensor, word: Tensor) -> Tensor:
    """Mix a 64-bit integer word (int64 tensor) into a 32-bit hash state."""
    state = _fmix32(state ^ (word & _MASK32))
    return _fmix32(state ^ ((word >> 32) & _MASK32))


def _content_keys(x: Tensor) -> Tensor:
    """One 32-bit key per example from the bits of ``x[i]`` (int64 tensor ``[B]``)."""
    flat = x.detach().reshape(x.shape[0], -1).contiguous()
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(int_dtype).to(torch.int64)
    position = _fmix32(torch.arange(flat.shape[1], device=x.device, dtype=torch.int64)
                       ^ _TAG_CONTENT)
    per_coordinate = _absorb64(position.expand_as(bits), bits)
    # Each term is < 2**32, so the sum is exact in int64 for fewer than 2**31 coordinates;
    # the coordinate index is already mixed into each term, so the sum is order-aware.
    return _fmix32(per_coordinate.sum(dim=1) & _MASK32)


def _id_keys(example_ids: Tensor) -> Tensor:
    ids = example_ids.to(torch.int64)
    return _absorb64(torch.full_like(ids, _TAG_ID), ids)


def _as_seed_tensor(seed: int | Tensor, device: torch.device) -> Tensor:
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise TypeError(
                f"seed must be an int or a one-element integer tensor, got a tensor of "
                f"dtype {seed.dtype} and shape {tuple(seed.shape)}; draw one with "
                f"draw_seed(generator)"
            )
        return seed.reshape(()).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """Draw the seed of one :func:`input_curvature` call from a generator.

    This is exactly what :func:`input_curvature` does, once per call: ``torch.randint(
    2**62, (), generator=generator, device=generator.device)``. The draw stays on the
    generator's device, so a CUDA generator costs no host synchronisation.

    Args:
        generator: the randomness source; ``None`` means a fresh generator seeded 0.

    Returns:
        A 0-d int64 tensor on the generator's device.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            f"pass e.g. torch.Generator().manual_seed(0)"
        )
    return torch.randint(_SEED_BOUND, (), generator=generator, device=generator.device,
                         dtype=torch.int64)


def rademacher_vectors(
    x: Tensor,
    n_vectors: int,
    *,
    seed: int | Tensor,
    example_ids: Tensor | None = None,
    stream: int = 0,
) -> Tensor:
    """Per-example Rademacher (±1) vectors that depend on nothing but the example.

    The sign at coordinate ``d`` of example ``i``'s ``j``-th vector is bit ``d mod 32`` of a
    MurmurHash3-finalised hash of ``(seed, key_i, j, stream, ⌊d/32⌋)``. ``key_i`` is a hash of
    the raw bits of ``x[i]`` (the default) or of ``example_ids[i]``. Consequences: the
    vectors of an example are the same in any batch, at any position and in any chunk;
    identical inputs get identical vectors under content keys; and the first ``n``
    vectors do not change when ``n_vectors`` grows.

    Args:
        x: inputs ``[B, ...]`` (floating point); only their shape, dtype, device and,
            without ``example_ids``, their bits are used.
        n_vectors: vectors per example.
        seed: an int in ``[0, 2**63)`` or a 0-d integer tensor (see :func:`draw_seed`).
        example_ids: optional integer tensor ``[B]`` (e.g. dataset indices) to key the
            vectors by identity instead of content.
        stream: ``0`` or ``1``: two independent families of vectors (``zo`` needs two).

    Returns:
        Tensor ``[n_vectors, B, *x.shape[1:]]`` of ±1 in ``x.dtype`` on ``x.device``.

    Example:
        >>> x = torch.randn(4, 3)
        >>> v = rademacher_vectors(x, 2, seed=7)
        >>> torch.equal(v[:, 1:3], rademacher_vectors(x[1:3], 2, seed=7))
        True
    """
    _check_float_input(x)
    n_vectors = _check_positive_int(n_vectors, "n_vectors")
    if stream not in range(_N_STREAMS):
        raise ValueError(f"stream must be 0 or 1, got {stream!r}")
    batch = x.shape[0]
    n_coords = math.prod(x.shape[1:])
    seed_t = _as_seed_tensor(seed, x.device)
    if example_ids is None:
        keys = _content_keys(x)
    else:
        keys = _id_keys(_check_example_ids(example_ids, batch).to(x.device))
    # Per-example state: the seed and the key, fully mixed (shape [B]).
    example_state = _absorb64(_absorb64(keys, seed_t.expand(batch)), keys)
    # Each hash gives the signs of 32 consecutive coordinates (its 32 output bits, all
    # fully mixed): 32× fewer lanes to hash than one hash per coordinate.
    n_words = -(-n_coords // 32)
    words = torch.arange(n_words, device=x.device, dtype=torch.int64)
    bit = torch.arange(32, device=x.device, dtype=torch.int64)
    out = torch.empty((n_vectors, batch, n_coords), dtype=x.dtype, device=x.device)
    # One vector at a time keeps the int64 temporaries at B×D instead of n×B×D.
    for j in range(n_vectors):
        counter = (j * _N_STREAMS + stream) * n_words + words
        word_state = _absorb64(torch.full_like(counter, _TAG_COUNTER), counter)
        bits = _fmix32(example_state[:, None] ^ word_state[None, :])  # [B, n_words]
        signs = ((bits[:, :, None] >> bit) & 1).view(batch, n_words * 32)[:, :n_coords]
        out[j].copy_(1 - 2 * signs)
    return out.reshape(n_vectors, *x.shape)


# --------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; restores each submodule's *own* training flag.

    ``model.train(previous)`` would not do: it sets every submodule alike, destroying a
    user's deliberately mixed setting (e.g. a frozen BatchNorm kept in eval).
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _check_float_input(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"input curvature needs continuous inputs, but x has dtype {x.dtype}. For token "
            f"ids or other discrete inputs, score in embedding space: pass the embeddings "
            f"as x and a model that starts after the embedding layer"
        )
    if x.dim() == 0:
        raise ValueError("x must have a leading batch dimension, got a 0-d tensor")


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_h(h: Any) -> float:
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h (the perturbation size) must be a finite number > 0, got {h!r}; "
                         f"the papers use h=1e-3")
    return float(h)


def _check_example_ids(example_ids: Any, batch: int) -> Tensor:
    if not isinstance(example_ids, Tensor) or example_ids.is_floating_point() or \
            example_ids.is_complex() or example_ids.dtype == torch.bool:
        raise TypeError("example_ids must be an integer tensor [B], e.g. dataset indices")
    if example_ids.shape != (batch,):
        raise ValueError(f"example_ids must have shape ({batch},) to match x, "
                         f"got {tuple(example_ids.shape)}")
    return example_ids


def _check_vectors(vectors: Any, x: Tensor, name: str) -> Tensor:
    if not isinstance(vectors, Tensor):
        raise TypeError(f"{name} must be a tensor [n_vectors, *x.shape], "
                        f"got {type(vectors).__name__}")
    if vectors.dim() != x.dim() + 1 or vectors.shape[1:] != x.shape or vectors.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape [n_vectors, *x.shape] = [n, {', '.join(map(str, x.shape))}]"
            f" with n >= 1, got {tuple(vectors.shape)}; build them with rademacher_vectors"
        )
    return vectors.to(device=x.device, dtype=x.dtype)


def _prepare_target(y: Any, x: Tensor) -> Any:
    if isinstance(y, Tensor):
        return y.to(x.device)
    return y


def _summed_loss(model: nn.Module, x: Tensor, y: Any, loss_fn: LossFn) -> Tensor:
    loss = loss_fn(model(x), y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar, the sum of per-example losses "
            f"(reduction='sum'), got {shape}"
        )
    return loss.reshape(())


def _grad_leaf(x: Tensor) -> Tensor:
    # Inference tensors (made under inference_mode) cannot require grad: copy them out.
    leaf = x.detach().clone() if x.is_inference() else x.detach()
    return leaf.requires_grad_(True)


def _input_grad(loss: Tensor, x: Tensor, *, create_graph: bool = False) -> Tensor:
    # materialize_grads: a loss that does not depend on x has zero input gradient.
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph, allow_unused=True,
                                  materialize_grads=True)
    return grad


def _require_grad_mode(estimator: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"the {estimator!r} estimator takes input gradients, which torch.inference_mode() "
            f"forbids; call it outside inference_mode, or use estimator='zo' (forward only)"
        )


def _per_example_losses(output: Tensor, y: Any, loss_fn: LossFn | None) -> Tensor:
    """``[ℓ(out_i, y_i)]_i`` where ``ℓ`` is ``loss_fn`` on a one-example batch.

    Under sum semantics this is the same per-example loss whose sum the gradient-based
    estimators differentiate, so all three estimators score the same function.
    """
    batch = output.shape[0]
    if loss_fn is None:
        return F.cross_entropy(output, y, reduction="none")

    def single(out_i: Tensor, y_i: Any) -> Tensor:
        return loss_fn(out_i.unsqueeze(0), y_i.unsqueeze(0))

    if isinstance(y, Tensor) and y.dim() >= 1 and y.shape[0] == batch:
        try:
            losses = torch.func.vmap(single)(output, y)
        except RuntimeError as err:
            warnings.warn(
                f"loss_fn could not be vmapped over examples ({err}); falling back to one "
                f"call per example, which is slower. A loss_fn made of plain tensor ops "
                f"(no .item(), no data-dependent Python control flow) avoids this",
                RuntimeWarning, stacklevel=4,
            )
            losses = torch.stack([single(output[i], y[i]) for i in range(batch)])
    else:
        raise TypeError(
            "with a custom loss_fn, the zo estimator needs y as a tensor with one row per "
            "example (it evaluates loss_fn on each example on its own)"
        )
    if losses.shape != (batch,):
        raise ValueError(
            f"loss_fn must return a scalar (reduction='sum' semantics) on a one-example "
            f"batch; per-example evaluation gave shape {tuple(losses.shape)}"
        )
    return losses


# --------------------------------------------------------------------------------------
# The three estimators, with explicit vectors
# --------------------------------------------------------------------------------------


def hutchinson_trace(
    model: nn.Module,
    x: Tensor,
    y: Any,
    vectors: Tensor,
    *,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Hutchinson estimate ``mean_j v_jᵀ ∇²ₓℓ_i v_j`` of each example's input-Hessian trace.

    Exact Hessian-vector products by double backward; one product per vector serves the
    whole batch because the input Hessian of a sum of per-example losses is block-diagonal.

    Args:
        model: the network; run in eval mode, its flags restored afterwards.
        x: inputs ``[B, ...]``, floating point.
        y: targets for ``loss_fn``.
        vectors: probing vectors ``[n_vectors, *x.shape]`` (Rademacher for an unbiased
            trace estimate; see :func:`rademacher_vectors`).
        loss_fn: ``loss_fn(output, y)`` returning the *sum* of per-example losses; default
            ``cross_entropy(output, y, reduction="sum")``.

    Returns:
        Tensor ``[B]`` in ``x.dtype`` on ``x.device``; signed.

    Raises:
        TypeError: if ``x`` is not floating point.
        ValueError: if ``vectors`` has the wrong shape or ``loss_fn`` is not scalar.
    """
    _check_float_input(x)
    vectors = _check_vectors(vectors, x, "vectors")
    _require_grad_mode("hutchinson")
    loss_fn = _default_loss if loss_fn is None else loss_fn
    y = _prepare_target(y, x)
    x_in = _grad_leaf(x)
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with _eval_mode(model), torch.enable_grad():
        grad = _input_grad(_summed_loss(model, x_in, y, loss_fn), x_in, create_graph=True)
        if not grad.requires_grad:  # the loss is at most linear in x: zero Hessian
            return total
        for j, v in enumerate(vectors):
            (hv,) = torch.autograd.grad(grad, x_in, grad_outputs=v,
                                        retain_graph=j < len(vectors) - 1,
                                        allow_unused=True, materialize_grads=True)
            total += (v * hv).reshape(x.shape[0], -1).sum(dim=1)
    return total / len(vectors)


def fd_curvature(
    model: nn.Module,
    x: Tensor,
    y: Any,
    vectors: Tensor,
    *,
    h: float = 1e-3,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Finite-difference score ``mean_j ‖∇ₓℓ_i(x + h·v_j) − ∇ₓℓ_i(x)‖₂`` per example.

    The white-box score of Garg et al. and Ravikumar et al.'s code; to first order it is
    ``h·‖H_i v_j‖``. Non-negative. Its gradient difference cancels catastrophically in
    low precision, so expect float32 scores to be noisy at small ``h``.

    Args:
        model: the network; run in eval mode, its flags restored afterwards.
        x: inputs ``[B, ...]``, floating point.
        y: targets for ``loss_fn``.
        vectors: unit-scale directions ``[n_vectors, *x.shape]`` (Rademacher ±1); the
            perturbation is ``h·v_j``.
        h: step size.
        loss_fn: sum-semantics loss, as in :func:`hutchinson_trace`.

    Returns:
        Tensor ``[B]`` in ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: if ``x`` is not floating point.
        ValueError: on bad ``vectors``, ``h`` or ``loss_fn`` output.
    """
    _check_float_input(x)
    vectors = _check_vectors(vectors, x, "vectors")
    h = _check_h(h)
    _require_grad_mode("fd")
    loss_fn = _default_loss if loss_fn is None else loss_fn
    y = _prepare_target(y, x)
    batch = x.shape[0]
    total = torch.zeros(batch, dtype=x.dtype, device=x.device)
    with _eval_mode(model), torch.enable_grad():
        x_in = _grad_leaf(x)
        base = _input_grad(_summed_loss(model, x_in, y, loss_fn), x_in)
        for v in vectors:
            x_shift = _grad_leaf(x.detach() + h * v)
            shifted = _input_grad(_summed_loss(model, x_shift, y, loss_fn), x_shift)
            total += torch.linalg.vector_norm((shifted - base).reshape(batch, -1), dim=1)
    return total / len(vectors)


def zo_curvature(
    model: nn.Module,
    x: Tensor,
    y: Any,
    u: Tensor,
    v: Tensor,
    *,
    h: float = 1e-3,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Zero-order score ``mean_j |ℓ(x+v+u) − ℓ(x−v+u) − ℓ(x+v−u) + ℓ(x−v−u)| / (4h)``.

    With ``u = h·u_j``, ``v = h·v_j`` for the unit-scale ``u_j, v_j`` given here. The mixed
    second difference equals ``4 h² v_jᵀ H u_j + O(h⁴)`` (first- and third-order terms
    cancel), so the score is ``h·|v_jᵀ H u_j|`` to relative order ``h²``. Forward passes
    only, under ``torch.no_grad``: black-box, and works inside ``torch.inference_mode``.
    The four perturbed copies go through the model as one batch of ``4B`` rows.

    Precision: the four losses' rounding errors do not cancel, which puts a noise floor of
    up to about ``ε·|ℓ|/h`` under the score (``ε`` the dtype's machine epsilon: in float32
    at ``h = 1e-3``, about ``1e-4·|ℓ|``). Near initialisation, where curvature is small,
    float32 scores can sit at that floor; use float64 or a larger ``h`` if they do.

    Args:
        model: the network; run in eval mode, its flags restored afterwards.
        x: inputs ``[B, ...]``, floating point.
        y: targets for ``loss_fn``.
        u: unit-scale directions ``[n_vectors, *x.shape]`` (Rademacher ±1).
        v: unit-scale directions, same shape as ``u``, independent of it.
        h: step size.
        loss_fn: sum-semantics loss. Per-example losses are needed here, so a custom
            ``loss_fn`` is evaluated on each example as a one-example batch (vmapped);
            the default uses ``cross_entropy(..., reduction="none")``, which is the same.

    Returns:
        Tensor ``[B]`` in ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: if ``x`` is not floating point.
        ValueError: on bad ``u``/``v``, ``h`` or ``loss_fn`` output.
    """
    _check_float_input(x)
    u = _check_vectors(u, x, "u")
    v = _check_vectors(v, x, "v")
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape, got {tuple(u.shape)} and "
                         f"{tuple(v.shape)}")
    h = _check_h(h)
    y = _prepare_target(y, x)
    batch = x.shape[0]
    y4 = torch.cat([y] * 4) if isinstance(y, Tensor) and y.dim() >= 1 else y
    total = torch.zeros(batch, dtype=x.dtype, device=x.device)
    with _eval_mode(model), torch.no_grad():
        x0 = x.detach()
        for u_j, v_j in zip(u, v, strict=True):
            plus_u, minus_u = x0 + h * u_j, x0 - h * u_j
            stacked = torch.cat([plus_u + h * v_j, plus_u - h * v_j,
                                 minus_u + h * v_j, minus_u - h * v_j])
            losses = _per_example_losses(model(stacked), y4, loss_fn).view(4, batch)
            total += (losses[0] - losses[1] - losses[2] + losses[3]).abs()
    return total / (len(u) * 4 * h)


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------


class _FromEmbeddings(nn.Module):
    """A token model seen as a function of its input embeddings: ``forward(embeds)`` runs
    ``model(inputs_embeds=embeds, **extra)`` and returns the logits."""

    def __init__(self, model: nn.Module, extra: dict[str, Tensor]):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, embeds: Tensor) -> Tensor:
        out = self.model(inputs_embeds=embeds, **self.extra)
        return out["logits"] if isinstance(out, Mapping) else out[0]


def token_loss(logits: Tensor, labels: Tensor, *, causal: bool, ignore_index: int = -100
               ) -> Tensor:
    """Σ over examples of each example's mean token cross-entropy (``[B, T, V]`` logits,
    ``[B, T]`` labels; shifted by one position for causal LMs), or plain cross-entropy
    summed for ``[B, C]`` logits (sequence classification).

    Example:
        >>> loss = token_loss(torch.zeros(2, 3, 5), torch.tensor([[1, 2, 3], [0, 0, -100]]),
        ...                   causal=True)
        >>> round(loss.item(), 4), round(2 * math.log(5), 4)  # uniform logits: log V each
        (3.2189, 3.2189)
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels.reshape(-1), reduction="sum")
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                             ignore_index=ignore_index)
    return (tokens.sum(1) / (labels != ignore_index).sum(1).clamp(min=1)).sum()


def _is_token_batch(model: nn.Module, x: Any) -> bool:
    if isinstance(x, Mapping):
        return True
    return (isinstance(x, Tensor) and not x.is_floating_point()
            and callable(getattr(model, "get_input_embeddings", None)))


def _token_curvature(model: nn.Module, x: Any, y: Any, *, loss_fn: LossFn | None,
                     chunk_size: int | None, example_ids: Tensor | None,
                     generator: torch.Generator | None, **kwargs) -> Tensor:
    """Curvature of a token model w.r.t. its input embeddings (see :func:`input_curvature`)."""
    batch = dict(x) if isinstance(x, Mapping) else {"input_ids": x}
    ids = batch.pop("input_ids", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, Tensor) or ids.is_floating_point() or not callable(get_embeddings):
        raise TypeError(
            "a dict batch needs integer 'input_ids' and a model with get_input_embeddings() "
            "and an inputs_embeds argument (a Hugging Face model); for other token models "
            "pass the embeddings as x and a model that starts after the embedding layer"
        )
    labels = batch.pop("labels", None)
    if loss_fn is None:
        from ..integrations.huggingface import is_causal_lm  # a HF model: transformers is here

        causal = is_causal_lm(model)
        y = y if y is not None else labels if labels is not None else ids if causal else None
        if y is None:
            raise ValueError("no targets: pass y, or 'labels' in the batch")

        def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
            return token_loss(logits, target, causal=causal)

    # One seed for every chunk, as in the float path (an example's vectors do not depend
    # on chunk_size).
    seed = int(draw_seed(generator))
    n = ids.shape[0]
    step = n if chunk_size is None else _check_positive_int(chunk_size, "chunk_size")
    scores = []
    for start in range(0, max(n, 1), step):  # chunked here, where the mask is split too
        rows = slice(start, start + step)
        with torch.no_grad():
            embeds = get_embeddings()(ids[rows])
        extra = {k: v[rows] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v
                 for k, v in batch.items()}
        y_c = y[rows] if isinstance(y, Tensor) and y.shape[:1] == (n,) else y
        ids_c = None if example_ids is None else example_ids[rows]
        chunk_generator = torch.Generator(device=embeds.device).manual_seed(seed)
        scores.append(input_curvature(_FromEmbeddings(model, extra), embeds, y_c,
                                      loss_fn=loss_fn, example_ids=ids_c,
                                      generator=chunk_generator, **kwargs))
    return torch.cat(scores)


def input_curvature(
    model: nn.Module,
    x: Tensor | Mapping[str, Tensor],
    y: Any,
    *,
    estimator: str = "hutchinson",
    n_vectors: int = 10,
    h: float = 1e-3,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    example_ids: Tensor | None = None,
) -> Tensor:
    """Per-example input loss curvature of a batch.

    Randomness: one seed is drawn from ``generator`` per call (:func:`draw_seed`) and each
    example's vectors are :func:`rademacher_vectors` of that seed and the example's key
    (its content, or ``example_ids[i]``). So, for a given generator state, an example's
    score does not depend on which other examples share its batch, on its position or on
    ``chunk_size``; and the call is deterministic: ``generator=None`` means a fresh
    generator seeded 0, so two calls without a generator return the same scores. Pass
    your own generator (and keep using it) for fresh vectors on each call. The global RNG
    is never touched.

    Args:
        model: the network. It runs in eval mode; afterwards every submodule's training
            flag, every parameter's ``.grad`` and the global RNG state are as before.
            No layer may mix examples in eval mode (BatchNorm in eval is fine).
        x: inputs ``[B, ...]``, floating point, on the model's device. For a token model
            (a Hugging Face model: ``get_input_embeddings()`` and ``inputs_embeds``), token
            ids ``[B, T]`` or a dict batch (``input_ids``, ``attention_mask``, ``labels``,
            ...): curvature is then taken w.r.t. the input embeddings, the continuous input
            of a token model, with the other entries passed to the model unchanged.
        y: targets for ``loss_fn`` (class indices ``[B]`` for the default). For token
            batches ``None`` takes the batch's ``labels`` (or, for a causal LM, the
            ``input_ids``), and the default loss is :func:`token_loss` (each example's
            mean token loss, shifted for causal LMs, summed over examples).
        estimator: ``"hutchinson"`` (trace, signed), ``"fd"`` (white-box, ≈ h‖Hv‖) or
            ``"zo"`` (black-box, forward only, ≈ h|vᵀHu|).
        n_vectors: random vectors per example (the papers use 10; ``zo`` makes 4 forward
            passes per vector).
        h: perturbation size for ``fd`` and ``zo`` (ignored by ``hutchinson``).
        loss_fn: ``loss_fn(output, y)`` returning the *sum* of per-example losses
            (``reduction="sum"`` semantics); default cross-entropy. Never a mean, which
            would make scores depend on batch size.
        generator: source of randomness; default a fresh ``torch.Generator`` seeded 0.
        chunk_size: score at most this many examples at a time to bound memory
            (activations ×4 for ``zo``, plus the double-backward graph for
            ``hutchinson``); results match the unchunked call.
        example_ids: optional integer tensor ``[B]`` (e.g. dataset indices) to key each
            example's random vectors by identity instead of by content.

    Returns:
        Tensor ``[B]`` of scores in ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: if ``x`` is not floating point (token ids: score embeddings instead).
        ValueError: on an unknown estimator or bad ``n_vectors``/``h``/``chunk_size``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> input_curvature(model, x, y, estimator="zo").shape
        torch.Size([5])
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: choose one of "
                         f"{', '.join(repr(e) for e in ESTIMATORS)}")
    if _is_token_batch(model, x):
        return _token_curvature(model, x, y, loss_fn=loss_fn, chunk_size=chunk_size,
                                example_ids=example_ids, estimator=estimator,
                                n_vectors=n_vectors, h=h, generator=generator)
    _check_float_input(x)
    n_vectors = _check_positive_int(n_vectors, "n_vectors")
    h = _check_h(h)
    batch = x.shape[0]
    if chunk_size is None:
        chunk_size = max(batch, 1)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    if example_ids is not None:
        example_ids = _check_example_ids(example_ids, batch)
    seed = draw_seed(generator).to(x.device)
    y = _prepare_target(y, x)
    if batch == 0:
        return torch.zeros(0, dtype=x.dtype, device=x.device)
    batched_y = isinstance(y, Tensor) and y.dim() >= 1 and y.shape[0] == batch
    if not batched_y and chunk_size < batch:
        raise ValueError("chunk_size needs y as a tensor with one row per example, so that "
                         "it can be split with x")

    scores = []
    with _eval_mode(model):
        for start in range(0, batch, chunk_size):
            rows = slice(start, start + chunk_size)
            x_c = x[rows]
            y_c = y[rows] if batched_y else y
            ids_c = None if example_ids is None else example_ids[rows]

            def vecs(stream: int, x_c: Tensor = x_c, ids_c: Tensor | None = ids_c) -> Tensor:
                return rademacher_vectors(x_c, n_vectors, seed=seed, example_ids=ids_c,
                                          stream=stream)

            if estimator == "hutchinson":
                scores.append(hutchinson_trace(model, x_c, y_c, vecs(0), loss_fn=loss_fn))
            elif estimator == "fd":
                scores.append(fd_curvature(model, x_c, y_c, vecs(0), h=h, loss_fn=loss_fn))
            else:
                scores.append(zo_curvature(model, x_c, y_c, vecs(1), vecs(0), h=h,
                                           loss_fn=loss_fn))
    return torch.cat(scores)
