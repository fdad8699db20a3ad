"""The ``gradguard`` command line: help, errors and exit codes, end-to-end runs, reports.

Tiny settings throughout. The torchvision path runs on a fake MNIST written here in the
on-disk idx format torchvision reads.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradguard.cli import build_parser, main

# rdp: Opacus calibrates the noise for a target ε several times faster than with prv.
TINY_ARGS = ["--accountant", "rdp", "--epochs", "1", "--batch-size", "32", "--max-examples", "240",
             "--canaries", "4", "--shadows", "4", "--epsilons", "8", "--drop", "q=0.9",
             "--clip", "q=0.5", "--probes", "1", "--probe-examples", "8",
             "--curvature-vectors", "1", "--seeds", "0"]


@pytest.fixture(scope="module")
def compare_out(tmp_path_factory):
    """One real ``python -m gradguard.cli compare`` run, through the entry point."""
    out = tmp_path_factory.mktemp("cli") / "cmp"
    result = subprocess.run([sys.executable, "-m", "gradguard.cli", "compare", *TINY_ARGS,
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    return result, out


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


# --------------------------------------------------------------------------- help and errors


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "compare", "report"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.dest)


@pytest.mark.parametrize("command", ["demo", "compare", "report"])
def test_help_exits_zero_and_lists_the_options(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text, flag


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["demo", "--help"],
                                  ["report", "--help"]])
def test_help_and_version_import_no_torch(argv):
    # A fresh interpreter: this test process has long imported torch itself.
    code = "\n".join([
        "import sys", "from gradguard.cli import main", "try:", f"    main({argv!r})",
        "except SystemExit as e:", "    assert e.code == 0, e.code",
        "heavy = [m for m in ('torch', 'sklearn', 'opacus', 'matplotlib') if m in sys.modules]",
        "print('HEAVY', heavy)"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_version_names_the_package_version(capsys):
    import gradguard

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradguard {gradguard.__version__}"


@pytest.mark.parametrize("command", ["demo", "compare", "report"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in re.split(r"\s(?=--?[a-z])", text):
        assert option.count("default") <= 1, option
    assert "(default: None)" not in text


@pytest.mark.parametrize("argv, fragment", [
    (["compare", "--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["compare", "--epochs", "two"], "must be an integer"),
    (["compare", "--delta", "2"], "--delta: must be in (0, 1)"),
    (["compare", "--lr", "-0.1"], "--lr: must be a number > 0"),
    (["compare", "--momentum", "1"], "must be in [0, 1)"),
    (["compare", "--epsilons", "8", "nan"], "finite number"),
    (["compare", "--drop", "q=2"], "q must be in (0, 1)"),
    (["compare", "--clip", "budget=p0"], "0 < P <= 100"),
    (["compare", "--shadows", "2"], "at least 4"),
    (["compare", "--model", "vgg"], "invalid choice: 'vgg'"),
    (["compare", "--dataset", "mnist"], "give --data-dir DIR"),
    (["compare", "--dataset", "cifar10", "--data-dir", "/no/such/dir"], "is not a directory"),
    (["compare", "--data-dir", "."], "only used with --dataset"),
    (["compare", "--no-baseline", "--drop", "budget=p90"], "keep the baseline row"),
    (["compare", "--shadows", "0", "--attacks", "lira_online"], "need shadow models"),
    (["report"], "RUN_DIR"),
    (["report", "/no/such/run"], "is not a directory"),
    (["report", ".", "--top-k", "0"], "--top-k: must be an integer >= 1"),
    ([], "COMMAND"),
])
def test_bad_command_lines_exit_2_with_a_clear_message(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_report_of_a_directory_without_runs_fails_with_exit_1(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no guarded run" in err and "--debug" in err and "Traceback" not in err
    assert main(["report", str(tmp_path), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# --------------------------------------------------------------------------- compare


def test_compare_end_to_end_prints_the_table_and_writes_parsable_files(compare_out):
    result, out = compare_out
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["no defence", "dp-sgd ε=8", "gnq-drop q=0.9", "gnq-clip q=0.5"]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(names)
    for name, line in zip(names, table[1:]):
        assert line.startswith(f"| {name} |")
    assert f"tensorboard --logdir {out / 'tb'}" in result.stdout
    assert "LiRA shadow model" in result.stderr  # the progress line
    with open(out / "results.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == names
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["n_shadows"] == 4 and doc["split"]["n_train"] == 96
    import matplotlib.image

    for path in out.glob("*.png"):
        assert matplotlib.image.imread(path).ndim == 3
    assert sorted(p.name for p in (out / "tb").iterdir()) == [
        "clip_q0.5", "dpsgd_eps8", "drop_q0.9", "none"]


def test_compare_refuses_to_overwrite_without_the_flag(compare_out, capsys):
    _, out = compare_out
    assert main(["compare", *TINY_ARGS, "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- report


def _html_images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_report_of_a_comparison(compare_out, tmp_path, capsys):
    result, out = compare_out
    assert result.returncode == 0
    target = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(target), "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert str(target / "report.html") in printed
    # The summary table: one row per run, in row order.
    assert [line.split()[0] for line in printed.splitlines()[2:6]] == [
        "none", "dpsgd_eps8", "drop_q0.9", "clip_q0.5"]
    md = (target / "report.md").read_text()
    html = (target / "report.html").read_text()
    # The comparison table comes first, then one section per row, in row order.
    for name in ("none", "dpsgd_eps8", "drop_q0.9", "clip_q0.5"):
        assert f"Run `{name}`" in md and f"Run <code>{name}</code>" in html
    assert md.index("Run `none`") < md.index("Run `dpsgd_eps8`") < md.index("Run `clip_q0.5`")
    assert "<table>" in html and "no defence" in html
    images = _html_images(html)
    assert len(images) >= 8
    import matplotlib.image

    for data in images:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (target / link).is_file() or (out / Path(link).name).is_file(), link
    # The top table lists the ledger's most-disclosing indices, recomputed from the state.
    state = torch.load(out / "tb" / "none" / "gradguard_state.pt", weights_only=True)
    bounds = state["ledger"]["cum_bound"].numpy()
    expected = np.argsort(-bounds, kind="stable")[:5].tolist()
    section = md[md.index("Run `none`"):md.index("Run `dpsgd_eps8`")]
    listed = [int(m) for m in re.findall(r"^\| \d+ \| (\d+) \|", section, flags=re.M)]
    assert listed == expected
    assert "not a DP guarantee" in section


def test_report_of_a_single_guarded_run(tmp_path):
    from gradguard.engine import GradGuard

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    run = tmp_path / "run"
    guard = GradGuard(policy="monitor", log_dir=str(run), log_every=1)
    model, optimizer, loader = guard.make_guarded(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader)
    for _ in range(2):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    guard.close()
    expected = guard.ledger.top(3)
    assert main(["report", str(run), "--top-k", "3"]) == 0
    md = (run / "report.md").read_text()
    listed = [int(m) for m in re.findall(r"^\| \d+ \| (\d+) \|", md, flags=re.M)]
    assert listed == [r["index"] for r in expected]
    assert "GNQ per step" in md or "gnq.png" in md
    assert len(_html_images((run / "report.html").read_text())) >= 2


# --------------------------------------------------------------------------- torchvision data


def _write_fake_mnist(root: Path, *, n_train: int = 60, n_test: int = 20) -> None:
    """torchvision's MNIST layout: uncompressed idx files under root/MNIST/raw/."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes())


def test_compare_on_a_fake_torchvision_mnist(tmp_path, capsys):
    _write_fake_mnist(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["compare", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--accountant", "rdp",
                 "--model", "cnn", "--epochs", "1", "--batch-size", "16", "--canaries", "4",
                 "--shadows", "0", "--epsilons", "8", "--drop", "q=0.9", "--clip",
                 "--probes", "1", "--probe-examples", "4", "--curvature-vectors", "1",
                 "--seeds", "0", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads((out / "results.json").read_text())
    assert doc["split"]["name"] == "mnist" and doc["split"]["input_shape"] == [1, 28, 28]
    assert doc["split"]["n_train"] == 30 and doc["split"]["n_test"] == 20
    assert [r["name"] for r in doc["rows"]] == ["no defence", "dp-sgd ε=8", "gnq-drop q=0.9"]
    assert doc["attacks"] == ["loss", "curvature"]


def test_missing_files_in_the_data_directory_fail_with_exit_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["compare", "--dataset", "fashionmnist", "--data-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "FashionMNIST" in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "out").exists()  # nothing written before the data was found


# --------------------------------------------------------------------------- demo


def test_demo_runs_its_preset_and_reruns_in_place(tmp_path, monkeypatch, capsys):
    import gradguard.experiments.compare as compare

    real = compare.demo_config

    def tiny_demo(out_dir="runs/demo", **overrides):
        # The demo's rows, at test size.
        return real(out_dir, max_examples=120, epochs=1, canaries=4, probes=1,
                    probe_examples=8, curvature_vectors=1, accountant="rdp", **overrides)

    monkeypatch.setattr(compare, "demo_config", tiny_demo)
    out = tmp_path / "demo"
    for _ in range(2):  # the second run replaces the first without --overwrite
        assert main(["demo", "--out", str(out), "--quiet"]) == 0
        stdout = capsys.readouterr().out
        assert f"tensorboard --logdir {out / 'tb'}" in stdout
        rows = [line for line in stdout.splitlines() if line.startswith("| ")]
        names = [r.split("|")[1].strip() for r in rows[1:]]
        # A legend under the table explains every abbreviated column it has.
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        for column in ("test acc", "DP ε", "best ε_lb", "dropped / clipped"):
            assert column in header and f"\n{column}: " in stdout, column
        assert "\n<attack> AUC: " in stdout
        assert names[:3] == ["no defence", "dp-sgd ε=8", "gnq-drop q=0.9"]
        assert re.fullmatch(r"gnq-drop budget=p90 \([0-9.e+-]+ nats\)", names[3]), names[3]
    assert sorted(p.name for p in (out / "tb").iterdir()) == [
        "dpsgd_eps8", "drop_budgetp90", "drop_q0.9", "none"]
