"""The run directory's format: file names, atomic saving, validated loading.

A run directory (``GradGuard(log_dir=...)``) holds TensorBoard event files and:

- ``gradguard_state.pt``: :meth:`GradGuard.state_dict` (tensors only), written atomically
  at ``close()`` and every ``save_every`` steps;
- ``summary.json``: plain numbers and the configuration, strict JSON, written with it.

Both are replaced atomically (temporary file, fsync, rename), so a run killed at any
moment leaves the previous complete pair or the new one, never a truncated file.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ._io import atomic_torch_save, atomic_write_json

__all__ = ["STATE_FILE", "SUMMARY_FILE", "save_run", "load_state", "state_path"]

STATE_FILE = "gradguard_state.pt"
SUMMARY_FILE = "summary.json"


def state_path(run_dir: str | os.PathLike[str]) -> str:
    """Where a run directory keeps its state."""
    return os.path.join(os.fspath(run_dir), STATE_FILE)


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _strict(value.item())
    return value


def save_run(run_dir: str | os.PathLike[str], *, state: dict[str, Any],
             summary: dict[str, Any]) -> None:
    """Write ``state`` and ``summary`` into ``run_dir``, each atomically.

    The state goes first: a ``summary.json`` never describes a state that is not on disk.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> save_run(d, state={"step": torch.tensor(3)}, summary={"summary": {"step": 3}})
        >>> int(load_state(d, validate=False)["step"])
        3
    """
    os.makedirs(run_dir, exist_ok=True)
    atomic_torch_save(state, state_path(run_dir))
    atomic_write_json(os.path.join(os.fspath(run_dir), SUMMARY_FILE), _strict(summary))


def load_state(path: str | os.PathLike[str], *, validate: bool = True) -> dict[str, Any]:
    """Load a saved GradGuard state, never unpickling arbitrary objects.

    Args:
        path: a run directory or its ``gradguard_state.pt``.
        validate: check it is a GradGuard state (a dict with ``version`` and ``step``).

    Raises:
        FileNotFoundError: no state there.
        ValueError: the file is not a GradGuard state (or holds non-tensor objects).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = state_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GradGuard state at {path}: a run writes {STATE_FILE} at "
                                "close() and every save_every steps")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a state we wrote
        raise ValueError(f"{path} is not a readable GradGuard state ({exc})") from exc
    if validate and not (isinstance(state, dict) and "version" in state and "step" in state):
        raise ValueError(f"{path} is not a GradGuard state (expected a dict with 'version' and "
                         "'step', as GradGuard.state_dict() writes)")
    return state
