"""Devices without float64 (Apple's MPS): the guard sums and solves the Gram in float32,
says so once, and GNQ meets the float32 bound stated in gradguard.uniqueness.gnq
(B·1.2e-7·λ_max(K)/λ). Simulated on the CPU by making ``float64_supported`` say no;
the reference is float64 torch.func per-example gradients with an explicit P×P solve."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.uniqueness import gnq as gnq_math
from tests.reference import ce_sum, gen, gnq_explicit, per_example_grads, rel_err

LAM = 1e-2
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7


def test_float64_supported_and_the_solve_dtype():
    assert gnq_math.float64_supported("cpu") and gnq_math.float64_supported(torch.device("meta"))
    assert gnq_math.solve_dtype("cpu") == torch.float64


@pytest.fixture
def no_float64(monkeypatch):
    monkeypatch.setattr(gnq_math, "float64_supported", lambda device: False)


def guarded_mlp(**guard_kwargs):
    ds = TensorDataset(torch.randn(32, 6, generator=gen(10)),
                       torch.randint(0, 3, (32,), generator=gen(11)))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    guard = gg.GradGuard(lam=LAM, **guard_kwargs)
    model, opt, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8))
    return guard, model, opt, loader


def test_without_float64_the_guard_solves_in_float32_within_the_stated_bound(no_float64):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, model, opt, loader = guarded_mlp()
        for x, y in loader:
            G = per_example_grads(copy.deepcopy(model).double(), ce_sum, x.double(), y)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            want = gnq_explicit(G, LAM)
            bound = len(x) * EPS32 * float(torch.linalg.eigvalsh(G @ G.T).max()) / LAM
            assert 1e-6 < bound < 1e-2  # a float32 solve is visible, and the bound useful
            assert guard.last_gnq.dtype == torch.float32
            assert rel_err(guard.last_gnq, want) <= bound
    said = [w for w in caught if "has no float64" in str(w.message)]
    assert len(said) == 1 and "B·1.2e-7·λ_max(K)/λ" in str(said[0].message)
    assert guard.source.gram_dtype == torch.float32 and guard.step == 4
    assert int(guard.ledger.steps_seen.sum()) == 32
    assert guard.ledger.cum_gnq.dtype == torch.float64
    guard.close()


@pytest.mark.parametrize("policy", ["clip", "drop"])
def test_without_float64_acting_policies_are_refused_naming_what_works(no_float64, policy):
    with pytest.raises(NotImplementedError, match="no float64.*policy='monitor'"):
        guarded_mlp(policy=policy, threshold=1.0)
