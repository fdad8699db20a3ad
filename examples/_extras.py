"""Say which install extra an example needs, instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
import os
import sys


def require(**extras: str) -> None:
    """Exit with the install command when a module of an extra is missing.

    Args:
        extras: extra name -> comma-separated top-level modules it provides, e.g.
            ``require(lightning="lightning", experiments="sklearn")``.
    """
    missing: dict[str, list[str]] = {}
    for extra, modules in extras.items():
        for module in modules.split(","):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError:
                missing.setdefault(extra, []).append(module)
    if missing:
        script = os.path.basename(sys.argv[0]) or "this example"
        names = ",".join(missing)
        modules = ", ".join(m for ms in missing.values() for m in ms)
        raise SystemExit(
            f"{script} needs the gradguard extra(s) [{names}] ({modules} not installed). "
            f'Install them from this checkout (the repository root): pip install -e ".[{names}]"'
        )
