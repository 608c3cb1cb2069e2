"""Ops between Skip-Conv layers that follow the sparsity: residual sums, nearest upsampling and channel
concatenations.

Between convolutions most networks add maps (residual shortcuts), often followed by an activation, and
upsample maps to add them to finer ones (HRNet's fuse layers, FPNs). Dense, such an op costs a pass over
the whole map every frame, and its output is a fresh tensor that the next Skip-Conv layer must scan whole to
find what changed (HRNet-w32: ~10 ms a frame of adds and ReLUs, and a full scan in every layer reading a
block's output, also on frames where nothing moved).

These ops keep their output as state. When their inputs are outputs of the sparse backend's layers (or of
other such ops) whose changes since the last frame are known (their ``Revision`` and mark map, see
``backends.sparse``), they recompute only the pixels their inputs wrote; their output carries its own
revision and marks, so the layers reading it scan incrementally. Other inputs (a layer's plain frame, a
fresh tensor) are taken whole, in one pass into the same state. Broadcasting, autograd, and layouts or
devices the C++ step does not cover run the plain op.

``convert`` (sparse backend) calls :func:`follow_sparsity`: ``nn.Upsample`` modules (nearest, power-of-two
factors) become :class:`SparseUpsample`, and in the forward of the model's blocks (a symbolic trace of each
module's own forward, its children as leaves) each ``a + b`` between two tensors a :class:`SparseSum` (an
activation module that alone reads the sum is applied by the sum) and each ``torch.cat(maps, dim=1)`` a
:class:`SparseConcat`.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from skipconv_cli.engine.activations import NONE as NO_ACTIVATION
from skipconv_cli.engine.activations import FusedActivation, activate_, activation_of
from skipconv_cli.engine.backends import native
from skipconv_cli.engine.backends.sparse import (
    UNKNOWN_CHANGE,
    Revision,
    Seen,
    change_since,
    revision_of,
    seen_now,
    state_without_stream,
)

ADDS = (operator.add, torch.add)
CONCATS = (torch.cat, torch.concat, torch.concatenate)
# what ``concat_marked`` is told of each input (the C++ InputChange)
_UNCHANGED, _MARKED, _COMPARED, _WHOLE = 0, 1, 2, 3
_NO_MARKS = torch.empty(0, dtype=torch.uint8)  # what a pass over every pixel writes no marks into
IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def _channels_last_map(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised map of ``shape`` laid out channels_last, as ``like`` (``new_empty`` then
    ``contiguous`` allocated it twice and copied it: openpose-mbv2-14's first frame took 191 ms, 179 ms
    without, medians of 8 streams)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


class FollowsSparsity(nn.Module):
    """The state of an op that follows the sparsity: its output (handed out as is, valid until its next
    call), the mark map of its last write, its revision, and what it last read."""

    # set on every call: past ``nn.Module.__setattr__`` (its checks cost ~1 us each, ~2 ms a frame on HRNet)
    _CALL_ATTRIBUTES = frozenset({"out", "marks", "revision", "inputs", "version", "pixels_written"})

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._CALL_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None
        self.marks: torch.Tensor | None = None  # uint8 [N, H, W]: 2 where the last step wrote
        self.revision = Revision()
        self.inputs: tuple | None = None  # per input at the last call: ``seen_now``
        self.version = 0  # out's version counter after the last call (a write into it downstream)
        self.pixels_written = 0  # since the stream's state was laid out (tests, statistics)
        # called with maps of two shapes (one module at several call sites, as yolox-nano's upsampling):
        # the state would be laid out afresh on every call, so the plain op runs until the next stream
        self.shared = False

    @staticmethod
    def covered(*tensors: torch.Tensor) -> bool:
        """What the C++ ops cover: float32 channels_last CPU maps, no autograd. (Runs on every call of
        every such op: written as plain checks, 1.2 us for two maps against 2.6 us for one ``all`` over a
        generator.)"""
        if native.extension() is None:
            return False
        grad = torch.is_grad_enabled()
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_cpu or t.dim() != 4:
                return False
            if (grad and t.requires_grad) or not t.is_contiguous(memory_format=torch.channels_last):
                return False
        return True

    def changes(self, *tensors: torch.Tensor) -> list | None:
        """Per input: None (unchanged) or the mark map of its one write since the last call; None overall
        when that is not known (another tensor, one without a revision, more writes, a new stream, the
        output written into)."""
        if not self.intact() or len(tensors) != len(self.inputs):
            return None
        found = []  # (a plain loop that stops at the first unknown change: it runs on every call of every op)
        for t, seen in zip(tensors, self.inputs, strict=True):
            change = self.change_of(t, seen)
            if change is UNKNOWN_CHANGE:
                return None
            found.append(change)
        return found

    @staticmethod
    def change_of(t: torch.Tensor, seen: Seen | None) -> object:
        """``change_since`` for an op's input: inference tensors keep no version counter, so a write into
        one is not seen and its change is never known."""
        return UNKNOWN_CHANGE if t.is_inference() else change_since(t, seen)

    def intact(self) -> bool:
        """Whether ``out`` still holds the output as last handed out (not written into downstream since;
        inference tensors keep no version counter to tell)."""
        out = self.out
        if out is None or self.inputs is None or out.is_inference():
            return False
        return out._version == self.version

    def lay_out(self, out: torch.Tensor) -> None:
        """``out`` (a fresh output) becomes the state."""
        self.out = out
        self.marks = torch.zeros((out.shape[0], out.shape[2], out.shape[3]), dtype=torch.uint8)
        self.revision = Revision()
        out.skipconv_state = True  # a model output that is state is copied for the caller
        out.skipconv_revision = self.revision
        self.pixels_written = 0

    def wrote(self, pixels: int | None) -> None:
        """After a write: ``pixels`` written where the mark map says; None: everywhere, the map not kept."""
        revision = self.revision
        if pixels is None:
            revision.number += 1
            revision.marks, revision.marked = None, -1
            return
        self.pixels_written += pixels
        if pixels:
            revision.number += 1
            revision.marks, revision.marked = self.marks, revision.number
        else:  # the mark map was cleared: it no longer describes the last write
            revision.marks, revision.marked = None, -1

    def hand_out(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.inputs = tuple(map(seen_now, tensors))
        self.version = 0 if self.out.is_inference() else self.out._version
        return self.out

    def drop(self) -> None:
        self.out = self.marks = self.inputs = None

    def __getstate__(self) -> dict:
        """Pickled without the stream state (``torch.save`` of a whole model): a loaded copy starts a new
        stream."""
        return state_without_stream(self)

    def reset(self) -> None:
        """Drops the stream state (``engine.reset``)."""
        self.drop()
        self.shared = False

    def shared_by_shapes(self, shape: torch.Size | tuple) -> bool:
        """Whether the op is called with maps of another shape than its state's (see ``shared``)."""
        if self.out is not None and self.out.shape != shape:
            self.shared = True
            self.drop()
        return self.shared

    def state_bytes(self) -> int:
        """Bytes of stream state held: the output and its mark map."""
        return sum(t.untyped_storage().nbytes() for t in (self.out, self.marks) if t is not None)


class SparseSum(FollowsSparsity):
    """``activation(a + b)``, recomputed only where ``a`` or ``b`` changed when that is known."""

    def __init__(self, activation: tuple[int, float, float] | None = None) -> None:
        super().__init__()
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        activation = self.activation or (NO_ACTIVATION, 0.0, 0.0)
        changes = self.changes(a, b) if self.out is not None else None
        extension = native.extension()
        if changes is not None and extension is not None:
            # The common call, decided first: the maps of the last call (``covered`` then), their writes
            # since known. Decided after the checks below, as it was, it cost HRNet-w32 2% more of a frame
            # at ~4.3x fewer MACs and 7% at ~7.7x (161 sums a frame, ~24 us of Python each in the model;
            # A/B in one process).
            if changes[0] is not None or changes[1] is not None:
                self.wrote(extension.add_marked(a, b, self.out, *changes, *activation, self.marks, False))
            return self.hand_out(a, b)
        if not (self.covered(a, b) and a.shape == b.shape):
            self.drop()
            return self._plain(a, b)
        # Every pixel is computed in one pass, the activation applied on the way (an add and then the
        # activation took ~2x as long on HRNet-w32's maps, measured cold).
        if revision_of(a) is None and revision_of(b) is None:
            # both inputs made afresh (layers' plain frames, plain ops): no state is worth keeping; a fresh
            # output reuses memory the allocator just freed, warm in the cache (a kept output cost
            # yolox-nano's sums on the moving camera ~15%). With one input that is state, the output is
            # kept: the sums after it can follow the sparsity again as soon as the other input does.
            self.drop()
            if self.activation is None:
                return self._plain(a, b)  # (as fast as the C++ pass without an activation to fuse)
            out = torch.empty_like(a, memory_format=torch.channels_last)
            native.extension().add_marked(a, b, out, None, None, *activation, _NO_MARKS, False)
            out.skipconv_activation = self.activation  # (as ``activate_`` marks it: applied)
            return out
        if self.shared_by_shapes(a.shape):
            return self._plain(a, b)
        # Every pixel is recomputed; over an intact output only the changed ones are written and marked, so
        # that the ops and layers after this one keep following the sparsity (see ``add_marked``).
        compare = self.intact()
        if self.out is None:
            self.lay_out(torch.empty_like(a, memory_format=torch.channels_last))
            if self.activation is not None:
                self.out.skipconv_activation = self.activation
        written = native.extension().add_marked(a, b, self.out, None, None, *activation, self.marks, compare)
        self.wrote(written if compare else None)
        return self.hand_out(a, b)

    def _plain(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        if self.activation is None or not isinstance(out, torch.Tensor):
            return out
        # in place on the fresh sum, autograd included (the sum's backward does not read its output)
        return activate_(out, self.activation)


class SparseUpsample(FollowsSparsity):
    """An ``nn.Upsample`` (nearest, power-of-two factors) that copies only the pixels its input wrote
    when that is known; otherwise the module it wraps."""

    def __init__(self, upsample: nn.Upsample, factor: tuple[int, int]) -> None:
        super().__init__()
        self.upsample = upsample
        self.factor = factor  # see ``upsample_factor``

    def _write(self, x: torch.Tensor, marks: torch.Tensor | None, compare: bool = False) -> int:
        return native.extension().upsample_marked(x, self.out, marks, *self.factor, self.marks, compare)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        changes = self.changes(x) if self.out is not None else None
        if changes is not None and native.extension() is not None:  # (the common call first: see SparseSum)
            if changes[0] is not None:
                self.wrote(self._write(x, changes[0]))
            return self.hand_out(x)
        if not self.covered(x) or revision_of(x) is None:  # (no revision: see ``SparseSum.forward``)
            self.drop()
            return self.upsample(x)
        shape = (x.shape[0], x.shape[1], x.shape[2] * self.factor[0], x.shape[3] * self.factor[1])
        if self.shared_by_shapes(shape):
            return self.upsample(x)
        compare = self.intact()  # (as in ``SparseSum.forward``)
        if self.out is None:
            self.lay_out(_channels_last_map(x, shape))
        written = self._write(x, None, compare)
        self.wrote(written if compare else None)
        return self.hand_out(x)


class SparseConcat(FollowsSparsity):
    """``torch.cat(maps, dim=1)``, rewritten only where its inputs changed: each input's marked pixels are
    copied into its channels; an input whose changes are not known (a layer's plain frame, a fresh map) is
    compared with its channels, pixel by pixel, and copied where it differs. The output's marks are where
    any input was written, so the layer reading the concatenation scans incrementally (openpose-mbv2's
    stages read ``cat(paf, heat, features)``, yolox's CSP blocks and neck concatenate too)."""

    def __init__(self) -> None:
        super().__init__()
        self.split: tuple[int, ...] | None = None  # the inputs' channels when the output was laid out

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        # all made afresh (layers' plain frames: a moving camera): nothing worth keeping, checked first
        # (the plain concatenation should cost what ``torch.cat`` costs)
        fresh = all(revision_of(t) is None for t in tensors)
        if fresh or not (self.covered(*tensors) and len({(t.shape[0], *t.shape[2:]) for t in tensors}) == 1):
            if self.out is not None:
                self.drop()
            return torch.cat(tensors, 1)
        first = tensors[0]
        shape = (first.shape[0], sum(t.shape[1] for t in tensors), *first.shape[2:])
        if self.shared_by_shapes(shape):
            return torch.cat(tensors, 1)
        concat = native.extension().concat_marked
        split = tuple(t.shape[1] for t in tensors)
        if self.intact() and split == self.split:
            known = [self.change_of(t, seen) for t, seen in zip(tensors, self.inputs, strict=True)]
            changes = [
                _COMPARED if k is UNKNOWN_CHANGE else _UNCHANGED if k is None else _MARKED for k in known
            ]
            marks = [k if c == _MARKED else None for k, c in zip(known, changes, strict=True)]
            if any(changes):
                self.wrote(concat(list(tensors), marks, changes, self.out, self.marks))
        else:
            if self.out is None:
                self.lay_out(_channels_last_map(first, shape))
            concat(list(tensors), [None] * len(tensors), [_WHOLE] * len(tensors), self.out, self.marks)
            self.split = split
            self.wrote(None)
        return self.hand_out(*tensors)


# (left, right, top, bottom) a zero-padding module adds to a map, per module type (``register_zero_pad``)
PaddingOf = Callable[[nn.Module, torch.Tensor], "tuple[int, int, int, int] | None"]
_ZERO_PADS: dict[type, PaddingOf] = {}


def register_zero_pad(module_type: type, padding_of: PaddingOf) -> None:
    """Declares ``module_type`` a module that zero-pads the last two dims of a 4-D map by ``padding_of(module,
    x)`` = (left, right, top, bottom) (None: it does something else for that module or map), so that the
    sparse backend follows it (:class:`SparsePad`). ``nn.ZeroPad2d`` and ``nn.ConstantPad2d`` are declared;
    a model's own padding module (TF "SAME" padding decided at run time) declares itself."""
    _ZERO_PADS[module_type] = padding_of


def _static_zero_padding(module: nn.Module, x: torch.Tensor) -> tuple[int, int, int, int] | None:
    padding = tuple(module.padding)
    if getattr(module, "value", 0.0) != 0.0 or len(padding) != 4 or min(padding) < 0:
        return None
    return padding  # type: ignore[return-value]


register_zero_pad(nn.ZeroPad2d, _static_zero_padding)
register_zero_pad(nn.ConstantPad2d, _static_zero_padding)


class SparsePad(FollowsSparsity):
    """A zero-padding module (see ``register_zero_pad``) whose output is kept: only the pixels its input
    wrote are copied in (an input whose changes are not known: compared pixel by pixel), so that the layer
    reading the padded map (a TF-style stride-2 conv, padded "SAME" before it) scans it incrementally
    instead of a fresh map whole every frame. Inputs made afresh or not covered: the module it wraps."""

    def __init__(self, pad: nn.Module, padding_of: PaddingOf) -> None:
        super().__init__()
        self.pad = pad
        self.padding_of = padding_of
        self.offset: tuple[int, int] | None = None  # (top, left) of the input in the kept output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = None if revision_of(x) is None or not self.covered(x) else self.padding_of(self.pad, x)
        if padding is None or not any(padding):
            if self.out is not None:
                self.drop()
            return self.pad(x)
        left, right, top, bottom = padding
        shape = (x.shape[0], x.shape[1], x.shape[2] + top + bottom, x.shape[3] + left + right)
        if self.shared_by_shapes(shape):
            return self.pad(x)
        pad = native.extension().pad_marked
        if self.intact() and self.offset == (top, left):
            known = self.change_of(x, self.inputs[0])
            if known is UNKNOWN_CHANGE:
                self.wrote(pad(x, self.out, None, top, left, _COMPARED, self.marks))
            elif known is not None:
                self.wrote(pad(x, self.out, known, top, left, _MARKED, self.marks))
        else:
            if self.out is None:
                self.lay_out(_channels_last_map(x, shape))
            pad(x, self.out, None, top, left, _WHOLE, self.marks)
            self.offset = (top, left)
            self.wrote(None)
        return self.hand_out(x)


def upsample_factor(module: nn.Module) -> tuple[int, int] | None:
    """(fh, fw) of an ``nn.Upsample`` that :class:`SparseUpsample` can follow: nearest, scale factors that
    are powers of two (exact in floating point, so the output pixel's source is exactly ``oy // fh``)."""
    if type(module) is not nn.Upsample or module.mode != "nearest" or module.size is not None:
        return None
    factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,) * 2
    if len(factors) != 2 or module.recompute_scale_factor:
        return None
    ints = tuple(int(f) for f in factors)
    if any(f != i or i < 1 or i & (i - 1) for f, i in zip(factors, ints, strict=True)):
        return None
    return ints


def _writes_in_place(node: fx.Node) -> bool:
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.op == "call_function" and node.target in IN_PLACE_OPERATORS


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return True


def follow_sparsity(model: nn.Module) -> int:
    """Replaces, in place, the ops of ``model`` that can follow the sparse backend's sparsity: nearest
    ``nn.Upsample`` modules (see ``upsample_factor``), zero-padding modules (see ``register_zero_pad``), sums
    of two tensors and channel concatenations (see ``follow_sums``). Returns how many were replaced now."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            factor = upsample_factor(child)
            if factor is not None:
                setattr(parent, name, SparseUpsample(child, factor))
                replaced += 1
            elif type(child) in _ZERO_PADS:
                setattr(parent, name, SparsePad(child, _ZERO_PADS[type(child)]))
                replaced += 1
    return replaced + follow_sums(model)


def follow_sums(model: nn.Module) -> int:
    """Replaces, in place, each sum of two tensors in the forward of ``model``'s own (non-``torch.nn``)
    modules by a :class:`SparseSum`, fusing an activation module that alone reads it, and each channel
    concatenation by a :class:`SparseConcat`. A forward that takes lists of tensors (HRNet's modules: one
    map per branch) is traced on its first call, when their lengths are known; modules whose forward cannot
    be traced run as written. Returns how many ops were replaced now."""
    replaced = 0
    for module in list(model.modules()):
        if type(module).__module__.startswith("torch.") or not list(module.children()):
            continue
        if isinstance(module, (FollowsSparsity, FusedActivation, fx.GraphModule)):
            continue
        try:
            graph = _OwnForwardTracer().trace(module)
        except Exception:  # control flow on values, lists of tensors, unsupported calls
            module.register_forward_pre_hook(_trace_on_first_call)
            continue
        replaced += _rewrite(module, graph)
    return replaced


def _rewrite(module: nn.Module, graph: fx.Graph, lists: tuple[int, dict[int, int]] | None = None) -> int:
    count = _replace_sums(module, graph) + _replace_concats(module, graph)
    if count:
        _drop_identities(module, graph)
        for node in graph.nodes:
            # a forward annotated under ``from __future__ import annotations`` gives string types, which
            # the generated code names as globals that pickling (``torch.save`` of a model) cannot handle
            node.type = None
        traced = fx.GraphModule(module, graph, class_name=type(module).__name__)
        # the instance's forward: the module keeps its type and state
        module.forward = traced.forward if lists is None else _ListsForward(traced, module, *lists)
    return count


class _ListsForward:
    """The rewritten forward of a module traced with ``count`` arguments, its lists of tensors unpacked
    (``lengths``: argument index -> list length); other calls run the forward as written. (A class rather
    than a closure: a converted model pickles, ``torch.save`` of the whole model.)"""

    def __init__(
        self, traced: fx.GraphModule, module: nn.Module, count: int, lengths: dict[int, int]
    ) -> None:
        self.traced, self.module, self.count, self.lengths = traced, module, count, lengths

    def __call__(self, *args: object) -> object:
        if len(args) == self.count and all(
            isinstance(args[i], (list, tuple)) and len(args[i]) == n for i, n in self.lengths.items()
        ):
            return self.traced(*args)
        return type(self.module).forward(self.module, *args)


def _drop_identities(module: nn.Module, graph: fx.Graph) -> None:
    """Calls of ``nn.Identity`` submodules (the BatchNorms folded into their convs) leave the rewritten
    forward: each cost a module call and an attribute lookup (~2 us; HRNet-w32's blocks made 220 a frame)."""
    for node in list(graph.nodes):
        if node.op == "call_module" and type(module.get_submodule(node.target)) is nn.Identity and node.args:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()


def _trace_on_first_call(module: nn.Module, args: tuple) -> None:
    """Traces ``module``'s forward with each list (or tuple) of tensors it was called with unpacked, and
    rewrites its sums; later calls with lists of other lengths run the forward as written."""
    for handle_id, hook in list(module._forward_pre_hooks.items()):
        if hook is _trace_on_first_call:
            del module._forward_pre_hooks[handle_id]
    names = list(inspect.signature(module.forward).parameters)
    lengths = {
        index: len(arg)
        for index, arg in enumerate(args)
        if isinstance(arg, (list, tuple)) and arg and all(isinstance(t, torch.Tensor) for t in arg)
    }
    if not lengths or len(args) > len(names):
        return
    concrete = {names[i]: [fx.PH] * n for i, n in lengths.items()}
    try:
        graph = _OwnForwardTracer().trace(module, concrete_args=concrete)
    except Exception:
        return
    _rewrite(module, graph, (len(args), lengths))


def _replace_concats(module: nn.Module, graph: fx.Graph) -> int:
    """``torch.cat`` of a list of maps along dim 1 -> :class:`SparseConcat` (its checks at run time: 4-D
    maps of one size; anything else runs ``torch.cat``)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in CONCATS or not node.args:
            continue
        maps, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim != 1 or set(node.kwargs) - {"dim"} or not isinstance(maps, (list, tuple)):
            continue
        if not maps or not all(isinstance(arg, fx.Node) for arg in maps):
            continue
        if any(_writes_in_place(user) for user in node.users):
            continue  # (as for sums)
        name = f"skipconv_concat{count}"
        while hasattr(module, name):
            name += "_"
        module.add_module(name, SparseConcat())
        with graph.inserting_after(node):
            concatenated = graph.call_module(name, args=tuple(maps))
        node.replace_all_uses_with(concatenated)
        graph.erase_node(node)
        count += 1
    graph.lint()
    return count


def _replace_sums(module: nn.Module, graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in ADDS) or (
            node.op == "call_method" and node.target == "add"
        )
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(arg, fx.Node) for arg in node.args):
            continue
        activation, fused = None, None
        if len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module":
                target = module.get_submodule(user.target)
                if isinstance(target, FusedActivation):
                    target = target.activation
                activation = activation_of(target)
                fused = user if activation is not None else None
        if any(_writes_in_place(user) for user in (fused or node).users):
            continue  # the output is state: a write into it would hide changes from the next layers
        name = f"skipconv_sum{count}"
        while hasattr(module, name):
            name += "_"
        module.add_module(name, SparseSum(activation))
        last = fused or node
        with graph.inserting_after(last):
            summed = graph.call_module(name, args=node.args)
        last.replace_all_uses_with(summed)
        if fused is not None:
            graph.erase_node(fused)
        graph.erase_node(node)
        count += 1
    graph.lint()
    return count
