"""Doctest collection over ``gradguard/``: skip modules whose optional extra is missing."""

import importlib.util

_EXTRAS = {
    "gradguard/integrations/lightning.py": ("lightning",),
    "gradguard/integrations/huggingface.py": ("transformers",),
    "gradguard/uniqueness/kernels/transformers.py": ("transformers",),
    "gradguard/experiments/*.py": ("sklearn", "matplotlib"),
}

collect_ignore_glob = [path for path, needs in _EXTRAS.items()
                       if any(importlib.util.find_spec(name) is None for name in needs)]
