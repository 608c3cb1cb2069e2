"""Residual sums that follow the sparsity from layer to layer.

Between convolutions most networks add maps (residual shortcuts), often followed by an activation. Dense,
such a sum costs a pass over the whole map every frame, and its output is a fresh tensor that the next
Skip-Conv layer must scan whole to find what changed (HRNet-w32: ~10 ms a frame of adds and ReLUs, and a
full scan in every layer reading a block's output, also on frames where nothing moved).

:class:`SparseSum` keeps its output as state. When both inputs are outputs of the sparse backend's layers
(or of other sums) whose changes since its last frame are known (their ``Revision`` and mark map, see
``backends.sparse``), it recomputes, and activates, only the pixels either input wrote; its output carries
its own revision and marks, so the layers reading it scan incrementally. Everything else (other inputs,
broadcasting, autograd, layouts or devices the C++ step does not cover) is the plain sum.

``follow_sums`` puts a :class:`SparseSum` in place of each ``a + b`` between two tensors in the forward of
the model's blocks (a symbolic trace of each module's own forward, its children as leaves); an activation
module that alone reads the sum is applied by the sum.
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F
from torch import fx, nn

from skipconv_cli.engine.activations import CLAMP, FusedActivation, activate_, activation_of
from skipconv_cli.engine.activations import NONE as NO_ACTIVATION
from skipconv_cli.engine.backends import native
from skipconv_cli.engine.backends.sparse import Revision, revision_of

ADDS = (operator.add, torch.add)
IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


class SparseSum(nn.Module):
    """``activation(a + b)``, recomputed only where ``a`` or ``b`` changed when that is known."""

    def __init__(self, activation: tuple[int, float, float] | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.out: torch.Tensor | None = None  # the state: the last output, handed out as is
        self.marks: torch.Tensor | None = None  # uint8 [N, H, W]: 2 where the last step wrote
        self.revision = Revision()
        self.inputs: tuple | None = None  # ((weakref, revision number) of a, of b) at the last step
        self.version = 0  # out's version counter after the last step (an in-place write downstream)
        self.pixels_written = 0  # since the stream started (tests, statistics)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        revisions = revision_of(a), revision_of(b)
        if None in revisions or not self._covered(a, b):
            self.out = self.inputs = None
            return self._plain(a, b)
        changes = self._changes_since_last(a, b)
        if changes is None:
            self._full(a, b)
        elif changes[0] is not None or changes[1] is not None:
            marks_a, marks_b = changes
            written = native.extension().add_marked(
                a, b, self.out, marks_a, marks_b, *(self.activation or (NO_ACTIVATION, 0.0, 0.0)), self.marks
            )
            self.pixels_written += written
            if written:
                self.revision.number += 1
                self.revision.marks, self.revision.marked = self.marks, self.revision.number
            else:  # the mark map was cleared: it no longer describes the last write
                self.revision.marks, self.revision.marked = None, -1
        self.inputs = tuple((weakref.ref(t), r.number) for t, r in zip((a, b), revisions, strict=True))
        if not self.out.is_inference():
            self.version = self.out._version
        return self.out

    def _covered(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """What the C++ sum covers: one shape, float32, channels_last CPU maps, no autograd."""
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dim() == 4
            and a.dtype == b.dtype == torch.float32
            and a.device.type == b.device.type == "cpu"
            and a.is_contiguous(memory_format=torch.channels_last)
            and b.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and native.extension() is not None
        )

    def _changes_since_last(self, a: torch.Tensor, b: torch.Tensor) -> tuple | None:
        """Per input: None (unchanged) or the mark map of its one write since the last step; None overall
        when that is not known (another tensor, more writes, a new stream, our output written into)."""
        out = self.out
        if self.inputs is None or out is None or out.shape != a.shape:
            return None
        if not out.is_inference() and out._version != self.version:
            return None
        if a.is_inference() != out.is_inference():
            return None
        changes = []
        for t, (ref, number) in zip((a, b), self.inputs, strict=True):
            revision = revision_of(t)
            if t is not ref():
                return None
            if revision.number == number:
                changes.append(None)
            elif revision.number == number + 1 and revision.marked == revision.number:
                changes.append(revision.marks)
            else:
                return None
        return tuple(changes)

    def _full(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """The whole sum into the state (a new stream, or changes not known): the next layers scan whole."""
        if self.out is None or self.out.shape != a.shape or self.out.is_inference() != a.is_inference():
            self.out = torch.empty_like(a, memory_format=torch.channels_last)
            self.marks = torch.zeros((a.shape[0], a.shape[2], a.shape[3]), dtype=torch.uint8)
            self.revision = Revision()
            self.out.skipconv_state = True  # a model output that is state is copied for the caller
            self.out.skipconv_revision = self.revision
            self.pixels_written = 0
        torch.add(a, b, out=self.out)
        if self.activation is not None:
            activate_(self.out, self.activation)
        self.revision.number += 1
        self.revision.marks, self.revision.marked = None, -1

    def _plain(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        if self.activation is None or not isinstance(out, torch.Tensor):
            return out
        kind, low, high = self.activation
        if torch.is_grad_enabled() and out.requires_grad:  # out of place under autograd
            out = out.clamp(low, high) if kind == CLAMP else F.silu(out)
            out.skipconv_activation = self.activation
            return out
        return activate_(out, self.activation)


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


def follow_sums(model: nn.Module) -> int:
    """Replaces, in place, each sum of two tensors in the forward of ``model``'s own (non-``torch.nn``)
    modules by a :class:`SparseSum`, fusing an activation module that alone reads it. Modules whose
    forward cannot be traced are left as they are. Returns how many sums were replaced."""
    replaced = 0
    for module in list(model.modules()):
        if type(module).__module__.startswith("torch.") or not list(module.children()):
            continue
        if isinstance(module, (SparseSum, FusedActivation, fx.GraphModule)):
            continue
        try:
            graph = _OwnForwardTracer().trace(module)
        except Exception:  # control flow on values, unsupported calls: the module runs as written
            continue
        count = _replace_sums(module, graph)
        if count:
            traced = fx.GraphModule(module, graph, class_name=type(module).__name__)
            module.forward = traced.forward  # (the instance's forward: the module keeps its type and state)
            replaced += count
    return replaced


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
