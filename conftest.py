"""Doctest collection over ``gradguard/``: skip modules whose optional extra is missing.
Also the suite's ``--device`` option (see ``tests/conftest.py``), declared here so that it
is known however pytest is started."""

import importlib.util
import os

_EXTRAS = {
    "gradguard/integrations/lightning.py": ("lightning",),
    "gradguard/integrations/huggingface.py": ("transformers",),
    "gradguard/uniqueness/kernels/transformers.py": ("transformers",),
    "gradguard/experiments/*.py": ("sklearn", "matplotlib"),
}

collect_ignore_glob = [path for path, needs in _EXTRAS.items()
                       if any(importlib.util.find_spec(name) is None for name in needs)]


def pytest_addoption(parser):
    parser.addoption(
        "--device", choices=("cpu", "cuda"),
        default=os.environ.get("GRADGUARD_TEST_DEVICE", "cpu"),
        help="device of the device-sensitive tests (the `device` fixture): cpu (default) or "
             "cuda; the environment variable GRADGUARD_TEST_DEVICE sets the default")
