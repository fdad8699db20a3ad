"""gg.Canaries: seeded fair coins, stable dataset indices, and an audit of a real training run."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradguard as gg
from gradguard.audit import one_run_epsilon


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (torch.tensor(data.data / 16.0, dtype=torch.float32),
            torch.tensor(data.target, dtype=torch.long))


def test_coins_are_seeded_fair_and_independent_of_the_canaries():
    x, y = torch.rand(500, 3), torch.randint(0, 5, (500,))
    a = gg.Canaries.mislabelled(x, y, m=400, num_classes=5, seed=3)
    b = gg.Canaries.mislabelled(x, y, m=400, num_classes=5, seed=3)
    c = gg.Canaries.mislabelled(x, y, m=400, num_classes=5, seed=4)
    assert torch.equal(a.included, b.included) and not torch.equal(a.included, c.included)
    # Fair coin: 400 flips within 4 standard deviations of 200.
    assert abs(int(a.included.sum()) - 200) < 4 * 10
    # Every mislabelled canary's label differs from its source row's label.
    rows = [int(torch.nonzero((x == a.inputs[j]).all(dim=1))[0]) for j in range(a.m)]
    assert all(int(y[r]) != int(a.labels[j]) for j, r in enumerate(rows))


def test_training_set_keeps_original_indices_and_appends_included_canaries():
    x, y = torch.rand(30, 4), torch.randint(0, 3, (30,))
    canaries = gg.Canaries.out_of_distribution(m=12, input_shape=(4,), num_classes=3, seed=1)
    train = canaries.training_set(TensorDataset(x, y))
    assert len(train) == 30 + int(canaries.included.sum())
    for i in (0, 17, 29):
        assert torch.equal(train[i][0], x[i]) and int(train[i][1]) == int(y[i])
    for j in range(canaries.m):
        index = int(canaries.train_indices[j])
        if canaries.included[j]:
            assert torch.equal(train[index][0], canaries.inputs[j])
            assert int(train[index][1]) == int(canaries.labels[j])
        else:
            assert index == -1
    with pytest.raises(IndexError):
        train[len(train)]


def test_audit_of_a_memorising_run_matches_an_independent_computation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    x, y = _digits()
    canaries = gg.Canaries.mislabelled(x[1000:], y[1000:], m=200, num_classes=10, seed=0,
                                       k_plus=20, k_minus=20)
    train = canaries.training_set(TensorDataset(x[:300], y[:300]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    writer = SummaryWriter(str(tmp_path))
    result = canaries.audit(model, writer=writer, step=7)
    writer.close()

    # Independent: per-canary negative log-likelihood by hand, then the audit.
    with torch.no_grad():
        logp = torch.log_softmax(model(canaries.inputs).double(), dim=1)
        scores = logp[torch.arange(canaries.m), canaries.labels].numpy()
    expected = one_run_epsilon(scores, canaries.included.numpy(), k_plus=20, k_minus=20)
    assert result["correct"] == expected["correct"]
    assert result["eps_lower_bound"] == pytest.approx(expected["eps_lower_bound"], abs=1e-9)
    assert result["eps_lower_bound"] > 1.0  # memorised mislabelled canaries are detectable

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Scalars("gradguard/audit/eps_lower_bound")
    assert [e.step for e in logged] == [7]
    assert logged[0].value == pytest.approx(result["eps_lower_bound"], rel=1e-5)

    # Calibrated by the initial weights: the score is the loss decrease, checked by hand.
    reference = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), initial):
            p.copy_(p0)
        logp0 = torch.log_softmax(reference(canaries.inputs).double(), dim=1)
        decrease = scores - logp0[torch.arange(canaries.m), canaries.labels].numpy()
    np.testing.assert_allclose(canaries.scores(model, reference=reference).numpy(), decrease,
                               rtol=1e-5, atol=1e-5)


def test_untrained_model_gives_no_evidence():
    """Scores of a model that never saw the canaries are independent of the coins."""
    x, y = _digits()
    positives = 0
    for seed in range(40):
        canaries = gg.Canaries.mislabelled(x, y, m=300, num_classes=10, seed=seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        positives += canaries.audit(model)["eps_lower_bound"] > 0
    assert positives <= 6  # expected 2 of 40 at 95% confidence; P[> 6] < 0.5%


def test_maybe_audit_and_bad_input():
    canaries = gg.Canaries(torch.rand(10, 2), torch.randint(0, 2, (10,)), every=5)
    model = nn.Linear(2, 2)
    assert canaries.maybe_audit(3, model) is None
    assert canaries.maybe_audit(10, model)["step"] == 10
    with pytest.raises(TypeError, match="floating-point"):
        gg.Canaries(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="m must be"):
        gg.Canaries.mislabelled(torch.rand(5, 2), torch.zeros(5, dtype=torch.long), m=9,
                                num_classes=3)
