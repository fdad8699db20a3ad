"""TensorBoardSink: write a small run, read it back with TensorBoard's own readers."""

from __future__ import annotations

import glob
import math
import os
import re
import types
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from gradguard.ledger import DisclosureLedger
from gradguard.tensorboard import LAYOUT, TAGS, TensorBoardSink, _attack_sign

STEP_SCALARS = ["gnq/mean", "gnq/p50", "gnq/p95", "gnq/max", "disclosure/max",
                "disclosure/mean", "policy/dropped", "policy/clipped", "policy/censored_total",
                "lam"]
CURVATURE_SCALARS = ["curvature/members_mean", "curvature/nonmembers_mean", "curvature/auc",
                     "probe/seconds"]
N = 40


@dataclass
class FakeCurvatureResult:
    members_mean: float
    nonmembers_mean: float
    auc: float
    seconds: float
    member_scores: torch.Tensor
    nonmember_scores: np.ndarray
    direction: str
    estimator: str


def load(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                         "tensors": 0})
    acc.Reload()
    return acc


def raw_summaries(log_dir):
    """(step, summary value) for every value in every event file of the directory."""
    out = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            out.extend((event.step, v) for v in event.summary.value)
    return out


def scalar(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def text_of(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in
            acc.Tensors(f"{tag}/text_summary")]


def write_run(log_dir, seed=0):
    """Log 5 training steps (one with an empty batch), two curvature results and a table.

    Returns every expected number, computed from the raw inputs without the sink or ledger.
    """
    gen = torch.Generator().manual_seed(seed)
    ledger = DisclosureLedger(N)
    sink = TensorBoardSink(log_dir, top_k=5)
    ref_bound: dict[int, float] = {}
    ref_steps: dict[int, int] = {}
    ref_max: dict[int, float] = {}
    censored: set[int] = set()
    expected: dict[int, dict[str, float]] = {}
    raw_gnq: dict[int, np.ndarray] = {}
    for step in range(5):
        B = 0 if step == 2 else 12
        idx = torch.randperm(N, generator=gen)[:B]
        gnq = torch.exp(2 * torch.randn(B, generator=gen, dtype=torch.float64))
        weights = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (B,), generator=gen)]
        ledger.update(idx, gnq, step)
        for i, g in zip(idx.tolist(), gnq.tolist(), strict=True):
            ref_bound[i] = ref_bound.get(i, 0.0) + 0.5 * math.log(1 + g)
            ref_steps[i] = ref_steps.get(i, 0) + 1
            ref_max[i] = max(ref_max.get(i, 0.0), g)
        if B:
            over = idx[gnq > 5.0]
            ledger.censor(over)
            censored.update(over.tolist())
        lam = 1e-2 * (1 + step)  # a relative λ varies per step
        sink.log_step(step, gnq=gnq, weights=weights if B else None, ledger=ledger,
                      lam=torch.tensor(lam, dtype=torch.float64),
                      policy_stats={"threshold": 5.0})
        g, w = gnq.numpy(), weights.numpy()
        raw_gnq[step] = g
        bounds = list(ref_bound.values())
        e = {"disclosure/max": max(bounds), "disclosure/mean": float(np.mean(bounds)),
             "policy/dropped": float(np.sum(w == 0)),
             "policy/clipped": float(np.sum((w > 0) & (w < 1))),
             "policy/censored_total": float(len(censored)), "lam": lam,
             "policy/threshold": 5.0}
        if B:
            e.update({"gnq/mean": float(np.mean(g)), "gnq/p50": float(np.percentile(g, 50)),
                      "gnq/p95": float(np.percentile(g, 95)), "gnq/max": float(np.max(g))})
        expected[step] = e

    members = torch.rand(30, generator=gen, dtype=torch.float64) + 0.6  # in (0.6, 1.6)
    nonmembers = torch.rand(20, generator=gen, dtype=torch.float64).numpy() * 0.5  # in (0, .5)
    result = FakeCurvatureResult(members_mean=float(members.mean()),
                                 nonmembers_mean=float(nonmembers.mean()), auc=1.0,
                                 seconds=0.25, member_scores=members,
                                 nonmember_scores=nonmembers, direction="higher",
                                 estimator="hutchinson")
    sink.log_curvature(4, result)
    sink.log_curvature(5, result)  # the direction note is written only once
    sink.log_top_table(5, ledger)
    top = sorted(ref_bound, key=lambda i: (-ref_bound[i], i))[:5]
    sink.close(hparams={"policy": "drop", "lam": 1e-2, "relative_lam": True, "budget": None,
                        "device": torch.device("cpu")},
               metrics={"final/accuracy": 0.875})
    sink.close()  # idempotent
    return {"steps": expected, "gnq": raw_gnq, "members": members.numpy(), "nonmembers": nonmembers,
            "top": [(i, ref_steps[i], ref_bound[i], ref_max[i], i in censored) for i in top]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tb") / "run"
    expected = write_run(log_dir)
    return log_dir, load(log_dir), expected


def test_step_scalars_equal_independent_values(run):
    _, acc, expected = run
    tags = set(acc.Tags()["scalars"])
    for name in [*STEP_SCALARS, "policy/threshold"]:
        assert f"gradguard/{name}" in tags, name
    for step, values in expected["steps"].items():
        for name, value in values.items():
            got = scalar(acc, f"gradguard/{name}")
            assert step in got, (name, step)
            # Scalars are stored as float32.
            assert got[step] == pytest.approx(value, rel=2e-7, abs=1e-30), (name, step)
    # The empty batch (step 2) logged no GNQ statistics but did log the ledger's state.
    assert 2 not in scalar(acc, "gradguard/gnq/mean")
    assert 2 in scalar(acc, "gradguard/disclosure/max")


def test_gnq_histogram_is_of_log10_gnq(run):
    log_dir, acc, expected = run
    assert "gradguard/gnq/log10_GNQ" in acc.Tags()["histograms"]
    hists = {e.step: e.histogram_value for e in acc.Histograms("gradguard/gnq/log10_GNQ")}
    assert sorted(hists) == [0, 1, 3, 4]
    for step, h in hists.items():
        g = expected["gnq"][step]
        assert h.num == 12
        assert h.max == pytest.approx(np.log10(g.max()), rel=1e-12)
        assert h.sum == pytest.approx(np.log10(g).sum(), rel=1e-12)


def test_curvature_scalars_histograms_and_pr_curve(run):
    _, acc, expected = run
    members, nonmembers = expected["members"], expected["nonmembers"]
    for name in CURVATURE_SCALARS:
        assert sorted(scalar(acc, f"gradguard/{name}")) == [4, 5]
    assert scalar(acc, "gradguard/curvature/members_mean")[4] == pytest.approx(
        members.mean(), rel=2e-7)
    assert scalar(acc, "gradguard/curvature/nonmembers_mean")[4] == pytest.approx(
        nonmembers.mean(), rel=2e-7)
    assert scalar(acc, TAGS["curvature_seconds"])[5] == 0.25
    hists = {tag: acc.Histograms(TAGS[f"curvature_{tag}_hist"]) for tag in
             ("members", "nonmembers")}
    assert hists["members"][0].histogram_value.num == members.size
    assert hists["nonmembers"][0].histogram_value.sum == pytest.approx(nonmembers.sum())

    pr = acc.Tensors(TAGS["curvature_pr"])
    assert [e.step for e in pr] == [4, 5]
    # Rows: TP, FP, TN, FN, precision, recall over thresholds i / (T - 1).
    data = np.array(pr[0].tensor_proto.float_val).reshape(6, -1)
    T = data.shape[1]
    # Independent expectation: members score higher, predictions are ranks / (n - 1), and
    # TensorBoard counts a prediction p as positive at threshold i when floor(p·(T−1)) >= i.
    scores = np.concatenate([members, nonmembers])
    ranks = np.empty(scores.size)
    ranks[np.argsort(scores)] = np.arange(scores.size)
    buckets = np.floor(ranks / (scores.size - 1) * (T - 1))
    is_member = np.arange(scores.size) < members.size
    tp = [np.sum(is_member & (buckets >= i)) for i in range(T)]
    fp = [np.sum(~is_member & (buckets >= i)) for i in range(T)]
    np.testing.assert_array_equal(data[0], tp)
    np.testing.assert_array_equal(data[1], fp)
    # The populations are separable, so some threshold keeps every member and no non-member.
    assert any(t == members.size and f == 0 for t, f in zip(tp, fp, strict=True))


def test_direction_note_written_once(run):
    _, acc, _ = run
    notes = text_of(acc, TAGS["curvature_attack_text"])
    assert len(notes) == 1
    step, note = notes[0]
    assert step == 4
    assert "higher" in note and "hutchinson" in note and "label 1 = training member" in note


def test_top_table_lists_reference_indices(run):
    _, acc, expected = run
    (step, table), = text_of(acc, "gradguard/top_disclosing")
    assert step == 5
    rows = [line for line in table.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert len(rows) == 5
    for line, (index, steps, bound, max_gnq, cens) in zip(rows, expected["top"], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[1]) == index
        assert int(cells[2]) == steps
        # 3 significant digits (whole numbers from 1000 up).
        assert len(cells[3].replace(".", "").lstrip("0")) <= 4
        assert float(cells[3]) == pytest.approx(bound, rel=5e-3, abs=0.5)
        assert float(cells[4]) == pytest.approx(max_gnq, rel=5e-3, abs=0.5)
        assert cells[5] == ("yes" if cens else "no")
    assert "Gaussian" in table and "independently" in table and "nats" in table


def test_custom_scalars_layout_covers_documented_tags(run):
    _, acc, _ = run
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    patterns = [tag for cat in layout.category for chart in cat.chart
                for tag in chart.multiline.tag]
    written = set(acc.Tags()["scalars"]) | {"gradguard/policy/dropped_total"}
    # Custom scalars reads tags as regular expressions: each matches exactly one tag.
    for pattern in patterns:
        assert [t for t in written if re.search(pattern, t)] in ([], [pattern[1:-1].replace(
            "\\", "")]), pattern
    wanted = {f"gradguard/{t}" for t in [*STEP_SCALARS, *CURVATURE_SCALARS]
              if t != "probe/seconds"}
    assert wanted <= {t for t in written if any(re.search(p, t) for p in patterns)}
    titles = [c.title for c in layout.category]
    # What matters most comes first: GNQ, disclosure, policy, then curvature.
    assert [t.split("·")[1].split()[0] for t in titles[:4]] == ["GNQ", "disclosure", "policy",
                                                                "curvature"]
    # Per-step and cumulative policy counts never share a chart (different scales).
    for cat in layout.category:
        for chart in cat.chart:
            tags = set(chart.multiline.tag)
            per_step = tags & {TAGS["dropped"], TAGS["clipped"]}
            assert not (per_step and TAGS["censored_total"] in tags)
    assert list(LAYOUT) == titles


def test_hparams_land_in_the_same_run(run):
    log_dir, acc, _ = run
    assert [p for p in os.listdir(log_dir) if os.path.isdir(os.path.join(log_dir, p))] == []
    plugin = {v.tag: plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
              for _, v in raw_summaries(log_dir)
              if v.metadata.plugin_data.plugin_name == "hparams"}
    start = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert start["policy"].string_value == "drop"
    assert start["lam"].number_value == 0.01
    assert start["relative_lam"].bool_value is True
    assert start["device"].string_value == "cpu"
    assert start["budget"].string_value == "none"  # unset reads "none", never 0.0
    exp = plugin["_hparams_/experiment"].experiment
    types = {h.name: api_pb2.DataType.Name(h.type) for h in exp.hparam_infos}
    assert types == {"policy": "DATA_TYPE_STRING", "lam": "DATA_TYPE_FLOAT64",
                     "relative_lam": "DATA_TYPE_BOOL", "device": "DATA_TYPE_STRING",
                     "budget": "DATA_TYPE_STRING"}
    assert [m.name.tag for m in exp.metric_infos] == ["gradguard/final/accuracy"]
    assert scalar(acc, "gradguard/final/accuracy") == {5: 0.875}
    assert "_hparams_/session_end_info" in plugin


def test_default_hparams_metrics_are_logged_scalars(tmp_path):
    ledger = DisclosureLedger(4)
    ledger.update(torch.tensor([1, 2]), torch.tensor([1.0, 3.0]), step=0)
    sink = TensorBoardSink(tmp_path)
    sink.log_step(0, gnq=torch.tensor([1.0, 3.0]), weights=None, ledger=ledger, lam=0.01)
    sink.close(hparams={"policy": "monitor"})
    exp = [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
           for _, v in raw_summaries(tmp_path) if v.tag == "_hparams_/experiment"]
    tags = [m.name.tag for m in exp[0].experiment.metric_infos]
    assert tags == ["gradguard/disclosure/max", "gradguard/disclosure/mean", "gradguard/gnq/p95",
                    "gradguard/policy/censored_total"]
    acc = load(tmp_path)
    assert scalar(acc, "gradguard/policy/dropped") == {0: 0.0}
    assert scalar(acc, "gradguard/disclosure/max")[0] == pytest.approx(0.5 * math.log(4.0))


def test_generic_helpers_prefix_tags_and_close_stops_logging(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.log_scalars({"custom/x": torch.tensor(2.5), "gradguard/custom/y": 1}, step=3)
    sink.log_text("notes", "hello **world**", step=3)
    sink.close()
    sink.log_scalars({"custom/x": 9.0}, step=4)  # after close: ignored, no error
    acc = load(tmp_path)
    assert scalar(acc, "gradguard/custom/x") == {3: 2.5}
    assert scalar(acc, "gradguard/custom/y") == {3: 1.0}
    assert text_of(acc, "gradguard/notes") == [(3, "hello **world**")]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_k"):
        TensorBoardSink("unused", top_k=0)
    with pytest.raises(ValueError, match="flush_secs"):
        TensorBoardSink("unused", flush_secs=0)


def test_weights_shape_mismatch_raises(tmp_path):
    sink = TensorBoardSink(tmp_path)
    with pytest.raises(ValueError, match="one value per GNQ value"):
        sink.log_step(0, gnq=torch.ones(3), weights=torch.ones(2), ledger=DisclosureLedger(3),
                      lam=0.01)
    sink.close()


@pytest.mark.parametrize(("direction", "sign"), [("higher", 1), ("lower", -1)])
def test_attack_sign_is_the_probes_own(direction, sign):
    from gradguard.curvature import ProbeResult

    result = ProbeResult(step=0, estimator="zo", direction=direction,
                         member_indices=torch.arange(2), nonmember_indices=torch.arange(2),
                         member_scores=torch.rand(2), nonmember_scores=torch.rand(2),
                         members_mean=0.0, nonmembers_mean=0.0, auc=0.5, seconds=0.0)
    assert _attack_sign(result) == result.sign == sign
    assert _attack_sign(types.SimpleNamespace(direction=direction)) == sign


@pytest.mark.parametrize("direction", ["sideways", "members_higher", None, 1.0])
def test_a_direction_the_probe_cannot_state_raises(direction):
    with pytest.raises(ValueError, match="'higher' or 'lower'"):
        _attack_sign(types.SimpleNamespace(direction=direction))


def test_lower_direction_flips_pr_curve(tmp_path):
    members = np.array([0.1, 0.2, 0.3])  # members have LOWER curvature here
    nonmembers = np.array([0.7, 0.8])
    result = FakeCurvatureResult(0.2, 0.75, 1.0, 0.1, torch.from_numpy(members), nonmembers,
                                 "lower", "fd")
    sink = TensorBoardSink(tmp_path)
    sink.log_curvature(0, result)
    sink.close()
    acc = load(tmp_path)
    data = np.array(acc.Tensors(TAGS["curvature_pr"])[0].tensor_proto.float_val)
    tp, fp = data.reshape(6, -1)[:2]
    # Signed by the direction, the members are the top 3 of 5 ranks.
    assert any(t == 3 and f == 0 for t, f in zip(tp, fp, strict=True))
    assert "lower" in text_of(acc, TAGS["curvature_attack_text"])[0][1]


def _recorded(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning)
            and "TensorBoard" in str(w.message)]


def drive(sink, ledger):
    sink.log_step(1, gnq=torch.ones(2), weights=None, ledger=ledger, lam=0.01)
    sink.log_step(2, gnq=torch.ones(2), weights=None, ledger=ledger, lam=0.01)
    sink.log_top_table(2, ledger)
    sink.log_text("x", "y", 2)
    sink.log_scalars({"a": 1.0}, 2)
    sink.close(hparams={"a": 1}, metrics={"m": 1.0})


def test_uncreatable_log_dir_warns_once_and_never_raises(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    log_dir = blocker / "run"  # os.makedirs fails even for root
    ledger = DisclosureLedger(2)
    ledger.update(torch.tensor([0, 1]), torch.ones(2), step=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink = TensorBoardSink(log_dir)
        drive(sink, ledger)
    (w,) = _recorded(caught)
    assert str(log_dir) in str(w.message) and "training continues" in str(w.message)
    assert not sink.active and sink.error is not None


def test_writer_failing_mid_run_warns_once(tmp_path, monkeypatch):
    ledger = DisclosureLedger(2)
    ledger.update(torch.tensor([0, 1]), torch.ones(2), step=0)
    sink = TensorBoardSink(tmp_path)
    sink.log_step(0, gnq=torch.ones(2), weights=None, ledger=ledger, lam=0.01)
    writer = sink._writer

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "add_scalar", broken)
    monkeypatch.setattr(writer, "add_text", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive(sink, ledger)
    (w,) = _recorded(caught)
    assert str(tmp_path) in str(w.message) and "No space left" in str(w.message)
    # What was written before the failure is still readable.
    assert scalar(load(tmp_path), "gradguard/gnq/mean") == {0: 1.0}


def test_failure_on_close_warns_once(tmp_path, monkeypatch):
    sink = TensorBoardSink(tmp_path)

    def broken():
        raise OSError("read-only file system")

    monkeypatch.setattr(sink._writer, "flush", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.close()
        sink.close()
    assert len(_recorded(caught)) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory_warns_once(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        ledger = DisclosureLedger(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sink = TensorBoardSink(ro / "run")
            drive(sink, ledger)
        assert len(_recorded(caught)) == 1
    finally:
        ro.chmod(0o700)


def test_hparams_dashboard_sees_one_session_per_run(tmp_path):
    """TensorBoard's own HParams backend finds the session in the sink's run directory."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins.hparams import backend_context, list_session_groups

    ledger = DisclosureLedger(4)
    ledger.update(torch.tensor([0, 3]), torch.tensor([1.0, 3.0]), step=0)
    sink = TensorBoardSink(tmp_path / "run_a")
    sink.log_step(0, gnq=torch.tensor([1.0, 3.0]), weights=None, ledger=ledger, lam=0.01)
    sink.close(hparams={"policy": "clip", "relative_lam": False}, metrics={"acc": 0.5})

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()

    tb_context = types.SimpleNamespace(
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path)),
        logdir=str(tmp_path), flags=None)

    request = api_pb2.ListSessionGroupsRequest(
        experiment_name="", start_index=0, slice_size=10,
        allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_UNKNOWN])
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", request).run()
    (group,) = response.session_groups
    assert [s.name for s in group.sessions] == ["run_a"]
    assert group.hparams["policy"].string_value == "clip"
    assert group.hparams["relative_lam"].bool_value is False
    assert group.hparams["relative_lam"].WhichOneof("kind") == "bool_value"
    (metric,) = group.metric_values
    assert metric.name.tag == "gradguard/acc" and metric.value == 0.5


def test_edge_cases_nonfinite_gnq_empty_ledger_and_one_sided_probe(tmp_path):
    sink = TensorBoardSink(tmp_path)
    ledger = DisclosureLedger(3)
    sink.log_top_table(0, ledger)  # nothing seen yet
    gnq = torch.tensor([1.0, float("nan"), 3.0, float("inf")], dtype=torch.float64)
    sink.log_step(1, gnq=gnq, weights=torch.ones(4), ledger=ledger, lam=0.01)
    result = FakeCurvatureResult(1.0, float("nan"), float("nan"), 0.1,
                                 torch.tensor([1.0, float("nan"), 1.0]), np.zeros(0), "higher",
                                 "zo")
    sink.log_curvature(2, result)
    sink.close()
    acc = load(tmp_path)
    assert scalar(acc, "gradguard/gnq/mean") == {1: 2.0}
    assert scalar(acc, "gradguard/gnq/max") == {1: 3.0}
    assert scalar(acc, "gradguard/gnq/nonfinite") == {1: 2.0}
    assert acc.Histograms("gradguard/gnq/log10_GNQ")[0].histogram_value.num == 2
    assert "no example seen yet" in text_of(acc, "gradguard/top_disclosing")[0][1]
    tags = acc.Tags()
    assert acc.Histograms(TAGS["curvature_members_hist"])[0].histogram_value.num == 2
    assert TAGS["curvature_nonmembers_hist"] not in tags["histograms"]
    assert TAGS["curvature_pr"] not in tags["tensors"]  # needs both populations


_FULL_DISK_SCRIPT = r"""
import resource, signal, sys, time, warnings
import torch
from gradguard.ledger import DisclosureLedger
from gradguard.tensorboard import TensorBoardSink

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
warnings.simplefilter("always")
ledger = DisclosureLedger(64)
sink = TensorBoardSink(sys.argv[1], flush_secs=0.01)
for step in range(60):
    gnq = torch.rand(64, dtype=torch.float64) * 100
    ledger.update(torch.arange(64), gnq, step)
    sink.log_step(step, gnq=gnq, weights=None, ledger=ledger, lam=0.01)
    time.sleep(0.03)
sink.close(hparams={"policy": "monitor"})
print("training went on:", sink.error is not None)
"""


def test_a_full_disk_warns_once_without_a_thread_traceback(tmp_path):
    """A real write failure (file size limit, as on a full disk) in the writer thread."""
    import subprocess
    import sys

    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "training went on: True" in result.stdout
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr
    assert result.stderr.count("gradguard: writing TensorBoard logs") == 1, result.stderr


def test_log_comparison_writes_one_hparams_session_per_row(tmp_path):
    from gradguard.tensorboard import log_comparison

    rows = [{"name": "no defence", "defence": "none", "budget": None, "acc": 0.97, "auc": 0.61},
            {"name": "gnq-drop q=0.9", "defence": "gnq-drop", "budget": 6.5, "acc": 0.95,
             "auc": float("nan")}]
    dirs = log_comparison(tmp_path, rows, hparams=["defence", "budget"], metrics=["acc", "auc"])
    assert [os.path.basename(d) for d in dirs] == ["no_defence", "gnq-drop_q_0.9"]
    for d, row in zip(dirs, rows, strict=True):
        plugin = {v.tag: plugin_data_pb2.HParamsPluginData.FromString(
            v.metadata.plugin_data.content) for _, v in raw_summaries(d)
            if v.metadata.plugin_data.plugin_name == "hparams"}
        start = plugin["_hparams_/session_start_info"].session_start_info.hparams
        assert start["defence"].string_value == row["defence"]
        budget = start["budget"]
        assert (budget.string_value == "none" if row["budget"] is None
                else budget.number_value == row["budget"])
        exp = plugin["_hparams_/experiment"].experiment
        assert [m.name.tag for m in exp.metric_infos] == ["gradguard/compare/acc",
                                                          "gradguard/compare/auc"]
        acc = load(d)
        assert scalar(acc, "gradguard/compare/acc") == {0: pytest.approx(row["acc"])}
        if math.isnan(row["auc"]):  # a non-finite metric is left out, never written as NaN
            assert "gradguard/compare/auc" not in acc.Tags()["scalars"]
    (_, table), = text_of(load(tmp_path), "gradguard/compare/table")
    assert "| no defence | none | – | 0.970 | 0.610 |" in table
    assert "| gnq-drop q=0.9 | gnq-drop | 6.50 | 0.950 | – |" in table


def test_log_comparison_rejects_unnamed_or_duplicate_rows(tmp_path):
    from gradguard.tensorboard import log_comparison

    with pytest.raises(ValueError, match="has no 'name'"):
        log_comparison(tmp_path, [{"acc": 1.0}], hparams=[], metrics=["acc"])
    with pytest.raises(ValueError, match="distinct"):
        log_comparison(tmp_path, [{"name": "a b"}, {"name": "a_b"}], hparams=[], metrics=["x"])
