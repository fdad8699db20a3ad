"""Which tensors of a forward pass carry the batch: traced from the model's inputs, not
guessed from sizes.

A layer's per-example gradients are only defined when its output's rows belong to
examples. Guessing that from sizes ("the first dimension equals B") is silently wrong
when a tensor shared by the whole batch happens to have B rows (a ``[T, d]`` positional
table with T == B). :class:`BatchTracker` is a ``TorchFunctionMode`` that GramHooks runs
during the model's forward: every tensor computed from the model's inputs is *batched*
(with its batch dimension, where the op says where it went); tensors computed only from
parameters, buffers and constants (``torch.arange``) are not. A guarded layer whose
inputs are all unbatched is *shared*: its output does not depend on the batch, so its
output gradient arrives summed over examples. The tracker watches how that output meets
the batch:

- row-aligned with a batched tensor (``emb(ids.expand(B, T)) + x``): its rows belong to
  examples, exact as it is;
- broadcast into a batched tensor by an addition (``x + wpe(arange(T))``, Hugging Face's
  ``[1, T]`` position ids): the gradient of the sum is the per-example gradient of the
  broadcast copy, so it is attributed exactly (see :class:`SharedOutput`);
- anything else (a product, a matmul, used twice, reaching the loss on its own): no
  per-example attribution exists, and the tracker refuses, naming the layer, the cause
  and the fix.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["BatchTracker", "SharedOutput", "UnsupportedLayerError"]


class UnsupportedLayerError(RuntimeError):
    """A layer whose per-example gradients gradguard cannot compute correctly."""


_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__"}
_SUB = {"sub", "sub_", "subtract", "__sub__", "__isub__"}
_TRANSPOSE = {"transpose", "transpose_", "swapaxes", "swapdims"}
_RESHAPE = {"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten", "contiguous"}
#: The batch is the outermost factor of dimension 0 (``x.view(-1, d)`` of a ``[B, T, d]``
#: tensor): positionwise layers (Linear, Embedding) can read it as batch-first.
MERGED = "merged"
# Elementwise ops: a shared tensor whose rows meet a batched tensor's rows one to one
# (same shape, batch first) through one of these gives each example its own row.
_ELEMENTWISE = _ADD | _SUB | {
    "__rsub__", "mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "div", "div_",
    "divide", "true_divide", "__truediv__", "__rtruediv__", "__itruediv__", "where",
    "maximum", "minimum", "addcmul", "addcdiv", "lerp"}


@dataclass
class SharedOutput:
    """Output ``k`` of a guarded layer call whose inputs do not depend on the batch.

    Attributes:
        path: the layer's name in the model, for messages.
        call: the hooks' record of the call.
        k: which of the call's flattened outputs.
        uses: operations that consumed the output so far.
        resolution: ``None`` (not met the batch yet), ``"aligned"`` (rows are examples) or
            ``"broadcast"`` (added, broadcast, to a batched tensor: attributed).
    """

    path: str
    call: object
    k: int
    uses: int = 0
    resolution: str | None = None


# Each traced tensor carries (forward id, kind, payload) in this attribute: a plain
# attribute read costs far less per op than a weak dictionary, and the forward id makes
# marks from earlier forwards (on tensors the user keeps) inert. Kind "b": batched,
# payload its batch dimension; kind "s": shared, payload (SharedOutput, direct?).
_ATTR = "_gradguard_trace"
_forward_ids = itertools.count()


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif type(a) in (tuple, list):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _mark(t: torch.Tensor, value: tuple) -> None:
    try:  # noqa: SIM105 - on every traced op: cheaper than contextlib.suppress
        setattr(t, _ATTR, value)
    except (AttributeError, RuntimeError):  # a tensor subclass without a __dict__
        pass


def _dim_of_size(t: torch.Tensor, size: int) -> int | None:
    """The only dimension of ``t`` with this size, else None."""
    dims = [d for d, s in enumerate(t.shape) if s == size]
    return dims[0] if len(dims) == 1 else None


class BatchTracker(TorchFunctionMode):
    """Trace which tensors carry the batch during one forward pass (see the module doc).

    Args:
        batch_size: B, the examples in the forward.
        on_broadcast: ``fn(shared, out, sign, lead)`` called when a shared output is added,
            broadcast, to a batched tensor ``out``: the per-example gradient of the shared
            output is ``sign · ∂L/∂out``, and ``lead`` leading dimensions were broadcast.
    """

    def __init__(self, batch_size: int, on_broadcast: Callable):
        super().__init__()
        self.batch_size = batch_size
        self.on_broadcast = on_broadcast
        self._id = next(_forward_ids)
        self.outputs: list[SharedOutput] = []

    def _trace(self, t: torch.Tensor):
        mark = getattr(t, _ATTR, None)
        return mark if mark is not None and mark[0] == self._id else None

    # ------------------------------------------------------------------ queries
    def mark_batched(self, t: torch.Tensor, dim: int | str | None) -> None:
        _mark(t, (self._id, "b", dim))

    def is_batched(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        mark = self._trace(t)
        return mark is not None and mark[1] == "b"

    def _dim(self, t: torch.Tensor) -> int | str | None:
        mark = self._trace(t)
        return mark[2] if mark is not None and mark[1] == "b" else None

    def batch_dim(self, t: torch.Tensor) -> int | str | None:
        """The batch dimension of a batched tensor: traced (:data:`MERGED`: the outermost
        factor of dimension 0), else the only dimension of size B; None when neither tells
        (several dimensions of size B)."""
        d = self._dim(t)
        if d is None and t.dim() > 0:
            if t.shape[0] == self.batch_size and t.dim() == 1:
                return 0
            d = _dim_of_size(t, self.batch_size)
        return d

    def add_shared(self, path: str, call, outputs: list) -> None:
        for k, o in enumerate(outputs):
            if isinstance(o, torch.Tensor):
                rec = SharedOutput(path, call, k)
                self.outputs.append(rec)
                _mark(o, (self._id, "s", (rec, True)))

    # ------------------------------------------------------------------ tracing
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs) if kwargs else func(*args)
        batched, shared = [], []
        for a in (*args, *kwargs.values()) if kwargs else args:
            for t in (a,) if isinstance(a, torch.Tensor) else \
                    a if type(a) in (tuple, list) else ():
                mark = getattr(t, _ATTR, None) if isinstance(t, torch.Tensor) else None
                if mark is not None and mark[0] == self._id:
                    (batched if mark[1] == "b" else shared).append((t, mark[2]))
        if not batched and not shared:
            return out
        if isinstance(out, torch.Tensor):
            outs = (out,)
        elif type(out) in (tuple, list):
            outs = tuple(o for o in out if isinstance(o, torch.Tensor))
        else:
            return out  # a query: shape, dtype, ...
        name = getattr(func, "__name__", "")
        if batched:
            src, d = next(((t, d) for t, d in batched if d is not None), batched[0])
            for o in outs:
                _mark(o, (self._id, "b", self._out_dim(name, args, src, d, o)))
            for t, (rec, direct) in shared:
                self._consume(name, t, rec, direct, args, kwargs, outs)
            return out
        ins = _tensors(args, kwargs)
        if all(any(o is t for t in ins) for o in outs):
            return out  # a no-op returning its input (.to on the right device)
        for t, (rec, _) in shared:
            rec.uses += 1
            for o in outs:
                if o is not t:
                    _mark(o, (self._id, "s", (rec, False)))
        return out

    def _out_dim(self, name: str, args, src: torch.Tensor, d, o: torch.Tensor) -> int | str | None:
        B = self.batch_size
        if d is None:
            return _dim_of_size(o, B)
        nd = src.dim()
        if d == MERGED or (d == 0 and name in _RESHAPE):
            # Reshapes keep row-major order: the batch stays the outermost factor of dim 0
            # while B divides it; other ops keep it where they keep dim 0's size.
            if o.dim() == 0:
                return None
            if name in _RESHAPE and o.shape[0] % B == 0:
                return 0 if o.shape[0] == B else MERGED
            if d == MERGED:
                keeps = name not in _TRANSPOSE and name not in ("t", "permute")
                return MERGED if keeps and o.shape[0] == src.shape[0] else None
        if name in _TRANSPOSE and len(args) >= 3 and all(isinstance(a, int) for a in args[1:3]):
            a, b = (x % nd for x in args[1:3])
            return b if d == a else a if d == b else d
        if name == "t" and nd == 2:
            return 1 - d
        if name == "permute":
            perm = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            perm = [p % nd for p in perm]
            return perm.index(d) if d in perm else None
        if o.dim() == nd and o.shape[d] == B:
            return d
        if d == 0 and o.dim() > 0 and o.shape[0] == B:
            return 0
        if o.dim() > nd and o.shape[:nd] == src.shape:
            return d  # trailing dimensions appended (embedding lookup, unsqueeze(-1))
        right = o.dim() - nd + d
        if 0 <= right < o.dim() and o.shape[right] == B:
            return right
        return None

    def _consume(self, name: str, t: torch.Tensor, rec: SharedOutput, direct: bool, args,
                 kwargs, outs) -> None:
        o = outs[0]
        B = self.batch_size
        where = f"by `{name}`"
        if not direct:
            self._refuse(rec, f"it meets the batch after other operations ({where})")
        if rec.uses or rec.resolution is not None or len(outs) != 1 or o is t:
            self._refuse(rec, f"it is used more than once, or in place ({where})")
        rec.uses += 1
        lead = o.dim() - t.dim()
        if self._dim(o) != 0 or o.shape[0] != B or lead < 0:
            self._refuse(rec, f"it is combined with the batch {where} in a way that keeps no "
                              "batch dimension first")
        if lead == 0 and t.shape[0] == B and name in _ELEMENTWISE and t.shape == o.shape:
            rec.resolution = "aligned"  # rows meet rows: row i belongs to example i
            return
        sign = self._sign(name, t, args, kwargs)
        broadcast = o.shape[lead + 1:] == t.shape[1:] and t.shape[0] in (1, o.shape[lead])
        if sign is None or not broadcast or (lead == 0 and t.shape[0] != 1):
            self._refuse(rec, f"it is broadcast over the batch {where}, which has no "
                              "per-example attribution (only a broadcast addition has)")
        rec.resolution = "broadcast"
        self.on_broadcast(rec, o, sign, lead)

    @staticmethod
    def _sign(name: str, t: torch.Tensor, args, kwargs) -> float | None:
        alpha = (kwargs or {}).get("alpha", 1)
        if name in _ADD:
            return float(alpha)
        if name in _SUB:
            return 1.0 if args and args[0] is t else -float(alpha)
        if name == "__rsub__":  # args[1] - args[0]
            return -1.0 if args and args[0] is t else 1.0
        return None

    @staticmethod
    def _refuse(rec: SharedOutput, cause: str):
        raise UnsupportedLayerError(
            f"layer '{rec.path}' computes an output that does not depend on the batch (its "
            "inputs are parameters, buffers or constants such as torch.arange), so its "
            f"gradient arrives summed over examples, and {cause}. gradguard cannot attribute "
            "that gradient to examples. Fix: give the layer per-example inputs (e.g. positions "
            "expanded to [B, T] with .expand(B, -1)), or add its output directly to a batched "
            "tensor (x + layer(positions)), which gradguard attributes exactly."
        )

    def unresolved(self) -> list[SharedOutput]:
        """Shared outputs that never met the batch (checked when they receive gradient)."""
        return [r for r in self.outputs if r.resolution is None]
