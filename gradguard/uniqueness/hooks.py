"""Hooks that capture each layer's inputs and output gradients during ``loss.backward()``.

:class:`GramHooks` attaches to an unmodified ``nn.Module``. During the user's ordinary
forward and backward it records, for every layer with trainable parameters, the
layer's inputs A and the gradients Δ of the loss w.r.t. its outputs. From those the
per-layer kernels (:mod:`gradguard.uniqueness.kernels`) give the B×B Gram of
per-example gradients and weighted gradient sums, without materialising per-example
gradients wherever a ghost kernel is cheaper. :meth:`GramHooks.remove` detaches
everything and leaves the model exactly as before.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from .gnq import gnq_from_gram, solve_dtype
from .kernels import (
    EmbeddingKernel,
    FunctionalKernel,
    GradSamplerKernel,
    LayerCall,
    LayerKernel,
    LinearKernel,
    is_sharded,
    kernel_for,
    layer_type,
    tied_embedding_head_costs,
    tied_embedding_head_gram,
)
from .kernels.base import _gram_of, _Segment
from .kernels.linear import condensed_rows
from .kernels.sketch import (
    AUTO_SKETCH_MULTIPLE,
    DEFAULT_SKETCH_DIM,
    add_tied_rows_,
    can_sketch,
    sketch_costs,
    sketch_rows,
    sketched_gram,
    sketched_tied_gram,
    tied_projections,
    tied_sketch_costs,
)
from .provenance import MERGED, BatchTracker, SharedOutput, UnsupportedLayerError

__all__ = ["GramHooks", "per_example_gnq", "UnsupportedLayerError"]

_STRATEGIES = ("auto", "ghost", "materialise", "sketch")


# Kernels that act position by position on their input's leading dimensions, so a call on
# a shared input broadcast over the batch equals the call on the input expanded per example.
_POSITIONWISE = (LinearKernel, EmbeddingKernel)
_TRAILING_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass
class _Owner:
    """A hooked module and the names of the parameters it owns."""

    path: str
    module: nn.Module
    kernel: LayerKernel
    names: list[str]
    params: list[nn.Parameter]


def _map_tensors(fn, x):
    """``fn`` on every tensor in ``x``: plain tuples, lists and dicts without pytree
    (these hooks run for every layer on every step, and tree_map's bookkeeping costs
    more than the detaching itself); anything else through tree_map."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if type(x) in (tuple, list):
        return type(x)(_map_tensors(fn, v) for v in x)
    if type(x) is dict:
        return {k: _map_tensors(fn, v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, x)


def _detach(x):
    return _map_tensors(torch.Tensor.detach, x)


def _functorch_wrapped(t) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _first_tensor(args, kwargs):
    for x in tree_flatten((args, kwargs))[0]:
        if isinstance(x, torch.Tensor):
            return x
    return None


class GramHooks:
    """Capture A and Δ per layer and build the Gram of per-example gradients.

    Per-example gradients are gradients of each example's own loss: under
    ``loss_reduction="mean"`` the captured output gradients are multiplied by the batch
    size of their forward pass, as Opacus does.

    Which tensors carry the batch, and along which dimension, is traced during the
    model's forward from its inputs (:mod:`gradguard.uniqueness.provenance`), never
    guessed from sizes: every tensor argument of the model whose batch dimension has B
    entries is per-example, tensors made from parameters, buffers and constants are not.
    A layer whose output does not depend on the batch (positions ``arange(T)``) is exact
    when that output is added to the batch by broadcasting (or meets it row by row), and
    refused otherwise. A forward's captures are held by its autograd graph until its
    backward reaches them, so forwards that never reach backward (evaluation with grad
    enabled) free them with their graph.

    Large temporaries that every step needs again (the unfolded inputs of convolutions
    with few input channels) stay allocated between steps, so they are not page-faulted
    back each step; :meth:`remove` frees them.

    Args:
        module: the model; it is not modified beyond registering hooks.
        loss_reduction: ``"mean"`` or ``"sum"``, how the user's loss reduces over the batch.
        batch_first: whether the model's inputs have the batch as their first dimension
            (else the second); B is read from the first tensor argument.
        strategy: ``"auto"`` (per layer, the cheaper of ghost kernel and materialisation;
            a sketch only where both cost more than ``AUTO_SKETCH_MULTIPLE`` × the layer's
            backward), ``"ghost"`` (ghost kernels wherever they exist), ``"materialise"``,
            or ``"sketch"`` (affine layers larger than the sketch take a random-projection
            estimate of their Gram, :mod:`~gradguard.uniqueness.kernels.sketch`; other
            layers, e.g. norms and embeddings, their exact routes).
        sketch_dim: per-layer sketch size, blocks·k_in·k_out (default ``DEFAULT_SKETCH_DIM``).
        sketch_seed: seed of the sketch projections (the same on every rank and resume).
        gram_dtype: dtype in which layer Grams are computed (they are always summed in
            float64). Default: float64 for float64 models, float32 otherwise (inputs in
            half precision are promoted).
        params: restrict the guarded parameters to these (default: every parameter with
            ``requires_grad``).
        gram_only: promise that only :meth:`gram` will be asked (a monitor): layers on the
            sketch route then keep only their sketch rows from the moment their output
            gradient arrives, not their inputs and output gradients (long sequences,
            gradient checkpointing). :meth:`per_example_grads` and :meth:`weighted_grads`
            refuse such layers.

    Memory: a linear layer (``nn.Linear``, GPT-2's ``Conv1D``) on the materialised route
    whose per-example gradients are smaller than its captured inputs and output gradients
    (sequences longer than about d_in·d_out/(d_in + d_out), LoRA adapters) keeps the
    per-example gradients instead, formed as its output gradient arrives; its inputs and
    output gradients are released right away. Every other layer holds its inputs and
    output gradients until :meth:`clear`.

    Raises:
        ValueError: bad ``loss_reduction`` or ``strategy``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                             torch.nn.Linear(3, 2))
        >>> hooks = GramHooks(model, loss_reduction="sum")
        >>> x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
        >>> torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        >>> hooks.gram().shape
        torch.Size([5, 5])
        >>> hooks.remove()
    """

    def __init__(self, module: nn.Module, *, loss_reduction: str = "mean", batch_first: bool = True,
                 strategy: str = "auto", gram_dtype: torch.dtype | None = None,
                 params: Iterable[nn.Parameter] | None = None, sketch_dim: int | None = None,
                 sketch_seed: int = 0, gram_only: bool = False):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum' (how your loss reduces over the batch), "
                f"got {loss_reduction!r}"
            )
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        self.module = module
        self.loss_reduction = loss_reduction
        self.batch_first = batch_first
        self.strategy = strategy
        if sketch_dim is not None and (not isinstance(sketch_dim, int) or sketch_dim < 1):
            raise ValueError(f"sketch_dim must be a positive integer (the per-layer sketch size), "
                             f"got {sketch_dim!r}")
        self.sketch_dim = DEFAULT_SKETCH_DIM if sketch_dim is None else sketch_dim
        self.sketch_seed = int(sketch_seed)
        self._restrict = None if params is None else {id(p) for p in params}
        if gram_dtype is None:
            first = next(module.parameters(), None)
            gram_dtype = torch.float64 if first is not None and first.dtype == torch.float64 \
                else torch.float32
        self.gram_dtype = gram_dtype
        self._handles: list = []
        self._owners: list[_Owner] = []
        # Calls that received an output gradient, per owner. A forward's calls are held
        # only by its autograd graph (their hooks) until then, so forwards that never
        # reach backward (an eval loop with grad enabled) free their captures with it.
        self._calls: dict[int, list[tuple[int, LayerCall]]] = defaultdict(list)
        self._forward_id = 0
        self._forward: tuple[int, int, BatchTracker] | None = None  # (id, B, tracker)
        self._collected: tuple[int, dict[int, list[LayerCall]]] | None = None
        self._scale = 1  # loss-reduction scale still to apply to results (see _collect)
        self._received: set[int] = set()
        # Per parameter: its .grad right after the last captured accumulation, and that
        # tensor's version counter (see grads_modified).
        self._grad_after_backward: dict[int, tuple[weakref.ref, int]] = {}
        self._uniform_scale = True
        self._workspaces: dict[tuple[int, int], dict] = defaultdict(dict)
        self._projections: dict = {}  # sketch projections, drawn once per seed, layer, shape
        self.gram_only = bool(gram_only)
        #: paths of the layers whose Gram was a sketch estimate in any step so far
        self.sketched_layers: set[str] = set()
        self._sketch_positions: dict[int, int] = {}  # per owner, this step's sketch layout
        self._assembled: dict[int, tuple] = {}  # per owner, this step's condensed rows
        self._paused = False
        self._attach()

    # ------------------------------------------------------------------ attaching
    def _attach(self) -> None:
        covered: list[str] = []
        for path, m in self.module.named_modules():
            if isinstance(m, _BatchNorm):
                self._handles.append(m.register_forward_pre_hook(self._make_bn_check(path)))
            if any(path == c or path.startswith(c + ".") for c in covered):
                continue
            kernel = kernel_for(m)
            named = list(m.named_parameters(recurse=kernel.covers_submodules))
            if kernel.covers_submodules:
                covered.append(path)
            if not named:
                continue
            owner = _Owner(path or type(m).__name__, m, kernel, [n for n, _ in named],
                           [p for _, p in named])
            idx = len(self._owners)
            self._owners.append(owner)
            self._handles.append(m.register_forward_hook(self._make_forward_hook(idx),
                                                         with_kwargs=True))
        self._find_sharded_values()
        self._handles.append(self.module.register_forward_pre_hook(self._root_pre_hook,
                                                                   with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(
            self._root_post_hook, with_kwargs=True, always_call=True))
        for p in self._all_params():
            if p.requires_grad:  # frozen now: never guarded, and hooks need requires_grad
                self._handles.append(p.register_post_accumulate_grad_hook(self._mark_received))
        uses: dict[int, int] = defaultdict(int)
        for o in self._owners:
            for p in o.params:
                uses[id(p)] += 1
        self._tied = {i for i, n in uses.items() if n > 1}
        self._tied_owners: dict[int, list[int]] = defaultdict(list)
        for idx, o in enumerate(self._owners):
            for p in o.params:
                if id(p) in self._tied:
                    self._tied_owners[id(p)].append(idx)

    def _find_sharded_values(self) -> None:
        """The FSDP-sharded parameters whose values a kernel reads, gathered whole while
        kernels run (:meth:`_computing`).

        Under FSDP2 (``fully_shard``) the captured inputs and output gradients are whole on
        each rank, so kernels that need only them and the parameters' shapes (Linear,
        Conv, Embedding, GPT-2's Conv1D, norms) work on the shards as they are. Kernels
        that re-run the layer (torch.func, MultiheadAttention, RNNs, custom grad samplers)
        need the values, which are DTensor shards between steps: those parameters are
        all-gathered, in the same order on every rank, for the computation. A layer that
        is itself sharded by ``fully_shard`` would run FSDP's hooks when re-run: refused.
        """
        self._sharded_values: list[tuple[nn.Module, str]] = []  # (module, parameter name)
        refused = []
        for o in self._owners:
            if not o.kernel.reads_parameters or not any(self._guarded(p) for p in o.params):
                continue
            subtree = list(o.module.modules()) if o.kernel.covers_submodules else [o.module]
            slots = [(m, n) for m in subtree for n, p in m._parameters.items()
                     if p is not None and is_sharded(p)]
            if slots and any(type(m) is not layer_type(m) for m in subtree):
                refused.append(f"{o.path} ({layer_type(o.module).__name__})")
            self._sharded_values += slots
        if refused:
            raise UnsupportedLayerError(
                f"{refused[:10]} are sharded by fully_shard themselves, and their per-example "
                "gradients re-run the layer with its parameters' values, which would run "
                "FSDP's hooks (collectives) per example. Call fully_shard on the block that "
                "contains them instead (e.g. the transformer layer), or freeze them.")

    @contextlib.contextmanager
    def _computing(self):
        """Kernels run here: nothing is captured, and sharded parameters whose values a
        kernel reads are whole (all-gathered on every rank, restored afterwards).

        Every rank enters this block at the same points of a step, whatever its batch,
        so the all-gathers pair up.
        """
        swapped = []
        self._paused = True
        try:
            for m, name in self._sharded_values:
                current = m._parameters[name]
                if not is_sharded(current):
                    continue  # FSDP holds it unsharded now (reshard_after_backward=False)
                m._parameters[name] = nn.Parameter(current.full_tensor(),
                                                   requires_grad=current.requires_grad)
                swapped.append((m, name, current))
            yield
        finally:
            for m, name, p in swapped:
                m._parameters[name] = p
            self._paused = False

    def _all_params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for o in self._owners:
            for p in o.params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _guarded(self, p: nn.Parameter) -> bool:
        return p.requires_grad and (self._restrict is None or id(p) in self._restrict)

    def _make_bn_check(self, path: str):
        def check(m, args):
            if m.training and torch.is_grad_enabled() and not self._paused:
                raise UnsupportedLayerError(
                    f"BatchNorm layer '{path}' ({type(m).__name__}) is in training mode: it "
                    "normalises with statistics of the whole batch, so one example's gradient "
                    "depends on the others and per-example gradients are undefined. Replace it "
                    "with GroupNorm (opacus.validators.ModuleValidator.fix(model) does this), "
                    "or freeze it in eval mode (model.apply(lambda m: m.eval() if "
                    "isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None))."
                )
        return check

    def guarded_parameters(self) -> list[nn.Parameter]:
        """The parameters whose per-example gradients enter the Gram (each once)."""
        return [p for p in self._all_params() if self._guarded(p)]

    def mark_received(self, params: Iterable[torch.Tensor]) -> None:
        """Record that ``params`` received gradient in this step, for a backward that
        bypasses ``.grad`` (``torch.autograd.grad``): the coverage check needs to know."""
        self._received.update(id(p) for p in params)

    def _root_pre_hook(self, m, args, kwargs):
        if self._paused or not torch.is_grad_enabled():
            return
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(_functorch_wrapped(t) for t in flat):
            return
        self._forward_id += 1
        x = flat[0] if flat else None
        if x is None or x.dim() == 0:
            return
        dim = 0 if self.batch_first or x.dim() < 2 else 1
        batch = x.shape[dim]
        tracker = BatchTracker(batch, self._on_broadcast)
        for t in flat:  # the model's inputs with B entries along the batch dimension
            d = dim if t.dim() > dim else 0
            if t.dim() > d and t.shape[d] == batch:
                tracker.mark_batched(t, d)
        self._forward = (self._forward_id, batch, tracker)
        tracker.__enter__()

    def _root_post_hook(self, m, args, kwargs, output):
        if self._forward is not None:
            tracker = self._forward[2]
            self._forward = None
            tracker.__exit__(None, None, None)

    def _make_forward_hook(self, idx: int):
        def hook(m, args, kwargs, output):
            if self._paused or not torch.is_grad_enabled():
                return
            outs = tree_flatten(output)[0]
            if any(_functorch_wrapped(o) for o in outs):
                return  # a call under vmap/grad (e.g. the user's own torch.func code)
            if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
                return
            owner = self._owners[idx]
            if self._forward is None:  # called outside the root's forward: trust its input
                fid, tracker = self._forward_id, None
                x = _first_tensor(args, kwargs)
                batch = x.shape[0] if x is not None and x.dim() > 0 else 1
            else:
                fid, _, tracker = self._forward
                batch = owner.kernel.call_batch_size(m, args, kwargs)
                if batch is None:
                    batch = tracker.batch_size
                else:  # the layer defines the examples (EmbeddingBag's bags): so be it
                    tracker.batch_size = batch
                    for o in outs:
                        if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == batch:
                            tracker.mark_batched(o, 0)
            if not any(self._guarded(p) for p in owner.params):
                return  # frozen (a LoRA base layer): its A and Δ would be held for nothing
            pack = _checkpoint_pack(owner, args, kwargs)
            if pack is not None and torch._C._current_graph_task_id() != -1:
                # Gradient checkpointing recomputing this forward inside backward: hand it
                # the input, to fill the place this hook packed in the original pass.
                pack[0](args[0])
                return
            # The bookkeeping below is not part of the model's computation: keep it out of
            # the batch tracer (a torch-function mode that would see every detach).
            with torch._C.DisableTorchFunction():
                call = LayerCall(args=_detach(args), kwargs=_detach(kwargs),
                                 backprops=[None] * len(outs), offset=0, batch_size=batch,
                                 out_template=_detach(output))
            if tracker is not None:
                self._trace(owner, tracker, call, args, kwargs, outs)
            if pack is not None:
                # Inside a checkpointed region (non-reentrant torch.utils.checkpoint) the
                # input is packed with the checkpoint's own saved-tensor hooks, like the
                # tensors autograd saves there: dropped after the forward pass, recomputed
                # in backward. Holding it here would cancel the checkpoint's saving.
                holder = pack[0](args[0])
                if not call.shared:
                    call.hook_state["packed"] = (holder, pack[1])
                    call.args = ()
                    call.out_template = _map_tensors(lambda t: torch.empty_like(t, device="meta"),
                                                     call.out_template)
            scale = batch if self.loss_reduction == "mean" else 1
            with torch._C.DisableTorchFunction():
                for k, o in enumerate(outs):
                    if isinstance(o, torch.Tensor) and o.requires_grad:
                        o.register_hook(self._make_backprop_hook(idx, fid, call, k, scale))
            owner.kernel.on_forward(m, call, output)
        return hook

    def _trace(self, owner: _Owner, tracker: BatchTracker, call: LayerCall, args, kwargs,
               outs) -> None:
        """Batch dimensions of the call's inputs and outputs, from the tracker."""
        call.hook_state["owner"] = owner  # for _on_broadcast
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(tracker.is_batched(t) for t in ins):
            tracker.add_shared(owner.path, call, outs)
            call.shared = [r for r in tracker.outputs if r.call is call]
            return
        if owner.kernel.own_batch_dims:
            return

        def dim(t, role):
            if not tracker.is_batched(t):
                return None
            d = tracker.batch_dim(t)
            if d == MERGED and isinstance(owner.kernel, _POSITIONWISE):
                return 0  # [B·T, d] with the batch outermost: read as [B, T, d]
            if d is None or d == MERGED:
                raise UnsupportedLayerError(
                    f"layer '{owner.path}' ({type(owner.module).__name__}) gets a batched {role} "
                    f"of shape {tuple(t.shape)} in which gradguard cannot tell the batch "
                    f"dimension (the batch B={tracker.batch_size} is merged into another "
                    "dimension, or several dimensions have size B and the operations before "
                    "it do not say which). Keep the batch as its own dimension, use a batch "
                    "size different from the other dimensions, or register a kernel for the "
                    "layer (gradguard.register_kernel)."
                )
            return d

        arg_dims = tuple(dim(a, "input") if isinstance(a, torch.Tensor) else None
                         for a in args)
        kw_dims = {k: dim(v, f"argument {k!r}") if isinstance(v, torch.Tensor) else None
                   for k, v in kwargs.items()}
        out_dims = [dim(o, "output") if isinstance(o, torch.Tensor) else None for o in outs]
        call.batch_dims = (arg_dims, kw_dims, out_dims)
        if isinstance(owner.kernel, FunctionalKernel):
            return
        first = arg_dims[0] if arg_dims else None
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        # Layers acting on trailing dimensions only can take the batch anywhere before them
        # (their kernels move it first).
        trailing = 1 if isinstance(owner.kernel, LinearKernel) else \
            0 if isinstance(owner.kernel, EmbeddingKernel) else \
            len(owner.module.normalized_shape) if isinstance(owner.kernel, GradSamplerKernel) \
            and isinstance(owner.module, _TRAILING_NORMS) else None
        movable = trailing is not None and x is not None and first is not None and \
            first < x.dim() - trailing
        if x is not None and first is None and x.dim() > 0 and x.shape[0] != call.batch_size:
            self._refuse_not_batch_first(owner, x, call.batch_size)
        if first not in (None, 0) and not movable:
            self._refuse_not_batch_first(owner, x, call.batch_size)

    def _refuse_not_batch_first(self, owner: _Owner, x: torch.Tensor, batch: int):
        raise UnsupportedLayerError(
            f"layer '{owner.path}' ({type(owner.module).__name__}) got an input of shape "
            f"{tuple(x.shape)} whose batch dimension (B={batch}) is not first; its kernel "
            "needs batch-first inputs (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, "
            "nn.MultiheadAttention, RNNs and the torch.func fallback take any batch dimension). "
            "Transpose the input, or register a kernel."
        )

    def _on_broadcast(self, shared: SharedOutput, out: torch.Tensor, sign: float,
                      lead: int) -> None:
        """A shared output added, broadcast, to the batched ``out``: attribute it exactly by
        expanding the call to per-example inputs and taking ``sign · ∂L/∂out`` as its Δ."""
        call, k = shared.call, shared.k
        owner = call.hook_state["owner"]
        x = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else None
        template = tree_flatten(call.out_template)[0][k]
        if not isinstance(owner.kernel, _POSITIONWISE) or x is None or len(call.args) != 1 \
                or x.dim() == 0 or x.shape[0] != template.shape[0]:
            BatchTracker._refuse(shared, "it is broadcast over the batch, and only nn.Linear "
                                         "and nn.Embedding outputs can be expanded per example")
        expand = tuple(out.shape[:lead + 1])
        call.args = (x.reshape((1,) * lead + tuple(x.shape)).expand(*expand, *x.shape[1:]),)
        call.out_template = template.reshape((1,) * lead + tuple(template.shape)).expand(
            *out.shape)
        call.batch_dims = ((0,), {}, [0])
        call.hook_state["broadcast"] = {k}
        idx = self._owners.index(owner)
        fid = self._forward[0]
        scale = call.batch_size if self.loss_reduction == "mean" else 1
        if out.requires_grad:
            out.register_hook(self._make_backprop_hook(idx, fid, call, k, scale, sign=sign))

    def _make_backprop_hook(self, idx: int, fid: int, call: LayerCall, k: int, scale: int,
                            sign: float | None = None):
        def hook(grad):
            if sign is None and k in call.hook_state.get("broadcast", ()):
                return  # summed over examples; the broadcast sum's gradient is taken instead
            # Stored unscaled: multiplying every output gradient by the batch size costs a
            # full copy per layer; _collect folds the scale into the results instead.
            if call.condensed is not None:
                owner = self._owners[idx]
                raise UnsupportedLayerError(
                    f"a second backward pass reached layer '{owner.path}' "
                    f"({type(owner.module).__name__}) through a forward whose inputs gradguard "
                    "already released (it kept the layer's per-example gradients, or their "
                    "sketch, when the first output gradient arrived). Run one backward per "
                    "forward, or pass strategy='ghost' so every capture is kept until the step.")
            packed = call.hook_state.pop("packed", None)
            if packed is not None:  # the checkpoint recomputes the input (once) on request
                holder, unpack = packed
                call.args = (unpack(holder).detach(),)
            g = grad.detach() if sign is None else grad.detach() * sign
            prev = call.backprops[k]
            call.backprops[k] = g if prev is None else prev + g
            call.extra.clear()  # kernels' caches were built from the old Δ
            call.extra["backprop_scale"] = scale
            if not call.hook_state.get("promoted"):
                call.hook_state["promoted"] = True
                # The k-th call of a layer in a step gets the same workspace every step.
                call.workspace = self._workspaces[(idx, len(self._calls[idx]))]
                self._calls[idx].append((fid, call))
            self._collected = None
            self._assembled.clear()
            if sign is None and len(call.backprops) == 1:
                self._maybe_condense(idx, call)
        return hook

    # ------------------------------------------------------------------ condensing
    def _condensable_names(self, idx: int, call: LayerCall) -> list[str]:
        """The guarded names of a call that may be condensed (a linear layer, one output,
        per-example, not sharing a parameter with another layer); else []."""
        owner = self._owners[idx]
        if not isinstance(owner.kernel, LinearKernel) or call.shared or \
                call.hook_state.get("broadcast") or any(id(p) in self._tied for p in owner.params):
            return []
        return [n for n, p in zip(owner.names, owner.params) if self._guarded(p)]

    def _maybe_condense(self, idx: int, call: LayerCall) -> None:
        """Reduce the call to its per-example rows now, if its route allows and they are
        smaller than the captures (see the class docstring, Memory)."""
        if call.batch_size == 0:
            return
        plan = self._tied_sketch_plan(idx)
        if plan is not None:
            self._condense_tied(idx, call, plan)
            return
        names = self._condensable_names(idx, call)
        if not names:
            return
        owner, b = self._owners[idx], call.batch_size
        seg = owner.kernel._segs(owner.module, [call])[0]  # (the cost model reads it too)
        captured = seg.A.numel() + seg.D.numel()
        kind = size = None
        if self._use_sketch(owner, [call], b, names):
            if self.gram_only:  # else the update may be rebuilt from the captures: keep them
                kind = "sketch"
                size = b * seg.A.shape[2] * min(self.sketch_dim, seg.A.shape[3] * seg.D.shape[3])
        elif self.strategy != "ghost" and not self._use_ghost(owner, [call], b, names):
            kind, size = "materialise", b * seg.A.shape[2] * seg.A.shape[3] * seg.D.shape[3]
        # The segment was cached before _collect placed the call in the batch: drop it.
        call.extra.pop("affine_segment", None)
        if kind is not None and size < captured:
            self._condense(idx, call, names, kind)

    def _promote_captures(self, call: LayerCall) -> None:
        call.args, call.backprops = _map_tensors(lambda t: _promote(t, self.gram_dtype),
                                                 (call.args, call.backprops))

    @staticmethod
    def _keep_only(call: LayerCall, kind: str, rows: dict[str, torch.Tensor]) -> None:
        """The call keeps ``rows`` and releases its inputs, output and output gradients."""
        call.condensed = {"kind": kind, "rows": rows}
        call.args, call.kwargs, call.out_template = (), {}, None
        call.backprops = [None] * len(call.backprops)

    def _condense(self, idx: int, call: LayerCall, names, kind: str) -> None:
        owner = self._owners[idx]
        self._promote_captures(call)
        seg = owner.kernel.segments(owner.module, [call])[0]
        sketch = None
        if kind == "sketch":
            positions = self._sketch_positions.setdefault(idx, seg.A.shape[1])

            def sketch(s):
                return sketch_rows([s], s.A.shape[0], sketch_dim=self.sketch_dim,
                                   seed=self.sketch_seed, key=owner.path,
                                   cache=self._projections, positions=positions)
        self._keep_only(call, kind, condensed_rows(seg, names, sketch=sketch))

    def _tied_sketch_plan(self, idx: int) -> tuple[int, str, int, int] | None:
        """(param id, projection key, d, V) when owner ``idx`` uses a weight tied between an
        embedding and a bias-free linear head that is sketched under a monitor (only its
        sketch rows are needed, so each use keeps them as its Δ arrives); else None."""
        if not (self.gram_only and self.strategy == "sketch"):
            return None
        tied = [p for p in self._owners[idx].params if id(p) in self._tied and self._guarded(p)]
        if len(tied) != 1 or tied[0].numel() <= self.sketch_dim:
            return None
        p = tied[0]
        owners = [self._owners[i] for i in self._tied_owners[id(p)]]
        embeddings = [o for o in owners if type(o.kernel) is EmbeddingKernel]
        heads = [o for o in owners if type(o.kernel) is LinearKernel and o.module.bias is None]
        if len(owners) != 2 or len(embeddings) != 1 or len(heads) != 1:
            return None
        return id(p), owners[0].path + ".tied", p.shape[1], p.shape[0]

    def _condense_tied(self, idx: int, call: LayerCall, plan: tuple[int, str, int, int]) -> None:
        """Reduce one use of a sketched tied weight to its sketch rows (see
        :func:`~gradguard.uniqueness.kernels.sketch.add_tied_rows_`); ``plan`` from
        :meth:`_tied_sketch_plan`."""
        pid, key, d, vocab = plan
        owner = self._owners[idx]
        self._promote_captures(call)
        if isinstance(owner.kernel, EmbeddingKernel):
            ids, D, _ = owner.kernel._segments(owner.module, [call])[0]
            uses = {"emb_segs": [(ids, D, 0)]}
            positions, dtype = ids.shape[1], D.dtype
        else:
            seg = owner.kernel.segments(owner.module, [call])[0]
            uses = {"head_segs": [_Segment(seg.A, seg.D, 0)]}
            positions, dtype = seg.A.shape[1], seg.A.dtype
        positions = self._sketch_positions.setdefault(pid, positions)
        proj = tied_projections(d, vocab, positions, sketch_dim=self.sketch_dim,
                                seed=self.sketch_seed, key=key, device=call.backprops[0].device,
                                dtype=dtype, cache=self._projections)
        R = torch.zeros(call.batch_size, 1, proj.r, proj.k_out, proj.k_in, dtype=dtype,
                        device=call.backprops[0].device)
        add_tied_rows_(R, proj, **uses)
        self._keep_only(call, "sketch", {"weight": proj.finish(R)})

    def _tied_condensed_rows(self, uses, calls, batch: int) -> torch.Tensor | None:
        """``[B, m]`` sketch rows of a tied weight whose uses were condensed, else None."""
        use_calls = [(idx, c) for idx, _, _ in uses for c in calls[idx]]
        if not any(c.condensed is not None for _, c in use_calls):
            return None
        R = None
        for idx, c in use_calls:
            if c.condensed is None:
                self._condense_tied(idx, c, self._tied_sketch_plan(idx))
            r = c.condensed["rows"]["weight"]
            if R is None:
                R = r.new_zeros(batch, r.shape[1])
            R[c.offset:c.offset + c.batch_size] += r
        return R

    def _condensed_rows(self, idx: int, calls: list[LayerCall], batch: int,
                        names) -> tuple[str, dict[str, torch.Tensor]] | None:
        """(kind, {name: [B, n]}) when some call of the owner was condensed (the others are
        condensed the same way now), else ``None``."""
        if idx in self._assembled:  # (gram, then weighted_grads under a policy)
            return self._assembled[idx]
        kind = next((c.condensed["kind"] for c in calls if c.condensed is not None), None)
        if kind is None:
            return None
        rows: dict[str, torch.Tensor] = {}
        for c in calls:
            if c.condensed is None:
                self._condense(idx, c, names, kind)
            for name, r in c.condensed["rows"].items():
                if name not in rows:
                    rows[name] = r.new_zeros(batch, r.shape[1])
                rows[name][c.offset:c.offset + c.batch_size] += r
        self._assembled[idx] = kind, rows
        return kind, rows

    def _refuse_sketched(self, idx: int, what: str):
        raise RuntimeError(
            f"{what} of layer '{self._owners[idx].path}' are not available: it is sketched and "
            "the hooks kept only its sketch (GramHooks(gram_only=True), which GradGuard uses "
            "under policy='monitor'). Rebuilding an update needs the captures: use "
            "gram_only=False, a policy that acts, or, for virtual steps under monitor "
            "(signal_skip_step), accumulate in the loop instead (no zero_grad between "
            "micro-batches, accumulation_steps=N).")

    def _mark_received(self, p: torch.Tensor) -> None:
        if not self._paused:
            self._received.add(id(p))
            self._grad_after_backward[id(p)] = (weakref.ref(p.grad), p.grad._version)

    # ------------------------------------------------------------------ state
    def remove(self) -> None:
        """Remove every hook and drop captured tensors; the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        self._workspaces.clear()
        self._projections.clear()

    @contextlib.contextmanager
    def paused(self):
        """Capture nothing inside this block (e.g. for evaluation or probes with grad)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def clear(self) -> None:
        """Forget what was captured (call after each optimizer step)."""
        self._calls.clear()
        self._sketch_positions.clear()
        self._assembled.clear()
        self._received.clear()
        self._grad_after_backward.clear()
        self._collected = None

    def _collect(self) -> tuple[int, dict[int, list[LayerCall]]]:
        """Calls that took part in a backward pass, placed in the logical batch.

        Computed once per step (``gram`` and ``weighted_grads`` share it). Output
        gradients are kept unscaled; when every call shares one loss-reduction scale s
        (one forward, or equal micro-batches) it is applied to the results (K·s², g·s),
        otherwise each call's Δ is multiplied by its own scale here. Kernels are linear
        in the backprops, so both give the same numbers.
        """
        if self._collected is not None:
            return self._collected
        with_grad = sorted({fid for calls in self._calls.values() for fid, c in calls
                            if _has_grad(c)})
        batch_of = {fid: c.batch_size for calls in self._calls.values() for fid, c in calls}
        offsets, total = {}, 0
        for fid in with_grad:
            offsets[fid] = total
            total += batch_of[fid]
        promote = self.gram_dtype
        result: dict[int, list[LayerCall]] = {}
        for idx, calls in self._calls.items():
            kept = []
            for fid, c in calls:
                if fid not in offsets or not _has_grad(c):
                    continue
                for r in c.shared:
                    if r.resolution is None and c.backprops[r.k] is not None:
                        BatchTracker._refuse(r, "it meets the batch only through other "
                                                "operations or layers" if r.uses else
                                                "it reaches the loss without meeting the "
                                                "batch (a batch-level term, e.g. a regulariser)")
                c.offset = offsets[fid]
                c.args, c.kwargs, c.backprops, c.out_template, c.captures, c.saved = \
                    _map_tensors(lambda t: _promote(t, promote), (
                        c.args, c.kwargs, c.backprops, c.out_template, c.captures, c.saved))
                kept.append(c)
            if kept:
                result[idx] = kept
        self._check_coverage(result)
        scales = {c.extra.get("backprop_scale", 1) for kept in result.values() for c in kept}
        self._uniform_scale = len(scales) <= 1
        self._scale = scales.pop() if len(scales) == 1 else 1
        if scales:  # micro-batches of different sizes: scale each call's Δ itself
            for kept in result.values():
                for c in kept:
                    s = c.extra.pop("backprop_scale", 1)
                    c.extra.clear()
                    if s != 1:
                        c.backprops = [None if b is None else b * s for b in c.backprops]
                        if c.condensed is not None:
                            c.condensed["rows"] = {k: v * s for k, v in
                                                   c.condensed["rows"].items()}
                        c.captures = {k: _map_tensors(lambda t, s=s: t * s, v)
                                      for k, v in c.captures.items()}
        self._collected = (total, result)
        return self._collected

    def _check_coverage(self, calls: dict[int, list[LayerCall]]) -> None:
        for idx, owner in enumerate(self._owners):
            if idx in calls:
                continue
            for n, p in zip(owner.names, owner.params):
                if (id(p) in self._received and self._guarded(p)
                        and not self._shared_elsewhere(p, calls)):
                    raise UnsupportedLayerError(
                        f"parameter '{owner.path}.{n}' received a gradient, but its module "
                        f"'{owner.path}' ({type(owner.module).__name__}) was never called in the "
                        "forward pass: it is used functionally by another module (e.g. "
                        "F.linear(x, self.child.weight)). gradguard cannot attribute that "
                        "gradient to examples. Register a kernel that covers the parent module "
                        "(a LayerKernel with covers_submodules=True) via "
                        "gradguard.register_kernel."
                    )

    def _shared_elsewhere(self, p, calls) -> bool:
        return any(i in calls and any(q is p for q in o.params) for i, o in enumerate(self._owners))

    @property
    def batch_size(self) -> int:
        """Examples in the captured logical batch (0 before any backward)."""
        return self._collect()[0] if self._calls else 0

    # ------------------------------------------------------------------ results
    def _plan(self, calls: dict[int, list[LayerCall]]):
        """Per owner: the trainable names it handles alone, and the tied parameters."""
        counts: dict[int, int] = defaultdict(int)
        for o in self._owners:
            for p in o.params:
                counts[id(p)] += 1
        solo, tied = {}, defaultdict(list)
        for idx, o in enumerate(self._owners):
            if idx not in calls:
                continue
            names = []
            for n, p in zip(o.names, o.params):
                if not self._guarded(p):
                    continue
                if counts[id(p)] > 1:
                    tied[id(p)].append((idx, n, p))
                else:
                    names.append(n)
            solo[idx] = names
        return solo, tied

    def _use_ghost(self, owner: _Owner, calls, batch: int, names) -> bool:
        if self.strategy == "materialise":
            return False
        ghost, materialise = owner.kernel.costs(owner.module, calls, batch, names)
        if ghost == float("inf"):
            return False
        return self.strategy == "ghost" or ghost <= materialise

    def _tied_uses(self, uses, calls):
        return [(self._owners[idx].module, self._owners[idx].kernel, calls[idx])
                for idx, _, _ in uses]

    def _tied_route(self, uses, calls, batch: int) -> str:
        """``"sketch"``, ``"ghost"`` or ``"materialise"`` for a weight shared by several layers
        (an embedding and its LM head have the first two; other sharings materialise)."""
        tied = self._tied_uses(uses, calls)
        if self.strategy == "materialise":
            return "materialise"
        ghost, materialise = tied_embedding_head_costs(tied, batch)
        if self.strategy in ("sketch", "auto") and ghost != float("inf") and \
                uses[0][2].numel() > self.sketch_dim:
            if self.strategy == "sketch":
                return "sketch"
            cost, backward = tied_sketch_costs(tied, self.sketch_dim)
            if min(ghost, materialise) > AUTO_SKETCH_MULTIPLE * backward and cost < ghost and \
                    cost < materialise:
                return "sketch"
        if ghost != float("inf") and (self.strategy == "ghost" or ghost <= materialise):
            return "ghost"
        return "materialise"

    def _use_sketch(self, owner: _Owner, calls, batch: int, names) -> bool:
        if self.strategy not in ("sketch", "auto") or not can_sketch(
                owner.kernel, owner.module, names, self.sketch_dim):
            return False
        if self.strategy == "sketch":
            return True
        cost, backward = sketch_costs(owner.kernel, owner.module, calls, self.sketch_dim)
        exact = min(owner.kernel.costs(owner.module, calls, batch, names))
        return exact > AUTO_SKETCH_MULTIPLE * backward and cost < exact

    def gram(self) -> torch.Tensor:
        """The B×B Gram of per-example gradients of the guarded parameters (float64, or
        float32 on a device without float64).

        Raises:
            UnsupportedLayerError: a parameter received gradient that cannot be attributed.
        """
        batch, calls = self._collect()
        device = _first_param_device(self.module)
        # float64 sums, or float32 where the device has no float64 (see solve_dtype)
        K = torch.zeros(batch, batch, dtype=solve_dtype(device), device=device)
        solo, tied = self._plan(calls)
        with self._computing():  # (on every rank, also with an empty batch)
            for idx, names in solo.items() if batch else ():
                if not names:
                    continue
                o = self._owners[idx]
                condensed = self._condensed_rows(idx, calls[idx], batch, names)
                if condensed is not None:
                    if condensed[0] == "sketch":
                        self.sketched_layers.add(o.path)
                    for r in condensed[1].values():
                        r = r.to(self.gram_dtype)
                        K += r @ r.T
                elif self._use_sketch(o, calls[idx], batch, names):
                    self.sketched_layers.add(o.path)
                    K += sketched_gram(o.kernel, o.module, calls[idx], batch, names,
                                       self.gram_dtype, sketch_dim=self.sketch_dim,
                                       seed=self.sketch_seed, key=o.path,
                                       cache=self._projections)
                elif self._use_ghost(o, calls[idx], batch, names):
                    K += o.kernel.gram(o.module, calls[idx], batch, names, self.gram_dtype)
                else:
                    K += o.kernel.materialised_gram(o.module, calls[idx], batch, names,
                                                    self.gram_dtype)
            for uses in tied.values() if batch else ():
                R = self._tied_condensed_rows(uses, calls, batch)
                if R is not None:
                    self.sketched_layers.add(self._owners[uses[0][0]].path + ".tied")
                    R = R.to(self.gram_dtype)
                    K += R @ R.T
                    continue
                route = self._tied_route(uses, calls, batch)
                if route == "sketch":
                    self.sketched_layers.add(self._owners[uses[0][0]].path + ".tied")
                    K += sketched_tied_gram(self._tied_uses(uses, calls), batch, self.gram_dtype,
                                            sketch_dim=self.sketch_dim, seed=self.sketch_seed,
                                            key=self._owners[uses[0][0]].path + ".tied",
                                            cache=self._projections)
                    continue
                if route == "ghost":
                    K += tied_embedding_head_gram(self._tied_uses(uses, calls), batch,
                                                  self.gram_dtype)
                    continue
                K += _gram_of([self._tied_per_example_grads(uses, calls, batch)], batch,
                              self.gram_dtype)
        if self._scale != 1:
            K *= float(self._scale) ** 2
        # Layer Grams formed in float32 (chunked einsums) are symmetric only to rounding,
        # and gnq_from_gram refuses asymmetry beyond float64's: a Gram is symmetric.
        return (K + K.T) / 2

    def _tied_per_example_grads(self, uses, calls, batch: int) -> torch.Tensor:
        """Per-example gradients of a weight used by several layers: the sum of its uses'.
        Embedding uses scatter their rows into the others' sum in place (a tied LM head's
        [B, V, E] is not allocated twice)."""
        for idx, _, _ in uses:
            if any(c.condensed is not None for c in calls[idx]):
                self._refuse_sketched(idx, "per-example gradients")
        g = None
        embedding_last = sorted(uses, key=lambda u: isinstance(self._owners[u[0]].kernel,
                                                               EmbeddingKernel))
        for idx, n, _ in embedding_last:
            o = self._owners[idx]
            if g is not None and isinstance(o.kernel, EmbeddingKernel) and g.is_contiguous():
                o.kernel.add_per_example_grads(o.module, calls[idx], batch, out=g)
                continue
            part = o.kernel.per_example_grads(o.module, calls[idx], batch, [n])[n]
            g = part if g is None else g + part
        return g

    def per_example_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """Materialised per-example gradients ``{param: [B, *param.shape]}`` (for checks)."""
        batch, calls = self._collect()
        out: dict[nn.Parameter, torch.Tensor] = {}
        solo, tied = self._plan(calls)
        with self._computing():
            for idx, names in solo.items():
                o = self._owners[idx]
                if not names:
                    continue
                condensed = self._condensed_rows(idx, calls[idx], batch, names)
                if condensed is None:
                    grads = o.kernel.per_example_grads(o.module, calls[idx], batch, names)
                elif condensed[0] == "sketch":
                    self._refuse_sketched(idx, "per-example gradients")
                else:
                    grads = {n: o.kernel.from_rows(o.module, n, r)
                             for n, r in condensed[1].items()}
                for n, g in grads.items():
                    out[_param(o, n)] = g
            for uses in tied.values():
                out[uses[0][2]] = self._tied_per_example_grads(uses, calls, batch)
        if self._scale != 1:
            out = {p: g * self._scale for p, g in out.items()}
        return out

    def weighted_grads(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Σ_j w_j g_j for every guarded parameter that took part in the step.

        Layers with ghost kernels compute it as one matmul from A and Δ (book-keeping),
        without a second backward pass and without per-example gradients.
        """
        calls, weights, jobs = self._weighted_jobs(weights)
        batch = weights.shape[0]
        out: dict[nn.Parameter, torch.Tensor] = {}
        with self._computing():  # (also with no example: FSDP's gathers pair up on every rank)
            for idx, names in jobs if weights.shape[0] else []:
                o = self._owners[idx]
                condensed = self._condensed_rows(idx, calls[idx], batch, names)
                if condensed is None:
                    grads = o.kernel.weighted_grads(o.module, calls[idx], weights, names)
                elif condensed[0] == "sketch":
                    self._refuse_sketched(idx, "weighted gradients")
                else:  # Σ_j w_j g_j from the kept per-example rows
                    grads = {n: o.kernel.from_rows(o.module, n,
                                                   (weights.to(r.dtype) @ r).unsqueeze(0))[0]
                             for n, r in condensed[1].items()}
                for n, g in grads.items():
                    p = _param(o, n)
                    g = g.to(p.dtype)
                    out[p] = g if p not in out else out[p] + g
        return out

    def _weighted_jobs(self, weights: torch.Tensor):
        """The step's calls, ``weights`` with the loss-reduction scale folded in, and the
        (owner, parameter names) to reweight: solo parameters per owner, tied ones per use."""
        batch, calls = self._collect()
        if weights.shape != (batch,):
            raise ValueError(f"weights must have shape ({batch},), got {tuple(weights.shape)}")
        solo, tied = self._plan(calls)
        if self._scale != 1:
            weights = weights * self._scale
        jobs = [(idx, names) for idx, names in solo.items() if names]
        jobs += [(idx, [n]) for uses in tied.values() for idx, n, _ in uses]
        return calls, weights, jobs

    def grads_modified(self) -> bool:
        """Whether a guarded ``.grad`` changed since the captured backward passes wrote it
        (replaced, or modified in place, e.g. by ``clip_grad_norm_``)."""
        for p in self._all_params():
            if not self._guarded(p) or p.grad is None:
                continue
            seen = self._grad_after_backward.get(id(p))
            if seen is None or seen[0]() is not p.grad or seen[1] != p.grad._version:
                return True
        return False

    def backward_scale(self) -> int | None:
        """The s with ``s · p.grad == Σ_j g_j`` for every guarded parameter, if known.

        That holds when no ``.grad`` was modified since the captured backward passes
        (:meth:`grads_modified`) and every call shares one loss-reduction scale s (the
        batch size under ``"mean"``, 1 under ``"sum"``); otherwise ``None``. It lets a
        reweighted update be written as a correction of ``.grad`` over the few examples
        whose weight changed.
        """
        self._collect()
        if not self._uniform_scale or self.grads_modified():
            return None
        return self._scale

    def layer_routes(self) -> dict[str, str]:
        """For the last captured step: each layer's route, ``"ghost"``, ``"materialise"``
        or ``"sketch"``."""
        batch, calls = self._collect()
        solo, tied = self._plan(calls)
        routes = {}
        for idx, names in solo.items():
            o = self._owners[idx]
            kind = next((c.condensed["kind"] for c in calls[idx] if c.condensed is not None),
                        None)
            if names and kind is not None:
                routes[o.path] = kind
            elif names and self._use_sketch(o, calls[idx], batch, names):
                routes[o.path] = "sketch"
            elif names:
                routes[o.path] = "ghost" if self._use_ghost(o, calls[idx], batch, names) \
                    else "materialise"
        for uses in tied.values():
            condensed = any(c.condensed is not None for idx, _, _ in uses for c in calls[idx])
            route = "sketch" if condensed else self._tied_route(uses, calls, batch)
            for idx, n, _ in uses:
                routes[f"{self._owners[idx].path}.{n} (tied)"] = route
        return routes


def _checkpoint_pack(owner: _Owner, args, kwargs):
    """The (pack, unpack) saved-tensor hooks of a non-reentrant ``torch.utils.checkpoint``
    region this call runs in, for a layer on one input whose kernel needs only that input
    and the output gradient (linear layers, norms); else ``None``.

    Reads torch's current default saved-tensor hooks (``torch.utils.checkpoint`` does the
    same to find the user's hooks), so it follows that private API."""
    if not isinstance(owner.kernel, (LinearKernel, GradSamplerKernel)) or len(args) != 1 or \
            kwargs or not isinstance(args[0], torch.Tensor):
        return None
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None  # (a torch without it: hold as before)
    if hooks is None or not getattr(hooks[0], "_checkpoint_internal", False):
        return None
    return hooks


def _has_grad(call: LayerCall) -> bool:
    return call.condensed is not None or any(b is not None for b in call.backprops)


def _param(owner: _Owner, name: str) -> nn.Parameter:
    return owner.params[owner.names.index(name)]


def _promote(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and \
            torch.finfo(t.dtype).bits < torch.finfo(dtype).bits:
        return t.to(dtype)
    return t


def _first_param_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def per_example_gnq(model: nn.Module, loss_fn, x, y, lam: float = 1e-2, *, relative: bool = False,
                    strategy: str = "auto", batch_first: bool = True,
                    gram_dtype: torch.dtype | None = None, sketch_dim: int | None = None,
                    sketch_seed: int = 0) -> torch.Tensor:
    """One-shot GNQ of every example in a batch, with the same engine as :class:`GradGuard`.

    The model's parameters' ``.grad`` are left untouched.

    Args:
        model: the model (train or eval mode; BatchNorm must be in eval mode).
        loss_fn: ``loss_fn(model(x), y)``, summed over examples (``reduction="sum"``).
        x: the batch of inputs (a tensor, or a tuple of positional inputs).
        y: the targets.
        lam: ridge λ > 0 (or ρ with ``relative=True``).
        relative: use λ = ρ·trace(K)/B.
        strategy: ``"auto"``, ``"ghost"``, ``"materialise"`` or ``"sketch"`` (see
            :class:`GramHooks`). ``"auto"`` is exact except for layers whose exact routes
            cost more than ``AUTO_SKETCH_MULTIPLE`` × their backward (large batches of short
            sequences, very wide layers), which it sketches; pass ``"ghost"`` or
            ``"materialise"`` for exact GNQ always.
        batch_first: whether inputs are batch first.
        gram_dtype: dtype of the layer Grams (default float32, float64 for float64 models).
        sketch_dim: per-layer sketch size where a layer is sketched.
        sketch_seed: seed of the sketch projections.

    Returns:
        ``[B]`` float64 GNQ.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(10, 3)
        >>> x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        >>> loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="sum")
        >>> per_example_gnq(model, loss, x, y).shape
        torch.Size([8])
    """
    hooks = GramHooks(model, loss_reduction="sum", strategy=strategy, batch_first=batch_first,
                      gram_dtype=gram_dtype, sketch_dim=sketch_dim, sketch_seed=sketch_seed)
    try:
        inputs = x if isinstance(x, tuple) else (x,)
        loss = loss_fn(model(*inputs), y)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss is not finite ({loss.item()}); GNQ is undefined for "
                             "this batch")
        params = [p for p in hooks._all_params() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        hooks.mark_received(p for p, g in zip(params, grads) if g is not None)
        K = hooks.gram()
    finally:
        hooks.remove()
    return gnq_from_gram(K, lam, relative=relative)
