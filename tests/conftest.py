"""Shared test fixtures. The independent references themselves (torch.func per-example
gradients, per-example backward loops, explicit float64 P×P solves) live in
``tests/reference.py`` so that any test module can import them.

Device mode: the device-sensitive tests (Gram/GNQ exactness against torch.func, the
transformer and sketch kernels, mixed precision, a short guarded training run, the host
synchronisation count) take the ``device`` fixture and build their models and tensors on
it. By default it is the CPU, and the suite is the plain CPU suite. On a machine with a
GPU, run them on CUDA with::

    pytest --device cuda tests          # or: GRADGUARD_TEST_DEVICE=cuda pytest tests

Random inputs are still drawn from seeded CPU generators and then moved, so a test sees
the same numbers on either device. When CUDA is asked for but
``torch.cuda.is_available()`` is false, the tests that take ``device`` are skipped with
that reason (the others run as usual).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import reference


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the device-sensitive tests: ``--device`` / ``GRADGUARD_TEST_DEVICE``."""
    name = request.config.getoption("--device", default=None) or \
        os.environ.get("GRADGUARD_TEST_DEVICE", "cpu")
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"GRADGUARD_TEST_DEVICE must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("the device-sensitive tests were asked to run on CUDA (--device cuda or "
                    "GRADGUARD_TEST_DEVICE=cuda) but torch.cuda.is_available() is False")
    return torch.device(name)


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
