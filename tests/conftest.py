"""Shared test fixtures. The independent references themselves (torch.func per-example
gradients, per-example backward loops, explicit float64 P×P solves) live in
``tests/reference.py`` so that any test module can import them."""

from __future__ import annotations

import pytest
import torch

from tests import reference


@pytest.fixture
def refs():
    """The independent references of ``tests/reference.py``."""
    return reference


@pytest.fixture
def make_generator():
    """``make_generator(seed)``: a fresh seeded CPU ``torch.Generator`` (fresh inputs per
    test, no global RNG state shared between tests)."""
    return reference.gen


@pytest.fixture(autouse=True)
def _no_tracing_left_behind():
    """No test may leave a TorchFunctionMode (GramHooks' batch tracer) on the stack."""
    yield
    assert not torch.overrides._get_current_function_mode_stack()
