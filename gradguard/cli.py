"""The ``gradguard`` command line: ``demo``, ``compare`` and ``report``.

``gradguard --help`` and ``--version`` import neither torch nor the experiment harness: the
``compare`` options (whose defaults and choices come from the harness) are only built when
the command line names ``compare``.

Exit codes: 0 on success, 2 for a bad command line (argparse's convention: a bad option
value, a missing ``--data-dir``), 1 when the work itself fails (the message goes to stderr;
``--debug`` adds the traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_FILE_DATASETS = ("mnist", "fashionmnist", "cifar10")


# --------------------------------------------------------------------------- value types


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _momentum(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _delta(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), e.g. 1e-5, got {text!r}")
    return value


def _policy_spec(text: str) -> str:
    from gradguard.experiments.compare import parse_policy_spec

    try:
        parse_policy_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _shadows(text: str) -> int:
    value = _nonnegative_int(text)
    if 0 < value < 4:
        raise argparse.ArgumentTypeError(
            f"must be 0 (no LiRA) or at least 4 (LiRA fits each example's in and out "
            f"confidences from two or more shadow models each), got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r} asked for a GPU but torch sees none: use cpu or auto")
    return text


# --------------------------------------------------------------------------- parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults once and keep the descriptions' line breaks.

    No "(default: …)" is added where the help already says what the default is, nor for a
    default of None (the help then says what leaving the option out means).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is False:
            return text
        return super()._get_help_string(action)


#: Meaning of each column of the comparison table (compare.markdown_table), printed under it.
TABLE_LEGEND = {
    "test acc": "accuracy on the held-out test set",
    "DP ε": "the privacy accountant's ε for DP-SGD rows (δ as set); ∞ (none): no DP guarantee",
    "<attack> AUC": "membership-inference attack's ROC AUC (0.5 = chance); curv. = input-loss "
                    "curvature, LiRA-on/-off = LiRA with online/offline shadow models",
    "best TPR@1%FPR": "strongest attack's true-positive rate at a 1% false-positive rate "
                      "[its Clopper-Pearson 95% interval]",
    "chance best-of-k": "what the best of these k attacks reaches on shuffled membership "
                        "labels (permutation mean [95th percentile]): a best TPR inside it is "
                        "indistinguishable from chance",
    "best ε_lb": "empirical lower bound on ε implied by the strongest attack",
    "one-run ε_lb": "one-run audit (Steinke et al. 2023): ε lower bound from fair-coin "
                    "canaries, 95% confidence; its ceiling is set by the number of canaries",
    "canary AUC": "strongest attack's AUC on the planted canaries",
    "canaries fit (m/h)": "share of member / held-out canaries whose planted label the model "
                          "predicts",
    "max bound (nats)": "largest per-example cumulative GNQ bound Σ½ln(1+GNQ), a monitoring "
                        "signal, not a DP guarantee",
    "dropped / clipped": "example-steps the GNQ policy dropped / down-weighted",
    "time (s)": "wall time of the row (training, probes and attacks)",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device, default="cpu",
                        help="where to train and attack: cpu, cuda, cuda:N, or auto (a GPU if "
                             "torch sees one)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads torch may use in this process (default: torch's "
                             "choice, usually the number of cores)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line on stderr (the table is still printed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous comparison in the output directory (its "
                             "results files and its whole tb/ folder)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when something fails")


def build_parser(*, compare_options: bool = True) -> argparse.ArgumentParser:
    """The ``gradguard`` argument parser (subcommands demo, compare, report).

    Args:
        compare_options: add the ``compare`` subcommand's options, which import the
            experiment harness (torch, scikit-learn) for their defaults and choices. Without
            them ``--help``, ``--version``, ``demo`` and ``report`` parse as usual.
    """
    from gradguard import __version__

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="gradguard: a training-time privacy monitor for PyTorch (per-example "
                    "gradient uniqueness, input-curvature probes, GNQ-based censorship) and "
                    "its comparison against DP-SGD.",
        formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="a small comparison on the embedded digits (a minute or less on idle CPU cores, up "
             "to about 10 minutes when other jobs share them)",
        description="Run a small comparison on scikit-learn's embedded digits (no download): "
                    "no defence, DP-SGD at ε=8 (δ=1e-5), and GNQ drop at Quantile(0.9) and at "
                    "a budget (the 90th percentile of the undefended run's bounds); 8 LiRA "
                    "shadow models. Writes everything under --out, prints the table and the "
                    "tensorboard command to look at it. Re-running replaces the previous demo.")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--seed", type=_nonnegative_int, default=0,
                      help="seed of the split, weights, data order, DP noise and attacks")
    _add_common(demo)

    compare = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="GNQ censorship against DP-SGD and no defence, on equal terms",
        description="Train one model per defence (same split, initial weights, epochs, "
                    "optimizer and seed), attack each with membership inference (loss, input "
                    "curvature, LiRA online/offline) and report accuracy, attack metrics, canary "
                    "exposure, GNQ statistics and wall time. Writes results.csv, results.json, "
                    "results.md, privacy_utility.png, roc_<attack>[_log].png, scores.npz and one "
                    "TensorBoard run per row under OUT/tb.\n\nGNQ policy settings (--drop, "
                    "--clip) are comma-separated key=value pairs: q=Q (threshold = the "
                    "Q-quantile of this step's GNQ; window=W pools the last W steps, "
                    "default 1), tau=T (absolute GNQ threshold), budget=B (nats) or "
                    "budget=pP (the P-th percentile of the undefended run's final per-example "
                    "bounds). Example: --drop q=0.9 "
                    "budget=p90 --clip q=0.5")
    if compare_options:
        _add_compare_options(compare)
    _add_report(sub)
    return parser


def _add_compare_options(compare: argparse.ArgumentParser) -> None:
    from gradguard.experiments.compare import ATTACKS, PRESETS, ComparisonConfig
    from gradguard.experiments.data import CANARY_KINDS, DATASET_NAMES
    from gradguard.experiments.models import MODEL_NAMES

    defaults = ComparisonConfig()
    data = compare.add_argument_group("data and model")
    data.add_argument("--dataset", default=defaults.dataset,
                      choices=DATASET_NAMES,
                      help="digits is scikit-learn's embedded copy (no files); the others are "
                           "read by torchvision from --data-dir and never downloaded")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="torchvision root folder (DIR/MNIST/raw/, DIR/FashionMNIST/raw/ or "
                           "DIR/cifar-10-batches-py/); required for mnist, fashionmnist, cifar10")
    data.add_argument("--max-examples", type=_positive_int, default=None, metavar="N",
                      help="use a random subsample of at most N rows of a large dataset")
    data.add_argument("--model", default=defaults.model, choices=MODEL_NAMES,
                      help="mlp, a small CNN, or torchvision's ResNet-18 with GroupNorm")
    data.add_argument("--canaries", type=_nonnegative_int, default=defaults.canaries,
                      help="canaries to plant, half among the members and half in the holdout")
    data.add_argument("--canary-kind", default=defaults.canary_kind, choices=CANARY_KINDS,
                      help="mislabel: a real image with a wrong label; ood: uniform noise "
                           "with a random label")
    training = compare.add_argument_group("training (shared by every row)")
    training.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                          help="epochs of every row and every shadow model")
    training.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                          help="batch size (DP-SGD: expected size under Poisson sampling)")
    training.add_argument("--lr", type=_positive_float, default=defaults.lr,
                          help="SGD learning rate")
    training.add_argument("--momentum", type=_momentum, default=defaults.momentum,
                          help="SGD momentum")
    training.add_argument("--seeds", type=_nonnegative_int, nargs="+", default=[0, 1, 2],
                          metavar="SEED",
                          help="seed of the split, canaries, weights, data order, DP noise and "
                               "attacks; several seeds repeat the whole comparison once each "
                               "(OUT/seed_<s>/) and summarise mean ± 95%% interval in "
                               "OUT/results_over_seeds.md; one seed (--seeds 0) for smoke runs")
    training.add_argument("--preset", default="standard", choices=tuple(PRESETS),
                          help="named settings: standard; clean (no mislabelled examples, the "
                               "label-noise control); memorisation (360 members, 8%% "
                               "mislabelled, 512-wide MLP, 100 epochs) and memorisation-clean; "
                               "options set to non-default values override the preset")
    training.add_argument("--audit-canaries", type=_nonnegative_int,
                          default=defaults.audit_canaries,
                          help="one-run audit canaries (fair coins; 0: no one-run ε bound)")
    training.add_argument("--no-dp-search", action="store_true",
                          help="DP-SGD rows use the shared recipe instead of their own "
                               "validation-split search of lr, epochs and clipping norm")
    defences = compare.add_argument_group("defences (one row each)")
    defences.add_argument("--no-baseline", action="store_true",
                          help="leave out the undefended row (budget=pP settings need it)")
    defences.add_argument("--epsilons", type=_positive_float, nargs="*",
                          default=list(defaults.epsilons), metavar="EPS",
                          help="DP-SGD target ε values (none: no DP-SGD rows)")
    defences.add_argument("--delta", type=_delta, default=defaults.delta,
                          help="δ of DP-SGD and of the empirical ε lower bounds")
    defences.add_argument("--max-grad-norm", type=_positive_float,
                          default=defaults.max_grad_norm,
                          help="DP-SGD per-example clipping norm C")
    defences.add_argument("--accountant", default=defaults.accountant,
                          choices=("prv", "rdp", "gdp"), help="Opacus privacy accountant")
    defences.add_argument("--drop", type=_policy_spec, nargs="*", default=list(defaults.drop),
                          metavar="SPEC", help="GNQ drop settings (none: no drop rows)")
    defences.add_argument("--clip", type=_policy_spec, nargs="*", default=list(defaults.clip),
                          metavar="SPEC", help="GNQ clip settings (none: no clip rows)")
    defences.add_argument("--lam", type=_positive_float, default=defaults.lam,
                          help="GNQ ridge λ (absolute) of every guard")
    audit = compare.add_argument_group("attacks")
    audit.add_argument("--attacks", nargs="+", choices=ATTACKS, default=None,
                       help="attacks to run (default: all; LiRA only with --shadows > 0)")
    audit.add_argument("--shadows", type=_shadows, default=defaults.n_shadows,
                       help="LiRA shadow models (0 disables LiRA)")
    audit.add_argument("--curvature-estimator", default=defaults.curvature_estimator,
                       choices=("zo", "fd", "hutchinson"),
                       help="input-curvature estimator of the curvature attack and probes "
                            "(zo: black box, forward passes only)")
    audit.add_argument("--curvature-vectors", type=_positive_int,
                       default=defaults.curvature_vectors,
                       help="random vectors per example for curvature estimates")
    audit.add_argument("--probes", type=_nonnegative_int, default=defaults.probes,
                       help="curvature probes during each training run (0: none)")
    audit.add_argument("--probe-examples", type=_positive_int, default=defaults.probe_examples,
                       help="members and non-members scored by each probe")
    compare.add_argument("--out", default="runs/compare", help="output directory")
    _add_common(compare)


def _add_report(sub: Any) -> None:
    report = sub.add_parser(
        "report", formatter_class=_Formatter,
        help="markdown and HTML summary of a guarded run or a comparison",
        description="Summarise a guarded run (the log_dir GradGuard.close() wrote: summary.json, "
                    "gradguard_state.pt, event files) or every row of a comparison's output "
                    "directory: the most-disclosing example indices with their bounds (never "
                    "example contents), GNQ, disclosure and curvature over training, and plots. "
                    "Writes report.md (figures in report_files/) and a self-contained "
                    "report.html.")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a GradGuard log_dir, or the --out directory of compare/demo")
    report.add_argument("--out", default=None,
                        help="where to write the report (default: RUN_DIR)")
    report.add_argument("--top-k", type=_positive_int, default=20,
                        help="rows of each most-disclosing-examples table")
    report.add_argument("--debug", action="store_true",
                        help="show the full traceback when something fails")


# --------------------------------------------------------------------------- commands


def _config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from gradguard.experiments.compare import PRESETS, ComparisonConfig, demo_config

    if args.command == "demo":
        return demo_config(out_dir=args.out, seed=args.seed, device=args.device)
    if args.dataset in _FILE_DATASETS:
        if args.data_dir is None:
            parser.error(f"--dataset {args.dataset} is read from files: give --data-dir DIR, "
                         "the torchvision root folder that holds them (gradguard never "
                         "downloads data; --dataset digits needs no files)")
        if not os.path.isdir(args.data_dir):
            parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    elif args.data_dir is not None:
        parser.error("--data-dir is only used with --dataset mnist, fashionmnist or cifar10")
    config = ComparisonConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, seed=args.seeds[0],
        max_examples=args.max_examples, canaries=args.canaries, canary_kind=args.canary_kind,
        baseline=not args.no_baseline, epsilons=tuple(args.epsilons), delta=args.delta,
        max_grad_norm=args.max_grad_norm, accountant=args.accountant, drop=tuple(args.drop),
        clip=tuple(args.clip), lam=args.lam, n_shadows=args.shadows,
        attacks=tuple(args.attacks) if args.attacks else None,
        curvature_estimator=args.curvature_estimator, curvature_vectors=args.curvature_vectors,
        probes=args.probes, probe_examples=args.probe_examples, device=args.device,
        out_dir=args.out, audit_canaries=args.audit_canaries, dp_search=not args.no_dp_search)
    # The preset replaces settings left at their defaults; explicit options win.
    defaults = ComparisonConfig()
    preset = {key: value for key, value in PRESETS[args.preset].items()
              if getattr(config, key) == getattr(defaults, key)}
    config = dataclasses.replace(config, **preset)
    try:
        config.validate()
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return config


def _run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gradguard.experiments.compare import markdown_table, run_repeated

    config = _config_from_args(args, parser)
    overwrite = args.overwrite or args.command == "demo"
    seeds = getattr(args, "seeds", [config.seed])
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct, got {seeds}")
    start = time.perf_counter()
    rows = run_repeated(config, seeds, progress=not args.quiet, overwrite=overwrite)
    seconds = time.perf_counter() - start
    out = Path(config.out_dir)
    table = markdown_table(rows)
    print(table)
    print()
    print(_legend_for(table))
    print()
    if len(seeds) == 1:
        print(f"{len(rows)} rows in {seconds:.0f} s. Results: {out / 'results.md'} (table and "
              f"notes), results.csv, results.json, privacy_utility.png, roc_*.png in {out}/")
        print(f"Per-run report: gradguard report {out}")
        print(f"Look at it:     tensorboard --logdir {out / 'tb'}")
    else:
        print(f"{len(rows)} rows × {len(seeds)} seeds in {seconds:.0f} s (mean ± 95% interval). "
              f"Summary: "
              f"{out / 'results_over_seeds.md'} (.csv, .json), privacy_utility.png; each "
              f"seed's full results in {out}/seed_<s>/")
        print(f"Per-run report: gradguard report {out}")
        print(f"Look at it:     tensorboard --logdir {out}")
    return 0


def _legend_for(table: str) -> str:
    """The legend lines of the columns that ``table`` (a markdown table) has."""
    from gradguard.formatting import format_legend

    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    shown = {}
    for name, meaning in TABLE_LEGEND.items():
        if any(h == name or h.startswith(name + " ") for h in header) or (
                name == "<attack> AUC" and any(h.endswith(" AUC") and h != "canary AUC"
                                               for h in header)):
            shown[name] = meaning
    return format_legend(shown)


def _run_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gradguard.experiments.report import RUNS_TABLE_LEGEND, write_report
    from gradguard.formatting import format_legend

    if not os.path.isdir(args.run_dir):
        parser.error(f"RUN_DIR {args.run_dir!r} is not a directory")
    paths = write_report(args.run_dir, out_dir=args.out, top_k=args.top_k)
    print(paths["text"])
    print()
    print(format_legend(RUNS_TABLE_LEGEND))
    print()
    print(f"Wrote {paths['markdown']} (figures in report_files/)")
    print(f"Open in a browser: {paths['html']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradguard`` command line.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code (argparse exits with 2 itself on a bad command line).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(compare_options="compare" in argv)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "report":
            return _run_report(args, parser)
        return _run_compare(args, parser)
    except KeyboardInterrupt:
        print("gradguard: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line reports every failure plainly
        if debug:
            traceback.print_exc()
        print(f"gradguard {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        if not debug:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
