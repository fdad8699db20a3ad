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
def test_matches_explicit_leave_one_out_solve(B, P, lam):
    g = torch.Generator().manual_seed(B * 100 + P)
    G = torch.randn(B, P, generator=g, dtype=torch.float64)
    assert rel_err(gnq_from_grads(G, lam), gnq_explicit(G, lam)) < 1e-9


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 8), P=st.integers(1, 12), scale=st.floats(1e-3, 1e3),
       lam=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_property_matches_explicit(B, P, scale, lam, seed):
    G = scale * torch.randn(B, P, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
    ref = gnq_explicit(G, lam)
    got = gnq_from_grads(G, lam)
    assert torch.all(got >= 0)
    # A backward-stable B×B solve loses about cond(K + λI) · ε: with scale 1e3 and λ 1e-3
    # that condition number reaches 1e10 (the P×P reference with P < B does not).
    cond = 1 + float(torch.linalg.eigvalsh(G @ G.T).max()) / lam
    tol = max(1e-6, 100 * cond * torch.finfo(torch.float64).eps)
    assert rel_err(got, ref) < tol or float((got - ref).abs().max()) < 1e-12


def test_small_gnq_has_no_cancellation():
    # One tiny gradient among large ones: 1/(λM_jj) − 1 would lose every digit here.
    G = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
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


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gram_raises_clear_error(bad):
    K = torch.eye(3, dtype=torch.float64)
    K[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*on_nonfinite"):
        gnq_from_gram(K, 1e-2)


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan])
def test_bad_lambda_raises(lam):
    with pytest.raises(ValueError, match="lam must be"):
        gnq_from_gram(torch.eye(2), lam)


def test_not_a_gram_raises():
    with pytest.raises(ValueError, match="positive definite"):
        gnq_from_gram(-5 * torch.eye(3), 1e-2)
    with pytest.raises(ValueError, match="square"):
        gnq_from_gram(torch.zeros(2, 3), 1e-2)


def test_disclosure_bound_is_half_log1p():
    gnq = torch.tensor([0.0, 1.0, 1e6], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5 * math.log(2.0), 0.5 * math.log(1e6 + 1)],
                            dtype=torch.float64)
    assert torch.allclose(disclosure_bound(gnq), expected, rtol=1e-12, atol=0)
