"""gnq_from_gram / gnq_from_grads against explicit float64 P×P leave-one-out solves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.uniqueness.gnq import disclosure_bound, gnq_from_grads, gnq_from_gram, resolve_lam
from tests.reference import gnq_explicit, rel_err


@pytest.mark.parametrize("B,P", [(1, 5), (4, 3), (6, 20), (10, 10)])
@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_matches_explicit_leave_one_out_solve(B, P, lam, device):
    g = torch.Generator().manual_seed(B * 100 + P)
    G = torch.randn(B, P, generator=g, dtype=torch.float64).to(device)
    assert rel_err(gnq_from_grads(G, lam), gnq_explicit(G, lam)) < 1e-9


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 8), P=st.integers(1, 12), scale=st.floats(1e-3, 1e3),
       lam=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_property_matches_explicit(B, P, scale, lam, seed, device):
    G = scale * torch.randn(B, P, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).to(device)
    ref = gnq_explicit(G, lam)
    got = gnq_from_grads(G, lam)
    assert torch.all(got >= 0)
    # A backward-stable B×B solve loses about cond(K + λI) · ε: with scale 1e3 and λ 1e-3
    # that condition number reaches 1e10 (the P×P reference with P < B does not).
    cond = 1 + float(torch.linalg.eigvalsh(G @ G.T).max()) / lam
    tol = max(1e-6, 100 * cond * torch.finfo(torch.float64).eps)
    assert rel_err(got, ref) < tol or float((got - ref).abs().max()) < 1e-12


def test_small_gnq_has_no_cancellation(device):
    # One tiny gradient among large ones: 1/(λM_jj) − 1 would lose every digit here.
    G = torch.randn(5, 8, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(device)
    G[2] *= 1e-7
    assert rel_err(gnq_from_grads(G, 1e-2)[2:3], gnq_explicit(G, 1e-2)[2:3]) < 1e-6


def test_batch_of_one_is_norm_over_lambda():
    g = torch.tensor([[3.0, 4.0, 12.0]], dtype=torch.float64)
    assert gnq_from_grads(g, 0.5).item() == pytest.approx(169.0 / 0.5, rel=1e-12)


def test_empty_batch_gives_empty_result():
    out = gnq_from_gram(torch.zeros(0, 0), 1e-2)
    assert out.shape == (0,) and out.dtype == torch.float64


def test_duplicate_examples_do_not_stand_out():
    g = torch.randn(1, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = torch.cat([g, g, torch.randn(2, 6, dtype=torch.float64)])
    gnq = gnq_from_grads(G, 1e-6)
    # A gradient the batch already contains is predictable from the rest: GNQ ≈ leverage.
    assert gnq[0] < 2.0 and gnq[1] < 2.0


def test_relative_lambda_is_scale_invariant():
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = gnq_from_grads(G, 0.1, relative=True)
    b = gnq_from_grads(1000 * G, 0.1, relative=True)
    assert rel_err(b, a) < 1e-9
    K = G @ G.T
    lam = resolve_lam(K, 0.1, relative=True)
    assert float(lam) == pytest.approx(0.1 * float(torch.trace(K)) / 6)
    assert rel_err(a, gnq_explicit(G, float(lam))) < 1e-9


def test_nan_gram_raises_clear_error():
    K = torch.eye(3, dtype=torch.float64)
    K[1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf.*on_nonfinite"):
        gnq_from_gram(K, 1e-2)


def test_overflowing_gram_is_reported_as_overflow_not_nan():
    # Gradients of size 1e20 overflow a float32 Gram (1e40 > 3.4e38): say so, name the fix.
    G = torch.full((3, 4), 1e20, dtype=torch.float32)
    K = G @ G.T
    assert torch.isinf(K).all()
    with pytest.raises(ValueError, match=r"overflowed torch.float32.*gram_dtype=torch.float64"):
        gnq_from_gram(K, 1e-2)


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan, math.inf, True, 1e-320])
def test_bad_lambda_raises(lam):
    with pytest.raises(ValueError, match="lam must be"):
        gnq_from_gram(torch.eye(2), lam)


@pytest.mark.parametrize("lam", [0.0, -1e-3, math.nan, math.inf, 1e-320])
def test_bad_tensor_lambda_raises(lam):
    with pytest.raises(ValueError, match="lam must be"):
        gnq_from_gram(torch.eye(2), torch.tensor(lam, dtype=torch.float64))


def test_not_a_gram_raises():
    with pytest.raises(ValueError, match="positive semi-definite"):
        gnq_from_gram(-5 * torch.eye(3), 1e-2)
    with pytest.raises(ValueError, match="square"):
        gnq_from_gram(torch.zeros(2, 3), 1e-2)


def test_non_symmetric_gram_is_refused_not_symmetrised():
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    K = G @ G.T
    with pytest.raises(ValueError, match="not symmetric.*triangle"):
        gnq_from_gram(torch.triu(K), 1e-2)
    # Rounding-level asymmetry (a float32 Gram summed in another order) is accepted.
    K32 = K.to(torch.float32)
    K32[0, 1] = K32[0, 1] * (1 + 2 * torch.finfo(torch.float32).eps)
    assert rel_err(gnq_from_gram(K32, 1e-2), gnq_explicit(G, 1e-2)) < 1e-4


def test_indefinite_gram_is_refused():
    # Eigenvalues 3 and -1: K + λI is positive definite for λ = 2, yet no Gram; the old
    # code returned GNQ -0.2 here.
    K = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        gnq_from_gram(K, 2.0)


@pytest.mark.parametrize("relative", [False, True])
def test_zero_gram_gives_zero_gnq(relative):
    for K in (torch.zeros(4, 4), torch.zeros(1, 1, dtype=torch.float64)):
        out = gnq_from_gram(K, 1e-2, relative=relative)
        assert out.dtype == torch.float64 and torch.equal(out, torch.zeros(K.shape[0],
                                                                           dtype=torch.float64))
    # The engine passes the relative λ it resolved (clamped to the smallest normal) as a tensor.
    K = torch.zeros(3, 3)
    assert torch.equal(gnq_from_gram(K, resolve_lam(K, 0.1, relative=True)),
                       torch.zeros(3, dtype=torch.float64))
    # One all-zero example among others: its GNQ is 0, the others' are unaffected.
    G = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G[1] = 0
    got = gnq_from_grads(G, 1e-2)
    assert got[1] == 0
    assert rel_err(got[[0, 2, 3]], gnq_explicit(G, 1e-2)[[0, 2, 3]]) < 1e-9


def test_gram_dtypes():
    G = torch.randint(-3, 4, (4, 5), generator=torch.Generator().manual_seed(5))
    K = G @ G.T  # an integer Gram: converted to float64 exactly
    assert rel_err(gnq_from_gram(K, 0.5), gnq_explicit(G.to(torch.float64), 0.5)) < 1e-12
    with pytest.raises(TypeError, match="real Gram"):
        gnq_from_gram(torch.eye(3, dtype=torch.bool), 1e-2)
    with pytest.raises(TypeError, match="real Gram"):
        gnq_from_gram(torch.eye(3, dtype=torch.complex128), 1e-2)
    with pytest.raises(TypeError, match="real gradients"):
        gnq_from_grads(torch.ones(2, 3, dtype=torch.complex64), 1e-2)


def test_grads_must_be_batched():
    with pytest.raises(ValueError, match=r"\[B, P\].*g\[None\]"):
        gnq_from_grads(torch.randn(7), 1e-2)
    out = gnq_from_grads(torch.zeros(0, 5), 1e-2)
    assert out.shape == (0,) and out.dtype == torch.float64
    assert gnq_from_grads(torch.zeros(0, 3, 2), 1e-2, relative=True).shape == (0,)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [1e-6, 1e-8])
def test_near_duplicates_at_small_lambda_meet_the_stated_precision(seed, lam, device):
    # Near-duplicate gradients at small λ: GNQ is driven by the small differences, the
    # worst case for a batch-space method. The docstring promises relative error below
    # ε·λ_max(K)/λ (ε = float64 roundoff for a float64 Gram); the explicit P×P solve is
    # the reference (its own error is of the same order or smaller).
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 30, generator=gen, dtype=torch.float64)
    G = 3 * (base + 10 ** -(2 + seed % 3) * torch.randn(6, 30, generator=gen, dtype=torch.float64))
    G = G.to(device)
    K = G @ G.T
    bound = torch.finfo(torch.float64).eps * float(torch.linalg.eigvalsh(K).max()) / lam
    assert bound < 1e-4  # the promise is a useful one here
    assert rel_err(gnq_from_gram(K, lam), gnq_explicit(G, lam)) < bound


def test_disclosure_bound_is_half_log1p():
    gnq = torch.tensor([0.0, 1.0, 1e6], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5 * math.log(2.0), 0.5 * math.log(1e6 + 1)],
                            dtype=torch.float64)
    assert torch.allclose(disclosure_bound(gnq), expected, rtol=1e-12, atol=0)
