"""Turning any PyTorch model into a Skip-Conv model, and the stream-level controls around it."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from skipconv_cli.engine.activations import ActivateOutput, FusedActivation, activation_of
from skipconv_cli.engine.elementwise import FollowsSparsity, follow_sparsity
from skipconv_cli.engine.gates import check_gate_args
from skipconv_cli.engine.skip_conv import SkipConv2d, fold_batchnorm

DEFAULT_THRESHOLD = 0.3
Thresholds = float | Mapping[str, float]


def convert(
    model: nn.Module,
    gate: str = "output-norm",
    threshold: Thresholds = DEFAULT_THRESHOLD,
    block: int = 1,
    reset_every: int | None = None,
    *,
    reference: str = "pending",
    backend: str = "sparse",
) -> nn.Module:
    """Returns a copy of ``model`` in which every ``nn.Conv2d`` is a :class:`SkipConv2d`.

    A ``nn.BatchNorm2d`` in eval mode that directly follows a conv (its only consumer) is folded into the
    conv and replaced by ``nn.Identity``. The caller's model is left untouched.

    Args:
        model: any module containing at least one ``nn.Conv2d``.
        gate: ``"output-norm"``, ``"input-norm"`` or ``"gumbel"``.
        threshold: one scale-free threshold for every layer, or a mapping from layer name (as in
            ``model.named_modules()``) to threshold; layers the mapping does not name get 0.3.
        block: 1, 2, 4 or 8: structured gates over ``block x block`` output tiles.
        reset_every: recompute densely every this many frames (None: never after the first).
        reference: ``"pending"`` (exact, no drift) or ``"previous"`` (the paper's lossy reference).
        backend: ``"sparse"`` (the fast one: recomputes only the tiles that can change, with a measured
            per-layer dense fallback; inference under ``torch.no_grad()``/``torch.inference_mode()``,
            gradients fall back to the reference path; see ``SkipConv2d``) or ``"reference"`` (the
            algorithm in dense tensor ops: exact MAC counts, training, no speed; for tests and
            calibration).

    Examples:
        >>> fast = convert(my_model.eval(), gate="output-norm", threshold=0.5, block=4)
        >>> for frame in frames: out = fast(frame)
        >>> report(fast)["macs"]["reduction"]
    """
    default = threshold if not isinstance(threshold, Mapping) else DEFAULT_THRESHOLD
    check_gate_args(gate, default, block)
    model = copy.deepcopy(model)
    convs = [(name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to convert")
    per_layer = _per_layer_thresholds(threshold, [name for name, _ in convs], default)
    graphs = _trace(model)
    folds = _batchnorms_to_fold(model, graphs)
    fusions = _activations_to_fuse(model, graphs, folds)
    for name, conv in convs:
        bn_name = folds.get(name)
        bn = model.get_submodule(bn_name) if bn_name else None
        layer = SkipConv2d.from_conv(
            conv, bn, gate=gate, threshold=per_layer[name], block=block, reset_every=reset_every,
            reference=reference, backend=backend,
        )  # fmt: skip
        layer.train(conv.training)
        if name in fusions:
            layer.fused_activation = activation_of(model.get_submodule(fusions[name]))
        _set_submodule(model, name, layer)
        if bn_name:
            _set_submodule(model, bn_name, nn.Identity())
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):  # nn.ReLU(inplace=True) and the like
            module.inplace = False  # (the sparse backend's layers hand out their state: see hand_out)
    _wrap_fused_activations(model, set(fusions.values()))
    if backend == "sparse":  # the ops between layers that can follow the sparse backend's sparsity
        follow_sparsity(model)
    model.register_forward_hook(_copy_state_outputs)
    return model


def _copy_state_outputs(module: nn.Module, args: tuple, output: object) -> object:
    """A Skip-Conv layer hands out its state as its output (valid until its next frame); where such a
    tensor is the model's own output, the caller gets a copy it may keep across frames."""
    if isinstance(output, torch.Tensor):
        return output.clone() if getattr(output, "skipconv_state", False) else output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple
        return type(output)(*(_copy_state_outputs(module, args, item) for item in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_copy_state_outputs(module, args, item) for item in output)
    if isinstance(output, dict):
        return {key: _copy_state_outputs(module, args, value) for key, value in output.items()}
    return output


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode ``BatchNorm2d`` that directly follows a conv folded into
    that conv (replaced by ``nn.Identity``), the convs staying plain ``nn.Conv2d``.

    The fair dense baseline: an optimised dense deployment folds BatchNorm too, and ``convert`` does.
    """
    model = copy.deepcopy(model)
    for conv_name, bn_name in _batchnorms_to_fold(model, _trace(model)).items():
        conv = model.get_submodule(conv_name)
        bias = conv.bias.detach() if conv.bias is not None else None
        weight, bias = fold_batchnorm(conv.weight.detach(), bias, model.get_submodule(bn_name))
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        _set_submodule(model, bn_name, nn.Identity())
    return model


def fuse_activations(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which each conv whose output only an activation reads applies that
    activation in place, the activation module passing it through (the convs staying plain ``nn.Conv2d``).

    The dense baseline's share of what ``convert`` fuses (see ``engine.activations``): what a fused
    conv+activation kernel gives a dense deployment, so that a comparison credits skipping alone.
    """
    model = copy.deepcopy(model)
    fusions = _activations_to_fuse(model, _trace(model), folds={})  # (an unfolded BatchNorm stops a fusion)
    for conv_name, act_name in fusions.items():
        hook = ActivateOutput(activation_of(model.get_submodule(act_name)))
        model.get_submodule(conv_name).register_forward_hook(hook)
    _wrap_fused_activations(model, set(fusions.values()))
    return model


def skip_layers(model: nn.Module) -> list[tuple[str, SkipConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SkipConv2d)]


def _require_skip_layers(model: nn.Module) -> list[tuple[str, SkipConv2d]]:
    layers = skip_layers(model)
    if not layers:
        raise ValueError("the model has no Skip-Conv layer: call skipconv_cli.convert(model) first")
    return layers


def reset(model: nn.Module) -> None:
    """Drops all stream state: the next frame is computed densely in every layer."""
    for _, layer in _require_skip_layers(model):
        layer.reset()
    for module in model.modules():
        if isinstance(module, FollowsSparsity):
            module.reset()


def reset_stats(model: nn.Module) -> None:
    """Starts MAC accounting afresh (the stream state is kept)."""
    for _, layer in _require_skip_layers(model):
        layer.reset_stats()


def set_thresholds(model: nn.Module, threshold: Thresholds) -> None:
    """Changes the thresholds of a converted model in place (one float or a per-layer mapping)."""
    layers = _require_skip_layers(model)
    default = threshold if not isinstance(threshold, Mapping) else DEFAULT_THRESHOLD
    per_layer = _per_layer_thresholds(threshold, [name for name, _ in layers], default)
    for name, layer in layers:
        check_gate_args(layer.gate_type, per_layer[name], layer.block)
        layer.threshold = float(per_layer[name])


def set_backend(model: nn.Module, name: str) -> None:
    """Switches every Skip-Conv layer to the ``"reference"`` or ``"sparse"`` backend; the stream state
    is dropped, so the next frame is dense."""
    for _, layer in _require_skip_layers(model):
        layer.backend = name


def report(model: nn.Module) -> dict:
    """MAC accounting since the last ``reset_stats``: totals and one entry per Skip-Conv layer.

    ``macs_executed`` counts the outputs really computed (the footprint of the updated inputs) plus the
    gates' own cost; ``reduction`` is dense / executed.
    """
    layers = []
    frames = 0
    for name, layer in _require_skip_layers(model):
        frames = max(frames, layer.frames_seen)
        layers.append({"name": name, **layer.layer_stats()})
    dense = sum(entry["macs_dense"] for entry in layers)
    executed = sum(entry["macs_executed"] for entry in layers)
    return {
        "frames": frames,
        "macs": {"dense": dense, "executed": executed, "reduction": dense / executed if executed else 1.0},
        "layers": layers,
    }


def _per_layer_thresholds(threshold: Thresholds, names: list[str], default: float) -> dict[str, float]:
    if not isinstance(threshold, Mapping):
        return dict.fromkeys(names, float(threshold))
    unknown = sorted(set(threshold) - set(names))
    if unknown:
        raise ValueError(f"thresholds name layers the model does not have: {', '.join(unknown[:5])}")
    for value in threshold.values():
        check_gate_args("output-norm", value, 1)
    return {name: float(threshold.get(name, default)) for name in names}


class _Tracer(torch.fx.Tracer):
    """Treats the modules named in ``opaque`` as leaves and remembers which module's forward a failed
    trace was in."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name in self.opaque or super().is_leaf_module(module, name)

    def call_module(self, module: nn.Module, forward, args, kwargs):
        self.stack.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _trace(model: nn.Module, prefix: str = "") -> list[torch.fx.Graph]:
    """Symbolic traces covering the model, module targets named from the model's root.

    A module whose forward cannot be traced (control flow on shapes, like 'same' padding) becomes a leaf
    and is traced on its own; where the root's forward itself cannot be traced, each child is. A value
    used only inside one graph is used nowhere else, so each graph can be read alone.
    """
    opaque: set[str] = set()
    for _ in range(256):
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
        except Exception:
            failed = tracer.failed_in[-1] if tracer.failed_in else None
            if failed is None or failed in opaque:  # the module's own forward: trace its children
                children = model.named_children()
                return [graph for name, child in children for graph in _trace(child, _join(prefix, name))]
            opaque.add(failed)
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                node.target = _join(prefix, node.target)
        graphs = [graph]
        for name in sorted(opaque):
            graphs += _trace(model.get_submodule(name), _join(prefix, name))
        return graphs
    return []


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _module_calls(graphs: list[torch.fx.Graph]) -> dict[str, int]:
    calls: dict[str, int] = {}
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _batchnorms_to_fold(model: nn.Module, graphs: list[torch.fx.Graph]) -> dict[str, str]:
    """Maps conv name -> name of the eval-mode BatchNorm2d that consumes only that conv's output."""
    pairs = _sequential_pairs(model) | _traced_pairs(model, graphs)
    return {
        conv: bn
        for conv, bn in pairs.items()
        if not model.get_submodule(bn).training and model.get_submodule(bn).track_running_stats
    }


def _activations_to_fuse(
    model: nn.Module, graphs: list[torch.fx.Graph], folds: dict[str, str]
) -> dict[str, str]:
    """Maps conv name -> name of the fusable activation module that alone reads its output, possibly
    through the BatchNorm folded into it or ``nn.Identity`` modules (seen in a trace: none without)."""
    modules = dict(model.named_modules())
    calls = _module_calls(graphs)
    fusions = {}
    for node in (node for graph in graphs for node in graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv2d:
            continue
        if calls[node.target] != 1:  # a conv called twice would apply the activation to both outputs
            continue
        folded = folds.get(node.target)
        user = node
        while len(user.users) == 1:
            user = next(iter(user.users))
            if user.op != "call_module":
                break
            module = modules.get(user.target)
            if activation_of(module) is not None:
                fusions[node.target] = user.target
                break
            if not (type(module) is nn.Identity or user.target == folded):
                break
    return fusions


def _wrap_fused_activations(model: nn.Module, names: set[str]) -> None:
    """Wraps the named activation modules, under every name that refers to them (a trace names a module
    reached by two attributes after the first: a call through the other must pass through too)."""
    targets = {id(model.get_submodule(name)) for name in names}
    wrapped: dict[int, FusedActivation] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in targets:
            wrapper = wrapped.setdefault(id(module), FusedActivation(module))
            _set_submodule(model, name, wrapper)


def _traced_pairs(model: nn.Module, graphs: list[torch.fx.Graph]) -> dict[str, str]:
    """Conv -> BN pairs from symbolic traces."""
    modules = dict(model.named_modules())
    calls = _module_calls(graphs)
    pairs = {}
    for node in (node for graph in graphs for node in graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv2d:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        called_once = calls[user.target] == 1 and calls[node.target] == 1
        if isinstance(modules.get(user.target), nn.BatchNorm2d) and called_once:
            pairs[node.target] = user.target
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children[:-1], children[1:], strict=True):
            if type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d):
                dot = f"{prefix}." if prefix else ""
                pairs[dot + name_a] = dot + name_b
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
