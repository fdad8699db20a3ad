"""DisclosureLedger against a brute-force per-index Python reference."""

from __future__ import annotations

import csv
import math
import random

import pytest
import torch

from gradguard.ledger import DisclosureLedger

FIELDS = ("steps_seen", "cum_gnq", "max_gnq", "cum_bound", "censored", "last_step",
          "curv_sum", "curv_count")


class Reference:
    """Plain-Python ledger: one dict entry per index, one example at a time."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def row(self, i: int) -> dict:
        return self.rows.setdefault(i, {"steps_seen": 0, "cum_gnq": 0.0, "max_gnq": 0.0,
                                        "cum_bound": 0.0, "censored": False,
                                        "last_step": -1, "curv_sum": 0.0, "curv_count": 0})

    def update(self, indices: list[int], gnq: list[float], step: int) -> None:
        for i, g in zip(indices, gnq, strict=True):
            r = self.row(i)
            r["steps_seen"] += 1
            r["cum_gnq"] += g
            r["max_gnq"] = max(r["max_gnq"], g)
            r["cum_bound"] += 0.5 * math.log(1.0 + g)
            r["last_step"] = step

    def censor(self, indices: list[int]) -> None:
        for i in indices:
            self.row(i)["censored"] = True

    def add_curvature(self, indices: list[int], scores: list[float]) -> None:
        for i, s in zip(indices, scores, strict=True):
            r = self.row(i)
            r["curv_sum"] += s
            r["curv_count"] += 1

    def seen(self) -> dict[int, dict]:
        return {i: r for i, r in self.rows.items() if r["steps_seen"] > 0}


def random_batches(seed: int, n_batches: int, num_examples: int, max_b: int = 24):
    """Batches drawn with replacement (duplicates), heavy-tailed float64 GNQ, some empty."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(n_batches):
        B = int(torch.randint(0, max_b + 1, (1,), generator=gen))
        idx = torch.randint(0, num_examples, (B,), generator=gen)
        gnq = torch.exp(3 * torch.randn(B, generator=gen, dtype=torch.float64))
        batches.append((idx, gnq, step))
    return batches


def assert_matches(ledger: DisclosureLedger, ref: Reference) -> None:
    cap = ledger.capacity
    for name in FIELDS:
        t = getattr(ledger, name)
        assert t.shape == (cap,)
        for i in range(cap):
            expected = ref.rows[i][name] if i in ref.rows else Reference().row(0)[name]
            got = t[i].item()
            if name in ("cum_gnq", "cum_bound", "curv_sum"):
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-300), (name, i)
            else:
                assert got == expected, (name, i)


@pytest.mark.parametrize("num_examples", [60, None], ids=["fixed", "growing"])
def test_update_matches_reference_with_duplicates(num_examples):
    ref = Reference()
    ledger = DisclosureLedger(num_examples)
    had_duplicates = False
    for idx, gnq, step in random_batches(0, 40, 60):
        had_duplicates |= idx.unique().numel() < idx.numel()
        ledger.update(idx, gnq, step)
        ref.update(idx.tolist(), gnq.tolist(), step)
    assert had_duplicates
    assert_matches(ledger, ref)


def test_dtypes_and_untouched_defaults():
    ledger = DisclosureLedger(3)
    assert ledger.steps_seen.dtype == torch.int64
    assert ledger.cum_gnq.dtype == ledger.max_gnq.dtype == ledger.cum_bound.dtype == torch.float64
    assert ledger.censored.dtype == torch.bool
    assert ledger.last_step.dtype == ledger.curv_count.dtype == torch.int64
    assert ledger.curv_sum.dtype == torch.float64
    assert ledger.last_step.tolist() == [-1, -1, -1]


def test_duplicates_in_one_batch_accumulate():
    ledger = DisclosureLedger(5)
    ledger.update(torch.tensor([3, 3, 1, 3]), torch.tensor([1.0, 2.0, 0.5, 3.0]), step=7)
    assert ledger.steps_seen.tolist() == [0, 1, 0, 3, 0]
    assert ledger.cum_gnq[3].item() == 6.0
    assert ledger.max_gnq[3].item() == 3.0
    expected = 0.5 * (math.log(2.0) + math.log(3.0) + math.log(4.0))
    assert ledger.cum_bound[3].item() == pytest.approx(expected, rel=1e-15)
    assert ledger.bound(torch.tensor([3, 1])).tolist() == pytest.approx(
        [expected, 0.5 * math.log(1.5)], rel=1e-15)
    assert ledger.last_step.tolist() == [-1, 7, -1, 7, -1]


def test_empty_batch_is_noop():
    ledger = DisclosureLedger(4)
    before = ledger.state_dict()
    ledger.update(torch.zeros(0, dtype=torch.int64), torch.zeros(0), step=3)
    ledger.censor(torch.zeros(0, dtype=torch.int64))
    ledger.add_curvature(torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    after = ledger.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    grow = DisclosureLedger()
    grow.update(torch.zeros(0, dtype=torch.int64), torch.zeros(0), step=0)
    assert grow.capacity == 0


def test_step_as_tensor_and_no_autograd_leak():
    ledger = DisclosureLedger(4)
    gnq = torch.tensor([0.25, 4.0], requires_grad=True)
    ledger.update(torch.tensor([0, 2], dtype=torch.int32), gnq * 1.0, torch.tensor(11))
    assert ledger.last_step.tolist() == [11, -1, 11, -1]
    assert not any(getattr(ledger, f).requires_grad for f in FIELDS)


def test_censor_where_and_is_censored():
    ledger = DisclosureLedger(6)
    ref = Reference()
    ledger.censor(torch.tensor([1]))
    ref.censor([1])
    # index 4 occurs twice with mixed flags: censoring must win over "leave alone".
    idx = torch.tensor([4, 2, 4, 5])
    where = torch.tensor([False, False, True, True])
    ledger.censor(idx, where=where)
    ref.censor([i for i, w in zip(idx.tolist(), where.tolist(), strict=True) if w])
    expected = [ref.rows.get(i, {}).get("censored", False) for i in range(6)]
    assert ledger.censored.tolist() == expected
    assert ledger.is_censored(torch.tensor([5, 2, 1, 1])).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="where must be a bool tensor"):
        ledger.censor(idx, where=torch.tensor([True]))


def test_curvature_running_mean():
    gen = torch.Generator().manual_seed(1)
    ledger = DisclosureLedger(20)
    ref = Reference()
    for _ in range(15):
        idx = torch.randint(0, 20, (7,), generator=gen)
        scores = torch.randn(7, generator=gen, dtype=torch.float64)
        ledger.add_curvature(idx, scores)
        ref.add_curvature(idx.tolist(), scores.tolist())
    mean = ledger.curvature_mean()
    for i in range(20):
        r = ref.rows.get(i)
        if r is None or r["curv_count"] == 0:
            assert math.isnan(mean[i].item())
        else:
            assert mean[i].item() == pytest.approx(r["curv_sum"] / r["curv_count"], rel=1e-12)
            assert ledger.curv_count[i].item() == r["curv_count"]


def fill(seed: int, num_examples: int | None = 50, n_batches: int = 25):
    ledger, ref = DisclosureLedger(num_examples), Reference()
    for idx, gnq, step in random_batches(seed, n_batches, 50):
        ledger.update(idx, gnq, step)
        ref.update(idx.tolist(), gnq.tolist(), step)
    gen = torch.Generator().manual_seed(seed + 100)
    cens = torch.randint(0, 50, (6,), generator=gen)
    ledger.censor(cens)
    ref.censor(cens.tolist())
    cidx = torch.randint(0, 50, (30,), generator=gen)
    cs = torch.rand(30, generator=gen, dtype=torch.float64)
    ledger.add_curvature(cidx, cs)
    ref.add_curvature(cidx.tolist(), cs.tolist())
    return ledger, ref


def test_summary_matches_reference():
    ledger, ref = fill(2)
    s = ledger.summary()
    seen = ref.seen()
    bounds = [r["cum_bound"] for r in seen.values()]
    assert int(s["examples_seen"]) == len(seen)
    assert float(s["max_bound"]) == pytest.approx(max(bounds), rel=1e-12)
    assert float(s["mean_bound"]) == pytest.approx(sum(bounds) / len(bounds), rel=1e-12)
    assert int(s["censored_total"]) == sum(r["censored"] for r in ref.rows.values())
    assert float(s["max_gnq"]) == max(r["max_gnq"] for r in seen.values())


def test_summary_of_empty_ledger():
    for ledger in (DisclosureLedger(), DisclosureLedger(5)):
        s = ledger.summary()
        assert int(s["examples_seen"]) == 0
        assert float(s["max_bound"]) == float(s["mean_bound"]) == float(s["max_gnq"]) == 0.0


@pytest.mark.parametrize("by", ["cum_bound", "max_gnq", "cum_gnq", "curvature"])
def test_top_matches_sorted_reference(by):
    ledger, ref = fill(3)
    # Integer GNQ values create ties in max_gnq; ties go to the smaller index.
    ledger2, ref2 = DisclosureLedger(50), Reference()
    for idx, gnq, step in random_batches(4, 10, 50):
        g = torch.floor(torch.log1p(gnq))
        ledger2.update(idx, g, step)
        ref2.update(idx.tolist(), g.tolist(), step)
    for led, rf, tied in ((ledger, ref, False), (ledger2, ref2, True)):
        rows = rf.seen()
        if by == "curvature":
            scored = {i: r["curv_sum"] / r["curv_count"] for i, r in rows.items()
                      if r["curv_count"] > 0}
        else:
            scored = {i: r[by] for i, r in rows.items()}
        expected = sorted(scored, key=lambda i: (-scored[i], i))
        for k in (1, 7, 1000):
            got = led.top(k, by=by)
            assert [r["index"] for r in got] == expected[:k]
        if tied and by == "max_gnq":
            assert len(set(scored.values())) < len(scored)  # ties really occurred
    top = ledger.top(3, by=by)
    for row in top:
        r = ref.rows[row["index"]]
        assert isinstance(row["index"], int) and isinstance(row["censored"], bool)
        assert isinstance(row["cum_bound"], float) and isinstance(row["steps_seen"], int)
        for name in FIELDS:
            assert row[name] == pytest.approx(r[name], rel=1e-12)


def test_top_rejects_bad_arguments():
    ledger = DisclosureLedger(3)
    with pytest.raises(ValueError, match="by must be one of"):
        ledger.top(3, by="loss")
    with pytest.raises(ValueError, match="k must be an int"):
        ledger.top(-1)


def test_records_and_csv(tmp_path):
    ledger, ref = fill(5)
    records = ledger.records()
    seen = ref.seen()
    assert [r["index"] for r in records] == sorted(seen)
    path = tmp_path / "ledger.csv"
    ledger.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == sorted(seen)
    for row in rows:
        r = seen[int(row["index"])]
        assert int(row["steps_seen"]) == r["steps_seen"]
        assert float(row["cum_bound"]) == pytest.approx(r["cum_bound"], rel=1e-12)
        assert float(row["max_gnq"]) == r["max_gnq"]
        assert (row["censored"] == "True") == r["censored"]
        assert int(row["last_step"]) == r["last_step"]
        if r["curv_count"]:
            assert float(row["curvature_mean"]) == pytest.approx(
                r["curv_sum"] / r["curv_count"], rel=1e-12)
        else:
            assert math.isnan(float(row["curvature_mean"]))


@pytest.mark.parametrize("num_examples", [50, None], ids=["fixed", "growing"])
def test_state_dict_round_trip_is_exact(tmp_path, num_examples):
    ledger, _ = fill(6, num_examples)
    path = tmp_path / "ledger.pt"
    torch.save(ledger.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    restored = DisclosureLedger(num_examples)
    restored.load_state_dict(sd)
    for name in FIELDS:
        assert torch.equal(getattr(restored, name), getattr(ledger, name)), name
    # Both continue identically.
    for idx, gnq, step in random_batches(7, 5, 50):
        ledger.update(idx, gnq, step)
        restored.update(idx, gnq, step)
    for name in FIELDS:
        assert torch.equal(getattr(restored, name), getattr(ledger, name)), name


def test_state_dict_is_a_snapshot():
    ledger = DisclosureLedger(3)
    sd = ledger.state_dict()
    ledger.update(torch.tensor([0]), torch.tensor([1.0]), step=0)
    assert sd["steps_seen"].tolist() == [0, 0, 0]


def test_load_state_dict_rejects_bad_input():
    good = fill(8)[0].state_dict()

    def load(sd, ledger=None):
        (ledger or DisclosureLedger()).load_state_dict(sd)

    with pytest.raises(ValueError, match=r"missing keys \['cum_bound'\]"):
        load({k: v for k, v in good.items() if k != "cum_bound"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        load({**good, "extra": torch.zeros(50)})
    with pytest.raises(ValueError, match="must have dtype torch.float64"):
        load({**good, "cum_gnq": good["cum_gnq"].float()})
    with pytest.raises(ValueError, match="same length as steps_seen"):
        load({**good, "max_gnq": good["max_gnq"][:-1]})
    with pytest.raises(ValueError, match="same length as steps_seen"):
        load({**good, "censored": good["censored"].reshape(5, 10)})
    with pytest.raises(ValueError, match="format_version"):
        load({**good, "format_version": torch.tensor(99)})
    with pytest.raises(ValueError, match=r"num_examples=40 .* holds 50"):
        load(good, DisclosureLedger(40))
    with pytest.raises(TypeError, match="must be a tensor"):
        load({**good, "last_step": good["last_step"].tolist()})
    with pytest.raises(TypeError, match="must be a dict"):
        load([good])
    load(good, DisclosureLedger(50))  # the good one loads


@pytest.mark.parametrize("caps", [(50, 50), (None, None)], ids=["fixed", "growing"])
def test_merge_equals_single_ledger(caps):
    batches = random_batches(9, 40, 50)
    single = DisclosureLedger(caps[0])
    parts = [DisclosureLedger(caps[0]), DisclosureLedger(caps[1])]
    rng = random.Random(0)
    for idx, gnq, step in batches:
        single.update(idx, gnq, step)
        parts[rng.randrange(2)].update(idx, gnq, step)
    # Censorship and curvature split between the parts, with index 4 recorded by both.
    for target, lo, hi in ((single, 0, 5), (single, 4, 10), (parts[0], 0, 5), (parts[1], 4, 10)):
        idx = torch.arange(lo, hi)
        target.censor(idx, where=idx % 3 == 0)
        target.add_curvature(idx, torch.sqrt(idx.double() + 0.5))
    merged = parts[0].merge_(parts[1])
    assert merged is parts[0]
    for name in ("steps_seen", "max_gnq", "censored", "last_step", "curv_count"):
        a, b = getattr(merged, name), getattr(single, name)
        n = min(a.numel(), b.numel())
        assert torch.equal(a[:n], b[:n]), name
        assert not a[n:].any() or name == "last_step"
    for name in ("cum_gnq", "cum_bound", "curv_sum"):
        a, b = getattr(merged, name), getattr(single, name)
        n = min(a.numel(), b.numel())
        torch.testing.assert_close(a[:n], b[:n], rtol=1e-12, atol=0)


def test_merge_capacity_rules():
    small = DisclosureLedger()
    small.update(torch.tensor([2]), torch.tensor([1.0]), step=4)
    big = DisclosureLedger()
    big.update(torch.tensor([40]), torch.tensor([3.0]), step=1)
    small.merge_(big)
    assert small.capacity >= 41
    assert small.steps_seen[[2, 40]].tolist() == [1, 1]
    assert small.last_step[[2, 40]].tolist() == [4, 1]
    fixed = DisclosureLedger(10)
    with pytest.raises(ValueError, match="same num_examples"):
        fixed.merge_(big)
    with pytest.raises(TypeError, match="DisclosureLedger"):
        fixed.merge_({"steps_seen": torch.zeros(10)})


def test_growth_beyond_initial_capacity_preserves_history():
    ledger, ref = DisclosureLedger(), Reference()
    caps = []
    for step, top in enumerate([3, 3, 9, 17, 100, 5, 1000]):
        idx = torch.tensor([top, top // 2, 0])
        gnq = torch.tensor([1.0 + step, 0.5, 2.0], dtype=torch.float64)
        ledger.update(idx, gnq, step)
        ref.update(idx.tolist(), gnq.tolist(), step)
        caps.append(ledger.capacity)
        assert ledger.capacity > top
    assert caps == sorted(caps)
    # Doubling: each growth at least doubles the old capacity.
    for before, after in zip(caps, caps[1:], strict=False):
        assert after == before or after >= 2 * before
    assert_matches(ledger, ref)
    # Queries past the end are "never seen" rather than errors.
    assert ledger.is_censored(torch.tensor([5000])).tolist() == [False]


def test_bad_inputs_raise_clear_errors():
    ledger = DisclosureLedger(10)
    with pytest.raises(ValueError, match=r"outside the ledger's range \[0, 10\).*num_examples"):
        ledger.update(torch.tensor([3, 10]), torch.tensor([1.0, 1.0]), step=0)
    with pytest.raises(ValueError, match=">= 0"):
        ledger.update(torch.tensor([-1]), torch.tensor([1.0]), step=0)
    with pytest.raises(ValueError, match=">= 0"):
        DisclosureLedger().update(torch.tensor([-2]), torch.tensor([1.0]), step=0)
    with pytest.raises(TypeError, match="integer tensor"):
        ledger.update(torch.tensor([1.0]), torch.tensor([1.0]), step=0)
    with pytest.raises(ValueError, match="1-D"):
        ledger.update(torch.tensor([[1]]), torch.tensor([1.0]), step=0)
    with pytest.raises(ValueError, match=r"one value per index \(2\)"):
        ledger.update(torch.tensor([1, 2]), torch.tensor([1.0]), step=0)
    with pytest.raises(ValueError, match=r"one value per index"):
        ledger.add_curvature(torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="num_examples must be >= 0"):
        DisclosureLedger(-1)
    with pytest.raises(TypeError, match="num_examples must be an int"):
        DisclosureLedger(3.0)
    # Nothing was recorded by the failed calls.
    assert int(ledger.steps_seen.sum()) == 0


def test_to_device_keeps_values():
    ledger, _ = fill(10)
    before = ledger.state_dict()
    moved = ledger.to("cpu")
    assert moved is ledger and ledger.device == torch.device("cpu")
    after = ledger.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_raw_gnq_and_eps_fields():
    """Raw GNQ sums/maxima beside the recorded GNQ; ε defaults to ∞ (nothing accounted)."""
    ref_raw: dict[int, list[float]] = {}
    ledger = DisclosureLedger(40)
    for idx, gnq, step in random_batches(3, 20, 40):
        raw = gnq * 2.5 + 1.0
        ledger.update(idx, gnq, step, gnq_raw=raw)
        for i, r in zip(idx.tolist(), raw.tolist(), strict=True):
            ref_raw.setdefault(i, []).append(r)
    for i in range(40):
        vals = ref_raw.get(i, [])
        assert ledger.cum_gnq_raw[i].item() == pytest.approx(sum(vals), rel=1e-12)
        assert ledger.max_gnq_raw[i].item() == max(vals, default=0.0)
    assert torch.isinf(ledger.eps).all() and float(ledger.summary()["eps_max"]) == math.inf
    default = DisclosureLedger(3)
    default.update(torch.tensor([0, 2]), torch.tensor([1.0, 4.0]), step=0)  # raw = gnq
    assert default.cum_gnq_raw.tolist() == [1.0, 0.0, 4.0]
    eps = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    default.set_epsilon(eps)
    s = default.summary()
    assert float(s["eps_max"]) == 2.0 and float(s["eps_mean"]) == pytest.approx(7 / 6)
    assert float(s["max_gnq_raw"]) == 4.0


def test_state_without_the_newer_fields_loads_with_defaults():
    ledger, _ = fill(12)
    ledger.set_epsilon(torch.full((50,), 3.0, dtype=torch.float64))
    old = {k: v for k, v in ledger.state_dict().items()
           if k not in ("cum_gnq_raw", "max_gnq_raw", "eps")}
    fresh = DisclosureLedger(50)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.cum_gnq, ledger.cum_gnq)
    assert not fresh.cum_gnq_raw.any() and not fresh.max_gnq_raw.any()
    assert torch.isinf(fresh.eps).all()
    full = DisclosureLedger(50)
    full.load_state_dict(ledger.state_dict())
    assert torch.equal(full.eps, ledger.eps) and torch.equal(full.cum_gnq_raw, ledger.cum_gnq_raw)


def test_merge_raw_fields_and_eps():
    a, b = DisclosureLedger(4), DisclosureLedger(4)
    a.update(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), 0, gnq_raw=torch.tensor([3.0, 5.0]))
    b.update(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]), 1, gnq_raw=torch.tensor([7.0, 2.0]))
    a.set_epsilon(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    b.set_epsilon(torch.tensor([2.0, 1.0, 3.0, 0.5], dtype=torch.float64))
    a.merge_(b)
    assert a.cum_gnq_raw.tolist() == [3.0, 12.0, 2.0, 0.0]
    assert a.max_gnq_raw.tolist() == [3.0, 7.0, 2.0, 0.0]
    assert a.eps.tolist() == [2.0, 2.0, 3.0, 4.0]  # the conservative one
    a.merge_(DisclosureLedger(4))  # a stream without DP accounting: no guarantee
    assert torch.isinf(a.eps).all()
