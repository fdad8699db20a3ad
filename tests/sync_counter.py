"""Count host synchronisations: the operations that make the host wait for the device.

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``,
``float(t)``, ``int(t)``, ``if t:``) or producing a tensor whose *shape* depends on its
values (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``) blocks until
the device has caught up. On CPU nothing waits, but the same calls still dispatch the
same aten operators, so counting those operators on CPU tells how often a step would
stall a GPU. :class:`SyncCounter` is a ``TorchDispatchMode`` that does that counting.

What it cannot see: ``.tolist()``, ``.numpy()`` and ``.cpu()`` of a CPU tensor dispatch
no operator (the data is already on the host); on CUDA they show up as ``_to_copy`` to
the CPU, which is counted. Review those calls by reading the code.

Example:
    >>> import torch
    >>> with SyncCounter() as syncs:
    ...     x = torch.arange(4.0)
    ...     _ = bool(x.sum() > 0), x[x > 1], float(x.max())
    >>> syncs.count, sorted(syncs.by_op().items())
    (3, [('_local_scalar_dense', 2), ('index(bool mask)', 1)])
"""

from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
# Operators that read a value back to the host, or whose output shape depends on data.
_ALWAYS = {
    _aten._local_scalar_dense.default: "_local_scalar_dense",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
             _aten._index_put_impl_.default}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_name(func, args, kwargs) -> str | None:
    name = _ALWAYS.get(func)
    if name is not None:
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            return None  # the output size is given: nothing to read back
        return name
    if func in _INDEXING and any(_is_mask(i) for i in (args[1] or ())):
        return "index(bool mask)"
    if func in (_aten._to_copy.default, _aten.copy_.default):
        src = args[1] if func is _aten.copy_.default else args[0]
        dst = args[0].device if func is _aten.copy_.default else kwargs.get("device")
        if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
                and torch.device(dst).type == "cpu"):
            return "copy to host"
    return None


def _caller(package: str) -> str:
    """``file:line (function)`` of the innermost function in ``package`` on the stack:
    where in gradguard the sync was asked for."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        path = os.path.relpath(frame.filename, _ROOT)
        # (comprehensions are attributed to the function they are in)
        if path.startswith(package + os.sep) and not frame.name.startswith("<"):
            return f"{path}:{frame.lineno} ({frame.name})"
    return "outside " + package


class SyncCounter(TorchDispatchMode):
    """Count the host synchronisations dispatched inside a ``with`` block.

    Args:
        package: the source folder that syncs are attributed to (default ``gradguard``).
        device: count only operations on tensors of this device type (``"cuda"``: a read
            of a CPU tensor during a CUDA run waits for nothing); default: any.

    Attributes:
        events: ``(operator, where)`` for each sync, in order; ``where`` is the innermost
            ``file:line`` in ``package`` that led to it.
    """

    def __init__(self, package: str = "gradguard", *, device: str | None = None):
        super().__init__()
        self.package = package
        self.device = device
        self.events: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name is not None and (self.device is None or any(
                isinstance(t, torch.Tensor) and t.device.type == self.device
                for t in tree_leaves((args, kwargs)))):
            self.events.append((name, _caller(self.package)))
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_op(self) -> collections.Counter:
        return collections.Counter(op for op, _ in self.events)

    def by_site(self) -> collections.Counter:
        return collections.Counter(self.events)

    def reset(self) -> None:
        self.events.clear()
