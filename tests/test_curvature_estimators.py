"""Tests for gradguard.curvature.estimators against exact input Hessians (torch.func.hessian).

The references are independent of the code under test: per-example Hessians from
``torch.func.hessian`` of the one-example loss in float64, random vectors from
``torch.randint`` (not the package's hash), and a pure-Python MurmurHash3 finaliser.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.curvature.estimators import (
    ESTIMATORS,
    _fmix32,
    draw_seed,
    fd_curvature,
    hutchinson_trace,
    input_curvature,
    rademacher_vectors,
    zo_curvature,
)

DTYPE = torch.float64


def tanh_mlp(d_in: int = 5, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, classes)).to(DTYPE)


class TinyCNN(nn.Module):
    """Conv → BatchNorm → tanh → linear on [B, 2, 4, 4] inputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 4)
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_case(kind: str, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "mlp":
        model, shape, classes = tanh_mlp(seed=seed), (5,), 3
    else:
        model, shape, classes = TinyCNN(seed=seed), (2, 4, 4), 4
    x = torch.randn(batch, *shape, generator=gen, dtype=DTYPE)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return model, x, y


def exact_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, D, D] Hessians of each example's own cross-entropy w.r.t. its input, eval mode."""
    was_training = model.training
    model.eval()
    hessians = []
    for i in range(x.shape[0]):
        def loss(xi: torch.Tensor, i: int = i) -> torch.Tensor:
            return F.cross_entropy(model(xi.unsqueeze(0)), y[i:i + 1], reduction="sum")

        hessians.append(torch.func.hessian(loss)(x[i]).reshape(x[i].numel(), -1))
    model.train(was_training)
    return torch.stack(hessians)


def random_signs(n: int, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, *shape), generator=gen) * 2 - 1).to(DTYPE)


def flat(v: torch.Tensor) -> torch.Tensor:
    """[n, B, ...] → [n, B, D]."""
    return v.reshape(v.shape[0], v.shape[1], -1)


CASES = ["mlp", "cnn"]


# --------------------------------------------------------------------------------------
# Estimators against exact Hessians
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CASES)
def test_hutchinson_equals_mean_quadratic_form_with_explicit_vectors(kind):
    model, x, y = make_case(kind, seed=1)
    model.train()  # the estimator must switch to eval (BatchNorm running stats)
    hess = exact_hessians(model, x, y)
    for vectors in (random_signs(4, x.shape, seed=2),
                    torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(3),
                                dtype=DTYPE)):
        v = flat(vectors)
        expected = torch.einsum("nbd,bde,nbe->b", v, hess, v) / v.shape[0]
        got = hutchinson_trace(model, x, y, vectors)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, n_vectors", [("mlp", 3000), ("cnn", 1000)])
def test_hutchinson_converges_to_exact_trace(kind, n_vectors):
    model, x, y = make_case(kind, batch=4, seed=4)
    hess = exact_hessians(model, x, y)
    trace = hess.diagonal(dim1=1, dim2=2).sum(-1)
    off_diagonal = hess - torch.diag_embed(hess.diagonal(dim1=1, dim2=2))
    # Var(vᵀHv) for Rademacher v is 2·Σ_{i≠j} H_ij².
    standard_error = torch.sqrt(2 * off_diagonal.pow(2).sum((1, 2)) / n_vectors)
    got = input_curvature(model, x, y, estimator="hutchinson", n_vectors=n_vectors,
                          generator=torch.Generator().manual_seed(5))
    assert (standard_error > 0).all()
    assert ((got - trace).abs() <= 5 * standard_error).all(), (got, trace, standard_error)


@pytest.mark.parametrize("kind", CASES)
def test_fd_matches_h_times_hessian_vector_norm_to_first_order(kind):
    model, x, y = make_case(kind, seed=6)
    hess = exact_hessians(model, x, y)
    vectors = random_signs(3, x.shape, seed=7)
    hv_norm = torch.linalg.vector_norm(torch.einsum("bde,nbe->nbd", hess, flat(vectors)),
                                       dim=-1).mean(0)
    scale = torch.linalg.matrix_norm(hess)  # ‖H_i‖_F: a scale that is never near zero
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        got = fd_curvature(model, x, y, vectors, h=h)
        assert (got >= 0).all()
        errors.append(((got - h * hv_norm).abs() / (h * scale)).max().item())
    assert errors[-1] < 1e-3, errors
    # O(h) error: a decade of h buys (at least about) a decade of accuracy.
    assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1], errors


@pytest.mark.parametrize("kind", CASES)
def test_zo_matches_h_times_mixed_quadratic_form_to_second_order(kind):
    model, x, y = make_case(kind, seed=8)
    hess = exact_hessians(model, x, y)
    u, v = random_signs(3, x.shape, seed=9), random_signs(3, x.shape, seed=10)
    mixed = torch.einsum("nbd,bde,nbe->nb", flat(v), hess, flat(u)).abs().mean(0)
    scale = torch.linalg.matrix_norm(hess)
    errors = []
    for h in (3e-2, 3e-3):
        got = zo_curvature(model, x, y, u, v, h=h)
        assert (got >= 0).all()
        errors.append(((got - h * mixed).abs() / (h * scale)).max().item())
    assert errors[-1] < 1e-4, errors
    # O(h²) relative error: h / 10 cuts it about a hundredfold.
    assert errors[1] < 0.05 * errors[0], errors


def test_zo_is_symmetric_in_u_and_v():
    model, x, y = make_case("mlp", seed=11)
    u, v = random_signs(2, x.shape, seed=12), random_signs(2, x.shape, seed=13)
    torch.testing.assert_close(zo_curvature(model, x, y, u, v), zo_curvature(model, x, y, v, u),
                               rtol=1e-8, atol=1e-14)


# --------------------------------------------------------------------------------------
# Dispatcher: randomness, batch independence, chunking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_input_curvature_is_the_explicit_estimator_with_documented_vectors(estimator):
    model, x, y = make_case("cnn", seed=14)
    got = input_curvature(model, x, y, estimator=estimator, n_vectors=3, h=1e-2,
                          generator=torch.Generator().manual_seed(15))
    seed = draw_seed(torch.Generator().manual_seed(15))
    v = rademacher_vectors(x, 3, seed=seed, stream=0)
    if estimator == "hutchinson":
        expected = hutchinson_trace(model, x, y, v)
    elif estimator == "fd":
        expected = fd_curvature(model, x, y, v, h=1e-2)
    else:
        expected = zo_curvature(model, x, y, rademacher_vectors(x, 3, seed=seed, stream=1), v,
                                h=1e-2)
    assert torch.equal(got, expected)
    assert got.shape == (x.shape[0],) and got.dtype == x.dtype and got.device == x.device


def test_default_generator_is_seeded_zero_and_a_shared_generator_advances():
    model, x, y = make_case("mlp", seed=16)
    default = input_curvature(model, x, y, n_vectors=2)
    assert torch.equal(default, input_curvature(model, x, y, n_vectors=2))
    assert torch.equal(default, input_curvature(model, x, y, n_vectors=2,
                                                generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(0)
    first = input_curvature(model, x, y, n_vectors=2, generator=gen)
    second = input_curvature(model, x, y, n_vectors=2, generator=gen)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_score_does_not_depend_on_the_rest_of_the_batch(estimator):
    model, x, y = make_case("cnn", batch=8, seed=17)
    _, x_other, y_other = make_case("cnn", batch=4, seed=18)
    chosen = torch.tensor([6, 1, 3])
    # The chosen examples in a different batch, at different positions, among strangers.
    x_b = torch.cat([x_other[:2], x[chosen], x_other[2:]])
    y_b = torch.cat([y_other[:2], y[chosen], y_other[2:]])

    def score(xx, yy, **kw):
        return input_curvature(model, xx, yy, estimator=estimator, n_vectors=3, h=1e-2,
                               generator=torch.Generator().manual_seed(19), **kw)

    full, mixed = score(x, y), score(x_b, y_b)
    torch.testing.assert_close(mixed[2:5], full[chosen], rtol=1e-7, atol=1e-12)
    # Keyed by identity instead of content: the same holds for the same ids.
    ids = torch.arange(8) + 1000
    ids_b = torch.cat([torch.tensor([1, 2]), ids[chosen], torch.tensor([3, 4])])
    full_ids, mixed_ids = score(x, y, example_ids=ids), score(x_b, y_b, example_ids=ids_b)
    torch.testing.assert_close(mixed_ids[2:5], full_ids[chosen], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunking_does_not_change_scores(estimator):
    model, x, y = make_case("mlp", batch=7, seed=20)
    kw = dict(estimator=estimator, n_vectors=4, h=1e-2)
    whole = input_curvature(model, x, y, generator=torch.Generator().manual_seed(21), **kw)
    for chunk_size in (1, 3, 7, 50):
        chunked = input_curvature(model, x, y, chunk_size=chunk_size,
                                  generator=torch.Generator().manual_seed(21), **kw)
        torch.testing.assert_close(chunked, whole, rtol=1e-7, atol=1e-12)


def test_empty_batch_gives_empty_scores():
    model, x, y = make_case("mlp")
    out = input_curvature(model, x[:0], y[:0])
    assert out.shape == (0,) and out.dtype == DTYPE


# --------------------------------------------------------------------------------------
# The random vectors
# --------------------------------------------------------------------------------------


def _fmix32_reference(value: int) -> int:
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & 0xFFFFFFFF
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & 0xFFFFFFFF
    return value ^ (value >> 16)


def test_murmur_finaliser_matches_pure_python_reference():
    rng = random.Random(0)
    values = [0, 1, 0xFFFFFFFF, 0x80000000] + [rng.getrandbits(32) for _ in range(500)]
    got = _fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_fmix32_reference(v) for v in values]


def test_rademacher_vectors_follow_the_example_not_the_batch():
    x = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(22))
    v = rademacher_vectors(x, 5, seed=123)
    assert v.shape == (5, 6, 3, 2) and v.dtype == x.dtype
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    order = torch.tensor([4, 0, 5])
    assert torch.equal(rademacher_vectors(x[order], 5, seed=123), v[:, order])
    # Raising n_vectors extends the sample rather than redrawing it.
    assert torch.equal(rademacher_vectors(x, 2, seed=123), v[:2])
    # Streams, seeds and examples all give different vectors.
    assert not torch.equal(rademacher_vectors(x, 5, seed=123, stream=1), v)
    assert not torch.equal(rademacher_vectors(x, 5, seed=124), v)
    assert not torch.equal(v[:, 0], v[:, 1])
    # An identical copy of an example gets the same vectors under content keys ...
    twin = torch.cat([x, x[2:3]])
    assert torch.equal(rademacher_vectors(twin, 5, seed=123)[:, 6], v[:, 2])
    # ... and ids key by identity, whatever the content.
    ids = torch.tensor([7, 7, 9, 1, 2, 3])
    by_id = rademacher_vectors(x, 5, seed=123, example_ids=ids)
    assert torch.equal(by_id[:, 0], by_id[:, 1])
    assert torch.equal(rademacher_vectors(torch.zeros(1, 3, 2), 5, seed=123,
                                          example_ids=ids[2:3])[:, 0], by_id[:, 2])
    # A 0-d int64 tensor seed (what draw_seed gives) equals the same int.
    assert torch.equal(rademacher_vectors(x, 5, seed=torch.tensor(123)), v)


@pytest.mark.parametrize("dtype,dim", [(torch.float16, 8), (torch.bfloat16, 8),
                                       (torch.float32, 8), (torch.float64, 8),
                                       (torch.float32, 70)])  # 70: signs from three hashes
def test_rademacher_vectors_are_balanced_and_uncorrelated(dtype, dim):
    x = torch.rand(3000, dim, generator=torch.Generator().manual_seed(23)).to(dtype)
    v = rademacher_vectors(x, 4, seed=99).to(torch.float64)  # [4, 3000, dim]
    u = rademacher_vectors(x, 4, seed=99, stream=1).to(torch.float64)
    assert v.dtype == torch.float64 and set(v.unique().tolist()) == {-1.0, 1.0}
    samples = v.reshape(-1, dim)
    n = samples.shape[0]
    bound = 5 / math.sqrt(n)  # 5 standard errors for a mean of n independent ±1
    assert samples.mean(0).abs().max() < bound
    # Coordinates, streams, vectors and neighbouring examples: all pairwise uncorrelated.
    corr = samples.T @ samples / n
    assert (corr - torch.eye(dim, dtype=torch.float64)).abs().max() < bound
    assert (v * u).mean((0, 1)).abs().max() < 5 / math.sqrt(4 * 3000)
    assert (v[0] * v[1]).mean(0).abs().max() < 5 / math.sqrt(3000)
    assert (v[:, :-1] * v[:, 1:]).mean((0, 1)).abs().max() < 5 / math.sqrt(4 * 2999)


# --------------------------------------------------------------------------------------
# State restoration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_model_flags_grads_and_global_rng_are_left_as_they_were(estimator):
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.BatchNorm1d(8),
                          nn.Linear(8, 3)).to(DTYPE)
    model.train()
    model[2].eval()  # a deliberately mixed setting must survive
    flags_before = [m.training for m in model.modules()]
    existing_grad = torch.randn_like(model[0].weight)
    model[0].weight.grad = existing_grad
    grad_values = existing_grad.clone()
    running_mean = model[3].running_mean.clone()
    batches_tracked = model[3].num_batches_tracked.clone()
    seen_training = []
    handles = [m.register_forward_hook(lambda mod, *_: seen_training.append(mod.training))
               for m in model.modules()]
    x = torch.randn(5, 5, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 0, 1])
    rng_before = torch.get_rng_state()

    input_curvature(model, x, y, estimator=estimator, n_vectors=2)

    assert torch.equal(torch.get_rng_state(), rng_before)
    for handle in handles:
        handle.remove()
    assert seen_training and not any(seen_training)  # every forward ran in eval mode
    assert [m.training for m in model.modules()] == flags_before
    assert model[0].weight.grad is existing_grad
    assert torch.equal(existing_grad, grad_values)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert torch.equal(model[3].running_mean, running_mean)
    assert torch.equal(model[3].num_batches_tracked, batches_tracked)


def test_works_inside_no_grad_and_zo_inside_inference_mode():
    model, x, y = make_case("mlp", seed=25)
    expected = input_curvature(model, x, y, n_vectors=2)
    with torch.no_grad():
        torch.testing.assert_close(input_curvature(model, x, y, n_vectors=2), expected)
    zo = input_curvature(model, x, y, estimator="zo", n_vectors=2)
    with torch.inference_mode():
        x_inf = x.clone()
        torch.testing.assert_close(input_curvature(model, x_inf, y, estimator="zo",
                                                   n_vectors=2), zo)
        with pytest.raises(RuntimeError, match="inference_mode"):
            input_curvature(model, x_inf, y, estimator="hutchinson")
    # An inference tensor used outside inference mode still works for gradient estimators.
    torch.testing.assert_close(input_curvature(model, x_inf, y, n_vectors=2), expected)


def test_loss_linear_in_the_input_has_zero_hutchinson_trace():
    model = nn.Linear(4, 2).to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    out = input_curvature(model, x, None, loss_fn=lambda o, _: o.sum())
    assert torch.equal(out, torch.zeros(3, dtype=DTYPE))


# --------------------------------------------------------------------------------------
# Custom losses
# --------------------------------------------------------------------------------------


def test_custom_sum_loss_gives_the_same_scores_for_every_estimator():
    model, x, y = make_case("mlp", seed=26)

    def loss_fn(o, t):
        return F.cross_entropy(o, t, reduction="sum")

    for estimator in ESTIMATORS:
        torch.testing.assert_close(
            input_curvature(model, x, y, estimator=estimator, n_vectors=2, loss_fn=loss_fn),
            input_curvature(model, x, y, estimator=estimator, n_vectors=2),
            rtol=1e-9, atol=1e-14)


def test_zo_falls_back_to_a_loop_when_the_loss_cannot_be_vmapped():
    model, x, y = make_case("mlp", seed=27)

    def loss_fn(o, t):  # .item() defeats vmap
        return F.cross_entropy(o, t, reduction="sum") * (1.0 if o.sum().item() < 1e9 else 0.0)

    expected = input_curvature(model, x, y, estimator="zo", n_vectors=2)
    with pytest.warns(RuntimeWarning, match="vmap"):
        got = input_curvature(model, x, y, estimator="zo", n_vectors=2, loss_fn=loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14)


def test_mse_loss_hutchinson_matches_exact_hessian():
    # A regression loss: ℓ = ‖f(x) − y‖², with y a float target per example.
    model = tanh_mlp(classes=2, seed=28)
    x = torch.randn(4, 5, dtype=DTYPE)
    y = torch.randn(4, 2, dtype=DTYPE)

    def loss_fn(o, t):
        return F.mse_loss(o, t, reduction="sum")

    vectors = random_signs(3, x.shape, seed=29)
    expected = []
    for i in range(4):
        hess = torch.func.hessian(lambda xi, i=i: loss_fn(model(xi[None]), y[i:i + 1]))(x[i])
        expected.append(torch.stack([vec[i] @ hess @ vec[i] for vec in vectors]).mean())
    torch.testing.assert_close(hutchinson_trace(model, x, y, vectors, loss_fn=loss_fn),
                               torch.stack(expected), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_integer_inputs_are_refused_with_the_embedding_advice():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 10, (2, 3))
    for estimator in ESTIMATORS:
        with pytest.raises(TypeError, match="continuous inputs.*embedding"):
            input_curvature(model, tokens, torch.tensor([0, 1]), estimator=estimator)
    with pytest.raises(TypeError, match="embedding"):
        hutchinson_trace(model, tokens, torch.tensor([0, 1]), torch.ones(1, 2, 3))


def test_bad_arguments_raise_clear_errors():
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="unknown estimator"):
        input_curvature(model, x, y, estimator="trace")
    with pytest.raises(ValueError, match="n_vectors"):
        input_curvature(model, x, y, n_vectors=0)
    with pytest.raises(ValueError, match="h "):
        input_curvature(model, x, y, estimator="fd", h=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        input_curvature(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="example_ids"):
        input_curvature(model, x, y, example_ids=torch.arange(2))
    with pytest.raises(TypeError, match="generator"):
        input_curvature(model, x, y, generator=0)
    with pytest.raises(ValueError, match=r"reduction='sum'"):
        input_curvature(model, x, y, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    with pytest.raises(ValueError, match=r"reduction='sum'"):
        input_curvature(model, x, y, estimator="zo",
                        loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none").repeat(2))
    with pytest.raises(ValueError, match="n_vectors, \\*x.shape"):
        hutchinson_trace(model, x, y, torch.ones(2, 3, 5, dtype=DTYPE))
