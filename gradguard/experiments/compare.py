"""GNQ censorship against DP-SGD: one experiment, every defence on equal terms.

Every row of the comparison trains the same model from the same initial weights
(``make_model(..., seed=seed)``) on the same member/holdout/test split for the same number
of epochs with the same optimizer recipe and, where the defence allows it, the same data
order (a seeded ``torch.Generator``). The rows differ only in the defence:

- ``none``: plain training;
- ``dp-sgd``: Opacus ``make_private_with_epsilon`` at a target ε (δ stated, Poisson
  sampling as the accountant assumes, so the data order is Poisson's), with the
  accountant's spent ε reported;
- ``gnq-drop``: GradGuard ``policy="drop"`` at a threshold (absolute, or a
  :class:`~gradguard.policies.Quantile` of the run's own recent GNQ) and/or a budget;
- ``gnq-clip``: GradGuard ``policy="clip"``.

A GradGuard is attached to every row (``policy="monitor"`` for ``none`` and ``dp-sgd``,
composed after Opacus' ``make_private_with_epsilon`` in hooks mode), so GNQ and the
disclosure ledger are measured the same way everywhere. For DP-SGD rows they describe the
update DP-SGD releases (clipped per-example gradients, the noise in the ridge; see
:mod:`gradguard.dp`), as they describe the applied update for the GNQ rows.

Each trained model is then attacked on members (the training set) against non-members
(the holdout set): loss threshold, input-loss curvature threshold (low curvature = member)
and LiRA, online and offline, with shadow models trained on random halves of
train ∪ holdout with the same recipe and no defence (the usual LiRA threat model; the
shadows are shared by all rows). Canaries planted by :func:`gradguard.experiments.data.load_dataset`
give a worst-case view: the same metrics restricted to member canaries against holdout
canaries.

Only numbers and dataset indices are written; never training examples.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "ATTACKS",
    "ComparisonConfig",
    "RowSpec",
    "Progress",
    "aggregate_rows",
    "demo_config",
    "paired_differences",
    "preset_config",
    "tune_dp_sgd",
    "markdown_table",
    "parse_policy_spec",
    "row_specs",
    "run_comparison",
    "run_repeated",
    "run_row",
    "train_shadows",
]

#: Attacks the comparison can run, in table order.
ATTACKS: tuple[str, ...] = ("loss", "curvature", "lira_online", "lira_offline")
_LIRA = ("lira_online", "lira_offline")
_ATTACK_LABELS = {"loss": "loss", "curvature": "curv.", "lira_online": "LiRA-on",
                  "lira_offline": "LiRA-off"}
_METRIC_KEYS = ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "advantage",
                "eps_lower_bound")
# LiRA's per-example Gaussian fits need at least two "in" and two "out" shadow models.
_MIN_SHADOWS = 4
AUDIT_CANARIES = 500
"""Default one-run audit canaries. With k = m/10 guesses each way (50 "in", 50 "out"), a
perfect attack certifies at most ε ≈ 3.5 at 95% confidence (δ = 1e-5): m = 500 keeps that
ceiling well above the ε = 1 DP-SGD target and the ~250 included canaries add about a
third to the 719 digits members (training time grows by as much)."""
_DP_SEARCH_GRID = {"lr": (0.5, 2.0), "max_grad_norm": (0.5, 2.0), "epochs": (0.5, 1.0)}
"""Multipliers of the shared recipe's lr, C and epochs tried by the DP-SGD search (8 runs)."""
_DP_VALIDATION_FRACTION = 0.2
_MIN_EXPOSED = 5
_CURVATURE_DIRECTION = "lower"
# Warnings Opacus raises on every run that say nothing about this experiment.
_NOISY_WARNINGS = (
    r"Secure RNG turned off",
    r"Optimal order is the (largest|smallest) alpha",
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
    r"Using a non-full backward hook",
)


# --------------------------------------------------------------------------- configuration


@dataclass
class ComparisonConfig:
    """Everything one comparison depends on; the rows share all of it.

    Args:
        dataset: ``"digits"`` (scikit-learn's embedded copy, no files), ``"mnist"``,
            ``"fashionmnist"`` or ``"cifar10"`` (read from ``data_dir``, never downloaded).
        data_dir: torchvision root folder for the file datasets.
        model: ``"mlp"``, ``"cnn"`` or ``"resnet18"`` (GroupNorm, per-example safe).
        epochs: training epochs of every row and every shadow model.
        batch_size: batch size (DP-SGD: the expected batch size of Poisson sampling).
        lr: SGD learning rate, shared by every row.
        momentum: SGD momentum.
        seed: seeds the split, the initial weights, the data order, DP noise and the
            attacks' random vectors.
        max_examples: subsample at most this many rows of a large dataset (keeps CPU runs
            short); None uses everything.
        canaries: canaries planted (half in train, half in holdout); 0 for none.
        canary_kind: ``"mislabel"`` or ``"ood"`` (see :mod:`gradguard.experiments.data`).
        baseline: include the undefended row (needed by ``budget=pN`` specs).
        epsilons: DP-SGD target ε, one row each.
        delta: δ of every DP-SGD row and of the empirical ε lower bounds. Default 1e-5,
            below 1/n for every dataset here (digits: n_train = 719, 1/n ≈ 1.4e-3).
        max_grad_norm: DP-SGD per-example clipping norm C.
        accountant: Opacus accountant (``"prv"``, ``"rdp"`` or ``"gdp"``).
        drop: GNQ drop settings, one row each (see :func:`parse_policy_spec`).
        clip: GNQ clip settings, one row each.
        lam: GNQ ridge λ (absolute) of every guard.
        n_shadows: LiRA shadow models (0 disables LiRA; otherwise at least 4).
        attacks: attacks to run; None means all of :data:`ATTACKS` that are possible
            (LiRA only with shadow models).
        curvature_estimator: ``"zo"`` (black box), ``"fd"`` or ``"hutchinson"``.
        curvature_vectors: random vectors per example of the curvature attack and probe.
        curvature_float64: run the curvature attack on a float64 copy of the model (the
            four-point differences of ``zo`` lose most digits in float32).
        probes: curvature probes during each guarded run (0: none).
        probe_examples: members and non-members per probe.
        audit_canaries: one-run audit canaries (Steinke et al. 2023), uniform-noise inputs
            with random labels, each added to every row's training set by its own fair coin
            (seeded by the seed); 0 for none. See :data:`AUDIT_CANARIES`.
        dp_search: tune each DP-SGD row's learning rate, epochs and clipping norm on a
            validation split carved from the members (never on test or attack data).
        hidden: hidden widths of the ``mlp`` (None: the builder's default).
        bootstrap: resamples of the paired bootstrap of ranking AUC differences.
        chance_permutations: label permutations for the chance level of "best of k attacks".
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``.
        out_dir: output directory.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    max_examples: int | None = None
    canaries: int = 20
    canary_kind: str = "mislabel"
    baseline: bool = True
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    drop: tuple[str, ...] = ("q=0.9", "q=0.75", "budget=p90")
    clip: tuple[str, ...] = ("q=0.5",)
    lam: float = 1e-2
    n_shadows: int = 16
    attacks: tuple[str, ...] | None = None
    curvature_estimator: str = "zo"
    curvature_vectors: int = 10
    curvature_float64: bool = True
    probes: int = 10
    probe_examples: int = 128
    audit_canaries: int = AUDIT_CANARIES
    dp_search: bool = True
    hidden: tuple[int, ...] | None = None
    bootstrap: int = 1000
    chance_permutations: int = 200
    device: str = "cpu"
    out_dir: str = "runs/compare"

    def __post_init__(self) -> None:
        self.epsilons = tuple(float(e) for e in self.epsilons)
        self.drop = tuple(self.drop)
        self.clip = tuple(self.clip)
        if self.attacks is not None:
            self.attacks = tuple(self.attacks)
        if self.hidden is not None:
            self.hidden = tuple(self.hidden)

    def validate(self) -> None:
        """Check every setting; raise a ValueError that names the fix.

        Raises:
            ValueError: a setting out of range or inconsistent with another.
            TypeError: a setting of the wrong type.
        """
        from gradguard.experiments.data import CANARY_KINDS, DATASET_NAMES
        from gradguard.experiments.models import MODEL_NAMES

        key = str(self.dataset).lower().replace("-", "").replace("_", "")
        if key not in DATASET_NAMES:
            raise ValueError(f"dataset must be one of {', '.join(DATASET_NAMES)}, got "
                             f"{self.dataset!r}")
        if key != "digits" and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} is read from files: set data_dir "
                             "(--data-dir DIR, the torchvision root folder); 'digits' needs "
                             "no files")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        for name in ("epochs", "batch_size", "curvature_vectors", "probe_examples"):
            _require_int(getattr(self, name), name, minimum=1)
        for name in ("canaries", "probes", "n_shadows", "seed", "audit_canaries", "bootstrap",
                     "chance_permutations"):
            _require_int(getattr(self, name), name, minimum=0)
        if self.max_examples is not None:
            _require_int(self.max_examples, "max_examples", minimum=2)
        for name in ("lr", "max_grad_norm", "lam"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {self.delta!r}")
        for eps in self.epsilons:
            if not math.isfinite(eps) or eps <= 0:
                raise ValueError(f"every DP-SGD target epsilon must be a finite number > 0, "
                                 f"got {eps!r}")
        if self.accountant not in ("prv", "rdp", "gdp"):
            raise ValueError(f"accountant must be 'prv', 'rdp' or 'gdp', got {self.accountant!r}")
        if self.canary_kind not in CANARY_KINDS:
            raise ValueError(f"canary_kind must be one of {CANARY_KINDS}, got "
                             f"{self.canary_kind!r}")
        if 0 < self.n_shadows < _MIN_SHADOWS:
            raise ValueError(f"n_shadows must be 0 (no LiRA) or at least {_MIN_SHADOWS}: LiRA "
                             f"fits each example's in/out confidences from at least two shadow "
                             f"models each; got {self.n_shadows}")
        if self.attacks is not None:
            unknown = [a for a in self.attacks if a not in ATTACKS]
            if unknown:
                raise ValueError(f"unknown attack(s) {unknown}: choose from {', '.join(ATTACKS)}")
            if not self.attacks:
                raise ValueError("attacks is empty: name at least one of " + ", ".join(ATTACKS))
            if self.n_shadows == 0 and any(a in _LIRA for a in self.attacks):
                raise ValueError("LiRA attacks need shadow models: set n_shadows >= "
                                 f"{_MIN_SHADOWS} or drop {', '.join(_LIRA)} from attacks")
        if self.curvature_estimator not in ("zo", "fd", "hutchinson"):
            raise ValueError(f"curvature_estimator must be 'zo', 'fd' or 'hutchinson', got "
                             f"{self.curvature_estimator!r}")
        _resolve_device(self.device)
        specs = row_specs(self)  # parses every drop/clip spec
        if not specs:
            raise ValueError("the comparison has no rows: enable the baseline or give "
                             "epsilons, drop or clip settings")
        if any(s.budget_percentile is not None for s in specs) and not self.baseline:
            raise ValueError("budget=pN sets the budget from the undefended run's ledger: "
                             "keep the baseline row, or give the budget in nats (budget=20)")
        slugs = [s.slug for s in specs]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"two rows have the same settings: {slugs}; remove the duplicate")

    def resolved_attacks(self) -> tuple[str, ...]:
        """The attacks that will run: :attr:`attacks`, or all possible ones."""
        if self.attacks is not None:
            return tuple(a for a in ATTACKS if a in self.attacks)
        return tuple(a for a in ATTACKS if self.n_shadows > 0 or a not in _LIRA)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of the settings."""
        out = dataclasses.asdict(self)
        out["attacks"] = list(self.resolved_attacks())
        return out


def demo_config(out_dir: str = "runs/demo", **overrides: Any) -> ComparisonConfig:
    """The ``gradguard demo`` preset: a small comparison on the embedded digits.

    Rows: no defence, DP-SGD at ε = 8 (δ = 1e-5), GNQ drop at ``Quantile(0.9)`` (each
    step drops examples above the 90th percentile of the last 50 steps' GNQ) and GNQ drop
    with a cumulative budget at the 90th percentile of the undefended run's final bounds;
    8 LiRA shadow models (the full comparison uses 16); 200 one-run audit canaries (20
    guesses each way: a perfect attack certifies at most ε ≈ 2.5); the DP-SGD row uses the
    shared recipe without its own search (``gradguard compare`` runs the search). One seed:
    the demo shows the outputs, ``gradguard compare`` gives the intervals.
    The settings were fixed before looking at any results, from what they mean (censor the
    most unique tenth), not tuned on the attack numbers.

    Args:
        out_dir: output directory.
        **overrides: any other :class:`ComparisonConfig` field.

    Returns:
        The configuration.
    """
    settings: dict[str, Any] = dict(epsilons=(8.0,), drop=("q=0.9", "budget=p90"), clip=(),
                                    n_shadows=8, probes=5, audit_canaries=200,
                                    dp_search=False, out_dir=out_dir)
    settings.update(overrides)
    return ComparisonConfig(**settings)


PRESETS: dict[str, dict[str, Any]] = {
    "standard": {},
    "clean": {"canaries": 0},
    "memorisation": {"max_examples": 900, "canaries": 58, "canary_kind": "mislabel",
                     "hidden": (512,), "epochs": 100},
    "memorisation-clean": {"max_examples": 900, "canaries": 0, "hidden": (512,), "epochs": 100},
}
"""Named settings of :class:`ComparisonConfig` (``gradguard compare --preset NAME``).

- ``standard``: the defaults (digits, 719 members, 10 mislabelled member canaries).
- ``clean``: the same without any mislabelled example: the control that tells label-noise
  filtering from privacy (a defence that "gains" accuracy only with mislabelled examples
  present is filtering noise). The one-run audit canaries (uniform noise) stay.
- ``memorisation``: a regime where models memorise: 900 digits (360 members), 29
  mislabelled members (8%), a 512-wide MLP, 100 epochs.
- ``memorisation-clean``: the same without mislabelled examples (its control).
"""


def preset_config(name: str, **overrides: Any) -> ComparisonConfig:
    """A :class:`ComparisonConfig` from a named preset (:data:`PRESETS`) and overrides.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: any other :class:`ComparisonConfig` field.

    Returns:
        The configuration.

    Example:
        >>> preset_config("memorisation").epochs
        100
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return ComparisonConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RowSpec:
    """One defence setting of the comparison.

    Attributes:
        defence: ``"none"``, ``"dp-sgd"``, ``"gnq-drop"`` or ``"gnq-clip"``.
        name: display name, e.g. ``"gnq-drop q=0.9"``.
        slug: file-system-safe name of the row's TensorBoard run.
        epsilon: DP-SGD target ε.
        threshold: a GNQ value, a :class:`~gradguard.policies.Quantile` or None.
        budget: cumulative budget in nats, or None.
        budget_percentile: the budget is this percentile of the undefended run's final
            bounds (resolved when the baseline has run).
        setting: the spec as given (``"q=0.9,budget=20"``).
        lr: this row's learning rate when it differs from the shared recipe (the DP-SGD
            search sets it); None uses ``config.lr``. Likewise ``epochs`` and
            ``max_grad_norm``.
    """

    defence: str
    name: str
    slug: str
    epsilon: float | None = None
    threshold: Any = None
    budget: float | None = None
    budget_percentile: float | None = None
    setting: str = ""
    lr: float | None = None
    epochs: int | None = None
    max_grad_norm: float | None = None

    @property
    def policy(self) -> str:
        return {"gnq-drop": "drop", "gnq-clip": "clip"}.get(self.defence, "monitor")


def parse_policy_spec(spec: str) -> dict[str, Any]:
    """Parse a GNQ policy setting such as ``"q=0.9"`` or ``"budget=p90"``.

    Comma-separated ``key=value`` pairs:

    - ``q=Q``: threshold τ = the Q-quantile (0 < Q < 1) of the run's recent GNQ values
      (``window=W`` steps, default 1: this step alone);
    - ``tau=T``: absolute GNQ threshold T > 0;
    - ``budget=B``: cumulative disclosure budget of B > 0 nats per example;
    - ``budget=pP``: budget = the P-th percentile (0 < P <= 100) of the undefended run's
      final per-example bounds (a training-time quantity; no test data involved).

    Args:
        spec: the setting.

    Returns:
        ``{"threshold": float | Quantile | None, "budget": float | None,
        "budget_percentile": float | None}``.

    Raises:
        ValueError: an unknown key, a bad value, or neither a threshold nor a budget.

    Example:
        >>> parse_policy_spec("q=0.9,budget=20")["budget"]
        20.0
    """
    from gradguard.policies import Quantile

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a GNQ policy setting must be a non-empty string such as 'q=0.9', "
                         f"'tau=100', 'budget=20' or 'budget=p90', got {spec!r}")
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise ValueError(f"bad GNQ policy setting {spec!r}: each part must be key=value "
                             "(keys q, window, tau, budget), e.g. 'q=0.9' or 'budget=p90'")
        if key not in ("q", "window", "tau", "budget"):
            raise ValueError(f"unknown key {key!r} in GNQ policy setting {spec!r}: use q "
                             "(quantile threshold), window, tau (absolute threshold) or budget")
        if key in fields:
            raise ValueError(f"{key!r} given twice in GNQ policy setting {spec!r}")
        fields[key] = value.strip()
    if "q" in fields and "tau" in fields:
        raise ValueError(f"GNQ policy setting {spec!r} has both q and tau: choose one threshold")
    if "window" in fields and "q" not in fields:
        raise ValueError(f"window only applies to a quantile threshold (q=...), in {spec!r}")
    threshold: Any = None
    if "q" in fields:
        q = _spec_float(fields["q"], "q", spec)
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1) (a quantile), got {q} in {spec!r}")
        window = 1  # the per-step quantile, as Quantile(q)
        if "window" in fields:
            try:
                window = int(fields["window"])
            except ValueError:
                raise ValueError(f"window must be an integer number of steps, got "
                                 f"{fields['window']!r} in {spec!r}") from None
            if window < 1:
                raise ValueError(f"window must be >= 1 step, got {window} in {spec!r}")
        threshold = Quantile(q, window=window)
    elif "tau" in fields:
        threshold = _spec_float(fields["tau"], "tau", spec)
        if not threshold > 0 or not math.isfinite(threshold):
            raise ValueError(f"tau must be a finite GNQ value > 0, got {threshold} in {spec!r}")
    budget = percentile = None
    if "budget" in fields:
        text = fields["budget"]
        if text.lower().startswith("p"):
            percentile = _spec_float(text[1:], "budget percentile", spec)
            if not 0 < percentile <= 100:
                raise ValueError(f"budget=pP needs 0 < P <= 100, got {text!r} in {spec!r}")
        else:
            budget = _spec_float(text, "budget", spec)
            if not budget > 0 or not math.isfinite(budget):
                raise ValueError(f"budget must be a finite number of nats > 0, got {budget} "
                                 f"in {spec!r}")
    if threshold is None and budget is None and percentile is None:
        raise ValueError(f"GNQ policy setting {spec!r} sets neither a threshold (q=, tau=) "
                         "nor a budget (budget=)")
    return {"threshold": threshold, "budget": budget, "budget_percentile": percentile}


def row_specs(config: ComparisonConfig) -> list[RowSpec]:
    """The rows of a comparison, in order: baseline, DP-SGD, GNQ drop, GNQ clip.

    Raises:
        ValueError: an unparseable drop/clip setting.
    """
    rows: list[RowSpec] = []
    if config.baseline:
        rows.append(RowSpec(defence="none", name="no defence", slug="none"))
    for eps in config.epsilons:
        rows.append(RowSpec(defence="dp-sgd", name=f"dp-sgd ε={eps:g}", slug=f"dpsgd_eps{eps:g}",
                            epsilon=float(eps), setting=f"eps={eps:g}"))
    for defence, specs in (("gnq-drop", config.drop), ("gnq-clip", config.clip)):
        for spec in specs:
            parsed = parse_policy_spec(spec)
            canonical = ",".join(p.strip() for p in spec.split(","))
            rows.append(RowSpec(defence=defence, name=f"{defence} {canonical}",
                                slug=f"{defence.split('-')[1]}_{_slugify(canonical)}",
                                setting=canonical, **parsed))
    return rows


# --------------------------------------------------------------------------- progress


class Progress:
    """A dependency-free progress line on stderr.

    On a terminal it redraws one line (bar, percentage, current stage, elapsed time and
    an estimate of what is left); otherwise it prints one line per stage.

    Args:
        total: units of work (epochs and attack passes).
        enabled: False makes every call a no-op.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None):
        self.total = max(1, int(total))
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.stage_text = ""
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def stage(self, text: str) -> None:
        """Start a named stage of the work."""
        self.stage_text = text
        if not self.enabled:
            return
        if self._tty:
            self._draw()
        else:
            print(f"[{self._percent():3d}%] {_clock(self._elapsed())} {text}", file=self.stream,
                  flush=True)

    def advance(self, units: int = 1, detail: str | None = None) -> None:
        """Count ``units`` of work as done; ``detail`` refines the current stage."""
        self.done = min(self.total, self.done + units)
        if self.enabled and self._tty:
            self._draw(detail)

    def close(self) -> None:
        """Finish the line."""
        if self.enabled and self._tty and self._width:
            print(file=self.stream, flush=True)
            self._width = 0

    def _elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _percent(self) -> int:
        return int(100 * self.done / self.total)

    def _draw(self, detail: str | None = None) -> None:
        elapsed = self._elapsed()
        filled = int(24 * self.done / self.total)
        bar = "#" * filled + "." * (24 - filled)
        left = ""
        if 0 < self.done < self.total:
            left = f", ~{_clock(elapsed * (self.total - self.done) / self.done)} left"
        text = self.stage_text + (f": {detail}" if detail else "")
        line = f"\r[{bar}] {self._percent():3d}% {_clock(elapsed)}{left} | {text}"
        pad = max(0, self._width - len(line))
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self._width = len(line)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- training


@dataclass
class ShadowSet:
    """LiRA shadow models' confidences on the population train ∪ holdout.

    Attributes:
        confidences: ``[S, N]`` logit-scaled confidences (members first, then holdout).
        in_mask: ``[S, N]`` bool, True where shadow s trained on example n.
        seconds: time spent training and scoring them.
    """

    confidences: torch.Tensor
    in_mask: torch.Tensor
    seconds: float


@dataclass
class _RowOutput:
    metrics: dict[str, Any]
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    bounds: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _resolve_device(device: str) -> torch.device:
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")\
            from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA but torch sees no GPU: use "
                         "--device cpu (or auto)")
    return resolved


def _loader(dataset: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    # Same seed, same order: every non-DP row sees the batches in the same sequence.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: TensorDataset, device: torch.device,
              limit: int | None = None, batch_size: int = 512) -> float:
    x, y = dataset.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.shape[0] == 0:
        return math.nan
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        correct += (model(xb).argmax(1) == yb).sum()
    model.train(was_training)
    return float(correct) / x.shape[0]


def _fit(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epochs: int,
         device: torch.device, on_epoch: Callable[[int, float], None] | None = None,
         progress: Progress | None = None) -> None:
    """The one training loop of every row and shadow: mean cross-entropy, one step a batch."""
    for epoch in range(epochs):
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for x, y in loader:
            if x.shape[0] == 0:
                # Poisson sampling can draw an empty batch; skipping it releases nothing.
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach() * x.shape[0]
            seen += x.shape[0]
        if on_epoch is not None:
            on_epoch(epoch, float(total) / max(seen, 1))
        if progress is not None:
            progress.advance(detail=f"epoch {epoch + 1}/{epochs}")


def _load_split(config: ComparisonConfig):
    from gradguard.experiments.data import load_dataset

    return load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                        canaries=config.canaries, canary_kind=config.canary_kind,
                        max_examples=config.max_examples)


def _population(split) -> tuple[torch.Tensor, torch.Tensor, int]:
    """train ∪ holdout, members first: the attacks' targets and LiRA's population."""
    xt, yt = split.train.tensors
    xh, yh = split.holdout.tensors
    return torch.cat([xt, xh]), torch.cat([yt, yh]), xt.shape[0]


def train_shadows(split, config: ComparisonConfig, *, device: torch.device | None = None,
                  progress: Progress | None = None) -> ShadowSet | None:
    """Train LiRA's shadow models on random halves of train ∪ holdout (no defence).

    Each example is in exactly half of the shadows (:func:`~gradguard.audit.attacks.
    shadow_masks`); each shadow uses the target's recipe (model, epochs, batch size,
    optimizer) with its own initial weights and data order.

    Args:
        split: the :class:`~gradguard.experiments.data.MembershipSplit`.
        config: the comparison's settings (``n_shadows`` of them; 0 returns None).
        device: where to train (default: ``config.device``).
        progress: optional progress line.

    Returns:
        The shadows' confidences and masks, or None without shadows.
    """
    from gradguard.audit.attacks import logit_confidence, shadow_masks

    if config.n_shadows == 0:
        return None
    device = device or _resolve_device(config.device)
    start = time.perf_counter()
    x, y, _ = _population(split)
    masks = shadow_masks(x.shape[0], config.n_shadows,
                         generator=torch.Generator().manual_seed(config.seed + 2))
    confidences = []
    for s in range(config.n_shadows):
        if progress is not None:
            progress.stage(f"LiRA shadow model {s + 1}/{config.n_shadows}")
        shadow_seed = config.seed + 1000 + s
        model = _make_model(config, split, seed=shadow_seed).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        members = masks[s]
        data = TensorDataset(x[members], y[members])
        _fit(model, _loader(data, config.batch_size, shadow_seed), optimizer,
             epochs=config.epochs, device=device, progress=progress)
        confidences.append(logit_confidence(model, x, y).detach().to("cpu", torch.float64))
    return ShadowSet(torch.stack(confidences), masks.cpu(), time.perf_counter() - start)


def run_row(spec: RowSpec, split, config: ComparisonConfig, *,
            shadows: ShadowSet | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train one defence setting, attack it, and return its flat result row.

    Args:
        spec: the row (see :func:`row_specs`); a ``budget=pN`` setting must already be
            resolved to nats (``dataclasses.replace(spec, budget=...)``).
        split: the :class:`~gradguard.experiments.data.MembershipSplit` every row shares.
        config: the comparison's settings.
        shadows: LiRA shadows from :func:`train_shadows` (needed for the LiRA attacks).
        progress: optional progress line.

    Returns:
        A flat dict of plain values: accuracy, per-attack membership metrics, canary
        exposure, GNQ statistics and timings (see :func:`run_comparison`).
    """
    return _run_row(spec, split, config, shadows=shadows, progress=progress).metrics


def _run_row(spec: RowSpec, split, config: ComparisonConfig, *, shadows: ShadowSet | None,
             progress: Progress | None) -> _RowOutput:
    from torch.utils.tensorboard import SummaryWriter

    from gradguard.curvature.probe import CurvatureProbe
    from gradguard.engine import GradGuard

    if spec.budget_percentile is not None and spec.budget is None:
        raise ValueError(f"row {spec.name!r}: resolve budget=p{spec.budget_percentile:g} to "
                         "nats first (run_comparison does it from the baseline's ledger)")
    device = _resolve_device(config.device)
    attacks = config.resolved_attacks()
    if shadows is None and any(a in _LIRA for a in attacks):
        raise ValueError("the LiRA attacks need shadow models: pass shadows=train_shadows(...)")
    run_dir = Path(config.out_dir) / "tb" / spec.slug
    wall_start = time.perf_counter()
    if progress is not None:
        progress.stage(f"training {spec.name}")

    lr = spec.lr or config.lr
    epochs = spec.epochs or config.epochs
    max_grad_norm = spec.max_grad_norm or config.max_grad_norm
    model = _make_model(config, split)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    canaries = audit_canaries(split, config)
    train_set = split.train if canaries is None else canaries.training_set(split.train)
    loader = _loader(train_set, config.batch_size, config.seed)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    privacy_engine = None
    row: dict[str, Any] = {"name": spec.name, "defence": spec.defence, "setting": spec.setting,
                           "eps_target": spec.epsilon, "eps_spent": None, "delta": None,
                           "noise_multiplier": None, "max_grad_norm": None,
                           "threshold": None if spec.threshold is None else str(spec.threshold),
                           "budget_nats": spec.budget, "lr": lr, "epochs": epochs}
    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        if spec.defence == "dp-sgd":
            from opacus import PrivacyEngine

            privacy_engine = PrivacyEngine(accountant=config.accountant)
            noise = torch.Generator(device=device).manual_seed(config.seed + 1)
            model, optimizer, loader = privacy_engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader,
                target_epsilon=spec.epsilon, target_delta=config.delta, epochs=epochs,
                max_grad_norm=max_grad_norm, grad_sample_mode="hooks",
                noise_generator=noise)
            row.update(delta=config.delta, noise_multiplier=float(optimizer.noise_multiplier),
                       max_grad_norm=max_grad_norm)
        probe = None
        if config.probes > 0:
            total_steps = steps_per_epoch * epochs
            probe = CurvatureProbe(split.train, split.holdout,
                                   every=max(1, total_steps // config.probes),
                                   n_examples=config.probe_examples,
                                   estimator=config.curvature_estimator,
                                   n_vectors=config.curvature_vectors, seed=config.seed,
                                   direction=_CURVATURE_DIRECTION)
        guard = GradGuard(policy=spec.policy, lam=config.lam, threshold=spec.threshold,
                          budget=spec.budget, log_dir=str(run_dir), curvature=probe,
                          num_examples=len(train_set),
                          log_every=max(1, min(10, steps_per_epoch)))
        model, optimizer, loader = guard.make_guarded(module=model, optimizer=optimizer,
                                                      data_loader=loader)
        # A second writer into the same directory: TensorBoard shows it as the same run, so
        # accuracy and attack results overlay across rows next to the guard's own tags.
        writer = SummaryWriter(log_dir=str(run_dir), filename_suffix=".compare")
        plain = _unwrap(model)
        eval_limit = 2000  # per-epoch curve on a fixed slice; the final number uses all
        epoch_losses: list[torch.Tensor] = []

        def on_epoch(epoch: int, train_loss: float) -> None:
            writer.add_scalar("compare/train_loss", train_loss, guard.step)
            writer.add_scalar("compare/test_accuracy",
                              _accuracy(plain, split.test, device, limit=eval_limit), guard.step)
            # The free baseline ranking: each member's loss at the end of every epoch.
            epoch_losses.append(_member_losses(plain, split, device))

        train_start = time.perf_counter()
        try:
            _fit(model, loader, optimizer, epochs=epochs, device=device,
                 on_epoch=on_epoch, progress=progress)
        except BaseException:
            writer.close()
            raise
        finally:
            guard.close()
        train_seconds = time.perf_counter() - train_start
        if privacy_engine is not None:
            row["eps_spent"] = float(privacy_engine.get_epsilon(config.delta))
    try:
        scores, bounds = _evaluate_row(row, plain, guard, split, config, attacks, shadows,
                                       device, progress)
        extra = _add_audit_metrics(row, plain, canaries, config, writer, guard.step)
        _add_ranking_metrics(row, plain, guard, split, scores, torch.stack(epoch_losses), config,
                             device)
        row.update(train_seconds=train_seconds, guard_seconds=guard.guard_seconds,
                   probe_seconds=guard.probe_seconds,
                   wall_seconds=time.perf_counter() - wall_start, run_dir=str(run_dir))
        _log_row(writer, row, attacks, guard.step)
    finally:
        writer.close()
    return _RowOutput(metrics=row, scores=scores, bounds=bounds, extra=extra)


def _evaluate_row(row: dict[str, Any], plain: nn.Module, guard, split, config: ComparisonConfig,
                  attacks: Sequence[str], shadows: ShadowSet | None, device: torch.device,
                  progress: Progress | None,
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Accuracy, attacks, canary exposure and GNQ statistics of a trained row."""
    row["test_accuracy"] = _accuracy(plain, split.test, device)
    row["train_accuracy"] = _accuracy(plain, split.train, device)

    if progress is not None:
        progress.stage(f"attacking {row['name']}")
    attack_start = time.perf_counter()
    scores = _attack_scores(plain, split, config, attacks, shadows, device)
    attack_seconds = time.perf_counter() - attack_start
    if progress is not None:
        progress.advance(detail="attacks done")

    _add_attack_metrics(row, scores, split, config)
    _add_chance_and_intervals(row, scores, config)
    _add_canary_metrics(row, plain, split, scores, device)
    _add_subgroup_curvature(row, scores, split)
    bounds = _add_guard_metrics(row, guard, split)
    row["attack_seconds"] = attack_seconds
    return scores, bounds


def _log_row(writer, row: Mapping[str, Any], attacks: Sequence[str], step: int) -> None:
    """The row's results as ``compare/*`` scalars at its last step, for overlays."""
    for key in ("test_accuracy", "train_accuracy", "best_auc", "best_tpr_at_1pct_fpr",
                "best_eps_lower_bound"):
        if _finite(row.get(key)):
            writer.add_scalar(f"compare/{key}", row[key], step)
    for attack in attacks:
        for metric in ("auc", "tpr_at_1pct_fpr"):
            writer.add_scalar(f"compare/{attack}/{metric}", row[f"{attack}_{metric}"], step)
    if row.get("eps_spent") is not None:
        writer.add_scalar("compare/dp_epsilon", row["eps_spent"], step)
    writer.add_text("compare/row", _row_text(row), step)


def _attack_scores(model: nn.Module, split, config: ComparisonConfig, attacks: Sequence[str],
                   shadows: ShadowSet | None,
                   device: torch.device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per attack: (member scores, non-member scores), higher = member."""
    from gradguard.audit.attacks import (
        curvature_attack,
        lira_offline,
        lira_online,
        logit_confidence,
        loss_attack_scores,
    )

    x, y, n_members = _population(split)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def store(name: str, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", torch.float64).numpy()
        out[name] = (values[:n_members], values[n_members:])

    if "loss" in attacks:
        store("loss", loss_attack_scores(model, x, y))
    if "curvature" in attacks:
        target = model
        inputs = x
        if config.curvature_float64:
            target = copy.deepcopy(model).to(torch.float64)
            inputs = x.to(torch.float64)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        store("curvature", curvature_attack(
            target, inputs.to(device), y.to(device), estimator=config.curvature_estimator,
            n_vectors=config.curvature_vectors, generator=generator,
            direction=_CURVATURE_DIRECTION, batch_size=256))
    if any(a in _LIRA for a in attacks):
        target_conf = logit_confidence(model, x, y).detach().to("cpu", torch.float64)
        if "lira_online" in attacks:
            store("lira_online", lira_online(target_conf, shadows.confidences, shadows.in_mask))
        if "lira_offline" in attacks:
            store("lira_offline", lira_offline(target_conf, shadows.confidences,
                                               in_mask=shadows.in_mask))
    return out


def _add_attack_metrics(row: dict[str, Any], scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                        split, config: ComparisonConfig) -> None:
    from gradguard.audit.metrics import mia_metrics

    best: dict[str, tuple[float, str]] = {}
    for attack, (members, nonmembers) in scores.items():
        metrics = mia_metrics(members, nonmembers, delta=config.delta)
        for key in _METRIC_KEYS:
            row[f"{attack}_{key}"] = metrics[key]
        row["eps_lb_confidence"] = metrics["eps_confidence"]
        for key in ("auc", "tpr_at_1pct_fpr", "eps_lower_bound", "advantage"):
            if key not in best or metrics[key] > best[key][0]:
                best[key] = (metrics[key], attack)
    for key, (value, attack) in best.items():
        row[f"best_{key}"] = value
        row[f"best_{key}_attack"] = attack


def _add_canary_metrics(row: dict[str, Any], model: nn.Module, split,
                        scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                        device: torch.device) -> None:
    """Exposure of the planted canaries: members' canaries against the holdout's."""
    from gradguard.audit.attacks import per_example_loss
    from gradguard.audit.metrics import roc_auc

    member_mask = split.train_canary_mask.numpy()
    holdout_mask = split.holdout_canary_mask.numpy()
    row["canaries_members"] = int(member_mask.sum())
    row["canaries_holdout"] = int(holdout_mask.sum())
    keys = [f"canary_{a}_auc" for a in scores] + [
        "canary_best_auc", "canary_loss_gap", "canary_fit_members", "canary_fit_holdout"]
    if not member_mask.any() or not holdout_mask.any():
        row.update(dict.fromkeys(keys))
        return
    for attack, (members, nonmembers) in scores.items():
        row[f"canary_{attack}_auc"] = roc_auc(members[member_mask], nonmembers[holdout_mask])
    row["canary_best_auc"] = max(row[f"canary_{a}_auc"] for a in scores)
    xt, yt = split.train.tensors
    xh, yh = split.holdout.tensors
    member_idx = torch.nonzero(split.train_canary_mask).flatten()
    holdout_idx = torch.nonzero(split.holdout_canary_mask).flatten()
    loss_m = per_example_loss(model, xt[member_idx], yt[member_idx]).double().mean()
    loss_h = per_example_loss(model, xh[holdout_idx], yh[holdout_idx]).double().mean()
    # Mean loss of unseen canaries minus that of trained-on ones: how much training on a
    # canary lowered its loss (0 = not memorised at all).
    row["canary_loss_gap"] = float(loss_h - loss_m)
    # Fraction predicted with their planted (wrong / random) label: memorisation, directly.
    row["canary_fit_members"] = _accuracy(model, TensorDataset(xt[member_idx], yt[member_idx]),
                                          device)
    row["canary_fit_holdout"] = _accuracy(model, TensorDataset(xh[holdout_idx], yh[holdout_idx]),
                                          device)


def _add_subgroup_curvature(row: dict[str, Any],
                            scores: Mapping[str, tuple[np.ndarray, np.ndarray]], split) -> None:
    """Curvature attack AUC ± DeLong SE on typical examples and on mislabelled canaries.

    The direction stays the one fixed in advance (low curvature = member); on mislabelled
    examples it may invert, which this shows rather than hides.
    """
    from gradguard.audit.metrics import roc_auc, roc_auc_standard_error

    keys = ("curvature_auc_typical", "curvature_auc_typical_se", "curvature_auc_mislabelled",
            "curvature_auc_mislabelled_se")
    row.update(dict.fromkeys(keys))
    if "curvature" not in scores:
        return
    members, nonmembers = scores["curvature"]
    member_mask = split.train_canary_mask.numpy()
    holdout_mask = split.holdout_canary_mask.numpy()
    groups = {"typical": (~member_mask, ~holdout_mask)}
    if split.canary_kind == "mislabel":
        groups["mislabelled"] = (member_mask, holdout_mask)
    for name, (in_mask, out_mask) in groups.items():
        if in_mask.any() and out_mask.any():
            row[f"curvature_auc_{name}"] = roc_auc(members[in_mask], nonmembers[out_mask])
            row[f"curvature_auc_{name}_se"] = roc_auc_standard_error(members[in_mask],
                                                                     nonmembers[out_mask])


def _add_guard_metrics(row: dict[str, Any], guard, split) -> np.ndarray:
    ledger = guard.ledger
    summary = guard.summary()
    n = len(split.train)  # ledger rows past n are one-run audit canaries
    bounds = ledger.cum_bound[:n].detach().to("cpu", torch.float64).numpy()
    seen = ledger.steps_seen[:n].detach().cpu().numpy() > 0
    top = ledger.top(10, by="cum_bound")
    mask = split.train_canary_mask.numpy()
    k = int(mask.sum())
    canaries_in_top = None
    if k:
        # Of the k most-disclosing examples, how many are the k member canaries.
        order = np.argsort(-np.where(seen, bounds, -np.inf), kind="stable")[:k]
        canaries_in_top = int(mask[order].sum())
    probe_auc = probe_auc_se = None
    if guard.curvature is not None and guard.curvature.history:
        probe_auc = guard.curvature.history[-1]["auc"]
        probe_auc_se = guard.curvature.history[-1].get("auc_se")
    row.update(
        gnq_max=summary["max_gnq"], gnq_max_bound=summary["max_bound"],
        gnq_mean_bound=summary["mean_bound"],
        gnq_mean_bound_canaries=float(bounds[mask].mean()) if k else None,
        canaries_in_top_bound=canaries_in_top,
        dropped_total=summary["dropped_total"], clipped_total=summary["clipped_total"],
        censored_total=summary["censored_total"], steps=summary["step"],
        top_indices=[int(r["index"]) for r in top],
        top_bounds=[float(r["cum_bound"]) for r in top],
        probe_auc_last=probe_auc, probe_auc_last_se=probe_auc_se,
    )
    return bounds[seen]


def _make_model(config: ComparisonConfig, split, *, seed: int | None = None) -> nn.Module:
    from gradguard.experiments.models import make_model

    kwargs = {"hidden": config.hidden} if config.hidden is not None else {}
    return make_model(config.model, split.input_shape, split.num_classes,
                      seed=config.seed if seed is None else seed, **kwargs)


def audit_canaries(split, config: ComparisonConfig):
    """The comparison's one-run audit canaries for ``config.seed`` (None without any).

    ``config.audit_canaries`` uniform-noise inputs over the data's value range with random
    labels (:meth:`~gradguard.audit.canaries.Canaries.out_of_distribution`): far from the
    real data, so they leave the member/holdout attacks and test accuracy nearly as they
    were. Every row of one seed gets the same canaries and coins; k_plus = k_minus = m/10.

    Args:
        split: the :class:`~gradguard.experiments.data.MembershipSplit`.
        config: the settings.

    Returns:
        A :class:`~gradguard.audit.canaries.Canaries`, or None.
    """
    from gradguard.audit.canaries import Canaries

    if config.audit_canaries == 0:
        return None
    x = split.train.tensors[0]
    return Canaries.out_of_distribution(
        m=config.audit_canaries, input_shape=split.input_shape, num_classes=split.num_classes,
        low=float(x.min()), high=float(x.max()) if float(x.max()) > float(x.min()) else 1.0,
        seed=config.seed + 3)


def _member_losses(model: nn.Module, split, device: torch.device) -> torch.Tensor:
    from gradguard.audit.attacks import per_example_loss

    x, y = split.train.tensors
    return per_example_loss(model, x.to(device), y.to(device)).detach().to("cpu", torch.float64)


def _add_audit_metrics(row: dict[str, Any], model: nn.Module, canaries,
                       config: ComparisonConfig, writer, step: int) -> dict[str, np.ndarray]:
    """One-run ε lower bound from the audit canaries (black-box loss scores)."""
    keys = ("one_run_eps_lb", "one_run_guesses", "one_run_correct", "audit_canaries",
            "audit_canaries_included")
    if canaries is None:
        row.update(dict.fromkeys(keys))
        return {}
    result = canaries.audit(model, delta=config.delta, writer=writer, step=step)
    row.update(one_run_eps_lb=result["eps_lower_bound"], one_run_guesses=result["guesses"],
               one_run_correct=result["correct"], audit_canaries=canaries.m,
               audit_canaries_included=int(canaries.included.sum()))
    return {"canaries__scores": canaries.scores(model).numpy(),
            "canaries__included": canaries.included.numpy()}


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for a rate (Clopper–Pearson).

    Args:
        successes: k.
        trials: n >= 1.
        confidence: coverage.

    Returns:
        ``(low, high)``.

    Example:
        >>> low, high = clopper_pearson(0, 100)
        >>> low, round(high, 4)
        (0.0, 0.0362)
    """
    from scipy.stats import beta

    alpha = (1 - confidence) / 2
    low = float(beta.ppf(alpha, successes, trials - successes + 1)) if successes > 0 else 0.0
    high = (float(beta.isf(alpha, successes + 1, trials - successes))
            if successes < trials else 1.0)
    return low, high


def chance_best_tpr(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], *, permutations: int,
                    seed: int, target_fpr: float = 0.01) -> tuple[float, float]:
    """Chance level of "best of k attacks" TPR at ``target_fpr``, by permutation.

    Membership labels are permuted across the pooled members and non-members, the same
    permutation for every attack (so the attacks keep their correlation), and the largest
    TPR at the target FPR over the attacks is recorded. Under this null no attack knows
    anything, so the draws show what "best of k" reaches by chance.

    Args:
        scores: per attack, (member scores, non-member scores).
        permutations: number of permutations.
        seed: seed of the permutations.
        target_fpr: the FPR.

    Returns:
        ``(mean, 95th percentile)`` of the best TPR under the null.
    """
    from gradguard.audit.metrics import roc_curve, tpr_at_fpr

    if not scores or permutations == 0:
        return math.nan, math.nan
    pooled = {a: np.concatenate(s) for a, s in scores.items()}
    n_members = len(next(iter(scores.values()))[0])
    rng = np.random.default_rng(seed)
    best = np.empty(permutations)
    for i in range(permutations):
        order = rng.permutation(len(next(iter(pooled.values()))))
        is_member = order < n_members
        best[i] = max(tpr_at_fpr(*roc_curve(v[is_member], v[~is_member])[:2], target_fpr)
                      for v in pooled.values())
    return float(best.mean()), float(np.percentile(best, 95))


def _add_chance_and_intervals(row: dict[str, Any],
                              scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                              config: ComparisonConfig) -> None:
    if not scores:
        return
    n_members = len(next(iter(scores.values()))[0])
    hits = int(round(row["best_tpr_at_1pct_fpr"] * n_members))
    low, high = clopper_pearson(hits, n_members)
    mean, p95 = chance_best_tpr(scores, permutations=config.chance_permutations,
                                seed=config.seed + 4)
    row.update(best_tpr_at_1pct_fpr_hits=hits, best_tpr_at_1pct_fpr_n=n_members,
               best_tpr_at_1pct_fpr_cp_low=low, best_tpr_at_1pct_fpr_cp_high=high,
               chance_best_tpr_at_1pct_fpr=mean, chance_best_tpr_at_1pct_fpr_p95=p95)


def _per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖∇θ ℓ(x_i, y_i)‖ of every example at the final weights (torch.func, eval mode)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    # About 2e8 gradient entries per chunk (0.8 GB in float32), whatever the model's size.
    chunk = max(1, min(256, int(2e8 // max(1, sum(p.numel() for p in params.values())))))
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    was_training = model.training
    model.eval()
    try:
        norms = []
        for start in range(0, x.shape[0], chunk):
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[start:start + chunk],
                                                            y[start:start + chunk])
            squared = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
            norms.append(squared.sqrt().detach().to("cpu", torch.float64))
    finally:
        model.train(was_training)
    return torch.cat(norms)


RANKERS = ("gnq", "mean_loss", "final_loss", "grad_norm")
"""Per-member rankings of "will leak", higher = more exposed (direction fixed in advance):
the ledger's cumulative GNQ bound, and three free baselines: the member's loss averaged
over the end-of-epoch evaluations, its final loss, its final gradient norm."""


def _add_ranking_metrics(row: dict[str, Any], model: nn.Module, guard, split,
                         scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                         epoch_losses: torch.Tensor, config: ComparisonConfig,
                         device: torch.device) -> None:
    """Does the ledger rank the members an attack exposes better than free baselines?

    Exposed = members the strongest available attack (LiRA online, else the loss attack)
    scores above its 1%-FPR threshold on the non-members. Each ranker's AUC at telling
    exposed from other members, and a paired bootstrap (members resampled) of
    AUC(gnq) − AUC(baseline); left empty with fewer than 5 exposed (or unexposed) members.
    """
    from gradguard.audit.metrics import roc_auc

    keys = [f"rank_auc_{r}" for r in RANKERS] + [
        f"rank_gnq_minus_{b}{s}" for b in RANKERS[1:] for s in ("", "_low", "_high")]
    row.update(dict.fromkeys(keys), rank_exposed=None, rank_attack=None)
    attack = "lira_online" if "lira_online" in scores else "loss" if "loss" in scores else None
    if attack is None:
        return
    members, nonmembers = scores[attack]
    threshold = np.quantile(nonmembers, 0.99, method="higher")
    exposed = members > threshold
    row.update(rank_exposed=int(exposed.sum()), rank_attack=attack)
    if min(exposed.sum(), (~exposed).sum()) < _MIN_EXPOSED:
        return  # an AUC over a handful of positives (and its bootstrap) would mean nothing
    n = len(split.train)
    x, y = split.train.tensors
    # A copy without the guard's and Opacus' hooks, which torch.func cannot trace through.
    hookless = _make_model(config, split).to(device)
    hookless.load_state_dict(model.state_dict())
    rankers = {
        "gnq": guard.ledger.cum_bound[:n].detach().to("cpu", torch.float64).numpy(),
        "mean_loss": epoch_losses.mean(0).numpy(),
        "final_loss": epoch_losses[-1].numpy(),
        "grad_norm": _per_example_grad_norms(hookless, x.to(device), y.to(device)).numpy(),
    }
    for name, values in rankers.items():
        row[f"rank_auc_{name}"] = roc_auc(values[exposed], values[~exposed])
    rng = np.random.default_rng(config.seed + 5)
    draws = {b: np.empty(config.bootstrap) for b in RANKERS[1:]}
    size = len(exposed)
    for i in range(config.bootstrap):
        pick = rng.integers(0, size, size)
        target = exposed[pick]
        if target.all() or not target.any():
            for b in draws:
                draws[b][i] = np.nan
            continue
        gnq = rankers["gnq"][pick]
        auc_gnq = roc_auc(gnq[target], gnq[~target])
        for b in draws:
            values = rankers[b][pick]
            draws[b][i] = auc_gnq - roc_auc(values[target], values[~target])
    for b, diffs in draws.items():
        diffs = diffs[np.isfinite(diffs)]
        row[f"rank_gnq_minus_{b}"] = row["rank_auc_gnq"] - row[f"rank_auc_{b}"]
        if diffs.size:
            row[f"rank_gnq_minus_{b}_low"] = float(np.percentile(diffs, 2.5))
            row[f"rank_gnq_minus_{b}_high"] = float(np.percentile(diffs, 97.5))


def tune_dp_sgd(split, config: ComparisonConfig, epsilon: float, *,
                device: torch.device | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    """DP-SGD's own small hyperparameter search, on a validation split of the members.

    A seeded fifth of the members is held out; every combination of
    :data:`_DP_SEARCH_GRID` (multipliers of the shared lr, clipping norm C and epochs) is
    trained with DP-SGD at ``epsilon`` on the other four fifths and scored by accuracy on
    the held-out fifth. Test data and attack results are never looked at. The search's own
    privacy cost is not accounted (as is usual; it would add to every DP-SGD row's ε). To
    keep it cheap the candidates' noise multiplier is calibrated once per epoch count with
    Opacus' RDP accountant, whose σ is slightly larger (more conservative) than PRV's.

    Args:
        split: the :class:`~gradguard.experiments.data.MembershipSplit`.
        config: the settings (its lr, max_grad_norm and epochs are the grid's centre).
        epsilon: the DP-SGD target ε.
        device: where to train.
        progress: optional progress line.

    Returns:
        ``{"lr", "max_grad_norm", "epochs", "val_accuracy", "candidates"}`` of the best
        candidate (ties: the first in grid order).
    """
    import itertools

    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    device = device or _resolve_device(config.device)
    x, y = split.train.tensors
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 6))
    n_val = max(1, round(_DP_VALIDATION_FRACTION * x.shape[0]))
    val = TensorDataset(x[order[:n_val]], y[order[:n_val]])
    fit = TensorDataset(x[order[n_val:]], y[order[n_val:]])
    best: dict[str, Any] | None = None
    grid = list(itertools.product(*_DP_SEARCH_GRID.values()))
    sample_rate = 1 / len(_loader(fit, config.batch_size, config.seed))
    noise: dict[int, float] = {}
    for i, (lr_mult, clip_mult, epoch_mult) in enumerate(grid):
        if progress is not None:
            progress.stage(f"DP-SGD ε={epsilon:g} search {i + 1}/{len(grid)}")
        candidate = {"lr": config.lr * lr_mult, "max_grad_norm": config.max_grad_norm * clip_mult,
                     "epochs": max(1, round(config.epochs * epoch_mult))}
        model = _make_model(config, split).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=candidate["lr"],
                                    momentum=config.momentum)
        with warnings.catch_warnings():
            for message in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            if candidate["epochs"] not in noise:
                noise[candidate["epochs"]] = get_noise_multiplier(
                    target_epsilon=epsilon, target_delta=config.delta, sample_rate=sample_rate,
                    epochs=candidate["epochs"], accountant="rdp")
            model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer,
                data_loader=_loader(fit, config.batch_size, config.seed),
                noise_multiplier=noise[candidate["epochs"]],
                max_grad_norm=candidate["max_grad_norm"], grad_sample_mode="hooks",
                noise_generator=torch.Generator(device=device).manual_seed(config.seed + 7))
            _fit(model, loader, optimizer, epochs=candidate["epochs"], device=device)
        candidate["val_accuracy"] = _accuracy(_unwrap(model), val, device)
        if best is None or candidate["val_accuracy"] > best["val_accuracy"]:
            best = candidate
    assert best is not None
    best["candidates"] = len(grid)
    return best


# --------------------------------------------------------------------------- the comparison


def run_comparison(config: ComparisonConfig, *, progress: bool = True, overwrite: bool = False,
                   stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Run every row of the comparison and write its outputs.

    Writes into ``config.out_dir``:

    - ``results.csv`` and ``results.json`` (settings, split sizes and canary indices, rows,
      environment, notes), ``results.md`` (the table and notes);
    - ``privacy_utility.png``: test accuracy against the strongest attack's TPR at 1% FPR
      and AUC;
    - ``roc_<attack>.png`` and ``roc_<attack>_log.png``: one curve per row;
    - ``scores.npz``: every attack's member and non-member scores per row (numbers only);
    - ``tb/<row>/``: one TensorBoard run per row (GradGuard's logs, ``summary.json`` and
      ``gradguard_state.pt``, plus ``compare/*`` accuracy and attack scalars).

    Args:
        config: the settings (validated first).
        progress: show a progress line on stderr.
        overwrite: replace a previous comparison in ``config.out_dir`` (its result files
            and its whole ``tb/`` folder, so TensorBoard shows no stale runs).
        stream: where the progress line goes (default ``sys.stderr``).

    Returns:
        One flat dict per row, in table order.

    Raises:
        ValueError: invalid settings (before any training starts).
        FileNotFoundError: a missing data directory or file.
        FileExistsError: ``config.out_dir`` holds a previous comparison and ``overwrite`` is
            False.
    """
    config.validate()
    device = _resolve_device(config.device)
    out = Path(config.out_dir)
    specs = row_specs(config)
    split = _load_split(config)  # fails on missing data before anything is written
    _prepare_out_dir(out, overwrite=overwrite)
    attacks = config.resolved_attacks()
    bar = Progress(len(specs) * (config.epochs + 1) + config.n_shadows * config.epochs,
                   enabled=progress, stream=stream)
    start = time.perf_counter()
    shadows = train_shadows(split, config, device=device, progress=bar)
    outputs: list[_RowOutput] = []
    baseline_bounds: np.ndarray | None = None
    try:
        for spec in specs:
            search = None
            if spec.defence == "dp-sgd" and config.dp_search:
                search = tune_dp_sgd(split, config, spec.epsilon, device=device, progress=bar)
                spec = dataclasses.replace(spec, lr=search["lr"], epochs=search["epochs"],
                                           max_grad_norm=search["max_grad_norm"])
            if spec.budget_percentile is not None:
                if baseline_bounds is None or baseline_bounds.size == 0:
                    raise RuntimeError("the baseline row did not record any bounds to set "
                                       f"{spec.setting!r} from")
                budget = float(np.percentile(baseline_bounds, spec.budget_percentile))
                spec = dataclasses.replace(spec, budget=budget)
            output = _run_row(spec, split, config, shadows=shadows, progress=bar)
            output.metrics["dp_search_val_accuracy"] = (
                search["val_accuracy"] if search is not None else None)
            if spec.defence == "none":
                baseline_bounds = output.bounds
            outputs.append(output)
    finally:
        bar.close()
    rows = [o.metrics for o in outputs]
    total_seconds = time.perf_counter() - start
    _write_outputs(out, config, split, rows, outputs, attacks, shadows, total_seconds)
    return rows


def run_repeated(config: ComparisonConfig, seeds: Sequence[int], *, progress: bool = True,
                 overwrite: bool = False, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Run the whole comparison once per seed and aggregate the rows: mean ± sd.

    One seed differs from another in everything the seed drives: the split, the initial
    weights, the data order, DP noise, the canaries and the attacks' random vectors. Single
    runs on small data are noisy (test accuracy on 539 digits has a binomial standard error
    of about 0.01), so differences between rows mean something only beside this spread.

    With one seed this is :func:`run_comparison` with ``config.seed`` set. With several,
    seed ``s`` writes a complete comparison to ``<out_dir>/seed_<s>/`` (TensorBoard:
    ``tensorboard --logdir <out_dir>`` overlays every row of every seed), and
    ``<out_dir>`` gets ``results_over_seeds.{csv,json,md}`` and
    ``privacy_utility.png`` (seed means).

    Args:
        config: the settings; ``config.seed`` is replaced by each seed.
        seeds: distinct seeds (ints >= 0).
        progress: show a progress line on stderr.
        overwrite: replace a previous comparison in ``config.out_dir``.
        stream: where the progress line goes.

    Returns:
        One dict per row: every numeric column's mean over the seeds under its own name and
        its sample standard deviation under ``<name>_sd``, plus ``n_seeds`` and ``seeds``.

    Raises:
        ValueError: bad seeds or settings.
        FileExistsError: a previous comparison and ``overwrite`` False.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    for seed in seeds:
        _require_int(seed, "seed", minimum=0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if len(seeds) == 1:
        return run_comparison(dataclasses.replace(config, seed=seeds[0]), progress=progress,
                              overwrite=overwrite, stream=stream)
    config.validate()
    out = Path(config.out_dir)
    _load_split(dataclasses.replace(config, seed=seeds[0]))  # missing data: fail before writing
    _prepare_out_dir(out, overwrite=overwrite)
    start = time.perf_counter()
    per_seed: list[list[dict[str, Any]]] = []
    for seed in seeds:
        if progress:
            print(f"seed {seed} ({len(per_seed) + 1}/{len(seeds)})", file=stream or sys.stderr,
                  flush=True)
        seed_config = dataclasses.replace(config, seed=seed, out_dir=str(out / f"seed_{seed}"))
        per_seed.append(run_comparison(seed_config, progress=progress, stream=stream))
    rows = aggregate_rows(per_seed)
    for row in rows:
        row["seeds"] = seeds
    _write_summary(out, config, seeds, rows, paired_differences(per_seed),
                   time.perf_counter() - start)
    return rows


def aggregate_rows(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of every numeric column, row by row.

    Args:
        per_seed: the rows of each seed's comparison, in the same row order.

    Returns:
        One dict per row: text columns from the first seed, numeric ones as the mean over
        the seeds where they are finite, ``<key>_sd`` (ddof=1; None with one value),
        ``<key>_ci95`` (half-width of the Student-t 95% interval of the mean,
        t_{0.975, n−1}·sd/√n) and ``n_seeds``. Where the rows carry the best attack's
        TPR@1%FPR hit counts, ``best_tpr_at_1pct_fpr_pooled_cp_low``/``_high`` is the
        Clopper–Pearson interval of the hits pooled over the seeds.

    Raises:
        ValueError: the seeds' comparisons have different rows.
    """
    names = [[r["name"] for r in rows] for rows in per_seed]
    if any(n != names[0] for n in names):
        raise ValueError(f"the seeds' comparisons have different rows: {names}")
    out = []
    for i, first in enumerate(per_seed[0]):
        group = [rows[i] for rows in per_seed]
        row: dict[str, Any] = {}
        for key, value in first.items():
            if key in ("name", "defence", "setting", "threshold") or not (
                    _is_number(value) or value is None):
                if isinstance(value, str) or value is None:
                    row[key] = value
                continue
            values = [g.get(key) for g in group]
            finite = [float(v) for v in values if _finite(v)]
            row[key] = float(np.mean(finite)) if finite else None
            row[f"{key}_sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
            row[f"{key}_ci95"] = _t_half_width(finite)
        hits = [g.get("best_tpr_at_1pct_fpr_hits") for g in group]
        trials = [g.get("best_tpr_at_1pct_fpr_n") for g in group]
        if all(_finite(h) for h in hits) and all(_finite(t) for t in trials):
            low, high = clopper_pearson(int(sum(hits)), int(sum(trials)))
            row["best_tpr_at_1pct_fpr_pooled_cp_low"] = low
            row["best_tpr_at_1pct_fpr_pooled_cp_high"] = high
        row["name"] = first["name"]
        row["n_seeds"] = len(group)
        row.pop("run_dir", None)
        out.append(row)
    return out


def _t_half_width(values: Sequence[float]) -> float | None:
    from scipy.stats import t

    if len(values) < 2:
        return None
    return float(t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


PAIRED_KEYS = ("test_accuracy", "best_tpr_at_1pct_fpr", "best_auc", "one_run_eps_lb")


def paired_differences(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each non-DP row minus the DP-SGD row closest to it in mean test accuracy, seed by seed.

    The same seed shares the split, the canaries and the initial weights between the two
    rows, so the per-seed differences are paired; their mean gets a Student-t 95% interval.

    Args:
        per_seed: the rows of each seed's comparison, in the same row order.

    Returns:
        One dict per non-DP row (empty without DP-SGD rows or with one seed): ``name``,
        ``versus`` (the matched DP-SGD row), ``n_seeds`` and for each of
        :data:`PAIRED_KEYS` the mean difference and ``<key>_ci95``.
    """
    if len(per_seed) < 2:
        return []
    first = per_seed[0]
    mean_acc = [np.mean([rows[i]["test_accuracy"] for rows in per_seed])
                for i in range(len(first))]
    dp = [i for i, r in enumerate(first) if r.get("defence") == "dp-sgd"]
    out = []
    for i, row in enumerate(first):
        if not dp or row.get("defence") == "dp-sgd":
            continue
        j = min(dp, key=lambda k: abs(mean_acc[k] - mean_acc[i]))
        diff: dict[str, Any] = {"name": row["name"], "versus": first[j]["name"],
                                "n_seeds": len(per_seed)}
        for key in PAIRED_KEYS:
            values = [rows[i].get(key) - rows[j].get(key) for rows in per_seed
                      if _finite(rows[i].get(key)) and _finite(rows[j].get(key))]
            diff[key] = float(np.mean(values)) if values else None
            diff[f"{key}_ci95"] = _t_half_width(values)
        out.append(diff)
    return out


def paired_table(diffs: Sequence[Mapping[str, Any]]) -> str:
    """:func:`paired_differences` as a markdown table (mean difference ± 95% interval)."""
    header = ["row", "versus (matched accuracy)", "Δ test acc", "Δ best TPR@1%FPR",
              "Δ best AUC", "Δ one-run ε_lb"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 4]
    for d in diffs:
        cells = [d["name"], d["versus"]] + [_pm(d.get(k), d.get(f"{k}_ci95"), signed=True)
                                            for k in PAIRED_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Does the ledger rank exposed members better than free baselines? (markdown)

    Per row: how many members the strongest attack exposes at 1% FPR, each ranker's AUC
    (:data:`RANKERS`), and AUC(gnq) − AUC(baseline) with its paired bootstrap 95% interval
    (single seed) or its mean ± Student-t interval over seeds.
    """
    header = ["row", "exposed", "GNQ AUC", "mean-loss AUC", "final-loss AUC", "grad-norm AUC",
              "GNQ − mean loss", "GNQ − final loss", "GNQ − grad norm"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        name = r["name"]
        if (r.get("n_seeds") or 1) > 1 and _finite(r.get("rank_auc_gnq")) and not _finite(
                r.get("rank_auc_gnq_ci95")):
            name += " (one seed only: the others exposed < 5 members)"
        cells = [name, _fmt(r.get("rank_exposed"), 0)]
        cells += [_pm(r.get(f"rank_auc_{k}"), r.get(f"rank_auc_{k}_ci95")) for k in RANKERS]
        for b in RANKERS[1:]:
            key = f"rank_gnq_minus_{b}"
            text = _pm(r.get(key), r.get(f"{key}_ci95"), signed=True)
            if _finite(r.get(f"{key}_low")) and not _finite(r.get(f"{key}_ci95")):
                text += f" [{r[f'{key}_low']:+.3f}, {r[f'{key}_high']:+.3f}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curvature_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Curvature attack AUC per subgroup and the last probe's AUC, with uncertainty (markdown).

    One seed: ± DeLong standard error. Over seeds: mean ± Student-t 95% interval.
    """
    header = ["row", "curv. AUC typical", "curv. AUC mislabelled canaries", "last probe AUC"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * 3]
    for r in rows:
        cells = [r["name"]]
        for key in ("curvature_auc_typical", "curvature_auc_mislabelled", "probe_auc_last"):
            spread = r.get(f"{key}_ci95") if _finite(r.get(f"{key}_ci95")) else r.get(
                f"{key}_se")
            cells.append(_pm(r.get(key), spread))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(value: Any, half_width: Any, *, signed: bool = False, digits: int = 3) -> str:
    if not _finite(value):
        return "–"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if _finite(half_width):
        text += f" ± {half_width:.{digits}f}"
    return text


def _write_summary(out: Path, config: ComparisonConfig, seeds: Sequence[int],
                   rows: list[dict[str, Any]], diffs: list[dict[str, Any]],
                   total_seconds: float) -> None:
    from gradguard._io import atomic_write_json, atomic_write_text
    from gradguard.experiments.plots import plot_privacy_utility

    device = _resolve_device(config.device)
    seed_list = ", ".join(map(str, seeds))
    notes = [f"Mean ± half-width of the Student-t 95% interval of the mean over {len(seeds)} "
             f"seeds ({seed_list}); each seed redraws the split, the canaries, the initial "
             "weights, the data order, DP noise and the attacks' random vectors. Per-seed "
             "results: seed_<s>/. best TPR@1%FPR: [pooled Clopper–Pearson 95% interval of the "
             "hits over all seeds' members]."]
    first = _read_json(out / f"seed_{seeds[0]}" / "results.json")
    notes += first.get("notes", [])
    _write_csv(out / "results_over_seeds.csv", rows)
    if diffs:
        _write_csv(out / "paired_differences.csv", diffs)
    doc = {"config": {**config.to_dict(), "seed": None}, "seeds": list(seeds),
           "rows": [_json_row(r) for r in rows], "attacks": first.get("attacks", []),
           "paired_differences": [_json_row(d) for d in diffs],
           "environment": _environment(device), "total_seconds": total_seconds,
           "notes": notes, "per_seed": [f"seed_{s}" for s in seeds]}
    atomic_write_json(out / "results_over_seeds.json", doc)
    atomic_write_text(out / "results_over_seeds.md", _document(rows, notes, diffs))
    plot_privacy_utility(
        [{"name": r["name"], "test_accuracy": r["test_accuracy"], "auc": r["best_auc"],
          "tpr_at_1pct_fpr": r["best_tpr_at_1pct_fpr"]} for r in rows],
        out / "privacy_utility.png",
        title=f"Privacy vs utility, mean of {len(seeds)} seeds: strongest attack per row")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


_OUTPUT_GLOBS = ("results.csv", "results.json", "results.md", "results_over_seeds.*",
                 "paired_differences.csv",
                 "privacy_utility.png", "roc_*.png", "scores.npz", "report.md",
                 "report.html")
_OUTPUT_DIRS = ("tb", "report_files", "seed_*")


def _prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    previous = out.is_dir() and (
        any((out / name).exists() for name in ("results.json", "results_over_seeds.json", "tb"))
        or any(p.is_dir() for p in out.glob("seed_*")))
    if previous and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a comparison (results.json, results_over_seeds.json, "
            "tb/ or seed_*/): pass --overwrite (overwrite=True) to replace it, or choose another "
            "output directory (--out)")
    if previous:
        import shutil

        for pattern in _OUTPUT_DIRS:
            for path in out.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path)
        for pattern in _OUTPUT_GLOBS:
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _environment(device: torch.device) -> dict[str, Any]:
    import opacus

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "opacus": opacus.__version__, "numpy": np.__version__,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(device)}
    try:
        from gradguard import __version__

        env["gradguard"] = __version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _notes(config: ComparisonConfig, split) -> list[str]:
    from gradguard.ledger import BOUND_ASSUMPTIONS

    n = len(split.train)
    return [
        f"Every row: {config.model} from the same initial weights (seed {config.seed}), "
        f"{config.epochs} epochs, batch {config.batch_size}, SGD lr {config.lr:g} momentum "
        f"{config.momentum:g}, on the same split ({n} members, {len(split.holdout)} holdout "
        f"non-members, {len(split.test)} test) of {split.name}.",
        f"DP-SGD: Opacus make_private_with_epsilon, Poisson sampling, δ={config.delta:g} "
        f"(1/n = {1 / n:.2g}); 'DP ε' is the {config.accountant} accountant's ε spent at that "
        "δ. " + (
            "Each DP-SGD row's lr, epochs and clipping norm C were chosen by its own search "
            "(lr and C ×0.5 / ×2, epochs ×0.5 / ×1 of the shared recipe) on a seeded fifth of "
            "the members held out as validation, never on test or attack data; the search's "
            "own privacy cost is not counted."
            if config.dp_search else
            f"Clipping norm C={config.max_grad_norm:g}, the shared recipe (no search)."),
        "Chance best-of-k: the best TPR@1%FPR over the attacks when membership labels are "
        f"permuted ({config.chance_permutations} permutations, the same for every attack): "
        "mean [95th percentile]. A best TPR inside that range is indistinguishable from "
        "chance. [CP 95%]: exact Clopper–Pearson interval of the best attack's TPR (chosen "
        "after the fact, so optimistic; compare it with the chance level).",
        (f"One-run ε_lb (Steinke, Nasr & Jagielski 2023): {config.audit_canaries} "
         "uniform-noise canaries with random labels, each added to training by its own fair "
         "coin; the loss of each canary under the trained model ranks them, the top and bottom "
         f"{max(1, config.audit_canaries // 10)} are guessed in / out (fixed in advance); the "
         f"bound holds at 95% confidence for (ε, δ={config.delta:g}) and certifies the training "
         "*algorithm* from this one run. With a perfect attack it cannot exceed about "
         f"{_one_run_ceiling(config):.2f}."
         if config.audit_canaries else "One-run audit: off (audit_canaries=0)."),
        "Ranking baselines (second table): members exposed = those LiRA online (else the loss "
        "attack) scores above its 1%-FPR threshold on the holdout; rankers, higher = more "
        "exposed, fixed in advance: the ledger's cumulative GNQ bound, the member's loss "
        "averaged over end-of-epoch evaluations, its final loss, its final gradient norm; "
        f"paired bootstrap over members ({config.bootstrap} resamples).",
        "Attacks score members (training set) against non-members (holdout); higher = member. "
        "loss: −loss. curv.: input-loss curvature "
        f"({config.curvature_estimator} estimator, {config.curvature_vectors} vectors), "
        "direction stated in advance: lower curvature = member. LiRA: "
        f"{config.n_shadows} shadow models on random halves of train ∪ holdout, same recipe, "
        "no defence; online and offline, global variance.",
        "best = the maximum over attacks, taken for each metric separately. ε_lb: empirical ε "
        f"lower bound at δ={config.delta:g}, 95% confidence (Clopper–Pearson, Bonferroni over "
        "thresholds); it treats the examples as independent draws from one trained model, so "
        "it is an audit statistic of this model, not a certificate about the algorithm.",
        f"Canaries: {split.num_canaries} '{split.canary_kind}' canaries, half trained on. "
        "canary AUC = the largest attack AUC on member against holdout canaries; fit = share "
        "predicted with their planted label (members/holdout).",
        "GNQ: GradGuard attached to every row (monitor for none and DP-SGD, where it measures "
        "the released update: clipped gradients, noise in the ridge). max bound = largest "
        f"per-example cumulative bound in nats. {BOUND_ASSUMPTIONS}",
    ]


def _one_run_ceiling(config: ComparisonConfig) -> float:
    from gradguard.audit.one_run import one_run_epsilon

    k = max(1, config.audit_canaries // 10)
    perfect = np.r_[np.ones(k), np.zeros(config.audit_canaries - 2 * k), np.zeros(k)]
    coins = np.r_[np.ones(k), np.zeros(config.audit_canaries - k)].astype(bool)
    return one_run_epsilon(perfect, coins, k_plus=k, k_minus=k,
                           delta=config.delta)["eps_lower_bound"]


def _write_outputs(out: Path, config: ComparisonConfig, split, rows: list[dict[str, Any]],
                   outputs: list[_RowOutput], attacks: Sequence[str],
                   shadows: ShadowSet | None, total_seconds: float) -> None:
    from gradguard._io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from gradguard.experiments.plots import plot_privacy_utility, plot_roc

    device = _resolve_device(config.device)
    notes = _notes(config, split)
    split_info = split.summary()
    split_info["train_canary_indices"] = torch.nonzero(split.train_canary_mask).flatten().tolist()
    split_info["holdout_canary_indices"] = torch.nonzero(
        split.holdout_canary_mask).flatten().tolist()
    files = ["results.csv", "results.json", "results.md", "privacy_utility.png", "scores.npz"]
    for attack in attacks:
        files += [f"roc_{attack}.png", f"roc_{attack}_log.png"]

    _write_csv(out / "results.csv", rows)
    doc = {"config": config.to_dict(), "split": split_info, "rows": [_json_row(r) for r in rows],
           "attacks": list(attacks), "environment": _environment(device),
           "shadow_seconds": shadows.seconds if shadows is not None else 0.0,
           "total_seconds": total_seconds, "notes": notes, "files": files}
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", _document(rows, notes))

    pu_rows = [{"name": r["name"], "test_accuracy": r["test_accuracy"],
                "auc": r["best_auc"], "tpr_at_1pct_fpr": r["best_tpr_at_1pct_fpr"]}
               for r in rows]
    plot_privacy_utility(pu_rows, out / "privacy_utility.png",
                         title="Privacy vs utility: strongest attack per row "
                               "(up and left is better)")
    arrays: dict[str, np.ndarray] = {}
    for attack in attacks:
        curves = {o.metrics["name"]: o.scores[attack] for o in outputs}
        label = _ATTACK_LABELS[attack]
        plot_roc(curves, out / f"roc_{attack}.png", title=f"{label} attack: ROC")
        plot_roc(curves, out / f"roc_{attack}_log.png", log_scale=True,
                 title=f"{label} attack: ROC (log-log)")
        for o in outputs:
            slug = Path(o.metrics["run_dir"]).name
            arrays[f"{slug}__{attack}__members"] = o.scores[attack][0]
            arrays[f"{slug}__{attack}__nonmembers"] = o.scores[attack][1]
    for o in outputs:
        slug = Path(o.metrics["run_dir"]).name
        arrays.update({f"{slug}__{key}": value for key, value in o.extra.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(out / "scores.npz", buffer.getvalue())


def _document(rows: Sequence[Mapping[str, Any]], notes: Sequence[str],
              diffs: Sequence[Mapping[str, Any]] = ()) -> str:
    parts = [markdown_table(rows)]
    if diffs:
        parts += ["Paired differences against the DP-SGD row of closest mean test accuracy "
                  "(same seeds; mean ± Student-t 95% interval):", paired_table(diffs)]
    parts += ["Does the GNQ ledger rank the members an attack exposes (LiRA online at 1% FPR) "
              "better than free baselines? AUC per ranker; differences with a paired bootstrap "
              "95% interval (one seed) or mean ± 95% interval over seeds:", ranking_table(rows),
              "Curvature attack (direction fixed: low curvature = member) per subgroup, and the "
              "last in-training probe: ± DeLong SE (one seed) or ± 95% interval over seeds:",
              curvature_table(rows)]
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    # Strict JSON: NaN and inf become null.
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {k: clean(v) for k, v in row.items()}



def _write_csv(path, rows: list[dict]) -> None:
    """One CSV row per result row; columns in first-seen order across all rows (atomic)."""
    from gradguard._io import atomic_write_text

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, text.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- table


def _fmt(value: Any, digits: int = 3) -> str:
    if not _finite(value):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as a markdown table, one line per row.

    Columns: defence, test accuracy, the accountant's DP ε, AUC of each attack that ran,
    the strongest attack's TPR at 1% FPR with its Clopper–Pearson 95% interval in
    brackets, the chance level of that "best of k attacks" TPR (permutation mean, 95th
    percentile in brackets), its empirical ε lower bound, the one-run audit's ε lower
    bound, the canaries' exposure, the GNQ ledger's largest bound, examples
    dropped/clipped, and wall time. Rows aggregated over seeds (:func:`run_repeated`) show
    "mean ± half-width of the 95% interval" where they carry ``<key>_ci95`` (else
    ``<key>_sd``), and the pooled Clopper–Pearson interval of the best TPR.

    Args:
        rows: result rows from :func:`run_row`, :func:`run_comparison` or
            :func:`run_repeated`.

    Returns:
        The table (no trailing newline).
    """
    attacks = [a for a in ATTACKS if any(f"{a}_auc" in r for r in rows)]
    header = (["defence", "test acc", "DP ε"] + [f"{_ATTACK_LABELS[a]} AUC" for a in attacks]
              + ["best TPR@1%FPR [CP 95%]", "chance best-of-k [p95]", "best ε_lb",
                 "one-run ε_lb", "canary AUC", "canaries fit (m/h)",
                 "max bound (nats)", "dropped / clipped", "time (s)"])
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:

        def cell(key: str, digits: int = 3, row: Mapping[str, Any] = r) -> str:
            # "mean ± 95% interval" (else ± sd) for rows aggregated over seeds.
            text = _fmt(row.get(key), digits)
            spread = row.get(f"{key}_ci95", row.get(f"{key}_sd"))
            if text != "–" and _finite(spread):
                text += f" ± {spread:.{digits}f}"
            return text

        tpr = cell("best_tpr_at_1pct_fpr")
        for prefix in ("best_tpr_at_1pct_fpr_pooled_cp", "best_tpr_at_1pct_fpr_cp"):
            if _finite(r.get(f"{prefix}_low")) and tpr != "–":
                tpr += f" [{r[f'{prefix}_low']:.3f}, {r[f'{prefix}_high']:.3f}]"
                break
        chance = _fmt(r.get("chance_best_tpr_at_1pct_fpr"))
        if chance != "–" and _finite(r.get("chance_best_tpr_at_1pct_fpr_p95")):
            chance += f" [{r['chance_best_tpr_at_1pct_fpr_p95']:.3f}]"

        fit = "–"
        if _finite(r.get("canary_fit_members")) and _finite(r.get("canary_fit_holdout")):
            fit = f"{r['canary_fit_members']:.2f} / {r['canary_fit_holdout']:.2f}"
        eps = cell("eps_spent", 2) if r.get("eps_spent") is not None else "∞ (none)"
        acted = "–"
        if r.get("defence") in ("gnq-drop", "gnq-clip"):
            acted = f"{_count(r.get('dropped_total'))} / {_count(r.get('clipped_total'))}"
        name = r["name"]
        if r.get("budget_nats") is not None and "budget=p" in str(r.get("setting", "")):
            name += f" ({r['budget_nats']:.3g} nats)"
        cells = ([name, cell("test_accuracy"), eps] + [cell(f"{a}_auc") for a in attacks]
                 + [tpr, chance, cell("best_eps_lower_bound", 2), cell("one_run_eps_lb", 2),
                    cell("canary_best_auc"), fit, _fmt(r.get("gnq_max_bound"), 1), acted,
                    _fmt(r.get("wall_seconds"), 0)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count(value: Any) -> str:
    return str(int(value)) if _finite(value) else "–"


def _row_text(row: Mapping[str, Any]) -> str:
    keys = ("name", "test_accuracy", "eps_spent", "best_auc", "best_tpr_at_1pct_fpr",
            "best_eps_lower_bound", "gnq_max_bound", "dropped_total", "clipped_total")
    return "\n".join(f"- {k}: {row.get(k)}" for k in keys)


# --------------------------------------------------------------------------- helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _spec_float(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r} in GNQ policy setting "
                         f"{spec!r}") from None


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("=", "")).strip("_") or "row"
