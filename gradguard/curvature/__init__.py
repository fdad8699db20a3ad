"""Input loss curvature: per-example estimators and a periodic membership probe."""

from __future__ import annotations

from gradguard.curvature.estimators import (
    ESTIMATORS,
    draw_seed,
    fd_curvature,
    hutchinson_trace,
    input_curvature,
    rademacher_vectors,
    zo_curvature,
)
from gradguard.curvature.probe import DIRECTIONS, CurvatureProbe, ProbeResult, step_seed

__all__ = [
    "DIRECTIONS",
    "ESTIMATORS",
    "CurvatureProbe",
    "ProbeResult",
    "draw_seed",
    "fd_curvature",
    "hutchinson_trace",
    "input_curvature",
    "rademacher_vectors",
    "step_seed",
    "zo_curvature",
]
